//! The handshake with one server: TCP connect, TLS (`tls::open`), the untouched
//! StartupMessage, authentication relayed end to end, then the server's greeting held until
//! the server has shown it is what the listener wants: a primary (`in_hot_standby` off; a
//! standby the leader key names is polled on the same connection until its promotion ends)
//! or a standby (on).

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::{timeout, timeout_at, Instant};

use super::connect::{read_client, CLIENT_AUTH_FRAME_LIMIT};
use super::{Backend, ConnectError};
use crate::config::Timeouts;
use crate::discovery::Topology;
use crate::protocol::codes;
use crate::protocol::frame::{split_frame, Frame, FrameError};
use crate::protocol::messages;
use crate::protocol::startup::{CancelKey, StartupInfo};
use crate::routing::{self, ListenerRole, Target};
use crate::stream::{send, tune_socket, Stream};
use crate::tls::ServerTls;

/// Server frames before the session is handed over are small: auth challenges, parameters.
const SERVER_FRAME_LIMIT: usize = 1 << 20;
/// How often a server that is still finishing its promotion is asked again.
const PROMOTION_POLL: Duration = Duration::from_millis(10);

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

/// What one attempt needs to know besides the streams.
pub(super) struct AttemptContext<'a> {
    pub target: &'a Target,
    pub role: ListenerRole,
    pub server_tls: &'a ServerTls,
    pub timeouts: &'a Timeouts,
    /// When the client started waiting for a server, and when it stops.
    pub started: Instant,
    pub deadline: Instant,
    /// Given to the client in the server's BackendKeyData's place.
    pub client_key: Option<&'a CancelKey>,
}

pub(super) enum Attempt {
    Done(Backend),
    /// Nothing reached the client yet; another try may work.
    Retry(String),
    Fatal(ConnectError),
}

/// One connection to one target: TCP, TLS, the startup message, authentication relayed to
/// the client, then the greeting held until the server is known to be what the role wants.
pub(super) async fn attempt(
    client: &mut Stream,
    client_buf: &mut BytesMut,
    startup: &StartupInfo,
    ctx: AttemptContext<'_>,
    topology: &mut watch::Receiver<Arc<Topology>>,
) -> Attempt {
    let AttemptContext {
        target,
        role,
        server_tls,
        timeouts,
        started,
        deadline,
        client_key,
    } = ctx;
    let server_name = target.endpoint.to_string();
    let connect_timeout = timeouts
        .connect
        .min(deadline.saturating_duration_since(Instant::now()))
        .max(Duration::from_millis(1));
    let ep = &target.endpoint;
    let opened = timeout(connect_timeout, async {
        let tcp = TcpStream::connect((ep.host.as_ref(), ep.port))
            .await
            .map_err(|e| e.to_string())?;
        tune_socket(&tcp, timeouts.tcp());
        crate::tls::open(tcp, server_tls, &ep.host).await
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
        client_key,
        bytes_up: startup.raw.len() as u64,
        bytes_down: 0,
    };
    let auth = timeout(timeouts.startup, h.authenticate()).await;
    match auth {
        Ok(Ok(())) => {}
        Ok(Err(a)) => return a,
        Err(_) if h.engaged => return Attempt::Fatal(ConnectError::AuthTimeout(timeouts.startup)),
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
            let wait = Wait { started, deadline };
            if let Err(a) = h.await_promotion(at, target, topology, wait).await {
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

/// How long the client has waited for a server, and until when it may.
#[derive(Clone, Copy)]
struct Wait {
    started: Instant,
    deadline: Instant,
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
    client_key: Option<&'a CancelKey>,
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
                codes::BACKEND_KEY_DATA => {
                    g.key = messages::backend_key(frame.body());
                    if let Some(k) = self.client_key {
                        self.held.push(messages::backend_key_data(k));
                        continue;
                    }
                }
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
        wait: Wait,
    ) -> Result<(), Attempt> {
        let Wait { started, deadline } = wait;
        let query = messages::empty_query();
        loop {
            let still_target = matches!(
                routing::primary(&topology.borrow_and_update()),
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
                        waited: started.elapsed(),
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
            // A client that gives up meanwhile ends the wait.
            tokio::select! {
                _ = tokio::time::sleep_until(next) => {}
                _ = topology.changed() => {}
                r = super::connect::read_client(self.client, self.client_buf) => {
                    r.map_err(Attempt::Fatal)?;
                }
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
