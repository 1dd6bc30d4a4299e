//! Retention (`AIQ_RETAIN_*`): `aiq prune` and the pruner in `aiq run` remove what the settings
//! say and nothing more, on rows of every table aged with an explicit created_at; one pruner at
//! a time.

use std::time::Duration;

use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::harness::{ORG_A, TestCtx, wait_until};

/// Rows of each age (in days) the tests add to every table: young, past the raw answers'
/// default 30 days, past the rows' default 400, and far past everything.
const AGES: [(i32, i64); 4] = [(10, 3), (40, 4), (500, 5), (1000, 2)];

/// Adds `n` rows aged `days` to every table the pruner looks at, plus undelivered alerts.
async fn age_rows(ctx: &TestCtx, days: i32, n: i64) {
    let pool = ctx.store.pool();
    let statements = [
        "INSERT INTO ai_processing_results (organization_id, raw_response, job_id, job_kind,
             status, created_at)
         SELECT $1::uuid, '{\"text\": \"an answer\"}', 'r' || $2 || '-' || g, 'llm', 'completed',
             now() - make_interval(days => $2)
         FROM generate_series(1, $3) g",
        "INSERT INTO ai_processing_errors (organization_id, error_type, error_message,
             error_details, job_id, created_at)
         SELECT $1::uuid, 'provider_error', 'failed', '{\"retryable\": true}', 'e' || $2 || '-' || g,
             now() - make_interval(days => $2)
         FROM generate_series(1, $3) g",
        "INSERT INTO ai_usage (organization_id, model, endpoint, input_tokens, output_tokens,
             cost_usd, subscription_tier, job_id, attempt, created_at)
         SELECT $1::uuid, 'gpt-4o-mini', 'chat', 10, 5, 0.0001, 'pro', 'u' || $2 || '-' || g, 1,
             now() - make_interval(days => $2)
         FROM generate_series(1, $3) g",
        "INSERT INTO ai_cost_tracking (organization_id, service_name, operation_type, cost_usd,
             billing_date, job_id, attempt, created_at)
         SELECT $1::uuid, 'openai', 'chat', 0.0001, (now() - make_interval(days => $2))::date,
             'c' || $2 || '-' || g, 1, now() - make_interval(days => $2)
         FROM generate_series(1, $3) g",
        // Delivered alerts, and one undelivered of each age, which stays.
        "INSERT INTO ai_cost_alerts (scope, window_kind, window_start, threshold, spent_usd,
             message, created_at, delivered_at)
         SELECT 'global', 'day', 'd' || $2 || '-' || g, '80', 1, 'm',
             now() - make_interval(days => $2),
             CASE WHEN g <= $3 THEN now() - make_interval(days => $2) END
         FROM generate_series(1, $3 + 1) g",
    ];
    for sql in statements {
        sqlx::query(sql)
            .bind(ORG_A)
            .bind(days)
            .bind(n)
            .execute(pool)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
}

async fn age_every_table(ctx: &TestCtx) {
    for (days, n) in AGES {
        age_rows(ctx, days, n).await;
    }
}

/// Every row the tests can tell apart: (table, age in days, delivered or raw intact, count).
async fn snapshot(ctx: &TestCtx) -> Vec<(String, i32, bool, i64)> {
    sqlx::query_as(
        "SELECT t, age, flag, count(*) FROM (
             SELECT 'results' t, extract(day FROM now() - created_at)::int age,
                 raw_pruned_at IS NULL AND raw_response = '{\"text\": \"an answer\"}' flag
               FROM ai_processing_results
             UNION ALL SELECT 'errors', extract(day FROM now() - created_at)::int, true
               FROM ai_processing_errors
             UNION ALL SELECT 'usage', extract(day FROM now() - created_at)::int, true
               FROM ai_usage
             UNION ALL SELECT 'ledger', extract(day FROM now() - created_at)::int, true
               FROM ai_cost_tracking
             UNION ALL SELECT 'alerts', extract(day FROM now() - created_at)::int,
                 delivered_at IS NOT NULL
               FROM ai_cost_alerts
         ) rows GROUP BY t, age, flag ORDER BY t, age, flag",
    )
    .fetch_all(ctx.store.pool())
    .await
    .unwrap()
}

/// `aiq prune` with the test's settings: (success, stdout, stderr).
fn prune(ctx: &TestCtx, args: &[&str]) -> (bool, String, String) {
    let out = crate::harness::aiq_command()
        .envs(&ctx.vars)
        .arg("prune")
        .args(args)
        .output()
        .expect("running aiq prune");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The `--json` lines as (table, action, rows).
fn counts(out: &str) -> Vec<(String, String, u64)> {
    out.lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}"));
            (
                v["table"].as_str().unwrap().to_owned(),
                v["action"].as_str().unwrap().to_owned(),
                v["rows"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn row(table: &str, action: &str, rows: u64) -> (String, String, u64) {
    (table.to_owned(), action.to_owned(), rows)
}

fn rows_of(snap: &[(String, i32, bool, i64)], table: &str, age: i32, flag: bool) -> i64 {
    snap.iter()
        .filter(|(t, a, f, _)| t == table && *a == age && *f == flag)
        .map(|r| r.3)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_changes_nothing_and_a_pass_removes_exactly_what_the_defaults_say() {
    // The defaults (raw answers 30 days, rows 400, ledger forever), in batches of 2 rows.
    let ctx = TestCtx::with(&[("AIQ_PRUNE_BATCH", "2")]).await;
    age_every_table(&ctx).await;
    let before = snapshot(&ctx).await;

    let (ok, out, err) = prune(&ctx, &["--dry-run", "--json"]);
    assert!(ok, "{err}");
    // Rows older than 400 days: 5 + 2 of each table; raw answers between 30 and 400 days: 4.
    let expected = vec![
        row("ai_processing_results", "deleted", 7),
        row("ai_processing_errors", "deleted", 7),
        row("ai_usage", "deleted", 7),
        row("ai_cost_alerts", "deleted", 7),
        row("ai_processing_results", "raw_response pruned", 4),
        row("ai_cost_tracking", "deleted", 0),
    ];
    assert_eq!(counts(&out), expected);
    assert!(out.lines().all(|l| l.contains("\"dry_run\":true")), "{out}");
    assert_eq!(snapshot(&ctx).await, before, "a dry run changes nothing");

    let (ok, out, err) = prune(&ctx, &["--json"]);
    assert!(ok, "{err}");
    assert_eq!(
        counts(&out),
        expected,
        "the pass does what the dry run said"
    );
    let after = snapshot(&ctx).await;
    for table in ["results", "errors", "usage", "alerts"] {
        let all_ages = |age| rows_of(&after, table, age, true) + rows_of(&after, table, age, false);
        assert_eq!(
            all_ages(500) + all_ages(1000),
            // undelivered alerts stay, one of each age
            if table == "alerts" { 2 } else { 0 },
            "{table}: {after:?}"
        );
    }
    for table in ["errors", "usage"] {
        assert_eq!(rows_of(&after, table, 10, true), 3, "{table}");
        assert_eq!(rows_of(&after, table, 40, true), 4, "{table}");
    }
    // The 40-day results keep their rows, with their status, without the answer.
    assert_eq!(rows_of(&after, "results", 10, true), 3);
    assert_eq!(rows_of(&after, "results", 40, false), 4);
    assert_eq!(rows_of(&after, "results", 40, true), 0);
    assert_eq!(
        ctx.scalar_i64(
            "SELECT count(*) FROM ai_processing_results WHERE raw_response = '{\"pruned\": true}'
               AND raw_pruned_at IS NOT NULL AND status = 'completed'"
        )
        .await,
        4
    );
    // The ledger is untouched by default.
    for (days, n) in AGES {
        assert_eq!(
            rows_of(&after, "ledger", days, true),
            n,
            "ledger at {days} days"
        );
    }

    let (ok, out, err) = prune(&ctx, &["--json"]);
    assert!(ok, "{err}");
    assert!(
        counts(&out).iter().all(|c| c.2 == 0),
        "a second pass removes nothing: {out}"
    );
    assert_eq!(snapshot(&ctx).await, after);

    let (ok, out, _) = prune(&ctx, &["--dry-run"]);
    assert!(
        ok && out.contains("ai_cost_tracking") && out.contains("never"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ledger_retention_deletes_only_older_cost_rows_and_0_keeps_the_rest() {
    let ctx = TestCtx::with(&[
        ("AIQ_RETAIN_RAW_DAYS", "0"),
        ("AIQ_RETAIN_ROWS_DAYS", "0"),
        ("AIQ_RETAIN_LEDGER_DAYS", "450"),
    ])
    .await;
    age_every_table(&ctx).await;
    let before = snapshot(&ctx).await;
    let (ok, out, err) = prune(&ctx, &["--json"]);
    assert!(ok, "{err}");
    let c = counts(&out);
    assert_eq!(c[5], row("ai_cost_tracking", "deleted", 7));
    assert!(c[..5].iter().all(|c| c.2 == 0), "{out}");
    let after = snapshot(&ctx).await;
    let without_ledger = |s: &[(String, i32, bool, i64)]| {
        s.iter()
            .filter(|r| r.0 != "ledger")
            .cloned()
            .collect::<Vec<_>>()
    };
    assert_eq!(without_ledger(&after), without_ledger(&before));
    assert_eq!(rows_of(&after, "ledger", 10, true), 3);
    assert_eq!(rows_of(&after, "ledger", 40, true), 4);
    assert_eq!(rows_of(&after, "ledger", 500, true), 0);
    assert_eq!(rows_of(&after, "ledger", 1000, true), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_one_process_prunes_another_does_not_and_changes_nothing() {
    let ctx = TestCtx::new().await;
    age_every_table(&ctx).await;
    let before = snapshot(&ctx).await;
    let lock = ctx
        .store
        .try_prune_lock()
        .await
        .unwrap()
        .expect("the lock is free");
    assert!(
        ctx.store.try_prune_lock().await.unwrap().is_none(),
        "a second session does not get it"
    );
    let (ok, out, err) = prune(&ctx, &["--json"]);
    assert!(!ok && out.is_empty(), "{out}");
    assert!(err.contains("another process is pruning"), "{err}");
    let stop = CancellationToken::new();
    let busy = aiq::retention::pass(&ctx.store, &ctx.settings.retention, false, &stop)
        .await
        .unwrap();
    assert!(busy.is_err(), "an in-process pass skips too");
    assert_eq!(snapshot(&ctx).await, before);

    lock.release().await.unwrap();
    let done = aiq::retention::pass(&ctx.store, &ctx.settings.retention, false, &stop)
        .await
        .unwrap()
        .expect("the lock is free again");
    assert_eq!(done.iter().map(|p| p.rows).sum::<u64>(), 4 * 7 + 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aiq_run_prunes_in_the_background() {
    let ctx = TestCtx::new().await;
    age_every_table(&ctx).await;
    let worker = ctx.start_worker();
    wait_until(
        Duration::from_secs(30),
        "the pruner's first pass",
        || async {
            ctx.scalar_i64(
                "SELECT count(*) FROM ai_processing_results
             WHERE created_at < now() - interval '30 days' AND raw_pruned_at IS NULL",
            )
            .await
                == 0
        },
    )
    .await;
    worker.stop().await;
    let after = snapshot(&ctx).await;
    assert_eq!(rows_of(&after, "results", 500, false), 0);
    assert_eq!(rows_of(&after, "results", 40, false), 4);
    assert_eq!(rows_of(&after, "results", 10, true), 3);
    assert_eq!(rows_of(&after, "ledger", 1000, true), 2);
}
