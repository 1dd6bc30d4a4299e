//! The ports the stages talk to: [`Gates`] (the provider's pause and breakers, the
//! organisation's jobs-per-minute rate, the provider's requests and tokens per minute, and what
//! a call tells the breakers), [`Ledger`] (the budget's holds, their settlement, Vision's monthly
//! units), [`Results`] (the results store: a job's rows, the store gate's probe, the answers
//! kept while PostgreSQL is down, budget alerts) and [`Providers`] (one LLM or Vision call). The
//! daemon's implementations are the Redis-backed [`Breakers`] and [`Budget`], PostgreSQL's
//! [`Store`] (with the queue's kept answers and the alerts' outbox: [`PgResults`]) and the HTTP
//! [`Clients`], one script call, query or request per method as before; [`Ports`] bundles them
//! for the stages, statically dispatched: [`App`] wires the daemon's, `memory` (tests only) holds
//! in-memory ones, so the stages' rules are unit tests. A Redis failure becomes here the deferral
//! it always is before a call: no call, no attempt spent.

use std::future::Future;
use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};
use uuid::Uuid;

use super::policy::{REDIS_WAIT, jitter, spread};
use super::record::{StoreGate, store_failure};
use super::{App, Clients};
use crate::budget::alerts::Alerts;
use crate::budget::catalog::PriceCatalog;
use crate::budget::{Budget, BudgetError, CallMeta, OrgLimits, Refusal, Reservation, ScopeState};
use crate::config::CallRetryPolicy;
use crate::domain::{MicroUsd, Provider, Tier};
use crate::providers::breaker::{Admit, Breakers, HeldBy, Opened};
use crate::providers::openai::{Completion, Message};
use crate::providers::vision::{Feature, ImageSource, VisionResponse};
use crate::providers::{ErrorKind, ProviderError};
use crate::queue::backend::Failure;
use crate::queue::events::DelayReason;
use crate::queue::{Queue, QueueError};
use crate::store::{
    CallRecord, Ending, ErrorRecord, JobRef, ResultRecord, Store, StoreError, Unwritten,
};
use crate::webhooks::address::AddressPolicy;

/// One gate's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// The call may go.
    Pass,
    /// The call may go as the half-open breaker's one probe (only a breaker answers this).
    Probe,
    /// Held back for this long: a deferral, never a failure.
    Wait(Duration),
    /// Held back for this long by an open circuit breaker (only a breaker answers this).
    Open(Duration),
}

impl Gate {
    /// How long the call is held back, if it is.
    pub fn wait(self) -> Option<Duration> {
        match self {
            Gate::Wait(w) | Gate::Open(w) => Some(w),
            Gate::Pass | Gate::Probe => None,
        }
    }
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

    /// Pauses the provider for every process: it answered 429 with its own delay. A failure is
    /// logged; the call's own outcome stands.
    fn pause(&self, provider: Provider, wait: Duration) -> impl Future<Output = ()> + Send;

    /// Tells the provider's breaker, and the organisation's own, how a call went (a failure to
    /// tell them is logged).
    fn record_call(
        &self,
        provider: Provider,
        org: &str,
        outcome: Result<(), ErrorKind>,
    ) -> impl Future<Output = ()> + Send;
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

    /// Replaces a made call's hold with the cost its row holds; the scopes' new totals (empty
    /// when the hold was already settled or swept).
    fn settle_hold(
        &self,
        reservation_id: &str,
        cost: MicroUsd,
    ) -> impl Future<Output = Result<Vec<ScopeState>, BudgetError>> + Send;

    /// Keeps a hold from the sweeper for `ttl` more (its answer is kept until its rows can be
    /// written); true when the hold was there.
    fn keep_hold(
        &self,
        reservation_id: &str,
        ttl: Duration,
    ) -> impl Future<Output = Result<bool, BudgetError>> + Send;

    /// Counts Vision units per feature this month; the units used before each.
    fn claim_vision_units(
        &self,
        month: &str,
        units: &[(&str, u64)],
    ) -> impl Future<Output = Result<Vec<u64>, BudgetError>> + Send;

    /// Now, by the budget's clock.
    fn now(&self) -> DateTime<Utc>;

    /// The billing date of a call made at `now`: the day of the budget's timezone.
    fn billing_date(&self, now: DateTime<Utc>) -> NaiveDate;

    /// Whether a job no budget has room for fails (`AIQ_ON_BUDGET_EXCEEDED=fail`) instead of
    /// waiting for the window's reset.
    fn fails_over_budget(&self) -> bool;
}

/// The results store: a job's rows (one transaction per method), the store gate's probe, the
/// answer kept with its job while PostgreSQL cannot take its rows, and the budget alerts (rows of
/// the store's outbox).
pub trait Results: Sync {
    /// A failed attempt's rows: the error, the call if one was made, the failed result when it
    /// is the job's last; the call's recorded cost when there was a call.
    fn record_failure(
        &self,
        job: &JobRef,
        err: &ErrorRecord,
        call: Option<&CallRecord>,
        result: Option<(&ResultRecord, Ending)>,
    ) -> impl Future<Output = Result<Option<MicroUsd>, StoreError>> + Send;

    /// A succeeded call's rows; the rows back when they could not be written.
    fn record_success_or_return(
        &self,
        job: &JobRef,
        call: CallRecord,
        result: ResultRecord,
    ) -> impl Future<Output = Result<MicroUsd, Box<Unwritten>>> + Send;

    /// An error row on its own (a call worth an operator's look).
    fn record_error(
        &self,
        job: &JobRef,
        err: &ErrorRecord,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The store gate's probe: does PostgreSQL answer?
    fn ping(&self) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Keeps a paid answer's rows with job `id` for `ttl`.
    fn keep(
        &self,
        id: &str,
        bytes: &[u8],
        ttl: Duration,
    ) -> impl Future<Output = Result<(), QueueError>> + Send;

    /// What [`Results::keep`] holds for job `id`.
    fn kept(&self, id: &str) -> impl Future<Output = Result<Option<Vec<u8>>, QueueError>> + Send;

    /// Drops what [`Results::keep`] holds for job `id`.
    fn forget_kept(&self, id: &str) -> impl Future<Output = Result<(), QueueError>> + Send;

    /// Raises the 80% and 95% alerts the scopes' totals after a settlement crossed.
    fn check_alerts(&self, states: &[ScopeState]) -> impl Future<Output = ()> + Send;

    /// Raises the 100% alert of the scope that refused a call.
    fn limit_reached(&self, refusal: &Refusal) -> impl Future<Output = ()> + Send;
}

/// One provider call: an LLM completion or a Vision annotation.
pub trait Providers: Sync {
    /// Annotates `images` with `features` (Google Vision).
    fn annotate(
        &self,
        images: &[ImageSource],
        features: &[Feature],
    ) -> impl Future<Output = Result<VisionResponse, ProviderError>> + Send;

    /// A completion of `messages` by `provider`'s `model`; `user` and `request_id` go to the
    /// providers that take them.
    fn complete(
        &self,
        provider: Provider,
        model: &str,
        messages: &[Message],
        max_tokens: u32,
        user: &str,
        request_id: &str,
    ) -> impl Future<Output = Result<Completion, ProviderError>> + Send;
}

/// The values the stages price, retry and hold calls back by.
pub struct Rules<'a> {
    pub prices: &'a PriceCatalog,
    pub call_retry: &'a CallRetryPolicy,
    pub store_gate: &'a StoreGate,
    /// The addresses a payload's `callback_url` may name.
    pub callbacks: &'a AddressPolicy,
}

/// What the stages of a job reach: the ports and the values they price and retry by. Every
/// stage is generic over it (static dispatch: the daemon's [`App`] is the only production type).
pub trait Ports: Sync {
    type Gates<'a>: Gates
    where
        Self: 'a;
    type Ledger: Ledger;
    type Results<'a>: Results
    where
        Self: 'a;
    type Providers: Providers;

    fn gates(&self) -> Self::Gates<'_>;
    fn ledger(&self) -> &Self::Ledger;
    fn results(&self) -> Self::Results<'_>;
    fn providers(&self) -> &Self::Providers;
    /// The prices, the retry policy and the store gate, in one borrow.
    fn rules(&self) -> Rules<'_>;

    fn prices(&self) -> &PriceCatalog {
        self.rules().prices
    }

    /// Retries of a failed call inside one attempt.
    fn call_retry(&self) -> &CallRetryPolicy {
        self.rules().call_retry
    }

    /// Whether this process last found PostgreSQL unreachable.
    fn store_gate(&self) -> &StoreGate {
        self.rules().store_gate
    }

    /// The addresses a payload's `callback_url` may name.
    fn callbacks(&self) -> &AddressPolicy {
        self.rules().callbacks
    }

    /// A store error as the queue's failure kind (see [`store_failure`]).
    fn record<T>(&self, r: Result<T, StoreError>) -> Result<T, Failure> {
        r.map_err(|e| store_failure(self.store_gate(), e))
    }
}

impl Ports for App {
    type Gates<'a> = RedisGates<'a>;
    type Ledger = Budget;
    type Results<'a> = PgResults<'a>;
    type Providers = Clients;

    fn gates(&self) -> RedisGates<'_> {
        RedisGates {
            breakers: &self.breakers,
            budget: &self.budget,
        }
    }

    fn ledger(&self) -> &Budget {
        &self.budget
    }

    fn results(&self) -> PgResults<'_> {
        PgResults {
            store: &self.store,
            queue: &self.queue,
            alerts: &self.alerts,
        }
    }

    fn providers(&self) -> &Clients {
        &self.clients
    }

    fn rules(&self) -> Rules<'_> {
        Rules {
            prices: &self.prices,
            call_retry: &self.call_retry,
            store_gate: &self.store_gate,
            callbacks: &self.callbacks,
        }
    }
}

/// Gates lent by reference (the in-memory ones, from their test ports).
impl<G: Gates> Gates for &G {
    async fn breaker(&self, provider: Provider, org: &str) -> Result<Gate, Failure> {
        (**self).breaker(provider, org).await
    }

    async fn take_probe(&self, provider: Provider, org: &str) -> Result<Gate, Failure> {
        (**self).take_probe(provider, org).await
    }

    async fn org_rate(&self, org: Uuid, tier: Tier) -> Result<Gate, Failure> {
        (**self).org_rate(org, tier).await
    }

    async fn throttle(&self, provider: Provider, tokens: u64) -> Result<Gate, Failure> {
        (**self).throttle(provider, tokens).await
    }

    async fn pause(&self, provider: Provider, wait: Duration) {
        (**self).pause(provider, wait).await
    }

    async fn record_call(&self, provider: Provider, org: &str, outcome: Result<(), ErrorKind>) {
        (**self).record_call(provider, org, outcome).await
    }
}

/// The daemon's gates: the fleet-wide breakers and throttles, and the budget's rate script.
pub struct RedisGates<'a> {
    pub breakers: &'a Breakers,
    pub budget: &'a Budget,
}

fn breaker_gate(
    provider: Provider,
    r: redis::RedisResult<Result<Admit, (Duration, HeldBy)>>,
) -> Result<Gate, Failure> {
    match r {
        Ok(Ok(Admit::Closed)) => Ok(Gate::Pass),
        Ok(Ok(Admit::Probe)) => Ok(Gate::Probe),
        Ok(Err((wait, HeldBy::Pause))) => Ok(Gate::Wait(wait)),
        Ok(Err((wait, HeldBy::Breaker))) => Ok(Gate::Open(wait)),
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
        breaker_gate(provider, self.breakers.peek_call(provider, org).await)
    }

    async fn take_probe(&self, provider: Provider, org: &str) -> Result<Gate, Failure> {
        breaker_gate(provider, self.breakers.admit_call(provider, org).await)
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

    async fn pause(&self, provider: Provider, wait: Duration) {
        match self.breakers.pause(provider, wait).await {
            Ok(()) => tracing::warn!(
                provider = provider.as_str(),
                wait_ms = wait.as_millis() as u64,
                "rate limited: pausing the provider for every process"
            ),
            Err(e) => {
                tracing::warn!(error = %e, provider = provider.as_str(), "pausing the provider failed")
            }
        }
    }

    async fn record_call(&self, provider: Provider, org: &str, outcome: Result<(), ErrorKind>) {
        match self.breakers.record(provider, org, outcome).await {
            Ok(Opened::Provider) => tracing::error!(
                provider = provider.as_str(),
                "circuit breaker opened: the provider keeps failing for several organisations; its jobs wait"
            ),
            Ok(Opened::Organization) => tracing::warn!(
                provider = provider.as_str(),
                organization_id = %crate::redact::Field::new(org),
                "this organisation's calls keep failing: its own breaker opened; its jobs wait, other organisations' go on"
            ),
            Ok(Opened::No) => {}
            Err(e) => {
                tracing::warn!(error = %e, provider = provider.as_str(), "recording a call in the circuit breaker failed")
            }
        }
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

    async fn settle_hold(
        &self,
        reservation_id: &str,
        cost: MicroUsd,
    ) -> Result<Vec<ScopeState>, BudgetError> {
        self.settle(reservation_id, cost).await
    }

    async fn keep_hold(&self, reservation_id: &str, ttl: Duration) -> Result<bool, BudgetError> {
        self.extend_hold(reservation_id, ttl).await
    }

    async fn claim_vision_units(
        &self,
        month: &str,
        units: &[(&str, u64)],
    ) -> Result<Vec<u64>, BudgetError> {
        Budget::claim_vision_units(self, month, units).await
    }

    fn now(&self) -> DateTime<Utc> {
        Budget::now(self)
    }

    fn billing_date(&self, now: DateTime<Utc>) -> NaiveDate {
        crate::budget::windows_at(now, self.settings().timezone).2
    }

    fn fails_over_budget(&self) -> bool {
        self.settings().on_exceeded == crate::config::OnBudgetExceeded::Fail
    }
}

/// The refusal of an LLM call to a provider that is not an LLM's. The plan gives an LLM job only
/// LLM providers (the payload allows no other); the call stage refuses it before the call.
pub(super) fn not_an_llm(provider: Provider) -> ProviderError {
    ProviderError {
        provider,
        kind: ErrorKind::Invalid,
        status: None,
        message: format!("{provider} is not an LLM provider"),
        retry_after: None,
    }
}

/// The daemon's results store: PostgreSQL's rows, the queue's kept answers, the alerts' outbox.
pub struct PgResults<'a> {
    pub store: &'a Store,
    pub queue: &'a Queue,
    pub alerts: &'a Alerts,
}

impl Results for PgResults<'_> {
    async fn record_failure(
        &self,
        job: &JobRef,
        err: &ErrorRecord,
        call: Option<&CallRecord>,
        result: Option<(&ResultRecord, Ending)>,
    ) -> Result<Option<MicroUsd>, StoreError> {
        self.store.record_failure(job, err, call, result).await
    }

    async fn record_success_or_return(
        &self,
        job: &JobRef,
        call: CallRecord,
        result: ResultRecord,
    ) -> Result<MicroUsd, Box<Unwritten>> {
        self.store.record_success_or_return(job, call, result).await
    }

    async fn record_error(&self, job: &JobRef, err: &ErrorRecord) -> Result<(), StoreError> {
        self.store.record_error(job, err).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.store.ping().await
    }

    async fn keep(&self, id: &str, bytes: &[u8], ttl: Duration) -> Result<(), QueueError> {
        self.queue.keep(id, bytes, ttl).await
    }

    async fn kept(&self, id: &str) -> Result<Option<Vec<u8>>, QueueError> {
        self.queue.kept(id).await
    }

    async fn forget_kept(&self, id: &str) -> Result<(), QueueError> {
        self.queue.forget_kept(id).await
    }

    async fn check_alerts(&self, states: &[ScopeState]) {
        self.alerts.check(states).await
    }

    async fn limit_reached(&self, refusal: &Refusal) {
        self.alerts.limit_reached(refusal).await
    }
}

impl Providers for Clients {
    async fn annotate(
        &self,
        images: &[ImageSource],
        features: &[Feature],
    ) -> Result<VisionResponse, ProviderError> {
        self.vision.annotate(images, features).await
    }

    async fn complete(
        &self,
        provider: Provider,
        model: &str,
        messages: &[Message],
        max_tokens: u32,
        user: &str,
        request_id: &str,
    ) -> Result<Completion, ProviderError> {
        match provider {
            Provider::GoogleVision => Err(not_an_llm(provider)),
            Provider::Anthropic => self.anthropic.complete(model, messages, max_tokens).await,
            Provider::Gemini => self.gemini.complete(model, messages, max_tokens).await,
            Provider::OpenAi => {
                self.openai
                    .complete(model, messages, max_tokens, user, request_id)
                    .await
            }
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

/// In-memory ports for the stages' unit tests.
#[cfg(test)]
pub mod memory;
