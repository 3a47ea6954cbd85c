//! Getting a client a server: wait for candidates, connect to them in balanced order, forward
//! the untouched StartupMessage, and relay authentication end to end. Then hold the server's
//! greeting until the server has shown it is what the listener wants: a primary
//! (`in_hot_standby` off) or a standby (on).
//!
//! Until the client has seen a byte from a server, every failure moves on to the next
//! candidate, then retries against the current topology within `connect_wait`. After that,
//! the client is committed to this server, since credentials cannot be replayed.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::{timeout, timeout_at, Instant};
use tokio_rustls::TlsStream;

use super::load::LoadGuard;
use super::stream::{send, Stream};
use super::{tune_socket, ListenerContext};
use crate::config::ServerTlsMode;
use crate::discovery::Topology;
use crate::protocol::codes;
use crate::protocol::frame::{split_frame, Frame, FrameError};
use crate::protocol::messages::{self, ErrorFields};
use crate::protocol::startup::{CancelKey, StartupInfo};
use crate::router::{self, ListenerRole, Policy, Target};
use crate::tls::ServerTls;

/// Server frames before the session is handed over are small: auth challenges, parameters.
const SERVER_FRAME_LIMIT: usize = 1 << 20;
/// Client frames during authentication: PostgreSQL caps auth tokens at 64 KiB.
const CLIENT_AUTH_FRAME_LIMIT: usize = 65_536 + 5;
/// How often a server that is still finishing its promotion is asked again.
const PROMOTION_POLL: Duration = Duration::from_millis(10);
/// Pause before retrying a target that failed, doubling up to the max, unless the topology
/// changes first: many waiting clients must not hammer a dead server.
const RETRY_PAUSE_MIN: Duration = Duration::from_millis(50);
const RETRY_PAUSE_MAX: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("no {role} server after waiting {waited:?}: {why}")]
    NoServer {
        role: ListenerRole,
        waited: Duration,
        why: String,
    },
    #[error("the client closed the connection while it was being connected")]
    ClientGone,
    #[error("client: {0}")]
    ClientIo(std::io::Error),
    #[error("client: {0}")]
    ClientProtocol(FrameError),
    #[error("server {server}: {source}")]
    ServerIo {
        server: String,
        source: std::io::Error,
    },
    #[error("server {server}: {why}")]
    ServerProtocol { server: String, why: String },
    /// The server's own error went to the client as it was.
    #[error("server {server} refused: {} {}", .fields.sqlstate, .fields.message)]
    Refused { server: String, fields: ErrorFields },
    #[error("{member} stopped being a {role} server while the client was authenticating")]
    ChangedDuringAuth { member: String, role: ListenerRole },
    #[error("authentication did not finish within {0:?}")]
    AuthTimeout(Duration),
}

impl ConnectError {
    /// A short label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            ConnectError::NoServer { .. } => "no_server",
            ConnectError::ClientGone => "client_gone",
            ConnectError::ClientIo(_) => "client_error",
            ConnectError::ClientProtocol(_) => "client_protocol",
            ConnectError::ServerIo { .. } => "server_error",
            ConnectError::ServerProtocol { .. } => "server_protocol",
            ConnectError::Refused { .. } => "server_refused",
            ConnectError::ChangedDuringAuth { .. } => "changed_during_auth",
            ConnectError::AuthTimeout(_) => "auth_timeout",
        }
    }

    /// The ErrorResponse the client should still receive, if any.
    pub fn client_error(&self) -> Option<(&'static str, String)> {
        match self {
            ConnectError::NoServer { .. } => Some((
                codes::CANNOT_CONNECT_NOW,
                format!("patroxy: {self}; retry later"),
            )),
            ConnectError::ChangedDuringAuth { .. } => {
                Some((codes::ADMIN_SHUTDOWN, format!("patroxy: {self}; reconnect")))
            }
            ConnectError::ServerIo { .. } | ConnectError::ServerProtocol { .. } => {
                Some((codes::CONNECTION_FAILURE, format!("patroxy: {self}")))
            }
            ConnectError::AuthTimeout(_) | ConnectError::ClientProtocol(_) => {
                Some((codes::PROTOCOL_VIOLATION, format!("patroxy: {self}")))
            }
            ConnectError::ClientGone | ConnectError::ClientIo(_) | ConnectError::Refused { .. } => {
                None
            }
        }
    }
}

/// A server connection ready to relay, its greeting already passed to the client.
#[derive(Debug)]
pub struct Backend {
    pub stream: Stream,
    pub target: Target,
    pub key: Option<CancelKey>,
    /// Server bytes read past the first ReadyForQuery (asynchronous notices), for the relay.
    pub leftover: BytesMut,
    /// Bytes relayed during startup and authentication: client to server, server to client.
    pub bytes_up: u64,
    pub bytes_down: u64,
}

enum Attempt {
    Done(Backend),
    /// Nothing reached the client yet; another try may work.
    Retry(String),
    Fatal(ConnectError),
}

/// Connects the client to a server for the listener, authenticating end to end.
/// `client_buf` holds client bytes already read and receives any more read during connect.
/// The returned guard counts the session against its server's load.
pub async fn establish(
    client: &mut Stream,
    client_buf: &mut BytesMut,
    startup: &StartupInfo,
    listener: &ListenerContext,
    topology: &mut watch::Receiver<Arc<Topology>>,
) -> Result<(Backend, LoadGuard), ConnectError> {
    let shared = &listener.shared;
    let policy = &listener.policy;
    let started = Instant::now();
    let deadline = started + shared.timeouts.connect_wait;
    let no_server = |why: String| ConnectError::NoServer {
        role: policy.role,
        waited: started.elapsed(),
        why,
    };
    let turn = listener
        .turn
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut pause = RETRY_PAUSE_MIN;
    loop {
        let candidates = wait_for_candidates(
            &listener.name,
            policy,
            topology,
            client,
            client_buf,
            deadline,
        )
        .await
        .map_err(|e| match e {
            WaitError::Deadline(why) => no_server(why),
            WaitError::Client(e) => e,
        })?;
        let now = Instant::now();
        let load = &shared.load;
        let mut ordered = router::order(candidates, policy, |ep| load.sessions(ep), turn);
        // Servers that just failed go last: tried only when nothing else works.
        ordered.sort_by_key(|t| load.is_ejected(&t.endpoint, now));
        let mut why = String::new();
        for target in ordered {
            let claim = load.claim(&target.endpoint);
            let ctx = AttemptContext {
                target: &target,
                role: policy.role,
                listener,
                deadline,
            };
            match attempt(client, client_buf, startup, ctx, topology).await {
                Attempt::Done(backend) => return Ok((backend, claim)),
                Attempt::Fatal(e) => return Err(e),
                Attempt::Retry(w) => {
                    tracing::debug!(server = %target.endpoint, why = %w, "connect attempt failed");
                    // A primary is the only target of its role: ejecting it would only delay.
                    if policy.role != ListenerRole::Primary {
                        load.eject(&target.endpoint, Instant::now() + shared.timeouts.eject);
                    }
                    why = w;
                }
            }
            if Instant::now() >= deadline {
                break;
            }
        }
        if Instant::now() >= deadline {
            return Err(no_server(why));
        }
        // Retry after a pause, or at once if the topology moves.
        let wake = (Instant::now() + pause).min(deadline);
        pause = (pause * 2).min(RETRY_PAUSE_MAX);
        tokio::select! {
            _ = tokio::time::sleep_until(wake) => {}
            _ = topology.changed() => {}
        }
        if Instant::now() >= deadline {
            return Err(no_server(why));
        }
    }
}

enum WaitError {
    Deadline(String),
    Client(ConnectError),
}

/// Waits until the topology has candidates for the policy, watching the client for a hang-up.
async fn wait_for_candidates(
    listener: &str,
    policy: &Policy,
    topology: &mut watch::Receiver<Arc<Topology>>,
    client: &mut Stream,
    client_buf: &mut BytesMut,
    deadline: Instant,
) -> Result<Vec<Target>, WaitError> {
    let mut waiting = None;
    loop {
        let why = match router::candidates(policy, &topology.borrow_and_update()) {
            Ok(c) => return Ok(c),
            Err(why) => why.to_string(),
        };
        // Counted as waiting for as long as there is nothing to connect to.
        waiting.get_or_insert_with(|| crate::metrics::WaitingGauge::new(listener));

        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => return Err(WaitError::Deadline(why)),
            changed = topology.changed() => {
                if changed.is_err() {
                    // Discovery is gone (shutdown): nothing will change any more.
                    return Err(WaitError::Deadline(why));
                }
            }
            r = read_client(client, client_buf) => r.map_err(WaitError::Client)?,
        }
    }
}

/// Reads more client bytes, bounded: a client may pipeline a little, never a lot, before auth.
async fn read_client(client: &mut Stream, buf: &mut BytesMut) -> Result<(), ConnectError> {
    if buf.len() > CLIENT_AUTH_FRAME_LIMIT {
        return Err(ConnectError::ClientProtocol(FrameError::TooLong {
            tag: '?',
            len: buf.len() as i64,
            limit: CLIENT_AUTH_FRAME_LIMIT,
        }));
    }
    match client.read_buf(buf).await {
        Ok(0) => Err(ConnectError::ClientGone),
        Ok(_) => Ok(()),
        Err(e) => Err(ConnectError::ClientIo(e)),
    }
}

#[derive(Debug)]
enum ReadError {
    Io(std::io::Error),
    Closed,
    Frame(FrameError),
    Unexpected(u8),
}

/// Reads one whole frame from the server.
async fn server_frame(server: &mut Stream, buf: &mut BytesMut) -> Result<Frame, ReadError> {
    loop {
        if let Some(f) = split_frame(buf, SERVER_FRAME_LIMIT).map_err(ReadError::Frame)? {
            return Ok(f);
        }
        match server.read_buf(buf).await {
            Ok(0) => return Err(ReadError::Closed),
            Ok(_) => {}
            Err(e) => return Err(ReadError::Io(e)),
        }
    }
}

/// The SSLRequest a client sends to ask a server for TLS.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// Opens TLS to a server as `server_tls` says: an SSLRequest, then a handshake on `S`.
async fn open_tls(mut tcp: TcpStream, tls: &ServerTls, host: &str) -> Result<Stream, String> {
    let Some(connector) = &tls.connector else {
        return Ok(Stream::Plain(tcp));
    };
    let mut answer = [0u8; 1];
    let asked = async {
        tcp.write_all(&SSL_REQUEST).await?;
        tcp.read_exact(&mut answer).await
    };
    asked.await.map_err(|e| format!("asking for TLS: {e}"))?;
    match answer[0] {
        b'S' => {
            let name = crate::tls::server_name(host)?;
            let tls = connector
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS handshake: {e}"))?;
            Ok(Stream::Tls(Box::new(TlsStream::Client(tls))))
        }
        b'N' if tls.mode == ServerTlsMode::Prefer => Ok(Stream::Plain(tcp)),
        b'N' => Err(format!(
            "the server does not accept TLS, and server_tls.mode is {:?}",
            tls.mode
        )),
        other => Err(format!(
            "unexpected answer {:?} to SSLRequest",
            other as char
        )),
    }
}

/// What one attempt needs to know besides the streams.
struct AttemptContext<'a> {
    target: &'a Target,
    role: ListenerRole,
    listener: &'a ListenerContext,
    deadline: Instant,
}

/// One connection to one target.
async fn attempt(
    client: &mut Stream,
    client_buf: &mut BytesMut,
    startup: &StartupInfo,
    ctx: AttemptContext<'_>,
    topology: &mut watch::Receiver<Arc<Topology>>,
) -> Attempt {
    let AttemptContext {
        target,
        role,
        listener,
        deadline,
    } = ctx;
    let shared = &listener.shared;
    let server_name = target.endpoint.to_string();
    let connect_timeout = shared
        .timeouts
        .connect
        .min(deadline.saturating_duration_since(Instant::now()))
        .max(Duration::from_millis(1));
    let ep = &target.endpoint;
    let opened = timeout(connect_timeout, async {
        let tcp = TcpStream::connect((ep.host.as_str(), ep.port))
            .await
            .map_err(|e| e.to_string())?;
        tune_socket(&tcp);
        open_tls(tcp, &listener.server_tls, &ep.host).await
    });
    let mut server = match opened.await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Attempt::Retry(format!("connect to {server_name}: {e}")),
        Err(_) => {
            return Attempt::Retry(format!(
                "connect to {server_name}: timed out after {connect_timeout:?}"
            ))
        }
    };
    if let Err(e) = send(&mut server, &startup.raw).await {
        return Attempt::Retry(format!("{server_name}: {e}"));
    }

    let mut h = Handshake {
        client,
        client_buf,
        server: &mut server,
        server_buf: BytesMut::with_capacity(4096),
        server_name: &server_name,
        engaged: false,
        held: Vec::new(),
        bytes_up: startup.raw.len() as u64,
        bytes_down: 0,
    };
    let auth = timeout(shared.timeouts.startup, h.authenticate()).await;
    match auth {
        Ok(Ok(())) => {}
        Ok(Err(a)) => return a,
        Err(_) if h.engaged => {
            return Attempt::Fatal(ConnectError::AuthTimeout(shared.timeouts.startup))
        }
        Err(_) => {
            return Attempt::Retry(format!("{server_name}: no answer to the startup message"))
        }
    }
    let greeting = match h.greeting().await {
        Ok(g) => g,
        Err(a) => return a,
    };
    match (role.wants_standby(), greeting.hot_standby) {
        (Some(false), Some((at, true))) => {
            if let Err(a) = h.await_promotion(at, target, topology, deadline).await {
                return a;
            }
        }
        (Some(true), Some((_, false))) => {
            // Promoted, though the topology does not say so yet: not a replica any more.
            return if h.engaged {
                Attempt::Fatal(ConnectError::ChangedDuringAuth {
                    member: target.member.clone(),
                    role,
                })
            } else {
                Attempt::Retry(format!(
                    "{server_name} is not in recovery (in_hot_standby=off)"
                ))
            };
        }
        _ => {}
    }
    let mut out = BytesMut::with_capacity(h.held.iter().map(Bytes::len).sum());
    for f in h.held.drain(..) {
        out.extend_from_slice(&f);
    }
    if let Err(e) = send(h.client, &out).await {
        return Attempt::Fatal(ConnectError::ClientIo(e));
    }
    let (bytes_up, bytes_down) = (h.bytes_up, h.bytes_down + out.len() as u64);
    let leftover = std::mem::take(&mut h.server_buf);
    Attempt::Done(Backend {
        stream: server,
        target: target.clone(),
        key: greeting.key,
        leftover,
        bytes_up,
        bytes_down,
    })
}

struct Greeting {
    key: Option<CancelKey>,
    /// `in_hot_standby` (PostgreSQL 14+): the index in `held` of that ParameterStatus, and
    /// whether it said on.
    hot_standby: Option<(usize, bool)>,
}

/// The conversation with one server until the session is handed to the relay.
struct Handshake<'a> {
    client: &'a mut Stream,
    client_buf: &'a mut BytesMut,
    server: &'a mut Stream,
    server_buf: BytesMut,
    server_name: &'a str,
    /// The client has seen bytes from this server: from now on, failures are final.
    engaged: bool,
    /// Server frames held back from the client until the server is known to be right.
    held: Vec<Bytes>,
    bytes_up: u64,
    bytes_down: u64,
}

impl Handshake<'_> {
    fn server_failure(&self, e: ReadError) -> Attempt {
        let server = self.server_name.to_owned();
        let err = match e {
            ReadError::Io(source) => ConnectError::ServerIo { server, source },
            ReadError::Closed => ConnectError::ServerIo {
                server,
                source: std::io::ErrorKind::UnexpectedEof.into(),
            },
            ReadError::Frame(f) => ConnectError::ServerProtocol {
                server,
                why: f.to_string(),
            },
            ReadError::Unexpected(tag) => ConnectError::ServerProtocol {
                server,
                why: format!("unexpected message {:?} during authentication", tag as char),
            },
        };
        if self.engaged {
            Attempt::Fatal(err)
        } else {
            Attempt::Retry(err.to_string())
        }
    }

    /// A server ErrorResponse: retried if the client saw nothing and the server is only
    /// not ready (starting up, shutting down, in recovery); otherwise passed on as it is.
    async fn server_error(&mut self, frame: Frame) -> Attempt {
        let fields = messages::error_fields(frame.body()).unwrap_or_default();
        let transient = [codes::CANNOT_CONNECT_NOW, codes::ADMIN_SHUTDOWN];
        if !self.engaged && transient.contains(&fields.sqlstate.as_str()) {
            return Attempt::Retry(format!(
                "{}: {} {}",
                self.server_name, fields.sqlstate, fields.message
            ));
        }
        self.held.push(frame.bytes);
        let _ = self.flush_held().await;
        Attempt::Fatal(ConnectError::Refused {
            server: self.server_name.to_owned(),
            fields,
        })
    }

    async fn flush_held(&mut self) -> Result<(), ConnectError> {
        for f in self.held.drain(..) {
            send(self.client, &f)
                .await
                .map_err(ConnectError::ClientIo)?;
            self.bytes_down += f.len() as u64;
        }
        self.engaged = true;
        Ok(())
    }

    /// Relays the authentication exchange until AuthenticationOk.
    async fn authenticate(&mut self) -> Result<(), Attempt> {
        loop {
            tokio::select! {
                frame = server_frame(self.server, &mut self.server_buf) => {
                    let frame = frame.map_err(|e| self.server_failure(e))?;
                    match frame.tag {
                        codes::AUTHENTICATION => {
                            let code = messages::auth_code(frame.body());
                            self.held.push(frame.bytes);
                            if code == Some(codes::AUTH_OK) {
                                return Ok(());
                            }
                            // A challenge: the client must answer, so it sees this server now.
                            self.flush_held().await.map_err(Attempt::Fatal)?;
                        }
                        codes::ERROR_RESPONSE => return Err(self.server_error(frame).await),
                        codes::NEGOTIATE_PROTOCOL_VERSION | codes::NOTICE_RESPONSE => {
                            self.held.push(frame.bytes);
                        }
                        other => return Err(self.server_failure(ReadError::Unexpected(other))),
                    }
                }
                r = read_client(self.client, self.client_buf), if self.engaged => {
                    r.map_err(Attempt::Fatal)?;
                    while let Some(f) = split_frame(self.client_buf, CLIENT_AUTH_FRAME_LIMIT)
                        .map_err(|e| Attempt::Fatal(ConnectError::ClientProtocol(e)))?
                    {
                        send(self.server, &f.bytes).await
                            .map_err(|e| self.server_failure(ReadError::Io(e)))?;
                        self.bytes_up += f.bytes.len() as u64;
                    }
                }
            }
        }
    }

    /// Holds ParameterStatus, BackendKeyData and notices up to the first ReadyForQuery.
    async fn greeting(&mut self) -> Result<Greeting, Attempt> {
        let mut g = Greeting {
            key: None,
            hot_standby: None,
        };
        loop {
            let frame = server_frame(self.server, &mut self.server_buf)
                .await
                .map_err(|e| self.server_failure(e))?;
            match frame.tag {
                codes::PARAMETER_STATUS => {
                    if let Some((name, value)) = messages::parameter_status(frame.body()) {
                        if name == "in_hot_standby" {
                            g.hot_standby = Some((self.held.len(), value == "on"));
                        }
                    }
                }
                codes::BACKEND_KEY_DATA => g.key = messages::backend_key(frame.body()),
                codes::ERROR_RESPONSE => return Err(self.server_error(frame).await),
                codes::READY_FOR_QUERY => {
                    self.held.push(frame.bytes);
                    return Ok(g);
                }
                _ => {}
            }
            self.held.push(frame.bytes);
        }
    }

    /// The server is still a standby, though the leader key names it: it is finishing its
    /// promotion. Ask it again, on this same authenticated connection, until
    /// `in_hot_standby` turns off, the leader moves elsewhere, or time runs out.
    async fn await_promotion(
        &mut self,
        hot_standby_at: usize,
        target: &Target,
        topology: &mut watch::Receiver<Arc<Topology>>,
        deadline: Instant,
    ) -> Result<(), Attempt> {
        let query = messages::empty_query();
        loop {
            let still_target = matches!(
                router::primary(&topology.borrow_and_update()),
                Ok(t) if t.endpoint == target.endpoint
            );
            if !still_target {
                let why = format!(
                    "{} is no longer the target while it was still a standby",
                    self.server_name
                );
                return Err(if self.engaged {
                    Attempt::Fatal(ConnectError::ChangedDuringAuth {
                        member: target.member.clone(),
                        role: ListenerRole::Primary,
                    })
                } else {
                    Attempt::Retry(why)
                });
            }
            let why = format!(
                "{} is still in recovery (in_hot_standby=on)",
                self.server_name
            );
            if Instant::now() >= deadline {
                return Err(if self.engaged {
                    Attempt::Fatal(ConnectError::NoServer {
                        role: ListenerRole::Primary,
                        waited: Duration::ZERO,
                        why,
                    })
                } else {
                    Attempt::Retry(why)
                });
            }
            send(self.server, &query)
                .await
                .map_err(|e| self.server_failure(ReadError::Io(e)))?;
            let promoted = timeout_at(deadline, self.read_probe_reply(hot_standby_at))
                .await
                .unwrap_or(Ok(false))?;
            if promoted {
                return Ok(());
            }
            let next = (Instant::now() + PROMOTION_POLL).min(deadline);
            tokio::select! {
                _ = tokio::time::sleep_until(next) => {}
                _ = topology.changed() => {}
            }
        }
    }

    /// Reads the answer to the empty query; true once `in_hot_standby` reports off.
    async fn read_probe_reply(&mut self, hot_standby_at: usize) -> Result<bool, Attempt> {
        let mut promoted = false;
        loop {
            let frame = server_frame(self.server, &mut self.server_buf)
                .await
                .map_err(|e| self.server_failure(e))?;
            match frame.tag {
                codes::PARAMETER_STATUS => {
                    if let Some((name, value)) = messages::parameter_status(frame.body()) {
                        if name == "in_hot_standby" && value == "off" {
                            promoted = true;
                            // The client must see the value that holds now.
                            self.held[hot_standby_at] = frame.bytes;
                        }
                    }
                }
                codes::READY_FOR_QUERY => return Ok(promoted),
                codes::ERROR_RESPONSE => return Err(self.server_error(frame).await),
                _ => {} // EmptyQueryResponse, notices
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_errors_carry_fitting_sqlstates() {
        let e = ConnectError::NoServer {
            role: ListenerRole::Primary,
            waited: Duration::from_secs(1),
            why: "the cluster has no leader".into(),
        };
        let (code, msg) = e.client_error().unwrap();
        assert_eq!(code, "57P03");
        assert!(msg.contains("no leader"), "{msg}");
        let moved = ConnectError::ChangedDuringAuth {
            member: "a".into(),
            role: ListenerRole::Replica,
        };

        assert_eq!(moved.client_error().unwrap().0, "57P01");
        assert!(ConnectError::ClientGone.client_error().is_none());
        let refused = ConnectError::Refused {
            server: "x".into(),
            fields: ErrorFields::default(),
        };
        assert!(
            refused.client_error().is_none(),
            "the server's own error was passed on"
        );
    }
}
