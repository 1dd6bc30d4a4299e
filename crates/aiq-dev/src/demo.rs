//! `aiq-dev demo`: the whole flow on this machine with nothing set up. It starts its own
//! `redis-server` and PostgreSQL (temporary folders, free ports), the fake providers and a worker,
//! enqueues a mixed batch over all six tiers and both job kinds, waits for every job to end,
//! prints a summary and, as its last line, one JSON object; then stops everything it started.

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use aiq::config::{Env, Settings};
use aiq::domain::{JobKind, MicroUsd, OrganizationId, Tier};
use aiq::queue::{NewJob, Queue};
use aiq_testkit::fake::FakeProviders;
use aiq_testkit::localsvc::{LocalPostgres, LocalRedis};

/// A 1x1 PNG, base64: the demo's image.
const PIXEL_PNG: &str = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==";

#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub jobs_per_tier: usize,
    pub timeout: Duration,
}

/// The organisation ids the demo bills: two per tier, so round-robin has something to do.
fn demo_org(tier: Tier, n: usize) -> OrganizationId {
    OrganizationId::from(uuid::Uuid::from_u128(
        0x0000_0000_0000_4000_8000_0000_0000_0000 | ((tier.index() as u128) << 8) | n as u128,
    ))
}

fn demo_job(tier: Tier, i: usize) -> NewJob {
    let org = demo_org(tier, i % 2);
    let (kind, payload) = if i.is_multiple_of(2) {
        (
            JobKind::VisionAnnotate,
            json!({
                "version": 1, "organization_id": org.to_string(), "tier": tier.as_str(),
                "correlation_id": format!("demo-{tier}-{i}"),
                "subject_id": uuid::Uuid::from_u128(((tier.index() as u128) << 32) | i as u128).to_string(),
                "subject_type": "photo",
                "images": [{ "content": PIXEL_PNG }],
                "features": [{ "type": "LABEL_DETECTION", "maxResults": 5 }, { "type": "SAFE_SEARCH_DETECTION" }]
            }),
        )
    } else {
        (
            JobKind::LlmComplete,
            json!({
                "version": 1, "organization_id": org.to_string(), "tier": tier.as_str(),
                "correlation_id": format!("demo-{tier}-{i}"),
                "provider": "openai", "model": "gpt-4o-mini",
                "messages": [
                    { "role": "system", "content": "You write one-line photo captions." },
                    { "role": "user", "content": format!("Caption photo {i} of the {tier} customer.") }
                ],
                "max_tokens": 64
            }),
        )
    };
    NewJob {
        kind,
        tier,
        organization_id: org,
        payload: payload.to_string(),
        job_id: None,
        delay: Duration::ZERO,
        idempotency_key: Some(format!("demo-{tier}-{i}")),
        max_attempts: 0,
    }
}

pub async fn run(opts: DemoOptions) -> anyhow::Result<()> {
    let started = Instant::now();
    println!("aiq-dev demo: starting redis-server, PostgreSQL and the fake providers...");
    // These run on the calling thread on purpose: the servers die with the thread that started
    // them, and `aiq-dev demo` calls this from the main thread.
    let redis = LocalRedis::start("demo")?;
    let pg = LocalPostgres::start("demo")?;
    let fake = FakeProviders::start(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
    let admin_port = aiq_testkit::localsvc::free_port()?;

    let mut vars: HashMap<&str, String> = HashMap::from([
        ("AIQ_REDIS_URL", redis.url()),
        ("AIQ_DATABASE_URL", pg.url("postgres")),
        ("AIQ_QUEUE_PREFIX", "aiq-demo".into()),
        ("AIQ_CONCURRENCY", "8".into()),
        ("AIQ_POLL_INTERVAL_MS", "20".into()),
        ("AIQ_ADMIN_ADDR", format!("127.0.0.1:{admin_port}")),
        ("AIQ_LOG_FORMAT", "text".into()),
    ]);
    vars.extend(aiq_testkit::local::provider_vars(&fake.base_url(), "demo"));
    let settings = Settings::load(&Env(|k| vars.get(k).cloned())).context("demo settings")?;
    let (queue, store) = aiq::worker::connect(&settings).await?;
    store
        .migrate()
        .await
        .context("migrating the demo database")?;
    println!(
        "  redis-server on port {}, PostgreSQL on port {}, fake providers on {}",
        redis.port(),
        pg.port(),
        fake.addr
    );

    let shutdown = CancellationToken::new();
    let app = aiq::worker::app(&settings, store.clone()).await?;
    aiq::http::serve(
        settings.admin_addr,
        aiq::worker::admin_sources(&queue, &app),
        shutdown.clone(),
    )
    .await?;
    let budget = app.budget.clone();
    let worker = {
        let (settings, queue, shutdown) = (settings.clone(), queue.clone(), shutdown.clone());
        tokio::spawn(async move { aiq::worker::run(&settings, queue, app, shutdown).await })
    };

    let mut enqueued = 0usize;
    let mut per_tier_enqueued: BTreeMap<&str, usize> = BTreeMap::new();
    for tier in Tier::ALL {
        for i in 0..opts.jobs_per_tier {
            let r = queue.enqueue(&demo_job(tier, i)).await?;
            if !r.duplicate {
                enqueued += 1;
                *per_tier_enqueued.entry(tier.as_str()).or_default() += 1;
            }
        }
    }
    println!(
        "  enqueued {enqueued} jobs over {} tiers and both job kinds; waiting for them...",
        Tier::ALL.len()
    );

    let outcome = wait_for_all(&queue, opts.timeout).await;
    shutdown.cancel();
    let stopped =
        tokio::time::timeout(settings.shutdown_grace + Duration::from_secs(5), worker).await;
    let (finished, report) = outcome?;

    let outcomes = store.outcomes_by_tier().await?;
    let costs = store.cost_by_provider().await?;
    let rows = store.row_counts().await?;
    let stats = queue.stats().await?;

    println!();
    println!("Jobs per tier and outcome:");
    println!(
        "  {:<20} {:>9} {:>10} {:>7} {:>5}",
        "tier", "enqueued", "succeeded", "failed", "dead"
    );
    let mut by_tier: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    for (tier, status, n) in &outcomes {
        let e = by_tier.entry(tier.clone()).or_default();
        if status == "completed" {
            e.0 += n;
        } else {
            e.1 += n;
        }
    }
    let dead_by_tier = report.dead_by_tier;
    for tier in Tier::ALL {
        let (ok, failed) = by_tier.get(tier.as_str()).copied().unwrap_or_default();
        println!(
            "  {:<20} {:>9} {:>10} {:>7} {:>5}",
            tier.as_str(),
            per_tier_enqueued.get(tier.as_str()).copied().unwrap_or(0),
            ok,
            failed,
            dead_by_tier.get(tier.as_str()).copied().unwrap_or(0)
        );
    }
    println!();
    println!("Cost per provider (ai_cost_tracking):");
    let mut total = MicroUsd::ZERO;
    for (provider, cost, calls) in &costs {
        println!("  {provider:<20} {calls:>5} calls  {cost}");
        total = total.checked_add(*cost).unwrap_or(total);
    }
    println!("  {:<20} {:>5}        {total}", "total", "");
    let month = chrono::Utc::now().format("%Y-%m").to_string();
    let units = budget.vision_units(&month).await.unwrap_or_default();
    if !units.is_empty() {
        let list: Vec<String> = units.iter().map(|(f, n)| format!("{f} {n}")).collect();
        println!(
            "  Vision units this month: {} (the first 1,000 of each feature a month are free)",
            list.join(", ")
        );
    }
    println!();
    println!(
        "Rows written: ai_processing_results {}, ai_cost_tracking {}, ai_usage {}, ai_processing_errors {}",
        rows.ai_processing_results, rows.ai_cost_tracking, rows.ai_usage, rows.ai_processing_errors
    );
    println!(
        "Queue after the run: waiting {}, in flight {}, delayed {}, dead {}",
        stats.waiting.values().sum::<u64>(),
        stats.inflight,
        stats.delayed,
        stats.dead
    );
    let worker_ok = matches!(stopped, Ok(Ok(Ok(()))));
    if !worker_ok {
        println!("The worker did not stop cleanly: {stopped:?}");
    }

    let succeeded: i64 = by_tier.values().map(|v| v.0).sum();
    let failed: i64 = by_tier.values().map(|v| v.1).sum();
    let per_tier: BTreeMap<&str, i64> = Tier::ALL
        .iter()
        .map(|t| (t.as_str(), by_tier.get(t.as_str()).map_or(0, |v| v.0)))
        .collect();
    drop(store);
    drop(queue);
    drop(fake);
    drop(pg);
    drop(redis);
    println!("Stopped redis-server, PostgreSQL and the fake providers.");
    println!(
        "{}",
        json!({
            "enqueued": enqueued,
            "succeeded": succeeded,
            "failed": failed,
            "dead": stats.dead,
            "cost_usd": total.as_usd_f64(),
            "succeeded_per_tier": per_tier,
            "all_finished": finished,
            "elapsed_ms": started.elapsed().as_millis() as u64,
        })
    );
    if !finished {
        bail!("not every job finished within {:?}", opts.timeout);
    }
    if !worker_ok {
        bail!("the worker did not stop cleanly");
    }
    Ok(())
}

struct WaitReport {
    dead_by_tier: BTreeMap<String, u64>,
}

/// Waits until no job is waiting, in flight or delayed: each one then either finished (and left
/// Redis) or is in the dead set.
async fn wait_for_all(queue: &Queue, timeout: Duration) -> anyhow::Result<(bool, WaitReport)> {
    let deadline = Instant::now() + timeout;
    loop {
        let stats = queue.stats().await?;
        let settled =
            stats.waiting.values().sum::<u64>() == 0 && stats.inflight == 0 && stats.delayed == 0;
        if settled || Instant::now() > deadline {
            let mut dead_by_tier = BTreeMap::new();
            for d in queue.dead_jobs(10_000).await? {
                *dead_by_tier.entry(d.tier).or_default() += 1;
            }
            return Ok((settled, WaitReport { dead_by_tier }));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
