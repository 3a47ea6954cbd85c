//! An authenticated pooled client's session: it borrows a server connection for each request
//! that needs one (until it leaves in session mode, until the transaction ends in
//! transaction mode), fitted first with the client's settings. Between loans it holds
//! nothing; a leader change does not touch it. A request whose connection turned out dead
//! before any of it was sent goes to another one.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::time::Instant;
use tracing::warn;

use super::bell;
use super::clients::{self, Client};
use super::context::ListenerContext;
use super::listening::Listening;
use super::negotiate::send_fatal;
use super::relay::End;
use crate::backend::checkout::{LastPool, Lender, Who};
use crate::backend::conn::{ConnError, ServerConn};
use crate::backend::pool::Lease;
use crate::backend::session::Wanted;
use crate::protocol::classify::{ascii_safe, Strings};
use crate::protocol::codes;
use crate::protocol::prepared::{ClientStatements, Reading};
use crate::routing::drain::DrainCause;
use crate::routing::Target;
use crate::stream::{send, Stream};

pub(super) type Topo = tokio::sync::watch::Receiver<std::sync::Arc<crate::discovery::Topology>>;

/// What a client waiting for a server connection may have patroxy hold of what it sent.
pub const WAITING_BYTES: usize = 256 * 1024;

/// The client's Terminate, alone.
const TERMINATE: [u8; 5] = [codes::TERMINATE, 0, 0, 0, 4];
/// A message's tag and length.
const HEADER: usize = 5;

/// One authenticated pooled client.
pub(super) struct Session<'a> {
    pub ctx: &'a Arc<ListenerContext>,
    pub peer: SocketAddr,
    pub who: Who<'a>,
    pub started: Instant,
    /// Its entry in the console's list of clients.
    pub me: &'a Client,
    /// Unique among this instance's clients.
    pub id: u64,
    /// The pool it borrowed from last.
    pub last_pool: LastPool,
    /// Where its cancel key leads: each loan's server connection, while it lasts.
    pub cancel_slot: crate::backend::cancel::ClientSlot,
}

/// How a pooled client's session ended, in all.
pub(super) struct Ended {
    pub end: End,
    pub transactions: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
}

/// What a pooled client carries from one server connection to the next.
pub(super) struct Carried {
    pub wanted: Wanted,
    /// Its named statements (transaction mode).
    pub statements: ClientStatements,
    /// Session mode, after a switchover move: the Parse messages that recreate the named
    /// statements it had on its last server, for its next one.
    pub replay: Vec<Bytes>,
    /// Transaction mode: the server connection it keeps between transactions, while its
    /// session holds objects that cannot follow it elsewhere.
    pub pinned: Option<Attached>,
    /// Transaction mode: the channels it listens on, and its notifications.
    pub listening: Listening,
    /// Its cancels on their way to its server connection of the moment.
    pub cancels: Arc<crate::backend::cancel::InFlight>,
    /// Transaction mode: the first bytes of its next message, read before the last
    /// transaction's connection went back (less than a header: nothing was sent of them).
    pub carry: BytesMut,
}

/// A server connection lent to the client, where it is, and why the client keeps it
/// between transactions, if it does.
pub(super) struct Attached {
    pub lease: Lease,
    pub conn: ServerConn,
    pub target: Target,
    pub pin: Option<Pin>,
}

/// Why a transaction-pooled client keeps its server connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Pin {
    /// The label of `patroxy_pins_total`.
    pub reason: &'static str,
    /// Until the client leaves: what it holds is not seen on the server (a library, the
    /// random seed, a setting under a computed name), so it is never seen gone either.
    pub for_good: bool,
    /// Nothing resets what it holds (`LOAD`, `setseed()`): the connection is closed when
    /// the client leaves, never lent again.
    pub closes: bool,
}

/// The connection for the client's next request, or why there is none. Not boxed: it
/// moves once per transaction, and a box would allocate once per transaction.
#[allow(clippy::large_enum_variant)]
enum Step {
    Go(Attached),
    /// patroxy answered the request itself; read on.
    Answered,
    /// None usable now (fitting one failed on the way); try again, within connect_wait.
    Again,
    /// The server refused the client's own settings (its SQLSTATE and message): told as
    /// PostgreSQL would tell it.
    Refused(String, String),
    Over(End),
}

/// What the client's next bytes call for.
enum Next {
    /// A request that needs a server connection (in the buffer).
    Borrow,
    /// patroxy answered it; read on.
    Answered,
    Over(End),
}

impl Session<'_> {
    /// Lends the client a server connection from its first message on: until it leaves
    /// (session mode), or (`per_transaction`) until the ReadyForQuery that ends each
    /// transaction.
    pub async fn serve(
        &self,
        client: &mut Stream,
        mut buf: BytesMut,
        wanted: Wanted,
        topology: &mut Topo,
        per_transaction: bool,
    ) -> Ended {
        let mut carried = Carried {
            wanted,
            statements: ClientStatements::default(),
            replay: Vec::new(),
            pinned: None,
            listening: Listening::new(self.id),
            cancels: Default::default(),
            carry: BytesMut::new(),
        };
        // Since when a transaction has failed to get a usable connection, and the pause
        // between tries (a storm of new server connections helps nobody).
        let mut retrying: Option<Instant> = None;
        let mut pause =
            crate::backoff::Backoff::new(Duration::from_millis(20), Duration::from_secs(1));
        let mut total = Ended {
            end: End::ClientClosed,
            transactions: 0,
            bytes_up: 0,
            bytes_down: 0,
        };
        let connect_wait = self.ctx.proxy.timeouts.connect_wait;
        loop {
            // The first bytes of the client's next message, read with the last transaction.
            if buf.is_empty() {
                std::mem::swap(&mut buf, &mut carried.carry);
            }
            let step = self
                .connection(client, &mut buf, per_transaction, topology, &mut carried)
                .await;
            let attached = match step {
                Step::Go(a) => a,
                Step::Answered => continue,
                Step::Again if may_retry(&mut retrying, connect_wait) => {
                    tokio::time::sleep(pause.next_pause()).await;
                    continue;
                }
                Step::Again => {
                    let msg = "patroxy: applying the session's parameters failed on every server connection tried";
                    send_fatal(client, codes::CONNECTION_FAILURE, msg).await;
                    return total.ending(End::ServerClosed);
                }
                Step::Refused(sqlstate, message) => {
                    warn!(client = %self.peer, listener = %self.ctx.name, user = self.who.user, %sqlstate, %message, "the server refused the client's settings; session ended");
                    send_fatal(client, &sqlstate, &message).await;
                    return total.ending(End::ServerClosed);
                }
                Step::Over(end) => return total.ending(end),
            };
            // Kept until the request is sent: a connection found dead takes none of it.
            let replayed = std::mem::take(&mut carried.replay);
            self.me.set(clients::ACTIVE);
            let pid = attached.conn.key.as_ref().map_or(0, |k| k.pid);
            self.me.hold(Some((attached.conn.endpoint.clone(), pid)));
            let pending = std::mem::take(&mut buf);
            // Boxed: between transactions an idle client keeps only this loop's small state,
            // not room for a relay.
            let one = Box::pin(self.attach(
                client,
                pending,
                attached,
                per_transaction,
                topology,
                &mut carried,
            ))
            .await;
            if carried.pinned.is_none() {
                self.me.set(clients::IDLE);
                self.me.hold(None);
            }
            let one = match one {
                Ok(one) => one,
                // Nothing reached the dead connection: the same request goes to another.
                Err(unsent) if may_retry(&mut retrying, connect_wait) => {
                    buf = unsent;
                    carried.replay = replayed;
                    continue;
                }
                Err(_) => {
                    let msg = "patroxy: every server connection tried was closed before the request reached it";
                    send_fatal(client, codes::CONNECTION_FAILURE, msg).await;
                    return total.ending(End::ServerClosed);
                }
            };
            retrying = None;
            total.transactions += 1;
            total.bytes_up += one.bytes_up;
            total.bytes_down += one.bytes_down;
            if !matches!(one.end, End::Released | End::Moved) {
                return total.ending(one.end);
            }
        }
    }

    /// The connection for the client's next request: the one it is pinned to, or one
    /// borrowed for it and fitted with its settings. A pinned connection is used at once:
    /// its relay watches both sides (the server's notices, its end, a drain) while the
    /// client is quiet.
    async fn connection(
        &self,
        client: &mut Stream,
        buf: &mut BytesMut,
        per_transaction: bool,
        topology: &mut Topo,
        carried: &mut Carried,
    ) -> Step {
        if let Some(pinned) = carried.pinned.take() {
            return Step::Go(pinned);
        }
        match self.next(client, buf, per_transaction, carried).await {
            Next::Borrow => {}
            Next::Answered => return Step::Answered,
            Next::Over(end) => return Step::Over(end),
        }
        let attached = match self.borrow(client, buf, topology).await {
            Ok(a) => a,
            Err(end) => return Step::Over(end),
        };
        match self.fit(attached, carried).await {
            Ok(a) => Step::Go(a),
            // The client's own values, refused: trying elsewhere would not change that.
            Err(ConnError::Refused { sqlstate, message }) => Step::Refused(sqlstate, message),
            Err(_) => Step::Again,
        }
    }

    /// Waits for the client's next request, between loans, and answers it without a server
    /// when it can: a batch that only prepares named statements (transaction mode).
    async fn next(
        &self,
        client: &mut Stream,
        buf: &mut BytesMut,
        per_transaction: bool,
        carried: &mut Carried,
    ) -> Next {
        // Until a message's header is whole, nothing says what it asks for: a client that
        // sends a few bytes and stops holds no server connection.
        if buf.len() < HEADER {
            // PgBouncer's client_idle_timeout: a client that holds no server connection
            // and sends nothing this long is let go.
            let idle_limit = self.ctx.pool.client_idle_timeout;
            let idle = async {
                match idle_limit.is_zero() {
                    true => std::future::pending().await,
                    false => tokio::time::sleep(idle_limit).await,
                }
            };
            tokio::pin!(idle);
            let listening = &mut carried.listening;
            loop {
                tokio::select! {
                    biased;
                    read = client.read_next(buf) => match read {
                        Ok(0) => return Next::Over(End::ClientClosed),
                        Ok(_) if buf.len() < HEADER => {}
                        Ok(_) => break,
                        Err(e) => return Next::Over(End::ClientIo(e)),
                    },
                    // Between transactions: the client's notifications, as PostgreSQL
                    // gives them to an idle session.
                    n = listening.next(), if listening.is_listening() => {
                        let Some(first) = n else {
                            return Next::Over(self.overflowed(client).await);
                        };
                        let mut out = BytesMut::from(&first[..]);
                        while let Some(more) = listening.queued() {
                            out.extend_from_slice(&more);
                        }
                        if let Err(e) = send(client, &out).await {
                            return Next::Over(End::ClientIo(e));
                        }
                    }
                    rung = self.me.bell.rung(bell::SHUTDOWN | bell::KILLED) => return Next::Over(self.ended_by(client, rung).await),
                    _ = &mut idle => return Next::Over(self.idle_too_long(client, idle_limit).await),
                }
            }
        }
        if buf[..] == TERMINATE {
            return Next::Over(End::ClientClosed);
        }
        if per_transaction {
            let context = carried.wanted.statement_context();
            let proxy = &self.ctx.proxy;
            let reading = Reading {
                naming: &proxy.naming,
                classifier: &proxy.classifier,
                strings: Strings::of(carried.wanted.get("standard_conforming_strings")),
                ascii_safe: ascii_safe(carried.wanted.get("client_encoding")),
                context,
            };
            if let Some(reply) = carried.statements.answer_locally(buf, reading) {
                buf.clear();
                let limit = self.ctx.pool.client_memory;
                if carried.statements.held() + carried.wanted.held() > limit {
                    let end = End::ClientMemory { limit };
                    let msg = format!("patroxy: {end}");
                    send_fatal(client, codes::PROGRAM_LIMIT_EXCEEDED, &msg).await;
                    return Next::Over(end);
                }
                return match send(client, &reply).await {
                    Ok(()) => Next::Answered,
                    Err(e) => Next::Over(End::ClientIo(e)),
                };
            }
        }
        Next::Borrow
    }

    /// A server connection for the client's request. While it waits, the client is
    /// watched: one that gives up is not logged in for when a server appears (what it sends
    /// meanwhile is kept).
    async fn borrow(
        &self,
        client: &mut Stream,
        buf: &mut BytesMut,
        topology: &mut Topo,
    ) -> Result<Attached, End> {
        self.me.set(clients::WAITING);
        let lender = Lender {
            last_pool: Some(&self.last_pool),
            ..self.ctx.lender()
        };
        if let Some((lease, conn, target)) = lender.checkout_now(self.who, topology) {
            return Ok(Attached {
                lease,
                conn,
                target,
                pin: None,
            });
        }
        let mut waiting = Box::pin(lender.checkout(self.who, topology));
        let checked_out = loop {
            // Biased: a checkout that finishes at its first poll leaves the client's socket
            // and the bell unpolled.
            tokio::select! {
                biased;
                r = &mut waiting => break r,
                // Read on only to see the client leave: past a bound, what it sends waits
                // in its own socket, not in patroxy's memory.
                read = client.read_next(buf), if buf.len() < WAITING_BYTES => match read {
                    Ok(0) => return Err(End::ClientClosed),
                    Ok(_) if buf.ends_with(&TERMINATE) => return Err(End::ClientClosed),
                    Ok(_) => continue,
                    Err(e) => return Err(End::ClientIo(e)),
                },
                rung = self.me.bell.rung(bell::SHUTDOWN | bell::KILLED) => return Err(self.ended_by(client, rung).await),
            }
        };
        drop(waiting);
        match checked_out {
            Ok((lease, conn, target)) => Ok(Attached {
                lease,
                conn,
                target,
                pin: None,
            }),
            Err(e) => {
                crate::metrics::connect_failure(&self.ctx.name, e.label());
                let (code, msg) = e.client_error();
                send_fatal(client, code, &msg).await;
                warn!(client = %self.peer, listener = %self.ctx.name, user = self.who.user, reason = %e, "no server for a transaction");
                Err(End::ServerClosed)
            }
        }
    }

    /// Makes the connection fit the client: its settings, and after a move its named
    /// statements. On failure the connection is closed; the client's transaction has not
    /// started, so it may try again with another one.
    async fn fit(&self, attached: Attached, carried: &mut Carried) -> Result<Attached, ConnError> {
        let Attached {
            lease,
            mut conn,
            target,
            pin,
        } = attached;
        // Most often the connection fits already: the last client wanted the same.
        if carried.replay.is_empty() && conn.fits(&carried.wanted) {
            return Ok(Attached {
                lease,
                conn,
                target,
                pin,
            });
        }
        // Bounded: a server that froze without closing anything would hold the client here,
        // where no drain reaches.
        let limit = self.ctx.proxy.timeouts.connect.max(Duration::from_secs(1));
        let fitted = async {
            conn.fit(&carried.wanted).await?;
            match carried.replay.is_empty() {
                true => Ok(()),
                false => conn.prepare_all(&carried.replay).await,
            }
        };
        let fitted = tokio::time::timeout(limit, fitted)
            .await
            .unwrap_or(Err(ConnError::Timeout));
        match fitted {
            Ok(()) => Ok(Attached {
                lease,
                conn,
                target,
                pin,
            }),
            Err(e) => {
                warn!(client = %self.peer, server = %conn.endpoint, error = %e, "applying the session's parameters failed; server connection closed");
                Err(e)
            }
        }
    }

    /// Ends the session for shutdown or the console's KILL, whichever its bell rang.
    async fn ended_by(&self, client: &mut Stream, rung: u8) -> End {
        match rung & bell::SHUTDOWN {
            0 => self.killed(client).await,
            _ => self.shut_down(client).await,
        }
    }

    /// Ends the session for the console's KILL.
    pub(super) async fn killed(&self, client: &mut Stream) -> End {
        let cause = DrainCause::Killed;
        send_fatal(client, codes::ADMIN_SHUTDOWN, &cause.client_message()).await;
        End::Drained {
            cause,
            forced: false,
        }
    }

    /// Its queue of notifications filled (it did not read them): it is let go, as a
    /// PostgreSQL session whose client stops reading would block its server's queue.
    async fn overflowed(&self, client: &mut Stream) -> End {
        let msg = format!(
            "patroxy: terminating connection: more than {} notifications were waiting for this client",
            crate::backend::notify::CLIENT_QUEUE
        );
        warn!(client = %self.peer, listener = %self.ctx.name, "{msg}");
        send_fatal(client, codes::PROGRAM_LIMIT_EXCEEDED, &msg).await;
        End::Overflowed
    }

    async fn idle_too_long(&self, client: &mut Stream, limit: Duration) -> End {
        crate::metrics::client_timeout("client_idle_timeout");
        let msg = format!(
            "patroxy: terminating connection due to idle-session timeout (client_idle_timeout, {limit:?})"
        );
        send_fatal(client, codes::IDLE_SESSION_TIMEOUT, &msg).await;
        End::ClientIdle
    }

    async fn shut_down(&self, client: &mut Stream) -> End {
        let msg = "terminating connection because patroxy is shutting down";
        send_fatal(client, codes::ADMIN_SHUTDOWN, msg).await;
        End::Drained {
            cause: DrainCause::Shutdown,
            forced: false,
        }
    }
}

impl Ended {
    fn ending(mut self, end: End) -> Ended {
        self.end = end;
        self
    }
}

/// Whether a transaction that has not started may try another server connection: within
/// `connect_wait` of its first failed attempt.
fn may_retry(retrying: &mut Option<Instant>, connect_wait: Duration) -> bool {
    retrying.get_or_insert_with(Instant::now).elapsed() < connect_wait
}
