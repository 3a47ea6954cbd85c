//! A pooled client's bell: how what happens outside its streams (shutdown, the console's
//! `KILL`, a new topology or new listener rules) reaches its session. Rung by whoever saw
//! it, listened to by the session's own task only; listening costs no lock another
//! session shares, and nothing to register again per transaction.

use std::future::Future;
use std::sync::atomic::{AtomicU8, Ordering::AcqRel, Ordering::Acquire};
use std::sync::Mutex;
use std::task::{Context, Poll, Waker};

/// patroxy is shutting down. Stays rung.
pub const SHUTDOWN: u8 = 1;
/// The console's `KILL`. Stays rung.
pub const KILLED: u8 = 2;
/// The topology or the listener's rules changed: a lent connection's drain is decided
/// again. Taken by the listener that hears it.
pub const CHANGED: u8 = 4;

#[derive(Debug, Default)]
pub struct Bell {
    rung: AtomicU8,
    /// Who listens. Locked by the session and by a ringer, so never contended between
    /// sessions.
    listener: Mutex<Listener>,
}

/// The session's task, as it last listened, and what it listens for: a ring of anything
/// else is kept without waking it (a change of the topology, for a client between
/// transactions).
#[derive(Debug, Default)]
struct Listener {
    waker: Option<Waker>,
    /// What its waits listen for, since it was last woken (each wait adds its own again
    /// when it is polled after a wake-up).
    interest: u8,
}

impl Bell {
    pub fn ring(&self, what: u8) {
        self.rung.fetch_or(what, AcqRel);
        let mut listener = self.listener.lock().unwrap_or_else(|p| p.into_inner());
        if listener.interest & what == 0 {
            return;
        }
        listener.interest = 0;
        if let Some(w) = &listener.waker {
            w.wake_by_ref();
        }
    }

    /// Whether any of `what` has been rung (without taking it).
    pub fn is_rung(&self, what: u8) -> bool {
        self.rung.load(Acquire) & what != 0
    }

    /// Resolves with those of `what` that were rung.
    pub fn rung(&self, what: u8) -> impl Future<Output = u8> + '_ {
        std::future::poll_fn(move |cx| self.poll_rung(cx, what))
    }

    fn poll_rung(&self, cx: &mut Context<'_>, what: u8) -> Poll<u8> {
        if let Some(got) = self.take(what) {
            return Poll::Ready(got);
        }
        {
            let mut listener = self.listener.lock().unwrap_or_else(|p| p.into_inner());
            listener.interest |= what;
            match &listener.waker {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => listener.waker = Some(cx.waker().clone()),
            }
        }
        // A ring between the first look and the waker's registration is seen here; one
        // after it finds the waker.
        match self.take(what) {
            Some(got) => Poll::Ready(got),
            None => Poll::Pending,
        }
    }

    fn take(&self, what: u8) -> Option<u8> {
        let got = self.rung.load(Acquire) & what;
        if got == 0 {
            return None;
        }
        if got & CHANGED != 0 {
            self.rung.fetch_and(!CHANGED, AcqRel);
        }
        Some(got)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn a_ring_wakes_the_listener_and_only_a_change_is_taken() {
        let bell = Arc::new(Bell::default());
        let ringer = bell.clone();
        let listening = tokio::spawn(async move {
            let got = ringer.rung(KILLED | CHANGED).await;
            (got, ringer.is_rung(CHANGED))
        });
        tokio::task::yield_now().await;
        bell.ring(CHANGED);
        assert_eq!(listening.await.unwrap(), (CHANGED, false));
        bell.ring(KILLED);
        assert_eq!(bell.rung(KILLED | SHUTDOWN).await, KILLED);
        assert!(bell.is_rung(KILLED), "a KILL stays rung");
        assert!(!bell.is_rung(SHUTDOWN));
    }

    #[test]
    fn a_ring_nobody_listens_for_wakes_nobody() {
        use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
        use std::task::Wake;
        #[derive(Default)]
        struct Count(AtomicUsize);
        impl Wake for Count {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, SeqCst);
            }
        }
        let count = Arc::new(Count::default());
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        let bell = Bell::default();
        assert!(bell.poll_rung(&mut cx, SHUTDOWN | KILLED).is_pending());
        bell.ring(CHANGED);
        assert_eq!(
            count.0.load(SeqCst),
            0,
            "a change wakes no client between transactions"
        );
        assert!(bell.poll_rung(&mut cx, CHANGED).is_ready(), "but is kept");
        assert!(bell.poll_rung(&mut cx, KILLED).is_pending());
        bell.ring(KILLED);
        assert_eq!(count.0.load(SeqCst), 1);
    }

    #[tokio::test]
    async fn what_is_not_listened_for_does_not_end_the_wait() {
        let bell = Bell::default();
        bell.ring(CHANGED);
        let waited =
            tokio::time::timeout(std::time::Duration::from_millis(20), bell.rung(KILLED)).await;
        assert!(waited.is_err());
        assert!(bell.is_rung(CHANGED), "left for whoever listens for it");
    }
}
