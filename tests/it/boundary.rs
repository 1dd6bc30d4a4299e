//! What an app, a buggy app or an attacker with a Redis client can put into the queue: ids that
//! must never repeat, arguments enqueue.lua must refuse without writing anything, and bytes that
//! must not stall anyone else's jobs.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use aiq::domain::{JobKind, OrganizationId, Tier};
use aiq::queue::{ENQUEUE_LUA, NewJob};
use redis::AsyncCommands;

use crate::harness::{LlmJob, ORG_A, ORG_B, TestCtx, llm_payload, wait_for, wait_until};

fn own_job(org: &str, id: &str) -> NewJob {
    NewJob {
        kind: JobKind::LlmComplete,
        tier: Tier::Enterprise,
        organization_id: OrganizationId::parse(org).unwrap(),
        payload: llm_payload(Tier::Enterprise, org, &format!("for {org}")),
        job_id: Some(id.into()),
        delay: Duration::ZERO,
        idempotency_key: None,
        max_attempts: 0,
    }
}

/// Every key of the test's queue with its serialized value: equal snapshots mean nothing changed.
pub async fn snapshot(ctx: &TestCtx) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let mut conn = ctx.redis().await;
    let pattern = format!("{}*", ctx.key(""));
    let mut keys: Vec<Vec<u8>> = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, batch): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await
            .unwrap();
        keys.extend(batch);
        if next == 0 {
            break;
        }
        cursor = next;
    }
    let mut out = BTreeMap::new();
    for k in keys {
        let v: Option<Vec<u8>> = redis::cmd("DUMP")
            .arg(&k)
            .query_async(&mut conn)
            .await
            .unwrap();
        if let Some(v) = v {
            out.insert(k, v);
        }
    }
    out
}

/// Redis losing the queue's data (a restart without persistence), for this test's keys only: the
/// shared server serves other tests at the same time.
async fn forget_the_queue(ctx: &TestCtx) {
    let keys: Vec<Vec<u8>> = snapshot(ctx).await.into_keys().collect();
    let mut conn = ctx.redis().await;
    for k in keys {
        let _: () = conn.del(k).await.unwrap();
    }
}

/// enqueue.lua with raw byte arguments, as any client could call it.
async fn enqueue_raw(ctx: &TestCtx, args: &[&[u8]]) -> redis::RedisResult<Vec<String>> {
    let mut conn = ctx.redis().await;
    let script = redis::Script::new(ENQUEUE_LUA);
    let mut inv = script.key(ctx.key("").trim_end_matches(':'));
    for a in args {
        inv.arg(*a);
    }
    inv.invoke_async(&mut conn).await
}

async fn run_until_settled(ctx: &TestCtx) {
    let worker = ctx.start_worker();
    ctx.wait_settled(Duration::from_secs(30)).await;
    worker.stop().await;
}

#[tokio::test]
async fn queue_ids_never_repeat_after_redis_loses_its_data_and_each_job_keeps_its_own_row() {
    let ctx = TestCtx::new().await;
    let mut first = Vec::new();
    for i in 0..5 {
        let p = llm_payload(Tier::Trial, ORG_A, &format!("a{i}"));
        first.push(
            ctx.enqueue(JobKind::LlmComplete, Tier::Trial, ORG_A, &p, 0)
                .await,
        );
    }
    run_until_settled(&ctx).await;
    forget_the_queue(&ctx).await;
    let mut second = Vec::new();
    for i in 0..5 {
        let p = llm_payload(Tier::Trial, ORG_B, &format!("b{i}"));
        second.push(
            ctx.enqueue(JobKind::LlmComplete, Tier::Trial, ORG_B, &p, 0)
                .await,
        );
    }
    let all: HashSet<&String> = first.iter().chain(&second).collect();
    assert_eq!(all.len(), 10, "ids repeated: {first:?} then {second:?}");
    run_until_settled(&ctx).await;
    for (org, ids) in [(ORG_A, &first), (ORG_B, &second)] {
        for id in ids {
            let rows: Vec<(String, String)> = sqlx::query_as(
                "SELECT organization_id::text, status FROM ai_processing_results WHERE job_id = $1",
            )
            .bind(id)
            .fetch_all(ctx.store.pool())
            .await
            .unwrap();
            assert_eq!(
                rows,
                [(org.to_owned(), "completed".to_owned())],
                "job {id} has exactly its own organisation's row"
            );
            let calls = ctx
                .scalar_i64(&format!(
                    "SELECT count(*) FROM ai_cost_tracking WHERE job_id = '{id}' AND organization_id = '{org}'"
                ))
                .await;
            assert_eq!(calls, 1, "job {id} has its own cost row");
        }
    }
    assert_eq!(ctx.fake_calls().await["openai"], 10);
}

#[tokio::test]
async fn a_finished_jobs_id_enqueued_again_makes_no_call_and_writes_nothing() {
    let ctx = TestCtx::new().await;
    assert!(
        !ctx.queue
            .enqueue(&own_job(ORG_A, "shared-1"))
            .await
            .unwrap()
            .duplicate
    );
    run_until_settled(&ctx).await;
    assert_eq!(ctx.fake_calls().await["openai"], 1);
    let before = snapshot(&ctx).await;
    // While Redis remembers the id: a duplicate for its organisation and for any other.
    for org in [ORG_A, ORG_B] {
        let again = ctx.queue.enqueue(&own_job(org, "shared-1")).await.unwrap();
        assert!(again.duplicate, "{org}: a finished id is a duplicate");
        assert_eq!(again.job_id, "shared-1");
    }
    assert_eq!(snapshot(&ctx).await, before, "a duplicate writes nothing");

    // Redis forgot everything: the worker finds the organisation's result row and acknowledges
    // the job without a call.
    forget_the_queue(&ctx).await;
    assert!(
        !ctx.queue
            .enqueue(&own_job(ORG_A, "shared-1"))
            .await
            .unwrap()
            .duplicate
    );
    run_until_settled(&ctx).await;
    assert_eq!(ctx.fake_calls().await["openai"], 1, "no second paid call");
    let stats = ctx.queue.stats().await.unwrap();
    assert_eq!(stats.counters.get("done").copied(), Some(1));
    assert_eq!(
        ctx.scalar_i64("SELECT count(*) FROM ai_cost_tracking")
            .await,
        1
    );
    assert_eq!(
        ctx.scalar_i64("SELECT count(*) FROM ai_processing_results")
            .await,
        1
    );

    // Another organisation's job with the same id is its own job: it runs and gets its own row,
    // and the first organisation's row is untouched.
    let a_row = || async {
        sqlx::query_scalar::<_, String>(
            "SELECT raw_response::text FROM ai_processing_results
             WHERE job_id = 'shared-1' AND organization_id = $1::uuid",
        )
        .bind(ORG_A)
        .fetch_one(ctx.store.pool())
        .await
        .unwrap()
    };
    let a_before = a_row().await;
    forget_the_queue(&ctx).await;
    ctx.queue
        .enqueue(&own_job(ORG_B, "shared-1"))
        .await
        .unwrap();
    run_until_settled(&ctx).await;
    assert_eq!(ctx.fake_calls().await["openai"], 2);
    let orgs: Vec<String> = sqlx::query_scalar(
        "SELECT organization_id::text FROM ai_processing_results WHERE job_id = 'shared-1'
         ORDER BY organization_id",
    )
    .fetch_all(ctx.store.pool())
    .await
    .unwrap();
    let mut want = vec![ORG_A.to_owned(), ORG_B.to_owned()];
    want.sort();
    assert_eq!(orgs, want);
    assert_eq!(a_row().await, a_before);
    let b_calls = ctx
        .scalar_i64(&format!(
            "SELECT count(*) FROM ai_cost_tracking WHERE organization_id = '{ORG_B}'"
        ))
        .await;
    assert_eq!(b_calls, 1);
}

#[tokio::test]
async fn an_app_id_cannot_take_the_queues_own_id_form() {
    let ctx = TestCtx::new().await;
    let auto = ctx
        .enqueue(
            JobKind::LlmComplete,
            Tier::Trial,
            ORG_A,
            &llm_payload(Tier::Trial, ORG_A, "x"),
            0,
        )
        .await;
    assert!(auto.starts_with("j-"), "{auto}");
    let before = snapshot(&ctx).await;
    let err = ctx.queue.enqueue(&own_job(ORG_A, &auto)).await.unwrap_err();
    assert!(
        err.to_string().contains("job_id must not start with j-"),
        "{err}"
    );
    assert_eq!(snapshot(&ctx).await, before);
}

#[tokio::test]
async fn idempotency_keys_belong_to_their_organisation() {
    let ctx = TestCtx::new().await;
    let mut a = own_job(ORG_A, "a-1");
    a.idempotency_key = Some("caption-42".into());
    let mut b = own_job(ORG_B, "b-1");
    b.idempotency_key = Some("caption-42".into());
    let first = ctx.queue.enqueue(&a).await.unwrap();
    let other = ctx.queue.enqueue(&b).await.unwrap();
    assert!(!first.duplicate && !other.duplicate);
    assert_eq!(
        other.job_id, "b-1",
        "another organisation's key never answers"
    );
    a.job_id = Some("a-2".into());
    let again = ctx.queue.enqueue(&a).await.unwrap();
    assert!(again.duplicate);
    assert_eq!(again.job_id, "a-1");
}

#[tokio::test]
async fn enqueue_refuses_what_it_must_naming_the_argument_and_changes_nothing() {
    let ctx = TestCtx::new().await;
    // Some state to keep: a waiting job, a delayed job, an idempotency key, the id counter.
    ctx.enqueue(
        JobKind::LlmComplete,
        Tier::Trial,
        ORG_A,
        &llm_payload(Tier::Trial, ORG_A, "x"),
        0,
    )
    .await;
    let payload = llm_payload(Tier::Trial, ORG_A, "y");
    let ok: [&[u8]; 9] = [
        b"llm.complete",
        b"trial",
        ORG_A.as_bytes(),
        payload.as_bytes(),
        b"",
        b"0",
        b"key-1",
        b"86400",
        b"0",
    ];
    let upper = ORG_A.to_uppercase();
    let bad_utf8 = payload.replace("\"y\"", "\"\u{1}\"");
    let mut not_utf8 = payload.clone().into_bytes();
    let at = not_utf8.len() - 3;
    not_utf8.insert(at, 0xff);
    let huge = "a".repeat(201);
    let cases: Vec<(usize, Vec<u8>, &str)> = vec![
        (0, b"sound.transcribe".to_vec(), "unknown kind"),
        (1, b"gold\x1b[31m".to_vec(), "unknown tier gold\\x1b[31m"),
        (2, upper.into_bytes(), "lower case"),
        (2, b"not-a-uuid".to_vec(), "organization_id must be a UUID"),
        (3, not_utf8, "payload is not valid UTF-8"),
        (
            3,
            bad_utf8.into_bytes(),
            "payload holds a control character",
        ),
        (3, Vec::new(), "empty payload"),
        (
            4,
            b"id\x00nul".to_vec(),
            "job_id must be UTF-8 without control characters",
        ),
        (
            4,
            b"id\x07bell".to_vec(),
            "job_id must be UTF-8 without control characters",
        ),
        (4, b"id\xc3\x28".to_vec(), "job_id must be UTF-8"),
        (
            4,
            b"j-1764600000000000-1".to_vec(),
            "must not start with j-",
        ),
        (4, b"has space".to_vec(), "job_id must be 1-128 characters"),
        (5, b"inf".to_vec(), "delay_ms must be an integer"),
        (5, b"1e308".to_vec(), "delay_ms must be an integer"),
        (5, b"nan".to_vec(), "delay_ms must be an integer"),
        (5, b"2.5".to_vec(), "delay_ms must be an integer"),
        (5, b"-1".to_vec(), "delay_ms must be >= 0"),
        (5, b"31536000001".to_vec(), "delay_ms must be an integer"),
        (6, huge.into_bytes(), "idempotency_key must be 1-200 bytes"),
        (
            6,
            b"key\x00".to_vec(),
            "idempotency_key must be 1-200 bytes",
        ),
        (7, b"0.5".to_vec(), "idempotency_ttl_s must be > 0"),
        (7, b"0".to_vec(), "idempotency_ttl_s must be > 0"),
        (8, b"nan".to_vec(), "max_attempts must be 0..100"),
        (8, b"2.5".to_vec(), "max_attempts must be 0..100"),
        (8, b"101".to_vec(), "max_attempts must be 0..100"),
    ];
    for (arg, value, want) in cases {
        let before = snapshot(&ctx).await;
        let mut args = ok.to_vec();
        args[arg] = &value;
        let err = enqueue_raw(&ctx, &args).await.unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("aiq:") && msg.contains(want),
            "ARGV[{}] = {:?}: {msg} should say {want}",
            arg + 1,
            String::from_utf8_lossy(&value)
        );
        assert_eq!(
            snapshot(&ctx).await,
            before,
            "ARGV[{}] changed Redis",
            arg + 1
        );
    }
    // And the good arguments are taken.
    let reply = enqueue_raw(&ctx, &ok).await.unwrap();
    assert_eq!(reply[1], "created");
}

#[tokio::test]
async fn enqueue_moves_a_corrupt_key_aside_and_takes_the_job() {
    let ctx = TestCtx::new().await;
    let mut conn = ctx.redis().await;
    // A buggy app overwrote an organisation's wait list, and the depth counter, by hand.
    let _: () = conn
        .set(ctx.key(&format!("wait:trial:{ORG_B}")), "oops")
        .await
        .unwrap();
    let _: () = conn
        .hset(ctx.key("depth"), "trial", "not a number")
        .await
        .unwrap();
    let mut trial = own_job(ORG_B, "b-1");
    trial.tier = Tier::Trial;
    trial.payload = llm_payload(Tier::Trial, ORG_B, "z");
    assert!(!ctx.queue.enqueue(&trial).await.unwrap().duplicate);
    let list: Vec<String> = conn
        .lrange(ctx.key(&format!("wait:trial:{ORG_B}")), 0, -1)
        .await
        .unwrap();
    assert_eq!(list, ["b-1"]);
    let depth: String = conn.hget(ctx.key("depth"), "trial").await.unwrap();
    assert_eq!(depth, "1");
    let aside = snapshot(&ctx)
        .await
        .into_keys()
        .filter(|k| k.starts_with(ctx.key("corrupt:wait:trial:").as_bytes()))
        .count();
    assert_eq!(aside, 1, "the corrupt list is kept aside for a look");
    let flags: Vec<String> = conn.hkeys(ctx.key("repair")).await.unwrap();
    assert!(flags.contains(&format!("wait:trial:{ORG_B}")), "{flags:?}");
    assert!(flags.contains(&"depth".to_owned()), "{flags:?}");
}

/// Waiting jobs per tier by the lists themselves, and by the depth counter.
async fn depth_by_lists(ctx: &TestCtx) -> (BTreeMap<String, i64>, BTreeMap<String, i64>) {
    let mut conn = ctx.redis().await;
    let mut lists = BTreeMap::new();
    let mut counted = BTreeMap::new();
    for key in snapshot(ctx).await.into_keys() {
        let key = String::from_utf8_lossy(&key).into_owned();
        let Some(rest) = key.strip_prefix(&ctx.key("wait:")) else {
            continue;
        };
        let tier = rest.split(':').next().unwrap().to_owned();
        let n: i64 = conn.llen(&key).await.unwrap();
        *lists.entry(tier).or_insert(0) += n;
    }
    for t in Tier::ALL {
        let v: Option<String> = conn.hget(ctx.key("depth"), t.as_str()).await.unwrap();
        let n = v.map_or(0, |v| v.parse().unwrap_or(i64::MIN));
        if n != 0 {
            counted.insert(t.as_str().to_owned(), n);
        }
        if lists.get(t.as_str()) == Some(&0) {
            lists.remove(t.as_str());
        }
    }
    (lists, counted)
}

#[tokio::test]
async fn corrupt_queue_keys_lose_no_job_and_the_depth_agrees_with_the_lists_afterwards() {
    // Each case: what a buggy app writes by hand, and how many jobs end dead (as corrupt).
    let cases: [(&str, usize); 6] = [
        ("the wait list is a string", 0),
        ("a job's token is not a number", 1),
        ("the dead byte count is not a number", 1),
        ("the counters hash is a list", 0),
        ("the delayed set is a string", 0),
        ("a depth value is not a number", 0),
    ];
    for (case, want_dead) in cases {
        let ctx = TestCtx::with(&[("AIQ_LEASE_MS", "3000")]).await;
        let mut ids = Vec::new();
        for i in 0..6 {
            let p = llm_payload(Tier::Trial, ORG_A, &format!("a{i}"));
            ids.push(
                ctx.enqueue(JobKind::LlmComplete, Tier::Trial, ORG_A, &p, 0)
                    .await,
            );
            let p = llm_payload(Tier::Enterprise, ORG_B, &format!("b{i}"));
            ids.push(
                ctx.enqueue(JobKind::LlmComplete, Tier::Enterprise, ORG_B, &p, 0)
                    .await,
            );
        }
        for i in 0..2 {
            let mut j = own_job(ORG_B, &format!("later-{i}"));
            j.delay = Duration::from_millis(300);
            ctx.queue.enqueue(&j).await.unwrap();
        }
        let mut conn = ctx.redis().await;
        let overwrite = |key: String| {
            let mut conn = conn.clone();
            async move {
                let _: () = conn.del(&key).await.unwrap();
                let _: () = conn.set(&key, "written by hand").await.unwrap();
            }
        };
        match case {
            "the wait list is a string" => overwrite(ctx.key(&format!("wait:trial:{ORG_A}"))).await,
            "a job's token is not a number" => {
                let _: () = conn
                    .hset(ctx.key(&format!("job:{}", ids[1])), "token", "abc")
                    .await
                    .unwrap();
            }
            "the dead byte count is not a number" => {
                // The job buried as corrupt counts its bytes into a count that is not a number.
                let _: () = conn.set(ctx.key("dead_bytes"), "abc").await.unwrap();
                let _: () = conn
                    .hset(ctx.key(&format!("job:{}", ids[1])), "token", "abc")
                    .await
                    .unwrap();
            }
            "the counters hash is a list" => {
                let _: () = conn.del(ctx.key("counters")).await.unwrap();
                let _: () = conn.lpush(ctx.key("counters"), "x").await.unwrap();
            }
            "the delayed set is a string" => overwrite(ctx.key("delayed")).await,
            _ => {
                let _: () = conn
                    .hset(ctx.key("depth"), "trial", "1.5e999")
                    .await
                    .unwrap();
            }
        }
        let worker = ctx.start_worker();
        let want_done = 14 - want_dead as i64;
        let pool = ctx.store.pool().clone();
        let q = ctx.queue.clone();
        wait_until(Duration::from_secs(60), case, || {
            let (pool, q) = (pool.clone(), q.clone());
            async move {
                let done: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM ai_processing_results WHERE status = 'completed'",
                )
                .fetch_one(&pool)
                .await
                .unwrap();
                done == want_done && q.dead_jobs(10).await.unwrap().len() == want_dead
            }
        })
        .await;
        ctx.wait_settled(Duration::from_secs(30)).await;
        // Every corruption a script met asked for a repair; the worker's renewer runs it.
        let flags = ctx.key("repair");
        wait_until(Duration::from_secs(30), "the repair scan", || {
            let (mut conn, flags) = (conn.clone(), flags.clone());
            async move { !conn.exists::<_, bool>(&flags).await.unwrap() }
        })
        .await;
        worker.stop().await;
        for d in ctx.queue.dead_jobs(10).await.unwrap() {
            assert!(d.reason.starts_with("corrupt: "), "{case}: {d:?}");
        }
        // No job is left in limbo: every job hash still in Redis is dead, in the dead set.
        for key in snapshot(&ctx).await.into_keys() {
            let key = String::from_utf8_lossy(&key).into_owned();
            if let Some(id) = key.strip_prefix(&ctx.key("job:")) {
                let state: Option<String> = conn.hget(&key, "state").await.unwrap();
                let in_dead: Option<f64> = conn.zscore(ctx.key("dead"), id).await.unwrap();
                assert!(
                    state.as_deref() == Some("dead") && in_dead.is_some(),
                    "{case}: job {id} is {state:?} outside the dead set"
                );
            }
        }
        let (lists, counted) = depth_by_lists(&ctx).await;
        assert_eq!(lists, counted, "{case}: the depth agrees with the lists");
        assert_eq!(ctx.fake_calls().await["openai"], want_done, "{case}");
    }
}

#[tokio::test]
async fn a_job_whose_bytes_are_not_utf8_is_buried_alone_and_its_batch_completes_in_one_lease() {
    let ctx = TestCtx::with(&[("AIQ_FETCH_BATCH", "32"), ("AIQ_CONCURRENCY", "16")]).await;
    let mut good = Vec::new();
    for i in 0..5 {
        let p = llm_payload(Tier::Trial, ORG_A, &format!("good {i}"));
        good.push(
            ctx.enqueue(JobKind::LlmComplete, Tier::Trial, ORG_A, &p, 0)
                .await,
        );
    }
    // Two jobs written straight into Redis, byte by byte, as enqueue.lua would have written
    // them but for one byte: a payload and an id that are not UTF-8.
    let mut conn = ctx.redis().await;
    let mut bad_payload = llm_payload(Tier::Trial, ORG_A, "bad").into_bytes();
    bad_payload.insert(bad_payload.len() - 3, 0xff);
    let bad_ids: [&[u8]; 2] = [b"bad-payload", b"bad-\xff\xfe-id"];
    let good_payload = llm_payload(Tier::Trial, ORG_A, "fine but for its id").into_bytes();
    for (id, payload) in bad_ids.iter().zip([&bad_payload, &good_payload]) {
        let mut key = ctx.key("job:").into_bytes();
        key.extend_from_slice(id);
        let _: () = redis::cmd("HSET")
            .arg(&key)
            .arg("kind")
            .arg("llm.complete")
            .arg("tier")
            .arg("trial")
            .arg("org")
            .arg(ORG_A)
            .arg("payload")
            .arg(payload.as_slice())
            .arg("attempts")
            .arg(0)
            .arg("interrupts")
            .arg(0)
            .arg("max_attempts")
            .arg(0)
            .arg("token")
            .arg(0)
            .arg("state")
            .arg("waiting")
            .query_async(&mut conn)
            .await
            .unwrap();
        let _: () = conn
            .rpush(ctx.key(&format!("wait:trial:{ORG_A}")), *id)
            .await
            .unwrap();
        let _: () = conn.hincr(ctx.key("depth"), "trial", 1).await.unwrap();
    }
    for i in 5..10 {
        let p = llm_payload(Tier::Trial, ORG_A, &format!("good {i}"));
        good.push(
            ctx.enqueue(JobKind::LlmComplete, Tier::Trial, ORG_A, &p, 0)
                .await,
        );
    }
    let worker = ctx.start_worker();
    let q = ctx.queue.clone();
    wait_until(Duration::from_secs(30), "10 done and 2 dead", || {
        let q = q.clone();
        async move {
            let s = q.stats().await.unwrap();
            s.counters.get("done") == Some(&10) && s.dead == 2
        }
    })
    .await;
    worker.stop().await;
    let stats = ctx.queue.stats().await.unwrap();
    assert_eq!(
        stats.counters.get("interrupted"),
        None,
        "no lease expired: the good jobs were served from their first lease"
    );
    let dead = ctx.queue.dead_jobs(10).await.unwrap();
    assert_eq!(dead.len(), 2);
    for d in &dead {
        assert!(d.reason.starts_with("corrupt: "), "{d:?}");
    }
    assert_eq!(
        ctx.scalar_i64("SELECT count(*) FROM ai_processing_results WHERE status = 'completed'")
            .await,
        10
    );
    assert_eq!(
        ctx.fake_calls().await["openai"],
        10,
        "no call for a corrupt job"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_out_of_memory_spends_no_attempt_and_every_job_completes_once_memory_is_freed() {
    let redis =
        aiq_testkit::localsvc::LocalRedis::start("oom").expect("a redis-server of the test's own");
    let ctx = TestCtx::build_on(
        Some(&redis.url()),
        None,
        &[("AIQ_MAX_ATTEMPTS", "2"), ("AIQ_LEASE_MS", "2000")],
        aiq_testkit::fake::FakeOptions::default(),
    )
    .await;
    for i in 0..20 {
        let p = llm_payload(Tier::Trial, ORG_A, &format!("j{i}"));
        ctx.enqueue(JobKind::LlmComplete, Tier::Trial, ORG_A, &p, 0)
            .await;
    }
    // The test leases the jobs as a worker would, then Redis reaches its memory limit
    // (noeviction): every write is refused with OOM.
    let leased = ctx.queue.fetch(20).await.unwrap();
    assert_eq!(leased.len(), 20);
    let conn = ctx.redis().await;
    let oom = |limit: &'static str| {
        let mut conn = conn.clone();
        async move {
            let _: () = redis::cmd("CONFIG")
                .arg("SET")
                .arg("maxmemory-policy")
                .arg("noeviction")
                .query_async(&mut conn)
                .await
                .unwrap();
            let _: () = redis::cmd("CONFIG")
                .arg("SET")
                .arg("maxmemory")
                .arg(limit)
                .query_async(&mut conn)
                .await
                .unwrap();
        }
    };
    let app = aiq::worker::app(&ctx.settings, ctx.store.clone())
        .await
        .unwrap();
    oom("1").await;
    let before = snapshot(&ctx).await;
    let refused = ctx
        .queue
        .enqueue(&own_job(ORG_A, "while-full"))
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("OOM"), "{refused}");
    assert_eq!(
        snapshot(&ctx).await,
        before,
        "a refused enqueue writes nothing"
    );
    for job in &leased {
        let raw = aiq::queue::backend::RawJob {
            id: job.id.clone(),
            kind: job.kind.clone(),
            tier: job.tier.clone(),
            organization_id: job.organization_id.clone(),
            payload: job.payload.clone(),
            token: job.token.parse().unwrap(),
            attempt: 1,
            max_attempts: 2,
            enqueued_at_ms: job.enqueued_at_ms,
            interrupts: 0,
            prior: Default::default(),
        };
        match aiq::jobs::run(&app, &raw).await {
            Err(aiq::queue::backend::Failure::Defer { message, .. }) => {
                assert!(message.contains("OOM"), "{message}");
            }
            other => panic!("job {}: {other:?}, not a deferral", job.id),
        }
    }
    assert_eq!(
        ctx.fake_calls().await["openai"],
        0,
        "no call without a budget check"
    );
    // Memory is freed: the leases run out, the jobs come back, and every one completes.
    oom("0").await;
    let worker = ctx.start_worker();
    let q = ctx.queue.clone();
    wait_until(Duration::from_secs(60), "every job to complete", || {
        let q = q.clone();
        async move { q.stats().await.unwrap().counters.get("done") == Some(&20) }
    })
    .await;
    worker.stop().await;
    assert_eq!(ctx.queue.stats().await.unwrap().dead, 0);
    assert_eq!(ctx.fake_calls().await["openai"], 20);
    drop(redis);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_losing_its_data_mid_run_keeps_ids_and_rows_apart_and_the_budget_closed_until_rebuilt()
 {
    let mut redis =
        aiq_testkit::localsvc::LocalRedis::start("loss").expect("a redis-server of the test's own");
    let ctx = TestCtx::build_on(
        Some(&redis.url()),
        None,
        &[("AIQ_LEASE_MS", "2000"), ("AIQ_CONCURRENCY", "8")],
        aiq_testkit::fake::FakeOptions::with_latency(Duration::from_millis(5)),
    )
    .await;
    let text = |i: usize| format!("caption photo {i:03}");
    let input_bound = text(0).len() as u64 + "user".len() as u64 + 8;
    let estimate = aiq::budget::PriceCatalog::builtin()
        .llm_estimate("openai", "gpt-4o-mini", input_bound, 50)
        .unwrap();
    let limit = aiq::domain::MicroUsd::from_micros(estimate.micros() * 10);
    let org_a = uuid::Uuid::parse_str(ORG_A).unwrap();
    ctx.store
        .set_org_limits(org_a, Some(limit), None)
        .await
        .unwrap();
    let enqueue = |org: &'static str, i: usize| {
        let queue = ctx.queue.clone();
        let p = llm_payload(Tier::Enterprise, org, &text(i));
        async move {
            let job = NewJob {
                kind: JobKind::LlmComplete,
                tier: Tier::Enterprise,
                organization_id: OrganizationId::parse(org).unwrap(),
                payload: p,
                job_id: None,
                delay: Duration::ZERO,
                idempotency_key: None,
                max_attempts: 0,
            };
            // Right after the restart the first command may meet the reset connection.
            wait_for(Duration::from_secs(60), "an enqueue to succeed", || async {
                queue.enqueue(&job).await.ok().map(|e| e.job_id)
            })
            .await
        }
    };
    let sum_of = |org: &'static str| {
        let pool = ctx.store.pool().clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT coalesce((sum(cost_usd) * 1000000)::bigint, 0)::bigint FROM ai_cost_tracking
                 WHERE organization_id = $1::uuid",
            )
            .bind(org)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    let completed_of = |org: &'static str| {
        let pool = ctx.store.pool().clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM ai_processing_results
                 WHERE organization_id = $1::uuid AND status = 'completed'",
            )
            .bind(org)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    let settled = || {
        let q = ctx.queue.clone();
        async move {
            let s = q.stats().await.unwrap_or_default();
            s.waiting.values().sum::<u64>() == 0 && s.inflight == 0
        }
    };
    let worker = ctx.start_worker();
    // Organisation A spends up to its daily limit; the rest of its jobs wait for the reset.
    let mut before = Vec::new();
    for i in 0..40 {
        before.push(enqueue(ORG_A, i).await);
    }
    wait_until(
        Duration::from_secs(60),
        "A's jobs to run up to the limit",
        settled,
    )
    .await;
    let spent_before = sum_of(ORG_A).await;
    assert!(
        spent_before > limit.micros() / 2 && spent_before <= limit.micros(),
        "A spent {spent_before} of {limit}"
    );
    // Redis restarts without its data, the worker still running. The apps enqueue again.
    redis.restart().expect("redis restarts empty");
    let mut after = Vec::new();
    for i in 0..40 {
        after.push(enqueue(ORG_A, i).await);
    }
    let mut b_ids = Vec::new();
    for i in 0..5 {
        b_ids.push(enqueue(ORG_B, i).await);
    }
    wait_until(
        Duration::from_secs(60),
        "B's jobs to run and A's to wait",
        || async { settled().await && completed_of(ORG_B).await == 5 },
    )
    .await;
    worker.stop().await;
    let all: HashSet<&String> = before.iter().chain(&after).chain(&b_ids).collect();
    assert_eq!(all.len(), 85, "every job got a new id");
    let spent = sum_of(ORG_A).await;
    assert!(
        spent <= limit.micros(),
        "A spent {spent} past its limit {limit} after Redis lost its data (before: {spent_before})"
    );
    for id in &b_ids {
        let orgs: Vec<String> = sqlx::query_scalar(
            "SELECT organization_id::text FROM ai_processing_results WHERE job_id = $1",
        )
        .bind(id)
        .fetch_all(ctx.store.pool())
        .await
        .unwrap();
        assert_eq!(orgs, [ORG_B], "job {id} has exactly its own row");
    }
    crate::money::assert_redis_agrees_with_postgres(&ctx, &[ORG_A, ORG_B]).await;
    drop(redis);
}

#[tokio::test]
async fn a_job_whose_estimate_exceeds_a_whole_limit_is_dead_at_once_and_raises_no_alert() {
    let ctx = TestCtx::with(&[("AIQ_PROVIDER_TPM", "anthropic=40")]).await;
    // A's whole daily limit is one micro-dollar: no job of A can ever fit in a day.
    ctx.store
        .set_org_limits(
            uuid::Uuid::parse_str(ORG_A).unwrap(),
            Some(aiq::domain::MicroUsd::from_micros(1)),
            None,
        )
        .await
        .unwrap();
    let over_limit = ctx
        .enqueue(
            JobKind::LlmComplete,
            Tier::Trial,
            ORG_A,
            &llm_payload(Tier::Trial, ORG_A, "too dear for the day"),
            0,
        )
        .await;
    // B's job needs more tokens than its provider's whole minute (the prompt and max_tokens 50).
    let b = LlmJob::new(Tier::Trial, ORG_B, "hello")
        .model("anthropic", "claude-haiku-4-5")
        .json();
    let over_tpm = ctx
        .enqueue(JobKind::LlmComplete, Tier::Trial, ORG_B, &b, 0)
        .await;
    run_until_settled(&ctx).await;
    let dead = ctx.queue.dead_jobs(10).await.unwrap();
    assert_eq!(dead.len(), 2, "{dead:?}");
    for d in &dead {
        assert_eq!(d.attempts, 1, "dead on its first delivery: {d:?}");
        assert!(d.reason.contains("can never run"), "{d:?}");
        if d.id == over_limit {
            assert!(d.reason.contains("day limit"), "{d:?}");
        } else {
            assert_eq!(d.id, over_tpm);
            assert!(d.reason.contains("tokens per minute"), "{d:?}");
        }
    }
    let calls = ctx.fake_calls().await;
    assert_eq!(calls["openai"], 0);
    assert_eq!(calls["anthropic"], 0);
    assert_eq!(
        ctx.scalar_i64("SELECT count(*) FROM ai_cost_alerts").await,
        0,
        "nobody spent anything: no alert"
    );
    assert_eq!(
        ctx.scalar_i64(
            "SELECT count(*) FROM ai_processing_errors WHERE error_type = 'budget_exceeded'
             AND (error_details->>'never_fits')::boolean"
        )
        .await,
        2
    );
}

#[tokio::test]
async fn a_host_clock_a_day_ahead_bills_nothing_to_tomorrows_window() {
    use aiq::budget::CallMeta;
    let ctx = TestCtx::new().await;
    let budget = ctx.budget().await;
    budget.rebuild_ledger(&ctx.store, false).await.unwrap();
    let org = uuid::Uuid::parse_str(ORG_A).unwrap();
    let limits = budget.tier_limits(Tier::Enterprise);
    // This host's clock says tomorrow; Redis's says today.
    let host_now = chrono::Utc::now() + chrono::Duration::days(1);
    let (tomorrow, tomorrow_date) = budget.scopes(org, limits, host_now);
    let meta = CallMeta {
        job_id: "clock-1".into(),
        execution: 1,
        attempt: 1,
        call_seq: 0,
        organization_id: org,
        tier: "enterprise".into(),
        provider: "openai".into(),
        operation: "chat.completions".into(),
        model: Some("gpt-4o-mini".into()),
        billing_date: tomorrow_date,
    };
    let amount = aiq::domain::MicroUsd::from_micros(100);
    let held = budget
        .reserve(meta, limits, amount, Duration::from_secs(60), host_now)
        .await
        .unwrap()
        .expect("room");
    let (today, today_date) = budget.scopes(org, limits, budget.now());
    assert_eq!(held.meta.billing_date, today_date, "billed to Redis's day");
    budget.settle(&held.id, amount).await.unwrap();
    let states = budget.state(&today).await.unwrap();
    assert!(states.iter().all(|s| s.spent == amount), "{states:?}");
    // The day scopes of tomorrow (platform and organisation) hold nothing.
    for s in budget.state(&tomorrow).await.unwrap() {
        if s.window_kind == aiq::budget::WindowKind::Day {
            assert_eq!(s.spent.micros() + s.reserved.micros(), 0, "{s:?}");
        }
    }
}

#[tokio::test]
async fn the_dead_set_keeps_an_invalid_payload_truncated_and_holds_its_payload_bytes_under_the_cap()
{
    let ctx = TestCtx::with(&[("AIQ_DEAD_MAX_MB", "1"), ("AIQ_CONCURRENCY", "8")]).await;
    // Invalid: max_tokens 0. Each payload is about 1 MiB.
    let big = "x".repeat(1 << 20);
    let invalid = serde_json::json!({
        "version": 1, "organization_id": ORG_A, "tier": "trial", "provider": "openai",
        "model": "gpt-4o-mini", "messages": [{ "role": "user", "content": big }], "max_tokens": 0
    })
    .to_string();
    // Valid jobs that die for the provider's reason (a 400): their payloads stay whole, and the
    // byte cap drops the oldest of them.
    let mut valid_ids = Vec::new();
    for i in 0..6 {
        let text = format!("[fake:status=400] {i} {}", "y".repeat(300 << 10));
        let p = llm_payload(Tier::Trial, ORG_A, &text);
        valid_ids.push(
            ctx.enqueue(JobKind::LlmComplete, Tier::Trial, ORG_A, &p, 1)
                .await,
        );
        // One at a time, so that the oldest is well defined.
        let worker = ctx.start_worker();
        ctx.wait_settled(Duration::from_secs(30)).await;
        worker.stop().await;
    }
    let mut invalid_ids = Vec::new();
    for _ in 0..5 {
        invalid_ids.push(
            ctx.enqueue(JobKind::LlmComplete, Tier::Trial, ORG_A, &invalid, 0)
                .await,
        );
    }
    run_until_settled(&ctx).await;
    let mut conn = ctx.redis().await;
    let mut kept = 0i64;
    for id in &invalid_ids {
        let f: std::collections::HashMap<String, Vec<u8>> =
            conn.hgetall(ctx.key(&format!("job:{id}"))).await.unwrap();
        let payload = &f["payload"];
        assert_eq!(payload.len(), 4096, "kept truncated");
        assert_eq!(
            String::from_utf8_lossy(&f["payload_bytes"]),
            invalid.len().to_string()
        );
        assert_eq!(payload.as_slice(), &invalid.as_bytes()[..4096]);
        assert_eq!(f["payload_sha1"].len(), 40);
        kept += 4096;
    }
    // 6 x 300 KiB is above the 1 MiB cap: the oldest valid dead jobs were dropped, the newest kept.
    let mut whole = 0;
    for id in &valid_ids {
        let in_dead: Option<f64> = conn.zscore(ctx.key("dead"), id).await.unwrap();
        if in_dead.is_some() {
            let n: i64 = redis::cmd("HSTRLEN")
                .arg(ctx.key(&format!("job:{id}")))
                .arg("payload")
                .query_async(&mut conn)
                .await
                .unwrap();
            assert!(n > 300 << 10, "a valid payload stays whole");
            kept += n;
            whole += 1;
        }
    }
    let in_dead: Option<f64> = conn
        .zscore(ctx.key("dead"), valid_ids.last().unwrap())
        .await
        .unwrap();
    assert!(in_dead.is_some(), "the newest valid dead job is kept");
    assert!((1..6).contains(&whole), "{whole} of 6 kept");
    let counted: i64 = conn.get(ctx.key("dead_bytes")).await.unwrap();
    assert_eq!(counted, kept, "the byte count is what the dead jobs keep");
    assert!(counted <= 1 << 20, "{counted} bytes under the 1 MiB cap");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_whose_fetches_keep_failing_makes_readyz_unhealthy_within_a_lease_and_recovers() {
    let redis = aiq_testkit::localsvc::LocalRedis::start("readyz")
        .expect("a redis-server of the test's own");
    let ctx = TestCtx::build_on(
        Some(&redis.url()),
        None,
        &[("AIQ_LEASE_MS", "2000")],
        aiq_testkit::fake::FakeOptions::default(),
    )
    .await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let daemon = ctx.spawn_daemon(&[("AIQ_ADMIN_ADDR", &addr)]);
    let readyz = || crate::harness::readyz(&addr);
    wait_until(
        Duration::from_secs(30),
        "the daemon to be ready",
        || async { readyz().await.is_some_and(|(s, _)| s == 200) },
    )
    .await;
    // Jobs wait, and Redis refuses every write: each fetch fails.
    let mut conn = ctx.redis().await;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("noeviction")
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut ids = Vec::new();
    for i in 0..3 {
        let p = llm_payload(Tier::Trial, ORG_A, &format!("r{i}"));
        ids.push(
            ctx.enqueue(JobKind::LlmComplete, Tier::Trial, ORG_A, &p, 0)
                .await,
        );
    }
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg("1")
        .query_async(&mut conn)
        .await
        .unwrap();
    wait_until(
        Duration::from_secs(30),
        "/readyz to say the queue fails",
        || async {
            readyz().await.is_some_and(|(s, body)| {
                s == 503
                    && body["parts"]["redis"]["error"]
                        .as_str()
                        .is_some_and(|e| e.contains("have failed for"))
            })
        },
    )
    .await;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg("0")
        .query_async(&mut conn)
        .await
        .unwrap();
    wait_until(Duration::from_secs(30), "/readyz to recover", || async {
        readyz().await.is_some_and(|(s, _)| s == 200)
    })
    .await;
    ctx.wait_settled(Duration::from_secs(30)).await;
    assert!(
        crate::harness::signal_and_wait(daemon, libc::SIGTERM)
            .await
            .success()
    );
    assert_eq!(
        ctx.queue.stats().await.unwrap().counters.get("done"),
        Some(&3)
    );
    drop(redis);
}

/// Every path to a string in a JSON value.
fn string_paths(
    v: &serde_json::Value,
    path: &mut Vec<serde_json::Value>,
    out: &mut Vec<Vec<serde_json::Value>>,
) {
    match v {
        serde_json::Value::String(_) => out.push(path.clone()),
        serde_json::Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                path.push(i.into());
                string_paths(x, path, out);
                path.pop();
            }
        }
        serde_json::Value::Object(o) => {
            for (k, x) in o {
                path.push(k.clone().into());
                string_paths(x, path, out);
                path.pop();
            }
        }
        _ => {}
    }
}

fn at<'a>(v: &'a mut serde_json::Value, path: &[serde_json::Value]) -> &'a mut serde_json::Value {
    path.iter().fold(v, |v, p| match p {
        serde_json::Value::Number(i) => &mut v[i.as_u64().unwrap() as usize],
        serde_json::Value::String(k) => &mut v[k.as_str()],
        _ => unreachable!(),
    })
}

#[tokio::test]
async fn a_control_character_in_any_string_field_of_either_kind_is_refused_before_any_call() {
    let ctx = TestCtx::with(&[("AIQ_CONCURRENCY", "16")]).await;
    let examples = [
        (
            "vision.annotate",
            include_str!("../../jobs/examples/vision.annotate.json"),
        ),
        (
            "llm.complete",
            include_str!("../../jobs/examples/llm.complete.json"),
        ),
    ];
    let mut n = 0;
    for (kind, example) in examples {
        let mut base: serde_json::Value = serde_json::from_str(example).unwrap();
        base["organization_id"] = ORG_A.into();
        if kind == "llm.complete" {
            base["fallback"] =
                serde_json::json!([{ "provider": "gemini", "model": "gemini-2.5-flash" }]);
        }
        let tier: Tier = base["tier"].as_str().unwrap().parse().unwrap();
        let mut paths = Vec::new();
        string_paths(&base, &mut Vec::new(), &mut paths);
        assert!(paths.len() >= 8, "{kind}: {paths:?}");
        for path in &paths {
            // The organisation must equal the enqueue argument to reach the worker at all.
            if path == &[serde_json::Value::from("organization_id")] {
                continue;
            }
            for bad in ['\u{0}', '\u{7}', '\u{1b}', '\u{7f}'] {
                let mut p = base.clone();
                let s = at(&mut p, path);
                *s = format!("{}{bad}", s.as_str().unwrap()).into();
                let kind: JobKind = kind.parse().unwrap();
                ctx.enqueue(kind, tier, ORG_A, &p.to_string(), 0).await;
                n += 1;
            }
        }
    }
    run_until_settled(&ctx).await;
    let calls = ctx.fake_calls().await;
    for provider in ["google_vision", "openai", "anthropic", "gemini"] {
        assert_eq!(calls[provider].as_u64(), Some(0), "{provider}: {calls}");
    }
    assert_eq!(
        ctx.queue.stats().await.unwrap().dead,
        n,
        "every one is dead"
    );
    assert_eq!(
        ctx.scalar_i64(
            "SELECT count(*) FROM ai_processing_errors WHERE error_type = 'invalid_payload'"
        )
        .await,
        n as i64
    );
}
