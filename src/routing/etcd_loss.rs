//! The DCS-loss policy: whether a new connection may still go to the last known primary
//! when etcd (or ZooKeeper) has not answered for a while, and whether a polled source's
//! snapshot is too old to route by at all. Pure: the mode, the snapshot and the silence in,
//! a refusal out.

use std::time::Duration;

use crate::config::EtcdLoss;
use crate::discovery::Topology;

/// Patroni's default `ttl`, for a cluster whose `config` key says none.
const DEFAULT_TTL: Duration = Duration::from_secs(30);

/// Why a new connection to the primary is refused, if it is: under `fail-closed`, etcd has
/// been silent for longer than the cluster's `ttl` (the leader key may have expired and
/// another member been promoted without patroxy seeing it), and Patroni's `failsafe` key
/// does not list the leader.
pub fn refusal(mode: EtcdLoss, t: &Topology, silent_for: Option<Duration>) -> Option<String> {
    if mode != EtcdLoss::FailClosed {
        return None;
    }
    let silent = silent_for?;
    let ttl = t.ttl.unwrap_or(DEFAULT_TTL);
    if silent <= ttl {
        return None;
    }
    let leader = t.leader.as_deref()?;
    let failsafe = t
        .failsafe
        .as_ref()
        .is_some_and(|f| f.iter().any(|m| m == leader));
    (!failsafe).then(|| {
        format!(
            "the DCS (etcd or ZooKeeper) has not answered for {:.1} s, longer than the cluster's ttl ({} s): {leader} may no longer hold the leader key (etcd_loss = fail-closed)",
            silent.as_secs_f64(),
            ttl.as_secs()
        )
    })
}

/// Why no new connection is routed by a polled source's snapshot, if it is too old: with no
/// fresh answer from Patroni's REST API for longer than its budget, the cluster is unknown,
/// and routing by the last answer would be a guess. For every role.
pub fn unknown(t: &Topology, silent_for: Option<Duration>) -> Option<String> {
    let budget = t.stale_after?;
    let silent = silent_for.filter(|s| *s > budget)?;
    Some(format!(
        "no fresh answer from Patroni's REST API for {:.1} s (rest.stale_after = {:.1} s): the cluster's state is unknown",
        silent.as_secs_f64(),
        budget.as_secs_f64()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::tests::topology;

    #[test]
    fn fail_closed_refuses_after_the_ttl_unless_failsafe_lists_the_leader() {
        let mut t = topology(Some("a"), &[("a", 5001, "running"), ("b", 5002, "running")]);
        t.ttl = Some(Duration::from_secs(10));
        let s = |secs| Some(Duration::from_secs(secs));
        assert_eq!(refusal(EtcdLoss::LastKnown, &t, s(100)), None);
        assert_eq!(refusal(EtcdLoss::FailClosed, &t, s(5)), None);
        assert_eq!(refusal(EtcdLoss::FailClosed, &t, None), None);
        let why = refusal(EtcdLoss::FailClosed, &t, s(11)).unwrap();
        assert!(why.contains("ttl (10 s)"), "{why}");
        t.failsafe = Some(vec!["b".into()]);
        assert!(refusal(EtcdLoss::FailClosed, &t, s(11)).is_some());
        t.failsafe = Some(vec!["a".into(), "b".into()]);
        assert_eq!(refusal(EtcdLoss::FailClosed, &t, s(11)), None);
        // Without a ttl in the config key, Patroni's default.
        t.ttl = None;
        t.failsafe = None;
        assert_eq!(refusal(EtcdLoss::FailClosed, &t, s(29)), None);
        assert!(refusal(EtcdLoss::FailClosed, &t, s(31)).is_some());
    }

    #[test]
    fn a_polled_snapshot_older_than_its_budget_is_unknown() {
        let mut t = topology(Some("a"), &[("a", 5001, "running")]);
        let ms = |n| Some(Duration::from_millis(n));
        assert_eq!(
            unknown(&t, ms(60_000)),
            None,
            "watched sources have no budget"
        );
        t.stale_after = Some(Duration::from_secs(3));
        assert_eq!(unknown(&t, ms(2_900)), None);
        let why = unknown(&t, ms(3_100)).unwrap();
        assert!(why.contains("REST API for 3.1 s"), "{why}");
        // Before its first answer there is no snapshot from it either (epoch 0 routes nothing).
        assert_eq!(unknown(&t, None), None);
    }
}
