//! The ports the admission and reservation stages talk to: [`Gates`] (the provider's pause and
//! breakers, the organisation's jobs-per-minute rate, the provider's requests and tokens per
//! minute) and [`Ledger`] (the budget's holds). The daemon's implementations are the Redis-backed
//! [`Breakers`] and [`Budget`], one script call per method as before; `memory` (tests only) holds
//! in-memory ones, so the stages' rules are unit tests. A Redis failure becomes here the
//! deferral it always is before a call: no call, no attempt spent.

use std::future::Future;
use std::time::Duration;

use uuid::Uuid;

use super::policy::{REDIS_WAIT, jitter, spread};
use crate::budget::{Budget, BudgetError, CallMeta, OrgLimits, Refusal, Reservation};
use crate::domain::{MicroUsd, Provider, Tier};
use crate::providers::breaker::{Admit, Breakers};
use crate::queue::backend::Failure;
use crate::queue::events::DelayReason;

/// One gate's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// The call may go.
    Pass,
    /// The call may go as the half-open breaker's one probe (only a breaker answers this).
    Probe,
    /// Held back for this long: a deferral, never a failure.
    Wait(Duration),
}

/// The checks a call passes before its budget is reserved.
pub trait Gates: Sync {
    /// The provider's pause and breaker and the organisation's own breaker for it, read without
    /// taking anything: [`Gate::Probe`] when the half-open probe is free to take.
    fn breaker(
        &self,
        provider: Provider,
        org: &str,
    ) -> impl Future<Output = Result<Gate, Failure>> + Send;

    /// Takes the half-open probe, once every check that could hold the job back has passed:
    /// [`Gate::Pass`] when the breaker closed meanwhile, [`Gate::Wait`] when another job took it.
    fn take_probe(
        &self,
        provider: Provider,
        org: &str,
    ) -> impl Future<Output = Result<Gate, Failure>> + Send;

    /// Counts one job of `org` against its tier's jobs per minute.
    fn org_rate(&self, org: Uuid, tier: Tier)
    -> impl Future<Output = Result<Gate, Failure>> + Send;

    /// Counts one call against the provider's requests and tokens per minute.
    fn throttle(
        &self,
        provider: Provider,
        tokens: u64,
    ) -> impl Future<Output = Result<Gate, Failure>> + Send;
}

/// A reservation's answer.
#[derive(Debug)]
pub enum Reserved {
    Held(Reservation),
    /// No room in a scope: no call.
    Refused(Refusal),
}

/// The budget's holds.
pub trait Ledger: Sync {
    /// Holds `estimate` in every scope of the call's organisation, for `ttl` unless settled.
    fn reserve(
        &self,
        meta: CallMeta,
        limits: OrgLimits,
        estimate: MicroUsd,
        ttl: Duration,
    ) -> impl Future<Output = Result<Reserved, Failure>> + Send;

    /// Gives back a hold whose call is not made: settled at nothing, as no call was paid for.
    /// A failure leaves the hold to expire.
    fn give_back(&self, reservation: &Reservation) -> impl Future<Output = ()> + Send;
}

/// The daemon's gates: the fleet-wide breakers and throttles, and the budget's rate script.
pub struct RedisGates<'a> {
    pub breakers: &'a Breakers,
    pub budget: &'a Budget,
}

fn breaker_gate(
    provider: Provider,
    r: redis::RedisResult<Result<Admit, Duration>>,
) -> Result<Gate, Failure> {
    match r {
        Ok(Ok(Admit::Closed)) => Ok(Gate::Pass),
        Ok(Ok(Admit::Probe)) => Ok(Gate::Probe),
        Ok(Err(wait)) => Ok(Gate::Wait(wait)),
        Err(e) => Err(redis_unavailable(
            &format!("checking {provider}'s circuit breaker failed"),
            crate::redis_conn::error_kind(&e),
            e,
        )),
    }
}

fn wait_gate(r: Result<(), Duration>) -> Gate {
    match r {
        Ok(()) => Gate::Pass,
        Err(wait) => Gate::Wait(wait),
    }
}

impl Gates for RedisGates<'_> {
    async fn breaker(&self, provider: Provider, org: &str) -> Result<Gate, Failure> {
        breaker_gate(
            provider,
            self.breakers.peek_call(provider.as_str(), org).await,
        )
    }

    async fn take_probe(&self, provider: Provider, org: &str) -> Result<Gate, Failure> {
        breaker_gate(
            provider,
            self.breakers.admit_call(provider.as_str(), org).await,
        )
    }

    async fn org_rate(&self, org: Uuid, tier: Tier) -> Result<Gate, Failure> {
        self.budget
            .admit(org, tier)
            .await
            .map(wait_gate)
            .map_err(redis_down)
    }

    async fn throttle(&self, provider: Provider, tokens: u64) -> Result<Gate, Failure> {
        self.breakers
            .throttle(provider, tokens)
            .await
            .map(wait_gate)
            .map_err(|e| redis_down_provider(provider, e))
    }
}

impl Ledger for Budget {
    async fn reserve(
        &self,
        meta: CallMeta,
        limits: OrgLimits,
        estimate: MicroUsd,
        ttl: Duration,
    ) -> Result<Reserved, Failure> {
        match Budget::reserve(self, meta, limits, estimate, ttl, self.now()).await {
            Ok(Ok(r)) => Ok(Reserved::Held(r)),
            Ok(Err(refusal)) => Ok(Reserved::Refused(refusal)),
            Err(e) => Err(redis_down(e)),
        }
    }

    async fn give_back(&self, reservation: &Reservation) {
        if let Err(e) = self.settle(&reservation.id, MicroUsd::ZERO).await {
            tracing::warn!(error = %e, reservation = %reservation.id, "giving back an unused budget hold failed; it expires");
        }
    }
}

fn redis_down_provider(provider: Provider, e: redis::RedisError) -> Failure {
    redis_unavailable(
        &format!("checking {provider}'s fleet-wide limits failed"),
        crate::redis_conn::error_kind(&e),
        e,
    )
}

/// Redis is the budget's ledger of holds: without it no call may start (fail closed).
pub(super) fn redis_down(e: BudgetError) -> Failure {
    let kind = match &e {
        BudgetError::Redis(r) => crate::redis_conn::error_kind(r),
        BudgetError::Protocol(_) => "protocol",
        BudgetError::LedgerMissing => "ledger",
        // Only connecting returns it, and a running job's connection is already made.
        BudgetError::Tls(_) => "tls",
    };
    redis_unavailable(
        "no provider call without a budget check, and the check failed",
        kind,
        e,
    )
}

/// A Redis failure before a call (out of memory, read-only, loading, a lost connection...) is
/// never the job's fault: no call is made, and the job waits without spending an attempt.
fn redis_unavailable(what: &str, kind: &'static str, e: impl std::fmt::Display) -> Failure {
    crate::observe::redis_deferral(kind);
    Failure::Defer {
        message: format!("{what}: {e}; waiting without spending an attempt"),
        after: REDIS_WAIT + spread(jitter::REDIS),
        reason: DelayReason::Unavailable,
    }
}

/// In-memory gates and ledger for the stages' unit tests: a breaker per provider with the
/// states Redis's has, fixed waits for the rates, and a ledger with one scope of room.
#[cfg(test)]
pub mod memory {
    use std::collections::HashMap;
    use std::sync::Mutex;

    use super::*;

    /// A provider's breaker, as the in-memory gates hold it.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Breaker {
        Closed,
        Open(Duration),
        /// Past its cooldown: the next job to take the probe gets it.
        ProbeFree,
        /// A job holds the probe.
        ProbeTaken,
    }

    /// How long a job looks again while another holds the probe (as breaker.lua's cap).
    pub const PROBE_OUT_WAIT: Duration = Duration::from_secs(1);

    #[derive(Default)]
    pub struct MemoryGates {
        pub breakers: Mutex<HashMap<Provider, Breaker>>,
        /// Set: the organisation is over its rate for this long.
        pub org_wait: Mutex<Option<Duration>>,
        /// Per provider: at its requests or tokens per minute for this long.
        pub throttled: Mutex<HashMap<Provider, Duration>>,
        /// Every gate call, in order: "breaker:<provider>", "take_probe:<provider>", "org_rate",
        /// "throttle:<provider>".
        pub log: Mutex<Vec<String>>,
        /// Called after the next breaker read, before its answer: another job acting in between.
        #[allow(clippy::type_complexity)]
        pub after_read: Mutex<Option<Box<dyn FnMut(&MemoryGates) + Send>>>,
    }

    impl MemoryGates {
        fn note(&self, call: &str) {
            self.log.lock().unwrap().push(call.to_owned());
        }

        pub fn calls(&self) -> Vec<String> {
            self.log.lock().unwrap().clone()
        }

        pub fn set_breaker(&self, provider: Provider, b: Breaker) {
            self.breakers.lock().unwrap().insert(provider, b);
        }

        pub fn breaker_of(&self, provider: Provider) -> Breaker {
            *self
                .breakers
                .lock()
                .unwrap()
                .get(&provider)
                .unwrap_or(&Breaker::Closed)
        }
    }

    impl Gates for MemoryGates {
        async fn breaker(&self, provider: Provider, _org: &str) -> Result<Gate, Failure> {
            self.note(&format!("breaker:{provider}"));
            let answer = match self.breaker_of(provider) {
                Breaker::Closed => Gate::Pass,
                Breaker::Open(w) => Gate::Wait(w),
                Breaker::ProbeFree => Gate::Probe,
                Breaker::ProbeTaken => Gate::Wait(PROBE_OUT_WAIT),
            };
            let hook = self.after_read.lock().unwrap().take();
            if let Some(mut hook) = hook {
                hook(self);
            }
            Ok(answer)
        }

        async fn take_probe(&self, provider: Provider, _org: &str) -> Result<Gate, Failure> {
            self.note(&format!("take_probe:{provider}"));
            let mut breakers = self.breakers.lock().unwrap();
            let b = breakers.entry(provider).or_insert(Breaker::Closed);
            Ok(match *b {
                Breaker::Closed => Gate::Pass,
                Breaker::Open(w) => Gate::Wait(w),
                Breaker::ProbeFree => {
                    *b = Breaker::ProbeTaken;
                    Gate::Probe
                }
                Breaker::ProbeTaken => Gate::Wait(PROBE_OUT_WAIT),
            })
        }

        async fn org_rate(&self, _org: Uuid, _tier: Tier) -> Result<Gate, Failure> {
            self.note("org_rate");
            Ok(self.org_wait.lock().unwrap().map_or(Gate::Pass, Gate::Wait))
        }

        async fn throttle(&self, provider: Provider, _tokens: u64) -> Result<Gate, Failure> {
            self.note(&format!("throttle:{provider}"));
            Ok(self
                .throttled
                .lock()
                .unwrap()
                .get(&provider)
                .map_or(Gate::Pass, |w| Gate::Wait(*w)))
        }
    }

    /// A ledger with one scope: `room` left, the holds by id, and the ids given back.
    pub struct MemoryLedger {
        pub room: Mutex<MicroUsd>,
        pub holds: Mutex<HashMap<String, MicroUsd>>,
        pub given_back: Mutex<Vec<String>>,
    }

    impl MemoryLedger {
        pub fn with_room(room: MicroUsd) -> Self {
            Self {
                room: Mutex::new(room),
                holds: Mutex::default(),
                given_back: Mutex::default(),
            }
        }

        pub fn held(&self) -> MicroUsd {
            self.holds
                .lock()
                .unwrap()
                .values()
                .fold(MicroUsd::ZERO, |a, b| a.checked_add(*b).unwrap_or(a))
        }
    }

    impl Ledger for MemoryLedger {
        async fn reserve(
            &self,
            meta: CallMeta,
            limits: OrgLimits,
            estimate: MicroUsd,
            _ttl: Duration,
        ) -> Result<Reserved, Failure> {
            let mut room = self.room.lock().unwrap();
            if estimate > *room {
                let (day, _, _) = crate::budget::windows_at(chrono::Utc::now(), chrono_tz::UTC);
                return Ok(Reserved::Refused(Refusal {
                    scope: crate::budget::Scope {
                        owner: crate::budget::Owner::Org(meta.organization_id),
                        window: day,
                        limit: limits.daily,
                    },
                    spent: MicroUsd::ZERO,
                    reserved: self.held(),
                    estimate,
                }));
            }
            *room = MicroUsd::from_micros(room.micros() - estimate.micros());
            let id = meta.reservation_id();
            self.holds.lock().unwrap().insert(id.clone(), estimate);
            Ok(Reserved::Held(Reservation { id, estimate, meta }))
        }

        async fn give_back(&self, reservation: &Reservation) {
            if let Some(amount) = self.holds.lock().unwrap().remove(&reservation.id) {
                let mut room = self.room.lock().unwrap();
                *room = MicroUsd::from_micros(room.micros() + amount.micros());
            }
            self.given_back.lock().unwrap().push(reservation.id.clone());
        }
    }

    /// A planned call of `provider` at `estimate`, for the stages' tests.
    pub fn planned(provider: Provider, estimate: i64) -> crate::jobs::plan::Planned {
        crate::jobs::plan::Planned {
            provider,
            operation: "chat.completions",
            model: Some(format!("{provider}-model")),
            estimate: MicroUsd::from_micros(estimate),
            hold_ttl: Duration::from_secs(60),
            tokens: 100,
            org: ORG.to_owned(),
        }
    }

    pub const ORG: &str = "6f1c2d3e-4a5b-4c6d-8e7f-8091a2b3c4d5";

    /// The call details of call `call_seq` of a test job, to `target`.
    pub fn meta(target: &crate::jobs::plan::Planned, call_seq: i32) -> CallMeta {
        CallMeta {
            job_id: "j-1".into(),
            execution: 1,
            attempt: 1,
            call_seq,
            organization_id: Uuid::parse_str(ORG).unwrap(),
            tier: "growth_team".into(),
            provider: target.provider.as_str().into(),
            operation: target.operation.into(),
            model: target.model.clone(),
            billing_date: chrono::NaiveDate::from_ymd_opt(2026, 12, 2).unwrap(),
        }
    }

    pub fn limits() -> OrgLimits {
        OrgLimits {
            daily: MicroUsd::from_micros(10_000_000),
            monthly: MicroUsd::from_micros(100_000_000),
        }
    }
}
