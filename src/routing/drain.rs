//! The drain policy: when a live session must end, and at which point it may. Pure, no I/O.

use std::fmt;
use std::time::Duration;

use crate::config::Timeouts;
use crate::discovery::patroni::Endpoint;
use crate::discovery::Topology;
use crate::protocol::codes;
use crate::routing::{self, ListenerRole, Policy};

/// Why a session is being drained.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DrainCause {
    /// The session's server is no longer the routable primary.
    PrimaryMoved { from: String, to: Option<String> },
    /// The session's member is no longer eligible for its read listener.
    LeftPool { member: String, why: String },
    /// patroxy is shutting down.
    Shutdown,
    /// Session pooling: Patroni announced a switchover away from the session's primary.
    /// The session leaves its server connection at its next transaction end, and is served
    /// by the new primary if it holds no state there; the client sees nothing.
    Switchover { from: String },
    /// The admin console's `KILL`: at once, inside a transaction too.
    Killed,
}

impl DrainCause {
    /// The message of the FATAL 57P01 the client receives.
    pub fn client_message(&self) -> String {
        match self {
            DrainCause::PrimaryMoved { from, to: Some(to) } => format!(
                "terminating connection because the primary moved from {from} to {to} (patroxy); reconnect"
            ),
            DrainCause::PrimaryMoved { from, to: None } => format!(
                "terminating connection because {from} is no longer the primary and no new primary is known yet (patroxy); reconnect"
            ),
            DrainCause::LeftPool { member, why } => format!(
                "terminating connection because {member} left this listener's pool: {why} (patroxy); reconnect"
            ),
            DrainCause::Shutdown => "terminating connection because patroxy is shutting down".into(),
            DrainCause::Switchover { from } => format!(
                "terminating connection because Patroni is switching over from {from} and this session holds state there (patroxy); reconnect"
            ),
            DrainCause::Killed => {
                "terminating connection: killed from patroxy's admin console (KILL)".into()
            }
        }
    }

    /// Every `label()`, for metrics exported at zero before their first event.
    pub const LABELS: [&'static str; 5] = [
        "primary_moved",
        "left_pool",
        "shutdown",
        "switchover",
        "killed",
    ];

    /// A short label for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            DrainCause::PrimaryMoved { .. } => "primary_moved",
            DrainCause::LeftPool { .. } => "left_pool",
            DrainCause::Shutdown => "shutdown",
            DrainCause::Switchover { .. } => "switchover",
            DrainCause::Killed => "killed",
        }
    }

    /// A moved primary ends sessions at any rest point, inside a transaction too, since writes
    /// on a deposed primary may be lost. Read sessions and shutdown let a transaction finish.
    pub fn waits_for_transaction_end(&self) -> bool {
        !matches!(self, DrainCause::PrimaryMoved { .. } | DrainCause::Killed)
    }

    /// The deadline after which the session is closed whatever it is doing; none for a
    /// switchover, which the server's own shutdown ends if the transaction does not.
    pub fn deadline(&self, t: &Timeouts) -> Option<Duration> {
        match self {
            DrainCause::PrimaryMoved { .. } => Some(t.drain),
            DrainCause::LeftPool { .. } => Some(t.replica_drain),
            DrainCause::Shutdown => Some(t.shutdown),
            DrainCause::Switchover { .. } => None,
            DrainCause::Killed => Some(Duration::ZERO),
        }
    }
}

impl fmt::Display for DrainCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DrainCause::PrimaryMoved { from, to } => {
                write!(
                    f,
                    "primary moved from {from} to {}",
                    to.as_deref().unwrap_or("(none)")
                )
            }
            DrainCause::LeftPool { member, why } => write!(f, "{member} left the pool: {why}"),
            DrainCause::Shutdown => f.write_str("shutdown"),
            DrainCause::Switchover { from } => write!(f, "switchover away from {from}"),
            DrainCause::Killed => f.write_str("killed (KILL)"),
        }
    }
}

/// Must a session of a listener with policy `p`, on member `member` at `server`, be drained
/// under topology `t`?
pub fn drain_cause(
    p: &Policy,
    member: &str,
    server: &Endpoint,
    t: &Topology,
) -> Option<DrainCause> {
    // Before the first read of the DCS nothing is known, so nothing is judged.
    if t.epoch == 0 {
        return None;
    }
    if p.role == ListenerRole::Primary {
        return match routing::primary(t) {
            Ok(target) if &target.endpoint == server => None,
            routed => Some(DrainCause::PrimaryMoved {
                from: member.to_owned(),
                to: routed.ok().map(|t| t.member).or_else(|| t.leader.clone()),
            }),
        };
    }
    let why = match routing::eligibility(p, t, member) {
        Ok(()) if t.members.get(member).and_then(|m| m.endpoint.as_ref()) == Some(server) => {
            return None
        }
        Ok(()) => "its address changed".to_owned(),
        Err(e) => e.to_string(),
    };
    Some(DrainCause::LeftPool {
        member: member.to_owned(),
        why,
    })
}

/// Where a session stands in its conversation, as the relay sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// The status byte of the last ReadyForQuery (`I`, `T` or `E`).
    pub tx_status: u8,
    /// Queries and Syncs sent whose ReadyForQuery has not come back yet.
    pub in_flight: u32,
    /// Extended-protocol messages (a pipeline) sent since the last Sync: all of them are in
    /// flight, though none is counted in `in_flight` until its Sync.
    pub unsynced: bool,
    /// Everything read from the server was written to the client, ending on a frame boundary.
    pub client_at_boundary: bool,
}

#[cfg(test)]
impl Progress {
    pub fn idle() -> Progress {
        Progress {
            tx_status: codes::TX_IDLE,
            in_flight: 0,
            unsynced: false,
            client_at_boundary: true,
        }
    }
}

/// May the session be closed now, without cutting a response short?
#[cfg(test)]
pub fn may_close_now(cause: &DrainCause, p: Progress) -> bool {
    at_drain_point(cause.waits_for_transaction_end(), p)
}

/// At rest (no query in flight, no pipeline waiting for its Sync, the client between frames),
/// and, if asked, outside a transaction too.
pub fn at_drain_point(wait_for_transaction_end: bool, p: Progress) -> bool {
    let at_rest = p.in_flight == 0 && !p.unsynced && p.client_at_boundary;
    at_rest && (!wait_for_transaction_end || p.tx_status == codes::TX_IDLE)
}

/// At the forced deadline: can the FATAL message still be sent cleanly? Only between frames;
/// otherwise the connection is just closed.
pub fn can_send_error(p: Progress) -> bool {
    p.client_at_boundary
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::tests::topology;

    fn primary() -> Policy {
        Policy::default()
    }

    fn replica() -> Policy {
        Policy {
            role: ListenerRole::Replica,
            ..Policy::default()
        }
    }

    fn ep(port: u16) -> Endpoint {
        Endpoint {
            host: "127.0.0.1".into(),
            port,
        }
    }

    #[test]
    fn sessions_on_the_leader_stay() {
        let t = topology(Some("a"), &[("a", 5001, "running"), ("b", 5002, "running")]);
        assert_eq!(drain_cause(&primary(), "a", &ep(5001), &t), None);
    }

    #[test]
    fn sessions_on_a_deposed_primary_drain() {
        let t = topology(Some("b"), &[("a", 5001, "running"), ("b", 5002, "running")]);
        assert_eq!(
            drain_cause(&primary(), "a", &ep(5001), &t),
            Some(DrainCause::PrimaryMoved {
                from: "a".into(),
                to: Some("b".into())
            })
        );
    }

    #[test]
    fn no_leader_or_a_stopped_leader_drains_too() {
        let members = [("a", 5001, "running")];
        let cause = drain_cause(&primary(), "a", &ep(5001), &topology(None, &members));
        assert_eq!(
            cause,
            Some(DrainCause::PrimaryMoved {
                from: "a".into(),
                to: None
            })
        );
        assert!(cause.unwrap().client_message().contains("no new primary"));
        let stopped = topology(Some("a"), &[("a", 5001, "stopped")]);
        assert!(drain_cause(&primary(), "a", &ep(5001), &stopped).is_some());
    }

    #[test]
    fn nothing_is_judged_before_the_first_read() {
        assert_eq!(
            drain_cause(&primary(), "a", &ep(5001), &Topology::default()),
            None
        );
    }

    #[test]
    fn a_moved_primary_closes_at_any_rest_point_even_inside_a_transaction() {
        let moved = DrainCause::PrimaryMoved {
            from: "a".into(),
            to: Some("b".into()),
        };
        let mut p = Progress::idle();
        assert!(may_close_now(&moved, p));
        p.tx_status = codes::TX_IN_BLOCK;
        assert!(
            may_close_now(&moved, p),
            "between statements of a transaction"
        );
        p.in_flight = 1;
        assert!(!may_close_now(&moved, p), "a query is running");
        p.in_flight = 0;
        p.client_at_boundary = false;
        assert!(!may_close_now(&moved, p), "a response is half written");
    }

    #[test]
    fn read_sessions_drain_when_their_member_leaves_the_pool() {
        let t = topology(Some("a"), &[("a", 5001, "running"), ("b", 5002, "running")]);
        assert_eq!(drain_cause(&replica(), "b", &ep(5002), &t), None);
        let mut stopped = t.clone();
        stopped.members.get_mut("b").unwrap().state = "stopped".into();
        let cause = drain_cause(&replica(), "b", &ep(5002), &stopped).unwrap();
        assert!(
            cause
                .client_message()
                .contains("b left this listener's pool: it is not running"),
            "{cause}"
        );
        assert!(cause.waits_for_transaction_end());
        let mut promoted = t.clone();
        promoted.leader = Some("b".into());
        assert!(matches!(
            drain_cause(&replica(), "b", &ep(5002), &promoted),
            Some(DrainCause::LeftPool { .. })
        ));
        let mut moved = t.clone();
        moved.members.get_mut("b").unwrap().endpoint = Some(ep(6000));
        assert!(drain_cause(&replica(), "b", &ep(5002), &moved).is_some());
    }

    #[test]
    fn each_cause_has_its_deadline() {
        let t = Timeouts::default();
        let moved = DrainCause::PrimaryMoved {
            from: "a".into(),
            to: None,
        };
        assert_eq!(moved.deadline(&t), Some(t.drain));
        let left = DrainCause::LeftPool {
            member: "b".into(),
            why: String::new(),
        };
        assert_eq!(left.deadline(&t), Some(t.replica_drain));
        assert_eq!(DrainCause::Shutdown.deadline(&t), Some(t.shutdown));
        let switchover = DrainCause::Switchover { from: "a".into() };
        assert_eq!(switchover.deadline(&t), None);
        assert!(switchover.waits_for_transaction_end());
    }

    #[test]
    fn a_pipeline_without_its_sync_yet_is_in_flight() {
        let mut p = Progress::idle();
        p.unsynced = true;
        for cause in [
            DrainCause::Shutdown,
            DrainCause::PrimaryMoved {
                from: "a".into(),
                to: None,
            },
        ] {
            assert!(!may_close_now(&cause, p), "{cause}");
        }
        p.unsynced = false;
        assert!(may_close_now(&DrainCause::Shutdown, p));
    }

    #[test]
    fn shutdown_waits_for_the_transaction_to_end() {
        let mut p = Progress::idle();
        assert!(may_close_now(&DrainCause::Shutdown, p));
        p.tx_status = codes::TX_FAILED;
        assert!(!may_close_now(&DrainCause::Shutdown, p));
    }

    #[test]
    fn the_forced_error_needs_a_frame_boundary() {
        let mut p = Progress::idle();
        p.in_flight = 3;
        assert!(
            can_send_error(p),
            "a query blocked on a frozen server still gets 57P01"
        );
        p.client_at_boundary = false;
        assert!(!can_send_error(p));
    }
}
