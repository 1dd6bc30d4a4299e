//! Retention: the statements that prune old data (`AIQ_RETAIN_*`), in bounded batches, each its
//! own short transaction, oldest first through an index on `created_at`; and the advisory lock
//! that lets one process at a time prune. The pass that runs them is `crate::retention`.

use chrono::{DateTime, Utc};
use sqlx::Connection;
use sqlx::postgres::PgConnection;

use super::{Store, StoreError};

/// The advisory lock key of the pruner (`pg_try_advisory_lock`): "aiqprune" in ASCII.
const LOCK_KEY: i64 = 0x6169_7170_7275_6e65;

/// What one part of a pass removes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// Result rows (`AIQ_RETAIN_ROWS_DAYS`).
    Results,
    /// Error rows (`AIQ_RETAIN_ROWS_DAYS`).
    Errors,
    /// Usage rows (`AIQ_RETAIN_ROWS_DAYS`).
    Usage,
    /// Delivered budget alerts (`AIQ_RETAIN_ROWS_DAYS`).
    Alerts,
    /// Raw answers: `raw_response` becomes `{"pruned": true}`, the row stays (`AIQ_RETAIN_RAW_DAYS`).
    RawAnswers,
    /// Cost rows (`AIQ_RETAIN_LEDGER_DAYS`).
    Ledger,
}

impl Part {
    /// In the order a pass runs them: rows that go first, so no answer is pruned in a row about
    /// to be deleted.
    pub const ALL: [Part; 6] = [
        Part::Results,
        Part::Errors,
        Part::Usage,
        Part::Alerts,
        Part::RawAnswers,
        Part::Ledger,
    ];

    /// The table it changes.
    pub fn table(self) -> &'static str {
        match self {
            Part::Results | Part::RawAnswers => "ai_processing_results",
            Part::Errors => "ai_processing_errors",
            Part::Usage => "ai_usage",
            Part::Alerts => "ai_cost_alerts",
            Part::Ledger => "ai_cost_tracking",
        }
    }

    /// What it does to the rows it finds.
    pub fn action(self) -> &'static str {
        match self {
            Part::RawAnswers => "raw_response pruned",
            _ => "deleted",
        }
    }

    /// The rows it finds: older than `$1`. For raw answers `$2` is the rows' cutoff (or NULL),
    /// so a dry run does not count answers whose rows the same pass deletes.
    fn filter(self) -> &'static str {
        match self {
            Part::RawAnswers => {
                "ai_processing_results WHERE raw_pruned_at IS NULL AND created_at < $1
                   AND ($2::timestamptz IS NULL OR created_at >= $2)"
            }
            Part::Results => "ai_processing_results WHERE created_at < $1",
            Part::Errors => "ai_processing_errors WHERE created_at < $1",
            Part::Usage => "ai_usage WHERE created_at < $1",
            Part::Alerts => "ai_cost_alerts WHERE delivered_at IS NOT NULL AND created_at < $1",
            Part::Ledger => "ai_cost_tracking WHERE created_at < $1",
        }
    }
}

/// The pruner's lock, held on a connection of its own (not the pool's: a lock left on a pooled
/// connection would outlive the pass). Dropping it closes the connection, which releases it.
pub struct PruneLock {
    conn: PgConnection,
}

impl PruneLock {
    /// Releases the lock and closes its connection.
    pub async fn release(mut self) -> Result<(), StoreError> {
        sqlx::query("SELECT pg_advisory_unlock($1)")
            .bind(LOCK_KEY)
            .execute(&mut self.conn)
            .await?;
        self.conn.close().await?;
        Ok(())
    }
}

impl Store {
    /// Takes the pruner's lock unless another session holds it (`None`: someone else prunes).
    pub async fn try_prune_lock(&self) -> Result<Option<PruneLock>, StoreError> {
        let mut conn = self.pool.acquire().await?.detach();
        let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(LOCK_KEY)
            .fetch_one(&mut conn)
            .await?;
        if got {
            Ok(Some(PruneLock { conn }))
        } else {
            conn.close().await?;
            Ok(None)
        }
    }

    /// The database's time `days` days ago: the cutoff of a retention, taken once per pass so
    /// every batch of the pass removes the same rows.
    pub async fn cutoff(&self, days: u32) -> Result<DateTime<Utc>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT now() - make_interval(days => $1)")
                .bind(days as i32)
                .fetch_one(&self.pool)
                .await?,
        )
    }

    /// How many rows `part` would remove at `cutoff` (`rows_cutoff`: see [`Part::filter`]).
    pub async fn prune_count(
        &self,
        part: Part,
        cutoff: DateTime<Utc>,
        rows_cutoff: Option<DateTime<Utc>>,
    ) -> Result<u64, StoreError> {
        // Every statement here is made of the static texts of `Part`, never of a value.
        let sql = format!("SELECT count(*) FROM {}", part.filter());
        let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .bind(cutoff)
            .bind(rows_cutoff)
            .fetch_one(&self.pool)
            .await?;
        Ok(n as u64)
    }

    /// Removes (or, for raw answers, prunes) at most `limit` of the oldest rows `part` finds at
    /// `cutoff`, in one statement; returns how many. Rows another transaction holds are skipped
    /// (`SKIP LOCKED`) and found by a later batch, so the pipeline never waits on the pruner.
    pub async fn prune_batch(
        &self,
        part: Part,
        cutoff: DateTime<Utc>,
        rows_cutoff: Option<DateTime<Utc>>,
        limit: u32,
    ) -> Result<u64, StoreError> {
        let table = part.table();
        let pick = format!(
            "SELECT id FROM {} ORDER BY created_at LIMIT $3 FOR UPDATE SKIP LOCKED",
            part.filter()
        );
        let sql = match part {
            Part::RawAnswers => format!(
                "UPDATE {table} SET raw_response = '{{\"pruned\": true}}'::jsonb,
                    raw_pruned_at = now()
                 WHERE id IN ({pick})"
            ),
            _ => format!("DELETE FROM {table} WHERE id IN ({pick})"),
        };
        Ok(sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(cutoff)
            .bind(rows_cutoff)
            .bind(limit as i64)
            .execute(&self.pool)
            .await?
            .rows_affected())
    }
}
