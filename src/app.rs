//! Wiring: discovery, listeners and sessions, and the order of shutdown.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::{Config, ListenerConfig};
use crate::discovery::{EtcdWatcher, Topology};
use crate::listener::accept_loop;
use crate::session::{CancelRegistry, ListenerContext, Shared};

/// A listener's settings with its already-bound socket.
pub struct BoundListener {
    pub config: ListenerConfig,
    pub listener: TcpListener,
}

/// Binds every configured listener.
pub async fn bind(config: &Config) -> Result<Vec<BoundListener>, std::io::Error> {
    let mut out = Vec::new();
    for l in &config.listeners {
        let addr = l
            .addr()
            .map_err(|why| std::io::Error::new(std::io::ErrorKind::InvalidInput, why))?;
        let listener = TcpListener::bind(addr).await.map_err(|e| {
            std::io::Error::new(e.kind(), format!("listener {} on {addr}: {e}", l.name))
        })?;
        out.push(BoundListener {
            config: l.clone(),
            listener,
        });
    }
    Ok(out)
}

/// Runs patroxy: etcd discovery plus `serve`, until `shutdown`.
pub async fn run(config: Arc<Config>, listeners: Vec<BoundListener>, shutdown: CancellationToken) {
    let (tx, rx) = watch::channel(Arc::new(Topology::default()));
    // Discovery outlives the listeners: the topology may still move while sessions drain.
    let stop_discovery = CancellationToken::new();
    let watcher = EtcdWatcher::new(config.etcd.clone(), &config.cluster);
    let discovery = tokio::spawn(watcher.run(tx, stop_discovery.clone()));
    serve(config, listeners, rx, shutdown).await;
    stop_discovery.cancel();
    let _ = discovery.await;
}

/// Serves the listeners with topology from `topology`, until `shutdown`. Then it stops
/// accepting and drains the sessions, idle ones at once and open transactions within
/// `timeouts.shutdown`.
pub async fn serve(
    config: Arc<Config>,
    listeners: Vec<BoundListener>,
    topology: watch::Receiver<Arc<Topology>>,
    shutdown: CancellationToken,
) {
    let shared = Arc::new(Shared {
        timeouts: config.timeouts.clone(),
        topology,
        cancels: CancelRegistry::default(),
        shutdown: shutdown.clone(),
    });
    let sessions = TaskTracker::new();
    let accepting = TaskTracker::new();
    for b in listeners {
        let ctx = Arc::new(ListenerContext {
            name: b.config.name.clone(),
            role: b.config.role,
            shared: shared.clone(),
        });
        accepting.spawn(accept_loop(
            b.listener,
            ctx,
            sessions.clone(),
            shutdown.clone(),
        ));
    }
    accepting.close();
    shutdown.cancelled().await;
    accepting.wait().await;
    sessions.close();
    info!(
        sessions = sessions.len(),
        "shutting down: draining sessions"
    );
    let grace = config.timeouts.shutdown + Duration::from_secs(1);
    if tokio::time::timeout(grace, sessions.wait()).await.is_err() {
        warn!(
            sessions = sessions.len(),
            "sessions still open after the shutdown grace period"
        );
    }
    info!("shutdown complete");
}
