//! Latency mode: closed-loop workloads through every endpoint, interleaved in short slices so
//! that a noisy machine affects all endpoints alike. HDR histograms per endpoint and cell.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::ValueEnum;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use tokio_postgres::{Client, Statement};

use crate::endpoint::{describe, Endpoint};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Workload {
    /// `SELECT 1`, simple protocol.
    Simple,
    /// `SELECT 1`, extended protocol with a prepared statement.
    Extended,
    /// pgbench's select by key: `SELECT abalance FROM pgbench_accounts WHERE aid = $1`.
    SelectKey,
    /// A small INSERT, committed.
    Insert,
}

impl Workload {
    pub fn name(self) -> &'static str {
        match self {
            Workload::Simple => "simple",
            Workload::Extended => "extended",
            Workload::SelectKey => "select-key",
            Workload::Insert => "insert",
        }
    }
}

pub struct Settings {
    pub endpoints: Vec<Endpoint>,
    pub workloads: Vec<Workload>,
    pub concurrency: Vec<usize>,
    pub slice: Duration,
    pub rounds: usize,
}

/// One endpoint's numbers in one cell (workload × concurrency).
#[derive(Debug, Clone, Serialize)]
pub struct Cell {
    pub workload: Workload,
    pub concurrency: usize,
    pub endpoint: String,
    pub ops: u64,
    pub seconds: f64,
    pub throughput: f64,
    /// Microseconds at p50, p90, p99, p99.9 and the maximum.
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    /// Latency (µs) at fixed percentiles, for the curves.
    pub curve: Vec<(f64, f64)>,
    pub errors: Vec<String>,
}

/// Percentiles of the curve plots.
pub const CURVE: [f64; 9] = [50.0, 75.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.95, 99.99];

struct Acc {
    hist: Histogram<u64>,
    ops: u64,
    elapsed: Duration,
    errors: Vec<String>,
}

fn histogram() -> Histogram<u64> {
    // Nanoseconds, 1 µs to 60 s, 3 significant digits.
    Histogram::new_with_bounds(1_000, 60_000_000_000, 3).expect("valid histogram bounds")
}

pub async fn run(s: &Settings) -> Vec<Cell> {
    prepare(&s.endpoints).await;
    let max_aid = max_aid(&s.endpoints[0]).await;
    let slices = s.workloads.len() * s.concurrency.len() * s.rounds * s.endpoints.len();
    let bar = ProgressBar::new(slices as u64);
    bar.set_style(
        ProgressStyle::with_template("{spinner} latency [{bar:30}] {pos}/{len} {msg} ({eta} left)")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let mut cells = Vec::new();
    for &workload in &s.workloads {
        for &c in &s.concurrency {
            let mut acc: BTreeMap<usize, Acc> = BTreeMap::new();
            for round in 0..s.rounds {
                // Interleave: each round starts with a different endpoint.
                for k in 0..s.endpoints.len() {
                    let i = (k + round) % s.endpoints.len();
                    let ep = &s.endpoints[i];
                    bar.set_message(format!("{} c={c} {}", workload.name(), ep.name));
                    let a = acc.entry(i).or_insert_with(|| Acc {
                        hist: histogram(),
                        ops: 0,
                        elapsed: Duration::ZERO,
                        errors: Vec::new(),
                    });
                    match slice(ep, workload, c, s.slice, max_aid).await {
                        Ok((h, ops, elapsed)) => {
                            a.hist.add(&h).expect("same bounds");
                            a.ops += ops;
                            a.elapsed += elapsed;
                        }
                        Err(e) => a.errors.push(e),
                    }
                    bar.inc(1);
                }
            }
            for (i, a) in acc {
                cells.push(cell(workload, c, &s.endpoints[i].name, a));
            }
        }
    }
    bar.finish_and_clear();
    cells
}

fn cell(workload: Workload, concurrency: usize, endpoint: &str, a: Acc) -> Cell {
    let us = |q: f64| a.hist.value_at_quantile(q / 100.0) as f64 / 1000.0;
    let seconds = a.elapsed.as_secs_f64();
    Cell {
        workload,
        concurrency,
        endpoint: endpoint.to_owned(),
        ops: a.ops,
        seconds,
        throughput: if seconds > 0.0 {
            a.ops as f64 / seconds
        } else {
            0.0
        },
        p50: us(50.0),
        p90: us(90.0),
        p99: us(99.0),
        p999: us(99.9),
        max: a.hist.max() as f64 / 1000.0,
        curve: CURVE.iter().map(|q| (*q, us(*q))).collect(),
        errors: a.errors,
    }
}

/// Creates the INSERT workload's table through the first endpoint that answers.
async fn prepare(endpoints: &[Endpoint]) {
    for ep in endpoints {
        if let Ok(c) = ep.connect(Duration::from_secs(10)).await {
            let _ = c
                .batch_execute("CREATE TABLE IF NOT EXISTS bench_insert (id bigserial PRIMARY KEY, v int NOT NULL)")
                .await;
            return;
        }
    }
}

/// The highest pgbench account id (pgbench -i), or 0 when there are no accounts.
async fn max_aid(ep: &Endpoint) -> i32 {
    let Ok(c) = ep.connect(Duration::from_secs(10)).await else {
        return 0;
    };
    match c
        .query_one("SELECT coalesce(max(aid), 0) FROM pgbench_accounts", &[])
        .await
    {
        Ok(row) => row.get(0),
        Err(_) => 0,
    }
}

/// A small xorshift generator: benchmark keys need spread, not cryptographic quality.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// One slice: `c` connections run `workload` in a closed loop for `length`.
async fn slice(
    ep: &Endpoint,
    workload: Workload,
    c: usize,
    length: Duration,
    max_aid: i32,
) -> Result<(Histogram<u64>, u64, Duration), String> {
    if workload == Workload::SelectKey && max_aid == 0 {
        return Err("select-key needs pgbench_accounts (run pgbench -i)".into());
    }
    let mut clients = Vec::with_capacity(c);
    for _ in 0..c {
        let client = ep.connect(Duration::from_secs(20)).await?;
        let stmt = statement(&client, workload).await?;
        clients.push((client, stmt));
    }
    let start = Arc::new(tokio::sync::Barrier::new(c));
    let mut workers = Vec::with_capacity(c);
    for (n, (client, stmt)) in clients.into_iter().enumerate() {
        let start = start.clone();
        workers.push(tokio::spawn(async move {
            start.wait().await;
            let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (n as u64 + 1));
            let mut hist = histogram();
            let mut ops = 0u64;
            let began = Instant::now();
            let deadline = began + length;
            loop {
                let t = Instant::now();
                if t >= deadline {
                    break;
                }
                operation(&client, stmt.as_ref(), workload, &mut rng, max_aid).await?;
                hist.saturating_record(t.elapsed().as_nanos() as u64);
                ops += 1;
            }
            Ok::<_, String>((hist, ops, began.elapsed()))
        }));
    }
    let mut hist = histogram();
    let (mut ops, mut elapsed) = (0, Duration::ZERO);
    for w in workers {
        let (h, n, e) = w.await.map_err(|e| e.to_string())??;
        hist.add(&h).expect("same bounds");
        ops += n;
        elapsed = elapsed.max(e);
    }
    Ok((hist, ops, elapsed))
}

async fn statement(client: &Client, workload: Workload) -> Result<Option<Statement>, String> {
    let sql = match workload {
        Workload::Simple => return Ok(None),
        Workload::Extended => "SELECT 1",
        Workload::SelectKey => "SELECT abalance FROM pgbench_accounts WHERE aid = $1",
        Workload::Insert => "INSERT INTO bench_insert (v) VALUES ($1)",
    };
    client
        .prepare(sql)
        .await
        .map(Some)
        .map_err(|e| describe(&e))
}

async fn operation(
    client: &Client,
    stmt: Option<&Statement>,
    workload: Workload,
    rng: &mut Rng,
    max_aid: i32,
) -> Result<(), String> {
    let r = match (workload, stmt) {
        (Workload::Simple, _) => client.simple_query("SELECT 1").await.map(drop),
        (Workload::Extended, Some(s)) => client.query_one(s, &[]).await.map(drop),
        (Workload::SelectKey, Some(s)) => {
            let aid = (rng.next() % max_aid as u64) as i32 + 1;
            client.query_one(s, &[&aid]).await.map(drop)
        }
        (Workload::Insert, Some(s)) => {
            let v = (rng.next() & 0x7fff_ffff) as i32;
            client.execute(s, &[&v]).await.map(drop)
        }
        _ => unreachable!("prepared workloads have a statement"),
    };
    r.map_err(|e| describe(&e))
}
