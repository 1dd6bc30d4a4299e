//! The reference clients in jobs/clients enqueue jobs that a real aiq worker processes, and
//! learn their outcomes (status, waiting, events, cancel) from it. scripts/test installs and
//! builds them before the Rust tests run.

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aiq::domain::{JobKind, OrganizationId, Tier};
use aiq::queue::NewJob;
use aiq_testkit::fake::FakeOptions;

use crate::harness::{ORG_A, ORG_B, TestCtx, llm_payload, wait_for, wait_until};

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

// The clients learn outcomes (#13): their `examples/outcome` programs (get, wait, cancel,
// events) against jobs a real aiq worker runs, defers and cancels.

/// One of the reference clients' outcome programs.
#[derive(Clone, Copy, Debug)]
enum Client {
    Node,
    Python,
}

impl Client {
    fn command(self, ctx: &TestCtx, args: &[&str]) -> Command {
        let root = env!("CARGO_MANIFEST_DIR");
        let (program, script) = match self {
            Client::Node => ("node", "jobs/clients/node/dist/examples/outcome.js"),
            Client::Python => ("python3", "jobs/clients/python/examples/outcome.py"),
        };
        let path = format!("{root}/{script}");
        assert!(
            std::path::Path::new(&path).exists(),
            "{path} is missing: run scripts/test, which installs and builds the reference clients"
        );
        let mut c = Command::new(program);
        c.arg(path)
            .args(args)
            .env("AIQ_REDIS_URL", &ctx.vars["AIQ_REDIS_URL"])
            .env("AIQ_QUEUE_PREFIX", &ctx.vars["AIQ_QUEUE_PREFIX"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    }

    /// A wait's timeout argument: ms for Node, seconds for Python.
    fn timeout(self, ms: u64) -> String {
        match self {
            Client::Node => ms.to_string(),
            Client::Python => format!("{}", ms as f64 / 1000.0),
        }
    }

    /// Runs the program to its end: (exit code, stdout, stderr).
    async fn run(self, ctx: &TestCtx, args: &[&str]) -> (i32, String, String) {
        let child = self.command(ctx, args).spawn().expect("starting a client");
        finish(child).await
    }

    /// Runs a command that prints one JSON value and exits 0.
    async fn json(self, ctx: &TestCtx, args: &[&str]) -> serde_json::Value {
        let (code, out, err) = self.run(ctx, args).await;
        assert_eq!(code, 0, "{args:?}: {err}");
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{args:?} printed {out:?}: {e}"))
    }
}

async fn finish(child: std::process::Child) -> (i32, String, String) {
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The ids of the outcome programs' connections (named aiq-example) blocked in XREAD.
async fn blocked_client_readers(ctx: &TestCtx) -> Vec<String> {
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut ctx.redis().await)
        .await
        .unwrap();
    list.lines()
        .filter(|l| l.contains(" name=aiq-example ") && l.contains(" cmd=xread "))
        .filter_map(|l| {
            l.split(' ')
                .find_map(|f| f.strip_prefix("id="))
                .map(str::to_owned)
        })
        .collect()
}

async fn waits_for_a_job_the_daemon_runs(client: Client) {
    let ctx = TestCtx::new().await;
    let payload = llm_payload(Tier::Enterprise, ORG_A, "caption a red sofa");
    let id = ctx
        .enqueue(JobKind::LlmComplete, Tier::Enterprise, ORG_A, &payload, 0)
        .await;
    let before = client.json(&ctx, &["get", &id]).await;
    assert_eq!(before["state"], "waiting", "{before}");
    // No worker yet: a wait times out cleanly.
    let (code, _, err) = client.run(&ctx, &["wait", &id, &client.timeout(300)]).await;
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("did not finish within"), "{err}");

    // The wait starts (and blocks on the events) before the worker runs the job.
    let timeout = client.timeout(60000);
    let waiter = client
        .command(&ctx, &["wait", &id, &timeout])
        .spawn()
        .unwrap();
    wait_until(
        Duration::from_secs(20),
        "the client to block on the events",
        || async { blocked_client_readers(&ctx).await.len() == 1 },
    )
    .await;
    let worker = ctx.start_worker();
    let (code, out, err) = finish(waiter).await;
    worker.stop().await;
    assert_eq!(code, 0, "{err}");
    let status: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(status["id"], id.as_str());
    assert_eq!(status["state"], "succeeded", "{status}");
    assert_eq!(status["organization_id"], ORG_A);
    assert_eq!(status["tier"], "enterprise");
    assert_eq!(status["kind"], "llm.complete");
    // Attempts as the daemon keeps them in the outcome (it counts the failed ones).
    let kept: Option<String> = redis::cmd("HGET")
        .arg(ctx.key(&format!("outcome:{id}")))
        .arg("attempts")
        .query_async(&mut ctx.redis().await)
        .await
        .unwrap();
    assert_eq!(
        status["attempts"].as_u64().map(|n| n.to_string()),
        kept,
        "{status}"
    );
    assert!(status["finished_at"].as_u64().unwrap() > 0, "{status}");
    assert!(status.get("problems").is_none(), "{status}");
    let result = &status["result"];
    assert_eq!(result["provider"], "openai", "{status}");
    assert_eq!(result["model"], "gpt-4o-mini");
    assert!(
        result["cost_usd"].as_str().unwrap().parse::<f64>().unwrap() > 0.0,
        "{result}"
    );
    assert!(result["input_tokens"].as_u64().unwrap() > 0, "{result}");
    assert!(result["output_tokens"].as_u64().unwrap() > 0, "{result}");

    // Finished before the call: get and wait answer at once with the same status.
    assert_eq!(client.json(&ctx, &["get", &id]).await, status);
    assert_eq!(
        client
            .json(&ctx, &["wait", &id, &client.timeout(60000)])
            .await,
        status
    );
    // An unknown id is not found at once, never waited for.
    let (code, _, err) = client
        .run(&ctx, &["wait", "no-such-job", &client.timeout(600000)])
        .await;
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("not found"), "{err}");
    let (code, _, err) = client.run(&ctx, &["get", "no-such-job"]).await;
    assert_eq!(code, 3, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_client_waits_for_a_job_the_daemon_runs_and_reads_its_result() {
    waits_for_a_job_the_daemon_runs(Client::Node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_client_waits_for_a_job_the_daemon_runs_and_reads_its_result() {
    waits_for_a_job_the_daemon_runs(Client::Python).await;
}

/// The stream's event positions, oldest first.
async fn stream_ids(ctx: &TestCtx) -> Vec<String> {
    let entries: Vec<(String, Vec<String>)> = redis::cmd("XRANGE")
        .arg(ctx.key("events"))
        .arg("-")
        .arg("+")
        .query_async(&mut ctx.redis().await)
        .await
        .unwrap();
    entries
        .into_iter()
        .flat_map(|(id, kv)| crate::outcomes::read_entry(&id, kv))
        .map(|(position, _)| position)
        .collect()
}

async fn sees_every_event_once_across_a_dropped_connection(client: Client) {
    let ctx = TestCtx::build(&[], FakeOptions::with_latency(Duration::from_millis(200))).await;
    let ids: Vec<String> = {
        let mut ids = Vec::new();
        for i in 0..8 {
            let payload = llm_payload(Tier::Enterprise, ORG_A, &format!("photo {i}"));
            ids.push(
                ctx.enqueue(JobKind::LlmComplete, Tier::Enterprise, ORG_A, &payload, 0)
                    .await,
            );
        }
        ids
    };
    // The consumer prints every event from the start until it is stopped.
    let mut consumer = client
        .command(&ctx, &["events", "0", "1000000"])
        .spawn()
        .unwrap();
    let stdout = consumer.stdout.take().unwrap();
    let lines = Arc::new(Mutex::new(Vec::<serde_json::Value>::new()));
    let reader = {
        let lines = lines.clone();
        std::thread::spawn(move || {
            for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
                let Ok(line) = line else { break };
                let v = serde_json::from_str(&line).expect("one JSON event a line");
                lines.lock().unwrap().push(v);
            }
        })
    };
    let count = |ty: &str| {
        lines
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e["type"] == ty)
            .count()
    };
    wait_until(Duration::from_secs(20), "the created events", || {
        let n = count("created");
        async move { n == 8 }
    })
    .await;
    let worker = ctx.start_worker();
    // In the middle of the run: some job has finished, its connection is cut.
    wait_until(Duration::from_secs(30), "a first succeeded event", || {
        let n = count("succeeded");
        async move { n >= 1 }
    })
    .await;
    let killed = wait_for(Duration::from_secs(20), "the consumer to block", || async {
        blocked_client_readers(&ctx).await.into_iter().next()
    })
    .await;
    let n: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("ID")
        .arg(&killed)
        .query_async(&mut ctx.redis().await)
        .await
        .unwrap();
    assert_eq!(n, 1);
    let before_kill = lines.lock().unwrap().len();
    ctx.wait_settled(Duration::from_secs(60)).await;
    worker.stop().await;
    let all = stream_ids(&ctx).await;
    wait_until(
        Duration::from_secs(30),
        "the consumer to read every event",
        || {
            let n = lines.lock().unwrap().len();
            let want = all.len();
            async move { n >= want }
        },
    )
    .await;
    let after: Vec<String> = blocked_client_readers(&ctx).await;
    assert!(
        !after.contains(&killed),
        "the consumer reads on a new connection"
    );
    consumer.kill().unwrap();
    let _ = consumer.wait();
    reader.join().unwrap();

    let lines = lines.lock().unwrap();
    println!(
        "{client:?}: {before_kill} of {} events read before its connection was killed",
        all.len()
    );
    let got: Vec<String> = lines
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(got, all, "every event once, in order");
    for id in &ids {
        let terminal: Vec<&serde_json::Value> = lines
            .iter()
            .filter(|e| e["job_id"] == id.as_str() && e["type"] == "succeeded")
            .collect();
        assert_eq!(terminal.len(), 1, "job {id}: one terminal event");
        assert_eq!(terminal[0]["result"]["provider"], "openai");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_client_that_loses_its_connection_mid_run_sees_every_event_once() {
    sees_every_event_once_across_a_dropped_connection(Client::Node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_client_that_loses_its_connection_mid_run_sees_every_event_once() {
    sees_every_event_once_across_a_dropped_connection(Client::Python).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_deferred_job_shows_as_delayed_for_the_budget_in_both_clients() {
    let ctx = TestCtx::new().await;
    let text = "caption the budget photo";
    let payload = llm_payload(Tier::Enterprise, ORG_A, text);
    // A day's limit of exactly one job's estimate: one job holds it, the others wait for the reset.
    let estimate = aiq::budget::PriceCatalog::builtin()
        .llm_estimate(
            "openai",
            "gpt-4o-mini",
            (text.len() + "user".len() + 8) as u64,
            50,
        )
        .unwrap();
    let org = uuid::Uuid::parse_str(ORG_A).unwrap();
    ctx.store
        .set_org_limits(org, Some(estimate), None)
        .await
        .unwrap();
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(
            ctx.enqueue(JobKind::LlmComplete, Tier::Enterprise, ORG_A, &payload, 0)
                .await,
        );
    }
    let worker = ctx.start_worker();
    wait_until(
        Duration::from_secs(30),
        "the jobs to run or wait for the budget",
        || async {
            let s = ctx.queue.stats().await.unwrap();
            s.waiting.values().sum::<u64>() == 0 && s.inflight == 0 && s.delayed >= 1
        },
    )
    .await;
    worker.stop().await;
    let next_day = (chrono::Utc::now().date_naive() + chrono::Days::new(1))
        .and_hms_opt(0, 0, 0)
        .unwrap()
        .and_utc()
        .timestamp_millis() as u64;
    let mut delayed = Vec::new();
    for id in &ids {
        let status = Client::Node.json(&ctx, &["get", id]).await;
        assert_eq!(
            Client::Python.json(&ctx, &["get", id]).await,
            status,
            "both clients agree"
        );
        if status["state"] == "delayed" {
            assert_eq!(status["delay_reason"], "budget", "{status}");
            let due = status["due_at"].as_u64().unwrap();
            assert!(
                (next_day..next_day + 3_000).contains(&due),
                "{id} due at {due}, not at the reset {next_day}"
            );
            assert_eq!(
                status["attempts"], 0,
                "waiting for budget spends no attempt"
            );
            delayed.push((id.clone(), due));
        }
    }
    assert!(!delayed.is_empty());
    // Its deferred event says the same.
    let count = stream_ids(&ctx).await.len().to_string();
    let (code, out, err) = Client::Python.run(&ctx, &["events", "0", &count]).await;
    assert_eq!(code, 0, "{err}");
    let events: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for (id, due) in &delayed {
        let deferred = events
            .iter()
            .rev()
            .find(|e| e["job_id"] == id.as_str() && e["type"] == "deferred")
            .unwrap_or_else(|| panic!("no deferred event of {id}"));
        assert_eq!(deferred["reason"], "budget", "{deferred}");
        assert_eq!(deferred["until"].as_u64(), Some(*due), "{deferred}");
        assert_eq!(deferred["state"], "delayed");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_cancelled_by_the_clients_never_run_and_get_a_cancelled_result_row() {
    let ctx = TestCtx::new().await;
    let waiting = ctx
        .enqueue(
            JobKind::LlmComplete,
            Tier::Enterprise,
            ORG_A,
            &llm_payload(Tier::Enterprise, ORG_A, "cancel me"),
            0,
        )
        .await;
    let delayed = ctx
        .queue
        .enqueue(&NewJob {
            kind: JobKind::LlmComplete,
            tier: Tier::GrowthTeam,
            organization_id: OrganizationId::parse(ORG_B).unwrap(),
            payload: llm_payload(Tier::GrowthTeam, ORG_B, "cancel me later"),
            job_id: None,
            delay: Duration::from_secs(3600),
            idempotency_key: None,
            max_attempts: 0,
        })
        .await
        .unwrap()
        .job_id;
    assert_eq!(
        Client::Node.json(&ctx, &["cancel", &waiting]).await,
        "cancelled"
    );
    assert_eq!(
        Client::Python.json(&ctx, &["cancel", &delayed]).await,
        "cancelled"
    );
    assert_eq!(
        Client::Python.json(&ctx, &["cancel", &waiting]).await,
        "finished"
    );
    assert_eq!(
        Client::Node.json(&ctx, &["cancel", "no-such-job"]).await,
        "not_found"
    );
    let worker = ctx.start_worker();
    wait_until(Duration::from_secs(30), "the cancelled rows", || async {
        ctx.scalar_i64("SELECT count(*) FROM ai_processing_results WHERE status = 'cancelled'")
            .await
            == 2
    })
    .await;
    worker.stop().await;
    for (id, org) in [(&waiting, ORG_A), (&delayed, ORG_B)] {
        let n = ctx
            .scalar_i64(&format!(
                "SELECT count(*) FROM ai_processing_results WHERE job_id = '{id}' AND organization_id = '{org}' AND status = 'cancelled'"
            ))
            .await;
        assert_eq!(n, 1, "{id}");
        for client in [Client::Node, Client::Python] {
            let status = client
                .json(&ctx, &["wait", id, &client.timeout(60000)])
                .await;
            assert_eq!(status["state"], "cancelled", "{status}");
        }
    }
    assert_eq!(
        ctx.fake_calls().await["openai"].as_i64().unwrap_or(0),
        0,
        "no provider call"
    );
}
