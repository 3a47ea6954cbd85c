//! Read routing in front of real PostgreSQL: one primary and two streaming replicas made with
//! pg_basebackup, described by Patroni-shaped keys that each test writes into a real etcd.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use patroxy::policy::{Balance, ListenerRole};

const LONG: Duration = Duration::from_secs(30);
/// The leader's WAL position in the `status` key; replicas at it have no lag.
const OPTIME: u64 = 100 << 20;

struct ThreeNodes {
    etcd: Etcd,
    p: Postgres,
    r1: Postgres,
    r2: Postgres,
    keys: Keys,
    /// Last: fields drop in order, and the servers above must stop before it goes.
    _root: TempRoot,
}

impl ThreeNodes {
    async fn start(scope: &str) -> ThreeNodes {
        let root = TempRoot::new();
        let etcd = Etcd::start(&root);
        let p = Postgres::primary(&root, "p");
        let r1 = Postgres::replica_of(&root, "r1", &p);
        let r2 = Postgres::replica_of(&root, "r2", &p);
        let mut keys = Keys::new(&etcd, scope).await;
        keys.put("status", &format!(r#"{{"optime":{OPTIME}}}"#))
            .await;
        keys.member_with(
            "p",
            p.port,
            "primary",
            "running",
            &format!(r#""xlog_location":{OPTIME}"#),
        )
        .await;
        let mut n = ThreeNodes {
            _root: root,
            etcd,
            p,
            r1,
            r2,
            keys,
        };
        n.replica_key("r1", "running", "").await;
        n.replica_key("r2", "running", "").await;
        n.keys.leader("p").await;
        n
    }

    /// Writes a replica's member key: caught up, in `state`, with extra fields (tags, lag).
    async fn replica_key(&mut self, name: &str, state: &str, extra: &str) {
        let port = if name == "r1" {
            self.r1.port
        } else {
            self.r2.port
        };
        let lsn = if extra.contains("replay_lsn") {
            String::new()
        } else {
            format!(r#","replay_lsn":{OPTIME}"#)
        };
        let fields = format!(
            r#""xlog_location":{OPTIME}{lsn}{}{extra}"#,
            if extra.is_empty() { "" } else { "," }
        );
        self.keys
            .member_with(name, port, "replica", state, &fields)
            .await;
    }
}

/// Connects through `port` and returns the session with its server's port.
async fn session(
    port: u16,
) -> (
    tokio_postgres::Client,
    tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
    u16,
) {
    let (c, conn) = connect_with(port, "").await.unwrap();
    let p: i32 = c
        .query_one("SELECT inet_server_port()", &[])
        .await
        .unwrap()
        .get(0);
    (c, conn, p as u16)
}

/// Where `n` fresh sessions through `port` land, by server port.
async fn spread(port: u16, n: usize) -> BTreeMap<u16, usize> {
    try_spread(port, n).await.unwrap()
}

/// `spread`, for a wait while the topology changes: a probe session on a replica that has just
/// left the pool is drained (57P01, or closed before the client read it) mid-query, which is
/// the proxy working, not a failure. Any other error is.
async fn try_spread(port: u16, n: usize) -> Result<BTreeMap<u16, usize>, tokio_postgres::Error> {
    let drained = |e: tokio_postgres::Error| {
        let ok = e.is_closed() || sqlstate(&e).as_deref() == Some("57P01");
        assert!(ok, "a probe session failed: {e:?}");
        e
    };
    let mut counts = BTreeMap::new();
    for _ in 0..n {
        let c = connect(port).await.map_err(drained)?;
        let row = c
            .query_one("SELECT inet_server_port(), pg_is_in_recovery()", &[])
            .await
            .map_err(drained)?;
        assert!(
            row.get::<_, bool>(1),
            "a read session reached a server not in recovery"
        );
        *counts.entry(row.get::<_, i32>(0) as u16).or_default() += 1;
    }
    Ok(counts)
}

async fn wait_spread_only(port: u16, only: u16) {
    wait_for(
        &format!("reads to go only to {only}"),
        LONG,
        || async move {
            let s = try_spread(port, 6).await.ok()?;
            (s.keys().all(|p| *p == only)).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_spread_evenly_over_replicas_and_never_reach_the_primary() {
    let mut n = ThreeNodes::start("spread").await;
    let proxy = Proxy::start(&n.etcd, "spread", |cfg| {
        cfg.listeners = vec![
            listener("rw", ListenerRole::Primary),
            listener("ro", ListenerRole::Replica),
            ListenerConfig {
                balance: Balance::RoundRobin,
                ..listener("rr", ListenerRole::Replica)
            },
            listener("sync", ListenerRole::Sync),
        ];
    })
    .await;
    assert_eq!(
        server_port(proxy.port_of("rw")).await.unwrap(),
        n.p.port as i32
    );
    for name in ["ro", "rr"] {
        let counts = spread(proxy.port_of(name), 200).await;
        eprintln!("{name}: {counts:?}");
        assert_eq!(counts.len(), 2, "{name}: {counts:?}");
        for port in [n.r1.port, n.r2.port] {
            let c = counts[&port];
            if name == "rr" {
                // Round robin takes strict turns.
                assert_eq!(c, 100, "{name}: {counts:?}");
            } else {
                // Least connections sees the last session's count drop a moment late.
                assert!(
                    (80..=120).contains(&c),
                    "{name}: {counts:?} is not within 20% of even"
                );
            }
        }
    }
    n.keys
        .put("sync", r#"{"leader":"p","sync_standby":"r2"}"#)
        .await;
    wait_spread_only(proxy.port_of("sync"), n.r2.port).await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_connections_sends_new_sessions_to_the_less_busy_replica() {
    let mut n = ThreeNodes::start("least").await;
    let proxy = Proxy::start(&n.etcd, "least", |cfg| {
        cfg.listeners = vec![listener("ro", ListenerRole::Replica)];
    })
    .await;
    // r2 out of the pool while r1 takes ten long sessions.
    n.replica_key("r2", "running", r#""tags":{"noloadbalance":true}"#)
        .await;
    wait_spread_only(proxy.port(), n.r1.port).await;
    let mut held = Vec::new();
    for _ in 0..10 {
        let (c, conn, on) = session(proxy.port()).await;
        assert_eq!(on, n.r1.port);
        held.push((c, conn));
    }
    n.replica_key("r2", "running", "").await;
    let r2_port = n.r2.port;
    let port = proxy.port();
    wait_for("r2 back in the pool", LONG, || async move {
        (try_spread(port, 1).await.ok()?.contains_key(&r2_port)).then_some(())
    })
    .await;
    // Ten new long sessions all go to r2, the replica with fewer.
    let mut fresh = Vec::new();
    for _ in 0..10 {
        let (c, conn, on) = session(proxy.port()).await;
        fresh.push((c, conn, on));
    }
    let on_r2 = fresh.iter().filter(|(_, _, on)| *on == n.r2.port).count();
    // 10 of 10, unless the last probe session on r2 was still counted when the tenth new one
    // came (a 10/10 tie); an unweighted spread would give about 5.
    assert!(
        on_r2 >= 9,
        "least-connections sent new sessions to the busy replica: {on_r2} of 10 on r2"
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_untagged_or_stopped_replicas_are_excluded_and_drained() {
    let mut n = ThreeNodes::start("eligible").await;
    let proxy = Proxy::start(&n.etcd, "eligible", |cfg| {
        cfg.listeners = vec![listener("ro", ListenerRole::Replica)];
        cfg.timeouts.replica_drain = LONG;
    })
    .await;
    let cases = [
        ("lag", "running", r#""replay_lsn":0"#),
        (
            "noloadbalance",
            "running",
            r#""tags":{"noloadbalance":true}"#,
        ),
        ("stopped", "stopped", ""),
    ];
    for (what, state, extra) in cases {
        let (idle, idle_conn) = session_on(proxy.port(), n.r2.port).await;
        idle.simple_query("SELECT 1").await.unwrap();
        let (in_tx, in_tx_conn) = session_on(proxy.port(), n.r2.port).await;
        in_tx.batch_execute("BEGIN; SELECT 1").await.unwrap();

        n.replica_key("r2", state, extra).await;
        assert_eq!(
            ended_within(idle_conn, AT_REST).await.as_deref(),
            Some("57P01"),
            "{what}"
        );
        // A read transaction may finish; the session ends at its end.
        assert!(
            !in_tx_conn.is_finished(),
            "{what}: the transaction was cut short"
        );
        in_tx.batch_execute("SELECT 2; COMMIT").await.unwrap();
        assert_eq!(
            ended_within(in_tx_conn, AT_REST).await.as_deref(),
            Some("57P01"),
            "{what}"
        );
        let counts = spread(proxy.port(), 10).await;
        assert_eq!(
            counts.keys().copied().collect::<Vec<_>>(),
            vec![n.r1.port],
            "{what}: {counts:?}"
        );

        n.replica_key("r2", "running", "").await;
        let (r2_port, port) = (n.r2.port, proxy.port());
        wait_for("r2 back in the pool", LONG, || async move {
            (try_spread(port, 2).await.ok()?.contains_key(&r2_port)).then_some(())
        })
        .await;
    }
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_refuses_connections_is_skipped_without_client_errors() {
    let mut n = ThreeNodes::start("refuse").await;
    let proxy = Proxy::start(&n.etcd, "refuse", |cfg| {
        cfg.listeners = vec![listener("ro", ListenerRole::Replica)];
    })
    .await;
    // Stopped behind Patroni's back: the keys still say running.
    n.r2.stop();
    let counts = spread(proxy.port(), 20).await;
    assert_eq!(
        counts.keys().copied().collect::<Vec<_>>(),
        vec![n.r1.port],
        "{counts:?}"
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_replicas_prefer_replica_uses_the_primary_and_replica_fails_clearly() {
    let mut n = ThreeNodes::start("alone").await;
    n.keys.delete("members/r1").await;
    n.replica_key("r2", "stopped", "").await;
    let proxy = Proxy::start(&n.etcd, "alone", |cfg| {
        cfg.listeners = vec![
            listener("prefer", ListenerRole::PreferReplica),
            listener("ro", ListenerRole::Replica),
            listener("any", ListenerRole::Any),
        ];
        cfg.timeouts.connect_wait = Duration::from_millis(800);
    })
    .await;
    assert_eq!(
        server_port(proxy.port_of("prefer")).await.unwrap(),
        n.p.port as i32
    );
    assert_eq!(
        server_port(proxy.port_of("any")).await.unwrap(),
        n.p.port as i32
    );
    let err = connect(proxy.port_of("ro")).await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("57P03"), "{err}");
    let msg = message(&err);
    assert!(
        msg.contains("no member is eligible for role replica: r2: it is not running"),
        "{msg}"
    );

    // Once a replica is back, prefer-replica prefers it.
    n.replica_key("r1", "running", "").await;
    let (port, r1) = (proxy.port_of("prefer"), n.r1.port);
    wait_for("prefer-replica to use r1", LONG, || async move {
        (server_port(port).await.ok()? == r1 as i32).then_some(())
    })
    .await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_patroxy_serves_two_clusters_and_a_citus_group() {
    let n = ThreeNodes::start("orders").await;
    let other = Postgres::primary(&n._root, "q");
    let mut citus = Keys::with_prefix(&n.etcd, "/service/citus/1/").await;
    citus.member("q", other.port, "primary", "running").await;
    citus.leader("q").await;
    let proxy = Proxy::start(&n.etcd, "orders", |cfg| {
        let mut group = cfg.clusters[0].clone();
        group.scope = "citus".into();
        group.group = Some(1);
        cfg.clusters.push(group);
        cfg.listeners = vec![
            ListenerConfig {
                cluster: Some("orders".into()),
                ..listener("orders-rw", ListenerRole::Primary)
            },
            ListenerConfig {
                cluster: Some("orders".into()),
                ..listener("orders-ro", ListenerRole::Replica)
            },
            ListenerConfig {
                cluster: Some("citus/1".into()),
                ..listener("citus-rw", ListenerRole::Primary)
            },
        ];
    })
    .await;
    assert_eq!(
        server_port(proxy.port_of("orders-rw")).await.unwrap(),
        n.p.port as i32
    );
    assert_eq!(
        server_port(proxy.port_of("citus-rw")).await.unwrap(),
        other.port as i32
    );
    let counts = spread(proxy.port_of("orders-ro"), 4).await;
    assert!(
        counts.keys().all(|p| *p == n.r1.port || *p == n.r2.port),
        "{counts:?}"
    );
    proxy.stop().await;
}
