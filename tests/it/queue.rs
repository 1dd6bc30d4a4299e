//! The queue's scripts against real Redis: leases and fencing tokens, idempotency, tier order.

use std::collections::HashMap;
use std::time::Duration;

use aiq::domain::{JobKind, OrganizationId, Tier};
use aiq::queue::{NewJob, Outcome, Settlement};

use crate::harness::{ORG_A, ORG_B, TestCtx, llm_payload};

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
        outcome: Outcome::Done,
    };
    assert_eq!(ctx.queue.settle(&[wrong]).await.unwrap(), vec![false]);
    assert_eq!(ctx.queue.stats().await.unwrap().inflight, 1);
    let right = Settlement {
        id,
        token: leased[0].token.clone(),
        outcome: Outcome::Done,
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
    let ctx = TestCtx::with(&[("AIQ_LEASE_MS", "1000")]).await;
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
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let again = ctx.queue.fetch(1).await.unwrap();
    assert_eq!(again.len(), 1, "the reaper returned the job");
    assert_eq!(again[0].id, id);
    assert_eq!(again[0].attempts, 0, "an interruption spends no attempt");
    assert_ne!(again[0].token, first.token);
    // The first worker's late outcome is refused; the second one's is applied.
    let late = Settlement {
        id: id.clone(),
        token: first.token,
        outcome: Outcome::Done,
    };
    assert_eq!(ctx.queue.settle(&[late]).await.unwrap(), vec![false]);
    let ok = Settlement {
        id,
        token: again[0].token.clone(),
        outcome: Outcome::Done,
    };
    assert_eq!(ctx.queue.settle(&[ok]).await.unwrap(), vec![true]);
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
            after: Duration::from_millis(300),
            error: "503".into(),
        },
    };
    assert_eq!(ctx.queue.settle(&[retry]).await.unwrap(), vec![true]);
    assert!(ctx.queue.fetch(1).await.unwrap().is_empty(), "not due yet");
    assert_eq!(ctx.queue.stats().await.unwrap().delayed, 1);
    tokio::time::sleep(Duration::from_millis(350)).await;
    let again = ctx.queue.fetch(1).await.unwrap();
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
async fn with_every_tier_backlogged_fetches_follow_the_weights() {
    let ctx = TestCtx::new().await;
    for tier in Tier::ALL {
        for _ in 0..320 {
            ctx.queue.enqueue(&job(tier, ORG_A)).await.unwrap();
        }
    }
    // Weights 32:16:8:4:2:1 sum to 63: the first 630 fetched split 320:160:80:40:20:10.
    let mut counts: HashMap<String, usize> = HashMap::new();
    let mut fetched = 0;
    while fetched < 630 {
        for j in ctx.queue.fetch(10).await.unwrap() {
            *counts.entry(j.tier).or_default() += 1;
            fetched += 1;
        }
    }
    let expected = [320, 160, 80, 40, 20, 10];
    for (tier, want) in Tier::ALL.iter().zip(expected) {
        let got = counts.get(tier.as_str()).copied().unwrap_or(0) as i64;
        assert!(
            (got - want as i64).abs() <= 1,
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
