//! The reserve stage: a call holds its own model's estimate in the budget's four scopes before
//! it goes, and, when it is a half-open breaker's probe, takes the probe only then, after every
//! check that could hold the job back. A probe another job took meanwhile gives the hold back and
//! the job waits. No room in a budget is no call: the job waits for the window's reset (or fails,
//! by setting), with its refusal recorded.

use std::time::Duration;

use serde_json::json;

use super::plan::Planned;
use super::policy::window_reset_wait;
use super::ports::{Gate, Gates, Ledger, Ports, Reserved, Results};
use super::record::failed_result;
use crate::budget::{CallMeta, OrgLimits, Refusal, Reservation};
use crate::queue::backend::{Failure, RawJob};
use crate::queue::events::DelayReason;
use crate::redact::Field;
use crate::store::{ErrorRecord, ErrorType, JobRef};

/// What the reserve stage gives a call.
#[derive(Debug)]
pub enum Hold {
    /// The call holds its estimate (and its probe, if it needed one): it goes now.
    Held(Reservation),
    /// No room in a budget scope: no call.
    OverBudget(Refusal),
    /// The half-open probe went to another job after the breaker was read: the hold is given
    /// back, and the job waits this long (before its spread), like a job its breaker holds back.
    ProbeGone(Duration),
    /// Redis could not answer: a deferral, spending no attempt (any hold is given back).
    Down(Failure),
}

/// Reserves `target`'s estimate, then takes the half-open probe when `probe`: the probe is the
/// last thing a call takes, so a job the budget refuses never holds it.
pub async fn hold(
    ledger: &impl Ledger,
    gates: &impl Gates,
    meta: CallMeta,
    limits: OrgLimits,
    target: &Planned,
    probe: bool,
) -> Hold {
    let reservation = match ledger
        .reserve(meta, limits, target.estimate, target.hold_ttl)
        .await
    {
        Ok(Reserved::Held(r)) => r,
        Ok(Reserved::Refused(refusal)) => return Hold::OverBudget(refusal),
        Err(f) => return Hold::Down(f),
    };
    if !probe {
        return Hold::Held(reservation);
    }
    match gates.take_probe(target.provider, &target.org).await {
        // Taken, or the breaker closed meanwhile (another job's probe succeeded).
        Ok(Gate::Probe | Gate::Pass) => Hold::Held(reservation),
        Ok(Gate::Wait(wait) | Gate::Open(wait)) => {
            ledger.give_back(&reservation).await;
            Hold::ProbeGone(wait)
        }
        Err(f) => {
            ledger.give_back(&reservation).await;
            Hold::Down(f)
        }
    }
}

/// No room in a budget: no call. The job waits for the window to reset (or fails, by setting).
pub(super) async fn over_budget(
    app: &impl Ports,
    raw: &RawJob,
    job: &JobRef,
    planned: &Planned,
    refusal: Refusal,
    call_seq: i32,
) -> Result<(), Failure> {
    let message = refusal.message();
    app.results().limit_reached(&refusal).await;
    let fail = app.ledger().fails_over_budget();
    let err = ErrorRecord {
        error_type: ErrorType::BudgetExceeded,
        message: message.clone(),
        details: json!({
            "scope": refusal.scope.suffix(),
            "limit_usd": refusal.scope.limit.as_usd_f64(),
            "spent_usd": refusal.spent.as_usd_f64(),
            "reserved_usd": refusal.reserved.as_usd_f64(),
            "estimate_usd": refusal.estimate.as_usd_f64(),
            "resets_at": refusal.scope.window.resets_at.to_rfc3339(),
        }),
        provider: Some(planned.provider.as_str().into()),
        http_status: None,
        call_seq,
    };
    let result =
        fail.then(|| failed_result(planned.provider.as_str(), planned.model.clone(), &message));
    app.record(
        app.results()
            .record_failure(
                job,
                &err,
                None,
                result.as_ref().map(|r| (r, crate::store::Ending::Failed)),
            )
            .await,
    )?;
    tracing::info!(job.id = %Field::new(&raw.id), "{}", Field::message(&message));
    if fail {
        return Err(Failure::Permanent { message });
    }
    let until = (refusal.scope.window.resets_at - app.ledger().now())
        .to_std()
        .unwrap_or_default();
    Err(Failure::Defer {
        message,
        after: window_reset_wait(until, fastrand::f64()),
        reason: DelayReason::Budget,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{MicroUsd, Provider, Tier};
    use crate::jobs::admit::{Admission, admit_job};
    use crate::jobs::ports::memory::{
        Breaker, MemoryGates, MemoryLedger, ORG, PROBE_OUT_WAIT, limits, meta, planned,
    };

    /// Admission then reservation, as `run_in_span` and `call::call_chain` run them.
    async fn admit_and_hold(gates: &MemoryGates, ledger: &MemoryLedger, estimate: i64) -> Hold {
        let chain = [planned(Provider::OpenAi, estimate)];
        let org = uuid::Uuid::parse_str(ORG).unwrap();
        let Admission::Go { idx, probe } = admit_job(gates, &chain, org, Tier::GrowthTeam).await
        else {
            panic!("not admitted");
        };
        hold(
            ledger,
            gates,
            meta(&chain[idx], 0),
            limits(),
            &chain[idx],
            probe,
        )
        .await
    }

    #[tokio::test]
    async fn a_half_open_probe_is_left_for_the_next_job_when_the_budget_refuses_this_one() {
        let gates = MemoryGates::default();
        gates.set_breaker(Provider::OpenAi, Breaker::ProbeFree);
        let ledger = MemoryLedger::with_room(MicroUsd::from_micros(500));
        match admit_and_hold(&gates, &ledger, 1_000).await {
            Hold::OverBudget(refusal) => {
                assert_eq!(refusal.estimate, MicroUsd::from_micros(1_000))
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(gates.breaker_of(Provider::OpenAi), Breaker::ProbeFree);
        assert_eq!(ledger.held(), MicroUsd::ZERO);
        // A job that fits is given the probe, and holds its estimate.
        match admit_and_hold(&gates, &ledger, 400).await {
            Hold::Held(r) => assert_eq!(r.estimate, MicroUsd::from_micros(400)),
            other => panic!("{other:?}"),
        }
        assert_eq!(gates.breaker_of(Provider::OpenAi), Breaker::ProbeTaken);
        assert_eq!(
            gates.calls().last().map(String::as_str),
            Some("take_probe:openai")
        );
    }

    #[tokio::test]
    async fn a_probe_another_job_took_after_the_breaker_was_read_gives_the_hold_back() {
        let gates = MemoryGates::default();
        gates.set_breaker(Provider::OpenAi, Breaker::ProbeFree);
        *gates.after_read.lock().unwrap() = Some(Box::new(|g: &MemoryGates| {
            g.set_breaker(Provider::OpenAi, Breaker::ProbeTaken)
        }));
        let ledger = MemoryLedger::with_room(MicroUsd::from_micros(5_000));
        match admit_and_hold(&gates, &ledger, 1_000).await {
            Hold::ProbeGone(wait) => assert_eq!(wait, PROBE_OUT_WAIT),
            other => panic!("{other:?}"),
        }
        assert_eq!(ledger.held(), MicroUsd::ZERO);
        assert_eq!(*ledger.room.lock().unwrap(), MicroUsd::from_micros(5_000));
        assert_eq!(*ledger.given_back.lock().unwrap(), ["j-1:1:0"]);
    }

    #[tokio::test]
    async fn a_closed_breaker_is_never_asked_for_a_probe() {
        let gates = MemoryGates::default();
        let ledger = MemoryLedger::with_room(MicroUsd::from_micros(5_000));
        assert!(matches!(
            admit_and_hold(&gates, &ledger, 1_000).await,
            Hold::Held(_)
        ));
        assert_eq!(
            gates.calls(),
            ["breaker:openai", "org_rate", "throttle:openai"]
        );
    }

    #[tokio::test]
    async fn a_breaker_that_closed_while_the_job_reserved_lets_the_call_go_without_a_probe() {
        let gates = MemoryGates::default();
        gates.set_breaker(Provider::OpenAi, Breaker::ProbeFree);
        *gates.after_read.lock().unwrap() = Some(Box::new(|g: &MemoryGates| {
            g.set_breaker(Provider::OpenAi, Breaker::Closed)
        }));
        let ledger = MemoryLedger::with_room(MicroUsd::from_micros(5_000));
        assert!(matches!(
            admit_and_hold(&gates, &ledger, 1_000).await,
            Hold::Held(_)
        ));
        assert_eq!(ledger.held(), MicroUsd::from_micros(1_000));
        assert!(ledger.given_back.lock().unwrap().is_empty());
    }
}
