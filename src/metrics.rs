//! The metrics patroxy exports, by name, and the one place that records them. Names and
//! labels are documented in the README. The recorder is installed by the binary
//! (`install`); without one, recording is a no-op.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const SESSIONS_ACCEPTED: &str = "patroxy_sessions_accepted_total";
pub const SESSIONS_ACTIVE: &str = "patroxy_sessions_active";
pub const SESSIONS_CLOSED: &str = "patroxy_sessions_closed_total";
pub const BYTES: &str = "patroxy_bytes_total";
pub const STARTUP_FAILURES: &str = "patroxy_startup_failures_total";
pub const CONNECT_FAILURES: &str = "patroxy_connect_failures_total";
pub const CANCEL_REQUESTS: &str = "patroxy_cancel_requests_total";
pub const DRAINS: &str = "patroxy_drains_total";
pub const REFUSED: &str = "patroxy_connections_refused_total";
pub const TOPOLOGY_EPOCH: &str = "patroxy_topology_epoch";
pub const LEADER_CHANGES: &str = "patroxy_leader_changes_total";
pub const ETCD_LAST_EVENT: &str = "patroxy_etcd_last_event_timestamp_seconds";
pub const ETCD_WATCH_ERRORS: &str = "patroxy_etcd_watch_errors_total";
pub const ETCD_SILENCE: &str = "patroxy_etcd_silence_seconds";
pub const ETCD_RESYNCS: &str = "patroxy_etcd_resyncs_total";
pub const DCS_UP: &str = "patroxy_dcs_up";
pub const DCS_SILENCE: &str = "patroxy_dcs_silence_seconds";
pub const DCS_ERRORS: &str = "patroxy_dcs_errors_total";
pub const DCS_READS: &str = "patroxy_dcs_reads_total";
pub const CONNECT_SECONDS: &str = "patroxy_backend_connect_seconds";
pub const WAITING: &str = "patroxy_clients_waiting";
pub const CONFIG_RELOADS: &str = "patroxy_config_reloads_total";
pub const TASK_PANICS: &str = "patroxy_task_panics_total";
pub const AUTH_FAILURES: &str = "patroxy_auth_failures_total";
pub const SERVER_CONNECTIONS: &str = "patroxy_server_connections";
pub const POOLS: &str = "patroxy_pools";
pub const POOL_WAIT_SECONDS: &str = "patroxy_pool_wait_seconds";
pub const SERVER_CONNECTS: &str = "patroxy_server_connects_total";
pub const POOL_CHECKOUTS: &str = "patroxy_pool_checkouts_total";
pub const SERVER_RESETS: &str = "patroxy_server_resets_total";
pub const SERVER_UNSENT: &str = "patroxy_server_unsent_total";
pub const PREPARED: &str = "patroxy_prepared_statements_total";
pub const SWITCHOVER_HOLDS: &str = "patroxy_switchover_holds_total";
pub const SWITCHOVER_MOVES: &str = "patroxy_switchover_moves_total";
pub const PINS: &str = "patroxy_pins_total";
pub const RELEASE_CHECKS: &str = "patroxy_release_checks_total";
pub const TIMEOUTS: &str = "patroxy_client_timeouts_total";

/// Why a transaction-pooled client keeps its server connection (`patroxy_pins_total`).
pub const PIN_REASONS: [&str; 7] = [
    "temp", "advisory", "cursor", "prepare", "listen", "load", "unknown",
];
/// The three timeouts, as PgBouncer names them (`patroxy_client_timeouts_total`).
pub const TIMEOUT_KINDS: [&str; 3] = [
    "idle_transaction_timeout",
    "query_timeout",
    "client_idle_timeout",
];

/// Installs the Prometheus recorder for this process; its handle renders `/metrics`.
pub fn install() -> Result<PrometheusHandle, String> {
    PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(POOL_WAIT_SECONDS.into()),
            &[
                0.0001, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 120.0,
            ],
        )
        .map_err(|e| e.to_string())?
        .set_buckets_for_metric(
            Matcher::Full(CONNECT_SECONDS.into()),
            &[
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 15.0, 30.0,
            ],
        )
        .map_err(|e| e.to_string())?
        .install_recorder()
        .map_err(|e| e.to_string())
}

/// A listener's session figures, registered once: a session adds to them without looking
/// its series up in the recorder (each lookup hashes and copies the labels).
pub struct SessionMetrics {
    accepted: metrics::Counter,
    active: metrics::Gauge,
    connect: metrics::Histogram,
    /// Bytes from clients to servers, and back.
    bytes: [metrics::Counter; 2],
    /// Sessions closed, by reason.
    closed: Vec<(&'static str, metrics::Counter)>,
    listener: String,
    role: String,
}

/// A session counted active until dropped.
pub struct ActiveSession(metrics::Gauge);

impl Drop for ActiveSession {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

impl SessionMetrics {
    /// The figures of `listener` (of `role`), with the reasons a session can close for.
    pub fn of(listener: &str, role: &str, reasons: &'static [&'static str]) -> SessionMetrics {
        let (l, r) = (listener.to_owned(), role.to_owned());
        let bytes = |direction: &'static str| counter!(BYTES, "listener" => l.clone(), "direction" => direction);
        let closed = |reason: &'static str| counter!(SESSIONS_CLOSED, "listener" => l.clone(), "role" => r.clone(), "reason" => reason);
        SessionMetrics {
            accepted: counter!(SESSIONS_ACCEPTED, "listener" => l.clone(), "role" => r.clone()),
            active: gauge!(SESSIONS_ACTIVE, "listener" => l.clone(), "role" => r.clone()),
            connect: histogram!(CONNECT_SECONDS, "listener" => l.clone()),
            bytes: [bytes("client_to_server"), bytes("server_to_client")],
            closed: reasons
                .iter()
                .map(|&reason| (reason, closed(reason)))
                .collect(),
            listener: l,
            role: r,
        }
    }

    /// A session was accepted; it counts as active until the guard is dropped.
    pub fn accepted(&self) -> ActiveSession {
        self.accepted.increment(1);
        self.active.increment(1.0);
        ActiveSession(self.active.clone())
    }

    /// A session reached its server (or, pooled, was greeted) this long after its accept.
    pub fn connected(&self, took: Duration) {
        self.connect.record(took.as_secs_f64());
    }

    /// A session closed for `reason`, having carried these bytes up and down.
    pub fn closed(&self, reason: &'static str, up: u64, down: u64) {
        match self.closed.iter().find(|(r, _)| *r == reason) {
            Some((_, c)) => c.increment(1),
            None => counter!(SESSIONS_CLOSED, "listener" => self.listener.clone(), "role" => self.role.clone(), "reason" => reason).increment(1),
        }
        let [to_server, to_client] = &self.bytes;
        to_server.increment(up);
        to_client.increment(down);
    }
}

/// A client waiting for a server (a leader, a replica) while it connects.
pub struct WaitingGauge {
    listener: String,
}

impl WaitingGauge {
    pub fn new(listener: &str) -> WaitingGauge {
        gauge!(WAITING, "listener" => listener.to_owned()).increment(1.0);
        WaitingGauge {
            listener: listener.to_owned(),
        }
    }
}

impl Drop for WaitingGauge {
    fn drop(&mut self) {
        gauge!(WAITING, "listener" => self.listener.clone()).decrement(1.0);
    }
}

pub fn startup_failure(listener: &str, reason: &'static str) {
    counter!(STARTUP_FAILURES, "listener" => listener.to_owned(), "reason" => reason).increment(1);
}

pub fn connect_failure(listener: &str, reason: &'static str) {
    counter!(CONNECT_FAILURES, "listener" => listener.to_owned(), "reason" => reason).increment(1);
}

/// A cancel request, by the listener it came to and how it was routed (`local`: this
/// instance knew the key; `peer`: a pooled key of another instance, sent to it; `stale`:
/// this instance's pooled key whose session has ended; `unknown`: a pooled key of no
/// instance in the reports; `broadcast`: a server key, sent to every member).
pub fn cancel_request(listener: &str, routed: &'static str) {
    counter!(CANCEL_REQUESTS, "listener" => listener.to_owned(), "routed" => routed).increment(1);
}

pub fn drain(listener: &str, reason: &'static str) {
    counter!(DRAINS, "listener" => listener.to_owned(), "reason" => reason).increment(1);
}

pub fn refused(listener: &str, reason: &'static str) {
    counter!(REFUSED, "listener" => listener.to_owned(), "reason" => reason).increment(1);
}

pub fn topology(cluster: &str, epoch: u64, leader_changed: bool) {
    gauge!(TOPOLOGY_EPOCH, "cluster" => cluster.to_owned()).set(epoch as f64);
    if leader_changed {
        counter!(LEADER_CHANGES, "cluster" => cluster.to_owned()).increment(1);
    }
}

/// An etcd event or a resync happened now.
pub fn etcd_event(cluster: &str) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    gauge!(ETCD_LAST_EVENT, "cluster" => cluster.to_owned()).set(now.as_secs_f64());
}

/// How long etcd has been silent for `cluster` (since its last answer on the watch);
/// `NaN` before its first answer. Set when `/metrics` is rendered.
pub fn etcd_silence(cluster: &str, silent: Option<std::time::Duration>) {
    let value = silent.map_or(f64::NAN, |d| d.as_secs_f64());
    gauge!(ETCD_SILENCE, "cluster" => cluster.to_owned()).set(value);
}

/// A full read of the cluster's keys: at start, and when the watch cannot be resumed.
pub fn etcd_resync(cluster: &str) {
    counter!(ETCD_RESYNCS, "cluster" => cluster.to_owned()).increment(1);
    dcs_read(cluster, "etcd");
}

pub fn etcd_watch_error(cluster: &str) {
    counter!(ETCD_WATCH_ERRORS, "cluster" => cluster.to_owned()).increment(1);
    dcs_error(cluster, "etcd");
}

/// A full read of a cluster's state from its DCS (`dcs`: etcd, zookeeper, rest).
pub fn dcs_read(cluster: &str, dcs: &'static str) {
    counter!(DCS_READS, "cluster" => cluster.to_owned(), "dcs" => dcs).increment(1);
}

/// A failed request, watch or poll on a cluster's DCS.
pub fn dcs_error(cluster: &str, dcs: &'static str) {
    counter!(DCS_ERRORS, "cluster" => cluster.to_owned(), "dcs" => dcs).increment(1);
}

/// Whether a cluster's source is up and how long it has been silent (`NaN` before its first
/// answer). Set when `/metrics` is rendered.
pub fn dcs_link(cluster: &str, dcs: &'static str, up: bool, silent: Option<Duration>) {
    let c = cluster.to_owned();
    gauge!(DCS_UP, "cluster" => c.clone(), "dcs" => dcs).set(if up { 1.0 } else { 0.0 });
    let value = silent.map_or(f64::NAN, |d| d.as_secs_f64());
    gauge!(DCS_SILENCE, "cluster" => c, "dcs" => dcs).set(value);
}

/// A configuration reload: `ok` or `refused`.
pub fn reload(result: &'static str) {
    counter!(CONFIG_RELOADS, "result" => result).increment(1);
}

/// A pooled client that patroxy did not authenticate, by reason.
pub fn auth_failure(listener: &str, reason: &'static str) {
    counter!(AUTH_FAILURES, "listener" => listener.to_owned(), "reason" => reason).increment(1);
}

/// A background task panicked and was started again.
pub fn task_panic(task: &str) {
    counter!(TASK_PANICS, "task" => task.to_owned()).increment(1);
}

/// The reason labels a listener's series can carry, from the modules that own them.
pub struct Reasons {
    pub startup: &'static [&'static str],
    pub connect: &'static [&'static str],
    pub drain: &'static [&'static str],
}

/// Exports at zero the series of a new listener (at start, or added by a reload), so that
/// `rate()` and absence alerts see them before their first event.
pub fn listener_started(listener: &str, reasons: &Reasons) {
    // Its sessions' series are registered with its context (`SessionMetrics::of`).
    let l = listener.to_owned();
    for (name, labels) in [
        (STARTUP_FAILURES, reasons.startup),
        (CONNECT_FAILURES, reasons.connect),
        (DRAINS, reasons.drain),
        (REFUSED, &["limit", "not_allowed"][..]),
    ] {
        for reason in labels {
            counter!(name, "listener" => l.clone(), "reason" => *reason).absolute(0);
        }
    }
    for reason in [
        "bad_password",
        "auth_protocol",
        "client_error",
        "client_gone",
        "timeout",
    ] {
        counter!(AUTH_FAILURES, "listener" => l.clone(), "reason" => reason).absolute(0);
    }
    for routed in ["local", "broadcast", "peer", "stale", "unknown"] {
        counter!(CANCEL_REQUESTS, "listener" => l.clone(), "routed" => routed).absolute(0);
    }
    // Registered without a sample: rendered with a zero count.
    let _ = histogram!(POOL_WAIT_SECONDS, "listener" => l.clone());
    counter!(SWITCHOVER_HOLDS, "listener" => l.clone()).absolute(0);
    counter!(SERVER_UNSENT, "listener" => l.clone()).absolute(0);
    for connection in ["idle", "new"] {
        counter!(POOL_CHECKOUTS, "listener" => l.clone(), "connection" => connection).absolute(0);
    }
    gauge!(WAITING, "listener" => l).increment(0.0);
}

/// Exports at zero every series of a watched cluster.
pub fn cluster_started(cluster: &str, dcs: &'static str) {
    let c = cluster.to_owned();
    counter!(DCS_ERRORS, "cluster" => c.clone(), "dcs" => dcs).absolute(0);
    counter!(DCS_READS, "cluster" => c.clone(), "dcs" => dcs).absolute(0);
    dcs_link(cluster, dcs, false, None);
    gauge!(TOPOLOGY_EPOCH, "cluster" => c.clone()).increment(0.0);
    counter!(LEADER_CHANGES, "cluster" => c.clone()).absolute(0);
    counter!(ETCD_WATCH_ERRORS, "cluster" => c.clone()).absolute(0);
    counter!(ETCD_RESYNCS, "cluster" => c.clone()).absolute(0);
    gauge!(ETCD_SILENCE, "cluster" => c.clone()).set(f64::NAN);
    gauge!(ETCD_LAST_EVENT, "cluster" => c).increment(0.0);
}

/// Exports at zero the series with no per-listener or per-cluster label.
pub fn started() {
    for result in ["ok", "refused"] {
        counter!(CONFIG_RELOADS, "result" => result).absolute(0);
    }
    server_connections(0, 0);
    pools(0);
    for result in ["ok", "failed"] {
        counter!(SERVER_CONNECTS, "result" => result).absolute(0);
        counter!(SERVER_RESETS, "result" => result).absolute(0);
    }
    for result in ["hit", "miss", "evicted"] {
        counter!(PREPARED, "result" => result).absolute(0);
    }
    for result in ["moved", "stayed", "failed"] {
        counter!(SWITCHOVER_MOVES, "result" => result).absolute(0);
    }
    for reason in PIN_REASONS {
        counter!(PINS, "reason" => reason).absolute(0);
    }
    for result in ["clean", "found"] {
        counter!(RELEASE_CHECKS, "result" => result).absolute(0);
    }
    for kind in TIMEOUT_KINDS {
        counter!(TIMEOUTS, "timeout" => kind).absolute(0);
    }
}

/// A transaction-pooled client was pinned to its server connection, for `reason`.
pub fn pinned(reason: &'static str) {
    counter!(PINS, "reason" => reason).increment(1);
}

/// `pool.verify_release` asked the server at a transaction's end: it found the session
/// as the statements showed it (`clean`), or state they did not show (`found`).
pub fn release_check(result: &'static str) {
    counter!(RELEASE_CHECKS, "result" => result).increment(1);
}

/// A pooled client was disconnected by one of PgBouncer's timeouts.
pub fn client_timeout(kind: &'static str) {
    counter!(TIMEOUTS, "timeout" => kind).increment(1);
}

/// A client of `listener` waited `waited` in line for a pooled server connection.
/// A pooled listener's figures of every checkout, registered once: recording one looks
/// nothing up.
#[derive(Clone)]
pub struct PoolMetrics {
    wait: metrics::Histogram,
    idle: metrics::Counter,
    new: metrics::Counter,
    /// The prepared statement cache's hits, misses and evictions.
    prepared: [metrics::Counter; 3],
}

impl PoolMetrics {
    pub fn of(listener: &str) -> PoolMetrics {
        let checkouts = |connection: &'static str| counter!(POOL_CHECKOUTS, "listener" => listener.to_owned(), "connection" => connection);
        PoolMetrics {
            wait: histogram!(POOL_WAIT_SECONDS, "listener" => listener.to_owned()),
            idle: checkouts("idle"),
            new: checkouts("new"),
            prepared: ["hit", "miss", "evicted"].map(|r| counter!(PREPARED, "result" => r)),
        }
    }

    /// A client waited this long in its pool's line.
    pub fn waited(&self, waited: Duration) {
        self.wait.record(waited.as_secs_f64());
    }

    /// How one loan's named statements were served by its connection's cache: found
    /// prepared, prepared on demand, closed to make room.
    pub fn prepared(&self, stats: crate::protocol::prepared::CacheStats) {
        let [hits, misses, evicted] = &self.prepared;
        // Most loans use none: no write to counters every thread shares.
        for (counter, n) in [
            (hits, stats.hits),
            (misses, stats.misses),
            (evicted, stats.evictions),
        ] {
            if n > 0 {
                counter.increment(n);
            }
        }
    }

    /// A client was lent a server connection: an idle one or a new one.
    pub fn checkout(&self, idle: bool) {
        match idle {
            true => self.idle.increment(1),
            false => self.new.increment(1),
        }
    }
}

/// A transaction of a pooled client of `listener` was held for a planned switchover.
pub fn switchover_hold(listener: &str) {
    counter!(SWITCHOVER_HOLDS, "listener" => listener.to_owned()).increment(1);
}

/// A session-pooled client at rest on a primary Patroni is switching away from: `moved`
/// to the next one, `stayed` (it holds state there), or `failed` (ended).
pub fn switchover_move(result: &'static str) {
    counter!(SWITCHOVER_MOVES, "result" => result).increment(1);
}

/// A pooled server connection was found closed before the client's request reached it;
/// the request went to another connection, unseen by the client.
pub fn server_unsent(listener: &str) {
    counter!(SERVER_UNSENT, "listener" => listener.to_owned()).increment(1);
}

/// A server connection was reset for the next client: `ok`, or `failed` (then closed).
pub fn server_reset(result: &'static str) {
    counter!(SERVER_RESETS, "result" => result).increment(1);
}

/// A pooled server connection was opened (`ok`) or could not be (`failed`).
pub fn server_connect(result: &'static str) {
    counter!(SERVER_CONNECTS, "result" => result).increment(1);
}

/// Pooled server connections: idle in their pools, and lent to clients.
/// Pools open now (one per member, database and user).
pub fn pools(n: usize) {
    gauge!(POOLS).set(n as f64);
}

pub fn server_connections(idle: usize, in_use: usize) {
    gauge!(SERVER_CONNECTIONS, "state" => "idle").set(idle as f64);
    gauge!(SERVER_CONNECTIONS, "state" => "in_use").set(in_use as f64);
}

/// Exports at zero a supervised task's panic counter.
pub fn task_started(task: &str) {
    counter!(TASK_PANICS, "task" => task.to_owned()).absolute(0);
}
