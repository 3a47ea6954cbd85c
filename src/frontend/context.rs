//! What a session knows of where it runs: its listener (`ListenerContext`: name, routing
//! rules, topology, limits, TLS) and what every session of every listener shares
//! (`ProxyContext`: timeouts, the cancel-key registry, server load, the global connection
//! limit, shutdown).

use std::collections::HashMap;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::allow::Cidr;
use crate::auth::scram::{self, Verifier};
use crate::auth::userlist::{self, Secret};
use crate::backend::pool::Pools;
use crate::backend::{CancelRegistry, ServerLoad};
use crate::config::{
    AuthConfig, ClientTlsMode, ClusterConfig, EtcdLoss, ListenerConfig, PoolConfig, PoolMode,
    Timeouts,
};
use crate::discovery::{DcsContact, Topology};
use crate::limit::Limit;
use crate::routing::Policy;
use crate::tls::{ServerTls, TlsMaterial};

/// What every session of every listener shares.
pub struct ProxyContext {
    pub timeouts: Timeouts,
    pub cancels: CancelRegistry,
    pub load: ServerLoad,
    /// Client connections across all listeners (`limits.max_client_connections`).
    pub connections: Arc<Limit>,
    pub shutdown: CancellationToken,
    /// `SHUTDOWN WAIT_FOR_CLIENTS`: stop accepting, and stop once the clients have left.
    pub wait_for_clients: CancellationToken,
    /// Server connection pools, for pooled listeners.
    pub pools: Arc<Pools>,
    /// The pooled clients connected now (the console's SHOW CLIENTS and KILL).
    pub clients: super::clients::Clients,
    /// The tag in the pids of this instance's cancel keys.
    pub cancel_tag: u16,
    /// Cancel requests per source (`limits.cancels_per_second`), and the line that says
    /// how many were dropped.
    pub cancel_limit: crate::throttle::PerSource,
    pub cancel_log: crate::throttle::Every,
    /// Asks for the configuration file to be read again (the console's RELOAD).
    pub reload_requests: Arc<tokio::sync::Notify>,
    /// The other instances, for cancel keys they issued.
    pub peers: crate::peers::Peers,
    /// Each watched cluster's link to etcd, by cluster name.
    pub contacts: std::collections::BTreeMap<String, Arc<DcsContact>>,
    /// What statements do to their sessions (transaction pooling), with its cache.
    pub classifier: crate::protocol::classify::Classifier,
    /// The listening connections of transaction-pooled clients' LISTENs.
    pub hubs: crate::backend::notify::Hubs,
    /// How clients' named statements are named on the servers.
    pub naming: crate::protocol::prepared::Naming,
    /// The relay threads new sessions are spread over.
    pub workers: crate::workers::Workers,
}

/// How pooled listeners authenticate clients: the `auth_file` users, and the addresses
/// trusted without a password.
#[derive(Debug)]
pub struct ClientAuth {
    pub users: HashMap<String, Secret>,
    /// The verifiers of the file's password users, made once when the file is read (with
    /// their mock salt): no login runs PBKDF2.
    pub verifiers: HashMap<String, Verifier>,
    /// What mock salts are made under (`auth.salt_key`, or random per process).
    pub mock_key: [u8; 32],
    pub trust: Vec<Cidr>,
    /// Let into the admin console without a password (`auth.console_trust`).
    pub console_trust: Vec<Cidr>,
    /// For users not in the file: who asks PostgreSQL, and what (`$1` is the user name).
    pub auth_user: Option<String>,
    pub auth_query: String,
    pub auth_dbname: String,
    /// `auth_query` answers, kept a while; and how many lookups may run at once.
    pub lookups: crate::auth::cache::Lookups,
    pub lookup_slots: tokio::sync::Semaphore,
    /// Lookups of names not yet known, per source (`LOOKUPS_PER_SOURCE` a second).
    pub lookup_budget: crate::throttle::PerSource,
    /// Who may use the admin console, and who only read it.
    pub admin_users: Vec<String>,
    pub stats_users: Vec<String>,
}

impl ClientAuth {
    /// Reads `[auth]`'s file on a blocking thread. `salt_key`: the key mock salts are made
    /// under when `auth.salt_key` gives none (the running one, on a reload).
    pub async fn load(
        config: &AuthConfig,
        salt_key: Option<[u8; 32]>,
    ) -> Result<ClientAuth, String> {
        // Never from the file's secrets: a salt anyone can ask for would let them test
        // guesses of the whole file offline.
        let mock_key = match &config.salt_key {
            Some(k) => scram::mock_key(k.expose().as_bytes()),
            None => salt_key.unwrap_or_else(|| scram::mock_key(&[])),
        };
        let (file, trust) = (config.auth_file.clone(), config.trust.clone());
        let (users, verifiers) = tokio::task::spawn_blocking(move || {
            let users = match file {
                None => HashMap::new(),
                Some(path) => {
                    let text = std::fs::read_to_string(&path)
                        .map_err(|e| format!("auth.auth_file {}: {e}", path.display()))?;
                    userlist::parse(&text).map_err(|e| format!("{}: {e}", path.display()))?
                }
            };
            let verifiers = derive_verifiers(&users, &mock_key);
            Ok::<_, String>((users, verifiers))
        })
        .await
        .map_err(|e| e.to_string())??;
        Ok(ClientAuth {
            users,
            verifiers,
            mock_key,
            trust,
            console_trust: config.console_trust.clone(),
            auth_user: config.auth_user.clone(),
            auth_query: config.auth_query.clone(),
            auth_dbname: config.auth_dbname.clone(),
            lookups: Default::default(),
            lookup_slots: tokio::sync::Semaphore::new(LOOKUPS_AT_ONCE),
            lookup_budget: crate::throttle::PerSource::new(LOOKUPS_PER_SOURCE),
            admin_users: config.admin_users.clone(),
            stats_users: config.stats_users.clone(),
        })
    }
}

/// `auth_query` lookups running at once: they come before any proof, so a flood of
/// unknown names costs PostgreSQL at most this many queries in flight.
pub const LOOKUPS_AT_ONCE: usize = 4;
/// `auth_query` lookups a second one source may cause (in bursts of twice that); past it
/// a name not looked up fails as a wrong password.
pub const LOOKUPS_PER_SOURCE: u32 = 20;

/// The verifier of each password user of the file, under its mock salt.
fn derive_verifiers(users: &HashMap<String, Secret>, key: &[u8; 32]) -> HashMap<String, Verifier> {
    users
        .iter()
        .filter_map(|(user, secret)| match secret {
            Secret::Plain(p) => {
                let salt = scram::mock_salt(user, key);
                let v = Verifier::from_password(p, &salt, scram::MOCK_ITERATIONS);
                Some((user.clone(), v))
            }
            _ => None,
        })
        .collect()
}

/// A listener: its name, its routing rules, its cluster's topology, and the shared state.
pub struct ListenerContext {
    pub name: String,
    /// The address it listens on.
    pub listen: String,
    pub cluster: String,
    pub policy: Arc<Policy>,
    /// The rules reloads give this listener later, for sessions opened under older ones.
    pub policy_updates: watch::Receiver<Arc<Policy>>,
    pub topology: watch::Receiver<Arc<Topology>>,
    /// Advances once per new session; balancing takes turns with it.
    pub turn: AtomicUsize,
    /// This listener's own connection limit (unbounded without one); it counts the
    /// listener's connections across reloads.
    pub limit: Arc<Limit>,
    /// Client addresses allowed; empty allows all.
    pub allow: Vec<Cidr>,
    pub tls_mode: ClientTlsMode,
    /// Present unless `tls_mode` is `disable`.
    pub tls: Option<TlsAcceptor>,
    pub server_tls: ServerTls,
    pub pool_mode: PoolMode,
    /// The cluster's cap on pooled connections per member (0: none).
    pub max_server_connections: usize,
    /// `[pool]` as of this context (reloads make new contexts).
    pub pool: PoolConfig,
    /// The secrets pooled clients are checked against, as of this context.
    pub auth: Arc<ClientAuth>,
    /// The cluster's link to etcd, and what new primary connections do when it is lost.
    pub etcd: Arc<DcsContact>,
    pub etcd_loss: EtcdLoss,
    pub proxy: Arc<ProxyContext>,
    /// The listener's checkout figures.
    pub pool_metrics: crate::metrics::PoolMetrics,
    /// Its sessions' figures.
    pub session_metrics: crate::metrics::SessionMetrics,
}

impl ListenerContext {
    pub fn new(
        config: &ListenerConfig,
        cluster: &ClusterConfig,
        topology: watch::Receiver<Arc<Topology>>,
        (tls, pool, auth): (&TlsMaterial, &PoolConfig, Arc<ClientAuth>),
        proxy: Arc<ProxyContext>,
    ) -> ListenerContext {
        let limit = config.max_client_connections;
        let policy = Arc::new(config.policy());
        let session_metrics = crate::metrics::SessionMetrics::of(
            &config.name,
            policy.role.as_str(),
            &super::relay::End::LABELS,
        );
        // `validate()` makes sure a mode other than disable has a certificate.
        let tls_mode = config.tls_mode(tls.acceptor.is_some());
        ListenerContext {
            name: config.name.clone(),
            listen: config.listen.clone(),
            cluster: cluster.name(),
            policy: policy.clone(),
            // Nothing updates a context on its own; the server connects it to reloads.
            policy_updates: watch::channel(policy).1,
            topology,
            turn: AtomicUsize::new(0),
            limit: Limit::new(if limit > 0 { limit } else { usize::MAX }),
            allow: config.allow.clone(),
            tls_mode,
            tls: (tls_mode != ClientTlsMode::Disable)
                .then(|| tls.acceptor.clone())
                .flatten(),
            server_tls: tls.server.clone(),
            pool_mode: config.pool_mode,
            max_server_connections: cluster.max_server_connections,
            pool: pool.clone(),
            auth,
            etcd: proxy
                .contacts
                .get(&cluster.name())
                .cloned()
                .unwrap_or_default(),
            etcd_loss: cluster.etcd_loss,
            proxy,
            pool_metrics: crate::metrics::PoolMetrics::of(&config.name),
            session_metrics,
        }
    }

    /// How this listener lends pooled server connections.
    pub fn lender(&self) -> crate::backend::checkout::Lender<'_> {
        crate::backend::checkout::Lender {
            listener: &self.name,
            metrics: &self.pool_metrics,
            policy: &self.policy,
            pools: &self.proxy.pools,
            settings: &self.pool,
            caps: crate::backend::pool::Caps {
                per_server: self.max_server_connections,
                per_database: self.pool.max_db_connections,
            },
            server_tls: &self.server_tls,
            timeouts: &self.proxy.timeouts,
            load: &self.proxy.load,
            turn: &self.turn,
            etcd: &self.etcd,
            etcd_loss: self.etcd_loss,
            last_pool: None,
        }
    }

    /// Why a new connection is refused for want of the DCS, if it is: a polled snapshot too
    /// old to route by (every role), or `etcd_loss = "fail-closed"` (primary listeners).
    pub fn etcd_refusal(&self, t: &Topology) -> Option<String> {
        let silent = self.etcd.silent_for();
        if let Some(why) = crate::routing::etcd_loss::unknown(t, silent) {
            return Some(why);
        }
        if self.policy.role != crate::routing::ListenerRole::Primary {
            return None;
        }
        crate::routing::etcd_loss::refusal(self.etcd_loss, t, silent)
    }
}
