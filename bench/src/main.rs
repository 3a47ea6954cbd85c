//! `patroxy-bench`: measures what a proxy costs and how it rides out a failover, against a
//! direct connection and other proxies in the same run. `scripts/bench.sh` sets up the local
//! cluster, HAProxy and PgBouncer, and runs it.

#![forbid(unsafe_code)]

mod endpoint;
mod failover;
mod idle;
mod latency;
mod plot;
mod report;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use endpoint::Endpoint;

#[derive(Parser)]
#[command(
    name = "patroxy-bench",
    about = "Latency and failover benchmarks for PostgreSQL proxies"
)]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Closed-loop latency and throughput through every endpoint, interleaved.
    Latency {
        /// NAME=CONNINFO, repeated; the one named `direct` is the baseline for ratios.
        #[arg(long = "endpoint", required = true)]
        endpoints: Vec<Endpoint>,
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "simple,extended,select-key,insert"
        )]
        workloads: Vec<latency::Workload>,
        #[arg(long, value_delimiter = ',', default_value = "1,8,64")]
        concurrency: Vec<usize>,
        /// Length of one slice (one endpoint, one cell).
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        slice: Duration,
        /// Slices per endpoint and cell, interleaved with the other endpoints'.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Directory for latency.json and the SVG plots.
        #[arg(long, default_value = "bench-results")]
        out: PathBuf,
        /// PEM CA for endpoints whose conninfo says sslmode=require.
        #[arg(long)]
        ca: Option<PathBuf>,
    },
    /// Resident memory per idle session of a proxy process.
    Idle {
        /// NAME=CONNINFO of the proxy.
        #[arg(long)]
        endpoint: Endpoint,
        /// The proxy's process id.
        #[arg(long)]
        pid: u32,
        #[arg(long, default_value_t = 1000)]
        sessions: usize,
        #[arg(long, default_value = "bench-results")]
        out: PathBuf,
    },
    /// Writers through every endpoint during a switchover, a crash and a freeze of the leader.
    /// Draws the failover timeline again from a run's failover.json.
    Replot {
        #[arg(long)]
        json: PathBuf,
        #[arg(long, default_value = "bench-results")]
        out: PathBuf,
    },
    Failover {
        /// NAME=CONNINFO, repeated.
        #[arg(long = "endpoint", required = true)]
        endpoints: Vec<Endpoint>,
        #[arg(long, default_value = "http://127.0.0.1:2379")]
        etcd: String,
        #[arg(long, default_value = "/service/demo/leader")]
        leader_key: String,
        /// The cluster control script (switchover, crash, freeze, thaw, restart, wait-healthy).
        #[arg(long, default_value = "scripts/cluster.sh")]
        cluster_ctl: PathBuf,
        #[arg(long, value_delimiter = ',', default_value = "switchover,crash,freeze")]
        events: Vec<failover::Event>,
        /// Writers per endpoint, each committing a row every `interval`.
        #[arg(long, default_value_t = 1)]
        clients: usize,
        #[arg(long, default_value = "10ms", value_parser = humantime::parse_duration)]
        interval: Duration,
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        settle: Duration,
        #[arg(long, default_value = "bench-results")]
        out: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    match runtime.block_on(run(cli.mode)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("patroxy-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(mode: Mode) -> anyhow::Result<()> {
    match mode {
        Mode::Latency {
            endpoints,
            workloads,
            concurrency,
            slice,
            rounds,
            out,
            ca,
        } => {
            std::fs::create_dir_all(&out)?;
            let endpoints = endpoint::with_ca(endpoints, ca.as_deref())?;
            let settings = latency::Settings {
                endpoints,
                workloads,
                concurrency,
                slice,
                rounds,
            };
            let cells = latency::run(&settings).await;
            let compared = report::compare(&cells);
            print!("{}", report::latency_table(&compared));
            report::write_json(&out.join("latency.json"), &compared)?;
            let plots = plot::latency_curves(&out, &cells)?;
            println!(
                "wrote latency.json and {} plots in {}",
                plots.len(),
                out.display()
            );
        }
        Mode::Idle {
            endpoint,
            pid,
            sessions,
            out,
        } => {
            std::fs::create_dir_all(&out)?;
            let r = idle::run(&endpoint, pid, sessions).await?;
            println!(
                "{}: {} idle sessions, RSS {} KiB -> {} KiB: {:.1} KiB per session",
                r.endpoint, r.sessions, r.rss_before_kib, r.rss_after_kib, r.per_session_kib
            );
            report::write_json(&out.join(format!("idle-{}.json", r.endpoint)), &r)?;
        }
        Mode::Replot { json, out } => {
            let outcome: failover::Outcome = serde_json::from_slice(&std::fs::read(&json)?)?;
            let mut names: Vec<String> = Vec::new();
            for a in &outcome.attempts {
                if !names.contains(&a.endpoint) {
                    names.push(a.endpoint.clone());
                }
            }
            let plot = plot::failover_timeline(&out, &outcome, &names)?;
            println!("wrote {plot} in {}", out.display());
        }
        Mode::Failover {
            endpoints,
            etcd,
            leader_key,
            cluster_ctl,
            events,
            clients,
            interval,
            settle,
            out,
        } => {
            std::fs::create_dir_all(&out)?;
            let names: Vec<String> = endpoints.iter().map(|e| e.name.clone()).collect();
            let settings = failover::Settings {
                endpoints,
                etcd,
                leader_key,
                cluster_ctl,
                events,
                clients,
                interval,
                settle,
            };
            let outcome = failover::run(&settings).await?;
            print!("{}", report::failover_table(&outcome));
            report::write_json(&out.join("failover.json"), &outcome)?;
            let plot = plot::failover_timeline(&out, &outcome, &names)?;
            println!("wrote failover.json and {plot} in {}", out.display());
            let lost: usize = outcome.lost.values().sum();
            anyhow::ensure!(lost == 0, "{lost} acknowledged writes were lost");
        }
    }
    Ok(())
}
