//! The handlers. Each job is decoded once, then: price check -> provider call -> cost -> one
//! transaction of rows in PostgreSQL. The outcome goes back to the queue as a [`Failure`] kind
//! (retry, permanent) that the backend's ack layer turns into a retry, a dead job or an ack.
//! Handlers read no environment variables: everything comes in through [`App`].

pub mod payload;

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use apalis_core::error::BoxDynError;
use apalis_core::task::Task;
use futures::FutureExt;
use futures::future::BoxFuture;
use serde_json::{Value, json};
use tower::Service;
use tracing::Instrument;

use crate::budget::PriceCatalog;
use crate::domain::MicroUsd;
use crate::providers::openai::{self, OpenAiClient};
use crate::providers::vision::{self, ImageResult, VisionClient};
use crate::providers::{ErrorKind, ProviderError};
use crate::queue::backend::{Failure, RawJob};
use crate::store::{CallRecord, ErrorRecord, JobRef, ResultRecord, Store};
use payload::{JobInput, LlmPayload, VisionPayload, decode};

/// What the handlers need, built once at start.
pub struct App {
    pub store: Store,
    pub vision: VisionClient,
    pub openai: OpenAiClient,
    pub prices: PriceCatalog,
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
    /// polling, and a panic becomes this job's error instead of the worker's.
    fn call(&mut self, task: Task<RawJob>) -> Self::Future {
        let app = self.app.clone();
        let job = tokio::spawn(async move { run(&app, &task.args).await });
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
        organization_id: uuid::Uuid::parse_str(&raw.organization_id).ok(),
        subject_id: common.and_then(|c| c.subject_id),
        subject_type: common.and_then(|c| c.subject_type.clone()),
        correlation_id: common.and_then(|c| c.correlation_id.clone()),
        attempt: raw.attempt,
    }
}

/// Runs one job. Public so tests can replay a job exactly as the worker runs it.
pub async fn run(app: &App, raw: &RawJob) -> Result<(), Failure> {
    let span = tracing::info_span!("job", job.id = %raw.id, job.kind = %raw.kind, tier = %raw.tier,
        organization_id = %raw.organization_id, attempt = raw.attempt);
    run_in_span(app, raw).instrument(span).await
}

async fn run_in_span(app: &App, raw: &RawJob) -> Result<(), Failure> {
    let input = match decode(raw) {
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
            };
            let result = failed_result("none", None, &e.to_string());
            record(
                app.store
                    .record_failure(&job, &err, None, Some(&result))
                    .await,
            )?;
            tracing::warn!(error = %e, "dead: invalid payload");
            return Err(Failure::Permanent {
                message: e.to_string(),
            });
        }
    };
    let job = job_ref(raw, Some(&input));
    let outcome = match &input {
        JobInput::Vision(v) => run_vision(app, raw, &job, v).await,
        JobInput::Llm(l) => run_llm(app, raw, &job, l).await,
    };
    match &outcome {
        Ok(()) => tracing::info!("job succeeded"),
        Err(f) => tracing::warn!(error = %f, "job attempt failed"),
    }
    outcome
}

/// A store error is retryable: the provider's answer is lost, and the next attempt calls again.
fn record(r: Result<(), crate::store::StoreError>) -> Result<(), Failure> {
    r.map_err(|e| Failure::Retry {
        message: format!("recording the outcome failed: {e}"),
        after: None,
    })
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

/// Records a failed provider call and turns it into the queue's failure kind.
async fn provider_failed(
    app: &App,
    raw: &RawJob,
    job: &JobRef,
    e: ProviderError,
    operation: &str,
    model: Option<String>,
) -> Result<(), Failure> {
    let last = !e.is_retryable() || raw.attempt >= raw.max_attempts;
    let err = ErrorRecord {
        error_type: e.kind.as_str().into(),
        message: e.message.clone(),
        details: json!({ "retryable": e.is_retryable(), "retry_after_ms": e.retry_after.map(|d| d.as_millis() as u64) }),
        provider: Some(e.provider.into()),
        http_status: e.status.map(i32::from),
    };
    // A call that got an answer is a call: it costs a row even when the answer is an error.
    let call = e.status.map(|status| CallRecord {
        provider: e.provider.into(),
        operation: operation.into(),
        model: model.clone(),
        call_seq: 0,
        units: None,
        input_tokens: None,
        cached_tokens: None,
        output_tokens: None,
        cost: MicroUsd::ZERO,
        succeeded: false,
        price_version: app.prices.version.clone(),
        metadata: json!({ "http_status": status }),
    });
    let result = last.then(|| failed_result(e.provider, model, &e.to_string()));
    record(
        app.store
            .record_failure(job, &err, call.as_ref(), result.as_ref())
            .await,
    )?;
    if e.is_retryable() {
        Err(Failure::Retry {
            message: e.to_string(),
            after: e.retry_after,
        })
    } else {
        Err(Failure::Permanent {
            message: e.to_string(),
        })
    }
}

/// A job the catalog cannot price never reaches a provider.
async fn unpriced(
    app: &App,
    job: &JobRef,
    provider: &str,
    e: crate::budget::PriceError,
) -> Result<(), Failure> {
    let err = ErrorRecord {
        error_type: "unpriced".into(),
        message: e.to_string(),
        details: json!({}),
        provider: Some(provider.into()),
        http_status: None,
    };
    let result = failed_result(provider, None, &e.to_string());
    record(
        app.store
            .record_failure(job, &err, None, Some(&result))
            .await,
    )?;
    Err(Failure::Permanent {
        message: e.to_string(),
    })
}

async fn run_vision(
    app: &App,
    raw: &RawJob,
    job: &JobRef,
    v: &VisionPayload,
) -> Result<(), Failure> {
    let features: Vec<String> = v.features.iter().map(|f| f.kind.clone()).collect();
    if let Err(e) = app.prices.check_features(&features) {
        return unpriced(app, job, vision::PROVIDER, e).await;
    }
    let started = Instant::now();
    let resp = match app.vision.annotate(&v.images, &v.features).await {
        Ok(r) => r,
        Err(e) => return provider_failed(app, raw, job, e, "images:annotate", None).await,
    };
    let elapsed = started.elapsed().as_millis() as i64;
    let billable = resp.billable_images();
    let cost = app
        .prices
        .vision_cost(&features, billable)
        .map_err(|e| Failure::Permanent {
            message: e.to_string(),
        })?;
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
    let call = CallRecord {
        provider: vision::PROVIDER.into(),
        operation: "images:annotate".into(),
        model: None,
        call_seq: 0,
        units: Some(billable as i64 * features.len() as i64),
        input_tokens: None,
        cached_tokens: None,
        output_tokens: None,
        cost,
        succeeded: true,
        price_version: app.prices.version.clone(),
        metadata: json!({ "features": features, "images": v.images.len(), "billable_images": billable, "failed_images": failed_images }),
    };
    let confidence = confidence_scores(&resp.raw);
    let all_failed = billable == 0 || failed_images.len() == v.images.len();
    let result = ResultRecord {
        provider: vision::PROVIDER.into(),
        model: None,
        raw_response: resp.raw,
        confidence_scores: confidence,
        processing_ms: elapsed,
        cost,
        completed: !all_failed,
        error_message: (!failed_images.is_empty()).then(|| {
            format!(
                "{} of {} images failed",
                failed_images.len(),
                v.images.len()
            )
        }),
    };
    record(app.store.record_success(job, &call, &result).await)
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

async fn run_llm(app: &App, raw: &RawJob, job: &JobRef, l: &LlmPayload) -> Result<(), Failure> {
    if let Err(e) = app.prices.model_price(&l.provider, &l.model) {
        return unpriced(app, job, &l.provider, e).await;
    }
    if l.provider != openai::PROVIDER {
        let e = ProviderError {
            provider: "aiq",
            kind: ErrorKind::Invalid,
            status: None,
            message: format!("provider {} is not wired in this build yet", l.provider),
            retry_after: None,
        };
        return provider_failed(app, raw, job, e, "chat.completions", Some(l.model.clone())).await;
    }
    let started = Instant::now();
    let user = l.common.organization_id.to_string();
    let c = match app
        .openai
        .complete(&l.model, &l.messages, l.max_tokens, &user, &raw.id)
        .await
    {
        Ok(c) => c,
        Err(e) => {
            return provider_failed(app, raw, job, e, "chat.completions", Some(l.model.clone()))
                .await;
        }
    };
    let elapsed = started.elapsed().as_millis() as i64;
    let cost = app
        .prices
        .llm_cost(
            &l.provider,
            &l.model,
            c.usage.prompt_tokens,
            c.usage.cached_tokens,
            c.usage.completion_tokens,
        )
        .map_err(|e| Failure::Permanent {
            message: e.to_string(),
        })?;
    let call = CallRecord {
        provider: l.provider.clone(),
        operation: "chat.completions".into(),
        model: Some(l.model.clone()),
        call_seq: 0,
        units: None,
        input_tokens: Some(c.usage.prompt_tokens as i64),
        cached_tokens: Some(c.usage.cached_tokens as i64),
        output_tokens: Some(c.usage.completion_tokens as i64),
        cost,
        succeeded: true,
        price_version: app.prices.version.clone(),
        metadata: json!({ "finish_reason": c.finish_reason, "response_model": c.model }),
    };
    let result = ResultRecord {
        provider: l.provider.clone(),
        model: Some(l.model.clone()),
        raw_response: c.raw,
        confidence_scores: json!({}),
        processing_ms: elapsed,
        cost,
        completed: true,
        error_message: None,
    };
    record(app.store.record_success(job, &call, &result).await)
}
