//! The `aiq` command line: one binary, one subcommand per job, one file per group of commands
//! (`daemon`: run, migrate; `jobs`: enqueue, stats, job show|cancel; `dlq`; `money`: costs,
//! budget; `settings`: config; `webhooks`; `org`: export, purge, set-limits, show; `prune`).
//!
//! What the commands print of Redis and PostgreSQL was written by apps (ids, reasons, payloads,
//! provider names): every such value goes through [`shown`] in text output, and JSON output
//! through [`print_json`], so no stored byte reaches the terminal as a control character.

mod daemon;
mod dlq;
mod jobs;
mod money;
mod org;
mod org_limits;
mod prune;
mod settings;
mod webhooks;

use std::borrow::Cow;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{self, Env};
use crate::redact;
use dlq::DlqAction;
use money::BudgetAction;
use webhooks::WebhooksAction;

#[derive(Debug, Parser)]
#[command(
    name = "aiq",
    version,
    about = "Runs paid AI jobs (Google Vision, LLMs) from Redis by subscription tier and records them in PostgreSQL",
    long_about = "aiq takes AI jobs that apps put into Redis, in order of the customer's subscription tier, \
calls Google Cloud Vision or an LLM, and writes results, costs and errors to PostgreSQL.\n\n\
Settings come from AIQ_* environment variables; .env.example lists them all."
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon: take jobs from Redis by tier and process them until SIGTERM or SIGINT.
    ///
    /// Needs AIQ_REDIS_URL and AIQ_DATABASE_URL (and provider keys for the jobs you run).
    /// On SIGTERM it stops fetching, lets running jobs finish within AIQ_SHUTDOWN_GRACE_MS and
    /// returns the rest to the queue.
    Run,
    /// Apply the database migrations to AIQ_DATABASE_URL (safe to run again).
    Migrate,
    /// Put one job into the queue and print its id.
    ///
    /// The payload is a JSON document of the kind's schema (jobs/schema/); its `tier` and
    /// `organization_id` decide where it queues. Needs AIQ_REDIS_URL.
    Enqueue(jobs::EnqueueArgs),
    /// Print queue depth per tier, in-flight, delayed and dead jobs.
    Stats {
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
        /// Refresh every N seconds until interrupted.
        #[arg(long, value_name = "SECONDS", num_args = 0..=1, default_missing_value = "2")]
        watch: Option<u64>,
    },
    /// Spend per organisation, provider and day, and when each monthly budget runs out.
    ///
    /// Reads ai_cost_tracking (the same rows get_cost_analysis() sums). Needs AIQ_DATABASE_URL.
    Costs {
        /// Only this organisation.
        #[arg(long)]
        org: Option<uuid::Uuid>,
        /// How many days back.
        #[arg(long, default_value_t = 30)]
        days: i32,
        /// One JSON object instead of tables (amounts in integer micro-USD).
        #[arg(long)]
        json: bool,
    },
    /// Look at and manage the budget counters and limits.
    Budget {
        #[command(subcommand)]
        action: BudgetAction,
    },
    /// Print the effective settings (defaults filled in, secrets masked) and check them.
    Config {
        /// One JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Inspect and act on the dead set: jobs that failed for good, with their reasons.
    Dlq {
        #[command(subcommand)]
        action: DlqAction,
    },
    /// Manage an organisation's webhook endpoints (signed Standard Webhooks of jobs' final
    /// states). Needs AIQ_DATABASE_URL.
    Webhooks {
        #[command(subcommand)]
        action: WebhooksAction,
    },
    /// One organisation: export or purge its data, set or show its limits at run time.
    Org {
        #[command(subcommand)]
        action: org::OrgAction,
    },
    /// Prune old data now, by the AIQ_RETAIN_* settings (one pass; skipped with an error
    /// while another process prunes). Needs AIQ_DATABASE_URL.
    Prune {
        /// Count what would be removed; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// One JSON line of counts per table and action.
        #[arg(long)]
        json: bool,
    },
    /// One job: its status, or cancel it.
    Job {
        #[command(subcommand)]
        action: jobs::JobAction,
    },
}

/// An id that names no job: the commands print "not found" and exit with status 3.
#[derive(Debug, thiserror::Error)]
#[error("not found: {}", shown(.0))]
struct NotFound(String);

/// One value of a text report, its control characters escaped (`redact::terminal`): a value
/// must not move the cursor, recolour the terminal or start a line of its own. The report's own
/// separators and line breaks are written around it.
fn shown(value: &str) -> Cow<'_, str> {
    redact::terminal(value)
}

/// Prints one JSON document on a line (`pretty`: indented), with DEL, C1 and the bidirectional
/// controls escaped too (serde_json escapes only C0).
fn print_json(value: &impl serde::Serialize, pretty: bool) -> anyhow::Result<()> {
    let text = if pretty {
        serde_json::to_string_pretty(value)?
    } else {
        serde_json::to_string(value)?
    };
    println!("{}", redact::json(text));
    Ok(())
}

fn process_env() -> Env<impl Fn(&str) -> Option<String>> {
    Env(config::process_lookup)
}

/// Parses the command line and runs it. Errors print as one line naming what went wrong.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // One TLS stack for the whole process (Redis, PostgreSQL, the providers): see `tls`.
    crate::tls::install_crypto_provider();
    // A report piped into `head` must end quietly when the pipe closes, not panic on the write:
    // the commands that print and exit take SIGPIPE's default (the shell sees status 141). The
    // daemon and the long-running tools keep Rust's default of ignoring it (sockets).
    if !matches!(cli.command, Command::Run) {
        // SAFETY: setting a signal's disposition to its default, before any thread is started.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("aiq: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let code = if e.downcast_ref::<config::ConfigError>().is_some() {
                2
            } else if e.downcast_ref::<NotFound>().is_some() {
                3
            } else {
                1
            };
            // An error may quote a URL it could not reach, or a value read from Redis.
            let text = format!("{e:#}");
            eprintln!("aiq: {}", shown(&redact::url(&text)));
            ExitCode::from(code)
        }
    }
}

async fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run => daemon::run_daemon().await,
        Command::Migrate => daemon::migrate().await,
        Command::Enqueue(args) => jobs::enqueue(args).await,
        Command::Stats { json, watch } => jobs::stats(json, watch).await,
        Command::Dlq { action } => dlq::dlq(action).await,
        Command::Prune { dry_run, json } => prune::prune(dry_run, json).await,
        Command::Job { action } => jobs::job(action).await,
        Command::Config { json } => settings::print(json),
        Command::Costs { org, days, json } => money::costs(org, days, json).await,
        Command::Budget { action } => money::budget(action).await,
        Command::Webhooks { action } => webhooks::webhooks(action).await,
        Command::Org { action } => org::org(action).await,
    }
}

/// Resolves on SIGTERM or SIGINT.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{SignalKind, signal};
    // Registered when called, not when first awaited: a signal that comes in between is kept,
    // not left to its default action (which kills the process).
    let term = signal(SignalKind::terminate()).ok();
    let int = signal(SignalKind::interrupt()).ok();
    async move {
        let wait = |s: Option<tokio::signal::unix::Signal>| async move {
            match s {
                Some(mut s) => {
                    s.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = wait(term) => {}
            _ = wait(int) => {}
        }
    }
}
