//! The whole slice: jobs from Redis through the worker and the fake providers to PostgreSQL.

use std::time::Duration;

use aiq::domain::{JobKind, Tier};

use crate::harness::{ORG_A, ORG_B, TestCtx, llm_payload, vision_payload};

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vision_job_and_an_llm_job_end_with_result_cost_and_usage_rows() {
    let ctx = TestCtx::new().await;
    // 999 of the month's 1,000 free label units are used: of this job's two, one is free.
    let month = chrono::Utc::now().format("%Y-%m").to_string();
    let used = std::collections::BTreeMap::from([("LABEL_DETECTION".to_owned(), 999u64)]);
    ctx.budget()
        .await
        .set_vision_units(&month, &used)
        .await
        .unwrap();
    let v = ctx
        .enqueue(
            JobKind::VisionAnnotate,
            Tier::Enterprise,
            ORG_A,
            &vision_payload(Tier::Enterprise, ORG_A, 2),
            0,
        )
        .await;
    let l = ctx
        .enqueue(
            JobKind::LlmComplete,
            Tier::Trial,
            ORG_A,
            &llm_payload(Tier::Trial, ORG_A, "Caption a cat."),
            0,
        )
        .await;
    let worker = ctx.start_worker();
    ctx.wait_settled(WAIT).await;
    worker.stop().await;

    let completed = ctx
        .scalar_i64(&format!(
            "SELECT count(*) FROM ai_processing_results WHERE status = 'completed' AND job_id IN ('{v}', '{l}')"
        ))
        .await;
    assert_eq!(completed, 2);
    // Two images x label detection: the first free, the second $1.50 per 1,000; safe search is
    // free with labels.
    let vision_micros = ctx
        .scalar_i64(&format!(
            "SELECT (cost_usd * 1000000)::bigint FROM ai_cost_tracking WHERE job_id = '{v}'"
        ))
        .await;
    assert_eq!(vision_micros, 1_500);
    let units = ctx
        .scalar_i64(&format!(
            "SELECT units::bigint FROM ai_cost_tracking WHERE job_id = '{v}'"
        ))
        .await;
    assert_eq!(units, 4, "two images x two features");
    // The LLM cost follows gpt-4o-mini's list price from the recorded tokens ($0.15 in, $0.60 out
    // per million), rounded up to the micro-dollar.
    let (input, output, micros): (i64, i64, i64) = sqlx::query_as(
        "SELECT input_tokens, output_tokens, (cost_usd * 1000000)::bigint FROM ai_usage WHERE job_id = $1",
    )
    .bind(&l)
    .fetch_one(ctx.store.pool())
    .await
    .expect("usage row");
    assert!(input > 0 && output > 0);
    let expected = (input as u64 * 150_000 + output as u64 * 600_000).div_ceil(1_000_000) as i64;
    assert_eq!(micros, expected);
    let tracked = ctx
        .scalar_i64(&format!(
            "SELECT (cost_usd * 1000000)::bigint FROM ai_cost_tracking WHERE job_id = '{l}'"
        ))
        .await;
    assert_eq!(tracked, expected);
    // Completed jobs leave Redis.
    let stats = ctx.queue.stats().await.unwrap();
    assert_eq!((stats.inflight, stats.delayed, stats.dead), (0, 0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_jobs_go_to_the_dead_set_with_the_reason_and_the_worker_goes_on() {
    let ctx = TestCtx::new().await;
    let not_json = ctx
        .enqueue(
            JobKind::LlmComplete,
            Tier::Trial,
            ORG_A,
            "this is not json",
            0,
        )
        .await;
    let wrong_shape = ctx
        .enqueue(
            JobKind::VisionAnnotate,
            Tier::Trial,
            ORG_A,
            &llm_payload(Tier::Trial, ORG_A, "hi"),
            0,
        )
        .await;
    let good = ctx
        .enqueue(
            JobKind::LlmComplete,
            Tier::Trial,
            ORG_A,
            &llm_payload(Tier::Trial, ORG_A, "hello"),
            0,
        )
        .await;
    let worker = ctx.start_worker();
    ctx.wait_settled(WAIT).await;
    worker.stop().await;

    let dead = ctx.queue.dead_jobs(10).await.unwrap();
    let reason = |id: &str| dead.iter().find(|d| d.id == id).map(|d| d.reason.clone());
    assert!(
        reason(&not_json)
            .expect("not-json job is dead")
            .contains("invalid payload")
    );
    assert!(
        reason(&wrong_shape)
            .expect("wrong-shape job is dead")
            .contains("missing field")
    );
    assert_eq!(dead.len(), 2);
    assert_eq!(
        ctx.scalar_i64(&format!("SELECT count(*) FROM ai_processing_results WHERE job_id = '{good}' AND status = 'completed'"))
            .await,
        1
    );
    assert_eq!(
        ctx.scalar_i64(
            "SELECT count(*) FROM ai_processing_errors WHERE error_type = 'invalid_payload'"
        )
        .await,
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_job_writes_nothing_new() {
    let ctx = TestCtx::new().await;
    let app = aiq::worker::app(&ctx.settings, ctx.store.clone())
        .await
        .unwrap();
    for (kind, payload) in [
        (
            "vision.annotate",
            vision_payload(Tier::GrowthTeam, ORG_A, 1),
        ),
        (
            "llm.complete",
            llm_payload(Tier::GrowthTeam, ORG_A, "replay me"),
        ),
    ] {
        let raw =
            crate::harness::raw_job(&format!("replay-{kind}"), kind, Tier::GrowthTeam, payload);
        aiq::jobs::run(&app, &raw).await.expect("first run");
        let before = ctx.store.row_counts().await.unwrap();
        aiq::jobs::run(&app, &raw).await.expect("replay");
        let after = ctx.store.row_counts().await.unwrap();
        assert_eq!(
            (
                before.ai_processing_results,
                before.ai_cost_tracking,
                before.ai_usage,
                before.ai_processing_errors
            ),
            (
                after.ai_processing_results,
                after.ai_cost_tracking,
                after.ai_usage,
                after.ai_processing_errors
            ),
            "{kind}"
        );
    }
    let rows = ctx.store.row_counts().await.unwrap();
    assert_eq!(
        (
            rows.ai_processing_results,
            rows.ai_cost_tracking,
            rows.ai_usage
        ),
        (2, 2, 1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_503_is_retried_and_dead_after_the_last_attempt_with_an_error_row_each_time() {
    let ctx = TestCtx::new().await;
    let id = ctx
        .enqueue(
            JobKind::LlmComplete,
            Tier::Enterprise,
            ORG_A,
            &llm_payload(Tier::Enterprise, ORG_A, "[fake:status=503]"),
            3,
        )
        .await;
    let worker = ctx.start_worker();
    ctx.wait_settled(WAIT).await;
    worker.stop().await;

    let dead = ctx.queue.dead_jobs(10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].id, id);
    assert_eq!(dead[0].attempts, 3);
    assert!(
        dead[0].reason.contains("failed 3 of 3 attempts"),
        "{}",
        dead[0].reason
    );
    let retry_counts: Vec<i32> = sqlx::query_scalar(
        "SELECT retry_count FROM ai_processing_errors WHERE job_id = $1 AND error_type = 'provider_unavailable' ORDER BY 1",
    )
    .bind(&id)
    .fetch_all(ctx.store.pool())
    .await
    .unwrap();
    assert_eq!(retry_counts, vec![0, 1, 2]);
    assert_eq!(
        ctx.scalar_i64(&format!(
            "SELECT count(*) FROM ai_processing_results WHERE job_id = '{id}' AND status = 'failed'"
        ))
        .await,
        1
    );
    // Each failed call still costs a row, at zero dollars.
    assert_eq!(
        ctx.scalar_i64(&format!("SELECT count(*) FROM ai_cost_tracking WHERE job_id = '{id}' AND call_status = 'failed' AND cost_usd = 0"))
            .await,
        3
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_400_goes_to_the_dead_set_without_a_retry() {
    let ctx = TestCtx::new().await;
    let id = ctx
        .enqueue(
            JobKind::LlmComplete,
            Tier::Trial,
            ORG_A,
            &llm_payload(Tier::Trial, ORG_A, "[fake:status=400]"),
            5,
        )
        .await;
    let worker = ctx.start_worker();
    ctx.wait_settled(WAIT).await;
    worker.stop().await;
    let dead = ctx.queue.dead_jobs(10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].attempts, 1);
    assert_eq!(
        ctx.scalar_i64(&format!(
            "SELECT count(*) FROM ai_processing_errors WHERE job_id = '{id}'"
        ))
        .await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_cost_analysis_returns_the_totals_of_the_rows_aiq_wrote() {
    let ctx = TestCtx::new().await;
    ctx.use_up_free_vision_units("LABEL_DETECTION").await;
    for _ in 0..3 {
        ctx.enqueue(
            JobKind::VisionAnnotate,
            Tier::Enterprise,
            ORG_A,
            &vision_payload(Tier::Enterprise, ORG_A, 1),
            0,
        )
        .await;
    }
    for text in ["first caption", "second caption"] {
        ctx.enqueue(
            JobKind::LlmComplete,
            Tier::Enterprise,
            ORG_A,
            &llm_payload(Tier::Enterprise, ORG_A, text),
            0,
        )
        .await;
    }
    // A call refused by the provider counts as a request at zero cost.
    ctx.enqueue(
        JobKind::LlmComplete,
        Tier::Enterprise,
        ORG_A,
        &llm_payload(Tier::Enterprise, ORG_A, "[fake:status=400]"),
        0,
    )
    .await;
    // Another organisation's spend must not show.
    ctx.enqueue(
        JobKind::VisionAnnotate,
        Tier::Trial,
        ORG_B,
        &vision_payload(Tier::Trial, ORG_B, 4),
        0,
    )
    .await;
    let worker = ctx.start_worker();
    ctx.wait_settled(WAIT).await;
    worker.stop().await;

    let tokens: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT input_tokens, output_tokens FROM ai_usage WHERE organization_id = $1::uuid",
    )
    .bind(ORG_A)
    .fetch_all(ctx.store.pool())
    .await
    .unwrap();
    assert_eq!(tokens.len(), 2);
    let openai_expected: i64 = tokens
        .iter()
        .map(|(i, o)| (*i as u64 * 150_000 + *o as u64 * 600_000).div_ceil(1_000_000) as i64)
        .sum();

    let org = uuid::Uuid::parse_str(ORG_A).unwrap();
    let rows = ctx.store.cost_analysis(org, 30).await.unwrap();
    let row = |name: &str| {
        rows.iter()
            .find(|r| r.service_name == name)
            .unwrap_or_else(|| panic!("no {name} row in {rows:?}"))
    };
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(row("google_vision").total_cost.micros(), 3 * 1_500);
    assert_eq!(row("google_vision").request_count, 3);
    assert_eq!(row("openai").total_cost.micros(), openai_expected);
    assert_eq!(row("openai").request_count, 3);
    // Ordered by total cost, highest first, as the plan's function says.
    assert!(rows[0].total_cost >= rows[1].total_cost);

    let other = ctx
        .store
        .cost_analysis(uuid::Uuid::parse_str(ORG_B).unwrap(), 30)
        .await
        .unwrap();
    assert_eq!(other.len(), 1);
    assert_eq!(other[0].total_cost.micros(), 4 * 1_500);

    // The function also answers with its default window.
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM get_cost_analysis($1::uuid)")
        .bind(ORG_A)
        .fetch_one(ctx.store.pool())
        .await
        .unwrap();
    assert_eq!(n, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vision_job_whose_every_image_is_bad_input_is_dead_and_costs_nothing() {
    let ctx = TestCtx::new().await;
    ctx.use_up_free_vision_units("LABEL_DETECTION").await;
    let payload = serde_json::json!({
        "version": 1, "organization_id": ORG_A, "tier": "trial",
        "images": [{ "content": "not base64!" }], "features": [{ "type": "LABEL_DETECTION" }]
    })
    .to_string();
    let id = ctx
        .enqueue(JobKind::VisionAnnotate, Tier::Trial, ORG_A, &payload, 3)
        .await;
    let worker = ctx.start_worker();
    ctx.wait_settled(WAIT).await;
    worker.stop().await;
    let dead = ctx.queue.dead_jobs(10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].attempts, 1, "bad input is not retried");
    assert!(
        dead[0].reason.contains("Bad image data"),
        "{}",
        dead[0].reason
    );
    let (error_type, cost): (String, i64) = sqlx::query_as(
        "SELECT e.error_type, (c.cost_usd * 1000000)::bigint FROM ai_processing_errors e
         JOIN ai_cost_tracking c USING (job_id) WHERE e.job_id = $1",
    )
    .bind(&id)
    .fetch_one(ctx.store.pool())
    .await
    .unwrap();
    assert_eq!(error_type, "invalid_image");
    assert_eq!(cost, 0, "images refused as invalid input are not billed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nul_character_from_a_provider_is_stored_as_a_replacement_not_a_failed_job() {
    let ctx = TestCtx::new().await;
    let id = ctx
        .enqueue(
            JobKind::LlmComplete,
            Tier::Trial,
            ORG_A,
            &llm_payload(Tier::Trial, ORG_A, "[fake:nul] caption"),
            1,
        )
        .await;
    let worker = ctx.start_worker();
    ctx.wait_settled(Duration::from_secs(20)).await;
    worker.stop().await;
    let (status, content): (String, String) = sqlx::query_as(
        "SELECT status, raw_response #>> '{choices,0,message,content}' FROM ai_processing_results WHERE job_id = $1",
    )
    .bind(&id)
    .fetch_one(ctx.store.pool())
    .await
    .unwrap();
    assert_eq!(status, "completed");
    assert!(content.ends_with('\u{FFFD}'), "{content:?}");
    assert_eq!(
        ctx.fake_calls().await["openai"],
        1,
        "one call, not one per attempt"
    );
}
