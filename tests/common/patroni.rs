//! A real Patroni cluster for end-to-end tests: N members (Debian's Patroni) on a DCS of the
//! test's choosing (etcd3 by default, ZooKeeper, or Patroni's own Raft), running as
//! `postgres` on loopback, in synchronous mode so that no acknowledged write can be lost in
//! a failover. An etcd is always started: the tests on other DCSs kill it, to show patroxy
//! does without.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::*;

/// Where the test cluster's Patroni keeps its state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TestDcs {
    Etcd,
    Zookeeper,
    Raft,
}

pub struct Member {
    pub name: String,
    pub pg_port: u16,
    pub api_port: u16,
    /// Patroni's Raft port (used on `TestDcs::Raft` only).
    raft_port: u16,
    dir: PathBuf,
    patroni: Option<Child>,
}

impl Member {
    fn config_path(&self) -> PathBuf {
        self.dir.join("patroni.yml")
    }

    /// The postmaster's pid, from its pid file.
    pub fn postmaster_pid(&self) -> Option<u32> {
        let text = std::fs::read_to_string(self.dir.join("data/postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }

    pub fn patroni_pid(&self) -> Option<u32> {
        self.patroni.as_ref().map(Child::id)
    }

    /// kill -9 of Patroni alone: its PostgreSQL goes on (as in a paused cluster's upgrade).
    pub fn kill_patroni(&mut self) {
        if let Some(mut c) = self.patroni.take() {
            signal(c.id(), "KILL");
            let _ = c.wait();
            super::untrack(c.id());
        }
    }

    /// Patroni and the postmaster with every process below them.
    fn all_pids(&self) -> Vec<u32> {
        let roots: Vec<u32> = [self.patroni_pid(), self.postmaster_pid()]
            .into_iter()
            .flatten()
            .collect();
        descendants(&roots)
    }

    /// `kill -9` of Patroni and the postmaster: a crashed node.
    pub fn crash(&mut self) {
        for pid in [self.patroni_pid(), self.postmaster_pid()]
            .into_iter()
            .flatten()
        {
            signal(pid, "KILL");
        }
        if let Some(mut c) = self.patroni.take() {
            let _ = c.wait();
            super::untrack(c.id());
        }
    }

    /// SIGSTOP of every process of the node: it stays reachable but answers nothing.
    pub fn freeze(&self) {
        for pid in self.all_pids() {
            signal(pid, "STOP");
        }
    }

    pub fn thaw(&self) {
        for pid in self.all_pids() {
            signal(pid, "CONT");
        }
    }

    /// Fencing of a frozen node: every process of it resumed and killed, its backends
    /// too, so nothing holds its shared memory when it is started again.
    pub fn fence(&mut self) {
        self.stop_everything();
    }

    fn stop_everything(&mut self) {
        let pids = self.all_pids();
        // Resume a frozen node first, so that its processes can die.
        for pid in &pids {
            signal(*pid, "CONT");
        }
        self.crash();
        // The postmaster's children exit when they see it gone; make sure.
        for pid in pids {
            signal(pid, "KILL");
        }
    }
}

/// `roots` and all their descendants, from `ps`.
pub fn descendants(roots: &[u32]) -> Vec<u32> {
    let out = Command::new("ps")
        .args(["-eo", "pid=,ppid="])
        .output()
        .unwrap();
    let pairs: Vec<(u32, u32)> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace().map(|x| x.parse::<u32>());
            Some((it.next()?.ok()?, it.next()?.ok()?))
        })
        .collect();
    let mut found: BTreeSet<u32> = roots.iter().copied().collect();
    loop {
        let before = found.len();
        for (pid, ppid) in &pairs {
            if found.contains(ppid) {
                found.insert(*pid);
            }
        }
        if found.len() == before {
            return found.into_iter().collect();
        }
    }
}

pub struct Cluster {
    pub scope: String,
    pub members: Vec<Member>,
    pub etcd: Etcd,
    pub dcs: TestDcs,
    pub zookeeper: Option<super::zookeeper::ZooKeeper>,
    /// `http`, or `https` when the REST API has a certificate.
    api_scheme: &'static str,
    ctl: PathBuf,
    /// Last: fields drop in order, and the servers above must stop before it goes.
    _root: TempRoot,
}

impl Cluster {
    /// Starts etcd and `n` members; returns once there is a leader and every member runs.
    pub async fn start(scope: &str, n: usize) -> Cluster {
        Cluster::start_on(scope, n, TestDcs::Etcd).await
    }

    /// As `start`, with Patroni on `dcs`.
    pub async fn start_on(scope: &str, n: usize, dcs: TestDcs) -> Cluster {
        Cluster::start_with(scope, n, dcs, "").await
    }

    /// As `start_on`, with `restapi` (YAML lines, indented two spaces) added to each
    /// member's `restapi` section; a `certfile` there makes the API https.
    pub async fn start_with(scope: &str, n: usize, dcs: TestDcs, restapi: &str) -> Cluster {
        let root = TempRoot::new();
        let etcd = Etcd::start(&root);
        let zookeeper =
            (dcs == TestDcs::Zookeeper).then(|| super::zookeeper::ZooKeeper::start(&root));
        let mut members = Vec::new();
        for i in 1..=n {
            let name = format!("node{i}");
            let dir = root.subdir(&name);
            members.push(Member {
                name,
                pg_port: free_port(),
                api_port: free_port(),
                raft_port: free_port(),
                dir,
                patroni: None,
            });
        }
        let dcs_yaml = |me: Option<&Member>| match dcs {
            TestDcs::Etcd => format!("etcd3:\n  hosts: 127.0.0.1:{}\n", etcd.port),
            TestDcs::Zookeeper => format!(
                "zookeeper:\n  hosts: ['{}']\n",
                zookeeper.as_ref().unwrap().hosts()
            ),
            TestDcs::Raft => {
                let partners: Vec<String> = members
                    .iter()
                    .filter(|m| me.map_or(true, |me| me.name != m.name))
                    .map(|m| format!("'127.0.0.1:{}'", m.raft_port))
                    .collect();
                let mut y = format!("raft:\n  partner_addrs: [{}]\n", partners.join(", "));
                if let Some(me) = me {
                    y.push_str(&format!(
                        "  self_addr: '127.0.0.1:{}'\n  data_dir: {}/raft\n",
                        me.raft_port,
                        me.dir.display()
                    ));
                }
                y
            }
        };
        let ctl = root.path().join("patronictl.yml");
        write_as_postgres(
            &ctl,
            &format!("scope: {scope}\nnamespace: /service/\n{}", dcs_yaml(None)),
        );
        for m in &members {
            let yaml = member_yaml(scope, &dcs_yaml(Some(m)), m);
            let api = format!("  connect_address: 127.0.0.1:{}\n", m.api_port);
            let yaml = yaml.replacen(&api, &format!("{api}{restapi}"), 1);
            write_as_postgres(&m.config_path(), &yaml);
        }
        let mut cluster = Cluster {
            scope: scope.into(),
            etcd,
            dcs,
            zookeeper,
            members,
            api_scheme: if restapi.contains("certfile:") {
                "https"
            } else {
                "http"
            },
            ctl,
            _root: root,
        };
        if dcs == TestDcs::Raft {
            // Raft needs a quorum of its partners before anyone can bootstrap.
            for i in 0..n {
                cluster.spawn(i);
            }
        } else {
            // The first member bootstraps alone, so it is the leader; the others clone from it.
            cluster.spawn(0);
            cluster.wait_healthy(1, Duration::from_secs(90)).await;
            for i in 1..n {
                cluster.spawn(i);
            }
        }
        cluster.wait_healthy(n, Duration::from_secs(120)).await;
        cluster
    }

    /// The REST API base of each member, for patroxy's `rest.urls`.
    pub fn rest_urls(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("{}://127.0.0.1:{}", self.api_scheme, m.api_port))
            .collect()
    }

    fn spawn(&mut self, i: usize) {
        let m = &mut self.members[i];
        let log = std::fs::File::create(m.dir.join("patroni.log")).unwrap();
        let mut cmd = as_postgres("/usr/bin/patroni");
        cmd.arg(m.config_path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let child = cmd.spawn().expect("patroni (install patroni)");
        super::track(child.id());
        m.patroni = Some(child);
    }

    /// Restarts a crashed member's Patroni; it rejoins as a replica.
    pub fn restart(&mut self, name: &str) {
        let i = self.index(name);
        self.spawn(i);
    }

    fn index(&self, name: &str) -> usize {
        self.members.iter().position(|m| m.name == name).unwrap()
    }

    pub fn member(&self, name: &str) -> &Member {
        &self.members[self.index(name)]
    }

    pub fn member_mut(&mut self, name: &str) -> &mut Member {
        let i = self.index(name);
        &mut self.members[i]
    }

    /// The members with whether they run, the leader and the sync standby: from etcd, or
    /// from the members' REST API on other DCSs.
    pub async fn state(&self) -> Option<ClusterState> {
        if self.dcs != TestDcs::Etcd {
            return self.state_from_rest().await;
        }
        let mut c = etcd_client::Client::connect([self.etcd.url()], None)
            .await
            .ok()?;
        let prefix = format!("/service/{}/", self.scope);
        let resp = c
            .get(
                prefix.as_str(),
                Some(etcd_client::GetOptions::new().with_prefix()),
            )
            .await
            .ok()?;
        let mut s = ClusterState::default();
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

    /// Waits until there is a leader, `n` running members and (with n > 1) a sync standby.
    /// On timeout it says what it last saw and what each member's Patroni logged last.
    pub async fn wait_healthy(&self, n: usize, limit: Duration) -> ClusterState {
        match self.try_wait_healthy(n, limit).await {
            Ok(s) => s,
            Err(last) => panic!(
                "timed out after {limit:?} waiting for a healthy {n}-member cluster; last seen {last:?}\n{}",
                self.log_tails()
            ),
        }
    }

    /// As `wait_healthy`; a member that is still not running after half of `limit` (and is
    /// not one of `away`, stopped on purpose) is rebuilt with `patronictl reinit`, as an
    /// operator would. Patroni 3.0.2 sometimes leaves a replica whose WAL went past the
    /// fork of a new timeline restarting forever ("requested timeline N is not a child of
    /// this server's history") without trying pg_rewind; that is Patroni's to fix, and
    /// not what these tests are about.
    pub async fn wait_healthy_rejoining(
        &self,
        n: usize,
        limit: Duration,
        away: &[&str],
    ) -> ClusterState {
        let last = match self.try_wait_healthy(n, limit / 2).await {
            Ok(s) => return s,
            Err(last) => last.unwrap_or_default(),
        };
        for m in &self.members {
            let running = last.running.get(&m.name).copied().unwrap_or(false);
            if running || away.contains(&m.name.as_str()) {
                continue;
            }
            eprintln!(
                "{} has not rejoined after {:?}: patronictl reinit; its log:\n{}",
                m.name,
                limit / 2,
                self.log_tails()
            );
            let out = as_postgres("/usr/bin/patronictl")
                .arg("-c")
                .arg(&self.ctl)
                .args(["reinit", &self.scope, &m.name, "--force"])
                .stdin(Stdio::null())
                .output()
                .unwrap();
            eprintln!(
                "patronictl reinit {}: {}",
                m.name,
                String::from_utf8_lossy(&out.stdout)
            );
        }
        self.wait_healthy(n, limit / 2).await
    }

    async fn try_wait_healthy(
        &self,
        n: usize,
        limit: Duration,
    ) -> Result<ClusterState, Option<ClusterState>> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let s = self.state().await;
            if let Some(s) = &s {
                let running = s.running.values().filter(|r| **r).count();
                if s.leader.is_some() && running >= n && (n == 1 || s.sync_standby.is_some()) {
                    return Ok(s.clone());
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(s);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The last lines of each member's Patroni log (Patroni's and PostgreSQL's output).
    fn log_tails(&self) -> String {
        let tails: Vec<String> = self
            .members
            .iter()
            .map(|m| {
                let text = std::fs::read_to_string(m.dir.join("patroni.log")).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                let tail = lines[lines.len().saturating_sub(30)..].join("\n");
                format!("--- {}'s patroni.log, last lines:\n{tail}", m.name)
            })
            .collect();
        tails.join("\n")
    }

    /// `patronictl switchover` to `candidate`.
    pub fn switchover(&self, leader: &str, candidate: &str) {
        let mut cmd = as_postgres("/usr/bin/patronictl");
        cmd.arg("-c")
            .arg(&self.ctl)
            .args([
                "switchover",
                "--leader",
                leader,
                "--candidate",
                candidate,
                "--force",
            ])
            .arg(&self.scope);
        let out = cmd.stdin(Stdio::null()).output().unwrap();
        // patronictl 3.0 exits 0 even when the switchover fails: read what it says.
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("Successfully switched over"),
            "patronictl switchover: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `patronictl <args> <scope>`, which must succeed.
    pub fn ctl(&self, args: &[&str]) {
        let mut cmd = as_postgres("/usr/bin/patronictl");
        cmd.arg("-c").arg(&self.ctl).args(args).arg(&self.scope);
        let out = cmd.stdin(Stdio::null()).output().unwrap();
        assert!(
            out.status.success(),
            "patronictl {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn port_of(&self, name: &str) -> u16 {
        self.member(name).pg_port
    }

    pub fn name_of_port(&self, port: u16) -> &str {
        &self
            .members
            .iter()
            .find(|m| m.pg_port == port)
            .unwrap()
            .name
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for m in &mut self.members {
            m.stop_everything();
        }
    }
}

impl Cluster {
    /// `/cluster` from the first member that answers.
    async fn state_from_rest(&self) -> Option<ClusterState> {
        use patroxy::discovery::{cluster_api, http_get::Getter};
        let getter = Getter::new(&patroxy::config::RestConfig::default()).ok()?;
        for url in self.rest_urls() {
            let Ok((200, body)) = getter.get(&url, "/cluster").await else {
                continue;
            };
            let t = cluster_api::parse(&body).ok()?;
            return Some(ClusterState {
                leader: t.leader.clone(),
                sync_standby: t.sync.and_then(|s| s.standbys.first().cloned()),
                running: t
                    .members
                    .iter()
                    .map(|(n, m)| (n.clone(), m.is_running()))
                    .collect(),
            });
        }
        None
    }
}

#[derive(Debug, Default, Clone)]
pub struct ClusterState {
    pub leader: Option<String>,
    pub sync_standby: Option<String>,
    pub running: std::collections::BTreeMap<String, bool>,
}

/// The member's Patroni settings, from the template the demo and the benchmark use too.
fn member_yaml(scope: &str, dcs_yaml: &str, m: &Member) -> String {
    const TEMPLATE: &str = include_str!("../../scripts/patroni-member.yml");
    TEMPLATE
        .replace("etcd3:\n  hosts: 127.0.0.1:@ETCD_PORT@\n", dcs_yaml)
        .replace("@SCOPE@", scope)
        .replace("@NAME@", &m.name)
        .replace("@API_PORT@", &m.api_port.to_string())
        .replace("@PG_PORT@", &m.pg_port.to_string())
        .replace("@DIR@", &m.dir.display().to_string())
        .replace("@PG_BIN@", PG_BIN)
        .replace("@MAX_CONNECTIONS@", "100")
        // Tests need no durability across a machine crash: only processes die here.
        .replace("@FSYNC@", "off")
}
