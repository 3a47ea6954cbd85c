//! Per-server session counts (for least-connections) and short ejections of servers that just
//! failed a connection. Shared by every listener, since a server's load is all its sessions.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::time::Instant;

use crate::discovery::patroni::Endpoint;

#[derive(Debug, Clone, Default)]
pub struct ServerLoad {
    inner: Arc<Mutex<HashMap<Endpoint, Entry>>>,
}

#[derive(Debug, Default)]
struct Entry {
    sessions: usize,
    ejected_until: Option<Instant>,
}

/// One session's share of a server's load; released on drop, on every exit path.
#[derive(Debug)]
pub struct LoadGuard {
    load: ServerLoad,
    endpoint: Endpoint,
}

impl Drop for LoadGuard {
    fn drop(&mut self) {
        let mut map = self.load.lock();
        if let Some(e) = map.get_mut(&self.endpoint) {
            e.sessions = e.sessions.saturating_sub(1);
            if e.sessions == 0 && e.ejected_until.is_none() {
                map.remove(&self.endpoint);
            }
        }
    }
}

impl ServerLoad {
    fn lock(&self) -> MutexGuard<'_, HashMap<Endpoint, Entry>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts a session against `endpoint` until the guard drops.
    pub fn claim(&self, endpoint: &Endpoint) -> LoadGuard {
        let mut map = self.lock();
        match map.get_mut(endpoint) {
            Some(e) => e.sessions += 1,
            None => {
                let first = Entry {
                    sessions: 1,
                    ejected_until: None,
                };
                map.insert(endpoint.clone(), first);
            }
        }
        drop(map);
        LoadGuard {
            load: self.clone(),
            endpoint: endpoint.clone(),
        }
    }

    pub fn sessions(&self, endpoint: &Endpoint) -> usize {
        self.lock().get(endpoint).map_or(0, |e| e.sessions)
    }

    /// New sessions skip `endpoint` until `until`, unless nothing else is left.
    pub fn eject(&self, endpoint: &Endpoint, until: Instant) {
        self.lock()
            .entry(endpoint.clone())
            .or_default()
            .ejected_until = Some(until);
    }

    pub fn is_ejected(&self, endpoint: &Endpoint, now: Instant) -> bool {
        let mut map = self.lock();
        let Some(e) = map.get_mut(endpoint) else {
            return false;
        };
        match e.ejected_until {
            Some(t) if t > now => true,
            Some(_) => {
                e.ejected_until = None;
                false
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn guards_count_sessions_on_every_exit() {
        let load = ServerLoad::default();
        let ep = Endpoint::parse("127.0.0.1:5001").unwrap();
        let a = load.claim(&ep);
        let b = load.claim(&ep);
        assert_eq!(load.sessions(&ep), 2);
        drop(a);
        let _ = std::panic::catch_unwind(move || {
            let _b = b;
            panic!("a session task panics");
        });
        assert_eq!(load.sessions(&ep), 0);
        assert!(load.inner.lock().unwrap().is_empty());
    }

    #[test]
    fn ejections_expire() {
        let load = ServerLoad::default();
        let ep = Endpoint::parse("127.0.0.1:5001").unwrap();
        let now = Instant::now();
        load.eject(&ep, now + Duration::from_secs(3));
        assert!(load.is_ejected(&ep, now));
        assert!(!load.is_ejected(&ep, now + Duration::from_secs(4)));
        assert!(!load.is_ejected(&ep, now));
    }
}
