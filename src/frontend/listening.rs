//! A transaction-pooled client's `LISTEN`s: the channels it listens on, through its
//! listener's hub (`backend/notify.rs`), and the notifications queued for it, which it is
//! given between its transactions, when PostgreSQL would give them. A client that never
//! listens pays for none of it.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;

use super::context::{ListenerContext, ProxyContext};
use crate::backend::conn::Login;
use crate::backend::notify::{HubKey, Route, CLIENT_QUEUE};

/// Channels one client may listen on.
pub const MAX_CHANNELS: usize = 1024;

/// What a client listens on, and (once it has listened) its queue of notifications.
pub struct Listening {
    id: u64,
    channels: BTreeSet<String>,
    hub: Option<Box<HubSide>>,
}

/// The client's side of its hub. The hub holds the queue's sending end (the client only a
/// weak one): when the hub lets the client go, the queue ends.
struct HubSide {
    proxy: Arc<ProxyContext>,
    key: HubKey,
    /// The sending end, until the hub holds it.
    queue: Option<mpsc::Sender<Bytes>>,
    weak: mpsc::WeakSender<Bytes>,
    incoming: mpsc::Receiver<Bytes>,
}

impl HubSide {
    fn new(ctx: &ListenerContext, database: &str, user: &str) -> HubSide {
        let (queue, incoming) = mpsc::channel(CLIENT_QUEUE);
        HubSide {
            proxy: ctx.proxy.clone(),
            key: HubKey {
                listener: ctx.name.clone(),
                database: database.to_owned(),
                user: user.to_owned(),
            },
            weak: queue.downgrade(),
            queue: Some(queue),
            incoming,
        }
    }

    /// The queue's sending end: the one held, the hub's, or (the hub let go of an old
    /// one) a new queue.
    fn sender(&mut self) -> mpsc::Sender<Bytes> {
        if let Some(q) = self.queue.clone().or_else(|| self.weak.upgrade()) {
            return q;
        }
        let (queue, incoming) = mpsc::channel(CLIENT_QUEUE);
        self.weak = queue.downgrade();
        self.incoming = incoming;
        self.queue = Some(queue.clone());
        queue
    }
}

impl Listening {
    pub fn new(id: u64) -> Listening {
        Listening {
            id,
            channels: BTreeSet::new(),
            hub: None,
        }
    }

    pub fn is_listening(&self) -> bool {
        !self.channels.is_empty()
    }

    /// Listens on these channels too, through the hub of the client's listener, database
    /// and user (`who`); once its server connection does.
    pub async fn listen(
        &mut self,
        ctx: &Arc<ListenerContext>,
        (database, user, login): (&str, &str, &Login),
        channels: Vec<String>,
    ) -> Result<(), String> {
        if self.channels.len() + channels.len() > MAX_CHANNELS {
            return Err(format!("more than {MAX_CHANNELS} channels"));
        }
        let hub = self
            .hub
            .get_or_insert_with(|| Box::new(HubSide::new(ctx, database, user)));
        let queue = hub.sender();
        let route: Arc<dyn Route> = ctx.clone();
        let asked = (self.id, channels.clone(), queue);
        match hub.proxy.hubs.listen(&hub.key, route, login, asked).await {
            Ok(()) => {
                self.channels.extend(channels);
                // The hub holds the queue now.
                hub.queue = None;
                Ok(())
            }
            Err(e) => {
                // Nothing half done: the hub forgets these channels for this client.
                hub.proxy.hubs.unlisten(&hub.key, self.id, channels);
                Err(e)
            }
        }
    }

    /// `UNLISTEN` of these channels; `""` is every channel.
    pub fn unlisten(&mut self, channels: &[String]) {
        let Some(hub) = &self.hub else { return };
        if self.channels.is_empty() || channels.is_empty() {
            return;
        }
        let all = channels.iter().any(String::is_empty);
        let gone: Vec<String> = match all {
            true => std::mem::take(&mut self.channels).into_iter().collect(),
            false => channels
                .iter()
                .filter(|c| self.channels.remove(*c))
                .cloned()
                .collect(),
        };
        if !gone.is_empty() {
            hub.proxy.hubs.unlisten(&hub.key, self.id, gone);
        }
    }

    /// The channels it listens on through the hub.
    pub fn channels(&self) -> Vec<String> {
        self.channels.iter().cloned().collect()
    }

    /// The hub forgets these channels for this client (a listen that was given up on).
    pub fn forget(&mut self, channels: &[String]) {
        for c in channels {
            self.channels.remove(c);
        }
        if let Some(hub) = &self.hub {
            hub.proxy
                .hubs
                .unlisten(&hub.key, self.id, channels.to_vec());
        }
    }

    /// Waits (up to `limit`) for the notification on `seam`, and gives the ones queued
    /// before it; `None` if it does not come (the listening connection was lost).
    pub async fn until(&mut self, seam: &str, limit: Duration) -> Option<Vec<Bytes>> {
        let mut before = Vec::new();
        let wait = async {
            loop {
                let n = self.next().await?;
                if on_channel(&n, seam) {
                    return Some(());
                }
                before.push(n);
            }
        };
        let found = tokio::time::timeout(limit, wait).await.ok().flatten();
        found.map(|()| before)
    }

    /// Leaves the hub (the client listens on its own connection now): what it had queued
    /// for the client, in order; what it sends after this goes to a queue nobody reads
    /// (listening through the hub again starts a new one).
    pub fn leave_hub(&mut self) -> Vec<Bytes> {
        let mut queued = Vec::new();
        while let Some(n) = self.queued() {
            queued.push(n);
        }
        self.unlisten(&[String::new()]);
        self.hub = None;
        queued
    }

    /// The next notification for the client; `None` when its hub let it go while it
    /// listens (its queue was full). Waits forever while it listens on nothing.
    pub async fn next(&mut self) -> Option<Bytes> {
        let Some(hub) = self.hub.as_mut() else {
            return std::future::pending().await;
        };
        loop {
            match hub.incoming.recv().await {
                Some(n) if wanted(&self.channels, &n) => return Some(n),
                Some(_) => {}
                None if self.channels.is_empty() => return std::future::pending().await,
                None => return None,
            }
        }
    }

    /// A notification already queued, without waiting.
    pub fn queued(&mut self) -> Option<Bytes> {
        let hub = self.hub.as_mut()?;
        while let Ok(n) = hub.incoming.try_recv() {
            if wanted(&self.channels, &n) {
                return Some(n);
            }
        }
        None
    }
}

/// Only the channels the client listens on now: an UNLISTEN the hub has not taken yet (or
/// lost, its queue full) lets nothing through.
fn wanted(channels: &BTreeSet<String>, notification: &[u8]) -> bool {
    notification
        .get(5..)
        .and_then(crate::backend::notify::channel_of)
        .is_some_and(|c| channels.contains(c))
}

/// A channel of patroxy's own for one move of a client's listens between the listening
/// connection and its server connection: a notification on it marks the same point in
/// both connections' runs of notifications (PostgreSQL's queue has one order).
pub fn seam_channel() -> String {
    let r = crate::auth::scram::random::<8>();
    format!("patroxy_seam_{:016x}", u64::from_le_bytes(r))
}

/// Whether a NotificationResponse frame is on `channel`.
pub fn on_channel(notification: &[u8], channel: &str) -> bool {
    notification
        .get(5..)
        .and_then(crate::backend::notify::channel_of)
        == Some(channel)
}

impl Drop for Listening {
    fn drop(&mut self) {
        if let Some(hub) = &self.hub {
            if !self.channels.is_empty() {
                hub.proxy.hubs.unlisten(&hub.key, self.id, Vec::new());
            }
        }
    }
}

impl Route for ListenerContext {
    fn lender(&self) -> crate::backend::checkout::Lender<'_> {
        ListenerContext::lender(self)
    }

    fn topology(&self) -> tokio::sync::watch::Receiver<Arc<crate::discovery::Topology>> {
        self.topology.clone()
    }

    fn shutdown(&self) -> tokio_util::sync::CancellationToken {
        self.proxy.shutdown.clone()
    }
}
