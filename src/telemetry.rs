//! Logging: JSON lines in production (under systemd), compact text in a terminal. `RUST_LOG`
//! overrides the level. Error events also go to Sentry (when it is on) and warnings become its
//! breadcrumbs, through sentry-tracing; see `observe` for metrics and the scrubbing hook.

use sentry::integrations::tracing::{BreadcrumbLayer, ErrorLayer};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::prelude::*;

use crate::config::LogFormat;

/// Installs the global subscriber. Safe to call more than once (later calls do nothing).
pub fn init(format: LogFormat, default_level: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = match format {
        LogFormat::Json => fmt
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .boxed(),
        LogFormat::Text => fmt.compact().boxed(),
    };
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(ErrorLayer::new().with_filter(LevelFilter::ERROR))
        .with(BreadcrumbLayer::new().with_filter(LevelFilter::WARN))
        .try_init();
}
