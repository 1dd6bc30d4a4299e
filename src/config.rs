//! Settings: one typed struct, loaded once from `AIQ_*` environment variables (systemd feeds them
//! through `EnvironmentFile=`), checked at start. A missing or malformed value stops start-up
//! with an error that names the variable. Nothing else in aiq reads the environment.
//!
//! Each variable is declared once, in [`table::SETTINGS`]: its area, default, range, parser,
//! secrecy and description ([`setting`] says what those are and holds the parsers). Loading
//! (`load.rs`), [`Settings::effective`] (`aiq config`) and `.env.example` come from that table.

mod load;
pub mod setting;
pub mod table;

pub use load::startup_wait;
use setting::{Secrecy, Value};
use table::SETTINGS;

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use crate::domain::MicroUsd;
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
    pub webhooks: WebhookSettings,
    pub retention: RetentionSettings,
    pub console: ConsoleSettings,
}

/// A console sign-in's role: a viewer sees, an operator may also act.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsoleRole {
    Viewer,
    Operator,
}

impl ConsoleRole {
    pub fn as_str(self) -> &'static str {
        match self {
            ConsoleRole::Viewer => "viewer",
            ConsoleRole::Operator => "operator",
        }
    }
}

/// One console sign-in: its name (shown and audited), role and token.
#[derive(Debug, Clone, PartialEq)]
pub struct ConsoleToken {
    pub name: String,
    pub role: ConsoleRole,
    pub token: Secret,
}

/// The console's sign-ins (`AIQ_CONSOLE_*_TOKENS`) and how long a session lasts. No tokens:
/// the console is open, as operator, to requests whose Host is loopback only (see
/// `console::auth`).
#[derive(Debug, Clone, PartialEq)]
pub struct ConsoleSettings {
    pub tokens: Vec<ConsoleToken>,
    pub session: Duration,
    pub cookie_secure: CookieSecure,
}

impl Default for ConsoleSettings {
    fn default() -> Self {
        Self {
            tokens: Vec::new(),
            session: Duration::from_secs(12 * 3600),
            cookie_secure: CookieSecure::Auto,
        }
    }
}

/// When the session cookie carries `Secure` (`AIQ_CONSOLE_COOKIE_SECURE`). The admin port has
/// no TLS of its own, so only a proxy in front can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CookieSecure {
    /// When the request has `X-Forwarded-Proto: https`.
    Auto,
    /// Always: the console is reached only through TLS.
    Always,
    /// Never.
    Never,
}

impl CookieSecure {
    pub fn as_str(self) -> &'static str {
        match self {
            CookieSecure::Auto => "auto",
            CookieSecure::Always => "always",
            CookieSecure::Never => "never",
        }
    }

    /// Whether a cookie set in answer to a request that came through TLS (`through_tls`, as
    /// a proxy says) is `Secure`.
    pub fn secure(self, through_tls: bool) -> bool {
        match self {
            CookieSecure::Auto => through_tls,
            CookieSecure::Always => true,
            CookieSecure::Never => false,
        }
    }
}

/// The shortest console token accepted.
pub const CONSOLE_TOKEN_MIN: usize = 24;

impl ConsoleSettings {
    /// The `name:token` list of one role, as the setting was written.
    pub fn shown(&self, role: ConsoleRole) -> String {
        self.tokens
            .iter()
            .filter(|t| t.role == role)
            .map(|t| format!("{}:{}", t.name, t.token.expose()))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Parses one role's `name:token,name:token` list.
    pub fn parse_tokens(
        name: &'static str,
        role: ConsoleRole,
        text: &str,
    ) -> Result<Vec<ConsoleToken>, ConfigError> {
        let mut out = Vec::new();
        for item in text.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let Some((who, token)) = item.split_once(':') else {
                return Err(bad(name, "each entry is name:token"));
            };
            let (who, token) = (who.trim(), token.trim());
            if who.is_empty()
                || !who
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@'))
            {
                return Err(bad(
                    name,
                    "a name is letters, digits and - _ . @ (it is shown on the pages)",
                ));
            }
            if token.chars().count() < CONSOLE_TOKEN_MIN {
                return Err(bad(
                    name,
                    format!("the token of {who} is shorter than {CONSOLE_TOKEN_MIN} characters"),
                ));
            }
            out.push(ConsoleToken {
                name: who.to_owned(),
                role,
                token: Secret::new(token),
            });
        }
        Ok(out)
    }
}

/// How long old data is kept (`AIQ_RETAIN_*`, in days, 0 = never pruned) and how the pruner
/// works (`AIQ_PRUNE_*`). See `store::retention`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionSettings {
    /// Raw provider answers, after which raw_response becomes a marker (the row stays).
    pub raw_days: u32,
    /// Result, error and usage rows, and delivered budget alerts.
    pub rows_days: u32,
    /// Cost rows (the ledger).
    pub ledger_days: u32,
    pub interval: Duration,
    /// Rows per statement.
    pub batch: u32,
    /// After each batch the pruner rests this percentage of the time the batch took, so a pass
    /// gives the pipeline most of the database (100: it works at most half the time).
    pub pause_pct: u32,
}

/// Webhooks: retries, the failing mark, the addresses allowed, the callbacks' secret.
#[derive(Debug, Clone, PartialEq)]
pub struct WebhookSettings {
    pub retry_for: Duration,
    pub retry_base: Duration,
    pub failing_after: Duration,
    pub timeout: Duration,
    pub concurrency: usize,
    /// Private networks webhooks may go to anyway (`AIQ_WEBHOOK_ALLOW_NETS`).
    pub allow_nets: Vec<crate::webhooks::address::Net>,
    /// The `whsec_` secrets that sign callback_url deliveries, newest first (checked at load).
    pub callback_secrets: Vec<Secret>,
}

/// Reads variables through `lookup`, so tests can load settings without touching the process
/// environment.
pub struct Env<F: Fn(&str) -> Option<String>>(pub F);

impl<F: Fn(&str) -> Option<String>> Env<F> {
    /// The setting `name` of the [table](table::SETTINGS), read once, parsed and checked.
    fn value(&self, name: &'static str) -> Result<Value, ConfigError> {
        table::find(name).read((self.0)(name).as_deref())
    }
}

/// Looks a variable up in the process environment. A value that is not UTF-8 comes back as a
/// NUL byte, which no environment variable can hold, so that [`setting::Setting::read`]
/// refuses it, naming the variable, instead of taking it for unset.
pub fn process_lookup(name: &str) -> Option<String> {
    match std::env::var(name) {
        Ok(v) => Some(v),
        Err(std::env::VarError::NotPresent) => None,
        Err(std::env::VarError::NotUnicode(_)) => Some("\0".to_owned()),
    }
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

impl Settings {
    /// Every setting's effective value by variable name, secrets masked (`aiq config`), in the
    /// order of the table: by area.
    pub fn effective(&self) -> Vec<(&'static str, String)> {
        SETTINGS.iter().map(|s| (s.name, s.shown(self))).collect()
    }

    /// Every secret value, for the scrubbers of Sentry events and log lines: neither may carry one.
    pub fn secrets(&self) -> Vec<String> {
        let of = |secrecy| SETTINGS.iter().filter(move |s| s.secrecy == secrecy);
        let mut out: Vec<String> = of(Secrecy::Secret)
            .map(|s| (s.show)(self))
            .filter(|v| !v.is_empty())
            .collect();
        // The passwords inside the database and Redis URLs, as written and decoded.
        for s in of(Secrecy::UrlPassword) {
            out.extend(crate::redact::url_passwords(&(s.show)(self)));
        }
        out
    }

    /// Loads every setting from the process environment.
    pub fn from_process_env() -> Result<Self, ConfigError> {
        Self::load(&Env(process_lookup))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Tier;
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
    fn webhook_networks_and_secrets_are_checked_at_load_naming_their_setting() {
        let with = |k: &'static str, v: &'static str| {
            let mut pairs = BASE.to_vec();
            pairs.push((k, v));
            Settings::load(&env(&pairs))
        };
        let s = with("AIQ_WEBHOOK_ALLOW_NETS", "127.0.0.1/32, 10.1.0.0/16").unwrap();
        let nets: Vec<String> = s
            .webhooks
            .allow_nets
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(nets, ["127.0.0.1/32", "10.1.0.0/16"]);
        let e = with("AIQ_WEBHOOK_ALLOW_NETS", "10.0.0.0/33").unwrap_err();
        assert_eq!(e.name, "AIQ_WEBHOOK_ALLOW_NETS");
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let s = with("AIQ_WEBHOOK_CALLBACK_SECRET", secret).unwrap();
        assert_eq!(s.webhooks.callback_secrets.len(), 1);
        assert!(
            !format!("{s:?}").contains(secret),
            "the secret never prints"
        );
        assert!(
            s.secrets().iter().any(|v| v.contains(secret)),
            "and is scrubbed"
        );
        let e = with("AIQ_WEBHOOK_CALLBACK_SECRET", "whsec_short").unwrap_err();
        assert_eq!(e.name, "AIQ_WEBHOOK_CALLBACK_SECRET");
        assert!(!e.to_string().contains("whsec_short"), "{e}");
        let d = Settings::load(&env(&BASE)).unwrap().webhooks;
        assert_eq!(d.retry_for, Duration::from_secs(86_400));
        assert_eq!(d.failing_after, Duration::from_secs(3600));
        assert!(d.allow_nets.is_empty() && d.callback_secrets.is_empty());
    }

    #[test]
    fn the_console_cookie_is_secure_by_its_three_words_and_nothing_else() {
        let with = |v: &'static str| {
            let mut pairs = BASE.to_vec();
            pairs.push(("AIQ_CONSOLE_COOKIE_SECURE", v));
            Settings::load(&env(&pairs)).map(|s| s.console.cookie_secure)
        };
        let default = Settings::load(&env(&BASE)).unwrap().console.cookie_secure;
        assert_eq!(default, CookieSecure::Auto);
        assert_eq!(with("auto").unwrap(), CookieSecure::Auto);
        assert_eq!(with("always").unwrap(), CookieSecure::Always);
        assert_eq!(with(" never ").unwrap(), CookieSecure::Never);
        for v in ["yes", "Always", "true", "on"] {
            let e = with(v).unwrap_err();
            assert_eq!(e.name, "AIQ_CONSOLE_COOKIE_SECURE", "{v}: {e}");
            let text = e.to_string();
            assert!(
                text.contains("AIQ_CONSOLE_COOKIE_SECURE") && text.contains("auto, always, never"),
                "{v}: {text}"
            );
        }
    }

    #[test]
    fn retention_defaults_keep_the_ledger_and_refuse_retentions_too_short_to_be_safe() {
        let d = Settings::load(&env(&BASE)).unwrap().retention;
        assert_eq!(
            d,
            RetentionSettings {
                raw_days: 30,
                rows_days: 400,
                ledger_days: 0,
                interval: Duration::from_secs(300),
                batch: 2000,
                pause_pct: 100,
            }
        );
        let ok = load_with(&[
            ("AIQ_RETAIN_RAW_DAYS", "0"),
            ("AIQ_RETAIN_ROWS_DAYS", "32"),
            ("AIQ_RETAIN_LEDGER_DAYS", "62"),
        ])
        .unwrap()
        .retention;
        assert_eq!((ok.raw_days, ok.rows_days, ok.ledger_days), (0, 32, 62));
        assert_eq!(
            load_with(&[("AIQ_RETAIN_RAW_DAYS", "1")])
                .unwrap()
                .retention
                .raw_days,
            1
        );
        let refusals: [(&str, &str, &str); 5] = [
            ("AIQ_RETAIN_ROWS_DAYS", "31", "at least 32"),
            ("AIQ_RETAIN_ROWS_DAYS", "1", "0 (never)"),
            ("AIQ_RETAIN_LEDGER_DAYS", "61", "at least 62"),
            ("AIQ_RETAIN_RAW_DAYS", "36501", "out of range"),
            ("AIQ_PRUNE_BATCH", "0", "out of range"),
        ];
        for (name, value, words) in refusals {
            let e = load_with(&[(name, value)]).unwrap_err();
            assert_eq!(e.name, name, "{value}");
            assert!(e.problem.contains(words), "{name}={value}: {e}");
        }
    }

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
