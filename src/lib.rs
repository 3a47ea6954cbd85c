//! patroxy: a PostgreSQL-aware TCP proxy that follows the Patroni leader in etcd.
//!
//! ```text
//!   etcd ──watch──> discovery::EtcdWatcher ──Arc<Topology>──> watch channel ──┬─> admin (/topology)
//!                                                               │             └─> report (etcd lease)
//!   client ──> listener::accept_loop ──> session::serve ────────┘
//!               (allow-list, limits)      ├─ protocol::startup   first packet, SSL/GSS answer,
//!                                         │                      TLS (tls.rs, session::stream)
//!                                         ├─ session::cancel     cancel requests, key registry
//!                                         ├─ session::connect    router, server TLS, auth relay,
//!                                         │                      in_hot_standby check
//!                                         └─ session::relay      bytes both ways, frame headers
//!                                                                followed in place; drain on
//!                                                                leader change, reload or shutdown
//!   SIGHUP ──> server::Server::reload ──> new ListenerContext per listener (routes, limits, TLS)
//! ```
//!
//! Pure decisions (Patroni parsing, routing, drain policy, framing, the operator's view) have no
//! I/O and are unit-tested. `app::run` takes bound listeners, a reload channel and a shutdown
//! token, so tests run the proxy in-process on port 0.

#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod admin;
pub mod allow;
pub mod app;
pub mod config;
pub mod discovery;
pub mod limit;
pub mod listener;
pub mod metrics;
pub mod protocol;
pub mod report;
pub mod router;
pub mod server;
pub mod session;
pub mod status;
pub mod tls;
pub mod view;
