//! Patroni's REST answer to `GET /cluster`, read into the same `Topology` a watch of the
//! DCS builds, and the member API URLs it names. Pure functions, no I/O.
//!
//! What `/cluster` does not carry, so a topology read from it does not have: WAL positions
//! (it gives each replica's `lag` in bytes instead), the leader's `ttl`, `failsafe`, and an
//! immediate switchover's `failover` key (only a scheduled one shows, as
//! `scheduled_switchover`).

use std::collections::BTreeMap;

use serde_json::Value;

use super::patroni::{Endpoint, Failover, Member, Role, SyncState, Tags};
use super::Topology;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClusterApiError {
    #[error("/cluster: not valid JSON: {0}")]
    Json(String),
    #[error("/cluster: expected an object with a \"members\" list")]
    Shape,
}

/// The topology `/cluster` describes. Its leader is the member in the `leader` (or
/// `standby_leader`) role; the caller confirms it with that member's own `/leader` before
/// routing to it.
pub fn parse(body: &[u8]) -> Result<Topology, ClusterApiError> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| ClusterApiError::Json(e.to_string()))?;
    let members = v
        .get("members")
        .and_then(Value::as_array)
        .ok_or(ClusterApiError::Shape)?;
    let mut t = Topology::default();
    let mut sync = Vec::new();
    for m in members.iter().filter_map(Value::as_object) {
        let Some(name) = m
            .get("name")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
        else {
            continue;
        };
        let role = m.get("role").and_then(Value::as_str).unwrap_or("");
        match role {
            "leader" | "standby_leader" => t.leader = Some(name.to_owned()),
            "sync_standby" | "quorum_standby" => sync.push(name.to_owned()),
            _ => {}
        }
        t.members.insert(name.to_owned(), member(name, role, m));
    }
    if !sync.is_empty() {
        t.sync = Some(SyncState {
            leader: t.leader.clone(),
            standbys: sync,
            quorum: None,
        });
    }
    t.failover = v.get("scheduled_switchover").and_then(scheduled);
    Ok(t)
}

fn member(name: &str, role: &str, m: &serde_json::Map<String, Value>) -> Member {
    let host = m.get("host").and_then(Value::as_str).unwrap_or("");
    let port = m.get("port").and_then(Value::as_u64).unwrap_or(5432);
    let endpoint = match host.contains(':') {
        true => Endpoint::parse(&format!("[{host}]:{port}")),
        false => Endpoint::parse(&format!("{host}:{port}")),
    }
    .filter(|_| !host.is_empty() && port <= u64::from(u16::MAX));
    Member {
        name: name.to_owned(),
        endpoint,
        api_url: m.get("api_url").and_then(Value::as_str).map(str::to_owned),
        role: match role {
            "leader" => Role::Primary,
            "standby_leader" => Role::StandbyLeader,
            _ => Role::Replica,
        },
        state: m
            .get("state")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
        timeline: m.get("timeline").and_then(Value::as_u64),
        xlog_location: None,
        replay_lsn: None,
        receive_lsn: None,
        // A number of bytes, or "unknown".
        lag: m.get("lag").and_then(Value::as_u64),
        tags: Tags::parse(m.get("tags")),
    }
}

fn scheduled(v: &Value) -> Option<Failover> {
    let text = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
    let f = Failover {
        leader: text("from"),
        candidate: text("to"),
        scheduled_at: text("at"),
    };
    (f != Failover::default()).then_some(f)
}

/// The scope an answer says it is about, where it says one: `/cluster`'s `scope` (newer
/// Patroni; 3.0.2 gives none), or `patroni.scope` in a member's status (`/leader`,
/// `/patroni`, in every Patroni).
pub fn scope_of(body: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let scope = v.get("scope").or_else(|| v.get("patroni")?.get("scope"))?;
    scope.as_str().map(str::to_owned)
}

/// Whether `/cluster` says the cluster is paused (maintenance mode: Patroni neither fails
/// over nor demotes, and may be restarted under a running PostgreSQL).
pub fn paused(body: &[u8]) -> bool {
    let v: Option<Value> = serde_json::from_slice(body).ok();
    v.and_then(|v| v.get("pause")?.as_bool()).unwrap_or(false)
}

/// The base of a member's REST API from the `api_url` Patroni advertises
/// (`http://host:8008/patroni`): scheme and authority only.
pub fn api_base(api_url: &str) -> Option<String> {
    let (scheme, rest) = api_url.split_once("://")?;
    if scheme != "http" && scheme != "https" {
        return None;
    }
    let authority = rest.split(['/', '?', '#']).next()?;
    (!authority.is_empty() && !authority.contains('@')).then(|| format!("{scheme}://{authority}"))
}

/// Every member's REST API base, by name, as `/cluster` named them.
pub fn api_bases(t: &Topology) -> BTreeMap<String, String> {
    t.members
        .values()
        .filter_map(|m| Some((m.name.clone(), api_base(m.api_url.as_deref()?)?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// As Patroni 3.0.2 answers, with a sync standby, a lagging replica and a switchover
    /// scheduled.
    const ANSWER: &str = r#"{"members": [
        {"name": "node1", "role": "leader", "state": "running", "api_url": "http://127.0.0.1:8008/patroni",
         "host": "127.0.0.1", "port": 5432, "timeline": 3},
        {"name": "node2", "role": "sync_standby", "state": "running", "api_url": "http://127.0.0.1:8009/patroni",
         "host": "127.0.0.1", "port": 5433, "timeline": 3, "lag": 0, "tags": {"nofailover": true}},
        {"name": "node3", "role": "replica", "state": "running", "api_url": "http://127.0.0.1:8010/patroni",
         "host": "::1", "port": 5434, "timeline": 3, "lag": "unknown"},
        {"name": "", "role": "replica"}, 7],
      "scope": "demo",
      "scheduled_switchover": {"at": "2026-12-02T12:00:00+00:00", "from": "node1", "to": "node2"}}"#;

    #[test]
    fn reads_members_leader_sync_and_a_scheduled_switchover() {
        let t = parse(ANSWER.as_bytes()).unwrap();
        assert_eq!(t.leader.as_deref(), Some("node1"));
        assert_eq!(
            t.members.len(),
            3,
            "nameless and non-object members are skipped"
        );
        let n1 = &t.members["node1"];
        assert_eq!(n1.role, Role::Primary);
        assert_eq!(n1.endpoint.as_ref().unwrap().to_string(), "127.0.0.1:5432");
        assert!(n1.is_running());
        let n2 = &t.members["node2"];
        assert_eq!((n2.role.clone(), n2.lag), (Role::Replica, Some(0)));
        assert!(n2.tags.nofailover);
        let n3 = &t.members["node3"];
        assert_eq!(n3.endpoint.as_ref().unwrap().to_string(), "[::1]:5434");
        assert_eq!(n3.lag, None, "\"unknown\" lag is no number");
        assert_eq!(t.sync.as_ref().unwrap().standbys, vec!["node2".to_owned()]);
        let f = t.failover.unwrap();
        assert_eq!(f.candidate.as_deref(), Some("node2"));
        assert!(f.scheduled_at.is_some());
        assert_eq!(
            api_bases(&parse(ANSWER.as_bytes()).unwrap())["node2"],
            "http://127.0.0.1:8009"
        );
    }

    #[test]
    fn newer_patroni_replication_states_count_as_running() {
        let t = parse(
            br#"{"members":[{"name":"a","role":"leader","state":"running","host":"h","port":1},
            {"name":"b","role":"replica","state":"streaming","host":"h","port":2},
            {"name":"c","role":"replica","state":"in archive recovery","host":"h","port":3},
            {"name":"d","role":"replica","state":"starting","host":"h","port":4}]}"#,
        )
        .unwrap();
        let running: Vec<&str> = t
            .members
            .values()
            .filter(|m| m.is_running())
            .map(|m| m.name.as_str())
            .collect();
        assert_eq!(running, ["a", "b", "c"]);
    }

    #[test]
    fn junk_is_an_error_and_odd_members_are_never_routable() {
        assert!(matches!(parse(b"<html>"), Err(ClusterApiError::Json(_))));
        assert_eq!(parse(b"{}"), Err(ClusterApiError::Shape));
        assert_eq!(parse(b"[1]"), Err(ClusterApiError::Shape));
        let t = parse(
            br#"{"members":[{"name":"a","role":"leader","host":"h/x","port":1},
            {"name":"b","port":70000,"host":"h"},{"name":"c"}]}"#,
        )
        .unwrap();
        assert!(t.members.values().all(|m| m.endpoint.is_none()));
        assert!(t.sync.is_none() && t.failover.is_none());
    }

    #[test]
    fn a_paused_cluster_says_so() {
        assert!(paused(br#"{"members": [], "pause": true}"#));
        assert!(!paused(br#"{"members": [], "pause": "yes"}"#));
        assert!(!paused(ANSWER.as_bytes()));
        assert!(!paused(b"junk"));
    }

    #[test]
    fn an_answer_names_its_scope_where_patroni_gives_one() {
        assert_eq!(scope_of(ANSWER.as_bytes()).as_deref(), Some("demo"));
        let status = br#"{"state": "running", "role": "master", "patroni": {"version": "3.0.2", "scope": "raft"}}"#;
        assert_eq!(scope_of(status).as_deref(), Some("raft"));
        assert_eq!(scope_of(br#"{"members": []}"#), None);
        assert_eq!(scope_of(br#"{"scope": 7}"#), None);
        assert_eq!(scope_of(b"not json"), None);
    }

    #[test]
    fn api_bases_keep_scheme_and_authority_only() {
        assert_eq!(
            api_base("https://10.0.0.1:8008/patroni").as_deref(),
            Some("https://10.0.0.1:8008")
        );
        assert_eq!(
            api_base("http://[::1]:8008").as_deref(),
            Some("http://[::1]:8008")
        );
        assert_eq!(api_base("ftp://x:1/"), None);
        assert_eq!(api_base("http://user@x:1/"), None);
        assert_eq!(api_base("http:///patroni"), None);
    }
}
