//! The handlers. Each job runs as a sequence of stages, each in its own module and each answering
//! with a value: [`decode`] (the payload into domain types, and the job id's earlier outcome),
//! [`plan`] (every model of the chain priced at the most it can cost, those that can never fit
//! left out), [`admit`] (the breakers, the organisation's rate, the provider's requests and
//! tokens per minute: an [`admit::Admission`]), [`reserve`] (the budget hold, then the half-open
//! probe last: a [`reserve::Hold`]), [`call`] (the provider call, and what follows a failed one:
//! a [`policy::NextStep`]), [`record`] (the rows in PostgreSQL, in one transaction) and
//! [`settle`] (the budget at the cost the row holds, and alerts). The rules those answers follow
//! are pure functions in [`policy`]; the stages talk to the breakers, the budget, the results
//! store and the providers through [`ports`] (`App` wires the daemon's, tests in-memory ones).
//! The outcome goes back to the queue as a [`Failure`] kind (retry, permanent, defer) that the
//! backend's ack layer turns into a retry, a dead job, a deferral or an ack. Handlers read no environment variables: everything comes in through [`App`].

pub mod admit;
pub mod call;
pub mod decode;
pub mod payload;
pub mod plan;
pub mod policy;
pub mod ports;
pub mod record;
pub mod reserve;
pub mod settle;

pub use policy::policy_constants;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use apalis_core::error::BoxDynError;
use apalis_core::task::Task;
use chrono::Utc;
use futures::FutureExt;
use futures::future::BoxFuture;
use sentry::SentryFutureExt;
use serde_json::Value;
use tower::Service;
use tracing::Instrument;
use uuid::Uuid;

use crate::budget::alerts::Alerts;
use crate::budget::{Budget, OrgLimits, PriceCatalog};
use crate::config::CallRetryPolicy;
use crate::domain::Provider;
use crate::providers::anthropic::AnthropicClient;
use crate::providers::gemini::GeminiClient;
use crate::providers::openai::OpenAiClient;
use crate::providers::vision::{self, VisionClient};
use crate::queue::backend::{Completed, Failure, RawJob};
use crate::redact::Field;
use crate::store::Store;
use admit::Admission;
use ports::Ports;
use record::StoreGate;

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
    /// The addresses a job's callback_url may name (`AIQ_WEBHOOK_ALLOW_NETS`).
    pub callbacks: Arc<crate::webhooks::address::AddressPolicy>,
    limits: Mutex<HashMap<Uuid, (Instant, OrgLimits)>>,
    store_gate: StoreGate,
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
    pub callbacks: Arc<crate::webhooks::address::AddressPolicy>,
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
            callbacks: p.callbacks,
            limits: Mutex::new(HashMap::new()),
            store_gate: StoreGate::default(),
        }
    }
}

impl App {
    /// The result summary of a job whose row is already written, as its row holds it (for the
    /// `succeeded` event of a job acknowledged without a call); `None` when it cannot be read.
    async fn summary_of(&self, raw: &RawJob) -> Option<String> {
        let org = Uuid::parse_str(&raw.organization_id).ok()?;
        match self.store.result_summary(org, &raw.id).await {
            Ok(Some(row)) => row.summary.map(|s| s.to_json()),
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(error = %e, "reading the job's result summary failed");
                None
            }
        }
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

    fn for_provider(&self, provider: Provider) -> Duration {
        match provider {
            Provider::GoogleVision => self.vision,
            Provider::OpenAi => self.openai,
            Provider::Anthropic => self.anthropic,
            Provider::Gemini => self.gemini,
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
    type Response = Completed;
    type Error = BoxDynError;
    type Future = BoxFuture<'static, Result<Completed, BoxDynError>>;

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

/// Runs one job. Public so tests can replay a job exactly as the worker runs it.
pub async fn run(app: &App, raw: &RawJob) -> Result<Completed, Failure> {
    let correlation_id = peek(raw, "correlation_id");
    // Every field comes from Redis, where an app (or anyone) wrote it: bounded and escaped, or
    // one megabyte correlation id would be written again on every line of the job.
    let span = tracing::info_span!("job", job.id = %Field::new(&raw.id), job.kind = %Field::new(&raw.kind),
        tier = %Field::new(&raw.tier), organization_id = %Field::new(&raw.organization_id),
        attempt = raw.attempt, correlation_id = %Field::new(&correlation_id));
    let started = Instant::now();
    let outcome = run_in_span(app, raw).instrument(span).await;
    let provider = provider_label(raw);
    let disposition = policy::disposition(&outcome, raw.attempt, raw.max_attempts);
    let now_ms = Utc::now().timestamp_millis();
    let wait = Duration::from_millis(now_ms.saturating_sub(raw.enqueued_at_ms).max(0) as u64)
        .saturating_sub(started.elapsed());
    crate::observe::job_finished(
        disposition.as_str(),
        &raw.kind,
        &raw.tier,
        &provider,
        started.elapsed(),
        wait,
    );
    if let (Err(f), policy::Disposition::Dead) = (&outcome, disposition) {
        report_dead(raw, &provider, &correlation_id, f);
    }
    outcome
}

/// The stages of one job, in order; each returns early with the job's outcome when it ends it.
async fn run_in_span(app: &App, raw: &RawJob) -> Result<Completed, Failure> {
    record::store_reachable(app).await?;
    let input = decode::decode_job(app, raw).await?;
    let job = decode::job_ref(raw, Some(&input));
    if decode::already_done(app, raw)? {
        // Its row was written by an execution whose outcome never reached Redis: its summary
        // comes from that row.
        return Ok(Completed {
            result: app.summary_of(raw).await,
        });
    }
    let org = input.common().organization_id.as_uuid();
    let tier = input.common().tier;
    // An earlier execution may have been answered while PostgreSQL was down: write what it
    // kept instead of calling again. Only a job leased before can have kept anything.
    // Boxed, like the store's transactions: every running job's future would otherwise reserve
    // room for this rarely taken path while it waits on its provider.
    if raw.token > 1 && Box::pin(record::write_kept_answer(app, raw, &job)).await? {
        return Ok(Completed {
            result: app.summary_of(raw).await,
        });
    }
    let plan = plan::plan_job(app, &job, &input).await?;
    let start = match admit::admit_job(&app.gates(), &plan.chain, org, tier).await {
        Admission::Go { idx, probe } => (idx, probe),
        Admission::Wait { after, why } => return Err(why.deferral(after)),
        Admission::Down(f) => return Err(f),
    };
    call::call_chain(app, raw, &job, &input, &plan, start).await
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
        "vision.annotate" => vision::PROVIDER.as_str().to_owned(),
        "llm.complete" => match Provider::parse(&peek(raw, "provider")) {
            Some(p) if p != Provider::GoogleVision => p.as_str().to_owned(),
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
