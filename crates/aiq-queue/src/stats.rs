//! Reading the queue's own numbers (`{p}:depth`, `{p}:held`, `{p}:counters`, `{p}:heads:<tier>`,
//! `{p}:minute:<m>`) without
//! trusting Redis. Apps write only through `enqueue.lua`, but anything with a Redis client can
//! write anything, and these numbers go into `/metrics`. So only the field names aiq's scripts
//! write are read at all, each value is parsed on its own, and whatever does not parse is left
//! out and counted: one bad value neither fails the whole read nor reaches the Prometheus text.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use redis::Value;

/// Every event the queue scripts count in `{p}:counters`: exactly the fields their `HINCRBY`s
/// write (a unit test reads the scripts to keep it so). Nothing else is read from the hash.
pub const COUNTER_EVENTS: [&str; 13] = [
    "enqueued",
    "leased",
    "done",
    "retried",
    "dead",
    "released",
    "deferred",
    "interrupted",
    "revived",
    "purged",
    "cancelled",
    "events",
    "capped",
];

/// The fields of `{p}:held` the scripts write (guard.lua's `g_held`): `inflight:<tier>`,
/// `dead:<tier>` and `delayed:<tier>:<reason>` for the six tiers and the contract's delay reasons.
pub(super) fn held_fields() -> Vec<String> {
    let mut out = Vec::new();
    for t in crate::tenant::Tier::ALL.map(crate::tenant::Tier::as_str) {
        out.push(format!("inflight:{t}"));
        out.push(format!("dead:{t}"));
        for r in crate::events::DelayReason::ALL {
            out.push(format!("delayed:{t}:{}", r.as_str()));
        }
    }
    out
}

/// The event types the scripts count per minute in `{p}:minute:<m>` (guard.lua's `event`, and
/// cancel.lua's `cancelled`); enqueue.lua does not count there.
pub const MINUTE_EVENTS: [&str; 9] = [
    "started",
    "succeeded",
    "retried",
    "deferred",
    "failed",
    "dead",
    "released",
    "interrupted",
    "cancelled",
];

/// How many of the skipped values a log line shows; the counts are always complete.
const EXAMPLES: usize = 3;
/// How much of one skipped value a log line shows.
const SHOWN_BYTES: usize = 40;

/// Values a stats read found in Redis and left out, per key.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct SkippedValues {
    /// `{p}:depth`: fields that are not a tier, counts that are not non-negative integers.
    pub depth: u64,
    /// `{p}:counters`: fields that are not a queue event, counts that are not non-negative
    /// integers.
    pub counters: u64,
    /// `{p}:heads:<tier>`: members whose score is not a time (negative or infinite).
    pub heads: u64,
    /// `{p}:held`: fields no script writes, counts that are not non-negative integers.
    pub held: u64,
}

impl SkippedValues {
    /// The counts under the names `/metrics` labels them with.
    pub fn by_key(&self) -> [(&'static str, u64); 4] {
        [
            ("depth", self.depth),
            ("counters", self.counters),
            ("heads", self.heads),
            ("held", self.held),
        ]
    }

    pub fn total(&self) -> u64 {
        self.depth + self.counters + self.heads + self.held
    }
}

/// Which key a skipped value came from.
#[derive(Debug, Clone, Copy)]
pub(super) enum Source {
    Depth,
    Counters,
    Heads,
    Held,
}

/// What one stats read skipped: complete counts, and a few examples for the log.
#[derive(Debug, Default)]
pub(super) struct Skips {
    pub counts: SkippedValues,
    /// At most [`EXAMPLES`] descriptions, each bounded and escaped by [`shown`].
    pub examples: Vec<String>,
}

impl Skips {
    fn skip(&mut self, from: Source, n: u64, example: impl FnOnce() -> String) {
        if n == 0 {
            return;
        }
        let c = &mut self.counts;
        *match from {
            Source::Depth => &mut c.depth,
            Source::Counters => &mut c.counters,
            Source::Heads => &mut c.heads,
            Source::Held => &mut c.held,
        } += n;
        if self.examples.len() < EXAMPLES {
            // Names and values anyone wrote to Redis: bounded and escaped for the log.
            self.examples
                .push(crate::redact::Field::new(example()).to_string());
        }
    }
}

/// A count as `HINCRBY` keeps it: decimal digits, no sign, no leading zero, at most `i64::MAX`.
/// Anything else (a float, a negative, a huge number, bytes that are not text) was not written
/// by a queue script.
pub(super) fn parse_count(raw: &[u8]) -> Option<u64> {
    if raw.is_empty() || !raw.iter().all(u8::is_ascii_digit) || (raw.len() > 1 && raw[0] == b'0') {
        return None;
    }
    let n: i64 = std::str::from_utf8(raw).ok()?.parse().ok()?;
    u64::try_from(n).ok()
}

/// A value for a log line: at most [`SHOWN_BYTES`] of it, escaped (quotes, newlines, control
/// characters), so a hostile value can neither flood the log nor forge lines in it.
pub(super) fn shown(raw: &[u8]) -> String {
    let head = String::from_utf8_lossy(&raw[..raw.len().min(SHOWN_BYTES)]);
    let mut s = format!("\"{}\"", head.escape_debug());
    if raw.len() > SHOWN_BYTES {
        s.push_str(&format!("... ({} bytes)", raw.len()));
    }
    s
}

/// One hash's replies, `HLEN` and then `HMGET` of `names`, field by field: a name maps to its
/// count, or to `None` when its value does not parse (or the key is not a hash at all); a name
/// with no field is absent. Each unparsable value, each field under another name, and a key of
/// the wrong type count as skipped.
pub(super) fn read_counts<'n>(
    from: Source,
    key: &str,
    names: &[&'n str],
    len: &Value,
    values: &Value,
    skips: &mut Skips,
) -> BTreeMap<&'n str, Option<u64>> {
    let (Value::Int(len), Value::Array(values)) = (len, values) else {
        // A wrong type (someone SET the key) answers an error to both commands.
        skips.skip(from, 1, || format!("{key} is not a hash"));
        return names.iter().map(|n| (*n, None)).collect();
    };
    let mut out = BTreeMap::new();
    for (name, v) in names.iter().zip(values) {
        let count = match v {
            Value::Nil => continue,
            Value::BulkString(raw) => parse_count(raw).ok_or_else(|| shown(raw)),
            _ => Err("a reply that is not a string".to_owned()),
        };
        out.insert(*name, count.as_ref().ok().copied());
        if let Err(what) = count {
            skips.skip(from, 1, || format!("{key} {name} = {what}"));
        }
    }
    // Fields are never deleted by the scripts, and HLEN ran first: a field added in between
    // can only make this too small, never count a field that is fine.
    let unknown = u64::try_from(*len)
        .unwrap_or(0)
        .saturating_sub(out.len() as u64);
    skips.skip(from, unknown, || {
        format!("{key}: {unknown} fields aiq does not write (HKEYS shows them)")
    });
    out
}

/// A score as the reply carries it: text in RESP2, a double in RESP3.
fn score(v: &Value) -> Option<f64> {
    match v {
        Value::Double(f) => Some(*f),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        Value::SimpleString(s) => s.parse().ok(),
        _ => None,
    }
}

/// One tier's heads replies: `ZRANGEBYSCORE key 0 (+inf WITHSCORES LIMIT 0 1` (the oldest head
/// with a real time), then `ZCOUNT key -inf (0` and `ZCOUNT key +inf +inf` (the members whose
/// score no script writes). Returns when the oldest head became ready (ms), if any.
pub(super) fn read_head(
    key: &str,
    oldest: &Value,
    negative: &Value,
    infinite: &Value,
    skips: &mut Skips,
) -> Option<u64> {
    let (Value::Array(oldest), Value::Int(negative), Value::Int(infinite)) =
        (oldest, negative, infinite)
    else {
        skips.skip(Source::Heads, 1, || format!("{key} is not a sorted set"));
        return None;
    };
    let bad = u64::try_from(*negative).unwrap_or(0) + u64::try_from(*infinite).unwrap_or(0);
    skips.skip(Source::Heads, bad, || {
        format!("{key}: {bad} members scored below 0 or infinite")
    });
    // RESP2 answers [member, score]; RESP3 answers [[member, score]].
    let s = match oldest.as_slice() {
        [] => return None,
        [Value::Array(pair)] => pair.get(1),
        flat => flat.get(1),
    };
    match s.and_then(score) {
        Some(ms) if ms.is_finite() && ms >= 0.0 => Some(ms as u64),
        _ => {
            skips.skip(Source::Heads, 1, || format!("{key}: an unreadable score"));
            None
        }
    }
}

/// Says what a stats read skipped, at most once a minute per process: the values stay in Redis
/// until someone removes them, and every scrape finds them again. The counts keep counting in
/// `aiq_metrics_bad_redis_values_total` meanwhile.
pub(super) fn warn(queue: &str, skips: &Skips) {
    static LAST: AtomicU64 = AtomicU64::new(0);
    const EVERY_SECS: u64 = 60;
    if skips.counts.total() == 0 {
        return;
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let last = LAST.load(Ordering::Relaxed);
    if last != 0 && now < last + EVERY_SECS {
        return;
    }
    if LAST
        .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
        .is_err()
    {
        // Another read is warning right now.
        return;
    }
    let c = skips.counts;
    tracing::warn!(
        queue,
        depth = c.depth,
        counters = c.counters,
        heads = c.heads,
        held = c.held,
        examples = %skips.examples.join("; "),
        "queue stats skipped values in Redis that no aiq script writes; the metrics leave them out"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    const TIERS: [&str; 2] = ["trial", "growth_team"];

    fn bulk(s: &[u8]) -> Value {
        Value::BulkString(s.to_vec())
    }

    #[test]
    fn a_count_is_only_what_hincrby_writes() {
        assert_eq!(parse_count(b"0"), Some(0));
        assert_eq!(parse_count(b"42"), Some(42));
        assert_eq!(parse_count(b"9223372036854775807"), Some(i64::MAX as u64));
        for bad in [
            &b""[..],
            b"abc",
            b"1.5",
            b"1.5e999",
            b"1e3",
            b"-3",
            b"-0",
            b"+7",
            b" 7",
            b"7\n",
            b"007",
            b"9223372036854775808",
            b"99999999999999999999999999",
            b"\xff\xfe",
            b"NaN",
            b"inf",
        ] {
            assert_eq!(parse_count(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_skipped_value_is_shown_escaped_and_truncated() {
        let s = shown(b"x\"} 1\nevil{a=\"");
        assert_eq!(s, r#""x\"} 1\nevil{a=\"""#);
        assert!(!s.contains('\n'));
        let long = shown(&[b'a'; 10_000]);
        assert!(long.len() < 80, "{long}");
        assert!(long.ends_with("... (10000 bytes)"), "{long}");
        // Bytes that are not text come out as replacement characters, control bytes escaped.
        assert_eq!(shown(b"\xff\x00"), "\"\u{fffd}\\0\"");
    }

    #[test]
    fn each_hash_value_is_parsed_on_its_own_and_unknown_fields_are_counted() {
        let mut skips = Skips::default();
        // trial is garbage, growth_team fine, and two fields under other names.
        let got = read_counts(
            Source::Depth,
            "{q}:depth",
            &TIERS,
            &Value::Int(4),
            &Value::Array(vec![bulk(b"1.5e999"), bulk(b"3")]),
            &mut skips,
        );
        assert_eq!(
            got,
            BTreeMap::from([("trial", None), ("growth_team", Some(3))])
        );
        assert_eq!(
            skips.counts,
            SkippedValues {
                depth: 3,
                ..Default::default()
            }
        );
        assert_eq!(skips.examples.len(), 2, "{:?}", skips.examples);
        assert!(skips.examples[0].contains("trial = \"1.5e999\""));

        // A missing field is simply absent, not skipped.
        let mut skips = Skips::default();
        let got = read_counts(
            Source::Counters,
            "{q}:counters",
            &TIERS,
            &Value::Int(1),
            &Value::Array(vec![Value::Nil, bulk(b"7")]),
            &mut skips,
        );
        assert_eq!(got, BTreeMap::from([("growth_team", Some(7))]));
        assert_eq!(skips.counts.total(), 0);
        assert!(skips.examples.is_empty());
    }

    #[test]
    fn a_key_of_the_wrong_type_is_one_skipped_value_not_an_error() {
        // What Redis answers to HLEN or ZCOUNT on a string key, as the pipeline hands it over.
        let err = redis::parse_redis_value(
            b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n",
        )
        .expect("an error reply parses as a value");
        assert!(matches!(err, Value::ServerError(_)), "{err:?}");
        let mut skips = Skips::default();
        let got = read_counts(
            Source::Counters,
            "{q}:counters",
            &TIERS,
            &err,
            &err,
            &mut skips,
        );
        assert_eq!(
            got,
            BTreeMap::from([("trial", None), ("growth_team", None)])
        );
        assert_eq!(skips.counts.counters, 1);
        assert_eq!(
            read_head("{q}:heads:trial", &err, &err, &err, &mut skips),
            None
        );
        assert_eq!(skips.counts.heads, 1);
    }

    #[test]
    fn a_head_score_that_is_not_a_time_is_counted_not_used() {
        let mut skips = Skips::default();
        let resp2 = Value::Array(vec![bulk(b"org"), bulk(b"1712345678901")]);
        let head = read_head("h", &resp2, &Value::Int(2), &Value::Int(1), &mut skips);
        assert_eq!(head, Some(1_712_345_678_901));
        assert_eq!(skips.counts.heads, 3);

        let resp3 = Value::Array(vec![Value::Array(vec![bulk(b"org"), Value::Double(5.0)])]);
        let mut skips = Skips::default();
        assert_eq!(
            read_head("h", &resp3, &Value::Int(0), &Value::Int(0), &mut skips),
            Some(5)
        );
        assert_eq!(
            read_head(
                "h",
                &Value::Array(vec![]),
                &Value::Int(0),
                &Value::Int(0),
                &mut skips
            ),
            None
        );
        assert_eq!(skips.counts.total(), 0);

        // A score Redis would never send still does not become an age.
        for garbage in [bulk(b"nan"), bulk(b"abc"), Value::Double(f64::INFINITY)] {
            let mut skips = Skips::default();
            let reply = Value::Array(vec![bulk(b"org"), garbage]);
            assert_eq!(
                read_head("h", &reply, &Value::Int(0), &Value::Int(0), &mut skips),
                None
            );
            assert_eq!(skips.counts.heads, 1);
        }
    }

    /// The fields the scripts `HINCRBY` on the counters hash, read from their source: a literal
    /// name, or settle.lua's `COUNTER[op]`, whose table is read too. Any other form fails, so a
    /// new way of counting has to be taught here rather than slip past.
    fn counters_written_by_scripts() -> BTreeSet<String> {
        let scripts = [
            ("enqueue.lua", crate::ENQUEUE_LUA),
            ("fetch.lua", include_str!("fetch.lua")),
            ("settle.lua", include_str!("settle.lua")),
            ("renew.lua", include_str!("renew.lua")),
            ("dead.lua", include_str!("dead.lua")),
            ("guard.lua", include_str!("guard.lua")),
            ("repair.lua", include_str!("repair.lua")),
            ("cancelled.lua", include_str!("cancelled.lua")),
            ("limits.lua", include_str!("limits.lua")),
            ("cancel.lua", crate::events::CANCEL_LUA),
        ];
        let quoted = |s: &str| -> Vec<String> {
            s.split('"').skip(1).step_by(2).map(str::to_owned).collect()
        };
        let mut out = BTreeSet::new();
        for (name, src) in scripts {
            for line in src.lines() {
                let Some((_, call)) = line.split_once("\"HINCRBY\",") else {
                    continue;
                };
                let call = call.trim_start();
                let Some(field) = call
                    .strip_prefix("counters,")
                    .or_else(|| call.strip_prefix("base .. \":counters\","))
                    .or_else(|| call.strip_prefix("G_base .. \":counters\","))
                else {
                    continue;
                };
                let field = field.trim_start();
                if field.starts_with('"') {
                    out.insert(quoted(field)[0].clone());
                } else if field.starts_with("COUNTER[") {
                    let table = src
                        .lines()
                        .find(|l| l.trim_start().starts_with("local COUNTER = {"))
                        .unwrap_or_else(|| panic!("{name}: COUNTER[] without its table"));
                    out.extend(quoted(table));
                } else {
                    panic!("{name}: a counter this test cannot read: {line}");
                }
            }
        }
        out
    }

    #[test]
    fn the_counter_events_are_exactly_those_the_queue_scripts_write() {
        let written = counters_written_by_scripts();
        let known: BTreeSet<String> = COUNTER_EVENTS.iter().map(|s| (*s).to_owned()).collect();
        assert_eq!(written, known);
        // The layout table in the module docs names the same list.
        let docs = include_str!("lib.rs")
            .lines()
            .find(|l| l.starts_with("//! | `{p}:counters`"))
            .expect("the counters row of the layout table");
        for e in COUNTER_EVENTS {
            assert!(docs.contains(e), "{e} is missing from {docs}");
        }
    }
}
