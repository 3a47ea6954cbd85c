//! The routing report: per cluster, a key `<prefix>/<cluster>/<instance>` on an etcd lease,
//! saying which leader this instance routes writes to, its topology epoch and its sessions.
//! It is rewritten when any of that changes, revoked when patroxy stops, and expires with
//! the lease when patroxy dies. A reload that changes `[report]` moves it: the old key is
//! revoked and the new one written.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use etcd_client::PutOptions;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::backoff::Backoff;
use crate::config::ReportConfig;
use crate::etcd::{within, Etcd, EtcdError};
use crate::state::Running;
use crate::view::Report;

const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// One cluster's reporter.
pub struct Reporter {
    pub etcd: Etcd,
    pub cluster: String,
    pub running: Running,
}

/// How one lease ended.
enum Ended {
    Stopped,
    /// `[report]` changed: start again under the new settings.
    Moved,
}

impl Reporter {
    /// Keeps the report as `[report]` says until `stop`, then revokes it. etcd errors are
    /// retried with backoff.
    pub async fn run(mut self, stop: CancellationToken) {
        let mut backoff = Backoff::new(BACKOFF_MIN, BACKOFF_MAX);
        let mut config = self.running.config.clone();
        loop {
            let settings = config.borrow_and_update().report.clone();
            if !settings.enabled {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    changed = config.changed() => if changed.is_err() { return },
                }
                continue;
            }
            let key = format!(
                "{}{}",
                settings.cluster_prefix(&self.cluster),
                self.running.instance()
            );
            let mut kept = false;
            match self.keep(&key, &settings, &stop, &mut kept).await {
                Ok(Ended::Stopped) => return,
                Ok(Ended::Moved) => {
                    info!(key = %key, "[report] changed: moving the routing report");
                    backoff.reset();
                    continue;
                }
                Err(e) => {
                    if kept {
                        backoff.reset();
                    }
                    let pause = backoff.next_pause();
                    warn!(key = %key, error = %e, retry_in = ?pause, "routing report lost; will rewrite it");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(pause) => {}
                    }
                }
            }
        }
    }

    /// The report to write; none while the cluster's watch is down or catching up: what
    /// this instance knows may be stale then (after a heal, it is written once the watch
    /// has caught up, never first with the old primary).
    fn report(&self) -> Option<Report> {
        let contact = self.running.contacts.get(&self.cluster)?;
        if !contact.watching() {
            return None;
        }
        let mut report = Report::of(&self.running.view(), &self.cluster)?;
        report.cancel = self.running.cancel_route(&self.cluster);
        Some(report)
    }

    /// One lease: grant it, write the report, keep both fresh until `stop`, a change of
    /// `[report]`, or an error.
    async fn keep(
        &mut self,
        key: &str,
        settings: &ReportConfig,
        stop: &CancellationToken,
        kept: &mut bool,
    ) -> Result<Ended, EtcdError> {
        let limit = self.etcd.config.request_timeout;
        let mut client = self.etcd.connect().await?;
        let ttl = settings.ttl.as_secs().max(2) as i64;
        let lease = within(limit, client.lease_grant(ttl, None)).await?.id();
        let (mut keeper, mut acks) = within(limit, client.lease_keep_alive(lease)).await?;
        let mut renew = tokio::time::interval(settings.ttl / 3);
        let mut written: Option<Report> = None;
        let mut running = self.running.clone();
        let mut topology = running.topologies.get(&self.cluster).cloned();
        let (mut topology_open, mut serving_open) = (topology.is_some(), true);
        loop {
            let now = self.report();
            if now.is_some() && written != now {
                let mut value = now.clone().expect("checked");
                value.updated = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                let json = serde_json::to_string(&value).expect("a report serializes");
                let put = client.put(key, json, Some(PutOptions::new().with_lease(lease)));
                within(limit, put).await?;
                if written.is_none() {
                    info!(key = %key, ttl = ?settings.ttl, "routing report written to etcd");
                }
                written = now;
                *kept = true;
            }
            let revoke = tokio::select! {
                _ = stop.cancelled() => Some(Ended::Stopped),
                changed = running.config.changed() => match changed {
                    Ok(()) if running.config.borrow_and_update().report != *settings => Some(Ended::Moved),
                    Ok(()) => None,
                    Err(_) => Some(Ended::Stopped),
                },
                _ = renew.tick() => {
                    keeper.keep_alive().await?;
                    None
                }
                ack = acks.message() => match ack? {
                    Some(a) if a.ttl() > 0 => None,
                    _ => return Err(EtcdError::LeaseLost),
                },
                changed = async { topology.as_mut().expect("open").changed().await }, if topology_open => {
                    topology_open = changed.is_ok();
                    None
                }
                changed = running.serving.changed(), if serving_open => {
                    serving_open = changed.is_ok();
                    None
                }
                // Session counts move without an event: look again now and then.
                _ = tokio::time::sleep(Duration::from_secs(1)) => None,
            };
            if let Some(ended) = revoke {
                // Gone at once rather than at the lease's end.
                let _ = timeout(limit, client.lease_revoke(lease)).await;
                info!(key = %key, "routing report removed");
                return Ok(ended);
            }
        }
    }
}
