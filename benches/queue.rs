//! Queue benchmark against a real redis-server that it starts itself. Prints figures; asserts
//! only that the queue did its job (every job drained, priorities respected).
//!
//! `cargo bench --bench queue` runs the full sizes; `-- --quick` runs small ones (CI uses it to
//! keep the benchmark working). Figures:
//! 1. enqueue throughput through `enqueue.lua`;
//! 2. with 100,000 trial jobs waiting, how long a free slot waits for a newly enqueued
//!    enterprise_plus job: one fetch round trip (p50/p99), and whether it got that job;
//! 3. 1,000,000 queued jobs drained by concurrent consumers (fetch 100 + settle 100 per round
//!    trip), with Redis memory at the peak;
//! 4. with all six tiers backlogged, the shares of the first 10,000 jobs an apalis worker over
//!    aiq's backend actually ran (16 slots), against the weights.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aiq::config::RetryPolicy;
use aiq::queue::backend::{RawJob, RedisBackend};
use apalis::layers::WorkerBuilderExt;
use apalis_core::error::{BoxDynError, WorkerError};
use apalis_core::task::Task;
use apalis_core::worker::builder::WorkerBuilder;
use tokio_util::sync::CancellationToken;

use aiq::config::{Env, QueueSettings};
use aiq::domain::{JobKind, OrganizationId, Tier};
use aiq::localsvc::LocalRedis;
use aiq::queue::{NewJob, Outcome, Queue, Settlement};
use futures::StreamExt;

const ORGS: [&str; 4] = [
    "0b6f1b3e-2a55-4a6e-9a43-2f6f6f1b2c3d",
    "7c9e6679-7425-40de-944b-e07fc1f90ae7",
    "16fd2706-8baf-433b-82eb-8c7fada847da",
    "886313e1-3b8a-5372-9b90-0c9aee199e5d",
];

fn job(tier: Tier, i: usize) -> NewJob {
    let org = ORGS[i % ORGS.len()];
    NewJob {
        kind: JobKind::LlmComplete,
        tier,
        organization_id: OrganizationId::parse(org).unwrap(),
        payload: format!(
            r#"{{"version":1,"organization_id":"{org}","tier":"{tier}","provider":"openai","model":"gpt-4o-mini","messages":[{{"role":"user","content":"Caption photo {i}."}}],"max_tokens":64}}"#
        ),
        job_id: None,
        delay: Duration::ZERO,
        idempotency_key: None,
        max_attempts: 0,
    }
}

async fn queue(url: &str, prefix: &str) -> Queue {
    let vars = [
        ("AIQ_REDIS_URL", url.to_owned()),
        ("AIQ_QUEUE_PREFIX", prefix.to_owned()),
    ];
    let settings = QueueSettings::load(&Env(|k: &str| {
        vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone())
    }))
    .unwrap();
    Queue::connect(&settings).await.unwrap()
}

async fn enqueue_many(q: &Queue, tier: Tier, n: usize, parallel: usize) -> Duration {
    let start = Instant::now();
    futures::stream::iter(0..n)
        .map(|i| {
            let q = q.clone();
            async move { q.enqueue(&job(tier, i)).await.expect("enqueue") }
        })
        .buffer_unordered(parallel)
        .for_each(|_| async {})
        .await;
    start.elapsed()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn redis_memory_mb(url: &str) -> f64 {
    let client = redis::Client::open(url).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let info: String = redis::cmd("INFO")
        .arg("memory")
        .query_async(&mut c)
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1_048_576.0
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (backlog, samples, drain_jobs) = if quick {
        (5_000, 200, 20_000)
    } else {
        (100_000, 2_000, 1_000_000)
    };
    let redis = LocalRedis::start("bench").expect("redis-server");
    let url = redis.url();
    println!(
        "queue benchmark (redis-server 127.0.0.1:{}; {} mode)",
        redis.port(),
        if quick { "quick" } else { "full" }
    );

    // 1 and 2: a trial backlog, then enterprise_plus jobs arriving one at a time.
    let q = queue(&url, "bench-latency").await;
    let took = enqueue_many(&q, Tier::Trial, backlog, 64).await;
    println!(
        "enqueue: {backlog} jobs in {:.2} s = {:.0} jobs/s (64 in flight)",
        took.as_secs_f64(),
        backlog as f64 / took.as_secs_f64()
    );
    // Each sample: an enterprise_plus job arrives; slots free one after another (each a fetch of
    // one job) until one gets it. Fair share lets the backlogged trial tier take 1 slot in 33
    // while enterprise_plus has work, so now and then the new job waits one extra slot.
    let mut waits = Vec::with_capacity(samples);
    let mut extra_slots = Vec::with_capacity(samples);
    for i in 0..samples {
        let id = q
            .enqueue(&job(Tier::EnterprisePlus, i))
            .await
            .unwrap()
            .job_id;
        let t = Instant::now();
        let mut slots = 0usize;
        loop {
            let got = q.fetch(1).await.unwrap();
            let hit = got.iter().any(|j| j.id == id);
            let settle: Vec<Settlement> = got
                .into_iter()
                .map(|j| Settlement {
                    id: j.id,
                    token: j.token,
                    outcome: Outcome::Done,
                })
                .collect();
            q.settle(&settle).await.unwrap();
            if hit {
                break;
            }
            slots += 1;
        }
        waits.push(t.elapsed());
        extra_slots.push(slots);
    }
    waits.sort();
    extra_slots.sort();
    let trial_first = extra_slots.iter().filter(|n| **n > 0).count();
    println!(
        "priority: with {backlog} trial jobs waiting, a new enterprise_plus job was in a worker's hands p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms after it was enqueued (each slot = one fetch round trip); it took the first free slot in {} of {samples} samples and never waited more than {} extra slots",
        percentile(&waits, 0.50).as_secs_f64() * 1e3,
        percentile(&waits, 0.99).as_secs_f64() * 1e3,
        waits.last().unwrap().as_secs_f64() * 1e3,
        samples - trial_first,
        extra_slots.last().unwrap()
    );
    assert!(
        *extra_slots.last().unwrap() <= 1,
        "an enterprise_plus job waited behind several trial jobs"
    );

    // 3: a big backlog over all tiers, drained by concurrent consumers.
    let q = queue(&url, "bench-drain").await;
    let start = Instant::now();
    for (i, tier) in Tier::ALL.into_iter().enumerate() {
        let n = drain_jobs / 6 + usize::from(i < drain_jobs % 6);
        enqueue_many(&q, tier, n, 64).await;
    }
    let total = drain_jobs;
    let took = start.elapsed();
    let peak_mb = redis_memory_mb(&url).await;
    println!(
        "backlog: {total} jobs enqueued in {:.1} s = {:.0} jobs/s; redis used {peak_mb:.0} MiB",
        took.as_secs_f64(),
        total as f64 / took.as_secs_f64()
    );
    let start = Instant::now();
    let consumers: Vec<_> = (0..8)
        .map(|_| {
            let q = q.clone();
            tokio::spawn(async move {
                let mut n = 0usize;
                loop {
                    let got = q.fetch(100).await.expect("fetch");
                    if got.is_empty() {
                        return n;
                    }
                    n += got.len();
                    let settle: Vec<Settlement> = got
                        .into_iter()
                        .map(|j| Settlement {
                            id: j.id,
                            token: j.token,
                            outcome: Outcome::Done,
                        })
                        .collect();
                    let applied = q.settle(&settle).await.expect("settle");
                    assert!(applied.iter().all(|a| *a));
                }
            })
        })
        .collect();
    let mut drained = 0;
    for c in consumers {
        drained += c.await.unwrap();
    }
    let took = start.elapsed();
    let stats = q.stats().await.unwrap();
    println!(
        "drain: {drained} jobs in {:.1} s = {:.0} jobs/s (8 consumers, fetch 100 + settle 100 per round trip); left waiting {}, in flight {}, dead {}; redis now {:.0} MiB",
        took.as_secs_f64(),
        drained as f64 / took.as_secs_f64(),
        stats.waiting.values().sum::<u64>(),
        stats.inflight,
        stats.dead,
        redis_memory_mb(&url).await
    );
    assert_eq!(drained, total);
    assert_eq!(
        stats.waiting.values().sum::<u64>() + stats.inflight + stats.dead,
        0
    );

    worker_shares(&url, if quick { 2_000 } else { 10_000 }).await;
}

/// Runs an apalis worker over aiq's backend on a backlog of all six tiers and reports which tiers
/// the first `n` jobs it ran came from.
async fn worker_shares(url: &str, n: usize) {
    const WEIGHTS: [usize; 6] = [32, 16, 8, 4, 2, 1];
    let q = queue(url, "bench-shares").await;
    for (tier, w) in Tier::ALL.into_iter().zip(WEIGHTS) {
        enqueue_many(&q, tier, n * w / 63 + n / 20, 64).await;
    }
    let ran: Arc<Mutex<Vec<String>>> = Arc::default();
    let stop = CancellationToken::new();
    let service = {
        let (ran, stop) = (ran.clone(), stop.clone());
        tower::service_fn(move |task: Task<RawJob>| {
            let (ran, stop) = (ran.clone(), stop.clone());
            async move {
                let mut ran = ran.lock().unwrap();
                ran.push(task.args.tier.clone());
                if ran.len() >= n {
                    stop.cancel();
                }
                Ok::<(), BoxDynError>(())
            }
        })
    };
    let retry = RetryPolicy {
        max_attempts: 3,
        base: Duration::from_millis(10),
        cap: Duration::from_millis(100),
    };
    let worker = WorkerBuilder::new("bench-shares")
        .backend(RedisBackend::new(q.clone(), retry))
        .concurrency(16)
        .build(service);
    let start = Instant::now();
    let signal = {
        let stop = stop.clone();
        async move {
            stop.cancelled().await;
            Ok::<(), WorkerError>(())
        }
    };
    worker.run_until(signal).await.expect("worker");
    let took = start.elapsed();
    let ran = ran.lock().unwrap();
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for t in ran.iter().take(n) {
        *counts.entry(t.as_str()).or_default() += 1;
    }
    println!(
        "worker shares: the first {n} jobs an apalis worker (16 slots) ran over aiq's backend, {:.0} jobs/s:",
        n as f64 / took.as_secs_f64()
    );
    let mut worst: f64 = 0.0;
    for (tier, w) in Tier::ALL.into_iter().zip(WEIGHTS) {
        let got = counts.get(tier.as_str()).copied().unwrap_or(0);
        let want = n * w / 63;
        let off = (got as f64 - want as f64) / want as f64 * 100.0;
        worst = worst.max(off.abs());
        println!(
            "  {:<20} weight {w:>2}: ran {got:>5}, weight share {want:>5} ({off:+.1}%)",
            tier.as_str()
        );
    }
    println!("  largest deviation from the weights: {worst:.1}%");
    assert!(
        worst <= 5.0,
        "tier shares deviate {worst:.1}% from the weights"
    );
}
