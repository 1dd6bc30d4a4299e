//! Several `aiq run` processes on one queue: no job runs twice at once, a `kill -9` loses
//! nothing, and long jobs keep their leases.

use std::time::{Duration, Instant};

use aiq::domain::{JobKind, Tier};
use aiq_testkit::fake::FakeOptions;
use redis::AsyncCommands;

use crate::harness::{ORG_A, ORG_B, TestCtx, llm_payload, signal_and_wait, wait_until};

async fn completed(ctx: &TestCtx) -> i64 {
    ctx.completed().await
}

async fn enqueue_llm_jobs(ctx: &TestCtx, n: usize) {
    for i in 0..n {
        let tier = Tier::ALL[i % 6];
        let org = if i % 2 == 0 { ORG_A } else { ORG_B };
        ctx.enqueue(
            JobKind::LlmComplete,
            tier,
            org,
            &llm_payload(tier, org, &format!("job {i}")),
            0,
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_on_one_queue_never_run_the_same_job_and_each_job_runs_once() {
    let ctx = TestCtx::build(
        &[("AIQ_CONCURRENCY", "8")],
        FakeOptions::with_latency(Duration::from_millis(20)),
    )
    .await;
    enqueue_llm_jobs(&ctx, 300).await;
    let a = ctx.spawn_daemon(&[]);
    let b = ctx.spawn_daemon(&[]);
    ctx.wait_settled(Duration::from_secs(60)).await;
    assert!(signal_and_wait(a, libc::SIGTERM).await.success());
    assert!(signal_and_wait(b, libc::SIGTERM).await.success());

    let calls = ctx.fake_calls().await;
    assert_eq!(calls["jobs"], 300, "{calls}");
    assert_eq!(calls["max_calls_per_job"], 1, "{calls}");
    assert_eq!(calls["overlaps"], 0, "{calls}");
    assert_eq!(completed(&ctx).await, 300);
    let stats = ctx.queue.stats().await.unwrap();
    assert_eq!(stats.counters["done"], 300);
    assert_eq!(stats.counters["leased"], 300);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_worker_mid_load_loses_nothing_and_its_leases_come_back_in_time() {
    const LEASE_MS: u64 = 1500;
    const JOBS: usize = 120;
    let ctx = TestCtx::build(
        &[("AIQ_CONCURRENCY", "8"), ("AIQ_LEASE_MS", "1500")],
        FakeOptions::with_latency(Duration::from_millis(300)),
    )
    .await;
    enqueue_llm_jobs(&ctx, JOBS).await;
    let a = ctx.spawn_daemon(&[]);
    wait_until(
        Duration::from_secs(60),
        "the first worker to be busy",
        || async { completed(&ctx).await >= 16 && ctx.queue.stats().await.unwrap().inflight >= 4 },
    )
    .await;

    let killed_at = Instant::now();
    assert!(!signal_and_wait(a, libc::SIGKILL).await.success());
    // The dead worker's leases, read once it is gone and before anyone can reap them: a lease
    // read before the kill may have been settled in the moment before the signal landed.
    let mut redis = ctx.redis().await;
    let held: Vec<(String, f64)> = redis
        .zrange_withscores(ctx.key("inflight"), 0, -1)
        .await
        .unwrap();
    assert!(!held.is_empty(), "the killed worker held leases");
    let b = ctx.spawn_daemon(&[]);

    // Every lease the dead worker held is returned (and handed out again) once it expires.
    let inflight_key = ctx.key("inflight");
    wait_until(
        Duration::from_secs(60),
        "the dead worker's leases to come back",
        || {
            let (mut redis, held, key) = (redis.clone(), held.clone(), inflight_key.clone());
            async move {
                let now: Vec<(String, f64)> = redis.zrange_withscores(key, 0, -1).await.unwrap();
                held.iter()
                    .all(|(id, deadline)| !now.iter().any(|(i, d)| i == id && d == deadline))
            }
        },
    )
    .await;
    // How soon is a figure, printed: lease expiry plus at most one reaper tick (a third of the
    // lease) on a quiet machine. A bound on it would fail on a busy one; the wait's timeout is
    // the bound.
    let back_after = killed_at.elapsed();
    println!(
        "kill -9: {} leases came back {} ms after the kill (lease {LEASE_MS} ms)",
        held.len(),
        back_after.as_millis()
    );

    ctx.wait_settled(Duration::from_secs(60)).await;
    assert!(signal_and_wait(b, libc::SIGTERM).await.success());
    assert_eq!(completed(&ctx).await, JOBS as i64, "every job completed");
    let stats = ctx.queue.stats().await.unwrap();
    assert_eq!(stats.dead, 0, "no job died");
    assert_eq!(
        stats.counters["done"], JOBS as u64,
        "each job acknowledged exactly once"
    );
    assert!(
        stats.counters["interrupted"] >= held.len() as u64,
        "each of the {} leases the dead worker held came back as an interrupt: {:?}",
        held.len(),
        stats.counters
    );
    let calls = ctx.fake_calls().await;
    assert_eq!(
        calls["overlaps"], 0,
        "no job ran in two places at once: {calls}"
    );
    assert_eq!(
        calls["jobs"], JOBS as u64,
        "every job was called: {} calls of {} jobs, at most {} per job",
        calls["openai"], calls["jobs"], calls["max_calls_per_job"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_longer_than_its_lease_keeps_it_by_heartbeat_and_runs_once() {
    let ctx = TestCtx::build(
        &[("AIQ_LEASE_MS", "1000")],
        FakeOptions::with_latency(Duration::from_millis(2500)),
    )
    .await;
    enqueue_llm_jobs(&ctx, 2).await;
    let worker = ctx.start_worker();
    // A second worker polls the same queue: it must not take the job over.
    let other = ctx.start_worker();
    ctx.wait_settled(Duration::from_secs(30)).await;
    worker.stop().await;
    other.stop().await;
    let calls = ctx.fake_calls().await;
    assert_eq!(calls["max_calls_per_job"], 1, "{calls}");
    assert_eq!(completed(&ctx).await, 2);
    let stats = ctx.queue.stats().await.unwrap();
    assert_eq!(stats.counters.get("interrupted").copied().unwrap_or(0), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_finishes_running_jobs_returns_the_rest_and_exits_0() {
    let ctx = TestCtx::build(
        &[("AIQ_CONCURRENCY", "6"), ("AIQ_SHUTDOWN_GRACE_MS", "5000")],
        FakeOptions::with_latency(Duration::from_millis(400)),
    )
    .await;
    enqueue_llm_jobs(&ctx, 60).await;
    let daemon = ctx.spawn_daemon(&[]);
    wait_until(Duration::from_secs(30), "jobs to be running", || async {
        ctx.queue.stats().await.unwrap().inflight >= 3 && completed(&ctx).await >= 6
    })
    .await;
    let stopped_at = Instant::now();
    let status = signal_and_wait(daemon, libc::SIGTERM).await;
    println!(
        "SIGTERM under load: exited in {} ms (grace 5,000 ms, calls of 400 ms)",
        stopped_at.elapsed().as_millis()
    );
    assert!(status.success(), "exit status {status}");

    // Nothing is in flight or lost, and no attempt was spent on the stop.
    let stats = ctx.queue.stats().await.unwrap();
    assert_eq!(stats.inflight, 0);
    assert_eq!(stats.delayed + stats.dead, 0);
    let done = completed(&ctx).await as u64;
    assert_eq!(done + stats.waiting.values().sum::<u64>(), 60, "{stats:?}");
    assert!(done < 60, "the stop came while jobs were waiting");

    // A new worker finishes the rest; no job ran twice.
    let worker = ctx.start_worker();
    ctx.wait_settled(Duration::from_secs(60)).await;
    worker.stop().await;
    assert_eq!(completed(&ctx).await, 60);
    let calls = ctx.fake_calls().await;
    assert_eq!(calls["max_calls_per_job"], 1, "{calls}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_still_running_when_the_grace_period_ends_comes_back_by_lease_expiry() {
    let ctx = TestCtx::build(
        &[("AIQ_SHUTDOWN_GRACE_MS", "300"), ("AIQ_LEASE_MS", "1000")],
        FakeOptions::default(),
    )
    .await;
    // Its call does not answer until the test says so: the daemon can only exit by ending the
    // grace period, whatever the machine's speed.
    ctx.enqueue(
        JobKind::LlmComplete,
        Tier::Trial,
        ORG_A,
        &llm_payload(Tier::Trial, ORG_A, "[fake:hold] a long call"),
        0,
    )
    .await;
    let daemon = ctx.spawn_daemon(&[]);
    // Its call is at the provider (a leased job not yet started would be handed back by the
    // stop, not left to its lease).
    wait_until(
        Duration::from_secs(10),
        "the job's call to be running",
        || async { ctx.fake_calls().await["openai"] == 1 },
    )
    .await;
    assert!(signal_and_wait(daemon, libc::SIGTERM).await.success());
    assert_eq!(
        ctx.fake_calls().await["openai"],
        1,
        "the daemon exited with its call still held at the provider"
    );
    reqwest::Client::new()
        .post(format!("{}/_fake/release", ctx.vars["AIQ_OPENAI_BASE_URL"]))
        .send()
        .await
        .expect("releasing the held calls")
        .error_for_status()
        .expect("the fake's release");
    let worker = ctx.start_worker();
    ctx.wait_settled(Duration::from_secs(30)).await;
    worker.stop().await;
    assert_eq!(completed(&ctx).await, 1);
    let stats = ctx.queue.stats().await.unwrap();
    assert_eq!(stats.counters["interrupted"], 1);
    assert_eq!(stats.counters["done"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_stopped_worker_recorded_its_result_is_not_called_again() {
    let ctx = TestCtx::with(&[("AIQ_LEASE_MS", "1000")]).await;
    let recorded = ctx
        .enqueue(
            JobKind::LlmComplete,
            Tier::Enterprise,
            ORG_A,
            &llm_payload(Tier::Enterprise, ORG_A, "recorded before the crash"),
            0,
        )
        .await;
    let lost = ctx
        .enqueue(
            JobKind::LlmComplete,
            Tier::Enterprise,
            ORG_A,
            &llm_payload(Tier::Enterprise, ORG_A, "lost in the crash"),
            0,
        )
        .await;
    // A worker leases both and dies; for one of them it had written the result row, but never
    // acknowledged the job.
    let leased = ctx.queue.fetch(2).await.unwrap();
    assert_eq!(leased.len(), 2);
    sqlx::query(
        "INSERT INTO ai_processing_results (organization_id, job_id, job_kind, raw_response, status, ai_provider)
         VALUES ($1::uuid, $2, 'llm.complete', '{}', 'completed', 'openai')",
    )
    .bind(ORG_A)
    .bind(&recorded)
    .execute(ctx.store.pool())
    .await
    .unwrap();
    // The leases expire; a new worker gets both back from the reaper.
    let worker = ctx.start_worker();
    ctx.wait_settled(Duration::from_secs(20)).await;
    worker.stop().await;
    let calls = ctx.fake_calls().await;
    assert_eq!(
        calls["openai"], 1,
        "only the job without a result row was called"
    );
    let stats = ctx.queue.stats().await.unwrap();
    assert_eq!(stats.counters.get("done").copied(), Some(2));
    assert_eq!(stats.counters.get("interrupted").copied(), Some(2));
    let rows: i64 = ctx
        .scalar_i64("SELECT count(*) FROM ai_cost_tracking")
        .await;
    assert_eq!(rows, 1);
    let lost_status: String =
        sqlx::query_scalar("SELECT status FROM ai_processing_results WHERE job_id = $1")
            .bind(&lost)
            .fetch_one(ctx.store.pool())
            .await
            .unwrap();
    assert_eq!(lost_status, "completed");
}
