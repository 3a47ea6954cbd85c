//! Where a cluster's Patroni state is read from: `dcs` and its `zookeeper` and `rest`
//! tables inside `[[cluster]]`, their defaults and their checks.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{bounded_duration, Secret};

/// The source of a cluster's topology.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Dcs {
    /// Patroni's keys in etcd v3, watched (`[etcd]`).
    #[default]
    Etcd,
    /// Patroni's znodes in ZooKeeper, watched (`zookeeper.hosts`).
    Zookeeper,
    /// Patroni's REST API (`GET /cluster`), polled (`rest.urls`): for clusters on
    /// Kubernetes, Consul or Patroni's Raft, which patroxy cannot watch.
    Rest,
}

impl Dcs {
    pub fn as_str(self) -> &'static str {
        match self {
            Dcs::Etcd => "etcd",
            Dcs::Zookeeper => "zookeeper",
            Dcs::Rest => "rest",
        }
    }

    /// The source's name in a sentence.
    pub fn describe(self) -> &'static str {
        match self {
            Dcs::Etcd => "etcd",
            Dcs::Zookeeper => "ZooKeeper",
            Dcs::Rest => "Patroni's REST API",
        }
    }
}

/// `zookeeper` inside a cluster: the ensemble Patroni uses.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ZookeeperConfig {
    /// `host:port` of each server of the ensemble.
    pub hosts: Vec<String>,
    /// patroxy's own session: after this long without the ensemble, its watches are gone
    /// and everything is read again on a new session.
    #[serde(deserialize_with = "bounded_duration")]
    pub session_timeout: Duration,
    /// Bounds connecting to one server.
    #[serde(deserialize_with = "bounded_duration")]
    pub connect_timeout: Duration,
}

impl Default for ZookeeperConfig {
    fn default() -> Self {
        ZookeeperConfig {
            hosts: Vec::new(),
            session_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(2),
        }
    }
}

/// `rest` inside a cluster: Patroni's REST API on its members.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RestConfig {
    /// `http://host:port` or `https://host:port` of each member's REST API.
    pub urls: Vec<String>,
    /// How often `/cluster` is asked for.
    #[serde(deserialize_with = "bounded_duration")]
    pub poll_interval: Duration,
    /// Bounds each request; a member slower than this is skipped for the next one.
    #[serde(deserialize_with = "bounded_duration")]
    pub request_timeout: Duration,
    /// With no answer for this long (a round's answer counts when its round ends, so it may
    /// be up to a round older), the cluster counts as unknown: readiness goes and new
    /// connections are refused rather than routed to a guess.
    #[serde(deserialize_with = "bounded_duration")]
    pub stale_after: Duration,
    /// Patroni's `restapi.authentication` (basic auth).
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// PEM CA bundle to verify the members' certificates (https URLs).
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate and key, for `restapi.verify_client`.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

impl Default for RestConfig {
    fn default() -> Self {
        RestConfig {
            urls: Vec::new(),
            poll_interval: Duration::from_millis(250),
            request_timeout: Duration::from_secs(1),
            stale_after: Duration::from_secs(3),
            username: None,
            password: None,
            ca_file: None,
            cert_file: None,
            key_file: None,
        }
    }
}

impl RestConfig {
    /// What is allowed but probably not meant, for `Config::warnings`.
    pub fn warnings(&self, cluster: &str) -> Vec<String> {
        let mut w = Vec::new();
        let has = |scheme: &str| self.urls.iter().any(|u| u.starts_with(scheme));
        if has("https://") && self.ca_file.is_none() {
            w.push(format!("cluster {cluster}: rest.urls over https:// without rest.ca_file: the members' certificates are not verified, so anyone on the path can answer for them"));
        }
        if has("http://") && self.password.is_some() {
            w.push(format!(
                "cluster {cluster}: the REST API password goes in cleartext over http:// URLs"
            ));
        }
        w
    }
}

/// The problems of one cluster's source settings, each prefixed by `at` (`cluster[1]`).
pub fn validate(
    at: &str,
    dcs: Dcs,
    zk: &ZookeeperConfig,
    rest: &RestConfig,
    bad: &mut Vec<String>,
) {
    let ms = Duration::from_millis;
    match dcs {
        Dcs::Etcd => {}
        Dcs::Zookeeper => {
            if zk.hosts.is_empty() {
                bad.push(format!(
                    "{at}.zookeeper.hosts: dcs = \"zookeeper\" needs at least one host:port"
                ));
            }
            for h in &zk.hosts {
                if !is_host_port(h) {
                    bad.push(format!("{at}.zookeeper.hosts: {h:?} must be host:port"));
                }
            }
            floor(
                bad,
                at,
                "zookeeper.session_timeout",
                zk.session_timeout,
                ms(2000),
            );
            floor(
                bad,
                at,
                "zookeeper.connect_timeout",
                zk.connect_timeout,
                ms(100),
            );
        }
        Dcs::Rest => {
            if rest.urls.is_empty() {
                bad.push(format!(
                    "{at}.rest.urls: dcs = \"rest\" needs the REST API URL of at least one member"
                ));
            }
            for u in &rest.urls {
                if let Err(why) = super::check_endpoint(u) {
                    bad.push(format!("{at}.rest.urls: {u:?} {why}"));
                }
            }
            floor(bad, at, "rest.poll_interval", rest.poll_interval, ms(10));
            floor(
                bad,
                at,
                "rest.request_timeout",
                rest.request_timeout,
                ms(50),
            );
            // A round asks `/cluster` and the leader's `/leader`.
            let round = rest.poll_interval + 2 * rest.request_timeout;
            if rest.stale_after < round {
                bad.push(format!(
                    "{at}.rest.stale_after: {:?} must be at least poll_interval + 2 × request_timeout ({round:?})",
                    rest.stale_after,
                ));
            }
            if rest.username.is_some() != rest.password.is_some() {
                bad.push(format!("{at}.rest: username and password go together"));
            }
            if rest.cert_file.is_some() != rest.key_file.is_some() {
                bad.push(format!("{at}.rest: cert_file and key_file go together"));
            }
            for (name, file) in [
                ("ca_file", &rest.ca_file),
                ("cert_file", &rest.cert_file),
                ("key_file", &rest.key_file),
            ] {
                if let Some(f) = file.as_ref().filter(|f| !f.is_file()) {
                    bad.push(format!(
                        "{at}.rest.{name}: {} is not a readable file",
                        f.display()
                    ));
                }
            }
        }
    }
    if dcs != Dcs::Zookeeper && *zk != ZookeeperConfig::default() {
        bad.push(format!(
            "{at}.zookeeper: set, but dcs is \"{}\"",
            dcs.as_str()
        ));
    }
    if dcs != Dcs::Rest && *rest != RestConfig::default() {
        bad.push(format!("{at}.rest: set, but dcs is \"{}\"", dcs.as_str()));
    }
}

fn floor(bad: &mut Vec<String>, at: &str, key: &str, d: Duration, floor: Duration) {
    if d < floor {
        bad.push(format!(
            "{at}.{key}: {d:?} is too short (at least {floor:?})"
        ));
    }
}

fn is_host_port(s: &str) -> bool {
    match s.rsplit_once(':') {
        Some((h, p)) => !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0),
        None => false,
    }
}
