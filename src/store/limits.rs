//! Organisations' limit overrides in ai_cost_limits: what `aiq org set-limits` writes, and what
//! every process reads back every few seconds (`crate::limits`) and per job (the dollar limits,
//! `jobs::plan`). NULL keeps the tier's default; for the counts, 0 means no limit.

use uuid::Uuid;

use super::{Store, StoreError};
use crate::domain::MicroUsd;

/// The most a dollar override can be: ai_cost_limits holds NUMERIC(12, 6).
pub const MAX_OVERRIDE_USD: MicroUsd = MicroUsd::from_micros(999_999_999_999);

/// An organisation's overrides; `None` keeps its tier's default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OrgOverrides {
    /// The most jobs leased at once across the fleet (0: no limit).
    pub max_in_flight: Option<u32>,
    /// Jobs per minute across the fleet (0: no limit).
    pub jobs_per_minute: Option<u32>,
    pub daily: Option<MicroUsd>,
    pub monthly: Option<MicroUsd>,
}

/// A change to an organisation's overrides, per field: `None` leaves it as it is, `Some(None)`
/// clears it (back to the tier's default), `Some(Some(v))` sets it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OverrideChange {
    pub max_in_flight: Option<Option<u32>>,
    pub jobs_per_minute: Option<Option<u32>>,
    pub daily: Option<Option<MicroUsd>>,
    pub monthly: Option<Option<MicroUsd>>,
}

/// The overrides that run time reads for every organisation at once: (organisation, jobs in
/// flight, jobs per minute).
pub type CountOverrides = Vec<(Uuid, Option<u32>, Option<u32>)>;

type Row = (Option<i32>, Option<i32>, Option<i64>, Option<i64>);

fn overrides(row: Option<Row>) -> OrgOverrides {
    let (f, r, d, m) = row.unwrap_or_default();
    let count = |n: Option<i32>| n.and_then(|n| u32::try_from(n).ok());
    OrgOverrides {
        max_in_flight: count(f),
        jobs_per_minute: count(r),
        daily: d.map(MicroUsd::from_micros),
        monthly: m.map(MicroUsd::from_micros),
    }
}

fn column(n: Option<u32>) -> Option<i32> {
    n.map(|n| i32::try_from(n).unwrap_or(i32::MAX))
}

impl Store {
    /// An organisation's overrides (all `None` without a row).
    pub async fn org_overrides(&self, org: Uuid) -> Result<OrgOverrides, StoreError> {
        let row: Option<Row> = sqlx::query_as(
            "SELECT max_in_flight, jobs_per_minute, (daily_limit_usd * 1000000)::bigint,
                    (monthly_limit_usd * 1000000)::bigint
             FROM ai_cost_limits WHERE organization_id = $1",
        )
        .bind(org)
        .fetch_optional(&self.pool)
        .await?;
        Ok(overrides(row))
    }

    /// Every organisation with a count override (jobs in flight or per minute): one row per
    /// organisation an operator limited, read whole every few seconds by every process.
    pub async fn count_overrides(&self) -> Result<CountOverrides, StoreError> {
        let rows: Vec<(Uuid, Option<i32>, Option<i32>)> = sqlx::query_as(
            "SELECT organization_id, max_in_flight, jobs_per_minute FROM ai_cost_limits
             WHERE max_in_flight IS NOT NULL OR jobs_per_minute IS NOT NULL",
        )
        .fetch_all(&self.pool)
        .await?;
        let count = |n: Option<i32>| n.and_then(|n| u32::try_from(n).ok());
        Ok(rows
            .into_iter()
            .map(|(org, f, r)| (org, count(f), count(r)))
            .collect())
    }

    /// Applies `change` to an organisation's overrides in one statement; returns them after it.
    pub async fn change_org_overrides(
        &self,
        org: Uuid,
        change: &OverrideChange,
    ) -> Result<OrgOverrides, StoreError> {
        let row: Row = sqlx::query_as(
            "INSERT INTO ai_cost_limits
               (organization_id, max_in_flight, jobs_per_minute, daily_limit_usd, monthly_limit_usd)
             VALUES ($1, $3, $5, $7::numeric / 1000000, $9::numeric / 1000000)
             ON CONFLICT (organization_id) DO UPDATE SET
               max_in_flight = CASE WHEN $2 THEN EXCLUDED.max_in_flight
                                    ELSE ai_cost_limits.max_in_flight END,
               jobs_per_minute = CASE WHEN $4 THEN EXCLUDED.jobs_per_minute
                                      ELSE ai_cost_limits.jobs_per_minute END,
               daily_limit_usd = CASE WHEN $6 THEN EXCLUDED.daily_limit_usd
                                      ELSE ai_cost_limits.daily_limit_usd END,
               monthly_limit_usd = CASE WHEN $8 THEN EXCLUDED.monthly_limit_usd
                                        ELSE ai_cost_limits.monthly_limit_usd END,
               updated_at = now()
             RETURNING max_in_flight, jobs_per_minute, (daily_limit_usd * 1000000)::bigint,
                       (monthly_limit_usd * 1000000)::bigint",
        )
        .bind(org)
        .bind(change.max_in_flight.is_some())
        .bind(column(change.max_in_flight.flatten()))
        .bind(change.jobs_per_minute.is_some())
        .bind(column(change.jobs_per_minute.flatten()))
        .bind(change.daily.is_some())
        .bind(change.daily.flatten().map(MicroUsd::micros))
        .bind(change.monthly.is_some())
        .bind(change.monthly.flatten().map(MicroUsd::micros))
        .fetch_one(&self.pool)
        .await?;
        Ok(overrides(Some(row)))
    }
}
