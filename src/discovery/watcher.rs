//! The etcd v3 watcher: range-read the cluster's prefix, watch it from the read's revision + 1,
//! and publish a new `Topology` whenever the content changes. On any watch error,
//! cancellation or silence it moves to the next etcd endpoint and resumes the watch from the
//! last revision it applied, so no event is missed; when etcd has compacted that revision
//! away, it reads the prefix again. It never stops quietly.
//!
//! Endpoints are used one at a time, not through etcd-client's balancer: a balanced channel
//! keeps sending to a member that accepts connections but answers nothing (frozen, or cut
//! off behind a half-open connection), and gives no say in which member serves the watch.
//! While no watch is up, a new attempt starts every `ATTEMPT_EVERY` on the next endpoint,
//! earlier ones still pending: a fresh connection sends its SYN at once, so a healed link is
//! used within that time instead of after a grown TCP retransmission backoff. Requests carry
//! etcd's `hasleader` requirement, so a member cut off from its quorum refuses them (and ends
//! its watches) instead of serving stale data.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use etcd_client::{EventType, WatchOptions, WatchStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::publish::Publisher;
use super::{DcsContact, Topology};
use crate::etcd::{read_prefix, relative, within, Etcd, EtcdError};

/// Between two attempts to reach etcd while the watch is down; a healed link or a member
/// that came back is used within it.
const ATTEMPT_EVERY: Duration = Duration::from_millis(500);
/// A failing endpoint is logged at most this often.
const REPORT_EVERY: Duration = Duration::from_secs(10);
/// Progress is asked for at least this far apart, whatever `watch_idle_timeout` says.
const PROGRESS_FLOOR: Duration = Duration::from_millis(100);

/// Watches one Patroni cluster's keys in etcd and publishes its topology.
pub struct EtcdWatcher {
    etcd: Etcd,
    /// The cluster's name, for metrics.
    name: String,
    prefix: String,
    contact: Arc<DcsContact>,
    /// The keys as of `revision`: where the next watch resumes, unless it must read again.
    keys: BTreeMap<String, Bytes>,
    revision: i64,
    /// False until the first read, and after etcd compacted the revision to resume from.
    resumable: bool,
    /// The endpoint the next attempt tries first.
    next_endpoint: usize,
}

/// A watch that is up: its endpoint, its stream, and the keys read first if they had to be.
struct Established {
    endpoint: usize,
    stream: WatchStream,
    read: Option<(BTreeMap<String, Bytes>, i64)>,
    /// etcd's revision when the watch was created: what it must deliver to be caught up.
    created_at: i64,
    /// Kept for as long as the stream is used.
    _client: etcd_client::Client,
}

impl EtcdWatcher {
    /// A watcher of the keys under `prefix` (`/<namespace>/<scope>/`), for the cluster
    /// listeners call `name`. `contact` follows its link to etcd, for readiness and policy.
    pub fn new(etcd: Etcd, name: String, prefix: String, contact: Arc<DcsContact>) -> EtcdWatcher {
        EtcdWatcher {
            etcd,
            name,
            prefix,
            contact,
            keys: BTreeMap::new(),
            revision: 0,
            resumable: false,
            next_endpoint: 0,
        }
    }

    /// Runs until `shutdown`, publishing snapshots into `tx`. Never returns early on errors.
    /// A watcher started again on the same channel (after a panic) carries on its epochs.
    pub async fn run(mut self, tx: Arc<watch::Sender<Arc<Topology>>>, shutdown: CancellationToken) {
        let mut tx = Publisher::new(&self.name, tx);
        info!(prefix = %self.prefix, endpoints = ?self.etcd.config.endpoints, "watching Patroni keys in etcd");
        loop {
            let round = Instant::now();
            let result = tokio::select! {
                r = self.sync_and_watch(&mut tx) => r,
                _ = shutdown.cancelled() => return,
            };
            self.contact.lost();
            // A watch that fails as soon as it is up must not become a busy loop.
            if round.elapsed() < ATTEMPT_EVERY {
                tokio::select! {
                    _ = tokio::time::sleep(ATTEMPT_EVERY) => {}
                    _ = shutdown.cancelled() => return,
                }
            }
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
                let next = self.etcd.config.endpoints.get(self.next_endpoint);
                warn!(error = %e, revision = self.revision, next = ?next, "etcd watch lost; will {how}");
            }
        }
    }

    /// Attempts on one endpoint after another, a new one every `ATTEMPT_EVERY` while the
    /// earlier ones are pending, until one has read (if it must) and opened the watch.
    async fn establish(&mut self) -> Result<Established, EtcdError> {
        let endpoints = self.etcd.config.endpoints.clone();
        let n = endpoints.len().max(1);
        let resume_from = self.resumable.then_some(self.revision);
        let mut attempts = JoinSet::new();
        let mut tick = tokio::time::interval(ATTEMPT_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut reported: Vec<Option<Instant>> = vec![None; n];
        let mut started = std::collections::VecDeque::new();
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let i = self.next_endpoint % n;
                    self.next_endpoint = (i + 1) % n;
                    let (etcd, prefix) = (self.etcd.clone(), self.prefix.clone());
                    started.push_back(attempts.spawn(attempt(etcd, i, prefix, resume_from)));
                    // Attempts outlive a few ticks (a dial or request timeout): the oldest
                    // go, never the new one, whose fresh SYN is what finds a healed link.
                    while started.len() > 2 * n {
                        if let Some(oldest) = started.pop_front() {
                            oldest.abort();
                        }
                    }
                }
                Some(done) = attempts.join_next() => match done {
                    Ok(Ok(up)) => return Ok(up),
                    Ok(Err((i, e))) => {
                        crate::metrics::etcd_watch_error(&self.name);
                        // A line per endpoint every few seconds, not one per attempt.
                        let now = Instant::now();
                        let due = !reported.get(i).copied().flatten().is_some_and(|at| now - at < REPORT_EVERY);
                        if due {
                            if let Some(r) = reported.get_mut(i) {
                                *r = Some(now);
                            }
                            let endpoint = endpoints.get(i).map_or("?", String::as_str);
                            warn!(%endpoint, error = %e, "etcd watch lost; this endpoint failed, trying the others");
                        }
                        if let EtcdError::Rewound { .. } = e {
                            self.resumable = false;
                            return Err(e);
                        }
                    }
                    Err(e) if e.is_cancelled() => {}
                    Err(e) => warn!(error = %e, "an etcd attempt panicked"),
                },
            }
        }
    }

    /// One round: reach etcd, apply what was read if the watch could not be resumed, then
    /// follow the watch until it fails.
    async fn sync_and_watch(&mut self, tx: &mut Publisher) -> Result<(), EtcdError> {
        let Established {
            endpoint,
            mut stream,
            read,
            created_at,
            _client,
        } = self.establish().await?;
        // The next round starts on the next endpoint: this one may be what failed.
        self.next_endpoint = endpoint + 1;
        let url = self
            .etcd
            .config
            .endpoints
            .get(endpoint)
            .cloned()
            .unwrap_or_default();
        if let Some((keys, revision)) = read {
            (self.keys, self.revision, self.resumable) = (keys, revision, true);
            crate::metrics::etcd_resync(&self.name);
            self.publish(tx, self.revision);
        }
        crate::metrics::etcd_event(&self.name);
        // Resumed behind etcd: up (for readiness and the routing report) only once the
        // events missed meanwhile are applied, or a progress notice says there were none.
        let mut behind = created_at > self.revision;
        match behind {
            true => stream.request_progress().await?,
            false => self.contact.watching_on(&url),
        }
        debug!(endpoint = %url, revision = self.revision, behind, "etcd watch up");

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
                    self.contact.touch();
                    crate::metrics::etcd_event(&self.name);
                    if resp.canceled() {
                        return Err(EtcdError::Canceled {
                            compact_revision: resp.compact_revision(),
                            reason: resp.cancel_reason().to_owned(),
                        });
                    }
                    if resp.events().is_empty() {
                        // A progress notification says every event up to its revision has
                        // been delivered.
                        let at = resp.header().map_or(self.revision, |h| h.revision());
                        self.revision = self.revision.max(at);
                        if behind && self.revision >= created_at {
                            behind = false;
                            self.contact.watching_on(&url);
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
                    if behind && self.revision.max(rev) >= created_at {
                        behind = false;
                        self.contact.watching_on(&url);
                    }
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

    /// Publishes the keys' snapshot (if its content changed).
    fn publish(&self, tx: &mut Publisher, revision: i64) {
        let (next, problems) = Topology::from_keys(&self.keys);
        for p in problems {
            warn!(problem = %p, "ignoring a Patroni value");
        }
        tx.publish(next, revision);
    }
}

/// One attempt on endpoint `i`: connect, read the prefix unless resuming from `resume_from`,
/// open the watch and wait for etcd to confirm it, all within the request timeout.
async fn attempt(
    etcd: Etcd,
    i: usize,
    prefix: String,
    resume_from: Option<i64>,
) -> Result<Established, (usize, EtcdError)> {
    let limit = etcd.config.request_timeout;
    let up = async {
        let endpoint = etcd.config.endpoints.get(i).cloned().unwrap_or_default();
        let mut client = etcd.connect_to(&endpoint).await?;
        let read = match resume_from {
            Some(_) => None,
            None => Some(read_prefix(&mut client, &prefix, limit).await?),
        };
        let from = resume_from
            .or(read.as_ref().map(|(_, rev)| *rev))
            .unwrap_or(0);
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(from + 1);
        let mut stream = within(limit, client.watch(prefix.as_str(), Some(opts))).await?;
        // The "created" answer proves the member serves the watch (and has a leader).
        let created = within(limit, stream.message())
            .await?
            .ok_or(EtcdError::StreamEnded)?;
        if created.canceled() {
            return Err(EtcdError::Canceled {
                compact_revision: created.compact_revision(),
                reason: created.cancel_reason().to_owned(),
            });
        }
        let at = created.header().map_or(from, |h| h.revision());
        if resume_from.is_some() && at < from {
            // etcd is behind what was seen (restored, or rebuilt): the watch would wait for
            // a revision that may never mean the same thing.
            return Err(EtcdError::Rewound {
                seen: from,
                now: at,
            });
        }
        Ok(Established {
            endpoint: i,
            stream,
            read,
            created_at: at,
            _client: client,
        })
    };
    // Bounded as a whole too: each step has its own limit, and three steps are plenty.
    match tokio::time::timeout(limit * 3, up).await {
        Ok(r) => r.map_err(|e| (i, e)),
        Err(_) => Err((i, EtcdError::Timeout(limit * 3))),
    }
}
