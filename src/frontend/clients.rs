//! The pooled clients connected now, for the console: who they are, what they are doing and
//! which server connection they hold (`SHOW CLIENTS`, `SHOW SERVERS`), and a way to end them
//! (`KILL`). One entry per client, removed by its guard on every exit path.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use super::bell::{self, Bell};
use crate::discovery::patroni::Endpoint;

/// What a client is doing, in PgBouncer's words.
pub const IDLE: u8 = 0;
pub const ACTIVE: u8 = 1;
pub const WAITING: u8 = 2;

/// One connected client.
#[derive(Debug)]
pub struct Client {
    pub user: String,
    pub database: String,
    pub addr: SocketAddr,
    pub listener: String,
    pub connected_at: SystemTime,
    /// `IDLE`, `ACTIVE` (holds a server connection) or `WAITING` (for one).
    pub state: AtomicU8,
    /// The server connection it holds: where, and the backend's pid.
    pub server: Mutex<Option<(Endpoint, i32)>>,
    /// Why it keeps its server connection between transactions, when it does.
    pub pinned: Mutex<Option<String>>,
    /// Rung by the console's KILL, shutdown, and changes to the topology or rules.
    pub bell: Bell,
}

impl Client {
    pub fn set(&self, state: u8) {
        self.state.store(state, Relaxed);
    }

    pub fn hold(&self, server: Option<(Endpoint, i32)>) {
        *self.server.lock().unwrap_or_else(|p| p.into_inner()) = server;
    }

    pub fn pin(&self, why: Option<String>) {
        *self.pinned.lock().unwrap_or_else(|p| p.into_inner()) = why;
    }

    pub fn pinned(&self) -> Option<String> {
        self.pinned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn server(&self) -> Option<(Endpoint, i32)> {
        self.server
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

#[derive(Debug, Default, Clone)]
pub struct Clients {
    inner: Arc<Mutex<BTreeMap<u64, Arc<Client>>>>,
    next: Arc<AtomicU64>,
    /// Shutdown has been rung: a client listed from now on hears it at once.
    closing: Arc<AtomicBool>,
}

/// Keeps a client listed while it lives.
#[derive(Debug)]
pub struct Listed {
    clients: Clients,
    /// Unique among this instance's clients, for as long as it runs.
    pub id: u64,
    pub client: Arc<Client>,
}

impl Drop for Listed {
    fn drop(&mut self) {
        self.clients.lock().remove(&self.id);
    }
}

impl Clients {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<u64, Arc<Client>>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn add(&self, client: Client) -> Listed {
        let id = self.next.fetch_add(1, Relaxed);
        let client = Arc::new(client);
        let mut all = self.lock();
        all.insert(id, client.clone());
        if self.closing.load(Relaxed) {
            client.bell.ring(bell::SHUTDOWN);
        }
        drop(all);
        Listed {
            clients: self.clone(),
            id,
            client,
        }
    }

    /// Every client, oldest first.
    pub fn all(&self) -> Vec<Arc<Client>> {
        self.lock().values().cloned().collect()
    }

    /// `KILL [db]`: ends the clients of `database` (all with `None`); how many.
    pub fn kill(&self, database: Option<&str>) -> usize {
        let mut n = 0;
        for c in self.lock().values() {
            if database.map_or(true, |d| c.database == d) {
                c.bell.ring(bell::KILLED);
                n += 1;
            }
        }
        n
    }

    /// Rings every client's bell.
    pub fn ring_all(&self, what: u8) {
        let all = self.lock();
        if what & bell::SHUTDOWN != 0 {
            self.closing.store(true, Relaxed);
        }
        for c in all.values() {
            c.bell.ring(what);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(db: &str) -> Client {
        Client {
            user: "u".into(),
            database: db.into(),
            addr: "127.0.0.1:5000".parse().unwrap(),
            listener: "l".into(),
            connected_at: SystemTime::now(),
            state: AtomicU8::new(IDLE),
            server: Mutex::default(),
            pinned: Mutex::default(),
            bell: Bell::default(),
        }
    }

    #[test]
    fn clients_are_listed_while_they_live_and_killed_by_database() {
        let clients = Clients::default();
        let a = clients.add(client("app"));
        let b = clients.add(client("other"));
        assert_eq!(clients.all().len(), 2);
        assert_eq!(clients.kill(Some("app")), 1);
        assert!(a.client.bell.is_rung(bell::KILLED));
        assert!(!b.client.bell.is_rung(bell::KILLED));
        drop(a);
        assert_eq!(clients.all().len(), 1);
        assert_eq!(clients.kill(None), 1);
    }

    #[test]
    fn a_client_listed_after_shutdown_was_rung_hears_it() {
        let clients = Clients::default();
        let before = clients.add(client("app"));
        clients.ring_all(bell::SHUTDOWN | bell::CHANGED);
        let after = clients.add(client("app"));
        assert!(before.client.bell.is_rung(bell::SHUTDOWN | bell::CHANGED));
        assert!(after.client.bell.is_rung(bell::SHUTDOWN));
        assert!(!after.client.bell.is_rung(bell::CHANGED));
    }
}
