//! The listeners and their sessions: serving, configuration reloads applied whole or not at
//! all, and the order of shutdown.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::backend::{CancelRegistry, ServerLoad};

use crate::config::{Config, ListenerConfig};
use crate::frontend::bell;
use crate::frontend::context::ClientAuth;
use crate::frontend::{ListenerContext, ProxyContext};
use crate::listener::{accept_loop, bind_one, BoundListener};
use crate::state::Topologies;
use crate::tls::TlsMaterial;
use crate::view::Served;

/// The reason labels of a listener's metrics.
const REASONS: crate::metrics::Reasons = crate::metrics::Reasons {
    startup: &crate::frontend::negotiate::StartupFailure::LABELS,
    connect: &crate::backend::ConnectError::LABELS,
    drain: &crate::routing::drain::DrainCause::LABELS,
};

/// A listener being served: the address it is bound to, its settings, and how to stop it.
struct Running {
    bound: Option<std::net::SocketAddr>,
    ctx: watch::Sender<Arc<ListenerContext>>,
    /// The routing rules, for sessions already open: they drain if they no longer fit.
    policy: watch::Sender<Arc<crate::routing::Policy>>,
    stop: CancellationToken,
}

/// What the server's sessions share about servers: their load, the pools, and how pooled
/// clients are authenticated.
pub struct Backends {
    pub load: ServerLoad,
    pub pools: Arc<crate::backend::pool::Pools>,
    pub auth: crate::frontend::context::ClientAuth,
    pub cancel_tag: u16,
    pub peers: crate::peers::Peers,
    /// Asks for the configuration file to be read again (the console's RELOAD).
    pub reload_requests: Arc<tokio::sync::Notify>,
    /// Each watched cluster's link to etcd.
    pub contacts: std::collections::BTreeMap<String, Arc<crate::discovery::DcsContact>>,
    /// The relay threads new sessions are spread over.
    pub workers: crate::workers::Workers,
}

/// Where the server publishes what it runs, for the operator surfaces (`state::Running`).
pub struct Published {
    pub serving: watch::Sender<Vec<Served>>,
    pub config: watch::Sender<Arc<Config>>,
}

/// The listeners and their sessions.
pub struct Server {
    config: Arc<Config>,
    tls: TlsMaterial,
    /// The secrets pooled clients are checked against; read again on each reload.
    auth: Arc<ClientAuth>,
    topologies: Topologies,
    proxy: Arc<ProxyContext>,
    running: Vec<Running>,
    published: Published,
    sessions: TaskTracker,
    accepting: TaskTracker,
    shutdown: CancellationToken,
}

impl Server {
    pub fn new(
        config: Arc<Config>,
        tls: TlsMaterial,
        topologies: Topologies,
        backends: Backends,
        published: Published,
        shutdown: CancellationToken,
    ) -> Server {
        let proxy = Arc::new(ProxyContext {
            timeouts: config.timeouts.clone(),
            cancels: CancelRegistry::default(),
            load: backends.load,
            connections: crate::limit::Limit::new(config.limits.max_client_connections),
            shutdown: shutdown.clone(),
            wait_for_clients: CancellationToken::new(),
            pools: backends.pools,
            clients: Default::default(),
            cancel_tag: backends.cancel_tag,
            cancel_limit: crate::throttle::PerSource::new(config.limits.cancels_per_second),
            cancel_log: crate::throttle::Every::new(std::time::Duration::from_secs(10)),
            reload_requests: backends.reload_requests,
            peers: backends.peers,
            contacts: backends.contacts,
            classifier: Default::default(),
            hubs: Default::default(),
            naming: Default::default(),
            workers: backends.workers,
        });
        Server {
            config,
            tls,
            auth: Arc::new(backends.auth),
            topologies,
            proxy,
            running: Vec::new(),
            published,
            sessions: TaskTracker::new(),
            accepting: TaskTracker::new(),
            shutdown,
        }
    }

    /// A listener's context under `config`, with its cluster's topology.
    fn context(
        &self,
        l: &ListenerConfig,
        config: &Config,
        tls: &TlsMaterial,
        auth: &Arc<ClientAuth>,
    ) -> Result<ListenerContext, String> {
        let cluster = config
            .cluster_of(l)
            .ok_or_else(|| format!("listener {}: no such cluster", l.name))?;
        let topology = self.topologies.get(&cluster.name()).ok_or_else(|| {
            format!(
                "listener {}: cluster {} is not watched (restart to add clusters)",
                l.name,
                cluster.name()
            )
        })?;
        Ok(ListenerContext::new(
            l,
            cluster,
            topology.clone(),
            (tls, &config.pool, auth.clone()),
            self.proxy.clone(),
        ))
    }

    fn spawn(&mut self, b: BoundListener, mut ctx: ListenerContext) {
        let bound = b.listener.local_addr().ok();
        if let Some(a) = bound {
            ctx.listen = a.to_string();
        }
        let (policy, updates) = watch::channel(ctx.policy.clone());
        ctx.policy_updates = updates;
        crate::metrics::listener_started(&ctx.name, &REASONS);
        let name = format!("accept loop of listener {}", ctx.name);
        let (tx, rx) = watch::channel(Arc::new(ctx));
        let stop = self.shutdown.child_token();
        let (listener, sessions, until) =
            (Arc::new(b.listener), self.sessions.clone(), stop.clone());
        self.accepting
            .spawn(crate::task::supervise(name, stop.clone(), move || {
                accept_loop(
                    listener.clone(),
                    rx.clone(),
                    sessions.clone(),
                    until.clone(),
                )
            }));
        self.running.push(Running {
            bound,
            ctx: tx,
            policy,
            stop,
        });
    }

    fn publish(&self) {
        let now = self
            .running
            .iter()
            .map(|r| {
                let l = r.ctx.borrow();
                Served {
                    name: l.name.clone(),
                    listen: l.listen.clone(),
                    cluster: l.cluster.clone(),
                    policy: l.policy.clone(),
                    tls: l.tls_mode.to_string(),
                    pooled: l.pool_mode != crate::config::PoolMode::None,
                }
            })
            .collect();
        self.published.serving.send_replace(now);
        self.published.config.send_replace(self.config.clone());
    }

    /// Serves until shutdown, applying reloads. Then it stops accepting and drains the
    /// sessions, idle ones at once and open transactions within `timeouts.shutdown`.
    pub async fn serve(
        mut self,
        listeners: Vec<BoundListener>,
        mut reloads: mpsc::Receiver<Config>,
    ) {
        let (config, tls, auth) = (self.config.clone(), self.tls.clone(), self.auth.clone());
        for b in listeners {
            match self.context(&b.config, &config, &tls, &auth) {
                Ok(ctx) => self.spawn(b, ctx),
                Err(why) => warn!("{why}; not serving it"),
            }
        }
        self.publish();
        // Pooled clients hear of topology changes, reloads and shutdown through their bells.
        let ringing = self.shutdown.child_token();
        for topology in self.topologies.values() {
            let (clients, topology) = (self.proxy.clients.clone(), topology.clone());
            let (stop, shutdown) = (ringing.clone(), self.shutdown.clone());
            self.accepting.spawn(async move {
                stop.run_until_cancelled(ring_on_changes(clients, topology, shutdown))
                    .await
            });
        }
        let mut reloading = true;
        let quiesce = self.proxy.wait_for_clients.clone();
        let mut quiescing = false;
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => break,
                // SHUTDOWN WAIT_FOR_CLIENTS: no new clients, no reloads; the open sessions
                // run until their clients leave, then patroxy stops.
                _ = quiesce.cancelled(), if !quiescing => {
                    quiescing = true;
                    reloading = false;
                    for r in &self.running {
                        r.stop.cancel();
                    }
                    self.sessions.close();
                    info!(sessions = self.sessions.len(), "no longer accepting; stopping once every client has left");
                }
                _ = self.sessions.wait(), if quiescing => break,
                next = reloads.recv(), if reloading => match next {
                    Some(new) => self.reload(new).await,
                    None => reloading = false,
                },
            }
        }
        ringing.cancel();
        self.proxy.clients.ring_all(bell::SHUTDOWN);
        self.accepting.close();
        self.accepting.wait().await;
        let sessions = self.sessions;
        sessions.close();
        info!(
            sessions = sessions.len(),
            "shutting down: draining sessions"
        );
        let grace = self.config.timeouts.shutdown + Duration::from_secs(1);
        if tokio::time::timeout(grace, sessions.wait()).await.is_err() {
            warn!(
                sessions = sessions.len(),
                "sessions still open after the shutdown grace period"
            );
        }
        info!("shutdown complete");
    }

    /// Applies a new configuration, all of it or none of it: listeners whose address is
    /// unchanged take the new routing rules, limits and TLS material for new sessions; new
    /// addresses are bound; listeners no longer configured stop accepting. Open sessions run
    /// on unless the new rules exclude their server, in which case they drain as on a
    /// topology change. `[report]` moves the routing reports. Settings that need a restart
    /// (etcd, clusters, timeouts, runtime, admin) are kept as they were, with a warning.
    async fn reload(&mut self, new: Config) {
        match self.try_reload(new).await {
            Ok(summary) => {
                crate::metrics::reload("ok");
                info!(%summary, "configuration reloaded");
            }
            Err(why) => {
                crate::metrics::reload("refused");
                warn!(reason = %why, "configuration reload refused; the running configuration stays in force");
            }
        }
    }

    async fn try_reload(&mut self, new: Config) -> Result<String, String> {
        new.validate()
            .map_err(|e| e.to_string().replace('\n', " "))?;
        let tls = TlsMaterial::load(&new).await.map_err(|e| e.to_string())?;
        // The auth_file is read again even if its name did not change: users come and go.
        let running_key = Some(self.auth.mock_key);
        let auth = Arc::new(ClientAuth::load(&new.auth, running_key).await?);
        let old = &self.config;
        // A cluster's connection cap applies at once; the rest of [cluster] needs a restart.
        // What a reload applies to a cluster (new listener contexts take it) is left out.
        let uncapped = |c: &Config| {
            let mut clusters = c.clusters.clone();
            clusters.iter_mut().for_each(|c| {
                c.max_server_connections = 0;
                c.etcd_loss = Default::default();
            });
            clusters
        };
        for (what, changed) in [
            ("etcd", old.etcd != new.etcd),
            ("cluster", uncapped(old) != uncapped(&new)),
            ("timeouts", old.timeouts != new.timeouts),
            ("runtime", old.runtime != new.runtime),
            ("admin", old.admin != new.admin),
        ] {
            if changed {
                warn!("[{what}] changed: it takes effect at the next restart");
            }
        }
        // Everything that can fail comes first, so a refusal leaves nothing half done.
        let mut updates = Vec::new();
        let mut fresh = Vec::new();
        for l in &new.listeners {
            // The same address is the same listener; port 0 always asks for a new one.
            let addr = l.addr().ok().filter(|a| a.port() != 0);
            let at = self
                .running
                .iter()
                .position(|r| addr.is_some() && r.bound == addr);
            let ctx = self.context(l, &new, &tls, &auth)?;
            match at {
                Some(i) => updates.push((i, ctx)),
                None => {
                    // Timeouts change at a restart: the running ones apply.
                    let bound = bind_one(l, self.config.timeouts.tcp()).await;
                    fresh.push((bound.map_err(|e| e.to_string())?, ctx))
                }
            }
        }
        let (mut kept, mut added, mut removed) = (Vec::new(), Vec::new(), Vec::new());
        let mut keep = vec![false; self.running.len()];
        for (i, mut ctx) in updates {
            keep[i] = true;
            kept.push(ctx.name.clone());
            let r = &self.running[i];
            // The listener's open sessions stay counted against its new limit.
            let limit = r.ctx.borrow().limit.clone();
            limit.set_max(ctx.limit.max());
            ctx.limit = limit;
            if *r.policy.borrow() != ctx.policy {
                r.policy.send_replace(ctx.policy.clone());
                self.proxy.clients.ring_all(bell::CHANGED);
            }
            ctx.policy_updates = r.policy.subscribe();
            r.ctx.send_replace(Arc::new(ctx));
        }
        let mut i = 0;
        self.running.retain(|r| {
            let k = keep[i];
            i += 1;
            if !k {
                removed.push(r.ctx.borrow().name.clone());
                r.stop.cancel();
            }
            k
        });
        for (b, ctx) in fresh {
            added.push(ctx.name.clone());
            self.spawn(b, ctx);
        }
        // A lower limit refuses new clients until enough sessions have ended; none is cut.
        self.proxy
            .connections
            .set_max(new.limits.max_client_connections);
        // Pools already open take the new [pool] too (sizes, timeouts, resets).
        self.proxy.pools.configure(&new.pool);
        let o = &self.config;
        let mut clusters = o.clusters.clone();
        for (c, n) in clusters.iter_mut().zip(&new.clusters) {
            c.max_server_connections = n.max_server_connections;
        }
        self.config = Arc::new(Config {
            etcd: o.etcd.clone(),
            clusters,
            timeouts: o.timeouts.clone(),
            runtime: o.runtime.clone(),
            admin: o.admin.clone(),
            ..new
        });
        self.tls = tls;
        self.auth = auth;
        self.publish();
        Ok(format!(
            "listeners kept [{}], added [{}], removed [{}]",
            kept.join(", "),
            added.join(", "),
            removed.join(", ")
        ))
    }
}

/// Rings every pooled client's bell at each change of a cluster's topology, for the lent
/// connections whose drain it may decide; and at shutdown, at once.
async fn ring_on_changes(
    clients: crate::frontend::clients::Clients,
    mut topology: watch::Receiver<Arc<crate::discovery::Topology>>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            changed = topology.changed() => match changed {
                Ok(()) => clients.ring_all(bell::CHANGED),
                Err(_) => return,
            },
            () = shutdown.cancelled() => return clients.ring_all(bell::SHUTDOWN),
        }
    }
}
