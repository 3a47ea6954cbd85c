//! Getting a pooled client a server connection: what routing admits now (a hold for a pause
//! or a planned switchover, a refusal while etcd is lost under `fail-closed`, or the
//! candidates), then the chosen member's pool (a slot in line, an idle connection that is
//! still usable or a new one under the caps), all within `connect_wait`. A wait on one
//! member's pool ends as soon as routing stops choosing that member.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tracing::warn;

use super::conn::{ConnError, Login, Opener, ServerConn};
use super::pool::{Caps, Defaults, Lease, PoolKey, Pools};
use super::ServerLoad;
use crate::backoff::Backoff;
use crate::config::{EtcdLoss, PoolConfig, Timeouts};
use crate::discovery::patroni::Endpoint;
use crate::discovery::{DcsContact, Topology};
use crate::protocol::codes;
use crate::routing::{self, switchover, ListenerRole, Policy, Target};
use crate::tls::ServerTls;

type Topo = watch::Receiver<Arc<Topology>>;

/// How often a checkout looks again at a leader that is still being promoted.
const PROMOTION_PROBE: Duration = Duration::from_millis(10);

/// Why a pooled client got no server connection.
#[derive(Debug, thiserror::Error)]
pub enum CheckoutError {
    #[error("no {role} server after waiting {waited:?}: {why}")]
    NoServer {
        role: String,
        waited: Duration,
        why: String,
    },
    #[error("{0}")]
    Pool(#[from] super::pool::PoolError),
    #[error("server {server}: {source}")]
    Server { server: String, source: ConnError },
}

impl CheckoutError {
    pub fn label(&self) -> &'static str {
        match self {
            CheckoutError::NoServer { .. } => "no_server",
            CheckoutError::Pool(super::pool::PoolError::TooMany { .. }) => "too_many_pools",
            CheckoutError::Pool(_) => "pool_wait_timeout",
            CheckoutError::Server { .. } => "server_refused",
        }
    }

    /// The SQLSTATE and message the client is told.
    pub fn client_error(&self) -> (&'static str, String) {
        match self {
            CheckoutError::NoServer { .. } => (
                codes::CANNOT_CONNECT_NOW,
                format!("patroxy: {self}; retry later"),
            ),
            CheckoutError::Pool(_) => (codes::TOO_MANY_CONNECTIONS, format!("patroxy: {self}")),
            CheckoutError::Server {
                source: ConnError::Refused { sqlstate, message },
                ..
            } => match (codes::refusal_passed_on(sqlstate), missing_role(message)) {
                // The client proved a password to patroxy: a role the server does not have
                // is a failed password, as PostgreSQL answers it under password methods
                // (who exists is not told).
                (codes::INVALID_AUTHORIZATION, Some(role)) => (
                    codes::INVALID_PASSWORD,
                    format!("password authentication failed for user \"{role}\""),
                ),
                // What PostgreSQL says of the client's login, in its own words.
                (code @ (codes::INVALID_CATALOG_NAME | codes::INVALID_PASSWORD), _) => {
                    (code, message.clone())
                }
                (code, _) => (code, format!("patroxy: the server refused: {message}")),
            },
            CheckoutError::Server { .. } => (codes::CONNECTION_FAILURE, format!("patroxy: {self}")),
        }
    }
}

/// The role in PostgreSQL's `role "name" does not exist`.
fn missing_role(message: &str) -> Option<&str> {
    message
        .strip_prefix("role \"")?
        .strip_suffix("\" does not exist")
}

/// Who a server connection is for: the pool is per (member, database, user), and patroxy
/// logs in as that user.
#[derive(Clone, Copy)]
pub struct Who<'a> {
    pub login: &'a Login,
    pub user: &'a str,
    pub database: &'a str,
}

/// One pooled listener's way to lend server connections: its routing rules, the pools and
/// their settings, and what a new server connection takes.
pub struct Lender<'a> {
    /// The listener's name, for metrics.
    pub listener: &'a str,
    pub metrics: &'a crate::metrics::PoolMetrics,
    pub policy: &'a Policy,
    pub pools: &'a Pools,
    pub settings: &'a PoolConfig,
    pub caps: Caps,
    pub server_tls: &'a ServerTls,
    pub timeouts: &'a Timeouts,
    pub load: &'a ServerLoad,
    /// Advances once per checkout; balancing takes turns with it.
    pub turn: &'a AtomicUsize,
    pub etcd: &'a DcsContact,
    pub etcd_loss: EtcdLoss,
    /// The pool the client borrowed from last, if it keeps one: a client's next
    /// transaction most often goes to the same member, and finds its pool without a
    /// lookup.
    pub last_pool: Option<&'a LastPool>,
}

/// A client's last pool, held weakly: a pool the reaper lets go is looked up again.
pub type LastPool = std::sync::Mutex<std::sync::Weak<super::pool::Pool>>;

/// What routing allows a checkout right now.
enum Admission {
    /// Wait, and say why: the database is paused, or a planned switchover is under way.
    Hold(&'static str),
    /// Refuse at once (etcd lost under `fail-closed`).
    Refuse(String),
    Route(Result<Vec<Target>, routing::Unroutable>),
}

/// How a connection is had: lent from the member's pool, or opened for the client alone
/// with these startup parameters (a replication connection: never pooled).
#[derive(Clone, Copy)]
enum Way<'p> {
    Pooled,
    Own(&'p [(String, String)]),
}

impl Lender<'_> {
    /// A server connection for `who`, from the pool of the member routing picks, within
    /// `connect_wait`.
    pub async fn checkout(
        &self,
        who: Who<'_>,
        topology: &mut Topo,
    ) -> Result<(Lease, ServerConn, Target), CheckoutError> {
        let (lease, conn, target) = self.route(who, Way::Pooled, topology).await?;
        let lease = lease.expect("a pooled connection comes with its lease");
        Ok((lease, conn, target))
    }

    /// The common case at once, with no future and no wait: routing admits one member,
    /// its pool has a free slot and an idle connection that needs no check. `None`: the
    /// full checkout decides (a hold, a refusal, several candidates to balance, a wait).
    pub fn checkout_now(
        &self,
        who: Who<'_>,
        topology: &mut Topo,
    ) -> Option<(Lease, ServerConn, Target)> {
        let snapshot = topology.borrow_and_update().clone();
        let Admission::Route(Ok(mut candidates)) = self.admission(&snapshot, who.database) else {
            return None;
        };
        let target = candidates.pop().filter(|_| candidates.is_empty())?;
        let pool = self.pool_on(&target, who).ok()?;
        let (lease, idle) = pool.try_lease()?;
        let conn = idle?;
        if needs_check(&conn, self.settings) {
            pool.put_back(conn);
            return None;
        }
        self.metrics.waited(lease.waited);
        self.metrics.checkout(true);
        Some((lease, conn, target))
    }

    /// A server connection of the client's own, outside every pool, opened with `params`
    /// in its startup packet (a replication connection), on the member routing picks,
    /// within `connect_wait`.
    pub async fn open_own(
        &self,
        who: Who<'_>,
        params: &[(String, String)],
        topology: &mut Topo,
    ) -> Result<(ServerConn, Target), CheckoutError> {
        let (_, conn, target) = self.route(who, Way::Own(params), topology).await?;
        Ok((conn, target))
    }

    /// Routing, its holds and its waits, for either way of having a connection.
    async fn route(
        &self,
        who: Who<'_>,
        way: Way<'_>,
        topology: &mut Topo,
    ) -> Result<(Option<Lease>, ServerConn, Target), CheckoutError> {
        let started = Instant::now();
        let deadline = started + self.timeouts.connect_wait;
        let turn = self.turn.fetch_add(1, Relaxed);
        let mut pause = Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
        let mut why = String::new();
        let mut held = None;
        let mut promoting = false;
        loop {
            let snapshot = topology.borrow_and_update().clone();
            let candidates = match self.admission(&snapshot, who.database) {
                Admission::Hold(why) => {
                    if held.is_none() {
                        held = Some(self.pools.hold(who.database, who.user));
                        crate::metrics::switchover_hold(self.listener);
                    }
                    Err(why.to_owned())
                }
                // Fail closed: said at once, not after connect_wait.
                Admission::Refuse(why) => return Err(self.no_server(started, why)),
                Admission::Route(candidates) => {
                    held = None;
                    candidates.map_err(|e| e.to_string())
                }
            };
            match candidates {
                Err(e) => why = e,
                Ok(candidates) => {
                    let load = self.load;
                    let ordered =
                        routing::order(candidates, self.policy, |ep| load.sessions(ep), turn);
                    for target in ordered {
                        match self
                            .open_routed(who, way, &target, topology, &mut promoting)
                            .await?
                        {
                            Ok((lease, conn)) => return Ok((lease, conn, target)),
                            Err(e) => why = e,
                        }
                    }
                }
            }
            // The leader key names a server still in recovery: its promotion takes moments,
            // so look again soon (as the unpooled promotion probe does).
            let next = match std::mem::take(&mut promoting) {
                true => PROMOTION_PROBE,
                false => pause.next_pause(),
            };
            let wake = (Instant::now() + next).min(deadline);
            tokio::select! {
                _ = tokio::time::sleep_until(wake) => {}
                _ = topology.changed() => {}
            }
            if Instant::now() >= deadline {
                return Err(self.no_server(started, why));
            }
        }
    }

    fn no_server(&self, started: Instant, why: String) -> CheckoutError {
        CheckoutError::NoServer {
            role: self.policy.role.to_string(),
            waited: started.elapsed(),
            why,
        }
    }

    /// A wait for this member's pool (its slots, a cap, a connect that gets no answer) ends
    /// when routing stops choosing it: a client queued behind a primary that died goes to
    /// the next one at once, and none is handed the old primary once a switchover is under
    /// way.
    async fn open_routed(
        &self,
        who: Who<'_>,
        way: Way<'_>,
        target: &Target,
        topology: &Topo,
        promoting: &mut bool,
    ) -> Result<Result<(Option<Lease>, ServerConn), String>, CheckoutError> {
        let mut watch = topology.clone();
        let opened = async {
            match way {
                Way::Pooled => Ok(self
                    .open_on(who, target, promoting)
                    .await?
                    .map(|(lease, conn)| (Some(lease), conn))),
                Way::Own(params) => {
                    // Outside the pools' slots, but under the caps on server connections.
                    let key = self.pool_key(target, who);
                    let wait_until = Instant::now() + self.settings.query_wait_timeout;
                    let permits = self
                        .pools
                        .reserve(&key, self.caps, wait_until, true)
                        .await?;
                    let mut opener = self.opener(target, who);
                    opener.params = params.to_vec();
                    let opened = self.opened(opener.open().await, target, promoting)?;
                    Ok(opened.map(|mut conn| {
                        conn.permits = permits;
                        (None, conn)
                    }))
                }
            }
        };
        // Biased: the open usually finishes at its first poll (an idle connection), and
        // then the topology's watch is never waited on (no waiter registered and dropped).
        tokio::select! {
            biased;
            opened = opened => opened,
            () = self.unrouted(&mut watch, who.database, &target.endpoint) => {
                Ok(Err(format!("{}: no longer routed to while waiting for it", target.endpoint)))
            }
        }
    }

    fn admission(&self, snapshot: &Topology, database: &str) -> Admission {
        // Pools of a primary listener hold new transactions (and new sessions) while Patroni
        // carries out a planned switchover: the old primary is about to stop.
        let holds = self.policy.role.wants_standby() == Some(false);
        let now = std::time::SystemTime::now();
        if self.pools.is_paused(database) {
            Admission::Hold("the database is paused (PAUSE on the admin console); held")
        } else if holds && switchover::under_way(snapshot, now, self.settings.switchover_grace) {
            Admission::Hold("a planned switchover is under way (Patroni's failover key); held")
        } else if let Some(why) = self.etcd_refusal(snapshot) {
            Admission::Refuse(why)
        } else {
            Admission::Route(routing::candidates(self.policy, snapshot))
        }
    }

    /// Why a new connection is refused for want of the DCS, if it is (see the session's).
    fn etcd_refusal(&self, t: &Topology) -> Option<String> {
        let silent = self.etcd.silent_for();
        if let Some(why) = routing::etcd_loss::unknown(t, silent) {
            return Some(why);
        }
        if self.policy.role != ListenerRole::Primary {
            return None;
        }
        routing::etcd_loss::refusal(self.etcd_loss, t, silent)
    }

    /// Resolves once routing no longer admits `endpoint`: another member, a hold, a refusal.
    pub async fn unrouted(&self, watch: &mut Topo, database: &str, endpoint: &Endpoint) {
        loop {
            if watch.changed().await.is_err() {
                // The topology's sender is gone only at shutdown; nothing changes any more.
                return std::future::pending().await;
            }
            let snapshot = watch.borrow_and_update().clone();
            let routed = match self.admission(&snapshot, database) {
                Admission::Route(Ok(c)) => c.iter().any(|t| t.endpoint == *endpoint),
                _ => false,
            };
            if !routed {
                return;
            }
        }
    }

    pub fn pool_key(&self, target: &Target, who: Who<'_>) -> PoolKey {
        PoolKey {
            endpoint: target.endpoint.clone(),
            database: who.database.to_owned(),
            user: who.user.to_owned(),
            wants_standby: self.policy.role.wants_standby(),
        }
    }

    /// `target`'s pool for `who`: the client's last one if it is that, or else found (or
    /// made) and remembered.
    fn pool_on(
        &self,
        target: &Target,
        who: Who<'_>,
    ) -> Result<Arc<super::pool::Pool>, CheckoutError> {
        let Some(last) = self.last_pool else {
            return Ok(self.pools.get(self.pool_key(target, who))?);
        };
        let mut last = last.lock().unwrap_or_else(|p| p.into_inner());
        let wants_standby = self.policy.role.wants_standby();
        let same = |k: &PoolKey| {
            k.endpoint == target.endpoint
                && k.database == who.database
                && k.user == who.user
                && k.wants_standby == wants_standby
        };
        // Upgraded first, then asked: a pool the reaper is letting go is looked up again.
        if let Some(pool) = last.upgrade().filter(|p| same(&p.key) && !p.is_retired()) {
            return Ok(pool);
        }
        let pool = self.pools.get(self.pool_key(target, who))?;
        *last = Arc::downgrade(&pool);
        Ok(pool)
    }

    /// A connection on `target`'s pool: an idle one that is still usable, or a new one.
    /// `Ok(Err(why))`: none now, try again (a transient failure, such as a server still in
    /// recovery: `promoting` is then set).
    async fn open_on(
        &self,
        who: Who<'_>,
        target: &Target,
        promoting: &mut bool,
    ) -> Result<Result<(Lease, ServerConn), String>, CheckoutError> {
        let pool = self.pool_on(target, who)?;
        let (lease, idle) = pool.lease().await?;
        self.metrics.waited(lease.waited);
        if let Some(conn) = checked(idle, self.settings, self.timeouts.connect).await {
            self.metrics.checkout(true);
            return Ok(Ok((lease, conn)));
        }
        let wait_until = Instant::now() + self.settings.query_wait_timeout;
        let permits = self
            .pools
            .reserve(&pool.key, self.caps, wait_until, true)
            .await?;
        let opener = self.opener(target, who);
        let opened = opener.open().await;
        crate::metrics::server_connect(if opened.is_ok() { "ok" } else { "failed" });
        let opened = self.opened(opened, target, promoting)?;
        Ok(opened.map(|mut conn| {
            self.metrics.checkout(false);
            conn.permits = permits;
            conn.generation = pool.generation();
            pool.remember_defaults(&conn.defaults);
            pool.remember_opener(&opener, self.caps);
            (lease, conn)
        }))
    }

    /// What an open came to: the connection; `Ok(Err(why))` for a failure worth another
    /// try (`promoting` set for a server still in recovery); an error for a refusal.
    fn opened(
        &self,
        opened: Result<ServerConn, ConnError>,
        target: &Target,
        promoting: &mut bool,
    ) -> Result<Result<ServerConn, String>, CheckoutError> {
        match opened {
            Ok(conn) => Ok(Ok(conn)),
            Err(e) if e.is_transient() => {
                *promoting |= matches!(e, ConnError::InRecovery);
                Ok(Err(format!("{}: {e}", target.endpoint)))
            }
            Err(source) => {
                let server = target.endpoint.to_string();
                Err(CheckoutError::Server { server, source })
            }
        }
    }

    /// How a connection to `target` for `who` is opened and logged in.
    pub fn opener(&self, target: &Target, who: Who<'_>) -> Opener {
        Opener {
            endpoint: target.endpoint.clone(),
            tls: self.server_tls.clone(),
            user: who.user.to_owned(),
            database: who.database.to_owned(),
            login: who.login.clone(),
            wants_standby: self.policy.role.wants_standby(),
            limit: self.timeouts.connect.max(self.timeouts.startup),
            tcp: self.timeouts.tcp(),
            params: Vec::new(),
        }
    }

    /// The login defaults of the server a new client would get: remembered by its pool, or
    /// learnt from a connection lent and given back at once.
    pub async fn defaults(
        &self,
        who: Who<'_>,
        topology: &mut Topo,
    ) -> Result<Arc<Defaults>, CheckoutError> {
        let candidates = routing::candidates(self.policy, &topology.borrow());
        if let Some(first) = candidates.ok().and_then(|c| c.into_iter().next()) {
            let pool = self.pools.find(&self.pool_key(&first, who));
            if let Some(d) = pool.and_then(|p| p.defaults()) {
                return Ok(d);
            }
        }
        let (lease, conn, _) = self.checkout(who, topology).await?;
        let defaults = lease.pool.remember_defaults(&conn.defaults);
        lease.give_back(conn);
        Ok(defaults)
    }
}

/// Whether an idle connection must answer an empty query before it is lent: it has been
/// idle longer than `server_check_delay`.
fn needs_check(conn: &ServerConn, settings: &PoolConfig) -> bool {
    conn.last_used.elapsed() > settings.server_check_delay
}

/// An idle connection, if it is still usable: one idle past `server_check_delay` must
/// answer an empty query first (a failed one is closed).
async fn checked(
    idle: Option<ServerConn>,
    settings: &PoolConfig,
    limit: Duration,
) -> Option<ServerConn> {
    let mut conn = idle?;
    if !needs_check(&conn, settings) {
        return Some(conn);
    }
    match conn.check(limit).await {
        Ok(()) => Some(conn),
        Err(e) => {
            warn!(server = %conn.endpoint, error = %e, "idle server connection failed its check; closed");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(sqlstate: &str, message: &str) -> CheckoutError {
        CheckoutError::Server {
            server: "127.0.0.1:5432".into(),
            source: ConnError::Refused {
                sqlstate: sqlstate.into(),
                message: message.into(),
            },
        }
    }

    #[test]
    fn a_login_the_server_refuses_is_told_as_postgresql_tells_it() {
        let (code, msg) = refused("3D000", "database \"nope\" does not exist").client_error();
        assert_eq!(
            (code, msg.as_str()),
            ("3D000", "database \"nope\" does not exist")
        );
        let (code, msg) = refused("28000", "role \"ghost\" does not exist").client_error();
        assert_eq!(code, "28P01");
        assert_eq!(msg, "password authentication failed for user \"ghost\"");
        let (code, _) = refused("28000", "pg_hba.conf rejects connection").client_error();
        assert_eq!(code, "28000");
        let (code, _) = refused("53300", "too many clients").client_error();
        assert_eq!(code, codes::CONNECTION_FAILURE);
    }
}
