//! SIGHUP on the real binary: a listener added, a route changed (its old sessions that no
//! longer fit are drained), listeners removed and the TLS certificate replaced, while a session
//! that still fits stays up; a broken file is refused and the running configuration stays in
//! force. In process: limits and allow-lists changed by reload.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::binary::Binary;
use common::tls::{Issued, TestCa};
use common::*;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;

/// The leaf certificate a TLS listener shows now, as DER.
async fn served_certificate(ca: &TestCa, port: u16) -> Vec<u8> {
    let config = ca.client_config(&[patroxy::tls::ALPN_POSTGRESQL]);
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let tls = connector.connect(name, tcp).await.unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

fn der(cert: &Issued) -> Vec<u8> {
    CertificateDer::from_pem_file(&cert.cert_file)
        .unwrap()
        .to_vec()
}

/// Puts a certificate where the configuration says patroxy's is.
fn install(cert: &Issued, dir: &Path) {
    std::fs::copy(&cert.cert_file, dir.join("patroxy.crt")).unwrap();
    std::fs::copy(&cert.key_file, dir.join("patroxy.key")).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_listeners_routes_and_certificates_while_sessions_stay() {
    let root = TempRoot::new();
    let etcd = Etcd::start(&root);
    let primary = Postgres::primary(&root, "a");
    let replica = Postgres::replica_of(&root, "r", &primary);
    let mut keys = Keys::new(&etcd, "reload").await;
    keys.member("a", primary.port, "primary", "running").await;
    keys.member("r", replica.port, "replica", "running").await;
    keys.leader("a").await;

    let dir = root.subdir("conf");
    let ca = TestCa::new(&dir, "ca");
    let (first, second) = (
        ca.issue("first", &["127.0.0.1"]),
        ca.issue("second", &["127.0.0.1"]),
    );
    install(&first, &dir);
    let (main, rw) = (free_port(), free_port());
    let file = dir.join("patroxy.toml");
    let write = |listeners: &str| {
        let text = format!(
            "[etcd]\nendpoints = [\"{}\"]\n[cluster]\nscope = \"reload\"\n\
             [tls]\ncert_file = \"{d}/patroxy.crt\"\nkey_file = \"{d}/patroxy.key\"\n{listeners}",
            etcd.url(),
            d = dir.display()
        );
        std::fs::write(&file, text).unwrap();
    };
    let listener = |name: &str, port: u16, role: &str| {
        format!(
            "[[listener]]\nname = \"{name}\"\nlisten = \"127.0.0.1:{port}\"\nrole = \"{role}\"\n"
        )
    };
    let reads = free_port();
    write(&format!(
        "{}{}",
        listener("main", main, "primary"),
        listener("reads", reads, "replica")
    ));
    let proxy = Binary::start(&["run", "--config", file.to_str().unwrap()]);
    wait_routed(main, primary.port).await;
    wait_routed(reads, replica.port).await;
    assert_eq!(served_certificate(&ca, main).await, der(&first));
    // Sessions opened before the reload: one over TLS on the primary, one on the replica.
    let tls = tokio_postgres_rustls::MakeRustlsConnect::new(ca.client_config(&[]));
    let conn_str =
        format!("host=127.0.0.1 port={main} user=postgres dbname=postgres sslmode=require");
    let (old, conn) = tokio_postgres::connect(&conn_str, tls).await.unwrap();
    let old_conn = tokio::spawn(conn);
    let (old_read, old_read_conn) = session_on(reads, replica.port).await;

    // `reads` now routes to the primary, a listener is added, the certificate is replaced.
    install(&second, &dir);
    write(&format!(
        "{}{}{}",
        listener("main", main, "primary"),
        listener("reads", reads, "primary"),
        listener("rw", rw, "primary")
    ));
    signal(proxy.pid(), "HUP");
    proxy.wait_log("configuration reloaded", 1).await;
    assert_eq!(server_port(reads).await.unwrap(), primary.port as i32);
    assert_eq!(server_port(rw).await.unwrap(), primary.port as i32);
    assert_eq!(served_certificate(&ca, main).await, der(&second));
    assert_eq!(served_certificate(&ca, rw).await, der(&second));
    // The read session no longer fits its listener's rules: drained like on a topology
    // change. The TLS session on the primary still fits and stays.
    assert_eq!(
        ended_within(old_read_conn, AT_REST).await.as_deref(),
        Some("57P01")
    );
    drop(old_read);
    let row = old.query_one("SELECT inet_server_port()", &[]).await;
    assert_eq!(row.unwrap().get::<_, i32>(0), primary.port as i32);

    // A broken file is refused; everything goes on as before.
    std::fs::write(&file, "[[listener]\nthis is not toml").unwrap();
    signal(proxy.pid(), "HUP");
    proxy.wait_log("configuration reload refused", 1).await;
    assert_eq!(server_port(rw).await.unwrap(), primary.port as i32);
    assert_eq!(server_port(reads).await.unwrap(), primary.port as i32);
    // So is a valid file whose certificate cannot be read.
    std::fs::write(dir.join("patroxy.key"), "not a key").unwrap();
    write(&listener("main", main, "replica"));
    signal(proxy.pid(), "HUP");
    proxy.wait_log("configuration reload refused", 2).await;
    assert_eq!(server_port(rw).await.unwrap(), primary.port as i32);
    assert_eq!(server_port(main).await.unwrap(), primary.port as i32);
    install(&second, &dir);

    // rw and reads are removed: they stop accepting; main goes on.
    write(&listener("main", main, "primary"));
    signal(proxy.pid(), "HUP");
    proxy.wait_log("configuration reloaded", 2).await;
    for port in [rw, reads] {
        wait_for(
            "a removed listener to stop accepting",
            Duration::from_secs(10),
            || async {
                TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_err()
                    .then_some(())
            },
        )
        .await;
    }
    assert_eq!(server_port(main).await.unwrap(), primary.port as i32);
    // A simple query, so that no statement is left to close (a request the shutdown's FATAL
    // would answer instead of ending the connection with it).
    old.batch_execute("SELECT 1")
        .await
        .expect("the old session stayed up");

    let (status, log) = proxy.stop().await;
    assert!(status.success(), "{log}");
    // The shutdown ended the old TLS session the clean way.
    let ended = old_conn.await.unwrap();
    assert_eq!(
        ended.err().and_then(|e| sqlstate(&e)).as_deref(),
        Some("57P01")
    );
    assert!(log.contains("added [rw]"), "{log}");
    assert!(log.contains("removed [reads, rw]"), "{log}");
}

/// Waits until a new client through `port` is refused with `sqlstate` (a reload applies).
async fn refused_with(port: u16, sqlstate: &str) -> tokio_postgres::Error {
    let what = format!("a refusal with {sqlstate}");
    wait_for(&what, Duration::from_secs(10), || async {
        let e = connect(port).await.err()?;
        (common::sqlstate(&e).as_deref() == Some(sqlstate)).then_some(e)
    })
    .await
}

/// Each of these sessions still answers.
async fn answer(sessions: &[&tokio_postgres::Client]) {
    for c in sessions {
        let row = c.query_one("SELECT 1", &[]).await.unwrap();
        assert_eq!(row.get::<_, i32>(0), 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_changes_limits_and_allow_lists_without_cutting_sessions() {
    let root = TempRoot::new();
    let etcd = Etcd::start(&root);
    let pg = Postgres::primary(&root, "a");
    let mut keys = Keys::new(&etcd, "limits").await;
    keys.member("a", pg.port, "primary", "running").await;
    keys.leader("a").await;
    let mut config = None;
    let proxy = Proxy::start(&etcd, "limits", |cfg| config = Some(cfg.clone())).await;
    let mut config = config.unwrap();
    // Reloads keep the listener's address: pin it to the port it got.
    config.listeners[0].listen = format!("127.0.0.1:{}", proxy.port());
    wait_routed(proxy.port(), pg.port).await;
    let (first, _c1) = connect_with(proxy.port(), "").await.unwrap();
    let (second, _c2) = connect_with(proxy.port(), "").await.unwrap();

    let port = proxy.port();
    // A limit below what is open: both sessions stay, a new client gets 53300.
    config.limits.max_client_connections = 1;
    proxy.reload.send(config.clone()).await.unwrap();
    refused_with(port, "53300").await;
    answer(&[&first, &second]).await;
    // An allow-list that leaves loopback out: refused with 28000.
    config.limits.max_client_connections = 100;
    config.listeners[0].allow = vec!["10.0.0.0/8".parse().unwrap()];
    proxy.reload.send(config.clone()).await.unwrap();
    let e = refused_with(port, "28000").await;
    assert!(message(&e).contains("not allowed"), "{e}");
    // Back to open: new clients are served.
    config.listeners[0].allow.clear();
    proxy.reload.send(config.clone()).await.unwrap();
    wait_for("clients served again", Duration::from_secs(10), || async {
        connect(port).await.ok()
    })
    .await;
    // The listener gains a limit of its own: its two open sessions already count against it.
    config.listeners[0].max_client_connections = 2;
    proxy.reload.send(config).await.unwrap();
    refused_with(port, "53300").await;
    answer(&[&first, &second]).await;
    proxy.stop().await;
}

/// The routing report under `key`, if etcd has it.
async fn report_at(etcd: &Etcd, key: &str) -> Option<patroxy::view::Report> {
    let mut client = etcd.client().await;
    let resp = client.get(key, None).await.unwrap();
    let kv = resp.kvs().first()?;
    Some(serde_json::from_slice(kv.value()).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_moves_the_routing_report_as_report_says() {
    let root = TempRoot::new();
    let etcd = Etcd::start(&root);
    let pg = Postgres::primary(&root, "a");
    let mut keys = Keys::new(&etcd, "moved").await;
    keys.member("a", pg.port, "primary", "running").await;
    keys.leader("a").await;
    let mut config = None;
    let proxy = Proxy::start(&etcd, "moved", |cfg| {
        cfg.report.instance = Some("i1".into());
        config = Some(cfg.clone());
    })
    .await;
    let mut config = config.unwrap();
    config.listeners[0].listen = format!("127.0.0.1:{}", proxy.port());
    let limit = Duration::from_secs(20);
    let first = wait_for("the first report", limit, || async {
        report_at(&etcd, "/patroxy/moved/i1").await
    })
    .await;
    assert_eq!(first.leader.as_deref(), Some("a"));

    // A new prefix and instance name: the report moves, the old key goes at once.
    config.report.prefix = "/elsewhere".into();
    config.report.instance = Some("i2".into());
    proxy.reload.send(config.clone()).await.unwrap();
    let moved = wait_for("the report at its new key", limit, || async {
        report_at(&etcd, "/elsewhere/moved/i2").await
    })
    .await;
    assert_eq!(moved.instance, "i2");
    wait_for("the old report to go", limit, || async {
        report_at(&etcd, "/patroxy/moved/i1")
            .await
            .is_none()
            .then_some(())
    })
    .await;
    // Reports turned off: the key goes.
    config.report.enabled = false;
    proxy.reload.send(config).await.unwrap();
    wait_for("the report to go", limit, || async {
        report_at(&etcd, "/elsewhere/moved/i2")
            .await
            .is_none()
            .then_some(())
    })
    .await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_stuck_on_a_slow_file_stalls_no_session() {
    let root = TempRoot::new();
    let etcd = Etcd::start(&root);
    let pg = Postgres::primary(&root, "a");
    let mut keys = Keys::new(&etcd, "slowdisk").await;
    keys.member("a", pg.port, "primary", "running").await;
    keys.leader("a").await;
    let dir = root.subdir("conf");
    let file = dir.join("patroxy.toml");
    let port = free_port();
    let text = format!(
        "[etcd]\nendpoints = [\"{}\"]\n[cluster]\nscope = \"slowdisk\"\n[runtime]\nworker_threads = 1\n\
         [[listener]]\nname = \"main\"\nlisten = \"127.0.0.1:{port}\"\n",
        etcd.url()
    );
    std::fs::write(&file, &text).unwrap();
    // One worker thread: anything blocking on the runtime stalls every session.
    let proxy = Binary::start(&["run", "--config", file.to_str().unwrap()]);
    wait_routed(port, pg.port).await;
    let (open, _conn) = connect_with(port, "").await.unwrap();

    // The file becomes a FIFO: reading it blocks until someone writes, like a hung disk.
    std::fs::remove_file(&file).unwrap();
    let made = std::process::Command::new("mkfifo")
        .arg(&file)
        .status()
        .unwrap();
    assert!(made.success());
    signal(proxy.pid(), "HUP");
    proxy.wait_log("SIGHUP: reloading", 1).await;
    // The reload waits on its file; sessions, old and new, do not.
    let row = tokio::time::timeout(AT_REST, open.query_one("SELECT 1", &[]))
        .await
        .expect("a session stalled behind the reload")
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 1);
    assert_eq!(server_port(port).await.unwrap(), pg.port as i32);

    // The disk answers at last: the reload goes through.
    let fifo = file.clone();
    std::thread::spawn(move || std::fs::write(fifo, text));
    proxy.wait_log("configuration reloaded", 1).await;
    let (status, log) = proxy.stop().await;
    assert!(status.success(), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_on_the_admin_console_reads_the_file_again() {
    let root = TempRoot::new();
    let etcd = Etcd::start(&root);
    let pg = Postgres::primary(&root, "a");
    let mut keys = Keys::new(&etcd, "consolereload").await;
    keys.member("a", pg.port, "primary", "running").await;
    keys.leader("a").await;
    let dir = root.subdir("conf");
    let file = dir.join("patroxy.toml");
    let (main, added) = (free_port(), free_port());
    let write = |extra: &str| {
        let text = format!(
            "[etcd]\nendpoints = [\"{}\"]\n[cluster]\nscope = \"consolereload\"\n\
             [auth]\ntrust = [\"127.0.0.1/32\"]\nconsole_trust = [\"127.0.0.1/32\"]\nadmin_users = [\"postgres\"]\n\
             [[listener]]\nname = \"main\"\nlisten = \"127.0.0.1:{main}\"\n{extra}",
            etcd.url()
        );
        std::fs::write(&file, text).unwrap();
    };
    write("");
    let proxy = Binary::start(&["run", "--config", file.to_str().unwrap()]);
    wait_routed(main, pg.port).await;
    write(&format!(
        "[[listener]]\nname = \"added\"\nlisten = \"127.0.0.1:{added}\"\n"
    ));
    // RELOAD, as PgBouncer's console says it, over the PostgreSQL protocol.
    let console = format!("host=127.0.0.1 port={main} user=postgres dbname=pgbouncer");
    let (admin, conn) = tokio_postgres::connect(&console, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    admin.simple_query("RELOAD").await.unwrap();
    proxy.wait_log("configuration reloaded", 1).await;
    wait_routed(added, pg.port).await;
    drop(proxy);
}
