//! Circuit breakers, one per provider, shared by every aiq process through Redis. A run of
//! provider faults (5xx, 529, timeouts, broken connections, garbage) opens a provider's breaker:
//! its jobs then wait in the delayed set, spending no attempt, until the cooldown ends; then one
//! probe call goes through, and its outcome closes the breaker or opens it again. Requests the
//! provider refused as ours to fix (4xx), rate limits, and our own budget refusals never count.
//! A rate limit with a Retry-After pauses the provider for every process instead, until then.

use std::sync::LazyLock;
use std::time::Duration;

use redis::{AsyncCommands, Script};

use super::ErrorKind;
use crate::domain::Provider;
use crate::redis_conn::Conn;

static BREAKER: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("breaker.lua")));
static THROTTLE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("throttle.lua")));

pub use crate::config::BreakerSettings;
/// The providers a breaker can guard.
pub use crate::domain::PROVIDERS;

/// Does this failure say the provider is unwell (rather than our request being wrong)?
pub fn is_provider_fault(kind: ErrorKind) -> bool {
    matches!(
        kind,
        ErrorKind::Unavailable
            | ErrorKind::Timeout
            | ErrorKind::Connection
            | ErrorKind::Malformed
            | ErrorKind::Oversize
    )
}

/// How a call was admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// The breaker is closed.
    Closed,
    /// The call is the half-open breaker's one probe.
    Probe,
}

/// What holds a call back: the provider's pause (a 429's Retry-After) or an open circuit
/// breaker (the provider's, or the organisation's own for it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeldBy {
    Pause,
    Breaker,
}

/// The answer of breaker.lua's admit and peek: `{1}`, `{1, 1}` (the probe), `{0, wait}` (a
/// pause) or `{0, wait, 1}` (a breaker).
fn admitted(reply: &[i64]) -> Result<Admit, (Duration, HeldBy)> {
    let wait = |ms: i64| Duration::from_millis(ms.max(1) as u64);
    match reply {
        [0, ms] => Err((wait(*ms), HeldBy::Pause)),
        [0, ms, 1] => Err((wait(*ms), HeldBy::Breaker)),
        [1, 1] => Ok(Admit::Probe),
        _ => Ok(Admit::Closed),
    }
}

/// Which breaker a recorded failure opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opened {
    No,
    /// The provider's, for every organisation.
    Provider,
    /// Only the failing organisation's own, for this provider.
    Organization,
}

/// A breaker's state as `/readyz` and `/metrics` show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open { remaining: Duration },
    HalfOpen,
}

/// A breaker's state from its hash's `state` and `until` (ms) at `now` (ms).
fn state_of(state: Option<&str>, until: u64, now: u64) -> BreakerState {
    match state {
        Some("open") if until > now => BreakerState::Open {
            remaining: Duration::from_millis(until - now),
        },
        Some("open") | Some("half_open") => BreakerState::HalfOpen,
        _ => BreakerState::Closed,
    }
}

/// A provider now ([`Breakers::now`]).
#[derive(Debug, Clone)]
pub struct ProviderNow {
    pub provider: &'static str,
    pub breaker: BreakerState,
    /// What is left of a pause a 429 set; `None` when not paused.
    pub paused: Option<Duration>,
    /// This minute's requests and tokens counted against the limits (`None`: not a number in
    /// Redis), and the limits (0: none).
    pub rpm_used: Option<u64>,
    pub rpm: u64,
    pub tpm_used: Option<u64>,
    pub tpm: u64,
}

#[derive(Clone)]
pub struct Breakers {
    conn: Conn,
    base: String,
    settings: BreakerSettings,
}

impl Breakers {
    /// `prefix`: the platform-wide key prefix (the budget's), so every queue shares breakers.
    pub async fn connect(
        redis: &crate::config::RedisSettings,
        prefix: &str,
        settings: BreakerSettings,
    ) -> Result<Self, crate::redis_conn::ConnectError> {
        Ok(Self {
            conn: Conn::connect(redis).await?,
            base: format!("{{{prefix}}}"),
            settings,
        })
    }

    async fn op(&self, op: &str, provider: &str, org: &str) -> redis::RedisResult<Vec<i64>> {
        // A probe that never reports back frees the way after a timeout's worth of time.
        let probe_ms = self.settings.cooldown.as_millis().max(1000) as u64;
        self.op_with(op, provider, probe_ms, org).await
    }

    async fn op_with(
        &self,
        op: &str,
        provider: &str,
        probe_ms: u64,
        org: &str,
    ) -> redis::RedisResult<Vec<i64>> {
        let mut conn = self.conn.clone();
        BREAKER
            .key(&self.base)
            .arg(op)
            .arg(provider)
            .arg(self.settings.failures)
            .arg(self.settings.cooldown.as_millis() as u64)
            .arg(probe_ms)
            .arg(org)
            .invoke_async(&mut conn)
            .await
    }

    /// Ok when a call of organisation `org` to `provider` may go now; Err(wait) while the
    /// provider is paused, or its breaker or the organisation's own is open.
    pub async fn admit(
        &self,
        provider: Provider,
        org: &str,
    ) -> redis::RedisResult<Result<(), Duration>> {
        Ok(self
            .admit_call(provider, org)
            .await?
            .map(|_| ())
            .map_err(|(wait, _)| wait))
    }

    /// [`Breakers::admit`], saying whether the call is the half-open breaker's one probe: a
    /// job given it that then makes no call must [`Breakers::release_probe`], or recovery
    /// waits a whole probe timeout.
    pub async fn admit_call(
        &self,
        provider: Provider,
        org: &str,
    ) -> redis::RedisResult<Result<Admit, (Duration, HeldBy)>> {
        Ok(admitted(&self.op("admit", provider.as_str(), org).await?))
    }

    /// [`Breakers::admit_call`] without taking anything: `Ok(Admit::Probe)` says the half-open
    /// probe is free to take. A job checks every other gate and reserves its budget first, then
    /// takes it with `admit_call`, so no probe is handed to a job that something else then holds
    /// back.
    pub async fn peek_call(
        &self,
        provider: Provider,
        org: &str,
    ) -> redis::RedisResult<Result<Admit, (Duration, HeldBy)>> {
        Ok(admitted(&self.op("peek", provider.as_str(), org).await?))
    }

    /// Gives back a half-open probe that was granted but not made: the next job may probe.
    pub async fn release_probe(&self, provider: Provider) -> redis::RedisResult<()> {
        self.op("release", provider.as_str(), "").await.map(|_| ())
    }

    /// Records a call's outcome: a success closes the provider's breaker and the
    /// organisation's, a provider fault counts toward opening them (the provider's only when
    /// the faults span several organisations), anything else leaves them as they are. Says
    /// which breaker this call opened, if any.
    pub async fn record(
        &self,
        provider: Provider,
        org: &str,
        outcome: Result<(), ErrorKind>,
    ) -> redis::RedisResult<Opened> {
        match outcome {
            Ok(()) => self
                .op("success", provider.as_str(), org)
                .await
                .map(|_| Opened::No),
            Err(kind) if is_provider_fault(kind) => Ok(
                match self.op("failure", provider.as_str(), org).await?.as_slice() {
                    [1] => Opened::Provider,
                    [2] => Opened::Organization,
                    _ => Opened::No,
                },
            ),
            Err(_) => Ok(Opened::No),
        }
    }

    /// The provider's fleet-wide tokens-per-minute limit, when one is set: a call that needs
    /// more can never be admitted.
    pub fn tokens_per_minute(&self, provider: Provider) -> Option<u64> {
        Some(self.settings.tpm[provider.index()]).filter(|t| *t > 0)
    }

    /// Counts a call against the provider's requests- and tokens-per-minute limits, held across
    /// every process; `Err(wait)` when it would pass one (the job waits for the next minute).
    pub async fn throttle(
        &self,
        provider: Provider,
        tokens: u64,
    ) -> redis::RedisResult<Result<(), Duration>> {
        let (rpm, tpm) = (
            self.settings.rpm[provider.index()],
            self.settings.tpm[provider.index()],
        );
        if rpm == 0 && tpm == 0 {
            return Ok(Ok(()));
        }
        let mut conn = self.conn.clone();
        let wait: u64 = THROTTLE
            .key(&self.base)
            .arg(provider.as_str())
            .arg(rpm)
            .arg(tpm)
            .arg(tokens)
            .invoke_async(&mut conn)
            .await?;
        Ok(if wait == 0 {
            Ok(())
        } else {
            Err(Duration::from_millis(wait))
        })
    }

    /// A provider said "too many requests, come back in `wait`": no process calls it until then.
    pub async fn pause(&self, provider: Provider, wait: Duration) -> redis::RedisResult<()> {
        self.op_with(
            "pause",
            provider.as_str(),
            wait.as_millis().max(1) as u64,
            "",
        )
        .await
        .map(|_| ())
    }

    /// Every provider now, for the console: its breaker, its pause and this minute's use of its
    /// requests- and tokens-per-minute limits, in two round trips (the clock, then one pipeline).
    /// A value in Redis that is not a number reads as unknown, never as an error of the page.
    pub async fn now(&self) -> redis::RedisResult<Vec<ProviderNow>> {
        let mut conn = self.conn.clone();
        let t: (u64, u64) = redis::cmd("TIME").query_async(&mut conn).await?;
        let now = t.0 * 1000 + t.1 / 1000;
        let minute = now / 60_000;
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for p in PROVIDERS {
            pipe.hmget(
                format!("{}:breaker:{p}", self.base),
                &["state", "until", "paused_until"],
            )
            .get(format!("{}:rpm:{p}:{minute}", self.base))
            .get(format!("{}:tpm:{p}:{minute}", self.base));
        }
        let replies: Vec<redis::Value> = pipe.query_async(&mut conn).await?;
        let number = |v: &redis::Value| -> Option<u64> {
            match v {
                redis::Value::Nil => Some(0),
                redis::Value::Int(n) => u64::try_from(*n).ok(),
                redis::Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
                _ => None,
            }
        };
        let mut out = Vec::with_capacity(PROVIDERS.len());
        for (i, (p, r)) in PROVIDERS.iter().zip(replies.chunks(3)).enumerate() {
            let [fields, rpm, tpm] = r else { break };
            let f: Vec<redis::Value> = match fields {
                redis::Value::Array(f) => f.clone(),
                _ => Vec::new(),
            };
            let text = |k: usize| match f.get(k) {
                Some(redis::Value::BulkString(b)) => std::str::from_utf8(b).ok().map(str::to_owned),
                _ => None,
            };
            let ms = |k: usize| text(k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            let paused = ms(2);
            out.push(ProviderNow {
                provider: p,
                breaker: state_of(text(0).as_deref(), ms(1), now),
                paused: (paused > now).then(|| Duration::from_millis(paused - now)),
                rpm_used: number(rpm),
                rpm: self.settings.rpm[i],
                tpm_used: number(tpm),
                tpm: self.settings.tpm[i],
            });
        }
        Ok(out)
    }

    /// Every provider's breaker.
    pub async fn states(&self) -> redis::RedisResult<Vec<(&'static str, BreakerState)>> {
        let mut conn = self.conn.clone();
        let t: (u64, u64) = redis::cmd("TIME").query_async(&mut conn).await?;
        let now = t.0 * 1000 + t.1 / 1000;
        let mut out = Vec::with_capacity(PROVIDERS.len());
        for p in PROVIDERS {
            let (state, until): (Option<String>, Option<u64>) = conn
                .hmget(format!("{}:breaker:{p}", self.base), &["state", "until"])
                .await?;
            out.push((p, state_of(state.as_deref(), until.unwrap_or(0), now)));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod admitted_tests {
    use super::*;

    #[test]
    fn breaker_lua_s_answers_tell_a_pause_from_an_open_breaker() {
        let ms = Duration::from_millis;
        assert_eq!(admitted(&[1]), Ok(Admit::Closed));
        assert_eq!(admitted(&[1, 1]), Ok(Admit::Probe));
        assert_eq!(admitted(&[0, 250]), Err((ms(250), HeldBy::Pause)));
        assert_eq!(admitted(&[0, 900, 1]), Err((ms(900), HeldBy::Breaker)));
        // A wait of zero or less is still a wait (one millisecond), never a pass.
        assert_eq!(admitted(&[0, -5, 1]), Err((ms(1), HeldBy::Breaker)));
    }
}
