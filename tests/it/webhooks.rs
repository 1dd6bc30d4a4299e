//! Signed webhooks from the outbox, against real PostgreSQL and Redis, a running aiq and a
//! receiver on 127.0.0.1 that records what it gets and answers as each test scripts it. The
//! signatures are checked with an HMAC of the test's own (the `hmac` and `sha2` crates, not the
//! daemon's aws-lc-rs).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aiq::domain::{JobKind, Tier};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, KeyInit, Mac};
use serde_json::Value;

use crate::harness::{ORG_A, TestCtx, llm_payload, signal_and_wait, wait_until};

/// The callback secret the tests configure (24 bytes of key).
const CALLBACK_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Got {
    id: String,
    timestamp: String,
    signature: String,
    content_type: String,
    body: String,
}

/// How the receiver answers a request.
#[derive(Debug, Clone, Copy)]
enum Reply {
    Status(u16),
    /// Never answers (the sender's timeout or death ends the request).
    Hold,
}

#[derive(Default)]
struct Receiver {
    got: Mutex<Vec<Got>>,
    /// Answers for the next requests, in order; 200 after them.
    script: Mutex<VecDeque<Reply>>,
}

impl Receiver {
    fn got(&self) -> Vec<Got> {
        self.got.lock().unwrap().clone()
    }
}

/// Starts a receiver on 127.0.0.1; returns it and its port.
async fn receiver(script: &[Reply]) -> (Arc<Receiver>, u16) {
    let r = Arc::new(Receiver {
        got: Mutex::default(),
        script: Mutex::new(script.iter().copied().collect()),
    });
    let state = r.clone();
    let app = axum::Router::new().fallback(
        move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
            let r = state.clone();
            async move {
                let h = |name: &str| {
                    headers
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_owned()
                };
                r.got.lock().unwrap().push(Got {
                    id: h("webhook-id"),
                    timestamp: h("webhook-timestamp"),
                    signature: h("webhook-signature"),
                    content_type: h("content-type"),
                    body: String::from_utf8_lossy(&body).into_owned(),
                });
                let reply = r.script.lock().unwrap().pop_front();
                match reply {
                    Some(Reply::Hold) => std::future::pending::<axum::http::StatusCode>().await,
                    Some(Reply::Status(s)) => axum::http::StatusCode::from_u16(s).unwrap(),
                    None => axum::http::StatusCode::OK,
                }
            }
        },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (r, port)
}

/// The Standard Webhooks signature of a request, computed here.
fn expected_signature(secret: &str, got: &Got) -> String {
    let key = STANDARD
        .decode(secret.strip_prefix("whsec_").expect("a whsec_ secret"))
        .unwrap();
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("{}.{}.{}", got.id, got.timestamp, got.body).as_bytes());
    format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
}

/// Checks a request's headers as a receiver following the scheme would: an id, a timestamp
/// within five minutes, JSON, and a signature by each of `secrets` (in that order).
fn verify(got: &Got, secrets: &[&str]) {
    assert!(got.id.starts_with("msg_"), "{got:?}");
    assert_eq!(got.content_type, "application/json");
    let ts: i64 = got
        .timestamp
        .parse()
        .expect("webhook-timestamp is whole seconds");
    assert!((chrono::Utc::now().timestamp() - ts).abs() < 300, "{got:?}");
    let sent: Vec<&str> = got.signature.split(' ').collect();
    let wanted: Vec<String> = secrets.iter().map(|s| expected_signature(s, got)).collect();
    assert_eq!(sent, wanted, "the signatures of {got:?}");
}

async fn ctx_allowing_the_receiver(extra: &[(&str, &str)]) -> TestCtx {
    let mut o = vec![
        ("AIQ_WEBHOOK_ALLOW_NETS", "127.0.0.1/32"),
        ("AIQ_WEBHOOK_RETRY_BASE_MS", "20"),
        ("AIQ_WEBHOOK_CALLBACK_SECRET", CALLBACK_SECRET),
    ];
    o.extend_from_slice(extra);
    TestCtx::with(&o).await
}

const ENDPOINT_SECRET: &str = "whsec_dGhpcnR5LXR3by1ieXRlcy1vZi1hLXRlc3Qta2V5IQ==";

/// A test whose organisation A has one endpoint (a receiver answering with its default) signed
/// with `secret`.
async fn with_an_endpoint(secret: &str) -> (TestCtx, Arc<Receiver>, u16) {
    let ctx = ctx_allowing_the_receiver(&[]).await;
    let (r, port) = receiver(&[]).await;
    let org = uuid::Uuid::parse_str(ORG_A).unwrap();
    ctx.store
        .add_webhook_endpoint(org, &format!("http://127.0.0.1:{port}/hooks"), secret)
        .await
        .unwrap();
    (ctx, r, port)
}

async fn enqueue_llm(ctx: &TestCtx, text: &str, max_attempts: u32) -> String {
    let payload = llm_payload(Tier::GrowthTeam, ORG_A, text);
    ctx.enqueue(
        JobKind::LlmComplete,
        Tier::GrowthTeam,
        ORG_A,
        &payload,
        max_attempts,
    )
    .await
}

async fn enqueue_with_callback(ctx: &TestCtx, url: &str) -> String {
    let mut p: Value = serde_json::from_str(&llm_payload(Tier::GrowthTeam, ORG_A, "cb")).unwrap();
    p["callback_url"] = url.into();
    ctx.enqueue(
        JobKind::LlmComplete,
        Tier::GrowthTeam,
        ORG_A,
        &p.to_string(),
        1,
    )
    .await
}

async fn undelivered(ctx: &TestCtx) -> i64 {
    ctx.scalar_i64("SELECT count(*) FROM webhook_outbox WHERE delivered_at IS NULL")
        .await
}

async fn wait_delivered(ctx: &TestCtx, messages: i64) {
    wait_until(
        Duration::from_secs(60),
        "every webhook to be delivered",
        || async {
            ctx.scalar_i64("SELECT count(*) FROM webhook_outbox").await == messages
                && undelivered(ctx).await == 0
        },
    )
    .await;
}

fn body_of(got: &Got) -> Value {
    serde_json::from_str(&got.body).expect("a JSON body")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_succeeded_and_a_failed_job_each_produce_exactly_one_delivery_whose_signature_verifies() {
    let (ctx, r, _port) = with_an_endpoint(ENDPOINT_SECRET).await;
    let secret = ENDPOINT_SECRET;
    let ok = enqueue_llm(&ctx, "a caption please", 3).await;
    let bad = enqueue_llm(&ctx, "refused [fake:status=400]", 3).await;
    let worker = ctx.start_worker();
    ctx.wait_settled(Duration::from_secs(60)).await;
    wait_delivered(&ctx, 2).await;
    worker.stop().await;

    let got = r.got();
    assert_eq!(got.len(), 2, "one delivery per job: {got:?}");
    for g in &got {
        verify(g, &[secret]);
    }
    let of = |job: &str| {
        got.iter()
            .find(|g| body_of(g)["data"]["job_id"] == job)
            .unwrap_or_else(|| panic!("no delivery for {job}: {got:?}"))
    };
    let s = body_of(of(&ok));
    assert_eq!(s["type"], "job.succeeded");
    assert!(chrono::DateTime::parse_from_rfc3339(s["timestamp"].as_str().unwrap()).is_ok());
    let d = &s["data"];
    assert_eq!(d["organization_id"], ORG_A);
    assert_eq!(d["tier"], "growth_team");
    assert_eq!(d["kind"], "llm.complete");
    assert_eq!(d["state"], "succeeded");
    assert_eq!(d["attempts"], 1);
    assert_eq!(d["error"], Value::Null);
    assert_eq!(d["result"]["provider"], "openai");
    assert_eq!(d["result"]["model"], "gpt-4o-mini");
    assert!(d["result"]["input_tokens"].as_i64().unwrap() > 0);
    let cost: String = sqlx::query_scalar(
        "SELECT api_cost_usd::text FROM ai_processing_results WHERE job_id = $1",
    )
    .bind(&ok)
    .fetch_one(ctx.store.pool())
    .await
    .unwrap();
    assert_eq!(d["result"]["cost_usd"], cost.as_str(), "the row's cost");

    let f = body_of(of(&bad));
    assert_eq!(f["type"], "job.failed");
    assert_eq!(f["data"]["state"], "failed");
    assert!(
        f["data"]["error"]
            .as_str()
            .unwrap()
            .contains("invalid_request"),
        "{f}"
    );
    assert_eq!(f["data"]["result"], Value::Null);
    assert_ne!(got[0].id, got[1].id, "one webhook-id per message");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_attempts_ran_out_is_delivered_as_dead() {
    let ctx = ctx_allowing_the_receiver(&[]).await;
    let (r, port) = receiver(&[]).await;
    let secret = "whsec_dGhpcnR5LXR3by1ieXRlcy1vZi1hLXRlc3Qta2V5IQ==";
    let org = uuid::Uuid::parse_str(ORG_A).unwrap();
    ctx.store
        .add_webhook_endpoint(org, &format!("http://127.0.0.1:{port}/"), secret)
        .await
        .unwrap();
    let job = enqueue_llm(&ctx, "down [fake:status=503]", 1).await;
    let worker = ctx.start_worker();
    ctx.wait_settled(Duration::from_secs(60)).await;
    wait_delivered(&ctx, 1).await;
    worker.stop().await;
    let got = r.got();
    assert_eq!(got.len(), 1, "{got:?}");
    verify(&got[0], &[secret]);
    let b = body_of(&got[0]);
    assert_eq!(b["type"], "job.dead");
    assert_eq!(b["data"]["job_id"], job.as_str());
    assert_eq!(b["data"]["state"], "dead");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_answering_500_twice_gets_the_same_event_a_third_time() {
    let ctx = ctx_allowing_the_receiver(&[]).await;
    let (r, port) = receiver(&[Reply::Status(500), Reply::Status(500)]).await;
    let secret = "whsec_dGhpcnR5LXR3by1ieXRlcy1vZi1hLXRlc3Qta2V5IQ==";
    let org = uuid::Uuid::parse_str(ORG_A).unwrap();
    let endpoint = ctx
        .store
        .add_webhook_endpoint(org, &format!("http://127.0.0.1:{port}/"), secret)
        .await
        .unwrap();
    enqueue_llm(&ctx, "retry me", 3).await;
    let worker = ctx.start_worker();
    wait_delivered(&ctx, 1).await;
    worker.stop().await;

    let got = r.got();
    assert_eq!(got.len(), 3, "two failures, then the delivery: {got:?}");
    for g in &got {
        verify(g, &[secret]);
        assert_eq!(g.id, got[0].id, "the same webhook-id every time");
        assert_eq!(g.body, got[0].body, "the same body every time");
    }
    let (attempts, status): (i32, i32) =
        sqlx::query_as("SELECT attempts, last_status FROM webhook_outbox")
            .fetch_one(ctx.store.pool())
            .await
            .unwrap();
    assert_eq!((attempts, status), (3, 200));
    // The success cleared the endpoint's failing state.
    let listed = ctx
        .store
        .webhook_endpoints(Some(org), Duration::from_secs(3600))
        .await
        .unwrap();
    let e = listed.iter().find(|e| e.id == endpoint).unwrap();
    assert!(
        e.failing_since.is_none() && e.last_error.is_none() && e.pending == 0,
        "{e:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_failing_longer_than_the_setting_is_listed_failing_and_given_up_after_the_retry_time()
 {
    let ctx = ctx_allowing_the_receiver(&[("AIQ_WEBHOOK_RETRY_FOR_S", "1")]).await;
    let (r, port) = receiver(&[Reply::Status(503); 1000]).await;
    let org = uuid::Uuid::parse_str(ORG_A).unwrap();
    ctx.store
        .add_webhook_endpoint(org, &format!("http://127.0.0.1:{port}/"), CALLBACK_SECRET)
        .await
        .unwrap();
    enqueue_llm(&ctx, "nobody takes it", 3).await;
    let worker = ctx.start_worker();
    wait_until(
        Duration::from_secs(60),
        "the message to be given up",
        || async {
            ctx.scalar_i64("SELECT count(*) FROM webhook_outbox WHERE given_up_at IS NOT NULL")
                .await
                == 1
        },
    )
    .await;
    worker.stop().await;
    let tries = r.got().len();
    assert!(tries >= 2, "tried again before giving up: {tries}");
    let attempts = ctx
        .scalar_i64("SELECT attempts::bigint FROM webhook_outbox")
        .await;
    assert_eq!(attempts, tries as i64);
    // Failing since its first failure; with a threshold of 0 s it shows as failing.
    let listed = ctx
        .store
        .webhook_endpoints(Some(org), Duration::ZERO)
        .await
        .unwrap();
    assert!(listed[0].failing, "{listed:?}");
    assert!(
        listed[0]
            .last_error
            .as_deref()
            .unwrap()
            .contains("HTTP 503"),
        "{listed:?}"
    );
    assert_eq!(listed[0].pending, 0, "given up is not pending");
    let not_yet = ctx
        .store
        .webhook_endpoints(Some(org), Duration::from_secs(3600))
        .await
        .unwrap();
    assert!(
        !not_yet[0].failing,
        "failing for less than an hour: not marked yet"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_after_the_result_row_and_before_the_delivery_still_delivers_with_the_same_webhook_id()
 {
    let ctx = ctx_allowing_the_receiver(&[("AIQ_WEBHOOK_TIMEOUT_MS", "2000")]).await;
    // The first request is held: the process that sent it is killed while it waits.
    let (r, port) = receiver(&[Reply::Hold]).await;
    let org = uuid::Uuid::parse_str(ORG_A).unwrap();
    ctx.store
        .add_webhook_endpoint(org, &format!("http://127.0.0.1:{port}/"), CALLBACK_SECRET)
        .await
        .unwrap();
    let job = enqueue_llm(&ctx, "survive a kill", 3).await;
    let a = ctx.spawn_daemon(&[]);
    wait_until(
        Duration::from_secs(60),
        "the first delivery to reach the receiver",
        || async { !r.got().is_empty() },
    )
    .await;
    let rows = ctx
        .scalar_i64(&format!(
            "SELECT count(*) FROM ai_processing_results WHERE job_id = '{job}'"
        ))
        .await;
    assert_eq!(rows, 1, "the result row was written before the delivery");
    assert_eq!(undelivered(&ctx).await, 1);
    assert!(!signal_and_wait(a, libc::SIGKILL).await.success());

    let admin = format!("127.0.0.1:{}", aiq_testkit::localsvc::free_port().unwrap());
    let b = ctx.spawn_daemon(&[("AIQ_ADMIN_ADDR", &admin)]);
    wait_delivered(&ctx, 1).await;
    // The second process counts the delivery it made, and no endpoint is failing.
    let metrics = reqwest::get(format!("http://{admin}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let line = |name: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no {name} in /metrics"))
            .to_owned()
    };
    assert!(
        line("aiq_webhook_deliveries_total{outcome=\"delivered\"}").ends_with(" 1"),
        "{metrics}"
    );
    assert!(
        line("aiq_webhook_endpoints_failing").ends_with(" 0"),
        "{metrics}"
    );
    assert!(signal_and_wait(b, libc::SIGTERM).await.success());
    let got = r.got();
    assert!(got.len() >= 2, "{got:?}");
    for g in &got {
        verify(g, &[CALLBACK_SECRET]);
        assert_eq!(g.id, got[0].id, "the same webhook-id after the kill");
        assert_eq!(g.body, got[0].body);
    }
    assert_eq!(body_of(&got[0])["data"]["job_id"], job.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_endpoint_sends_two_signatures_and_each_verifies() {
    let ctx = ctx_allowing_the_receiver(&[]).await;
    let (r, port) = receiver(&[]).await;
    let old = "whsec_dGhpcnR5LXR3by1ieXRlcy1vZi1hLXRlc3Qta2V5IQ==";
    let new = aiq::webhooks::sign::generate().unwrap();
    let org = uuid::Uuid::parse_str(ORG_A).unwrap();
    let endpoint = ctx
        .store
        .add_webhook_endpoint(org, &format!("http://127.0.0.1:{port}/"), old)
        .await
        .unwrap();
    assert!(
        ctx.store
            .rotate_webhook_secret(endpoint, &new)
            .await
            .unwrap()
    );
    enqueue_llm(&ctx, "rotate", 3).await;
    let worker = ctx.start_worker();
    wait_delivered(&ctx, 1).await;
    worker.stop().await;
    let got = r.got();
    assert_eq!(got.len(), 1);
    // Newest first: a receiver holding either secret verifies one of them.
    verify(&got[0], &[&new, old]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_url_gets_the_final_event_signed_with_the_callback_secret() {
    let ctx = ctx_allowing_the_receiver(&[]).await;
    let (r, port) = receiver(&[]).await;
    let job = enqueue_with_callback(&ctx, &format!("http://127.0.0.1:{port}/cb?job=1")).await;
    let worker = ctx.start_worker();
    ctx.wait_settled(Duration::from_secs(60)).await;
    wait_delivered(&ctx, 1).await;
    worker.stop().await;
    let got = r.got();
    assert_eq!(got.len(), 1, "{got:?}");
    verify(&got[0], &[CALLBACK_SECRET]);
    assert_eq!(body_of(&got[0])["data"]["job_id"], job.as_str());
    assert_eq!(body_of(&got[0])["type"], "job.succeeded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_url_of_a_private_address_or_a_name_resolving_to_one_is_refused_without_an_allow_list()
 {
    let ctx = TestCtx::with(&[
        ("AIQ_WEBHOOK_RETRY_BASE_MS", "20"),
        ("AIQ_WEBHOOK_CALLBACK_SECRET", CALLBACK_SECRET),
    ])
    .await;
    let (r, port) = receiver(&[]).await;
    let literal = [
        format!("http://127.0.0.1:{port}/"),
        "http://10.0.0.1/hook".to_owned(),
        "http://169.254.169.254/latest/meta-data/".to_owned(),
        "http://[::ffff:127.0.0.1]/".to_owned(),
    ];
    let mut refused = Vec::new();
    for url in &literal {
        refused.push(enqueue_with_callback(&ctx, url).await);
    }
    // A name: decoded, run, and refused when it resolves to loopback.
    let named = enqueue_with_callback(&ctx, &format!("http://localhost:{port}/")).await;
    let worker = ctx.start_worker();
    ctx.wait_settled(Duration::from_secs(60)).await;
    wait_until(
        Duration::from_secs(60),
        "the named callback to be tried",
        || async {
            ctx.scalar_i64("SELECT count(*) FROM webhook_outbox WHERE attempts > 0")
                .await
                == 1
        },
    )
    .await;
    worker.stop().await;

    for job in &refused {
        let error: String = sqlx::query_scalar(
            "SELECT error_message FROM ai_processing_errors WHERE job_id = $1 AND error_type = 'invalid_payload'",
        )
        .bind(job)
        .fetch_one(ctx.store.pool())
        .await
        .unwrap();
        assert!(error.contains("callback_url"), "{error}");
    }
    assert_eq!(
        ctx.fake_calls().await["jobs"],
        1,
        "only the named job reached a provider"
    );
    let (job, target, error): (String, String, String) =
        sqlx::query_as("SELECT job_id, target, last_error FROM webhook_outbox")
            .fetch_one(ctx.store.pool())
            .await
            .unwrap();
    assert_eq!(
        (job.as_str(), target.as_str()),
        (named.as_str(), "callback")
    );
    assert!(error.contains("no address webhooks may go to"), "{error}");
    assert!(
        r.got().is_empty(),
        "nothing reached the receiver: {:?}",
        r.got()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_final_result_adds_no_second_message() {
    let ctx = ctx_allowing_the_receiver(&[]).await;
    let org = uuid::Uuid::parse_str(ORG_A).unwrap();
    for url in ["http://127.0.0.1:9/a", "http://127.0.0.1:9/b"] {
        ctx.store
            .add_webhook_endpoint(org, url, CALLBACK_SECRET)
            .await
            .unwrap();
    }
    let job = aiq::store::JobRef {
        job_id: "j-replayed".into(),
        kind: "llm.complete".into(),
        tier: Some("trial".into()),
        organization_id: Some(org),
        subject_id: None,
        subject_type: None,
        correlation_id: None,
        attempt: 1,
        execution: 1,
        callback_url: Some("http://127.0.0.1:9/cb".into()),
    };
    let err = aiq::store::ErrorRecord {
        error_type: aiq::store::ErrorType::InvalidPayload,
        message: "no".into(),
        details: serde_json::json!({}),
        provider: None,
        http_status: None,
        call_seq: 0,
    };
    let result = aiq::store::ResultRecord {
        provider: "none".into(),
        model: None,
        raw_response: serde_json::json!({}),
        confidence_scores: serde_json::json!({}),
        processing_ms: 0,
        cost: aiq::domain::MicroUsd::ZERO,
        completed: false,
        error_message: Some("no".into()),
    };
    let write = || async {
        ctx.store
            .record_failure(
                &job,
                &err,
                None,
                Some((&result, aiq::store::Ending::Failed)),
            )
            .await
            .unwrap()
    };
    write().await;
    // An endpoint added before the replay gets nothing either: the job's messages were written
    // with its row.
    ctx.store
        .add_webhook_endpoint(org, "http://127.0.0.1:9/c", CALLBACK_SECRET)
        .await
        .unwrap();
    write().await;
    let targets = ctx
        .scalar_i64("SELECT count(DISTINCT target) FROM webhook_outbox WHERE job_id = 'j-replayed'")
        .await;
    let rows = ctx.scalar_i64("SELECT count(*) FROM webhook_outbox").await;
    assert_eq!(
        (rows, targets),
        (3, 3),
        "two endpoints and the callback, once each"
    );
}

/// Runs `aiq webhooks ARGS` with the test's settings; returns (success, stdout, stderr).
fn cli(ctx: &TestCtx, args: &[&str]) -> (bool, String, String) {
    let out = crate::harness::aiq_command()
        .envs(&ctx.vars)
        .arg("webhooks")
        .args(args)
        .output()
        .expect("running aiq webhooks");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aiq_webhooks_adds_lists_tests_rotates_and_removes_an_endpoint() {
    let ctx = ctx_allowing_the_receiver(&[]).await;
    let (r, port) = receiver(&[Reply::Status(204)]).await;
    let url = format!("http://127.0.0.1:{port}/hooks");

    let (ok, out, err) = cli(&ctx, &["add", "--org", ORG_A, "--url", &url]);
    assert!(ok, "{err}");
    let field = |out: &str, name: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} in {out}"))
            .to_owned()
    };
    let id = field(&out, "endpoint");
    let secret = field(&out, "secret");
    assert!(secret.starts_with("whsec_"), "{out}");

    let (ok, out, err) = cli(&ctx, &["test", &id]);
    assert!(ok, "{err}");
    assert!(out.starts_with("HTTP 204"), "{out}");
    let got = r.got();
    assert_eq!(got.len(), 1);
    verify(&got[0], &[&secret]);
    assert_eq!(body_of(&got[0])["type"], "webhook.test");

    let (ok, out, err) = cli(&ctx, &["rotate", &id]);
    assert!(ok, "{err}");
    let newer = field(&out, "secret");
    assert_ne!(newer, secret);
    let (ok, _, err) = cli(&ctx, &["test", &id]);
    assert!(ok, "{err}");
    verify(&r.got()[1], &[&newer, &secret]);

    let (ok, out, err) = cli(&ctx, &["list", "--org", ORG_A, "--json"]);
    assert!(ok, "{err}");
    let listed: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(listed["id"], id.as_str());
    assert_eq!(listed["secrets"], 2);
    assert_eq!(listed["failing"], false);
    assert!(!out.contains("whsec_"), "list never prints secrets: {out}");
    let (ok, out, _) = cli(&ctx, &["list"]);
    assert!(ok && out.contains(&id) && out.contains(" ok "), "{out}");

    // Refused: a private address without an allow-list, and a secret that is not one.
    let plain = TestCtx::new().await;
    let (ok, _, err) = cli(
        &plain,
        &["add", "--org", ORG_A, "--url", "http://169.254.169.254/"],
    );
    assert!(!ok && err.contains("169.254.169.254"), "{err}");
    let (ok, _, err) = cli(
        &ctx,
        &["add", "--org", ORG_A, "--url", &url, "--secret", "nope"],
    );
    assert!(!ok && err.contains("whsec_"), "{err}");

    let (ok, _, err) = cli(&ctx, &["rm", &id]);
    assert!(ok, "{err}");
    let (ok, out, _) = cli(&ctx, &["list"]);
    assert!(ok && out.contains("no endpoints"), "{out}");
    let (ok, _, err) = cli(&ctx, &["rm", &id]);
    assert!(!ok && err.contains("no endpoint"), "{err}");
}

/// Writes `n` succeeded jobs' rows of ORG_A through the group-commit writer, all at once;
/// returns the time taken.
async fn write_succeeded(store: &aiq::store::Store, n: usize, tag: &str) -> Duration {
    let org = uuid::Uuid::parse_str(ORG_A).unwrap();
    let started = std::time::Instant::now();
    let writes = (0..n).map(|i| {
        let store = store.clone();
        let job = aiq::store::JobRef {
            job_id: format!("j-{tag}-{i}"),
            kind: "llm.complete".into(),
            tier: Some("trial".into()),
            organization_id: Some(org),
            subject_id: None,
            subject_type: None,
            correlation_id: None,
            attempt: 1,
            execution: 1,
            callback_url: None,
        };
        async move {
            let call = aiq::store::CallRecord {
                provider: "openai".into(),
                operation: "chat".into(),
                model: Some("gpt-4o-mini".into()),
                call_seq: 0,
                billing_date: chrono::Utc::now().date_naive(),
                estimate: None,
                units: None,
                input_tokens: Some(10),
                cached_tokens: Some(0),
                output_tokens: Some(20),
                cost: aiq::domain::MicroUsd::from_micros(42),
                status: aiq::store::CallStatus::Succeeded,
                price_version: "test".into(),
                metadata: serde_json::json!({}),
            };
            let result = aiq::store::ResultRecord {
                provider: "openai".into(),
                model: Some("gpt-4o-mini".into()),
                raw_response: serde_json::json!({"ok": true}),
                confidence_scores: serde_json::json!({}),
                processing_ms: 5,
                cost: aiq::domain::MicroUsd::from_micros(42),
                completed: true,
                error_message: None,
            };
            store.record_success(&job, call, result).await.unwrap();
        }
    });
    futures::future::join_all(writes).await;
    started.elapsed()
}

/// A figure, printed: the group commit's time for succeeded jobs without any endpoint (no
/// outbox query) and with one endpoint for their organisation (one more multi-row insert per
/// batch). The counts are asserted; the times are not (the machine is shared).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_group_commit_writes_one_message_per_job_with_an_endpoint_and_none_without() {
    const N: usize = 1000;
    let ctx = ctx_allowing_the_receiver(&[]).await;
    let store = ctx.store.clone().batched();
    // Warm: the pool's connections and PostgreSQL's caches.
    write_succeeded(&store, 200, "warm").await;
    let without = write_succeeded(&store, N, "plain").await;
    assert_eq!(
        ctx.scalar_i64("SELECT count(*) FROM webhook_outbox").await,
        0
    );
    let org = uuid::Uuid::parse_str(ORG_A).unwrap();
    ctx.store
        .add_webhook_endpoint(org, "http://127.0.0.1:9/", CALLBACK_SECRET)
        .await
        .unwrap();
    let with = write_succeeded(&store, N, "hooked").await;
    assert_eq!(
        ctx.scalar_i64("SELECT count(*) FROM webhook_outbox WHERE job_id LIKE 'j-hooked-%'")
            .await,
        N as i64
    );
    assert_eq!(
        ctx.scalar_i64("SELECT count(*) FROM ai_processing_results")
            .await,
        2 * N as i64 + 200
    );
    println!(
        "group commit, {N} succeeded jobs: {:.0} jobs/s without endpoints, {:.0} jobs/s with one endpoint",
        N as f64 / without.as_secs_f64(),
        N as f64 / with.as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_messages_older_than_a_week_are_pruned_and_pending_ones_are_kept() {
    let ctx = ctx_allowing_the_receiver(&[]).await;
    let (_r, port) = receiver(&[]).await;
    let org = uuid::Uuid::parse_str(ORG_A).unwrap();
    ctx.store
        .add_webhook_endpoint(org, &format!("http://127.0.0.1:{port}/"), CALLBACK_SECRET)
        .await
        .unwrap();
    for i in 0..3 {
        enqueue_llm(&ctx, &format!("prune {i}"), 3).await;
    }
    let worker = ctx.start_worker();
    wait_delivered(&ctx, 3).await;
    worker.stop().await;
    // Two delivered messages are old; one of them is made pending again (it must stay).
    let pool = ctx.store.pool();
    sqlx::query(
        "UPDATE webhook_outbox SET created_at = now() - interval '8 days'
         WHERE id IN (SELECT id FROM webhook_outbox ORDER BY id LIMIT 2)",
    )
    .execute(pool)
    .await
    .unwrap();
    sqlx::query(
        "UPDATE webhook_outbox SET delivered_at = NULL, next_attempt_at = now() + interval '1 day'
         WHERE id = (SELECT id FROM webhook_outbox ORDER BY id LIMIT 1)",
    )
    .execute(pool)
    .await
    .unwrap();
    let pruned = ctx
        .store
        .prune_webhooks(aiq::webhooks::KEEP_FINISHED, 1000)
        .await
        .unwrap();
    assert_eq!(pruned, 1, "the old delivered message only");
    assert_eq!(
        ctx.scalar_i64("SELECT count(*) FROM webhook_outbox").await,
        2
    );
    assert_eq!(undelivered(&ctx).await, 1, "the pending one stays");
}

/// The hook for writers of final rows in transactions of their own (the cancellation's): a
/// `job.cancelled` event of an organisation with an endpoint is one message, one of an
/// organisation without any is none, and the transaction's rollback takes it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_event_written_in_a_callers_transaction_reaches_the_outbox_only_with_it() {
    use aiq::store::webhooks::enqueue_with_receivers_in;
    let ctx = ctx_allowing_the_receiver(&[]).await;
    let org = uuid::Uuid::parse_str(ORG_A).unwrap();
    ctx.store
        .add_webhook_endpoint(org, "http://127.0.0.1:9/", CALLBACK_SECRET)
        .await
        .unwrap();
    let job = |id: &str, org: &str| aiq::store::JobRef {
        job_id: id.into(),
        kind: "vision.annotate".into(),
        tier: Some("trial".into()),
        organization_id: Some(uuid::Uuid::parse_str(org).unwrap()),
        subject_id: None,
        subject_type: None,
        correlation_id: None,
        attempt: 0,
        execution: 0,
        callback_url: None,
    };
    let cancelled = |id: &str, org: &str| {
        aiq::store::JobEvent::new(&job(id, org), aiq::store::Ending::Cancelled, None, None).unwrap()
    };
    let orgs = ctx.store.webhook_receivers().await;
    let mut tx = ctx.store.pool().begin().await.unwrap();
    let events = vec![
        cancelled("j-c1", ORG_A),
        cancelled("j-c2", crate::harness::ORG_B),
    ];
    assert_eq!(
        enqueue_with_receivers_in(&mut tx, &orgs, events)
            .await
            .unwrap(),
        1
    );
    tx.rollback().await.unwrap();
    assert_eq!(
        ctx.scalar_i64("SELECT count(*) FROM webhook_outbox").await,
        0
    );

    let mut tx = ctx.store.pool().begin().await.unwrap();
    enqueue_with_receivers_in(&mut tx, &orgs, vec![cancelled("j-c1", ORG_A)])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let (job_id, kind, body): (String, String, String) =
        sqlx::query_as("SELECT job_id, event_type, body FROM webhook_outbox")
            .fetch_one(ctx.store.pool())
            .await
            .unwrap();
    assert_eq!((job_id.as_str(), kind.as_str()), ("j-c1", "job.cancelled"));
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["data"]["state"], "cancelled");
}

/// `aiq webhooks add` in another process reaches a running daemon through a notification: its
/// jobs get messages well before the cache's TTL (30 s) would have it read the endpoints again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_added_by_another_process_is_used_before_the_cache_would_expire() {
    let ctx = ctx_allowing_the_receiver(&[]).await;
    let (r, port) = receiver(&[]).await;
    let worker = ctx.start_worker();
    // A first job: the worker now holds "no organisation has endpoints".
    enqueue_llm(&ctx, "before", 3).await;
    ctx.wait_settled(Duration::from_secs(30)).await;
    assert_eq!(
        ctx.scalar_i64("SELECT count(*) FROM webhook_outbox").await,
        0
    );

    let (ok, _, err) = cli(
        &ctx,
        &[
            "add",
            "--org",
            ORG_A,
            "--url",
            &format!("http://127.0.0.1:{port}/"),
        ],
    );
    assert!(ok, "{err}");
    // The notification arrives within moments; jobs enqueued one after another until one has a
    // message, well inside the TTL (the wait's timeout is the bound).
    let deadline = aiq::store::webhooks::ENDPOINT_CACHE_TTL / 2;
    crate::harness::wait_for(
        deadline,
        "a job with a message for the new endpoint",
        || async {
            enqueue_llm(&ctx, "after", 3).await;
            ctx.wait_settled(Duration::from_secs(30)).await;
            (ctx.scalar_i64("SELECT count(*) FROM webhook_outbox").await > 0).then_some(())
        },
    )
    .await;
    wait_until(Duration::from_secs(30), "the delivery", || async {
        !r.got().is_empty()
    })
    .await;
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_cancelled_while_it_waits_is_delivered_as_cancelled_to_its_endpoint_and_its_callback()
{
    let (ctx, r, port) = with_an_endpoint(ENDPOINT_SECRET).await;
    let secret = ENDPOINT_SECRET;
    let plain = enqueue_llm(&ctx, "never run", 3).await;
    let called_back = enqueue_with_callback(&ctx, &format!("http://127.0.0.1:{port}/cb")).await;
    for id in [&plain, &called_back] {
        assert_eq!(
            ctx.queue.cancel(id).await.unwrap(),
            aiq::queue::events::Cancel::Cancelled
        );
    }
    let worker = ctx.start_worker();
    // Two for the endpoint, one for the callback.
    wait_delivered(&ctx, 3).await;
    worker.stop().await;

    let got = r.got();
    assert_eq!(got.len(), 3, "{got:?}");
    for g in &got {
        let b = body_of(g);
        assert_eq!(b["type"], "job.cancelled", "{b}");
        assert_eq!(b["data"]["state"], "cancelled", "{b}");
        assert_eq!(b["data"]["result"], Value::Null, "{b}");
        if g.signature == expected_signature(CALLBACK_SECRET, g) {
            verify(g, &[CALLBACK_SECRET]);
            assert_eq!(b["data"]["job_id"], called_back.as_str(), "{b}");
        } else {
            verify(g, &[secret]);
        }
    }
    let to = |job: &str| {
        got.iter()
            .filter(|g| body_of(g)["data"]["job_id"] == job)
            .count()
    };
    assert_eq!((to(&plain), to(&called_back)), (1, 2), "{got:?}");
    assert_eq!(
        ctx.fake_calls().await["openai"],
        0,
        "a cancelled job is never called"
    );
}

/// Jobs that die inside Redis, where no handler sees them end: one whose worker stopped more
/// often than `AIQ_MAX_INTERRUPTS` allows, and one whose lease token was overwritten by hand
/// (the reaper buries it as corrupt). Each gets a `failed` row with its reason and cost 0, and
/// its organisation's endpoint one `job.dead` delivery; both stay in the dead set, retryable.
/// Before, they had a `dead` event and nothing else: no row, no webhook.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_that_die_inside_redis_get_a_failed_row_and_one_dead_delivery() {
    let ctx =
        ctx_allowing_the_receiver(&[("AIQ_LEASE_MS", "1000"), ("AIQ_MAX_INTERRUPTS", "1")]).await;
    let (r, port) = receiver(&[]).await;
    let org = uuid::Uuid::parse_str(ORG_A).unwrap();
    ctx.store
        .add_webhook_endpoint(
            org,
            &format!("http://127.0.0.1:{port}/hooks"),
            ENDPOINT_SECRET,
        )
        .await
        .unwrap();
    let interrupted = enqueue_llm(&ctx, "its worker never comes back", 3).await;
    let corrupt = enqueue_llm(&ctx, "a hash edited by hand", 3).await;
    // A worker that dies holding both leases: taken here and never settled.
    assert_eq!(ctx.queue.fetch(2).await.unwrap().len(), 2);
    let _: () = redis::AsyncCommands::hset(
        &mut ctx.redis().await,
        ctx.key(&format!("job:{corrupt}")),
        "token",
        "not a number",
    )
    .await
    .unwrap();

    let worker = ctx.start_worker();
    wait_delivered(&ctx, 2).await;
    wait_until(Duration::from_secs(60), "{p}:buried to drain", || async {
        ctx.queue.buried_count().await.unwrap() == 0
    })
    .await;
    worker.stop().await;

    for (id, why) in [
        (&interrupted, "interrupted 1 times"),
        (
            &corrupt,
            "corrupt: its token or interrupt count is not a number",
        ),
    ] {
        let (status, error, cost): (String, Option<String>, String) = sqlx::query_as(
            "SELECT status, error_message, api_cost_usd::text FROM ai_processing_results
             WHERE job_id = $1",
        )
        .bind(id)
        .fetch_one(ctx.store.pool())
        .await
        .unwrap_or_else(|e| panic!("the row of {id}: {e}"));
        assert_eq!(status, "failed", "{id}");
        assert!(
            error.as_deref().unwrap_or("").contains(why),
            "{id}: {error:?}"
        );
        assert_eq!(cost, "0.000000", "{id}");
    }
    let got = r.got();
    assert_eq!(got.len(), 2, "one delivery per job: {got:?}");
    for g in &got {
        verify(g, &[ENDPOINT_SECRET]);
        let b = body_of(g);
        assert_eq!(b["type"], "job.dead", "{b}");
        assert_eq!(b["data"]["state"], "dead", "{b}");
        assert_eq!(b["data"]["organization_id"], ORG_A, "{b}");
        let job = b["data"]["job_id"].as_str().unwrap_or_default();
        assert!(job == interrupted || job == corrupt, "{b}");
    }
    assert_ne!(
        body_of(&got[0])["data"]["job_id"],
        body_of(&got[1])["data"]["job_id"]
    );
    assert_eq!(
        ctx.queue.stats().await.unwrap().dead,
        2,
        "both stay dead, retryable"
    );
}
