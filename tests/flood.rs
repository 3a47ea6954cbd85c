//! Floods of half-finished startups, plain and TLS: memory stays near what the clients
//! really sent, others are served meanwhile, and each is cut at the configured startup
//! timeout. These tests read the process's RSS, so they live in a test binary of their own
//! and take turns.

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// The startup timeout the floods run with.
const STARTUP: Duration = Duration::from_secs(2);
/// How late after its startup timeout a stalled client may be cut: scheduling slack for 300
/// clients on a shared machine, far below the 10 s default timeout a wrong setting would use.
const CUT_SLACK: Duration = Duration::from_secs(4);
const CLIENTS: usize = 300;

/// RSS is the whole test process's: tests that measure it take turns.
static MEASURING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Waits for every stalled client to be cut; each one's bytes received and how long after
/// its connect the cut came.
async fn cuts(stalled: Vec<(TcpStream, Instant)>) -> Vec<(Vec<u8>, Duration)> {
    let mut reads = JoinSet::new();
    for (mut s, opened) in stalled {
        reads.spawn(async move {
            let mut out = Vec::new();
            tokio::time::timeout(
                STARTUP + CUT_SLACK + Duration::from_secs(10),
                s.read_to_end(&mut out),
            )
            .await
            .expect("a stalled client was never cut")
            .ok();
            (out, opened.elapsed())
        });
    }
    reads.join_all().await
}

/// Each cut came at the startup timeout: not before it, and not long after.
fn assert_cut_at_the_timeout(cuts: &[(Vec<u8>, Duration)]) {
    for (_, after) in cuts {
        assert!(
            *after >= STARTUP - Duration::from_millis(50) && *after <= STARTUP + CUT_SLACK,
            "cut {after:?} after connecting, with a startup timeout of {STARTUP:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_unfinished_startups_stays_bounded_and_is_cut_off() {
    let _turn = MEASURING.lock().await;
    let (_root, etcd, pg) = one_primary("flood").await;
    let proxy = Proxy::start(&etcd, "flood", |cfg| cfg.timeouts.startup = STARTUP).await;
    let port = proxy.port();
    wait_routed(port, pg.port).await;
    let before = rss_kib();
    // Each declares the largest startup packet allowed and sends 90% of it, then stalls.
    const SENT: usize = 9_000;
    let mut stalled = Vec::new();
    for _ in 0..CLIENTS {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let opened = Instant::now();
        let mut packet = 10_000u32.to_be_bytes().to_vec();
        packet.extend_from_slice(&[0, 3, 0, 0]);
        packet.resize(SENT, b'x');
        s.write_all(&packet).await.unwrap();
        stalled.push((s, opened));
    }
    // Others are still served while the flood waits.
    assert_eq!(server_port(port).await.unwrap(), pg.port as i32);
    let per_client = rss_kib().saturating_sub(before) * 1024 / CLIENTS as u64;
    eprintln!("{CLIENTS} stalled startups of {SENT} bytes: RSS +{per_client} bytes each");
    // A buffer the size of the packet the client declared (10 kB), a task and a socket.
    assert!(
        per_client < 2 * SENT as u64,
        "{per_client} bytes per stalled client that sent {SENT}"
    );
    let cuts = cuts(stalled).await;
    for (out, _) in &cuts {
        assert!(
            String::from_utf8_lossy(out).contains("startup packet not received"),
            "{out:?}"
        );
    }
    assert_cut_at_the_timeout(&cuts);
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
        cfg.timeouts.startup = STARTUP;
    })
    .await;
    let port = proxy.port();
    wait_routed(port, pg.port).await;
    let before = rss_kib();
    // A ClientHello record that declares 16 KiB and stops after 8 KiB: half by SSLRequest
    // (answered S), half as direct TLS.
    const SENT: usize = 8 * 1024;
    let mut hello = vec![
        0x16, 0x03, 0x01, 0x40, 0x00, 0x01, 0x00, 0x3f, 0xfc, 0x03, 0x03,
    ];
    hello.resize(SENT, 0x42);
    let mut stalled = Vec::new();
    for i in 0..CLIENTS {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let opened = Instant::now();
        if i % 2 == 0 {
            s.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])
                .await
                .unwrap();
            assert_eq!(s.read_u8().await.unwrap(), b'S');
        }
        s.write_all(&hello).await.unwrap();
        stalled.push((s, opened));
    }
    assert_eq!(server_port(port).await.unwrap(), pg.port as i32);
    let per_client = rss_kib().saturating_sub(before) * 1024 / CLIENTS as u64;
    eprintln!("{CLIENTS} half-open TLS handshakes of {SENT} bytes: RSS +{per_client} bytes each");
    // rustls buffers the partial record in a full-size (16 KiB + header) buffer: the record
    // the client declared, plus a task and a session state.
    assert!(
        per_client < 4 * SENT as u64,
        "{per_client} bytes per half-open handshake that sent {SENT}"
    );
    assert_cut_at_the_timeout(&cuts(stalled).await);
    proxy.stop().await;
}
