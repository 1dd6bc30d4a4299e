//! Finished jobs as the apps ask about them: a job's result row with its summary (`aiq job
//! show`, and the `succeeded` event of a job acknowledged without a call), and the row of a job
//! cancelled while it waited.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::webhooks::{JobEvent, enqueue_with_receivers_in};
use super::{Ending, JobRef, Store, StoreError, pg_text};
use crate::domain::{MicroUsd, ResultSummary};

/// A job's row in ai_processing_results, with the answering call's tokens or units.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ResultRow {
    /// `completed`, `failed` or `cancelled`.
    pub status: String,
    pub kind: String,
    pub tier: Option<String>,
    pub attempts: i32,
    pub error_message: Option<String>,
    pub processed_at: Option<DateTime<Utc>>,
    /// What it cost and took; for a job that completed.
    pub summary: Option<ResultSummary>,
}

/// What the row of a job that ended inside Redis is written from: cancelled while it waited,
/// or dead there (its interrupts ran out, its hash was corrupt).
#[derive(Debug, Clone)]
pub struct CancelledRow {
    pub organization_id: Uuid,
    pub job_id: String,
    pub kind: String,
    pub tier: String,
    pub attempts: i32,
    /// The payload's `callback_url`, already checked: the `job.cancelled` event goes there too.
    pub callback_url: Option<String>,
}

#[derive(sqlx::FromRow)]
struct Row {
    organization_id: Uuid,
    status: String,
    job_kind: String,
    tier: Option<String>,
    attempts: i32,
    error_message: Option<String>,
    processed_at: Option<DateTime<Utc>>,
    ai_provider: String,
    model: Option<String>,
    cost_micros: i64,
    processing_time_ms: Option<i32>,
    units: Option<i64>,
    input_tokens: Option<i64>,
    output_tokens: Option<i64>,
}

impl Store {
    /// The job's result row, if it has one; its summary's tokens or units come from the last
    /// call that succeeded.
    pub async fn result_summary(
        &self,
        organization_id: Uuid,
        job_id: &str,
    ) -> Result<Option<ResultRow>, StoreError> {
        let rows = self.result_rows(Some(organization_id), job_id).await?;
        Ok(rows.into_iter().next().map(|(_, r)| r))
    }

    /// The result rows of a job id: its organisation's, or with `None` any organisation's (at
    /// most two: an app's own id may name a job of each of two organisations).
    pub async fn result_rows(
        &self,
        organization_id: Option<Uuid>,
        job_id: &str,
    ) -> Result<Vec<(Uuid, ResultRow)>, StoreError> {
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT r.organization_id, r.status, r.job_kind, r.tier, r.attempts, r.error_message,
                    r.processed_at, r.ai_provider, r.model,
                    COALESCE((r.api_cost_usd * 1000000)::bigint, 0) AS cost_micros,
                    r.processing_time_ms, c.units::bigint AS units,
                    c.input_tokens::bigint AS input_tokens, c.output_tokens::bigint AS output_tokens
             FROM ai_processing_results r
             LEFT JOIN LATERAL (
               SELECT units, input_tokens, output_tokens FROM ai_cost_tracking c
               WHERE c.organization_id = r.organization_id AND c.job_id = r.job_id
                 AND c.call_status = 'succeeded'
               ORDER BY c.execution DESC, c.call_seq DESC LIMIT 1
             ) c ON true
             WHERE ($1::uuid IS NULL OR r.organization_id = $1) AND r.job_id = $2
               AND r.organization_id IS NOT NULL
             LIMIT 2",
        )
        .bind(organization_id)
        .bind(&*pg_text(job_id))
        .fetch_all(self.pool())
        .await?;
        Ok(rows
            .into_iter()
            .map(|row| (row.organization_id, result_row(row)))
            .collect())
    }

    /// The result row of a job cancelled while it waited: status `cancelled`, cost 0, no
    /// provider. One transaction, idempotent (a second drain of the same job writes nothing);
    /// returns whether the row is new.
    /// The organisation's webhook endpoints (and the job's `callback_url`) get its
    /// `job.cancelled` message in the same transaction, like every final result.
    pub async fn record_cancelled(&self, job: &CancelledRow) -> Result<bool, StoreError> {
        self.record_ended_in_queue(job, Ending::Cancelled, "cancelled before it ran")
            .await
    }

    /// The result row of a job that died inside Redis, where no handler could write it (its
    /// worker stopped too often, its hash was corrupt): status `failed`, cost 0 in the row (what
    /// its calls cost is in ai_cost_tracking), the reason as its error, and a `job.dead`
    /// message. Idempotent as [`Store::record_cancelled`]: a job that already has a row (a
    /// handler wrote it before its worker stopped) keeps it and gets no second message.
    pub async fn record_buried(
        &self,
        job: &CancelledRow,
        reason: &str,
    ) -> Result<bool, StoreError> {
        self.record_ended_in_queue(job, Ending::Dead, reason).await
    }

    async fn record_ended_in_queue(
        &self,
        job: &CancelledRow,
        ending: Ending,
        message: &str,
    ) -> Result<bool, StoreError> {
        let status = if ending == Ending::Cancelled {
            "cancelled"
        } else {
            "failed"
        };
        let receivers = self.webhook_receivers().await;
        let mut tx = self.pool().begin().await?;
        let inserted = sqlx::query(
            "INSERT INTO ai_processing_results (organization_id, processing_type, ai_provider,
                raw_response, api_cost_usd, error_message, status, processed_at, job_id, job_kind,
                tier, attempts)
             VALUES ($1, 'initial', 'none', '{}'::jsonb, 0, $6, $7, now(), $2, $3, $4, $5)
             ON CONFLICT ON CONSTRAINT ai_processing_results_one_per_job DO NOTHING",
        )
        .bind(job.organization_id)
        .bind(&*pg_text(&job.job_id))
        .bind(&*pg_text(&job.kind))
        .bind(&*pg_text(&job.tier))
        .bind(job.attempts)
        .bind(&*pg_text(message))
        .bind(status)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if inserted {
            let job_ref = JobRef {
                job_id: job.job_id.clone(),
                kind: job.kind.clone(),
                tier: Some(job.tier.clone()),
                organization_id: Some(job.organization_id),
                subject_id: None,
                subject_type: None,
                correlation_id: None,
                attempt: job.attempts.max(0) as u32,
                execution: 0,
                callback_url: job.callback_url.clone(),
            };
            let event = JobEvent::new(&job_ref, ending, Some(message), None);
            enqueue_with_receivers_in(&mut tx, &receivers, event.into_iter().collect()).await?;
        }
        tx.commit().await?;
        Ok(inserted)
    }
}

fn result_row(row: Row) -> ResultRow {
    let summary = (row.status == "completed").then(|| ResultSummary {
        provider: row.ai_provider,
        model: row.model,
        cost_usd: MicroUsd::from_micros(row.cost_micros).decimal(),
        input_tokens: row.input_tokens,
        output_tokens: row.output_tokens,
        units: row.units,
        duration_ms: row.processing_time_ms.unwrap_or(0).into(),
    });
    ResultRow {
        status: row.status,
        kind: row.job_kind,
        tier: row.tier,
        attempts: row.attempts,
        error_message: row.error_message,
        processed_at: row.processed_at,
        summary,
    }
}

/// A job's status as Redis holds it, completed from its PostgreSQL result row once it finished
/// (or made from the row alone once Redis has forgotten the job). `aiq job show` and the console.
pub fn complete_status(
    status: Option<aiq_queue::events::JobStatus>,
    id: &str,
    row: Option<(Uuid, ResultRow)>,
) -> Option<aiq_queue::events::JobStatus> {
    use aiq_queue::events::{JobState, JobStatus};
    let Some((row_org, row)) = row else {
        return status;
    };
    let summary = row
        .summary
        .as_ref()
        .and_then(|s| serde_json::to_value(s).ok());
    Some(match status {
        Some(mut s) => {
            s.result = summary.or(s.result);
            s
        }
        None => JobStatus {
            id: id.to_owned(),
            state: match row.status.as_str() {
                "completed" => JobState::Succeeded,
                "cancelled" => JobState::Cancelled,
                _ => JobState::Failed,
            },
            organization_id: row_org.to_string(),
            tier: row.tier.unwrap_or_default(),
            kind: row.kind,
            attempts: row.attempts.max(0) as u32,
            due_at: None,
            delay_reason: None,
            last_error: row.error_message.filter(|_| row.status != "completed"),
            finished_at: row.processed_at.map(|t| t.timestamp_millis()),
            result: summary,
        },
    })
}
