//! Why a client could not be given a server, what the client is told, and the metric label.

use std::time::Duration;

use crate::protocol::codes;
use crate::protocol::frame::FrameError;
use crate::protocol::messages::ErrorFields;
use crate::routing::ListenerRole;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("no {role} server after waiting {waited:?}: {why}")]
    NoServer {
        role: ListenerRole,
        waited: Duration,
        why: String,
    },
    #[error("the client closed the connection while it was being connected")]
    ClientGone,
    #[error("client: {0}")]
    ClientIo(std::io::Error),
    #[error("client: {0}")]
    ClientProtocol(FrameError),
    #[error("server {server}: {source}")]
    ServerIo {
        server: String,
        source: std::io::Error,
    },
    #[error("server {server}: {why}")]
    ServerProtocol { server: String, why: String },
    /// The server's own error went to the client as it was.
    #[error("server {server} refused: {} {}", .fields.sqlstate, .fields.message)]
    Refused { server: String, fields: ErrorFields },
    #[error("{member} stopped being a {role} server while the client was authenticating")]
    ChangedDuringAuth { member: String, role: ListenerRole },
    #[error("authentication did not finish within {0:?}")]
    AuthTimeout(Duration),
}

impl ConnectError {
    /// Every `label()`, for metrics exported at zero before their first event.
    pub const LABELS: [&'static str; 9] = [
        "no_server",
        "client_gone",
        "client_error",
        "client_protocol",
        "server_error",
        "server_protocol",
        "server_refused",
        "changed_during_auth",
        "auth_timeout",
    ];

    /// A short label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            ConnectError::NoServer { .. } => "no_server",
            ConnectError::ClientGone => "client_gone",
            ConnectError::ClientIo(_) => "client_error",
            ConnectError::ClientProtocol(_) => "client_protocol",
            ConnectError::ServerIo { .. } => "server_error",
            ConnectError::ServerProtocol { .. } => "server_protocol",
            ConnectError::Refused { .. } => "server_refused",
            ConnectError::ChangedDuringAuth { .. } => "changed_during_auth",
            ConnectError::AuthTimeout(_) => "auth_timeout",
        }
    }

    /// The ErrorResponse the client should still receive, if any.
    pub fn client_error(&self) -> Option<(&'static str, String)> {
        match self {
            ConnectError::NoServer { .. } => Some((
                codes::CANNOT_CONNECT_NOW,
                format!("patroxy: {self}; retry later"),
            )),
            ConnectError::ChangedDuringAuth { .. } => {
                Some((codes::ADMIN_SHUTDOWN, format!("patroxy: {self}; reconnect")))
            }
            ConnectError::ServerIo { .. } | ConnectError::ServerProtocol { .. } => {
                Some((codes::CONNECTION_FAILURE, format!("patroxy: {self}")))
            }
            ConnectError::AuthTimeout(_) | ConnectError::ClientProtocol(_) => {
                Some((codes::PROTOCOL_VIOLATION, format!("patroxy: {self}")))
            }
            ConnectError::ClientGone | ConnectError::ClientIo(_) | ConnectError::Refused { .. } => {
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_has_its_label_listed() {
        let io = || std::io::Error::other("x");
        let server = || "s".to_owned();
        let all = [
            ConnectError::NoServer {
                role: ListenerRole::Primary,
                waited: Duration::ZERO,
                why: String::new(),
            },
            ConnectError::ClientGone,
            ConnectError::ClientIo(io()),
            ConnectError::ClientProtocol(FrameError::TooShort { tag: 'p', len: 0 }),
            ConnectError::ServerIo {
                server: server(),
                source: io(),
            },
            ConnectError::ServerProtocol {
                server: server(),
                why: String::new(),
            },
            ConnectError::Refused {
                server: server(),
                fields: ErrorFields::default(),
            },
            ConnectError::ChangedDuringAuth {
                member: server(),
                role: ListenerRole::Primary,
            },
            ConnectError::AuthTimeout(Duration::ZERO),
        ];
        let labels: Vec<_> = all.iter().map(ConnectError::label).collect();
        assert_eq!(labels, ConnectError::LABELS);
    }

    #[test]
    fn client_errors_carry_fitting_sqlstates() {
        let e = ConnectError::NoServer {
            role: ListenerRole::Primary,
            waited: Duration::from_secs(1),
            why: "the cluster has no leader".into(),
        };
        let (code, msg) = e.client_error().unwrap();
        assert_eq!(code, "57P03");
        assert!(msg.contains("no leader"), "{msg}");
        let moved = ConnectError::ChangedDuringAuth {
            member: "a".into(),
            role: ListenerRole::Replica,
        };

        assert_eq!(moved.client_error().unwrap().0, "57P01");
        assert!(ConnectError::ClientGone.client_error().is_none());
        let refused = ConnectError::Refused {
            server: "x".into(),
            fields: ErrorFields::default(),
        };
        assert!(
            refused.client_error().is_none(),
            "the server's own error was passed on"
        );
    }
}
