//! Group commit for the hot path: the rows of succeeded jobs (cost, usage, result) go to one
//! writer task, which writes whatever has queued up, up to [`MAX_BATCH`] jobs, in one transaction
//! of multi-row inserts, then tells each job the cost its row holds. Under load a transaction
//! carries many jobs, so PostgreSQL does a fraction of the per-statement and per-commit work;
//! alone, a job waits for one transaction as before.
//!
//! The writes keep their meaning: every insert is `ON CONFLICT DO NOTHING` on the same unique
//! keys, and the cost returned is the one the row holds, whichever execution wrote it. When a
//! batch fails for any reason but a lost connection, its jobs are written one by one, so one bad
//! row fails only its own job.

use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::{CallRecord, JobEvent, JobRef, ResultRecord, Store, StoreError, Unwritten};
use crate::domain::MicroUsd;

/// The most jobs one transaction carries.
pub const MAX_BATCH: usize = 128;

pub(super) struct Pending {
    pub job: JobRef,
    pub call: CallRecord,
    pub result: ResultRecord,
    /// The recorded cost, or the rows handed back with why they were not written.
    pub reply: oneshot::Sender<Result<MicroUsd, Box<Unwritten>>>,
}

/// Starts the writer over `store` (one without a writer of its own); it ends when every sender
/// is gone.
pub(super) fn start(store: Store) -> mpsc::Sender<Pending> {
    let (tx, rx) = mpsc::channel(4 * MAX_BATCH);
    tokio::spawn(writer(store, rx));
    tx
}

async fn writer(store: Store, mut rx: mpsc::Receiver<Pending>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        match write(&store, &batch).await {
            Ok(costs) => {
                for (p, cost) in batch.drain(..).zip(costs) {
                    let _ = p.reply.send(Ok(cost));
                }
            }
            Err(e) if e.is_unavailable() || batch.len() == 1 => {
                let message = e.to_string();
                let unavailable = e.is_unavailable();
                let mut first = Some(e);
                for p in batch.drain(..) {
                    let err = first.take().unwrap_or_else(|| {
                        StoreError::Db(if unavailable {
                            sqlx::Error::PoolClosed
                        } else {
                            sqlx::Error::Protocol(message.clone())
                        })
                    });
                    let _ = p.reply.send(Err(Box::new(Unwritten {
                        error: err,
                        rows: Some((p.call, p.result)),
                    })));
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, jobs = batch.len(), "a batch of result rows failed; writing them one by one");
                for p in batch.drain(..) {
                    let r = match store.record_success_now(&p.job, &p.call, &p.result).await {
                        Ok(cost) => Ok(cost),
                        Err(error) => Err(Box::new(Unwritten {
                            error,
                            rows: Some((p.call, p.result)),
                        })),
                    };
                    let _ = p.reply.send(r);
                }
            }
        }
    }
}

/// One transaction: the cost rows, the usage rows of LLM calls, the result rows, the webhook
/// messages of the jobs whose result row it added (one statement, none without receivers),
/// then the cost each call's row holds.
async fn write(store: &Store, batch: &[Pending]) -> Result<Vec<MicroUsd>, StoreError> {
    // Which organisations have endpoints: from the cache (read again every few seconds, before
    // the transaction, so no batch holds its locks while it is read).
    let endpoint_orgs = if batch.iter().all(|p| p.job.callback_url.is_some()) {
        None
    } else {
        store.webhook_receivers().await
    };
    let mut tx = store.pool.begin().await?;
    let col = |f: &dyn Fn(&Pending) -> Option<String>| batch.iter().map(f).collect::<Vec<_>>();
    let ints = |f: &dyn Fn(&Pending) -> Option<i64>| batch.iter().map(f).collect::<Vec<_>>();
    let orgs: Vec<Option<Uuid>> = batch.iter().map(|p| p.job.organization_id).collect();
    let job_ids: Vec<String> = batch.iter().map(|p| p.job.job_id.clone()).collect();
    let executions: Vec<i64> = batch.iter().map(|p| p.job.execution).collect();
    let call_seqs: Vec<i32> = batch.iter().map(|p| p.call.call_seq).collect();
    let attempts: Vec<i32> = batch.iter().map(|p| p.job.attempt as i32).collect();
    let tiers = col(&|p| p.job.tier.clone());

    sqlx::query(
        "INSERT INTO ai_cost_tracking (organization_id, service_name, operation_type, request_count,
            cost_usd, billing_date, metadata, job_id, attempt, execution, call_seq, tier, model, units,
            input_tokens, cached_tokens, output_tokens, call_status, price_version, estimate_usd)
         SELECT org, service, operation, 1, cost::numeric / 1000000, billing_date, metadata, job_id,
            attempt, execution, call_seq, tier, model, units, input_tokens, cached_tokens,
            output_tokens, status, price_version, estimate::numeric / 1000000
         FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::bigint[], $5::date[], $6::jsonb[],
            $7::text[], $8::int[], $9::bigint[], $10::int[], $11::text[], $12::text[], $13::bigint[],
            $14::bigint[], $15::bigint[], $16::bigint[], $17::text[], $18::text[], $19::bigint[])
           AS t(org, service, operation, cost, billing_date, metadata, job_id, attempt, execution,
            call_seq, tier, model, units, input_tokens, cached_tokens, output_tokens, status,
            price_version, estimate)
         ON CONFLICT ON CONSTRAINT ai_cost_tracking_one_per_call DO NOTHING",
    )
    .bind(&orgs)
    .bind(col(&|p| Some(p.call.provider.clone())))
    .bind(col(&|p| Some(p.call.operation.clone())))
    .bind(ints(&|p| Some(p.call.cost.micros())))
    .bind(batch.iter().map(|p| p.call.billing_date).collect::<Vec<_>>())
    .bind(
        batch
            .iter()
            .map(|p| super::pg_json(&p.call.metadata).into_owned())
            .collect::<Vec<_>>(),
    )
    .bind(&job_ids)
    .bind(&attempts)
    .bind(&executions)
    .bind(&call_seqs)
    .bind(&tiers)
    .bind(col(&|p| p.call.model.clone()))
    .bind(ints(&|p| p.call.units))
    .bind(ints(&|p| p.call.input_tokens))
    .bind(ints(&|p| p.call.cached_tokens))
    .bind(ints(&|p| p.call.output_tokens))
    .bind(col(&|p| Some(p.call.status.as_str().to_owned())))
    .bind(col(&|p| Some(p.call.price_version.clone())))
    .bind(ints(&|p| p.call.estimate.map(MicroUsd::micros)))
    .execute(&mut *tx)
    .await?;

    // Usage rows: LLM calls, which report tokens.
    let llm: Vec<&Pending> = batch
        .iter()
        .filter(|p| {
            p.job.organization_id.is_some()
                && p.call.input_tokens.is_some()
                && p.call.output_tokens.is_some()
                && p.call.model.is_some()
        })
        .collect();
    if !llm.is_empty() {
        sqlx::query(
            "INSERT INTO ai_usage (organization_id, model, endpoint, input_tokens, output_tokens,
                cached_tokens, cost_usd, subscription_tier, job_id, attempt, execution, call_seq)
             SELECT org, model, endpoint, input_tokens, output_tokens, cached_tokens,
                cost::numeric / 1000000, tier, job_id, attempt, execution, call_seq
             FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::bigint[], $5::bigint[], $6::bigint[],
                $7::bigint[], $8::text[], $9::text[], $10::int[], $11::bigint[], $12::int[])
               AS t(org, model, endpoint, input_tokens, output_tokens, cached_tokens, cost, tier,
                job_id, attempt, execution, call_seq)
             ON CONFLICT ON CONSTRAINT ai_usage_one_per_call DO NOTHING",
        )
        .bind(
            llm.iter()
                .map(|p| p.job.organization_id)
                .collect::<Vec<_>>(),
        )
        .bind(llm.iter().map(|p| p.call.model.clone()).collect::<Vec<_>>())
        .bind(
            llm.iter()
                .map(|p| p.call.operation.clone())
                .collect::<Vec<_>>(),
        )
        .bind(
            llm.iter()
                .map(|p| p.call.input_tokens.unwrap_or(0))
                .collect::<Vec<_>>(),
        )
        .bind(
            llm.iter()
                .map(|p| p.call.output_tokens.unwrap_or(0))
                .collect::<Vec<_>>(),
        )
        .bind(
            llm.iter()
                .map(|p| p.call.cached_tokens.unwrap_or(0))
                .collect::<Vec<_>>(),
        )
        .bind(llm.iter().map(|p| p.call.cost.micros()).collect::<Vec<_>>())
        .bind(
            llm.iter()
                .map(|p| p.job.tier.clone().unwrap_or_else(|| "unknown".into()))
                .collect::<Vec<_>>(),
        )
        .bind(llm.iter().map(|p| p.job.job_id.clone()).collect::<Vec<_>>())
        .bind(llm.iter().map(|p| p.job.attempt as i32).collect::<Vec<_>>())
        .bind(llm.iter().map(|p| p.job.execution).collect::<Vec<_>>())
        .bind(llm.iter().map(|p| p.call.call_seq).collect::<Vec<_>>())
        .execute(&mut *tx)
        .await?;
    }

    let added: Vec<(Option<Uuid>, String)> = sqlx::query_as(
        concat!(
        "INSERT INTO ai_processing_results (subject_id, subject_type, organization_id, processing_type,
            ai_provider, raw_response, confidence_scores, processing_time_ms, api_cost_usd,
            error_message, status, processed_at, job_id, job_kind, tier, model, correlation_id, attempts)
         SELECT DISTINCT ON (org, job_id) subject_id, subject_type, org, 'initial', provider,
            raw_response, confidence_scores, processing_ms, cost::numeric / 1000000, error_message,
            status, now(), job_id, job_kind, tier, model, correlation_id, attempts
         FROM UNNEST($1::uuid[], $2::text[], $3::uuid[], $4::text[], $5::jsonb[], $6::jsonb[],
            $7::int[], $8::bigint[], $9::text[], $10::text[], $11::text[], $12::text[], $13::text[],
            $14::text[], $15::text[], $16::int[])
           AS t(subject_id, subject_type, org, provider, raw_response, confidence_scores,
            processing_ms, cost, error_message, status, job_id, job_kind, tier, model,
            correlation_id, attempts)
         ORDER BY org, job_id, status = 'completed' DESC
         ON CONFLICT ON CONSTRAINT ai_processing_results_one_per_job DO UPDATE SET ",
        replace_failed!(),
        " RETURNING organization_id, job_id"
    ),
    )
    .bind(batch.iter().map(|p| p.job.subject_id).collect::<Vec<_>>())
    .bind(col(&|p| p.job.subject_type.clone()))
    .bind(&orgs)
    .bind(col(&|p| Some(p.result.provider.clone())))
    .bind(
        batch
            .iter()
            // Encoded from the row itself (a copy only when NULs must be replaced): a large
            // answer is not held twice more while the batch is written.
            .map(|p| sqlx::types::Json(super::pg_json(&p.result.raw_response)))
            .collect::<Vec<_>>(),
    )
    .bind(
        batch
            .iter()
            .map(|p| sqlx::types::Json(super::pg_json(&p.result.confidence_scores)))
            .collect::<Vec<_>>(),
    )
    .bind(
        batch
            .iter()
            .map(|p| p.result.processing_ms.clamp(0, i32::MAX as i64) as i32)
            .collect::<Vec<_>>(),
    )
    .bind(ints(&|p| Some(p.result.cost.micros())))
    .bind(col(&|p| {
        p.result
            .error_message
            .as_deref()
            .map(|m| super::pg_text(m).into_owned())
    }))
    .bind(col(&|p| {
        Some(if p.result.completed { "completed" } else { "failed" }.to_owned())
    }))
    .bind(&job_ids)
    .bind(col(&|p| Some(p.job.kind.clone())))
    .bind(&tiers)
    .bind(col(&|p| p.result.model.clone()))
    .bind(col(&|p| p.job.correlation_id.clone()))
    .bind(&attempts)
    .fetch_all(&mut *tx)
    .await?;
    // Only jobs with a receiver get messages (no query for the others), and only those whose
    // row this transaction added: a replayed job's messages were written with its row.
    let events: Vec<JobEvent> = batch
        .iter()
        .filter(|p| {
            super::webhooks::has_receiver(
                &endpoint_orgs,
                p.job.organization_id,
                p.job.callback_url.is_some(),
            )
        })
        .filter(|p| {
            added
                .iter()
                .any(|(o, j)| *o == p.job.organization_id && *j == p.job.job_id)
        })
        .filter_map(|p| JobEvent::succeeded(&p.job, &p.call, &p.result))
        .collect();
    super::webhooks::enqueue_in(&mut tx, &events).await?;

    let stored: Vec<(Option<Uuid>, String, i64, i32, i64)> = sqlx::query_as(
        "SELECT c.organization_id, c.job_id, c.execution, c.call_seq,
            (c.cost_usd * 1000000)::bigint
         FROM ai_cost_tracking c
         JOIN UNNEST($1::text[], $2::bigint[], $3::int[], $4::uuid[])
           AS k(job_id, execution, call_seq, org)
           ON c.organization_id = k.org AND c.job_id = k.job_id AND c.execution = k.execution
             AND c.call_seq = k.call_seq",
    )
    .bind(&job_ids)
    .bind(&executions)
    .bind(&call_seqs)
    .bind(&orgs)
    .fetch_all(&mut *tx)
    .await?;
    // A connection keeps the capacity its largest message needed: after a batch with a 20 MB
    // answer it would hold that much for good, one pool connection after another. Back to the
    // default (a few reallocations for the next batch).
    sqlx::Connection::shrink_buffers(&mut *tx);
    tx.commit().await?;
    batch
        .iter()
        .map(|p| {
            stored
                .iter()
                .find(|(o, j, e, c, _)| {
                    *o == p.job.organization_id
                        && *j == p.job.job_id
                        && *e == p.job.execution
                        && *c == p.call.call_seq
                })
                .map(|(.., micros)| MicroUsd::from_micros(*micros))
                .ok_or_else(|| {
                    StoreError::Db(sqlx::Error::Protocol(format!(
                        "the cost row of job {} was not found after its insert",
                        p.job.job_id
                    )))
                })
        })
        .collect()
}
