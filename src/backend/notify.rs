//! `LISTEN` for transaction-pooled clients, without a server connection each: one
//! listening connection per (listener, database, user), outside the pools, that `LISTEN`s
//! to the union of its clients' channels and fans each notification out, untouched
//! (channel, payload and the sender's pid), to the clients listening on its channel. It
//! follows routing: when the member it listens on is no longer the one the listener routes
//! to (a switchover, a failover), it listens on the next one. It ends with its last client.
//! Each client has a bounded queue; one that lets it fill is let go.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, warn};

use super::checkout::{Lender, Who};
use super::conn::{Login, ServerConn};
use super::session::quote_ident;
use crate::backoff::Backoff;
use crate::discovery::patroni::Endpoint;
use crate::discovery::Topology;
use crate::protocol::codes;
use crate::protocol::frame::split_frame;
use crate::protocol::messages;
use crate::stream::send;

/// Notifications queued for one client that has not taken them; past it, it is let go.
pub const CLIENT_QUEUE: usize = 1024;
/// Server frames on a listening connection are small (a payload is at most 8000 bytes).
const FRAME_LIMIT: usize = 64 * 1024;

/// What a hub's task needs of the listener it serves: how to route and open its
/// connection, the listener's topology, and patroxy's shutdown.
pub trait Route: Send + Sync + 'static {
    fn lender(&self) -> Lender<'_>;
    fn topology(&self) -> watch::Receiver<Arc<Topology>>;
    fn shutdown(&self) -> tokio_util::sync::CancellationToken;
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HubKey {
    pub listener: String,
    pub database: String,
    pub user: String,
}

type Registry = Arc<Mutex<HashMap<HubKey, mpsc::Sender<Command>>>>;

/// Every hub of this instance.
#[derive(Default)]
pub struct Hubs {
    hubs: Registry,
}

impl std::fmt::Debug for Hubs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Hubs({})", lock(&self.hubs).len())
    }
}

/// What a client asks of its hub.
pub enum Command {
    /// Listen on these channels for `client`; `done` once the server listens.
    Listen {
        client: u64,
        channels: Vec<String>,
        queue: mpsc::Sender<Bytes>,
        done: oneshot::Sender<Result<(), String>>,
    },
    /// Stop listening on these channels (every one, when empty) for `client`.
    Unlisten { client: u64, channels: Vec<String> },
}

fn lock(r: &Registry) -> std::sync::MutexGuard<'_, HashMap<HubKey, mpsc::Sender<Command>>> {
    r.lock().unwrap_or_else(|p| p.into_inner())
}

impl Hubs {
    /// Listens on `channels` for `client` through the hub of `key`, which starts (logged
    /// in with `login`) if there is none; resolves once the server listens. Notifications
    /// go to `queue`.
    pub async fn listen(
        &self,
        key: &HubKey,
        route: Arc<dyn Route>,
        login: &Login,
        (client, channels, queue): (u64, Vec<String>, mpsc::Sender<Bytes>),
    ) -> Result<(), String> {
        // A hub that is just ending takes no command: then another starts.
        for _ in 0..2 {
            let (done, answer) = oneshot::channel();
            let listen = Command::Listen {
                client,
                channels: channels.clone(),
                queue: queue.clone(),
                done,
            };
            let sent = match self.hub(key, &route, login, listen) {
                Ok(()) => Ok(()),
                Err((commands, listen)) => commands.send(listen).await.map_err(drop),
            };
            if sent.is_err() {
                continue;
            }
            return answer
                .await
                .unwrap_or_else(|_| Err("the listening connection ended".into()));
        }
        Err("no listening connection could be started".into())
    }

    /// Stops listening on `channels` (every one, when empty) for `client`.
    pub fn unlisten(&self, key: &HubKey, client: u64, channels: Vec<String>) {
        if let Some(commands) = lock(&self.hubs).get(key) {
            // A full queue: the hub finds the client gone when its queue is dropped.
            let _ = commands.try_send(Command::Unlisten { client, channels });
        }
    }

    /// Starts the hub of `key` with `first` as its first command (`Ok`), or gives the
    /// running one's commands back with the command to send it.
    fn hub(
        &self,
        key: &HubKey,
        route: &Arc<dyn Route>,
        login: &Login,
        first: Command,
    ) -> Result<(), (mpsc::Sender<Command>, Command)> {
        let mut hubs = lock(&self.hubs);
        if let Some(c) = hubs.get(key).filter(|c| !c.is_closed()) {
            return Err((c.clone(), first));
        }
        let (tx, rx) = mpsc::channel(256);
        hubs.insert(key.clone(), tx);
        let hub = Hub {
            key: key.clone(),
            route: route.clone(),
            login: login.clone(),
            commands: rx,
            clients: HashMap::new(),
            registry: self.hubs.clone(),
        };
        tokio::spawn(hub.run(first));
        Ok(())
    }

    /// Hubs running now.
    pub fn len(&self) -> usize {
        lock(&self.hubs).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One listening connection and its clients.
struct Hub {
    key: HubKey,
    route: Arc<dyn Route>,
    login: Login,
    commands: mpsc::Receiver<Command>,
    clients: HashMap<u64, Listener>,
    registry: Registry,
}

struct Listener {
    queue: mpsc::Sender<Bytes>,
    channels: BTreeSet<String>,
}

/// Why a listening connection was let go.
enum Lost {
    /// The server closed it, or failed.
    Server(String),
    /// Routing chose another member.
    Moved,
    /// No client is left, or patroxy is stopping.
    Done,
}

/// The answers owed for requests sent on the listening connection: a client's `done`
/// (or nothing, for an UNLISTEN), at the request's ReadyForQuery.
type Owed = VecDeque<Option<oneshot::Sender<Result<(), String>>>>;

impl Hub {
    async fn run(mut self, first: Command) {
        let mut pause = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let shutdown = self.route.shutdown();
        let mut owed = Owed::new();
        self.take(first, &mut owed);
        loop {
            // Commands that came while there was no connection: the clients they add are
            // listened for once there is one.
            while let Ok(c) = self.commands.try_recv() {
                self.take(c, &mut owed);
            }
            if self.clients.is_empty() && owed.is_empty() && self.end() {
                return;
            }
            let connecting = connect(self.route.clone(), self.login.clone(), self.key.clone());
            tokio::pin!(connecting);
            let opened = loop {
                tokio::select! {
                    r = &mut connecting => break r,
                    _ = shutdown.cancelled() => return,
                    // Taken now, answered once connected.
                    Some(c) = self.commands.recv() => self.take(c, &mut owed),
                }
            };
            let (mut conn, endpoint) = match opened {
                Ok(c) => c,
                Err(e) => {
                    warn!(hub = ?self.key, error = %e, "the listening connection could not be opened; trying again");
                    self.fail(&mut owed, &e);
                    tokio::time::sleep(pause.next_pause()).await;
                    continue;
                }
            };
            pause = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
            let lost = self
                .serve(&mut conn, &endpoint, std::mem::take(&mut owed))
                .await;
            match lost {
                Lost::Done => return,
                Lost::Moved => {
                    debug!(hub = ?self.key, server = %endpoint, "routing moved; listening on the next member")
                }
                Lost::Server(e) => {
                    warn!(hub = ?self.key, server = %endpoint, error = %e, "the listening connection was lost; listening again")
                }
            }
        }
    }

    /// Ends the hub if no command is waiting (checked under the registry's lock, so that
    /// no client finds the hub after it ended): false if one is.
    fn end(&mut self) -> bool {
        let mut hubs = lock(&self.registry);
        if !self.commands.is_empty() {
            return false;
        }
        hubs.remove(&self.key);
        self.commands.close();
        true
    }

    /// Takes a client's command; what the server must do for it is sent by `serve`.
    fn take(&mut self, c: Command, owed: &mut Owed) {
        match c {
            Command::Listen {
                client,
                channels,
                queue,
                done,
            } => {
                let l = self.clients.entry(client).or_insert_with(|| Listener {
                    queue: queue.clone(),
                    channels: BTreeSet::new(),
                });
                // The client's queue now (it starts a new one when it leaves the hub, and
                // an Unlisten lost to a full command queue must not keep the old one).
                l.queue = queue;
                l.channels.extend(channels);
                owed.push_back(Some(done));
            }
            Command::Unlisten { client, channels } => {
                if let Some(l) = self.clients.get_mut(&client) {
                    match channels.is_empty() {
                        true => l.channels.clear(),
                        false => channels.iter().for_each(|c| {
                            l.channels.remove(c);
                        }),
                    }
                    if l.channels.is_empty() {
                        self.clients.remove(&client);
                    }
                }
            }
        }
    }

    /// The channels some client listens on.
    fn wanted(&self) -> BTreeSet<String> {
        self.clients
            .values()
            .flat_map(|l| l.channels.iter().cloned())
            .collect()
    }

    fn fail(&self, owed: &mut Owed, why: &str) {
        for done in owed.drain(..).flatten() {
            let _ = done.send(Err(why.to_owned()));
        }
    }

    /// Listens on `conn` and fans notifications out, until it is lost, routing moves, or
    /// no client is left.
    async fn serve(&mut self, conn: &mut ServerConn, endpoint: &Endpoint, mut owed: Owed) -> Lost {
        let shutdown = self.route.shutdown();
        let mut watch = self.route.topology();
        let lender_route = self.route.clone();
        let database = self.key.database.clone();
        let moved = async move {
            lender_route
                .lender()
                .unrouted(&mut watch, &database, endpoint)
                .await
        };
        tokio::pin!(moved);
        let mut listened = BTreeSet::new();
        // What was asked before this connection: all of it, in one request.
        let asked = !owed.is_empty();
        if let Err(e) = self
            .sync_listens(conn, &mut listened, &mut owed, asked)
            .await
        {
            self.fail(&mut owed, &e);
            return Lost::Server(e);
        }
        loop {
            tokio::select! {
                command = self.commands.recv() => {
                    let Some(c) = command else { return Lost::Done };
                    let listening = matches!(c, Command::Listen { .. });
                    self.take(c, &mut owed);
                    if let Err(e) = self.sync_listens(conn, &mut listened, &mut owed, listening).await {
                        self.fail(&mut owed, &e);
                        return Lost::Server(e);
                    }
                }
                read = conn.stream.read_buf(&mut conn.buf) => {
                    match read {
                        Ok(0) | Err(_) => {
                            self.fail(&mut owed, "the listening connection was lost");
                            return Lost::Server("the server closed the connection".into());
                        }
                        Ok(_) => {}
                    }
                    if let Err(e) = self.read_frames(conn, &mut owed) {
                        self.fail(&mut owed, &e);
                        return Lost::Server(e);
                    }
                }
                () = &mut moved => {
                    self.fail(&mut owed, "routing moved");
                    return Lost::Moved;
                }
                _ = shutdown.cancelled() => return Lost::Done,
            }
            if self.clients.is_empty() && owed.is_empty() && self.end() {
                return Lost::Done;
            }
        }
    }

    /// Brings what the server listens on in line with what the clients want: one request
    /// (LISTEN and UNLISTEN statements), answered at its ReadyForQuery. `asked`: a
    /// client waits for this request's answer.
    async fn sync_listens(
        &mut self,
        conn: &mut ServerConn,
        listened: &mut BTreeSet<String>,
        owed: &mut Owed,
        asked: bool,
    ) -> Result<(), String> {
        let wanted = self.wanted();
        let mut sql: Vec<String> = wanted
            .difference(listened)
            .map(|c| format!("LISTEN {}", quote_ident(c)))
            .collect();
        sql.extend(
            listened
                .difference(&wanted)
                .map(|c| format!("UNLISTEN {}", quote_ident(c))),
        );
        if sql.is_empty() && !asked {
            return Ok(());
        }
        // A client waits even when nothing changes: an empty query answers it in its turn,
        // after the requests before it (which may be listening for it).
        let request = match sql.is_empty() {
            true => messages::empty_query(),
            false => messages::query(&sql.join("; ")),
        };
        send(&mut conn.stream, &request)
            .await
            .map_err(|e| e.to_string())?;
        *listened = wanted;
        // The answers owed so far are given at this request's ReadyForQuery.
        owed.push_back(None);
        Ok(())
    }

    /// The frames read: notifications go out; each ReadyForQuery answers the requests
    /// owed up to it. A request the server refused leaves what it listens on unknown (its
    /// statements ran in one implicit transaction, all or none): the connection is let go
    /// and listens again from the start.
    fn read_frames(&mut self, conn: &mut ServerConn, owed: &mut Owed) -> Result<(), String> {
        while let Some(frame) =
            split_frame(&mut conn.buf, FRAME_LIMIT).map_err(|e| e.to_string())?
        {
            match frame.tag {
                NOTIFICATION_RESPONSE => self.fan_out(frame.bytes),
                codes::ERROR_RESPONSE => {
                    let f = messages::error_fields(frame.body()).unwrap_or_default();
                    return Err(format!("{} {}", f.sqlstate, f.message));
                }
                codes::READY_FOR_QUERY => {
                    // Everything owed up to this request's marker is answered.
                    while let Some(done) = owed.pop_front() {
                        let Some(done) = done else { break };
                        let _ = done.send(Ok(()));
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// A notification, to every client listening on its channel, untouched.
    fn fan_out(&mut self, frame: Bytes) {
        let Some(channel) = channel_of(&frame[5..]) else {
            return;
        };
        let mut gone = Vec::new();
        for (id, l) in &self.clients {
            if !l.channels.contains(channel) {
                continue;
            }
            match l.queue.try_send(frame.clone()) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    warn!(hub = ?self.key, client = id, "a client's queue of notifications is full; it is let go");
                    gone.push(*id);
                }
                Err(mpsc::error::TrySendError::Closed(_)) => gone.push(*id),
            }
        }
        for id in gone {
            self.clients.remove(&id);
        }
    }
}

/// Opens the listening connection, on the member the listener routes to.
async fn connect(
    route: Arc<dyn Route>,
    login: Login,
    key: HubKey,
) -> Result<(ServerConn, Endpoint), String> {
    let who = Who {
        login: &login,
        user: &key.user,
        database: &key.database,
    };
    let mut topology = route.topology();
    let lender = route.lender();
    let (conn, target) = lender
        .open_own(who, &[], &mut topology)
        .await
        .map_err(|e| e.to_string())?;
    Ok((conn, target.endpoint))
}

/// The backend NotificationResponse tag.
pub const NOTIFICATION_RESPONSE: u8 = b'A';

/// The channel of a NotificationResponse body: pid, then channel and payload strings.
pub fn channel_of(body: &[u8]) -> Option<&str> {
    let rest = body.get(4..)?;
    let nul = rest.iter().position(|b| *b == 0)?;
    std::str::from_utf8(&rest[..nul]).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_notifications_channel_is_read_from_its_body() {
        let body = b"\0\0\x30\x39news\0hello\0";
        assert_eq!(channel_of(body), Some("news"));
        assert_eq!(channel_of(b"\0\0"), None);
        assert_eq!(channel_of(b"\0\0\0\x01no end"), None);
    }
}
