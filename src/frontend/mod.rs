//! The client side of the proxy, one file per phase of a session: where it runs
//! (`context.rs`), negotiation up to the first packet (`negotiate.rs`), the session driver
//! (`session.rs`), the relay (`relay.rs`) and its drain control (`drain.rs`); for pooled
//! listeners, the login (`pooled.rs`, `client_auth.rs`), the session that borrows server
//! connections (`borrower.rs`), each loan (`loan.rs`), and replication connections, never
//! pooled (`replication.rs`). The server side is `backend/`.

pub mod bell;
pub mod borrower;
pub mod client_auth;
pub mod clients;
pub mod console;
pub mod context;
pub mod drain;
pub mod listening;
pub mod loan;
pub mod negotiate;
pub mod pooled;
pub mod relay;
pub mod replication;
pub mod rewrite;
pub mod session;

pub use context::{ListenerContext, ProxyContext};
pub use session::serve;
