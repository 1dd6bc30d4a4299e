//! The admin port: `/healthz` (the process is alive) and `/readyz` (Redis and PostgreSQL answer).
//! Metrics join here in the operations issue.

use std::net::SocketAddr;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use tokio_util::sync::CancellationToken;

use crate::queue::Queue;
use crate::store::Store;

#[derive(Clone)]
struct Deps {
    queue: Queue,
    store: Store,
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(d): State<Deps>) -> (StatusCode, String) {
    let redis = d.queue.ping().await;
    let pg = d.store.ping().await;
    match (redis, pg) {
        (Ok(()), Ok(())) => (StatusCode::OK, "ready\n".into()),
        (r, p) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "redis: {}\npostgres: {}\n",
                r.map_or_else(|e| e.to_string(), |_| "ok".into()),
                p.map_or_else(|e| e.to_string(), |_| "ok".into())
            ),
        ),
    }
}

/// Binds the admin port now (so a taken port fails start-up) and serves until `stop`.
pub async fn serve(
    addr: SocketAddr,
    queue: Queue,
    store: Store,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("setting AIQ_ADMIN_ADDR: cannot listen on {addr}: {e}"))?;
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(Deps { queue, store });
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
    });
    Ok(())
}
