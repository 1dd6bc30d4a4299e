//! Throw-away local servers for the demo and the test harness: a real `redis-server` and a real
//! PostgreSQL, each on a free loopback port with its own data folder.
//!
//! Every child is started with a parent-death signal, so a crashed or killed parent never leaves a
//! server behind. PostgreSQL refuses to run as root, so when we are root it runs as the `postgres`
//! user (or `nobody`) and its folders are handed to that user.
//!
//! For the TLS tests, [`TestPki`] makes a CA and certificates with the `openssl` command, and each
//! server can start with TLS only ([`LocalRedis::start_tls`], [`LocalRedisCluster::start_tls`],
//! [`LocalPostgres::start_tls`]).

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// A free TCP port on 127.0.0.1, as the kernel hands it out. Another process may take it before
/// we bind it, so callers retry a start that fails.
pub fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding a probe socket")?;
    Ok(listener.local_addr()?.port())
}

/// Asks the kernel to send `signal` to the child when the thread that spawned it exits.
pub fn die_with_parent(cmd: &mut Command, signal: libc::c_int) {
    // SAFETY: prctl is async-signal-safe and touches only the calling (child) process.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, signal as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

pub(crate) fn find_binary(name: &str) -> Option<PathBuf> {
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return Some(candidate);
            }
        }
    }
    // Debian keeps PostgreSQL's server binaries out of PATH, one folder per major version.
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let v = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            Some((v, e.path().join("bin").join(name)))
        })
        .filter(|(_, p)| p.is_file())
        .collect();
    versions.sort();
    versions.pop().map(|(_, p)| p)
}

fn wait_for_port(
    port: u16,
    child: &mut Child,
    what: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!("{what} exited during start-up with {status}");
        }
        if Instant::now() > deadline {
            bail!("{what} did not listen on port {port} within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stop_child(child: &mut Child, signal: libc::c_int) {
    if let Ok(None) = child.try_wait() {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(child.id() as libc::pid_t, signal);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// A folder for one run's servers. Its name carries our pid, so a later run can remove the
/// folders of runs that died without cleaning up.
pub(crate) fn run_folder(label: &str) -> anyhow::Result<PathBuf> {
    let base = std::env::temp_dir();
    let prefix = format!("aiq-{label}-");
    if let Ok(entries) = std::fs::read_dir(&base) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(rest) = name.strip_prefix(&prefix) {
                // Only a pid: `aiq-it-` must not take `aiq-it-cluster-`, another label's folder.
                let pid = rest.split('-').next().unwrap_or("");
                if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
    }
    let dir = base.join(format!(
        "{prefix}{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// A running `redis-server`, stopped when dropped.
pub struct LocalRedis {
    child: Child,
    port: u16,
    dir: PathBuf,
    /// The binary and the extra arguments it was started with, for [`LocalRedis::restart`].
    bin: PathBuf,
    extra: Vec<String>,
    /// Set when it serves TLS only, on `port`.
    tls: Option<ServerTls>,
}

/// A throw-away server's TLS: its certificate and key (of a [`TestPki`]) and the CA it verifies
/// clients against. A [`LocalRedis`] with it listens on TLS only (`--port 0 --tls-port`).
#[derive(Debug, Clone)]
pub struct ServerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
    /// Redis's `tls-auth-clients`: `yes` (a client must present a certificate the CA signed),
    /// `optional` or `no`. PostgreSQL ignores it.
    pub auth_clients: &'static str,
}

impl ServerTls {
    /// `redis-server` arguments for TLS on `port` (they come last, so they override `--port`).
    fn args(&self, port: u16) -> Vec<String> {
        let mut args: Vec<String> = ["--port", "0", "--tls-port"]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        args.push(port.to_string());
        for (flag, path) in [
            ("--tls-cert-file", &self.cert),
            ("--tls-key-file", &self.key),
            ("--tls-ca-cert-file", &self.ca),
        ] {
            args.push(flag.to_owned());
            args.push(path.display().to_string());
        }
        args.push("--tls-auth-clients".to_owned());
        args.push(self.auth_clients.to_owned());
        args
    }
}

/// The `redis-server` command line of a [`LocalRedis`]: loopback only, no snapshots, no
/// append-only file unless `extra` turns it on (a later argument overrides an earlier one), and
/// with `tls`, TLS only.
fn redis_command(
    bin: &Path,
    port: u16,
    dir: &Path,
    extra: &[String],
    tls: Option<&ServerTls>,
) -> Command {
    let mut cmd = Command::new(bin);
    cmd.args([
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
    ])
    .arg(dir)
    .args(extra)
    .args(tls.map(|t| t.args(port)).unwrap_or_default())
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    die_with_parent(&mut cmd, libc::SIGKILL);
    cmd
}

impl LocalRedis {
    pub fn start(label: &str) -> anyhow::Result<Self> {
        Self::start_with(label, &[])
    }

    /// Starts with extra `redis-server` arguments.
    pub fn start_with(label: &str, extra: &[&str]) -> anyhow::Result<Self> {
        Self::launch(label, extra, None)
    }

    /// Starts serving TLS only; [`LocalRedis::url`] is then a `rediss://` URL.
    pub fn start_tls(label: &str, tls: &ServerTls) -> anyhow::Result<Self> {
        Self::launch(label, &[], Some(tls.clone()))
    }

    fn launch(label: &str, extra: &[&str], tls: Option<ServerTls>) -> anyhow::Result<Self> {
        let bin = find_binary("redis-server").context(
            "redis-server was not found; install it with `apt-get install -y redis-server` \
             (scripts/demo and scripts/test do this for you)",
        )?;
        let dir = run_folder(label)?;
        let extra: Vec<String> = extra.iter().map(|a| (*a).to_owned()).collect();
        let mut last_err = None;
        for _ in 0..5 {
            let port = free_port()?;
            let mut child = redis_command(&bin, port, &dir, &extra, tls.as_ref())
                .spawn()
                .context("starting redis-server")?;
            match wait_for_port(port, &mut child, "redis-server", Duration::from_secs(10)) {
                Ok(()) => {
                    return Ok(Self {
                        child,
                        port,
                        dir,
                        bin,
                        extra,
                        tls,
                    });
                }
                Err(e) => {
                    stop_child(&mut child, libc::SIGKILL);
                    last_err = Some(e);
                }
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow::anyhow!("redis-server did not start")))
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://127.0.0.1:{}/", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills the server with SIGKILL, as a crash would, and waits until it is gone. What it had
    /// not written to its data folder (an append-only file, when `--appendonly yes` was given) is
    /// lost. Clients see their connections reset.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        if self.child.try_wait()?.is_none() {
            self.child.kill().context("killing redis-server")?;
        }
        self.child
            .wait()
            .context("waiting for redis-server to exit")?;
        Ok(())
    }

    /// Starts the server again on the same port, with the same folder and arguments, so it
    /// reloads what it persisted there; returns once it listens. Stops a running one first.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill()?;
        let mut child = redis_command(
            &self.bin,
            self.port,
            &self.dir,
            &self.extra,
            self.tls.as_ref(),
        )
        .spawn()
        .context("restarting redis-server")?;
        // It listens before it has loaded its data; until then it answers LOADING errors.
        if let Err(e) = wait_for_port(
            self.port,
            &mut child,
            "the restarted redis-server",
            Duration::from_secs(30),
        ) {
            stop_child(&mut child, libc::SIGKILL);
            return Err(e.context(format!("restarting redis-server on port {}", self.port)));
        }
        self.child = child;
        Ok(())
    }
}

impl Drop for LocalRedis {
    fn drop(&mut self) {
        stop_child(&mut self.child, libc::SIGTERM);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Redis Cluster of three masters (no replicas), each a [`LocalRedis`].
pub struct LocalRedisCluster {
    nodes: Vec<LocalRedis>,
}

impl LocalRedisCluster {
    pub fn start(label: &str) -> anyhow::Result<Self> {
        Self::launch(label, None)
    }

    /// A cluster that speaks TLS only, between its nodes too (`--tls-cluster yes`).
    pub fn start_tls(label: &str, tls: &ServerTls) -> anyhow::Result<Self> {
        Self::launch(label, Some(tls))
    }

    fn launch(label: &str, tls: Option<&ServerTls>) -> anyhow::Result<Self> {
        let mut extra = vec![
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            "5000",
        ];
        if tls.is_some() {
            extra.extend(["--tls-cluster", "yes", "--tls-replication", "yes"]);
        }
        let nodes = (0..3)
            .map(|_| LocalRedis::launch(label, &extra, tls.cloned()))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let cli = find_binary("redis-cli")
            .context("redis-cli was not found (Debian package redis-tools)")?;
        // redis-cli over TLS, as a client of the nodes' CA.
        let cli_tls: Vec<String> = match tls {
            Some(t) => vec![
                "--tls".into(),
                "--cacert".into(),
                t.ca.display().to_string(),
            ],
            None => Vec::new(),
        };
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port()))
            .collect();
        let out = Command::new(&cli)
            .args(&cli_tls)
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .context("running redis-cli --cluster create")?;
        if !out.status.success() {
            bail!(
                "redis-cli --cluster create failed: {}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        for n in &nodes {
            loop {
                let info = Command::new(&cli)
                    .args(&cli_tls)
                    .args(["-p", &n.port().to_string(), "cluster", "info"])
                    .output()
                    .context("running redis-cli cluster info")?;
                if String::from_utf8_lossy(&info.stdout).contains("cluster_state:ok") {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("the Redis Cluster did not reach cluster_state:ok within 30s");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(Self { nodes })
    }

    /// The seed node URLs, comma-separated, as `AIQ_REDIS_URL` takes them.
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(LocalRedis::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(LocalRedis::port).collect()
    }
}

/// A running PostgreSQL cluster with trust authentication on loopback, stopped when dropped.
pub struct LocalPostgres {
    child: Child,
    port: u16,
    dir: PathBuf,
    /// How it was started, for [`LocalPostgres::start_again`].
    launch: PostgresLaunch,
}

/// What starting the `postgres` server of a [`LocalPostgres`] takes.
struct PostgresLaunch {
    initdb: PathBuf,
    postgres: PathBuf,
    data: PathBuf,
    sockets: PathBuf,
    /// The uid and gid it runs as, when we are root.
    as_user: Option<(u32, u32)>,
    /// With TLS: the server's certificate and key (copied where the server's user owns them).
    tls: Option<(PathBuf, PathBuf)>,
}

impl PostgresLaunch {
    /// The server's command line on `port`: loopback only, durability traded for speed.
    fn command(&self, port: u16) -> Command {
        let mut cmd = Command::new(&self.postgres);
        cmd.arg("-D")
            .arg(&self.data)
            .args(["-p", &port.to_string(), "-k"])
            .arg(&self.sockets)
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "max_connections=400",
                "-c",
                "shared_buffers=64MB",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some((cert, key)) = &self.tls {
            cmd.args(["-c", "ssl=on", "-c"])
                .arg(format!("ssl_cert_file={}", cert.display()))
                .arg("-c")
                .arg(format!("ssl_key_file={}", key.display()));
        }
        if let Some((uid, gid)) = self.as_user {
            cmd.uid(uid).gid(gid);
        }
        // SIGQUIT is PostgreSQL's immediate shutdown: the postmaster takes its backends down too.
        die_with_parent(&mut cmd, libc::SIGQUIT);
        cmd
    }
}

/// An open port is not enough: PostgreSQL refuses connections while it starts up. `pg_isready`
/// (beside `initdb`) answers 0 once it accepts them.
fn wait_until_accepting(initdb: &Path, port: u16, child: &mut Child) -> anyhow::Result<()> {
    let pg_isready = initdb.with_file_name("pg_isready");
    let pg_isready = if pg_isready.is_file() {
        pg_isready
    } else {
        find_binary("pg_isready").context("PostgreSQL's pg_isready was not found")?
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = Command::new(&pg_isready)
            .args([
                "-q",
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-U",
                "postgres",
            ])
            .status()
            .context("running pg_isready")?;
        if status.success() {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!("postgres exited during start-up with {status}");
        }
        if Instant::now() > deadline {
            bail!("postgres did not accept connections on port {port} within 30s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The uid and gid to run PostgreSQL as when we are root.
fn unprivileged_user() -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    let find = |user: &str| {
        passwd.lines().find_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            (f.len() > 3 && f[0] == user).then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))?
        })
    };
    find("postgres").or_else(|| find("nobody"))
}

impl LocalPostgres {
    pub fn start(label: &str) -> anyhow::Result<Self> {
        Self::launch(label, None)
    }

    /// Starts with `ssl=on` and the server certificate of `tls` (clients may still connect
    /// without TLS: whether they must is their `sslmode`).
    pub fn start_tls(label: &str, tls: &ServerTls) -> anyhow::Result<Self> {
        Self::launch(label, Some(tls))
    }

    fn launch(label: &str, tls: Option<&ServerTls>) -> anyhow::Result<Self> {
        let initdb = find_binary("initdb").context(
            "PostgreSQL's initdb was not found; install the server with `apt-get install -y postgresql` \
             (scripts/demo and scripts/test do this for you)",
        )?;
        let postgres = initdb.with_file_name("postgres");
        let postgres = if postgres.is_file() {
            postgres
        } else {
            find_binary("postgres").context("PostgreSQL's postgres binary was not found")?
        };
        let dir = run_folder(label)?;
        let data = dir.join("data");
        let sockets = dir.join("run");
        std::fs::create_dir_all(&data)?;
        std::fs::create_dir_all(&sockets)?;
        // SAFETY: geteuid has no preconditions.
        let as_user = if unsafe { libc::geteuid() } == 0 {
            let (uid, gid) = unprivileged_user()
                .context("running as root and found neither a `postgres` nor a `nobody` user")?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
            for d in [&data, &sockets] {
                std::os::unix::fs::chown(d, Some(uid), Some(gid))?;
            }
            Some((uid, gid))
        } else {
            None
        };
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700))?;

        let mut cmd = Command::new(&initdb);
        cmd.arg("-D")
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
                "--locale=C",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some((uid, gid)) = as_user {
            cmd.uid(uid).gid(gid);
        }
        let out = cmd.output().context("running initdb")?;
        if !out.status.success() {
            bail!("initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        // PostgreSQL refuses a key file that others can read or that its user does not own.
        let tls = match tls {
            Some(t) => {
                let tls_dir = dir.join("tls");
                std::fs::create_dir_all(&tls_dir)?;
                let (cert, key) = (tls_dir.join("server.pem"), tls_dir.join("server.key"));
                std::fs::copy(&t.cert, &cert).context("copying the server certificate")?;
                std::fs::copy(&t.key, &key).context("copying the server key")?;
                std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))?;
                if let Some((uid, gid)) = as_user {
                    for p in [&tls_dir, &cert, &key] {
                        std::os::unix::fs::chown(p, Some(uid), Some(gid))?;
                    }
                }
                Some((cert, key))
            }
            None => None,
        };

        let launch = PostgresLaunch {
            initdb,
            postgres,
            data,
            sockets,
            as_user,
            tls,
        };
        let mut last_err = None;
        for _ in 0..5 {
            let port = free_port()?;
            let mut child = launch.command(port).spawn().context("starting postgres")?;
            let ready = wait_for_port(port, &mut child, "postgres", Duration::from_secs(30))
                .and_then(|()| wait_until_accepting(&launch.initdb, port, &mut child));
            match ready {
                Ok(()) => {
                    return Ok(Self {
                        child,
                        port,
                        dir,
                        launch,
                    });
                }
                Err(e) => {
                    stop_child(&mut child, libc::SIGQUIT);
                    last_err = Some(e);
                }
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow::anyhow!("postgres did not start")))
    }

    /// The URL of database `db` on this server.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops the server with a fast shutdown (SIGINT: clients are disconnected, then it exits
    /// cleanly) and waits until it is gone. Its data folder stays, for [`Self::start_again`].
    pub fn stop(&mut self) -> anyhow::Result<()> {
        stop_child(&mut self.child, libc::SIGINT);
        let status = self
            .child
            .try_wait()
            .context("waiting for postgres to exit")?;
        if status.is_none() {
            bail!("postgres did not stop");
        }
        Ok(())
    }

    /// Starts the server again on the same data folder and port; returns once it accepts
    /// connections. Stops a running one first.
    pub fn start_again(&mut self) -> anyhow::Result<()> {
        self.stop()?;
        let mut child = self
            .launch
            .command(self.port)
            .spawn()
            .context("starting postgres again")?;
        let ready = wait_for_port(self.port, &mut child, "postgres", Duration::from_secs(30))
            .and_then(|()| wait_until_accepting(&self.launch.initdb, self.port, &mut child));
        if let Err(e) = ready {
            stop_child(&mut child, libc::SIGQUIT);
            return Err(e.context(format!("starting postgres again on port {}", self.port)));
        }
        self.child = child;
        Ok(())
    }
}

impl Drop for LocalPostgres {
    fn drop(&mut self) {
        // SIGINT is PostgreSQL's fast shutdown: clients are disconnected, then it exits cleanly.
        stop_child(&mut self.child, libc::SIGINT);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A certificate authority for tests, made with the `openssl` command in a folder of its own
/// (removed when dropped): the CA, a server certificate for `127.0.0.1` and `localhost` (both
/// as subjectAltName; also good as a client certificate, which Redis Cluster nodes present to
/// each other), and a client certificate, each with its key. EC P-256, valid two days.
pub struct TestPki {
    dir: PathBuf,
}

impl Drop for TestPki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl TestPki {
    /// Makes a CA named `name` and its two certificates.
    pub fn generate(name: &str) -> anyhow::Result<Self> {
        let openssl = find_binary("openssl").context(
            "the openssl command was not found; install it with `apt-get install -y openssl` \
             (scripts/ensure-deps does this for you)",
        )?;
        // A run folder: one a killed run left is removed by the next (see `run_folder`).
        let dir = run_folder("pki")?;
        let d = dir.as_path();
        let run = |args: &[&str]| -> anyhow::Result<()> {
            let out = Command::new(&openssl)
                .args(args)
                .current_dir(d)
                .env_remove("OPENSSL_CONF")
                .stdin(Stdio::null())
                .output()
                .context("running openssl")?;
            if !out.status.success() {
                bail!(
                    "openssl {} failed: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            Ok(())
        };
        // A configuration of our own, so the system's openssl.cnf changes nothing.
        std::fs::write(
            d.join("pki.cnf"),
            format!(
                "[req]\ndistinguished_name = dn\nprompt = no\n[dn]\nCN = {name}\n\
                 [ca]\nbasicConstraints = critical,CA:TRUE\nkeyUsage = critical,keyCertSign,cRLSign\n\
                 subjectKeyIdentifier = hash\n\
                 [server]\nbasicConstraints = CA:FALSE\nkeyUsage = critical,digitalSignature\n\
                 extendedKeyUsage = serverAuth,clientAuth\nsubjectAltName = IP:127.0.0.1,DNS:localhost\n\
                 [client]\nbasicConstraints = CA:FALSE\nkeyUsage = critical,digitalSignature\n\
                 extendedKeyUsage = clientAuth\n"
            ),
        )?;
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let mut ca = vec!["req", "-x509", "-config", "pki.cnf", "-extensions", "ca"];
        ca.extend(ec);
        ca.extend(["-keyout", "ca.key", "-out", "ca.pem", "-days", "2"]);
        run(&ca)?;
        for (who, cn) in [("server", "localhost"), ("client", "aiq")] {
            let (key, csr, pem) = (
                format!("{who}.key"),
                format!("{who}.csr"),
                format!("{who}.pem"),
            );
            let subject = format!("/CN={cn}");
            let mut req = vec!["req", "-config", "pki.cnf", "-subj", &subject];
            req.extend(ec);
            req.extend(["-keyout", &key, "-out", &csr]);
            run(&req)?;
            run(&[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                "pki.cnf",
                "-extensions",
                who,
                "-out",
                &pem,
            ])?;
        }
        Ok(Self { dir })
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    pub fn client_cert(&self) -> PathBuf {
        self.dir.join("client.pem")
    }

    pub fn client_key(&self) -> PathBuf {
        self.dir.join("client.key")
    }

    /// The server side, for [`LocalRedis::start_tls`] and [`LocalPostgres::start_tls`].
    pub fn server(&self, auth_clients: &'static str) -> ServerTls {
        ServerTls {
            cert: self.dir.join("server.pem"),
            key: self.dir.join("server.key"),
            ca: self.ca(),
            auth_clients,
        }
    }
}
