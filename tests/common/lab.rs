//! Separate hosts for the fault suite, inside this machine: network namespaces joined by two
//! bridges that live in a namespace of their own. `dcs` carries etcd (its peers, Patroni's and
//! patroxy's etcd clients); `data` carries PostgreSQL, Patroni's REST API and the clients.
//! A fault is one call: `cut`/`heal` one host's link to one network (its packets vanish, no
//! RST, as in a real cut), `isolate`/`rejoin` a host, `freeze`/`thaw`/`kill` a process.
//! Only addresses inside the namespaces a lab made are used (10.77.<net>.<host>); nothing is
//! added to the machine's own namespace. Everything is removed on drop, and namespaces left
//! by a run that was killed are swept when the next lab starts.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use super::{signal, track, untrack, PG_BIN};

const IP: &str = "/usr/sbin/ip";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Net {
    Dcs,
    Data,
}

impl Net {
    fn name(self) -> &'static str {
        match self {
            Net::Dcs => "dcs",
            Net::Data => "data",
        }
    }

    fn octet(self) -> u8 {
        match self {
            Net::Dcs => 1,
            Net::Data => 2,
        }
    }
}

/// `ip` with these arguments; a failure fails the test with what `ip` said.
fn ip(args: &[&str]) {
    let out = Command::new(IP).args(args).output().expect("ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `ip` for cleaning up: what is already gone is fine.
fn ip_quiet(args: &[&str]) {
    let _ = Command::new(IP)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

static NEXT_LAB: AtomicU32 = AtomicU32::new(0);

/// The namespaces of one test: a switch and its hosts.
pub struct Lab {
    prefix: String,
    switch: String,
    namespaces: Mutex<Vec<String>>,
}

impl Lab {
    pub fn new() -> Lab {
        sweep_stale();
        let prefix = format!(
            "ptx{}x{}",
            std::process::id(),
            NEXT_LAB.fetch_add(1, Ordering::Relaxed)
        );
        let switch = format!("{prefix}-sw");
        let lab = Lab {
            prefix,
            switch: switch.clone(),
            namespaces: Mutex::new(Vec::new()),
        };
        lab.add_namespace(&switch);
        for net in [Net::Dcs, Net::Data] {
            ip(&["-n", &switch, "link", "add", net.name(), "type", "bridge"]);
            ip(&["-n", &switch, "link", "set", net.name(), "up"]);
        }
        lab
    }

    fn add_namespace(&self, ns: &str) {
        ip(&["netns", "add", ns]);
        self.namespaces.lock().unwrap().push(ns.to_owned());
        ip(&["-n", ns, "link", "set", "lo", "up"]);
    }

    /// A host called `name` (at most 6 characters), number `id` in every network it joins.
    pub fn host(&self, name: &str, id: u8, nets: &[Net]) -> Arc<Host> {
        assert!(name.len() <= 6, "host names are short: {name}");
        let ns = format!("{}-{name}", self.prefix);
        self.add_namespace(&ns);
        for net in nets {
            let port = format!("{name}-{}", net.name());
            let sw = self.switch.as_str();
            ip(&[
                "-n",
                sw,
                "link",
                "add",
                &port,
                "type",
                "veth",
                "peer",
                "name",
                net.name(),
                "netns",
                &ns,
            ]);
            ip(&["-n", sw, "link", "set", &port, "master", net.name()]);
            ip(&["-n", sw, "link", "set", &port, "up"]);
            let addr = format!("{}/24", address(*net, id));
            ip(&["-n", &ns, "addr", "add", &addr, "dev", net.name()]);
            ip(&["-n", &ns, "link", "set", net.name(), "up"]);
            // The lab is one flat L2 segment: after a heal, a host finds its peers again at
            // the next ARP retransmission, 1 s apart by default. A routed network does not
            // add that second (its gateway's entry stays fresh), so the lab retries ARP every
            // 100 ms, and a heal measures the software, not the lab's wiring.
            let knob = format!("net.ipv4.neigh.{}.retrans_time_ms=100", net.name());
            let arp = Command::new(IP)
                .args(["netns", "exec", &ns, "sysctl", "-qw", &knob])
                .status()
                .expect("sysctl (procps)");
            assert!(arp.success(), "sysctl {knob} in {ns} failed");
        }
        Arc::new(Host {
            name: name.to_owned(),
            ns,
            switch: self.switch.clone(),
            id,
            nets: nets.to_vec(),
            runtime: OnceLock::new(),
        })
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in self.namespaces.lock().unwrap().iter().rev() {
            remove_namespace(ns);
        }
    }
}

/// Kills whatever still runs in `ns`, then deletes it (its links go with it).
fn remove_namespace(ns: &str) {
    if let Ok(out) = Command::new(IP).args(["netns", "pids", ns]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if let Ok(pid) = pid.parse::<u32>() {
                signal(pid, "CONT");
                signal(pid, "KILL");
            }
        }
    }
    ip_quiet(&["netns", "del", ns]);
}

/// Deletes the namespaces of labs whose test process is gone (killed before its drop ran).
fn sweep_stale() {
    let Ok(out) = Command::new(IP).args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let ns = line.split_whitespace().next().unwrap_or_default();
        let Some(rest) = ns.strip_prefix("ptx") else {
            continue;
        };
        let pid = rest.split('x').next().unwrap_or_default();
        if pid.parse::<u32>().is_ok() && !Path::new(&format!("/proc/{pid}")).exists() {
            remove_namespace(ns);
        }
    }
}

/// A host's address in a network.
pub fn address(net: Net, id: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, net.octet(), id)
}

/// One host: a network namespace with a link to each of its networks.
pub struct Host {
    pub name: String,
    pub ns: String,
    switch: String,
    pub id: u8,
    nets: Vec<Net>,
    /// A runtime whose thread lives in the namespace: sockets made by its tasks are the host's.
    runtime: OnceLock<(tokio::runtime::Handle, tokio::sync::oneshot::Sender<()>)>,
}

impl Host {
    pub fn addr(&self, net: Net) -> Ipv4Addr {
        assert!(self.nets.contains(&net), "{} is not on {net:?}", self.name);
        address(net, self.id)
    }

    pub fn socket(&self, net: Net, port: u16) -> SocketAddr {
        SocketAddr::from((self.addr(net), port))
    }

    /// Takes the host's link to `net` down at the switch: its packets there vanish.
    pub fn cut(&self, net: Net) {
        let port = format!("{}-{}", self.name, net.name());
        ip(&["-n", &self.switch, "link", "set", &port, "down"]);
    }

    pub fn heal(&self, net: Net) {
        let port = format!("{}-{}", self.name, net.name());
        ip(&["-n", &self.switch, "link", "set", &port, "up"]);
    }

    /// Cut from every network.
    pub fn isolate(&self) {
        for net in &self.nets {
            self.cut(*net);
        }
    }

    pub fn rejoin(&self) {
        for net in &self.nets {
            self.heal(*net);
        }
    }

    /// `program` run inside the host (as root).
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new(IP);
        c.args(["netns", "exec", &self.ns, program]);
        c
    }

    /// `program` run inside the host as `postgres`, with a clean environment.
    pub fn as_postgres(&self, program: &str) -> Command {
        let mut c = self.command("setpriv");
        c.args([
            "--reuid=postgres",
            "--regid=postgres",
            "--init-groups",
            "--",
            program,
        ])
        .env_clear()
        .env("PATH", format!("{PG_BIN}:/usr/bin:/bin"))
        .env("HOME", "/var/lib/postgresql")
        .env("LANG", "C.UTF-8");
        c
    }

    /// Starts `cmd` (made by `command` or `as_postgres`) with its output in `log`.
    pub fn spawn(&self, what: &str, mut cmd: Command, log: &Path) -> Proc {
        let out = std::fs::File::create(log).unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("{what} on {}: {e}", self.name));
        track(child.id());
        Proc {
            what: format!("{what} on {}", self.name),
            child: Some(child),
            log: log.to_owned(),
        }
    }

    /// Runs `task` on the host: its sockets are made inside the host's namespace.
    pub fn spawn_task<F>(&self, task: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.runtime().spawn(task)
    }

    /// Runs `task` on the host and waits for its answer.
    pub async fn run<F>(&self, task: F) -> F::Output
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.spawn_task(task).await.expect("a task on a lab host")
    }

    fn runtime(&self) -> tokio::runtime::Handle {
        let (handle, _) = self.runtime.get_or_init(|| {
            let ns = self.ns.clone();
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::Builder::new()
                .name(format!("lab-{}", self.name))
                .spawn(move || {
                    let file = std::fs::File::open(format!("/run/netns/{ns}")).unwrap();
                    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                        .expect("entering a network namespace (root needed)");
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .unwrap();
                    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
                    tx.send((rt.handle().clone(), stop_tx)).unwrap();
                    rt.block_on(async {
                        let _ = stop_rx.await;
                    });
                })
                .unwrap();
            rx.recv().unwrap()
        });
        handle.clone()
    }
}

/// A process on a lab host; killed (and waited for) on drop.
pub struct Proc {
    what: String,
    child: Option<Child>,
    pub log: PathBuf,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or_default()
    }

    /// SIGSTOP: it keeps its sockets and answers nothing.
    pub fn freeze(&self) {
        signal(self.pid(), "STOP");
    }

    pub fn thaw(&self) {
        signal(self.pid(), "CONT");
    }

    /// `kill -9`, and waited for.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            signal(c.id(), "CONT");
            signal(c.id(), "KILL");
            let _ = c.wait();
            untrack(c.id());
        }
    }

    /// The last lines of its log, for a failure message.
    pub fn tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

impl std::fmt::Debug for Proc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.what)
    }
}
