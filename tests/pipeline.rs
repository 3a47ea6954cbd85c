//! Pipelines and drains: a real pipelining client (psycopg 3 in pipeline mode, on libpq)
//! sends Parse/Bind/Describe/Execute and a Flush, with no Sync yet, and reads its result. A
//! replica drain or a shutdown that starts meanwhile must let the pipeline finish, then end
//! the session with 57P01; it must not cut the result short.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::*;
use patroxy::policy::ListenerRole;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const LONG: Duration = Duration::from_secs(30);
const QUERY: &str = "SELECT pg_sleep(2), 42 AS answer";

/// psycopg 3 runs QUERY in a pipeline (extended protocol, fetched through a Flush request),
/// prints its answer, then tries one more statement and prints how the session ended.
const CLIENT: &str = r#"
import sys, psycopg
conn = psycopg.connect(sys.argv[1], autocommit=True)
try:
    with conn.pipeline():
        cur = conn.cursor()
        cur.execute(sys.argv[2])
        print("answer", cur.fetchone()[1], flush=True)
except psycopg.Error as e:
    print("pipeline failed", e.sqlstate, str(e).replace("\n", " "), flush=True)
    sys.exit(0)
try:
    conn.execute("SELECT 1")
    print("still open", flush=True)
except psycopg.Error as e:
    print("ended:", str(e).replace("\n", " "), flush=True)
"#;

struct Pipeliner {
    child: Child,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

impl Pipeliner {
    fn start(port: u16) -> Pipeliner {
        let conninfo = format!("host=127.0.0.1 port={port} user=postgres dbname=postgres");
        let mut child = Command::new("/usr/bin/python3")
            .args(["-c", CLIENT, &conninfo, QUERY])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("python3 with psycopg 3 (install python3-psycopg)");
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        Pipeliner { child, lines }
    }

    async fn line(&mut self) -> String {
        tokio::time::timeout(LONG, self.lines.next_line())
            .await
            .expect("the client printed nothing")
            .unwrap()
            .expect("the client ended without a word")
    }

    async fn finish(mut self) {
        let status = tokio::time::timeout(LONG, self.child.wait()).await;
        assert!(status.unwrap().unwrap().success());
    }
}

struct Replicated {
    etcd: Etcd,
    _p: Postgres,
    r: Postgres,
    keys: Keys,
    /// Last: fields drop in order, and the servers above must stop before it goes.
    _root: TempRoot,
}

async fn replicated(scope: &str) -> Replicated {
    let root = TempRoot::new();
    let etcd = Etcd::start(&root);
    let p = Postgres::primary(&root, "p");
    let r = Postgres::replica_of(&root, "r", &p);
    let mut keys = Keys::new(&etcd, scope).await;
    keys.member("p", p.port, "primary", "running").await;
    keys.member("r", r.port, "replica", "running").await;
    keys.leader("p").await;
    Replicated {
        _root: root,
        etcd,
        _p: p,
        r,
        keys,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_drain_lets_an_unsynced_pipeline_finish() {
    let mut c = replicated("pipedrain").await;
    let proxy = Proxy::start(&c.etcd, "pipedrain", |cfg| {
        cfg.listeners = vec![listener("ro", ListenerRole::Replica)];
        cfg.timeouts.replica_drain = LONG;
    })
    .await;
    wait_routed(proxy.port(), c.r.port).await;
    let mut client = Pipeliner::start(proxy.port());
    wait_query_running(c.r.port, QUERY).await;
    // The replica leaves the pool while the pipeline's Execute runs.
    c.keys.member("r", c.r.port, "replica", "stopped").await;
    assert_eq!(client.line().await, "answer 42");
    // Then the session ends. libpq reads the FATAL between statements; whether psycopg's
    // error keeps its text depends on when libpq met the end of the stream, so only the end
    // is asserted here (the drain tests check the 57P01 itself).
    let ended = client.line().await;
    assert!(ended.starts_with("ended: "), "{ended}");
    client.finish().await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_lets_an_unsynced_pipeline_finish() {
    let c = replicated("pipestop").await;
    let proxy = Proxy::start(&c.etcd, "pipestop", |cfg| {
        cfg.listeners = vec![listener("ro", ListenerRole::Replica)];
        cfg.timeouts.shutdown = LONG;
    })
    .await;
    wait_routed(proxy.port(), c.r.port).await;
    let mut client = Pipeliner::start(proxy.port());
    wait_query_running(c.r.port, QUERY).await;
    let stopping = tokio::spawn(proxy.stop());
    assert_eq!(client.line().await, "answer 42");
    let ended = client.line().await;
    assert!(ended.starts_with("ended: "), "{ended}");
    client.finish().await;
    tokio::time::timeout(AT_REST, stopping)
        .await
        .expect("the shutdown waited for its deadline")
        .unwrap();
}
