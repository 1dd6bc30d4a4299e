//! `aiq run` and `aiq migrate`.

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use super::{process_env, shutdown_signal};
use crate::config::{self, LogFormat, Settings};
use crate::redact;

/// `aiq migrate`: applies migrations/ to AIQ_DATABASE_URL, waiting for it at start like the
/// daemon does.
pub(super) async fn migrate() -> anyhow::Result<()> {
    let db = config::DatabaseSettings::load(&process_env())?;
    crate::telemetry::init(
        LogFormat::Text,
        "warn",
        redact::url_passwords(db.url.expose()),
    );
    let wait = config::startup_wait(&process_env())?;
    let store = crate::store::Store::connect(&db, 2, wait)
        .await
        .context("connecting to PostgreSQL (AIQ_DATABASE_URL)")?;
    store.migrate().await?;
    println!("migrations applied");
    Ok(())
}

/// `aiq run`: the daemon, until SIGTERM or SIGINT.
pub(super) async fn run_daemon() -> anyhow::Result<()> {
    // The signals are taken first: a SIGTERM while start-up still waits for Redis or PostgreSQL
    // (systemd stopping a unit that never became ready) ends the process cleanly, exit 0.
    let requested = CancellationToken::new();
    {
        let (signalled, requested) = (shutdown_signal(), requested.clone());
        tokio::spawn(async move {
            signalled.await;
            requested.cancel();
        });
    }
    let settings = Settings::from_process_env()?;
    crate::telemetry::init(settings.log_format, "info", settings.secrets());
    let _sentry = match &settings.sentry_dsn {
        Some(dsn) => Some(crate::observe::init_sentry(
            dsn.expose(),
            &settings.sentry_environment,
            settings.secrets(),
            settings.sentry_send_payloads,
        )?),
        None => None,
    };
    let started = async {
        let (queue, store) = crate::worker::connect(&settings).await?;
        let app = crate::worker::app(&settings, store).await?;
        anyhow::Ok((queue, app))
    };
    let (queue, app) = tokio::select! {
        r = started => r?,
        _ = requested.cancelled() => {
            tracing::info!("shutdown requested during start-up: stopped before any job was taken");
            return Ok(());
        }
    };
    let shutdown = CancellationToken::new();
    let admin = crate::http::serve(
        settings.admin_addr,
        crate::worker::admin_sources(&queue, &app).with_console(settings.console.clone()),
        shutdown.clone(),
    )
    .await?;
    tracing::info!(%admin, "admin port: /metrics /healthz /readyz");
    {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            requested.cancelled().await;
            tracing::info!("shutdown requested: no new jobs; finishing the running ones");
            crate::systemd::notify("STOPPING=1");
            shutdown.cancel();
        });
    }
    // Redis and PostgreSQL answered: ready.
    crate::systemd::notify("READY=1");
    crate::systemd::spawn_watchdog(shutdown.clone());
    let result = crate::worker::run(&settings, queue, app, shutdown).await;
    if let Err(e) = &result {
        tracing::error!(error = %format!("{e:#}"), "the daemon stopped on an error");
    }
    result
}
