//! TLS on both sides, with real clients (psql, tokio-postgres with rustls, a raw rustls
//! client for direct TLS) and real PostgreSQL servers with certificates from a test CA.

mod common;

use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use common::tls::{Issued, TestCa};
use common::*;
use futures_util::SinkExt;
use patroxy::config::{ClientTlsMode, ServerTlsMode};
use patroxy::policy::ListenerRole;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

struct Setup {
    etcd: Etcd,
    pg: Postgres,
    ca: TestCa,
    _keys: Keys,
    /// Last: fields drop in order, and the servers above must stop before it goes.
    root: TempRoot,
}

async fn setup(scope: &str) -> Setup {
    let root = TempRoot::new();
    let etcd = Etcd::start(&root);
    let pg = Postgres::primary(&root, "pg");
    let mut keys = Keys::new(&etcd, scope).await;
    keys.member("pg", pg.port, "primary", "running").await;
    keys.leader("pg").await;
    let ca = TestCa::new(root.path(), "ca");
    let c = connect(pg.port).await.unwrap();
    c.batch_execute(
        "SET password_encryption = 'scram-sha-256'; CREATE ROLE alice LOGIN PASSWORD 'wonder'",
    )
    .await
    .unwrap();
    Setup {
        root,
        etcd,
        pg,
        ca,
        _keys: keys,
    }
}

/// Runs psql with a connection string, returning its output.
async fn psql(conninfo: String, sql: &str) -> Output {
    let sql = sql.to_owned();
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(format!("{PG_BIN}/psql"))
            .args(["-XAt", "-d", &conninfo, "-c", &sql])
            .env_remove("PGSSLMODE")
            .env_remove("PGPASSWORD")
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "psql failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn failed(out: &Output) -> String {
    assert!(!out.status.success(), "psql should have failed");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn refused<T>(r: Result<T, tokio_postgres::Error>, what: &str) -> tokio_postgres::Error {
    match r {
        Ok(_) => panic!("{what}: the connection was accepted"),
        Err(e) => e,
    }
}

fn tls_listener(name: &str, mode: Option<ClientTlsMode>) -> ListenerConfig {
    ListenerConfig {
        tls: mode,
        ..listener(name, ListenerRole::Primary)
    }
}

fn with_cert(cfg: &mut Config, cert: &Issued) {
    cfg.tls.cert_file = Some(cert.cert_file.clone());
    cfg.tls.key_file = Some(cert.key_file.clone());
}

/// A StartupMessage for user postgres, protocol 3.0.
fn startup_message() -> Vec<u8> {
    let mut body = vec![0, 3, 0, 0];
    for s in ["user", "postgres", "database", "postgres", ""] {
        body.extend_from_slice(s.as_bytes());
        body.push(0);
    }
    let mut m = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    m.extend(body);
    m
}

/// Reads backend messages until ReadyForQuery ('Z') or an ErrorResponse ('E'); returns the
/// tags seen and the body of the last message.
async fn read_until_ready<S: AsyncReadExt + Unpin>(s: &mut S) -> (Vec<u8>, Vec<u8>) {
    let mut tags = Vec::new();
    loop {
        let tag = s.read_u8().await.unwrap();
        let len = s.read_u32().await.unwrap() as usize;
        let mut body = vec![0; len - 4];
        s.read_exact(&mut body).await.unwrap();
        tags.push(tag);
        if tag == b'Z' || tag == b'E' {
            return (tags, body);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_speak_tls_to_patroxy_and_plaintext_is_refused_where_required() {
    let s = setup("tls").await;
    let cert = s.ca.issue("patroxy", &["localhost", "127.0.0.1"]);
    let proxy = Proxy::start(&s.etcd, "tls", |cfg| {
        with_cert(cfg, &cert);
        cfg.timeouts.startup = Duration::from_secs(2);
        cfg.listeners = vec![
            tls_listener("allow", None),
            tls_listener("strict", Some(ClientTlsMode::Require)),
        ];
    })
    .await;
    let (allow, strict) = (proxy.port_of("allow"), proxy.port_of("strict"));
    wait_routed(allow, s.pg.port).await;
    let ca = s.ca.cert_file.display().to_string();
    let base = |port: u16| format!("host=127.0.0.1 port={port} user=postgres dbname=postgres");

    // psql: require, then verify-full against patroxy's certificate for 127.0.0.1.
    let out = psql(format!("{} sslmode=require", base(allow)), "SELECT 1").await;
    assert_eq!(ok(&out), "1");
    let conninfo = format!("{} sslmode=verify-full sslrootcert={ca}", base(strict));
    let out = psql(conninfo, "SELECT inet_server_port()").await;
    assert_eq!(ok(&out), s.pg.port.to_string());
    // A CA that did not sign patroxy's certificate is refused by the client.
    let other = TestCa::new(s.root.path(), "other-ca");
    let conninfo = format!(
        "{} sslmode=verify-full sslrootcert={}",
        base(allow),
        other.cert_file.display()
    );
    let err = failed(&psql(conninfo, "SELECT 1").await);
    assert!(err.contains("certificate verify failed"), "{err}");

    // SCRAM through TLS termination (the server leg is plaintext, so no -PLUS is offered).
    let conninfo = format!(
        "host=127.0.0.1 port={strict} user=alice password=wonder dbname=postgres sslmode=verify-full sslrootcert={ca}"
    );
    assert_eq!(ok(&psql(conninfo, "SELECT current_user").await), "alice");

    // tokio-postgres with a rustls connector.
    let tls = tokio_postgres_rustls::MakeRustlsConnect::new(s.ca.client_config(&[]));
    let conn_str = format!("{} sslmode=require", base(strict));
    let (client, conn) = tokio_postgres::connect(&conn_str, tls).await.unwrap();
    tokio::spawn(conn);
    let row = client.query_one("SELECT 40 + 2", &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 42);

    // Plaintext on the strict listener: FATAL 28000, and psql says why.
    let e = refused(connect(strict).await, "plaintext must be refused");
    assert_eq!(sqlstate(&e).as_deref(), Some("28000"), "{e}");
    let err = failed(&psql(format!("{} sslmode=disable", base(strict)), "SELECT 1").await);
    assert!(err.contains("requires TLS"), "{err}");
    // Plaintext is still fine where TLS is only allowed.
    assert_eq!(server_port(allow).await.unwrap(), s.pg.port as i32);

    // Direct TLS (PostgreSQL 17's sslnegotiation=direct) with ALPN "postgresql".
    let connector = tokio_rustls::TlsConnector::from(Arc::new(
        s.ca.client_config(&[patroxy::tls::ALPN_POSTGRESQL]),
    ));
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let tcp = TcpStream::connect(("127.0.0.1", strict)).await.unwrap();
    let mut direct = connector.connect(name.clone(), tcp).await.unwrap();
    assert_eq!(direct.get_ref().1.alpn_protocol(), Some(&b"postgresql"[..]));
    direct.write_all(&startup_message()).await.unwrap();
    let (tags, _) = read_until_ready(&mut direct).await;
    assert_eq!(tags.first(), Some(&b'R'), "{tags:?}");
    assert_eq!(tags.last(), Some(&b'Z'), "{tags:?}");
    direct.write_all(&[b'X', 0, 0, 0, 4]).await.unwrap();

    // A direct handshake without ALPN is refused with 08P01 inside TLS.
    let connector = tokio_rustls::TlsConnector::from(Arc::new(s.ca.client_config(&[])));
    let tcp = TcpStream::connect(("127.0.0.1", strict)).await.unwrap();
    let mut direct = connector.connect(name, tcp).await.unwrap();
    let (tags, body) = read_until_ready(&mut direct).await;
    assert_eq!(tags, vec![b'E']);
    assert!(String::from_utf8_lossy(&body).contains("08P01"));

    // An SSLRequest followed at once by more bytes (an injection attempt) is refused.
    let mut raw = TcpStream::connect(("127.0.0.1", allow)).await.unwrap();
    let mut bytes = vec![0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
    bytes.extend(startup_message());
    raw.write_all(&bytes).await.unwrap();
    let (tags, body) = read_until_ready(&mut raw).await;
    assert_eq!(tags, vec![b'E']);
    assert!(String::from_utf8_lossy(&body).contains("08P01"));

    // A TLS handshake that stops half way is cut at the startup timeout...
    let mut half = TcpStream::connect(("127.0.0.1", allow)).await.unwrap();
    half.write_all(&[
        0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
    ])
    .await
    .unwrap();
    let mut sink = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), half.read_to_end(&mut sink)).await;
    assert!(read.is_ok(), "a half-open handshake was not cut");
    // ...and so is one after an SSLRequest answered with 'S'.
    let mut half = TcpStream::connect(("127.0.0.1", allow)).await.unwrap();
    half.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])
        .await
        .unwrap();
    assert_eq!(half.read_u8().await.unwrap(), b'S');
    half.write_all(&[0x16, 0x03, 0x01]).await.unwrap();
    let read = tokio::time::timeout(Duration::from_secs(20), half.read_to_end(&mut sink)).await;
    assert!(read.is_ok(), "a half-open handshake was not cut");
    // Other clients were served all along.
    assert_eq!(server_port(allow).await.unwrap(), s.pg.port as i32);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patroxy_verifies_the_servers_certificate_as_configured() {
    let mut s = setup("stls").await;
    let ssl_used = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()";
    // A server without TLS: `prefer` falls back to plaintext, `require` refuses it.
    for (mode, works) in [
        (ServerTlsMode::Prefer, true),
        (ServerTlsMode::Require, false),
    ] {
        let proxy = Proxy::start(&s.etcd, "stls", |cfg| {
            cfg.server_tls.mode = mode;
            cfg.timeouts.connect_wait = Duration::from_secs(3);
        })
        .await;
        match connect(proxy.port()).await {
            Ok(c) if works => {
                assert!(!c.query_one(ssl_used, &[]).await.unwrap().get::<_, bool>(0));
            }
            Err(e) if !works => {
                assert!(
                    message(&e).contains("does not accept TLS"),
                    "{}",
                    message(&e)
                );
            }
            Ok(_) => panic!("{mode:?}: connected to a server without TLS"),
            Err(e) => panic!("{mode:?}: {e}"),
        }
        proxy.stop().await;
    }
    let pg_cert = s.ca.issue("pg", &["127.0.0.1"]);
    s.pg.enable_tls(&pg_cert.cert_file, &pg_cert.key_file);
    let ca = s.ca.cert_file.clone();
    let other = TestCa::new(s.root.path(), "other-ca");

    // By default (no [server_tls]), as libpq's sslmode=prefer: a server that offers TLS gets
    // a TLS connection from patroxy.
    let proxy = Proxy::start(&s.etcd, "stls", |_| {}).await;
    wait_routed(proxy.port(), s.pg.port).await;
    let c = connect(proxy.port()).await.unwrap();
    assert!(
        c.query_one(ssl_used, &[]).await.unwrap().get::<_, bool>(0),
        "the default server leg is plaintext"
    );
    proxy.stop().await;

    // verify-full: the certificate chains to the CA and names 127.0.0.1.
    let proxy = Proxy::start(&s.etcd, "stls", |cfg| {
        cfg.server_tls.mode = ServerTlsMode::VerifyFull;
        cfg.server_tls.ca_file = Some(ca.clone());
    })
    .await;
    wait_routed(proxy.port(), s.pg.port).await;
    let c = connect(proxy.port()).await.unwrap();
    assert!(c.query_one(ssl_used, &[]).await.unwrap().get::<_, bool>(0));
    proxy.stop().await;

    // verify-full with a CA that did not sign it: no connection, and the client learns why.
    let proxy = Proxy::start(&s.etcd, "stls", |cfg| {
        cfg.server_tls.mode = ServerTlsMode::VerifyFull;
        cfg.server_tls.ca_file = Some(other.cert_file.clone());
        cfg.timeouts.connect_wait = Duration::from_millis(500);
    })
    .await;
    let e = refused(connect(proxy.port()).await, "an untrusted server");
    assert_eq!(sqlstate(&e).as_deref(), Some("57P03"), "{e}");
    assert!(message(&e).contains("certificate"), "{}", message(&e));
    proxy.stop().await;

    // A certificate for another name: verify-full refuses it, verify-ca accepts it.
    let wrong_name = s.ca.issue("pg-elsewhere", &["db.elsewhere.test"]);
    s.pg.enable_tls(&wrong_name.cert_file, &wrong_name.key_file);
    for (mode, accepted) in [
        (ServerTlsMode::VerifyFull, false),
        (ServerTlsMode::VerifyCa, true),
        (ServerTlsMode::Require, true),
    ] {
        let proxy = Proxy::start(&s.etcd, "stls", |cfg| {
            cfg.server_tls.mode = mode;
            cfg.server_tls.ca_file = Some(ca.clone());
            cfg.timeouts.connect_wait = Duration::from_secs(3);
        })
        .await;
        let got = connect(proxy.port()).await;
        match accepted {
            true => {
                let c = got.unwrap_or_else(|e| panic!("{mode:?}: {e}"));
                assert!(c.query_one(ssl_used, &[]).await.unwrap().get::<_, bool>(0));
            }
            false => {
                let e = got.err().unwrap_or_else(|| panic!("{mode:?} accepted"));
                assert!(
                    message(&e).contains("not valid for name"),
                    "{}",
                    message(&e)
                );
            }
        }
        proxy.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_channel_binding_needs_the_servers_certificate_on_patroxy() {
    let mut s = setup("cbind").await;
    let pg_cert = s.ca.issue("pg", &["127.0.0.1"]);
    s.pg.enable_tls(&pg_cert.cert_file, &pg_cert.key_file);
    let own = s.ca.issue("patroxy", &["127.0.0.1"]);
    let ca = s.ca.cert_file.display().to_string();
    let alice = |port: u16, binding: &str| {
        format!(
            "host=127.0.0.1 port={port} user=alice password=wonder dbname=postgres \
             sslmode=verify-full sslrootcert={ca} channel_binding={binding}"
        )
    };
    for (cert, binding, works) in [
        // patroxy's own certificate: the client binds to it, the server to its own.
        (&own, "prefer", false),
        (&own, "disable", true),
        // The server's certificate on patroxy too: both ends bind to the same one.
        (&pg_cert, "require", true),
    ] {
        let proxy = Proxy::start(&s.etcd, "cbind", |cfg| {
            with_cert(cfg, cert);
            cfg.server_tls.mode = ServerTlsMode::VerifyFull;
            cfg.server_tls.ca_file = Some(s.ca.cert_file.clone());
        })
        .await;
        wait_routed(proxy.port(), s.pg.port).await;
        let out = psql(alice(proxy.port(), binding), "SELECT current_user").await;
        match works {
            true => assert_eq!(ok(&out), "alice"),
            false => {
                let err = failed(&out);
                assert!(err.contains("channel binding"), "{err}");
            }
        }
        proxy.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patroxy_watches_etcd_over_tls_with_a_client_certificate_and_a_password() {
    use etcd_client::Permission;
    let root = TempRoot::new();
    let ca = TestCa::new(root.path(), "ca");
    let tls = EtcdTls {
        ca_file: ca.cert_file.clone(),
        server: ca.issue("etcd", &["127.0.0.1", "localhost"]),
        client: ca.issue("etcd-client", &["etcd-client"]),
    };
    let mut etcd = Etcd::start_tls(&root, tls.clone());
    // Authentication on: patroxy gets a user that may only read Patroni's keys (and write
    // its own reports).
    let mut admin = etcd.client().await;
    admin.user_add("root", "rootpw", None).await.unwrap();
    admin.user_grant_role("root", "root").await.unwrap();
    admin.role_add("patroxy").await.unwrap();
    let read = Permission::read("/service/etcdtls/").with_prefix();
    admin.role_grant_permission("patroxy", read).await.unwrap();
    let own = Permission::read_write("/patroxy/").with_prefix();
    admin.role_grant_permission("patroxy", own).await.unwrap();
    admin.user_add("patroxy", "s3cret", None).await.unwrap();
    admin.user_grant_role("patroxy", "patroxy").await.unwrap();
    admin.auth_enable().await.unwrap();
    etcd.root_password = Some("rootpw".into());

    let pg = Postgres::primary(&root, "pg");
    let mut keys = Keys::new(&etcd, "etcdtls").await;
    keys.member("pg", pg.port, "primary", "running").await;
    keys.leader("pg").await;
    // patroxy's own copies of the files, which it reads once, at start.
    let own = root.path().join("patroxy-etcd-tls");
    std::fs::create_dir(&own).unwrap();
    let copy = |from: &std::path::Path, name: &str| {
        let to = own.join(name);
        std::fs::copy(from, &to).unwrap();
        to
    };
    let (ca_file, cert_file, key_file) = (
        copy(&tls.ca_file, "ca.pem"),
        copy(&tls.client.cert_file, "client.pem"),
        copy(&tls.client.key_file, "client.key"),
    );
    let proxy = Proxy::start(&etcd, "etcdtls", |cfg| {
        cfg.etcd.ca_file = Some(ca_file);
        cfg.etcd.cert_file = Some(cert_file);
        cfg.etcd.key_file = Some(key_file);
        cfg.etcd.username = Some("patroxy".into());
        cfg.etcd.password = Some(patroxy::config::Secret::new("s3cret"));
    })
    .await;
    wait_routed(proxy.port(), pg.port).await;
    // The watch follows changes too, not only the first read.
    let other = Postgres::primary(&root, "other");
    keys.member("other", other.port, "primary", "running").await;
    keys.leader("other").await;
    wait_routed(proxy.port(), other.port).await;
    // Reconnects reuse what was read at start: with the files gone and etcd restarted,
    // patroxy connects again and follows the next change.
    std::fs::remove_dir_all(&own).unwrap();
    etcd.restart();
    let mut keys = Keys::new(&etcd, "etcdtls").await;
    keys.leader("pg").await;
    wait_routed(proxy.port(), pg.port).await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patroxy_presents_a_client_certificate_to_a_server_that_asks() {
    let mut s = setup("ccert").await;
    let c = connect(s.pg.port).await.unwrap();
    c.batch_execute("CREATE ROLE carol LOGIN").await.unwrap();
    let pg_cert = s.ca.issue("pg", &["127.0.0.1"]);
    s.pg.enable_tls(&pg_cert.cert_file, &pg_cert.key_file);
    s.pg.require_client_certificate(&s.ca.cert_file, "carol");
    let carol = "user=carol";
    let ca = s.ca.cert_file.clone();

    // Without a client certificate the server refuses carol, and says so to the client.
    let proxy = Proxy::start(&s.etcd, "ccert", |cfg| {
        cfg.server_tls.mode = ServerTlsMode::VerifyFull;
        cfg.server_tls.ca_file = Some(ca.clone());
    })
    .await;
    wait_routed(proxy.port(), s.pg.port).await;
    let e = refused(
        connect_with(proxy.port(), carol).await,
        "carol without a certificate",
    );
    assert_eq!(sqlstate(&e).as_deref(), Some("28000"), "{e}");
    proxy.stop().await;

    // With one whose CN is carol, she is in.
    let client = s.ca.issue("carol", &["carol"]);
    let proxy = Proxy::start(&s.etcd, "ccert", |cfg| {
        cfg.server_tls.mode = ServerTlsMode::VerifyFull;
        cfg.server_tls.ca_file = Some(ca.clone());
        cfg.server_tls.cert_file = Some(client.cert_file.clone());
        cfg.server_tls.key_file = Some(client.key_file.clone());
    })
    .await;
    let (c, _conn) = connect_with(proxy.port(), carol).await.unwrap();
    let row = c.query_one("SELECT current_user::text", &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "carol");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_sessions_carry_large_results_and_drain_with_57p01() {
    let mut s = setup("tlsdrain").await;
    let pg_cert = s.ca.issue("pg", &["127.0.0.1"]);
    s.pg.enable_tls(&pg_cert.cert_file, &pg_cert.key_file);
    let mut other = Postgres::primary(&s.root, "other");
    other.enable_tls(&pg_cert.cert_file, &pg_cert.key_file);
    let mut keys = Keys::new(&s.etcd, "tlsdrain").await;
    keys.member("other", other.port, "replica", "running").await;
    let cert = s.ca.issue("patroxy", &["127.0.0.1"]);
    let proxy = Proxy::start(&s.etcd, "tlsdrain", |cfg| {
        with_cert(cfg, &cert);
        cfg.server_tls.mode = ServerTlsMode::Require;
        cfg.timeouts.drain = Duration::from_secs(20);
    })
    .await;
    wait_routed(proxy.port(), s.pg.port).await;
    let tls = tokio_postgres_rustls::MakeRustlsConnect::new(s.ca.client_config(&[]));
    let conn_str = format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres sslmode=require",
        proxy.port()
    );
    let (client, conn) = tokio_postgres::connect(&conn_str, tls).await.unwrap();
    let conn = tokio::spawn(conn);

    // About 20 MB down through TLS on both legs: the client's digest of what arrived equals
    // the server's digest of what it sent.
    let sent = "SELECT i, repeat(md5(i::text), 20) AS r FROM generate_series(1, 30000) i";
    let rows = client.query(sent, &[]).await.unwrap();
    let mut arrived = Sha256::new();
    let mut bytes = 0;
    for (n, row) in rows.iter().enumerate() {
        assert_eq!(row.get::<_, i32>(0), n as i32 + 1, "rows in order");
        let r: &str = row.get(1);
        bytes += r.len();
        arrived.update(r.as_bytes());
    }
    assert_eq!(bytes, 30000 * 640);
    let digest = |sql: &str| {
        format!("SELECT encode(sha256(convert_to(string_agg(r, '' ORDER BY i), 'UTF8')), 'hex') FROM ({sql}) t")
    };
    let server_side: String = client.query_one(&digest(sent), &[]).await.unwrap().get(0);
    assert_eq!(hex(&arrived.finalize()), server_side);

    // About 20 MB up, with COPY FROM STDIN: the server's digest of what it stored equals the
    // client's digest of what it sent.
    client
        .batch_execute("CREATE TEMP TABLE up (i int, r text)")
        .await
        .unwrap();
    let sink = client.copy_in("COPY up FROM STDIN").await.unwrap();
    futures_util::pin_mut!(sink);
    let mut sent_digest = Sha256::new();
    for chunk in 0..300 {
        let mut buf = String::new();
        for i in chunk * 100 + 1..=chunk * 100 + 100 {
            let r = format!("{i:016}").repeat(40);
            sent_digest.update(r.as_bytes());
            buf.push_str(&format!("{i}\t{r}\n"));
        }
        sink.send(bytes::Bytes::from(buf)).await.unwrap();
    }
    assert_eq!(sink.finish().await.unwrap(), 30000);
    let stored: String = client
        .query_one(&digest("SELECT i, r FROM up"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(hex(&sent_digest.finalize()), stored);

    // The leader moves: the idle TLS session ends with 57P01, inside TLS.
    keys.member("pg", s.pg.port, "replica", "running").await;
    keys.member("other", other.port, "primary", "running").await;
    keys.leader("other").await;
    assert_eq!(ended_within(conn, AT_REST).await.as_deref(), Some("57P01"));
    wait_routed(proxy.port(), other.port).await;
    proxy.stop().await;
}
