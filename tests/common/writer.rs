//! A client that commits (or reads) a numbered row every 10 ms through patroxy,
//! reconnecting on any error, and logs every attempt: what the failover tests count errors,
//! gaps and lost writes with.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::*;

/// How long one event (a switchover, a crash) may take to be seen through.
pub const EVENT: Duration = Duration::from_secs(90);

#[derive(Debug, Clone)]
pub struct Attempt {
    /// When the answer (or the error) came back.
    pub done: Instant,
    pub id: i64,
    /// The port of the server that acknowledged it, or the error.
    pub result: Result<u16, String>,
}

pub const INSERT: &str =
    "INSERT INTO writes (id, port) VALUES ($1, inet_server_port()) RETURNING port";
pub const READ: &str = "SELECT inet_server_port() WHERE $1::bigint IS NOT NULL";

/// How a writer talks: as which user, with a statement prepared once or not.
#[derive(Clone, Copy)]
pub struct Script {
    pub user: &'static str,
    pub prepared: bool,
}

impl Default for Script {
    fn default() -> Self {
        Script {
            user: "postgres",
            prepared: false,
        }
    }
}

/// Commits a numbered row every 10 ms through patroxy, reconnecting on any error.
pub struct Writer {
    pub log: Arc<Mutex<Vec<Attempt>>>,
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Writer {
    pub fn spawn(port: u16) -> Writer {
        Writer::spawn_from(port, 0)
    }

    /// A writer whose row ids start after `base`, so that several can share the table.
    pub fn spawn_from(port: u16, base: i64) -> Writer {
        Writer::spawn_with(port, base, INSERT)
    }

    /// A client that reads the primary instead (its answers name the server).
    pub fn spawn_reader(port: u16) -> Writer {
        Writer::spawn_with(port, 0, READ)
    }

    pub fn spawn_with(port: u16, base: i64, sql: &'static str) -> Writer {
        Writer::spawn_as(port, base, sql, Script::default())
    }

    /// A writer as `user`; `prepared`: it prepares its statement once per connection and
    /// keeps using it (a named statement on the server).
    pub fn spawn_as(port: u16, base: i64, sql: &'static str, script: Script) -> Writer {
        let log = Arc::new(Mutex::new(Vec::new()));
        let stop = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(Self::run(
            port,
            (base, sql, script),
            log.clone(),
            stop.clone(),
        ));
        Writer { log, stop, task }
    }

    async fn run(
        port: u16,
        (base, sql, script): (i64, &'static str, Script),
        log: Arc<Mutex<Vec<Attempt>>>,
        stop: tokio_util::sync::CancellationToken,
    ) {
        let mut client: Option<(tokio_postgres::Client, Option<tokio_postgres::Statement>)> = None;
        let mut id = base;
        while !stop.is_cancelled() {
            id += 1;
            let result = async {
                if client.is_none() {
                    let (c, _) = connect_with(port, &format!("user={}", script.user))
                        .await
                        .map_err(|e| format!("connect: {}", message(&e)))?;
                    let statement = match script.prepared {
                        true => Some(
                            c.prepare(sql)
                                .await
                                .map_err(|e| format!("prepare: {}", message(&e)))?,
                        ),
                        false => None,
                    };
                    client = Some((c, statement));
                }
                let (c, statement) = client.as_ref().unwrap();
                let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&id];
                let insert = async {
                    match statement {
                        Some(st) => c.query_one(st, &params).await,
                        None => c.query_one(sql, &params).await,
                    }
                };
                match tokio::time::timeout(Duration::from_secs(60), insert).await {
                    Ok(Ok(row)) => Ok(row.get::<_, i32>(0) as u16),
                    Ok(Err(e)) => Err(format!(
                        "{} {}",
                        sqlstate(&e).unwrap_or_default(),
                        message(&e)
                    )),
                    Err(_) => Err("insert hung for 60 s".to_owned()),
                }
            }
            .await;
            if result.is_err() {
                client = None;
            }
            let done = Instant::now();
            log.lock().unwrap().push(Attempt { done, id, result });
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until a write made after `since` is acknowledged by the server on `port`.
    pub async fn wait_acked_on(&self, port: u16, since: Instant) {
        wait_for(
            &format!("a write acknowledged on port {port}"),
            EVENT,
            || async move {
                let log = self.log.lock().unwrap();
                log.iter()
                    .any(|a| a.done >= since && a.result == Ok(port))
                    .then_some(())
            },
        )
        .await;
    }

    /// Failed attempts and the longest time without a completed write, since `since`.
    pub fn window(&self, since: Instant) -> (usize, Duration) {
        let log = self.log.lock().unwrap();
        let mut failed = 0;
        let mut last_ok = since;
        let mut gap = Duration::ZERO;
        for a in log.iter().filter(|a| a.done >= since) {
            match a.result {
                Ok(_) => {
                    gap = gap.max(a.done - last_ok);
                    last_ok = a.done;
                }
                Err(_) => failed += 1,
            }
        }
        (failed, gap)
    }

    pub async fn stop(self) -> Vec<Attempt> {
        self.stop.cancel();
        self.task.await.unwrap();
        Arc::try_unwrap(self.log).unwrap().into_inner().unwrap()
    }
}

/// Every acknowledged write of `writers` is on the primary at `port`.
pub async fn nothing_lost(writers: Vec<Writer>, port: u16) {
    let mut acked = Vec::new();
    for w in writers {
        acked.extend(
            w.stop()
                .await
                .into_iter()
                .filter(|a| a.result.is_ok())
                .map(|a| a.id),
        );
    }
    let lost = missing(&connect(port).await.unwrap(), &acked).await;
    eprintln!("{} acknowledged writes, {} lost", acked.len(), lost.len());
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
}

/// The ids of `acked` that the `writes` table on `direct` lacks: acknowledged writes lost.
pub async fn missing(direct: &tokio_postgres::Client, acked: &[i64]) -> Vec<i64> {
    let present: std::collections::BTreeSet<i64> = direct
        .query("SELECT id FROM writes", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    acked
        .iter()
        .copied()
        .filter(|id| !present.contains(id))
        .collect()
}
