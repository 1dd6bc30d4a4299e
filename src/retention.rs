//! Pruning old data by the `AIQ_RETAIN_*` settings: one pass (`aiq prune`, or every
//! `AIQ_PRUNE_INTERVAL_S` in `aiq run`) under the pruner's advisory lock, so one process at a time
//! prunes and the others skip. Each part of a pass takes its cutoff once, then removes batches of
//! `AIQ_PRUNE_BATCH` rows until a batch comes back short, resting `AIQ_PRUNE_PAUSE_PCT` of each
//! batch's time between them. The statements are `store::retention`'s.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::RetentionSettings;
use crate::store::retention::Part;
use crate::store::{Store, StoreError};

/// What a pass did (or, dry, would do) to one part.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Pruned {
    pub table: &'static str,
    pub action: &'static str,
    /// The retention in days that applied (0: never, nothing is looked at).
    pub days: u32,
    pub rows: u64,
}

/// A pass did not run: another process holds the pruner's lock.
#[derive(Debug, thiserror::Error)]
#[error("another process is pruning (the pruner's advisory lock is taken)")]
pub struct Busy;

/// The retention in days of each part (0: never).
fn days(part: Part, r: &RetentionSettings) -> u32 {
    match part {
        Part::Results | Part::Errors | Part::Usage | Part::Alerts => r.rows_days,
        Part::RawAnswers => r.raw_days,
        Part::Ledger => r.ledger_days,
    }
}

/// One full pass under the lock. `dry_run` counts what would go and changes nothing. A pass
/// stops between batches when `stop` fires (the counts then say what it did). `Ok(Err(Busy))`
/// when another process prunes.
pub async fn pass(
    store: &Store,
    r: &RetentionSettings,
    dry_run: bool,
    stop: &CancellationToken,
) -> Result<Result<Vec<Pruned>, Busy>, StoreError> {
    let Some(lock) = store.try_prune_lock().await? else {
        return Ok(Err(Busy));
    };
    let done = parts(store, r, dry_run, stop).await;
    // The lock's connection closes on drop too: a failed release loses nothing.
    if let Err(e) = lock.release().await {
        tracing::debug!(error = %e, "releasing the pruner's lock failed; its connection is closed");
    }
    done.map(Ok)
}

async fn parts(
    store: &Store,
    r: &RetentionSettings,
    dry_run: bool,
    stop: &CancellationToken,
) -> Result<Vec<Pruned>, StoreError> {
    let rows_cutoff = match r.rows_days {
        0 => None,
        d => Some(store.cutoff(d).await?),
    };
    let mut out = Vec::with_capacity(Part::ALL.len());
    for part in Part::ALL {
        let days = days(part, r);
        let mut rows = 0;
        if days > 0 {
            let cutoff = store.cutoff(days).await?;
            let keep_after = if part == Part::RawAnswers {
                rows_cutoff
            } else {
                None
            };
            if dry_run {
                rows = store.prune_count(part, cutoff, keep_after).await?;
            } else {
                while !stop.is_cancelled() {
                    let started = tokio::time::Instant::now();
                    let n = store.prune_batch(part, cutoff, keep_after, r.batch).await?;
                    rows += n;
                    if n < u64::from(r.batch) {
                        break;
                    }
                    let rest = rest_after(started.elapsed(), r.pause_pct);
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        _ = tokio::time::sleep(rest) => {}
                    }
                }
            }
        }
        out.push(Pruned {
            table: part.table(),
            action: part.action(),
            days,
            rows,
        });
    }
    Ok(out)
}

/// How long the pruner rests after a batch that took `took`: `pct` percent of it, at most a
/// minute (a batch stalled by a lock does not park the pass for long after).
fn rest_after(took: Duration, pct: u32) -> Duration {
    took.saturating_mul(pct)
        .checked_div(100)
        .unwrap_or_default()
        .min(Duration::from_secs(60))
}

/// `aiq run`'s pruner: a pass every `interval` until `stop`, skipped while another process
/// prunes; a failed pass is logged and tried at the next interval.
pub async fn run(store: Store, r: RetentionSettings, stop: CancellationToken) {
    if r.raw_days == 0 && r.rows_days == 0 && r.ledger_days == 0 {
        return;
    }
    loop {
        match pass(&store, &r, false, &stop).await {
            Ok(Ok(done)) => {
                for p in done.iter().filter(|p| p.rows > 0) {
                    tracing::info!(
                        table = p.table,
                        action = p.action,
                        rows = p.rows,
                        days = p.days,
                        "pruned"
                    );
                }
            }
            Ok(Err(Busy)) => tracing::debug!("another process is pruning; skipped"),
            Err(e) => {
                tracing::warn!(error = %e, "pruning failed; trying again at the next interval")
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(r.interval) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rest_is_a_share_of_the_batch_and_never_over_a_minute() {
        let ms = Duration::from_millis;
        assert_eq!(rest_after(ms(40), 100), ms(40));
        assert_eq!(rest_after(ms(40), 50), ms(20));
        assert_eq!(rest_after(ms(40), 0), Duration::ZERO);
        assert_eq!(rest_after(ms(40), 1000), ms(400));
        assert_eq!(
            rest_after(Duration::from_secs(3600), 1000),
            Duration::from_secs(60)
        );
        assert_eq!(rest_after(Duration::MAX, 1000), Duration::from_secs(60));
    }
}
