//! One client of a pooled listener, up to its session: patroxy authenticates it (a secret
//! from the auth_file, or looked up with `auth_query`), learns the parameters of the server
//! it will use, and greets it with them, the client's own settings and patroxy's cancel key.
//! Then the client's session borrows server connections (`borrower.rs`); a replication
//! connection gets one of its own (`replication.rs`).

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::time::{timeout_at, Instant};
use tracing::{info, warn};

use super::borrower::{Ended, Session};
use super::client_auth::authenticate;
use super::clients::{self, Client};
use super::context::ListenerContext;
use super::negotiate::send_fatal;
use super::relay::End;
use crate::auth::lookup;
use crate::auth::scram::Credential;
use crate::auth::userlist::Secret;
use crate::backend::checkout::Who;
use crate::backend::conn::Login;
use crate::backend::pool::Defaults;
use crate::backend::session::Wanted;
use crate::config::PoolMode;
use crate::protocol::codes;
use crate::protocol::messages;
use crate::protocol::startup::{CancelKey, StartupInfo};
use crate::stream::{send, Stream};

/// Startup parameters that are the connection's, not settings to apply (and `_pq_.`
/// protocol options).
const NOT_SETTINGS: [&str; 2] = ["options", "replication"];

/// The newest minor version of protocol 3 patroxy speaks to pooled clients.
const NEWEST_MINOR: u16 = 2;

type Topo = tokio::sync::watch::Receiver<std::sync::Arc<crate::discovery::Topology>>;

pub async fn run_pooled(
    mut client: Stream,
    peer: SocketAddr,
    mut client_buf: BytesMut,
    startup: StartupInfo,
    ctx: &Arc<ListenerContext>,
    started: Instant,
) {
    let proxy = &ctx.proxy;
    let user = startup.user.clone().unwrap_or_default();
    let database = startup.database.clone().unwrap_or_else(|| user.clone());
    let deadline = started + proxy.timeouts.startup;
    let mut topology = ctx.topology.clone();
    // As PostgreSQL does, before authentication.
    if let Some(v) = negotiation(&startup) {
        if send(&mut client, &v).await.is_err() {
            return;
        }
    }
    // The login phases are boxed: an idle client's task keeps room only for what it does
    // after them.
    let authenticated = Box::pin(timeout_at(deadline, async {
        let secret = match ctx.auth.users.get(&user) {
            Some(s) => Some(s.clone()),
            None => lookup_secret(ctx, (&user, peer.ip()), &mut topology).await,
        };
        let auth = &ctx.auth;
        authenticate(
            &mut client,
            &mut client_buf,
            (&user, peer.ip()),
            auth,
            &auth.trust,
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
    let who = Who {
        login: &login,
        user: &user,
        database: &database,
    };
    // A replication connection gets a server connection of its own, never pooled.
    if super::replication::wanted(&startup) {
        let run = super::replication::run(
            client,
            peer,
            client_buf,
            &startup,
            (ctx, who, owed),
            started,
        );
        return Box::pin(run).await;
    }
    // patroxy answers the startup itself, from what it knows of the server the client will
    // use: the client holds no server connection until its first message.
    let lender = ctx.lender();
    let welcomed = tokio::select! {
        r = Box::pin(lender.defaults(who, &mut topology)) => r,
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
    let asked = asked_settings(&startup);
    // The settings this client wants on whichever server connection serves it. Every
    // reported setting has a wanted value (the login default unless the client said
    // otherwise), so no other client's choice survives on a connection this one gets; the
    // client's own changes, as the server reports them, are followed.
    let mut wanted = Wanted::new(defaults.clone());
    for (name, value) in &asked {
        wanted.startup(name.clone(), value.clone());
    }
    // patroxy's own key: the server connection behind it changes from client to client.
    let key = proxy
        .cancels
        .reserve(proxy.cancel_tag, startup.minor.min(NEWEST_MINOR));
    let hello = greeting(&owed, &defaults, &asked, key.key());
    // Nothing of the startup outlives it: an idle client keeps only what it needs.
    drop((owed, asked));
    if send(&mut client, &hello).await.is_err() {
        return;
    }
    drop(hello);
    ctx.session_metrics.connected(started.elapsed());
    let listed = proxy.clients.add(Client {
        user: user.clone(),
        database: database.clone(),
        addr: peer,
        listener: ctx.name.clone(),
        connected_at: std::time::SystemTime::now(),
        state: clients::IDLE.into(),
        server: Default::default(),
        pinned: Default::default(),
        bell: Default::default(),
    });
    let cancel_slot = proxy.cancels.register_client(key);
    let session = Session {
        ctx,
        peer,
        who,
        started,
        me: &listed.client,
        id: listed.id,
        last_pool: Default::default(),
        cancel_slot,
    };
    let per_transaction = ctx.pool_mode == PoolMode::Transaction;
    let ended = session
        .serve(
            &mut client,
            client_buf,
            wanted,
            &mut topology,
            per_transaction,
        )
        .await;
    log_end(ctx, peer, who, started, &ended);
}

fn log_end(ctx: &ListenerContext, peer: SocketAddr, who: Who<'_>, started: Instant, ended: &Ended) {
    info!(
        client = %peer,
        listener = %ctx.name,
        user = who.user,
        database = who.database,
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
    ctx.session_metrics
        .closed(ended.end.label(), ended.bytes_up, ended.bytes_down);
}

/// The settings a client asked for in its startup packet: its parameters, and the
/// `-c name=value` settings in `options` (libpq's PGOPTIONS), as PostgreSQL reads them.
fn asked_settings(startup: &StartupInfo) -> Vec<(String, String)> {
    let mut asked: Vec<(String, String)> = startup
        .params
        .iter()
        .filter(|(name, _)| !NOT_SETTINGS.contains(&name.as_str()) && !name.starts_with("_pq_."))
        .cloned()
        .collect();
    if let Some((_, options)) = startup.params.iter().find(|(n, _)| n == "options") {
        asked.extend(option_settings(options));
    }
    asked
}

/// NegotiateProtocolVersion, for a client that asked for a newer minor version than
/// patroxy speaks, or for protocol options (`_pq_.`), none of which patroxy knows.
fn negotiation(startup: &StartupInfo) -> Option<Bytes> {
    let options: Vec<&str> = startup
        .params
        .iter()
        .map(|(name, _)| name.as_str())
        .filter(|name| name.starts_with("_pq_."))
        .collect();
    if startup.minor <= NEWEST_MINOR && options.is_empty() {
        return None;
    }
    let newest = (3 << 16) | u32::from(startup.minor.min(NEWEST_MINOR));
    Some(messages::negotiate_protocol_version(newest, &options))
}

/// The secret of a user the auth_file does not have, from `auth_query` run as `auth_user`
/// in `auth_dbname` (on a connection of that pool, to the member the listener routes to),
/// or from an answer a few seconds old. `None` for a user PostgreSQL does not know, or
/// without an `auth_user`, or when the query fails (logged): the client then fails like one
/// with a wrong password. At most `LOOKUPS_AT_ONCE` run at once.
async fn lookup_secret(
    ctx: &ListenerContext,
    (user, source): (&str, std::net::IpAddr),
    topology: &mut Topo,
) -> Option<Secret> {
    let auth = &ctx.auth;
    let auth_user = auth.auth_user.as_deref()?;
    // Each cluster's users are its own.
    let cached = format!("{}\0{user}", ctx.cluster);
    let now = std::time::Instant::now();
    if let Some(answer) = auth.lookups.get(&cached, now) {
        return answer;
    }
    // One source's new names cannot take every lookup from the others.
    if !auth.lookup_budget.allow(source, now) {
        crate::metrics::auth_failure(&ctx.name, "lookup_throttled");
        return None;
    }
    let _slot = auth.lookup_slots.acquire().await.ok()?;
    // Another client may have asked for the same name meanwhile.
    let asked_at = std::time::Instant::now();
    if let Some(answer) = auth.lookups.get(&cached, asked_at) {
        return answer;
    }
    let login = match auth.users.get(auth_user) {
        Some(Secret::Plain(p)) => Login::Scram(Credential::Password(p.clone())),
        Some(Secret::Md5(s)) => Login::Md5(s.clone()),
        _ => Login::Trust,
    };
    let who = Who {
        login: &login,
        user: auth_user,
        database: &auth.auth_dbname,
    };
    let looked_up = async {
        let (lease, mut conn, _) = ctx
            .lender()
            .checkout(who, topology)
            .await
            .map_err(|e| e.to_string())?;
        // As its login left it: no other client's search path or timeout.
        let defaults = lease.pool.remember_defaults(&conn.defaults);
        conn.fit(&Wanted::new(defaults))
            .await
            .map_err(|e| e.to_string())?;
        let request = lookup::request(&auth.auth_query, user);
        let rows = conn.rows_of(&request).await.map_err(|e| e.to_string())?;
        lease.give_back(conn);
        Ok::<_, String>(rows)
    };
    match looked_up.await {
        Ok(rows) => {
            let secret = lookup::secret(rows);
            auth.lookups.put(&cached, secret.clone(), asked_at);
            secret
        }
        Err(e) => {
            warn!(listener = %ctx.name, user, auth_user, error = %e, "auth_query failed");
            None
        }
    }
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

    fn startup(minor: u16, params: &[(&str, &str)]) -> StartupInfo {
        StartupInfo {
            major: 3,
            minor,
            user: Some("u".into()),
            database: None,
            params: params
                .iter()
                .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
                .collect(),
            raw: Bytes::new(),
        }
    }

    #[test]
    fn newer_versions_and_protocol_options_are_negotiated_as_postgresql_does() {
        assert_eq!(negotiation(&startup(0, &[("application_name", "x")])), None);
        assert_eq!(negotiation(&startup(2, &[])), None);
        let v = negotiation(&startup(2, &[("_pq_.foo", "1")])).unwrap();
        assert_eq!(&v[..], b"v\0\0\0\x15\0\x03\0\x02\0\0\0\x01_pq_.foo\0");
        let v = negotiation(&startup(7, &[])).unwrap();
        assert_eq!(&v[5..9], &[0, 3, 0, 2], "3.2 is the newest");
        let asked = asked_settings(&startup(2, &[("_pq_.foo", "1"), ("work_mem", "1MB")]));
        assert_eq!(asked, vec![("work_mem".to_owned(), "1MB".to_owned())]);
    }

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
}
