//! Chaos runs (issue #7): a few hundred jobs of every kind, several tiers and two organisations,
//! run by three `aiq run` processes against a fake with some latency, and a fault in the middle:
//! a `kill -9` of one process, redis-server killed and restarted (append-only file on),
//! PostgreSQL stopped, every provider failing for 30 s. A server stays down until the fault has
//! been seen to bite (a call answered with Redis gone, an answer kept because PostgreSQL could
//! not take it), not for a fixed time. After each, one checker
//! ([`check_invariants`]): every job is a result row or a dead job with a reason, no job has two
//! result rows, every call the fake answered has its cost row, and the budget's Redis counters
//! equal the cost rows.
//!
//! The tests that stop a server start their own (the shared ones serve the other tests).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::process::Child;
use std::time::{Duration, Instant};

use aiq::domain::{JobKind, PROVIDERS, Tier};
use aiq_testkit::fake::FakeOptions;
use aiq_testkit::localsvc::{LocalPostgres, LocalRedis};

use crate::harness::{
    LlmJob, ORG_A, ORG_B, TestCtx, llm_payload, signal_and_wait, vision_payload, wait_until,
};

const JOBS: usize = 300;
/// Jobs per process at once.
const CONCURRENCY: u64 = 6;
const DAEMONS: usize = 3;

/// The settings of every run, then the run's own. Short provider timeouts and hold margin: the
/// hold of a call whose worker died lives timeout + margin (3 s here) before the sweeper turns
/// it into a cost row, and the checker waits for that.
fn settings<'a>(own: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut all = vec![
        ("AIQ_CONCURRENCY", "6"),
        ("AIQ_VISION_TIMEOUT_MS", "2000"),
        ("AIQ_OPENAI_TIMEOUT_MS", "2000"),
        ("AIQ_ANTHROPIC_TIMEOUT_MS", "2000"),
        ("AIQ_GEMINI_TIMEOUT_MS", "2000"),
        ("AIQ_BUDGET_HOLD_MARGIN_MS", "1000"),
        // The daemon's default of two in-call retries (the harness turns them off).
        ("AIQ_CALL_RETRIES", "2"),
    ];
    all.extend_from_slice(own);
    all
}

/// A fixed latency, so that jobs are in the middle of their calls when the fault hits.
fn fake() -> FakeOptions {
    FakeOptions::with_latency(Duration::from_millis(300))
}

/// An LLM job for `provider`'s model, from the harness's OpenAI payload.
fn llm(tier: Tier, org: &str, provider: &str, model: &str, text: &str) -> String {
    LlmJob::new(tier, org, text).model(provider, model).json()
}

/// Enqueues `n` jobs: Vision, OpenAI, Anthropic and Gemini, across the six tiers and both
/// organisations. Returns their ids.
async fn enqueue_mix(ctx: &TestCtx, n: usize) -> Vec<String> {
    // Vision calls cost list price (the free units would make them cost nothing).
    ctx.use_up_free_vision_units("LABEL_DETECTION").await;
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        let tier = Tier::ALL[i % 6];
        let org = if (i / 3) % 2 == 0 { ORG_A } else { ORG_B };
        let text = format!("chaos job {i}");
        let (kind, body) = match i % 5 {
            0 => (JobKind::VisionAnnotate, vision_payload(tier, org, 1)),
            1 | 2 => (JobKind::LlmComplete, llm_payload(tier, org, &text)),
            3 => (
                JobKind::LlmComplete,
                llm(tier, org, "anthropic", "claude-haiku-4-5", &text),
            ),
            _ => (
                JobKind::LlmComplete,
                llm(tier, org, "gemini", "gemini-2.5-flash", &text),
            ),
        };
        ids.push(ctx.enqueue(kind, tier, org, &body, 0).await);
    }
    ids
}

async fn completed(ctx: &TestCtx) -> i64 {
    ctx.completed().await
}

/// One of the queue's running totals (`{p}:counters`).
async fn counter(ctx: &TestCtx, name: &str) -> u64 {
    ctx.queue
        .stats()
        .await
        .expect("stats")
        .counters
        .get(name)
        .copied()
        .unwrap_or(0)
}

fn spawn_daemons(ctx: &TestCtx) -> Vec<Child> {
    (0..DAEMONS).map(|_| ctx.spawn_daemon(&[])).collect()
}

/// Waits until a fifth of the jobs are done and every process has jobs in flight; returns a
/// description of that moment.
async fn wait_mid_load(ctx: &TestCtx, jobs: usize) -> String {
    wait_until(
        Duration::from_secs(60),
        "the load to be under way",
        || async {
            completed(ctx).await >= (jobs / 5) as i64
                && ctx.queue.stats().await.expect("stats").inflight >= DAEMONS as u64 * CONCURRENCY
        },
    )
    .await;
    let inflight = ctx.queue.stats().await.expect("stats").inflight;
    format!("{} of {jobs} done, {inflight} leased", completed(ctx).await)
}

/// Waits until the queue is empty and every budget hold is settled: the sweeper of a live
/// process turns a dead worker's hold into a cost row once its TTL passes. Returns the time
/// since `since` (the fault).
async fn drain(ctx: &TestCtx, since: Instant) -> Duration {
    ctx.wait_settled(Duration::from_secs(120)).await;
    // The budget's index of unsettled holds (see `aiq::budget`).
    let holds = format!("{{{}}}:res_expiry", ctx.vars["AIQ_BUDGET_PREFIX"]);
    let redis = ctx.redis().await;
    wait_until(
        Duration::from_secs(60),
        "every budget hold to be settled or swept",
        || {
            let (mut redis, holds) = (redis.clone(), holds.clone());
            async move {
                let n: u64 = redis::AsyncCommands::zcard(&mut redis, holds)
                    .await
                    .expect("zcard");
                n == 0
            }
        },
    )
    .await;
    since.elapsed()
}

/// Checks that every process is still running (none exited on the fault), then stops each
/// with SIGTERM and expects exit 0 within the shutdown grace and some slack.
async fn stop_daemons(daemons: Vec<Child>) {
    for (i, mut d) in daemons.into_iter().enumerate() {
        let status = d.try_wait().expect("the daemon's status");
        assert!(
            status.is_none(),
            "daemon {i} exited during the run: {status:?}"
        );
        let status =
            tokio::time::timeout(Duration::from_secs(30), signal_and_wait(d, libc::SIGTERM))
                .await
                .unwrap_or_else(|_| panic!("daemon {i} did not stop within 30 s of SIGTERM"));
        assert!(status.success(), "daemon {i} exited with {status}");
    }
}

/// What [`check_invariants`] counted.
#[derive(Debug)]
struct Figures {
    jobs: usize,
    succeeded: usize,
    dead: usize,
    answered: u64,
    cost_rows: u64,
}

/// The invariants of every chaos run, once the queue is drained and the holds swept:
///
/// - nothing waits, runs or is delayed;
/// - every enqueued job is either a completed result row (and acknowledged once) or a dead job
///   with a reason, and none has two result rows;
/// - every call the fake answered has its cost row, per provider. The fake counts a call when it
///   arrives, so a call whose worker died after that is costed by the sweeper ('expired' row at
///   the estimate). Cost rows may exceed answered calls by calls that never reached the fake but
///   hold an 'expired' row: a hold reserved by a worker killed before its request arrived, or a
///   reservation Redis applied but whose reply was lost when Redis died (the handler saw an
///   error and made no call; the hold expired and was swept). At most `unreached` of those, each
///   an 'expired' row;
/// - the budget's Redis counters equal the cost rows, nothing held;
/// - every job has exactly one terminal event in `{p}:events`, the one its end says.
///
/// Prints one line of figures; `drained` is the time from the fault to the drained queue.
async fn check_invariants(
    ctx: &TestCtx,
    ids: &[String],
    run: &str,
    drained: Duration,
    unreached: u64,
) -> Figures {
    let stats = ctx.queue.stats().await.expect("stats");
    assert_eq!(
        (
            stats.waiting.values().sum::<u64>(),
            stats.inflight,
            stats.delayed
        ),
        (0, 0, 0),
        "{run}: the queue is drained: {stats:?}"
    );

    // Jobs: a completed result row, or dead with a reason; never two result rows.
    let rows: Vec<(String, String)> =
        sqlx::query_as("SELECT job_id, status FROM ai_processing_results")
            .fetch_all(ctx.store.pool())
            .await
            .expect("result rows");
    let mut results: HashMap<&str, Vec<&str>> = HashMap::new();
    for (job, status) in &rows {
        results.entry(job).or_default().push(status);
    }
    let dead: HashMap<String, String> = ctx
        .queue
        .dead_jobs(10_000)
        .await
        .expect("dead jobs")
        .into_iter()
        .map(|d| (d.id, d.reason))
        .collect();
    let (mut succeeded, mut dead_jobs) = (0, 0);
    for id in ids {
        let statuses = results.get(id.as_str()).cloned().unwrap_or_default();
        assert!(
            statuses.len() <= 1,
            "{run}: job {id} has {} result rows: {statuses:?}",
            statuses.len()
        );
        match (statuses.first(), dead.get(id)) {
            (Some(&"completed"), None) => succeeded += 1,
            (None | Some(&"failed"), Some(reason)) => {
                assert!(!reason.is_empty(), "{run}: dead job {id} has no reason");
                dead_jobs += 1;
            }
            (status, reason) => panic!(
                "{run}: job {id} is neither a completed result nor a dead job with a reason: result {status:?}, dead {reason:?}, queue {:?}",
                ctx.queue.job_fields(id).await.map(|mut f| {
                    f.remove("payload");
                    f
                })
            ),
        }
    }
    let enqueued: HashSet<&str> = ids.iter().map(String::as_str).collect();
    assert!(
        results.keys().all(|j| enqueued.contains(j)),
        "{run}: result rows only for enqueued jobs"
    );
    assert_eq!(stats.dead as usize, dead_jobs, "{run}: the dead set");
    assert_eq!(
        stats.counters.get("done").copied().unwrap_or(0),
        succeeded as u64,
        "{run}: each succeeded job acknowledged once"
    );

    // Calls: per provider, what the fake answered against the cost rows.
    let calls = ctx.fake_calls().await;
    let costed: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT service_name, count(*), count(*) FILTER (WHERE call_status = 'expired')
         FROM ai_cost_tracking GROUP BY 1",
    )
    .fetch_all(ctx.store.pool())
    .await
    .expect("cost rows");
    let mut per_provider = BTreeMap::new();
    let (mut answered, mut cost_rows, mut expired) = (0u64, 0u64, 0u64);
    for p in PROVIDERS {
        let a = calls[p].as_u64().expect("the fake's count");
        let (rows, exp) = costed
            .iter()
            .find(|(s, ..)| s == p)
            .map_or((0, 0), |(_, r, e)| (*r as u64, *e as u64));
        assert!(
            rows >= a,
            "{run}: {p}: the fake answered {a} calls, only {rows} cost rows"
        );
        assert!(
            rows - a <= exp,
            "{run}: {p}: {} cost rows more than answered calls, but only {exp} swept ones",
            rows - a
        );
        per_provider.insert(p, (a, rows, exp));
        answered += a;
        cost_rows += rows;
        expired += exp;
    }
    assert_eq!(
        costed.iter().map(|(_, r, _)| *r as u64).sum::<u64>(),
        cost_rows,
        "{run}: cost rows only for the four providers: {costed:?}"
    );
    // Succeeded calls beyond one per succeeded job: a job run again after a call of its that
    // succeeded (its worker died, or its lease expired, before the acknowledgement) calls again,
    // as a new execution. (In-call retries follow failed calls: they add nothing here.)
    let extra_succeeded = ctx
        .scalar_i64("SELECT count(*) FROM ai_cost_tracking WHERE call_status = 'succeeded'")
        .await
        - succeeded as i64;
    println!(
        "chaos, {run}: {} jobs, {succeeded} succeeded, {dead_jobs} dead; {answered} provider calls answered, {cost_rows} cost rows ({expired} expired, swept), {extra_succeeded} successful calls beyond one per succeeded job; drained {:.1} s after the fault was over; per provider (answered, rows, expired) {per_provider:?}",
        ids.len(),
        drained.as_secs_f64()
    );
    assert!(
        cost_rows - answered <= unreached,
        "{run}: {} cost rows for calls that never reached the fake, at most {unreached} expected",
        cost_rows - answered
    );
    crate::money::assert_redis_agrees_with_postgres(ctx, &[ORG_A, ORG_B]).await;
    // Events: each job created once and ended once, as its row and the dead set say.
    let ends = crate::outcomes::terminal_events(ctx).await;
    for id in ids {
        let want = if dead.contains_key(id) {
            ["dead", "failed"].as_slice()
        } else {
            ["succeeded"].as_slice()
        };
        let got = ends.get(id.as_str()).cloned().unwrap_or_default();
        assert!(
            got.len() == 1 && want.contains(&got[0].as_str()),
            "{run}: job {id} has terminal events {got:?}, not one of {want:?}"
        );
    }
    Figures {
        jobs: ids.len(),
        succeeded,
        dead: dead_jobs,
        answered,
        cost_rows,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_kill_9_of_one_of_three_processes_mid_load_loses_nothing() {
    // A short lease, so the killed process's jobs come back within seconds.
    let ctx = TestCtx::build(&settings(&[("AIQ_LEASE_MS", "3000")]), fake()).await;
    let ids = enqueue_mix(&ctx, JOBS).await;
    let mut daemons = spawn_daemons(&ctx);
    let at = wait_mid_load(&ctx, JOBS).await;
    let killed = Instant::now();
    assert!(
        !signal_and_wait(daemons.remove(0), libc::SIGKILL)
            .await
            .success()
    );
    let drained = drain(&ctx, killed).await;
    stop_daemons(daemons).await;
    // The killed process held at most CONCURRENCY reservations, one per running job.
    let f = check_invariants(
        &ctx,
        &ids,
        &format!("kill -9 of one of three processes ({at})"),
        drained,
        CONCURRENCY,
    )
    .await;
    assert_eq!((f.succeeded, f.dead), (f.jobs, 0), "{f:?}");
    let stats = ctx.queue.stats().await.unwrap();
    assert!(
        stats.counters.get("interrupted").copied().unwrap_or(0) >= 1,
        "the killed process's jobs came back by lease expiry: {stats:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_redis_killed_and_restarted_mid_load_with_its_append_only_file_loses_nothing() {
    let mut redis = LocalRedis::start_with(
        "chaos-redis",
        &["--appendonly", "yes", "--appendfsync", "always"],
    )
    .expect("a redis-server of this test's own");
    let ctx = TestCtx::build_on(Some(&redis.url()), None, &settings(&[]), fake()).await;
    let ids = enqueue_mix(&ctx, JOBS).await;
    let daemons = spawn_daemons(&ctx);
    let at = wait_mid_load(&ctx, JOBS).await;
    let down = Instant::now();
    redis.kill().expect("killing redis-server");
    // The outage lasts until every call that was under way has been answered with Redis gone
    // (its settle, and the next fetches, fail), which is the fault this test is about; no new
    // call can start, since each needs a reservation from Redis.
    wait_until(
        Duration::from_secs(30),
        "every call under way to be answered while Redis is down",
        || async { ctx.fake_calls().await["running"].as_u64() == Some(0) },
    )
    .await;
    let outage = down.elapsed();
    redis.restart().expect("restarting redis-server");
    let back = Instant::now();
    // Our own connection reconnects too (the first command after the restart may fail).
    wait_until(Duration::from_secs(30), "Redis to answer again", || async {
        ctx.queue.ping().await.is_ok() && ctx.queue.stats().await.is_ok()
    })
    .await;
    let enqueued = ctx.queue.stats().await.expect("stats").counters["enqueued"];
    assert_eq!(
        enqueued, JOBS as u64,
        "the restarted Redis reloaded the queue from its append-only file"
    );
    let drained = drain(&ctx, back).await;
    stop_daemons(daemons).await;
    // Calls that never reached the fake but have a swept cost row: a reservation Redis applied
    // (and wrote to its append-only file) whose reply was lost in the kill; at most one per job
    // in flight.
    let f = check_invariants(
        &ctx,
        &ids,
        &format!(
            "redis-server killed (SIGKILL) for {:.1} s and restarted from its AOF ({at})",
            outage.as_secs_f64()
        ),
        drained,
        DAEMONS as u64 * CONCURRENCY,
    )
    .await;
    assert_eq!((f.succeeded, f.dead), (f.jobs, 0), "{f:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_postgres_stopped_mid_load_no_job_dead_and_every_call_costed() {
    let mut pg = LocalPostgres::start("chaos-pg").expect("a PostgreSQL of this test's own");
    let ctx = TestCtx::build_on(None, Some(&pg), &settings(&[]), fake()).await;
    let ids = enqueue_mix(&ctx, JOBS).await;
    let daemons = spawn_daemons(&ctx);
    let at = wait_mid_load(&ctx, JOBS).await;
    let down = Instant::now();
    pg.stop().expect("stopping PostgreSQL");
    // The outage lasts until every call under way has been answered with PostgreSQL gone, an
    // answer that could not be written was kept with its job (`{p}:kept:<id>`), the path this
    // test is about, and jobs have been deferred for it (the processes hold calls back while
    // PostgreSQL is unreachable).
    let deferred_before = counter(&ctx, "deferred").await;
    let kept = ctx.key("kept:*");
    wait_until(
        Duration::from_secs(60),
        "the calls under way answered, one kept with its job, and jobs deferred, with PostgreSQL down",
        || async {
            let mut redis = ctx.redis().await;
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(&kept)
                .query_async(&mut redis)
                .await
                .expect("KEYS");
            !keys.is_empty()
                && counter(&ctx, "deferred").await >= deferred_before + DAEMONS as u64
                && ctx.fake_calls().await["running"].as_u64() == Some(0)
        },
    )
    .await;
    let outage = down.elapsed();
    pg.start_again().expect("starting PostgreSQL again");
    let back = Instant::now();
    wait_until(
        Duration::from_secs(30),
        "PostgreSQL to answer again",
        || async {
            sqlx::query("SELECT 1")
                .execute(ctx.store.pool())
                .await
                .is_ok()
        },
    )
    .await;
    let drained = drain(&ctx, back).await;
    stop_daemons(daemons).await;
    // Redis stayed up and no process died: every cost row is a call the fake answered.
    let f = check_invariants(
        &ctx,
        &ids,
        &format!(
            "PostgreSQL stopped for {:.1} s ({at})",
            outage.as_secs_f64()
        ),
        drained,
        0,
    )
    .await;
    assert_eq!(f.dead, 0, "no job is dead for PostgreSQL's outage: {f:?}");
    assert_eq!(
        f.succeeded, f.jobs,
        "every job succeeded once PostgreSQL was back"
    );
    // An answer whose rows could not be written was kept with its job and written later: no
    // job called twice, so the calls the fake answered are the jobs.
    assert_eq!(
        f.answered, f.jobs as u64,
        "one call per job, none made again after the outage: {f:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_every_provider_failing_for_30_s_mid_load_every_job_succeeds_after() {
    // A 10 s breaker cooldown (30 s by default): a few half-open probes during the outage. Each
    // breaker opens just after the outage starts, so at most two probes per provider fail within
    // it. A failed probe's job is retried when the breaker's wait ends, so it tends to be the
    // next probe too: with its own first failure, one job may fail three of its five attempts.
    // The figure is printed.
    let ctx = TestCtx::build(&settings(&[("AIQ_BREAKER_COOLDOWN_MS", "10000")]), fake()).await;
    let ids = enqueue_mix(&ctx, JOBS).await;
    let daemons = spawn_daemons(&ctx);
    let at = wait_mid_load(&ctx, JOBS).await;
    let fake_url = ctx.vars["AIQ_OPENAI_BASE_URL"].clone();
    reqwest::Client::new()
        .post(format!("{fake_url}/_fake/outage?status=503&ms=30000"))
        .send()
        .await
        .expect("starting the outage")
        .error_for_status()
        .expect("the fake's outage");
    let outage_end = Instant::now() + Duration::from_secs(30);
    let drained = drain(&ctx, outage_end).await;
    stop_daemons(daemons).await;
    let f = check_invariants(
        &ctx,
        &ids,
        &format!("every provider answering 503 for 30 s ({at})"),
        drained,
        0,
    )
    .await;
    let failed = ctx
        .scalar_i64("SELECT count(*) FROM ai_cost_tracking WHERE call_status = 'failed'")
        .await;
    let attempts_spent = ctx
        .scalar_i64("SELECT coalesce(sum(attempts - 1), 0) FROM ai_processing_results")
        .await;
    let most_attempts = ctx
        .scalar_i64("SELECT coalesce(max(attempts), 0)::bigint FROM ai_processing_results")
        .await;
    let stats = ctx.queue.stats().await.unwrap();
    println!(
        "chaos, provider outage: {failed} failed calls, {attempts_spent} attempts spent (at most {most_attempts} by one job, of 5), {} deferrals",
        stats.counters.get("deferred").copied().unwrap_or(0)
    );
    assert!(failed > 0, "the outage hit calls");
    assert_eq!(f.dead, 0, "no job is dead for the outage: {f:?}");
    assert_eq!(f.succeeded, f.jobs, "every job succeeded after the outage");
    assert!(f.answered > 0 && f.cost_rows >= f.answered);
}
