//! The `patroxy` binary itself: check-config, flags and PATROXY_* variables, readable errors,
//! and a graceful shutdown on SIGTERM.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

fn patroxy() -> Command {
    common::binary::command()
}

#[test]
fn check_config_accepts_the_example() {
    let out = patroxy()
        .args([
            "check-config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config/patroxy.toml"),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).ends_with(": ok\n"));
}

#[test]
fn check_config_warns_of_what_is_allowed_but_unsafe() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("wide.toml");
    std::fs::write(
        &file,
        "[etcd]\nendpoints = [\"http://127.0.0.1:2379\"]\nusername = \"u\"\npassword = \"p\"\n\
         [cluster]\nscope = \"demo\"\n[[listener]]\nlisten = \"127.0.0.1:6432\"\npool_mode = \"session\"\n\
         [auth]\ntrust = [\"0.0.0.0/0\"]\nadmin_users = [\"admin\"]\n[report]\naddress = \"127.0.0.1\"\n",
    )
    .unwrap();
    let out = patroxy().arg("check-config").arg(&file).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "allowed: {text}");
    for needle in [
        "warning: auth.trust: 0.0.0.0/0",
        "warning: etcd: the password goes in cleartext",
        "warning: report.address: a loopback address",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
}

#[test]
fn check_config_prints_every_problem_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(
        &file,
        "[etcd]\nendpoints = [\"localhost\"]\n[[listener]]\nlisten = \"x\"\n[timeouts]\ndrain = \"0ms\"\n",
    )
    .unwrap();
    let out = patroxy().arg("check-config").arg(&file).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "4 problem(s)",
        "etcd.endpoints",
        "cluster.scope",
        "listener[0].listen",
        "timeouts.drain",
    ] {
        assert!(err.contains(needle), "missing {needle:?} in:\n{err}");
    }
    let out = patroxy()
        .args(["check-config", "/nonexistent.toml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "one readable line: {err}");
    assert!(
        err.starts_with("patroxy: cannot read /nonexistent.toml"),
        "{err}"
    );
}

#[test]
fn run_refuses_bad_flags_in_one_line() {
    let err = fails_in_one_line(patroxy().args([
        "run",
        "--etcd",
        "127.0.0.1:2379",
        "--primary",
        "127.0.0.1:1",
    ]));
    assert!(
        err.starts_with("patroxy: 2 problem(s) in the configuration: "),
        "{err}"
    );
    assert!(err.contains("must start with http://"), "{err}");
    assert!(err.contains("; cluster.scope"), "{err}");
}

/// Runs the command, which must fail with one line on stderr; returns that line.
fn fails_in_one_line(cmd: &mut Command) -> String {
    let out = cmd.stdin(Stdio::null()).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    err
}

#[test]
fn status_and_run_report_unreachable_etcd_and_bad_certificates_in_one_line() {
    let etcd = format!("http://127.0.0.1:{}", free_port());
    let err = fails_in_one_line(patroxy().args(["status", "--scope", "x", "--etcd", &etcd]));
    assert!(err.starts_with("patroxy: etcd"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
    std::fs::write(&cert, "not a certificate").unwrap();
    std::fs::write(&key, "not a key").unwrap();
    // A key others may read would add a warning line.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let file = dir.path().join("tls.toml");
    std::fs::write(
        &file,
        format!(
            "[cluster]\nscope = \"x\"\n[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n[[listener]]\nlisten = \"127.0.0.1:0\"\n",
            cert.display(),
            key.display()
        ),
    )
    .unwrap();
    let err = fails_in_one_line(patroxy().args(["run", "--config"]).arg(&file));
    assert!(err.contains("c.pem: no certificate"), "{err}");
}

#[test]
fn run_reports_a_busy_port_in_one_line() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let err = fails_in_one_line(patroxy().args(["run", "--scope", "x", "--primary", &addr]));
    assert!(
        err.contains(&format!("listener primary on {addr}")),
        "{err}"
    );
    assert!(err.to_lowercase().contains("in use"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_routes_from_flags_and_env_and_drains_on_sigterm() {
    let root = TempRoot::new();
    let etcd = Etcd::start(&root);
    let pg = Postgres::primary(&root, "a");
    let mut keys = Keys::new(&etcd, "clidemo").await;
    keys.member("a", pg.port, "primary", "running").await;
    keys.leader("a").await;

    let port = free_port();
    let mut child = patroxy()
        .args([
            "run",
            "--etcd",
            &etcd.url(),
            "--primary",
            &format!("127.0.0.1:{port}"),
        ])
        .env("PATROXY_SCOPE", "clidemo")
        .env("PATROXY_NAMESPACE", "/service")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (client, conn) = wait_for("patroxy to serve", Duration::from_secs(30), || async {
        let (c, conn) = connect_with(port, "").await.ok()?;
        Some((c, conn))
    })
    .await;
    let reached: i32 = client
        .query_one("SELECT inet_server_port()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(reached, pg.port as i32);

    signal(child.id(), "TERM");
    let ended = tokio::time::timeout(Duration::from_secs(30), conn)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        ended.err().and_then(|e| sqlstate(&e)).as_deref(),
        Some("57P01")
    );
    let status = tokio::task::spawn_blocking(move || {
        let status = child.wait().unwrap();
        let mut log = String::new();
        std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut log).unwrap();
        (status, log)
    })
    .await
    .unwrap();
    let (status, log) = status;
    assert!(status.success(), "exit: {status:?}\n{log}");
    assert!(
        log.contains("leader (none) -> a"),
        "log of {} bytes: {log}",
        log.len()
    );
    assert!(log.contains("session closed"), "{log}");
    assert!(log.contains("shutdown complete"), "{log}");
}

#[test]
fn the_etcd_password_never_reaches_errors_or_logs() {
    let dir = tempfile::tempdir().unwrap();
    let secret = "hunter2-never-print-me";
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        format!("[etcd]\nendpoints = [\"nope\"]\nusername = \"u\"\npassword = \"{secret}\"\n[cluster]\nscope = \"x\"\n"),
    )
    .unwrap();
    let out = patroxy().arg("check-config").arg(&bad).output().unwrap();
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success() && !all.contains(secret), "{all}");

    // A valid file, etcd unreachable: patroxy logs its retries, never the password.
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        format!(
            "[etcd]\nendpoints = [\"http://127.0.0.1:{}\"]\nusername = \"u\"\npassword = \"{secret}\"\n\
             [cluster]\nscope = \"x\"\n[[listener]]\nlisten = \"127.0.0.1:0\"\n",
            free_port()
        ),
    )
    .unwrap();
    let mut child = patroxy()
        .args(["run", "--log", "debug", "--config"])
        .arg(&good)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Read the log as it comes; once an etcd retry is logged, stop patroxy and read the rest.
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let mut log = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = rx
            .recv_timeout(left)
            .expect("patroxy logged no etcd retry within 20 s");
        let retry = line.contains("etcd watch lost");
        log.push(line);
        if retry {
            break;
        }
    }
    signal(child.id(), "TERM");
    let status = child.wait().unwrap();
    log.extend(rx.iter());
    let all = log.join("\n");
    assert!(status.success(), "{all}");
    assert!(!all.contains(secret), "the password leaked:\n{all}");
}
