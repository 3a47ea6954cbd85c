//! Routing decisions: which members a listener's new sessions may go to, in which order,
//! and whether a live session's member is still eligible (`drain.rs`: when and where a live
//! session must end; `timeouts.rs`: PgBouncer's timeouts inside a pooled loan). Pure, no
//! I/O.

pub mod drain;
pub mod etcd_loss;
pub mod switchover;
pub mod timeouts;

use std::fmt;

use crate::discovery::patroni::{Endpoint, Member, Role};
use crate::discovery::Topology;
pub use crate::policy::{Balance, ListenerRole, Policy};

/// A routing target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub member: String,
    pub endpoint: Endpoint,
    /// The member the leader key names.
    pub is_leader: bool,
}

/// Why no server can take a new session right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unroutable {
    /// Nothing has been read from the DCS yet.
    NotSynced,
    NoLeader,
    LeaderWithoutMember(String),
    LeaderNotRunning {
        name: String,
        state: String,
    },
    LeaderWithoutAddress(String),
    /// No member is eligible for a read role; the reasons, member by member.
    NoEligible {
        role: ListenerRole,
        why: String,
    },
}

impl fmt::Display for Unroutable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unroutable::NotSynced => {
                f.write_str("the cluster state has not been read from its DCS yet")
            }
            Unroutable::NoLeader => f.write_str("the cluster has no leader"),
            Unroutable::LeaderWithoutMember(n) => write!(f, "leader {n} has no member key"),
            Unroutable::LeaderNotRunning { name, state } => {
                write!(f, "leader {name} is not running (state {state:?})")
            }
            Unroutable::LeaderWithoutAddress(n) => write!(f, "leader {n} has no usable conn_url"),
            Unroutable::NoEligible { role, why } if why.is_empty() => {
                write!(
                    f,
                    "no member is eligible for role {role}: the cluster has no replicas"
                )
            }
            Unroutable::NoEligible { role, why } => {
                write!(f, "no member is eligible for role {role}: {why}")
            }
        }
    }
}

/// Why a member takes no sessions of a listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ineligible {
    Removed,
    NotRunning(String),
    NoAddress,
    IsPrimary,
    NotPrimary,
    NoLoadBalance,
    Lagging { lag: u64, max: u64 },
    LagUnknown,
    MissingTag(String),
    ExcludedTag(String),
    NotSync,
}

impl fmt::Display for Ineligible {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ineligible::Removed => f.write_str("its member key is gone"),
            Ineligible::NotRunning(s) => write!(f, "it is not running (state {s:?})"),
            Ineligible::NoAddress => f.write_str("it has no usable conn_url"),
            Ineligible::IsPrimary => f.write_str("it is the primary"),
            Ineligible::NotPrimary => f.write_str("it is not the primary"),
            Ineligible::NoLoadBalance => f.write_str("it is tagged noloadbalance"),
            Ineligible::Lagging { lag, max } => write!(f, "it lags {lag} bytes (max_lag {max})"),
            Ineligible::LagUnknown => f.write_str("its replay position is unknown"),
            Ineligible::MissingTag(t) => write!(f, "it lacks the required tag {t}"),
            Ineligible::ExcludedTag(t) => write!(f, "it carries the excluded tag {t}"),
            Ineligible::NotSync => f.write_str("it is not a synchronous standby"),
        }
    }
}

/// The routable primary: the member the leader key names, if it is running and has an address.
pub fn primary(t: &Topology) -> Result<Target, Unroutable> {
    if t.epoch == 0 {
        return Err(Unroutable::NotSynced);
    }
    let name = t.leader.as_deref().ok_or(Unroutable::NoLeader)?;
    let m: &Member = t
        .members
        .get(name)
        .ok_or_else(|| Unroutable::LeaderWithoutMember(name.to_owned()))?;
    if !m.is_running() {
        return Err(Unroutable::LeaderNotRunning {
            name: name.to_owned(),
            state: m.state.clone(),
        });
    }
    let endpoint = m
        .endpoint
        .clone()
        .ok_or_else(|| Unroutable::LeaderWithoutAddress(name.to_owned()))?;
    Ok(Target {
        member: name.to_owned(),
        endpoint,
        is_leader: true,
    })
}

/// How far a replica's replay position is behind the leader's, in bytes, if both are known
/// (or as the source reported it, for Patroni's REST API).
/// The leader's position comes from `status` (or its member key), refreshed once per
/// `loop_wait`, so this is as coarse as Patroni's own view.
pub fn lag(t: &Topology, m: &Member) -> Option<u64> {
    if m.lag.is_some() {
        return m.lag;
    }
    let reference = t
        .optime
        .or_else(|| t.leader_member().and_then(|l| l.xlog_location))?;
    let position = m.replay_lsn.or(m.xlog_location)?;
    Some(reference.saturating_sub(position))
}

/// The checks a non-leader member must pass to take read sessions.
fn replica_checks(p: &Policy, t: &Topology, m: &Member) -> Result<(), Ineligible> {
    // Writable, or about to be, whatever the leader key says: never a replica.
    if matches!(m.role, Role::Primary | Role::Promoted) {
        return Err(Ineligible::IsPrimary);
    }
    if !m.is_running() {
        return Err(Ineligible::NotRunning(m.state.clone()));
    }
    if m.endpoint.is_none() {
        return Err(Ineligible::NoAddress);
    }
    if m.tags.noloadbalance {
        return Err(Ineligible::NoLoadBalance);
    }
    for (k, v) in &p.require_tags {
        if !m.tags.matches(k, v) {
            return Err(Ineligible::MissingTag(format!("{k}={v}")));
        }
    }
    for (k, v) in &p.exclude_tags {
        if m.tags.matches(k, v) {
            return Err(Ineligible::ExcludedTag(format!("{k}={v}")));
        }
    }
    if let Some(max) = p.max_lag {
        // Without a leader position there is nothing to compare with: no verdict.
        let has_reference = t.optime.is_some()
            || t.leader_member().is_some_and(|l| l.xlog_location.is_some())
            || t.members.values().any(|m| m.lag.is_some());
        if has_reference {
            match lag(t, m) {
                Some(lag) if lag > max => return Err(Ineligible::Lagging { lag, max }),
                Some(_) => {}
                None => return Err(Ineligible::LagUnknown),
            }
        }
    }
    if p.role == ListenerRole::Sync
        && !t
            .sync
            .as_ref()
            .is_some_and(|s| s.standbys.contains(&m.name))
    {
        return Err(Ineligible::NotSync);
    }
    Ok(())
}

/// May member `name` take (or keep) sessions of a listener with policy `p`?
pub fn eligibility(p: &Policy, t: &Topology, name: &str) -> Result<(), Ineligible> {
    let m = t.members.get(name).ok_or(Ineligible::Removed)?;
    let is_primary = primary(t).is_ok_and(|target| target.member == name);
    match p.role {
        ListenerRole::Primary if is_primary => Ok(()),
        ListenerRole::Primary => Err(Ineligible::NotPrimary),
        ListenerRole::Replica | ListenerRole::Sync
            if is_primary || t.leader.as_deref() == Some(name) =>
        {
            Err(Ineligible::IsPrimary)
        }
        ListenerRole::PreferReplica | ListenerRole::Any if is_primary => Ok(()),
        _ => replica_checks(p, t, m),
    }
}

/// The members a new session may go to, before balancing. For `prefer-replica` the primary
/// comes last, as the fallback.
pub fn candidates(p: &Policy, t: &Topology) -> Result<Vec<Target>, Unroutable> {
    if p.role == ListenerRole::Primary {
        return primary(t).map(|target| vec![target]);
    }
    if t.epoch == 0 {
        return Err(Unroutable::NotSynced);
    }
    let leader = primary(t).ok();
    let mut out = Vec::new();
    let mut why = Vec::new();
    for (name, m) in &t.members {
        if leader.as_ref().is_some_and(|l| &l.member == name) || t.leader.as_deref() == Some(name) {
            continue;
        }
        match replica_checks(p, t, m) {
            Ok(()) => out.push(Target {
                member: name.clone(),
                endpoint: m.endpoint.clone().expect("checked"),
                is_leader: false,
            }),
            Err(e) => why.push(format!("{name}: {e}")),
        }
    }
    match p.role {
        ListenerRole::PreferReplica | ListenerRole::Any => out.extend(leader),
        _ => {}
    }
    if out.is_empty() {
        return Err(Unroutable::NoEligible {
            role: p.role,
            why: why.join("; "),
        });
    }
    Ok(out)
}

/// Orders candidates for one new session: the first is the choice, the rest are fallbacks.
/// `sessions` counts a server's sessions; `turn` advances by one per new session.
pub fn order(
    mut cands: Vec<Target>,
    p: &Policy,
    sessions: impl Fn(&Endpoint) -> usize,
    turn: usize,
) -> Vec<Target> {
    // prefer-replica keeps its primary fallback last, whatever the balance says.
    let fallback = match p.role {
        ListenerRole::PreferReplica
            if cands.len() > 1 && cands.last().is_some_and(|c| c.is_leader) =>
        {
            cands.pop()
        }
        _ => None,
    };
    if !cands.is_empty() {
        let n = cands.len();
        cands.rotate_left(turn % n);
    }
    if p.balance == Balance::LeastConnections {
        // Stable: among equals, the rotation above decides, so ties take turns.
        cands.sort_by_key(|c| sessions(&c.endpoint));
    }
    cands.extend(fallback);
    cands
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use bytes::Bytes;
    use serde_json::Value;
    use std::collections::BTreeMap;

    /// A synced topology with `leader` and members given as (name, port, state).
    pub(crate) fn topology(leader: Option<&str>, members: &[(&str, u16, &str)]) -> Topology {
        let mut keys = BTreeMap::new();
        if let Some(l) = leader {
            keys.insert("leader".to_owned(), Bytes::from(l.to_owned()));
        }
        for (name, port, state) in members {
            let v = format!(
                r#"{{"conn_url":"postgres://127.0.0.1:{port}/postgres","state":"{state}","role":"replica"}}"#
            );
            keys.insert(format!("members/{name}"), Bytes::from(v));
        }
        let (mut t, _) = Topology::from_keys(&keys);
        t.epoch = 1;
        t
    }

    fn policy(role: ListenerRole) -> Policy {
        Policy {
            role,
            ..Policy::default()
        }
    }

    fn names(c: &[Target]) -> Vec<&str> {
        c.iter().map(|t| t.member.as_str()).collect()
    }

    fn three() -> Topology {
        topology(
            Some("a"),
            &[
                ("a", 5001, "running"),
                ("b", 5002, "running"),
                ("c", 5003, "running"),
            ],
        )
    }

    #[test]
    fn the_leader_key_decides_even_while_the_role_says_replica() {
        let t = topology(Some("b"), &[("a", 5001, "running"), ("b", 5002, "running")]);
        let c = candidates(&policy(ListenerRole::Primary), &t).unwrap();
        assert_eq!(names(&c), ["b"]);
        assert_eq!(c[0].endpoint.port, 5002);
    }

    #[test]
    fn a_member_that_says_it_is_primary_takes_no_reads_without_the_leader_key() {
        // A leader whose claim was not confirmed (REST), or an old primary whose member key
        // still says so after the leader key went: writable, or about to be, never a replica.
        let mut t = topology(None, &[("a", 5001, "running"), ("b", 5002, "running")]);
        t.members.get_mut("a").unwrap().role = crate::discovery::patroni::Role::Primary;
        for role in [
            ListenerRole::Replica,
            ListenerRole::PreferReplica,
            ListenerRole::Any,
        ] {
            let c = candidates(&policy(role), &t).unwrap();
            assert_eq!(names(&c), ["b"], "{role}");
        }
        assert_eq!(
            eligibility(&policy(ListenerRole::Replica), &t, "a"),
            Err(Ineligible::IsPrimary)
        );
    }

    #[test]
    fn unroutable_primaries() {
        let running = [("a", 5001, "running")];
        assert_eq!(primary(&Topology::default()), Err(Unroutable::NotSynced));
        assert_eq!(
            primary(&topology(None, &running)),
            Err(Unroutable::NoLeader)
        );
        assert_eq!(
            primary(&topology(Some("z"), &running)),
            Err(Unroutable::LeaderWithoutMember("z".into()))
        );
        assert_eq!(
            primary(&topology(Some("a"), &[("a", 5001, "starting")])),
            Err(Unroutable::LeaderNotRunning {
                name: "a".into(),
                state: "starting".into()
            })
        );
        let mut t = topology(Some("a"), &running);
        t.members.get_mut("a").unwrap().endpoint = None;
        assert_eq!(
            primary(&t),
            Err(Unroutable::LeaderWithoutAddress("a".into()))
        );
    }

    #[test]
    fn each_role_has_its_candidates() {
        let t = three();
        let of = |r| names(&candidates(&policy(r), &t).unwrap()).join(",");
        assert_eq!(of(ListenerRole::Primary), "a");
        assert_eq!(of(ListenerRole::Replica), "b,c");
        assert_eq!(of(ListenerRole::PreferReplica), "b,c,a");
        assert_eq!(of(ListenerRole::Any), "b,c,a");
        // No sync key: nobody is a synchronous standby.
        assert!(matches!(
            candidates(&policy(ListenerRole::Sync), &t),
            Err(Unroutable::NoEligible { .. })
        ));
        let mut t = t;
        t.sync = Some(crate::discovery::patroni::SyncState {
            leader: Some("a".into()),
            standbys: vec!["c".into()],
            quorum: None,
        });
        assert_eq!(
            names(&candidates(&policy(ListenerRole::Sync), &t).unwrap()),
            ["c"]
        );
    }

    #[test]
    fn without_replicas_prefer_replica_falls_back_and_replica_explains() {
        let t = topology(Some("a"), &[("a", 5001, "running"), ("b", 5002, "stopped")]);
        assert_eq!(
            names(&candidates(&policy(ListenerRole::PreferReplica), &t).unwrap()),
            ["a"]
        );
        let err = candidates(&policy(ListenerRole::Replica), &t).unwrap_err();
        assert_eq!(
            err.to_string(),
            "no member is eligible for role replica: b: it is not running (state \"stopped\")"
        );
        let alone = topology(Some("a"), &[("a", 5001, "running")]);
        let err = candidates(&policy(ListenerRole::Replica), &alone).unwrap_err();
        assert!(
            err.to_string().ends_with("the cluster has no replicas"),
            "{err}"
        );
    }

    #[test]
    fn lag_tags_and_noloadbalance_exclude_replicas() {
        let mut t = three();
        t.optime = Some(10_000_000);
        for (name, lsn) in [("b", 9_999_000u64), ("c", 1_000)] {
            t.members.get_mut(name).unwrap().replay_lsn = Some(lsn);
        }
        let mut p = policy(ListenerRole::Replica);
        p.max_lag = Some(1 << 20);
        assert_eq!(names(&candidates(&p, &t).unwrap()), ["b"]);
        assert_eq!(
            eligibility(&p, &t, "c"),
            Err(Ineligible::Lagging {
                lag: 9_999_000,
                max: 1 << 20
            })
        );
        t.members.get_mut("c").unwrap().replay_lsn = None;
        assert_eq!(eligibility(&p, &t, "c"), Err(Ineligible::LagUnknown));

        let mut t = three();
        t.members.get_mut("b").unwrap().tags.noloadbalance = true;
        t.members
            .get_mut("c")
            .unwrap()
            .tags
            .all
            .insert("analytics".into(), Value::Bool(true));
        let p = policy(ListenerRole::Replica);
        assert_eq!(names(&candidates(&p, &t).unwrap()), ["c"]);
        assert_eq!(eligibility(&p, &t, "b"), Err(Ineligible::NoLoadBalance));
        let mut only = policy(ListenerRole::Any);
        only.require_tags
            .insert("analytics".into(), Value::Bool(true));
        // The primary stays a candidate of `any`; replicas must carry the tag.
        assert_eq!(names(&candidates(&only, &t).unwrap()), ["c", "a"]);
        let mut not = policy(ListenerRole::Replica);
        not.exclude_tags
            .insert("analytics".into(), Value::from("true"));
        assert!(candidates(&not, &t).is_err());
    }

    #[test]
    fn a_promoted_replica_leaves_pools_that_exclude_the_primary() {
        let mut t = three();
        let p = policy(ListenerRole::Replica);
        assert_eq!(eligibility(&p, &t, "b"), Ok(()));
        t.leader = Some("b".into());
        assert_eq!(eligibility(&p, &t, "b"), Err(Ineligible::IsPrimary));
        assert_eq!(eligibility(&policy(ListenerRole::Any), &t, "b"), Ok(()));
        assert_eq!(
            eligibility(&policy(ListenerRole::Primary), &t, "a"),
            Err(Ineligible::NotPrimary)
        );
        assert_eq!(
            eligibility(&p, &t, "a"),
            Ok(()),
            "the old primary now serves reads"
        );
        t.members.remove("c");
        assert_eq!(eligibility(&p, &t, "c"), Err(Ineligible::Removed));
    }

    #[test]
    fn round_robin_takes_turns() {
        let t = three();
        let p = Policy {
            role: ListenerRole::Replica,
            balance: Balance::RoundRobin,
            ..Policy::default()
        };
        let firsts: Vec<String> = (0..4)
            .map(|turn| {
                order(candidates(&p, &t).unwrap(), &p, |_| 0, turn)[0]
                    .member
                    .clone()
            })
            .collect();
        assert_eq!(firsts, ["b", "c", "b", "c"]);
    }

    #[test]
    fn least_connections_prefers_the_idle_and_ties_take_turns() {
        let t = three();
        let p = policy(ListenerRole::Replica);
        let busy = |ep: &Endpoint| if ep.port == 5002 { 10 } else { 1 };
        for turn in 0..3 {
            let o = order(candidates(&p, &t).unwrap(), &p, busy, turn);
            assert_eq!(names(&o), ["c", "b"]);
        }
        let firsts: Vec<String> = (0..2)
            .map(|turn| {
                order(candidates(&p, &t).unwrap(), &p, |_| 3, turn)[0]
                    .member
                    .clone()
            })
            .collect();
        assert_eq!(firsts, ["b", "c"]);
    }

    #[test]
    fn prefer_replica_keeps_the_primary_last() {
        let t = three();
        let p = policy(ListenerRole::PreferReplica);
        for turn in 0..3 {
            let o = order(candidates(&p, &t).unwrap(), &p, |_| 0, turn);
            assert_eq!(o.last().unwrap().member, "a");
        }
    }
}
