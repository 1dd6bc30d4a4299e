//! Money against real Redis and PostgreSQL: limits hold under concurrency, the Redis counters
//! agree with ai_cost_tracking, alerts fire exactly once.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use aiq::budget::{OrgLimits, PriceCatalog};
use aiq::domain::{JobKind, MicroUsd, Tier};
use aiq_testkit::fake::FakeOptions;
use axum::http::StatusCode;
use redis::AsyncCommands;
use uuid::Uuid;

use crate::harness::{
    ORG_A, ORG_B, TestCtx, llm_payload, signal_and_wait, vision_payload, wait_until,
};

async fn completed(ctx: &TestCtx) -> i64 {
    ctx.completed().await
}

fn org(s: &str) -> Uuid {
    Uuid::parse_str(s).unwrap()
}

/// Spend recorded in PostgreSQL for one organisation (or all) in today's or this month's window.
async fn pg_spend(ctx: &TestCtx, org: Option<&str>, month: bool) -> i64 {
    let window = if month {
        "date_trunc('month', billing_date) = date_trunc('month', (now() AT TIME ZONE 'UTC')::date)"
    } else {
        "billing_date = (now() AT TIME ZONE 'UTC')::date"
    };
    let filter = org.map_or(String::new(), |o| format!("AND organization_id = '{o}'"));
    ctx.scalar_i64(&format!(
        "SELECT coalesce((sum(cost_usd) * 1000000)::bigint, 0) FROM ai_cost_tracking WHERE {window} {filter}"
    ))
    .await
}

/// Checks every scope's Redis counters against ai_cost_tracking; returns (org A's day spend).
pub async fn assert_redis_agrees_with_postgres(ctx: &TestCtx, orgs: &[&str]) {
    let budget = ctx.budget().await;
    let any = OrgLimits {
        daily: MicroUsd::ZERO,
        monthly: MicroUsd::ZERO,
    };
    for o in orgs {
        let (scopes, _) = budget.scopes(org(o), any, chrono::Utc::now());
        let states = budget.state(&scopes).await.unwrap();
        // Scopes come platform day, platform month, organisation day, organisation month.
        let expected = [
            pg_spend(ctx, None, false).await,
            pg_spend(ctx, None, true).await,
            pg_spend(ctx, Some(o), false).await,
            pg_spend(ctx, Some(o), true).await,
        ];
        for (state, want) in states.iter().zip(expected) {
            assert_eq!(
                state.spent.micros(),
                want,
                "redis spent of {} vs ai_cost_tracking",
                state.scope
            );
            assert_eq!(
                state.reserved.micros(),
                0,
                "nothing is still held in {}",
                state.scope
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_jobs_from_three_processes_never_spend_past_an_organisations_limit() {
    let ctx = TestCtx::build(
        &[("AIQ_CONCURRENCY", "8")],
        FakeOptions::with_latency(Duration::from_millis(20)),
    )
    .await;
    // Every job has the same estimate: the same message length and max_tokens.
    let text = |i: usize| format!("caption photo {i:03}");
    let input_bound = text(0).len() as u64 + "user".len() as u64 + 8;
    let estimate = PriceCatalog::builtin()
        .llm_estimate("openai", "gpt-4o-mini", input_bound, 50)
        .unwrap();
    let limit = MicroUsd::from_micros(estimate.micros() * 100);
    ctx.store
        .set_org_limits(org(ORG_A), Some(limit), None)
        .await
        .unwrap();
    for i in 0..500 {
        ctx.enqueue(
            JobKind::LlmComplete,
            Tier::Enterprise,
            ORG_A,
            &llm_payload(Tier::Enterprise, ORG_A, &text(i)),
            0,
        )
        .await;
    }
    let daemons: Vec<_> = (0..3).map(|_| ctx.spawn_daemon(&[])).collect();
    wait_until(
        Duration::from_secs(90),
        "every job to run or wait for the next window",
        || async {
            let s = ctx.queue.stats().await.unwrap();
            s.waiting.values().sum::<u64>() == 0
                && s.inflight == 0
                && completed(&ctx).await as u64 + s.delayed == 500
        },
    )
    .await;
    for d in daemons {
        assert!(signal_and_wait(d, libc::SIGTERM).await.success());
    }

    let spent = pg_spend(&ctx, Some(ORG_A), false).await;
    let done = completed(&ctx).await;
    let calls = ctx.fake_calls().await["openai"].as_i64().unwrap();
    println!(
        "limit {limit} ({} x the estimate {estimate}): {done} jobs ran, settled spend {}, {} wait",
        100,
        MicroUsd::from_micros(spent),
        500 - done
    );
    assert!(
        spent <= limit.micros(),
        "settled {spent} > limit {}",
        limit.micros()
    );
    assert!(
        done >= 100,
        "room for at least 100 calls at the estimate; {done} ran"
    );
    assert!(done < 500, "the limit stopped some jobs");
    assert_eq!(
        calls, done,
        "no provider call without a completed, recorded job: none after the limit"
    );
    assert_redis_agrees_with_postgres(&ctx, &[ORG_A]).await;

    // The refused jobs wait, unspent, for the next day's window.
    let next_day = (chrono::Utc::now().date_naive() + chrono::Days::new(1))
        .and_hms_opt(0, 0, 0)
        .unwrap()
        .and_utc()
        .timestamp_millis() as f64;
    let mut redis = ctx.redis().await;
    let delayed: Vec<(String, f64)> = redis
        .zrange_withscores(ctx.key("delayed"), 0, -1)
        .await
        .unwrap();
    assert_eq!(delayed.len() as i64, 500 - done);
    for (id, due) in &delayed {
        assert!(
            *due >= next_day && *due <= next_day + 3_000.0,
            "job {id} is due at {due}, not at the reset"
        );
        let f = ctx.queue.job_fields(id).await.unwrap();
        assert!(f["deferred_reason"].contains("budget exceeded"), "{f:?}");
        assert_eq!(f["attempts"], "0", "waiting for budget spends no attempt");
    }
    let refused = ctx
        .scalar_i64("SELECT count(DISTINCT job_id) FROM ai_processing_errors WHERE error_type = 'budget_exceeded'")
        .await;
    assert_eq!(refused, 500 - done);
    let alerts = ctx
        .scalar_i64(&format!(
            "SELECT count(*) FROM ai_cost_alerts WHERE scope = 'org:{ORG_A}' AND window_kind = 'day' AND threshold = '100'"
        ))
        .await;
    assert_eq!(alerts, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_counters_equal_ai_cost_tracking_after_failures_retries_and_a_kill_9() {
    let ctx = TestCtx::build(
        &[
            ("AIQ_CONCURRENCY", "6"),
            // The injected 503s and timeouts would open the breaker; this test is about money.
            ("AIQ_BREAKER_FAILURES", "1000"),
            ("AIQ_OPENAI_TIMEOUT_MS", "400"),
            ("AIQ_VISION_TIMEOUT_MS", "400"),
            ("AIQ_BUDGET_HOLD_MARGIN_MS", "1000"),
            ("AIQ_LEASE_MS", "1500"),
        ],
        FakeOptions::with_latency(Duration::from_millis(150)),
    )
    .await;
    ctx.use_up_free_vision_units("LABEL_DETECTION").await;
    for i in 0..90 {
        let (o, tier) = if i % 2 == 0 {
            (ORG_A, Tier::Enterprise)
        } else {
            (ORG_B, Tier::GrowthTeam)
        };
        match i % 6 {
            // A timeout after sending may have been billed: it costs its estimate.
            0 => {
                ctx.enqueue(
                    JobKind::LlmComplete,
                    tier,
                    o,
                    &llm_payload(tier, o, "slow [fake:delay=900]"),
                    2,
                )
                .await
            }
            // A 503 is retried, costs nothing, and dies after its attempts.
            1 => {
                ctx.enqueue(
                    JobKind::LlmComplete,
                    tier,
                    o,
                    &llm_payload(tier, o, "[fake:status=503]"),
                    2,
                )
                .await
            }
            2 | 3 => {
                ctx.enqueue(
                    JobKind::VisionAnnotate,
                    tier,
                    o,
                    &vision_payload(tier, o, 2),
                    0,
                )
                .await
            }
            _ => {
                ctx.enqueue(
                    JobKind::LlmComplete,
                    tier,
                    o,
                    &llm_payload(tier, o, &format!("caption {i}")),
                    0,
                )
                .await
            }
        };
    }
    let a = ctx.spawn_daemon(&[]);
    wait_until(
        Duration::from_secs(30),
        "the first worker to be busy",
        || async { completed(&ctx).await >= 10 && ctx.queue.stats().await.unwrap().inflight >= 3 },
    )
    .await;
    assert!(!signal_and_wait(a, libc::SIGKILL).await.success());
    let b = ctx.spawn_daemon(&[]);
    ctx.wait_settled(Duration::from_secs(90)).await;
    // The dead worker's holds expire and the sweeper records them.
    let redis = ctx.redis().await;
    let holds = format!("{{{}}}:res_expiry", ctx.vars["AIQ_BUDGET_PREFIX"]);
    wait_until(
        Duration::from_secs(60),
        "the dead worker's holds to be swept",
        || {
            let (mut redis, holds) = (redis.clone(), holds.clone());
            async move {
                let open: Vec<(String, f64)> =
                    redis.zrange_withscores(&holds, 0, -1).await.unwrap();
                open.is_empty()
            }
        },
    )
    .await;
    assert!(signal_and_wait(b, libc::SIGTERM).await.success());

    let statuses: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT call_status, count(*), (sum(cost_usd) * 1000000)::bigint FROM ai_cost_tracking GROUP BY 1 ORDER BY 1",
    )
    .fetch_all(ctx.store.pool())
    .await
    .unwrap();
    println!("cost rows by status (status, rows, micro-USD): {statuses:?}");
    let status = |s: &str| {
        statuses
            .iter()
            .find(|r| r.0 == s)
            .map_or((0, 0), |r| (r.1, r.2))
    };
    assert!(
        status("failed").0 > 0 && status("failed").1 > 0,
        "timeouts cost their estimate"
    );
    assert!(status("succeeded").1 > 0);
    assert!(
        status("expired").0 >= 1,
        "the killed worker's calls were swept in"
    );
    assert_redis_agrees_with_postgres(&ctx, &[ORG_A, ORG_B]).await;
}

/// A webhook that answers 500 to its first `failures` requests, then 200; it keeps every
/// request's text and status.
async fn webhook(failures: usize) -> (String, Arc<Mutex<Vec<(String, u16)>>>) {
    let log: Arc<Mutex<Vec<(String, u16)>>> = Arc::default();
    let app = {
        let log = log.clone();
        axum::Router::new().route(
            "/hook",
            axum::routing::post(move |body: axum::Json<serde_json::Value>| {
                let log = log.clone();
                async move {
                    let mut log = log.lock().unwrap();
                    let status = if log.len() < failures { 500 } else { 200 };
                    log.push((body["text"].as_str().unwrap_or("").to_owned(), status));
                    StatusCode::from_u16(status).unwrap()
                }
            }),
        )
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, log)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_alert_threshold_fires_once_across_three_processes_and_the_webhook_is_retried() {
    let (url, log) = webhook(2).await;
    let (sentry_port, sentry_events) = crate::operate::fake_sentry().await;
    let dsn = format!("http://publickey@127.0.0.1:{sentry_port}/7");
    let ctx = TestCtx::build(
        &[
            ("AIQ_CONCURRENCY", "4"),
            ("AIQ_ALERT_WEBHOOK_URL", &url),
            ("AIQ_SENTRY_DSN", &dsn),
        ],
        FakeOptions::with_latency(Duration::from_millis(30)),
    )
    .await;
    // Past the free tier a one-image label job costs exactly $0.0015; the limit fits ten.
    ctx.use_up_free_vision_units("LABEL_DETECTION").await;
    ctx.store
        .set_org_limits(org(ORG_A), Some(MicroUsd::from_micros(10 * 1_500)), None)
        .await
        .unwrap();
    for _ in 0..20 {
        ctx.enqueue(
            JobKind::VisionAnnotate,
            Tier::Enterprise,
            ORG_A,
            &vision_payload(Tier::Enterprise, ORG_A, 1),
            0,
        )
        .await;
    }
    let daemons: Vec<_> = (0..3).map(|_| ctx.spawn_daemon(&[])).collect();
    wait_until(
        Duration::from_secs(60),
        "jobs to run and three alerts to be delivered",
        || async {
            let s = ctx.queue.stats().await.unwrap();
            s.waiting.values().sum::<u64>() == 0
                && s.inflight == 0
                && ctx
                    .scalar_i64(
                        "SELECT count(*) FROM ai_cost_alerts WHERE delivered_at IS NOT NULL",
                    )
                    .await
                    == 3
        },
    )
    .await;
    for d in daemons {
        assert!(signal_and_wait(d, libc::SIGTERM).await.success());
    }
    assert_eq!(completed(&ctx).await, 10, "ten jobs fit the limit exactly");
    let alerts: Vec<(String, String, String, i32)> = sqlx::query_as(
        "SELECT scope, window_kind, threshold, delivery_attempts FROM ai_cost_alerts ORDER BY threshold",
    )
    .fetch_all(ctx.store.pool())
    .await
    .unwrap();
    let thresholds: Vec<&str> = alerts.iter().map(|a| a.2.as_str()).collect();
    assert_eq!(thresholds, vec!["100", "80", "95"], "{alerts:?}");
    assert!(
        alerts
            .iter()
            .all(|a| a.0 == format!("org:{ORG_A}") && a.1 == "day")
    );
    let log = log.lock().unwrap().clone();
    println!("webhook requests (status, text): {log:?}");
    let delivered: Vec<&String> = log
        .iter()
        .filter(|(_, s)| *s == 200)
        .map(|(t, _)| t)
        .collect();
    assert_eq!(delivered.len(), 3, "one delivery per alert");
    let mut unique = delivered.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 3);
    assert_eq!(log.len(), 5, "the two 500s were retried");
    assert!(alerts.iter().map(|a| a.3).sum::<i32>() == 5);
    // Each alert also reached Sentry once.
    let events = sentry_events.lock().unwrap().clone();
    for t in ["80", "95", "100"] {
        let n = events
            .iter()
            .filter(|e| e.contains(&format!("\"alert.threshold\":\"{t}\"")))
            .count();
        assert_eq!(n, 1, "alert {t} in Sentry: {events:?}");
    }
}

fn aiq(ctx: &TestCtx, args: &[&str]) -> String {
    let out = crate::harness::aiq_command()
        .envs(&ctx.vars)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "aiq {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn costs_agree_with_get_cost_analysis_and_rebuild_restores_lost_redis_counters() {
    let ctx = TestCtx::new().await;
    ctx.use_up_free_vision_units("LABEL_DETECTION").await;
    for (o, tier) in [(ORG_A, Tier::Enterprise), (ORG_B, Tier::Trial)] {
        for i in 0..3 {
            ctx.enqueue(
                JobKind::VisionAnnotate,
                tier,
                o,
                &vision_payload(tier, o, 1 + i),
                0,
            )
            .await;
            ctx.enqueue(
                JobKind::LlmComplete,
                tier,
                o,
                &llm_payload(tier, o, &format!("caption {i}")),
                0,
            )
            .await;
        }
    }
    let worker = ctx.start_worker();
    ctx.wait_settled(Duration::from_secs(30)).await;
    worker.stop().await;

    // aiq costs: the same totals per provider as the plan's get_cost_analysis().
    let report: serde_json::Value = serde_json::from_str(&aiq(
        &ctx,
        &["costs", "--org", ORG_A, "--days", "30", "--json"],
    ))
    .unwrap();
    let analysis = ctx.store.cost_analysis(org(ORG_A), 30).await.unwrap();
    assert_eq!(analysis.len(), 2);
    for row in &analysis {
        let from_costs: i64 = report["spend"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["provider"] == row.service_name.as_str())
            .map(|r| r["cost"].as_i64().unwrap())
            .sum();
        assert_eq!(from_costs, row.total_cost.micros(), "{}", row.service_name);
    }
    let forecast = &report["forecasts"][0];
    assert_eq!(forecast["organization_id"], ORG_A);
    assert_eq!(
        forecast["monthly_limit"], 6_000_000_000i64,
        "the enterprise tier default"
    );
    assert_eq!(
        forecast["month_to_date"].as_i64().unwrap(),
        analysis.iter().map(|r| r.total_cost.micros()).sum::<i64>()
    );

    // Redis loses the budget's data; rebuild puts back what ai_cost_tracking says.
    let mut redis = ctx.redis().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{{{}}}:*", ctx.vars["AIQ_BUDGET_PREFIX"]))
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(!keys.is_empty());
    let _: i64 = redis.del(&keys).await.unwrap();
    let out = aiq(&ctx, &["budget", "rebuild"]);
    assert!(out.contains("rebuilt from ai_cost_tracking"), "{out}");
    assert_redis_agrees_with_postgres(&ctx, &[ORG_A, ORG_B]).await;
    let units = ctx
        .budget()
        .await
        .vision_units(&chrono::Utc::now().format("%Y-%m").to_string())
        .await
        .unwrap();
    // 2 orgs x (1 + 2 + 3 images) of label detection; the free units set by hand are not in the ledger.
    assert_eq!(units.get("LABEL_DETECTION"), Some(&12));

    // Limits: set an override and see it in `budget show`.
    let out = aiq(&ctx, &["budget", "set-limit", ORG_B, "--daily-usd", "2.5"]);
    assert!(out.contains("daily $2.500000"), "{out}");
    let shown = aiq(&ctx, &["budget", "show", ORG_B]);
    assert!(
        shown.contains("(trial)") && shown.contains("$2.500000") && shown.contains("$5.000000"),
        "{shown}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_over_an_organisations_rate_wait_for_the_next_minute_and_do_not_fail() {
    // The limit counts per clock minute. A run that straddles a minute's end says nothing about
    // one window: it is run again on a fresh queue (a run takes seconds, so the next one fits).
    let mut runs = 0;
    let ctx = loop {
        runs += 1;
        assert!(runs <= 3, "three runs in a row straddled a minute's end");
        let (ctx, worker, minute) = rate_limited_run().await;
        worker.stop().await;
        if ctx.redis_minute().await == minute {
            break ctx;
        }
        println!("run {runs} straddled a minute's end; once more on a fresh queue");
    };
    assert_eq!(
        completed(&ctx).await,
        4,
        "three of org A's jobs and org B's one ran"
    );
    let now = chrono::Utc::now().timestamp_millis() as f64;
    let mut redis = ctx.redis().await;
    let delayed: Vec<(String, f64)> = redis
        .zrange_withscores(ctx.key("delayed"), 0, -1)
        .await
        .unwrap();
    for (id, due) in &delayed {
        assert!(
            *due <= now + 61_000.0,
            "job {id} waits for the next minute, not longer"
        );
        let f = ctx.queue.job_fields(id).await.unwrap();
        assert!(f["deferred_reason"].contains("rate"), "{f:?}");
        assert_eq!(f["attempts"], "0");
    }
    assert_eq!(
        ctx.scalar_i64("SELECT count(*) FROM ai_processing_errors")
            .await,
        0,
        "waiting is not an error"
    );
}

/// Five trial jobs of org A over a rate of three a minute, and one of org B, until the allowed
/// ones ran and the rest wait, or until Redis's minute turned. Gives the minute it began in.
async fn rate_limited_run() -> (TestCtx, crate::harness::Worker, u64) {
    let ctx = TestCtx::with(&[(
        "AIQ_ORG_JOBS_PER_MINUTE",
        "enterprise_plus=0,enterprise=0,professional_agency=0,growth_team=0,solo_professional=0,trial=3",
    )])
    .await;
    let minute = ctx.redis_minute().await;
    for i in 0..5 {
        ctx.enqueue(
            JobKind::LlmComplete,
            Tier::Trial,
            ORG_A,
            &llm_payload(Tier::Trial, ORG_A, &format!("r{i}")),
            0,
        )
        .await;
    }
    // Another organisation has its own allowance.
    ctx.enqueue(
        JobKind::LlmComplete,
        Tier::Trial,
        ORG_B,
        &llm_payload(Tier::Trial, ORG_B, "b"),
        0,
    )
    .await;
    let worker = ctx.start_worker();
    wait_until(
        Duration::from_secs(30),
        "the allowed jobs to run and the rest to wait",
        || async {
            let s = ctx.queue.stats().await.unwrap();
            (s.waiting.values().sum::<u64>() == 0 && s.inflight == 0 && s.delayed == 2)
                || ctx.redis_minute().await != minute
        },
    )
    .await;
    (ctx, worker, minute)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_hour_far_above_the_trailing_average_raises_one_spike_alert() {
    let ctx = TestCtx::new().await;
    // $1 an hour for the last day, then $20 in the last hour, for org A.
    for hours_ago in 2..26 {
        sqlx::query(
            "INSERT INTO ai_cost_tracking (organization_id, service_name, operation_type, cost_usd, billing_date,
                created_at, job_id, attempt, execution, call_seq)
             VALUES ($1::uuid, 'openai', 'chat.completions', 1, CURRENT_DATE, now() - make_interval(hours => $2),
                $3, 1, 1, 0)",
        )
        .bind(ORG_A)
        .bind(hours_ago)
        .bind(format!("past-{hours_ago}"))
        .execute(ctx.store.pool())
        .await
        .unwrap();
    }
    sqlx::query(
        "INSERT INTO ai_cost_tracking (organization_id, service_name, operation_type, cost_usd, billing_date,
            created_at, job_id, attempt, execution, call_seq)
         VALUES ($1::uuid, 'openai', 'chat.completions', 20, CURRENT_DATE, now() - interval '10 minutes', 'now', 1, 1, 0)",
    )
    .bind(ORG_A)
    .execute(ctx.store.pool())
    .await
    .unwrap();
    let alerts = aiq::budget::alerts::Alerts::new(ctx.store.clone());
    for _ in 0..2 {
        alerts
            .check_spikes(3.0, MicroUsd::from_micros(1_000_000))
            .await;
    }
    let rows: Vec<(String, String, String)> =
        sqlx::query_as("SELECT scope, threshold, message FROM ai_cost_alerts ORDER BY scope")
            .fetch_all(ctx.store.pool())
            .await
            .unwrap();
    // The organisation and the platform (which here spent the same) each spiked once.
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(rows[0].0, "global");
    assert_eq!(rows[1].0, format!("org:{ORG_A}"));
    assert!(
        rows.iter()
            .all(|r| r.1 == "spike" && r.2.contains("$20.000000")),
        "{rows:?}"
    );
}
