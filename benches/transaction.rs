//! What a transaction-pooled transaction costs patroxy outside the kernel, per hot function
//! the profile named: the rewriter's look at each client message (a simple query, a
//! prepared statement's Bind), listening for shutdown and `KILL` between transactions
//! (a shared `CancellationToken` registered again each time, against the client's bell),
//! and a loan's bookkeeping (its cancel route and its server's session count).

use std::future::Future;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, Criterion};
use patroxy::discovery::patroni::Endpoint;
use patroxy::hot::{Bell, CancelRegistry, ServerLoad, KILLED, SHUTDOWN};
use patroxy::protocol::classify::{Classifier, Seen};
use patroxy::protocol::frame::split_frame;
use patroxy::protocol::prepared::{ClientStatements, Naming, Reading, Rewriter, ServerStatements};
use patroxy::protocol::startup::CancelKey;
use tokio_util::sync::CancellationToken;

fn frame(tag: u8, body: &[u8]) -> Bytes {
    let mut f = vec![tag];
    f.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    f.extend_from_slice(body);
    Bytes::from(f)
}

/// pgbench -S's messages: its simple query, and -M prepared's Parse, Bind, Execute, Sync.
fn messages() -> (Bytes, Vec<Bytes>, Vec<Bytes>) {
    let query = frame(
        b'Q',
        b"SELECT abalance FROM pgbench_accounts WHERE aid = 4211;\0",
    );
    let parse = frame(
        b'P',
        b"P0_1\0SELECT abalance FROM pgbench_accounts WHERE aid = $1;\0\0\x01\0\0\0\x17",
    );
    let bind = frame(b'B', b"\0P0_1\0\0\x01\0\0\0\x01\0\0\0\x044211\0\0");
    let (execute, sync) = (frame(b'E', b"\0\0\0\0\0"), frame(b'S', b""));
    let prepare = vec![parse, bind.clone(), execute.clone(), sync.clone()];
    (query, prepare, vec![bind, execute, sync])
}

fn rewriter(c: &mut Criterion) {
    let (classifier, naming) = (Classifier::default(), Naming::default());
    let reading = Reading::plain(&naming, &classifier);
    let (query, prepare, execute) = messages();
    let (mut client, mut server, mut seen) = (
        ClientStatements::default(),
        ServerStatements::default(),
        Seen::default(),
    );
    let mut rw = Rewriter {
        client: &mut client,
        server: &mut server,
        capacity: 100,
        memory: 64 << 20,
        settings_held: 0,
        reading,
        seen: &mut seen,
        unsynced: false,
        in_failed_transaction: false,
    };
    let through = |frames: &[Bytes], rw: &mut Rewriter<'_>| {
        for f in frames {
            let mut buf = BytesMut::from(&f[..]);
            let frame = split_frame(&mut buf, 1 << 30).unwrap().unwrap();
            std::hint::black_box(rw.rewrite(frame.tag, frame.body(), frame.bytes.clone()));
        }
    };
    let mut g = c.benchmark_group("rewriter");
    g.bench_function("simple_query", |b| {
        b.iter(|| through(std::slice::from_ref(&query), &mut rw))
    });
    through(&prepare, &mut rw);
    g.bench_function("prepared_bind_execute_sync", |b| {
        b.iter(|| through(&execute, &mut rw))
    });
    g.finish();
}

/// One wait begun, looked at once, and given up: what a transaction's selects do.
fn once<F: Future>(f: F, cx: &mut Context<'_>) {
    let mut f = std::pin::pin!(f);
    assert!(matches!(f.as_mut().poll(cx), Poll::Pending));
}

fn listening(c: &mut Criterion) {
    let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
    let (shutdown, kill) = (CancellationToken::new(), CancellationToken::new());
    let bell = Bell::default();
    let mut g = c.benchmark_group("listening_between_transactions");
    g.bench_function("shutdown_and_kill_tokens", |b| {
        b.iter(|| {
            once(shutdown.cancelled(), &mut cx);
            once(kill.cancelled(), &mut cx);
        })
    });
    g.bench_function("bell", |b| {
        b.iter(|| once(bell.rung(SHUTDOWN | KILLED), &mut cx))
    });
    g.finish();
}

/// An instance's cancel tag, for the keys drawn here.
const TAG: u16 = 300;

/// A loan's cancel route (registered in the shared map per loan, against filling the
/// client's own place) and its share of the server's load.
fn loan_bookkeeping(c: &mut Criterion) {
    let registry = CancelRegistry::default();
    let key = |pid| CancelKey {
        pid,
        secret: Bytes::from_static(&[1, 2, 3, 4]),
    };
    // Other clients are registered too, as in a busy instance.
    let others: Vec<_> = (0..1000)
        .map(|_| registry.register_client(registry.reserve(TAG, 0)))
        .collect();
    let server = Endpoint::parse("127.0.0.1:5432").unwrap();
    let mut g = c.benchmark_group("loan_bookkeeping");
    g.bench_function("cancel_route_registered_per_loan", |b| {
        b.iter(|| {
            let reserved = registry.reserve(TAG, 0);
            let r = registry.register(reserved, server.clone(), key(7), Default::default());
            std::hint::black_box(r.end());
        })
    });
    let slot = registry.register_client(registry.reserve(TAG, 0));
    g.bench_function("cancel_route_in_the_clients_place", |b| {
        b.iter(|| {
            let lent = slot.lend(server.clone(), key(7), Default::default());
            std::hint::black_box(lent.end());
        })
    });
    let load = ServerLoad::default();
    let _busy = load.claim(&server);
    g.bench_function("server_load_claimed_and_released", |b| {
        b.iter(|| drop(std::hint::black_box(load.claim(&server))))
    });
    g.finish();
    drop(others);
}

criterion_group!(benches, rewriter, listening, loan_bookkeeping);
criterion_main!(benches);
