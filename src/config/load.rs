//! The load functions: each reads its settings from the [table](super::table) (which parses
//! and checks each one, naming it when it refuses), puts them into its struct, and checks the
//! settings that depend on each other.

use std::time::Duration;

use super::{BreakerSettings, BudgetSettings, CallRetryPolicy, DatabaseSettings, LogFormat};
use super::{ConfigError, ConsoleRole, ConsoleSettings, CookieSecure, Env, Secret, SecretUrl, bad};
use super::{OnBudgetExceeded, ProviderSettings, QueueSettings, RedisSettings, RedisTls};
use super::{RetentionSettings, RetryPolicy, Scheduling, Settings, WebhookSettings};
use crate::tls::PemFile;

/// `AIQ_STARTUP_WAIT_S` (0 to 86,400; an hour by default); also for `aiq migrate`, which loads
/// no other setting but the database's.
pub fn startup_wait<F: Fn(&str) -> Option<String>>(env: &Env<F>) -> Result<Duration, ConfigError> {
    Ok(Duration::from_secs(env.value("AIQ_STARTUP_WAIT_S")?.int()))
}

impl<F: Fn(&str) -> Option<String>> aiq_queue::settings::Load<RedisSettings> for Env<F> {
    type Error = ConfigError;

    /// `AIQ_REDIS_URL`, `AIQ_REDIS_CLUSTER` and the TLS files.
    fn load(env: &Env<F>) -> Result<RedisSettings, ConfigError> {
        let url = env
            .value("AIQ_REDIS_URL")?
            .text()
            .expect("a required setting");
        let cluster = env.value("AIQ_REDIS_CLUSTER")?.flag();
        if url.contains(',') && !cluster {
            return Err(bad(
                "AIQ_REDIS_URL",
                "lists several nodes; set AIQ_REDIS_CLUSTER=true for a Redis Cluster, or give one URL",
            ));
        }
        let ca = env.value("AIQ_REDIS_CA_FILE")?.pem();
        let cert = env.value("AIQ_REDIS_CLIENT_CERT_FILE")?.pem();
        let key = env.value("AIQ_REDIS_CLIENT_KEY_FILE")?.pem();
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
        // The table checked that the nodes all use TLS or none does.
        let uses_tls = url.trim_start().starts_with("rediss://");
        if !uses_tls && !tls.is_empty() {
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
    fn load(env: &Env<F>) -> Result<QueueSettings, ConfigError> {
        let redis = RedisSettings::load(env)?;
        let int = |name| env.value(name).map(|v| v.int());
        let text = |name| env.value(name).map(|v| v.text().expect("a default"));
        let prefix = text("AIQ_QUEUE_PREFIX")?;
        let scheduling = match env.value("AIQ_SCHEDULING")?.word() {
            "strict" => Scheduling::Strict,
            _ => Scheduling::Fair,
        };
        let tier_weights = env.value("AIQ_TIER_WEIGHTS")?.weights();
        Ok(QueueSettings {
            redis,
            prefix,
            concurrency: int("AIQ_CONCURRENCY")? as usize,
            fetch_batch: int("AIQ_FETCH_BATCH")? as usize,
            poll_interval: env.value("AIQ_POLL_INTERVAL_MS")?.millis(),
            lease: env.value("AIQ_LEASE_MS")?.millis(),
            max_interrupts: int("AIQ_MAX_INTERRUPTS")? as u32,
            scheduling,
            tier_weights,
            org_max_in_flight: env.value("AIQ_ORG_MAX_IN_FLIGHT")?.tier_count(),
            dead_max_jobs: int("AIQ_DEAD_MAX_JOBS")?,
            dead_max_bytes: int("AIQ_DEAD_MAX_MB")? * 1024 * 1024,
            dead_max_age: Duration::from_secs(int("AIQ_DEAD_MAX_AGE_DAYS")? * 86_400),
            idempotency_ttl: Duration::from_secs(int("AIQ_IDEMPOTENCY_TTL_S")?),
            events: aiq_queue::settings::EventSettings {
                on: env.value("AIQ_EVENTS")?.word() == "on",
                max_len: int("AIQ_EVENTS_MAX_LEN")?,
                max_age: Duration::from_secs(int("AIQ_EVENTS_MAX_AGE_S")?),
                outcomes_max_age: Duration::from_secs(int("AIQ_OUTCOMES_MAX_AGE_S")?),
                outcomes_max_jobs: int("AIQ_OUTCOMES_MAX_JOBS")?,
            },
        })
    }
}

impl BudgetSettings {
    pub fn load<F: Fn(&str) -> Option<String>>(env: &Env<F>) -> Result<Self, ConfigError> {
        let prefix = env.value("AIQ_BUDGET_PREFIX")?.text().expect("a default");
        let timezone = env.value("AIQ_BUDGET_TIMEZONE")?.time_zone();
        let on_exceeded = match env.value("AIQ_BUDGET_EXCEEDED")?.word() {
            "fail" => OnBudgetExceeded::Fail,
            _ => OnBudgetExceeded::Defer,
        };
        let alert_webhook = env.value("AIQ_ALERT_WEBHOOK_URL")?.text().map(Secret::new);
        let spike_multiple = env.value("AIQ_SPIKE_MULTIPLE")?.number();
        let counts = |name| env.value(name).map(|v| v.tier_count());
        Ok(BudgetSettings {
            prefix,
            timezone,
            global_daily: env.value("AIQ_GLOBAL_DAILY_LIMIT_USD")?.usd(),
            global_monthly: env.value("AIQ_GLOBAL_MONTHLY_LIMIT_USD")?.usd(),
            org_daily: env.value("AIQ_ORG_DAILY_LIMIT_USD")?.tier_usd(),
            org_monthly: env.value("AIQ_ORG_MONTHLY_LIMIT_USD")?.tier_usd(),
            org_jobs_per_minute: counts("AIQ_ORG_JOBS_PER_MINUTE")?,
            on_exceeded,
            alert_webhook,
            spike_multiple,
            spike_min: env.value("AIQ_SPIKE_MIN_USD")?.usd(),
            price_catalog: env
                .value("AIQ_PRICE_CATALOG")?
                .text()
                .map(std::path::PathBuf::from),
            hold_margin: env.value("AIQ_BUDGET_HOLD_MARGIN_MS")?.millis(),
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
        let v = env.value(NAME)?.text().expect("a required setting");
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
        let ca = env.value("AIQ_DATABASE_CA_FILE")?.pem();
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
    pub fn load<F: Fn(&str) -> Option<String>>(env: &Env<F>) -> Result<Self, ConfigError> {
        let database = DatabaseSettings::load(env)?;
        let queue = QueueSettings::load(env)?;
        let int = |name| env.value(name).map(|v| v.int());
        let millis = |name| env.value(name).map(|v| v.millis());
        let retry = RetryPolicy {
            max_attempts: int("AIQ_MAX_ATTEMPTS")? as u32,
            base: millis("AIQ_RETRY_BASE_MS")?,
            cap: millis("AIQ_RETRY_CAP_MS")?,
        };
        if retry.cap < retry.base {
            return Err(bad(
                "AIQ_RETRY_CAP_MS",
                "must not be smaller than AIQ_RETRY_BASE_MS",
            ));
        }
        let call_retry = CallRetryPolicy {
            retries: int("AIQ_CALL_RETRIES")? as u32,
            base: millis("AIQ_CALL_RETRY_BASE_MS")?,
            cap: millis("AIQ_CALL_RETRY_CAP_MS")?,
        };
        if call_retry.cap < call_retry.base {
            return Err(bad(
                "AIQ_CALL_RETRY_CAP_MS",
                "must not be smaller than AIQ_CALL_RETRY_BASE_MS",
            ));
        }
        let shutdown_grace = millis("AIQ_SHUTDOWN_GRACE_MS")?;
        let admin_addr = env.value("AIQ_ADMIN_ADDR")?.addr();
        let mut console_tokens = Vec::new();
        for (name, role) in [
            ("AIQ_CONSOLE_OPERATOR_TOKENS", ConsoleRole::Operator),
            ("AIQ_CONSOLE_VIEWER_TOKENS", ConsoleRole::Viewer),
        ] {
            if let Some(text) = env.value(name)?.text() {
                console_tokens.extend(ConsoleSettings::parse_tokens(name, role, &text)?);
            }
        }
        if console_tokens.is_empty() && !admin_addr.ip().is_loopback() {
            return Err(bad(
                "AIQ_CONSOLE_OPERATOR_TOKENS",
                format!(
                    "the admin port {admin_addr} is not loopback: set console tokens \
                     (AIQ_CONSOLE_OPERATOR_TOKENS or AIQ_CONSOLE_VIEWER_TOKENS) so its console \
                     is not open to anyone"
                ),
            ));
        }
        let console = ConsoleSettings {
            tokens: console_tokens,
            session: Duration::from_secs(int("AIQ_CONSOLE_SESSION_H")? * 3600),
            cookie_secure: match env.value("AIQ_CONSOLE_COOKIE_SECURE")?.word() {
                "always" => CookieSecure::Always,
                "never" => CookieSecure::Never,
                _ => CookieSecure::Auto,
            },
        };
        let log_format = match env.value("AIQ_LOG_FORMAT")?.word() {
            "json" => LogFormat::Json,
            "text" => LogFormat::Text,
            _ if std::io::IsTerminal::is_terminal(&std::io::stderr()) => LogFormat::Text,
            _ => LogFormat::Json,
        };
        let provider = |url_name, key_name, timeout_name| {
            Ok::<_, ConfigError>(ProviderSettings {
                base_url: env.value(url_name)?.text().expect("a default"),
                api_key: env.value(key_name)?.text().map(Secret::new),
                timeout: millis(timeout_name)?,
            })
        };
        const MIB: u64 = 1024 * 1024;
        let max_response_bytes = int("AIQ_MAX_RESPONSE_MB")? * MIB;
        let response_memory_bytes = int("AIQ_RESPONSE_MEMORY_MB")? * MIB;
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
            console,
            log_format,
            vision: provider(
                "AIQ_VISION_BASE_URL",
                "AIQ_VISION_API_KEY",
                "AIQ_VISION_TIMEOUT_MS",
            )?,
            openai: provider(
                "AIQ_OPENAI_BASE_URL",
                "AIQ_OPENAI_API_KEY",
                "AIQ_OPENAI_TIMEOUT_MS",
            )?,
            anthropic: provider(
                "AIQ_ANTHROPIC_BASE_URL",
                "AIQ_ANTHROPIC_API_KEY",
                "AIQ_ANTHROPIC_TIMEOUT_MS",
            )?,
            gemini: provider(
                "AIQ_GEMINI_BASE_URL",
                "AIQ_GEMINI_API_KEY",
                "AIQ_GEMINI_TIMEOUT_MS",
            )?,
            max_response_bytes,
            startup_wait: startup_wait(env)?,
            response_memory_bytes,
            budget: BudgetSettings::load(env)?,
            sentry_dsn: env.value("AIQ_SENTRY_DSN")?.text().map(Secret::new),
            sentry_environment: env
                .value("AIQ_SENTRY_ENVIRONMENT")?
                .text()
                .expect("a default"),
            sentry_send_payloads: env.value("AIQ_SENTRY_SEND_PAYLOADS")?.flag(),
            breaker: BreakerSettings {
                failures: int("AIQ_BREAKER_FAILURES")? as u32,
                cooldown: millis("AIQ_BREAKER_COOLDOWN_MS")?,
                rpm: env.value("AIQ_PROVIDER_RPM")?.per_provider(),
                tpm: env.value("AIQ_PROVIDER_TPM")?.per_provider(),
            },
            webhooks: WebhookSettings::load(env)?,
            retention: RetentionSettings::load(env)?,
        })
    }
}

impl RetentionSettings {
    /// The fewest days rows and delivered alerts may be kept: a month's budget window and its
    /// alerts (once per window) must outlive it.
    pub const MIN_ROWS_DAYS: u64 = 32;
    /// The fewest days cost rows may be kept: the budget rebuilds this month's counters from
    /// them, and the reports compare months.
    pub const MIN_LEDGER_DAYS: u64 = 62;

    /// The `AIQ_RETAIN_*` and `AIQ_PRUNE_*` settings (what `aiq prune` needs too).
    pub fn load<F: Fn(&str) -> Option<String>>(env: &Env<F>) -> Result<Self, ConfigError> {
        let int = |name| env.value(name).map(|v| v.int());
        let days = |name: &'static str, min: u64| -> Result<u32, ConfigError> {
            let n = int(name)?;
            if n != 0 && n < min {
                return Err(bad(
                    name,
                    format!("{n} days is too short: 0 (never) or at least {min}"),
                ));
            }
            Ok(n as u32)
        };
        Ok(Self {
            raw_days: days("AIQ_RETAIN_RAW_DAYS", 1)?,
            rows_days: days("AIQ_RETAIN_ROWS_DAYS", Self::MIN_ROWS_DAYS)?,
            ledger_days: days("AIQ_RETAIN_LEDGER_DAYS", Self::MIN_LEDGER_DAYS)?,
            interval: Duration::from_secs(int("AIQ_PRUNE_INTERVAL_S")?),
            batch: int("AIQ_PRUNE_BATCH")? as u32,
            pause_pct: int("AIQ_PRUNE_PAUSE_PCT")? as u32,
        })
    }
}

impl WebhookSettings {
    /// The `AIQ_WEBHOOK_*` settings (what `aiq webhooks` needs too). The networks and the
    /// secrets are parsed here, each refusal naming its setting.
    pub fn load<F: Fn(&str) -> Option<String>>(env: &Env<F>) -> Result<Self, ConfigError> {
        let int = |name| env.value(name).map(|v| v.int());
        let secs = |name| int(name).map(Duration::from_secs);
        const NETS: &str = "AIQ_WEBHOOK_ALLOW_NETS";
        let allow_nets = match env.value(NETS)?.text() {
            None => Vec::new(),
            Some(t) => crate::webhooks::address::parse_nets(&t).map_err(|e| bad(NETS, e))?,
        };
        const SECRET: &str = "AIQ_WEBHOOK_CALLBACK_SECRET";
        let callback_secrets = match env.value(SECRET)?.text() {
            None => Vec::new(),
            Some(t) => t
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| {
                    crate::webhooks::sign::Key::parse(s)
                        .map(|_| Secret::new(s.to_owned()))
                        .map_err(|e| bad(SECRET, e))
                })
                .collect::<Result<_, _>>()?,
        };
        Ok(Self {
            retry_for: secs("AIQ_WEBHOOK_RETRY_FOR_S")?,
            retry_base: env.value("AIQ_WEBHOOK_RETRY_BASE_MS")?.millis(),
            failing_after: secs("AIQ_WEBHOOK_FAILING_AFTER_S")?,
            timeout: env.value("AIQ_WEBHOOK_TIMEOUT_MS")?.millis(),
            concurrency: int("AIQ_WEBHOOK_CONCURRENCY")? as usize,
            allow_nets,
            callback_secrets,
        })
    }
}
