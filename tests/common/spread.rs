//! A Patroni cluster spread over lab hosts: three etcd members (`e1`–`e3`, on the DCS network),
//! three Patroni members with PostgreSQL (`n1`–`n3`, on both), the real patroxy binary (`px`,
//! on both), a client host (`cl`, data only) and an observer (`obs`, on both, never cut) from
//! which the test reads etcd, the servers and patroxy's admin endpoint. Synchronous mode is
//! on, so no acknowledged write may be lost in a failover.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use super::lab::{Host, Lab, Net, Proc};
use super::patroni::descendants;
use super::{wait_for, write_as_postgres, TempRoot, PG_BIN};

pub const SCOPE: &str = "lab";
const ETCD_CLIENT: u16 = 2379;
const ETCD_PEER: u16 = 2380;
const PG: u16 = 5432;
const API: u16 = 8008;
/// patroxy's listeners and admin endpoint on its host.
pub const UNPOOLED: u16 = 6432;
pub const POOLED: u16 = 6433;
pub const ADMIN: u16 = 8080;

pub struct EtcdNode {
    pub name: String,
    pub host: Arc<Host>,
    pub proc: Option<Proc>,
    dir: PathBuf,
}

pub struct PgNode {
    pub name: String,
    pub host: Arc<Host>,
    pub patroni: Option<Proc>,
    dir: PathBuf,
}

impl PgNode {
    /// The postmaster's pid, from its pid file.
    pub fn postmaster_pid(&self) -> Option<u32> {
        let text = std::fs::read_to_string(self.dir.join("data/postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }

    /// Patroni, the postmaster and everything below them.
    fn all_pids(&self) -> Vec<u32> {
        let roots: Vec<u32> = [self.patroni.as_ref().map(Proc::pid), self.postmaster_pid()]
            .into_iter()
            .flatten()
            .collect();
        descendants(&roots)
    }

    pub fn freeze(&self) {
        for pid in self.all_pids() {
            super::signal(pid, "STOP");
        }
    }

    pub fn thaw(&self) {
        for pid in self.all_pids() {
            super::signal(pid, "CONT");
        }
    }

    fn stop(&mut self) {
        let pids = self.all_pids();
        for pid in &pids {
            super::signal(*pid, "CONT");
        }
        if let Some(mut p) = self.patroni.take() {
            p.kill();
        }
        for pid in pids {
            super::signal(pid, "KILL");
        }
    }

    pub fn pg(&self) -> std::net::SocketAddr {
        self.host.socket(Net::Data, PG)
    }
}

/// What the test sees of the cluster in etcd.
#[derive(Debug, Default, Clone)]
pub struct State {
    pub leader: Option<String>,
    pub sync_standby: Option<String>,
    pub running: BTreeMap<String, bool>,
    pub revision: i64,
}

pub struct Spread {
    pub members: Vec<PgNode>,
    pub etcd: Vec<EtcdNode>,
    pub proxy: Option<Proc>,
    pub px: Arc<Host>,
    pub client: Arc<Host>,
    pub obs: Arc<Host>,
    ctl: PathBuf,
    proxy_config: PathBuf,
    /// Last but one: the directories go once every process above has stopped.
    pub root: TempRoot,
    /// Last: the namespaces go once everything in them has.
    lab: Lab,
}

impl Spread {
    /// etcd, then Patroni (the first member bootstraps, the others clone from it), then
    /// patroxy with `extra` appended to its configuration; returns once patroxy routes to
    /// the leader.
    pub async fn start(extra: &str) -> Spread {
        let lab = Lab::new();
        let root = TempRoot::new();
        let mut etcd = Vec::new();
        for i in 1..=3u8 {
            let name = format!("e{i}");
            let host = lab.host(&name, 10 + i, &[Net::Dcs]);
            let dir = root.path().join(&name);
            etcd.push(EtcdNode {
                name,
                host,
                proc: None,
                dir,
            });
        }
        let members: Vec<PgNode> = (1..=3u8)
            .map(|i| {
                let name = format!("n{i}");
                let host = lab.host(&name, 20 + i, &[Net::Dcs, Net::Data]);
                let dir = root.subdir(&name);
                PgNode {
                    name,
                    host,
                    patroni: None,
                    dir,
                }
            })
            .collect();
        let px = lab.host("px", 30, &[Net::Dcs, Net::Data]);
        let client = lab.host("cl", 40, &[Net::Data]);
        let obs = lab.host("obs", 50, &[Net::Dcs, Net::Data]);
        let ctl = root.path().join("patronictl.yml");
        let hosts = etcd_hosts(&etcd);
        write_as_postgres(
            &ctl,
            &format!("scope: {SCOPE}\nnamespace: /service/\netcd3:\n  hosts: {hosts}\n"),
        );
        let proxy_config = root.path().join("patroxy.toml");
        let mut spread = Spread {
            members,
            etcd,
            proxy: None,
            px,
            client,
            obs,
            ctl,
            proxy_config,
            root,
            lab,
        };
        for i in 0..3 {
            spread.start_etcd(i, "new");
        }
        let all: Vec<String> = spread.etcd.iter().map(|e| e.name.clone()).collect();
        wait_for("a 3-member etcd cluster", Duration::from_secs(60), || {
            let all = all.clone();
            let s = &spread;
            async move { (s.etcd_healthy().await.len() == all.len()).then_some(()) }
        })
        .await;
        for i in 0..3 {
            let yaml = member_yaml(&spread.members[i], &hosts);
            write_as_postgres(&spread.members[i].dir.join("patroni.yml"), &yaml);
        }
        spread.start_patroni(0);
        spread.wait_healthy(1).await;
        spread.start_patroni(1);
        spread.start_patroni(2);
        spread.wait_healthy(3).await;
        std::fs::write(&spread.proxy_config, proxy_toml(&spread, extra)).unwrap();
        spread.start_proxy();
        spread
    }

    fn start_etcd(&mut self, i: usize, state: &str) {
        let cluster: Vec<String> = self
            .etcd
            .iter()
            .map(|e| format!("{}=http://{}", e.name, e.host.socket(Net::Dcs, ETCD_PEER)))
            .collect();
        let e = &self.etcd[i];
        let client = format!("http://{}", e.host.socket(Net::Dcs, ETCD_CLIENT));
        let peer = format!("http://{}", e.host.socket(Net::Dcs, ETCD_PEER));
        let mut cmd = e.host.command("etcd");
        cmd.args(["--name", &e.name])
            .arg("--data-dir")
            .arg(&e.dir)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &cluster.join(",")])
            .args(["--initial-cluster-state", state])
            .args(["--initial-cluster-token", "patroxy-lab"])
            .args(["--log-level", "warn"]);
        let log = self.root.path().join(format!("{}.log", e.name));
        let proc = e.host.spawn("etcd", cmd, &log);
        self.etcd[i].proc = Some(proc);
    }

    /// Starts a killed etcd member again, with its data.
    pub fn restart_etcd(&mut self, name: &str) {
        let i = self.etcd.iter().position(|e| e.name == name).unwrap();
        self.start_etcd(i, "existing");
    }

    pub fn etcd_node(&mut self, name: &str) -> &mut EtcdNode {
        self.etcd.iter_mut().find(|e| e.name == name).unwrap()
    }

    /// Every etcd member's client URL.
    pub fn etcd_endpoints(&self) -> Vec<String> {
        self.etcd
            .iter()
            .map(|e| format!("http://{}", e.host.socket(Net::Dcs, ETCD_CLIENT)))
            .collect()
    }

    /// The etcd members that answer a status request from the observer.
    pub async fn etcd_healthy(&self) -> Vec<String> {
        let mut up = Vec::new();
        for e in &self.etcd {
            let url = format!("http://{}", e.host.socket(Net::Dcs, ETCD_CLIENT));
            let answered = self
                .obs
                .run(async move {
                    let mut c = etcd_client::Client::connect([url], None).await.ok()?;
                    let limit = Duration::from_secs(2);
                    tokio::time::timeout(limit, c.get("/health-probe", None))
                        .await
                        .ok()?
                        .ok()
                })
                .await;
            if answered.is_some() {
                up.push(e.name.clone());
            }
        }
        up
    }

    /// The etcd member that leads the raft group now, by name.
    pub async fn etcd_leader(&self) -> Option<String> {
        let urls: Vec<(String, String)> = self
            .etcd
            .iter()
            .map(|e| {
                let url = format!("http://{}", e.host.socket(Net::Dcs, ETCD_CLIENT));
                (e.name.clone(), url)
            })
            .collect();
        self.obs
            .run(async move {
                for (_, url) in &urls {
                    let Ok(mut c) = etcd_client::Client::connect([url.clone()], None).await else {
                        continue;
                    };
                    let limit = Duration::from_secs(2);
                    let Ok(Ok(status)) = tokio::time::timeout(limit, c.status()).await else {
                        continue;
                    };
                    let leader = status.leader();
                    let Ok(Ok(members)) = tokio::time::timeout(limit, c.member_list()).await else {
                        continue;
                    };
                    return members
                        .members()
                        .iter()
                        .find(|m| m.id() == leader)
                        .map(|m| m.name().to_owned());
                }
                None
            })
            .await
    }

    fn start_patroni(&mut self, i: usize) {
        let m = &self.members[i];
        let mut cmd = m.host.as_postgres("/usr/bin/patroni");
        cmd.arg(m.dir.join("patroni.yml"));
        let log = m.dir.join("patroni.log");
        let proc = m.host.spawn("patroni", cmd, &log);
        self.members[i].patroni = Some(proc);
    }

    fn index(&self, name: &str) -> usize {
        self.members.iter().position(|m| m.name == name).unwrap()
    }

    pub fn member(&self, name: &str) -> &PgNode {
        &self.members[self.index(name)]
    }

    /// The cluster's keys, read by the observer from whichever etcd member answers.
    pub async fn state(&self) -> Option<State> {
        let urls: Vec<String> = self
            .etcd
            .iter()
            .map(|e| format!("http://{}", e.host.socket(Net::Dcs, ETCD_CLIENT)))
            .collect();
        self.obs
            .run(async move {
                for url in urls {
                    if let Some(s) = read_state(url).await {
                        return Some(s);
                    }
                }
                None
            })
            .await
    }

    /// Waits until there is a leader, `n` running members and (with n > 1) a sync standby.
    pub async fn wait_healthy(&self, n: usize) -> State {
        let start = tokio::time::Instant::now();
        loop {
            let state = self.state().await;
            if let Some(s) = &state {
                let running = s.running.values().filter(|r| **r).count();
                let ok = s.leader.is_some() && running >= n && (n == 1 || s.sync_standby.is_some());
                if ok {
                    return s.clone();
                }
            }
            if start.elapsed() > Duration::from_secs(180) {
                let logs: Vec<String> = self
                    .members
                    .iter()
                    .map(|m| {
                        format!(
                            "--- {}:\n{}",
                            m.name,
                            m.patroni.as_ref().map(|p| p.tail(30)).unwrap_or_default()
                        )
                    })
                    .collect();
                panic!(
                    "no healthy {n}-member cluster within 180 s: {state:?}\n{}",
                    logs.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn leader(&self) -> String {
        wait_for("a leader", Duration::from_secs(120), || async {
            self.state().await?.leader
        })
        .await
    }

    /// Waits for the leader key to name someone other than `old`.
    pub async fn new_leader(&self, old: &str) -> String {
        wait_for(
            &format!("a leader other than {old}"),
            Duration::from_secs(120),
            || async move { self.state().await?.leader.filter(|l| l != old) },
        )
        .await
    }

    /// `patronictl switchover`, from the observer; `avoid`: an etcd member patronictl must
    /// not use (one the test has frozen or cut).
    pub async fn switchover(&self, leader: &str, candidate: &str, avoid: Option<&str>) {
        let ctl = match avoid {
            None => self.ctl.clone(),
            Some(skip) => {
                let hosts: Vec<String> = self
                    .etcd
                    .iter()
                    .filter(|e| e.name != skip)
                    .map(|e| e.host.socket(Net::Dcs, ETCD_CLIENT).to_string())
                    .collect();
                let path = self
                    .root
                    .path()
                    .join(format!("patronictl-without-{skip}.yml"));
                let text = format!(
                    "scope: {SCOPE}\nnamespace: /service/\netcd3:\n  hosts: {}\n",
                    hosts.join(",")
                );
                write_as_postgres(&path, &text);
                path
            }
        };
        // Patroni itself may still be on a member the test broke ("failed to write
        // switchover key into DCS") until its own retry moves it: try again, bounded.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
        loop {
            let mut cmd = self.obs.as_postgres("/usr/bin/patronictl");
            cmd.arg("-c")
                .arg(&ctl)
                .args(["switchover", "--leader", leader, "--candidate", candidate])
                .args(["--force", SCOPE])
                .stdin(Stdio::null());
            let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
                .await
                .unwrap();
            let said = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            if said.contains("Successfully switched over") {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "patronictl switchover: {said}"
            );
            eprintln!(
                "patronictl switchover failed; again in 1 s: {}",
                said.lines().last().unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// `etcdctl` on the observer, against every member.
    async fn etcdctl(&self, args: &[&str]) -> String {
        let mut cmd = self.obs.command("etcdctl");
        cmd.arg(format!("--endpoints={}", self.etcd_endpoints().join(",")))
            .args(["--command-timeout=5s"])
            .args(args)
            .env("ETCDCTL_API", "3")
            .stdin(Stdio::null());
        let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
            .await
            .unwrap();
        let said = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "etcdctl {args:?}: {said}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        said
    }

    /// Moves etcd's raft leadership to another member.
    pub async fn move_etcd_leader(&self) {
        let leader = self.etcd_leader().await.expect("an etcd leader");
        let list = self.etcdctl(&["member", "list", "-w", "simple"]).await;
        // `id, started, name, peer urls, client urls, learner`
        let target = list
            .lines()
            .map(|l| l.split(", ").collect::<Vec<_>>())
            .find(|f| f.len() > 2 && f[2] != leader)
            .map(|f| f[0].to_owned())
            .expect("another etcd member");
        let mut cmd = self.obs.command("etcdctl");
        let at = self
            .etcd
            .iter()
            .find(|e| e.name == leader)
            .map(|e| format!("http://{}", e.host.socket(Net::Dcs, ETCD_CLIENT)))
            .unwrap();
        cmd.arg(format!("--endpoints={at}"))
            .args(["move-leader", &target])
            .env("ETCDCTL_API", "3")
            .stdin(Stdio::null());
        let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "etcdctl move-leader: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        wait_for("etcd's leader to move", Duration::from_secs(30), || async {
            self.etcd_leader().await.filter(|l| *l != leader)
        })
        .await;
    }

    /// Compacts etcd's history up to its current revision.
    pub async fn compact_etcd(&self) {
        let revision = self.state().await.expect("etcd answers").revision;
        self.etcdctl(&["compact", &revision.to_string()]).await;
    }

    /// The etcd member patroxy's watch uses, from `/topology`, by name.
    pub async fn watched_etcd(&self) -> Option<String> {
        let (_, body) = self.admin("/topology").await?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        let cluster = v["clusters"]
            .as_array()?
            .iter()
            .find(|c| c["name"] == SCOPE)?;
        if cluster["dcs"]["watching"] != true {
            return None;
        }
        let url = cluster["dcs"]["endpoint"].as_str()?.to_owned();
        self.etcd
            .iter()
            .find(|e| url.contains(&e.host.socket(Net::Dcs, ETCD_CLIENT).to_string()))
            .map(|e| e.name.clone())
    }

    /// Stops patroxy and starts it again with `cluster_lines` added to its `[cluster]`.
    pub fn restart_proxy(&mut self, cluster_lines: &str) {
        self.proxy = None;
        let text = std::fs::read_to_string(&self.proxy_config).unwrap();
        let text = text.replace(
            &format!("scope = \"{SCOPE}\"\n"),
            &format!("scope = \"{SCOPE}\"\n{cluster_lines}\n"),
        );
        std::fs::write(&self.proxy_config, text).unwrap();
        self.start_proxy();
    }

    fn start_proxy(&mut self) {
        let mut cmd = self.px.command(env!("CARGO_BIN_EXE_patroxy"));
        for (k, _) in std::env::vars() {
            if k.starts_with("PATROXY_") {
                cmd.env_remove(k);
            }
        }
        cmd.args(["run", "--config"]).arg(&self.proxy_config);
        let log = self.root.path().join("patroxy.log");
        self.proxy = Some(self.px.spawn("patroxy", cmd, &log));
    }

    /// patroxy's log so far.
    pub fn proxy_log(&self) -> String {
        self.proxy
            .as_ref()
            .map(|p| p.tail(10_000))
            .unwrap_or_default()
    }

    /// A GET on patroxy's admin endpoint from the observer: status code and body.
    pub async fn admin(&self, path: &str) -> Option<(u16, String)> {
        let at = self.px.socket(Net::Data, ADMIN);
        let path = path.to_owned();
        self.obs.run(async move { get(at, &path).await }).await
    }

    /// patroxy's admin endpoint, as the observer reaches it.
    pub fn admin_addr(&self) -> std::net::SocketAddr {
        self.px.socket(Net::Data, ADMIN)
    }

    /// The leader patroxy routes the cluster's primary listener to, from `/topology`.
    pub async fn routed_leader(&self) -> Option<String> {
        let at = self.admin_addr();
        self.obs
            .run(async move { routed_leader_at(at).await })
            .await
    }

    /// Waits until patroxy's view names `leader`; returns how long that took.
    pub async fn wait_routed(&self, leader: &str, limit: Duration) -> Duration {
        let start = tokio::time::Instant::now();
        loop {
            if self.routed_leader().await.as_deref() == Some(leader) {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < limit,
                "patroxy did not route to {leader} within {limit:?}; it says {:?}; its log:\n{}",
                self.admin("/topology").await,
                self.proxy_log()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A metric's value from patroxy's `/metrics` (the sum over series with these labels).
    pub async fn metric(&self, name: &str, labels: &[&str]) -> Option<f64> {
        let (_, body) = self.admin("/metrics").await?;
        super::sample(&body, name, labels)
    }

    /// A connection from the observer straight to a member's PostgreSQL.
    pub async fn direct(&self, name: &str) -> Result<tokio_postgres::Client, String> {
        let at = self.member(name).pg();
        self.obs
            .run(async move {
                let conn = format!(
                    "host={} port={} user=postgres dbname=postgres connect_timeout=5",
                    at.ip(),
                    at.port()
                );
                let (c, conn) = tokio_postgres::connect(&conn, tokio_postgres::NoTls)
                    .await
                    .map_err(|e| e.to_string())?;
                tokio::spawn(conn);
                Ok(c)
            })
            .await
    }
}

impl Drop for Spread {
    fn drop(&mut self) {
        self.proxy = None;
        for m in &mut self.members {
            m.stop();
        }
        for e in &mut self.etcd {
            e.proc = None;
        }
    }
}

fn etcd_hosts(etcd: &[EtcdNode]) -> String {
    etcd.iter()
        .map(|e| e.host.socket(Net::Dcs, ETCD_CLIENT).to_string())
        .collect::<Vec<_>>()
        .join(",")
}

async fn read_state(url: String) -> Option<State> {
    let limit = Duration::from_secs(2);
    let mut c = etcd_client::Client::connect([url], None).await.ok()?;
    let prefix = format!("/service/{SCOPE}/");
    let get = c.get(
        prefix.as_str(),
        Some(etcd_client::GetOptions::new().with_prefix()),
    );
    let resp = tokio::time::timeout(limit, get).await.ok()?.ok()?;
    let mut s = State {
        revision: resp.header().map_or(0, |h| h.revision()),
        ..State::default()
    };
    for kv in resp.kvs() {
        let key = kv.key_str().ok()?.strip_prefix(prefix.as_str())?.to_owned();
        let value = String::from_utf8_lossy(kv.value()).into_owned();
        if key == "leader" {
            s.leader = Some(value);
        } else if key == "sync" {
            let v: serde_json::Value = serde_json::from_str(&value).ok()?;
            s.sync_standby = v["sync_standby"].as_str().map(str::to_owned);
        } else if let Some(name) = key.strip_prefix("members/") {
            let v: serde_json::Value = serde_json::from_str(&value).ok()?;
            s.running.insert(name.to_owned(), v["state"] == "running");
        }
    }
    Some(s)
}

/// The shared member template, moved from loopback to the member's host addresses.
fn member_yaml(m: &PgNode, etcd_hosts: &str) -> String {
    const TEMPLATE: &str = include_str!("../../scripts/patroni-member.yml");
    let data = m.host.addr(Net::Data);
    let lines = [
        (
            "  listen: 127.0.0.1:@API_PORT@",
            format!("  listen: {data}:{API}"),
        ),
        (
            "  connect_address: 127.0.0.1:@API_PORT@",
            format!("  connect_address: {data}:{API}"),
        ),
        (
            "  hosts: 127.0.0.1:@ETCD_PORT@",
            format!("  hosts: {etcd_hosts}"),
        ),
        (
            "  listen: 127.0.0.1:@PG_PORT@",
            format!("  listen: 127.0.0.1,{data}:{PG}"),
        ),
        (
            "  connect_address: 127.0.0.1:@PG_PORT@",
            format!("  connect_address: {data}:{PG}"),
        ),
        (
            "  - host all all 127.0.0.1/32 trust",
            "  - host all all 127.0.0.1/32 trust\n  - host all all 10.77.0.0/16 trust".into(),
        ),
        (
            "  - host replication all 127.0.0.1/32 trust",
            "  - host replication all 10.77.0.0/16 trust".into(),
        ),
    ];
    let mut text = TEMPLATE.to_owned();
    for (from, to) in lines {
        assert!(text.contains(from), "the member template has no {from:?}");
        text = text.replace(from, &to);
    }
    text.replace("@SCOPE@", SCOPE)
        .replace("@NAME@", &m.name)
        .replace("@DIR@", &m.dir.display().to_string())
        .replace("@PG_BIN@", PG_BIN)
        .replace("@MAX_CONNECTIONS@", "100")
        .replace("@FSYNC@", "off")
}

/// patroxy's configuration on its host: both kinds of primary listener, the admin endpoint,
/// every etcd member; then the test's own lines.
fn proxy_toml(s: &Spread, extra: &str) -> String {
    let endpoints: Vec<String> = s
        .etcd
        .iter()
        .map(|e| format!("\"http://{}\"", e.host.socket(Net::Dcs, ETCD_CLIENT)))
        .collect();
    let px = s.px.addr(Net::Data);
    format!(
        r#"[etcd]
endpoints = [{endpoints}]
dial_timeout = "1s"
request_timeout = "2s"
watch_idle_timeout = "3s"

[cluster]
scope = "{SCOPE}"

[[listener]]
name = "rw"
listen = "{px}:{UNPOOLED}"
role = "primary"

[[listener]]
name = "pooled"
listen = "{px}:{POOLED}"
role = "primary"
pool_mode = "transaction"

[admin]
listen = "{px}:{ADMIN}"

[auth]
trust = ["10.77.0.0/16"]

[report]
enabled = false

{extra}
"#,
        endpoints = endpoints.join(", ")
    )
}

/// A GET on an admin endpoint: status code and body (run it on the observer).
pub async fn get(at: std::net::SocketAddr, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let limit = Duration::from_secs(2);
    let request = format!("GET {path} HTTP/1.0\r\nHost: px\r\n\r\n");
    let mut s = tokio::time::timeout(limit, tokio::net::TcpStream::connect(at))
        .await
        .ok()?
        .ok()?;
    s.write_all(request.as_bytes()).await.ok()?;
    let mut out = String::new();
    tokio::time::timeout(limit, s.read_to_string(&mut out))
        .await
        .ok()?
        .ok()?;
    let code = out.split_whitespace().nth(1)?.parse().ok()?;
    let body = out.split_once("\r\n\r\n")?.1.to_owned();
    Some((code, body))
}

/// The leader the patroxy at `at` routes the cluster to, from its `/topology`.
pub async fn routed_leader_at(at: std::net::SocketAddr) -> Option<String> {
    let (_, body) = get(at, "/topology").await?;
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    let cluster = v["clusters"]
        .as_array()?
        .iter()
        .find(|c| c["name"] == SCOPE)?;
    cluster["leader"].as_str().map(str::to_owned)
}
