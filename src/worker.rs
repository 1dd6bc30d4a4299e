//! The daemon's runtime: connect, build the apalis worker over our backend, run until the
//! cancellation token fires, then drain within the grace period.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use apalis::layers::WorkerBuilderExt;
use apalis_core::error::WorkerError;
use apalis_core::worker::builder::WorkerBuilder;
use tokio_util::sync::CancellationToken;

use crate::budget::PriceCatalog;
use crate::config::Settings;
use crate::jobs::{App, JobService};
use crate::providers::openai::OpenAiClient;
use crate::providers::vision::VisionClient;
use crate::queue::Queue;
use crate::queue::backend::RedisBackend;
use crate::store::Store;

/// Connects to Redis and PostgreSQL; fails naming what did not answer.
pub async fn connect(settings: &Settings) -> anyhow::Result<(Queue, Store)> {
    let queue = Queue::connect(&settings.queue)
        .await
        .context("connecting to Redis (AIQ_REDIS_URL)")?;
    queue
        .ping()
        .await
        .context("Redis (AIQ_REDIS_URL) does not answer")?;
    let pool_size = (settings.queue.concurrency as u32 + 4).min(100);
    let store = Store::connect(&settings.database_url, pool_size, Duration::from_secs(10))
        .await
        .context("connecting to PostgreSQL (AIQ_DATABASE_URL)")?;
    Ok((queue, store))
}

pub fn app(settings: &Settings, store: Store) -> Arc<App> {
    Arc::new(App {
        store,
        vision: VisionClient::new(&settings.vision),
        openai: OpenAiClient::new(&settings.openai),
        prices: PriceCatalog::builtin(),
    })
}

/// Runs jobs until `shutdown` fires. Then no new job is fetched, jobs fetched but not started go
/// back to the queue, and running jobs get `shutdown_grace` to finish; a job still running after
/// that is left to its lease, which expires and returns it to the queue.
pub async fn run(
    settings: &Settings,
    queue: Queue,
    store: Store,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let app = app(settings, store);
    let name = format!(
        "aiq-{}-{}",
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "host".into()),
        std::process::id()
    );
    let backend = RedisBackend::new(queue, settings.retry);
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
