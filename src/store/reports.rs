//! The operator's reports: spend spikes, spend per day, the plan's cost analysis, outcomes per
//! tier, cost per provider, row counts. None of it is on a job's path.

use std::collections::BTreeMap;

use sqlx::Row;
use uuid::Uuid;

use super::{Store, StoreError};
use crate::domain::MicroUsd;

/// An hour whose spend jumped.
#[derive(Debug, Clone)]
pub struct Spike {
    /// None: the whole platform.
    pub organization_id: Option<Uuid>,
    pub last_hour: MicroUsd,
    pub average_hour: MicroUsd,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct DailySpend {
    pub organization_id: Option<Uuid>,
    pub provider: String,
    pub day: chrono::NaiveDate,
    pub cost: MicroUsd,
    pub requests: i64,
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

impl Store {
    /// Organisations (and the platform, with None) whose spend in the last hour is above
    /// `multiple` times their average hourly spend over the 24 hours before it, and at least `min`.
    pub async fn spend_spikes(
        &self,
        multiple: f64,
        min: MicroUsd,
    ) -> Result<Vec<Spike>, StoreError> {
        let rows: Vec<(Option<Uuid>, i64, i64)> = sqlx::query_as(
            "WITH per AS (
               SELECT organization_id, GROUPING(organization_id) AS total,
                      sum(cost_usd) FILTER (WHERE created_at >= now() - interval '1 hour') AS last_hour,
                      sum(cost_usd) FILTER (WHERE created_at < now() - interval '1 hour'
                                              AND created_at >= now() - interval '25 hours') / 24 AS avg_hour
               FROM ai_cost_tracking WHERE created_at >= now() - interval '25 hours'
               GROUP BY ROLLUP (organization_id))
             SELECT organization_id, (coalesce(last_hour, 0) * 1000000)::bigint,
                    (coalesce(avg_hour, 0) * 1000000)::bigint
             FROM per
             WHERE (organization_id IS NOT NULL OR total = 1)
               AND coalesce(last_hour, 0) * 1000000 >= $2
               AND coalesce(last_hour, 0) > $1 * coalesce(avg_hour, 0)
               AND coalesce(avg_hour, 0) > 0",
        )
        .bind(multiple)
        .bind(min.micros())
        .fetch_all(&self.pool)
        .await?;
        // ROLLUP's grand total row (GROUPING = 1) is the platform; it has a NULL organization.
        Ok(rows
            .into_iter()
            .map(|(org, last, avg)| Spike {
                organization_id: org,
                last_hour: MicroUsd::from_micros(last),
                average_hour: MicroUsd::from_micros(avg),
            })
            .collect())
    }

    /// Spend per organisation, provider and day over the last `days` days (for `aiq costs`).
    pub async fn spend_by_day(
        &self,
        org: Option<Uuid>,
        days: i32,
    ) -> Result<Vec<DailySpend>, StoreError> {
        let rows: Vec<(Option<Uuid>, String, chrono::NaiveDate, i64, i64)> = sqlx::query_as(
            "SELECT organization_id, service_name, billing_date, (sum(cost_usd) * 1000000)::bigint,
                    sum(request_count)::bigint
             FROM ai_cost_tracking
             WHERE billing_date >= CURRENT_DATE - $1 AND ($2::uuid IS NULL OR organization_id = $2)
             GROUP BY 1, 2, 3 ORDER BY 3, 1, 2",
        )
        .bind(days)
        .bind(org)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(
                |(organization_id, provider, day, micros, requests)| DailySpend {
                    organization_id,
                    provider,
                    day,
                    cost: MicroUsd::from_micros(micros),
                    requests,
                },
            )
            .collect())
    }

    /// The latest tier each organisation's jobs ran under.
    pub async fn org_tiers(&self) -> Result<BTreeMap<Uuid, String>, StoreError> {
        let rows: Vec<(Uuid, String)> = sqlx::query_as(
            "SELECT DISTINCT ON (organization_id) organization_id, tier FROM ai_cost_tracking
             WHERE organization_id IS NOT NULL AND tier IS NOT NULL ORDER BY organization_id, created_at DESC",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().collect())
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
