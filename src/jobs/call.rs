//! The call stage: one call to a model's provider, priced from its answer and handed to the
//! record stage; and the chain's loop around it. A failed call is recorded and settled on its
//! own, then [`policy::next_step`] says what follows: the same model again after a delay (an
//! in-call retry), the next model of the fallback chain, or back to the queue. Every further
//! call passes the admission gates and reserves its own estimate again.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::admit::{self, Admission, Held};
use super::payload::{JobInput, LlmPayload, VisionPayload};
use super::plan::{Plan, Planned};
use super::policy::{self, NextStep};
use super::ports::{Gate, Gates, Ledger, Ports, Providers, Results};
use super::record::{call_record, failed_call, failed_result, record_answer};
use super::reserve::{self, Hold};
use super::settle::settle;
use crate::budget::{CallMeta, Reservation};
use crate::domain::{MicroUsd, Provider, ResultSummary};
use crate::providers::vision::{self, ImageResult};
use crate::providers::{ErrorKind, ProviderError};
use crate::queue::backend::{Completed, Failure, RawJob};
use crate::redact::Field;
use crate::store::{CallStatus, Ending, ErrorRecord, ErrorType, JobRef, ResultRecord};

/// Calls the chain from the model `start` names on (`(index, probe)`: with the half-open probe
/// when `probe`) until a call succeeds or the job's outcome is decided; each call reserves,
/// records and settles on its own.
pub async fn call_chain(
    app: &impl Ports,
    raw: &RawJob,
    job: &JobRef,
    input: &JobInput,
    plan: &Plan,
    start: (usize, bool),
) -> Result<Completed, Failure> {
    let chain = &plan.chain;
    let common = input.common();
    let gates = &app.gates();
    let billing_date = app.ledger().billing_date(app.ledger().now());
    let mut backoff = policy::call_backoff(app.call_retry());
    let (mut idx, mut probe) = start;
    let mut call_seq = 0i32;
    loop {
        let target = &chain[idx];
        let meta = CallMeta {
            job_id: raw.id.clone(),
            execution: job.execution,
            attempt: raw.attempt,
            call_seq,
            organization_id: common.organization_id.as_uuid(),
            tier: common.tier.as_str().into(),
            provider: target.provider.as_str().into(),
            operation: target.operation.into(),
            model: target.model.clone(),
            billing_date,
        };
        // Every call holds its own estimate: a fallback is priced at its model's rates.
        let reservation =
            match reserve::hold(app.ledger(), gates, meta, plan.limits, target, probe).await {
                Hold::Held(r) => r,
                Hold::OverBudget(refusal) => {
                    return reserve::over_budget(app, raw, job, target, refusal, call_seq)
                        .await
                        .map(|()| Completed::default());
                }
                Hold::ProbeGone(wait) => {
                    // Another job took the half-open breaker's one probe meanwhile.
                    return Err(Held::Breaker {
                        provider: target.provider,
                    }
                    .deferral(wait));
                }
                Hold::Down(f) => return Err(f),
            };
        let e = match call_one(app, raw, job, input, target, &reservation).await {
            Ok(summary) => {
                tracing::info!(
                    provider = target.provider.as_str(),
                    calls = call_seq + 1,
                    "job succeeded"
                );
                return Ok(Completed {
                    result: Some(summary.to_json()),
                });
            }
            Err(Attempted::Done(f)) => {
                tracing::warn!(error = %Field::message(&f), "job attempt failed");
                return Err(f);
            }
            Err(Attempted::Failed(e)) => e,
        };
        let next = policy::next_step(
            policy::CallFailure::from(&e),
            app.call_retry().cap,
            &mut backoff,
            idx + 1 < chain.len(),
            fastrand::f64(),
        );
        let give_up = policy::give_up(&e);
        let last = policy::is_last_call(next, &give_up, raw.attempt, raw.max_attempts);
        let err = failed_call(app, job, &e, &reservation, last).await?;
        call_seq += 1;
        let wait = match next {
            NextStep::GiveUp => {
                tracing::warn!(error = %Field::message(&give_up), "job attempt failed");
                return Err(give_up);
            }
            NextStep::Again(delay) => {
                tracing::info!(provider = target.provider.as_str(), error = %Field::message(&e), delay_ms = delay.as_millis() as u64,
                    "calling the provider again");
                crate::observe::call_retried(target.provider.as_str(), e.kind.as_str());
                tokio::time::sleep(delay).await;
                match admit::admit_call(gates, target).await? {
                    Gate::Pass => {
                        probe = false;
                        continue;
                    }
                    Gate::Probe => {
                        probe = true;
                        continue;
                    }
                    Gate::Wait(wait) | Gate::Open(wait) => wait,
                }
            }
            NextStep::FallBack => Duration::ZERO,
        };
        match admit::admit_from(gates, chain, idx + 1).await {
            Admission::Go { idx: i, probe: p } => {
                tracing::info!(from = target.provider.as_str(), to = chain[i].provider.as_str(), error = %Field::message(&e),
                    "falling back to the next model of the chain");
                crate::observe::fell_back(target.provider.as_str(), chain[i].provider.as_str());
                (idx, probe) = (i, p);
                backoff = policy::call_backoff(app.call_retry());
            }
            Admission::Down(f) => return Err(f),
            Admission::Wait { after: w, .. } => {
                // Nothing in the chain may be called now: back to the queue, after the wait.
                let message = format!(
                    "{e}; then no model of the chain could be called (paused, circuit breaker open, or at its per-minute limits)"
                );
                if policy::attempts_used(raw.attempt, raw.max_attempts) {
                    let result =
                        failed_result(target.provider.as_str(), target.model.clone(), &message);
                    app.record(
                        app.results()
                            .record_failure(job, &err, None, Some((&result, Ending::Dead)))
                            .await,
                    )?;
                }
                tracing::warn!(error = %Field::message(&message), "job attempt failed");
                return Err(Failure::Retry {
                    message,
                    after: Some(policy::held_back_wait(
                        wait,
                        w,
                        e.retry_after,
                        fastrand::f64(),
                    )),
                });
            }
        }
    }
}

/// How a call ended when it did not succeed.
pub enum Attempted {
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

/// One call to the target's provider.
async fn call_one(
    app: &impl Ports,
    raw: &RawJob,
    job: &JobRef,
    input: &JobInput,
    target: &Planned,
    reservation: &Reservation,
) -> Result<ResultSummary, Attempted> {
    match input {
        JobInput::Vision(v) => run_vision(app, raw, job, v, reservation).await,
        JobInput::Llm(l) => run_llm(app, raw, job, l, target, reservation).await,
    }
}

async fn run_vision(
    app: &impl Ports,
    raw: &RawJob,
    job: &JobRef,
    v: &VisionPayload,
    reservation: &Reservation,
) -> Result<ResultSummary, Attempted> {
    let features: Vec<String> = v.features.iter().map(|f| f.kind.clone()).collect();
    let started = Instant::now();
    let resp = app.providers().annotate(&v.images, &v.features).await;
    crate::observe::provider_call(
        vision::PROVIDER.as_str(),
        call_status(&resp),
        started.elapsed(),
    );
    breaker_record(&app.gates(), vision::PROVIDER, &raw.organization_id, &resp).await;
    let resp = resp.map_err(Attempted::Failed)?;
    let elapsed = started.elapsed().as_millis() as i64;
    let billable = resp.billable_images() as u64;
    let billed = app
        .prices()
        .billed_features(&features)
        .map_err(|e| Failure::Permanent {
            message: e.to_string(),
        })?;
    // The month's units so far decide the price (the first 1,000 of each feature are free).
    let month = reservation.meta.billing_date.format("%Y-%m").to_string();
    let units: Vec<(&str, u64)> = billed.iter().map(|f| (*f, billable)).collect();
    let cost = match app.ledger().claim_vision_units(&month, &units).await {
        Ok(before) => {
            let mut total = MicroUsd::ZERO;
            for ((feature, n), b) in units.iter().zip(before) {
                let c = app
                    .prices()
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
        let last = !retryable || policy::attempts_used(raw.attempt, raw.max_attempts);
        let err = ErrorRecord {
            error_type: if retryable {
                ErrorType::ImageFailed
            } else {
                ErrorType::InvalidImage
            },
            message: message.clone(),
            details: json!({ "failed_images": failed_images }),
            provider: Some(vision::PROVIDER.as_str().into()),
            http_status: Some(200),
            call_seq: reservation.meta.call_seq,
        };
        let result = last.then(|| failed_result(vision::PROVIDER.as_str(), None, &message));
        // Bad input fails the job; images that kept failing with the attempts spent, dead.
        let ending = if retryable {
            Ending::Dead
        } else {
            Ending::Failed
        };
        let recorded = app.record(
            app.results()
                .record_failure(job, &err, Some(&call), result.as_ref().map(|r| (r, ending)))
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
    let summary = ResultSummary {
        provider: vision::PROVIDER.as_str().into(),
        model: None,
        cost_usd: cost.decimal(),
        input_tokens: None,
        output_tokens: None,
        units: call.units,
        duration_ms: elapsed,
    };
    let result = ResultRecord {
        provider: vision::PROVIDER.as_str().into(),
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
    Box::pin(record_answer(app, raw, job, reservation, call, result))
        .await
        .map(|()| summary)
}

/// Tells the provider's breaker, and the organisation's own, how a call went; a 429 with the
/// provider's own delay pauses it for the whole fleet.
async fn breaker_record<T>(
    gates: &impl Gates,
    provider: Provider,
    org: &str,
    r: &Result<T, ProviderError>,
) {
    if let Err(ProviderError {
        kind: ErrorKind::RateLimited,
        retry_after: Some(wait),
        ..
    }) = r
    {
        gates.pause(provider, *wait).await;
    }
    let outcome = r.as_ref().map(|_| ()).map_err(|e| e.kind);
    gates.record_call(provider, org, outcome).await;
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
    app: &impl Ports,
    raw: &RawJob,
    job: &JobRef,
    l: &LlmPayload,
    target: &Planned,
    reservation: &Reservation,
) -> Result<ResultSummary, Attempted> {
    let provider = target.provider;
    let model = target.model.as_deref().unwrap_or_default();
    let started = Instant::now();
    let user = l.common.organization_id.to_string();
    if provider == Provider::GoogleVision {
        // Never a call, nor a breaker's failure.
        return Err(Attempted::Failed(super::ports::not_an_llm(provider)));
    }
    let c = app
        .providers()
        .complete(provider, model, &l.messages, l.max_tokens, &user, &raw.id)
        .await;
    crate::observe::provider_call(provider.as_str(), call_status(&c), started.elapsed());
    breaker_record(&app.gates(), provider, &raw.organization_id, &c).await;
    let c = c.map_err(Attempted::Failed)?;
    let elapsed = started.elapsed().as_millis() as i64;
    // A response is priced from its usage; should that exceed what max_tokens allowed, the
    // provider's count wins (it is what they bill).
    let cost = app
        .prices()
        .llm_cost(
            provider.as_str(),
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
    let summary = ResultSummary {
        provider: provider.as_str().into(),
        model: Some(model.into()),
        cost_usd: cost.decimal(),
        input_tokens: call.input_tokens,
        output_tokens: call.output_tokens,
        units: None,
        duration_ms: elapsed,
    };
    let result = ResultRecord {
        provider: provider.as_str().into(),
        model: Some(model.into()),
        raw_response: c.raw,
        confidence_scores: json!({}),
        processing_ms: elapsed,
        cost,
        completed: true,
        error_message: None,
    };
    Box::pin(record_answer(app, raw, job, reservation, call, result))
        .await
        .map(|()| summary)
}

#[cfg(test)]
mod tests;
