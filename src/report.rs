//! The routing report: per cluster, a key `<prefix>/<cluster>/<instance>` on an etcd lease,
//! saying which leader this instance routes writes to, its topology epoch and its sessions.
//! It is rewritten when any of that changes, revoked when patroxy stops, and expires with
//! the lease when patroxy dies.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use etcd_client::PutOptions;
use tokio::sync::watch;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::app::Serving;
use crate::config::EtcdConfig;
use crate::discovery::etcd::{connect, within};
use crate::discovery::{DiscoveryError, Topology};
use crate::session::Shared;
use crate::view::{self, Report};

const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// What one cluster's reporter needs.
pub struct Reporter {
    pub etcd: EtcdConfig,
    pub key: String,
    pub instance: String,
    pub cluster: String,
    pub ttl: Duration,
    pub topology: watch::Receiver<Arc<Topology>>,
    pub serving: Serving,
    /// Session counts per server.
    pub shared: Arc<Shared>,
}

impl Reporter {
    /// Keeps the report until `stop`, then revokes it. etcd errors are retried with backoff.
    pub async fn run(mut self, stop: CancellationToken) {
        let mut backoff = BACKOFF_MIN;
        loop {
            let mut kept = false;
            match self.keep(&stop, &mut kept).await {
                Ok(()) => return,
                Err(e) => {
                    warn!(key = %self.key, error = %e, retry_in = ?backoff, "routing report lost; will rewrite it")
                }
            }
            if kept {
                backoff = BACKOFF_MIN;
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    fn report(&self) -> Report {
        let t = self.topology.borrow().clone();
        let primary = crate::router::primary(&t).ok();
        let mut sessions_by_server = BTreeMap::new();
        for m in t.members.values() {
            if let Some(ep) = &m.endpoint {
                let n = self.shared.load.sessions(ep);
                if n > 0 {
                    sessions_by_server.insert(ep.to_string(), n);
                }
            }
        }
        let routes = self
            .serving
            .borrow()
            .iter()
            .filter(|l| l.cluster == self.cluster)
            .map(|l| (l.name.clone(), view::routes(&l.policy, &t).0))
            .collect();
        Report {
            instance: self.instance.clone(),
            version: view::VERSION.into(),
            cluster: self.cluster.clone(),
            epoch: t.epoch,
            leader: t.leader.clone(),
            primary: primary.map(|p| p.endpoint.to_string()),
            sessions: sessions_by_server.values().sum(),
            sessions_by_server,
            routes,
            updated: 0,
        }
    }

    /// One lease: grant it, write the report, keep both fresh until `stop` or an error.
    async fn keep(
        &mut self,
        stop: &CancellationToken,
        kept: &mut bool,
    ) -> Result<(), DiscoveryError> {
        let limit = self.etcd.request_timeout;
        let mut client = connect(&self.etcd).await?;
        let ttl = self.ttl.as_secs().max(2) as i64;
        let lease = within(limit, client.lease_grant(ttl, None)).await?.id();
        let (mut keeper, mut acks) = within(limit, client.lease_keep_alive(lease)).await?;
        let mut renew = tokio::time::interval(self.ttl / 3);
        let mut written: Option<Report> = None;
        let (mut topology_open, mut serving_open) = (true, true);
        loop {
            let now = self.report();
            if written.as_ref() != Some(&now) {
                let mut value = now.clone();
                value.updated = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                let json = serde_json::to_string(&value).expect("a report serializes");
                let put = client.put(
                    self.key.as_str(),
                    json,
                    Some(PutOptions::new().with_lease(lease)),
                );
                within(limit, put).await?;
                if written.is_none() {
                    info!(key = %self.key, ttl = ?self.ttl, "routing report written to etcd");
                }
                written = Some(now);
                *kept = true;
            }
            tokio::select! {
                _ = stop.cancelled() => {
                    // Gone at once rather than at the lease's end.
                    let _ = timeout(limit, client.lease_revoke(lease)).await;
                    info!(key = %self.key, "routing report removed");
                    return Ok(());
                }
                _ = renew.tick() => keeper.keep_alive().await?,
                ack = acks.message() => match ack? {
                    Some(a) if a.ttl() > 0 => {}
                    _ => return Err(DiscoveryError::LeaseLost),
                },
                changed = self.topology.changed(), if topology_open => {
                    topology_open = changed.is_ok();
                }
                changed = self.serving.changed(), if serving_open => {
                    serving_open = changed.is_ok();
                }
                // Session counts move without an event: look again now and then.
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }
}
