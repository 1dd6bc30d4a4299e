//! Outcomes as the apps see them (jobs/README.md, "Outcomes"): the delay reasons the scripts
//! write into a job's `deferred` event and hash, a job's status read from Redis in the
//! contract's one shape, `cancel.lua` (the apps' script) run from Rust, the cancelled jobs the
//! daemon drains, and the settings the scripts read from `{p}:config`. The events themselves
//! are appended by the scripts (`guard.lua`'s `event`, `enqueue.lua`, `cancel.lua`).

use std::collections::BTreeMap;
use std::sync::LazyLock;

use redis::{AsyncCommands, Script};

use crate::{Queue, QueueError};

/// The cancel script that apps in every language run; Rust uses it too.
pub const CANCEL_LUA: &str = include_str!("../../../jobs/cancel.lua");

static CANCEL: LazyLock<Script> = LazyLock::new(|| Script::new(CANCEL_LUA));
static FORGET_CANCELLED: LazyLock<Script> =
    LazyLock::new(|| crate::guarded(include_str!("cancelled.lua")));

/// Why a job is delayed: the `reason` of its `deferred` event and the `delay_reason` of its
/// hash. One closed list, the contract's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DelayReason {
    /// Enqueued with a delay.
    Scheduled,
    /// An attempt failed.
    Retry,
    /// A budget window is full; due when it resets.
    Budget,
    /// The organisation's jobs per minute.
    OrgRate,
    /// The provider's requests or tokens per minute.
    ProviderRate,
    /// The provider is paused after a 429.
    ProviderPaused,
    /// A circuit breaker is open.
    Breaker,
    /// The organisation's cap on running jobs.
    OrgInFlight,
    /// Redis or PostgreSQL is unreachable.
    Unavailable,
    Other,
}

impl DelayReason {
    pub const ALL: [DelayReason; 10] = [
        DelayReason::Scheduled,
        DelayReason::Retry,
        DelayReason::Budget,
        DelayReason::OrgRate,
        DelayReason::ProviderRate,
        DelayReason::ProviderPaused,
        DelayReason::Breaker,
        DelayReason::OrgInFlight,
        DelayReason::Unavailable,
        DelayReason::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DelayReason::Scheduled => "scheduled",
            DelayReason::Retry => "retry",
            DelayReason::Budget => "budget",
            DelayReason::OrgRate => "org_rate",
            DelayReason::ProviderRate => "provider_rate",
            DelayReason::ProviderPaused => "provider_paused",
            DelayReason::Breaker => "breaker",
            DelayReason::OrgInFlight => "org_in_flight",
            DelayReason::Unavailable => "unavailable",
            DelayReason::Other => "other",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

/// A job's state, as its status and events name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Waiting,
    Delayed,
    Running,
    Succeeded,
    Failed,
    Dead,
    Cancelled,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Waiting => "waiting",
            JobState::Delayed => "delayed",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Dead => "dead",
            JobState::Cancelled => "cancelled",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Dead | JobState::Cancelled
        )
    }

    /// A state as an outcome hash or event writes it.
    fn parse(s: &str) -> Option<Self> {
        [
            JobState::Waiting,
            JobState::Delayed,
            JobState::Running,
            JobState::Succeeded,
            JobState::Failed,
            JobState::Dead,
            JobState::Cancelled,
        ]
        .into_iter()
        .find(|st| st.as_str() == s)
    }
}

/// A job's status: the contract's one JSON shape (`aiq job show --json`, `getJob`, `get_job`).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct JobStatus {
    pub id: String,
    pub state: JobState,
    pub organization_id: String,
    pub tier: String,
    pub kind: String,
    pub attempts: u32,
    /// When a delayed job is due (ms, Redis time).
    pub due_at: Option<i64>,
    pub delay_reason: Option<String>,
    pub last_error: Option<String>,
    pub finished_at: Option<i64>,
    /// The result summary of a job that succeeded.
    pub result: Option<serde_json::Value>,
}

/// What `cancel.lua` answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cancel {
    Cancelled,
    Running,
    Finished,
    NotFound,
}

impl Cancel {
    pub fn as_str(self) -> &'static str {
        match self {
            Cancel::Cancelled => "cancelled",
            Cancel::Running => "running",
            Cancel::Finished => "finished",
            Cancel::NotFound => "not_found",
        }
    }
}

/// A job cancel.lua took out of the queue, waiting for the daemon to write its result row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CancelledJob {
    pub id: String,
    pub organization_id: String,
    pub tier: String,
    pub kind: String,
    pub attempts: u32,
    pub cancelled_at_ms: i64,
}

/// A job that died inside Redis (its interrupts ran out in fetch.lua, or a script buried its
/// corrupt hash), listed in `{p}:buried` until the daemon wrote its result row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuriedJob {
    /// The id as Redis holds it: [`Queue::forget_buried`] takes these bytes.
    pub raw_id: Vec<u8>,
    /// The id as text; `None` when it is not UTF-8 (no row can name it).
    pub id: Option<String>,
    /// False when it left the dead set since (retried or purged): nothing to write.
    pub dead: bool,
    pub organization_id: String,
    pub tier: String,
    pub kind: String,
    pub attempts: u32,
    pub reason: String,
}

/// The most events one stream entry may hold: a script call writes one entry, and no call
/// changes more jobs than this (settle takes 200 items, fetch leases at most its batch).
pub const MAX_EVENTS_PER_ENTRY: usize = 10_000;

/// One event of `{p}:events` (jobs/README.md, "Events"): its position, and its fields by name
/// (the common ones and its type's own; a field the event lacks is absent, never "").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamEvent {
    /// The entry's stream id when the entry holds this one event, else `<stream id>/<index>`
    /// (0-based): a reader that resumes after it sees every later event once.
    pub position: String,
    pub fields: BTreeMap<String, String>,
}

impl StreamEvent {
    /// A field's value, or "" when the event lacks it.
    pub fn get(&self, name: &str) -> &str {
        self.fields.get(name).map_or("", String::as_str)
    }
}

/// The events one stream entry holds, in the order they happened, from its id and its fields
/// as XRANGE or XREAD give them. An entry of one event is that event's fields; an entry of
/// n > 1 events has the field `n` and each field's n values joined by line feeds. An entry that
/// is not that shape (an app may write anything to the stream) is refused with the reason.
pub fn entry_events(id: &str, fields: &[(String, String)]) -> Result<Vec<StreamEvent>, String> {
    let mut names = std::collections::BTreeSet::new();
    for (name, _) in fields {
        if !names.insert(name.as_str()) {
            return Err(format!("field {name:?} appears twice"));
        }
    }
    let n = match fields.iter().find(|(name, _)| name == "n") {
        None => 1,
        Some((_, v)) => match v.parse::<usize>() {
            Ok(n) if (2..=MAX_EVENTS_PER_ENTRY).contains(&n) => n,
            _ => {
                return Err(format!(
                    "n is {v:?}, not a count from 2 to {MAX_EVENTS_PER_ENTRY}"
                ));
            }
        },
    };
    if n == 1 {
        let fields = fields
            .iter()
            .filter(|(_, v)| !v.is_empty())
            .cloned()
            .collect();
        return Ok(vec![StreamEvent {
            position: id.to_owned(),
            fields,
        }]);
    }
    let mut events: Vec<StreamEvent> = (0..n)
        .map(|i| StreamEvent {
            position: format!("{id}/{i}"),
            fields: BTreeMap::new(),
        })
        .collect();
    for (name, value) in fields.iter().filter(|(name, _)| name != "n") {
        let values: Vec<&str> = value.split('\n').collect();
        if values.len() != n {
            return Err(format!(
                "field {name:?} has {} values, not {n}",
                values.len()
            ));
        }
        for (event, v) in events.iter_mut().zip(values) {
            if !v.is_empty() {
                event.fields.insert(name.clone(), v.to_owned());
            }
        }
    }
    Ok(events)
}

/// Stream entries each window of [`Queue::job_events`] reads.
pub const JOB_EVENTS_WINDOW: usize = 500;
/// The most events of one job [`Queue::job_events`] keeps: the first and the last half of
/// them (a hand-written stream could name one job in every event of every entry).
pub const JOB_EVENTS_MAX: usize = 400;
/// How long before a known time a window starts. A script reads Redis's clock (TIME) once,
/// near its start, and writes that time into the hash; XADD stamps its entry with the server's
/// clock at the XADD (Redis 7.0: the same ms or later) or at the script's start (7.2 and
/// later: up to the moment before TIME, so the same ms or the one before). A few ms cover
/// both; a longer lead would let a burst of other entries fill the window before the job's.
const WINDOW_LEAD_MS: u64 = 5;
/// The fields of a job's hash that hold the time of one of its changes.
const JOB_TIMES: [&str; 4] = ["enqueued_at", "ready_at", "leased_at", "dead_at"];
const TERMINAL_EVENTS: [&str; 4] = ["succeeded", "failed", "dead", "cancelled"];

/// One job's events as bounded reads of `{p}:events` at its known times found them
/// ([`Queue::job_events`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobEvents {
    /// This job's events, in the order they happened, each once.
    pub events: Vec<StreamEvent>,
    /// Stream entries the windows held that name this job but are not the contract's shape,
    /// skipped.
    pub skipped: usize,
    /// Whether some of the job's events may be missing: its `created` event was not found, a
    /// window filled up before the next one began, the last one filled up before the job's
    /// end, or it had more than [`JOB_EVENTS_MAX`] events.
    pub incomplete: bool,
    /// `{p}:config` says events are off.
    pub off: bool,
    /// The stream begins after the job's first known time (or holds nothing): its first events
    /// were trimmed.
    pub trimmed: bool,
    /// Stream entries read in all (at most two windows and one more for the stream's start).
    pub read: usize,
}

impl JobEvents {
    /// Whether the last event found ends the job (`succeeded`, `failed`, `dead`, `cancelled`).
    /// A job whose status is final but whose last event found is not lacks its end here.
    pub fn ended(&self) -> bool {
        self.events
            .last()
            .is_some_and(|e| TERMINAL_EVENTS.contains(&e.get("type")))
    }
}

/// The time a queue id carries (`j-<Redis time in s><usec>-<n>`), in ms: when it was enqueued.
fn queue_id_ms(id: &str) -> Option<u64> {
    let digits = id.strip_prefix("j-")?.split('-').next()?;
    if digits.len() < 7 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits[..digits.len() - 3].parse().ok()
}

/// A reply's text values (a bulk string, or an array of them), lossily.
fn texts(v: &redis::Value) -> Vec<String> {
    match v {
        redis::Value::BulkString(b) => vec![String::from_utf8_lossy(b).into_owned()],
        redis::Value::SimpleString(s) => vec![s.clone()],
        redis::Value::VerbatimString { text, .. } => vec![text.clone()],
        redis::Value::Int(n) => vec![n.to_string()],
        redis::Value::Array(items) => items.iter().flat_map(texts).collect(),
        _ => Vec::new(),
    }
}

/// One stream id's two numbers, for ordering entries.
fn stream_id(id: &str) -> Option<(u64, u64)> {
    let (ms, seq) = id.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

/// A reply's bytes, when it is a string.
fn bytes(v: &redis::Value) -> Option<&[u8]> {
    match v {
        redis::Value::BulkString(b) => Some(b),
        redis::Value::SimpleString(s) => Some(s.as_bytes()),
        redis::Value::VerbatimString { text, .. } => Some(text.as_bytes()),
        _ => None,
    }
}

/// An entry's field and value pairs as Redis sent them (a flat list, or a map).
fn pairs(fields: &redis::Value) -> Vec<(&redis::Value, Option<&redis::Value>)> {
    match fields {
        redis::Value::Map(kv) => kv.iter().map(|(k, v)| (k, Some(v))).collect(),
        redis::Value::Array(flat) => flat.chunks(2).map(|c| (&c[0], c.get(1))).collect(),
        _ => Vec::new(),
    }
}

/// What one XRANGE reply held: its number of entries, its last entry's id, and the entries
/// with a `job_id` line that is `only` (every entry when `None`) as (id, fields), values that
/// are not UTF-8 read lossily. The other entries are not copied. A reply that is not a list
/// of entries (the key is not a stream) holds none.
#[derive(Debug, Default)]
struct Window {
    count: usize,
    last: Option<(u64, u64)>,
    kept: Vec<(String, Vec<(String, String)>)>,
}

fn stream_entries(v: &redis::Value, only: Option<&str>) -> Window {
    let redis::Value::Array(entries) = v else {
        return Window::default();
    };
    let text = |v: Option<&redis::Value>| {
        v.and_then(bytes)
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .unwrap_or_default()
    };
    let mut w = Window {
        count: entries.len(),
        ..Window::default()
    };
    for e in entries {
        let redis::Value::Array(parts) = e else {
            continue;
        };
        let [id, fields] = parts.as_slice() else {
            continue;
        };
        let Some(id) = bytes(id).map(String::from_utf8_lossy) else {
            continue;
        };
        w.last = stream_id(&id).or(w.last);
        let pairs = pairs(fields);
        let names = |job: &str| {
            pairs.iter().any(|(k, v)| {
                bytes(k) == Some(b"job_id".as_slice())
                    && v.and_then(|v| bytes(v))
                        .is_some_and(|v| v.split(|b| *b == b'\n').any(|l| l == job.as_bytes()))
            })
        };
        if only.is_none_or(names) {
            let fields = pairs
                .iter()
                .map(|(k, v)| (text(Some(k)), text(*v)))
                .collect();
            w.kept.push((id.into_owned(), fields));
        }
    }
    w
}

/// The longest result summary a status parses (a hand-written one could be megabytes).
const MAX_RESULT_BYTES: usize = 64 * 1024;
/// Text fields of a status are cut to this many bytes.
const MAX_TEXT_BYTES: usize = 4096;

fn cut(mut s: String) -> String {
    if s.len() > MAX_TEXT_BYTES {
        let mut end = MAX_TEXT_BYTES;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// Values of a hash as HMGET gives them: absent or not UTF-8 is `None`.
fn fields(names: &[&'static str], values: Vec<Option<Vec<u8>>>) -> BTreeMap<&'static str, String> {
    names
        .iter()
        .zip(values)
        .filter_map(|(n, v)| Some((*n, String::from_utf8(v?).ok()?)))
        .collect()
}

const JOB_FIELDS: [&str; 11] = [
    "state",
    "org",
    "tier",
    "kind",
    "attempts",
    "due_at",
    "delay_reason",
    "last_error",
    "dead_reason",
    "dead_at",
    "outcome",
];
const OUTCOME_FIELDS: [&str; 8] = [
    "state",
    "org",
    "tier",
    "kind",
    "attempts",
    "finished_at",
    "error",
    "result",
];

/// A job's status from its hash (and the delayed set's score, for a job delayed before its hash
/// carried `due_at`); `None` when the hash holds no state the contract knows.
fn from_job(id: &str, f: &BTreeMap<&str, String>, due_score: Option<i64>) -> Option<JobStatus> {
    let text = |k: &str| f.get(k).filter(|v| !v.is_empty()).cloned().map(cut);
    let number = |k: &str| f.get(k).and_then(|v| v.parse::<i64>().ok());
    let state = match f.get("state")?.as_str() {
        "waiting" => JobState::Waiting,
        "delayed" => JobState::Delayed,
        "inflight" => JobState::Running,
        "cancelled" => JobState::Cancelled,
        "dead" => match f.get("outcome").map(String::as_str) {
            Some("failed") => JobState::Failed,
            _ => JobState::Dead,
        },
        _ => return None,
    };
    let delayed = state == JobState::Delayed;
    Some(JobStatus {
        id: id.to_owned(),
        state,
        organization_id: text("org").unwrap_or_default(),
        tier: text("tier").unwrap_or_default(),
        kind: text("kind").unwrap_or_default(),
        attempts: f.get("attempts").and_then(|v| v.parse().ok()).unwrap_or(0),
        due_at: delayed.then(|| number("due_at").or(due_score)).flatten(),
        delay_reason: delayed.then(|| text("delay_reason")).flatten(),
        last_error: text("last_error").or_else(|| text("dead_reason")),
        finished_at: matches!(state, JobState::Dead | JobState::Failed)
            .then(|| number("dead_at"))
            .flatten(),
        result: None,
    })
}

fn from_outcome(id: &str, f: &BTreeMap<&str, String>) -> Option<JobStatus> {
    let state = JobState::parse(f.get("state")?).filter(|s| s.is_terminal())?;
    let text = |k: &str| f.get(k).filter(|v| !v.is_empty()).cloned().map(cut);
    let result = f
        .get("result")
        .filter(|r| r.len() <= MAX_RESULT_BYTES)
        .and_then(|r| serde_json::from_str::<serde_json::Value>(r).ok())
        .filter(|v| !v.is_null());
    Some(JobStatus {
        id: id.to_owned(),
        state,
        organization_id: text("org").unwrap_or_default(),
        tier: text("tier").unwrap_or_default(),
        kind: text("kind").unwrap_or_default(),
        attempts: f.get("attempts").and_then(|v| v.parse().ok()).unwrap_or(0),
        due_at: None,
        delay_reason: None,
        last_error: text("error"),
        finished_at: f.get("finished_at").and_then(|v| v.parse().ok()),
        result,
    })
}

impl Queue {
    /// Writes the settings the scripts read (`{p}:config`): the daemon does it at start, so
    /// apps' enqueue.lua and cancel.lua, which take no settings, follow them too.
    pub async fn write_config(&self) -> Result<(), QueueError> {
        let e = &self.settings.events;
        let mut conn = self.conn.clone();
        let _: () = conn
            .hset_multiple(
                self.key("config"),
                &[
                    ("events", if e.on { "on" } else { "off" }.to_owned()),
                    ("events_max_len", e.max_len.to_string()),
                    ("events_max_age_ms", e.max_age.as_millis().to_string()),
                    (
                        "outcomes_max_age_ms",
                        e.outcomes_max_age.as_millis().to_string(),
                    ),
                    ("outcomes_max_jobs", e.outcomes_max_jobs.to_string()),
                ],
            )
            .await?;
        Ok(())
    }

    /// A job's status as Redis knows it: its hash (waiting, delayed, running, dead or failed,
    /// cancelled), else its kept outcome; `None` when Redis knows neither.
    pub async fn status(&self, id: &str) -> Result<Option<JobStatus>, QueueError> {
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        pipe.cmd("HMGET")
            .arg(self.key(&format!("job:{id}")))
            .arg(&JOB_FIELDS)
            .cmd("HMGET")
            .arg(self.key(&format!("outcome:{id}")))
            .arg(&OUTCOME_FIELDS)
            .zscore(self.key("delayed"), id);
        let replies: Vec<redis::Value> = pipe.query_async(&mut conn).await?;
        let [job, outcome, score] = <[redis::Value; 3]>::try_from(replies)
            .map_err(|r| QueueError::Protocol(format!("status: {} replies", r.len())))?;
        // A key of the wrong type (written by hand) reads as nothing.
        let values = |v: &redis::Value, n: usize| {
            redis::from_redis_value_ref::<Vec<Option<Vec<u8>>>>(v).unwrap_or_else(|_| vec![None; n])
        };
        let score = redis::from_redis_value_ref::<Option<f64>>(&score)
            .ok()
            .flatten()
            .map(|s| s as i64);
        let job = fields(&JOB_FIELDS, values(&job, JOB_FIELDS.len()));
        if let Some(s) = from_job(id, &job, score) {
            return Ok(Some(s));
        }
        let outcome = fields(&OUTCOME_FIELDS, values(&outcome, OUTCOME_FIELDS.len()));
        Ok(from_outcome(id, &outcome))
    }

    /// A job's events from `{p}:events`, which has no index by job: read in at most two
    /// windows of [`JOB_EVENTS_WINDOW`] entries each, forward from the job's first known time
    /// and from its last (the times its hash and outcome hold, the time a queue id carries, and
    /// `hints`, e.g. the result row's), keeping only this job's events. Two round trips: the
    /// times, then the windows with the stream's first entry and `{p}:config`'s `events`, in
    /// one pipeline. What the windows may have missed, trimmed or skipped is said in the
    /// answer, never guessed.
    pub async fn job_events(&self, id: &str, hints: &[u64]) -> Result<JobEvents, QueueError> {
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        pipe.cmd("HMGET")
            .arg(self.key(&format!("job:{id}")))
            .arg(&JOB_TIMES)
            .cmd("HGET")
            .arg(self.key(&format!("outcome:{id}")))
            .arg("finished_at");
        let replies: Vec<redis::Value> = pipe.query_async(&mut conn).await?;
        let mut times: Vec<u64> = replies
            .iter()
            .flat_map(texts)
            .filter_map(|t| t.parse().ok())
            .chain(queue_id_ms(id))
            .chain(hints.iter().copied())
            .filter(|t| *t > 0)
            .collect();
        times.sort_unstable();
        let (Some(&first), Some(&last)) = (times.first(), times.last()) else {
            // Nothing says when the job lived: no window to read.
            return Ok(JobEvents {
                incomplete: true,
                ..JobEvents::default()
            });
        };
        let mut starts = vec![first.saturating_sub(WINDOW_LEAD_MS)];
        if last > first + WINDOW_LEAD_MS {
            starts.push(last - WINDOW_LEAD_MS);
        }
        let stream = self.key("events");
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        pipe.cmd("HGET").arg(self.key("config")).arg("events");
        pipe.cmd("XRANGE")
            .arg(&stream)
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(1);
        for start in &starts {
            pipe.cmd("XRANGE")
                .arg(&stream)
                .arg(format!("{start}-0"))
                .arg("+")
                .arg("COUNT")
                .arg(JOB_EVENTS_WINDOW);
        }
        let replies: Vec<redis::Value> = pipe.query_async(&mut conn).await?;
        let [config, head, windows @ ..] = replies.as_slice() else {
            return Err(QueueError::Protocol(format!(
                "job events: {} replies",
                replies.len()
            )));
        };
        let mut out = JobEvents {
            off: texts(config).first().map(String::as_str) == Some("off"),
            ..JobEvents::default()
        };
        let stream_start = stream_entries(head, None).last;
        out.read = usize::from(stream_start.is_some());
        // Each window: where it began, whether it filled up, its last entry.
        let mut read = Vec::new();
        let mut entries = BTreeMap::new();
        for (start, w) in starts.iter().zip(windows) {
            // Only an entry with a job_id line of this id can hold one of its events: the rest
            // are neither copied nor decoded.
            let got = stream_entries(w, Some(id));
            out.read += got.count;
            read.push((*start, got.count >= JOB_EVENTS_WINDOW, got.last));
            for (entry_id, fields) in got.kept {
                match stream_id(&entry_id) {
                    Some(key) => {
                        entries.entry(key).or_insert((entry_id, fields));
                    }
                    None => out.skipped += 1,
                }
            }
        }
        let half = JOB_EVENTS_MAX / 2;
        let mut tail = std::collections::VecDeque::with_capacity(half);
        let mut dropped = false;
        for (entry_id, fields) in entries.values() {
            let Ok(events) = entry_events(entry_id, fields) else {
                out.skipped += 1;
                continue;
            };
            for e in events.into_iter().filter(|e| e.get("job_id") == id) {
                if out.events.len() < half {
                    out.events.push(e);
                } else {
                    if tail.len() == half {
                        tail.pop_front();
                        dropped = true;
                    }
                    tail.push_back(e);
                }
            }
        }
        out.events.extend(tail);
        let created = out.events.iter().any(|e| e.get("type") == "created");
        let ended = out.ended();
        let gap = read
            .windows(2)
            .any(|w| w[0].1 && w[0].2.is_some_and(|last| last < (w[1].0, 0)));
        let open_end = read.last().is_some_and(|w| w.1) && !ended;
        out.incomplete = !created || gap || open_end || dropped;
        out.trimmed = !created && stream_start.is_none_or(|(ms, _)| ms > first);
        Ok(out)
    }

    /// Runs `cancel.lua` for `id` (see its header).
    pub async fn cancel(&self, id: &str) -> Result<Cancel, QueueError> {
        let mut conn = self.conn.clone();
        let reply: Result<String, redis::RedisError> =
            CANCEL.key(&self.base).arg(id).invoke_async(&mut conn).await;
        match reply {
            Ok(s) => match s.as_str() {
                "cancelled" => Ok(Cancel::Cancelled),
                "running" => Ok(Cancel::Running),
                "finished" => Ok(Cancel::Finished),
                "not_found" => Ok(Cancel::NotFound),
                other => Err(QueueError::Protocol(format!("cancel returned {other:?}"))),
            },
            Err(e) if e.to_string().contains("aiq:") => Err(QueueError::Refused(e.to_string())),
            Err(e) => Err(e.into()),
        }
    }

    /// The oldest jobs cancel.lua took out, at most `limit`, for the daemon to write their rows.
    /// An entry that names no cancelled job (its hash is gone or in another state, its id is not
    /// UTF-8: written by hand, or forgotten by another process in between) is removed from
    /// `{p}:cancelled` here, so it can never hold up the entries behind it. cancel.lua sets the
    /// state and adds the entry in one script, so such an entry can never become a job's.
    pub async fn cancelled_jobs(&self, limit: usize) -> Result<Vec<CancelledJob>, QueueError> {
        let mut conn = self.conn.clone();
        let ids: Vec<(Vec<u8>, f64)> = conn
            .zrange_withscores(self.key("cancelled"), 0, limit.max(1) as isize - 1)
            .await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let names = ["state", "org", "tier", "kind", "attempts"];
        let keys: Vec<Vec<u8>> = ids.iter().map(|(id, _)| id.clone()).collect();
        let replies = self.jobs_fields(&keys, &names).await?;
        let mut out = Vec::with_capacity(ids.len());
        let mut stale: Vec<Vec<u8>> = Vec::new();
        for ((id, score), values) in ids.into_iter().zip(replies) {
            let f = fields(&names, values);
            if f.get("state").map(String::as_str) != Some("cancelled")
                || std::str::from_utf8(&id).is_err()
            {
                stale.push(id);
                continue;
            }
            let id = String::from_utf8(id).unwrap_or_default();
            out.push(CancelledJob {
                id,
                organization_id: f.get("org").cloned().unwrap_or_default(),
                tier: f.get("tier").cloned().unwrap_or_default(),
                kind: f.get("kind").cloned().unwrap_or_default(),
                attempts: f.get("attempts").and_then(|v| v.parse().ok()).unwrap_or(0),
                cancelled_at_ms: score as i64,
            });
        }
        if !stale.is_empty() {
            tracing::warn!(
                entries = stale.len(),
                "{{p}}:cancelled named jobs that are not cancelled (or ids that are not UTF-8): removed"
            );
            let _: redis::Value = redis::cmd("ZREM")
                .arg(self.key("cancelled"))
                .arg(&stale)
                .query_async(&mut conn)
                .await?;
        }
        Ok(out)
    }

    /// After their rows are written: removes cancelled jobs' hashes and their `{p}:cancelled`
    /// entries (an app's own id keeps its `{p}:done:<id>` marker, as a finished job does), and
    /// drops entries whose job is gone. Returns how many were removed.
    pub async fn forget_cancelled(&self, ids: &[String]) -> Result<usize, QueueError> {
        let mut n = 0;
        for chunk in ids.chunks(crate::SCRIPT_CHUNK) {
            let mut conn = self.conn.clone();
            let mut inv = FORGET_CANCELLED.key(&self.base);
            inv.arg(self.settings.idempotency_ttl.as_secs());
            for id in chunk {
                inv.arg(id);
            }
            let removed: i64 = inv.invoke_async(&mut conn).await?;
            n += removed.max(0) as usize;
        }
        Ok(n)
    }

    /// The oldest jobs that died inside Redis without a result row, at most `limit`, each as
    /// its hash reads now (a hash that is gone or not dead any more says so in `dead`).
    pub async fn buried_jobs(&self, limit: usize) -> Result<Vec<BuriedJob>, QueueError> {
        let mut conn = self.conn.clone();
        let ids: Vec<Vec<u8>> = conn
            .zrange(self.key("buried"), 0, limit.max(1) as isize - 1)
            .await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let names = ["state", "org", "tier", "kind", "attempts", "dead_reason"];
        let replies = self.jobs_fields(&ids, &names).await?;
        Ok(ids
            .into_iter()
            .zip(replies)
            .map(|(raw_id, values)| {
                let f = fields(&names, values);
                let text = |name: &str| f.get(name).cloned().unwrap_or_default();
                BuriedJob {
                    id: String::from_utf8(raw_id.clone()).ok(),
                    raw_id,
                    dead: f.get("state").map(String::as_str) == Some("dead"),
                    organization_id: text("org"),
                    tier: text("tier"),
                    kind: text("kind"),
                    attempts: f.get("attempts").and_then(|v| v.parse().ok()).unwrap_or(0),
                    reason: text("dead_reason"),
                }
            })
            .collect())
    }

    /// Takes these ids out of `{p}:buried` (their rows are written, or there is none to
    /// write); the jobs stay in the dead set. Returns how many were listed.
    pub async fn forget_buried(&self, ids: &[Vec<u8>]) -> Result<usize, QueueError> {
        let mut n = 0;
        for chunk in ids.chunks(crate::SCRIPT_CHUNK) {
            let mut conn = self.conn.clone();
            let removed: usize = conn.zrem(self.key("buried"), chunk).await?;
            n += removed;
        }
        Ok(n)
    }

    /// Jobs that died inside Redis whose rows the daemon has not written yet.
    pub async fn buried_count(&self) -> Result<u64, QueueError> {
        let mut conn = self.conn.clone();
        Ok(conn.zcard(self.key("buried")).await?)
    }

    /// Every cancelled job not yet forgotten (0 once the daemon drained them).
    pub async fn cancelled_count(&self) -> Result<u64, QueueError> {
        let mut conn = self.conn.clone();
        Ok(conn.zcard(self.key("cancelled")).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_delay_reason_parses_back_from_its_word() {
        for r in DelayReason::ALL {
            assert_eq!(DelayReason::parse(r.as_str()), Some(r));
        }
        assert_eq!(DelayReason::parse("Budget"), None);
        assert_eq!(DelayReason::parse(""), None);
    }

    fn kv(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    /// How guard.lua writes a call's events: one entry, `n` and the columns when more than one.
    fn encode(events: &[Vec<(String, String)>]) -> Vec<(String, String)> {
        let flat = |v: &str| v.replace('\n', " ");
        if let [one] = events {
            return one.iter().map(|(k, v)| (k.clone(), flat(v))).collect();
        }
        let mut names: Vec<String> = Vec::new();
        for e in events {
            for (k, _) in e {
                if !names.contains(k) {
                    names.push(k.clone());
                }
            }
        }
        let mut out = vec![("n".to_owned(), events.len().to_string())];
        for name in names {
            let col: Vec<String> = events
                .iter()
                .map(|e| {
                    e.iter()
                        .find(|(k, _)| *k == name)
                        .map_or(String::new(), |(_, v)| flat(v))
                })
                .collect();
            out.push((name, col.join("\n")));
        }
        out
    }

    #[test]
    fn an_entry_of_one_event_is_its_fields_at_the_entrys_id() {
        let got = entry_events(
            "1764626400123-0",
            &kv(&[("type", "created"), ("job_id", "j-1"), ("until", "")]),
        )
        .unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].position, "1764626400123-0");
        assert_eq!(got[0].get("type"), "created");
        assert!(
            !got[0].fields.contains_key("until"),
            "an empty value is an absent field"
        );
    }

    #[test]
    fn an_entry_of_several_events_splits_each_field_by_line() {
        let got = entry_events(
            "5-1",
            &kv(&[
                ("n", "3"),
                ("type", "started\nsucceeded\nfailed"),
                ("job_id", "a\nb\nc"),
                ("result", "\n{\"provider\":\"openai\"}\n"),
                ("error", "\n\nquota exhausted"),
            ]),
        )
        .unwrap();
        let pos: Vec<&str> = got.iter().map(|e| e.position.as_str()).collect();
        assert_eq!(pos, ["5-1/0", "5-1/1", "5-1/2"]);
        assert_eq!((got[0].get("type"), got[0].get("job_id")), ("started", "a"));
        assert_eq!(got[1].get("result"), "{\"provider\":\"openai\"}");
        assert!(!got[1].fields.contains_key("error"));
        assert_eq!(
            (got[2].get("job_id"), got[2].get("error")),
            ("c", "quota exhausted")
        );
    }

    #[test]
    fn entries_of_the_wrong_shape_are_refused_with_the_reason() {
        for (fields, why) in [
            (
                kv(&[("n", "2"), ("job_id", "a\nb\nc")]),
                "has 3 values, not 2",
            ),
            (kv(&[("n", "2"), ("job_id", "a")]), "has 1 values, not 2"),
            (kv(&[("n", "1"), ("job_id", "a")]), "not a count"),
            (kv(&[("n", "two"), ("job_id", "a")]), "not a count"),
            (kv(&[("n", "99999999999999999999")]), "not a count"),
            (kv(&[("type", "a"), ("type", "b")]), "appears twice"),
        ] {
            let err = entry_events("1-0", &fields).unwrap_err();
            assert!(err.contains(why), "{fields:?}: {err}");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config::with_cases(2000))]

        /// What the scripts write reads back as the events they were given, in order, each
        /// value with its line feeds as spaces; no value can move another event's fields.
        #[test]
        fn a_calls_events_read_back_as_written(
            events in proptest::collection::vec(
                proptest::collection::btree_map(
                    proptest::sample::select(vec!["type", "job_id", "org", "tier", "attempts", "until", "error", "result"]),
                    "(.|\n){1,12}",
                    1..6,
                ),
                1..20,
            )
        ) {
            let events: Vec<Vec<(String, String)>> = events
                .into_iter()
                .map(|e| e.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
                .collect();
            let got = entry_events("7-0", &encode(&events)).unwrap();
            proptest::prop_assert_eq!(got.len(), events.len());
            for (i, (g, want)) in got.iter().zip(&events).enumerate() {
                if events.len() > 1 {
                    proptest::prop_assert_eq!(&g.position, &format!("7-0/{i}"));
                }
                let want: BTreeMap<String, String> = want
                    .iter()
                    .map(|(k, v)| (k.clone(), v.replace('\n', " ")))
                    .filter(|(_, v)| !v.is_empty())
                    .collect();
                proptest::prop_assert_eq!(&g.fields, &want);
            }
        }

        /// Whatever an entry holds, reading it never panics, and what it gives is whole.
        #[test]
        fn any_entry_reads_as_events_or_a_reason(
            fields in proptest::collection::vec(("(n|type|job_id|[a-z]{1,3})", "(\\PC|\n){0,24}"), 0..8)
        ) {
            if let Ok(events) = entry_events("1-0", &fields) {
                proptest::prop_assert!(!events.is_empty());
                for e in &events {
                    proptest::prop_assert!(e.fields.values().all(|v| !v.is_empty()));
                }
            }
        }
    }

    #[test]
    fn a_queue_id_carries_its_enqueue_time_and_an_apps_own_id_none() {
        assert_eq!(
            queue_id_ms("j-1764626400123456-42"),
            Some(1_764_626_400_123)
        );
        for id in [
            "order-17",
            "j-",
            "j-12x456789-1",
            "j-123-1",
            "J-1764626400123456-1",
        ] {
            assert_eq!(queue_id_ms(id), None, "{id}");
        }
    }

    #[test]
    fn stream_entries_read_bytes_that_are_not_utf8_and_keep_only_the_jobs_entries() {
        use redis::Value::{Array, BulkString, Int, Nil};
        let bulk = |b: &[u8]| BulkString(b.to_vec());
        let reply = Array(vec![
            Array(vec![
                bulk(b"5-1"),
                Array(vec![
                    bulk(b"type"),
                    bulk(b"created"),
                    bulk(b"job_id"),
                    bulk(b"a\xff"),
                ]),
            ]),
            Int(7),
            Array(vec![bulk(b"6-0")]),
            Array(vec![bulk(b"7-0"), Array(vec![bulk(b"odd")])]),
            Array(vec![
                bulk(b"8-0"),
                Array(vec![
                    bulk(b"n"),
                    bulk(b"2"),
                    bulk(b"job_id"),
                    bulk(b"b\nj-1"),
                ]),
            ]),
            Array(vec![
                bulk(b"9-0"),
                Array(vec![
                    bulk(b"job_id"),
                    bulk(b"j-10"),
                    bulk(b"type"),
                    bulk(b"x"),
                ]),
            ]),
        ]);
        let all = stream_entries(&reply, None);
        assert_eq!((all.count, all.last), (6, Some((9, 0))));
        let ids: Vec<&str> = all.kept.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(ids, ["5-1", "7-0", "8-0", "9-0"]);
        assert_eq!(all.kept[0].1[1], ("job_id".into(), "a\u{fffd}".into()));
        assert_eq!(all.kept[1].1, vec![("odd".into(), String::new())]);
        // A job's entries: a job_id line that is its id, not one that starts with it.
        let mine = stream_entries(&reply, Some("j-1"));
        assert_eq!((mine.count, mine.last), (6, Some((9, 0))));
        let ids: Vec<&str> = mine.kept.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(ids, ["8-0"]);
        assert_eq!(stream_entries(&Nil, None).count, 0);
        assert_eq!(stream_id("5-1"), Some((5, 1)));
        assert_eq!(stream_id("5"), None);
    }

    fn map(pairs: &[(&'static str, &str)]) -> BTreeMap<&'static str, String> {
        pairs.iter().map(|(k, v)| (*k, (*v).to_owned())).collect()
    }

    #[test]
    fn a_dead_hash_says_failed_or_dead_by_its_outcome_field() {
        let failed = map(&[("state", "dead"), ("outcome", "failed"), ("dead_at", "5")]);
        let s = from_job("j", &failed, None).expect("a status");
        assert_eq!((s.state, s.finished_at), (JobState::Failed, Some(5)));
        let dead = map(&[("state", "dead")]);
        assert_eq!(
            from_job("j", &dead, None).map(|s| s.state),
            Some(JobState::Dead)
        );
        assert_eq!(from_job("j", &map(&[("state", "bogus")]), None), None);
    }

    #[test]
    fn only_a_delayed_job_has_a_due_time_and_a_reason() {
        let delayed = map(&[("state", "delayed"), ("delay_reason", "budget")]);
        let s = from_job("j", &delayed, Some(42)).expect("a status");
        assert_eq!(
            (s.due_at, s.delay_reason.as_deref()),
            (Some(42), Some("budget"))
        );
        let waiting = map(&[
            ("state", "waiting"),
            ("due_at", "9"),
            ("delay_reason", "retry"),
        ]);
        let s = from_job("j", &waiting, None).expect("a status");
        assert_eq!((s.due_at, s.delay_reason), (None, None));
    }

    #[test]
    fn an_outcome_needs_a_terminal_state_and_its_result_must_be_json() {
        let ok = map(&[
            ("state", "succeeded"),
            ("result", r#"{"provider":"openai"}"#),
        ]);
        let s = from_outcome("j", &ok).expect("a status");
        assert_eq!(s.result, Some(serde_json::json!({"provider": "openai"})));
        let junk = map(&[("state", "succeeded"), ("result", "{not json")]);
        assert_eq!(from_outcome("j", &junk).and_then(|s| s.result), None);
        assert_eq!(from_outcome("j", &map(&[("state", "waiting")])), None);
    }
}
