//! Named prepared statements across server connections, for transaction pooling (as
//! PgBouncer 1.21+ and PgDog do). A client's Parse of a named statement is remembered and
//! sent to the server under a name derived from the statement itself (`patroxy_<hash>`), so
//! every server connection that has it prepared can serve any client that asks for the same
//! statement. A Bind or Describe of a statement the connection does not have yet is preceded
//! by its Parse, whose answer the client never sees; a Close is answered by patroxy. Each
//! connection keeps at most `capacity` statements, closing the least recently used.
//!
//! This module decides; the relay moves the bytes. The response queue says, for every message
//! sent to the server, which answer ends it and whether the client sees it, and where
//! patroxy's own answers go in between.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};

use crate::protocol::classify::{Classified, Classifier, Effects, Seen, Strings};
use crate::protocol::codes;
use crate::protocol::frame::HEADER_LEN;
use crate::protocol::messages::{self, frame};

/// A statement a client prepared, as the server knows it.
#[derive(Debug)]
pub struct Statement {
    pub server_name: String,
    /// The whole Parse message under `server_name`.
    pub parse: Bytes,
    /// What running it does to the session.
    pub classified: Arc<Classified>,
}

/// How statements are named on the servers: a hash of their text, types and search path,
/// keyed at random per process, so that no client can name a statement another will use.
#[derive(Debug, Default)]
pub struct Naming(std::hash::RandomState);

impl Naming {
    fn name(&self, query: &[u8], types: &[u8], context: &str) -> String {
        use std::hash::BuildHasher;
        format!("patroxy_{:016x}", self.0.hash_one((query, types, context)))
    }
}

/// What naming and reading a client's statements takes.
#[derive(Clone, Copy)]
pub struct Reading<'a> {
    pub naming: &'a Naming,
    pub classifier: &'a Classifier,
    /// How the server reads string literals in them.
    pub strings: Strings,
    /// Whether their ASCII bytes are all ASCII characters (not so in SJIS and the like).
    pub ascii_safe: bool,
    /// Settings that change what a statement means (its search path), part of its identity.
    pub context: &'a str,
}

impl<'a> Reading<'a> {
    /// Standard strings, an ASCII-safe encoding and no settings that change a statement's
    /// meaning: what the fuzz targets and benchmarks read with.
    pub fn plain(naming: &'a Naming, classifier: &'a Classifier) -> Reading<'a> {
        Reading {
            naming,
            classifier,
            strings: Strings::Standard,
            ascii_safe: true,
            context: "",
        }
    }
}

impl Statement {
    /// The statement `query` (with `rest`, the Parse body after its name: text and types)
    /// under its server name.
    fn new(query: &[u8], rest: &[u8], reading: Reading<'_>) -> Statement {
        let types = rest.get(query.len() + 1..).unwrap_or_default();
        let server_name = reading.naming.name(query, types, reading.context);
        let mut parse_body = Vec::with_capacity(rest.len() + 24);
        parse_body.extend_from_slice(server_name.as_bytes());
        parse_body.push(0);
        parse_body.extend_from_slice(rest);
        Statement {
            server_name,
            parse: frame(codes::PARSE, &parse_body),
            classified: reading
                .classifier
                .classify_in(query, reading.strings, reading.ascii_safe),
        }
    }
}

/// The client's named statements, by the client's names, and its unnamed statement: on a
/// direct connection that one lives until the next unnamed Parse or simple Query, so it
/// follows its client to later transactions too (sent again where the connection has
/// another).
#[derive(Debug, Default)]
pub struct ClientStatements {
    by_name: HashMap<Vec<u8>, Arc<Statement>>,
    unnamed: Option<Arc<Statement>>,
    /// What the named statements hold (`held`).
    named_bytes: usize,
}

/// What patroxy counts a statement it keeps for a client as holding, besides its name and
/// Parse message (its classification, the map's entry).
const STATEMENT_OVERHEAD: usize = 256;

fn held_by(name: &[u8], s: &Statement) -> usize {
    name.len() + s.parse.len() + STATEMENT_OVERHEAD
}

impl ClientStatements {
    /// The bytes patroxy holds for this client's statements: their Parse messages, kept
    /// to prepare them on whichever connection the client is lent next.
    pub fn held(&self) -> usize {
        self.named_bytes + self.unnamed.as_ref().map_or(0, |s| held_by(b"", s))
    }

    fn keep(&mut self, name: Vec<u8>, s: Arc<Statement>) {
        self.named_bytes += held_by(&name, &s);
        if let Some(old) = self.by_name.get(&name) {
            self.named_bytes -= held_by(&name, old);
        }
        self.by_name.insert(name, s);
    }

    fn let_go(&mut self, name: &[u8]) -> Option<Arc<Statement>> {
        let s = self.by_name.remove(name)?;
        self.named_bytes -= held_by(name, &s);
        Some(s)
    }

    /// Answers, without a server, a batch that only prepares or closes named statements
    /// and then syncs (libpq's PQprepare, a driver's statement cache filling up): the
    /// statements are remembered and prepared on a server at their first Bind or Describe.
    /// Between transactions that spares the client a wait for a server connection. `None`
    /// when the batch is anything else; the bytes are then left as they are.
    pub fn answer_locally(&mut self, batch: &[u8], reading: Reading<'_>) -> Option<Bytes> {
        let mut rest = batch;
        let mut parsed = Vec::new();
        let mut closed = Vec::new();
        let mut reply = BytesMut::new();
        loop {
            let (&tag, after) = rest.split_first()?;
            let len = u32::from_be_bytes(after.get(..4)?.try_into().ok()?) as usize;
            if len < 4 {
                return None;
            }
            let body = after.get(4..len)?;
            rest = &after[len..];
            match tag {
                codes::PARSE => {
                    let (name, after_name) = cstr(body)?;
                    let (query, _) = cstr(after_name)?;
                    if name.is_empty() {
                        return None;
                    }
                    let s = Statement::new(query, after_name, reading);
                    parsed.push((name.to_owned(), s));
                    reply.extend_from_slice(&PARSE_COMPLETE);
                }
                codes::CLOSE if body.first() == Some(&b'S') => {
                    let (name, _) = cstr(&body[1..])?;
                    closed.push(name.to_owned());
                    reply.extend_from_slice(&CLOSE_COMPLETE);
                }
                codes::SYNC if rest.is_empty() => break,
                _ => return None,
            }
        }
        for (name, s) in parsed {
            self.keep(name, Arc::new(s));
        }
        for name in closed {
            self.let_go(&name);
        }
        reply.extend_from_slice(&[codes::READY_FOR_QUERY, 0, 0, 0, 5, codes::TX_IDLE]);
        Some(reply.freeze())
    }

    /// A Parse of `failed` (by the client `name`, or quietly) failed on the server: the
    /// client's name is gone too if it still means that statement, as it would be direct.
    fn forget_failed(&mut self, failed: &Prepared) {
        let Some(name) = &failed.client_name else {
            return;
        };
        if name.is_empty() {
            self.unnamed = None;
            return;
        }
        if self
            .by_name
            .get(name)
            .is_some_and(|s| s.server_name == failed.server_name)
        {
            self.let_go(name);
        }
    }

    /// Every statement is gone (`DISCARD ALL`, `DEALLOCATE ALL`).
    pub fn clear(&mut self) {
        self.by_name.clear();
        self.named_bytes = 0;
        self.unnamed = None;
    }

    /// Forgets the Parses that failed on the server.
    pub fn forget(&mut self, failed: &[Prepared]) {
        failed.iter().for_each(|f| self.forget_failed(f));
    }
}

/// The statements one server connection has prepared, least recently used first, and
/// whose unnamed statement it has (a simple Query or another unnamed Parse replaces it).
#[derive(Debug, Default)]
pub struct ServerStatements {
    names: VecDeque<String>,
    pub unnamed: Option<Arc<Statement>>,
    /// Counts since the connection opened, for the metrics.
    pub stats: CacheStats,
}

/// How a connection's statement cache served: statements found prepared, statements
/// prepared for a client, statements closed to make room.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
}

impl std::ops::Sub for CacheStats {
    type Output = CacheStats;
    fn sub(self, before: CacheStats) -> CacheStats {
        CacheStats {
            hits: self.hits - before.hits,
            misses: self.misses - before.misses,
            evictions: self.evictions - before.evictions,
        }
    }
}

impl ServerStatements {
    fn touch(&mut self, name: &str) -> bool {
        match self.names.iter().position(|n| n == name) {
            Some(i) => {
                let n = self.names.remove(i).expect("present");
                self.names.push_back(n);
                true
            }
            None => false,
        }
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    pub fn clear(&mut self) {
        self.names.clear();
        self.unnamed = None;
    }

    /// The server does not have these (their Parse failed, or they were deallocated; `""`
    /// is the unnamed statement).
    pub fn forget<'n>(&mut self, names: impl IntoIterator<Item = &'n str>) {
        for name in names {
            match name.is_empty() {
                true => self.unnamed = None,
                false => self.names.retain(|n| n != name),
            }
        }
    }

    /// What the server says it has of patroxy's statements, in place of what was thought:
    /// those gone are forgotten, and any patroxy had given up on (a `DEALLOCATE` of it
    /// that failed) are known again, least recently used.
    pub fn resync(&mut self, on_server: &[&str]) {
        self.names.retain(|n| on_server.contains(&n.as_str()));
        for name in on_server.iter().filter(|n| n.starts_with("patroxy_")) {
            if !self.names.iter().any(|n| n == name) {
                self.names.push_front((*name).to_owned());
            }
        }
    }
}

/// What ends the server's answer to one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ends {
    /// An extended-protocol message: after an error, the server skips to the next Sync.
    Extended(&'static [u8]),
    /// A Sync, a Query or a FunctionCall: ReadyForQuery.
    Ready,
}

/// A Parse sent to the server: the statement's server name, and the client's name for it
/// when the client asked for the Parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    pub server_name: String,
    pub client_name: Option<Vec<u8>>,
}

/// One expected answer, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pending {
    /// The server's answer to a message, passed to the client or (for patroxy's own Parse
    /// and Close) swallowed; for a Parse, what it prepares.
    Server {
        ends: Ends,
        swallow: bool,
        prepares: Option<Prepared>,
    },
    /// An answer patroxy gives the client itself, once everything before it has passed.
    Own(Bytes),
}

const PARSE_COMPLETE: [u8; 5] = [b'1', 0, 0, 0, 4];
const CLOSE_COMPLETE: [u8; 5] = [b'3', 0, 0, 0, 4];

/// What the server answers a client message with, for messages that get an answer.
pub fn ends_of(tag: u8, body: &[u8]) -> Option<Ends> {
    Some(match tag {
        codes::PARSE => Ends::Extended(b"1"),
        codes::BIND => Ends::Extended(b"2"),
        codes::CLOSE => Ends::Extended(b"3"),
        codes::DESCRIBE if body.first() == Some(&b'S') => Ends::Extended(b"nT"),
        codes::DESCRIBE => Ends::Extended(b"nT"),
        codes::EXECUTE => Ends::Extended(b"CIs"),
        codes::SYNC | codes::QUERY | codes::FUNCTION_CALL => Ends::Ready,
        _ => return None,
    })
}

/// The answer expected to a client message that passes untouched, if it gets one.
fn untouched(tag: u8, body: &[u8]) -> Option<Pending> {
    Some(Pending::Server {
        ends: ends_of(tag, body)?,
        swallow: false,
        prepares: None,
    })
}

/// How far into a long Bind its portal's and statement's names may go.
const MAX_BIND_NAMES: usize = 64 * 1024;

/// A NUL-terminated string at the start of `b`, as bytes (in the client's encoding), and
/// what follows it.
fn cstr(b: &[u8]) -> Option<(&[u8], &[u8])> {
    let nul = b.iter().position(|c| *c == 0)?;
    Some((&b[..nul], &b[nul + 1..]))
}

/// The rewriter for one client on one server connection.
pub struct Rewriter<'a> {
    pub client: &'a mut ClientStatements,
    pub server: &'a mut ServerStatements,
    pub capacity: usize,
    /// What the client's statements and settings may hold (`pool.client_memory`).
    pub memory: usize,
    /// What its settings hold.
    pub settings_held: usize,
    pub reading: Reading<'a>,
    /// What the client's statements may do to the session, gathered as they pass.
    pub seen: &'a mut Seen,
    /// Extended-protocol messages sent since the last Sync.
    pub unsynced: bool,
    /// The session's transaction has failed (as of the server's last ReadyForQuery):
    /// a `DEALLOCATE` there fails, as the server would fail it.
    pub in_failed_transaction: bool,
}

/// What to send for one client frame, and what to expect back.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Rewritten {
    pub send: Vec<Bytes>,
    pub expect: Vec<Pending>,
}

const COMMAND_COMPLETE_DEALLOCATE: &[u8] = b"C\0\0\0\x0fDEALLOCATE\0";

impl Rewriter<'_> {
    /// Rewrites one whole client frame (`tag`, `body`; `whole` is the frame as it came).
    /// Malformed bodies pass untouched: the server refuses them.
    /// Whether keeping `more` bytes for the client would take it past `memory`.
    pub fn over_memory(&self, more: usize) -> bool {
        self.client.held() + self.settings_held + more > self.memory
    }

    pub fn rewrite(&mut self, tag: u8, body: &[u8], whole: Bytes) -> Rewritten {
        let mut out = Rewritten::default();
        let named = match tag {
            codes::QUERY => self.query(body, &mut out),
            codes::PARSE => self.parse(body, &whole, &mut out),
            codes::BIND => self.bind(body, &mut out),
            codes::DESCRIBE => self.describe(body, &mut out),
            codes::CLOSE => self.close(body, &mut out),
            // A function called by its oid (set_config, an advisory lock...): unseen.
            codes::FUNCTION_CALL => {
                self.seen.effects |= Effects::UNKNOWN | Effects::UNREAD;
                false
            }
            _ => false,
        };
        self.note_sync(tag);
        if !named {
            out.send.push(whole);
            out.expect.extend(untouched(tag, body));
        }
        out
    }

    /// The start of a client frame too long to hold (`total` bytes, header included; `head`
    /// is what has come of it): what to send in place of its first `n` bytes, and `n`; the
    /// rest passes as it comes. `None` while a Bind's names have not all come. A Parse,
    /// Describe or Close is never long: those are held whole.
    pub fn rewrite_long(
        &mut self,
        tag: u8,
        head: &[u8],
        total: usize,
    ) -> Option<(Rewritten, usize)> {
        let mut out = Rewritten::default();
        let mut replaced = 0;
        match tag {
            // Too long to read: what it does is not known (the session is read after it).
            codes::QUERY => {
                self.seen.effects |= Effects::UNKNOWN | Effects::UNREAD;
                self.client.unnamed = None;
                self.server.unnamed = None;
            }
            codes::FUNCTION_CALL => self.seen.effects |= Effects::UNKNOWN | Effects::UNREAD,
            codes::BIND => {
                let body = &head[HEADER_LEN..];
                let names = cstr(body).and_then(|(portal, rest)| Some((portal, cstr(rest)?)));
                match names {
                    Some((portal, (name, _))) => {
                        let params = total - HEADER_LEN - portal.len() - name.len() - 2;
                        if self.bind_names(portal, name, params, &mut out) {
                            replaced = total - params;
                        }
                    }
                    None if body.len() < MAX_BIND_NAMES => return None,
                    // Names no server would take: it refuses the message.
                    None => self.seen.effects |= Effects::UNKNOWN,
                }
            }
            _ => {}
        }
        self.note_sync(tag);
        if replaced == 0 {
            out.expect.extend(untouched(tag, &[]));
        }
        Some((out, replaced))
    }

    fn note_sync(&mut self, tag: u8) {
        match tag {
            codes::SYNC => self.unsynced = false,
            codes::PARSE
            | codes::BIND
            | codes::DESCRIBE
            | codes::EXECUTE
            | codes::CLOSE
            | codes::FLUSH => self.unsynced = true,
            _ => {}
        }
    }

    /// Parses the server refused (or skipped after an error): the connection does not have
    /// those statements, and a client's own failed Parse leaves it without the name.
    pub fn forget(&mut self, failed: &[Prepared]) {
        self.server
            .forget(failed.iter().map(|f| f.server_name.as_str()));
        self.client.forget(failed);
    }

    /// The server dropped every prepared statement (its `DISCARD ALL` or `DEALLOCATE ALL`
    /// completed): so do both caches, as direct.
    pub fn all_dropped(&mut self) {
        self.server.clear();
        self.client.clear();
    }

    /// What a text does, as the server reads it: under the connection's string setting,
    /// or either way once the client's statements may have changed it.
    fn classify(&self, text: &[u8]) -> std::sync::Arc<Classified> {
        // The client's statements may have changed how the server reads the rest.
        let (strings, ascii_safe) = match self.seen.effects.contains(Effects::SETTINGS) {
            true => (Strings::Either, false),
            false => (self.reading.strings, self.reading.ascii_safe),
        };
        let c = self
            .reading
            .classifier
            .classify_in(text, strings, ascii_safe);
        // A search path that puts pg_temp first makes any CREATE a temporary object.
        if self.reading.context.contains("pg_temp") && !c.effects.contains(Effects::TEMP) {
            let mut c = (*c).clone();
            c.effects |= Effects::TEMP;
            return std::sync::Arc::new(c);
        }
        c
    }

    /// A simple Query: what it does to the session is noted; one that only deallocates a
    /// statement the client prepared through the protocol is answered by patroxy (the
    /// server knows it under another name), in its place in the conversation.
    fn query(&mut self, body: &[u8], out: &mut Rewritten) -> bool {
        let text = body.strip_suffix(&[0]).unwrap_or(body);
        let c = self.classify(text);
        self.seen.add(&c);
        self.deallocated(&c);
        // A simple Query ends the unnamed statement, the client's and the server's.
        self.client.unnamed = None;
        self.server.unnamed = None;
        let name = match &c.deallocated[..] {
            // Not inside an extended-protocol batch: patroxy's Sync would end it.
            [name] if c.only_deallocates && !self.unsynced && !self.in_failed_transaction => name,
            _ => return false,
        };
        if self.client.let_go(name.as_bytes()).is_none() {
            return false;
        }
        // A Sync gets the ReadyForQuery, with the transaction status as it is by then.
        out.send
            .push(Bytes::from_static(&[codes::SYNC, 0, 0, 0, 4]));
        out.expect.push(Pending::Own(Bytes::from_static(
            COMMAND_COMPLETE_DEALLOCATE,
        )));
        out.expect.push(Pending::Server {
            ends: Ends::Ready,
            swallow: false,
            prepares: None,
        });
        true
    }

    /// `DEALLOCATE` of one of patroxy's own names: the server no longer has it (if the
    /// statement fails, the connection's statements are read again at the transaction's
    /// end). Every statement dropped (`DISCARD ALL`, `DEALLOCATE ALL`) is seen when the
    /// server says it completed (`all_dropped`).
    fn deallocated(&mut self, c: &Classified) {
        let ours = c.deallocated.iter().filter(|n| n.starts_with("patroxy_"));
        self.server.forget(ours.map(String::as_str));
    }

    /// The client's statement called `name`; `None` for the unnamed statement or an unknown
    /// name, which pass to the server untouched.
    fn named(&self, name: &[u8]) -> Option<Arc<Statement>> {
        (!name.is_empty())
            .then(|| self.client.by_name.get(name).cloned())
            .flatten()
    }

    /// Before a Bind or Describe of the unnamed statement: the connection has the
    /// client's, sent again if it has another's (or none); a client without one finds none
    /// there either, as direct. The client's statement, if it has one.
    fn ensure_unnamed(&mut self, out: &mut Rewritten) -> Option<Arc<Statement>> {
        let Some(mine) = self.client.unnamed.clone() else {
            if self.server.unnamed.take().is_some() {
                out.send.push(messages::close_statement(""));
                out.expect.push(Pending::Server {
                    ends: Ends::Extended(b"3"),
                    swallow: true,
                    prepares: None,
                });
            }
            return None;
        };
        if !self
            .server
            .unnamed
            .as_ref()
            .is_some_and(|s| Arc::ptr_eq(s, &mine))
        {
            out.send.push(mine.parse.clone());
            out.expect.push(Pending::Server {
                ends: Ends::Extended(b"1"),
                swallow: true,
                prepares: Some(Prepared {
                    server_name: String::new(),
                    client_name: None,
                }),
            });
            self.server.unnamed = Some(mine.clone());
        }
        Some(mine)
    }

    /// The client's unnamed Parse: remembered as its unnamed statement, and sent as it is.
    fn parse_unnamed(&mut self, query: &[u8], whole: Bytes, out: &mut Rewritten) -> bool {
        // It runs at once, in practice: its effects count now (and when it is bound).
        let c = self.classify(query);
        self.seen.add(&c);
        self.deallocated(&c);
        let s = Arc::new(Statement {
            server_name: String::new(),
            parse: whole.clone(),
            classified: c,
        });
        self.client.unnamed = Some(s.clone());
        self.server.unnamed = Some(s);
        out.send.push(whole);
        out.expect.push(Pending::Server {
            ends: Ends::Extended(b"1"),
            swallow: false,
            prepares: Some(Prepared {
                server_name: String::new(),
                client_name: Some(Vec::new()),
            }),
        });
        true
    }

    /// Makes sure the connection has `s` prepared, preparing it quietly if not (for the
    /// client's name `client_name`, when the client asked for the Parse).
    fn ensure(&mut self, s: &Statement, client_name: Option<&[u8]>, out: &mut Rewritten) {
        if self.server.touch(&s.server_name) {
            self.server.stats.hits += 1;
            return;
        }
        self.server.stats.misses += 1;
        if self.server.names.len() >= self.capacity.max(1) {
            if let Some(old) = self.server.names.pop_front() {
                self.server.stats.evictions += 1;
                out.send.push(messages::close_statement(&old));
                out.expect.push(Pending::Server {
                    ends: Ends::Extended(b"3"),
                    swallow: true,
                    prepares: None,
                });
            }
        }
        out.send.push(s.parse.clone());
        out.expect.push(Pending::Server {
            ends: Ends::Extended(b"1"),
            swallow: true,
            prepares: Some(Prepared {
                server_name: s.server_name.clone(),
                client_name: client_name.map(<[u8]>::to_vec),
            }),
        });
        self.server.names.push_back(s.server_name.clone());
    }

    fn parse(&mut self, body: &[u8], whole: &Bytes, out: &mut Rewritten) -> bool {
        let Some((name, rest)) = cstr(body) else {
            return false;
        };
        let Some((query, _)) = cstr(rest) else {
            return false;
        };
        if name.is_empty() {
            return self.parse_unnamed(query, whole.clone(), out);
        }
        let mut s = Statement::new(query, rest, self.reading);
        s.classified = self.classify(query);
        let s = Arc::new(s);
        self.client.keep(name.to_vec(), s.clone());
        self.ensure(&s, Some(name), out);
        // The client asked for a Parse: it gets its ParseComplete, whoever prepared it.
        out.expect
            .push(Pending::Own(Bytes::from_static(&PARSE_COMPLETE)));
        true
    }

    fn bind(&mut self, body: &[u8], out: &mut Rewritten) -> bool {
        let Some((portal, rest)) = cstr(body) else {
            return false;
        };
        let Some((name, params)) = cstr(rest) else {
            return false;
        };
        if !self.bind_names(portal, name, params.len(), out) {
            return false;
        }
        // One message: the renamed start, then the parameters.
        let head = out.send.pop().unwrap_or_default();
        let mut b = BytesMut::with_capacity(head.len() + params.len());
        b.extend_from_slice(&head);
        b.extend_from_slice(params);
        out.send.push(b.freeze());
        true
    }

    /// A Bind of `portal` to the statement `name`, followed by `params` bytes of parameters
    /// and result formats: whether it is renamed. If so, `out` ends with the renamed
    /// Bind's start, and the parameters are to follow it as they came.
    fn bind_names(
        &mut self,
        portal: &[u8],
        name: &[u8],
        params: usize,
        out: &mut Rewritten,
    ) -> bool {
        if name.is_empty() {
            if let Some(s) = self.ensure_unnamed(out) {
                self.seen.add(&s.classified);
            }
            return false;
        }
        let Some(s) = self.named(name) else {
            // Not one the client prepared through patroxy (an SQL PREPARE's, or a name read
            // from the server): what running it does is not known.
            self.seen.effects |= Effects::UNKNOWN;
            return false;
        };
        self.seen.add(&s.classified);
        self.ensure(&s, None, out);
        let len = 4 + portal.len() + 1 + s.server_name.len() + 1 + params;
        let mut b = BytesMut::with_capacity(HEADER_LEN + portal.len() + s.server_name.len() + 2);
        b.put_u8(codes::BIND);
        b.put_u32(len as u32);
        b.extend_from_slice(portal);
        b.put_u8(0);
        b.extend_from_slice(s.server_name.as_bytes());
        b.put_u8(0);
        out.send.push(b.freeze());
        out.expect.push(Pending::Server {
            ends: Ends::Extended(b"2"),
            swallow: false,
            prepares: None,
        });
        true
    }

    fn describe(&mut self, body: &[u8], out: &mut Rewritten) -> bool {
        let Some((&b'S', rest)) = body.split_first() else {
            return false;
        };
        let Some((name, _)) = cstr(rest) else {
            return false;
        };
        if name.is_empty() {
            self.ensure_unnamed(out);
            return false;
        }
        let Some(s) = self.named(name) else {
            return false;
        };
        self.ensure(&s, None, out);
        let mut b = vec![b'S'];
        b.extend_from_slice(s.server_name.as_bytes());
        b.push(0);
        out.send.push(frame(codes::DESCRIBE, &b));
        out.expect.push(Pending::Server {
            ends: Ends::Extended(b"nT"),
            swallow: false,
            prepares: None,
        });
        true
    }

    fn close(&mut self, body: &[u8], out: &mut Rewritten) -> bool {
        let Some((&b'S', rest)) = body.split_first() else {
            return false;
        };
        let Some((name, _)) = cstr(rest) else {
            return false;
        };
        if name.is_empty() {
            self.client.unnamed = None;
            self.server.unnamed = None;
            return false;
        }
        // The server keeps it for whoever needs it next; the client's name is gone.
        self.client.let_go(name);
        out.expect
            .push(Pending::Own(Bytes::from_static(&CLOSE_COMPLETE)));
        true
    }
}

/// The answers still expected, in order, and what becomes of each server message.
#[derive(Debug, Default)]
pub struct Responses {
    queue: VecDeque<Pending>,
    /// Parses the server refused or skipped, not yet taken.
    failed: Vec<Prepared>,
    /// A `DISCARD ALL` or `DEALLOCATE ALL` completed, not yet taken.
    all_dropped: bool,
    /// The server is in COPY FROM STDIN (it sent CopyInResponse, not yet the command's
    /// end): it ignores the Syncs it reads meanwhile.
    copy_in: bool,
}

/// What to do with one server message.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    Pass,
    Swallow,
}

impl Responses {
    pub fn extend(&mut self, expect: impl IntoIterator<Item = Pending>) {
        self.queue.extend(expect);
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// patroxy's own answers are next in line: they can go without a server message.
    pub fn own_due(&self) -> bool {
        matches!(self.queue.front(), Some(Pending::Own(_)))
    }

    /// patroxy's own answers now due (everything before them has passed).
    pub fn due(&mut self) -> Vec<Bytes> {
        let mut out = Vec::new();
        while let Some(Pending::Own(b)) = self.queue.front() {
            out.push(b.clone());
            self.queue.pop_front();
        }
        out
    }

    /// The Parses that failed since the last call.
    pub fn take_failed(&mut self) -> Vec<Prepared> {
        std::mem::take(&mut self.failed)
    }

    /// Notes a CommandComplete: `DISCARD ALL` and `DEALLOCATE ALL` drop every statement.
    pub fn completed(&mut self, body: &[u8]) {
        let tag = body.strip_suffix(&[0]).unwrap_or(body);
        if tag == b"DISCARD ALL" || tag == b"DEALLOCATE ALL" {
            self.all_dropped = true;
        }
    }

    /// Whether every statement was dropped since the last call.
    pub fn take_all_dropped(&mut self) -> bool {
        std::mem::take(&mut self.all_dropped)
    }

    /// The client ended a COPY FROM STDIN (CopyDone, CopyFail): the Syncs it sent during
    /// the COPY were ignored.
    pub fn copy_ended(&mut self) {
        if std::mem::take(&mut self.copy_in) {
            self.syncs_ignored();
        }
    }

    /// The server is in COPY FROM STDIN, where it ignores Syncs: those it read since the
    /// COPY began (libpq sends one with the Execute) will never be answered.
    fn syncs_ignored(&mut self) {
        let ignored = |p: &Pending| {
            matches!(
                p,
                Pending::Server {
                    ends: Ends::Ready,
                    ..
                }
            )
        };
        // The message being answered (the COPY's) stays; what the Syncs since expected
        // goes.
        let mut i = 0;
        self.queue.retain(|p| {
            i += 1;
            i == 1 || !ignored(p)
        });
    }

    /// Routes one server message by its tag.
    pub fn route(&mut self, tag: u8) -> Route {
        match tag {
            codes::COPY_IN_RESPONSE => {
                self.copy_in = true;
                self.syncs_ignored();
            }
            codes::COMMAND_COMPLETE | codes::ERROR_RESPONSE | codes::READY_FOR_QUERY => {
                self.copy_in = false
            }
            _ => {}
        }
        // Notices, parameter changes and notifications come at any time.
        if matches!(tag, b'N' | b'S' | b'A') {
            return Route::Pass;
        }
        let Some(Pending::Server { ends, swallow, .. }) = self.queue.front().cloned() else {
            return Route::Pass;
        };
        match (ends, tag) {
            // An error ends the message; in the extended protocol the server then skips
            // everything up to the next Sync, and so do the answers expected for them.
            (Ends::Extended(_), codes::ERROR_RESPONSE) => {
                self.skip_to_sync();
                Route::Pass
            }
            (Ends::Extended(set), t) if set.contains(&t) => {
                self.queue.pop_front();
                if swallow {
                    Route::Swallow
                } else {
                    Route::Pass
                }
            }
            (Ends::Ready, codes::READY_FOR_QUERY) => {
                self.queue.pop_front();
                Route::Pass
            }
            _ => Route::Pass,
        }
    }

    /// After an error: the failed message and everything up to the next Sync is done, and
    /// none of the Parses among them prepared anything.
    fn skip_to_sync(&mut self) {
        while let Some(p) = self.queue.front() {
            if matches!(
                p,
                Pending::Server {
                    ends: Ends::Ready,
                    ..
                }
            ) {
                break;
            }
            if let Some(Pending::Server {
                prepares: Some(prepared),
                ..
            }) = self.queue.pop_front()
            {
                self.failed.push(prepared);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::classify::{Classifier, Seen};

    /// A rewriter for `client` on `server`, which keeps `capacity` statements.
    fn rewriter<'a>(
        client: &'a mut ClientStatements,
        server: &'a mut ServerStatements,
        capacity: usize,
        reading: Reading<'a>,
        seen: &'a mut Seen,
    ) -> Rewriter<'a> {
        Rewriter {
            client,
            server,
            capacity,
            memory: 1 << 26,
            settings_held: 0,
            reading,
            seen,
            unsynced: false,
            in_failed_transaction: false,
        }
    }

    fn parse(name: &str, query: &str) -> (Vec<u8>, Bytes) {
        let mut b = Vec::new();
        b.extend_from_slice(name.as_bytes());
        b.push(0);
        b.extend_from_slice(query.as_bytes());
        b.extend_from_slice(&[0, 0, 0]);
        let whole = frame(codes::PARSE, &b);
        (b, whole)
    }

    fn bind(stmt: &str) -> (Vec<u8>, Bytes) {
        let mut b = vec![0];
        b.extend_from_slice(stmt.as_bytes());
        b.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0]);
        let whole = frame(codes::BIND, &b);
        (b, whole)
    }

    #[test]
    fn a_named_statement_is_prepared_once_per_connection_and_rebound_anywhere() {
        let (classifier, naming, mut seen) =
            (Classifier::default(), Naming::default(), Seen::default());
        let mut client = ClientStatements::default();
        let (mut conn1, mut conn2) = (ServerStatements::default(), ServerStatements::default());
        let mut rw = rewriter(
            &mut client,
            &mut conn1,
            10,
            Reading::plain(&naming, &classifier),
            &mut seen,
        );
        let (b, w) = parse("s1", "SELECT 1");
        let out = rw.rewrite(codes::PARSE, &b, w);
        assert_eq!(out.send.len(), 1, "prepared under its server name");
        assert!(out.send[0].windows(8).any(|w| w == b"patroxy_"));
        assert!(matches!(
            &out.expect[0],
            Pending::Server {
                ends: Ends::Extended(b"1"),
                swallow: true,
                prepares: Some(Prepared { client_name: Some(n), .. }),
            } if n == b"s1"
        ));
        assert_eq!(
            out.expect[1],
            Pending::Own(Bytes::from_static(&PARSE_COMPLETE))
        );
        // The same client, another connection: the Bind brings its Parse along.
        let mut rw = rewriter(
            &mut client,
            &mut conn2,
            10,
            Reading::plain(&naming, &classifier),
            &mut seen,
        );
        let (b, w) = bind("s1");
        let out = rw.rewrite(codes::BIND, &b, w);
        assert_eq!(out.send.len(), 2);
        assert_eq!(out.send[0][0], codes::PARSE);
        assert_eq!(out.send[1][0], codes::BIND);
        // A second Bind there: nothing more to prepare.
        let (b, w) = bind("s1");
        assert_eq!(rw.rewrite(codes::BIND, &b, w).send.len(), 1);
        // An unknown name and the unnamed statement pass untouched.
        for stmt in ["nope", ""] {
            let (b, w) = bind(stmt);
            let out = rw.rewrite(codes::BIND, &b, w.clone());
            assert_eq!(out.send, vec![w]);
        }
    }

    #[test]
    fn a_parse_the_server_refused_leaves_nothing_prepared_for_the_next_client() {
        let (classifier, naming, mut seen) =
            (Classifier::default(), Naming::default(), Seen::default());
        let (mut a, mut b) = (ClientStatements::default(), ClientStatements::default());
        let mut conn = ServerStatements::default();
        let mut responses = Responses::default();
        let mut rw = rewriter(
            &mut a,
            &mut conn,
            10,
            Reading::plain(&naming, &classifier),
            &mut seen,
        );
        // A's Parse and a Bind of another statement in one batch; the server refuses the
        // Parse (its table does not exist yet) and skips the rest up to the Sync.
        let (p, w) = parse("s1", "SELECT * FROM later");
        responses.extend(rw.rewrite(codes::PARSE, &p, w).expect);
        let (p2, w2) = parse("s2", "SELECT 2");
        responses.extend(rw.rewrite(codes::PARSE, &p2, w2).expect);
        responses.extend(
            rw.rewrite(codes::SYNC, &[], Bytes::from_static(b"S\0\0\0\x04"))
                .expect,
        );
        assert_eq!(responses.route(b'E'), Route::Pass);
        assert_eq!(responses.route(b'Z'), Route::Pass);
        let failed = responses.take_failed();
        assert_eq!(failed.len(), 2, "the refused Parse and the skipped one");
        rw.forget(&failed);
        assert!(
            rw.server.is_empty(),
            "nothing is prepared on the connection"
        );
        assert!(
            rw.client.by_name.is_empty(),
            "as direct, the client has no s1"
        );
        // B, later, on the same connection: its Parse goes to the server.
        let mut seen = Seen::default();
        let mut rw = rewriter(
            &mut b,
            &mut conn,
            10,
            Reading::plain(&naming, &classifier),
            &mut seen,
        );
        let (p, w) = parse("b1", "SELECT * FROM later");
        let out = rw.rewrite(codes::PARSE, &p, w);
        assert_eq!(out.send.len(), 1, "prepared again, not taken for prepared");
        assert_eq!(out.send[0][0], codes::PARSE);
    }

    #[test]
    fn discard_all_and_deallocate_keep_the_caches_in_step_with_the_server() {
        let (classifier, naming, mut seen) =
            (Classifier::default(), Naming::default(), Seen::default());
        let mut client = ClientStatements::default();
        let mut conn = ServerStatements::default();
        let mut rw = rewriter(
            &mut client,
            &mut conn,
            10,
            Reading::plain(&naming, &classifier),
            &mut seen,
        );
        let (p, w) = parse("s1", "SELECT 1");
        rw.rewrite(codes::PARSE, &p, w);
        let (p, w) = parse("s2", "SELECT 2");
        rw.rewrite(codes::PARSE, &p, w);
        rw.rewrite(
            codes::SYNC,
            &[],
            Bytes::from_static(&[codes::SYNC, 0, 0, 0, 4]),
        );
        // DEALLOCATE of one of the client's statements: answered by patroxy, the server
        // sent only a Sync.
        let q = b"DEALLOCATE s1\0";
        let out = rw.rewrite(codes::QUERY, q, frame(codes::QUERY, q));
        assert_eq!(
            out.send,
            vec![Bytes::from_static(&[codes::SYNC, 0, 0, 0, 4])]
        );
        assert_eq!(
            out.expect[0],
            Pending::Own(Bytes::from_static(COMMAND_COMPLETE_DEALLOCATE))
        );
        assert!(!rw.client.by_name.contains_key(&b"s1"[..]));
        assert_eq!(
            rw.server.len(),
            2,
            "the server's statements are shared; they stay"
        );
        // DISCARD ALL: once the server says it completed, both caches are empty too.
        let q = b"DISCARD ALL\0";
        let out = rw.rewrite(codes::QUERY, q, frame(codes::QUERY, q));
        assert_eq!(out.send.len(), 1, "DISCARD ALL itself goes to the server");
        assert_eq!(
            rw.server.len(),
            2,
            "nothing is dropped before the server says so"
        );
        let mut r = Responses::default();
        r.completed(b"DISCARD ALL\0");
        assert!(r.take_all_dropped());
        rw.all_dropped();
        assert!(rw.server.is_empty() && rw.client.by_name.is_empty());
        assert!(rw
            .seen
            .effects
            .contains(crate::protocol::classify::Effects::SETTINGS));
    }

    #[test]
    fn a_full_connection_closes_its_least_recently_used_statement() {
        let (classifier, naming, mut seen) =
            (Classifier::default(), Naming::default(), Seen::default());
        let mut client = ClientStatements::default();
        let mut conn = ServerStatements::default();
        let mut rw = rewriter(
            &mut client,
            &mut conn,
            2,
            Reading::plain(&naming, &classifier),
            &mut seen,
        );
        for (name, q) in [("a", "SELECT 1"), ("b", "SELECT 2"), ("c", "SELECT 3")] {
            let (b, w) = parse(name, q);
            rw.rewrite(codes::PARSE, &b, w);
        }
        assert_eq!(rw.server.len(), 2);
        let (b, w) = bind("a");
        let out = rw.rewrite(codes::BIND, &b, w);
        assert_eq!(out.send[0][0], codes::CLOSE, "b's evicted");
        assert_eq!(out.send[1][0], codes::PARSE);
        let (b, w) = bind("a");
        rw.rewrite(codes::BIND, &b, w);
        let (hits, misses, evictions) = (1, 4, 2);
        let counted = CacheStats {
            hits,
            misses,
            evictions,
        };
        assert_eq!(conn.stats - CacheStats::default(), counted);
    }

    #[test]
    fn answers_pass_swallow_or_come_from_patroxy_in_order() {
        let mut r = Responses::default();
        r.extend([
            Pending::Server {
                ends: Ends::Extended(b"1"),
                swallow: true,
                prepares: None,
            },
            Pending::Own(Bytes::from_static(&PARSE_COMPLETE)),
            Pending::Server {
                ends: Ends::Extended(b"2"),
                swallow: false,
                prepares: None,
            },
            Pending::Server {
                ends: Ends::Extended(b"CIs"),
                swallow: false,
                prepares: None,
            },
            Pending::Server {
                ends: Ends::Ready,
                swallow: false,
                prepares: None,
            },
        ]);
        assert!(r.due().is_empty());
        assert_eq!(r.route(b'1'), Route::Swallow);
        assert_eq!(r.due().len(), 1, "the client's ParseComplete, in its place");
        assert_eq!(r.route(b'2'), Route::Pass);
        assert_eq!(r.route(b'D'), Route::Pass);
        assert_eq!(r.route(b'N'), Route::Pass);
        assert_eq!(r.route(b'C'), Route::Pass);
        assert_eq!(r.route(b'Z'), Route::Pass);
        assert!(r.is_empty());
    }

    #[test]
    fn an_error_skips_to_the_sync_with_everything_before_it() {
        let mut r = Responses::default();
        r.extend([
            Pending::Server {
                ends: Ends::Extended(b"1"),
                swallow: true,
                prepares: None,
            },
            Pending::Own(Bytes::from_static(&PARSE_COMPLETE)),
            Pending::Server {
                ends: Ends::Extended(b"2"),
                swallow: false,
                prepares: None,
            },
            Pending::Server {
                ends: Ends::Ready,
                swallow: false,
                prepares: None,
            },
        ]);
        // The quiet Parse failed (the table is gone, say): the client sees the error.
        assert_eq!(r.route(b'E'), Route::Pass);
        assert!(
            r.due().is_empty(),
            "no ParseComplete for a Parse that failed"
        );
        assert_eq!(r.route(b'Z'), Route::Pass);
        assert!(r.is_empty());
    }

    #[test]
    fn a_prepare_only_batch_is_answered_without_a_server() {
        let (classifier, naming) = (Classifier::default(), Naming::default());
        let mut client = ClientStatements::default();
        let (_, p) = parse("s1", "SELECT 1");
        let mut batch = p.to_vec();
        batch.extend_from_slice(&[codes::SYNC, 0, 0, 0, 4]);
        let reply = client
            .answer_locally(&batch, Reading::plain(&naming, &classifier))
            .unwrap();
        assert_eq!(&reply[..], &[b'1', 0, 0, 0, 4, b'Z', 0, 0, 0, 5, b'I']);
        assert!(client.by_name.contains_key(&b"s1"[..]));
        // Anything else, or no Sync at the end, goes to a server.
        let (_, b) = bind("s1");
        let mut other = b.to_vec();
        other.extend_from_slice(&[codes::SYNC, 0, 0, 0, 4]);
        assert!(client
            .answer_locally(&other, Reading::plain(&naming, &classifier))
            .is_none());
        assert!(client
            .answer_locally(&p, Reading::plain(&naming, &classifier))
            .is_none());
        assert!(client
            .answer_locally(
                &batch[..batch.len() - 1],
                Reading::plain(&naming, &classifier)
            )
            .is_none());
    }

    #[test]
    fn syncs_the_server_ignores_during_copy_from_stdin_expect_nothing() {
        let server = |ends| Pending::Server {
            ends,
            swallow: false,
            prepares: None,
        };
        let mut r = Responses::default();
        r.extend([
            server(Ends::Extended(b"2")),
            server(Ends::Extended(b"CIs")),
            server(Ends::Ready),
        ]);
        assert_eq!(r.route(b'2'), Route::Pass);
        assert_eq!(r.route(codes::COPY_IN_RESPONSE), Route::Pass);
        r.copy_ended();
        r.extend([server(Ends::Ready)]);
        assert_eq!(r.route(codes::COMMAND_COMPLETE), Route::Pass);
        assert_eq!(r.route(codes::READY_FOR_QUERY), Route::Pass);
        assert!(r.is_empty(), "one ReadyForQuery for the two Syncs");
        // Outside a COPY, a CopyDone changes nothing.
        r.extend([server(Ends::Ready)]);
        r.copy_ended();
        assert!(!r.is_empty());
    }

    #[test]
    fn the_unnamed_statement_follows_its_client_and_no_other_is_bound() {
        let (classifier, naming, mut seen) =
            (Classifier::default(), Naming::default(), Seen::default());
        let (mut a, mut b) = (ClientStatements::default(), ClientStatements::default());
        let mut conn = ServerStatements::default();
        let mut rw = |client: &mut ClientStatements,
                      seen: &mut Seen,
                      tag,
                      (body, whole): (Vec<u8>, Bytes)| {
            rewriter(
                client,
                &mut conn,
                10,
                Reading::plain(&naming, &classifier),
                seen,
            )
            .rewrite(tag, &body, whole)
        };
        let out = rw(&mut a, &mut seen, codes::PARSE, parse("", "SELECT 1"));
        assert_eq!(out.send.len(), 1);
        let out = rw(&mut b, &mut seen, codes::PARSE, parse("", "SELECT 2"));
        assert_eq!(out.send.len(), 1);
        // A binds: its own Parse goes first, quietly.
        let out = rw(&mut a, &mut seen, codes::BIND, bind(""));
        assert_eq!(out.send.len(), 2);
        assert!(out.send[0].windows(8).any(|w| w == b"SELECT 1"));
        assert!(matches!(
            out.expect[0],
            Pending::Server { swallow: true, .. }
        ));
        let out = rw(&mut a, &mut seen, codes::BIND, bind(""));
        assert_eq!(out.send.len(), 1, "the connection has A's now");
        // C has none: the connection's is closed first, and the server says so.
        let mut c = ClientStatements::default();
        let out = rw(&mut c, &mut seen, codes::BIND, bind(""));
        assert_eq!(out.send.len(), 2);
        assert_eq!(out.send[0][0], codes::CLOSE);
        // A name the client never prepared: what it does is not known.
        let mut fresh = Seen::default();
        rw(&mut c, &mut fresh, codes::BIND, bind("patroxy_0123"));
        assert!(fresh.effects.contains(Effects::UNKNOWN));
    }

    #[test]
    fn close_is_answered_by_patroxy_and_forgets_the_name() {
        let (classifier, naming, mut seen) =
            (Classifier::default(), Naming::default(), Seen::default());
        let mut client = ClientStatements::default();
        let mut conn = ServerStatements::default();
        let mut rw = rewriter(
            &mut client,
            &mut conn,
            5,
            Reading::plain(&naming, &classifier),
            &mut seen,
        );
        let (b, w) = parse("s", "SELECT 1");
        rw.rewrite(codes::PARSE, &b, w);
        let close = b"Ss\0";
        let out = rw.rewrite(codes::CLOSE, close, frame(codes::CLOSE, close));
        assert!(out.send.is_empty());
        assert_eq!(
            out.expect,
            vec![Pending::Own(Bytes::from_static(&CLOSE_COMPLETE))]
        );
        let (b, w) = bind("s");
        assert_eq!(
            rw.rewrite(codes::BIND, &b, w.clone()).send,
            vec![w],
            "forgotten: the server refuses it"
        );
    }

    #[test]
    fn a_long_bind_is_renamed_from_its_start_and_its_parameters_follow() {
        let (classifier, naming, mut seen) =
            (Classifier::default(), Naming::default(), Seen::default());
        let (mut client, mut conn) = (ClientStatements::default(), ServerStatements::default());
        let mut rw = rewriter(
            &mut client,
            &mut conn,
            10,
            Reading::plain(&naming, &classifier),
            &mut seen,
        );
        let (b, w) = parse("s1", "SELECT $1");
        rw.rewrite(codes::PARSE, &b, w);
        // 1 MB of parameters after the names; only the start has come.
        let params = 1_000_000;
        let total = HEADER_LEN + 1 + 3 + params;
        let mut head = vec![codes::BIND];
        head.extend_from_slice(&((total - 1) as u32).to_be_bytes());
        assert_eq!(
            rw.rewrite_long(codes::BIND, &[&head[..], b"\0s"].concat(), total),
            None
        );
        head.extend_from_slice(b"\0s1\0\0\0");
        let (out, replaced) = rw.rewrite_long(codes::BIND, &head, total).unwrap();
        assert_eq!(replaced, HEADER_LEN + 4, "the tag, length and names");
        let start = out.send.last().unwrap();
        let renamed = start.len() - HEADER_LEN + params;
        assert_eq!(start[0], codes::BIND);
        assert_eq!(
            &start[1..5],
            &((renamed + 4) as u32).to_be_bytes()[..],
            "its new length"
        );
        assert!(start[6..].starts_with(b"patroxy_"));
        assert!(matches!(
            out.expect[..],
            [Pending::Server {
                ends: Ends::Extended(b"2"),
                ..
            }]
        ));
        // A query too long to read: not known, and it passes as it is.
        let (out, replaced) = rw
            .rewrite_long(codes::QUERY, b"Q\0\x10\0\0SEL", 1 << 20)
            .unwrap();
        assert_eq!((out.send.len(), replaced), (0, 0));
        assert!(rw.seen.effects.contains(Effects::UNKNOWN));
        assert!(matches!(
            out.expect[..],
            [Pending::Server {
                ends: Ends::Ready,
                ..
            }]
        ));
    }

    #[test]
    fn what_a_clients_statements_hold_is_counted_as_they_come_and_go() {
        let (classifier, naming, mut seen) =
            (Classifier::default(), Naming::default(), Seen::default());
        let (mut client, mut conn) = (ClientStatements::default(), ServerStatements::default());
        let mut rw = rewriter(
            &mut client,
            &mut conn,
            10,
            Reading::plain(&naming, &classifier),
            &mut seen,
        );
        assert_eq!(rw.client.held(), 0);
        let (b, w) = parse("s1", &"SELECT 1 -- ".repeat(1000));
        rw.rewrite(codes::PARSE, &b, w);
        let one = rw.client.held();
        assert!(one > 12_000, "{one}");
        // The same name again replaces it; another adds.
        let (b, w) = parse("s1", &"SELECT 1 -- ".repeat(1000));
        rw.rewrite(codes::PARSE, &b, w);
        assert_eq!(rw.client.held(), one);
        let (b, w) = parse("s2", "SELECT 2");
        rw.rewrite(codes::PARSE, &b, w);
        assert!(rw.client.held() > one);
        let mut close = vec![b'S'];
        close.extend_from_slice(b"s1\0");
        let w = frame(codes::CLOSE, &close);
        rw.rewrite(codes::CLOSE, &close, w);
        assert!(rw.client.held() < one);
        rw.all_dropped();
        assert_eq!(rw.client.held(), 0);
    }
}
