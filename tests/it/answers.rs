//! What a provider may answer, however broken: delays no provider means (`inf`, `1e300` ms, a
//! date in the year 9999, `1e30s`), usage counts no model can produce, and bodies above the cap.
//! Each job ends with its rows, nothing panics, no answered call is booked as `expired`, and
//! Redis's counters still equal the ledger.

use std::time::Duration;

use aiq::domain::{JobKind, Tier};

use crate::harness::{ORG_A, TestCtx, llm_payload};

/// How an answered call must be recorded.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Cost {
    Zero,
    Estimate,
    /// Priced from the answer's usage: above zero, within the reservation.
    Usage,
}

struct Outcome {
    error_type: Option<&'static str>,
    call_status: &'static str,
    cost: Cost,
}

fn on(provider: &str, model: &str, text: &str) -> String {
    let mut v: serde_json::Value =
        serde_json::from_str(&llm_payload(Tier::Enterprise, ORG_A, text)).expect("payload");
    v["provider"] = provider.into();
    v["model"] = model.into();
    v.to_string()
}

/// Runs one job of one attempt (and no in-call retry) on a context of its own, so a pause one
/// case sets holds back no other, and checks its rows. Returns the context for more checks.
async fn one_job(payload: &str, extra: &[(&str, &str)], want: Outcome) -> TestCtx {
    let mut settings = vec![("AIQ_CALL_RETRIES", "0")];
    settings.extend_from_slice(extra);
    let ctx = TestCtx::with(&settings).await;
    let id = ctx
        .enqueue(JobKind::LlmComplete, Tier::Enterprise, ORG_A, payload, 1)
        .await;
    ctx.run_until_settled().await;
    let calls: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT call_status, (cost_usd * 1000000)::bigint, (estimate_usd * 1000000)::bigint
         FROM ai_cost_tracking WHERE job_id = $1",
    )
    .bind(&id)
    .fetch_all(ctx.store.pool())
    .await
    .unwrap();
    assert_eq!(
        calls.len(),
        1,
        "{payload}: one call, one cost row: {calls:?}"
    );
    let (status, cost, estimate) = calls[0].clone();
    assert_eq!(status, want.call_status, "{payload}");
    match want.cost {
        Cost::Zero => assert_eq!(cost, 0, "{payload}: an error status costs nothing"),
        Cost::Estimate => {
            assert!(estimate > 0);
            assert_eq!(
                cost, estimate,
                "{payload}: answered, so billed at the estimate"
            );
        }
        Cost::Usage => assert!(
            cost > 0 && cost <= estimate,
            "{payload}: {cost} of {estimate}"
        ),
    }
    assert_eq!(
        error_types(&ctx, &id).await,
        want.error_type
            .map(|t| vec![t.to_owned()])
            .unwrap_or_default(),
        "{payload}"
    );
    let result = result_status(&ctx, &id).await;
    let ended = if want.error_type.is_some() {
        "failed"
    } else {
        "completed"
    };
    assert_eq!(
        result, ended,
        "{payload}: the job ended with its result row"
    );
    let expired = ctx
        .scalar_i64("SELECT count(*) FROM ai_cost_tracking WHERE call_status = 'expired'")
        .await;
    assert_eq!(
        expired, 0,
        "{payload}: an answered call is never booked as expired"
    );
    crate::money::assert_redis_agrees_with_postgres(&ctx, &[ORG_A]).await;
    ctx
}

/// The provider's pause, if any: never above the 600 s cap.
async fn pause_of(ctx: &TestCtx, provider: &str) -> Option<Duration> {
    let app = aiq::worker::app(&ctx.settings, ctx.store.clone())
        .await
        .unwrap();
    let provider = aiq::domain::Provider::parse(provider).expect("a provider's name");
    let wait = app.breakers.admit(provider, ORG_A).await.unwrap().err();
    if let Some(w) = wait {
        assert!(
            w <= aiq::providers::RETRY_AFTER_CAP,
            "{provider}: paused {w:?}"
        );
    }
    wait
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_delay_a_broken_provider_sends_is_bounded_and_the_429_ends_with_its_rows() {
    let limited = || Outcome {
        error_type: Some("rate_limited"),
        call_status: "failed",
        cost: Cost::Zero,
    };
    // Retry-After that is not a number of seconds: no pause, the job's own backoff applies.
    let ctx = one_job(
        &llm_payload(
            Tier::Enterprise,
            ORG_A,
            "[fake:status=429][fake:retry-after=inf] x",
        ),
        &[],
        limited(),
    )
    .await;
    assert_eq!(pause_of(&ctx, "openai").await, None, "inf means nothing");
    // 1e300 ms, and a date in the year 9999: the provider is paused, for at most the cap.
    for text in [
        "[fake:status=429][fake:retry-after-ms=1e300] x",
        "[fake:status=429][fake:retry-after=Fri, 31 Dec 9999 23:59:59 GMT] x",
    ] {
        let ctx = one_job(&llm_payload(Tier::Enterprise, ORG_A, text), &[], limited()).await;
        let paused = pause_of(&ctx, "openai").await.expect("paused");
        assert!(paused > Duration::from_secs(500), "{text}: {paused:?}");
    }
    // Google's RetryInfo in the body, far above any per-minute window: Gemini's rule reads a
    // wait that long as a used-up quota (never retried), and nothing is paused.
    let ctx = one_job(
        &on(
            "gemini",
            "gemini-2.5-flash",
            "[fake:status=429][fake:retry-delay=1e30s] x",
        ),
        &[],
        Outcome {
            error_type: Some("quota_exhausted"),
            ..limited()
        },
    )
    .await;
    assert_eq!(pause_of(&ctx, "gemini").await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_counts_no_model_can_produce_make_the_answer_unusable_at_its_estimate() {
    for count in ["1000000000000", "-1", "3e9"] {
        let ctx = one_job(
            &llm_payload(
                Tier::Enterprise,
                ORG_A,
                &format!("[fake:usage={count}] caption"),
            ),
            &[],
            Outcome {
                error_type: Some("malformed_response"),
                call_status: "unusable",
                cost: Cost::Estimate,
            },
        )
        .await;
        let message: String = sqlx::query_scalar("SELECT error_message FROM ai_processing_errors")
            .fetch_one(ctx.store.pool())
            .await
            .unwrap();
        assert!(message.contains("prompt_tokens"), "{count}: {message}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_above_the_cap_is_oversize_at_its_estimate_and_one_below_it_is_read_whole() {
    // 200 MB against an 8 MB cap: with its Content-Length (refused before reading), and chunked
    // (read up to the cap and no further).
    for mark in ["[fake:big=200]", "[fake:bigchunked=200]"] {
        one_job(
            &llm_payload(Tier::Enterprise, ORG_A, &format!("{mark} caption")),
            &[
                ("AIQ_MAX_RESPONSE_MB", "8"),
                ("AIQ_RESPONSE_MEMORY_MB", "8"),
            ],
            Outcome {
                error_type: Some("oversize"),
                call_status: "oversize",
                cost: Cost::Estimate,
            },
        )
        .await;
    }
    // 6 MB under the same cap: an answer like any other.
    let ctx = one_job(
        &llm_payload(Tier::Enterprise, ORG_A, "[fake:bigchunked=6] caption"),
        &[
            ("AIQ_MAX_RESPONSE_MB", "8"),
            ("AIQ_RESPONSE_MEMORY_MB", "8"),
        ],
        Outcome {
            error_type: None,
            call_status: "succeeded",
            cost: Cost::Usage,
        },
    )
    .await;
    let stored = ctx
        .scalar_i64("SELECT length(raw_response->'choices'->0->'message'->>'content')::bigint FROM ai_processing_results")
        .await;
    assert!(stored >= 6 * 1024 * 1024, "{stored}");
}

/// A call's cost row: (input tokens, output tokens, cost, estimate), in micro-dollars.
async fn call_row(ctx: &TestCtx, id: &str) -> (i64, i64, i64, i64) {
    sqlx::query_as(
        "SELECT input_tokens, output_tokens, (cost_usd * 1000000)::bigint,
                (estimate_usd * 1000000)::bigint
         FROM ai_cost_tracking WHERE job_id = $1 AND call_status = 'succeeded'",
    )
    .bind(id)
    .fetch_one(ctx.store.pool())
    .await
    .unwrap()
}

async fn result_status(ctx: &TestCtx, id: &str) -> String {
    sqlx::query_scalar("SELECT status FROM ai_processing_results WHERE job_id = $1")
        .bind(id)
        .fetch_one(ctx.store.pool())
        .await
        .unwrap()
}

async fn error_types(ctx: &TestCtx, id: &str) -> Vec<String> {
    sqlx::query_scalar("SELECT error_type FROM ai_processing_errors WHERE job_id = $1")
        .bind(id)
        .fetch_all(ctx.store.pool())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gemini_pro_prompt_above_200k_tokens_is_reserved_and_recorded_at_the_long_context_rate() {
    let ctx = TestCtx::new().await;
    // 972,000 characters: the fake counts a token per four characters of its text (a line
    // feed, then the content) plus four per message: 243,001 + 4 = 243,005 prompt tokens.
    let content = "a".repeat(972_000);
    let id = ctx
        .enqueue(
            JobKind::LlmComplete,
            Tier::Enterprise,
            ORG_A,
            &on("gemini", "gemini-2.5-pro", &content),
            1,
        )
        .await;
    ctx.run_until_settled().await;
    let (input, output, cost, estimate) = call_row(&ctx, &id).await;
    assert_eq!(input, 243_005);
    // Recorded: every token at the long-context rates, $2.50 and $15 per million (base rates
    // $1.25 and $10 would give 303,756 + 10 x output), rounded up to the micro-dollar.
    let by_hand = (243_005 * 2_500_000 + output * 15_000_000 + 999_999) / 1_000_000;
    assert_eq!(cost, by_hand, "{output} output tokens");
    // Reserved: the prompt's bound (its bytes, the role and 8 of framing: 972,012 tokens at
    // most) at $2.50 per million, and all 50 of max_tokens at $15.
    assert_eq!(
        estimate,
        (972_012 * 2_500_000 + 50 * 15_000_000) / 1_000_000
    );
    assert!(
        error_types(&ctx, &id).await.is_empty(),
        "within its estimate"
    );
    crate::money::assert_redis_agrees_with_postgres(&ctx, &[ORG_A]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_costing_more_than_its_reservation_is_recorded_at_its_cost_and_raises_cost_above_estimate()
 {
    let ctx = TestCtx::new().await;
    // A short prompt (a bound of a few dozen tokens) whose answer reports 2,000,000 prompt
    // tokens: $0.30 at gpt-4o-mini's $0.15 per million, far above the reservation.
    let id = ctx
        .enqueue(
            JobKind::LlmComplete,
            Tier::Enterprise,
            ORG_A,
            &llm_payload(Tier::Enterprise, ORG_A, "[fake:usage=2000000] hi"),
            1,
        )
        .await;
    ctx.run_until_settled().await;
    let (input, _, cost, estimate) = call_row(&ctx, &id).await;
    assert_eq!(input, 2_000_000);
    assert!(cost >= 300_000 && cost > estimate, "{cost} vs {estimate}");
    assert_eq!(
        result_status(&ctx, &id).await,
        "completed",
        "the answer is good: the job succeeded"
    );
    assert_eq!(error_types(&ctx, &id).await, ["cost_above_estimate"]);
    // The provider bills the actual cost: the budget holds it, not the estimate.
    crate::money::assert_redis_agrees_with_postgres(&ctx, &[ORG_A]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_received_while_postgres_is_down_is_kept_with_its_job_and_written_without_a_second_call()
 {
    let mut pg = aiq_testkit::localsvc::LocalPostgres::start("kept-answer")
        .expect("a PostgreSQL of this test's own");
    let ctx = TestCtx::build_on(
        None,
        Some(&pg),
        &[],
        aiq_testkit::fake::FakeOptions::default(),
    )
    .await;
    let id = ctx
        .enqueue(
            JobKind::LlmComplete,
            Tier::Enterprise,
            ORG_A,
            &llm_payload(Tier::Enterprise, ORG_A, "[fake:hold] caption"),
            3,
        )
        .await;
    let worker = ctx.start_worker();
    // The call is at the provider; PostgreSQL goes away before it answers.
    crate::harness::wait_until(Duration::from_secs(30), "the call to start", || async {
        ctx.fake_calls().await["openai"] == 1
    })
    .await;
    pg.stop().expect("stopping PostgreSQL");
    let release = format!("{}/_fake/release", ctx.vars["AIQ_OPENAI_BASE_URL"]);
    reqwest::Client::new()
        .post(release)
        .send()
        .await
        .expect("releasing the held call");
    // The answer cannot be written: it is kept with the job, which waits.
    let mut redis = ctx.redis().await;
    let kept_key = ctx.key(&format!("kept:{id}"));
    crate::harness::wait_until(
        Duration::from_secs(30),
        "the answer to be kept with the job",
        || {
            let (mut redis, key) = (redis.clone(), kept_key.clone());
            async move {
                redis::AsyncCommands::exists::<_, bool>(&mut redis, &key)
                    .await
                    .unwrap_or(false)
            }
        },
    )
    .await;
    pg.start_again().expect("starting PostgreSQL again");
    ctx.wait_settled(Duration::from_secs(60)).await;
    worker.stop().await;
    assert_eq!(ctx.fake_calls().await["openai"], 1, "no second call");
    assert_eq!(result_status(&ctx, &id).await, "completed");
    let calls: Vec<(String, i64)> = sqlx::query_as(
        "SELECT call_status, (cost_usd * 1000000)::bigint FROM ai_cost_tracking WHERE job_id = $1",
    )
    .bind(&id)
    .fetch_all(ctx.store.pool())
    .await
    .unwrap();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(
        calls[0].0, "succeeded",
        "at its cost, not swept at its estimate"
    );
    let exists: bool = redis::AsyncCommands::exists(&mut redis, &kept_key)
        .await
        .unwrap();
    assert!(!exists, "the kept answer is gone once written");
    let stats = ctx.queue.stats().await.unwrap();
    assert_eq!(stats.counters.get("done").copied(), Some(1));
    crate::money::assert_redis_agrees_with_postgres(&ctx, &[ORG_A]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_says_postgres_is_down_without_waiting_out_the_pools_connect_timeout() {
    let mut pg = aiq_testkit::localsvc::LocalPostgres::start("readyz-pg")
        .expect("a PostgreSQL of this test's own");
    let ctx = TestCtx::build_on(
        None,
        Some(&pg),
        &[],
        aiq_testkit::fake::FakeOptions::default(),
    )
    .await;
    let addr = format!("127.0.0.1:{}", aiq_testkit::localsvc::free_port().unwrap());
    let daemon = ctx.spawn_daemon(&[("AIQ_ADMIN_ADDR", &addr)]);
    let readyz = || crate::harness::readyz(&addr);
    crate::harness::wait_until(
        Duration::from_secs(30),
        "the daemon to be ready",
        || async { readyz().await.is_some_and(|(s, _)| s == 200) },
    )
    .await;
    pg.stop().expect("stopping PostgreSQL");
    let asked = std::time::Instant::now();
    let (status, body) = readyz().await.expect("an answer");
    let took = asked.elapsed();
    println!(
        "/readyz answered {status} {:.0} ms after PostgreSQL stopped",
        took.as_secs_f64() * 1e3
    );
    assert_eq!(status, 503, "{body}");
    let pg_part = &body["parts"]["postgres"];
    assert_eq!(pg_part["status"], "unhealthy", "{body}");
    assert_eq!(body["parts"]["redis"]["status"], "healthy", "{body}");
    pg.start_again().expect("starting PostgreSQL again");
    crate::harness::wait_until(Duration::from_secs(30), "/readyz to recover", || async {
        readyz().await.is_some_and(|(s, _)| s == 200)
    })
    .await;
    assert!(
        crate::harness::signal_and_wait(daemon, libc::SIGTERM)
            .await
            .success()
    );
}
