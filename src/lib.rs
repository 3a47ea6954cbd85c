//! patroxy: a PostgreSQL-aware TCP proxy that follows the Patroni leader in etcd.
//!
//! ```text
//!   etcd ──watch──> discovery::EtcdWatcher ──Arc<Topology>──> watch channels ──> state::Running
//!                     (etcd.rs: connect, reads)          │                         │
//!                                                        │          admin (/topology, /ready)
//!                                                        │          report (etcd lease)
//!   client ──> listener (bind, accept loop: allow-list, limits)
//!                └─> frontend::serve ─ negotiate   first packet, SSL/GSS answer, TLS (tls.rs)
//!                      │                session    cancel forwarded, or:
//!                      │                  └─> backend::establish   connect loop (routing),
//!                      │                        handshake: server TLS, auth relay, promotion
//!                      └─ relay   bytes both ways, frame headers followed in place (stream.rs);
//!                          drain  ends a session at a rest point (routing::drain decides)
//!   SIGHUP ──> server::Server::reload ──> new ListenerContext per listener; state::Running
//! ```
//!
//! Layers point one way: `app` wires; `server`, `admin` and `report` read and write
//! `state`; `listener` → `frontend` → `backend` → `routing` → `discovery`; `config` and
//! `policy` sit below all of them. Pure decisions (Patroni parsing, routing, the drain
//! policy, framing, the operator's view) have no I/O and are unit-tested. `app::run` takes
//! bound listeners, a reload channel and a shutdown token, so tests run the proxy in-process
//! on port 0.

#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod admin;
pub(crate) mod allow;
pub mod app;
pub(crate) mod auth;
pub(crate) mod backend;
pub(crate) mod backoff;
pub mod config;
pub mod discovery;
pub(crate) mod etcd;
pub(crate) mod frontend;
#[doc(hidden)]
pub mod fuzzing;
/// What the benchmarks (`benches/`) measure of the crate's insides. Not an API.
#[doc(hidden)]
pub mod hot {
    pub use crate::backend::cancel::CancelRegistry;
    pub use crate::backend::ServerLoad;
    pub use crate::frontend::bell::{Bell, KILLED, SHUTDOWN};
}
pub(crate) mod limit;
pub mod listener;
pub mod logline;
pub mod metrics;
pub(crate) mod peers;
pub mod policy;
pub mod protocol;
pub(crate) mod report;
pub(crate) mod routing;
pub(crate) mod server;
pub(crate) mod state;
pub mod status;
pub(crate) mod stream;
pub(crate) mod task;
pub(crate) mod throttle;
pub mod tls;
pub mod view;
pub mod workers;
