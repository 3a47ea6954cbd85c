//! One client's life: negotiation, then a cancel request forwarded or a server connection
//! (the backend's connect loop), the relay, and one log line at the end.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use bytes::BytesMut;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::context::ListenerContext;
use super::negotiate::{negotiate, send_fatal, Negotiated};
use super::pooled::run_pooled;
use super::relay::{relay, End, RelayContext};
use crate::backend::{cancel, establish, ConnectParams};
use crate::config::PoolMode;
use crate::protocol::codes;
use crate::protocol::startup::{CancelKey, FirstPacket, StartupInfo};
use crate::stream::Stream;

/// Serves one client connection from accept to close.
pub async fn serve(tcp: TcpStream, peer: SocketAddr, ctx: Arc<ListenerContext>) {
    let started = Instant::now();
    let _active = ctx.session_metrics.accepted();
    // TCP_NODELAY and keepalive came from the listening socket (`listener::bind_one`).
    // Boxed: a connected client's task keeps no room for the negotiation.
    let negotiated = Box::pin(negotiate(tcp, peer, &ctx, started)).await;
    let Some(Negotiated { client, buf, first }) = negotiated else {
        return;
    };
    match first {
        // Boxed: a peer lookup holds an etcd connection's large state, which every
        // session's task would otherwise keep room for.
        FirstPacket::Cancel(key) => Box::pin(forward_cancel(key, peer, &ctx)).await,
        // Boxed: the connected session's state is large, and a client still negotiating
        // should not carry room for it.
        FirstPacket::Startup(startup)
            if startup
                .database
                .as_deref()
                .is_some_and(|d| super::console::DATABASES.contains(&d)) =>
        {
            Box::pin(super::console::run(
                client, peer, buf, startup, &ctx, started,
            ))
            .await
        }
        FirstPacket::Startup(startup) if ctx.pool_mode != PoolMode::None => {
            Box::pin(run_pooled(client, peer, buf, startup, &ctx, started)).await
        }
        FirstPacket::Startup(startup) => {
            Box::pin(run_session(client, peer, buf, startup, &ctx, started)).await
        }
        // Negotiation answers these itself and reads on.
        FirstPacket::SslRequest | FirstPacket::GssEncRequest => {}
    }
}

/// Sends a cancel request to the server this instance knows the key for, or (once: a
/// request another instance forwarded goes no further) to the instance whose tag the key
/// carries. Anything else goes nowhere. A source over `limits.cancels_per_second` is not
/// heard; nothing here reaches etcd.
async fn forward_cancel(key: CancelKey, peer: SocketAddr, ctx: &ListenerContext) {
    let proxy = &ctx.proxy;
    let now = std::time::Instant::now();
    let (key, forwarded) = match cancel::unforwarded(&key) {
        Some(k) => (k, true),
        None => (key, false),
    };
    // What a peer forwards comes from one address for all its clients: it is not held to
    // one source's rate (each client was, at that peer).
    let from_peer = forwarded && proxy.peers.is_host(peer.ip());
    if !from_peer && !proxy.cancel_limit.allow(peer.ip(), now) {
        crate::metrics::cancel_request(&ctx.name, "throttled");
        if let Some(n) = proxy.cancel_log.due(now) {
            warn!(client = %peer, listener = %ctx.name, requests = n, "cancel requests over limits.cancels_per_second are dropped (this line comes at most every 10 s and counts them)");
        }
        return;
    }
    // A local cancel is counted as on its way to its server connection until it has
    // arrived: the connection is not lent to another client meanwhile.
    let mut sending = None;
    let (routed, target, send) = match proxy.cancels.lookup(&key) {
        Some((server, server_key, guard)) => {
            sending = Some(guard);
            ("local", Some(server), server_key)
        }
        None => match cancel::tag_of(&key) {
            // Ours, but its session has ended: nothing to cancel.
            Some(tag) if tag == proxy.cancel_tag => ("stale", None, key),
            // Another instance sent it here as this key's issuer, which it is not.
            Some(_) if forwarded => ("misrouted", None, key),
            Some(tag) => match proxy.peers.cancel_address(&ctx.cluster, tag) {
                Some(instance) => ("peer", Some(instance), cancel::forwarded(&key)),
                None => ("unknown", None, key),
            },
            None => ("unknown", None, key),
        },
    };
    // Counted before it is sent: whoever sees the query canceled sees the count too.
    crate::metrics::cancel_request(&ctx.name, routed);
    let delivered = match target {
        Some(t) => cancel::deliver(&send, vec![t], proxy.timeouts.connect).await,
        None => 0,
    };
    if let Some(s) = sending.as_mut().filter(|_| delivered > 0) {
        s.delivered();
    }
    drop(sending);
    debug!(client = %peer, listener = %ctx.name, pid = send.pid, routed, delivered, "cancel request");
}

async fn run_session(
    mut client: Stream,
    peer: SocketAddr,
    mut client_buf: BytesMut,
    startup: StartupInfo,
    ctx: &ListenerContext,
    started: Instant,
) {
    let proxy = &ctx.proxy;
    let mut topology = ctx.topology.clone();
    let user = startup.user.as_deref().unwrap_or("");
    let database = startup.database.as_deref().unwrap_or(user);
    // The client cancels with patroxy's key (any instance can route it to this one), never
    // with the server's, which only a broadcast to every member could find.
    let reserved = proxy.cancels.reserve(proxy.cancel_tag, 0);
    let client_key = reserved.key().clone();
    let params = ConnectParams {
        listener: &ctx.name,
        policy: &ctx.policy,
        turn: ctx.turn.fetch_add(1, Relaxed),
        server_tls: &ctx.server_tls,
        timeouts: &proxy.timeouts,
        load: &proxy.load,
        refusal: &|t| ctx.etcd_refusal(t),
        client_key: Some(&client_key),
    };
    let connected = tokio::select! {
        r = establish(&mut client, &mut client_buf, &startup, &params, &mut topology) => r,
        _ = proxy.shutdown.cancelled() => {
            send_fatal(&mut client, codes::ADMIN_SHUTDOWN, "patroxy is shutting down").await;
            info!(client = %peer, listener = %ctx.name, user, database, "session closed before connecting: shutdown");
            return;
        }
    };
    let (mut backend, _load) = match connected {
        Ok(b) => b,
        Err(e) => {
            crate::metrics::connect_failure(&ctx.name, e.label());
            if let Some((code, msg)) = e.client_error() {
                send_fatal(&mut client, code, &msg).await;
            }
            warn!(
                client = %peer, listener = %ctx.name, user, database,
                duration_ms = started.elapsed().as_millis() as u64,
                reason = %e,
                "session failed to connect"
            );
            return;
        }
    };
    let connected_ms = started.elapsed().as_millis() as u64;
    ctx.session_metrics.connected(started.elapsed());
    // With no server key to cancel with, the client's key stays reserved: no other client
    // may draw the key this one holds.
    let _registration = match backend.key.clone() {
        Some(k) => {
            let server = backend.target.endpoint.clone();
            let r = proxy
                .cancels
                .register(reserved, server, k, Default::default());
            (Some(r), None)
        }
        None => (None, Some(reserved)),
    };
    let relay_ctx = RelayContext {
        policy: &ctx.policy,
        policy_updates: ctx.policy_updates.clone(),
        member: &backend.target.member,
        server: &backend.target.endpoint,
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

    let leftover = std::mem::take(&mut backend.leftover);
    let out = relay(
        &mut client,
        &mut backend.stream,
        client_buf,
        leftover,
        relay_ctx,
        &mut topology,
    )
    .await;
    info!(
        client = %peer,
        listener = %ctx.name,
        server = %backend.target.endpoint,
        member = %backend.target.member,
        user,
        database,
        connect_ms = connected_ms,
        duration_ms = started.elapsed().as_millis() as u64,
        bytes_up = backend.bytes_up + out.bytes_up,
        bytes_down = backend.bytes_down + out.bytes_down,
        reason = %out.end,
        "session closed"
    );
    if let End::Drained { cause, .. } = &out.end {
        crate::metrics::drain(&ctx.name, cause.label());
    }
    ctx.session_metrics.closed(
        out.end.label(),
        backend.bytes_up + out.bytes_up,
        backend.bytes_down + out.bytes_down,
    );
}
