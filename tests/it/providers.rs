//! Anthropic and Gemini jobs through the worker against the fake providers' real wire formats:
//! costs from usage, and each error kind's decision with its ai_processing_errors rows.

use std::time::Duration;

use aiq::domain::{JobKind, Tier};

use crate::harness::{LlmJob, ORG_A, TestCtx, llm_payload};

fn payload(provider: &str, model: &str, text: &str) -> String {
    LlmJob::new(Tier::Enterprise, ORG_A, text)
        .system("Be brief.")
        .model(provider, model)
        .max_tokens(40)
        .json()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_and_gemini_jobs_succeed_and_cost_what_their_usage_says() {
    let ctx = TestCtx::new().await;
    let a = ctx
        .enqueue(
            JobKind::LlmComplete,
            Tier::Enterprise,
            ORG_A,
            &payload("anthropic", "claude-haiku-4-5", "Caption a dog."),
            0,
        )
        .await;
    let g = ctx
        .enqueue(
            JobKind::LlmComplete,
            Tier::Enterprise,
            ORG_A,
            &payload("gemini", "gemini-2.5-flash", "Caption a cat."),
            0,
        )
        .await;
    let worker = ctx.start_worker();
    ctx.wait_settled(Duration::from_secs(30)).await;
    worker.stop().await;
    // (job, input $/M, output $/M) from the catalog: claude-haiku-4-5 $1/$5, gemini-2.5-flash $0.30/$2.50.
    for (id, input_price, output_price, provider) in [
        (&a, 1_000_000u64, 5_000_000u64, "anthropic"),
        (&g, 300_000, 2_500_000, "gemini"),
    ] {
        let (input, output, micros, service): (i64, i64, i64, String) = sqlx::query_as(
            "SELECT u.input_tokens, u.output_tokens, (u.cost_usd * 1000000)::bigint, c.service_name
             FROM ai_usage u JOIN ai_cost_tracking c USING (job_id) WHERE u.job_id = $1",
        )
        .bind(id)
        .fetch_one(ctx.store.pool())
        .await
        .unwrap();
        assert_eq!(service, provider);
        assert!(input > 0 && output > 0 && output <= 40);
        let want =
            (input as u64 * input_price + output as u64 * output_price).div_ceil(1_000_000) as i64;
        assert_eq!(micros, want, "{provider}");
    }
    let calls = ctx.fake_calls().await;
    assert_eq!(
        (calls["anthropic"].as_u64(), calls["gemini"].as_u64()),
        (Some(1), Some(1))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_provider_error_kind_gets_its_decision_and_its_error_rows() {
    let ctx = TestCtx::with(&[("AIQ_MAX_ATTEMPTS", "2"), ("AIQ_BREAKER_FAILURES", "1000")]).await;
    // (provider, model, marker, error_type, attempts spent, retried?)
    let cases = [
        (
            "anthropic",
            "claude-haiku-4-5",
            "[fake:status=529]",
            "provider_unavailable",
            2,
        ),
        (
            "anthropic",
            "claude-haiku-4-5",
            "[fake:status=429]",
            "rate_limited",
            2,
        ),
        (
            "anthropic",
            "claude-haiku-4-5",
            "[fake:spend-limit]",
            "quota_exhausted",
            1,
        ),
        (
            "anthropic",
            "claude-haiku-4-5",
            "[fake:status=401]",
            "unauthorized",
            1,
        ),
        (
            "anthropic",
            "claude-haiku-4-5",
            "[fake:status=400]",
            "invalid_request",
            1,
        ),
        (
            "gemini",
            "gemini-2.5-flash",
            "[fake:status=503]",
            "provider_unavailable",
            2,
        ),
        (
            "gemini",
            "gemini-2.5-flash",
            "[fake:status=429]",
            "rate_limited",
            2,
        ),
        (
            "gemini",
            "gemini-2.5-flash",
            "[fake:quota-day]",
            "quota_exhausted",
            1,
        ),
        (
            "gemini",
            "gemini-2.5-flash",
            "[fake:status=403]",
            "unauthorized",
            1,
        ),
        (
            "gemini",
            "gemini-2.5-flash",
            "[fake:garbage]",
            "malformed_response",
            2,
        ),
        (
            "openai",
            "gpt-4o-mini",
            "[fake:status=500]",
            "provider_unavailable",
            2,
        ),
        (
            "openai",
            "gpt-4o-mini",
            "[fake:status=404]",
            "invalid_request",
            1,
        ),
    ];
    let mut ids = Vec::new();
    for (provider, model, marker, _, _) in cases {
        ids.push(
            ctx.enqueue(
                JobKind::LlmComplete,
                Tier::Enterprise,
                ORG_A,
                &payload(provider, model, marker),
                0,
            )
            .await,
        );
    }
    let worker = ctx.start_worker();
    ctx.wait_settled(Duration::from_secs(60)).await;
    worker.stop().await;
    let dead = ctx.queue.dead_jobs(100).await.unwrap();
    for ((provider, _, marker, error_type, attempts), id) in cases.iter().zip(&ids) {
        let d = dead
            .iter()
            .find(|d| &d.id == id)
            .unwrap_or_else(|| panic!("{provider} {marker} is not dead"));
        assert_eq!(d.attempts, *attempts, "{provider} {marker}: {}", d.reason);
        let rows: Vec<(String, i32, String)> = sqlx::query_as(
            "SELECT error_type, retry_count, coalesce(provider, '') FROM ai_processing_errors WHERE job_id = $1 ORDER BY retry_count",
        )
        .bind(id)
        .fetch_all(ctx.store.pool())
        .await
        .unwrap();
        assert_eq!(
            rows.len() as u32,
            *attempts,
            "{provider} {marker}: one error row per attempt: {rows:?}"
        );
        for (i, (t, retry, p)) in rows.iter().enumerate() {
            assert_eq!(t, error_type, "{provider} {marker}");
            assert_eq!(*retry, i as i32);
            assert_eq!(p, provider);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_with_retry_after_5_seen_by_one_process_stops_all_three_for_about_5_s() {
    let ctx = crate::harness::TestCtx::build(
        &[("AIQ_CONCURRENCY", "2")],
        aiq_testkit::fake::FakeOptions::with_latency(Duration::from_millis(40)),
    )
    .await;
    // The rate-limited call goes first (highest tier); its job has one attempt.
    let limited = serde_json::json!({
        "version": 1, "organization_id": ORG_A, "tier": "enterprise_plus", "provider": "openai", "model": "gpt-4o-mini",
        "messages": [{ "role": "user", "content": "[fake:status=429][fake:retry-after=5]" }], "max_tokens": 10
    })
    .to_string();
    ctx.enqueue(
        JobKind::LlmComplete,
        Tier::EnterprisePlus,
        ORG_A,
        &limited,
        1,
    )
    .await;
    for i in 0..150 {
        ctx.enqueue(
            JobKind::LlmComplete,
            Tier::Trial,
            ORG_A,
            &crate::harness::llm_payload(Tier::Trial, ORG_A, &format!("t{i}")),
            0,
        )
        .await;
    }
    let daemons: Vec<_> = (0..3).map(|_| ctx.spawn_daemon(&[])).collect();
    ctx.wait_settled(Duration::from_secs(60)).await;
    for d in daemons {
        assert!(
            crate::harness::signal_and_wait(d, libc::SIGTERM)
                .await
                .success()
        );
    }
    let log = ctx.openai_call_log().await;
    let (_, answered_429, _) = *log
        .iter()
        .find(|(_, _, status)| *status == 429)
        .expect("the 429 call");
    let mut starts: Vec<u64> = log
        .iter()
        .filter(|(_, _, s)| *s == 200)
        .map(|(start, _, _)| *start)
        .collect();
    starts.sort();
    let during: Vec<u64> = starts
        .iter()
        .filter(|s| **s > answered_429 + 300 && **s < answered_429 + 4_700)
        .map(|s| s - answered_429)
        .collect();
    // Calls already admitted when the 429 came back may still start in its first moments: at
    // most one per slot of the three processes.
    let racing = starts
        .iter()
        .filter(|s| **s > answered_429 && **s <= answered_429 + 300)
        .count();
    let resumed = starts
        .iter()
        .find(|s| **s > answered_429 + 300)
        .map(|s| s - answered_429)
        .unwrap();
    println!(
        "429 answered at t=0: {racing} calls started in its first 0.3 s (already admitted), none in (0.3 s, 4.7 s) {during:?}, then calls resumed at {resumed} ms"
    );
    assert!(
        during.is_empty(),
        "calls went out while the provider was paused: {during:?}"
    );
    assert!(racing <= 6, "{racing} calls raced the pause");
    assert!(
        (4_700..=7_000).contains(&resumed),
        "the pause held about 5 s: {resumed} ms"
    );
    assert_eq!(
        starts.len(),
        150,
        "every other job ran once after the pause"
    );
    assert_eq!(ctx.queue.stats().await.unwrap().dead, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_a_20_percent_mixed_error_rate_every_job_ends_succeeded_or_dead_and_every_call_is_costed()
 {
    let ctx = crate::harness::TestCtx::build(
        &[
            ("AIQ_CONCURRENCY", "8"),
            ("AIQ_MAX_ATTEMPTS", "4"),
            ("AIQ_RETRY_BASE_MS", "20"),
            ("AIQ_RETRY_CAP_MS", "200"),
            ("AIQ_OPENAI_TIMEOUT_MS", "1000"),
            ("AIQ_ANTHROPIC_TIMEOUT_MS", "1000"),
            ("AIQ_GEMINI_TIMEOUT_MS", "1000"),
            ("AIQ_VISION_TIMEOUT_MS", "1000"),
            // Breakers have their own test; here faults must reach the retry logic.
            ("AIQ_BREAKER_FAILURES", "1000"),
            // The daemon's default of two in-call retries.
            ("AIQ_CALL_RETRIES", "2"),
        ],
        aiq_testkit::fake::FakeOptions {
            latency: Duration::from_millis(10),
            latency_jitter: Duration::from_millis(20),
            error_rate: 0.2,
            seed: 7,
            ..Default::default()
        },
    )
    .await;
    ctx.use_up_free_vision_units("LABEL_DETECTION").await;
    let mut ids = Vec::new();
    for i in 0..160 {
        let tier = Tier::ALL[i % 6];
        let org = if i % 2 == 0 {
            ORG_A
        } else {
            crate::harness::ORG_B
        };
        let (kind, body) = match i % 4 {
            0 => (
                JobKind::VisionAnnotate,
                crate::harness::vision_payload(tier, org, 1),
            ),
            // Every other openai job may fall back to gemini.
            1 => {
                let mut v: serde_json::Value =
                    serde_json::from_str(&crate::harness::llm_payload(tier, org, &format!("o{i}")))
                        .unwrap();
                if i % 8 == 1 {
                    v["fallback"] =
                        serde_json::json!([{ "provider": "gemini", "model": "gemini-2.5-flash" }]);
                }
                (JobKind::LlmComplete, v.to_string())
            }
            2 | 3 => {
                let (p, m) = if i % 4 == 2 {
                    ("anthropic", "claude-haiku-4-5")
                } else {
                    ("gemini", "gemini-2.5-flash")
                };
                let v = serde_json::json!({ "version": 1, "organization_id": org, "tier": tier.as_str(), "provider": p,
                    "model": m, "messages": [{ "role": "user", "content": format!("m{i}") }], "max_tokens": 30 });
                (JobKind::LlmComplete, v.to_string())
            }
            _ => unreachable!(),
        };
        ids.push(ctx.enqueue(kind, tier, org, &body, 0).await);
    }
    let worker = ctx.start_worker();
    ctx.wait_settled(Duration::from_secs(120)).await;
    worker.stop().await;

    let dead = ctx.queue.dead_jobs(1000).await.unwrap();
    assert!(
        dead.iter().all(|d| !d.reason.is_empty()),
        "every dead job says why"
    );
    let per_job: Vec<(String, String)> =
        sqlx::query_as("SELECT job_id, status FROM ai_processing_results")
            .fetch_all(ctx.store.pool())
            .await
            .unwrap();
    let completed = per_job.iter().filter(|(_, s)| s == "completed").count();
    for id in &ids {
        let rows = per_job.iter().filter(|(j, _)| j == id).count();
        let is_dead = dead.iter().any(|d| &d.id == id);
        assert_eq!(rows, 1, "job {id} has exactly one result row");
        let done = per_job.iter().any(|(j, s)| j == id && s == "completed");
        assert!(
            done != is_dead,
            "job {id} either succeeded or is dead with a reason"
        );
    }
    // Every call the fake providers answered (timeouts included: they answer late) has its cost row.
    let calls = ctx.fake_calls().await;
    let answered: u64 = ["google_vision", "openai", "anthropic", "gemini"]
        .iter()
        .map(|p| calls[*p].as_u64().unwrap())
        .sum();
    let cost_rows = ctx
        .scalar_i64("SELECT count(*) FROM ai_cost_tracking")
        .await as u64;
    let errors: Vec<(String, i64)> = sqlx::query_as(
        "SELECT error_type, count(*) FROM ai_processing_errors GROUP BY 1 ORDER BY 1",
    )
    .fetch_all(ctx.store.pool())
    .await
    .unwrap();
    let in_call = ctx
        .scalar_i64("SELECT count(*) FROM ai_cost_tracking WHERE call_seq > 0")
        .await;
    let fell_back = ctx
        .scalar_i64(
            "SELECT count(*) FROM ai_processing_results WHERE ai_provider = 'gemini' AND job_id IN
               (SELECT job_id FROM ai_cost_tracking WHERE service_name = 'openai')",
        )
        .await;
    println!(
        "20% faults: {completed} of 160 jobs succeeded, {} dead; {answered} provider calls ({in_call} after the first of their attempt), {cost_rows} cost rows; {fell_back} answered by a fallback; errors {errors:?}",
        dead.len()
    );
    assert_eq!(cost_rows, answered);
    assert!(
        completed >= 140,
        "retries carry most jobs through ({completed} succeeded)"
    );
    crate::money::assert_redis_agrees_with_postgres(&ctx, &[ORG_A, crate::harness::ORG_B]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_providers_requests_per_minute_hold_across_processes_and_the_rest_wait() {
    // The limit counts per clock minute. A run that straddles a minute's end says nothing about
    // one window: it is run again on a fresh queue (a run takes seconds, so the next one fits).
    let mut runs = 0;
    let ctx = loop {
        runs += 1;
        assert!(runs <= 3, "three runs in a row straddled a minute's end");
        let (ctx, minute) = rpm_limited_run().await;
        if ctx.redis_minute().await == minute {
            break ctx;
        }
        println!("run {runs} straddled a minute's end; once more on a fresh queue");
    };
    let calls = ctx.fake_calls().await;
    assert_eq!(
        calls["openai"], 5,
        "two processes together made five calls in the minute"
    );
    assert_eq!(calls["gemini"], 1, "other providers are not held back");
    assert_eq!(
        ctx.scalar_i64("SELECT count(*) FROM ai_processing_errors")
            .await,
        0,
        "waiting is not an error"
    );
}

/// Eight OpenAI jobs over 5 requests a minute and one Gemini job, in two processes, until five
/// calls were made and three jobs wait, or until Redis's minute turned. Gives the minute it began
/// in.
async fn rpm_limited_run() -> (crate::harness::TestCtx, u64) {
    let ctx = crate::harness::TestCtx::with(&[
        ("AIQ_PROVIDER_RPM", "openai=5"),
        ("AIQ_PROVIDER_TPM", "gemini=100000"),
    ])
    .await;
    let minute = ctx.redis_minute().await;
    for i in 0..8 {
        ctx.enqueue(
            JobKind::LlmComplete,
            Tier::Enterprise,
            ORG_A,
            &payload("openai", "gpt-4o-mini", &format!("r{i}")),
            0,
        )
        .await;
    }
    ctx.enqueue(
        JobKind::LlmComplete,
        Tier::Enterprise,
        ORG_A,
        &payload("gemini", "gemini-2.5-flash", "g"),
        0,
    )
    .await;
    let daemons: Vec<_> = (0..2).map(|_| ctx.spawn_daemon(&[])).collect();
    crate::harness::wait_until(
        Duration::from_secs(30),
        "five calls and three waiting jobs",
        || async {
            let s = ctx.queue.stats().await.unwrap();
            (s.waiting.values().sum::<u64>() == 0 && s.inflight == 0 && s.delayed == 3)
                || ctx.redis_minute().await != minute
        },
    )
    .await;
    for d in daemons {
        assert!(
            crate::harness::signal_and_wait(d, libc::SIGTERM)
                .await
                .success()
        );
    }
    (ctx, minute)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_503_for_a_minute_opens_the_breaker_jobs_wait_spending_no_attempts_then_succeed() {
    // The daemon's defaults for the breaker, except a 10 s cooldown (30 s by default), so the
    // minute sees several half-open probes.
    let ctx = TestCtx::with(&[
        ("AIQ_BREAKER_COOLDOWN_MS", "10000"),
        ("AIQ_CONCURRENCY", "4"),
        ("AIQ_MAX_ATTEMPTS", "12"),
        ("AIQ_CALL_RETRIES", "2"),
    ])
    .await;
    let fake = ctx.vars["AIQ_OPENAI_BASE_URL"].clone();
    reqwest::Client::new()
        .post(format!("{fake}/_fake/outage?status=503&ms=60000"))
        .send()
        .await
        .unwrap();
    let outage_start = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    for i in 0..20 {
        // A provider outage fails every organisation: two here, so the provider\'s breaker
        // opens (one organisation\'s failures open only its own).
        let org = if i % 2 == 0 {
            ORG_A
        } else {
            crate::harness::ORG_B
        };
        ctx.enqueue(
            JobKind::LlmComplete,
            Tier::Enterprise,
            org,
            &crate::harness::llm_payload(Tier::Enterprise, org, &format!("m{i}")),
            0,
        )
        .await;
    }
    let worker = ctx.start_worker();
    ctx.wait_settled(Duration::from_secs(120)).await;
    worker.stop().await;

    let done = ctx
        .scalar_i64("SELECT count(*) FROM ai_processing_results WHERE status = 'completed'")
        .await;
    assert_eq!(done, 20, "every job succeeded after the outage");
    let stats = ctx.queue.stats().await.unwrap();
    assert_eq!(stats.dead, 0);
    // (start, end, status) of each openai call.
    let log = ctx.openai_call_log().await;
    let mut failed: Vec<(u64, u64)> = log
        .iter()
        .filter(|(.., status)| *status == 503)
        .map(|(start, end, _)| (*start, *end))
        .collect();
    failed.sort_by_key(|(_, end)| *end);
    let outage_end = outage_start + 60_000;
    assert!(failed.iter().all(|(t, _)| *t < outage_end + 1_000));
    // Five failures in a row open the breaker. Calls already in flight then may still fail;
    // after that, while it is open, no call: only one half-open probe per cooldown.
    assert!(failed.len() >= 5, "{failed:?}");
    let opened = failed[4].1;
    let probes: Vec<u64> = failed
        .iter()
        .map(|(start, _)| *start)
        .filter(|start| *start > opened + 100)
        .collect();
    let mut last = opened;
    for p in &probes {
        assert!(
            p - last >= 9_900,
            "a call {} ms after the breaker opened or the last probe: {failed:?}",
            p - last
        );
        last = *p;
    }
    assert!(probes.len() <= 6, "{failed:?}");
    // Attempts spent: the failed calls (each in its own attempt, as the in-call retry of a
    // failing call finds the breaker open), and nothing else.
    let attempts_spent = ctx
        .scalar_i64("SELECT coalesce(sum(attempts - 1), 0) FROM ai_processing_results")
        .await;
    let error_rows = ctx
        .scalar_i64(
            "SELECT count(*) FROM ai_processing_errors WHERE error_type = 'provider_unavailable'",
        )
        .await;
    assert_eq!(error_rows, failed.len() as i64);
    let deferred = stats.counters.get("deferred").copied().unwrap_or(0);
    println!(
        "a minute of 503s: {} failed calls ({} after the breaker opened, all half-open probes), {attempts_spent} attempts spent, {deferred} deferrals; the first call after the outage at +{} ms",
        failed.len(),
        probes.len(),
        log.iter()
            .find(|(.., s)| *s == 200)
            .map(|(t, ..)| t.saturating_sub(outage_end) as i64)
            .unwrap_or(-1)
    );
    assert!(attempts_spent <= failed.len() as i64);
    assert!(
        deferred >= 20,
        "jobs waited for the breaker ({deferred} deferrals)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_half_open_probe_does_not_make_the_same_job_probe_again_until_it_dies() {
    // A 1 s cooldown and a 9 s outage: about nine half-open probes, each a job's attempt. Each
    // job has six attempts: if the job whose probe failed always came back first, it would be
    // the next probe, and dead by the sixth.
    let ctx = TestCtx::with(&[
        ("AIQ_BREAKER_COOLDOWN_MS", "1000"),
        ("AIQ_CONCURRENCY", "4"),
        ("AIQ_MAX_ATTEMPTS", "6"),
        ("AIQ_CALL_RETRIES", "2"),
    ])
    .await;
    let fake = ctx.vars["AIQ_OPENAI_BASE_URL"].clone();
    reqwest::Client::new()
        .post(format!("{fake}/_fake/outage?status=503&ms=9000"))
        .send()
        .await
        .unwrap();
    for i in 0..20 {
        // A provider outage fails every organisation: two here, so the provider\'s breaker
        // opens (one organisation\'s failures open only its own).
        let org = if i % 2 == 0 {
            ORG_A
        } else {
            crate::harness::ORG_B
        };
        ctx.enqueue(
            JobKind::LlmComplete,
            Tier::Enterprise,
            org,
            &crate::harness::llm_payload(Tier::Enterprise, org, &format!("p{i}")),
            0,
        )
        .await;
    }
    let worker = ctx.start_worker();
    ctx.wait_settled(Duration::from_secs(60)).await;
    worker.stop().await;
    let stats = ctx.queue.stats().await.unwrap();
    let most: i64 = ctx
        .scalar_i64("SELECT coalesce(max(attempts), 0)::bigint FROM ai_processing_results")
        .await;
    let failed = ctx
        .scalar_i64("SELECT count(*) FROM ai_processing_errors")
        .await;
    println!(
        "9 s outage, 1 s cooldown: {failed} failed calls, the most attempts one job needed: {most}, dead {}",
        stats.dead
    );
    assert_eq!(stats.dead, 0, "a job died of failed probes");
    let done = ctx
        .scalar_i64("SELECT count(*) FROM ai_processing_results WHERE status = 'completed'")
        .await;
    assert_eq!(done, 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_aiq_cannot_build_is_that_jobs_own_fault_and_leaves_the_breaker_closed() {
    // One failure would be enough to open the breaker if it counted.
    let ctx = TestCtx::with(&[("AIQ_BREAKER_FAILURES", "1")]).await;
    let app = aiq::worker::app(&ctx.settings, ctx.store.clone())
        .await
        .unwrap();
    // A job id that cannot travel in a header (enqueue.lua refuses it; a job written around it
    // reaches the handler like this).
    let raw = crate::harness::raw_job(
        "bad\u{7}id",
        "llm.complete",
        Tier::Trial,
        llm_payload(Tier::Trial, ORG_A, "hello"),
    );
    match aiq::jobs::run(&app, &raw).await {
        Err(aiq::queue::backend::Failure::Permanent { message }) => {
            assert!(message.contains("invalid_request"), "{message}")
        }
        other => panic!("{other:?}: the job's own request error is permanent"),
    }
    let states = app.breakers.states().await.unwrap();
    assert!(
        states
            .iter()
            .all(|(_, s)| *s == aiq::providers::breaker::BreakerState::Closed),
        "{states:?}"
    );
    assert_eq!(
        ctx.fake_calls().await["openai"],
        0,
        "nothing reached the provider"
    );
}

#[tokio::test]
async fn an_unparseable_200_is_recorded_at_its_estimate_and_the_counters_still_equal_the_ledger() {
    let ctx = TestCtx::new().await;
    let id = ctx
        .enqueue(
            JobKind::LlmComplete,
            Tier::Enterprise,
            ORG_A,
            &llm_payload(Tier::Enterprise, ORG_A, "[fake:garbage] caption"),
            1,
        )
        .await;
    let worker = ctx.start_worker();
    ctx.wait_settled(Duration::from_secs(30)).await;
    worker.stop().await;
    let (cost, estimate, status): (i64, i64, String) = sqlx::query_as(
        "SELECT (cost_usd * 1000000)::bigint, (estimate_usd * 1000000)::bigint, call_status
         FROM ai_cost_tracking WHERE job_id = $1",
    )
    .bind(&id)
    .fetch_one(ctx.store.pool())
    .await
    .unwrap();
    assert_eq!(status, "unusable");
    assert!(estimate > 0);
    assert_eq!(
        cost, estimate,
        "the provider billed it: recorded at the estimate"
    );
    crate::money::assert_redis_agrees_with_postgres(&ctx, &[ORG_A]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_open_probe_given_to_a_job_its_rate_then_holds_back_is_given_back_at_once() {
    // A minute's cooldown, and one trial job a minute per organisation.
    let ctx = TestCtx::with(&[
        ("AIQ_BREAKER_COOLDOWN_MS", "60000"),
        (
            "AIQ_ORG_JOBS_PER_MINUTE",
            "enterprise_plus=0,enterprise=0,professional_agency=0,growth_team=0,solo_professional=0,trial=1",
        ),
    ])
    .await;
    let app = aiq::worker::app(&ctx.settings, ctx.store.clone())
        .await
        .unwrap();
    let org_a: uuid::Uuid = ORG_A.parse().unwrap();
    assert!(
        app.budget.admit(org_a, Tier::Trial).await.unwrap().is_ok(),
        "this minute's one job of the organisation"
    );
    // The provider's breaker open and its cooldown over: the next job to ask gets the probe.
    let mut redis = ctx.redis().await;
    let key = format!("{{{}}}:breaker:openai", ctx.vars["AIQ_BUDGET_PREFIX"]);
    let _: () =
        redis::AsyncCommands::hset_multiple(&mut redis, &key, &[("state", "open"), ("until", "1")])
            .await
            .unwrap();
    let raw = crate::harness::raw_job(
        "probe-1",
        "llm.complete",
        Tier::Trial,
        llm_payload(Tier::Trial, ORG_A, "a probe"),
    );
    match aiq::jobs::run(&app, &raw).await {
        Err(aiq::queue::backend::Failure::Defer { message, .. }) => {
            assert!(message.contains("rate"), "{message}")
        }
        other => panic!("{other:?}: the organisation's rate holds the job back"),
    }
    // No call was made, so the probe is free again: the next job (another organisation's)
    // probes now, not after the probe's minute-long timeout.
    crate::harness::wait_until(
        Duration::from_secs(10),
        "the unused probe to be given back",
        || async {
            app.breakers
                .admit(aiq::domain::Provider::OpenAi, crate::harness::ORG_B)
                .await
                .unwrap()
                .is_ok()
        },
    )
    .await;
    assert_eq!(ctx.fake_calls().await["openai"], 0);
}
