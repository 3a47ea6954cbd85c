//! One client's life: the startup phase, a cancel request or a connection to a server, the
//! relay, and one log line at the end.

pub mod cancel;
pub mod connect;
pub mod drain;
pub mod load;
pub mod relay;

use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use socket2::{SockRef, TcpKeepalive};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{watch, Semaphore};
use tokio::time::{timeout, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::allow::Cidr;
use crate::config::{ListenerConfig, Timeouts};

use crate::discovery::Topology;
use crate::protocol::codes;
use crate::protocol::messages::{self, Severity};
use crate::protocol::startup::{parse_first_packet, FirstPacket, StartupError, StartupInfo};
use crate::router::Policy;
pub use cancel::CancelRegistry;
pub use load::ServerLoad;

/// What every session of every listener shares.
pub struct Shared {
    pub timeouts: Timeouts,
    pub cancels: CancelRegistry,
    pub load: ServerLoad,
    /// Client connections across all listeners (`limits.max_client_connections`).
    pub connections: Arc<Semaphore>,
    pub shutdown: CancellationToken,
}

/// A listener: its name, its routing rules, its cluster's topology, and the shared state.
pub struct ListenerContext {
    pub name: String,
    pub cluster: String,
    pub policy: Arc<Policy>,
    pub topology: watch::Receiver<Arc<Topology>>,
    /// Advances once per new session; balancing takes turns with it.
    pub turn: AtomicUsize,
    /// This listener's own connection limit, if it has one.
    pub limit: Option<Arc<Semaphore>>,
    /// Client addresses allowed; empty allows all.
    pub allow: Vec<Cidr>,
    pub shared: Arc<Shared>,
}

impl ListenerContext {
    pub fn new(
        config: &ListenerConfig,
        cluster: String,
        topology: watch::Receiver<Arc<Topology>>,
        shared: Arc<Shared>,
    ) -> ListenerContext {
        let limit = config.max_client_connections;
        ListenerContext {
            name: config.name.clone(),
            cluster,
            policy: Arc::new(config.policy()),
            topology,
            turn: AtomicUsize::new(0),
            limit: (limit > 0).then(|| Arc::new(Semaphore::new(limit))),
            allow: config.allow.clone(),
            shared,
        }
    }
}

/// TCP_NODELAY (every message is a round trip) and keepalive (a vanished peer is noticed).
pub(crate) fn tune_socket(s: &TcpStream) {
    let _ = s.set_nodelay(true);
    let ka = TcpKeepalive::new()
        .with_time(Duration::from_secs(30))
        .with_interval(Duration::from_secs(10));
    let _ = SockRef::from(s).set_tcp_keepalive(&ka);
}

#[derive(Debug, thiserror::Error)]
enum StartupFailure {
    #[error("{0}")]
    Bad(#[from] StartupError),
    #[error("startup packet not received within {0:?}")]
    Timeout(Duration),
    #[error("client closed before its startup packet")]
    Closed,
    #[error("client: {0}")]
    Io(#[from] std::io::Error),
    #[error("a second {0} during negotiation")]
    Repeated(&'static str),
}

impl StartupFailure {
    fn label(&self) -> &'static str {
        match self {
            StartupFailure::Bad(StartupError::DirectTls) => "direct_tls",
            StartupFailure::Bad(StartupError::UnsupportedProtocol { .. }) => "unsupported_protocol",
            StartupFailure::Bad(_) => "bad_packet",
            StartupFailure::Timeout(_) => "timeout",
            StartupFailure::Closed => "closed",
            StartupFailure::Io(_) => "io",
            StartupFailure::Repeated(_) => "repeated_negotiation",
        }
    }
}

/// Serves one client connection from accept to close.
pub async fn serve(mut client: TcpStream, peer: SocketAddr, ctx: Arc<ListenerContext>) {
    let started = Instant::now();
    let _gauge = crate::metrics::SessionGauge::new(&ctx.name);
    tune_socket(&client);
    let shared = &ctx.shared;
    let mut buf = BytesMut::with_capacity(1024);
    let first = timeout(shared.timeouts.startup, read_first(&mut client, &mut buf)).await;
    let first = match first {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => return refuse_startup(client, peer, &ctx, e).await,
        Err(_) => {
            let e = StartupFailure::Timeout(shared.timeouts.startup);
            return refuse_startup(client, peer, &ctx, e).await;
        }
    };
    match first {
        FirstPacket::Cancel(key) => {
            let known = shared.cancels.lookup(&key);
            let local = known.is_some();
            let targets = cancel::cancel_targets(known, &ctx.topology.borrow());

            let sent_to = targets.len();
            let delivered = cancel::deliver(&key, targets, shared.timeouts.connect).await;
            crate::metrics::cancel_request(if local { "local" } else { "broadcast" });
            info!(client = %peer, listener = %ctx.name, pid = key.pid, local, sent_to, delivered, "cancel request forwarded");
        }
        FirstPacket::Startup(startup) => {
            run_session(client, peer, buf, startup, &ctx, started).await
        }
        FirstPacket::SslRequest | FirstPacket::GssEncRequest => {
            unreachable!("read_first answers negotiation requests itself")
        }
    }
}

/// Reads packets until a StartupMessage or CancelRequest, answering SSL and GSS encryption
/// requests with `N`: TLS is not enabled here, so the client goes on in plaintext or leaves.
async fn read_first(
    client: &mut TcpStream,
    buf: &mut BytesMut,
) -> Result<FirstPacket, StartupFailure> {
    let (mut ssl_seen, mut gss_seen) = (false, false);
    loop {
        match parse_first_packet(buf)? {
            Some(FirstPacket::SslRequest) => {
                if std::mem::replace(&mut ssl_seen, true) {
                    return Err(StartupFailure::Repeated("SSLRequest"));
                }
                // The TLS seam: with TLS enabled, a buffered byte here would be refused
                // (a man in the middle could have injected it) and the handshake would start.
                client.write_all(b"N").await?;
            }
            Some(FirstPacket::GssEncRequest) => {
                if std::mem::replace(&mut gss_seen, true) {
                    return Err(StartupFailure::Repeated("GSSENCRequest"));
                }
                client.write_all(b"N").await?;
            }
            Some(p) => return Ok(p),
            None => {
                if client.read_buf(buf).await? == 0 {
                    return Err(StartupFailure::Closed);
                }
            }
        }
    }
}

async fn refuse_startup(
    mut client: TcpStream,
    peer: SocketAddr,
    ctx: &ListenerContext,
    e: StartupFailure,
) {
    crate::metrics::startup_failure(&ctx.name, e.label());
    match &e {
        StartupFailure::Closed => {
            tracing::debug!(client = %peer, listener = %ctx.name, "client closed before its startup packet");
            return;
        }
        StartupFailure::Io(_) | StartupFailure::Bad(StartupError::DirectTls) => {}
        StartupFailure::Bad(bad) => {
            send_fatal(&mut client, bad.sqlstate(), &format!("patroxy: {bad}")).await
        }
        StartupFailure::Timeout(_) | StartupFailure::Repeated(_) => {
            send_fatal(
                &mut client,
                codes::PROTOCOL_VIOLATION,
                &format!("patroxy: {e}"),
            )
            .await
        }
    }
    warn!(client = %peer, listener = %ctx.name, reason = %e, "startup refused");
}

async fn send_fatal(client: &mut TcpStream, sqlstate: &str, message: &str) {
    let frame = messages::error_response(Severity::Fatal, sqlstate, message);
    let _ = timeout(Duration::from_millis(500), async {
        client.write_all(&frame).await?;
        client.shutdown().await
    })
    .await;
}

async fn run_session(
    mut client: TcpStream,
    peer: SocketAddr,
    mut client_buf: BytesMut,
    startup: StartupInfo,
    ctx: &ListenerContext,
    started: Instant,
) {
    let shared = &ctx.shared;
    let mut topology = ctx.topology.clone();
    let user = startup.user.as_deref().unwrap_or("");
    let database = startup.database.as_deref().unwrap_or(user);
    let connected = tokio::select! {
        r = connect::establish(&mut client, &mut client_buf, &startup, ctx, &mut topology) => r,
        _ = shared.shutdown.cancelled() => {
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
    crate::metrics::connected(&ctx.name, started.elapsed());
    let _registration = backend
        .key
        .clone()
        .map(|k| shared.cancels.register(k, backend.target.endpoint.clone()));
    let relay_ctx = relay::RelayContext {
        policy: &ctx.policy,
        member: &backend.target.member,
        server: &backend.target.endpoint,
        timeouts: &shared.timeouts,
        shutdown: &shared.shutdown,
    };

    let leftover = std::mem::take(&mut backend.leftover);
    let out = relay::relay(
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
    if let relay::End::Drained { cause, .. } = &out.end {
        crate::metrics::drain(&ctx.name, cause.label());
    }
    crate::metrics::session_closed(
        &ctx.name,
        &backend.target.endpoint.to_string(),
        out.end.label(),
        backend.bytes_up + out.bytes_up,
        backend.bytes_down + out.bytes_down,
    );
}
