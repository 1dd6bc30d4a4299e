//! The queue's scripts against real Redis: leases and fencing tokens, idempotency, tier order.

use std::collections::HashMap;
use std::time::Duration;

use aiq::domain::{JobKind, OrganizationId, Tier};
use aiq::queue::{NewJob, Outcome, Settlement};

use crate::harness::{ORG_A, ORG_B, TestCtx, llm_payload, wait_for, wait_until};

fn job(tier: Tier, org: &str) -> NewJob {
    NewJob {
        kind: JobKind::LlmComplete,
        tier,
        organization_id: OrganizationId::parse(org).unwrap(),
        payload: llm_payload(tier, org, "x"),
        job_id: None,
        delay: Duration::ZERO,
        idempotency_key: None,
        max_attempts: 0,
    }
}

#[tokio::test]
async fn a_stale_fencing_token_cannot_settle_a_job() {
    let ctx = TestCtx::new().await;
    let id = ctx
        .queue
        .enqueue(&job(Tier::Trial, ORG_A))
        .await
        .unwrap()
        .job_id;
    let leased = ctx.queue.fetch(1).await.unwrap();
    assert_eq!(leased.len(), 1);
    assert_eq!(leased[0].id, id);
    let wrong = Settlement {
        id: id.clone(),
        token: "999".into(),
        outcome: Outcome::Done { result: None },
    };
    assert_eq!(ctx.queue.settle(&[wrong]).await.unwrap(), vec![false]);
    // Retry and dead-letter with a stale token are refused too.
    for outcome in [
        Outcome::Retry {
            after: Duration::ZERO,
            error: "x".into(),
        },
        Outcome::Dead { reason: "x".into() },
        Outcome::Release,
    ] {
        let stale = Settlement {
            id: id.clone(),
            token: "0".into(),
            outcome,
        };
        assert_eq!(ctx.queue.settle(&[stale]).await.unwrap(), vec![false]);
    }
    assert_eq!(ctx.queue.stats().await.unwrap().inflight, 1);
    let right = Settlement {
        id,
        token: leased[0].token.clone(),
        outcome: Outcome::Done { result: None },
    };
    assert_eq!(
        ctx.queue
            .settle(std::slice::from_ref(&right))
            .await
            .unwrap(),
        vec![true]
    );
    // Settling twice is refused: the lease is gone.
    assert_eq!(ctx.queue.settle(&[right]).await.unwrap(), vec![false]);
    assert_eq!(ctx.queue.stats().await.unwrap().inflight, 0);
}

#[tokio::test]
async fn an_expired_lease_returns_the_job_without_spending_an_attempt() {
    // A lease long enough that no stall of a busy machine between the two fetches outlasts it.
    let ctx = TestCtx::with(&[("AIQ_LEASE_MS", "3000")]).await;
    let id = ctx
        .queue
        .enqueue(&job(Tier::Trial, ORG_A))
        .await
        .unwrap()
        .job_id;
    let first = ctx.queue.fetch(1).await.unwrap().remove(0);
    assert!(
        ctx.queue.fetch(1).await.unwrap().is_empty(),
        "a leased job is not handed out twice"
    );
    // Each fetch first returns expired leases: wait for the one that hands the job out again.
    let again = wait_for(Duration::from_secs(30), "the lease to expire", || async {
        let got = ctx.queue.fetch(1).await.unwrap();
        (!got.is_empty()).then_some(got)
    })
    .await;
    assert_eq!(again.len(), 1, "the reaper returned the job");
    assert_eq!(again[0].id, id);
    assert_eq!(again[0].attempts, 0, "an interruption spends no attempt");
    assert_ne!(again[0].token, first.token);
    // The first worker's late outcome is refused; the second one's is applied.
    let late = Settlement {
        id: id.clone(),
        token: first.token,
        outcome: Outcome::Done { result: None },
    };
    assert_eq!(ctx.queue.settle(&[late]).await.unwrap(), vec![false]);
    let ok = Settlement {
        id,
        token: again[0].token.clone(),
        outcome: Outcome::Done { result: None },
    };
    assert_eq!(ctx.queue.settle(&[ok]).await.unwrap(), vec![true]);
    // A finished job leaves Redis.
    assert!(ctx.queue.job_fields(&again[0].id).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_job_interrupted_too_often_goes_to_the_dead_set() {
    let ctx = TestCtx::with(&[("AIQ_LEASE_MS", "1000"), ("AIQ_MAX_INTERRUPTS", "2")]).await;
    let id = ctx
        .queue
        .enqueue(&job(Tier::Trial, ORG_A))
        .await
        .unwrap()
        .job_id;
    assert_eq!(ctx.queue.fetch(1).await.unwrap().len(), 1);
    // Each fetch first returns expired leases; nothing else leases this queue's jobs, so the job
    // comes back exactly once before it is dead.
    let returned = std::sync::atomic::AtomicUsize::new(0);
    wait_until(
        Duration::from_secs(30),
        "the second interruption",
        || async {
            let got = ctx.queue.fetch(1).await.unwrap().len();
            returned.fetch_add(got, std::sync::atomic::Ordering::Relaxed);
            !ctx.queue.dead_jobs(1).await.unwrap().is_empty()
        },
    )
    .await;
    assert_eq!(
        returned.into_inner(),
        1,
        "back after the first interruption"
    );
    assert!(
        ctx.queue.fetch(1).await.unwrap().is_empty(),
        "dead after the second"
    );
    let dead = ctx.queue.dead_jobs(1).await.unwrap();
    assert_eq!(dead[0].id, id);
    assert!(
        dead[0].reason.contains("interrupted 2 times"),
        "{}",
        dead[0].reason
    );
    assert_eq!(dead[0].attempts, 0, "interruptions are not failed attempts");
}

#[tokio::test]
async fn a_retry_waits_in_the_delayed_set_and_counts_an_attempt() {
    let ctx = TestCtx::new().await;
    let id = ctx
        .queue
        .enqueue(&job(Tier::Trial, ORG_A))
        .await
        .unwrap()
        .job_id;
    let l = ctx.queue.fetch(1).await.unwrap().remove(0);
    let retry = Settlement {
        id: id.clone(),
        token: l.token,
        outcome: Outcome::Retry {
            // Long enough that no stall of a busy machine makes it due before the next line.
            after: Duration::from_millis(3000),
            error: "503".into(),
        },
    };
    assert_eq!(ctx.queue.settle(&[retry]).await.unwrap(), vec![true]);
    assert!(ctx.queue.fetch(1).await.unwrap().is_empty(), "not due yet");
    assert_eq!(ctx.queue.stats().await.unwrap().delayed, 1);
    let again = wait_for(Duration::from_secs(30), "the retry to be due", || async {
        let got = ctx.queue.fetch(1).await.unwrap();
        (!got.is_empty()).then_some(got)
    })
    .await;
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].attempts, 1);
}

#[tokio::test]
async fn an_idempotency_key_returns_the_first_job_id() {
    let ctx = TestCtx::new().await;
    let mut j = job(Tier::Enterprise, ORG_A);
    j.idempotency_key = Some("photo-42".into());
    let first = ctx.queue.enqueue(&j).await.unwrap();
    let second = ctx.queue.enqueue(&j).await.unwrap();
    assert!(!first.duplicate);
    assert!(second.duplicate);
    assert_eq!(first.job_id, second.job_id);
    let ttl: i64 = redis::cmd("TTL")
        .arg(ctx.key(&format!("idem:{ORG_A}:photo-42")))
        .query_async(&mut ctx.redis().await)
        .await
        .unwrap();
    assert!(
        (86_000..=86_400).contains(&ttl),
        "the key expires (ttl {ttl})"
    );
    let mut named = job(Tier::Enterprise, ORG_A);
    named.job_id = Some("my-id-1".into());
    assert!(!ctx.queue.enqueue(&named).await.unwrap().duplicate);
    assert!(ctx.queue.enqueue(&named).await.unwrap().duplicate);
    assert_eq!(ctx.queue.stats().await.unwrap().waiting["enterprise"], 2);
}

#[tokio::test]
async fn enqueue_refuses_bad_arguments_with_a_clear_error_and_writes_nothing() {
    let ctx = TestCtx::new().await;
    let mut j = job(Tier::Trial, ORG_A);
    j.payload = String::new();
    let err = ctx.queue.enqueue(&j).await.unwrap_err().to_string();
    assert!(err.contains("empty payload"), "{err}");
    let mut j = job(Tier::Trial, ORG_A);
    j.job_id = Some("has space".into());
    let err = ctx.queue.enqueue(&j).await.unwrap_err().to_string();
    assert!(err.contains("job_id"), "{err}");
    assert_eq!(
        ctx.queue
            .stats()
            .await
            .unwrap()
            .waiting
            .values()
            .sum::<u64>(),
        0
    );
}

#[tokio::test]
async fn with_every_tier_backlogged_10000_fetches_follow_the_weights_within_5_percent() {
    let ctx = TestCtx::new().await;
    // Weights 32:16:8:4:2:1 sum to 63. Each tier gets a few more jobs than its share of 10,000,
    // so every tier stays backlogged for the whole measurement.
    let weights = [32u64, 16, 8, 4, 2, 1];
    let share = |w: u64| 10_000 * w / 63;
    for (tier, w) in Tier::ALL.iter().zip(weights) {
        for _ in 0..share(w) + 20 {
            ctx.queue.enqueue(&job(*tier, ORG_A)).await.unwrap();
        }
    }
    let mut counts: HashMap<String, u64> = HashMap::new();
    let mut fetched = 0;
    while fetched < 10_000 {
        for j in ctx.queue.fetch(50.min(10_000 - fetched)).await.unwrap() {
            *counts.entry(j.tier).or_default() += 1;
            fetched += 1;
        }
    }
    for (tier, w) in Tier::ALL.iter().zip(weights) {
        let got = counts.get(tier.as_str()).copied().unwrap_or(0) as f64;
        let want = share(w) as f64;
        assert!(
            (got - want).abs() <= want * 0.05 + 1.0,
            "{tier}: got {got}, want {want} ({counts:?})"
        );
    }
}

#[tokio::test]
async fn a_tier_alone_gets_all_the_capacity_and_an_idle_tier_banks_no_credit() {
    let ctx = TestCtx::new().await;
    for _ in 0..50 {
        ctx.queue.enqueue(&job(Tier::Trial, ORG_A)).await.unwrap();
    }
    let got = ctx.queue.fetch(50).await.unwrap();
    assert_eq!(got.len(), 50);
    assert!(got.iter().all(|j| j.tier == "trial"));
    // Trial ran alone for a while; enterprise_plus arriving now does not get trial's past share,
    // and trial is not starved afterwards either: it keeps its 1 in 33 (ties go to the higher tier).
    for _ in 0..80 {
        ctx.queue.enqueue(&job(Tier::Trial, ORG_A)).await.unwrap();
        ctx.queue
            .enqueue(&job(Tier::EnterprisePlus, ORG_A))
            .await
            .unwrap();
    }
    let next = ctx.queue.fetch(66).await.unwrap();
    let trial = next.iter().filter(|j| j.tier == "trial").count();
    assert!((1..=2).contains(&trial), "trial got {trial} of 66");
    assert!(next[..32].iter().all(|j| j.tier == "enterprise_plus"));
}

#[tokio::test]
async fn strict_mode_always_takes_the_highest_tier_with_work() {
    let ctx = TestCtx::with(&[("AIQ_SCHEDULING", "strict")]).await;
    for tier in [Tier::Trial, Tier::GrowthTeam, Tier::EnterprisePlus] {
        for _ in 0..3 {
            ctx.queue.enqueue(&job(tier, ORG_A)).await.unwrap();
        }
    }
    let order: Vec<String> = ctx
        .queue
        .fetch(9)
        .await
        .unwrap()
        .into_iter()
        .map(|j| j.tier)
        .collect();
    let want: Vec<&str> = ["enterprise_plus"; 3]
        .into_iter()
        .chain(["growth_team"; 3])
        .chain(["trial"; 3])
        .collect();
    assert_eq!(order, want);
}

#[tokio::test]
async fn organisations_of_one_tier_take_turns_and_each_keeps_its_order() {
    let ctx = TestCtx::new().await;
    let mut a_ids = Vec::new();
    for _ in 0..5 {
        a_ids.push(
            ctx.queue
                .enqueue(&job(Tier::Enterprise, ORG_A))
                .await
                .unwrap()
                .job_id,
        );
    }
    let b_id = ctx
        .queue
        .enqueue(&job(Tier::Enterprise, ORG_B))
        .await
        .unwrap()
        .job_id;
    let got = ctx.queue.fetch(3).await.unwrap();
    assert_eq!(got[0].id, a_ids[0]);
    assert_eq!(
        got[1].id, b_id,
        "org B's one job does not wait behind org A's flood"
    );
    assert_eq!(got[2].id, a_ids[1]);
}

#[tokio::test]
async fn stats_show_each_tiers_oldest_waiting_job_and_the_running_totals() {
    let ctx = TestCtx::new().await;
    ctx.queue.enqueue(&job(Tier::Trial, ORG_A)).await.unwrap();
    ctx.queue.enqueue(&job(Tier::Trial, ORG_B)).await.unwrap();
    wait_until(
        Duration::from_secs(30),
        "the trial jobs to be 300 ms old",
        || async { ctx.queue.stats().await.unwrap().oldest_age_ms["trial"] >= 300 },
    )
    .await;
    ctx.queue
        .enqueue(&job(Tier::Enterprise, ORG_A))
        .await
        .unwrap();
    let s = ctx.queue.stats().await.unwrap();
    assert!(s.oldest_age_ms["trial"] >= 300, "{s:?}");
    // The enterprise job came at least 300 ms after the trial ones, however slow the machine.
    assert!(
        s.oldest_age_ms["enterprise"] + 300 <= s.oldest_age_ms["trial"],
        "{s:?}"
    );
    assert_eq!(s.oldest_age_ms["growth_team"], 0);
    assert_eq!(s.counters["enqueued"], 3);
    // Taking the enterprise job leaves the trial ones as the oldest; taking both trial jobs
    // empties the tier.
    let got = ctx.queue.fetch(3).await.unwrap();
    assert_eq!(got.len(), 3);
    let s = ctx.queue.stats().await.unwrap();
    assert_eq!(s.waiting.values().sum::<u64>(), 0);
    assert_eq!(s.oldest_age_ms["trial"], 0);
    assert_eq!(s.counters["leased"], 3);
}

#[tokio::test]
async fn dead_jobs_can_be_listed_shown_retried_and_purged() {
    let ctx = TestCtx::new().await;
    let mut ids = Vec::new();
    for tier in [Tier::Trial, Tier::Enterprise, Tier::GrowthTeam] {
        ids.push(ctx.queue.enqueue(&job(tier, ORG_A)).await.unwrap().job_id);
    }
    let leased = ctx.queue.fetch(3).await.unwrap();
    let kill: Vec<Settlement> = leased
        .iter()
        .map(|l| Settlement {
            id: l.id.clone(),
            token: l.token.clone(),
            outcome: Outcome::Dead {
                reason: format!("bad input for {}", l.id),
            },
        })
        .collect();
    assert_eq!(ctx.queue.settle(&kill).await.unwrap(), vec![true; 3]);
    let dead = ctx.queue.dead_jobs(10).await.unwrap();
    assert_eq!(dead.len(), 3);
    assert!(
        dead.iter()
            .all(|d| d.reason == format!("bad input for {}", d.id) && d.attempts == 1)
    );
    let shown = ctx.queue.job_fields(&ids[0]).await.unwrap();
    assert_eq!(shown["state"], "dead");
    assert!(shown["payload"].contains("organization_id"));

    assert_eq!(
        ctx.queue
            .dead_retry(std::slice::from_ref(&ids[0]))
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        ctx.queue
            .dead_retry(std::slice::from_ref(&ids[0]))
            .await
            .unwrap(),
        0,
        "no longer dead"
    );
    let again = ctx.queue.fetch(1).await.unwrap();
    assert_eq!(again[0].id, ids[0]);
    assert_eq!(
        again[0].attempts, 0,
        "a retried dead job gets its attempts back"
    );

    assert_eq!(
        ctx.queue
            .dead_purge(std::slice::from_ref(&ids[1]))
            .await
            .unwrap(),
        1
    );
    assert!(ctx.queue.job_fields(&ids[1]).await.unwrap().is_empty());
    assert_eq!(ctx.queue.dead_all(false).await.unwrap(), 1);
    assert_eq!(ctx.queue.stats().await.unwrap().dead, 0);
}

#[tokio::test]
async fn the_dead_set_is_capped_by_count() {
    let ctx = TestCtx::with(&[("AIQ_DEAD_MAX_JOBS", "5")]).await;
    for _ in 0..8 {
        ctx.queue.enqueue(&job(Tier::Trial, ORG_A)).await.unwrap();
    }
    let leased = ctx.queue.fetch(8).await.unwrap();
    for l in &leased {
        let s = Settlement {
            id: l.id.clone(),
            token: l.token.clone(),
            outcome: Outcome::Dead { reason: "x".into() },
        };
        ctx.queue.settle(&[s]).await.unwrap();
    }
    let dead = ctx.queue.dead_jobs(100).await.unwrap();
    assert_eq!(dead.len(), 5);
    // The newest five stay; the three oldest are gone, hash and all.
    let kept: Vec<&str> = dead.iter().map(|d| d.id.as_str()).collect();
    for l in &leased[..3] {
        assert!(!kept.contains(&l.id.as_str()));
        assert!(ctx.queue.job_fields(&l.id).await.unwrap().is_empty());
    }
}

#[tokio::test]
async fn two_consumers_fetching_at_once_never_get_the_same_job() {
    let ctx = TestCtx::new().await;
    for i in 0..600 {
        ctx.queue
            .enqueue(&job(Tier::ALL[i % 6], ORG_A))
            .await
            .unwrap();
    }
    let (a, b) = (ctx.queue.clone(), ctx.queue.clone());
    let take = |q: aiq::queue::Queue| async move {
        let mut ids = Vec::new();
        loop {
            let got = q.fetch(7).await.unwrap();
            if got.is_empty() {
                return ids;
            }
            ids.extend(got.into_iter().map(|j| j.id));
        }
    };
    let (ia, ib) = tokio::join!(tokio::spawn(take(a)), tokio::spawn(take(b)));
    let (ia, ib) = (ia.unwrap(), ib.unwrap());
    let mut all: Vec<String> = ia.iter().chain(ib.iter()).cloned().collect();
    assert_eq!(all.len(), 600);
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 600, "no job was handed to both");
}

#[tokio::test]
async fn a_batch_enqueues_in_one_round_trip_and_a_refused_job_refuses_only_itself() {
    let ctx = TestCtx::new().await;
    let mut jobs: Vec<NewJob> = (0..6).map(|i| job(Tier::ALL[i], ORG_A)).collect();
    jobs[2].payload = String::new();
    jobs[4].job_id = Some("fixed-id".into());
    jobs.push(NewJob {
        job_id: Some("fixed-id".into()),
        ..job(Tier::Trial, ORG_B)
    });
    let replies = ctx.queue.enqueue_batch(&jobs).await.unwrap();
    assert_eq!(replies.len(), 7);
    let refused = replies[2].as_ref().unwrap_err().to_string();
    assert!(refused.contains("empty payload"), "{refused}");
    assert_eq!(replies[4].as_ref().unwrap().job_id, "fixed-id");
    let dup = replies[6].as_ref().unwrap();
    assert!(dup.duplicate && dup.job_id == "fixed-id");
    assert_eq!(
        replies
            .iter()
            .filter(|r| matches!(r, Ok(e) if !e.duplicate))
            .count(),
        5
    );
    let stats = ctx.queue.stats().await.unwrap();
    assert_eq!(stats.waiting.values().sum::<u64>(), 5);
    // After a SCRIPT FLUSH (as after a Redis restart) the batch loads the script again.
    let mut r = ctx.redis().await;
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut r)
        .await
        .unwrap();
    let again = ctx.queue.enqueue_batch(&jobs[..2]).await.unwrap();
    assert!(again.iter().all(|r| r.is_ok()));
}

/// What the sets hold per tier, read job by job: the truth `{p}:held` must keep.
async fn recount(ctx: &TestCtx) -> HashMap<String, u64> {
    let mut r = ctx.redis().await;
    let mut out = HashMap::new();
    for set in ["inflight", "delayed", "dead"] {
        let ids: Vec<String> = redis::cmd("ZRANGE")
            .arg(ctx.key(set))
            .arg(0)
            .arg(-1)
            .query_async(&mut r)
            .await
            .unwrap();
        for id in ids {
            let (tier, reason): (Option<String>, Option<String>) = redis::cmd("HMGET")
                .arg(ctx.key(&format!("job:{id}")))
                .arg("tier")
                .arg("delay_reason")
                .query_async(&mut r)
                .await
                .unwrap();
            let tier = tier.expect("every job in a set has its tier");
            *out.entry(format!("{set}:{tier}")).or_insert(0) += 1;
            if set == "delayed" {
                *out.entry(format!("reason:{}", reason.unwrap()))
                    .or_insert(0) += 1;
            }
        }
    }
    out
}

/// The same from `Queue::stats`, which reads `{p}:held`.
fn counted(s: &aiq::queue::QueueStats) -> HashMap<String, u64> {
    let mut out = HashMap::new();
    for (set, by) in [
        ("inflight", &s.inflight_by_tier),
        ("delayed", &s.delayed_by_tier),
        ("dead", &s.dead_by_tier),
        ("reason", &s.delayed_by_reason),
    ] {
        for (k, n) in by {
            if *n > 0 {
                out.insert(format!("{set}:{k}"), *n);
            }
        }
    }
    out
}

/// Every script that moves a job in or out of the lease, delayed or dead set keeps the per-tier
/// counts: a random walk of enqueues (some scheduled), leases, every kind of settle, expired
/// leases, promotions, dead-set retries and purges and cancels, checked after each step
/// against a recount of the sets job by job. Seeded, so a failure names its seed and replays.
#[tokio::test]
async fn the_per_tier_counts_of_leased_delayed_and_dead_jobs_follow_every_move() {
    use aiq::queue::events::DelayReason;
    let ctx = TestCtx::with(&[("AIQ_LEASE_MS", "600000")]).await;
    let tiers = Tier::ALL;
    let mut steps = 0;
    for seed in [7_u64, 11, 42] {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut leased: Vec<aiq::queue::LeasedJob> = Vec::new();
        let mut all: Vec<String> = Vec::new();
        for step in 0..250 {
            let what = rng.u8(0..10);
            match what {
                0 | 1 => {
                    let mut j = job(
                        tiers[rng.usize(0..tiers.len())],
                        [ORG_A, ORG_B][rng.usize(0..2)],
                    );
                    if rng.u8(0..5) == 0 {
                        j.delay = Duration::from_secs(3600);
                    }
                    all.push(ctx.queue.enqueue(&j).await.unwrap().job_id);
                }
                2 => leased.extend(ctx.queue.fetch(rng.usize(1..4)).await.unwrap()),
                3 | 4 if !leased.is_empty() => {
                    let l = leased.swap_remove(rng.usize(0..leased.len()));
                    let later = if rng.bool() {
                        Duration::ZERO
                    } else {
                        Duration::from_secs(3600)
                    };
                    let outcome = match rng.u8(0..6) {
                        0 => Outcome::Done { result: None },
                        1 => Outcome::Retry {
                            after: later,
                            error: "boom".into(),
                        },
                        2 => Outcome::Defer {
                            after: later,
                            reason: "wait".into(),
                            why: DelayReason::ALL[rng.usize(0..DelayReason::ALL.len())],
                        },
                        3 => Outcome::Dead {
                            reason: "out of attempts".into(),
                        },
                        4 => Outcome::Failed {
                            reason: "bad input".into(),
                        },
                        _ => Outcome::Release,
                    };
                    let s = Settlement {
                        id: l.id,
                        token: l.token,
                        outcome,
                    };
                    assert_eq!(ctx.queue.settle(&[s]).await.unwrap(), vec![true]);
                }
                5 if !leased.is_empty() => {
                    // Its worker died: the lease's deadline is put in the past, then reaped.
                    let l = leased.swap_remove(rng.usize(0..leased.len()));
                    let _: () = redis::cmd("ZADD")
                        .arg(ctx.key("inflight"))
                        .arg("XX")
                        .arg(0)
                        .arg(&l.id)
                        .query_async(&mut ctx.redis().await)
                        .await
                        .unwrap();
                    ctx.queue.reap().await.unwrap();
                }
                6 => {
                    let dead = ctx.queue.dead_jobs(50).await.unwrap();
                    if !dead.is_empty() {
                        let id = dead[rng.usize(0..dead.len())].id.clone();
                        if rng.bool() {
                            assert_eq!(ctx.queue.dead_retry(&[id]).await.unwrap(), 1);
                        } else {
                            assert_eq!(ctx.queue.dead_purge(&[id]).await.unwrap(), 1);
                        }
                    }
                }
                7 if !all.is_empty() => {
                    let id = &all[rng.usize(0..all.len())];
                    ctx.queue.cancel(id).await.unwrap();
                }
                _ => ctx.queue.reap().await.unwrap(),
            }
            let truth = recount(&ctx).await;
            let stats = ctx.queue.stats().await.unwrap();
            assert_eq!(
                counted(&stats),
                truth,
                "seed {seed}, step {step} (move {what})"
            );
            let sum = |m: &std::collections::BTreeMap<String, u64>| m.values().sum::<u64>();
            assert_eq!(sum(&stats.inflight_by_tier), stats.inflight);
            assert_eq!(sum(&stats.delayed_by_tier), stats.delayed);
            assert_eq!(sum(&stats.dead_by_tier), stats.dead);
            assert_eq!(stats.skipped.total(), 0);
            steps += 1;
        }
        // The leases left are settled; the next seed goes on from what the queue holds.
        for l in leased.drain(..) {
            let s = Settlement {
                id: l.id,
                token: l.token,
                outcome: Outcome::Done { result: None },
            };
            ctx.queue.settle(&[s]).await.unwrap();
        }
    }
    assert_eq!(steps, 750);
    // Every move was seen at least once across the seeds: the walk is not a few enqueues.
    let s = ctx.queue.stats().await.unwrap();
    for e in [
        "leased",
        "done",
        "retried",
        "deferred",
        "dead",
        "released",
        "interrupted",
        "revived",
        "purged",
        "cancelled",
    ] {
        assert!(
            s.counters.get(e).copied().unwrap_or(0) > 0,
            "{e} never happened: {:?}",
            s.counters
        );
    }
}
