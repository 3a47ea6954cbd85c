//! The test harness: real etcd, real PostgreSQL (primaries and streaming replicas), real
//! Patroni and patroxy in-process, all on free loopback ports under one temporary directory,
//! stopped and removed on drop. Every wait has a deadline; nothing sleeps a fixed time to
//! let something happen.

#![allow(dead_code)]

use std::future::Future;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::Client as EtcdClient;
pub use patroxy::config::{Config, ListenerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub mod binary;
pub mod gate;
pub mod lab;
pub mod patroni;
pub mod spread;
pub mod tls;
pub mod writer;
pub mod zookeeper;

/// The metrics handle of a test binary that installed a recorder (`install_metrics`).
pub static METRICS: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> =
    std::sync::OnceLock::new();

/// Installs patroxy's metrics recorder in this test process, once.
pub fn install_metrics() {
    METRICS.get_or_init(|| patroxy::metrics::install().unwrap());
}

/// The metrics of this test process, as `/metrics` renders them (after `install_metrics`).
pub fn metrics_text() -> String {
    METRICS.get().expect("install_metrics first").render()
}

/// The sum of the samples of `name` whose labels contain every one of `labels`, if any.
pub fn sample(metrics: &str, name: &str, labels: &[&str]) -> Option<f64> {
    let values: Vec<f64> = metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// Installs a log subscriber once; `RUST_LOG=patroxy=debug` shows the proxy's logs.
pub fn init_logs() {
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_test_writer()
        .try_init();
}

/// A port nobody listens on right now, for a server a test starts. It lies below the
/// kernel's ephemeral range, so that no outgoing connection (a client's, a proxy's) can take
/// it as its local port before the server binds it (CI saw PostgreSQL fail to start so),
/// and this test binary never hands it out twice.
pub fn free_port() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    const LOWEST: u32 = 10_000;
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    let span = ephemeral.saturating_sub(LOWEST).max(1);
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    for _ in 0..1000 {
        let random = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        let port = (LOWEST + (random % u64::from(span)) as u32) as u16;
        if !given.contains(&port) && StdListener::bind(("127.0.0.1", port)).is_ok() {
            given.push(port);
            return port;
        }
    }
    panic!("no free port below the ephemeral range ({ephemeral})");
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.trim_ascii() == b"0")
        .unwrap_or(false)
}

/// PostgreSQL and Patroni refuse to run as root: run them as `postgres` with a clean env.
pub fn as_postgres(program: &str) -> Command {
    if is_root() {
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid=postgres",
            "--regid=postgres",
            "--init-groups",
            "--",
        ])
        .arg(program)
        .env_clear()
        .env("PATH", format!("{PG_BIN}:/usr/bin:/bin"))
        .env("HOME", "/var/lib/postgresql")
        .env("LANG", "C.UTF-8");
        c
    } else {
        let mut c = Command::new(program);
        c.env_remove("PGPASSWORD")
            .env("PATH", format!("{PG_BIN}:/usr/bin:/bin"));
        c
    }
}

fn run_ok(mut cmd: Command, what: &str) {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Sends a signal by name (`STOP`, `CONT`, `KILL`, `QUIT`, `TERM`) to a process.
pub fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .args([format!("-{sig}"), pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

/// Notes a server this test started in `$PATROXY_TEST_PIDS` (scripts/test.sh sets it), so
/// that a run that is interrupted ends exactly its own servers, nobody else's.
pub fn track(pid: u32) {
    if let Some(dir) = std::env::var_os("PATROXY_TEST_PIDS") {
        let _ = std::fs::write(Path::new(&dir).join(pid.to_string()), "");
    }
}

/// The server `pid` has been stopped and waited for.
pub fn untrack(pid: u32) {
    if let Some(dir) = std::env::var_os("PATROXY_TEST_PIDS") {
        let _ = std::fs::remove_file(Path::new(&dir).join(pid.to_string()));
    }
}

/// A temporary directory that the `postgres` user may write in, under `$PATROXY_TEST_ROOT`
/// (scripts/test.sh makes one per run) or /tmp.
pub struct TempRoot {
    dir: tempfile::TempDir,
}

impl TempRoot {
    pub fn new() -> TempRoot {
        let base = std::env::var_os("PATROXY_TEST_ROOT").unwrap_or_else(|| "/tmp".into());
        let dir = tempfile::Builder::new()
            .prefix("patroxy-test-")
            .tempdir_in(base)
            .unwrap();
        if is_root() {
            run_ok(
                {
                    let mut c = Command::new("chown");
                    c.arg("postgres:postgres").arg(dir.path());
                    c
                },
                "chown",
            );
        }
        TempRoot { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A subdirectory owned by `postgres`.
    pub fn subdir(&self, name: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        run_ok(
            {
                let mut c = as_postgres("mkdir");
                c.arg("-p").arg(&p);
                c
            },
            "mkdir",
        );
        p
    }
}

/// Polls `check` until it returns `Some`, or panics with `what` at the deadline.
pub async fn wait_for<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------
// etcd

pub struct Etcd {
    child: Option<Child>,
    pub port: u16,
    peer_port: u16,
    dir: PathBuf,
    tls: Option<EtcdTls>,
    /// The root user's password, once the test has turned authentication on.
    pub root_password: Option<String>,
}

/// TLS for etcd's client port: its certificate, and the CA client certificates must chain to.
#[derive(Clone)]
pub struct EtcdTls {
    pub ca_file: PathBuf,
    pub server: tls::Issued,
    /// The certificate the test's own client presents.
    pub client: tls::Issued,
}

impl Etcd {
    pub fn start(root: &TempRoot) -> Etcd {
        Etcd::start_with(root, None)
    }

    /// etcd serving clients over TLS only, requiring client certificates.
    pub fn start_tls(root: &TempRoot, tls: EtcdTls) -> Etcd {
        Etcd::start_with(root, Some(tls))
    }

    fn start_with(root: &TempRoot, tls: Option<EtcdTls>) -> Etcd {
        let mut e = Etcd {
            child: None,
            port: free_port(),
            peer_port: free_port(),
            dir: root.path().join("etcd"),
            tls,
            root_password: None,
        };
        e.spawn();
        e
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) {
        let client = self.url();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::File::create(self.dir.with_extension("log")).unwrap();
        let mut etcd = Command::new("etcd");
        if let Some(t) = &self.tls {
            etcd.arg("--cert-file")
                .arg(&t.server.cert_file)
                .arg("--key-file")
                .arg(&t.server.key_file)
                .arg("--trusted-ca-file")
                .arg(&t.ca_file)
                .arg("--client-cert-auth");
        }
        let child = etcd
            .args(["--name", "test"])
            .arg("--data-dir")
            .arg(&self.dir)
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &format!("test={peer}")])
            .args(["--log-level", "error"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("etcd (install etcd-server)");
        track(child.id());
        self.child = Some(child);
        let log = self.dir.with_extension("log");
        wait_ready(
            self.child.as_mut().unwrap(),
            "etcd",
            &log,
            Duration::from_secs(20),
            || std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok(),
        );
    }

    /// Stops etcd abruptly, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            untrack(c.id());
        }
    }

    /// Starts etcd again on the same ports and data.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    pub async fn client(&self) -> EtcdClient {
        let url = self.url();
        let mut options = etcd_client::ConnectOptions::new();
        if let Some(t) = &self.tls {
            let read = |p: &Path| std::fs::read(p).unwrap();
            let tls = etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(read(&t.ca_file)))
                .identity(etcd_client::Identity::from_pem(
                    read(&t.client.cert_file),
                    read(&t.client.key_file),
                ));
            options = options.with_tls(tls);
        }
        if let Some(p) = &self.root_password {
            options = options.with_user("root", p.clone());
        }
        wait_for("an etcd client", Duration::from_secs(20), || {
            let (url, options) = (url.clone(), options.clone());
            async move {
                let mut c = EtcdClient::connect([url], Some(options)).await.ok()?;
                c.status().await.ok()?;
                Some(c)
            }
        })
        .await
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits until `ready` says our own `child` serves, checking all along that the child is still
/// alive: a port answered by another test's server (the port was taken between `free_port`
/// and the bind) must not pass for ours.
fn wait_ready(
    child: &mut Child,
    what: &str,
    log: &Path,
    limit: Duration,
    mut ready: impl FnMut() -> bool,
) {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            let log = std::fs::read_to_string(log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            panic!(
                "{what} exited ({status}) before it served:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        if ready() {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what} did not start within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// etcd and one PostgreSQL primary `a`, registered as the leader of `scope`.
pub async fn one_primary(scope: &str) -> (TempRoot, Etcd, Postgres) {
    let root = TempRoot::new();
    let etcd = Etcd::start(&root);
    let pg = Postgres::primary(&root, "a");
    let mut keys = Keys::new(&etcd, scope).await;
    keys.member("a", pg.port, "primary", "running").await;
    keys.leader("a").await;
    (root, etcd, pg)
}

/// Writes Patroni-shaped keys for scope `scope` under the default namespace.
pub struct Keys {
    pub client: EtcdClient,
    pub prefix: String,
}

impl Keys {
    pub async fn new(etcd: &Etcd, scope: &str) -> Keys {
        Keys::with_prefix(etcd, &format!("/service/{scope}/")).await
    }

    /// Keys under any prefix, for example a Citus group's `/service/<scope>/<group>/`.
    pub async fn with_prefix(etcd: &Etcd, prefix: &str) -> Keys {
        Keys {
            client: etcd.client().await,
            prefix: prefix.to_owned(),
        }
    }

    pub async fn put(&mut self, key: &str, value: &str) {
        self.client
            .put(format!("{}{key}", self.prefix), value, None)
            .await
            .unwrap();
    }

    pub async fn delete(&mut self, key: &str) {
        self.client
            .delete(format!("{}{key}", self.prefix), None)
            .await
            .unwrap();
    }

    /// A Patroni 4.x member key for a server on `port`.
    pub async fn member(&mut self, name: &str, port: u16, role: &str, state: &str) {
        self.member_with(name, port, role, state, r#""xlog_location":50331648"#)
            .await;
    }

    /// A member key with extra JSON fields, e.g. `"replay_lsn":0,"tags":{"noloadbalance":true}`.
    pub async fn member_with(
        &mut self,
        name: &str,
        port: u16,
        role: &str,
        state: &str,
        extra: &str,
    ) {
        let v = format!(
            r#"{{"conn_url":"postgres://127.0.0.1:{port}/postgres","api_url":"http://127.0.0.1:1/patroni","state":"{state}","role":"{role}","version":"4.1.4","timeline":1,{extra}}}"#
        );
        self.put(&format!("members/{name}"), &v).await;
    }

    pub async fn leader(&mut self, name: &str) {
        self.put("leader", name).await;
    }
}

// ---------------------------------------------------------------------------------------
// PostgreSQL

pub struct Postgres {
    pub name: String,
    pub port: u16,
    pub data: PathBuf,
    child: Option<Child>,
}

impl Postgres {
    /// A fresh primary, initialised with trust auth on loopback.
    pub fn primary(root: &TempRoot, name: &str) -> Postgres {
        let data = root.path().join(name);
        let mut init = as_postgres(&format!("{PG_BIN}/initdb"));
        init.arg("-D").arg(&data).args([
            "-U",
            "postgres",
            "-A",
            "trust",
            "--no-sync",
            "-E",
            "UTF8",
        ]);
        run_ok(init, "initdb");
        // alice authenticates with SCRAM and bob with md5, to show auth passes end to end.
        let hba = "local all all trust\n\
                   host all alice 127.0.0.1/32 scram-sha-256\n\
                   host all bob 127.0.0.1/32 md5\n\
                   host all all 127.0.0.1/32 trust\n\
                   host replication all 127.0.0.1/32 trust\n";
        write_as_postgres(&data.join("pg_hba.conf"), hba);
        Postgres::launch(name, data)
    }

    /// A streaming replica of `primary`, cloned with pg_basebackup.
    pub fn replica_of(root: &TempRoot, name: &str, primary: &Postgres) -> Postgres {
        let data = root.path().join(name);
        let mut bb = as_postgres(&format!("{PG_BIN}/pg_basebackup"));
        bb.args([
            "-h",
            "127.0.0.1",
            "-p",
            &primary.port.to_string(),
            "-U",
            "postgres",
        ])
        .arg("-D")
        .arg(&data)
        .args(["-R", "-X", "stream", "--no-sync"]);
        run_ok(bb, "pg_basebackup");
        Postgres::launch(name, data)
    }

    /// Configures the data directory on a free port and starts the server.
    fn launch(name: &str, data: PathBuf) -> Postgres {
        let mut pg = Postgres {
            name: name.into(),
            port: free_port(),
            data,
            child: None,
        };
        pg.write_conf();
        pg.start();
        pg
    }

    fn write_conf(&self) {
        let conf = format!(
            "port = {}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             fsync = off\nwal_level = logical\nmax_wal_senders = 10\nhot_standby = on\n\
             max_connections = 100\nshared_buffers = 16MB\nlog_min_messages = warning\n",
            self.port,
            self.data.display()
        );
        write_as_postgres(&self.data.join("postgresql.auto.conf"), &{
            // Keep what pg_basebackup -R wrote (primary_conninfo), replace the rest.
            let old =
                std::fs::read_to_string(self.data.join("postgresql.auto.conf")).unwrap_or_default();
            let keep: String = old
                .lines()
                .filter(|l| l.starts_with("primary_conninfo"))
                .map(|l| format!("{l}\n"))
                .collect();
            format!("{conf}{keep}")
        });
    }

    pub fn start(&mut self) {
        let log = self.data.with_extension("log");
        let mut cmd = as_postgres(&format!("{PG_BIN}/postgres"));
        cmd.arg("-D").arg(&self.data);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("postgres");
        track(child.id());
        self.child = Some(child);
        let (port, log) = (self.port.to_string(), self.data.with_extension("log"));
        let what = format!("postgres {}", self.name);
        wait_ready(
            self.child.as_mut().unwrap(),
            &what,
            &log,
            Duration::from_secs(30),
            || {
                Command::new(format!("{PG_BIN}/pg_isready"))
                    .args(["-q", "-h", "127.0.0.1", "-p", &port])
                    .status()
                    .is_ok_and(|s| s.success())
            },
        );
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// kill -9 of the postmaster. Returns once it is reaped and its children (which exit
    /// when they notice) are gone, so that `start` finds neither its pid nor its shared
    /// memory still in use.
    pub fn crash(&mut self) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        let children = Command::new("pgrep")
            .args(["-P", &c.id().to_string()])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        signal(c.id(), "KILL");
        let _ = c.wait();
        untrack(c.id());
        // Gone, or a zombie nobody reaps (as PID 1 in some containers leaves them).
        let alive = |pid: &str| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
                stat.rsplit(')')
                    .next()
                    .is_some_and(|r| !r.trim_start().starts_with('Z'))
            })
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while children.split_whitespace().any(alive) {
            assert!(
                std::time::Instant::now() < deadline,
                "postgres {}: backends still running 30 s after the postmaster was killed",
                self.name
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Fast shutdown: sessions are terminated, the server exits cleanly.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            signal(c.id(), "INT");
            let _ = c.wait();
            untrack(c.id());
        }
    }

    /// Turns TLS on with this certificate and key, restarting the server.
    pub fn enable_tls(&mut self, cert: &Path, key: &Path) {
        let (crt, pem) = (self.data.join("server.crt"), self.data.join("server.key"));
        write_as_postgres(&crt, &std::fs::read_to_string(cert).unwrap());
        write_as_postgres(&pem, &std::fs::read_to_string(key).unwrap());
        std::fs::set_permissions(&pem, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        let conf = self.data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf).unwrap();
        text.push_str("\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
        write_as_postgres(&conf, &text);
        self.stop();
        self.start();
    }

    /// Lets `user` in only with a client certificate from `ca` whose CN is `user` (after
    /// `enable_tls`), restarting the server.
    pub fn require_client_certificate(&mut self, ca: &Path, user: &str) {
        write_as_postgres(
            &self.data.join("root.crt"),
            &std::fs::read_to_string(ca).unwrap(),
        );
        let conf = self.data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf).unwrap();
        text.push_str("\nssl_ca_file = 'root.crt'\n");
        write_as_postgres(&conf, &text);
        let hba = self.data.join("pg_hba.conf");
        let rules = std::fs::read_to_string(&hba).unwrap();
        write_as_postgres(
            &hba,
            &format!("hostssl all {user} 127.0.0.1/32 cert\n{rules}"),
        );
        self.stop();
        self.start();
    }

    pub fn promote(&self) {
        let mut c = as_postgres(&format!("{PG_BIN}/pg_ctl"));
        c.arg("promote").arg("-D").arg(&self.data).arg("-w");
        run_ok(c, "pg_ctl promote");
    }

    pub fn url(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            self.port
        )
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            signal(c.id(), "CONT");
            signal(c.id(), "QUIT");
            let _ = c.wait();
            untrack(c.id());
        }
    }
}

fn write_as_postgres(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    if is_root() {
        let _ = Command::new("chown")
            .arg("postgres:postgres")
            .arg(path)
            .status();
    }
}

// ---------------------------------------------------------------------------------------
// Clients

pub async fn connect(port: u16) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    connect_with(port, "").await.map(|(c, _)| c)
}

/// Connects with tokio-postgres; the second value resolves when the connection ends, with the
/// error that ended it (for example an unsolicited FATAL on an idle session).
pub async fn connect_with(
    port: u16,
    extra: &str,
) -> Result<
    (
        tokio_postgres::Client,
        tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
    ),
    tokio_postgres::Error,
> {
    let conn_str = format!(
        "host=127.0.0.1 port={port} user=postgres dbname=postgres connect_timeout=30 {extra}"
    );
    let (client, conn) = tokio_postgres::connect(&conn_str, tokio_postgres::NoTls).await?;
    let handle = tokio::spawn(conn);
    Ok((client, handle))
}

/// The port of the server a fresh connection through `port` reaches.
pub async fn server_port(port: u16) -> Result<i32, tokio_postgres::Error> {
    let c = connect(port).await?;
    let row = c.query_one("SELECT inet_server_port()", &[]).await?;
    Ok(row.get(0))
}

/// Waits until `query` is running (state active) on the server at `port`.
pub async fn wait_query_running(port: u16, query: &str) {
    let sql = "SELECT count(*) FROM pg_stat_activity WHERE query = $1 AND state = 'active'";
    wait_for(
        &format!("{query:?} to run on port {port}"),
        Duration::from_secs(60),
        || async move {
            let direct = connect(port).await.ok()?;
            let row = direct.query_one(sql, &[&query]).await.ok()?;
            (row.get::<_, i64>(0) >= 1).then_some(())
        },
    )
    .await;
}

/// A session's connection task: it resolves when the connection ends.
pub type ConnTask = tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>;

/// How soon a drained session ends when it is at rest: every drain test sets its drain
/// deadline well beyond this, so a session closed at the deadline instead fails the test.
pub const AT_REST: Duration = Duration::from_secs(5);

/// Waits up to `limit` for a connection to end and returns the SQLSTATE it ended with.
pub async fn ended_within(conn: ConnTask, limit: Duration) -> Option<String> {
    let r = tokio::time::timeout(limit, conn)
        .await
        .unwrap_or_else(|_| panic!("the session did not end within {limit:?}"))
        .unwrap();
    r.err().and_then(|e| sqlstate(&e))
}

/// Opens sessions through `port` until one lands on the server at `target`; returns it.
pub async fn session_on(port: u16, target: u16) -> (tokio_postgres::Client, ConnTask) {
    for _ in 0..20 {
        let (c, conn) = connect_with(port, "").await.unwrap();
        let on: i32 = c
            .query_one("SELECT inet_server_port()", &[])
            .await
            .unwrap()
            .get(0);
        if on == target as i32 {
            return (c, conn);
        }
    }
    panic!("no session through {port} reached port {target}");
}

/// Waits (30 s at most) until fresh connections through `via` reach the server on `server`.
pub async fn wait_routed(via: u16, server: u16) {
    wait_for(
        &format!("connections through {via} to reach port {server}"),
        Duration::from_secs(30),
        || async move { (server_port(via).await.ok()? == server as i32).then_some(()) },
    )
    .await;
}

/// The SQLSTATE of an error, if the server (or patroxy) sent one.
pub fn sqlstate(e: &tokio_postgres::Error) -> Option<String> {
    e.as_db_error().map(|d| d.code().code().to_owned())
}

// ---------------------------------------------------------------------------------------
// patroxy, in-process

pub struct Proxy {
    pub addr: SocketAddr,
    /// The admin endpoint, when the test's config asks for one (`admin.listen`).
    pub admin: Option<SocketAddr>,
    /// Every listener's name and address; `addr` is the first one's.
    pub listeners: Vec<(String, SocketAddr)>,
    /// Hands patroxy a new configuration, as SIGHUP does for the binary.
    pub reload: tokio::sync::mpsc::Sender<Config>,
    shutdown: CancellationToken,
    /// How long a graceful shutdown may take: the configured grace, and some.
    stop_limit: Duration,
    task: Option<tokio::task::JoinHandle<Result<(), patroxy::app::AppError>>>,
    /// Stopped (and joined) when the proxy is dropped, after `task`.
    _threads: patroxy::workers::Threads,
}

impl Proxy {
    /// Starts patroxy on a free port, watching `etcd` for `scope`. `tune` adjusts the config.
    pub async fn start(etcd: &Etcd, scope: &str, tune: impl FnOnce(&mut Config)) -> Proxy {
        init_logs();
        let mut config = Config::default();
        config.etcd.endpoints = vec![etcd.url()];
        config.etcd.watch_idle_timeout = Duration::from_secs(3);
        config.clusters[0].scope = scope.into();
        config.listeners = vec![ListenerConfig {
            listen: "127.0.0.1:0".into(),
            ..ListenerConfig::default()
        }];
        config.timeouts.connect_wait = Duration::from_secs(5);
        tune(&mut config);
        config.validate().expect("test config");
        let listeners = patroxy::listener::bind(&config).await.unwrap();
        let admin = patroxy::listener::bind_admin(&config).await.unwrap();
        let admin_addr = admin.as_ref().map(|l| l.local_addr().unwrap());
        // The recorder is process-wide: the test binary that scrapes installs it once.
        let admin = admin.map(|listener| patroxy::admin::Admin {
            listener,
            metrics: METRICS.get().cloned(),
        });
        let addr = listeners[0].listener.local_addr().unwrap();
        let named = listeners
            .iter()
            .map(|b| (b.config.name.clone(), b.listener.local_addr().unwrap()))
            .collect();
        let shutdown = CancellationToken::new();
        let stop_limit = config.timeouts.shutdown + Duration::from_secs(10);
        let (reload, configs) = tokio::sync::mpsc::channel(1);
        let reloads = patroxy::app::Reloads {
            configs,
            requests: Default::default(),
        };
        // Two relay threads, as the binary has on two cores: sessions on either, and pooled
        // connections lent across them.
        let (workers, threads) = patroxy::workers::Workers::start(2).unwrap();
        let task = tokio::spawn(patroxy::app::run(
            Arc::new(config),
            listeners,
            admin,
            reloads,
            workers,
            shutdown.clone(),
        ));
        Proxy {
            addr,
            admin: admin_addr,
            listeners: named,
            reload,
            shutdown,
            stop_limit,
            task: Some(task),
            _threads: threads,
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The port of the listener called `name`.
    pub fn port_of(&self, name: &str) -> u16 {
        let (_, addr) = self.listeners.iter().find(|(n, _)| n == name).unwrap();
        addr.port()
    }

    /// Waits (up to `limit`) for patroxy to stop by itself, as after the console's
    /// `SHUTDOWN WAIT_FOR_CLIENTS`; fails the test if it does not, panics or errs.
    pub async fn exited(mut self, limit: Duration) {
        if let Some(task) = self.task.take() {
            tokio::time::timeout(limit, task)
                .await
                .unwrap_or_else(|_| panic!("patroxy did not stop within {limit:?}"))
                .expect("patroxy's task panicked")
                .expect("patroxy ended with an error");
        }
    }

    /// Graceful shutdown, as on SIGTERM; waits until patroxy has finished, and fails the test
    /// if it hangs, panics or ends with an error.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            let limit = self.stop_limit;
            tokio::time::timeout(limit, task)
                .await
                .unwrap_or_else(|_| panic!("patroxy did not shut down within {limit:?}"))
                .expect("patroxy's task panicked")
                .expect("patroxy ended with an error");
        }
    }
}

/// A listener on a free port, for `Proxy::start`'s `tune`.
pub fn listener(name: &str, role: patroxy::policy::ListenerRole) -> ListenerConfig {
    ListenerConfig {
        name: name.into(),
        listen: "127.0.0.1:0".into(),
        role,
        ..ListenerConfig::default()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The message of an error the server (or patroxy) sent, or the error's own text.
pub fn message(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map(|d| d.message().to_owned())
        .unwrap_or_else(|| e.to_string())
}

/// A StartupMessage of protocol 3.`minor` with these parameters.
pub fn startup_message(minor: u16, params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = (3u32 << 16 | u32::from(minor)).to_be_bytes().to_vec();
    for (k, v) in params {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut out = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    out.extend_from_slice(&body);
    out
}

/// The test process's resident memory now, in KiB.
pub fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// The admin endpoint's `/topology`, if it answers.
pub async fn topology(admin: SocketAddr) -> Option<serde_json::Value> {
    let mut s = TcpStream::connect(admin).await.ok()?;
    s.write_all(b"GET /topology HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).await.ok()?;
    serde_json::from_str(out.split_once("\r\n\r\n")?.1).ok()
}

/// Waits until each of `proxies` (started with an admin endpoint) has read `n` cancel
/// routes from the reports, its own among them: a cancel sent through any of them then
/// reaches the instance that issued its key.
pub async fn wait_peers(proxies: &[&Proxy], n: usize) {
    for p in proxies {
        let admin = p
            .admin
            .expect("wait_peers needs the proxy's admin endpoint");
        wait_for(
            "the peers' cancel routes",
            Duration::from_secs(30),
            || async move {
                let v = topology(admin).await?;
                (v["peers"].as_array()?.len() == n).then_some(())
            },
        )
        .await;
    }
}
