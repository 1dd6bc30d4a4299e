//! In-memory ports for the stages' unit tests: gates with a breaker per provider in the states
//! Redis's has and fixed waits for the rates, a ledger with one scope of room, a results store
//! that keeps the rows it is given in order, providers that answer a script, and [`MemoryPorts`]
//! wiring them as `App` wires the daemon's. Each logs what it was asked, so a test asserts the
//! exact sequence of calls and rows.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use serde_json::json;

use super::*;
use crate::providers::openai::Usage;
use crate::store::{CallStatus, ErrorType};

/// A provider's breaker, as the in-memory gates hold it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Breaker {
    Closed,
    Open(Duration),
    /// The provider is paused for this long (a 429's Retry-After), whatever its breaker says.
    Paused(Duration),
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
            Breaker::Open(w) => Gate::Open(w),
            Breaker::Paused(w) => Gate::Wait(w),
            Breaker::ProbeFree => Gate::Probe,
            Breaker::ProbeTaken => Gate::Open(PROBE_OUT_WAIT),
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
            Breaker::Open(w) => Gate::Open(w),
            Breaker::Paused(w) => Gate::Wait(w),
            Breaker::ProbeFree => {
                *b = Breaker::ProbeTaken;
                Gate::Probe
            }
            Breaker::ProbeTaken => Gate::Open(PROBE_OUT_WAIT),
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

    async fn pause(&self, provider: Provider, wait: Duration) {
        self.note(&format!("pause:{provider}:{}ms", wait.as_millis()));
    }

    async fn record_call(&self, provider: Provider, _org: &str, outcome: Result<(), ErrorKind>) {
        let outcome = outcome.err().map_or("ok", ErrorKind::as_str);
        self.note(&format!("record:{provider}:{outcome}"));
    }
}

/// A ledger with one scope: `room` left, the holds by id, and the ids given back.
pub struct MemoryLedger {
    pub room: Mutex<MicroUsd>,
    pub holds: Mutex<HashMap<String, MicroUsd>>,
    pub given_back: Mutex<Vec<String>>,
    /// Every hold a made call settled, in order: (reservation id, cost).
    pub settled: Mutex<Vec<(String, MicroUsd)>>,
    /// Every hold kept from the sweeper, in order: (reservation id, for how long).
    pub kept: Mutex<Vec<(String, Duration)>>,
    /// Set: a job no budget has room for fails instead of waiting.
    pub fail_over_budget: bool,
}

impl MemoryLedger {
    pub fn with_room(room: MicroUsd) -> Self {
        Self {
            room: Mutex::new(room),
            holds: Mutex::default(),
            given_back: Mutex::default(),
            settled: Mutex::default(),
            kept: Mutex::default(),
            fail_over_budget: false,
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

    async fn settle_hold(
        &self,
        reservation_id: &str,
        cost: MicroUsd,
    ) -> Result<Vec<ScopeState>, BudgetError> {
        // The hold's room comes back and the cost is taken instead; a hold settled twice (or
        // never held) gives nothing back.
        let held = self.holds.lock().unwrap().remove(reservation_id);
        let mut room = self.room.lock().unwrap();
        let back = held.map_or(0, MicroUsd::micros);
        *room = MicroUsd::from_micros(room.micros() + back - cost.micros());
        self.settled
            .lock()
            .unwrap()
            .push((reservation_id.to_owned(), cost));
        Ok(Vec::new())
    }

    async fn keep_hold(&self, reservation_id: &str, ttl: Duration) -> Result<bool, BudgetError> {
        self.kept
            .lock()
            .unwrap()
            .push((reservation_id.to_owned(), ttl));
        Ok(self.holds.lock().unwrap().contains_key(reservation_id))
    }

    async fn claim_vision_units(
        &self,
        _month: &str,
        units: &[(&str, u64)],
    ) -> Result<Vec<u64>, BudgetError> {
        Ok(vec![0; units.len()])
    }

    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }

    fn billing_date(&self, now: DateTime<Utc>) -> NaiveDate {
        now.date_naive()
    }

    fn fails_over_budget(&self) -> bool {
        self.fail_over_budget
    }
}

/// One row the results store was given, in the order it was given.
#[derive(Debug, Clone)]
pub enum Row {
    /// A cost row: the call's number, its cost and status.
    Call {
        call_seq: i32,
        cost: MicroUsd,
        status: CallStatus,
    },
    /// An error row: the call's number and the error's type.
    Error {
        call_seq: i32,
        error_type: ErrorType,
    },
    /// A result row: completed or failed, and by which model.
    Result {
        completed: bool,
        model: Option<String>,
    },
}

/// A results store that keeps the rows it is given.
#[derive(Default)]
pub struct MemoryResults {
    pub rows: Mutex<Vec<Row>>,
    pub kept: Mutex<HashMap<String, Vec<u8>>>,
    /// How long writing a succeeded call's rows takes (on tokio's clock): a slow PostgreSQL.
    pub write_takes: Mutex<Duration>,
    /// Scopes whose 100% alert was raised, by their owner's name.
    pub limits_reached: Mutex<Vec<String>>,
}

impl MemoryResults {
    pub fn rows(&self) -> Vec<Row> {
        self.rows.lock().unwrap().clone()
    }

    /// The result rows only.
    pub fn results(&self) -> Vec<Row> {
        self.rows()
            .into_iter()
            .filter(|r| matches!(r, Row::Result { .. }))
            .collect()
    }

    fn push_call(&self, call: &CallRecord) {
        self.rows.lock().unwrap().push(Row::Call {
            call_seq: call.call_seq,
            cost: call.cost,
            status: call.status,
        });
    }

    fn push_error(&self, err: &ErrorRecord) {
        self.rows.lock().unwrap().push(Row::Error {
            call_seq: err.call_seq,
            error_type: err.error_type,
        });
    }

    fn push_result(&self, result: &ResultRecord) {
        self.rows.lock().unwrap().push(Row::Result {
            completed: result.completed,
            model: result.model.clone(),
        });
    }
}

/// Implemented for the borrow, as `MemoryPorts` lends it.
impl Results for &MemoryResults {
    async fn record_failure(
        &self,
        _job: &JobRef,
        err: &ErrorRecord,
        call: Option<&CallRecord>,
        result: Option<(&ResultRecord, Ending)>,
    ) -> Result<Option<MicroUsd>, StoreError> {
        if let Some(call) = call {
            self.push_call(call);
        }
        self.push_error(err);
        if let Some((result, _)) = result {
            self.push_result(result);
        }
        Ok(call.map(|c| c.cost))
    }

    async fn record_success_or_return(
        &self,
        _job: &JobRef,
        call: CallRecord,
        result: ResultRecord,
    ) -> Result<MicroUsd, Box<Unwritten>> {
        let takes = *self.write_takes.lock().unwrap();
        if !takes.is_zero() {
            tokio::time::sleep(takes).await;
        }
        self.push_call(&call);
        self.push_result(&result);
        Ok(call.cost)
    }

    async fn record_error(&self, _job: &JobRef, err: &ErrorRecord) -> Result<(), StoreError> {
        self.push_error(err);
        Ok(())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn keep(&self, id: &str, bytes: &[u8], _ttl: Duration) -> Result<(), QueueError> {
        self.kept
            .lock()
            .unwrap()
            .insert(id.to_owned(), bytes.to_vec());
        Ok(())
    }

    async fn kept(&self, id: &str) -> Result<Option<Vec<u8>>, QueueError> {
        Ok(self.kept.lock().unwrap().get(id).cloned())
    }

    async fn forget_kept(&self, id: &str) -> Result<(), QueueError> {
        self.kept.lock().unwrap().remove(id);
        Ok(())
    }

    async fn check_alerts(&self, _states: &[ScopeState]) {}

    async fn limit_reached(&self, refusal: &Refusal) {
        self.limits_reached
            .lock()
            .unwrap()
            .push(refusal.scope.owner.name());
    }
}

/// Providers that answer a script, in order, and log every call with its virtual time.
#[derive(Default)]
pub struct ScriptedProviders {
    pub script: Mutex<VecDeque<Result<Completion, ProviderError>>>,
    /// Every call: (provider, model, when on tokio's clock, paused in tests).
    pub calls: Mutex<Vec<(Provider, String, tokio::time::Instant)>>,
}

impl ScriptedProviders {
    pub fn new(script: impl IntoIterator<Item = Result<Completion, ProviderError>>) -> Self {
        Self {
            script: Mutex::new(script.into_iter().collect()),
            calls: Mutex::default(),
        }
    }

    /// The calls' providers, in order.
    pub fn called(&self) -> Vec<Provider> {
        self.calls.lock().unwrap().iter().map(|c| c.0).collect()
    }

    /// When each call was made, on tokio's clock.
    pub fn times(&self) -> Vec<tokio::time::Instant> {
        self.calls.lock().unwrap().iter().map(|c| c.2).collect()
    }
}

impl Providers for ScriptedProviders {
    async fn annotate(
        &self,
        _images: &[ImageSource],
        _features: &[Feature],
    ) -> Result<VisionResponse, ProviderError> {
        self.calls.lock().unwrap().push((
            Provider::GoogleVision,
            String::new(),
            tokio::time::Instant::now(),
        ));
        Err(failure(
            Provider::GoogleVision,
            ErrorKind::Invalid,
            None,
            None,
        ))
    }

    async fn complete(
        &self,
        provider: Provider,
        model: &str,
        _messages: &[Message],
        _max_tokens: u32,
        _user: &str,
        _request_id: &str,
    ) -> Result<Completion, ProviderError> {
        self.calls
            .lock()
            .unwrap()
            .push((provider, model.to_owned(), tokio::time::Instant::now()));
        let next = self.script.lock().unwrap().pop_front();
        // A call past the script's end is the request's fault: a test that makes one sees it
        // in the rows and the calls.
        next.unwrap_or_else(|| Err(failure(provider, ErrorKind::Invalid, Some(400), None)))
            .map_err(|mut e| {
                e.provider = provider;
                e
            })
    }
}

/// A provider's answer with this usage.
pub fn answer(prompt_tokens: u64, completion_tokens: u64) -> Result<Completion, ProviderError> {
    Ok(Completion {
        raw: json!({ "choices": [{ "message": { "content": "a cat" } }] }),
        text: "a cat".into(),
        finish_reason: "stop".into(),
        usage: Usage {
            prompt_tokens,
            cached_tokens: 0,
            completion_tokens,
        },
        model: "scripted".into(),
        hold: Default::default(),
    })
}

/// A provider's failure of `kind` (the provider is set to the one called).
pub fn failure(
    provider: Provider,
    kind: ErrorKind,
    status: Option<u16>,
    retry_after: Option<Duration>,
) -> ProviderError {
    ProviderError {
        provider,
        kind,
        status,
        message: format!("scripted {}", kind.as_str()),
        retry_after,
    }
}

/// A scripted failure of `kind`, with its usual status.
pub fn fail(kind: ErrorKind) -> Result<Completion, ProviderError> {
    let status = match kind {
        ErrorKind::RateLimited | ErrorKind::QuotaExhausted => Some(429),
        ErrorKind::Unavailable => Some(503),
        ErrorKind::Timeout | ErrorKind::Connection => None,
        ErrorKind::Malformed | ErrorKind::Oversize => Some(200),
        ErrorKind::Invalid => Some(400),
        ErrorKind::Unauthorized => Some(401),
    };
    Err(failure(Provider::OpenAi, kind, status, None))
}

/// A 429 with the provider's Retry-After.
pub fn rate_limited(retry_after: Duration) -> Result<Completion, ProviderError> {
    Err(failure(
        Provider::OpenAi,
        ErrorKind::RateLimited,
        Some(429),
        Some(retry_after),
    ))
}

/// The in-memory ports, wired as `App` wires the daemon's.
pub struct MemoryPorts {
    pub gates: MemoryGates,
    pub ledger: MemoryLedger,
    pub results: MemoryResults,
    pub providers: ScriptedProviders,
    pub prices: PriceCatalog,
    pub call_retry: CallRetryPolicy,
    pub store_gate: StoreGate,
    pub callbacks: AddressPolicy,
}

impl MemoryPorts {
    /// Ports whose providers answer `script`, with `room` in the budget.
    pub fn new(
        call_retry: CallRetryPolicy,
        room: MicroUsd,
        script: impl IntoIterator<Item = Result<Completion, ProviderError>>,
    ) -> Self {
        Self {
            gates: MemoryGates::default(),
            ledger: MemoryLedger::with_room(room),
            results: MemoryResults::default(),
            providers: ScriptedProviders::new(script),
            prices: PriceCatalog::builtin(),
            call_retry,
            store_gate: StoreGate::default(),
            callbacks: AddressPolicy::new(Vec::new()),
        }
    }
}

impl Ports for MemoryPorts {
    type Gates<'a> = &'a MemoryGates;
    type Ledger = MemoryLedger;
    type Results<'a> = &'a MemoryResults;
    type Providers = ScriptedProviders;

    fn gates(&self) -> &MemoryGates {
        &self.gates
    }

    fn ledger(&self) -> &MemoryLedger {
        &self.ledger
    }

    fn results(&self) -> &MemoryResults {
        &self.results
    }

    fn providers(&self) -> &ScriptedProviders {
        &self.providers
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

/// A test job as the queue hands it over: execution 1 of `j-1`, of the example's organisation.
pub fn raw_job(payload: &str, attempt: u32, max_attempts: u32) -> crate::queue::backend::RawJob {
    crate::queue::backend::RawJob {
        id: "j-1".into(),
        kind: "llm.complete".into(),
        tier: "growth_team".into(),
        organization_id: "0b6f1b3e-2a55-4a6e-9a43-2f6f6f1b2c3d".into(),
        payload: payload.into(),
        token: 1,
        attempt,
        max_attempts,
        enqueued_at_ms: 0,
        interrupts: 0,
        prior: Default::default(),
    }
}
