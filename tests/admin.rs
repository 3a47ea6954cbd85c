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
