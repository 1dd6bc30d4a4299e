//! In-call retries and LLM fallback chains, through the worker against the fake providers: each
//! call is reserved, recorded (cost row, error row) and settled on its own, numbered by call_seq.

use std::time::Duration;

use aiq::budget::PriceCatalog;
use aiq::domain::{JobKind, MicroUsd, Tier};

use crate::harness::{LlmJob, ORG_A, TestCtx};
use crate::money::assert_redis_agrees_with_postgres;

fn llm(provider: &str, model: &str, text: &str, fallback: serde_json::Value) -> String {
    LlmJob::new(Tier::Enterprise, ORG_A, text)
        .model(provider, model)
        .max_tokens(40)
        .set("fallback", fallback)
        .json()
}

/// A job's calls in order: (attempt, call_seq, provider, model, call_status, cost micro-USD,
/// estimate micro-USD).
async fn calls(ctx: &TestCtx, job: &str) -> Vec<(i32, i32, String, String, String, i64, i64)> {
    sqlx::query_as(
        "SELECT attempt, call_seq, service_name, coalesce(model, ''), call_status,
                (cost_usd * 1000000)::bigint, (estimate_usd * 1000000)::bigint
         FROM ai_cost_tracking WHERE job_id = $1 ORDER BY attempt, call_seq",
    )
    .bind(job)
    .fetch_all(ctx.store.pool())
    .await
    .unwrap()
}

/// A job's error rows: (retry_count, call_seq, error_type, provider).
async fn errors(ctx: &TestCtx, job: &str) -> Vec<(i32, i32, String, String)> {
    sqlx::query_as(
        "SELECT retry_count, call_seq, error_type, coalesce(provider, '') FROM ai_processing_errors
         WHERE job_id = $1 ORDER BY retry_count, call_seq",
    )
    .bind(job)
    .fetch_all(ctx.store.pool())
    .await
    .unwrap()
}

/// (status, provider, model, attempts) of a job's result row.
async fn result(ctx: &TestCtx, job: &str) -> (String, String, String, i32) {
    sqlx::query_as(
        "SELECT status, ai_provider, coalesce(model, ''), attempts FROM ai_processing_results WHERE job_id = $1",
    )
    .bind(job)
    .fetch_one(ctx.store.pool())
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flaky_calls_are_called_again_in_the_same_attempt_each_with_its_own_rows() {
    // Seven openai failures in a row would open its breaker at the default threshold of five.
    let ctx = TestCtx::with(&[
        ("AIQ_CALL_RETRIES", "2"),
        ("AIQ_MAX_ATTEMPTS", "3"),
        ("AIQ_BREAKER_FAILURES", "20"),
    ])
    .await;
    // Two failures, then an answer: one attempt with three calls, for each LLM wire format.
    let mut jobs = Vec::new();
    for (provider, model, error) in [
        ("openai", "gpt-4o-mini", "provider_unavailable"),
        ("anthropic", "claude-haiku-4-5", "provider_unavailable"),
        ("gemini", "gemini-2.5-flash", "provider_unavailable"),
    ] {
        let text = format!("[fake:flaky=2] caption for {provider}");
        let id = ctx
            .enqueue(
                JobKind::LlmComplete,
                Tier::Enterprise,
                ORG_A,
                &llm(provider, model, &text, serde_json::json!([])),
                0,
            )
            .await;
        jobs.push((id, provider, error));
    }
    // Five failures: three calls in attempt 1 (the in-call retries run out), then the queue's
    // retry, where the third call answers.
    let twice = ctx
        .enqueue(
            JobKind::LlmComplete,
            Tier::Enterprise,
            ORG_A,
            &llm(
                "openai",
                "gpt-4o-mini",
                "[fake:flaky=5] five failures",
                serde_json::json!([]),
            ),
            0,
        )
        .await;
    let worker = ctx.start_worker();
    ctx.wait_settled(Duration::from_secs(30)).await;
    worker.stop().await;

    for (id, provider, error) in &jobs {
        let (status, p, _, attempts) = result(&ctx, id).await;
        assert_eq!(
            (status.as_str(), p.as_str(), attempts),
            ("completed", *provider, 1)
        );
        let c = calls(&ctx, id).await;
        let shape: Vec<(i32, i32, &str)> = c.iter().map(|r| (r.0, r.1, r.4.as_str())).collect();
        assert_eq!(
            shape,
            [(1, 0, "failed"), (1, 1, "failed"), (1, 2, "succeeded")],
            "{provider}"
        );
        assert_eq!(
            c[0].5 + c[1].5,
            0,
            "{provider}: answered errors cost nothing"
        );
        assert!(c[2].5 > 0, "{provider}: the answer is billed");
        let e = errors(&ctx, id).await;
        assert_eq!(
            e,
            [
                (0, 0, error.to_string(), provider.to_string()),
                (0, 1, error.to_string(), provider.to_string())
            ],
            "{provider}"
        );
    }
    let (status, _, _, attempts) = result(&ctx, &twice).await;
    assert_eq!((status.as_str(), attempts), ("completed", 2));
    let shape: Vec<(i32, i32, String)> = calls(&ctx, &twice)
        .await
        .into_iter()
        .map(|r| (r.0, r.1, r.4))
        .collect();
    assert_eq!(
        shape,
        [
            (1, 0, "failed".into()),
            (1, 1, "failed".into()),
            (1, 2, "failed".into()),
            (2, 0, "failed".into()),
            (2, 1, "failed".into()),
            (2, 2, "succeeded".into())
        ]
    );
    let e: Vec<(i32, i32)> = errors(&ctx, &twice)
        .await
        .into_iter()
        .map(|r| (r.0, r.1))
        .collect();
    assert_eq!(e, [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]);
    let fake = ctx.fake_calls().await;
    assert_eq!(fake["openai"], 3 + 6);
    assert_eq!(fake["anthropic"], 3);
    assert_eq!(fake["gemini"], 3);
    let rows = ctx
        .scalar_i64("SELECT count(*) FROM ai_cost_tracking")
        .await;
    assert_eq!(rows, 15, "every answered call has its cost row");
    assert_redis_agrees_with_postgres(&ctx, &[ORG_A]).await;
}

/// A worker with in-call retries (cap 2 s) and one openai job that always gets a 429 with this
/// Retry-After.
async fn rate_limited_job(
    retry_after_s: u64,
    max_attempts: u32,
) -> (TestCtx, String, crate::harness::Worker) {
    let ctx = TestCtx::with(&[("AIQ_CALL_RETRIES", "2"), ("AIQ_CALL_RETRY_CAP_MS", "2000")]).await;
    let text = format!("[fake:status=429][fake:retry-after={retry_after_s}]");
    let job = ctx
        .enqueue(
            JobKind::LlmComplete,
            Tier::Enterprise,
            ORG_A,
            &llm("openai", "gpt-4o-mini", &text, serde_json::json!([])),
            max_attempts,
        )
        .await;
    let worker = ctx.start_worker();
    (ctx, job, worker)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_within_the_cap_is_waited_in_the_call_and_a_longer_one_goes_to_the_queue() {
    // Retry-After: 1 fits the 2 s cap: three calls in one attempt, at least a second apart.
    let (ctx, short, worker) = rate_limited_job(1, 1).await;
    ctx.wait_settled(Duration::from_secs(30)).await;
    worker.stop().await;
    let log = ctx.openai_call_log().await;
    let starts: Vec<u64> = log.iter().map(|e| e.0).collect();
    assert_eq!(starts.len(), 3, "{log:?}");
    for w in starts.windows(2) {
        assert!(
            w[1] - w[0] >= 1_000,
            "calls {}ms apart: {log:?}",
            w[1] - w[0]
        );
    }
    let e: Vec<(i32, i32, String)> = errors(&ctx, &short)
        .await
        .into_iter()
        .map(|r| (r.0, r.1, r.2))
        .collect();
    assert_eq!(
        e,
        [
            (0, 0, "rate_limited".into()),
            (0, 1, "rate_limited".into()),
            (0, 2, "rate_limited".into())
        ]
    );
    assert_eq!(ctx.queue.dead_jobs(10).await.unwrap().len(), 1);

    // Retry-After: 5 is longer than the cap: one call, and the job waits in the delayed set
    // (its one attempt spent) instead of holding a worker slot.
    let (ctx, long, worker) = rate_limited_job(5, 2).await;
    crate::harness::wait_until(Duration::from_secs(10), "the first call", || async {
        ctx.fake_calls().await["openai"] == 1
    })
    .await;
    crate::harness::wait_until(Duration::from_secs(10), "the job to be delayed", || async {
        ctx.queue.stats().await.unwrap().delayed == 1
    })
    .await;
    let stats = ctx.queue.stats().await.unwrap();
    assert_eq!(
        (stats.delayed, ctx.fake_calls().await["openai"].as_u64()),
        (1, Some(1)),
        "{stats:?}"
    );
    worker.stop().await;
    assert_eq!(errors(&ctx, &long).await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fallback_chain_moves_on_by_error_kind_and_reserves_at_each_models_price() {
    let ctx = TestCtx::with(&[("AIQ_CALL_RETRIES", "1")]).await;
    let haiku = serde_json::json!([{ "provider": "anthropic", "model": "claude-haiku-4-5" }]);
    let flash = serde_json::json!([{ "provider": "gemini", "model": "gemini-2.5-flash" }]);
    // (primary, model, text, fallback, what the primary's calls end in, primary calls, who answers)
    let cases = [
        // A 500 is retried in the call, then the chain moves on.
        (
            "openai",
            "gpt-4o-mini",
            "[fake:only=openai][fake:status=500] a",
            haiku.clone(),
            "provider_unavailable",
            2,
            "anthropic",
        ),
        // A bad key is not retried: straight to the next model.
        (
            "openai",
            "gpt-4o-mini",
            "[fake:only=openai][fake:status=401] b",
            flash.clone(),
            "unauthorized",
            1,
            "gemini",
        ),
        // Anthropic's spend limit is never retried there, but another provider may answer.
        (
            "anthropic",
            "claude-haiku-4-5",
            "[fake:only=anthropic][fake:spend-limit] c",
            flash.clone(),
            "quota_exhausted",
            1,
            "gemini",
        ),
        // Gemini's per-day quota, likewise.
        (
            "gemini",
            "gemini-2.5-flash",
            "[fake:only=gemini][fake:quota-day] d",
            haiku.clone(),
            "quota_exhausted",
            1,
            "anthropic",
        ),
    ];
    let mut ids = Vec::new();
    for (provider, model, text, fallback, ..) in &cases {
        ids.push(
            ctx.enqueue(
                JobKind::LlmComplete,
                Tier::Enterprise,
                ORG_A,
                &llm(provider, model, text, fallback.clone()),
                1,
            )
            .await,
        );
    }
    // The chain runs out: a bad request everywhere is dead after one call per model.
    let exhausted = ctx
        .enqueue(
            JobKind::LlmComplete,
            Tier::Enterprise,
            ORG_A,
            &llm(
                "openai",
                "gpt-4o-mini",
                "[fake:status=400] e",
                haiku.clone(),
            ),
            3,
        )
        .await;
    let worker = ctx.start_worker();
    ctx.wait_settled(Duration::from_secs(30)).await;
    worker.stop().await;

    let prices = PriceCatalog::builtin();
    for ((provider, model, text, fallback, error, primary_calls, answered_by), id) in
        cases.iter().zip(&ids)
    {
        let (status, p, m, attempts) = result(&ctx, id).await;
        let fallback_model = fallback[0]["model"].as_str().unwrap();
        assert_eq!(
            (status.as_str(), p.as_str(), m.as_str(), attempts),
            ("completed", *answered_by, fallback_model, 1),
            "{text}"
        );
        let c = calls(&ctx, id).await;
        assert_eq!(c.len(), primary_calls + 1, "{text}: {c:?}");
        let input_bound = text.len() as u64 + "user".len() as u64 + 8;
        for (i, call) in c.iter().enumerate() {
            let (want_provider, want_model, want_status) = if i < *primary_calls {
                (*provider, *model, "failed")
            } else {
                (*answered_by, fallback_model, "succeeded")
            };
            assert_eq!(
                (call.1, call.2.as_str(), call.3.as_str(), call.4.as_str()),
                (i as i32, want_provider, want_model, want_status),
                "{text}"
            );
            // Each call held the estimate of its own model.
            let estimate = prices
                .llm_estimate(want_provider, want_model, input_bound, 40)
                .unwrap();
            assert_eq!(call.6, estimate.micros(), "{text}: call {i}");
        }
        let e = errors(&ctx, id).await;
        assert_eq!(e.len(), *primary_calls, "{text}: {e:?}");
        assert!(
            e.iter()
                .enumerate()
                .all(|(i, r)| r.1 == i as i32 && r.2 == *error && r.3 == *provider),
            "{text}: {e:?}"
        );
    }
    let dead = ctx.queue.dead_jobs(10).await.unwrap();
    let d = dead.iter().find(|d| d.id == exhausted).expect("dead");
    assert_eq!(d.attempts, 1, "a bad request is not retried: {}", d.reason);
    let e = errors(&ctx, &exhausted).await;
    assert_eq!(
        e,
        [
            (0, 0, "invalid_request".into(), "openai".into()),
            (0, 1, "invalid_request".into(), "anthropic".into())
        ]
    );
    let (status, p, ..) = result(&ctx, &exhausted).await;
    assert_eq!((status.as_str(), p.as_str()), ("failed", "anthropic"));
    let fake = ctx.fake_calls().await;
    // openai: a (2), b, e; anthropic: a's fallback, c's primary, d's fallback, e's fallback;
    // gemini: b's and c's fallbacks, d's primary.
    assert_eq!(fake["openai"], 2 + 1 + 1);
    assert_eq!(fake["anthropic"], 4);
    assert_eq!(fake["gemini"], 3);
    assert_redis_agrees_with_postgres(&ctx, &[ORG_A]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fallback_the_budget_cannot_afford_is_not_called_and_the_job_waits() {
    let ctx = TestCtx::with(&[("AIQ_CALL_RETRIES", "0")]).await;
    let text = "[fake:only=openai][fake:status=503] summarise";
    let input_bound = text.len() as u64 + "user".len() as u64 + 8;
    let prices = PriceCatalog::builtin();
    let cheap = prices
        .llm_estimate("openai", "gpt-4o-mini", input_bound, 40)
        .unwrap();
    let dear = prices
        .llm_estimate("anthropic", "claude-sonnet-4-5", input_bound, 40)
        .unwrap();
    assert!(dear.micros() > 2 * cheap.micros());
    // Room for the primary's estimate, not for the fallback's: the organisation already spent
    // half of the fallback's estimate today, and its limit is just above the fallback's estimate
    // (so the fallback could fit a day, just not this one's rest).
    let org = uuid::Uuid::parse_str(ORG_A).unwrap();
    let limit = MicroUsd::from_micros(dear.micros() + cheap.micros() / 2);
    ctx.store
        .set_org_limits(org, Some(limit), None)
        .await
        .unwrap();
    // The earlier spend is a row of the ledger, and the counters are rebuilt from it.
    sqlx::query(
        "INSERT INTO ai_cost_tracking (organization_id, service_name, operation_type, cost_usd,
            billing_date, job_id, attempt, execution, call_seq)
         VALUES ($1, 'anthropic', 'messages', $2::numeric / 1000000, (now() AT TIME ZONE 'UTC')::date,
            'earlier-job', 1, 1, 0)",
    )
    .bind(org)
    .bind(dear.micros() / 2)
    .execute(ctx.store.pool())
    .await
    .unwrap();
    let budget = ctx.budget().await;
    aiq::budget::rebuild(&budget, &ctx.store).await.unwrap();
    let id = ctx
        .enqueue(
            JobKind::LlmComplete,
            Tier::Enterprise,
            ORG_A,
            &llm(
                "openai",
                "gpt-4o-mini",
                text,
                serde_json::json!([{ "provider": "anthropic", "model": "claude-sonnet-4-5" }]),
            ),
            3,
        )
        .await;
    let worker = ctx.start_worker();
    crate::harness::wait_until(Duration::from_secs(10), "the budget refusal", || async {
        errors(&ctx, &id).await.len() == 2
    })
    .await;
    worker.stop().await;
    let e: Vec<(i32, String, String)> = errors(&ctx, &id)
        .await
        .into_iter()
        .map(|r| (r.1, r.2, r.3))
        .collect();
    assert_eq!(
        e,
        [
            (0, "provider_unavailable".into(), "openai".into()),
            (1, "budget_exceeded".into(), "anthropic".into())
        ]
    );
    let fake = ctx.fake_calls().await;
    assert_eq!(
        (fake["openai"].as_u64(), fake["anthropic"].as_u64()),
        (Some(1), Some(0))
    );
    let stats = ctx.queue.stats().await.unwrap();
    assert_eq!(
        (stats.delayed, stats.dead),
        (1, 0),
        "the job waits for the budget"
    );
    assert_redis_agrees_with_postgres(&ctx, &[ORG_A]).await;
}
