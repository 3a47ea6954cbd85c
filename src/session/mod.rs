//! One client's life: the startup phase, a cancel request or a connection to a server, the
//! relay, and one log line at the end.

pub mod cancel;
pub mod connect;
pub mod drain;
pub mod load;
pub mod relay;
pub mod stream;

use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use socket2::{SockRef, TcpKeepalive};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::{timeout, timeout_at, Instant};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::allow::Cidr;
use crate::config::{ClientTlsMode, ListenerConfig, Timeouts};
use crate::limit::Limit;

use crate::discovery::Topology;
use crate::protocol::codes;
use crate::protocol::messages::{self, Severity};
use crate::protocol::startup::{parse_first_packet, FirstPacket, StartupError, StartupInfo};
use crate::router::Policy;
use crate::tls::{ServerTls, ALPN_POSTGRESQL};
pub use cancel::CancelRegistry;
pub use load::ServerLoad;
use stream::Stream;

/// What every session of every listener shares.
pub struct Shared {
    pub timeouts: Timeouts,
    pub cancels: CancelRegistry,
    pub load: ServerLoad,
    /// Client connections across all listeners (`limits.max_client_connections`).
    pub connections: Arc<Limit>,
    pub shutdown: CancellationToken,
}

/// A listener: its name, its routing rules, its cluster's topology, and the shared state.
pub struct ListenerContext {
    pub name: String,
    /// The address it listens on.
    pub listen: String,
    pub cluster: String,
    pub policy: Arc<Policy>,
    /// The rules reloads give this listener later, for sessions opened under older ones.
    pub policy_updates: watch::Receiver<Arc<Policy>>,
    pub topology: watch::Receiver<Arc<Topology>>,
    /// Advances once per new session; balancing takes turns with it.
    pub turn: AtomicUsize,
    /// This listener's own connection limit (unbounded without one); it counts the
    /// listener's connections across reloads.
    pub limit: Arc<Limit>,
    /// Client addresses allowed; empty allows all.
    pub allow: Vec<Cidr>,
    pub tls_mode: ClientTlsMode,
    /// Present unless `tls_mode` is `disable`.
    pub tls: Option<TlsAcceptor>,
    pub server_tls: ServerTls,
    pub shared: Arc<Shared>,
}

/// TLS material loaded from the files the configuration names, shared by every listener.
#[derive(Clone)]
pub struct TlsMaterial {
    pub acceptor: Option<TlsAcceptor>,
    pub server: ServerTls,
}

impl TlsMaterial {
    pub fn load(config: &crate::config::Config) -> Result<TlsMaterial, crate::tls::TlsError> {
        Ok(TlsMaterial {
            acceptor: crate::tls::acceptor(&config.tls)?,
            server: crate::tls::connector(&config.server_tls)?,
        })
    }
}

impl ListenerContext {
    pub fn new(
        config: &ListenerConfig,
        cluster: String,
        topology: watch::Receiver<Arc<Topology>>,
        tls: &TlsMaterial,
        shared: Arc<Shared>,
    ) -> ListenerContext {
        let limit = config.max_client_connections;
        let policy = Arc::new(config.policy());
        // `validate()` makes sure a mode other than disable has a certificate.
        let tls_mode = config.tls_mode(tls.acceptor.is_some());
        ListenerContext {
            name: config.name.clone(),
            listen: config.listen.clone(),
            cluster,
            policy: policy.clone(),
            // Nothing updates a context on its own; `app` connects it to reloads.
            policy_updates: watch::channel(policy).1,
            topology,
            turn: AtomicUsize::new(0),
            limit: Limit::new(if limit > 0 { limit } else { usize::MAX }),
            allow: config.allow.clone(),
            tls_mode,
            tls: (tls_mode != ClientTlsMode::Disable)
                .then(|| tls.acceptor.clone())
                .flatten(),
            server_tls: tls.server.clone(),
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
    #[error("bytes after an SSLRequest, before the TLS handshake")]
    BytesAfterSslRequest,
    #[error("TLS handshake failed: {0}")]
    Handshake(std::io::Error),
    #[error("direct TLS connection without ALPN \"postgresql\"")]
    NoAlpn,
    #[error("this listener requires TLS (connect with sslmode=require or stronger)")]
    TlsRequired,
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
            StartupFailure::BytesAfterSslRequest => "bytes_after_ssl_request",
            StartupFailure::Handshake(_) => "tls_handshake",
            StartupFailure::NoAlpn => "tls_no_alpn",
            StartupFailure::TlsRequired => "tls_required",
        }
    }

    /// The FATAL the client gets, if it can still read one.
    fn client_error(&self) -> Option<(&'static str, String)> {
        let msg = format!("patroxy: {self}");
        match self {
            StartupFailure::Closed
            | StartupFailure::Io(_)
            | StartupFailure::Handshake(_)
            | StartupFailure::Bad(StartupError::DirectTls) => None,
            StartupFailure::Bad(bad) => Some((bad.sqlstate(), msg)),
            StartupFailure::TlsRequired => Some((codes::INVALID_AUTHORIZATION, msg)),
            StartupFailure::Timeout(_)
            | StartupFailure::Repeated(_)
            | StartupFailure::BytesAfterSslRequest
            | StartupFailure::NoAlpn => Some((codes::PROTOCOL_VIOLATION, msg)),
        }
    }
}

/// Serves one client connection from accept to close.
pub async fn serve(tcp: TcpStream, peer: SocketAddr, ctx: Arc<ListenerContext>) {
    let started = Instant::now();
    let _gauge = crate::metrics::SessionGauge::new(&ctx.name, &ctx.policy.role.to_string());
    tune_socket(&tcp);
    let shared = &ctx.shared;
    let mut buf = BytesMut::with_capacity(1024);
    let mut client = Stream::Plain(tcp);
    let deadline = started + shared.timeouts.startup;
    let first = loop {
        let opening = timeout_at(
            deadline,
            read_first(&mut client, &mut buf, ctx.tls.is_some()),
        );
        match opening.await {
            Ok(Ok(Opening::Packet(p))) => break p,
            Ok(Ok(Opening::Tls { direct })) => {
                let acceptor = ctx
                    .tls
                    .clone()
                    .expect("TLS is offered only with an acceptor");
                client = match timeout_at(deadline, accept_tls(client, acceptor)).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        let e = StartupFailure::Handshake(e);
                        return log_refusal(peer, &ctx, e);
                    }
                    Err(_) => {
                        let e = StartupFailure::Timeout(shared.timeouts.startup);
                        return log_refusal(peer, &ctx, e);
                    }
                };
                // Direct TLS must say it carries PostgreSQL, or it could be a confused
                // HTTPS client (the cross-protocol attack ALPN exists to stop).
                if direct && client.alpn() != Some(ALPN_POSTGRESQL) {
                    return refuse_startup(client, peer, &ctx, StartupFailure::NoAlpn).await;
                }
            }
            Ok(Err(e)) => return refuse_startup(client, peer, &ctx, e).await,
            Err(_) => {
                let e = StartupFailure::Timeout(shared.timeouts.startup);
                return refuse_startup(client, peer, &ctx, e).await;
            }
        }
    };
    match first {
        FirstPacket::Cancel(key) => {
            // Cancels are accepted in plaintext even with `tls = require`, as PostgreSQL
            // does: they carry no data, and libpq sends them unencrypted.
            let known = shared.cancels.lookup(&key);
            let local = known.is_some();
            let targets = cancel::cancel_targets(known, &ctx.topology.borrow());

            let sent_to = targets.len();
            let delivered = cancel::deliver(&key, targets, shared.timeouts.connect).await;
            crate::metrics::cancel_request(if local { "local" } else { "broadcast" });
            info!(client = %peer, listener = %ctx.name, pid = key.pid, local, sent_to, delivered, "cancel request forwarded");
        }
        FirstPacket::Startup(_) if ctx.tls_mode == ClientTlsMode::Require && !client.is_tls() => {
            refuse_startup(client, peer, &ctx, StartupFailure::TlsRequired).await
        }
        FirstPacket::Startup(startup) => {
            run_session(client, peer, buf, startup, &ctx, started).await
        }
        FirstPacket::SslRequest | FirstPacket::GssEncRequest => {
            unreachable!("read_first answers negotiation requests itself")
        }
    }
}

/// How a client opens its session.
enum Opening {
    Packet(FirstPacket),
    /// TLS is to start now: after an SSLRequest answered `S`, or a direct handshake.
    Tls {
        direct: bool,
    },
}

/// Reads packets until a StartupMessage or CancelRequest, or until TLS is to start.
/// SSLRequest gets `S` when `tls_offered` (and this is not TLS already), else `N`;
/// GSSENCRequest always gets `N`.
async fn read_first(
    client: &mut Stream,
    buf: &mut BytesMut,
    tls_offered: bool,
) -> Result<Opening, StartupFailure> {
    let tls_offered = tls_offered && !client.is_tls();
    if tls_offered && buf.is_empty() {
        // A TLS record header first is PostgreSQL 17's direct TLS; peeking leaves it for
        // the handshake to read.
        let mut first = [0u8; 1];
        if client.tcp().peek(&mut first).await? == 0 {
            return Err(StartupFailure::Closed);
        }
        if first[0] == crate::protocol::startup::TLS_HANDSHAKE_RECORD {
            return Ok(Opening::Tls { direct: true });
        }
    }
    let (mut ssl_seen, mut gss_seen) = (client.is_tls(), false);
    loop {
        match parse_first_packet(buf)? {
            Some(FirstPacket::SslRequest) => {
                if std::mem::replace(&mut ssl_seen, true) {
                    return Err(StartupFailure::Repeated("SSLRequest"));
                }
                if tls_offered {
                    // Bytes sent before our answer could have been injected by a man in the
                    // middle, to be taken as if they came through TLS (CVE-2021-23214).
                    if !buf.is_empty() {
                        return Err(StartupFailure::BytesAfterSslRequest);
                    }
                    stream::send(client, b"S").await?;
                    return Ok(Opening::Tls { direct: false });
                }
                stream::send(client, b"N").await?;
            }
            Some(FirstPacket::GssEncRequest) => {
                if std::mem::replace(&mut gss_seen, true) {
                    return Err(StartupFailure::Repeated("GSSENCRequest"));
                }
                stream::send(client, b"N").await?;
            }
            Some(p) => return Ok(Opening::Packet(p)),
            None => {
                if client.read_buf(buf).await? == 0 {
                    return Err(StartupFailure::Closed);
                }
            }
        }
    }
}

/// The server side of a TLS handshake with the client.
async fn accept_tls(client: Stream, acceptor: TlsAcceptor) -> std::io::Result<Stream> {
    let Stream::Plain(tcp) = client else {
        return Ok(client);
    };
    let tls = acceptor.accept(tcp).await?;
    Ok(Stream::Tls(Box::new(tokio_rustls::TlsStream::Server(tls))))
}

async fn refuse_startup(
    mut client: Stream,
    peer: SocketAddr,
    ctx: &ListenerContext,
    e: StartupFailure,
) {
    if let Some((code, msg)) = e.client_error() {
        send_fatal(&mut client, code, &msg).await;
    }
    log_refusal(peer, ctx, e)
}

fn log_refusal(peer: SocketAddr, ctx: &ListenerContext, e: StartupFailure) {
    crate::metrics::startup_failure(&ctx.name, e.label());
    match e {
        StartupFailure::Closed => {
            tracing::debug!(client = %peer, listener = %ctx.name, "client closed before its startup packet")
        }
        e => warn!(client = %peer, listener = %ctx.name, reason = %e, "startup refused"),
    }
}

async fn send_fatal(client: &mut Stream, sqlstate: &str, message: &str) {
    let frame = messages::error_response(Severity::Fatal, sqlstate, message);
    let _ = timeout(Duration::from_millis(500), async {
        stream::send(client, &frame).await?;
        tokio::io::AsyncWriteExt::shutdown(client).await
    })
    .await;
}

async fn run_session(
    mut client: Stream,
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
        policy_updates: ctx.policy_updates.clone(),
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
    let route = crate::metrics::Route {
        listener: &ctx.name,
        role: &ctx.policy.role.to_string(),
        server: &backend.target.endpoint.to_string(),
    };
    crate::metrics::session_closed(
        route,
        out.end.label(),
        backend.bytes_up + out.bytes_up,
        backend.bytes_down + out.bytes_down,
    );
}
