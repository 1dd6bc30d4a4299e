//! Test harness: shared servers, a fresh database and queue per test, and waiting on conditions.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use aiq::config::{Env, Settings};
use aiq::domain::{JobKind, OrganizationId, Tier};
use aiq::queue::{NewJob, Queue};
use aiq::store::Store;
use aiq_testkit::fake::{FakeOptions, FakeProviders};
use aiq_testkit::local::{every_tier, provider_vars};
use aiq_testkit::localsvc::{LocalPostgres, LocalRedis};
pub use aiq_testkit::world::{LlmJob, VisionJob, wait_for, wait_until};
use sqlx::Connection;
use tokio_util::sync::CancellationToken;

pub struct Servers {
    pub redis_url: String,
    pub pg_url: Box<dyn Fn(&str) -> String + Send + Sync>,
}

/// Runs `start` on a thread that lives as long as the process, which keeps the servers it
/// returns (a server dies with the thread that started it: parent-death signal), and returns
/// what `start` tells of them. Panics naming `name` when they do not start.
pub fn start_for_the_run<S: 'static, I: Send + 'static>(
    name: &str,
    start: impl FnOnce() -> anyhow::Result<(S, I)> + Send + 'static,
) -> I {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || match start() {
            Ok((servers, info)) => {
                tx.send(Ok(info)).expect("server thread channel");
                // Keep them alive for the whole run.
                loop {
                    std::thread::park();
                    let _ = &servers;
                }
            }
            Err(e) => tx
                .send(Err(format!("{e:#}")))
                .expect("server thread channel"),
        })
        .expect("spawning the server thread");
    rx.recv()
        .expect("server thread")
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// Starts redis-server and PostgreSQL once per test run, for the whole run.
pub fn servers() -> &'static Servers {
    static SERVERS: OnceLock<Servers> = OnceLock::new();
    SERVERS.get_or_init(|| {
        let (redis_url, pg_port) = start_for_the_run("test servers", || {
            let (redis, pg) = (LocalRedis::start("it")?, LocalPostgres::start("it")?);
            let info = (redis.url(), pg.port());
            Ok(((redis, pg), info))
        });
        Servers {
            redis_url,
            pg_url: Box::new(move |db| format!("postgres://postgres@127.0.0.1:{pg_port}/{db}")),
        }
    })
}

/// Creates a database of its own on the server of `admin_url` and returns its name.
pub async fn new_database(admin_url: &str) -> String {
    let db = format!("t_{}", uuid::Uuid::new_v4().simple());
    let mut admin = sqlx::PgConnection::connect(admin_url)
        .await
        .expect("admin connection");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db}")))
        .execute(&mut admin)
        .await
        .expect("create database");
    db
}

/// A database of its own on the shared PostgreSQL, owned by a login role of its own that is not
/// a superuser: aiq connecting as it is held to row-level security, which the harness's
/// superuser bypasses. Roles are the whole cluster's, so the name is unique per call. The role
/// may create roles (the migrations create `aiq_reader` when it is absent).
pub struct OwnedDatabase {
    pub role: String,
    pub db: String,
    /// The database's URL as the role.
    pub url: String,
    /// The database's URL as the superuser.
    pub admin_url: String,
}

impl OwnedDatabase {
    pub async fn create() -> Self {
        let s = servers();
        let id = uuid::Uuid::new_v4().simple();
        let (role, db) = (format!("r_{id}"), format!("t_{id}"));
        let mut admin = sqlx::PgConnection::connect(&(s.pg_url)("postgres"))
            .await
            .expect("admin connection");
        for sql in [
            format!("CREATE ROLE {role} LOGIN CREATEROLE"),
            format!("CREATE DATABASE {db} OWNER {role}"),
        ] {
            sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
                .execute(&mut admin)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"));
        }
        let admin_url = (s.pg_url)(&db);
        Self {
            url: url_as(&admin_url, &role),
            role,
            db,
            admin_url,
        }
    }
}

/// `url` (the harness's, as the superuser `postgres`) with `role` as its user.
pub fn url_as(url: &str, role: &str) -> String {
    url.replacen("//postgres@", &format!("//{role}@"), 1)
}

/// One test's world: its own database, queue prefix and fake providers.
pub struct TestCtx {
    pub settings: Settings,
    pub queue: Queue,
    pub store: Store,
    /// Kept for the test's lifetime: the fake provider server stops when it is dropped.
    pub _fake: FakeProviders,
    pub vars: HashMap<String, String>,
}

pub const ORG_A: &str = "0b6f1b3e-2a55-4a6e-9a43-2f6f6f1b2c3d";
pub const ORG_B: &str = "7c9e6679-7425-40de-944b-e07fc1f90ae7";

impl TestCtx {
    pub async fn new() -> Self {
        Self::with(&[]).await
    }

    /// A context with some settings overridden.
    pub async fn with(overrides: &[(&str, &str)]) -> Self {
        Self::build(overrides, FakeOptions::default()).await
    }

    /// A context with some settings overridden and the fake providers configured.
    pub async fn build(overrides: &[(&str, &str)], fake: FakeOptions) -> Self {
        aiq::tls::install_crypto_provider();
        let s = servers();
        let db = new_database(&(s.pg_url)("postgres")).await;
        let fake = FakeProviders::start_with(SocketAddr::from(([127, 0, 0, 1], 0)), fake)
            .await
            .expect("fake providers");
        let mut vars: HashMap<String, String> = [
            ("AIQ_REDIS_URL", s.redis_url.clone()),
            ("AIQ_DATABASE_URL", (s.pg_url)(&db)),
            (
                "AIQ_QUEUE_PREFIX",
                format!("t{}", uuid::Uuid::new_v4().simple()),
            ),
            (
                "AIQ_BUDGET_PREFIX",
                format!("b{}", uuid::Uuid::new_v4().simple()),
            ),
            // No rate limit unless a test sets one: tests enqueue many jobs per organisation.
            ("AIQ_ORG_JOBS_PER_MINUTE", every_tier("0")),
            // No per-organisation cap either, unless a test sets one.
            ("AIQ_ORG_MAX_IN_FLIGHT", every_tier("0")),
            ("AIQ_CONCURRENCY", "4".into()),
            ("AIQ_POLL_INTERVAL_MS", "10".into()),
            ("AIQ_RETRY_BASE_MS", "10".into()),
            ("AIQ_RETRY_CAP_MS", "50".into()),
            // Off unless a test turns them on: most tests count job-level attempts.
            ("AIQ_CALL_RETRIES", "0".into()),
            ("AIQ_CALL_RETRY_BASE_MS", "10".into()),
            ("AIQ_CALL_RETRY_CAP_MS", "2000".into()),
            ("AIQ_SHUTDOWN_GRACE_MS", "5000".into()),
            ("AIQ_ADMIN_ADDR", "127.0.0.1:0".into()),
            ("AIQ_LOG_FORMAT", "text".into()),
        ]
        .into_iter()
        .chain(provider_vars(&fake.base_url(), "test"))
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        for (k, v) in overrides {
            vars.insert((*k).to_owned(), (*v).to_owned());
        }
        let lookup = vars.clone();
        let settings =
            Settings::load(&Env(move |k| lookup.get(k).cloned())).expect("test settings");
        let (queue, store) = aiq::worker::connect(&settings).await.expect("connect");
        store.migrate().await.expect("migrate");
        // The budget's counters start from the (empty) ledger, as a first `aiq run` would
        // build them, so what a test sets up in Redis before starting a worker stays.
        aiq::budget::Budget::connect(&settings.queue.redis, &settings.budget)
            .await
            .expect("budget connection")
            .rebuild_ledger(&store, false)
            .await
            .expect("the budget's ledger marker");
        Self {
            settings,
            queue,
            store,
            _fake: fake,
            vars,
        }
    }

    /// A context on servers of the test's own instead of the shared ones: a Redis at
    /// `redis_url` and/or a database of its own on `pg`. For tests that kill, restart or stop a
    /// server, which the shared ones must never be (other tests use them in parallel). Built by
    /// [`TestCtx::build`] with the URLs as overrides, which also creates an unused database on
    /// the shared PostgreSQL.
    pub async fn build_on(
        redis_url: Option<&str>,
        pg: Option<&LocalPostgres>,
        overrides: &[(&str, &str)],
        fake: FakeOptions,
    ) -> Self {
        let mut servers: Vec<(&str, String)> = Vec::new();
        if let Some(url) = redis_url {
            servers.push(("AIQ_REDIS_URL", url.to_owned()));
        }
        if let Some(pg) = pg {
            let db = new_database(&pg.url("postgres")).await;
            servers.push(("AIQ_DATABASE_URL", pg.url(&db)));
        }
        let all: Vec<(&str, &str)> = servers
            .iter()
            .map(|(k, v)| (*k, v.as_str()))
            .chain(overrides.iter().copied())
            .collect();
        Self::build(&all, fake).await
    }

    /// Starts a worker in this process; stop it with [`Worker::stop`].
    pub fn start_worker(&self) -> Worker {
        let token = CancellationToken::new();
        let (settings, queue, store, t) = (
            self.settings.clone(),
            self.queue.clone(),
            self.store.clone(),
            token.clone(),
        );
        let join = tokio::spawn(async move {
            let app = aiq::worker::app(&settings, store).await?;
            aiq::worker::run(&settings, queue, app, t).await
        });
        Worker { token, join }
    }

    pub async fn enqueue(
        &self,
        kind: JobKind,
        tier: Tier,
        org: &str,
        payload: &str,
        max_attempts: u32,
    ) -> String {
        self.queue
            .enqueue(&NewJob {
                kind,
                tier,
                organization_id: OrganizationId::parse(org).expect("org"),
                payload: payload.to_owned(),
                job_id: None,
                delay: Duration::ZERO,
                idempotency_key: None,
                max_attempts,
            })
            .await
            .expect("enqueue")
            .job_id
    }

    /// Runs a worker until the queue has settled (within a minute), then stops it.
    pub async fn run_until_settled(&self) {
        let worker = self.start_worker();
        self.wait_settled(Duration::from_secs(60)).await;
        worker.stop().await;
    }

    /// Enqueues an LLM job and a one-image Vision job of `org` in `tier`; returns their ids.
    pub async fn enqueue_both_kinds(&self, tier: Tier, org: &str, text: &str) -> [String; 2] {
        [
            self.enqueue(
                JobKind::LlmComplete,
                tier,
                org,
                &llm_payload(tier, org, text),
                0,
            )
            .await,
            self.enqueue(
                JobKind::VisionAnnotate,
                tier,
                org,
                &vision_payload(tier, org, 1),
                0,
            )
            .await,
        ]
    }

    /// Waits until nothing is waiting, in flight or delayed.
    pub async fn wait_settled(&self, timeout: Duration) {
        let q = self.queue.clone();
        wait_until(timeout, "the queue to settle", || {
            let q = q.clone();
            async move {
                let s = q.stats().await.expect("stats");
                s.waiting.values().sum::<u64>() == 0 && s.inflight == 0 && s.delayed == 0
            }
        })
        .await;
    }

    /// The budget of this test's settings.
    pub async fn budget(&self) -> aiq::budget::Budget {
        aiq::budget::Budget::connect(&self.settings.queue.redis, &self.settings.budget)
            .await
            .expect("budget connection")
    }

    /// Uses up this month's free Vision units of `feature`, so its calls cost list price.
    pub async fn use_up_free_vision_units(&self, feature: &str) {
        let month = chrono::Utc::now().format("%Y-%m").to_string();
        let units = std::collections::BTreeMap::from([(feature.to_owned(), 1000u64)]);
        self.budget()
            .await
            .set_vision_units(&month, &units)
            .await
            .unwrap();
    }

    /// What the fake providers counted (see `aiq_testkit::fake`).
    pub async fn fake_calls(&self) -> serde_json::Value {
        let url = format!("{}/_fake/calls", self.vars["AIQ_OPENAI_BASE_URL"]);
        reqwest::get(url)
            .await
            .expect("fake calls")
            .json()
            .await
            .expect("fake calls json")
    }

    /// Starts `aiq run` as a child process on this test's queue and database.
    /// The fake's log of OpenAI calls: (start ms, end ms, status) each.
    pub async fn openai_call_log(&self) -> Vec<(u64, u64, u64)> {
        self.fake_calls().await["log"]
            .as_array()
            .expect("the fake's call log")
            .iter()
            .map(|e| {
                (
                    e[1].as_u64().unwrap_or(0),
                    e[2].as_u64().unwrap_or(0),
                    e[3].as_u64().unwrap_or(0),
                )
            })
            .collect()
    }

    /// Starts `aiq run` with this test's settings. It is killed when the thread that started it
    /// ends (the test's, at the latest), so a test that fails before stopping it leaves no
    /// daemon behind.
    pub fn spawn_daemon(&self, extra: &[(&str, &str)]) -> std::process::Child {
        let stderr = if std::env::var_os("AIQ_TEST_DAEMON_LOGS").is_some() {
            std::process::Stdio::inherit()
        } else {
            std::process::Stdio::null()
        };
        self.spawn_daemon_to(extra, stderr)
    }

    /// [`TestCtx::spawn_daemon`] writing its log (stderr) to the file `log`.
    pub fn spawn_daemon_logging_to(
        &self,
        extra: &[(&str, &str)],
        log: &std::path::Path,
    ) -> std::process::Child {
        let file = std::fs::File::create(log).expect("creating the daemon's log file");
        self.spawn_daemon_to(extra, file.into())
    }

    fn spawn_daemon_to(
        &self,
        extra: &[(&str, &str)],
        stderr: std::process::Stdio,
    ) -> std::process::Child {
        let mut cmd = aiq_command();
        // SAFETY: prctl only touches the child, between fork and exec.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                if libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGKILL as libc::c_ulong,
                    0,
                    0,
                    0,
                ) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd.envs(&self.vars)
            .envs(extra.iter().copied())
            .arg("run")
            .stdout(std::process::Stdio::null())
            .stderr(stderr);
        cmd.spawn().expect("spawning aiq run")
    }

    /// Direct access to Redis (the first seed node of a cluster), for assertions on the queue's
    /// keys; with the settings' certificates, as the daemon connects.
    pub async fn redis(&self) -> redis::aio::MultiplexedConnection {
        // The queue's timeouts, not redis-rs' 500 ms: a busy machine's answers and the tests'
        // blocking reads take longer.
        aiq::redis_conn::multiplexed(&aiq::redis_conn::client(&self.settings.queue.redis).unwrap())
            .await
            .unwrap()
    }

    pub fn key(&self, suffix: &str) -> String {
        format!("{{{}}}:{suffix}", self.vars["AIQ_QUEUE_PREFIX"])
    }

    /// Redis's clock minute: the per-minute limits count in its one-minute windows. A test of
    /// one window compares it before and after its run instead of waiting for a quiet moment.
    pub async fn redis_minute(&self) -> u64 {
        let (secs, _): (u64, u64) = redis::cmd("TIME")
            .query_async(&mut self.redis().await)
            .await
            .expect("TIME");
        secs / 60
    }

    /// Jobs with a completed result row.
    pub async fn completed(&self) -> i64 {
        self.scalar_i64("SELECT count(*) FROM ai_processing_results WHERE status = 'completed'")
            .await
    }

    /// Jobs of one organisation with a completed result row.
    pub async fn completed_of(&self, org: &str) -> i64 {
        sqlx::query_scalar(
            "SELECT count(*) FROM ai_processing_results
             WHERE status = 'completed' AND organization_id = $1::uuid",
        )
        .bind(org)
        .fetch_one(self.store.pool())
        .await
        .unwrap()
    }

    pub async fn scalar_i64(&self, sql: &str) -> i64 {
        sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(sql.to_owned()))
            .fetch_one(self.store.pool())
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }
}

pub struct Worker {
    token: CancellationToken,
    join: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Worker {
    pub async fn stop(self) {
        self.token.cancel();
        tokio::time::timeout(Duration::from_secs(20), self.join)
            .await
            .expect("worker stops in time")
            .expect("worker task")
            .expect("worker result");
    }
}

/// The `aiq` binary with a clean environment (PATH only): settings come from the test.
pub fn aiq_command() -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_aiq"));
    c.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    c
}

/// Sends `signal` to a child (0: none, it is already stopping) and waits for it to exit.
pub async fn signal_and_wait(
    mut child: std::process::Child,
    signal: libc::c_int,
) -> std::process::ExitStatus {
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(child.id() as libc::pid_t, signal);
    }
    // A child that does not exit fails the test instead of hanging the run.
    const EXIT_TIMEOUT: Duration = Duration::from_secs(120);
    let deadline = Instant::now() + EXIT_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait().expect("child status") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the child did not exit within {EXIT_TIMEOUT:?} of signal {signal}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `GET /readyz` of a daemon's admin address: its status and body, or None while it does not
/// answer.
pub async fn readyz(addr: &str) -> Option<(u16, serde_json::Value)> {
    let r = reqwest::get(format!("http://{addr}/readyz")).await.ok()?;
    let status = r.status().as_u16();
    Some((status, r.json().await.ok()?))
}

pub fn vision_payload(tier: Tier, org: &str, images: usize) -> String {
    VisionJob::new(tier, org, images).json()
}

pub fn llm_payload(tier: Tier, org: &str, text: &str) -> String {
    LlmJob::new(tier, org, text).json()
}

/// A job of ORG_A as the worker hands it to the handler on its first attempt (of three), for
/// tests that run `aiq::jobs::run` themselves.
pub fn raw_job(id: &str, kind: &str, tier: Tier, payload: String) -> aiq::queue::backend::RawJob {
    aiq::queue::backend::RawJob {
        id: id.into(),
        kind: kind.into(),
        tier: tier.as_str().into(),
        organization_id: ORG_A.into(),
        payload,
        token: 1,
        attempt: 1,
        max_attempts: 3,
        enqueued_at_ms: 0,
        interrupts: 0,
        prior: Default::default(),
    }
}
