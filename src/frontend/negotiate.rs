//! Negotiation with a new client, up to its first real packet: SSLRequest and GSSENCRequest
//! answered, TLS accepted (after `S`, or direct TLS with ALPN), the startup timeout, and the
//! FATAL a refused client still gets.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::time::{timeout, timeout_at, Instant};
use tokio_rustls::TlsAcceptor;
use tracing::warn;

use super::context::ListenerContext;
use crate::config::ClientTlsMode;
use crate::protocol::codes;
use crate::protocol::messages::{self, Severity};
use crate::protocol::startup::{parse_first_packet, FirstPacket, StartupError};
use crate::stream::{self, Stream};
use crate::tls::ALPN_POSTGRESQL;

/// A negotiated client: its stream (TLS or not), the bytes read past the first packet, and
/// that packet: a StartupMessage or a CancelRequest.
pub struct Negotiated {
    pub client: Stream,
    pub buf: BytesMut,
    pub first: FirstPacket,
}

/// Negotiates with a client until its StartupMessage or CancelRequest, within the startup
/// timeout. A client that fails is told why (when it can still read it), logged and counted;
/// then `None`.
pub async fn negotiate(
    tcp: TcpStream,
    peer: SocketAddr,
    ctx: &ListenerContext,
    started: Instant,
) -> Option<Negotiated> {
    let limit = ctx.proxy.timeouts.startup;
    let mut buf = BytesMut::with_capacity(1024);
    let mut client = Stream::Plain(tcp);
    let deadline = started + limit;
    let first = loop {
        let opening = timeout_at(
            deadline,
            read_first(&mut client, &mut buf, ctx.tls.is_some()),
        );
        let failure = match opening.await {
            Ok(Ok(Opening::Packet(p))) => break p,
            Ok(Ok(Opening::Tls { direct })) => {
                // read_first offers TLS only with an acceptor.
                let acceptor = ctx.tls.clone()?;
                client = match timeout_at(deadline, accept_tls(client, acceptor)).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        log_refusal(peer, ctx, StartupFailure::Handshake(e));
                        return None;
                    }
                    Err(_) => {
                        log_refusal(peer, ctx, StartupFailure::Timeout(limit));
                        return None;
                    }
                };
                // Direct TLS must say it carries PostgreSQL, or it could be a confused
                // HTTPS client (the cross-protocol attack ALPN exists to stop).
                if !direct || client.alpn() == Some(ALPN_POSTGRESQL) {
                    continue;
                }
                StartupFailure::NoAlpn
            }
            Ok(Err(e)) => e,
            Err(_) => StartupFailure::Timeout(limit),
        };
        refuse_startup(client, peer, ctx, failure).await;
        return None;
    };
    if matches!(first, FirstPacket::Startup(_))
        && ctx.tls_mode == ClientTlsMode::Require
        && !client.is_tls()
    {
        // Cancels are accepted in plaintext even with `tls = require`, as PostgreSQL does:
        // they carry no data, and libpq sends them unencrypted.
        refuse_startup(client, peer, ctx, StartupFailure::TlsRequired).await;
        return None;
    }
    Some(Negotiated { client, buf, first })
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum StartupFailure {
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
    /// Every `label()`, for metrics exported at zero before their first event.
    pub(crate) const LABELS: [&'static str; 11] = [
        "direct_tls",
        "unsupported_protocol",
        "bad_packet",
        "timeout",
        "closed",
        "io",
        "repeated_negotiation",
        "bytes_after_ssl_request",
        "tls_handshake",
        "tls_no_alpn",
        "tls_required",
    ];

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
                reserve_declared(buf);
                if client.read_buf(buf).await? == 0 {
                    return Err(StartupFailure::Closed);
                }
            }
        }
    }
}

/// Room for the whole packet the client declared (already checked against PostgreSQL's
/// limit), and no more: growing by doubling would hold up to twice what a slow client sent.
fn reserve_declared(buf: &mut BytesMut) {
    let Some(len) = buf.get(..4) else { return };
    let declared = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
    let want = declared.min(codes::MAX_STARTUP_PACKET_LEN);
    if want > buf.len() {
        buf.reserve(want - buf.len());
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

pub(super) async fn refuse_startup(
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

pub(super) async fn send_fatal(client: &mut Stream, sqlstate: &str, message: &str) {
    let frame = messages::error_response(Severity::Fatal, sqlstate, message);
    let _ = timeout(Duration::from_millis(500), async {
        stream::send(client, &frame).await?;
        tokio::io::AsyncWriteExt::shutdown(client).await
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_failure_has_its_label_listed() {
        let io = || std::io::Error::other("x");
        let all = [
            StartupFailure::Bad(StartupError::DirectTls),
            StartupFailure::Bad(StartupError::UnsupportedProtocol { major: 9, minor: 0 }),
            StartupFailure::Bad(StartupError::Malformed),
            StartupFailure::Timeout(Duration::from_secs(1)),
            StartupFailure::Closed,
            StartupFailure::Io(io()),
            StartupFailure::Repeated("SSLRequest"),
            StartupFailure::BytesAfterSslRequest,
            StartupFailure::Handshake(io()),
            StartupFailure::NoAlpn,
            StartupFailure::TlsRequired,
        ];
        let labels: Vec<_> = all.iter().map(StartupFailure::label).collect();
        assert_eq!(labels, StartupFailure::LABELS);
    }
}
