//! End to end with real Patroni: 3 members on the etcd3 DCS, patroxy in front, and a client
//! writing numbered rows in a loop through a planned switchover, a silent node loss (SIGSTOP)
//! and a crash (`kill -9` of Patroni and the postmaster). Every acknowledged write must be on
//! the last primary.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::patroni::Cluster;
use common::writer::*;
use common::*;
use patroxy::policy::ListenerRole;
use tokio::time::Instant;

/// Correctness bounds, not performance figures (those are in BENCHMARKS.md): a planned
/// switchover takes Patroni about 2 s; a lost leader up to its ttl (10 s) before the new key.
const SWITCHOVER_GAP: Duration = Duration::from_secs(10);
const LOSS_GAP: Duration = Duration::from_secs(30);
/// The writer sees at most the transaction the event cut, and one reconnect that raced it.
const FAILED_PER_EVENT: usize = 2;

fn assert_available(failed: usize, gap: Duration, bound: Duration, event: &str) {
    assert!(
        failed <= FAILED_PER_EVENT,
        "{event}: {failed} failed attempts (at most {FAILED_PER_EVENT})"
    );
    assert!(
        gap < bound,
        "{event}: writes stopped for {gap:?} (bound {bound:?})"
    );
}

async fn leader(cluster: &Cluster) -> String {
    cluster.state().await.unwrap().leader.unwrap()
}

/// Waits for the leader key to name someone other than `old`.
async fn new_leader(cluster: &Cluster, old: &str) -> String {
    wait_for(
        &format!("a leader other than {old}"),
        EVENT,
        || async move { cluster.state().await?.leader.filter(|l| l != old) },
    )
    .await
}

/// Notes, once a second, statements that have run on any member for more than 15 s: when a
/// client waits too long, this says whether its statement was on a server (and waiting for
/// what) or never got there.
struct Watchdog {
    seen: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Watchdog {
    fn spawn(ports: Vec<u16>) -> Watchdog {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let sql = "SELECT pid, wait_event_type, wait_event, \
                   extract(epoch FROM now() - query_start)::int, query \
                   FROM pg_stat_activity WHERE state = 'active' AND pid <> pg_backend_pid() \
                   AND backend_type = 'client backend' AND now() - query_start > '15 s'";
        let task = tokio::spawn(async move {
            loop {
                for &port in &ports {
                    let Ok(Ok(c)) =
                        tokio::time::timeout(Duration::from_secs(2), connect(port)).await
                    else {
                        continue;
                    };
                    let Ok(Ok(rows)) =
                        tokio::time::timeout(Duration::from_secs(2), c.query(sql, &[])).await
                    else {
                        continue;
                    };
                    let mut log = log.lock().unwrap();
                    for r in rows.iter().take(5) {
                        let note = format!(
                            "port {port}: pid {} waiting on {:?}/{:?} for {} s: {}",
                            r.get::<_, i32>(0),
                            r.get::<_, Option<String>>(1),
                            r.get::<_, Option<String>>(2),
                            r.get::<_, i32>(3),
                            r.get::<_, String>(4)
                        );
                        if log.len() < 40 {
                            log.push(note);
                        }
                    }
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        Watchdog { seen, task }
    }

    fn report(&self) -> String {
        let seen = self.seen.lock().unwrap();
        match seen.is_empty() {
            true => "no statement ran for more than 15 s on any member".to_owned(),
            false => format!("statements long on a server: {seen:#?}"),
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_survive_switchover_silent_loss_and_crash() {
    let mut cluster = Cluster::start("e2e", 3).await;
    let proxy = Proxy::start(&cluster.etcd, "e2e", |cfg| {
        cfg.timeouts.connect_wait = Duration::from_secs(40);
        cfg.listeners = vec![
            listener("rw", ListenerRole::Primary),
            listener("ro", ListenerRole::Replica),
        ];
    })
    .await;
    let ro = proxy.port_of("ro");
    let first = leader(&cluster).await;
    let setup = wait_for("the first leader through patroxy", EVENT, || async {
        connect(proxy.port()).await.ok()
    })
    .await;
    setup
        .batch_execute("CREATE TABLE writes (id bigint PRIMARY KEY, port int NOT NULL)")
        .await
        .unwrap();
    drop(setup);
    let writer = Writer::spawn(proxy.port_of("rw"));
    writer
        .wait_acked_on(cluster.port_of(&first), Instant::now())
        .await;

    // 1. A planned switchover to the synchronous standby.
    let state = cluster.wait_healthy(3, EVENT).await;
    let candidate = state.sync_standby.clone().unwrap();
    // A read session on the candidate: it must leave the replica pool when promoted.
    let (_reader, reader_conn) = session_on(ro, cluster.port_of(&candidate)).await;
    let t = Instant::now();
    cluster.switchover(&first, &candidate);
    writer.wait_acked_on(cluster.port_of(&candidate), t).await;
    let (failed, gap) = writer.window(t);
    eprintln!("switchover {first} -> {candidate}: {failed} failed attempts, longest gap {gap:?}");
    assert_available(failed, gap, SWITCHOVER_GAP, "switchover");
    assert_eq!(
        ended_within(reader_conn, AT_REST).await.as_deref(),
        Some("57P01")
    );
    // The old primary joins the replica pool once it runs as a replica; the new one never
    // takes a read session.
    let (old, new) = (cluster.port_of(&first), cluster.port_of(&candidate));
    wait_for(
        "the old primary in the replica pool",
        EVENT,
        || async move {
            let c = connect(ro).await.ok()?;
            let row = c
                .query_one("SELECT inet_server_port(), pg_is_in_recovery()", &[])
                .await
                .ok()?;
            let (port, standby): (i32, bool) = (row.get(0), row.get(1));
            assert!(
                standby && port != new as i32,
                "a read session reached the primary"
            );
            (port == old as i32).then_some(())
        },
    )
    .await;

    // 2. Silent loss: the leader freezes. Its idle and busy sessions must not hang.
    cluster.wait_healthy_rejoining(3, EVENT, &[]).await;
    let frozen = leader(&cluster).await;
    let (idle, idle_conn) = connect_with(proxy.port(), "").await.unwrap();
    let port: i32 = idle
        .query_one("SELECT inet_server_port()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(port, cluster.port_of(&frozen) as i32);
    let (busy, _busy_conn) = connect_with(proxy.port(), "").await.unwrap();
    let busy_query = tokio::spawn(async move { busy.simple_query("SELECT pg_sleep(600)").await });
    wait_query_running(cluster.port_of(&frozen), "SELECT pg_sleep(600)").await;
    let t = Instant::now();
    cluster.member(&frozen).freeze();
    let promoted = new_leader(&cluster, &frozen).await;
    let leader_seen = Instant::now();
    let idle_end = tokio::time::timeout(EVENT, idle_conn)
        .await
        .expect("idle session hung")
        .unwrap();
    assert_eq!(
        idle_end.err().and_then(|e| sqlstate(&e)).as_deref(),
        Some("57P01")
    );
    let busy_err = tokio::time::timeout(EVENT, busy_query)
        .await
        .expect("busy session hung")
        .unwrap()
        .unwrap_err();
    assert_eq!(
        sqlstate(&busy_err).as_deref(),
        Some("57P01"),
        "{busy_err:?}"
    );
    writer.wait_acked_on(cluster.port_of(&promoted), t).await;
    let (failed, gap) = writer.window(t);
    eprintln!(
        "silent loss of {frozen} -> {promoted}: {failed} failed attempts, longest gap {gap:?}, \
         first write on the new leader {:?} after its key was seen",
        writer_first_ok_after(&writer, cluster.port_of(&promoted), leader_seen)
    );
    assert_available(failed, gap, LOSS_GAP, "silent loss");

    // 3. Crash: kill -9 of the new leader's Patroni and postmaster. The frozen node stays
    // frozen (so it cannot take the key back); the remaining member takes over.
    cluster.wait_healthy_rejoining(2, EVENT, &[&frozen]).await;
    let crashed = leader(&cluster).await;
    let t = Instant::now();
    cluster.member_mut(&crashed).crash();
    let last = new_leader(&cluster, &crashed).await;
    writer.wait_acked_on(cluster.port_of(&last), t).await;
    let (failed, gap) = writer.window(t);
    eprintln!("crash of {crashed} -> {last}: {failed} failed attempts, longest gap {gap:?}");
    assert_available(failed, gap, LOSS_GAP, "crash");

    let log = writer.stop().await;
    let acked: Vec<i64> = log
        .iter()
        .filter(|a| a.result.is_ok())
        .map(|a| a.id)
        .collect();
    let lost = missing(&connect(cluster.port_of(&last)).await.unwrap(), &acked).await;
    eprintln!(
        "{} attempts, {} acknowledged, {} lost",
        log.len(),
        acked.len(),
        lost.len()
    );
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    // Every phase wrote something through patroxy on each primary in turn.
    for name in [&first, &candidate, &last] {
        let port = cluster.port_of(name);
        assert!(
            log.iter().any(|a| a.result == Ok(port)),
            "no write on {name}"
        );
    }
    proxy.stop().await;
}

fn writer_first_ok_after(writer: &Writer, port: u16, since: Instant) -> Option<Duration> {
    let log = writer.log.lock().unwrap();
    log.iter()
        .find(|a| a.done >= since && a.result == Ok(port))
        .map(|a| a.done - since)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_pooled_writers_survive_a_switchover_and_a_crash() {
    install_metrics();
    let mut cluster = Cluster::start("pooled", 3).await;
    let proxy = Proxy::start(&cluster.etcd, "pooled", |cfg| {
        cfg.timeouts.connect_wait = Duration::from_secs(40);
        cfg.listeners = vec![
            patroxy::config::ListenerConfig {
                pool_mode: patroxy::config::PoolMode::Transaction,
                ..listener("rw", ListenerRole::Primary)
            },
            patroxy::config::ListenerConfig {
                pool_mode: patroxy::config::PoolMode::Session,
                ..listener("sessions", ListenerRole::Primary)
            },
        ];
        cfg.pool.pool_size = 8;
        cfg.auth.trust = vec!["127.0.0.1/32".parse().unwrap()];
    })
    .await;
    let port = proxy.port();
    let first = leader(&cluster).await;
    let setup = wait_for("the first leader through patroxy", EVENT, || async {
        connect(port).await.ok()
    })
    .await;
    setup
        .batch_execute(
            "CREATE TABLE writes (id bigint PRIMARY KEY, port int NOT NULL);
             CREATE ROLE sessions LOGIN; GRANT ALL ON writes TO sessions",
        )
        .await
        .unwrap();
    drop(setup);
    let mut writers: Vec<Writer> = (0..50)
        .map(|w| Writer::spawn_from(port, w * 1_000_000))
        .collect();
    // Session-pooled writers (their own user, so their own pool), half of them with a
    // statement prepared once and used throughout; and a session holding an advisory lock,
    // which must not be moved to the next primary without it.
    let sessions = proxy.port_of("sessions");
    writers.extend((0..6).map(|w| {
        let script = Script {
            user: "sessions",
            prepared: w % 2 == 1,
        };
        Writer::spawn_as(sessions, (100 + w) * 1_000_000, INSERT, script)
    }));
    let (locked, _) = connect_with(sessions, "user=sessions").await.unwrap();
    locked
        .batch_execute("SELECT pg_advisory_lock(42)")
        .await
        .unwrap();
    let readers: Vec<Writer> = (0..20).map(|_| Writer::spawn_reader(port)).collect();
    for w in writers.iter().chain(&readers) {
        w.wait_acked_on(cluster.port_of(&first), Instant::now())
            .await;
    }
    let ports: Vec<u16> = cluster.members.iter().map(|m| m.pg_port).collect();
    let watchdog = Watchdog::spawn(ports);
    let event = |name: &str, clients: &[&Writer], t: Instant, bound: usize| {
        let (failed, gap) = clients
            .iter()
            .map(|w| w.window(t))
            .fold((0, Duration::ZERO), |(f, g), (wf, wg)| (f + wf, g.max(wg)));
        eprintln!("{name}: 50 transaction-pooled writers and 20 readers on 8 server connections, 6 session-pooled writers: {failed} client-visible errors, longest gap {gap:?}");
        assert!(failed <= bound, "{name}: {failed} errors");
        // Which client waited, and what it was told, to say where the time went.
        let worst = clients
            .iter()
            .enumerate()
            .max_by_key(|(_, w)| w.window(t).1)
            .map(|(i, w)| {
                let log = w.log.lock().unwrap();
                let errors: Vec<String> = log
                    .iter()
                    .filter(|a| a.done >= t)
                    .filter_map(|a| a.result.clone().err())
                    .collect();
                format!("client {i} (0-49 transaction-pooled writers, 50-55 session-pooled writers, 56-75 readers), its errors: {errors:?}")
            })
            .unwrap_or_default();
        assert!(
            gap < Duration::from_secs(30),
            "{name}: writes stopped for {gap:?}: {worst}; {}",
            watchdog.report()
        );
    };

    // A planned switchover.
    let state = cluster.wait_healthy(3, EVENT).await;
    let candidate = state.sync_standby.clone().unwrap();
    let t = Instant::now();
    cluster.switchover(&first, &candidate);
    let clients: Vec<&Writer> = writers.iter().chain(&readers).collect();
    for w in &clients {
        w.wait_acked_on(cluster.port_of(&candidate), t).await;
    }
    // Announced by Patroni's failover key: new transactions were held, not failed.
    event("switchover", &clients, t, 0);
    let held = sample(&metrics_text(), "patroxy_switchover_holds_total", &[]).unwrap_or(0.0);
    assert!(held >= 1.0, "no transaction was held:\n{}", metrics_text());
    // The session writers left the old primary with their statements; the lock holder
    // stayed, and its session ended with the server's.
    let moves = |result| {
        sample(&metrics_text(), "patroxy_switchover_moves_total", &[result]).unwrap_or(0.0)
    };
    assert!(
        moves("result=\"moved\"") >= 6.0,
        "moves:\n{}",
        metrics_text()
    );
    assert!(
        moves("result=\"stayed\"") >= 1.0,
        "moves:\n{}",
        metrics_text()
    );
    let lost_lock = locked.batch_execute("SELECT 1").await;
    assert!(
        lost_lock.is_err(),
        "the session holding a lock went on elsewhere"
    );

    // A crash of the new leader.
    cluster.wait_healthy_rejoining(3, EVENT, &[]).await;
    let crashed = leader(&cluster).await;
    let t = Instant::now();
    cluster.member_mut(&crashed).crash();
    let last = new_leader(&cluster, &crashed).await;
    for w in &clients {
        w.wait_acked_on(cluster.port_of(&last), t).await;
    }
    // At most the transaction each client had in flight, and one reconnect.
    event("kill -9", &clients, t, 140);
    for r in readers {
        r.stop().await;
    }

    nothing_lost(writers, cluster.port_of(&last)).await;
    proxy.stop().await;
}
