//! `aiq enqueue` and `aiq stats`: the queue as an operator sees it.

use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;

use super::{print_json, process_env, shown, shutdown_signal};
use crate::config::QueueSettings;
use crate::domain::{JobKind, OrganizationId, Tier};
use crate::queue::{NewJob, Queue};

// What `aiq enqueue` takes (its help is the `Enqueue` command's).
#[derive(Debug, clap::Args)]
pub(super) struct EnqueueArgs {
    /// The job kind: vision.annotate or llm.complete.
    #[arg(long)]
    pub kind: String,
    /// The payload JSON inline; without it and --file, the payload is read from stdin.
    #[arg(long, conflicts_with = "file")]
    pub payload: Option<String>,
    /// A file holding the payload JSON.
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// Your own job id; enqueueing the same id again does nothing.
    #[arg(long)]
    pub job_id: Option<String>,
    /// Run no earlier than this many milliseconds from now.
    #[arg(long, default_value_t = 0)]
    pub delay_ms: u64,
    /// A key that makes a repeated enqueue return the first job's id (kept AIQ_IDEMPOTENCY_TTL_S).
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// Executions before the dead set (0: AIQ_MAX_ATTEMPTS).
    #[arg(long, default_value_t = 0)]
    pub max_attempts: u32,
}

/// `aiq enqueue`: one job, its payload inline, from a file or from stdin; prints its id.
pub(super) async fn enqueue(args: EnqueueArgs) -> anyhow::Result<()> {
    let EnqueueArgs {
        kind,
        payload,
        file,
        job_id,
        delay_ms,
        idempotency_key,
        max_attempts,
    } = args;
    let settings = QueueSettings::load(&process_env())?;
    let kind: JobKind = kind.parse()?;
    let payload = match (payload, file) {
        (Some(p), _) => p,
        (None, Some(f)) => {
            std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?
        }
        (None, None) => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .context("reading the payload from stdin")?;
            s
        }
    };
    let doc: serde_json::Value =
        serde_json::from_str(&payload).context("the payload is not JSON")?;
    let tier: Tier = doc
        .get("tier")
        .and_then(|v| v.as_str())
        .context("the payload has no \"tier\"")?
        .parse()?;
    let org = OrganizationId::parse(
        doc.get("organization_id")
            .and_then(|v| v.as_str())
            .context("the payload has no \"organization_id\"")?,
    )?;
    let queue = Queue::connect(&settings)
        .await
        .context("connecting to Redis (AIQ_REDIS_URL)")?;
    let r = queue
        .enqueue(&NewJob {
            kind,
            tier,
            organization_id: org,
            payload,
            job_id,
            delay: Duration::from_millis(delay_ms),
            idempotency_key,
            max_attempts,
        })
        .await?;
    if r.duplicate {
        println!("{} (duplicate: already queued)", shown(&r.job_id));
    } else {
        println!("{}", shown(&r.job_id));
    }
    Ok(())
}

/// `aiq stats`: waiting jobs per tier, in flight, delayed, dead, running totals; `watch`
/// refreshes every so many seconds until SIGTERM or SIGINT.
pub(super) async fn stats(json: bool, watch: Option<u64>) -> anyhow::Result<()> {
    let settings = QueueSettings::load(&process_env())?;
    let queue = Queue::connect(&settings)
        .await
        .context("connecting to Redis (AIQ_REDIS_URL)")?;
    loop {
        let stats = queue.stats().await?;
        if watch.is_some() && !json {
            // Clear the terminal and go home, so the table refreshes in place.
            print!("\x1b[2J\x1b[H");
        }
        if json {
            print_json(&stats, false)?;
        } else {
            println!("{:<20} {:>10} {:>14}", "tier", "waiting", "oldest (s)");
            for (tier, n) in &stats.waiting {
                let age = stats.oldest_age_ms.get(tier).copied().unwrap_or(0) as f64 / 1000.0;
                println!("{:<20} {n:>10} {age:>14.1}", shown(tier));
            }
            println!(
                "in flight {}, delayed {}, dead {}",
                stats.inflight, stats.delayed, stats.dead
            );
            let c = |k: &str| stats.counters.get(k).copied().unwrap_or(0);
            println!(
                "totals: enqueued {}, done {}, retried {}, dead {}, deferred {}, interrupted {}",
                c("enqueued"),
                c("done"),
                c("retried"),
                c("dead"),
                c("deferred"),
                c("interrupted")
            );
        }
        match watch {
            None => return Ok(()),
            Some(secs) => {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(secs.max(1))) => {}
                    _ = shutdown_signal() => return Ok(()),
                }
            }
        }
    }
}
