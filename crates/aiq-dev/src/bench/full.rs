//! The scenarios that run the whole daemon: `pipeline`, `inflight` and `budget`.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use tokio_util::sync::CancellationToken;

use super::{
    BenchOptions, Report, daemon_vars, llm_job, new_job, org, rate, settings, thousands,
    wait_drained,
};
use aiq::config::Settings;
use aiq::domain::{JobKind, MicroUsd, Tier};
use aiq::jobs::App;
use aiq::queue::{NewJob, Queue};
use aiq::store::Store;
use aiq_testkit::fake::{FakeOptions, FakeProviders};
use aiq_testkit::localsvc::{LocalPostgres, LocalRedis, free_port};

/// Redis, PostgreSQL (migrated) and the settings of a daemon on them.
pub(crate) struct World {
    _redis: LocalRedis,
    _pg: LocalPostgres,
    pub(crate) settings: Settings,
    pub(crate) queue: Queue,
    pub(crate) store: Store,
}

pub(crate) async fn world(
    fake_url: &str,
    extra: &[(&'static str, String)],
) -> anyhow::Result<World> {
    let redis = LocalRedis::start("bench")?;
    let pg = LocalPostgres::start("bench")?;
    let mut vars = daemon_vars(&redis.url(), &pg.url("postgres"), fake_url);
    vars.extend(extra.iter().cloned());
    let settings = settings(&vars)?;
    let (queue, store) = aiq::worker::connect(&settings).await?;
    store.migrate().await.context("migrating")?;
    Ok(World {
        _redis: redis,
        _pg: pg,
        settings,
        queue,
        store,
    })
}

async fn enqueue_all(q: &Queue, jobs: Vec<NewJob>) -> anyhow::Result<()> {
    for batch in jobs.chunks(1000) {
        for r in q.enqueue_batch(batch).await? {
            r?;
        }
    }
    Ok(())
}

/// Runs the daemon's worker in this process until `stop` fires.
fn spawn_worker(
    w: &World,
    app: Arc<App>,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<anyhow::Result<()>> {
    let (settings, queue) = (w.settings.clone(), w.queue.clone());
    tokio::spawn(async move { aiq::worker::run(&settings, queue, app, stop).await })
}

/// Checks the rows of `n` succeeded jobs: one result, one cost row and one usage row each.
async fn check_rows(r: &Report, store: &Store, n: usize) -> anyhow::Result<()> {
    let rows = store.row_counts().await?;
    r.say(format!(
        "  rows: {} ai_processing_results, {} ai_cost_tracking, {} ai_usage, {} ai_processing_errors",
        rows.ai_processing_results, rows.ai_cost_tracking, rows.ai_usage, rows.ai_processing_errors
    ));
    ensure!(
        rows.ai_processing_results == n as i64
            && rows.ai_cost_tracking == n as i64
            && rows.ai_usage == n as i64
            && rows.ai_processing_errors == 0,
        "expected {n} result, cost and usage rows and no errors: {rows:?}"
    );
    Ok(())
}

/// Enqueues `n` LLM jobs (the `pipeline` load), runs the worker until they are done (`done`
/// jobs ran before) and stops it: the jobs per second and the time it took.
pub(crate) async fn run_llm_jobs(
    w: &World,
    n: usize,
    done: usize,
) -> anyhow::Result<(u64, Duration)> {
    enqueue_all(
        &w.queue,
        (0..n)
            .map(|i| llm_job(Tier::ALL[i % 6], done + i))
            .collect(),
    )
    .await?;
    let app = aiq::worker::app(&w.settings, w.store.clone()).await?;
    let stop = CancellationToken::new();
    let start = Instant::now();
    let worker = spawn_worker(w, app, stop.clone());
    wait_drained(
        &w.queue,
        (done + n) as u64,
        Duration::from_millis(10),
        Duration::from_secs(900),
    )
    .await?;
    let took = start.elapsed();
    stop.cancel();
    worker.await??;
    Ok((rate(n, took), took))
}

pub(crate) async fn pipeline(opts: &BenchOptions) -> anyhow::Result<Report> {
    let mut r = Report::new("pipeline", opts.json);
    let n = opts.jobs.unwrap_or(if opts.quick { 2_000 } else { 30_000 });
    let concurrency = 100;
    let fake = FakeProviders::start(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
    let w = world(
        &fake.base_url(),
        &[
            ("AIQ_QUEUE_PREFIX", "bench-pipeline".into()),
            ("AIQ_CONCURRENCY", concurrency.to_string()),
        ],
    )
    .await?;
    r.say(format!(
        "pipeline: {} LLM jobs (openai, anthropic, gemini; six tiers; 50 organisations), fake providers at 0 ms, concurrency {concurrency}",
        thousands(n as u64)
    ));
    let (per_s, took) = run_llm_jobs(&w, n, 0).await?;
    r.say(format!(
        "  {} jobs/s through the whole path ({:.1} s): decode, budget reserve, provider call, rows in PostgreSQL, budget settle, ack",
        thousands(per_s),
        took.as_secs_f64()
    ));
    check_rows(&r, &w.store, n).await?;
    r.figure("jobs", n);
    r.figure("concurrency", concurrency);
    r.figure("jobs_per_s", per_s);
    Ok(r)
}

/// CPU time a process has used (user + system), from /proc.
fn process_cpu(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    // utime and stime are fields 14 and 15 of stat(5), 12 and 13 after the name.
    Duration::from_secs_f64((ticks(11) + ticks(12)) as f64 / hz)
}

/// A process's peak resident set size (VmHWM), in MiB.
fn peak_rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

/// `aiq-dev fake-providers` in a process of its own, so its CPU and memory are not counted as aiq's.
struct FakeProcess {
    child: Child,
    url: String,
}

impl FakeProcess {
    async fn start(latency_ms: u64) -> anyhow::Result<Self> {
        Self::start_with(latency_ms, &[]).await
    }

    async fn start_with(latency_ms: u64, extra: &[&str]) -> anyhow::Result<Self> {
        let port = free_port()?;
        let mut cmd = Command::new(std::env::current_exe()?);
        // It dies with the benchmark, even one killed with Ctrl-C or SIGKILL.
        aiq_testkit::localsvc::die_with_parent(&mut cmd, libc::SIGTERM);
        let child = cmd
            .args([
                "fake-providers",
                "--addr",
                &format!("127.0.0.1:{port}"),
                "--latency-ms",
                &latency_ms.to_string(),
            ])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting aiq-dev fake-providers")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            if Instant::now() > deadline {
                bail!("the fake providers did not listen on port {port}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
        })
    }
}

impl Drop for FakeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) async fn inflight(opts: &BenchOptions) -> anyhow::Result<Report> {
    let mut r = Report::new("inflight", opts.json);
    let (concurrency, n) = if opts.quick {
        (1_000, opts.jobs.unwrap_or(3_000))
    } else {
        (10_000, opts.jobs.unwrap_or(30_000))
    };
    let latency_ms = 2_000;
    let fake = FakeProcess::start(latency_ms).await?;
    let extra = [
        ("AIQ_QUEUE_PREFIX", "bench-inflight".to_owned()),
        ("AIQ_CONCURRENCY", concurrency.to_string()),
        ("AIQ_FETCH_BATCH", "1000".to_owned()),
    ];
    let w = world(&fake.url, &extra).await?;
    r.say(format!(
        "inflight: {} LLM jobs, fake providers (own process) answering after {latency_ms} ms, one `aiq run` process at concurrency {}",
        thousands(n as u64),
        thousands(concurrency as u64)
    ));
    enqueue_all(
        &w.queue,
        (0..n).map(|i| llm_job(Tier::ALL[i % 6], i)).collect(),
    )
    .await?;
    let run = drain_in_daemon(&w, &fake.url, &extra, n, Duration::from_millis(100)).await?;
    let (peak_inflight, took, cpu, rss) = (run.peak_inflight, run.took, run.cpu, run.rss_mib);
    let per_s = rate(n, took);
    let cpu_us_per_job = cpu.as_secs_f64() * 1e6 / n as f64;
    r.say(format!(
        "  {} jobs/s ({:.1} s); at most {} leases held at once",
        thousands(per_s),
        took.as_secs_f64(),
        thousands(peak_inflight)
    ));
    r.say(format!(
        "  the aiq run process: peak RSS {rss:.0} MiB, CPU {:.1} s in all = {cpu_us_per_job:.0} us per job",
        cpu.as_secs_f64()
    ));
    check_rows(&r, &w.store, n).await?;
    r.figure("jobs", n);
    r.figure("concurrency", concurrency);
    r.figure("provider_latency_ms", latency_ms);
    r.figure("jobs_per_s", per_s);
    r.figure("peak_inflight", peak_inflight);
    r.figure("peak_rss_mib", rss.round());
    r.figure("cpu_us_per_job", cpu_us_per_job.round());
    Ok(r)
}

/// `bodies`: OpenAI jobs all in flight at once whose answers are each `mb` MB (valid ones, with
/// their length), through one `aiq run` process whose memory budget for answers is
/// `AIQ_RESPONSE_MEMORY_MB`: its peak RSS, under the budget and, in the full run, with a budget
/// large enough for every answer at once.
pub(crate) async fn bodies(opts: &BenchOptions) -> anyhow::Result<Report> {
    let mut r = Report::new("bodies", opts.json);
    let (n, mb, budgets): (usize, u64, &[u64]) = if opts.quick {
        (opts.jobs.unwrap_or(10), 4, &[16])
    } else {
        (opts.jobs.unwrap_or(100), 20, &[256, 65_536])
    };
    let fake = FakeProcess::start_with(0, &["--answer-mb", &mb.to_string()]).await?;
    r.say(format!(
        "bodies: {n} OpenAI jobs at once, each answered with a valid {mb} MB body (fake providers in their own process), one `aiq run` process"
    ));
    for (k, budget) in budgets.iter().enumerate() {
        let extra = [
            ("AIQ_QUEUE_PREFIX", format!("bench-bodies-{k}")),
            ("AIQ_CONCURRENCY", n.to_string()),
            ("AIQ_MAX_RESPONSE_MB", (mb * 2).min(*budget).to_string()),
            ("AIQ_RESPONSE_MEMORY_MB", budget.to_string()),
        ];
        let w = world(&fake.url, &extra).await?;
        // Every third bench job is an OpenAI one.
        enqueue_all(
            &w.queue,
            (0..n).map(|i| llm_job(Tier::ALL[i % 6], i * 3)).collect(),
        )
        .await?;
        let run = drain_in_daemon(&w, &fake.url, &extra, n, Duration::from_millis(50)).await?;
        let (took, rss) = (run.took, run.rss_mib);
        r.say(format!(
            "  AIQ_RESPONSE_MEMORY_MB={budget}: peak RSS {rss:.0} MiB ({:.0} MB of answers in all), {:.1} s",
            (n as u64 * mb) as f64,
            took.as_secs_f64()
        ));
        check_rows(&r, &w.store, n).await?;
        if k == 0 {
            r.figure("jobs", n);
            r.figure("answer_mb", mb);
            r.figure("response_memory_mb", *budget);
            r.figure("peak_rss_mib", rss.round());
            r.figure("jobs_per_s", rate(n, took));
        } else {
            r.figure("unbounded_peak_rss_mib", rss.round());
        }
    }
    Ok(r)
}

/// What one `aiq run` process took to drain the queue.
struct DaemonRun {
    peak_inflight: u64,
    took: Duration,
    cpu: Duration,
    rss_mib: f64,
}

/// Runs one `aiq run` process, as systemd runs it (systemd/aiq.service sets the same allocator
/// option), on the world's settings plus `extra` until `n` jobs are done, polling the queue
/// every `poll` (slowly: the measured process shares the two cores with this one); stops it.
async fn drain_in_daemon(
    w: &World,
    fake_url: &str,
    extra: &[(&'static str, String)],
    n: usize,
    poll: Duration,
) -> anyhow::Result<DaemonRun> {
    let mut vars = daemon_vars(
        &w.settings.queue.redis.url,
        w.settings.database.url.expose(),
        fake_url,
    );
    vars.extend(extra.iter().cloned());
    vars.push(("MIMALLOC_ARENA_EAGER_COMMIT", "0".to_owned()));
    let daemon = spawn_daemon(&vars)?;
    let pid = daemon.id();
    let cpu_before = process_cpu(pid);
    let start = Instant::now();
    let peak_inflight = wait_drained(&w.queue, n as u64, poll, Duration::from_secs(900)).await?;
    let took = start.elapsed();
    let cpu = process_cpu(pid).saturating_sub(cpu_before);
    let rss_mib = peak_rss_mib(pid);
    let status = sigterm_and_wait(daemon)?;
    ensure!(status.success(), "aiq run exited with {status}");
    Ok(DaemonRun {
        peak_inflight,
        took,
        cpu,
        rss_mib,
    })
}

/// The production `aiq` binary, which cargo builds next to `aiq-dev`: the benchmark measures the
/// daemon as it ships, not the developer binary.
fn daemon_binary() -> anyhow::Result<std::path::PathBuf> {
    let aiq = std::env::current_exe()?.with_file_name("aiq");
    ensure!(
        aiq.is_file(),
        "{} is missing: build it with `cargo build --release --bin aiq` (or without --release)",
        aiq.display()
    );
    Ok(aiq)
}

/// An `aiq run` process on the given settings' variables.
pub(crate) fn spawn_daemon(vars: &[(&'static str, String)]) -> anyhow::Result<Child> {
    let mut cmd = Command::new(daemon_binary()?);
    aiq_testkit::localsvc::die_with_parent(&mut cmd, libc::SIGTERM);
    cmd.arg("run")
        .env_clear()
        .envs(vars.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting aiq run")
}

pub(crate) fn sigterm_and_wait(mut child: Child) -> anyhow::Result<std::process::ExitStatus> {
    // SAFETY: kill with a pid we own.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    Ok(child.wait()?)
}

pub(crate) async fn budget(opts: &BenchOptions) -> anyhow::Result<Report> {
    let mut r = Report::new("budget", opts.json);
    let n = opts.jobs.unwrap_or(500);
    let room = 100;
    let fake = FakeProviders::start_with(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        FakeOptions::with_latency(Duration::from_millis(20)),
    )
    .await?;
    let extra = [
        ("AIQ_QUEUE_PREFIX", "bench-budget".to_owned()),
        ("AIQ_CONCURRENCY", "32".to_owned()),
    ];
    let w = world(&fake.base_url(), &extra).await?;
    // Every job has the same estimate: the same text length and max_tokens.
    let text = |i: usize| format!("Caption photo {i:04}.");
    let input_bound = text(0).len() as u64 + "user".len() as u64 + 8;
    let prices = aiq::budget::PriceCatalog::builtin();
    let estimate = prices.llm_estimate("openai", "gpt-4o-mini", input_bound, 64)?;
    let limit = MicroUsd::from_micros(estimate.micros() * room);
    let billed = org(0);
    w.store
        .set_org_limits(billed.as_uuid(), Some(limit), None)
        .await?;
    r.say(format!(
        "budget: {n} jobs over three aiq processes against a daily limit of {limit} (room for {room} at the estimate of {estimate})"
    ));
    let jobs: Vec<NewJob> = (0..n)
        .map(|i| {
            new_job(
                JobKind::LlmComplete,
                Tier::Enterprise,
                billed,
                serde_json::json!({
                    "version": 1, "organization_id": billed.to_string(), "tier": "enterprise",
                    "provider": "openai", "model": "gpt-4o-mini",
                    "messages": [{ "role": "user", "content": text(i) }], "max_tokens": 64
                })
                .to_string(),
            )
        })
        .collect();
    enqueue_all(&w.queue, jobs).await?;
    let mut vars = daemon_vars(
        &w.settings.queue.redis.url,
        w.settings.database.url.expose(),
        &fake.base_url(),
    );
    vars.extend(extra);
    let daemons: Vec<Child> = (0..3)
        .map(|_| spawn_daemon(&vars))
        .collect::<anyhow::Result<_>>()?;
    // Done when nothing waits or runs: the jobs over the limit wait in the delayed set for the
    // next day's window.
    let deadline = Instant::now() + Duration::from_secs(300);
    let stats = loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let s = w.queue.stats().await?;
        let done = s.counters.get("done").copied().unwrap_or(0);
        if s.waiting.values().sum::<u64>() == 0 && s.inflight == 0 && done + s.delayed >= n as u64 {
            break s;
        }
        if Instant::now() > deadline {
            bail!("the budget scenario did not settle: {s:?}");
        }
    };
    for d in daemons {
        let status = sigterm_and_wait(d)?;
        ensure!(status.success(), "an aiq process exited with {status}");
    }
    let today = chrono::Utc::now().date_naive();
    let spent = w
        .store
        .spend_by_org(today - chrono::Days::new(2), today + chrono::Days::new(2))
        .await?
        .into_iter()
        .find(|(o, _)| *o == Some(billed.as_uuid()))
        .map_or(MicroUsd::ZERO, |(_, m)| m);
    let overspend = spent.micros().saturating_sub(limit.micros()).max(0);
    let ran = stats.counters.get("done").copied().unwrap_or(0);
    let calls: serde_json::Value = reqwest::get(format!("{}/_fake/calls", fake.base_url()))
        .await?
        .json()
        .await?;
    let calls = calls["openai"].as_u64().unwrap_or(0);
    r.say(format!(
        "  {ran} jobs ran and {} wait for the next window; {calls} provider calls; settled {spent} of the {limit} limit",
        stats.delayed
    ));
    r.say(format!("  overspend: {overspend} micro-USD"));
    ensure!(
        calls == ran,
        "{calls} provider calls for {ran} jobs that ran"
    );
    r.figure("jobs", n);
    r.figure("processes", 3);
    r.figure("ran", ran);
    r.figure("waiting_for_reset", stats.delayed);
    r.figure("limit_micro_usd", limit.micros());
    r.figure("spent_micro_usd", spent.micros());
    r.figure("overspend_micro_usd", overspend);
    Ok(r)
}
