//! The relay's two pumps when named prepared statements are rewritten (transaction
//! pooling): whole frames instead of passing bytes, so that a client's Parse, Bind, Describe
//! and Close can be renamed, preceded by a quiet Parse, or answered by patroxy
//! (`prepared.rs` decides), and the server's answers to patroxy's own messages are held
//! back. A frame longer than `LONG_FRAME` that patroxy need not read whole (a result's row,
//! COPY data, a Bind's parameters, a Query too long to read) goes through as it comes, so
//! a session holds at most about that much of it. Accounting (transaction status, requests
//! in flight) is the plain relay's.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Mutex;

use bytes::BytesMut;
use tokio::sync::Notify;

use super::relay::{count_down, End, Pumped, RelayState, UpCounter};
use crate::protocol::codes;
use crate::protocol::frame::{long_frame, split_frame, Scanner, MAX_DECLARED_LEN};
use crate::protocol::messages;
use crate::protocol::prepared::{Responses, Rewriter, Route};
use crate::stream::{Reader, Scratch, Writer, BUF_SIZE};

/// PostgreSQL's own limit on a message.
const FRAME_LIMIT: usize = 1 << 30;

/// A frame longer than this goes through as it comes, unless patroxy must read it whole.
pub const LONG_FRAME: usize = 64 * 1024;

/// What patroxy counts an answer it expects (or owes) as holding, against
/// `pool.client_memory`.
const EXPECTED_COST: usize = 128;

/// The rest of a long frame: passed as it comes, or (an answer patroxy swallows) dropped.
#[derive(Debug, Default)]
struct Through {
    left: usize,
    pass: bool,
}

impl Through {
    /// Moves what is due of `pending` to `out`: whether the frame has all gone through.
    fn take(&mut self, pending: &mut BytesMut, out: &mut BytesMut) -> bool {
        let n = self.left.min(pending.len());
        let part = pending.split_to(n);
        if self.pass {
            out.extend_from_slice(&part);
        }
        self.left -= n;
        self.left == 0
    }
}

/// Client messages patroxy reads whole (it keeps or renames what they name), up to
/// `pool.client_memory`.
fn held_whole(tag: u8) -> bool {
    matches!(tag, codes::PARSE | codes::DESCRIBE | codes::CLOSE)
}

fn lock(r: &Mutex<Responses>) -> std::sync::MutexGuard<'_, Responses> {
    r.lock().unwrap_or_else(|p| p.into_inner())
}

fn lock_held(st: &RelayState) -> std::sync::MutexGuard<'_, BytesMut> {
    st.held.lock().unwrap_or_else(|p| p.into_inner())
}

/// Client to server, frame by frame, through the rewriter.
pub(super) async fn pump_up(
    (rd, wr): (&mut Reader<'_>, &mut Writer<'_>),
    leftover: &mut BytesMut,
    st: &RelayState,
    mut rewriter: Rewriter<'_>,
    (responses, wake): (&Mutex<Responses>, &Notify),
    scratch: &mut Scratch,
) -> End {
    let mut pending = std::mem::take(leftover);
    let mut scanner = Scanner::new(MAX_DECLARED_LEN);
    let mut counter = UpCounter::default();
    // Bytes already read before the relay began are counted like any others.
    if let Err(e) = scanner.scan(&pending, |seen| counter.see(st, seen)) {
        return End::ClientProtocol(e);
    }
    let Scratch { read, out } = scratch;
    read.reserve(BUF_SIZE);
    let mut through = Through::default();
    loop {
        out.clear();
        // What the server refused since the last batch is not prepared there; what it
        // dropped is gone.
        let (failed, dropped) = {
            let mut r = lock(responses);
            (r.take_failed(), r.take_all_dropped())
        };
        rewriter.in_failed_transaction = st.tx_status.load(Relaxed) == codes::TX_FAILED;
        rewriter.forget(&failed);
        if dropped {
            rewriter.all_dropped();
        }
        loop {
            if through.left > 0 && !through.take(&mut pending, out) {
                break;
            }
            match long_frame(&pending, LONG_FRAME, FRAME_LIMIT) {
                Err(e) => return End::ClientProtocol(e),
                Ok(Some((tag, total))) if held_whole(tag) => {
                    if rewriter.over_memory(total) {
                        st.up_clean.store(false, Relaxed);
                        let limit = rewriter.memory;
                        return End::ClientMemory { limit };
                    }
                }
                Ok(Some((tag, total))) => {
                    let Some((rewritten, replaced)) = rewriter.rewrite_long(tag, &pending, total)
                    else {
                        break;
                    };
                    let _ = pending.split_to(replaced);
                    let mut r = lock(responses);
                    if matches!(tag, codes::COPY_DONE | codes::COPY_FAIL) {
                        r.copy_ended();
                    }
                    r.extend(rewritten.expect);
                    drop(r);
                    for b in rewritten.send {
                        out.extend_from_slice(&b);
                    }
                    through = Through {
                        left: total - replaced,
                        pass: true,
                    };
                    continue;
                }
                Ok(None) => {}
            }
            let frame = match split_frame(&mut pending, FRAME_LIMIT) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => return End::ClientProtocol(e),
            };
            if frame.tag == codes::TERMINATE {
                // The client leaves; a kept server must not see it.
                if !out.is_empty() {
                    if let Err(e) = wr.write_all(out).await {
                        return End::ServerIo(e);
                    }
                }
                st.up_clean.store(pending.is_empty(), Relaxed);
                return End::ClientClosed;
            }
            let body = frame.bytes.slice(5..);
            let rewritten = rewriter.rewrite(frame.tag, &body, frame.bytes.clone());
            let mut r = lock(responses);
            if matches!(frame.tag, codes::COPY_DONE | codes::COPY_FAIL) {
                r.copy_ended();
            }
            r.extend(rewritten.expect);
            // Answers patroxy gives itself need nothing of the server, so a client that
            // does not read them is held back by nothing else: they count too.
            let expected = r.len() * EXPECTED_COST;
            drop(r);
            for b in rewritten.send {
                out.extend_from_slice(&b);
            }
            if rewriter.over_memory(expected) {
                st.up_clean.store(false, Relaxed);
                let limit = rewriter.memory;
                return End::ClientMemory { limit };
            }
        }
        // patroxy's own answers may be due now, with nothing for the server to answer. Only
        // then is the other pump woken: a wake-up for nothing costs a thread's sleep and wake.
        if lock(responses).own_due() {
            wake.notify_one();
        }
        // Only whole messages go to the server: the first bytes of the next one wait where
        // they outlive this pump (a transaction's end stops it, and they go with the
        // client to its next connection).
        *lock_held(st) = std::mem::take(&mut pending);
        st.up_clean.store(false, Relaxed);
        // Set before the write: a server lost during it leaves the rest of the message.
        st.client_mid_message.store(through.left > 0, Relaxed);
        if !out.is_empty() {
            if let Err(e) = wr.write_all(out).await {
                return End::ServerIo(e);
            }
            st.bytes_up.fetch_add(out.len() as u64, Relaxed);
        }
        // In the middle of a long frame, the connection is not at a message's end.
        st.up_clean.store(through.left == 0, Relaxed);
        read.clear();
        let n = rd.read_some(read).await;
        pending = std::mem::take(&mut *lock_held(st));
        match n {
            Ok(0) => return End::ClientClosed,
            Ok(_) => {}
            Err(e) => return End::ClientIo(e),
        }
        if let Err(e) = scanner.scan(read, |seen| counter.see(st, seen)) {
            return End::ClientProtocol(e);
        }
        pending.extend_from_slice(read);
    }
}

/// Server to client, frame by frame: answers to patroxy's own messages are held back, and
/// patroxy's own answers go in their place.
pub(super) async fn pump_down(
    (rd, wr): (&mut Reader<'_>, &mut Writer<'_>),
    mut pending: BytesMut,
    st: &RelayState,
    (responses, wake): (&Mutex<Responses>, &Notify),
    scratch: &mut Scratch,
) -> Pumped {
    let mut scanner = Scanner::new(MAX_DECLARED_LEN).capturing(
        codes::PARAMETER_STATUS,
        super::relay::PARAMETER_STATUS_PREFIX,
    );
    let Scratch { read, out } = scratch;
    read.reserve(BUF_SIZE);
    let mut through = Through::default();
    loop {
        out.clear();
        {
            let mut r = lock(responses);
            // patroxy's own answers wait for the end of a frame going through.
            if through.left == 0 {
                for b in r.due() {
                    out.extend_from_slice(&b);
                }
            }
            loop {
                if through.left > 0 {
                    if !through.take(&mut pending, out) {
                        break;
                    }
                    for b in r.due() {
                        out.extend_from_slice(&b);
                    }
                }
                match long_frame(&pending, LONG_FRAME, FRAME_LIMIT) {
                    Err(e) => return Pumped::End(End::ServerProtocol(e)),
                    // A row, COPY data, or a notice or error of the client's making: routed
                    // by its tag and passed as it comes (a FATAL is never that long: an
                    // error this long is the client's to read).
                    Ok(Some((tag, total))) => {
                        through = Through {
                            left: total,
                            pass: r.route(tag) == Route::Pass,
                        };
                        continue;
                    }
                    Ok(None) => {}
                }
                let frame = match split_frame(&mut pending, FRAME_LIMIT) {
                    Ok(Some(f)) => f,
                    Ok(None) => break,
                    Err(e) => return Pumped::End(End::ServerProtocol(e)),
                };
                // The server's FATAL ends its connection, not the client's: the client is
                // told in patroxy's words when the connection is gone, and stays.
                if frame.tag == codes::ERROR_RESPONSE {
                    let fields = messages::error_fields(frame.body());
                    if let Some(f) =
                        fields.filter(|f| f.severity == "FATAL" || f.severity == "PANIC")
                    {
                        st.record_server_fatal(f);
                        continue;
                    }
                }
                if frame.tag == codes::COMMAND_COMPLETE {
                    r.completed(frame.body());
                }
                if r.route(frame.tag) == Route::Pass {
                    out.extend_from_slice(&frame.bytes);
                }
                for b in r.due() {
                    out.extend_from_slice(&b);
                }
            }
        }
        let delivered = !out.is_empty();
        if delivered {
            if let Err(e) = scanner.scan(out, |seen| count_down(st, seen)) {
                return Pumped::End(End::ServerProtocol(e));
            }
            st.record_captured(scanner.take_captured());
            st.down_clean.store(false, Relaxed);
            if let Err(e) = wr.write_all(out).await {
                return Pumped::End(End::ClientIo(e));
            }
            st.bytes_down.fetch_add(out.len() as u64, Relaxed);
        }
        st.down_clean
            .store(pending.is_empty() && through.left == 0, Relaxed);
        if st.drain_reached() {
            return Pumped::AtRest;
        }
        // Only an answer can end a transaction: nothing is released before the server spoke.
        if delivered
            && st.release_at_idle
            && super::relay::released(st)
            && lock(responses).is_empty()
        {
            return Pumped::Released;
        }
        read.clear();
        // Biased: a read that is ready leaves the wake unpolled (`notify_one` keeps its
        // permit for the next turn).
        tokio::select! {
            biased;
            r = rd.read_some(read) => match r {
                Ok(0) => return Pumped::End(End::ServerClosed),
                Ok(_) => pending.extend_from_slice(read),
                Err(e) => return Pumped::End(End::ServerIo(e)),
            },
            _ = wake.notified() => {}
        }
    }
}
