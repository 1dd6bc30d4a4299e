//! The webhooks' tables: the organisations' endpoints and the outbox of messages to deliver.
//!
//! A job's messages are written by [`enqueue_in`] inside the transaction that writes its final
//! `ai_processing_results` row (every writer of one calls it, and only when its result insert
//! added the row), so a job with an outcome has its deliveries and a replay adds none. The hot
//! path asks PostgreSQL nothing for an organisation without endpoints and a job without a
//! `callback_url`: [`EndpointCache`] knows which organisations have endpoints, forgotten when
//! any process adds or removes one (`pg_notify`, followed by [`Store::follow_endpoint_changes`])
//! and at the latest after [`ENDPOINT_CACHE_TTL`]. The delivery loop (`crate::webhooks`) claims due messages with
//! `FOR UPDATE SKIP LOCKED` under a lease, so several processes share the table.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use uuid::Uuid;

use super::{CallRecord, JobRef, ResultRecord, Store, StoreError, pg_text};

/// How long the set of organisations with endpoints is trusted before it is read again. Adding
/// or removing an endpoint notifies every process at once ([`Store::follow_endpoint_changes`]);
/// this bounds what a lost notification costs.
pub const ENDPOINT_CACHE_TTL: Duration = Duration::from_secs(30);

/// The channel `aiq webhooks add` and `rm` notify (`pg_notify`).
pub(super) const ENDPOINTS_CHANNEL: &str = "aiq_webhook_endpoints";

/// The most secrets an endpoint keeps (the table's CHECK): a rotation adds one.
pub const MAX_SECRETS: usize = 8;

/// The most of a try's error kept in the outbox and on the endpoint, in characters; also the
/// most of a job's error its event carries.
pub const MAX_ERROR_CHARS: usize = 1000;

/// A job's final state, as its webhook's `type` names it. The call site that writes the final
/// result row knows which: a permanent failure is `Failed`, attempts (or interruptions) that ran
/// out are `Dead`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    Succeeded,
    Failed,
    Dead,
    Cancelled,
}

impl Ending {
    /// The Standard Webhooks event type.
    pub fn event_type(self) -> &'static str {
        match self {
            Ending::Succeeded => "job.succeeded",
            Ending::Failed => "job.failed",
            Ending::Dead => "job.dead",
            Ending::Cancelled => "job.cancelled",
        }
    }

    /// The job's state (the events contract's word).
    pub fn state(self) -> &'static str {
        match self {
            Ending::Succeeded => "succeeded",
            Ending::Failed => "failed",
            Ending::Dead => "dead",
            Ending::Cancelled => "cancelled",
        }
    }
}

/// One job's final event, ready for the outbox: who it is for and the exact body to send.
#[derive(Debug, Clone)]
pub struct JobEvent {
    pub organization_id: Uuid,
    pub job_id: String,
    pub callback_url: Option<String>,
    pub ending: Ending,
    /// The JSON text every try sends and signs.
    pub body: String,
}

impl JobEvent {
    /// The event of `job` ending as `ending`, with the error and the result summary of the
    /// contract's body (`None` for a job without an organisation, which has no receiver).
    pub fn new(
        job: &JobRef,
        ending: Ending,
        error: Option<&str>,
        result: Option<Value>,
    ) -> Option<Self> {
        let organization_id = job.organization_id?;
        let body = json!({
            "type": ending.event_type(),
            "timestamp": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            "data": {
                "job_id": job.job_id,
                "organization_id": organization_id,
                "tier": job.tier,
                "kind": job.kind,
                "state": ending.state(),
                "attempts": job.attempt,
                "error": error.map(|e| crate::redact::cut(&pg_text(e), MAX_ERROR_CHARS).into_owned()),
                "result": result,
            }
        });
        Some(Self {
            organization_id,
            job_id: job.job_id.clone(),
            callback_url: job.callback_url.clone(),
            ending,
            body: body.to_string(),
        })
    }

    /// A succeeded job's event, its result summarised from its rows.
    pub fn succeeded(job: &JobRef, call: &CallRecord, result: &ResultRecord) -> Option<Self> {
        Self::new(job, Ending::Succeeded, None, Some(summary(call, result)))
    }

    /// A job that failed for good (`ending` says how), with its failed result's message.
    pub fn failed(job: &JobRef, ending: Ending, result: &ResultRecord) -> Option<Self> {
        Self::new(job, ending, result.error_message.as_deref(), None)
    }
}

/// The result summary of the events contract: provider, model, cost as a decimal string,
/// tokens (LLM) or units (Vision), and the call's duration.
pub fn summary(call: &CallRecord, result: &ResultRecord) -> Value {
    let cost = call.cost.to_string();
    json!({
        "provider": result.provider,
        "model": result.model,
        "cost_usd": cost.trim_start_matches(['-', '$']),
        "input_tokens": call.input_tokens,
        "output_tokens": call.output_tokens,
        "units": call.units,
        "duration_ms": result.processing_ms,
    })
}

/// Which organisations have endpoints, as last read; shared by every clone of a [`Store`].
#[derive(Default)]
pub struct EndpointCache {
    orgs: Mutex<Option<(Instant, Arc<HashSet<Uuid>>)>>,
}

impl EndpointCache {
    /// Forgets the set, so that the next write reads it again (after an endpoint is added).
    pub fn invalidate(&self) {
        *self.orgs.lock().expect("endpoint cache") = None;
    }

    fn fresh(&self) -> Option<Arc<HashSet<Uuid>>> {
        let guard = self.orgs.lock().expect("endpoint cache");
        guard
            .as_ref()
            .filter(|(at, _)| at.elapsed() < ENDPOINT_CACHE_TTL)
            .map(|(_, set)| set.clone())
    }

    fn put(&self, set: HashSet<Uuid>) -> Arc<HashSet<Uuid>> {
        let set = Arc::new(set);
        *self.orgs.lock().expect("endpoint cache") = Some((Instant::now(), set.clone()));
        set
    }
}

/// Which organisations have endpoints, when known: `None` means every organisation may have.
pub type EndpointOrgs = Option<Arc<HashSet<Uuid>>>;

/// Whether a job of `org` (with a callback_url or not) has a receiver, as far as `orgs` knows.
/// How long the read of which organisations have endpoints may take before every job is taken to
/// have receivers (the transaction's insert then finds them itself).
const RECEIVERS_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(500);

pub fn has_receiver(orgs: &EndpointOrgs, org: Option<Uuid>, callback: bool) -> bool {
    let Some(org) = org else {
        return false;
    };
    callback || orgs.as_ref().is_none_or(|set| set.contains(&org))
}

impl Store {
    /// The organisations with endpoints: no query while the cache is fresh (it is read again
    /// every [`ENDPOINT_CACHE_TTL`]). When they cannot be read, `None`: every job is then taken
    /// to have receivers (the insert finds them itself). Call it before beginning the
    /// transaction that writes the messages, so that it never waits for a second connection.
    pub async fn webhook_receivers(&self) -> EndpointOrgs {
        if let Some(set) = self.webhook_orgs.fresh() {
            return Some(set);
        }
        // Bounded: with PostgreSQL gone the pool would wait its whole acquire timeout here, and
        // again for the transaction, delaying the answer's way to being kept with its job.
        let read = sqlx::query_scalar::<_, Uuid>(
            "SELECT DISTINCT organization_id FROM webhook_endpoints WHERE NOT disabled",
        )
        .fetch_all(&self.pool);
        match tokio::time::timeout(RECEIVERS_READ_TIMEOUT, read).await {
            Ok(Ok(rows)) => Some(self.webhook_orgs.put(rows.into_iter().collect())),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "reading which organisations have webhook endpoints failed");
                None
            }
            Err(_) => {
                tracing::warn!("reading which organisations have webhook endpoints timed out");
                None
            }
        }
    }
}

/// [`enqueue_in`] for the events whose job has a receiver as `orgs` knows
/// ([`Store::webhook_receivers`], read before the transaction): no statement at all when none
/// has. For the writers of final result rows in transactions of their own, such as the
/// cancellation's.
pub async fn enqueue_with_receivers_in(
    tx: &mut sqlx::PgConnection,
    orgs: &EndpointOrgs,
    events: Vec<JobEvent>,
) -> Result<u64, sqlx::Error> {
    let events: Vec<JobEvent> = events
        .into_iter()
        .filter(|e| has_receiver(orgs, Some(e.organization_id), e.callback_url.is_some()))
        .collect();
    enqueue_in(tx, &events).await
}

/// Writes the outbox messages of `events` in the caller's transaction: one per endpoint of the
/// event's organisation and one for its callback_url, in one statement. A message that exists
/// already (same organisation, job and target) is left as it is. Returns how many were added.
/// For the writers of final result rows, including the cancellation's.
pub async fn enqueue_in(
    tx: &mut sqlx::PgConnection,
    events: &[JobEvent],
) -> Result<u64, sqlx::Error> {
    if events.is_empty() {
        return Ok(0);
    }
    let orgs: Vec<Uuid> = events.iter().map(|e| e.organization_id).collect();
    let jobs: Vec<String> = events
        .iter()
        .map(|e| pg_text(&e.job_id).into_owned())
        .collect();
    let callbacks: Vec<Option<String>> = events.iter().map(|e| e.callback_url.clone()).collect();
    let types: Vec<&str> = events.iter().map(|e| e.ending.event_type()).collect();
    let bodies: Vec<String> = events.iter().map(|e| e.body.clone()).collect();
    let added = sqlx::query(
        "INSERT INTO webhook_outbox (id, organization_id, job_id, target, endpoint_id, callback_url,
            event_type, body)
         SELECT 'msg_' || replace(gen_random_uuid()::text, '-', ''), e.org, e.job_id, x.target,
            x.endpoint_id, x.callback_url, e.event_type, e.body
         FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[])
           AS e(org, job_id, callback_url, event_type, body)
         CROSS JOIN LATERAL (
             SELECT w.id::text AS target, w.id AS endpoint_id, NULL::text AS callback_url
             FROM webhook_endpoints w WHERE w.organization_id = e.org AND NOT w.disabled
             UNION ALL
             SELECT 'callback', NULL::uuid, e.callback_url WHERE e.callback_url IS NOT NULL
         ) x
         ON CONFLICT ON CONSTRAINT webhook_outbox_one_per_target DO NOTHING",
    )
    .bind(&orgs)
    .bind(&jobs)
    .bind(&callbacks)
    .bind(&types)
    .bind(&bodies)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if added > 0 {
        crate::observe::webhooks_enqueued(added);
    }
    Ok(added)
}

/// An organisation's endpoint, as `aiq webhooks list` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Endpoint {
    pub id: Uuid,
    pub organization_id: Uuid,
    pub url: String,
    pub secrets: usize,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub disabled: bool,
    pub failing_since: Option<chrono::DateTime<chrono::Utc>>,
    /// Failing for longer than the setting's threshold.
    pub failing: bool,
    pub last_error: Option<String>,
    /// Messages not yet delivered nor given up.
    pub pending: i64,
}

/// A message claimed for delivery, with where it goes and the secrets that sign it.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub id: String,
    pub organization_id: Uuid,
    pub job_id: String,
    pub endpoint_id: Option<Uuid>,
    /// The endpoint's URL or the job's callback_url; None when the endpoint is disabled.
    pub url: Option<String>,
    /// The endpoint's secrets, newest first (empty for a callback).
    pub secrets: Vec<String>,
    pub body: String,
    /// Tries so far, this one not counted.
    pub attempts: i32,
}

/// How one try went.
#[derive(Debug, Clone)]
pub enum Tried {
    Delivered { status: u16 },
    Failed { status: Option<u16>, error: String },
}

impl Store {
    /// Adds an endpoint; returns its id.
    pub async fn add_webhook_endpoint(
        &self,
        org: Uuid,
        url: &str,
        secret: &str,
    ) -> Result<Uuid, StoreError> {
        let id: Uuid = sqlx::query_scalar(
            "INSERT INTO webhook_endpoints (organization_id, url, secrets) VALUES ($1, $2, ARRAY[$3::text])
             RETURNING id",
        )
        .bind(org)
        .bind(url)
        .bind(secret)
        .fetch_one(&self.pool)
        .await?;
        self.endpoints_changed().await;
        Ok(id)
    }

    /// Tells every process (and this one) that the set of endpoints changed.
    async fn endpoints_changed(&self) {
        self.webhook_orgs.invalidate();
        if let Err(e) = sqlx::query("SELECT pg_notify($1, '')")
            .bind(ENDPOINTS_CHANNEL)
            .execute(&self.pool)
            .await
        {
            tracing::warn!(error = %e, "notifying the other processes of an endpoint change failed; they see it within {ENDPOINT_CACHE_TTL:?}");
        }
    }

    /// Forgets the cached set of organisations with endpoints whenever an endpoint is added or
    /// removed by any process (LISTEN on one pooled connection), until `stop`. A lost connection
    /// is opened again; the cache's TTL covers what was missed meanwhile.
    pub async fn follow_endpoint_changes(&self, stop: tokio_util::sync::CancellationToken) {
        loop {
            let e = tokio::select! {
                _ = stop.cancelled() => return,
                r = self.listen_for_endpoint_changes() => match r {
                    Err(e) => e,
                },
            };
            self.webhook_orgs.invalidate();
            tracing::warn!(error = %e, "listening for webhook endpoint changes failed; listening again shortly");
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
        }
    }

    async fn listen_for_endpoint_changes(&self) -> Result<std::convert::Infallible, sqlx::Error> {
        let mut listener = sqlx::postgres::PgListener::connect_with(&self.pool).await?;
        listener.listen(ENDPOINTS_CHANNEL).await?;
        // Changes made before the LISTEN took effect are in the next read.
        self.webhook_orgs.invalidate();
        loop {
            listener.recv().await?;
            self.webhook_orgs.invalidate();
        }
    }

    /// Endpoints (of one organisation, or all), with their pending messages; `failing_after`
    /// decides which are shown failing.
    pub async fn webhook_endpoints(
        &self,
        org: Option<Uuid>,
        failing_after: Duration,
    ) -> Result<Vec<Endpoint>, StoreError> {
        type Row = (
            Uuid,
            Uuid,
            String,
            i32,
            chrono::DateTime<chrono::Utc>,
            bool,
            Option<chrono::DateTime<chrono::Utc>>,
            bool,
            Option<String>,
            i64,
        );
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT e.id, e.organization_id, e.url, cardinality(e.secrets), e.created_at, e.disabled,
                e.failing_since, coalesce(e.failing_since < now() - make_interval(secs => $2), false),
                e.last_error,
                (SELECT count(*) FROM webhook_outbox o
                 WHERE o.endpoint_id = e.id AND o.delivered_at IS NULL AND o.given_up_at IS NULL)
             FROM webhook_endpoints e
             WHERE $1::uuid IS NULL OR e.organization_id = $1
             ORDER BY e.organization_id, e.created_at",
        )
        .bind(org)
        .bind(failing_after.as_secs_f64())
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| Endpoint {
                id: r.0,
                organization_id: r.1,
                url: r.2,
                secrets: r.3.max(0) as usize,
                created_at: r.4,
                disabled: r.5,
                failing_since: r.6,
                failing: r.7,
                last_error: r.8,
                pending: r.9,
            })
            .collect())
    }

    /// Deletes an endpoint and its undelivered messages; false when there was none.
    pub async fn remove_webhook_endpoint(&self, id: Uuid) -> Result<bool, StoreError> {
        let n = sqlx::query("DELETE FROM webhook_endpoints WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?
            .rows_affected();
        self.endpoints_changed().await;
        Ok(n == 1)
    }

    /// An endpoint's URL and secrets (newest first), if it exists.
    pub async fn webhook_endpoint(
        &self,
        id: Uuid,
    ) -> Result<Option<(Uuid, String, Vec<String>)>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT organization_id, url, secrets FROM webhook_endpoints WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// Puts `secret` first among the endpoint's secrets, keeping the older ones (up to
    /// [`MAX_SECRETS`] in all) so they keep signing while receivers move over. False when the
    /// endpoint does not exist.
    pub async fn rotate_webhook_secret(&self, id: Uuid, secret: &str) -> Result<bool, StoreError> {
        let n = sqlx::query(
            "UPDATE webhook_endpoints SET secrets = (ARRAY[$2::text] || secrets)[1:$3] WHERE id = $1",
        )
        .bind(id)
        .bind(secret)
        .bind(MAX_SECRETS as i32)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(n == 1)
    }

    /// Claims up to `n` due messages for `lease`: no other process takes them meanwhile, and a
    /// claim that is never finished (the process died) comes due again when it ends.
    pub async fn claim_webhooks(
        &self,
        n: i64,
        lease: Duration,
    ) -> Result<Vec<Claimed>, StoreError> {
        type Row = (
            String,
            Uuid,
            String,
            Option<Uuid>,
            Option<String>,
            String,
            i32,
            Option<String>,
            Option<Vec<String>>,
            Option<bool>,
        );
        let rows: Vec<Row> = sqlx::query_as(
            "WITH claimed AS (
                 UPDATE webhook_outbox SET next_attempt_at = now() + make_interval(secs => $2)
                 WHERE id IN (SELECT id FROM webhook_outbox
                              WHERE delivered_at IS NULL AND given_up_at IS NULL
                                AND next_attempt_at <= now()
                              ORDER BY next_attempt_at LIMIT $1 FOR UPDATE SKIP LOCKED)
                 RETURNING id, organization_id, job_id, endpoint_id, callback_url, body, attempts)
             SELECT c.id, c.organization_id, c.job_id, c.endpoint_id, c.callback_url, c.body,
                c.attempts, e.url, e.secrets, e.disabled
             FROM claimed c LEFT JOIN webhook_endpoints e ON e.id = c.endpoint_id",
        )
        .bind(n)
        .bind(lease.as_secs_f64())
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| {
                let url = match r.3 {
                    Some(_) if r.9 == Some(false) => r.7,
                    Some(_) => None,
                    None => r.4,
                };
                Claimed {
                    id: r.0,
                    organization_id: r.1,
                    job_id: r.2,
                    endpoint_id: r.3,
                    url,
                    secrets: r.8.unwrap_or_default(),
                    body: r.5,
                    attempts: r.6,
                }
            })
            .collect())
    }

    /// Records a try. A failure is tried again after `retry_in`, unless that would be later
    /// than `retry_for` after the message's first failed try: then it is given up. Returns true
    /// when the message was given up. The endpoint's failing state follows: a delivery clears
    /// it, a failure starts it (if not started) and keeps the last error.
    pub async fn webhook_tried(
        &self,
        m: &Claimed,
        tried: &Tried,
        retry_in: Duration,
        retry_for: Duration,
    ) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        let given_up = match tried {
            Tried::Delivered { status } => {
                sqlx::query(
                    "UPDATE webhook_outbox SET delivered_at = now(), attempts = attempts + 1,
                        last_status = $2, last_error = NULL WHERE id = $1",
                )
                .bind(&m.id)
                .bind(i32::from(*status))
                .execute(&mut *tx)
                .await?;
                if let Some(endpoint) = m.endpoint_id {
                    sqlx::query(
                        "UPDATE webhook_endpoints SET failing_since = NULL, last_error = NULL
                         WHERE id = $1 AND (failing_since IS NOT NULL OR last_error IS NOT NULL)",
                    )
                    .bind(endpoint)
                    .execute(&mut *tx)
                    .await?;
                }
                false
            }
            Tried::Failed { status, error } => {
                let error = crate::redact::cut(&pg_text(error), MAX_ERROR_CHARS).into_owned();
                let given_up: bool = sqlx::query_scalar(
                    "UPDATE webhook_outbox SET attempts = attempts + 1,
                        first_failed_at = coalesce(first_failed_at, now()),
                        last_status = $2, last_error = $3,
                        next_attempt_at = now() + make_interval(secs => $4),
                        given_up_at = CASE WHEN now() + make_interval(secs => $4)
                            > coalesce(first_failed_at, now()) + make_interval(secs => $5)
                            THEN now() END
                     WHERE id = $1 RETURNING given_up_at IS NOT NULL",
                )
                .bind(&m.id)
                .bind(status.map(i32::from))
                .bind(&*error)
                .bind(retry_in.as_secs_f64())
                .bind(retry_for.as_secs_f64())
                .fetch_optional(&mut *tx)
                .await?
                .unwrap_or(false);
                if let Some(endpoint) = m.endpoint_id {
                    sqlx::query(
                        "UPDATE webhook_endpoints SET failing_since = coalesce(failing_since, now()),
                            last_error = $2 WHERE id = $1",
                    )
                    .bind(endpoint)
                    .bind(&*error)
                    .execute(&mut *tx)
                    .await?;
                }
                given_up
            }
        };
        tx.commit().await?;
        Ok(given_up)
    }

    /// Deletes up to `limit` finished (delivered or given up) messages created more than `age`
    /// ago, oldest first; returns how many.
    pub async fn prune_webhooks(&self, age: Duration, limit: i64) -> Result<u64, StoreError> {
        Ok(sqlx::query(
            "DELETE FROM webhook_outbox WHERE id IN (
                 SELECT id FROM webhook_outbox
                 WHERE (delivered_at IS NOT NULL OR given_up_at IS NOT NULL)
                   AND created_at < now() - make_interval(secs => $1)
                 ORDER BY created_at LIMIT $2 FOR UPDATE SKIP LOCKED)",
        )
        .bind(age.as_secs_f64())
        .bind(limit)
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    /// How many enabled endpoints have been failing for longer than `failing_after`.
    pub async fn failing_webhook_endpoints(
        &self,
        failing_after: Duration,
    ) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT count(*) FROM webhook_endpoints
             WHERE NOT disabled AND failing_since < now() - make_interval(secs => $1)",
        )
        .bind(failing_after.as_secs_f64())
        .fetch_one(&self.pool)
        .await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::MicroUsd;
    use crate::store::CallStatus;

    fn job() -> JobRef {
        JobRef {
            job_id: "j-1".into(),
            kind: "llm.complete".into(),
            tier: Some("growth_team".into()),
            organization_id: Some(Uuid::nil()),
            subject_id: None,
            subject_type: None,
            correlation_id: None,
            attempt: 2,
            execution: 7,
            callback_url: Some("https://app.example.com/h".into()),
        }
    }

    #[test]
    fn a_succeeded_jobs_body_carries_the_contracts_fields_and_its_result_summary() {
        let call = CallRecord {
            provider: "openai".into(),
            operation: "chat".into(),
            model: Some("gpt-4o-mini".into()),
            call_seq: 0,
            billing_date: chrono::NaiveDate::from_ymd_opt(2026, 12, 2).unwrap(),
            estimate: None,
            units: None,
            input_tokens: Some(12),
            cached_tokens: Some(0),
            output_tokens: Some(30),
            cost: MicroUsd::from_micros(123),
            status: CallStatus::Succeeded,
            price_version: "v".into(),
            metadata: json!({}),
        };
        let result = ResultRecord {
            provider: "openai".into(),
            model: Some("gpt-4o-mini".into()),
            raw_response: json!({}),
            confidence_scores: json!({}),
            processing_ms: 850,
            cost: MicroUsd::from_micros(123),
            completed: true,
            error_message: None,
        };
        let e = JobEvent::succeeded(&job(), &call, &result).unwrap();
        assert_eq!(e.callback_url.as_deref(), Some("https://app.example.com/h"));
        let body: Value = serde_json::from_str(&e.body).unwrap();
        assert_eq!(body["type"], "job.succeeded");
        assert!(chrono::DateTime::parse_from_rfc3339(body["timestamp"].as_str().unwrap()).is_ok());
        let d = &body["data"];
        assert_eq!(d["job_id"], "j-1");
        assert_eq!(d["organization_id"], Uuid::nil().to_string());
        assert_eq!(
            (&d["tier"], &d["kind"]),
            (&json!("growth_team"), &json!("llm.complete"))
        );
        assert_eq!(
            (&d["state"], &d["attempts"]),
            (&json!("succeeded"), &json!(2))
        );
        assert_eq!(
            d["result"],
            json!({"provider": "openai", "model": "gpt-4o-mini", "cost_usd": "0.000123",
                   "input_tokens": 12, "output_tokens": 30, "units": null, "duration_ms": 850})
        );
        assert_eq!(d["error"], Value::Null);
    }

    #[test]
    fn each_ending_has_its_type_and_state_and_a_job_without_organisation_no_event() {
        let names: Vec<(&str, &str)> = [
            Ending::Succeeded,
            Ending::Failed,
            Ending::Dead,
            Ending::Cancelled,
        ]
        .iter()
        .map(|e| (e.event_type(), e.state()))
        .collect();
        assert_eq!(
            names,
            [
                ("job.succeeded", "succeeded"),
                ("job.failed", "failed"),
                ("job.dead", "dead"),
                ("job.cancelled", "cancelled")
            ]
        );
        let mut orphan = job();
        orphan.organization_id = None;
        assert!(JobEvent::new(&orphan, Ending::Dead, Some("x"), None).is_none());
        let dead = JobEvent::new(&job(), Ending::Dead, Some("bad\0byte"), None).unwrap();
        let body: Value = serde_json::from_str(&dead.body).unwrap();
        assert_eq!(body["data"]["error"], "bad\u{FFFD}byte");
    }

    #[test]
    fn a_job_has_a_receiver_with_a_callback_or_an_organisation_with_endpoints() {
        let org = Uuid::from_u128(5);
        let known: EndpointOrgs = Some(Arc::new([org].into_iter().collect()));
        let none: EndpointOrgs = Some(Arc::new(HashSet::new()));
        assert!(has_receiver(&known, Some(org), false));
        assert!(!has_receiver(&none, Some(org), false));
        assert!(has_receiver(&none, Some(org), true));
        assert!(
            has_receiver(&None, Some(org), false),
            "unknown: looked up by the insert"
        );
        assert!(
            !has_receiver(&None, None, true),
            "no organisation, no receiver"
        );
    }
}
