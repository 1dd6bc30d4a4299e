//! The settle stage: a call's budget hold is replaced by the cost its row holds in PostgreSQL
//! (so Redis and PostgreSQL agree), and the scopes' new totals raise any alerts. A hold whose
//! call was never made is given back through the ledger port (`ports::Ledger::give_back`).

use super::ports::{Ledger, Ports, Results};
use crate::budget::Reservation;
use crate::domain::MicroUsd;

/// Settles the budget with the cost PostgreSQL holds for the call, then raises any alerts.
pub async fn settle(app: &impl Ports, reservation: &Reservation, recorded: MicroUsd) {
    crate::observe::cost(
        &reservation.meta.provider,
        &reservation.meta.tier,
        recorded.as_usd_f64(),
    );
    match app.ledger().settle_hold(&reservation.id, recorded).await {
        Ok(states) => app.results().check_alerts(&states).await,
        // The hold stays and expires; the sweeper settles it from the cost row.
        Err(e) => {
            tracing::warn!(error = %e, reservation = %reservation.id, "settling the budget failed; the sweeper will")
        }
    }
}
