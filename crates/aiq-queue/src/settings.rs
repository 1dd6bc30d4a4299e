//! The queue's settings: what the Redis backend needs, where Redis is and how to reach it, and
//! the retry policy of failed jobs. The queue only defines them; the daemon loads them (aiq's
//! `config` reads `AIQ_*` and re-exports these types), through [`Load`], so
//! `QueueSettings::load(&env)` reads the same as any other setting's load.

use std::fmt;
use std::time::Duration;

use crate::tls::PemFile;

/// Loads `T` from `Self`: the daemon implements it for its source of settings (aiq's
/// `config::Env`), and `QueueSettings::load(&source)` and `RedisSettings::load(&source)` call it.
pub trait Load<T> {
    type Error;
    fn load(source: &Self) -> Result<T, Self::Error>;
}

/// A URL that may carry a password (`AIQ_REDIS_URL`): it prints, with Debug and Display, with
/// the password masked ([`crate::redact::url`]), and dereferences to the whole URL for the one
/// thing that needs it, connecting.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretUrl(String);

impl SecretUrl {
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }
}

impl std::ops::Deref for SecretUrl {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&crate::redact::url(&self.0))
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", crate::redact::url(&self.0))
    }
}

/// How the fetch script chooses between tiers that have work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheduling {
    /// Each backlogged tier gets capacity in proportion to its weight.
    Fair,
    /// The highest tier with work always goes first (BullMQ-like; lower tiers can starve).
    Strict,
}

/// When and how often a failed job is tried again. Printed by `aiq config`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Executions a job gets before it goes to the dead set (the first run counts).
    pub max_attempts: u32,
    /// The delay before the first retry; it doubles with each failure.
    pub base: Duration,
    /// No retry waits longer than this.
    pub cap: Duration,
}

impl RetryPolicy {
    /// The delay before retry number `failures` (1 for the first), with full jitter:
    /// uniform in [0, min(cap, base * 2^(failures-1))]. `jitter` is in [0, 1).
    pub fn delay(&self, failures: u32, jitter: f64) -> Duration {
        let exp = failures.saturating_sub(1).min(30);
        let ceiling = self
            .base
            .saturating_mul(1u32 << exp)
            .min(self.cap)
            .max(Duration::from_millis(1));
        ceiling
            .mul_f64(jitter.clamp(0.0, 1.0))
            .max(Duration::from_millis(1))
    }
}

/// Where Redis is and how to reach it. Every Redis connection of aiq (the queue's, the budget's,
/// the breakers', the command line's) is opened with these, through `redis_conn`.
#[derive(Debug, Clone, PartialEq)]
pub struct RedisSettings {
    /// One URL, or with `cluster` several seed nodes separated by commas. Printed masked.
    pub url: SecretUrl,
    /// Talk to a Redis Cluster (the queue's keys share one hash tag, so one slot).
    pub cluster: bool,
    pub tls: RedisTls,
}

/// Certificates for a `rediss://` URL, read and checked when the settings load. Without any,
/// a `rediss://` URL verifies the server against the system's roots.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RedisTls {
    /// The CA bundle that verifies the server, in place of the system's roots.
    pub ca: Option<PemFile>,
    /// A certificate and its key, for a server that asks clients for one (mutual TLS).
    pub client: Option<(PemFile, PemFile)>,
}

impl RedisTls {
    pub fn is_empty(&self) -> bool {
        self.ca.is_none() && self.client.is_none()
    }
}

impl RedisSettings {
    /// The settings as `source` loads them (aiq: `config::Env`, from `AIQ_*`).
    pub fn load<S: Load<Self>>(source: &S) -> Result<Self, S::Error> {
        S::load(source)
    }
}

/// The queue's settings: everything the Redis backend needs.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueSettings {
    pub redis: RedisSettings,
    /// Key prefix; every key of the queue lives under the hash tag `{prefix}`.
    pub prefix: String,
    pub concurrency: usize,
    pub fetch_batch: usize,
    pub poll_interval: Duration,
    pub lease: Duration,
    /// A job whose lease expired this many times (its worker died each time) goes to the dead set.
    pub max_interrupts: u32,
    pub scheduling: Scheduling,
    /// Weights of the six tiers, highest tier first.
    pub tier_weights: [u32; 6],
    /// Per tier, highest first: the most jobs of one organisation leased at once across the
    /// fleet (0: no cap), unless `{p}:org_limits` holds the organisation's own.
    pub org_max_in_flight: [u32; 6],
    pub dead_max_jobs: u64,
    /// Payload bytes the dead set may keep; the oldest dead jobs beyond it are dropped.
    pub dead_max_bytes: u64,
    pub dead_max_age: Duration,
    pub idempotency_ttl: Duration,
    /// The job events stream and the finished jobs' outcomes (written into `{p}:config`).
    pub events: EventSettings,
}

/// What the scripts read from `{p}:config`: whether they append job events to `{p}:events`, how
/// the stream is bounded, and how long finished jobs' outcomes are kept (`{p}:outcome:<id>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventSettings {
    pub on: bool,
    /// The stream is trimmed to about this many entries (`MAXLEN ~`).
    pub max_len: u64,
    /// Entries older than this are trimmed (`MINID ~`).
    pub max_age: Duration,
    /// Outcomes older than this are dropped, oldest first, a bounded number per script call.
    pub outcomes_max_age: Duration,
    /// At most this many outcomes are kept.
    pub outcomes_max_jobs: u64,
}

impl Default for EventSettings {
    /// The scripts' own defaults when `{p}:config` is missing.
    fn default() -> Self {
        Self {
            on: true,
            max_len: 1_000_000,
            max_age: Duration::from_secs(86_400),
            outcomes_max_age: Duration::from_secs(86_400),
            outcomes_max_jobs: 100_000,
        }
    }
}

impl QueueSettings {
    /// The settings as `source` loads them (aiq: `config::Env`, from `AIQ_*`).
    pub fn load<S: Load<Self>>(source: &S) -> Result<Self, S::Error> {
        S::load(source)
    }
}
