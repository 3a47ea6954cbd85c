//! One client of a pooled listener (`pool_mode = session`): patroxy authenticates it, lends it
//! a server connection from the pool of the member routing picks (opening one, logged in as
//! the same user, when none is idle), applies its startup parameters, greets it with the
//! server's parameters and patroxy's own cancel key, relays, and takes the connection back
//! after a reset when the client leaves it clean. A connection that is not clean, or whose
//! member stopped being what the listener wants, is closed instead.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::time::{timeout_at, Instant};
use tracing::{info, warn};

use super::client_auth::authenticate;
use super::context::ListenerContext;
use super::negotiate::send_fatal;
use super::relay::{relay, End, RelayContext};
use crate::backend::conn::{ConnError, Login, ServerConn};
use crate::backend::pool::{Lease, PoolKey};
use crate::backoff::Backoff;
use crate::protocol::codes;
use crate::protocol::messages;
use crate::protocol::startup::{CancelKey, StartupInfo};
use crate::routing::{self, Target};
use crate::stream::{send, Stream};

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
    let authenticated = timeout_at(
        deadline,
        authenticate(&mut client, &mut client_buf, &user, peer.ip(), &proxy.auth),
    )
    .await;
    let login = match authenticated {
        Ok(Ok(login)) => login,
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
    let mut topology = ctx.topology.clone();
    let checked_out = tokio::select! {
        r = checkout(ctx, &login, &user, &database, &mut topology) => r,
        _ = proxy.shutdown.cancelled() => {
            send_fatal(&mut client, codes::ADMIN_SHUTDOWN, "patroxy is shutting down").await;
            return;
        }
    };
    let (lease, mut conn, target) = match checked_out {
        Ok(c) => c,
        Err(e) => {
            crate::metrics::connect_failure(&ctx.name, e.label());
            let (code, msg) = e.client_error();
            send_fatal(&mut client, code, &msg).await;
            warn!(client = %peer, listener = %ctx.name, user, database, reason = %e, "pooled session got no server");
            return;
        }
    };
    let _load = proxy.load.claim(&target.endpoint);
    if let Err(e) = apply_params(&mut conn, &startup.params).await {
        let msg = format!("patroxy: applying the startup parameters: {e}");
        send_fatal(&mut client, codes::PROTOCOL_VIOLATION, &msg).await;
        warn!(client = %peer, listener = %ctx.name, user, reason = %e, "pooled session refused");
        return; // the connection is dropped, not returned
    }
    // patroxy's own key: the server connection behind it changes from client to client.
    let key = own_key();
    let _registration = conn.key.clone().map(|server_key| {
        proxy
            .cancels
            .register(key.clone(), conn.endpoint.clone(), server_key)
    });
    if send(&mut client, &greeting(&conn, &key)).await.is_err() {
        return;
    }
    crate::metrics::connected(&ctx.name, started.elapsed());
    let connected_ms = started.elapsed().as_millis() as u64;
    let relay_ctx = RelayContext {
        policy: &ctx.policy,
        policy_updates: ctx.policy_updates.clone(),
        member: &target.member,
        server: &target.endpoint,
        timeouts: &proxy.timeouts,
        shutdown: &proxy.shutdown,
        keep_server: true,
    };
    let leftover = std::mem::take(&mut conn.buf);
    let out = relay(
        &mut client,
        &mut conn.stream,
        client_buf,
        leftover,
        relay_ctx,
        &mut topology,
    )
    .await;
    let p = out.progress;
    let clean =
        matches!(out.end, End::ClientClosed) && out.server_clean && p.in_flight == 0 && !p.unsynced;
    let returned = clean
        && {
            let reset = &proxy.pool.server_reset_query;
            let limit = proxy.timeouts.connect.max(Duration::from_secs(1));
            match conn.reset(p.tx_status, reset, limit).await {
                Ok(()) => true,
                Err(e) => {
                    warn!(server = %target.endpoint, error = %e, "server connection not reusable after its reset; closed");
                    false
                }
            }
        };
    info!(
        client = %peer,
        listener = %ctx.name,
        server = %target.endpoint,
        member = %target.member,
        user,
        database,
        connect_ms = connected_ms,
        duration_ms = started.elapsed().as_millis() as u64,
        bytes_up = out.bytes_up,
        bytes_down = out.bytes_down,
        reason = %out.end,
        server_connection = if returned { "returned to the pool" } else { "closed" },
        "session closed"
    );
    if let End::Drained { cause, .. } = &out.end {
        crate::metrics::drain(&ctx.name, cause.label());
    }
    let route = crate::metrics::Route {
        listener: &ctx.name,
        role: ctx.policy.role.as_str(),
    };
    crate::metrics::session_closed(route, out.end.label(), out.bytes_up, out.bytes_down);
    if returned {
        lease.give_back(conn);
    }
}

/// A server connection for the client, from the pool of the member routing picks, within
/// `connect_wait`.
async fn checkout(
    ctx: &ListenerContext,
    login: &Login,
    user: &str,
    database: &str,
    topology: &mut tokio::sync::watch::Receiver<std::sync::Arc<crate::discovery::Topology>>,
) -> Result<(Lease, ServerConn, Target), CheckoutError> {
    let proxy = &ctx.proxy;
    let started = Instant::now();
    let deadline = started + proxy.timeouts.connect_wait;
    let turn = ctx.turn.fetch_add(1, Relaxed);
    let mut pause = Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
    let mut why = String::new();
    loop {
        let candidates = routing::candidates(&ctx.policy, &topology.borrow_and_update());
        match candidates {
            Err(e) => why = e.to_string(),
            Ok(candidates) => {
                let load = &proxy.load;
                let ordered = routing::order(candidates, &ctx.policy, |ep| load.sessions(ep), turn);
                for target in ordered {
                    let key = PoolKey {
                        endpoint: target.endpoint.clone(),
                        database: database.to_owned(),
                        user: user.to_owned(),
                        wants_standby: ctx.policy.role.wants_standby(),
                    };
                    let pool = proxy.pools.get(key, &proxy.pool);
                    let (lease, idle) = pool.lease().await?;
                    if let Some(conn) = idle {
                        return Ok((lease, conn, target));
                    }
                    let limit = proxy.timeouts.connect.max(proxy.timeouts.startup);
                    let opened = ServerConn::open(
                        &target.endpoint,
                        &ctx.server_tls,
                        user,
                        database,
                        login,
                        ctx.policy.role.wants_standby(),
                        limit,
                    )
                    .await;
                    match opened {
                        Ok(conn) => return Ok((lease, conn, target)),
                        Err(e) if e.is_transient() => {
                            why = format!("{}: {e}", target.endpoint);
                        }
                        Err(source) => {
                            let server = target.endpoint.to_string();
                            return Err(CheckoutError::Server { server, source });
                        }
                    }
                }
            }
        }
        let wake = (Instant::now() + pause.next_pause()).min(deadline);
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

/// Sets the client's startup parameters on the server connection where they differ.
async fn apply_params(conn: &mut ServerConn, params: &[(String, String)]) -> Result<(), ConnError> {
    let sql: Vec<String> = params
        .iter()
        .filter(|(name, _)| !NOT_SETTINGS.contains(&name.as_str()))
        .filter(|(name, value)| conn.params.get(name) != Some(value))
        .map(|(name, value)| format!("SET {} TO {}", quote_ident(name), quote_literal(value)))
        .collect();
    if sql.is_empty() {
        return Ok(());
    }
    conn.execute(&sql.join("; ")).await.map(|_| ())
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

/// A fresh key for the client: a random pid and secret.
fn own_key() -> CancelKey {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(crate::auth::scram::nonce())
        .expect("a nonce is base64");
    CancelKey {
        pid: i32::from_be_bytes([bytes[0] & 0x7f, bytes[1], bytes[2], bytes[3]]),
        secret: Bytes::copy_from_slice(&bytes[4..8]),
    }
}

/// What the client sees after AuthenticationOk: the server's parameters, patroxy's key,
/// and ReadyForQuery.
fn greeting(conn: &ServerConn, key: &CancelKey) -> Bytes {
    let mut out = BytesMut::new();
    for (name, value) in &conn.params {
        out.extend_from_slice(&messages::parameter_status_message(name, value));
    }
    out.extend_from_slice(&messages::backend_key_data(key));
    out.extend_from_slice(&messages::ready_for_query_idle());
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_quoted() {
        assert_eq!(quote_ident("search_path"), "\"search_path\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_literal("c:\\x"), "E'c:\\\\x'");
        let k = own_key();
        assert!(k.pid >= 0);
        assert_eq!(k.secret.len(), 4);
    }
}
