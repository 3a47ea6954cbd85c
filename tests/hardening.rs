//! Limits and misuse: connection caps and client allow-lists. Real etcd and PostgreSQL,
//! patroxy in-process. (Floods of half-finished startups measure memory, so they run in a
//! test binary of their own: `flood.rs`.)

mod common;

use std::time::Duration;

use common::*;
use patroxy::policy::ListenerRole;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// What patroxy sends a raw client before closing, within 30 s.
async fn refusal(port: u16) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_limits_clients_get_53300_and_the_others_keep_working() {
    let (_root, etcd, pg) = one_primary("limits").await;
    let proxy = Proxy::start(&etcd, "limits", |cfg| {
        cfg.limits.max_client_connections = 3;
        cfg.listeners = vec![
            ListenerConfig {
                max_client_connections: 2,
                ..listener("small", ListenerRole::Primary)
            },
            listener("big", ListenerRole::Primary),
        ];
    })
    .await;
    let (small, big) = (proxy.port_of("small"), proxy.port_of("big"));
    wait_routed(big, pg.port).await;

    // wait_routed's probe sessions give their places back once patroxy has seen them close:
    // each place below is waited for, then the limits are exact.
    let place = |port: u16| {
        wait_for(
            "a free place",
            Duration::from_secs(30),
            move || async move { connect(port).await.ok() },
        )
    };
    // The listener's own limit: 2.
    let s1 = place(small).await;
    let s2 = place(small).await;
    let err = connect(small).await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("53300"), "{err}");
    // The global limit: 3, so one more on the other listener, then no more.
    let b1 = place(big).await;
    let err = connect(big).await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("53300"), "{err}");
    assert!(refusal(big).await.contains("too many clients"));
    for c in [&s1, &s2, &b1] {
        c.simple_query("SELECT 1").await.unwrap();
    }
    // A closed session gives its place back.
    drop(b1);
    wait_for(
        "the place to come back",
        Duration::from_secs(30),
        || async move { connect(big).await.ok() },
    )
    .await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_outside_the_allow_list_get_28000() {
    let (_root, etcd, pg) = one_primary("allow").await;
    let proxy = Proxy::start(&etcd, "allow", |cfg| {
        cfg.listeners = vec![
            ListenerConfig {
                allow: vec!["10.0.0.0/8".parse().unwrap()],
                ..listener("private", ListenerRole::Primary)
            },
            ListenerConfig {
                allow: vec!["127.0.0.0/8".parse().unwrap(), "::1".parse().unwrap()],
                ..listener("local", ListenerRole::Primary)
            },
        ];
    })
    .await;
    let err = connect(proxy.port_of("private")).await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("28000"), "{err}");
    assert!(
        message(&err).contains("127.0.0.1 are not allowed"),
        "{}",
        message(&err)
    );
    wait_routed(proxy.port_of("local"), pg.port).await;
    proxy.stop().await;
}
