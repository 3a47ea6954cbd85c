//! Listeners: binding them from the configuration, and the accept loop, one per listener,
//! which checks the allow-list and the limits and spawns a session per client on the shared
//! tracker, backing off on accept errors (EMFILE among them) instead of spinning.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::backoff::Backoff;
use crate::config::{Config, ListenerConfig};
use crate::frontend::{self, ListenerContext};
use crate::protocol::codes;
use crate::protocol::messages::{self, Severity};

/// A listener's settings with its already-bound socket.
pub struct BoundListener {
    pub config: ListenerConfig,
    pub listener: TcpListener,
}

/// Binds one listener; the error names it and its address.
pub async fn bind_one(
    l: &ListenerConfig,
    tcp: crate::stream::TcpOptions,
) -> Result<BoundListener, std::io::Error> {
    let addr = l
        .addr()
        .map_err(|why| std::io::Error::new(std::io::ErrorKind::InvalidInput, why))?;
    let listener = TcpListener::bind(addr).await.map_err(|e| {
        std::io::Error::new(e.kind(), format!("listener {} on {addr}: {e}", l.name))
    })?;
    // Accepted connections inherit the listening socket's options.
    crate::stream::tune_socket(&listener, tcp);
    Ok(BoundListener {
        config: l.clone(),
        listener,
    })
}

/// Binds every configured listener.
pub async fn bind(config: &Config) -> Result<Vec<BoundListener>, std::io::Error> {
    let mut out = Vec::new();
    for l in &config.listeners {
        out.push(bind_one(l, config.timeouts.tcp()).await?);
    }
    Ok(out)
}

/// Binds the admin endpoint, if one is configured.
pub async fn bind_admin(config: &Config) -> Result<Option<TcpListener>, std::io::Error> {
    let Some(listen) = &config.admin.listen else {
        return Ok(None);
    };
    TcpListener::bind(listen)
        .await
        .map(Some)
        .map_err(|e| std::io::Error::new(e.kind(), format!("admin endpoint on {listen}: {e}")))
}

const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Accepts until `stop`, then returns; the sessions it spawned live on in `tracker`.
pub async fn accept_loop(
    listener: Arc<TcpListener>,
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
    let mut backoff = Backoff::new(ACCEPT_BACKOFF_MIN, ACCEPT_BACKOFF_MAX);
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff.reset();
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
                let global = ctx.proxy.connections.try_claim();
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
                let workers = ctx.proxy.workers.clone();
                workers.spawn(&tracker, stream, move |stream| async move {
                    let _permits = (global, local);
                    frontend::serve(stream, peer, ctx).await;
                });
            }
            Err(e) => {
                // Out of file descriptors, or a connection reset before accept: wait, retry.
                let pause = backoff.next_pause();
                warn!(listener = %name, error = %e, ?pause, "accept failed");
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(pause) => {}
                }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_connections_get_nodelay_keepalive_and_user_timeout_from_the_listener() {
        let config = ListenerConfig {
            listen: "127.0.0.1:0".into(),
            ..ListenerConfig::default()
        };
        let bound = bind_one(&config, Default::default()).await.unwrap();
        let addr = bound.listener.local_addr().unwrap();
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = bound.listener.accept().await.unwrap();
        let s = socket2::SockRef::from(&accepted);
        assert!(s.tcp_nodelay().unwrap());
        assert!(s.keepalive().unwrap());
        assert_eq!(
            s.tcp_keepalive_time().unwrap(),
            std::time::Duration::from_secs(30)
        );
        // And TCP_USER_TIMEOUT: a client that stops acknowledging is given up on.
        assert_eq!(
            s.tcp_user_timeout().unwrap(),
            Some(std::time::Duration::from_secs(30))
        );
    }
}
