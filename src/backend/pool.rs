//! Server connection pools, one per (server, database, user, role wanted): at most
//! `pool_size` connections each, lent to one client at a time. Clients wait in line (tokio's
//! semaphore is first-in, first-out) up to `query_wait_timeout`. A connection goes back only
//! clean (the caller resets it); idle ones expire after `server_idle_timeout`, every one after
//! `server_lifetime`, and a dead one is dropped when it would be lent. Caps shared by several
//! pools (`max_db_connections` per member and database, `max_server_connections` per member)
//! count open connections; a pool over a cap closes another pool's idle connection to make
//! room, or waits for one. Used pools are kept at `min_pool_size` in the background.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use super::conn::{Opener, ServerConn};
use crate::config::PoolConfig;
use crate::discovery::patroni::Endpoint;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub endpoint: Endpoint,
    pub database: String,
    pub user: String,
    /// What the server must be (`in_hot_standby`): a primary, a standby, or either.
    pub wants_standby: Option<bool>,
}

/// A server's login parameters, and the ParameterStatus messages that announce them,
/// encoded once per pool: greeting a client costs a copy.
#[derive(Debug)]
pub struct Defaults {
    pub params: BTreeMap<String, String>,
    pub encoded: bytes::Bytes,
}

impl Defaults {
    pub fn new(params: BTreeMap<String, String>) -> Defaults {
        let mut encoded = bytes::BytesMut::new();
        for (name, value) in &params {
            crate::protocol::messages::put_parameter_status(&mut encoded, name, value);
        }
        Defaults {
            params,
            encoded: encoded.freeze(),
        }
    }
}

/// Seconds an empty pool is kept after its last client (with its login defaults, so a
/// client coming back is greeted without a server connection).
pub const EMPTY_POOL_TTL: u64 = 60;

/// Every pool of this instance.
#[derive(Debug, Default)]
pub struct Pools {
    pools: Mutex<HashMap<PoolKey, Arc<Pool>>>,
    /// The shared caps, made on first use: their size and their places.
    caps: Mutex<HashMap<Cap, (usize, Arc<Semaphore>)>>,
    /// `[pool]` in force, for new pools.
    settings: RwLock<Arc<PoolConfig>>,
    /// Figures per database, for the console's SHOW STATS; each pool adds to its own
    /// database's without a lock.
    stats: Mutex<BTreeMap<String, Arc<DbCounters>>>,
    /// Databases the console paused (`PAUSE`); `None` in the set pauses every one.
    paused: RwLock<std::collections::HashSet<Option<String>>>,
    /// Clients held before any pool (a pause, a switchover), per (database, user).
    held: Arc<Mutex<BTreeMap<(String, String), usize>>>,
    /// Seconds the reaper has counted: when a pool was last lent from, on its clock.
    clock: Arc<std::sync::atomic::AtomicU64>,
}

/// A client held before any pool; counted until it drops.
#[derive(Debug)]
pub struct Held {
    counts: Arc<Mutex<BTreeMap<(String, String), usize>>>,
    key: (String, String),
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = counts.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.key);
            }
        }
    }
}

/// What pooled clients did with one database, since start.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DbStats {
    /// Server connections lent (transactions, in transaction mode).
    pub xact_count: u64,
    /// Requests answered (ReadyForQuery messages).
    pub query_count: u64,
    pub received: u64,
    pub sent: u64,
    /// Time connections were lent, and clients waited for one, in microseconds.
    pub xact_time_us: u64,
    pub wait_time_us: u64,
}

/// One database's `DbStats`, added to by every loan of its pools.
#[derive(Debug, Default)]
pub struct DbCounters {
    xact_count: AtomicU64,
    query_count: AtomicU64,
    received: AtomicU64,
    sent: AtomicU64,
    xact_time_us: AtomicU64,
    wait_time_us: AtomicU64,
}

impl DbCounters {
    fn add(&self, loan: &DbStats) {
        self.xact_count.fetch_add(loan.xact_count, Relaxed);
        self.query_count.fetch_add(loan.query_count, Relaxed);
        self.received.fetch_add(loan.received, Relaxed);
        self.sent.fetch_add(loan.sent, Relaxed);
        self.xact_time_us.fetch_add(loan.xact_time_us, Relaxed);
        self.wait_time_us.fetch_add(loan.wait_time_us, Relaxed);
    }

    fn is_empty(&self) -> bool {
        self.xact_count.load(Relaxed) == 0 && self.query_count.load(Relaxed) == 0
    }

    fn read(&self) -> DbStats {
        DbStats {
            xact_count: self.xact_count.load(Relaxed),
            query_count: self.query_count.load(Relaxed),
            received: self.received.load(Relaxed),
            sent: self.sent.load(Relaxed),
            xact_time_us: self.xact_time_us.load(Relaxed),
            wait_time_us: self.wait_time_us.load(Relaxed),
        }
    }
}

/// A cap on open server connections, over the pools it covers.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Cap {
    /// `max_server_connections`: every pool of one member.
    Server(Endpoint),
    /// `max_db_connections`: every user's pool of one database on one member.
    Database(Endpoint, String),
}

impl Cap {
    fn covers(&self, key: &PoolKey) -> bool {
        match self {
            Cap::Server(ep) => key.endpoint == *ep,
            Cap::Database(ep, db) => key.endpoint == *ep && key.database == *db,
        }
    }

    fn describe(&self, n: usize) -> String {
        match self {
            Cap::Server(ep) => format!("max_server_connections ({n}) to {ep}"),
            Cap::Database(ep, db) => format!("max_db_connections ({n}) for {db} on {ep}"),
        }
    }
}

/// The caps a new server connection counts against: 0 is none.
#[derive(Debug, Clone, Copy, Default)]
pub struct Caps {
    pub per_server: usize,
    pub per_database: usize,
}

#[derive(Debug)]
pub struct Pool {
    pub key: PoolKey,
    settings: RwLock<Arc<PoolConfig>>,
    slots: Arc<Semaphore>,
    /// Its size: the slots it has now (a reload changes it).
    size: AtomicUsize,
    /// Slots lent.
    lent: AtomicUsize,
    idle: Mutex<Vec<ServerConn>>,
    /// The server's parameters at login, from the first connection: what new clients of
    /// this pool are greeted with before they hold a connection.
    defaults: Mutex<Option<Arc<Defaults>>>,
    /// Clients in line for a slot.
    waiting: std::sync::atomic::AtomicUsize,
    /// Advanced by the console's RECONNECT: connections opened before are closed when
    /// returned.
    generation: std::sync::atomic::AtomicU64,
    /// How its last connection was opened: how the background opens more (`min_pool_size`).
    opener: Mutex<Option<(Opener, Caps)>>,
    /// A background open is under way.
    filling: std::sync::atomic::AtomicBool,
    /// The reaper's clock when a slot was last lent; and the clock.
    used_at: std::sync::atomic::AtomicU64,
    clock: Arc<std::sync::atomic::AtomicU64>,
    /// Set while the reaper decides whether to let it go: a client that found it through
    /// a weak reference (`is_retired`) looks it up again.
    retired: std::sync::atomic::AtomicBool,
    /// Its database's figures.
    stats: Arc<DbCounters>,
}

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("too many pools (pool.max_pools = {max}): no new (member, database, user) until some are unused")]
    TooMany { max: usize },
    #[error("no server connection for {user}@{database} on {endpoint} within query_wait_timeout ({waited:?}): all {size} are in use")]
    WaitTimeout {
        user: String,
        database: String,
        endpoint: Endpoint,
        waited: Duration,
        size: usize,
    },
    #[error("no server connection for {user}@{database} within query_wait_timeout ({waited:?}): {cap} reached")]
    Capped {
        user: String,
        database: String,
        cap: String,
        waited: Duration,
    },
}

/// A client's lease of a slot in a pool, and the connection once it has one. Dropped
/// without `give_back`, the connection is closed and the slot freed.
#[derive(Debug)]
pub struct Lease {
    pub pool: Arc<Pool>,
    /// How long the client waited in line for it.
    pub waited: Duration,
    _slot: OwnedSemaphorePermit,
}

impl Pools {
    fn lock(&self) -> MutexGuard<'_, HashMap<PoolKey, Arc<Pool>>> {
        self.pools.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Pools made from now on, and those already open, take `settings`: a larger
    /// `pool_size` adds slots at once; a smaller one takes them back as they are returned.
    pub fn configure(&self, settings: &PoolConfig) {
        let settings = Arc::new(settings.clone());
        *self.settings.write().unwrap_or_else(|p| p.into_inner()) = settings.clone();
        for pool in self.lock().values() {
            *pool.settings.write().unwrap_or_else(|p| p.into_inner()) = settings.clone();
            let old = pool.size.swap(settings.pool_size, Relaxed);
            resize(&pool.slots, old, settings.pool_size);
        }
    }

    /// The pool for `key`, made on first use (up to `pool.max_pools`).
    pub fn get(&self, key: PoolKey) -> Result<Arc<Pool>, PoolError> {
        let settings = self
            .settings
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut pools = self.lock();
        if let Some(p) = pools.get(&key) {
            return Ok(p.clone());
        }
        if pools.len() >= settings.max_pools {
            return Err(PoolError::TooMany {
                max: settings.max_pools,
            });
        }
        let clock = self.clock.clone();
        let now = clock.load(Relaxed);
        let stats = self.counters(&key.database);
        Ok(pools
            .entry(key.clone())
            .or_insert_with(|| {
                Arc::new(Pool {
                    key,
                    slots: Arc::new(Semaphore::new(settings.pool_size)),
                    size: AtomicUsize::new(settings.pool_size),
                    lent: AtomicUsize::new(0),
                    settings: RwLock::new(settings),
                    idle: Mutex::default(),
                    defaults: Mutex::default(),
                    waiting: Default::default(),
                    generation: Default::default(),
                    opener: Mutex::default(),
                    filling: Default::default(),
                    used_at: now.into(),
                    clock,
                    retired: Default::default(),
                    stats,
                })
            })
            .clone())
    }

    /// The pool for `key`, if there is one.
    pub fn find(&self, key: &PoolKey) -> Option<Arc<Pool>> {
        self.lock().get(key).cloned()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// One second on the reaper's clock; pools with nothing in them and no client for
    /// `EMPTY_POOL_TTL` (at once, for one that never had a connection) are let go.
    fn forget_empty(&self) -> usize {
        let now = self.clock.fetch_add(1, Relaxed) + 1;
        let mut pools = self.lock();
        let before = pools.len();
        pools.retain(|_, p| {
            let unused = now.saturating_sub(p.used_at.load(Relaxed));
            // Set before the count is read: whoever upgrades a weak reference after it
            // sees the pool as going.
            p.retired.store(true, SeqCst);
            let empty = p.in_use() == 0
                && p.waiting.load(Relaxed) == 0
                && p.idle().is_empty()
                && Arc::strong_count(p) == 1;
            let stale = p.defaults().is_none() || unused >= EMPTY_POOL_TTL;
            let keep = !(empty && stale);
            if keep {
                p.retired.store(false, SeqCst);
            }
            keep
        });
        // A database whose pools are gone and that never had a transaction leaves no
        // figures (clients asking for databases that do not exist would grow them).
        let mut stats = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        stats.retain(|_, c| Arc::strong_count(c) > 1 || !c.is_empty());
        before - pools.len()
    }

    /// Closes idle connections that expired or that the server closed, and those of pools
    /// `keep` rejects (a server that stopped being what the pool wants, such as a deposed
    /// primary).
    pub fn reap(&self, keep: &impl Fn(&PoolKey) -> bool) -> usize {
        let pools: Vec<Arc<Pool>> = self.lock().values().cloned().collect();
        let now = Instant::now();
        let mut closed = 0;
        for p in pools {
            let wanted = keep(&p.key);
            let settings = p.settings();
            let mut idle = p.idle();
            let before = idle.len();
            idle.retain(|c| wanted && !expired(&settings, c, now) && c.looks_alive());
            closed += before - idle.len();
        }
        closed
    }

    /// Places for one more server connection of the pool `key` under every cap that
    /// covers it, waiting until `deadline` (closing other pools' idle connections first,
    /// when `make_room`).
    pub async fn reserve(
        &self,
        key: &PoolKey,
        caps: Caps,
        deadline: Instant,
        make_room: bool,
    ) -> Result<Vec<OwnedSemaphorePermit>, PoolError> {
        let started = Instant::now();
        let mut permits = Vec::new();
        // Always in this order, so two reservations never hold one cap each.
        for (cap, n) in [
            (Cap::Server(key.endpoint.clone()), caps.per_server),
            (
                Cap::Database(key.endpoint.clone(), key.database.clone()),
                caps.per_database,
            ),
        ] {
            if n == 0 {
                continue;
            }
            let sem = {
                let mut caps = self.caps.lock().unwrap_or_else(|p| p.into_inner());
                let (size, sem) = caps
                    .entry(cap.clone())
                    .or_insert_with(|| (n, Arc::new(Semaphore::new(n))));
                // A reload changed the cap.
                if *size != n {
                    resize(sem, *size, n);
                    *size = n;
                }
                sem.clone()
            };
            loop {
                if let Ok(p) = sem.clone().try_acquire_owned() {
                    permits.push(p);
                    break;
                }
                if make_room && self.close_idle(&cap) {
                    continue;
                }
                // Another pool's connection may become idle meanwhile: look again soon.
                let slice = (Instant::now() + Duration::from_millis(100)).min(deadline);
                match tokio::time::timeout_at(slice, sem.clone().acquire_owned()).await {
                    Ok(p) => {
                        permits.push(p.expect("caps are never closed"));
                        break;
                    }
                    Err(_) if Instant::now() >= deadline => {
                        return Err(PoolError::Capped {
                            user: key.user.clone(),
                            database: key.database.clone(),
                            cap: cap.describe(n),
                            waited: started.elapsed(),
                        })
                    }
                    Err(_) => {}
                }
            }
        }
        Ok(permits)
    }

    /// Closes the longest-idle connection among the pools `cap` covers, if there is one.
    fn close_idle(&self, cap: &Cap) -> bool {
        let pools: Vec<Arc<Pool>> = self
            .lock()
            .values()
            .filter(|p| cap.covers(&p.key))
            .cloned()
            .collect();
        let oldest = pools
            .iter()
            .filter_map(|p| Some((p.idle().first()?.last_used, p)))
            .min_by_key(|(at, _)| *at);
        match oldest {
            Some((_, p)) => {
                let mut idle = p.idle();
                let closed = (!idle.is_empty()).then(|| idle.remove(0));
                closed.is_some()
            }
            None => false,
        }
    }

    /// `database`'s figures, made on first use.
    fn counters(&self, database: &str) -> Arc<DbCounters> {
        let mut stats = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        match stats.get(database) {
            Some(c) => c.clone(),
            None => stats.entry(database.to_owned()).or_default().clone(),
        }
    }

    /// Every database's figures.
    pub fn stats(&self) -> BTreeMap<String, DbStats> {
        let stats = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        stats.iter().map(|(db, c)| (db.clone(), c.read())).collect()
    }

    /// Counts a client of `user` on `database` as held until the guard drops.
    pub fn hold(&self, database: &str, user: &str) -> Held {
        let key = (database.to_owned(), user.to_owned());
        *self
            .held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.clone())
            .or_default() += 1;
        Held {
            counts: self.held.clone(),
            key,
        }
    }

    /// Clients held now, per (database, user).
    pub fn held(&self) -> BTreeMap<(String, String), usize> {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// `PAUSE [db]` (`Some(true)`), `RESUME [db]` (`Some(false)`); the set of paused
    /// databases either way (`None` is every database).
    pub fn pause(&self, database: Option<&str>, on: bool) {
        let mut paused = self.paused.write().unwrap_or_else(|p| p.into_inner());
        let db = database.map(str::to_owned);
        match (on, db) {
            (true, db) => {
                paused.insert(db);
            }
            (false, None) => paused.clear(),
            (false, db) => {
                paused.remove(&db);
            }
        }
    }

    pub fn is_paused(&self, database: &str) -> bool {
        let paused = self.paused.read().unwrap_or_else(|p| p.into_inner());
        !paused.is_empty()
            && paused
                .iter()
                .any(|d| d.as_deref().map_or(true, |d| d == database))
    }

    /// Connections lent now to clients of `database` (every database with `None`).
    pub fn lent(&self, database: Option<&str>) -> usize {
        self.lock()
            .values()
            .filter(|p| database.map_or(true, |d| p.key.database == d))
            .map(|p| p.in_use())
            .sum()
    }

    /// `RECONNECT [db]`: idle connections close now, lent ones when they come back.
    pub fn reconnect(&self, database: Option<&str>) -> usize {
        let mut closed = 0;
        for p in self.lock().values() {
            if database.map_or(true, |d| p.key.database == d) {
                p.generation.fetch_add(1, Relaxed);
                let mut idle = p.idle();
                closed += idle.len();
                idle.clear();
            }
        }
        closed
    }

    /// Every idle server connection: its pool's key, its backend's pid, when it opened and
    /// when it was last used.
    pub fn idle_servers(&self) -> Vec<(PoolKey, i32, Instant, Instant)> {
        let mut out = Vec::new();
        for p in self.lock().values() {
            for c in p.idle().iter() {
                let pid = c.key.as_ref().map_or(0, |k| k.pid);
                out.push((p.key.clone(), pid, c.created, c.last_used));
            }
        }
        out
    }

    /// Every pool's figures, for the operator's view.
    pub fn views(&self) -> Vec<crate::view::PoolView> {
        let mut out: Vec<_> = self
            .lock()
            .values()
            .map(|p| crate::view::PoolView {
                server: p.key.endpoint.to_string(),
                database: p.key.database.clone(),
                user: p.key.user.clone(),
                wants: match p.key.wants_standby {
                    Some(false) => "primary",
                    Some(true) => "standby",
                    None => "any",
                }
                .to_owned(),
                size: p.size.load(Relaxed),
                idle: p.idle().len(),
                in_use: p.in_use(),
                waiting: p.waiting.load(std::sync::atomic::Ordering::Relaxed),
            })
            .collect();
        out.sort_by(|a, b| {
            (&a.server, &a.database, &a.user).cmp(&(&b.server, &b.database, &b.user))
        });
        out
    }

    /// Pools still wanted that have fewer connections than `min_pool_size`.
    fn below_min(&self, keep: &impl Fn(&PoolKey) -> bool) -> Vec<Arc<Pool>> {
        self.lock()
            .values()
            .filter(|p| p.idle().len() + p.in_use() < p.settings().min_pool_size && keep(&p.key))
            .cloned()
            .collect()
    }

    /// Connections idle, and lent, over all pools.
    pub fn counts(&self) -> (usize, usize) {
        self.lock().values().fold((0, 0), |(idle, used), p| {
            (idle + p.idle().len(), used + p.in_use())
        })
    }
}

impl Pool {
    fn idle(&self) -> MutexGuard<'_, Vec<ServerConn>> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn settings(&self) -> Arc<PoolConfig> {
        self.settings
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn defaults(&self) -> Option<Arc<Defaults>> {
        self.defaults
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Remembers a server's login parameters, once (they are the same for every connection
    /// of a pool), and returns what is remembered.
    pub fn remember_defaults(&self, params: &BTreeMap<String, String>) -> Arc<Defaults> {
        let mut d = self.defaults.lock().unwrap_or_else(|e| e.into_inner());
        d.get_or_insert_with(|| Arc::new(Defaults::new(params.clone())))
            .clone()
    }

    /// Remembers how a connection of this pool was opened, for the background to open more.
    pub fn remember_opener(&self, opener: &Opener, caps: Caps) {
        let mut o = self.opener.lock().unwrap_or_else(|e| e.into_inner());
        if o.is_none() {
            *o = Some((opener.clone(), caps));
        }
    }

    /// Opens connections, one at a time, until the pool has `min_pool_size` (or it cannot:
    /// a cap reached, the pool in full use, an error). Each takes a slot while it opens.
    async fn fill(self: Arc<Self>, pools: Arc<Pools>) {
        let Some((opener, caps)) = self
            .opener
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        else {
            return;
        };
        while self.idle().len() + self.in_use() < self.settings().min_pool_size {
            let Ok(_slot) = self.slots.clone().try_acquire_owned() else {
                return;
            };
            // Under the caps only as they stand: no waiting, no closing others' connections.
            let now = Instant::now();
            let Ok(permits) = pools.reserve(&self.key, caps, now, false).await else {
                return;
            };
            match opener.open().await {
                Ok(mut conn) => {
                    crate::metrics::server_connect("ok");
                    conn.permits = permits;
                    conn.generation = self.generation();
                    self.idle().push(conn);
                }
                Err(e) => {
                    crate::metrics::server_connect("failed");
                    tracing::debug!(pool = ?self.key, error = %e, "min_pool_size: open failed");
                    return;
                }
            }
        }
    }

    /// Adds one loan's figures to its database's.
    pub fn record(&self, loan: &DbStats) {
        self.stats.add(loan);
    }

    /// The reaper may be letting it go (see `retired`).
    pub fn is_retired(&self) -> bool {
        self.retired.load(SeqCst)
    }

    /// The generation a connection opened now belongs to (see `Pools::reconnect`).
    pub fn generation(&self) -> u64 {
        self.generation.load(Relaxed)
    }

    pub fn in_use(&self) -> usize {
        self.lent.load(Relaxed)
    }

    /// Waits in line for a slot, up to `query_wait_timeout`; then an idle connection that
    /// is still alive, if there is one (else the caller opens one for the lease).
    pub async fn lease(self: &Arc<Self>) -> Result<(Lease, Option<ServerConn>), PoolError> {
        if let Some(leased) = self.try_lease() {
            return Ok(leased);
        }
        let wait = self.settings().query_wait_timeout;
        let started = Instant::now();
        let waiting = Waiting::new(&self.waiting);
        self.used_at.store(self.clock.load(Relaxed), Relaxed);
        let slot = tokio::time::timeout(wait, self.slots.clone().acquire_owned())
            .await
            .map_err(|_| PoolError::WaitTimeout {
                user: self.key.user.clone(),
                database: self.key.database.clone(),
                endpoint: self.key.endpoint.clone(),
                waited: started.elapsed(),
                size: self.size.load(Relaxed),
            })?
            .expect("pool semaphores are never closed");
        drop(waiting);
        Ok(self.lent(slot, started.elapsed()))
    }

    /// A lease at once, if a slot is free (none is while others wait in line: a released
    /// slot goes to the first in line), with an idle connection if one is usable.
    pub fn try_lease(self: &Arc<Self>) -> Option<(Lease, Option<ServerConn>)> {
        let slot = self.slots.clone().try_acquire_owned().ok()?;
        self.used_at.store(self.clock.load(Relaxed), Relaxed);
        Some(self.lent(slot, Duration::ZERO))
    }

    /// The lease of `slot`, and the newest idle connection still alive, among those of
    /// this thread if there are any: their wake-ups stay here.
    fn lent(
        self: &Arc<Self>,
        slot: OwnedSemaphorePermit,
        waited: Duration,
    ) -> (Lease, Option<ServerConn>) {
        self.lent.fetch_add(1, Relaxed);
        let lease = Lease {
            pool: self.clone(),
            waited,
            _slot: slot,
        };
        let now = Instant::now();
        let settings = self.settings();
        let here = std::thread::current().id();
        let mut idle = self.idle();
        while let Some(i) = idle
            .iter()
            .rposition(|c| c.home == here)
            .or(idle.len().checked_sub(1))
        {
            let c = idle.remove(i);
            if !expired(&settings, &c, now) && c.looks_alive() {
                return (lease, Some(c));
            }
        }
        (lease, None)
    }

    /// An idle connection taken out and not used (it needs a check the caller does not
    /// make now) goes back as it was.
    pub fn put_back(&self, conn: ServerConn) {
        // Unless `RECONNECT` let go of the pool's idle connections meanwhile.
        if conn.generation == self.generation() {
            self.idle().push(conn);
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.pool.lent.fetch_sub(1, Relaxed);
    }
}

/// Idle too long, or older than `server_lifetime`.
fn expired(settings: &PoolConfig, c: &ServerConn, now: Instant) -> bool {
    now.duration_since(c.last_used) > settings.server_idle_timeout
        || now.duration_since(c.created) > settings.server_lifetime
}

/// Gives `sem` the places of a new size: more at once; fewer by forgetting free ones, and
/// the rest as they are released (by a task that takes and forgets them).
fn resize(sem: &Arc<Semaphore>, old: usize, new: usize) {
    if new >= old {
        sem.add_permits(new - old);
        return;
    }
    let owed = (old - new) - sem.forget_permits(old - new);
    if owed > 0 {
        let sem = sem.clone();
        // Ends once that many are released; a semaphore outlives its pool's clients.
        tokio::spawn(async move {
            if let Ok(p) = sem.acquire_many_owned(owed as u32).await {
                p.forget();
            }
        });
    }
}

/// A pool's background open under way; ends on every exit path.
struct Filling(Arc<Pool>);

impl Filling {
    fn start(pool: &Arc<Pool>) -> Option<Filling> {
        let busy = pool
            .filling
            .swap(true, std::sync::atomic::Ordering::Relaxed);
        (!busy).then(|| Filling(pool.clone()))
    }
}

impl Drop for Filling {
    fn drop(&mut self) {
        self.0
            .filling
            .store(false, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Counts a client in line while it waits, on every exit path.
struct Waiting<'a>(&'a std::sync::atomic::AtomicUsize);

impl<'a> Waiting<'a> {
    fn new(n: &'a std::sync::atomic::AtomicUsize) -> Self {
        n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Waiting(n)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Lease {
    /// Returns a clean connection to the pool (closed instead if it outlived
    /// `server_lifetime`, or a RECONNECT came since it was opened); the slot frees when the
    /// lease drops.
    pub fn give_back(self, mut conn: ServerConn) {
        let now = Instant::now();
        conn.last_used = now;
        let current = conn.generation == self.pool.generation.load(Relaxed);
        if current && now.duration_since(conn.created) <= self.pool.settings().server_lifetime {
            self.pool.idle().push(conn);
        }
    }
}

/// Every second, closes expired idle connections and those whose server no longer is what
/// their pool wants (a deposed primary, a member gone or not running), until `stop`.
pub async fn reap(
    pools: Arc<Pools>,
    topologies: Vec<tokio::sync::watch::Receiver<Arc<crate::discovery::Topology>>>,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    // Background opens for min_pool_size; dropped (aborted) when the reaper stops.
    let mut fills = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        while fills.try_join_next().is_some() {}
        let snapshots: Vec<_> = topologies.iter().map(|t| t.borrow().clone()).collect();
        let wanted = |key: &PoolKey| {
            snapshots.iter().any(|t| {
                let primary = crate::routing::primary(t).ok();
                let is_primary = primary.is_some_and(|p| p.endpoint == key.endpoint);
                let running = t
                    .members
                    .values()
                    .any(|m| m.is_running() && m.endpoint.as_ref() == Some(&key.endpoint));
                match key.wants_standby {
                    Some(false) => is_primary,
                    Some(true) => running && !is_primary,
                    None => running,
                }
            })
        };
        let closed = pools.reap(&wanted);
        let forgotten = pools.forget_empty();
        if forgotten > 0 {
            tracing::debug!(forgotten, "unused empty pools let go");
        }
        if closed > 0 {
            tracing::debug!(closed, "idle server connections closed");
        }
        for pool in pools.below_min(&wanted) {
            if let Some(filling) = Filling::start(&pool) {
                let pools = pools.clone();
                fills.spawn(async move {
                    pool.clone().fill(pools).await;
                    drop(filling);
                });
            }
        }
        let (idle, in_use) = pools.counts();
        crate::metrics::server_connections(idle, in_use);
        crate::metrics::pools(pools.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_smaller_size_takes_places_back_as_they_are_released() {
        let sem = Arc::new(Semaphore::new(3));
        let held = sem.clone().acquire_many_owned(2).await.unwrap();
        resize(&sem, 3, 1);
        assert_eq!(sem.available_permits(), 0, "the free one is gone at once");
        drop(held);
        tokio::time::timeout(Duration::from_secs(5), async {
            while sem.available_permits() != 1 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("one place left once the lent ones came back");
        resize(&sem, 1, 4);
        assert_eq!(sem.available_permits(), 4);
    }

    fn key(database: &str) -> PoolKey {
        PoolKey {
            endpoint: Endpoint::parse("127.0.0.1:5001").unwrap(),
            database: database.into(),
            user: "u".into(),
            wants_standby: Some(false),
        }
    }

    #[test]
    fn pools_are_capped_and_unused_empty_ones_go() {
        let pools = Pools::default();
        pools.configure(&PoolConfig {
            max_pools: 2,
            ..PoolConfig::default()
        });
        let held = pools.get(key("a")).unwrap();
        let _b = pools.get(key("b")).unwrap();
        assert!(matches!(
            pools.get(key("c")),
            Err(PoolError::TooMany { max: 2 })
        ));
        assert!(
            pools.get(key("a")).is_ok(),
            "an existing pool is no new one"
        );
        drop(_b);
        assert_eq!(
            pools.forget_empty(),
            1,
            "b: empty, never connected, held by nobody"
        );
        assert_eq!(pools.len(), 1, "a is still held");
        drop(held);
        assert_eq!(pools.forget_empty(), 1);
        assert!(pools.get(key("c")).is_ok(), "room again");
    }

    #[test]
    fn a_database_nothing_was_recorded_for_leaves_no_figures_when_its_pool_goes() {
        let pools = Pools::default();
        for n in 0..100 {
            drop(pools.get(key(&format!("nosuch{n}"))).unwrap());
        }
        let used = pools.get(key("used")).unwrap();
        used.record(&DbStats {
            xact_count: 1,
            ..DbStats::default()
        });
        drop(used);
        assert_eq!(pools.forget_empty(), 101);
        let figures = pools.stats();
        assert_eq!(
            figures.keys().collect::<Vec<_>>(),
            ["used"],
            "a database with transactions keeps its figures; the others leave none"
        );
    }
}
