//! The `events` scenario: what job events cost and how soon a reader has them. With no-op jobs:
//! the time from a handler's return (the job's settle starts) to its `succeeded` event being
//! read by a reader blocked in XREAD, jobs enqueued one a millisecond; then the queue's no-op
//! processing rate of one backlog with events off and on, alternating, in one run.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use apalis_core::error::BoxDynError;
use apalis_core::task::Task;
use tokio_util::sync::CancellationToken;

use super::queue::{drain_with, enqueue_batched, prefix, queue_with_events, remove, run_worker};
use super::{BenchOptions, Report, llm_job, rate, thousands};
use aiq::domain::Tier;
use aiq::queue::backend::{Completed, RawJob};
use aiq::queue::events::entry_events;
use aiq_testkit::localsvc::LocalRedis;

const CONCURRENCY: usize = 100;

/// A stream entry as XREAD gives it: its id and its fields, name then value.
type Entry = (String, Vec<String>);

pub(crate) async fn events(opts: &BenchOptions) -> anyhow::Result<Report> {
    let mut r = Report::new("events", opts.json);
    let redis = LocalRedis::start("bench")?;
    let url = redis.url();
    let samples = if opts.quick { 300 } else { 5_000 };
    r.say(format!(
        "events: settle-to-read latency of {samples} no-op jobs (one enqueued a millisecond), then no-op processing with events off and on"
    ));
    let (p50, p99, max) = latency(&url, samples).await?;
    r.say(format!(
        "  handler's return to its succeeded event read by a blocked XREAD: p50 {p50:.2} ms, p99 {p99:.2} ms, max {max:.2} ms"
    ));
    r.figure("settle_to_read_samples", samples);
    r.figure("settle_to_read_p50_ms", (p50 * 1000.0).round() / 1000.0);
    r.figure("settle_to_read_p99_ms", (p99 * 1000.0).round() / 1000.0);
    r.figure("settle_to_read_max_ms", (max * 1000.0).round() / 1000.0);

    let n = opts
        .jobs
        .unwrap_or(if opts.quick { 5_000 } else { 100_000 });
    // Three rounds each, alternating, so a slow moment of the machine does not fall on one side
    // only; each side's median round is its figure.
    let mut rounds: [Vec<(u64, f64)>; 2] = [Vec::new(), Vec::new()];
    let mut per_entry = Vec::new();
    for round in 0..6 {
        let on = round % 2 == 1;
        let (per_s, us, batch) = processing(&url, n, on).await?;
        let batch = if on {
            per_entry.push(batch);
            format!(", {batch:.1} events per entry of the daemon's")
        } else {
            String::new()
        };
        r.say(format!(
            "  no-op processing, events {:<4} {:>9} jobs/s, Redis script time {us:.1} us per job ({} jobs, concurrency {CONCURRENCY}{batch})",
            if on { "on:" } else { "off:" },
            thousands(per_s),
            thousands(n as u64)
        ));
        rounds[usize::from(on)].push((per_s, us));
    }
    let median = |v: &mut Vec<(u64, f64)>| {
        v.sort_by_key(|(per_s, _)| *per_s);
        v[v.len() / 2]
    };
    let (off, on) = (median(&mut rounds[0]), median(&mut rounds[1]));
    let ratio = on.0 as f64 / off.0.max(1) as f64;
    r.say(format!(
        "  events on / off (median of three each): {ratio:.3} ({} vs {} jobs/s; Redis script time {:.1} vs {:.1} us per job)",
        thousands(on.0),
        thousands(off.0),
        on.1,
        off.1
    ));
    r.figure("process_events_off_per_s", off.0);
    r.figure("process_events_on_per_s", on.0);
    r.figure("process_on_off_ratio", (ratio * 1000.0).round() / 1000.0);
    r.figure(
        "script_us_per_job_events_off",
        (off.1 * 10.0).round() / 10.0,
    );
    r.figure("script_us_per_job_events_on", (on.1 * 10.0).round() / 10.0);
    let per_entry = per_entry.iter().sum::<f64>() / per_entry.len().max(1) as f64;
    r.figure("events_per_daemon_entry", (per_entry * 10.0).round() / 10.0);
    r.figure("jobs", n);
    Ok(r)
}

/// Percentiles (p50, p99, max, in ms) of the time from a no-op handler's return to its job's
/// `succeeded` event being read by a reader blocked in XREAD on a connection of its own.
async fn latency(url: &str, samples: usize) -> anyhow::Result<(f64, f64, f64)> {
    let p = prefix("events-latency");
    let q = queue_with_events(url, &p, CONCURRENCY, true).await?;
    q.write_config().await?;
    let returned: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let service = {
        let returned = returned.clone();
        tower::service_fn(move |task: Task<RawJob>| {
            let returned = returned.clone();
            async move {
                returned
                    .lock()
                    .expect("returned")
                    .insert(task.args.id.clone(), Instant::now());
                Ok::<Completed, BoxDynError>(Completed::default())
            }
        })
    };
    let client = aiq::redis_conn::client_for(url, &Default::default())?;
    let mut reader = aiq::redis_conn::multiplexed(&client).await?;
    let key = format!("{{{p}}}:events");
    let read = {
        let (key, returned) = (key.clone(), returned.clone());
        tokio::spawn(async move {
            // The prefix is new: its stream holds only this run's events.
            let mut last = "0".to_owned();
            let mut waits = Vec::with_capacity(samples);
            while waits.len() < samples {
                let reply: Option<Vec<(String, Vec<Entry>)>> = redis::cmd("XREAD")
                    .arg("COUNT")
                    .arg(1000)
                    .arg("BLOCK")
                    .arg(5000)
                    .arg("STREAMS")
                    .arg(&key)
                    .arg(&last)
                    .query_async(&mut reader)
                    .await?;
                let Some(reply) = reply else {
                    anyhow::bail!("no event for 5 s; {} of {samples} read", waits.len());
                };
                let now = Instant::now();
                for (id, fields) in reply.into_iter().flat_map(|(_, e)| e) {
                    let pairs: Vec<(String, String)> = fields
                        .chunks(2)
                        .filter_map(|c| Some((c.first()?.clone(), c.get(1)?.clone())))
                        .collect();
                    let events =
                        entry_events(&id, &pairs).map_err(|e| anyhow::anyhow!("{id}: {e}"))?;
                    last = id;
                    for e in events.iter().filter(|e| e.get("type") == "succeeded") {
                        let at = returned
                            .lock()
                            .expect("returned")
                            .get(e.get("job_id"))
                            .copied();
                        if let Some(at) = at {
                            waits.push(now.saturating_duration_since(at));
                        }
                    }
                }
            }
            Ok(waits)
        })
    };
    let stop = CancellationToken::new();
    let worker = tokio::spawn(run_worker(q.clone(), CONCURRENCY, service, stop.clone()));
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    for i in 0..samples {
        tick.tick().await;
        q.enqueue(&llm_job(Tier::ALL[i % 6], i)).await?;
    }
    let waits = read.await.context("the reader")?;
    stop.cancel();
    worker.await?;
    remove(url, &p).await?;
    let mut waits = waits?;
    ensure!(waits.len() == samples, "{} of {samples} read", waits.len());
    waits.sort();
    let pct = |x: f64| waits[((waits.len() - 1) as f64 * x).round() as usize].as_secs_f64() * 1e3;
    Ok((pct(0.5), pct(0.99), pct(1.0)))
}

/// The no-op processing rate (jobs/s) of a backlog of `n` jobs, events on or off, the time
/// Redis spent in the queue's scripts per job (µs), and how many events the daemon's stream
/// entries held on average (its fetches' and settles'; each job's `created` entry is its own).
async fn processing(url: &str, n: usize, events: bool) -> anyhow::Result<(u64, f64, f64)> {
    let p = prefix(if events { "events-on" } else { "events-off" });
    let q = queue_with_events(url, &p, CONCURRENCY, events).await?;
    q.write_config().await?;
    enqueue_batched(&q, n, |i| Tier::ALL[i % 6]).await?;
    let service = tower::service_fn(|_task: Task<RawJob>| async {
        Ok::<Completed, BoxDynError>(Completed {
            result: Some(r#"{"provider":"none"}"#.to_owned()),
        })
    });
    let mut conn =
        aiq::redis_conn::multiplexed(&aiq::redis_conn::client_for(url, &Default::default())?)
            .await?;
    let scripts_before = script_usec(&mut conn).await?;
    let took = drain_with(&q, n, CONCURRENCY, service).await?;
    let scripts = script_usec(&mut conn).await? - scripts_before;
    let written: Option<u64> = redis::cmd("HGET")
        .arg(format!("{{{p}}}:counters"))
        .arg("events")
        .query_async(&mut conn)
        .await?;
    let written = written.unwrap_or(0);
    // created, started, succeeded per job with events on; none with them off.
    let want = if events { 3 * n as u64 } else { 0 };
    ensure!(written == want, "{written} events written, not {want}");
    let entries: u64 = redis::cmd("XLEN")
        .arg(format!("{{{p}}}:events"))
        .query_async(&mut conn)
        .await?;
    let daemons = entries.saturating_sub(n as u64).max(1);
    let per_entry = written.saturating_sub(n as u64) as f64 / daemons as f64;
    remove(url, &p).await?;
    Ok((rate(n, took), scripts / n as f64, per_entry))
}

/// Microseconds Redis has spent in scripts (EVALSHA and EVAL) since its start.
async fn script_usec(conn: &mut redis::aio::MultiplexedConnection) -> anyhow::Result<f64> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await?;
    Ok(info
        .lines()
        .filter(|l| l.starts_with("cmdstat_evalsha:") || l.starts_with("cmdstat_eval:"))
        .filter_map(|l| {
            l.split(",usec=")
                .nth(1)?
                .split(',')
                .next()?
                .parse::<f64>()
                .ok()
        })
        .sum())
}
