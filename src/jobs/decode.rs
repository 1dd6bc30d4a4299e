//! The decode stage: the payload is decoded once into domain types (`payload`), and a payload
//! that can never run is recorded as such and sent to the dead set on its first delivery. Then
//! the job id's earlier outcome, which the backend looked up for the whole batch: a job id that
//! already has one is never run or paid for again.

use serde_json::json;
use uuid::Uuid;

use super::App;
use super::payload::{JobInput, decode};
use super::policy::{STORE_PROBE, jitter, spread};
use super::record::failed_result;
use crate::queue::backend::{Failure, Prior, RawJob};
use crate::queue::events::DelayReason;
use crate::redact::Field;
use crate::store::{ErrorRecord, ErrorType, JobRef};

/// The job's payload as domain types, or its `invalid_payload` record and a permanent failure.
pub async fn decode_job(app: &App, raw: &RawJob) -> Result<JobInput, Failure> {
    let e = match decode(raw, &app.prices) {
        Ok(input) => return Ok(input),
        Err(e) => e,
    };
    // A payload that can never run: record why and send it to the dead set.
    let job = job_ref(raw, None);
    let err = ErrorRecord {
        error_type: ErrorType::InvalidPayload,
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
    Err(Failure::Permanent {
        message: e.to_string(),
    })
}

/// True when this job id already succeeded (acknowledged without a call); a failure when it
/// failed for good, or when whether it ran is unknown (PostgreSQL was unreachable). A worker
/// that stopped mid-job may have recorded it without acknowledging it, or the app reused an id
/// that finished.
pub fn already_done(app: &App, raw: &RawJob) -> Result<bool, Failure> {
    match raw.prior {
        Prior::Nothing => Ok(false),
        Prior::Completed => {
            tracing::info!("this job id already has a result: acknowledged without a call");
            crate::observe::job_already_done();
            Ok(true)
        }
        Prior::Failed => {
            crate::observe::job_already_done();
            Err(Failure::Permanent {
                message: "this job id already has a result that failed for good".into(),
            })
        }
        Prior::Unknown => {
            app.store_gate.trip();
            Err(Failure::Defer {
                message: "PostgreSQL is unreachable: whether this job already ran is unknown"
                    .into(),
                after: STORE_PROBE + spread(jitter::STORE),
                reason: DelayReason::Unavailable,
            })
        }
    }
}

/// The row key of a job, with the payload's subject and correlation id once it decoded.
pub fn job_ref(raw: &RawJob, input: Option<&JobInput>) -> JobRef {
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
