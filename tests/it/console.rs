//! The console on the admin port, over plain HTTP: sign-in, roles, CSRF, the audit rows, the
//! pages' ids (docs/console/CONTRACT.md), escaping, and the dead set's actions.

use std::net::SocketAddr;
use std::time::Duration;

use aiq::config::{ConsoleRole, ConsoleSettings, ConsoleToken, CookieSecure, Secret};
use aiq::domain::{OrganizationId, Tier};
use aiq::queue::{NewJob, Outcome, Settlement};
use tokio_util::sync::CancellationToken;

use crate::harness::{ORG_A, ORG_B, TestCtx, llm_payload};

pub(crate) const OPERATOR: &str = "operator-token-0123456789abcdef";
const VIEWER: &str = "viewer-token-0123456789abcdefgh";

const FORM: &str = "application/x-www-form-urlencoded";

/// A form body, as a browser sends it.
fn encode(fields: &[(&str, &str)]) -> String {
    url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(fields)
        .finish()
}

/// The console of an in-process admin server on a free port, with no worker: what the test
/// enqueues stays waiting.
pub(crate) struct Console {
    pub(crate) addr: SocketAddr,
    http: reqwest::Client,
    _stop: tokio_util::sync::DropGuard,
}

impl Console {
    pub(crate) async fn start(ctx: &TestCtx) -> Self {
        Self::start_with(ctx, CookieSecure::Auto).await
    }

    async fn start_with(ctx: &TestCtx, cookie_secure: CookieSecure) -> Self {
        let app = aiq::worker::app(&ctx.settings, ctx.store.clone())
            .await
            .unwrap();
        let tokens = vec![
            ConsoleToken {
                name: "olga".into(),
                role: ConsoleRole::Operator,
                token: Secret::new(OPERATOR),
            },
            ConsoleToken {
                name: "vic".into(),
                role: ConsoleRole::Viewer,
                token: Secret::new(VIEWER),
            },
        ];
        let stop = CancellationToken::new();
        let addr = aiq::http::serve(
            "127.0.0.1:0".parse().unwrap(),
            aiq::worker::admin_sources(&ctx.queue, &app).with_console(ConsoleSettings {
                tokens,
                session: Duration::from_secs(3600),
                cookie_secure,
            }),
            stop.clone(),
        )
        .await
        .unwrap();
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        Self {
            addr,
            http,
            _stop: stop.drop_guard(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Signs in with a token; returns the session's Cookie header value.
    async fn sign_in(&self, token: &str) -> String {
        let set = self.sign_in_set_cookie(token, None).await;
        set.split(';').next().unwrap().to_owned()
    }

    /// Signs in with a token, with `X-Forwarded-Proto` if given; returns the whole Set-Cookie.
    async fn sign_in_set_cookie(&self, token: &str, forwarded_proto: Option<&str>) -> String {
        let mut req = self
            .http
            .post(self.url("/console/login"))
            .header("content-type", FORM)
            .body(encode(&[("token", token)]));
        if let Some(p) = forwarded_proto {
            req = req.header("x-forwarded-proto", p);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 303);
        assert_eq!(r.headers()["location"], "/console/");
        let set = r.headers()["set-cookie"].to_str().unwrap().to_owned();
        assert!(
            set.contains("HttpOnly")
                && set.contains("SameSite=Strict")
                && set.contains("Path=/console"),
            "{set}"
        );
        set
    }

    async fn get(&self, cookie: &str, path: &str) -> (u16, String) {
        let r = self
            .http
            .get(self.url(path))
            .header("cookie", cookie)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    async fn post(&self, cookie: &str, path: &str, form: &[(&str, &str)]) -> (u16, String) {
        let r = self
            .http
            .post(self.url(path))
            .header("cookie", cookie)
            .header("content-type", FORM)
            .body(encode(form))
            .send()
            .await
            .unwrap();
        let loc = r
            .headers()
            .get("location")
            .map(|l| l.to_str().unwrap().to_owned())
            .unwrap_or_default();
        (r.status().as_u16(), loc)
    }

    /// The session's CSRF token, from a page's hidden field.
    async fn csrf(&self, cookie: &str) -> String {
        let (_, page) = self.get(cookie, "/console/dead").await;
        let at = page.find(r#"name="csrf" value=""#).expect("a csrf field") + 19;
        page[at..].split('"').next().unwrap().to_owned()
    }
}

/// Enqueues one job per (tier, org, text) and buries them all; returns their ids.
async fn dead_jobs(ctx: &TestCtx, jobs: &[(Tier, &str, &str)]) -> Vec<String> {
    let mut ids = Vec::new();
    for (tier, org, text) in jobs {
        let job = NewJob {
            kind: aiq::domain::JobKind::LlmComplete,
            tier: *tier,
            organization_id: OrganizationId::parse(org).unwrap(),
            payload: llm_payload(*tier, org, text),
            job_id: None,
            delay: Duration::ZERO,
            idempotency_key: None,
            max_attempts: 0,
        };
        ids.push(ctx.queue.enqueue(&job).await.unwrap().job_id);
    }
    let leased = ctx.queue.fetch(ids.len()).await.unwrap();
    assert_eq!(leased.len(), ids.len());
    let kill: Vec<Settlement> = leased
        .iter()
        .map(|l| Settlement {
            id: l.id.clone(),
            token: l.token.clone(),
            outcome: Outcome::Dead {
                reason: "bad <b>input</b>".into(),
            },
        })
        .collect();
    ctx.queue.settle(&kill).await.unwrap();
    ids
}

async fn is_dead(ctx: &TestCtx, id: &str) -> bool {
    ctx.queue
        .job_fields(id)
        .await
        .unwrap()
        .get("state")
        .map(String::as_str)
        == Some("dead")
}

#[tokio::test]
async fn a_viewer_cannot_act_an_action_needs_its_csrf_token_and_a_retry_is_audited() {
    let ctx = TestCtx::new().await;
    let id = dead_jobs(&ctx, &[(Tier::Trial, ORG_A, "x")])
        .await
        .remove(0);
    let c = Console::start(&ctx).await;
    let retry = format!("/console/dead/{id}/retry");
    let purge = format!("/console/dead/{id}/purge");

    // Signed out: pages send to the sign-in form, actions are 401.
    let r = c.http.get(c.url("/console/")).send().await.unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], "/console/login");
    assert_eq!(c.post("", &retry, &[]).await.0, 401);
    let (code, form) = c.get("", "/console/login").await;
    assert_eq!(code, 200);
    assert!(form.contains(r#"<form id="login""#) && form.contains(r#"id="sign-in""#));
    let r = c
        .http
        .post(c.url("/console/login"))
        .header("content-type", FORM)
        .body(encode(&[("token", "not-a-token-of-this-console-at-all")]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers().get("set-cookie").is_none());
    // A cookie made up by hand is no session.
    assert_eq!(c.get("aiq_console=b3BlcmF0b3I.x", "/console/").await.0, 303);

    // A viewer sees the dead job without buttons, and is refused both actions.
    let viewer = c.sign_in(VIEWER).await;
    let (code, page) = c.get(&viewer, &format!("/console/dead/{id}")).await;
    assert_eq!(code, 200);
    assert!(
        page.contains(r#"<span id="who">vic (viewer)</span>"#),
        "{page}"
    );
    assert!(!page.contains(r#"id="retry""#) && !page.contains(r#"id="purge""#));
    let vcsrf = c.csrf(&viewer).await;
    assert_eq!(c.post(&viewer, &retry, &[("csrf", &vcsrf)]).await.0, 403);
    assert_eq!(c.post(&viewer, &purge, &[("csrf", &vcsrf)]).await.0, 403);
    assert!(is_dead(&ctx, &id).await);

    // An operator without the token, or with another session's: 403, nothing changes.
    let op = c.sign_in(OPERATOR).await;
    assert_eq!(c.post(&op, &retry, &[]).await.0, 403);
    assert_eq!(c.post(&op, &purge, &[("csrf", &vcsrf)]).await.0, 403);
    assert!(is_dead(&ctx, &id).await);
    let audited = "SELECT count(*) FROM aiq_audit_log WHERE action LIKE 'console.%'";
    assert_eq!(ctx.scalar_i64(audited).await, 0);

    // With it: 303 to the job's page, which says what was done; the job waits again.
    let csrf = c.csrf(&op).await;
    let (code, to) = c.post(&op, &retry, &[("csrf", &csrf)]).await;
    assert_eq!(code, 303);
    assert!(to.starts_with(&format!("/console/dead/{id}")), "{to}");
    let (_, page) = c.get(&op, &to).await;
    assert!(
        page.contains(r#"<div id="flash">1 dead jobs queued again</div>"#),
        "{page}"
    );
    assert!(!is_dead(&ctx, &id).await);
    assert_eq!(ctx.queue.stats().await.unwrap().waiting["trial"], 1);
    let row = sqlx::query_as::<_, (String, String, serde_json::Value)>(
        "SELECT actor, action, details FROM aiq_audit_log",
    )
    .fetch_one(ctx.store.pool())
    .await
    .unwrap();
    assert_eq!(
        (row.0.as_str(), row.1.as_str()),
        ("olga", "console.dead.retry")
    );
    assert_eq!(row.2["ids"][0], id.as_str());
    assert_eq!(row.2["count"], 1);
}

/// `aiq run` with these settings: its exit code and stderr. A daemon that starts instead of
/// exiting is killed after a minute and counts as no exit code.
async fn run_exit(ctx: &TestCtx, env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut cmd = tokio::process::Command::from(crate::harness::aiq_command());
    cmd.envs(&ctx.vars)
        .env_remove("AIQ_CONSOLE_OPERATOR_TOKENS")
        .env_remove("AIQ_CONSOLE_VIEWER_TOKENS")
        .envs(env.iter().copied())
        .arg("run")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let child = cmd.spawn().unwrap();
    match tokio::time::timeout(Duration::from_secs(60), child.wait_with_output()).await {
        Ok(out) => {
            let out = out.unwrap();
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        }
        Err(_) => (None, "still running after a minute".into()),
    }
}

#[tokio::test]
async fn run_on_a_non_loopback_admin_address_without_tokens_exits_2_naming_the_setting() {
    let ctx = TestCtx::new().await;
    let (code, err) = run_exit(&ctx, &[("AIQ_ADMIN_ADDR", "0.0.0.0:0")]).await;
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("AIQ_CONSOLE_OPERATOR_TOKENS"), "{err}");
    // A token that is too short is refused too, by name, even on loopback.
    let (code, err) = run_exit(&ctx, &[("AIQ_CONSOLE_VIEWER_TOKENS", "vic:short")]).await;
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("AIQ_CONSOLE_VIEWER_TOKENS"), "{err}");
}

#[tokio::test]
async fn every_page_answers_with_the_contract_ids_and_escapes_what_it_shows() {
    let ctx = TestCtx::new().await;
    let id = dead_jobs(
        &ctx,
        &[(Tier::Enterprise, ORG_A, "<script>alert(1)</script>")],
    )
    .await
    .remove(0);
    for _ in 0..3 {
        ctx.queue
            .enqueue(&NewJob {
                kind: aiq::domain::JobKind::LlmComplete,
                tier: Tier::GrowthTeam,
                organization_id: OrganizationId::parse(ORG_B).unwrap(),
                payload: llm_payload(Tier::GrowthTeam, ORG_B, "w"),
                job_id: None,
                delay: Duration::ZERO,
                idempotency_key: None,
                max_attempts: 0,
            })
            .await
            .unwrap();
    }
    let c = Console::start(&ctx).await;
    let op = c.sign_in(OPERATOR).await;
    let nav = [
        r#"<nav id="nav">"#,
        r#"id="nav-overview""#,
        r#"id="nav-jobs""#,
        r#"id="nav-dead""#,
        r#"id="nav-money""#,
        r#"id="nav-orgs""#,
        r#"<span id="who">olga (operator)</span>"#,
    ];
    let page = |path: String, code: u16, ids: Vec<String>| {
        let c = &c;
        let op = &op;
        async move {
            let (got, body) = c.get(op, &path).await;
            assert_eq!(got, code, "{path}: {body}");
            for want in nav.iter().map(|s| s.to_string()).chain(ids) {
                assert!(body.contains(&want), "{path} lacks {want}: {body}");
            }
            assert!(
                !body.contains("<script>alert"),
                "{path} does not escape: {body}"
            );
            assert!(!body.contains("<b>input"), "{path} does not escape: {body}");
            body
        }
    };
    let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let body = page(
        "/console/".into(),
        200,
        s(&[
            "<h1>Overview</h1>",
            r#"<table id="tiers">"#,
            r#"<section id="providers""#,
            r#"<section id="spend""#,
        ]),
    )
    .await;
    for t in Tier::ALL {
        assert!(
            body.contains(&format!(r#"<tr data-tier="{}">"#, t.as_str())),
            "{body}"
        );
    }
    assert!(
        body.contains(r#"<tr data-tier="growth_team"><th><a href="/console/jobs?tier=growth_team">growth_team</a></th><td class="waiting">3</td>"#),
        "{body}"
    );
    page(
        format!("/console/jobs/{id}"),
        200,
        s(&[
            r#"<dd id="state">dead</dd>"#,
            r#"<dd id="attempts">1</dd>"#,
            r#"<table id="events">"#,
        ]),
    )
    .await;
    page(
        "/console/jobs/no-such-job".into(),
        404,
        s(&[r#"<dd id="state">not found</dd>"#]),
    )
    .await;
    let r = c
        .http
        .get(c.url(&format!("/console/jobs?id={id}")))
        .header("cookie", &op)
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.headers()["location"],
        format!("/console/jobs/{id}").as_str()
    );
    let body = page(
        format!("/console/jobs?state=waiting&tier=growth_team&org={ORG_B}"),
        200,
        s(&[r#"<table id="job-list">"#]),
    )
    .await;
    assert_eq!(body.matches("<tr data-id=").count(), 3, "{body}");
    page(
        "/console/dead".into(),
        200,
        s(&[
            r#"<form id="dead-filter""#,
            r#"<form id="dead-selected""#,
            r#"<table id="dead-list">"#,
            &format!(r#"<tr data-id="{id}">"#),
            &format!(r#"<input type="checkbox" name="id" value="{id}">"#),
            r#"id="retry-selected""#,
            r#"id="purge-selected""#,
            r#"<form id="dead-matching""#,
            r#"<span id="matching-count">1</span>"#,
            r#"id="retry-matching""#,
            r#"id="purge-matching""#,
            "bad &lt;b&gt;input&lt;/b&gt;",
        ]),
    )
    .await;
    page(
        format!("/console/dead/{id}"),
        200,
        s(&[
            r#"<form id="retry""#,
            r#"<button id="retry">"#,
            r#"<form id="purge""#,
            r#"<button id="purge""#,
            "&lt;script&gt;alert(1)&lt;/script&gt;",
        ]),
    )
    .await;
    page(
        "/console/money".into(),
        200,
        s(&[
            "<h1>Money</h1>",
            r#"<section id="spend-chart">"#,
            "<svg",
            r#"<table id="org-spend">"#,
            r#"<table id="alerts">"#,
        ]),
    )
    .await;
    // The assets are built in, and every answer carries the headers.
    let r = c
        .http
        .get(c.url("/console/assets/console.css"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["cache-control"]
            .to_str()
            .unwrap()
            .contains("max-age")
    );
    assert_eq!(r.headers()["content-security-policy"], "default-src 'self'");
    assert_eq!(r.headers()["x-frame-options"], "DENY");
    assert_eq!(r.headers()["referrer-policy"], "no-referrer");
    let r = c
        .http
        .get(c.url("/console/assets/console.js"))
        .send()
        .await
        .unwrap();
    assert!(r.text().await.unwrap().contains("setInterval"));
}

#[tokio::test]
async fn retry_and_purge_of_the_jobs_matching_a_filter_change_exactly_those() {
    let ctx = TestCtx::new().await;
    let ids = dead_jobs(
        &ctx,
        &[
            (Tier::Trial, ORG_A, "a"),
            (Tier::Trial, ORG_B, "b"),
            (Tier::Enterprise, ORG_A, "c"),
            (Tier::Trial, ORG_A, "d"),
        ],
    )
    .await;
    let c = Console::start(&ctx).await;
    let op = c.sign_in(OPERATOR).await;
    let csrf = c.csrf(&op).await;
    let (_, page) = c
        .get(&op, &format!("/console/dead?tier=trial&org={ORG_A}"))
        .await;
    assert!(
        page.contains(r#"<span id="matching-count">2</span>"#),
        "{page}"
    );
    assert_eq!(page.matches("<tr data-id=").count(), 2, "{page}");

    // A wrong count changes nothing.
    let filter = [("tier", "trial"), ("org", ORG_A)];
    let with = |confirm: &'static str| {
        let mut f: Vec<(&str, &str)> = filter.to_vec();
        f.push(("csrf", csrf.as_str()));
        f.push(("confirm", confirm));
        f
    };
    let (code, to) = c.post(&op, "/console/dead/retry", &with("3")).await;
    assert_eq!(code, 303);
    assert!(to.contains("done=confirm"), "{to}");
    for id in &ids {
        assert!(is_dead(&ctx, id).await);
    }
    let (code, to) = c.post(&op, "/console/dead/retry", &with("2")).await;
    assert_eq!(code, 303);
    let (_, page) = c.get(&op, &to).await;
    assert!(
        page.contains(r#"<div id="flash">2 dead jobs queued again</div>"#),
        "{page}"
    );
    let dead: Vec<bool> = futures::future::join_all(ids.iter().map(|i| is_dead(&ctx, i))).await;
    assert_eq!(dead, [false, true, true, false]);
    let (details,): (serde_json::Value,) =
        sqlx::query_as("SELECT details FROM aiq_audit_log WHERE action = 'console.dead.retry'")
            .fetch_one(ctx.store.pool())
            .await
            .unwrap();
    assert_eq!(details["count"], 2);
    assert_eq!(details["filter"]["tier"], "trial");

    // Purging the ticked ones purges those.
    let (code, _) = c
        .post(
            &op,
            "/console/dead/purge",
            &[("csrf", &csrf), ("id", &ids[1])],
        )
        .await;
    assert_eq!(code, 303);
    assert!(ctx.queue.job_fields(&ids[1]).await.unwrap().is_empty());
    assert!(is_dead(&ctx, &ids[2]).await);
}

#[tokio::test]
async fn an_operator_changes_an_organisations_limits_from_its_page_and_a_viewer_cannot() {
    let ctx = TestCtx::new().await;
    let c = Console::start(&ctx).await;
    let op = c.sign_in(OPERATOR).await;
    let viewer = c.sign_in(VIEWER).await;
    let path = format!("/console/orgs/{ORG_A}");
    let (code, page) = c.get(&viewer, &path).await;
    assert_eq!(code, 200, "{page}");
    assert!(page.contains(r#"<table id="limits">"#), "{page}");
    assert!(!page.contains(r#"id="set-limits""#), "{page}");
    let vcsrf = c.csrf(&viewer).await;
    let action = format!("{path}/limits");
    let ask = |csrf: &str| {
        vec![
            ("csrf".to_owned(), csrf.to_owned()),
            ("in_flight".to_owned(), "7".to_owned()),
            ("daily_usd".to_owned(), "12.5".to_owned()),
        ]
    };
    fn form(v: &[(String, String)]) -> Vec<(&str, &str)> {
        v.iter().map(|(k, x)| (k.as_str(), x.as_str())).collect()
    }
    assert_eq!(c.post(&viewer, &action, &form(&ask(&vcsrf))).await.0, 403);
    assert_eq!(c.post(&op, &action, &form(&ask(""))).await.0, 403);
    let none = ctx
        .store
        .org_overrides(OrganizationId::parse(ORG_A).unwrap().as_uuid())
        .await
        .unwrap();
    assert_eq!(none.max_in_flight, None);

    let (_, page) = c.get(&op, &path).await;
    for id in [
        r#"<form id="set-limits""#,
        r#"name="in_flight""#,
        r#"name="jobs_per_minute""#,
        r#"name="daily_usd""#,
        r#"name="monthly_usd""#,
        r#"<button id="save-limits">"#,
    ] {
        assert!(page.contains(id), "{id}: {page}");
    }
    let csrf = c.csrf(&op).await;
    let (code, to) = c.post(&op, &action, &form(&ask(&csrf))).await;
    assert_eq!(code, 303);
    let own = ctx
        .store
        .org_overrides(OrganizationId::parse(ORG_A).unwrap().as_uuid())
        .await
        .unwrap();
    assert_eq!(own.max_in_flight, Some(7));
    assert_eq!(own.daily.map(|d| d.micros()), Some(12_500_000));
    assert_eq!(own.jobs_per_minute, None, "an empty field is left as it is");
    let (_, page) = c.get(&op, &to).await;
    assert!(
        page.contains(r#"<div id="flash">Limits saved</div>"#),
        "{page}"
    );
    assert!(
        page.contains(r#"<tr data-limit="in_flight"><td>jobs in flight</td>"#),
        "{page}"
    );
    assert_eq!(
        ctx.scalar_i64("SELECT count(*) FROM aiq_audit_log WHERE action = 'console.org.set_limits' AND actor = 'olga'").await,
        1
    );
    // A value that is not a limit is refused and changes nothing.
    let bad = vec![("csrf", csrf.as_str()), ("in_flight", "<script>")];
    let (code, _) = c.post(&op, &action, &bad).await;
    assert_eq!(code, 400);
    let own = ctx
        .store
        .org_overrides(OrganizationId::parse(ORG_A).unwrap().as_uuid())
        .await
        .unwrap();
    assert_eq!(own.max_in_flight, Some(7));
    // The list page answers.
    let (code, page) = c.get(&op, "/console/orgs").await;
    assert_eq!(code, 200);
    assert!(page.contains(r#"<table id="orgs">"#), "{page}");
}

/// A job of `tier` for the overview test.
fn job_of(tier: Tier, delay: Duration) -> NewJob {
    NewJob {
        kind: aiq::domain::JobKind::LlmComplete,
        tier,
        organization_id: OrganizationId::parse(ORG_A).unwrap(),
        payload: llm_payload(tier, ORG_A, "o"),
        job_id: None,
        delay,
        idempotency_key: None,
        max_attempts: 0,
    }
}

#[tokio::test]
async fn the_overview_counts_in_flight_delayed_and_dead_per_tier_the_last_hour_and_the_providers_use()
 {
    let ctx = TestCtx::with(&[
        ("AIQ_PROVIDER_RPM", "openai=100"),
        ("AIQ_PROVIDER_TPM", "openai=5000"),
    ])
    .await;
    // One enterprise job stays leased, one trial job dies, one is deferred by the budget, and
    // a growth_team job is scheduled for later.
    for tier in [Tier::Enterprise, Tier::Trial, Tier::Trial] {
        ctx.queue
            .enqueue(&job_of(tier, Duration::ZERO))
            .await
            .unwrap();
    }
    ctx.queue
        .enqueue(&job_of(Tier::GrowthTeam, Duration::from_secs(3600)))
        .await
        .unwrap();
    let leased = ctx.queue.fetch(3).await.unwrap();
    assert_eq!(leased.len(), 3);
    let trial: Vec<_> = leased.iter().filter(|l| l.tier == "trial").collect();
    let settle = [
        Settlement {
            id: trial[0].id.clone(),
            token: trial[0].token.clone(),
            outcome: Outcome::Dead {
                reason: "out of attempts".into(),
            },
        },
        Settlement {
            id: trial[1].id.clone(),
            token: trial[1].token.clone(),
            outcome: Outcome::Defer {
                after: Duration::from_secs(3600),
                reason: "the day's budget is spent".into(),
                why: aiq::queue::events::DelayReason::Budget,
            },
        },
    ];
    assert_eq!(ctx.queue.settle(&settle).await.unwrap(), vec![true, true]);

    let breakers = aiq::providers::breaker::Breakers::connect(
        &ctx.settings.queue.redis,
        &ctx.settings.budget.prefix,
        ctx.settings.breaker,
    )
    .await
    .unwrap();
    breakers
        .pause(aiq::domain::Provider::Anthropic, Duration::from_secs(600))
        .await
        .unwrap();
    let c = Console::start(&ctx).await;
    let op = c.sign_in(OPERATOR).await;
    // The requests and tokens are counted per minute: the page is read in the minute they were
    // counted in, or read again.
    let body = loop {
        let minute = ctx.redis_minute().await;
        // What an earlier turn of this loop counted in this minute starts again from zero.
        for counter in ["rpm", "tpm"] {
            let _: () = redis::cmd("DEL")
                .arg(format!(
                    "{{{}}}:{counter}:openai:{minute}",
                    ctx.settings.budget.prefix
                ))
                .query_async(&mut ctx.redis().await)
                .await
                .unwrap();
        }
        for _ in 0..2 {
            breakers
                .throttle(aiq::domain::Provider::OpenAi, 250)
                .await
                .unwrap()
                .unwrap();
        }
        let (code, body) = c.get(&op, "/console/").await;
        assert_eq!(code, 200, "{body}");
        if ctx.redis_minute().await == minute {
            break body;
        }
    };
    let row = |tier: &str| {
        let start = body
            .find(&format!(r#"<tr data-tier="{tier}">"#))
            .unwrap_or_else(|| panic!("no row for {tier}: {body}"));
        let end = start + body[start..].find("</tr>").unwrap();
        body[start..end].to_owned()
    };
    let cell = |tier: &str, class: &str| {
        let r = row(tier);
        let at = r
            .find(&format!(r#"<td class="{class}">"#))
            .unwrap_or_else(|| panic!("{tier} lacks {class}: {r}"));
        let text = &r[at + class.len() + 13..];
        let text = text[..text.find("</td>").unwrap()].to_owned();
        // The dead count links to the dead set of its tier.
        match text.find('>') {
            Some(i) => text[i + 1..text.find("</a>").unwrap()].to_owned(),
            None => text,
        }
    };
    assert_eq!(cell("enterprise", "inflight"), "1", "{body}");
    assert_eq!(cell("trial", "inflight"), "0");
    assert_eq!(cell("trial", "dead"), "1");
    assert_eq!(cell("trial", "delayed"), "1");
    assert_eq!(cell("growth_team", "delayed"), "1");
    assert_eq!(cell("enterprise", "dead"), "0");
    assert!(!body.contains(r#"data-tier="unattributed""#), "{body}");
    for (reason, n) in [("budget", 1), ("scheduled", 1)] {
        assert!(
            body.contains(&format!(
                r#"<tr data-reason="{reason}"><td>{reason}</td><td class="n">{n}</td></tr>"#
            )),
            "{reason}: {body}"
        );
    }
    assert!(!body.contains(r#"data-reason="retry""#), "{body}");
    for (event, n) in [
        ("started", 3),
        ("dead", 1),
        ("deferred", 1),
        ("succeeded", 0),
    ] {
        assert!(
            body.contains(&format!(
                r#"<tr data-event="{event}"><td>{event}</td><td class="n">{n}</td>"#
            )),
            "{event}: {body}"
        );
    }
    assert!(body.contains(r#"<svg id="minutes-svg""#), "{body}");
    assert!(
        body.contains(r#"<tr data-provider="openai"><td>openai</td><td class="breaker">closed</td><td class="paused">no</td><td class="rpm">2 of 100</td><td class="tpm">500 of 5000</td></tr>"#),
        "{body}"
    );
    let anthropic = &body[body.find(r#"<tr data-provider="anthropic">"#).unwrap()..];
    let anthropic = &anthropic[..anthropic.find("</tr>").unwrap()];
    assert!(
        anthropic.contains(r#"<td class="paused">"#)
            && !anthropic.contains(r#"<td class="paused">no</td>"#)
            && anthropic.contains(r#"<td class="rpm">0 (no limit)</td>"#),
        "{anthropic}"
    );
}

/// An error row naming `provider` for a job's `attempt`, as the worker writes one.
async fn failed_call(ctx: &TestCtx, id: &str, attempt: u32, provider: &str) {
    let job = aiq::store::JobRef {
        job_id: id.to_owned(),
        kind: "llm.complete".into(),
        tier: Some("trial".into()),
        organization_id: Some(uuid::Uuid::parse_str(ORG_A).unwrap()),
        subject_id: None,
        subject_type: None,
        correlation_id: None,
        attempt,
        execution: attempt as i64,
        callback_url: None,
    };
    let err = aiq::store::ErrorRecord {
        error_type: aiq::store::ErrorType::Provider(aiq::providers::ErrorKind::Unavailable),
        message: format!("{provider} answered 503"),
        details: serde_json::json!({}),
        provider: Some(provider.into()),
        http_status: Some(503),
        call_seq: 0,
    };
    ctx.store.record_error(&job, &err).await.unwrap();
}

/// The value of the hidden `upto` field of the action by filter.
fn upto(page: &str) -> String {
    let at = page.find(r#"name="upto" value=""#).expect("an upto field") + 19;
    page[at..].split('"').next().unwrap().to_owned()
}

#[tokio::test]
async fn the_dead_set_filters_by_the_provider_of_each_jobs_last_failed_call_and_acts_only_on_what_the_page_showed()
 {
    let ctx = TestCtx::new().await;
    let ids = dead_jobs(
        &ctx,
        &[
            (Tier::Trial, ORG_A, "a"),
            (Tier::Trial, ORG_A, "b"),
            (Tier::Trial, ORG_A, "c"),
        ],
    )
    .await;
    // a failed at OpenAI, then at Anthropic; b at OpenAI; c never reached a provider.
    failed_call(&ctx, &ids[0], 1, "openai").await;
    failed_call(&ctx, &ids[0], 2, "anthropic").await;
    failed_call(&ctx, &ids[1], 1, "openai").await;
    let c = Console::start(&ctx).await;
    let op = c.sign_in(OPERATOR).await;
    let csrf = c.csrf(&op).await;
    let listed = |page: &str| -> Vec<String> {
        ids.iter()
            .filter(|id| page.contains(&format!(r#"<tr data-id="{id}">"#)))
            .cloned()
            .collect()
    };
    let (_, page) = c.get(&op, "/console/dead?provider=openai").await;
    assert_eq!(listed(&page), [ids[1].clone()], "{page}");
    assert!(
        page.contains(r#"<span id="matching-count">1</span>"#),
        "{page}"
    );
    let (_, page) = c.get(&op, "/console/dead?provider=anthropic").await;
    assert_eq!(listed(&page), [ids[0].clone()], "{page}");
    let (_, page) = c.get(&op, "/console/dead").await;
    assert_eq!(listed(&page).len(), 3, "{page}");
    assert_eq!(
        page.matches(r#"<td class="provider">-</td>"#).count(),
        1,
        "{page}"
    );
    assert_eq!(
        page.matches(r#"<td class="provider">anthropic</td>"#)
            .count(),
        1
    );
    let (_, shown) = c.get(&op, &format!("/console/dead/{}", ids[0])).await;
    assert!(
        shown.contains(r#"<dd id="provider">anthropic</dd>"#),
        "{shown}"
    );

    // The page of OpenAI's dead jobs is shown; then another job dies at OpenAI. Retrying every
    // match of the page retries what it counted, not the newcomer.
    let (_, page) = c.get(&op, "/console/dead?provider=openai").await;
    let shown_at = upto(&page);
    let t: i64 = shown_at.parse().unwrap();
    aiq_testkit::world::wait_until(
        Duration::from_secs(30),
        "Redis's clock to pass the page's time",
        || async { ctx.queue.now_ms().await.unwrap() > t },
    )
    .await;
    let late = dead_jobs(&ctx, &[(Tier::Trial, ORG_A, "d")])
        .await
        .remove(0);
    failed_call(&ctx, &late, 1, "openai").await;
    let form = [
        ("csrf", csrf.as_str()),
        ("provider", "openai"),
        ("upto", shown_at.as_str()),
        ("confirm", "1"),
    ];
    let (code, to) = c.post(&op, "/console/dead/retry", &form).await;
    assert_eq!(code, 303);
    assert!(to.contains("done=retried"), "{to}");
    assert!(!is_dead(&ctx, &ids[1]).await);
    for id in [&ids[0], &ids[2], &late] {
        assert!(is_dead(&ctx, id).await, "{id}");
    }
}

#[tokio::test]
async fn a_filtered_count_beyond_one_read_says_at_least_and_the_action_still_reaches_every_match() {
    let ctx = TestCtx::new().await;
    // More dead jobs than one page request reads (1,000).
    let n = 1_100;
    let mut jobs = Vec::with_capacity(n);
    for i in 0..n {
        let tier = if i % 2 == 0 {
            Tier::Trial
        } else {
            Tier::Enterprise
        };
        jobs.push(job_of(tier, Duration::ZERO));
    }
    for chunk in jobs.chunks(500) {
        for r in ctx.queue.enqueue_batch(chunk).await.unwrap() {
            r.unwrap();
        }
    }
    loop {
        let leased = ctx.queue.fetch(500).await.unwrap();
        if leased.is_empty() {
            break;
        }
        let kill: Vec<Settlement> = leased
            .into_iter()
            .map(|l| Settlement {
                id: l.id,
                token: l.token,
                outcome: Outcome::Failed {
                    reason: "bad input".into(),
                },
            })
            .collect();
        ctx.queue.settle(&kill).await.unwrap();
    }
    assert_eq!(ctx.queue.stats().await.unwrap().dead, n as u64);
    let c = Console::start(&ctx).await;
    let op = c.sign_in(OPERATOR).await;
    let csrf = c.csrf(&op).await;
    // Every job matches the kind: the 1,000 read match, the range holds 1,100.
    let (_, page) = c.get(&op, "/console/dead?kind=llm.complete").await;
    assert!(
        page.contains(r#"At least <span id="matching-count">1000</span> dead jobs match"#)
            && page.contains("the newest 1000 of the 1100 in its time range"),
        "{}",
        &page[page.find("dead-matching").unwrap_or(0)..]
    );
    assert_eq!(page.matches("<tr data-id=").count(), 50);
    // A time range alone is counted exactly by Redis.
    let (_, page) = c.get(&op, "/console/dead?since=2000-01-01").await;
    assert!(page.contains(r#"<span id="matching-count">1100</span> dead jobs match"#));
    // Half the jobs are trial's: the newest 1,000 hold some of them, not all 550.
    let (_, page) = c.get(&op, "/console/dead?tier=trial").await;
    let at = page
        .find(r#"At least <span id="matching-count">"#)
        .expect("an at-least count")
        + 35;
    let shown: u64 = page[at..].split('<').next().unwrap().parse().unwrap();
    assert!(shown > 0 && shown < 550, "{shown}");
    let shown = shown.to_string();
    let form = [
        ("csrf", csrf.as_str()),
        ("tier", "trial"),
        ("upto", &upto(&page)),
        ("confirm", shown.as_str()),
    ];
    let (code, to) = c.post(&op, "/console/dead/purge", &form).await;
    assert_eq!(code, 303);
    let (_, page) = c.get(&op, &to).await;
    assert!(
        page.contains(r#"<div id="flash">550 dead jobs purged</div>"#),
        "{}",
        &page[..page.len().min(3000)]
    );
    let s = ctx.queue.stats().await.unwrap();
    assert_eq!(s.dead, 550);
    assert_eq!(s.dead_by_tier.get("trial").copied().unwrap_or(0), 0);
    assert_eq!(s.dead_by_tier.get("enterprise").copied(), Some(550));
}

#[tokio::test]
async fn a_jobs_page_lists_its_provider_calls_with_their_cost_and_its_error_rows() {
    let ctx = TestCtx::new().await;
    let id = ctx
        .enqueue(
            aiq::domain::JobKind::LlmComplete,
            Tier::Trial,
            ORG_A,
            &llm_payload(Tier::Trial, ORG_A, "a call"),
            0,
        )
        .await;
    ctx.run_until_settled().await;
    let (cost,): (String,) = sqlx::query_as(
        "SELECT cost_usd::text FROM ai_cost_tracking WHERE job_id = $1 AND call_status = 'succeeded'",
    )
    .bind(&id)
    .fetch_one(ctx.store.pool())
    .await
    .unwrap();
    // An error row of an earlier attempt, as the worker writes one, with text to escape.
    failed_call(&ctx, &id, 1, "<b>openai</b>").await;
    let c = Console::start(&ctx).await;
    let op = c.sign_in(OPERATOR).await;
    let (code, page) = c.get(&op, &format!("/console/jobs/{id}")).await;
    assert_eq!(code, 200, "{page}");
    let calls = &page[page.find(r#"<table id="calls">"#).expect("the calls table")..];
    let calls = &calls[..calls.find("</table>").unwrap()];
    assert_eq!(
        calls
            .matches(r#"<td class="status">succeeded</td>"#)
            .count(),
        1,
        "{calls}"
    );
    assert!(calls.contains("<td>openai</td>"), "{calls}");
    // The total is the row's cost, as the money pages show amounts.
    let micros = (cost.parse::<f64>().unwrap() * 1e6).round() as i64;
    let shown = aiq::domain::MicroUsd::from_micros(micros).to_string();
    assert!(
        calls.contains(&format!(r#"<td class="n" id="calls-cost">{shown}</td>"#)),
        "{calls}"
    );
    let errors = &page[page
        .find(r#"<table id="errors">"#)
        .expect("the errors table")..];
    let errors = &errors[..errors.find("</table>").unwrap()];
    assert!(
        errors.contains("&lt;b&gt;openai&lt;/b&gt;") && !errors.contains("<b>openai"),
        "{errors}"
    );
    assert!(errors.contains("<td class=\"n\">503</td>"), "{errors}");
}

/// Whether a Set-Cookie value carries the Secure attribute.
fn secure(set_cookie: &str) -> bool {
    set_cookie.split(';').any(|a| a.trim() == "Secure")
}

#[tokio::test]
async fn with_cookie_secure_always_the_session_cookie_is_secure_without_a_proxy_header() {
    let ctx = TestCtx::new().await;
    let c = Console::start_with(&ctx, CookieSecure::Always).await;
    let set = c.sign_in_set_cookie(OPERATOR, None).await;
    assert!(secure(&set), "{set}");
    // The session works, and its clearing is Secure too.
    let cookie = set.split(';').next().unwrap().to_owned();
    assert_eq!(c.get(&cookie, "/console/").await.0, 200);
    let r = c
        .http
        .post(c.url("/console/logout"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    let cleared = r.headers()["set-cookie"].to_str().unwrap();
    assert!(
        cleared.contains("Max-Age=0") && secure(cleared),
        "{cleared}"
    );

    // auto follows the proxy's header; never ignores it.
    let auto = Console::start(&ctx).await;
    assert!(!secure(&auto.sign_in_set_cookie(OPERATOR, None).await));
    assert!(secure(
        &auto.sign_in_set_cookie(OPERATOR, Some("https")).await
    ));
    let never = Console::start_with(&ctx, CookieSecure::Never).await;
    assert!(!secure(
        &never.sign_in_set_cookie(OPERATOR, Some("https")).await
    ));
}

/// The event types a job's page lists, in order.
fn event_types(page: &str) -> Vec<String> {
    page.split(r#"<tr class="event" data-type=""#)
        .skip(1)
        .map(|rest| rest.split('"').next().unwrap().to_owned())
        .collect()
}

fn new_job(tier: Tier, org: &str, delay: Duration) -> NewJob {
    NewJob {
        kind: aiq::domain::JobKind::LlmComplete,
        tier,
        organization_id: OrganizationId::parse(org).unwrap(),
        payload: llm_payload(tier, org, "Caption the photo."),
        job_id: None,
        delay,
        idempotency_key: None,
        max_attempts: 0,
    }
}

/// Leases the one job that can run, which must be `id`.
async fn lease(ctx: &TestCtx, id: &str) -> aiq::queue::LeasedJob {
    let mut leased = ctx.queue.fetch(1).await.unwrap();
    assert_eq!(leased.len(), 1, "one job to lease");
    assert_eq!(leased[0].id, id);
    leased.remove(0)
}

/// Settles a leased job with `outcome`.
async fn settle(ctx: &TestCtx, job: &aiq::queue::LeasedJob, outcome: Outcome) {
    let applied = ctx
        .queue
        .settle(&[Settlement {
            id: job.id.clone(),
            token: job.token.clone(),
            outcome,
        }])
        .await
        .unwrap();
    assert_eq!(applied, [true]);
}

async fn lease_and_settle(ctx: &TestCtx, id: &str, outcome: Outcome) {
    let job = lease(ctx, id).await;
    settle(ctx, &job, outcome).await;
}

/// One job that can run now; its id.
async fn enqueue_one(ctx: &TestCtx) -> String {
    let job = new_job(Tier::GrowthTeam, ORG_A, Duration::ZERO);
    ctx.queue.enqueue(&job).await.unwrap().job_id
}

/// A job's page as an operator sees it (200).
async fn job_page(ctx: &TestCtx, id: &str) -> String {
    let c = Console::start(ctx).await;
    let op = c.sign_in(OPERATOR).await;
    let (code, page) = c.get(&op, &format!("/console/jobs/{id}")).await;
    assert_eq!(code, 200, "{page}");
    page
}

/// Other jobs' `created` events: delayed for an hour, so nothing leases them.
async fn other_events(ctx: &TestCtx, n: usize) {
    let jobs: Vec<_> = (0..n)
        .map(|_| new_job(Tier::Trial, ORG_B, Duration::from_secs(3600)))
        .collect();
    for r in ctx.queue.enqueue_batch(&jobs).await.unwrap() {
        r.unwrap();
    }
}

#[tokio::test]
async fn a_job_retried_then_succeeded_shows_its_five_events_from_the_stream_in_order() {
    let ctx = TestCtx::new().await;
    let id = enqueue_one(&ctx).await;
    other_events(&ctx, 20).await;
    let retry = Outcome::Retry {
        after: Duration::ZERO,
        error: "provider said <b>503</b>".into(),
    };
    lease_and_settle(&ctx, &id, retry).await;
    other_events(&ctx, 20).await;
    let done = Outcome::Done {
        result: Some(r#"{"provider":"openai"}"#.into()),
    };
    lease_and_settle(&ctx, &id, done).await;

    let page = job_page(&ctx, &id).await;
    assert!(page.contains(r#"<dd id="state">succeeded</dd>"#), "{page}");
    assert_eq!(
        event_types(&page),
        ["created", "started", "retried", "started", "succeeded"],
        "{page}"
    );
    assert!(
        page.contains("error: provider said &lt;b&gt;503&lt;/b&gt;"),
        "{page}"
    );
    assert!(!page.contains("<b>503"), "{page}");
    assert!(!page.contains(r#"id="events-incomplete""#), "{page}");
    assert!(!page.contains(r#"id="events-none""#), "{page}");
}

#[tokio::test]
async fn a_job_behind_more_than_a_window_of_events_shows_its_first_and_last_and_says_it_may_miss_some()
 {
    let ctx = TestCtx::new().await;
    let window = aiq::queue::events::JOB_EVENTS_WINDOW;
    let id = enqueue_one(&ctx).await;
    other_events(&ctx, window + 100).await;
    let job = lease(&ctx, &id).await;
    // Its start is behind a whole window from its enqueue, and a whole window before its end.
    other_events(&ctx, window + 100).await;
    let failed = Outcome::Failed {
        reason: "quota exhausted".into(),
    };
    settle(&ctx, &job, failed).await;

    let page = job_page(&ctx, &id).await;
    let types = event_types(&page);
    assert_eq!(types.first().map(String::as_str), Some("created"), "{page}");
    assert_eq!(types.last().map(String::as_str), Some("failed"), "{page}");
    assert!(page.contains("error: quota exhausted"), "{page}");
    assert!(page.contains(r#"<p id="events-incomplete">"#), "{page}");
}

#[tokio::test]
async fn malformed_and_hostile_entries_in_the_stream_do_not_break_a_jobs_page() {
    let ctx = TestCtx::new().await;
    let id = enqueue_one(&ctx).await;
    let mut conn = ctx.redis().await;
    let stream = ctx.key("events");
    let xadd = |fields: Vec<(&str, Vec<u8>)>| {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(&stream).arg("*");
        for (k, v) in fields {
            cmd.arg(k).arg(v);
        }
        cmd
    };
    let me = id.as_bytes().to_vec();
    for cmd in [
        // Not the contract's shape: n says 2, the fields hold 1 and 3 values.
        xadd(vec![("n", b"2".to_vec()), ("job_id", me.clone())]),
        xadd(vec![
            ("n", b"2".to_vec()),
            ("type", b"a\nb\nc".to_vec()),
            ("job_id", [&me[..], b"\n", &me[..]].concat()),
        ]),
        // The shape, with bytes that are not UTF-8 and markup.
        xadd(vec![
            ("type", b"\xff\xfe<script>alert(1)</script>".to_vec()),
            ("job_id", me.clone()),
            ("at", b"not a time".to_vec()),
            ("until", b"<img src=x>".to_vec()),
            ("note", b"\x00\x01\xc3".to_vec()),
        ]),
    ] {
        let _: String = cmd.query_async(&mut conn).await.unwrap();
    }
    lease_and_settle(&ctx, &id, Outcome::Done { result: None }).await;

    let page = job_page(&ctx, &id).await;
    let types = event_types(&page);
    assert_eq!(types.len(), 4, "{page}");
    assert_eq!(
        (types[0].as_str(), types[2].as_str(), types[3].as_str()),
        ("created", "started", "succeeded"),
        "{page}"
    );
    assert!(types[1].contains("&lt;script&gt;"), "{page}");
    assert!(
        !page.contains("<script>alert") && !page.contains("<img"),
        "{page}"
    );
    assert!(
        page.contains(
            r#"<p id="events-skipped">2 stream entries that name this job were not in the contract's shape and were skipped.</p>"#
        ),
        "{page}"
    );
}

#[tokio::test]
async fn with_events_off_a_jobs_page_shows_its_status_lines_and_says_why() {
    let ctx = TestCtx::new().await;
    let _: () = redis::cmd("HSET")
        .arg(ctx.key("config"))
        .arg("events")
        .arg("off")
        .query_async(&mut ctx.redis().await)
        .await
        .unwrap();
    let id = enqueue_one(&ctx).await;
    let dead = Outcome::Dead {
        reason: "attempts ran out".into(),
    };
    lease_and_settle(&ctx, &id, dead).await;
    let page = job_page(&ctx, &id).await;
    assert!(event_types(&page).is_empty(), "{page}");
    assert!(page.contains("last error: attempts ran out"), "{page}");
    assert!(
        page.contains(r#"<p id="events-none">No events of this job were found: events are off"#),
        "{page}"
    );
}

/// A cost row of `org` on `date` (SQL), as the worker writes one, for `micros`.
async fn cost_row(ctx: &TestCtx, org: &str, provider: &str, date: &str, micros: i64, job: &str) {
    let sql = format!(
        "INSERT INTO ai_cost_tracking (organization_id, service_name, operation_type, cost_usd,
             billing_date, job_id, attempt, tier)
         VALUES ($1::uuid, $2, 'test', $3::numeric / 1000000, {date}, $4, 1, 'growth_team')"
    );
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(org)
        .bind(provider)
        .bind(micros)
        .bind(job)
        .execute(ctx.store.pool())
        .await
        .unwrap();
}

/// The numbers of a table row: the text of each of its `<td class="n">` cells.
fn n_cells(row: &str) -> Vec<&str> {
    row.split(r#"<td class="n">"#)
        .skip(1)
        .map(|c| &c[..c.find("</td>").unwrap_or(c.len())])
        .collect()
}

/// The row of `org` in the table of `id` on `page`.
fn org_row<'a>(page: &'a str, table: &str, org: &str) -> Option<&'a str> {
    let t = &page[page.find(&format!(r#"<table id="{table}">"#))?..];
    let t = &t[..t.find("</table>")?];
    let r = &t[t.find(&format!(r#"<tr data-org="{org}">"#))?..];
    Some(&r[..r.find("</tr>")?])
}

#[tokio::test]
async fn the_money_and_organisation_pages_show_the_spend_sums_of_today_and_this_month_and_follow_deleted_rows()
 {
    use chrono::Datelike;
    let ctx = TestCtx::new().await;
    let today = chrono::Utc::now().date_naive();
    cost_row(&ctx, ORG_A, "openai", "CURRENT_DATE", 1_500_000, "a1").await;
    cost_row(&ctx, ORG_A, "anthropic", "CURRENT_DATE", 250_000, "a2").await;
    // Last month's: in the 30-day chart, not in this month's figures.
    cost_row(
        &ctx,
        ORG_A,
        "openai",
        "date_trunc('month', CURRENT_DATE)::date - 1",
        9_000_000,
        "a3",
    )
    .await;
    cost_row(&ctx, ORG_B, "openai", "CURRENT_DATE", 3_000_000, "b1").await;
    let c = Console::start(&ctx).await;
    let op = c.sign_in(OPERATOR).await;

    // The page folds the deltas itself: no daemon has run.
    let (code, page) = c.get(&op, "/console/money").await;
    assert_eq!(code, 200, "{page}");
    let (a, b) = (
        org_row(&page, "org-spend", ORG_A).expect("A's row"),
        org_row(&page, "org-spend", ORG_B).expect("B's row"),
    );
    assert!(
        page.find(b).unwrap() < page.find(a).unwrap(),
        "B spent more this month: first"
    );
    // today, this month, the month-end forecast
    assert_eq!(n_cells(a)[..2], ["$1.750000", "$1.750000"], "A: {a}");
    assert_eq!(n_cells(b)[..2], ["$3.000000", "$3.000000"], "B: {b}");
    assert!(
        page.contains(&format!("<title>{today} openai: $4.500000</title>"))
            && page.contains(&format!("<title>{today} anthropic: $0.250000</title>")),
        "today's bars are the platform's spend per provider: {page}"
    );
    let last_month = today.with_day(1).unwrap() - chrono::Days::new(1);
    if (today - last_month).num_days() < 30 {
        assert!(
            page.contains(&format!("<title>{last_month} openai: $9.000000</title>")),
            "last month's day is in the chart"
        );
    }

    // A's anthropic row deleted: the organisations' page shows the rest.
    sqlx::query("DELETE FROM ai_cost_tracking WHERE job_id = 'a2'")
        .execute(ctx.store.pool())
        .await
        .unwrap();
    let (code, page) = c.get(&op, "/console/orgs").await;
    assert_eq!(code, 200, "{page}");
    let a = org_row(&page, "orgs", ORG_A).expect("A's row");
    assert_eq!(
        n_cells(a),
        ["$1.500000", "$1.500000"],
        "A today and this month: {a}"
    );
    // Every row of B gone: B is no longer listed, and a negative cursor is the first page.
    sqlx::query("DELETE FROM ai_cost_tracking WHERE organization_id = $1::uuid")
        .bind(ORG_B)
        .execute(ctx.store.pool())
        .await
        .unwrap();
    let (code, page) = c.get(&op, "/console/orgs?cursor=-50").await;
    assert_eq!(code, 200, "{page}");
    assert!(org_row(&page, "orgs", ORG_B).is_none(), "{page}");
    assert!(org_row(&page, "orgs", ORG_A).is_some(), "{page}");
    // A cursor at the end of i64 is the first page too, not an overflow of its next link.
    for path in [
        "/console/orgs?cursor=9223372036854775807",
        "/console/money?cursor=9223372036854775807",
    ] {
        let (code, page) = c.get(&op, path).await;
        assert_eq!(code, 200, "{path}: {page}");
        assert!(
            org_row(
                &page,
                if path.contains("money") {
                    "org-spend"
                } else {
                    "orgs"
                },
                ORG_A
            )
            .is_some(),
            "{path}: {page}"
        );
    }
}
