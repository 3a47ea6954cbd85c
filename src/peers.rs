//! The other patroxy instances, as their routing reports in etcd describe them: which one
//! issued a pooled cancel key, and where it takes cancel requests. The reports are followed
//! with one etcd watch and held in memory, so a cancel request costs etcd nothing.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use etcd_client::{EventType, WatchOptions};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::backoff::Backoff;
use crate::config::Config;
use crate::discovery::patroni::Endpoint;
use crate::etcd::{read_prefix_at_most, relative, within, Etcd, EtcdError};
use crate::view::Report;

/// Reports kept; past it, new ones are not (a prefix anyone filled cannot grow patroxy).
pub const MAX_REPORTS: usize = 4096;
/// A report longer than this is not read (patroxy's own are well under 4 KiB).
const MAX_REPORT_BYTES: usize = 64 * 1024;
/// A watch that said nothing this long is opened again (reading the reports once more).
const QUIET_WATCH: Duration = Duration::from_secs(300);

/// Where each peer takes cancel requests, by its report's key (`<cluster>/<instance>`).
#[derive(Clone, Default)]
pub struct Peers {
    routes: Arc<RwLock<HashMap<String, Route>>>,
}

#[derive(Debug, Clone, PartialEq)]
struct Route {
    cluster: String,
    tag: u16,
    address: Endpoint,
}

impl Peers {
    /// Where the instance tagged `tag` takes cancel requests for `cluster`, if one of the
    /// cluster's reports names it.
    pub fn cancel_address(&self, cluster: &str, tag: u16) -> Option<Endpoint> {
        let routes = self.routes.read().unwrap_or_else(|p| p.into_inner());
        routes
            .values()
            .find(|r| r.tag == tag && r.cluster == cluster)
            .map(|r| r.address.clone())
    }

    /// The routes known, by report key, for the operator.
    pub fn views(&self) -> Vec<crate::view::PeerView> {
        let routes = self.routes.read().unwrap_or_else(|p| p.into_inner());
        let mut views: Vec<_> = routes
            .iter()
            .map(|(key, r)| crate::view::PeerView {
                report: key.clone(),
                tag: r.tag,
                address: r.address.to_string(),
            })
            .collect();
        views.sort_by(|a, b| a.report.cmp(&b.report));
        views
    }

    pub fn len(&self) -> usize {
        self.routes.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether `ip` is the address some peer takes cancels at.
    pub fn is_host(&self, ip: std::net::IpAddr) -> bool {
        let routes = self.routes.read().unwrap_or_else(|p| p.into_inner());
        routes
            .values()
            .any(|r| r.address.host.trim_matches(['[', ']']).parse() == Ok(ip))
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Route>> {
        self.routes.write().unwrap_or_else(|p| p.into_inner())
    }

    /// A report written (`Some`) or gone.
    fn apply(&self, key: String, value: Option<&[u8]>) {
        let mut routes = self.write();
        debug!(key, written = value.is_some(), "a peer's report");
        match value.and_then(|v| route_of(&key, v)) {
            Some(r) if routes.len() < MAX_REPORTS || routes.contains_key(&key) => {
                routes.insert(key, r);
            }
            Some(_) => debug!(key, "too many patroxy reports; this one is not kept"),
            None => {
                routes.remove(&key);
            }
        }
    }

    /// Follows the reports under `report.prefix` until `stop`: read once, then watched; read
    /// again after any failure (with backoff) and when the prefix changes.
    pub async fn follow(
        self,
        etcd: Etcd,
        mut config: watch::Receiver<Arc<Config>>,
        stop: CancellationToken,
    ) {
        let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(10));
        let mut failing = false;
        loop {
            let prefix = format!("{}/", config.borrow().report.prefix.trim_end_matches('/'));
            tokio::select! {
                r = self.round(&etcd, &prefix) => match r {
                    Ok(()) => backoff.reset(),
                    Err(e) => {
                        // One line when it starts failing, not one per attempt.
                        if !failing {
                            warn!(error = %e, "could not follow the peers' reports; cancels of other instances' keys use what was read before");
                        }
                        failing = true;
                        tokio::select! {
                            _ = tokio::time::sleep(backoff.next_pause()) => {}
                            _ = stop.cancelled() => return,
                        }
                        continue;
                    }
                },
                _ = config.changed() => {}
                _ = stop.cancelled() => return,
            }
            failing = false;
        }
    }

    /// One read and watch; `Ok` when the watch went quiet for `QUIET_WATCH`.
    async fn round(&self, etcd: &Etcd, prefix: &str) -> Result<(), EtcdError> {
        let limit = etcd.config.request_timeout;
        let mut client = etcd.connect().await?;
        // No more reports than are kept: a prefix someone filled costs etcd one bounded read.
        let most = MAX_REPORTS as i64;
        let (keys, revision) = read_prefix_at_most(&mut client, prefix, limit, most).await?;
        debug!(
            prefix,
            reports = keys.len(),
            revision,
            "following the peers' reports"
        );
        {
            let mut routes = self.write();
            routes.clear();
            for (key, value) in keys.into_iter().take(MAX_REPORTS) {
                if let Some(r) = route_of(&key, &value) {
                    routes.insert(key, r);
                }
            }
        }
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(revision + 1);
        let mut stream = within(limit, client.watch(prefix, Some(opts))).await?;
        loop {
            let Ok(message) = tokio::time::timeout(QUIET_WATCH, stream.message()).await else {
                return Ok(());
            };
            let resp = message?.ok_or(EtcdError::StreamEnded)?;
            if resp.canceled() {
                return Err(EtcdError::Canceled {
                    compact_revision: resp.compact_revision(),
                    reason: resp.cancel_reason().to_owned(),
                });
            }
            for ev in resp.events() {
                let Some(kv) = ev.kv() else { continue };
                let Some(key) = relative(prefix, kv.key()) else {
                    continue;
                };
                match ev.event_type() {
                    EventType::Put => self.apply(key, Some(kv.value())),
                    EventType::Delete => self.apply(key, None),
                }
            }
        }
    }
}

/// A report's cancel route, if it has a usable one: `key` is `<cluster>/<instance>`.
fn route_of(key: &str, value: &[u8]) -> Option<Route> {
    if value.len() > MAX_REPORT_BYTES {
        return None;
    }
    let (cluster, _instance) = key.rsplit_once('/')?;
    let report: Report = serde_json::from_slice(value).ok()?;
    let cancel = report.cancel?;
    Some(Route {
        cluster: cluster.to_owned(),
        tag: cancel.tag,
        address: Endpoint::parse(&cancel.address)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(tag: u16, address: &str) -> Vec<u8> {
        let r = serde_json::json!({
            "instance": "x", "version": "0", "cluster": "c", "epoch": 1, "leader": null,
            "primary": null, "sessions": 0, "sessions_by_server": {}, "routes": {},
            "updated": 0, "cancel": {"tag": tag, "address": address}
        });
        serde_json::to_vec(&r).unwrap()
    }

    #[test]
    fn reports_give_cancel_routes_by_cluster_and_tag() {
        let peers = Peers::default();
        peers.apply("demo/one".into(), Some(&report(300, "127.0.0.1:6001")));
        peers.apply("other/two".into(), Some(&report(301, "127.0.0.1:6002")));
        peers.apply("demo/bad".into(), Some(b"{not json"));
        let port = |c: &str, t: u16| peers.cancel_address(c, t).map(|e| e.port);
        assert_eq!(port("demo", 300), Some(6001));
        assert_eq!(port("demo", 301), None, "another cluster's instance");
        assert_eq!(port("other", 301), Some(6002));
        peers.apply("demo/one".into(), None);
        assert_eq!(port("demo", 300), None, "gone with its report");
        assert_eq!(peers.len(), 1);
    }

    #[test]
    fn the_reports_kept_are_bounded() {
        let peers = Peers::default();
        for i in 0..MAX_REPORTS + 10 {
            peers.apply(format!("demo/{i}"), Some(&report(300, "127.0.0.1:6001")));
        }
        assert_eq!(peers.len(), MAX_REPORTS);
        let huge = vec![b' '; MAX_REPORT_BYTES + 1];
        assert!(route_of("demo/x", &huge).is_none());
    }
}
