//! The daemon's runtime: connect, build the apalis worker over our backend, run until the
//! cancellation token fires, then drain within the grace period.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use apalis::layers::WorkerBuilderExt;
use apalis_core::error::WorkerError;
use apalis_core::worker::builder::WorkerBuilder;
use futures::FutureExt;
use tokio_util::sync::CancellationToken;

use crate::budget::{Budget, PriceCatalog};
use crate::config::Settings;
use crate::jobs::{App, Clients, HoldTtl, JobService};
use crate::providers::openai::OpenAiClient;
use crate::providers::vision::VisionClient;
use crate::queue::Queue;
use crate::queue::backend::{Precheck, RedisBackend};
use crate::store::Store;

/// This host's name, for the worker's name in logs. (Through gethostname(2), not /proc, which
/// the systemd unit hides.)
fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates within it on success.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    if ok && end > 0 {
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        "host".into()
    }
}

/// Connects to Redis and PostgreSQL; fails naming what did not answer.
pub async fn connect(settings: &Settings) -> anyhow::Result<(Queue, Store)> {
    let mut patience = crate::startup::Patience::new("Redis", settings.startup_wait);
    let queue = loop {
        let attempt = match Queue::connect(&settings.queue).await {
            Ok(q) => q.ping().await.map(|()| q),
            Err(e) => Err(e),
        };
        match attempt {
            Ok(q) => {
                patience.over();
                break q;
            }
            Err(e) if redis_may_come(&e) && patience.again(&e).await => {}
            Err(e) => {
                return Err(anyhow::Error::new(e).context("connecting to Redis (AIQ_REDIS_URL)"));
            }
        }
    };
    let pool_size = (settings.queue.concurrency as u32 + 4).min(100);
    let store = Store::connect(&settings.database, pool_size, settings.startup_wait)
        .await
        .context("connecting to PostgreSQL (AIQ_DATABASE_URL)")?;
    Ok((queue, store))
}

/// Whether waiting can fix a failure to reach Redis at start-up: not a TLS refusal, a wrong
/// password or a URL the client refuses.
fn redis_may_come(e: &crate::queue::QueueError) -> bool {
    match e {
        crate::queue::QueueError::Redis(r) => {
            !matches!(
                r.kind(),
                redis::ErrorKind::AuthenticationFailed | redis::ErrorKind::InvalidClientConfig
            ) && !matches!(r.code(), Some("WRONGPASS" | "NOAUTH" | "NOPERM"))
        }
        _ => false,
    }
}

/// What the admin port reads, taken from the daemon's parts: the port sees the queue, the
/// store, the budget and the breakers, never the job pipeline.
pub fn admin_sources(queue: &Queue, app: &App) -> crate::http::Sources {
    crate::http::Sources {
        queue: queue.clone(),
        store: app.store.clone(),
        budget: app.budget.clone(),
        breakers: app.breakers.clone(),
        console: Default::default(),
    }
}

/// Builds what the handlers need: the budget's Redis connection, the price catalog (a bad
/// catalog file stops start-up), the provider clients.
pub async fn app(settings: &Settings, store: Store) -> anyhow::Result<Arc<App>> {
    let prices = PriceCatalog::load(settings.budget.price_catalog.as_deref())
        .map_err(|e| anyhow::anyhow!("setting AIQ_PRICE_CATALOG: {e}"))?;
    let budget = Budget::connect(&settings.queue.redis, &settings.budget)
        .await
        .context("connecting to Redis for the budget (AIQ_REDIS_URL)")?;
    // A hold must outlive the call it covers; after that the sweeper may take it.
    let margin = settings.budget.hold_margin;
    let hold_ttl = HoldTtl {
        vision: settings.vision.timeout + margin,
        openai: settings.openai.timeout + margin,
        anthropic: settings.anthropic.timeout + margin,
        gemini: settings.gemini.timeout + margin,
    };
    let breakers = crate::providers::breaker::Breakers::connect(
        &settings.queue.redis,
        &settings.budget.prefix,
        settings.breaker,
    )
    .await
    .context("connecting to Redis for the circuit breakers (AIQ_REDIS_URL)")?;
    // One memory budget for the answers of all four providers.
    let bodies = crate::providers::BodyLimits::new(
        settings.max_response_bytes,
        settings.response_memory_bytes,
    );
    let clients = Clients {
        vision: VisionClient::new(&settings.vision, &bodies),
        openai: OpenAiClient::new(&settings.openai, &bodies),
        anthropic: crate::providers::anthropic::AnthropicClient::new(&settings.anthropic, &bodies),
        gemini: crate::providers::gemini::GeminiClient::new(&settings.gemini, &bodies),
    };
    // No reservation until the budget's counters are known: a Redis that is new or lost its
    // data has no ledger marker, and this process rebuilds them from ai_cost_tracking first.
    if !budget.ledger_ok().await? {
        match budget.rebuild_ledger(&store, false).await {
            Ok(Some(summary)) => {
                tracing::warn!(%summary, "the budget had no ledger marker: counters rebuilt from ai_cost_tracking")
            }
            Ok(None) => tracing::info!("another process is rebuilding the budget's counters"),
            Err(e) => {
                tracing::warn!(error = %e, "rebuilding the budget's counters failed; jobs wait until it succeeds")
            }
        }
    }
    // Succeeded jobs' rows go through one group-commit writer.
    let store = store.batched();
    let queue = Queue::connect(&settings.queue)
        .await
        .context("connecting to Redis for kept answers (AIQ_REDIS_URL)")?;
    Ok(Arc::new(App::new(crate::jobs::AppParts {
        store,
        budget,
        breakers,
        queue,
        clients,
        prices,
        hold_ttl,
        call_retry: settings.call_retry,
        callbacks: Arc::new(crate::webhooks::address::AddressPolicy::new(
            settings.webhooks.allow_nets.clone(),
        )),
    })))
}

/// The background work, until `stop`: the sweeper of dead workers' reservations, the alert
/// delivery loop, the webhook delivery loop, the organisations' limits, the spend fold, the pruner
/// and the spike check.
fn spawn_budget_tasks(settings: &Settings, app: Arc<App>, stop: CancellationToken) {
    {
        let (app, stop) = (app.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                crate::budget::sweeper::sweep_expired(
                    &app.budget,
                    &app.store,
                    &app.prices.version,
                    &app.alerts,
                )
                .await;
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                }
            }
        });
    }
    {
        let (alerts, webhook, stop) = (
            app.alerts.clone(),
            settings.budget.alert_webhook.clone(),
            stop.clone(),
        );
        tokio::spawn(async move { crate::budget::alerts::deliver(&alerts, webhook, stop).await });
    }
    {
        // Redis losing its data makes the budget fail closed (reserve.lua refuses without the
        // ledger marker); this puts the counters back within a second. A second pass, once every
        // call that was in flight at the loss has had time to write its row, raises any counter
        // still below the ledger.
        let (app, stop) = (app.clone(), stop.clone());
        tokio::spawn(async move {
            let mut reconcile_at: Option<tokio::time::Instant> = None;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                match app.budget.ledger_ok().await {
                    Ok(false) => match app.budget.rebuild_ledger(&app.store, false).await {
                        Ok(Some(summary)) => {
                            tracing::error!(%summary, "the budget's counters were gone (Redis lost its data): rebuilt from ai_cost_tracking; reservations resume");
                            reconcile_at =
                                Some(tokio::time::Instant::now() + app.hold_ttl.longest());
                        }
                        Ok(None) => {}
                        Err(e) => {
                            tracing::warn!(error = %e, "rebuilding the budget's counters failed")
                        }
                    },
                    Ok(true) => {}
                    Err(e) => {
                        tracing::debug!(error = %e, "checking the budget's ledger marker failed")
                    }
                }
                if reconcile_at.is_some_and(|at| tokio::time::Instant::now() >= at) {
                    match app.budget.rebuild_ledger(&app.store, true).await {
                        Ok(Some(summary)) => {
                            tracing::warn!(%summary, "budget counters reconciled with the ledger after the calls in flight at the data loss");
                            reconcile_at = None;
                        }
                        Ok(None) => {}
                        Err(e) => {
                            tracing::warn!(error = %e, "reconciling the budget's counters failed")
                        }
                    }
                }
            }
        });
    }
    {
        let (store, stop) = (app.store.clone(), stop.clone());
        tokio::spawn(async move { store.follow_endpoint_changes(stop).await });
    }
    {
        // The organisations' own limits, from PostgreSQL into the queue and the budget.
        let (store, queue, budget, stop) = (
            app.store.clone(),
            app.queue.clone(),
            app.budget.clone(),
            stop.clone(),
        );
        tokio::spawn(async move { crate::limits::follow(store, queue, budget, stop).await });
    }
    match crate::webhooks::Sender::new(&settings.webhooks) {
        Ok(sender) => {
            let (store, webhooks, stop) =
                (app.store.clone(), settings.webhooks.clone(), stop.clone());
            tokio::spawn(async move {
                crate::webhooks::deliver(store, Arc::new(sender), webhooks, stop).await
            });
        }
        Err(e) => tracing::error!(error = %e, "webhooks cannot be delivered by this process"),
    }
    {
        // The spend sums the console reads: the cost rows' deltas folded every few seconds (by
        // every process; they take turns), so the deltas stay a few seconds' worth.
        let (store, stop) = (app.store.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                if let Err(e) = store.fold_spend().await {
                    tracing::warn!(error = %e, "folding the spend deltas failed; the next pass tries again");
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                }
            }
        });
    }
    {
        let (store, retention, stop) = (app.store.clone(), settings.retention, stop.clone());
        tokio::spawn(async move { crate::retention::run(store, retention, stop).await });
    }
    let (multiple, min) = (settings.budget.spike_multiple, settings.budget.spike_min);
    tokio::spawn(async move {
        loop {
            app.alerts.check_spikes(multiple, min).await;
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(60)) => {}
            }
        }
    });
}

/// Runs jobs until `shutdown` fires. Then no new job is fetched, jobs fetched but not started go
/// back to the queue, and running jobs get `shutdown_grace` to finish; a job still running after
/// that is left to its lease, which expires and returns it to the queue.
pub async fn run(
    settings: &Settings,
    queue: Queue,
    app: Arc<App>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let background = CancellationToken::new();
    spawn_budget_tasks(settings, app.clone(), background.clone());
    // The scripts apps run (enqueue.lua, cancel.lua) take no settings: they read these.
    if let Err(e) = queue.write_config().await {
        tracing::warn!(error = %e, "writing the queue's settings for the scripts ({{prefix}}:config) failed; they use their defaults");
    }
    {
        let (queue, store, stop) = (queue.clone(), app.store.clone(), background.clone());
        let callbacks = app.callbacks.clone();
        tokio::spawn(async move { drain_cancelled(queue, store, callbacks, stop).await });
    }
    let _stop_background = background.drop_guard();
    let name = format!("aiq-{}-{}", hostname(), std::process::id());
    let store = app.store.clone();
    let precheck: Precheck = Arc::new(move |pairs| {
        let store = store.clone();
        async move { store.outcomes_of(&pairs).await.map_err(|e| e.to_string()) }.boxed()
    });
    let backend = RedisBackend::new(queue, settings.retry)
        .with_precheck(precheck)
        // A queue that works feeds systemd's watchdog.
        .with_liveness(Arc::new(crate::systemd::beat));
    let worker = WorkerBuilder::new(name.as_str())
        .backend(backend)
        .concurrency(settings.queue.concurrency)
        .build(JobService::new(app));
    let signal = {
        let shutdown = shutdown.clone();
        async move {
            shutdown.cancelled().await;
            Ok::<(), WorkerError>(())
        }
    };
    tracing::info!(worker = %name, concurrency = settings.queue.concurrency, prefix = %settings.queue.prefix, "worker started");
    let run = worker.run_until(signal);
    tokio::pin!(run);
    let grace = settings.shutdown_grace;
    tokio::select! {
        r = &mut run => r.context("the worker stopped")?,
        _ = async { shutdown.cancelled().await; tokio::time::sleep(grace).await } => {
            tracing::warn!(grace_ms = grace.as_millis() as u64, "grace period over; unfinished jobs return to the queue when their leases expire");
        }
    }
    tracing::info!(worker = %name, "worker stopped");
    Ok(())
}

/// Jobs cancelled in a batch: their rows are written, then Redis forgets them.
const CANCELLED_BATCH: usize = 100;

/// Writes the result rows of jobs that cancel.lua took out of the queue (status `cancelled`,
/// cost 0), then removes their hashes and `{p}:cancelled` entries; and the rows of jobs that
/// died inside Redis (`{p}:buried`: status `failed`, a `job.dead` message). Every process runs
/// it; the rows are idempotent, so two that drain the same job write one row.
async fn drain_cancelled(
    queue: Queue,
    store: Store,
    callbacks: Arc<crate::webhooks::address::AddressPolicy>,
    stop: CancellationToken,
) {
    loop {
        let mut pause = Duration::from_millis(500);
        match drain_cancelled_once(&queue, &store, &callbacks).await {
            Ok(n) if n >= CANCELLED_BATCH => pause = Duration::ZERO,
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "writing cancelled jobs' rows failed; trying again");
                pause = Duration::from_secs(2);
            }
        }
        match drain_buried_once(&queue, &store, &callbacks).await {
            Ok(n) if n >= CANCELLED_BATCH => pause = Duration::ZERO,
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "writing the rows of jobs that died in the queue failed; trying again");
                pause = Duration::from_secs(2);
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

/// The `callback_url` of a job that ended in the queue, when its payload names one that decode
/// would take (a cancelled job never ran, so its payload was never decoded): a string of at most 2,048 characters that
/// the callback policy accepts. Anything else is left out (the organisation's own endpoints are
/// still told) and logged.
async fn cancelled_callback(
    queue: &Queue,
    id: &str,
    callbacks: &crate::webhooks::address::AddressPolicy,
) -> Option<String> {
    let fields = match queue.job_fields(id).await {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(error = %e, "reading a cancelled job's payload failed: no callback");
            return None;
        }
    };
    let payload: serde_json::Value = serde_json::from_str(fields.get("payload")?).ok()?;
    let url = payload.get("callback_url")?.as_str()?;
    match callbacks.check_url(url) {
        Ok(()) if url.chars().count() <= 2048 => Some(url.to_owned()),
        Ok(()) => None,
        Err(why) => {
            tracing::warn!(job.id = %crate::redact::Field::new(id), "a cancelled job's callback_url {why}: not told");
            None
        }
    }
}

/// The longest reason a buried job's row and message carry (the scripts write short ones; a
/// hash edited by hand may hold anything).
const BURIED_REASON_CHARS: usize = 2_000;

/// One batch of the rows of jobs that died inside Redis; returns how many it looked at. A job
/// retried or purged since, or one without an organisation UUID (a corrupt hash), gets no row;
/// every id looked at leaves `{p}:buried`, so none blocks the rest.
async fn drain_buried_once(
    queue: &Queue,
    store: &Store,
    callbacks: &crate::webhooks::address::AddressPolicy,
) -> anyhow::Result<usize> {
    let jobs = queue.buried_jobs(CANCELLED_BATCH).await?;
    for job in &jobs {
        let (Some(id), true) = (&job.id, job.dead) else {
            continue;
        };
        let Ok(org) = uuid::Uuid::parse_str(&job.organization_id) else {
            tracing::warn!(job.id = %crate::redact::Field::new(id),
                "a job that died in the queue has no organisation UUID: no row is written");
            continue;
        };
        let reason: String = if job.reason.is_empty() {
            "dead in the queue".into()
        } else {
            job.reason.chars().take(BURIED_REASON_CHARS).collect()
        };
        let row = crate::store::CancelledRow {
            organization_id: org,
            job_id: id.clone(),
            kind: job.kind.clone(),
            tier: job.tier.clone(),
            attempts: job.attempts.min(i32::MAX as u32) as i32,
            callback_url: cancelled_callback(queue, id, callbacks).await,
        };
        store.record_buried(&row, &reason).await?;
    }
    let ids: Vec<Vec<u8>> = jobs.iter().map(|j| j.raw_id.clone()).collect();
    queue.forget_buried(&ids).await?;
    Ok(jobs.len())
}

/// One batch of [`drain_cancelled`]; returns how many jobs it looked at.
async fn drain_cancelled_once(
    queue: &Queue,
    store: &Store,
    callbacks: &crate::webhooks::address::AddressPolicy,
) -> anyhow::Result<usize> {
    let jobs = queue.cancelled_jobs(CANCELLED_BATCH).await?;
    let mut done = Vec::with_capacity(jobs.len());
    for job in &jobs {
        match uuid::Uuid::parse_str(&job.organization_id) {
            Ok(org) => {
                let row = crate::store::CancelledRow {
                    organization_id: org,
                    job_id: job.id.clone(),
                    kind: job.kind.clone(),
                    tier: job.tier.clone(),
                    attempts: job.attempts.min(i32::MAX as u32) as i32,
                    callback_url: cancelled_callback(queue, &job.id, callbacks).await,
                };
                store.record_cancelled(&row).await?;
                crate::observe::job_cancelled(&job.tier);
            }
            // enqueue.lua refuses such an organisation: a hash written by hand has no row.
            Err(_) => tracing::warn!(job.id = %crate::redact::Field::new(&job.id),
                "a cancelled job has no organisation UUID: no row is written"),
        }
        done.push(job.id.clone());
    }
    queue.forget_cancelled(&done).await?;
    Ok(jobs.len())
}
