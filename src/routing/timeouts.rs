//! PgBouncer's two timeouts inside a pooled client's loan, decided from the relay's
//! progress as sampled at each tick: `query_timeout` (a request waits for its answer too
//! long: no ReadyForQuery while requests are in flight) and `idle_transaction_timeout` (the
//! client sits inside a transaction, sending nothing, too long). Pure: samples in, a
//! verdict out; the relay does the ticking.

use std::time::Duration;

use super::drain::Progress;
use crate::protocol::codes;

/// The limits (zero: off).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub query: Duration,
    pub idle_in_transaction: Duration,
}

/// Which limit a session went over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Over {
    Query,
    IdleInTransaction,
}

impl Over {
    /// The metric label: PgBouncer's name for it.
    pub fn label(self) -> &'static str {
        match self {
            Over::Query => "query_timeout",
            Over::IdleInTransaction => "idle_transaction_timeout",
        }
    }

    /// What the client is told, as PostgreSQL says it for its own timeouts.
    pub fn client_error(self, limit: Duration) -> (&'static str, String) {
        match self {
            Over::Query => (
                codes::QUERY_CANCELED,
                format!("patroxy: terminating connection: a request ran longer than query_timeout ({limit:?}); its server connection was closed"),
            ),
            Over::IdleInTransaction => (
                codes::IDLE_IN_TRANSACTION_TIMEOUT,
                format!("patroxy: terminating connection due to idle-in-transaction timeout (idle_transaction_timeout, {limit:?})"),
            ),
        }
    }
}

/// The clock of one loan: how long the conversation has stood still, as ticks see it.
#[derive(Debug, Default)]
pub struct Watch {
    last: Option<(u64, u64)>,
    still: Duration,
}

impl Limits {
    pub fn any(&self) -> bool {
        !self.query.is_zero() || !self.idle_in_transaction.is_zero()
    }

    /// How often to sample: a quarter of the shorter limit, from 50 ms to 1 s.
    pub fn tick(&self) -> Duration {
        let shortest = [self.query, self.idle_in_transaction]
            .into_iter()
            .filter(|d| !d.is_zero())
            .min()
            .unwrap_or(Duration::from_secs(1));
        (shortest / 4).clamp(Duration::from_millis(50), Duration::from_secs(1))
    }
}

impl Watch {
    /// One sample, `tick` after the last: the progress, the client's bytes so far and the
    /// requests answered so far. A limit gone over, if one is.
    pub fn sample(
        &mut self,
        limits: &Limits,
        p: Progress,
        bytes_up: u64,
        answered: u64,
        tick: Duration,
    ) -> Option<Over> {
        let now = (bytes_up, answered);
        let moved = self.last.replace(now) != Some(now);
        let waiting = p.in_flight > 0 || p.unsynced;
        let idle_in_transaction = !waiting && p.tx_status != codes::TX_IDLE;
        if moved || !(waiting || idle_in_transaction) {
            self.still = Duration::ZERO;
            return None;
        }
        self.still += tick;
        let over = |limit: Duration| !limit.is_zero() && self.still >= limit;
        match (waiting, idle_in_transaction) {
            (true, _) if over(limits.query) => Some(Over::Query),
            (_, true) if over(limits.idle_in_transaction) => Some(Over::IdleInTransaction),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress(tx_status: u8, in_flight: u32) -> Progress {
        Progress {
            tx_status,
            in_flight,
            unsynced: false,
            client_at_boundary: true,
        }
    }

    #[test]
    fn a_request_without_an_answer_goes_over_query_timeout() {
        let limits = Limits {
            query: Duration::from_secs(1),
            ..Limits::default()
        };
        let tick = limits.tick();
        assert_eq!(tick, Duration::from_millis(250));
        let mut w = Watch::default();
        let busy = progress(codes::TX_IDLE, 1);
        // The first sample only sets the clock.
        assert_eq!(w.sample(&limits, busy, 10, 0, tick), None);
        for _ in 0..3 {
            assert_eq!(w.sample(&limits, busy, 10, 0, tick), None);
        }
        assert_eq!(w.sample(&limits, busy, 10, 0, tick), Some(Over::Query));
        // Answers coming in keep it alive; so does being at rest.
        let mut w = Watch::default();
        for answered in 0..20 {
            assert_eq!(w.sample(&limits, busy, 10, answered, tick), None);
        }
        for _ in 0..20 {
            assert_eq!(
                w.sample(&limits, progress(codes::TX_IDLE, 0), 10, 0, tick),
                None
            );
        }
    }

    #[test]
    fn a_client_sitting_in_a_transaction_goes_over_idle_transaction_timeout() {
        let limits = Limits {
            idle_in_transaction: Duration::from_millis(200),
            ..Limits::default()
        };
        let tick = limits.tick();
        assert_eq!(tick, Duration::from_millis(50));
        let mut w = Watch::default();
        let sitting = progress(codes::TX_IN_BLOCK, 0);
        let mut over = None;
        for _ in 0..6 {
            over = over.or(w.sample(&limits, sitting, 5, 1, tick));
        }
        assert_eq!(over, Some(Over::IdleInTransaction));
        // A failed transaction counts too; a query running in it is not idle.
        let mut w = Watch::default();
        for _ in 0..10 {
            let busy = progress(codes::TX_FAILED, 1);
            assert_eq!(
                w.sample(&limits, busy, 5, 1, tick),
                None,
                "query_timeout is off"
            );
        }
        assert!(!Limits::default().any());
    }
}
