//! Wiring: one supervised discovery watcher and routing reporter per cluster, the admin
//! endpoint, the startup summary, and the server (`server.rs`) until shutdown. Nothing is
//! decided here.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;

use crate::admin::{Admin, AdminState};
use crate::backend::pool::Pools;
use crate::backend::ServerLoad;
use crate::config::{ClusterConfig, Config, Dcs};
use crate::discovery::rest::RestPoller;
use crate::discovery::zookeeper::ZkWatcher;
use crate::discovery::{DcsContact, EtcdWatcher, Topology};
use crate::etcd::Etcd;
use crate::frontend::context::ClientAuth;
use crate::listener::BoundListener;
use crate::report::Reporter;
use crate::server::{Backends, Published, Server};
use crate::state::{Running, Serving, Topologies};
use crate::task::supervise;
use crate::tls::TlsMaterial;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("{0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("{0}")]
    Etcd(#[from] crate::etcd::EtcdError),
    #[error("{0}")]
    Auth(String),
}

/// How the running proxy gets new configurations: the configurations themselves (SIGHUP
/// reads the file and sends one), and requests to read the file again (the console's
/// RELOAD), for whoever reads it.
pub struct Reloads {
    pub configs: mpsc::Receiver<Config>,
    pub requests: Arc<tokio::sync::Notify>,
}

/// Runs patroxy: etcd discovery for every cluster, the admin endpoint if `admin` is given,
/// and the listeners, until `shutdown`. Each configuration received on `reloads` replaces
/// the listeners' settings (see `Server::reload`).
pub async fn run(
    config: Arc<Config>,
    listeners: Vec<BoundListener>,
    admin: Option<Admin>,
    reloads: Reloads,
    workers: crate::workers::Workers,
    shutdown: CancellationToken,
) -> Result<(), AppError> {
    for w in config.warnings() {
        tracing::warn!("configuration: {w}");
    }
    let tls = TlsMaterial::load(&config).await?;
    let etcd = Etcd::new(&config.etcd).await?;
    let auth = ClientAuth::load(&config.auth, None)
        .await
        .map_err(AppError::Auth)?;
    crate::metrics::started();
    // Discovery outlives the listeners: the topology may still move while sessions drain.
    let stop_background = CancellationToken::new();
    let background = TaskTracker::new();
    let mut topologies = Topologies::new();
    let mut contacts = BTreeMap::new();
    for cluster in &config.clusters {
        let name = cluster.name();
        crate::metrics::cluster_started(&name, cluster.dcs.as_str());
        let (tx, rx) = watch::channel(Arc::new(Topology::default()));
        let contact = Arc::new(DcsContact::new(cluster.dcs));
        contacts.insert(name.clone(), Arc::clone(&contact));
        let source = Source::new(cluster, &etcd, contact)?;
        let stop = stop_background.clone();
        let (task, tx) = (
            format!("{} source of cluster {name}", cluster.dcs.as_str()),
            Arc::new(tx),
        );
        background.spawn(supervise(task, stop.clone(), move || {
            source.clone().run(tx.clone(), stop.clone())
        }));
        topologies.insert(name, rx);
    }
    let (serving_tx, serving) = watch::channel(Vec::new());
    let (config_tx, running_config) = watch::channel(config.clone());
    let load = ServerLoad::default();
    let pools = Arc::new(Pools::default());
    pools.configure(&config.pool);
    let cancel_tag = crate::backend::cancel::new_tag();
    // The peers' cancel routes, followed with one watch of their reports.
    let peers = crate::peers::Peers::default();
    let running = Running {
        default_instance: crate::config::ReportConfig::default_instance(),
        topologies: topologies.clone(),
        contacts,
        serving: serving.clone(),
        load: load.clone(),
        config: running_config,
        pools: pools.clone(),
        cancel_tag,
        peers: peers.clone(),
    };
    let published = Published {
        serving: serving_tx,
        config: config_tx,
    };
    // The peers' reports live in etcd: with no etcd in use, there are none to follow.
    if config.uses_etcd() {
        let (etcd, config, stop) = (
            etcd.clone(),
            running.config.clone(),
            stop_background.clone(),
        );
        let p = peers.clone();
        background.spawn(supervise("peer reports".into(), stop.clone(), move || {
            p.clone().follow(etcd.clone(), config.clone(), stop.clone())
        }));
    }
    let backends = Backends {
        load,
        pools: pools.clone(),
        auth,
        reload_requests: reloads.requests,
        cancel_tag,
        peers: peers.clone(),
        contacts: running.contacts.clone(),
        workers,
    };
    let server = Server::new(
        config.clone(),
        tls,
        topologies.clone(),
        backends,
        published,
        shutdown,
    );
    {
        let watched: Vec<_> = topologies.values().cloned().collect();
        let stop = stop_background.clone();
        background.spawn(supervise("pool reaper".into(), stop.clone(), move || {
            crate::backend::pool::reap(pools.clone(), watched.clone(), stop.clone())
        }));
    }
    for cluster in &config.clusters {
        let (name, etcd, running) = (cluster.name(), etcd.clone(), running.clone());
        let stop = stop_background.clone();
        let task = format!("routing report of cluster {name}");
        background.spawn(supervise(task, stop.clone(), move || {
            let reporter = Reporter {
                etcd: etcd.clone(),
                cluster: name.clone(),
                running: running.clone(),
            };
            reporter.run(stop.clone())
        }));
    }
    let admin_addr = admin.as_ref().and_then(|a| a.listener.local_addr().ok());
    if let Some(admin) = admin {
        let state = Arc::new(AdminState {
            running: running.clone(),
            metrics: admin.metrics,
        });
        let (listener, stop) = (Arc::new(admin.listener), stop_background.clone());
        background.spawn(supervise(
            "admin endpoint".into(),
            stop.clone(),
            move || crate::admin::serve(listener.clone(), state.clone(), stop.clone()),
        ));
    }
    let summary = Summary {
        config: config.clone(),
        topologies,
        serving,
        admin: admin_addr,
        reports: match config.report.enabled {
            true => config
                .clusters
                .iter()
                .map(|c| {
                    format!(
                        "{}{}",
                        config.report.cluster_prefix(&c.name()),
                        running.instance()
                    )
                })
                .collect(),
            false => Vec::new(),
        },
    };
    background.spawn(summary.log(stop_background.clone()));
    background.close();
    server.serve(listeners, reloads.configs).await;
    stop_background.cancel();
    background.wait().await;
    Ok(())
}

/// What reads one cluster's topology, as its `dcs` says; started again after a panic.
#[derive(Clone)]
enum Source {
    Etcd(Etcd, String, String, Arc<DcsContact>),
    Zookeeper(ClusterConfig, Arc<DcsContact>),
    Rest(ClusterConfig, Arc<DcsContact>),
}

impl Source {
    fn new(c: &ClusterConfig, etcd: &Etcd, contact: Arc<DcsContact>) -> Result<Source, AppError> {
        Ok(match c.dcs {
            Dcs::Etcd => Source::Etcd(etcd.clone(), c.name(), c.prefix(), contact),
            Dcs::Zookeeper => Source::Zookeeper(c.clone(), contact),
            Dcs::Rest => {
                // The TLS files are read now, so that a bad one stops patroxy at start.
                RestPoller::new(c.name(), c.scope.clone(), c.rest.clone(), contact.clone())?;
                Source::Rest(c.clone(), contact)
            }
        })
    }

    async fn run(self, tx: Arc<watch::Sender<Arc<Topology>>>, stop: CancellationToken) {
        match self {
            Source::Etcd(etcd, name, prefix, contact) => {
                EtcdWatcher::new(etcd, name, prefix, contact)
                    .run(tx, stop)
                    .await
            }
            Source::Zookeeper(c, contact) => {
                ZkWatcher::new(c.name(), c.prefix(), c.zookeeper.clone(), contact)
                    .run(tx, stop)
                    .await
            }
            Source::Rest(c, contact) => {
                match RestPoller::new(c.name(), c.scope.clone(), c.rest.clone(), contact) {
                    Ok(poller) => poller.run(tx, stop).await,
                    Err(e) => {
                        tracing::error!(cluster = %c.name(), error = %e, "cannot poll Patroni's REST API")
                    }
                }
            }
        }
    }
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
                    l.name, l.listen, l.policy.role, l.tls
                )
            })
            .collect();
        let clusters: Vec<String> = self
            .config
            .clusters
            .iter()
            .map(|c| {
                let t = self.topologies[&c.name()].borrow().clone();
                let state = match (t.epoch, crate::routing::primary(&t)) {
                    (0, _) => format!("not read from {} yet", c.dcs.describe()),
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
