//! aiq: a daemon that runs paid AI jobs from Redis by subscription tier, calls Google Vision or an
//! LLM, and records results, costs and errors in PostgreSQL. ARCHITECTURE.md has the map.

pub mod budget;
pub mod cli;
pub mod config;
pub mod console;
pub mod domain;
pub mod http;
pub mod jobs;
pub mod limits;
pub mod observe;
pub mod org_data;
pub mod providers;
pub mod queue;
pub mod redact;
pub mod retention;
pub mod startup;
pub mod store;
pub mod systemd;
pub mod telemetry;
pub mod tls;
pub mod webhooks;
pub mod worker;

/// The one Redis connection type lives with the queue engine (`aiq_queue::conn`).
pub use aiq_queue::conn as redis_conn;
