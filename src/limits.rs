//! Per-organisation limits at run time. Every process reads the count overrides from PostgreSQL
//! every [`REFRESH`]: the caps on jobs in flight go to the queue's `{p}:org_limits`, which
//! fetch.lua keeps when it leases (fleet-wide, so a job over its cap is never leased), and the
//! jobs per minute to the budget's rate check. The dollar overrides are read per job by the plan
//! stage (cached for `jobs::policy::LIMITS_CACHE`). So a change made with `aiq org set-limits`
//! holds on every process within about 2 s. With PostgreSQL or Redis unreachable the last values
//! stay, and the next refresh tries again.

use std::collections::HashMap;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::budget::Budget;
use crate::domain::OrganizationId;
use crate::queue::Queue;
use crate::store::Store;

/// How often each process reads the overrides again.
pub const REFRESH: Duration = Duration::from_secs(2);

/// Reads the count overrides once and hands them to the queue and the budget.
pub async fn refresh(store: &Store, queue: &Queue, budget: &Budget) -> anyhow::Result<()> {
    let rows = store.count_overrides().await?;
    let mut caps = Vec::new();
    let mut rates = HashMap::new();
    for (org, in_flight, per_minute) in rows {
        if let Some(n) = in_flight {
            caps.push((OrganizationId::from(org), n));
        }
        if let Some(n) = per_minute {
            rates.insert(org, n);
        }
    }
    // The rates first: once the queue holds a refresh's caps, this process's rate check holds
    // the same refresh's rates (a test waits on that).
    budget.set_rate_overrides(rates);
    queue.sync_org_limits(&caps).await?;
    Ok(())
}

/// [`refresh`] every [`REFRESH`] until `stop`.
pub async fn follow(store: Store, queue: Queue, budget: Budget, stop: CancellationToken) {
    let mut failing = false;
    loop {
        match refresh(&store, &queue, &budget).await {
            Ok(()) => failing = false,
            // Said once per outage, not every 2 s.
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(error = %format!("{e:#}"), "reading the organisations' limits failed; the last ones stay in force");
            }
            Err(e) => {
                tracing::debug!(error = %format!("{e:#}"), "reading the organisations' limits failed again")
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(REFRESH) => {}
        }
    }
}

/// A count limit as `aiq org show` and the console print it: 0 is "no limit".
pub fn shown_count(n: u32) -> String {
    if n == 0 {
        "no limit".to_owned()
    } else {
        n.to_string()
    }
}

/// An organisation's own count override as printed: "-" when the tier default applies.
pub fn shown_own_count(n: Option<u32>) -> String {
    n.map_or("-".to_owned(), shown_count)
}

/// An organisation's own dollar override as printed: "-" when the tier default applies.
pub fn shown_own_usd(n: Option<crate::domain::MicroUsd>) -> String {
    n.map_or("-".to_owned(), |d| d.to_string())
}
