//! End to end with real Patroni on the DCSs other than etcd: a 3-member cluster on ZooKeeper,
//! read by patroxy through its watch and, at the same time, through Patroni's REST API; and
//! a 3-member cluster on Patroni's Raft, read through the REST API. Pooled writers commit
//! numbered rows through a switchover, a `kill -9` of the leader, a frozen leader and a
//! ZooKeeper restart; every acknowledged write must be on the last primary. The clusters'
//! etcd is killed first: nothing here may need it. Then the REST source over https with a
//! client certificate, against a one-member cluster (on etcd, which patroxy does not read),
//! and the ZooKeeper watch's bound on what it holds.

mod common;

use std::future::Future;
use std::time::Duration;

use common::patroni::{Cluster, TestDcs};
use common::writer::*;
use common::*;
use patroxy::config::{Dcs, ListenerConfig, PoolMode};
use patroxy::policy::ListenerRole;
use tokio::time::Instant;

/// A patroxy on `dcs` for `cluster`: a transaction-pooled primary listener `rw` (pool of 8)
/// and an unpooled one, `direct`, with an admin endpoint; no routing report (it lives in
/// etcd).
async fn proxy_on(cluster: &Cluster, dcs: Dcs, urls: Vec<String>) -> Proxy {
    let zk = cluster.zookeeper.as_ref().map(|z| z.hosts());
    Proxy::start(&cluster.etcd, &cluster.scope, |cfg| {
        cfg.report.enabled = false;
        let c = &mut cfg.clusters[0];
        c.dcs = dcs;
        match dcs {
            Dcs::Zookeeper => c.zookeeper.hosts = vec![zk.unwrap()],
            Dcs::Rest => c.rest.urls = urls,
            Dcs::Etcd => {}
        }
        cfg.timeouts.connect_wait = Duration::from_secs(40);
        cfg.listeners = vec![
            ListenerConfig {
                pool_mode: PoolMode::Transaction,
                ..listener("rw", ListenerRole::Primary)
            },
            listener("direct", ListenerRole::Primary),
        ];
        cfg.pool.pool_size = 8;
        cfg.auth.trust = vec!["127.0.0.1/32".parse().unwrap()];
        cfg.admin.listen = Some("127.0.0.1:0".into());
    })
    .await
}

/// What one event did to a group of writers, as BENCHMARKS.md's failover table has it;
/// `named` is when the source first named the new leader (see `named_at`), if it changed.
fn event(
    name: &str,
    writers: &[Writer],
    t: Instant,
    new_port: u16,
    named: Option<Instant>,
) -> usize {
    let (failed, gap) = writers
        .iter()
        .map(|w| w.window(t))
        .fold((0, Duration::ZERO), |(f, g), (wf, wg)| (f + wf, g.max(wg)));
    let first = writers
        .iter()
        .filter_map(|w| {
            let log = w.log.lock().unwrap();
            log.iter()
                .find(|a| a.done >= t && a.result == Ok(new_port))
                .map(|a| a.done)
        })
        .min();
    let errors: Vec<String> = writers
        .iter()
        .flat_map(|w| {
            let log = w.log.lock().unwrap();
            log.iter()
                .filter(|a| a.done >= t)
                .filter_map(|a| a.result.clone().err())
                .take(2)
                .collect::<Vec<_>>()
        })
        .take(6)
        .collect();
    eprintln!(
        "{name}: {} writers, {failed} client-visible errors, longest gap {gap:?}, first write on the new primary {:?} after the event, {:?} after the source named it (named {:?} after the event); errors like {errors:?}",
        writers.len(),
        first.map(|f| f - t),
        first.zip(named).map(|(f, n)| f.saturating_duration_since(n)),
        named.map(|n| n - t),
    );
    assert!(
        gap < Duration::from_secs(40),
        "{name}: writes stopped for {gap:?}"
    );
    failed
}

/// When a source first names a leader other than `old`: each reader is polled every 10 ms in
/// its own task (a frozen member's REST API must not hold up the others' answers). Start it
/// before the event.
fn named_at<F, Fut>(old: &str, readers: Vec<F>) -> tokio::task::JoinHandle<Instant>
where
    F: Fn() -> Fut + Send + 'static,
    Fut: Future<Output = Option<String>> + Send,
{
    let (tx, mut rx) = tokio::sync::mpsc::channel(1);
    let pollers: Vec<_> = readers
        .into_iter()
        .map(|read| {
            let (tx, old) = (tx.clone(), old.to_owned());
            tokio::spawn(async move {
                loop {
                    if read().await.is_some_and(|l| l != old) {
                        let _ = tx.send(Instant::now()).await;
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
        })
        .collect();
    tokio::spawn(async move {
        let seen = tokio::time::timeout(EVENT, rx.recv()).await;
        pollers.iter().for_each(|p| p.abort());
        seen.ok().flatten().expect("no source named a new leader")
    })
}

/// When the leader znode, and a member's `/cluster`, first name a leader other than `old`.
fn named_by_both(
    cluster: &Cluster,
    old: &str,
) -> (
    tokio::task::JoinHandle<Instant>,
    tokio::task::JoinHandle<Instant>,
) {
    (
        named_at(old, vec![zookeeper_leader(cluster)]),
        named_at(old, rest_leaders(cluster)),
    )
}

/// The leader znode's content: the name ZooKeeper's watchers are told.
fn zookeeper_leader(
    cluster: &Cluster,
) -> impl Fn() -> std::pin::Pin<Box<dyn Future<Output = Option<String>> + Send>> {
    let hosts = cluster.zookeeper.as_ref().unwrap().hosts();
    let path = format!("/service/{}/leader", cluster.scope);
    let client = std::sync::Arc::new(tokio::sync::OnceCell::new());
    move || {
        let (hosts, path, client) = (hosts.clone(), path.clone(), client.clone());
        Box::pin(async move {
            let c = client
                .get_or_try_init(|| zookeeper_client::Client::connect(&hosts))
                .await
                .ok()?;
            let (data, _) = c.get_data(&path).await.ok()?;
            String::from_utf8(data).ok()
        })
    }
}

/// The leader one member's `/cluster` names: what the REST source reads.
fn rest_leader(
    url: String,
) -> impl Fn() -> std::pin::Pin<Box<dyn Future<Output = Option<String>> + Send>> {
    let getter = std::sync::Arc::new(
        patroxy::discovery::http_get::Getter::new(&Default::default()).unwrap(),
    );
    move || {
        let (getter, url) = (getter.clone(), url.clone());
        Box::pin(async move {
            let (status, body) = getter.get(&url, "/cluster").await.ok()?;
            let t = patroxy::discovery::cluster_api::parse(&body).ok()?;
            (status == 200).then_some(t.leader).flatten()
        })
    }
}

/// `rest_leader` for every member: the first to answer with the new leader counts.
fn rest_leaders(
    cluster: &Cluster,
) -> Vec<impl Fn() -> std::pin::Pin<Box<dyn Future<Output = Option<String>> + Send>>> {
    cluster.rest_urls().into_iter().map(rest_leader).collect()
}

async fn wait_all_on(writers: &[Writer], port: u16, since: Instant) {
    for w in writers {
        w.wait_acked_on(port, since).await;
    }
}

async fn leader_of(cluster: &Cluster) -> String {
    let s = cluster.wait_healthy_rejoining(3, EVENT, &[]).await;
    s.leader.unwrap()
}

async fn new_leader(cluster: &Cluster, old: &str) -> String {
    wait_for(
        &format!("a leader other than {old}"),
        EVENT,
        || async move { cluster.state().await?.leader.filter(|l| l != old) },
    )
    .await
}

/// The refusal of a new connection through `port` by a patroxy that has read nothing of its
/// cluster; it panics, naming `what` was routed, if the connection is made.
async fn refused_unread(port: u16, what: &str) -> String {
    let refused = connect(port).await.err().map(|e| message(&e));
    let refused = refused.unwrap_or_else(|| panic!("routed {what}"));
    assert!(
        refused.contains("not been read from its DCS"),
        "{what}: {refused}"
    );
    refused
}

/// `GET path` on an admin endpoint: the status code.
async fn admin_status(admin: std::net::SocketAddr, path: &str) -> Option<u16> {
    let getter = patroxy::discovery::http_get::Getter::new(&Default::default()).ok()?;
    let (status, _) = getter.get(&format!("http://{admin}"), path).await.ok()?;
    Some(status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zookeeper_cluster_through_its_watch_and_its_rest_api() {
    let mut cluster = Cluster::start_on("zk", 3, TestDcs::Zookeeper).await;
    cluster.etcd.kill();
    let watch = proxy_on(&cluster, Dcs::Zookeeper, Vec::new()).await;
    let rest = proxy_on(&cluster, Dcs::Rest, cluster.rest_urls()).await;
    let first = leader_of(&cluster).await;
    let setup = wait_for("the leader through patroxy", EVENT, || async {
        connect(watch.port_of("direct")).await.ok()
    })
    .await;
    setup
        .batch_execute("CREATE TABLE writes (id bigint PRIMARY KEY, port int NOT NULL)")
        .await
        .unwrap();
    drop(setup);
    // Both sources route to the leader, and say which source they are.
    for p in [&watch, &rest] {
        let t = wait_for("/topology", EVENT, || topology(p.admin.unwrap())).await;
        let kind = t["clusters"][0]["dcs"]["kind"]
            .as_str()
            .unwrap_or("")
            .to_owned();
        assert!(kind == "zookeeper" || kind == "rest", "{t}");
    }
    let watched: Vec<Writer> = (0..50)
        .map(|w| Writer::spawn_from(watch.port_of("rw"), w * 1_000_000))
        .collect();
    let polled: Vec<Writer> = (0..10)
        .map(|w| Writer::spawn_from(rest.port_of("rw"), (100 + w) * 1_000_000))
        .collect();
    wait_all_on(&watched, cluster.port_of(&first), Instant::now()).await;
    wait_all_on(&polled, cluster.port_of(&first), Instant::now()).await;

    // A planned switchover: the watch sees Patroni's failover znode and holds transactions.
    let candidate = cluster.wait_healthy(3, EVENT).await.sync_standby.unwrap();
    let (znode, answer) = named_by_both(&cluster, &first);
    let t = Instant::now();
    cluster.switchover(&first, &candidate);
    let port = cluster.port_of(&candidate);
    wait_all_on(&watched, port, t).await;
    wait_all_on(&polled, port, t).await;
    let (znode, answer) = (znode.await.ok(), answer.await.ok());
    let failed = event("zookeeper watch, switchover", &watched, t, port, znode);
    assert_eq!(failed, 0, "the watch's writers saw errors at a switchover");
    // The REST API shows no immediate switchover: what it costs is measured, not bounded.
    event(
        "REST poll (zookeeper), switchover",
        &polled,
        t,
        port,
        answer,
    );

    // kill -9 of the leader.
    let crashed = leader_of(&cluster).await;
    let (znode, answer) = named_by_both(&cluster, &crashed);
    let t = Instant::now();
    cluster.member_mut(&crashed).crash();
    let next = new_leader(&cluster, &crashed).await;
    let port = cluster.port_of(&next);
    wait_all_on(&watched, port, t).await;
    wait_all_on(&polled, port, t).await;
    let (znode, answer) = (znode.await.ok(), answer.await.ok());
    event("zookeeper watch, kill -9", &watched, t, port, znode);
    event("REST poll (zookeeper), kill -9", &polled, t, port, answer);
    cluster.restart(&crashed);

    // A frozen leader: its sessions end when its ZooKeeper session expires.
    let frozen = leader_of(&cluster).await;
    let (stuck, _) = connect_with(watch.port_of("direct"), "user=postgres")
        .await
        .unwrap();
    let (znode, answer) = named_by_both(&cluster, &frozen);
    let t = Instant::now();
    cluster.member(&frozen).freeze();
    let next = new_leader(&cluster, &frozen).await;
    let port = cluster.port_of(&next);
    wait_all_on(&watched, port, t).await;
    wait_all_on(&polled, port, t).await;
    let (znode, answer) = (znode.await.ok(), answer.await.ok());
    event("zookeeper watch, SIGSTOP", &watched, t, port, znode);
    event("REST poll (zookeeper), SIGSTOP", &polled, t, port, answer);
    let ended = tokio::time::timeout(Duration::from_secs(5), stuck.batch_execute("SELECT 1")).await;
    assert!(
        matches!(ended, Ok(Err(_))),
        "a session on the frozen leader was not ended: {ended:?}"
    );
    cluster.member_mut(&frozen).fence();
    cluster.restart(&frozen);

    // ZooKeeper restarted under load: the watch reads everything again and goes on.
    let leader = leader_of(&cluster).await;
    let port = cluster.port_of(&leader);
    let t = Instant::now();
    cluster.zookeeper.as_mut().unwrap().restart();
    wait_all_on(&watched, port, Instant::now()).await;
    event(
        "zookeeper watch, ZooKeeper restart",
        &watched,
        t,
        port,
        None,
    );
    wait_for("the watch up again", EVENT, || async {
        (admin_status(watch.admin.unwrap(), "/ready").await == Some(200)).then_some(())
    })
    .await;

    let mut all = watched;
    all.extend(polled);
    nothing_lost(all, port).await;
    watch.stop().await;
    rest.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_cluster_through_the_rest_api() {
    let mut cluster = Cluster::start_on("raft", 3, TestDcs::Raft).await;
    cluster.etcd.kill();
    // A member's REST API that answers nothing comes first: another member answers.
    let mut urls = vec![format!("http://127.0.0.1:{}", free_port())];
    urls.extend(cluster.rest_urls());
    let proxy = proxy_on(&cluster, Dcs::Rest, urls).await;
    // The same URLs under another scope (a configuration naming the wrong cluster): the
    // members answer for theirs, so nothing is routed.
    let stranger = Proxy::start(&cluster.etcd, "elsewhere", |cfg| {
        cfg.report.enabled = false;
        cfg.clusters[0].dcs = Dcs::Rest;
        cfg.clusters[0].rest.urls = cluster.rest_urls();
        cfg.timeouts.connect_wait = Duration::from_secs(2);
        cfg.auth.trust = vec!["127.0.0.1/32".parse().unwrap()];
        cfg.admin.listen = Some("127.0.0.1:0".into());
        cfg.listeners = vec![
            listener("rw", ListenerRole::Primary),
            listener("ro", ListenerRole::Replica),
        ];
    })
    .await;
    let first = leader_of(&cluster).await;
    let setup = wait_for("the leader through patroxy", EVENT, || async {
        connect(proxy.port_of("direct")).await.ok()
    })
    .await;
    setup
        .batch_execute("CREATE TABLE writes (id bigint PRIMARY KEY, port int NOT NULL)")
        .await
        .unwrap();
    drop(setup);
    for name in ["rw", "ro"] {
        let refused = refused_unread(stranger.port_of(name), "a cluster of another scope").await;
        eprintln!("a patroxy for another scope, {name}: {refused}");
    }
    let t = topology(stranger.admin.unwrap()).await.unwrap();
    let members = t["clusters"][0]["members"].as_array().map(Vec::len);
    assert_eq!(
        members,
        Some(0),
        "another scope's members were taken in: {t}"
    );
    stranger.stop().await;
    let writers: Vec<Writer> = (0..20)
        .map(|w| Writer::spawn_from(proxy.port_of("rw"), w * 1_000_000))
        .collect();
    wait_all_on(&writers, cluster.port_of(&first), Instant::now()).await;

    let candidate = cluster.wait_healthy(3, EVENT).await.sync_standby.unwrap();
    let answer = named_at(&first, rest_leaders(&cluster));
    let t = Instant::now();
    cluster.switchover(&first, &candidate);
    let port = cluster.port_of(&candidate);
    wait_all_on(&writers, port, t).await;
    let answer = answer.await.ok();
    event("REST poll (raft), switchover", &writers, t, port, answer);

    let crashed = leader_of(&cluster).await;
    let answer = named_at(&crashed, rest_leaders(&cluster));
    let t = Instant::now();
    cluster.member_mut(&crashed).crash();
    let next = new_leader(&cluster, &crashed).await;
    let port = cluster.port_of(&next);
    wait_all_on(&writers, port, t).await;
    let answer = answer.await.ok();
    event("REST poll (raft), kill -9", &writers, t, port, answer);
    cluster.restart(&crashed);
    let leader = leader_of(&cluster).await;
    let port = cluster.port_of(&leader);

    // Every member's REST API down (their Patroni stopped, PostgreSQL still up): readiness
    // goes and new connections are refused, not routed to the last answer.
    let admin = proxy.admin.unwrap();
    for m in &cluster.members {
        signal(m.patroni_pid().unwrap(), "STOP");
    }
    wait_for("readiness to go", EVENT, || async {
        (admin_status(admin, "/ready").await == Some(503)).then_some(())
    })
    .await;
    let refused = connect(proxy.port_of("direct"))
        .await
        .err()
        .map(|e| message(&e));
    for m in &cluster.members {
        signal(m.patroni_pid().unwrap(), "CONT");
    }
    let refused = refused.expect("a new connection was routed with the REST API down");
    assert!(refused.contains("REST API"), "{refused}");
    wait_for("readiness back", EVENT, || async {
        (admin_status(admin, "/ready").await == Some(200)).then_some(())
    })
    .await;
    let leader_now = leader_of(&cluster).await;
    let port_now = cluster.port_of(&leader_now);
    wait_all_on(&writers, port_now, Instant::now()).await;
    let _ = port;

    // Paused (maintenance): the leader's Patroni is restarted under its running PostgreSQL,
    // as for an upgrade. Its REST API refuses meanwhile, which says nothing of its lock:
    // its sessions stay; new connections are refused once no answer is fresh.
    cluster.ctl(&["pause", "--wait"]);
    let (held, _held_conn) = connect_with(proxy.port_of("direct"), "").await.unwrap();
    held.batch_execute("SELECT 1").await.unwrap();
    cluster.member_mut(&leader_now).kill_patroni();
    wait_for(
        "readiness to go while the leader's Patroni is away",
        EVENT,
        || async { (admin_status(admin, "/ready").await == Some(503)).then_some(()) },
    )
    .await;
    let kept = held.batch_execute("SELECT 1").await;
    cluster.restart(&leader_now);
    assert!(
        kept.is_ok(),
        "a session on the paused leader was drained while its Patroni restarted: {kept:?}"
    );
    wait_for("readiness back after the restart", EVENT, || async {
        (admin_status(admin, "/ready").await == Some(200)).then_some(())
    })
    .await;
    cluster.ctl(&["resume", "--wait"]);
    nothing_lost(writers, port_now).await;
    proxy.stop().await;
}

/// Patroni's REST API over https with `verify_client: required`: patroxy verifies the
/// members against `rest.ca_file` (the leader's `/leader` too, at the address Patroni
/// advertises) and presents `rest.cert_file`; without the certificate it reads nothing and
/// routes nothing. The cluster is on etcd, which patroxy does not read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rest_source_speaks_tls_with_a_client_certificate() {
    let certs = TempRoot::new();
    let ca = common::tls::TestCa::new(certs.path(), "patroni-ca");
    let api = ca.issue("patroni-api", &["127.0.0.1"]);
    let client = ca.issue("patroxy-client", &["patroxy"]);
    let restapi = format!(
        "  certfile: {}\n  keyfile: {}\n  cafile: {}\n  verify_client: required\n",
        api.cert_file.display(),
        api.key_file.display(),
        ca.cert_file.display()
    );
    let cluster = Cluster::start_with("resttls", 1, TestDcs::Etcd, &restapi).await;
    let urls = cluster.rest_urls();
    assert!(urls.iter().all(|u| u.starts_with("https://")), "{urls:?}");
    let stranger = common::tls::TestCa::new(certs.path(), "another-ca");
    let start = |cert: bool, ca: &common::tls::TestCa, wait: u64| {
        let (urls, ca, client) = (urls.clone(), ca.cert_file.clone(), client.clone());
        Proxy::start(&cluster.etcd, &cluster.scope, move |cfg| {
            cfg.report.enabled = false;
            let c = &mut cfg.clusters[0];
            c.dcs = Dcs::Rest;
            c.rest.urls = urls;
            c.rest.ca_file = Some(ca);
            if cert {
                c.rest.cert_file = Some(client.cert_file);
                c.rest.key_file = Some(client.key_file);
            }
            cfg.auth.trust = vec!["127.0.0.1/32".parse().unwrap()];
            cfg.timeouts.connect_wait = Duration::from_secs(wait);
        })
    };
    let proxy = start(true, &ca, 20).await;
    let port = server_port(proxy.port()).await.unwrap();
    assert_eq!(port as u16, cluster.members[0].pg_port);
    proxy.stop().await;
    for (what, cert, ca) in [
        (
            "without the client certificate Patroni requires",
            false,
            &ca,
        ),
        ("trusting a REST API its CA did not sign", true, &stranger),
    ] {
        let p = start(cert, ca, 2).await;
        refused_unread(p.port(), what).await;
        p.stop().await;
    }
}

/// More znodes under a cluster's path than any Patroni cluster has (4,200 members, written
/// under the watch): the cluster counts as unknown (`/ready` says why) rather than patroxy
/// holding whatever a writer puts there; once they are gone it is read again. The znodes are
/// written by the test, in Patroni's layout, on a real ZooKeeper.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_znodes_make_the_cluster_unknown() {
    use zookeeper_client as zk;
    let root = TempRoot::new();
    let etcd = Etcd::start(&root);
    let server = common::zookeeper::ZooKeeper::start(&root);
    let client = wait_for("ZooKeeper", EVENT, || async {
        zk::Client::connect(&server.hosts()).await.ok()
    })
    .await;
    let persistent = zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all());
    let member = r#"{"conn_url":"postgres://127.0.0.1:5999/postgres","api_url":"http://127.0.0.1:1/patroni","state":"running","role":"master"}"#;
    for (path, data) in [
        ("/service", ""),
        ("/service/flood", ""),
        ("/service/flood/members", ""),
        ("/service/flood/members/a", member),
        ("/service/flood/leader", "a"),
    ] {
        client
            .create(path, data.as_bytes(), &persistent)
            .await
            .unwrap();
    }
    let proxy = Proxy::start(&etcd, "flood", |cfg| {
        cfg.report.enabled = false;
        cfg.clusters[0].dcs = Dcs::Zookeeper;
        cfg.clusters[0].zookeeper.hosts = vec![server.hosts()];
        cfg.admin.listen = Some("127.0.0.1:0".into());
    })
    .await;
    let admin = proxy.admin.unwrap();
    let ready = |want: u16| async move {
        wait_for(&format!("/ready {want}"), EVENT, || async {
            (admin_status(admin, "/ready").await == Some(want)).then_some(())
        })
        .await
    };
    ready(200).await;
    let names: Vec<String> = (0..4200)
        .map(|i| format!("/service/flood/members/m{i}"))
        .collect();
    for n in &names {
        client.create(n, b"{}", &persistent).await.unwrap();
    }
    ready(503).await;
    let t = topology(admin).await.unwrap();
    assert_eq!(
        t["clusters"][0]["dcs"]["watching"], false,
        "{}",
        t["clusters"][0]["dcs"]
    );
    for n in &names {
        client.delete(n, None).await.unwrap();
    }
    ready(200).await;
    proxy.stop().await;
}
