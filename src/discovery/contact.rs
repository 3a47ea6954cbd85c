//! What patroxy knows of its link to a cluster's DCS (etcd, ZooKeeper, or Patroni's REST
//! API): which kind it is, whether it is up (a watch, or fresh answers to polls), which
//! endpoint serves it, and when it last answered. The source writes it; readiness,
//! `/topology`, `/metrics` and the DCS-loss policy read it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::config::Dcs;

#[derive(Debug)]
pub struct DcsContact {
    dcs: Dcs,
    watching: AtomicBool,
    /// Milliseconds from `origin` to the last answer, plus one (0: never).
    last: AtomicU64,
    origin: Instant,
    endpoint: Mutex<Option<String>>,
}

impl Default for DcsContact {
    fn default() -> Self {
        DcsContact::new(Dcs::Etcd)
    }
}

impl DcsContact {
    pub fn new(dcs: Dcs) -> Self {
        DcsContact {
            dcs,
            watching: AtomicBool::new(false),
            last: AtomicU64::new(0),
            origin: Instant::now(),
            endpoint: Mutex::new(None),
        }
    }

    /// Which kind of source this is.
    pub fn dcs(&self) -> Dcs {
        self.dcs
    }

    /// The source answered just now.
    pub fn touch(&self) {
        let ms = self.origin.elapsed().as_millis() as u64 + 1;
        self.last.store(ms, Relaxed);
    }

    /// The watch is up (or a poll was answered) on `endpoint`.
    pub fn watching_on(&self, endpoint: &str) {
        *self.endpoint.lock().unwrap_or_else(|p| p.into_inner()) = Some(endpoint.to_owned());
        self.watching.store(true, Relaxed);
        self.touch();
    }

    /// The watch is down.
    pub fn lost(&self) {
        self.watching.store(false, Relaxed);
    }

    pub fn watching(&self) -> bool {
        self.watching.load(Relaxed)
    }

    /// The endpoint the watch uses, or last used.
    pub fn endpoint(&self) -> Option<String> {
        self.endpoint
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// How long since the source last answered; `None` before its first answer.
    pub fn silent_for(&self) -> Option<Duration> {
        match self.last.load(Relaxed) {
            0 => None,
            ms => Some(
                self.origin
                    .elapsed()
                    .saturating_sub(Duration::from_millis(ms - 1)),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silence_is_counted_from_the_last_answer() {
        let c = DcsContact::default();
        assert_eq!(c.silent_for(), None);
        assert!(!c.watching());
        c.watching_on("http://e1:2379");
        assert!(c.watching());
        assert!(c.silent_for().unwrap() < Duration::from_secs(1));
        assert_eq!(c.endpoint().as_deref(), Some("http://e1:2379"));
        c.lost();
        assert!(!c.watching());
        assert_eq!(c.endpoint().as_deref(), Some("http://e1:2379"));
    }
}
