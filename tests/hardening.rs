//! Limits and misuse: connection caps, client allow-lists, and memory that stays bounded
//! under a flood of half-finished startups. Real etcd and PostgreSQL, patroxy in-process.

mod common;

use std::time::Duration;

use common::*;
use patroxy::policy::ListenerRole;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn one_primary(scope: &str) -> (TempRoot, Etcd, Postgres) {
    let root = TempRoot::new();
    let etcd = Etcd::start(&root);
    let pg = Postgres::primary(&root, "a");
    let mut keys = Keys::new(&etcd, scope).await;
    keys.member("a", pg.port, "primary", "running").await;
    keys.leader("a").await;
    (root, etcd, pg)
}

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

/// RSS is the whole test process's: tests that measure it take turns.
static MEASURING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_unfinished_startups_stays_bounded_and_is_cut_off() {
    let _turn = MEASURING.lock().await;
    let (_root, etcd, pg) = one_primary("flood").await;
    let proxy = Proxy::start(&etcd, "flood", |cfg| {
        cfg.timeouts.startup = Duration::from_secs(2);
    })
    .await;
    let port = proxy.port();
    wait_routed(port, pg.port).await;
    let before = rss_kib();
    // Each declares the largest startup packet allowed and sends 90% of it, then stalls.
    let mut stalled = Vec::new();
    for _ in 0..300 {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let mut packet = 10_000u32.to_be_bytes().to_vec();
        packet.extend_from_slice(&[0, 3, 0, 0]);
        packet.resize(9_000, b'x');
        s.write_all(&packet).await.unwrap();
        stalled.push(s);
    }
    // Others are still served while the flood waits.
    assert_eq!(server_port(port).await.unwrap(), pg.port as i32);
    let grown = rss_kib().saturating_sub(before);
    // 300 clients × 9 kB each is what they sent; patroxy holds no more than that and its
    // buffers. Generous bound, no timing: 64 KiB per stalled client.
    assert!(
        grown < 300 * 64,
        "RSS grew by {grown} KiB for 300 stalled clients"
    );
    // Every one of them is cut at the startup timeout, with an error.
    for mut s in stalled {
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut out))
            .await
            .expect("a stalled startup was never cut")
            .ok();
        assert!(
            String::from_utf8_lossy(&out).contains("startup packet not received"),
            "{out:?}"
        );
    }
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_half_open_tls_handshakes_stays_bounded_and_is_cut_off() {
    let _turn = MEASURING.lock().await;
    let (root, etcd, pg) = one_primary("tlsflood").await;
    let ca = common::tls::TestCa::new(root.path(), "ca");
    let cert = ca.issue("patroxy", &["127.0.0.1"]);
    let proxy = Proxy::start(&etcd, "tlsflood", |cfg| {
        cfg.tls.cert_file = Some(cert.cert_file.clone());
        cfg.tls.key_file = Some(cert.key_file.clone());
        cfg.timeouts.startup = Duration::from_secs(2);
    })
    .await;
    let port = proxy.port();
    wait_routed(port, pg.port).await;
    let before = rss_kib();
    // A ClientHello record that declares 16 KiB and stops after 8 KiB: half by SSLRequest
    // (answered S), half as direct TLS.
    let mut hello = vec![
        0x16, 0x03, 0x01, 0x40, 0x00, 0x01, 0x00, 0x3f, 0xfc, 0x03, 0x03,
    ];
    hello.resize(8 * 1024, 0x42);
    let mut stalled = Vec::new();
    for i in 0..300 {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        if i % 2 == 0 {
            s.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])
                .await
                .unwrap();
            assert_eq!(s.read_u8().await.unwrap(), b'S');
        }
        s.write_all(&hello).await.unwrap();
        stalled.push(s);
    }
    assert_eq!(server_port(port).await.unwrap(), pg.port as i32);
    let grown = rss_kib().saturating_sub(before);
    eprintln!("300 half-open TLS handshakes: RSS +{grown} KiB");
    assert!(
        grown < 300 * 64,
        "RSS grew by {grown} KiB for 300 half-open handshakes"
    );
    for mut s in stalled {
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut out))
            .await
            .expect("a half-open handshake was never cut")
            .ok();
    }
    proxy.stop().await;
}
