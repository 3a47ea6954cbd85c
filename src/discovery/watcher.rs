//! The etcd v3 watcher: range-read the cluster's prefix, watch it from the read's revision + 1,
//! and publish a new `Topology` whenever the content changes. On any watch error,
//! cancellation or silence it reconnects with backoff and resumes the watch from the last
//! revision it applied, so no event is missed; when etcd has compacted that revision away, it
//! reads the prefix again. It never stops quietly.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use etcd_client::{EventType, WatchOptions};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::Topology;
use crate::backoff::Backoff;
use crate::etcd::{read_prefix, relative, within, Etcd, EtcdError};

const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// At most this between two attempts to reach etcd: a healed link is noticed within it.
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Progress is asked for at least this far apart, whatever `watch_idle_timeout` says.
const PROGRESS_FLOOR: Duration = Duration::from_millis(100);

/// Watches one Patroni cluster's keys in etcd and publishes its topology.
pub struct EtcdWatcher {
    etcd: Etcd,
    /// The cluster's name, for metrics.
    name: String,
    prefix: String,
    epoch: u64,
    current: Option<Arc<Topology>>,
    watching: Arc<AtomicBool>,
    /// The keys as of `revision`: where the next watch resumes, unless it must read again.
    keys: BTreeMap<String, Bytes>,
    revision: i64,
    /// False until the first read, and after etcd compacted the revision to resume from.
    resumable: bool,
}

impl EtcdWatcher {
    /// A watcher of the keys under `prefix` (`/<namespace>/<scope>/`), for the cluster
    /// listeners call `name`.
    /// `watching` is set while the watch is established, for readiness.
    pub fn new(etcd: Etcd, name: String, prefix: String, watching: Arc<AtomicBool>) -> EtcdWatcher {
        EtcdWatcher {
            etcd,
            name,
            prefix,
            epoch: 0,
            current: None,
            watching,
            keys: BTreeMap::new(),
            revision: 0,
            resumable: false,
        }
    }

    /// Runs until `shutdown`, publishing snapshots into `tx`. Never returns early on errors.
    /// A watcher started again on the same channel (after a panic) carries on its epochs.
    pub async fn run(mut self, tx: Arc<watch::Sender<Arc<Topology>>>, shutdown: CancellationToken) {
        let last = tx.borrow().clone();
        if last.epoch > 0 {
            self.epoch = last.epoch;
            self.current = Some(last);
        }
        let mut backoff = Backoff::new(BACKOFF_MIN, BACKOFF_MAX);
        info!(prefix = %self.prefix, endpoints = ?self.etcd.config.endpoints, "watching Patroni keys in etcd");
        loop {
            let mut synced = false;
            let result = tokio::select! {
                r = self.sync_and_watch(&tx, &mut synced) => r,
                _ = shutdown.cancelled() => return,
            };
            self.watching.store(false, Ordering::Relaxed);
            if synced {
                backoff.reset();
            }
            let pause = backoff.next_pause();
            if let Err(e) = result {
                crate::metrics::etcd_watch_error(&self.name);
                if matches!(e, EtcdError::Canceled { compact_revision, .. } if compact_revision > 0)
                {
                    // The revision to resume from is gone: read everything again.
                    self.resumable = false;
                }
                let how = if self.resumable {
                    "resume"
                } else {
                    "read everything again"
                };
                warn!(error = %e, retry_in = ?pause, revision = self.revision, "etcd watch lost; will {how}");
            }
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }

    /// One round: connect, read everything unless the last watch can be resumed, then follow
    /// the watch until it fails.
    async fn sync_and_watch(
        &mut self,
        tx: &watch::Sender<Arc<Topology>>,
        synced: &mut bool,
    ) -> Result<(), EtcdError> {
        let mut client = self.etcd.connect().await?;
        let request_timeout = self.etcd.config.request_timeout;
        if !self.resumable {
            let (keys, revision) = read_prefix(&mut client, &self.prefix, request_timeout).await?;
            (self.keys, self.revision, self.resumable) = (keys, revision, true);
            crate::metrics::etcd_resync(&self.name);
            self.publish(tx, self.revision);
        }
        crate::metrics::etcd_event(&self.name);
        *synced = true;

        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(self.revision + 1);
        let watch = client.watch(self.prefix.as_str(), Some(opts));
        let mut stream = within(request_timeout, watch).await?;
        self.watching.store(true, Ordering::Relaxed);

        let idle = self.etcd.config.watch_idle_timeout;
        // Ask for progress a few times per idle period: a healthy etcd always answers.
        let mut progress = tokio::time::interval((idle / 3).max(PROGRESS_FLOOR));
        progress.tick().await;
        let mut last_message = Instant::now();
        loop {
            tokio::select! {
                msg = stream.message() => {
                    let Some(resp) = msg? else {
                        return Err(EtcdError::StreamEnded);
                    };
                    last_message = Instant::now();
                    crate::metrics::etcd_event(&self.name);
                    if resp.canceled() {
                        return Err(EtcdError::Canceled {
                            compact_revision: resp.compact_revision(),
                            reason: resp.cancel_reason().to_owned(),
                        });
                    }
                    if resp.events().is_empty() {
                        // A progress notification says every event up to its revision has
                        // been delivered; the "created" answer says nothing of the kind.
                        let at = resp.header().map_or(self.revision, |h| h.revision());
                        if !resp.created() {
                            self.revision = self.revision.max(at);
                        } else if at < self.revision {
                            // etcd is behind what was seen (restored, or rebuilt): the watch
                            // would wait for a revision that may never mean the same thing.
                            self.resumable = false;
                            return Err(EtcdError::Rewound { seen: self.revision, now: at });
                        }
                        continue;
                    }
                    for ev in resp.events() {
                        let Some(kv) = ev.kv() else { continue };
                        // Resume after the last event applied: the header's revision can run
                        // ahead of events still to come in later responses.
                        self.revision = self.revision.max(kv.mod_revision());
                        let Some(key) = self.relative(kv.key()) else { continue };
                        match ev.event_type() {
                            EventType::Put => {
                                self.keys.insert(key, Bytes::copy_from_slice(kv.value()));
                            }
                            EventType::Delete => {
                                self.keys.remove(&key);
                            }
                        }
                    }
                    let rev = resp.header().map_or(self.revision, |h| h.revision());
                    self.publish(tx, rev);
                }
                _ = progress.tick() => {
                    if last_message.elapsed() > idle {
                        return Err(EtcdError::Silent(idle));
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
    fn publish(&mut self, tx: &watch::Sender<Arc<Topology>>, revision: i64) {
        let (mut next, problems) = Topology::from_keys(&self.keys);
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

        if self.current.is_none() || old_leader != next.leader {
            let leader = next.leader_member();
            info!(
                epoch = next.epoch,
                revision,
                from = old_leader.as_deref().unwrap_or("(none)"),
                to = next.leader.as_deref().unwrap_or("(none)"),
                address = %leader.and_then(|m| m.endpoint.as_ref()).map_or_else(|| "(none)".to_owned(), |e| e.to_string()),
                state = leader.map_or("(none)", |m| m.state.as_str()),
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
