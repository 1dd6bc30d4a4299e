//! enqueue.lua under generated arguments, against real Redis: every call is either taken
//! (`created` or `duplicate`) or refused with an `ERR aiq:` reply, exactly when an independent
//! model of the contract (jobs/README.md) says the arguments are good, and a refusal or a
//! duplicate leaves every key of the queue as it was.

use std::cell::Cell;

use aiq::queue::ENQUEUE_LUA;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

use crate::harness::{ORG_A, TestCtx, llm_payload};

/// Every key under the pattern with its DUMP, in one round trip. A key about to expire (a
/// generated idempotency TTL of a second or two) is left out: it may vanish between two
/// snapshots by itself.
pub(crate) const SNAPSHOT: &str = r#"
local out, cursor = {}, "0"
repeat
  local r = redis.call("SCAN", cursor, "MATCH", ARGV[1], "COUNT", 1000)
  cursor = r[1]
  for _, k in ipairs(r[2]) do
    local ttl = redis.call("PTTL", k)
    if ttl < 0 or ttl > 60000 then
      out[#out + 1] = k
      out[#out + 1] = redis.call("DUMP", k)
    end
  end
until cursor == "0"
return out
"#;

const WIPE: &str = r#"
local cursor = "0"
repeat
  local r = redis.call("SCAN", cursor, "MATCH", ARGV[1], "COUNT", 1000)
  cursor = r[1]
  for _, k in ipairs(r[2]) do redis.call("DEL", k) end
until cursor == "0"
return 0
"#;

const KINDS: [&str; 2] = ["vision.annotate", "llm.complete"];
const TIERS: [&str; 6] = [
    "enterprise_plus",
    "enterprise",
    "professional_agency",
    "growth_team",
    "solo_professional",
    "trial",
];

/// Values that have broken, or could break, a script that trusts its arguments.
pub(crate) fn nasty() -> impl Strategy<Value = Vec<u8>> {
    let specials: Vec<Vec<u8>> = [
        &b""[..],
        b"0",
        b"1",
        b"100",
        b"101",
        b"inf",
        b"-inf",
        b"nan",
        b"NaN",
        b"1e308",
        b"-1",
        b"2.5",
        b"0.5",
        b"0x10",
        b" 5",
        b"5 ",
        b"+5",
        b"99999999999999999999",
        b"31536000000",
        b"31536000001",
        b"\x00",
        b"id\x01",
        b"id\x7f",
        b"a\tb",
        b"j-1",
        b"j-17646-3",
        b"{x}",
        b"\xff",
        b"\xc3\x28",
        b"\xc0\xaf",
        b"\xed\xa0\x80",
        b"\xf4\x90\x80\x80",
        "é".as_bytes(),
        "😀".as_bytes(),
        b"0B6F1B3E-2A55-4A6E-9A43-2F6F6F1B2C3D",
        b"0b6f1b3e-2a55-4a6e-9a43-2f6f6f1b2c3d",
        b"trial",
        b"llm.complete",
    ]
    .iter()
    .map(|v| v.to_vec())
    .collect();
    prop_oneof![
        3 => proptest::sample::select(specials),
        1 => proptest::collection::vec(any::<u8>(), 0..24),
        1 => "[a-z0-9\\-]{1,12}".prop_map(String::into_bytes),
        1 => (1usize..260).prop_map(|n| vec![b'a'; n]),
    ]
}

/// One argument: mostly a good value, sometimes a nasty one.
fn arg(good: Vec<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![4 => proptest::sample::select(good), 1 => nasty()]
}

fn payload_arg() -> impl Strategy<Value = Vec<u8>> {
    let good = llm_payload(aiq::domain::Tier::Trial, ORG_A, "x").into_bytes();
    let g = good.clone();
    prop_oneof![
        4 => Just(good),
        1 => nasty(),
        // A good payload with one byte changed: a control character, a stray high byte.
        1 => (any::<prop::sample::Index>(), any::<u8>()).prop_map(move |(i, b)| {
            let mut p = g.clone();
            let at = i.index(p.len());
            p[at] = b;
            p
        }),
    ]
}

fn args() -> impl Strategy<Value = Vec<Vec<u8>>> {
    let b = |v: &[&str]| v.iter().map(|s| s.as_bytes().to_vec()).collect::<Vec<_>>();
    (
        arg(b(&KINDS)),
        arg(b(&TIERS)),
        arg(b(&[ORG_A])),
        payload_arg(),
        arg(b(&["", "", "own-1", "own-2", "photo/42:é"])),
        arg(b(&["0", "0", "1500"])),
        arg(b(&["", "", "k1", "k2"])),
        arg(b(&["86400", "1"])),
        arg(b(&["0", "3", "100"])),
    )
        .prop_map(|(a, b, c, d, e, f, g, h, i)| vec![a, b, c, d, e, f, g, h, i])
}

/// The queue's keys (a [`SNAPSHOT`] of `pattern`) before and after `inv` runs, and its reply.
pub(crate) async fn around<T: redis::FromRedisValue>(
    conn: &mut redis::aio::MultiplexedConnection,
    snapshot: &redis::Script,
    pattern: &str,
    inv: &redis::ScriptInvocation<'_>,
) -> (Vec<Vec<u8>>, redis::RedisResult<T>, Vec<Vec<u8>>) {
    let before: Vec<Vec<u8>> = snapshot.arg(pattern).invoke_async(conn).await.unwrap();
    let reply = inv.invoke_async(conn).await;
    let after: Vec<Vec<u8>> = snapshot.arg(pattern).invoke_async(conn).await.unwrap();
    (before, reply, after)
}

/// A script's refusal as the contract words it: an `ERR aiq: ...` reply.
pub(crate) fn is_aiq_refusal(e: &redis::RedisError) -> bool {
    e.code() == Some("ERR") && e.detail().unwrap_or_default().starts_with("aiq: ")
}

/// The keys of two snapshots (flat key, dump lists) whose values differ or that only one has.
pub(crate) fn differing(a: &[Vec<u8>], b: &[Vec<u8>]) -> Vec<String> {
    let map = |v: &[Vec<u8>]| -> std::collections::BTreeMap<Vec<u8>, Vec<u8>> {
        v.chunks(2).map(|c| (c[0].clone(), c[1].clone())).collect()
    };
    let (a, b) = (map(a), map(b));
    a.keys()
        .chain(b.keys())
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| String::from_utf8_lossy(k).into_owned())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect()
}

fn digits_in(v: &[u8], lo: u64, hi: u64) -> bool {
    !v.is_empty()
        && v.len() <= 15
        && v.iter().all(u8::is_ascii_digit)
        && std::str::from_utf8(v)
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .is_some_and(|n| (lo..=hi).contains(&n))
}

fn lower_uuid(v: &[u8]) -> bool {
    v.len() == 36
        && v.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_digit() || (b'a'..=b'f').contains(c),
        })
}

fn no_controls(v: &[u8]) -> bool {
    !v.iter().any(|c| *c < 0x20 || *c == 0x7f)
}

/// The contract, written from jobs/README.md rather than from the script.
fn model_accepts(a: &[Vec<u8>]) -> bool {
    let [kind, tier, org, payload, job_id, delay, idem, ttl, attempts] = a else {
        return false;
    };
    let utf8 = |v: &[u8]| std::str::from_utf8(v).is_ok();
    let json_controls = |v: &[u8]| {
        v.iter()
            .any(|c| *c < 0x20 && !matches!(*c, b'\t' | b'\n' | b'\r'))
    };
    KINDS.iter().any(|k| k.as_bytes() == kind.as_slice())
        && TIERS.iter().any(|t| t.as_bytes() == tier.as_slice())
        && lower_uuid(org)
        && !payload.is_empty()
        && payload.len() <= 10 << 20
        && utf8(payload)
        && !json_controls(payload)
        && (job_id.is_empty()
            || (job_id.len() <= 128
                && utf8(job_id)
                && no_controls(job_id)
                && !job_id
                    .iter()
                    .any(|c| matches!(*c, b' ' | b'{' | b'}' | 0x0b | 0x0c))
                && !job_id.starts_with(b"j-")))
        && digits_in(delay, 0, 31_536_000_000)
        && (idem.is_empty() || (idem.len() <= 200 && utf8(idem) && no_controls(idem)))
        && digits_in(ttl, if idem.is_empty() { 0 } else { 1 }, 31_536_000)
        && digits_in(attempts, 0, 100)
}

#[test]
fn enqueue_takes_exactly_the_good_arguments_and_a_refusal_changes_nothing() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let ctx = rt.block_on(TestCtx::new());
    let conn = rt.block_on(ctx.redis());
    let base = ctx.key("").trim_end_matches(':').to_owned();
    let pattern = format!("{base}*");
    let enqueue = redis::Script::new(ENQUEUE_LUA);
    let snapshot = redis::Script::new(SNAPSHOT);
    let wipe = redis::Script::new(WIPE);
    let cases = std::env::var("AIQ_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let (created, duplicate, refused) = (Cell::new(0u32), Cell::new(0u32), Cell::new(0u32));
    let count = |c: &Cell<u32>| c.set(c.get() + 1);
    let result = runner.run(&args(), |a| {
        let mut conn = conn.clone();
        rt.block_on(async {
            let mut inv = enqueue.key(&base);
            for v in &a {
                inv.arg(v.as_slice());
            }
            let (before, reply, after) =
                around::<Vec<String>>(&mut conn, &snapshot, &pattern, &inv).await;
            let good = model_accepts(&a);
            let shown: Vec<String> = a
                .iter()
                .map(|v| String::from_utf8_lossy(v).escape_debug().to_string())
                .collect();
            match reply {
                Ok(r) if r.len() == 2 && r[1] == "created" => {
                    count(&created);
                    prop_assert!(good, "created although the contract refuses {shown:?}");
                    let state: Option<String> = redis::cmd("HGET")
                        .arg(format!("{base}:job:{}", r[0]))
                        .arg("state")
                        .query_async(&mut conn)
                        .await
                        .unwrap();
                    prop_assert!(
                        matches!(state.as_deref(), Some("waiting" | "delayed")),
                        "job {} of {shown:?} is {state:?}",
                        r[0]
                    );
                    if !a[4].is_empty() {
                        prop_assert_eq!(r[0].as_bytes(), a[4].as_slice());
                    }
                }
                Ok(r) if r.len() == 2 && r[1] == "duplicate" => {
                    count(&duplicate);
                    prop_assert!(good, "a duplicate of {shown:?}, which the contract refuses");
                    prop_assert!(
                        before == after,
                        "a duplicate changed the queue: {shown:?}; keys that differ: {:?}",
                        differing(&before, &after)
                    );
                }
                Ok(r) => return Err(TestCaseError::fail(format!("reply {r:?} to {shown:?}"))),
                Err(e) => {
                    count(&refused);
                    prop_assert!(
                        is_aiq_refusal(&e),
                        "not an ERR aiq: reply to {shown:?}: {e}"
                    );
                    prop_assert!(!good, "refused good arguments {shown:?}: {e}");
                    prop_assert!(
                        before == after,
                        "a refusal changed the queue: {shown:?}: {e}; keys that differ: {:?}",
                        differing(&before, &after)
                    );
                }
            }
            // Keep the queue small, so each snapshot stays one cheap round trip.
            if after.len() > 80 {
                let _: i64 = wipe.arg(&pattern).invoke_async(&mut conn).await.unwrap();
            }
            Ok(())
        })
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    let seen = (created.get(), duplicate.get(), refused.get());
    eprintln!("enqueue.lua over {cases} generated calls: (created, duplicate, refused) {seen:?}");
    // The generator must reach both sides of the contract, or the property proves little.
    assert!(seen.0 > cases / 20 && seen.2 > cases / 20, "{seen:?}");
}
