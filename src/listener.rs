//! The accept loop: one per listener, spawning a session per client on the shared tracker,
//! backing off on accept errors (EMFILE among them) instead of spinning.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::protocol::codes;
use crate::protocol::messages::{self, Severity};
use crate::session::{self, ListenerContext};

const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Accepts until `stop`, then returns; the sessions it spawned live on in `tracker`.
pub async fn accept_loop(
    listener: TcpListener,
    settings: watch::Receiver<Arc<ListenerContext>>,
    tracker: TaskTracker,
    stop: CancellationToken,
) {
    let addr = listener.local_addr().ok();
    let name = settings.borrow().name.clone();
    {
        let ctx = settings.borrow();
        info!(listener = %ctx.name, cluster = %ctx.cluster, role = %ctx.policy.role, tls = %ctx.tls_mode, addr = ?addr, "listening");
    }
    let mut backoff = ACCEPT_BACKOFF_MIN;
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = ACCEPT_BACKOFF_MIN;
                // The settings of the moment: a reload applies from the next client on.
                let ctx = settings.borrow().clone();
                if !crate::allow::allowed(&ctx.allow, peer.ip()) {
                    warn!(client = %peer, listener = %ctx.name, "client address not allowed");
                    crate::metrics::refused(&ctx.name, "not_allowed");
                    let msg = format!(
                        "patroxy: connections from {} are not allowed on this listener",
                        peer.ip()
                    );
                    refuse(&stream, codes::INVALID_AUTHORIZATION, &msg);
                    continue;
                }
                // Claims move into the session task and are released however it ends.
                let global = ctx.shared.connections.try_claim();
                let local = ctx.limit.try_claim();
                let (Some(global), Some(local)) = (global, local) else {
                    warn!(client = %peer, listener = %ctx.name, "connection limit reached; client refused");
                    crate::metrics::refused(&ctx.name, "limit");

                    refuse(
                        &stream,
                        codes::TOO_MANY_CONNECTIONS,
                        "sorry, too many clients already (patroxy)",
                    );
                    continue;
                };
                tracker.spawn(async move {
                    let _permits = (global, local);
                    session::serve(stream, peer, ctx).await;
                });
            }
            Err(e) => {
                // Out of file descriptors, or a connection reset before accept: wait, retry.
                warn!(listener = %name, error = %e, pause = ?backoff, "accept failed");
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
            }
        }
    }
    info!(listener = %name, "stopped accepting");
}

/// Refuses a client with a FATAL error, without a task: one non-blocking write into an empty
/// socket buffer, then close. A flood of refusals costs no memory.
fn refuse(stream: &tokio::net::TcpStream, sqlstate: &str, message: &str) {
    let _ = stream.try_write(&messages::error_response(
        Severity::Fatal,
        sqlstate,
        message,
    ));
}
