//! `aiq-dev`: the developer binary. The demo, the benchmarks and the fake providers, built from
//! the daemon's library and the test kit, so the production `aiq` binary carries none of them.

mod bench;
mod demo;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use aiq::config::LogFormat;
use anyhow::bail;
use clap::{Parser, Subcommand};

/// The same allocator as the production binary, so the benchmarks measure what runs.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "aiq-dev",
    version,
    about = "aiq's developer tools: the end-to-end demo, the benchmarks and the fake providers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the whole flow end to end with nothing set up.
    ///
    /// Starts its own redis-server and PostgreSQL in temporary folders on free ports, the fake
    /// providers and a worker; enqueues a mixed batch over all six tiers and both job kinds;
    /// prints a summary and, as the last line, one JSON object; stops everything it started.
    Demo {
        /// Jobs per tier (half Vision, half LLM).
        #[arg(long, default_value_t = 10)]
        jobs_per_tier: usize,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 120)]
        timeout_s: u64,
    },
    /// Benchmarks that start their own Redis, PostgreSQL and fake providers and print figures:
    /// queue, pipeline, inflight, priority, budget, or all. Build with --release for real figures.
    Bench {
        #[arg(value_enum)]
        scenario: bench::Scenario,
        /// End with one JSON line per scenario on stdout (the text goes to stderr).
        #[arg(long)]
        json: bool,
        /// Small sizes, to check that the scenarios work.
        #[arg(long)]
        quick: bool,
        /// `queue` only: run against this Redis instead of starting one.
        #[arg(long)]
        redis_url: Option<String>,
        /// Overrides the scenario's number of jobs.
        #[arg(long)]
        jobs: Option<usize>,
    },
    /// Serve fake Google Vision and OpenAI endpoints (real wire formats) for tests and demos.
    FakeProviders {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8089")]
        addr: SocketAddr,
        /// Every call waits this long before it answers...
        #[arg(long, default_value_t = 0)]
        latency_ms: u64,
        /// ...plus a uniform random extra of up to this many milliseconds.
        #[arg(long, default_value_t = 0)]
        latency_jitter_ms: u64,
        /// The share of calls (0 to 1) that fail with a random fault: 429 with Retry-After, 500,
        /// 503 (529 for Anthropic), a 5 s timeout, a garbage 200, a failed Vision image.
        #[arg(long, default_value_t = 0.0)]
        error_rate: f64,
        /// Which faults the failing calls get, by weight: e.g. `429=3,500=1,timeout=1`. Kinds:
        /// 429, 500, 503, timeout, image, garbage. Without it, every kind equally.
        #[arg(long)]
        error_mix: Option<String>,
        /// Seed of the random draws: the same seed repeats the same answers in arrival order.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Every OpenAI answer is a valid one of about this many MB (0: normal answers).
        #[arg(long, default_value_t = 0)]
        answer_mb: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    aiq::tls::install_crypto_provider();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("aiq-dev: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("aiq-dev: {}", aiq::redact::url(&format!("{e:#}")));
            ExitCode::from(1)
        }
    }
}

async fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Demo {
            jobs_per_tier,
            timeout_s,
        } => {
            aiq::telemetry::init(LogFormat::Text, "warn", Vec::new());
            if jobs_per_tier == 0 {
                bail!("--jobs-per-tier must be at least 1");
            }
            demo::run(demo::DemoOptions {
                jobs_per_tier,
                timeout: Duration::from_secs(timeout_s),
            })
            .await
        }
        Command::Bench {
            scenario,
            json,
            quick,
            redis_url,
            jobs,
        } => {
            aiq::telemetry::init(LogFormat::Text, "warn", Vec::new());
            if jobs == Some(0) {
                bail!("--jobs must be at least 1");
            }
            bench::run(bench::BenchOptions {
                scenario,
                json,
                quick,
                redis_url,
                jobs,
            })
            .await
        }
        Command::FakeProviders {
            addr,
            latency_ms,
            latency_jitter_ms,
            error_rate,
            error_mix,
            seed,
            answer_mb,
        } => {
            aiq::telemetry::init(LogFormat::Text, "info", Vec::new());
            if !(0.0..=1.0).contains(&error_rate) {
                bail!("--error-rate must be between 0 and 1");
            }
            let mix = match error_mix {
                Some(m) => aiq_testkit::fake::parse_mix(&m)
                    .map_err(|e| anyhow::anyhow!("--error-mix: {e}"))?,
                None => [0; 6],
            };
            let options = aiq_testkit::fake::FakeOptions {
                latency: Duration::from_millis(latency_ms),
                latency_jitter: Duration::from_millis(latency_jitter_ms),
                error_rate,
                mix,
                seed,
                answer_bytes: answer_mb.min(4096) * 1024 * 1024,
            };
            let fake = aiq_testkit::fake::FakeProviders::start_with(addr, options).await?;
            println!("fake providers listening on {}", fake.base_url());
            aiq::cli::shutdown_signal().await;
            Ok(())
        }
    }
}
