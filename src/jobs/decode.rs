//! The decode stage: the payload is decoded once into domain types (`payload`), and a payload
//! that can never run is recorded as such and sent to the dead set on its first delivery. Then
//! the job id's earlier outcome, which the backend looked up for the whole batch: a job id that
//! already has one is never run or paid for again.

use serde_json::json;
use uuid::Uuid;

use super::payload::{JobInput, decode};
use super::policy::{STORE_PROBE, jitter, spread};
use super::ports::{Ports, Results};
use super::record::failed_result;
use crate::queue::backend::{Failure, Prior, RawJob};
use crate::queue::events::DelayReason;
use crate::redact::Field;
use crate::store::{Ending, ErrorRecord, ErrorType, JobRef};

/// The job's payload as domain types, or its `invalid_payload` record and a permanent failure.
pub async fn decode_job(app: &impl Ports, raw: &RawJob) -> Result<JobInput, Failure> {
    let e = match decode(raw, app.prices()) {
        Ok(input) => match input
            .common()
            .callback_url
            .as_deref()
            .map(|u| app.callbacks().check_url(u))
        {
            // A literal address is checked here; a name, when it is resolved for delivery.
            Some(Err(why)) => format!("invalid payload: callback_url: {why}"),
            _ => return Ok(input),
        },
        Err(e) => e.to_string(),
    };
    // A payload that can never run: record why and send it to the dead set.
    let job = job_ref(raw, None);
    let err = ErrorRecord {
        error_type: ErrorType::InvalidPayload,
        message: e.clone(),
        details: json!({ "payload_bytes": raw.payload.len() }),
        provider: None,
        http_status: None,
        call_seq: 0,
    };
    let result = failed_result("none", None, &e);
    app.record(
        app.results()
            .record_failure(&job, &err, None, Some((&result, Ending::Failed)))
            .await,
    )?;
    tracing::warn!(error = %Field::message(&e), "dead: invalid payload");
    Err(Failure::Permanent { message: e })
}

/// True when this job id already succeeded (acknowledged without a call); a failure when it
/// failed for good, or when whether it ran is unknown (PostgreSQL was unreachable). A worker
/// that stopped mid-job may have recorded it without acknowledging it, or the app reused an id
/// that finished.
pub fn already_done(app: &impl Ports, raw: &RawJob) -> Result<bool, Failure> {
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
            app.store_gate().trip();
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
        callback_url: common.and_then(|c| c.callback_url.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CallRetryPolicy;
    use crate::domain::MicroUsd;
    use crate::jobs::ports::memory::{MemoryPorts, Row, raw_job};
    use crate::queue::backend::Prior;

    fn ports() -> MemoryPorts {
        let retry = CallRetryPolicy {
            retries: 0,
            base: std::time::Duration::from_millis(100),
            cap: std::time::Duration::from_secs(1),
        };
        MemoryPorts::new(retry, MicroUsd::ZERO, [])
    }

    fn raw(payload: &str, prior: Prior) -> RawJob {
        RawJob {
            prior,
            ..raw_job(payload, 1, 3)
        }
    }

    #[tokio::test]
    async fn a_payload_that_can_never_run_gets_its_error_and_failed_result_rows_once_and_is_dead() {
        let p = ports();
        let outcome = decode_job(&p, &raw("{\"version\": 1}", Prior::Nothing)).await;
        assert!(matches!(outcome, Err(Failure::Permanent { .. })));
        let rows = p.results.rows();
        assert_eq!(rows.len(), 2, "{rows:?}");
        assert!(matches!(
            rows[0],
            Row::Error {
                call_seq: 0,
                error_type: ErrorType::InvalidPayload
            }
        ));
        assert!(matches!(
            rows[1],
            Row::Result {
                completed: false,
                model: None
            }
        ));
    }

    #[tokio::test]
    async fn an_unknown_earlier_outcome_holds_this_process_s_calls_back_until_postgres_answers() {
        let p = ports();
        assert!(crate::jobs::record::store_reachable(&p).await.is_ok());
        assert!(matches!(
            already_done(&p, &raw("{}", Prior::Unknown)),
            Err(Failure::Defer { .. })
        ));
        // The store gate is down: the next jobs wait before any call, until one probe answers.
        assert!(p.store_gate.is_down());
        assert!(p.results.rows().is_empty());
        assert!(already_done(&p, &raw("{}", Prior::Completed)).unwrap());
    }
}
