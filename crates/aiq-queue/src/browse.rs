//! Bounded reads for the console: a page of a tier's organisations with waiting jobs, of one
//! organisation's waiting ids, of the delayed set with each job's reason. Every read is one
//! ranged command with a limit (never a whole list or set) plus at most one HMGET per job shown.

use redis::AsyncCommands;

use crate::{Queue, QueueError};

/// A waiting or delayed job as a page lists it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Listed {
    pub id: String,
    pub kind: String,
    pub tier: String,
    pub organization_id: String,
    pub attempts: u32,
    /// When a delayed job is due (ms); when an organisation's oldest waiting job became ready.
    pub at_ms: Option<i64>,
    pub delay_reason: Option<String>,
}

const FIELDS: [&str; 5] = ["kind", "tier", "org", "attempts", "delay_reason"];

impl Queue {
    /// Organisations of a tier with waiting jobs, oldest head first, `offset` into that order,
    /// each with when its oldest waiting job became ready (ms).
    pub async fn waiting_orgs(
        &self,
        tier: &str,
        offset: usize,
        limit: usize,
    ) -> Result<Vec<(String, i64)>, QueueError> {
        let mut conn = self.conn.clone();
        let rows: Vec<(String, f64)> = conn
            .zrangebyscore_limit_withscores(
                self.key(&format!("heads:{tier}")),
                "-inf",
                "+inf",
                offset as isize,
                limit as isize,
            )
            .await?;
        Ok(rows.into_iter().map(|(o, s)| (o, s as i64)).collect())
    }

    /// One organisation's waiting jobs in a tier, in the order they run, `offset` from the first.
    pub async fn waiting_page(
        &self,
        tier: &str,
        org: &str,
        offset: usize,
        limit: usize,
    ) -> Result<Vec<Listed>, QueueError> {
        let mut conn = self.conn.clone();
        let ids: Vec<String> = conn
            .lrange(
                self.key(&format!("wait:{tier}:{org}")),
                offset as isize,
                (offset + limit) as isize - 1,
            )
            .await?;
        self.listed(ids.into_iter().map(|i| (i, None)).collect())
            .await
    }

    /// Delayed jobs, soonest due first, `offset` from the soonest.
    pub async fn delayed_page(
        &self,
        offset: usize,
        limit: usize,
    ) -> Result<Vec<Listed>, QueueError> {
        let mut conn = self.conn.clone();
        let rows: Vec<(String, f64)> = conn
            .zrange_withscores(
                self.key("delayed"),
                offset as isize,
                (offset + limit) as isize - 1,
            )
            .await?;
        self.listed(rows.into_iter().map(|(i, s)| (i, Some(s as i64))).collect())
            .await
    }

    async fn listed(&self, ids: Vec<(String, Option<i64>)>) -> Result<Vec<Listed>, QueueError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for (id, _) in &ids {
            pipe.cmd("HMGET")
                .arg(self.key(&format!("job:{id}")))
                .arg(&FIELDS);
        }
        let replies: Vec<redis::Value> = pipe.query_async(&mut conn).await?;
        Ok(ids
            .into_iter()
            .zip(replies)
            .map(|((id, at_ms), v)| {
                let f: Vec<Option<String>> =
                    redis::from_redis_value_ref(&v).unwrap_or_else(|_| vec![None; FIELDS.len()]);
                let get = |i: usize| f.get(i).cloned().flatten();
                Listed {
                    id,
                    kind: get(0).unwrap_or_default(),
                    tier: get(1).unwrap_or_default(),
                    organization_id: get(2).unwrap_or_default(),
                    attempts: get(3).and_then(|a| a.parse().ok()).unwrap_or(0),
                    at_ms,
                    delay_reason: get(4),
                }
            })
            .collect())
    }
}
