//! `aiq enqueue`, `aiq stats` and `aiq job show|cancel`: the queue as an operator sees it.

use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;

use super::{NotFound, print_json, process_env, shown, shutdown_signal};
use crate::config::{self, QueueSettings};
use crate::domain::{JobKind, OrganizationId, Tier};
use crate::queue::events::{Cancel, JobState, JobStatus};
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

#[derive(Debug, clap::Subcommand)]
pub(super) enum JobAction {
    /// A job's status: its state (waiting, delayed with when and why, running, succeeded,
    /// failed, dead, cancelled), attempts, last error and, once finished, what it cost and took.
    ///
    /// Reads Redis, then PostgreSQL's result row (which outlives Redis's outcomes). An id
    /// known to neither prints "not found" and exits with status 3.
    Show {
        id: String,
        /// The job's organisation, for a job Redis no longer knows whose id two organisations
        /// used.
        #[arg(long)]
        org: Option<uuid::Uuid>,
        /// One JSON object, the shape of the clients' getJob / get_job.
        #[arg(long)]
        json: bool,
    },
    /// Cancel a waiting or delayed job (jobs/cancel.lua): it never runs and costs nothing.
    ///
    /// Prints cancelled, running (a worker has it: it finishes), finished or not found (exit
    /// status 3).
    Cancel { id: String },
}

pub(super) async fn job(action: JobAction) -> anyhow::Result<()> {
    let settings = QueueSettings::load(&process_env())?;
    let queue = Queue::connect(&settings)
        .await
        .context("connecting to Redis (AIQ_REDIS_URL)")?;
    match action {
        JobAction::Cancel { id } => match queue.cancel(&id).await? {
            Cancel::NotFound => Err(NotFound(id).into()),
            answer => {
                println!("{}", answer.as_str());
                Ok(())
            }
        },
        JobAction::Show { id, org, json } => {
            let status = show(&queue, &id, org).await?.ok_or(NotFound(id))?;
            if json {
                print_json(&status, false)
            } else {
                print_status(&status);
                Ok(())
            }
        }
    }
}

/// The status Redis holds, completed from PostgreSQL's row for a finished job (or made from it
/// alone once Redis has forgotten the job).
async fn show(
    queue: &Queue,
    id: &str,
    org: Option<uuid::Uuid>,
) -> anyhow::Result<Option<JobStatus>> {
    let status = queue.status(id).await?;
    if status.as_ref().is_some_and(|s| !s.state.is_terminal()) {
        return Ok(status);
    }
    let org = org.or_else(|| {
        status
            .as_ref()
            .and_then(|s| uuid::Uuid::parse_str(&s.organization_id).ok())
    });
    let rows = match store().await {
        Ok(store) => store.result_rows(org, id).await?,
        // Redis answered for the job: print what it knows, and say what is missing.
        Err(e) if status.is_some() => {
            eprintln!("aiq: PostgreSQL not read ({e:#}): the result summary is Redis's");
            return Ok(status);
        }
        Err(e) => return Err(e),
    };
    if rows.len() > 1 && status.is_none() {
        anyhow::bail!(
            "two organisations have a job {}: name one with --org",
            shown(id)
        );
    }
    Ok(crate::store::complete_status(
        status,
        id,
        rows.into_iter().next(),
    ))
}

async fn store() -> anyhow::Result<crate::store::Store> {
    let db = config::DatabaseSettings::load(&process_env())?;
    crate::store::Store::connect(&db, 1, Duration::from_secs(5))
        .await
        .context("connecting to PostgreSQL (AIQ_DATABASE_URL)")
}

fn print_status(s: &JobStatus) {
    let opt = |v: &Option<String>| {
        v.as_deref()
            .map_or("-".to_owned(), |t| shown(t).into_owned())
    };
    println!("job {}: {}", shown(&s.id), s.state.as_str());
    println!(
        "organization {}, tier {}, kind {}, attempts {}",
        shown(&s.organization_id),
        shown(&s.tier),
        shown(&s.kind),
        s.attempts
    );
    if s.state == JobState::Delayed {
        let due = s
            .due_at
            .and_then(chrono::DateTime::from_timestamp_millis)
            .map_or_else(|| "-".to_owned(), |t| t.to_rfc3339());
        println!("due at {due}, because: {}", opt(&s.delay_reason));
    }
    if let Some(at) = s
        .finished_at
        .and_then(chrono::DateTime::from_timestamp_millis)
    {
        println!("finished at {}", at.to_rfc3339());
    }
    if s.last_error.is_some() {
        println!("last error: {}", opt(&s.last_error));
    }
    if let Some(r) = &s.result {
        println!("result: {}", shown(&r.to_string()));
    }
}
