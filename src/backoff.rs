//! Exponential backoff with jitter, the one retry pacing of every loop that retries (the etcd
//! watch, the routing report, the accept loop, server connects), so that many patroxy
//! instances, or many waiting clients, do not retry in lockstep after a shared outage.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    step: Duration,
}

impl Backoff {
    pub const fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max,
            step: min,
        }
    }

    /// The pause before the next try: half the current step plus a random part of the other
    /// half ("equal jitter"), so pauses never collapse to zero. The step then doubles, up to
    /// the maximum.
    pub fn next_pause(&mut self) -> Duration {
        let half = self.step / 2;
        let pause = half + half.mul_f64(random_fraction());
        self.step = (self.step * 2).min(self.max);
        pause
    }

    /// After a success: the next failure starts from the minimum again.
    pub fn reset(&mut self) {
        self.step = self.min;
    }
}

/// A number in [0, 1), from the standard library's randomly seeded hasher: plenty for
/// spreading retries, without a random-number crate.
fn random_fraction() -> f64 {
    let bits = RandomState::new().build_hasher().finish() >> 11;
    bits as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_grow_to_the_max_stay_within_their_step_and_reset() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(1));
        let mut b = Backoff::new(min, max);
        let mut step = min;
        for _ in 0..8 {
            let p = b.next_pause();
            assert!(
                p >= step / 2 && p <= step,
                "{p:?} outside [{:?}, {step:?}]",
                step / 2
            );
            step = (step * 2).min(max);
        }
        b.reset();
        assert!(b.next_pause() <= min);
    }

    #[test]
    fn pauses_are_spread() {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..20 {
            let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(1));
            seen.insert(b.next_pause());
        }
        assert!(seen.len() > 10, "jitter should spread pauses: {seen:?}");
    }
}
