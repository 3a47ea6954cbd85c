//! The fault suite, on separate hosts (network namespaces, see `common/lab.rs`): a real
//! 3-member etcd cluster, three Patroni members, the patroxy binary, a client host and an
//! observer. 20 writers on the client host commit numbered rows through patroxy (10 through
//! the unpooled listener, 10 through the transaction pool) and record every answer, with the
//! server and timeline that acknowledged it. After each fault: no acknowledged write lost, no
//! write acknowledged by an old primary after one was acknowledged by its successor, and
//! routing right within the bound the issue sets (printed; asserted with room for a loaded
//! machine).

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::lab::Net;
use common::spread::{Spread, POOLED, SCOPE, UNPOOLED};
use common::wait_for;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// What one write got back.
#[derive(Debug, Clone)]
struct Attempt {
    sent: Instant,
    done: Instant,
    id: i64,
    /// The server's data address and its timeline, or the error.
    result: Result<(String, u32), String>,
}

const INSERT: &str = "INSERT INTO writes (id) VALUES ($1) \
    RETURNING inet_server_addr()::text, substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)";

/// The writers on the client host.
struct Writers {
    /// Writers per listener: ids below `per_listener` billions are the unpooled ones.
    per_listener: i64,
    log: Arc<Mutex<Vec<Attempt>>>,
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Writers {
    /// `per_listener` writers on each of patroxy's two listeners.
    fn start(s: &Spread, per_listener: i64) -> Writers {
        let log = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let mut tasks = Vec::new();
        for (l, port) in [UNPOOLED, POOLED].into_iter().enumerate() {
            for w in 0..per_listener {
                let at = s.px.socket(Net::Data, port);
                let base = (l as i64 * per_listener + w) * 1_000_000_000;
                let (log, stop) = (log.clone(), stop.clone());
                tasks.push(s.client.spawn_task(write_loop(at, base, log, stop)));
            }
        }
        Writers {
            per_listener,
            log,
            stop,
            tasks,
        }
    }

    /// Waits until every writer... at least `n` writes acknowledged by `addr` after `since`.
    async fn wait_acked_by(&self, addr: &str, since: Instant, n: usize) {
        wait_for(
            &format!("{n} writes acknowledged by {addr}"),
            Duration::from_secs(120),
            || async move {
                let log = self.log.lock().unwrap();
                let acked = log
                    .iter()
                    .filter(|a| a.sent >= since)
                    .filter(|a| matches!(&a.result, Ok((at, _)) if at == addr))
                    .count();
                (acked >= n).then_some(())
            },
        )
        .await;
    }

    /// Errors and the longest time without an acknowledged write, since `since`.
    fn window(&self, since: Instant) -> (usize, Duration) {
        let log = self.log.lock().unwrap();
        let mut acked: Vec<Instant> = Vec::new();
        let mut failed = 0;
        for a in log.iter().filter(|a| a.done >= since) {
            match a.result {
                Ok(_) => acked.push(a.done),
                Err(_) => failed += 1,
            }
        }
        acked.sort();
        let mut gap = Duration::ZERO;
        let mut last = since;
        for t in acked {
            gap = gap.max(t - last);
            last = t;
        }
        (failed, gap)
    }

    /// Errors since `since`: through the unpooled listener, through the pool.
    fn errors_by_listener(&self, since: Instant) -> (usize, usize) {
        let log = self.log.lock().unwrap();
        let failed = log.iter().filter(|a| a.done >= since && a.result.is_err());
        failed.fold((0, 0), |(u, p), a| {
            match a.id / 1_000_000_000 < self.per_listener {
                true => (u + 1, p),
                false => (u, p + 1),
            }
        })
    }

    async fn stop(self) -> Vec<Attempt> {
        self.stop.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
        Arc::try_unwrap(self.log).unwrap().into_inner().unwrap()
    }
}

async fn write_loop(
    at: SocketAddr,
    base: i64,
    log: Arc<Mutex<Vec<Attempt>>>,
    stop: CancellationToken,
) {
    let mut client: Option<tokio_postgres::Client> = None;
    let mut id = base;
    while !stop.is_cancelled() {
        id += 1;
        let sent = Instant::now();
        let result = async {
            if client.is_none() {
                let (c, _) = pg_connect(at, 10)
                    .await
                    .map_err(|e| format!("connect: {}", common::message(&e)))?;
                client = Some(c);
            }
            let c = client.as_ref().unwrap();
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&id];
            let insert = c.query_one(INSERT, &params);
            match tokio::time::timeout(Duration::from_secs(60), insert).await {
                Ok(Ok(row)) => {
                    let addr: String = row.get(0);
                    let timeline: String = row.get(1);
                    let addr = addr.split('/').next().unwrap_or_default().to_owned();
                    Ok((addr, u32::from_str_radix(&timeline, 16).unwrap_or(0)))
                }
                Ok(Err(e)) => Err(format!(
                    "{} {}",
                    common::sqlstate(&e).unwrap_or_default(),
                    common::message(&e)
                )),
                Err(_) => Err("insert hung for 60 s".to_owned()),
            }
        }
        .await;
        if result.is_err() {
            client = None;
        }
        let done = Instant::now();
        log.lock().unwrap().push(Attempt {
            sent,
            done,
            id,
            result,
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A connection as `postgres` to `at`, made on the lab host whose runtime runs this (its
/// socket is that host's). The handle resolves, with the time, when the connection ends.
async fn pg_connect(
    at: SocketAddr,
    connect_timeout_s: u64,
) -> Result<(tokio_postgres::Client, tokio::task::JoinHandle<Instant>), tokio_postgres::Error> {
    let conninfo = format!(
        "host={} port={} user=postgres dbname=postgres connect_timeout={connect_timeout_s}",
        at.ip(),
        at.port()
    );
    let (c, conn) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls).await?;
    let ended = tokio::spawn(async move {
        let _ = conn.await;
        Instant::now()
    });
    Ok((c, ended))
}

/// Every acknowledged write is on the final primary, and no old primary acknowledged a write
/// sent after its successor had acknowledged one.
async fn check_history(s: &Spread, log: &[Attempt]) {
    // The last primary is what matters; a member still rejoining does not.
    let leader = s.leader().await;
    wait_in_recovery(s, &leader, false).await;
    let direct = s.direct(&leader).await.unwrap();
    let acked: Vec<&Attempt> = log.iter().filter(|a| a.result.is_ok()).collect();
    let ids: Vec<i64> = acked.iter().map(|a| a.id).collect();
    let lost = common::writer::missing(&direct, &ids).await;
    eprintln!(
        "{} writes acknowledged, {} errors, {} lost",
        acked.len(),
        log.len() - acked.len(),
        lost.len()
    );
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    // The first acknowledgement on each timeline; then any later write on an older one.
    let mut first_on: std::collections::BTreeMap<u32, Instant> = Default::default();
    for a in &acked {
        let (_, tl) = a.result.as_ref().unwrap();
        let t = first_on.entry(*tl).or_insert(a.done);
        *t = (*t).min(a.done);
    }
    for a in &acked {
        let (addr, tl) = a.result.as_ref().unwrap();
        for (newer, at) in first_on.range(tl + 1..) {
            assert!(
                a.sent < *at,
                "two primaries: write {} sent after timeline {newer} had acknowledged one was acknowledged by {addr} on timeline {tl}",
                a.id
            );
        }
    }
}

/// When a watched value changed, and what it became (none: gone).
type KeyEvent = (Instant, Option<String>);

/// The changes of one value over time, as the observer sees them by polling it every 10 ms:
/// Patroni's leader key, or the leader patroxy routes to.
struct Timeline {
    seen: Arc<Mutex<Vec<KeyEvent>>>,
    _task: tokio::task::JoinHandle<()>,
}

/// Notes `now` if it differs from the last value seen (the first value is the start, not a
/// change).
fn note(seen: &Mutex<Vec<KeyEvent>>, last: &mut Option<Option<String>>, now: Option<String>) {
    if last.as_ref() != Some(&now) {
        if last.is_some() {
            seen.lock().unwrap().push((Instant::now(), now.clone()));
        }
        *last = Some(now);
    }
}

impl Timeline {
    /// Patroni's leader key. Polled, not watched: a watch on a member the test froze would
    /// just go quiet; each read is bounded, and a member that does not answer is skipped.
    fn leader_key(s: &Spread) -> Timeline {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (record, endpoints) = (seen.clone(), s.etcd_endpoints());
        let task = s.obs.spawn_task(async move {
            let key = format!("/service/{SCOPE}/leader");
            let mut clients: Vec<Option<etcd_client::Client>> = vec![None; endpoints.len()];
            let (mut good, mut last) = (0, None);
            loop {
                let i = good % endpoints.len();
                if clients[i].is_none() {
                    let url = endpoints[i].clone();
                    clients[i] = etcd_client::Client::connect([url], None).await.ok();
                }
                let read = match clients[i].as_mut() {
                    Some(c) => {
                        let get = c.get(key.as_str(), None);
                        tokio::time::timeout(Duration::from_millis(300), get)
                            .await
                            .ok()
                            .and_then(Result::ok)
                    }
                    None => None,
                };
                let Some(resp) = read else {
                    clients[i] = None;
                    good += 1;
                    continue;
                };
                let value = resp
                    .kvs()
                    .first()
                    .map(|kv| String::from_utf8_lossy(kv.value()).into_owned());
                note(&record, &mut last, value);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        Timeline { seen, _task: task }
    }

    /// The leader patroxy routes to, from its `/topology` (timing a switchover from after
    /// `patronictl` returns would add the ~0.7 s it takes to confirm).
    fn routed(s: &Spread) -> Timeline {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (record, at) = (seen.clone(), s.admin_addr());
        let task = s.obs.spawn_task(async move {
            let mut last = None;
            loop {
                if let Some(now) = common::spread::routed_leader_at(at).await {
                    note(&record, &mut last, Some(now));
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        Timeline { seen, _task: task }
    }

    /// When the value first changed after `since`.
    fn first_change(&self, since: Instant) -> Option<Instant> {
        let seen = self.seen.lock().unwrap();
        seen.iter().map(|(t, _)| *t).find(|t| *t >= since)
    }

    /// When the value first became `value` after `since`.
    async fn when(&self, value: &str, since: Instant) -> Instant {
        wait_for(
            &format!("{value} to be seen"),
            Duration::from_secs(120),
            || async move {
                let seen = self.seen.lock().unwrap();
                seen.iter()
                    .find(|(t, v)| *t >= since && v.as_deref() == Some(value))
                    .map(|(t, _)| *t)
            },
        )
        .await
    }
}

/// Correctness bounds for routing after a fault. The issue's targets (0.5 s for ending
/// sessions, 1 s for a heal) are printed; the asserts leave room for a loaded machine.
const ROUTING_BOUND: Duration = Duration::from_secs(3);

const LAB_TIMEOUTS: &str = r#"[timeouts]
connect = "2s"
connect_wait = "30s"
drain = "400ms"
tcp_user_timeout = "5s"
"#;

/// A lab with `config`, the table, and `per_listener` writers on each listener whose writes
/// the leader has acknowledged (100 of them); with the leader's name.
async fn writing(config: &str, per_listener: i64) -> (Spread, Writers, String) {
    let s = Spread::start(config).await;
    create_table(&s).await;
    let leader = s.leader().await;
    s.wait_routed(&leader, Duration::from_secs(60)).await;
    let writers = Writers::start(&s, per_listener);
    let addr = s.member(&leader).host.addr(Net::Data).to_string();
    writers.wait_acked_by(&addr, Instant::now(), 100).await;
    (s, writers, leader)
}

async fn create_table(s: &Spread) {
    let leader = s.leader().await;
    let direct = s.direct(&leader).await.unwrap();
    direct
        .batch_execute("CREATE TABLE writes (id bigint PRIMARY KEY)")
        .await
        .unwrap();
}

/// Fault 1: the primary is cut from everyone (etcd, replicas, patroxy, clients). Patroni
/// elects a new leader after its ttl; patroxy ends the sessions it had on the old primary,
/// idle or blocked in a query, as soon as the new leader key appears, and new sessions reach
/// the new primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_cut_from_everyone() {
    let (s, writers, old) = writing(LAB_TIMEOUTS, 10).await;
    let watch = Timeline::leader_key(&s);

    // Two sessions on the old primary through patroxy: one idle, one blocked in a query.
    let at = s.px.socket(Net::Data, UNPOOLED);
    let sessions = s
        .client
        .run(async move {
            let mut ends = Vec::new();
            for blocked in [false, true] {
                let (c, ended) = pg_connect(at, 10).await.unwrap();
                c.batch_execute("SELECT 1").await.unwrap();
                match blocked {
                    true => {
                        let q = tokio::spawn(async move {
                            let _ = c.batch_execute("SELECT pg_sleep(600)").await;
                        });
                        ends.push((ended, None, Some(q)));
                    }
                    false => ends.push((ended, Some(c), None)),
                }
            }
            ends
        })
        .await;
    // The blocked query is running on the old primary.
    let direct = s.direct(&old).await.unwrap();
    wait_for("the blocked query to run", Duration::from_secs(30), || {
        let direct = &direct;
        async move {
            let sql = "SELECT 1 FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(600)'";
            (!direct.query(sql, &[]).await.ok()?.is_empty()).then_some(())
        }
    })
    .await;
    drop(direct);

    let t = Instant::now();
    s.member(&old).host.isolate();
    let new = s.new_leader(&old).await;
    let keyed = watch.when(&new, t).await;
    let new_addr = s.member(&new).host.addr(Net::Data).to_string();
    writers.wait_acked_by(&new_addr, t, 100).await;
    // The old key goes (its lease expires) just before the new one comes.
    let gone = watch.first_change(t).unwrap_or(keyed);
    let mut ended_after = Vec::new();
    for (ended, _idle, _query) in sessions {
        let at = tokio::time::timeout(Duration::from_secs(60), ended)
            .await
            .expect("a session on the cut primary is still open 60 s on")
            .unwrap();
        ended_after.push(at.saturating_duration_since(gone));
    }
    let (errors, gap) = writers.window(t);
    eprintln!(
        "primary {old} cut from everyone: its leader key went after {:?}, {new}'s came {:?} later; sessions on {old} ended {:?} after the old key went (idle, blocked); {errors} write errors, longest gap {gap:?}",
        gone - t,
        keyed - gone,
        ended_after
    );
    for after in &ended_after {
        assert!(
            *after < ROUTING_BOUND,
            "a session ended {after:?} after the new leader key"
        );
    }

    // The old primary comes back and rejoins as a replica.
    s.member(&old).host.rejoin();
    let log = writers.stop().await;
    check_history(&s, &log).await;
}

/// Waits until patroxy says it is not ready because of etcd; returns what it says.
async fn wait_not_ready(s: &Spread) -> String {
    wait_for(
        "patroxy to report its etcd watch down",
        Duration::from_secs(60),
        || async {
            let (code, body) = s.admin("/ready").await?;
            (code == 503 && body.contains("etcd")).then_some(body)
        },
    )
    .await
}

/// Fault 3: patroxy is cut from etcd (still reaching the servers) while Patroni switches
/// over behind its back. By default patroxy keeps routing to the last primary it knew, whose
/// demotion the server check catches (a read-only server is refused), says why it is not
/// ready, and shows how long etcd has been silent; after the heal it routes to the new
/// leader at once. With `etcd_loss = "fail-closed"` new connections are refused once etcd
/// has been silent longer than the cluster's ttl, and accepted again after the heal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patroxy_cut_from_etcd() {
    let (mut s, writers, old) = writing(LAB_TIMEOUTS, 10).await;
    let watch = Timeline::leader_key(&s);

    // Cut, and a switchover patroxy cannot see.
    let t = Instant::now();
    s.px.cut(Net::Dcs);
    let why = wait_not_ready(&s).await;
    let state = s.wait_healthy(3).await;
    let candidate = state.sync_standby.unwrap();
    s.switchover(&old, &candidate, None).await;
    let keyed = watch.when(&candidate, t).await;
    let silent = s
        .metric("patroxy_etcd_silence_seconds", &[])
        .await
        .unwrap_or(0.0);
    assert!(silent >= 1.0, "etcd silent for {silent} s by the metric");
    assert_eq!(s.routed_leader().await.as_deref(), Some(old.as_str()));
    // The old primary is read-only now: patroxy's server check refuses it, so nothing is
    // written there (check_history would see a write on the old timeline after the new one).
    let healed = Instant::now();
    s.px.heal(Net::Dcs);
    let routed = s.wait_routed(&candidate, Duration::from_secs(60)).await;
    let new_addr = s.member(&candidate).host.addr(Net::Data).to_string();
    writers.wait_acked_by(&new_addr, healed, 100).await;
    let (errors, gap) = writers.window(t);
    eprintln!(
        "patroxy cut from etcd for {:?}, switchover {old} -> {candidate} {:?} into it; not ready: {:?}; routed to {candidate} {routed:?} after the heal; {errors} write errors, longest gap {gap:?}",
        healed - t,
        keyed - t,
        why.trim()
    );
    assert!(
        routed < ROUTING_BOUND,
        "routing caught up {routed:?} after the heal"
    );

    // Fail closed: refused once etcd has been silent longer than the ttl (10 s).
    s.restart_proxy("etcd_loss = \"fail-closed\"");
    s.wait_routed(&candidate, Duration::from_secs(60)).await;
    let at = s.px.socket(Net::Data, UNPOOLED);
    let try_connect = move || async move {
        match pg_connect(at, 5).await {
            Ok((c, _)) => c
                .simple_query("SELECT 1")
                .await
                .map(|_| ())
                .map_err(|e| common::message(&e)),
            Err(e) => Err(common::message(&e)),
        }
    };
    let cut = Instant::now();
    s.px.cut(Net::Dcs);
    let refused = wait_for(
        "a refusal under fail-closed",
        Duration::from_secs(60),
        || {
            let attempt = s.client.spawn_task(try_connect());
            async move { attempt.await.ok()?.err() }
        },
    )
    .await;
    let refused_after = cut.elapsed();
    assert!(refused.contains("fail-closed"), "{refused}");
    // Silence counts from etcd's last answer, which came up to a progress interval (1 s
    // here) before the cut.
    assert!(
        refused_after >= Duration::from_secs(9),
        "refused {refused_after:?} into the cut, well before the ttl (10 s)"
    );
    assert!(
        refused.contains("longer than the cluster's ttl (10 s)"),
        "{refused}"
    );
    s.px.heal(Net::Dcs);
    let healed = Instant::now();
    wait_for(
        "a connection after the heal",
        Duration::from_secs(60),
        || {
            let attempt = s.client.spawn_task(try_connect());
            async move { attempt.await.ok()?.ok() }
        },
    )
    .await;
    eprintln!(
        "fail-closed: refused {refused_after:?} into the cut ({refused}); accepted again {:?} after the heal",
        healed.elapsed()
    );
    let log = writers.stop().await;
    check_history(&s, &log).await;
}

/// Fault 4: the etcd member patroxy watches through is killed, frozen (a silent watch) and
/// cut off; etcd's raft leader moves; a compaction runs under the watch. After each, a
/// switchover: patroxy must have moved to another member and route to the new leader within
/// 1 s of its key (the frozen and cut cases within `watch_idle_timeout`, 3 s here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_member_failures() {
    let mut s = Spread::start(LAB_TIMEOUTS).await;
    create_table(&s).await;
    let watch = Timeline::leader_key(&s);
    let routes = Timeline::routed(&s);
    s.wait_routed(&s.leader().await, Duration::from_secs(60))
        .await;
    let writers = Writers::start(&s, 5);
    let mut table = Vec::new();
    for fault in ["kill", "freeze", "cut", "raft leader moves", "compaction"] {
        let state = s.wait_healthy(3).await;
        let (leader, candidate) = (state.leader.unwrap(), state.sync_standby.unwrap());
        let used = s
            .watched_etcd()
            .await
            .expect("patroxy names its etcd member");
        let t = Instant::now();
        let mut avoid = Some(used.clone());
        match fault {
            "kill" => s.etcd_node(&used).proc.as_mut().unwrap().kill(),
            "freeze" => s.etcd_node(&used).proc.as_ref().unwrap().freeze(),
            "cut" => s.etcd_node(&used).host.cut(Net::Dcs),
            "raft leader moves" => {
                avoid = None;
                s.move_etcd_leader().await;
            }
            _ => {
                avoid = None;
                s.compact_etcd().await;
            }
        }
        s.switchover(&leader, &candidate, avoid.as_deref()).await;
        let keyed = watch.when(&candidate, t).await;
        let routed_at = routes.when(&candidate, t).await;
        let after_key = routed_at.saturating_duration_since(keyed);
        let moved_to = s.watched_etcd().await;
        eprintln!(
            "etcd fault {fault:?} on {used}: patroxy watches {moved_to:?}; routed to {candidate} {after_key:?} after its key"
        );
        table.push((fault, after_key));
        let bound = match fault {
            "freeze" | "cut" => ROUTING_BOUND + Duration::from_secs(3),
            _ => ROUTING_BOUND,
        };
        assert!(
            after_key < bound,
            "{fault}: routed {after_key:?} after the key"
        );
        if avoid.is_some() {
            assert_ne!(
                moved_to.as_deref(),
                Some(used.as_str()),
                "{fault}: still on {used}"
            );
        }
        // Undo the fault.
        match fault {
            "kill" => s.restart_etcd(&used),
            "freeze" => s.etcd_node(&used).proc.as_ref().unwrap().thaw(),
            "cut" => s.etcd_node(&used).host.heal(Net::Dcs),
            _ => {}
        }
        wait_for("3 etcd members", Duration::from_secs(60), || async {
            (s.etcd_healthy().await.len() == 3).then_some(())
        })
        .await;
    }
    eprintln!("etcd faults, routing after the leader key: {table:?}");
    let log = writers.stop().await;
    check_history(&s, &log).await;
}

/// Waits until the server `name` is read-only (in recovery) or, with `false`, accepts
/// writes; asked from the observer. Returns when it first was.
async fn wait_in_recovery(s: &Spread, name: &str, recovering: bool) -> Instant {
    let what = match recovering {
        true => "be read-only",
        false => "accept writes",
    };
    wait_for(
        &format!("{name} to {what}"),
        Duration::from_secs(120),
        || async {
            let direct = s.direct(name).await.ok()?;
            let row = direct
                .query_one("SELECT pg_is_in_recovery()", &[])
                .await
                .ok()?;
            (row.get::<_, bool>(0) == recovering).then(Instant::now)
        },
    )
    .await
}

/// Fault 2: the primary is cut from etcd only; patroxy and the replicas still reach it.
/// Patroni demotes it after `retry_timeout` and elects another leader after the ttl; patroxy
/// must never give a client the read-only old primary (its server check refuses it; a
/// client that got one would see 25006) nor let two primaries acknowledge writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the full fault suite: bash scripts/faults.sh"]
async fn a_primary_cut_from_etcd_only() {
    let (s, writers, old) = writing(LAB_TIMEOUTS, 10).await;
    let watch = Timeline::leader_key(&s);

    let t = Instant::now();
    s.member(&old).host.cut(Net::Dcs);
    let demoted = wait_in_recovery(&s, &old, true).await;
    let new = s.new_leader(&old).await;
    let keyed = watch.when(&new, t).await;
    let new_addr = s.member(&new).host.addr(Net::Data).to_string();
    writers.wait_acked_by(&new_addr, t, 100).await;
    let (errors, gap) = writers.window(t);
    eprintln!(
        "primary {old} cut from etcd: read-only after {:?}, {new}'s leader key after {:?}; {errors} write errors, longest gap {gap:?}",
        demoted - t,
        keyed - t
    );
    s.member(&old).host.heal(Net::Dcs);
    let log = writers.stop().await;
    let read_only: Vec<&Attempt> = log
        .iter()
        .filter(|a| matches!(&a.result, Err(e) if e.starts_with("25006")))
        .collect();
    assert!(
        read_only.is_empty(),
        "clients were given the read-only old primary: {read_only:?}"
    );
    check_history(&s, &log).await;
}

/// Fault 5: patroxy is cut from the primary (its data link goes down; etcd still names it
/// leader). Writes in flight end when TCP_USER_TIMEOUT gives up on them; new connections
/// wait for a reachable primary and get the clear error after `connect_wait`; nothing hangs.
/// After the heal, writes resume on the same primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the full fault suite: bash scripts/faults.sh"]
async fn patroxy_cut_from_the_primary() {
    let timeouts = r#"[timeouts]
connect = "2s"
connect_wait = "8s"
drain = "400ms"
tcp_user_timeout = "5s"
"#;
    let (s, writers, leader) = writing(timeouts, 5).await;
    let addr = s.member(&leader).host.addr(Net::Data).to_string();

    let t = Instant::now();
    s.member(&leader).host.cut(Net::Data);
    // Every writer gets an answer (an error), none hangs: its first error after the cut.
    let answered = wait_for(
        "every writer to get an error",
        Duration::from_secs(60),
        || async {
            let log = writers.log.lock().unwrap();
            let mut latest = t;
            for w in 0..10 {
                let first = log
                    .iter()
                    .filter(|a| a.id / 1_000_000_000 == w && a.sent >= t && a.result.is_err())
                    .map(|a| a.done)
                    .min()?;
                latest = latest.max(first);
            }
            Some(latest)
        },
    )
    .await;
    // A new connection waits connect_wait for a reachable primary, then is told.
    let at = s.px.socket(Net::Data, UNPOOLED);
    let asked = Instant::now();
    let refused = s
        .client
        .run(async move {
            match pg_connect(at, 60).await {
                Ok(_) => None,
                Err(e) => Some(format!(
                    "{} {}",
                    common::sqlstate(&e).unwrap_or_default(),
                    common::message(&e)
                )),
            }
        })
        .await
        .expect("a connection to an unreachable primary succeeded");
    let waited = asked.elapsed();
    eprintln!(
        "patroxy cut from primary {leader}: every writer had its error {:?} after the cut; a new connection was refused after {waited:?}: {refused}",
        answered - t
    );
    assert!(refused.starts_with("57P03"), "{refused}");
    assert!(waited >= Duration::from_secs(8), "refused after {waited:?}");

    let healed = Instant::now();
    s.member(&leader).host.heal(Net::Data);
    writers.wait_acked_by(&addr, healed, 100).await;
    eprintln!("writes resumed {:?} after the heal", healed.elapsed());
    let log = writers.stop().await;
    check_history(&s, &log).await;
}

/// A small deterministic generator (xorshift64*), so that a seed replays a soak's order.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) as usize % n
    }
}

/// What puts a soak fault right again.
type Undo = Box<dyn FnOnce(&mut Spread)>;

/// One soak event, as the table shows it.
struct Row {
    n: usize,
    what: String,
    gap: Duration,
    /// Client errors through the unpooled listener, and through the pool.
    errors: (usize, usize),
    floor: Duration,
    routed: Duration,
    at: Duration,
}

/// Fault 7: the soak. 20 planned switchovers, 5 leader partitions and 5 etcd member faults
/// (each followed by a switchover), in an order drawn from a printed seed
/// (`PATROXY_SOAK_SEED` replays one), under 20 writers (10 unpooled, 10 pooled). Afterwards:
/// no acknowledged write lost, no two primaries written, and for every event patroxy routed
/// to the new leader. Writes a table (write gap and client errors per event, beside the
/// promotion floor: new leader key to server writable) and a timeline to
/// `bench-results/faults/` (or `$PATROXY_FAULTS_OUT`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the full fault suite: bash scripts/faults.sh"]
async fn soak() {
    let seed = std::env::var("PATROXY_SOAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("soak seed {seed} (PATROXY_SOAK_SEED={seed} replays this order)");
    let mut rng = Rng(seed);
    let mut events: Vec<&str> = [
        vec!["switchover"; 20],
        vec!["partition"; 5],
        vec!["etcd"; 5],
    ]
    .concat();
    for i in (1..events.len()).rev() {
        events.swap(i, rng.below(i + 1));
    }
    let mut s = Spread::start(LAB_TIMEOUTS).await;
    create_table(&s).await;
    let watch = Timeline::leader_key(&s);
    let routes = Timeline::routed(&s);
    s.wait_routed(&s.leader().await, Duration::from_secs(60))
        .await;
    let start = Instant::now();
    let writers = Writers::start(&s, 10);
    let mut rows = Vec::new();
    let mut etcd_faults = 0;
    for (n, kind) in events.iter().enumerate() {
        let state = s.wait_healthy(3).await;
        let (leader, candidate) = (state.leader.unwrap(), state.sync_standby.unwrap());
        let t = Instant::now();
        let mut undo: Option<Undo> = None;
        // The fault first; a switchover (after an etcd fault too) runs while the promotion
        // is timed: patronictl returns only once it has seen the new leader run.
        let (what, switch) = match *kind {
            "switchover" => (format!("switchover {leader} -> {candidate}"), Some(None)),
            "partition" => {
                s.member(&leader).host.isolate();
                let host = s.member(&leader).host.clone();
                undo = Some(Box::new(move |_| host.rejoin()));
                (format!("leader {leader} partitioned"), None)
            }
            _ => {
                // Each kind in turn, on a member drawn at random.
                let e = format!("e{}", 1 + rng.below(3));
                let fault = ["kill", "freeze", "cut"][etcd_faults % 3];
                etcd_faults += 1;
                let node = s.etcd_node(&e);
                match fault {
                    "kill" => node.proc.as_mut().unwrap().kill(),
                    "freeze" => node.proc.as_ref().unwrap().freeze(),
                    _ => node.host.cut(Net::Dcs),
                }
                let name = e.clone();
                undo = Some(Box::new(move |s: &mut Spread| match fault {
                    "kill" => s.restart_etcd(&name),
                    "freeze" => s.etcd_node(&name).proc.as_ref().unwrap().thaw(),
                    _ => s.etcd_node(&name).host.heal(Net::Dcs),
                }));
                let what = format!("etcd {e} {fault}, then switchover {leader} -> {candidate}");
                (what, Some(Some(e)))
            }
        };
        let timed = async {
            let new = s.new_leader(&leader).await;
            let keyed = watch.when(&new, t).await;
            let writable = wait_in_recovery(&s, &new, false).await;
            (new, keyed, writable)
        };
        let switched = async {
            if let Some(avoid) = &switch {
                s.switchover(&leader, &candidate, avoid.as_deref()).await;
            }
        };
        let ((new, keyed, writable), ()) = tokio::join!(timed, switched);
        let routed = routes.when(&new, t).await.saturating_duration_since(keyed);
        let new_addr = s.member(&new).host.addr(Net::Data).to_string();
        writers.wait_acked_by(&new_addr, t, 20).await;
        let (_, gap) = writers.window(t);
        let errors = writers.errors_by_listener(t);
        if let Some(undo) = undo {
            undo(&mut s);
        }
        eprintln!(
            "soak {n}: {what}: gap {gap:?}, errors {errors:?} (unpooled, pooled), floor {:?}, routed {routed:?} after the key",
            writable.saturating_duration_since(keyed)
        );
        rows.push(Row {
            n,
            what,
            gap,
            errors,
            floor: writable.saturating_duration_since(keyed),
            routed,
            at: t - start,
        });
    }
    let log = writers.stop().await;
    check_history(&s, &log).await;
    write_soak_results(seed, &rows, &log, start);
}

/// The soak's table (Markdown) and timeline (SVG: acknowledged writes per 100 ms, a line at
/// each event).
fn write_soak_results(seed: u64, rows: &[Row], log: &[Attempt], start: Instant) {
    let dir = std::env::var_os("PATROXY_FAULTS_OUT")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("bench-results/faults")
        });
    std::fs::create_dir_all(&dir).unwrap();
    let ms = |d: Duration| d.as_millis();
    let mut md = format!(
        "# Soak (seed {seed})\n\n20 writers through patroxy (10 unpooled, 10 transaction-pooled), committing a numbered row every 10 ms each.\n\n\
         | # | event | write gap (ms) | client errors, unpooled | client errors, pooled | floor: key to writable (ms) | routed after key (ms) |\n|---|---|---|---|---|---|---|\n"
    );
    for r in rows {
        md += &format!(
            "| {} | {} | {} | {} | {} | {} | {} |\n",
            r.n,
            r.what,
            ms(r.gap),
            r.errors.0,
            r.errors.1,
            ms(r.floor),
            ms(r.routed)
        );
    }
    let acked = log.iter().filter(|a| a.result.is_ok()).count();
    md += &format!(
        "\n{acked} writes acknowledged, {} errors, 0 lost, no write on two primaries.\n",
        log.len() - acked
    );
    std::fs::write(dir.join("soak.md"), md).unwrap();

    let bucket = Duration::from_millis(100);
    let end = log.iter().map(|a| a.done).max().unwrap_or(start);
    let n = ((end - start).as_millis() / bucket.as_millis()) as usize + 1;
    let mut counts = vec![0u32; n];
    for a in log.iter().filter(|a| a.result.is_ok() && a.done >= start) {
        counts[((a.done - start).as_millis() / bucket.as_millis()) as usize] += 1;
    }
    let (w, h) = (1200.0, 300.0);
    let top = f64::from(*counts.iter().max().unwrap_or(&1)).max(1.0);
    let x = |i: f64| 40.0 + i / n as f64 * (w - 50.0);
    let y = |c: f64| h - 30.0 - c / top * (h - 50.0);
    let points: Vec<String> = counts
        .iter()
        .enumerate()
        .map(|(i, c)| format!("{:.1},{:.1}", x(i as f64), y(f64::from(*c))))
        .collect();
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"10\">\n\
         <text x=\"40\" y=\"12\">acknowledged writes per 100 ms (max {top}); soak seed {seed}; {} s</text>\n",
        (end - start).as_secs()
    );
    for r in rows {
        let xe = x(r.at.as_millis() as f64 / bucket.as_millis() as f64);
        let colour = match r.what.split(' ').next() {
            Some("switchover") => "#4a90d9",
            Some("leader") => "#d94a4a",
            _ => "#d9a04a",
        };
        svg += &format!(
            "<line x1=\"{xe:.1}\" y1=\"20\" x2=\"{xe:.1}\" y2=\"{}\" stroke=\"{colour}\"/><text x=\"{xe:.1}\" y=\"{}\" fill=\"{colour}\">{}</text>\n",
            h - 30.0,
            h - 18.0,
            r.n
        );
    }
    svg += &format!(
        "<polyline fill=\"none\" stroke=\"black\" stroke-width=\"0.7\" points=\"{}\"/>\n\
         <text x=\"40\" y=\"{}\">blue: switchover, red: leader partition, orange: etcd member fault</text>\n</svg>\n",
        points.join(" "),
        h - 4.0
    );
    std::fs::write(dir.join("timeline.svg"), svg).unwrap();
}

/// Fault 6: clients vanish inside a transaction (their host is cut off). patroxy notices by
/// TCP keepalive (2 s idle, then 3 probes 1 s apart here), or, when the client vanished
/// before acknowledging what it was last sent (here, often: its delayed ACK), by
/// TCP_USER_TIMEOUT (5 s here); it lets their server connections go: the unpooled one ends,
/// the pooled one is not lent to anyone before its transaction is rolled back. Nothing they
/// wrote is committed, and their row locks are released. (Found by this test: client
/// sockets had no TCP_USER_TIMEOUT, and such a client held its transaction open for the
/// kernel's retransmissions, about 15 minutes.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the full fault suite: bash scripts/faults.sh"]
async fn a_client_vanishes_mid_transaction() {
    let config =
        format!("{LAB_TIMEOUTS}tcp_keepidle = \"2s\"\ntcp_keepintvl = \"1s\"\ntcp_keepcnt = 3\n");
    let s = Spread::start(&config).await;
    create_table(&s).await;
    let leader = s.leader().await;
    s.wait_routed(&leader, Duration::from_secs(60)).await;
    let at = [
        (s.px.socket(Net::Data, UNPOOLED), -1i64),
        (s.px.socket(Net::Data, POOLED), -2),
    ];
    let clients = s
        .client
        .run(async move {
            let mut kept = Vec::new();
            for (addr, id) in at {
                let (c, _) = pg_connect(addr, 10).await.unwrap();
                c.batch_execute(&format!("BEGIN; INSERT INTO writes (id) VALUES ({id})"))
                    .await
                    .unwrap();
                kept.push(c);
            }
            kept
        })
        .await;
    let direct = s.direct(&leader).await.unwrap();
    let in_transaction = || async {
        let sql = "SELECT count(*) FROM pg_stat_activity WHERE state = 'idle in transaction'";
        direct.query_one(sql, &[]).await.unwrap().get::<_, i64>(0)
    };
    wait_for("two transactions open", Duration::from_secs(30), || async {
        (in_transaction().await == 2).then_some(())
    })
    .await;

    let t = Instant::now();
    s.client.isolate();
    while in_transaction().await > 0 {
        if t.elapsed() > Duration::from_secs(60) {
            let sql = "SELECT client_addr::text, state, query FROM pg_stat_activity WHERE backend_type = 'client backend'";
            let rows: Vec<(Option<String>, Option<String>, Option<String>)> = direct
                .query(sql, &[])
                .await
                .unwrap()
                .iter()
                .map(|r| (r.get(0), r.get(1), r.get(2)))
                .collect();
            let ss = s.px.command("ss").args(["-tino"]).output().unwrap();
            panic!(
                "the vanished clients' transactions are still open 60 s on: {rows:?}\nsockets on px:\n{}\npatroxy's log:\n{}",
                String::from_utf8_lossy(&ss.stdout),
                s.proxy_log()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let released = t.elapsed();
    let committed: i64 = direct
        .query_one("SELECT count(*) FROM writes WHERE id < 0", &[])
        .await
        .unwrap()
        .get(0);
    // Their row locks are gone: the same ids can be written (and are, then removed).
    direct
        .batch_execute("INSERT INTO writes (id) VALUES (-1), (-2); DELETE FROM writes WHERE id < 0")
        .await
        .unwrap();
    eprintln!(
        "two clients vanished inside transactions: their server transactions ended {released:?} after the cut (bounds: keepalive 2 s + 3 x 1 s, TCP_USER_TIMEOUT 5 s); {committed} rows committed"
    );
    assert_eq!(
        committed, 0,
        "a vanished client's transaction was committed"
    );
    assert!(
        released < Duration::from_secs(20),
        "released after {released:?}"
    );
    s.client.rejoin();
    drop(clients);
}
