//! The one table of settings. Each `AIQ_*` variable is declared here once: its area, its default,
//! the values it admits (a range for every number), how it parses, whether it is a secret, and
//! its description, which is its comment in `.env.example`. Loading (`Env::value`), what
//! `aiq config` prints ([`super::Settings::effective`]) and `.env.example` ([`env_example`])
//! all come from this table; the load functions only put the parsed values together and check the
//! settings that depend on each other. What an entry's fields mean, and the parsers, are in
//! [`super::setting`].

use std::time::Duration;

use super::DEFAULT_ORG_DAILY_USD;
use super::setting::{Area, Fallback, Kind, Pem, Secrecy, Setting};
use super::setting::{FLAG, HTTP, MAX_PER_MINUTE, MAX_USD};
use super::{DEFAULT_ORG_JOBS_PER_MINUTE, DEFAULT_ORG_MAX_IN_FLIGHT, DEFAULT_ORG_MONTHLY_USD};
use crate::domain::{MicroUsd, PROVIDERS, Tier};
use crate::tls::PemFile;

/// The setting named `name`. Asking for one the table lacks is a mistake in this module, which
/// the unit tests find.
pub fn find(name: &str) -> &'static Setting {
    SETTINGS
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("{name} is not in the table of settings"))
}

/// The text of `.env.example`: the table, by area, each setting under its description.
pub fn env_example() -> String {
    let mut out = String::new();
    wrap(&mut out, ENV_EXAMPLE_HEADER);
    for area in Area::ALL {
        let title = format!("# --- {} ", area.title());
        out.push('\n');
        out.push_str(&format!("{title:-<WIDTH$}\n"));
        wrap(&mut out, area.about());
        for s in SETTINGS.iter().filter(|s| s.area == area) {
            wrap(&mut out, s.doc);
            out.push_str(&format!("{}={}\n", s.name, s.example()));
        }
    }
    out
}

/// The width of `.env.example`'s comments.
const WIDTH: usize = 99;

const ENV_EXAMPLE_HEADER: &str = "aiq settings. systemd reads this file through \
    EnvironmentFile=; `aiq run` reads the process environment. Every variable starts with AIQ_. \
    A missing or malformed value stops start-up with a message naming it; so does a value that \
    is not UTF-8. A blank value is the same as none. Durations are in milliseconds unless the \
    name says otherwise. This file is written from the table in src/config/table.rs (a unit \
    test checks it).";

/// Appends `text` as comment lines of at most [`WIDTH`] characters.
fn wrap(out: &mut String, text: &str) {
    let mut line = String::from("#");
    for word in text.split_whitespace() {
        if line.len() > 1 && line.len() + 1 + word.len() > WIDTH {
            out.push_str(&line);
            out.push('\n');
            line = String::from("#");
        }
        line.push(' ');
        line.push_str(word);
    }
    if line.len() > 1 {
        out.push_str(&line);
        out.push('\n');
    }
}

fn ms(d: Duration) -> String {
    d.as_millis().to_string()
}

fn mib(bytes: u64) -> String {
    (bytes / (1024 * 1024)).to_string()
}

fn tiers_usd(v: &[MicroUsd; 6]) -> String {
    let parts: Vec<String> = Tier::ALL
        .iter()
        .zip(v)
        .map(|(t, m)| format!("{t}={}", m.as_usd_f64()))
        .collect();
    parts.join(",")
}

fn tier_counts(v: &[u32; 6]) -> String {
    let parts: Vec<String> = Tier::ALL
        .iter()
        .zip(v)
        .map(|(t, n)| format!("{t}={n}"))
        .collect();
    parts.join(",")
}

fn providers(v: &[u64; 4]) -> String {
    let parts: Vec<String> = PROVIDERS
        .iter()
        .zip(v)
        .map(|(p, n)| format!("{p}={n}"))
        .collect();
    parts.join(",")
}

fn path(f: Option<&PemFile>) -> String {
    f.map(|f| f.path().display().to_string())
        .unwrap_or_default()
}

fn secret(s: &Option<super::Secret>) -> String {
    s.as_ref()
        .map(|s| s.expose().to_owned())
        .unwrap_or_default()
}

/// Every setting, by area in the order of [`Area::ALL`]: the one place a setting is declared.
pub static SETTINGS: &[Setting] = &[
    // Redis.
    Setting {
        name: "AIQ_REDIS_URL",
        area: Area::Redis,
        fallback: Fallback::Required {
            example: "redis://127.0.0.1:6379/",
            hint: "the Redis URL, e.g. redis://127.0.0.1:6379/",
        },
        kind: Kind::RedisUrls,
        secrecy: Secrecy::UrlPassword,
        doc: "Where Redis is (redis://, rediss:// or unix://). For a Redis Cluster: \
              several seed nodes separated by commas, and AIQ_REDIS_CLUSTER=true. A password in \
              it (redis://:PASSWORD@host, percent-encoded) is never printed: logs, errors and \
              `aiq config` show it as ***.",
        show: |s| String::from(&*s.queue.redis.url),
    },
    Setting {
        name: "AIQ_REDIS_CLUSTER",
        area: Area::Redis,
        fallback: Fallback::Value("false"),
        kind: Kind::Words(FLAG),
        secrecy: Secrecy::Public,
        doc: "true (or 1): AIQ_REDIS_URL names the seed nodes of a Redis Cluster; false (or 0): \
              one server.",
        show: |s| s.queue.redis.cluster.to_string(),
    },
    Setting {
        name: "AIQ_REDIS_CA_FILE",
        area: Area::Redis,
        fallback: Fallback::Unset,
        kind: Kind::PemFile(Pem::Certificates),
        secrecy: Secrecy::Public,
        doc: "Redis over TLS: a rediss:// URL (the server's --tls-port). The PEM CA bundle that \
              verifies the server; empty: the system's roots. Refused with a redis:// URL, where \
              it would not be used.",
        show: |s| path(s.queue.redis.tls.ca.as_ref()),
    },
    Setting {
        name: "AIQ_REDIS_CLIENT_CERT_FILE",
        area: Area::Redis,
        fallback: Fallback::Unset,
        kind: Kind::PemFile(Pem::Certificates),
        secrecy: Secrecy::Public,
        doc: "Mutual TLS, for a server with tls-auth-clients yes: a PEM client certificate and \
              (next) its key, both or neither.",
        show: |s| path(s.queue.redis.tls.client.as_ref().map(|(c, _)| c)),
    },
    Setting {
        name: "AIQ_REDIS_CLIENT_KEY_FILE",
        area: Area::Redis,
        fallback: Fallback::Unset,
        kind: Kind::PemFile(Pem::PrivateKey),
        secrecy: Secrecy::Public,
        doc: "The client certificate's PEM private key. The key is a secret: make it readable \
              by the service only (only its path prints).",
        show: |s| path(s.queue.redis.tls.client.as_ref().map(|(_, k)| k)),
    },
    // PostgreSQL.
    Setting {
        name: "AIQ_DATABASE_URL",
        area: Area::Database,
        fallback: Fallback::Required {
            example: "postgres://aiq:change-me@127.0.0.1:5432/aiq",
            hint: "the PostgreSQL URL, e.g. postgres://aiq:secret@127.0.0.1:5432/aiq",
        },
        kind: Kind::Url {
            schemes: &["postgres", "postgresql"],
            trim_slash: false,
        },
        secrecy: Secrecy::UrlPassword,
        doc: "PostgreSQL for results, costs and errors. Its password (in the userinfo or a \
              password= parameter) is never printed: `aiq config` shows the URL with *** in its \
              place. TLS comes from the URL's parameters: \
              sslmode=disable|prefer|require|verify-ca|verify-full (default prefer: TLS when the \
              server offers it, unverified) and sslrootcert=/path/ca.pem (only with verify-ca or \
              verify-full, which check the server against it; verify-full checks the host name \
              too).",
        show: |s| s.database.url.expose().to_owned(),
    },
    Setting {
        name: "AIQ_DATABASE_CA_FILE",
        area: Area::Database,
        fallback: Fallback::Unset,
        kind: Kind::PemFile(Pem::Certificates),
        secrecy: Secrecy::Public,
        doc: "The PEM CA bundle that verifies PostgreSQL when AIQ_DATABASE_URL has no \
              sslrootcert (the URL's wins). Needs sslmode=verify-full or verify-ca in the URL. \
              Without either, verify-full trusts the Mozilla roots built into aiq \
              (webpki-roots), not the system's.",
        show: |s| path(s.database.ca.as_ref()),
    },
    // Queue.
    Setting {
        name: "AIQ_QUEUE_PREFIX",
        area: Area::Queue,
        fallback: Fallback::Value("aiq"),
        kind: Kind::Prefix,
        secrecy: Secrecy::Public,
        doc: "Key prefix: every key lives under the hash tag {prefix}. Letters, digits, _ - . : \
              only.",
        show: |s| s.queue.prefix.clone(),
    },
    Setting {
        name: "AIQ_CONCURRENCY",
        area: Area::Queue,
        fallback: Fallback::Value("16"),
        kind: Kind::Int {
            min: 1,
            max: 50_000,
        },
        secrecy: Secrecy::Public,
        doc: "Jobs this process runs at once (1-50000). Each holds a connection to its provider \
              while it calls: above a few thousand, raise the open-files limit (LimitNOFILE in \
              the unit) to match.",
        show: |s| s.queue.concurrency.to_string(),
    },
    Setting {
        name: "AIQ_FETCH_BATCH",
        area: Area::Queue,
        fallback: Fallback::Value("32"),
        kind: Kind::Int { min: 1, max: 1000 },
        secrecy: Secrecy::Public,
        doc: "Most jobs leased per fetch round trip (1-1000); never more than free slots.",
        show: |s| s.queue.fetch_batch.to_string(),
    },
    Setting {
        name: "AIQ_POLL_INTERVAL_MS",
        area: Area::Queue,
        fallback: Fallback::Value("100"),
        kind: Kind::Int {
            min: 1,
            max: 60_000,
        },
        secrecy: Secrecy::Public,
        doc: "How long an idle worker waits before asking Redis again (1-60000).",
        show: |s| ms(s.queue.poll_interval),
    },
    Setting {
        name: "AIQ_LEASE_MS",
        area: Area::Queue,
        fallback: Fallback::Value("10000"),
        kind: Kind::Int {
            min: 1_000,
            max: 3_600_000,
        },
        secrecy: Secrecy::Public,
        doc: "Lease length. A running job's lease is renewed every third of it; a crashed \
              worker's jobs come back to the queue once their lease expires (1000-3600000).",
        show: |s| ms(s.queue.lease),
    },
    Setting {
        name: "AIQ_MAX_INTERRUPTS",
        area: Area::Queue,
        fallback: Fallback::Value("5"),
        kind: Kind::Int { min: 1, max: 1000 },
        secrecy: Secrecy::Public,
        doc: "A job whose lease expired this many times (its worker kept dying) goes to the dead \
              set (1-1000).",
        show: |s| s.queue.max_interrupts.to_string(),
    },
    Setting {
        name: "AIQ_SCHEDULING",
        area: Area::Queue,
        fallback: Fallback::Value("fair"),
        kind: Kind::Words(&["fair", "strict"]),
        secrecy: Secrecy::Public,
        doc: "fair: each backlogged tier gets capacity in proportion to its weight (no tier \
              starves). strict: the highest tier with work always goes first (lower tiers can \
              starve).",
        show: |s| {
            match s.queue.scheduling {
                super::Scheduling::Fair => "fair",
                super::Scheduling::Strict => "strict",
            }
            .to_owned()
        },
    },
    Setting {
        name: "AIQ_TIER_WEIGHTS",
        area: Area::Queue,
        fallback: Fallback::Value("32,16,8,4,2,1"),
        kind: Kind::Weights {
            min: 1,
            max: 1_000_000,
        },
        secrecy: Secrecy::Public,
        doc: "Weights of enterprise_plus, enterprise, professional_agency, growth_team, \
              solo_professional, trial (1-1000000 each).",
        show: |s| s.queue.tier_weights.map(|w| w.to_string()).join(","),
    },
    Setting {
        name: "AIQ_DEAD_MAX_JOBS",
        area: Area::Queue,
        fallback: Fallback::Value("100000"),
        kind: Kind::Int {
            min: 1,
            max: 100_000_000,
        },
        secrecy: Secrecy::Public,
        doc: "Dead set caps: the oldest dead jobs beyond any of them are dropped. This one \
              counts jobs (1-100000000).",
        show: |s| s.queue.dead_max_jobs.to_string(),
    },
    Setting {
        name: "AIQ_DEAD_MAX_MB",
        area: Area::Queue,
        fallback: Fallback::Value("256"),
        kind: Kind::Int {
            min: 1,
            max: 1_048_576,
        },
        secrecy: Secrecy::Public,
        doc: "The payloads the dead jobs keep, in MB (1-1048576); an invalid payload is kept as \
              its first 4 KiB, with its length and SHA-1.",
        show: |s| mib(s.queue.dead_max_bytes),
    },
    Setting {
        name: "AIQ_DEAD_MAX_AGE_DAYS",
        area: Area::Queue,
        fallback: Fallback::Value("30"),
        kind: Kind::Int { min: 1, max: 3650 },
        secrecy: Secrecy::Public,
        doc: "The age of the oldest dead job kept, in days (1-3650).",
        show: |s| (s.queue.dead_max_age.as_secs() / 86_400).to_string(),
    },
    Setting {
        name: "AIQ_IDEMPOTENCY_TTL_S",
        area: Area::Queue,
        fallback: Fallback::Value("86400"),
        kind: Kind::Int {
            min: 1,
            max: 31_536_000,
        },
        secrecy: Secrecy::Public,
        doc: "How long an idempotency key is remembered, in seconds (1-31536000).",
        show: |s| s.queue.idempotency_ttl.as_secs().to_string(),
    },
    Setting {
        name: "AIQ_EVENTS",
        area: Area::Queue,
        fallback: Fallback::Value("on"),
        kind: Kind::Words(&["on", "off"]),
        secrecy: Secrecy::Public,
        doc: "on: every change of a job's state is appended to the stream {p}:events by the \
              script that makes it (jobs/README.md, Outcomes). off: no events are written.",
        show: |s| if s.queue.events.on { "on" } else { "off" }.to_owned(),
    },
    Setting {
        name: "AIQ_EVENTS_MAX_LEN",
        area: Area::Queue,
        fallback: Fallback::Value("1000000"),
        kind: Kind::Int {
            min: 1000,
            max: 100_000_000,
        },
        secrecy: Secrecy::Public,
        doc: "The events stream is trimmed to about this many entries (1000-100000000); an entry holds the events of one script call.",
        show: |s| s.queue.events.max_len.to_string(),
    },
    Setting {
        name: "AIQ_EVENTS_MAX_AGE_S",
        area: Area::Queue,
        fallback: Fallback::Value("86400"),
        kind: Kind::Int {
            min: 60,
            max: 31_536_000,
        },
        secrecy: Secrecy::Public,
        doc: "Events older than this many seconds are trimmed from the stream (60-31536000).",
        show: |s| s.queue.events.max_age.as_secs().to_string(),
    },
    Setting {
        name: "AIQ_OUTCOMES_MAX_AGE_S",
        area: Area::Queue,
        fallback: Fallback::Value("86400"),
        kind: Kind::Int {
            min: 60,
            max: 31_536_000,
        },
        secrecy: Secrecy::Public,
        doc: "How long a finished job's outcome is kept in Redis ({p}:outcome:<id>) for the \
              clients' status and wait, in seconds (60-31536000); PostgreSQL keeps its row.",
        show: |s| s.queue.events.outcomes_max_age.as_secs().to_string(),
    },
    Setting {
        name: "AIQ_OUTCOMES_MAX_JOBS",
        area: Area::Queue,
        fallback: Fallback::Value("100000"),
        kind: Kind::Int {
            min: 1,
            max: 100_000_000,
        },
        secrecy: Secrecy::Public,
        doc: "At most this many finished jobs' outcomes are kept in Redis, the oldest dropped \
              first (1-100000000).",
        show: |s| s.queue.events.outcomes_max_jobs.to_string(),
    },
    // Retries.
    Setting {
        name: "AIQ_MAX_ATTEMPTS",
        area: Area::Retries,
        fallback: Fallback::Value("5"),
        kind: Kind::Int { min: 1, max: 100 },
        secrecy: Secrecy::Public,
        doc: "Executions a job gets before the dead set (the first run counts; 1-100).",
        show: |s| s.retry.max_attempts.to_string(),
    },
    Setting {
        name: "AIQ_RETRY_BASE_MS",
        area: Area::Retries,
        fallback: Fallback::Value("2000"),
        kind: Kind::Int {
            min: 1,
            max: 3_600_000,
        },
        secrecy: Secrecy::Public,
        doc: "Retry delays: full jitter over base * 2^(failures-1), capped; a provider's \
              Retry-After wins. The base (1-3600000).",
        show: |s| ms(s.retry.base),
    },
    Setting {
        name: "AIQ_RETRY_CAP_MS",
        area: Area::Retries,
        fallback: Fallback::Value("600000"),
        kind: Kind::Int {
            min: 1,
            max: 86_400_000,
        },
        secrecy: Secrecy::Public,
        doc: "The cap (1-86400000, at least the base).",
        show: |s| ms(s.retry.cap),
    },
    Setting {
        name: "AIQ_CALL_RETRIES",
        area: Area::Retries,
        fallback: Fallback::Value("2"),
        kind: Kind::Int { min: 0, max: 10 },
        secrecy: Secrecy::Public,
        doc: "In-call retries: a retryable provider failure (429, 5xx, 529, timeout, broken \
              connection, garbage body) is called again up to this many times inside the \
              attempt (0-10), with full jitter over base * 2^(retry-1). A Retry-After longer \
              than the cap goes back to the queue's delayed set. Each call has its own budget \
              hold, cost row and error row. 0 turns them off.",
        show: |s| s.call_retry.retries.to_string(),
    },
    Setting {
        name: "AIQ_CALL_RETRY_BASE_MS",
        area: Area::Retries,
        fallback: Fallback::Value("250"),
        kind: Kind::Int {
            min: 1,
            max: 60_000,
        },
        secrecy: Secrecy::Public,
        doc: "The in-call retries' base (1-60000).",
        show: |s| ms(s.call_retry.base),
    },
    Setting {
        name: "AIQ_CALL_RETRY_CAP_MS",
        area: Area::Retries,
        fallback: Fallback::Value("5000"),
        kind: Kind::Int {
            min: 1,
            max: 300_000,
        },
        secrecy: Secrecy::Public,
        doc: "The in-call retries' cap (1-300000, at least their base).",
        show: |s| ms(s.call_retry.cap),
    },
    // Start-up and shutdown.
    Setting {
        name: "AIQ_STARTUP_WAIT_S",
        area: Area::Lifecycle,
        fallback: Fallback::Value("3600"),
        kind: Kind::Int {
            min: 0,
            max: 86_400,
        },
        secrecy: Secrecy::Public,
        doc: "How long `aiq migrate` and `aiq run` wait for Redis and PostgreSQL at start-up \
              (0-86400 s), telling systemd to extend the start timeout meanwhile; an outage at \
              boot shorter than this costs no restart. A wrong password, a missing database or \
              a certificate that does not verify ends the start at once.",
        show: |s| s.startup_wait.as_secs().to_string(),
    },
    Setting {
        name: "AIQ_SHUTDOWN_GRACE_MS",
        area: Area::Lifecycle,
        fallback: Fallback::Value("20000"),
        kind: Kind::Int {
            min: 0,
            max: 3_600_000,
        },
        secrecy: Secrecy::Public,
        doc: "On SIGTERM: running jobs get this long to finish (0-3600000; keep it below \
              systemd's TimeoutStopSec).",
        show: |s| ms(s.shutdown_grace),
    },
    // Admin port.
    Setting {
        name: "AIQ_ADMIN_ADDR",
        area: Area::Admin,
        fallback: Fallback::Value("127.0.0.1:9464"),
        kind: Kind::Addr,
        secrecy: Secrecy::Public,
        doc: "The address of GET /metrics, /healthz (alive) and /readyz (Redis and PostgreSQL \
              answer).",
        show: |s| s.admin_addr.to_string(),
    },
    Setting {
        name: "AIQ_CONSOLE_OPERATOR_TOKENS",
        area: Area::Admin,
        fallback: Fallback::Unset,
        kind: Kind::Text,
        secrecy: Secrecy::Secret,
        doc: "The console's operator sign-ins (they may retry, purge and change limits): a \
              comma-separated list of name:token, each token at least 24 characters; the name \
              is shown on the pages and in the audit log. A secret. On an AIQ_ADMIN_ADDR other \
              than loopback, aiq run refuses to start without operator or viewer tokens.",
        show: |s| s.console.shown(crate::config::ConsoleRole::Operator),
    },
    Setting {
        name: "AIQ_CONSOLE_VIEWER_TOKENS",
        area: Area::Admin,
        fallback: Fallback::Unset,
        kind: Kind::Text,
        secrecy: Secrecy::Secret,
        doc: "The console's viewer sign-ins (they see every page, change nothing): name:token, \
              comma-separated, as AIQ_CONSOLE_OPERATOR_TOKENS. A secret.",
        show: |s| s.console.shown(crate::config::ConsoleRole::Viewer),
    },
    Setting {
        name: "AIQ_CONSOLE_SESSION_H",
        area: Area::Admin,
        fallback: Fallback::Value("12"),
        kind: Kind::Int { min: 1, max: 720 },
        secrecy: Secrecy::Public,
        doc: "A console sign-in lasts this many hours (1-720). Sessions also end when the \
              process restarts.",
        show: |s| (s.console.session.as_secs() / 3600).to_string(),
    },
    Setting {
        name: "AIQ_CONSOLE_COOKIE_SECURE",
        area: Area::Admin,
        fallback: Fallback::Value("auto"),
        kind: Kind::Words(&["auto", "always", "never"]),
        secrecy: Secrecy::Public,
        doc: "When the console's session cookie is Secure (sent over HTTPS only): auto when \
              the request has X-Forwarded-Proto: https, always, or never. The admin port has \
              no TLS of its own: set always when the console is reached only through a TLS \
              proxy, whether or not the proxy sends that header.",
        show: |s| s.console.cookie_secure.as_str().to_owned(),
    },
    // Logs and Sentry.
    Setting {
        name: "AIQ_LOG_FORMAT",
        area: Area::Telemetry,
        fallback: Fallback::Value("auto"),
        kind: Kind::Words(&["auto", "json", "text"]),
        secrecy: Secrecy::Public,
        doc: "json, text, or auto (text on a terminal, JSON otherwise). RUST_LOG overrides the \
              level.",
        show: |s| {
            match s.log_format {
                super::LogFormat::Json => "json",
                super::LogFormat::Text => "text",
            }
            .to_owned()
        },
    },
    Setting {
        name: "AIQ_SENTRY_DSN",
        area: Area::Telemetry,
        fallback: Fallback::Unset,
        kind: Kind::Url {
            schemes: HTTP,
            trim_slash: false,
        },
        secrecy: Secrecy::Secret,
        doc: "Sentry DSN for job failures that end a job (dead) and daemon errors; empty = off. \
              A secret. Events are scrubbed of API keys, tokens, e-mail addresses and image \
              bytes before they leave.",
        show: |s| secret(&s.sentry_dsn),
    },
    Setting {
        name: "AIQ_SENTRY_ENVIRONMENT",
        area: Area::Telemetry,
        fallback: Fallback::Value("production"),
        kind: Kind::Text,
        secrecy: Secrecy::Public,
        doc: "The environment Sentry files the events under.",
        show: |s| s.sentry_environment.clone(),
    },
    Setting {
        name: "AIQ_SENTRY_SEND_PAYLOADS",
        area: Area::Telemetry,
        fallback: Fallback::Value("false"),
        kind: Kind::Words(FLAG),
        secrecy: Secrecy::Public,
        doc: "true: an event about a dead job also carries its payload (prompts, messages, image \
              data; its first 8 KiB). false: ids, tags, the failure and the payload's size only. \
              Either way each event carries the breadcrumbs of its own job alone, and every text \
              in it is scrubbed and cut short.",
        show: |s| s.sentry_send_payloads.to_string(),
    },
    // Circuit breakers and provider rates.
    Setting {
        name: "AIQ_BREAKER_FAILURES",
        area: Area::Breakers,
        fallback: Fallback::Value("5"),
        kind: Kind::Int { min: 1, max: 1000 },
        secrecy: Secrecy::Public,
        doc: "Circuit breaker per provider, shared by every process: this many provider faults \
              in a row (5xx, 529, timeouts, broken connections; 1-1000) open it; its jobs then \
              wait, spending no attempt, for the cooldown, after which one probe call decides.",
        show: |s| s.breaker.failures.to_string(),
    },
    Setting {
        name: "AIQ_BREAKER_COOLDOWN_MS",
        area: Area::Breakers,
        fallback: Fallback::Value("30000"),
        kind: Kind::Int {
            min: 100,
            max: 3_600_000,
        },
        secrecy: Secrecy::Public,
        doc: "How long an open breaker holds calls back (100-3600000).",
        show: |s| ms(s.breaker.cooldown),
    },
    Setting {
        name: "AIQ_PROVIDER_RPM",
        area: Area::Breakers,
        fallback: Fallback::Value(""),
        kind: Kind::PerProvider {
            max: MAX_PER_MINUTE,
        },
        secrecy: Secrecy::Public,
        doc: "Requests per minute per provider, held across every process (unnamed = no limit), \
              e.g. openai=500,anthropic=50. A job over a limit waits for the next minute; it \
              does not fail.",
        show: |s| providers(&s.breaker.rpm),
    },
    Setting {
        name: "AIQ_PROVIDER_TPM",
        area: Area::Breakers,
        fallback: Fallback::Value(""),
        kind: Kind::PerProvider {
            max: MAX_PER_MINUTE,
        },
        secrecy: Secrecy::Public,
        doc: "Tokens per minute per provider, likewise; LLM tokens count the prompt bound plus \
              max_tokens.",
        show: |s| providers(&s.breaker.tpm),
    },
    // Money.
    Setting {
        name: "AIQ_GLOBAL_DAILY_LIMIT_USD",
        area: Area::Budget,
        fallback: Fallback::Value("1000"),
        kind: Kind::Usd { max: MAX_USD },
        secrecy: Secrecy::Public,
        doc: "The platform's spend per day.",
        show: |s| s.budget.global_daily.as_usd_f64().to_string(),
    },
    Setting {
        name: "AIQ_GLOBAL_MONTHLY_LIMIT_USD",
        area: Area::Budget,
        fallback: Fallback::Value("25000"),
        kind: Kind::Usd { max: MAX_USD },
        secrecy: Secrecy::Public,
        doc: "The platform's spend per month.",
        show: |s| s.budget.global_monthly.as_usd_f64().to_string(),
    },
    Setting {
        name: "AIQ_ORG_DAILY_LIMIT_USD",
        area: Area::Budget,
        fallback: Fallback::Value(DEFAULT_ORG_DAILY_USD),
        kind: Kind::TierUsd { max: MAX_USD },
        secrecy: Secrecy::Public,
        doc: "Per-organisation defaults by tier (all six tiers), per day; ai_cost_limits \
              overrides them per organisation (`aiq budget set-limit ORG --daily-usd X \
              --monthly-usd Y`).",
        show: |s| tiers_usd(&s.budget.org_daily),
    },
    Setting {
        name: "AIQ_ORG_MONTHLY_LIMIT_USD",
        area: Area::Budget,
        fallback: Fallback::Value(DEFAULT_ORG_MONTHLY_USD),
        kind: Kind::TierUsd { max: MAX_USD },
        secrecy: Secrecy::Public,
        doc: "The same, per month.",
        show: |s| tiers_usd(&s.budget.org_monthly),
    },
    Setting {
        name: "AIQ_ORG_JOBS_PER_MINUTE",
        area: Area::Budget,
        fallback: Fallback::Value(DEFAULT_ORG_JOBS_PER_MINUTE),
        kind: Kind::TierCount { max: u32::MAX },
        secrecy: Secrecy::Public,
        doc: "Jobs per minute per organisation by tier, across all processes (0 = no limit). A \
              job over the rate waits for the next minute; it does not fail.",
        show: |s| tier_counts(&s.budget.org_jobs_per_minute),
    },
    Setting {
        name: "AIQ_ORG_MAX_IN_FLIGHT",
        area: Area::Budget,
        fallback: Fallback::Value(DEFAULT_ORG_MAX_IN_FLIGHT),
        kind: Kind::TierCount { max: 1_000_000 },
        secrecy: Secrecy::Public,
        doc: "Per tier, the most jobs of one organisation leased at once across all processes \
              (0: no cap, the default), so one tenant's slow or hanging calls cannot take every \
              slot. A leased job makes at most one provider call at a time, so this caps its \
              calls in flight. The queue keeps it when it leases: a job over the cap waits in \
              its queue, not leased. `aiq org set-limits ORG --in-flight N` overrides it for one \
              organisation (within about 2 s on every process). Until issue 14 it was a cap per \
              process.",
        show: |s| tier_counts(&s.queue.org_max_in_flight),
    },
    Setting {
        name: "AIQ_BUDGET_EXCEEDED",
        area: Area::Budget,
        fallback: Fallback::Value("defer"),
        kind: Kind::Words(&["defer", "fail"]),
        secrecy: Secrecy::Public,
        doc: "defer: a refused job waits in the delayed set until the window resets; fail: it \
              goes to the dead set. Either way an ai_processing_errors row of type \
              budget_exceeded records it.",
        show: |s| {
            match s.budget.on_exceeded {
                super::OnBudgetExceeded::Defer => "defer",
                super::OnBudgetExceeded::Fail => "fail",
            }
            .to_owned()
        },
    },
    Setting {
        name: "AIQ_BUDGET_TIMEZONE",
        area: Area::Budget,
        fallback: Fallback::Value("UTC"),
        kind: Kind::TimeZone,
        secrecy: Secrecy::Public,
        doc: "Day and month windows follow this IANA time zone's calendar.",
        show: |s| s.budget.timezone.name().to_owned(),
    },
    Setting {
        name: "AIQ_BUDGET_PREFIX",
        area: Area::Budget,
        fallback: Fallback::Value("aiq-budget"),
        kind: Kind::Prefix,
        secrecy: Secrecy::Public,
        doc: "Key prefix of the budget's Redis keys (shared by every queue of the platform).",
        show: |s| s.budget.prefix.clone(),
    },
    Setting {
        name: "AIQ_BUDGET_HOLD_MARGIN_MS",
        area: Area::Budget,
        fallback: Fallback::Value("60000"),
        kind: Kind::Int {
            min: 500,
            max: 3_600_000,
        },
        secrecy: Secrecy::Public,
        doc: "A hold outlives its provider's timeout by this much (500-3600000) before the \
              sweeper counts it as the call of a dead worker (at its estimate).",
        show: |s| ms(s.budget.hold_margin),
    },
    Setting {
        name: "AIQ_ALERT_WEBHOOK_URL",
        area: Area::Budget,
        fallback: Fallback::Unset,
        kind: Kind::Url {
            schemes: HTTP,
            trim_slash: false,
        },
        secrecy: Secrecy::Secret,
        doc: "Slack-compatible webhook for alerts at 80%, 95% and 100% of every limit and for \
              spend spikes (retried with backoff while it fails). A secret. Without it, alerts \
              go to the log only.",
        show: |s| secret(&s.budget.alert_webhook),
    },
    Setting {
        name: "AIQ_SPIKE_MULTIPLE",
        area: Area::Budget,
        fallback: Fallback::Value("3"),
        kind: Kind::Number { above: 1.0 },
        secrecy: Secrecy::Public,
        doc: "A spike: the last hour's spend above this multiple (a number above 1) of the \
              trailing 24 hours' hourly average, and at least AIQ_SPIKE_MIN_USD.",
        show: |s| s.budget.spike_multiple.to_string(),
    },
    Setting {
        name: "AIQ_SPIKE_MIN_USD",
        area: Area::Budget,
        fallback: Fallback::Value("1"),
        kind: Kind::Usd { max: MAX_USD },
        secrecy: Secrecy::Public,
        doc: "Spikes below this hourly spend are not worth an alert.",
        show: |s| s.budget.spike_min.as_usd_f64().to_string(),
    },
    Setting {
        name: "AIQ_PRICE_CATALOG",
        area: Area::Budget,
        fallback: Fallback::Unset,
        kind: Kind::Path,
        secrecy: Secrecy::Public,
        doc: "A price catalog file (JSON, the shape of src/budget/catalog.json) instead of the \
              built-in one. An unknown model or Vision feature is refused, never priced at zero.",
        show: |s| {
            s.budget
                .price_catalog
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        },
    },
    // Providers.
    Setting {
        name: "AIQ_VISION_BASE_URL",
        area: Area::Providers,
        fallback: Fallback::Value("https://vision.googleapis.com"),
        kind: Kind::Url {
            schemes: HTTP,
            trim_slash: true,
        },
        secrecy: Secrecy::Public,
        doc: "Google Cloud Vision.",
        show: |s| s.vision.base_url.clone(),
    },
    Setting {
        name: "AIQ_VISION_API_KEY",
        area: Area::Providers,
        fallback: Fallback::Unset,
        kind: Kind::Text,
        secrecy: Secrecy::Secret,
        doc: "Google Cloud Vision API key (sent as x-goog-api-key). A secret.",
        show: |s| secret(&s.vision.api_key),
    },
    Setting {
        name: "AIQ_VISION_TIMEOUT_MS",
        area: Area::Providers,
        fallback: Fallback::Value("60000"),
        kind: Kind::Int {
            min: 100,
            max: 600_000,
        },
        secrecy: Secrecy::Public,
        doc: "How long one Vision call may take (100-600000).",
        show: |s| ms(s.vision.timeout),
    },
    Setting {
        name: "AIQ_OPENAI_BASE_URL",
        area: Area::Providers,
        fallback: Fallback::Value("https://api.openai.com"),
        kind: Kind::Url {
            schemes: HTTP,
            trim_slash: true,
        },
        secrecy: Secrecy::Public,
        doc: "OpenAI.",
        show: |s| s.openai.base_url.clone(),
    },
    Setting {
        name: "AIQ_OPENAI_API_KEY",
        area: Area::Providers,
        fallback: Fallback::Unset,
        kind: Kind::Text,
        secrecy: Secrecy::Secret,
        doc: "OpenAI API key (sent as a bearer token). A secret.",
        show: |s| secret(&s.openai.api_key),
    },
    Setting {
        name: "AIQ_OPENAI_TIMEOUT_MS",
        area: Area::Providers,
        fallback: Fallback::Value("60000"),
        kind: Kind::Int {
            min: 100,
            max: 600_000,
        },
        secrecy: Secrecy::Public,
        doc: "How long one OpenAI call may take (100-600000).",
        show: |s| ms(s.openai.timeout),
    },
    Setting {
        name: "AIQ_ANTHROPIC_BASE_URL",
        area: Area::Providers,
        fallback: Fallback::Value("https://api.anthropic.com"),
        kind: Kind::Url {
            schemes: HTTP,
            trim_slash: true,
        },
        secrecy: Secrecy::Public,
        doc: "Anthropic.",
        show: |s| s.anthropic.base_url.clone(),
    },
    Setting {
        name: "AIQ_ANTHROPIC_API_KEY",
        area: Area::Providers,
        fallback: Fallback::Unset,
        kind: Kind::Text,
        secrecy: Secrecy::Secret,
        doc: "Anthropic API key (sent as x-api-key). A secret.",
        show: |s| secret(&s.anthropic.api_key),
    },
    Setting {
        name: "AIQ_ANTHROPIC_TIMEOUT_MS",
        area: Area::Providers,
        fallback: Fallback::Value("60000"),
        kind: Kind::Int {
            min: 100,
            max: 600_000,
        },
        secrecy: Secrecy::Public,
        doc: "How long one Anthropic call may take (100-600000).",
        show: |s| ms(s.anthropic.timeout),
    },
    Setting {
        name: "AIQ_GEMINI_BASE_URL",
        area: Area::Providers,
        fallback: Fallback::Value("https://generativelanguage.googleapis.com"),
        kind: Kind::Url {
            schemes: HTTP,
            trim_slash: true,
        },
        secrecy: Secrecy::Public,
        doc: "Gemini.",
        show: |s| s.gemini.base_url.clone(),
    },
    Setting {
        name: "AIQ_GEMINI_API_KEY",
        area: Area::Providers,
        fallback: Fallback::Unset,
        kind: Kind::Text,
        secrecy: Secrecy::Secret,
        doc: "Gemini API key (sent as x-goog-api-key). A secret.",
        show: |s| secret(&s.gemini.api_key),
    },
    Setting {
        name: "AIQ_GEMINI_TIMEOUT_MS",
        area: Area::Providers,
        fallback: Fallback::Value("60000"),
        kind: Kind::Int {
            min: 100,
            max: 600_000,
        },
        secrecy: Secrecy::Public,
        doc: "How long one Gemini call may take (100-600000).",
        show: |s| ms(s.gemini.timeout),
    },
    Setting {
        name: "AIQ_MAX_RESPONSE_MB",
        area: Area::Providers,
        fallback: Fallback::Value("64"),
        kind: Kind::Int { min: 1, max: 1024 },
        secrecy: Secrecy::Public,
        doc: "The longest answer body aiq reads from a provider, in MB (1-1024): a longer \
              success answer is read no further and recorded as an `oversize` call at its \
              estimate. 64 fits a 16-image Vision batch with full text annotations.",
        show: |s| mib(s.max_response_bytes),
    },
    Setting {
        name: "AIQ_RESPONSE_MEMORY_MB",
        area: Area::Providers,
        fallback: Fallback::Value("512"),
        kind: Kind::Int {
            min: 1,
            max: 65_536,
        },
        secrecy: Secrecy::Public,
        doc: "How much of the answers being read or held one process keeps at once, in MB \
              (1-65536, at least AIQ_MAX_RESPONSE_MB): a call waits for room before it reads its \
              body.",
        show: |s| mib(s.response_memory_bytes),
    },
    // Webhooks.
    Setting {
        name: "AIQ_WEBHOOK_RETRY_FOR_S",
        area: Area::Webhooks,
        fallback: Fallback::Value("86400"),
        kind: Kind::Int {
            min: 1,
            max: 2_592_000,
        },
        secrecy: Secrecy::Public,
        doc: "A message the receiver does not take (no 2xx answer) is tried again with growing \
              delays for this many seconds after its first failed try (1-2592000), then given up \
              and counted.",
        show: |s| s.webhooks.retry_for.as_secs().to_string(),
    },
    Setting {
        name: "AIQ_WEBHOOK_RETRY_BASE_MS",
        area: Area::Webhooks,
        fallback: Fallback::Value("5000"),
        kind: Kind::Int {
            min: 1,
            max: 3_600_000,
        },
        secrecy: Secrecy::Public,
        doc: "The first retry's delay (1-3600000); each further one doubles it, up to an hour, \
              with jitter.",
        show: |s| ms(s.webhooks.retry_base),
    },
    Setting {
        name: "AIQ_WEBHOOK_FAILING_AFTER_S",
        area: Area::Webhooks,
        fallback: Fallback::Value("3600"),
        kind: Kind::Int {
            min: 1,
            max: 2_592_000,
        },
        secrecy: Secrecy::Public,
        doc: "An endpoint whose tries have failed for this many seconds (1-2592000) is shown \
              failing in `aiq webhooks list` and counted by aiq_webhook_endpoints_failing; a \
              delivery clears it.",
        show: |s| s.webhooks.failing_after.as_secs().to_string(),
    },
    Setting {
        name: "AIQ_WEBHOOK_TIMEOUT_MS",
        area: Area::Webhooks,
        fallback: Fallback::Value("10000"),
        kind: Kind::Int {
            min: 100,
            max: 120_000,
        },
        secrecy: Secrecy::Public,
        doc: "How long one try may take, connecting and answering (100-120000).",
        show: |s| ms(s.webhooks.timeout),
    },
    Setting {
        name: "AIQ_WEBHOOK_CONCURRENCY",
        area: Area::Webhooks,
        fallback: Fallback::Value("16"),
        kind: Kind::Int { min: 1, max: 1024 },
        secrecy: Secrecy::Public,
        doc: "Tries one process makes at once (1-1024).",
        show: |s| s.webhooks.concurrency.to_string(),
    },
    Setting {
        name: "AIQ_WEBHOOK_ALLOW_NETS",
        area: Area::Webhooks,
        fallback: Fallback::Unset,
        kind: Kind::Text,
        secrecy: Secrecy::Public,
        doc: "Networks webhooks may go to although they are private, loopback, link-local or \
              reserved, as CIDRs separated by commas (e.g. 10.20.0.0/16). Without it, every such \
              address is refused: the address checked is the one connected to.",
        show: |s| {
            let nets: Vec<String> = s
                .webhooks
                .allow_nets
                .iter()
                .map(|n| n.to_string())
                .collect();
            nets.join(",")
        },
    },
    Setting {
        name: "AIQ_WEBHOOK_CALLBACK_SECRET",
        area: Area::Webhooks,
        fallback: Fallback::Unset,
        kind: Kind::Text,
        secrecy: Secrecy::Secret,
        doc: "The whsec_ secret that signs deliveries to jobs' callback_url (several separated \
              by commas, newest first, while rotating: each signs). A secret. Without it, \
              callback deliveries wait, failing, until it is set or they are given up.",
        show: |s| {
            let secrets: Vec<&str> = s
                .webhooks
                .callback_secrets
                .iter()
                .map(|k| k.expose())
                .collect();
            secrets.join(",")
        },
    },
    // Retention.
    Setting {
        name: "AIQ_RETAIN_RAW_DAYS",
        area: Area::Retention,
        fallback: Fallback::Value("30"),
        kind: Kind::Int {
            min: 0,
            max: 36_500,
        },
        secrecy: Secrecy::Public,
        doc: "Providers' raw answers (ai_processing_results.raw_response) older than this many \
              days are replaced by {\"pruned\": true} and raw_pruned_at is set; the row stays, \
              with its status, cost and summary (0-36500; 0: never).",
        show: |s| s.retention.raw_days.to_string(),
    },
    Setting {
        name: "AIQ_RETAIN_ROWS_DAYS",
        area: Area::Retention,
        fallback: Fallback::Value("400"),
        kind: Kind::Int {
            min: 0,
            max: 36_500,
        },
        secrecy: Secrecy::Public,
        doc: "Result, error and usage rows (ai_processing_results, ai_processing_errors, \
              ai_usage) and delivered budget alerts older than this many days are deleted \
              (0-36500: 0, never, or at least 32). A job id whose result row is gone is no longer recognised: an \
              app that reuses it after this many days gets the job run, and paid, again.",
        show: |s| s.retention.rows_days.to_string(),
    },
    Setting {
        name: "AIQ_RETAIN_LEDGER_DAYS",
        area: Area::Retention,
        fallback: Fallback::Value("0"),
        kind: Kind::Int {
            min: 0,
            max: 36_500,
        },
        secrecy: Secrecy::Public,
        doc: "Cost rows (ai_cost_tracking, the ledger the budget and the reports read) older \
              than this many days are deleted (0-36500: 0, the default, never: the ledger is \
              kept; else at least 62).",
        show: |s| s.retention.ledger_days.to_string(),
    },
    Setting {
        name: "AIQ_PRUNE_INTERVAL_S",
        area: Area::Retention,
        fallback: Fallback::Value("300"),
        kind: Kind::Int {
            min: 10,
            max: 86_400,
        },
        secrecy: Secrecy::Public,
        doc: "How often aiq run tries a pruning pass, in seconds (10-86400); a pass runs only \
              where no other process is pruning.",
        show: |s| s.retention.interval.as_secs().to_string(),
    },
    Setting {
        name: "AIQ_PRUNE_BATCH",
        area: Area::Retention,
        fallback: Fallback::Value("2000"),
        kind: Kind::Int {
            min: 1,
            max: 100_000,
        },
        secrecy: Secrecy::Public,
        doc: "Rows changed or deleted per statement while pruning (1-100000), each batch its \
              own short transaction.",
        show: |s| s.retention.batch.to_string(),
    },
    Setting {
        name: "AIQ_PRUNE_PAUSE_PCT",
        area: Area::Retention,
        fallback: Fallback::Value("100"),
        kind: Kind::Int { min: 0, max: 1000 },
        secrecy: Secrecy::Public,
        doc: "After each batch the pruner rests this percentage of the time the batch took \
              (0-1000): 100, the default, keeps it to at most half the time, so a busy \
              database serves the pipeline first; 0 prunes flat out.",
        show: |s| s.retention.pause_pct.to_string(),
    },
];

#[cfg(test)]
mod tests {
    use super::super::setting::{REDIS_SCHEMES, Value};
    use super::*;
    use proptest::prelude::*;
    use std::collections::{HashMap, HashSet};
    use std::sync::Mutex;

    /// Whether `value` is one the table says `kind` admits: the check the parsers must keep,
    /// written from the bounds, not from the parsers.
    fn admits(kind: &Kind, value: &Value) -> bool {
        let usd_ok = |m: &MicroUsd, max: i64| (0..=max * 1_000_000).contains(&m.micros());
        match (kind, value) {
            (Kind::Int { min, max }, Value::Int(n)) => min <= n && n <= max,
            (Kind::Number { above }, Value::Number(n)) => n.is_finite() && n > above,
            (Kind::Usd { max }, Value::Usd(m)) => usd_ok(m, *max),
            (Kind::TierUsd { max }, Value::TierUsd(ms)) => ms.iter().all(|m| usd_ok(m, *max)),
            (Kind::TierCount { max }, Value::TierCount(ns)) => ns.iter().all(|n| n <= max),
            (Kind::Weights { min, max }, Value::Weights(ws)) => {
                ws.iter().all(|w| min <= w && w <= max)
            }
            (Kind::PerProvider { max }, Value::PerProvider(ns)) => ns.iter().all(|n| n <= max),
            (Kind::Words(words), Value::Word(w)) => words.contains(w),
            (Kind::Url { schemes, .. }, Value::Text(t)) => {
                schemes.iter().any(|s| t.starts_with(&format!("{s}://")))
            }
            (Kind::RedisUrls, Value::Text(t)) => {
                let urls: Vec<&str> = t.split(',').map(str::trim).collect();
                let tls = urls.iter().filter(|u| u.starts_with("rediss://")).count();
                (tls == 0 || tls == urls.len())
                    && urls.iter().all(|u| {
                        REDIS_SCHEMES
                            .iter()
                            .any(|s| u.starts_with(&format!("{s}://")))
                    })
            }
            (Kind::Prefix, Value::Text(t)) => {
                (1..=64).contains(&t.len())
                    && t.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "_-.:".contains(c))
            }
            (Kind::TimeZone, Value::TimeZone(_)) => true,
            (Kind::Addr, Value::Addr(_)) => true,
            (Kind::PemFile(_), Value::Pem(_)) => true,
            (Kind::Path | Kind::Text, Value::Text(t)) => !t.trim().is_empty(),
            _ => false,
        }
    }

    /// A setting's text either parses to a value its kind admits, or is refused naming it.
    fn check(s: &Setting, raw: &str) -> Result<(), TestCaseError> {
        match s.read(Some(raw)) {
            Ok(Value::Unset) => prop_assert!(
                raw.trim().is_empty() && s.fallback == Fallback::Unset,
                "{}={raw:?} read as unset",
                s.name
            ),
            Ok(v) => prop_assert!(admits(&s.kind, &v), "{}={raw:?} gave {v:?}", s.name),
            Err(e) => {
                prop_assert_eq!(e.name, s.name);
                let prefix = format!("setting {}: ", s.name);
                prop_assert!(e.to_string().starts_with(&prefix), "{}", e);
            }
        }
        Ok(())
    }

    #[test]
    fn every_setting_is_named_once_with_a_description_and_a_default_in_its_range() {
        let mut names = HashSet::new();
        for s in SETTINGS {
            assert!(s.name.starts_with("AIQ_"), "{}", s.name);
            assert!(names.insert(s.name), "{} is in the table twice", s.name);
            assert!(!s.doc.trim().is_empty(), "{} has no description", s.name);
            match s.fallback {
                Fallback::Required { example, .. } => {
                    let err = s.read(None).unwrap_err();
                    assert_eq!(err.name, s.name);
                    assert!(err.problem.contains("is missing"), "{err}");
                    let v = s.kind.parse(s.name, example).unwrap();
                    assert!(admits(&s.kind, &v), "{}'s example {example:?}", s.name);
                }
                Fallback::Unset => assert_eq!(s.read(None).unwrap(), Value::Unset),
                Fallback::Value(_) => {
                    let v = s.read(None).unwrap();
                    assert!(admits(&s.kind, &v), "{}'s default gave {v:?}", s.name);
                }
            }
        }
        let order: Vec<usize> = SETTINGS
            .iter()
            .map(|s| Area::ALL.iter().position(|a| *a == s.area).unwrap())
            .collect();
        assert!(order.is_sorted(), "the table lists its settings by area");
    }

    #[test]
    fn every_numeric_setting_has_a_range_and_its_description_gives_it() {
        let numeric = |text: &str| {
            text.split(',')
                .map(|part| part.rsplit('=').next().unwrap_or(part))
                .any(|v| v.trim().parse::<f64>().is_ok())
        };
        for s in SETTINGS {
            if numeric(s.example()) {
                assert!(
                    s.kind.range().is_some(),
                    "{} is a number with no range",
                    s.name
                );
            }
            if let Kind::Int { min, max } = s.kind {
                assert!(min <= max, "{}", s.name);
                assert!(
                    s.doc.contains(&format!("{min}-{max}")),
                    "{}'s description does not give its range {min}-{max}",
                    s.name
                );
            }
        }
        assert!(SETTINGS.iter().filter(|s| s.kind.range().is_some()).count() > 30);
    }

    #[test]
    fn the_defaults_are_the_named_constants() {
        let weights = find("AIQ_TIER_WEIGHTS").read(None).unwrap().weights();
        assert_eq!(weights, super::super::DEFAULT_TIER_WEIGHTS);
        let wait = find("AIQ_STARTUP_WAIT_S").read(None).unwrap().int();
        assert_eq!(wait, crate::startup::DEFAULT_WAIT.as_secs());
    }

    #[test]
    fn loading_reads_every_setting_of_the_table_and_no_other_variable() {
        let asked = Mutex::new(Vec::<String>::new());
        let vars: HashMap<&str, &str> = [
            ("AIQ_DATABASE_URL", "postgres://u@localhost/aiq"),
            ("AIQ_REDIS_URL", "redis://127.0.0.1:6379/"),
        ]
        .into();
        let env = super::super::Env(|k: &str| {
            asked.lock().unwrap().push(k.to_owned());
            vars.get(k).map(|v| v.to_string())
        });
        super::super::Settings::load(&env).unwrap();
        let asked = asked.into_inner().unwrap();
        for s in SETTINGS {
            let times = asked.iter().filter(|k| *k == s.name).count();
            assert_eq!(times, 1, "{} was read {times} times", s.name);
        }
        assert_eq!(asked.len(), SETTINGS.len());
    }

    #[test]
    fn a_value_that_is_not_utf8_is_refused_naming_its_setting() {
        for s in SETTINGS {
            let err = s.read(Some("\0")).unwrap_err();
            assert_eq!(err.name, s.name);
            assert!(err.problem.contains("not UTF-8"), "{err}");
        }
    }

    const ENV_EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/.env.example");

    /// `.env.example` lines: (area title, variable, value), in order; comments and blank lines
    /// left out.
    fn env_example_file() -> Vec<(String, String, String)> {
        let mut area = String::new();
        let mut out = Vec::new();
        for line in std::fs::read_to_string(ENV_EXAMPLE).unwrap().lines() {
            if let Some(title) = line.strip_prefix("# --- ") {
                area = title.trim_end_matches(['-', ' ']).to_owned();
            } else if !line.starts_with('#') && !line.trim().is_empty() {
                let (k, v) = line.split_once('=').expect("NAME=value");
                out.push((area.clone(), k.to_owned(), v.to_owned()));
            }
        }
        out
    }

    #[test]
    fn env_example_holds_every_setting_once_under_its_area_with_its_default_and_nothing_else() {
        let file = env_example_file();
        for s in SETTINGS {
            let lines: Vec<_> = file.iter().filter(|(_, k, _)| k == s.name).collect();
            assert_eq!(
                lines.len(),
                1,
                "{} is in .env.example {} times",
                s.name,
                lines.len()
            );
            let (area, _, value) = lines[0];
            assert_eq!(area, s.area.title(), "{}'s section", s.name);
            assert_eq!(value, s.example(), "{}'s value in .env.example", s.name);
        }
        for (_, k, _) in &file {
            assert!(
                SETTINGS.iter().any(|s| s.name == k),
                "{k} in .env.example is not a setting"
            );
        }
    }

    /// `.env.example` is written from the table; to write it again after changing the table:
    /// `AIQ_WRITE_ENV_EXAMPLE=1 cargo test --lib config::table`.
    #[test]
    fn env_example_is_the_table_written_out() {
        let text = env_example();
        if std::env::var_os("AIQ_WRITE_ENV_EXAMPLE").is_some() {
            std::fs::write(ENV_EXAMPLE, &text).unwrap();
        }
        let file = std::fs::read_to_string(ENV_EXAMPLE).unwrap();
        for (i, (want, got)) in text.lines().zip(file.lines()).enumerate() {
            assert_eq!(got, want, ".env.example line {}", i + 1);
        }
        assert_eq!(text.lines().count(), file.lines().count());
        assert!(
            text.lines()
                .all(|l| l.len() <= WIDTH || !l.starts_with('#'))
        );
    }

    #[test]
    fn the_systemd_template_names_only_settings_of_the_table_with_values_they_take() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/systemd/aiq.env.example");
        let text = std::fs::read_to_string(path).unwrap();
        let mut named = 0;
        for line in text.lines() {
            let commented = line.starts_with('#');
            let line = line.trim_start_matches(['#', ' ']);
            let Some((name, value)) = line.split_once('=') else {
                continue;
            };
            if !name.starts_with("AIQ_") || name.contains(' ') {
                continue;
            }
            let s = SETTINGS.iter().find(|s| s.name == name);
            let s = s.unwrap_or_else(|| panic!("{name} in the systemd template is not a setting"));
            named += 1;
            // The commented lines name files that exist only on a server.
            if !commented {
                assert!(
                    s.read(Some(value)).is_ok(),
                    "{name}={value} in the systemd template"
                );
            }
        }
        assert!(named > 20, "{named} settings in the systemd template");
    }

    /// Text for the parsers: anything, and the shapes the settings take, near their edges.
    fn setting_text() -> impl Strategy<Value = String> {
        let number = "[-+ ]?[0-9]{0,24}(\\.[0-9]{0,9})?(e[0-9]{1,3})? ?";
        let special = prop::sample::select(vec![
            "NaN",
            "nan",
            "inf",
            "-inf",
            "infinity",
            "1e309",
            "-0",
            "0x10",
            "1_000",
            "",
            " ",
            "\u{0}",
            "\u{FFFD}",
            "\u{7f}",
            "4294967296",
            "18446744073709551616",
            "1000000000.000001",
            "1000000000",
            "9007199254740993",
        ]);
        let mut words: Vec<&str> = SETTINGS
            .iter()
            .flat_map(|s| match s.kind {
                Kind::Words(w) => w.to_vec(),
                _ => vec![],
            })
            .collect();
        words.extend(Tier::ALL.map(|t| t.as_str()));
        words.extend(PROVIDERS);
        words.extend([
            "gold",
            "",
            "UTC",
            "Europe/Berlin",
            "127.0.0.1:9464",
            "[::1]:0",
        ]);
        let word = prop::sample::select(words);
        let pair = (
            word.clone(),
            prop_oneof![
                number.prop_map(|n| n),
                special.clone().prop_map(String::from)
            ],
        );
        let list = prop::collection::vec(pair, 0..9).prop_map(|pairs| {
            let parts: Vec<String> = pairs.into_iter().map(|(k, v)| format!("{k}={v}")).collect();
            parts.join(",")
        });
        let weights = prop::collection::vec(number, 0..9).prop_map(|ws| ws.join(","));
        let url = "(https?|redis|rediss|unix|redis\\+unix|postgres|postgresql|ftp|)(://)?\
                   [a-z0-9.:@/,?=&-]{0,24}";
        prop_oneof![
            any::<String>(),
            "[ -~]{0,70}",
            number.prop_map(|n| n),
            special.prop_map(String::from),
            word.prop_map(|w| format!(" {w} ")),
            list,
            weights,
            url.prop_map(|u| u),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3_000))]

        /// Every setting's parser, on generated text: it never panics, and either gives a value
        /// in the setting's range or refuses naming the setting.
        #[test]
        fn every_setting_either_takes_a_value_in_its_range_or_refuses_naming_itself(
            raw in setting_text(),
        ) {
            for s in SETTINGS {
                check(s, &raw)?;
            }
        }
    }

    #[test]
    fn numbers_are_refused_just_outside_their_ranges_and_taken_at_their_edges() {
        for s in SETTINGS {
            let Kind::Int { min, max } = s.kind else {
                continue;
            };
            assert!(
                s.read(Some(&min.to_string())).is_ok(),
                "{} at {min}",
                s.name
            );
            assert!(
                s.read(Some(&max.to_string())).is_ok(),
                "{} at {max}",
                s.name
            );
            for bad in [max + 1, u64::MAX].into_iter().chain(min.checked_sub(1)) {
                let err = s.read(Some(&bad.to_string())).unwrap_err();
                assert_eq!(err.name, s.name);
                assert!(err.problem.contains("out of range"), "{err}");
            }
        }
        let usd = find("AIQ_GLOBAL_DAILY_LIMIT_USD");
        assert!(usd.read(Some("1000000000")).is_ok());
        let err = usd.read(Some("1000000000.000001")).unwrap_err();
        assert!(
            err.problem.contains("more than 1000000000 dollars"),
            "{err}"
        );
        let rpm = find("AIQ_PROVIDER_RPM");
        let err = rpm.read(Some("openai=1000000000001")).unwrap_err();
        assert!(err.problem.contains("more than"), "{err}");
    }
}
