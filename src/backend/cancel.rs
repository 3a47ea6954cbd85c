//! Cancel routing. Every client of patroxy gets patroxy's own cancel key, whose pid carries
//! this instance's tag; the registry maps it to the server connection's key. A
//! CancelRequest goes to the server this instance knows the key for. A tagged key it does
//! not know was issued by another instance: it goes to that instance (the peers publish
//! where they take cancels in their routing reports), marked as forwarded, and a forwarded
//! request is never forwarded again. Any other key is nobody's: it goes nowhere (a server
//! ignores a key it did not issue, so sending it on could only cost the cluster forks).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::timeout;

use crate::discovery::patroni::Endpoint;
use crate::protocol::messages;
use crate::protocol::startup::CancelKey;

/// Where each live session's cancel key goes: the server, and the key to send it (the
/// server's own; for a pooled session, the key of the server connection it holds), with the
/// cancels on their way to that server connection.
#[derive(Debug, Clone, Default)]
pub struct CancelRegistry {
    keys: Arc<Mutex<HashMap<CancelKey, Entry>>>,
}

#[derive(Debug)]
enum Entry {
    /// A key handed to a client that holds no server connection yet (`Reserved`).
    Reserved,
    /// An unpooled session's one server connection.
    Fixed(Route),
    /// A pooled client's place, filled by each loan (`ClientSlot`).
    Lent(Arc<Slot>),
}

type Slot = Mutex<Option<Route>>;

#[derive(Debug)]
struct Route {
    server: Endpoint,
    server_key: CancelKey,
    in_flight: Arc<InFlight>,
}

impl Route {
    /// Where a cancel goes, counted as on its way there.
    fn sending(&self) -> (Endpoint, CancelKey, Sending) {
        self.in_flight.count.fetch_add(1, Relaxed);
        let sending = Sending {
            in_flight: self.in_flight.clone(),
            delivered: false,
        };
        (self.server.clone(), self.server_key.clone(), sending)
    }
}

fn lock_slot(slot: &Slot) -> std::sync::MutexGuard<'_, Option<Route>> {
    slot.lock().unwrap_or_else(|p| p.into_inner())
}

/// A pooled client's place in the registry while it is connected. Each loan fills it
/// with its server connection and empties it again (`Lending`) under the client's own
/// lock: a transaction costs the registry nothing until a cancel arrives.
#[derive(Debug)]
pub struct ClientSlot {
    registry: CancelRegistry,
    key: CancelKey,
    slot: Arc<Slot>,
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut keys = self.registry.lock();
        // Only its own entry: a key drawn twice belongs to the later client.
        if matches!(keys.get(&self.key), Some(Entry::Lent(s)) if Arc::ptr_eq(s, &self.slot)) {
            keys.remove(&self.key);
        }
    }
}

impl ClientSlot {
    /// The client's cancels go to `server` with `server_key` until the loan ends.
    pub fn lend(
        &self,
        server: Endpoint,
        server_key: CancelKey,
        in_flight: Arc<InFlight>,
    ) -> Lending<'_> {
        *lock_slot(&self.slot) = Some(Route {
            server,
            server_key,
            in_flight: in_flight.clone(),
        });
        Lending {
            slot: &self.slot,
            in_flight,
            ended: false,
        }
    }
}

/// One loan's cancel route; emptied when the loan ends, on every exit path.
#[derive(Debug)]
pub struct Lending<'a> {
    slot: &'a Slot,
    in_flight: Arc<InFlight>,
    ended: bool,
}

impl Lending<'_> {
    /// As `Registration::end`: the cancels already on their way, to wait for.
    pub fn end(mut self) -> Arc<InFlight> {
        *lock_slot(self.slot) = None;
        self.ended = true;
        self.in_flight.clone()
    }
}

impl Drop for Lending<'_> {
    fn drop(&mut self) {
        if !self.ended {
            *lock_slot(self.slot) = None;
        }
    }
}

/// The cancel requests on their way to one server connection. A connection that one is on
/// its way to is not lent to another client before it has arrived (PgBouncer's
/// `sv_being_canceled`): it would cancel that client's query.
#[derive(Debug, Default)]
pub struct InFlight {
    count: AtomicUsize,
    /// A delivery ended without the server saying it had the request (a timeout): it may
    /// still arrive.
    unconfirmed: AtomicBool,
    done: Notify,
}

impl InFlight {
    /// Waits until no cancel is on its way, up to `limit`; whether the connection is then
    /// safe to lend: every cancel arrived (or none was sent).
    pub async fn settled(&self, limit: Duration) -> bool {
        let waited = timeout(limit, async {
            loop {
                let done = self.done.notified();
                if self.count.load(Relaxed) == 0 {
                    return;
                }
                done.await;
            }
        })
        .await;
        // A client's counter serves its next loans: what it said of this one is taken.
        waited.is_ok() && !self.unconfirmed.swap(false, Relaxed)
    }

    pub fn busy(&self) -> bool {
        self.count.load(Relaxed) > 0 || self.unconfirmed.load(Relaxed)
    }
}

/// A cancel on its way to a server connection, until it is dropped; `delivered` says it
/// arrived.
#[derive(Debug)]
pub struct Sending {
    in_flight: Arc<InFlight>,
    delivered: bool,
}

impl Sending {
    pub fn delivered(&mut self) {
        self.delivered = true;
    }
}

impl Drop for Sending {
    fn drop(&mut self) {
        if !self.delivered {
            self.in_flight.unconfirmed.store(true, Relaxed);
        }
        self.in_flight.count.fetch_sub(1, Relaxed);
        self.in_flight.done.notify_waiters();
    }
}

/// A client's key from the moment it is drawn: no other live client can draw it, so a
/// cancel with it can only ever reach this client's server. Released when dropped, unless
/// it became the client's registration or place.
#[derive(Debug)]
pub struct Reserved {
    registry: CancelRegistry,
    key: CancelKey,
    placed: bool,
}

impl Reserved {
    pub fn key(&self) -> &CancelKey {
        &self.key
    }
}

impl Drop for Reserved {
    fn drop(&mut self) {
        if !self.placed {
            let mut keys = self.registry.lock();
            if matches!(keys.get(&self.key), Some(Entry::Reserved)) {
                keys.remove(&self.key);
            }
        }
    }
}

/// Removes an unpooled session's key from the registry when the session ends, on every
/// exit path (a pooled client's place is a `ClientSlot`).
#[derive(Debug)]
pub struct Registration {
    registry: CancelRegistry,
    key: CancelKey,
    in_flight: Arc<InFlight>,
    ended: bool,
}

impl Registration {
    /// Ends the registration: no cancel is sent to this server connection from now on. The
    /// cancels already on their way, if any, to wait for before the connection goes to
    /// anyone else.
    pub fn end(mut self) -> Arc<InFlight> {
        self.registry.lock().remove(&self.key);
        self.ended = true;
        self.in_flight.clone()
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if !self.ended {
            self.registry.lock().remove(&self.key);
        }
    }
}

impl CancelRegistry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<CancelKey, Entry>> {
        // A panic elsewhere while holding the lock leaves a usable map.
        self.keys.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A fresh key of the instance tagged `tag` for a client of protocol 3.`minor`
    /// (`tagged_key_for`), held for it until it registers or drops it.
    pub fn reserve(&self, tag: u16, minor: u16) -> Reserved {
        self.reserve_from(|| tagged_key_for(tag, minor))
    }

    /// A key from `draw`, drawn again while a live client holds it. The keys held are
    /// the live clients, a vanishing part of the 47 random bits of even a 3.0 key, so
    /// a second draw is already rare.
    fn reserve_from(&self, mut draw: impl FnMut() -> CancelKey) -> Reserved {
        let mut keys = self.lock();
        let key = loop {
            let k = draw();
            if !keys.contains_key(&k) {
                break k;
            }
        };
        keys.insert(key.clone(), Entry::Reserved);
        drop(keys);
        Reserved {
            registry: self.clone(),
            key,
            placed: false,
        }
    }

    /// An unpooled session's key cancels on `server` with `server_key`; its cancels on
    /// their way are counted in `in_flight`.
    pub fn register(
        &self,
        mut reserved: Reserved,
        server: Endpoint,
        server_key: CancelKey,
        in_flight: Arc<InFlight>,
    ) -> Registration {
        let entry = Entry::Fixed(Route {
            server,
            server_key,
            in_flight: in_flight.clone(),
        });
        let key = reserved.key.clone();
        reserved.placed = true;
        self.lock().insert(key.clone(), entry);
        Registration {
            registry: self.clone(),
            key,
            in_flight,
            ended: false,
        }
    }

    /// Where `key` cancels, and the cancel counted as on its way there until the returned
    /// guard drops. Counted under the registry's lock (and a pooled client's own): a
    /// registration or loan that ends after this sees it.
    pub fn lookup(&self, key: &CancelKey) -> Option<(Endpoint, CancelKey, Sending)> {
        let keys = self.lock();
        match keys.get(key)? {
            Entry::Reserved => None,
            Entry::Fixed(route) => Some(route.sending()),
            // Under the client's lock too: a loan that ends after this sees the count.
            Entry::Lent(slot) => lock_slot(slot).as_ref().map(Route::sending),
        }
    }

    /// A pooled client's place, for its key, until it leaves.
    pub fn register_client(&self, mut reserved: Reserved) -> ClientSlot {
        let slot = Arc::new(Slot::default());
        let key = reserved.key.clone();
        reserved.placed = true;
        self.lock().insert(key.clone(), Entry::Lent(slot.clone()));
        ClientSlot {
            registry: self.clone(),
            key,
            slot,
        }
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Pids of PostgreSQL backends stay below 2^22 (Linux's largest `pid_max`), so a pid of
/// 2^23 or more is patroxy's: its bits from 15 up are the issuing instance's tag.
const TAG_SHIFT: u32 = 15;
const MIN_TAG: u16 = 1 << (23 - TAG_SHIFT);

/// A random tag for this instance, never one a server pid could carry.
pub fn new_tag() -> u16 {
    let r = u16::from_be_bytes(crate::auth::scram::random());
    MIN_TAG + r % (u16::MAX - MIN_TAG)
}

/// A fresh key for a client of the instance tagged `tag` that speaks protocol 3.`minor`:
/// the tag and random bits in the pid, and a random 4-byte secret (protocol 3.0's); from
/// 3.2 on, whose keys are of any length, a 32-byte secret (as PostgreSQL 18 gives), which
/// no flood can guess.
pub fn tagged_key_for(tag: u16, minor: u16) -> CancelKey {
    let bytes: [u8; 34] = crate::auth::scram::random();
    let low = i32::from(u16::from_be_bytes([bytes[0], bytes[1]])) & ((1 << TAG_SHIFT) - 1);
    let secret = if minor >= 2 { 32 } else { 4 };
    CancelKey {
        pid: (i32::from(tag) << TAG_SHIFT) | low,
        secret: Bytes::copy_from_slice(&bytes[2..2 + secret]),
    }
}

/// The tag of the instance that issued `key`, if a patroxy instance did.
pub fn tag_of(key: &CancelKey) -> Option<u16> {
    let tag = u16::try_from(key.pid >> TAG_SHIFT).ok()?;
    (tag >= MIN_TAG).then_some(tag)
}

/// What a forwarded request's secret ends with: the peer that gets it answers it from its
/// own registry or not at all.
const FORWARDED: &[u8; 8] = b"\0patroxy";

/// The request an instance forwards to the instance that issued `key`.
pub fn forwarded(key: &CancelKey) -> CancelKey {
    let mut secret = bytes::BytesMut::from(&key.secret[..]);
    secret.extend_from_slice(FORWARDED);
    CancelKey {
        pid: key.pid,
        secret: secret.freeze(),
    }
}

/// The key of a request another instance forwarded (`None`: a client's own request).
pub fn unforwarded(key: &CancelKey) -> Option<CancelKey> {
    let secret = key.secret.strip_suffix(FORWARDED)?;
    Some(CancelKey {
        pid: key.pid,
        secret: Bytes::copy_from_slice(secret),
    })
}

/// Sends the cancel request to each target at once. Returns how many servers took it.
pub async fn deliver(key: &CancelKey, targets: Vec<Endpoint>, connect_timeout: Duration) -> usize {
    let packet = messages::cancel_request(key);
    let mut sends = JoinSet::new();
    for ep in targets {
        sends.spawn(send_one(ep, packet.clone(), connect_timeout));
    }
    let mut delivered = 0;
    while let Some(r) = sends.join_next().await {
        if matches!(r, Ok(Ok(()))) {
            delivered += 1;
        }
    }
    delivered
}

async fn send_one(ep: Endpoint, packet: Bytes, connect_timeout: Duration) -> std::io::Result<()> {
    let timed_out = || std::io::Error::from(std::io::ErrorKind::TimedOut);
    let mut s = timeout(
        connect_timeout,
        TcpStream::connect((ep.host.as_ref(), ep.port)),
    )
    .await
    .map_err(|_| timed_out())??;
    s.write_all(&packet).await?;
    // The server closes once it has handled the request; wait for that, as libpq does.
    let mut sink = [0u8; 64];
    timeout(connect_timeout, async {
        while s.read(&mut sink).await? > 0 {}
        Ok::<_, std::io::Error>(())
    })
    .await
    .map_err(|_| timed_out())?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(pid: i32) -> CancelKey {
        CancelKey {
            pid,
            secret: Bytes::from_static(&[1, 2, 3, 4]),
        }
    }

    fn reserved(reg: &CancelRegistry, pid: i32) -> Reserved {
        reg.reserve_from(|| key(pid))
    }

    #[test]
    fn a_key_a_live_client_holds_is_never_drawn_for_another() {
        let reg = CancelRegistry::default();
        let ep1 = Endpoint::parse("127.0.0.1:5001").unwrap();
        let ep2 = Endpoint::parse("127.0.0.1:5002").unwrap();
        let first = reg.register(reserved(&reg, 1), ep1.clone(), key(7), Default::default());
        // The draw comes up with the first client's key, then with another.
        let mut draws = [key(1), key(1), key(2)].into_iter();
        let second = reg.reserve_from(|| draws.next().unwrap());
        assert_eq!(second.key(), &key(2));
        assert!(reg.lookup(&key(2)).is_none(), "reserved: no server yet");
        let second = reg.register(second, ep2.clone(), key(8), Default::default());
        assert_eq!(reg.lookup(&key(1)).unwrap().0, ep1);
        assert_eq!(reg.lookup(&key(2)).unwrap().0, ep2);
        drop(second);
        assert_eq!(
            reg.lookup(&key(1)).unwrap().0,
            ep1,
            "the other's end leaves it"
        );
        drop(first);
        // A reservation never registered is released.
        drop(reserved(&reg, 3));
        assert!(reg.is_empty());
    }

    #[test]
    fn registrations_end_with_their_guard() {
        let reg = CancelRegistry::default();
        let ep = Endpoint::parse("127.0.0.1:5001").unwrap();
        let guard = reg.register(reserved(&reg, 1), ep.clone(), key(7), Default::default());
        let (server, server_key, _) = reg.lookup(&key(1)).unwrap();
        assert_eq!((server, server_key), (ep, key(7)));
        assert!(reg.lookup(&key(2)).is_none());
        drop(guard);
        assert!(reg.is_empty());
    }

    #[tokio::test]
    async fn a_connection_with_a_cancel_on_its_way_waits_for_it() {
        let reg = CancelRegistry::default();
        let ep = Endpoint::parse("127.0.0.1:5001").unwrap();
        let registration = reg.register(reserved(&reg, 1), ep, key(7), Default::default());
        let (_, _, mut sending) = reg.lookup(&key(1)).unwrap();
        let in_flight = registration.end();
        assert!(
            reg.lookup(&key(1)).is_none(),
            "no cancel goes there any more"
        );
        assert!(in_flight.busy());
        let waiting = tokio::spawn({
            let in_flight = in_flight.clone();
            async move { in_flight.settled(Duration::from_secs(5)).await }
        });
        tokio::task::yield_now().await;
        assert!(
            !waiting.is_finished(),
            "held back while the cancel is on its way"
        );
        sending.delivered();
        drop(sending);
        assert!(waiting.await.unwrap(), "lendable once it arrived");
        // A cancel that may not have arrived keeps the connection from being lent.
        let registration = reg.register(
            reserved(&reg, 2),
            Endpoint::parse("127.0.0.1:5001").unwrap(),
            key(8),
            Default::default(),
        );
        drop(reg.lookup(&key(2)).unwrap());
        assert!(!registration.end().settled(Duration::from_millis(10)).await);
    }

    #[tokio::test]
    async fn a_pooled_client_cancels_only_during_a_loan_and_leaves_no_entry() {
        let reg = CancelRegistry::default();
        let ep = Endpoint::parse("127.0.0.1:5001").unwrap();
        let client = reg.register_client(reserved(&reg, 1));
        assert!(reg.lookup(&key(1)).is_none(), "between loans: nowhere");
        let loan = client.lend(ep.clone(), key(7), Default::default());
        let (server, server_key, sending) = reg.lookup(&key(1)).unwrap();
        assert_eq!((server, server_key), (ep.clone(), key(7)));
        let in_flight = loan.end();
        assert!(
            in_flight.busy(),
            "the loan's end sees the cancel on its way"
        );
        assert!(reg.lookup(&key(1)).is_none());
        drop(sending);
        {
            let _dropped = client.lend(ep, key(8), Default::default());
        }
        assert!(
            reg.lookup(&key(1)).is_none(),
            "a loan dropped on any path ends"
        );
        drop(client);
        assert!(reg.is_empty());
    }

    #[test]
    fn pooled_keys_carry_their_instance_and_server_keys_do_not() {
        for _ in 0..1000 {
            let tag = new_tag();
            assert!(tag >= MIN_TAG);
            let k = tagged_key_for(tag, 0);
            assert!(k.pid > 0);
            assert_eq!(tag_of(&k), Some(tag));
            assert_eq!(k.secret.len(), 4);
        }
        // Any pid a Linux server can have (pid_max is at most 2^22).
        for pid in [1, 4_194_304, (1 << 23) - 1] {
            assert_eq!(tag_of(&key(pid)), None, "{pid}");
        }
        assert_eq!(tag_of(&key(-5)), None);
    }

    #[test]
    fn a_forwarded_request_is_known_as_one() {
        let k = tagged_key_for(new_tag(), 0);
        let f = forwarded(&k);
        assert_eq!(f.pid, k.pid);
        assert_eq!(f.secret.len(), 12);
        assert_eq!(unforwarded(&f), Some(k.clone()));
        assert_eq!(unforwarded(&k), None, "a client's own request");
    }
}
