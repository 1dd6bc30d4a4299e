//! What leaves the process: no secret in a log line, a row, an error or `aiq config`; no
//! megabyte log line from one megabyte field; no raw control character from what apps stored.

use std::process::Output;
use std::time::Duration;

use aiq::domain::{JobKind, MicroUsd, Tier};
use aiq::store::NewAlert;

use crate::harness::{ORG_A, TestCtx, aiq_command, llm_payload, signal_and_wait, wait_until};

/// Runs `aiq` with `vars` and `args` off the test's runtime.
async fn aiq(vars: &std::collections::HashMap<String, String>, args: &[&str]) -> Output {
    let vars = vars.clone();
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || aiq_command().envs(&vars).args(&args).output().unwrap())
        .await
        .unwrap()
}

/// stdout and stderr together, as an operator's terminal shows them.
fn printed(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A port on which nothing listens: bound once, then let go.
fn dead_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_webhook_leaves_its_token_in_no_row_no_log_line_and_no_config_output() {
    const TOKEN: &str = "SECRETTOKEN";
    let url = format!(
        "http://127.0.0.1:{}/services/T000/B000/{TOKEN}",
        dead_port()
    );
    let ctx = TestCtx::with(&[("AIQ_ALERT_WEBHOOK_URL", &url)]).await;
    let created = ctx
        .store
        .insert_alert(&NewAlert {
            scope: format!("org:{ORG_A}"),
            organization_id: Some(ORG_A.parse().unwrap()),
            window_kind: "day".into(),
            window_start: "2026-12-01".into(),
            threshold: "80".into(),
            spent: MicroUsd::from_micros(8),
            limit: Some(MicroUsd::from_micros(10)),
            message: "aiq budget: 80% reached".into(),
        })
        .await
        .unwrap();
    assert!(created);
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("daemon.log");
    let daemon = ctx.spawn_daemon_logging_to(&[("AIQ_LOG_FORMAT", "json")], &log);
    wait_until(
        Duration::from_secs(30),
        "two failed deliveries of the alert",
        || async {
            ctx.scalar_i64(
                "SELECT coalesce(max(delivery_attempts), 0)::bigint FROM ai_cost_alerts \
                 WHERE last_delivery_error IS NOT NULL",
            )
            .await
                >= 2
        },
    )
    .await;
    assert!(signal_and_wait(daemon, libc::SIGTERM).await.success());

    let row: String =
        sqlx::query_scalar("SELECT string_agg(a::text, E'\\n') FROM ai_cost_alerts a")
            .fetch_one(ctx.store.pool())
            .await
            .unwrap();
    assert!(
        !row.contains(TOKEN),
        "the row holds the webhook's token: {row}"
    );
    assert!(
        row.contains("webhook unreachable") && row.to_lowercase().contains("refused"),
        "the error still says what went wrong: {row}"
    );
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains("alert webhook failed"),
        "the failure is logged: {logged}"
    );
    assert!(
        !logged.contains(TOKEN),
        "a log line holds the webhook's token: {logged}"
    );
    for args in [&["config"][..], &["config", "--json"]] {
        let out = aiq(&ctx.vars, args).await;
        assert!(out.status.success(), "{}", printed(&out));
        let text = printed(&out);
        assert!(!text.contains(TOKEN), "aiq {args:?}: {text}");
        assert!(text.contains("AIQ_ALERT_WEBHOOK_URL"), "{text}");
    }
}

#[tokio::test]
async fn no_url_password_is_printed_by_aiq_config_or_by_a_connection_that_fails() {
    let port = dead_port();
    let vars: std::collections::HashMap<String, String> = [
        (
            "AIQ_REDIS_URL",
            format!("redis://:redis-pw-1@127.0.0.1:{port}/"),
        ),
        (
            "AIQ_DATABASE_URL",
            format!("postgres://aiq:pg-pw-2@127.0.0.1:{port}/aiq?password=pg-pw-3"),
        ),
        // `aiq run` waits for an unreachable Redis at start-up, saying so in its log: briefly.
        ("AIQ_STARTUP_WAIT_S", "2".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let secrets = ["redis-pw-1", "pg-pw-2", "pg-pw-3"];
    let text = printed(&aiq(&vars, &["config"]).await);
    assert!(
        text.contains(&format!("AIQ_REDIS_URL=redis://:***@127.0.0.1:{port}/")),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "AIQ_DATABASE_URL=postgres://aiq:***@127.0.0.1:{port}/aiq?password=***"
        )),
        "{text}"
    );
    let json = aiq(&vars, &["config", "--json"]).await;
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert!(v["AIQ_REDIS_URL"].as_str().unwrap().contains(":***@"));
    for (args, must_fail) in [
        (&["config"][..], false),
        (&["config", "--json"], false),
        (&["stats"], true),
        (&["dlq", "list"], true),
        (&["run"], true),
    ] {
        let out = aiq(&vars, args).await;
        assert_eq!(!out.status.success(), must_fail, "aiq {args:?}: {out:?}");
        let text = printed(&out);
        for pw in secrets {
            assert!(!text.contains(pw), "aiq {args:?} printed {pw}: {text}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_megabyte_correlation_id_or_provider_error_writes_kilobytes_of_log_not_megabytes() {
    let ctx = TestCtx::new().await;
    // Enqueue takes any payload up to 10 MiB; the handler refuses the correlation id later.
    let mut long_id: serde_json::Value =
        serde_json::from_str(&llm_payload(Tier::Trial, ORG_A, "hello")).unwrap();
    long_id["correlation_id"] = "c".repeat(1 << 20).into();
    let c = &ctx;
    let trial = |payload: String| async move {
        c.enqueue(JobKind::LlmComplete, Tier::Trial, ORG_A, &payload, 1)
            .await
    };
    let a = trial(long_id.to_string()).await;
    // The provider answers 400 with a one megabyte error message.
    let text = "[fake:status=400][fake:error-bytes=1048576]";
    let b = trial(llm_payload(Tier::Trial, ORG_A, text)).await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("daemon.log");
    let daemon = ctx.spawn_daemon_logging_to(&[], &log);
    ctx.wait_settled(Duration::from_secs(30)).await;
    assert!(signal_and_wait(daemon, libc::SIGTERM).await.success());
    assert_eq!(ctx.queue.stats().await.unwrap().dead, 2);

    let logged = std::fs::read_to_string(&log).unwrap();
    let about = |id: &str| -> (usize, usize) {
        let lines: Vec<&str> = logged.lines().filter(|l| l.contains(id)).collect();
        (lines.len(), lines.iter().map(|l| l.len() + 1).sum())
    };
    for (id, what) in [(&a, "correlation id"), (&b, "provider error")] {
        let (lines, bytes) = about(id);
        assert!(lines > 0, "no log line about job {id}: {logged}");
        assert!(
            bytes < 16 * 1024,
            "the job with a 1 MB {what} wrote {bytes} bytes in {lines} log lines"
        );
    }
    assert!(
        logged.contains("bytes in all)"),
        "a cut value says how long it was: {logged}"
    );
    assert!(logged.len() < 128 * 1024, "{} bytes of log", logged.len());
    // The error row of the provider's failure holds the message cut too.
    let longest = ctx
        .scalar_i64(&format!(
            "SELECT coalesce(max(length(error_message)), 0)::bigint FROM ai_processing_errors WHERE job_id = '{b}'"
        ))
        .await;
    assert!((1..4096).contains(&longest), "{longest}");
}

/// A control character anywhere but the line breaks (and tabs) of the output itself.
fn raw_control(text: &str) -> Option<char> {
    text.chars().find(|c| {
        (c.is_control() && *c != '\n' && *c != '\t') || ('\u{202a}'..='\u{202e}').contains(c)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_characters_stored_in_redis_and_postgres_reach_the_terminal_escaped() {
    use redis::AsyncCommands;
    let ctx = TestCtx::new().await;
    let hostile = "\x1b[31mred\r\x07\x7f\u{9b}2J\u{202e}";
    // What an app (or anyone) with a Redis client can write: a dead job by hand.
    let id = format!("evil{hostile}id");
    let reason = format!("reason {hostile}\nforged line");
    let mut conn = ctx.redis().await;
    let now = chrono::Utc::now().timestamp_millis();
    let _: () = conn
        .hset_multiple(
            ctx.key(&format!("job:{id}")),
            &[
                ("kind", format!("llm.complete{hostile}")),
                ("tier", "trial".to_owned()),
                ("org", ORG_A.to_owned()),
                ("dead_reason", reason.clone()),
                ("attempts", "1".to_owned()),
                ("dead_at", now.to_string()),
                ("payload", format!("{{\"x\":\"{hostile}\"}}")),
            ],
        )
        .await
        .unwrap();
    let _: () = conn.zadd(ctx.key("dead"), &id, now).await.unwrap();
    // And with a PostgreSQL client: a cost row of the product's own.
    sqlx::query(
        "INSERT INTO ai_cost_tracking (organization_id, service_name, operation_type, cost_usd, job_id, attempt)
         VALUES ($1, $2, 'chat', 0.5, 'j-hostile', 1)",
    )
    .bind(uuid::Uuid::parse_str(ORG_A).unwrap())
    .bind(format!("open{hostile}ai"))
    .execute(ctx.store.pool())
    .await
    .unwrap();

    let missing = format!("{id}-missing");
    for args in [
        &["dlq", "list"][..],
        &["dlq", "list", "--json"],
        &["dlq", "show", id.as_str()],
        &["dlq", "show", missing.as_str()],
        &["costs"],
        &["costs", "--json"],
        &["stats"],
    ] {
        let out = aiq(&ctx.vars, args).await;
        let text = printed(&out);
        assert_eq!(
            raw_control(&text),
            None,
            "aiq {args:?} printed a raw control character: {text:?}"
        );
        assert!(
            !text.lines().any(|l| l.starts_with("forged")),
            "aiq {args:?} let a value start a line: {text}"
        );
        if args == ["dlq", "list"] {
            assert!(
                text.contains("evil\\x1b[31mred\\r\\x07\\x7f\\u{9b}2J\\u{202e}id"),
                "{text}"
            );
        }
        if args == ["costs"] {
            assert!(text.contains("open\\x1b[31m"), "{text}");
        }
        if args == ["dlq", "show", missing.as_str()] {
            assert!(
                !out.status.success() && text.contains("no job evil\\x1b"),
                "{text}"
            );
        }
    }
    // JSON output keeps the values' meaning: a JSON reader gets back exactly what was stored.
    let listed = aiq(&ctx.vars, &["dlq", "list", "--json"]).await;
    let row: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(row["id"], id.as_str());
    assert_eq!(row["reason"], reason.as_str());
    let shown = aiq(&ctx.vars, &["dlq", "show", &id]).await;
    let fields: serde_json::Value = serde_json::from_slice(&shown.stdout).unwrap();
    assert_eq!(fields["dead_reason"], reason.as_str());
}
