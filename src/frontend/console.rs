//! The admin console: the virtual database `patroxy` (or `pgbouncer`) on any listener, for
//! the users in `auth.admin_users` (and, read only, `auth.stats_users`). It speaks the simple
//! query protocol and answers PgBouncer's commands with PgBouncer's column names, so its
//! users' habits and tools (psql, `prometheus-pgbouncer-exporter`) carry over: SHOW POOLS,
//! STATS, DATABASES, LISTS, CONFIG, VERSION, and patroxy's CLUSTERS and MEMBERS; PAUSE,
//! RESUME, RECONNECT and SHUTDOWN [WAIT_FOR_CLIENTS]. Commands are read and tables built without I/O (`parse`,
//! `Console::answer`); `run` only talks.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use pgwire::messages::data::{DataRow, FieldDescription, RowDescription};
use pgwire::messages::response::CommandComplete;
use tokio::io::AsyncReadExt;
use tokio::time::Instant;
use tracing::{info, warn};

use super::client_auth::authenticate;
use super::context::ListenerContext;
use super::negotiate::send_fatal;
use crate::backend::pool::DbStats;
use crate::discovery::Topology;
use crate::protocol::codes;
use crate::protocol::frame::split_frame;
use crate::protocol::messages::{self, Severity};
use crate::protocol::startup::StartupInfo;
use crate::stream::{send, Stream};
use crate::view::{PoolView, VERSION};

/// The database names that open the console instead of a server session.
pub const DATABASES: [&str; 2] = ["patroxy", "pgbouncer"];

/// Console commands are short.
const FRAME_LIMIT: usize = 65_536;

/// How long `PAUSE` waits for lent connections to come back before it answers anyway.
const PAUSE_WAIT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Show(String),
    Pause(Option<String>),
    Resume(Option<String>),
    Reconnect(Option<String>),
    Shutdown,
    Kill(Option<String>),
    Reload,
    /// Stop accepting; stop once every client has left.
    ShutdownWaitForClients,
}

impl Command {
    fn changes_things(&self) -> bool {
        !matches!(self, Command::Show(_))
    }
}

/// Reads one console command (case-insensitive, an optional `;`).
pub fn parse(sql: &str) -> Result<Command, String> {
    let text = sql.trim().trim_end_matches(';').trim();
    let words: Vec<&str> = text.split_whitespace().collect();
    let db = |w: Option<&&str>| w.map(|d| d.trim_matches('"').to_owned());
    let upper: Vec<String> = words.iter().map(|w| w.to_ascii_uppercase()).collect();
    match upper
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["SHOW", what] => Ok(Command::Show(what.to_string())),
        ["PAUSE"] | ["PAUSE", _] => Ok(Command::Pause(db(words.get(1)))),
        ["RESUME"] | ["RESUME", _] => Ok(Command::Resume(db(words.get(1)))),
        ["RECONNECT"] | ["RECONNECT", _] => Ok(Command::Reconnect(db(words.get(1)))),
        ["SHUTDOWN"] => Ok(Command::Shutdown),
        ["KILL"] | ["KILL", _] => Ok(Command::Kill(db(words.get(1)))),
        ["RELOAD"] => Ok(Command::Reload),
        ["SHUTDOWN", "WAIT_FOR_CLIENTS"] => Ok(Command::ShutdownWaitForClients),
        [] => Err("an empty command".into()),
        _ => Err(format!(
            "patroxy's console does not know {text:?}; try SHOW HELP"
        )),
    }
}

/// A result set: column names with their type (text or a 64-bit integer), and rows.
#[derive(Debug, Default, PartialEq)]
pub struct Table {
    pub columns: Vec<(&'static str, bool)>,
    pub rows: Vec<Vec<String>>,
}

impl Table {
    fn new(text: &[&'static str], ints: &[&'static str]) -> Table {
        let mut columns: Vec<(&'static str, bool)> = text.iter().map(|c| (*c, false)).collect();
        columns.extend(ints.iter().map(|c| (*c, true)));
        Table {
            columns,
            rows: Vec::new(),
        }
    }

    fn row(&mut self, values: Vec<String>) {
        self.rows.push(values);
    }
}

/// What the console shows, taken when a command comes.
pub struct Console<'a> {
    pub pools: Vec<PoolView>,
    /// The pooled clients connected now.
    pub clients: Vec<std::sync::Arc<crate::frontend::clients::Client>>,
    /// Idle server connections: pool, backend pid, opened, last used.
    pub idle_servers: Vec<(crate::backend::pool::PoolKey, i32, Instant, Instant)>,
    /// Clients held before any pool (PAUSE, a switchover), per (database, user).
    pub held: BTreeMap<(String, String), usize>,
    pub stats: BTreeMap<String, DbStats>,
    pub cluster: &'a str,
    pub topology: &'a Topology,
    pub config: &'a crate::config::PoolConfig,
    pub pool_mode: String,
}

impl Console<'_> {
    /// The table `SHOW what` answers with.
    pub fn show(&self, what: &str) -> Result<Table, String> {
        match what {
            "POOLS" => Ok(self.pools()),
            "STATS" => Ok(self.stats()),
            "DATABASES" => Ok(self.databases()),
            "LISTS" => Ok(self.lists()),
            "CONFIG" => Ok(self.config()),
            "VERSION" => {
                let mut t = Table::new(&["version"], &[]);
                t.row(vec![format!("patroxy {VERSION}")]);
                Ok(t)
            }
            "CLUSTERS" => Ok(self.clusters()),
            "CLIENTS" => Ok(self.clients()),
            "SERVERS" => Ok(self.servers()),
            "MEMBERS" => Ok(self.members()),
            "HELP" => {
                let mut t = Table::new(&["command"], &[]);
                for c in [
                    "SHOW POOLS|STATS|DATABASES|LISTS|CLIENTS|SERVERS|CONFIG|VERSION|CLUSTERS|MEMBERS",
                    "PAUSE [db]",
                    "RESUME [db]",
                    "RECONNECT [db]",
                    "KILL [db]",
                    "RELOAD",
                    "SHUTDOWN [WAIT_FOR_CLIENTS]",
                ] {
                    t.row(vec![c.to_owned()]);
                }
                Ok(t)
            }
            other => Err(format!(
                "SHOW {other} is not offered by patroxy's console; try SHOW HELP"
            )),
        }
    }

    /// Per (database, user), over the members' pools, as PgBouncer counts them.
    fn pools(&self) -> Table {
        let mut t = Table::new(
            &["database", "user"],
            &[
                "cl_active",
                "cl_waiting",
                "cl_active_cancel_req",
                "cl_waiting_cancel_req",
                "sv_active",
                "sv_active_cancel",
                "sv_being_canceled",
                "sv_idle",
                "sv_used",
                "sv_tested",
                "sv_login",
                "maxwait",
                "maxwait_us",
            ],
        );
        t.columns.push(("pool_mode", false));
        let mut sums: BTreeMap<(String, String), [usize; 3]> = BTreeMap::new();
        for p in &self.pools {
            let s = sums
                .entry((p.database.clone(), p.user.clone()))
                .or_default();
            s[0] += p.in_use;
            s[1] += p.waiting;
            s[2] += p.idle;
        }
        for (key, n) in &self.held {
            sums.entry(key.clone()).or_default()[1] += n;
        }
        for ((database, user), [active, waiting, idle]) in sums {
            let n = |v: usize| v.to_string();
            let z = || "0".to_owned();
            t.row(vec![
                database,
                user,
                n(active),
                n(waiting),
                z(),
                z(),
                n(active),
                z(),
                z(),
                n(idle),
                z(),
                z(),
                z(),
                z(),
                z(),
                self.pool_mode.clone(),
            ]);
        }
        t
    }

    fn stats(&self) -> Table {
        let mut t = Table::new(
            &["database"],
            &[
                "total_xact_count",
                "total_query_count",
                "total_received",
                "total_sent",
                "total_xact_time",
                "total_query_time",
                "total_wait_time",
                "total_requests",
            ],
        );
        for (database, s) in &self.stats {
            let n = |v: u64| v.to_string();
            t.row(vec![
                database.clone(),
                n(s.xact_count),
                n(s.query_count),
                n(s.received),
                n(s.sent),
                n(s.xact_time_us),
                // Time lent is all patroxy knows of query time.
                n(s.xact_time_us),
                n(s.wait_time_us),
                // PgBouncer 1.7's name for the query count, which older exporters read.
                n(s.query_count),
            ]);
        }
        t
    }

    fn databases(&self) -> Table {
        let mut t = Table::new(&["name", "host", "database"], &[]);
        t.columns.extend([
            ("port", true),
            ("pool_size", true),
            ("min_pool_size", true),
            ("reserve_pool", true),
            ("current_connections", true),
            ("paused", true),
        ]);
        t.columns.push(("pool_mode", false));
        let mut by_db: BTreeMap<&str, (Vec<&str>, usize)> = BTreeMap::new();
        for p in &self.pools {
            let e = by_db.entry(p.database.as_str()).or_default();
            if !e.0.contains(&p.server.as_str()) {
                e.0.push(&p.server);
            }
            e.1 += p.idle + p.in_use;
        }
        for (db, (servers, connections)) in by_db {
            t.row(vec![
                db.to_owned(),
                servers.join(","),
                db.to_owned(),
                "0".into(),
                self.config.pool_size.to_string(),
                self.config.min_pool_size.to_string(),
                "0".into(),
                connections.to_string(),
                "0".into(),
                self.pool_mode.clone(),
            ]);
        }
        t
    }

    fn lists(&self) -> Table {
        let mut t = Table::new(&["list"], &["items"]);
        let dbs: std::collections::BTreeSet<&str> =
            self.pools.iter().map(|p| p.database.as_str()).collect();
        let users: std::collections::BTreeSet<&str> =
            self.pools.iter().map(|p| p.user.as_str()).collect();
        let sum = |f: fn(&PoolView) -> usize| self.pools.iter().map(f).sum::<usize>();
        for (name, n) in [
            ("databases", dbs.len()),
            ("users", users.len()),
            ("pools", self.pools.len()),
            ("free_clients", 0),
            ("used_clients", sum(|p| p.in_use + p.waiting)),
            ("login_clients", 0),
            ("free_servers", 0),
            ("used_servers", sum(|p| p.in_use + p.idle)),
            ("dns_names", 0),
            ("dns_zones", 0),
            ("dns_queries", 0),
            ("dns_pending", 0),
        ] {
            t.row(vec![name.to_owned(), n.to_string()]);
        }
        t
    }

    fn config(&self) -> Table {
        type Get = fn(&crate::config::PoolConfig) -> String;
        fn secs(v: Duration) -> String {
            v.as_secs_f64().to_string()
        }
        let keys: [(&str, Get); 9] = [
            ("default_pool_size", |p| p.pool_size.to_string()),
            ("min_pool_size", |p| p.min_pool_size.to_string()),
            ("max_db_connections", |p| p.max_db_connections.to_string()),
            ("query_wait_timeout", |p| secs(p.query_wait_timeout)),
            ("server_idle_timeout", |p| secs(p.server_idle_timeout)),
            ("server_lifetime", |p| secs(p.server_lifetime)),
            ("server_reset_query", |p| p.server_reset_query.clone()),
            ("server_check_delay", |p| secs(p.server_check_delay)),
            ("max_prepared_statements", |p| {
                p.max_prepared_statements.to_string()
            }),
        ];
        let mut t = Table::new(&["key", "value", "default", "changeable"], &[]);
        let d = crate::config::PoolConfig::default();
        t.row(vec![
            "pool_mode".into(),
            self.pool_mode.clone(),
            "none".into(),
            "yes".into(),
        ]);
        for (key, get) in keys {
            t.row(vec![
                key.to_owned(),
                get(self.config),
                get(&d),
                "yes".into(),
            ]);
        }
        t
    }

    /// One row per pooled client, as PgBouncer lists them (its server in `link`).
    fn clients(&self) -> Table {
        let mut t = Table::new(&["type", "user", "database", "state", "addr"], &["port"]);
        t.columns.extend([
            ("connect_time", false),
            ("link", false),
            ("remote_pid", true),
            ("listener", false),
            ("pinned", false),
        ]);
        for c in &self.clients {
            let state = match c.state.load(std::sync::atomic::Ordering::Relaxed) {
                crate::frontend::clients::ACTIVE => "active",
                crate::frontend::clients::WAITING => "waiting",
                _ => "idle",
            };
            let server = c.server();
            t.row(vec![
                "C".into(),
                c.user.clone(),
                c.database.clone(),
                state.into(),
                c.addr.ip().to_string(),
                c.addr.port().to_string(),
                humantime::format_rfc3339_seconds(c.connected_at).to_string(),
                server
                    .as_ref()
                    .map(|(ep, _)| ep.to_string())
                    .unwrap_or_default(),
                server.map(|(_, pid)| pid.to_string()).unwrap_or_default(),
                c.listener.clone(),
                c.pinned().unwrap_or_default(),
            ]);
        }
        t
    }

    /// One row per server connection: those lent to clients (`active`) and the idle ones.
    fn servers(&self) -> Table {
        let mut t = Table::new(&["type", "user", "database", "state", "addr"], &["port"]);
        t.columns
            .extend([("connect_time", false), ("remote_pid", true)]);
        let (now, wall) = (Instant::now(), std::time::SystemTime::now());
        let at = |i: Instant| {
            humantime::format_rfc3339_seconds(wall - now.duration_since(i)).to_string()
        };
        for c in &self.clients {
            if let Some((ep, pid)) = c.server() {
                let row = vec![
                    "S".into(),
                    c.user.clone(),
                    c.database.clone(),
                    "active".into(),
                ];
                t.row(
                    [
                        row,
                        vec![
                            ep.host.to_string(),
                            ep.port.to_string(),
                            String::new(),
                            pid.to_string(),
                        ],
                    ]
                    .concat(),
                );
            }
        }
        for (key, pid, opened, _) in &self.idle_servers {
            t.row(vec![
                "S".into(),
                key.user.clone(),
                key.database.clone(),
                "idle".into(),
                key.endpoint.host.to_string(),
                key.endpoint.port.to_string(),
                at(*opened),
                pid.to_string(),
            ]);
        }
        t
    }

    fn clusters(&self) -> Table {
        let v = crate::view::cluster(self.cluster, self.topology, None);
        let mut t = Table::new(
            &["name", "leader", "primary", "unroutable", "switchover"],
            &["epoch", "members"],
        );
        let or_empty = |o: Option<String>| o.unwrap_or_default();
        t.row(vec![
            v.name,
            or_empty(v.leader),
            or_empty(v.primary),
            or_empty(v.unroutable),
            or_empty(v.switchover),
            v.epoch.to_string(),
            v.members.len().to_string(),
        ]);
        t
    }

    fn members(&self) -> Table {
        let v = crate::view::cluster(self.cluster, self.topology, None);
        let mut t = Table::new(&["cluster", "member", "host", "role", "state"], &[]);
        t.columns.extend([("timeline", true), ("lag", true)]);
        for m in v.members {
            t.row(vec![
                self.cluster.to_owned(),
                m.name,
                m.address.unwrap_or_default(),
                m.role,
                m.state,
                m.timeline.map(|x| x.to_string()).unwrap_or_default(),
                m.lag.map(|x| x.to_string()).unwrap_or_default(),
            ]);
        }
        t
    }
}

/// RowDescription, DataRows and CommandComplete for a table (an empty value is NULL in an
/// integer column).
fn encode(table: &Table, tag: &str) -> BytesMut {
    let mut out = BytesMut::new();
    let fields = table
        .columns
        .iter()
        .map(|(name, int)| {
            let (oid, size) = if *int { (20, 8) } else { (25, -1) };
            FieldDescription::new((*name).to_owned(), 0, 0, oid, size, -1, 0)
        })
        .collect();
    out.extend_from_slice(&messages::encode(&RowDescription::new(fields)));
    for row in &table.rows {
        let mut data = BytesMut::new();
        for (value, (_, int)) in row.iter().zip(&table.columns) {
            if *int && value.is_empty() {
                data.put_i32(-1);
            } else {
                data.put_i32(value.len() as i32);
                data.extend_from_slice(value.as_bytes());
            }
        }
        let n = row.len() as i16;
        out.extend_from_slice(&messages::encode(&DataRow::new(data, n)));
    }
    out.extend_from_slice(&messages::encode(&CommandComplete::new(tag.to_owned())));
    out
}

/// Serves one console client from its startup message to its Terminate.
pub async fn run(
    mut client: Stream,
    peer: SocketAddr,
    mut buf: BytesMut,
    startup: StartupInfo,
    ctx: &ListenerContext,
    started: Instant,
) {
    let user = startup.user.clone().unwrap_or_default();
    let auth = ctx.auth.clone();
    let deadline = started + ctx.proxy.timeouts.startup;
    let secret = auth.users.get(&user).cloned();
    let authenticated = tokio::time::timeout_at(
        deadline,
        // auth.trust is for pooled clients; the console trusts only auth.console_trust.
        authenticate(
            &mut client,
            &mut buf,
            (&user, peer.ip()),
            &auth,
            &auth.console_trust,
            secret.as_ref(),
        ),
    )
    .await;
    let owed = match authenticated {
        Ok(Ok((_, owed))) => owed,
        Ok(Err(e)) => {
            crate::metrics::auth_failure(&ctx.name, e.label());
            if let Some((code, msg)) = e.client_error() {
                send_fatal(&mut client, code, &msg).await;
            }
            warn!(client = %peer, listener = %ctx.name, user, reason = %e, "console authentication failed");
            return;
        }
        Err(_) => return,
    };
    let admin = auth.admin_users.contains(&user);
    if !admin && !auth.stats_users.contains(&user) {
        let msg = format!("patroxy: user \"{user}\" may not use the admin console (auth.admin_users, auth.stats_users)");
        send_fatal(&mut client, codes::INVALID_AUTHORIZATION, &msg).await;
        warn!(client = %peer, listener = %ctx.name, user, "console refused: not an admin or stats user");
        return;
    }
    let mut hello = owed;
    for (name, value) in [
        ("server_version", "16.0 (patroxy console)"),
        ("server_encoding", "UTF8"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("TimeZone", "UTC"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
        ("application_name", ""),
    ] {
        messages::put_parameter_status(&mut hello, name, value);
    }
    // Held for the session, so no data client draws it; a cancel with it finds nothing.
    let key = ctx
        .proxy
        .cancels
        .reserve(ctx.proxy.cancel_tag, startup.minor.min(2));
    hello.extend_from_slice(&messages::backend_key_data(key.key()));
    hello.extend_from_slice(&messages::ready_for_query_idle());
    if send(&mut client, &hello).await.is_err() {
        return;
    }
    info!(client = %peer, listener = %ctx.name, user, admin, "console session opened");
    loop {
        let frame = loop {
            match split_frame(&mut buf, FRAME_LIMIT) {
                Ok(Some(f)) => break f,
                Ok(None) => {}
                Err(e) => {
                    let msg = format!("patroxy: {e}");
                    send_fatal(&mut client, codes::PROTOCOL_VIOLATION, &msg).await;
                    return;
                }
            }
            tokio::select! {
                read = client.read_buf(&mut buf) => match read {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                },
                _ = ctx.proxy.shutdown.cancelled() => {
                    send_fatal(&mut client, codes::ADMIN_SHUTDOWN, "patroxy is shutting down").await;
                    return;
                }
            }
        };
        let reply = match frame.tag {
            codes::TERMINATE => return,
            codes::QUERY => {
                let sql = String::from_utf8_lossy(
                    frame.body().split(|b| *b == 0).next().unwrap_or_default(),
                )
                .into_owned();
                let mut out = match answer(&sql, admin, ctx).await {
                    Ok(reply) => reply,
                    Err((code, msg)) => {
                        BytesMut::from(&messages::error_response(Severity::Error, code, &msg)[..])
                    }
                };
                out.extend_from_slice(&messages::ready_for_query_idle());
                info!(client = %peer, user, command = %sql.trim(), "console command");
                out
            }
            codes::SYNC => {
                let msg = "patroxy: the admin console speaks the simple query protocol only";
                let mut out = BytesMut::from(
                    &messages::error_response(Severity::Error, codes::FEATURE_NOT_SUPPORTED, msg)[..],
                );
                out.extend_from_slice(&messages::ready_for_query_idle());
                out
            }
            // Extended-protocol messages before their Sync: answered at the Sync.
            _ => continue,
        };
        if send(&mut client, &reply).await.is_err() {
            return;
        }
    }
}

/// Runs one command: its table or its tag, or an error with its SQLSTATE.
async fn answer(
    sql: &str,
    admin: bool,
    ctx: &ListenerContext,
) -> Result<BytesMut, (&'static str, String)> {
    let command = parse(sql).map_err(|e| (codes::SYNTAX_ERROR, format!("patroxy: {e}")))?;
    if command.changes_things() && !admin {
        let msg = "patroxy: this command needs an admin user (auth.admin_users); stats users may only SHOW";
        return Err((codes::INSUFFICIENT_PRIVILEGE, msg.to_owned()));
    }
    let pools = &ctx.proxy.pools;
    let tag = match &command {
        Command::Show(what) => {
            let topology = ctx.topology.borrow().clone();
            let console = Console {
                pools: pools.views(),
                clients: ctx.proxy.clients.all(),
                idle_servers: pools.idle_servers(),
                held: pools.held(),
                stats: pools.stats(),
                cluster: &ctx.cluster,
                topology: &topology,
                config: &ctx.pool,
                pool_mode: ctx.pool_mode.to_string(),
            };
            let table = console
                .show(what)
                .map_err(|e| (codes::FEATURE_NOT_SUPPORTED, format!("patroxy: {e}")))?;
            return Ok(encode(&table, "SHOW"));
        }
        Command::Pause(db) => {
            pools.pause(db.as_deref(), true);
            // As PgBouncer: answered once the transactions running have let their
            // connections go (or after a while, saying so in the log).
            let until = Instant::now() + PAUSE_WAIT;
            while pools.lent(db.as_deref()) > 0 && Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            "PAUSE"
        }
        Command::Resume(db) => {
            pools.pause(db.as_deref(), false);
            "RESUME"
        }
        Command::Reconnect(db) => {
            pools.reconnect(db.as_deref());
            "RECONNECT"
        }
        Command::Shutdown => {
            ctx.proxy.shutdown.cancel();
            "SHUTDOWN"
        }
        Command::Reload => {
            ctx.proxy.reload_requests.notify_one();
            "RELOAD"
        }
        Command::Kill(db) => {
            ctx.proxy.clients.kill(db.as_deref());
            "KILL"
        }
        Command::ShutdownWaitForClients => {
            ctx.proxy.wait_for_clients.cancel();
            "SHUTDOWN"
        }
    };
    Ok(BytesMut::from(
        &messages::encode(&CommandComplete::new(tag.to_owned()))[..],
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_read_as_pgbouncer_reads_them() {
        assert_eq!(parse("show pools;"), Ok(Command::Show("POOLS".into())));
        assert_eq!(parse("  SHOW  stats "), Ok(Command::Show("STATS".into())));
        assert_eq!(parse("PAUSE"), Ok(Command::Pause(None)));
        assert_eq!(
            parse("pause appdb"),
            Ok(Command::Pause(Some("appdb".into())))
        );
        assert_eq!(
            parse("RESUME \"appdb\";"),
            Ok(Command::Resume(Some("appdb".into())))
        );
        assert_eq!(parse("reconnect"), Ok(Command::Reconnect(None)));
        assert_eq!(parse("SHUTDOWN"), Ok(Command::Shutdown));
        assert_eq!(parse("reload;"), Ok(Command::Reload));
        assert_eq!(
            parse("shutdown wait_for_clients"),
            Ok(Command::ShutdownWaitForClients)
        );
        assert!(parse("DROP TABLE x").is_err());
        assert!(parse("").is_err());
    }

    #[test]
    fn pools_sum_the_members_of_a_database_and_user() {
        let view = |server: &str, idle, in_use| PoolView {
            server: server.into(),
            database: "app".into(),
            user: "alice".into(),
            wants: "primary".into(),
            size: 8,
            idle,
            in_use,
            waiting: 1,
        };
        let topology = Topology::default();
        let config = crate::config::PoolConfig::default();
        let console = Console {
            pools: vec![view("a:5432", 2, 1), view("b:5432", 1, 3)],
            clients: Vec::new(),
            idle_servers: Vec::new(),
            held: BTreeMap::new(),
            stats: BTreeMap::new(),
            cluster: "demo",
            topology: &topology,
            config: &config,
            pool_mode: "transaction".into(),
        };
        let t = console.show("POOLS").unwrap();
        assert_eq!(t.rows.len(), 1);
        let col = |name: &str| {
            let i = t.columns.iter().position(|(c, _)| *c == name).unwrap();
            t.rows[0][i].clone()
        };
        assert_eq!(col("cl_active"), "4");
        assert_eq!(col("cl_waiting"), "2");
        assert_eq!(col("sv_idle"), "3");
        assert_eq!(col("pool_mode"), "transaction");
        assert!(t.rows.iter().all(|r| r.len() == t.columns.len()));
        for what in [
            "STATS",
            "DATABASES",
            "LISTS",
            "CONFIG",
            "VERSION",
            "CLUSTERS",
            "MEMBERS",
            "HELP",
            "CLIENTS",
            "SERVERS",
        ] {
            let t = console.show(what).unwrap();
            assert!(t.rows.iter().all(|r| r.len() == t.columns.len()), "{what}");
        }
        assert!(console.show("FDS").is_err());
        let wire = encode(&t, "SHOW");
        assert_eq!(wire[0], b'T');
    }
}
