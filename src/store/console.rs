//! Bounded reads for the console: spend per provider and day (sums kept per day, organisation
//! and provider by the cost rows' triggers), a page of organisations by this month's spend
//! (sums per month through their index), the latest alerts, the provider of dead jobs' last
//! failed calls (a step of the dead set at a time).

use chrono::{DateTime, NaiveDate, Utc};
use uuid::Uuid;

use super::{Store, StoreError};
use crate::domain::MicroUsd;

/// An organisation's spend today and this month, with its own limits when it has any.
#[derive(Debug, Clone)]
pub struct OrgSpend {
    pub organization_id: Uuid,
    pub today: MicroUsd,
    pub month: MicroUsd,
    pub daily_limit: Option<MicroUsd>,
    pub monthly_limit: Option<MicroUsd>,
    /// The tier of its latest cost row (whose defaults hold where it has no limits of its own).
    pub tier: Option<String>,
}

/// An alert as the console lists it.
#[derive(Debug, Clone)]
pub struct AlertShown {
    pub created_at: DateTime<Utc>,
    pub scope: String,
    pub threshold: String,
    pub message: String,
    pub delivered_at: Option<DateTime<Utc>>,
    pub delivery_attempts: i32,
}

/// One provider call of a job, as its page lists it (ai_cost_tracking).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct CallShown {
    pub created_at: Option<DateTime<Utc>>,
    pub attempt: i32,
    pub call_seq: i32,
    pub provider: String,
    pub model: Option<String>,
    pub call_status: String,
    pub cost_micros: i64,
    pub input_tokens: Option<i64>,
    pub output_tokens: Option<i64>,
    pub units: Option<i64>,
}

/// One error row of a job, as its page lists it (ai_processing_errors).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ErrorShown {
    pub created_at: Option<DateTime<Utc>>,
    pub retry_count: Option<i32>,
    pub call_seq: i32,
    pub error_type: String,
    pub provider: Option<String>,
    pub http_status: Option<i32>,
    pub error_message: String,
}

/// The most spend deltas one fold statement moves.
pub const FOLD_STEP: i32 = 50_000;

/// The most calls and error rows a job's page lists (the first ones, in order).
pub const JOB_ROWS: i64 = 50;

/// org, today, month, daily limit, monthly limit (micro-USD), tier.
type SpendRow = (Uuid, i64, i64, Option<i64>, Option<i64>, Option<String>);
/// created, scope, threshold, message, delivered, tries.
type AlertTuple = (
    DateTime<Utc>,
    String,
    String,
    String,
    Option<DateTime<Utc>>,
    i32,
);

impl Store {
    /// For each job (organisation, id), the provider of its newest error row that names one: the
    /// provider a dead job failed at last. One statement for the whole step, each pair found
    /// through the error table's unique index; a job without such a row is absent.
    pub async fn last_failed_providers(
        &self,
        jobs: &[(Uuid, String)],
    ) -> Result<std::collections::HashMap<(Uuid, String), String>, StoreError> {
        if jobs.is_empty() {
            return Ok(Default::default());
        }
        let (orgs, ids): (Vec<Uuid>, Vec<String>) = jobs.iter().cloned().unzip();
        let rows: Vec<(Uuid, String, String)> = sqlx::query_as(
            "SELECT DISTINCT ON (e.organization_id, e.job_id) e.organization_id, e.job_id, e.provider
             FROM ai_processing_errors e
             JOIN unnest($1::uuid[], $2::text[]) AS k(org, job)
               ON e.organization_id = k.org AND e.job_id = k.job
             WHERE e.provider IS NOT NULL
             ORDER BY e.organization_id, e.job_id, e.created_at DESC, e.retry_count DESC,
                      e.call_seq DESC",
        )
        .bind(&orgs)
        .bind(&ids)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(|(o, j, p)| ((o, j), p)).collect())
    }

    /// A job's provider calls, in the order they were made, at most [`JOB_ROWS`] (through the
    /// cost table's unique index on organisation and job).
    pub async fn job_calls(&self, org: Uuid, job_id: &str) -> Result<Vec<CallShown>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT created_at, attempt, call_seq, service_name AS provider, model, call_status,
                    (cost_usd * 1000000)::bigint AS cost_micros, input_tokens, output_tokens, units
             FROM ai_cost_tracking WHERE organization_id = $1 AND job_id = $2
             ORDER BY execution, call_seq, created_at LIMIT $3",
        )
        .bind(org)
        .bind(&*super::pg_text(job_id))
        .bind(JOB_ROWS)
        .fetch_all(&self.pool)
        .await?)
    }

    /// A job's error rows, oldest first, at most [`JOB_ROWS`].
    pub async fn job_errors(&self, org: Uuid, job_id: &str) -> Result<Vec<ErrorShown>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT created_at, retry_count, call_seq, error_type, provider, http_status,
                    error_message
             FROM ai_processing_errors WHERE organization_id = $1 AND job_id = $2
             ORDER BY created_at, retry_count, call_seq LIMIT $3",
        )
        .bind(org)
        .bind(&*super::pg_text(job_id))
        .bind(JOB_ROWS)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Moves the spend deltas the cost rows' triggers wrote into the sums per day and per month
    /// (migration 20261203000016), in steps of [`FOLD_STEP`]; returns how many it folded. One
    /// folder at a time: a second call waits for the first, then folds what is left.
    pub async fn fold_spend(&self) -> Result<u64, StoreError> {
        let mut total = 0;
        loop {
            let n: i64 = sqlx::query_scalar("SELECT aiq_fold_spend($1)")
                .bind(FOLD_STEP)
                .fetch_one(&self.pool)
                .await?;
            total += n as u64;
            if n < i64::from(FOLD_STEP) {
                return Ok(total);
            }
        }
    }

    /// Spend per provider and day over the last `days` days, oldest first: the platform's sums
    /// (at most `days` x providers rows) with the deltas not folded yet.
    pub async fn spend_per_provider_day(
        &self,
        days: i32,
    ) -> Result<Vec<(NaiveDate, String, MicroUsd)>, StoreError> {
        let rows: Vec<(NaiveDate, String, i64)> = sqlx::query_as(
            "SELECT billing_date, service_name, sum(cost_micros)::bigint
             FROM (SELECT billing_date, service_name, cost_micros FROM aiq_spend_platform
                   WHERE billing_date >= CURRENT_DATE - $1
                   UNION ALL
                   SELECT billing_date, service_name, cost_micros FROM aiq_spend_delta
                   WHERE billing_date >= CURRENT_DATE - $1) s
             GROUP BY 1, 2 ORDER BY 1, 2",
        )
        .bind(days)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(d, p, m)| (d, p, MicroUsd::from_micros(m)))
            .collect())
    }

    /// A page of organisations by this month's spend, most first, `offset` into that order:
    /// read from the month's sums through their index (fold first: [`Store::fold_spend`]).
    pub async fn org_spend_page(
        &self,
        offset: i64,
        limit: i64,
    ) -> Result<Vec<OrgSpend>, StoreError> {
        let rows: Vec<SpendRow> = sqlx::query_as(
            "SELECT s.organization_id,
                    COALESCE((SELECT sum(d.cost_micros) FROM aiq_spend_day d
                              WHERE d.organization_id = s.organization_id
                                AND d.billing_date = CURRENT_DATE), 0)::bigint,
                    s.cost_micros,
                    (l.daily_limit_usd * 1000000)::bigint, (l.monthly_limit_usd * 1000000)::bigint,
                    (SELECT c.tier FROM ai_cost_tracking c
                     WHERE c.organization_id = s.organization_id AND c.tier IS NOT NULL
                       AND c.billing_date IS NOT NULL
                     ORDER BY c.billing_date DESC LIMIT 1)
             FROM (SELECT organization_id, cost_micros FROM aiq_spend_month
                   WHERE month = date_trunc('month', CURRENT_DATE)::date
                     AND organization_id IS NOT NULL
                   ORDER BY cost_micros DESC, organization_id OFFSET $1 LIMIT $2) s
             LEFT JOIN ai_cost_limits l ON l.organization_id = s.organization_id
             ORDER BY s.cost_micros DESC, s.organization_id",
        )
        .bind(offset)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        let usd = MicroUsd::from_micros;
        Ok(rows
            .into_iter()
            .map(|(o, t, m, d, ml, tier)| OrgSpend {
                organization_id: o,
                today: usd(t),
                month: usd(m),
                daily_limit: d.map(usd),
                monthly_limit: ml.map(usd),
                tier,
            })
            .collect())
    }

    /// The latest `limit` alerts, newest first.
    pub async fn latest_alerts(&self, limit: i64) -> Result<Vec<AlertShown>, StoreError> {
        let rows: Vec<AlertTuple> = sqlx::query_as(
            "SELECT created_at, scope, threshold, message, delivered_at, delivery_attempts
                 FROM ai_cost_alerts ORDER BY created_at DESC LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(c, s, t, m, d, a)| AlertShown {
                created_at: c,
                scope: s,
                threshold: t,
                message: m,
                delivered_at: d,
                delivery_attempts: a,
            })
            .collect())
    }
}

impl Store {
    /// The tier of a cost row of an organisation's latest billing day (the first row of its
    /// index on organisation and billing date, read backwards: never the whole history).
    pub async fn org_latest_tier(&self, org: Uuid) -> Result<Option<String>, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT tier FROM ai_cost_tracking WHERE organization_id = $1 AND tier IS NOT NULL
               AND billing_date IS NOT NULL
             ORDER BY billing_date DESC LIMIT 1",
        )
        .bind(org)
        .fetch_optional(&self.pool)
        .await?)
    }
}
