//! One tenant cannot hold back another: an organisation whose calls keep failing opens only its
//! own breaker, and one organisation's jobs take at most its tier's share of a process.

use std::time::{Duration, Instant};

use aiq::domain::{JobKind, Tier};

use crate::harness::{ORG_A, ORG_B, TestCtx, llm_payload, wait_until};

fn gemini(tier: Tier, org: &str, text: &str) -> String {
    let mut v: serde_json::Value =
        serde_json::from_str(&llm_payload(tier, org, text)).expect("payload");
    v["provider"] = "gemini".into();
    v["model"] = "gemini-2.5-flash".into();
    v.to_string()
}

/// Enqueues `n` jobs of ORG_B and waits for them all to complete: how long that took.
async fn b_jobs_take(ctx: &TestCtx, n: usize, tag: &str, within: Duration) -> Duration {
    let before = ctx.completed_of(ORG_B).await;
    let started = Instant::now();
    for i in 0..n {
        ctx.enqueue(
            JobKind::LlmComplete,
            Tier::Enterprise,
            ORG_B,
            &gemini(Tier::Enterprise, ORG_B, &format!("{tag} {i}")),
            3,
        )
        .await;
    }
    wait_until(
        within,
        "the other organisation's jobs to complete",
        || async { ctx.completed_of(ORG_B).await == before + n as i64 },
    )
    .await;
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_organisations_hanging_calls_open_only_its_own_breaker_and_another_organisations_jobs_go_on()
 {
    // Two failures open a breaker, for a whole minute: under one breaker per provider, the
    // other organisation's jobs would wait that minute.
    let ctx = TestCtx::with(&[
        ("AIQ_GEMINI_TIMEOUT_MS", "500"),
        ("AIQ_BREAKER_FAILURES", "2"),
        ("AIQ_BREAKER_COOLDOWN_MS", "60000"),
        ("AIQ_CONCURRENCY", "8"),
    ])
    .await;
    let worker = ctx.start_worker();
    let normal = b_jobs_take(&ctx, 3, "alone", Duration::from_secs(30)).await;
    // Four trial jobs of another organisation whose calls hang until aiq's timeout.
    for i in 0..4 {
        ctx.enqueue(
            JobKind::LlmComplete,
            Tier::Trial,
            ORG_A,
            &gemini(Tier::Trial, ORG_A, &format!("[fake:delay=30000] slow {i}")),
            5,
        )
        .await;
    }
    wait_until(
        Duration::from_secs(30),
        "the hanging calls to time out",
        || async {
            ctx.scalar_i64("SELECT count(*) FROM ai_processing_errors WHERE error_type = 'timeout'")
                .await
                >= 2
        },
    )
    .await;
    let app = aiq::worker::app(&ctx.settings, ctx.store.clone())
        .await
        .unwrap();
    assert!(
        app.breakers
            .admit(aiq::domain::Provider::Gemini, ORG_A)
            .await
            .unwrap()
            .is_err(),
        "the failing organisation's own breaker is open"
    );
    assert_eq!(
        app.breakers
            .admit(aiq::domain::Provider::Gemini, ORG_B)
            .await
            .unwrap(),
        Ok(()),
        "the provider's breaker stays closed for the others"
    );
    // Well inside the minute the provider's breaker would have held them.
    let beside = b_jobs_take(&ctx, 3, "beside", Duration::from_secs(30)).await;
    println!(
        "3 jobs of another organisation: {:.0} ms alone, {:.0} ms beside 4 hanging ones whose breaker is open",
        normal.as_secs_f64() * 1e3,
        beside.as_secs_f64() * 1e3
    );
    let states = app.breakers.states().await.unwrap();
    assert!(
        states
            .iter()
            .all(|(_, s)| *s == aiq::providers::breaker::BreakerState::Closed),
        "{states:?}"
    );
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_organisation_runs_at_most_its_tiers_share_of_a_process_and_the_rest_wait_without_a_call()
 {
    let ctx = TestCtx::with(&[
        ("AIQ_CONCURRENCY", "8"),
        (
            "AIQ_ORG_MAX_IN_FLIGHT",
            "enterprise_plus=0,enterprise=0,professional_agency=0,growth_team=0,solo_professional=0,trial=2",
        ),
    ])
    .await;
    // Six trial jobs whose calls are held at the provider until released.
    for i in 0..6 {
        ctx.enqueue(
            JobKind::LlmComplete,
            Tier::Trial,
            ORG_A,
            &llm_payload(Tier::Trial, ORG_A, &format!("[fake:hold] held {i}")),
            3,
        )
        .await;
    }
    let worker = ctx.start_worker();
    wait_until(Duration::from_secs(30), "two held calls", || async {
        ctx.fake_calls().await["openai"] == 2
    })
    .await;
    // The other organisation's jobs find free slots and complete while the six wait.
    for i in 0..3 {
        ctx.enqueue(
            JobKind::LlmComplete,
            Tier::Enterprise,
            ORG_B,
            &llm_payload(Tier::Enterprise, ORG_B, &format!("free {i}")),
            3,
        )
        .await;
    }
    wait_until(
        Duration::from_secs(30),
        "the other organisation's jobs",
        || async { ctx.completed_of(ORG_B).await == 3 },
    )
    .await;
    assert_eq!(
        ctx.fake_calls().await["openai"],
        5,
        "two of the first organisation's calls, three of the other's: the other four waited"
    );
    let release = format!("{}/_fake/release", ctx.vars["AIQ_OPENAI_BASE_URL"]);
    reqwest::Client::new().post(release).send().await.unwrap();
    ctx.wait_settled(Duration::from_secs(60)).await;
    worker.stop().await;
    assert_eq!(ctx.completed_of(ORG_A).await, 6);
    assert_eq!(ctx.fake_calls().await["openai"], 9, "one call per job");
    let attempts: i64 = ctx
        .scalar_i64("SELECT coalesce(max(attempts), 0)::bigint FROM ai_processing_results")
        .await;
    assert_eq!(attempts, 1, "waiting for a slot spends no attempt");
}
