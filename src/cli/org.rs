//! `aiq org`: one organisation's data as a whole: export it, purge it (`crate::org_data`), each
//! with `--by NAME`, recorded with it in the audit log; and its limits at run time
//! (`set-limits`, `show`: `org_limits.rs`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;

use super::{print_json, process_env, shown};
use crate::config::{BudgetSettings, DatabaseSettings, QueueSettings};
use crate::domain::OrganizationId;
use crate::org_data::{self, Actor};
use crate::queue::Queue;
use crate::store::Store;

#[derive(Debug, Subcommand)]
pub(super) enum OrgAction {
    #[command(flatten)]
    Data(DataAction),
    #[command(flatten)]
    Limits(super::org_limits::LimitsAction),
}

/// The organisation's data as a whole.
#[derive(Debug, Subcommand)]
pub(super) enum DataAction {
    /// Write every row of the organisation, in every table, and its jobs in the queue to FILE
    /// as JSON lines.
    ///
    /// Written to FILE.partial, renamed to FILE when complete; run again after an interruption,
    /// it goes on from the partial file. Needs AIQ_DATABASE_URL and AIQ_REDIS_URL.
    Export {
        /// The organisation's id, as its rows hold it (lower-case UUID).
        #[arg(value_parser = org_id)]
        org: OrganizationId,
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Who runs this, for the audit log.
        #[arg(long, value_name = "NAME", value_parser = actor)]
        by: Actor,
    },
    /// Delete the organisation: its rows, waiting, delayed and dead jobs, outcomes, budget keys
    /// and webhook endpoints.
    ///
    /// Running jobs are left to finish (run the purge again once they have). Safe to run again:
    /// it removes what is left. Needs AIQ_DATABASE_URL and AIQ_REDIS_URL.
    Purge {
        #[arg(value_parser = org_id)]
        org: OrganizationId,
        /// Keep the organisation's cost rows (ai_cost_tracking), the ledger.
        #[arg(long)]
        keep_ledger: bool,
        /// Who runs this, for the audit log.
        #[arg(long, value_name = "NAME", value_parser = actor)]
        by: Actor,
        /// Print the counts as one JSON object.
        #[arg(long)]
        json: bool,
    },
}

fn org_id(s: &str) -> Result<OrganizationId, String> {
    OrganizationId::parse_canonical(s).map_err(|_| {
        format!(
            "{}: an organisation id is a lower-case UUID (8-4-4-4-12 hex digits, e.g. 0b6f1b3e-2a55-4a6e-9a43-2f6f6f1b2c3d)",
            shown(s)
        )
    })
}

fn actor(s: &str) -> Result<Actor, String> {
    Actor::parse(s)
}

pub(super) async fn org(action: OrgAction) -> anyhow::Result<()> {
    match action {
        OrgAction::Data(action) => data(action).await,
        OrgAction::Limits(action) => super::org_limits::limits(action).await,
    }
}

async fn data(action: DataAction) -> anyhow::Result<()> {
    let env = process_env();
    let db = DatabaseSettings::load(&env)?;
    let qs = QueueSettings::load(&env)?;
    let store = Store::connect(&db, 2, Duration::from_secs(10))
        .await
        .context("connecting to PostgreSQL (AIQ_DATABASE_URL)")?;
    let queue = Queue::connect(&qs)
        .await
        .context("connecting to Redis (AIQ_REDIS_URL)")?;
    match action {
        DataAction::Export { org, out, by } => {
            let s = org_data::export(&store, &queue, &org, &out, &by).await?;
            let rows: u64 = s.rows.values().sum();
            let jobs: u64 = s.queue.values().sum();
            println!(
                "exported organisation {org}: {rows} rows, {jobs} queue items to {}{}",
                shown(&out.display().to_string()),
                if s.resumed { " (resumed)" } else { "" }
            );
        }
        DataAction::Purge {
            org,
            keep_ledger,
            by,
            json,
        } => {
            let budget_settings = BudgetSettings::load(&env)?;
            let budget = crate::budget::Budget::connect(&qs.redis, &budget_settings)
                .await
                .context("connecting to Redis for the budget (AIQ_REDIS_URL)")?;
            let s = org_data::purge(&store, &queue, &budget, &org, keep_ledger, &by).await?;
            if json {
                return print_json(&s, false);
            }
            if !s.changed {
                println!("nothing to purge for organisation {org}");
            } else {
                for (table, n) in &s.rows {
                    println!("{table}: {n} rows deleted");
                }
                for (place, n) in &s.queue {
                    println!("queue {place}: {n} removed");
                }
                println!("budget keys: {} deleted", s.budget.deleted);
            }
            if keep_ledger {
                println!("ai_cost_tracking kept (--keep-ledger)");
            }
            if s.running > 0 {
                println!(
                    "{} jobs are still running: run the purge again once they have finished",
                    s.running
                );
            }
        }
    }
    Ok(())
}
