//! TLS to Redis and PostgreSQL, against real servers that serve TLS with certificates this run
//! makes (`TestPki`, with the `openssl` command): the whole pipeline over `rediss://` and
//! `sslmode=verify-full`; a server certificate that another CA signed stops start-up at once,
//! with a message naming the server and the setting; mutual TLS with Redis; a Redis Cluster over
//! TLS.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use aiq::config::{Env, QueueSettings, Settings};
use aiq::domain::{JobKind, Tier};
use aiq::redis_conn::{Conn, ConnectError};
use aiq::tls::TlsFailureKind;
use aiq_testkit::fake::FakeOptions;
use aiq_testkit::localsvc::{LocalPostgres, LocalRedis, LocalRedisCluster, TestPki};

use crate::harness::{
    ORG_A, ORG_B, TestCtx, aiq_command, llm_payload, new_database, servers, start_for_the_run,
};

/// Start-up here waits up to an hour (`AIQ_STARTUP_WAIT_S`, the default, set explicitly below)
/// for a server that may still come: a refusal that waited would take that hour. Reaching this
/// timeout fails the test; nothing tighter is asserted, so a busy machine cannot fail it.
const TIMEOUT: Duration = Duration::from_secs(120);

/// The TLS servers of this run, shared by the tests of this file (none changes them).
struct TlsServers {
    /// The CA that signed the servers' certificates, and a client certificate it signed.
    ca: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
    /// A CA of its own, which signed nothing the servers present.
    wrong_ca: PathBuf,
    wrong_client_cert: PathBuf,
    wrong_client_key: PathBuf,
    /// `rediss://` URLs: client certificates optional, and required.
    redis_url: String,
    mtls_redis_url: String,
    pg_port: u16,
}

/// Starts the TLS servers once per run, for the whole run.
fn tls_servers() -> &'static TlsServers {
    static SERVERS: OnceLock<TlsServers> = OnceLock::new();
    SERVERS.get_or_init(|| {
        start_for_the_run("TLS test servers", || {
            let pki = TestPki::generate("aiq test CA")?;
            let wrong = TestPki::generate("another CA")?;
            let redis = LocalRedis::start_tls("tls-redis", &pki.server("optional"))?;
            let mtls = LocalRedis::start_tls("tls-mtls", &pki.server("yes"))?;
            let pg = LocalPostgres::start_tls("tls-pg", &pki.server("no"))?;
            let info = TlsServers {
                ca: pki.ca(),
                client_cert: pki.client_cert(),
                client_key: pki.client_key(),
                wrong_ca: wrong.ca(),
                wrong_client_cert: wrong.client_cert(),
                wrong_client_key: wrong.client_key(),
                redis_url: redis.url(),
                mtls_redis_url: mtls.url(),
                pg_port: pg.port(),
            };
            Ok(((pki, wrong, redis, mtls, pg), info))
        })
    })
}

impl TlsServers {
    /// A fresh database on the TLS PostgreSQL, and its URL with `params`.
    async fn database(&self, params: &str) -> String {
        // sqlx's default sslmode (prefer) takes TLS without checking the certificate.
        let admin_url = format!("postgres://postgres@127.0.0.1:{}/postgres", self.pg_port);
        let db = new_database(&admin_url).await;
        format!(
            "postgres://postgres@127.0.0.1:{}/{db}?{params}",
            self.pg_port
        )
    }

    /// The Redis port of `url`, for the messages.
    fn port(url: &str) -> &str {
        url.trim_start_matches("rediss://127.0.0.1:")
            .trim_end_matches('/')
    }
}

fn path(p: &std::path::Path) -> String {
    p.display().to_string()
}

/// Settings from the shared plain servers' defaults with `vars` on top, the way `aiq run` would
/// load them.
fn settings(vars: &[(&str, String)]) -> Settings {
    let mut all: Vec<(String, String)> = vec![
        ("AIQ_REDIS_URL".into(), servers().redis_url.clone()),
        ("AIQ_DATABASE_URL".into(), (servers().pg_url)("postgres")),
        ("AIQ_ADMIN_ADDR".into(), "127.0.0.1:0".into()),
        ("AIQ_LOG_FORMAT".into(), "text".into()),
        ("AIQ_STARTUP_WAIT_S".into(), "3600".into()),
    ];
    for (k, v) in vars {
        all.retain(|(n, _)| n != k);
        all.push(((*k).to_owned(), v.clone()));
    }
    Settings::load(&Env(move |k| {
        all.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
    }))
    .expect("settings")
}

/// What `aiq::worker::connect` (the start of `aiq run`) says when it fails; how long it took is
/// printed (a refusal returns at once, a wait would last `AIQ_STARTUP_WAIT_S`).
async fn start_failure(settings: &Settings) -> String {
    aiq::tls::install_crypto_provider();
    let started = Instant::now();
    let err = match tokio::time::timeout(TIMEOUT, aiq::worker::connect(settings)).await {
        Err(_) => panic!("start-up still waiting after {TIMEOUT:?}: a refusal must not wait"),
        Ok(Ok(_)) => panic!("start-up connected, but TLS should have refused"),
        Ok(Err(e)) => e,
    };
    let took = started.elapsed();
    println!("start-up refused in {} ms", took.as_millis());
    format!("{err:#}")
}

/// Runs `aiq run` with `vars` and returns its exit code and standard error.
async fn aiq_run(vars: &[(&str, String)]) -> (Option<i32>, String) {
    let mut cmd = aiq_command();
    cmd.envs(vars.iter().map(|(k, v)| (*k, v.as_str())))
        .env("AIQ_ADMIN_ADDR", "127.0.0.1:0")
        .env("AIQ_LOG_FORMAT", "text")
        .arg("run")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let child = cmd.spawn().expect("spawning aiq run");
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::task::spawn_blocking(move || child.wait_with_output()),
    )
    .await
    .expect("aiq run stops by itself")
    .expect("waiting for aiq run")
    .expect("aiq run's output");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vision_and_llm_jobs_complete_with_their_rows_over_rediss_and_postgresql_verify_full() {
    let t = tls_servers();
    let ca = path(&t.ca);
    let db_url = t
        .database(&format!("sslmode=verify-full&sslrootcert={ca}"))
        .await;
    let ctx = TestCtx::build(
        &[
            ("AIQ_REDIS_URL", &t.redis_url),
            ("AIQ_REDIS_CA_FILE", &ca),
            ("AIQ_DATABASE_URL", &db_url),
        ],
        FakeOptions::default(),
    )
    .await;
    let mut ids = Vec::new();
    for (tier, org) in [(Tier::Enterprise, ORG_A), (Tier::Trial, ORG_B)] {
        ids.extend(ctx.enqueue_both_kinds(tier, org, "over TLS").await);
    }
    let worker = ctx.start_worker();
    ctx.wait_settled(Duration::from_secs(30)).await;
    worker.stop().await;

    let list = ids
        .iter()
        .map(|id| format!("'{id}'"))
        .collect::<Vec<_>>()
        .join(",");
    let completed = ctx
        .scalar_i64(&format!(
            "SELECT count(*) FROM ai_processing_results WHERE status = 'completed' AND job_id IN ({list})"
        ))
        .await;
    assert_eq!(completed, 4);
    let costed = ctx
        .scalar_i64(&format!(
            "SELECT count(DISTINCT job_id) FROM ai_cost_tracking WHERE job_id IN ({list})"
        ))
        .await;
    assert_eq!(costed, 4, "every job has its cost row");
    let usage = ctx
        .scalar_i64(&format!(
            "SELECT count(*) FROM ai_usage WHERE job_id IN ({list})"
        ))
        .await;
    assert_eq!(usage, 2, "the two LLM jobs have their usage rows");
    assert_eq!(ctx.queue.stats().await.unwrap().counters["done"], 4);
    // The store's connections are TLS ones (the server would also take plain ones).
    let ssl: bool = sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(ctx.store.pool())
        .await
        .unwrap();
    assert!(ssl);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_certificate_another_ca_signed_stops_start_up_at_once_naming_the_server_and_the_setting()
 {
    let t = tls_servers();
    let vars = [
        ("AIQ_REDIS_URL", t.redis_url.clone()),
        ("AIQ_REDIS_CA_FILE", path(&t.wrong_ca)),
    ];
    let message = start_failure(&settings(&vars)).await;
    assert!(
        message.contains("TLS verification failed: the server's certificate is not trusted"),
        "{message}"
    );
    let port = TlsServers::port(&t.redis_url);
    assert!(
        message.contains(&format!("Redis at 127.0.0.1:{port}")),
        "{message}"
    );
    assert!(message.contains("check AIQ_REDIS_CA_FILE"), "{message}");

    // Without AIQ_REDIS_CA_FILE the system's roots are used, and they do not know the test CA.
    let message = start_failure(&settings(&vars[..1])).await;
    assert!(message.contains("TLS verification failed"), "{message}");

    // The daemon stops with the same message (exit 1: the settings parse, the server refuses).
    let mut run_vars = vars.to_vec();
    run_vars.push(("AIQ_DATABASE_URL", (servers().pg_url)("postgres")));
    let (code, stderr) = aiq_run(&run_vars).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("connecting to Redis (AIQ_REDIS_URL): TLS verification failed"),
        "{stderr}"
    );
    assert!(stderr.contains("AIQ_REDIS_CA_FILE"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgresql_certificate_another_ca_signed_stops_start_up_at_once_naming_the_server_and_the_setting()
 {
    let t = tls_servers();
    let pg_addr = format!("PostgreSQL at 127.0.0.1:{}", t.pg_port);
    let wrong = path(&t.wrong_ca);
    // The CA in the URL, then the same CA through AIQ_DATABASE_CA_FILE.
    let in_url = t
        .database(&format!("sslmode=verify-full&sslrootcert={wrong}"))
        .await;
    let bare = t.database("sslmode=verify-full").await;
    for vars in [
        vec![("AIQ_DATABASE_URL", in_url.clone())],
        vec![
            ("AIQ_DATABASE_URL", bare.clone()),
            ("AIQ_DATABASE_CA_FILE", wrong.clone()),
        ],
    ] {
        let message = start_failure(&settings(&vars)).await;
        assert!(
            message.contains("connecting to PostgreSQL (AIQ_DATABASE_URL): TLS verification failed: the server's certificate is not trusted"),
            "{message}"
        );
        assert!(message.contains(&pg_addr), "{message}");
        assert!(
            message.contains("sslrootcert in AIQ_DATABASE_URL or AIQ_DATABASE_CA_FILE"),
            "{message}"
        );
    }

    // AIQ_DATABASE_CA_FILE with the right CA verifies the server.
    let good = settings(&[
        ("AIQ_DATABASE_URL", bare.clone()),
        ("AIQ_DATABASE_CA_FILE", path(&t.ca)),
    ]);
    let store = aiq::store::Store::connect(&good.database, 1, Duration::from_secs(10))
        .await
        .expect("AIQ_DATABASE_CA_FILE verifies the server");
    store.ping().await.unwrap();

    // sslmode=require against a server without TLS (the shared one) is refused at once too.
    let plain = format!("{}?sslmode=require", (servers().pg_url)("postgres"));
    let message = start_failure(&settings(&[("AIQ_DATABASE_URL", plain)])).await;
    assert!(message.contains("TLS handshake failed"), "{message}");
    assert!(message.contains("sslmode in AIQ_DATABASE_URL"), "{message}");

    // The daemon stops with the message.
    let (code, stderr) = aiq_run(&[
        ("AIQ_REDIS_URL", servers().redis_url.clone()),
        ("AIQ_DATABASE_URL", in_url),
    ])
    .await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("TLS verification failed"), "{stderr}");
    assert!(stderr.contains(&pg_addr), "{stderr}");
}

/// The Redis settings of `vars` (the queue's, which every Redis connection uses).
fn redis_settings(vars: &[(&str, String)]) -> aiq::config::RedisSettings {
    let vars = vars.to_vec();
    QueueSettings::load(&Env(move |k| {
        vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone())
    }))
    .expect("redis settings")
    .redis
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_with_tls_auth_clients_yes_refuses_a_client_without_its_certificate_and_serves_one_with_it()
 {
    aiq::tls::install_crypto_provider();
    let t = tls_servers();
    let url = ("AIQ_REDIS_URL", t.mtls_redis_url.clone());
    let ca = ("AIQ_REDIS_CA_FILE", path(&t.ca));

    // No client certificate, then one that another CA signed: refused, naming the setting.
    let cases = [
        vec![url.clone(), ca.clone()],
        vec![
            url.clone(),
            ca.clone(),
            ("AIQ_REDIS_CLIENT_CERT_FILE", path(&t.wrong_client_cert)),
            ("AIQ_REDIS_CLIENT_KEY_FILE", path(&t.wrong_client_key)),
        ],
    ];
    for vars in cases {
        let err = match tokio::time::timeout(TIMEOUT, Conn::connect(&redis_settings(&vars))).await {
            Err(_) => panic!("still connecting after {TIMEOUT:?}: {vars:?}"),
            Ok(Ok(_)) => panic!("connected without an acceptable client certificate: {vars:?}"),
            Ok(Err(e)) => e,
        };
        let ConnectError::Tls(failure) = &err else {
            panic!("not a TLS refusal: {err}");
        };
        assert_eq!(failure.kind, TlsFailureKind::ClientCertificate, "{err}");
        let message = err.to_string();
        assert!(
            message
                .contains("TLS verification failed: the server refused this client's certificate"),
            "{message}"
        );
        assert!(message.contains("AIQ_REDIS_CLIENT_CERT_FILE"), "{message}");
    }

    // With the certificate the CA signed: the queue works.
    let vars = [
        url,
        ca,
        ("AIQ_REDIS_CLIENT_CERT_FILE", path(&t.client_cert)),
        ("AIQ_REDIS_CLIENT_KEY_FILE", path(&t.client_key)),
        (
            "AIQ_QUEUE_PREFIX",
            format!("t{}", uuid::Uuid::new_v4().simple()),
        ),
    ];
    let settings = {
        let vars = vars.to_vec();
        QueueSettings::load(&Env(move |k| {
            vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone())
        }))
        .unwrap()
    };
    let queue = aiq::queue::Queue::connect(&settings)
        .await
        .expect("mutual TLS connects");
    queue.ping().await.unwrap();
    let job = queue
        .enqueue(&aiq::queue::NewJob {
            kind: JobKind::LlmComplete,
            tier: Tier::Trial,
            organization_id: aiq::domain::OrganizationId::parse(ORG_A).unwrap(),
            payload: llm_payload(Tier::Trial, ORG_A, "mutual TLS"),
            job_id: None,
            delay: Duration::ZERO,
            idempotency_key: None,
            max_attempts: 0,
        })
        .await
        .unwrap();
    assert!(!job.duplicate);
    assert_eq!(queue.stats().await.unwrap().waiting["trial"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_and_the_worker_run_on_a_three_master_redis_cluster_over_tls() {
    let pki = TestPki::generate("aiq cluster CA").expect("a test CA");
    let cluster = LocalRedisCluster::start_tls("tls-cluster", &pki.server("optional"))
        .expect("a local Redis Cluster over TLS");
    let urls = cluster.urls();
    assert!(urls.starts_with("rediss://"), "{urls}");
    let ca = path(&pki.ca());
    let ctx = TestCtx::build_on(
        Some(&urls),
        None,
        &[("AIQ_REDIS_CLUSTER", "true"), ("AIQ_REDIS_CA_FILE", &ca)],
        FakeOptions::default(),
    )
    .await;
    for (tier, org) in [(Tier::EnterprisePlus, ORG_A), (Tier::Trial, ORG_B)] {
        ctx.enqueue_both_kinds(tier, org, "on a TLS cluster").await;
    }
    let worker = ctx.start_worker();
    ctx.wait_settled(Duration::from_secs(30)).await;
    worker.stop().await;
    let done = ctx
        .scalar_i64("SELECT count(*) FROM ai_processing_results WHERE status = 'completed'")
        .await;
    assert_eq!(done, 4);
    assert_eq!(ctx.queue.stats().await.unwrap().counters["done"], 4);

    // Another CA's bundle: the cluster's seed nodes are refused at once, naming the setting.
    let other = TestPki::generate("another CA").expect("a second CA");
    let vars = [
        ("AIQ_REDIS_URL", urls.clone()),
        ("AIQ_REDIS_CLUSTER", "true".to_owned()),
        ("AIQ_REDIS_CA_FILE", path(&other.ca())),
    ];
    let err = match tokio::time::timeout(TIMEOUT, Conn::connect(&redis_settings(&vars))).await {
        Err(_) => panic!("still connecting to the cluster after {TIMEOUT:?}"),
        Ok(Ok(_)) => panic!("connected to the cluster with another CA's bundle"),
        Ok(Err(e)) => e,
    };
    let message = err.to_string();
    assert!(matches!(err, ConnectError::Tls(_)), "{message}");
    assert!(message.contains("TLS verification failed"), "{message}");
    assert!(message.contains("AIQ_REDIS_CA_FILE"), "{message}");
}
