//! The budget alerts' outbox: a row per scope, window and threshold (its unique key makes each
//! alert once), claimed for delivery under a lease, marked delivered or failed.

use std::time::Duration;

use uuid::Uuid;

use super::{Store, StoreError};
use crate::domain::MicroUsd;

/// A budget alert to record.
#[derive(Debug, Clone)]
pub struct NewAlert {
    pub scope: String,
    pub organization_id: Option<Uuid>,
    pub window_kind: String,
    pub window_start: String,
    pub threshold: String,
    pub spent: MicroUsd,
    pub limit: Option<MicroUsd>,
    pub message: String,
}

/// An alert claimed for delivery.
#[derive(Debug, Clone)]
pub struct AlertRow {
    pub id: Uuid,
    pub message: String,
    pub threshold: String,
    pub delivery_attempts: i32,
}

impl Store {
    /// Records an alert unless the same (scope, window, threshold) already has one. Returns
    /// whether this call created it: across every process, exactly one does.
    pub async fn insert_alert(&self, a: &NewAlert) -> Result<bool, StoreError> {
        let inserted = sqlx::query(
            "INSERT INTO ai_cost_alerts (scope, organization_id, window_kind, window_start, threshold,
                spent_usd, limit_usd, message)
             VALUES ($1, $2, $3, $4, $5, $6::numeric / 1000000, $7::numeric / 1000000, $8)
             ON CONFLICT ON CONSTRAINT ai_cost_alerts_once DO NOTHING",
        )
        .bind(&a.scope)
        .bind(a.organization_id)
        .bind(&a.window_kind)
        .bind(&a.window_start)
        .bind(&a.threshold)
        .bind(a.spent.micros())
        .bind(a.limit.map(MicroUsd::micros))
        .bind(&a.message)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(inserted == 1)
    }

    /// Claims up to `n` undelivered alerts that are due, for `lease`: no other process claims
    /// them meanwhile, and a claim that is never finished comes due again after it.
    pub async fn claim_alerts(&self, n: i64, lease: Duration) -> Result<Vec<AlertRow>, StoreError> {
        let rows: Vec<(Uuid, String, String, i32)> = sqlx::query_as(
            "UPDATE ai_cost_alerts SET next_attempt_at = now() + make_interval(secs => $2)
             WHERE id IN (SELECT id FROM ai_cost_alerts
                          WHERE delivered_at IS NULL AND next_attempt_at <= now()
                          ORDER BY created_at LIMIT $1 FOR UPDATE SKIP LOCKED)
             RETURNING id, message, threshold, delivery_attempts",
        )
        .bind(n)
        .bind(lease.as_secs_f64())
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(id, message, threshold, attempts)| AlertRow {
                id,
                message,
                threshold,
                delivery_attempts: attempts,
            })
            .collect())
    }

    pub async fn alert_delivered(&self, id: Uuid) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE ai_cost_alerts SET delivered_at = now(), delivery_attempts = delivery_attempts + 1,
                last_delivery_error = NULL WHERE id = $1",
        )
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn alert_failed(
        &self,
        id: Uuid,
        error: &str,
        retry_in: Duration,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE ai_cost_alerts SET delivery_attempts = delivery_attempts + 1, last_delivery_error = $2,
                next_attempt_at = now() + make_interval(secs => $3) WHERE id = $1",
        )
        .bind(id)
        .bind(error)
        .bind(retry_in.as_secs_f64())
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}
