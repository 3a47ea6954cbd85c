//! The client side of the proxy, one file per phase of a session: where it runs
//! (`context.rs`), negotiation up to the first packet (`negotiate.rs`), the session driver
//! (`session.rs`), the relay (`relay.rs`) and its drain control (`drain.rs`). The server
//! side is `backend/`.

pub mod client_auth;
pub mod clients;
pub mod console;
pub mod context;
pub mod drain;
pub mod moving;
pub mod negotiate;
pub mod pooled;
pub mod relay;
pub mod rewrite;
pub mod session;

pub use context::{ListenerContext, ProxyContext};
pub use session::serve;
