//! A hostile client against a real patroxy, PostgreSQL and etcd: each attack asserts that
//! the other clients are served, that what it costs the cluster stays within stated bounds,
//! and that it gets a clear answer (or none, where PostgreSQL gives none).

mod common;

use std::net::IpAddr;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const LONG: Duration = Duration::from_secs(30);
const HERE: &str = "127.0.0.1";
/// Another loopback source: what a second host looks like to patroxy.
const ELSEWHERE: &str = "127.0.0.2";

fn cancels(listener: &str, routed: &str) -> f64 {
    let (l, r) = (
        format!(r#"listener="{listener}""#),
        format!(r#"routed="{routed}""#),
    );
    sample(&metrics_text(), "patroxy_cancel_requests_total", &[&l, &r]).unwrap_or(0.0)
}

/// A connection to `port` from the loopback address `source`.
async fn connect_from(source: &str, port: u16) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket
        .bind((source.parse::<IpAddr>().unwrap(), 0).into())
        .unwrap();
    socket
        .connect((HERE.parse::<IpAddr>().unwrap(), port).into())
        .await
        .unwrap()
}

/// Reads one message: its tag and body.
async fn message(s: &mut TcpStream) -> (u8, Vec<u8>) {
    let mut head = [0u8; 5];
    tokio::time::timeout(LONG, s.read_exact(&mut head))
        .await
        .expect("an answer")
        .unwrap();
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    let mut body = vec![0u8; len - 4];
    s.read_exact(&mut body).await.unwrap();
    (head[0], body)
}

/// A session of `postgres` (trusted), logged in from `source`; and the cancel key
/// patroxy gave it.
async fn session_from(source: &str, port: u16) -> (TcpStream, i32, Vec<u8>) {
    let mut s = connect_from(source, port).await;
    s.write_all(&startup("postgres", "postgres")).await.unwrap();
    let mut key = None;
    loop {
        match message(&mut s).await {
            (b'K', body) => {
                let pid = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
                key = Some((pid, body[4..].to_vec()));
            }
            (b'Z', _) => break,
            (b'E', body) => panic!("login refused: {}", String::from_utf8_lossy(&body)),
            _ => {}
        }
    }
    let (pid, secret) = key.expect("a BackendKeyData");
    (s, pid, secret)
}

fn query(sql: &str) -> Vec<u8> {
    let mut q = vec![b'Q'];
    q.extend_from_slice(&((sql.len() + 5) as u32).to_be_bytes());
    q.extend_from_slice(sql.as_bytes());
    q.push(0);
    q
}

/// Runs `sql` on a raw session: the SQLSTATE of its error, if it failed.
async fn run(s: &mut TcpStream, sql: &str) -> Option<String> {
    s.write_all(&query(sql)).await.unwrap();
    let mut failed = None;
    loop {
        match message(s).await {
            (b'E', body) => {
                let code = body
                    .split(|b| *b == 0)
                    .find(|f| f.first() == Some(&b'C'))
                    .map(|f| String::from_utf8_lossy(&f[1..]).into_owned());
                failed = code;
            }
            (b'Z', _) => return failed,
            _ => {}
        }
    }
}

/// A CancelRequest from `source`, answered as PostgreSQL answers one: by closing.
async fn cancel_from(source: &str, port: u16, pid: i32, secret: &[u8]) {
    let mut s = connect_from(source, port).await;
    let mut packet = ((12 + secret.len()) as u32).to_be_bytes().to_vec();
    packet.extend_from_slice(&80877102u32.to_be_bytes());
    packet.extend_from_slice(&pid.to_be_bytes());
    packet.extend_from_slice(secret);
    s.write_all(&packet).await.unwrap();
    let mut sink = [0u8; 16];
    let closed = tokio::time::timeout(LONG, s.read(&mut sink)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "closed, with no answer"
    );
}

/// `n` cancel requests from `source` with the pids `pid(i)`, 32 at a time.
async fn flood(port: u16, n: u32, pid: impl Fn(u32) -> i32) {
    let pids: Vec<i32> = (0..n).map(pid).collect();
    for chunk in pids.chunks(32) {
        let sends = chunk
            .iter()
            .map(|p| cancel_from(HERE, port, *p, &[7, 7, 7, 7]));
        futures_util::future::join_all(sends).await;
    }
}

/// Range requests etcd has served, from its own metrics.
async fn etcd_ranges(etcd: &Etcd) -> f64 {
    let url = etcd.url();
    let port: u16 = url.rsplit(':').next().unwrap().parse().unwrap();
    let mut s = TcpStream::connect((HERE, port)).await.unwrap();
    let get = format!("GET /metrics HTTP/1.0\r\nHost: {HERE}\r\n\r\n");
    s.write_all(get.as_bytes()).await.unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).await.unwrap();
    text.lines()
        .filter(|l| {
            l.starts_with("grpc_server_started_total{") && l.contains(r#"grpc_method="Range""#)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Connections PostgreSQL has accepted since `log_connections` was turned on (a cancel
/// request is one: a fork of its own).
fn connections_received(pg: &Postgres) -> usize {
    let log = std::fs::read_to_string(pg.data.with_extension("log")).unwrap_or_default();
    log.matches("connection received").count()
}

async fn log_connections(pg: &Postgres) {
    let c = connect(pg.port).await.unwrap();
    c.batch_execute("ALTER SYSTEM SET log_connections = on")
        .await
        .unwrap();
    c.batch_execute("SELECT pg_reload_conf()").await.unwrap();
    wait_for("log_connections in force", LONG, || async {
        let _ = connect(pg.port).await;
        (connections_received(pg) > 0).then_some(())
    })
    .await;
}

/// Waits until `listener` has counted `n` cancels routed as `routed`.
async fn wait_cancels(listener: &str, routed: &str, n: f64) {
    let what = format!("{n} cancels routed {routed} on {listener}");
    wait_for(&what, LONG, || async {
        (cancels(listener, routed) >= n).then_some(())
    })
    .await;
}

/// 10,000 cancels with another instance's tag and 5,000 with no tag at all: not one etcd
/// request, not one connection to PostgreSQL, and the sessions meanwhile are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_floods_cost_etcd_and_the_servers_nothing() {
    install_metrics();
    let (_root, etcd, pg) = one_primary("hflood").await;
    log_connections(&pg).await;
    let proxy = Proxy::start(&etcd, "hflood", |cfg| {
        cfg.listeners[0].name = "flooded".into();
        // Every request is routed here (the per-source limit has its own test).
        cfg.limits.cancels_per_second = 0;
    })
    .await;
    let port = proxy.port();
    let (mut working, pid, _) = session_from(HERE, port).await;
    // A tag (any pid from 2^23 up carries one), but not this instance's.
    let foreign = if pid >> 15 == 300 { 301 } else { 300 };
    let (ranges, forks) = (etcd_ranges(&etcd).await, connections_received(&pg));
    flood(port, 10_000, |i| (foreign << 15) | (i as i32 & 0x7fff)).await;
    flood(port, 5_000, |i| 1000 + i as i32).await;
    assert_eq!(
        run(&mut working, "SELECT 1").await,
        None,
        "served all along"
    );
    let l = r#"listener="flooded""#;
    wait_for("15,000 cancels counted", LONG, || async {
        let n = sample(&metrics_text(), "patroxy_cancel_requests_total", &[l]);
        (n >= Some(15_000.0)).then_some(())
    })
    .await;
    assert_eq!(
        etcd_ranges(&etcd).await - ranges,
        0.0,
        "etcd requests for 15,000 cancels"
    );
    assert_eq!(
        connections_received(&pg) - forks,
        0,
        "connections to PostgreSQL for 15,000 cancels"
    );
    assert_eq!(cancels("flooded", "unknown"), 15_000.0);
    proxy.stop().await;
}

/// A report that names the wrong instance (anyone who can write under `/patroxy` can write
/// one) costs one hop: the instance it points at does not send the request on. And a
/// session through one instance is cancelled through another, by its tagged key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_goes_one_hop_and_a_forged_report_cannot_loop_it() {
    install_metrics();
    let (_root, etcd, pg) = one_primary("hhop").await;
    let start = |name: &'static str| {
        Proxy::start(&etcd, "hhop", move |cfg| {
            cfg.listeners[0].name = format!("hop-{name}");
            cfg.report.instance = Some(name.into());
            cfg.admin.listen = Some(format!("{HERE}:0"));
        })
    };
    let (a, b) = (start("a").await, start("b").await);
    let (mut on_a, pid_a, secret_a) = session_from(HERE, a.port()).await;
    let (_on_b, pid_b, _) = session_from(HERE, b.port()).await;
    let (tag_a, tag_b) = (pid_a >> 15, pid_b >> 15);
    let forged_tag = (256..65535).find(|t| *t != tag_a && *t != tag_b).unwrap();
    let forged = format!(
        r#"{{"instance":"forged","version":"0","cluster":"hhop","epoch":1,"leader":null,"primary":null,"sessions":0,"sessions_by_server":{{}},"routes":{{}},"updated":0,"cancel":{{"tag":{forged_tag},"address":"{HERE}:{}"}}}}"#,
        b.port()
    );
    let mut reports = Keys::with_prefix(&etcd, "/patroxy/hhop/").await;
    reports.put("forged", &forged).await;
    // Sent to a until a has read the forged report and sends it on to b.
    wait_for("a forwards the forged tag", LONG, || async {
        cancel_from(HERE, a.port(), forged_tag << 15, &[1, 2, 3, 4]).await;
        (cancels("hop-a", "peer") >= 1.0).then_some(())
    })
    .await;
    wait_cancels("hop-b", "misrouted", 1.0).await;
    assert_eq!(cancels("hop-b", "peer"), 0.0, "b sent nothing on");

    // The real thing: a's session is cancelled through b, once both have reported (b follows
    // a's report with its watch).
    wait_peers(&[&a, &b], 3).await;
    on_a.write_all(&query("SELECT pg_sleep(60)")).await.unwrap();
    wait_query_running(pg.port, "SELECT pg_sleep(60)").await;
    cancel_from(HERE, b.port(), pid_a, &secret_a).await;
    let mut failed = None;
    loop {
        match message(&mut on_a).await {
            (b'E', body) => failed = Some(String::from_utf8_lossy(&body).into_owned()),
            (b'Z', _) => break,
            _ => {}
        }
    }
    assert!(
        failed.is_some_and(|e| e.contains("57014")),
        "cancelled through b"
    );
    assert_eq!(cancels("hop-a", "local"), 1.0);
    a.stop().await;
    b.stop().await;
}

/// One source sending cancels as fast as it can is held to `limits.cancels_per_second`;
/// another source's cancel still works at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_flooding_cancels_is_held_back_and_others_are_not() {
    install_metrics();
    let (_root, etcd, pg) = one_primary("hlimit").await;
    let proxy = Proxy::start(&etcd, "hlimit", |cfg| {
        cfg.listeners[0].name = "limited".into();
        cfg.limits.cancels_per_second = 50;
    })
    .await;
    let port = proxy.port();
    flood(port, 2_000, |i| 1000 + i as i32).await;
    let throttled = cancels("limited", "throttled");
    assert!(throttled >= 1_500.0, "{throttled} of 2000 held back");
    let (mut s, pid, secret) = session_from(ELSEWHERE, port).await;
    s.write_all(&query("SELECT pg_sleep(60)")).await.unwrap();
    wait_query_running(pg.port, "SELECT pg_sleep(60)").await;
    cancel_from(ELSEWHERE, port, pid, &secret).await;
    let mut code = None;
    loop {
        match message(&mut s).await {
            (b'E', body) => code = Some(String::from_utf8_lossy(&body).contains("57014")),
            (b'Z', _) => break,
            _ => {}
        }
    }
    assert_eq!(code, Some(true), "another source's cancel is heard");
    proxy.stop().await;
}

/// A startup message for `user` and `database`.
fn startup(user: &str, database: &str) -> Vec<u8> {
    startup_message(0, &[("user", user), ("database", database)])
}

/// The salt and iteration count patroxy's SCRAM challenge gives `user` (the exchange is
/// then dropped, as a prober would).
async fn salt_of(port: u16, user: &str, database: &str) -> String {
    let mut s = connect_from(HERE, port).await;
    s.write_all(&startup(user, database)).await.unwrap();
    let (tag, body) = message(&mut s).await;
    assert_eq!(
        (tag, &body[..4]),
        (b'R', &10u32.to_be_bytes()[..]),
        "SASL offered"
    );
    let first = b"n,,n=,r=abcdefghijklmnopqrstuvwx";
    let mut msg = b"SCRAM-SHA-256\0".to_vec();
    msg.extend_from_slice(&(first.len() as u32).to_be_bytes());
    msg.extend_from_slice(first);
    let mut out = vec![b'p'];
    out.extend_from_slice(&((msg.len() + 4) as u32).to_be_bytes());
    out.extend_from_slice(&msg);
    s.write_all(&out).await.unwrap();
    let (tag, body) = message(&mut s).await;
    assert_eq!(
        (tag, &body[..4]),
        (b'R', &11u32.to_be_bytes()[..]),
        "SASLContinue"
    );
    let text = String::from_utf8_lossy(&body[4..]).into_owned();
    text.split(',')
        .filter(|f| f.starts_with("s=") || f.starts_with("i="))
        .collect::<Vec<_>>()
        .join(",")
}

/// Before it proves anything, a client may name any user and any database: the user's
/// salt does not say whether it exists, the lookup runs in `auth_dbname` only, and no pool
/// is made for what it named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_names_cost_no_pools_and_tell_nothing() {
    install_metrics();
    let (root, etcd, pg) = one_primary("hnames").await;
    let c = connect(pg.port).await.unwrap();
    c.batch_execute(
        "SET password_encryption = 'scram-sha-256'; CREATE ROLE alice LOGIN PASSWORD 'wonder'",
    )
    .await
    .unwrap();
    let file = root.path().join("userlist.txt");
    std::fs::write(&file, "\"carol\" \"sesame\"\n").unwrap();
    let proxy = Proxy::start(&etcd, "hnames", |cfg| {
        cfg.listeners[0].name = "names".into();
        cfg.listeners[0].pool_mode = patroxy::config::PoolMode::Transaction;
        cfg.auth.auth_file = Some(file);
        cfg.auth.auth_user = Some("postgres".into());
    })
    .await;
    let port = proxy.port();
    // alice's salt is her stored one (found with auth_query), carol's is fixed (from the
    // file's password), and so is a name nobody has: each the same every time, alike in
    // form.
    let stored: String = c
        .query_one(
            "SELECT rolpassword FROM pg_authid WHERE rolname = 'alice'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    for user in ["alice", "carol", "nobody", "nobody-else"] {
        let (first, again) = (
            salt_of(port, user, "postgres").await,
            salt_of(port, user, "another").await,
        );
        assert_eq!(first, again, "{user}'s salt, asked twice");
        let salt = first.split(',').next().unwrap().trim_start_matches("s=");
        assert_eq!(salt.len(), 24, "{user}: 16 bytes, as PostgreSQL's");
        assert!(first.ends_with(",i=4096"), "{user}: {first}");
        if user == "alice" {
            assert!(stored.contains(salt), "alice's stored salt");
        }
    }
    assert_ne!(
        salt_of(port, "nobody", "postgres").await,
        salt_of(port, "nobody-else", "postgres").await
    );
    // How long the challenge takes, for names found in the file, found with auth_query, and
    // found nowhere (printed, for BENCHMARKS.md; not asserted).
    let mut took: Vec<(&str, Vec<u128>)> = ["carol", "alice", "nobody"]
        .iter()
        .map(|u| (*u, Vec::new()))
        .collect();
    for _ in 0..50 {
        for (user, times) in &mut took {
            let started = std::time::Instant::now();
            salt_of(port, user, "postgres").await;
            times.push(started.elapsed().as_micros());
        }
    }
    for (user, times) in &mut took {
        times.sort();
        let at = |q: usize| times[(times.len() - 1) * q / 100];
        eprintln!(
            "challenge for {user}: p10 {} p50 {} p90 {} us",
            at(10),
            at(50),
            at(90)
        );
    }
    // Random names, databases and users: the only pool is auth_user's, in auth_dbname.
    let names: usize = std::env::var("HOSTILE_NAMES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(500);
    let (before, started) = (rss_kib(), std::time::Instant::now());
    for i in 0..names {
        salt_of(port, &format!("u{i}"), &format!("db{i}")).await;
    }
    eprintln!(
        "{names} unknown names in {names} databases: {:?}, RSS of the test process {} -> {} KiB",
        started.elapsed(),
        before,
        rss_kib()
    );
    let pools = || sample(&metrics_text(), "patroxy_pools", &[]);
    wait_for("the pools counted", LONG, || async {
        (pools() == Some(1.0)).then_some(())
    })
    .await;
    proxy.stop().await;
}

/// What patroxy answers a startup for `user` to the console's database: the first
/// authentication request's code (0 is AuthenticationOk: let in without a password).
async fn console_answer(port: u16, user: &str) -> u32 {
    let mut s = connect_from(HERE, port).await;
    s.write_all(&startup(user, "patroxy")).await.unwrap();
    let (tag, body) = message(&mut s).await;
    assert_eq!(tag, b'R', "an authentication request");
    u32::from_be_bytes([body[0], body[1], body[2], body[3]])
}

/// `auth.trust` lets pooled clients in without a password; the admin console (which can
/// SHUTDOWN, KILL, PAUSE) still asks for one, unless `auth.console_trust` says otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trust_does_not_open_the_admin_console() {
    let (root, etcd, _pg) = one_primary("hconsole").await;
    let file = root.path().join("userlist.txt");
    std::fs::write(&file, "\"admin\" \"sesame\"\n").unwrap();
    let start = |console_trust: Vec<&'static str>| {
        let file = file.clone();
        Proxy::start(&etcd, "hconsole", move |cfg| {
            cfg.listeners[0].pool_mode = patroxy::config::PoolMode::Session;
            cfg.auth.auth_file = Some(file);
            cfg.auth.trust = vec!["127.0.0.1/32".parse().unwrap()];
            cfg.auth.console_trust = console_trust.iter().map(|c| c.parse().unwrap()).collect();
            cfg.auth.admin_users = vec!["admin".into()];
        })
    };
    let proxy = start(vec![]).await;
    assert_eq!(
        console_answer(proxy.port(), "admin").await,
        10,
        "asked for SCRAM"
    );
    proxy.stop().await;
    let proxy = start(vec!["127.0.0.1/32"]).await;
    assert_eq!(
        console_answer(proxy.port(), "admin").await,
        0,
        "let in, as configured"
    );
    proxy.stop().await;
}

/// A pooled listener whose only member is at `port`, with carol's password in the file and
/// every client trusted; `tune` adds to it.
async fn pooled_on(
    etcd: &Etcd,
    scope: &'static str,
    root: &TempRoot,
    tune: impl FnOnce(&mut patroxy::config::Config) + Send + 'static,
) -> Proxy {
    let file = root.path().join("userlist.txt");
    std::fs::write(&file, "\"carol\" \"sesame\"\n").unwrap();
    Proxy::start(etcd, scope, move |cfg| {
        cfg.listeners[0].pool_mode = patroxy::config::PoolMode::Session;
        cfg.auth.auth_file = Some(file);
        cfg.auth.trust = vec!["127.0.0.1/32".parse().unwrap()];
        cfg.timeouts.connect_wait = Duration::from_secs(2);
        tune(cfg);
    })
    .await
}

/// carol's first query through `port`: its error's text, or `None` if it ran.
async fn carols_query(port: u16) -> Option<String> {
    let s = format!("host={HERE} port={port} user=carol dbname=postgres connect_timeout=20");
    let answer = async {
        let (c, conn) = tokio_postgres::connect(&s, tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        c.simple_query("SELECT 1").await.map(|_| ())
    };
    match tokio::time::timeout(LONG, answer).await.expect("an answer") {
        Ok(()) => None,
        Err(e) => Some(format!("{e} {}", common::message(&e))),
    }
}

/// A server that asks for the password in cleartext over a leg nobody verified (what an
/// on-path attacker who stripped TLS would do) does not get it, unless the operator says
/// so with `server_tls.require_auth`. Here the server is a real PostgreSQL whose pg_hba
/// says `password` for carol.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cleartext_password_request_on_an_unverified_leg_is_refused() {
    let (root, etcd, mut pg) = one_primary("hclear").await;
    let c = connect(pg.port).await.unwrap();
    c.batch_execute("CREATE ROLE carol LOGIN PASSWORD 'sesame'")
        .await
        .unwrap();
    let hba = pg.data.join("pg_hba.conf");
    let old = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(&hba, format!("host all carol 127.0.0.1/32 password\n{old}")).unwrap();
    pg.stop();
    pg.start();
    let proxy = pooled_on(&etcd, "hclear", &root, |_| {}).await;
    let refused = carols_query(proxy.port()).await.expect("refused");
    assert!(refused.contains("cleartext password"), "{refused}");
    proxy.stop().await;
    let proxy = pooled_on(&etcd, "hclear", &root, |cfg| {
        cfg.server_tls.require_auth = vec![patroxy::config::ServerAuthMethod::Password];
    })
    .await;
    assert_eq!(
        carols_query(proxy.port()).await,
        None,
        "allowed by the operator"
    );
    proxy.stop().await;
}

/// What an impostor on the server's address says after the startup message.
enum Impostor {
    /// SCRAM started, then AuthenticationOk without the server's signature.
    OkMidScram,
    /// SCRAM with an iteration count that would take PBKDF2 hours.
    Iterations(u64),
}

/// A TCP server on loopback that plays `how` to every connection.
async fn impostor(how: Impostor) -> u16 {
    let listener = tokio::net::TcpListener::bind((HERE, 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let how = std::sync::Arc::new(how);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let how = how.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                // SSLRequest (8 bytes): no TLS here.
                let n = s.read(&mut buf).await.unwrap_or(0);
                if n == 8 {
                    let _ = s.write_all(b"N").await;
                    let _ = s.read(&mut buf).await;
                }
                let sasl = auth(10, b"SCRAM-SHA-256\0\0");
                let _ = s.write_all(&sasl).await;
                let n = s.read(&mut buf).await.unwrap_or(0);
                let first = String::from_utf8_lossy(&buf[..n]).into_owned();
                let nonce = first
                    .split("r=")
                    .nth(1)
                    .unwrap_or("")
                    .trim_end_matches('\0');
                let reply = match &*how {
                    Impostor::OkMidScram => {
                        let cont = format!("r={nonce}x,s=c2FsdHNhbHRzYWx0c2FsdA==,i=4096");
                        let mut out = auth(11, cont.as_bytes());
                        out.extend_from_slice(&auth(0, b""));
                        out.extend_from_slice(b"Z\0\0\0\x05I");
                        out
                    }
                    Impostor::Iterations(i) => {
                        let cont = format!("r={nonce}x,s=c2FsdHNhbHRzYWx0c2FsdA==,i={i}");
                        auth(11, cont.as_bytes())
                    }
                };
                let _ = s.write_all(&reply).await;
                while s.read(&mut buf).await.unwrap_or(0) > 0 {}
            });
        }
    });
    port
}

fn auth(code: u32, data: &[u8]) -> Vec<u8> {
    let mut out = vec![b'R'];
    out.extend_from_slice(&((8 + data.len()) as u32).to_be_bytes());
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// An impostor at the member's address cannot skip SCRAM's proof (AuthenticationOk before
/// the server signature), nor stall patroxy with a huge iteration count: each login fails
/// at once with a clear reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_impostor_server_cannot_skip_scram_or_stall_it() {
    let root = TempRoot::new();
    let etcd = Etcd::start(&root);
    for (scope, how, why) in [
        ("himpok", Impostor::OkMidScram, "signature"),
        (
            "himpiter",
            Impostor::Iterations(4_000_000_000),
            "iterations",
        ),
    ] {
        let port = impostor(how).await;
        let mut keys = Keys::new(&etcd, scope).await;
        keys.member("a", port, "primary", "running").await;
        keys.leader("a").await;
        let proxy = pooled_on(&etcd, scope, &root, |_| {}).await;
        let started = std::time::Instant::now();
        let refused = carols_query(proxy.port()).await.expect("refused");
        assert!(refused.contains(why), "{refused}");
        assert!(started.elapsed() < Duration::from_secs(10), "at once");
        proxy.stop().await;
    }
}

/// `GET path` on the admin endpoint: the status code.
async fn admin_get(admin: std::net::SocketAddr, path: &str, token: Option<&str>) -> u16 {
    let mut s = TcpStream::connect(admin).await.unwrap();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let req = format!("GET {path} HTTP/1.1\r\nHost: {HERE}\r\nConnection: close\r\n{auth}\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut text = String::new();
    tokio::time::timeout(LONG, s.read_to_string(&mut text))
        .await
        .expect("an answer")
        .unwrap();
    text.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// Sockets opened to the admin endpoint and left silent are closed (after the header
/// timeout, or at once past the connection cap), so they cannot use up patroxy's file
/// descriptors; the cluster's details need the token; probes need none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_endpoint_keeps_no_silent_sockets_and_guards_what_it_tells() {
    install_metrics();
    let (_root, etcd, pg) = one_primary("hadmin").await;
    let proxy = Proxy::start(&etcd, "hadmin", |cfg| {
        cfg.admin.listen = Some(format!("{HERE}:0"));
        cfg.admin.token = Some(patroxy::config::Secret::new("s3cret"));
        cfg.admin.header_timeout = Duration::from_millis(500);
        cfg.admin.max_connections = 8;
    })
    .await;
    let admin = proxy.admin.unwrap();
    let mut silent = Vec::new();
    for _ in 0..100 {
        silent.push(TcpStream::connect(admin).await.unwrap());
    }
    for s in &mut silent {
        let mut byte = [0u8; 1];
        let closed = tokio::time::timeout(Duration::from_secs(5), s.read(&mut byte)).await;
        assert!(
            matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
            "a silent socket closed"
        );
    }
    drop(silent);
    let (mut client, _, _) = session_from(HERE, proxy.port()).await;
    assert_eq!(run(&mut client, "SELECT 1").await, None, "clients served");
    assert_eq!(admin_get(admin, "/health", None).await, 200);
    assert_eq!(admin_get(admin, "/metrics", None).await, 401);
    assert_eq!(admin_get(admin, "/topology", Some("wrong!")).await, 401);
    assert_eq!(admin_get(admin, "/metrics", Some("s3cret")).await, 200);
    assert_eq!(admin_get(admin, "/topology", Some("s3cret")).await, 200);
    let _ = pg;
    proxy.stop().await;
}

/// An unknown name's salt comes from `auth.salt_key` only: instances that share the key
/// agree whatever their files hold, and nothing in it can be used to test guesses of the
/// file's passwords (a salt made from them could be).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_salts_come_from_the_salt_key_not_from_the_file() {
    let (root, etcd, _pg) = one_primary("hsalt").await;
    let start = |name: &'static str, password: &'static str| {
        let file = root.path().join(format!("{name}.txt"));
        std::fs::write(&file, format!("\"carol\" \"{password}\"\n")).unwrap();
        Proxy::start(&etcd, "hsalt", move |cfg| {
            cfg.listeners[0].pool_mode = patroxy::config::PoolMode::Session;
            cfg.auth.auth_file = Some(file);
            cfg.auth.salt_key = Some(patroxy::config::Secret::new("shared by the instances"));
        })
    };
    let (a, b) = (start("a", "sesame").await, start("b", "another").await);
    assert_eq!(
        salt_of(a.port(), "nobody", "postgres").await,
        salt_of(b.port(), "nobody", "postgres").await,
        "the same salt on both, though their files differ"
    );
    a.stop().await;
    b.stop().await;
}

/// A client waiting for a server connection (the pool's only one is held) that streams a
/// huge message meanwhile has patroxy hold a bounded part of it; the rest waits in its own
/// socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_waiting_in_line_cannot_fill_patroxys_memory() {
    let (_root, etcd, _pg) = one_primary("hwait").await;
    let proxy = trusted_transaction_pool(&etcd, "hwait", |cfg| {
        cfg.pool.pool_size = 1;
    })
    .await;
    let (mut holder, _, _) = session_from(HERE, proxy.port()).await;
    assert_eq!(run(&mut holder, "BEGIN").await, None);
    let (mut waiting, _, _) = session_from(HERE, proxy.port()).await;
    const HUGE: usize = 64 << 20;
    let mut header = vec![b'Q'];
    header.extend_from_slice(&((HUGE + 4) as u32).to_be_bytes());
    waiting.write_all(&header).await.unwrap();
    let chunk = vec![b' '; 1 << 20];
    let mut written = 0;
    let stream = async {
        while written < HUGE {
            waiting.write_all(&chunk).await.unwrap();
            written += chunk.len();
        }
    };
    // Either all of it went (patroxy read it all) or the writes stopped: patroxy stopped.
    let _ = tokio::time::timeout(Duration::from_secs(5), stream).await;
    assert!(
        written < 16 << 20,
        "patroxy took {} MiB of a waiting client's message",
        written >> 20
    );
    drop(waiting);
    assert_eq!(
        run(&mut holder, "COMMIT").await,
        None,
        "the holder is served"
    );
    proxy.stop().await;
}

/// A replication connection through a pooled listener gets patroxy's tagged key too (so any
/// instance routes its cancel), never the server's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replication_client_gets_patroxys_key() {
    let (_root, etcd, _pg) = one_primary("hrepl").await;
    let proxy = trusted_transaction_pool(&etcd, "hrepl", |_| {}).await;
    let mut s = connect_from(HERE, proxy.port()).await;
    let params = [
        ("user", "postgres"),
        ("database", "postgres"),
        ("replication", "database"),
    ];
    s.write_all(&startup_message(0, &params)).await.unwrap();
    let mut pid = None;
    loop {
        match message(&mut s).await {
            (b'K', body) => pid = Some(i32::from_be_bytes([body[0], body[1], body[2], body[3]])),
            (b'Z', _) => break,
            (b'E', body) => panic!("refused: {}", String::from_utf8_lossy(&body)),
            _ => {}
        }
    }
    let pid = pid.expect("a BackendKeyData");
    assert!(pid >= 1 << 23, "a tagged key, not the server's pid {pid}");
    proxy.stop().await;
}

/// patroxy in front of `scope` with a transaction pool, trusting loopback; `tune` adjusts it.
async fn trusted_transaction_pool(
    etcd: &Etcd,
    scope: &str,
    tune: impl FnOnce(&mut patroxy::config::Config),
) -> Proxy {
    Proxy::start(etcd, scope, |cfg| {
        cfg.listeners[0].pool_mode = patroxy::config::PoolMode::Transaction;
        cfg.auth.trust = vec!["127.0.0.1/32".parse().unwrap()];
        tune(cfg);
    })
    .await
}

/// Writes `n` copies of `byte`, a MiB at a time (the test holds no more than that).
async fn write_repeated(s: &mut TcpStream, byte: u8, n: usize) {
    write_repeated_lossy(s, byte, n).await.unwrap();
}

/// Reads answers up to ReadyForQuery (or, after an error, the end) without keeping long
/// ones: the bytes of DataRows, the first column of the last row if short, and the
/// SQLSTATE of an error.
async fn answers(s: &mut TcpStream) -> (usize, Option<String>, Option<String>) {
    let (mut row_bytes, mut value, mut failed) = (0, None, None);
    let mut sink = vec![0u8; 64 * 1024];
    loop {
        let mut head = [0u8; 5];
        let read = tokio::time::timeout(LONG, s.read_exact(&mut head))
            .await
            .expect("an answer");
        if read.is_err() && failed.is_some() {
            return (row_bytes, value, failed);
        }
        read.unwrap();
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize - 4;
        if len > sink.len() {
            let mut left = len;
            while left > 0 {
                let k = left.min(sink.len());
                s.read_exact(&mut sink[..k]).await.unwrap();
                left -= k;
            }
            row_bytes += len;
            continue;
        }
        let body = &mut sink[..len];
        s.read_exact(body).await.unwrap();
        match head[0] {
            b'D' => {
                row_bytes += len;
                value = Some(String::from_utf8_lossy(&body[6..]).into_owned());
            }
            b'E' => {
                failed = body
                    .split(|b| *b == 0)
                    .find(|f| f.first() == Some(&b'C'))
                    .map(|f| String::from_utf8_lossy(&f[1..]).into_owned())
            }
            b'Z' => return (row_bytes, value, failed),
            _ => {}
        }
    }
}

/// The highest RSS sampled while `work` runs, in KiB.
async fn peak_rss_during<T>(work: impl std::future::Future<Output = T>) -> (T, u64) {
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(rss_kib()));
    let sampler = {
        let peak = peak.clone();
        tokio::spawn(async move {
            loop {
                peak.fetch_max(rss_kib(), std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let out = work.await;
    sampler.abort();
    let peak = peak.fetch_max(rss_kib(), std::sync::atomic::Ordering::Relaxed);
    (out, peak)
}

/// A 500 MB row, a 200 MB parameter and a 100 MB query text go through a transaction pool
/// as they come: patroxy holds a few frames' worth, not the message, and others are served
/// meanwhile. A Parse longer than `pool.client_memory` is refused with 54000.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_messages_through_a_transaction_pool_hold_little_memory() {
    let (_root, etcd, _pg) = one_primary("hhuge").await;
    let proxy = trusted_transaction_pool(&etcd, "hhuge", |cfg| {
        cfg.pool.pool_size = 2;
        cfg.pool.client_memory = 1 << 20;
    })
    .await;
    let port = proxy.port();
    let (mut other, _, _) = session_from(HERE, port).await;
    assert_eq!(run(&mut other, "SELECT 1").await, None);
    let (mut s, _, _) = session_from(HERE, port).await;
    let before = rss_kib();
    const ROW: usize = 500_000_000;
    const PARAM: usize = 200_000_000;
    const TEXT: usize = 100_000_000;
    let (results, peak) = peak_rss_during(async {
        // A result's row.
        s.write_all(&query(&format!("SELECT repeat('x', {ROW})")))
            .await
            .unwrap();
        let served = tokio::spawn(async move {
            let r = run(&mut other, "SELECT 1").await;
            (other, r)
        });
        let row = answers(&mut s).await;
        let (other, served) = served.await.unwrap();
        // A named statement's parameter (the Bind is renamed and its parameters follow).
        let mut m = b"P\0\0\0\x1cbig\0SELECT length($1)\0\0\0".to_vec();
        let bind_len = 4 + 1 + 4 + 2 + 2 + 4 + PARAM + 2;
        m.push(b'B');
        m.extend_from_slice(&(bind_len as u32).to_be_bytes());
        m.extend_from_slice(b"\0big\0\0\0\0\x01");
        m.extend_from_slice(&(PARAM as u32).to_be_bytes());
        s.write_all(&m).await.unwrap();
        write_repeated(&mut s, b'y', PARAM).await;
        s.write_all(b"\0\0E\0\0\0\x09\0\0\0\0\0S\0\0\0\x04")
            .await
            .unwrap();
        let param = answers(&mut s).await;
        // A simple query's text.
        let prefix = b"SELECT length('";
        let mut m = vec![b'Q'];
        m.extend_from_slice(&((4 + prefix.len() + TEXT + 3) as u32).to_be_bytes());
        m.extend_from_slice(prefix);
        s.write_all(&m).await.unwrap();
        write_repeated(&mut s, b'z', TEXT).await;
        s.write_all(b"')\0").await.unwrap();
        let text = answers(&mut s).await;
        (row, served, param, text, other)
    })
    .await;
    let (row, served, param, text, mut other) = results;
    assert_eq!((row.0 >= ROW, row.2), (true, None), "the row came whole");
    assert_eq!(served, None, "another client was served meanwhile");
    assert_eq!(param.1.as_deref(), Some("200000000"), "{param:?}");
    assert_eq!(text.1.as_deref(), Some("100000000"), "{text:?}");
    let grew = peak.saturating_sub(before);
    eprintln!("800 MB through a transaction pool: RSS {before} -> peak {peak} KiB (+{grew} KiB)");
    assert!(grew < 64 * 1024, "RSS grew {grew} KiB");

    // A Parse longer than pool.client_memory: 54000, and the others go on.
    let long = "SELECT 1 -- ".to_owned() + &"w".repeat(2 << 20);
    let mut m = vec![b'P'];
    m.extend_from_slice(&((4 + 2 + long.len() + 1 + 2) as u32).to_be_bytes());
    m.extend_from_slice(b"s\0");
    m.extend_from_slice(long.as_bytes());
    m.extend_from_slice(b"\0\0\0S\0\0\0\x04");
    s.write_all(&m).await.unwrap();
    let refused = answers(&mut s).await;
    assert_eq!(refused.2.as_deref(), Some("54000"), "{refused:?}");
    assert_eq!(run(&mut other, "SELECT 1").await, None);

    // Many small statements count too (each at its size and some), and so do settings.
    let (mut s, _, _) = session_from(HERE, port).await;
    let mut batch = Vec::new();
    for i in 0..5000 {
        let body = format!("s{i}\0SELECT {i}\0\0\0");
        batch.push(b'P');
        batch.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        batch.extend_from_slice(body.as_bytes());
    }
    batch.extend_from_slice(b"S\0\0\0\x04");
    s.write_all(&batch).await.unwrap();
    let refused = answers(&mut s).await;
    assert_eq!(
        refused.2.as_deref(),
        Some("54000"),
        "5000 statements: {refused:?}"
    );
    let (mut s, _, _) = session_from(HERE, port).await;
    let value = "v".repeat(60_000);
    let mut code = None;
    for i in 0..40 {
        // The FATAL may come after the last SET's answer: this write may find it closed.
        let _ = s
            .write_all(&query(&format!("SET app.s{i} = '{value}'")))
            .await;
        code = answers(&mut s).await.2;
        if code.is_some() {
            break;
        }
    }
    assert_eq!(code.as_deref(), Some("54000"), "40 settings of 60 kB");
    assert_eq!(run(&mut other, "SELECT 1").await, None);
    proxy.stop().await;
}

/// A client of protocol 3.2 gets a 32-byte cancel secret (as PostgreSQL 18 gives), which
/// works; a 3.0 client keeps 3.0's 4 bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_3_2_clients_get_long_cancel_keys() {
    let (_root, etcd, pg) = one_primary("hkey32").await;
    let proxy = trusted_transaction_pool(&etcd, "hkey32", |_| {}).await;
    let (_, _, short) = session_from(HERE, proxy.port()).await;
    assert_eq!(short.len(), 4);
    let mut s = connect_from(HERE, proxy.port()).await;
    let params = [("user", "postgres"), ("database", "postgres")];
    s.write_all(&startup_message(2, &params)).await.unwrap();
    let mut key = None;
    loop {
        match message(&mut s).await {
            (b'K', body) => key = Some(body),
            (b'Z', _) => break,
            (tag, body) => assert_ne!(tag, b'E', "{}", String::from_utf8_lossy(&body)),
        }
    }
    let key = key.expect("a BackendKeyData");
    assert_eq!(key.len(), 4 + 32, "a 32-byte secret");
    let pid = i32::from_be_bytes([key[0], key[1], key[2], key[3]]);
    s.write_all(&query("SELECT pg_sleep(60)")).await.unwrap();
    wait_query_running(pg.port, "SELECT pg_sleep(60)").await;
    cancel_from(HERE, proxy.port(), pid, &key[4..]).await;
    let mut code = None;
    loop {
        match message(&mut s).await {
            (b'E', body) => code = Some(String::from_utf8_lossy(&body).contains("57014")),
            (b'Z', _) => break,
            _ => {}
        }
    }
    assert_eq!(code, Some(true), "canceled with the long key");
    proxy.stop().await;
}

/// A server connection lost while a long Bind goes through as it comes: what remains of
/// the message (here, bytes that read as a Query) never runs anywhere; the client's
/// session ends with a FATAL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rest_of_a_long_message_never_runs_after_its_server_is_lost() {
    let (_root, etcd, pg) = one_primary("hcut").await;
    let proxy = trusted_transaction_pool(&etcd, "hcut", |cfg| {
        cfg.pool.pool_size = 2;
    })
    .await;
    let (mut s, _, _) = session_from(HERE, proxy.port()).await;
    const PARAM: usize = 4 << 20;
    let mut m = b"P\0\0\0\x1bup\0SELECT length($1)\0\0\0".to_vec();
    m.push(b'B');
    m.extend_from_slice(&((4 + 1 + 3 + 2 + 2 + 4 + PARAM + 2) as u32).to_be_bytes());
    m.extend_from_slice(b"\0up\0\0\0\0\x01");
    m.extend_from_slice(&(PARAM as u32).to_be_bytes());
    s.write_all(&m).await.unwrap();
    write_repeated(&mut s, b'y', 1 << 20).await;
    // The server connection goes, mid-Bind.
    let direct = connect(pg.port).await.unwrap();
    let others = "SELECT count(*) FROM pg_stat_activity WHERE pid <> pg_backend_pid() AND backend_type = 'client backend'";
    direct
        .simple_query(&others.replace("SELECT count(*)", "SELECT pg_terminate_backend(pid)"))
        .await
        .unwrap();
    wait_for("the server connection to go", LONG, || async {
        let rows = direct.query_one(others, &[]).await.ok()?;
        (rows.get::<_, i64>(0) == 0).then_some(())
    })
    .await;
    // The rest of the parameter: a Query, as a message of its own would be.
    let sql = "CREATE TABLE injected ()";
    let _ = s.write_all(&query(sql)).await;
    let _ = write_repeated_lossy(&mut s, b'y', (1 << 20) - query(sql).len()).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(LONG, s.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out);
    assert!(
        text.contains("08007") && text.contains("middle of a long message"),
        "{text}"
    );
    let found = direct
        .query_one("SELECT to_regclass('injected') IS NOT NULL", &[])
        .await
        .unwrap();
    assert!(
        !found.get::<_, bool>(0),
        "the rest of the Bind ran as a query"
    );
    proxy.stop().await;
}

/// `write_repeated`, stopping at the first error (the other end may have closed).
async fn write_repeated_lossy(s: &mut TcpStream, byte: u8, n: usize) -> std::io::Result<()> {
    let chunk = vec![byte; 1 << 20];
    let mut left = n;
    while left > 0 {
        let k = left.min(chunk.len());
        s.write_all(&chunk[..k]).await?;
        left -= k;
    }
    Ok(())
}

/// What no session read can show is not left for the next client: a custom setting set by
/// a function called by its oid (FunctionCall), or by a statement too long to read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_patroxy_cannot_read_never_reach_the_next_client() {
    let (_root, etcd, _pg) = one_primary("hunread").await;
    let proxy = trusted_transaction_pool(&etcd, "hunread", |cfg| {
        cfg.pool.pool_size = 1;
    })
    .await;
    let (mut a, _, _) = session_from(HERE, proxy.port()).await;
    let (mut b, _, _) = session_from(HERE, proxy.port()).await;
    let tenant = |s: &'static str| format!("SELECT coalesce(current_setting('app.{s}', true), '')");
    // set_config (oid 2078) called through the protocol.
    let mut body = 2078u32.to_be_bytes().to_vec();
    body.extend_from_slice(&[0, 0, 0, 3]);
    for arg in ["app.fn", "evil", "false"] {
        body.extend_from_slice(&(arg.len() as u32).to_be_bytes());
        body.extend_from_slice(arg.as_bytes());
    }
    body.extend_from_slice(&[0, 0]);
    let mut f = vec![b'F'];
    f.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    f.extend_from_slice(&body);
    a.write_all(&f).await.unwrap();
    assert_eq!(answers(&mut a).await.2, None);
    b.write_all(&query(&tenant("fn"))).await.unwrap();
    assert_eq!(
        answers(&mut b).await.1.as_deref(),
        Some(""),
        "set by FunctionCall"
    );
    // A statement longer than patroxy reads.
    let long = format!(
        "SELECT set_config('app.long', 'evil', false) -- {}",
        "x".repeat(70_000)
    );
    a.write_all(&query(&long)).await.unwrap();
    assert_eq!(answers(&mut a).await.2, None);
    b.write_all(&query(&tenant("long"))).await.unwrap();
    assert_eq!(
        answers(&mut b).await.1.as_deref(),
        Some(""),
        "set in a long text"
    );
    // The same while the client is pinned (a temporary table), then unpinned.
    let pinned = format!(
        "SELECT set_config('app.pinned', 'evil', false) -- {}",
        "x".repeat(70_000)
    );
    for sql in ["CREATE TEMP TABLE t ()", &pinned, "DROP TABLE t"] {
        a.write_all(&query(sql)).await.unwrap();
        assert_eq!(answers(&mut a).await.2, None, "{}", &sql[..20]);
    }
    b.write_all(&query(&tenant("pinned"))).await.unwrap();
    assert_eq!(
        answers(&mut b).await.1.as_deref(),
        Some(""),
        "set while pinned"
    );
    proxy.stop().await;
}

/// A client that sends messages patroxy answers itself (Close of a statement) and never
/// reads the answers: they queue up to `pool.client_memory`, then the client gets 54000.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_a_client_never_reads_are_bounded() {
    let (_root, etcd, _pg) = one_primary("hunread2").await;
    let proxy = trusted_transaction_pool(&etcd, "hunread2", |cfg| {
        cfg.pool.client_memory = 1 << 20;
    })
    .await;
    let (mut s, _, _) = session_from(HERE, proxy.port()).await;
    // A transaction begins (so the Closes are relayed), then Closes without end.
    s.write_all(&query("BEGIN")).await.unwrap();
    assert_eq!(answers(&mut s).await.2, None);
    let close = b"C\0\0\0\x08Sxy\0";
    let chunk: Vec<u8> = close
        .iter()
        .copied()
        .cycle()
        .take(close.len() * 8192)
        .collect();
    let mut written = 0usize;
    let flood = async {
        while written < 40 << 20 {
            if s.write_all(&chunk).await.is_err() {
                break;
            }
            written += chunk.len();
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(60), flood).await;
    // patroxy ended the session: the answers it wrote, then the end (not a wait for more).
    let mut sink = vec![0u8; 1 << 20];
    let ended = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match s.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(
        ended.is_ok(),
        "the session still runs after {} MiB of Closes",
        written >> 20
    );
    proxy.stop().await;
}

/// An answer patroxy gives itself waits for the end of a long server message going
/// through: a RowDescription over 64 KiB, then patroxy's CloseComplete, in that order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patroxys_own_answers_never_land_inside_a_long_server_message() {
    let (_root, etcd, _pg) = one_primary("hlongdesc").await;
    let proxy = trusted_transaction_pool(&etcd, "hlongdesc", |_| {}).await;
    let (mut s, _, _) = session_from(HERE, proxy.port()).await;
    let columns: Vec<String> = (0..1200)
        .map(|i| format!("1 AS \"{}_{i}\"", "c".repeat(50)))
        .collect();
    let sql = format!("SELECT {}", columns.join(", "));
    let frame = |tag: u8, body: &[u8]| {
        let mut f = vec![tag];
        f.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        f.extend_from_slice(body);
        f
    };
    let mut batch = frame(b'P', format!("\0{sql}\0\0\0").as_bytes());
    batch.extend(frame(b'D', b"S\0"));
    batch.extend(frame(b'C', b"Snope\0"));
    batch.extend(frame(b'S', b""));
    s.write_all(&batch).await.unwrap();
    let mut tags = Vec::new();
    loop {
        let (tag, body) = message(&mut s).await;
        tags.push(tag);
        if tag == b'T' {
            assert!(
                body.len() > 64 * 1024,
                "a long RowDescription: {}",
                body.len()
            );
        }
        if tag == b'Z' {
            break;
        }
    }
    assert_eq!(String::from_utf8_lossy(&tags), "1tT3Z");
    proxy.stop().await;
}

/// A client cannot forge log lines: a user name with line breaks is logged as one line
/// (the break written as `\n`), by the real binary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_line_break_in_a_user_name_cannot_forge_a_log_line() {
    // A real server refuses the role, quoting its name in its error (which patroxy logs).
    let (_root, etcd, _pg) = one_primary("hlog").await;
    let port = free_port();
    let proxy = common::binary::Binary::start(&[
        "run",
        "--etcd",
        &etcd.url(),
        "--scope",
        "hlog",
        "--primary",
        &format!("{HERE}:{port}"),
    ]);
    wait_for("the listener", LONG, || async move {
        TcpStream::connect((HERE, port)).await.ok()
    })
    .await;
    let mut s = TcpStream::connect((HERE, port)).await.unwrap();
    let user = "mallory\nFORGED level=ERROR patroxy was compromised";
    s.write_all(&startup(user, "postgres")).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(LONG, s.read_to_end(&mut out)).await;
    assert!(
        String::from_utf8_lossy(&out).contains("28000"),
        "refused by the server"
    );
    proxy.wait_log("does not exist", 1).await;
    let (_, log) = proxy.stop().await;
    assert!(log.contains(r"mallory\nFORGED"), "{log}");
    assert!(!log.lines().any(|l| l.starts_with("FORGED")), "{log}");
}
