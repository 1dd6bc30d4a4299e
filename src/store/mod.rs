//! PostgreSQL: every SQL statement of aiq lives here; the schema lives in `migrations/`.
//! Writes are idempotent: each table has a unique key per job (results), per call (costs, usage)
//! or per attempt (errors), and inserts use `ON CONFLICT DO NOTHING`, so a replayed job changes
//! nothing. Money is bound as integer micro-USD and stored as NUMERIC dollars.

use std::time::{Duration, Instant};

use serde_json::Value;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{ConnectOptions, Row};
use uuid::Uuid;

use crate::config::Secret;
use crate::domain::MicroUsd;

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("postgres: {0}")]
    Db(#[from] sqlx::Error),
    #[error("migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

/// Which job a row belongs to.
#[derive(Debug, Clone)]
pub struct JobRef {
    pub job_id: String,
    pub kind: String,
    pub tier: Option<String>,
    pub organization_id: Option<Uuid>,
    pub subject_id: Option<Uuid>,
    pub subject_type: Option<String>,
    pub correlation_id: Option<String>,
    /// 1 for the first execution.
    pub attempt: u32,
}

/// One provider call, for ai_cost_tracking (and ai_usage when it has tokens).
#[derive(Debug, Clone)]
pub struct CallRecord {
    pub provider: String,
    pub operation: String,
    pub model: Option<String>,
    pub call_seq: i32,
    pub units: Option<i64>,
    pub input_tokens: Option<i64>,
    pub cached_tokens: Option<i64>,
    pub output_tokens: Option<i64>,
    pub cost: MicroUsd,
    pub succeeded: bool,
    pub price_version: String,
    pub metadata: Value,
}

/// The job's final record in ai_processing_results.
#[derive(Debug, Clone)]
pub struct ResultRecord {
    pub provider: String,
    pub model: Option<String>,
    pub raw_response: Value,
    pub confidence_scores: Value,
    pub processing_ms: i64,
    pub cost: MicroUsd,
    pub completed: bool,
    pub error_message: Option<String>,
}

/// A failed attempt, for ai_processing_errors.
#[derive(Debug, Clone)]
pub struct ErrorRecord {
    pub error_type: String,
    pub message: String,
    pub details: Value,
    pub provider: Option<String>,
    pub http_status: Option<i32>,
}

/// A row of the plan's `get_cost_analysis()`.
#[derive(Debug, Clone, PartialEq)]
pub struct CostAnalysisRow {
    pub service_name: String,
    pub total_cost: MicroUsd,
    pub request_count: i64,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RowCounts {
    pub ai_processing_results: i64,
    pub ai_cost_tracking: i64,
    pub ai_processing_errors: i64,
    pub ai_usage: i64,
}

#[derive(Clone)]
pub struct Store {
    pool: PgPool,
}

impl Store {
    /// Connects, retrying for up to `wait` while the server starts or is briefly away.
    pub async fn connect(
        url: &Secret,
        max_connections: u32,
        wait: Duration,
    ) -> Result<Self, StoreError> {
        let options: PgConnectOptions = url.expose().parse()?;
        let options = options.disable_statement_logging();
        let deadline = Instant::now() + wait;
        loop {
            let attempt = PgPoolOptions::new()
                .max_connections(max_connections)
                .acquire_timeout(Duration::from_secs(10))
                .connect_with(options.clone())
                .await;
            match attempt {
                Ok(pool) => return Ok(Self { pool }),
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(error = %e, "postgres not ready yet");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    pub fn from_pool(pool: PgPool) -> Self {
        Self { pool }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub async fn migrate(&self) -> Result<(), StoreError> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn insert_call(
        tx: &mut sqlx::PgConnection,
        job: &JobRef,
        call: &CallRecord,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO ai_cost_tracking (organization_id, service_name, operation_type, request_count,
                cost_usd, billing_date, metadata, job_id, attempt, call_seq, tier, model, units,
                input_tokens, cached_tokens, output_tokens, call_status, price_version)
             VALUES ($1, $2, $3, 1, $4::numeric / 1000000, (now() AT TIME ZONE 'UTC')::date, $5, $6, $7,
                $8, $9, $10, $11, $12, $13, $14, $15, $16)
             ON CONFLICT ON CONSTRAINT ai_cost_tracking_one_per_call DO NOTHING",
        )
        .bind(job.organization_id)
        .bind(&call.provider)
        .bind(&call.operation)
        .bind(call.cost.micros())
        .bind(&call.metadata)
        .bind(&job.job_id)
        .bind(job.attempt as i32)
        .bind(call.call_seq)
        .bind(&job.tier)
        .bind(&call.model)
        .bind(call.units.map(|u| u as i32))
        .bind(call.input_tokens.map(|u| u as i32))
        .bind(call.cached_tokens.map(|u| u as i32))
        .bind(call.output_tokens.map(|u| u as i32))
        .bind(if call.succeeded { "succeeded" } else { "failed" })
        .bind(&call.price_version)
        .execute(&mut *tx)
        .await?;
        if let (Some(org), Some(input), Some(output), Some(model)) = (
            job.organization_id,
            call.input_tokens,
            call.output_tokens,
            &call.model,
        ) {
            sqlx::query(
                "INSERT INTO ai_usage (organization_id, model, endpoint, input_tokens, output_tokens,
                    cached_tokens, cost_usd, subscription_tier, job_id, attempt, call_seq)
                 VALUES ($1, $2, $3, $4, $5, $6, $7::numeric / 1000000, $8, $9, $10, $11)
                 ON CONFLICT ON CONSTRAINT ai_usage_one_per_call DO NOTHING",
            )
            .bind(org)
            .bind(model)
            .bind(&call.operation)
            .bind(input as i32)
            .bind(output as i32)
            .bind(call.cached_tokens.unwrap_or(0) as i32)
            .bind(call.cost.micros())
            .bind(job.tier.as_deref().unwrap_or("unknown"))
            .bind(&job.job_id)
            .bind(job.attempt as i32)
            .bind(call.call_seq)
            .execute(&mut *tx)
            .await?;
        }
        Ok(())
    }

    async fn insert_result(
        tx: &mut sqlx::PgConnection,
        job: &JobRef,
        result: &ResultRecord,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO ai_processing_results (subject_id, subject_type, organization_id, processing_type,
                ai_provider, raw_response, confidence_scores, processing_time_ms, api_cost_usd,
                error_message, status, processed_at, job_id, job_kind, tier, model, correlation_id, attempts)
             VALUES ($1, $2, $3, 'initial', $4, $5, $6, $7, $8::numeric / 1000000, $9, $10, now(), $11,
                $12, $13, $14, $15, $16)
             ON CONFLICT ON CONSTRAINT ai_processing_results_one_per_job DO NOTHING",
        )
        .bind(job.subject_id)
        .bind(&job.subject_type)
        .bind(job.organization_id)
        .bind(&result.provider)
        .bind(&result.raw_response)
        .bind(&result.confidence_scores)
        .bind(result.processing_ms.clamp(0, i32::MAX as i64) as i32)
        .bind(result.cost.micros())
        .bind(&result.error_message)
        .bind(if result.completed { "completed" } else { "failed" })
        .bind(&job.job_id)
        .bind(&job.kind)
        .bind(&job.tier)
        .bind(&result.model)
        .bind(&job.correlation_id)
        .bind(job.attempt as i32)
        .execute(&mut *tx)
        .await?;
        Ok(())
    }

    async fn insert_error(
        tx: &mut sqlx::PgConnection,
        job: &JobRef,
        err: &ErrorRecord,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO ai_processing_errors (subject_id, organization_id, error_type, error_message,
                error_details, retry_count, job_id, job_kind, tier, provider, http_status)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
             ON CONFLICT ON CONSTRAINT ai_processing_errors_one_per_attempt DO NOTHING",
        )
        .bind(job.subject_id)
        .bind(job.organization_id)
        .bind(&err.error_type)
        .bind(&err.message)
        .bind(&err.details)
        .bind(job.attempt.saturating_sub(1) as i32)
        .bind(&job.job_id)
        .bind(&job.kind)
        .bind(&job.tier)
        .bind(&err.provider)
        .bind(err.http_status)
        .execute(&mut *tx)
        .await?;
        Ok(())
    }

    /// A successful job: its result and the call that produced it, in one transaction.
    pub async fn record_success(
        &self,
        job: &JobRef,
        call: &CallRecord,
        result: &ResultRecord,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        Self::insert_call(&mut tx, job, call).await?;
        Self::insert_result(&mut tx, job, result).await?;
        tx.commit().await?;
        Ok(())
    }

    /// A failed attempt: the error, the call if one was made, and the failed result when this
    /// was the job's last attempt, in one transaction.
    pub async fn record_failure(
        &self,
        job: &JobRef,
        err: &ErrorRecord,
        call: Option<&CallRecord>,
        final_result: Option<&ResultRecord>,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        if let Some(call) = call {
            Self::insert_call(&mut tx, job, call).await?;
        }
        Self::insert_error(&mut tx, job, err).await?;
        if let Some(result) = final_result {
            Self::insert_result(&mut tx, job, result).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Runs the plan's `get_cost_analysis()`.
    pub async fn cost_analysis(
        &self,
        org: Uuid,
        days: i32,
    ) -> Result<Vec<CostAnalysisRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT service_name, (total_cost * 1000000)::bigint AS micros, request_count
             FROM get_cost_analysis($1, $2)",
        )
        .bind(org)
        .bind(days)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(CostAnalysisRow {
                    service_name: r.try_get("service_name")?,
                    total_cost: MicroUsd::from_micros(r.try_get("micros")?),
                    request_count: r.try_get("request_count")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Into::into)
    }

    /// Jobs per (tier, status) in ai_processing_results.
    pub async fn outcomes_by_tier(&self) -> Result<Vec<(String, String, i64)>, StoreError> {
        let rows = sqlx::query(
            "SELECT coalesce(tier, 'unknown') AS tier, status, count(*) AS n
             FROM ai_processing_results GROUP BY 1, 2 ORDER BY 1, 2",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("tier")?, r.try_get("status")?, r.try_get("n")?)))
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Into::into)
    }

    /// Spend and calls per provider in ai_cost_tracking.
    pub async fn cost_by_provider(&self) -> Result<Vec<(String, MicroUsd, i64)>, StoreError> {
        let rows = sqlx::query(
            "SELECT service_name, (sum(cost_usd) * 1000000)::bigint AS micros, count(*) AS calls
             FROM ai_cost_tracking GROUP BY 1 ORDER BY 1",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get("service_name")?,
                    MicroUsd::from_micros(r.try_get("micros")?),
                    r.try_get("calls")?,
                ))
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Into::into)
    }

    pub async fn row_counts(&self) -> Result<RowCounts, StoreError> {
        let r = sqlx::query(
            "SELECT (SELECT count(*) FROM ai_processing_results) AS results,
                    (SELECT count(*) FROM ai_cost_tracking) AS costs,
                    (SELECT count(*) FROM ai_processing_errors) AS errors,
                    (SELECT count(*) FROM ai_usage) AS usage",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(RowCounts {
            ai_processing_results: r.try_get("results")?,
            ai_cost_tracking: r.try_get("costs")?,
            ai_processing_errors: r.try_get("errors")?,
            ai_usage: r.try_get("usage")?,
        })
    }
}
