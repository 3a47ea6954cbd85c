//! A replication connection on a pooled listener (`replication=true` or `database` in its
//! startup packet: pg_basebackup, pg_receivewal, pg_recvlogical, a logical subscriber):
//! authenticated by patroxy as every pooled client is, then given a server connection of
//! its own, never pooled, on the member the listener's role routes to, logged in as the same
//! user with the client's own startup parameters, and relayed as an unpooled session is
//! (drained the same way). The client sees the server's own parameters and cancel key.

use std::net::SocketAddr;

use bytes::BytesMut;
use tokio::time::Instant;
use tracing::{info, warn};

use super::context::ListenerContext;
use super::negotiate::send_fatal;
use super::relay::{relay, End, RelayContext};
use crate::backend::checkout::Who;
use crate::protocol::messages;
use crate::protocol::startup::StartupInfo;
use crate::stream::{send, Stream};

/// Whether the client asks for a replication connection (PostgreSQL's own reading of the
/// `replication` parameter: a boolean, or `database`).
pub fn wanted(startup: &StartupInfo) -> bool {
    startup
        .params
        .iter()
        .find(|(name, _)| name == "replication")
        .is_some_and(|(_, v)| {
            let v = v.to_ascii_lowercase();
            ["database", "true", "on", "yes", "1", "t", "y"].contains(&v.as_str())
        })
}

/// Serves an authenticated replication client; `owed` is what authentication still owes
/// it (SASLFinal, AuthenticationOk).
pub async fn run(
    mut client: Stream,
    peer: SocketAddr,
    client_buf: BytesMut,
    startup: &StartupInfo,
    (ctx, who, owed): (&ListenerContext, Who<'_>, BytesMut),
    started: Instant,
) {
    let proxy = &ctx.proxy;
    let mut topology = ctx.topology.clone();
    // The client's own startup parameters go to its server, as they would direct.
    let params: Vec<(String, String)> = startup
        .params
        .iter()
        .filter(|(name, _)| !name.starts_with("_pq_."))
        .cloned()
        .collect();
    let lender = ctx.lender();
    let opened = tokio::select! {
        r = lender.open_own(who, &params, &mut topology) => r,
        _ = proxy.shutdown.cancelled() => {
            send_fatal(&mut client, crate::protocol::codes::ADMIN_SHUTDOWN, "patroxy is shutting down").await;
            return;
        }
    };
    let (mut conn, target) = match opened {
        Ok(c) => c,
        Err(e) => {
            crate::metrics::connect_failure(&ctx.name, e.label());
            let (code, msg) = e.client_error();
            send_fatal(&mut client, code, &msg).await;
            warn!(client = %peer, listener = %ctx.name, user = who.user, reason = %e, "replication connection got no server");
            return;
        }
    };
    let mut hello = owed;
    for (name, value) in &conn.params {
        messages::put_parameter_status(&mut hello, name, value);
    }
    // patroxy's own key, as every client gets (any instance routes it here), registered
    // before the client can have it.
    let reserved = proxy.cancels.reserve(proxy.cancel_tag, 0);
    let _registration = conn.key.clone().map(|k| {
        hello.extend_from_slice(&messages::backend_key_data(reserved.key()));
        let server = target.endpoint.clone();
        proxy
            .cancels
            .register(reserved, server, k, Default::default())
    });
    hello.extend_from_slice(&messages::ready_for_query_idle());
    if send(&mut client, &hello).await.is_err() {
        return;
    }
    ctx.session_metrics.connected(started.elapsed());
    let _load = proxy.load.claim(&target.endpoint);
    let relay_ctx = RelayContext {
        policy: &ctx.policy,
        policy_updates: ctx.policy_updates.clone(),
        member: &target.member,
        server: &target.endpoint,
        timeouts: &proxy.timeouts,
        shutdown: &proxy.shutdown,
        keep_server: false,
        release_at_idle: false,
        rewrite: None,
        buffers: None,
        switchover_grace: None,
        bell: None,
        watch_resets: None,
        limits: Default::default(),
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
    info!(
        client = %peer,
        listener = %ctx.name,
        server = %target.endpoint,
        member = %target.member,
        user = who.user,
        database = who.database,
        replication = true,
        duration_ms = started.elapsed().as_millis() as u64,
        bytes_up = out.bytes_up,
        bytes_down = out.bytes_down,
        reason = %out.end,
        "session closed"
    );
    if let End::Drained { cause, .. } = &out.end {
        crate::metrics::drain(&ctx.name, cause.label());
    }
    ctx.session_metrics
        .closed(out.end.label(), out.bytes_up, out.bytes_down);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn startup(replication: Option<&str>) -> StartupInfo {
        StartupInfo {
            major: 3,
            minor: 0,
            user: Some("u".into()),
            database: None,
            params: replication
                .map(|v| vec![("replication".to_owned(), v.to_owned())])
                .unwrap_or_default(),
            raw: bytes::Bytes::new(),
        }
    }

    #[test]
    fn replication_is_read_as_postgresql_reads_it() {
        for yes in ["true", "database", "on", "1", "YES"] {
            assert!(wanted(&startup(Some(yes))), "{yes}");
        }
        for no in ["false", "off", "0", "no"] {
            assert!(!wanted(&startup(Some(no))), "{no}");
        }
        assert!(!wanted(&startup(None)));
    }
}
