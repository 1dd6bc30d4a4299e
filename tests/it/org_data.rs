//! `aiq org export` and `aiq org purge` against real PostgreSQL and Redis: three organisations
//! with rows in every table (real jobs through a worker, the rest inserted) and queue state
//! (waiting, delayed, dead jobs, outcomes, a kept answer); one exported and purged, the other
//! two compared whole before and after.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use aiq::domain::{JobKind, OrganizationId, Tier};
use aiq::queue::NewJob;
use aiq::store::tenant::{LEDGER_SUMS, NOT_ORG_DATA, ORG_TABLES};
use redis::AsyncCommands;
use serde_json::Value;

use crate::harness::{ORG_A, ORG_B, TestCtx, aiq_command, llm_payload};

const ORG_C: &str = "5d2c4b1a-9e8f-4a7b-8c6d-1e2f3a4b5c6d";
const ACTOR: &str = "ops: Jane Doe";

/// Runs `aiq ARGS` on the test's settings: (exit code, stdout, stderr).
fn aiq(ctx: &TestCtx, args: &[&str]) -> (i32, String, String) {
    let out = aiq_command()
        .envs(&ctx.vars)
        .args(args)
        .output()
        .expect("running aiq");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn export(ctx: &TestCtx, org: &str, file: &Path) -> Vec<String> {
    let f = file.to_str().unwrap();
    let (code, out, err) = aiq(ctx, &["org", "export", org, "--out", f, "--by", ACTOR]);
    assert_eq!(code, 0, "export of {org}: {out} {err}");
    assert!(
        !aiq::org_data::partial_path(file).exists(),
        "the partial file is renamed"
    );
    std::fs::read_to_string(file)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn purge(ctx: &TestCtx, org: &str, keep_ledger: bool) -> Value {
    let mut args = vec!["org", "purge", org, "--by", ACTOR, "--json"];
    if keep_ledger {
        args.push("--keep-ledger");
    }
    let (code, out, err) = aiq(ctx, &args);
    assert_eq!(code, 0, "purge of {org}: {out} {err}");
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// Tables with an organization_id column, as the database has them.
async fn org_columns(ctx: &TestCtx) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.columns
         WHERE column_name = 'organization_id' AND table_schema = 'public' ORDER BY 1",
    )
    .fetch_all(ctx.store.pool())
    .await
    .unwrap()
}

/// Every row of `org` in `table`, as JSON values sorted by their text.
async fn rows_of(ctx: &TestCtx, table: &str, org: &str) -> Vec<Value> {
    let sql =
        format!("SELECT row_to_json(t)::text FROM {table} t WHERE organization_id = '{org}'::uuid");
    let mut rows: Vec<Value> = sqlx::query_scalar::<_, String>(sqlx::AssertSqlSafe(sql))
        .fetch_all(ctx.store.pool())
        .await
        .unwrap()
        .iter()
        .map(|r| serde_json::from_str(r).unwrap())
        .collect();
    rows.sort_by_key(|v| v.to_string());
    rows
}

/// What one organisation's seeding left in the queue.
struct Seeded {
    waiting: String,
    delayed: String,
    dead: String,
}

/// Rows in every table and queue state for each of `orgs`.
async fn seed(ctx: &TestCtx, orgs: &[&str]) -> BTreeMap<String, Seeded> {
    let tier = Tier::GrowthTeam;
    let mut dead = BTreeMap::new();
    for org in orgs {
        let uuid: uuid::Uuid = org.parse().unwrap();
        let secret = aiq::webhooks::sign::generate().unwrap();
        ctx.store
            .add_webhook_endpoint(uuid, "https://hooks.example.invalid/aiq", &secret)
            .await
            .unwrap();
        ctx.enqueue_both_kinds(tier, org, "caption this").await;
        // A payload that breaks its schema: dead on its first delivery, with an error row.
        let bad = format!(r#"{{"version":1,"organization_id":"{org}","tier":"growth_team"}}"#);
        dead.insert(
            org.to_string(),
            ctx.enqueue(JobKind::LlmComplete, tier, org, &bad, 1).await,
        );
    }
    ctx.run_until_settled().await;
    let pool = ctx.store.pool();
    let corrections =
        sqlx::query_scalar::<_, bool>("SELECT to_regclass('ai_corrections') IS NOT NULL")
            .fetch_one(pool)
            .await
            .unwrap();
    let mut out = BTreeMap::new();
    for org in orgs {
        let uuid: uuid::Uuid = org.parse().unwrap();
        sqlx::query(
            "INSERT INTO ai_cost_alerts (scope, organization_id, window_kind, window_start,
               threshold, spent_usd, limit_usd, message)
             VALUES ('org:' || $1::text, $1, 'day', '2026-12-01', '80', 8, 10, 'at 80%')",
        )
        .bind(uuid)
        .execute(pool)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO ai_cost_limits (organization_id, daily_limit_usd, note)
             VALUES ($1, 12.5, 'agreed')",
        )
        .bind(uuid)
        .execute(pool)
        .await
        .unwrap();
        if corrections {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "INSERT INTO ai_corrections (organization_id, correction_type)
                 VALUES ('{org}', 'tag_added')"
            )))
            .execute(pool)
            .await
            .unwrap();
        }
        let waiting = ctx
            .enqueue(
                JobKind::LlmComplete,
                tier,
                org,
                &llm_payload(tier, org, "later"),
                0,
            )
            .await;
        let delayed = ctx
            .queue
            .enqueue(&NewJob {
                kind: JobKind::LlmComplete,
                tier,
                organization_id: OrganizationId::parse(org).unwrap(),
                payload: llm_payload(tier, org, "tomorrow"),
                job_id: None,
                delay: Duration::from_secs(3600),
                idempotency_key: Some(format!("idem-{org}")),
                max_attempts: 0,
            })
            .await
            .unwrap()
            .job_id;
        ctx.queue
            .keep(&waiting, br#"{"kept":"answer"}"#, Duration::from_secs(3600))
            .await
            .unwrap();
        out.insert(
            org.to_string(),
            Seeded {
                waiting,
                delayed,
                dead: dead[*org].clone(),
            },
        );
    }
    // A platform-wide alert belongs to no organisation and stays.
    sqlx::query(
        "INSERT INTO ai_cost_alerts (scope, window_kind, window_start, threshold, spent_usd, message)
         VALUES ('global', 'day', '2026-12-01', '80', 800, 'platform at 80%')",
    )
    .execute(pool)
    .await
    .unwrap();
    out
}

fn budget_key(ctx: &TestCtx, suffix: &str) -> String {
    format!("{{{}}}:{suffix}", ctx.vars["AIQ_BUDGET_PREFIX"])
}

/// Every key of the test's queue and budget prefixes.
async fn keys(ctx: &TestCtx) -> Vec<String> {
    let mut conn = ctx.redis().await;
    let mut out = Vec::new();
    for pattern in [ctx.key("*"), budget_key(ctx, "*")] {
        let found: Vec<String> = conn.keys(pattern).await.unwrap();
        out.extend(found);
    }
    out.sort();
    out
}

/// The spend counters of `org` (key -> spent, reserved).
async fn spend_of(ctx: &TestCtx, org: &str) -> BTreeMap<String, BTreeMap<String, String>> {
    let mut conn = ctx.redis().await;
    let mut out = BTreeMap::new();
    for k in keys(ctx).await {
        if k.contains(&format!("spend:org:{org}")) {
            let h: BTreeMap<String, String> = conn.hgetall(&k).await.unwrap();
            out.insert(k, h);
        }
    }
    out
}

#[tokio::test]
async fn an_organisation_exported_then_purged_leaves_nothing_and_the_other_two_untouched() {
    let ctx = TestCtx::new().await;
    let seeded = seed(&ctx, &[ORG_A, ORG_B, ORG_C]).await;
    let a = &seeded[ORG_A];
    // A past window's counter and this minute's rate counter of A, as old runs leave them.
    let old_day = (chrono::Utc::now() - chrono::Duration::days(3))
        .format("%Y-%m-%d")
        .to_string();
    let mut conn = ctx.redis().await;
    let old_key = budget_key(&ctx, &format!("spend:org:{ORG_A}:d:{old_day}"));
    let _: () = conn.hset(&old_key, "spent", 5).await.unwrap();
    let dir = tempfile::tempdir().unwrap();

    // Every table with an organization_id column is exported, or said not to be data.
    let columns = org_columns(&ctx).await;
    for t in &columns {
        assert!(
            ORG_TABLES.iter().any(|o| o.name == t)
                || NOT_ORG_DATA.contains(&t.as_str())
                || LEDGER_SUMS.contains(&t.as_str()),
            "table {t} has an organization_id column but export and purge do not cover it"
        );
    }
    let data_tables: Vec<&String> = columns
        .iter()
        .filter(|t| !NOT_ORG_DATA.contains(&t.as_str()) && !LEDGER_SUMS.contains(&t.as_str()))
        .collect();
    // A's spend is summed (by the cost rows' triggers, then a fold) before the purge.
    ctx.store.fold_spend().await.unwrap();
    let sums_of_a = |t: &'static str| rows_of(&ctx, t, ORG_A);
    assert!(
        !sums_of_a("aiq_spend_day").await.is_empty()
            && !sums_of_a("aiq_spend_month").await.is_empty(),
        "A's spend is summed per day and month"
    );

    let before_b = export(&ctx, ORG_B, &dir.path().join("b0.jsonl"));
    let before_c = export(&ctx, ORG_C, &dir.path().join("c0.jsonl"));
    let spend_b = spend_of(&ctx, ORG_B).await;
    assert!(!spend_b.is_empty(), "B's jobs spent");

    let lines = export(&ctx, ORG_A, &dir.path().join("a.jsonl"));
    let parsed: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(parsed[0]["organization_id"], ORG_A, "the header names A");
    for t in &data_tables {
        let mut exported: Vec<Value> = parsed
            .iter()
            .filter(|v| v["table"] == t.as_str())
            .map(|v| v["row"].clone())
            .collect();
        exported.sort_by_key(|v| v.to_string());
        let expected = rows_of(&ctx, t, ORG_A).await;
        assert_eq!(exported, expected, "every row of A in {t}, and no other");
        assert!(!expected.is_empty(), "A has rows in {t}");
    }
    let queue_ids = |place: &str| -> Vec<String> {
        parsed
            .iter()
            .filter(|v| v["queue"] == place)
            .map(|v| v["job"]["id"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(queue_ids("waiting"), vec![a.waiting.clone()]);
    assert_eq!(queue_ids("delayed"), vec![a.delayed.clone()]);
    assert_eq!(queue_ids("dead"), vec![a.dead.clone()]);
    assert_eq!(queue_ids("kept"), vec![a.waiting.clone()]);
    assert_eq!(
        queue_ids("outcome").len(),
        3,
        "the outcomes of A's finished jobs"
    );
    for v in parsed.iter().filter(|v| v.get("queue").is_some()) {
        if v["queue"] != "kept" {
            assert_eq!(v["job"]["org"], ORG_A, "only A's queue state: {v}");
        }
    }
    assert!(
        parsed
            .iter()
            .filter(|v| v["queue"] == "waiting")
            .all(|v| v["job"]["payload"]
                .as_str()
                .is_some_and(|p| p.contains("later"))),
        "a job's payload is exported"
    );

    let summary = purge(&ctx, ORG_A, false);
    assert_eq!(summary["changed"], true);
    assert_eq!(summary["queue"]["waiting"], 1);
    assert_eq!(summary["queue"]["delayed"], 1);
    assert_eq!(summary["queue"]["dead"], 1);
    assert_eq!(summary["running"], 0);

    for t in &data_tables {
        assert!(
            rows_of(&ctx, t, ORG_A).await.is_empty(),
            "no row of A left in {t}"
        );
    }
    for t in LEDGER_SUMS {
        assert!(
            rows_of(&ctx, t, ORG_A).await.is_empty(),
            "no sum of A's spend left in {t}"
        );
    }
    assert!(
        !rows_of(&ctx, "aiq_spend_month", ORG_B).await.is_empty(),
        "B's sums stay"
    );
    assert_eq!(
        ctx.scalar_i64("SELECT count(*) FROM ai_cost_alerts WHERE organization_id IS NULL")
            .await,
        1,
        "the platform's alert stays"
    );
    // Nothing of A in Redis but this day's and month's spend counters, which expire when
    // their window resets.
    for k in keys(&ctx).await {
        let t: String = redis::cmd("TYPE")
            .arg(&k)
            .query_async(&mut conn)
            .await
            .unwrap();
        if t == "hash" {
            let org: Option<String> = conn.hget(&k, "org").await.unwrap();
            assert_ne!(org.as_deref(), Some(ORG_A), "{k} is a hash of A");
        }
        if t == "zset" || t == "list" {
            let members: Vec<String> = if t == "zset" {
                conn.zrange(&k, 0, -1).await.unwrap()
            } else {
                conn.lrange(&k, 0, -1).await.unwrap()
            };
            for id in [&a.waiting, &a.delayed, &a.dead] {
                assert!(!members.contains(id), "{k} still holds {id}");
            }
            assert!(!members.iter().any(|m| m == ORG_A), "{k} still names A");
        }
        if k.contains(ORG_A) {
            assert!(k.contains(":spend:org:"), "{k} is left");
            let ttl: i64 = conn.pttl(&k).await.unwrap();
            assert!(
                (1..=32 * 86_400_000).contains(&ttl),
                "{k} expires at its window's reset, not {ttl} ms"
            );
        }
    }
    let exists: bool = conn.exists(&old_key).await.unwrap();
    assert!(!exists, "a past window's counter of A is deleted");
    let stats = ctx.queue.stats().await.unwrap();
    assert_eq!(
        stats.waiting["growth_team"], 2,
        "B's and C's waiting jobs count"
    );
    assert_eq!((stats.delayed, stats.dead), (2, 2));

    // B and C: the same rows and queue state as before, and the same counters.
    assert_eq!(export(&ctx, ORG_B, &dir.path().join("b1.jsonl")), before_b);
    assert_eq!(export(&ctx, ORG_C, &dir.path().join("c1.jsonl")), before_c);
    assert_eq!(spend_of(&ctx, ORG_B).await, spend_b);

    // A second purge changes nothing and says so.
    let again = purge(&ctx, ORG_A, false);
    assert_eq!(again["changed"], false, "{again}");
    assert_eq!(again["rows"], serde_json::json!({}));
    assert_eq!(again["queue"], serde_json::json!({}));
    let (code, out, _) = aiq(&ctx, &["org", "purge", ORG_A, "--by", ACTOR]);
    assert_eq!(code, 0);
    assert!(out.contains("nothing to purge"), "{out}");
    assert_eq!(export(&ctx, ORG_B, &dir.path().join("b2.jsonl")), before_b);

    // The audit log: who ran each action, its start and its end with the counts.
    let audit: Vec<(String, String, Value)> = sqlx::query_as(
        "SELECT actor, action, details FROM aiq_audit_log WHERE organization_id = $1 ORDER BY id",
    )
    .bind(ORG_A.parse::<uuid::Uuid>().unwrap())
    .fetch_all(ctx.store.pool())
    .await
    .unwrap();
    let actions: Vec<&str> = audit.iter().map(|(_, a, _)| a.as_str()).collect();
    assert_eq!(
        actions,
        [
            "org.export.start",
            "org.export.end",
            "org.purge.start",
            "org.purge.end",
            "org.purge.start",
            "org.purge.end",
            "org.purge.start",
            "org.purge.end",
        ]
    );
    assert!(audit.iter().all(|(actor, ..)| actor == ACTOR));
    assert_eq!(
        audit[3].2["queue"]["waiting"], 1,
        "the end records the counts"
    );
    assert_eq!(audit[1].2["rows"]["ai_processing_results"], 3);
}

#[tokio::test]
async fn a_purge_with_keep_ledger_keeps_only_the_organisations_cost_rows() {
    let ctx = TestCtx::new().await;
    seed(&ctx, &[ORG_A, ORG_B]).await;
    let costs = rows_of(&ctx, "ai_cost_tracking", ORG_A).await;
    assert!(!costs.is_empty());
    let summary = purge(&ctx, ORG_A, true);
    assert_eq!(summary["kept_ledger"], true);
    assert!(summary["rows"].get("ai_cost_tracking").is_none());
    assert_eq!(rows_of(&ctx, "ai_cost_tracking", ORG_A).await, costs);
    for t in org_columns(&ctx).await {
        if t != "ai_cost_tracking"
            && !NOT_ORG_DATA.contains(&t.as_str())
            && !LEDGER_SUMS.contains(&t.as_str())
        {
            assert!(
                rows_of(&ctx, &t, ORG_A).await.is_empty(),
                "no row of A in {t}"
            );
        }
    }
    assert!(
        !rows_of(&ctx, "ai_processing_results", ORG_B)
            .await
            .is_empty()
    );
    assert_eq!(purge(&ctx, ORG_A, true)["changed"], false);
}

#[tokio::test]
async fn an_interrupted_export_goes_on_from_its_partial_file_to_the_complete_file() {
    let ctx = TestCtx::new().await;
    seed(&ctx, &[ORG_A, ORG_B]).await;
    let dir = tempfile::tempdir().unwrap();
    let whole = export(&ctx, ORG_A, &dir.path().join("whole.jsonl"));
    // Cut inside a table of several rows: after its first row, with half a line after it, as a
    // process killed during a write leaves it.
    let first_cost = whole
        .iter()
        .position(|l| l.starts_with(r#"{"table":"ai_cost_tracking""#))
        .unwrap();
    assert!(whole[first_cost + 1].starts_with(r#"{"table":"ai_cost_tracking""#));
    let out = dir.path().join("a.jsonl");
    let mut partial = whole[..=first_cost].join("\n");
    partial.push_str("\n{\"table\":\"ai_cost_tr");
    std::fs::write(aiq::org_data::partial_path(&out), partial).unwrap();
    let (code, stdout, err) = aiq(
        &ctx,
        &[
            "org",
            "export",
            ORG_A,
            "--out",
            out.to_str().unwrap(),
            "--by",
            ACTOR,
        ],
    );
    assert_eq!(code, 0, "{stdout} {err}");
    assert!(stdout.contains("(resumed)"), "{stdout}");
    let resumed: Vec<String> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(resumed, whole, "the resumed export is the complete file");
    // Once complete, running it again gives the same file.
    assert_eq!(export(&ctx, ORG_A, &out), whole);

    // A partial file of another organisation is refused, and left as it was.
    let b_out = dir.path().join("b.jsonl");
    std::fs::write(
        aiq::org_data::partial_path(&b_out),
        format!("{}\n", whole[0]),
    )
    .unwrap();
    let (code, _, err) = aiq(
        &ctx,
        &[
            "org",
            "export",
            ORG_B,
            "--out",
            b_out.to_str().unwrap(),
            "--by",
            ACTOR,
        ],
    );
    assert_eq!(code, 1);
    assert!(err.contains("not an export of organisation"), "{err}");
    assert_eq!(
        std::fs::read_to_string(aiq::org_data::partial_path(&b_out)).unwrap(),
        format!("{}\n", whole[0])
    );
}

#[tokio::test]
async fn a_malformed_organisation_or_actor_is_refused_and_changes_nothing() {
    let ctx = TestCtx::new().await;
    seed(&ctx, &[ORG_A]).await;
    let rows = rows_of(&ctx, "ai_processing_results", ORG_A).await;
    for (org, by) in [
        ("not-a-uuid", ACTOR),
        ("0B6F1B3E-2A55-4A6E-9A43-2F6F6F1B2C3D", ACTOR),
        ("0b6f1b3e2a554a6e9a432f6f6f1b2c3d", ACTOR),
        (ORG_A, ""),
        (ORG_A, "a\u{1b}[2Jb"),
    ] {
        let (code, _, err) = aiq(&ctx, &["org", "purge", org, "--by", by]);
        assert_eq!(code, 2, "{org} {by:?}: {err}");
        assert!(
            err.contains("lower-case UUID") || err.contains("--by"),
            "{org} {by:?}: {err}"
        );
    }
    let (code, _, err) = aiq(&ctx, &["org", "purge", ORG_A]);
    assert_eq!(code, 2, "--by is required: {err}");
    assert_eq!(rows_of(&ctx, "ai_processing_results", ORG_A).await, rows);
    assert_eq!(
        ctx.scalar_i64("SELECT count(*) FROM aiq_audit_log").await,
        0
    );
}
