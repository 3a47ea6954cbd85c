//! A real ZooKeeper server (Debian's `zookeeperd` jar, standalone) on a free loopback port,
//! with its data under the test's temporary directory; stopped on drop.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::*;

pub struct ZooKeeper {
    child: Option<Child>,
    pub port: u16,
    dir: PathBuf,
}

impl ZooKeeper {
    pub fn start(root: &TempRoot) -> ZooKeeper {
        let dir = root.path().join("zookeeper");
        std::fs::create_dir_all(dir.join("data")).unwrap();
        let mut zk = ZooKeeper {
            child: None,
            port: free_port(),
            dir,
        };
        // Sessions of 2 to 60 s (ZooKeeper bounds them by 2 and 20 ticks by default).
        let cfg = format!(
            "tickTime=500\ndataDir={}\nclientPort={}\nclientPortAddress=127.0.0.1\n\
             admin.enableServer=false\nminSessionTimeout=2000\nmaxSessionTimeout=60000\n\
             4lw.commands.whitelist=ruok\n",
            zk.dir.join("data").display(),
            zk.port
        );
        std::fs::write(zk.config(), cfg).unwrap();
        zk.spawn();
        zk
    }

    fn config(&self) -> PathBuf {
        self.dir.join("zoo.cfg")
    }

    pub fn hosts(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) {
        let log_path = self.dir.with_extension("log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .unwrap();
        let child = Command::new("java")
            .arg("-cp")
            .arg("/etc/zookeeper/conf:/usr/share/java/zookeeper.jar")
            .arg(format!("-Dzookeeper.log.dir={}", self.dir.display()))
            .arg("-Dzookeeper.root.logger=WARN,CONSOLE")
            .arg("-Xmx256m")
            .arg("org.apache.zookeeper.server.quorum.QuorumPeerMain")
            .arg(self.config())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("java and ZooKeeper (install zookeeperd)");
        track(child.id());
        self.child = Some(child);
        let port = self.port;
        wait_ready(
            self.child.as_mut().unwrap(),
            "zookeeper",
            &log_path,
            Duration::from_secs(30),
            || ruok(port),
        );
    }

    /// Stops ZooKeeper abruptly, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            untrack(c.id());
        }
    }

    /// Starts it again on the same port and data: sessions within their timeout survive.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

/// ZooKeeper's own health word: `ruok` answered `imok`.
fn ruok(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    let mut answer = String::new();
    s.write_all(b"ruok").is_ok() && s.read_to_string(&mut answer).is_ok() && answer == "imok"
}

impl Drop for ZooKeeper {
    fn drop(&mut self) {
        self.kill();
    }
}
