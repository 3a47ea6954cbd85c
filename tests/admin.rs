//! The admin endpoint against real etcd and PostgreSQL: `/health`, and `/ready` following the
//! watch and the primary.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// GET `path`; the status code and the body.
async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: patroxy\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

async fn wait_status(addr: SocketAddr, path: &str, want: u16) -> String {
    wait_for(
        &format!("{path} to answer {want}"),
        Duration::from_secs(60),
        || async move {
            let (status, body) = get(addr, path).await;
            (status == want).then_some(body)
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_follows_the_watch_and_the_primary() {
    let root = TempRoot::new();
    let mut etcd = Etcd::start(&root);
    let pg = Postgres::primary(&root, "a");
    let mut keys = Keys::new(&etcd, "admin").await;
    keys.member("a", pg.port, "primary", "running").await;
    keys.leader("a").await;
    let proxy = Proxy::start(&etcd, "admin", |cfg| {
        cfg.admin.listen = Some("127.0.0.1:0".into());
        cfg.etcd.dial_timeout = Duration::from_millis(500);
        cfg.etcd.request_timeout = Duration::from_secs(1);
    })
    .await;
    let admin = proxy.admin.unwrap();
    assert_eq!(get(admin, "/health").await.0, 200);
    wait_status(admin, "/ready", 200).await;
    assert_eq!(get(admin, "/nope").await.0, 404);

    // etcd gone: not ready, though the last topology still routes.
    etcd.kill();
    let why = wait_status(admin, "/ready", 503).await;
    assert!(why.contains("the etcd watch is down"), "{why}");
    assert_eq!(get(admin, "/health").await.0, 200, "alive all along");
    assert_eq!(server_port(proxy.port()).await.unwrap(), pg.port as i32);

    // etcd back: ready again.
    etcd.restart();
    wait_status(admin, "/ready", 200).await;

    // No leader: not ready, with the reason.
    let mut keys = Keys::new(&etcd, "admin").await;
    keys.delete("leader").await;
    let why = wait_status(admin, "/ready", 503).await;
    assert!(why.contains("admin: the cluster has no leader"), "{why}");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_with_real_sessions_and_a_leader_change() {
    install_metrics();
    let root = TempRoot::new();
    let etcd = Etcd::start(&root);
    let a = Postgres::primary(&root, "a");
    let b = Postgres::primary(&root, "b");
    let mut keys = Keys::new(&etcd, "metered").await;
    keys.member("a", a.port, "primary", "running").await;
    keys.member("b", b.port, "replica", "running").await;
    keys.leader("a").await;
    let proxy = Proxy::start(&etcd, "metered", |cfg| {
        cfg.admin.listen = Some("127.0.0.1:0".into());
        cfg.listeners = vec![listener("metered", patroxy::policy::ListenerRole::Primary)];
    })
    .await;
    let admin = proxy.admin.unwrap();
    wait_routed(proxy.port(), a.port).await;
    let (idle, idle_conn) = connect_with(proxy.port(), "").await.unwrap();
    idle.simple_query("SELECT 1").await.unwrap();
    keys.leader("b").await;
    assert_eq!(
        ended_within(idle_conn, AT_REST).await.as_deref(),
        Some("57P01")
    );
    wait_routed(proxy.port(), b.port).await;

    assert_eq!(get(admin, "/metrics").await.0, 200);
    let l = r#"listener="metered""#;
    // A session is counted closed once patroxy has seen the client go: wait for it.
    let m = wait_for(
        "the closed sessions to be counted",
        Duration::from_secs(30),
        || async move {
            let (_, m) = get(admin, "/metrics").await;
            let closed = sample(&m, "patroxy_sessions_closed_total", &[l]);
            let drained = sample(
                &m,
                "patroxy_sessions_closed_total",
                &[l, r#"reason="drained""#],
            );
            // Three sessions ended: the idle one (drained) and the two probes of wait_routed.
            // A probe may still be open at the leader change and be drained too, and one
            // whose client closes its socket before reading the answer to its statement's
            // Close (tokio-postgres sends it as the client goes) may end in a reset: only
            // the count of every reason together is certain.
            let (closed, drained) = (closed.unwrap_or(0.0), drained.unwrap_or(0.0));
            (closed >= 3.0 && drained >= 1.0).then_some(m)
        },
    )
    .await;
    assert!(
        sample(&m, "patroxy_sessions_accepted_total", &[l]).unwrap() >= 3.0,
        "{m}"
    );
    assert!(
        sample(
            &m,
            "patroxy_drains_total",
            &[l, r#"reason="primary_moved""#]
        ) >= Some(1.0)
    );
    assert!(sample(&m, "patroxy_bytes_total", &[l, "server_to_client"]).unwrap() > 0.0);
    let c = r#"cluster="metered""#;
    assert!(
        sample(&m, "patroxy_leader_changes_total", &[c]).unwrap() >= 1.0,
        "{m}"
    );
    assert!(sample(&m, "patroxy_topology_epoch", &[c]).unwrap() >= 2.0);
    assert!(sample(&m, "patroxy_etcd_last_event_timestamp_seconds", &[c]).unwrap() > 1.7e9);
    assert!(
        sample(&m, "patroxy_backend_connect_seconds_count", &[l]).unwrap() >= 3.0,
        "{m}"
    );
    assert!(
        m.contains("patroxy_backend_connect_seconds_bucket"),
        "a histogram, not a summary"
    );
    proxy.stop().await;
}

/// The metric names the README documents, from its metrics table.
fn documented_metrics() -> Vec<String> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    readme
        .lines()
        .filter_map(|l| l.strip_prefix("| `patroxy_"))
        .filter_map(|l| l.split('`').next())
        .map(|name| format!("patroxy_{name}"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_instance_exports_every_documented_metric_at_zero() {
    let root = TempRoot::new();
    let etcd = Etcd::start(&root);
    let (port, admin) = (free_port(), free_port());
    let proxy = common::binary::Binary::start(&[
        "run",
        "--etcd",
        &etcd.url(),
        "--scope",
        "fresh",
        "--primary",
        &format!("127.0.0.1:{port}"),
        "--admin",
        &format!("127.0.0.1:{admin}"),
    ]);
    let addr: SocketAddr = format!("127.0.0.1:{admin}").parse().unwrap();
    wait_for(
        "the admin endpoint",
        Duration::from_secs(30),
        || async move { TcpStream::connect(addr).await.ok() },
    )
    .await;
    let metrics = wait_status(addr, "/metrics", 200).await;
    let names = documented_metrics();
    assert!(names.len() >= 16, "the README's metrics table: {names:?}");
    let missing: Vec<&String> = names
        .iter()
        .filter(|n| {
            let series = [format!("{n}{{"), format!("{n} "), format!("{n}_count{{")];
            !metrics
                .lines()
                .any(|l| series.iter().any(|s| l.starts_with(s)))
        })
        .collect();
    assert!(missing.is_empty(), "missing {missing:?} in\n{metrics}");
    // Known labels, at zero, before anything happened.
    for (name, labels) in [
        ("patroxy_leader_changes_total", &[r#"cluster="fresh""#][..]),
        ("patroxy_etcd_watch_errors_total", &[r#"cluster="fresh""#]),
        ("patroxy_clients_waiting", &[r#"listener="primary""#]),
        ("patroxy_config_reloads_total", &[r#"result="refused""#]),
        (
            "patroxy_sessions_closed_total",
            &[r#"listener="primary""#, r#"reason="drained""#],
        ),
        (
            "patroxy_connect_failures_total",
            &[r#"listener="primary""#, r#"reason="no_server""#],
        ),
    ] {
        assert_eq!(
            sample(&metrics, name, labels),
            Some(0.0),
            "{name} {labels:?}"
        );
    }
    let (status, log) = proxy.stop().await;
    assert!(status.success(), "{log}");
}
