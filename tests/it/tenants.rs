//! Row-level security by organisation (migrations 20261203000011 and 12,
//! `migrations/optional/supabase_rls.sql`): a reader sees its own organisation's rows and nothing
//! else, cannot write, and aiq's own role still writes and reads everything. The harness's
//! superuser bypasses row-level security, so aiq runs here as a login role of its own
//! (`OwnedDatabase`), and the readers are login roles granted `aiq_reader` or `authenticated`.

use std::time::Duration;

use aiq::domain::{JobKind, MicroUsd, Tier};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use uuid::Uuid;

use crate::harness::{
    ORG_A, ORG_B, OwnedDatabase, TestCtx, aiq_command, llm_payload, url_as, vision_payload,
};

/// Every table whose rows row-level security keys by organisation.
const TABLES: [&str; 6] = [
    "ai_processing_results",
    "ai_cost_tracking",
    "ai_usage",
    "ai_processing_errors",
    "ai_cost_alerts",
    "ai_corrections",
];

fn org(s: &str) -> Uuid {
    Uuid::parse_str(s).unwrap()
}

async fn pool(url: &str) -> PgPool {
    PgPoolOptions::new()
        .max_connections(2)
        .connect(url)
        .await
        .unwrap_or_else(|e| panic!("connecting to {url}: {e}"))
}

async fn exec(pool: &PgPool, sql: &str) {
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(sql.to_owned()))
        .fetch_one(pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// A new login role granted `group` (a cluster-wide name, so unique), and the URL of database
/// `admin_url`'s database as it.
async fn login_role_in(admin: &PgPool, admin_url: &str, group: &str) -> String {
    let role = format!("app_{}", Uuid::new_v4().simple());
    exec(
        admin,
        &format!("CREATE ROLE {role} LOGIN; GRANT {group} TO {role};"),
    )
    .await;
    url_as(admin_url, &role)
}

/// The SQLSTATE and message of the error `sql` ends with, run in one transaction after `set` (statements
/// that name the organisation, or "" for none); `None` when it succeeds.
async fn error_in_tx(pool: &PgPool, set: &str, sql: &str) -> Option<(String, String)> {
    let mut tx = pool.begin().await.unwrap();
    if !set.is_empty() {
        sqlx::raw_sql(sqlx::AssertSqlSafe(set.to_owned()))
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    let r = sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(&mut *tx)
        .await;
    tx.rollback().await.ok();
    match r {
        Ok(_) => None,
        Err(sqlx::Error::Database(d)) => Some((
            d.code().map(|c| c.into_owned()).unwrap_or_default(),
            d.message().to_owned(),
        )),
        Err(e) => panic!("{sql}: {e}"),
    }
}

/// (rows seen, rows seen of another organisation than A) in `table`, in one transaction after
/// `set`.
async fn seen(pool: &PgPool, set: &str, table: &str) -> (i64, i64) {
    let mut tx = pool.begin().await.unwrap();
    if !set.is_empty() {
        sqlx::raw_sql(sqlx::AssertSqlSafe(set.to_owned()))
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    let sql = format!(
        "SELECT count(*), count(*) FILTER (WHERE organization_id IS DISTINCT FROM '{ORG_A}')
         FROM {table}"
    );
    let r = sqlx::query_as::<_, (i64, i64)>(sqlx::AssertSqlSafe(sql))
        .fetch_one(&mut *tx)
        .await
        .unwrap_or_else(|e| panic!("reading {table}: {e}"));
    tx.commit().await.unwrap();
    r
}

/// The visibility test, for any reader: with `as_a` (statements naming organisation A for the
/// transaction) it sees exactly A's rows of every table, none of B's or the platform's; with
/// nothing set it sees no row; it can insert, update or delete nothing, and its tries change
/// nothing. `admin` (the superuser) counts what is there.
async fn assert_reader_sees_only_a(reader: &PgPool, admin: &PgPool, as_a: &str) {
    let platform = "SELECT count(*) FROM ai_cost_alerts WHERE organization_id IS NULL";
    assert!(
        count(admin, platform).await > 0,
        "the test needs a platform-wide alert"
    );
    for table in TABLES {
        let of = |o: &str| format!("SELECT count(*) FROM {table} WHERE organization_id = '{o}'");
        let (a, b) = (
            count(admin, &of(ORG_A)).await,
            count(admin, &of(ORG_B)).await,
        );
        let total = count(admin, &format!("SELECT count(*) FROM {table}")).await;
        assert!(
            a > 0 && b > 0,
            "{table}: the test needs rows of A ({a}) and B ({b})"
        );
        assert_eq!(
            seen(reader, as_a, table).await,
            (a, 0),
            "{table}: A's reader sees A's {a} rows, no other"
        );
        assert_eq!(
            seen(reader, "", table).await,
            (0, 0),
            "{table}: no setting, no row"
        );
        assert_eq!(
            seen(reader, "SET LOCAL aiq.organization_id = ''", table).await,
            (0, 0),
            "{table}: an empty setting, no row"
        );
        for write in [
            format!("INSERT INTO {table} (organization_id) VALUES ('{ORG_A}')"),
            format!("UPDATE {table} SET organization_id = organization_id"),
            format!("DELETE FROM {table}"),
        ] {
            let err = error_in_tx(reader, as_a, &write).await;
            assert_eq!(
                err.as_ref().map(|e| e.0.as_str()),
                Some("42501"),
                "{write}: refused for lack of privilege: {err:?}"
            );
        }
        assert_eq!(
            count(admin, &format!("SELECT count(*) FROM {table}")).await,
            total,
            "{table}: the refusals changed nothing"
        );
    }
}

/// Rows an app or aiq would have written, straight into every table: `n` of each for `o`.
async fn seed(admin: &PgPool, o: &str, n: i64) {
    seed_rows(admin, &format!("'{o}'::uuid"), n).await;
}

/// `n` rows in every table, row `i` (from 1) of the organisation the SQL expression `o` gives.
async fn seed_rows(admin: &PgPool, o: &str, n: i64) {
    exec(
        admin,
        &format!(
            "INSERT INTO ai_processing_results (organization_id, raw_response, job_id, job_kind)
               SELECT {o}, '{{}}', 'seed-' || i, 'llm.complete' FROM generate_series(1, {n}) i;
             INSERT INTO ai_cost_tracking (organization_id, service_name, operation_type, cost_usd,
                                           job_id, attempt)
               SELECT {o}, 'openai', 'llm.complete', 0.001, 'seed-' || i, 1
               FROM generate_series(1, {n}) i;
             INSERT INTO ai_usage (organization_id, model, endpoint, input_tokens, output_tokens,
                                   cost_usd, subscription_tier, job_id, attempt)
               SELECT {o}, 'gpt-4o-mini', 'chat', 10, 5, 0.001, 'trial', 'seed-' || i, 1
               FROM generate_series(1, {n}) i;
             INSERT INTO ai_processing_errors (organization_id, error_type, error_message, job_id)
               SELECT {o}, 'provider_unavailable', '503', 'seed-' || i
               FROM generate_series(1, {n}) i;
             INSERT INTO ai_cost_alerts (scope, organization_id, window_kind, window_start,
                                         threshold, spent_usd, message)
               SELECT 'org:' || {o}, {o}, 'day', 'seed-' || i, '80', 1, 'seeded'
               FROM generate_series(1, {n}) i;
             INSERT INTO ai_corrections (organization_id, correction_type)
               SELECT {o}, 'tag_added' FROM generate_series(1, {n}) i;"
        ),
    )
    .await;
}

async fn platform_alert(admin: &PgPool) {
    exec(
        admin,
        "INSERT INTO ai_cost_alerts (scope, window_kind, window_start, threshold, spent_usd, message)
         VALUES ('global', 'day', 'platform', '80', 800, 'the platform passed 80%')",
    )
    .await;
}

/// What A's calls cost, in micro-USD, as ai_cost_tracking holds it.
async fn a_spend(admin: &PgPool) -> i64 {
    count(
        admin,
        &format!(
            "SELECT (sum(cost_usd) * 1000000)::bigint FROM ai_cost_tracking
             WHERE organization_id = '{ORG_A}'"
        ),
    )
    .await
}

/// Runs `aiq` with the test's settings and `extra` ones; returns stdout, panicking on failure.
async fn aiq(ctx: &TestCtx, extra: &[(&str, &str)], args: &[&str]) -> String {
    let vars = ctx.vars.clone();
    let extra: Vec<(String, String)> = extra
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    let out = tokio::task::spawn_blocking(move || {
        aiq_command()
            .envs(&vars)
            .envs(extra)
            .args(&args)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "aiq: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aiq_as_its_own_role_writes_and_reads_every_row_and_a_reader_sees_only_its_organisation() {
    let owned = OwnedDatabase::create().await;
    let admin = pool(&owned.admin_url).await;
    // Every aiq connection carries a setting that is not a UUID: aiq's policies never read it.
    exec(
        &admin,
        &format!(
            "ALTER ROLE {} IN DATABASE {} SET aiq.organization_id = 'not-a-uuid'",
            owned.role, owned.db
        ),
    )
    .await;
    let ctx = TestCtx::with(&[("AIQ_DATABASE_URL", &owned.url)]).await;
    let superuser: bool =
        sqlx::query_scalar("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
            .fetch_one(ctx.store.pool())
            .await
            .unwrap();
    assert!(!superuser, "aiq must not run as a superuser here");
    let setting: Option<String> =
        sqlx::query_scalar("SELECT current_setting('aiq.organization_id', true)")
            .fetch_one(ctx.store.pool())
            .await
            .unwrap();
    assert_eq!(setting.as_deref(), Some("not-a-uuid"));
    // First the LLM jobs (usage rows, and a refused call's error row and failed result) and B's
    // Vision jobs.
    ctx.use_up_free_vision_units("LABEL_DETECTION").await;
    for o in [ORG_A, ORG_B] {
        for text in ["caption a cat", "[fake:status=400] refused"] {
            ctx.enqueue(
                JobKind::LlmComplete,
                Tier::Trial,
                o,
                &llm_payload(Tier::Trial, o, text),
                1,
            )
            .await;
        }
    }
    let vision = |o: &'static str, tier: Tier| {
        let ctx = &ctx;
        async move {
            ctx.enqueue(
                JobKind::VisionAnnotate,
                tier,
                o,
                &vision_payload(tier, o, 1),
                0,
            )
            .await
        }
    };
    for _ in 0..3 {
        vision(ORG_B, Tier::Trial).await;
    }
    ctx.run_until_settled().await;
    // Then A's day limit is set to fit three more one-image label jobs past the free tier
    // ($0.0015 each): their spend raises A's 80 and 95% alerts.
    let spent = a_spend(&admin).await;
    ctx.store
        .set_org_limits(
            org(ORG_A),
            Some(MicroUsd::from_micros(spent + 3 * 1_500)),
            None,
        )
        .await
        .unwrap();
    let mut vision_a = Vec::new();
    for _ in 0..3 {
        vision_a.push(vision(ORG_A, Tier::Enterprise).await);
    }
    let worker = ctx.start_worker();
    crate::harness::wait_until(
        Duration::from_secs(60),
        "A's jobs to settle and its 80 and 95% alerts",
        || async {
            let s = ctx.queue.stats().await.unwrap();
            s.waiting.values().sum::<u64>() == 0
                && s.inflight == 0
                && s.delayed == 0
                && count(&admin, "SELECT count(*) FROM ai_cost_alerts").await >= 2
        },
    )
    .await;
    worker.stop().await;

    // aiq wrote every kind of row, for both organisations (the alerts are A's)...
    let by_org = |table: &str, o: &str| {
        format!("SELECT count(*) FROM {table} WHERE organization_id = '{o}'")
    };
    for (table, a, b) in [
        ("ai_processing_results", 5, 5),
        ("ai_cost_tracking", 5, 5),
        ("ai_usage", 1, 1),
        ("ai_processing_errors", 1, 1),
        ("ai_cost_alerts", 2, 0),
    ] {
        assert_eq!(
            (
                count(&admin, &by_org(table, ORG_A)).await,
                count(&admin, &by_org(table, ORG_B)).await
            ),
            (a, b),
            "{table}"
        );
    }
    // ...through a policy of its own: the tables are forced, so owning them is not enough.
    let tables: Vec<String> = TABLES.iter().map(|t| (*t).to_owned()).collect();
    let security: Vec<(String, bool, bool, Vec<String>)> = sqlx::query_as(
        "SELECT c.relname::text, c.relrowsecurity, c.relforcerowsecurity,
                ARRAY(SELECT r::regrole::text FROM pg_policy p, unnest(p.polroles) r
                      WHERE p.polrelid = c.oid AND p.polname = 'aiq_own')
         FROM pg_class c WHERE c.relname = ANY($1) AND c.relkind = 'r' ORDER BY 1",
    )
    .bind(&tables)
    .fetch_all(&admin)
    .await
    .unwrap();
    assert_eq!(security.len(), TABLES.len());
    for (table, enabled, forced, roles) in security {
        assert!(
            enabled && forced,
            "{table}: row-level security enabled and forced"
        );
        assert_eq!(
            roles,
            vec![owned.role.clone()],
            "{table}: aiq_own is aiq's role's"
        );
    }
    // It reads every row back through its own policy: the reports, the ledger rebuild,
    // `aiq costs` and `aiq job show` run as it.
    for table in TABLES.iter().filter(|t| **t != "ai_corrections") {
        let all = format!("SELECT count(*) FROM {table}");
        assert_eq!(
            count(ctx.store.pool(), &all).await,
            count(&admin, &all).await,
            "aiq's role sees every row of {table}"
        );
    }
    let a_spend = a_spend(&admin).await;
    assert!(a_spend > 3 * 1_500, "A's vision and LLM spend: {a_spend}");
    let analysis = ctx.store.cost_analysis(org(ORG_A), 30).await.unwrap();
    assert_eq!(
        analysis.iter().map(|r| r.total_cost.micros()).sum::<i64>(),
        a_spend
    );
    let costs: serde_json::Value = serde_json::from_str(
        &aiq(
            &ctx,
            &[],
            &["costs", "--org", ORG_A, "--days", "30", "--json"],
        )
        .await,
    )
    .unwrap();
    let from_costs: i64 = costs["spend"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["cost"].as_i64().unwrap())
        .sum();
    assert_eq!(from_costs, a_spend, "{costs}");
    // A queue prefix Redis knows nothing of: the job's status comes from its result row alone.
    let shown: serde_json::Value = serde_json::from_str(
        &aiq(
            &ctx,
            &[(
                "AIQ_QUEUE_PREFIX",
                &format!("gone{}", Uuid::new_v4().simple()),
            )],
            &["job", "show", &vision_a[0], "--json"],
        )
        .await,
    )
    .unwrap();
    assert_eq!(shown["state"], "succeeded", "{shown}");
    assert_eq!(shown["organization_id"], ORG_A, "{shown}");
    let cost: f64 = shown["result"]["cost_usd"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!((cost * 1e6).round() as i64, 1_500, "{shown}");
    let summary = ctx
        .store
        .result_summary(org(ORG_A), &vision_a[1])
        .await
        .unwrap()
        .expect("the read-back before a call finds the row");
    assert_eq!(summary.status, "completed");

    // An app writes corrections through aiq's role; the platform and B have alerts too.
    for (o, n) in [(ORG_A, 2), (ORG_B, 1)] {
        for _ in 0..n {
            sqlx::query(
                "INSERT INTO ai_corrections (organization_id, correction_type) VALUES ($1, 'tag_removed')",
            )
            .bind(org(o))
            .execute(ctx.store.pool())
            .await
            .unwrap();
        }
    }
    platform_alert(&admin).await;
    exec(
        &admin,
        &format!(
            "INSERT INTO ai_cost_alerts (scope, organization_id, window_kind, window_start,
                                         threshold, spent_usd, message)
             VALUES ('org:{ORG_B}', '{ORG_B}', 'month', 'b', '80', 1, 'B passed 80%')"
        ),
    )
    .await;

    let reader = pool(&login_role_in(&admin, &owned.admin_url, "aiq_reader").await).await;
    let as_a = format!("SET LOCAL aiq.organization_id = '{ORG_A}'");
    assert_reader_sees_only_a(&reader, &admin, &as_a).await;

    // The plan's cost analysis runs as its caller: A's figures for A, nothing of B's.
    let mut tx = reader.begin().await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(as_a.clone()))
        .execute(&mut *tx)
        .await
        .unwrap();
    for (o, want) in [(ORG_A, a_spend), (ORG_B, 0)] {
        let got: i64 = sqlx::query_scalar(
            "SELECT coalesce((sum(total_cost) * 1000000)::bigint, 0) FROM get_cost_analysis($1, 30)",
        )
        .bind(org(o))
        .fetch_one(&mut *tx)
        .await
        .unwrap();
        assert_eq!(got, want, "get_cost_analysis({o}) as A's reader");
    }
    // So does the accuracy function: A's 4 completed results (the refused call's failed) and
    // 2 corrections; nothing of B's.
    for (o, want) in [(ORG_A, (4, 2)), (ORG_B, (0, 0))] {
        let got: (i64, i64) = sqlx::query_as(
            "SELECT results_completed, total_corrections
             FROM get_ai_accuracy_metrics($1)",
        )
        .bind(org(o))
        .fetch_one(&mut *tx)
        .await
        .unwrap();
        assert_eq!(got, want, "get_ai_accuracy_metrics({o}) as A's reader");
    }
    tx.rollback().await.unwrap();

    // A setting that is not a UUID is an error for the reader, never a match.
    for table in TABLES {
        let err = error_in_tx(
            &reader,
            "SET LOCAL aiq.organization_id = 'not-a-uuid'",
            &format!("SELECT * FROM {table}"),
        )
        .await
        .unwrap_or_else(|| panic!("{table}: a malformed setting must not read"));
        assert_eq!(err.0, "22P02", "{table}: {err:?}");
        assert!(
            err.1.contains("invalid input syntax for type uuid"),
            "{err:?}"
        );
    }
}

/// Supabase's pieces, stood in for, then `migrations/optional/supabase_rls.sql` installed;
/// returns the user of organisation A (`SET LOCAL request.jwt.claim.sub` names a user).
async fn install_supabase_variant(admin: &PgPool) -> Uuid {
    // Supabase's pieces, stood in for: the `authenticated` role (the cluster's: created once),
    // auth.uid() from the request's JWT claim, and the app's users table.
    let (user_a, user_b) = (Uuid::new_v4(), Uuid::new_v4());
    exec(
        admin,
        &format!(
            "DO $$ BEGIN CREATE ROLE authenticated NOLOGIN;
             EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$;
             CREATE SCHEMA auth;
             CREATE FUNCTION auth.uid() RETURNS uuid LANGUAGE sql STABLE
               AS $f$ SELECT NULLIF(current_setting('request.jwt.claim.sub', true), '')::uuid $f$;
             GRANT USAGE ON SCHEMA auth TO authenticated;
             CREATE TABLE public.users (id UUID PRIMARY KEY, organization_id UUID);
             GRANT SELECT ON public.users TO authenticated;
             INSERT INTO public.users VALUES ('{user_a}', '{ORG_A}'), ('{user_b}', '{ORG_B}');"
        ),
    )
    .await;
    let file = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/migrations/optional/supabase_rls.sql"
    );
    let sql = std::fs::read_to_string(file).unwrap();
    // Installed twice: an operator may run it again.
    for _ in 0..2 {
        exec(admin, &sql).await;
    }
    user_a
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_supabase_variant_shows_a_signed_in_user_only_its_organisations_rows() {
    let ctx = TestCtx::new().await;
    let admin_url = ctx.vars["AIQ_DATABASE_URL"].clone();
    let admin = ctx.store.pool().clone();
    seed(&admin, ORG_A, 3).await;
    seed(&admin, ORG_B, 2).await;
    platform_alert(&admin).await;
    let user_a = install_supabase_variant(&admin).await;
    let reader = pool(&login_role_in(&admin, &admin_url, "authenticated").await).await;
    let as_a = format!("SET LOCAL request.jwt.claim.sub = '{user_a}'");
    assert_reader_sees_only_a(&reader, &admin, &as_a).await;
    // A user without a users row sees nothing.
    let stranger = format!("SET LOCAL request.jwt.claim.sub = '{}'", Uuid::new_v4());
    for table in TABLES {
        assert_eq!(seen(&reader, &stranger, table).await, (0, 0), "{table}");
    }
    // aiq_reader's setting does not open anything to `authenticated`.
    for table in TABLES {
        assert_eq!(
            seen(
                &reader,
                &format!("SET LOCAL aiq.organization_id = '{ORG_A}'"),
                table
            )
            .await,
            (0, 0),
            "{table}"
        );
    }
    // The aiq_reader policies still hold beside it.
    let aiq_reader = pool(&login_role_in(&admin, &admin_url, "aiq_reader").await).await;
    assert_reader_sees_only_a(
        &aiq_reader,
        &admin,
        &format!("SET LOCAL aiq.organization_id = '{ORG_A}'"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_readers_query_uses_an_index_leading_with_organization_id_in_every_table_in_both_variants()
 {
    let ctx = TestCtx::new().await;
    let admin_url = ctx.vars["AIQ_DATABASE_URL"].clone();
    let admin = ctx.store.pool().clone();
    // A's 20 rows among 20,000 of 200 other organisations.
    seed(&admin, ORG_A, 20).await;
    seed_rows(
        &admin,
        "('00000000-0000-4000-8000-' || lpad(to_hex(i % 200), 12, '0'))::uuid",
        20_000,
    )
    .await;
    let user_a = install_supabase_variant(&admin).await;
    exec(&admin, "ANALYZE").await;
    let readers = [
        (
            pool(&login_role_in(&admin, &admin_url, "aiq_reader").await).await,
            format!("SET LOCAL aiq.organization_id = '{ORG_A}'"),
        ),
        (
            pool(&login_role_in(&admin, &admin_url, "authenticated").await).await,
            format!("SET LOCAL request.jwt.claim.sub = '{user_a}'"),
        ),
    ];
    for ((reader, as_a), table) in readers
        .iter()
        .flat_map(|r| TABLES.iter().map(move |t| (r, *t)))
    {
        let mut tx = reader.begin().await.unwrap();
        sqlx::raw_sql(sqlx::AssertSqlSafe(as_a.clone()))
            .execute(&mut *tx)
            .await
            .unwrap();
        let plan: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "EXPLAIN SELECT * FROM {table}"
        )))
        .fetch_all(&mut *tx)
        .await
        .unwrap();
        tx.rollback().await.unwrap();
        let plan = plan.join("\n");
        println!("{table}, after {as_a}:\n{plan}");
        // The indexes of the table whose first column is organization_id.
        let indexes: Vec<String> = sqlx::query_scalar(
            "SELECT i.relname::text FROM pg_index x
             JOIN pg_class i ON i.oid = x.indexrelid
             JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = x.indkey[0]
             WHERE x.indrelid = $1::regclass AND a.attname = 'organization_id'",
        )
        .bind(table)
        .fetch_all(&admin)
        .await
        .unwrap();
        assert!(
            !plan.contains(&format!("Seq Scan on {table} "))
                && indexes.iter().any(|i| plan.contains(&format!("{i} "))),
            "{table}: the policy's filter uses one of {indexes:?}:\n{plan}"
        );
    }
}

/// One correction of `o`, `days_ago` days old.
async fn correction(admin: &PgPool, o: &str, kind: &str, confidence: Option<f64>, days_ago: i32) {
    sqlx::query(
        "INSERT INTO ai_corrections (organization_id, user_id, correction_type, original_value,
                                     corrected_value, ai_confidence, user_confidence, created_at)
         VALUES ($1, $2, $3, '{\"tags\": [\"cat\"]}', '{\"tags\": [\"dog\"]}', $4, 'high',
                 now() - make_interval(days => $5))",
    )
    .bind(org(o))
    .bind(Uuid::new_v4())
    .bind(kind)
    .bind(confidence)
    .bind(days_ago)
    .execute(admin)
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_ai_accuracy_metrics_returns_the_hand_computed_figures_of_an_organisations_corrections()
{
    let ctx = TestCtx::new().await;
    let db = ctx.store.pool().clone();
    // A: 8 completed answers and 1 failed in the window, 1 completed 40 days ago.
    exec(
        &db,
        &format!(
            "INSERT INTO ai_processing_results (organization_id, raw_response, job_id, job_kind, status, created_at)
               SELECT '{ORG_A}', '{{}}', 'a-' || i, 'vision.annotate',
                      CASE WHEN i = 9 THEN 'failed' ELSE 'completed' END,
                      now() - CASE WHEN i = 10 THEN interval '40 days' ELSE interval '1 hour' END
               FROM generate_series(1, 10) i;
             INSERT INTO ai_processing_results (organization_id, raw_response, job_id, job_kind)
               SELECT '{ORG_B}', '{{}}', 'b-' || i, 'vision.annotate' FROM generate_series(1, 5) i;"
        ),
    )
    .await;
    // A, in the last 30 days: 3 accepted (0.90, 0.80, 0.70), 1 rejected (0.40), 1 tag added
    // (no confidence), 1 description edited (0.55). Outside it or another organisation's: not
    // counted.
    for (kind, c) in [
        ("suggestion_accepted", Some(0.90)),
        ("suggestion_accepted", Some(0.80)),
        ("suggestion_accepted", Some(0.70)),
        ("suggestion_rejected", Some(0.40)),
        ("tag_added", None),
        ("description_edited", Some(0.55)),
    ] {
        correction(&db, ORG_A, kind, c, 2).await;
    }
    correction(&db, ORG_A, "suggestion_rejected", Some(0.99), 31).await;
    correction(&db, ORG_B, "suggestion_rejected", Some(0.10), 1).await;

    type Row = (
        i64,
        i64,
        i64,
        i64,
        Option<String>,
        Option<String>,
        Option<String>,
        Option<String>,
        serde_json::Value,
    );
    let metrics = |o: &'static str, days: i32| {
        let db = db.clone();
        async move {
            sqlx::query_as::<_, Row>(
                "SELECT results_completed, total_corrections, suggestions_accepted,
                        suggestions_rejected, acceptance_rate::text, corrections_per_result::text,
                        avg_confidence_accepted::text, avg_confidence_rejected::text,
                        corrections_by_type
                 FROM get_ai_accuracy_metrics($1, $2)",
            )
            .bind(org(o))
            .bind(days)
            .fetch_one(&db)
            .await
            .unwrap()
        }
    };
    let s = |v: &str| Some(v.to_owned());
    assert_eq!(
        metrics(ORG_A, 30).await,
        (
            8,
            6,
            3,
            1,
            s("0.7500"), // 3 / (3 + 1)
            s("0.7500"), // 6 / 8
            s("0.8000"), // (0.90 + 0.80 + 0.70) / 3
            s("0.4000"),
            serde_json::json!({
                "suggestion_accepted": 3, "suggestion_rejected": 1,
                "tag_added": 1, "description_edited": 1
            }),
        )
    );
    // The default window is 30 days; 60 takes in the older answer and rejection.
    let default: (i64, i64) = sqlx::query_as(
        "SELECT results_completed, total_corrections FROM get_ai_accuracy_metrics($1)",
    )
    .bind(org(ORG_A))
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(default, (8, 6));
    let wide = metrics(ORG_A, 60).await;
    assert_eq!((wide.0, wide.1, wide.3), (9, 7, 2));
    assert_eq!(wide.4, s("0.6000"), "3 / (3 + 2)");
    assert_eq!(wide.7, s("0.6950"), "(0.40 + 0.99) / 2");
    // No corrections and no answers: zero counts, no ratios.
    let none = metrics("5e0c2a0a-1b2c-4d5e-8f90-a1b2c3d4e5f6", 30).await;
    assert_eq!(
        none,
        (0, 0, 0, 0, None, None, None, None, serde_json::json!({}))
    );
    // A negative or missing window is a clear error.
    for days in ["-1", "NULL"] {
        let err = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT * FROM get_ai_accuracy_metrics('{ORG_A}', {days})"
        )))
        .fetch_all(&db)
        .await
        .unwrap_err()
        .to_string();
        assert!(err.contains("p_days must be 0 or more"), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migrating_role_that_may_not_create_aiq_reader_is_told_what_to_run_and_changes_nothing() {
    // A server of the test's own: on the shared one another test's migrations made aiq_reader.
    let pg = aiq_testkit::localsvc::LocalPostgres::start("no-createrole")
        .expect("a PostgreSQL of this test's own");
    let admin = pool(&pg.url("postgres")).await;
    for sql in [
        "CREATE ROLE aiq_plain LOGIN",
        "CREATE DATABASE plain OWNER aiq_plain",
    ] {
        exec(&admin, sql).await;
    }
    let url = url_as(&pg.url("plain"), "aiq_plain");
    let migrate = || {
        let url = url.clone();
        tokio::task::spawn_blocking(move || {
            aiq_command()
                .env("AIQ_DATABASE_URL", url)
                .arg("migrate")
                .output()
                .unwrap()
        })
    };
    let out = migrate().await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("the role aiq_reader does not exist and aiq_plain may not create it")
            && stderr.contains("run CREATE ROLE aiq_reader NOLOGIN, then aiq migrate again"),
        "{stderr}"
    );
    // The refused migration left nothing: no role, no row-level security, not recorded.
    let db = pool(&pg.url("plain")).await;
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM pg_roles WHERE rolname = 'aiq_reader'"
        )
        .await,
        0
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM pg_class WHERE relrowsecurity AND relname LIKE 'ai\\_%'"
        )
        .await,
        0
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM _sqlx_migrations WHERE version = 20261203000012"
        )
        .await,
        0
    );
    // Once an operator made the role, the same command finishes the work.
    exec(&admin, "CREATE ROLE aiq_reader NOLOGIN").await;
    let out = migrate().await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM pg_class WHERE relrowsecurity AND relforcerowsecurity
             AND relkind = 'r' AND relname LIKE 'ai\\_%'"
        )
        .await,
        TABLES.len() as i64
    );
}
