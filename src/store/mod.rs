//! PostgreSQL: every SQL statement of aiq lives here (the hot path in this file and `batch`, the
//! alerts' outbox in `alerts`, the operator's reports in `reports`); the schema lives in `migrations/`.
//! Writes are idempotent: each table has a unique key per job (results), per call (costs, usage)
//! or per attempt and call (errors), and inserts use `ON CONFLICT DO NOTHING`, so a replayed job changes
//! nothing. Money is bound as integer micro-USD and stored as NUMERIC dollars.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde_json::Value;
use sqlx::ConnectOptions;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use uuid::Uuid;

use crate::config::DatabaseSettings;
use crate::domain::MicroUsd;
use crate::tls::{Server, TlsFailure};

/// The SET list and condition of a result row's `ON CONFLICT ... DO UPDATE SET`: a new row
/// replaces the job's row only when it completed and that one did not (a job retried from the
/// dead set, whose row said it failed for good). A completed row is never replaced, and a
/// failure never replaces anything (a replayed job writes nothing new).
macro_rules! replace_failed {
    () => {
        "subject_id = EXCLUDED.subject_id, subject_type = EXCLUDED.subject_type,
            ai_provider = EXCLUDED.ai_provider, raw_response = EXCLUDED.raw_response,
            raw_pruned_at = NULL, confidence_scores = EXCLUDED.confidence_scores,
            processing_time_ms = EXCLUDED.processing_time_ms, api_cost_usd = EXCLUDED.api_cost_usd,
            error_message = EXCLUDED.error_message, status = EXCLUDED.status,
            processed_at = EXCLUDED.processed_at, job_kind = EXCLUDED.job_kind,
            tier = EXCLUDED.tier, model = EXCLUDED.model, correlation_id = EXCLUDED.correlation_id,
            attempts = EXCLUDED.attempts
         WHERE ai_processing_results.status <> 'completed' AND EXCLUDED.status = 'completed'"
    };
}

mod alerts;
mod batch;
mod limits;
pub use limits::{CountOverrides, MAX_OVERRIDE_USD, OrgOverrides, OverrideChange};
mod console;
pub use console::{AlertShown, CallShown, ErrorShown, JOB_ROWS, OrgSpend};
mod outcomes;
pub use outcomes::{CancelledRow, ResultRow, complete_status};
mod reports;
pub mod retention;
pub mod tenant;
pub mod webhooks;

pub use alerts::{AlertRow, NewAlert};
pub use reports::{CostAnalysisRow, DailySpend, RowCounts, Spike};
pub use webhooks::{Ending, JobEvent};

/// PostgreSQL's text and jsonb cannot hold U+0000, and a provider may send it: a row refused for
/// it would fail its job on every attempt, each one a paid call. It is stored as U+FFFD.
pub(crate) fn pg_text(s: &str) -> std::borrow::Cow<'_, str> {
    if s.contains('\0') {
        std::borrow::Cow::Owned(s.replace('\0', "\u{FFFD}"))
    } else {
        std::borrow::Cow::Borrowed(s)
    }
}

/// [`pg_text`] for every string and key of a JSON value; no copy when there is nothing to do.
pub(crate) fn pg_json(v: &Value) -> std::borrow::Cow<'_, Value> {
    fn has_nul(v: &Value) -> bool {
        match v {
            Value::String(s) => s.contains('\0'),
            Value::Array(a) => a.iter().any(has_nul),
            Value::Object(o) => o.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
            _ => false,
        }
    }
    fn scrub(v: &Value) -> Value {
        match v {
            Value::String(s) => Value::String(pg_text(s).into_owned()),
            Value::Array(a) => Value::Array(a.iter().map(scrub).collect()),
            Value::Object(o) => Value::Object(
                o.iter()
                    .map(|(k, v)| (pg_text(k).into_owned(), scrub(v)))
                    .collect(),
            ),
            other => other.clone(),
        }
    }
    if has_nul(v) {
        std::borrow::Cow::Owned(scrub(v))
    } else {
        std::borrow::Cow::Borrowed(v)
    }
}

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("postgres: {0}")]
    Db(#[from] sqlx::Error),
    #[error("migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// TLS refused the connection at start: no retry can fix it.
    #[error(transparent)]
    Tls(TlsFailure),
}

/// The TLS refusal in a connection error: a rustls error (which sqlx returns inside an I/O
/// error), or sqlx's own word that TLS could not be had (the server has ssl=off under an
/// sslmode that requires it). A bad certificate file is caught when the settings load.
fn tls_refusal(addr: &str, e: &sqlx::Error) -> Option<TlsFailure> {
    match e {
        sqlx::Error::Tls(inner) => Some(
            TlsFailure::find(Server::Postgres, addr, &**inner)
                .unwrap_or_else(|| TlsFailure::handshake(Server::Postgres, addr, inner)),
        ),
        e => TlsFailure::find(Server::Postgres, addr, e),
    }
}

impl StoreError {
    /// PostgreSQL could not be reached or is shutting down, as opposed to refusing a statement:
    /// the same write will succeed once it is back.
    pub fn is_unavailable(&self) -> bool {
        match self {
            StoreError::Db(e) => match e {
                sqlx::Error::Io(_)
                | sqlx::Error::Tls(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::WorkerCrashed => true,
                // 08: connection exceptions; 57P01-57P03: shutting down or starting up;
                // 53300: too many connections.
                sqlx::Error::Database(d) => d.code().is_some_and(|c| {
                    c.starts_with("08")
                        || ["57P01", "57P02", "57P03", "53300"].contains(&c.as_ref())
                }),
                _ => false,
            },
            StoreError::Migrate(_) | StoreError::Tls(_) => false,
        }
    }
}

/// Which job a row belongs to.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct JobRef {
    pub job_id: String,
    pub kind: String,
    pub tier: Option<String>,
    pub organization_id: Option<Uuid>,
    pub subject_id: Option<Uuid>,
    pub subject_type: Option<String>,
    pub correlation_id: Option<String>,
    /// 1 for the first execution.
    pub attempt: u32,
    /// The queue's lease token for this execution: a re-run after a crash is a new execution.
    pub execution: i64,
    /// The payload's `callback_url`: the job's final event is also delivered there.
    #[serde(default)]
    pub callback_url: Option<String>,
}

/// How a provider call ended, as ai_cost_tracking.call_status records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum CallStatus {
    Succeeded,
    Failed,
    /// The worker died during the call; its reservation was swept in at the estimate.
    Expired,
    /// The provider answered with a success status, but the body could not be used; recorded at
    /// the estimate, since the provider has most likely billed it.
    Unusable,
    /// The provider answered with a success status and a body above `AIQ_MAX_RESPONSE_MB`,
    /// which aiq did not read to its end; recorded at the estimate, like an unusable answer.
    Oversize,
}

impl CallStatus {
    fn as_str(self) -> &'static str {
        match self {
            CallStatus::Succeeded => "succeeded",
            CallStatus::Failed => "failed",
            CallStatus::Expired => "expired",
            CallStatus::Unusable => "unusable",
            CallStatus::Oversize => "oversize",
        }
    }
}

/// One provider call, for ai_cost_tracking (and ai_usage when it has tokens).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CallRecord {
    pub provider: String,
    pub operation: String,
    pub model: Option<String>,
    pub call_seq: i32,
    /// The budget window's date (in the budget's time zone) the call's cost belongs to.
    pub billing_date: chrono::NaiveDate,
    pub estimate: Option<MicroUsd>,
    pub units: Option<i64>,
    pub input_tokens: Option<i64>,
    pub cached_tokens: Option<i64>,
    pub output_tokens: Option<i64>,
    pub cost: MicroUsd,
    pub status: CallStatus,
    pub price_version: String,
    pub metadata: Value,
}

/// The job's final record in ai_processing_results.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ResultRecord {
    pub provider: String,
    pub model: Option<String>,
    pub raw_response: Value,
    pub confidence_scores: Value,
    pub processing_ms: i64,
    pub cost: MicroUsd,
    pub completed: bool,
    pub error_message: Option<String>,
}

/// A succeeded job's rows that could not be written, handed back with the reason (`None` only
/// if the writer task itself is gone, and the rows with it).
#[derive(Debug)]
pub struct Unwritten {
    pub error: StoreError,
    pub rows: Option<(CallRecord, ResultRecord)>,
}

/// What `ai_processing_errors.error_type` holds: a closed list, documented in jobs/README.md
/// (a unit test holds the two together). Every error row is written with one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorType {
    /// The payload can never run.
    InvalidPayload,
    /// The catalog cannot price a model or feature of the job.
    Unpriced,
    /// No room in a budget scope, or a model that can never fit one.
    BudgetExceeded,
    /// A call cost more than its reservation's estimate.
    CostAboveEstimate,
    /// Every image of a Vision call failed, with an error a retry can fix.
    ImageFailed,
    /// Every image of a Vision call failed, one of them as bad input.
    InvalidImage,
    /// A provider call failed, of this kind.
    Provider(crate::providers::ErrorKind),
}

impl ErrorType {
    /// Every error type, each once.
    pub const ALL: [ErrorType; 15] = {
        use crate::providers::ErrorKind as K;
        [
            ErrorType::InvalidPayload,
            ErrorType::Unpriced,
            ErrorType::BudgetExceeded,
            ErrorType::CostAboveEstimate,
            ErrorType::ImageFailed,
            ErrorType::InvalidImage,
            ErrorType::Provider(K::RateLimited),
            ErrorType::Provider(K::Unavailable),
            ErrorType::Provider(K::Timeout),
            ErrorType::Provider(K::Connection),
            ErrorType::Provider(K::Malformed),
            ErrorType::Provider(K::Oversize),
            ErrorType::Provider(K::Invalid),
            ErrorType::Provider(K::Unauthorized),
            ErrorType::Provider(K::QuotaExhausted),
        ]
    };

    /// The name written to the column.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorType::InvalidPayload => "invalid_payload",
            ErrorType::Unpriced => "unpriced",
            ErrorType::BudgetExceeded => "budget_exceeded",
            ErrorType::CostAboveEstimate => "cost_above_estimate",
            ErrorType::ImageFailed => "image_failed",
            ErrorType::InvalidImage => "invalid_image",
            ErrorType::Provider(kind) => kind.as_str(),
        }
    }
}

/// A failed attempt, for ai_processing_errors.
#[derive(Debug, Clone)]
pub struct ErrorRecord {
    pub error_type: ErrorType,
    pub message: String,
    pub details: Value,
    pub provider: Option<String>,
    pub http_status: Option<i32>,
    /// Which call of the execution failed (0 for errors before any call).
    pub call_seq: i32,
}

#[derive(Clone)]
pub struct Store {
    pool: PgPool,
    /// The group-commit writer of succeeded jobs' rows, when started ([`Store::batched`]).
    batch: Option<tokio::sync::mpsc::Sender<batch::Pending>>,
    /// Which organisations have webhook endpoints, shared by every clone.
    webhook_orgs: std::sync::Arc<webhooks::EndpointCache>,
}

impl Store {
    /// Connects, retrying for up to `wait` while the server starts or is away (see
    /// [`crate::startup`]). A TLS
    /// refusal (a certificate that did not verify, a server without TLS under an sslmode that
    /// requires it) returns at once as [`StoreError::Tls`]: waiting cannot fix it.
    pub async fn connect(
        db: &DatabaseSettings,
        max_connections: u32,
        wait: Duration,
    ) -> Result<Self, StoreError> {
        let mut options: PgConnectOptions = db.url.expose().parse()?;
        if let Some(ca) = db.root_cert() {
            options = options.ssl_root_cert_from_pem(ca.pem().to_vec());
        }
        let options = options.disable_statement_logging();
        let addr = format!("{}:{}", options.get_host(), options.get_port());
        let mut patience = crate::startup::Patience::new("PostgreSQL", wait);
        loop {
            let attempt = PgPoolOptions::new()
                .max_connections(max_connections)
                .acquire_timeout(Duration::from_secs(10))
                .connect_with(options.clone())
                .await;
            match attempt {
                Ok(pool) => {
                    patience.over();
                    return Ok(Self::from_pool(pool));
                }
                Err(e) => {
                    if let Some(refusal) = tls_refusal(&addr, &e) {
                        return Err(StoreError::Tls(refusal));
                    }
                    // Only a server that is not there (yet) is waited for: a wrong password
                    // or a missing database ends the start at once.
                    let e = StoreError::from(e);
                    if !e.is_unavailable() || !patience.again(&e).await {
                        return Err(e);
                    }
                }
            }
        }
    }

    pub fn from_pool(pool: PgPool) -> Self {
        Self {
            pool,
            batch: None,
            webhook_orgs: Default::default(),
        }
    }

    /// This store with its succeeded jobs' rows written by one group-commit task (see
    /// [`batch`]). Call it inside the runtime the store will be used in.
    pub fn batched(self) -> Self {
        let writer = Self {
            batch: None,
            ..self.clone()
        };
        let batch = Some(batch::start(writer));
        Self { batch, ..self }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub async fn migrate(&self) -> Result<(), StoreError> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Inserts a call's cost row (and usage row) unless that call already has one, and returns
    /// the cost the row holds: the budget settles exactly that, so Redis and PostgreSQL agree.
    async fn insert_call(
        tx: &mut sqlx::PgConnection,
        job: &JobRef,
        call: &CallRecord,
    ) -> Result<MicroUsd, sqlx::Error> {
        sqlx::query(
            "INSERT INTO ai_cost_tracking (organization_id, service_name, operation_type, request_count,
                cost_usd, billing_date, metadata, job_id, attempt, execution, call_seq, tier, model, units,
                input_tokens, cached_tokens, output_tokens, call_status, price_version, estimate_usd)
             VALUES ($1, $2, $3, 1, $4::numeric / 1000000, $5, $6, $7, $8, $9, $10, $11, $12, $13,
                $14, $15, $16, $17, $18, $19::numeric / 1000000)
             ON CONFLICT ON CONSTRAINT ai_cost_tracking_one_per_call DO NOTHING",
        )
        .bind(job.organization_id)
        .bind(&call.provider)
        .bind(&call.operation)
        .bind(call.cost.micros())
        .bind(call.billing_date)
        .bind(&*pg_json(&call.metadata))
        .bind(&job.job_id)
        .bind(job.attempt as i32)
        .bind(job.execution)
        .bind(call.call_seq)
        .bind(&job.tier)
        .bind(&call.model)
        .bind(call.units)
        .bind(call.input_tokens)
        .bind(call.cached_tokens)
        .bind(call.output_tokens)
        .bind(call.status.as_str())
        .bind(&call.price_version)
        .bind(call.estimate.map(MicroUsd::micros))
        .execute(&mut *tx)
        .await?;
        if let (Some(org), Some(input), Some(output), Some(model)) = (
            job.organization_id,
            call.input_tokens,
            call.output_tokens,
            &call.model,
        ) {
            sqlx::query(
                "INSERT INTO ai_usage (organization_id, model, endpoint, input_tokens, output_tokens,
                    cached_tokens, cost_usd, subscription_tier, job_id, attempt, execution, call_seq)
                 VALUES ($1, $2, $3, $4, $5, $6, $7::numeric / 1000000, $8, $9, $10, $11, $12)
                 ON CONFLICT ON CONSTRAINT ai_usage_one_per_call DO NOTHING",
            )
            .bind(org)
            .bind(model)
            .bind(&call.operation)
            .bind(input)
            .bind(output)
            .bind(call.cached_tokens.unwrap_or(0))
            .bind(call.cost.micros())
            .bind(job.tier.as_deref().unwrap_or("unknown"))
            .bind(&job.job_id)
            .bind(job.attempt as i32)
            .bind(job.execution)
            .bind(call.call_seq)
            .execute(&mut *tx)
            .await?;
        }
        // Equality on every column of the unique key, so the read-back uses its index (a job
        // without an organisation, which decode refuses before any call, has no cost row).
        let stored: i64 = sqlx::query_scalar(
            "SELECT (cost_usd * 1000000)::bigint FROM ai_cost_tracking
             WHERE organization_id = $4 AND job_id = $1 AND execution = $2 AND call_seq = $3",
        )
        .bind(&job.job_id)
        .bind(job.execution)
        .bind(call.call_seq)
        .bind(job.organization_id)
        .fetch_one(&mut *tx)
        .await?;
        Ok(MicroUsd::from_micros(stored))
    }

    /// Inserts the job's result row unless it has one; true when this call added it.
    async fn insert_result(
        tx: &mut sqlx::PgConnection,
        job: &JobRef,
        result: &ResultRecord,
    ) -> Result<bool, sqlx::Error> {
        let added = sqlx::query(concat!(
            "INSERT INTO ai_processing_results (subject_id, subject_type, organization_id, processing_type,
                ai_provider, raw_response, confidence_scores, processing_time_ms, api_cost_usd,
                error_message, status, processed_at, job_id, job_kind, tier, model, correlation_id, attempts)
             VALUES ($1, $2, $3, 'initial', $4, $5, $6, $7, $8::numeric / 1000000, $9, $10, now(), $11,
                $12, $13, $14, $15, $16)
             ON CONFLICT ON CONSTRAINT ai_processing_results_one_per_job DO UPDATE SET ",
            replace_failed!()
        ))
        .bind(job.subject_id)
        .bind(&job.subject_type)
        .bind(job.organization_id)
        .bind(&result.provider)
        .bind(&*pg_json(&result.raw_response))
        .bind(&*pg_json(&result.confidence_scores))
        .bind(result.processing_ms.clamp(0, i32::MAX as i64) as i32)
        .bind(result.cost.micros())
        .bind(result.error_message.as_deref().map(pg_text))
        .bind(if result.completed { "completed" } else { "failed" })
        .bind(&job.job_id)
        .bind(&job.kind)
        .bind(&job.tier)
        .bind(&result.model)
        .bind(&job.correlation_id)
        .bind(job.attempt as i32)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        Ok(added == 1)
    }

    /// The webhook messages of a job whose final result row this transaction added, unless it
    /// has no receiver as `orgs` (read before the transaction began) knows: then no query, and
    /// no body is built.
    async fn enqueue_event(
        tx: &mut sqlx::PgConnection,
        orgs: &webhooks::EndpointOrgs,
        job: &JobRef,
        event: impl FnOnce() -> Option<JobEvent>,
    ) -> Result<(), sqlx::Error> {
        if !webhooks::has_receiver(orgs, job.organization_id, job.callback_url.is_some()) {
            return Ok(());
        }
        let events: Vec<JobEvent> = event().into_iter().collect();
        webhooks::enqueue_in(tx, &events).await?;
        Ok(())
    }

    /// What [`Store::enqueue_event`] needs to know of `job`'s organisation, read before a
    /// transaction so that none holds a connection while it waits for another: nothing for a job
    /// with a callback_url or without an organisation.
    async fn receivers_of(&self, job: &JobRef) -> webhooks::EndpointOrgs {
        match (job.organization_id, &job.callback_url) {
            (Some(_), None) => self.webhook_receivers().await,
            _ => None,
        }
    }

    async fn insert_error(
        tx: &mut sqlx::PgConnection,
        job: &JobRef,
        err: &ErrorRecord,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO ai_processing_errors (subject_id, organization_id, error_type, error_message,
                error_details, retry_count, job_id, job_kind, tier, provider, http_status, call_seq)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
             ON CONFLICT ON CONSTRAINT ai_processing_errors_one_per_call DO NOTHING",
        )
        .bind(job.subject_id)
        .bind(job.organization_id)
        .bind(err.error_type.as_str())
        .bind(&*pg_text(&err.message))
        .bind(&*pg_json(&err.details))
        .bind(job.attempt.saturating_sub(1) as i32)
        .bind(&job.job_id)
        .bind(&job.kind)
        .bind(&job.tier)
        .bind(&err.provider)
        .bind(err.http_status)
        .bind(err.call_seq)
        .execute(&mut *tx)
        .await?;
        Ok(())
    }

    /// A successful job: its result and the call that produced it, in one transaction. Returns
    /// the call's recorded cost.
    pub async fn record_success(
        &self,
        job: &JobRef,
        call: CallRecord,
        result: ResultRecord,
    ) -> Result<MicroUsd, StoreError> {
        self.record_success_or_return(job, call, result)
            .await
            .map_err(|u| u.error)
    }

    /// [`Store::record_success`], handing the rows back when they could not be written, so the
    /// caller can keep them (the answer was paid for) without copying them first.
    pub async fn record_success_or_return(
        &self,
        job: &JobRef,
        call: CallRecord,
        result: ResultRecord,
    ) -> Result<MicroUsd, Box<Unwritten>> {
        let Some(batch) = &self.batch else {
            return match self.record_success_now(job, &call, &result).await {
                Ok(cost) => Ok(cost),
                Err(error) => Err(Box::new(Unwritten {
                    error,
                    rows: Some((call, result)),
                })),
            };
        };
        let (reply, rx) = tokio::sync::oneshot::channel();
        // Owned: a provider's response moves to the writer without a copy.
        let pending = batch::Pending {
            job: job.clone(),
            call,
            result,
            reply,
        };
        if let Err(e) = batch.send(pending).await {
            let p = e.0;
            return Err(Box::new(Unwritten {
                error: StoreError::Db(sqlx::Error::PoolClosed),
                rows: Some((p.call, p.result)),
            }));
        }
        rx.await.unwrap_or_else(|_| {
            Err(Box::new(Unwritten {
                error: StoreError::Db(sqlx::Error::PoolClosed),
                rows: None,
            }))
        })
    }

    /// [`Store::record_success`] in a transaction of its own.
    pub async fn record_success_now(
        &self,
        job: &JobRef,
        call: &CallRecord,
        result: &ResultRecord,
    ) -> Result<MicroUsd, StoreError> {
        // Boxed, like record_failure: the transaction's future is several KiB.
        Box::pin(async move {
            let orgs = self.receivers_of(job).await;
            let mut tx = self.pool.begin().await?;
            let cost = Self::insert_call(&mut tx, job, call).await?;
            if Self::insert_result(&mut tx, job, result).await? {
                Self::enqueue_event(&mut tx, &orgs, job, || {
                    JobEvent::succeeded(job, call, result)
                })
                .await?;
            }
            // See batch::write: the connection must not keep a large answer's capacity.
            sqlx::Connection::shrink_buffers(&mut *tx);
            tx.commit().await?;
            Ok(cost)
        })
        .await
    }

    /// The cost row of a call whose worker died: at the reservation's estimate, unless the call
    /// already has a row. Returns the recorded cost.
    pub async fn record_expired_call(
        &self,
        job: &JobRef,
        call: &CallRecord,
    ) -> Result<MicroUsd, StoreError> {
        let mut conn = self.pool.acquire().await?;
        Ok(Self::insert_call(&mut conn, job, call).await?)
    }

    /// An error row on its own, for a call that succeeded but is worth an operator's look
    /// (`cost_above_estimate`).
    pub async fn record_error(&self, job: &JobRef, err: &ErrorRecord) -> Result<(), StoreError> {
        let mut conn = self.pool.acquire().await?;
        Ok(Self::insert_error(&mut conn, job, err).await?)
    }

    /// A failed attempt: the error, the call if one was made, and the failed result when this
    /// was the job's last attempt (with how it ended, for its webhooks), in one transaction.
    /// Returns the call's recorded cost when there was a call.
    pub async fn record_failure(
        &self,
        job: &JobRef,
        err: &ErrorRecord,
        call: Option<&CallRecord>,
        final_result: Option<(&ResultRecord, Ending)>,
    ) -> Result<Option<MicroUsd>, StoreError> {
        // Boxed: the transaction's future is several KiB, and every running job's future would
        // otherwise reserve room for it while it waits on its provider.
        Box::pin(async move {
            let orgs = match final_result {
                Some(_) => self.receivers_of(job).await,
                None => None,
            };
            let mut tx = self.pool.begin().await?;
            let cost = match call {
                Some(call) => Some(Self::insert_call(&mut tx, job, call).await?),
                None => None,
            };
            Self::insert_error(&mut tx, job, err).await?;
            if let Some((result, ending)) = final_result
                && Self::insert_result(&mut tx, job, result).await?
            {
                Self::enqueue_event(&mut tx, &orgs, job, || {
                    JobEvent::failed(job, ending, result)
                })
                .await?;
            }
            tx.commit().await?;
            Ok(cost)
        })
        .await
    }

    /// The status of a job's result row ("completed" or "failed"), if it has one.
    /// Of the given (organization id, job id) pairs, those that have a result row, true when it
    /// says completed: one query for a whole fetched batch. A pair whose organisation is not a
    /// UUID has no row (enqueue refuses such jobs; decode kills them).
    pub async fn outcomes_of(
        &self,
        pairs: &[(String, String)],
    ) -> Result<HashMap<(String, String), bool>, StoreError> {
        let (orgs, ids): (Vec<Uuid>, Vec<String>) = pairs
            .iter()
            .filter_map(|(org, id)| Some((Uuid::parse_str(org).ok()?, pg_text(id).into_owned())))
            .unzip();
        let rows: Vec<(Uuid, String, String)> = sqlx::query_as(
            "SELECT r.organization_id, r.job_id, r.status FROM ai_processing_results r
             JOIN UNNEST($1::uuid[], $2::text[]) AS k(organization_id, job_id)
               USING (organization_id, job_id)",
        )
        .bind(&orgs)
        .bind(&ids)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(org, id, status)| ((org.to_string(), id), status == "completed"))
            .collect())
    }

    /// An organisation's limit overrides from ai_cost_limits: (daily, monthly), each None when
    /// the tier default applies.
    pub async fn org_limit_overrides(
        &self,
        org: Uuid,
    ) -> Result<(Option<MicroUsd>, Option<MicroUsd>), StoreError> {
        let row: Option<(Option<i64>, Option<i64>)> = sqlx::query_as(
            "SELECT (daily_limit_usd * 1000000)::bigint, (monthly_limit_usd * 1000000)::bigint
             FROM ai_cost_limits WHERE organization_id = $1",
        )
        .bind(org)
        .fetch_optional(&self.pool)
        .await?;
        let (d, m) = row.unwrap_or((None, None));
        Ok((d.map(MicroUsd::from_micros), m.map(MicroUsd::from_micros)))
    }

    /// Sets an organisation's overrides (None keeps the tier default).
    pub async fn set_org_limits(
        &self,
        org: Uuid,
        daily: Option<MicroUsd>,
        monthly: Option<MicroUsd>,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO ai_cost_limits (organization_id, daily_limit_usd, monthly_limit_usd)
             VALUES ($1, $2::numeric / 1000000, $3::numeric / 1000000)
             ON CONFLICT (organization_id) DO UPDATE
             SET daily_limit_usd = EXCLUDED.daily_limit_usd, monthly_limit_usd = EXCLUDED.monthly_limit_usd,
                 updated_at = now()",
        )
        .bind(org)
        .bind(daily.map(MicroUsd::micros))
        .bind(monthly.map(MicroUsd::micros))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Spend per organisation (None: rows without one) with billing dates in [from, to].
    pub async fn spend_by_org(
        &self,
        from: chrono::NaiveDate,
        to: chrono::NaiveDate,
    ) -> Result<Vec<(Option<Uuid>, MicroUsd)>, StoreError> {
        let rows: Vec<(Option<Uuid>, i64)> = sqlx::query_as(
            "SELECT organization_id, (sum(cost_usd) * 1000000)::bigint FROM ai_cost_tracking
             WHERE billing_date BETWEEN $1 AND $2 GROUP BY 1",
        )
        .bind(from)
        .bind(to)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(o, m)| (o, MicroUsd::from_micros(m)))
            .collect())
    }

    /// Vision units per feature with billing dates in [from, to] (the month's free-tier count).
    pub async fn vision_units_by_feature(
        &self,
        from: chrono::NaiveDate,
        to: chrono::NaiveDate,
    ) -> Result<BTreeMap<String, u64>, StoreError> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT f.key, sum(f.value::bigint)::bigint FROM ai_cost_tracking act,
                    jsonb_each_text(coalesce(act.metadata->'units_by_feature', '{}'::jsonb)) f
             WHERE act.billing_date BETWEEN $1 AND $2 GROUP BY 1",
        )
        .bind(from)
        .bind(to)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(k, v)| (k, v.max(0) as u64))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_unreachable_server_is_unavailable_and_a_bad_statement_is_not() {
        // Nothing listens on port 1.
        let pool = PgPoolOptions::new()
            .acquire_timeout(std::time::Duration::from_millis(500))
            .connect_lazy("postgres://postgres@127.0.0.1:1/none")
            .unwrap();
        let down = Store::from_pool(pool).ping().await.unwrap_err();
        assert!(down.is_unavailable(), "{down:?}");
        let refused = StoreError::Db(sqlx::Error::RowNotFound);
        assert!(!refused.is_unavailable());
        let migration = StoreError::Migrate(sqlx::migrate::MigrateError::VersionMissing(1));
        assert!(!migration.is_unavailable());
    }
}

#[cfg(test)]
mod error_type_tests {
    use super::ErrorType;
    use crate::providers::ErrorKind;

    /// Fails to compile when a variant is added without a place in [`ErrorType::ALL`]'s list
    /// below.
    fn listed(t: ErrorType) -> bool {
        match t {
            ErrorType::InvalidPayload
            | ErrorType::Unpriced
            | ErrorType::BudgetExceeded
            | ErrorType::CostAboveEstimate
            | ErrorType::ImageFailed
            | ErrorType::InvalidImage => ErrorType::ALL.contains(&t),
            ErrorType::Provider(
                ErrorKind::RateLimited
                | ErrorKind::Unavailable
                | ErrorKind::Timeout
                | ErrorKind::Connection
                | ErrorKind::Malformed
                | ErrorKind::Oversize
                | ErrorKind::Invalid
                | ErrorKind::Unauthorized
                | ErrorKind::QuotaExhausted,
            ) => ErrorType::ALL.contains(&t),
        }
    }

    /// `ai_processing_errors.error_type` is a closed list, documented in jobs/README.md: every
    /// type the handlers can write (an [`ErrorType`]) is in it, and it names nothing else.
    #[test]
    fn every_error_type_written_is_documented_and_every_documented_one_is_written() {
        assert!(ErrorType::ALL.into_iter().all(listed));
        let mut written: Vec<&str> = ErrorType::ALL.iter().map(|t| t.as_str()).collect();
        written.sort();
        let before = written.len();
        written.dedup();
        assert_eq!(written.len(), before, "two error types share a name");
        let readme = include_str!("../../jobs/README.md");
        let section = readme
            .split("### Error types")
            .nth(1)
            .expect("jobs/README.md has an Error types section");
        let section = section.split("\n#").next().unwrap_or(section);
        let mut documented: Vec<&str> = section
            .split('`')
            .skip(1)
            .step_by(2)
            .filter(|t| t.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
            .filter(|t| *t != "error_type")
            .collect();
        documented.sort();
        assert_eq!(documented, written, "the README's list");
    }
}
