//! Operations against a real 3-member Patroni cluster and the real binary: the startup
//! summary, `patroxy status` (from etcd and from the admin endpoint, as a table and as JSON),
//! and the routing reports in etcd, which follow a switchover and vanish when an instance
//! stops or dies.

mod common;

use std::time::Duration;

use common::binary::{command, Binary};
use common::patroni::Cluster;
use common::*;
use patroxy::status::Status;
use patroxy::view::Report;

/// A config file for instance `name`, listening on `port` with its admin endpoint on `admin`.
fn config(dir: &std::path::Path, cluster: &Cluster, name: &str, port: u16, admin: u16) -> String {
    let file = dir.join(format!("{name}.toml"));
    let text = format!(
        "[etcd]\nendpoints = [\"{}\"]\n[cluster]\nscope = \"{}\"\n\
         [[listener]]\nname = \"primary\"\nlisten = \"127.0.0.1:{port}\"\n\
         [[listener]]\nname = \"replicas\"\nlisten = \"127.0.0.1:{}\"\nrole = \"replica\"\n\
         [admin]\nlisten = \"127.0.0.1:{admin}\"\n\
         [report]\ninstance = \"{name}\"\nttl = \"2s\"\n",
        cluster.etcd.url(),
        cluster.scope,
        free_port()
    );
    std::fs::write(&file, text).unwrap();
    file.display().to_string()
}

/// `patroxy status` with these arguments: its standard output.
async fn status(args: Vec<String>) -> String {
    let out = tokio::task::spawn_blocking(move || command().arg("status").args(args).output())
        .await
        .unwrap()
        .unwrap();
    assert!(
        out.status.success(),
        "patroxy status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

async fn report(cluster: &Cluster, instance: &str) -> Option<Report> {
    let mut etcd = cluster.etcd.client().await;
    let key = format!("/patroxy/{}/{instance}", cluster.scope);
    let resp = etcd.get(key, None).await.unwrap();
    let kv = resp.kvs().first()?;
    Some(serde_json::from_slice(kv.value()).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_routing_reports_follow_a_real_patroni_cluster() {
    let cluster = Cluster::start("ops", 3).await;
    let state = cluster.wait_healthy(3, Duration::from_secs(60)).await;
    let leader = state.leader.clone().unwrap();
    let sync = state.sync_standby.clone().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (port, admin) = (free_port(), free_port());
    let p1 = Binary::start(&[
        "run",
        "--config",
        &config(dir.path(), &cluster, "p1", port, admin),
    ]);
    wait_routed(port, cluster.port_of(&leader)).await;

    // One summary line at start: listeners, etcd, the cluster and its leader.
    p1.wait_log("serving: listeners", 1).await;
    let log = p1.log();
    let summary = log
        .lines()
        .find(|l| l.contains("serving: listeners"))
        .unwrap();
    let leader_at = format!("leader {leader} at 127.0.0.1:{}", cluster.port_of(&leader));
    for needle in [
        format!("primary on 127.0.0.1:{port} (primary, tls disable)"),
        cluster.etcd.url(),
        leader_at,
        "3 member(s)".to_owned(),
        "/patroxy/ops/p1".to_owned(),
    ] {
        assert!(summary.contains(&needle), "{needle:?} not in {summary}");
    }

    // The report names the leader, and status shows who routes where.
    let r = wait_for("p1's report", Duration::from_secs(20), || async {
        report(&cluster, "p1").await
    })
    .await;
    assert_eq!(r.leader.as_deref(), Some(leader.as_str()));
    assert_eq!(r.routes["primary"], vec![leader.clone()]);
    let etcd_args = || {
        vec![
            "--etcd".to_owned(),
            cluster.etcd.url(),
            "--scope".to_owned(),
            "ops".to_owned(),
        ]
    };
    let table = status(etcd_args()).await;
    let row = |name: &str| {
        table
            .lines()
            .find(|l| l.starts_with(&format!("| {name} ")))
            .unwrap_or_else(|| panic!("no row for {name} in\n{table}"))
            .to_owned()
    };
    assert!(row(&leader).contains("| Leader "), "{table}");
    assert!(row(&leader).contains("p1/primary"), "{table}");
    assert!(!row(&leader).contains("p1/replicas"), "{table}");
    assert!(row(&sync).contains("| Sync Standby "), "{table}");
    assert!(row(&sync).contains("p1/replicas"), "{table}");
    assert!(table.contains("patroxy p1 "), "{table}");

    let mut json_args = etcd_args();
    json_args.push("--json".into());
    let json: Status = serde_json::from_str(&status(json_args).await).unwrap();
    assert_eq!(json.clusters[0].members.len(), 3);
    assert_eq!(json.reports.len(), 1);
    // From the admin endpoint: this instance's listeners and its sessions per member.
    let (_client, _conn) = connect_with(port, "").await.unwrap();
    let from_admin = status(vec![
        "--admin".into(),
        format!("127.0.0.1:{admin}"),
        "--json".into(),
    ])
    .await;
    let from_admin: Status = serde_json::from_str(&from_admin).unwrap();
    let l = from_admin.clusters[0]
        .members
        .iter()
        .find(|m| m.name == leader)
        .unwrap();
    assert_eq!(l.routed_by, vec!["primary".to_owned()]);
    assert_eq!(l.sessions, Some(1));

    // A second instance, killed: its key expires with its lease.
    let admin2 = free_port();
    let p2 = Binary::start(&[
        "run",
        "--config",
        &config(dir.path(), &cluster, "p2", free_port(), admin2),
    ]);
    wait_for("p2's report", Duration::from_secs(20), || async {
        report(&cluster, "p2").await
    })
    .await;
    signal(p2.pid(), "KILL");
    wait_for("p2's report to expire", Duration::from_secs(20), || async {
        report(&cluster, "p2").await.is_none().then_some(())
    })
    .await;
    drop(p2);

    // A switchover: p1's report follows the new leader.
    cluster.switchover(&leader, &sync);
    let r = wait_for(
        "p1 to report the new leader",
        Duration::from_secs(30),
        || async {
            report(&cluster, "p1")
                .await
                .filter(|r| r.leader.as_deref() == Some(sync.as_str()) && r.primary.is_some())
        },
    )
    .await;
    assert_eq!(r.routes["primary"], vec![sync.clone()]);
    assert_eq!(
        r.primary,
        Some(format!("127.0.0.1:{}", cluster.port_of(&sync)))
    );

    // Stopped cleanly: the key is gone at once.
    let (exit, log) = p1.stop().await;
    assert!(exit.success(), "{log}");
    assert!(report(&cluster, "p1").await.is_none(), "{log}");
}
