//! Tables on stdout and the JSON files, with latency and throughput as ratios against the
//! direct connection taken in the same run.

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use crate::failover::Outcome;
use crate::latency::Cell;

/// The endpoint that the others are compared with.
pub const BASELINE: &str = "direct";

/// A cell with its comparison against the baseline's cell.
#[derive(Debug, Clone, Serialize)]
pub struct Compared<'a> {
    #[serde(flatten)]
    pub cell: &'a Cell,
    /// Added p50 latency per round trip against the baseline, in µs.
    pub added_p50: Option<f64>,
    /// p50 against the baseline's p50.
    pub p50_ratio: Option<f64>,
    /// Throughput against the baseline's throughput.
    pub throughput_ratio: Option<f64>,
}

pub fn compare(cells: &[Cell]) -> Vec<Compared<'_>> {
    cells
        .iter()
        .map(|c| {
            let base = cells.iter().find(|b| {
                b.endpoint == BASELINE && b.workload == c.workload && b.concurrency == c.concurrency
            });
            let usable = |b: &&Cell| b.ops > 0 && c.ops > 0;
            let base = base.filter(usable);
            Compared {
                cell: c,
                added_p50: base.map(|b| c.p50 - b.p50),
                p50_ratio: base.map(|b| c.p50 / b.p50),
                throughput_ratio: base.map(|b| c.throughput / b.throughput),
            }
        })
        .collect()
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.digits$}"))
}

pub fn latency_table(rows: &[Compared<'_>]) -> String {
    let mut out = String::new();
    // The endpoint column fits the longest name.
    let w = rows
        .iter()
        .map(|r| r.cell.endpoint.len())
        .fold(10, usize::max);
    let _ = writeln!(
        out,
        "{:<11} {:>4} {:<w$} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10} {:>9} {:>8} {:>8}",
        "workload",
        "c",
        "endpoint",
        "p50 µs",
        "p90 µs",
        "p99 µs",
        "p99.9 µs",
        "max µs",
        "ops/s",
        "+p50 µs",
        "p50 ×",
        "tput ×"
    );
    for r in rows {
        let c = r.cell;
        let _ = writeln!(
            out,
            "{:<11} {:>4} {:<w$} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.0} {:>10.0} {:>9} {:>8} {:>8}{}",
            c.workload.name(),
            c.concurrency,
            c.endpoint,
            c.p50,
            c.p90,
            c.p99,
            c.p999,
            c.max,
            c.throughput,
            opt(r.added_p50, 1),
            opt(r.p50_ratio, 2),
            opt(r.throughput_ratio, 2),
            if c.errors.is_empty() { String::new() } else { format!("  errors: {}", c.errors.join("; ")) },
        );
    }
    out
}

pub fn failover_table(o: &Outcome) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<11} {:<10} {:<8} {:>14} {:>8} {:>22} {:>24}",
        "event",
        "endpoint",
        "leader",
        "longest gap s",
        "failed",
        "leader key → write ms",
        "leader key → writable ms"
    );
    for e in &o.events {
        let _ = writeln!(
            out,
            "{:<11} {:<10} {:<8} {:>14.3} {:>8} {:>22} {:>24}",
            e.event.name(),
            e.endpoint,
            e.new_leader.as_deref().unwrap_or("-"),
            e.longest_gap,
            e.failed_attempts,
            opt(e.leader_to_first_write.map(|s| s * 1000.0), 0),
            opt(e.leader_to_writable.map(|s| s * 1000.0), 0),
        );
    }
    let _ = writeln!(out);
    for (ep, acked) in &o.acknowledged {
        let _ = writeln!(
            out,
            "{ep}: {acked} writes acknowledged, {} lost",
            o.lost[ep]
        );
    }
    out
}

pub fn write_json<T: Serialize>(path: &Path, value: &T) -> anyhow::Result<()> {
    std::fs::write(path, serde_json::to_vec_pretty(value)?)?;
    Ok(())
}
