//! `Topology`: an immutable snapshot of one Patroni cluster, built from its keys in the DCS.

use std::collections::BTreeMap;

use bytes::Bytes;

use super::patroni::{self, Failover, Member, PatroniError, SyncState};

/// What patroxy knows of one cluster at one moment. Sessions receive it through a
/// `tokio::sync::watch` channel as `Arc<Topology>`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Topology {
    /// Increases by one each time the content changes; 0 before the first read of the DCS.
    pub epoch: u64,
    /// The etcd revision this snapshot reflects.
    pub revision: i64,
    /// The member named by the `leader` key. The member's own `role` may lag behind it by
    /// up to `loop_wait` after a promotion, so the key, not the role, names the primary.
    pub leader: Option<String>,
    pub members: BTreeMap<String, Member>,
    /// The leader's WAL position from `status` (or the old `optime/leader` key).
    pub optime: Option<u64>,
    pub sync: Option<SyncState>,
    pub failover: Option<Failover>,
    pub failsafe: Option<Vec<String>>,
    /// The leader key's ttl, from the cluster's `config` key.
    pub ttl: Option<std::time::Duration>,
    /// A polled source's budget: with no fresh answer for longer than this, the snapshot
    /// counts as unknown. None for watched sources.
    pub stale_after: Option<std::time::Duration>,
}

impl Topology {
    /// Builds a snapshot from the cluster's keys, named relative to `/<namespace>/<scope>/`.
    /// A junk value is skipped and reported; it never fails the whole snapshot.
    pub fn from_keys(keys: &BTreeMap<String, Bytes>) -> (Topology, Vec<PatroniError>) {
        let mut t = Topology::default();
        let mut problems = Vec::new();
        let mut legacy_optime = None;
        for (key, value) in keys {
            match key.as_str() {
                "leader" => t.leader = patroni::parse_leader(value),
                "status" => match patroni::parse_status_optime(value) {
                    Ok(o) => t.optime = o,
                    Err(e) => problems.push(e),
                },
                "optime/leader" => legacy_optime = patroni::parse_legacy_optime(value),
                "sync" => match patroni::parse_sync(value) {
                    Ok(s) => t.sync = Some(s),
                    Err(e) => problems.push(e),
                },
                "failover" => match patroni::parse_failover(value) {
                    Ok(f) => t.failover = f,
                    Err(e) => problems.push(e),
                },
                "failsafe" => match patroni::parse_failsafe(value) {
                    Ok(f) => t.failsafe = Some(f),
                    Err(e) => problems.push(e),
                },
                "config" => match patroni::parse_config_ttl(value) {
                    Ok(ttl) => t.ttl = ttl,
                    Err(e) => problems.push(e),
                },
                k => {
                    if let Some(name) = k.strip_prefix("members/").filter(|n| !n.is_empty()) {
                        match Member::parse(name, value) {
                            Ok(m) => {
                                t.members.insert(name.to_owned(), m);
                            }
                            Err(e) => problems.push(e),
                        }
                    }
                }
            }
        }
        t.optime = t.optime.or(legacy_optime);
        (t, problems)
    }

    pub fn leader_member(&self) -> Option<&Member> {
        self.members.get(self.leader.as_deref()?)
    }

    /// Equal in everything but the epoch and revision.
    pub fn same_content(&self, other: &Topology) -> bool {
        self.leader == other.leader
            && self.members == other.members
            && self.optime == other.optime
            && self.sync == other.sync
            && self.failover == other.failover
            && self.failsafe == other.failsafe
            && self.ttl == other.ttl
            && self.stale_after == other.stale_after
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(pairs: &[(&str, &str)]) -> BTreeMap<String, Bytes> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), Bytes::from(v.to_string())))
            .collect()
    }

    #[test]
    fn builds_a_cluster_and_skips_junk() {
        let (t, problems) = Topology::from_keys(&keys(&[
            ("leader", "n1"),
            (
                "members/n1",
                r#"{"conn_url":"postgres://127.0.0.1:5001/postgres","state":"running","role":"primary"}"#,
            ),
            (
                "members/n2",
                r#"{"conn_url":"postgres://127.0.0.1:5002/postgres","state":"running","role":"replica"}"#,
            ),
            ("members/n3", "garbage"),
            ("status", r#"{"optime":100}"#),
            ("failover", "{}"),
            ("sync", "[]"),
            ("config", r#"{"ttl":10}"#),
            ("initialize", "7300000000000000000"),
        ]));
        assert_eq!(t.leader.as_deref(), Some("n1"));
        assert_eq!(t.members.len(), 2);
        assert_eq!(t.leader_member().unwrap().name, "n1");
        assert_eq!(t.optime, Some(100));
        assert_eq!(t.failover, None);
        assert_eq!(problems.len(), 2, "{problems:?}");
    }

    #[test]
    fn legacy_optime_is_a_fallback() {
        let (t, _) = Topology::from_keys(&keys(&[("optime/leader", "42")]));
        assert_eq!(t.optime, Some(42));
        let (t, _) = Topology::from_keys(&keys(&[
            ("optime/leader", "42"),
            ("status", r#"{"optime":43}"#),
        ]));
        assert_eq!(t.optime, Some(43));
    }

    #[test]
    fn content_comparison_ignores_epoch() {
        let (a, _) = Topology::from_keys(&keys(&[("leader", "n1")]));
        let mut b = a.clone();
        b.epoch = 9;
        b.revision = 99;
        assert!(a.same_content(&b));
        b.leader = None;
        assert!(!a.same_content(&b));
    }
}
