//! Money: no paid call without budget, no dollar untracked.
//!
//! Before every provider call the handler asks [`Budget::reserve`] to hold the call's estimated
//! maximum cost in four scopes at once (organisation per day and per month, the platform per day
//! and per month), in one Redis script; if any scope has no room, nothing is held and no call is
//! made. After the call, [`Budget::settle`] replaces the hold with the actual cost, the same value
//! the cost row in PostgreSQL carries. A worker that dies mid-call leaves its hold behind; the
//! sweeper finds it when it expires, writes a cost row at the estimate and settles it, so killed
//! work is still counted. Redis unreachable means no reservation, so no call (fail closed).
//!
//! This module owns its own Redis keys, all under the hash tag `{budget prefix}`:
//!
//! | key | type | what |
//! |---|---|---|
//! | `{b}:spend:global:d:<day>` / `:m:<month>` | hash | spent, reserved (micro-USD) for the platform |
//! | `{b}:spend:org:<uuid>:d:<day>` / `:m:<month>` | hash | the same for one organisation |
//! | `{b}:res:<res_id>` | hash | one hold: amount, meta (JSON), and each scope's limit |
//! | `{b}:res_expiry` | zset | hold ids by expiry (ms), for the sweeper |
//! | `{b}:vision_units:<month>` | hash | Vision units used this month per feature (the free tier) |
//! | `{b}:rate:<org>:<minute>` | string | jobs admitted this minute (rate limit) |

pub mod alerts;
pub mod catalog;
pub mod report;
pub mod sweeper;

use std::collections::{BTreeMap, HashMap};
use std::sync::LazyLock;
use std::time::Duration;

use chrono::{DateTime, Datelike, NaiveDate, TimeZone, Utc};
use redis::{AsyncCommands, Script};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

pub use catalog::{PriceCatalog, PriceError};

use crate::config::{BudgetSettings, RedisSettings};
use crate::domain::{MicroUsd, Tier};
use crate::redis_conn::{Conn, ConnectError};

static RESERVE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("reserve.lua")));
static SETTLE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("settle.lua")));
static RATE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("rate.lua")));
/// Sets a scope's `spent` (ARGV: value, raise_only 0|1, key ttl), keeping its holds.
static RAISE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        "local cur = tonumber(redis.call('HGET', KEYS[1], 'spent')) or 0
         local v = tonumber(ARGV[1])
         if ARGV[2] ~= '1' or v > cur then redis.call('HSET', KEYS[1], 'spent', v) end
         redis.call('HSETNX', KEYS[1], 'reserved', 0)
         redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
         return 0",
    )
});
/// The holds whose expiry has passed by Redis's clock (reserve.lua sets expiries from TIME too).
static EXPIRED: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        "local t = redis.call('TIME')
         local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
         return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))",
    )
});

/// Moves a hold's expiry to `ARGV[2]` ms from now by Redis's clock, if the hold is still there.
static EXTEND: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        "local t = redis.call('TIME')
         local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
         return redis.call('ZADD', KEYS[1], 'XX', 'CH', now + tonumber(ARGV[2]), ARGV[1])",
    )
});

/// Day keys live 40 days, month keys 400: long enough for `aiq budget show` and rebuilds.
const DAY_KEY_TTL_S: u64 = 40 * 86_400;
const MONTH_KEY_TTL_S: u64 = 400 * 86_400;

#[derive(Debug, thiserror::Error)]
pub enum BudgetError {
    #[error("redis (budget): {0}")]
    Redis(#[from] redis::RedisError),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsFailure),
    #[error("unexpected reply from a budget script: {0}")]
    Protocol(String),
    /// The ledger marker is missing: Redis lost its data (or was never filled), so its counters
    /// say nothing about what was spent. No reservation until they are rebuilt.
    #[error(
        "the budget's counters are not trusted (Redis lost its data, or they were never built): no reservation until they are rebuilt from ai_cost_tracking"
    )]
    LedgerMissing,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WindowKind {
    Day,
    Month,
}

impl WindowKind {
    pub fn as_str(self) -> &'static str {
        match self {
            WindowKind::Day => "day",
            WindowKind::Month => "month",
        }
    }
}

/// A calendar window in the budget's time zone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    pub kind: WindowKind,
    /// "2026-11-22" or "2026-11".
    pub label: String,
    pub resets_at: DateTime<Utc>,
}

/// The day and month windows `now` falls in, in time zone `tz`, and the billing date of a cost
/// recorded now.
pub fn windows_at(now: DateTime<Utc>, tz: chrono_tz::Tz) -> (Window, Window, NaiveDate) {
    let local = now.with_timezone(&tz).date_naive();
    let start_of = |d: NaiveDate| {
        let midnight = d.and_hms_opt(0, 0, 0).expect("midnight exists");
        // A midnight skipped by a DST change starts the day at the first instant after it.
        tz.from_local_datetime(&midnight)
            .earliest()
            .unwrap_or_else(|| tz.from_utc_datetime(&midnight))
            .with_timezone(&Utc)
    };
    let tomorrow = local.succ_opt().expect("a next day");
    let next_month = if local.month() == 12 {
        NaiveDate::from_ymd_opt(local.year() + 1, 1, 1)
    } else {
        NaiveDate::from_ymd_opt(local.year(), local.month() + 1, 1)
    }
    .expect("a next month");
    (
        Window {
            kind: WindowKind::Day,
            label: local.format("%Y-%m-%d").to_string(),
            resets_at: start_of(tomorrow),
        },
        Window {
            kind: WindowKind::Month,
            label: local.format("%Y-%m").to_string(),
            resets_at: start_of(next_month),
        },
        local,
    )
}

/// Who a budget scope belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Owner {
    Global,
    Org(Uuid),
}

impl Owner {
    /// "global" or "org:<uuid>", as alerts and keys name it.
    pub fn name(&self) -> String {
        match self {
            Owner::Global => "global".into(),
            Owner::Org(o) => format!("org:{o}"),
        }
    }

    fn describe(&self) -> String {
        match self {
            Owner::Global => "the platform".into(),
            Owner::Org(o) => format!("organization {o}"),
        }
    }
}

/// One limit in one window: the unit a reservation must fit into.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    pub owner: Owner,
    pub window: Window,
    pub limit: MicroUsd,
}

impl Scope {
    /// The key suffix under `{b}:spend:`.
    pub fn suffix(&self) -> String {
        let k = match self.window.kind {
            WindowKind::Day => "d",
            WindowKind::Month => "m",
        };
        format!("{}:{k}:{}", self.owner.name(), self.window.label)
    }

    fn key_ttl(&self) -> u64 {
        match self.window.kind {
            WindowKind::Day => DAY_KEY_TTL_S,
            WindowKind::Month => MONTH_KEY_TTL_S,
        }
    }

    fn describe(&self) -> String {
        let period = match self.window.kind {
            WindowKind::Day => "daily",
            WindowKind::Month => "monthly",
        };
        format!("{} {period} limit of {}", self.owner.describe(), self.limit)
    }
}

/// A scope's totals after a settlement (for alerts) or on inspection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ScopeState {
    pub scope: String,
    pub owner: String,
    pub window_kind: WindowKind,
    pub window: String,
    pub spent: MicroUsd,
    pub reserved: MicroUsd,
    pub limit: MicroUsd,
}

impl ScopeState {
    fn from_suffix(suffix: &str, spent: i64, reserved: i64, limit: i64) -> Option<Self> {
        // "global:d:2026-11-22" or "org:<uuid>:m:2026-11"
        let mut parts: Vec<&str> = suffix.rsplitn(3, ':').collect();
        parts.reverse();
        let [owner, kind, window] = <[&str; 3]>::try_from(parts).ok()?;
        Some(ScopeState {
            scope: suffix.to_owned(),
            owner: owner.to_owned(),
            window_kind: if kind == "d" {
                WindowKind::Day
            } else {
                WindowKind::Month
            },
            window: window.to_owned(),
            spent: MicroUsd::from_micros(spent),
            reserved: MicroUsd::from_micros(reserved),
            limit: MicroUsd::from_micros(limit),
        })
    }
}

/// Which call a reservation is for; written into the cost row if the sweeper has to settle it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallMeta {
    pub job_id: String,
    pub execution: i64,
    pub attempt: u32,
    pub call_seq: i32,
    pub organization_id: Uuid,
    pub tier: String,
    pub provider: String,
    pub operation: String,
    pub model: Option<String>,
    pub billing_date: NaiveDate,
}

impl CallMeta {
    /// The reservation id: one per call of one execution of a job.
    pub fn reservation_id(&self) -> String {
        format!("{}:{}:{}", self.job_id, self.execution, self.call_seq)
    }
}

/// A hold on the budget for one call.
#[derive(Debug, Clone)]
pub struct Reservation {
    pub id: String,
    pub estimate: MicroUsd,
    pub meta: CallMeta,
}

/// Why a call may not run.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub scope: Scope,
    pub spent: MicroUsd,
    pub reserved: MicroUsd,
    pub estimate: MicroUsd,
}

impl Refusal {
    pub fn message(&self) -> String {
        format!(
            "budget exceeded: {} reached (spent {}, held by running calls {}, this call needs up to {}); resets at {}",
            self.scope.describe(),
            self.spent,
            self.reserved,
            self.estimate,
            self.scope.window.resets_at.to_rfc3339()
        )
    }
}

/// An organisation's limits after overrides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrgLimits {
    pub daily: MicroUsd,
    pub monthly: MicroUsd,
}

/// A reservation that expired without being settled (its worker died).
#[derive(Debug, Clone)]
pub struct Expired {
    pub id: String,
    pub estimate: MicroUsd,
    pub meta: Option<CallMeta>,
}

#[derive(Clone)]
pub struct Budget {
    conn: Conn,
    base: String,
    settings: BudgetSettings,
    /// Redis's clock minus this host's (ms): windows are Redis's, whatever this host's clock
    /// says. Measured at connect, corrected by every reservation the script finds off.
    clock_offset_ms: std::sync::Arc<std::sync::atomic::AtomicI64>,
    /// Organisations' own jobs per minute (0: no limit) over their tier's, as `aiq org
    /// set-limits` stored them; refreshed every few seconds (`crate::limits`).
    rate_overrides: std::sync::Arc<std::sync::RwLock<HashMap<Uuid, u32>>>,
}

impl Budget {
    pub async fn connect(
        redis: &RedisSettings,
        settings: &BudgetSettings,
    ) -> Result<Self, BudgetError> {
        let conn = Conn::connect(redis).await.map_err(|e| match e {
            ConnectError::Tls(t) => BudgetError::Tls(t),
            ConnectError::Redis(r) => BudgetError::Redis(r),
        })?;
        let budget = Self {
            conn,
            base: format!("{{{}}}", settings.prefix),
            settings: settings.clone(),
            clock_offset_ms: Default::default(),
            rate_overrides: Default::default(),
        };
        let (secs, micros): (i64, i64) = redis::cmd("TIME")
            .query_async(&mut budget.conn.clone())
            .await?;
        budget.set_redis_now(secs * 1000 + micros / 1000);
        Ok(budget)
    }

    fn set_redis_now(&self, redis_ms: i64) {
        let offset = redis_ms - Utc::now().timestamp_millis();
        self.clock_offset_ms
            .store(offset, std::sync::atomic::Ordering::Relaxed);
    }

    /// Now by Redis's clock (as last measured): what every budget window is computed from, so a
    /// host whose clock is off never bills a call to another day.
    pub fn now(&self) -> DateTime<Utc> {
        let offset = self
            .clock_offset_ms
            .load(std::sync::atomic::Ordering::Relaxed);
        Utc::now() + chrono::Duration::milliseconds(offset)
    }

    /// Whether the ledger marker is there: the counters were built from ai_cost_tracking (or
    /// started empty with it) and have been kept since.
    pub async fn ledger_ok(&self) -> Result<bool, BudgetError> {
        let mut conn = self.conn.clone();
        Ok(conn.exists(self.key("ledger")).await?)
    }

    /// Rebuilds the counters from ai_cost_tracking and sets the ledger marker, under a lock so
    /// one process does it; returns the summary when this process did. `raise_only` keeps any
    /// counter already above the ledger (a second pass after the calls in flight at a data loss
    /// have written their rows: it may only raise).
    pub async fn rebuild_ledger(
        &self,
        store: &crate::store::Store,
        raise_only: bool,
    ) -> anyhow::Result<Option<String>> {
        let mut conn = self.conn.clone();
        let lock = self.key("ledger_lock");
        if !crate::redis_conn::try_lock(&mut conn, &lock, 60_000).await? {
            return Ok(None);
        }
        let summary = rebuild_from(self, store, raise_only).await;
        if summary.is_ok() {
            let _: () = redis::cmd("HSET")
                .arg(self.key("ledger"))
                .arg("rebuilt_at")
                .arg(self.now().timestamp_millis())
                .query_async(&mut conn)
                .await?;
        }
        let _: () = conn.del(&lock).await?;
        summary.map(Some)
    }

    pub fn settings(&self) -> &BudgetSettings {
        &self.settings
    }

    fn key(&self, suffix: &str) -> String {
        format!("{}:{suffix}", self.base)
    }

    /// The tier defaults for an organisation.
    pub fn tier_limits(&self, tier: Tier) -> OrgLimits {
        OrgLimits {
            daily: self.settings.org_daily[tier.index()],
            monthly: self.settings.org_monthly[tier.index()],
        }
    }

    /// The four scopes a call of `org` at `now` must fit into, platform first.
    pub fn scopes(
        &self,
        org: Uuid,
        limits: OrgLimits,
        now: DateTime<Utc>,
    ) -> (Vec<Scope>, NaiveDate) {
        let (day, month, billing_date) = windows_at(now, self.settings.timezone);
        let scopes = vec![
            Scope {
                owner: Owner::Global,
                window: day.clone(),
                limit: self.settings.global_daily,
            },
            Scope {
                owner: Owner::Global,
                window: month.clone(),
                limit: self.settings.global_monthly,
            },
            Scope {
                owner: Owner::Org(org),
                window: day,
                limit: limits.daily,
            },
            Scope {
                owner: Owner::Org(org),
                window: month,
                limit: limits.monthly,
            },
        ];
        (scopes, billing_date)
    }

    /// Holds `estimate` in every scope of `meta`'s organisation, or refuses naming the scope
    /// without room. `ttl` is how long the hold lives if nobody settles it.
    pub async fn reserve(
        &self,
        meta: CallMeta,
        limits: OrgLimits,
        estimate: MicroUsd,
        ttl: Duration,
        now: DateTime<Utc>,
    ) -> Result<Result<Reservation, Refusal>, BudgetError> {
        let mut meta = meta;
        let mut now = now;
        // Once more at most: with the windows of Redis's clock, when this host's disagreed.
        for _ in 0..2 {
            let (scopes, billing_date) = self.scopes(meta.organization_id, limits, now);
            meta.billing_date = billing_date;
            let id = meta.reservation_id();
            let meta_json = serde_json::to_string(&meta).expect("call meta serialises");
            let mut conn = self.conn.clone();
            let mut inv = RESERVE.key(&self.base);
            inv.arg(&id)
                .arg(estimate.micros())
                .arg(ttl.as_millis() as u64)
                .arg(&meta_json)
                .arg(scopes.len());
            for s in &scopes {
                inv.arg(s.suffix()).arg(s.limit.micros()).arg(s.key_ttl());
            }
            let day = &scopes[0].window;
            let day_start = windows_start(day, self.settings.timezone);
            inv.arg(day_start.timestamp_millis())
                .arg(day.resets_at.timestamp_millis());
            let reply: Vec<i64> = inv.invoke_async(&mut conn).await?;
            if let [3, redis_ms] = reply.as_slice() {
                self.set_redis_now(*redis_ms);
                now = DateTime::from_timestamp_millis(*redis_ms).unwrap_or_else(Utc::now);
                continue;
            }
            return self.reserved(reply, scopes, id, estimate, meta);
        }
        Err(BudgetError::Protocol(
            "reserve found the windows off twice, even by Redis's own clock".into(),
        ))
    }

    fn reserved(
        &self,
        reply: Vec<i64>,
        scopes: Vec<Scope>,
        id: String,
        estimate: MicroUsd,
        meta: CallMeta,
    ) -> Result<Result<Reservation, Refusal>, BudgetError> {
        match reply.as_slice() {
            [4] => Err(BudgetError::LedgerMissing),
            [1] | [2] => Ok(Ok(Reservation { id, estimate, meta })),
            [0, i, spent, reserved] => {
                let scope = scopes
                    .get((*i as usize).wrapping_sub(1))
                    .cloned()
                    .ok_or_else(|| BudgetError::Protocol(format!("reserve refused scope {i}")))?;
                Ok(Err(Refusal {
                    scope,
                    spent: MicroUsd::from_micros(*spent),
                    reserved: MicroUsd::from_micros(*reserved),
                    estimate,
                }))
            }
            other => Err(BudgetError::Protocol(format!("reserve returned {other:?}"))),
        }
    }

    /// Replaces a hold with the actual cost. Returns the scopes' new totals (empty when the hold
    /// was already settled or swept).
    pub async fn settle(
        &self,
        reservation_id: &str,
        actual: MicroUsd,
    ) -> Result<Vec<ScopeState>, BudgetError> {
        let mut conn = self.conn.clone();
        let rows: Vec<(String, i64, i64, i64)> = SETTLE
            .key(&self.base)
            .arg(reservation_id)
            .arg(actual.micros())
            .invoke_async(&mut conn)
            .await?;
        Ok(rows
            .into_iter()
            .filter_map(|(suffix, spent, reserved, limit)| {
                ScopeState::from_suffix(&suffix, spent, reserved, limit)
            })
            .collect())
    }

    /// Keeps a hold from the sweeper for `ttl` more: its call was answered and the answer is
    /// kept until its rows can be written, which settles it. True when the hold was there.
    pub async fn extend_hold(
        &self,
        reservation_id: &str,
        ttl: Duration,
    ) -> Result<bool, BudgetError> {
        let mut conn = self.conn.clone();
        let changed: i64 = EXTEND
            .key(self.key("res_expiry"))
            .arg(reservation_id)
            .arg(ttl.as_millis() as u64)
            .invoke_async(&mut conn)
            .await?;
        Ok(changed > 0)
    }

    /// Holds whose time ran out: their workers died (or stalled past the provider timeout).
    pub async fn expired(&self, limit: usize) -> Result<Vec<Expired>, BudgetError> {
        let mut conn = self.conn.clone();
        // By Redis's clock, not this host's: a host whose clock runs ahead must not take live
        // holds.
        let ids: Vec<String> = EXPIRED
            .key(self.key("res_expiry"))
            .arg(limit)
            .invoke_async(&mut conn)
            .await?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            let (amount, meta): (Option<i64>, Option<String>) = conn
                .hmget(self.key(&format!("res:{id}")), &["_amount", "_meta"])
                .await?;
            match amount {
                Some(a) => out.push(Expired {
                    id,
                    estimate: MicroUsd::from_micros(a),
                    meta: meta.and_then(|m| serde_json::from_str(&m).ok()),
                }),
                None => {
                    // Settled meanwhile: drop the stale index entry.
                    let _: i64 = conn.zrem(self.key("res_expiry"), &id).await?;
                }
            }
        }
        Ok(out)
    }

    /// Counts `units` more Vision units per feature this month; returns the units used before
    /// each, which price the call (the first 1,000 a month are free).
    pub async fn claim_vision_units(
        &self,
        month: &str,
        units: &[(&str, u64)],
    ) -> Result<Vec<u64>, BudgetError> {
        if units.is_empty() {
            return Ok(Vec::new());
        }
        let key = self.key(&format!("vision_units:{month}"));
        let mut pipe = redis::pipe();
        for (feature, n) in units {
            pipe.hincr(&key, *feature, *n);
        }
        pipe.expire(&key, MONTH_KEY_TTL_S as i64).ignore();
        let mut conn = self.conn.clone();
        let after: Vec<u64> = pipe.query_async(&mut conn).await?;
        Ok(after
            .iter()
            .zip(units)
            .map(|(a, (_, n))| a.saturating_sub(*n))
            .collect())
    }

    /// Replaces the organisations' own jobs-per-minute limits (the rest keep their tier's).
    pub fn set_rate_overrides(&self, overrides: HashMap<Uuid, u32>) {
        *self
            .rate_overrides
            .write()
            .unwrap_or_else(|p| p.into_inner()) = overrides;
    }

    /// `org`'s jobs per minute in force (0: no limit): its own, else its tier's.
    pub fn jobs_per_minute(&self, org: Uuid, tier: Tier) -> u32 {
        self.rate_overrides
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&org)
            .copied()
            .unwrap_or(self.settings.org_jobs_per_minute[tier.index()])
    }

    /// The jobs of `org` counted in the current minute's window of its jobs per minute.
    pub async fn jobs_this_minute(&self, org: Uuid) -> Result<u64, BudgetError> {
        let (secs, _): (u64, u64) = redis::cmd("TIME")
            .query_async(&mut self.conn.clone())
            .await?;
        let n: Option<String> = self
            .conn
            .clone()
            .get(self.key(&format!("rate:{org}:{}", secs / 60)))
            .await?;
        Ok(n.and_then(|n| n.parse().ok()).unwrap_or(0))
    }

    /// Admits one job of `org` under its jobs-per-minute limit (its own, else its tier's); `Err`
    /// holds how long to wait for the next minute.
    pub async fn admit(&self, org: Uuid, tier: Tier) -> Result<Result<(), Duration>, BudgetError> {
        let limit = self.jobs_per_minute(org, tier);
        if limit == 0 {
            return Ok(Ok(()));
        }
        let mut conn = self.conn.clone();
        let wait_ms: u64 = RATE
            .key(&self.base)
            .arg(org.to_string())
            .arg(limit)
            .invoke_async(&mut conn)
            .await?;
        Ok(if wait_ms == 0 {
            Ok(())
        } else {
            Err(Duration::from_millis(wait_ms))
        })
    }

    /// The current totals of `scopes`.
    pub async fn state(&self, scopes: &[Scope]) -> Result<Vec<ScopeState>, BudgetError> {
        let mut conn = self.conn.clone();
        let mut out = Vec::with_capacity(scopes.len());
        for s in scopes {
            let (spent, reserved): (Option<i64>, Option<i64>) = conn
                .hmget(
                    self.key(&format!("spend:{}", s.suffix())),
                    &["spent", "reserved"],
                )
                .await?;
            out.push(ScopeState {
                scope: s.suffix(),
                owner: s.owner.name(),
                window_kind: s.window.kind,
                window: s.window.label.clone(),
                spent: MicroUsd::from_micros(spent.unwrap_or(0)),
                reserved: MicroUsd::from_micros(reserved.unwrap_or(0)),
                limit: s.limit,
            });
        }
        Ok(out)
    }

    /// Sets a scope's settled spend (after Redis lost its data; see `aiq budget rebuild`). Holds
    /// of calls still running are kept.
    pub async fn set_spent(&self, scope: &Scope, spent: MicroUsd) -> Result<(), BudgetError> {
        self.put_spent(scope, spent, false).await
    }

    /// [`Budget::set_spent`], or with `raise_only` only when the counter is below `spent`.
    async fn put_spent(
        &self,
        scope: &Scope,
        spent: MicroUsd,
        raise_only: bool,
    ) -> Result<(), BudgetError> {
        let mut conn = self.conn.clone();
        let key = self.key(&format!("spend:{}", scope.suffix()));
        let _: () = RAISE
            .key(&key)
            .arg(spent.micros())
            .arg(if raise_only { 1 } else { 0 })
            .arg(scope.key_ttl())
            .invoke_async(&mut conn)
            .await?;
        Ok(())
    }

    /// Sets this month's Vision units per feature (rebuild).
    pub async fn set_vision_units(
        &self,
        month: &str,
        units: &BTreeMap<String, u64>,
    ) -> Result<(), BudgetError> {
        let mut conn = self.conn.clone();
        let key = self.key(&format!("vision_units:{month}"));
        let mut pipe = redis::pipe();
        pipe.del(&key).ignore();
        for (f, n) in units {
            pipe.hset(&key, f, *n).ignore();
        }
        pipe.expire(&key, MONTH_KEY_TTL_S as i64).ignore();
        let _: () = pipe.query_async(&mut conn).await?;
        Ok(())
    }

    /// Every organisation scope with a spend key in the windows of `now` (for rebuild and costs).
    pub async fn vision_units(&self, month: &str) -> Result<BTreeMap<String, u64>, BudgetError> {
        let mut conn = self.conn.clone();
        Ok(conn
            .hgetall(self.key(&format!("vision_units:{month}")))
            .await?)
    }
}

/// What [`Budget::purge_org`] did with an organisation's keys.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct OrgBudgetPurge {
    /// Keys deleted: spend counters of past windows, the jobs-per-minute counters.
    pub deleted: u64,
    /// The current day's and month's spend counters, kept until their window resets.
    pub kept_until_reset: u64,
}

impl Budget {
    /// Removes an organisation's budget keys, for `aiq org purge`: its spend counters of past
    /// windows (every window a key can still live in) and its jobs-per-minute counters. The
    /// counters of the current day and month stay, set to expire when their window resets: a
    /// job of the organisation still running settles into them, and the same organisation id
    /// enqueueing again cannot spend a window's limit twice. The platform's counters are not
    /// touched (the platform did spend that money). Holds are not touched either: a running
    /// call's hold is settled by its job, an expired one swept as usual.
    pub async fn purge_org(&self, org: Uuid) -> Result<OrgBudgetPurge, BudgetError> {
        let mut conn = self.conn.clone();
        let (secs, _): (i64, i64) = redis::cmd("TIME").query_async(&mut conn).await?;
        self.set_redis_now(secs * 1000);
        let now = self.now();
        let tz = self.settings.timezone;
        let (day, month, _) = windows_at(now, tz);
        let owner = Owner::Org(org);
        let scope = |window: Window| Scope {
            owner: owner.clone(),
            window,
            limit: MicroUsd::ZERO,
        };
        let mut old = Vec::new();
        // Past days a day key can still live in, and past months a month key can.
        for back in 1..=(DAY_KEY_TTL_S / 86_400 + 1) as i64 {
            let (d, _, _) = windows_at(now - chrono::Duration::days(back), tz);
            old.push(self.key(&format!("spend:{}", scope(d).suffix())));
        }
        let mut seen = std::collections::BTreeSet::from([month.label.clone()]);
        for back in 1..=(MONTH_KEY_TTL_S / 86_400 + 31) as i64 {
            let (_, m, _) = windows_at(now - chrono::Duration::days(back), tz);
            if seen.insert(m.label.clone()) {
                old.push(self.key(&format!("spend:{}", scope(m).suffix())));
            }
        }
        let minute = secs / 60;
        for m in [minute - 1, minute, minute + 1] {
            old.push(self.key(&format!("rate:{org}:{m}")));
        }
        let mut out = OrgBudgetPurge::default();
        for chunk in old.chunks(100) {
            let n: u64 = conn.del(chunk).await?;
            out.deleted += n;
        }
        for w in [day, month] {
            let key = self.key(&format!("spend:{}", scope(w.clone()).suffix()));
            let set: bool = conn
                .pexpire_at(&key, w.resets_at.timestamp_millis())
                .await?;
            out.kept_until_reset += u64::from(set);
        }
        Ok(out)
    }
}

/// When a day window began (the day before it resets).
fn windows_start(day: &Window, tz: chrono_tz::Tz) -> DateTime<Utc> {
    let (start, _, _) = windows_at(day.resets_at - chrono::Duration::hours(36), tz);
    start.resets_at
}

/// Recomputes the Redis counters of the current day and month windows from ai_cost_tracking,
/// the ledger (after Redis lost its data), and sets the ledger marker. Returns a summary for the
/// operator.
pub async fn rebuild(budget: &Budget, store: &crate::store::Store) -> anyhow::Result<String> {
    Ok(budget
        .rebuild_ledger(store, false)
        .await?
        .unwrap_or_else(|| "another process is rebuilding the counters now".into()))
}

async fn rebuild_from(
    budget: &Budget,
    store: &crate::store::Store,
    raise_only: bool,
) -> anyhow::Result<String> {
    let (day, month, today) = windows_at(budget.now(), budget.settings.timezone);
    let month_start = today.with_day(1).expect("day 1 exists");
    let day_spend: BTreeMap<Option<Uuid>, MicroUsd> = store
        .spend_by_org(today, today)
        .await?
        .into_iter()
        .collect();
    let month_spend = store.spend_by_org(month_start, today).await?;
    let scope = |owner: Owner, window: &Window| Scope {
        owner,
        window: window.clone(),
        limit: MicroUsd::ZERO,
    };
    let total = |m: &mut dyn Iterator<Item = MicroUsd>| m.sum::<MicroUsd>();
    let global_day = total(&mut day_spend.values().copied());
    let global_month = total(&mut month_spend.iter().map(|(_, c)| *c));
    budget
        .put_spent(&scope(Owner::Global, &day), global_day, raise_only)
        .await?;
    budget
        .put_spent(&scope(Owner::Global, &month), global_month, raise_only)
        .await?;
    let mut orgs = 0;
    for (org, spent_month) in &month_spend {
        let Some(org) = org else { continue };
        let spent_day = day_spend
            .get(&Some(*org))
            .copied()
            .unwrap_or(MicroUsd::ZERO);
        budget
            .put_spent(&scope(Owner::Org(*org), &day), spent_day, raise_only)
            .await?;
        budget
            .put_spent(&scope(Owner::Org(*org), &month), *spent_month, raise_only)
            .await?;
        orgs += 1;
    }
    let units = store.vision_units_by_feature(month_start, today).await?;
    if !raise_only {
        budget.set_vision_units(&month.label, &units).await?;
    }
    Ok(format!(
        "rebuilt from ai_cost_tracking: platform {} today ({}), {} this month ({}); {orgs} organisations; Vision units this month {:?}",
        global_day, day.label, global_month, month.label, units
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn windows_follow_the_calendar_of_the_configured_time_zone() {
        let (day, month, billing) = windows_at(utc("2026-11-30T23:30:00Z"), chrono_tz::UTC);
        assert_eq!(day.label, "2026-11-30");
        assert_eq!(day.resets_at, utc("2026-12-01T00:00:00Z"));
        assert_eq!(month.label, "2026-11");
        assert_eq!(month.resets_at, utc("2026-12-01T00:00:00Z"));
        assert_eq!(billing.to_string(), "2026-11-30");
        // In Berlin (UTC+1 in winter) it is already December 1st.
        let (day, month, _) = windows_at(utc("2026-11-30T23:30:00Z"), chrono_tz::Europe::Berlin);
        assert_eq!(day.label, "2026-12-01");
        assert_eq!(day.resets_at, utc("2026-12-01T23:00:00Z"));
        assert_eq!(month.label, "2026-12");
        assert_eq!(month.resets_at, utc("2026-12-31T23:00:00Z"));
        // December rolls over into the next year.
        let (_, month, _) = windows_at(utc("2026-12-15T12:00:00Z"), chrono_tz::UTC);
        assert_eq!(month.resets_at, utc("2027-01-01T00:00:00Z"));
    }

    #[test]
    fn scope_suffixes_parse_back() {
        let s = ScopeState::from_suffix(
            "org:0b6f1b3e-2a55-4a6e-9a43-2f6f6f1b2c3d:d:2026-11-22",
            5,
            6,
            7,
        )
        .unwrap();
        assert_eq!(s.owner, "org:0b6f1b3e-2a55-4a6e-9a43-2f6f6f1b2c3d");
        assert_eq!(s.window_kind, WindowKind::Day);
        assert_eq!(s.window, "2026-11-22");
        let g = ScopeState::from_suffix("global:m:2026-11", 1, 0, 2).unwrap();
        assert_eq!(g.owner, "global");
        assert_eq!(g.window_kind, WindowKind::Month);
    }
}
