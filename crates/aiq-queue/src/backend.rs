//! aiq's apalis 1.0 backend over the queue.
//!
//! It implements apalis-core's `Backend` directly (not the `Persisted` helper, whose acks carry no
//! fencing token and whose heartbeat stalls while it holds prefetched jobs). Three parts:
//!
//! - `RedisBackend::poll_next` leases at most as many jobs as there are free slots, in one fetch
//!   script call, and hands them out. An empty queue or a Redis error only arms a timer: the
//!   backend never returns `Err` or `None`, which would end the worker.
//! - `AckLayer` sits outside every user layer, so it sees each job's final result. It turns the
//!   result into an `Outcome` and waits until the flusher has written it, so a slot is freed only
//!   once the outcome is durable in Redis.
//! - Two tasks of our own, independent of the worker's polling (which stops during a graceful
//!   drain): the flusher settles outcomes in batches, the renewer extends the leases of running
//!   jobs every third of the lease time.

use std::collections::{HashMap, HashSet, VecDeque};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use apalis_core::backend::{Backend, BackendConfig, finalize::Ephemeral};
use apalis_core::error::BoxDynError;
use apalis_core::task::Task;
use apalis_core::task::builder::TaskBuilder;
use apalis_core::task::task_id::TaskId;
use apalis_core::worker::context::WorkerContext;
use futures::FutureExt;
use futures::future::BoxFuture;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tower::{Layer, Service};

use super::{LeasedJob, Outcome, Queue, QueueError, Settlement};
use crate::events::DelayReason;
use crate::settings::{QueueSettings, RetryPolicy};

/// A job as the handler receives it: still raw, so that a payload that does not decode is the
/// handler's error (it goes to the dead set with the reason), never the worker's.
#[derive(Debug, Clone)]
pub struct RawJob {
    pub id: String,
    pub kind: String,
    pub tier: String,
    pub organization_id: String,
    pub payload: String,
    /// The lease's fencing token: it names this execution of the job.
    pub token: u64,
    /// 1 for the first execution.
    pub attempt: u32,
    pub max_attempts: u32,
    pub enqueued_at_ms: i64,
    /// Times an earlier execution was cut off by its worker stopping: it may have recorded its
    /// outcome without acknowledging it.
    pub interrupts: u32,
    /// What the store already holds for this job id, from the backend's [`Precheck`].
    pub prior: Prior,
}

/// What the store already holds for a fetched job's id. A job that was leased before, or whose
/// id the app chose, may already have an outcome (its worker stopped after recording it, or the
/// id was used and finished before): it must not be run and paid for again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Prior {
    /// Nothing recorded, or nothing to check (a queue id leased for the first time).
    #[default]
    Nothing,
    /// A result row says the job succeeded.
    Completed,
    /// A result row says the job failed for good.
    Failed,
    /// The check could not be made (the store is unreachable): the job must wait.
    Unknown,
}

/// Called each time the queue shows it is alive (a reap ran and fetches are not failing): the
/// daemon feeds its systemd watchdog with it. The queue knows nothing of systemd.
pub type Liveness = Arc<dyn Fn() + Send + Sync>;

/// The look-up the backend makes once per fetched batch, for the jobs that need it: given
/// (organization id, job id) pairs, the ones that have an outcome, true when it is a success.
/// The queue knows nothing of the store; the daemon passes this in.
pub type Precheck = Arc<
    dyn Fn(
            Vec<(String, String)>,
        ) -> BoxFuture<'static, Result<HashMap<(String, String), bool>, String>>
        + Send
        + Sync,
>;

/// Leases a batch, then asks the precheck about the jobs that may already have an outcome: at
/// most one look-up per batch, none when every job is a queue id on its first lease.
async fn fetch_checked(
    queue: Queue,
    want: usize,
    precheck: Option<Precheck>,
) -> Result<Vec<(LeasedJob, Prior)>, QueueError> {
    let jobs = queue.fetch(want).await?;
    let needs = |j: &LeasedJob| j.own || j.token != "1";
    let ask: Vec<(String, String)> = jobs
        .iter()
        .filter(|j| needs(j))
        .map(|j| (j.organization_id.clone(), j.id.clone()))
        .collect();
    let known = match (&precheck, ask.is_empty()) {
        (Some(check), false) => Some(check(ask).await),
        _ => None,
    };
    Ok(jobs
        .into_iter()
        .map(|j| {
            let prior = match &known {
                Some(_) if !needs(&j) => Prior::Nothing,
                None => Prior::Nothing,
                Some(Err(_)) => Prior::Unknown,
                Some(Ok(found)) => match found.get(&(j.organization_id.clone(), j.id.clone())) {
                    Some(true) => Prior::Completed,
                    // Retried from the dead set: the failure is the one it was retried from.
                    Some(false) if j.revived => Prior::Nothing,
                    Some(false) => Prior::Failed,
                    None => Prior::Nothing,
                },
            };
            (j, prior)
        })
        .collect())
}

/// The lease a task runs under; it travels in the task's extensions to the ack layer.
#[derive(Debug, Clone)]
pub struct Lease {
    pub id: String,
    pub token: String,
    pub attempt: u32,
    pub max_attempts: u32,
}

/// How a handler says a job failed. Any other error counts as a retryable failure.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// Worth another attempt, after `after` if the provider said so.
    #[error("{message}")]
    Retry {
        message: String,
        after: Option<Duration>,
    },
    /// No attempt can succeed (bad payload, 400, quota exhausted): straight to the dead set.
    #[error("{message}")]
    Permanent { message: String },
    /// Not run at all (budget window, open breaker): try again later without spending an attempt.
    /// `reason` is the machine's word for it, in the job's `deferred` event and status.
    #[error("{message}")]
    Defer {
        message: String,
        after: Duration,
        reason: DelayReason,
    },
}

/// A handler's success: the result summary its `succeeded` event and outcome carry, JSON text
/// the queue stores without reading (`None`: the handler has none, written as `null`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Completed {
    pub result: Option<String>,
}

struct AckRequest {
    item: Settlement,
    applied: oneshot::Sender<bool>,
}

struct Shared {
    queue: Queue,
    retry: RetryPolicy,
    /// Leases held by this worker: job id -> token. The renewer extends them.
    leases: Mutex<HashMap<String, String>>,
    /// Jobs whose outcome is on its way to Redis. Their lease is still renewed, but one found
    /// gone was settled meanwhile, not lost.
    settling: Mutex<HashSet<String>>,
    acks: mpsc::UnboundedSender<AckRequest>,
}

impl Shared {
    /// Hands an outcome to the flusher and waits until Redis has it. Returns whether the lease
    /// was still ours (false: it expired and the job went back to the queue).
    async fn settle(&self, lease: &Lease, outcome: Outcome) -> bool {
        let (tx, rx) = oneshot::channel();
        self.settling
            .lock()
            .expect("settling set")
            .insert(lease.id.clone());
        let item = Settlement {
            id: lease.id.clone(),
            token: lease.token.clone(),
            outcome,
        };
        let applied = if self.acks.send(AckRequest { item, applied: tx }).is_ok() {
            rx.await.unwrap_or(false)
        } else {
            false
        };
        self.leases
            .lock()
            .expect("lease registry")
            .remove(&lease.id);
        self.settling
            .lock()
            .expect("settling set")
            .remove(&lease.id);
        applied
    }
}

/// Decides what happens to a job after a run.
pub fn outcome_of(
    result: &Result<Completed, BoxDynError>,
    lease: &Lease,
    retry: &RetryPolicy,
) -> Outcome {
    let err = match result {
        Ok(done) => {
            return Outcome::Done {
                result: done.result.clone(),
            };
        }
        Err(e) => e,
    };
    let (message, after) = match err.downcast_ref::<Failure>() {
        Some(Failure::Permanent { message }) => {
            return Outcome::Failed {
                reason: message.clone(),
            };
        }
        Some(Failure::Defer {
            message,
            after,
            reason,
        }) => {
            return Outcome::Defer {
                after: *after,
                reason: message.clone(),
                why: *reason,
            };
        }
        Some(Failure::Retry { message, after }) => (message.clone(), *after),
        None => (err.to_string(), None),
    };
    if lease.attempt >= lease.max_attempts {
        return Outcome::Dead {
            reason: format!(
                "failed {} of {} attempts; last error: {message}",
                lease.attempt, lease.max_attempts
            ),
        };
    }
    let backoff = retry.delay(lease.attempt, fastrand::f64());
    Outcome::Retry {
        after: after.map_or(backoff, |a| a.max(Duration::from_millis(1))),
        error: message,
    }
}

async fn flusher(queue: Queue, mut rx: mpsc::UnboundedReceiver<AckRequest>) {
    const MAX_BATCH: usize = 256;
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(req) => batch.push(req),
                Err(_) => break,
            }
        }
        let items: Vec<Settlement> = batch.iter().map(|r| r.item.clone()).collect();
        let mut pause = Duration::from_millis(50);
        let applied = loop {
            match queue.settle(&items).await {
                Ok(applied) => break applied,
                Err(e) => {
                    // The outcome must not be lost: keep trying. Meanwhile the leases stay ours
                    // or expire, and an expired one makes the late settle a harmless refusal.
                    tracing::warn!(error = %e, jobs = items.len(), "settling jobs failed; retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
            }
        };
        for (req, ok) in batch.drain(..).zip(applied) {
            if !ok {
                tracing::warn!(job.id = %crate::redact::Field::new(&req.item.id), "outcome refused: the lease had expired and the job was handed out again");
            }
            let _ = req.applied.send(ok);
        }
    }
}

/// Since when this process's fetches, and its reaps, have failed without a success in between
/// (ms since the epoch; 0: the last one succeeded).
static FETCH_FAILING_SINCE_MS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static REAP_FAILING_SINCE_MS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn mark(failing_since: &std::sync::atomic::AtomicU64, ok: bool) {
    use std::sync::atomic::Ordering;
    if ok {
        failing_since.store(0, Ordering::Relaxed);
    } else {
        let _ = failing_since.compare_exchange(0, now_ms(), Ordering::Relaxed, Ordering::Relaxed);
    }
}

/// Whether this process's queue scripts run: `Err` with how long they have failed once the
/// fetches, or the reaps, have failed for longer than `lease` with no success in between. The
/// renewer feeds the systemd watchdog only while this is `Ok`, so a queue that keeps failing
/// stops the pings within a lease and a third (and systemd restarts the service after
/// `WatchdogSec`); /readyz reports Redis unhealthy in the same time.
pub fn queue_healthy(lease: Duration) -> Result<(), Duration> {
    let now = now_ms();
    for since in [&FETCH_FAILING_SINCE_MS, &REAP_FAILING_SINCE_MS] {
        let since = since.load(std::sync::atomic::Ordering::Relaxed);
        let failing = Duration::from_millis(now.saturating_sub(since));
        if since != 0 && failing > lease {
            return Err(failing);
        }
    }
    Ok(())
}

/// Every `every`: extends this worker's leases, then runs the reaper, which returns other
/// workers' expired leases even while this worker is too busy to fetch.
async fn renewer(
    shared: Arc<Shared>,
    every: Duration,
    stop: CancellationToken,
    liveness: Option<Liveness>,
) {
    let mut ticks = 0u64;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let reaped = shared.queue.reap().await;
        // Once a lease or so: the organisations' counts of leased jobs, recounted from the
        // lease set, so a drift can neither block an organisation for good nor let it overshoot.
        ticks += 1;
        if ticks.is_multiple_of(3) {
            match shared.queue.recount_org_in_flight().await {
                Ok(Some(0)) | Ok(None) => {}
                Ok(Some(n)) => tracing::warn!(
                    organisations = n,
                    "leased-job counts per organisation had drifted: recounted from the lease set"
                ),
                Err(e) => {
                    tracing::warn!(error = %e, "recounting leased jobs per organisation failed")
                }
            }
        }
        if let Err(e) = &reaped {
            tracing::warn!(error = %e, "returning expired leases failed");
        }
        mark(&REAP_FAILING_SINCE_MS, reaped.is_ok());
        // Only a queue whose scripts run says it is alive (see `queue_healthy`).
        if queue_healthy(shared.queue.settings().lease).is_ok()
            && let Some(alive) = &liveness
        {
            alive();
        }
        if let Err(e) = shared.queue.repair_if_needed().await {
            tracing::warn!(error = %e, "repairing the queue failed; trying again next tick");
        }
        let leases: Vec<(String, String)> = shared
            .leases
            .lock()
            .expect("lease registry")
            .iter()
            .map(|(id, token)| (id.clone(), token.clone()))
            .collect();
        if leases.is_empty() {
            continue;
        }
        match shared.queue.renew(&leases).await {
            Ok(held) => {
                let current = shared.leases.lock().expect("lease registry");
                let settling = shared.settling.lock().expect("settling set");
                for ((id, _), ok) in leases.iter().zip(held) {
                    // Settled since the list was taken, or being settled: not lost.
                    if !ok && current.contains_key(id) && !settling.contains(id) {
                        tracing::warn!(job.id = %crate::redact::Field::new(id), "lease lost: the job may run elsewhere; its outcome here will be refused");
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "renewing leases failed"),
        }
    }
}

/// A fetch in flight: leased jobs, each with what the store already holds for it.
type Fetching = BoxFuture<'static, Result<Vec<(LeasedJob, Prior)>, QueueError>>;

/// The apalis backend. Build one per worker.
pub struct RedisBackend {
    shared: Arc<Shared>,
    settings: QueueSettings,
    default_max_attempts: u32,
    rx: Option<mpsc::UnboundedReceiver<AckRequest>>,
    stop: CancellationToken,
    buffer: VecDeque<Task<RawJob>>,
    fetching: Option<Fetching>,
    precheck: Option<Precheck>,
    liveness: Option<Liveness>,
    idle: Option<Pin<Box<tokio::time::Sleep>>>,
    error_pause: Duration,
    closing: Option<BoxFuture<'static, ()>>,
}

impl RedisBackend {
    pub fn new(queue: Queue, retry: RetryPolicy) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let settings = queue.settings().clone();
        Self {
            shared: Arc::new(Shared {
                queue,
                retry,
                leases: Mutex::new(HashMap::new()),
                settling: Mutex::new(HashSet::new()),
                acks: tx,
            }),
            settings,
            default_max_attempts: retry.max_attempts,
            rx: Some(rx),
            stop: CancellationToken::new(),
            buffer: VecDeque::new(),
            fetching: None,
            idle: None,
            error_pause: Duration::from_millis(100),
            closing: None,
            precheck: None,
            liveness: None,
        }
    }

    /// Calls `alive` whenever the queue shows it works (see [`Liveness`]).
    pub fn with_liveness(mut self, alive: Liveness) -> Self {
        self.liveness = Some(alive);
        self
    }

    /// Checks each fetched batch's re-leased and app-named jobs against the store (see
    /// [`Precheck`]).
    pub fn with_precheck(mut self, precheck: Precheck) -> Self {
        self.precheck = Some(precheck);
        self
    }

    fn to_task(&self, job: LeasedJob, prior: Prior) -> Task<RawJob> {
        let max_attempts = if job.max_attempts == 0 {
            self.default_max_attempts
        } else {
            job.max_attempts
        };
        let lease = Lease {
            id: job.id.clone(),
            token: job.token.clone(),
            attempt: job.attempts + 1,
            max_attempts,
        };
        self.shared
            .leases
            .lock()
            .expect("lease registry")
            .insert(job.id.clone(), job.token);
        let raw = RawJob {
            id: job.id.clone(),
            kind: job.kind,
            tier: job.tier,
            organization_id: job.organization_id,
            payload: job.payload,
            token: lease.token.parse().unwrap_or(0),
            attempt: lease.attempt,
            max_attempts,
            enqueued_at_ms: job.enqueued_at_ms,
            interrupts: job.interrupts,
            prior,
        };
        TaskBuilder::new(raw)
            .task_id(TaskId::from_string(job.id))
            .attempt(job.attempts as usize)
            .max_attempts(max_attempts as usize)
            .data(lease)
            .build()
    }
}

impl Drop for RedisBackend {
    fn drop(&mut self) {
        // The worker was dropped without closing (a shutdown timeout): stop renewing, so the
        // leases of whatever it held expire and the reaper returns those jobs.
        self.stop.cancel();
    }
}

impl Backend for RedisBackend {
    type Task = Task<RawJob>;
    type Error = QueueError;

    fn poll_ready(
        &mut self,
        _cx: &mut Context<'_>,
        _w: &WorkerContext,
    ) -> Poll<Result<(), QueueError>> {
        Poll::Ready(Ok(()))
    }

    fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
        worker: &WorkerContext,
    ) -> Poll<Option<Result<Task<RawJob>, QueueError>>> {
        loop {
            if let Some(task) = self.buffer.pop_front() {
                return Poll::Ready(Some(Ok(task)));
            }
            if let Some(fetch) = self.fetching.as_mut() {
                let result = match fetch.poll_unpin(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(r) => r,
                };
                self.fetching = None;
                match result {
                    Ok(jobs) if jobs.is_empty() => {
                        mark(&FETCH_FAILING_SINCE_MS, true);
                        self.error_pause = Duration::from_millis(100);
                        self.idle = Some(Box::pin(tokio::time::sleep(self.settings.poll_interval)));
                    }
                    Ok(jobs) => {
                        mark(&FETCH_FAILING_SINCE_MS, true);
                        self.error_pause = Duration::from_millis(100);
                        for (job, prior) in jobs {
                            let task = self.to_task(job, prior);
                            self.buffer.push_back(task);
                        }
                    }
                    Err(e) => {
                        mark(&FETCH_FAILING_SINCE_MS, false);
                        tracing::warn!(error = %e, pause_ms = self.error_pause.as_millis() as u64, "fetching jobs failed");
                        self.idle = Some(Box::pin(tokio::time::sleep(self.error_pause)));
                        self.error_pause = (self.error_pause * 2).min(Duration::from_secs(5));
                    }
                }
                continue;
            }
            if let Some(idle) = self.idle.as_mut() {
                if idle.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                self.idle = None;
            }
            // Lease no more than the free slots: a leased job waiting in a buffer holds a
            // lease that nobody works on.
            let free = self
                .settings
                .concurrency
                .saturating_sub(worker.task_count())
                .saturating_sub(self.buffer.len());
            let want = free.clamp(1, self.settings.fetch_batch);
            let queue = self.shared.queue.clone();
            self.fetching = Some(fetch_checked(queue, want, self.precheck.clone()).boxed());
        }
    }

    fn poll_close(
        &mut self,
        cx: &mut Context<'_>,
        _w: &WorkerContext,
    ) -> Poll<Result<(), QueueError>> {
        if self.closing.is_none() {
            let leases: Vec<Lease> = self
                .buffer
                .drain(..)
                .filter_map(|t| t.ctx().data().get::<Lease>().cloned())
                .collect();
            let pending = self.fetching.take();
            let shared = self.shared.clone();
            let stop = self.stop.clone();
            let default_max = self.default_max_attempts;
            self.closing = Some(
                async move {
                    let mut leases = leases;
                    // A fetch in flight may already hold leases: wait for it and give them back.
                    if let Some(fetch) = pending
                        && let Ok(jobs) = fetch.await
                    {
                        leases.extend(jobs.into_iter().map(|(j, _)| Lease {
                            id: j.id,
                            token: j.token,
                            attempt: j.attempts + 1,
                            max_attempts: default_max,
                        }));
                    }
                    let released = futures::future::join_all(
                        leases.iter().map(|l| shared.settle(l, Outcome::Release)),
                    )
                    .await;
                    if !released.is_empty() {
                        tracing::info!(
                            jobs = released.len(),
                            "returned unstarted jobs to the queue"
                        );
                    }
                    stop.cancel();
                }
                .boxed(),
            );
        }
        match self.closing.as_mut().expect("set above").poll_unpin(cx) {
            Poll::Ready(()) => Poll::Ready(Ok(())),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl BackendConfig for RedisBackend {
    type Args = RawJob;
    type Id = String;
    type Kind = Ephemeral;
    type Config = QueueSettings;
    type Layer = AckLayer;

    fn config(&self) -> &QueueSettings {
        &self.settings
    }

    fn middleware(&mut self, _worker: &mut WorkerContext) -> AckLayer {
        if let Some(rx) = self.rx.take() {
            tokio::spawn(flusher(self.shared.queue.clone(), rx));
            let every = self.settings.lease / 3;
            tokio::spawn(renewer(
                self.shared.clone(),
                every,
                self.stop.clone(),
                self.liveness.clone(),
            ));
        }
        AckLayer {
            shared: self.shared.clone(),
        }
    }
}

/// Records each job's final outcome in Redis (see the module docs).
#[derive(Clone)]
pub struct AckLayer {
    shared: Arc<Shared>,
}

impl<S> Layer<S> for AckLayer {
    type Service = AckService<S>;
    fn layer(&self, inner: S) -> AckService<S> {
        AckService {
            inner,
            shared: self.shared.clone(),
        }
    }
}

#[derive(Clone)]
pub struct AckService<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> Service<Task<RawJob>> for AckService<S>
where
    S: Service<Task<RawJob>, Response = Completed>,
    S::Error: Into<BoxDynError>,
    S::Future: Send + 'static,
{
    type Response = ();
    type Error = BoxDynError;
    type Future = BoxFuture<'static, Result<(), BoxDynError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxDynError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, task: Task<RawJob>) -> Self::Future {
        let lease = task.ctx().data().get::<Lease>().cloned();
        let fut = self.inner.call(task);
        let shared = self.shared.clone();
        async move {
            let result = fut.await.map_err(Into::into);
            if let Some(lease) = lease {
                let outcome = outcome_of(&result, &lease, &shared.retry);
                shared.settle(&lease, outcome).await;
            }
            result.map(|_| ())
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(attempt: u32) -> Lease {
        Lease {
            id: "j1".into(),
            token: "1".into(),
            attempt,
            max_attempts: 3,
        }
    }

    const POLICY: RetryPolicy = RetryPolicy {
        max_attempts: 3,
        base: Duration::from_secs(1),
        cap: Duration::from_secs(60),
    };

    fn err(f: Failure) -> Result<Completed, BoxDynError> {
        Err(Box::new(f))
    }

    #[test]
    fn outcomes_follow_the_failure_kind_and_the_attempt_count() {
        let done = Completed {
            result: Some("{}".into()),
        };
        assert_eq!(
            outcome_of(&Ok(done), &lease(1), &POLICY),
            Outcome::Done {
                result: Some("{}".into())
            }
        );
        let permanent = err(Failure::Permanent {
            message: "bad payload".into(),
        });
        assert_eq!(
            outcome_of(&permanent, &lease(1), &POLICY),
            Outcome::Failed {
                reason: "bad payload".into()
            }
        );
        let retry = err(Failure::Retry {
            message: "503".into(),
            after: Some(Duration::from_secs(7)),
        });
        assert_eq!(
            outcome_of(&retry, &lease(1), &POLICY),
            Outcome::Retry {
                after: Duration::from_secs(7),
                error: "503".into()
            }
        );
        match outcome_of(&retry, &lease(3), &POLICY) {
            Outcome::Dead { reason } => {
                assert!(reason.contains("failed 3 of 3 attempts"), "{reason}")
            }
            other => panic!("expected dead, got {other:?}"),
        }
        let defer = err(Failure::Defer {
            message: "budget".into(),
            after: Duration::from_secs(30),
            reason: DelayReason::Budget,
        });
        assert!(matches!(
            outcome_of(&defer, &lease(3), &POLICY),
            Outcome::Defer {
                why: DelayReason::Budget,
                ..
            }
        ));
        let other: Result<Completed, BoxDynError> = Err("task panicked".into());
        match outcome_of(&other, &lease(1), &POLICY) {
            Outcome::Retry { after, error } => {
                assert!(after <= Duration::from_secs(1));
                assert_eq!(error, "task panicked");
            }
            o => panic!("expected retry, got {o:?}"),
        }
    }
}
