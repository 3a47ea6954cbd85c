//! The drain policy: when a live session must end, and at which point it may. Pure, no I/O.

use std::fmt;

use crate::discovery::patroni::Endpoint;
use crate::discovery::Topology;
use crate::protocol::codes;
use crate::router::{self, ListenerRole};

/// Why a session is being drained.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DrainCause {
    /// The session's server is no longer the routable primary.
    PrimaryMoved { from: String, to: Option<String> },
    /// patroxy is shutting down.
    Shutdown,
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
            DrainCause::Shutdown => "terminating connection because patroxy is shutting down".into(),
        }
    }

    /// A short label for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            DrainCause::PrimaryMoved { .. } => "primary_moved",
            DrainCause::Shutdown => "shutdown",
        }
    }

    /// Shutdown lets an open transaction finish; a moved primary does not, since writes on a
    /// deposed primary may be lost.
    fn waits_for_transaction_end(&self) -> bool {
        matches!(self, DrainCause::Shutdown)
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
            DrainCause::Shutdown => f.write_str("shutdown"),
        }
    }
}

/// Must a session of `role` on `server` (member `member`) be drained under topology `t`?
pub fn drain_cause(
    role: ListenerRole,
    member: &str,
    server: &Endpoint,
    t: &Topology,
) -> Option<DrainCause> {
    match role {
        ListenerRole::Primary => match router::primary(t) {
            Ok(target) if &target.endpoint == server => None,
            // Before the first read of the DCS nothing is known, so nothing is judged.
            Err(router::Unroutable::NotSynced) => None,
            routed => Some(DrainCause::PrimaryMoved {
                from: member.to_owned(),
                to: routed.ok().map(|t| t.member).or_else(|| t.leader.clone()),
            }),
        },
    }
}

/// Where a session stands in its conversation, as the relay sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// The status byte of the last ReadyForQuery (`I`, `T` or `E`).
    pub tx_status: u8,
    /// Queries and Syncs sent whose ReadyForQuery has not come back yet.
    pub in_flight: u32,
    /// Everything read from the server was written to the client, ending on a frame boundary.
    pub client_at_boundary: bool,
}

impl Progress {
    pub fn idle() -> Progress {
        Progress {
            tx_status: codes::TX_IDLE,
            in_flight: 0,
            client_at_boundary: true,
        }
    }
}

/// May the session be closed now, without cutting a response short?
pub fn may_close_now(cause: &DrainCause, p: Progress) -> bool {
    let at_rest = p.in_flight == 0 && p.client_at_boundary;
    if cause.waits_for_transaction_end() {
        at_rest && p.tx_status == codes::TX_IDLE
    } else {
        at_rest
    }
}

/// At the forced deadline: can the FATAL message still be sent cleanly? Only between frames;
/// otherwise the connection is just closed.
pub fn can_send_error(p: Progress) -> bool {
    p.client_at_boundary
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::tests::topology;

    fn ep(port: u16) -> Endpoint {
        Endpoint {
            host: "127.0.0.1".into(),
            port,
        }
    }

    #[test]
    fn sessions_on_the_leader_stay() {
        let t = topology(Some("a"), &[("a", 5001, "running"), ("b", 5002, "running")]);
        assert_eq!(drain_cause(ListenerRole::Primary, "a", &ep(5001), &t), None);
    }

    #[test]
    fn sessions_on_a_deposed_primary_drain() {
        let t = topology(Some("b"), &[("a", 5001, "running"), ("b", 5002, "running")]);
        assert_eq!(
            drain_cause(ListenerRole::Primary, "a", &ep(5001), &t),
            Some(DrainCause::PrimaryMoved {
                from: "a".into(),
                to: Some("b".into())
            })
        );
    }

    #[test]
    fn no_leader_or_a_stopped_leader_drains_too() {
        let members = [("a", 5001, "running")];
        let cause = drain_cause(
            ListenerRole::Primary,
            "a",
            &ep(5001),
            &topology(None, &members),
        );
        assert_eq!(
            cause,
            Some(DrainCause::PrimaryMoved {
                from: "a".into(),
                to: None
            })
        );
        assert!(cause.unwrap().client_message().contains("no new primary"));
        let stopped = topology(Some("a"), &[("a", 5001, "stopped")]);
        assert!(drain_cause(ListenerRole::Primary, "a", &ep(5001), &stopped).is_some());
    }

    #[test]
    fn nothing_is_judged_before_the_first_read() {
        assert_eq!(
            drain_cause(ListenerRole::Primary, "a", &ep(5001), &Topology::default()),
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
