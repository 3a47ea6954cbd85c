//! Patroni's values in the DCS, parsed leniently: members (3.x and 4.x), leader, status,
//! sync and failover. Pure functions, no I/O.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use serde_json::Value;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatroniError {
    #[error("key {key}: not valid JSON: {reason}")]
    Json { key: String, reason: String },
    #[error("key {key}: expected a JSON object")]
    NotAnObject { key: String },
}

/// A PostgreSQL server's address as Patroni advertises it in `conn_url`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Endpoint {
    /// Shared: an endpoint is cloned at every loan (its load, its cancel route).
    pub host: Arc<str>,
    pub port: u16,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl Endpoint {
    /// Parses `host:port`, `[v6]:port` or a bare host (port 5432).
    pub fn parse(s: &str) -> Option<Endpoint> {
        let s = s.trim();
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (host, after) = rest.split_once(']')?;
            match after {
                "" => (host, None),
                _ => (host, Some(after.strip_prefix(':')?)),
            }
        } else {
            match s.rsplit_once(':') {
                Some((h, _)) if h.contains(':') => return None, // unbracketed IPv6
                Some((h, p)) => (h, Some(p)),
                None => (s, None),
            }
        };
        let port = match port {
            Some(p) => p.parse().ok().filter(|p| *p != 0)?,
            None => 5432,
        };
        if host.is_empty() || host.contains(['/', '@', ' ']) {
            return None;
        }
        Some(Endpoint {
            host: host.into(),
            port,
        })
    }

    /// The host and port of a `postgres://` or `postgresql://` URL.
    pub fn from_conn_url(url: &str) -> Option<Endpoint> {
        let rest = url
            .strip_prefix("postgres://")
            .or_else(|| url.strip_prefix("postgresql://"))?;
        let authority = rest.split(['/', '?']).next()?;
        let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        Endpoint::parse(hostport)
    }
}

/// A member's role as Patroni writes it. 3.x says `master`, 4.x `primary`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    Primary,
    Replica,
    StandbyLeader,
    Demoted,
    Promoted,
    Uninitialized,
    Other(String),
}

impl Role {
    pub fn parse(s: &str) -> Role {
        match s {
            "primary" | "master" => Role::Primary,
            "replica" => Role::Replica,
            "standby_leader" => Role::StandbyLeader,
            "demoted" => Role::Demoted,
            "promoted" => Role::Promoted,
            "uninitialized" => Role::Uninitialized,
            other => Role::Other(other.to_owned()),
        }
    }
}

/// Patroni's member tags. Unknown tags are kept for listeners that select on them.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Tags {
    pub nofailover: bool,
    pub noloadbalance: bool,
    pub nosync: bool,
    pub nostream: bool,
    pub clonefrom: bool,
    pub failover_priority: Option<i64>,
    /// Every tag as Patroni wrote it, known ones included, for listeners that select on tags.
    pub all: BTreeMap<String, Value>,
}

impl Tags {
    pub fn parse(v: Option<&Value>) -> Tags {
        let mut tags = Tags::default();
        let Some(Value::Object(map)) = v else {
            return tags;
        };
        for (k, v) in map {
            match k.as_str() {
                "nofailover" => tags.nofailover = truthy(v),
                "noloadbalance" => tags.noloadbalance = truthy(v),
                "nosync" => tags.nosync = truthy(v),
                "nostream" => tags.nostream = truthy(v),
                "clonefrom" => tags.clonefrom = truthy(v),
                "failover_priority" => tags.failover_priority = int(Some(v)).map(|p| p as i64),
                _ => {}
            }
            tags.all.insert(k.clone(), v.clone());
        }
        tags
    }

    /// Does tag `key` hold `want`? Booleans, numbers and strings compare by their text, so
    /// `analytics: true` in a listener matches Patroni's `true` and a hand-written `"true"`.
    pub fn matches(&self, key: &str, want: &Value) -> bool {
        self.all
            .get(key)
            .is_some_and(|have| have == want || scalar_text(have) == scalar_text(want))
    }
}

fn scalar_text(v: &Value) -> Option<String> {
    match v {
        Value::Bool(b) => Some(b.to_string()),
        Value::Number(n) => Some(n.to_string()),
        Value::String(s) => Some(s.to_ascii_lowercase()),
        _ => None,
    }
}

/// Patroni tags are booleans, but hand-written configs say "true" or 1 too.
fn truthy(v: &Value) -> bool {
    match v {
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_i64().is_some_and(|n| n != 0),
        Value::String(s) => matches!(s.to_ascii_lowercase().as_str(), "true" | "yes" | "on" | "1"),
        _ => false,
    }
}

/// An unsigned integer, accepting a numeric string too.
fn int(v: Option<&Value>) -> Option<u64> {
    match v? {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn string(v: Option<&Value>) -> Option<String> {
    v?.as_str().map(str::to_owned)
}

/// One member, from `members/<name>`.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    pub name: String,
    /// None when `conn_url` is missing or unparsable: such a member is never routable.
    pub endpoint: Option<Endpoint>,
    pub api_url: Option<String>,
    pub role: Role,
    pub state: String,
    pub timeline: Option<u64>,
    pub xlog_location: Option<u64>,
    pub replay_lsn: Option<u64>,
    pub receive_lsn: Option<u64>,
    /// Bytes behind the leader, when the source says so instead of giving positions
    /// (Patroni's REST API does).
    pub lag: Option<u64>,
    pub tags: Tags,
}

impl Member {
    /// Running, as Patroni says it: `running`, or for a replica in Patroni 3.0.4+'s REST
    /// answers its replication state (`streaming`, `in archive recovery`).
    pub fn is_running(&self) -> bool {
        matches!(
            self.state.as_str(),
            "running" | "streaming" | "in archive recovery"
        )
    }

    pub fn parse(name: &str, value: &[u8]) -> Result<Member, PatroniError> {
        let key = format!("members/{name}");
        let v: Value = serde_json::from_slice(value).map_err(|e| PatroniError::Json {
            key: key.clone(),
            reason: e.to_string(),
        })?;
        let Value::Object(m) = v else {
            return Err(PatroniError::NotAnObject { key });
        };
        Ok(Member {
            name: name.to_owned(),
            endpoint: m
                .get("conn_url")
                .and_then(Value::as_str)
                .and_then(Endpoint::from_conn_url),
            api_url: string(m.get("api_url")),
            role: Role::parse(m.get("role").and_then(Value::as_str).unwrap_or("")),
            state: string(m.get("state")).unwrap_or_default(),
            timeline: int(m.get("timeline")),
            xlog_location: int(m.get("xlog_location")),
            replay_lsn: int(m.get("replay_lsn")),
            receive_lsn: int(m.get("receive_lsn")),
            lag: None,
            tags: Tags::parse(m.get("tags")),
        })
    }
}

/// The `leader` key holds the bare member name, not JSON.
pub fn parse_leader(value: &[u8]) -> Option<String> {
    let name = std::str::from_utf8(value).ok()?.trim();
    (!name.is_empty()).then(|| name.to_owned())
}

/// The leader's optime from `status` (`{"optime": N, ...}`).
pub fn parse_status_optime(value: &[u8]) -> Result<Option<u64>, PatroniError> {
    let m = object("status", value)?;
    Ok(int(m.get("optime")))
}

/// The old-style `optime/leader` key: a bare integer.
pub fn parse_legacy_optime(value: &[u8]) -> Option<u64> {
    std::str::from_utf8(value).ok()?.trim().parse().ok()
}

/// `sync`: which standbys are synchronous.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SyncState {
    pub leader: Option<String>,
    pub standbys: Vec<String>,
    pub quorum: Option<u64>,
}

pub fn parse_sync(value: &[u8]) -> Result<SyncState, PatroniError> {
    let m = object("sync", value)?;
    let standbys = match m.get("sync_standby") {
        Some(Value::String(s)) => s
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
        _ => Vec::new(),
    };
    Ok(SyncState {
        leader: string(m.get("leader")),
        standbys,
        quorum: int(m.get("quorum")),
    })
}

/// `failover`: a pending switchover. Patroni resets it to `{}` when done.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Failover {
    pub leader: Option<String>,
    pub candidate: Option<String>,
    pub scheduled_at: Option<String>,
}

pub fn parse_failover(value: &[u8]) -> Result<Option<Failover>, PatroniError> {
    let m = object("failover", value)?;
    let f = Failover {
        leader: string(m.get("leader")),
        candidate: string(m.get("member")),
        scheduled_at: string(m.get("scheduled_at")),
    };
    Ok((f != Failover::default()).then_some(f))
}

/// `failsafe`: the members allowed to keep running without the DCS, by name.
pub fn parse_failsafe(value: &[u8]) -> Result<Vec<String>, PatroniError> {
    Ok(object("failsafe", value)?.keys().cloned().collect())
}

/// `config`: the cluster's dynamic configuration; only its `ttl` (seconds, a number or a
/// numeric string) is read.
pub fn parse_config_ttl(value: &[u8]) -> Result<Option<std::time::Duration>, PatroniError> {
    let m = object("config", value)?;
    let secs = match m.get("ttl") {
        Some(Value::Number(n)) => n.as_f64(),
        Some(Value::String(s)) => s.trim().parse().ok(),
        _ => None,
    };
    Ok(secs
        .filter(|s| s.is_finite() && *s > 0.0 && *s < 1e9)
        .map(std::time::Duration::from_secs_f64))
}

fn object(key: &str, value: &[u8]) -> Result<serde_json::Map<String, Value>, PatroniError> {
    match serde_json::from_slice(value) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(PatroniError::NotAnObject { key: key.into() }),
        Err(e) => Err(PatroniError::Json {
            key: key.into(),
            reason: e.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const V4: &str = r#"{"conn_url":"postgres://127.0.0.1:5442/postgres","api_url":"http://127.0.0.1:8012/patroni",
        "state":"running","role":"replica","version":"4.1.4","tags":{"noloadbalance":true,"analytics":"yes"},
        "xlog_location":67395656,"replay_lsn":67395650,"receive_lsn":67395656,
        "replication_state":"streaming","timeline":3}"#;

    const V3_PRIMARY: &str = r#"{"conn_url":"postgres://node1.db.svc:5432/postgres","api_url":"http://node1:8008/patroni",
        "state":"running","role":"master","version":"3.0.2","xlog_location":50331648,"timeline":2}"#;

    #[test]
    fn parses_a_4x_replica() {
        let m = Member::parse("node2", V4.as_bytes()).unwrap();
        assert_eq!(m.endpoint, Endpoint::parse("127.0.0.1:5442"));
        assert_eq!(m.role, Role::Replica);
        assert!(m.is_running());
        assert_eq!(m.timeline, Some(3));
        assert_eq!(m.xlog_location, Some(67395656));
        assert_eq!(m.replay_lsn, Some(67395650));
        assert!(m.tags.noloadbalance && !m.tags.nofailover);
        assert_eq!(m.tags.all.get("analytics"), Some(&Value::from("yes")));
        assert!(m.tags.matches("analytics", &Value::from("YES")));
        assert!(m.tags.matches("noloadbalance", &Value::from("true")));
        assert!(!m.tags.matches("analytics", &Value::from(true)));
        assert!(!m.tags.matches("missing", &Value::from(true)));
    }

    #[test]
    fn parses_a_3x_master_with_a_hostname() {
        let m = Member::parse("node1", V3_PRIMARY.as_bytes()).unwrap();
        assert_eq!(m.role, Role::Primary);
        assert_eq!(m.endpoint.unwrap().to_string(), "node1.db.svc:5432");
        assert_eq!(m.replay_lsn, None);
    }

    #[test]
    fn primary_and_other_roles() {
        assert_eq!(Role::parse("primary"), Role::Primary);
        assert_eq!(Role::parse("standby_leader"), Role::StandbyLeader);
        assert_eq!(Role::parse("wizard"), Role::Other("wizard".into()));
    }

    #[test]
    fn junk_member_values() {
        assert!(matches!(
            Member::parse("x", b"not json"),
            Err(PatroniError::Json { .. })
        ));
        assert!(matches!(
            Member::parse("x", b"[1,2]"),
            Err(PatroniError::NotAnObject { .. })
        ));
        // Wrong types are tolerated field by field, never fatal.
        let m = Member::parse(
            "x",
            br#"{"conn_url":42,"role":7,"state":null,"timeline":"5","xlog_location":-1,"tags":"no"}"#,
        )
        .unwrap();
        assert_eq!(m.endpoint, None);
        assert_eq!(m.role, Role::Other(String::new()));
        assert!(!m.is_running());
        assert_eq!(m.timeline, Some(5));
        assert_eq!(m.xlog_location, None);
        assert_eq!(m.tags, Tags::default());
    }

    #[test]
    fn conn_urls() {
        let ep = |s| Endpoint::from_conn_url(s).map(|e| e.to_string());
        assert_eq!(
            ep("postgres://10.0.0.1:5433/postgres").as_deref(),
            Some("10.0.0.1:5433")
        );
        assert_eq!(
            ep("postgresql://u:p@db:6000/x?sslmode=require").as_deref(),
            Some("db:6000")
        );
        assert_eq!(
            ep("postgres://[::1]:5442/postgres").as_deref(),
            Some("[::1]:5442")
        );
        assert_eq!(ep("postgres://db/postgres").as_deref(), Some("db:5432"));
        assert_eq!(ep("http://db:5432"), None);
        assert_eq!(ep("postgres://db:99999/x"), None);
        assert_eq!(ep("postgres://:5432/x"), None);
        assert_eq!(ep("postgres://::1:5432/x"), None);
    }

    #[test]
    fn leader_is_a_bare_name() {
        assert_eq!(parse_leader(b"node1"), Some("node1".into()));
        assert_eq!(parse_leader(b" node1\n"), Some("node1".into()));
        assert_eq!(parse_leader(b""), None);
        assert_eq!(parse_leader(&[0xff, 0xfe]), None);
    }

    #[test]
    fn status_sync_failover_failsafe() {
        assert_eq!(
            parse_status_optime(br#"{"optime":67395656,"slots":{"a":1}}"#),
            Ok(Some(67395656))
        );
        assert_eq!(parse_status_optime(b"{}"), Ok(None));
        assert!(parse_status_optime(b"12").is_err());
        assert_eq!(parse_legacy_optime(b"123\n"), Some(123));

        let s = parse_sync(br#"{"leader":"a","sync_standby":"b, c","quorum":1}"#).unwrap();
        assert_eq!(s.standbys, vec!["b", "c"]);
        assert_eq!(s.quorum, Some(1));
        assert!(parse_sync(br#"{"leader":"a","sync_standby":null}"#)
            .unwrap()
            .standbys
            .is_empty());

        assert_eq!(parse_failover(b"{}"), Ok(None));
        let f = parse_failover(br#"{"leader":"n3","member":"n1"}"#)
            .unwrap()
            .unwrap();
        assert_eq!(f.candidate.as_deref(), Some("n1"));

        assert_eq!(
            parse_failsafe(br#"{"n1":"http://n1:8008/patroni"}"#),
            Ok(vec!["n1".into()])
        );
        let ttl = |v: &[u8]| parse_config_ttl(v).unwrap();
        assert_eq!(
            ttl(br#"{"ttl":10,"loop_wait":2}"#),
            Some(Duration::from_secs(10))
        );
        assert_eq!(ttl(br#"{"ttl":"30"}"#), Some(Duration::from_secs(30)));
        assert_eq!(ttl(br#"{"ttl":-1}"#), None);
        assert_eq!(ttl(br#"{"loop_wait":2}"#), None);
        assert!(parse_config_ttl(b"[]").is_err());
    }
}
