//! The handlers. Each job is decoded once, then: estimate -> provider breaker and pause ->
//! organisation rate -> provider requests/tokens per minute -> reserve the budget -> provider call
//! -> actual cost -> one transaction of rows in PostgreSQL -> settle the budget with the cost the
//! row holds -> alerts. A failed call may be called again in the same attempt (in-call retries,
//! with backoff), or an LLM job may move to the next model of its fallback chain; each such call
//! is reserved, recorded and settled on its own, numbered by `call_seq`. The outcome goes back to the queue as a [`Failure`] kind
//! (retry, permanent, defer) that the backend's ack layer turns into a retry, a dead job, a
//! deferral or an ack. Handlers read no environment variables: everything comes in through [`App`].

pub mod payload;

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use apalis_core::error::BoxDynError;
use apalis_core::task::Task;
use chrono::Utc;
use futures::FutureExt;
use futures::future::BoxFuture;
use sentry::SentryFutureExt;
use serde_json::{Value, json};
use tower::Service;
use tracing::Instrument;
use uuid::Uuid;

use crate::budget::alerts::Alerts;
use crate::budget::{Budget, CallMeta, OrgLimits, PriceCatalog, Refusal, Reservation};
use crate::config::{CallRetryPolicy, OnBudgetExceeded};
use crate::domain::{MicroUsd, Tier};
use crate::providers::anthropic::{self, AnthropicClient};
use crate::providers::breaker::{Admit, Opened};
use crate::providers::gemini::{self, GeminiClient};
use crate::providers::openai::{self, OpenAiClient};
use crate::providers::vision::{self, ImageResult, VisionClient};
use crate::providers::{ErrorKind, ProviderError};
use crate::queue::backend::{Failure, Prior, RawJob};
use crate::redact::Field;
use crate::store::{CallRecord, CallStatus, ErrorRecord, JobRef, ResultRecord, Store};
use payload::{JobInput, LlmPayload, VisionPayload, decode};

/// How long an organisation's limit overrides are cached.
const LIMITS_CACHE: Duration = Duration::from_secs(30);

/// What the handlers need, built once at start.
pub struct App {
    pub store: Store,
    pub budget: Budget,
    pub breakers: crate::providers::breaker::Breakers,
    pub alerts: Arc<Alerts>,
    pub clients: Clients,
    pub prices: PriceCatalog,
    /// How long a Vision call's and an LLM call's budget holds live unsettled: longer than the
    /// call can take (its timeout plus a margin), after which the sweeper takes them.
    pub hold_ttl: HoldTtl,
    /// Retries of a failed call inside one attempt.
    pub call_retry: CallRetryPolicy,
    /// The queue, where an answer whose rows PostgreSQL could not take is kept with its job.
    pub queue: crate::queue::Queue,
    limits: Mutex<HashMap<Uuid, (Instant, OrgLimits)>>,
    store_gate: StoreGate,
    /// Jobs of each organisation running in this process, against `AIQ_ORG_MAX_IN_FLIGHT`.
    in_flight: Arc<Mutex<HashMap<Uuid, u32>>>,
}

/// One running job's place in its organisation's in-flight count; given back on drop.
struct OrgSlot {
    org: Uuid,
    counts: Arc<Mutex<HashMap<Uuid, u32>>>,
}

impl Drop for OrgSlot {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = counts.get_mut(&self.org) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(&self.org);
            }
        }
    }
}

/// How long a process waits before it probes an unreachable PostgreSQL again.
const STORE_PROBE: Duration = Duration::from_secs(2);

/// How long after a budget window's reset a job that waited for it comes back, at the least.
const WINDOW_RESET_MARGIN: Duration = Duration::from_millis(50);

/// How long an answer whose rows PostgreSQL could not take is kept with its job in Redis: far
/// longer than any outage the job waits through.
const KEPT_ANSWER_TTL: Duration = Duration::from_secs(7 * 86_400);

/// A paid answer whose rows PostgreSQL could not take, kept with its job until it can: the rows
/// as they were to be written (with the execution that made the call), so the next execution
/// writes them instead of calling the provider again.
#[derive(serde::Serialize, serde::Deserialize)]
struct KeptAnswer {
    job: JobRef,
    /// The call's budget hold: kept from the sweeper, settled once the rows are written.
    reservation: String,
    call: CallRecord,
    result: ResultRecord,
}

/// Whether this process last found PostgreSQL unreachable, and until when it waits.
#[derive(Default)]
struct StoreGate {
    /// Unix ms until which calls are held back; 0 while PostgreSQL answers.
    down_until_ms: AtomicI64,
}

impl StoreGate {
    fn trip(&self) {
        let until = Utc::now().timestamp_millis() + STORE_PROBE.as_millis() as i64;
        self.down_until_ms.fetch_max(until, Ordering::AcqRel);
    }
}

/// What an [`App`] is built from: its connections, clients and policies.
pub struct AppParts {
    pub store: Store,
    pub budget: Budget,
    pub breakers: crate::providers::breaker::Breakers,
    pub queue: crate::queue::Queue,
    pub clients: Clients,
    pub prices: PriceCatalog,
    pub hold_ttl: HoldTtl,
    pub call_retry: CallRetryPolicy,
}

impl App {
    pub fn new(p: AppParts) -> Self {
        Self {
            alerts: Arc::new(Alerts::new(p.store.clone())),
            store: p.store,
            budget: p.budget,
            breakers: p.breakers,
            queue: p.queue,
            clients: p.clients,
            prices: p.prices,
            hold_ttl: p.hold_ttl,
            call_retry: p.call_retry,
            limits: Mutex::new(HashMap::new()),
            store_gate: StoreGate::default(),
            in_flight: Arc::default(),
        }
    }

    /// A place for one more job of `org` in this process, or None when its tier's cap
    /// (`AIQ_ORG_MAX_IN_FLIGHT`, 0 for none) is reached.
    fn org_slot(&self, org: Uuid, tier: Tier) -> Option<OrgSlot> {
        let cap = self.budget.settings().org_max_in_flight[tier.index()];
        let mut counts = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        let n = counts.entry(org).or_insert(0);
        if cap > 0 && *n >= cap {
            return None;
        }
        *n += 1;
        Some(OrgSlot {
            org,
            counts: self.in_flight.clone(),
        })
    }

    /// A store error as the queue's failure kind. PostgreSQL unreachable: the job waits without
    /// spending an attempt, and this process holds its calls back until PostgreSQL answers again
    /// (a call whose rows cannot be written would be paid for and then made again). Any other
    /// store error spends an attempt. Either way the call's hold is left to expire: the sweeper
    /// then records the call at its estimate, so a paid call whose row was lost is still counted.
    fn record<T>(&self, r: Result<T, crate::store::StoreError>) -> Result<T, Failure> {
        r.map_err(|e| self.store_failure(e))
    }

    /// [`App::record`]'s answer for one store error.
    fn store_failure(&self, e: crate::store::StoreError) -> Failure {
        if e.is_unavailable() {
            self.store_gate.trip();
            Failure::Defer {
                message: format!("PostgreSQL is unreachable: {e}"),
                after: STORE_PROBE + spread(jitter::STORE),
            }
        } else {
            Failure::Retry {
                message: format!("recording the outcome failed: {e}"),
                after: None,
            }
        }
    }

    /// Fails with a deferral while PostgreSQL is known to be unreachable. Once the wait is over,
    /// one job probes it (`SELECT 1`) while the others keep waiting.
    async fn store_reachable(&self) -> Result<(), Failure> {
        let until = self.store_gate.down_until_ms.load(Ordering::Acquire);
        if until == 0 {
            return Ok(());
        }
        let now = Utc::now().timestamp_millis();
        let wait = |until: i64| Failure::Defer {
            message: "PostgreSQL is unreachable; waiting before calling any provider".into(),
            after: Duration::from_millis((until - now).max(0) as u64) + spread(jitter::STORE),
        };
        if now < until {
            return Err(wait(until));
        }
        let next = now + STORE_PROBE.as_millis() as i64;
        if self
            .store_gate
            .down_until_ms
            .compare_exchange(until, next, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            // Another job is probing.
            return Err(wait(next));
        }
        match self.store.ping().await {
            Ok(()) => {
                self.store_gate.down_until_ms.store(0, Ordering::Release);
                tracing::info!("PostgreSQL answers again");
                Ok(())
            }
            Err(e) => {
                tracing::warn!(error = %e, "PostgreSQL is still unreachable");
                Err(wait(next))
            }
        }
    }

    /// An organisation's limits: its ai_cost_limits overrides over its tier's defaults.
    async fn org_limits(&self, org: Uuid, tier: Tier) -> Result<OrgLimits, Failure> {
        if let Some((at, limits)) = self.limits.lock().expect("limits cache").get(&org)
            && at.elapsed() < LIMITS_CACHE
        {
            return Ok(*limits);
        }
        let (daily, monthly) = self.record(self.store.org_limit_overrides(org).await)?;
        let defaults = self.budget.tier_limits(tier);
        let limits = OrgLimits {
            daily: daily.unwrap_or(defaults.daily),
            monthly: monthly.unwrap_or(defaults.monthly),
        };
        self.limits
            .lock()
            .expect("limits cache")
            .insert(org, (Instant::now(), limits));
        Ok(limits)
    }
}

/// How long budget holds live, per provider: its timeout plus a margin.
#[derive(Debug, Clone, Copy)]
pub struct HoldTtl {
    pub vision: Duration,
    pub openai: Duration,
    pub anthropic: Duration,
    pub gemini: Duration,
}

impl HoldTtl {
    /// The longest a call of any provider may take: after it, every call that was in flight at
    /// some moment has written its row.
    pub fn longest(&self) -> Duration {
        self.vision
            .max(self.openai)
            .max(self.anthropic)
            .max(self.gemini)
    }

    fn for_provider(&self, provider: &str) -> Duration {
        match provider {
            "google_vision" => self.vision,
            "anthropic" => self.anthropic,
            "gemini" => self.gemini,
            _ => self.openai,
        }
    }
}

/// One client per provider wire format.
pub struct Clients {
    pub vision: VisionClient,
    pub openai: OpenAiClient,
    pub anthropic: AnthropicClient,
    pub gemini: GeminiClient,
}

/// The apalis service that runs one job.
#[derive(Clone)]
pub struct JobService {
    app: Arc<App>,
}

impl JobService {
    pub fn new(app: Arc<App>) -> Self {
        Self { app }
    }
}

impl Service<Task<RawJob>> for JobService {
    type Response = ();
    type Error = BoxDynError;
    type Future = BoxFuture<'static, Result<(), BoxDynError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxDynError>> {
        Poll::Ready(Ok(()))
    }

    /// Each job runs on its own tokio task, so a slow or CPU-heavy job never stalls the worker's
    /// polling, and a panic becomes this job's error instead of the worker's. The task is bound
    /// to a Sentry hub of its own, so the job's events carry its own breadcrumbs only.
    fn call(&mut self, task: Task<RawJob>) -> Self::Future {
        let app = self.app.clone();
        let job = tokio::spawn(
            async move { run(&app, &task.args).await }.bind_hub(crate::observe::job_hub()),
        );
        async move {
            match job.await {
                Ok(outcome) => outcome.map_err(|f| Box::new(f) as BoxDynError),
                Err(e) => Err(format!("the job's task ended abnormally: {e}").into()),
            }
        }
        .boxed()
    }
}

fn job_ref(raw: &RawJob, input: Option<&JobInput>) -> JobRef {
    let common = input.map(JobInput::common);
    JobRef {
        job_id: raw.id.clone(),
        kind: raw.kind.clone(),
        tier: Some(raw.tier.clone()),
        organization_id: Uuid::parse_str(&raw.organization_id).ok(),
        subject_id: common.and_then(|c| c.subject_id),
        subject_type: common.and_then(|c| c.subject_type.clone()),
        correlation_id: common.and_then(|c| c.correlation_id.clone()),
        attempt: raw.attempt,
        execution: raw.token as i64,
    }
}

/// Runs one job. Public so tests can replay a job exactly as the worker runs it.
pub async fn run(app: &App, raw: &RawJob) -> Result<(), Failure> {
    let correlation_id = peek(raw, "correlation_id");
    // Every field comes from Redis, where an app (or anyone) wrote it: bounded and escaped, or
    // one megabyte correlation id would be written again on every line of the job.
    let span = tracing::info_span!("job", job.id = %Field::new(&raw.id), job.kind = %Field::new(&raw.kind),
        tier = %Field::new(&raw.tier), organization_id = %Field::new(&raw.organization_id),
        attempt = raw.attempt, correlation_id = %Field::new(&correlation_id));
    let started = Instant::now();
    let outcome = run_in_span(app, raw).instrument(span).await;
    let provider = provider_label(raw);
    let label = match &outcome {
        Ok(()) => "succeeded",
        Err(Failure::Defer { .. }) => "deferred",
        Err(Failure::Permanent { .. }) => "dead",
        Err(Failure::Retry { .. }) if raw.attempt >= raw.max_attempts => "dead",
        Err(Failure::Retry { .. }) => "retried",
    };
    let now_ms = Utc::now().timestamp_millis();
    let wait = Duration::from_millis(now_ms.saturating_sub(raw.enqueued_at_ms).max(0) as u64)
        .saturating_sub(started.elapsed());
    crate::observe::job_finished(
        label,
        &raw.kind,
        &raw.tier,
        &provider,
        started.elapsed(),
        wait,
    );
    if let (Err(f), "dead") = (&outcome, label) {
        report_dead(raw, &provider, &correlation_id, f);
    }
    outcome
}

/// A top-level string field of the payload, without decoding it (for labels and logs; the
/// payload may be invalid).
fn peek(raw: &RawJob, field: &str) -> String {
    serde_json::from_str::<Value>(&raw.payload)
        .ok()
        .and_then(|v| v.get(field).and_then(Value::as_str).map(str::to_owned))
        .unwrap_or_default()
}

/// The provider a job calls, for metric labels and Sentry tags.
fn provider_label(raw: &RawJob) -> String {
    match raw.kind.as_str() {
        "vision.annotate" => vision::PROVIDER.to_owned(),
        "llm.complete" => match peek(raw, "provider").as_str() {
            p @ ("openai" | "anthropic" | "gemini") => p.to_owned(),
            _ => "none".to_owned(),
        },
        _ => "none".to_owned(),
    }
}

/// A job that failed for good is a Sentry event, tagged. The hook in `observe` removes the
/// payload unless `AIQ_SENTRY_SEND_PAYLOADS=true`, removes keys, e-mail addresses and image
/// bytes from everything it carries, and cuts every text to a bound.
fn report_dead(raw: &RawJob, provider: &str, correlation_id: &str, failure: &Failure) {
    // Sentry refuses large events: a big payload goes as its first 8 KiB of text.
    const MAX_PAYLOAD: usize = 8 * 1024;
    let payload: Value = if raw.payload.len() > MAX_PAYLOAD {
        let mut end = MAX_PAYLOAD;
        while !raw.payload.is_char_boundary(end) {
            end -= 1;
        }
        Value::String(format!(
            "{}... ({} bytes in all)",
            &raw.payload[..end],
            raw.payload.len()
        ))
    } else {
        serde_json::from_str(&raw.payload).unwrap_or_else(|_| Value::String(raw.payload.clone()))
    };
    sentry::with_scope(
        |scope| {
            scope.set_tag("job.kind", &raw.kind);
            scope.set_tag("tier", &raw.tier);
            scope.set_tag("provider", provider);
            scope.set_tag("organization_id", &raw.organization_id);
            scope.set_tag("attempt", raw.attempt);
            scope.set_extra("job_id", Field::new(&raw.id).to_string().into());
            scope.set_extra(
                "correlation_id",
                Field::new(correlation_id).to_string().into(),
            );
            scope.set_extra("payload_bytes", raw.payload.len().into());
            scope.set_extra("payload", payload);
        },
        || {
            sentry::capture_message(
                &format!(
                    "job {} failed for good: {}",
                    Field::new(&raw.kind),
                    Field::message(&failure)
                ),
                sentry::Level::Error,
            )
        },
    );
}

/// A call a job may make, priced at the most it can cost. An LLM job's fallback chain is a list
/// of these, its own model first.
struct Planned {
    provider: &'static str,
    operation: &'static str,
    model: Option<String>,
    estimate: MicroUsd,
    hold_ttl: Duration,
    /// Tokens the call counts against the provider's tokens-per-minute limit.
    tokens: u64,
    /// The job's organisation, whose own breaker the call also passes.
    org: String,
}

/// How a call ended when it did not succeed.
enum Attempted {
    /// The provider failed; nothing is recorded yet, the caller decides what comes next.
    Failed(ProviderError),
    /// The outcome is recorded and final for this execution.
    Done(Failure),
}

impl From<Failure> for Attempted {
    fn from(f: Failure) -> Self {
        Attempted::Done(f)
    }
}

/// What follows a failed call.
enum Next {
    /// The same model again after this delay (an in-call retry).
    Again(Duration),
    /// The next model of the chain.
    FallBack,
    /// Back to the queue: a job-level retry, or the dead set.
    GiveUp,
}

/// The delays of a call's in-call retries: exponential from the policy's base to its cap, as
/// many as it allows. Full jitter is applied on top by [`full_jitter`].
fn call_backoff(p: &CallRetryPolicy) -> backon::ExponentialBackoff {
    use backon::BackoffBuilder;
    backon::ExponentialBuilder::default()
        .with_min_delay(p.base)
        .with_max_delay(p.cap)
        .with_max_times(p.retries as usize)
        .build()
}

/// Uniform in [1 ms, ceiling].
fn full_jitter(ceiling: Duration) -> Duration {
    ceiling
        .mul_f64(fastrand::f64())
        .max(Duration::from_millis(1))
}

fn spread(max_ms: u64) -> Duration {
    Duration::from_millis(fastrand::u64(0..=max_ms))
}

/// The random spreads (ms, uniform from 0) added to waits, so jobs that wait for the same thing
/// do not all come back in the same millisecond.
mod jitter {
    /// On PostgreSQL being unreachable, after the probe interval.
    pub const STORE: u64 = 1_000;
    /// On Redis failing before a call.
    pub const REDIS: u64 = 1_000;
    /// On an organisation's in-flight cap, after a second.
    pub const ORG_CAP: u64 = 1_000;
    /// On a paused provider, an open breaker, or a provider's requests or tokens per minute.
    pub const PROVIDER: u64 = 500;
    /// On a provider's own Retry-After inside a call's retries.
    pub const RETRY_AFTER: u64 = 250;
    /// On a budget window's reset: a whole window's waiting jobs wake together otherwise.
    pub const WINDOW_RESET: u64 = 2_000;
}

/// May `target` be called now? Checks its breaker and pause (one check per call: a half-open
/// breaker admits one probe), then counts the call against its requests and tokens per minute.
async fn admit_call(app: &App, target: &Planned) -> Result<Result<(), Duration>, Failure> {
    match breaker_admit(app, target).await? {
        Ok(admit) => {
            let throttled = throttle(app, target).await;
            if !matches!(throttled, Ok(Ok(()))) && admit == Admit::Probe {
                release_probe(&app.breakers, target.provider).await;
            }
            throttled
        }
        Err(wait) => Ok(Err(wait)),
    }
}

/// Gives back a half-open probe this job was granted but will not make, so recovery does not
/// wait for the probe to time out. A failure only costs that wait.
async fn release_probe(breakers: &crate::providers::breaker::Breakers, provider: &'static str) {
    if let Err(e) = breakers.release_probe(provider).await {
        tracing::warn!(error = %e, provider, "giving back an unused half-open probe failed");
    }
}

/// A half-open probe this job holds until its call is made; dropped unused (a limit or the
/// budget held the job back), it is given back.
struct ProbeGuard<'a> {
    app: &'a App,
    provider: Option<&'static str>,
}

impl ProbeGuard<'_> {
    /// The call is made: the probe is used.
    fn used(&mut self) {
        self.provider = None;
    }
}

impl Drop for ProbeGuard<'_> {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let breakers = self.app.breakers.clone();
            runtime.spawn(async move { release_probe(&breakers, provider).await });
        }
    }
}

/// The provider's pause and breaker, and the organisation's own breaker for the provider;
/// counts nothing, but a half-open breaker admits one probe.
async fn breaker_admit(app: &App, target: &Planned) -> Result<Result<Admit, Duration>, Failure> {
    let provider = target.provider;
    app.breakers
        .admit_call(provider, &target.org)
        .await
        .map_err(|e| {
            redis_unavailable(
                &format!("checking {provider}'s circuit breaker failed"),
                crate::redis_conn::error_kind(&e),
                e,
            )
        })
}

async fn throttle(app: &App, target: &Planned) -> Result<Result<(), Duration>, Failure> {
    app.breakers
        .throttle(target.provider, target.tokens)
        .await
        .map_err(|e| redis_down_provider(target.provider, e))
}

/// The first model of the chain from `from` on that may be called now, or the shortest wait
/// among them (zero when there is none left to try).
async fn admit_from(
    app: &App,
    chain: &[Planned],
    from: usize,
) -> Result<Result<usize, Duration>, Failure> {
    let mut wait: Option<Duration> = None;
    for (i, target) in chain.iter().enumerate().skip(from) {
        match admit_call(app, target).await? {
            Ok(()) => return Ok(Ok(i)),
            Err(w) => wait = Some(wait.map_or(w, |x| x.min(w))),
        }
    }
    Ok(Err(wait.unwrap_or_default()))
}

async fn run_in_span(app: &App, raw: &RawJob) -> Result<(), Failure> {
    app.store_reachable().await?;
    let input = match decode(raw, &app.prices) {
        Ok(input) => input,
        Err(e) => {
            // A payload that can never run: record why and send it to the dead set.
            let job = job_ref(raw, None);
            let err = ErrorRecord {
                error_type: "invalid_payload".into(),
                message: e.to_string(),
                details: json!({ "payload_bytes": raw.payload.len() }),
                provider: None,
                http_status: None,
                call_seq: 0,
            };
            let result = failed_result("none", None, &e.to_string());
            app.record(
                app.store
                    .record_failure(&job, &err, None, Some(&result))
                    .await,
            )?;
            tracing::warn!(error = %Field::message(&e), "dead: invalid payload");
            return Err(Failure::Permanent {
                message: e.to_string(),
            });
        }
    };
    let job = job_ref(raw, Some(&input));
    let org = input.common().organization_id.as_uuid();
    let tier = input.common().tier;
    // A job id that already has an outcome is never run or paid for again: a worker that
    // stopped mid-job may have recorded it without acknowledging it, or the app reused an id
    // that finished. The backend looked it up once for the whole batch.
    match raw.prior {
        Prior::Nothing => {}
        Prior::Completed => {
            tracing::info!("this job id already has a result: acknowledged without a call");
            crate::observe::job_already_done();
            return Ok(());
        }
        Prior::Failed => {
            crate::observe::job_already_done();
            return Err(Failure::Permanent {
                message: "this job id already has a result that failed for good".into(),
            });
        }
        Prior::Unknown => {
            app.store_gate.trip();
            return Err(Failure::Defer {
                message: "PostgreSQL is unreachable: whether this job already ran is unknown"
                    .into(),
                after: STORE_PROBE + spread(jitter::STORE),
            });
        }
    }

    // One organisation's jobs take at most its tier's share of this process, so its slow or
    // hanging calls cannot hold every slot; the rest wait without spending an attempt.
    let Some(_slot) = app.org_slot(org, tier) else {
        crate::observe::org_in_flight_deferral(tier.as_str());
        return Err(Failure::Defer {
            message: format!(
                "this organisation has {} jobs running in this process, its tier's cap (AIQ_ORG_MAX_IN_FLIGHT)",
                app.budget.settings().org_max_in_flight[tier.index()]
            ),
            // Long enough that an organisation with many jobs over its cap does not keep the
            // process busy leasing and handing them back.
            after: Duration::from_millis(1_000) + spread(jitter::ORG_CAP),
        });
    };
    // An earlier execution may have been answered while PostgreSQL was down: write what it
    // kept instead of calling again. Only a job leased before can have kept anything.
    // Boxed, like the store's transactions: every running job's future would otherwise reserve
    // room for this rarely taken path while it waits on its provider.
    if raw.token > 1 && Box::pin(write_kept_answer(app, raw, &job)).await? {
        return Ok(());
    }
    let chain = match plan(app, &input) {
        Ok(c) => c,
        Err(e) => return unpriced(app, &job, &input, e).await,
    };
    // A model whose estimate alone is above a whole window's limit, or above its provider's
    // tokens per minute, can never be called: waiting for a reset would wait forever. The chain
    // keeps the models that can; with none left the job is dead now, and no alert is raised
    // (nobody spent anything).
    let limits = app.org_limits(org, tier).await?;
    let (chain, never): (Vec<Planned>, Vec<String>) = {
        let mut fits = Vec::with_capacity(chain.len());
        let mut never = Vec::new();
        for target in chain {
            match never_fits(app, &target, org, limits) {
                Some(why) => never.push(why),
                None => fits.push(target),
            }
        }
        (fits, never)
    };
    if chain.is_empty() {
        return never_fit(app, &job, &never).await;
    }
    // Open breakers and fleet-wide pauses hold calls back without counting anything against a
    // limit: the job takes the first model of its chain that may be called, or waits, spending
    // no attempt.
    let mut first = None;
    let mut held = Duration::MAX;
    let mut probe = ProbeGuard {
        app,
        provider: None,
    };
    for (i, target) in chain.iter().enumerate() {
        match breaker_admit(app, target).await? {
            Ok(admit) => {
                first = Some(i);
                if admit == Admit::Probe {
                    probe.provider = Some(target.provider);
                }
                break;
            }
            Err(wait) => held = held.min(wait),
        }
    }
    let Some(first) = first else {
        return Err(Failure::Defer {
            message: format!(
                "{} is paused (rate limited, or its circuit breaker is open); trying again later",
                chain[0].provider
            ),
            after: held + spread(jitter::PROVIDER),
        });
    };
    // The organisation's rate: a job over it waits for the next minute, it does not fail.
    match app.budget.admit(org, tier).await {
        Ok(Ok(())) => {}
        Ok(Err(wait)) => {
            return Err(Failure::Defer {
                message: format!("organization {org} is over its {tier} rate of jobs per minute"),
                after: wait,
            });
        }
        Err(e) => return Err(redis_down(e)),
    }
    // The provider's requests and tokens per minute, fleet-wide: over them, the next model of
    // the chain, or wait.
    let mut idx = match throttle(app, &chain[first]).await? {
        Ok(()) => first,
        Err(wait) => match admit_from(app, &chain, first + 1).await? {
            Ok(i) => i,
            Err(w) => {
                return Err(Failure::Defer {
                    message: format!(
                        "{} is at its requests or tokens per minute",
                        chain[first].provider
                    ),
                    after: if w.is_zero() { wait } else { wait.min(w) } + spread(jitter::PROVIDER),
                });
            }
        },
    };
    if idx != first
        && let Some(provider) = probe.provider.take()
    {
        // Throttled to a fallback: the first model's probe goes unmade.
        release_probe(&app.breakers, provider).await;
    }
    let (_, billing_date) = app.budget.scopes(org, limits, app.budget.now());
    let mut backoff = call_backoff(&app.call_retry);
    let mut call_seq = 0i32;
    loop {
        let target = &chain[idx];
        let meta = CallMeta {
            job_id: raw.id.clone(),
            execution: job.execution,
            attempt: raw.attempt,
            call_seq,
            organization_id: org,
            tier: tier.as_str().into(),
            provider: target.provider.into(),
            operation: target.operation.into(),
            model: target.model.clone(),
            billing_date,
        };
        // Every call holds its own estimate: a fallback is priced at its model's rates.
        let reservation = match app
            .budget
            .reserve(
                meta,
                limits,
                target.estimate,
                target.hold_ttl,
                app.budget.now(),
            )
            .await
        {
            Ok(Ok(r)) => r,
            Ok(Err(refusal)) => {
                return over_budget(app, raw, &job, target, refusal, call_seq).await;
            }
            Err(e) => return Err(redis_down(e)),
        };
        // The probe, if this job holds one, is made now (or by a fallback's call: either way a
        // call goes out).
        probe.used();
        let e = match call(app, raw, &job, &input, target, &reservation).await {
            Ok(()) => {
                tracing::info!(
                    provider = target.provider,
                    calls = call_seq + 1,
                    "job succeeded"
                );
                return Ok(());
            }
            Err(Attempted::Done(f)) => {
                tracing::warn!(error = %Field::message(&f), "job attempt failed");
                return Err(f);
            }
            Err(Attempted::Failed(e)) => e,
        };
        // Retry the same model while the policy allows and the wait fits in a call; else the
        // next model of the chain; else back to the queue.
        let again = match (e.is_retryable(), e.retry_after) {
            (false, _) => None,
            (true, Some(r)) if r > app.call_retry.cap => None,
            (true, after) => backoff
                .next()
                .map(|d| after.map_or_else(|| full_jitter(d), |r| r + spread(jitter::RETRY_AFTER))),
        };
        let next = match again {
            Some(d) => Next::Again(d),
            None if idx + 1 < chain.len() => Next::FallBack,
            None => Next::GiveUp,
        };
        let give_up = job_level(&e);
        let last = matches!(next, Next::GiveUp)
            && (matches!(give_up, Failure::Permanent { .. }) || raw.attempt >= raw.max_attempts);
        let err = failed_call(app, &job, &e, &reservation, last).await?;
        call_seq += 1;
        let wait = match next {
            Next::GiveUp => {
                tracing::warn!(error = %Field::message(&give_up), "job attempt failed");
                return Err(give_up);
            }
            Next::Again(delay) => {
                tracing::info!(provider = target.provider, error = %Field::message(&e), delay_ms = delay.as_millis() as u64,
                    "calling the provider again");
                crate::observe::call_retried(target.provider, e.kind.as_str());
                tokio::time::sleep(delay).await;
                match admit_call(app, target).await? {
                    Ok(()) => continue,
                    Err(wait) => wait,
                }
            }
            Next::FallBack => Duration::ZERO,
        };
        match admit_from(app, &chain, idx + 1).await? {
            Ok(i) => {
                tracing::info!(from = target.provider, to = chain[i].provider, error = %Field::message(&e),
                    "falling back to the next model of the chain");
                crate::observe::fell_back(target.provider, chain[i].provider);
                idx = i;
                backoff = call_backoff(&app.call_retry);
            }
            Err(w) => {
                // Nothing in the chain may be called now: back to the queue, after the wait.
                let message = format!(
                    "{e}; then no model of the chain could be called (paused, circuit breaker open, or at its per-minute limits)"
                );
                if raw.attempt >= raw.max_attempts {
                    let result = failed_result(target.provider, target.model.clone(), &message);
                    app.record(
                        app.store
                            .record_failure(&job, &err, None, Some(&result))
                            .await,
                    )?;
                }
                tracing::warn!(error = %Field::message(&message), "job attempt failed");
                // Spread: a job whose call failed as its breaker opened must not come back
                // exactly as the cooldown ends, or it is the next probe again and again.
                let after = wait.max(w).max(e.retry_after.unwrap_or_default());
                return Err(Failure::Retry {
                    message,
                    after: Some(after + spread((after.as_millis() as u64 / 4).max(1_000))),
                });
            }
        }
    }
}

/// Why `target` can never be called, if it cannot: its estimate is above a whole window's limit
/// (a limit of 0 pauses spending instead: the job waits), or its tokens above its provider's
/// tokens per minute.
fn never_fits(app: &App, target: &Planned, org: Uuid, limits: OrgLimits) -> Option<String> {
    let (scopes, _) = app.budget.scopes(org, limits, app.budget.now());
    let model = target.model.as_deref().unwrap_or(target.operation);
    if let Some(s) = scopes
        .iter()
        .find(|s| s.limit.micros() > 0 && target.estimate > s.limit)
    {
        return Some(format!(
            "{} {model} can cost up to {}, more than the whole {} limit of {} for {}",
            target.provider,
            target.estimate,
            s.window.kind.as_str(),
            s.limit,
            match s.owner {
                crate::budget::Owner::Global => "the platform".to_owned(),
                crate::budget::Owner::Org(o) => format!("organization {o}"),
            }
        ));
    }
    let tpm = app.breakers.tokens_per_minute(target.provider)?;
    (target.tokens > tpm).then(|| {
        format!(
            "{} {model} needs up to {} tokens, more than {}'s {tpm} tokens per minute",
            target.provider, target.tokens, target.provider
        )
    })
}

/// A job none of whose models can ever be called: dead on this delivery, with the reason.
async fn never_fit(app: &App, job: &JobRef, why: &[String]) -> Result<(), Failure> {
    let message = format!("this job can never run: {}", why.join("; "));
    let err = ErrorRecord {
        error_type: "budget_exceeded".into(),
        message: message.clone(),
        details: json!({ "never_fits": true, "reasons": why }),
        provider: None,
        http_status: None,
        call_seq: 0,
    };
    let result = failed_result("none", None, &message);
    app.record(
        app.store
            .record_failure(job, &err, None, Some(&result))
            .await,
    )?;
    tracing::warn!("dead: {}", Field::message(&message));
    Err(Failure::Permanent { message })
}

/// A provider's failure as the queue's failure kind, for when the job gives up this attempt.
fn job_level(e: &ProviderError) -> Failure {
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

/// One call to the target's provider.
async fn call(
    app: &App,
    raw: &RawJob,
    job: &JobRef,
    input: &JobInput,
    target: &Planned,
    reservation: &Reservation,
) -> Result<(), Attempted> {
    match input {
        JobInput::Vision(v) => run_vision(app, raw, job, v, reservation).await,
        JobInput::Llm(l) => run_llm(app, raw, job, l, target, reservation).await,
    }
}

fn redis_down_provider(provider: &str, e: redis::RedisError) -> Failure {
    redis_unavailable(
        &format!("checking {provider}'s fleet-wide limits failed"),
        crate::redis_conn::error_kind(&e),
        e,
    )
}

/// Redis is the budget's ledger of holds: without it no call may start (fail closed).
fn redis_down(e: crate::budget::BudgetError) -> Failure {
    let kind = match &e {
        crate::budget::BudgetError::Redis(r) => crate::redis_conn::error_kind(r),
        crate::budget::BudgetError::Protocol(_) => "protocol",
        crate::budget::BudgetError::LedgerMissing => "ledger",
        // Only connecting returns it, and a running job's connection is already made.
        crate::budget::BudgetError::Tls(_) => "tls",
    };
    redis_unavailable(
        "no provider call without a budget check, and the check failed",
        kind,
        e,
    )
}

/// How long a job waits when Redis could not answer one of its checks before a call.
const REDIS_WAIT: Duration = Duration::from_secs(1);

/// A Redis failure before a call (out of memory, read-only, loading, a lost connection...) is
/// never the job's fault: no call is made, and the job waits without spending an attempt.
fn redis_unavailable(what: &str, kind: &'static str, e: impl std::fmt::Display) -> Failure {
    crate::observe::redis_deferral(kind);
    Failure::Defer {
        message: format!("{what}: {e}; waiting without spending an attempt"),
        after: REDIS_WAIT + spread(jitter::REDIS),
    }
}

/// The calls a job may make, each priced at the most it can cost: Vision's one, or an LLM job's
/// model followed by its fallbacks. A job with any model the catalog cannot price is refused
/// before any call.
fn plan(app: &App, input: &JobInput) -> Result<Vec<Planned>, crate::budget::PriceError> {
    match input {
        JobInput::Vision(v) => {
            let features: Vec<String> = v.features.iter().map(|f| f.kind.clone()).collect();
            Ok(vec![Planned {
                provider: vision::PROVIDER,
                operation: "images:annotate",
                model: None,
                estimate: app
                    .prices
                    .vision_estimate(&features, v.images.len() as u32)?,
                hold_ttl: app.hold_ttl.vision,
                tokens: 0,
                org: v.common.organization_id.to_string(),
            }])
        }
        JobInput::Llm(l) => {
            // An upper bound on input tokens without a tokenizer: a token is at least one byte
            // of UTF-8, plus a few tokens of framing per message.
            let input_bound: u64 = l
                .messages
                .iter()
                .map(|m| m.content.len() as u64 + m.role.len() as u64 + 8)
                .sum();
            l.chain()
                .into_iter()
                .map(|m| {
                    Ok(Planned {
                        provider: match m.provider.as_str() {
                            "openai" => openai::PROVIDER,
                            "anthropic" => anthropic::PROVIDER,
                            "gemini" => gemini::PROVIDER,
                            _ => "unknown",
                        },
                        operation: "chat.completions",
                        estimate: app.prices.llm_estimate(
                            &m.provider,
                            &m.model,
                            input_bound,
                            l.max_tokens as u64,
                        )?,
                        hold_ttl: app.hold_ttl.for_provider(&m.provider),
                        tokens: input_bound + l.max_tokens as u64,
                        org: l.common.organization_id.to_string(),
                        model: Some(m.model),
                    })
                })
                .collect()
        }
    }
}

/// Settles the budget with the cost PostgreSQL holds for the call, then raises any alerts.
async fn settle(app: &App, reservation: &Reservation, recorded: MicroUsd) {
    crate::observe::cost(
        &reservation.meta.provider,
        &reservation.meta.tier,
        recorded.as_usd_f64(),
    );
    match app.budget.settle(&reservation.id, recorded).await {
        Ok(states) => app.alerts.check(&states).await,
        // The hold stays and expires; the sweeper settles it from the cost row.
        Err(e) => {
            tracing::warn!(error = %e, reservation = %reservation.id, "settling the budget failed; the sweeper will")
        }
    }
}

fn failed_result(provider: &str, model: Option<String>, message: &str) -> ResultRecord {
    ResultRecord {
        provider: provider.into(),
        model,
        raw_response: json!({ "error": message }),
        confidence_scores: json!({}),
        processing_ms: 0,
        cost: MicroUsd::ZERO,
        completed: false,
        error_message: Some(message.into()),
    }
}

fn call_record(app: &App, r: &Reservation, cost: MicroUsd, status: CallStatus) -> CallRecord {
    CallRecord {
        provider: r.meta.provider.clone(),
        operation: r.meta.operation.clone(),
        model: r.meta.model.clone(),
        call_seq: r.meta.call_seq,
        billing_date: r.meta.billing_date,
        estimate: Some(r.estimate),
        units: None,
        input_tokens: None,
        cached_tokens: None,
        output_tokens: None,
        cost,
        status,
        price_version: app.prices.version.clone(),
        metadata: json!({}),
    }
}

/// Writes a paid answer's rows and settles its hold. When PostgreSQL cannot take them, the rows
/// are kept with the job in Redis, its hold (counted at the estimate) is kept from the sweeper,
/// and the job waits without spending an attempt: its next execution
/// writes them ([`write_kept_answer`]) instead of calling the provider again. Only if Redis
/// cannot keep them either is the answer lost, as before: the hold then expires into a cost row
/// at its estimate, and the job is run again.
async fn record_answer(
    app: &App,
    raw: &RawJob,
    job: &JobRef,
    reservation: &Reservation,
    call: CallRecord,
    result: ResultRecord,
) -> Result<(), Attempted> {
    let unwritten = match app.store.record_success_or_return(job, call, result).await {
        Ok(recorded) => {
            settle(app, reservation, recorded).await;
            Box::pin(above_estimate(app, job, reservation, recorded)).await;
            return Ok(());
        }
        Err(u) => *u,
    };
    let crate::store::Unwritten { error, rows } = unwritten;
    let (Some((call, result)), true) = (rows, error.is_unavailable()) else {
        return Err(app.store_failure(error).into());
    };
    app.store_gate.trip();
    let kept = KeptAnswer {
        job: job.clone(),
        reservation: reservation.id.clone(),
        call,
        result,
    };
    let bytes = match serde_json::to_vec(&kept) {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(error = %e, "an answer could not be serialised to keep it");
            return Err(app.store_failure(error).into());
        }
    };
    if let Err(e) = app.queue.keep(&raw.id, &bytes, KEPT_ANSWER_TTL).await {
        tracing::error!(error = %e, "PostgreSQL and Redis both failed: the answer is lost, and the job will call again");
        return Err(app.store_failure(error).into());
    }
    // The hold stays, counted at its estimate, until the rows are written and settle it at the
    // cost they hold: the sweeper must not book it as expired meanwhile. (If it already has,
    // its row is the call's and both settle at it.)
    if let Err(e) = app
        .budget
        .extend_hold(&reservation.id, KEPT_ANSWER_TTL)
        .await
    {
        tracing::warn!(error = %e, "keeping the hold of a kept answer from the sweeper failed");
    }
    crate::observe::answer_kept();
    tracing::warn!(error = %error, "PostgreSQL is unreachable: the answer is kept with the job and written when it is back");
    Err(Attempted::Done(Failure::Defer {
        message: format!("PostgreSQL is unreachable: the answer is kept with the job: {error}"),
        after: STORE_PROBE + spread(jitter::STORE),
    }))
}

/// Writes the rows an earlier execution kept ([`record_answer`]) and settles the call's hold at
/// the cost its row holds; true when it did, and the job is done.
async fn write_kept_answer(app: &App, raw: &RawJob, job: &JobRef) -> Result<bool, Failure> {
    let bytes = match app.queue.kept(&raw.id).await {
        Ok(Some(b)) => b,
        Ok(None) => return Ok(false),
        Err(e) => {
            crate::observe::redis_deferral("kept_answer");
            return Err(Failure::Defer {
                message: format!("reading the job's kept answer failed: {e}"),
                after: STORE_PROBE + spread(jitter::STORE),
            });
        }
    };
    let kept: KeptAnswer = match serde_json::from_slice(&bytes) {
        Ok(k) => k,
        Err(e) => {
            tracing::error!(error = %e, "the job's kept answer cannot be read: calling again");
            let _ = app.queue.forget_kept(&raw.id).await;
            return Ok(false);
        }
    };
    if kept.job.job_id != job.job_id || kept.job.organization_id != job.organization_id {
        tracing::error!("a kept answer of another job or organisation under this id: ignored");
        let _ = app.queue.forget_kept(&raw.id).await;
        return Ok(false);
    }
    let recorded = app.record(
        app.store
            .record_success(&kept.job, kept.call, kept.result)
            .await,
    )?;
    match app.budget.settle(&kept.reservation, recorded).await {
        Ok(states) => app.alerts.check(&states).await,
        Err(e) => {
            tracing::warn!(error = %e, reservation = %kept.reservation, "settling a kept answer's hold failed; the sweeper will")
        }
    }
    if let Err(e) = app.queue.forget_kept(&raw.id).await {
        // Harmless: writing the rows again changes nothing (one row per call and per job).
        tracing::warn!(error = %e, "forgetting a written kept answer failed");
    }
    crate::observe::kept_answer_written();
    tracing::info!("the answer kept during PostgreSQL's outage is written: no second call");
    Ok(true)
}

/// A call whose actual cost is above its reservation: the estimate was not the upper bound it
/// must be (a catalog without a rate the provider charges, or usage beyond what the request
/// allowed). The actual cost stands (the provider bills it) and is settled; this adds an error
/// row, a metric and an error event (Sentry), so the catalog gets fixed.
async fn above_estimate(app: &App, job: &JobRef, reservation: &Reservation, cost: MicroUsd) {
    if cost <= reservation.estimate {
        return;
    }
    let provider = reservation.meta.provider.as_str();
    crate::observe::cost_above_estimate(provider);
    let message = format!(
        "the call cost ${:.6}, above its reservation's estimate of ${:.6}: the actual cost is recorded; check the price catalog",
        cost.as_usd_f64(),
        reservation.estimate.as_usd_f64()
    );
    tracing::error!(job.id = %job.job_id, provider, model = ?reservation.meta.model, "{message}");
    let err = ErrorRecord {
        error_type: "cost_above_estimate".into(),
        message,
        details: json!({ "estimate_usd": reservation.estimate.as_usd_f64(), "cost_usd": cost.as_usd_f64(),
            "model": reservation.meta.model, "price_version": app.prices.version }),
        provider: Some(provider.to_owned()),
        http_status: Some(200),
        call_seq: reservation.meta.call_seq,
    };
    if let Err(e) = app.store.record_error(job, &err).await {
        tracing::warn!(error = %e, job.id = %job.job_id, "writing the cost_above_estimate row failed");
    }
}

/// Records a failed provider call: its cost row, its error row and, when the job will not be
/// tried again, its failed result; then settles its hold. A call that timed out after it was
/// sent may have been billed, so it costs its estimate; one the provider answered with an
/// error, or that never connected, costs nothing. Returns the error row it wrote.
async fn failed_call(
    app: &App,
    job: &JobRef,
    e: &ProviderError,
    reservation: &Reservation,
    last: bool,
) -> Result<ErrorRecord, Failure> {
    let err = ErrorRecord {
        error_type: e.kind.as_str().into(),
        message: e.message.clone(),
        details: json!({ "retryable": e.is_retryable(), "retry_after_ms": e.retry_after.map(|d| d.as_millis() as u64),
            "model": reservation.meta.model }),
        provider: Some(e.provider.into()),
        http_status: e.status.map(i32::from),
        call_seq: reservation.meta.call_seq,
    };
    // What the provider most likely billed: a timed-out call may have run to its end, and a
    // success status whose body is unusable or too long was answered (all at the estimate); an
    // error status costs nothing.
    let (cost, status) = match e.kind {
        ErrorKind::Oversize if e.answered() => (reservation.estimate, CallStatus::Oversize),
        _ if e.answered() => (reservation.estimate, CallStatus::Unusable),
        ErrorKind::Timeout => (reservation.estimate, CallStatus::Failed),
        _ => (MicroUsd::ZERO, CallStatus::Failed),
    };
    let mut call = call_record(app, reservation, cost, status);
    call.metadata = json!({ "http_status": e.status, "error": e.kind.as_str() });
    let result =
        last.then(|| failed_result(e.provider, reservation.meta.model.clone(), &e.to_string()));
    let recorded = app.record(
        app.store
            .record_failure(job, &err, Some(&call), result.as_ref())
            .await,
    )?;
    settle(app, reservation, recorded.unwrap_or(cost)).await;
    Ok(err)
}

/// A job the catalog cannot price never reaches a provider.
async fn unpriced(
    app: &App,
    job: &JobRef,
    input: &JobInput,
    e: crate::budget::PriceError,
) -> Result<(), Failure> {
    let provider = match input {
        JobInput::Vision(_) => vision::PROVIDER.to_owned(),
        JobInput::Llm(l) => l.provider.clone(),
    };
    let err = ErrorRecord {
        error_type: "unpriced".into(),
        message: e.to_string(),
        details: json!({}),
        provider: Some(provider.clone()),
        http_status: None,
        call_seq: 0,
    };
    let result = failed_result(&provider, None, &e.to_string());
    app.record(
        app.store
            .record_failure(job, &err, None, Some(&result))
            .await,
    )?;
    Err(Failure::Permanent {
        message: e.to_string(),
    })
}

/// No room in a budget: no call. The job waits for the window to reset (or fails, by setting).
async fn over_budget(
    app: &App,
    raw: &RawJob,
    job: &JobRef,
    planned: &Planned,
    refusal: Refusal,
    call_seq: i32,
) -> Result<(), Failure> {
    let message = refusal.message();
    app.alerts.limit_reached(&refusal).await;
    let fail = app.budget.settings().on_exceeded == OnBudgetExceeded::Fail;
    let err = ErrorRecord {
        error_type: "budget_exceeded".into(),
        message: message.clone(),
        details: json!({
            "scope": refusal.scope.suffix(),
            "limit_usd": refusal.scope.limit.as_usd_f64(),
            "spent_usd": refusal.spent.as_usd_f64(),
            "reserved_usd": refusal.reserved.as_usd_f64(),
            "estimate_usd": refusal.estimate.as_usd_f64(),
            "resets_at": refusal.scope.window.resets_at.to_rfc3339(),
        }),
        provider: Some(planned.provider.into()),
        http_status: None,
        call_seq,
    };
    let result = fail.then(|| failed_result(planned.provider, planned.model.clone(), &message));
    app.record(
        app.store
            .record_failure(job, &err, None, result.as_ref())
            .await,
    )?;
    tracing::info!(job.id = %Field::new(&raw.id), "{}", Field::message(&message));
    if fail {
        return Err(Failure::Permanent { message });
    }
    let until = (refusal.scope.window.resets_at - app.budget.now())
        .to_std()
        .unwrap_or_default();
    // A little spread, so a window's waiting jobs do not all wake in the same millisecond, after
    // a margin for the error of the budget's estimate of Redis's clock (a job woken a
    // millisecond before the reset would only be refused again).
    Err(Failure::Defer {
        message,
        after: until + WINDOW_RESET_MARGIN + spread(jitter::WINDOW_RESET),
    })
}

async fn run_vision(
    app: &App,
    raw: &RawJob,
    job: &JobRef,
    v: &VisionPayload,
    reservation: &Reservation,
) -> Result<(), Attempted> {
    let features: Vec<String> = v.features.iter().map(|f| f.kind.clone()).collect();
    let started = Instant::now();
    let resp = app.clients.vision.annotate(&v.images, &v.features).await;
    crate::observe::provider_call(vision::PROVIDER, call_status(&resp), started.elapsed());
    breaker_record(app, vision::PROVIDER, &raw.organization_id, &resp).await;
    let resp = resp.map_err(Attempted::Failed)?;
    let elapsed = started.elapsed().as_millis() as i64;
    let billable = resp.billable_images() as u64;
    let billed = app
        .prices
        .billed_features(&features)
        .map_err(|e| Failure::Permanent {
            message: e.to_string(),
        })?;
    // The month's units so far decide the price (the first 1,000 of each feature are free).
    let month = reservation.meta.billing_date.format("%Y-%m").to_string();
    let units: Vec<(&str, u64)> = billed.iter().map(|f| (*f, billable)).collect();
    let cost = match app.budget.claim_vision_units(&month, &units).await {
        Ok(before) => {
            let mut total = MicroUsd::ZERO;
            for ((feature, n), b) in units.iter().zip(before) {
                let c = app
                    .prices
                    .vision_feature_cost(feature, b, *n)
                    .map_err(|e| Failure::Permanent {
                        message: e.to_string(),
                    })?;
                total = total.checked_add(c).unwrap_or(total);
            }
            total
        }
        Err(e) => {
            tracing::warn!(error = %e, "counting Vision units failed; pricing the call at its estimate");
            reservation.estimate
        }
    };
    let failed_images: Vec<Value> = resp
        .images
        .iter()
        .enumerate()
        .filter_map(|(i, r)| match r {
            ImageResult::Failed { code, message } => {
                Some(json!({ "index": i, "code": code, "message": message }))
            }
            ImageResult::Annotated(_) => None,
        })
        .collect();
    let units_by_feature: serde_json::Map<String, Value> = units
        .iter()
        .map(|(f, n)| ((*f).to_owned(), json!(n)))
        .collect();
    let mut call = call_record(app, reservation, cost, CallStatus::Succeeded);
    call.units = Some(billable as i64 * features.len() as i64);
    call.metadata = json!({ "features": features, "images": v.images.len(), "billable_images": billable,
        "units_by_feature": units_by_feature, "failed_images": failed_images });
    let confidence = confidence_scores(&resp.raw);
    let all_failed = failed_images.len() == v.images.len();
    if all_failed {
        // No image was annotated: the job failed. Bad input (INVALID_ARGUMENT, code 3) cannot
        // succeed on a retry; any other per-image error (UNAVAILABLE, INTERNAL...) can.
        let retryable = resp
            .images
            .iter()
            .any(|r| matches!(r, ImageResult::Failed { code, .. } if *code != 3));
        let message = format!(
            "every image failed: {failed_images}",
            failed_images = Value::Array(failed_images.clone())
        );
        let last = !retryable || raw.attempt >= raw.max_attempts;
        let err = ErrorRecord {
            error_type: if retryable {
                "image_failed"
            } else {
                "invalid_image"
            }
            .into(),
            message: message.clone(),
            details: json!({ "failed_images": failed_images }),
            provider: Some(vision::PROVIDER.into()),
            http_status: Some(200),
            call_seq: reservation.meta.call_seq,
        };
        let result = last.then(|| failed_result(vision::PROVIDER, None, &message));
        let recorded = app.record(
            app.store
                .record_failure(job, &err, Some(&call), result.as_ref())
                .await,
        )?;
        settle(app, reservation, recorded.unwrap_or(cost)).await;
        return Err(Attempted::Done(if retryable {
            Failure::Retry {
                message,
                after: None,
            }
        } else {
            Failure::Permanent { message }
        }));
    }
    let result = ResultRecord {
        provider: vision::PROVIDER.into(),
        model: None,
        raw_response: resp.raw,
        confidence_scores: confidence,
        processing_ms: elapsed,
        cost,
        completed: true,
        error_message: (!failed_images.is_empty()).then(|| {
            format!(
                "{} of {} images failed",
                failed_images.len(),
                v.images.len()
            )
        }),
    };
    Box::pin(record_answer(app, raw, job, reservation, call, result)).await
}

/// Tells the provider's breaker, and the organisation's own, how a call went.
async fn breaker_record<T>(app: &App, provider: &str, org: &str, r: &Result<T, ProviderError>) {
    // A 429 with the provider's own delay pauses it for the whole fleet.
    if let Err(ProviderError {
        kind: ErrorKind::RateLimited,
        retry_after: Some(wait),
        ..
    }) = r
    {
        match app.breakers.pause(provider, *wait).await {
            Ok(()) => tracing::warn!(
                provider,
                wait_ms = wait.as_millis() as u64,
                "rate limited: pausing the provider for every process"
            ),
            Err(e) => tracing::warn!(error = %e, provider, "pausing the provider failed"),
        }
    }
    let outcome = r.as_ref().map(|_| ()).map_err(|e| e.kind);
    match app.breakers.record(provider, org, outcome).await {
        Ok(Opened::Provider) => tracing::error!(
            provider,
            "circuit breaker opened: the provider keeps failing for several organisations; its jobs wait"
        ),
        Ok(Opened::Organization) => tracing::warn!(
            provider,
            organization_id = %crate::redact::Field::new(org),
            "this organisation's calls keep failing: its own breaker opened; its jobs wait, other organisations' go on"
        ),
        Ok(Opened::No) => {}
        Err(e) => {
            tracing::warn!(error = %e, provider, "recording a call in the circuit breaker failed")
        }
    }
}

fn call_status<T>(r: &Result<T, ProviderError>) -> &'static str {
    match r {
        Ok(_) => "ok",
        Err(e) => e.kind.as_str(),
    }
}

/// Label scores by description, the shape the plan's confidence_scores column holds.
fn confidence_scores(raw: &Value) -> Value {
    let mut scores = serde_json::Map::new();
    if let Some(responses) = raw.get("responses").and_then(Value::as_array) {
        for r in responses {
            for l in r
                .get("labelAnnotations")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if let (Some(d), Some(s)) =
                    (l.get("description").and_then(Value::as_str), l.get("score"))
                {
                    scores.insert(d.to_owned(), s.clone());
                }
            }
        }
    }
    Value::Object(scores)
}

async fn run_llm(
    app: &App,
    raw: &RawJob,
    job: &JobRef,
    l: &LlmPayload,
    target: &Planned,
    reservation: &Reservation,
) -> Result<(), Attempted> {
    let provider = target.provider;
    let model = target.model.as_deref().unwrap_or_default();
    if ![openai::PROVIDER, anthropic::PROVIDER, gemini::PROVIDER].contains(&provider) {
        return Err(Attempted::Failed(ProviderError {
            provider: "aiq",
            kind: ErrorKind::Invalid,
            status: None,
            message: format!("unknown provider {}", l.provider),
            retry_after: None,
        }));
    }
    let started = Instant::now();
    let user = l.common.organization_id.to_string();
    let c = match provider {
        "anthropic" => {
            app.clients
                .anthropic
                .complete(model, &l.messages, l.max_tokens)
                .await
        }
        "gemini" => {
            app.clients
                .gemini
                .complete(model, &l.messages, l.max_tokens)
                .await
        }
        _ => {
            app.clients
                .openai
                .complete(model, &l.messages, l.max_tokens, &user, &raw.id)
                .await
        }
    };
    crate::observe::provider_call(provider, call_status(&c), started.elapsed());
    breaker_record(app, provider, &raw.organization_id, &c).await;
    let c = c.map_err(Attempted::Failed)?;
    let elapsed = started.elapsed().as_millis() as i64;
    // A response is priced from its usage; should that exceed what max_tokens allowed, the
    // provider's count wins (it is what they bill).
    let cost = app
        .prices
        .llm_cost(
            provider,
            model,
            c.usage.prompt_tokens,
            c.usage.cached_tokens,
            c.usage.completion_tokens,
        )
        .map_err(|e| Failure::Permanent {
            message: e.to_string(),
        })?;
    let mut call = call_record(app, reservation, cost, CallStatus::Succeeded);
    call.input_tokens = Some(c.usage.prompt_tokens as i64);
    call.cached_tokens = Some(c.usage.cached_tokens as i64);
    call.output_tokens = Some(c.usage.completion_tokens as i64);
    call.metadata = json!({ "finish_reason": c.finish_reason, "response_model": c.model });
    let result = ResultRecord {
        provider: provider.into(),
        model: Some(model.into()),
        raw_response: c.raw,
        confidence_scores: json!({}),
        processing_ms: elapsed,
        cost,
        completed: true,
        error_message: None,
    };
    Box::pin(record_answer(app, raw, job, reservation, call, result)).await
}

/// Settles reservations whose workers died: writes each call's cost row at its estimate (unless
/// the call already has one) and settles the hold with whatever the row holds. Returns how many.
pub async fn sweep_expired(app: &App) -> usize {
    let expired = match app.budget.expired(100).await {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(error = %e, "listing expired budget reservations failed");
            return 0;
        }
    };
    let mut swept = 0;
    for x in expired {
        let recorded = match &x.meta {
            Some(m) => {
                let job = JobRef {
                    job_id: m.job_id.clone(),
                    kind: String::new(),
                    tier: Some(m.tier.clone()),
                    organization_id: Some(m.organization_id),
                    subject_id: None,
                    subject_type: None,
                    correlation_id: None,
                    attempt: m.attempt,
                    execution: m.execution,
                };
                let call = CallRecord {
                    provider: m.provider.clone(),
                    operation: m.operation.clone(),
                    model: m.model.clone(),
                    call_seq: m.call_seq,
                    billing_date: m.billing_date,
                    estimate: Some(x.estimate),
                    units: None,
                    input_tokens: None,
                    cached_tokens: None,
                    output_tokens: None,
                    cost: x.estimate,
                    status: CallStatus::Expired,
                    price_version: app.prices.version.clone(),
                    metadata: json!({ "swept": "the worker stopped during the call; counted at the estimate" }),
                };
                match app.store.record_expired_call(&job, &call).await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, reservation = %x.id, "recording a swept call failed; will retry");
                        continue;
                    }
                }
            }
            None => {
                tracing::error!(reservation = %x.id, "a reservation without its call details: settled at the estimate with no cost row");
                x.estimate
            }
        };
        match app.budget.settle(&x.id, recorded).await {
            Ok(states) => {
                app.alerts.check(&states).await;
                swept += 1;
            }
            Err(e) => {
                tracing::warn!(error = %e, reservation = %x.id, "settling a swept reservation failed; will retry")
            }
        }
    }
    if swept > 0 {
        tracing::warn!(
            reservations = swept,
            "swept expired budget reservations of stopped workers into cost rows"
        );
    }
    swept
}

#[cfg(test)]
mod error_type_tests {
    /// `ai_processing_errors.error_type` is a closed list, documented in jobs/README.md: every
    /// type the handlers write is in it, and it names nothing they do not write.
    #[test]
    fn every_error_type_written_is_documented_and_every_documented_one_is_written() {
        let documented: Vec<&str> = [
            "invalid_payload",
            "unpriced",
            "budget_exceeded",
            "rate_limited",
            "provider_unavailable",
            "timeout",
            "connection",
            "malformed_response",
            "oversize",
            "cost_above_estimate",
            "invalid_request",
            "unauthorized",
            "quota_exhausted",
            "image_failed",
            "invalid_image",
        ]
        .to_vec();
        let readme = include_str!("../../jobs/README.md");
        let section = readme
            .split("### Error types")
            .nth(1)
            .expect("jobs/README.md has an Error types section");
        let section = section.split("\n#").next().unwrap_or(section);
        let listed: Vec<&str> = section
            .split('`')
            .skip(1)
            .step_by(2)
            .filter(|t| t.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
            .filter(|t| *t != "error_type")
            .collect();
        let mut want = documented.clone();
        want.sort();
        let mut got = listed.clone();
        got.sort();
        assert_eq!(got, want, "the README's list");
        // Written by the handlers: literal types, and the provider error kinds.
        let source = include_str!("mod.rs");
        let mut written: Vec<String> = source
            .match_indices("error_type: \"")
            .map(|(i, m)| {
                let rest = &source[i + m.len()..];
                rest[..rest.find('"').unwrap()].to_owned()
            })
            .collect();
        for kind in [
            crate::providers::ErrorKind::RateLimited,
            crate::providers::ErrorKind::Unavailable,
            crate::providers::ErrorKind::Timeout,
            crate::providers::ErrorKind::Connection,
            crate::providers::ErrorKind::Malformed,
            crate::providers::ErrorKind::Oversize,
            crate::providers::ErrorKind::Invalid,
            crate::providers::ErrorKind::Unauthorized,
            crate::providers::ErrorKind::QuotaExhausted,
        ] {
            written.push(kind.as_str().to_owned());
        }
        written.extend(["image_failed".to_owned(), "invalid_image".to_owned()]);
        for w in &written {
            assert!(
                documented.contains(&w.as_str()),
                "{w} is written but not documented"
            );
        }
        for d in &documented {
            assert!(
                written.iter().any(|w| w == d),
                "{d} is documented but never written"
            );
        }
    }
}
