//! aiq's queue engine: its own Redis layout and every Lua script that touches it, plus the apalis
//! backend over it (`backend`). Nothing else in aiq knows a queue key. It knows nothing of money
//! or AI: a job's kind is a name it stores (enqueue.lua, the apps' contract, checks it against the
//! kinds the apps may send), the daemon's `Precheck` and `Liveness` callbacks stand for the store
//! and the watchdog, and the daemon loads its settings ([`settings::Load`]).
//! With it live what a queue needs around it: the one Redis connection type (`conn`) and the
//! Redis side of TLS (`tls`), the tier and organisation it schedules by (`tenant`), and bounded
//! log fields (`redact`).
//!
//! Layout, every key under the hash tag `{prefix}` so one queue lives in one Cluster slot:
//!
//! | key | type | what |
//! |---|---|---|
//! | `{p}:job:<id>` | hash | kind, tier, org, payload, attempts, interrupts, max_attempts, token, state, ... |
//! | `{p}:orgs:<tier>` | list | organisations of the tier with waiting jobs, in round-robin order |
//! | `{p}:wait:<tier>:<org>` | list | waiting job ids of one organisation, FIFO |
//! | `{p}:heads:<tier>` | zset | organisations of the tier, scored by when their oldest waiting job became ready |
//! | `{p}:depth` | hash | waiting jobs per tier |
//! | `{p}:held` | hash | leased, delayed and dead jobs per tier (`inflight:<tier>`, `delayed:<tier>:<reason>`, `dead:<tier>`) |
//! | `{p}:minute:<m>` | hash | events per type in minute `m` since the epoch, kept two hours |
//! | `{p}:counters` | hash | running totals: enqueued, leased, done, retried, dead, released, deferred, interrupted, revived, purged, cancelled, events, capped (organisations passed over at their cap) |
//! | `{p}:inflight` | zset | leased job ids, scored by lease deadline (ms) |
//! | `{p}:delayed` | zset | job ids waiting for a retry or a deferral, scored by due time (ms) |
//! | `{p}:dead` | zset | dead job ids, scored by time of death (ms) |
//! | `{p}:idem:<org>:<key>` | string | first job id for an organisation's idempotency key, with a TTL |
//! | `{p}:kept:<id>` | string | an answer kept with a job while PostgreSQL could not take its rows |
//! | `{p}:sched` | hash | stride-scheduling pass values per tier |
//! | `{p}:seq` | string | counter for queue-assigned job ids |
//! | `{p}:events` | stream | one entry per change of a job's state (`events`) |
//! | `{p}:outcome:<id>` | hash | a finished job's state, attempts, error, result summary |
//! | `{p}:outcomes` | zset | finished jobs' ids, scored by finish time (ms) |
//! | `{p}:cancelled` | zset | jobs cancel.lua took out, until the daemon wrote their rows |
//! | `{p}:buried` | zset | jobs that died inside Redis (interrupts ran out, a corrupt hash), until the daemon wrote their rows |
//! | `{p}:config` | hash | the settings the scripts read (events on/off, the stream's and outcomes' bounds) |
//! | `{p}:org_inflight` | hash | leased jobs per organisation, for the fleet-wide cap fetch.lua keeps |
//! | `{p}:org_limits` | hash | per-organisation caps on leased jobs (0: none), the daemon's copy of PostgreSQL's overrides |

pub mod backend;
pub mod browse;
pub mod conn;
pub mod events;
pub mod org;
pub mod redact;
pub mod settings;
mod stats;
pub mod tenant;
pub mod tls;

pub use stats::{COUNTER_EVENTS, MINUTE_EVENTS, SkippedValues};

use std::collections::BTreeMap;
use std::sync::LazyLock;
use std::time::Duration;

use redis::{AsyncCommands, Script};

use crate::conn::Conn;
use crate::settings::{QueueSettings, Scheduling};
use crate::tenant::{OrganizationId, Tier};

/// The enqueue script that apps in every language run; Rust uses it too.
pub const ENQUEUE_LUA: &str = include_str!("../../../jobs/enqueue.lua");

static ENQUEUE: LazyLock<Script> = LazyLock::new(|| Script::new(ENQUEUE_LUA));
/// The helpers every daemon script starts with (see its header): a key of the wrong type, a
/// counter that is not a number or a job hash that is not what enqueue.lua wrote never stops a
/// script half-way.
const GUARD_LUA: &str = include_str!("guard.lua");

fn guarded(body: &str) -> Script {
    Script::new(&format!("{GUARD_LUA}\n{body}"))
}

static FETCH: LazyLock<Script> = LazyLock::new(|| guarded(include_str!("fetch.lua")));
static SETTLE: LazyLock<Script> = LazyLock::new(|| guarded(include_str!("settle.lua")));
static RENEW: LazyLock<Script> = LazyLock::new(|| guarded(include_str!("renew.lua")));
static DEAD: LazyLock<Script> = LazyLock::new(|| guarded(include_str!("dead.lua")));
static REPAIR: LazyLock<Script> = LazyLock::new(|| guarded(include_str!("repair.lua")));
static LIMITS: LazyLock<Script> = LazyLock::new(|| guarded(include_str!("limits.lua")));

/// The most leased jobs the recount of `{p}:org_inflight` reads in one script call; with more in
/// flight it is skipped (the counts are kept by every lease's start and end; the recount only
/// puts drifts right).
const RECOUNT_MAX: usize = 20_000;

/// Job hashes the repair scan looks at per script call.
const REPAIR_PAGE: usize = 500;

/// Items per settle or renew script call; bigger batches are split.
const SCRIPT_CHUNK: usize = 200;
/// Expired leases returned and delayed jobs promoted per fetch call.
const REAP_LIMIT: usize = 100;
const PROMOTE_LIMIT: usize = 200;

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsFailure),
    #[error("the queue refused the job: {0}")]
    Refused(String),
    #[error("unexpected reply from a queue script: {0}")]
    Protocol(String),
}

impl From<crate::conn::ConnectError> for QueueError {
    fn from(e: crate::conn::ConnectError) -> Self {
        match e {
            crate::conn::ConnectError::Tls(t) => QueueError::Tls(t),
            crate::conn::ConnectError::Redis(r) => QueueError::Redis(r),
        }
    }
}

/// A job to enqueue. `K` is the job's kind as the daemon types it (aiq's `JobKind`); the queue
/// only stores its name, which enqueue.lua checks.
#[derive(Debug, Clone)]
pub struct NewJob<K> {
    pub kind: K,
    pub tier: Tier,
    pub organization_id: OrganizationId,
    /// The JSON document of the job kind's schema.
    pub payload: String,
    pub job_id: Option<String>,
    pub delay: Duration,
    pub idempotency_key: Option<String>,
    /// 0 means the daemon's default.
    pub max_attempts: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enqueued {
    pub job_id: String,
    /// True when the job id or idempotency key was already known: nothing new was queued.
    pub duplicate: bool,
}

/// A job as the fetch script hands it out, under a lease.
#[derive(Debug, Clone)]
pub struct LeasedJob {
    pub id: String,
    /// The fencing token of this lease; settle and renew with another token are refused.
    pub token: String,
    pub kind: String,
    pub tier: String,
    pub organization_id: String,
    pub payload: String,
    /// Failed attempts before this one.
    pub attempts: u32,
    /// 0 means the daemon's default.
    pub max_attempts: u32,
    pub enqueued_at_ms: i64,
    /// Times a worker stopped while running it (its lease expired and the reaper returned it).
    pub interrupts: u32,
    /// The app chose the id (not the queue): it may name a job that already ran.
    pub own: bool,
    /// An operator retried it from the dead set: a result row saying it failed for good is
    /// from before, and a success replaces it.
    pub revived: bool,
}

fn bytes_of(ids: &[String]) -> Vec<Vec<u8>> {
    ids.iter().map(|id| id.as_bytes().to_vec()).collect()
}

/// One row of fetch.lua's answer as a job, or why it cannot be one: (id, token, reason), kept
/// as bytes so that the job can still be settled.
fn leased_job(row: Vec<Vec<u8>>) -> Result<LeasedJob, (Vec<u8>, Vec<u8>, String)> {
    let Ok(fields) = <[Vec<u8>; 11]>::try_from(row) else {
        return Err((Vec::new(), Vec::new(), "fetch returned a short row".into()));
    };
    let [
        id,
        token,
        kind,
        tier,
        org,
        payload,
        attempts,
        max_attempts,
        enqueued_at,
        interrupts,
        revived,
    ] = fields;
    let text = |name: &str, v: Vec<u8>| {
        String::from_utf8(v).map_err(|e| {
            format!(
                "its {name} is not UTF-8 (byte {})",
                e.utf8_error().valid_up_to()
            )
        })
    };
    let number = |name: &str, v: &[u8]| -> Result<u32, String> {
        std::str::from_utf8(v)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("its {name} is not a number"))
    };
    let parsed = (|| {
        let job = LeasedJob {
            id: text("id", id.clone())?,
            token: text("token", token.clone())?,
            kind: text("kind", kind)?,
            tier: text("tier", tier)?,
            organization_id: text("organization id", org)?,
            payload: text("payload", payload)?,
            attempts: number("attempts", &attempts)?,
            max_attempts: number("max_attempts", &max_attempts)?,
            enqueued_at_ms: std::str::from_utf8(&enqueued_at)
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0),
            interrupts: number("interrupts", &interrupts)?,
            // The queue's own ids start with "j-" (enqueue.lua refuses an app's id that does).
            own: !id.starts_with(b"j-"),
            revived: revived == b"1",
        };
        if job.token.parse::<u64>().is_err() {
            return Err("its token is not a number".to_owned());
        }
        Ok(job)
    })();
    parsed.map_err(|why| (id, token, why))
}

/// What to do with a leased job.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Succeeded, with the result summary for its event and outcome (JSON text; `None`: null).
    Done {
        result: Option<String>,
    },
    Retry {
        after: Duration,
        error: String,
    },
    /// Failed for good because its attempts or interrupts ran out (state `dead`).
    Dead {
        reason: String,
    },
    /// Failed for good because no attempt can succeed (state `failed`; in the dead set too).
    Failed {
        reason: String,
    },
    Release,
    /// Not run; `reason` says why in words, `why` is the delay reason of its event.
    Defer {
        after: Duration,
        reason: String,
        why: events::DelayReason,
    },
}

#[derive(Debug, Clone)]
pub struct Settlement {
    pub id: String,
    pub token: String,
    pub outcome: Outcome,
}

/// Counts for `aiq stats` and the demo.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct QueueStats {
    /// Waiting jobs per tier.
    pub waiting: BTreeMap<String, u64>,
    /// Per tier, how long the oldest waiting job has been ready to run (ms); 0 when none waits.
    pub oldest_age_ms: BTreeMap<String, u64>,
    pub inflight: u64,
    pub delayed: u64,
    pub dead: u64,
    /// Running totals since the queue was created, only the events of [`COUNTER_EVENTS`].
    pub counters: BTreeMap<String, u64>,
    /// Per tier, the leased, delayed and dead jobs the scripts counted (`{p}:held`); what the
    /// sets hold beyond these sums is not attributed to a tier (jobs already in a set when the
    /// counts began, hashes without a known tier).
    pub inflight_by_tier: BTreeMap<String, u64>,
    pub delayed_by_tier: BTreeMap<String, u64>,
    pub dead_by_tier: BTreeMap<String, u64>,
    /// Delayed jobs per delay reason, all tiers, from the same counts.
    pub delayed_by_reason: BTreeMap<String, u64>,
    /// Values in Redis this read could not trust and left out.
    pub skipped: SkippedValues,
}

/// One minute's events by type (`{p}:minute:<m>`).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Minute {
    /// When the minute began (ms since the epoch).
    pub start_ms: u64,
    /// Events per type of [`MINUTE_EVENTS`]; a type with none is absent.
    pub counts: BTreeMap<String, u64>,
}

/// A job in the dead set.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeadJob {
    pub id: String,
    pub kind: String,
    pub tier: String,
    pub organization_id: String,
    pub reason: String,
    pub attempts: u32,
    pub dead_at_ms: i64,
}

/// A handle on one queue. Cheap to clone: the connection is multiplexed.
#[derive(Clone)]
pub struct Queue {
    conn: Conn,
    base: String,
    settings: QueueSettings,
}

impl Queue {
    pub async fn connect(settings: &QueueSettings) -> Result<Self, QueueError> {
        let conn = Conn::connect(&settings.redis).await?;
        Ok(Self {
            conn,
            base: format!("{{{}}}", settings.prefix),
            settings: settings.clone(),
        })
    }

    pub fn settings(&self) -> &QueueSettings {
        &self.settings
    }

    fn key(&self, suffix: &str) -> String {
        format!("{}:{suffix}", self.base)
    }

    /// enqueue.lua's ARGV for a job (see the script's header).
    #[allow(clippy::type_complexity)]
    fn enqueue_args<'a, K: AsRef<str>>(
        &self,
        job: &'a NewJob<K>,
    ) -> (
        &'a str,
        &'a str,
        String,
        &'a str,
        &'a str,
        u64,
        &'a str,
        u64,
        u32,
    ) {
        (
            job.kind.as_ref(),
            job.tier.as_str(),
            job.organization_id.to_string(),
            &job.payload,
            job.job_id.as_deref().unwrap_or(""),
            job.delay.as_millis() as u64,
            job.idempotency_key.as_deref().unwrap_or(""),
            self.settings.idempotency_ttl.as_secs(),
            job.max_attempts,
        )
    }

    pub async fn enqueue<K: AsRef<str>>(&self, job: &NewJob<K>) -> Result<Enqueued, QueueError> {
        let mut conn = self.conn.clone();
        let reply: Result<Vec<String>, redis::RedisError> = ENQUEUE
            .key(&self.base)
            .arg(self.enqueue_args(job))
            .invoke_async(&mut conn)
            .await;
        let reply = match reply {
            Ok(r) => r,
            Err(e) if e.to_string().contains("aiq:") => {
                return Err(QueueError::Refused(e.to_string()));
            }
            Err(e) => return Err(e.into()),
        };
        match reply.as_slice() {
            [id, status] => Ok(Enqueued {
                job_id: id.clone(),
                duplicate: status == "duplicate",
            }),
            other => Err(QueueError::Protocol(format!("enqueue returned {other:?}"))),
        }
    }

    /// Enqueues many jobs in one round trip: the same script as [`Queue::enqueue`], once per job,
    /// pipelined. Each job gets its own answer, in order; a refused job refuses only itself.
    pub async fn enqueue_batch<K: AsRef<str>>(
        &self,
        jobs: &[NewJob<K>],
    ) -> Result<Vec<Result<Enqueued, QueueError>>, QueueError> {
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.conn.clone();
        // The pipeline calls the script by its hash: make sure Redis has it (after a restart it
        // has none).
        ENQUEUE.prepare_invoke().load_async(&mut conn).await?;
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for job in jobs {
            pipe.cmd("EVALSHA")
                .arg(ENQUEUE.get_hash())
                .arg(1)
                .arg(&self.base)
                .arg(self.enqueue_args(job));
        }
        let replies: Vec<redis::RedisResult<Vec<String>>> = pipe.query_async(&mut conn).await?;
        Ok(replies
            .into_iter()
            .map(|r| match r {
                Ok(reply) => match reply.as_slice() {
                    [id, status] => Ok(Enqueued {
                        job_id: id.clone(),
                        duplicate: status == "duplicate",
                    }),
                    other => Err(QueueError::Protocol(format!("enqueue returned {other:?}"))),
                },
                Err(e) if e.to_string().contains("aiq:") => Err(QueueError::Refused(e.to_string())),
                Err(e) => Err(e.into()),
            })
            .collect())
    }

    /// Leases up to `want` jobs, after returning expired leases and promoting due delayed jobs.
    /// A leased job whose stored fields are not what enqueue.lua writes (bytes that are not
    /// UTF-8, numbers that are not numbers: a hand-written key) is moved to the dead set as
    /// `corrupt` here, and the rest of the batch is served.
    pub async fn fetch(&self, want: usize) -> Result<Vec<LeasedJob>, QueueError> {
        let mut conn = self.conn.clone();
        let s = &self.settings;
        let mut inv = FETCH.key(&self.base);
        inv.arg(want)
            .arg(s.lease.as_millis() as u64)
            .arg(if s.scheduling == Scheduling::Strict {
                1
            } else {
                0
            })
            .arg(s.max_interrupts)
            .arg(REAP_LIMIT)
            .arg(PROMOTE_LIMIT);
        for w in s.tier_weights {
            inv.arg(w);
        }
        for cap in s.org_max_in_flight {
            inv.arg(cap);
        }
        let rows: Vec<Vec<Vec<u8>>> = inv.invoke_async(&mut conn).await?;
        let mut jobs = Vec::with_capacity(rows.len());
        let mut corrupt = Vec::new();
        for row in rows {
            match leased_job(row) {
                Ok(job) => jobs.push(job),
                Err((id, token, why)) => corrupt.push((id, token, why)),
            }
        }
        if !corrupt.is_empty() {
            self.bury(&corrupt).await?;
        }
        Ok(jobs)
    }

    /// settle.lua with its leading arguments (the dead set's caps, the done marker's TTL); the
    /// caller adds the items.
    fn settle_script(&self) -> redis::ScriptInvocation<'static> {
        let mut inv = SETTLE.key(&self.base);
        inv.arg(self.settings.dead_max_jobs)
            .arg(self.settings.dead_max_age.as_millis() as u64)
            .arg(self.settings.idempotency_ttl.as_secs())
            .arg(self.settings.dead_max_bytes);
        inv
    }

    /// Moves leased jobs that cannot be read to the dead set with reason `corrupt: ...`. The ids
    /// and tokens go back to Redis as the bytes it gave, so even an id that is not UTF-8 is found.
    async fn bury(&self, jobs: &[(Vec<u8>, Vec<u8>, String)]) -> Result<(), QueueError> {
        let mut conn = self.conn.clone();
        let mut inv = self.settle_script();
        for (id, token, why) in jobs {
            tracing::error!(job.id = %crate::redact::Field::new(String::from_utf8_lossy(id)), reason = %crate::redact::Field::message(why),
                "dead: the job's fields in Redis are corrupt");
            inv.arg(id.as_slice())
                .arg(token.as_slice())
                .arg("dead")
                .arg(0)
                .arg(format!("corrupt: {why}"))
                .arg("");
        }
        let _: Vec<i64> = inv.invoke_async(&mut conn).await?;
        metrics::counter!("aiq_jobs_corrupt_total").increment(jobs.len() as u64);
        Ok(())
    }

    /// Returns expired leases and promotes due delayed jobs, without leasing anything. Every
    /// instance runs it on its lease-renewal tick, so a crashed worker's jobs come back even when
    /// every live worker is busy.
    pub async fn reap(&self) -> Result<(), QueueError> {
        self.fetch(0).await.map(|_| ())
    }

    /// Applies outcomes; returns for each whether it was applied (false: stale token).
    pub async fn settle(&self, items: &[Settlement]) -> Result<Vec<bool>, QueueError> {
        let mut applied = Vec::with_capacity(items.len());
        for chunk in items.chunks(SCRIPT_CHUNK) {
            let mut conn = self.conn.clone();
            let mut inv = self.settle_script();
            for it in chunk {
                let (op, delay, msg, why) = match &it.outcome {
                    Outcome::Done { result } => {
                        ("done", 0, result.as_deref().unwrap_or("null"), "")
                    }
                    Outcome::Retry { after, error } => {
                        ("retry", after.as_millis() as u64, error.as_str(), "")
                    }
                    Outcome::Dead { reason } => ("dead", 0, reason.as_str(), ""),
                    Outcome::Failed { reason } => ("failed", 0, reason.as_str(), ""),
                    Outcome::Release => ("release", 0, "", ""),
                    Outcome::Defer { after, reason, why } => (
                        "defer",
                        after.as_millis() as u64,
                        reason.as_str(),
                        why.as_str(),
                    ),
                };
                inv.arg(&it.id)
                    .arg(&it.token)
                    .arg(op)
                    .arg(delay)
                    .arg(msg)
                    .arg(why);
            }
            let statuses: Vec<i64> = inv.invoke_async(&mut conn).await?;
            if statuses.len() != chunk.len() {
                return Err(QueueError::Protocol(format!(
                    "settle answered {} statuses for {} items",
                    statuses.len(),
                    chunk.len()
                )));
            }
            applied.extend(statuses.into_iter().map(|s| s == 1));
        }
        Ok(applied)
    }

    /// Extends leases; returns for each whether it is still held.
    pub async fn renew(&self, leases: &[(String, String)]) -> Result<Vec<bool>, QueueError> {
        let mut held = Vec::with_capacity(leases.len());
        for chunk in leases.chunks(SCRIPT_CHUNK) {
            let mut conn = self.conn.clone();
            let mut inv = RENEW.key(&self.base);
            inv.arg(self.settings.lease.as_millis() as u64);
            for (id, token) in chunk {
                inv.arg(id).arg(token);
            }
            let statuses: Vec<i64> = inv.invoke_async(&mut conn).await?;
            held.extend(statuses.into_iter().map(|s| s == 1));
        }
        Ok(held)
    }

    /// The queue's numbers, read without trusting Redis (see `stats.rs`): a value that does not
    /// parse is left out and counted in [`QueueStats::skipped`], never an error.
    pub async fn stats(&self) -> Result<QueueStats, QueueError> {
        let tiers = Tier::ALL.map(Tier::as_str);
        let (depth_key, counters_key) = (self.key("depth"), self.key("counters"));
        let held_key = self.key("held");
        let held_fields = stats::held_fields();
        let heads_keys = tiers.map(|t| self.key(&format!("heads:{t}")));
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        // Every reply is taken on its own, so a key of the wrong type spoils only itself. Only
        // the known fields are fetched: junk fields cost an HLEN, not a read of each.
        pipe.ignore_errors();
        pipe.cmd("TIME")
            .zcard(self.key("inflight"))
            .zcard(self.key("delayed"))
            .zcard(self.key("dead"))
            .hlen(&depth_key)
            .hmget(&depth_key, &tiers)
            .hlen(&counters_key)
            .hmget(&counters_key, &COUNTER_EVENTS)
            .hlen(&held_key)
            .hmget(&held_key, &held_fields);
        for key in &heads_keys {
            pipe.zrangebyscore_limit_withscores(key, 0, "(+inf", 0, 1)
                .zcount(key, "-inf", "(0")
                .zcount(key, "+inf", "+inf");
        }
        let replies: Vec<redis::Value> = pipe.query_async(&mut conn).await?;
        let wrong_shape = || QueueError::Protocol(format!("stats: {} replies", replies.len()));
        let (first, heads) = replies.split_first_chunk::<10>().ok_or_else(wrong_shape)?;
        let (heads, []) = heads.as_chunks::<3>() else {
            return Err(wrong_shape());
        };
        if heads.len() != tiers.len() {
            return Err(wrong_shape());
        }
        let [
            time,
            inflight,
            delayed,
            dead,
            depth_len,
            depth,
            counters_len,
            counters,
            held_len,
            held,
        ] = first;
        // The clock and the sets' sizes come from Redis itself, not from what was written.
        let protocol = |e: redis::ParsingError| QueueError::Protocol(format!("stats: {e}"));
        let (secs, micros): (u64, u64) = redis::from_redis_value_ref(time).map_err(protocol)?;
        let now_ms = secs * 1000 + micros / 1000;
        let size = |v: &redis::Value| redis::from_redis_value_ref::<u64>(v).map_err(protocol);
        let (inflight, delayed, dead) = (size(inflight)?, size(delayed)?, size(dead)?);

        let mut skips = stats::Skips::default();
        let depth = stats::read_counts(
            stats::Source::Depth,
            &depth_key,
            &tiers,
            depth_len,
            depth,
            &mut skips,
        );
        let counters = stats::read_counts(
            stats::Source::Counters,
            &counters_key,
            &COUNTER_EVENTS,
            counters_len,
            counters,
            &mut skips,
        );
        let names: Vec<&str> = held_fields.iter().map(String::as_str).collect();
        let held = stats::read_counts(
            stats::Source::Held,
            &held_key,
            &names,
            held_len,
            held,
            &mut skips,
        );
        let (mut inflight_by_tier, mut delayed_by_tier, mut dead_by_tier) =
            (BTreeMap::new(), BTreeMap::new(), BTreeMap::new());
        let mut delayed_by_reason = BTreeMap::new();
        for (field, n) in held {
            let Some(n) = n else { continue };
            let mut parts = field.split(':');
            let (set, tier, reason) = (parts.next(), parts.next(), parts.next());
            let Some(tier) = tier else { continue };
            let by = match set {
                Some("inflight") => &mut inflight_by_tier,
                Some("dead") => &mut dead_by_tier,
                _ => &mut delayed_by_tier,
            };
            *by.entry(tier.to_owned()).or_insert(0) += n;
            if let Some(r) = reason {
                *delayed_by_reason.entry(r.to_owned()).or_insert(0) += n;
            }
        }
        let mut waiting = BTreeMap::new();
        let mut oldest_age_ms = BTreeMap::new();
        for ((t, key), [oldest, negative, infinite]) in tiers.iter().zip(&heads_keys).zip(heads) {
            let ready = stats::read_head(key, oldest, negative, infinite, &mut skips);
            // No field is no job waiting; a value that did not parse is no count at all, so
            // the tier's waiting count is left out rather than made up.
            let n = depth.get(t).copied().unwrap_or(Some(0));
            if let Some(n) = n {
                waiting.insert((*t).to_owned(), n);
            }
            let age = match (n, ready) {
                (Some(0), _) | (_, None) => 0,
                (_, Some(ms)) => now_ms.saturating_sub(ms),
            };
            oldest_age_ms.insert((*t).to_owned(), age);
        }
        stats::warn(&self.base, &skips);
        Ok(QueueStats {
            waiting,
            oldest_age_ms,
            inflight,
            delayed,
            dead,
            counters: counters
                .into_iter()
                .filter_map(|(e, n)| Some((e.to_owned(), n?)))
                .collect(),
            inflight_by_tier,
            delayed_by_tier,
            dead_by_tier,
            delayed_by_reason,
            skipped: skips.counts,
        })
    }

    /// The events of the last `n` minutes by type (at most 120: the scripts keep two hours),
    /// oldest first, the current minute last. One pipelined read of `n` hashes, only the known
    /// fields; a count that does not parse is left out.
    pub async fn minutes(&self, n: usize) -> Result<Vec<Minute>, QueueError> {
        let n = n.clamp(1, 120) as u64;
        let mut conn = self.conn.clone();
        let (secs, _): (u64, u64) = redis::cmd("TIME").query_async(&mut conn).await?;
        let now_min = secs / 60;
        let first = now_min + 1 - n;
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for m in first..=now_min {
            pipe.hmget(self.key(&format!("minute:{m}")), &MINUTE_EVENTS);
        }
        let replies: Vec<redis::Value> = pipe.query_async(&mut conn).await?;
        Ok((first..=now_min)
            .zip(replies)
            .map(|(m, v)| {
                let mut counts = BTreeMap::new();
                if let redis::Value::Array(values) = v {
                    for (name, v) in MINUTE_EVENTS.iter().zip(values) {
                        if let redis::Value::BulkString(raw) = v
                            && let Some(c) = stats::parse_count(&raw)
                        {
                            counts.insert((*name).to_owned(), c);
                        }
                    }
                }
                Minute {
                    start_ms: m * 60_000,
                    counts,
                }
            })
            .collect())
    }

    /// Dead jobs, newest first, `offset` from the newest. Ids and fields are read as bytes: a
    /// job buried because its bytes are not UTF-8 is listed (lossily), not an error for the page.
    pub async fn dead_page(&self, offset: usize, limit: usize) -> Result<Vec<DeadJob>, QueueError> {
        let mut conn = self.conn.clone();
        let ids: Vec<Vec<u8>> = conn
            .zrevrange(
                self.key("dead"),
                offset as isize,
                (offset + limit) as isize - 1,
            )
            .await?;
        self.dead_of(ids).await
    }

    /// Dead jobs that died between `since_ms` and `until_ms` (inclusive; `None`: no bound),
    /// newest first, `offset` from the newest of them.
    pub async fn dead_page_between(
        &self,
        since_ms: Option<i64>,
        until_ms: Option<i64>,
        offset: usize,
        limit: usize,
    ) -> Result<Vec<DeadJob>, QueueError> {
        if since_ms.is_none() && until_ms.is_none() {
            return self.dead_page(offset, limit).await;
        }
        let mut conn = self.conn.clone();
        let ids: Vec<Vec<u8>> = conn
            .zrevrangebyscore_limit(
                self.key("dead"),
                until_ms.map_or("+inf".to_owned(), |u| u.to_string()),
                since_ms.map_or("-inf".to_owned(), |s| s.to_string()),
                offset as isize,
                limit as isize,
            )
            .await?;
        self.dead_of(ids).await
    }

    /// How many jobs died between `since_ms` and `until_ms` (inclusive; `None`: no bound).
    pub async fn dead_count_between(
        &self,
        since_ms: Option<i64>,
        until_ms: Option<i64>,
    ) -> Result<u64, QueueError> {
        let mut conn = self.conn.clone();
        Ok(conn
            .zcount(
                self.key("dead"),
                since_ms.map_or("-inf".to_owned(), |s| s.to_string()),
                until_ms.map_or("+inf".to_owned(), |u| u.to_string()),
            )
            .await?)
    }

    /// Redis's clock (ms since the epoch): the time the scripts write.
    pub async fn now_ms(&self) -> Result<i64, QueueError> {
        let mut conn = self.conn.clone();
        let (secs, micros): (i64, i64) = redis::cmd("TIME").query_async(&mut conn).await?;
        Ok(secs * 1000 + micros / 1000)
    }

    /// The listing fields of the dead jobs `ids`, in one round trip.
    async fn dead_of(&self, ids: Vec<Vec<u8>>) -> Result<Vec<DeadJob>, QueueError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        // One round trip for the page, and only the fields a listing shows (no payloads).
        let names = ["kind", "tier", "org", "dead_reason", "attempts", "dead_at"];
        let replies = self.jobs_fields(&ids, &names).await?;
        Ok(ids
            .into_iter()
            .zip(replies)
            .map(|(id, values)| {
                let mut f = values.into_iter().map(|v| {
                    v.map(|b| String::from_utf8_lossy(&b).into_owned())
                        .unwrap_or_default()
                });
                let mut next = || f.next().unwrap_or_default();
                let (kind, tier, org, reason, attempts, dead_at) =
                    (next(), next(), next(), next(), next(), next());
                DeadJob {
                    kind,
                    tier,
                    organization_id: org,
                    reason,
                    attempts: attempts.parse().unwrap_or(0),
                    dead_at_ms: dead_at.parse().unwrap_or(0),
                    id: String::from_utf8_lossy(&id).into_owned(),
                }
            })
            .collect())
    }

    /// `names` of each job's hash, in one pipelined round trip: per id, one value per name. A
    /// job key that is not a hash (written by hand) or is gone reads as missing values.
    pub(crate) async fn jobs_fields(
        &self,
        ids: &[Vec<u8>],
        names: &[&str],
    ) -> Result<Vec<Vec<Option<Vec<u8>>>>, QueueError> {
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for id in ids {
            let mut key = self.key("job:").into_bytes();
            key.extend_from_slice(id);
            pipe.cmd("HMGET").arg(key).arg(names);
        }
        let replies: Vec<redis::Value> = pipe.query_async(&mut self.conn.clone()).await?;
        Ok(replies
            .iter()
            .map(|r| redis::from_redis_value_ref::<Vec<Option<Vec<u8>>>>(r).unwrap_or_default())
            .collect())
    }

    /// Every field the queue holds for a job (payload included), empty if it is unknown.
    pub async fn job_fields(&self, id: &str) -> Result<BTreeMap<String, String>, QueueError> {
        self.job_fields_raw(id.as_bytes()).await
    }

    /// [`Queue::job_fields`] by the id's bytes; values that are not UTF-8 are shown lossily, and
    /// a job key that is not a hash (written by hand) reads as empty.
    async fn job_fields_raw(&self, id: &[u8]) -> Result<BTreeMap<String, String>, QueueError> {
        let mut conn = self.conn.clone();
        let mut key = self.key("job:").into_bytes();
        key.extend_from_slice(id);
        let fields: Vec<(Vec<u8>, Vec<u8>)> = match conn.hgetall(key).await {
            Ok(f) => f,
            Err(e) if e.code() == Some("WRONGTYPE") => Vec::new(),
            Err(e) => return Err(e.into()),
        };
        Ok(fields
            .into_iter()
            .map(|(k, v)| {
                (
                    String::from_utf8_lossy(&k).into_owned(),
                    String::from_utf8_lossy(&v).into_owned(),
                )
            })
            .collect())
    }

    /// Puts dead jobs back into their tiers with fresh attempts; returns how many were dead.
    pub async fn dead_retry(&self, ids: &[String]) -> Result<usize, QueueError> {
        self.dead_op("retry", &bytes_of(ids)).await
    }

    /// Deletes dead jobs; returns how many were dead.
    pub async fn dead_purge(&self, ids: &[String]) -> Result<usize, QueueError> {
        self.dead_op("purge", &bytes_of(ids)).await
    }

    async fn dead_op(&self, op: &str, ids: &[Vec<u8>]) -> Result<usize, QueueError> {
        let mut n = 0;
        for chunk in ids.chunks(SCRIPT_CHUNK) {
            let mut conn = self.conn.clone();
            let mut inv = DEAD.key(&self.base);
            inv.arg(op);
            for id in chunk {
                inv.arg(id.as_slice());
            }
            let done: Vec<i64> = inv.invoke_async(&mut conn).await?;
            n += done.into_iter().filter(|d| *d == 1).count();
        }
        Ok(n)
    }

    /// Applies `op` to every dead job, a bounded page at a time; returns how many.
    pub async fn dead_all(&self, retry: bool) -> Result<usize, QueueError> {
        let mut total = 0;
        loop {
            let mut conn = self.conn.clone();
            let ids: Vec<Vec<u8>> = conn
                .zrange(self.key("dead"), 0, SCRIPT_CHUNK as isize - 1)
                .await?;
            if ids.is_empty() {
                return Ok(total);
            }
            let n = self
                .dead_op(if retry { "retry" } else { "purge" }, &ids)
                .await?;
            if n == 0 {
                return Ok(total);
            }
            total += n;
        }
    }

    /// The most recent dead jobs, newest first.
    pub async fn dead_jobs(&self, limit: usize) -> Result<Vec<DeadJob>, QueueError> {
        self.dead_page(0, limit).await
    }

    /// When a script moved a corrupt key aside or reset a counter (`{p}:repair` is set), puts
    /// the jobs it held back into their lists and sets and recounts the depth. One process at a
    /// time (a lock with a lease); each script call looks at a bounded page of job hashes.
    /// Returns whether a repair ran.
    pub async fn repair_if_needed(&self) -> Result<bool, QueueError> {
        let mut conn = self.conn.clone();
        let flagged: bool = conn.exists(self.key("repair")).await?;
        if !flagged {
            return Ok(false);
        }
        let lock = self.key("repairing");
        if !crate::conn::try_lock(&mut conn, &lock, 120_000).await? {
            return Ok(false);
        }
        let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(&mut conn).await?;
        let started_ms = secs * 1000 + micros / 1000;
        let flags: Vec<String> = conn.hkeys(self.key("repair")).await?;
        tracing::warn!(moved_aside = ?flags, "queue keys were corrupt: repairing the queue");
        let mut cursor = "0".to_owned();
        let mut pages = 0u64;
        loop {
            cursor = REPAIR
                .key(&self.base)
                .arg("scan")
                .arg(&cursor)
                .arg(REPAIR_PAGE)
                .invoke_async(&mut conn)
                .await?;
            pages += 1;
            if cursor == "0" {
                break;
            }
        }
        let left: i64 = REPAIR
            .key(&self.base)
            .arg("finish")
            .arg(started_ms)
            .invoke_async(&mut conn)
            .await?;
        let _: () = conn.del(&lock).await?;
        tracing::warn!(
            pages,
            flags_left = left,
            "queue repaired: jobs put back, depth recounted"
        );
        metrics::counter!("aiq_queue_repairs_total").increment(1);
        Ok(true)
    }

    /// Makes `{p}:org_limits` hold exactly `caps` (organisation, its cap on leased jobs across
    /// the fleet; 0: none): the organisations not named get their tier's default. Returns how
    /// many entries changed.
    pub async fn sync_org_limits(&self, caps: &[(OrganizationId, u32)]) -> Result<u64, QueueError> {
        let mut conn = self.conn.clone();
        let mut inv = LIMITS.key(&self.base);
        inv.arg("sync");
        for (org, cap) in caps {
            inv.arg(org.to_string()).arg(cap);
        }
        Ok(inv.invoke_async(&mut conn).await?)
    }

    /// Recounts each organisation's leased jobs from the lease set and corrects the counts that
    /// drifted. Returns how many organisations' counts changed, or `None` when more jobs are
    /// leased than one script call reads ([`RECOUNT_MAX`]).
    pub async fn recount_org_in_flight(&self) -> Result<Option<u64>, QueueError> {
        let mut conn = self.conn.clone();
        let n: i64 = LIMITS
            .key(&self.base)
            .arg("recount")
            .arg(RECOUNT_MAX)
            .invoke_async(&mut conn)
            .await?;
        Ok(u64::try_from(n).ok())
    }

    /// An organisation's jobs leased now across the fleet, and the cap `{p}:org_limits` holds
    /// for it (`None`: its tier's default). A value that is not a number reads as 0 / `None`.
    pub async fn org_in_flight(
        &self,
        org: &OrganizationId,
    ) -> Result<(u64, Option<u32>), QueueError> {
        let mut conn = self.conn.clone();
        let org = org.to_string();
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        pipe.hget(self.key("org_inflight"), &org)
            .hget(self.key("org_limits"), &org);
        let replies: Vec<redis::Value> = pipe.query_async(&mut conn).await?;
        let num = |v: Option<&redis::Value>| {
            v.and_then(|v| {
                redis::from_redis_value_ref::<Option<String>>(v)
                    .ok()
                    .flatten()
            })
            .and_then(|s| s.parse::<u64>().ok())
        };
        Ok((
            num(replies.first()).unwrap_or(0),
            num(replies.get(1)).and_then(|n| u32::try_from(n).ok()),
        ))
    }

    /// Checks that Redis answers.
    /// Keeps `bytes` with job `id` for `ttl` (`{p}:kept:<id>`): what the daemon could not yet
    /// write elsewhere (an answer whose rows PostgreSQL could not take), for a later execution
    /// of the same job. The queue does not read it.
    pub async fn keep(&self, id: &str, bytes: &[u8], ttl: Duration) -> Result<(), QueueError> {
        let mut conn = self.conn.clone();
        let _: () = conn
            .pset_ex(
                self.key(&format!("kept:{id}")),
                bytes,
                ttl.as_millis().max(1) as u64,
            )
            .await?;
        Ok(())
    }

    /// What [`Queue::keep`] holds for job `id`.
    pub async fn kept(&self, id: &str) -> Result<Option<Vec<u8>>, QueueError> {
        let mut conn = self.conn.clone();
        Ok(conn.get(self.key(&format!("kept:{id}"))).await?)
    }

    /// Drops what [`Queue::keep`] holds for job `id`.
    pub async fn forget_kept(&self, id: &str) -> Result<(), QueueError> {
        let mut conn = self.conn.clone();
        let _: () = conn.del(self.key(&format!("kept:{id}"))).await?;
        Ok(())
    }

    pub async fn ping(&self) -> Result<(), QueueError> {
        let mut conn = self.conn.clone();
        let _: String = redis::cmd("PING").query_async(&mut conn).await?;
        Ok(())
    }
}
