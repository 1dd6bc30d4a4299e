//! One organisation's jobs in the queue, for `aiq org export` and `aiq org purge`: every job of
//! the organisation that Redis holds (waiting, delayed, running, dead, cancelled), the outcomes
//! of its finished jobs and the answers kept with its jobs. The delayed, dead, running,
//! cancelled and outcome sets mix organisations: they are read in bounded ZSCAN pages, each
//! job's hash telling its organisation. A purge removes jobs with `org.lua`, atomically with the
//! lists, sets and counters the other scripts keep, a bounded batch per call, so a purge cut
//! short is finished by running it again. A purged job is gone: no event, outcome or result
//! row (it is not a cancel); `{p}:counters` `purged` counts it. Running jobs are left to finish
//! and counted, so the caller can say to run the purge again.

use std::collections::{BTreeMap, HashSet};
use std::sync::LazyLock;

use redis::{AsyncCommands, Script};
use serde::Serialize;

use crate::tenant::{OrganizationId, Tier};
use crate::{Queue, QueueError};

static ORG: LazyLock<Script> = LazyLock::new(|| crate::guarded(include_str!("org.lua")));

/// Ids read or removed per Redis call.
const PAGE: usize = 200;

/// Where a job of the organisation is: the `queue` of its export line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Place {
    Waiting,
    Delayed,
    Running,
    Dead,
    Cancelled,
    /// A finished job's outcome (`{p}:outcome:<id>`).
    Outcome,
    /// An answer kept with a job while PostgreSQL could not take its rows (`{p}:kept:<id>`).
    Kept,
}

impl Place {
    pub fn as_str(self) -> &'static str {
        match self {
            Place::Waiting => "waiting",
            Place::Delayed => "delayed",
            Place::Running => "running",
            Place::Dead => "dead",
            Place::Cancelled => "cancelled",
            Place::Outcome => "outcome",
            Place::Kept => "kept",
        }
    }

    /// Where the hash of an item of this place is: `{p}:<prefix><id>`.
    fn hash_prefix(self) -> &'static str {
        if self == Place::Outcome {
            "outcome:"
        } else {
            "job:"
        }
    }

    /// The sorted set that holds the ids of this place, and the `state` of their hashes.
    fn set(self) -> Option<(&'static str, &'static str)> {
        match self {
            Place::Delayed => Some(("delayed", "delayed")),
            Place::Running => Some(("inflight", "inflight")),
            Place::Dead => Some(("dead", "dead")),
            Place::Cancelled => Some(("cancelled", "cancelled")),
            Place::Outcome => Some(("outcomes", "")),
            Place::Waiting | Place::Kept => None,
        }
    }
}

/// One item of an organisation's queue state: a job's hash (its id in `id`), an outcome, or a
/// kept answer (`id` and `kept`, the bytes as text). Values that are not UTF-8 are shown lossily.
#[derive(Debug, Clone, Serialize)]
pub struct OrgItem {
    pub place: Place,
    pub fields: BTreeMap<String, String>,
}

/// What a purge removed, by place, and the jobs it left running.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct OrgPurge {
    pub removed: BTreeMap<&'static str, u64>,
    /// Running jobs of the organisation, left to finish: purge again once they have.
    pub running: u64,
}

impl OrgPurge {
    pub fn total(&self) -> u64 {
        self.removed.values().sum()
    }
}

fn lossy(v: Vec<u8>) -> String {
    String::from_utf8(v).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

impl Queue {
    fn wait_key(&self, tier: Tier, org: &str) -> String {
        self.key(&format!("wait:{}:{org}", tier.as_str()))
    }

    /// The hashes of `ids` (`prefix` + id), in one pipeline; a key of the wrong type reads empty.
    async fn hashes(
        &self,
        prefix: &str,
        ids: &[Vec<u8>],
    ) -> Result<Vec<BTreeMap<String, String>>, QueueError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for id in ids {
            let mut key = self.key(prefix).into_bytes();
            key.extend_from_slice(id);
            pipe.hgetall(key);
        }
        let replies: Vec<redis::Value> = pipe.query_async(&mut conn).await?;
        Ok(replies
            .iter()
            .map(|r| {
                redis::from_redis_value_ref::<Vec<(Vec<u8>, Vec<u8>)>>(r)
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (lossy(k), lossy(v)))
                    .collect()
            })
            .collect())
    }

    /// One ZSCAN page of the set `name`: the next cursor and the ids, each at most once per scan.
    async fn scan_page(
        &self,
        name: &str,
        cursor: u64,
        seen: &mut HashSet<Vec<u8>>,
    ) -> Result<(u64, Vec<Vec<u8>>), QueueError> {
        let mut conn = self.conn.clone();
        let (next, flat): (u64, Vec<Vec<u8>>) = redis::cmd("ZSCAN")
            .arg(self.key(name))
            .arg(cursor)
            .arg("COUNT")
            .arg(PAGE)
            .query_async(&mut conn)
            .await?;
        // ZSCAN answers member, score, member, score...; it may repeat a member.
        let ids = flat
            .into_iter()
            .step_by(2)
            .filter(|id| seen.insert(id.clone()))
            .collect();
        Ok((next, ids))
    }

    /// One ZSCAN page of `place`'s set, only the ids of `org` (by their hash's `org` and
    /// `state`, read without the payload): the next cursor and the ids.
    async fn org_page(
        &self,
        place: Place,
        org: &str,
        cursor: u64,
        seen: &mut HashSet<Vec<u8>>,
    ) -> Result<(u64, Vec<Vec<u8>>), QueueError> {
        let (set, state) = place.set().expect("a place with a set");
        let (next, ids) = self.scan_page(set, cursor, seen).await?;
        if ids.is_empty() {
            return Ok((next, ids));
        }
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for id in &ids {
            let mut key = self.key(place.hash_prefix()).into_bytes();
            key.extend_from_slice(id);
            pipe.cmd("HMGET").arg(key).arg("org").arg("state");
        }
        let replies: Vec<redis::Value> = pipe.query_async(&mut conn).await?;
        let ours = ids
            .into_iter()
            .zip(replies)
            .filter(|(_, r)| {
                let f = redis::from_redis_value_ref::<Vec<Option<Vec<u8>>>>(r).unwrap_or_default();
                let is = |i: usize, want: &str| {
                    f.get(i).cloned().flatten().as_deref() == Some(want.as_bytes())
                };
                is(0, org) && (state.is_empty() || is(1, state))
            })
            .map(|(id, _)| id)
            .collect();
        Ok((next, ours))
    }

    /// Calls `each` with every item of `org`'s queue state (see [`OrgItem`]), a page at a time:
    /// waiting jobs tier by tier in their order, then the delayed, running, dead and cancelled
    /// jobs, the outcomes, and the answers kept with any of these jobs. A queue that moves
    /// meanwhile may be seen part before and part after a change.
    pub async fn org_items<E>(
        &self,
        org: &OrganizationId,
        mut each: impl FnMut(OrgItem) -> Result<(), E>,
    ) -> Result<Result<(), E>, QueueError> {
        let org_s = org.to_string();
        let mut jobs: Vec<Vec<u8>> = Vec::new();
        let mut conn = self.conn.clone();
        for tier in Tier::ALL {
            let list = self.wait_key(tier, &org_s);
            let mut start = 0isize;
            loop {
                let ids: Vec<Vec<u8>> =
                    match conn.lrange(&list, start, start + PAGE as isize - 1).await {
                        Ok(ids) => ids,
                        Err(e) if e.code() == Some("WRONGTYPE") => Vec::new(),
                        Err(e) => return Err(e.into()),
                    };
                if ids.is_empty() {
                    break;
                }
                start += ids.len() as isize;
                for (id, fields) in ids.iter().zip(self.hashes("job:", &ids).await?) {
                    if fields.get("org") != Some(&org_s) {
                        continue;
                    }
                    if let Err(e) = each(item(Place::Waiting, id, fields)) {
                        return Ok(Err(e));
                    }
                    jobs.push(id.clone());
                }
            }
        }
        for place in [
            Place::Delayed,
            Place::Running,
            Place::Dead,
            Place::Cancelled,
            Place::Outcome,
        ] {
            let mut seen = HashSet::new();
            let mut cursor = 0;
            loop {
                let (next, ours) = self.org_page(place, &org_s, cursor, &mut seen).await?;
                let hashes = self.hashes(place.hash_prefix(), &ours).await?;
                for (id, fields) in ours.into_iter().zip(hashes) {
                    if let Err(e) = each(item(place, &id, fields)) {
                        return Ok(Err(e));
                    }
                    if place != Place::Outcome {
                        jobs.push(id);
                    }
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        for chunk in jobs.chunks(PAGE) {
            let keys: Vec<Vec<u8>> = chunk
                .iter()
                .map(|id| {
                    let mut k = self.key("kept:").into_bytes();
                    k.extend_from_slice(id);
                    k
                })
                .collect();
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            for k in &keys {
                pipe.get(k);
            }
            let replies: Vec<redis::Value> = pipe.query_async(&mut conn).await?;
            for (id, r) in chunk.iter().zip(replies) {
                if let Ok(Some(bytes)) = redis::from_redis_value_ref::<Option<Vec<u8>>>(&r) {
                    let fields = BTreeMap::from([("kept".to_owned(), lossy(bytes))]);
                    if let Err(e) = each(item(Place::Kept, id, fields)) {
                        return Ok(Err(e));
                    }
                }
            }
        }
        Ok(Ok(()))
    }

    /// Removes `org`'s waiting, delayed, dead and cancelled jobs (with their kept answers and
    /// idempotency keys) and its outcomes, in bounded script calls; running jobs are counted and
    /// left. Running it again removes what is left, and nothing when nothing is.
    pub async fn org_purge(&self, org: &OrganizationId) -> Result<OrgPurge, QueueError> {
        let org_s = org.to_string();
        let mut out = OrgPurge::default();
        let mut conn = self.conn.clone();
        for tier in Tier::ALL {
            loop {
                let (removed, left): (u64, u64) = ORG
                    .key(&self.base)
                    .arg("waiting")
                    .arg(&org_s)
                    .arg(tier.as_str())
                    .arg(PAGE)
                    .invoke_async(&mut conn)
                    .await
                    .map(|v: Vec<u64>| {
                        (
                            v.first().copied().unwrap_or(0),
                            v.get(1).copied().unwrap_or(0),
                        )
                    })?;
                *out.removed.entry(Place::Waiting.as_str()).or_default() += removed;
                if left == 0 {
                    break;
                }
            }
        }
        for place in [
            Place::Delayed,
            Place::Dead,
            Place::Cancelled,
            Place::Outcome,
            Place::Running,
        ] {
            let (set, _) = place.set().expect("a set");
            let mut seen = HashSet::new();
            let mut cursor = 0;
            loop {
                // Only the organisation's ids go to the script (read first, checked again there).
                let (next, ours) = self.org_page(place, &org_s, cursor, &mut seen).await?;
                if place == Place::Running {
                    out.running += ours.len() as u64;
                } else if !ours.is_empty() {
                    let mut inv = ORG.key(&self.base);
                    if place == Place::Outcome {
                        inv.arg("outcomes").arg(&org_s);
                    } else {
                        inv.arg("set").arg(&org_s).arg(set);
                    }
                    for id in &ours {
                        inv.arg(id.as_slice());
                    }
                    let n: Vec<u64> = inv.invoke_async(&mut conn).await?;
                    *out.removed.entry(place.as_str()).or_default() +=
                        n.first().copied().unwrap_or(0);
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        out.removed.retain(|_, n| *n > 0);
        Ok(out)
    }
}

fn item(place: Place, id: &[u8], mut fields: BTreeMap<String, String>) -> OrgItem {
    fields.insert("id".to_owned(), String::from_utf8_lossy(id).into_owned());
    OrgItem { place, fields }
}
