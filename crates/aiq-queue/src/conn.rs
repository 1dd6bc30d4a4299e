//! One Redis connection type for the queue and the daemon's other Redis users (the budget, the
//! breakers): a single server or a Redis Cluster, multiplexed and reconnecting either way, over
//! TLS for `rediss://` URLs. Every Redis connection of aiq is opened here, from the settings'
//! `RedisSettings`, so each one uses the same certificates (aiq re-exports it as `redis_conn`).

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};

use crate::settings::{RedisSettings, RedisTls};
use crate::tls::{Server, TlsFailure};

/// A connection to one Redis server or to a Redis Cluster. Both multiplex and reconnect.
#[derive(Clone)]
pub enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// Connecting to Redis failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// TLS refused the connection: no retry can fix it.
    #[error(transparent)]
    Tls(#[from] TlsFailure),
    #[error(transparent)]
    Redis(#[from] redis::RedisError),
}

/// The certificates of `tls` as redis-rs takes them; None when there are none.
fn certificates(tls: &RedisTls) -> Option<redis::TlsCertificates> {
    if tls.is_empty() {
        return None;
    }
    Some(redis::TlsCertificates {
        client_tls: tls
            .client
            .as_ref()
            .map(|(cert, key)| redis::ClientTlsConfig {
                client_cert: cert.pem().to_vec(),
                client_key: key.pem().to_vec(),
            }),
        root_cert: tls.ca.as_ref().map(|ca| ca.pem().to_vec()),
    })
}

/// A client for one server at `url` with the TLS files of `tls`. The one place a
/// `redis::Client` is built from the settings (the tests' direct connections use it too).
pub fn client_for(url: &str, tls: &RedisTls) -> redis::RedisResult<redis::Client> {
    match certificates(tls) {
        Some(certs) => redis::Client::build_with_tls(url, certs),
        None => redis::Client::open(url),
    }
}

/// A client for the server of `redis` (the first seed node of a cluster).
pub fn client(redis: &RedisSettings) -> redis::RedisResult<redis::Client> {
    let first = redis.url.split(',').next().unwrap_or_default().trim();
    client_for(first, &redis.tls)
}

/// A multiplexed connection to `client`'s server with this crate's timeouts, not redis-rs'
/// 500 ms default (which fails a busy server's answers and any blocking read longer than it).
pub async fn multiplexed(
    client: &redis::Client,
) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(RESPONSE_TIMEOUT));
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
}

/// redis-rs' default 500 ms response timeout fails healthy calls under load
/// (apalis-redis#76), so we set our own.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// One plain connection to `client`'s server, to tell a TLS refusal from a network failure:
/// the connection manager retries every failure for seconds, and a cluster client reports its
/// seed nodes' failures as words only.
async fn tls_refusal(client: &redis::Client) -> Option<TlsFailure> {
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(RESPONSE_TIMEOUT));
    let err = client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .err()?;
    let addr = client.get_connection_info().addr().to_string();
    TlsFailure::find(Server::Redis, &addr, &err)
}

impl Conn {
    /// Connects to the server (or, with `cluster`, the cluster) of `redis`, over TLS for a
    /// `rediss://` URL. A TLS refusal is returned at once, as [`ConnectError::Tls`].
    pub async fn connect(redis: &RedisSettings) -> Result<Self, ConnectError> {
        let uses_tls = redis.url.trim_start().starts_with("rediss://");
        if redis.cluster {
            let nodes: Vec<&str> = redis.url.split(',').map(str::trim).collect();
            let mut builder = redis::cluster::ClusterClient::builder(nodes)
                .response_timeout(RESPONSE_TIMEOUT)
                .connection_timeout(CONNECT_TIMEOUT);
            if let Some(certs) = certificates(&redis.tls) {
                builder = builder.certs(certs);
            }
            match builder.build()?.get_async_connection().await {
                Ok(conn) => Ok(Conn::Cluster(conn)),
                Err(e) if uses_tls => match tls_refusal(&client(redis)?).await {
                    Some(refusal) => Err(refusal.into()),
                    None => Err(e.into()),
                },
                Err(e) => Err(e.into()),
            }
        } else {
            let client = client(redis)?;
            if uses_tls && let Some(refusal) = tls_refusal(&client).await {
                return Err(refusal.into());
            }
            let config = ConnectionManagerConfig::new()
                .set_response_timeout(Some(RESPONSE_TIMEOUT))
                .set_connection_timeout(Some(CONNECT_TIMEOUT));
            Ok(Conn::Single(
                client.get_connection_manager_with_config(config).await?,
            ))
        }
    }
}

/// What kind of Redis failure an error is, as a bounded label: none of them is a job's fault, so
/// a job that meets one waits without spending an attempt (counted by this label).
pub fn error_kind(e: &redis::RedisError) -> &'static str {
    match e.code() {
        Some("OOM") => "oom",
        Some("READONLY") => "readonly",
        Some("LOADING") => "loading",
        Some("MASTERDOWN") => "masterdown",
        Some("CLUSTERDOWN" | "TRYAGAIN" | "MOVED" | "ASK") => "cluster",
        Some("BUSY") => "busy",
        _ if e.is_io_error()
            || e.is_timeout()
            || e.is_connection_dropped()
            || e.is_connection_refusal() =>
        {
            "connection"
        }
        _ => "other",
    }
}

/// Takes `key` as a lock held for `lease_ms` (one `SET NX PX`): true when this caller holds it
/// now. The holder deletes it when done; a holder that dies leaves it to expire.
pub async fn try_lock(conn: &mut Conn, key: &str, lease_ms: u64) -> redis::RedisResult<bool> {
    let got: Option<String> = redis::cmd("SET")
        .arg(key)
        .arg(uuid::Uuid::new_v4().to_string())
        .arg("NX")
        .arg("PX")
        .arg(lease_ms)
        .query_async(conn)
        .await?;
    Ok(got.is_some())
}
