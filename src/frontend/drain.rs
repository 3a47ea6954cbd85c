//! The drain control of one session: a task that watches the topology, the listener's rules
//! (reloads) and shutdown, and says once why the session must end (the relay polls only a
//! oneshot for it, which is lock-free); or, for one transaction of a pooled client, the
//! client's bell. The decision itself is `routing::drain`.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::bell::{self, Bell};
use crate::discovery::patroni::Endpoint;
use crate::discovery::Topology;
use crate::routing::drain::{drain_cause, DrainCause};
use crate::routing::{switchover, Policy};

/// What can end a session from outside its two streams.
pub(super) struct Watched {
    pub policy: watch::Receiver<Arc<Policy>>,
    pub topology: watch::Receiver<Arc<Topology>>,
    pub shutdown: CancellationToken,
    /// Session pooling on a primary listener: the session leaves its server for a
    /// switchover, from this long before a scheduled one's time.
    pub switchover_grace: Option<Duration>,
}

/// Waits until the session must be drained (its server left the listener's pool under the
/// current topology and rules, or shutdown), and says why through `tx`.
pub(super) async fn watch_for_drain(
    policy: Arc<Policy>,
    member: String,
    server: Endpoint,
    w: Watched,
    tx: oneshot::Sender<DrainCause>,
) {
    let _ = tx.send(drain_cause_of(policy, &member, &server, w).await);
}

/// Why the session must be drained, once it must.
pub(super) async fn drain_cause_of(
    mut policy: Arc<Policy>,
    member: &str,
    server: &Endpoint,
    mut w: Watched,
) -> DrainCause {
    // The topology may have moved while this session was connecting.
    w.topology.mark_changed();
    let (mut topology_open, mut policy_open) = (true, true);
    // When a scheduled switchover's hold begins, if one is announced.
    let mut switchover_at: Option<SystemTime> = None;
    let cause = loop {
        let until_switchover =
            switchover_at.map(|at| at.duration_since(SystemTime::now()).unwrap_or_default());
        tokio::select! {
            _ = tokio::time::sleep(until_switchover.unwrap_or_default()), if until_switchover.is_some() => {}
            changed = w.topology.changed(), if topology_open => {
                topology_open = changed.is_ok();
            }
            changed = w.policy.changed(), if policy_open => {
                policy_open = changed.is_ok();
                if policy_open {
                    policy = w.policy.borrow_and_update().clone();
                }
            }
            _ = w.shutdown.cancelled() => break DrainCause::Shutdown,
        }
        let t = w.topology.borrow_and_update().clone();
        if let Some(cause) = drain_cause(&policy, member, server, &t) {
            break cause;
        }
        if let Some(grace) = w.switchover_grace {
            if switchover::moves_away_from(&t, member, SystemTime::now(), grace) {
                break DrainCause::Switchover {
                    from: member.to_owned(),
                };
            }
            switchover_at =
                switchover::starts_at(&t, grace).filter(|_| t.leader.as_deref() == Some(member));
        }
    };
    cause
}

/// Why a lent connection must be drained, once it must, as the client's bell tells: at
/// shutdown, or when a change of the topology or the listener's rules leaves its server out.
/// Routing chose the server under the topology `topology` has seen, and under the rules the
/// listener was given: it is judged at once if either has moved since, then at each ring.
pub(super) async fn drain_cause_rung(
    bell: &Bell,
    policy: &watch::Receiver<Arc<Policy>>,
    member: &str,
    server: &Endpoint,
    topology: &watch::Receiver<Arc<Topology>>,
) -> DrainCause {
    let moved = |rx_changed: Result<bool, watch::error::RecvError>| rx_changed.unwrap_or(false);
    let mut judge_now = moved(topology.has_changed()) || moved(policy.has_changed());
    loop {
        if !std::mem::take(&mut judge_now)
            && bell.rung(bell::SHUTDOWN | bell::CHANGED).await & bell::SHUTDOWN != 0
        {
            return DrainCause::Shutdown;
        }
        let policy = policy.borrow().clone();
        let t = topology.borrow().clone();
        if let Some(cause) = drain_cause(&policy, member, server, &t) {
            return cause;
        }
    }
}
