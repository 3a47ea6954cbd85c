//! Idle mode: the proxy's resident memory per idle session. Opens N real sessions through an
//! endpoint, keeps them idle, and reads the proxy process's VmRSS before and after.

use std::time::Duration;

use serde::Serialize;

use crate::endpoint::Endpoint;

#[derive(Debug, Serialize)]
pub struct IdleResult {
    pub endpoint: String,
    pub sessions: usize,
    pub rss_before_kib: u64,
    pub rss_after_kib: u64,
    pub per_session_kib: f64,
}

fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no VmRSS for pid {pid}"))
}

pub async fn run(ep: &Endpoint, pid: u32, sessions: usize) -> anyhow::Result<IdleResult> {
    // Warm the proxy up with one session, so one-time allocations are in the baseline.
    drop(
        ep.connect(Duration::from_secs(20))
            .await
            .map_err(anyhow::Error::msg)?,
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_kib(pid)?;
    let mut held = Vec::with_capacity(sessions);
    for chunk in 0..sessions.div_ceil(50) {
        let n = 50.min(sessions - chunk * 50);
        let batch = (0..n).map(|_| {
            let ep = ep.clone();
            async move { ep.connect(Duration::from_secs(60)).await }
        });
        for c in futures_join(batch).await {
            let c = c.map_err(anyhow::Error::msg)?;
            c.simple_query("SELECT 1").await?;
            held.push(c);
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss_kib(pid)?;
    drop(held);
    Ok(IdleResult {
        endpoint: ep.name.clone(),
        sessions,
        rss_before_kib: before,
        rss_after_kib: after,
        per_session_kib: after.saturating_sub(before) as f64 / sessions as f64,
    })
}

/// Runs futures concurrently on the runtime and collects their results in order.
async fn futures_join<F, T>(futs: impl Iterator<Item = F>) -> Vec<T>
where
    F: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let handles: Vec<_> = futs.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.expect("a connect task panicked"));
    }
    out
}
