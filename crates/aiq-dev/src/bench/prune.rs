//! `prune`: the pipeline's rate while the pruner works through a large table of old rows,
//! against its rate without pruning, and whether the pruner removed exactly what the settings
//! say.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use tokio_util::sync::CancellationToken;

use super::full::{World, run_llm_jobs, world};
use super::{BenchOptions, Report, rate, thousands};
use aiq::config::RetentionSettings;
use aiq_testkit::fake::FakeProviders;

/// The old rows' ages in whole days (plus an hour, so none sits on a cutoff): 1 to `SPREAD`.
const SPREAD: u64 = 800;
/// The retentions of the pass: the defaults (raw answers 30 days, rows 400, ledger kept).
const RAW_DAYS: u64 = 30;
const ROWS_DAYS: u64 = 400;

fn age_of(g: u64) -> u64 {
    1 + g % SPREAD
}

/// Fills ai_processing_results with `n` old rows of realistic answers (about 300 bytes each).
async fn fill(w: &World, n: u64) -> anyhow::Result<()> {
    let answer = serde_json::json!({
        "id": "chatcmpl-bench", "object": "chat.completion", "model": "gpt-4o-mini",
        "choices": [{ "index": 0, "finish_reason": "stop",
            "message": { "role": "assistant", "content": "A photo of a kitchen with a window, a table, two chairs and a plant on the sill." } }],
        "usage": { "prompt_tokens": 12, "completion_tokens": 20, "total_tokens": 32 }
    });
    let step = 100_000;
    let mut from = 1;
    while from <= n {
        let to = (from + step - 1).min(n);
        sqlx::query(
            "INSERT INTO ai_processing_results (organization_id, ai_provider, raw_response,
                 status, created_at, processed_at, job_id, job_kind, tier, model)
             SELECT '00000000-0000-4000-8000-000000000001', 'openai', $1, 'completed',
                 now() - make_interval(days => 1 + (g % $4)::int, hours => 1),
                 now() - make_interval(days => 1 + (g % $4)::int, hours => 1),
                 'old-' || g, 'llm_complete', 'pro', 'gpt-4o-mini'
             FROM generate_series($2::bigint, $3::bigint) g",
        )
        .bind(sqlx::types::Json(&answer))
        .bind(from as i64)
        .bind(to as i64)
        .bind(SPREAD as i64)
        .execute(w.store.pool())
        .await
        .context("filling the table")?;
        from = to + 1;
    }
    sqlx::query("VACUUM ANALYZE ai_processing_results")
        .execute(w.store.pool())
        .await?;
    Ok(())
}

pub(crate) async fn prune(opts: &BenchOptions) -> anyhow::Result<Report> {
    let mut r = Report::new("prune", opts.json);
    let old: u64 = if opts.quick { 20_000 } else { 1_000_000 };
    let n = opts.jobs.unwrap_or(if opts.quick { 2_000 } else { 30_000 });
    let batch: u32 = 2_000;
    let fake = FakeProviders::start(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
    // The worker's own pruner is off (every retention 0): the benchmark runs the pass itself,
    // so the first run has none.
    let w = world(
        &fake.base_url(),
        &[
            ("AIQ_QUEUE_PREFIX", "bench-prune".into()),
            ("AIQ_CONCURRENCY", "100".into()),
            ("AIQ_RETAIN_RAW_DAYS", "0".into()),
            ("AIQ_RETAIN_ROWS_DAYS", "0".into()),
        ],
    )
    .await?;
    r.say(format!(
        "prune: {} old result rows (1-{SPREAD} days old), then {} LLM jobs twice: without pruning, and with a pass (raw answers {RAW_DAYS} days, rows {ROWS_DAYS}, batches of {batch}, resting as long as each batch took) running",
        thousands(old),
        thousands(n as u64)
    ));
    let t = Instant::now();
    fill(&w, old).await?;
    r.say(format!("  filled in {:.1} s", t.elapsed().as_secs_f64()));
    let to_delete = (1..=old).filter(|&g| age_of(g) >= ROWS_DAYS).count() as u64;
    let to_strip = (1..=old)
        .filter(|&g| (RAW_DAYS..ROWS_DAYS).contains(&age_of(g)))
        .count() as u64;

    let (without, took) = run_llm_jobs(&w, n, 0).await?;
    r.say(format!(
        "  without pruning: {} jobs/s ({:.1} s)",
        thousands(without),
        took.as_secs_f64()
    ));

    let retention = RetentionSettings {
        raw_days: RAW_DAYS as u32,
        rows_days: ROWS_DAYS as u32,
        ledger_days: 0,
        interval: Duration::from_secs(60),
        batch,
        pause_pct: 100,
    };
    let store = w.store.clone();
    let pass = tokio::spawn(async move {
        let start = Instant::now();
        let done = aiq::retention::pass(&store, &retention, false, &CancellationToken::new()).await;
        (done, start.elapsed())
    });
    let (with, took) = run_llm_jobs(&w, n, n).await?;
    let pass_running = !pass.is_finished();
    let (done, pass_took) = pass.await?;
    let done = done?.map_err(|e| anyhow::anyhow!(e))?;
    let deleted = done[0].rows;
    let stripped = done[4].rows;
    let others: u64 = done.iter().map(|p| p.rows).sum::<u64>() - deleted - stripped;
    let ratio = with as f64 / without.max(1) as f64;
    r.say(format!(
        "  with the pass running: {} jobs/s ({:.1} s), {:.2} of the rate without{}",
        thousands(with),
        took.as_secs_f64(),
        ratio,
        if pass_running {
            "; the pass was still running when the jobs were done"
        } else {
            "; the pass ended before the jobs did"
        }
    ));
    let removed_per_s = rate((deleted + stripped) as usize, pass_took);
    r.say(format!(
        "  the pass: {} rows deleted (the settings say {}), {} raw answers pruned (the settings say {}), in {:.1} s: {} rows/s",
        thousands(deleted),
        thousands(to_delete),
        thousands(stripped),
        thousands(to_strip),
        pass_took.as_secs_f64(),
        thousands(removed_per_s)
    ));
    ensure!(
        deleted == to_delete && stripped == to_strip && others == 0,
        "the pass removed {deleted} rows and pruned {stripped} answers ({others} elsewhere), the settings say {to_delete} and {to_strip}"
    );
    let left: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM ai_processing_results WHERE raw_pruned_at IS NULL
           AND raw_response <> '{\"pruned\": true}'",
    )
    .fetch_one(w.store.pool())
    .await?;
    let kept = old - to_delete - to_strip + 2 * n as u64;
    ensure!(
        left as u64 == kept,
        "{left} rows keep their answer, expected {kept} (the young old rows and every job's)"
    );
    r.figure("old_rows", old);
    r.figure("jobs", n);
    r.figure("batch", batch);
    r.figure("jobs_per_s", with);
    r.figure("jobs_per_s_without_pruning", without);
    r.figure("ratio", (ratio * 1000.0).round() / 1000.0);
    r.figure("pass_ran_throughout", pass_running);
    r.figure("rows_deleted", deleted);
    r.figure("raw_pruned", stripped);
    r.figure("pass_s", (pass_took.as_secs_f64() * 10.0).round() / 10.0);
    r.figure("pass_rows_per_s", removed_per_s);
    Ok(r)
}
