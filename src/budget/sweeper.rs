//! The sweeper of expired holds: a reservation whose worker died (or stalled past its provider's
//! timeout) is booked as a cost row at its estimate, unless the call already has one, and settled
//! at whatever the row holds, so Redis and PostgreSQL still agree. Each process runs it every few
//! seconds.

use serde_json::json;

use super::Budget;
use super::alerts::Alerts;
use crate::store::{CallRecord, CallStatus, JobRef, Store};

/// Settles reservations whose workers died: writes each call's cost row at its estimate (unless
/// the call already has one) and settles the hold with whatever the row holds. Returns how many.
pub async fn sweep_expired(
    budget: &Budget,
    store: &Store,
    price_version: &str,
    alerts: &Alerts,
) -> usize {
    let expired = match budget.expired(100).await {
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
                    callback_url: None,
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
                    price_version: price_version.to_owned(),
                    metadata: json!({ "swept": "the worker stopped during the call; counted at the estimate" }),
                };
                match store.record_expired_call(&job, &call).await {
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
        match budget.settle(&x.id, recorded).await {
            Ok(states) => {
                alerts.check(&states).await;
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
