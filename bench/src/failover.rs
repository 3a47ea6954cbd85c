//! Failover mode: writers per endpoint (`clients`, one by default) each commit a numbered row
//! every 10 ms and reconnect on error, while the cluster goes through a planned switchover, a crash (`kill -9`) and a silent
//! loss (`SIGSTOP`) of its leader. Every attempt is recorded, and afterwards every
//! acknowledged row is looked for on the last primary.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::ValueEnum;
use etcd_client::{Client as Etcd, EventType, WatchOptions};
use indicatif::ProgressBar;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::endpoint::{describe, Endpoint};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Event {
    /// `patronictl switchover` to the synchronous standby.
    Switchover,
    /// `kill -9` of the leader's Patroni and postmaster; the node is restarted afterwards.
    Crash,
    /// `SIGSTOP` of every process of the leader; fenced (kill -9) and restarted afterwards.
    Freeze,
}

impl Event {
    pub fn name(self) -> &'static str {
        match self {
            Event::Switchover => "switchover",
            Event::Crash => "crash",
            Event::Freeze => "freeze",
        }
    }
}

pub struct Settings {
    pub endpoints: Vec<Endpoint>,
    pub etcd: String,
    /// The leader key, e.g. `/service/demo/leader`.
    pub leader_key: String,
    /// `scripts/cluster.sh`: switchover, crash, freeze, thaw, restart, wait-healthy.
    pub cluster_ctl: PathBuf,
    pub events: Vec<Event>,
    /// Writers per endpoint.
    pub clients: usize,
    pub interval: Duration,
    /// Quiet time before the first event and after each one.
    pub settle: Duration,
}

/// One write attempt.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Attempt {
    pub endpoint: String,
    pub id: i64,
    /// Seconds since the run began: when the attempt started and when it ended.
    pub start: f64,
    pub end: f64,
    pub ok: bool,
    pub error: Option<String>,
}

/// A value of the leader key, as seen by the watch.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LeaderChange {
    pub at: f64,
    pub leader: Option<String>,
    /// For a new leader: when the server itself first answered `pg_is_in_recovery() = false`
    /// to a direct connection polling every 2 ms. The floor no proxy can beat.
    pub writable_at: Option<f64>,
}

/// One endpoint's numbers for one event.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EventResult {
    pub event: Event,
    pub endpoint: String,
    /// Seconds since the run began.
    pub started: f64,
    pub new_leader: Option<String>,
    pub new_leader_at: Option<f64>,
    /// Longest time without a successful write, in the event's window (seconds).
    pub longest_gap: f64,
    pub failed_attempts: usize,
    /// From the new leader key to this endpoint's first successful write after it (seconds).
    pub leader_to_first_write: Option<f64>,
    /// From the new leader key to the new primary leaving recovery (seconds).
    pub leader_to_writable: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Outcome {
    pub events: Vec<EventResult>,
    pub leader_changes: Vec<LeaderChange>,
    pub attempts: Vec<Attempt>,
    /// Acknowledged writes missing on the last primary, by endpoint.
    pub lost: BTreeMap<String, usize>,
    pub acknowledged: BTreeMap<String, usize>,
    /// Event windows (start, end) in seconds, for the plot.
    pub windows: Vec<(Event, f64, f64)>,
}

type Log<T> = Arc<Mutex<Vec<T>>>;

pub async fn run(s: &Settings) -> anyhow::Result<Outcome> {
    let t0 = Instant::now();
    let secs = move |t: Instant| t.duration_since(t0).as_secs_f64();
    setup(&s.endpoints).await?;

    let leaders: Log<LeaderChange> = Arc::default();
    let stop = CancellationToken::new();
    let watcher = tokio::spawn(watch_leader(
        s.etcd.clone(),
        s.leader_key.clone(),
        leaders.clone(),
        t0,
        stop.clone(),
    ));
    let attempts: Log<Attempt> = Arc::default();
    let mut writers = Vec::new();
    for ep in &s.endpoints {
        for w in 0..s.clients.max(1) {
            writers.push(tokio::spawn(write_loop(
                ep.clone(),
                w as i64 * 1_000_000_000,
                s.interval,
                attempts.clone(),
                t0,
                stop.clone(),
            )));
        }
    }

    let bar = ProgressBar::new_spinner();
    bar.enable_steady_tick(Duration::from_millis(200));
    bar.set_message("failover: warming up");
    tokio::time::sleep(s.settle).await;
    let mut windows = Vec::new();
    let mut results = Vec::new();
    for &event in &s.events {
        bar.set_message(format!("failover: {}", event.name()));
        let started = Instant::now();
        let old = ctl(&s.cluster_ctl, &["leader"]).await?;
        let old = old.trim().to_owned();
        match event {
            Event::Switchover => {
                ctl(&s.cluster_ctl, &["switchover"]).await?;
            }
            Event::Crash => {
                ctl(&s.cluster_ctl, &["crash", &old]).await?;
            }
            Event::Freeze => {
                ctl(&s.cluster_ctl, &["freeze", &old]).await?;
            }
        }
        let (new_leader, new_at) =
            wait_new_leader(&leaders, &old, secs(started), Duration::from_secs(90)).await?;
        wait_all_written(&attempts, &s.endpoints, new_at, Duration::from_secs(90)).await;
        match event {
            Event::Switchover => {}
            Event::Crash => {
                ctl(&s.cluster_ctl, &["restart", &old]).await?;
            }
            Event::Freeze => {
                // Fenced, not thawed: Patroni 3.0.2 on SIGCONT was seen taking the leader key
                // back, which loses the new leader's writes whatever the proxy.
                ctl(&s.cluster_ctl, &["fence", &old]).await?;
                ctl(&s.cluster_ctl, &["restart", &old]).await?;
            }
        }
        ctl(&s.cluster_ctl, &["wait-healthy", "3"]).await?;
        tokio::time::sleep(s.settle).await;
        let (from, to) = (secs(started), secs(Instant::now()));
        windows.push((event, from, to));
        let log = attempts.lock().unwrap().clone();
        let writable = leaders
            .lock()
            .unwrap()
            .iter()
            .find(|c| c.at == new_at)
            .and_then(|c| c.writable_at)
            .map(|w| w - new_at);
        for ep in &s.endpoints {
            let mut r = measure(
                event,
                &ep.name,
                &log,
                from,
                to,
                Some(new_leader.clone()),
                new_at,
            );
            r.leader_to_writable = writable;
            results.push(r);
        }
    }
    bar.set_message("failover: checking acknowledged writes");
    stop.cancel();
    for w in writers {
        let _ = w.await;
    }
    let _ = watcher.await;
    let attempts = Arc::try_unwrap(attempts)
        .map(|m| m.into_inner().unwrap())
        .unwrap_or_default();
    let (acknowledged, lost) = verify(&s.endpoints, &attempts).await?;
    bar.finish_and_clear();
    let leader_changes = leaders.lock().unwrap().clone();
    Ok(Outcome {
        events: results,
        leader_changes,
        attempts,
        lost,
        acknowledged,
        windows,
    })
}

/// Runs the cluster control script; its stdout on success.
async fn ctl(script: &PathBuf, args: &[&str]) -> anyhow::Result<String> {
    let out = tokio::process::Command::new("bash")
        .arg(script)
        .args(args)
        .output()
        .await?;
    anyhow::ensure!(
        out.status.success(),
        "{} {}: {}",
        script.display(),
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

async fn setup(endpoints: &[Endpoint]) -> anyhow::Result<()> {
    for ep in endpoints {
        if let Ok(c) = ep.connect(Duration::from_secs(10)).await {
            c.batch_execute(
                "DROP TABLE IF EXISTS bench_failover;
                 CREATE TABLE bench_failover (endpoint text, id bigint, PRIMARY KEY (endpoint, id))",
            )
            .await
            .map_err(|e| anyhow::anyhow!(describe(&e)))?;
            return Ok(());
        }
    }
    anyhow::bail!("no endpoint answered")
}

async fn watch_leader(
    url: String,
    key: String,
    log: Log<LeaderChange>,
    t0: Instant,
    stop: CancellationToken,
) {
    let secs = |t: Instant| t.duration_since(t0).as_secs_f64();
    // Reconnects on any error: the bench must see every change.
    while !stop.is_cancelled() {
        let Ok(mut etcd) = Etcd::connect([url.as_str()], None).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let Ok(resp) = etcd.get(key.as_str(), None).await else {
            continue;
        };
        let rev = resp.header().map_or(0, |h| h.revision());
        let current = resp
            .kvs()
            .first()
            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned());
        log.lock().unwrap().push(LeaderChange {
            at: secs(Instant::now()),
            leader: current,
            writable_at: None,
        });
        let opts = WatchOptions::new().with_start_revision(rev + 1);
        let Ok(mut stream) = etcd.watch(key.as_str(), Some(opts)).await else {
            continue;
        };
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                msg = stream.message() => {
                    let Ok(Some(resp)) = msg else { break };
                    for ev in resp.events() {
                        let leader = match ev.event_type() {
                            EventType::Put => ev.kv().map(|kv| String::from_utf8_lossy(kv.value()).into_owned()),
                            EventType::Delete => None,
                        };
                        let mut log_now = log.lock().unwrap();
                        let index = log_now.len();
                        log_now.push(LeaderChange { at: secs(Instant::now()), leader: leader.clone(), writable_at: None });
                        drop(log_now);
                        if let Some(name) = leader {
                            let member_key = key.replace("/leader", &format!("/members/{name}"));
                            tokio::spawn(probe_writable(etcd.clone(), member_key, log.clone(), index, t0));
                        }
                    }
                }
            }
        }
    }
}

/// Polls the new leader directly until it leaves recovery; records when.
async fn probe_writable(
    mut etcd: Etcd,
    member_key: String,
    log: Log<LeaderChange>,
    index: usize,
    t0: Instant,
) {
    let Ok(resp) = etcd.get(member_key.as_str(), None).await else {
        return;
    };
    let Some(ep) = resp.kvs().first().and_then(|kv| {
        let v: serde_json::Value = serde_json::from_slice(kv.value()).ok()?;
        patroxy::discovery::patroni::Endpoint::from_conn_url(v["conn_url"].as_str()?)
    }) else {
        return;
    };
    let conninfo = format!(
        "host={} port={} user=postgres dbname=postgres",
        ep.host, ep.port
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut client = None;
    while Instant::now() < deadline {
        if client.is_none() {
            client = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
                .await
                .ok()
                .map(|(c, conn)| {
                    tokio::spawn(conn);
                    c
                });
        }
        if let Some(c) = &client {
            match c.query_one("SELECT pg_is_in_recovery()", &[]).await {
                Ok(row) if !row.get::<_, bool>(0) => {
                    log.lock().unwrap()[index].writable_at =
                        Some(Instant::now().duration_since(t0).as_secs_f64());
                    return;
                }
                Ok(_) => {}
                Err(_) => client = None,
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

async fn wait_new_leader(
    log: &Log<LeaderChange>,
    old: &str,
    since: f64,
    limit: Duration,
) -> anyhow::Result<(String, f64)> {
    let deadline = Instant::now() + limit;
    loop {
        let found = log
            .lock()
            .unwrap()
            .iter()
            .find(|c| c.at >= since && c.leader.as_deref().is_some_and(|l| l != old))
            .map(|c| (c.leader.clone().unwrap(), c.at));
        if let Some(f) = found {
            return Ok(f);
        }
        anyhow::ensure!(Instant::now() < deadline, "no new leader within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until every endpoint has written successfully after `since` (or the limit).
async fn wait_all_written(log: &Log<Attempt>, endpoints: &[Endpoint], since: f64, limit: Duration) {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        let done = {
            let log = log.lock().unwrap();
            endpoints.iter().all(|ep| {
                log.iter()
                    .any(|a| a.endpoint == ep.name && a.ok && a.end >= since)
            })
        };
        if done {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn write_loop(
    ep: Endpoint,
    base: i64,
    interval: Duration,
    log: Log<Attempt>,
    t0: Instant,
    stop: CancellationToken,
) {
    let secs = |t: Instant| t.duration_since(t0).as_secs_f64();
    let mut client = None;
    let mut id = base;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !stop.is_cancelled() {
        tick.tick().await;
        id += 1;
        let start = Instant::now();
        let result = async {
            if client.is_none() {
                client = Some(ep.connect(Duration::from_secs(30)).await?);
            }
            let c = client.as_ref().expect("connected above");
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&ep.name, &id];
            let insert = c.execute(
                "INSERT INTO bench_failover (endpoint, id) VALUES ($1, $2)",
                &params,
            );
            // Generous: a hung write is the proxy's behaviour to measure, not to cut short.
            match tokio::time::timeout(Duration::from_secs(60), insert).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(describe(&e)),
                Err(_) => Err("no answer within 60 s".into()),
            }
        }
        .await;
        if result.is_err() {
            client = None;
        }
        log.lock().unwrap().push(Attempt {
            endpoint: ep.name.clone(),
            id,
            start: secs(start),
            end: secs(Instant::now()),
            ok: result.is_ok(),
            error: result.err(),
        });
    }
}

/// The numbers of one endpoint in one event window.
pub fn measure(
    event: Event,
    endpoint: &str,
    log: &[Attempt],
    from: f64,
    to: f64,
    new_leader: Option<String>,
    new_leader_at: f64,
) -> EventResult {
    let mine: Vec<&Attempt> = log
        .iter()
        .filter(|a| a.endpoint == endpoint && a.end >= from && a.end <= to)
        .collect();
    let mut last_ok = from;
    let mut gap: f64 = 0.0;
    for a in mine.iter().filter(|a| a.ok) {
        gap = gap.max(a.end - last_ok);
        last_ok = a.end;
    }
    gap = gap.max(to - last_ok);
    let first_after = mine
        .iter()
        .find(|a| a.ok && a.end >= new_leader_at)
        .map(|a| a.end - new_leader_at);
    EventResult {
        event,
        endpoint: endpoint.to_owned(),
        started: from,
        new_leader,
        new_leader_at: Some(new_leader_at),
        longest_gap: gap,
        failed_attempts: mine.iter().filter(|a| !a.ok).count(),
        leader_to_first_write: first_after,
        leader_to_writable: None,
    }
}

/// Acknowledged and lost writes per endpoint, checked on the primary through the endpoints.
async fn verify(
    endpoints: &[Endpoint],
    attempts: &[Attempt],
) -> anyhow::Result<(BTreeMap<String, usize>, BTreeMap<String, usize>)> {
    let mut present: BTreeSet<(String, i64)> = BTreeSet::new();
    let mut read = false;
    for ep in endpoints {
        let Ok(c) = ep.connect(Duration::from_secs(30)).await else {
            continue;
        };
        let Ok(rows) = c
            .query("SELECT endpoint, id FROM bench_failover", &[])
            .await
        else {
            continue;
        };
        present.extend(rows.iter().map(|r| (r.get(0), r.get(1))));
        read = true;
        break;
    }
    anyhow::ensure!(read, "could not read bench_failover through any endpoint");
    let mut acknowledged = BTreeMap::new();
    let mut lost = BTreeMap::new();
    for ep in endpoints {
        let acked: Vec<i64> = attempts
            .iter()
            .filter(|a| a.endpoint == ep.name && a.ok)
            .map(|a| a.id)
            .collect();
        let missing = acked
            .iter()
            .filter(|id| !present.contains(&(ep.name.clone(), **id)))
            .count();
        acknowledged.insert(ep.name.clone(), acked.len());
        lost.insert(ep.name.clone(), missing);
    }
    Ok((acknowledged, lost))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(end: f64, ok: bool) -> Attempt {
        Attempt {
            endpoint: "p".into(),
            id: 0,
            start: end - 0.001,
            end,
            ok,
            error: None,
        }
    }

    #[test]
    fn gaps_failures_and_first_write() {
        let log = vec![
            a(1.0, true),
            a(1.1, false),
            a(1.9, false),
            a(2.5, true),
            a(2.6, true),
        ];
        let r = measure(Event::Crash, "p", &log, 0.9, 3.0, None, 2.0);
        assert!((r.longest_gap - 1.5).abs() < 1e-9);
        assert_eq!(r.failed_attempts, 2);
        assert!((r.leader_to_first_write.unwrap() - 0.5).abs() < 1e-9);
    }
}
