//! `aiq dlq`: the dead set, each job with its reason and attempts.

use anyhow::{Context, bail};
use clap::Subcommand;

use super::{print_json, process_env, shown};
use crate::config::QueueSettings;
use crate::queue::Queue;

#[derive(Debug, Subcommand)]
pub(super) enum DlqAction {
    /// List dead jobs, newest first: id, kind, tier, organisation, attempts, reason.
    List {
        #[arg(long, default_value_t = 50)]
        limit: usize,
        #[arg(long, default_value_t = 0)]
        offset: usize,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Print everything the queue holds for one job, payload included.
    Show { id: String },
    /// Put dead jobs back into their tiers with their attempts reset.
    Retry {
        /// Job ids; or --all.
        ids: Vec<String>,
        #[arg(long, conflicts_with = "ids")]
        all: bool,
        /// Print {"count": N} instead of a sentence.
        #[arg(long)]
        json: bool,
    },
    /// Delete dead jobs for good.
    Purge {
        /// Job ids; or --all.
        ids: Vec<String>,
        #[arg(long, conflicts_with = "ids")]
        all: bool,
        /// Print {"count": N} instead of a sentence.
        #[arg(long)]
        json: bool,
    },
}

pub(super) async fn dlq(action: DlqAction) -> anyhow::Result<()> {
    let settings = QueueSettings::load(&process_env())?;
    let queue = Queue::connect(&settings)
        .await
        .context("connecting to Redis (AIQ_REDIS_URL)")?;
    match action {
        DlqAction::List {
            limit,
            offset,
            json,
        } => {
            let page = queue.dead_page(offset, limit).await?;
            if json {
                for d in &page {
                    print_json(d, false)?;
                }
            } else {
                println!(
                    "{:<38} {:<16} {:<20} {:<36} {:>3}  reason",
                    "id", "kind", "tier", "organization", "att"
                );
                for d in &page {
                    println!(
                        "{:<38} {:<16} {:<20} {:<36} {:>3}  {}",
                        shown(&d.id),
                        shown(&d.kind),
                        shown(&d.tier),
                        shown(&d.organization_id),
                        d.attempts,
                        shown(&d.reason)
                    );
                }
                println!(
                    "{} shown; {} dead in all",
                    page.len(),
                    queue.stats().await?.dead
                );
            }
        }
        DlqAction::Show { id } => {
            let fields = queue.job_fields(&id).await?;
            if fields.is_empty() {
                bail!(
                    "no job {id} in the queue (finished jobs leave Redis; see ai_processing_results)"
                );
            }
            print_json(&fields, true)?;
        }
        DlqAction::Retry { ids, all, .. } | DlqAction::Purge { ids, all, .. }
            if ids.is_empty() && !all =>
        {
            bail!("name the job ids, or pass --all");
        }
        DlqAction::Retry { ids, all, json } => {
            let n = if all {
                queue.dead_all(true).await?
            } else {
                queue.dead_retry(&ids).await?
            };
            if json {
                print_json(&serde_json::json!({ "count": n }), false)?;
            } else {
                println!("{n} dead jobs queued again");
            }
        }
        DlqAction::Purge { ids, all, json } => {
            let n = if all {
                queue.dead_all(false).await?
            } else {
                queue.dead_purge(&ids).await?
            };
            if json {
                print_json(&serde_json::json!({ "count": n }), false)?;
            } else {
                println!("{n} dead jobs purged");
            }
        }
    }
    Ok(())
}
