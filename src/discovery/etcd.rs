//! The etcd v3 watcher: range-read the cluster's prefix, watch it from the read's revision + 1,
//! and publish a new `Topology` whenever the content changes. On any watch error,
//! cancellation, compaction or silence it resyncs with backoff, so it never stops quietly.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use etcd_client::{
    Certificate, Client, ConnectOptions, EventType, GetOptions, Identity, TlsOptions, WatchOptions,
};
use tokio::sync::watch;
use tokio::time::{timeout, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::Topology;
use crate::config::{ClusterConfig, EtcdConfig};

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("etcd did not answer within {0:?}")]
    Timeout(Duration),
    #[error("reading {path}: {source}")]
    Tls {
        path: String,
        source: std::io::Error,
    },
    #[error("the watch was canceled by etcd (compact revision {compact_revision}): {reason}")]
    Canceled {
        compact_revision: i64,
        reason: String,
    },
    #[error("the watch stream ended")]
    StreamEnded,
    #[error("no message on the watch for {0:?}")]
    Silent(Duration),
    #[error("the lease expired")]
    LeaseLost,
}

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Watches one Patroni cluster's keys in etcd and publishes its topology.
pub struct EtcdWatcher {
    etcd: EtcdConfig,
    /// The cluster's name, for metrics.
    name: String,
    prefix: String,
    epoch: u64,
    current: Option<Arc<Topology>>,
    watching: Arc<AtomicBool>,
}

impl EtcdWatcher {
    pub fn new(etcd: EtcdConfig, cluster: &ClusterConfig) -> EtcdWatcher {
        EtcdWatcher {
            etcd,
            name: cluster.name(),
            prefix: cluster.prefix(),
            epoch: 0,
            current: None,
            watching: Arc::default(),
        }
    }

    /// True while the watch is established: for readiness.
    pub fn watching(&self) -> Arc<AtomicBool> {
        self.watching.clone()
    }

    /// Runs until `shutdown`, publishing snapshots into `tx`. Never returns early on errors.
    pub async fn run(mut self, tx: watch::Sender<Arc<Topology>>, shutdown: CancellationToken) {
        let mut backoff = BACKOFF_MIN;
        info!(prefix = %self.prefix, endpoints = ?self.etcd.endpoints, "watching Patroni keys in etcd");
        loop {
            let mut synced = false;
            let result = tokio::select! {
                r = self.sync_and_watch(&tx, &mut synced) => r,
                _ = shutdown.cancelled() => return,
            };
            self.watching.store(false, Ordering::Relaxed);
            if synced {
                backoff = BACKOFF_MIN;
            }
            if let Err(e) = result {
                crate::metrics::etcd_watch_error(&self.name);
                warn!(error = %e, retry_in = ?backoff, "etcd watch lost; will resync");
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = shutdown.cancelled() => return,
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// One round: connect, read everything, then follow the watch until it fails.
    async fn sync_and_watch(
        &mut self,
        tx: &watch::Sender<Arc<Topology>>,
        synced: &mut bool,
    ) -> Result<(), DiscoveryError> {
        let mut client = connect(&self.etcd).await?;
        let request_timeout = self.etcd.request_timeout;
        let (mut keys, revision) = read_prefix(&mut client, &self.prefix, request_timeout).await?;
        self.publish(tx, &keys, revision);
        crate::metrics::etcd_event(&self.name);
        *synced = true;

        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(revision + 1);
        let watch = client.watch(self.prefix.as_str(), Some(opts));
        let mut stream = within(request_timeout, watch).await?;
        self.watching.store(true, Ordering::Relaxed);

        let idle = self.etcd.watch_idle_timeout;
        // Ask for progress a few times per idle period: a healthy etcd always answers.
        let mut progress = tokio::time::interval(idle / 3);
        progress.tick().await;
        let mut last_message = Instant::now();
        loop {
            tokio::select! {
                msg = stream.message() => {
                    let Some(resp) = msg? else {
                        return Err(DiscoveryError::StreamEnded);
                    };
                    last_message = Instant::now();
                    crate::metrics::etcd_event(&self.name);
                    if resp.canceled() {
                        return Err(DiscoveryError::Canceled {
                            compact_revision: resp.compact_revision(),
                            reason: resp.cancel_reason().to_owned(),
                        });
                    }
                    if resp.events().is_empty() {
                        continue; // created, or a progress notification
                    }
                    let mut rev = revision;
                    for ev in resp.events() {
                        let Some(kv) = ev.kv() else { continue };
                        let Some(key) = self.relative(kv.key()) else { continue };
                        rev = rev.max(kv.mod_revision());
                        match ev.event_type() {
                            EventType::Put => {
                                keys.insert(key, Bytes::copy_from_slice(kv.value()));
                            }
                            EventType::Delete => {
                                keys.remove(&key);
                            }
                        }
                    }
                    let rev = resp.header().map_or(rev, |h| h.revision());
                    self.publish(tx, &keys, rev);
                }
                _ = progress.tick() => {
                    if last_message.elapsed() > idle {
                        return Err(DiscoveryError::Silent(idle));
                    }
                    stream.request_progress().await?;
                }
            }
        }
    }

    fn relative(&self, key: &[u8]) -> Option<String> {
        relative(&self.prefix, key)
    }

    /// Publishes a new snapshot when the content changed, logging leader changes in one line.
    fn publish(
        &mut self,
        tx: &watch::Sender<Arc<Topology>>,
        keys: &BTreeMap<String, Bytes>,
        revision: i64,
    ) {
        let (mut next, problems) = Topology::from_keys(keys);
        for p in problems {
            warn!(problem = %p, "ignoring a Patroni value");
        }
        next.revision = revision;
        if let Some(cur) = &self.current {
            if cur.same_content(&next) {
                return;
            }
        }
        self.epoch += 1;
        next.epoch = self.epoch;
        let old_leader = self.current.as_ref().and_then(|c| c.leader.clone());
        let leader_changed = self.current.is_some() && old_leader != next.leader;
        crate::metrics::topology(&self.name, next.epoch, leader_changed);

        let routable = crate::router::primary(&next);
        if self.current.is_none() || old_leader != next.leader {
            info!(
                epoch = next.epoch,
                revision,
                from = old_leader.as_deref().unwrap_or("(none)"),
                to = next.leader.as_deref().unwrap_or("(none)"),
                primary = %routable.as_ref().map(|t| t.endpoint.to_string()).unwrap_or_else(|e| e.to_string()),
                members = next.members.len(),
                "leader {} -> {}",
                old_leader.as_deref().unwrap_or("(none)"),
                next.leader.as_deref().unwrap_or("(none)"),
            );
        } else {
            debug!(epoch = next.epoch, revision, "topology changed");
        }
        let next = Arc::new(next);
        self.current = Some(next.clone());
        tx.send_replace(next);
    }
}

fn relative(prefix: &str, key: &[u8]) -> Option<String> {
    let key = std::str::from_utf8(key).ok()?;
    key.strip_prefix(prefix).map(str::to_owned)
}

/// Connects to etcd as the configuration says: endpoints, TLS, user and password.
pub async fn connect(e: &EtcdConfig) -> Result<Client, DiscoveryError> {
    let mut opts = ConnectOptions::new()
        .with_connect_timeout(e.dial_timeout)
        .with_keep_alive(Duration::from_secs(5), e.dial_timeout)
        .with_keep_alive_while_idle(true);
    if let (Some(u), Some(p)) = (&e.username, &e.password) {
        opts = opts.with_user(u.clone(), p.expose().to_owned());
    }
    if e.ca_file.is_some() || e.cert_file.is_some() {
        let mut tls = TlsOptions::new();
        if let Some(ca) = &e.ca_file {
            tls = tls.ca_certificate(Certificate::from_pem(read(ca)?));
        }
        if let (Some(c), Some(k)) = (&e.cert_file, &e.key_file) {
            tls = tls.identity(Identity::from_pem(read(c)?, read(k)?));
        }
        opts = opts.with_tls(tls);
    }
    within(e.request_timeout, Client::connect(&e.endpoints, Some(opts))).await
}

/// One etcd request, bounded by `limit`.
pub async fn within<T>(
    limit: Duration,
    request: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, DiscoveryError> {
    Ok(timeout(limit, request)
        .await
        .map_err(|_| DiscoveryError::Timeout(limit))??)
}

/// Every key under `prefix` (made relative to it) and the revision of the read.
pub async fn read_prefix(
    client: &mut Client,
    prefix: &str,
    limit: Duration,
) -> Result<(BTreeMap<String, Bytes>, i64), DiscoveryError> {
    let get = client.get(prefix, Some(GetOptions::new().with_prefix()));
    let resp = within(limit, get).await?;
    let revision = resp.header().map_or(0, |h| h.revision());
    let keys = resp
        .kvs()
        .iter()
        .filter_map(|kv| {
            relative(prefix, kv.key()).map(|k| (k, Bytes::copy_from_slice(kv.value())))
        })
        .collect();
    Ok((keys, revision))
}

fn read(path: &std::path::Path) -> Result<Vec<u8>, DiscoveryError> {
    std::fs::read(path).map_err(|source| DiscoveryError::Tls {
        path: path.display().to_string(),
        source,
    })
}
