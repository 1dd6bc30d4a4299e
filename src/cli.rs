//! The `aiq` command line: one binary, one subcommand per job.
//!
//! What the commands print of Redis and PostgreSQL was written by apps (ids, reasons, payloads,
//! provider names): every such value goes through [`shown`] in text output, and JSON output
//! through [`print_json`], so no stored byte reaches the terminal as a control character.

use std::borrow::Cow;
use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::config::{self, Env, LogFormat, QueueSettings, Settings};
use crate::domain::{JobKind, OrganizationId, Tier};
use crate::queue::{NewJob, Queue};
use crate::redact;

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
    Enqueue {
        /// The job kind: vision.annotate or llm.complete.
        #[arg(long)]
        kind: String,
        /// The payload JSON inline; without it and --file, the payload is read from stdin.
        #[arg(long, conflicts_with = "file")]
        payload: Option<String>,
        /// A file holding the payload JSON.
        #[arg(long)]
        file: Option<PathBuf>,
        /// Your own job id; enqueueing the same id again does nothing.
        #[arg(long)]
        job_id: Option<String>,
        /// Run no earlier than this many milliseconds from now.
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
        /// A key that makes a repeated enqueue return the first job's id (kept AIQ_IDEMPOTENCY_TTL_S).
        #[arg(long)]
        idempotency_key: Option<String>,
        /// Executions before the dead set (0: AIQ_MAX_ATTEMPTS).
        #[arg(long, default_value_t = 0)]
        max_attempts: u32,
    },
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
}

#[derive(Debug, Subcommand)]
enum BudgetAction {
    /// An organisation's spend, holds and limits in today's and this month's windows, with the
    /// platform's.
    Show {
        org: uuid::Uuid,
        /// The organisation's tier, for its default limits (default: the tier of its latest cost).
        #[arg(long)]
        tier: Option<String>,
    },
    /// Set (or clear) an organisation's limit overrides in ai_cost_limits.
    SetLimit {
        org: uuid::Uuid,
        /// Daily limit in USD; omit to keep the tier default.
        #[arg(long)]
        daily_usd: Option<String>,
        /// Monthly limit in USD; omit to keep the tier default.
        #[arg(long)]
        monthly_usd: Option<String>,
    },
    /// Recompute the Redis counters of today and this month from ai_cost_tracking (after Redis
    /// lost its data). Holds of calls still running are kept.
    Rebuild,
}

#[derive(Debug, Subcommand)]
enum DlqAction {
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

async fn dlq(action: DlqAction) -> anyhow::Result<()> {
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
        Command::Run => run_daemon().await,
        Command::Migrate => {
            let db = config::DatabaseSettings::load(&process_env())?;
            crate::telemetry::init(
                LogFormat::Text,
                "warn",
                redact::url_passwords(db.url.expose()),
            );
            let wait = config::startup_wait(&process_env())?;
            let store = crate::store::Store::connect(&db, 2, wait)
                .await
                .context("connecting to PostgreSQL (AIQ_DATABASE_URL)")?;
            store.migrate().await?;
            println!("migrations applied");
            Ok(())
        }
        Command::Enqueue {
            kind,
            payload,
            file,
            job_id,
            delay_ms,
            idempotency_key,
            max_attempts,
        } => {
            let settings = QueueSettings::load(&process_env())?;
            let kind: JobKind = kind.parse()?;
            let payload = match (payload, file) {
                (Some(p), _) => p,
                (None, Some(f)) => std::fs::read_to_string(&f)
                    .with_context(|| format!("reading {}", f.display()))?,
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
        Command::Stats { json, watch } => {
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
                        let age =
                            stats.oldest_age_ms.get(tier).copied().unwrap_or(0) as f64 / 1000.0;
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
        Command::Dlq { action } => dlq(action).await,
        Command::Config { json } => {
            let settings = Settings::from_process_env()?;
            let eff = settings.effective();
            if json {
                let map: serde_json::Map<String, serde_json::Value> = eff
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), v.into()))
                    .collect();
                print_json(&serde_json::Value::Object(map), false)?;
            } else {
                for (k, v) in eff {
                    println!("{k}={}", shown(&v));
                }
                println!(
                    "# retry policy: {} attempts, delays full-jitter up to {} ms doubling from {} ms",
                    settings.retry.max_attempts,
                    settings.retry.cap.as_millis(),
                    settings.retry.base.as_millis()
                );
            }
            Ok(())
        }
        Command::Costs { org, days, json } => costs(org, days, json).await,
        Command::Budget { action } => budget(action).await,
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = term => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// The database and the budget settings, which the money commands need without a full daemon
/// configuration.
async fn money_env() -> anyhow::Result<(crate::store::Store, crate::config::BudgetSettings)> {
    let env = process_env();
    let db = config::DatabaseSettings::load(&env)?;
    let budget = config::BudgetSettings::load(&env)?;
    let store = crate::store::Store::connect(&db, 2, Duration::from_secs(10))
        .await
        .context("connecting to PostgreSQL (AIQ_DATABASE_URL)")?;
    Ok((store, budget))
}

async fn org_monthly_limit(
    store: &crate::store::Store,
    settings: &crate::config::BudgetSettings,
    org: uuid::Uuid,
    tier: Option<&str>,
) -> anyhow::Result<(crate::domain::MicroUsd, crate::domain::MicroUsd, String)> {
    let tier = match tier {
        Some(t) => t.to_owned(),
        None => store
            .org_tiers()
            .await?
            .get(&org)
            .cloned()
            .unwrap_or_else(|| "trial".into()),
    };
    let t: Tier = tier.parse()?;
    let (daily, monthly) = store.org_limit_overrides(org).await?;
    Ok((
        daily.unwrap_or(settings.org_daily[t.index()]),
        monthly.unwrap_or(settings.org_monthly[t.index()]),
        tier,
    ))
}

async fn costs(org: Option<uuid::Uuid>, days: i32, json: bool) -> anyhow::Result<()> {
    use std::collections::BTreeMap;
    let (store, settings) = money_env().await?;
    let rows = store.spend_by_day(org, days.max(1)).await?;
    let (_, _, today) = crate::budget::windows_at(chrono::Utc::now(), settings.timezone);
    // Per organisation and day, for the forecasts; the platform as a whole too.
    let mut by_org: BTreeMap<
        Option<uuid::Uuid>,
        BTreeMap<chrono::NaiveDate, crate::domain::MicroUsd>,
    > = BTreeMap::new();
    let mut platform: BTreeMap<chrono::NaiveDate, crate::domain::MicroUsd> = BTreeMap::new();
    for r in &rows {
        for map in [by_org.entry(r.organization_id).or_default(), &mut platform] {
            let e = map.entry(r.day).or_default();
            *e = e.checked_add(r.cost).unwrap_or(*e);
        }
    }
    let mut forecasts = Vec::new();
    for (o, days_spend) in &by_org {
        if let Some(o) = o {
            let (_, monthly, _) = org_monthly_limit(&store, &settings, *o, None).await?;
            forecasts.push(crate::budget::report::forecast(
                Some(*o),
                monthly,
                days_spend,
                today,
            ));
        }
    }
    if org.is_none() {
        forecasts.push(crate::budget::report::forecast(
            None,
            settings.global_monthly,
            &platform,
            today,
        ));
    }
    if json {
        print_json(
            &serde_json::json!({ "days": days, "spend": rows, "forecasts": forecasts }),
            false,
        )?;
        return Ok(());
    }
    println!(
        "{:<10} {:<38} {:<15} {:>9} {:>16}",
        "day", "organization", "provider", "requests", "cost"
    );
    for r in &rows {
        let o = r.organization_id.map_or("-".to_owned(), |o| o.to_string());
        println!(
            "{:<10} {:<38} {:<15} {:>9} {:>16}",
            r.day,
            o,
            shown(&r.provider),
            r.requests,
            r.cost.to_string()
        );
    }
    println!();
    println!(
        "{:<38} {:>14} {:>14} {:>14}  runs out",
        "monthly budget", "limit", "this month", "per day"
    );
    for f in &forecasts {
        let who = f
            .organization_id
            .map_or("platform".to_owned(), |o| o.to_string());
        let when = match (f.exhausted, f.runs_out_on) {
            (true, _) => "spent out".to_owned(),
            (false, Some(d)) => d.to_string(),
            (false, None) => "not this month at this rate".to_owned(),
        };
        println!(
            "{:<38} {:>14} {:>14} {:>14}  {when}",
            who,
            f.monthly_limit.to_string(),
            f.month_to_date.to_string(),
            f.daily_rate.to_string()
        );
    }
    Ok(())
}

async fn budget(action: BudgetAction) -> anyhow::Result<()> {
    let (store, settings) = money_env().await?;
    match action {
        BudgetAction::SetLimit {
            org,
            daily_usd,
            monthly_usd,
        } => {
            let parse = |v: Option<String>| {
                v.map(|v| crate::domain::MicroUsd::parse_usd(&v))
                    .transpose()
            };
            let (daily, monthly) = (parse(daily_usd)?, parse(monthly_usd)?);
            store.set_org_limits(org, daily, monthly).await?;
            println!(
                "organization {org}: daily {}, monthly {} (running daemons pick this up within 30 s)",
                daily.map_or("tier default".to_owned(), |d| d.to_string()),
                monthly.map_or("tier default".to_owned(), |m| m.to_string())
            );
            Ok(())
        }
        BudgetAction::Show { org, tier } => {
            let queue = QueueSettings::load(&process_env())?;
            let budget = crate::budget::Budget::connect(&queue.redis, &settings)
                .await
                .context("connecting to Redis (AIQ_REDIS_URL)")?;
            let (daily, monthly, tier) =
                org_monthly_limit(&store, &settings, org, tier.as_deref()).await?;
            let limits = crate::budget::OrgLimits { daily, monthly };
            let (scopes, _) = budget.scopes(org, limits, chrono::Utc::now());
            println!("organization {org} ({})", shown(&tier));
            println!(
                "{:<8} {:<12} {:<11} {:>14} {:>14} {:>14} {:>6}",
                "owner", "window", "", "spent", "held", "limit", "used"
            );
            for s in budget.state(&scopes).await? {
                let owner = if s.owner == "global" {
                    "platform"
                } else {
                    "org"
                };
                let used = if s.limit.micros() > 0 {
                    format!(
                        "{:.1}%",
                        s.spent.micros() as f64 * 100.0 / s.limit.micros() as f64
                    )
                } else {
                    "-".into()
                };
                println!(
                    "{:<8} {:<12} {:<11} {:>14} {:>14} {:>14} {:>6}",
                    owner,
                    shown(&s.window),
                    s.window_kind.as_str(),
                    s.spent.to_string(),
                    s.reserved.to_string(),
                    s.limit.to_string(),
                    used
                );
            }
            Ok(())
        }
        BudgetAction::Rebuild => {
            let queue = QueueSettings::load(&process_env())?;
            let budget = crate::budget::Budget::connect(&queue.redis, &settings)
                .await
                .context("connecting to Redis (AIQ_REDIS_URL)")?;
            let report = crate::budget::rebuild(&budget, &store).await?;
            println!("{}", shown(&report));
            Ok(())
        }
    }
}

async fn run_daemon() -> anyhow::Result<()> {
    let settings = Settings::from_process_env()?;
    crate::telemetry::init(settings.log_format, "info", settings.secrets());
    let _sentry = match &settings.sentry_dsn {
        Some(dsn) => Some(crate::observe::init_sentry(
            dsn.expose(),
            &settings.sentry_environment,
            settings.secrets(),
            settings.sentry_send_payloads,
        )?),
        None => None,
    };
    let (queue, store) = crate::worker::connect(&settings).await?;
    let app = crate::worker::app(&settings, store).await?;
    let shutdown = CancellationToken::new();
    let admin = crate::http::serve(
        settings.admin_addr,
        queue.clone(),
        app.clone(),
        shutdown.clone(),
    )
    .await?;
    tracing::info!(%admin, "admin port: /metrics /healthz /readyz");
    {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            shutdown_signal().await;
            tracing::info!("shutdown requested: no new jobs; finishing the running ones");
            crate::systemd::notify("STOPPING=1");
            shutdown.cancel();
        });
    }
    // Redis and PostgreSQL answered: ready.
    crate::systemd::notify("READY=1");
    crate::systemd::spawn_watchdog(shutdown.clone());
    let result = crate::worker::run(&settings, queue, app, shutdown).await;
    if let Err(e) = &result {
        tracing::error!(error = %format!("{e:#}"), "the daemon stopped on an error");
    }
    result
}
