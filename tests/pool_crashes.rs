//! Pooled writers (transaction and session pooling) through repeated crashes (`kill -9` of
//! the postmaster) of the primary, the leader key moving to the other server each time: no
//! request is left unanswered, and no acknowledged write is lost.
//!
//! Found by it: a pooled server connection that died a moment before it was lent ended
//! its relay before the client's request was even read, and the request was dropped: the
//! client waited forever (about 1 crash in 40).

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use patroxy::config::{ListenerConfig, PoolMode};
use patroxy::policy::ListenerRole;
use tokio::time::Instant;

/// Transaction-pooled writers, on 8 server connections.
const WRITERS: usize = 50;
/// Session-pooled writers (as user `sessions`, a pool of their own), after those.
const SESSION_WRITERS: usize = 6;
const CRASHES: usize = 40;
/// Far beyond any answer in this test: a request not answered by then never will be.
const NO_ANSWER: Duration = Duration::from_secs(20);
const INSERT: &str = "INSERT INTO writes (id, port) VALUES ($1, inet_server_port()) RETURNING port";

struct Answer {
    writer: usize,
    at: Instant,
    id: i64,
    result: Result<u16, String>,
}

type Log = Arc<Mutex<Vec<Answer>>>;

/// Inserts numbered rows through `port` as `user`, reconnecting after any error, until
/// `stop`.
async fn write(
    writer: usize,
    (port, user): (u16, &'static str),
    log: Log,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut client: Option<(tokio_postgres::Client, ConnTask)> = None;
    let mut id = writer as i64 * 100_000_000;
    while !stop.is_cancelled() {
        id += 1;
        let result = async {
            if client.is_none() {
                let c = connect_with(port, &format!("user={user}"))
                    .await
                    .map_err(|e| format!("connect: {e}"))?;
                client = Some(c);
            }
            let (c, conn) = client.as_mut().unwrap();
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&id];
            match tokio::time::timeout(NO_ANSWER, c.query_one(INSERT, &params)).await {
                Ok(Ok(row)) => Ok(row.get::<_, i32>(0) as u16),
                // A FATAL that came while the client was idle ended its connection: the
                // connection's own error says what it was.
                Ok(Err(e)) if e.is_closed() => match tokio::time::timeout(NO_ANSWER, conn).await {
                    Ok(Ok(Err(fatal))) => {
                        Err(format!("{} {fatal}", sqlstate(&fatal).unwrap_or_default()))
                    }
                    _ => Err(format!(" {e}")),
                },
                Ok(Err(e)) => Err(format!("{} {e}", sqlstate(&e).unwrap_or_default())),
                Err(_) => Err(format!("no answer in {NO_ANSWER:?}")),
            }
        }
        .await;
        if result.is_err() {
            client = None;
        }
        let at = Instant::now();
        log.lock().unwrap().push(Answer {
            writer,
            at,
            id,
            result,
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until every writer has had a write acknowledged by `server` since `since`.
async fn all_writing_on(log: &Log, server: u16, since: Instant) {
    wait_for(
        &format!("every writer acknowledged on port {server}"),
        Duration::from_secs(60),
        || async {
            let log = log.lock().unwrap();
            let writers: BTreeSet<usize> = log
                .iter()
                .filter(|a| a.at >= since && a.result == Ok(server))
                .map(|a| a.writer)
                .collect();
            (writers.len() == WRITERS + SESSION_WRITERS).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_writers_ride_out_forty_crashes_with_every_request_answered() {
    install_metrics();
    let root = TempRoot::new();
    let etcd = Etcd::start(&root);
    let mut servers = [Postgres::primary(&root, "a"), Postgres::primary(&root, "b")];
    for s in &servers {
        connect(s.port)
            .await
            .unwrap()
            .batch_execute(
                "CREATE TABLE writes (id bigint PRIMARY KEY, port int NOT NULL);
                 CREATE ROLE sessions LOGIN; GRANT ALL ON writes TO sessions",
            )
            .await
            .unwrap();
    }
    let names = ["a", "b"];
    let mut keys = Keys::new(&etcd, "crashes").await;
    keys.member("a", servers[0].port, "primary", "running")
        .await;
    keys.member("b", servers[1].port, "replica", "running")
        .await;
    keys.leader("a").await;
    let proxy = Proxy::start(&etcd, "crashes", |cfg| {
        cfg.timeouts.connect_wait = Duration::from_secs(40);
        cfg.listeners = vec![
            ListenerConfig {
                pool_mode: PoolMode::Transaction,
                ..listener("crashes", ListenerRole::Primary)
            },
            ListenerConfig {
                pool_mode: PoolMode::Session,
                ..listener("sessions", ListenerRole::Primary)
            },
        ];
        cfg.pool.pool_size = 8;
        cfg.auth.trust = vec!["127.0.0.1/32".parse().unwrap()];
    })
    .await;
    let log: Log = Arc::default();
    let stop = tokio_util::sync::CancellationToken::new();
    let (port, sessions) = (proxy.port(), proxy.port_of("sessions"));
    let writers: Vec<_> = (0..WRITERS + SESSION_WRITERS)
        .map(|w| {
            let to = match w < WRITERS {
                true => (port, "postgres"),
                false => (sessions, "sessions"),
            };
            tokio::spawn(write(w, to, log.clone(), stop.clone()))
        })
        .collect();

    let mut leader = 0;
    for crash in 0..CRASHES {
        all_writing_on(&log, servers[leader].port, Instant::now()).await;
        servers[leader].crash();
        // The key moves after a pause that differs from crash to crash (0.1 to 1 s; in
        // Patroni, up to the ttl): clients meet the dead server, then the new one.
        tokio::time::sleep(Duration::from_millis(100 + (crash as u64 * 229) % 900)).await;
        let crashed = leader;
        leader = 1 - leader;
        keys.leader(names[leader]).await;
        servers[crashed].start();
    }
    all_writing_on(&log, servers[leader].port, Instant::now()).await;
    stop.cancel();
    for w in writers {
        w.await.unwrap();
    }

    let log = std::mem::take(&mut *log.lock().unwrap());
    let unanswered: Vec<String> = log
        .iter()
        .filter_map(|a| a.result.as_ref().err())
        .filter(|e| e.starts_with("no answer"))
        .cloned()
        .collect();
    let errors = |session: bool| -> Vec<&String> {
        log.iter()
            .filter(|a| (a.writer >= WRITERS) == session)
            .filter_map(|a| a.result.as_ref().err())
            .collect()
    };
    let (failed, session_failed) = (errors(false), errors(true));
    let acked: Vec<i64> = log
        .iter()
        .filter(|a| a.result.is_ok())
        .map(|a| a.id)
        .collect();
    let metrics = metrics_text();
    let resent = sample(&metrics, "patroxy_server_unsent_total", &[]).unwrap_or(0.0);
    eprintln!(
        "{CRASHES} crashes; {WRITERS} transaction-pooled writers on 8 server connections and {SESSION_WRITERS} session-pooled: {} requests, {} acknowledged; errors: {} transaction-pooled (at most those in flight at each crash), {} session-pooled (a session ends with its server); {resent} requests sent again on another connection",
        log.len(),
        acked.len(),
        failed.len(),
        session_failed.len()
    );
    assert!(
        unanswered.is_empty(),
        "requests never answered: {unanswered:?}"
    );
    // In transaction pooling only requests running on the crashed server fail (8 server
    // connections), each saying that its outcome is unknown. A session ends with its
    // server (once per crash; twice if its next first request meets the dead server too).
    let other: Vec<&&String> = failed.iter().filter(|e| !e.starts_with("08007")).collect();
    assert!(other.is_empty(), "errors other than 08007: {other:?}");
    assert!(failed.len() <= CRASHES * 8, "{} errors", failed.len());
    assert!(
        session_failed.len() <= 2 * CRASHES * SESSION_WRITERS,
        "{session_failed:?}"
    );
    let mut present = BTreeSet::new();
    for s in &servers {
        let rows = connect(s.port)
            .await
            .unwrap()
            .query("SELECT id FROM writes", &[])
            .await
            .unwrap();
        present.extend(rows.iter().map(|r| r.get::<_, i64>(0)));
    }
    let lost: Vec<i64> = acked
        .iter()
        .copied()
        .filter(|id| !present.contains(id))
        .collect();
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    proxy.stop().await;
}
