//! The job policy as values: what follows a failed call (the same model again, the next model of
//! the chain, or back to the queue), whether an attempt is the job's last, how long a job held
//! back waits, and the random spreads on top of those waits. Every rule here is a pure function
//! of the values the stages compute (the random draw is an argument, in [0, 1)), so each is a
//! unit test; the stages draw with `fastrand` and act on the answer. The named constants are
//! listed by [`policy_constants`] for `aiq config`.

use std::time::Duration;

use crate::config::CallRetryPolicy;
use crate::providers::ProviderError;
use crate::queue::backend::Failure;

/// How long an organisation's dollar limit overrides are cached: short enough that a change made
/// with `aiq org set-limits` holds on every process within 5 s.
pub const LIMITS_CACHE: Duration = Duration::from_secs(2);

/// How long a process waits before it probes an unreachable PostgreSQL again.
pub const STORE_PROBE: Duration = Duration::from_secs(2);

/// How long after a budget window's reset a job that waited for it comes back, at the least.
pub const WINDOW_RESET_MARGIN: Duration = Duration::from_millis(50);

/// How long an answer whose rows PostgreSQL could not take is kept with its job in Redis: far
/// longer than any outage the job waits through.
pub const KEPT_ANSWER_TTL: Duration = Duration::from_secs(7 * 86_400);
/// A paid answer's rows not written after this long (PostgreSQL slow or going away): its hold
/// is kept from the sweeper while the write goes on. Below the least hold margin (500 ms), so a
/// hold whose call took its provider's whole timeout still has time left when it is kept.
pub const SLOW_WRITE: Duration = Duration::from_millis(200);
/// For how long a slow write keeps its hold: longer than a write can wait for PostgreSQL (the
/// pool's acquire timeout, twice), short enough that a process dying meanwhile leaves the hold
/// to the sweeper soon.
pub const HOLD_WHILE_WRITING: Duration = Duration::from_secs(120);

/// How long a job waits when Redis could not answer one of its checks before a call.
pub const REDIS_WAIT: Duration = Duration::from_secs(1);

/// The least spread on the wait of a job that no model of its chain could take after a failed
/// call; a longer wait is spread by a quarter of itself.
pub const HELD_BACK_SPREAD_MIN: Duration = Duration::from_secs(1);

/// The random spreads (ms, uniform from 0) added to waits, so jobs that wait for the same thing
/// do not all come back in the same millisecond.
pub mod jitter {
    /// On PostgreSQL being unreachable, after the probe interval.
    pub const STORE: u64 = 1_000;
    /// On Redis failing before a call.
    pub const REDIS: u64 = 1_000;
    /// On a paused provider, an open breaker, or a provider's requests or tokens per minute.
    pub const PROVIDER: u64 = 500;
    /// On a provider's own Retry-After inside a call's retries.
    pub const RETRY_AFTER: u64 = 250;
    /// On a budget window's reset: a whole window's waiting jobs wake together otherwise.
    pub const WINDOW_RESET: u64 = 2_000;
}

/// Every named constant of the policy, as (name, value with its unit), for `aiq config`.
pub fn policy_constants() -> Vec<(&'static str, String)> {
    let ms = |d: Duration| format!("{} ms", d.as_millis());
    let up_to = |m: u64| format!("0..={m} ms");
    vec![
        ("LIMITS_CACHE", ms(LIMITS_CACHE)),
        ("STORE_PROBE", ms(STORE_PROBE)),
        ("WINDOW_RESET_MARGIN", ms(WINDOW_RESET_MARGIN)),
        ("KEPT_ANSWER_TTL", ms(KEPT_ANSWER_TTL)),
        ("REDIS_WAIT", ms(REDIS_WAIT)),
        ("HELD_BACK_SPREAD_MIN", ms(HELD_BACK_SPREAD_MIN)),
        ("jitter::STORE", up_to(jitter::STORE)),
        ("jitter::REDIS", up_to(jitter::REDIS)),
        ("jitter::PROVIDER", up_to(jitter::PROVIDER)),
        ("jitter::RETRY_AFTER", up_to(jitter::RETRY_AFTER)),
        ("jitter::WINDOW_RESET", up_to(jitter::WINDOW_RESET)),
    ]
}

/// A spread uniform in [0, `max_ms`] ms, from a draw in [0, 1).
pub fn spread_at(max_ms: u64, draw: f64) -> Duration {
    let ms = ((max_ms as f64 + 1.0) * draw.clamp(0.0, 1.0)).floor() as u64;
    Duration::from_millis(ms.min(max_ms))
}

/// [`spread_at`] with a fresh draw.
pub fn spread(max_ms: u64) -> Duration {
    spread_at(max_ms, fastrand::f64())
}

/// Full jitter: uniform in [1 ms, `ceiling`], from a draw in [0, 1).
pub fn full_jitter_at(ceiling: Duration, draw: f64) -> Duration {
    ceiling
        .mul_f64(draw.clamp(0.0, 1.0))
        .max(Duration::from_millis(1))
}

/// The delays of a call's in-call retries: exponential from the policy's base to its cap, as
/// many as it allows. Full jitter is applied on top by [`next_step`].
pub fn call_backoff(p: &CallRetryPolicy) -> backon::ExponentialBackoff {
    use backon::BackoffBuilder;
    backon::ExponentialBuilder::default()
        .with_min_delay(p.base)
        .with_max_delay(p.cap)
        .with_max_times(p.retries as usize)
        .build()
}

/// What follows a failed call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NextStep {
    /// The same model again after this delay (an in-call retry).
    Again(Duration),
    /// The next model of the chain.
    FallBack,
    /// Back to the queue: a job-level retry, or the dead set.
    GiveUp,
}

/// What a failed call says about itself, as [`next_step`] needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallFailure {
    pub retryable: bool,
    /// The provider's own Retry-After, when it sent one.
    pub retry_after: Option<Duration>,
}

impl From<&ProviderError> for CallFailure {
    fn from(e: &ProviderError) -> Self {
        Self {
            retryable: e.is_retryable(),
            retry_after: e.retry_after,
        }
    }
}

/// Retry the same model while the failure is retryable, the policy has a retry left (`backoff`
/// yields its next delay) and the provider's Retry-After fits in a call; else the next model of
/// the chain, when `more_models`; else back to the queue. An in-call retry waits the provider's
/// Retry-After plus a spread, or the backoff's delay with full jitter. A retry is only taken from
/// `backoff` when the failure could use it.
pub fn next_step(
    failure: CallFailure,
    cap: Duration,
    backoff: &mut impl Iterator<Item = Duration>,
    more_models: bool,
    draw: f64,
) -> NextStep {
    let again = match (failure.retryable, failure.retry_after) {
        (false, _) => None,
        (true, Some(r)) if r > cap => None,
        (true, after) => backoff.next().map(|d| match after {
            Some(r) => r + spread_at(jitter::RETRY_AFTER, draw),
            None => full_jitter_at(d, draw),
        }),
    };
    match again {
        Some(d) => NextStep::Again(d),
        None if more_models => NextStep::FallBack,
        None => NextStep::GiveUp,
    }
}

/// A provider's failure as the queue's failure kind, for when the job gives up this attempt.
pub fn give_up(e: &ProviderError) -> Failure {
    if e.is_retryable() {
        Failure::Retry {
            message: e.to_string(),
            after: e.retry_after,
        }
    } else {
        Failure::Permanent {
            message: e.to_string(),
        }
    }
}

/// Has the job used its attempts with this one?
pub fn attempts_used(attempt: u32, max_attempts: u32) -> bool {
    attempt >= max_attempts
}

/// Is an attempt that ends in `failure` the job's last? A permanent failure is; a retry is when
/// the job has used its attempts; a deferral never is (it spends no attempt).
pub fn is_last_attempt(failure: &Failure, attempt: u32, max_attempts: u32) -> bool {
    match failure {
        Failure::Permanent { .. } => true,
        Failure::Retry { .. } => attempts_used(attempt, max_attempts),
        Failure::Defer { .. } => false,
    }
}

/// Is the failed call the job's last, so that its failed result row is written with it? Only
/// when nothing follows it in this attempt and the attempt is the last.
pub fn is_last_call(next: NextStep, give_up: &Failure, attempt: u32, max_attempts: u32) -> bool {
    next == NextStep::GiveUp && is_last_attempt(give_up, attempt, max_attempts)
}

/// How a job's execution ended, as the metrics name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    Succeeded,
    Deferred,
    Retried,
    Dead,
}

impl Disposition {
    pub fn as_str(self) -> &'static str {
        match self {
            Disposition::Succeeded => "succeeded",
            Disposition::Deferred => "deferred",
            Disposition::Retried => "retried",
            Disposition::Dead => "dead",
        }
    }
}

/// The disposition of an execution that ended in `outcome`.
pub fn disposition<T>(
    outcome: &Result<T, Failure>,
    attempt: u32,
    max_attempts: u32,
) -> Disposition {
    match outcome {
        Ok(_) => Disposition::Succeeded,
        Err(Failure::Defer { .. }) => Disposition::Deferred,
        Err(f) if is_last_attempt(f, attempt, max_attempts) => Disposition::Dead,
        Err(_) => Disposition::Retried,
    }
}

/// How long a job refused by a budget waits: until the window resets, after a margin for the
/// error of the budget's estimate of Redis's clock (a job woken a millisecond before the reset
/// would only be refused again), plus a spread so a window's waiting jobs do not all wake in the
/// same millisecond.
pub fn window_reset_wait(until_reset: Duration, draw: f64) -> Duration {
    until_reset + WINDOW_RESET_MARGIN + spread_at(jitter::WINDOW_RESET, draw)
}

/// How long a job waits when, after a failed call, no model of its chain may be called: the
/// longest of the waits that held it back and the provider's Retry-After, spread by a quarter of
/// itself (at least [`HELD_BACK_SPREAD_MIN`]): a job whose call failed as its breaker opened must
/// not come back exactly as the cooldown ends, or it is the next probe again and again.
pub fn held_back_wait(
    retry_wait: Duration,
    chain_wait: Duration,
    retry_after: Option<Duration>,
    draw: f64,
) -> Duration {
    let after = retry_wait
        .max(chain_wait)
        .max(retry_after.unwrap_or_default());
    let max = (after.as_millis() as u64 / 4).max(HELD_BACK_SPREAD_MIN.as_millis() as u64);
    after + spread_at(max, draw)
}

/// How long a job waits when every model of its chain is throttled, before its spread: the
/// first model's wait, or the shortest of the fallbacks' when one is shorter (zero when there was
/// none to ask).
pub fn throttled_wait(first: Duration, fallbacks: Duration) -> Duration {
    if fallbacks.is_zero() {
        first
    } else {
        first.min(fallbacks)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DRAWS: [f64; 5] = [0.0, 0.25, 0.5, 0.999, 0.999_999_999];

    fn policy() -> CallRetryPolicy {
        CallRetryPolicy {
            retries: 2,
            base: Duration::from_millis(100),
            cap: Duration::from_secs(2),
        }
    }

    fn retryable(retry_after: Option<Duration>) -> CallFailure {
        CallFailure {
            retryable: true,
            retry_after,
        }
    }

    #[test]
    fn a_spread_stays_within_zero_and_its_bound_and_reaches_both() {
        for max in [0, 1, 250, 2_000] {
            for d in DRAWS {
                assert!(spread_at(max, d) <= Duration::from_millis(max), "{max} {d}");
            }
            assert_eq!(spread_at(max, 0.0), Duration::ZERO);
            assert_eq!(spread_at(max, 0.999_999_999), Duration::from_millis(max));
        }
    }

    #[test]
    fn full_jitter_is_at_least_a_millisecond_and_at_most_its_ceiling() {
        let ceiling = Duration::from_millis(800);
        assert_eq!(full_jitter_at(ceiling, 0.0), Duration::from_millis(1));
        assert_eq!(full_jitter_at(ceiling, 0.5), Duration::from_millis(400));
        for d in DRAWS {
            assert!(full_jitter_at(ceiling, d) <= ceiling);
        }
    }

    #[test]
    fn a_retryable_failure_is_called_again_with_full_jitter_until_the_retries_run_out() {
        let mut backoff = call_backoff(&policy());
        let f = retryable(None);
        // backon computes its delays in floating point: compared to the millisecond.
        let mut again_ms = || match next_step(f, policy().cap, &mut backoff, false, 0.5) {
            NextStep::Again(d) => Some(d.as_millis()),
            _ => None,
        };
        assert_eq!(again_ms(), Some(50));
        assert_eq!(again_ms(), Some(100));
        assert_eq!(again_ms(), None);
    }

    #[test]
    fn a_retry_after_that_fits_under_the_cap_is_waited_with_a_small_spread() {
        let mut backoff = call_backoff(&policy());
        let after = Duration::from_millis(1_500);
        match next_step(
            retryable(Some(after)),
            policy().cap,
            &mut backoff,
            false,
            0.999,
        ) {
            NextStep::Again(d) => {
                assert!(d >= after && d <= after + Duration::from_millis(jitter::RETRY_AFTER))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_retry_after_above_the_cap_falls_back_or_gives_up_without_spending_a_retry() {
        let mut backoff = call_backoff(&policy());
        let long = retryable(Some(Duration::from_secs(3)));
        assert_eq!(
            next_step(long, policy().cap, &mut backoff, true, 0.5),
            NextStep::FallBack
        );
        assert_eq!(
            next_step(long, policy().cap, &mut backoff, false, 0.5),
            NextStep::GiveUp
        );
        // Both retries are still there.
        assert_eq!(backoff.count(), 2);
    }

    #[test]
    fn a_failure_that_is_not_retryable_moves_to_the_next_model_at_once() {
        let mut backoff = call_backoff(&policy());
        let f = CallFailure {
            retryable: false,
            retry_after: None,
        };
        assert_eq!(
            next_step(f, policy().cap, &mut backoff, true, 0.5),
            NextStep::FallBack
        );
        assert_eq!(
            next_step(f, policy().cap, &mut backoff, false, 0.5),
            NextStep::GiveUp
        );
    }

    #[test]
    fn no_retries_in_the_policy_means_no_call_again() {
        let mut p = policy();
        p.retries = 0;
        let mut backoff = call_backoff(&p);
        assert_eq!(
            next_step(retryable(None), p.cap, &mut backoff, false, 0.5),
            NextStep::GiveUp
        );
    }

    #[test]
    fn the_last_attempt_is_a_permanent_failure_or_a_retry_with_no_attempt_left() {
        let retry = Failure::Retry {
            message: String::new(),
            after: None,
        };
        let permanent = Failure::Permanent {
            message: String::new(),
        };
        let defer = Failure::Defer {
            message: String::new(),
            after: Duration::ZERO,
            reason: crate::queue::events::DelayReason::Other,
        };
        assert!(!is_last_attempt(&retry, 1, 3));
        assert!(is_last_attempt(&retry, 3, 3));
        assert!(is_last_attempt(&permanent, 1, 3));
        assert!(!is_last_attempt(&defer, 3, 3));
        // A call followed by another call or model is never the last.
        assert!(!is_last_call(NextStep::FallBack, &permanent, 3, 3));
        assert!(!is_last_call(NextStep::Again(Duration::ZERO), &retry, 3, 3));
        assert!(is_last_call(NextStep::GiveUp, &retry, 3, 3));
        assert!(!is_last_call(NextStep::GiveUp, &retry, 2, 3));
    }

    #[test]
    fn a_job_is_dead_on_a_permanent_failure_or_its_last_retry_and_deferred_without_spending() {
        let retry: Result<(), _> = Err(Failure::Retry {
            message: String::new(),
            after: None,
        });
        assert_eq!(disposition(&Ok(()), 1, 3), Disposition::Succeeded);
        assert_eq!(disposition(&retry, 1, 3), Disposition::Retried);
        assert_eq!(disposition(&retry, 3, 3), Disposition::Dead);
        let defer: Result<(), _> = Err(Failure::Defer {
            message: String::new(),
            after: Duration::ZERO,
            reason: crate::queue::events::DelayReason::Other,
        });
        assert_eq!(disposition(&defer, 3, 3), Disposition::Deferred);
        let permanent: Result<(), _> = Err(Failure::Permanent {
            message: String::new(),
        });
        assert_eq!(disposition(&permanent, 1, 3).as_str(), "dead");
    }

    #[test]
    fn a_job_waiting_for_a_window_reset_comes_back_after_the_margin_and_within_the_spread() {
        let until = Duration::from_secs(60);
        assert_eq!(window_reset_wait(until, 0.0), until + WINDOW_RESET_MARGIN);
        for d in DRAWS {
            let w = window_reset_wait(until, d);
            assert!(w >= until + WINDOW_RESET_MARGIN);
            assert!(w <= until + WINDOW_RESET_MARGIN + Duration::from_millis(jitter::WINDOW_RESET));
        }
        // A reset already passed (by this host's estimate) still waits the margin.
        assert!(window_reset_wait(Duration::ZERO, 0.0) >= WINDOW_RESET_MARGIN);
    }

    #[test]
    fn a_job_held_back_after_a_failure_waits_the_longest_wait_spread_by_a_quarter_of_it() {
        let s = Duration::from_secs;
        assert_eq!(held_back_wait(s(1), s(8), Some(s(2)), 0.0), s(8));
        assert_eq!(held_back_wait(s(1), s(8), Some(s(2)), 0.999_999_999), s(10));
        // A short wait is spread by at least a second.
        assert_eq!(
            held_back_wait(Duration::ZERO, Duration::ZERO, None, 0.999_999_999),
            HELD_BACK_SPREAD_MIN
        );
    }

    #[test]
    fn a_throttled_chain_waits_for_its_first_model_or_a_shorter_fallback() {
        let ms = Duration::from_millis;
        assert_eq!(throttled_wait(ms(900), Duration::ZERO), ms(900));
        assert_eq!(throttled_wait(ms(900), ms(300)), ms(300));
        assert_eq!(throttled_wait(ms(300), ms(900)), ms(300));
    }

    #[test]
    fn every_constant_is_listed_once_with_a_unit() {
        let listed = policy_constants();
        let mut names: Vec<&str> = listed.iter().map(|(n, _)| *n).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), listed.len());
        assert!(listed.iter().all(|(_, v)| v.ends_with(" ms")));
        assert!(listed.contains(&("WINDOW_RESET_MARGIN", "50 ms".to_owned())));
        assert!(listed.contains(&("jitter::WINDOW_RESET", "0..=2000 ms".to_owned())));
    }
}
