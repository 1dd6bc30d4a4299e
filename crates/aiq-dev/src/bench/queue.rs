//! The `queue` and `priority` scenarios: the queue alone, with no-op jobs.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use apalis::layers::WorkerBuilderExt;
use apalis_core::error::{BoxDynError, WorkerError};
use apalis_core::task::Task;
use apalis_core::worker::builder::WorkerBuilder;
use futures::{StreamExt, TryStreamExt};
use tokio_util::sync::CancellationToken;

use super::{BenchOptions, Report, llm_job, rate, thousands, wait_drained};
use aiq::config::{Env, QueueSettings, RetryPolicy};
use aiq::domain::Tier;
use aiq::queue::backend::{Completed, RawJob, RedisBackend};
use aiq::queue::{NewJob, Queue};
use aiq_testkit::localsvc::LocalRedis;

const TIER_WEIGHTS: [usize; 6] = [32, 16, 8, 4, 2, 1];

/// A queue on `url` under a prefix of its own, with this concurrency and fetch batch.
async fn queue_at(url: &str, prefix: &str, concurrency: usize) -> anyhow::Result<Queue> {
    queue_with_events(url, prefix, concurrency, true).await
}

/// [`queue_at`] with job events on or off (`AIQ_EVENTS`); the caller writes `{p}:config`.
pub(crate) async fn queue_with_events(
    url: &str,
    prefix: &str,
    concurrency: usize,
    events: bool,
) -> anyhow::Result<Queue> {
    let vars = [
        ("AIQ_REDIS_URL", url.to_owned()),
        ("AIQ_QUEUE_PREFIX", prefix.to_owned()),
        ("AIQ_CONCURRENCY", concurrency.to_string()),
        ("AIQ_FETCH_BATCH", concurrency.min(1000).to_string()),
        ("AIQ_POLL_INTERVAL_MS", "5".to_owned()),
        ("AIQ_EVENTS", if events { "on" } else { "off" }.to_owned()),
    ];
    let settings = QueueSettings::load(&Env(|k: &str| {
        vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone())
    }))?;
    let q = Queue::connect(&settings).await?;
    q.ping().await.context("Redis does not answer")?;
    Ok(q)
}

/// A prefix no other run uses.
pub(crate) fn prefix(name: &str) -> String {
    format!("bench-{name}-{}", uuid::Uuid::new_v4().simple())
}

/// Deletes every key of a queue prefix (the benchmark may run on someone's Redis; `--redis-url`
/// takes no certificate files, so a `rediss://` one is verified against the system's roots).
pub(crate) async fn remove(url: &str, prefix: &str) -> anyhow::Result<()> {
    let client = aiq::redis_conn::client_for(url, &Default::default())?;
    let mut c = aiq::redis_conn::multiplexed(&client).await?;
    let pattern = format!("{{{prefix}}}*");
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut c)
            .await?;
        if !keys.is_empty() {
            let _: () = redis::cmd("UNLINK").arg(&keys).query_async(&mut c).await?;
        }
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
}

/// `n` jobs over the six tiers, in batches of 1,000, each batch one round trip.
pub(crate) async fn enqueue_batched(
    q: &Queue,
    n: usize,
    tier_of: impl Fn(usize) -> Tier,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let mut i = 0;
    while i < n {
        let end = (i + 1000).min(n);
        let batch: Vec<NewJob> = (i..end).map(|j| llm_job(tier_of(j), j)).collect();
        for r in q.enqueue_batch(&batch).await? {
            r?;
        }
        i = end;
    }
    Ok(start.elapsed())
}

/// Runs an apalis worker over aiq's backend with `service` until `stop` fires.
pub(crate) async fn run_worker<S>(q: Queue, concurrency: usize, service: S, stop: CancellationToken)
where
    S: tower::Service<Task<RawJob>, Response = Completed, Error = BoxDynError> + Send + 'static,
    S::Future: Send + 'static,
{
    let retry = RetryPolicy {
        max_attempts: 3,
        base: Duration::from_millis(10),
        cap: Duration::from_millis(100),
    };
    let worker = WorkerBuilder::new("bench")
        .backend(RedisBackend::new(q, retry))
        .concurrency(concurrency)
        .build(service);
    let signal = async move {
        stop.cancelled().await;
        Ok::<(), WorkerError>(())
    };
    if let Err(e) = worker.run_until(signal).await {
        tracing::warn!(error = %e, "the benchmark worker stopped");
    }
}

/// Runs a worker with `service` over `q` until its `n` jobs have drained; returns how long it
/// took.
pub(crate) async fn drain_with<S>(
    q: &Queue,
    n: usize,
    concurrency: usize,
    service: S,
) -> anyhow::Result<Duration>
where
    S: tower::Service<Task<RawJob>, Response = Completed, Error = BoxDynError> + Send + 'static,
    S::Future: Send + 'static,
{
    let stop = CancellationToken::new();
    let start = Instant::now();
    let worker = tokio::spawn(run_worker(q.clone(), concurrency, service, stop.clone()));
    wait_drained(
        q,
        n as u64,
        Duration::from_millis(5),
        Duration::from_secs(600),
    )
    .await?;
    let took = start.elapsed();
    stop.cancel();
    worker.await?;
    Ok(took)
}

pub(crate) async fn queue(opts: &BenchOptions) -> anyhow::Result<Report> {
    let mut r = Report::new("queue", opts.json);
    let n = opts
        .jobs
        .unwrap_or(if opts.quick { 5_000 } else { 100_000 });
    let concurrency = 100;
    let own = match &opts.redis_url {
        Some(_) => None,
        None => Some(LocalRedis::start("bench")?),
    };
    let url = match (&opts.redis_url, &own) {
        (Some(u), _) => u.clone(),
        (None, Some(redis)) => redis.url(),
        (None, None) => unreachable!("started above"),
    };
    r.say(format!(
        "queue: {} jobs over six tiers on {url}",
        thousands(n as u64)
    ));

    // One job per call, 64 calls in flight.
    let p = prefix("single");
    let q = queue_at(&url, &p, concurrency).await?;
    let start = Instant::now();
    futures::stream::iter(0..n)
        .map(|i| {
            let q = q.clone();
            async move { q.enqueue(&llm_job(Tier::ALL[i % 6], i)).await }
        })
        .buffer_unordered(64)
        .try_for_each(|_| async { Ok(()) })
        .await?;
    let single = rate(n, start.elapsed());
    remove(&url, &p).await?;
    r.say(format!(
        "  enqueue, one job per call:     {:>9} jobs/s (64 in flight)",
        thousands(single)
    ));
    r.figure("enqueue_single_per_s", single);

    // Batches of 1,000.
    let p = prefix("batched");
    let q = queue_at(&url, &p, concurrency).await?;
    let took = enqueue_batched(&q, n, |i| Tier::ALL[i % 6]).await?;
    let batched = rate(n, took);
    r.say(format!(
        "  enqueue, batches of 1,000:     {:>9} jobs/s (one round trip per batch)",
        thousands(batched)
    ));
    r.figure("enqueue_batched_per_s", batched);

    // No-op processing of that backlog by one worker.
    let ran = Arc::new(AtomicUsize::new(0));
    let service = {
        let ran = ran.clone();
        tower::service_fn(move |_task: Task<RawJob>| {
            let ran = ran.clone();
            async move {
                ran.fetch_add(1, Ordering::Relaxed);
                Ok::<Completed, BoxDynError>(Completed::default())
            }
        })
    };
    let took = drain_with(&q, n, concurrency, service).await?;
    let stats = q.stats().await?;
    ensure!(
        stats.waiting.values().sum::<u64>() + stats.inflight + stats.delayed + stats.dead == 0,
        "jobs were left: {stats:?}"
    );
    let processed = rate(n, took);
    r.say(format!(
        "  no-op processing:              {:>9} jobs/s (one worker, concurrency {concurrency}; every job acknowledged)",
        thousands(processed)
    ));
    r.figure("process_per_s", processed);
    r.figure("jobs", n);
    r.figure("concurrency", concurrency);
    remove(&url, &p).await?;
    Ok(r)
}

pub(crate) async fn priority(opts: &BenchOptions) -> anyhow::Result<Report> {
    let mut r = Report::new("priority", opts.json);
    let backlog = opts
        .jobs
        .unwrap_or(if opts.quick { 10_000 } else { 100_000 });
    let concurrency = 100;
    let redis = LocalRedis::start("bench")?;
    let url = redis.url();
    r.say(format!(
        "priority: enterprise_plus jobs behind {} trial jobs, one worker (concurrency {concurrency}) draining them",
        thousands(backlog as u64)
    ));
    let p = prefix("priority");
    let q = queue_at(&url, &p, concurrency).await?;
    enqueue_batched(&q, backlog, |_| Tier::Trial).await?;

    // The worker records, for each enterprise_plus job, the time from its enqueue to its start.
    let base = Instant::now();
    let waits: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let service = {
        let waits = waits.clone();
        tower::service_fn(move |task: Task<RawJob>| {
            let waits = waits.clone();
            async move {
                if let Some(sent) = task
                    .args
                    .id
                    .strip_prefix("ep-")
                    .and_then(|rest| rest.split('-').nth(1))
                    .and_then(|us| us.parse::<u64>().ok())
                {
                    let wait = base.elapsed().saturating_sub(Duration::from_micros(sent));
                    waits.lock().expect("waits").push(wait);
                }
                Ok::<Completed, BoxDynError>(Completed::default())
            }
        })
    };
    let stop = CancellationToken::new();
    let worker = tokio::spawn(run_worker(q.clone(), concurrency, service, stop.clone()));
    // An enterprise_plus job every millisecond while the trial backlog lasts (down to 10%).
    let mut sent = 0usize;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    loop {
        tick.tick().await;
        if sent.is_multiple_of(50) {
            let waiting = q.stats().await?.waiting.get("trial").copied().unwrap_or(0);
            if waiting < backlog as u64 / 10 {
                break;
            }
        }
        let mut job = llm_job(Tier::EnterprisePlus, sent);
        job.job_id = Some(format!("ep-{sent}-{}", base.elapsed().as_micros()));
        q.enqueue(&job).await?;
        sent += 1;
    }
    wait_drained(
        &q,
        (backlog + sent) as u64,
        Duration::from_millis(5),
        Duration::from_secs(600),
    )
    .await?;
    stop.cancel();
    worker.await?;
    let mut waits = waits.lock().expect("waits").clone();
    ensure!(
        waits.len() == sent && sent > 0,
        "{} of {sent} enterprise_plus jobs ran",
        waits.len()
    );
    waits.sort();
    let pct = |p: f64| waits[((waits.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1e3;
    let (p50, p99, max) = (pct(0.5), pct(0.99), pct(1.0));
    r.say(format!(
        "  enterprise_plus wait, enqueue to start: p50 {p50:.2} ms, p99 {p99:.2} ms, max {max:.2} ms ({sent} jobs, one a millisecond)"
    ));
    r.figure("enterprise_plus_samples", sent);
    r.figure(
        "enterprise_plus_wait_p50_ms",
        (p50 * 1000.0).round() / 1000.0,
    );
    r.figure(
        "enterprise_plus_wait_p99_ms",
        (p99 * 1000.0).round() / 1000.0,
    );
    r.figure(
        "enterprise_plus_wait_max_ms",
        (max * 1000.0).round() / 1000.0,
    );
    r.figure("trial_backlog", backlog);
    remove(&url, &p).await?;

    // Every tier backlogged: which tiers the first `n` jobs came from.
    let n = if opts.quick { 2_000 } else { 10_000 };
    let p = prefix("shares");
    let q = queue_at(&url, &p, concurrency).await?;
    for (tier, w) in Tier::ALL.into_iter().zip(TIER_WEIGHTS) {
        enqueue_batched(&q, n * w / 63 + n / 20, |_| tier).await?;
    }
    let ran: Arc<Mutex<Vec<String>>> = Arc::default();
    let stop = CancellationToken::new();
    let service = {
        let (ran, stop) = (ran.clone(), stop.clone());
        tower::service_fn(move |task: Task<RawJob>| {
            let (ran, stop) = (ran.clone(), stop.clone());
            async move {
                let mut ran = ran.lock().expect("ran");
                ran.push(task.args.tier.clone());
                if ran.len() >= n {
                    stop.cancel();
                }
                Ok::<Completed, BoxDynError>(Completed::default())
            }
        })
    };
    run_worker(q.clone(), concurrency, service, stop).await;
    let ran = ran.lock().expect("ran").clone();
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for t in ran.iter().take(n) {
        *counts.entry(t.as_str()).or_default() += 1;
    }
    r.say(format!(
        "  tier shares of the first {n} jobs, every tier backlogged (weights 32:16:8:4:2:1):"
    ));
    let mut worst: f64 = 0.0;
    let mut shares = serde_json::Map::new();
    for (tier, w) in Tier::ALL.into_iter().zip(TIER_WEIGHTS) {
        let got = counts.get(tier.as_str()).copied().unwrap_or(0);
        let want = n * w / 63;
        let off = (got as f64 - want as f64) / want as f64 * 100.0;
        worst = worst.max(off.abs());
        shares.insert(tier.as_str().into(), got.into());
        r.say(format!(
            "    {:<20} ran {got:>5}, weight share {want:>5} ({off:+.1}%)",
            tier.as_str()
        ));
    }
    r.say(format!(
        "    largest deviation from the weights: {worst:.1}%"
    ));
    r.figure("shares", shares);
    r.figure("shares_worst_deviation_pct", (worst * 10.0).round() / 10.0);
    remove(&url, &p).await?;
    Ok(r)
}
