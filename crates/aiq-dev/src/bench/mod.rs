//! `aiq-dev bench <scenario>`: benchmarks that start their own redis-server, PostgreSQL and fake
//! providers, print their figures and the machine they ran on, and with `--json` end with one
//! JSON line per scenario. They check that the work was done (every job drained, every row
//! written) and fail otherwise; how fast is a figure to print, never an assertion.
//!
//! 1. `queue`: enqueue one job per call (64 in flight) and in batches of 1,000 (one pipelined
//!    round trip each), then no-op processing by one apalis worker (concurrency 100), over six
//!    tiers. `--redis-url` runs it against a given Redis (the BullMQ side-by-side does).
//! 2. `pipeline`: the whole path with the fake providers at 0 ms: fetch, decode, reserve, call,
//!    settle, rows in PostgreSQL, ack.
//! 3. `inflight`: the fake providers (their own process) at 2 s latency and 10,000 jobs in
//!    flight in this process: throughput, peak RSS, CPU per job.
//! 4. `priority`: an enterprise_plus job's wait behind 100,000 trial jobs while a worker drains
//!    them, and the tier shares with every tier backlogged.
//! 5. `budget`: 500 jobs over three `aiq run` processes against a budget with room for 100:
//!    the overspend in micro-USD.
//! 6. `bodies`: 100 OpenAI jobs at once, each answered with a valid 20 MB body, through one
//!    `aiq run` process with a 256 MB budget for answers (and with one large enough for all):
//!    peak RSS.
//! 7. `events`: the time from a no-op job's settle to its `succeeded` event being read by a
//!    blocked XREAD reader (p50, p99), and the no-op processing rate with events off and on.
//! 8. `prune`: the `pipeline` load without pruning, then while a retention pass works through
//!    1,000,000 old result rows: both rates, their ratio, and the rows the pass removed against
//!    the rows the settings say should go.
//! 9. `console`: 1,000,000 waiting jobs (plus dead and delayed ones) behind one `aiq run`
//!    with console tokens; each console page fetched 200 times while signed in: p50, p99, max.

mod console;
mod events;
mod full;
mod prune;
mod queue;

use std::collections::HashMap;
use std::io::Write;
use std::time::Duration;

use aiq_testkit::local::{every_tier, provider_vars};
use anyhow::Context;
use serde_json::{Map, Value, json};

use aiq::config::{Env, Settings};
use aiq::domain::{JobKind, OrganizationId, Tier};
use aiq::queue::NewJob;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    Queue,
    Pipeline,
    Inflight,
    Priority,
    Budget,
    Bodies,
    Events,
    Prune,
    Console,
    /// Every scenario, one after the other.
    All,
}

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub scenario: Scenario,
    pub json: bool,
    /// Smaller sizes, to check that the scenarios work (CI runs this).
    pub quick: bool,
    /// `queue` only: use this Redis instead of starting one.
    pub redis_url: Option<String>,
    /// Overrides the scenario's job count.
    pub jobs: Option<usize>,
}

/// One scenario's figures, printed as they come and, with `--json`, as one JSON line at the end.
pub(crate) struct Report {
    json: bool,
    scenario: &'static str,
    figures: Map<String, Value>,
}

impl Report {
    fn new(scenario: &'static str, json: bool) -> Self {
        Self {
            json,
            scenario,
            figures: Map::new(),
        }
    }

    /// A line for people: on stdout, or on stderr when stdout carries the JSON.
    pub(crate) fn say(&self, line: impl AsRef<str>) {
        let line = line.as_ref();
        if self.json {
            eprintln!("{line}");
        } else {
            println!("{line}");
            let _ = std::io::stdout().flush();
        }
    }

    pub(crate) fn figure(&mut self, name: &str, value: impl Into<Value>) {
        self.figures.insert(name.to_owned(), value.into());
    }

    fn finish(self, machine: &Value) {
        if self.json {
            println!(
                "{}",
                json!({ "scenario": self.scenario, "machine": machine, "figures": self.figures })
            );
        }
    }
}

pub async fn run(opts: BenchOptions) -> anyhow::Result<()> {
    let machine = machine();
    let say = |l: String| {
        if opts.json {
            eprintln!("{l}");
        } else {
            println!("{l}");
        }
    };
    say(format!(
        "machine: {} x {}, {:.1} GiB, Linux {}; aiq {} ({} build){}",
        machine["cpus"],
        machine["cpu_model"].as_str().unwrap_or("?"),
        machine["memory_gib"].as_f64().unwrap_or(0.0),
        machine["kernel"].as_str().unwrap_or("?"),
        env!("CARGO_PKG_VERSION"),
        machine["build"].as_str().unwrap_or("?"),
        if opts.quick { "; quick sizes" } else { "" }
    ));
    let scenarios: Vec<Scenario> = match opts.scenario {
        Scenario::All => vec![
            Scenario::Queue,
            Scenario::Priority,
            Scenario::Pipeline,
            Scenario::Inflight,
            Scenario::Budget,
            Scenario::Bodies,
            Scenario::Events,
            Scenario::Prune,
            Scenario::Console,
        ],
        s => vec![s],
    };
    for s in scenarios {
        let (name, report) = match s {
            Scenario::Queue => ("queue", queue::queue(&opts).await),
            Scenario::Priority => ("priority", queue::priority(&opts).await),
            Scenario::Pipeline => ("pipeline", full::pipeline(&opts).await),
            Scenario::Inflight => ("inflight", full::inflight(&opts).await),
            Scenario::Budget => ("budget", full::budget(&opts).await),
            Scenario::Bodies => ("bodies", full::bodies(&opts).await),
            Scenario::Events => ("events", events::events(&opts).await),
            Scenario::Prune => ("prune", prune::prune(&opts).await),
            Scenario::Console => ("console", console::console(&opts).await),
            Scenario::All => unreachable!("expanded above"),
        };
        report
            .with_context(|| format!("the {name} scenario failed"))?
            .finish(&machine);
    }
    Ok(())
}

/// What the figures were measured on.
fn machine() -> Value {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let cpu_model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(str::trim)
        .unwrap_or("unknown")
        .to_owned();
    let mem_kib: f64 = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    json!({
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "cpu_model": cpu_model,
        "memory_gib": (mem_kib / 1_048_576.0 * 10.0).round() / 10.0,
        "kernel": read("/proc/sys/kernel/osrelease").trim(),
        "build": if cfg!(debug_assertions) { "debug" } else { "release" },
    })
}

/// Settings from a list of variables, as `aiq run` would read them from its environment.
pub(crate) fn settings(vars: &[(&str, String)]) -> anyhow::Result<Settings> {
    let map: HashMap<&str, String> = vars.iter().cloned().collect();
    Settings::load(&Env(|k| map.get(k).cloned())).context("benchmark settings")
}

/// Variables shared by the scenarios that run the whole daemon: no per-organisation job rate
/// (the scenarios put thousands of jobs on a few organisations), no admin port.
pub(crate) fn daemon_vars(
    redis_url: &str,
    database_url: &str,
    fake: &str,
) -> Vec<(&'static str, String)> {
    let mut vars = vec![
        ("AIQ_REDIS_URL", redis_url.to_owned()),
        ("AIQ_DATABASE_URL", database_url.to_owned()),
        ("AIQ_ORG_JOBS_PER_MINUTE", every_tier("0")),
        ("AIQ_LOG_FORMAT", "text".into()),
        ("AIQ_ADMIN_ADDR", "127.0.0.1:0".into()),
    ];
    vars.extend(provider_vars(fake, "bench"));
    vars
}

/// The organisation a benchmark job bills: 50 of them, so the budget's keys spread.
pub(crate) fn org(i: usize) -> OrganizationId {
    OrganizationId::from(uuid::Uuid::from_u128(
        0x0000_0000_0000_4000_8000_0000_0000_0000 | (i % 50) as u128,
    ))
}

/// An LLM job for `tier`, billed to one of 50 organisations, rotating over the three LLM
/// providers.
pub(crate) fn llm_job(tier: Tier, i: usize) -> NewJob {
    let org = org(i);
    let (provider, model) = match i % 3 {
        0 => ("openai", "gpt-4o-mini"),
        1 => ("anthropic", "claude-haiku-4-5"),
        _ => ("gemini", "gemini-2.5-flash"),
    };
    new_job(
        JobKind::LlmComplete,
        tier,
        org,
        json!({
            "version": 1, "organization_id": org.to_string(), "tier": tier.as_str(),
            "provider": provider, "model": model,
            "messages": [{ "role": "user", "content": format!("Caption photo {i}.") }],
            "max_tokens": 32
        })
        .to_string(),
    )
}

/// A job to run now with the daemon's default attempts.
pub(crate) fn new_job(kind: JobKind, tier: Tier, org: OrganizationId, payload: String) -> NewJob {
    NewJob {
        kind,
        tier,
        organization_id: org,
        payload,
        job_id: None,
        delay: Duration::ZERO,
        idempotency_key: None,
        max_attempts: 0,
    }
}

/// Waits until the queue holds nothing waiting, in flight or delayed and has finished `n` jobs
/// (acknowledged or dead: the flusher has written their outcomes), looking every `poll`. Returns
/// the most leases it saw held at once.
pub(crate) async fn wait_drained(
    q: &aiq::queue::Queue,
    n: u64,
    poll: Duration,
    timeout: Duration,
) -> anyhow::Result<u64> {
    let deadline = std::time::Instant::now() + timeout;
    let mut peak_inflight = 0;
    loop {
        let s = q.stats().await?;
        peak_inflight = s.inflight.max(peak_inflight);
        let left = s.waiting.values().sum::<u64>() + s.inflight + s.delayed;
        if left == 0 && s.counters.get("done").copied().unwrap_or(0) + s.dead >= n {
            return Ok(peak_inflight);
        }
        if std::time::Instant::now() > deadline {
            anyhow::bail!("not drained within {timeout:?}: {left} jobs left, {s:?}");
        }
        tokio::time::sleep(poll).await;
    }
}

/// Per second, rounded.
pub(crate) fn rate(n: usize, took: Duration) -> u64 {
    (n as f64 / took.as_secs_f64().max(1e-9)).round() as u64
}

/// 12,345 for people.
pub(crate) fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn thousands_are_grouped() {
        assert_eq!(super::thousands(0), "0");
        assert_eq!(super::thousands(999), "999");
        assert_eq!(super::thousands(1_000), "1,000");
        assert_eq!(super::thousands(1_234_567), "1,234,567");
    }
}
