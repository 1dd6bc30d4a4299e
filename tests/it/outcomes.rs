//! Outcomes as an app sees them (jobs/README.md, "Outcomes"), against a running aiq: the
//! events each final state leaves in `{p}:events`, a budget deferral's reason and reset time in
//! its event and its status, `cancel.lua` for waiting, delayed and running jobs, `aiq job show`
//! and `aiq job cancel` on ids that exist nowhere, a reader that resumes from its last id, and
//! events turned off.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use aiq::budget::PriceCatalog;
use aiq::domain::{JobKind, MicroUsd, OrganizationId, Tier};
use aiq::queue::NewJob;
use aiq_testkit::fake::FakeOptions;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use redis::AsyncCommands;

use crate::enqueue_props::{SNAPSHOT, around, differing, is_aiq_refusal, nasty};
use crate::harness::{ORG_A, TestCtx, aiq_command, llm_payload, wait_until};

type Fields = HashMap<String, String>;
/// A stream entry as Redis sends it: its id, then field, value, field, value...
type RawEntry = (String, Vec<String>);

/// Every entry of the events stream, oldest first: (stream id, fields).
pub(crate) async fn events(ctx: &TestCtx) -> Vec<(String, Fields)> {
    let raw: Vec<RawEntry> = redis::cmd("XRANGE")
        .arg(ctx.key("events"))
        .arg("-")
        .arg("+")
        .query_async(&mut ctx.redis().await)
        .await
        .expect("XRANGE of the events stream");
    raw.into_iter()
        .flat_map(|(id, kv)| read_entry(&id, kv))
        .collect()
}

/// The events of one stream entry (the contract's parser, `aiq_queue::events::entry_events`),
/// each at its position. An entry the parser refuses fails the test: only aiq writes here.
pub(crate) fn read_entry(id: &str, kv: Vec<String>) -> Vec<(String, Fields)> {
    let fields: Vec<(String, String)> = kv
        .chunks(2)
        .filter_map(|c| Some((c.first()?.clone(), c.get(1)?.clone())))
        .collect();
    aiq::queue::events::entry_events(id, &fields)
        .unwrap_or_else(|e| panic!("stream entry {id}: {e}"))
        .into_iter()
        .map(|e| (e.position, e.fields.into_iter().collect()))
        .collect()
}

/// Every job's terminal events (types, in order), read from the whole stream a page at a time.
pub(crate) async fn terminal_events(ctx: &TestCtx) -> HashMap<String, Vec<String>> {
    let mut conn = ctx.redis().await;
    let mut out: HashMap<String, Vec<String>> = HashMap::new();
    let mut from = "-".to_owned();
    loop {
        let page: Vec<RawEntry> = redis::cmd("XRANGE")
            .arg(ctx.key("events"))
            .arg(&from)
            .arg("+")
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await
            .expect("XRANGE of the events stream");
        let Some((last, _)) = page.last() else {
            return out;
        };
        from = format!("({last}");
        for (id, kv) in page {
            for (_, f) in read_entry(&id, kv) {
                if TERMINAL.contains(&f["type"].as_str()) {
                    out.entry(f["job_id"].clone())
                        .or_default()
                        .push(f["type"].clone());
                }
            }
        }
    }
}

/// The events of one job, in order.
fn of_job<'a>(all: &'a [(String, Fields)], id: &str) -> Vec<&'a Fields> {
    all.iter()
        .map(|(_, f)| f)
        .filter(|f| f.get("job_id").map(String::as_str) == Some(id))
        .collect()
}

const TERMINAL: [&str; 4] = ["succeeded", "failed", "dead", "cancelled"];

fn terminal<'a>(evs: &[&'a Fields]) -> Vec<&'a Fields> {
    evs.iter()
        .copied()
        .filter(|e| TERMINAL.contains(&e["type"].as_str()))
        .collect()
}

/// Runs `aiq` with the test's settings: (exit code, stdout, stderr).
fn aiq(ctx: &TestCtx, args: &[&str]) -> (i32, String, String) {
    let out = aiq_command()
        .envs(&ctx.vars)
        .args(args)
        .output()
        .expect("running aiq");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `aiq job show ID --json`, which must succeed.
fn show(ctx: &TestCtx, id: &str) -> serde_json::Value {
    let (code, out, err) = aiq(ctx, &["job", "show", id, "--json"]);
    assert_eq!(code, 0, "aiq job show {id}: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn cancel(ctx: &TestCtx, id: &str) -> String {
    let (code, out, err) = aiq(ctx, &["job", "cancel", id]);
    assert_eq!(code, 0, "aiq job cancel {id}: {err}");
    out
}

async fn enqueue_llm(ctx: &TestCtx, text: &str, delay: Duration, max_attempts: u32) -> String {
    ctx.queue
        .enqueue(&NewJob {
            kind: JobKind::LlmComplete,
            tier: Tier::Enterprise,
            organization_id: OrganizationId::parse(ORG_A).unwrap(),
            payload: llm_payload(Tier::Enterprise, ORG_A, text),
            job_id: None,
            delay,
            idempotency_key: None,
            max_attempts,
        })
        .await
        .expect("enqueue")
        .job_id
}

async fn state_of(ctx: &TestCtx, id: &str) -> Option<&'static str> {
    ctx.queue
        .status(id)
        .await
        .expect("status")
        .map(|s| s.state.as_str())
}

async fn release_held_calls(ctx: &TestCtx) {
    reqwest::Client::new()
        .post(format!("{}/_fake/release", ctx.vars["AIQ_OPENAI_BASE_URL"]))
        .send()
        .await
        .expect("releasing the held calls");
}

fn openai_calls(calls: &serde_json::Value) -> u64 {
    calls["openai"].as_u64().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_final_state_leaves_exactly_one_terminal_event_with_the_contracts_fields() {
    let ctx = TestCtx::new().await;
    let ok = enqueue_llm(&ctx, "caption a cat", Duration::ZERO, 3).await;
    // A 400 can never succeed: failed. A 503 on the one attempt allowed: dead.
    let failed = enqueue_llm(&ctx, "[fake:status=400] caption", Duration::ZERO, 3).await;
    let dead = enqueue_llm(&ctx, "[fake:status=503] caption", Duration::ZERO, 1).await;
    let cancelled = enqueue_llm(&ctx, "caption later", Duration::from_secs(3600), 3).await;
    assert_eq!(cancel(&ctx, &cancelled), "cancelled");
    let worker = ctx.start_worker();
    wait_until(Duration::from_secs(60), "all four jobs to end", || async {
        let mut ended = true;
        for id in [&ok, &failed, &dead, &cancelled] {
            ended &= matches!(state_of(&ctx, id).await, Some(s) if TERMINAL.contains(&s));
        }
        ended && ctx.queue.cancelled_count().await.unwrap() == 0
    })
    .await;
    worker.stop().await;

    let all = events(&ctx).await;
    for (id, want, attempts) in [
        (&ok, "succeeded", "0"),
        (&failed, "failed", "1"),
        (&dead, "dead", "1"),
        (&cancelled, "cancelled", "0"),
    ] {
        let evs = of_job(&all, id);
        let ends = terminal(&evs);
        assert_eq!(ends.len(), 1, "{id}: one terminal event, not {evs:?}");
        let e = ends[0];
        assert_eq!(e["type"], want, "{e:?}");
        assert_eq!(e["state"], want, "{e:?}");
        assert_eq!(e["org"], ORG_A);
        assert_eq!(e["tier"], "enterprise");
        assert_eq!(e["kind"], "llm.complete");
        assert_eq!(e["attempts"], attempts, "{e:?}");
        assert!(e["at"].parse::<i64>().unwrap() > 1_700_000_000_000, "{e:?}");
        let created: Vec<_> = evs.iter().filter(|e| e["type"] == "created").collect();
        assert_eq!(created.len(), 1, "{id}: {evs:?}");
        let started = evs.iter().filter(|e| e["type"] == "started").count();
        assert_eq!(started, usize::from(want != "cancelled"), "{id}: {evs:?}");
        if want == "failed" || want == "dead" {
            assert!(!e["error"].is_empty(), "{e:?}");
        }
        // The status says the same, from Redis and PostgreSQL.
        let s = show(&ctx, id);
        assert_eq!(s["state"], want, "{s}");
        assert_eq!(s["organization_id"], ORG_A);
        assert!(s["finished_at"].as_i64().is_some(), "{s}");
    }
    // The delayed job's created event says when it was due.
    let created = of_job(&all, &cancelled)[0];
    assert!(created["until"].parse::<i64>().unwrap() > created["at"].parse::<i64>().unwrap());

    // The succeeded event carries the result summary, the cost as the row holds it.
    let e = terminal(&of_job(&all, &ok))[0];
    let result: serde_json::Value = serde_json::from_str(&e["result"]).expect("result is JSON");
    let row_cost: String = sqlx::query_scalar(
        "SELECT api_cost_usd::text FROM ai_processing_results WHERE job_id = $1",
    )
    .bind(&ok)
    .fetch_one(ctx.store.pool())
    .await
    .unwrap();
    assert_eq!(result["provider"], "openai", "{result}");
    assert_eq!(result["model"], "gpt-4o-mini", "{result}");
    assert_eq!(result["cost_usd"], row_cost.as_str(), "{result}");
    assert!(result["input_tokens"].as_i64().unwrap() > 0, "{result}");
    assert!(result["output_tokens"].as_i64().unwrap() > 0, "{result}");
    assert!(result["units"].is_null(), "{result}");
    assert!(result["duration_ms"].as_i64().is_some(), "{result}");
    assert_eq!(show(&ctx, &ok)["result"], result);

    // Failed and dead jobs stay in the dead set, told apart by the hash's outcome.
    let mut redis = ctx.redis().await;
    for (id, outcome) in [(&failed, "failed"), (&dead, "dead")] {
        let got: Option<String> = redis
            .hget(ctx.key(&format!("job:{id}")), "outcome")
            .await
            .unwrap();
        assert_eq!(got.as_deref(), Some(outcome));
        let score: Option<f64> = redis.zscore(ctx.key("dead"), id).await.unwrap();
        assert!(score.is_some(), "{id} is in the dead set");
    }
    // The cancelled job's row: status cancelled, no cost.
    let (status, cost): (String, String) = sqlx::query_as(
        "SELECT status, api_cost_usd::text FROM ai_processing_results WHERE job_id = $1",
    )
    .bind(&cancelled)
    .fetch_one(ctx.store.pool())
    .await
    .unwrap();
    assert_eq!((status.as_str(), cost.as_str()), ("cancelled", "0.000000"));
    // Every event was counted.
    let counted: Option<u64> = redis.hget(ctx.key("counters"), "events").await.unwrap();
    assert_eq!(counted, Some(all.len() as u64));
}

/// A job that died after writing its failed row, retried from the dead set with `aiq dlq
/// retry`: it runs again (its old row does not bury it again), and its success replaces that
/// row. Before, the retried job went straight back to the dead set without a call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_job_retried_from_the_dead_set_runs_again_and_its_success_replaces_the_failed_row() {
    let ctx = TestCtx::new().await;
    // One attempt allowed, and the first call of this text answers 503: dead.
    let id = enqueue_llm(&ctx, "[fake:flaky=1] caption it again", Duration::ZERO, 1).await;
    let worker = ctx.start_worker();
    wait_until(Duration::from_secs(60), "the job to die", || async {
        state_of(&ctx, &id).await == Some("dead")
    })
    .await;
    let row = || async {
        sqlx::query_as::<_, (String, Option<String>)>(
            "SELECT status, model FROM ai_processing_results WHERE job_id = $1",
        )
        .bind(&id)
        .fetch_all(ctx.store.pool())
        .await
        .unwrap()
    };
    let before = row().await;
    assert_eq!(before.len(), 1, "{before:?}");
    assert_eq!(before[0].0, "failed", "the dead job's row: {before:?}");

    let (code, out, err) = aiq(&ctx, &["dlq", "retry", &id]);
    assert_eq!(code, 0, "aiq dlq retry: {err}");
    assert!(out.contains("1 dead jobs queued again"), "{out}");
    wait_until(
        Duration::from_secs(60),
        "the retried job to succeed",
        || async { state_of(&ctx, &id).await == Some("succeeded") },
    )
    .await;
    worker.stop().await;

    let after = row().await;
    assert_eq!(after.len(), 1, "still one row per job: {after:?}");
    assert_eq!(after[0].0, "completed", "{after:?}");
    assert_eq!(after[0].1.as_deref(), Some("gpt-4o-mini"), "{after:?}");
    let types: Vec<String> = of_job(&events(&ctx).await, &id)
        .iter()
        .map(|e| e["type"].clone())
        .filter(|t| t != "created" && t != "started")
        .collect();
    assert_eq!(types, ["dead", "retried", "succeeded"], "{types:?}");
    let calls = ctx.fake_calls().await;
    assert_eq!(openai_calls(&calls), 2, "one call per life: {calls}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_deferred_job_is_delayed_for_budget_until_the_windows_reset() {
    let ctx = TestCtx::new().await;
    // Both jobs have one estimate; the day limit holds one and a half. The first job's call
    // waits at the fake holding its estimate, so the second cannot reserve its own.
    let texts = ["[fake:hold] caption a", "[fake:hold] caption b"];
    let input_bound = texts[0].len() as u64 + "user".len() as u64 + 8;
    let estimate = PriceCatalog::builtin()
        .llm_estimate("openai", "gpt-4o-mini", input_bound, 50)
        .unwrap();
    let org = uuid::Uuid::parse_str(ORG_A).unwrap();
    ctx.store
        .set_org_limits(
            org,
            Some(MicroUsd::from_micros(estimate.micros() * 3 / 2)),
            None,
        )
        .await
        .unwrap();
    let ids = [
        enqueue_llm(&ctx, texts[0], Duration::ZERO, 3).await,
        enqueue_llm(&ctx, texts[1], Duration::ZERO, 3).await,
    ];
    let worker = ctx.start_worker();
    let deferred = crate::harness::wait_for(
        Duration::from_secs(60),
        "one job to be deferred for its budget",
        || async {
            let all = events(&ctx).await;
            all.into_iter()
                .map(|(_, f)| f)
                .find(|f| f["type"] == "deferred")
        },
    )
    .await;
    release_held_calls(&ctx).await;
    let (id, other) = if deferred["job_id"] == ids[0] {
        (&ids[0], &ids[1])
    } else {
        (&ids[1], &ids[0])
    };
    wait_until(
        Duration::from_secs(60),
        "the other job to succeed",
        || async { state_of(&ctx, other).await == Some("succeeded") },
    )
    .await;
    worker.stop().await;

    assert_eq!(deferred["reason"], "budget", "{deferred:?}");
    assert_eq!(deferred["state"], "delayed");
    assert_eq!(deferred["attempts"], "0");
    assert!(!deferred["message"].is_empty());
    // Due when the organisation's day window resets (UTC midnight, the default time zone), after
    // the reset margin and within its spread: never before.
    let until: i64 = deferred["until"].parse().unwrap();
    let at: i64 = deferred["at"].parse().unwrap();
    let day = 86_400_000;
    let reset = (at / day + 1) * day;
    assert!(
        (reset..reset + 15 * 60_000).contains(&until),
        "until {until}, reset {reset}"
    );
    let s = show(&ctx, id);
    assert_eq!(s["state"], "delayed", "{s}");
    assert_eq!(s["delay_reason"], "budget", "{s}");
    assert_eq!(s["due_at"].as_i64(), Some(until), "{s}");
    assert!(s["result"].is_null() && s["finished_at"].is_null(), "{s}");
    let fields: HashMap<String, String> = ctx
        .redis()
        .await
        .hgetall(ctx.key(&format!("job:{id}")))
        .await
        .unwrap();
    assert_eq!(fields["delay_reason"], "budget");
    assert_eq!(fields["due_at"], until.to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_waiting_or_delayed_job_never_runs_costs_nothing_and_has_one_cancelled_event() {
    let ctx = TestCtx::new().await;
    let first = enqueue_llm(&ctx, "caption one", Duration::ZERO, 3).await;
    let second = enqueue_llm(&ctx, "caption two", Duration::ZERO, 3).await;
    let delayed = enqueue_llm(&ctx, "caption three", Duration::from_secs(600), 3).await;
    let mut redis = ctx.redis().await;
    let list = ctx.key(&format!("wait:enterprise:{ORG_A}"));
    let (ring, heads) = (ctx.key("orgs:enterprise"), ctx.key("heads:enterprise"));
    let depth = || async {
        let d: Option<i64> = ctx
            .redis()
            .await
            .hget(ctx.key("depth"), "enterprise")
            .await
            .unwrap();
        d.unwrap_or(0)
    };

    // The head of the organisation's list leaves it; the next job becomes its head.
    assert_eq!(cancel(&ctx, &first), "cancelled");
    let left: Vec<String> = redis.lrange(&list, 0, -1).await.unwrap();
    assert_eq!(left, vec![second.clone()]);
    assert_eq!(depth().await, 1);
    let ready: i64 = redis
        .hget(ctx.key(&format!("job:{second}")), "ready_at")
        .await
        .unwrap();
    let head: Option<f64> = redis.zscore(&heads, ORG_A).await.unwrap();
    assert_eq!(head.map(|h| h as i64), Some(ready));
    // The last one takes the organisation out of its tier's ring and heads.
    assert_eq!(cancel(&ctx, &second), "cancelled");
    assert_eq!(depth().await, 0);
    assert_eq!(redis.llen::<_, i64>(&ring).await.unwrap(), 0);
    assert_eq!(redis.zcard::<_, i64>(&heads).await.unwrap(), 0);
    assert_eq!(cancel(&ctx, &delayed), "cancelled");
    assert_eq!(redis.zcard::<_, i64>(ctx.key("delayed")).await.unwrap(), 0);
    // A second cancel finds it finished.
    assert_eq!(cancel(&ctx, &delayed), "finished");

    // A job enqueued after them runs: the worker works, and the cancelled ones never run.
    let after = enqueue_llm(&ctx, "caption four", Duration::ZERO, 3).await;
    let worker = ctx.start_worker();
    wait_until(
        Duration::from_secs(60),
        "the rows of the cancelled jobs and the later job",
        || async {
            ctx.scalar_i64("SELECT count(*) FROM ai_processing_results")
                .await
                == 4
                && ctx.queue.cancelled_count().await.unwrap() == 0
        },
    )
    .await;
    worker.stop().await;
    assert_eq!(state_of(&ctx, &after).await, Some("succeeded"));
    assert_eq!(
        openai_calls(&ctx.fake_calls().await),
        1,
        "only the later job called"
    );
    let all = events(&ctx).await;
    for id in [&first, &second, &delayed] {
        let evs = of_job(&all, id);
        let types: Vec<&str> = evs.iter().map(|e| e["type"].as_str()).collect();
        assert_eq!(types, vec!["created", "cancelled"], "{id}");
        let (status, cost, calls): (String, String, i64) = sqlx::query_as(
            "SELECT status, api_cost_usd::text,
                (SELECT count(*) FROM ai_cost_tracking c WHERE c.job_id = r.job_id)
             FROM ai_processing_results r WHERE job_id = $1",
        )
        .bind(id)
        .fetch_one(ctx.store.pool())
        .await
        .unwrap();
        assert_eq!(
            (status.as_str(), cost.as_str(), calls),
            ("cancelled", "0.000000", 0)
        );
        // Drained: the hash is gone, the outcome and the row remain.
        let exists: bool = redis.exists(ctx.key(&format!("job:{id}"))).await.unwrap();
        assert!(!exists, "{id}'s hash is removed once its row is written");
        assert_eq!(show(&ctx, id)["state"], "cancelled");
    }
    let counted: Option<u64> = redis.hget(ctx.key("counters"), "cancelled").await.unwrap();
    assert_eq!(counted, Some(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_running_job_answers_running_and_the_job_finishes() {
    let ctx = TestCtx::new().await;
    let id = enqueue_llm(&ctx, "[fake:hold] caption", Duration::ZERO, 3).await;
    let worker = ctx.start_worker();
    wait_until(Duration::from_secs(30), "the call to start", || async {
        openai_calls(&ctx.fake_calls().await) == 1
    })
    .await;
    assert_eq!(cancel(&ctx, &id), "running");
    assert_eq!(show(&ctx, &id)["state"], "running");
    release_held_calls(&ctx).await;
    wait_until(Duration::from_secs(30), "the job to succeed", || async {
        state_of(&ctx, &id).await == Some("succeeded")
    })
    .await;
    worker.stop().await;
    let all = events(&ctx).await;
    let types: Vec<&str> = of_job(&all, &id)
        .iter()
        .map(|e| e["type"].as_str())
        .collect();
    assert_eq!(types, vec!["created", "started", "succeeded"]);
    let status: String =
        sqlx::query_scalar("SELECT status FROM ai_processing_results WHERE job_id = $1")
            .bind(&id)
            .fetch_one(ctx.store.pool())
            .await
            .unwrap();
    assert_eq!(status, "completed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_that_exists_nowhere_is_not_found_never_waiting() {
    let ctx = TestCtx::new().await;
    for args in [
        &["job", "show", "no-such-job"][..],
        &["job", "show", "no-such-job", "--json"],
        &["job", "cancel", "no-such-job"],
        &["job", "show", "j-1764626400123456-1"],
    ] {
        let (code, out, err) = aiq(&ctx, args);
        assert_eq!(code, 3, "aiq {args:?}: {out} {err}");
        assert!(err.contains("not found"), "aiq {args:?}: {err}");
        assert!(!out.contains("waiting"), "{out}");
    }
    assert_eq!(ctx.queue.status("no-such-job").await.unwrap(), None);
    // A refused id is an error naming the argument, not "not found".
    let (code, _, err) = aiq(&ctx, &["job", "cancel", "has space"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("job_id"), "{err}");
}

/// XREAD of up to 7 entries after the entry `from`, blocking up to a second: each entry's id
/// and its events.
async fn xread(
    conn: &mut redis::aio::MultiplexedConnection,
    key: &str,
    from: &str,
) -> Vec<(String, Vec<(String, Fields)>)> {
    let reply: Option<Vec<(String, Vec<RawEntry>)>> = redis::cmd("XREAD")
        .arg("COUNT")
        .arg(7)
        .arg("BLOCK")
        .arg(1000)
        .arg("STREAMS")
        .arg(key)
        .arg(from)
        .query_async(conn)
        .await
        .expect("XREAD");
    reply
        .into_iter()
        .flatten()
        .flat_map(|(_, entries)| entries)
        .map(|(id, kv)| {
            let events = read_entry(&id, kv);
            (id, events)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_stops_mid_run_and_resumes_from_its_last_id_sees_every_event_once() {
    let ctx = TestCtx::build(&[], FakeOptions::with_latency(Duration::from_millis(20))).await;
    let n = 40;
    let mut ids = Vec::new();
    for i in 0..n {
        ids.push(enqueue_llm(&ctx, &format!("caption {i:02}"), Duration::ZERO, 3).await);
    }
    let key = ctx.key("events");
    let worker = ctx.start_worker();
    let mut seen: Vec<(String, Fields)> = Vec::new();
    let mut last = "0".to_owned();
    // The first connection reads part of the run, then goes away.
    {
        let mut conn = ctx.redis().await;
        while seen.len() < n + 10 {
            for (entry, events) in xread(&mut conn, &key, &last).await {
                last = entry;
                seen.extend(events);
            }
        }
    }
    // Events keep coming while no one reads.
    let away = seen.len();
    wait_until(
        Duration::from_secs(60),
        "more events while away",
        || async {
            let written: Option<usize> = ctx
                .redis()
                .await
                .hget(ctx.key("counters"), "events")
                .await
                .unwrap();
            written.unwrap_or(0) >= away + 10
        },
    )
    .await;
    // A new connection resumes after the last id it saw, until every job has ended.
    let mut conn = ctx.redis().await;
    let ended = |seen: &[(String, Fields)]| {
        seen.iter()
            .filter(|(_, f)| f["type"] == "succeeded")
            .count()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while ended(&seen) < n {
        assert!(
            std::time::Instant::now() < deadline,
            "{} ended",
            ended(&seen)
        );
        for (entry, events) in xread(&mut conn, &key, &last).await {
            last = entry;
            seen.extend(events);
        }
    }
    worker.stop().await;
    let unique: HashSet<&String> = seen.iter().map(|(id, _)| id).collect();
    assert_eq!(unique.len(), seen.len(), "an event was read twice");
    // Exactly what the stream holds, in its order, up to the last one read.
    let stored: Vec<String> = events(&ctx)
        .await
        .into_iter()
        .map(|(id, _)| id)
        .take(seen.len())
        .collect();
    let read: Vec<String> = seen.iter().map(|(id, _)| id.clone()).collect();
    assert_eq!(read, stored);
    let mut per_job: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (_, f) in &seen {
        per_job
            .entry(f["job_id"].as_str())
            .or_default()
            .push(f["type"].as_str());
    }
    for id in &ids {
        assert_eq!(
            per_job.get(id.as_str()),
            Some(&vec!["created", "started", "succeeded"]),
            "{id}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_line_feed_written_into_a_job_hash_cannot_move_another_jobs_events() {
    // One script call's events share an entry, one line per event: a value an attacker wrote
    // with a line feed in it must stay in its own event.
    let ctx = TestCtx::new().await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(enqueue_llm(&ctx, &format!("caption {i}"), Duration::ZERO, 1).await);
    }
    let bad = ids[2].clone();
    let _: () = ctx
        .redis()
        .await
        .hset(
            ctx.key(&format!("job:{bad}")),
            "kind",
            "llm.complete\nsucceeded\nj-0",
        )
        .await
        .unwrap();
    ctx.run_until_settled().await;
    let all = events(&ctx).await;
    let started: Vec<&Fields> = all
        .iter()
        .map(|(_, f)| f)
        .filter(|f| f["type"] == "started")
        .collect();
    assert_eq!(started.len(), 5, "{all:?}");
    for f in &started {
        assert!(ids.contains(&f["job_id"]), "{f:?}");
        let want = if f["job_id"] == bad {
            "llm.complete succeeded j-0"
        } else {
            "llm.complete"
        };
        assert_eq!(f["kind"], want, "{f:?}");
    }
    // Every job still has its one terminal event, the bad one's included.
    let ends = terminal_events(&ctx).await;
    for id in &ids {
        assert_eq!(ends.get(id).map(Vec::len), Some(1), "{id}: {ends:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_events_off_no_event_is_written() {
    let ctx = TestCtx::with(&[("AIQ_EVENTS", "off")]).await;
    let worker = ctx.start_worker();
    // The daemon writes the scripts' settings at start; apps' enqueue.lua reads them.
    wait_until(Duration::from_secs(30), "the queue's settings", || async {
        let v: Option<String> = ctx
            .redis()
            .await
            .hget(ctx.key("config"), "events")
            .await
            .unwrap();
        v.as_deref() == Some("off")
    })
    .await;
    let ok = enqueue_llm(&ctx, "caption", Duration::ZERO, 3).await;
    let failed = enqueue_llm(&ctx, "[fake:status=400] caption", Duration::ZERO, 3).await;
    let cancelled = enqueue_llm(&ctx, "caption later", Duration::from_secs(600), 3).await;
    assert_eq!(cancel(&ctx, &cancelled), "cancelled");
    wait_until(Duration::from_secs(60), "the jobs to end", || async {
        state_of(&ctx, &ok).await == Some("succeeded")
            && state_of(&ctx, &failed).await == Some("failed")
            && ctx.queue.cancelled_count().await.unwrap() == 0
    })
    .await;
    worker.stop().await;
    let mut redis = ctx.redis().await;
    let exists: bool = redis.exists(ctx.key("events")).await.unwrap();
    assert!(!exists, "no events stream: {:?}", events(&ctx).await);
    let counted: Option<u64> = redis.hget(ctx.key("counters"), "events").await.unwrap();
    assert_eq!(counted, None);
    // Status still works without events.
    assert_eq!(show(&ctx, &ok)["state"], "succeeded");
    assert_eq!(show(&ctx, &cancelled)["state"], "cancelled");
}

/// The contract of cancel.lua's job id, from jobs/README.md: 1 to 128 bytes, no whitespace,
/// braces or control characters.
fn cancel_accepts(id: &[u8]) -> bool {
    (1..=128).contains(&id.len())
        && !id
            .iter()
            .any(|c| *c < 0x21 || *c == 0x7f || *c == b'{' || *c == b'}')
}

#[test]
fn cancel_lua_answers_not_found_or_refuses_generated_ids_and_changes_nothing() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let ctx = rt.block_on(TestCtx::new());
    // One real job, which no generated id names.
    rt.block_on(enqueue_llm(&ctx, "caption", Duration::from_secs(600), 3));
    let conn = rt.block_on(ctx.redis());
    let base = ctx.key("").trim_end_matches(':').to_owned();
    let pattern = format!("{base}*");
    let script = redis::Script::new(aiq::queue::events::CANCEL_LUA);
    let snapshot = redis::Script::new(SNAPSHOT);
    let ids = prop_oneof![
        3 => nasty(),
        1 => proptest::collection::vec(any::<u8>(), 0..200),
    ];
    let extra = proptest::collection::vec(nasty(), 0..2);
    let mut runner = TestRunner::new(Config {
        cases: 2_000,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&(ids, extra), |(id, extra)| {
        let mut conn = conn.clone();
        rt.block_on(async {
            let mut inv = script.key(&base);
            inv.arg(id.as_slice());
            for e in &extra {
                inv.arg(e.as_slice());
            }
            let (before, reply, after) =
                around::<String>(&mut conn, &snapshot, &pattern, &inv).await;
            let good = cancel_accepts(&id) && extra.is_empty();
            let shown = String::from_utf8_lossy(&id).escape_debug().to_string();
            match reply {
                Ok(r) => {
                    prop_assert!(good, "{shown:?} ({} extra) answered {r}", extra.len());
                    prop_assert_eq!(r.as_str(), "not_found", "{:?}", shown);
                }
                Err(e) => {
                    prop_assert!(
                        is_aiq_refusal(&e),
                        "not an ERR aiq: reply for {shown:?}: {e}"
                    );
                    prop_assert!(!good, "refused {shown:?}: {e}");
                }
            }
            prop_assert!(
                before == after,
                "cancel of {shown:?} changed {:?}",
                differing(&before, &after)
            );
            Ok(())
        })
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outcomes_are_trimmed_oldest_first_and_show_falls_back_to_postgresql() {
    let ctx = TestCtx::with(&[("AIQ_OUTCOMES_MAX_JOBS", "2")]).await;
    let mut ids = Vec::new();
    for i in 0..6 {
        ids.push(enqueue_llm(&ctx, &format!("caption {i}"), Duration::ZERO, 3).await);
    }
    ctx.run_until_settled().await;
    let mut redis = ctx.redis().await;
    let kept: Vec<String> = redis.zrange(ctx.key("outcomes"), 0, -1).await.unwrap();
    assert!(kept.len() <= 2, "{kept:?}");
    let mut from_pg = 0;
    for id in &ids {
        let hash: bool = redis
            .exists(ctx.key(&format!("outcome:{id}")))
            .await
            .unwrap();
        assert_eq!(
            hash,
            kept.contains(id),
            "{id}: its hash goes with its index entry"
        );
        // Forgotten by Redis, the job is still known: from its row, with its summary.
        let s = show(&ctx, id);
        assert_eq!(s["state"], "succeeded", "{s}");
        assert_eq!(s["result"]["provider"], "openai", "{s}");
        assert_eq!(s["organization_id"], ORG_A, "{s}");
        from_pg += usize::from(!hash);
    }
    assert!(from_pg >= 4, "{from_pg} of 6 read from PostgreSQL alone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_is_trimmed_to_about_its_length_and_every_event_is_counted() {
    let ctx = TestCtx::with(&[("AIQ_EVENTS_MAX_LEN", "1000")]).await;
    // The scripts follow the daemon's settings, enqueue.lua included.
    ctx.queue.write_config().await.unwrap();
    // Each job's `created` entry is its own (one enqueue.lua call each); the daemon's calls write
    // one entry for all of their events: more jobs than the bound, so that trimming happens.
    let n = 1200;
    let jobs: Vec<NewJob> = (0..n)
        .map(|i| NewJob {
            kind: JobKind::LlmComplete,
            tier: Tier::Trial,
            organization_id: OrganizationId::parse(ORG_A).unwrap(),
            payload: llm_payload(Tier::Trial, ORG_A, &format!("caption {i}")),
            job_id: None,
            delay: Duration::ZERO,
            idempotency_key: None,
            max_attempts: 3,
        })
        .collect();
    for r in ctx.queue.enqueue_batch(&jobs).await.unwrap() {
        r.unwrap();
    }
    ctx.run_until_settled().await;
    wait_until(Duration::from_secs(60), "every job to succeed", || async {
        ctx.completed().await == n as i64
    })
    .await;
    let mut redis = ctx.redis().await;
    let len: u64 = redis::cmd("XLEN")
        .arg(ctx.key("events"))
        .query_async(&mut redis)
        .await
        .unwrap();
    // Trimming with `~` drops whole nodes of the stream (at most 100 entries each).
    assert!(
        (1000..1500).contains(&len),
        "{len} entries for a bound of about 1000"
    );
    let counted: Option<u64> = redis.hget(ctx.key("counters"), "events").await.unwrap();
    assert_eq!(
        counted,
        Some(3 * n as u64),
        "created, started, succeeded per job"
    );
    // What is left is the newest: the last job's end is there.
    let all = events(&ctx).await;
    assert_eq!(
        all.last().map(|(_, f)| f["type"].as_str()),
        Some("succeeded")
    );
}

/// Entries of `{p}:cancelled` that name no cancelled job (written by hand, ids that are not
/// UTF-8, a job in another state) are dropped by the drain: they never hold up the jobs
/// cancelled after them, however many there are at the head.
#[tokio::test]
async fn entries_of_the_cancelled_list_that_name_no_cancelled_job_never_hold_up_the_real_ones() {
    let ctx = TestCtx::new().await;
    let waiting = enqueue_llm(&ctx, "still waiting", Duration::from_secs(600), 3).await;
    let real = enqueue_llm(&ctx, "cancel me", Duration::from_secs(600), 3).await;
    let mut redis = ctx.redis().await;
    let mut junk = redis::pipe();
    for i in 0..250 {
        junk.zadd(ctx.key("cancelled"), format!("ghost-{i}"), 1);
    }
    junk.zadd(ctx.key("cancelled"), &b"\xff\xfe"[..], 2)
        .zadd(ctx.key("cancelled"), &waiting, 3);
    let () = junk.query_async(&mut redis).await.unwrap();
    assert_eq!(cancel(&ctx, &real), "cancelled");
    let worker = ctx.start_worker();
    wait_until(
        Duration::from_secs(60),
        "the cancelled job's row, past 252 entries that name no cancelled job",
        || async {
            ctx.scalar_i64("SELECT count(*) FROM ai_processing_results WHERE status = 'cancelled'")
                .await
                == 1
                && ctx.queue.cancelled_count().await.unwrap() == 0
        },
    )
    .await;
    worker.stop().await;
    let (id,): (String,) = sqlx::query_as("SELECT job_id FROM ai_processing_results")
        .fetch_one(ctx.store.pool())
        .await
        .unwrap();
    assert_eq!(id, real);
    // The waiting job named by hand is untouched: still delayed, no row.
    assert_eq!(state_of(&ctx, &waiting).await, Some("delayed"));
}
