//! The sums of spend the console reads (migration 20261203000016): whatever concurrent writers
//! insert, delete and update in ai_cost_tracking, and however the folds fall between them, the
//! sums per day, per month and the platform's, with the deltas not yet folded, equal the rows.

use sqlx::PgPool;

use crate::harness::TestCtx;

/// A small deterministic generator (xorshift64*): the same seed, the same moves.
struct Moves(u64);

impl Moves {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Four organisations and rows without one.
const ORGS: [Option<&str>; 5] = [
    Some("11111111-1111-4111-8111-111111111111"),
    Some("22222222-2222-4222-8222-222222222222"),
    Some("33333333-3333-4333-8333-333333333333"),
    Some("44444444-4444-4444-8444-444444444444"),
    None,
];
const PROVIDERS: [&str; 3] = ["openai", "anthropic", "google_vision"];

/// A billing date: today, yesterday, a day of last month, one of a year ago, or none.
fn date_sql(m: &mut Moves) -> &'static str {
    match m.below(5) {
        0 => "CURRENT_DATE",
        1 => "CURRENT_DATE - 1",
        2 => "(date_trunc('month', CURRENT_DATE)::date - 3)",
        3 => "CURRENT_DATE - 370",
        _ => "NULL::date",
    }
}

/// One writer's moves: inserts of 1-20 rows per statement, deletes and updates of 1-8 of its
/// own rows picked at random (rows of its own, so two writers never wait on each other's row
/// locks), each its own statement and transaction. `tag` starts the job ids of its rows.
async fn writer(pool: PgPool, seed: u64, moves: usize, tag: String) {
    let mut m = Moves(seed);
    for step in 0..moves {
        match m.below(10) {
            0..=5 => {
                let n = 1 + m.below(20) as usize;
                let mut values = Vec::new();
                for k in 0..n {
                    let org = ORGS[m.below(5) as usize]
                        .map(|o| format!("'{o}'::uuid"))
                        .unwrap_or_else(|| "NULL::uuid".into());
                    let cost = m.below(5_000_000);
                    values.push(format!(
                        "({org}, '{}', 'test', {cost}::numeric / 1000000, {}, '{tag}-{step}-{k}', 1)",
                        PROVIDERS[m.below(3) as usize],
                        date_sql(&mut m)
                    ));
                }
                let sql = format!(
                    "INSERT INTO ai_cost_tracking (organization_id, service_name, operation_type,
                         cost_usd, billing_date, job_id, attempt) VALUES {}",
                    values.join(", ")
                );
                sqlx::query(sqlx::AssertSqlSafe(sql))
                    .execute(&pool)
                    .await
                    .unwrap();
            }
            6 | 7 => {
                let n = 1 + m.below(8) as i64;
                sqlx::query(
                    "DELETE FROM ai_cost_tracking WHERE id IN
                       (SELECT id FROM ai_cost_tracking WHERE job_id LIKE $3
                        ORDER BY md5(id::text || $1) LIMIT $2)",
                )
                .bind(m.next().to_string())
                .bind(n)
                .bind(format!("{tag}-%"))
                .execute(&pool)
                .await
                .unwrap();
            }
            _ => {
                // A changed cost, provider, organisation or date (a hand correction).
                let set = match m.below(4) {
                    0 => format!("cost_usd = {}::numeric / 1000000", m.below(9_000_000)),
                    1 => format!("service_name = '{}'", PROVIDERS[m.below(3) as usize]),
                    2 => format!(
                        "organization_id = {}",
                        ORGS[m.below(5) as usize]
                            .map(|o| format!("'{o}'::uuid"))
                            .unwrap_or_else(|| "NULL".into())
                    ),
                    _ => format!("billing_date = {}", date_sql(&mut m)),
                };
                let sql = format!(
                    "UPDATE ai_cost_tracking SET {set} WHERE id IN
                       (SELECT id FROM ai_cost_tracking WHERE job_id LIKE $3
                        ORDER BY md5(id::text || $1) LIMIT $2)"
                );
                sqlx::query(sqlx::AssertSqlSafe(sql))
                    .bind(m.next().to_string())
                    .bind(1 + m.below(5) as i64)
                    .bind(format!("{tag}-%"))
                    .execute(&pool)
                    .await
                    .unwrap();
            }
        }
    }
}

type Sums = Vec<(String, i64, i64)>;

/// The sums computed from the cost rows, and as the tables (plus the deltas) hold them, each
/// as (key, micro-USD, calls) sorted by key: per day, per month, the platform's.
async fn both(pool: &PgPool) -> [(Sums, Sums); 3] {
    let read = |sql: &'static str| async move {
        sqlx::query_as::<_, (String, i64, i64)>(sql)
            .fetch_all(pool)
            .await
            .unwrap()
    };
    [
        (
            read(
                "SELECT concat_ws('/', billing_date, organization_id, service_name),
                        (sum(cost_usd) * 1000000)::bigint, count(*)
                 FROM ai_cost_tracking WHERE billing_date IS NOT NULL
                 GROUP BY billing_date, organization_id, service_name ORDER BY 1",
            )
            .await,
            read(
                "SELECT concat_ws('/', billing_date, organization_id, service_name),
                        sum(cost_micros)::bigint, sum(calls)::bigint
                 FROM (SELECT billing_date, organization_id, service_name, cost_micros, calls
                       FROM aiq_spend_day
                       UNION ALL
                       SELECT billing_date, organization_id, service_name, cost_micros, calls
                       FROM aiq_spend_delta) s
                 GROUP BY billing_date, organization_id, service_name
                 HAVING sum(calls) <> 0 ORDER BY 1",
            )
            .await,
        ),
        (
            read(
                "SELECT concat_ws('/', date_trunc('month', billing_date)::date, organization_id),
                        (sum(cost_usd) * 1000000)::bigint, count(*)
                 FROM ai_cost_tracking WHERE billing_date IS NOT NULL
                 GROUP BY date_trunc('month', billing_date)::date, organization_id ORDER BY 1",
            )
            .await,
            read(
                "SELECT concat_ws('/', month, organization_id), sum(cost_micros)::bigint,
                        sum(calls)::bigint
                 FROM (SELECT month, organization_id, cost_micros, calls FROM aiq_spend_month
                       UNION ALL
                       SELECT date_trunc('month', billing_date)::date, organization_id,
                              cost_micros, calls FROM aiq_spend_delta) s
                 GROUP BY month, organization_id HAVING sum(calls) <> 0 ORDER BY 1",
            )
            .await,
        ),
        (
            read(
                "SELECT concat_ws('/', billing_date, service_name),
                        (sum(cost_usd) * 1000000)::bigint, count(*)
                 FROM ai_cost_tracking WHERE billing_date IS NOT NULL
                 GROUP BY billing_date, service_name ORDER BY 1",
            )
            .await,
            read(
                "SELECT concat_ws('/', billing_date, service_name), sum(cost_micros)::bigint,
                        sum(calls)::bigint
                 FROM (SELECT billing_date, service_name, cost_micros, calls
                       FROM aiq_spend_platform
                       UNION ALL
                       SELECT billing_date, service_name, cost_micros, calls
                       FROM aiq_spend_delta) s
                 GROUP BY billing_date, service_name HAVING sum(calls) <> 0 ORDER BY 1",
            )
            .await,
        ),
    ]
}

fn assert_equal(sums: [(Sums, Sums); 3], when: &str) {
    for ((rows, kept), what) in sums.into_iter().zip(["day", "month", "platform"]) {
        assert!(!rows.is_empty(), "{when}: some {what} sums to compare");
        assert_eq!(kept, rows, "{when}: the {what} sums against the cost rows");
    }
}

#[tokio::test]
async fn the_sums_of_spend_equal_the_cost_rows_whatever_concurrent_writers_and_folds_do() {
    let ctx = TestCtx::new().await;
    let pool = ctx.store.pool().clone();
    let seeds = [
        0x9e37_79b9_7f4a_7c15_u64,
        0x00c0_ffee_d15e_a5e5,
        0x0123_4567_89ab_cdef,
    ];
    for (round, seed) in seeds.into_iter().enumerate() {
        // Four writers, and a fifth task folding between them until they are done.
        let writers: Vec<_> = (0..4)
            .map(|w| {
                let tag = format!("r{round}w{w}");
                tokio::spawn(writer(pool.clone(), seed ^ (w as u64 + 1), 150, tag))
            })
            .collect();
        let done = tokio_util::sync::CancellationToken::new();
        let folder = {
            let (store, done) = (ctx.store.clone(), done.clone());
            tokio::spawn(async move {
                let mut folds = 0u32;
                while !done.is_cancelled() {
                    store.fold_spend().await.unwrap();
                    folds += 1;
                    tokio::task::yield_now().await;
                }
                folds
            })
        };
        for w in writers {
            w.await.unwrap();
        }
        done.cancel();
        assert!(folder.await.unwrap() > 0, "the folder ran");
        // Before the last fold: the sums plus the deltas left.
        assert_equal(
            both(&pool).await,
            &format!("seed {seed:#x}, before the fold"),
        );
        ctx.store.fold_spend().await.unwrap();
        assert_eq!(
            ctx.scalar_i64("SELECT count(*) FROM aiq_spend_delta").await,
            0,
            "a fold takes every delta"
        );
        assert_equal(
            both(&pool).await,
            &format!("seed {seed:#x}, after the fold"),
        );
        for t in ["aiq_spend_day", "aiq_spend_month", "aiq_spend_platform"] {
            assert_eq!(
                ctx.scalar_i64(&format!("SELECT count(*) FROM {t} WHERE calls = 0"))
                    .await,
                0,
                "no empty sum is kept in {t}"
            );
        }
    }
    // Every row deleted: nothing is summed; rows again, then TRUNCATE: nothing either.
    sqlx::query("DELETE FROM ai_cost_tracking")
        .execute(&pool)
        .await
        .unwrap();
    ctx.store.fold_spend().await.unwrap();
    for t in ["aiq_spend_day", "aiq_spend_month", "aiq_spend_platform"] {
        let left = ctx.scalar_i64(&format!("SELECT count(*) FROM {t}")).await;
        assert_eq!(left, 0, "nothing summed in {t} once every row is gone");
    }
    writer(pool.clone(), 7, 20, "last".into()).await;
    sqlx::query("TRUNCATE ai_cost_tracking")
        .execute(&pool)
        .await
        .unwrap();
    ctx.store.fold_spend().await.unwrap();
    for t in [
        "aiq_spend_delta",
        "aiq_spend_day",
        "aiq_spend_month",
        "aiq_spend_platform",
    ] {
        let left = ctx.scalar_i64(&format!("SELECT count(*) FROM {t}")).await;
        assert_eq!(left, 0, "nothing summed in {t} after TRUNCATE");
    }
}
