//! One loan of a server connection to a pooled client: the relay (with, in session mode, a
//! move to the next primary at a planned switchover), its figures, the session state the
//! client's statements left (transaction mode: settings taken up as the client's own, and
//! objects that pin the client to its connection until they are gone), what the client is
//! told when the connection died under it, and whether the connection goes back to its pool
//! clean, stays with the client, or is closed.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::time::{timeout, timeout_at, Instant};
use tracing::{info, warn};

use super::borrower::{Attached, Carried, Ended, Pin, Session, Topo};
use super::listening;
use super::negotiate::send_fatal;
use super::relay::{relay, End, Outcome, RelayContext};
use crate::backend::conn::{ConnError, ServerConn};
use crate::backend::pool::{DbStats, Lease};
use crate::backend::session::{Look, Snapshot};
use crate::protocol::classify::{ascii_safe, Strings};
use crate::protocol::classify::{Effects, Seen};
use crate::protocol::codes;
use crate::protocol::messages::{self, ErrorFields, Severity};
use crate::protocol::prepared::{CacheStats, Reading, Rewriter};
use crate::routing::drain::{DrainCause, Progress};
use crate::routing::Target;
use crate::stream::{send, Stream};

/// What a transaction-pooled client is told when its server connection died under it.
#[derive(Debug, PartialEq, Eq)]
enum Lost {
    /// It waits for answers: each request gets an error saying the outcome is unknown, and
    /// its ReadyForQuery, as a server that failed them one by one would answer; it stays.
    Answered(BytesMut),
    /// Nothing was in flight and no transaction open: it stays, told nothing.
    Quiet,
    /// Between statements of a transaction block: it cannot be told in time, so its
    /// session ends with this FATAL.
    Fatal(String),
    /// It was pinned to the connection: what its session held there (temporary tables,
    /// locks, cursors) is gone, and its session ends with this FATAL rather than go on
    /// without them.
    Pinned(String),
}

impl Session<'_> {
    /// Relays with a lent server connection until the client leaves, or (transaction mode)
    /// the transaction ends; then gives the connection back if it is clean.
    /// `Err`: the connection was found closed before any of the client's bytes went to it
    /// (a pooled connection that died a moment ago); they come back, for another one.
    pub(super) async fn attach(
        &self,
        client: &mut Stream,
        client_buf: BytesMut,
        attached: Attached,
        release_at_idle: bool,
        topology: &mut Topo,
        carried: &mut Carried,
    ) -> Result<Ended, BytesMut> {
        let proxy = &self.ctx.proxy;
        let Attached {
            lease,
            mut conn,
            target,
            pin,
        } = attached;
        let lent_at = Instant::now();
        let _load = proxy.load.claim(&target.endpoint);
        // A cancel of an earlier loan may still be on its way to that loan's connection,
        // waited for there: this loan counts its own. On the connection the client is
        // pinned to, the earlier loans' cancels are this connection's, and stay counted
        // until it goes back.
        if pin.is_none() && (Arc::strong_count(&carried.cancels) > 1 || carried.cancels.busy()) {
            carried.cancels = Arc::default();
        }
        let registration = conn.key.clone().map(|server_key| {
            self.cancel_slot
                .lend(conn.endpoint.clone(), server_key, carried.cancels.clone())
        });
        let cache_before = conn.prepared.stats;
        let mut seen = Seen::default();
        let lent = Lent {
            conn: &mut conn,
            target: &target,
            release_at_idle,
            seen: &mut seen,
        };
        let mut out = self
            .relay_lent(client, client_buf, lent, topology, carried)
            .await;
        // The client's requests are over: a cancel from now on cancels nothing; one already
        // on its way keeps the connection from the next client until it arrives.
        let in_flight = registration.map(|r| r.end());
        if let Some(unsent) = out.unsent.take() {
            if pin.is_some() {
                // What the session held died with that connection: its request must not
                // go on elsewhere without it.
                let msg = format!("patroxy: the server connection that held this session's temporary tables, locks or cursors was lost ({})", out.end);
                send_fatal(client, codes::CONNECTION_FAILURE, &msg).await;
                drop(unsent);
                return Ok(self.ended(End::ServerClosed, &out));
            }
            info!(client = %self.peer, server = %target.endpoint, end = %out.end, "server connection closed before the client's request reached it; another one is used");
            crate::metrics::server_unsent(&self.ctx.name);
            return Err(unsent);
        }
        self.account(&lease, &conn, lent_at, cache_before, &out);
        carried.carry = std::mem::take(&mut out.carry);
        let reported = std::mem::take(&mut out.reported);
        carried.wanted.follow_reported(&mut conn, reported);
        let failed = std::mem::take(&mut out.failed_parses);
        conn.prepared
            .forget(failed.iter().map(|f| f.server_name.as_str()));
        carried.statements.forget(&failed);
        if out.all_statements_dropped {
            conn.prepared.clear();
            carried.statements.clear();
        }
        let mut end = std::mem::replace(&mut out.end, End::ClientClosed);
        if let End::TimedOut(over) = &end {
            crate::metrics::client_timeout(over.label());
            warn!(client = %self.peer, server = %target.endpoint, timeout = over.label(), "pooled client disconnected by a timeout; its server connection closed");
            // The request still runs on the server: it is canceled, not left to finish.
            if let (crate::routing::timeouts::Over::Query, Some(key)) = (over, conn.key.clone()) {
                let (endpoint, limit) = (conn.endpoint.clone(), proxy.timeouts.connect);
                tokio::spawn(async move {
                    crate::backend::cancel::deliver(&key, vec![endpoint], limit).await;
                });
            }
        }
        // Transaction mode, at the transaction's end: what its statements left.
        let settled = match end {
            End::Released => {
                let settled = self.settle(&mut conn, &seen, pin, carried).await;
                if let Err(e) = self.pass_notifications(client, &mut conn, carried).await {
                    end = End::ClientIo(e);
                }
                // Settings taken up count with the statements against the client's memory.
                let limit = self.ctx.pool.client_memory;
                if carried.statements.held() + carried.wanted.held() > limit {
                    end = End::ClientMemory { limit };
                    let msg = format!("patroxy: {end}");
                    send_fatal(client, codes::PROGRAM_LIMIT_EXCEEDED, &msg).await;
                }
                settled
            }
            // A client that leaves in a transaction that made session objects: its reset
            // is DISCARD ALL (and a LOAD closes the connection).
            _ => Ok(pin.or_else(|| held_by_seen(&seen))),
        };
        let died = matches!(end, End::ServerClosed | End::ServerIo(_));
        let fatal = out.server_fatal.take();
        let lost =
            (release_at_idle && died).then(|| lost(&end, out.progress, fatal, pin.is_some()));
        // The rest of a long message the client was sending would read as messages of its
        // own on the next connection (a parameter's bytes as a Query): the session ends.
        let lost = lost.map(|l| match out.client_mid_message {
            true => Lost::Fatal(format!("patroxy: the server connection was lost in the middle of a long message from the client ({end}); the transaction may or may not have committed")),
            false => l,
        });
        match &lost {
            Some(Lost::Answered(_)) | Some(Lost::Quiet) => end = End::Released,
            // Told only between messages: in the middle of a row it would be garbage.
            Some(Lost::Fatal(msg)) if out.progress.client_at_boundary => {
                send_fatal(client, codes::TRANSACTION_RESOLUTION_UNKNOWN, msg).await
            }
            Some(Lost::Pinned(msg)) if out.progress.client_at_boundary => {
                send_fatal(client, codes::CONNECTION_FAILURE, msg).await
            }
            Some(Lost::Fatal(_) | Lost::Pinned(_)) => {}
            None => {}
        }
        // Kept with the connection: a pinned client may hold it for later loans.
        conn.tainted |= seen.effects.contains(Effects::UNREAD) || out.report_cut;
        let at_rest = out.server_clean && out.progress.in_flight == 0 && !out.progress.unsynced;
        let returned = match (&lost, &end, settled) {
            (Some(_), _, _) => false,
            (None, End::Released, Ok(Some(pin))) => {
                // The client keeps the connection until its session objects are gone.
                carried.pinned = Some(Attached {
                    lease,
                    conn,
                    target,
                    pin: Some(pin),
                });
                return Ok(self.ended(end, &out));
            }
            (None, End::Released, Ok(None)) => true,
            (None, End::Released, Err(e)) => {
                warn!(server = %target.endpoint, error = %e, "server connection not reusable after its session state was read; closed");
                // What the session may hold there is lost with it: the client is told.
                let held = Effects::OBJECTS | Effects::LISTEN | Effects::UNKNOWN;
                if pin.is_some() || seen.effects.intersects(held) {
                    let msg = format!("patroxy: the session's state could not be read after its transaction ({e}); the session ends rather than go on without it");
                    send_fatal(client, codes::CONNECTION_FAILURE, &msg).await;
                    end = End::ServerClosed;
                }
                false
            }
            (None, End::ClientClosed, Ok(pin)) if at_rest => {
                seen.merge(&out.watched);
                self.reset(&mut conn, pin, &seen, out.progress.tx_status)
                    .await
            }
            _ => false,
        };
        // A text patroxy could not read may have left a custom setting that no session read
        // shows (pg_settings lists none), as may a setting too long to read back: the
        // connection goes rather than reach another client.
        if returned && conn.tainted {
            info!(server = %target.endpoint, "a statement or setting patroxy could not read went through this connection; closed rather than lent again");
        }
        let returned = returned && !conn.tainted;
        if !matches!(end, End::Released) {
            tracing::debug!(
                client = %self.peer,
                server = %target.endpoint,
                connected_ms = self.started.elapsed().as_millis() as u64,
                returned,
                "server connection let go"
            );
        }
        if returned {
            let limit = proxy.timeouts.connect;
            give_back(lease, conn, in_flight.filter(|f| f.busy()), limit);
        }
        if let Some(Lost::Answered(answer)) = lost {
            warn!(client = %self.peer, server = %target.endpoint, "server connection lost during a transaction; the client was told and stays");
            if let Err(e) = send(client, &answer).await {
                end = End::ClientIo(e);
            }
        }
        Ok(self.ended(end, &out))
    }

    /// Notifications that came while patroxy had the connection to itself (with those a
    /// client's LISTENs moving between it and the listening connection brought), then
    /// those queued from the listening connection: the client is between transactions,
    /// where PostgreSQL gives them.
    async fn pass_notifications(
        &self,
        client: &mut Stream,
        conn: &mut ServerConn,
        carried: &mut Carried,
    ) -> std::io::Result<()> {
        let mut out = BytesMut::new();
        for n in conn.notifications.drain(..) {
            out.extend_from_slice(&n);
        }
        while let Some(n) = carried.listening.queued() {
            out.extend_from_slice(&n);
        }
        match out.is_empty() {
            true => Ok(()),
            false => send(client, &out).await,
        }
    }

    fn ended(&self, end: End, out: &Outcome) -> Ended {
        Ended {
            end,
            transactions: 0,
            bytes_up: out.bytes_up,
            bytes_down: out.bytes_down,
        }
    }

    /// How long patroxy's own statements on a lent connection may take.
    fn reset_limit(&self) -> Duration {
        self.ctx.proxy.timeouts.connect.max(Duration::from_secs(1))
    }

    /// The relay, and in session mode on a primary listener the moves it allows: when
    /// Patroni announces a switchover, a client at rest that holds nothing there that cannot
    /// follow it leaves its server connection for the next primary. The figures of every
    /// relay on this connection are summed.
    async fn relay_lent(
        &self,
        client: &mut Stream,
        mut client_buf: BytesMut,
        lent: Lent<'_>,
        topology: &mut Topo,
        carried: &mut Carried,
    ) -> Outcome {
        let Lent {
            conn,
            target,
            release_at_idle,
            seen,
        } = lent;
        let proxy = &self.ctx.proxy;
        let mut movable = !release_at_idle && self.ctx.policy.role.wants_standby() == Some(false);
        let mut before: Option<Outcome> = None;
        loop {
            let leftover = std::mem::take(&mut conn.buf);
            // The connection reads strings as the client's session does (fitted to it).
            let param = |name: &str| conn.params.get(name).map(String::as_str);
            let strings = Strings::of(param("standard_conforming_strings"));
            let ascii_safe = ascii_safe(param("client_encoding"));
            // A statement means what it means under these settings: part of its identity.
            let context = carried.wanted.statement_context();
            let rewrite = release_at_idle.then(|| Rewriter {
                client: &mut carried.statements,
                server: &mut conn.prepared,
                capacity: self.ctx.pool.max_prepared_statements,
                memory: self.ctx.pool.client_memory,
                settings_held: carried.wanted.held(),
                reading: Reading {
                    naming: &proxy.naming,
                    classifier: &proxy.classifier,
                    strings,
                    ascii_safe,
                    context,
                },
                seen: &mut *seen,
                unsynced: false,
                in_failed_transaction: false,
            });
            let relay_ctx = RelayContext {
                policy: &self.ctx.policy,
                policy_updates: self.ctx.policy_updates.clone(),
                member: &target.member,
                server: &target.endpoint,
                timeouts: &proxy.timeouts,
                shutdown: &proxy.shutdown,
                keep_server: true,
                release_at_idle,
                rewrite,
                buffers: Some(&mut conn.buffers),
                switchover_grace: movable.then_some(self.ctx.pool.switchover_grace),
                bell: Some(&self.me.bell),
                watch_resets: (!release_at_idle).then_some(&proxy.classifier),
                limits: crate::routing::timeouts::Limits {
                    query: self.ctx.pool.query_timeout,
                    idle_in_transaction: self.ctx.pool.idle_transaction_timeout,
                },
            };
            let client_bytes = std::mem::take(&mut client_buf);
            let out = relay(
                client,
                &mut conn.stream,
                client_bytes,
                leftover,
                relay_ctx,
                topology,
            )
            .await;
            let mut out = match before.take() {
                Some(b) => b.then(out),
                None => out,
            };
            // Session mode: a statement reset settings, and the session is at rest.
            if !release_at_idle && matches!(out.end, End::Released) {
                if let Err(e) = self.restore(conn, carried).await {
                    warn!(client = %self.peer, server = %target.endpoint, error = %e, "the client's startup settings could not be set again; session ended");
                    let msg = format!("patroxy: setting the session's parameters again: {e}");
                    send_fatal(client, codes::CONNECTION_FAILURE, &msg).await;
                    out.end = End::ServerClosed;
                    return out;
                }
                if let Err(e) = pass_own_notifications(client, conn).await {
                    out.end = End::ClientIo(e);
                    return out;
                }
                before = Some(out);
                continue;
            }
            let End::Drained {
                cause: cause @ DrainCause::Switchover { .. },
                ..
            } = &out.end
            else {
                return out;
            };
            let cause = cause.clone();
            match self.leave(conn, out.server_clean, carried).await {
                Ok(true) => {
                    out.end = End::Moved;
                    return out;
                }
                Ok(false) => {
                    movable = false;
                    if let Err(e) = pass_own_notifications(client, conn).await {
                        out.end = End::ClientIo(e);
                        return out;
                    }
                    before = Some(out);
                }
                Err(e) => {
                    crate::metrics::switchover_move("failed");
                    warn!(client = %self.peer, server = %target.endpoint, error = %e, "a session could not leave for the next primary; ended");
                    send_fatal(client, codes::ADMIN_SHUTDOWN, &cause.client_message()).await;
                    return out;
                }
            }
        }
    }

    /// Session pooling, after a statement that reset settings to the session's start (which,
    /// for a connection patroxy logged in, is the login's): the client's startup values
    /// are set again, as `RESET` would leave them direct.
    async fn restore(&self, conn: &mut ServerConn, carried: &mut Carried) -> Result<(), ConnError> {
        let deadline = Instant::now() + self.reset_limit();
        let mut look = Look {
            settings: true,
            ..Look::default()
        };
        look.ask_for(carried.wanted.custom());
        let restored = async {
            let snapshot = conn.inspect(look).await?;
            carried.wanted.take_up(conn, &snapshot.settings);
            conn.fit(&carried.wanted).await
        };
        timeout_at(deadline, restored)
            .await
            .unwrap_or(Err(ConnError::Timeout))
    }

    /// Session pooling, at a planned switchover: whether the client leaves its server
    /// connection for the next primary. If it does, the settings it made in its session
    /// become its own (set on its next connection), and the Parse messages that recreate its
    /// named statements are kept for it.
    async fn leave(
        &self,
        conn: &mut ServerConn,
        server_clean: bool,
        carried: &mut Carried,
    ) -> Result<bool, ConnError> {
        if !server_clean {
            return Err(ConnError::Protocol("a client message was cut".into()));
        }
        let deadline = Instant::now() + self.reset_limit();
        let mut look = Look::ALL;
        look.ask_for(carried.wanted.custom());
        let snapshot = timeout_at(deadline, conn.inspect(look))
            .await
            .unwrap_or(Err(ConnError::Timeout))?;
        let held = snapshot.holds().or_else(|| listens(&snapshot));
        if let Some(held) = held {
            crate::metrics::switchover_move("stayed");
            info!(client = %self.peer, server = %conn.endpoint, %held, "session holds state on its server; it stays there through the switchover");
            return Ok(false);
        }
        carried.wanted.take_up(conn, &snapshot.settings);
        let parses = snapshot.parses();
        crate::metrics::switchover_move("moved");
        info!(client = %self.peer, server = %conn.endpoint, statements = parses.len(), "session leaves for the next primary (planned switchover)");
        carried.replay = parses;
        Ok(true)
    }

    /// The loan's figures: the statement cache's, and the console's per database.
    fn account(
        &self,
        lease: &Lease,
        conn: &ServerConn,
        lent_at: Instant,
        cache_before: CacheStats,
        out: &Outcome,
    ) {
        self.ctx
            .pool_metrics
            .prepared(conn.prepared.stats - cache_before);
        lease.pool.record(&DbStats {
            xact_count: 1,
            query_count: out.queries,
            received: out.bytes_up,
            sent: out.bytes_down,
            xact_time_us: lent_at.elapsed().as_micros() as u64,
            wait_time_us: lease.waited.as_micros() as u64,
        });
    }

    /// A client that left at rest: its transaction is rolled back and its session reset
    /// (`server_reset_query`; `DISCARD ALL` for a pinned one, whatever that says), and the
    /// connection goes back if the server is then idle. One that loaded a library is
    /// closed: nothing unloads it.
    async fn reset(
        &self,
        conn: &mut ServerConn,
        pin: Option<Pin>,
        seen: &Seen,
        tx_status: u8,
    ) -> bool {
        let e = seen.effects;
        let query = match pin {
            Some(Pin { closes: true, .. }) => return false,
            Some(_) => "DISCARD ALL",
            None if e.intersects(Effects::UNRESETTABLE) => return false,
            None if e.contains(Effects::NAMELESS) => "DISCARD ALL",
            None => &self.ctx.pool.server_reset_query,
        };
        let reset = conn
            .reset(tx_status, query, &seen.custom, self.reset_limit())
            .await;
        crate::metrics::server_reset(if reset.is_ok() { "ok" } else { "failed" });
        match reset {
            Ok(()) => true,
            Err(e) => {
                let server = &conn.endpoint;
                warn!(%server, error = %e, "server connection not reusable after its reset; closed");
                false
            }
        }
    }

    /// Transaction mode, at a transaction's end: when its statements may have left state
    /// in the session (or `pool.verify_release` says to look every time), the server is
    /// asked what the session holds. Settings become the client's own, to follow it to its
    /// next connections; objects that cannot follow it pin it to this connection (the
    /// pin returned), until a later transaction ends them.
    async fn settle(
        &self,
        conn: &mut ServerConn,
        seen: &Seen,
        pin: Option<Pin>,
        carried: &mut Carried,
    ) -> Result<Option<Pin>, ConnError> {
        let e = seen.effects;
        carried.listening.unlisten(&seen.unlisten);
        let verify = self.ctx.pool.verify_release;
        let mut look = match pin {
            // What is not seen on the server is never seen gone.
            Some(p) if p.for_good => return Ok(pin),
            Some(_) if e.intersects(Effects::ENDS | Effects::UNKNOWN) => Look::ALL,
            Some(_) => return Ok(pin),
            None if verify => Look::ALL,
            None => look_after(e),
        };
        let unseen = e.intersects(Effects::UNRESETTABLE | Effects::NAMELESS);
        if !look.any() && !unseen {
            return Ok(None);
        }
        look.ask_for(carried.wanted.custom());
        look.ask_for(seen.custom.iter().map(String::as_str));
        let (settings, statements) = (look.settings, look.statements);
        let limit = self.reset_limit();
        let snapshot = timeout(limit, conn.inspect(look))
            .await
            .unwrap_or(Err(ConnError::Timeout))?;
        if statements {
            let names: Vec<&str> = snapshot.statements.iter().map(|s| s.0.as_str()).collect();
            conn.prepared.resync(&names);
        }
        let mut held = held_by(&snapshot, e);
        // Listens with nothing else held go to the listener's hub, and the connection is
        // clean again; if that fails, they pin the client like the rest.
        if held.is_none() && !snapshot.listens.is_empty() {
            held = self.to_hub(conn, snapshot.listens.clone(), carried).await?;
        }
        if verify && pin.is_none() {
            let unseen = held.is_some() && !e.intersects(Effects::OBJECTS | Effects::LISTEN);
            let changed = !e.contains(Effects::SETTINGS) && settings_changed(conn, &snapshot);
            let result = if unseen || changed { "found" } else { "clean" };
            crate::metrics::release_check(result);
        }
        match held {
            Some((reason, what)) => {
                if pin.is_none() {
                    crate::metrics::pinned(reason);
                    info!(client = %self.peer, server = %conn.endpoint, held = %what, "client pinned to its server connection (transaction pooling): its session holds state that cannot follow it");
                    // Its notifications come on its own connection while it is pinned.
                    self.listens_to_conn(conn, carried).await?;
                }
                self.me.pin(Some(what));
                // patroxy's own statements spoke UTF-8: the client's encoding comes back.
                conn.fit_encoding(&carried.wanted).await?;
                Ok(Some(Pin {
                    reason,
                    for_good: unseen || pin.is_some_and(|p| p.for_good),
                    closes: e.intersects(Effects::UNRESETTABLE) || pin.is_some_and(|p| p.closes),
                }))
            }
            None => {
                if pin.is_some() {
                    info!(client = %self.peer, server = %conn.endpoint, "client unpinned: its session holds nothing that cannot follow it");
                    self.me.pin(None);
                }
                if settings {
                    carried.wanted.take_up(conn, &snapshot.settings);
                }
                Ok(None)
            }
        }
    }
}

impl Session<'_> {
    /// A client pinned to its connection listens there, not through the listening
    /// connection (where its notifications would wait for a `next()` it no longer goes
    /// through). The move is marked by a notification of patroxy's own on a channel both
    /// connections listen on: before it the hub's notifications count, after it this
    /// connection's, so none is lost or given twice.
    async fn listens_to_conn(
        &self,
        conn: &mut ServerConn,
        carried: &mut Carried,
    ) -> Result<(), ConnError> {
        let channels = carried.listening.channels();
        if channels.is_empty() {
            return Ok(());
        }
        let limit = self.reset_limit();
        let seam = listening::seam_channel();
        let who = (self.who.database, self.who.user, self.who.login);
        let hub_ready = timeout(
            limit,
            carried.listening.listen(self.ctx, who, vec![seam.clone()]),
        )
        .await;
        let mut sql: Vec<String> = channels
            .iter()
            .map(|c| format!("LISTEN {}", crate::backend::session::quote_ident(c)))
            .collect();
        sql.push(format!("LISTEN {seam}"));
        let sql = sql.join("; ");
        timeout(limit, conn.run_own(&sql))
            .await
            .unwrap_or(Err(ConnError::Timeout))?;
        let (notify, unlisten) = (format!("NOTIFY {seam}"), format!("UNLISTEN {seam}"));
        timeout(limit, conn.execute_each(&[&notify, &unlisten]))
            .await
            .unwrap_or(Err(ConnError::Timeout))?;
        let here = std::mem::take(&mut conn.notifications);
        let after = match here.iter().position(|n| listening::on_channel(n, &seam)) {
            Some(at) => here[at + 1..].to_vec(),
            // Only past the connection's cap of kept notifications: all of them, then.
            None => here,
        };
        let before = match hub_ready {
            Ok(Ok(())) => carried.listening.until(&seam, limit).await,
            _ => None,
        };
        // What the hub queued past the seam, this connection has: it is dropped.
        let past = carried.listening.leave_hub();
        let mut before = before.unwrap_or_else(|| {
            warn!(client = %self.peer, "the listening connection did not mark where the client's LISTENs moved; a notification may come twice");
            past
        });
        before.extend(after);
        conn.notifications = before;
        Ok(())
    }

    /// Moves the client's listens from its connection to its listener's hub: listened
    /// there first (with a seam channel, as in `listens_to_conn`), then `UNLISTEN *`
    /// here. What pins the client if the hub cannot take them.
    async fn to_hub(
        &self,
        conn: &mut ServerConn,
        channels: Vec<String>,
        carried: &mut Carried,
    ) -> Result<Option<(&'static str, String)>, ConnError> {
        let limit = self.reset_limit();
        let n = channels.len();
        let seam = listening::seam_channel();
        let mut asked = channels;
        asked.push(seam.clone());
        let channels_asked = asked.clone();
        let who = (self.who.database, self.who.user, self.who.login);
        let listened = carried.listening.listen(self.ctx, who, asked);
        match timeout(limit, listened).await {
            Ok(Ok(())) => {
                let (listen, notify) = (format!("LISTEN {seam}"), format!("NOTIFY {seam}"));
                let own = [listen.as_str(), notify.as_str(), "UNLISTEN *"];
                timeout(limit, conn.execute_each(&own))
                    .await
                    .unwrap_or(Err(ConnError::Timeout))?;
                // Before the seam, this connection's; after it, the hub's.
                let here = std::mem::take(&mut conn.notifications);
                let at = here.iter().position(|n| listening::on_channel(n, &seam));
                conn.notifications = here.into_iter().take(at.unwrap_or(usize::MAX)).collect();
                if carried.listening.until(&seam, limit).await.is_none() {
                    warn!(client = %self.peer, "the listening connection did not mark where the client's LISTENs moved; a notification may come twice");
                }
                carried.listening.unlisten(&[seam]);
                Ok(None)
            }
            Ok(Err(e)) => {
                warn!(client = %self.peer, error = %e, "the listening connection could not take the client's LISTENs; it keeps its server connection");
                Ok(Some(("listen", format!("{n} LISTEN channels"))))
            }
            Err(_) => {
                warn!(client = %self.peer, "the listening connection took too long; the client keeps its server connection");
                // Whatever the hub took of it meanwhile, it lets go.
                carried.listening.forget(&channels_asked);
                Ok(Some(("listen", format!("{n} LISTEN channels"))))
            }
        }
    }
}

/// Session mode: notifications that came while patroxy had the connection to itself (the
/// session is at rest, where PostgreSQL gives them).
async fn pass_own_notifications(client: &mut Stream, conn: &mut ServerConn) -> std::io::Result<()> {
    if conn.notifications.is_empty() {
        return Ok(());
    }
    let mut out = BytesMut::new();
    for n in conn.notifications.drain(..) {
        out.extend_from_slice(&n);
    }
    send(client, &out).await
}

/// Gives a connection back to its pool, at once or, with a cancel on its way to it, once
/// that has arrived (within `limit`; if it may not have, the connection is closed): lent to
/// another client before, it could cancel that client's query.
fn give_back(
    lease: Lease,
    conn: ServerConn,
    in_flight: Option<std::sync::Arc<crate::backend::cancel::InFlight>>,
    limit: Duration,
) {
    let Some(in_flight) = in_flight else {
        return lease.give_back(conn);
    };
    tokio::spawn(async move {
        match in_flight.settled(limit).await {
            true => lease.give_back(conn),
            false => {
                warn!(server = %conn.endpoint, "a cancel request to a server connection may not have arrived; closed rather than lent again")
            }
        }
    });
}

/// A lent connection, where it is, whether it goes back at each transaction's end, and
/// what the client's statements do to the session.
struct Lent<'a> {
    conn: &'a mut ServerConn,
    target: &'a Target,
    release_at_idle: bool,
    seen: &'a mut Seen,
}

/// What to ask the server after a transaction whose statements had these effects. A
/// setting can make the next statement's object temporary (a search path that starts with
/// `pg_temp`): after settings, objects are looked at too.
fn look_after(e: Effects) -> Look {
    let unknown = e.contains(Effects::UNKNOWN);
    let settings = unknown || e.contains(Effects::SETTINGS);
    Look {
        settings,
        objects: settings || e.intersects(Effects::OBJECTS),
        listens: unknown || e.contains(Effects::LISTEN),
        statements: unknown || e.contains(Effects::STATEMENTS),
        custom: Vec::new(),
    }
}

/// What the statements did that the server cannot show, as a metric label and in words.
fn unseen_by(e: Effects) -> Option<(&'static str, String)> {
    if e.contains(Effects::LOAD) {
        return Some(("load", "a library loaded with LOAD".into()));
    }
    if e.contains(Effects::SEED) {
        return Some(("seed", "the random seed (setseed)".into()));
    }
    if e.contains(Effects::NAMELESS) {
        return Some(("setting", "a setting set under a computed name".into()));
    }
    None
}

/// What pins the client: what its statements did that the server cannot show, or the
/// first thing its session holds, as a metric label and in words.
fn held_by(s: &Snapshot, e: Effects) -> Option<(&'static str, String)> {
    if let Some(unseen) = unseen_by(e) {
        return Some(unseen);
    }
    let (first, _) = s.held.first()?;
    let reason = match first.as_str() {
        "temporary objects" => "temp",
        "advisory locks" => "advisory",
        "open cursors" => "cursor",
        "SQL-level prepared statements" => "prepare",
        "temporary replication slots" => "slot",
        _ => "unknown",
    };
    Some((reason, s.holds().unwrap_or_default()))
}

fn listens(s: &Snapshot) -> Option<String> {
    (!s.listens.is_empty()).then(|| format!("{} LISTEN channels", s.listens.len()))
}

/// What pins a client whose transaction did not end (it left in it): what its statements
/// may have made, by their effects alone.
fn held_by_seen(seen: &Seen) -> Option<Pin> {
    let e = seen.effects;
    let closes = e.intersects(Effects::UNRESETTABLE);
    e.intersects(Effects::OBJECTS | Effects::LISTEN | Effects::UNKNOWN)
        .then_some(Pin {
            reason: unseen_by(e).map_or("unknown", |(reason, _)| reason),
            for_good: true,
            closes,
        })
}

/// Whether the session's settings differ from what patroxy knows it applied.
fn settings_changed(conn: &ServerConn, s: &Snapshot) -> bool {
    let unreported = s
        .settings
        .iter()
        .filter(|(n, _)| !conn.params.contains_key(*n));
    unreported.count() != conn.extra.len()
        || s.settings
            .iter()
            .any(|(n, v)| !conn.params.contains_key(n) && conn.extra.get(n) != Some(v))
}

/// Transaction pooling: the server connection died under the client (a fast shutdown, a
/// crash). A client waiting for answers gets an error it can survive, saying the outcome is
/// unknown, and keeps its connection; one between statements of a transaction block cannot
/// be told in time, so its session ends.
fn lost(end: &End, p: Progress, server_fatal: Option<ErrorFields>, pinned: bool) -> Lost {
    let why = match &server_fatal {
        Some(f) => format!("{} {}", f.sqlstate, f.message),
        None => end.to_string(),
    };
    if pinned {
        return Lost::Pinned(format!("patroxy: the server connection that held this session's temporary tables, locks or cursors was lost ({why})"));
    }
    let waiting = p.in_flight + u32::from(p.unsynced);
    if waiting > 0 && p.client_at_boundary {
        let msg = format!(
            "patroxy: the server connection was lost during the transaction ({why}); the transaction may or may not have committed"
        );
        let error =
            messages::error_response(Severity::Error, codes::TRANSACTION_RESOLUTION_UNKNOWN, &msg);
        let mut answer = BytesMut::new();
        for _ in 0..waiting {
            answer.extend_from_slice(&error);
            answer.extend_from_slice(&messages::ready_for_query_idle());
        }
        Lost::Answered(answer)
    } else if p.tx_status == codes::TX_IDLE && p.client_at_boundary {
        Lost::Quiet
    } else {
        Lost::Fatal(format!("patroxy: the server connection was lost inside a transaction block ({why}); the transaction may or may not have committed"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress(tx_status: u8, in_flight: u32, at_boundary: bool) -> Progress {
        Progress {
            tx_status,
            in_flight,
            unsynced: false,
            client_at_boundary: at_boundary,
        }
    }

    #[test]
    fn a_client_whose_server_died_is_answered_when_it_waits_and_can_be() {
        let end = End::ServerClosed;
        let Lost::Answered(answer) = lost(&end, progress(codes::TX_IN_BLOCK, 2, true), None, false)
        else {
            panic!("two requests waited");
        };
        let readies = answer.windows(6).filter(|w| *w == b"Z\0\0\0\x05I").count();
        assert_eq!(readies, 2, "one error and ReadyForQuery per request");
        assert_eq!(
            lost(&end, progress(codes::TX_IDLE, 0, true), None, false),
            Lost::Quiet
        );
        assert!(matches!(
            lost(&end, progress(codes::TX_IN_BLOCK, 0, true), None, false),
            Lost::Fatal(_)
        ));
        assert!(matches!(
            lost(&end, progress(codes::TX_IDLE, 1, false), None, false),
            Lost::Fatal(_)
        ));
        // A pinned client's state was on that connection: it is told, whatever it waited for.
        assert!(matches!(
            lost(&end, progress(codes::TX_IDLE, 0, true), None, true),
            Lost::Pinned(_)
        ));
    }
}
