//! Micro-benchmarks of the per-message work: the frame scanner and splitter on the forwarding
//! path, first-packet parsing on the connect path, and what transaction pooling does per
//! statement to know its effects (the word scan, the cache, the parser on a miss).

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use patroxy::protocol::frame::{split_frame, Scanner, MAX_DECLARED_LEN};
use patroxy::protocol::startup::parse_first_packet;
use std::hint::black_box;

fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    v.extend_from_slice(body);
    v
}

/// A typical result: RowDescription, `rows` DataRows of `width` bytes, CommandComplete, ReadyForQuery.
fn result_set(rows: usize, width: usize) -> Vec<u8> {
    let mut wire = frame(b'T', &[0u8; 27]);
    for _ in 0..rows {
        wire.extend(frame(b'D', &vec![7u8; width]));
    }
    wire.extend(frame(b'C', b"SELECT 1\0"));
    wire.extend(frame(b'Z', b"I"));
    wire
}

fn scanner(c: &mut Criterion) {
    let mut g = c.benchmark_group("scan");
    for (rows, width) in [(1, 8), (100, 64), (1000, 16)] {
        let wire = result_set(rows, width);
        g.throughput(Throughput::Elements(rows as u64 + 3));
        g.bench_with_input(
            BenchmarkId::new("result_set", format!("{rows}x{width}")),
            &wire,
            |b, wire| {
                b.iter(|| {
                    let mut s = Scanner::new(MAX_DECLARED_LEN);
                    let mut status = 0u8;
                    s.scan(black_box(wire), |seen| {
                        if let patroxy::protocol::frame::Seen::ReadyForQuery(st) = seen {
                            status = st;
                        }
                    })
                    .unwrap();
                    status
                })
            },
        );
    }
    g.finish();
}

fn splitter(c: &mut Criterion) {
    let wire = result_set(100, 64);
    let mut g = c.benchmark_group("split");
    g.throughput(Throughput::Elements(103));
    g.bench_function("result_set/100x64", |b| {
        b.iter(|| {
            let mut buf = BytesMut::from(black_box(&wire[..]));
            let mut n = 0;
            while let Some(f) = split_frame(&mut buf, MAX_DECLARED_LEN).unwrap() {
                n += f.bytes.len();
            }
            n
        })
    });
    g.finish();
}

fn first_packet(c: &mut Criterion) {
    let mut startup = Vec::new();
    let body = b"\0\x03\0\0user\0postgres\0database\0postgres\0application_name\0psql\0client_encoding\0UTF8\0\0";
    startup.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    startup.extend_from_slice(body);
    let ssl = [0u8, 0, 0, 8, 4, 210, 22, 47];
    let mut cancel = vec![0u8, 0, 0, 16, 4, 210, 22, 46];
    cancel.extend_from_slice(&[0, 0, 0x30, 0x39, 1, 2, 3, 4]);
    let mut g = c.benchmark_group("first_packet");
    for (name, wire) in [
        ("startup", startup),
        ("ssl_request", ssl.to_vec()),
        ("cancel", cancel),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| {
                let mut buf = BytesMut::from(black_box(&wire[..]));
                parse_first_packet(&mut buf).unwrap().is_some()
            })
        });
    }
    g.finish();
}

fn classify(c: &mut Criterion) {
    use patroxy::protocol::classify::{classify_text, Classifier, Strings};
    let mut g = c.benchmark_group("classify");
    let classifier = Classifier::default();
    for (name, sql) in [
        // pgbench -S: no word that can matter, never parsed.
        (
            "select_no_words",
            "SELECT abalance FROM pgbench_accounts WHERE aid = $1;",
        ),
        // pgbench's UPDATE has SET: parsed once, then from the cache.
        (
            "update_cached",
            "UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2;",
        ),
        ("set_cached", "SET search_path = app, public"),
    ] {
        classifier.classify(sql.as_bytes(), Strings::Standard);
        g.bench_function(name, |b| {
            b.iter(|| {
                classifier
                    .classify(black_box(sql.as_bytes()), Strings::Standard)
                    .effects
            })
        });
    }
    // A cache miss: what a statement never seen before costs.
    for (name, sql) in [
        (
            "miss_update",
            "UPDATE pgbench_accounts SET abalance = abalance + 5 WHERE aid = 42;",
        ),
        ("miss_set", "SET search_path = app, public"),
        (
            "miss_set_config",
            "SELECT pg_catalog.set_config('search_path', '', false)",
        ),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| classify_text(black_box(sql), Strings::Standard).effects)
        });
    }
    g.finish();
}

criterion_group!(benches, scanner, splitter, first_packet, classify);
criterion_main!(benches);
