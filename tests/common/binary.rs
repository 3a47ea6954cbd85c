//! The real `patroxy` binary as a child process, with its log collected line by line.

use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub struct Binary {
    child: Option<Child>,
    log: Arc<Mutex<Vec<String>>>,
}

/// The binary, with no PATROXY_* variable inherited from the environment.
pub fn command() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_patroxy"));
    for (k, _) in std::env::vars() {
        if k.starts_with("PATROXY_") {
            c.env_remove(k);
        }
    }
    c
}

impl Binary {
    pub fn start(args: &[&str]) -> Binary {
        let mut child = command()
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("patroxy binary");
        super::track(child.id());
        let log = Arc::new(Mutex::new(Vec::new()));
        for out in [
            Box::new(child.stderr.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stdout.take().unwrap()),
        ] {
            let log = log.clone();
            std::thread::spawn(move || {
                use std::io::BufRead;
                for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                    log.lock().unwrap().push(line);
                }
            });
        }
        Binary {
            child: Some(child),
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Waits until `needle` has appeared in `n` log lines.
    pub async fn wait_log(&self, needle: &str, n: usize) {
        let limit = Duration::from_secs(30);
        let log = self.log.clone();
        super::wait_for(&format!("{n} log line(s) with {needle:?}"), limit, || {
            let found = log
                .lock()
                .unwrap()
                .iter()
                .filter(|l| l.contains(needle))
                .count();
            async move { (found >= n).then_some(()) }
        })
        .await;
    }

    /// SIGTERM, then the exit status and the whole log.
    pub async fn stop(mut self) -> (ExitStatus, String) {
        let mut child = self.child.take().expect("running");
        super::signal(child.id(), "TERM");
        let status = tokio::task::spawn_blocking(move || {
            let status = child.wait().unwrap();
            super::untrack(child.id());
            status
        })
        .await
        .unwrap();
        (status, self.log())
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            super::untrack(c.id());
        }
    }
}
