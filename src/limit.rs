//! Connection limits that a reload can change at any time: a count of open connections and
//! a maximum, claimed with one atomic compare-and-swap at accept.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

#[derive(Debug)]
pub struct Limit {
    open: AtomicUsize,
    max: AtomicUsize,
}

impl Limit {
    pub fn new(max: usize) -> Arc<Limit> {
        Arc::new(Limit {
            open: AtomicUsize::new(0),
            max: AtomicUsize::new(max),
        })
    }

    /// A lower maximum refuses new connections until enough old ones have closed.
    pub fn set_max(&self, max: usize) {
        self.max.store(max, Relaxed);
    }

    pub fn max(&self) -> usize {
        self.max.load(Relaxed)
    }

    pub fn open(&self) -> usize {
        self.open.load(Relaxed)
    }

    /// A place, held until the claim drops; `None` when the limit is reached.
    pub fn try_claim(self: &Arc<Self>) -> Option<Claim> {
        let max = self.max();
        self.open
            .fetch_update(Relaxed, Relaxed, |n| (n < max).then_some(n + 1))
            .ok()
            .map(|_| Claim(self.clone()))
    }
}

#[derive(Debug)]
pub struct Claim(Arc<Limit>);

impl Drop for Claim {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_up_to_the_max_and_follow_changes() {
        let l = Limit::new(2);
        let a = l.try_claim().unwrap();
        let _b = l.try_claim().unwrap();
        assert!(l.try_claim().is_none());
        drop(a);
        let _c = l.try_claim().unwrap();
        l.set_max(1);
        assert!(l.try_claim().is_none());
        l.set_max(3);
        assert!(l.try_claim().is_some());
        assert_eq!(l.open(), 2);
    }
}
