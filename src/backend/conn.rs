//! A server connection that patroxy opened and authenticated itself, for the pools: the
//! startup message, authentication as the client's user (SCRAM with a password or with the
//! client's recovered ClientKey, md5, cleartext), the greeting, and the reset that makes it
//! clean again for the next client.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::time::{timeout, Instant};

use crate::auth::md5;
use crate::auth::scram::{self, ClientExchange, Credential};
use crate::discovery::patroni::Endpoint;
use crate::protocol::codes;
use crate::protocol::frame::{split_frame, Frame};
use crate::protocol::messages;
use crate::protocol::prepared::ServerStatements;
use crate::protocol::startup::CancelKey;
use crate::stream::{send, tune_socket, Stream};
use crate::tls::ServerTls;

/// Server frames outside a session's relay are small.
const FRAME_LIMIT: usize = 1 << 20;
/// The backend NotificationResponse tag.
const NOTIFICATION_RESPONSE: u8 = b'A';
/// Notifications kept that arrived while patroxy had the connection to itself.
const MAX_KEPT_NOTIFICATIONS: usize = 1024;

/// How patroxy proves itself to PostgreSQL as a client's user.
#[derive(Clone, Debug)]
pub enum Login {
    /// SCRAM with a password or a recovered ClientKey; also md5 or cleartext with a password.
    Scram(Credential),
    /// The stored md5 secret (`md5...`): answers md5 challenges.
    Md5(String),
    /// No secret: the server must trust this user.
    Trust,
}

/// A server connection at rest (after ReadyForQuery, idle).
#[derive(Debug)]
pub struct ServerConn {
    pub stream: Stream,
    pub endpoint: Endpoint,
    /// The server's ParameterStatus values, kept current.
    pub params: BTreeMap<String, String>,
    /// The values at login, before any client changed anything: what a client that asked
    /// for nothing else expects.
    pub defaults: BTreeMap<String, String>,
    /// Settings patroxy applied that the server does not report, by name.
    pub extra: BTreeMap<String, String>,
    /// Statements patroxy prepared on it for transaction-pooled clients.
    pub prepared: ServerStatements,
    /// The server's own cancel key.
    pub key: Option<CancelKey>,
    pub created: Instant,
    pub last_used: Instant,
    /// Server bytes read past the last ReadyForQuery.
    pub buf: BytesMut,
    /// Its places under the caps on server connections (`max_db_connections`,
    /// `max_server_connections`), freed when it closes.
    pub permits: Vec<tokio::sync::OwnedSemaphorePermit>,
    /// Its pool's generation when it opened (the console's RECONNECT advances it).
    pub generation: u64,
    /// Notifications that came while patroxy had the connection to itself (between a
    /// client's transaction and its listens moving elsewhere): the client's, to pass on.
    pub notifications: Vec<bytes::Bytes>,
    /// Something ran on it that may have left state no session read shows (a text too
    /// long to read, a function called by oid, a setting too long to read back): it is
    /// closed when its client lets it go, never lent to another.
    pub tainted: bool,
    /// A transaction pool's relay reads and writes through these.
    pub buffers: crate::stream::RelayBuffers,
    /// The thread whose reactor its socket is registered with: a lease prefers a
    /// connection of the borrower's own thread (`workers.rs`).
    pub home: std::thread::ThreadId,
}

/// What the server said or did instead of accepting the connection.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("timed out")]
    Timeout,
    #[error("{0}")]
    Protocol(String),
    #[error("server refused: {sqlstate} {message}")]
    Refused { sqlstate: String, message: String },
    #[error("SCRAM: {0}")]
    Scram(#[from] scram::ScramError),
    #[error("the server asked for a password patroxy does not have for this user")]
    NoSecret,
    #[error("the server is in recovery (in_hot_standby=on)")]
    InRecovery,
}

impl ConnError {
    /// Worth trying another server or a moment later (the server is starting, stopping, or
    /// not what the role wants), rather than a refusal of these credentials.
    pub fn is_transient(&self) -> bool {
        match self {
            ConnError::Refused { sqlstate, .. } => {
                [codes::CANNOT_CONNECT_NOW, codes::ADMIN_SHUTDOWN].contains(&sqlstate.as_str())
            }
            ConnError::Scram(_) | ConnError::NoSecret => false,
            _ => true,
        }
    }
}

/// Everything opening a connection of a pool takes: where, over what, as whom, and for
/// what role. A pool keeps the last one to open connections of its own (`min_pool_size`).
#[derive(Clone)]
pub struct Opener {
    pub endpoint: Endpoint,
    pub tls: ServerTls,
    pub user: String,
    pub database: String,
    pub login: Login,
    /// Checks `in_hot_standby` as the listener's role wants it.
    pub wants_standby: Option<bool>,
    pub limit: Duration,
    /// Keepalive and TCP_USER_TIMEOUT for the socket (`timeouts.tcp_*`).
    pub tcp: crate::stream::TcpOptions,
    /// More startup parameters (a client's own connection: `replication`, its settings).
    pub params: Vec<(String, String)>,
}

impl std::fmt::Debug for Opener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Opener({}@{} on {})",
            self.user, self.database, self.endpoint
        )
    }
}

impl Opener {
    /// Opens and authenticates a connection, within `limit`.
    pub async fn open(&self) -> Result<ServerConn, ConnError> {
        timeout(self.limit, async {
            let endpoint = &self.endpoint;
            let tcp = TcpStream::connect((endpoint.host.as_ref(), endpoint.port)).await?;
            tune_socket(&tcp, self.tcp);
            let stream = crate::tls::open(tcp, &self.tls, &endpoint.host)
                .await
                .map_err(ConnError::Protocol)?;
            let mut conn = ServerConn {
                stream,
                endpoint: endpoint.clone(),
                params: BTreeMap::new(),
                defaults: BTreeMap::new(),
                extra: BTreeMap::new(),
                prepared: ServerStatements::default(),
                key: None,
                created: Instant::now(),
                last_used: Instant::now(),
                buf: BytesMut::with_capacity(4096),
                permits: Vec::new(),
                generation: 0,
                notifications: Vec::new(),
                tainted: false,
                buffers: Default::default(),
                home: std::thread::current().id(),
            };
            let (user, database) = (self.user.as_str(), self.database.as_str());
            let mut params = vec![("user", user), ("database", database)];
            params.extend(self.params.iter().map(|(n, v)| (n.as_str(), v.as_str())));
            let startup = messages::startup(&params);
            send(&mut conn.stream, &startup).await?;
            conn.authenticate(user, &self.login, &self.tls).await?;
            conn.read_to_ready().await?;
            conn.defaults = conn.params.clone();
            let standby = conn.params.get("in_hot_standby").map(|v| v == "on");
            if self.wants_standby == Some(false) && standby == Some(true) {
                return Err(ConnError::InRecovery);
            }
            if self.wants_standby == Some(true) && standby == Some(false) {
                return Err(ConnError::Protocol(
                    "not in recovery (in_hot_standby=off)".into(),
                ));
            }
            Ok(conn)
        })
        .await
        .map_err(|_| ConnError::Timeout)?
    }
}

impl ServerConn {
    async fn frame(&mut self) -> Result<Frame, ConnError> {
        loop {
            let split = split_frame(&mut self.buf, FRAME_LIMIT);
            if let Some(f) = split.map_err(|e| ConnError::Protocol(e.to_string()))? {
                return Ok(f);
            }
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                return Err(ConnError::Protocol(
                    "the server closed the connection".into(),
                ));
            }
        }
    }

    fn refused(frame: &Frame) -> ConnError {
        let f = messages::error_fields(frame.body()).unwrap_or_default();
        ConnError::Refused {
            sqlstate: f.sqlstate,
            message: f.message,
        }
    }

    /// Answers the server's authentication requests until AuthenticationOk.
    /// Answers only what `tls` allows on this leg: a server (or whoever sits on an
    /// unverified leg) asking for a cleartext password is refused, not given one. A SCRAM
    /// exchange must end with the server's signature checked: AuthenticationOk before it
    /// is refused.
    async fn authenticate(
        &mut self,
        user: &str,
        login: &Login,
        tls: &crate::tls::ServerTls,
    ) -> Result<(), ConnError> {
        use crate::config::ServerAuthMethod as M;
        let mut scram: Option<ClientExchange> = None;
        // The server asked for something before AuthenticationOk.
        let mut asked = false;
        let refuse = |what: &str| {
            ConnError::Protocol(format!("the server asked for {what}, which patroxy does not answer on this leg (server_tls.require_auth; by default a password goes only as SCRAM unless the server's certificate is verified)"))
        };
        loop {
            let frame = self.frame().await?;
            match frame.tag {
                codes::AUTHENTICATION => {}
                codes::ERROR_RESPONSE => return Err(Self::refused(&frame)),
                codes::NEGOTIATE_PROTOCOL_VERSION | codes::NOTICE_RESPONSE => continue,
                t => {
                    return Err(ConnError::Protocol(format!(
                        "unexpected {:?} during authentication",
                        t as char
                    )))
                }
            }
            let (code, payload) = messages::auth_payload(frame.body())
                .ok_or_else(|| ConnError::Protocol("a malformed authentication request".into()))?;
            let asked_before = std::mem::replace(&mut asked, true);
            let reply = match (code, login) {
                (codes::AUTH_OK, _) if scram.is_some() => {
                    return Err(ConnError::Protocol(
                        "the server said AuthenticationOk before proving it knows the secret (no SCRAM server signature)".into(),
                    ))
                }
                (codes::AUTH_OK, _) if !asked_before && !tls.answers(M::None, false) => {
                    return Err(refuse("no authentication at all"))
                }
                (codes::AUTH_OK, _) => return Ok(()),
                (AUTH_CLEARTEXT, _) if !tls.answers(M::Password, false) => {
                    return Err(refuse("a cleartext password"))
                }
                (AUTH_MD5, Login::Md5(_)) if !tls.answers(M::Md5, true) => return Err(refuse("md5")),
                (AUTH_MD5, Login::Scram(_)) if !tls.answers(M::Md5, false) => {
                    return Err(refuse("md5"))
                }
                (AUTH_SASL, _) if !tls.answers(M::Scram, false) => {
                    return Err(refuse("SCRAM-SHA-256"))
                }
                (AUTH_CLEARTEXT, Login::Scram(Credential::Password(p))) => {
                    messages::password_message(p)
                }
                (AUTH_MD5, Login::Md5(stored)) => {
                    messages::password_message(&md5::response(stored, salt(payload)?))
                }
                (AUTH_MD5, Login::Scram(Credential::Password(p))) => messages::password_message(
                    &md5::response(&md5::stored(p, user), salt(payload)?),
                ),
                (AUTH_SASL, Login::Scram(credential)) => {
                    let offered = payload
                        .split(|b| *b == 0)
                        .any(|m| m == scram::MECHANISM.as_bytes());
                    if !offered {
                        return Err(ConnError::Protocol(
                            "the server offers no SCRAM-SHA-256".into(),
                        ));
                    }
                    let (exchange, first) =
                        ClientExchange::start(credential.clone(), &scram::nonce());
                    scram = Some(exchange);
                    messages::sasl_initial(scram::MECHANISM, first.as_bytes())
                }
                (AUTH_SASL_CONTINUE, _) => {
                    let mut exchange = scram
                        .take()
                        .ok_or_else(|| ConnError::Protocol("SASL out of order".into()))?;
                    let text = std::str::from_utf8(payload)
                        .map_err(|_| ConnError::Protocol("SASL data".into()))?
                        .to_owned();
                    // PBKDF2 at the server's iteration count: off the runtime's threads.
                    let (exchange, answer) = tokio::task::spawn_blocking(move || {
                        let answer = exchange.respond(&text);
                        (exchange, answer)
                    })
                    .await
                    .map_err(|e| ConnError::Protocol(e.to_string()))?;
                    scram = Some(exchange);
                    messages::sasl_response(answer?.as_bytes())
                }
                (AUTH_SASL_FINAL, _) => {
                    let exchange = scram
                        .take()
                        .ok_or_else(|| ConnError::Protocol("SASL out of order".into()))?;
                    let text = std::str::from_utf8(payload)
                        .map_err(|_| ConnError::Protocol("SASL data".into()))?;
                    exchange.finish(text)?;
                    continue;
                }
                _ => return Err(ConnError::NoSecret),
            };
            send(&mut self.stream, &reply).await?;
        }
    }

    /// Reads until ReadyForQuery, keeping ParameterStatus and BackendKeyData; an error
    /// response fails it. Returns the transaction status.
    pub async fn read_to_ready(&mut self) -> Result<u8, ConnError> {
        let mut failed = None;
        loop {
            let frame = self.next_frame(&failed).await?;
            if let Some(status) = self.note(&frame, &mut failed) {
                return failed.map_or(Ok(status), Err);
            }
        }
    }

    /// The next frame; when the server closes after an error (a FATAL: the database does
    /// not exist, say), the error it gave.
    async fn next_frame(&mut self, failed: &Option<ConnError>) -> Result<Frame, ConnError> {
        match (self.frame().await, failed) {
            (Ok(frame), _) => Ok(frame),
            (Err(_), Some(ConnError::Refused { sqlstate, message })) => Err(ConnError::Refused {
                sqlstate: sqlstate.clone(),
                message: message.clone(),
            }),
            (Err(e), _) => Err(e),
        }
    }

    /// What a frame read outside a relay says: a parameter's value, the cancel key, an
    /// error, a notification (kept for the client listening); the transaction status, at
    /// ReadyForQuery.
    fn note(&mut self, frame: &Frame, failed: &mut Option<ConnError>) -> Option<u8> {
        match frame.tag {
            codes::PARAMETER_STATUS => {
                if let Some((name, value)) = messages::parameter_status(frame.body()) {
                    self.params.insert(name, value);
                }
            }
            codes::BACKEND_KEY_DATA => self.key = messages::backend_key(frame.body()),
            codes::ERROR_RESPONSE => *failed = failed.take().or(Some(Self::refused(frame))),
            NOTIFICATION_RESPONSE if self.notifications.len() < MAX_KEPT_NOTIFICATIONS => {
                self.notifications.push(frame.bytes.clone())
            }
            codes::READY_FOR_QUERY => {
                return Some(frame.body().first().copied().unwrap_or(codes::TX_IDLE))
            }
            _ => {}
        }
        None
    }

    /// Runs one simple query and returns its rows (text values, `None` for NULL).
    pub async fn query_rows(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>, ConnError> {
        self.rows_of(&messages::query(sql)).await
    }

    /// Sends one request (a simple Query, or extended-protocol messages ending with a Sync)
    /// and returns the rows of its answer.
    pub async fn rows_of(&mut self, request: &[u8]) -> Result<Vec<Vec<Option<String>>>, ConnError> {
        // A simple Query, or patroxy's own unnamed Parse, replaces the unnamed statement.
        self.prepared.unnamed = None;
        send(&mut self.stream, request).await?;
        let mut rows = Vec::new();
        let mut failed = None;
        loop {
            let frame = self.next_frame(&failed).await?;
            if frame.tag == codes::DATA_ROW {
                let row = messages::data_row(frame.body())
                    .ok_or_else(|| ConnError::Protocol("a malformed DataRow".into()))?;
                rows.push(row);
            } else if self.note(&frame, &mut failed).is_some() {
                return failed.map_or(Ok(rows), Err);
            }
        }
    }

    /// Runs these simple queries, one after the other, in one write; the last one's
    /// transaction status, or the first error.
    pub async fn execute_each(&mut self, sqls: &[&str]) -> Result<u8, ConnError> {
        let mut out = BytesMut::new();
        for sql in sqls {
            out.extend_from_slice(&messages::query(sql));
        }
        self.prepared.unnamed = None;
        send(&mut self.stream, &out).await?;
        let mut first_error = None;
        let mut status = codes::TX_IDLE;
        for _ in sqls {
            match self.read_to_ready().await {
                Ok(s) => status = s,
                Err(e @ ConnError::Refused { .. }) => first_error = first_error.or(Some(e)),
                Err(e) => return Err(e),
            }
        }
        first_error.map_or(Ok(status), Err)
    }

    /// Runs `sql` (a simple query, possibly several statements) and waits for its end.
    pub async fn execute(&mut self, sql: &str) -> Result<u8, ConnError> {
        self.prepared.unnamed = None;
        send(&mut self.stream, &messages::query(sql)).await?;
        self.read_to_ready().await
    }

    /// Sends these Parse frames and a Sync, and waits for the ReadyForQuery: each
    /// statement prepared, or the first error.
    pub async fn prepare_all(&mut self, parses: &[bytes::Bytes]) -> Result<(), ConnError> {
        let mut out = BytesMut::with_capacity(parses.iter().map(|p| p.len()).sum::<usize>() + 5);
        for p in parses {
            out.extend_from_slice(p);
        }
        out.extend_from_slice(&[codes::SYNC, 0, 0, 0, 4]);
        send(&mut self.stream, &out).await?;
        self.read_to_ready().await.map(|_| ())
    }

    /// Makes the connection clean for another client: a transaction left open is rolled
    /// back, then `reset_query` runs. Clean means idle at ReadyForQuery, nothing pending.
    pub async fn reset(
        &mut self,
        tx_status: u8,
        reset_query: &str,
        custom: &[String],
        limit: Duration,
    ) -> Result<(), ConnError> {
        timeout(limit, async {
            if tx_status != codes::TX_IDLE {
                self.execute("ROLLBACK").await?;
            }
            let status = if reset_query.is_empty() {
                codes::TX_IDLE
            } else {
                self.run_own(reset_query).await?
            };
            // DISCARD ALL resets every setting and statement: what patroxy applied or
            // prepared is gone too. After anything else, the server says what is left:
            // settings and statements are known again, and a session that still holds
            // objects or listens is not handed to anyone.
            if reset_query.trim().eq_ignore_ascii_case("DISCARD ALL") {
                self.extra.clear();
                self.prepared.clear();
            } else if status == codes::TX_IDLE {
                let mut look = crate::backend::session::Look::ALL;
                look.ask_for(custom.iter().map(String::as_str));
                let snapshot = self.inspect(look).await?;
                if let Some(held) = snapshot.holds() {
                    return Err(ConnError::Protocol(format!(
                        "the session still holds {held}"
                    )));
                }
                if !snapshot.listens.is_empty() {
                    let n = snapshot.listens.len();
                    return Err(ConnError::Protocol(format!(
                        "the session still listens on {n} channels"
                    )));
                }
                self.resync(&snapshot);
            }
            self.notifications.clear();
            match (status, self.buf.is_empty()) {
                (codes::TX_IDLE, true) => Ok(()),
                _ => Err(ConnError::Protocol("not idle after the reset".into())),
            }
        })
        .await
        .map_err(|_| ConnError::Timeout)?
    }

    /// Checked with a round trip (an empty query), as a connection idle for a while is
    /// before it is lent: it answers, idle, within `limit`.
    pub async fn check(&mut self, limit: Duration) -> Result<(), ConnError> {
        match timeout(limit, self.execute("")).await {
            Ok(Ok(codes::TX_IDLE)) if self.buf.is_empty() => Ok(()),
            Ok(Ok(_)) => Err(ConnError::Protocol("not idle".into())),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(ConnError::Timeout),
        }
    }

    /// Still usable: the server has not closed it nor sent anything unasked. A read that
    /// would block is the healthy answer; no round trip.
    pub fn looks_alive(&self) -> bool {
        let mut probe = [0u8; 1];
        matches!(
            self.stream.tcp().try_read(&mut probe),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
        )
    }
}

const AUTH_CLEARTEXT: u32 = 3;
const AUTH_MD5: u32 = 5;
const AUTH_SASL: u32 = 10;
const AUTH_SASL_CONTINUE: u32 = 11;
const AUTH_SASL_FINAL: u32 = 12;

fn salt(payload: &[u8]) -> Result<[u8; 4], ConnError> {
    payload
        .get(..4)
        .and_then(|s| s.try_into().ok())
        .ok_or_else(|| ConnError::Protocol("an md5 request without its salt".into()))
}
