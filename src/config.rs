//! Settings: one typed struct, loaded once from `AIQ_*` environment variables (systemd feeds them
//! through `EnvironmentFile=`), checked at start. A missing or malformed value stops start-up
//! with an error that names the variable. Nothing else in aiq reads the environment.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use crate::domain::{MicroUsd, Tier};
use crate::tls::PemFile;

/// The queue's settings are defined by the queue crate (`aiq_queue::settings`) and loaded here.
pub use aiq_queue::settings::{
    QueueSettings, RedisSettings, RedisTls, RetryPolicy, Scheduling, SecretUrl,
};

/// A secret (API key, password-bearing URL). It never prints.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// A setting that is missing or malformed. The message names the variable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("setting {name}: {problem}")]
pub struct ConfigError {
    pub name: &'static str,
    pub problem: String,
}

fn bad(name: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError {
        name,
        problem: problem.into(),
    }
}

/// Retries of a failed provider call inside one attempt, before the job goes back to the queue.
/// Printed by `aiq config`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallRetryPolicy {
    /// Extra calls after a retryable failure (0 turns in-call retries off).
    pub retries: u32,
    /// The ceiling of the first retry's delay; it doubles with each retry (full jitter).
    pub base: Duration,
    /// The longest wait inside a call, also for a provider's Retry-After. A longer wait is
    /// served in the queue's delayed set, where it holds no worker slot.
    pub cap: Duration,
}

/// The providers' circuit breakers and fleet-wide rates (used by `providers::breaker`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerSettings {
    /// Consecutive faults that open a breaker.
    pub failures: u32,
    /// How long an open breaker holds calls back.
    pub cooldown: Duration,
    /// Requests per minute per provider, fleet-wide, indexed like [`crate::domain::PROVIDERS`];
    /// 0: no limit.
    pub rpm: [u64; 4],
    /// Tokens per minute per provider (LLMs: the prompt bound plus max_tokens); 0: no limit.
    pub tpm: [u64; 4],
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderSettings {
    pub base_url: String,
    pub api_key: Option<Secret>,
    pub timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Text,
}

/// PostgreSQL: the URL (whose `sslmode`, `sslrootcert`, `sslcert` and `sslkey` parameters set
/// TLS) and a CA bundle for a URL that names none.
#[derive(Debug, Clone, PartialEq)]
pub struct DatabaseSettings {
    pub url: Secret,
    /// `AIQ_DATABASE_CA_FILE`: the root certificates when the URL has no `sslrootcert`.
    pub ca: Option<PemFile>,
}

/// What happens to a job whose call the budget refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnBudgetExceeded {
    /// Wait in the delayed set until the window that refused it resets.
    Defer,
    /// Fail for good (dead set) with the reason.
    Fail,
}

/// Money settings: limits, windows, alerts. Per-tier values are indexed like [`Tier::ALL`].
#[derive(Debug, Clone, PartialEq)]
pub struct BudgetSettings {
    /// Key prefix of the budget's Redis keys, all under the hash tag `{prefix}`.
    pub prefix: String,
    /// Day and month windows follow this time zone's calendar.
    pub timezone: chrono_tz::Tz,
    pub global_daily: MicroUsd,
    pub global_monthly: MicroUsd,
    /// Default per-organisation limits by tier; ai_cost_limits overrides them per organisation.
    pub org_daily: [MicroUsd; 6],
    pub org_monthly: [MicroUsd; 6],
    /// Jobs per minute per organisation by tier, across all processes; 0 means no limit.
    pub org_jobs_per_minute: [u32; 6],
    /// Per tier: the most jobs of one organisation one process runs at once (0: no cap), so one
    /// tenant's slow or hanging calls cannot take every slot (`AIQ_ORG_MAX_IN_FLIGHT`).
    pub org_max_in_flight: [u32; 6],
    pub on_exceeded: OnBudgetExceeded,
    /// Slack-compatible webhook for alerts.
    pub alert_webhook: Option<Secret>,
    /// An hour's spend above this multiple of the trailing hourly average is a spike.
    pub spike_multiple: f64,
    /// Spikes below this hourly spend are not worth an alert.
    pub spike_min: MicroUsd,
    /// A price catalog file to use instead of the built-in one.
    pub price_catalog: Option<std::path::PathBuf>,
    /// A budget hold lives this much longer than the provider timeout before the sweeper takes
    /// it as abandoned by a dead worker.
    pub hold_margin: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub database: DatabaseSettings,
    pub queue: QueueSettings,
    pub retry: RetryPolicy,
    pub call_retry: CallRetryPolicy,
    pub shutdown_grace: Duration,
    pub admin_addr: SocketAddr,
    pub log_format: LogFormat,
    pub vision: ProviderSettings,
    pub openai: ProviderSettings,
    pub anthropic: ProviderSettings,
    pub gemini: ProviderSettings,
    /// The longest provider answer aiq reads (`AIQ_MAX_RESPONSE_MB`): above it the call is
    /// `oversize`. Sized for the largest legitimate answer, a 16-image Vision batch with full
    /// text annotations.
    pub max_response_bytes: u64,
    /// How long `aiq run` and `aiq migrate` wait for Redis and PostgreSQL at start-up
    /// (`AIQ_STARTUP_WAIT_S`; see `startup`).
    pub startup_wait: Duration,
    /// How much of the provider answers being read or held one process keeps at once
    /// (`AIQ_RESPONSE_MEMORY_MB`); a call waits for room before it reads its body.
    pub response_memory_bytes: u64,
    pub budget: BudgetSettings,
    /// Sentry: job failures that end a job, and daemon errors. None: Sentry is off.
    pub sentry_dsn: Option<Secret>,
    pub sentry_environment: String,
    /// Whether Sentry events may carry what a job was asked (its payload: prompts, messages,
    /// image data). Off by default: events carry ids, tags and the failure only.
    pub sentry_send_payloads: bool,
    pub breaker: BreakerSettings,
}

/// Reads variables through `lookup`, so tests can load settings without touching the process
/// environment.
pub struct Env<F: Fn(&str) -> Option<String>>(pub F);

impl<F: Fn(&str) -> Option<String>> Env<F> {
    fn get(&self, name: &'static str) -> Option<String> {
        (self.0)(name).filter(|v| !v.trim().is_empty())
    }

    fn required(&self, name: &'static str, what: &str) -> Result<String, ConfigError> {
        self.get(name)
            .ok_or_else(|| bad(name, format!("is missing; set it to {what}")))
    }

    fn parse<T: std::str::FromStr>(
        &self,
        name: &'static str,
        default: T,
        what: &str,
    ) -> Result<T, ConfigError> {
        match self.get(name) {
            None => Ok(default),
            Some(v) => v
                .trim()
                .parse()
                .map_err(|_| bad(name, format!("{v:?} is not {what}"))),
        }
    }

    /// One of a fixed set of words; `default` when unset.
    fn choice<T: Copy>(
        &self,
        name: &'static str,
        default: T,
        options: &[(&str, T)],
    ) -> Result<T, ConfigError> {
        let Some(v) = self.get(name) else {
            return Ok(default);
        };
        options
            .iter()
            .find(|(word, _)| *word == v.trim())
            .map(|(_, t)| *t)
            .ok_or_else(|| {
                let words: Vec<&str> = options.iter().map(|(w, _)| *w).collect();
                bad(name, format!("{v:?} must be one of {}", words.join(", ")))
            })
    }

    /// `provider=N,...` for any of the four providers; unnamed ones get 0 (no limit).
    fn per_provider(&self, name: &'static str) -> Result<[u64; 4], ConfigError> {
        let mut out = [0u64; 4];
        let providers = crate::domain::PROVIDERS;
        for part in self
            .get(name)
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
        {
            let (p, n) = part
                .split_once('=')
                .ok_or_else(|| bad(name, format!("{part:?} must look like provider=number")))?;
            let i = providers
                .iter()
                .position(|x| *x == p.trim())
                .ok_or_else(|| {
                    bad(
                        name,
                        format!("unknown provider {p:?}: expected {}", providers.join(", ")),
                    )
                })?;
            out[i] = n
                .trim()
                .parse()
                .map_err(|_| bad(name, format!("{n:?} for {p} is not a whole number")))?;
        }
        Ok(out)
    }

    /// A Redis key prefix: the hash tag of a set of keys.
    fn prefix(&self, name: &'static str, default: &str) -> Result<String, ConfigError> {
        let prefix = self.get(name).unwrap_or_else(|| default.to_owned());
        let ok = !prefix.is_empty()
            && prefix.len() <= 64
            && prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_-.:".contains(c));
        if !ok {
            return Err(bad(
                name,
                format!("{prefix:?} must be 1-64 characters of letters, digits, _ - . :"),
            ));
        }
        Ok(prefix)
    }

    fn int_in(
        &self,
        name: &'static str,
        default: u64,
        range: std::ops::RangeInclusive<u64>,
    ) -> Result<u64, ConfigError> {
        let v: u64 = self.parse(name, default, "a whole number")?;
        if !range.contains(&v) {
            return Err(bad(
                name,
                format!("{v} is out of range {}..={}", range.start(), range.end()),
            ));
        }
        Ok(v)
    }

    fn millis(
        &self,
        name: &'static str,
        default: u64,
        range: std::ops::RangeInclusive<u64>,
    ) -> Result<Duration, ConfigError> {
        self.int_in(name, default, range).map(Duration::from_millis)
    }

    /// A PEM file named by `name`, read and checked by `read`; None when unset.
    fn pem_file(
        &self,
        name: &'static str,
        read: fn(&std::path::Path) -> Result<PemFile, String>,
    ) -> Result<Option<PemFile>, ConfigError> {
        match self.get(name) {
            None => Ok(None),
            Some(path) => read(std::path::Path::new(path.trim()))
                .map(Some)
                .map_err(|e| bad(name, e)),
        }
    }

    fn url(
        &self,
        name: &'static str,
        default: &str,
        schemes: &[&str],
    ) -> Result<String, ConfigError> {
        let v = self.get(name).unwrap_or_else(|| default.to_owned());
        check_url(name, &v, schemes)?;
        Ok(v.trim_end_matches('/').to_owned())
    }
}

/// `AIQ_STARTUP_WAIT_S` (0 to 86,400; an hour by default); also for `aiq migrate`, which loads
/// no other setting but the database's.
pub fn startup_wait<F: Fn(&str) -> Option<String>>(env: &Env<F>) -> Result<Duration, ConfigError> {
    Ok(Duration::from_secs(env.int_in(
        "AIQ_STARTUP_WAIT_S",
        crate::startup::DEFAULT_WAIT.as_secs(),
        0..=86_400,
    )?))
}

fn check_url(name: &'static str, v: &str, schemes: &[&str]) -> Result<(), ConfigError> {
    let ok = schemes
        .iter()
        .any(|s| v.starts_with(&format!("{s}://")) && v.len() > s.len() + 3);
    if ok {
        Ok(())
    } else {
        Err(bad(
            name,
            format!("must be a URL starting with {}://", schemes.join(":// or ")),
        ))
    }
}

pub const DEFAULT_TIER_WEIGHTS: [u32; 6] = [32, 16, 8, 4, 2, 1];
pub const DEFAULT_ORG_DAILY_USD: &str = "enterprise_plus=1000,enterprise=300,professional_agency=100,growth_team=30,solo_professional=10,trial=1";
pub const DEFAULT_ORG_MONTHLY_USD: &str = "enterprise_plus=20000,enterprise=6000,professional_agency=2000,growth_team=600,solo_professional=200,trial=5";
pub const DEFAULT_ORG_MAX_IN_FLIGHT: &str = "enterprise_plus=0,enterprise=0,professional_agency=0,growth_team=0,solo_professional=0,trial=0";
pub const DEFAULT_ORG_JOBS_PER_MINUTE: &str = "enterprise_plus=6000,enterprise=3000,professional_agency=1200,growth_team=600,solo_professional=120,trial=30";

/// Parses `tier=value,...` naming all six tiers.
fn per_tier<T>(
    name: &'static str,
    v: &str,
    parse: impl Fn(&str) -> Option<T>,
    what: &str,
) -> Result<[T; 6], ConfigError>
where
    T: Copy + Default,
{
    let mut out = [T::default(); 6];
    let mut seen = [false; 6];
    for part in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (tier, value) = part
            .split_once('=')
            .ok_or_else(|| bad(name, format!("{part:?} must look like tier=value")))?;
        let tier: Tier = tier
            .trim()
            .parse()
            .map_err(|e: crate::domain::UnknownTier| bad(name, e.to_string()))?;
        out[tier.index()] = parse(value.trim())
            .ok_or_else(|| bad(name, format!("{value:?} for {tier} is not {what}")))?;
        seen[tier.index()] = true;
    }
    if let Some(i) = seen.iter().position(|s| !s) {
        return Err(bad(
            name,
            format!(
                "must give a value for every tier; {} is missing",
                Tier::ALL[i]
            ),
        ));
    }
    Ok(out)
}

impl BudgetSettings {
    pub fn load<F: Fn(&str) -> Option<String>>(env: &Env<F>) -> Result<Self, ConfigError> {
        let usd = |name: &'static str, default: &str| {
            let v = env.get(name).unwrap_or_else(|| default.to_owned());
            MicroUsd::parse_usd(&v).map_err(|e| bad(name, e.to_string()))
        };
        let tiers_usd = |name: &'static str, default: &str| {
            let v = env.get(name).unwrap_or_else(|| default.to_owned());
            per_tier(name, &v, |s| MicroUsd::parse_usd(s).ok(), "a dollar amount")
        };
        let prefix = env.prefix("AIQ_BUDGET_PREFIX", "aiq-budget")?;
        let tz_name = env
            .get("AIQ_BUDGET_TIMEZONE")
            .unwrap_or_else(|| "UTC".into());
        let timezone: chrono_tz::Tz = tz_name.trim().parse().map_err(|_| {
            bad(
                "AIQ_BUDGET_TIMEZONE",
                format!("{tz_name:?} is not an IANA time zone like UTC or Europe/Berlin"),
            )
        })?;
        let on_exceeded = env.choice(
            "AIQ_BUDGET_EXCEEDED",
            OnBudgetExceeded::Defer,
            &[
                ("defer", OnBudgetExceeded::Defer),
                ("fail", OnBudgetExceeded::Fail),
            ],
        )?;
        let webhook = match env.get("AIQ_ALERT_WEBHOOK_URL") {
            Some(url) => {
                check_url("AIQ_ALERT_WEBHOOK_URL", &url, &["http", "https"])?;
                Some(Secret::new(url))
            }
            None => None,
        };
        let spike_multiple: f64 = env.parse("AIQ_SPIKE_MULTIPLE", 3.0, "a number like 3 or 2.5")?;
        if !(spike_multiple.is_finite() && spike_multiple > 1.0) {
            return Err(bad("AIQ_SPIKE_MULTIPLE", "must be a number above 1"));
        }
        // A whole number per tier, `tier=n,...` naming all six.
        let tier_counts = |name: &'static str, default: &str| {
            let v = env.get(name).unwrap_or_else(|| default.to_owned());
            per_tier(name, &v, |s| s.parse::<u32>().ok(), "a whole number")
        };
        Ok(BudgetSettings {
            prefix,
            timezone,
            global_daily: usd("AIQ_GLOBAL_DAILY_LIMIT_USD", "1000")?,
            global_monthly: usd("AIQ_GLOBAL_MONTHLY_LIMIT_USD", "25000")?,
            org_daily: tiers_usd("AIQ_ORG_DAILY_LIMIT_USD", DEFAULT_ORG_DAILY_USD)?,
            org_monthly: tiers_usd("AIQ_ORG_MONTHLY_LIMIT_USD", DEFAULT_ORG_MONTHLY_USD)?,
            org_jobs_per_minute: tier_counts(
                "AIQ_ORG_JOBS_PER_MINUTE",
                DEFAULT_ORG_JOBS_PER_MINUTE,
            )?,
            org_max_in_flight: tier_counts("AIQ_ORG_MAX_IN_FLIGHT", DEFAULT_ORG_MAX_IN_FLIGHT)?,
            on_exceeded,
            alert_webhook: webhook,
            spike_multiple,
            spike_min: usd("AIQ_SPIKE_MIN_USD", "1")?,
            price_catalog: env.get("AIQ_PRICE_CATALOG").map(std::path::PathBuf::from),
            hold_margin: env.millis("AIQ_BUDGET_HOLD_MARGIN_MS", 60_000, 500..=3_600_000)?,
        })
    }
}

fn parse_weights(name: &'static str, v: &str) -> Result<[u32; 6], ConfigError> {
    let parts: Vec<&str> = v.split(',').map(str::trim).collect();
    if parts.len() != 6 {
        return Err(bad(
            name,
            format!(
                "{v:?} must list six weights, highest tier first ({})",
                Tier::ALL.map(|t| t.as_str()).join(",")
            ),
        ));
    }
    let mut out = [0u32; 6];
    for (i, p) in parts.iter().enumerate() {
        out[i] = match p.parse::<u32>() {
            Ok(w) if (1..=1_000_000).contains(&w) => w,
            _ => {
                return Err(bad(
                    name,
                    format!("weight {p:?} must be a whole number from 1 to 1000000"),
                ));
            }
        };
    }
    Ok(out)
}

impl<F: Fn(&str) -> Option<String>> aiq_queue::settings::Load<RedisSettings> for Env<F> {
    type Error = ConfigError;

    /// `AIQ_REDIS_URL`, `AIQ_REDIS_CLUSTER` and the TLS files.
    fn load(env: &Self) -> Result<RedisSettings, ConfigError> {
        let url = env.required(
            "AIQ_REDIS_URL",
            "the Redis URL, e.g. redis://127.0.0.1:6379/",
        )?;
        let cluster = env.choice(
            "AIQ_REDIS_CLUSTER",
            false,
            &[("false", false), ("0", false), ("true", true), ("1", true)],
        )?;
        let urls: Vec<&str> = url.split(',').map(str::trim).collect();
        if urls.len() > 1 && !cluster {
            return Err(bad(
                "AIQ_REDIS_URL",
                "lists several nodes; set AIQ_REDIS_CLUSTER=true for a Redis Cluster, or give one URL",
            ));
        }
        for u in &urls {
            check_url(
                "AIQ_REDIS_URL",
                u,
                &["redis", "rediss", "unix", "redis+unix"],
            )?;
        }
        let tls_urls = urls.iter().filter(|u| u.starts_with("rediss://")).count();
        if tls_urls != 0 && tls_urls != urls.len() {
            return Err(bad(
                "AIQ_REDIS_URL",
                "mixes rediss:// and plain nodes; a cluster's seed nodes all use TLS or none does",
            ));
        }
        let ca = env.pem_file("AIQ_REDIS_CA_FILE", PemFile::certificates)?;
        let cert = env.pem_file("AIQ_REDIS_CLIENT_CERT_FILE", PemFile::certificates)?;
        let key = env.pem_file("AIQ_REDIS_CLIENT_KEY_FILE", PemFile::private_key)?;
        let client = match (cert, key) {
            (None, None) => None,
            (Some(cert), Some(key)) => {
                PemFile::check_key_pair(&cert, &key)
                    .map_err(|e| bad("AIQ_REDIS_CLIENT_KEY_FILE", e))?;
                Some((cert, key))
            }
            (Some(_), None) => {
                return Err(bad(
                    "AIQ_REDIS_CLIENT_KEY_FILE",
                    "is missing; AIQ_REDIS_CLIENT_CERT_FILE is set, and a client certificate needs its key",
                ));
            }
            (None, Some(_)) => {
                return Err(bad(
                    "AIQ_REDIS_CLIENT_CERT_FILE",
                    "is missing; AIQ_REDIS_CLIENT_KEY_FILE is set, and a client key needs its certificate",
                ));
            }
        };
        let tls = RedisTls { ca, client };
        if tls_urls == 0 && !tls.is_empty() {
            let name = if tls.ca.is_some() {
                "AIQ_REDIS_CA_FILE"
            } else {
                "AIQ_REDIS_CLIENT_CERT_FILE"
            };
            return Err(bad(
                name,
                "is set, but AIQ_REDIS_URL does not use TLS, so it would not be used; \
                 use a rediss:// URL (the server's TLS port) or unset it",
            ));
        }
        Ok(RedisSettings {
            url: SecretUrl::new(url),
            cluster,
            tls,
        })
    }
}

impl<F: Fn(&str) -> Option<String>> aiq_queue::settings::Load<QueueSettings> for Env<F> {
    type Error = ConfigError;

    /// Loads only what the queue needs (used by `aiq enqueue`, `aiq stats` and `run`).
    fn load(env: &Self) -> Result<QueueSettings, ConfigError> {
        let redis = RedisSettings::load(env)?;
        let prefix = env.prefix("AIQ_QUEUE_PREFIX", "aiq")?;
        let scheduling = env.choice(
            "AIQ_SCHEDULING",
            Scheduling::Fair,
            &[("fair", Scheduling::Fair), ("strict", Scheduling::Strict)],
        )?;
        let tier_weights = match env.get("AIQ_TIER_WEIGHTS") {
            None => DEFAULT_TIER_WEIGHTS,
            Some(v) => parse_weights("AIQ_TIER_WEIGHTS", &v)?,
        };
        Ok(QueueSettings {
            redis,
            prefix,
            concurrency: env.int_in("AIQ_CONCURRENCY", 16, 1..=50_000)? as usize,
            fetch_batch: env.int_in("AIQ_FETCH_BATCH", 32, 1..=1000)? as usize,
            poll_interval: env.millis("AIQ_POLL_INTERVAL_MS", 100, 1..=60_000)?,
            lease: env.millis("AIQ_LEASE_MS", 10_000, 1_000..=3_600_000)?,
            max_interrupts: env.int_in("AIQ_MAX_INTERRUPTS", 5, 1..=1000)? as u32,
            scheduling,
            tier_weights,
            dead_max_jobs: env.int_in("AIQ_DEAD_MAX_JOBS", 100_000, 1..=100_000_000)?,
            dead_max_bytes: env.int_in("AIQ_DEAD_MAX_MB", 256, 1..=1_048_576)? * 1024 * 1024,
            dead_max_age: Duration::from_secs(
                env.int_in("AIQ_DEAD_MAX_AGE_DAYS", 30, 1..=3650)? * 86_400,
            ),
            idempotency_ttl: Duration::from_secs(env.int_in(
                "AIQ_IDEMPOTENCY_TTL_S",
                86_400,
                1..=31_536_000,
            )?),
        })
    }
}

/// The names sqlx takes for a PostgreSQL URL's root certificate parameter.
const ROOT_CERT_PARAMS: [&str; 3] = ["sslrootcert", "ssl-root-cert", "ssl-ca"];

impl DatabaseSettings {
    /// `AIQ_DATABASE_URL` and `AIQ_DATABASE_CA_FILE` (all `aiq migrate` and the money commands
    /// need). The URL's TLS parameters are checked here, and the files they name read, so a
    /// typo stops start-up naming the setting instead of failing the first connection.
    pub fn load<F: Fn(&str) -> Option<String>>(env: &Env<F>) -> Result<Self, ConfigError> {
        const NAME: &str = "AIQ_DATABASE_URL";
        let v = env.required(
            NAME,
            "the PostgreSQL URL, e.g. postgres://aiq:secret@127.0.0.1:5432/aiq",
        )?;
        check_url(NAME, &v, &["postgres", "postgresql"])?;
        let params = url_params(&v);
        let param = |keys: &[&str]| {
            params
                .iter()
                .rev()
                .find(|(k, _)| keys.contains(&k.as_str()))
                .map(|(_, v)| v.clone())
        };
        let modes = [
            "disable",
            "allow",
            "prefer",
            "require",
            "verify-ca",
            "verify-full",
        ];
        let mode = param(&["sslmode", "ssl-mode"])
            .unwrap_or_else(|| "prefer".into())
            .to_ascii_lowercase();
        if !modes.contains(&mode.as_str()) {
            return Err(bad(
                NAME,
                format!("sslmode={mode:?} must be one of {}", modes.join(", ")),
            ));
        }
        let verifies = mode.starts_with("verify-");
        let root = param(&ROOT_CERT_PARAMS);
        if let Some(path) = &root {
            PemFile::certificates(std::path::Path::new(path))
                .map_err(|e| bad(NAME, format!("sslrootcert: {e}")))?;
            if !verifies {
                return Err(bad(
                    NAME,
                    format!(
                        "sslrootcert is set, but sslmode={mode} does not verify the server, so it would not be used; \
                         use sslmode=verify-full (or verify-ca)"
                    ),
                ));
            }
        }
        let cert = param(&["sslcert", "ssl-cert"]);
        let key = param(&["sslkey", "ssl-key"]);
        match (&cert, &key) {
            (Some(cert), Some(key)) => {
                let cert = PemFile::certificates(std::path::Path::new(cert))
                    .map_err(|e| bad(NAME, format!("sslcert: {e}")))?;
                let key = PemFile::private_key(std::path::Path::new(key))
                    .map_err(|e| bad(NAME, format!("sslkey: {e}")))?;
                PemFile::check_key_pair(&cert, &key)
                    .map_err(|e| bad(NAME, format!("sslkey: {e}")))?;
            }
            (None, None) => {}
            _ => {
                return Err(bad(
                    NAME,
                    "sslcert and sslkey go together: give both or neither",
                ));
            }
        }
        let ca = env.pem_file("AIQ_DATABASE_CA_FILE", PemFile::certificates)?;
        if ca.is_some() && !verifies {
            return Err(bad(
                "AIQ_DATABASE_CA_FILE",
                format!(
                    "is set, but AIQ_DATABASE_URL has sslmode={mode}, which does not verify the server, so it would not be used; \
                     add sslmode=verify-full (or verify-ca) to the URL"
                ),
            ));
        }
        Ok(Self {
            url: Secret::new(v),
            ca,
        })
    }

    /// The root certificates to add to the URL's options: `AIQ_DATABASE_CA_FILE`, unless the
    /// URL names its own `sslrootcert`, which wins.
    pub fn root_cert(&self) -> Option<&PemFile> {
        let in_url = url_params(self.url.expose())
            .iter()
            .any(|(k, _)| ROOT_CERT_PARAMS.contains(&k.as_str()));
        self.ca.as_ref().filter(|_| !in_url)
    }
}

/// The query parameters of a URL, decoded.
fn url_params(url: &str) -> Vec<(String, String)> {
    url::Url::parse(url)
        .map(|u| u.query_pairs().into_owned().collect())
        .unwrap_or_default()
}

impl Settings {
    /// Every setting's effective value by variable name, secrets masked (`aiq config`).
    pub fn effective(&self) -> Vec<(&'static str, String)> {
        let ms = |d: Duration| d.as_millis().to_string();
        let secret = |s: &Option<Secret>| {
            if s.is_some() {
                "***".to_owned()
            } else {
                String::new()
            }
        };
        let tiers = |v: &[MicroUsd; 6]| {
            Tier::ALL
                .iter()
                .zip(v)
                .map(|(t, m)| format!("{t}={}", m.as_usd_f64()))
                .collect::<Vec<_>>()
                .join(",")
        };
        let counts = |v: &[u32; 6]| {
            Tier::ALL
                .iter()
                .zip(v)
                .map(|(t, n)| format!("{t}={n}"))
                .collect::<Vec<_>>()
                .join(",")
        };
        let path = |f: Option<&PemFile>| {
            f.map(|f| f.path().display().to_string())
                .unwrap_or_default()
        };
        let q = &self.queue;
        let b = &self.budget;
        let per_provider = |v: &[u64; 4]| {
            crate::domain::PROVIDERS
                .iter()
                .zip(v)
                .map(|(p, n)| format!("{p}={n}"))
                .collect::<Vec<_>>()
                .join(",")
        };
        vec![
            ("AIQ_REDIS_URL", q.redis.url.to_string()),
            ("AIQ_REDIS_CLUSTER", q.redis.cluster.to_string()),
            ("AIQ_REDIS_CA_FILE", path(q.redis.tls.ca.as_ref())),
            (
                "AIQ_REDIS_CLIENT_CERT_FILE",
                path(q.redis.tls.client.as_ref().map(|(c, _)| c)),
            ),
            (
                "AIQ_REDIS_CLIENT_KEY_FILE",
                path(q.redis.tls.client.as_ref().map(|(_, k)| k)),
            ),
            (
                "AIQ_DATABASE_URL",
                crate::redact::url(self.database.url.expose()).into_owned(),
            ),
            ("AIQ_DATABASE_CA_FILE", path(self.database.ca.as_ref())),
            ("AIQ_QUEUE_PREFIX", q.prefix.clone()),
            ("AIQ_CONCURRENCY", q.concurrency.to_string()),
            ("AIQ_FETCH_BATCH", q.fetch_batch.to_string()),
            ("AIQ_POLL_INTERVAL_MS", ms(q.poll_interval)),
            ("AIQ_LEASE_MS", ms(q.lease)),
            ("AIQ_MAX_INTERRUPTS", q.max_interrupts.to_string()),
            (
                "AIQ_SCHEDULING",
                if q.scheduling == Scheduling::Fair {
                    "fair"
                } else {
                    "strict"
                }
                .into(),
            ),
            (
                "AIQ_TIER_WEIGHTS",
                q.tier_weights.map(|w| w.to_string()).join(","),
            ),
            ("AIQ_DEAD_MAX_JOBS", q.dead_max_jobs.to_string()),
            (
                "AIQ_DEAD_MAX_MB",
                (q.dead_max_bytes / (1024 * 1024)).to_string(),
            ),
            (
                "AIQ_DEAD_MAX_AGE_DAYS",
                (q.dead_max_age.as_secs() / 86_400).to_string(),
            ),
            (
                "AIQ_IDEMPOTENCY_TTL_S",
                q.idempotency_ttl.as_secs().to_string(),
            ),
            ("AIQ_MAX_ATTEMPTS", self.retry.max_attempts.to_string()),
            ("AIQ_RETRY_BASE_MS", ms(self.retry.base)),
            ("AIQ_RETRY_CAP_MS", ms(self.retry.cap)),
            ("AIQ_CALL_RETRIES", self.call_retry.retries.to_string()),
            ("AIQ_CALL_RETRY_BASE_MS", ms(self.call_retry.base)),
            ("AIQ_CALL_RETRY_CAP_MS", ms(self.call_retry.cap)),
            ("AIQ_SHUTDOWN_GRACE_MS", ms(self.shutdown_grace)),
            ("AIQ_ADMIN_ADDR", self.admin_addr.to_string()),
            (
                "AIQ_LOG_FORMAT",
                if self.log_format == LogFormat::Json {
                    "json"
                } else {
                    "text"
                }
                .into(),
            ),
            ("AIQ_VISION_BASE_URL", self.vision.base_url.clone()),
            ("AIQ_VISION_API_KEY", secret(&self.vision.api_key)),
            ("AIQ_VISION_TIMEOUT_MS", ms(self.vision.timeout)),
            ("AIQ_OPENAI_BASE_URL", self.openai.base_url.clone()),
            ("AIQ_OPENAI_API_KEY", secret(&self.openai.api_key)),
            ("AIQ_OPENAI_TIMEOUT_MS", ms(self.openai.timeout)),
            ("AIQ_ANTHROPIC_BASE_URL", self.anthropic.base_url.clone()),
            ("AIQ_ANTHROPIC_API_KEY", secret(&self.anthropic.api_key)),
            ("AIQ_ANTHROPIC_TIMEOUT_MS", ms(self.anthropic.timeout)),
            ("AIQ_GEMINI_BASE_URL", self.gemini.base_url.clone()),
            ("AIQ_GEMINI_API_KEY", secret(&self.gemini.api_key)),
            ("AIQ_GEMINI_TIMEOUT_MS", ms(self.gemini.timeout)),
            (
                "AIQ_STARTUP_WAIT_S",
                self.startup_wait.as_secs().to_string(),
            ),
            (
                "AIQ_MAX_RESPONSE_MB",
                (self.max_response_bytes / (1024 * 1024)).to_string(),
            ),
            (
                "AIQ_RESPONSE_MEMORY_MB",
                (self.response_memory_bytes / (1024 * 1024)).to_string(),
            ),
            ("AIQ_BUDGET_PREFIX", b.prefix.clone()),
            ("AIQ_BUDGET_TIMEZONE", b.timezone.name().into()),
            (
                "AIQ_GLOBAL_DAILY_LIMIT_USD",
                b.global_daily.as_usd_f64().to_string(),
            ),
            (
                "AIQ_GLOBAL_MONTHLY_LIMIT_USD",
                b.global_monthly.as_usd_f64().to_string(),
            ),
            ("AIQ_ORG_DAILY_LIMIT_USD", tiers(&b.org_daily)),
            ("AIQ_ORG_MONTHLY_LIMIT_USD", tiers(&b.org_monthly)),
            ("AIQ_ORG_JOBS_PER_MINUTE", counts(&b.org_jobs_per_minute)),
            ("AIQ_ORG_MAX_IN_FLIGHT", counts(&b.org_max_in_flight)),
            (
                "AIQ_BUDGET_EXCEEDED",
                if b.on_exceeded == OnBudgetExceeded::Defer {
                    "defer"
                } else {
                    "fail"
                }
                .into(),
            ),
            ("AIQ_BUDGET_HOLD_MARGIN_MS", ms(b.hold_margin)),
            ("AIQ_ALERT_WEBHOOK_URL", secret(&b.alert_webhook)),
            ("AIQ_SPIKE_MULTIPLE", b.spike_multiple.to_string()),
            ("AIQ_SPIKE_MIN_USD", b.spike_min.as_usd_f64().to_string()),
            (
                "AIQ_PRICE_CATALOG",
                b.price_catalog
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
            ),
            ("AIQ_BREAKER_FAILURES", self.breaker.failures.to_string()),
            ("AIQ_BREAKER_COOLDOWN_MS", ms(self.breaker.cooldown)),
            ("AIQ_PROVIDER_RPM", per_provider(&self.breaker.rpm)),
            ("AIQ_PROVIDER_TPM", per_provider(&self.breaker.tpm)),
            ("AIQ_SENTRY_DSN", secret(&self.sentry_dsn)),
            ("AIQ_SENTRY_ENVIRONMENT", self.sentry_environment.clone()),
            (
                "AIQ_SENTRY_SEND_PAYLOADS",
                self.sentry_send_payloads.to_string(),
            ),
        ]
    }

    /// Every secret value, for the scrubbers of Sentry events and log lines: neither may carry one.
    pub fn secrets(&self) -> Vec<String> {
        let mut out: Vec<String> = [
            &self.vision.api_key,
            &self.openai.api_key,
            &self.anthropic.api_key,
            &self.gemini.api_key,
            &self.budget.alert_webhook,
            &self.sentry_dsn,
        ]
        .into_iter()
        .flatten()
        .map(|s| s.expose().to_owned())
        .collect();
        // The passwords inside the database and Redis URLs, as written and decoded.
        out.extend(crate::redact::url_passwords(self.database.url.expose()));
        out.extend(crate::redact::url_passwords(&self.queue.redis.url));
        out
    }

    /// Loads every setting from the process environment.
    pub fn from_process_env() -> Result<Self, ConfigError> {
        Self::load(&Env(|k| std::env::var(k).ok()))
    }

    pub fn load<F: Fn(&str) -> Option<String>>(env: &Env<F>) -> Result<Self, ConfigError> {
        let database = DatabaseSettings::load(env)?;
        let queue = QueueSettings::load(env)?;
        let retry = RetryPolicy {
            max_attempts: env.int_in("AIQ_MAX_ATTEMPTS", 5, 1..=100)? as u32,
            base: env.millis("AIQ_RETRY_BASE_MS", 2_000, 1..=3_600_000)?,
            cap: env.millis("AIQ_RETRY_CAP_MS", 600_000, 1..=86_400_000)?,
        };
        if retry.cap < retry.base {
            return Err(bad(
                "AIQ_RETRY_CAP_MS",
                "must not be smaller than AIQ_RETRY_BASE_MS",
            ));
        }
        let call_retry = CallRetryPolicy {
            retries: env.int_in("AIQ_CALL_RETRIES", 2, 0..=10)? as u32,
            base: env.millis("AIQ_CALL_RETRY_BASE_MS", 250, 1..=60_000)?,
            cap: env.millis("AIQ_CALL_RETRY_CAP_MS", 5_000, 1..=300_000)?,
        };
        if call_retry.cap < call_retry.base {
            return Err(bad(
                "AIQ_CALL_RETRY_CAP_MS",
                "must not be smaller than AIQ_CALL_RETRY_BASE_MS",
            ));
        }
        let shutdown_grace = env.millis("AIQ_SHUTDOWN_GRACE_MS", 20_000, 0..=3_600_000)?;
        let admin_addr = env.parse(
            "AIQ_ADMIN_ADDR",
            SocketAddr::from(([127, 0, 0, 1], 9464)),
            "a socket address like 127.0.0.1:9464",
        )?;
        let auto = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            LogFormat::Text
        } else {
            LogFormat::Json
        };
        let log_format = env.choice(
            "AIQ_LOG_FORMAT",
            auto,
            &[
                ("auto", auto),
                ("json", LogFormat::Json),
                ("text", LogFormat::Text),
            ],
        )?;
        let provider = |url_name, default_url, key_name, timeout_name| {
            Ok::<_, ConfigError>(ProviderSettings {
                base_url: env.url(url_name, default_url, &["http", "https"])?,
                api_key: env.get(key_name).map(Secret::new),
                timeout: env.millis(timeout_name, 60_000, 100..=600_000)?,
            })
        };
        const MIB: u64 = 1024 * 1024;
        let max_response_bytes = env.int_in("AIQ_MAX_RESPONSE_MB", 64, 1..=1024)? * MIB;
        let response_memory_bytes = env.int_in("AIQ_RESPONSE_MEMORY_MB", 512, 1..=65_536)? * MIB;
        if response_memory_bytes < max_response_bytes {
            return Err(bad(
                "AIQ_RESPONSE_MEMORY_MB",
                "must not be smaller than AIQ_MAX_RESPONSE_MB (one answer must fit)",
            ));
        }
        Ok(Settings {
            database,
            queue,
            retry,
            call_retry,
            shutdown_grace,
            admin_addr,
            log_format,
            vision: provider(
                "AIQ_VISION_BASE_URL",
                "https://vision.googleapis.com",
                "AIQ_VISION_API_KEY",
                "AIQ_VISION_TIMEOUT_MS",
            )?,
            openai: provider(
                "AIQ_OPENAI_BASE_URL",
                "https://api.openai.com",
                "AIQ_OPENAI_API_KEY",
                "AIQ_OPENAI_TIMEOUT_MS",
            )?,
            anthropic: provider(
                "AIQ_ANTHROPIC_BASE_URL",
                "https://api.anthropic.com",
                "AIQ_ANTHROPIC_API_KEY",
                "AIQ_ANTHROPIC_TIMEOUT_MS",
            )?,
            gemini: provider(
                "AIQ_GEMINI_BASE_URL",
                "https://generativelanguage.googleapis.com",
                "AIQ_GEMINI_API_KEY",
                "AIQ_GEMINI_TIMEOUT_MS",
            )?,
            max_response_bytes,
            startup_wait: startup_wait(env)?,
            response_memory_bytes,
            budget: BudgetSettings::load(env)?,
            sentry_dsn: match env.get("AIQ_SENTRY_DSN") {
                Some(dsn) => {
                    check_url("AIQ_SENTRY_DSN", &dsn, &["http", "https"])?;
                    Some(Secret::new(dsn))
                }
                None => None,
            },
            sentry_environment: env
                .get("AIQ_SENTRY_ENVIRONMENT")
                .unwrap_or_else(|| "production".into()),
            sentry_send_payloads: env.choice(
                "AIQ_SENTRY_SEND_PAYLOADS",
                false,
                &[("false", false), ("0", false), ("true", true), ("1", true)],
            )?,
            breaker: BreakerSettings {
                failures: env.int_in("AIQ_BREAKER_FAILURES", 5, 1..=1000)? as u32,
                cooldown: env.millis("AIQ_BREAKER_COOLDOWN_MS", 30_000, 100..=3_600_000)?,
                rpm: env.per_provider("AIQ_PROVIDER_RPM")?,
                tpm: env.per_provider("AIQ_PROVIDER_TPM")?,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> Env<impl Fn(&str) -> Option<String>> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Env(move |k: &str| map.get(k).cloned())
    }

    const BASE: [(&str, &str); 2] = [
        ("AIQ_DATABASE_URL", "postgres://u@localhost/aiq"),
        ("AIQ_REDIS_URL", "redis://127.0.0.1:6379/"),
    ];

    #[test]
    fn a_missing_database_url_names_the_setting() {
        let err = Settings::load(&env(&[("AIQ_REDIS_URL", "redis://x/")])).unwrap_err();
        assert_eq!(err.name, "AIQ_DATABASE_URL");
        assert!(err.to_string().contains("AIQ_DATABASE_URL"));
    }

    #[test]
    fn defaults_apply_when_only_the_two_urls_are_set() {
        let s = Settings::load(&env(&BASE)).unwrap();
        assert_eq!(s.queue.concurrency, 16);
        assert_eq!(s.queue.tier_weights, DEFAULT_TIER_WEIGHTS);
        assert_eq!(s.queue.scheduling, Scheduling::Fair);
        assert_eq!(s.retry.max_attempts, 5);
        assert_eq!(s.vision.base_url, "https://vision.googleapis.com");
        assert!(s.openai.api_key.is_none());
        assert_eq!(s.budget.global_daily.micros(), 1_000_000_000);
        assert_eq!(s.budget.global_monthly.micros(), 25_000_000_000);
        assert_eq!(s.budget.org_daily[Tier::Trial.index()].micros(), 1_000_000);
        assert_eq!(s.budget.timezone, chrono_tz::UTC);
        assert_eq!(s.budget.on_exceeded, OnBudgetExceeded::Defer);
    }

    #[test]
    fn malformed_values_are_refused_with_their_name() {
        let cases = [
            ("AIQ_CONCURRENCY", "many"),
            ("AIQ_CONCURRENCY", "0"),
            ("AIQ_TIER_WEIGHTS", "1,2,3"),
            ("AIQ_TIER_WEIGHTS", "32,16,8,4,2,0"),
            ("AIQ_SCHEDULING", "random"),
            ("AIQ_REDIS_URL", "localhost:6379"),
            ("AIQ_OPENAI_BASE_URL", "ftp://example"),
            ("AIQ_ADMIN_ADDR", "nine"),
            ("AIQ_QUEUE_PREFIX", "a{b}"),
            ("AIQ_LOG_FORMAT", "xml"),
            ("AIQ_BUDGET_TIMEZONE", "Mars/Olympus"),
            ("AIQ_GLOBAL_DAILY_LIMIT_USD", "-5"),
            ("AIQ_ORG_DAILY_LIMIT_USD", "trial=1"),
            (
                "AIQ_ORG_MONTHLY_LIMIT_USD",
                "enterprise_plus=1,enterprise=1,professional_agency=1,growth_team=1,solo_professional=1,gold=1",
            ),
            ("AIQ_ORG_JOBS_PER_MINUTE", "enterprise_plus=x"),
            ("AIQ_BUDGET_EXCEEDED", "panic"),
            ("AIQ_ALERT_WEBHOOK_URL", "slack"),
            ("AIQ_SPIKE_MULTIPLE", "0.5"),
        ];
        for (name, value) in cases {
            let mut pairs = BASE.to_vec();
            pairs.retain(|(k, _)| *k != name);
            pairs.push((name, value));
            let err = Settings::load(&env(&pairs)).unwrap_err();
            assert_eq!(err.name, name, "{name}={value} gave {err}");
        }
    }

    #[test]
    fn the_effective_settings_list_every_variable_of_env_example_and_mask_secrets() {
        let mut pairs = BASE.to_vec();
        pairs.push(("AIQ_OPENAI_API_KEY", "sk-very-secret"));
        pairs.push(("AIQ_DATABASE_URL", "postgres://u:pg-pass@localhost/aiq"));
        let s = Settings::load(&env(&pairs)).unwrap();
        let eff = s.effective();
        let printed = format!("{eff:?}");
        assert!(!printed.contains("sk-very-secret") && !printed.contains("pg-pass"));
        let example = include_str!("../.env.example");
        let documented: Vec<&str> = example
            .lines()
            .filter_map(|l| l.split_once('=').map(|(k, _)| k.trim()))
            .filter(|k| k.starts_with("AIQ_"))
            .collect();
        for (name, _) in &eff {
            assert!(
                documented.contains(name),
                "{name} is missing from .env.example"
            );
        }
        for name in documented {
            assert!(
                eff.iter().any(|(n, _)| *n == name),
                "{name} in .env.example is not a setting"
            );
        }
    }

    /// Settings on top of [`BASE`], the setting their error must name, and words its problem
    /// must hold.
    type Refusal<'a> = (Vec<(&'a str, &'a str)>, &'a str, &'a str);

    /// `pairs` on top of [`BASE`], loaded.
    fn load_with(pairs: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let mut all = BASE.to_vec();
        for (k, v) in pairs {
            all.retain(|(n, _)| n != k);
            all.push((k, v));
        }
        Settings::load(&env(&all))
    }

    /// Each case's settings are refused, naming its setting and with its words.
    fn assert_refused(cases: Vec<Refusal>) {
        for (pairs, name, problem) in cases {
            let err = load_with(&pairs).unwrap_err();
            assert_eq!(err.name, name, "{pairs:?} gave {err}");
            assert!(err.problem.contains(problem), "{pairs:?} gave {err}");
        }
    }

    fn p(path: &std::path::Path) -> String {
        path.display().to_string()
    }

    #[test]
    fn tls_files_that_are_missing_or_not_pem_are_refused_naming_their_setting() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "hello\n").unwrap();
        let missing = p(&dir.path().join("missing.pem"));
        let junk = p(&junk);
        let rediss = ("AIQ_REDIS_URL", "rediss://127.0.0.1:6380/");
        let cases: Vec<Refusal> = vec![
            (
                vec![rediss, ("AIQ_REDIS_CA_FILE", &missing)],
                "AIQ_REDIS_CA_FILE",
                "cannot read",
            ),
            (
                vec![rediss, ("AIQ_REDIS_CA_FILE", &junk)],
                "AIQ_REDIS_CA_FILE",
                "no PEM certificate",
            ),
            (
                vec![
                    rediss,
                    ("AIQ_REDIS_CLIENT_CERT_FILE", &junk),
                    ("AIQ_REDIS_CLIENT_KEY_FILE", &junk),
                ],
                "AIQ_REDIS_CLIENT_CERT_FILE",
                "no PEM certificate",
            ),
            (
                vec![("AIQ_DATABASE_CA_FILE", &missing)],
                "AIQ_DATABASE_CA_FILE",
                "cannot read",
            ),
        ];
        assert_refused(cases);
        let url = format!("postgres://u@db/aiq?sslmode=verify-full&sslrootcert={missing}");
        let err = load_with(&[("AIQ_DATABASE_URL", &url)]).unwrap_err();
        assert_eq!(err.name, "AIQ_DATABASE_URL");
        assert!(err.problem.contains("sslrootcert: cannot read"), "{err}");
    }

    #[test]
    fn redis_tls_files_need_a_rediss_url_and_a_client_certificate_needs_its_own_key() {
        let pki = aiq_testkit::localsvc::TestPki::generate("config test CA").unwrap();
        let other = aiq_testkit::localsvc::TestPki::generate("another CA").unwrap();
        let (ca, cert, key) = (p(&pki.ca()), p(&pki.client_cert()), p(&pki.client_key()));
        let other_key = p(&other.client_key());
        let plain = ("AIQ_REDIS_URL", "redis://127.0.0.1:6379/");
        let rediss = ("AIQ_REDIS_URL", "rediss://127.0.0.1:6380/");
        let cases: Vec<Refusal> = vec![
            (
                vec![plain, ("AIQ_REDIS_CA_FILE", &ca)],
                "AIQ_REDIS_CA_FILE",
                "does not use TLS",
            ),
            (
                vec![
                    plain,
                    ("AIQ_REDIS_CLIENT_CERT_FILE", &cert),
                    ("AIQ_REDIS_CLIENT_KEY_FILE", &key),
                ],
                "AIQ_REDIS_CLIENT_CERT_FILE",
                "does not use TLS",
            ),
            (
                vec![rediss, ("AIQ_REDIS_CLIENT_CERT_FILE", &cert)],
                "AIQ_REDIS_CLIENT_KEY_FILE",
                "is missing",
            ),
            (
                vec![rediss, ("AIQ_REDIS_CLIENT_KEY_FILE", &key)],
                "AIQ_REDIS_CLIENT_CERT_FILE",
                "is missing",
            ),
            (
                vec![
                    rediss,
                    ("AIQ_REDIS_CLIENT_CERT_FILE", &cert),
                    ("AIQ_REDIS_CLIENT_KEY_FILE", &other_key),
                ],
                "AIQ_REDIS_CLIENT_KEY_FILE",
                "is not the key",
            ),
            (
                vec![
                    ("AIQ_REDIS_URL", "rediss://a:1/,redis://b:2/"),
                    ("AIQ_REDIS_CLUSTER", "true"),
                ],
                "AIQ_REDIS_URL",
                "mixes",
            ),
        ];
        assert_refused(cases);
        let s = load_with(&[
            rediss,
            ("AIQ_REDIS_CA_FILE", &ca),
            ("AIQ_REDIS_CLIENT_CERT_FILE", &cert),
            ("AIQ_REDIS_CLIENT_KEY_FILE", &key),
        ])
        .unwrap();
        assert!(s.queue.redis.tls.ca.is_some() && s.queue.redis.tls.client.is_some());
        let eff = s.effective();
        let get = |n: &str| eff.iter().find(|(k, _)| *k == n).unwrap().1.clone();
        assert_eq!(get("AIQ_REDIS_CA_FILE"), ca);
        assert_eq!(get("AIQ_REDIS_CLIENT_KEY_FILE"), key);
        // The key's path prints; its contents never do.
        assert!(!format!("{s:?}").contains("PRIVATE KEY"));
    }

    #[test]
    fn postgresql_tls_parameters_are_checked_and_the_ca_setting_fills_in_for_the_url() {
        let pki = aiq_testkit::localsvc::TestPki::generate("config test CA").unwrap();
        let ca = p(&pki.ca());
        let url = |q: &str| format!("postgres://u:pw@db.example:5432/aiq?{q}");
        let refused = [
            (
                url("sslmode=sometimes"),
                vec![],
                "AIQ_DATABASE_URL",
                "sslmode",
            ),
            (
                url(&format!("sslmode=require&sslrootcert={ca}")),
                vec![],
                "AIQ_DATABASE_URL",
                "would not be used",
            ),
            (
                url(&format!("sslcert={ca}")),
                vec![],
                "AIQ_DATABASE_URL",
                "go together",
            ),
            (
                url("sslmode=require"),
                vec![("AIQ_DATABASE_CA_FILE", ca.as_str())],
                "AIQ_DATABASE_CA_FILE",
                "would not be used",
            ),
            (
                "postgres://u@db/aiq".to_owned(),
                vec![("AIQ_DATABASE_CA_FILE", ca.as_str())],
                "AIQ_DATABASE_CA_FILE",
                "sslmode=prefer",
            ),
        ];
        for (u, mut extra, name, problem) in refused {
            extra.push(("AIQ_DATABASE_URL", &u));
            let err = load_with(&extra).unwrap_err();
            assert_eq!(err.name, name, "{u} gave {err}");
            assert!(err.problem.contains(problem), "{u} gave {err}");
            assert!(
                !err.to_string().contains("pw@"),
                "the password never prints"
            );
        }
        // The setting is the root certificate of a URL that names none...
        let verify = url("sslmode=verify-full");
        let s = load_with(&[("AIQ_DATABASE_URL", &verify), ("AIQ_DATABASE_CA_FILE", &ca)]).unwrap();
        assert_eq!(
            s.database.root_cert().map(|f| p(f.path())),
            Some(ca.clone())
        );
        let eff = s.effective();
        assert!(eff.contains(&("AIQ_DATABASE_CA_FILE", ca.clone())));
        // ...and the URL's own sslrootcert wins.
        let own = url(&format!("sslmode=VERIFY-CA&sslrootcert={ca}"));
        let s = load_with(&[("AIQ_DATABASE_URL", &own), ("AIQ_DATABASE_CA_FILE", &ca)]).unwrap();
        assert!(s.database.root_cert().is_none());
    }

    #[test]
    fn the_passwords_of_both_urls_are_masked_in_the_effective_settings_and_known_as_secrets() {
        let s = Settings::load(&env(&[
            (
                "AIQ_DATABASE_URL",
                "postgres://aiq:pg-secret@db.internal/aiq?password=pg-secret2",
            ),
            (
                "AIQ_REDIS_URL",
                "redis://:redis-secret@r1:7000,redis://u:redis%40two@r2:7001",
            ),
            ("AIQ_REDIS_CLUSTER", "true"),
        ]))
        .unwrap();
        let eff: HashMap<&str, String> = s.effective().into_iter().collect();
        assert_eq!(
            eff["AIQ_DATABASE_URL"],
            "postgres://aiq:***@db.internal/aiq?password=***"
        );
        assert_eq!(
            eff["AIQ_REDIS_URL"],
            "redis://:***@r1:7000,redis://u:***@r2:7001"
        );
        let printed = format!("{eff:?} {s:?}");
        for pw in ["pg-secret", "redis-secret", "redis%40two", "redis@two"] {
            assert!(!printed.contains(pw), "{pw} in {printed}");
            assert!(s.secrets().iter().any(|x| x == pw), "{pw} not a secret");
        }
        // The whole URL still connects.
        assert!(s.queue.redis.url.contains(":redis-secret@r1"));
    }

    #[test]
    fn sentry_payloads_are_off_unless_turned_on() {
        assert!(!Settings::load(&env(&BASE)).unwrap().sentry_send_payloads);
        let mut pairs = BASE.to_vec();
        pairs.push(("AIQ_SENTRY_SEND_PAYLOADS", "true"));
        assert!(Settings::load(&env(&pairs)).unwrap().sentry_send_payloads);
        pairs.pop();
        pairs.push(("AIQ_SENTRY_SEND_PAYLOADS", "yes please"));
        let err = Settings::load(&env(&pairs)).unwrap_err();
        assert_eq!(err.name, "AIQ_SENTRY_SEND_PAYLOADS");
    }

    #[test]
    fn secrets_never_print() {
        let mut pairs = BASE.to_vec();
        pairs.push(("AIQ_OPENAI_API_KEY", "sk-very-secret"));
        let s = Settings::load(&env(&pairs)).unwrap();
        let printed = format!("{s:?}");
        assert!(!printed.contains("sk-very-secret"));
        assert!(!printed.contains("postgres://u@localhost"));
    }

    #[test]
    fn retry_delays_grow_and_stop_at_the_cap() {
        let p = RetryPolicy {
            max_attempts: 5,
            base: Duration::from_secs(2),
            cap: Duration::from_secs(10),
        };
        assert_eq!(p.delay(1, 0.999_999).as_millis(), 1999);
        assert_eq!(p.delay(2, 0.999_999).as_millis(), 3999);
        assert_eq!(p.delay(9, 0.999_999).as_millis(), 9999);
        assert_eq!(p.delay(3, 0.0), Duration::from_millis(1));
    }
}
