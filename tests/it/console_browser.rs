//! The operator console in a real headless Chromium, against `aiq run` on the harness's Redis
//! and PostgreSQL with the fake providers: sign in, the overview's tier counts of what the test
//! enqueued, the job list, the dead set, a dead job retried from its page until it succeeds (and
//! its result row is in PostgreSQL), money and organisations; a viewer sees no retry button;
//! the overview's live refresh (`console.js`) showing jobs enqueued after the page loaded,
//! without a reload.
//! Every page is saved, 1280 wide, to target/console-screenshots/<page>.png, or with
//! `AIQ_SCREENSHOTS_TO_DOCS=1` to docs/console/ for the README.

use std::path::PathBuf;
use std::time::Duration;

use aiq::domain::{JobKind, Tier};
use aiq_testkit::webdriver::Browser;

use crate::harness::{ORG_A, ORG_B, TestCtx, llm_payload, readyz, wait_until};

const WAIT: Duration = Duration::from_secs(60);
const OPERATOR: &str = "operator-token-for-the-browser-test-0001";
const VIEWER: &str = "viewer-token-for-the-browser-test-00001";

/// Waiting jobs the test leaves behind the held one, per tier in `Tier::ALL` order.
const WAITING: [usize; 6] = [3, 2, 4, 1, 0, 2];

/// Where a page's screenshot goes: `target/console-screenshots/`, or with
/// `AIQ_SCREENSHOTS_TO_DOCS=1` the README's `docs/console/` (so a test run leaves the
/// repository's pictures alone unless asked to refresh them).
fn shot(page: &str) -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dir = if std::env::var_os("AIQ_SCREENSHOTS_TO_DOCS").is_some_and(|v| v == "1") {
        root.join("docs").join("console")
    } else {
        root.join("target").join("console-screenshots")
    };
    std::fs::create_dir_all(&dir).expect("the screenshots' folder");
    dir.join(format!("{page}.png"))
}

/// Saves the page and checks it is a PNG of the window's width.
async fn screenshot(b: &Browser, page: &str) {
    let png = b
        .screenshot_png(&shot(page))
        .await
        .unwrap_or_else(|e| panic!("screenshot of {page}: {e:#}"));
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "{page}: not a PNG");
    let width = u32::from_be_bytes(png[16..20].try_into().unwrap());
    assert_eq!(width, 1280, "{page}: the screenshot is {width} wide");
}

async fn fake_post(ctx: &TestCtx, path: &str) {
    let fake = &ctx.vars["AIQ_OPENAI_BASE_URL"];
    let r = reqwest::Client::new()
        .post(format!("{fake}{path}"))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{path}: {}", r.status());
}

/// Signs in on the login page with `token`; returns once the overview shows.
async fn sign_in(b: &Browser, base: &str, token: &str, shoot: bool) {
    b.goto(&format!("{base}/console/login")).await.unwrap();
    b.wait_for("form#login", WAIT).await.unwrap();
    if shoot {
        screenshot(b, "login").await;
    }
    b.find("input#token")
        .await
        .unwrap()
        .send_keys(token)
        .await
        .unwrap();
    b.find("button#sign-in")
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    b.wait_for("table#tiers", WAIT).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_signs_in_sees_the_backlog_and_retries_a_dead_job_from_its_page() {
    let ctx = TestCtx::new().await;
    let admin = format!("127.0.0.1:{}", aiq_testkit::localsvc::free_port().unwrap());
    let operators = format!("ops:{OPERATOR}");
    let viewers = format!("watcher:{VIEWER}");
    // One job at a time, one attempt: the held job keeps the only slot, so the rest wait.
    let daemon = ctx.spawn_daemon(&[
        ("AIQ_ADMIN_ADDR", &admin),
        ("AIQ_CONCURRENCY", "1"),
        ("AIQ_FETCH_BATCH", "1"),
        ("AIQ_MAX_ATTEMPTS", "1"),
        ("AIQ_CONSOLE_OPERATOR_TOKENS", &operators),
        ("AIQ_CONSOLE_VIEWER_TOKENS", &viewers),
    ]);
    wait_until(WAIT, "the daemon to be ready", || async {
        readyz(&admin).await.is_some_and(|(s, _)| s == 200)
    })
    .await;

    // Two jobs die in a provider outage (a reason that goes away).
    fake_post(&ctx, "/_fake/outage?status=503&ms=600000").await;
    let mut dead = Vec::new();
    for text in [
        "Caption the outage photo.",
        "Caption the second outage photo.",
    ] {
        let p = llm_payload(Tier::ProfessionalAgency, ORG_A, text);
        dead.push(
            ctx.enqueue(JobKind::LlmComplete, Tier::ProfessionalAgency, ORG_A, &p, 1)
                .await,
        );
    }
    wait_until(WAIT, "both outage jobs to be dead", || async {
        ctx.queue.stats().await.unwrap().dead == 2
    })
    .await;
    fake_post(&ctx, "/_fake/outage?status=503&ms=0").await;

    // One job holds the only slot; the others wait behind it.
    let held = llm_payload(Tier::GrowthTeam, ORG_B, "Hold this one. [fake:hold]");
    ctx.enqueue(JobKind::LlmComplete, Tier::GrowthTeam, ORG_B, &held, 1)
        .await;
    wait_until(WAIT, "the held job to be in flight", || async {
        ctx.queue.stats().await.unwrap().inflight == 1
    })
    .await;
    for (tier, n) in Tier::ALL.iter().zip(WAITING) {
        for i in 0..n {
            let org = if i % 2 == 0 { ORG_A } else { ORG_B };
            let p = llm_payload(*tier, org, &format!("Waiting photo {i}."));
            ctx.enqueue(JobKind::LlmComplete, *tier, org, &p, 1).await;
        }
    }

    let base = format!("http://{admin}");
    let b = Browser::start()
        .await
        .expect("starting chromedriver and chromium");
    sign_in(&b, &base, OPERATOR, true).await;
    let who = b.find("span#who").await.unwrap().text().await.unwrap();
    assert!(who.contains("ops"), "{who}");
    for (tier, n) in Tier::ALL.iter().zip(WAITING) {
        let css = format!("table#tiers tr[data-tier={}] td.waiting", tier.as_str());
        let cell = b.find(&css).await.unwrap().text().await.unwrap();
        assert_eq!(cell.trim(), n.to_string(), "{css}");
    }
    screenshot(&b, "overview").await;

    // ORG_A's waiting professional_agency jobs: the even ones of the four.
    b.goto(&format!(
        "{base}/console/jobs?tier=professional_agency&org={ORG_A}&state=waiting"
    ))
    .await
    .unwrap();
    b.wait_for("table#job-list", WAIT).await.unwrap();
    let listed = b.find_all("table#job-list td:first-child").await.unwrap();
    assert_eq!(listed.len(), 2, "ORG_A's waiting professional_agency jobs");
    screenshot(&b, "jobs").await;

    b.find("a#nav-dead").await.unwrap().click().await.unwrap();
    b.wait_for("table#dead-list", WAIT).await.unwrap();
    for id in &dead {
        b.find(&format!("table#dead-list tr[data-id=\"{id}\"]"))
            .await
            .unwrap_or_else(|e| panic!("dead job {id} not listed: {e:#}"));
    }
    screenshot(&b, "dead").await;

    b.goto(&format!("{base}/console/dead/{}", dead[0]))
        .await
        .unwrap();
    b.wait_for("button#retry", WAIT).await.unwrap();
    screenshot(&b, "dead-job").await;
    // The held job frees the slot; then the retried job runs behind the waiting ones.
    fake_post(&ctx, "/_fake/release").await;
    b.find("button#retry").await.unwrap().click().await.unwrap();
    b.wait_for("div#flash", WAIT).await.unwrap();

    let job_page = format!("{base}/console/jobs/{}", dead[0]);
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        b.goto(&job_page).await.unwrap();
        let state = b.find("dd#state").await.unwrap().text().await.unwrap();
        if state.trim() == "succeeded" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the retried job's page says {:?} after {WAIT:?}, not succeeded; dead set {:?}",
            state,
            ctx.queue.dead_page(0, 10).await.unwrap()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status: String = sqlx::query_scalar(
        "SELECT status FROM ai_processing_results WHERE job_id = $1 AND organization_id = $2::uuid",
    )
    .bind(&dead[0])
    .bind(ORG_A)
    .fetch_one(ctx.store.pool())
    .await
    .unwrap();
    assert_eq!(status, "completed");
    b.find("table#events").await.unwrap();
    screenshot(&b, "job").await;

    b.find("a#nav-money").await.unwrap().click().await.unwrap();
    b.wait_for("section#spend-chart", WAIT).await.unwrap();
    b.find("table#org-spend").await.unwrap();
    screenshot(&b, "money").await;

    b.find("a#nav-orgs").await.unwrap().click().await.unwrap();
    b.wait_for("table#orgs", WAIT).await.unwrap();
    screenshot(&b, "orgs").await;

    b.goto(&format!("{base}/console/orgs/{ORG_A}"))
        .await
        .unwrap();
    b.wait_for("table#limits", WAIT).await.unwrap();
    b.find("form#set-limits").await.unwrap();
    screenshot(&b, "org").await;

    // A viewer sees the other dead job without its buttons.
    b.delete_cookies().await.unwrap();
    sign_in(&b, &base, VIEWER, false).await;
    let who = b.find("span#who").await.unwrap().text().await.unwrap();
    assert!(who.contains("watcher"), "{who}");
    b.goto(&format!("{base}/console/dead/{}", dead[1]))
        .await
        .unwrap();
    b.wait_for("h1", WAIT).await.unwrap();
    let source = b.page_source().await.unwrap();
    assert!(source.contains(&dead[1]), "the viewer's page lacks the job");
    assert!(b.find_all("button#retry").await.unwrap().is_empty());
    assert!(b.find_all("button#purge").await.unwrap().is_empty());
    drop(b);

    crate::harness::signal_and_wait(daemon, libc::SIGTERM).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_overview_shows_new_waiting_jobs_by_its_live_refresh_without_a_reload() {
    let ctx = TestCtx::new().await;
    let tier = Tier::GrowthTeam;
    let enqueue = |n: usize| {
        let ctx = &ctx;
        async move {
            for i in 0..n {
                let p = llm_payload(tier, ORG_A, &format!("Live photo {i}."));
                ctx.enqueue(JobKind::LlmComplete, tier, ORG_A, &p, 1).await;
            }
        }
    };
    enqueue(2).await;
    // No worker runs: what is enqueued stays waiting.
    let console = crate::console::Console::start(&ctx).await;
    let base = format!("http://{}", console.addr);
    let b = Browser::start()
        .await
        .expect("starting chromedriver and chromium");
    sign_in(&b, &base, crate::console::OPERATOR, false).await;
    let css = format!("table#tiers tr[data-tier={}] td.waiting", tier.as_str());
    let shown = b.find(&css).await.unwrap().text().await.unwrap();
    assert_eq!(shown.trim(), "2", "{css}");
    // A mark on this page's window: a reload or a navigation would lose it.
    let navigations = b
        .execute(
            "window.aiqLiveMark = 'before'; \
             return performance.getEntriesByType('navigation').length;",
        )
        .await
        .unwrap();
    assert_eq!(navigations, 1);

    enqueue(3).await;
    let shown = b.wait_for_text(&css, "5", WAIT).await.unwrap();
    assert_eq!(shown.trim(), "5", "{css}");
    let after = b
        .execute(
            "return [window.aiqLiveMark || null, \
             performance.getEntriesByType('navigation').length, location.pathname];",
        )
        .await
        .unwrap();
    assert_eq!(after, serde_json::json!(["before", 1, "/console/"]));
}
