//! Configuration: the TOML file's shape, its defaults, `validate()` reporting every problem
//! at once, and command-line overrides.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::router::ListenerRole;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{} problem(s) in the configuration:\n  - {}", .0.len(), .0.join("\n  - "))]
    Invalid(Vec<String>),
}

/// A password: never printed by `Debug` or `Display`.
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub etcd: EtcdConfig,
    pub cluster: ClusterConfig,
    #[serde(rename = "listener")]
    pub listeners: Vec<ListenerConfig>,
    pub timeouts: Timeouts,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            etcd: EtcdConfig::default(),
            cluster: ClusterConfig::default(),
            listeners: vec![ListenerConfig::default()],
            timeouts: Timeouts::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct EtcdConfig {
    /// `http://host:port` or `https://host:port`; several for an etcd cluster.
    pub endpoints: Vec<String>,
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// PEM CA bundle to verify etcd's certificate (https endpoints).
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate and key, for etcd's client-certificate auth.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    #[serde(with = "humantime_serde")]
    pub dial_timeout: Duration,
    /// Bounds each request (the range read on resync); the watch stream itself is unbounded.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// With no message on the watch for this long (progress requests included), resync.
    #[serde(with = "humantime_serde")]
    pub watch_idle_timeout: Duration,
}

impl Default for EtcdConfig {
    fn default() -> Self {
        EtcdConfig {
            endpoints: vec!["http://127.0.0.1:2379".into()],
            username: None,
            password: None,
            ca_file: None,
            cert_file: None,
            key_file: None,
            dial_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(5),
            watch_idle_timeout: Duration::from_secs(15),
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// Patroni's `namespace` (default `/service`).
    pub namespace: String,
    /// Patroni's `scope`: the cluster name.
    pub scope: String,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            namespace: "/service".into(),
            scope: String::new(),
        }
    }
}

impl ClusterConfig {
    /// The key prefix Patroni uses, `/<namespace>/<scope>/`, with slashes folded as Patroni does.
    pub fn prefix(&self) -> String {
        let ns = self.namespace.trim_matches('/');
        let mut p = String::from("/");
        if !ns.is_empty() {
            p.push_str(ns);
            p.push('/');
        }
        p.push_str(self.scope.trim_matches('/'));
        p.push('/');
        p
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ListenerConfig {
    pub name: String,
    /// `host:port` to listen on.
    pub listen: String,
    pub role: ListenerRole,
}

impl Default for ListenerConfig {
    fn default() -> Self {
        ListenerConfig {
            name: "primary".into(),
            listen: "127.0.0.1:6432".into(),
            role: ListenerRole::Primary,
        }
    }
}

impl ListenerConfig {
    /// The parsed listen address; `validate()` guarantees it parses.
    pub fn addr(&self) -> Result<SocketAddr, String> {
        self.listen
            .parse()
            .map_err(|_| format!("{:?} is not an address (expected ip:port)", self.listen))
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Timeouts {
    /// A client must finish its startup packet(s) within this time.
    #[serde(with = "humantime_serde")]
    pub startup: Duration,
    /// One TCP connect to a server.
    #[serde(with = "humantime_serde")]
    pub connect: Duration,
    /// How long a new session waits for a routable, writable primary before it gets an error.
    #[serde(with = "humantime_serde")]
    pub connect_wait: Duration,
    /// Sessions on a deposed primary end at their next rest point, or at this deadline.
    #[serde(with = "humantime_serde")]
    pub drain: Duration,
    /// On shutdown, open transactions get this long to finish.
    #[serde(with = "humantime_serde")]
    pub shutdown: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            startup: Duration::from_secs(10),
            connect: Duration::from_secs(3),
            connect_wait: Duration::from_secs(15),
            drain: Duration::from_millis(500),
            shutdown: Duration::from_secs(10),
        }
    }
}

/// Values from the command line (or `PATROXY_*` variables) that take precedence over the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub etcd: Vec<String>,
    pub scope: Option<String>,
    pub namespace: Option<String>,
    /// Replaces the file's primary listeners.
    pub primary: Vec<String>,
    pub connect_wait: Option<Duration>,
    pub drain_timeout: Option<Duration>,
}

impl Config {
    pub fn from_toml(path: &Path, text: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim_end().replace('\n', "\n    "),
        })
    }

    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::from_toml(path, &text)
    }

    pub fn apply(&mut self, o: Overrides) {
        if !o.etcd.is_empty() {
            self.etcd.endpoints = o.etcd;
        }
        if let Some(s) = o.scope {
            self.cluster.scope = s;
        }
        if let Some(n) = o.namespace {
            self.cluster.namespace = n;
        }
        if !o.primary.is_empty() {
            self.listeners.retain(|l| l.role != ListenerRole::Primary);
            let many = o.primary.len() > 1;
            for (i, listen) in o.primary.into_iter().enumerate() {
                self.listeners.push(ListenerConfig {
                    name: if many {
                        format!("primary{}", i + 1)
                    } else {
                        "primary".into()
                    },
                    listen,
                    role: ListenerRole::Primary,
                });
            }
        }
        if let Some(d) = o.connect_wait {
            self.timeouts.connect_wait = d;
        }
        if let Some(d) = o.drain_timeout {
            self.timeouts.drain = d;
        }
    }

    /// Every problem at once, so one run of `check-config` shows them all.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut bad = Vec::new();
        if self.etcd.endpoints.is_empty() {
            bad.push("etcd.endpoints: at least one endpoint is needed".to_owned());
        }
        for e in &self.etcd.endpoints {
            if let Err(why) = check_endpoint(e) {
                bad.push(format!("etcd.endpoints: {e:?} {why}"));
            }
        }
        if self.etcd.username.is_some() != self.etcd.password.is_some() {
            bad.push("etcd: username and password go together".into());
        }
        if self.etcd.cert_file.is_some() != self.etcd.key_file.is_some() {
            bad.push("etcd: cert_file and key_file go together".into());
        }
        for (name, file) in [
            ("etcd.ca_file", &self.etcd.ca_file),
            ("etcd.cert_file", &self.etcd.cert_file),
            ("etcd.key_file", &self.etcd.key_file),
        ] {
            if let Some(f) = file.as_ref().filter(|f| !f.is_file()) {
                bad.push(format!("{name}: {} is not a readable file", f.display()));
            }
        }
        let scope = self.cluster.scope.trim_matches('/');
        if scope.is_empty() {
            bad.push("cluster.scope: the Patroni scope (cluster name) is required".into());
        } else if scope.contains('/') {
            bad.push(format!("cluster.scope: {scope:?} must not contain '/'"));
        }
        if self.listeners.is_empty() {
            bad.push("listener: at least one listener is needed".into());
        }
        let mut seen = Vec::new();
        for (i, l) in self.listeners.iter().enumerate() {
            match l.addr() {
                Ok(a) if seen.contains(&a) => {
                    bad.push(format!("listener[{i}].listen: {a} is used twice"))
                }
                Ok(a) => seen.push(a),
                Err(why) => bad.push(format!("listener[{i}].listen: {why}")),
            }
            if l.name.trim().is_empty() {
                bad.push(format!("listener[{i}].name: must not be empty"));
            }
        }
        let t = &self.timeouts;
        for (name, d) in [
            ("timeouts.startup", t.startup),
            ("timeouts.connect", t.connect),
            ("timeouts.connect_wait", t.connect_wait),
            ("timeouts.drain", t.drain),
            ("timeouts.shutdown", t.shutdown),
            ("etcd.dial_timeout", self.etcd.dial_timeout),
            ("etcd.request_timeout", self.etcd.request_timeout),
            ("etcd.watch_idle_timeout", self.etcd.watch_idle_timeout),
        ] {
            if d.is_zero() {
                bad.push(format!("{name}: must be greater than zero"));
            }
        }
        if bad.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(bad))
        }
    }
}

fn check_endpoint(e: &str) -> Result<(), &'static str> {
    let rest = e
        .strip_prefix("http://")
        .or_else(|| e.strip_prefix("https://"))
        .ok_or("must start with http:// or https://")?;
    let hostport = rest.trim_end_matches('/');
    match hostport.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0) => Ok(()),
        _ => Err("must name a host and a port"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Config, ConfigError> {
        Config::from_toml(Path::new("test.toml"), s)
    }

    #[test]
    fn defaults_fill_everything_but_the_scope() {
        let c = parse("[cluster]\nscope = \"demo\"\n").unwrap();
        c.validate().unwrap();
        assert_eq!(c.listeners[0].listen, "127.0.0.1:6432");
        assert_eq!(c.timeouts.drain, Duration::from_millis(500));
        assert_eq!(c.cluster.prefix(), "/service/demo/");
        let err = parse("").unwrap().validate().unwrap_err().to_string();
        assert!(err.contains("cluster.scope"), "{err}");
    }

    #[test]
    fn a_full_file() {
        let c = parse(
            r#"
            [etcd]
            endpoints = ["http://10.1.1.1:2379", "https://etcd-2:2379"]
            username = "patroxy"
            password = "s3cret"
            dial_timeout = "1s"
            [cluster]
            namespace = "service/"
            scope = "pg"
            [[listener]]
            name = "rw"
            listen = "0.0.0.0:5432"
            role = "primary"
            [timeouts]
            connect_wait = "30s"
            drain = "250ms"
            "#,
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.etcd.endpoints.len(), 2);
        assert_eq!(c.cluster.prefix(), "/service/pg/");
        assert_eq!(c.listeners.len(), 1);
        assert_eq!(c.timeouts.connect_wait, Duration::from_secs(30));
        assert!(
            !format!("{c:?}").contains("s3cret"),
            "passwords stay out of Debug"
        );
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let c = parse(
            r#"
            [etcd]
            endpoints = ["127.0.0.1:2379", "http://:1"]
            username = "u"
            [cluster]
            scope = ""
            [[listener]]
            listen = "nowhere"
            [[listener]]
            name = "b"
            listen = "127.0.0.1:1"
            [[listener]]
            name = "c"
            listen = "127.0.0.1:1"
            [timeouts]
            drain = "0s"
            "#,
        )
        .unwrap();
        let ConfigError::Invalid(problems) = c.validate().unwrap_err() else {
            panic!("expected Invalid");
        };
        let all = problems.join("\n");
        for needle in [
            "must start with http://",
            "must name a host",
            "username and password",
            "cluster.scope",
            "listener[0].listen",
            "used twice",
            "timeouts.drain",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in\n{all}");
        }
        assert_eq!(problems.len(), 7, "{all}");
    }

    #[test]
    fn unknown_keys_and_bad_types_are_refused() {
        let err = parse("[cluster]\nscop = \"x\"\n").unwrap_err().to_string();
        assert!(err.contains("scop"), "{err}");
        assert!(parse("[timeouts]\ndrain = \"soon\"\n").is_err());
        assert!(parse("[[listener]]\nrole = \"writer\"\n").is_err());
    }

    #[test]
    fn overrides_win() {
        let mut c =
            parse("[cluster]\nscope = \"a\"\n[[listener]]\nlisten = \"127.0.0.1:7000\"\n").unwrap();
        c.apply(Overrides {
            etcd: vec!["http://127.0.0.1:3379".into()],
            scope: Some("b".into()),
            namespace: Some("/other".into()),
            primary: vec!["127.0.0.1:7001".into()],
            connect_wait: Some(Duration::from_secs(2)),
            drain_timeout: None,
        });
        c.validate().unwrap();
        assert_eq!(c.cluster.prefix(), "/other/b/");
        assert_eq!(c.listeners.len(), 1);
        assert_eq!(c.listeners[0].listen, "127.0.0.1:7001");
        assert_eq!(c.timeouts.connect_wait, Duration::from_secs(2));
    }

    #[test]
    fn the_shipped_example_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/patroxy.toml");
        let c = Config::load(&path).unwrap();
        c.validate().unwrap();
    }
}
