//! The admin port: `/metrics` (Prometheus text), `/healthz` (the process is alive) and `/readyz`
//! (JSON: Redis, PostgreSQL, the providers' circuit breakers and the platform budget, each
//! healthy / degraded / unhealthy, and overall; 503 when unhealthy). An open breaker or a nearly
//! spent budget is degraded: jobs wait, but the daemon itself is fine. The console (`console`)
//! is served on the same port under `/console/`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::budget::Budget;
use crate::providers::breaker::Breakers;
use crate::queue::Queue;
use crate::store::Store;

/// What the admin port reads: the queue's depth, PostgreSQL's health, the platform budget and
/// the breakers. It is handed these parts, not the job pipeline (`worker::admin_sources`
/// builds them from the daemon's `App`).
#[derive(Clone)]
pub struct Sources {
    pub queue: Queue,
    pub store: Store,
    pub budget: Budget,
    pub breakers: Breakers,
    /// The console's sign-ins (`AIQ_CONSOLE_*`); none: open on a loopback Host only.
    pub console: crate::config::ConsoleSettings,
}

impl Sources {
    /// The same sources with the console's sign-ins of `settings`.
    pub fn with_console(mut self, console: crate::config::ConsoleSettings) -> Self {
        self.console = console;
        self
    }
}

/// An error as /readyz shows it: with the password of any URL in it masked (a connection error
/// may quote the URL it could not reach), cut to a bound.
fn shown(e: impl std::fmt::Display) -> String {
    let text = e.to_string();
    let masked = crate::redact::url(&text);
    crate::redact::cut(&masked, crate::redact::MESSAGE_MAX).into_owned()
}

async fn healthz() -> &'static str {
    "ok\n"
}

/// The platform's budget state in today's and this month's windows.
pub(crate) async fn global_budget(
    budget: &Budget,
) -> Result<Vec<crate::budget::ScopeState>, crate::budget::BudgetError> {
    let any = crate::budget::OrgLimits {
        daily: crate::domain::MicroUsd::ZERO,
        monthly: crate::domain::MicroUsd::ZERO,
    };
    let (scopes, _) = budget.scopes(uuid::Uuid::nil(), any, chrono::Utc::now());
    let global: Vec<_> = scopes
        .into_iter()
        .filter(|s| s.owner == crate::budget::Owner::Global)
        .collect();
    budget.state(&global).await
}

async fn metrics(State(d): State<Arc<Sources>>) -> impl IntoResponse {
    let stats = match d.queue.stats().await {
        Ok(s) => {
            crate::observe::bad_redis_values(&s.skipped);
            Some(s)
        }
        Err(e) => {
            tracing::warn!(error = %e, "reading queue stats for /metrics failed");
            None
        }
    };
    let budget = global_budget(&d.budget).await.unwrap_or_default();
    let breakers = d
        .breakers
        .states()
        .await
        .map(|states| {
            states
                .into_iter()
                .map(|(p, s)| {
                    (
                        p,
                        matches!(s, crate::providers::breaker::BreakerState::Open { .. }),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let fleet = crate::observe::Fleet {
        stats: stats.as_ref(),
        budget: &budget,
        breakers,
    };
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::observe::render(&fleet),
    )
}

/// How long /readyz waits for PostgreSQL before it calls it unreachable: the whole answer
/// comes within 2 s.
const READY_PART_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(1_500);

async fn readyz(State(d): State<Arc<Sources>>) -> (StatusCode, Json<serde_json::Value>) {
    let part = |r: Result<(), String>| match r {
        Ok(()) => json!({ "status": "healthy" }),
        Err(e) => json!({ "status": "unhealthy", "error": e }),
    };
    let redis = part(d.queue.ping().await.map_err(shown).and_then(|()| {
        // Redis answering a PING is not enough: the queue's scripts must run too.
        crate::queue::backend::queue_healthy(d.queue.settings().lease).map_err(|since| {
            format!(
                "the queue's fetches or reaps have failed for {} ms (more than a lease)",
                since.as_millis()
            )
        })
    }));
    // Bounded: with PostgreSQL gone, the pool would try to connect for its whole acquire
    // timeout (10 s) before failing.
    let postgres = part(
        match tokio::time::timeout(READY_PART_TIMEOUT, d.store.ping()).await {
            Ok(r) => r.map_err(shown),
            Err(_) => Err(format!(
                "PostgreSQL did not answer within {} ms",
                READY_PART_TIMEOUT.as_millis()
            )),
        },
    );
    let budget = match global_budget(&d.budget).await {
        Err(e) => json!({ "status": "unhealthy", "error": shown(e) }),
        Ok(states) => {
            let tight: Vec<String> = states
                .iter()
                .filter(|s| {
                    s.limit.micros() > 0
                        && s.spent.micros() as i128 * 100 >= s.limit.micros() as i128 * 95
                })
                .map(|s| {
                    format!(
                        "platform {} budget {} of {}",
                        s.window_kind.as_str(),
                        s.spent,
                        s.limit
                    )
                })
                .collect();
            if tight.is_empty() {
                json!({ "status": "healthy" })
            } else {
                json!({ "status": "degraded", "detail": tight })
            }
        }
    };
    let providers = match d.breakers.states().await {
        Err(e) => json!({ "status": "unhealthy", "error": shown(e) }),
        Ok(states) => {
            use crate::providers::breaker::BreakerState;
            let detail: serde_json::Map<String, serde_json::Value> = states
                .iter()
                .map(|(p, s)| {
                    let v = match s {
                        BreakerState::Closed => json!({ "breaker": "closed" }),
                        BreakerState::HalfOpen => json!({ "breaker": "half_open" }),
                        BreakerState::Open { remaining } => {
                            json!({ "breaker": "open", "retry_in_ms": remaining.as_millis() as u64 })
                        }
                    };
                    ((*p).to_owned(), v)
                })
                .collect();
            let all_closed = states.iter().all(|(_, s)| *s == BreakerState::Closed);
            json!({ "status": if all_closed { "healthy" } else { "degraded" }, "breakers": detail })
        }
    };
    let statuses = [&redis, &postgres, &providers, &budget]
        .map(|p| p["status"].as_str().unwrap_or("unhealthy").to_owned());
    let overall = if statuses.iter().any(|s| s == "unhealthy") {
        "unhealthy"
    } else if statuses.iter().any(|s| s == "degraded") {
        "degraded"
    } else {
        "healthy"
    };
    let code = if overall == "unhealthy" {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    (
        code,
        Json(json!({ "status": overall,
                "parts": { "redis": redis, "postgres": postgres, "providers": providers, "budget": budget } })),
    )
}

/// Binds the admin port now (so a taken port fails start-up) and serves until `stop`. Returns
/// the bound address (port 0 picks a free one).
pub async fn serve(
    addr: SocketAddr,
    sources: Sources,
    stop: CancellationToken,
) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("setting AIQ_ADMIN_ADDR: cannot listen on {addr}: {e}"))?;
    let bound = listener.local_addr()?;
    crate::observe::prometheus();
    let console = crate::console::router(sources.clone(), sources.console.clone());
    let router = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(Arc::new(sources))
        .merge(console);
    tokio::spawn(async move {
        let _ = axum::serve(listener, router)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
    });
    Ok(bound)
}
