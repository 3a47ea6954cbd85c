//! The server side of the proxy: getting a client a server connection (the connect loop in
//! `connect.rs`, the handshake with one server in `handshake.rs`), per-server load and
//! ejections, cancel requests delivered to servers, and for pooled listeners the server
//! connections patroxy authenticates itself (`conn.rs`), the session state they carry
//! (`session.rs`), their pools (`pool.rs`), how a client gets one (`checkout.rs`), and the
//! listening connections that carry transaction-pooled clients' `LISTEN`s (`notify.rs`).

pub mod cancel;
pub mod checkout;
pub mod conn;
pub mod connect;
pub mod error;
pub mod handshake;
pub mod load;
pub mod notify;
pub mod pool;
pub mod session;

use bytes::BytesMut;

pub use cancel::CancelRegistry;
pub use connect::{establish, ConnectParams};
pub use error::ConnectError;
pub use load::{LoadGuard, ServerLoad};

use crate::protocol::startup::CancelKey;
use crate::routing::Target;
use crate::stream::Stream;

/// A server connection ready to relay, its greeting already passed to the client.
#[derive(Debug)]
pub struct Backend {
    pub stream: Stream,
    pub target: Target,
    pub key: Option<CancelKey>,
    /// Server bytes read past the first ReadyForQuery (asynchronous notices), for the relay.
    pub leftover: BytesMut,
    /// Bytes relayed during startup and authentication: client to server, server to client.
    pub bytes_up: u64,
    pub bytes_down: u64,
}
