//! Routing decisions: which server a new session of a listener's role goes to. Pure, no I/O.

use std::fmt;

use serde::Deserialize;

use crate::discovery::patroni::{Endpoint, Member};
use crate::discovery::Topology;

/// What a listener serves. Read roles come with read routing; the enum is the seam.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ListenerRole {
    #[default]
    Primary,
}

impl fmt::Display for ListenerRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenerRole::Primary => f.write_str("primary"),
        }
    }
}

/// A routing target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub member: String,
    pub endpoint: Endpoint,
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
}

impl fmt::Display for Unroutable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unroutable::NotSynced => {
                f.write_str("the cluster state has not been read from etcd yet")
            }
            Unroutable::NoLeader => f.write_str("the cluster has no leader"),
            Unroutable::LeaderWithoutMember(n) => write!(f, "leader {n} has no member key"),
            Unroutable::LeaderNotRunning { name, state } => {
                write!(f, "leader {name} is not running (state {state:?})")
            }
            Unroutable::LeaderWithoutAddress(n) => write!(f, "leader {n} has no usable conn_url"),
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
    })
}

/// Where a new session of `role` goes.
pub fn route(role: ListenerRole, t: &Topology) -> Result<Target, Unroutable> {
    match role {
        ListenerRole::Primary => primary(t),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use bytes::Bytes;
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

    #[test]
    fn the_leader_key_decides_even_while_the_role_says_replica() {
        let t = topology(Some("b"), &[("a", 5001, "running"), ("b", 5002, "running")]);
        let target = route(ListenerRole::Primary, &t).unwrap();
        assert_eq!(target.member, "b");
        assert_eq!(target.endpoint.port, 5002);
    }

    #[test]
    fn unroutable_cases() {
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
}
