//! patroxy in front of real PostgreSQL servers, driven by Patroni-shaped keys that each test
//! writes into a real etcd itself.

mod common;

use std::time::Duration;

use common::*;
use patroxy::policy::ListenerRole;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const LONG: Duration = Duration::from_secs(30);

/// Two independent primaries, `a` and `b`, registered as members, with `a` the leader.
struct TwoPrimaries {
    etcd: Etcd,
    a: Postgres,
    b: Postgres,
    keys: Keys,
    /// Last: fields drop in order, and the servers above must stop before it goes.
    _root: TempRoot,
}

async fn two_primaries(scope: &str) -> TwoPrimaries {
    let root = TempRoot::new();
    let etcd = Etcd::start(&root);
    let a = Postgres::primary(&root, "a");
    let b = Postgres::primary(&root, "b");
    let mut keys = Keys::new(&etcd, scope).await;
    keys.member("a", a.port, "primary", "running").await;
    keys.member("b", b.port, "replica", "running").await;
    keys.leader("a").await;
    TwoPrimaries {
        _root: root,
        etcd,
        a,
        b,
        keys,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_reach_the_leader_and_sessions_drain_when_it_moves() {
    let mut c = two_primaries("drain").await;
    let proxy = Proxy::start(&c.etcd, "drain", |cfg| {
        // Long enough that "at the next rest point" and "at the deadline" are distinguishable.
        cfg.timeouts.drain = Duration::from_secs(20);
    })
    .await;
    wait_routed(proxy.port(), c.a.port).await;

    let (idle, idle_conn) = connect_with(proxy.port(), "").await.unwrap();
    idle.simple_query("SELECT 1").await.unwrap();
    let (in_tx, in_tx_conn) = connect_with(proxy.port(), "").await.unwrap();
    in_tx
        .batch_execute("BEGIN; CREATE TABLE t(x int)")
        .await
        .unwrap();
    let (busy, busy_conn) = connect_with(proxy.port(), "").await.unwrap();
    let busy_query = tokio::spawn(async move {
        let r = busy.simple_query("SELECT pg_sleep(3)").await;
        (busy, r)
    });
    // The sleep must be running on the server before the leader moves.
    wait_query_running(c.a.port, "SELECT pg_sleep(3)").await;

    c.keys.leader("b").await;

    // Idle and between-statements sessions end at once with 57P01...
    assert_eq!(
        ended_within(idle_conn, AT_REST).await.as_deref(),
        Some("57P01")
    );
    assert_eq!(
        ended_within(in_tx_conn, AT_REST).await.as_deref(),
        Some("57P01")
    );
    assert!(!busy_query.is_finished(), "the running query was cut short");
    // ...and the busy one gets its answer first, then the same goodbye.
    let (busy, r) = busy_query.await.unwrap();
    assert!(r.is_ok(), "the running query must complete: {r:?}");
    assert_eq!(
        ended_within(busy_conn, AT_REST).await.as_deref(),
        Some("57P01")
    );
    assert!(busy.is_closed());
    // The aborted transaction left nothing behind on a.
    let direct = connect(c.a.port).await.unwrap();
    let row = direct
        .query_one("SELECT to_regclass('t') IS NULL", &[])
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0));

    wait_routed(proxy.port(), c.b.port).await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_stuck_on_a_deposed_primary_ends_at_the_drain_deadline() {
    let mut c = two_primaries("stuck").await;
    let proxy = Proxy::start(&c.etcd, "stuck", |cfg| {
        cfg.timeouts.drain = Duration::from_millis(300)
    })
    .await;
    wait_routed(proxy.port(), c.a.port).await;
    let (stuck, _conn) = connect_with(proxy.port(), "").await.unwrap();
    let query = tokio::spawn(async move { stuck.simple_query("SELECT pg_sleep(600)").await });
    wait_query_running(c.a.port, "SELECT pg_sleep(600)").await;
    c.keys.leader("b").await;
    let err = tokio::time::timeout(LONG, query)
        .await
        .expect("stuck query never ended")
        .unwrap()
        .unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("57P01"), "{err}");
    assert!(
        message(&err).contains("primary moved from a to b"),
        "{}",
        message(&err)
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_flapping_away_and_back_drains_both_times() {
    let mut c = two_primaries("flap").await;
    let proxy = Proxy::start(&c.etcd, "flap", |_| {}).await;
    wait_routed(proxy.port(), c.a.port).await;
    let (on_a, on_a_conn) = connect_with(proxy.port(), "").await.unwrap();
    on_a.simple_query("SELECT 1").await.unwrap();

    c.keys.leader("b").await;
    wait_routed(proxy.port(), c.b.port).await;
    let (on_b, on_b_conn) = connect_with(proxy.port(), "").await.unwrap();
    let port: i32 = on_b
        .query_one("SELECT inet_server_port()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(port, c.b.port as i32);
    c.keys.leader("a").await;

    assert_eq!(
        ended_within(on_a_conn, AT_REST).await.as_deref(),
        Some("57P01")
    );
    assert_eq!(
        ended_within(on_b_conn, AT_REST).await.as_deref(),
        Some("57P01")
    );
    wait_routed(proxy.port(), c.a.port).await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_leader_new_connections_wait_then_fail_clearly() {
    let mut c = two_primaries("noleader").await;
    let proxy = Proxy::start(&c.etcd, "noleader", |cfg| {
        cfg.timeouts.connect_wait = Duration::from_millis(800);
    })
    .await;
    wait_routed(proxy.port(), c.a.port).await;
    let (_idle, idle_conn) = connect_with(proxy.port(), "").await.unwrap();

    c.keys.delete("leader").await;
    assert_eq!(
        ended_within(idle_conn, AT_REST).await.as_deref(),
        Some("57P01")
    );
    let err = connect(proxy.port()).await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("57P03"), "{err}");
    assert!(message(&err).contains("no leader"), "{}", message(&err));

    // A leader that appears during the wait is used: this client's startup packet is sent
    // while there is no leader, and is answered once there is one.
    let proxy = {
        proxy.stop().await;
        Proxy::start(&c.etcd, "noleader", |cfg| cfg.timeouts.connect_wait = LONG).await
    };
    let mut raw = TcpStream::connect(proxy.addr).await.unwrap();
    raw.write_all(&startup_packet("postgres")).await.unwrap();
    c.keys.leader("b").await;
    let mut first = [0u8; 9];
    tokio::time::timeout(LONG, raw.read_exact(&mut first))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        first,
        [b'R', 0, 0, 0, 8, 0, 0, 0, 0],
        "AuthenticationOk from b (trust)"
    );
    assert_eq!(server_port(proxy.port()).await.unwrap(), c.b.port as i32);
    proxy.stop().await;
}

/// A protocol 3.0 StartupMessage for `user`.
fn startup_packet(user: &str) -> Vec<u8> {
    let mut body = vec![0, 3, 0, 0];
    body.extend_from_slice(b"user\0");
    body.extend_from_slice(user.as_bytes());
    body.extend_from_slice(b"\0\0");
    let mut p = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    p.extend(body);
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_named_leader_is_held_until_it_is_promoted() {
    let root = TempRoot::new();
    let etcd = Etcd::start(&root);
    let primary = Postgres::primary(&root, "p");
    let replica = Postgres::replica_of(&root, "r", &primary);
    let mut keys = Keys::new(&etcd, "promote").await;
    keys.member("p", primary.port, "primary", "running").await;
    // The member key still says replica, as Patroni's does for up to loop_wait.
    keys.member("r", replica.port, "replica", "running").await;
    keys.leader("r").await;

    // Not promoted: refused after connect_wait, with the reason.
    let short = Proxy::start(&etcd, "promote", |cfg| {
        cfg.timeouts.connect_wait = Duration::from_millis(700)
    })
    .await;
    let err = connect(short.port()).await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("57P03"), "{err}");
    assert!(message(&err).contains("in recovery"), "{}", message(&err));
    // The same with a password: the client saw the server's challenge, so the wait ends
    // with a FATAL that says how long it waited.
    let direct = connect(primary.port).await.unwrap();
    direct
        .batch_execute(
            "SET password_encryption = 'scram-sha-256'; CREATE ROLE alice LOGIN PASSWORD 'wonder'",
        )
        .await
        .unwrap();
    let r_port = replica.port;
    wait_for("alice on the standby", LONG, || async move {
        let c = connect(r_port).await.ok()?;
        let row = c.query_one("SELECT count(*) FROM pg_roles WHERE rolname = 'alice'", &[]);
        (row.await.ok()?.get::<_, i64>(0) == 1).then_some(())
    })
    .await;
    let alice = format!(
        "host=127.0.0.1 port={} user=alice password=wonder dbname=postgres",
        short.port()
    );
    let err = tokio_postgres::connect(&alice, tokio_postgres::NoTls)
        .await
        .err()
        .expect("a standby is no primary");
    assert_eq!(sqlstate(&err).as_deref(), Some("57P03"), "{err}");
    let text = message(&err);
    assert!(
        text.contains("after waiting") && !text.contains("after waiting 0ns"),
        "{text}"
    );
    short.stop().await;

    let proxy = Proxy::start(&etcd, "promote", |cfg| cfg.timeouts.connect_wait = LONG).await;
    let port = proxy.port();
    let waiting = tokio::spawn(async move {
        let c = connect(port).await?;
        let row = c
            .query_one("SELECT inet_server_port(), pg_is_in_recovery()", &[])
            .await?;
        Ok::<_, tokio_postgres::Error>((row.get::<_, i32>(0), row.get::<_, bool>(1)))
    });
    // patroxy holds an authenticated connection on r and asks it again until it is promoted.
    let r_port = replica.port;
    wait_for("patroxy's held connection on the standby", LONG, || async move {
        let direct = connect(r_port).await.ok()?;
        let row = direct
            .query_one("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()", &[])
            .await
            .ok()?;
        (row.get::<_, i64>(0) >= 1).then_some(())
    })
    .await;
    assert!(!waiting.is_finished());
    replica.promote();
    let (port, in_recovery) = waiting.await.unwrap().unwrap();
    assert_eq!((port, in_recovery), (replica.port as i32, false));
    proxy.stop().await;
}

/// Full reads of cluster `scope`'s keys so far (install_metrics first).
fn resyncs(scope: &str) -> f64 {
    let label = format!(r#"cluster="{scope}""#);
    sample(&metrics_text(), "patroxy_etcd_resyncs_total", &[&label]).unwrap_or(0.0)
}

/// The current etcd revision.
async fn revision(keys: &mut Keys) -> i64 {
    let resp = keys.client.get("x", None).await.unwrap();
    resp.header().unwrap().revision()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watch_resumes_after_etcd_restarts_and_reads_again_after_compaction() {
    install_metrics();
    let mut c = two_primaries("resync").await;
    // patroxy reaches etcd through a gate the test can cut.
    let gate = common::gate::Gate::start(c.etcd.port).await;
    let proxy = Proxy::start(&c.etcd, "resync", |cfg| {
        cfg.etcd.endpoints = vec![gate.url()];
    })
    .await;
    wait_routed(proxy.port(), c.a.port).await;
    assert_eq!(resyncs("resync"), 1.0, "the first read");

    // etcd restarts: the watch resumes from its revision, with no second read.
    c.etcd.restart();
    c.keys = Keys::new(&c.etcd, "resync").await;
    c.keys.leader("b").await;
    wait_routed(proxy.port(), c.b.port).await;
    // Killed, with a change made while the watch is down, then back: the same.
    c.etcd.kill();
    c.etcd.restart();
    c.keys = Keys::new(&c.etcd, "resync").await;
    c.keys.leader("a").await;
    wait_routed(proxy.port(), c.a.port).await;
    assert_eq!(resyncs("resync"), 1.0, "resumed, not read again");

    // A compaction while the watch is live changes nothing for it.
    let rev = revision(&mut c.keys).await;
    let physical = Some(etcd_client::CompactionOptions::new().with_physical());
    c.keys.client.compact(rev, physical.clone()).await.unwrap();
    c.keys.leader("b").await;
    wait_routed(proxy.port(), c.b.port).await;

    // Cut off from etcd while the leader moves and the history is compacted: the watch cannot
    // resume from its revision, so it reads everything again and routes right.
    gate.cut();
    c.keys.leader("a").await;
    c.keys.put("status", r#"{"optime":1}"#).await;
    let rev = revision(&mut c.keys).await;
    c.keys.client.compact(rev, physical).await.unwrap();
    gate.heal();
    wait_routed(proxy.port(), c.a.port).await;
    assert_eq!(resyncs("resync"), 2.0, "read again after the compaction");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_requests_reach_the_right_server_through_any_instance() {
    install_metrics();
    let c = two_primaries("cancel").await;
    let one = Proxy::start(&c.etcd, "cancel", |cfg| {
        cfg.listeners = vec![listener("cancel-one", ListenerRole::Primary)];
        cfg.report.instance = Some("one".into());
        cfg.admin.listen = Some("127.0.0.1:0".into());
    })
    .await;
    let two = Proxy::start(&c.etcd, "cancel", |cfg| {
        cfg.listeners = vec![listener("cancel-two", ListenerRole::Primary)];
        cfg.report.instance = Some("two".into());
        cfg.admin.listen = Some("127.0.0.1:0".into());
    })
    .await;
    wait_routed(one.port(), c.a.port).await;
    // Each instance publishes where it takes cancels for its keys; the other follows the
    // reports with a watch.
    wait_peers(&[&one, &two], 2).await;

    for via in [one.port(), two.port()] {
        let (client, _conn) = connect_with(one.port(), "").await.unwrap();
        let token = client.cancel_token();
        let query = tokio::spawn(async move { client.simple_query("SELECT pg_sleep(600)").await });
        wait_query_running(c.a.port, "SELECT pg_sleep(600)").await;
        // Instance two never saw this session: the key's tag says which instance did.
        let stream = TcpStream::connect(("127.0.0.1", via)).await.unwrap();
        token
            .cancel_query_raw(stream, tokio_postgres::NoTls)
            .await
            .unwrap();
        let err = tokio::time::timeout(LONG, query)
            .await
            .unwrap()
            .unwrap()
            .unwrap_err();
        assert_eq!(sqlstate(&err).as_deref(), Some("57014"), "via {via}: {err}");
    }
    // Each cancel took the route it should have: instance one knew the key; two sent it
    // to one, and to no member.
    let count = |listener: &str, routed: &str| {
        let (l, r) = (
            format!(r#"listener="{listener}""#),
            format!(r#"routed="{routed}""#),
        );
        sample(&metrics_text(), "patroxy_cancel_requests_total", &[&l, &r]).unwrap_or(0.0)
    };
    assert_eq!(count("cancel-one", "local"), 2.0, "{}", metrics_text());
    assert_eq!(count("cancel-two", "peer"), 1.0);
    assert_eq!(count("cancel-two", "local"), 0.0);
    one.stop().await;
    two.stop().await;
}

/// Sends `bytes` as a client and returns what patroxy answered before closing.
async fn answer_to(port: u16, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(LONG, s.read_to_end(&mut out))
        .await
        .expect("patroxy neither answered nor closed")
        .ok();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_first_packets_get_an_error_and_others_keep_working() {
    let c = two_primaries("garbage").await;
    let proxy = Proxy::start(&c.etcd, "garbage", |cfg| {
        cfg.timeouts.startup = Duration::from_millis(500)
    })
    .await;
    wait_routed(proxy.port(), c.a.port).await;
    let (steady, _conn) = connect_with(proxy.port(), "").await.unwrap();

    let ssl_request = [0, 0, 0, 8, 4, 210, 22, 47];
    let mut after_ssl = ssl_request.to_vec();
    after_ssl.extend_from_slice(b"\x00\x00\x00\x02garbage");
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("zero length", vec![0, 0, 0, 0, 0, 3, 0, 0]),
        ("negative length", vec![0xff, 0xff, 0xff, 0xf0, 0, 3, 0, 0]),
        ("2^31 - 1 length", vec![0x7f, 0xff, 0xff, 0xff, 0, 3, 0, 0]),
        ("truncated", vec![0, 0, 0, 100, 0, 3, 0, 0, b'u']),
        ("protocol 2.0", vec![0, 0, 0, 9, 0, 2, 0, 0, 0]),
        ("protocol 4.0", vec![0, 0, 0, 9, 0, 4, 0, 0, 0]),
        ("http", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
        ("bytes after SSLRequest", after_ssl),
        (
            "a startup without its terminator",
            vec![0, 0, 0, 12, 0, 3, 0, 0, b'u', 0, b'x', 1],
        ),
    ];
    for (what, bytes) in cases {
        let out = answer_to(proxy.port(), &bytes).await;
        let out = out.strip_prefix(b"N").unwrap_or(&out); // the answer to an SSLRequest
        assert_eq!(
            out.first(),
            Some(&b'E'),
            "{what}: expected an ErrorResponse, got {out:?}"
        );
        let text = String::from_utf8_lossy(out);
        assert!(
            text.contains("08P01") || text.contains("0A000"),
            "{what}: {text}"
        );
    }
    // A direct TLS ClientHello is closed without a plaintext answer it could not read.
    assert_eq!(
        answer_to(proxy.port(), &[0x16, 3, 1, 0, 5, 1, 0, 0, 1, 0]).await,
        b""
    );

    steady.simple_query("SELECT 1").await.unwrap();
    assert_eq!(server_port(proxy.port()).await.unwrap(), c.a.port as i32);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_and_md5_pass_through_untouched() {
    let c = two_primaries("auth").await;
    let direct = connect(c.a.port).await.unwrap();
    direct
        .batch_execute(
            "SET password_encryption = 'scram-sha-256'; CREATE ROLE alice LOGIN PASSWORD 'wonder';
             SET password_encryption = 'md5'; CREATE ROLE bob LOGIN PASSWORD 'builder';",
        )
        .await
        .unwrap();
    let proxy = Proxy::start(&c.etcd, "auth", |_| {}).await;
    wait_routed(proxy.port(), c.a.port).await;
    for (user, password) in [("alice", "wonder"), ("bob", "builder")] {
        let conn = format!(
            "host=127.0.0.1 port={} user={user} password={password} dbname=postgres",
            proxy.port()
        );
        let (client, conn) = tokio_postgres::connect(&conn, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        let who: String = client
            .query_one("SELECT current_user::text", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(who, user);
        let bad = format!(
            "host=127.0.0.1 port={} user={user} password=wrong dbname=postgres",
            proxy.port()
        );
        let err = tokio_postgres::connect(&bad, tokio_postgres::NoTls)
            .await
            .err()
            .unwrap();
        assert_eq!(sqlstate(&err).as_deref(), Some("28P01"), "{user}: {err}");
    }
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_and_pgbench_run_through_patroxy() {
    let c = two_primaries("clients").await;
    let proxy = Proxy::start(&c.etcd, "clients", |_| {}).await;
    wait_routed(proxy.port(), c.a.port).await;
    let port = proxy.port().to_string();
    let pg = move |bin: &str| {
        let mut cmd = std::process::Command::new(format!("{PG_BIN}/{bin}"));
        cmd.args(["-h", "127.0.0.1", "-p", port.as_str(), "-U", "postgres"])
            .env_remove("PGPASSWORD")
            .env_remove("PGSERVICE");
        cmd
    };
    let out = tokio::task::spawn_blocking(move || {
        let mut psql = pg("psql");
        psql.args([
            "-d",
            "postgres",
            "-XAtc",
            "SELECT inet_server_port(); SELECT 1 + 1;",
        ]);
        let psql = psql.output().unwrap();
        let mut init = pg("pgbench");
        init.args(["-i", "-s", "1", "-q", "postgres"]);
        let init = init.output().unwrap();
        let mut run = pg("pgbench");
        run.args([
            "-n", "-c", "4", "-j", "2", "-t", "200", "-M", "prepared", "postgres",
        ]);
        let run = run.output().unwrap();
        (psql, init, run)
    })
    .await
    .unwrap();
    let (psql, init, run) = out;
    let text = String::from_utf8_lossy(&psql.stdout);
    assert!(
        psql.status.success(),
        "psql: {}",
        String::from_utf8_lossy(&psql.stderr)
    );
    assert_eq!(text.trim(), format!("{}\n2", c.a.port));
    assert!(
        init.status.success(),
        "pgbench -i: {}",
        String::from_utf8_lossy(&init.stderr)
    );
    let report = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "pgbench: {report}{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(
        report.contains("number of transactions actually processed: 800/800"),
        "{report}"
    );
    assert!(
        report.contains("number of failed transactions: 0"),
        "{report}"
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_idle_sessions_and_lets_transactions_finish() {
    let c = two_primaries("shutdown").await;
    let proxy = Proxy::start(&c.etcd, "shutdown", |cfg| {
        // Far beyond AT_REST: sessions must end at their rest point, not at the deadline.
        cfg.timeouts.shutdown = Duration::from_secs(30);
    })
    .await;
    wait_routed(proxy.port(), c.a.port).await;
    let (idle, idle_conn) = connect_with(proxy.port(), "").await.unwrap();
    idle.simple_query("SELECT 1").await.unwrap();
    let (in_tx, in_tx_conn) = connect_with(proxy.port(), "").await.unwrap();
    in_tx
        .batch_execute("BEGIN; CREATE TABLE kept(x int)")
        .await
        .unwrap();

    let port = proxy.port();
    let stopping = tokio::spawn(proxy.stop());
    assert_eq!(
        ended_within(idle_conn, AT_REST).await.as_deref(),
        Some("57P01")
    );
    // The open transaction may still commit; then its session ends.
    in_tx
        .batch_execute("INSERT INTO kept VALUES (1); COMMIT")
        .await
        .unwrap();
    assert_eq!(
        ended_within(in_tx_conn, AT_REST).await.as_deref(),
        Some("57P01")
    );
    stopping.await.unwrap();
    assert!(
        TcpStream::connect(("127.0.0.1", port)).await.is_err(),
        "still accepting"
    );
    let direct = connect(c.a.port).await.unwrap();
    let n: i64 = direct
        .query_one("SELECT count(*) FROM kept", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_gives_up_between_connect_retries_is_let_go_at_once() {
    install_metrics();
    let root = TempRoot::new();
    let etcd = Etcd::start(&root);
    // The leader key names a server nobody listens on: every attempt fails, and patroxy
    // retries within connect_wait.
    let mut keys = Keys::new(&etcd, "gaveup").await;
    keys.member("a", free_port(), "primary", "running").await;
    keys.leader("a").await;
    let proxy = Proxy::start(&etcd, "gaveup", |cfg| {
        cfg.listeners = vec![listener("gaveup", ListenerRole::Primary)];
        cfg.timeouts.connect_wait = Duration::from_secs(60);
    })
    .await;
    let gone = || {
        let labels = [r#"listener="gaveup""#, r#"reason="client_gone""#];
        sample(&metrics_text(), "patroxy_connect_failures_total", &labels).unwrap_or(0.0)
    };
    // The client gives up after its own second (dropped, its socket closes).
    let conninfo = format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres",
        proxy.port()
    );
    let attempt = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls);
    assert!(tokio::time::timeout(Duration::from_secs(1), attempt)
        .await
        .is_err());
    wait_for("the attempt abandoned", Duration::from_secs(10), || async {
        (gone() >= 1.0).then_some(())
    })
    .await;
    proxy.stop().await;
}
