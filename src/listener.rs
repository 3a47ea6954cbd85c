//! The accept loop: one per listener, spawning a session per client on the shared tracker,
//! backing off on accept errors (EMFILE among them) instead of spinning.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::session::{self, ListenerContext};

const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Accepts until `stop`, then returns; the sessions it spawned live on in `tracker`.
pub async fn accept_loop(
    listener: TcpListener,
    ctx: Arc<ListenerContext>,
    tracker: TaskTracker,
    stop: CancellationToken,
) {
    let addr = listener.local_addr().ok();
    info!(listener = %ctx.name, cluster = %ctx.cluster, role = %ctx.policy.role, addr = ?addr, "listening");
    let mut backoff = ACCEPT_BACKOFF_MIN;
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = ACCEPT_BACKOFF_MIN;
                tracker.spawn(session::serve(stream, peer, ctx.clone()));
            }
            Err(e) => {
                // Out of file descriptors, or a connection reset before accept: wait, retry.
                warn!(listener = %ctx.name, error = %e, pause = ?backoff, "accept failed");
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
            }
        }
    }
    info!(listener = %ctx.name, "stopped accepting");
}
