//! `aiq prune`: one retention pass now, by the `AIQ_RETAIN_*` settings (`crate::retention`).

use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use super::{print_json, process_env};
use crate::config::{self, RetentionSettings};

/// Runs one pass (or, `dry_run`, counts what it would remove) and prints what each part did:
/// a table, or one JSON line per part. Fails, changing nothing, when another process prunes.
pub(super) async fn prune(dry_run: bool, json: bool) -> anyhow::Result<()> {
    let env = process_env();
    let db = config::DatabaseSettings::load(&env)?;
    let retention = RetentionSettings::load(&env)?;
    let store = crate::store::Store::connect(&db, 2, Duration::from_secs(10))
        .await
        .context("connecting to PostgreSQL (AIQ_DATABASE_URL)")?;
    let done = crate::retention::pass(&store, &retention, dry_run, &CancellationToken::new())
        .await
        .context("pruning")??;
    for p in &done {
        if json {
            print_json(
                &serde_json::json!({
                    "table": p.table, "action": p.action, "days": p.days,
                    "rows": p.rows, "dry_run": dry_run,
                }),
                false,
            )?;
        } else if p.days == 0 {
            println!("{:<22} {:<20} kept (retention 0: never)", p.table, p.action);
        } else {
            let verb = if dry_run { "would be" } else { "were" };
            println!(
                "{:<22} {:<20} {} rows {verb} (older than {} days)",
                p.table, p.action, p.rows, p.days
            );
        }
    }
    Ok(())
}
