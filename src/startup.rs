//! Waiting for Redis and PostgreSQL at start-up. At boot they may come up after aiq, or be away
//! for a while: `aiq migrate` and `aiq run` wait for them for up to `AIQ_STARTUP_WAIT_S` (an
//! hour by default) instead of exiting, so systemd counts no restarts and its start limit is
//! never reached by an outage. While it waits, aiq tells systemd to extend the start timeout
//! (`EXTEND_TIMEOUT_USEC`), so `TimeoutStartSec=` bounds a start that makes no progress, not one
//! that waits for a dependency. Errors that no wait can fix (a certificate that does not verify,
//! a wrong password, a missing database) end the wait at once.

use std::time::{Duration, Instant};

/// How long aiq waits at start-up when `AIQ_STARTUP_WAIT_S` is not set.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(3600);

/// How often a wait says so in the log.
const LOG_EVERY: Duration = Duration::from_secs(30);

/// How much each extension of systemd's start timeout grants: well above the longest pause
/// between two of them (the retry delay, at most 5 s, plus a connection attempt's timeout).
const EXTEND_BY: Duration = Duration::from_secs(60);

/// One dependency's wait: call [`Patience::again`] after each failed attempt that a wait can
/// fix.
pub struct Patience {
    what: &'static str,
    wait: Duration,
    started: Instant,
    delay: Duration,
    told: Option<Instant>,
}

impl Patience {
    pub fn new(what: &'static str, wait: Duration) -> Self {
        Self {
            what,
            wait,
            started: Instant::now(),
            delay: Duration::from_millis(100),
            told: None,
        }
    }

    /// After a failed attempt: false when the wait is over (the caller gives up with `error`);
    /// else logs now and then, keeps systemd waiting, sleeps a growing delay and returns true.
    pub async fn again(&mut self, error: &dyn std::fmt::Display) -> bool {
        let waited = self.started.elapsed();
        if waited >= self.wait {
            return false;
        }
        if self.told.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
            tracing::warn!(
                error = %crate::redact::Field::message(error),
                waited_s = waited.as_secs(),
                "waiting for {} at start-up (up to AIQ_STARTUP_WAIT_S = {} s)",
                self.what,
                self.wait.as_secs()
            );
            self.told = Some(Instant::now());
        }
        crate::systemd::extend_start_timeout(EXTEND_BY);
        tokio::time::sleep(self.delay.min(self.wait - waited)).await;
        self.delay = (self.delay * 2).min(Duration::from_secs(5));
        true
    }

    /// Says in the log that the dependency answered, if the wait was long enough to be told.
    pub fn over(&self) {
        if self.told.is_some() {
            tracing::info!(
                waited_s = self.started.elapsed().as_secs(),
                "{} answers: starting",
                self.what
            );
        }
    }
}
