//! The ZooKeeper source: Patroni's znodes under `/<namespace>/<scope>/`, followed with one
//! persistent recursive watch (ZooKeeper 3.6+) and published as the same `Topology` the etcd
//! watcher builds (the znodes hold the same values as etcd's keys).
//!
//! The watch is set before the znodes are read, so no change between the two is missed. A
//! persistent watch can lose events while the client reconnects (ZOOKEEPER-4698), so after
//! every reconnect everything is read again, as after a lost session, which also drops every
//! watch: then a new session is opened and read from scratch. Each answer proves the link up,
//! and a check every third of the session timeout finds a server that went silent.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use zookeeper_client as zk;

use super::publish::Publisher;
use super::{DcsContact, Topology};
use crate::config::ZookeeperConfig;

/// Between two sessions, when one ends or cannot be opened.
const PAUSE: Duration = Duration::from_millis(500);
/// Znodes held at most: a cluster has a handful plus one per member.
const MAX_NODES: usize = 4096;
/// Bytes of znode data held at most (a member's znode is under a kilobyte).
const MAX_BYTES: usize = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ZkError {
    #[error("ZooKeeper: {0}")]
    Client(#[from] zk::Error),
    #[error("ZooKeeper: no session within {0:?}")]
    Timeout(Duration),
    #[error("ZooKeeper: session {0:?}")]
    Ended(zk::SessionState),
    #[error(
        "ZooKeeper: more than {MAX_NODES} znodes or {MAX_BYTES} bytes under the cluster's path"
    )]
    TooMany,
}

/// Watches one Patroni cluster's znodes and publishes its topology.
pub struct ZkWatcher {
    name: String,
    /// `/<namespace>/<scope>/`, with its trailing slash.
    prefix: String,
    config: ZookeeperConfig,
    contact: Arc<DcsContact>,
    keys: BTreeMap<String, Bytes>,
    /// The bytes of `keys`' values.
    held: usize,
}

impl ZkWatcher {
    pub fn new(
        name: String,
        prefix: String,
        config: ZookeeperConfig,
        contact: Arc<DcsContact>,
    ) -> ZkWatcher {
        ZkWatcher {
            name,
            prefix,
            config,
            contact,
            keys: BTreeMap::new(),
            held: 0,
        }
    }

    /// Runs until `shutdown`, publishing snapshots into `tx`; never returns early on errors.
    pub async fn run(mut self, tx: Arc<watch::Sender<Arc<Topology>>>, shutdown: CancellationToken) {
        let mut tx = Publisher::new(&self.name, tx);
        info!(cluster = %self.name, prefix = %self.prefix, hosts = ?self.config.hosts, "watching Patroni znodes in ZooKeeper");
        let mut failing = false;
        loop {
            let ended = tokio::select! {
                e = self.session(&mut tx) => e,
                _ = shutdown.cancelled() => return,
            };
            let was_up = self.contact.watching();
            self.contact.lost();
            crate::metrics::dcs_error(&self.name, "zookeeper");
            // A line when a watch that was up is lost, and one when sessions start failing;
            // not one per attempt.
            if was_up || !failing {
                warn!(cluster = %self.name, error = %ended, "ZooKeeper watch lost; opening a new session and reading everything again");
            }
            failing = !was_up;
            tokio::select! {
                _ = tokio::time::sleep(PAUSE) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }

    fn root(&self) -> &str {
        self.prefix.trim_end_matches('/')
    }

    /// One session: open it, watch, read, then follow events until it fails.
    async fn session(&mut self, tx: &mut Publisher) -> ZkError {
        match self.follow(tx).await {
            Ok(never) => match never {},
            Err(e) => e,
        }
    }

    async fn follow(&mut self, tx: &mut Publisher) -> Result<std::convert::Infallible, ZkError> {
        let c = self.config.clone();
        let limit = c.session_timeout;
        let hosts = c.hosts.join(",");
        let connect = zk::Client::connector()
            .with_session_timeout(c.session_timeout)
            .with_connection_timeout(c.connect_timeout)
            .connect(&hosts);
        let client = tokio::time::timeout(limit, connect)
            .await
            .map_err(|_| ZkError::Timeout(limit))??;
        let mut events = within(
            limit,
            client.watch(self.root(), zk::AddWatchMode::PersistentRecursive),
        )
        .await?;
        self.read_all(&client, tx).await?;
        self.contact.watching_on(&hosts);
        info!(cluster = %self.name, session = %client.session_id(), "ZooKeeper watch up");
        let mut check =
            tokio::time::interval((c.session_timeout / 3).max(Duration::from_millis(500)));
        check.tick().await;
        loop {
            tokio::select! {
                ev = events.changed() => {
                    match ev.event_type {
                        zk::EventType::Session => match ev.session_state {
                            s if s.is_terminated() => return Err(ZkError::Ended(s)),
                            zk::SessionState::Disconnected => {
                                debug!(cluster = %self.name, "ZooKeeper disconnected; the client reconnects");
                                self.contact.lost();
                            }
                            _ => {
                                // Back on a server: what changed meanwhile may not have come.
                                self.read_all(&client, tx).await?;
                                self.contact.watching_on(&hosts);
                            }
                        },
                        _ => {
                            self.contact.touch();
                            if let Some(key) = self.relative(&ev.path) {
                                self.read_one(&client, key).await?;
                                self.publish(tx);
                            }
                        }
                    }
                }
                _ = check.tick() => {
                    // A cheap request proves the server still answers.
                    within(limit, client.check_stat(self.root())).await?;
                    self.contact.touch();
                }
            }
        }
    }

    /// The key (relative to the prefix) of a znode's path, if it is one Patroni's topology uses.
    fn relative(&self, path: &str) -> Option<String> {
        let key = path.strip_prefix(&self.prefix)?;
        wanted(key).then(|| key.to_owned())
    }

    /// Reads one znode again; a missing one is removed.
    async fn read_one(&mut self, client: &zk::Client, key: String) -> Result<(), ZkError> {
        let path = format!("{}{key}", self.prefix);
        let read = within(self.config.session_timeout, client.get_data(&path)).await;
        let data = match read {
            Ok((data, _)) => Some(Bytes::from(data)),
            Err(ZkError::Client(zk::Error::NoNode)) => None,
            Err(e) => return Err(e),
        };
        if let Some(old) = self.keys.remove(&key) {
            self.held -= old.len();
        }
        if let Some(data) = data {
            if self.keys.len() >= MAX_NODES + TOP_LEVEL.len() || self.held + data.len() > MAX_BYTES
            {
                return Err(ZkError::TooMany);
            }
            self.held += data.len();
            self.keys.insert(key, data);
        }
        Ok(())
    }

    /// Reads every znode the topology uses: the cluster's own and each member's.
    async fn read_all(&mut self, client: &zk::Client, tx: &mut Publisher) -> Result<(), ZkError> {
        let limit = self.config.session_timeout;
        let mut keys: Vec<String> = TOP_LEVEL.iter().map(|k| (*k).to_owned()).collect();
        let members = format!("{}members", self.prefix);
        match within(limit, client.list_children(&members)).await {
            Ok(names) if names.len() > MAX_NODES => return Err(ZkError::TooMany),
            Ok(names) => keys.extend(names.into_iter().map(|n| format!("members/{n}"))),
            Err(ZkError::Client(zk::Error::NoNode)) => {}
            Err(e) => return Err(e),
        }
        self.keys.clear();
        self.held = 0;
        for key in keys {
            self.read_one(client, key).await?;
        }
        crate::metrics::dcs_read(&self.name, "zookeeper");
        self.publish(tx);
        Ok(())
    }

    fn publish(&self, tx: &mut Publisher) {
        let (next, problems) = Topology::from_keys(&self.keys);
        for p in problems {
            warn!(cluster = %self.name, problem = %p, "ignoring a Patroni value");
        }
        tx.publish(next, 0);
    }
}

/// The cluster's own znodes that the topology reads.
const TOP_LEVEL: [&str; 7] = [
    "leader",
    "status",
    "optime/leader",
    "sync",
    "failover",
    "failsafe",
    "config",
];

/// Whether the topology reads the znode at `key` (relative to the cluster's path).
fn wanted(key: &str) -> bool {
    TOP_LEVEL.contains(&key)
        || key
            .strip_prefix("members/")
            .is_some_and(|n| !n.is_empty() && !n.contains('/'))
}

async fn within<T>(
    limit: Duration,
    f: impl std::future::Future<Output = Result<T, zk::Error>>,
) -> Result<T, ZkError> {
    match tokio::time::timeout(limit, f).await {
        Ok(r) => r.map_err(ZkError::from),
        Err(_) => Err(ZkError::Timeout(limit)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_znodes_the_topology_reads_are_followed() {
        for k in [
            "leader",
            "members/node1",
            "status",
            "failover",
            "config",
            "optime/leader",
        ] {
            assert!(wanted(k), "{k}");
        }
        for k in [
            "history",
            "initialize",
            "members/",
            "members/a/b",
            "members",
            "leaderx",
        ] {
            assert!(!wanted(k), "{k}");
        }
    }
}
