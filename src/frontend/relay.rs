//! The relay: bytes both ways, untouched, while frame headers are followed in place to know
//! the transaction status and whether a query is in flight. Around it runs the drain control.
//! It ends a session on a deposed primary or at shutdown at its next rest point, or at the
//! deadline, with FATAL 57P01.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::sync::{oneshot, watch};
use tokio::time::{sleep_until, timeout, Instant};
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use super::bell::{self, Bell};
use super::drain;
use crate::config::Timeouts;
use crate::discovery::patroni::Endpoint;
use crate::discovery::Topology;
use crate::protocol::classify::Strings;
use crate::protocol::codes;
use crate::protocol::frame::{FrameError, Scanner, Seen, MAX_DECLARED_LEN};
use crate::protocol::messages::{self, Severity};
use crate::routing::drain::{at_drain_point, can_send_error, DrainCause, Progress};
use crate::routing::timeouts::{Limits, Over, Watch};
use crate::routing::Policy;
use crate::stream::{Reader, RelayBuffers, Stream, Writer, BUF_SIZE};

/// How long the goodbye messages may take before the socket is simply closed.
const GOODBYE_TIMEOUT: Duration = Duration::from_millis(200);

/// How a relayed session ended.
#[derive(Debug)]
pub enum End {
    ClientClosed,
    ServerClosed,
    ClientIo(std::io::Error),
    ServerIo(std::io::Error),
    ClientProtocol(FrameError),
    ServerProtocol(FrameError),
    /// Drained: at a rest point, or forced at the deadline.
    Drained {
        cause: DrainCause,
        forced: bool,
    },
    /// Transaction pooling: the transaction ended and the server connection is let go; the
    /// client stays.
    Released,
    /// Session pooling: the client left its server connection for the next primary at a
    /// planned switchover; the client stays.
    Moved,
    /// Pooling: PgBouncer's `query_timeout` or `idle_transaction_timeout` ran out.
    TimedOut(Over),
    /// Transaction pooling: PgBouncer's `client_idle_timeout` ran out.
    ClientIdle,
    /// Transaction pooling: the client left its notifications unread past its queue.
    Overflowed,
    /// Transaction pooling: what patroxy keeps for the client (its statements, one Parse,
    /// its settings) would be more than `pool.client_memory`.
    ClientMemory {
        limit: usize,
    },
}

impl End {
    /// Every `label()`, for metrics exported at zero before their first event.
    pub const LABELS: [&'static str; 14] = [
        "client_closed",
        "server_closed",
        "client_error",
        "server_error",
        "client_protocol",
        "server_protocol",
        "drained",
        "drained_at_deadline",
        "released",
        "moved",
        "timed_out",
        "client_idle",
        "overflowed",
        "client_memory",
    ];

    /// A short label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            End::ClientClosed => "client_closed",
            End::ServerClosed => "server_closed",
            End::ClientIo(_) => "client_error",
            End::ServerIo(_) => "server_error",
            End::ClientProtocol(_) => "client_protocol",
            End::ServerProtocol(_) => "server_protocol",
            End::Drained { forced: false, .. } => "drained",
            End::Drained { forced: true, .. } => "drained_at_deadline",
            End::Released => "released",
            End::Moved => "moved",
            End::TimedOut(_) => "timed_out",
            End::ClientIdle => "client_idle",
            End::Overflowed => "overflowed",
            End::ClientMemory { .. } => "client_memory",
        }
    }
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            End::ClientClosed => f.write_str("client closed"),
            End::ServerClosed => f.write_str("server closed"),
            End::ClientIo(e) => write!(f, "client error: {e}"),
            End::ServerIo(e) => write!(f, "server error: {e}"),
            End::ClientProtocol(e) => write!(f, "client protocol error: {e}"),
            End::ServerProtocol(e) => write!(f, "server protocol error: {e}"),
            End::ClientMemory { limit } => write!(
                f,
                "this client's prepared statements and settings would take more than pool.client_memory ({limit} bytes)"
            ),
            End::Drained {
                cause,
                forced: false,
            } => write!(f, "drained ({cause})"),
            End::Drained {
                cause,
                forced: true,
            } => write!(f, "drained at deadline ({cause})"),
            End::Released => f.write_str("transaction ended; server connection released"),
            End::Moved => f.write_str("left for the next primary at a switchover"),
            End::TimedOut(over) => write!(f, "{}", over.label()),
            End::ClientIdle => f.write_str("client_idle_timeout"),
            End::Overflowed => f.write_str("its notifications were not read"),
        }
    }
}

/// What the relay needs to know about its session.
pub struct RelayContext<'a> {
    pub policy: &'a Arc<Policy>,
    /// The listener's rules as reloads change them.
    pub policy_updates: watch::Receiver<Arc<Policy>>,
    pub member: &'a str,
    pub server: &'a Endpoint,
    pub timeouts: &'a Timeouts,
    pub shutdown: &'a CancellationToken,
    /// Pooled sessions keep the server connection when the client leaves: its Terminate
    /// is not passed on.
    pub keep_server: bool,
    /// Transaction pooling: end with `Released` once a transaction has ended and nothing
    /// is in flight either way.
    pub release_at_idle: bool,
    /// Transaction pooling: named prepared statements are carried across connections.
    pub rewrite: Option<crate::protocol::prepared::Rewriter<'a>>,
    /// Transaction pooling: the server connection's buffers, used by the rewriting pumps.
    pub buffers: Option<&'a mut RelayBuffers>,
    /// Session pooling on a primary listener: at a switchover announced for this server,
    /// end with `Drained { cause: Switchover }` at the next transaction end, saying nothing
    /// to either side (the pooled session decides what follows).
    pub switchover_grace: Option<Duration>,
    /// A pooled client's bell: the console's `KILL` ends the session at once; for one
    /// transaction (`release_at_idle`), it also says when to drain.
    pub bell: Option<&'a Bell>,
    /// Session pooling: the client's statements are read as they pass (up to a prefix),
    /// and one that resets settings to the session's start ends the relay at the next
    /// transaction end (`Released`), for patroxy to set the client's startup values again.
    pub watch_resets: Option<&'a crate::protocol::classify::Classifier>,
    /// Pooling: PgBouncer's `query_timeout` and `idle_transaction_timeout` (zero: off).
    pub limits: Limits,
}

/// Where the conversation stands, as both pumps see it; one task polls both, so relaxed
/// atomics are plenty.
#[derive(Default)]
pub(super) struct RelayState {
    pub(super) tx_status: AtomicU8,
    pub(super) in_flight: AtomicU32,
    /// Extended-protocol messages sent since the last Sync: the server may be working on
    /// them (a pipeline flushed with Flush, not yet synced) though no ReadyForQuery is due.
    pub(super) unsynced: AtomicBool,
    /// The client has every server byte read so far, ending on a frame boundary.
    pub(super) down_clean: AtomicBool,
    /// The server has every client byte read so far, ending on a frame boundary.
    pub(super) up_clean: AtomicBool,
    pub(super) bytes_up: AtomicU64,
    pub(super) bytes_down: AtomicU64,
    /// 0: not draining; else the pump returns as soon as the session is at rest.
    pub(super) drain_mode: AtomicU8,
    pub(super) release_at_idle: bool,
    /// Session pooling: a statement reset settings; end at the next transaction end.
    pub(super) settle_at_rest: AtomicBool,
    /// Session pooling: what the client's statements did to the session, as far as the
    /// reset after it needs to know (custom settings, what no reset undoes).
    pub(super) watched: std::sync::Mutex<crate::protocol::classify::Seen>,
    /// Transaction pooling: the client's bytes not yet a whole message (kept here while
    /// the pump waits, so that they outlive the pump when the transaction's end stops it).
    pub(super) held: std::sync::Mutex<BytesMut>,
    /// A ParameterStatus too long (or too malformed) to read: what the connection's
    /// setting is now is not known.
    pub(super) report_cut: AtomicBool,
    /// Transaction pooling: a long client message is going through as it comes, and the
    /// rest of it is still to come.
    pub(super) client_mid_message: AtomicBool,
    /// ParameterStatus the server reported during the relay (kept servers only).
    pub(super) reported: std::sync::Mutex<Vec<(String, String)>>,
    /// ReadyForQuery messages relayed: requests answered (the console's query count).
    pub(super) queries: AtomicU64,
    /// The server's last words, when it ended the connection with a FATAL error
    /// (transaction pooling: kept from the client, which stays).
    pub(super) server_fatal: std::sync::Mutex<Option<messages::ErrorFields>>,
}

const DRAIN_AT_REST: u8 = 1;
const DRAIN_AT_TX_END: u8 = 2;

impl RelayState {
    fn progress(&self) -> Progress {
        Progress {
            tx_status: self.tx_status.load(Relaxed),
            in_flight: self.in_flight.load(Relaxed),
            unsynced: self.unsynced.load(Relaxed),
            client_at_boundary: self.down_clean.load(Relaxed),
        }
    }

    /// Keeps the ParameterStatus messages the scanner captured.
    pub(super) fn record_captured(&self, captured: Vec<(u8, Vec<u8>)>) {
        if captured.is_empty() {
            return;
        }
        let mut params = self.reported.lock().unwrap_or_else(|p| p.into_inner());
        for (_, body) in &captured {
            match messages::parameter_status(body) {
                Some(p) => params.push(p),
                None => self.report_cut.store(true, Relaxed),
            }
        }
    }

    pub(super) fn record_server_fatal(&self, f: messages::ErrorFields) {
        *self.server_fatal.lock().unwrap_or_else(|p| p.into_inner()) = Some(f);
    }

    pub(super) fn drain_reached(&self) -> bool {
        match self.drain_mode.load(Relaxed) {
            DRAIN_AT_REST => at_drain_point(false, self.progress()),
            DRAIN_AT_TX_END => at_drain_point(true, self.progress()),
            _ => false,
        }
    }

    fn start_drain(&self, cause: &DrainCause) {
        let mode = match cause.waits_for_transaction_end() {
            true => DRAIN_AT_TX_END,
            false => DRAIN_AT_REST,
        };
        self.drain_mode.store(mode, Relaxed);
    }
}

pub struct Outcome {
    pub end: End,
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// Where the conversation stood at the end.
    pub progress: Progress,
    /// The server has every client byte sent so far, ending on a frame boundary.
    pub server_clean: bool,
    /// ParameterStatus the server reported during the relay (kept servers only).
    pub reported: Vec<(String, String)>,
    /// Transaction pooling: Parses the server refused or skipped, which prepared nothing.
    pub failed_parses: Vec<crate::protocol::prepared::Prepared>,
    /// Transaction pooling: a `DISCARD ALL` or `DEALLOCATE ALL` completed.
    pub all_statements_dropped: bool,
    /// Requests the server answered (ReadyForQuery messages relayed).
    pub queries: u64,
    /// The FATAL error the server ended with, if it did (transaction pooling).
    pub server_fatal: Option<messages::ErrorFields>,
    /// Kept servers: the client's bytes given to the relay, back, when the server
    /// connection ended before any of them was sent (a pooled connection found dead at
    /// once); the client's request can go to another connection as if nothing happened.
    pub unsent: Option<BytesMut>,
    /// Session pooling: what the client's statements did to the session.
    pub watched: crate::protocol::classify::Seen,
    /// Transaction pooling, at the transaction's end: the first bytes of the client's next
    /// message (less than its header), which no server saw.
    pub carry: BytesMut,
    /// A setting the server reported could not be read: the connection is not lent again.
    pub report_cut: bool,
    /// The relay ended in the middle of a long client message that went through as it
    /// came: what remains of it is no message, and must never reach another connection.
    pub client_mid_message: bool,
}

impl Outcome {
    /// This relay's figures, then a later relay's on the same connection: the sums, and the
    /// later one's end and state.
    pub fn then(self, later: Outcome) -> Outcome {
        let mut reported = self.reported;
        reported.extend(later.reported);
        let mut watched = self.watched;
        watched.merge(&later.watched);
        let report_cut = self.report_cut || later.report_cut;
        Outcome {
            bytes_up: self.bytes_up + later.bytes_up,
            bytes_down: self.bytes_down + later.bytes_down,
            queries: self.queries + later.queries,
            reported,
            watched,
            report_cut,
            ..later
        }
    }
}

/// Relays until one side closes or a drain ends the session.
/// `client_leftover` and `server_leftover` are bytes already read in the startup phase.
pub async fn relay(
    client: &mut Stream,
    server: &mut Stream,
    mut client_leftover: BytesMut,
    server_leftover: BytesMut,
    mut ctx: RelayContext<'_>,
    topology: &mut watch::Receiver<Arc<Topology>>,
) -> Outcome {
    let rewrite = ctx.rewrite.take();
    let mut own = RelayBuffers::default();
    let buffers = match ctx.buffers.take() {
        Some(b) => b,
        None => &mut own,
    };
    let responses = std::sync::Mutex::new(crate::protocol::prepared::Responses::default());
    let wake = tokio::sync::Notify::new();
    let st = RelayState {
        tx_status: AtomicU8::new(codes::TX_IDLE),
        down_clean: AtomicBool::new(true),
        up_clean: AtomicBool::new(true),
        release_at_idle: ctx.release_at_idle,
        ..RelayState::default()
    };
    let (mut client_rd, mut client_wr) = client.split();
    let (mut server_rd, mut server_wr) = server.split();
    let end = {
        use tokio_util::either::Either;
        let (up, down) = match rewrite {
            Some(rw) => (
                Either::Left(super::rewrite::pump_up(
                    (&mut client_rd, &mut server_wr),
                    &mut client_leftover,
                    &st,
                    rw,
                    (&responses, &wake),
                    &mut buffers.up,
                )),
                Either::Left(super::rewrite::pump_down(
                    (&mut server_rd, &mut client_wr),
                    server_leftover,
                    &st,
                    (&responses, &wake),
                    &mut buffers.down,
                )),
            ),
            None => (
                Either::Right(pump_up(
                    &mut client_rd,
                    &mut server_wr,
                    &mut client_leftover,
                    &st,
                    (ctx.keep_server, ctx.watch_resets),
                )),
                Either::Right(pump_down(
                    &mut server_rd,
                    &mut client_wr,
                    server_leftover,
                    &st,
                    ctx.keep_server,
                )),
            ),
        };
        tokio::pin!(up, down);
        let mut draining: Option<(DrainCause, Option<Instant>)> = None;
        // The topology and shutdown are watched by a task of their own: their futures take
        // locks shared by every session, so polling them on each data wake-up would serialise
        // busy sessions. The relay only sees a oneshot, which is lock-free to poll.
        // A transaction-pooled relay lasts one transaction, a few wake-ups: it listens
        // inline to its client's bell, which registers nothing shared, and saves a task
        // (and the wake-up of another thread) per transaction. Without a bell (tests of
        // the relay alone) it watches the channels inline.
        let watched = || drain::Watched {
            policy: ctx.policy_updates.clone(),
            topology: topology.clone(),
            shutdown: ctx.shutdown.clone(),
            switchover_grace: ctx.switchover_grace,
        };
        let (member, server, policy) = (ctx.member, ctx.server, ctx.policy.clone());
        let (_control, cause_rx) = if let (true, Some(bell)) = (ctx.release_at_idle, ctx.bell) {
            let (rules, topology) = (&ctx.policy_updates, &*topology);
            let rung = async move {
                Ok(drain::drain_cause_rung(bell, rules, member, server, topology).await)
            };
            (None, Either::Left(Either::Left(rung)))
        } else if ctx.release_at_idle {
            let inline = async move {
                Ok::<_, oneshot::error::RecvError>(
                    drain::drain_cause_of(policy, member, server, watched()).await,
                )
            };
            (None, Either::Left(Either::Right(inline)))
        } else {
            let (cause_tx, cause_rx) = oneshot::channel();
            let task = tokio::spawn(drain::watch_for_drain(
                policy,
                member.to_owned(),
                server.clone(),
                watched(),
                cause_tx,
            ));
            (Some(AbortOnDropHandle::new(task)), Either::Right(cause_rx))
        };
        tokio::pin!(cause_rx);
        let killed = async {
            match ctx.bell {
                Some(b) => b.rung(bell::KILLED).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(killed);
        let mut control_open = true;
        // PgBouncer's timeouts: the conversation is sampled every tick.
        let (limits, tick) = (ctx.limits, ctx.limits.tick());
        let mut watch = Watch::default();
        let mut next_tick = Instant::now() + tick;
        loop {
            let deadline = draining.as_ref().and_then(|(_, d)| *d);
            tokio::select! {
                biased;
                end = &mut down => match end {
                    Pumped::Released => break End::Released,
                    Pumped::AtRest => {
                        let (cause, _) = draining.take().expect("the pump rests only while draining");
                        break End::Drained { cause, forced: false };
                    }
                    Pumped::End(end) => break end,
                },
                end = &mut up => break end,
                _ = &mut killed => break End::Drained { cause: DrainCause::Killed, forced: true },
                cause = &mut cause_rx, if control_open && draining.is_none() => {
                    let Ok(cause) = cause else {
                        control_open = false;
                        continue;
                    };
                    tracing::debug!(server = %ctx.server, %cause, "draining session");
                    st.start_drain(&cause);
                    let deadline = cause.deadline(ctx.timeouts).map(|d| Instant::now() + d);
                    draining = Some((cause, deadline));
                }
                _ = sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                    let (cause, _) = draining.take().expect("deadline implies draining");
                    break End::Drained { cause, forced: true };
                }
                _ = sleep_until(next_tick), if limits.any() => {
                    next_tick += tick;
                    let (up, answered) = (st.bytes_up.load(Relaxed), st.queries.load(Relaxed));
                    if let Some(over) = watch.sample(&limits, st.progress(), up, answered, tick) {
                        break End::TimedOut(over);
                    }
                }
            }
            // A drain that began while the session was already at rest ends it now.
            if st.drain_reached() {
                if let Some((cause, _)) = draining.take() {
                    break End::Drained {
                        cause,
                        forced: false,
                    };
                }
            }
        }
    };
    // Goodbyes: the client's FATAL only on a frame boundary, Terminate to the server likewise.
    // A session leaving for a switchover is not ended here: both sides stay.
    let moving = matches!(
        &end,
        End::Drained {
            cause: DrainCause::Switchover { .. },
            forced: false
        }
    );
    let goodbye = match &end {
        _ if moving => None,
        End::Drained { cause, .. } => Some((codes::ADMIN_SHUTDOWN, cause.client_message())),
        End::ClientProtocol(e) => Some((codes::PROTOCOL_VIOLATION, format!("patroxy: {e}"))),
        End::ClientMemory { .. } => {
            Some((codes::PROGRAM_LIMIT_EXCEEDED, format!("patroxy: {end}")))
        }
        End::TimedOut(over) => {
            let limit = match over {
                Over::Query => ctx.limits.query,
                Over::IdleInTransaction => ctx.limits.idle_in_transaction,
            };
            Some(over.client_error(limit))
        }
        End::ServerProtocol(e) => Some((
            codes::CONNECTION_FAILURE,
            format!("patroxy: server sent {e}"),
        )),
        _ => None,
    };
    let told = goodbye.is_some() && can_send_error(st.progress());
    if let Some((code, msg)) = goodbye {
        if told {
            let frame = messages::error_response(Severity::Fatal, code, &msg);
            let _ = timeout(GOODBYE_TIMEOUT, client_wr.write_all(&frame)).await;
        }
        if st.up_clean.load(Relaxed) {
            let _ = timeout(GOODBYE_TIMEOUT, server_wr.write_all(&TERMINATE)).await;
        }
    }
    // Transaction pooling outlives a lost server connection: the pooled session tells the
    // client, which stays; so does a pooled client none of whose bytes reached the server.
    // The client-to-server pump takes the client's bytes when it first runs: if it never
    // ran (the server side ended first), none of them went anywhere.
    let died = matches!(end, End::ServerClosed | End::ServerIo(_));
    let unsent = (ctx.keep_server && died && !client_leftover.is_empty())
        .then(|| std::mem::take(&mut client_leftover));
    let client_stays = died && (st.release_at_idle || unsent.is_some());
    if !matches!(end, End::Released) && !client_stays && !moving {
        let _ = timeout(GOODBYE_TIMEOUT, client_wr.shutdown()).await;
    }
    if told {
        // Read what the client still sends until it closes (briefly): closing a socket with
        // unread input resets it, and a reset can destroy the FATAL the client has not read.
        let _ = timeout(GOODBYE_TIMEOUT, async {
            let mut sink = BytesMut::with_capacity(1024);
            while let Ok(n) = client_rd.read_some(&mut sink).await {
                if n == 0 {
                    break;
                }
                sink.clear();
            }
        })
        .await;
    }
    buffers.trim();
    let reported = std::mem::take(&mut *st.reported.lock().unwrap_or_else(|p| p.into_inner()));
    let (failed_parses, all_statements_dropped) = {
        let mut r = lock_responses(&responses);
        (r.take_failed(), r.take_all_dropped())
    };
    let watched = std::mem::take(&mut *st.watched.lock().unwrap_or_else(|p| p.into_inner()));
    let carry = match end {
        End::Released => std::mem::take(&mut *st.held.lock().unwrap_or_else(|p| p.into_inner())),
        _ => BytesMut::new(),
    };
    let server_fatal = st
        .server_fatal
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    Outcome {
        end,
        bytes_up: st.bytes_up.load(Relaxed),
        bytes_down: st.bytes_down.load(Relaxed),
        progress: st.progress(),
        server_clean: st.up_clean.load(Relaxed),
        reported,
        failed_parses,
        all_statements_dropped,
        queries: st.queries.load(Relaxed),
        server_fatal,
        unsent,
        watched,
        carry,
        report_cut: st.report_cut.load(Relaxed),
        client_mid_message: st.client_mid_message.load(Relaxed),
    }
}

fn lock_responses(
    r: &std::sync::Mutex<crate::protocol::prepared::Responses>,
) -> std::sync::MutexGuard<'_, crate::protocol::prepared::Responses> {
    r.lock().unwrap_or_else(|p| p.into_inner())
}

pub(super) const TERMINATE: [u8; 5] = [codes::TERMINATE, 0, 0, 0, 4];

/// What the client's messages say about the conversation: requests that will each be
/// answered by a ReadyForQuery, extended-protocol messages not yet followed by their Sync,
/// and a Terminate.
#[derive(Default)]
pub(super) struct UpCounter {
    /// Syncs sent since the last command started: if that command turns out to be a COPY
    /// FROM STDIN (the client sends CopyDone or CopyFail), the server ignored them while
    /// copying, and no ReadyForQuery will answer them.
    syncs_in_command: u32,
    pub(super) terminated: bool,
}

impl UpCounter {
    pub(super) fn see(&mut self, st: &RelayState, seen: Seen) {
        let Seen::Header { tag, .. } = seen else {
            return;
        };
        match tag {
            codes::QUERY | codes::FUNCTION_CALL => {
                self.syncs_in_command = 0;
                st.in_flight.fetch_add(1, Relaxed);
            }
            codes::SYNC => {
                self.syncs_in_command += 1;
                st.in_flight.fetch_add(1, Relaxed);
                st.unsynced.store(false, Relaxed);
            }
            codes::EXECUTE => {
                self.syncs_in_command = 0;
                st.unsynced.store(true, Relaxed);
            }
            codes::PARSE | codes::BIND | codes::DESCRIBE | codes::CLOSE | codes::FLUSH => {
                st.unsynced.store(true, Relaxed)
            }
            codes::COPY_DONE | codes::COPY_FAIL => {
                let ignored = std::mem::take(&mut self.syncs_in_command);
                let _ = st
                    .in_flight
                    .fetch_update(Relaxed, Relaxed, |n| Some(n.saturating_sub(ignored)));
            }
            codes::TERMINATE => self.terminated = true,
            _ => {}
        }
    }
}

/// What the server's messages say: each ReadyForQuery answers one request and gives the
/// transaction status.
pub(super) fn count_down(st: &RelayState, seen: Seen) {
    if let Seen::ReadyForQuery(status) = seen {
        st.tx_status.store(status, Relaxed);
        st.queries.fetch_add(1, Relaxed);
        // Saturating: a ReadyForQuery patroxy did not count (the greeting's) is harmless.
        let _ = st
            .in_flight
            .fetch_update(Relaxed, Relaxed, |n| Some(n.saturating_sub(1)));
    }
}

/// Client to server: counts the requests that will each be answered by a ReadyForQuery, and
/// notes extended-protocol messages not yet followed by their Sync.
async fn pump_up(
    rd: &mut Reader<'_>,
    wr: &mut Writer<'_>,
    leftover: &mut BytesMut,
    st: &RelayState,
    (keep_server, resets): (bool, Option<&crate::protocol::classify::Classifier>),
) -> End {
    let mut buf = std::mem::take(leftover);
    let mut scanner = Scanner::new(MAX_DECLARED_LEN);
    if resets.is_some() {
        scanner = scanner
            .capturing(codes::QUERY, STATEMENT_PREFIX)
            .capturing(codes::PARSE, STATEMENT_PREFIX);
    }
    let mut counter = UpCounter::default();
    buf.reserve(BUF_SIZE);
    loop {
        if buf.is_empty() {
            match rd.read_some(&mut buf).await {
                Ok(0) => return End::ClientClosed,
                Ok(_) => {}
                Err(e) => return End::ClientIo(e),
            }
        }
        let scanned = scanner.scan(&buf, |seen| counter.see(st, seen));
        if let Err(e) = scanned {
            return End::ClientProtocol(e);
        }
        if let Some(classifier) = resets {
            watch_resets(st, classifier, scanner.take_captured());
        }
        // A client's last word is its Terminate. A kept server must not see it: everything
        // before it goes on; a Terminate that is not whole at the end of this read leaves
        // the server unclean (and so not kept).
        let terminated = counter.terminated;
        let whole_terminate = terminated && buf.ends_with(&TERMINATE);
        if keep_server && whole_terminate {
            buf.truncate(buf.len() - TERMINATE.len());
        }
        st.up_clean.store(false, Relaxed);
        if let Err(e) = wr.write_all(&buf).await {
            return End::ServerIo(e);
        }
        let clean = scanner.at_boundary() && (!keep_server || !terminated || whole_terminate);
        st.up_clean.store(clean, Relaxed);
        st.bytes_up.fetch_add(buf.len() as u64, Relaxed);
        buf.clear();
        if keep_server && terminated {
            return End::ClientClosed;
        }
    }
}

/// Session pooling reads this much of each Query for statements that reset settings; a
/// longer text with a word that can matter counts as one.
const STATEMENT_PREFIX: usize = 8 * 1024;

/// Session pooling: whether one of these Query texts resets settings to the session's
/// start; then the relay ends at the next transaction end. What they do is kept for the
/// reset after the client.
fn watch_resets(
    st: &RelayState,
    classifier: &crate::protocol::classify::Classifier,
    captured: Vec<(u8, Vec<u8>)>,
) {
    use crate::protocol::classify::Effects;
    if captured.is_empty() {
        return;
    }
    let mut watched = st.watched.lock().unwrap_or_else(|p| p.into_inner());
    for (tag, body) in captured {
        // A Parse: its statement's name, then its text, then its types.
        let text = match tag {
            codes::PARSE => match body.iter().position(|b| *b == 0) {
                Some(nul) => &body[nul + 1..],
                None => &body[..],
            },
            _ => &body[..],
        };
        let effects = match text.iter().position(|b| *b == 0) {
            Some(end) => {
                let c = classifier.classify(&text[..end], Strings::Either);
                watched.add(&c);
                c.effects
            }
            // Cut at the prefix: the worst, if what was read could matter.
            None => classifier.classify_cut(text),
        };
        watched.effects |= effects;
        if effects.intersects(Effects::RESETS | Effects::UNKNOWN) {
            st.settle_at_rest.store(true, Relaxed);
        }
    }
}

pub(super) enum Pumped {
    End(End),
    /// Draining, and the session just came to rest.
    AtRest,
    /// Transaction pooling, and the transaction just ended with nothing in flight.
    Released,
}

/// Server to client: follows ReadyForQuery, and stops at a rest point once draining.
async fn pump_down(
    rd: &mut Reader<'_>,
    wr: &mut Writer<'_>,
    mut buf: BytesMut,
    st: &RelayState,
    keep_server: bool,
) -> Pumped {
    let mut scanner = Scanner::new(MAX_DECLARED_LEN);
    if keep_server {
        scanner = scanner.capturing(codes::PARAMETER_STATUS, PARAMETER_STATUS_PREFIX);
    }
    buf.reserve(BUF_SIZE);
    loop {
        if buf.is_empty() {
            match rd.read_some(&mut buf).await {
                Ok(0) => return Pumped::End(End::ServerClosed),
                Ok(_) => {}
                Err(e) => return Pumped::End(End::ServerIo(e)),
            }
        }
        let scanned = scanner.scan(&buf, |seen| count_down(st, seen));
        if let Err(e) = scanned {
            return Pumped::End(End::ServerProtocol(e));
        }
        if keep_server {
            st.record_captured(scanner.take_captured());
        }
        st.down_clean.store(false, Relaxed);
        if let Err(e) = wr.write_all(&buf).await {
            return Pumped::End(End::ClientIo(e));
        }

        st.down_clean.store(scanner.at_boundary(), Relaxed);
        st.bytes_down.fetch_add(buf.len() as u64, Relaxed);
        buf.clear();
        if st.drain_reached() {
            return Pumped::AtRest;
        }
        // The whole client stream reached the server too: nothing of the next transaction
        // is half-sent when the server is let go.
        let settle = st.release_at_idle || st.settle_at_rest.load(Relaxed);
        if settle && at_drain_point(true, st.progress()) && st.up_clean.load(Relaxed) {
            return Pumped::Released;
        }
    }
}

/// ParameterStatus bodies are read up to this; a longer one (a search path of thousands of
/// schemas) is not known, and its connection is not lent again.
pub(super) const PARAMETER_STATUS_PREFIX: usize = 64 * 1024;

/// Transaction pooling: the transaction has ended and nothing is in flight either way, so
/// the server connection may go to another client.
pub(super) fn released(st: &RelayState) -> bool {
    at_drain_point(true, st.progress()) && st.up_clean.load(Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connected pair of loopback sockets.
    async fn pair() -> (Stream, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let near = tokio::net::TcpStream::connect(listener.local_addr().unwrap());
        let (near, far) = tokio::join!(near, listener.accept());
        (Stream::Plain(near.unwrap()), far.unwrap().0)
    }

    #[tokio::test]
    async fn a_request_for_a_server_found_closed_comes_back_unsent() {
        use tokio::io::AsyncReadExt;
        let (mut client, mut client_far) = pair().await;
        let (mut server, server_far) = pair().await;
        // The server connection died just before it was lent: its end is already read.
        drop(server_far);
        let request = BytesMut::from(&b"Q\0\0\0\x0dSELECT 1\0"[..]);
        let policy = Arc::new(Policy::default());
        let (_policy_tx, policy_updates) = watch::channel(policy.clone());
        let (_topology_tx, mut topology) = watch::channel(Arc::new(Topology::default()));
        let endpoint = Endpoint {
            host: "127.0.0.1".into(),
            port: 1,
        };
        let (timeouts, shutdown) = (Timeouts::default(), CancellationToken::new());
        server.tcp().readable().await.unwrap();
        for release_at_idle in [true, false] {
            let ctx = RelayContext {
                policy: &policy,
                policy_updates: policy_updates.clone(),
                member: "m",
                server: &endpoint,
                timeouts: &timeouts,
                shutdown: &shutdown,
                keep_server: true,
                release_at_idle,
                rewrite: None,
                buffers: None,
                switchover_grace: None,
                bell: None,
                watch_resets: None,
                limits: Limits::default(),
            };
            let out = relay(
                &mut client,
                &mut server,
                request.clone(),
                BytesMut::new(),
                ctx,
                &mut topology,
            )
            .await;
            assert!(matches!(out.end, End::ServerClosed), "{}", out.end);
            assert_eq!(out.unsent.as_deref(), Some(&request[..]));
        }
        // The client was told nothing and its connection stays open: the next byte it
        // reads is one sent now.
        let (_, mut writer) = client.split();
        writer.write_all(b"x").await.unwrap();
        let mut byte = [0u8; 1];
        client_far.read_exact(&mut byte).await.unwrap();
        assert_eq!(&byte, b"x", "the client was sent something first");
    }

    #[test]
    fn every_end_has_its_label_listed() {
        let frame = || FrameError::TooShort { tag: 'Q', len: 0 };
        let io = || std::io::Error::other("x");
        let drained = |forced| End::Drained {
            cause: DrainCause::Shutdown,
            forced,
        };
        let all = [
            End::ClientClosed,
            End::ServerClosed,
            End::ClientIo(io()),
            End::ServerIo(io()),
            End::ClientProtocol(frame()),
            End::ServerProtocol(frame()),
            drained(false),
            drained(true),
            End::Released,
            End::Moved,
            End::TimedOut(Over::Query),
            End::ClientIdle,
            End::Overflowed,
            End::ClientMemory { limit: 1 },
        ];
        let labels: Vec<_> = all.iter().map(End::label).collect();
        assert_eq!(labels, End::LABELS);
    }
}
