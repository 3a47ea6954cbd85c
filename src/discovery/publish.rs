//! Publishing a cluster's snapshots, whatever source read them: a new epoch only when the
//! content changed, the leader change in one log line, the topology metrics.

use std::sync::Arc;

use tokio::sync::watch;
use tracing::{debug, info};

use super::Topology;

/// One cluster's channel of snapshots and the last one sent on it.
pub struct Publisher {
    name: String,
    epoch: u64,
    current: Option<Arc<Topology>>,
    tx: Arc<watch::Sender<Arc<Topology>>>,
}

impl Publisher {
    /// A publisher on `tx` for the cluster listeners call `name`. A source started again on
    /// the same channel (after a panic) carries on its epochs.
    pub fn new(name: &str, tx: Arc<watch::Sender<Arc<Topology>>>) -> Publisher {
        let last = tx.borrow().clone();
        let current = (last.epoch > 0).then_some(last);
        Publisher {
            name: name.to_owned(),
            epoch: current.as_ref().map_or(0, |c| c.epoch),
            current,
            tx,
        }
    }

    /// The last snapshot published, if any.
    pub fn current(&self) -> Option<&Arc<Topology>> {
        self.current.as_ref()
    }

    /// Publishes `next` (read at the source's `revision`) when its content changed.
    pub fn publish(&mut self, mut next: Topology, revision: i64) {
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
            let from = old_leader.as_deref().unwrap_or("(none)");
            let to = next.leader.as_deref().unwrap_or("(none)");
            info!(
                cluster = %self.name,
                epoch = next.epoch,
                revision,
                from,
                to,
                address = %leader.and_then(|m| m.endpoint.as_ref()).map_or_else(|| "(none)".to_owned(), |e| e.to_string()),
                state = leader.map_or("(none)", |m| m.state.as_str()),
                members = next.members.len(),
                "leader {from} -> {to}",
            );
        } else {
            debug!(cluster = %self.name, epoch = next.epoch, revision, "topology changed");
        }
        let next = Arc::new(next);
        self.current = Some(next.clone());
        self.tx.send_replace(next);
    }
}
