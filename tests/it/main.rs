//! Integration tests, one binary. The harness starts one real redis-server and one real
//! PostgreSQL for the whole run (own ports, own data folders, stopped when the run ends); each
//! test gets its own database, queue prefix and fake provider server, so tests run in parallel.

mod harness;
mod money;
mod operate;
mod org_data;
mod outcomes;

mod answers;
mod binary;
mod boundary;
mod browser;
mod chaos;
mod clients;
mod cluster;
mod console;
mod console_browser;
mod crash;
mod enqueue_props;
mod exposure;
mod fairness;
mod org_limits;
mod pipeline;
mod providers;
mod queue;
mod retention;
mod retries;
mod spend_sums;
mod tenants;
mod tls;
mod webhooks;
