//! Wiring: one discovery watcher per cluster, the listeners, the sessions, and the order of
//! shutdown.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::admin::{Admin, AdminState};
use crate::config::{Config, ListenerConfig};
use crate::discovery::{EtcdWatcher, Topology};
use crate::listener::accept_loop;
use crate::session::{CancelRegistry, ListenerContext, ServerLoad, Shared};

/// A listener's settings with its already-bound socket.
pub struct BoundListener {
    pub config: ListenerConfig,
    pub listener: TcpListener,
}

/// Each cluster's topology, by cluster name.
pub type Topologies = HashMap<String, watch::Receiver<Arc<Topology>>>;

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

/// Runs patroxy: etcd discovery for every cluster, the admin endpoint if `admin` is given,
/// and `serve`, until `shutdown`.
pub async fn run(
    config: Arc<Config>,
    listeners: Vec<BoundListener>,
    admin: Option<Admin>,
    shutdown: CancellationToken,
) {
    // Discovery outlives the listeners: the topology may still move while sessions drain.
    let stop_discovery = CancellationToken::new();
    let background = TaskTracker::new();
    let mut topologies = Topologies::new();
    let mut watching = Vec::new();
    for cluster in &config.clusters {
        let (tx, rx) = watch::channel(Arc::new(Topology::default()));
        let watcher = EtcdWatcher::new(config.etcd.clone(), cluster);
        watching.push((cluster.name(), watcher.watching()));
        background.spawn(watcher.run(tx, stop_discovery.clone()));
        topologies.insert(cluster.name(), rx);
    }
    if let Some(admin) = admin {
        let state = Arc::new(AdminState {
            topologies: topologies.clone(),
            watching,
            metrics: admin.metrics,
        });
        background.spawn(crate::admin::serve(
            admin.listener,
            state,
            stop_discovery.clone(),
        ));
    }
    background.close();
    serve(config, listeners, topologies, shutdown).await;
    stop_discovery.cancel();
    background.wait().await;
}

/// Serves the listeners, each with its cluster's topology, until `shutdown`. Then it stops
/// accepting and drains the sessions, idle ones at once and open transactions within
/// `timeouts.shutdown`.
pub async fn serve(
    config: Arc<Config>,
    listeners: Vec<BoundListener>,
    topologies: Topologies,
    shutdown: CancellationToken,
) {
    let shared = Arc::new(Shared {
        timeouts: config.timeouts.clone(),
        cancels: CancelRegistry::default(),
        load: ServerLoad::default(),
        connections: Arc::new(Semaphore::new(config.limits.max_client_connections)),
        shutdown: shutdown.clone(),
    });
    let sessions = TaskTracker::new();
    let accepting = TaskTracker::new();
    for b in listeners {
        let cluster = config
            .cluster_of(&b.config)
            .map(|c| c.name())
            .unwrap_or_default();
        let Some(topology) = topologies.get(&cluster) else {
            warn!(listener = %b.config.name, cluster, "no topology for this listener's cluster; not serving it");
            continue;
        };
        let ctx = Arc::new(ListenerContext::new(
            &b.config,
            cluster,
            topology.clone(),
            shared.clone(),
        ));

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
