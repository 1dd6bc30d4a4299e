//! One Redis connection type for the queue and the budget: a single server or a Redis Cluster,
//! multiplexed and reconnecting either way.

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};

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

impl Conn {
    /// Connects to `url` (with `cluster`, a comma-separated list of seed nodes).
    pub async fn connect(url: &str, cluster: bool) -> redis::RedisResult<Self> {
        // redis-rs' default 500 ms response timeout fails healthy calls under load
        // (apalis-redis#76), so set our own.
        let (response, connect) = (Duration::from_secs(10), Duration::from_secs(5));
        if cluster {
            let nodes: Vec<&str> = url.split(',').map(str::trim).collect();
            let client = redis::cluster::ClusterClient::builder(nodes)
                .response_timeout(response)
                .connection_timeout(connect)
                .build()?;
            Ok(Conn::Cluster(client.get_async_connection().await?))
        } else {
            let client = redis::Client::open(url)?;
            let config = ConnectionManagerConfig::new()
                .set_response_timeout(Some(response))
                .set_connection_timeout(Some(connect));
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
