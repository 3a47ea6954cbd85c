//! Session and transaction pooling against real PostgreSQL: patroxy authenticates clients
//! itself (SCRAM against a verifier from the auth_file, md5, unknown users and wrong passwords
//! refused alike), logs in to the server as the same user (SCRAM pass-through with the
//! client's recovered key, md5 with the stored secret), reuses server connections with
//! nothing left over from the last client, queues clients for a full pool, routes cancels
//! with its own keys, keeps each client's settings apart on shared connections, and follows
//! the leader (a client between transactions rides it out).

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;
use patroxy::config::PoolMode;
use patroxy::policy::ListenerRole;

const LONG: Duration = Duration::from_secs(30);

/// A primary with alice (SCRAM), bob (md5) and a table; and an auth_file with their secrets
/// as PostgreSQL stores them, plus carol's plain password.
async fn users(root: &TempRoot, pg: &Postgres) -> PathBuf {
    let c = connect(pg.port).await.unwrap();
    c.batch_execute(
        "SET password_encryption = 'scram-sha-256'; CREATE ROLE alice LOGIN PASSWORD 'wonder';
         SET password_encryption = 'md5'; CREATE ROLE bob LOGIN PASSWORD 'builder';
         CREATE ROLE carol LOGIN;
         CREATE TABLE IF NOT EXISTS kept (x int); GRANT ALL ON kept TO alice, bob;",
    )
    .await
    .unwrap();
    let secret = |user: &'static str| {
        let c = &c;
        async move {
            let row = c
                .query_one(
                    "SELECT rolpassword FROM pg_authid WHERE rolname = $1",
                    &[&user],
                )
                .await
                .unwrap();
            row.get::<_, String>(0)
        }
    };
    let file = root.path().join("userlist.txt");
    let text = format!(
        "; patroxy's auth_file\n\"alice\" \"{}\"\n\"bob\" \"{}\"\n\"carol\" \"sesame\"\n",
        secret("alice").await,
        secret("bob").await
    );
    std::fs::write(&file, text).unwrap();
    file
}

/// Two servers that share their users' secrets, as the members of a Patroni cluster do
/// (pg_authid is replicated: SCRAM pass-through needs the verifier the client was checked
/// against), described with `a` the leader.
struct Moving {
    etcd: Etcd,
    a: Postgres,
    b: Postgres,
    keys: Keys,
    file: PathBuf,
    _root: TempRoot,
}

async fn moving(scope: &str) -> Moving {
    let root = TempRoot::new();
    let etcd = Etcd::start(&root);
    let a = Postgres::primary(&root, "a");
    let b = Postgres::primary(&root, "b");
    let file = users(&root, &a).await;
    let (from_a, to_b) = (
        connect(a.port).await.unwrap(),
        connect(b.port).await.unwrap(),
    );
    for user in ["alice", "bob"] {
        let sql = "SELECT rolpassword FROM pg_authid WHERE rolname = $1";
        let secret: String = from_a.query_one(sql, &[&user]).await.unwrap().get(0);
        let create = format!("CREATE ROLE {user} LOGIN PASSWORD '{secret}'");
        to_b.batch_execute(&create).await.unwrap();
    }
    let mut keys = Keys::new(&etcd, scope).await;
    keys.member("a", a.port, "primary", "running").await;
    keys.member("b", b.port, "replica", "running").await;
    keys.leader("a").await;
    Moving {
        etcd,
        a,
        b,
        keys,
        file,
        _root: root,
    }
}

fn pooled(cfg: &mut Config, auth_file: PathBuf) {
    cfg.listeners = vec![ListenerConfig {
        pool_mode: PoolMode::Session,
        ..listener("pooled", ListenerRole::Primary)
    }];
    cfg.auth.auth_file = Some(auth_file);
}

async fn login(
    port: u16,
    user: &str,
    password: &str,
    extra: &str,
) -> Result<(tokio_postgres::Client, ConnTask), tokio_postgres::Error> {
    let s = format!(
        "host=127.0.0.1 port={port} user={user} password={password} dbname=postgres {extra}"
    );
    let (c, conn) = tokio_postgres::connect(&s, tokio_postgres::NoTls).await?;
    Ok((c, tokio::spawn(conn)))
}

async fn one(c: &tokio_postgres::Client, sql: &str) -> String {
    c.query_one(sql, &[]).await.unwrap().get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patroxy_authenticates_clients_and_logs_in_as_them() {
    let (root, etcd, pg) = one_primary("poolauth").await;
    let file = users(&root, &pg).await;
    let proxy = Proxy::start(&etcd, "poolauth", |cfg| pooled(cfg, file)).await;
    let port = proxy.port();

    // SCRAM to patroxy, SCRAM pass-through to a server whose pg_hba requires it for alice.
    let (alice, _c) = login(port, "alice", "wonder", "").await.unwrap();
    assert_eq!(one(&alice, "SELECT current_user::text").await, "alice");
    // md5 both ways for bob.
    let (bob, _c) = login(port, "bob", "builder", "").await.unwrap();
    assert_eq!(one(&bob, "SELECT current_user::text").await, "bob");
    // A plain password in the file: SCRAM to patroxy; the server trusts carol's address.
    let (carol, _c) = login(port, "carol", "sesame", "").await.unwrap();
    assert_eq!(one(&carol, "SELECT current_user::text").await, "carol");

    // A wrong password and an unknown user get the same answer.
    for (user, password) in [("alice", "nope"), ("bob", "nope"), ("mallory", "x")] {
        let Err(e) = login(port, user, password, "").await else {
            panic!("{user} was let in");
        };
        assert_eq!(sqlstate(&e).as_deref(), Some("28P01"), "{user}: {e}");
        assert_eq!(
            message(&e),
            format!("password authentication failed for user \"{user}\"")
        );
    }
    // psql (libpq) too.
    let out = tokio::process::Command::new("psql")
        .env("PGPASSWORD", "wonder")
        .args([
            &format!("host=127.0.0.1 port={port} user=alice dbname=postgres"),
            "-XAtc",
            "SELECT current_user",
        ])
        .output()
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "alice",
        "{out:?}"
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_connection_is_reused_with_nothing_left_from_the_last_client() {
    install_metrics();
    let (root, etcd, pg) = one_primary("poolreuse").await;
    let file = users(&root, &pg).await;
    let proxy = Proxy::start(&etcd, "poolreuse", |cfg| {
        pooled(cfg, file);
        cfg.pool.pool_size = 1;
    })
    .await;
    let port = proxy.port();

    // The first client leaves a mess: a temp table, a setting, an open transaction.
    let (first, conn) = login(port, "alice", "wonder", "application_name=first")
        .await
        .unwrap();
    let pid = one(&first, "SELECT pg_backend_pid()::text").await;
    assert_eq!(one(&first, "SHOW application_name").await, "first");
    first
        .batch_execute(
            "CREATE TEMP TABLE scratch (x int); SET search_path = nowhere;
             BEGIN; INSERT INTO public.kept VALUES (1);",
        )
        .await
        .unwrap();
    drop(first);
    let _ = conn.await;

    // The next one gets the same server connection, clean.
    let check = |extra: &'static str| async move {
        wait_for("the connection back in the pool", LONG, || async {
            login(port, "alice", "wonder", extra).await.ok()
        })
        .await
    };
    let (second, _c) = check("").await;
    assert_eq!(
        one(&second, "SELECT pg_backend_pid()::text").await,
        pid,
        "reused"
    );
    assert_eq!(
        one(
            &second,
            "SELECT coalesce(to_regclass('scratch')::text, 'gone')"
        )
        .await,
        "gone"
    );
    assert_eq!(one(&second, "SHOW search_path").await, "\"$user\", public");
    assert_eq!(one(&second, "SHOW application_name").await, "");
    assert_eq!(
        one(&second, "SELECT count(*)::text FROM public.kept").await,
        "0",
        "rolled back"
    );
    drop(second);

    // Startup parameters are applied to whichever connection serves the client.
    let (third, _c) = check("application_name=third options='-c statement_timeout=7s'").await;
    assert_eq!(one(&third, "SELECT pg_backend_pid()::text").await, pid);
    assert_eq!(one(&third, "SHOW application_name").await, "third");
    assert_eq!(
        one(&third, "SHOW statement_timeout").await,
        "7s",
        "options apply too"
    );
    let resets = sample(
        &metrics_text(),
        "patroxy_server_resets_total",
        &[r#"result="ok""#],
    );
    assert!(resets.unwrap() >= 2.0, "{}", metrics_text());
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_pool_queues_clients_then_refuses_them_clearly() {
    let (root, etcd, pg) = one_primary("poolwait").await;
    let file = users(&root, &pg).await;
    let proxy = Proxy::start(&etcd, "poolwait", |cfg| {
        pooled(cfg, file);
        cfg.pool.pool_size = 1;
        cfg.pool.query_wait_timeout = Duration::from_secs(2);
    })
    .await;
    let port = proxy.port();
    // A session holds its server connection from its first query until it leaves.
    let (holder, holder_conn) = login(port, "alice", "wonder", "").await.unwrap();
    holder.batch_execute("SELECT 1").await.unwrap();
    // The startup is answered without a server; the first query waits in line, then fails.
    let (late, _c) = login(port, "alice", "wonder", "").await.unwrap();
    let e = late.batch_execute("SELECT 1").await.unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("53300"), "{e}");
    assert!(
        message(&e).contains("query_wait_timeout"),
        "{}",
        message(&e)
    );
    // Another user's pool is not this one: bob is served meanwhile.
    let (bob, _c) = login(port, "bob", "builder", "").await.unwrap();
    assert_eq!(one(&bob, "SELECT current_user::text").await, "bob");
    // A waiting client is served as soon as the holder leaves.
    let (waiter, _c) = login(port, "alice", "wonder", "").await.unwrap();
    let waiting = tokio::spawn(async move { waiter.batch_execute("SELECT 1").await });
    drop(holder);
    let _ = holder_conn.await;
    tokio::time::timeout(LONG, waiting)
        .await
        .unwrap()
        .unwrap()
        .expect("served once the holder left");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancels_reach_the_server_connection_the_client_holds() {
    let (root, etcd, pg) = one_primary("poolcancel").await;
    let file = users(&root, &pg).await;
    let proxy = Proxy::start(&etcd, "poolcancel", |cfg| pooled(cfg, file)).await;
    let (c, _conn) = login(proxy.port(), "alice", "wonder", "").await.unwrap();
    let token = c.cancel_token();
    let sleeping = tokio::spawn(async move {
        let r = c.simple_query("SELECT pg_sleep(60)").await.map(|_| ());
        (c, r)
    });
    wait_query_running(pg.port, "SELECT pg_sleep(60)").await;
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", proxy.port()))
        .await
        .unwrap();
    token
        .cancel_query_raw(stream, tokio_postgres::NoTls)
        .await
        .unwrap();
    let (c, r) = tokio::time::timeout(LONG, sleeping).await.unwrap().unwrap();
    assert_eq!(sqlstate(&r.unwrap_err()).as_deref(), Some("57014"));
    assert_eq!(one(&c, "SELECT 'still here'").await, "still here");
    proxy.stop().await;
}

/// A primary, its users and an auth_file, and patroxy in front with a transaction pool of
/// `size` (`tune` adjusts the rest).
struct Pooled {
    pg: Postgres,
    proxy: Proxy,
    etcd: Etcd,
    _root: TempRoot,
}

async fn pooled_primary(scope: &str, size: usize, tune: impl FnOnce(&mut Config)) -> Pooled {
    let (root, etcd, pg) = one_primary(scope).await;
    let file = users(&root, &pg).await;
    let proxy = Proxy::start(&etcd, scope, |cfg| {
        transaction_pooled(cfg, file, size);
        tune(cfg);
    })
    .await;
    Pooled {
        pg,
        proxy,
        etcd,
        _root: root,
    }
}

/// Server connections the pools hold on `pg` for `users`, as PostgreSQL counts them.
async fn backends(pg: &Postgres, users: &str) -> i64 {
    let c = connect(pg.port).await.unwrap();
    let sql =
        format!("SELECT count(*) FROM pg_stat_activity WHERE usename = ANY('{{{users}}}'::text[])");
    c.query_one(&sql, &[]).await.unwrap().get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caps_over_several_pools_hold_and_make_room_from_idle_connections() {
    let (root, etcd, pg) = one_primary("poolcaps").await;
    let file = users(&root, &pg).await;
    // The same story under each cap: per database, and per member of the cluster.
    for cap in ["max_db_connections", "max_server_connections"] {
        let proxy = Proxy::start(&etcd, "poolcaps", |cfg| {
            pooled(cfg, file.clone());
            cfg.pool.pool_size = 4;
            cfg.pool.query_wait_timeout = Duration::from_secs(1);
            match cap {
                "max_db_connections" => cfg.pool.max_db_connections = 2,
                _ => cfg.clusters[0].max_server_connections = 2,
            }
        })
        .await;
        let port = proxy.port();
        // alice's two sessions take both places: bob waits, then gets a clear error.
        // (bob logs in first: his greeting needs a server connection, which stays idle.)
        let (bob, _b0) = login(port, "bob", "builder", "").await.unwrap();
        let (a1, a1_conn) = login(port, "alice", "wonder", "").await.unwrap();
        let (a2, _a2) = login(port, "alice", "wonder", "").await.unwrap();
        a1.batch_execute("SELECT 1").await.unwrap();
        a2.batch_execute("SELECT 1").await.unwrap();
        let e = bob.batch_execute("SELECT 1").await.unwrap_err();
        assert_eq!(sqlstate(&e).as_deref(), Some("53300"), "{cap}: {e}");
        assert!(message(&e).contains(cap), "{}", message(&e));
        assert_eq!(backends(&pg, "alice,bob").await, 2, "{cap}");
        // alice's first session leaves: its connection goes back to her pool, idle, and
        // bob's next session closes it to make room (the refusal ended the last one).
        drop(a1);
        let _ = a1_conn.await;
        let (bob, _b) = login(port, "bob", "builder", "").await.unwrap();
        assert_eq!(one(&bob, "SELECT current_user::text").await, "bob", "{cap}");
        assert_eq!(backends(&pg, "alice,bob").await, 2, "{cap}");
        assert_eq!(one(&a2, "SELECT current_user::text").await, "alice");
        proxy.stop().await;
        wait_for("the pools' connections to close", LONG, || async {
            (backends(&pg, "alice,bob").await == 0).then_some(())
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_pool_size_keeps_connections_open_for_a_used_pool() {
    let Pooled {
        pg,
        proxy,
        etcd: _etcd,
        _root,
    } = pooled_primary("poolmin", 5, |cfg| {
        cfg.pool.min_pool_size = 3;
    })
    .await;
    // Nothing is opened for a pool nobody used.
    assert_eq!(backends(&pg, "alice").await, 0);
    let (c, _conn) = login(proxy.port(), "alice", "wonder", "").await.unwrap();
    c.batch_execute("SELECT 1").await.unwrap();
    wait_for("three of alice's connections", LONG, || async {
        (backends(&pg, "alice").await == 3).then_some(())
    })
    .await;
    // A connection that closes is replaced.
    connect(pg.port)
        .await
        .unwrap()
        .batch_execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE usename = 'alice' LIMIT 1",
        )
        .await
        .unwrap();
    wait_for("three again", LONG, || async {
        (backends(&pg, "alice").await == 3).then_some(())
    })
    .await;
    assert_eq!(one(&c, "SELECT current_user::text").await, "alice");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_that_stopped_answering_is_checked_and_not_lent() {
    let Pooled {
        pg,
        proxy,
        etcd: _etcd,
        _root,
    } = pooled_primary("poolcheck", 2, |cfg| {
        cfg.pool.server_check_delay = Duration::ZERO;
        cfg.timeouts.connect = Duration::from_secs(1);
    })
    .await;
    let (c, _conn) = login(proxy.port(), "alice", "wonder", "").await.unwrap();
    c.batch_execute("SELECT 1").await.unwrap();
    // Its server freezes without closing anything: the socket looks fine.
    let (direct, pid) = alices_backend(&pg).await;
    signal(pid as u32, "STOP");
    let answer = tokio::time::timeout(LONG, c.query_one("SELECT pg_backend_pid()", &[])).await;
    signal(pid as u32, "CONT");
    let on: i32 = answer
        .expect("the client is not lent the frozen connection")
        .unwrap()
        .get(0);
    assert_ne!(on, pid);
    direct
        .batch_execute(&format!("SELECT pg_terminate_backend({pid})"))
        .await
        .unwrap();
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_settings_in_a_transaction_pool_follow_their_client() {
    let Pooled {
        pg: _pg,
        proxy,
        etcd: _etcd,
        _root,
    } = pooled_primary("poolstate", 1, |_| {}).await;
    let port = proxy.port();
    let (a, _ac) = login(port, "alice", "wonder", "").await.unwrap();
    let (b, _bc) = login(port, "alice", "wonder", "").await.unwrap();

    // A session SET of a setting the server does not report follows its client, and only
    // it, across the transactions that share the one server connection.
    a.batch_execute("SET work_mem = '7MB'").await.unwrap();
    assert_eq!(one(&b, "SHOW work_mem").await, "4MB");
    assert_eq!(one(&a, "SHOW work_mem").await, "7MB");
    b.batch_execute("SET statement_timeout = '9s'")
        .await
        .unwrap();
    assert_eq!(one(&a, "SHOW statement_timeout").await, "0");
    assert_eq!(one(&b, "SHOW statement_timeout").await, "9s");
    assert_eq!(one(&b, "SHOW work_mem").await, "4MB");
    a.batch_execute("RESET work_mem").await.unwrap();
    assert_eq!(one(&a, "SHOW work_mem").await, "4MB");

    assert_eq!(one(&a, "SELECT 'a still here'").await, "a still here");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_reads_the_auth_file_again_and_resizes_open_pools() {
    let (root, etcd, pg) = one_primary("poolreload").await;
    let file = users(&root, &pg).await;
    let mut config = None;
    let proxy = Proxy::start(&etcd, "poolreload", |cfg| {
        transaction_pooled(cfg, file.clone(), 1);
        cfg.pool.query_wait_timeout = Duration::from_secs(1);
        config = Some(cfg.clone());
    })
    .await;
    let mut config = config.unwrap();
    let port = proxy.port();
    config.listeners[0].listen = format!("127.0.0.1:{port}");
    let reloaded = |config: &Config| {
        let (tx, config) = (proxy.reload.clone(), config.clone());
        async move { tx.send(config).await.unwrap() }
    };

    // A user added to the file after the start gets in after a reload, without a restart.
    connect(pg.port)
        .await
        .unwrap()
        .batch_execute("CREATE ROLE dave LOGIN PASSWORD 'diver'")
        .await
        .unwrap();
    let e = login(port, "dave", "diver", "")
        .await
        .map(drop)
        .expect_err("dave is not in the file yet");
    assert_eq!(sqlstate(&e).as_deref(), Some("28P01"), "{e}");
    let mut text = std::fs::read_to_string(&file).unwrap();
    text.push_str("\"dave\" \"diver\"\n");
    std::fs::write(&file, text).unwrap();
    reloaded(&config).await;
    let (dave, _d) = wait_for("dave let in", LONG, || async {
        login(port, "dave", "diver", "").await.ok()
    })
    .await;
    assert_eq!(one(&dave, "SELECT current_user::text").await, "dave");

    // The one connection of alice's pool is held by an open transaction: a second client
    // waits, then is refused. A larger pool_size applies to the open pool at once.
    let (holder, _h) = login(port, "alice", "wonder", "").await.unwrap();
    holder.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let (late, _l) = login(port, "alice", "wonder", "").await.unwrap();
    let e = late.batch_execute("SELECT 1").await.unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("53300"), "{e}");
    config.pool.pool_size = 2;
    reloaded(&config).await;
    wait_for("a second slot in alice's pool", LONG, || async {
        let (c, _c) = login(port, "alice", "wonder", "").await.ok()?;
        c.batch_execute("SELECT 1").await.ok()
    })
    .await;
    holder.batch_execute("COMMIT").await.unwrap();
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switchover_key_holds_transactions_until_it_goes_and_no_longer() {
    let Pooled {
        pg: _pg,
        proxy,
        etcd,
        _root,
    } = pooled_primary("poolhold", 2, |cfg| {
        cfg.timeouts.connect_wait = Duration::from_secs(3);
        cfg.admin.listen = Some("127.0.0.1:0".into());
    })
    .await;
    let (port, admin) = (proxy.port(), proxy.admin.unwrap());
    let mut keys = Keys::new(&etcd, "poolhold").await;
    let (c, _conn) = login(port, "alice", "wonder", "").await.unwrap();
    assert_eq!(one(&c, "SELECT 'before'").await, "before");

    // A key left from a switchover away from another leader holds nothing.
    keys.put("failover", r#"{"leader":"x","member":"a"}"#).await;
    let key = format!("{}failover", keys.prefix);
    let written = keys.client.get(key, None).await.unwrap();
    let revision = written.kvs()[0].mod_revision();
    wait_for("patroxy to read the stale key", LONG, || async {
        let v = topology(admin).await?;
        (v["clusters"][0]["revision"].as_i64()? >= revision).then_some(())
    })
    .await;
    assert_eq!(one(&c, "SELECT 'stale key'").await, "stale key");

    // A switchover away from the leader: the next transaction waits in patroxy; when the
    // key goes without a leader change (Patroni gave up), it runs on the same leader.
    keys.put("failover", r#"{"leader":"a","member":"b"}"#).await;
    wait_switchover(admin, true).await;
    let held = tokio::spawn(async move {
        let r = c
            .query_one("SELECT 'held'", &[])
            .await
            .map(|r| r.get::<_, String>(0));
        (c, r)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!held.is_finished(), "the transaction was not held");
    keys.put("failover", "{}").await;
    let (c, r) = tokio::time::timeout(LONG, held).await.unwrap().unwrap();
    assert_eq!(r.unwrap(), "held");

    // A key that stays: held at most connect_wait, then today's clear error.
    wait_switchover(admin, false).await;
    keys.put("failover", r#"{"leader":"a"}"#).await;
    wait_switchover(admin, true).await;
    let e = tokio::time::timeout(LONG, c.query_one("SELECT 1", &[]))
        .await
        .expect("held no longer than connect_wait")
        .unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("57P03"), "{e}");
    assert!(message(&e).contains("switchover"), "{}", message(&e));
    proxy.stop().await;
}

/// Waits until patroxy sees a switchover under way (or, with `false`, none).
async fn wait_switchover(admin: std::net::SocketAddr, under_way: bool) {
    wait_for("patroxy to see the failover key", LONG, || async move {
        let v = topology(admin).await?;
        (v["clusters"][0]["switchover"].is_string() == under_way).then_some(())
    })
    .await;
}

/// psql on the console as `user`: its unaligned output, or its error.
async fn console(port: u16, user: &str, password: &str, sql: &str) -> Result<String, String> {
    let out = tokio::process::Command::new(format!("{PG_BIN}/psql"))
        .env("PGPASSWORD", password)
        .arg(format!(
            "host=127.0.0.1 port={port} user={user} dbname=pgbouncer"
        ))
        .args(["-XAtF", "|", "-c", sql])
        .output()
        .await
        .expect("psql");
    match out.status.success() {
        true => Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned()),
        false => Err(String::from_utf8_lossy(&out.stderr).trim().to_owned()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_console_answers_as_pgbouncer_does_and_the_exporter_reads_it() {
    let Pooled {
        pg,
        proxy,
        etcd: _etcd,
        _root,
    } = pooled_primary("poolconsole", 2, |cfg| {
        cfg.auth.admin_users = vec!["alice".into()];
        cfg.auth.stats_users = vec!["bob".into()];
        cfg.timeouts.connect_wait = Duration::from_secs(20);
    })
    .await;
    let port = proxy.port();
    let admin_ok = move |sql: &'static str| console(port, "alice", "wonder", sql);
    let admin = move |sql: &'static str| async move { admin_ok(sql).await.unwrap() };
    let (c, conn) = login(port, "alice", "wonder", "").await.unwrap();
    for _ in 0..3 {
        c.batch_execute("SELECT 1").await.unwrap();
    }

    // Who may use it: an admin, a stats user (read only), nobody else.
    let e = console(port, "carol", "sesame", "SHOW POOLS")
        .await
        .unwrap_err();
    assert!(e.contains("may not use the admin console"), "{e}");
    let e = console(port, "alice", "wrong", "SHOW POOLS")
        .await
        .unwrap_err();
    assert!(e.contains("password authentication failed"), "{e}");
    let e = console(port, "bob", "builder", "PAUSE").await.unwrap_err();
    assert!(e.contains("needs an admin user"), "{e}");
    let pools = console(port, "bob", "builder", "SHOW POOLS").await.unwrap();
    assert!(pools.starts_with("postgres|alice|0|0|"), "{pools}");
    assert!(pools.ends_with("|transaction"), "{pools}");
    let stats = admin("SHOW STATS").await;
    let fields: Vec<&str> = stats.split('|').collect();
    assert_eq!((fields[0], fields[1]), ("postgres", "3"), "{stats}");
    let members = admin("SHOW MEMBERS").await;
    assert!(
        members.contains(&format!("|a|127.0.0.1:{}|Leader|running|", pg.port)),
        "{members}"
    );

    // PAUSE holds the next transaction; RESUME lets it run.
    assert_eq!(admin("PAUSE").await, "PAUSE");
    let held = tokio::spawn(async move {
        let r = c
            .query_one("SELECT 'after resume'", &[])
            .await
            .map(|r| r.get::<_, String>(0));
        (c, r)
    });
    wait_for("the transaction held", LONG, || async {
        let pools = admin_ok("SHOW POOLS").await.ok()?;
        pools.starts_with("postgres|alice|0|1|").then_some(())
    })
    .await;
    admin("RESUME").await;
    let (c, r) = tokio::time::timeout(LONG, held).await.unwrap().unwrap();
    assert_eq!(r.unwrap(), "after resume");
    // RECONNECT closes the idle server connections.
    admin("RECONNECT").await;
    assert_eq!(backends(&pg, "alice").await, 0);
    assert_eq!(one(&c, "SELECT 'new connection'").await, "new connection");

    // A real third-party client: Debian's prometheus-pgbouncer-exporter scrapes the console.
    let web = free_port();
    let mut exporter = tokio::process::Command::new("/usr/bin/prometheus-pgbouncer-exporter")
        .env("PGPASSWORD", "wonder")
        .args(["--pgbouncer-host", "127.0.0.1", "--pgbouncer-user", "alice"])
        .args(["--pgbouncer-port", &port.to_string()])
        .args(["--host", "127.0.0.1", "--port", &web.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("prometheus-pgbouncer-exporter (install-deps.sh installs it)");
    let scraped = wait_for("the exporter's metrics", LONG, || async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", web))
            .await
            .ok()?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: e\r\n\r\n")
            .await
            .ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).await.ok()?;
        out.contains("pgbouncer_active_clients").then_some(out)
    })
    .await;
    let _ = exporter.kill().await;
    let value = |name: &str| {
        let line = scraped
            .lines()
            .find(|l| l.starts_with(name) && l.contains(r#"database="postgres""#))
            .unwrap_or_else(|| panic!("no {name} in\n{scraped}"));
        line.rsplit(' ').next().unwrap().parse::<f64>().unwrap()
    };
    let stats = admin("SHOW STATS").await;
    let requests: f64 = stats.split('|').nth(2).unwrap().parse().unwrap();
    assert!(value("pgbouncer_requests_total") <= requests, "{scraped}");
    assert!(value("pgbouncer_requests_total") >= 5.0, "{scraped}");
    assert_eq!(value("pgbouncer_waiting_clients"), 0.0, "{scraped}");
    assert_eq!(value("pgbouncer_pool_size"), 2.0, "{scraped}");
    // Who is connected, on which server connections; and KILL ends a database's clients.
    let listed = admin("SHOW CLIENTS").await;
    assert!(
        listed.starts_with("C|alice|postgres|idle|127.0.0.1|"),
        "{listed}"
    );
    let servers = admin("SHOW SERVERS").await;
    assert!(
        servers.contains("S|alice|postgres|idle|127.0.0.1|"),
        "{servers}"
    );
    // KILL ends a client inside a transaction too, at once, as PgBouncer's does.
    let (busy, busy_conn) = login(port, "alice", "wonder", "").await.unwrap();
    busy.batch_execute("BEGIN; SELECT 1").await.unwrap();
    let killed = admin("KILL postgres").await;
    assert_eq!(killed, "KILL");
    assert_eq!(ended_within(conn, AT_REST).await.as_deref(), Some("57P01"));
    let busy_end = ended_within(busy_conn, AT_REST).await;
    assert_eq!(busy_end.as_deref(), Some("57P01"));
    drop(c);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_lost_under_a_transaction_costs_the_client_an_error_not_its_connection() {
    let Pooled {
        pg,
        proxy,
        etcd: _etcd,
        _root,
    } = pooled_primary("poollost", 2, |_| {}).await;
    let port = proxy.port();
    let direct = connect(pg.port).await.unwrap();
    let terminate = |query: &'static str| {
        let direct = &direct;
        async move {
            wait_query_running(pg.port, query).await;
            direct
                .batch_execute(&format!(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query = '{query}'"
                ))
                .await
                .unwrap();
        }
    };

    // A query running when its server goes: an error saying the outcome is unknown, and the
    // client's next transaction runs on another server connection.
    let (c, _conn) = login(port, "alice", "wonder", "").await.unwrap();
    let running = tokio::spawn(async move {
        let r = c.simple_query("SELECT pg_sleep(30)").await.map(drop);
        (c, r)
    });
    terminate("SELECT pg_sleep(30)").await;
    let (c, r) = tokio::time::timeout(LONG, running).await.unwrap().unwrap();
    let e = r.unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("08007"), "{e}");
    assert!(
        message(&e).contains("may or may not have committed"),
        "{}",
        message(&e)
    );
    assert_eq!(one(&c, "SELECT 'still connected'").await, "still connected");

    // Between statements of a transaction block, the client cannot be told in time: its
    // session ends rather than run its next statement outside the transaction.
    let (b, b_conn) = login(port, "alice", "wonder", "").await.unwrap();
    b.batch_execute("BEGIN; SELECT 'in a block'").await.unwrap();
    let sql = "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
               WHERE usename = 'alice' AND state = 'idle in transaction'";
    wait_for("the block's backend terminated", LONG, || async {
        let row = direct.query(sql, &[]).await.ok()?;
        (!row.is_empty()).then_some(())
    })
    .await;
    assert_eq!(
        ended_within(b_conn, AT_REST).await.as_deref(),
        Some("08007")
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_wait_for_clients_stops_accepting_and_stops_when_they_leave() {
    let Pooled {
        pg: _pg,
        proxy,
        etcd: _etcd,
        _root,
    } = pooled_primary("poolquiesce", 2, |cfg| {
        cfg.auth.admin_users = vec!["alice".into()];
    })
    .await;
    let port = proxy.port();
    let (c, conn) = login(port, "alice", "wonder", "").await.unwrap();
    assert_eq!(one(&c, "SELECT 'before'").await, "before");
    let said = console(port, "alice", "wonder", "SHUTDOWN WAIT_FOR_CLIENTS").await;
    assert_eq!(said.unwrap(), "SHUTDOWN");
    // No new clients; the one connected is served on, between and in its transactions.
    wait_for("the listener closed", LONG, || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .err()
    })
    .await;
    c.batch_execute("BEGIN; SELECT 1; COMMIT").await.unwrap();
    assert_eq!(one(&c, "SELECT 'still served'").await, "still served");
    // It leaves: patroxy stops.
    drop(c);
    let _ = conn.await;
    proxy.exited(LONG).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_freezes_while_settings_are_applied_is_replaced() {
    let Pooled {
        pg,
        proxy,
        etcd: _etcd,
        _root,
    } = pooled_primary("poolfreeze", 2, |cfg| {
        cfg.timeouts.connect = Duration::from_secs(1);
    })
    .await;
    let port = proxy.port();
    let (a, _a) = login(port, "alice", "wonder", "application_name=first")
        .await
        .unwrap();
    a.batch_execute("SELECT 1").await.unwrap();
    let (direct, pid) = alices_backend(&pg).await;
    // Frozen, its socket open: the next client with other settings gets it, idle and
    // recently used (no check), and patroxy's SET to it never comes back.
    signal(pid as u32, "STOP");
    let (b, _b) = login(port, "alice", "wonder", "application_name=second")
        .await
        .unwrap();
    let answer = tokio::time::timeout(
        LONG,
        b.query_one(
            "SELECT pg_backend_pid(), current_setting('application_name')",
            &[],
        ),
    )
    .await;
    signal(pid as u32, "CONT");
    let row = answer.expect("not held by the frozen connection").unwrap();
    assert_ne!(row.get::<_, i32>(0), pid);
    assert_eq!(row.get::<_, String>(1), "second");
    direct
        .batch_execute(&format!("SELECT pg_terminate_backend({pid})"))
        .await
        .unwrap();
    proxy.stop().await;
}

/// A direct connection to `pg`, and the pid of alice's one server connection there.
async fn alices_backend(pg: &Postgres) -> (tokio_postgres::Client, i32) {
    let direct = connect(pg.port).await.unwrap();
    let sql = "SELECT pid FROM pg_stat_activity WHERE usename = 'alice'";
    let pid = direct.query_one(sql, &[]).await.unwrap().get(0);
    (direct, pid)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_gives_up_waiting_for_a_primary_is_let_go_at_once() {
    let Pooled {
        pg: _pg,
        proxy,
        etcd,
        _root,
    } = pooled_primary("poolgone", 2, |cfg| {
        cfg.timeouts.connect_wait = Duration::from_secs(60);
        cfg.auth.admin_users = vec!["alice".into()];
        cfg.admin.listen = Some("127.0.0.1:0".into());
    })
    .await;
    let port = proxy.port();
    let (c, conn) = login(port, "alice", "wonder", "").await.unwrap();
    assert_eq!(one(&c, "SELECT 'before'").await, "before");
    // No primary: the next transaction waits in patroxy.
    Keys::new(&etcd, "poolgone").await.delete("leader").await;
    let admin = proxy.admin.unwrap();
    wait_for("patroxy to see no leader", LONG, || async move {
        let v = topology(admin).await?;
        v["clusters"][0]["leader"].is_null().then_some(())
    })
    .await;
    let query = tokio::spawn(async move { c.simple_query("SELECT 1").await.map(drop) });
    let clients = || console(port, "alice", "wonder", "SHOW CLIENTS");
    wait_for("the client waiting", LONG, || async {
        clients().await.ok()?.contains("|waiting|").then_some(())
    })
    .await;
    // It gives up (its own timeout): patroxy lets it go now, not at connect_wait.
    query.abort();
    conn.abort();
    wait_for("the client let go", Duration::from_secs(10), || async {
        clients().await.ok()?.is_empty().then_some(())
    })
    .await;
    proxy.stop().await;
}

/// One address in front of several: each connection goes to the first target that accepts
/// it (a stand-in for a Kubernetes Service over two patroxy pods).
async fn front(targets: Vec<u16>) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let targets = targets.clone();
            tokio::spawn(async move {
                for t in targets {
                    if let Ok(mut out) = tokio::net::TcpStream::connect(("127.0.0.1", t)).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                        return;
                    }
                }
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_behind_one_address_costs_clients_no_error() {
    let (root, etcd, pg) = one_primary("poolroll").await;
    let file = users(&root, &pg).await;
    let start = |name: &'static str| {
        let file = file.clone();
        Proxy::start(&etcd, "poolroll", move |cfg| {
            transaction_pooled(cfg, file, 2);
            cfg.auth.admin_users = vec!["alice".into()];
            cfg.report.instance = Some(name.into());
        })
    };
    let (old, new) = (start("old").await, start("new").await);
    let (old_port, new_port) = (old.port(), new.port());
    let address = front(vec![old_port, new_port]).await;
    // A client through the one address lands on the old instance.
    let (c, conn) = login(address, "alice", "wonder", "").await.unwrap();
    assert_eq!(one(&c, "SELECT 'on old'").await, "on old");
    // The old instance is retired: it stops accepting, and serves its client until it leaves.
    let said = console(old_port, "alice", "wonder", "SHUTDOWN WAIT_FOR_CLIENTS").await;
    assert_eq!(said.unwrap(), "SHUTDOWN");
    for i in 0..5 {
        let sql = format!("SELECT 'still served {i}'");
        assert_eq!(one(&c, &sql).await, format!("still served {i}"));
    }
    // The client reconnects (its pool recycles it): the same address now reaches the new
    // instance, and the old one stops once its last client has gone. No error anywhere.
    drop(c);
    let _ = conn.await;
    let (c, _conn) = login(address, "alice", "wonder", "").await.unwrap();
    assert_eq!(one(&c, "SELECT 'on new'").await, "on new");
    let on_new = console(new_port, "alice", "wonder", "SHOW CLIENTS").await;
    assert!(
        on_new.unwrap().starts_with("C|alice|"),
        "the client is on the new instance"
    );
    old.exited(LONG).await;
    assert_eq!(one(&c, "SELECT 'after'").await, "after");
    new.stop().await;
}

/// Sends a cancel request with `token` to patroxy on `port`.
async fn cancel_via(token: &tokio_postgres::CancelToken, port: u16) {
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    token
        .cancel_query_raw(stream, tokio_postgres::NoTls)
        .await
        .unwrap();
}

fn cancels(listener: &str, routed: &str) -> f64 {
    let (l, r) = (
        format!(r#"listener="{listener}""#),
        format!(r#"routed="{routed}""#),
    );
    sample(&metrics_text(), "patroxy_cancel_requests_total", &[&l, &r]).unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_cancel_key_works_through_another_instance_and_only_while_it_runs() {
    install_metrics();
    let (root, etcd, pg) = one_primary("poolpeer").await;
    let file = users(&root, &pg).await;
    let start = |name: &'static str| {
        let file = file.clone();
        Proxy::start(&etcd, "poolpeer", move |cfg| {
            transaction_pooled(cfg, file, 1);
            cfg.listeners[0].name = format!("peer-{name}");
            cfg.report.instance = Some(name.into());
            cfg.admin.listen = Some("127.0.0.1:0".into());
        })
    };
    let (first, second) = (start("one").await, start("two").await);
    // Each instance publishes where it takes cancels for its keys, and nothing else tells
    // the other about it.
    wait_peers(&[&first, &second], 2).await;

    let (c, _conn) = login(first.port(), "alice", "wonder", "").await.unwrap();
    let token = c.cancel_token();
    let sleeping = tokio::spawn(async move {
        let r = c.simple_query("SELECT pg_sleep(60)").await.map(|_| ());
        (c, r)
    });
    wait_query_running(pg.port, "SELECT pg_sleep(60)").await;
    cancel_via(&token, second.port()).await;
    let (c, r) = tokio::time::timeout(LONG, sleeping).await.unwrap().unwrap();
    assert_eq!(sqlstate(&r.unwrap_err()).as_deref(), Some("57014"));
    assert_eq!(cancels("peer-two", "peer"), 1.0, "{}", metrics_text());
    assert_eq!(cancels("peer-one", "local"), 1.0);

    // Between transactions the key cancels nothing, through either instance: the one server
    // connection now runs another client's query, which must finish.
    let (other, _conn2) = login(first.port(), "alice", "wonder", "").await.unwrap();
    let running = tokio::spawn(async move {
        let r = other.simple_query("SELECT pg_sleep(1)").await.map(|_| ());
        (other, r)
    });
    wait_query_running(pg.port, "SELECT pg_sleep(1)").await;
    cancel_via(&token, first.port()).await;
    cancel_via(&token, second.port()).await;
    let (_other, r) = tokio::time::timeout(LONG, running).await.unwrap().unwrap();
    r.expect("another client's query is never cancelled with this key");
    assert_eq!(cancels("peer-one", "stale"), 2.0, "{}", metrics_text());
    assert_eq!(cancels("peer-two", "peer"), 2.0);
    assert_eq!(one(&c, "SELECT '1'").await, "1");
    first.stop().await;
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_sessions_follow_the_leader() {
    let Moving {
        _root,
        etcd,
        a,
        b,
        mut keys,
        file,
    } = moving("poolmove").await;
    let proxy = Proxy::start(&etcd, "poolmove", |cfg| {
        pooled(cfg, file);
        cfg.timeouts.drain = Duration::from_secs(20);
    })
    .await;
    let port = proxy.port();
    let (on_a, conn) = login(port, "alice", "wonder", "").await.unwrap();
    // A simple query: a prepared one's statement is closed after it, a request that may
    // still be on its way when the drain comes, and the FATAL would answer it instead.
    let on = rows(&on_a, "SELECT inet_server_port()").await;
    assert_eq!(on, [[a.port.to_string()]]);
    keys.leader("b").await;
    assert_eq!(ended_within(conn, AT_REST).await.as_deref(), Some("57P01"));
    let (on_b, _c) = login(port, "alice", "wonder", "").await.unwrap();
    assert_eq!(
        one(&on_b, "SELECT inet_server_port()::text").await,
        b.port.to_string()
    );
    proxy.stop().await;
}

fn transaction_pooled(cfg: &mut Config, auth_file: PathBuf, pool_size: usize) {
    pooled(cfg, auth_file);
    cfg.listeners[0].pool_mode = PoolMode::Transaction;
    cfg.pool.pool_size = pool_size;
}

/// The rows of a simple query's last statement, as text.
async fn rows(c: &tokio_postgres::Client, sql: &str) -> Vec<Vec<String>> {
    c.simple_query(sql)
        .await
        .unwrap()
        .into_iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(
                (0..r.len())
                    .map(|i| r.get(i).unwrap_or("").to_owned())
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_clients_share_four_server_connections_without_sharing_state() {
    let (root, etcd, pg) = one_primary("pooltx").await;
    let file = users(&root, &pg).await;
    let proxy = Proxy::start(&etcd, "pooltx", |cfg| transaction_pooled(cfg, file, 4)).await;
    let port = proxy.port();
    let mut clients = tokio::task::JoinSet::new();
    for id in 0..50 {
        clients.spawn(async move {
            let (c, _conn) = login(port, "alice", "wonder", "").await.unwrap();
            let mut pids = std::collections::BTreeSet::new();
            for round in 0..5 {
                // Inside one transaction: one server, and only this client's state on it.
                let out = rows(
                    &c,
                    &format!(
                        "BEGIN; SET LOCAL my.id = '{id}';
                         CREATE TEMP TABLE mine ON COMMIT DROP AS SELECT {id} AS id, {round} AS round;
                         SELECT pg_backend_pid()::text, current_setting('my.id'),
                                (SELECT id::text FROM mine), txid_current_if_assigned() IS NOT NULL,
                                pg_backend_pid()::text;
                         COMMIT;"
                    ),
                )
                .await;
                let row = &out[0];
                assert_eq!(row[0], row[4], "one server for the whole transaction");
                assert_eq!(row[1], id.to_string(), "another client's setting");
                assert_eq!(row[2], id.to_string(), "another client's table");
                assert_eq!(row[3], "t");
                pids.insert(row[0].clone());
                // Between transactions nothing is left over.
                let after = rows(&c, "SELECT coalesce(current_setting('my.id', true), '')").await;
                assert_eq!(after[0][0], "", "a SET LOCAL outlived its transaction");
            }
            pids
        });
    }
    let mut all = std::collections::BTreeSet::new();
    while let Some(pids) = clients.join_next().await {
        all.extend(pids.unwrap());
    }
    assert!(
        all.len() <= 4,
        "{} server connections for a pool of 4",
        all.len()
    );
    // The extended protocol (unnamed statements) keeps a transaction on one server too.
    let (c, _conn) = login(port, "alice", "wonder", "").await.unwrap();
    c.batch_execute("BEGIN").await.unwrap();
    let a: i32 = c.query_typed("SELECT pg_backend_pid()", &[]).await.unwrap()[0].get(0);
    let b: i32 = c.query_typed("SELECT pg_backend_pid()", &[]).await.unwrap()[0].get(0);
    c.batch_execute("COMMIT").await.unwrap();
    assert_eq!(a, b);
    // An error inside a transaction, then ROLLBACK: the client and the pool carry on.
    let e = c.batch_execute("BEGIN; SELECT 1/0").await.unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("22012"));
    let e = c.batch_execute("SELECT 1").await.unwrap_err();
    assert_eq!(
        sqlstate(&e).as_deref(),
        Some("25P02"),
        "still in the failed transaction"
    );
    c.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(rows(&c, "SELECT 'fine'").await[0][0], "fine");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_on_one_server_connection_each_see_their_own_settings() {
    let (root, etcd, pg) = one_primary("poolparams").await;
    let file = users(&root, &pg).await;
    let proxy = Proxy::start(&etcd, "poolparams", |cfg| transaction_pooled(cfg, file, 1)).await;
    let port = proxy.port();
    let (a, _ca) = login(
        port,
        "alice",
        "wonder",
        "application_name=a options='-c TimeZone=UTC'",
    )
    .await
    .unwrap();
    let (b, _cb) = login(port, "alice", "wonder", "application_name=b")
        .await
        .unwrap();
    b.batch_execute("SET TimeZone = 'Asia/Tokyo'")
        .await
        .unwrap();
    let (c, _cc) = login(port, "alice", "wonder", "").await.unwrap();
    for _ in 0..3 {
        let ra = rows(
            &a,
            "SELECT current_setting('application_name'), pg_backend_pid()::text",
        )
        .await;
        let rb = rows(&b, "SELECT current_setting('application_name'), current_setting('TimeZone'), pg_backend_pid()::text").await;
        let rc = rows(
            &c,
            "SELECT current_setting('application_name'), pg_backend_pid()::text",
        )
        .await;
        assert_eq!(ra[0][0], "a");
        assert_eq!(rb[0][0], "b");
        assert_eq!(rb[0][1], "Asia/Tokyo", "b's own SET follows it");
        assert_eq!(rc[0][0], "", "c asked for no application_name");
        assert_eq!(ra[0][1], rb[0][2], "one server connection for all");
        assert_eq!(rb[0][2], rc[0][1]);
    }
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_between_transactions_rides_out_a_leader_change() {
    let Moving {
        _root,
        etcd,
        a,
        b,
        mut keys,
        file,
    } = moving("pooltxmove").await;
    let proxy = Proxy::start(&etcd, "pooltxmove", |cfg| {
        transaction_pooled(cfg, file, 2);
        cfg.timeouts.drain = Duration::from_secs(20);
    })
    .await;
    let port = proxy.port();
    let (idle, idle_conn) = login(port, "alice", "wonder", "").await.unwrap();
    assert_eq!(
        rows(&idle, "SELECT inet_server_port()").await[0][0],
        a.port.to_string()
    );
    let (in_tx, in_tx_conn) = login(port, "alice", "wonder", "").await.unwrap();
    in_tx.batch_execute("BEGIN; SELECT 1").await.unwrap();
    keys.leader("b").await;
    // The transaction on the deposed primary ends with 57P01...
    assert_eq!(
        ended_within(in_tx_conn, AT_REST).await.as_deref(),
        Some("57P01")
    );
    // ...while the client between transactions keeps its connection, now served by b.
    wait_for("the idle client's next transaction on b", LONG, || async {
        let r = idle.simple_query("SELECT inet_server_port()").await.ok()?;
        let port = r.iter().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })?;
        (port == b.port.to_string()).then_some(())
    })
    .await;
    assert!(!idle_conn.is_finished(), "the idle client was cut");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_queued_behind_the_old_primary_goes_to_the_new_one_at_once() {
    let Moving {
        _root,
        etcd,
        a,
        b,
        mut keys,
        file,
    } = moving("poolqueued").await;
    let proxy = Proxy::start(&etcd, "poolqueued", |cfg| {
        transaction_pooled(cfg, file, 1);
        cfg.timeouts.drain = Duration::from_secs(60);
        cfg.auth.admin_users = vec!["alice".into()];
    })
    .await;
    let port = proxy.port();
    // The pool's only server connection is held by a statement running on a...
    let (busy, busy_conn) = login(port, "alice", "wonder", "").await.unwrap();
    let sleep = "SELECT pg_sleep(30)";
    let running = tokio::spawn(async move { busy.simple_query(sleep).await.map(drop) });
    wait_query_running(a.port, sleep).await;
    // ...so the next client's statement waits in line for it.
    let (queued, _queued_conn) = login(port, "alice", "wonder", "").await.unwrap();
    let answer = tokio::spawn(async move {
        let r = queued
            .query_one("SELECT inet_server_port()", &[])
            .await
            .map(|r| r.get::<_, i32>(0));
        (queued, r)
    });
    let clients = || console(port, "alice", "wonder", "SHOW CLIENTS");
    wait_for("the client waiting for the slot", LONG, || async {
        clients().await.ok()?.contains("|waiting|").then_some(())
    })
    .await;
    // The leader changes: the statement on a may finish (up to the 60 s drain deadline),
    // and the waiting client does not wait for it: b serves it now.
    keys.leader("b").await;
    let (_queued, r) = tokio::time::timeout(Duration::from_secs(20), answer)
        .await
        .expect("the queued client still waits for the old primary's pool")
        .unwrap();
    assert_eq!(r.unwrap(), i32::from(b.port));
    assert!(
        !running.is_finished(),
        "the statement on the old primary was cut, not let finish"
    );
    running.abort();
    busy_conn.abort();
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_runs_through_session_and_transaction_pools() {
    let (root, etcd, pg) = one_primary("poolbench").await;
    let file = users(&root, &pg).await;
    pgbench_init(&pg).await;
    for mode in [PoolMode::Session, PoolMode::Transaction] {
        let f = file.clone();
        let proxy = Proxy::start(&etcd, "poolbench", move |cfg| {
            pooled(cfg, f);
            cfg.listeners[0].pool_mode = mode;
            cfg.pool.pool_size = 2;
        })
        .await;
        // A new connection per transaction (-C) on session pooling; 8 clients on 2 server
        // connections on transaction pooling.
        let args = match mode {
            PoolMode::Session => vec!["-C", "-S", "-c", "4", "-j", "2", "-t", "50"],
            _ => vec!["-c", "8", "-j", "2", "-t", "50"],
        };
        pgbench_as_alice(proxy.port(), &args).await;
        proxy.stop().await;
    }
}

/// A raw protocol client of a pooled listener, logged in (trusted address, no password) and
/// at its first ReadyForQuery.
async fn raw_login(port: u16, user: &str) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let mut body = vec![0, 3, 0, 0];
    for (k, v) in [("user", user), ("database", "postgres")] {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut packet = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    packet.extend(body);
    s.write_all(&packet).await.unwrap();
    read_until(&mut s, b'Z').await;
    s
}

/// Reads messages until one with `tag` has been read whole.
async fn read_until(s: &mut tokio::net::TcpStream, tag: u8) {
    use tokio::io::AsyncReadExt;
    loop {
        let t = tokio::time::timeout(LONG, s.read_u8())
            .await
            .unwrap()
            .unwrap();
        let len = s.read_u32().await.unwrap() as usize;
        let mut body = vec![0; len - 4];
        s.read_exact(&mut body).await.unwrap();
        if t == tag {
            return;
        }
    }
}

fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![tag];
    m.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    m.extend_from_slice(body);
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_exit_of_a_client_leaves_state_for_the_next_one() {
    use tokio::io::AsyncWriteExt;
    let (root, etcd, pg) = one_primary("poolexits").await;
    let file = users(&root, &pg).await;
    let proxy = Proxy::start(&etcd, "poolexits", |cfg| {
        pooled(cfg, file);
        cfg.pool.pool_size = 1;
        cfg.auth.trust = vec!["127.0.0.1/32".parse().unwrap()];
    })
    .await;
    let port = proxy.port();
    let direct = connect(pg.port).await.unwrap();
    direct
        .batch_execute("CREATE TABLE exits (x int)")
        .await
        .unwrap();
    // The next borrower: what it finds on the one server connection of the pool.
    let next = || async move {
        let (c, _conn) = wait_for("the pool's connection", LONG, || async {
            login(port, "postgres", "", "").await.ok()
        })
        .await;
        let state = rows(
            &c,
            "SELECT pg_backend_pid()::text,
                    (SELECT count(*) FROM exits)::text,
                    (SELECT count(*) FROM pg_cursors)::text,
                    (SELECT count(*) FROM pg_prepared_statements)::text,
                    current_setting('search_path'),
                    (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory')::text",
        )
        .await;
        state[0].clone()
    };
    let clean =
        |s: &[String]| assert_eq!(&s[1..], ["0", "0", "0", "\"$user\", public", "0"], "{s:?}");
    let first = next().await;
    clean(&first);
    let pid = first[0].clone();

    // 1. Left inside a failed transaction, with a cursor, a statement, a lock, a setting.
    let (c, conn) = login(port, "postgres", "", "").await.unwrap();
    let _ = c
        .batch_execute(
            "SET search_path = nowhere; PREPARE p AS SELECT 1; SELECT pg_advisory_lock(42);
             BEGIN; DECLARE cur CURSOR WITH HOLD FOR SELECT 1; INSERT INTO public.exits VALUES (1);
             SELECT 1/0;",
        )
        .await;
    drop(c);
    let _ = conn.await;
    let s = next().await;
    clean(&s);
    assert_eq!(s[0], pid, "a clean exit keeps the connection");

    // 2. Gone in the middle of a COPY FROM STDIN: the connection is closed, not lent again.
    let mut raw = raw_login(port, "postgres").await;
    raw.write_all(&msg(b'Q', b"COPY exits FROM STDIN\0"))
        .await
        .unwrap();
    read_until(&mut raw, b'G').await;
    raw.write_all(&msg(b'd', b"7\n")).await.unwrap();
    drop(raw);
    let s = next().await;
    clean(&s);
    assert_ne!(s[0], pid, "a connection left mid-COPY was lent again");
    let pid = s[0].clone();

    // 3. Gone in the middle of a pipeline (Parse, Bind, Execute, no Sync).
    let mut raw = raw_login(port, "postgres").await;
    let mut pipeline = msg(b'P', b"\0INSERT INTO exits VALUES (2)\0\0\0");
    pipeline.extend(msg(b'B', b"\0\0\0\0\0\0\0\0"));
    pipeline.extend(msg(b'E', b"\0\0\0\0\0"));
    pipeline.extend(msg(b'H', b""));
    raw.write_all(&pipeline).await.unwrap();
    read_until(&mut raw, b'C').await;
    drop(raw);
    let s = next().await;
    clean(&s);
    assert_ne!(s[0], pid, "a connection left mid-pipeline was lent again");
    let pid = s[0].clone();

    // 4. A protocol error from the client, on the connection lent to it: the connection is
    // closed. (The client stays until patroxy ends it: one that left at once would be let
    // go before any connection was lent.)
    let mut raw = raw_login(port, "postgres").await;
    raw.write_all(&[b'Q', 0, 0, 0, 1]).await.unwrap();
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(
        LONG,
        tokio::io::AsyncReadExt::read_to_end(&mut raw, &mut rest),
    )
    .await;
    assert!(
        ended.is_ok(),
        "patroxy ends a client that breaks the protocol"
    );
    assert!(rest.contains(&b'E'), "with an error");
    drop(raw);
    let s = next().await;
    clean(&s);
    assert_ne!(
        s[0], pid,
        "a connection after a protocol error was lent again"
    );
    proxy.stop().await;
}

/// pgbench's tables on `pg`, readable and writable by alice.
async fn pgbench_init(pg: &Postgres) {
    let init = tokio::process::Command::new(format!("{PG_BIN}/pgbench"))
        .args([
            "-i",
            "-s",
            "1",
            "-q",
            "-h",
            "127.0.0.1",
            "-p",
            &pg.port.to_string(),
        ])
        .args(["-U", "postgres", "postgres"])
        .output()
        .await
        .unwrap();
    assert!(init.status.success(), "{init:?}");
    connect(pg.port)
        .await
        .unwrap()
        .batch_execute("GRANT ALL ON ALL TABLES IN SCHEMA public TO alice")
        .await
        .unwrap();
}

/// Runs a Python script with Debian's python3 (psycopg 3, asyncpg); its stdout.
/// pgbench through patroxy on `port` as alice: it must succeed with no failed transaction.
async fn pgbench_as_alice(port: u16, args: &[&str]) {
    let mut cmd = tokio::process::Command::new(format!("{PG_BIN}/pgbench"));
    cmd.env("PGPASSWORD", "wonder")
        .args([
            "-n",
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-U",
            "alice",
        ])
        .args(args)
        .arg("postgres");
    let report = stdout_of(cmd, "pgbench").await;
    assert!(
        report.contains("number of failed transactions: 0"),
        "{args:?}: {report}"
    );
}

async fn python(script: &str, args: &[&str]) -> String {
    let mut cmd = tokio::process::Command::new("/usr/bin/python3");
    cmd.arg("-c").arg(script).args(args);
    stdout_of(cmd, "python3").await
}

/// A client program's stdout, trimmed; its stdout and stderr in the failure if it fails.
async fn stdout_of(mut cmd: tokio::process::Command, what: &str) -> String {
    let out = cmd
        .output()
        .await
        .unwrap_or_else(|e| panic!("{what} (install-deps.sh installs it): {e}"));
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statements_work_through_a_transaction_pool() {
    let (root, etcd, pg) = one_primary("poolprep").await;
    let file = users(&root, &pg).await;
    pgbench_init(&pg).await;
    let proxy = Proxy::start(&etcd, "poolprep", |cfg| transaction_pooled(cfg, file, 2)).await;
    let port = proxy.port();

    // pgbench -M prepared: named statements, 20 clients on 2 server connections.
    pgbench_as_alice(port, &["-M", "prepared", "-c", "20", "-j", "2", "-t", "30"]).await;

    // tokio-postgres: statements prepared once, executed in later transactions, by 20
    // clients whose transactions land on either connection.
    let mut clients = tokio::task::JoinSet::new();
    for id in 0..20i32 {
        clients.spawn(async move {
            let (c, _conn) = login(port, "alice", "wonder", "").await.unwrap();
            let add = c.prepare("SELECT $1::int + 1000").await.unwrap();
            let pid = c.prepare("SELECT pg_backend_pid()").await.unwrap();
            let mut seen = std::collections::BTreeSet::new();
            for i in 0..10 {
                let v: i32 = c.query_one(&add, &[&(id * 100 + i)]).await.unwrap().get(0);
                assert_eq!(v, id * 100 + i + 1000);
                seen.insert(c.query_one(&pid, &[]).await.unwrap().get::<_, i32>(0));
            }
            seen
        });
    }
    let mut pids = std::collections::BTreeSet::new();
    while let Some(seen) = clients.join_next().await {
        pids.extend(seen.unwrap());
    }
    assert!(pids.len() <= 2, "{pids:?}");

    // psycopg 3 with server-side prepared statements, and asyncpg (named statements always).
    let conninfo = format!("host=127.0.0.1 port={port} user=alice password=wonder dbname=postgres");
    let psycopg = python(
        r#"
import sys, psycopg
total = 0
for n in range(5):
    with psycopg.connect(sys.argv[1], autocommit=True, prepare_threshold=0) as conn:
        for i in range(20):
            total += conn.execute("SELECT %s::int * 2", (i,), prepare=True).fetchone()[0]
print(total)
"#,
        &[&conninfo],
    )
    .await;
    assert_eq!(
        psycopg,
        (5 * (0..20).map(|i| i * 2).sum::<i32>()).to_string()
    );
    let asyncpg = python(
        r#"
import asyncio, sys, asyncpg
async def client(n):
    c = await asyncpg.connect(host="127.0.0.1", port=int(sys.argv[1]), user="alice", password="wonder", database="postgres")
    s = 0
    stmt = await c.prepare("SELECT $1::int + $2::int")
    for i in range(20):
        s += await c.fetchval("SELECT $1::int * 3", i)
        s += await stmt.fetchval(i, n)
    await c.close()
    return s
async def main():
    print(sum(await asyncio.gather(*(client(n) for n in range(10)))))
asyncio.run(main())
"#,
        &[&port.to_string()],
    )
    .await;
    let want: i32 = (0..10)
        .map(|n| (0..20).map(|i| i * 3 + i + n).sum::<i32>())
        .sum();
    assert_eq!(asyncpg, want.to_string());

    // pgjdbc, with server-prepared statements from the first use (prepareThreshold=1): 20
    // threads, each reusing its statements across transactions and autocommit queries.
    let jdbc = java(
        r#"
import java.sql.*;
import java.util.*;
import java.util.concurrent.*;
public class Jdbc {
    public static void main(String[] args) throws Exception {
        String url = "jdbc:postgresql://127.0.0.1:" + args[0] + "/postgres?prepareThreshold=1";
        ExecutorService pool = Executors.newFixedThreadPool(20);
        List<Future<Long>> sums = new ArrayList<>();
        for (int t = 0; t < 20; t++) {
            final int id = t;
            sums.add(pool.submit(() -> {
                long sum = 0;
                try (Connection c = DriverManager.getConnection(url, "alice", "wonder")) {
                    PreparedStatement times = c.prepareStatement("SELECT ?::int * 5");
                    PreparedStatement plus = c.prepareStatement("SELECT ?::int + ?::int");
                    for (int i = 0; i < 20; i++) {
                        c.setAutoCommit(i % 2 == 0);
                        times.setInt(1, i);
                        try (ResultSet r = times.executeQuery()) { r.next(); sum += r.getInt(1); }
                        plus.setInt(1, i);
                        plus.setInt(2, id);
                        try (ResultSet r = plus.executeQuery()) { r.next(); sum += r.getInt(1); }
                        if (!c.getAutoCommit()) c.commit();
                    }
                }
                return sum;
            }));
        }
        long total = 0;
        for (Future<Long> f : sums) total += f.get();
        pool.shutdown();
        System.out.println(total);
    }
}
"#,
        &root,
        &[&port.to_string()],
    )
    .await;
    let want: i64 = (0..20)
        .map(|id| (0..20).map(|i| i * 5 + i + id).sum::<i64>())
        .sum();
    assert_eq!(jdbc, want.to_string());
    proxy.stop().await;
}

/// On a transaction pool of one server connection, with each real driver: a Parse the
/// server refuses (its table does not exist yet) leaves nothing prepared, so a second
/// client's same statement, once the table exists, is prepared and runs; and after a
/// client's `DISCARD ALL`, which drops every statement on the connection, the next
/// client's prepared statements are prepared again. Both failed before (`26000`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statements_stay_in_step_with_the_server_for_every_driver() {
    let (root, etcd, pg) = one_primary("poolprepstep").await;
    let file = users(&root, &pg).await;
    connect(pg.port)
        .await
        .unwrap()
        .batch_execute("GRANT CREATE ON SCHEMA public TO alice")
        .await
        .unwrap();
    let proxy = Proxy::start(&etcd, "poolprepstep", |cfg| {
        transaction_pooled(cfg, file, 1)
    })
    .await;
    let port = proxy.port().to_string();
    let conninfo = format!("host=127.0.0.1 port={port} user=alice password=wonder dbname=postgres");
    let psycopg = python(
        r#"
import sys, psycopg
a = psycopg.connect(sys.argv[1], autocommit=True)
b = psycopg.connect(sys.argv[1], autocommit=True)
try:
    a.execute("SELECT x FROM later_py", prepare=True)
    sys.exit("the table exists already")
except psycopg.errors.UndefinedTable:
    pass
a.execute("CREATE TABLE later_py (x int); INSERT INTO later_py VALUES (7)")
print(b.execute("SELECT x FROM later_py", prepare=True).fetchone()[0])
print(a.execute("SELECT %s::int + 1", (1,), prepare=True).fetchone()[0])
a.execute("DISCARD ALL")
print(b.execute("SELECT %s::int + 1", (2,), prepare=True).fetchone()[0])
"#,
        &[&conninfo],
    )
    .await;
    assert_eq!(psycopg, "7\n2\n3");
    let asyncpg = python(
        r#"
import asyncio, sys, asyncpg
async def main():
    args = dict(host="127.0.0.1", port=int(sys.argv[1]), user="alice", password="wonder", database="postgres")
    a, b = await asyncpg.connect(**args), await asyncpg.connect(**args)
    try:
        await a.fetchval("SELECT x FROM later_apg")
        sys.exit("the table exists already")
    except asyncpg.exceptions.UndefinedTableError:
        pass
    await a.execute("CREATE TABLE later_apg (x int); INSERT INTO later_apg VALUES (8)")
    print(await b.fetchval("SELECT x FROM later_apg"))
    print(await a.fetchval("SELECT $1::int + 1", 1))
    await a.execute("DISCARD ALL")
    print(await b.fetchval("SELECT $1::int + 1", 2))
asyncio.run(main())
"#,
        &[&port],
    )
    .await;
    assert_eq!(asyncpg, "8\n2\n3");
    let mut node = tokio::process::Command::new("node");
    node.current_dir("tests/node").args(["prepared.js", &port]);
    assert_eq!(stdout_of(node, "node").await, "9\n2\n3");
    let jdbc = java(
        r#"
import java.sql.*;
public class Step {
    public static void main(String[] args) throws Exception {
        String url = "jdbc:postgresql://127.0.0.1:" + args[0] + "/postgres?prepareThreshold=1";
        try (Connection a = DriverManager.getConnection(url, "alice", "wonder");
             Connection b = DriverManager.getConnection(url, "alice", "wonder")) {
            try (PreparedStatement p = a.prepareStatement("SELECT x FROM later_jdbc")) {
                p.executeQuery();
                throw new RuntimeException("the table exists already");
            } catch (SQLException e) {
                if (!"42P01".equals(e.getSQLState())) throw e;
            }
            a.createStatement().execute("CREATE TABLE later_jdbc (x int); INSERT INTO later_jdbc VALUES (10)");
            System.out.println(one(b, "SELECT x FROM later_jdbc", 0));
            System.out.println(one(a, "SELECT ?::int + 1", 1));
            a.createStatement().execute("DISCARD ALL");
            System.out.println(one(b, "SELECT ?::int + 1", 2));
        }
    }
    static int one(Connection c, String sql, int arg) throws SQLException {
        try (PreparedStatement p = c.prepareStatement(sql)) {
            if (sql.contains("?")) p.setInt(1, arg);
            try (ResultSet r = p.executeQuery()) { r.next(); return r.getInt(1); }
        }
    }
}
"#,
        &root,
        &[&port],
    )
    .await;
    assert_eq!(jdbc, "10\n2\n3");
    proxy.stop().await;
}

/// Runs a Java program (its class named in the source's first `public class`) from source
/// with Debian's pgjdbc on the class path; its stdout.
async fn java(source: &str, root: &TempRoot, args: &[&str]) -> String {
    let class = source
        .split("public class ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .expect("a public class");
    let file = root.path().join(format!("{class}.java"));
    std::fs::write(&file, source).unwrap();
    let mut cmd = tokio::process::Command::new("java");
    cmd.args(["-cp", "/usr/share/java/postgresql.jar"])
        .arg(&file)
        .args(args);
    stdout_of(cmd, "java").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pools_show_in_topology_and_metrics() {
    install_metrics();
    let (root, etcd, pg) = one_primary("poolview").await;
    let file = users(&root, &pg).await;
    let proxy = Proxy::start(&etcd, "poolview", |cfg| {
        transaction_pooled(cfg, file, 3);
        cfg.admin.listen = Some("127.0.0.1:0".into());
    })
    .await;
    let (c, _conn) = login(proxy.port(), "alice", "wonder", "").await.unwrap();
    c.batch_execute("BEGIN; SELECT 1").await.unwrap();
    // While the transaction holds its connection: one pool, one lent.
    let admin = proxy.admin.unwrap();
    let view = wait_for("the pool in /topology", LONG, || async move {
        let v = topology(admin).await?;
        let pools = v["pools"].as_array()?.clone();
        (pools.len() == 1 && pools[0]["in_use"] == 1).then_some(pools[0].clone())
    })
    .await;
    assert_eq!(view["user"], "alice");
    assert_eq!(view["database"], "postgres");
    assert_eq!(view["wants"], "primary");
    assert_eq!(view["size"], 3);
    assert_eq!(view["server"], format!("127.0.0.1:{}", pg.port));
    c.batch_execute("COMMIT").await.unwrap();
    // A named statement: prepared on the connection once (a miss), then found there.
    let stmt = c.prepare("SELECT $1::int + 1").await.unwrap();
    for i in 0..3 {
        let n: i32 = c.query_one(&stmt, &[&i]).await.unwrap().get(0);
        assert_eq!(n, i + 1);
    }
    let m = metrics_text();
    let at_least = |name: &str, label: &str, n: f64| {
        let v = sample(&m, name, &[label]).unwrap_or(0.0);
        assert!(v >= n, "{name}{{{label}}} = {v} < {n}\n{m}");
    };
    at_least("patroxy_prepared_statements_total", r#"result="miss""#, 1.0);
    at_least("patroxy_prepared_statements_total", r#"result="hit""#, 3.0);
    at_least("patroxy_pool_checkouts_total", r#"connection="idle""#, 4.0);
    at_least("patroxy_pool_checkouts_total", r#"connection="new""#, 1.0);
    assert!(
        sample(&m, "patroxy_pool_wait_seconds_count", &[]).unwrap() >= 1.0,
        "{m}"
    );
    assert!(sample(&m, "patroxy_server_connects_total", &[r#"result="ok""#]).unwrap() >= 1.0);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_not_in_the_file_are_looked_up_with_auth_query() {
    let (root, etcd, pg) = one_primary("poolquery").await;
    let _ = users(&root, &pg).await;
    // Only the lookup user is in the file; alice's and bob's secrets come from pg_shadow.
    connect(pg.port)
        .await
        .unwrap()
        .batch_execute("CREATE ROLE lookup LOGIN SUPERUSER PASSWORD 'finder'")
        .await
        .unwrap();
    let file = root.path().join("lookup.txt");
    std::fs::write(&file, "\"lookup\" \"finder\"\n").unwrap();
    let proxy = Proxy::start(&etcd, "poolquery", |cfg| {
        transaction_pooled(cfg, file, 2);
        cfg.auth.auth_user = Some("lookup".into());
    })
    .await;
    let port = proxy.port();
    let (alice, _c) = login(port, "alice", "wonder", "").await.unwrap();
    assert_eq!(one(&alice, "SELECT current_user::text").await, "alice");
    let (bob, _c) = login(port, "bob", "builder", "").await.unwrap();
    assert_eq!(one(&bob, "SELECT current_user::text").await, "bob");
    for (user, password) in [("alice", "nope"), ("mallory", "x")] {
        let Err(e) = login(port, user, password, "").await else {
            panic!("{user} was let in");
        };
        assert_eq!(sqlstate(&e).as_deref(), Some("28P01"), "{user}: {e}");
    }
    proxy.stop().await;
}
