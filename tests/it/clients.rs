//! The reference clients in jobs/clients enqueue jobs that a real aiq worker processes.
//! scripts/test installs and builds them before the Rust tests run.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use aiq::domain::Tier;

use crate::harness::{ORG_A, ORG_B, TestCtx};

fn jobs_json(client: &str) -> String {
    let mut jobs = Vec::new();
    for (i, tier) in Tier::ALL.iter().enumerate() {
        let org = if i % 2 == 0 { ORG_A } else { ORG_B };
        jobs.push(serde_json::json!({
            "kind": "llm.complete",
            "payload": { "version": 1, "organization_id": org, "tier": tier.as_str(), "provider": "openai",
                         "model": "gpt-4o-mini", "messages": [{ "role": "user", "content": format!("from {client} {i}") }],
                         "max_tokens": 20 },
            "opts": { "idempotencyKey": format!("{client}-{i}") }
        }));
        jobs.push(serde_json::json!({
            "kind": "vision.annotate",
            "payload": { "version": 1, "organization_id": org, "tier": tier.as_str(),
                         "images": [{ "content": "aW1hZ2U=" }], "features": [{ "type": "LABEL_DETECTION" }] }
        }));
    }
    serde_json::Value::Array(jobs).to_string()
}

/// Runs a client's example enqueuer with `stdin`; returns the ids it printed.
fn run_client(ctx: &TestCtx, program: &str, script: &str, stdin: &str) -> Vec<String> {
    let root = env!("CARGO_MANIFEST_DIR");
    let path = format!("{root}/{script}");
    assert!(
        std::path::Path::new(&path).exists(),
        "{path} is missing: run scripts/test, which installs and builds the reference clients"
    );
    let mut child = Command::new(program)
        .arg(&path)
        .env("AIQ_REDIS_URL", &ctx.vars["AIQ_REDIS_URL"])
        .env("AIQ_QUEUE_PREFIX", &ctx.vars["AIQ_QUEUE_PREFIX"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {program}: {e}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let results: Vec<serde_json::Value> =
        serde_json::from_slice(&out.stdout).expect("the client prints JSON");
    results
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_owned())
        .collect()
}

async fn check_processed(ctx: &TestCtx, ids: &[String]) {
    let worker = ctx.start_worker();
    ctx.wait_settled(Duration::from_secs(30)).await;
    worker.stop().await;
    for id in ids {
        let n = ctx
            .scalar_i64(&format!(
                "SELECT count(*) FROM ai_processing_results WHERE job_id = '{id}' AND status = 'completed'"
            ))
            .await;
        assert_eq!(n, 1, "job {id} was processed");
    }
    assert_eq!(ctx.queue.stats().await.unwrap().dead, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_enqueued_by_the_node_client_are_processed() {
    let ctx = TestCtx::new().await;
    let input = jobs_json("node");
    let ids = run_client(
        &ctx,
        "node",
        "jobs/clients/node/dist/examples/enqueue.js",
        &input,
    );
    assert_eq!(ids.len(), 12);
    // The idempotency keys hold across a second run.
    let again = run_client(
        &ctx,
        "node",
        "jobs/clients/node/dist/examples/enqueue.js",
        &input,
    );
    for i in (0..12).step_by(2) {
        assert_eq!(ids[i], again[i]);
    }
    check_processed(&ctx, &ids).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_enqueued_by_the_python_client_are_processed() {
    let ctx = TestCtx::new().await;
    let ids = run_client(
        &ctx,
        "python3",
        "jobs/clients/python/examples/enqueue.py",
        &jobs_json("python"),
    );
    assert_eq!(ids.len(), 12);
    check_processed(&ctx, &ids).await;
}
