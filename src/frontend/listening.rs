//! A transaction-pooled client's `LISTEN`s: the channels it listens on, through its
//! listener's hub (`backend/notify.rs`), and the notifications queued for it, which it is
//! given between its transactions, when PostgreSQL would give them.

use std::collections::BTreeSet;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc;

use super::context::{ListenerContext, ProxyContext};
use crate::backend::conn::Login;
use crate::backend::notify::{HubKey, Route, CLIENT_QUEUE};

/// Channels one client may listen on.
pub const MAX_CHANNELS: usize = 1024;

/// What a client listens on, and its queue of notifications. The hub holds the queue's
/// sending end (the client only a weak one): when the hub lets the client go, the queue
/// ends.
pub struct Listening {
    proxy: Arc<ProxyContext>,
    key: HubKey,
    id: u64,
    channels: BTreeSet<String>,
    /// The sending end, until the hub holds it.
    queue: Option<mpsc::Sender<Bytes>>,
    weak: mpsc::WeakSender<Bytes>,
    incoming: mpsc::Receiver<Bytes>,
}

impl Listening {
    pub fn new(ctx: &ListenerContext, database: &str, user: &str, id: u64) -> Listening {
        let (queue, incoming) = mpsc::channel(CLIENT_QUEUE);
        Listening {
            proxy: ctx.proxy.clone(),
            key: HubKey {
                listener: ctx.name.clone(),
                database: database.to_owned(),
                user: user.to_owned(),
            },
            id,
            channels: BTreeSet::new(),
            weak: queue.downgrade(),
            queue: Some(queue),
            incoming,
        }
    }

    pub fn is_listening(&self) -> bool {
        !self.channels.is_empty()
    }

    /// Listens on these channels too, through the hub; once its server connection does.
    pub async fn listen(
        &mut self,
        route: Arc<dyn Route>,
        login: &Login,
        channels: Vec<String>,
    ) -> Result<(), String> {
        if self.channels.len() + channels.len() > MAX_CHANNELS {
            return Err(format!("more than {MAX_CHANNELS} channels"));
        }
        let queue = self.sender();
        let hubs = &self.proxy.hubs;
        let asked = (self.id, channels.clone(), queue);
        match hubs.listen(&self.key, route, login, asked).await {
            Ok(()) => {
                self.channels.extend(channels);
                // The hub holds the queue now.
                self.queue = None;
                Ok(())
            }
            Err(e) => {
                // Nothing half done: the hub forgets these channels for this client.
                hubs.unlisten(&self.key, self.id, channels);
                Err(e)
            }
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

    /// `UNLISTEN` of these channels; `""` is every channel.
    pub fn unlisten(&mut self, channels: &[String]) {
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
            self.proxy.hubs.unlisten(&self.key, self.id, gone);
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
        self.proxy
            .hubs
            .unlisten(&self.key, self.id, channels.to_vec());
    }

    /// The next notification for the client; `None` when its hub let it go while it
    /// listens (its queue was full). Waits forever while it listens on nothing.
    pub async fn next(&mut self) -> Option<Bytes> {
        loop {
            match self.incoming.recv().await {
                Some(n) if self.wants(&n) => return Some(n),
                Some(_) => {}
                None if self.channels.is_empty() => return std::future::pending().await,
                None => return None,
            }
        }
    }

    /// A notification already queued, without waiting.
    pub fn queued(&mut self) -> Option<Bytes> {
        while let Ok(n) = self.incoming.try_recv() {
            if self.wants(&n) {
                return Some(n);
            }
        }
        None
    }

    /// Only the channels the client listens on now: an UNLISTEN the hub has not taken yet
    /// (or lost, its queue full) lets nothing through.
    fn wants(&self, notification: &[u8]) -> bool {
        notification
            .get(5..)
            .and_then(crate::backend::notify::channel_of)
            .is_some_and(|c| self.channels.contains(c))
    }
}

impl Drop for Listening {
    fn drop(&mut self) {
        if !self.channels.is_empty() {
            self.proxy.hubs.unlisten(&self.key, self.id, Vec::new());
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
