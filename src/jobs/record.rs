//! The record stage: a call's rows in PostgreSQL, in one transaction (its cost row, and its
//! result or error row), idempotent. While PostgreSQL is unreachable this process holds its calls
//! back ([`StoreGate`]), and a paid answer whose rows it could not take is kept with its job in
//! Redis until the next execution writes them.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use chrono::Utc;
use serde_json::json;

use super::call::Attempted;
use super::policy::{self, KEPT_ANSWER_TTL, STORE_PROBE, jitter, spread};
use super::ports::{Ledger, Ports, Results};
use super::settle::settle;
use crate::budget::Reservation;
use crate::domain::MicroUsd;
use crate::providers::{ErrorKind, ProviderError};
use crate::queue::backend::{Failure, RawJob};
use crate::queue::events::DelayReason;
use crate::store::{CallRecord, CallStatus, Ending, ErrorRecord, ErrorType, JobRef, ResultRecord};

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
pub struct StoreGate {
    /// Unix ms until which calls are held back; 0 while PostgreSQL answers.
    down_until_ms: AtomicI64,
}

impl StoreGate {
    pub(super) fn trip(&self) {
        let until = Utc::now().timestamp_millis() + STORE_PROBE.as_millis() as i64;
        self.down_until_ms.fetch_max(until, Ordering::AcqRel);
    }

    /// Whether calls are held back (or one job probes PostgreSQL now).
    #[cfg(test)]
    pub(super) fn is_down(&self) -> bool {
        self.down_until_ms.load(Ordering::Acquire) != 0
    }
}

/// A store error as the queue's failure kind ([`Ports::record`]). PostgreSQL unreachable: the
/// job waits without spending an attempt, and this process holds its calls back until
/// PostgreSQL answers again (a call whose rows cannot be written would be paid for and then
/// made again). Any other store error spends an attempt. Either way the call's hold is left to
/// expire: the sweeper then records the call at its estimate, so a paid call whose row was lost
/// is still counted.
pub(super) fn store_failure(gate: &StoreGate, e: crate::store::StoreError) -> Failure {
    if e.is_unavailable() {
        gate.trip();
        Failure::Defer {
            message: format!("PostgreSQL is unreachable: {e}"),
            after: STORE_PROBE + spread(jitter::STORE),
            reason: DelayReason::Unavailable,
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
pub(super) async fn store_reachable(app: &impl Ports) -> Result<(), Failure> {
    let gate = app.store_gate();
    let until = gate.down_until_ms.load(Ordering::Acquire);
    if until == 0 {
        return Ok(());
    }
    let now = Utc::now().timestamp_millis();
    let wait = |until: i64| Failure::Defer {
        message: "PostgreSQL is unreachable; waiting before calling any provider".into(),
        after: Duration::from_millis((until - now).max(0) as u64) + spread(jitter::STORE),
        reason: DelayReason::Unavailable,
    };
    if now < until {
        return Err(wait(until));
    }
    let next = now + STORE_PROBE.as_millis() as i64;
    if gate
        .down_until_ms
        .compare_exchange(until, next, Ordering::AcqRel, Ordering::Acquire)
        .is_err()
    {
        // Another job is probing.
        return Err(wait(next));
    }
    match app.results().ping().await {
        Ok(()) => {
            gate.down_until_ms.store(0, Ordering::Release);
            tracing::info!("PostgreSQL answers again");
            Ok(())
        }
        Err(e) => {
            tracing::warn!(error = %e, "PostgreSQL is still unreachable");
            Err(wait(next))
        }
    }
}

pub(super) fn failed_result(provider: &str, model: Option<String>, message: &str) -> ResultRecord {
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

pub(super) fn call_record(
    app: &impl Ports,
    r: &Reservation,
    cost: MicroUsd,
    status: CallStatus,
) -> CallRecord {
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
        price_version: app.prices().version.clone(),
        metadata: json!({}),
    }
}

/// Writes a paid answer's rows and settles its hold. When PostgreSQL cannot take them, the rows
/// are kept with the job in Redis, its hold (counted at the estimate) is kept from the sweeper,
/// and the job waits without spending an attempt: its next execution
/// writes them ([`write_kept_answer`]) instead of calling the provider again. Only if Redis
/// cannot keep them either is the answer lost, as before: the hold then expires into a cost row
/// at its estimate, and the job is run again.
pub(super) async fn record_answer(
    app: &impl Ports,
    raw: &RawJob,
    job: &JobRef,
    reservation: &Reservation,
    call: CallRecord,
    result: ResultRecord,
) -> Result<(), Attempted> {
    let results = app.results();
    let write = results.record_success_or_return(job, call, result);
    tokio::pin!(write);
    let written = tokio::select! {
        biased;
        w = &mut write => w,
        () = tokio::time::sleep(policy::SLOW_WRITE) => {
            // The hold expires at its provider's timeout plus the margin after the call began;
            // a write that waits for PostgreSQL longer than what is left would let the sweeper
            // book the call at its estimate while its answer is being written at its cost.
            if let Err(e) = app.ledger().keep_hold(&reservation.id, policy::HOLD_WHILE_WRITING).await {
                tracing::warn!(error = %e, "keeping the hold of a slow write from the sweeper failed");
            }
            write.await
        }
    };
    let unwritten = match written {
        Ok(recorded) => {
            settle(app, reservation, recorded).await;
            Box::pin(above_estimate(app, job, reservation, recorded)).await;
            return Ok(());
        }
        Err(u) => *u,
    };
    let crate::store::Unwritten { error, rows } = unwritten;
    let (Some((call, result)), true) = (rows, error.is_unavailable()) else {
        return Err(store_failure(app.store_gate(), error).into());
    };
    app.store_gate().trip();
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
            return Err(store_failure(app.store_gate(), error).into());
        }
    };
    if let Err(e) = app.results().keep(&raw.id, &bytes, KEPT_ANSWER_TTL).await {
        tracing::error!(error = %e, "PostgreSQL and Redis both failed: the answer is lost, and the job will call again");
        return Err(store_failure(app.store_gate(), error).into());
    }
    // The hold stays, counted at its estimate, until the rows are written and settle it at the
    // cost they hold: the sweeper must not book it as expired meanwhile. (If it already has,
    // its row is the call's and both settle at it.)
    if let Err(e) = app
        .ledger()
        .keep_hold(&reservation.id, KEPT_ANSWER_TTL)
        .await
    {
        tracing::warn!(error = %e, "keeping the hold of a kept answer from the sweeper failed");
    }
    crate::observe::answer_kept();
    tracing::warn!(error = %error, "PostgreSQL is unreachable: the answer is kept with the job and written when it is back");
    Err(Attempted::Done(Failure::Defer {
        message: format!("PostgreSQL is unreachable: the answer is kept with the job: {error}"),
        after: STORE_PROBE + spread(jitter::STORE),
        reason: DelayReason::Unavailable,
    }))
}

/// Writes the rows an earlier execution kept ([`record_answer`]) and settles the call's hold at
/// the cost its row holds; true when it did, and the job is done.
pub(super) async fn write_kept_answer(
    app: &impl Ports,
    raw: &RawJob,
    job: &JobRef,
) -> Result<bool, Failure> {
    let bytes = match app.results().kept(&raw.id).await {
        Ok(Some(b)) => b,
        Ok(None) => return Ok(false),
        Err(e) => {
            crate::observe::redis_deferral("kept_answer");
            return Err(Failure::Defer {
                message: format!("reading the job's kept answer failed: {e}"),
                after: STORE_PROBE + spread(jitter::STORE),
                reason: DelayReason::Unavailable,
            });
        }
    };
    let kept: KeptAnswer = match serde_json::from_slice(&bytes) {
        Ok(k) => k,
        Err(e) => {
            tracing::error!(error = %e, "the job's kept answer cannot be read: calling again");
            let _ = app.results().forget_kept(&raw.id).await;
            return Ok(false);
        }
    };
    if kept.job.job_id != job.job_id || kept.job.organization_id != job.organization_id {
        tracing::error!("a kept answer of another job or organisation under this id: ignored");
        let _ = app.results().forget_kept(&raw.id).await;
        return Ok(false);
    }
    let recorded = app.record(
        app.results()
            .record_success_or_return(&kept.job, kept.call, kept.result)
            .await
            .map_err(|u| u.error),
    )?;
    match app.ledger().settle_hold(&kept.reservation, recorded).await {
        Ok(states) => app.results().check_alerts(&states).await,
        Err(e) => {
            tracing::warn!(error = %e, reservation = %kept.reservation, "settling a kept answer's hold failed; the sweeper will")
        }
    }
    if let Err(e) = app.results().forget_kept(&raw.id).await {
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
async fn above_estimate(app: &impl Ports, job: &JobRef, reservation: &Reservation, cost: MicroUsd) {
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
        error_type: ErrorType::CostAboveEstimate,
        message,
        details: json!({ "estimate_usd": reservation.estimate.as_usd_f64(), "cost_usd": cost.as_usd_f64(),
            "model": reservation.meta.model, "price_version": app.prices().version }),
        provider: Some(provider.to_owned()),
        http_status: Some(200),
        call_seq: reservation.meta.call_seq,
    };
    if let Err(e) = app.results().record_error(job, &err).await {
        tracing::warn!(error = %e, job.id = %job.job_id, "writing the cost_above_estimate row failed");
    }
}

/// Records a failed provider call: its cost row, its error row and, when the job will not be
/// tried again, its failed result; then settles its hold. A call that timed out after it was
/// sent may have been billed, so it costs its estimate; one the provider answered with an
/// error, or that never connected, costs nothing. Returns the error row it wrote.
pub(super) async fn failed_call(
    app: &impl Ports,
    job: &JobRef,
    e: &ProviderError,
    reservation: &Reservation,
    last: bool,
) -> Result<ErrorRecord, Failure> {
    let err = ErrorRecord {
        error_type: ErrorType::Provider(e.kind),
        message: e.message.clone(),
        details: json!({ "retryable": e.is_retryable(), "retry_after_ms": e.retry_after.map(|d| d.as_millis() as u64),
            "model": reservation.meta.model }),
        provider: Some(e.provider.as_str().into()),
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
    let result = last.then(|| {
        failed_result(
            e.provider.as_str(),
            reservation.meta.model.clone(),
            &e.to_string(),
        )
    });
    // A failure no attempt can fix fails the job; a retryable one on its last attempt, dead.
    let ending = if e.is_retryable() {
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
    Ok(err)
}
