//! One client of a pooled listener: patroxy authenticates it, lends it a server connection
//! from the pool of the member routing picks (opening one, logged in as the same user, when
//! none is idle), applies its parameters, greets it with the server's parameters and
//! patroxy's own cancel key, and relays. `session` mode lends the connection until the client
//! leaves, then takes it back after a reset; `transaction` mode lends one per transaction, from
//! the client's first message to the ReadyForQuery that ends it. A connection that is not
//! clean, or whose member stopped being what the listener wants, is closed instead.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::time::{timeout_at, Instant};
use tracing::{info, warn};

use super::client_auth::authenticate;
use super::clients::{self, Client};
use super::context::ListenerContext;
use super::moving::{self, Verdict};
use super::negotiate::send_fatal;
use super::relay::{relay, session_state, End, RelayContext};
use crate::auth::scram::Credential;
use crate::auth::userlist::Secret;
use crate::backend::conn::{ConnError, Login, Opener, ServerConn};
use crate::backend::pool::{Caps, DbStats, Defaults, Lease, PoolKey};
use crate::backoff::Backoff;
use crate::config::PoolMode;
use crate::protocol::codes;
use crate::protocol::messages::{self, Severity};
use crate::protocol::prepared::{ClientStatements, Rewriter};
use crate::protocol::startup::{CancelKey, StartupInfo};
use crate::routing::drain::DrainCause;
use crate::routing::{self, switchover, Target};
use crate::stream::{send, Stream};
use tokio_util::sync::CancellationToken;

/// Startup parameters that are the connection's, not settings to apply.
const NOT_SETTINGS: [&str; 3] = ["options", "replication", "_pq_.protocol_managed_params"];

/// Why a pooled client got no server connection.
#[derive(Debug, thiserror::Error)]
enum CheckoutError {
    #[error("no {role} server after waiting {waited:?}: {why}")]
    NoServer {
        role: String,
        waited: Duration,
        why: String,
    },
    #[error("{0}")]
    Pool(#[from] crate::backend::pool::PoolError),
    #[error("server {server}: {source}")]
    Server { server: String, source: ConnError },
}

impl CheckoutError {
    fn label(&self) -> &'static str {
        match self {
            CheckoutError::NoServer { .. } => "no_server",
            CheckoutError::Pool(_) => "pool_wait_timeout",
            CheckoutError::Server { .. } => "server_refused",
        }
    }

    fn client_error(&self) -> (&'static str, String) {
        match self {
            CheckoutError::NoServer { .. } => (
                codes::CANNOT_CONNECT_NOW,
                format!("patroxy: {self}; retry later"),
            ),
            CheckoutError::Pool(_) => (codes::TOO_MANY_CONNECTIONS, format!("patroxy: {self}")),
            CheckoutError::Server {
                source: ConnError::Refused { sqlstate, message },
                ..
            } => {
                let code = match sqlstate.as_str() {
                    codes::INVALID_PASSWORD => codes::INVALID_PASSWORD,
                    codes::INVALID_AUTHORIZATION => codes::INVALID_AUTHORIZATION,
                    _ => codes::CONNECTION_FAILURE,
                };
                (code, format!("patroxy: the server refused: {message}"))
            }
            CheckoutError::Server { .. } => (codes::CONNECTION_FAILURE, format!("patroxy: {self}")),
        }
    }
}

pub async fn run_pooled(
    mut client: Stream,
    peer: SocketAddr,
    mut client_buf: BytesMut,
    startup: StartupInfo,
    ctx: &ListenerContext,
    started: Instant,
) {
    let proxy = &ctx.proxy;
    let user = startup.user.clone().unwrap_or_default();
    let database = startup.database.clone().unwrap_or_else(|| user.clone());
    let deadline = started + proxy.timeouts.startup;
    let mut topology = ctx.topology.clone();
    // The login phases are boxed: an idle client's task keeps room only for what it does
    // after them.
    let authenticated = Box::pin(timeout_at(deadline, async {
        let secret = match ctx.auth.users.get(&user) {
            Some(s) => Some(s.clone()),
            None => lookup_secret(ctx, &user, &database, &mut topology).await,
        };
        let auth = &ctx.auth;
        authenticate(
            &mut client,
            &mut client_buf,
            &user,
            peer.ip(),
            auth,
            secret.as_ref(),
        )
        .await
    }))
    .await;
    let (login, owed) = match authenticated {
        Ok(Ok(done)) => done,
        Ok(Err(e)) => {
            crate::metrics::auth_failure(&ctx.name, e.label());
            if let Some((code, msg)) = e.client_error() {
                send_fatal(&mut client, code, &msg).await;
            }
            warn!(client = %peer, listener = %ctx.name, user, database, reason = %e, "client authentication failed");
            return;
        }
        Err(_) => {
            crate::metrics::auth_failure(&ctx.name, "timeout");
            let msg = "patroxy: authentication did not finish within the startup timeout";
            send_fatal(&mut client, codes::PROTOCOL_VIOLATION, msg).await;
            return;
        }
    };
    // patroxy answers the startup itself, from what it knows of the server the client will
    // use: the client holds no server connection until its first message.
    let welcomed = tokio::select! {
        r = Box::pin(server_defaults(ctx, &login, &user, &database, &mut topology)) => r,
        _ = proxy.shutdown.cancelled() => {
            send_fatal(&mut client, codes::ADMIN_SHUTDOWN, "patroxy is shutting down").await;
            return;
        }
    };
    let defaults = match welcomed {
        Ok(d) => d,
        Err(e) => {
            crate::metrics::connect_failure(&ctx.name, e.label());
            let (code, msg) = e.client_error();
            send_fatal(&mut client, code, &msg).await;
            warn!(client = %peer, listener = %ctx.name, user, database, reason = %e, "pooled session got no server");
            return;
        }
    };
    // The settings this client wants on whichever server connection serves it. Every
    // reported setting has a wanted value (the login default unless the client said
    // otherwise), so no other client's choice survives on a connection this one gets; the
    // client's own changes, as the server reports them, are followed.
    let mut asked: Vec<(String, String)> = startup
        .params
        .iter()
        .filter(|(name, _)| !NOT_SETTINGS.contains(&name.as_str()))
        .cloned()
        .collect();
    // `options` (libpq's PGOPTIONS): its `-c name=value` settings, as PostgreSQL reads them.
    if let Some((_, options)) = startup.params.iter().find(|(n, _)| n == "options") {
        asked.extend(option_settings(options));
    }
    let mut wanted = Wanted {
        defaults: defaults.clone(),
        own: BTreeMap::new(),
    };
    for (name, value) in &asked {
        wanted.insert(name.clone(), value.clone());
    }
    // patroxy's own key: the server connection behind it changes from client to client.
    let key = crate::backend::cancel::tagged_key(proxy.cancel_tag);
    let hello = greeting(&owed, &defaults, &asked, &key);
    // Nothing of the startup outlives it: an idle client keeps only what it needs.
    drop((owed, asked));
    if send(&mut client, &hello).await.is_err() {
        return;
    }
    drop(hello);
    crate::metrics::connected(&ctx.name, started.elapsed());
    let listed = proxy.clients.add(Client {
        user: user.clone(),
        database: database.clone(),
        addr: peer,
        listener: ctx.name.clone(),
        connected_at: std::time::SystemTime::now(),
        state: clients::IDLE.into(),
        server: Default::default(),
        kill: CancellationToken::new(),
    });
    let session = Session {
        ctx,
        peer,
        user: &user,
        database: &database,
        login: &login,
        key,
        started,
        me: &listed.client,
    };
    let per_transaction = ctx.pool_mode == PoolMode::Transaction;
    let ended = session
        .serve(
            &mut client,
            client_buf,
            &mut wanted,
            &mut topology,
            per_transaction,
        )
        .await;
    info!(
        client = %peer,
        listener = %ctx.name,
        user,
        database,
        mode = %ctx.pool_mode,
        transactions = ended.transactions,
        duration_ms = started.elapsed().as_millis() as u64,
        bytes_up = ended.bytes_up,
        bytes_down = ended.bytes_down,
        reason = %ended.end,
        "session closed"
    );
    if let End::Drained { cause, .. } = &ended.end {
        crate::metrics::drain(&ctx.name, cause.label());
    }
    let route = crate::metrics::Route {
        listener: &ctx.name,
        role: ctx.policy.role.as_str(),
    };
    crate::metrics::session_closed(route, ended.end.label(), ended.bytes_up, ended.bytes_down);
}

/// A server connection lent to the client, and where it is.
struct Attached {
    lease: Lease,
    conn: ServerConn,
    target: Target,
}

/// How a pooled client's session ended, in all.
struct Ended {
    end: End,
    transactions: u64,
    bytes_up: u64,
    bytes_down: u64,
}

/// One authenticated pooled client.
struct Session<'a> {
    ctx: &'a ListenerContext,
    peer: SocketAddr,
    user: &'a str,
    database: &'a str,
    login: &'a Login,
    /// The cancel key the client was given.
    key: CancelKey,
    started: Instant,
    /// Its entry in the console's list of clients.
    me: &'a Client,
}

type Topo = tokio::sync::watch::Receiver<std::sync::Arc<crate::discovery::Topology>>;

impl Session<'_> {
    /// Lends the client a server connection from its first message on: until it leaves
    /// (session mode), or (`per_transaction`) until the ReadyForQuery that ends each
    /// transaction. Between transactions the client holds nothing, and a leader change does
    /// not touch it.
    async fn serve(
        &self,
        client: &mut Stream,
        mut buf: BytesMut,
        wanted: &mut Wanted,
        topology: &mut Topo,
        per_transaction: bool,
    ) -> Ended {
        let proxy = &self.ctx.proxy;
        // The client's named statements, carried from connection to connection.
        let mut statements = ClientStatements::default();
        // Session pooling: the Parse messages of the named statements a client that left
        // its server for a switchover had there, for its next one.
        let mut replay: Vec<Bytes> = Vec::new();
        // Since when a transaction has failed to get a usable connection.
        let mut retrying: Option<Instant> = None;
        let mut total = Ended {
            end: End::ClientClosed,
            transactions: 0,
            bytes_up: 0,
            bytes_down: 0,
        };
        loop {
            if buf.is_empty() {
                tokio::select! {
                    read = client.read_next(&mut buf) => match read {
                        Ok(0) => return total,
                        Ok(_) => {}
                        Err(e) => {
                            total.end = End::ClientIo(e);
                            return total;
                        }
                    },
                    _ = proxy.shutdown.cancelled() => {
                        send_fatal(client, codes::ADMIN_SHUTDOWN, "terminating connection because patroxy is shutting down").await;
                        total.end = End::Drained { cause: crate::routing::drain::DrainCause::Shutdown, forced: false };
                        return total;
                    }
                    _ = self.me.kill.cancelled() => return self.killed(client, total).await,
                }
            }
            if buf[..] == TERMINATE {
                return total;
            }
            if per_transaction {
                let context = wanted.get("search_path").unwrap_or_default().to_owned();
                if let Some(reply) = statements.answer_locally(&buf, &context) {
                    buf.clear();
                    if let Err(e) = send(client, &reply).await {
                        total.end = End::ClientIo(e);
                        return total;
                    }
                    continue;
                }
            }
            self.me.set(clients::WAITING);
            // While it waits for a server, the client is watched: one that gives up is not
            // logged in for when a server appears (what it sends meanwhile is kept).
            let mut waiting = Box::pin(checkout(
                self.ctx,
                self.login,
                self.user,
                self.database,
                topology,
            ));
            let checked_out = loop {
                tokio::select! {
                    r = &mut waiting => break r,
                    read = client.read_next(&mut buf) => match read {
                        Ok(0) => return total,
                        Ok(_) if buf.ends_with(&TERMINATE) => return total,
                        Ok(_) => continue,
                        Err(e) => {
                            total.end = End::ClientIo(e);
                            return total;
                        }
                    },
                    _ = self.me.kill.cancelled() => return self.killed(client, total).await,
                    _ = proxy.shutdown.cancelled() => {
                        send_fatal(client, codes::ADMIN_SHUTDOWN, "terminating connection because patroxy is shutting down").await;
                        total.end = End::Drained { cause: crate::routing::drain::DrainCause::Shutdown, forced: false };
                        return total;
                    }
                }
            };
            drop(waiting);
            let (lease, mut conn, target) = match checked_out {
                Ok(c) => c,
                Err(e) => {
                    crate::metrics::connect_failure(&self.ctx.name, e.label());
                    let (code, msg) = e.client_error();
                    send_fatal(client, code, &msg).await;
                    warn!(client = %self.peer, listener = %self.ctx.name, user = self.user, reason = %e, "no server for a transaction");
                    total.end = End::ServerClosed;
                    return total;
                }
            };
            // Bounded: a server that froze without closing anything would hold the client
            // here, where no drain reaches.
            let limit = proxy.timeouts.connect.max(Duration::from_secs(1));
            // After a move, the client's named statements are prepared again first.
            let prepared = async {
                apply_params(&mut conn, wanted).await?;
                match replay.is_empty() {
                    true => Ok(()),
                    false => conn.prepare_all(&replay).await,
                }
            };
            let applied = tokio::time::timeout(limit, prepared)
                .await
                .unwrap_or(Err(ConnError::Timeout));
            if let Err(e) = applied {
                // The connection is closed; the client's transaction has not started, so it
                // tries again with another one, within connect_wait.
                warn!(client = %self.peer, server = %conn.endpoint, error = %e, "applying the session's parameters failed; server connection closed");
                drop((lease, conn));
                if may_retry(&mut retrying, proxy.timeouts.connect_wait) {
                    continue;
                }
                let msg = format!("patroxy: applying the session's parameters: {e}");
                send_fatal(client, codes::CONNECTION_FAILURE, &msg).await;
                total.end = End::ServerClosed;
                return total;
            }
            // Kept until the request is sent: a connection found dead takes none of it.
            let replayed = std::mem::take(&mut replay);
            self.me.set(clients::ACTIVE);
            let pid = conn.key.as_ref().map_or(0, |k| k.pid);
            self.me.hold(Some((conn.endpoint.clone(), pid)));
            let attached = Attached {
                lease,
                conn,
                target,
            };
            let pending = std::mem::take(&mut buf);
            // Boxed: between transactions an idle client keeps only this loop's small state,
            // not room for a relay.
            let one = Box::pin(self.attach(
                client,
                pending,
                attached,
                per_transaction,
                topology,
                (&mut *wanted, &mut statements, &mut replay),
            ))
            .await;
            self.me.set(clients::IDLE);
            self.me.hold(None);
            let one = match one {
                Ok(one) => one,
                // Nothing reached the dead connection: the same request goes to another.
                Err(unsent) if may_retry(&mut retrying, proxy.timeouts.connect_wait) => {
                    buf = unsent;
                    replay = replayed;
                    continue;
                }
                Err(_) => {
                    let msg = "patroxy: every server connection tried was closed before the request reached it";
                    send_fatal(client, codes::CONNECTION_FAILURE, msg).await;
                    total.end = End::ServerClosed;
                    return total;
                }
            };
            retrying = None;
            total.transactions += 1;
            total.bytes_up += one.bytes_up;
            total.bytes_down += one.bytes_down;
            if !matches!(one.end, End::Released | End::Moved) {
                total.end = one.end;
                return total;
            }
        }
    }

    /// Session pooling, at a planned switchover: whether the client may leave its server
    /// connection for the next primary. If it may, the settings it made in its session
    /// become its own (set on its next connection), and the Parse messages that recreate its
    /// named statements come back.
    async fn leave(
        &self,
        conn: &mut ServerConn,
        wanted: &mut Wanted,
    ) -> Result<Option<Vec<Bytes>>, ConnError> {
        match moving::inspect(conn).await? {
            Verdict::Stays(held) => {
                info!(client = %self.peer, server = %conn.endpoint, %held, "session holds state on its server; it stays there through the switchover");
                Ok(None)
            }
            Verdict::Moves(parses) => {
                tidy(conn, session_state::SET, wanted).await?;
                Ok(Some(parses))
            }
        }
    }

    /// Ends the session for the console's KILL.
    async fn killed(&self, client: &mut Stream, mut total: Ended) -> Ended {
        let cause = DrainCause::Killed;
        send_fatal(client, codes::ADMIN_SHUTDOWN, &cause.client_message()).await;
        total.end = End::Drained {
            cause,
            forced: false,
        };
        total
    }

    /// Relays with a lent server connection until the client leaves, or (transaction mode)
    /// the transaction ends; then gives the connection back if it is clean.
    /// `Err`: the connection was found closed before any of the client's bytes went to it
    /// (a pooled connection that died a moment ago); they come back, for another one.
    async fn attach(
        &self,
        client: &mut Stream,
        client_buf: BytesMut,
        attached: Attached,
        release_at_idle: bool,
        topology: &mut Topo,
        (wanted, statements, replay): (&mut Wanted, &mut ClientStatements, &mut Vec<Bytes>),
    ) -> Result<Ended, BytesMut> {
        let proxy = &self.ctx.proxy;
        let Attached {
            lease,
            mut conn,
            target,
        } = attached;
        let lent_at = Instant::now();
        let _load = proxy.load.claim(&target.endpoint);
        let _registration = conn.key.clone().map(|server_key| {
            proxy
                .cancels
                .register(self.key.clone(), conn.endpoint.clone(), server_key)
        });
        // A statement means what it means under its search path: part of its identity.
        let context = wanted.get("search_path").unwrap_or_default().to_owned();
        let cache_before = conn.prepared.stats;
        // Session pooling on a primary listener: the client leaves its server connection
        // for the next primary when Patroni announces a switchover, if it holds nothing
        // there that cannot follow it.
        let mut movable = !release_at_idle && self.ctx.policy.role.wants_standby() == Some(false);
        let mut client_buf = client_buf;
        let (mut up_before, mut down_before, mut queries_before) = (0, 0, 0);
        let mut reported_before = Vec::new();
        let mut out = loop {
            let leftover = std::mem::take(&mut conn.buf);
            let rewrite = release_at_idle.then(|| Rewriter {
                client: &mut *statements,
                server: &mut conn.prepared,
                capacity: self.ctx.pool.max_prepared_statements,
                context: &context,
            });
            let relay_ctx = RelayContext {
                policy: &self.ctx.policy,
                policy_updates: self.ctx.policy_updates.clone(),
                member: &target.member,
                server: &target.endpoint,
                timeouts: &proxy.timeouts,
                shutdown: &proxy.shutdown,
                keep_server: true,
                release_at_idle,
                rewrite,
                switchover_grace: movable.then_some(self.ctx.pool.switchover_grace),
                kill: Some(self.me.kill.clone()),
            };
            let out = relay(
                client,
                &mut conn.stream,
                std::mem::take(&mut client_buf),
                leftover,
                relay_ctx,
                topology,
            )
            .await;
            let End::Drained {
                cause: cause @ DrainCause::Switchover { .. },
                ..
            } = &out.end
            else {
                break out;
            };
            let limit = proxy.timeouts.connect.max(Duration::from_secs(1));
            let verdict = match out.server_clean {
                true => timeout_at(Instant::now() + limit, self.leave(&mut conn, wanted))
                    .await
                    .unwrap_or(Err(ConnError::Timeout)),
                false => Err(ConnError::Protocol("a client message was cut".into())),
            };
            match verdict {
                Ok(Some(parses)) => {
                    crate::metrics::switchover_move("moved");
                    info!(client = %self.peer, server = %target.endpoint, statements = parses.len(), "session leaves for the next primary (planned switchover)");
                    *replay = parses;
                    let mut out = out;
                    out.end = End::Moved;
                    break out;
                }
                Ok(None) => {
                    crate::metrics::switchover_move("stayed");
                    up_before += out.bytes_up;
                    down_before += out.bytes_down;
                    queries_before += out.queries;
                    reported_before.extend(out.reported);
                    movable = false;
                }
                Err(e) => {
                    crate::metrics::switchover_move("failed");
                    warn!(client = %self.peer, server = %target.endpoint, error = %e, "a session could not leave for the next primary; ended");
                    send_fatal(client, codes::ADMIN_SHUTDOWN, &cause.client_message()).await;
                    break out;
                }
            }
        };
        if let Some(unsent) = out.unsent.take() {
            info!(client = %self.peer, server = %target.endpoint, end = %out.end, "server connection closed before the client's request reached it; another one is used");
            crate::metrics::server_unsent(&self.ctx.name);
            return Err(unsent);
        }
        out.bytes_up += up_before;
        out.bytes_down += down_before;
        out.queries += queries_before;
        reported_before.append(&mut out.reported);
        out.reported = reported_before;
        crate::metrics::prepared(conn.prepared.stats - cache_before);
        proxy.pools.record(
            self.database,
            DbStats {
                xact_count: 1,
                query_count: out.queries,
                received: out.bytes_up,
                sent: out.bytes_down,
                xact_time_us: lent_at.elapsed().as_micros() as u64,
                wait_time_us: lease.waited.as_micros() as u64,
            },
        );
        // What the server reported is now true of the connection, and what the client wants.
        for (name, value) in out.reported {
            conn.params.insert(name.clone(), value.clone());
            if !SERVER_OWNED.contains(&name.as_str()) {
                wanted.insert(name, value);
            }
        }
        let p = out.progress;
        let at_rest = out.server_clean && p.in_flight == 0 && !p.unsynced;
        let mut end = out.end;
        let mut tidied = Ok(());
        if matches!(end, End::Released) && out.session_state != 0 {
            let limit = proxy.timeouts.connect.max(Duration::from_secs(1));
            tidied = timeout_at(
                Instant::now() + limit,
                tidy(&mut conn, out.session_state, wanted),
            )
            .await
            .unwrap_or(Err(ConnError::Timeout));
            if out.session_state & session_state::LISTEN != 0 {
                end = End::NeedsSession("LISTEN");
            }
        }
        // Transaction pooling: the server connection died under the client (a fast
        // shutdown, a crash). A client waiting for answers gets an error it can survive,
        // saying the outcome is unknown, and keeps its connection; one between statements
        // of a transaction block cannot be told in time, so its session ends.
        let mut lost = None;
        let died = matches!(end, End::ServerClosed | End::ServerIo(_));
        if release_at_idle && died {
            let why = match &out.server_fatal {
                Some(f) => format!("{} {}", f.sqlstate, f.message),
                None => end.to_string(),
            };
            let waiting = p.in_flight + u32::from(p.unsynced);
            if waiting > 0 && p.client_at_boundary {
                let msg = format!(
                    "patroxy: the server connection was lost during the transaction ({why}); the transaction may or may not have committed"
                );
                let mut answer = BytesMut::from(
                    &messages::error_response(
                        Severity::Error,
                        codes::TRANSACTION_RESOLUTION_UNKNOWN,
                        &msg,
                    )[..],
                );
                // Each request the client is waiting for ends with its own error and
                // ReadyForQuery, as a server that failed them one by one would answer.
                let error = answer.split().freeze();
                for _ in 0..waiting.max(1) {
                    answer.extend_from_slice(&error);
                    answer.extend_from_slice(&messages::ready_for_query_idle());
                }
                lost = Some(answer);
                end = End::Released;
            } else if p.tx_status == codes::TX_IDLE && p.client_at_boundary {
                end = End::Released;
                lost = Some(BytesMut::new());
            } else {
                let msg = format!("patroxy: the server connection was lost inside a transaction block ({why}); the transaction may or may not have committed");
                send_fatal(client, codes::TRANSACTION_RESOLUTION_UNKNOWN, &msg).await;
            }
        }
        let returned = match &end {
            _ if lost.is_some() => false,
            End::Released | End::NeedsSession(_) => match tidied {
                Ok(()) => true,
                Err(e) => {
                    warn!(server = %target.endpoint, error = %e, "server connection not reusable after its session state was undone; closed");
                    false
                }
            },
            End::ClientClosed if at_rest => {
                let reset = &self.ctx.pool.server_reset_query;
                let limit = proxy.timeouts.connect.max(Duration::from_secs(1));
                let reset = conn.reset(p.tx_status, reset, limit).await;
                crate::metrics::server_reset(if reset.is_ok() { "ok" } else { "failed" });
                match reset {
                    Ok(()) => true,
                    Err(e) => {
                        warn!(server = %target.endpoint, error = %e, "server connection not reusable after its reset; closed");
                        false
                    }
                }
            }
            _ => false,
        };
        if !matches!(end, End::Released) {
            tracing::debug!(
                client = %self.peer,
                server = %target.endpoint,
                connected_ms = self.started.elapsed().as_millis() as u64,
                returned,
                "server connection let go"
            );
        }
        if returned {
            lease.give_back(conn);
        }
        if let Some(answer) = lost.filter(|a| !a.is_empty()) {
            warn!(client = %self.peer, server = %target.endpoint, "server connection lost during a transaction; the client was told and stays");
            if let Err(e) = send(client, &answer).await {
                end = End::ClientIo(e);
            }
        }
        if let End::NeedsSession(what) = end {
            let msg = format!(
                "patroxy: {what} needs a server connection of its own, and listener {} pools transactions (pool_mode = transaction); use a session-pooled listener",
                self.ctx.name
            );
            send_fatal(client, codes::FEATURE_NOT_SUPPORTED, &msg).await;
        }
        Ok(Ended {
            end,
            transactions: 0,
            bytes_up: out.bytes_up,
            bytes_down: out.bytes_down,
        })
    }
}

/// Whether a transaction that has not started may try another server connection: within
/// `connect_wait` of its first failed attempt.
fn may_retry(retrying: &mut Option<Instant>, connect_wait: Duration) -> bool {
    retrying.get_or_insert_with(Instant::now).elapsed() < connect_wait
}

/// The client's Terminate, alone.
const TERMINATE: [u8; 5] = [codes::TERMINATE, 0, 0, 0, 4];

/// Reported parameters that describe the server, not a setting a client chose.
const SERVER_OWNED: [&str; 9] = [
    "in_hot_standby",
    "server_version",
    "server_encoding",
    "integer_datetimes",
    "is_superuser",
    "session_authorization",
    "default_transaction_read_only",
    "scram_iterations",
    "standard_conforming_strings",
];

/// How often a checkout looks again at a leader that is still being promoted.
const PROMOTION_PROBE: Duration = Duration::from_millis(10);

/// A server connection for the client, from the pool of the member routing picks, within
/// `connect_wait`.
async fn checkout(
    ctx: &ListenerContext,
    login: &Login,
    user: &str,
    database: &str,
    topology: &mut Topo,
) -> Result<(Lease, ServerConn, Target), CheckoutError> {
    let proxy = &ctx.proxy;
    let started = Instant::now();
    let deadline = started + proxy.timeouts.connect_wait;
    let turn = ctx.turn.fetch_add(1, Relaxed);
    let mut pause = Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
    let mut why = String::new();
    let mut held = None;
    let mut promoting = false;
    loop {
        let snapshot = topology.borrow_and_update().clone();
        let candidates = match admission(ctx, &snapshot, database) {
            Admission::Hold(why) => {
                if held.is_none() {
                    held = Some(proxy.pools.hold(database, user));
                    crate::metrics::switchover_hold(&ctx.name);
                }
                Err(why.to_owned())
            }
            // Fail closed: said at once, not after connect_wait.
            Admission::Refuse(why) => {
                return Err(CheckoutError::NoServer {
                    role: ctx.policy.role.to_string(),
                    waited: started.elapsed(),
                    why,
                })
            }
            Admission::Route(candidates) => {
                held = None;
                candidates.map_err(|e| e.to_string())
            }
        };
        match candidates {
            Err(e) => why = e,
            Ok(candidates) => {
                let load = &proxy.load;
                let ordered = routing::order(candidates, &ctx.policy, |ep| load.sessions(ep), turn);
                for target in ordered {
                    // A wait for this member's pool (its slots, a cap, a connect that gets
                    // no answer) ends when routing stops choosing it: a client queued
                    // behind a primary that died goes to the next one at once, and none
                    // is handed the old primary once a switchover is under way.
                    let mut watch = topology.clone();
                    let opened = tokio::select! {
                        opened = open_on(ctx, login, user, database, &target, &mut promoting) => opened?,
                        () = unrouted(ctx, &mut watch, database, &target) => {
                            Err(format!("{}: no longer routed to while waiting for it", target.endpoint))
                        }
                    };
                    match opened {
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
            return Err(CheckoutError::NoServer {
                role: ctx.policy.role.to_string(),
                waited: started.elapsed(),
                why,
            });
        }
    }
}

/// What routing allows a checkout right now.
enum Admission {
    /// Wait, and say why: the database is paused, or a planned switchover is under way.
    Hold(&'static str),
    /// Refuse at once (etcd lost under `fail-closed`).
    Refuse(String),
    Route(Result<Vec<Target>, routing::Unroutable>),
}

fn admission(
    ctx: &ListenerContext,
    snapshot: &crate::discovery::Topology,
    database: &str,
) -> Admission {
    // Pools of a primary listener hold new transactions (and new sessions) while Patroni
    // carries out a planned switchover: the old primary is about to stop.
    let holds = ctx.policy.role.wants_standby() == Some(false);
    let now = std::time::SystemTime::now();
    if ctx.proxy.pools.is_paused(database) {
        Admission::Hold("the database is paused (PAUSE on the admin console); held")
    } else if holds && switchover::under_way(snapshot, now, ctx.pool.switchover_grace) {
        Admission::Hold("a planned switchover is under way (Patroni's failover key); held")
    } else if let Some(why) = ctx.etcd_refusal(snapshot) {
        Admission::Refuse(why)
    } else {
        Admission::Route(routing::candidates(&ctx.policy, snapshot))
    }
}

/// Resolves once routing no longer admits `target`: another member, a hold, a refusal.
async fn unrouted(ctx: &ListenerContext, watch: &mut Topo, database: &str, target: &Target) {
    loop {
        if watch.changed().await.is_err() {
            // The topology's sender is gone only at shutdown; nothing changes any more.
            return std::future::pending().await;
        }
        let snapshot = watch.borrow_and_update().clone();
        let routed = match admission(ctx, &snapshot, database) {
            Admission::Route(Ok(c)) => c.iter().any(|t| t.endpoint == target.endpoint),
            _ => false,
        };
        if !routed {
            return;
        }
    }
}

/// A connection on `target`'s pool: an idle one that is still usable, or a new one.
/// `Ok(Err(why))`: none now, try again (a transient failure, such as a server still in
/// recovery: `promoting` is then set).
async fn open_on(
    ctx: &ListenerContext,
    login: &Login,
    user: &str,
    database: &str,
    target: &Target,
    promoting: &mut bool,
) -> Result<Result<(Lease, ServerConn), String>, CheckoutError> {
    let proxy = &ctx.proxy;
    let pool = proxy.pools.get(pool_key(ctx, target, user, database));
    let (lease, idle) = pool.lease().await?;
    crate::metrics::pool_wait(&ctx.name, lease.waited);
    if let Some(conn) = checked(idle, &ctx.pool, proxy.timeouts.connect).await {
        crate::metrics::pool_checkout(&ctx.name, "idle");
        return Ok(Ok((lease, conn)));
    }
    let caps = Caps {
        per_server: ctx.max_server_connections,
        per_database: ctx.pool.max_db_connections,
    };
    let wait_until = Instant::now() + ctx.pool.query_wait_timeout;
    let permits = proxy
        .pools
        .reserve(&pool.key, caps, wait_until, true)
        .await?;
    let opener = Opener {
        endpoint: target.endpoint.clone(),
        tls: ctx.server_tls.clone(),
        user: user.to_owned(),
        database: database.to_owned(),
        login: login.clone(),
        wants_standby: ctx.policy.role.wants_standby(),
        limit: proxy.timeouts.connect.max(proxy.timeouts.startup),
        tcp: proxy.timeouts.tcp(),
    };
    let opened = opener.open().await;
    crate::metrics::server_connect(if opened.is_ok() { "ok" } else { "failed" });
    match opened {
        Ok(mut conn) => {
            crate::metrics::pool_checkout(&ctx.name, "new");
            conn.permits = permits;
            conn.generation = pool.generation();
            pool.remember_defaults(&conn.defaults);
            pool.remember_opener(&opener, caps);
            Ok(Ok((lease, conn)))
        }
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

/// An idle connection, if it is still usable: one idle past `server_check_delay` must
/// answer an empty query first (a failed one is closed).
async fn checked(
    idle: Option<ServerConn>,
    settings: &crate::config::PoolConfig,
    limit: Duration,
) -> Option<ServerConn> {
    let mut conn = idle?;
    if conn.last_used.elapsed() <= settings.server_check_delay {
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

/// The secret of a user the auth_file does not have, from `auth_query` run as `auth_user`
/// on a connection of that user's pool (to the member the listener routes to). `None` for
/// a user PostgreSQL does not know, or without an `auth_user`, or when the query fails
/// (logged): the client then fails like one with a wrong password.
async fn lookup_secret(
    ctx: &ListenerContext,
    user: &str,
    database: &str,
    topology: &mut Topo,
) -> Option<Secret> {
    let auth = &ctx.auth;
    let auth_user = auth.auth_user.as_deref()?;
    let login = match auth.users.get(auth_user) {
        Some(Secret::Plain(p)) => Login::Scram(Credential::Password(p.clone())),
        Some(Secret::Md5(s)) => Login::Md5(s.clone()),
        _ => Login::Trust,
    };
    let looked_up = async {
        let (lease, mut conn, _) = checkout(ctx, &login, auth_user, database, topology)
            .await
            .map_err(|e| e.to_string())?;
        let sql = auth.auth_query.replace("$1", &quote_literal(user));
        let rows = conn.query_rows(&sql).await.map_err(|e| e.to_string())?;
        lease.give_back(conn);
        Ok::<_, String>(rows)
    };
    match looked_up.await {
        Ok(rows) => {
            let secret = rows
                .into_iter()
                .next()
                .and_then(|mut r| r.pop().flatten())?;
            Some(Secret::parse(&secret))
        }
        Err(e) => {
            warn!(listener = %ctx.name, user, auth_user, error = %e, "auth_query failed");
            None
        }
    }
}

/// Transaction pooling: after a transaction that left session state on the connection,
/// undoes what cannot follow the client (cursors, listens) and takes up the settings it
/// `SET` as the client's own (set again on each connection it gets, reset on the others),
/// so the next client finds none of it.
async fn tidy(conn: &mut ServerConn, state: u8, wanted: &mut Wanted) -> Result<(), ConnError> {
    let mut undo = Vec::new();
    if state & session_state::CURSOR != 0 {
        undo.push("CLOSE ALL");
    }
    if state & session_state::LISTEN != 0 {
        undo.push("UNLISTEN *");
    }
    if !undo.is_empty() {
        conn.execute(&undo.join("; ")).await?;
    }
    if state & session_state::SET == 0 {
        return Ok(());
    }
    let sql = "SELECT name, current_setting(name) FROM pg_settings WHERE source = 'session'";
    let now: BTreeMap<String, String> = conn
        .query_rows(sql)
        .await?
        .into_iter()
        .filter_map(|mut row| {
            let value = row.pop()??;
            Some((row.pop()??, value))
        })
        .collect();
    // Reported settings are followed through ParameterStatus already.
    for (name, value) in now.iter().filter(|(n, _)| !conn.params.contains_key(*n)) {
        wanted.insert(name.clone(), value.clone());
        conn.extra.insert(name.clone(), value.clone());
    }
    // What patroxy had set that is back at its default: the client reset it.
    let reset: Vec<String> = conn
        .extra
        .keys()
        .filter(|n| !now.contains_key(*n))
        .cloned()
        .collect();
    for name in reset {
        conn.extra.remove(&name);
        wanted.remove(&name);
    }
    Ok(())
}

/// The settings a client wants on whichever server connection serves it: its pool's login
/// defaults (every reported setting, so no other client's choice survives on a connection
/// this one gets), shared by the pool's clients, with the client's own values over them.
struct Wanted {
    defaults: Arc<Defaults>,
    own: BTreeMap<String, String>,
}

impl Wanted {
    fn default_of(&self, name: &str) -> Option<&String> {
        (!SERVER_OWNED.contains(&name))
            .then(|| self.defaults.params.get(name))
            .flatten()
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.own
            .get(name)
            .or_else(|| self.default_of(name))
            .map(String::as_str)
    }

    fn contains_key(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// A value of the client's own; kept only where it differs from the default.
    fn insert(&mut self, name: String, value: String) {
        match self.default_of(&name) == Some(&value) {
            true => self.own.remove(&name),
            false => self.own.insert(name, value),
        };
    }

    fn remove(&mut self, name: &str) {
        self.own.remove(name);
    }

    /// Every wanted setting, defaults first where the client has no value of its own.
    fn iter(&self) -> impl Iterator<Item = (&String, &String)> {
        let defaults = self.defaults.params.iter().filter(|(name, _)| {
            !SERVER_OWNED.contains(&name.as_str()) && !self.own.contains_key(*name)
        });
        defaults.chain(self.own.iter())
    }
}

/// Sets the client's wanted parameters on the server connection where they differ, and
/// resets those another client had applied that this one does not want.
async fn apply_params(conn: &mut ServerConn, wanted: &Wanted) -> Result<(), ConnError> {
    let current = |name: &str| conn.params.get(name).or_else(|| conn.extra.get(name));
    let mut sql: Vec<String> = wanted
        .iter()
        .filter(|(name, value)| current(name) != Some(*value))
        .map(|(name, value)| format!("SET {} TO {}", quote_ident(name), quote_literal(value)))
        .collect();
    let stale: Vec<String> = conn
        .extra
        .keys()
        .filter(|name| !wanted.contains_key(name))
        .cloned()
        .collect();
    sql.extend(
        stale
            .iter()
            .map(|name| format!("RESET {}", quote_ident(name))),
    );
    if sql.is_empty() {
        return Ok(());
    }
    conn.execute(&sql.join("; ")).await?;
    for name in &stale {
        conn.extra.remove(name);
    }
    // What the server did not report back, patroxy remembers it applied.
    for (name, value) in wanted.iter() {
        if !conn.params.contains_key(name) {
            conn.extra.insert(name.clone(), value.clone());
        }
    }
    Ok(())
}

/// The settings in a startup `options` string: `-c name=value`, `-cname=value` and
/// `--name=value`, with `\ ` for a space inside a value, as PostgreSQL splits it.
fn option_settings(options: &str) -> Vec<(String, String)> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut chars = options.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => word.extend(chars.next()),
            c if c.is_whitespace() => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    let mut out = Vec::new();
    let mut words = words.into_iter();
    while let Some(w) = words.next() {
        let setting = match w.as_str() {
            "-c" => words.next(),
            w if w.starts_with("-c") => Some(w[2..].to_owned()),
            w if w.starts_with("--") => Some(w[2..].to_owned()),
            _ => None,
        };
        if let Some((name, value)) = setting.as_deref().and_then(|s| s.split_once('=')) {
            out.push((name.replace('-', "_"), value.to_owned()));
        }
    }
    out
}

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

fn quote_literal(s: &str) -> String {
    match s.contains('\\') {
        true => format!("E'{}'", s.replace('\\', "\\\\").replace('\'', "''")),
        false => format!("'{}'", s.replace('\'', "''")),
    }
}

/// The login defaults of the server a new client would get: remembered by its pool, or
/// learnt from a connection lent and given back at once.
async fn server_defaults(
    ctx: &ListenerContext,
    login: &Login,
    user: &str,
    database: &str,
    topology: &mut Topo,
) -> Result<Arc<Defaults>, CheckoutError> {
    let candidates = routing::candidates(&ctx.policy, &topology.borrow());
    if let Some(first) = candidates.ok().and_then(|c| c.into_iter().next()) {
        let key = pool_key(ctx, &first, user, database);
        if let Some(d) = ctx.proxy.pools.get(key).defaults() {
            return Ok(d);
        }
    }
    let (lease, conn, _) = checkout(ctx, login, user, database, topology).await?;
    let defaults = lease.pool.remember_defaults(&conn.defaults);
    lease.give_back(conn);
    Ok(defaults)
}

fn pool_key(ctx: &ListenerContext, target: &Target, user: &str, database: &str) -> PoolKey {
    PoolKey {
        endpoint: target.endpoint.clone(),
        database: database.to_owned(),
        user: user.to_owned(),
        wants_standby: ctx.policy.role.wants_standby(),
    }
}

/// What the client sees at the end of its startup, in one write: what authentication still
/// owes it (`owed`: SASLFinal, AuthenticationOk), the server's parameters, then those the
/// client asked for that the server reports (a later ParameterStatus replaces an earlier
/// one), patroxy's key, and ReadyForQuery.
fn greeting(
    owed: &[u8],
    defaults: &Defaults,
    asked: &[(String, String)],
    key: &CancelKey,
) -> Bytes {
    let mut out = BytesMut::with_capacity(owed.len() + defaults.encoded.len() + 64);
    out.extend_from_slice(owed);
    out.extend_from_slice(&defaults.encoded);
    for (name, value) in asked {
        if defaults.params.get(name).is_some_and(|v| v != value) {
            messages::put_parameter_status(&mut out, name, value);
        }
    }
    out.extend_from_slice(&messages::backend_key_data(key));
    out.extend_from_slice(&messages::ready_for_query_idle());
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_read_as_postgresql_reads_them() {
        assert_eq!(
            option_settings(
                r"-c statement_timeout=5s -cwork_mem=64MB --search-path=a,b -c application_name=x\ y"
            ),
            vec![
                ("statement_timeout".to_owned(), "5s".to_owned()),
                ("work_mem".to_owned(), "64MB".to_owned()),
                ("search_path".to_owned(), "a,b".to_owned()),
                ("application_name".to_owned(), "x y".to_owned()),
            ]
        );
        assert!(option_settings("-x nonsense").is_empty());
    }

    #[test]
    fn settings_are_quoted() {
        assert_eq!(quote_ident("search_path"), "\"search_path\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_literal("c:\\x"), "E'c:\\\\x'");
    }
}
