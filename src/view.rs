//! The operator's view of a cluster and of a patroxy instance, as plain serializable data:
//! the `/topology` JSON, the value of the routing report kept in etcd, and what
//! `patroxy status` prints. Built from snapshots; no I/O here.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::discovery::patroni::{Endpoint, Role};
use crate::discovery::Topology;
use crate::routing::{self, Policy};

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ClusterView {
    pub name: String,
    pub epoch: u64,
    pub revision: i64,
    pub leader: Option<String>,
    /// The address writes go to, if there is a routable primary.
    pub primary: Option<String>,
    /// Why there is no routable primary.
    pub unroutable: Option<String>,
    /// A planned switchover Patroni is carrying out (`leader -> candidate`): transaction
    /// pools hold new transactions meanwhile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switchover: Option<String>,
    /// This instance's link to the cluster's DCS (`/topology` only).
    /// (`etcd` before there were other sources; read under either name.)
    #[serde(default, alias = "etcd", skip_serializing_if = "Option::is_none")]
    pub dcs: Option<DcsView>,
    pub members: Vec<MemberView>,
}

/// The link to the DCS: which kind (`etcd`, `zookeeper`, `rest`), where, whether it is up
/// (a watch, or fresh answers to polls), and how long it has been silent.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DcsView {
    #[serde(default)]
    pub kind: String,
    pub endpoint: Option<String>,
    pub watching: bool,
    pub silent_ms: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MemberView {
    pub name: String,
    /// `host:port` from the member's conn_url.
    pub address: Option<String>,
    /// As patronictl says it: Leader, Sync Standby, Replica, Standby Leader, ...
    pub role: String,
    pub state: String,
    pub timeline: Option<u64>,
    /// Bytes behind the primary, for replicas with a known position.
    pub lag: Option<u64>,
    pub tags: BTreeMap<String, serde_json::Value>,
    /// Sessions this patroxy relays to the member now (`/topology` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sessions: Option<usize>,
    /// `listener` (or `instance/listener`) that would route a new session here.
    #[serde(default)]
    pub routed_by: Vec<String>,
}

/// One listener's routing decision over the cluster's members.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ListenerView {
    pub name: String,
    pub listen: String,
    pub cluster: String,
    pub role: String,
    pub tls: String,
    /// Members a new session may go to.
    pub routes: Vec<String>,
    /// Members it may not go to, and why.
    pub excluded: BTreeMap<String, String>,
}

/// `/topology`: everything one instance knows.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct InstanceView {
    pub instance: String,
    pub version: String,
    pub clusters: Vec<ClusterView>,
    pub listeners: Vec<ListenerView>,
    /// Server connection pools of pooled listeners.
    #[serde(default)]
    pub pools: Vec<PoolView>,
    /// The instances (this one too) whose cancel routes this one has read from their
    /// reports: where it sends a cancel request whose key another instance issued.
    #[serde(default)]
    pub peers: Vec<PeerView>,
}

/// A peer's cancel route, as read from its report.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PeerView {
    /// The report's key under `report.prefix`: `<cluster>/<instance>`.
    pub report: String,
    pub tag: u16,
    pub address: String,
}

/// One pool: a member's server connections for one database and user.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PoolView {
    pub server: String,
    pub database: String,
    pub user: String,
    /// `primary`, `standby` or `any`: what the server must be.
    pub wants: String,
    pub size: usize,
    pub idle: usize,
    pub in_use: usize,
    /// Clients waiting in line for a connection.
    pub waiting: usize,
}

/// The value of `/<report prefix>/<cluster>/<instance>` in etcd.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Report {
    pub instance: String,
    pub version: String,
    pub cluster: String,
    pub epoch: u64,
    pub leader: Option<String>,
    /// Where this instance sends writes now.
    pub primary: Option<String>,
    pub sessions: usize,
    pub sessions_by_server: BTreeMap<String, usize>,
    /// Listener name to the members it routes to.
    pub routes: BTreeMap<String, Vec<String>>,
    /// Unix seconds when the report was written.
    pub updated: u64,
    /// Where other instances send cancel requests with this instance's pooled keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancel: Option<CancelRoute>,
}

/// An instance's cancel tag (in its pooled clients' key pids) and the `host:port` that
/// takes cancel requests for them.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CancelRoute {
    pub tag: u16,
    pub address: String,
}

/// The role column, in patronictl's words.
pub fn role_label(t: &Topology, name: &str, role: &Role) -> String {
    let sync = t
        .sync
        .as_ref()
        .is_some_and(|s| s.standbys.iter().any(|m| m == name));
    match role {
        _ if t.leader.as_deref() == Some(name) && *role == Role::StandbyLeader => {
            "Standby Leader".into()
        }
        _ if t.leader.as_deref() == Some(name) => "Leader".into(),
        Role::Replica if sync => "Sync Standby".into(),
        Role::Replica => "Replica".into(),
        Role::Primary => "Primary (not leader)".into(),
        Role::StandbyLeader => "Standby Leader".into(),
        Role::Demoted => "Demoted".into(),
        Role::Promoted => "Promoted".into(),
        Role::Uninitialized => "Uninitialized".into(),
        Role::Other(s) => s.clone(),
    }
}

/// A cluster as etcd describes it; `sessions` counts this instance's sessions per server.
pub fn cluster(
    name: &str,
    t: &Topology,
    sessions: Option<&dyn Fn(&Endpoint) -> usize>,
) -> ClusterView {
    let primary = routing::primary(t);
    let members = t
        .members
        .values()
        .map(|m| MemberView {
            name: m.name.clone(),
            address: m.endpoint.as_ref().map(Endpoint::to_string),
            role: role_label(t, &m.name, &m.role),
            state: m.state.clone(),
            timeline: m.timeline,
            lag: (t.leader.as_deref() != Some(m.name.as_str()))
                .then(|| routing::lag(t, m))
                .flatten(),
            tags: m.tags.all.clone(),
            sessions: sessions.zip(m.endpoint.as_ref()).map(|(f, ep)| f(ep)),
            routed_by: Vec::new(),
        })
        .collect();
    ClusterView {
        name: name.to_owned(),
        epoch: t.epoch,
        revision: t.revision,
        leader: t.leader.clone(),
        primary: primary.as_ref().ok().map(|p| p.endpoint.to_string()),
        unroutable: primary.err().map(|e| e.to_string()),
        switchover: routing::switchover::under_way(
            t,
            std::time::SystemTime::now(),
            std::time::Duration::ZERO,
        )
        .then(|| {
            let f = t.failover.clone().unwrap_or_default();
            let or_any = |m: Option<String>| m.unwrap_or_else(|| "any".into());
            format!("{} -> {}", or_any(t.leader.clone()), or_any(f.candidate))
        }),
        dcs: None,
        members,
    }
}

/// The members a listener routes to, and why the others are left out.
pub fn routes(policy: &Policy, t: &Topology) -> (Vec<String>, BTreeMap<String, String>) {
    let mut routes = Vec::new();
    let mut excluded = BTreeMap::new();
    for name in t.members.keys() {
        match routing::eligibility(policy, t, name) {
            Ok(()) => routes.push(name.clone()),
            Err(why) => {
                excluded.insert(name.clone(), why.to_string());
            }
        }
    }
    (routes, excluded)
}

/// Fills each member's `routed_by` from the listeners' routes.
pub fn mark_routes<'a>(
    cluster: &mut ClusterView,
    routes: impl IntoIterator<Item = (String, &'a [String])>,
) {
    for (by, members) in routes {
        for m in cluster.members.iter_mut() {
            if members.contains(&m.name) {
                m.routed_by.push(by.clone());
            }
        }
    }
}

/// A listener as the operator sees it: its settings, and the cluster it routes in.
#[derive(Debug, Clone, PartialEq)]
pub struct Served {
    pub name: String,
    pub listen: String,
    pub cluster: String,
    pub policy: Arc<Policy>,
    pub tls: String,
    /// Its clients are pooled (they hold patroxy's cancel keys).
    pub pooled: bool,
}

/// Everything one instance knows, as `/topology` shows it: each cluster with its members and
/// this instance's sessions on them, and each listener's routing decision. The one builder
/// of the operator's view; the routing report is cut from it (`Report::of`).
pub fn instance(
    instance: &str,
    topologies: &BTreeMap<String, Arc<Topology>>,
    listeners: &[Served],
    sessions: &dyn Fn(&Endpoint) -> usize,
    pools: Vec<PoolView>,
) -> InstanceView {
    let mut clusters: Vec<ClusterView> = topologies
        .iter()
        .map(|(name, t)| cluster(name, t, Some(sessions)))
        .collect();
    let listeners = listeners
        .iter()
        .map(|l| {
            let (routes, excluded) = match topologies.get(&l.cluster) {
                Some(t) => routes(&l.policy, t),
                None => Default::default(),
            };
            if let Some(c) = clusters.iter_mut().find(|c| c.name == l.cluster) {
                mark_routes(c, [(l.name.clone(), routes.as_slice())]);
            }
            ListenerView {
                name: l.name.clone(),
                listen: l.listen.clone(),
                cluster: l.cluster.clone(),
                role: l.policy.role.to_string(),
                tls: l.tls.clone(),
                routes,
                excluded,
            }
        })
        .collect();
    InstanceView {
        instance: instance.to_owned(),
        version: VERSION.into(),
        clusters,
        listeners,
        pools,
        peers: Vec::new(),
    }
}

impl Report {
    /// The routing report of one cluster, cut from the instance's view; `None` for a cluster
    /// the view does not have. `updated` is left at 0 for the writer to stamp.
    pub fn of(view: &InstanceView, cluster: &str) -> Option<Report> {
        let c = view.clusters.iter().find(|c| c.name == cluster)?;
        let sessions_by_server: BTreeMap<String, usize> = c
            .members
            .iter()
            .filter_map(|m| Some((m.address.clone()?, m.sessions?)))
            .filter(|(_, n)| *n > 0)
            .collect();
        let routes = view
            .listeners
            .iter()
            .filter(|l| l.cluster == cluster)
            .map(|l| (l.name.clone(), l.routes.clone()))
            .collect();
        Some(Report {
            instance: view.instance.clone(),
            version: view.version.clone(),
            cluster: cluster.to_owned(),
            epoch: c.epoch,
            leader: c.leader.clone(),
            primary: c.primary.clone(),
            sessions: sessions_by_server.values().sum(),
            sessions_by_server,
            routes,
            updated: 0,
            cancel: None,
        })
    }
}

/// The table `patroxy status` prints, in the manner of `patronictl list`.
pub fn table(cluster: &ClusterView, reports: &[Report]) -> String {
    let header = [
        "Member",
        "Host",
        "Role",
        "State",
        "TL",
        "Lag in MB",
        "Tags",
        "Routed by",
    ];
    let rows: Vec<[String; 8]> = cluster
        .members
        .iter()
        .map(|m| {
            let tags = m
                .tags
                .iter()
                .map(|(k, v)| format!("{k}: {v}"))
                .collect::<Vec<_>>()
                .join(", ");
            [
                m.name.clone(),
                m.address.clone().unwrap_or_default(),
                m.role.clone(),
                m.state.clone(),
                m.timeline.map(|t| t.to_string()).unwrap_or_default(),
                m.lag
                    .map(|l| format!("{}", l / (1 << 20)))
                    .unwrap_or_default(),
                tags,
                m.routed_by.join(", "),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let rule = {
        let mut s = String::from("+");
        for w in widths {
            s.push_str(&"-".repeat(w + 2));
            s.push('+');
        }
        s
    };
    let line = |cells: &[String]| {
        let mut s = String::from("|");
        for (c, w) in cells.iter().zip(widths) {
            s.push_str(&format!(" {c:<w$} |"));
        }
        s
    };
    let seen = match (cluster.epoch, &cluster.dcs) {
        (0, _) => format!("etcd revision {}", cluster.revision),
        (e, Some(d)) => format!(
            "epoch {e}, {} {}",
            d.kind,
            if d.watching { "up" } else { "down" }
        ),
        (e, None) => format!("epoch {e}"),
    };
    let mut out = format!(
        "+ Cluster: {} (leader {}, {seen})\n",
        cluster.name,
        cluster.leader.as_deref().unwrap_or("none"),
    );
    out.push_str(&rule);
    out.push('\n');
    out.push_str(&line(&header.map(String::from)));
    out.push('\n');
    out.push_str(&rule);
    out.push('\n');
    for r in &rows {
        out.push_str(&line(r));
        out.push('\n');
    }
    out.push_str(&rule);
    out.push('\n');
    if let Some(why) = &cluster.unroutable {
        out.push_str(&format!("No routable primary: {why}\n"));
    }
    for r in reports {
        let on_leader = r.leader == cluster.leader && r.epoch > 0;
        out.push_str(&format!(
            "patroxy {} (v{}): writes to {} ({}), epoch {}, {} session(s){}\n",
            r.instance,
            r.version,
            r.primary.as_deref().unwrap_or("nowhere"),
            r.leader.as_deref().unwrap_or("no leader"),
            r.epoch,
            r.sessions,
            if on_leader {
                ""
            } else {
                "  <- not on the current leader"
            }
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn topology() -> Topology {
        let member = |port: u16, role: &str, extra: &str| {
            Bytes::from(format!(
                r#"{{"conn_url":"postgres://127.0.0.1:{port}/postgres","state":"running","role":"{role}","timeline":3,"xlog_location":{extra}}}"#
            ))
        };
        let keys = [
            ("leader", Bytes::from("a")),
            ("members/a", member(5441, "primary", "100663296")),
            ("members/b", member(5442, "replica", "67108864")),
            (
                "members/c",
                member(5443, "replica", "100663296,\"tags\":{\"nofailover\":true}"),
            ),
            ("sync", Bytes::from(r#"{"leader":"a","sync_standby":"c"}"#)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let mut t = Topology::from_keys(&keys).0;
        t.epoch = 1;
        t
    }

    #[test]
    fn a_cluster_in_patronictl_words() {
        let t = topology();
        let sessions = |ep: &Endpoint| usize::from(ep.port == 5441) * 2;
        let mut v = cluster("demo", &t, Some(&sessions));
        assert_eq!(v.primary.as_deref(), Some("127.0.0.1:5441"));
        let roles: Vec<_> = v.members.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["Leader", "Replica", "Sync Standby"]);
        assert_eq!(v.members[1].lag, Some(32 << 20));
        assert_eq!(v.members[0].lag, None);
        assert_eq!(v.members[0].sessions, Some(2));

        let policy = crate::config::ListenerConfig {
            role: crate::routing::ListenerRole::Replica,
            ..Default::default()
        }
        .policy();
        let (routes, excluded) = super::routes(&policy, &t);
        assert_eq!(routes, ["c"]);
        assert!(excluded["b"].contains("lags"), "{excluded:?}");
        assert!(excluded["a"].contains("primary"), "{excluded:?}");
        mark_routes(&mut v, [("ro".to_owned(), routes.as_slice())]);
        assert_eq!(v.members[2].routed_by, ["ro"]);

        let report = Report {
            instance: "p1".into(),
            version: VERSION.into(),
            cluster: "demo".into(),
            epoch: 1,
            leader: Some("b".into()),
            primary: Some("127.0.0.1:5442".into()),
            sessions: 0,
            sessions_by_server: BTreeMap::new(),
            routes: BTreeMap::new(),
            updated: 0,
            cancel: None,
        };
        let text = table(&v, &[report]);
        assert!(text.contains("| Member | Host"), "{text}");
        assert!(
            text.contains("| c      | 127.0.0.1:5443 | Sync Standby |"),
            "{text}"
        );
        assert!(text.contains("nofailover: true"), "{text}");
        assert!(text.contains("not on the current leader"), "{text}");
    }
}
