//! Wiring: binding, one discovery watcher and one routing report per cluster, the admin
//! endpoint, the startup summary, and the server (`server.rs`) until shutdown.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;

use crate::admin::{Admin, AdminState};
use crate::config::{Config, ListenerConfig};
use crate::discovery::{EtcdWatcher, Topology};
use crate::report::Reporter;
use crate::server::Server;
use crate::session::{ListenerContext, TlsMaterial};

/// A listener's settings with its already-bound socket.
pub struct BoundListener {
    pub config: ListenerConfig,
    pub listener: TcpListener,
}

/// Each cluster's topology, by cluster name.
pub type Topologies = HashMap<String, watch::Receiver<Arc<Topology>>>;

/// The listeners being served now, for the admin endpoint and the etcd report.
pub type Serving = watch::Receiver<Vec<Arc<ListenerContext>>>;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("{0}")]
    Tls(#[from] crate::tls::TlsError),
}

pub(crate) async fn bind_one(l: &ListenerConfig) -> Result<BoundListener, std::io::Error> {
    let addr = l
        .addr()
        .map_err(|why| std::io::Error::new(std::io::ErrorKind::InvalidInput, why))?;
    let listener = TcpListener::bind(addr).await.map_err(|e| {
        std::io::Error::new(e.kind(), format!("listener {} on {addr}: {e}", l.name))
    })?;
    Ok(BoundListener {
        config: l.clone(),
        listener,
    })
}

/// Binds every configured listener.
pub async fn bind(config: &Config) -> Result<Vec<BoundListener>, std::io::Error> {
    let mut out = Vec::new();
    for l in &config.listeners {
        out.push(bind_one(l).await?);
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
/// and the listeners, until `shutdown`. Each configuration received on `reloads` replaces
/// the listeners' settings (see `Server::reload`).
pub async fn run(
    config: Arc<Config>,
    listeners: Vec<BoundListener>,
    admin: Option<Admin>,
    reloads: mpsc::Receiver<Config>,
    shutdown: CancellationToken,
) -> Result<(), AppError> {
    let tls = TlsMaterial::load(&config)?;
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
    let (serving_tx, serving) = watch::channel(Vec::new());
    let server = Server::new(
        config.clone(),
        tls,
        topologies.clone(),
        serving_tx,
        shutdown,
    );
    let instance = config.report.instance();
    let mut reports = Vec::new();
    if config.report.enabled {
        for cluster in &config.clusters {
            let name = cluster.name();
            let key = format!("{}{instance}", config.report.cluster_prefix(&name));
            reports.push(key.clone());
            let reporter = Reporter {
                etcd: config.etcd.clone(),
                key,
                instance: instance.clone(),
                topology: topologies[&name].clone(),
                cluster: name,
                ttl: config.report.ttl,
                serving: serving.clone(),
                shared: server.shared.clone(),
            };
            background.spawn(reporter.run(stop_discovery.clone()));
        }
    }
    let admin_addr = admin.as_ref().and_then(|a| a.listener.local_addr().ok());
    if let Some(admin) = admin {
        let state = Arc::new(AdminState {
            instance: instance.clone(),
            topologies: topologies.clone(),
            watching,
            serving: serving.clone(),
            shared: server.shared.clone(),
            metrics: admin.metrics,
        });
        background.spawn(crate::admin::serve(
            admin.listener,
            state,
            stop_discovery.clone(),
        ));
    }
    let summary = Summary {
        config: config.clone(),
        topologies,
        serving,
        admin: admin_addr,
        reports,
    };
    background.spawn(summary.log(stop_discovery.clone()));
    background.close();
    server.serve(listeners, reloads).await;
    stop_discovery.cancel();
    background.wait().await;
    Ok(())
}

/// The startup summary: one line, once every cluster has been read from etcd (or after a
/// few seconds without it, saying so).
struct Summary {
    config: Arc<Config>,
    topologies: Topologies,
    serving: Serving,
    admin: Option<std::net::SocketAddr>,
    reports: Vec<String>,
}

impl Summary {
    async fn log(mut self, stop: CancellationToken) {
        let limit = self.config.etcd.dial_timeout + self.config.etcd.request_timeout;
        let synced = async {
            for rx in self.topologies.values_mut() {
                let _ = rx.wait_for(|t| t.epoch > 0).await;
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::timeout(limit, synced) => {}
        }
        info!("{}", self.line());
    }

    fn line(&self) -> String {
        let listeners: Vec<String> = self
            .serving
            .borrow()
            .iter()
            .map(|l| {
                format!(
                    "{} on {} ({}, tls {})",
                    l.name, l.listen, l.policy.role, l.tls_mode
                )
            })
            .collect();
        let clusters: Vec<String> = self
            .config
            .clusters
            .iter()
            .map(|c| {
                let t = self.topologies[&c.name()].borrow().clone();
                let state = match (t.epoch, crate::router::primary(&t)) {
                    (0, _) => "not read from etcd yet".to_owned(),
                    (_, Ok(p)) => format!("leader {} at {}", p.member, p.endpoint),
                    (_, Err(why)) => format!("no routable primary ({why})"),
                };
                format!(
                    "{} ({}): {state}, {} member(s)",
                    c.name(),
                    c.prefix(),
                    t.members.len()
                )
            })
            .collect();
        let mut line = format!(
            "patroxy {} serving: listeners {}; etcd {}; cluster {}",
            crate::view::VERSION,
            listeners.join(", "),
            self.config.etcd.endpoints.join(","),
            clusters.join("; ")
        );
        if let Some(a) = self.admin {
            line.push_str(&format!("; admin http://{a}"));
        }
        if !self.reports.is_empty() {
            line.push_str(&format!("; report {}", self.reports.join(", ")));
        }
        line
    }
}
