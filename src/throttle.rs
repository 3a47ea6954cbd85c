//! Rate limits for what a peer may ask before it authenticates (cancel requests): a token
//! bucket per source in a bounded table, and log lines that come at most once per interval
//! and say how many events they stand for.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Sources followed at once; past it, new sources share one bucket.
pub const MAX_SOURCES: usize = 4096;

/// A token bucket per source address (an IPv6 source per /64, what one host usually has).
#[derive(Debug)]
pub struct PerSource {
    per_second: f64,
    burst: f64,
    table: Mutex<Table>,
}

#[derive(Debug, Default)]
struct Table {
    buckets: HashMap<IpAddr, Bucket>,
    /// The bucket of sources that found the table full.
    shared: Option<Bucket>,
    /// When the full table was last swept of sources back to a full bucket: at most once
    /// a second, so that a flood from new sources costs a lookup each, not a sweep.
    swept: Option<Instant>,
}

/// How often a full table may be swept.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(burst: f64, now: Instant) -> Bucket {
        Bucket {
            tokens: burst,
            at: now,
        }
    }

    fn refill(&mut self, per_second: f64, burst: f64, now: Instant) {
        let gained = now.saturating_duration_since(self.at).as_secs_f64() * per_second;
        self.tokens = (self.tokens + gained).min(burst);
        self.at = now;
    }

    fn take(&mut self, per_second: f64, burst: f64, now: Instant) -> bool {
        self.refill(per_second, burst, now);
        let ok = self.tokens >= 1.0;
        if ok {
            self.tokens -= 1.0;
        }
        ok
    }
}

impl PerSource {
    /// `per_second` requests a second from each source, in bursts of twice that; 0 lets
    /// everything through.
    pub fn new(per_second: u32) -> PerSource {
        PerSource {
            per_second: f64::from(per_second),
            burst: f64::from(per_second) * 2.0,
            table: Mutex::new(Table::default()),
        }
    }

    /// Whether `source` may have one more now.
    pub fn allow(&self, source: IpAddr, now: Instant) -> bool {
        if self.per_second == 0.0 {
            return true;
        }
        let (rate, burst) = (self.per_second, self.burst);
        let source = per_host(source);
        let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let due = !t
            .swept
            .is_some_and(|at| now.saturating_duration_since(at) < SWEEP_EVERY);
        if due && t.buckets.len() >= MAX_SOURCES && !t.buckets.contains_key(&source) {
            t.swept = Some(now);
            // Full buckets say nothing a new one would not: they go first.
            t.buckets.retain(|_, b| {
                b.refill(rate, burst, now);
                b.tokens < burst
            });
        }
        if t.buckets.len() < MAX_SOURCES || t.buckets.contains_key(&source) {
            let b = t
                .buckets
                .entry(source)
                .or_insert_with(|| Bucket::full(burst, now));
            return b.take(rate, burst, now);
        }
        t.shared
            .get_or_insert_with(|| Bucket::full(burst, now))
            .take(rate, burst, now)
    }

    #[cfg(test)]
    fn sources(&self) -> usize {
        self.table.lock().unwrap().buckets.len()
    }
}

/// An IPv6 address's /64; an IPv4 address (or one mapped into IPv6) itself.
fn per_host(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let bits = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(bits.into())
            }
        },
        v4 => v4,
    }
}

/// A log line at most once per `period`, with the count of events since the last one.
#[derive(Debug)]
pub struct Every {
    period: Duration,
    state: Mutex<(Option<Instant>, u64)>,
}

impl Every {
    pub const fn new(period: Duration) -> Every {
        Every {
            period,
            state: Mutex::new((None, 0)),
        }
    }

    /// Counts one event; `Some(n)` when a line is due, for the `n` events since the last.
    pub fn due(&self, now: Instant) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.1 += 1;
        if s.0
            .is_some_and(|at| now.saturating_duration_since(at) < self.period)
        {
            return None;
        }
        s.0 = Some(now);
        Some(std::mem::take(&mut s.1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_source_gets_its_rate_and_no_more() {
        let limit = PerSource::new(10);
        let now = Instant::now();
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        let allowed = (0..100).filter(|_| limit.allow(a, now)).count();
        assert_eq!(allowed, 20, "a burst of twice the rate");
        assert!(limit.allow(b, now), "another source is not held back");
        assert!(!limit.allow(a, now));
        let later = now + Duration::from_millis(500);
        let allowed = (0..100).filter(|_| limit.allow(a, later)).count();
        assert_eq!(allowed, 5, "then the rate");
        assert!(PerSource::new(0).allow(a, now), "0: no limit");
    }

    #[test]
    fn many_sources_share_a_bucket_past_the_table() {
        let limit = PerSource::new(1);
        let now = Instant::now();
        for i in 0..MAX_SOURCES as u32 + 500 {
            let ip = IpAddr::V4(std::net::Ipv4Addr::from(0x7f00_0000 + i));
            limit.allow(ip, now);
        }
        assert_eq!(limit.sources(), MAX_SOURCES);
        let ip = IpAddr::V4(std::net::Ipv4Addr::from(0x7f80_0000));
        assert!(!limit.allow(ip, now), "the shared bucket is spent");
        // The table is swept at most once a second: then sources back to a full bucket go,
        // and a new source gets its own.
        let later = now + Duration::from_secs(2);
        assert!(limit.allow(ip, later));
        assert_eq!(limit.sources(), 1);
        // An IPv6 host is one source however many addresses of its /64 it uses.
        let v6 = PerSource::new(1);
        let hits = (0..10u16)
            .filter(|i| v6.allow(format!("::{i:x}:1").parse().unwrap(), now))
            .count();
        assert_eq!(hits, 2);
    }

    #[test]
    fn a_line_per_period_counts_what_it_stands_for() {
        let every = Every::new(Duration::from_secs(10));
        let now = Instant::now();
        assert_eq!(every.due(now), Some(1));
        for _ in 0..99 {
            assert_eq!(every.due(now + Duration::from_secs(1)), None);
        }
        assert_eq!(every.due(now + Duration::from_secs(11)), Some(100));
    }
}
