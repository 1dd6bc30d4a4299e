//! Operating aiq: /metrics (checked by promtool), /readyz, Sentry events without secrets.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use aiq::domain::{JobKind, Tier};
use tokio_util::sync::CancellationToken;

use crate::harness::{ORG_A, TestCtx, llm_payload, signal_and_wait, wait_until};

/// One sample's value from the Prometheus text, e.g. `aiq_queue_waiting_jobs{tier="trial"}`.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn promtool_check_metrics(text: &str) {
    use std::io::Write;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool is missing: scripts/test installs it (Debian package prometheus)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_queue_depth_per_tier_pass_promtool_and_readyz_reports_each_part() {
    let ctx = TestCtx::new().await;
    for _ in 0..3 {
        ctx.enqueue(
            JobKind::LlmComplete,
            Tier::GrowthTeam,
            ORG_A,
            &llm_payload(Tier::GrowthTeam, ORG_A, "x"),
            0,
        )
        .await;
    }
    ctx.enqueue(
        JobKind::LlmComplete,
        Tier::Trial,
        ORG_A,
        &llm_payload(Tier::Trial, ORG_A, "y"),
        0,
    )
    .await;
    let app = aiq::worker::app(&ctx.settings, ctx.store.clone())
        .await
        .unwrap();
    let stop = CancellationToken::new();
    let addr = aiq::http::serve(
        "127.0.0.1:0".parse().unwrap(),
        aiq::worker::admin_sources(&ctx.queue, &app),
        stop.clone(),
    )
    .await
    .unwrap();
    let get = |path: &str| reqwest::get(format!("http://{addr}{path}"));

    let text = get("/metrics").await.unwrap().text().await.unwrap();
    assert_eq!(
        sample(&text, "aiq_queue_waiting_jobs{tier=\"growth_team\"}"),
        Some(3.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "aiq_queue_waiting_jobs{tier=\"trial\"}"),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "aiq_queue_waiting_jobs{tier=\"enterprise\"}"),
        Some(0.0)
    );
    assert!(
        sample(
            &text,
            "aiq_queue_oldest_job_age_seconds{tier=\"growth_team\"}"
        )
        .is_some()
    );
    assert_eq!(
        sample(&text, "aiq_queue_events_total{event=\"enqueued\"}"),
        Some(4.0)
    );
    assert_eq!(
        sample(&text, "aiq_budget_limit_usd{window=\"day\"}"),
        Some(1000.0)
    );

    // Run the jobs; the job, provider and cost series appear.
    let worker = {
        let (settings, queue, app, stop) = (
            ctx.settings.clone(),
            ctx.queue.clone(),
            app.clone(),
            stop.clone(),
        );
        tokio::spawn(async move { aiq::worker::run(&settings, queue, app, stop).await })
    };
    ctx.wait_settled(Duration::from_secs(30)).await;
    let text = get("/metrics").await.unwrap().text().await.unwrap();
    assert_eq!(
        sample(&text, "aiq_queue_waiting_jobs{tier=\"growth_team\"}"),
        Some(0.0)
    );
    assert!(text.contains("aiq_jobs_finished_total{outcome=\"succeeded\",kind=\"llm.complete\",tier=\"growth_team\",provider=\"openai\"}"), "{text}");
    assert!(
        text.contains("aiq_provider_call_seconds_bucket{provider=\"openai\",status=\"ok\""),
        "{text}"
    );
    assert!(
        text.contains("aiq_cost_usd_total{provider=\"openai\",tier=\"trial\"}"),
        "{text}"
    );
    assert!(
        text.contains("aiq_job_wait_seconds_bucket{tier=\"trial\""),
        "{text}"
    );
    promtool_check_metrics(&text);

    let resp = get("/readyz").await.unwrap();
    assert_eq!(resp.status(), 200);
    let ready: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(ready["status"], "healthy", "{ready}");
    for part in ["redis", "postgres", "budget"] {
        assert_eq!(ready["parts"][part]["status"], "healthy", "{ready}");
    }
    assert_eq!(get("/healthz").await.unwrap().text().await.unwrap(), "ok\n");
    stop.cancel();
    worker.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_leave_out_and_count_what_a_corrupted_redis_holds_and_still_pass_promtool() {
    use aiq::queue::{Outcome, Settlement, SkippedValues};
    let ctx = TestCtx::new().await;
    for (tier, n) in [(Tier::GrowthTeam, 3), (Tier::EnterprisePlus, 2)] {
        for i in 0..n {
            let text = format!("{i}");
            ctx.enqueue(
                JobKind::LlmComplete,
                tier,
                ORG_A,
                &llm_payload(tier, ORG_A, &text),
                0,
            )
            .await;
        }
    }
    // One job dead, one leased: real values for every gauge, written by the scripts.
    let mut left =
        std::collections::HashMap::from([("growth_team", 3.0), ("enterprise_plus", 2.0)]);
    let first = ctx.queue.fetch(1).await.unwrap().remove(0);
    let applied = ctx
        .queue
        .settle(&[Settlement {
            id: first.id.clone(),
            token: first.token.clone(),
            outcome: Outcome::Dead {
                reason: "for the test".into(),
            },
        }])
        .await
        .unwrap();
    assert_eq!(applied, [true]);
    let second = ctx.queue.fetch(1).await.unwrap().remove(0);
    for job in [&first, &second] {
        *left.get_mut(job.tier.as_str()).unwrap() -= 1.0;
    }

    // What a buggy app or anyone with a Redis client could write.
    let mut r = ctx.redis().await;
    let injected = "x\"} 1\nevil{a=\"";
    let mut corrupt = redis::pipe();
    corrupt
        .hset(ctx.key("counters"), "done", "abc")
        .hset(ctx.key("counters"), injected, 5)
        .hset(ctx.key("counters"), "released", &b"\xff\xfe"[..])
        .hset(ctx.key("counters"), "revived", "99999999999999999999999")
        .hset(ctx.key("depth"), "trial", "1.5e999")
        .hset(ctx.key("depth"), "enterprise", "-3")
        .hset(ctx.key("depth"), "platinum", 7)
        .zadd(ctx.key("heads:growth_team"), "mallory", f64::NEG_INFINITY)
        .set(ctx.key("heads:solo_professional"), "not a sorted set")
        .hset(ctx.key("held"), "dead:trial", "-4")
        .hset(ctx.key("held"), "inflight:nobody", 9);
    // Random field names must not multiply series.
    for i in 0..200 {
        corrupt.hset(ctx.key("counters"), format!("junk{i}"), i);
    }
    let () = corrupt.query_async(&mut r).await.unwrap();

    let stats = ctx.queue.stats().await.unwrap();
    assert_eq!(
        stats.skipped,
        SkippedValues {
            depth: 3,
            counters: 4 + 200,
            heads: 2,
            held: 2,
        },
        "{stats:?}"
    );

    let app = aiq::worker::app(&ctx.settings, ctx.store.clone())
        .await
        .unwrap();
    let stop = CancellationToken::new();
    let addr = aiq::http::serve(
        "127.0.0.1:0".parse().unwrap(),
        aiq::worker::admin_sources(&ctx.queue, &app),
        stop.clone(),
    )
    .await
    .unwrap();
    let scrape = || async {
        reqwest::get(format!("http://{addr}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let bad = |text: &str, key: &str| {
        sample(
            text,
            &format!("aiq_metrics_bad_redis_values_total{{key=\"{key}\"}}"),
        )
        .unwrap_or_else(|| panic!("no bad-value counter for {key}:\n{text}"))
    };
    let before = scrape().await;
    let text = scrape().await;
    promtool_check_metrics(&text);

    // The good values are all there, right.
    let waiting = |tier: &str| sample(&text, &format!("aiq_queue_waiting_jobs{{tier=\"{tier}\"}}"));
    for tier in ["growth_team", "enterprise_plus"] {
        assert_eq!(waiting(tier), Some(left[tier]), "{tier}\n{text}");
    }
    assert_eq!(waiting("professional_agency"), Some(0.0), "{text}");
    assert_eq!(waiting("solo_professional"), Some(0.0), "{text}");
    assert_eq!(
        sample(&text, "aiq_queue_inflight_jobs"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(sample(&text, "aiq_queue_dead_jobs"), Some(1.0), "{text}");
    assert_eq!(sample(&text, "aiq_queue_delayed_jobs"), Some(0.0), "{text}");
    let event = |e: &str| sample(&text, &format!("aiq_queue_events_total{{event=\"{e}\"}}"));
    assert_eq!(event("enqueued"), Some(5.0), "{text}");
    assert_eq!(event("leased"), Some(2.0), "{text}");
    assert_eq!(event("dead"), Some(1.0), "{text}");
    // Job events appended: five created, two started, one dead.
    assert_eq!(event("events"), Some(8.0), "{text}");
    // The -inf head is not the oldest job: its age would be 56 years.
    let age = sample(
        &text,
        "aiq_queue_oldest_job_age_seconds{tier=\"growth_team\"}",
    )
    .expect("growth_team's age");
    assert!((0.0..3600.0).contains(&age), "{age}\n{text}");

    // The bad ones are not: no made-up count, no injected text, no extra series.
    for gone in [
        "aiq_queue_waiting_jobs{tier=\"trial\"}",
        "aiq_queue_waiting_jobs{tier=\"enterprise\"}",
        "aiq_queue_events_total{event=\"done\"}",
        "aiq_queue_events_total{event=\"released\"}",
        "aiq_queue_events_total{event=\"revived\"}",
    ] {
        assert_eq!(sample(&text, gone), None, "{gone}\n{text}");
    }
    for injected in ["evil", "platinum", "junk", "mallory", "1.5e999"] {
        assert!(!text.contains(injected), "{injected}\n{text}");
    }
    let events = text
        .lines()
        .filter(|l| l.starts_with("aiq_queue_events_total{"))
        .count();
    assert_eq!(events, 4, "{text}");

    // Every scrape counts what it left out.
    for (key, n) in [("depth", 3.0), ("counters", 204.0), ("heads", 2.0)] {
        assert_eq!(bad(&text, key) - bad(&before, key), n, "{key}\n{text}");
    }
    stop.cancel();
}

/// A stand-in for Sentry's ingest endpoint that keeps every envelope.
pub async fn fake_sentry() -> (u16, Arc<Mutex<Vec<String>>>) {
    let got: Arc<Mutex<Vec<String>>> = Arc::default();
    let app = {
        let got = got.clone();
        axum::Router::new().route(
            "/api/{project}/envelope/",
            axum::routing::post(move |body: String| {
                let got = got.clone();
                async move {
                    got.lock().unwrap().push(body);
                    "{}"
                }
            }),
        )
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (port, got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_job_reaches_sentry_with_its_tags_and_without_the_key_the_email_or_the_image() {
    let (port, envelopes) = fake_sentry().await;
    let ctx = TestCtx::new().await;
    let key = ctx.vars["AIQ_OPENAI_API_KEY"].clone();
    let image = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==";
    let text = format!(
        "[fake:status=400] write to jane.doe@example.com, key {key}, image data:image/png;base64,{image}"
    );
    let id = ctx
        .enqueue(
            JobKind::LlmComplete,
            Tier::Enterprise,
            ORG_A,
            &llm_payload(Tier::Enterprise, ORG_A, &text),
            0,
        )
        .await;
    let dsn = format!("http://publickey@127.0.0.1:{port}/42");
    // With the payload sent (off by default), so the scrubber has the prompt to work on.
    let daemon = ctx.spawn_daemon(&[
        ("AIQ_SENTRY_DSN", &dsn),
        ("AIQ_SENTRY_SEND_PAYLOADS", "true"),
    ]);
    ctx.wait_settled(Duration::from_secs(30)).await;
    wait_until(
        Duration::from_secs(10),
        "an event at the fake Sentry",
        || async { envelopes.lock().unwrap().iter().any(|e| e.contains(&id)) },
    )
    .await;
    assert!(signal_and_wait(daemon, libc::SIGTERM).await.success());

    let all = envelopes.lock().unwrap().join("\n");
    let event = envelopes
        .lock()
        .unwrap()
        .iter()
        .find(|e| e.contains(&id))
        .cloned()
        .unwrap();
    for tag in [
        "\"job.kind\":\"llm.complete\"",
        "\"tier\":\"enterprise\"",
        "\"provider\":\"openai\"",
        &format!("\"organization_id\":\"{ORG_A}\""),
        "\"attempt\":\"1\"",
    ] {
        assert!(event.contains(tag), "tag {tag} missing from {event}");
    }
    assert!(event.contains("failed for good"), "{event}");
    assert!(!all.contains(&key), "the API key leaked: {all}");
    assert!(
        !all.contains("jane.doe"),
        "the e-mail address leaked: {all}"
    );
    assert!(
        !all.contains("iVBORw0KGgo"),
        "the image bytes leaked: {all}"
    );
    assert!(
        event.contains("[email]") && event.contains("[bytes]"),
        "the scrubber marks what it removed: {event}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_outage_opens_its_breaker_jobs_wait_without_spending_attempts_then_succeed() {
    let ctx = TestCtx::with(&[
        ("AIQ_BREAKER_FAILURES", "3"),
        ("AIQ_BREAKER_COOLDOWN_MS", "1000"),
        ("AIQ_CONCURRENCY", "2"),
        ("AIQ_MAX_ATTEMPTS", "5"),
        ("AIQ_RETRY_BASE_MS", "200"),
        ("AIQ_RETRY_CAP_MS", "400"),
    ])
    .await;
    let fake = ctx.vars["AIQ_OPENAI_BASE_URL"].clone();
    let http = reqwest::Client::new();
    http.post(format!("{fake}/_fake/outage?status=503&ms=3000"))
        .send()
        .await
        .unwrap();
    for i in 0..20 {
        // A provider outage fails every organisation: two here, so the provider\'s breaker
        // opens (one organisation\'s failures open only its own).
        let org = if i % 2 == 0 {
            ORG_A
        } else {
            crate::harness::ORG_B
        };
        ctx.enqueue(
            JobKind::LlmComplete,
            Tier::Enterprise,
            org,
            &llm_payload(Tier::Enterprise, org, &format!("o{i}")),
            0,
        )
        .await;
    }
    let app = aiq::worker::app(&ctx.settings, ctx.store.clone())
        .await
        .unwrap();
    let stop = CancellationToken::new();
    let addr = aiq::http::serve(
        "127.0.0.1:0".parse().unwrap(),
        aiq::worker::admin_sources(&ctx.queue, &app),
        stop.clone(),
    )
    .await
    .unwrap();
    let worker = {
        let (settings, queue, app, stop) = (
            ctx.settings.clone(),
            ctx.queue.clone(),
            app.clone(),
            stop.clone(),
        );
        tokio::spawn(async move { aiq::worker::run(&settings, queue, app, stop).await })
    };
    // During the outage the breaker opens and /readyz says so.
    wait_until(
        Duration::from_secs(5),
        "the openai breaker to open",
        || async {
            let r: serde_json::Value = http
                .get(format!("http://{addr}/readyz"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            r["parts"]["providers"]["breakers"]["openai"]["breaker"] == "open"
                && r["status"] == "degraded"
        },
    )
    .await;
    let metrics = http
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        sample(&metrics, "aiq_provider_breaker_open{provider=\"openai\"}"),
        Some(1.0),
        "{metrics}"
    );

    ctx.wait_settled(Duration::from_secs(30)).await;
    stop.cancel();
    worker.await.unwrap().unwrap();
    let done = ctx
        .scalar_i64("SELECT count(*) FROM ai_processing_results WHERE status = 'completed'")
        .await;
    assert_eq!(done, 20, "every job succeeded after the outage");
    let stats = ctx.queue.stats().await.unwrap();
    assert_eq!(stats.dead, 0);
    let failed_calls = ctx
        .scalar_i64(
            "SELECT count(*) FROM ai_processing_errors WHERE error_type = 'provider_unavailable'",
        )
        .await;
    let deferred = stats.counters.get("deferred").copied().unwrap_or(0);
    println!(
        "outage: {failed_calls} failed calls (attempts spent), {deferred} deferrals while the breaker was open"
    );
    // Only the calls that opened the breaker and the failed probes spent attempts; the other
    // jobs waited without calling.
    assert!(
        failed_calls <= 9,
        "{failed_calls} calls failed during the outage"
    );
    assert!(
        deferred >= 10,
        "jobs waited for the breaker ({deferred} deferrals)"
    );
    assert_eq!(
        stats.counters.get("retried").copied().unwrap_or(0) as i64,
        failed_calls
    );
    // The jobs held back by the open breaker say so in their `deferred` events: `breaker`,
    // not `provider_paused` (no 429 paused anything here).
    let mut reasons: std::collections::BTreeMap<String, usize> = Default::default();
    for (_, f) in crate::outcomes::events(&ctx).await {
        if f["type"] == "deferred" {
            *reasons.entry(f["reason"].clone()).or_default() += 1;
        }
    }
    assert!(
        reasons.get("breaker").copied().unwrap_or(0) >= 1,
        "{reasons:?}"
    );
    assert_eq!(reasons.get("provider_paused"), None, "{reasons:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_systemd_the_daemon_says_ready_pings_the_watchdog_and_says_stopping() {
    let ctx = TestCtx::new().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let daemon = ctx.spawn_daemon(&[
        ("NOTIFY_SOCKET", path.to_str().unwrap()),
        ("WATCHDOG_USEC", "1000000"),
        ("AIQ_LEASE_MS", "1500"),
    ]);
    let recv = move |sock: std::os::unix::net::UnixDatagram, want: &'static str| {
        tokio::task::spawn_blocking(move || {
            let mut buf = [0u8; 256];
            let mut seen = Vec::new();
            loop {
                let n = sock
                    .recv(&mut buf)
                    .unwrap_or_else(|e| panic!("no {want} (got {seen:?}): {e}"));
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                if msg == want {
                    return (sock, seen);
                }
                seen.push(msg);
            }
        })
    };
    let (sock, before) = recv(sock, "READY=1").await.unwrap();
    assert!(before.is_empty(), "READY=1 comes first: {before:?}");
    let (sock, _) = recv(sock, "WATCHDOG=1").await.unwrap();
    let (sock, _) = recv(sock, "WATCHDOG=1").await.unwrap();
    // SAFETY: kill(2) on our own child.
    unsafe {
        libc::kill(daemon.id() as libc::pid_t, libc::SIGTERM);
    }
    let (_, _) = recv(sock, "STOPPING=1").await.unwrap();
    assert!(signal_and_wait(daemon, 0).await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_boot_aiq_migrate_waits_for_postgres_keeping_systemd_waiting_and_then_migrates() {
    let mut pg = aiq_testkit::localsvc::LocalPostgres::start("boot-wait")
        .expect("a PostgreSQL of this test's own");
    let url = pg.url("postgres");
    pg.stop().expect("stopping PostgreSQL: the outage at boot");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_aiq"));
    cmd.arg("migrate")
        .env_clear()
        .env("AIQ_DATABASE_URL", &url)
        .env("NOTIFY_SOCKET", &path)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let child = cmd.spawn().unwrap();
    // While PostgreSQL is away, migrate keeps asking systemd for more time instead of failing.
    let sock = tokio::task::spawn_blocking(move || {
        let mut buf = [0u8; 128];
        for _ in 0..2 {
            let n = sock
                .recv(&mut buf)
                .expect("an EXTEND_TIMEOUT_USEC while waiting");
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            assert!(msg.starts_with("EXTEND_TIMEOUT_USEC="), "{msg}");
        }
        sock
    })
    .await
    .unwrap();
    drop(sock);
    pg.start_again().expect("PostgreSQL comes up");
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("migrate to finish once PostgreSQL answers")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout} {stderr}");
    assert!(stdout.contains("migrations applied"), "{stdout}");
    assert!(
        stderr.contains("waiting for PostgreSQL at start-up"),
        "{stderr}"
    );
}

#[test]
fn a_database_that_does_not_exist_ends_the_start_at_once_instead_of_waiting() {
    // A refusal no wait can fix (like a wrong password, which the shared PostgreSQL, trusting
    // local connections, cannot give).
    let db = format!("{}_missing", (crate::harness::servers().pg_url)("nosuchdb"));
    let out = crate::harness::aiq_command()
        .arg("migrate")
        .env("AIQ_DATABASE_URL", &db)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does not exist"), "{err}");
    assert!(!err.contains("waiting for PostgreSQL"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigterm_while_start_up_waits_for_redis_stops_the_daemon_cleanly() {
    let ctx = TestCtx::new().await;
    // A port nothing listens on: start-up waits for Redis (up to an hour here).
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("aiq.log");
    let redis_url = format!("redis://127.0.0.1:{port}/");
    let daemon = ctx.spawn_daemon_logging_to(
        &[
            ("AIQ_REDIS_URL", redis_url.as_str()),
            ("AIQ_STARTUP_WAIT_S", "3600"),
        ],
        &log,
    );
    crate::harness::wait_until(
        Duration::from_secs(60),
        "the daemon to say it waits for Redis",
        || async {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("waiting for")
        },
    )
    .await;
    let status = crate::harness::signal_and_wait(daemon, libc::SIGTERM).await;
    assert!(
        status.success(),
        "a stop during start-up is a clean exit: {status}; log: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
}
