//! Per-organisation limits at run time (issue 14): the fleet-wide cap on an organisation's jobs
//! in flight, kept by fetch.lua when it leases, its count under every end of a lease, and
//! `aiq org set-limits` reaching every process.

use std::time::{Duration, Instant};

use aiq::domain::{JobKind, OrganizationId, Tier};
use aiq::queue::{NewJob, Outcome, Settlement};
use redis::AsyncCommands;

use crate::harness::{
    ORG_A, ORG_B, TestCtx, aiq_command, llm_payload, signal_and_wait, wait_until,
};

const ORG_C: &str = "3d5c1a0e-8f1b-4c2d-9e7a-6b5f4c3d2e1f";

fn org(s: &str) -> OrganizationId {
    OrganizationId::parse(s).unwrap()
}

fn job(tier: Tier, o: &str, text: &str) -> NewJob {
    NewJob {
        kind: JobKind::LlmComplete,
        tier,
        organization_id: org(o),
        payload: llm_payload(tier, o, text),
        job_id: None,
        delay: Duration::ZERO,
        idempotency_key: None,
        max_attempts: 0,
    }
}

async fn enqueue(ctx: &TestCtx, tier: Tier, o: &str, n: usize) -> Vec<String> {
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        ids.push(
            ctx.queue
                .enqueue(&job(tier, o, &format!("job {i}")))
                .await
                .unwrap()
                .job_id,
        );
    }
    ids
}

/// The organisation's leased jobs as the queue counts them (`{p}:org_inflight`).
async fn counted(ctx: &TestCtx, o: &str) -> u64 {
    ctx.queue.org_in_flight(&org(o)).await.unwrap().0
}

async fn counter(ctx: &TestCtx, name: &str) -> u64 {
    ctx.queue
        .stats()
        .await
        .unwrap()
        .counters
        .get(name)
        .copied()
        .unwrap_or(0)
}

fn settle(id: &str, token: &str, outcome: Outcome) -> Settlement {
    Settlement {
        id: id.to_owned(),
        token: token.to_owned(),
        outcome,
    }
}

#[tokio::test]
async fn an_organisations_count_of_leased_jobs_goes_down_once_per_end_of_a_lease_and_a_stale_token_changes_nothing()
 {
    let ctx = TestCtx::new().await;
    enqueue(&ctx, Tier::Trial, ORG_A, 3).await;
    let leased = ctx.queue.fetch(3).await.unwrap();
    assert_eq!(leased.len(), 3);
    assert_eq!(counted(&ctx, ORG_A).await, 3);
    // Every kind of settle with a stale token is refused and leaves the count alone.
    for outcome in [
        Outcome::Done { result: None },
        Outcome::Retry {
            after: Duration::ZERO,
            error: "x".into(),
        },
        Outcome::Dead { reason: "x".into() },
        Outcome::Failed { reason: "x".into() },
        Outcome::Release,
        Outcome::Defer {
            after: Duration::ZERO,
            reason: "x".into(),
            why: aiq::queue::events::DelayReason::Other,
        },
    ] {
        let stale = settle(&leased[0].id, "999", outcome);
        assert_eq!(ctx.queue.settle(&[stale]).await.unwrap(), vec![false]);
    }
    assert_eq!(counted(&ctx, ORG_A).await, 3);

    // Done, then the same settle again (now stale): one down, once.
    let done = settle(
        &leased[0].id,
        &leased[0].token,
        Outcome::Done { result: None },
    );
    assert_eq!(
        ctx.queue.settle(std::slice::from_ref(&done)).await.unwrap(),
        vec![true]
    );
    assert_eq!(ctx.queue.settle(&[done]).await.unwrap(), vec![false]);
    assert_eq!(counted(&ctx, ORG_A).await, 2);
    // Released at shutdown.
    let release = settle(&leased[1].id, &leased[1].token, Outcome::Release);
    assert_eq!(ctx.queue.settle(&[release]).await.unwrap(), vec![true]);
    assert_eq!(counted(&ctx, ORG_A).await, 1);
    // A lease that expired (its worker died) is returned by the reaper.
    let mut redis = ctx.redis().await;
    let _: i64 = redis
        .zadd(ctx.key("inflight"), &leased[2].id, 0)
        .await
        .unwrap();
    ctx.queue.reap().await.unwrap();
    assert_eq!(counted(&ctx, ORG_A).await, 0);
    let field: Option<String> = redis.hget(ctx.key("org_inflight"), ORG_A).await.unwrap();
    assert_eq!(field, None, "a count that reaches zero leaves the hash");
    // The two returned jobs are leased again, then retried and deferred: both end the lease.
    let again = ctx.queue.fetch(3).await.unwrap();
    assert_eq!(again.len(), 2);
    assert_eq!(counted(&ctx, ORG_A).await, 2);
    let ends = [
        settle(
            &again[0].id,
            &again[0].token,
            Outcome::Retry {
                after: Duration::from_secs(60),
                error: "x".into(),
            },
        ),
        settle(
            &again[1].id,
            &again[1].token,
            Outcome::Defer {
                after: Duration::from_secs(60),
                reason: "x".into(),
                why: aiq::queue::events::DelayReason::Other,
            },
        ),
    ];
    assert_eq!(ctx.queue.settle(&ends).await.unwrap(), vec![true, true]);
    assert_eq!(counted(&ctx, ORG_A).await, 0);
}

#[tokio::test]
async fn fetch_passes_over_an_organisation_at_its_cap_without_leasing_it_and_serves_the_others_and_the_other_tiers()
 {
    let ctx = TestCtx::new().await;
    assert_eq!(
        ctx.queue.sync_org_limits(&[(org(ORG_A), 1)]).await.unwrap(),
        1
    );
    // The capped organisation is in the heaviest tier; the others must not wait for it.
    let a = enqueue(&ctx, Tier::EnterprisePlus, ORG_A, 3).await;
    enqueue(&ctx, Tier::EnterprisePlus, ORG_C, 1).await;
    enqueue(&ctx, Tier::Trial, ORG_B, 2).await;
    let first = ctx.queue.fetch(10).await.unwrap();
    let of = |jobs: &[aiq::queue::LeasedJob], o: &str| {
        jobs.iter().filter(|j| j.organization_id == o).count()
    };
    assert_eq!(
        (of(&first, ORG_A), of(&first, ORG_C), of(&first, ORG_B)),
        (1, 1, 2)
    );
    assert_eq!(first[0].id, a[0], "FIFO inside the organisation");
    assert!(counter(&ctx, "capped").await >= 1);
    // At its cap and nothing else waiting: nothing is leased, and nothing is counted as leased.
    assert!(ctx.queue.fetch(10).await.unwrap().is_empty());
    assert_eq!(counter(&ctx, "leased").await, 4);
    let a1 = first.iter().find(|j| j.organization_id == ORG_A).unwrap();
    let done = settle(&a1.id, &a1.token, Outcome::Done { result: None });
    assert_eq!(ctx.queue.settle(&[done]).await.unwrap(), vec![true]);
    let next = ctx.queue.fetch(10).await.unwrap();
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].id, a[1]);
    // 0 is no limit: the last one is leased beside it.
    ctx.queue.sync_org_limits(&[(org(ORG_A), 0)]).await.unwrap();
    let last = ctx.queue.fetch(10).await.unwrap();
    assert_eq!(last.len(), 1);
    assert_eq!(last[0].id, a[2]);
    assert_eq!(counted(&ctx, ORG_A).await, 2);
    assert_eq!(counter(&ctx, "leased").await, 6, "one lease per job");
}

#[tokio::test]
async fn an_organisations_own_cap_goes_over_its_tiers_default_and_zero_means_no_cap() {
    let ctx = TestCtx::with(&[(
        "AIQ_ORG_MAX_IN_FLIGHT",
        "enterprise_plus=0,enterprise=0,professional_agency=0,growth_team=0,solo_professional=0,trial=1",
    )])
    .await;
    ctx.queue
        .sync_org_limits(&[(org(ORG_B), 2), (org(ORG_C), 0)])
        .await
        .unwrap();
    for o in [ORG_A, ORG_B, ORG_C] {
        enqueue(&ctx, Tier::Trial, o, 3).await;
    }
    let leased = ctx.queue.fetch(20).await.unwrap();
    let of = |o: &str| leased.iter().filter(|j| j.organization_id == o).count();
    assert_eq!((of(ORG_A), of(ORG_B), of(ORG_C)), (1, 2, 3));
    // Dropping the override puts B back on its tier's default of 1.
    ctx.queue.sync_org_limits(&[(org(ORG_C), 0)]).await.unwrap();
    let b = leased.iter().find(|j| j.organization_id == ORG_B).unwrap();
    let done = settle(&b.id, &b.token, Outcome::Done { result: None });
    assert_eq!(ctx.queue.settle(&[done]).await.unwrap(), vec![true]);
    assert!(
        ctx.queue.fetch(20).await.unwrap().is_empty(),
        "B still has one leased: at its tier's cap"
    );
}

#[tokio::test]
async fn one_fetch_passes_over_at_most_32_organisations_at_their_caps_and_the_next_goes_on_from_there()
 {
    let ctx = TestCtx::new().await;
    let capped: Vec<String> = (0..40).map(|_| uuid::Uuid::new_v4().to_string()).collect();
    let caps: Vec<(OrganizationId, u32)> = capped.iter().map(|o| (org(o), 1)).collect();
    ctx.queue.sync_org_limits(&caps).await.unwrap();
    for o in &capped {
        enqueue(&ctx, Tier::Trial, o, 2).await;
    }
    // One job of each: all forty at their cap, each with one more waiting.
    assert_eq!(ctx.queue.fetch(100).await.unwrap().len(), 40);
    enqueue(&ctx, Tier::Trial, ORG_B, 1).await;
    let before = counter(&ctx, "capped").await;
    assert!(ctx.queue.fetch(1).await.unwrap().is_empty());
    let first = counter(&ctx, "capped").await - before;
    assert_eq!(first, 32, "one call passes over at most 32 organisations");
    let got = ctx.queue.fetch(1).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].organization_id, ORG_B);
    assert_eq!(
        counter(&ctx, "capped").await - before - first,
        8,
        "the ring kept turning: the second call starts where the first stopped"
    );
}

#[tokio::test]
async fn the_recount_puts_a_drifted_count_right_from_the_lease_set() {
    let ctx = TestCtx::new().await;
    enqueue(&ctx, Tier::Trial, ORG_A, 2).await;
    assert_eq!(ctx.queue.fetch(2).await.unwrap().len(), 2);
    assert_eq!(ctx.queue.recount_org_in_flight().await.unwrap(), Some(0));
    // A drift either way: a count too high would hold A back for good, one for an organisation
    // with nothing leased would too.
    let mut redis = ctx.redis().await;
    let _: () = redis
        .hset_multiple(ctx.key("org_inflight"), &[(ORG_A, "7"), (ORG_B, "3")])
        .await
        .unwrap();
    assert_eq!(ctx.queue.recount_org_in_flight().await.unwrap(), Some(2));
    assert_eq!(counted(&ctx, ORG_A).await, 2);
    assert_eq!(counted(&ctx, ORG_B).await, 0);
    // A hash of the wrong type is moved aside by the next lease, and the recount rebuilds it.
    let _: () = redis.del(ctx.key("org_inflight")).await.unwrap();
    let _: () = redis.set(ctx.key("org_inflight"), "junk").await.unwrap();
    enqueue(&ctx, Tier::Trial, ORG_A, 1).await;
    assert_eq!(ctx.queue.fetch(1).await.unwrap().len(), 1);
    assert_eq!(
        counted(&ctx, ORG_A).await,
        1,
        "counting restarted on a fresh hash"
    );
    ctx.queue.recount_org_in_flight().await.unwrap();
    assert_eq!(counted(&ctx, ORG_A).await, 3);
}

/// Runs `aiq org ARGS` on the test's settings; returns its stdout, failing on a bad exit.
fn aiq_org(ctx: &TestCtx, args: &[&str]) -> String {
    let out = aiq_command()
        .envs(&ctx.vars)
        .arg("org")
        .args(args)
        .output()
        .expect("running aiq org");
    assert!(
        out.status.success(),
        "aiq org {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// What the fake counted for `[fake:group=NAME]`: (running now, the most at once).
async fn group(ctx: &TestCtx, name: &str) -> (u64, u64) {
    let g = &ctx.fake_calls().await["groups"][name];
    (
        g["running"].as_u64().unwrap_or(0),
        g["max"].as_u64().unwrap_or(0),
    )
}

async fn enqueue_texts(ctx: &TestCtx, o: &str, texts: impl Iterator<Item = String>) {
    for text in texts {
        ctx.enqueue(
            JobKind::LlmComplete,
            Tier::GrowthTeam,
            o,
            &llm_payload(Tier::GrowthTeam, o, &text),
            3,
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_organisation_limited_to_two_calls_in_flight_never_has_more_across_three_processes_and_its_backlog_is_not_leased_again_and_again()
 {
    let ctx = TestCtx::with(&[("AIQ_CONCURRENCY", "4")]).await;
    let out = aiq_org(&ctx, &["set-limits", ORG_A, "--in-flight", "2"]);
    assert!(out.contains("in flight 2"), "{out}");
    // A's 100 slow calls and B's quick ones, in the same tier.
    enqueue_texts(
        &ctx,
        ORG_A,
        (0..100).map(|i| format!("[fake:delay=100][fake:group=a] job {i}")),
    )
    .await;
    enqueue_texts(
        &ctx,
        ORG_B,
        (0..20).map(|i| format!("[fake:group=b] job {i}")),
    )
    .await;
    let daemons: Vec<_> = (0..3).map(|_| ctx.spawn_daemon(&[])).collect();
    wait_until(
        Duration::from_secs(60),
        "the other organisation's jobs",
        || async { ctx.completed_of(ORG_B).await == 20 },
    )
    .await;
    let a_then = ctx.completed_of(ORG_A).await;
    assert!(
        a_then < 100,
        "B finished beside A's backlog, not after it ({a_then} of A's done)"
    );
    let show = aiq_org(&ctx, &["show", ORG_A, "--json"]);
    let show: serde_json::Value = serde_json::from_str(&show).unwrap();
    assert_eq!(show["limits"]["in_flight"]["override"], 2, "{show}");
    assert_eq!(show["limits"]["in_flight"]["in_force"], 2, "{show}");
    assert!(show["use"]["in_flight"].as_u64().unwrap() <= 2, "{show}");
    wait_until(Duration::from_secs(120), "A's backlog", || async {
        ctx.completed_of(ORG_A).await == 100
    })
    .await;
    for d in daemons {
        assert!(signal_and_wait(d, libc::SIGTERM).await.success());
    }
    let (_, a_most) = group(&ctx, "a").await;
    let (_, b_most) = group(&ctx, "b").await;
    let leased = counter(&ctx, "leased").await;
    let done = ctx.completed().await as u64;
    println!(
        "A: at most {a_most} calls at once; B: at most {b_most}; {leased} leases for {done} jobs, {} passed over at the cap, {} deferred",
        counter(&ctx, "capped").await,
        counter(&ctx, "deferred").await
    );
    assert_eq!(a_most, 2, "A's calls in flight across the three processes");
    assert!(b_most >= 1);
    assert_eq!(done, 120);
    assert!(
        leased < 10 * done,
        "{leased} leases for {done} completed jobs"
    );
    assert_eq!(counted(&ctx, ORG_A).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limit_changed_with_aiq_org_set_limits_holds_on_every_process_within_five_seconds() {
    // Two slots per process: six calls at once take all three processes.
    let ctx = TestCtx::with(&[("AIQ_CONCURRENCY", "2")]).await;
    aiq_org(&ctx, &["set-limits", ORG_A, "--in-flight", "2"]);
    enqueue_texts(
        &ctx,
        ORG_A,
        (0..12).map(|i| format!("[fake:hold][fake:group=held] job {i}")),
    )
    .await;
    let daemons: Vec<_> = (0..3).map(|_| ctx.spawn_daemon(&[])).collect();
    wait_until(Duration::from_secs(60), "two held calls", || async {
        group(&ctx, "held").await.0 == 2
    })
    .await;
    assert_eq!(group(&ctx, "held").await.1, 2);

    aiq_org(&ctx, &["set-limits", ORG_A, "--in-flight", "6"]);
    let raised = Instant::now();
    wait_until(
        Duration::from_secs(5),
        "six held calls: two on each of the three processes",
        || async { group(&ctx, "held").await.0 == 6 },
    )
    .await;
    println!(
        "raised to 6: held on every process after {:?}",
        raised.elapsed()
    );

    aiq_org(&ctx, &["set-limits", ORG_A, "--in-flight", "1"]);
    let lowered = Instant::now();
    wait_until(
        Duration::from_secs(5),
        "the queue to hold the new cap",
        || async { ctx.queue.org_in_flight(&org(ORG_A)).await.unwrap().1 == Some(1) },
    )
    .await;
    println!("lowered to 1: in the queue after {:?}", lowered.elapsed());
    enqueue_texts(
        &ctx,
        ORG_A,
        (0..6).map(|i| format!("[fake:delay=30][fake:group=one] job {i}")),
    )
    .await;
    let release = format!("{}/_fake/release", ctx.vars["AIQ_OPENAI_BASE_URL"]);
    reqwest::Client::new().post(release).send().await.unwrap();
    wait_until(Duration::from_secs(60), "every job", || async {
        ctx.completed().await == 18
    })
    .await;
    for d in daemons {
        assert!(signal_and_wait(d, libc::SIGTERM).await.success());
    }
    assert_eq!(group(&ctx, "held").await.1, 6);
    assert_eq!(
        group(&ctx, "one").await.1,
        1,
        "after the cap was lowered to 1 the jobs ran one at a time"
    );

    // Cleared: back to the tier's default.
    let out = aiq_org(&ctx, &["set-limits", ORG_A, "--clear", "in-flight"]);
    assert!(out.contains("in flight tier default"), "{out}");
    let show = aiq_org(&ctx, &["show", ORG_A]);
    assert!(show.contains("jobs in flight"), "{show}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_organisations_own_jobs_per_minute_set_while_a_worker_runs_holds_its_jobs_to_it() {
    // The tier's default (the harness's) is no limit.
    let ctx = TestCtx::new().await;
    let worker = ctx.start_worker();
    let minute = ctx.redis_minute().await;
    // The in-flight override comes in the same refresh, after the rate's: once the queue holds
    // it, the worker's rate check holds the new rate too.
    aiq_org(
        &ctx,
        &[
            "set-limits",
            ORG_A,
            "--jobs-per-minute",
            "3",
            "--in-flight",
            "0",
        ],
    );
    wait_until(
        Duration::from_secs(5),
        "the worker to follow the change",
        || async { ctx.queue.org_in_flight(&org(ORG_A)).await.unwrap().1 == Some(0) },
    )
    .await;
    let ids = enqueue(&ctx, Tier::GrowthTeam, ORG_A, 10).await;
    let rated = || async {
        let mut n = 0;
        for id in &ids {
            let s = ctx.queue.status(id).await.unwrap();
            if s.and_then(|s| s.delay_reason).as_deref() == Some("org_rate") {
                n += 1;
            }
        }
        n
    };
    wait_until(
        Duration::from_secs(60),
        "the jobs over the rate to wait",
        || async { ctx.completed_of(ORG_A).await + rated().await == 10 },
    )
    .await;
    worker.stop().await;
    let done = ctx.completed_of(ORG_A).await;
    if ctx.redis_minute().await == minute {
        assert_eq!(
            done, 3,
            "three jobs in the minute, the rest wait for the next"
        );
    } else {
        assert!(done <= 6, "two windows at most: {done}");
    }
}
