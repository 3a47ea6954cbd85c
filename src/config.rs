//! Configuration: the TOML file's shape, its defaults, `validate()` reporting every problem
//! at once, and command-line overrides.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::allow::Cidr;
use crate::policy::{Balance, ListenerRole, Policy};

pub mod dcs;
pub use dcs::{Dcs, RestConfig, ZookeeperConfig};

/// The default `max_lag` of read listeners: 16 MiB.
pub const DEFAULT_MAX_LAG: u64 = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{} problem(s) in the configuration:\n  - {}", .0.len(), .0.join("\n  - "))]
    Invalid(Vec<String>),
}

/// A password: never printed by `Debug` or `Display`.
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub etcd: EtcdConfig,
    /// `[cluster]` for one cluster, or `[[cluster]]` tables for several.
    #[serde(rename = "cluster", deserialize_with = "one_or_many")]
    pub clusters: Vec<ClusterConfig>,
    #[serde(rename = "listener")]
    pub listeners: Vec<ListenerConfig>,
    pub timeouts: Timeouts,
    pub runtime: RuntimeConfig,
    pub limits: Limits,
    pub admin: AdminConfig,
    /// The certificate patroxy shows TLS clients.
    pub tls: TlsConfig,
    /// How patroxy connects to PostgreSQL servers.
    pub server_tls: ServerTlsConfig,
    /// The routing report patroxy keeps in etcd.
    pub report: ReportConfig,
    /// Server connection pools, for listeners with a `pool_mode`.
    pub pool: PoolConfig,
    /// How patroxy authenticates clients itself, on pooled listeners.
    pub auth: AuthConfig,
}

/// How a listener gives clients server connections (PgBouncer's meanings).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PoolMode {
    /// A dedicated server connection per client, authenticated end to end.
    #[default]
    None,
    /// A pooled server connection for as long as the client stays connected, reset and
    /// reused after it leaves. patroxy authenticates the client itself (`[auth]`).
    Session,
    /// A pooled server connection from the first message of a transaction to the
    /// ReadyForQuery that ends it.
    Transaction,
}

/// What new connections to a primary do while etcd cannot be reached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EtcdLoss {
    /// Keep routing to the last known primary; each new server connection must still find
    /// it writable (a demoted primary is refused).
    #[default]
    LastKnown,
    /// After the cluster's `ttl` without etcd (when Patroni's own leader key would have
    /// expired), refuse new connections to the primary, unless Patroni's `failsafe` key
    /// listed the leader (failsafe mode keeps it primary while it reaches every member).
    FailClosed,
}

impl fmt::Display for PoolMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PoolMode::None => "none",
            PoolMode::Session => "session",
            PoolMode::Transaction => "transaction",
        })
    }
}

/// `[pool]`: server connection pools, one per (member, database, user).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PoolConfig {
    /// Server connections per pool.
    pub pool_size: usize,
    /// Server connections each used pool keeps open, idle if need be (0: none).
    pub min_pool_size: usize,
    /// Server connections to one member for one database, over all its users' pools
    /// (0: no cap).
    pub max_db_connections: usize,
    /// Pools (one per member, database and user) at most; a client that would need one
    /// more gets `53300`. Unused empty pools are let go after a minute.
    pub max_pools: usize,
    /// A client waits this long, in line, for a server connection; then it gets an error.
    #[serde(deserialize_with = "bounded_duration")]
    pub query_wait_timeout: Duration,
    /// An idle server connection is closed after this long.
    #[serde(deserialize_with = "bounded_duration")]
    pub server_idle_timeout: Duration,
    /// A server connection is closed when it is returned after this long.
    #[serde(deserialize_with = "bounded_duration")]
    pub server_lifetime: Duration,
    /// Run on a server connection before another client gets it.
    pub server_reset_query: String,
    /// A connection idle longer than this is checked (an empty query) before it is lent.
    #[serde(deserialize_with = "bounded_duration")]
    pub server_check_delay: Duration,
    /// Transaction pooling: named prepared statements each server connection keeps for
    /// clients, the least recently used closed first.
    pub max_prepared_statements: usize,
    /// Transaction pooling: bytes one client's prepared statements may hold (patroxy keeps
    /// each Parse, to prepare it on whichever connection the client gets); past it, or
    /// for one Parse longer than it, the client gets `54000`.
    pub client_memory: usize,
    /// A scheduled switchover (Patroni's `scheduled_at`) is held from this long before its
    /// time: no new transaction starts on the old primary, and running ones have this long
    /// to finish before Patroni's fast shutdown would kill them.
    #[serde(deserialize_with = "bounded_duration")]
    pub switchover_grace: Duration,
    /// Transaction pooling: at every transaction's end, ask the server what the session
    /// holds (one more round trip), instead of only after statements that change it; it
    /// finds what a function changed that no statement shows.
    pub verify_release: bool,
    /// A client idle inside a transaction longer than this is disconnected (its server
    /// connection rolled back), PgBouncer's `idle_transaction_timeout` (0: never).
    #[serde(deserialize_with = "bounded_duration")]
    pub idle_transaction_timeout: Duration,
    /// A request running longer than this ends the client's session and closes its server
    /// connection, PgBouncer's `query_timeout` (0: never).
    #[serde(deserialize_with = "bounded_duration")]
    pub query_timeout: Duration,
    /// A client that holds no server connection and sends nothing for this long is
    /// disconnected, PgBouncer's `client_idle_timeout` (0: never).
    #[serde(deserialize_with = "bounded_duration")]
    pub client_idle_timeout: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            pool_size: 20,
            min_pool_size: 0,
            max_db_connections: 0,
            max_pools: 1000,
            query_wait_timeout: Duration::from_secs(120),
            server_idle_timeout: Duration::from_secs(600),
            server_lifetime: Duration::from_secs(3600),
            server_reset_query: "DISCARD ALL".into(),
            server_check_delay: Duration::from_secs(30),
            max_prepared_statements: 100,
            client_memory: 64 << 20,
            switchover_grace: Duration::from_secs(2),
            verify_release: false,
            idle_transaction_timeout: Duration::ZERO,
            query_timeout: Duration::ZERO,
            client_idle_timeout: Duration::ZERO,
        }
    }
}

/// `[auth]`: the secrets patroxy checks pooled clients against.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// PgBouncer's userlist format: `"user" "secret"` lines, where a secret is a SCRAM
    /// verifier, an md5 secret, or a password.
    pub auth_file: Option<PathBuf>,
    /// Client addresses let in without a password (CIDR blocks); none by default. Not to
    /// the admin console: that takes `console_trust`.
    pub trust: Vec<Cidr>,
    /// Client addresses let into the admin console without a password (still as a user of
    /// `admin_users` or `stats_users`); none by default.
    pub console_trust: Vec<Cidr>,
    /// A user (with a password in the auth_file, or trusted by the server) as whom patroxy
    /// looks up the secrets of users the file does not have, with `auth_query`.
    pub auth_user: Option<String>,
    /// PgBouncer's default: the user's name and secret, `$1` being the user's name.
    pub auth_query: String,
    /// The database `auth_query` runs in (PgBouncer's `auth_dbname`): always this one, never
    /// the database a client not yet authenticated named.
    pub auth_dbname: String,
    /// The key the SCRAM salts of unknown users (and of passwords in the file) are made
    /// under: the same random text on every instance makes them agree. Without it, a random
    /// key per process (kept across reloads).
    pub salt_key: Option<Secret>,
    /// Users who may use the admin console (database `patroxy` or `pgbouncer`): every
    /// command.
    pub admin_users: Vec<String>,
    /// Users who may use the admin console read only (SHOW).
    pub stats_users: Vec<String>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            auth_file: None,
            trust: Vec::new(),
            console_trust: Vec::new(),
            auth_user: None,
            auth_query: "SELECT usename, passwd FROM pg_shadow WHERE usename=$1".into(),
            auth_dbname: "postgres".into(),
            salt_key: None,
            admin_users: Vec::new(),
            stats_users: Vec::new(),
        }
    }
}

/// `[report]`: a leased key per cluster, `<prefix>/<cluster>/<instance>`, saying where this
/// instance routes; `patroxy status` reads them.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ReportConfig {
    pub enabled: bool,
    /// Outside Patroni's keys.
    pub prefix: String,
    /// This instance's name; by default `<hostname>-<pid>`.
    pub instance: Option<String>,
    /// The host (name or IP) other instances reach this one at, to forward cancel requests
    /// of its pooled clients; by default the IP a pooled listener is bound to.
    pub address: Option<String>,
    /// The lease: the key vanishes this long after the instance dies.
    #[serde(deserialize_with = "bounded_duration")]
    pub ttl: Duration,
}

impl Default for ReportConfig {
    fn default() -> Self {
        ReportConfig {
            enabled: true,
            prefix: "/patroxy".into(),
            instance: None,
            address: None,
            ttl: Duration::from_secs(10),
        }
    }
}

impl ReportConfig {
    /// The instance name: configured, or `<hostname>-<pid>`.
    pub fn instance(&self) -> String {
        self.instance.clone().unwrap_or_else(Self::default_instance)
    }

    /// `<hostname>-<pid>`: the instance name when none is configured.
    pub fn default_instance() -> String {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "patroxy".into());
        format!("{host}-{}", std::process::id())
    }

    /// The directory of one cluster's reports, ending in `/`.
    pub fn cluster_prefix(&self, cluster: &str) -> String {
        format!("{}/{cluster}/", self.prefix.trim_end_matches('/'))
    }
}

/// `[tls]`: patroxy's own certificate and key (PEM), read again on SIGHUP.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

impl TlsConfig {
    pub fn is_set(&self) -> bool {
        self.cert_file.is_some() && self.key_file.is_some()
    }
}

/// A listener's `tls`: what it does with clients that ask for TLS, and with those that don't.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClientTlsMode {
    /// Answer `N` to SSLRequest; a direct TLS handshake is closed.
    Disable,
    /// TLS for clients that ask, plaintext for the others.
    Allow,
    /// Plaintext clients get FATAL 28000 before anything reaches a server.
    Require,
}

impl fmt::Display for ClientTlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ClientTlsMode::Disable => "disable",
            ClientTlsMode::Allow => "allow",
            ClientTlsMode::Require => "require",
        })
    }
}

/// `server_tls.mode`, with libpq's `sslmode` meanings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ServerTlsMode {
    Disable,
    /// TLS if the server offers it, plaintext if it does not; the certificate is not checked.
    /// The default, as libpq's `sslmode` is: a client that gets TLS from PostgreSQL directly
    /// gets it through patroxy too.
    #[default]
    Prefer,
    /// TLS or no connection; the certificate is not checked.
    Require,
    /// TLS, and the server's certificate must chain to `ca_file`.
    VerifyCa,
    /// As `verify-ca`, and the certificate must name the host patroxy connects to.
    VerifyFull,
}

/// `[server_tls]`: TLS from patroxy to PostgreSQL.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ServerTlsConfig {
    pub mode: ServerTlsMode,
    /// PEM CA bundle that server certificates must chain to (`verify-ca`, `verify-full`).
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate and key, for servers that ask for one (`clientcert` in pg_hba).
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// libpq's `require_auth`: the methods patroxy answers when a server asks it to
    /// authenticate (`scram-sha-256`, `md5`, `password`). Empty (the default): SCRAM; an md5
    /// secret from the auth_file answers md5; a password is sent as md5 or in cleartext only
    /// over a leg whose certificate is verified (`verify-ca`, `verify-full`).
    pub require_auth: Vec<ServerAuthMethod>,
}

/// A way a server may ask patroxy to authenticate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum ServerAuthMethod {
    #[serde(rename = "scram-sha-256")]
    Scram,
    #[serde(rename = "md5")]
    Md5,
    #[serde(rename = "password")]
    Password,
    /// No authentication at all (the server trusts patroxy): allowed by default; an
    /// explicit `require_auth` allows it only if it lists `none`.
    #[serde(rename = "none")]
    None,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// `ip:port` of the admin HTTP endpoint (`/health`, `/ready`); none by default.
    pub listen: Option<String>,
    /// With it, `/metrics` and `/topology` answer only `Authorization: Bearer <token>`
    /// (`/health` and `/ready` stay open for probes).
    pub token: Option<Secret>,
    /// Connections open at once; past it, a new one is closed at once.
    pub max_connections: usize,
    /// A connection that has not sent a whole request's headers this long is closed, and
    /// none stays open longer than `connection_lifetime`.
    #[serde(deserialize_with = "bounded_duration")]
    pub header_timeout: Duration,
    #[serde(deserialize_with = "bounded_duration")]
    pub connection_lifetime: Duration,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: None,
            token: None,
            max_connections: 64,
            header_timeout: Duration::from_secs(5),
            connection_lifetime: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Client connections across all listeners; over it, a client gets FATAL 53300.
    pub max_client_connections: usize,
    /// Cancel requests a second from one source address (an IPv6 /64), in bursts of twice
    /// that; past it they are dropped. 0: no limit. Read at start.
    pub cancels_per_second: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_client_connections: 10_000,
            cancels_per_second: 100,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Threads that relay sessions: 0 means one per CPU core. Each runs a current-thread
    /// runtime of its own, and a session stays on the thread it was given.
    pub worker_threads: usize,
    /// One multi-threaded runtime whose threads steal each other's tasks instead (what
    /// patroxy ran until per-thread runtimes measured lighter; kept to compare).
    pub work_stealing: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            etcd: EtcdConfig::default(),
            clusters: vec![ClusterConfig::default()],
            listeners: vec![ListenerConfig::default()],
            timeouts: Timeouts::default(),
            runtime: RuntimeConfig::default(),
            limits: Limits::default(),
            admin: AdminConfig::default(),
            tls: TlsConfig::default(),
            server_tls: ServerTlsConfig::default(),
            report: ReportConfig::default(),
            pool: PoolConfig::default(),
            auth: AuthConfig::default(),
        }
    }
}

/// `[cluster]` or `[[cluster]]`. Not an untagged enum: that would hide the real error
/// (an unknown field, a wrong type) behind "did not match any variant".
fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<ClusterConfig>, D::Error> {
    use serde::de::Error;
    match toml::Value::deserialize(d)? {
        v @ toml::Value::Array(_) => Vec::<ClusterConfig>::deserialize(v),
        v => ClusterConfig::deserialize(v).map(|c| vec![c]),
    }
    .map_err(|e| D::Error::custom(format!("cluster: {}", e.message())))
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct EtcdConfig {
    /// `http://host:port` or `https://host:port`; several for an etcd cluster.
    pub endpoints: Vec<String>,
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// PEM CA bundle to verify etcd's certificate (https endpoints).
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate and key, for etcd's client-certificate auth.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    #[serde(deserialize_with = "bounded_duration")]
    pub dial_timeout: Duration,
    /// Bounds each request (the range read on resync); the watch stream itself is unbounded.
    #[serde(deserialize_with = "bounded_duration")]
    pub request_timeout: Duration,
    /// With no message on the watch for this long (progress requests included), resync.
    #[serde(deserialize_with = "bounded_duration")]
    pub watch_idle_timeout: Duration,
}

impl Default for EtcdConfig {
    fn default() -> Self {
        EtcdConfig {
            endpoints: vec!["http://127.0.0.1:2379".into()],
            username: None,
            password: None,
            ca_file: None,
            cert_file: None,
            key_file: None,
            dial_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(5),
            watch_idle_timeout: Duration::from_secs(15),
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// What listeners call this cluster; defaults to the scope (and `/group`).
    pub name: Option<String>,
    /// Patroni's `namespace` (default `/service`).
    pub namespace: String,
    /// Patroni's `scope`: the cluster name.
    pub scope: String,
    /// A Citus group: its keys live under `/<namespace>/<scope>/<group>/`; 0 is the coordinator.
    pub group: Option<u32>,
    /// Pooled server connections to each member of the cluster, over all its pools (0: no
    /// cap). Keep it under the members' `max_connections`.
    pub max_server_connections: usize,
    /// New connections to the primary while etcd cannot be reached: `last-known` or
    /// `fail-closed`.
    pub etcd_loss: EtcdLoss,
    /// Where Patroni keeps this cluster's state: `etcd` (the default), `zookeeper` or
    /// `rest` (Patroni's REST API, for Kubernetes, Consul and Raft).
    pub dcs: Dcs,
    pub zookeeper: ZookeeperConfig,
    pub rest: RestConfig,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            name: None,
            namespace: "/service".into(),
            scope: String::new(),
            group: None,
            max_server_connections: 0,
            etcd_loss: EtcdLoss::LastKnown,
            dcs: Dcs::Etcd,
            zookeeper: ZookeeperConfig::default(),
            rest: RestConfig::default(),
        }
    }
}

impl ClusterConfig {
    /// The key prefix Patroni uses, `/<namespace>/<scope>/[<group>/]`, with slashes folded
    /// as Patroni does.
    pub fn prefix(&self) -> String {
        let ns = self.namespace.trim_matches('/');
        let mut p = String::from("/");
        if !ns.is_empty() {
            p.push_str(ns);
            p.push('/');
        }
        p.push_str(self.scope.trim_matches('/'));
        p.push('/');
        if let Some(g) = self.group {
            p.push_str(&format!("{g}/"));
        }
        p
    }

    /// The name listeners use for this cluster.
    pub fn name(&self) -> String {
        match (&self.name, self.group) {
            (Some(n), _) => n.clone(),
            (None, Some(g)) => format!("{}/{g}", self.scope.trim_matches('/')),
            (None, None) => self.scope.trim_matches('/').to_owned(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ListenerConfig {
    pub name: String,
    /// `host:port` to listen on.
    pub listen: String,
    /// The cluster's name; may be left out when there is one cluster.
    pub cluster: Option<String>,
    pub role: ListenerRole,
    pub balance: Balance,
    /// Read roles: replicas further behind than this many bytes take no sessions.
    pub max_lag: Option<u64>,
    /// Read roles: replicas must carry these Patroni tags (`{ analytics = true }`).
    pub require_tags: BTreeMap<String, serde_json::Value>,
    /// Read roles: replicas carrying any of these tags are left out.
    pub exclude_tags: BTreeMap<String, serde_json::Value>,
    /// At most this many client connections on this listener; 0 means no limit of its own.
    pub max_client_connections: usize,
    /// Client addresses allowed to connect (CIDR blocks); empty allows every address.
    pub allow: Vec<Cidr>,
    /// `disable`, `allow` or `require`; by default `allow` when `[tls]` has a certificate.
    pub tls: Option<ClientTlsMode>,
    /// `none` (a server connection per client), `session` or `transaction` (pooled).
    pub pool_mode: PoolMode,
}

impl Default for ListenerConfig {
    fn default() -> Self {
        ListenerConfig {
            name: "primary".into(),
            listen: "127.0.0.1:6432".into(),
            cluster: None,
            role: ListenerRole::Primary,
            balance: Balance::default(),
            max_lag: None,
            require_tags: BTreeMap::new(),
            exclude_tags: BTreeMap::new(),
            max_client_connections: 0,
            allow: Vec::new(),
            tls: None,
            pool_mode: PoolMode::None,
        }
    }
}

impl ListenerConfig {
    /// The parsed listen address; `validate()` guarantees it parses.
    pub fn addr(&self) -> Result<SocketAddr, String> {
        self.listen
            .parse()
            .map_err(|_| format!("{:?} is not an address (expected ip:port)", self.listen))
    }

    /// This listener's TLS mode, given whether patroxy has a certificate.
    pub fn tls_mode(&self, has_certificate: bool) -> ClientTlsMode {
        self.tls.unwrap_or(match has_certificate {
            true => ClientTlsMode::Allow,
            false => ClientTlsMode::Disable,
        })
    }

    /// The routing rules of this listener.
    pub fn policy(&self) -> Policy {
        let read = self.role != ListenerRole::Primary;
        Policy {
            role: self.role,
            balance: self.balance,
            max_lag: read.then(|| self.max_lag.unwrap_or(DEFAULT_MAX_LAG)),
            require_tags: self.require_tags.clone(),
            exclude_tags: self.exclude_tags.clone(),
        }
    }
}

/// What every TCP socket of patroxy gets, to both sides. Keepalive (PgBouncer's
/// `tcp_keepidle`, `tcp_keepintvl`, `tcp_keepcnt`): the first probe after `idle` without
/// traffic, then one every `interval`, the peer given up on after `count` unanswered
/// probes. `user_timeout` (TCP_USER_TIMEOUT, 0 for the system's): data sent and not
/// acknowledged this long closes the connection, which keepalive does not cover (a peer
/// that vanished right after it was sent something, or mid-query); with keepalive it also
/// bounds the probes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpOptions {
    pub idle: Duration,
    pub interval: Duration,
    pub count: u32,
    pub user_timeout: Duration,
}

impl Default for TcpOptions {
    fn default() -> Self {
        Timeouts::default().tcp()
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Timeouts {
    /// A client must finish its startup packet(s) within this time.
    #[serde(deserialize_with = "bounded_duration")]
    pub startup: Duration,
    /// One TCP connect to a server.
    #[serde(deserialize_with = "bounded_duration")]
    pub connect: Duration,
    /// How long a new session waits for a routable server before it gets an error.
    #[serde(deserialize_with = "bounded_duration")]
    pub connect_wait: Duration,
    /// Sessions on a deposed primary end at their next rest point, or at this deadline.
    #[serde(deserialize_with = "bounded_duration")]
    pub drain: Duration,
    /// Read sessions on a member that left the pool end when their transaction ends, or at
    /// this deadline.
    #[serde(deserialize_with = "bounded_duration")]
    pub replica_drain: Duration,
    /// A server that failed a connection is skipped by new sessions for this long.
    #[serde(deserialize_with = "bounded_duration")]
    pub eject: Duration,
    /// On shutdown, open transactions get this long to finish.
    #[serde(deserialize_with = "bounded_duration")]
    pub shutdown: Duration,
    /// Data sent to a server or a client and not acknowledged this long closes the
    /// connection (TCP_USER_TIMEOUT): a peer cut off with data in flight is given up on,
    /// instead of after the kernel's retransmissions (about 15 minutes). 0 leaves the
    /// system's default.
    #[serde(deserialize_with = "bounded_duration")]
    pub tcp_user_timeout: Duration,
    /// TCP keepalive on client and server sockets (PgBouncer's names): the first probe after
    /// this long idle...
    #[serde(deserialize_with = "bounded_duration")]
    pub tcp_keepidle: Duration,
    /// ...then one probe every this long...
    #[serde(deserialize_with = "bounded_duration")]
    pub tcp_keepintvl: Duration,
    /// ...and the peer is given up on after this many unanswered probes.
    pub tcp_keepcnt: u32,
}

impl Timeouts {
    /// The options for patroxy's TCP sockets.
    pub fn tcp(&self) -> TcpOptions {
        TcpOptions {
            idle: self.tcp_keepidle,
            interval: self.tcp_keepintvl,
            count: self.tcp_keepcnt,
            user_timeout: self.tcp_user_timeout,
        }
    }
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            startup: Duration::from_secs(10),
            connect: Duration::from_secs(3),
            connect_wait: Duration::from_secs(15),
            drain: Duration::from_millis(500),
            replica_drain: Duration::from_secs(10),
            eject: Duration::from_secs(3),
            shutdown: Duration::from_secs(10),
            tcp_user_timeout: Duration::from_secs(30),
            tcp_keepidle: Duration::from_secs(30),
            tcp_keepintvl: Duration::from_secs(10),
            tcp_keepcnt: 9,
        }
    }
}

/// Values from the command line (or `PATROXY_*` variables) that take precedence over the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub etcd: Vec<String>,
    pub scope: Option<String>,
    pub namespace: Option<String>,
    /// Replaces the file's primary listeners.
    pub primary: Vec<String>,
    /// Replaces the file's replica listeners.
    pub replica: Vec<String>,
    pub connect_wait: Option<Duration>,
    pub drain_timeout: Option<Duration>,
    pub worker_threads: Option<usize>,
    pub admin: Option<String>,
    pub report_address: Option<String>,
}

/// The permission bits of `file` when its group or others may read or write it.
fn open_to_others(file: &Path) -> Option<u32> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(file).ok()?.permissions().mode() & 0o777;
    (mode & 0o077 != 0).then_some(mode)
}

/// The longest duration a setting takes: past it a value is a typo (`500000000years`),
/// and would overflow the clock where it is added to an instant.
pub const MAX_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);

/// A duration as humantime writes it (`500ms`, `10s`, `1m`), at most `MAX_DURATION`.
fn bounded_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let value: Duration = humantime_serde::deserialize(d)?;
    match value <= MAX_DURATION {
        true => Ok(value),
        false => Err(serde::de::Error::custom(format!(
            "{} is longer than a year",
            humantime::format_duration(value)
        ))),
    }
}

impl Config {
    /// Reads the TOML text. An error names its line and says what is wrong, without
    /// quoting the line (it may hold a password).
    pub fn from_toml(path: &Path, text: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| {
                1 + text.as_bytes()[..s.start.min(text.len())]
                    .iter()
                    .filter(|b| **b == b'\n')
                    .count()
            });
            let at = line.map_or(String::new(), |n| format!("line {n}: "));
            ConfigError::Parse {
                path: path.to_owned(),
                message: format!("{at}{}", e.message().trim_end()),
            }
        })
    }

    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::from_toml(path, &text)
    }

    pub fn apply(&mut self, o: Overrides) {
        if !o.etcd.is_empty() {
            self.etcd.endpoints = o.etcd;
        }
        // --scope and --namespace set the first (usually the only) cluster.
        if self.clusters.is_empty() && (o.scope.is_some() || o.namespace.is_some()) {
            self.clusters.push(ClusterConfig::default());
        }
        if let Some(s) = o.scope {
            self.clusters[0].scope = s;
        }
        if let Some(n) = o.namespace {
            self.clusters[0].namespace = n;
        }
        self.replace_listeners(ListenerRole::Primary, o.primary);
        self.replace_listeners(ListenerRole::Replica, o.replica);
        if let Some(d) = o.connect_wait {
            self.timeouts.connect_wait = d;
        }
        if let Some(d) = o.drain_timeout {
            self.timeouts.drain = d;
        }
        if let Some(n) = o.worker_threads {
            self.runtime.worker_threads = n;
        }
        if let Some(a) = o.admin {
            self.admin.listen = Some(a);
        }
        if let Some(a) = o.report_address {
            self.report.address = Some(a);
        }
    }

    fn replace_listeners(&mut self, role: ListenerRole, addrs: Vec<String>) {
        if addrs.is_empty() {
            return;
        }
        self.listeners.retain(|l| l.role != role);
        let many = addrs.len() > 1;
        for (i, listen) in addrs.into_iter().enumerate() {
            let name = match many {
                true => format!("{role}{}", i + 1),
                false => role.to_string(),
            };
            self.listeners.push(ListenerConfig {
                name,
                listen,
                role,
                ..ListenerConfig::default()
            });
        }
    }

    /// The cluster a listener serves: the one it names, or the only one.
    pub fn cluster_of(&self, l: &ListenerConfig) -> Option<&ClusterConfig> {
        match &l.cluster {
            Some(name) => self.clusters.iter().find(|c| &c.name() == name),
            None if self.clusters.len() == 1 => self.clusters.first(),
            None => None,
        }
    }

    /// Whether anything is read from or written to etcd: a cluster on etcd, or the routing
    /// report (which also carries cancels between instances).
    pub fn uses_etcd(&self) -> bool {
        self.report.enabled || self.clusters.iter().any(|c| c.dcs == Dcs::Etcd)
    }

    /// What is allowed but probably not meant: `check-config` prints these, `run` logs them.
    pub fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        let on_etcd = self.clusters.iter().any(|c| c.dcs == Dcs::Etcd);
        if self.report.enabled && !on_etcd {
            w.push("report: no cluster is on etcd, yet the routing report (and with it cancels between patroxy instances) lives in etcd ([etcd]); set report.enabled = false if there is no etcd to keep it in".into());
        }
        let a = &self.auth;
        for (key, list) in [
            ("auth.trust", &a.trust),
            ("auth.console_trust", &a.console_trust),
        ] {
            for c in list.iter().filter(|c| c.is_wide()) {
                w.push(format!(
                    "{key}: {c} lets a wide range in without a password"
                ));
            }
        }
        let http = self.etcd.endpoints.iter().any(|e| e.starts_with("http://"));
        if http && self.etcd.password.is_some() {
            w.push("etcd: the password goes in cleartext over http:// endpoints".into());
        }
        for c in self.clusters.iter().filter(|c| c.dcs == Dcs::Rest) {
            w.extend(c.rest.warnings(&c.name()));
        }
        let loopback = self.report.address.as_deref().is_some_and(|h| {
            let h = h.trim_start_matches('[').trim_end_matches(']');
            h == "localhost"
                || h.parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        });
        if loopback {
            w.push("report.address: a loopback address; other instances on other hosts cannot forward cancels to it".into());
        }
        for (key, file) in [
            ("auth.auth_file", &self.auth.auth_file),
            ("tls.key_file", &self.tls.key_file),
            ("server_tls.key_file", &self.server_tls.key_file),
            ("etcd.key_file", &self.etcd.key_file),
        ] {
            if let Some(mode) = file.as_deref().and_then(open_to_others) {
                w.push(format!(
                    "{key}: readable by others (mode {mode:o}); it holds secrets: chmod 600 it"
                ));
            }
        }
        w
    }

    /// Every problem at once, so one run of `check-config` shows them all.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut bad = Vec::new();
        if self.uses_etcd() {
            self.validate_etcd(&mut bad);
        }
        let names = self.validate_clusters(&mut bad);
        self.validate_listeners(&names, &mut bad);
        let t = &self.timeouts;
        let ms = Duration::from_millis;
        // Floors below which a value is a typo, not a setting: a few milliseconds cannot
        // connect, and the watch asks etcd for progress three times per idle period.
        for (name, d, floor) in [
            ("timeouts.startup", t.startup, ms(100)),
            ("timeouts.connect", t.connect, ms(10)),
            ("timeouts.connect_wait", t.connect_wait, ms(10)),
            ("timeouts.drain", t.drain, ms(10)),
            ("timeouts.replica_drain", t.replica_drain, ms(10)),
            ("timeouts.eject", t.eject, ms(10)),
            ("timeouts.shutdown", t.shutdown, ms(10)),
            ("timeouts.tcp_keepidle", t.tcp_keepidle, ms(1000)),
            ("timeouts.tcp_keepintvl", t.tcp_keepintvl, ms(1000)),
            ("etcd.dial_timeout", self.etcd.dial_timeout, ms(100)),
            ("etcd.request_timeout", self.etcd.request_timeout, ms(100)),
            (
                "etcd.watch_idle_timeout",
                self.etcd.watch_idle_timeout,
                ms(1000),
            ),
        ] {
            if d < floor {
                bad.push(format!("{name}: {d:?} is too short (at least {floor:?})"));
            }
        }
        if t.tcp_keepcnt == 0 || t.tcp_keepcnt > 127 {
            bad.push(format!(
                "timeouts.tcp_keepcnt: {} is out of range (1 to 127)",
                t.tcp_keepcnt
            ));
        }
        if !t.tcp_user_timeout.is_zero() && t.tcp_user_timeout < Duration::from_secs(1) {
            bad.push(format!(
                "timeouts.tcp_user_timeout: {:?} is too short (at least 1s, or 0 for the system's default)",
                t.tcp_user_timeout
            ));
        }
        if let Some(a) = &self.admin.listen {
            if a.parse::<SocketAddr>().is_err() {
                bad.push(format!(
                    "admin.listen: {a:?} is not an address (expected ip:port)"
                ));
            }
        }
        if self.limits.max_client_connections == 0 {
            bad.push("limits.max_client_connections: must be greater than zero".into());
        }
        self.validate_tls(&mut bad);
        self.validate_report(&mut bad);
        self.validate_pool(&mut bad);
        if bad.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(bad))
        }
    }

    fn validate_etcd(&self, bad: &mut Vec<String>) {
        if self.etcd.endpoints.is_empty() {
            bad.push("etcd.endpoints: at least one endpoint is needed".to_owned());
        }
        for e in &self.etcd.endpoints {
            if let Err(why) = check_endpoint(e) {
                bad.push(format!("etcd.endpoints: {e:?} {why}"));
            }
        }
        if self.etcd.username.is_some() != self.etcd.password.is_some() {
            bad.push("etcd: username and password go together".into());
        }
        if self.etcd.cert_file.is_some() != self.etcd.key_file.is_some() {
            bad.push("etcd: cert_file and key_file go together".into());
        }
        for (name, file) in [
            ("etcd.ca_file", &self.etcd.ca_file),
            ("etcd.cert_file", &self.etcd.cert_file),
            ("etcd.key_file", &self.etcd.key_file),
        ] {
            if let Some(f) = file.as_ref().filter(|f| !f.is_file()) {
                bad.push(format!("{name}: {} is not a readable file", f.display()));
            }
        }
    }

    fn validate_pool(&self, bad: &mut Vec<String>) {
        let p = &self.pool;
        if p.max_pools == 0 {
            bad.push("pool.max_pools: must be at least 1".into());
        }
        if p.pool_size == 0 {
            bad.push("pool.pool_size: must be at least 1".into());
        }
        if p.max_prepared_statements == 0 {
            bad.push("pool.max_prepared_statements: must be at least 1".into());
        }
        if p.client_memory < 1 << 20 {
            bad.push("pool.client_memory: must be at least 1048576 (1 MiB)".into());
        }
        if p.min_pool_size > p.pool_size {
            bad.push(format!(
                "pool.min_pool_size: {} is more than pool.pool_size ({})",
                p.min_pool_size, p.pool_size
            ));
        }
        for (name, d) in [
            ("pool.query_wait_timeout", p.query_wait_timeout),
            ("pool.server_idle_timeout", p.server_idle_timeout),
            ("pool.server_lifetime", p.server_lifetime),
        ] {
            if d < Duration::from_millis(10) {
                bad.push(format!("{name}: {d:?} is too short (at least 10ms)"));
            }
        }
        // 0 turns these off; anything else below the floor is taken for a typo.
        for (name, d) in [
            ("pool.idle_transaction_timeout", p.idle_transaction_timeout),
            ("pool.query_timeout", p.query_timeout),
            ("pool.client_idle_timeout", p.client_idle_timeout),
        ] {
            if !d.is_zero() && d < Duration::from_millis(100) {
                bad.push(format!(
                    "{name}: {d:?} is too short (0 turns it off; else at least 100ms)"
                ));
            }
        }
        let pooled = self.listeners.iter().any(|l| l.pool_mode != PoolMode::None);
        let a = &self.auth;
        if pooled && a.auth_file.is_none() && a.trust.is_empty() && a.auth_user.is_none() {
            bad.push(
                "auth: pooled listeners need auth.auth_file, auth.auth_user or auth.trust to authenticate clients"
                    .into(),
            );
        }
        if a.auth_user.is_some() && !a.auth_query.contains("$1") {
            bad.push("auth.auth_query: must use $1 for the user's name".into());
        }
        if let Some(f) = self.auth.auth_file.as_ref().filter(|f| !f.is_file()) {
            bad.push(format!(
                "auth.auth_file: {} is not a readable file",
                f.display()
            ));
        }
    }

    fn validate_report(&self, bad: &mut Vec<String>) {
        let r = &self.report;
        if !r.prefix.starts_with('/') {
            bad.push(format!("report.prefix: {:?} must start with '/'", r.prefix));
        }
        if r.ttl < Duration::from_secs(2) {
            bad.push("report.ttl: must be at least 2s (etcd leases count in seconds)".into());
        }
        if r.instance
            .as_deref()
            .is_some_and(|i| i.is_empty() || i.contains('/'))
        {
            bad.push("report.instance: must be non-empty and contain no '/'".into());
        }
        if let Some(a) = &r.address {
            let host = a.trim_start_matches('[').trim_end_matches(']');
            let ok = host.parse::<std::net::IpAddr>().is_ok()
                || (!host.is_empty() && !host.contains([':', '/', ' ', '@']));
            if !ok {
                bad.push(format!(
                    "report.address: {a:?} must be a host name or an IP address, without a port"
                ));
            }
        }
        for c in &self.clusters {
            if r.cluster_prefix(&c.name()).starts_with(&c.prefix()) {
                bad.push(format!(
                    "report.prefix: {:?} puts reports inside Patroni's keys {}",
                    r.prefix,
                    c.prefix()
                ));
            }
        }
    }

    fn validate_tls(&self, bad: &mut Vec<String>) {
        let (t, s) = (&self.tls, &self.server_tls);
        if t.cert_file.is_some() != t.key_file.is_some() {
            bad.push("tls: cert_file and key_file go together".into());
        }
        if s.cert_file.is_some() != s.key_file.is_some() {
            bad.push("server_tls: cert_file and key_file go together".into());
        }
        let verifies = matches!(s.mode, ServerTlsMode::VerifyCa | ServerTlsMode::VerifyFull);
        if verifies && s.ca_file.is_none() {
            bad.push("server_tls.ca_file: required by verify-ca and verify-full".into());
        }
        for (name, file) in [
            ("tls.cert_file", &t.cert_file),
            ("tls.key_file", &t.key_file),
            ("server_tls.ca_file", &s.ca_file),
            ("server_tls.cert_file", &s.cert_file),
            ("server_tls.key_file", &s.key_file),
        ] {
            if let Some(f) = file.as_ref().filter(|f| !f.is_file()) {
                bad.push(format!("{name}: {} is not a readable file", f.display()));
            }
        }
        for (i, l) in self.listeners.iter().enumerate() {
            let mode = l.tls_mode(t.is_set());
            if mode != ClientTlsMode::Disable && !t.is_set() {
                bad.push(format!(
                    "listener[{i}].tls = \"{mode}\" needs tls.cert_file and tls.key_file"
                ));
            }
        }
    }

    /// Checks the clusters and returns their names.
    fn validate_clusters(&self, bad: &mut Vec<String>) -> Vec<String> {
        if self.clusters.is_empty() {
            bad.push("cluster: at least one cluster is needed".into());
        }
        let mut names = Vec::new();
        for (i, c) in self.clusters.iter().enumerate() {
            let at = match self.clusters.len() {
                1 => "cluster".to_owned(),
                _ => format!("cluster[{i}]"),
            };
            let scope = c.scope.trim_matches('/');
            if scope.is_empty() {
                bad.push(format!(
                    "{at}.scope: the Patroni scope (cluster name) is required"
                ));
            } else if scope.contains('/') {
                bad.push(format!("{at}.scope: {scope:?} must not contain '/'"));
            }
            let name = c.name();
            if names.contains(&name) {
                bad.push(format!(
                    "{at}: the name {name:?} is used twice (set `name`)"
                ));
            }
            names.push(name);
            dcs::validate(&at, c.dcs, &c.zookeeper, &c.rest, bad);
        }
        names
    }

    fn validate_listeners(&self, clusters: &[String], bad: &mut Vec<String>) {
        if self.listeners.is_empty() {
            bad.push("listener: at least one listener is needed".into());
        }
        let mut seen = Vec::new();
        let mut names = Vec::new();
        for (i, l) in self.listeners.iter().enumerate() {
            match l.addr() {
                // Port 0 asks the OS for a free port: never a clash.
                Ok(a) if a.port() != 0 && seen.contains(&a) => {
                    bad.push(format!("listener[{i}].listen: {a} is used twice"))
                }
                Ok(a) => seen.push(a),
                Err(why) => bad.push(format!("listener[{i}].listen: {why}")),
            }
            if l.name.trim().is_empty() {
                bad.push(format!("listener[{i}].name: must not be empty"));
            } else if names.contains(&&l.name) {
                bad.push(format!("listener[{i}].name: {:?} is used twice", l.name));
            }
            names.push(&l.name);

            if self.cluster_of(l).is_none() && !self.clusters.is_empty() {
                bad.push(match &l.cluster {
                    Some(c) => format!(
                        "listener[{i}].cluster: no cluster is named {c:?} (known: {})",
                        clusters.join(", ")
                    ),
                    None => {
                        format!("listener[{i}].cluster: required when there are several clusters")
                    }
                });
            }
            let filters =
                l.max_lag.is_some() || !l.require_tags.is_empty() || !l.exclude_tags.is_empty();
            if l.role == ListenerRole::Primary && filters {
                bad.push(format!(
                    "listener[{i}]: max_lag and tag filters apply to read roles, not to primary"
                ));
            }
        }
    }
}

fn check_endpoint(e: &str) -> Result<(), &'static str> {
    let rest = e
        .strip_prefix("http://")
        .or_else(|| e.strip_prefix("https://"))
        .ok_or("must start with http:// or https://")?;
    let hostport = rest.trim_end_matches('/');
    match hostport.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0) => Ok(()),
        _ => Err("must name a host and a port"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_toml_error_names_its_line_and_never_quotes_it() {
        let text = "[etcd]\nendpoints = [\"http://127.0.0.1:2379\"]\npassword = \"s3cret\n";
        let e = Config::from_toml(Path::new("p.toml"), text)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("p.toml: line 3: "), "{e}");
        assert!(!e.contains("s3cret"), "{e}");
    }

    #[test]
    fn secret_files_open_to_others_are_warned_of() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("userlist.txt");
        std::fs::write(&file, "").unwrap();
        let mut c = Config::default();
        c.auth.auth_file = Some(file.clone());
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let w = c.warnings().join("\n");
        assert!(
            w.contains("auth.auth_file: readable by others (mode 644)"),
            "{w}"
        );
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(c.warnings().is_empty(), "{:?}", c.warnings());
    }

    #[test]
    fn durations_past_a_year_are_refused_as_typos() {
        let text = "[timeouts]\ndrain = \"500000000years\"\n";
        let e = Config::from_toml(Path::new("p.toml"), text)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("longer than a year") && e.contains("line 2"),
            "{e}"
        );
        let ok = "[timeouts]\ndrain = \"30days\"\n";
        assert!(Config::from_toml(Path::new("p.toml"), ok).is_ok());
    }

    fn parse(s: &str) -> Result<Config, ConfigError> {
        Config::from_toml(Path::new("test.toml"), s)
    }

    #[test]
    fn defaults_fill_everything_but_the_scope() {
        let c = parse("[cluster]\nscope = \"demo\"\n").unwrap();
        c.validate().unwrap();
        assert_eq!(c.listeners[0].listen, "127.0.0.1:6432");
        assert_eq!(c.timeouts.drain, Duration::from_millis(500));
        assert_eq!(c.clusters[0].prefix(), "/service/demo/");
        let err = parse("").unwrap().validate().unwrap_err().to_string();
        assert!(err.contains("cluster.scope"), "{err}");
    }

    #[test]
    fn a_full_file() {
        let c = parse(
            r#"
            [etcd]
            endpoints = ["http://10.1.1.1:2379", "https://etcd-2:2379"]
            username = "patroxy"
            password = "s3cret"
            dial_timeout = "1s"
            [cluster]
            namespace = "service/"
            scope = "pg"
            [[listener]]
            name = "rw"
            listen = "0.0.0.0:5432"
            role = "primary"
            [timeouts]
            connect_wait = "30s"
            drain = "250ms"
            "#,
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.etcd.endpoints.len(), 2);
        assert_eq!(c.clusters[0].prefix(), "/service/pg/");
        assert_eq!(c.listeners.len(), 1);
        assert_eq!(c.timeouts.connect_wait, Duration::from_secs(30));
        assert!(
            !format!("{c:?}").contains("s3cret"),
            "passwords stay out of Debug"
        );
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let c = parse(
            r#"
            [etcd]
            endpoints = ["127.0.0.1:2379", "http://:1"]
            username = "u"
            [cluster]
            scope = ""
            [[listener]]
            listen = "nowhere"
            [[listener]]
            name = "b"
            listen = "127.0.0.1:1"
            [[listener]]
            name = "c"
            listen = "127.0.0.1:1"
            [timeouts]
            drain = "0s"
            [report]
            address = "127.0.0.2:6432"
            "#,
        )
        .unwrap();
        assert_problems(
            &c,
            &[
                "must start with http://",
                "must name a host",
                "username and password",
                "cluster.scope",
                "listener[0].listen",
                "used twice",
                "timeouts.drain",
                "report.address",
            ],
        );
    }

    /// `validate()` finds exactly one problem per needle, each containing it.
    fn assert_problems(c: &Config, needles: &[&str]) {
        let ConfigError::Invalid(problems) = c.validate().unwrap_err() else {
            panic!("expected Invalid");
        };
        let all = problems.join("\n");
        for needle in needles {
            assert!(all.contains(needle), "missing {needle:?} in\n{all}");
        }
        assert_eq!(problems.len(), needles.len(), "{all}");
    }

    #[test]
    fn durations_below_their_floor_are_refused() {
        let c = parse(
            r#"
            [cluster]
            scope = "s"
            [etcd]
            watch_idle_timeout = "1ns"
            dial_timeout = "5ms"
            [timeouts]
            startup = "1ms"
            connect_wait = "1us"
            "#,
        )
        .unwrap();
        assert_problems(
            &c,
            &[
                "etcd.watch_idle_timeout: 1ns is too short (at least 1s)",
                "etcd.dial_timeout: 5ms",
                "timeouts.startup: 1ms",
                "timeouts.connect_wait: 1µs",
            ],
        );
        let fine = parse("[cluster]\nscope = \"s\"\n[etcd]\nwatch_idle_timeout = \"1s\"\n");
        fine.unwrap().validate().unwrap();
    }

    #[test]
    fn each_dcs_needs_its_own_settings_and_only_those() {
        let invalid = |text: &str| parse(text).unwrap().validate().unwrap_err().to_string();
        let e = invalid("[cluster]\nscope = \"s\"\ndcs = \"zookeeper\"\n");
        assert!(
            e.contains("cluster.zookeeper.hosts: dcs = \"zookeeper\" needs"),
            "{e}"
        );
        let e = invalid("[cluster]\nscope = \"s\"\ndcs = \"rest\"\nrest.urls = [\"127.0.0.1:8008\"]\nrest.stale_after = \"1s\"\nrest.username = \"u\"\n");
        for want in [
            "cluster.rest.urls: \"127.0.0.1:8008\" must start with http://",
            "cluster.rest.stale_after: 1s must be at least",
            "cluster.rest: username and password go together",
        ] {
            assert!(e.contains(want), "{want}: {e}");
        }
        let e = invalid("[cluster]\nscope = \"s\"\nzookeeper.hosts = [\"z:2181\"]\n");
        assert!(
            e.contains("cluster.zookeeper: set, but dcs is \"etcd\""),
            "{e}"
        );
        assert!(parse("[cluster]\nscope = \"s\"\ndcs = \"consul\"\n").is_err());
        // No cluster on etcd and no report: [etcd] is not checked, and nothing warns.
        let c = parse("[cluster]\nscope = \"s\"\ndcs = \"rest\"\nrest.urls = [\"http://127.0.0.1:8008\"]\n[etcd]\nendpoints = []\n[report]\nenabled = false\n").unwrap();
        c.validate().unwrap();
        assert!(!c.uses_etcd());
        assert!(c.warnings().is_empty(), "{:?}", c.warnings());
        // With the report on, it still needs etcd, and says so.
        let c = parse("[cluster]\nscope = \"s\"\ndcs = \"zookeeper\"\nzookeeper.hosts = [\"127.0.0.1:2181\"]\n").unwrap();
        c.validate().unwrap();
        assert!(
            c.warnings().iter().any(|w| w.contains("lives in etcd")),
            "{:?}",
            c.warnings()
        );
        // An unverified https:// member, and a password in cleartext, are said.
        let c = parse("[cluster]\nscope = \"s\"\ndcs = \"rest\"\nrest.urls = [\"https://pg-0:8008\", \"http://pg-1:8008\"]\nrest.username = \"u\"\nrest.password = \"p\"\n[report]\nenabled = false\n").unwrap();
        c.validate().unwrap();
        let w = c.warnings().join("\n");
        assert!(
            w.contains("without rest.ca_file: the members' certificates are not verified"),
            "{w}"
        );
        assert!(w.contains("REST API password goes in cleartext"), "{w}");
    }

    #[test]
    fn unknown_keys_and_bad_types_are_refused() {
        let err = parse("[cluster]\nscop = \"x\"\n").unwrap_err().to_string();
        assert!(err.contains("scop"), "{err}");
        assert!(parse("[timeouts]\ndrain = \"soon\"\n").is_err());
        assert!(parse("[[listener]]\nrole = \"writer\"\n").is_err());
    }

    #[test]
    fn overrides_win() {
        let mut c =
            parse("[cluster]\nscope = \"a\"\n[[listener]]\nlisten = \"127.0.0.1:7000\"\n").unwrap();
        c.apply(Overrides {
            etcd: vec!["http://127.0.0.1:3379".into()],
            scope: Some("b".into()),
            namespace: Some("/other".into()),
            primary: vec!["127.0.0.1:7001".into()],
            replica: vec!["127.0.0.1:7002".into()],
            connect_wait: Some(Duration::from_secs(2)),
            drain_timeout: None,
            worker_threads: None,
            admin: None,
            report_address: Some("127.0.0.9".into()),
        });
        c.validate().unwrap();
        assert_eq!(c.report.address.as_deref(), Some("127.0.0.9"));
        assert_eq!(c.clusters[0].prefix(), "/other/b/");
        assert_eq!(c.listeners.len(), 2);
        assert_eq!(c.listeners[0].listen, "127.0.0.1:7001");
        assert_eq!(c.listeners[1].name, "replica");
        assert_eq!(c.listeners[1].role, ListenerRole::Replica);
        assert_eq!(c.timeouts.connect_wait, Duration::from_secs(2));
    }

    #[test]
    fn several_clusters_with_read_listeners() {
        let c = parse(
            r#"
            [[cluster]]
            scope = "orders"
            [[cluster]]
            name = "coord"
            scope = "citus"
            group = 0
            [[listener]]
            name = "orders-rw"
            listen = "127.0.0.1:7001"
            cluster = "orders"
            [[listener]]
            name = "orders-ro"
            listen = "127.0.0.1:7002"
            cluster = "orders"
            role = "replica"
            balance = "round-robin"
            max_lag = 1048576
            require_tags = { analytics = true }
            [[listener]]
            name = "coord-ro"
            listen = "127.0.0.1:7003"
            cluster = "coord"
            role = "prefer-replica"
            "#,
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.clusters[1].prefix(), "/service/citus/0/");
        assert_eq!(c.cluster_of(&c.listeners[2]).unwrap().scope, "citus");
        let p = c.listeners[1].policy();
        assert_eq!(p.role, ListenerRole::Replica);
        assert_eq!(p.balance, Balance::RoundRobin);
        assert_eq!(p.max_lag, Some(1 << 20));
        assert_eq!(p.require_tags["analytics"], serde_json::Value::Bool(true));
        assert_eq!(c.listeners[2].policy().max_lag, Some(DEFAULT_MAX_LAG));
        assert_eq!(c.listeners[0].policy().max_lag, None);
    }

    #[test]
    fn listeners_must_name_a_known_cluster() {
        let c = parse(
            r#"
            [[cluster]]
            scope = "a"
            [[cluster]]
            scope = "a"
            [[listener]]
            listen = "127.0.0.1:7001"
            [[listener]]
            name = "x"
            listen = "127.0.0.1:7002"
            cluster = "nope"
            max_lag = 5
            "#,
        )
        .unwrap();
        let err = c.validate().unwrap_err().to_string();
        for needle in [
            "used twice",
            "required when there are several clusters",
            "no cluster is named \"nope\"",
            "apply to read roles",
        ] {
            assert!(err.contains(needle), "missing {needle:?} in {err}");
        }
    }

    #[test]
    fn the_shipped_examples_are_valid() {
        for file in ["config/patroxy.toml", "config/sidecar.toml"] {
            let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
            let c = Config::load(&path).unwrap();
            c.validate().unwrap_or_else(|e| panic!("{file}: {e}"));
        }
        let demo = Config::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("config/patroxy.toml"))
            .unwrap();
        let roles: Vec<_> = demo
            .listeners
            .iter()
            .map(|l| (l.listen.as_str(), l.role))
            .collect();
        assert_eq!(
            roles,
            [
                ("127.0.0.1:6432", ListenerRole::Primary),
                ("127.0.0.1:6433", ListenerRole::Replica)
            ],
            "the demo, the README and scripts/demo.sh use these ports"
        );
    }
}
