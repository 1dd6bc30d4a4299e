//! What an entry of the [table](super::table) is: a setting's area, fallback, secrecy and kind,
//! and the parsers, which check each value where it enters, naming the setting when they refuse.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use super::{ConfigError, Settings, bad, check_url};
use crate::domain::{MicroUsd, PROVIDERS, Tier};
use crate::tls::PemFile;

/// Where a setting belongs: its section of `.env.example`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Area {
    Redis,
    Database,
    Queue,
    Retries,
    Lifecycle,
    Admin,
    Telemetry,
    Breakers,
    Budget,
    Providers,
    Webhooks,
    Retention,
}

impl Area {
    /// Every area, in the order of `.env.example` and `aiq config`.
    pub const ALL: [Area; 12] = [
        Area::Redis,
        Area::Database,
        Area::Queue,
        Area::Retries,
        Area::Lifecycle,
        Area::Admin,
        Area::Telemetry,
        Area::Breakers,
        Area::Budget,
        Area::Providers,
        Area::Webhooks,
        Area::Retention,
    ];

    /// The section's header in `.env.example`.
    pub fn title(self) -> &'static str {
        match self {
            Area::Redis => "Redis",
            Area::Database => "PostgreSQL",
            Area::Queue => "Queue",
            Area::Retries => "Retries",
            Area::Lifecycle => "Start-up and shutdown",
            Area::Admin => "Admin port",
            Area::Telemetry => "Logs and Sentry",
            Area::Breakers => "Circuit breakers and provider rates",
            Area::Budget => "Money",
            Area::Providers => "Providers",
            Area::Webhooks => "Webhooks",
            Area::Retention => "Retention",
        }
    }

    /// What the section's settings share, said once under its header; empty when nothing is.
    pub fn about(self) -> &'static str {
        match self {
            Area::Redis => {
                "Redis holds the queue, the budget's counters and the breakers. All TLS is \
                 rustls (aws-lc-rs). A file that is missing or not PEM stops start-up naming its \
                 setting; a server whose certificate does not verify stops it at once, naming the \
                 server and the setting to check."
            }
            Area::Budget => {
                "Every provider call first reserves its most possible cost in four scopes \
                 (organisation per day and month, platform per day and month); a call that does \
                 not fit is not made. Amounts in USD, at most 1000000000 each."
            }
            Area::Providers => {
                "Base URLs default to the real providers; point them at `aiq-dev fake-providers` \
                 for tests."
            }
            Area::Webhooks => {
                "Jobs' final events are posted, signed (Standard Webhooks), to the organisations' \
                 endpoints (`aiq webhooks add`) and to a job's callback_url, from an outbox in \
                 PostgreSQL."
            }
            Area::Retention => {
                "Old rows are pruned by one process at a time (a PostgreSQL advisory lock), in \
                 batches of short transactions, every AIQ_PRUNE_INTERVAL_S; `aiq prune` runs one \
                 pass now. A retention of 0 days means never: that data is kept forever."
            }
            _ => "",
        }
    }
}

/// What a setting is when its variable is unset or blank.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// This text, parsed like a value the operator gave.
    Value(&'static str),
    /// Nothing: the feature it names is off, or a built-in is used.
    Unset,
    /// The setting must be given. `example` is its line in `.env.example`, `hint` what the
    /// refusal asks for.
    Required {
        example: &'static str,
        hint: &'static str,
    },
}

/// How `aiq config` prints a setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Secrecy {
    Public,
    /// Printed as `***` when set; listed by [`Settings::secrets`] for the scrubbers.
    Secret,
    /// A URL whose passwords are masked; the passwords are listed by [`Settings::secrets`].
    UrlPassword,
}

/// Which PEM file a setting names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pem {
    Certificates,
    PrivateKey,
}

/// How a setting's text parses, and the values it admits. Every number has its bounds here.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    /// A whole number in `min..=max`.
    Int { min: u64, max: u64 },
    /// A finite decimal number above `above`.
    Number { above: f64 },
    /// A dollar amount, at most `max` dollars.
    Usd { max: i64 },
    /// `tier=amount,...` naming all six tiers, each at most `max` dollars.
    TierUsd { max: i64 },
    /// `tier=n,...` naming all six tiers, each at most `max`.
    TierCount { max: u32 },
    /// Six weights separated by commas, highest tier first, each in `min..=max`.
    Weights { min: u32, max: u32 },
    /// `provider=n,...` naming any of the providers (the others get 0), each at most `max`.
    PerProvider { max: u64 },
    /// One of these words.
    Words(&'static [&'static str]),
    /// A URL with one of these schemes; `trim_slash` drops trailing slashes (base URLs).
    Url {
        schemes: &'static [&'static str],
        trim_slash: bool,
    },
    /// One Redis URL, or several seed nodes separated by commas, all with TLS or none.
    RedisUrls,
    /// A Redis key prefix: 1-64 characters of letters, digits, `_ - . :`.
    Prefix,
    /// An IANA time zone.
    TimeZone,
    /// A socket address like 127.0.0.1:9464.
    Addr,
    /// A PEM file, read and checked.
    PemFile(Pem),
    /// A file path, read later.
    Path,
    /// Any text.
    Text,
}

/// The words of an on/off setting.
pub(super) const FLAG: &[&str] = &["false", "0", "true", "1"];
pub(super) const REDIS_SCHEMES: &[&str] = &["redis", "rediss", "unix", "redis+unix"];
pub(super) const HTTP: &[&str] = &["http", "https"];
/// The largest dollar amount a limit may be: micro-dollars stay below 2^53, so the budget's Lua
/// scripts, whose numbers are doubles, count them exactly.
pub(super) const MAX_USD: i64 = 1_000_000_000;
/// The largest requests or tokens per minute, for the same reason.
pub(super) const MAX_PER_MINUTE: u64 = 1_000_000_000_000;

/// A parsed setting, before the load functions put it into its struct.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Unset,
    Int(u64),
    Number(f64),
    Usd(MicroUsd),
    TierUsd([MicroUsd; 6]),
    TierCount([u32; 6]),
    Weights([u32; 6]),
    PerProvider([u64; 4]),
    /// The word as the table spells it.
    Word(&'static str),
    Text(String),
    TimeZone(chrono_tz::Tz),
    Addr(SocketAddr),
    Pem(PemFile),
}

/// A kind and a value that do not go together: the load functions asked a setting for the
/// wrong type, a mistake in this module that the unit tests, which load every setting, find.
fn mismatch(v: &Value, wanted: &str) -> ! {
    panic!("a setting parsed to {v:?} was read as {wanted}")
}

impl Value {
    pub fn int(self) -> u64 {
        match self {
            Value::Int(n) => n,
            v => mismatch(&v, "a whole number"),
        }
    }
    pub fn millis(self) -> Duration {
        Duration::from_millis(self.int())
    }
    pub fn number(self) -> f64 {
        match self {
            Value::Number(n) => n,
            v => mismatch(&v, "a number"),
        }
    }
    pub fn usd(self) -> MicroUsd {
        match self {
            Value::Usd(m) => m,
            v => mismatch(&v, "a dollar amount"),
        }
    }
    pub fn tier_usd(self) -> [MicroUsd; 6] {
        match self {
            Value::TierUsd(m) => m,
            v => mismatch(&v, "dollars per tier"),
        }
    }
    pub fn tier_count(self) -> [u32; 6] {
        match self {
            Value::TierCount(n) => n,
            v => mismatch(&v, "numbers per tier"),
        }
    }
    pub fn weights(self) -> [u32; 6] {
        match self {
            Value::Weights(w) => w,
            v => mismatch(&v, "weights"),
        }
    }
    pub fn per_provider(self) -> [u64; 4] {
        match self {
            Value::PerProvider(n) => n,
            v => mismatch(&v, "numbers per provider"),
        }
    }
    pub fn word(self) -> &'static str {
        match self {
            Value::Word(w) => w,
            v => mismatch(&v, "a word"),
        }
    }
    /// An on/off setting's value.
    pub fn flag(self) -> bool {
        matches!(self.word(), "true" | "1")
    }
    /// Text, or None for a setting that is unset.
    pub fn text(self) -> Option<String> {
        match self {
            Value::Unset => None,
            Value::Text(t) => Some(t),
            v => mismatch(&v, "text"),
        }
    }
    pub fn time_zone(self) -> chrono_tz::Tz {
        match self {
            Value::TimeZone(tz) => tz,
            v => mismatch(&v, "a time zone"),
        }
    }
    pub fn addr(self) -> SocketAddr {
        match self {
            Value::Addr(a) => a,
            v => mismatch(&v, "a socket address"),
        }
    }
    pub fn pem(self) -> Option<PemFile> {
        match self {
            Value::Unset => None,
            Value::Pem(p) => Some(p),
            v => mismatch(&v, "a PEM file"),
        }
    }
}

/// One setting: everything aiq knows about one `AIQ_*` variable.
pub struct Setting {
    pub name: &'static str,
    pub area: Area,
    pub fallback: Fallback,
    pub kind: Kind,
    pub secrecy: Secrecy,
    /// Its comment in `.env.example`: one paragraph, wrapped when written.
    pub doc: &'static str,
    /// Its effective value, before masking (`aiq config`, and the secrets the scrubbers hide).
    pub show: fn(&Settings) -> String,
}

impl Setting {
    /// The value of the variable as read (`None`: unset), parsed and checked. Blank means unset;
    /// text that is not UTF-8 is refused (see [`super::process_lookup`]).
    pub fn read(&self, raw: Option<&str>) -> Result<Value, ConfigError> {
        match raw.filter(|v| !v.trim().is_empty()) {
            Some(v) if v.contains('\0') => Err(bad(
                self.name,
                "holds bytes that are not UTF-8 text (or a NUL byte)",
            )),
            Some(v) => self.kind.parse(self.name, v),
            None => match self.fallback {
                Fallback::Value(text) => self.kind.parse(self.name, text),
                Fallback::Unset => Ok(Value::Unset),
                Fallback::Required { hint, .. } => {
                    Err(bad(self.name, format!("is missing; set it to {hint}")))
                }
            },
        }
    }

    /// The value `.env.example` gives it: its default, or an example for a required one.
    pub fn example(&self) -> &'static str {
        match self.fallback {
            Fallback::Value(text) => text,
            Fallback::Unset => "",
            Fallback::Required { example, .. } => example,
        }
    }

    /// What `aiq config` prints: secrets masked.
    pub fn shown(&self, settings: &Settings) -> String {
        let value = (self.show)(settings);
        match self.secrecy {
            Secrecy::Public => value,
            Secrecy::Secret if value.is_empty() => value,
            Secrecy::Secret => "***".to_owned(),
            Secrecy::UrlPassword => crate::redact::url(&value).into_owned(),
        }
    }
}

impl Kind {
    /// Parses `v` (not blank) for the setting `name`; a refusal names it.
    pub fn parse(&self, name: &'static str, v: &str) -> Result<Value, ConfigError> {
        match *self {
            Kind::Int { min, max } => {
                let n: u64 = v
                    .trim()
                    .parse()
                    .map_err(|_| bad(name, format!("{v:?} is not a whole number")))?;
                if !(min..=max).contains(&n) {
                    return Err(bad(name, format!("{n} is out of range {min}..={max}")));
                }
                Ok(Value::Int(n))
            }
            Kind::Number { above } => {
                let n: f64 = v
                    .trim()
                    .parse()
                    .map_err(|_| bad(name, format!("{v:?} is not a number like 3 or 2.5")))?;
                if !(n.is_finite() && n > above) {
                    return Err(bad(name, format!("must be a number above {above}")));
                }
                Ok(Value::Number(n))
            }
            Kind::Usd { max } => usd(v, max).map(Value::Usd).map_err(|e| bad(name, e)),
            Kind::TierUsd { max } => {
                per_tier(name, v, |s| usd(s, max).map_err(|_| usd_problem(s, max)))
                    .map(Value::TierUsd)
            }
            Kind::TierCount { max } => per_tier(name, v, |s| match s.parse::<u32>() {
                Ok(n) if n <= max => Ok(n),
                Ok(_) => Err(format!("is more than {max}")),
                Err(_) => Err("is not a whole number".to_owned()),
            })
            .map(Value::TierCount),
            Kind::Weights { min, max } => weights(name, v, min, max).map(Value::Weights),
            Kind::PerProvider { max } => per_provider(name, v, max).map(Value::PerProvider),
            Kind::Words(words) => words
                .iter()
                .find(|w| **w == v.trim())
                .map(|w| Value::Word(w))
                .ok_or_else(|| bad(name, format!("{v:?} must be one of {}", words.join(", ")))),
            Kind::Url {
                schemes,
                trim_slash,
            } => {
                check_url(name, v, schemes)?;
                if !trim_slash {
                    return Ok(Value::Text(v.to_owned()));
                }
                // `http:///` is not a base URL once its slashes are gone.
                let base = v.trim_end_matches('/');
                check_url(name, base, schemes)?;
                Ok(Value::Text(base.to_owned()))
            }
            Kind::RedisUrls => {
                let urls: Vec<&str> = v.split(',').map(str::trim).collect();
                for u in &urls {
                    check_url(name, u, REDIS_SCHEMES)?;
                }
                let tls = urls.iter().filter(|u| u.starts_with("rediss://")).count();
                if tls != 0 && tls != urls.len() {
                    return Err(bad(
                        name,
                        "mixes rediss:// and plain nodes; a cluster's seed nodes all use TLS or none does",
                    ));
                }
                Ok(Value::Text(v.to_owned()))
            }
            Kind::Prefix => {
                let ok = (1..=64).contains(&v.len())
                    && v.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "_-.:".contains(c));
                if !ok {
                    return Err(bad(
                        name,
                        format!("{v:?} must be 1-64 characters of letters, digits, _ - . :"),
                    ));
                }
                Ok(Value::Text(v.to_owned()))
            }
            Kind::TimeZone => v.trim().parse().map(Value::TimeZone).map_err(|_| {
                bad(
                    name,
                    format!("{v:?} is not an IANA time zone like UTC or Europe/Berlin"),
                )
            }),
            Kind::Addr => v.trim().parse().map(Value::Addr).map_err(|_| {
                bad(
                    name,
                    format!("{v:?} is not a socket address like 127.0.0.1:9464"),
                )
            }),
            Kind::PemFile(pem) => {
                let read = match pem {
                    Pem::Certificates => PemFile::certificates,
                    Pem::PrivateKey => PemFile::private_key,
                };
                read(Path::new(v.trim()))
                    .map(Value::Pem)
                    .map_err(|e| bad(name, e))
            }
            Kind::Path | Kind::Text => Ok(Value::Text(v.to_owned())),
        }
    }

    /// The bounds of a numeric kind, as `.env.example` and the tests say them; None for the
    /// kinds that are not numbers.
    pub fn range(&self) -> Option<String> {
        Some(match *self {
            Kind::Int { min, max } => format!("{min}..={max}"),
            Kind::Number { above } => format!("above {above}, finite"),
            Kind::Usd { max } | Kind::TierUsd { max } => format!("0..={max} dollars"),
            Kind::TierCount { max } => format!("0..={max} per tier"),
            Kind::Weights { min, max } => format!("{min}..={max} per tier"),
            Kind::PerProvider { max } => format!("0..={max} per provider"),
            _ => return None,
        })
    }
}

fn usd_problem(s: &str, max: i64) -> String {
    match MicroUsd::parse_usd(s) {
        Ok(_) => format!("is more than {max} dollars"),
        Err(_) => "is not a dollar amount".to_owned(),
    }
}

/// A dollar amount of at most `max` dollars.
fn usd(v: &str, max: i64) -> Result<MicroUsd, String> {
    let m = MicroUsd::parse_usd(v).map_err(|e| e.to_string())?;
    if m.micros() > max * 1_000_000 {
        return Err(format!("{v:?} is more than {max} dollars"));
    }
    Ok(m)
}

/// Parses `tier=value,...` naming all six tiers; `parse` says what is wrong with one value.
fn per_tier<T: Copy + Default>(
    name: &'static str,
    v: &str,
    parse: impl Fn(&str) -> Result<T, String>,
) -> Result<[T; 6], ConfigError> {
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
            .map_err(|problem| bad(name, format!("{:?} for {tier} {problem}", value.trim())))?;
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

fn weights(name: &'static str, v: &str, min: u32, max: u32) -> Result<[u32; 6], ConfigError> {
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
            Ok(w) if (min..=max).contains(&w) => w,
            _ => {
                return Err(bad(
                    name,
                    format!("weight {p:?} must be a whole number from {min} to {max}"),
                ));
            }
        };
    }
    Ok(out)
}

/// `provider=N,...` for any of the providers; unnamed ones get 0 (no limit).
fn per_provider(name: &'static str, v: &str, max: u64) -> Result<[u64; 4], ConfigError> {
    let mut out = [0u64; 4];
    for part in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (p, n) = part
            .split_once('=')
            .ok_or_else(|| bad(name, format!("{part:?} must look like provider=number")))?;
        let i = PROVIDERS
            .iter()
            .position(|x| *x == p.trim())
            .ok_or_else(|| {
                bad(
                    name,
                    format!("unknown provider {p:?}: expected {}", PROVIDERS.join(", ")),
                )
            })?;
        out[i] = match n.trim().parse::<u64>() {
            Ok(n) if n <= max => n,
            Ok(_) => return Err(bad(name, format!("{n:?} for {p} is more than {max}"))),
            Err(_) => return Err(bad(name, format!("{n:?} for {p} is not a whole number"))),
        };
    }
    Ok(out)
}
