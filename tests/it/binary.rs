//! The `aiq` binary as an operator runs it.

use std::process::{Command, Stdio};
use std::time::Duration;

use aiq::domain::{JobKind, Tier};

use crate::harness::{ORG_A, TestCtx, llm_payload};

fn aiq() -> Command {
    crate::harness::aiq_command()
}

#[test]
fn run_without_a_database_url_exits_non_zero_naming_the_setting() {
    let out = aiq()
        .arg("run")
        .env("AIQ_REDIS_URL", "redis://127.0.0.1:1/")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("AIQ_DATABASE_URL") && err.contains("missing"),
        "{err}"
    );
}

/// `aiq config` ends with the job policy's constants (`jobs::policy`), in text and in JSON.
#[test]
fn config_prints_the_job_policys_constants() {
    let config = |json: bool| {
        let mut c = aiq();
        c.arg("config")
            .env("AIQ_REDIS_URL", "redis://127.0.0.1:1/")
            .env("AIQ_DATABASE_URL", "postgres://x@127.0.0.1:1/x");
        if json {
            c.arg("--json");
        }
        let out = c.output().unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let text = config(false);
    for (name, value) in aiq::jobs::policy_constants() {
        assert!(
            text.contains(&format!("# policy constant {name}: {value}")),
            "{name} missing: {text}"
        );
    }
    let json: serde_json::Value = serde_json::from_str(&config(true)).unwrap();
    assert_eq!(json["policy"]["WINDOW_RESET_MARGIN"], "50 ms", "{json}");
    assert_eq!(
        json["policy"].as_object().unwrap().len(),
        aiq::jobs::policy_constants().len()
    );
}

#[test]
fn run_with_a_malformed_setting_exits_naming_it() {
    let out = aiq()
        .arg("run")
        .env("AIQ_REDIS_URL", "redis://127.0.0.1:1/")
        .env("AIQ_DATABASE_URL", "postgres://x@127.0.0.1:1/x")
        .env("AIQ_TIER_WEIGHTS", "32,16,8")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("AIQ_TIER_WEIGHTS"), "{err}");
}

#[test]
fn every_subcommand_prints_help() {
    for sub in [
        "run", "migrate", "enqueue", "stats", "dlq", "costs", "budget", "config",
    ] {
        let out = aiq().args([sub, "--help"]).output().unwrap();
        assert!(out.status.success(), "{sub} --help failed");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("Usage: aiq"), "{sub}: {text}");
        assert!(text.lines().count() > 3, "{sub} help is too thin: {text}");
    }
}

/// The production binary carries no developer tool: they are `aiq-dev`'s (crates/aiq-dev).
#[test]
fn the_production_binary_has_no_demo_benchmark_or_fake() {
    for sub in ["demo", "bench", "fake-providers"] {
        let out = aiq().args([sub, "--help"]).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "`aiq {sub}` should not exist");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("unrecognized subcommand"), "{sub}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_dead_letters_a_malformed_job_goes_on_and_stops_cleanly_on_sigterm() {
    let ctx = TestCtx::new().await;
    // Enqueue through the CLI, as an operator would.
    let enqueue = |payload: &str, kind: &str| {
        let mut c = aiq();
        c.envs(&ctx.vars)
            .args(["enqueue", "--kind", kind, "--payload", payload]);
        let out = c.output().unwrap();
        assert!(
            out.status.success(),
            "enqueue: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let bad = enqueue(
        &format!(r#"{{"organization_id":"{ORG_A}","tier":"trial","provider":"openai"}}"#),
        "llm.complete",
    );
    let good = enqueue(
        &llm_payload(Tier::Trial, ORG_A, "after the bad one"),
        "llm.complete",
    );

    let mut daemon = aiq()
        .envs(&ctx.vars)
        .arg("run")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    ctx.wait_settled(Duration::from_secs(30)).await;
    // SAFETY: kill(2) on our own child.
    unsafe {
        libc::kill(daemon.id() as libc::pid_t, libc::SIGTERM);
    }
    let status = tokio::task::spawn_blocking(move || daemon.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "aiq run exited with {status}");

    let dead = ctx.queue.dead_jobs(10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].id, bad);
    assert!(
        dead[0].reason.contains("missing field"),
        "{}",
        dead[0].reason
    );
    let done = ctx
        .scalar_i64(&format!("SELECT count(*) FROM ai_processing_results WHERE job_id = '{good}' AND status = 'completed'"))
        .await;
    assert_eq!(done, 1);
    let err_rows = ctx
        .scalar_i64(&format!("SELECT count(*) FROM ai_processing_errors WHERE job_id = '{bad}' AND error_type = 'invalid_payload'"))
        .await;
    assert_eq!(err_rows, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_reports_the_waiting_jobs_per_tier() {
    let ctx = TestCtx::new().await;
    for _ in 0..3 {
        ctx.enqueue(
            JobKind::LlmComplete,
            Tier::GrowthTeam,
            ORG_A,
            &llm_payload(Tier::GrowthTeam, ORG_A, "x"),
            0,
        )
        .await;
    }
    let vars = ctx.vars.clone();
    let out = tokio::task::spawn_blocking(move || {
        aiq()
            .envs(&vars)
            .args(["stats", "--json"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["waiting"]["growth_team"], 3);
    assert_eq!(v["waiting"]["trial"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dlq_commands_list_show_retry_and_purge_dead_jobs() {
    let ctx = TestCtx::new().await;
    let a = ctx
        .enqueue(
            JobKind::LlmComplete,
            Tier::Trial,
            ORG_A,
            "broken payload one",
            0,
        )
        .await;
    let b = ctx
        .enqueue(
            JobKind::LlmComplete,
            Tier::Trial,
            ORG_A,
            "broken payload two",
            0,
        )
        .await;
    let worker = ctx.start_worker();
    ctx.wait_settled(Duration::from_secs(30)).await;
    worker.stop().await;

    let vars = ctx.vars.clone();
    let run = move |args: &[&str]| {
        let (vars, args) = (
            vars.clone(),
            args.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        );
        async move {
            let out = tokio::task::spawn_blocking(move || {
                aiq().envs(&vars).args(&args).output().unwrap()
            })
            .await
            .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).into_owned()
        }
    };
    let listed = run(&["dlq", "list", "--json"]).await;
    let rows: Vec<serde_json::Value> = listed
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2);
    assert!(
        rows.iter()
            .all(|r| r["reason"].as_str().unwrap().contains("invalid payload"))
    );
    let shown = run(&["dlq", "show", &a]).await;
    assert!(shown.contains("broken payload one"), "{shown}");

    assert!(
        run(&["dlq", "retry", &a])
            .await
            .contains("1 dead jobs queued again")
    );
    assert_eq!(ctx.queue.stats().await.unwrap().waiting["trial"], 1);
    assert!(
        run(&["dlq", "purge", "--all"])
            .await
            .contains("1 dead jobs purged")
    );
    assert!(ctx.queue.job_fields(&b).await.unwrap().is_empty());
    assert_eq!(ctx.queue.stats().await.unwrap().dead, 0);
}

#[tokio::test]
async fn a_report_whose_stdout_closes_ends_quietly_instead_of_panicking() {
    use std::os::unix::process::ExitStatusExt;
    let ctx = TestCtx::new().await;
    // Something to list: a dead job.
    ctx.enqueue(JobKind::LlmComplete, Tier::Trial, ORG_A, "broken", 0)
        .await;
    let worker = ctx.start_worker();
    ctx.wait_settled(Duration::from_secs(30)).await;
    worker.stop().await;
    for args in [
        &["dlq", "list"][..],
        &["dlq", "list", "--json"],
        &["costs", "--json"],
        &["costs"],
        &["stats"],
        &["config"],
    ] {
        let vars = ctx.vars.clone();
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let shown = args.join(" ");
        let out = tokio::task::spawn_blocking(move || {
            // The reader is gone before aiq writes a byte: like `| head -0`, deterministically.
            let (reader, writer) = std::io::pipe().unwrap();
            drop(reader);
            aiq()
                .envs(&vars)
                .args(&args)
                .stdout(writer)
                .stderr(std::process::Stdio::piped())
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "aiq {shown}: {stderr}");
        assert!(
            out.status.success() || out.status.signal() == Some(libc::SIGPIPE),
            "aiq {shown}: {:?} {stderr}",
            out.status
        );
    }
}

#[tokio::test]
async fn costs_works_for_an_organisation_that_spent_five_micro_dollars_of_a_100000_dollar_month() {
    let ctx = TestCtx::new().await;
    // Its month's limit, and one call's cost, as aiq would have written them.
    sqlx::query(
        "INSERT INTO ai_cost_limits (organization_id, daily_limit_usd, monthly_limit_usd)
         VALUES ($1::uuid, 100000, 100000)",
    )
    .bind(ORG_A)
    .execute(ctx.store.pool())
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO ai_cost_tracking (organization_id, service_name, operation_type, cost_usd,
            job_id, attempt, tier, call_status)
         VALUES ($1::uuid, 'openai', 'chat.completions', 0.000005, 'j-cheap', 1, 'enterprise', 'succeeded')",
    )
    .bind(ORG_A)
    .execute(ctx.store.pool())
    .await
    .unwrap();
    for args in [&["costs"][..], &["costs", "--json"]] {
        let out = aiq().envs(&ctx.vars).args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "aiq {args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains(ORG_A),
            "aiq {args:?} lists the organisation: {stdout}"
        );
    }
}
