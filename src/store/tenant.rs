//! One organisation's rows, for `aiq org export` and `aiq org purge`, and the audit log of
//! operators' actions. [`ORG_TABLES`] is the one list of the tables that hold an organisation's
//! rows: adding a table is one line there. A table of the list that the database does not have
//! yet (a migration not applied) is skipped. Rows are read whole with `row_to_json`, so every
//! column is exported without naming it, in the order of a stable key, so an export cut short
//! goes on after the last key it wrote. Deletes go in bounded batches, each its own short
//! transaction.

use futures::TryStreamExt;
use uuid::Uuid;

use super::{Store, StoreError};

/// A table with an `organization_id` column, and the unique key its rows are read in order of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrgTable {
    pub name: &'static str,
    /// A unique column, for the order of the export and the batches of a purge.
    pub key: &'static str,
    /// Its SQL type, to compare a key read back from an export.
    pub key_type: &'static str,
}

const fn table(name: &'static str, key: &'static str, key_type: &'static str) -> OrgTable {
    OrgTable {
        name,
        key,
        key_type,
    }
}

/// Every table of an organisation's rows, in the order they are exported and purged (a message
/// before the endpoint it names). Platform-wide alerts have no organisation and stay.
pub const ORG_TABLES: &[OrgTable] = &[
    table("ai_processing_results", "id", "uuid"),
    table("ai_cost_tracking", "id", "uuid"),
    table("ai_processing_errors", "id", "uuid"),
    table("ai_usage", "id", "uuid"),
    table("ai_cost_alerts", "id", "uuid"),
    table("ai_cost_limits", "organization_id", "uuid"),
    table("ai_corrections", "id", "uuid"),
    table("webhook_outbox", "id", "text"),
    table("webhook_endpoints", "id", "uuid"),
];

/// The ledger: the cost rows `--keep-ledger` keeps.
pub const LEDGER_TABLE: &str = "ai_cost_tracking";

/// Tables with an `organization_id` column that are not an organisation's data: the audit log
/// records actions on organisations (a purge's own record must outlive it).
pub const NOT_ORG_DATA: &[&str] = &["aiq_audit_log"];

/// Sums of the ledger's rows, kept by its triggers (migration 20261203000016): not exported (the
/// cost rows are); a purge that deletes the cost rows folds them, and the sums it empties go.
pub const LEDGER_SUMS: &[&str] = &["aiq_spend_delta", "aiq_spend_day", "aiq_spend_month"];

/// Rows deleted per statement in a purge.
const DELETE_BATCH: i64 = 1000;

impl Store {
    /// The tables of [`ORG_TABLES`] this database has.
    pub async fn org_tables(&self) -> Result<Vec<OrgTable>, StoreError> {
        let names: Vec<String> = ORG_TABLES.iter().map(|t| t.name.to_owned()).collect();
        let present: Vec<String> = sqlx::query_scalar(
            "SELECT n FROM unnest($1::text[]) AS n WHERE to_regclass(n) IS NOT NULL",
        )
        .bind(&names)
        .fetch_all(&self.pool)
        .await?;
        Ok(ORG_TABLES
            .iter()
            .filter(|t| present.iter().any(|p| p == t.name))
            .copied()
            .collect())
    }

    /// Calls `each` with every row of `org` in `table` as JSON text, in the order of its key,
    /// after the key `after` when given; returns how many rows it read. One query, streamed.
    pub async fn org_rows<E>(
        &self,
        table: &OrgTable,
        org: Uuid,
        after: Option<&str>,
        mut each: impl FnMut(String) -> Result<(), E>,
    ) -> Result<Result<u64, E>, StoreError> {
        let OrgTable {
            name,
            key,
            key_type,
        } = table;
        // Names from ORG_TABLES only, never from input.
        let sql = format!(
            "SELECT row_to_json(t)::text FROM {name} t
             WHERE organization_id = $1 AND ($2::text IS NULL OR {key} > $2::{key_type})
             ORDER BY {key}"
        );
        let mut rows = sqlx::query_scalar::<_, String>(sqlx::AssertSqlSafe(sql))
            .bind(org)
            .bind(after)
            .fetch(&self.pool);
        let mut n = 0;
        while let Some(row) = rows.try_next().await? {
            if let Err(e) = each(row) {
                return Ok(Err(e));
            }
            n += 1;
        }
        Ok(Ok(n))
    }

    /// Deletes the rows of `org` in `table`, a bounded batch per statement; returns how many.
    pub async fn delete_org_rows(&self, table: &OrgTable, org: Uuid) -> Result<u64, StoreError> {
        let OrgTable { name, key, .. } = table;
        let sql = format!(
            "DELETE FROM {name} WHERE {key} IN
               (SELECT {key} FROM {name} WHERE organization_id = $1 LIMIT $2)"
        );
        let mut total = 0;
        loop {
            let n = sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
                .bind(org)
                .bind(DELETE_BATCH)
                .execute(&self.pool)
                .await?
                .rows_affected();
            total += n;
            if n == 0 {
                return Ok(total);
            }
        }
    }

    /// Tells every process that the webhook endpoints changed (a purge removed some).
    pub async fn notify_webhook_endpoints_changed(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT pg_notify($1, '')")
            .bind(super::webhooks::ENDPOINTS_CHANNEL)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Records an operator's action in the audit log; returns the row's id.
    pub async fn audit(
        &self,
        actor: &str,
        action: &str,
        organization_id: Option<Uuid>,
        details: &serde_json::Value,
    ) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar(
            "INSERT INTO aiq_audit_log (actor, action, organization_id, details)
             VALUES ($1, $2, $3, $4) RETURNING id",
        )
        .bind(actor)
        .bind(action)
        .bind(organization_id)
        .bind(details)
        .fetch_one(&self.pool)
        .await?)
    }
}
