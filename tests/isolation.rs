//! Pooled sessions never leak: on a transaction pool and on a session pool of one server
//! connection, client A changes its session (settings, role, session authorization, objects
//! that live in the session) and client B, on the same server connection, finds a clean one,
//! while A keeps seeing its own state. Real PostgreSQL, real clients.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;
use patroxy::config::PoolMode;
use patroxy::policy::ListenerRole;

/// How long a client may wait for an answer that should come at once.
const PROMPT: Duration = Duration::from_secs(10);

/// One PostgreSQL primary with the suite's roles, and patroxy in front of it with one
/// pooled listener (`mode`) on a pool of one server connection.
struct Suite {
    pg: Postgres,
    proxy: Proxy,
    _etcd: Etcd,
    root: TempRoot,
}

impl Suite {
    async fn start(scope: &str, mode: PoolMode, tune: impl FnOnce(&mut Config)) -> Suite {
        let (root, etcd, pg) = one_primary(scope).await;
        let file = roles(&root, &pg).await;
        let proxy = Proxy::start(&etcd, scope, |cfg| {
            cfg.listeners = vec![ListenerConfig {
                pool_mode: mode,
                ..listener("pooled", ListenerRole::Primary)
            }];
            cfg.auth.auth_file = Some(file);
            cfg.pool.pool_size = 1;
            tune(cfg);
        })
        .await;
        Suite {
            pg,
            proxy,
            _etcd: etcd,
            root,
        }
    }

    fn port(&self) -> u16 {
        self.proxy.port()
    }
}

/// alice (SCRAM) may become tenant_x; sam is a superuser (a password in the file), who may
/// take any session authorization; schemas foo and a; and the auth_file with their secrets.
async fn roles(root: &TempRoot, pg: &Postgres) -> PathBuf {
    let c = connect(pg.port).await.unwrap();
    c.batch_execute(
        "SET password_encryption = 'scram-sha-256';
         CREATE ROLE alice LOGIN PASSWORD 'wonder';
         CREATE ROLE sam LOGIN SUPERUSER PASSWORD 'secret';
         CREATE ROLE tenant_x; GRANT tenant_x TO alice;
         CREATE ROLE tenant_y LOGIN;
         CREATE SCHEMA foo; CREATE SCHEMA a;
         GRANT ALL ON SCHEMA foo, a, public TO alice, tenant_x;",
    )
    .await
    .unwrap();
    // A fixed TimeZone, so that the cases can say what a clean session shows.
    c.batch_execute("ALTER SYSTEM SET TimeZone = 'UTC'")
        .await
        .unwrap();
    c.batch_execute("SELECT pg_reload_conf()").await.unwrap();
    wait_for("the server's TimeZone", PROMPT, || async {
        let c = connect(pg.port).await.ok()?;
        let tz: String = c.query_one("SHOW TimeZone", &[]).await.ok()?.get(0);
        (tz == "UTC").then_some(())
    })
    .await;
    let verifier: String = c
        .query_one(
            "SELECT rolpassword FROM pg_authid WHERE rolname = 'alice'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let file = root.path().join("userlist.txt");
    std::fs::write(
        &file,
        format!("\"alice\" \"{verifier}\"\n\"sam\" \"secret\"\n"),
    )
    .unwrap();
    file
}

/// A client of the suite's listener.
struct Client {
    c: tokio_postgres::Client,
    conn: ConnTask,
}

impl Client {
    async fn login(port: u16, user: &str, extra: &str) -> Client {
        let password = match user {
            "sam" => "secret",
            _ => "wonder",
        };
        let s = format!(
            "host=127.0.0.1 port={port} user={user} password={password} dbname=postgres {extra}"
        );
        let (c, conn) =
            tokio::time::timeout(PROMPT, tokio_postgres::connect(&s, tokio_postgres::NoTls))
                .await
                .expect("login in time")
                .unwrap_or_else(|e| panic!("login as {user}: {e}"));
        Client {
            c,
            conn: tokio::spawn(conn),
        }
    }

    /// The first column of the last row of a simple query, as text.
    async fn one(&self, sql: &str) -> String {
        self.try_one(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}: {:?}", e.as_db_error()))
    }

    async fn try_one(&self, sql: &str) -> Result<String, tokio_postgres::Error> {
        let messages = tokio::time::timeout(PROMPT, self.c.simple_query(sql))
            .await
            .unwrap_or_else(|_| panic!("{sql}: no answer within {PROMPT:?}"))?;
        let last = messages.into_iter().rev().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap_or("").to_owned()),
            _ => None,
        });
        Ok(last.unwrap_or_default())
    }

    async fn run(&self, sql: &str) {
        tokio::time::timeout(PROMPT, self.c.batch_execute(sql))
            .await
            .unwrap_or_else(|_| panic!("{sql}: no answer within {PROMPT:?}"))
            .unwrap_or_else(|e| panic!("{sql}: {e}: {:?}", e.as_db_error()));
    }

    async fn pid(&self) -> String {
        self.one("SELECT pg_backend_pid()::text").await
    }

    /// Leaves, and waits until patroxy has taken its server connection back.
    async fn leave(self) {
        drop(self.c);
        let _ = tokio::time::timeout(PROMPT, self.conn).await;
    }
}

/// One way to change a session: what A runs, the query that shows it, what a clean session
/// shows and what A's own shows.
struct Case {
    name: &'static str,
    user: &'static str,
    /// Connection string options for A (startup parameters).
    options: &'static str,
    /// What A runs: each line a query of its own.
    change: &'static str,
    show: &'static str,
    clean: &'static str,
    own: &'static str,
}

const SETTINGS: &[Case] = &[
    Case {
        name: "SET ROLE",
        user: "alice",
        options: "",
        change: "SET ROLE tenant_x",
        show: "SELECT current_user::text",
        clean: "alice",
        own: "tenant_x",
    },
    Case {
        name: "SET SESSION AUTHORIZATION",
        user: "sam",
        options: "",
        change: "SET SESSION AUTHORIZATION tenant_y",
        show: "SELECT session_user || '/' || current_user",
        clean: "sam/sam",
        own: "tenant_y/tenant_y",
    },
    Case {
        name: "SET SESSION AUTHORIZATION, then SET ROLE",
        user: "sam",
        options: "",
        change: "SET SESSION AUTHORIZATION alice; SET ROLE tenant_x",
        show: "SELECT session_user || '/' || current_user",
        clean: "sam/sam",
        own: "alice/tenant_x",
    },
    Case {
        name: "set_config('search_path', '', false), as pg_dump and pg_basebackup send it",
        user: "alice",
        options: "",
        change: "SELECT pg_catalog.set_config('search_path', '', false)",
        show: "SELECT current_setting('search_path')",
        clean: "\"$user\", public",
        own: "",
    },
    Case {
        name: "set_config('statement_timeout', '1', false)",
        user: "alice",
        options: "",
        change: "SELECT set_config('statement_timeout', '1', false)",
        show: "SELECT current_setting('statement_timeout')",
        clean: "0",
        own: "1ms",
    },
    Case {
        name: "options=-c search_path=foo,public (a list)",
        user: "alice",
        options: "options='-c search_path=foo,public'",
        change: "",
        show: "SELECT current_schemas(false)::text",
        clean: "{public}",
        own: "{foo,public}",
    },
    Case {
        name: "SET search_path = a, public inside a transaction",
        user: "alice",
        options: "",
        change: "BEGIN; SET search_path = a, public; COMMIT",
        show: "SELECT current_schemas(false)::text",
        clean: "{public}",
        own: "{a,public}",
    },
    Case {
        name: "SET work_mem",
        user: "alice",
        options: "",
        change: "SET work_mem = '7MB'",
        show: "SHOW work_mem",
        clean: "4MB",
        own: "7MB",
    },
    Case {
        name: "SET SESSION CHARACTERISTICS",
        user: "alice",
        options: "",
        change: "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE",
        show: "SHOW default_transaction_isolation",
        clean: "read committed",
        own: "serializable",
    },
    Case {
        name: "SET, then RESET ALL",
        user: "alice",
        options: "options='-c work_mem=5MB'",
        change: "SET work_mem = '7MB'; SET TimeZone = 'Asia/Tokyo'; RESET ALL",
        show: "SELECT current_setting('work_mem') || ' ' || current_setting('TimeZone')",
        clean: "4MB UTC",
        own: "5MB UTC",
    },
    Case {
        name: "SET LOCAL and set_config(..., true) end with their transaction",
        user: "alice",
        options: "",
        change:
            "BEGIN; SET LOCAL work_mem = '9MB'; SELECT set_config('search_path', 'a', true); COMMIT",
        show: "SELECT current_setting('work_mem') || ' ' || current_setting('search_path')",
        clean: "4MB \"$user\", public",
        own: "4MB \"$user\", public",
    },
    Case {
        name: "a reported setting (TimeZone)",
        user: "alice",
        options: "",
        change: "SET TimeZone = 'Asia/Tokyo'",
        show: "SHOW TimeZone",
        clean: "UTC",
        own: "Asia/Tokyo",
    },
    Case {
        name: "reported settings PostgreSQL lets a client change",
        user: "alice",
        options: "",
        change: "SET standard_conforming_strings = off; SET default_transaction_read_only = on",
        show: "SELECT current_setting('standard_conforming_strings') || ' ' || current_setting('default_transaction_read_only')",
        clean: "on off",
        own: "off on",
    },
    Case {
        name: "SET ROLE in a text nested deeper than the parser's result goes",
        user: "alice",
        options: "",
        change: DEEP_SET_ROLE,
        show: "SELECT current_user::text",
        clean: "alice",
        own: "tenant_x",
    },
    Case {
        name: "SET ROLE hidden by a backslash, with standard_conforming_strings off",
        user: "alice",
        options: "options='-c standard_conforming_strings=off'",
        change: r"SELECT 'a\' -- '; SET ROLE tenant_x; --",
        show: "SELECT current_user::text",
        clean: "alice",
        own: "tenant_x",
    },
    Case {
        name: "SET, then LISTEN",
        user: "alice",
        options: "",
        change: "SET work_mem = '77MB'; LISTEN somewhere",
        show: "SHOW work_mem",
        clean: "4MB",
        own: "77MB",
    },
    Case {
        name: "a superuser-only setting, then SET ROLE",
        user: "sam",
        options: "",
        change: "SET log_statement = 'all'; SET ROLE tenant_y",
        show: "SELECT current_setting('log_statement') || ' ' || current_user",
        clean: "none sam",
        own: "all tenant_y",
    },
    Case {
        name: "a custom setting (SET app.tenant), as row-level security reads it",
        user: "alice",
        options: "",
        change: "SET app.tenant = '42'",
        show: TENANT,
        clean: "unset",
        own: "42",
    },
    Case {
        name: "a custom setting set with set_config",
        user: "alice",
        options: "",
        change: "SELECT set_config('app.tenant', '9', false)",
        show: TENANT,
        clean: "unset",
        own: "9",
    },
    Case {
        name: "a custom setting from the startup packet",
        user: "alice",
        options: "options='-c app.tenant=7'",
        change: "",
        show: TENANT,
        clean: "unset",
        own: "7",
    },
    Case {
        name: "a custom setting from the startup packet, then another set",
        user: "alice",
        options: "options='-c app.tenant=7'",
        change: "SET app.person = 'u1'",
        show: "SELECT coalesce(nullif(current_setting('app.tenant', true), ''), 'unset') || ' ' || coalesce(nullif(current_setting('app.person', true), ''), 'unset')",
        clean: "unset unset",
        own: "7 u1",
    },
    Case {
        name: "UPDATE pg_settings (its rule calls set_config)",
        user: "alice",
        options: "",
        change: "UPDATE pg_settings SET setting = 'a, public' WHERE name = 'search_path'",
        show: "SELECT current_schemas(false)::text",
        clean: "{public}",
        own: "{a,public}",
    },
    Case {
        name: "SET ROLE hidden by a character of SJIS whose second byte is a backslash",
        user: "alice",
        options: "",
        // U+3041 is E3 81 81 in UTF-8; in SJIS, E3 81 and 81 5C are two characters, and
        // the string ends at the quote after them.
        change: "SET client_encoding = 'SJIS'\nSELECT E'\u{3041}\\'; SET ROLE tenant_x; -- '",
        show: "SELECT current_user::text",
        clean: "alice",
        own: "tenant_x",
    },
];

/// A custom setting as an application reads it (unset: never set, or reset).
const TENANT: &str = "SELECT coalesce(nullif(current_setting('app.tenant', true), ''), 'unset')";

/// `SET ROLE tenant_x`, then a SELECT of 200 terms: deeper than pg_query's result can
/// carry; the server takes it.
const DEEP_SET_ROLE: &str = concat!(
    "SET ROLE tenant_x; SELECT 1",
    "+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1",
    "+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1",
    "+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1+1",
);

/// Transaction pool of one: A changes its session and stays; B, on the same server
/// connection, sees a clean session; A still sees its own, in its next transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_follow_their_client_on_a_transaction_pool_of_one() {
    let s = Suite::start("leaktx", PoolMode::Transaction, |_| {}).await;
    let mut failures = Vec::new();
    for case in SETTINGS {
        let a = Client::login(s.port(), case.user, case.options).await;
        let b = Client::login(s.port(), case.user, "").await;
        for change in case.change.lines() {
            a.run(change).await;
        }
        let (pid_b, seen_b) = (b.pid().await, b.one(case.show).await);
        let (pid_a, seen_a) = (a.pid().await, a.one(case.show).await);
        assert_eq!(
            pid_a, pid_b,
            "{}: one server connection for both",
            case.name
        );
        if seen_b != case.clean {
            failures.push(format!(
                "{}: B saw {seen_b:?}, not {:?}",
                case.name, case.clean
            ));
        }
        if seen_a != case.own {
            failures.push(format!(
                "{}: A saw {seen_a:?}, not {:?}",
                case.name, case.own
            ));
        }
        // A leaves: a client after it finds a clean session too.
        a.leave().await;
        let c = Client::login(s.port(), case.user, "").await;
        let seen_c = c.one(case.show).await;
        if seen_c != case.clean {
            failures.push(format!("{}: after A left, C saw {seen_c:?}", case.name));
        }
        b.leave().await;
        c.leave().await;
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    s.proxy.stop().await;
}

/// Session pool of one: A changes its session and leaves; B, on the same server connection,
/// sees a clean session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_never_outlive_their_client_on_a_session_pool_of_one() {
    let s = Suite::start("leaksession", PoolMode::Session, |_| {}).await;
    let mut failures = Vec::new();
    for case in SETTINGS {
        let a = Client::login(s.port(), case.user, case.options).await;
        for change in case.change.lines() {
            a.run(change).await;
        }
        let (pid_a, seen_a) = (a.pid().await, a.one(case.show).await);
        if seen_a != case.own {
            failures.push(format!(
                "{}: A saw {seen_a:?}, not {:?}",
                case.name, case.own
            ));
        }
        a.leave().await;
        let b = Client::login(s.port(), case.user, "").await;
        let (pid_b, seen_b) = (b.pid().await, b.one(case.show).await);
        assert_eq!(
            pid_a, pid_b,
            "{}: one server connection for both",
            case.name
        );
        if seen_b != case.clean {
            failures.push(format!(
                "{}: B saw {seen_b:?}, not {:?}",
                case.name, case.clean
            ));
        }
        b.leave().await;
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    s.proxy.stop().await;
}

/// An object that lives in the session: how A makes it, how it shows, and how A ends it.
struct Object {
    name: &'static str,
    make: &'static str,
    show: &'static str,
    drop: &'static str,
}

const OBJECTS: &[Object] = &[
    Object {
        name: "a table made temporary by a search path that starts with pg_temp, set just before",
        make: "SELECT set_config('search_path', concat('pg_t', 'emp'), false); CREATE TABLE sneaky (x int)",
        show: "SELECT count(*)::text FROM pg_class WHERE relnamespace = pg_my_temp_schema() AND relkind = 'r'",
        drop: "DROP TABLE pg_temp.sneaky",
    },
    Object {
        name: "a temporary function",
        make: "CREATE FUNCTION pg_temp.f() RETURNS int LANGUAGE sql AS 'SELECT 1'",
        show: "SELECT count(*)::text FROM pg_proc WHERE pronamespace = pg_my_temp_schema()",
        drop: "DROP FUNCTION pg_temp.f()",
    },
    Object {
        name: "temporary table",
        make: "CREATE TEMP TABLE mine (x int); INSERT INTO mine VALUES (1)",
        show: "SELECT count(*)::text FROM pg_class WHERE relnamespace = pg_my_temp_schema() AND relkind = 'r'",
        drop: "DROP TABLE mine",
    },
    Object {
        name: "temporary table made with SELECT INTO",
        make: "SELECT 1 AS x INTO TEMP TABLE made",
        show: "SELECT count(*)::text FROM pg_class WHERE relnamespace = pg_my_temp_schema() AND relkind = 'r'",
        drop: "DROP TABLE made",
    },
    Object {
        name: "session advisory lock",
        make: "SELECT pg_advisory_lock(42)",
        show: "SELECT count(*)::text FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()",
        drop: "SELECT pg_advisory_unlock(42)",
    },
    Object {
        name: "SQL PREPARE",
        make: "PREPARE p1 AS SELECT 1",
        show: "SELECT count(*)::text FROM pg_prepared_statements WHERE from_sql",
        drop: "DEALLOCATE p1",
    },
    Object {
        name: "WITH HOLD cursor",
        make: "DECLARE held CURSOR WITH HOLD FOR SELECT generate_series(1, 3)",
        show: "SELECT count(*)::text FROM pg_cursors",
        drop: "CLOSE held",
    },
    Object {
        name: "everything, ended with DISCARD ALL",
        make: "CREATE TEMP TABLE t2 (x int); SELECT pg_advisory_lock(7); PREPARE p2 AS SELECT 2",
        show: "SELECT (SELECT count(*) FROM pg_class WHERE relnamespace = pg_my_temp_schema() AND relkind = 'r')
                    + (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid())
                    + (SELECT count(*) FROM pg_prepared_statements WHERE from_sql)",
        drop: "DISCARD ALL",
    },
];

/// A pinned client whose server connection died between its transactions is told, with the
/// FATAL a lost session gets (its temporary table, advisory locks and held cursors died with
/// that connection), not moved to another connection without them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_client_whose_connection_died_is_told_not_moved() {
    let s = Suite::start("pindeath", PoolMode::Transaction, |_| {}).await;
    let a = Client::login(s.port(), "alice", "").await;
    a.run("CREATE TEMP TABLE mine (x int)").await;
    let pid: i32 = a
        .one("SELECT pg_backend_pid()::text")
        .await
        .parse()
        .unwrap();
    let direct = connect(s.pg.port).await.unwrap();
    direct
        .execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();
    wait_for("A's backend gone", PROMPT, || async {
        let sql = "SELECT count(*) FROM pg_stat_activity WHERE pid = $1";
        let n: i64 = direct.query_one(sql, &[&pid]).await.ok()?.get(0);
        (n == 0).then_some(())
    })
    .await;
    // patroxy may see the death first (and tell the idle client), or A's request may meet
    // it: either way A is told, once, with 08006, on its request or as its connection ends.
    let next = a.try_one("SELECT 'moved on'").await;
    assert!(next.is_err(), "A went on without its session's state");
    let ended = tokio::time::timeout(PROMPT, a.conn).await.unwrap().unwrap();
    let told = [next.as_ref().err(), ended.as_ref().err()]
        .into_iter()
        .flatten()
        .find_map(sqlstate);
    assert_eq!(
        told.as_deref(),
        Some("08006"),
        "A was not told: {next:?}, {ended:?}"
    );
}

/// Transaction pool of one: A makes an object that lives in the session; it keeps its
/// server connection (pinned, shown by SHOW CLIENTS and counted) and finds the object in its
/// next transactions, while B waits for the only connection; when A ends the object, the
/// connection goes to B, clean. A client that leaves while pinned leaves nothing either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_objects_pin_their_client_and_are_never_lent_on_a_transaction_pool() {
    install_metrics();
    let s = Suite::start("leakpins", PoolMode::Transaction, |cfg| {
        cfg.auth.admin_users = vec!["sam".into()];
    })
    .await;
    let mut failures = Vec::new();
    for object in OBJECTS {
        let a = Client::login(s.port(), "alice", "").await;
        a.run(object.make).await;
        let own = a.one(object.show).await;
        if own == "0" {
            failures.push(format!("{}: A lost its own object", object.name));
        }
        if object.name == "WITH HOLD cursor" {
            // Its cursor works in the next transaction, as it does direct.
            let fetched = a.try_one("FETCH 2 FROM held").await;
            if fetched.as_deref().ok() != Some("2") {
                failures.push(format!("{}: FETCH gave {fetched:?}", object.name));
            }
        }
        // SHOW CLIENTS' last column says why a client is pinned.
        let clients = console(s.port(), "SHOW CLIENTS").await;
        let pinned = clients
            .lines()
            .any(|l| l.rsplit('|').next().is_some_and(|w| !w.is_empty()));
        if !pinned {
            failures.push(format!(
                "{}: SHOW CLIENTS shows no pin:\n{clients}",
                object.name
            ));
        }
        // B waits for the only server connection, which A keeps.
        let b = Client::login(s.port(), "alice", "").await;
        let b_sees = tokio::spawn(async move {
            let seen = b.one(object.show).await;
            (b, seen)
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        if b_sees.is_finished() {
            failures.push(format!(
                "{}: B got the connection A is pinned to",
                object.name
            ));
        }
        if let Err(e) = a.try_one(object.drop).await {
            failures.push(format!("{}: {}: {e}", object.name, object.drop));
        }
        let (b, seen) = tokio::time::timeout(PROMPT, b_sees)
            .await
            .unwrap_or_else(|_| panic!("{}: B never got the connection", object.name))
            .unwrap();
        if seen != "0" {
            failures.push(format!("{}: B saw {seen}", object.name));
        }
        // A leaves while pinned: nothing of it reaches the next client.
        let a2 = Client::login(s.port(), "alice", "").await;
        a2.run(object.make).await;
        a2.leave().await;
        let seen = b.one(object.show).await;
        if seen != "0" {
            failures.push(format!(
                "{}: after A left pinned, B saw {seen}",
                object.name
            ));
        }
        b.leave().await;
        a.leave().await;
    }
    let pins = sample(&metrics_text(), "patroxy_pins_total", &[]).unwrap_or(0.0);
    if pins < OBJECTS.len() as f64 {
        failures.push(format!("patroxy_pins_total = {pins}"));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    s.proxy.stop().await;
}

/// Session pool of one: whatever A left in its session, B finds none of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_objects_never_outlive_their_client_on_a_session_pool() {
    let s = Suite::start("leakobjects", PoolMode::Session, |_| {}).await;
    for object in OBJECTS {
        let a = Client::login(s.port(), "alice", "").await;
        a.run(object.make).await;
        assert_ne!(a.one(object.show).await, "0", "{}", object.name);
        a.leave().await;
        let b = Client::login(s.port(), "alice", "").await;
        assert_eq!(b.one(object.show).await, "0", "{}", object.name);
        b.leave().await;
    }
    s.proxy.stop().await;
}

/// The admin console, as sam.
async fn console(port: u16, sql: &str) -> String {
    let out = tokio::process::Command::new(format!("{PG_BIN}/psql"))
        .env("PGPASSWORD", "secret")
        .arg(format!(
            "host=127.0.0.1 port={port} user=sam dbname=pgbouncer"
        ))
        .args(["-XAtF", "|", "-c", sql])
        .output()
        .await
        .expect("psql");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
        + String::from_utf8_lossy(&out.stderr).trim()
}

/// A cancel still on its way when its client's transaction ends must not cancel the next
/// client's query on that server connection (PgBouncer's `sv_being_canceled`): the cancel
/// is held in a gate in front of the server while the connection is released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_on_its_way_never_reaches_the_next_client_of_the_connection() {
    cancel_on_its_way("cancelrace", false).await;
}

/// As above, for a client pinned to its connection (a temporary table) when it sends the
/// cancel: it leaves the pin in a later transaction, and the connection still waits for the
/// cancel of the earlier one before it goes to the next client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_clients_cancel_on_its_way_never_reaches_the_next_client() {
    cancel_on_its_way("cancelpin", true).await;
}

async fn cancel_on_its_way(scope: &str, pinned: bool) {
    let root = TempRoot::new();
    let etcd = Etcd::start(&root);
    let pg = Postgres::primary(&root, "a");
    let file = roles(&root, &pg).await;
    let gate = common::gate::Gate::start(pg.port).await;
    let mut keys = Keys::new(&etcd, scope).await;
    keys.member("a", gate.port, "primary", "running").await;
    keys.leader("a").await;
    let proxy = Proxy::start(&etcd, scope, |cfg| {
        cfg.listeners = vec![ListenerConfig {
            pool_mode: PoolMode::Transaction,
            ..listener("pooled", ListenerRole::Primary)
        }];
        cfg.auth.auth_file = Some(file);
        cfg.auth.admin_users = vec!["sam".into()];
        cfg.pool.pool_size = 1;
    })
    .await;
    let port = proxy.port();
    let (a, b) = (
        Client::login(port, "alice", "").await,
        Client::login(port, "alice", "").await,
    );
    assert_eq!(
        a.one("SELECT 'open'").await,
        "open",
        "the pool's one connection is open"
    );
    if pinned {
        a.run("CREATE TEMP TABLE pinned_by_a (x int)").await;
    }
    // From now on the gate holds new connections: the cancel waits there.
    gate.hold();
    let token = a.c.cancel_token();
    // Long enough that the cancel reaches patroxy while A's request runs.
    let sleep_a = "SELECT pg_sleep(2)::text";
    let server = pg.port;
    let cancel = tokio::spawn(async move {
        wait_query_running(server, sleep_a).await;
        token.cancel_query(tokio_postgres::NoTls).await
    });
    let a_done = a.try_one(sleep_a).await;
    assert!(
        a_done.is_ok(),
        "A's query ran to its end: the cancel is still held"
    );
    if pinned {
        // A later transaction, on the same connection, leaves the pin.
        a.run("DROP TABLE pinned_by_a").await;
    }
    // B asks for the connection; it either runs its query at once or waits for it.
    let sleep_b = "SELECT pg_sleep(1)::text";
    let release =
        async {
            let waited = wait_for("B running, or waiting for the connection", PROMPT, || async {
            let direct = connect(pg.port).await.ok()?;
            let sql = "SELECT count(*) FROM pg_stat_activity WHERE query = $1 AND state = 'active'";
            let running: i64 = direct.query_one(sql, &[&sleep_b]).await.ok()?.get(0);
            let waiting = console(port, "SHOW CLIENTS").await.contains("|waiting|");
            (running > 0 || waiting).then_some(waiting)
        })
        .await;
            gate.release();
            waited
        };
    let (b_done, waited) = tokio::join!(b.try_one(sleep_b), release);
    // The connection is held while A's cancel is on its way (had the cancel come after A's
    // request, nothing would be on its way and this test would show nothing).
    assert!(
        waited,
        "B was given the connection while A's cancel was on its way"
    );
    assert!(
        b_done.is_ok(),
        "A's late cancel reached B's query: {:?}",
        b_done.err().map(|e| e.to_string())
    );
    cancel.await.unwrap().unwrap();
    assert_eq!(b.one("SELECT 'b goes on'").await, "b goes on");
    proxy.stop().await;
}

/// PgBouncer's three timeouts, with its meanings, on a transaction pool of one: a client
/// sitting in a transaction, one whose request runs too long, and one idle between
/// transactions are disconnected (with PostgreSQL's SQLSTATEs for the same), and the one
/// server connection serves the next client at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_sit_on_a_connection_are_let_go_by_pgbouncers_timeouts() {
    let s = Suite::start("leaktimeouts", PoolMode::Transaction, |cfg| {
        cfg.pool.idle_transaction_timeout = Duration::from_millis(500);
        cfg.pool.query_timeout = Duration::from_millis(1500);
        cfg.pool.client_idle_timeout = Duration::from_secs(3);
    })
    .await;
    let port = s.port();
    // BEGIN, then nothing: the client is let go, its transaction rolled back.
    let sitting = Client::login(port, "alice", "").await;
    sitting.run("BEGIN; CREATE TABLE never (x int)").await;
    let code = ended_within(sitting.conn, Duration::from_secs(5)).await;
    assert_eq!(code.as_deref(), Some("25P03"), "idle_transaction_timeout");
    let next = Client::login(port, "alice", "").await;
    assert_eq!(
        next.one("SELECT (to_regclass('never') IS NULL)::text")
            .await,
        "true",
        "its transaction was rolled back"
    );
    // A request that runs too long: the client is told and its server connection closed.
    let slow = Client::login(port, "alice", "").await;
    let e = slow.try_one("SELECT pg_sleep(10)").await.unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("57014"), "query_timeout: {e}");
    assert_eq!(next.one("SELECT 'served'").await, "served");
    // Idle between transactions, holding nothing: let go after client_idle_timeout.
    let idle = Client::login(port, "alice", "").await;
    idle.run("SELECT 1").await;
    let code = ended_within(idle.conn, Duration::from_secs(8)).await;
    assert_eq!(code.as_deref(), Some("57P05"), "client_idle_timeout");
    s.proxy.stop().await;
}

/// The startup as PostgreSQL answers it: a database that does not exist is `3D000` right
/// after authentication (and only after: a wrong password is told first), a role the
/// server does not have is `28P01`; a newer minor version or a protocol option gets a
/// NegotiateProtocolVersion before authentication.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_is_answered_as_postgresql_answers_it() {
    let s = Suite::start("startup", PoolMode::Transaction, |cfg| {
        let file = cfg.auth.auth_file.clone().unwrap();
        let mut users = std::fs::read_to_string(&file).unwrap();
        users.push_str("\"ghost\" \"boo\"\n");
        std::fs::write(&file, users).unwrap();
    })
    .await;
    let port = s.port();
    let attempt = |user: &'static str, password: &'static str, db: &'static str| async move {
        let started = std::time::Instant::now();
        let conn =
            format!("host=127.0.0.1 port={port} user={user} password={password} dbname={db}");
        let e = tokio_postgres::connect(&conn, tokio_postgres::NoTls)
            .await
            .err()
            .expect("refused");
        (sqlstate(&e), message(&e), started.elapsed())
    };
    let (code, msg, took) = attempt("alice", "wonder", "nope").await;
    assert_eq!(code.as_deref(), Some("3D000"), "{msg}");
    assert_eq!(msg, "database \"nope\" does not exist");
    assert!(
        took < Duration::from_secs(2),
        "told at once, not after a wait: {took:?}"
    );
    let (code, _, _) = attempt("alice", "wrong", "nope").await;
    assert_eq!(
        code.as_deref(),
        Some("28P01"),
        "the password is checked first"
    );
    let (code, msg, _) = attempt("ghost", "boo", "postgres").await;
    assert_eq!(code.as_deref(), Some("28P01"), "{msg}");
    assert_eq!(msg, "password authentication failed for user \"ghost\"");

    // Protocol 3.2 with an option patroxy does not know: NegotiateProtocolVersion, then
    // the authentication request.
    let packet = startup_message(
        2,
        &[
            ("user", "alice"),
            ("database", "postgres"),
            ("_pq_.hope", "1"),
        ],
    );
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut raw = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    raw.write_all(&packet).await.unwrap();
    let mut head = [0u8; 5];
    raw.read_exact(&mut head).await.unwrap();
    assert_eq!(head[0], b'v', "NegotiateProtocolVersion first");
    let len = u32::from_be_bytes(head[1..5].try_into().unwrap()) as usize;
    let mut v = vec![0u8; len - 4];
    raw.read_exact(&mut v).await.unwrap();
    assert_eq!(
        &v[..8],
        &[0, 3, 0, 2, 0, 0, 0, 1],
        "3.2, one option not recognized"
    );
    assert_eq!(&v[8..], b"_pq_.hope\0");
    raw.read_exact(&mut head).await.unwrap();
    assert_eq!(head[0], b'R', "then authentication");
    drop(raw);
    s.proxy.stop().await;
}

/// Runs a PostgreSQL client program as alice (with her password) and returns its stdout;
/// fails the test if it fails.
async fn tool(program: &str, args: &[&str]) -> String {
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(format!("{PG_BIN}/{program}"))
            .env("PGPASSWORD", "wonder")
            .env("PGCONNECT_TIMEOUT", "10")
            .args(args)
            .output(),
    )
    .await
    .unwrap_or_else(|_| panic!("{program} {args:?} did not finish"))
    .unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Replication connections through a transaction-pooled listener go unpooled, on the
/// member the listener routes to, authenticated as pooled clients are: pg_basebackup (with
/// its WAL stream) makes a backup pg_verifybackup accepts, pg_recvlogical decodes rows,
/// IDENTIFY_SYSTEM answers; and pgbench -i works through the same listener after them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_clients_work_through_a_pooled_listener() {
    let s = Suite::start("replication", PoolMode::Transaction, |_| {}).await;
    let port = s.port().to_string();
    let direct = connect(s.pg.port).await.unwrap();
    direct
        .batch_execute("ALTER ROLE alice REPLICATION; GRANT CREATE ON DATABASE postgres TO alice; CREATE TABLE decoded (x int); GRANT ALL ON decoded TO alice")
        .await
        .unwrap();
    let base = ["-h", "127.0.0.1", "-p", &port, "-U", "alice"];
    let identify = tool(
        "psql",
        &[
            &format!("host=127.0.0.1 port={port} user=alice dbname=postgres replication=database"),
            "-XAtc",
            "IDENTIFY_SYSTEM",
        ],
    )
    .await;
    assert!(identify.contains('|'), "{identify}");
    let backup = s.root.subdir("backup");
    let dir = backup.to_str().unwrap();
    tool(
        "pg_basebackup",
        &[&base[..], &["-D", dir, "-X", "stream", "--no-sync"]].concat(),
    )
    .await;
    tool("pg_verifybackup", &["-n", dir]).await;
    // Logical decoding of rows written meanwhile, up to a known position.
    let slot = [&base[..], &["-d", "postgres", "--slot", "decode"]].concat();
    tool(
        "pg_recvlogical",
        &[&slot[..], &["--create-slot", "-P", "test_decoding"]].concat(),
    )
    .await;
    direct
        .batch_execute("INSERT INTO decoded VALUES (41), (42)")
        .await
        .unwrap();
    let end: String = direct
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    let decoded = tool(
        "pg_recvlogical",
        &[&slot[..], &["--start", "-n", "-f", "-", "-E", &end]].concat(),
    )
    .await;
    assert!(decoded.contains("x[integer]:42"), "{decoded}");
    tool("pg_recvlogical", &[&slot[..], &["--drop-slot"]].concat()).await;
    // The pooled listener serves as before, with nothing of them left on its connections.
    tool(
        "pgbench",
        &[&base[..], &["-i", "-s", "1", "-q", "postgres"]].concat(),
    )
    .await;
    s.proxy.stop().await;
}

/// A client of the suite's listener whose notifications come out of a channel.
async fn listener_client(
    port: u16,
) -> (
    tokio_postgres::Client,
    tokio::sync::mpsc::UnboundedReceiver<tokio_postgres::Notification>,
) {
    use futures_util::StreamExt;
    let s = format!("host=127.0.0.1 port={port} user=alice password=wonder dbname=postgres");
    let (c, mut conn) = tokio_postgres::connect(&s, tokio_postgres::NoTls)
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(m)) = messages.next().await {
            if let tokio_postgres::AsyncMessage::Notification(n) = m {
                let _ = tx.send(n);
            }
        }
    });
    (c, rx)
}

/// LISTEN on a transaction pool of one connection: the client keeps no server connection
/// (another client uses the only one meanwhile, and finds no LISTEN on it), and gets every
/// notification, in order, with its channel, payload and sender's pid; after UNLISTEN,
/// none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_on_a_transaction_pool_takes_no_connection_and_misses_nothing() {
    let s = Suite::start("listenhub", PoolMode::Transaction, |cfg| {
        cfg.auth.admin_users = vec!["sam".into()];
    })
    .await;
    let port = s.port();
    let (l, mut notes) = listener_client(port).await;
    l.batch_execute("LISTEN news; LISTEN other").await.unwrap();
    let clients = console(port, "SHOW CLIENTS").await;
    assert!(
        clients.lines().all(|r| r.rsplit('|').next() == Some("")),
        "a listening client is not pinned:\n{clients}"
    );
    let b = Client::login(port, "alice", "").await;
    assert_eq!(
        b.one("SELECT count(*)::text FROM pg_listening_channels()")
            .await,
        "0",
        "the LISTEN is not left on the pool's connection"
    );
    let sender_pid: i32 = b.one("SELECT pg_backend_pid()").await.parse().unwrap();
    for i in 0..100 {
        b.run(&format!("NOTIFY news, 'n{i}'")).await;
    }
    for i in 0..100 {
        let n = tokio::time::timeout(PROMPT, notes.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (n.channel(), n.payload()),
            ("news", format!("n{i}").as_str())
        );
        assert_eq!(n.process_id(), sender_pid);
    }
    b.run("NOTIFY other, 'x'").await;
    let n = tokio::time::timeout(PROMPT, notes.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(n.channel(), "other");
    l.batch_execute("UNLISTEN news").await.unwrap();
    b.run("NOTIFY news, 'after'; NOTIFY other, 'last'").await;
    let n = tokio::time::timeout(PROMPT, notes.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (n.channel(), n.payload()),
        ("other", "last"),
        "nothing on news after UNLISTEN"
    );
    s.proxy.stop().await;
}

/// Two servers that share the suite's roles and alice's verifier, as the members of a
/// Patroni cluster do, described with `a` the leader; patroxy in front of them with one
/// pooled listener (`mode`) on pools of one connection.
struct Members {
    _root: TempRoot,
    _etcd: Etcd,
    a: Postgres,
    b: Postgres,
    keys: Keys,
    proxy: Proxy,
}

impl Members {
    async fn start(scope: &str, mode: PoolMode) -> Members {
        let root = TempRoot::new();
        let etcd = Etcd::start(&root);
        let (a, b) = (Postgres::primary(&root, "a"), Postgres::primary(&root, "b"));
        roles(&root, &b).await;
        let file = roles(&root, &a).await;
        let verifier: String = connect(a.port)
            .await
            .unwrap()
            .query_one(
                "SELECT rolpassword FROM pg_authid WHERE rolname = 'alice'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        connect(b.port)
            .await
            .unwrap()
            .batch_execute(&format!("ALTER ROLE alice PASSWORD '{verifier}'"))
            .await
            .unwrap();
        let mut keys = Keys::new(&etcd, scope).await;
        keys.member("a", a.port, "primary", "running").await;
        keys.member("b", b.port, "replica", "running").await;
        keys.leader("a").await;
        let proxy = Proxy::start(&etcd, scope, |cfg| {
            cfg.listeners = vec![ListenerConfig {
                pool_mode: mode,
                ..listener("pooled", ListenerRole::Primary)
            }];
            cfg.auth.auth_file = Some(file);
            cfg.pool.pool_size = 1;
        })
        .await;
        Members {
            _root: root,
            _etcd: etcd,
            a,
            b,
            keys,
            proxy,
        }
    }

    /// b becomes the leader.
    async fn move_leader(&mut self) {
        self.keys
            .member("a", self.a.port, "replica", "running")
            .await;
        self.keys
            .member("b", self.b.port, "primary", "running")
            .await;
        self.keys.leader("b").await;
    }
}

/// Session pooling through a planned switchover: a client at rest that holds nothing on
/// the old primary leaves it when Patroni announces the switchover, and its next
/// transaction runs on the new primary with its settings and its role as they were (the
/// role was lost before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_moved_at_a_switchover_keeps_its_role_and_settings() {
    let mut m = Members::start("sessionmove", PoolMode::Session).await;
    let port = m.proxy.port();
    let c = Client::login(port, "alice", "options='-c search_path=foo,public'").await;
    c.run("SET ROLE tenant_x; SET work_mem = '7MB'").await;
    let show = "SELECT current_user || ' ' || current_setting('work_mem') || ' ' || current_setting('search_path')";
    assert_eq!(c.one(show).await, "tenant_x 7MB foo,public");
    m.keys
        .put("failover", r#"{"leader":"a","member":"b"}"#)
        .await;
    let a_port = m.a.port;
    wait_for("the session to leave a", PROMPT, || async move {
        let direct = connect(a_port).await.ok()?;
        let sql = "SELECT count(*) FROM pg_stat_activity WHERE usename = 'alice'";
        (direct.query_one(sql, &[]).await.ok()?.get::<_, i64>(0) == 0).then_some(())
    })
    .await;
    m.move_leader().await;
    m.keys.put("failover", "{}").await;
    let moved = c.one("SELECT inet_server_port()::text").await;
    assert_eq!(moved, m.b.port.to_string(), "the next transaction ran on b");
    assert_eq!(
        c.one(show).await,
        "tenant_x 7MB foo,public",
        "as it was on a"
    );
    m.proxy.stop().await;
}

/// psycopg2 LISTENs on `channel` and prints each notification (`payload pid`) until the
/// one whose payload is `last`; `ready` once it listens.
const PSYCOPG2_LISTEN: &str = r#"
import select, sys, psycopg2
conn = psycopg2.connect(sys.argv[1])
conn.autocommit = True
conn.cursor().execute("LISTEN " + sys.argv[2])
print("ready", flush=True)
while True:
    if select.select([conn], [], [], 60) == ([], [], []):
        sys.exit("timed out waiting for notifications")
    conn.poll()
    while conn.notifies:
        n = conn.notifies.pop(0)
        print(n.payload, n.pid, flush=True)
        if n.payload == sys.argv[3]:
            sys.exit(0)
"#;

/// A client program that prints lines; its stdout comes line by line.
struct Program {
    child: tokio::process::Child,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
}

impl Program {
    fn spawn(mut cmd: tokio::process::Command) -> Program {
        use tokio::io::AsyncBufReadExt;
        let mut child = cmd
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("a client program (install-deps.sh installs it)");
        let out = child.stdout.take().unwrap();
        Program {
            child,
            lines: tokio::io::BufReader::new(out).lines(),
        }
    }

    async fn line(&mut self) -> String {
        tokio::time::timeout(Duration::from_secs(60), self.lines.next_line())
            .await
            .expect("a line in time")
            .unwrap()
            .expect("the program is still printing")
    }

    /// Every line until it exits, which it must do successfully.
    async fn rest(mut self) -> Vec<String> {
        let mut out = Vec::new();
        while let Ok(Some(l)) = self.lines.next_line().await {
            out.push(l);
        }
        let status = self.child.wait().await.unwrap();
        assert!(status.success(), "{status}: {out:?}");
        out
    }
}

/// psycopg2 and node-postgres LISTEN through a transaction pool through a switchover from
/// a to b (Patroni's announcement, then the leader key): the listening connection follows
/// routing, and each client gets every notification sent through patroxy before and after
/// it, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listeners_get_their_notifications_in_order_across_a_leader_change() {
    let mut m = Members::start("listenmove", PoolMode::Transaction).await;
    let port = m.proxy.port();
    let url = format!("postgresql://alice:wonder@127.0.0.1:{port}/postgres");
    let mut py = tokio::process::Command::new("/usr/bin/python3");
    py.arg("-c").arg(PSYCOPG2_LISTEN).args([&url, "news", "b9"]);
    let mut node = tokio::process::Command::new("node");
    node.current_dir("tests/node")
        .args(["listen.js", &url, "news", "b9"]);
    let mut clients = [Program::spawn(py), Program::spawn(node)];
    for c in &mut clients {
        assert_eq!(c.line().await, "ready");
    }
    let sender = Client::login(port, "alice", "").await;
    for i in 0..10 {
        sender.run(&format!("NOTIFY news, 'a{i}'")).await;
    }
    m.keys
        .put("failover", r#"{"leader":"a","member":"b"}"#)
        .await;
    m.move_leader().await;
    m.keys.put("failover", "{}").await;
    // The listening connection moves to b; notifications sent there after it listens.
    wait_for("patroxy's listening connection on b", PROMPT, || async {
        let c = connect(m.b.port).await.ok()?;
        let sql = "SELECT count(*) FROM pg_stat_activity WHERE usename = 'alice' AND query LIKE 'LISTEN%'";
        (c.query_one(sql, &[]).await.ok()?.get::<_, i64>(0) > 0).then_some(())
    })
    .await;
    wait_for("writes through patroxy to reach b", PROMPT, || async {
        let port: String = sender
            .try_one("SELECT inet_server_port()::text")
            .await
            .ok()?;
        (port == m.b.port.to_string()).then_some(())
    })
    .await;
    for i in 0..10 {
        sender.run(&format!("NOTIFY news, 'b{i}'")).await;
    }
    let want: Vec<String> = (0..10)
        .map(|i| format!("a{i}"))
        .chain((0..10).map(|i| format!("b{i}")))
        .collect();
    for c in clients {
        let got: Vec<String> = c
            .rest()
            .await
            .iter()
            .map(|l| l.split(' ').next().unwrap_or_default().to_owned())
            .collect();
        assert_eq!(got, want, "every notification, in order");
    }
    m.proxy.stop().await;
}

/// What the parser cannot see (a function calling set_config, a function making a
/// temporary table) stays on the connection for the next client, the documented limit;
/// `pool.verify_release` asks the server at every transaction's end and finds it: the
/// setting becomes its client's own, the table pins its client, both counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_release_finds_what_functions_did_to_the_session() {
    install_metrics();
    let found = || {
        sample(
            &metrics_text(),
            "patroxy_release_checks_total",
            &[r#"result="found""#],
        )
        .unwrap_or(0.0)
    };
    for verify in [false, true] {
        let scope = if verify { "verifyon" } else { "verifyoff" };
        let s = Suite::start(scope, PoolMode::Transaction, |cfg| {
            cfg.pool.verify_release = verify;
        })
        .await;
        connect(s.pg.port)
            .await
            .unwrap()
            .batch_execute(
                "CREATE FUNCTION sneaky() RETURNS text LANGUAGE sql AS $$ SELECT set_config('work_mem', '9MB', false) $$;
                 CREATE FUNCTION scratch() RETURNS int LANGUAGE plpgsql AS $$ BEGIN CREATE TEMP TABLE IF NOT EXISTS scratchpad (x int); RETURN 1; END $$;",
            )
            .await
            .unwrap();
        let (a, b) = (
            Client::login(s.port(), "alice", "").await,
            Client::login(s.port(), "alice", "").await,
        );
        let before = found();
        a.run("SELECT sneaky()").await;
        let seen_by_b = b.one("SHOW work_mem").await;
        assert_eq!(a.one("SHOW work_mem").await, "9MB", "A keeps its own");
        match verify {
            false => assert_eq!(
                seen_by_b, "9MB",
                "the documented limit: the next client sees it"
            ),
            true => assert_eq!(seen_by_b, "4MB", "verify_release found it"),
        }
        if verify {
            a.run("SELECT scratch()").await;
            let b_sees = tokio::spawn(async move {
                b.one(
                    "SELECT count(*)::text FROM pg_class WHERE relnamespace = pg_my_temp_schema()",
                )
                .await
            });
            a.run("DROP TABLE scratchpad").await;
            assert_eq!(
                tokio::time::timeout(PROMPT, b_sees).await.unwrap().unwrap(),
                "0"
            );
            assert!(found() >= before + 2.0, "both were counted as found");
        }
        s.proxy.stop().await;
    }
}

/// Operators of a client's own ahead of pg_catalog on its search path do not fool
/// patroxy's questions about the session: a temporary table still pins its client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_search_path_of_the_clients_own_operators_fools_nothing() {
    let s = Suite::start("leakoperators", PoolMode::Transaction, |_| {}).await;
    let port = s.port();
    connect(s.pg.port)
        .await
        .unwrap()
        .batch_execute("CREATE SCHEMA evil AUTHORIZATION alice")
        .await
        .unwrap();
    let a = Client::login(port, "alice", "").await;
    a.run(
        "CREATE FUNCTION evil.never(oid, oid) RETURNS bool LANGUAGE sql AS 'SELECT false';
         CREATE OPERATOR evil.= (leftarg = oid, rightarg = oid, function = evil.never)",
    )
    .await;
    a.run("SET search_path = evil, pg_catalog, public").await;
    a.run("CREATE TEMP TABLE hidden (x int)").await;
    let b = Client::login(port, "alice", "").await;
    let b_sees = tokio::spawn(async move {
        let seen = b
            .one("SELECT (to_regclass('pg_temp.hidden') IS NOT NULL)::text")
            .await;
        (b, seen)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !b_sees.is_finished(),
        "A's temporary table pins it, operators or not"
    );
    a.run("DROP TABLE hidden").await;
    let (_b, seen) = tokio::time::timeout(PROMPT, b_sees).await.unwrap().unwrap();
    assert_eq!(seen, "false");
    a.leave().await;
    s.proxy.stop().await;
}

/// A DISCARD ALL that fails (inside a transaction block) drops nothing: B's prepared
/// statement, the same as A's, runs on the connection that still has it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_discard_all_that_fails_drops_nothing() {
    let s = Suite::start("leakdiscard", PoolMode::Transaction, |_| {}).await;
    let port = s.port();
    let (a, _conn) = tokio_postgres::connect(
        &format!("host=127.0.0.1 port={port} user=alice password=wonder dbname=postgres"),
        tokio_postgres::NoTls,
    )
    .await
    .map(|(c, conn)| (c, tokio::spawn(conn)))
    .unwrap();
    let st = a.prepare("SELECT $1::int + 5").await.unwrap();
    let v: i32 = a.query_one(&st, &[&1]).await.unwrap().get(0);
    assert_eq!(v, 6);
    let e = a.batch_execute("BEGIN; DISCARD ALL").await.unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("25001"));
    a.batch_execute("ROLLBACK").await.unwrap();
    let (b2, _conn2) = tokio_postgres::connect(
        &format!("host=127.0.0.1 port={port} user=alice password=wonder dbname=postgres"),
        tokio_postgres::NoTls,
    )
    .await
    .map(|(c, conn)| (c, tokio::spawn(conn)))
    .unwrap();
    let st = b2.prepare("SELECT $1::int + 5").await.unwrap();
    let v: i32 = b2.query_one(&st, &[&2]).await.unwrap().get(0);
    assert_eq!(v, 7, "B's statement was prepared without 42P05");
    s.proxy.stop().await;
}

/// A setting the server refuses (from the startup packet) is told at once, as PostgreSQL
/// tells it, not retried with new server connections for connect_wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_setting_the_server_refuses_is_told_at_once() {
    let s = Suite::start("leakrefused", PoolMode::Transaction, |cfg| {
        cfg.timeouts.connect_wait = Duration::from_secs(10);
    })
    .await;
    let port = s.port();
    let started = std::time::Instant::now();
    let bad = Client::login(port, "alice", "options='-c work_mem=bogus'").await;
    let e = bad.try_one("SELECT 1").await.unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("22023"), "{e}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    s.proxy.stop().await;
}

/// LOAD in a transaction the client never ends: the connection is closed, not lent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_library_loaded_in_an_unfinished_transaction_closes_the_connection() {
    let s = Suite::start("leakload", PoolMode::Transaction, |_| {}).await;
    let port = s.port();
    let loader = Client::login(port, "sam", "").await;
    loader.run("BEGIN; LOAD 'auto_explain'").await;
    loader.leave().await;
    let next = Client::login(port, "sam", "").await;
    let loaded = next
        .one("SELECT count(*)::text FROM pg_settings WHERE name LIKE 'auto_explain.%'")
        .await;
    assert_eq!(
        loaded, "0",
        "the next client's backend has no library of A's"
    );

    s.proxy.stop().await;
}

/// A statement named in bytes that are not UTF-8 (a client in LATIN1) is still renamed: its
/// name never reaches the server, where the next client of the connection could bind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_named_in_any_bytes_is_renamed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = Suite::start("leakbytes", PoolMode::Transaction, |cfg| {
        cfg.auth.trust = vec!["127.0.0.1/32".parse().unwrap()];
    })
    .await;
    let port = s.port();
    let mut raw = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let mut body = 196_608u32.to_be_bytes().to_vec();
    // In LATIN1, where the byte 0xff is a letter (ÿ) and so a valid name.
    body.extend_from_slice(b"user\0sam\0database\0postgres\0client_encoding\0LATIN1\0\0");
    let mut packet = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    packet.extend_from_slice(&body);
    raw.write_all(&packet).await.unwrap();
    read_to_ready(&mut raw).await;
    let mut parse = b"P\0\0\0\0s\xff\0SELECT 42\0\0\0".to_vec();
    let len = (parse.len() - 1) as u32;
    parse[1..5].copy_from_slice(&len.to_be_bytes());
    parse.extend_from_slice(b"S\0\0\0\x04");
    raw.write_all(&parse).await.unwrap();
    let mut answer = [0u8; 11];
    raw.read_exact(&mut answer).await.unwrap();
    assert_eq!(
        &answer[..],
        b"1\0\0\0\x04Z\0\0\0\x05I",
        "ParseComplete, ReadyForQuery"
    );
    let b = Client::login(port, "sam", "").await;
    let named = b
        .one("SELECT count(*)::text FROM pg_prepared_statements WHERE name NOT LIKE 'patroxy_%'")
        .await;
    assert_eq!(named, "0");
    drop(raw);
    s.proxy.stop().await;
}

/// Reads a raw client's socket up to a ReadyForQuery; an ErrorResponse fails the test.
async fn read_to_ready(raw: &mut tokio::net::TcpStream) {
    use tokio::io::AsyncReadExt;
    let mut head = [0u8; 5];
    loop {
        raw.read_exact(&mut head).await.unwrap();
        let len = u32::from_be_bytes(head[1..5].try_into().unwrap()) as usize;
        let mut rest = vec![0u8; len - 4];
        raw.read_exact(&mut rest).await.unwrap();
        assert_ne!(head[0], b'E', "{}", String::from_utf8_lossy(&rest));
        if head[0] == b'Z' {
            return;
        }
    }
}

/// Session pooling with PgBouncer's advice for transaction pooling, an empty
/// `server_reset_query`: what a client set stays on the server, and patroxy, which asks the
/// server after the reset, resets it for the next client. A RESET sent through the extended
/// protocol goes back to the startup values, as a simple one does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_pool_without_discard_all_still_hands_over_clean_sessions() {
    let s = Suite::start("leaknoreset", PoolMode::Session, |cfg| {
        cfg.pool.server_reset_query = String::new();
    })
    .await;
    let port = s.port();
    let a = Client::login(port, "alice", "").await;
    a.run("SET work_mem = '7MB'; SET ROLE tenant_x").await;
    a.leave().await;
    let b = Client::login(port, "alice", "").await;
    assert_eq!(
        b.one("SELECT current_setting('work_mem') || ' ' || current_user")
            .await,
        "4MB alice"
    );
    b.leave().await;
    let (c, _conn) = tokio_postgres::connect(
        &format!("host=127.0.0.1 port={port} user=alice password=wonder dbname=postgres options='-c work_mem=5MB'"),
        tokio_postgres::NoTls,
    )
    .await
    .map(|(c, conn)| (c, tokio::spawn(conn)))
    .unwrap();
    c.batch_execute("SET work_mem = '9MB'").await.unwrap();
    c.query_typed("RESET ALL", &[]).await.unwrap();
    let now: String = c.query_one("SHOW work_mem", &[]).await.unwrap().get(0);
    assert_eq!(now, "5MB", "back to its startup value");
    s.proxy.stop().await;
}

/// A client listening through the listening connection that pins itself to its server
/// connection (a job queue: LISTEN, then an advisory lock) and lets go again, over and
/// over while notifications keep coming: it gets every one, once, in order, whether it
/// came through the listening connection or its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_that_pins_itself_keeps_getting_notifications() {
    let s = Suite::start("listenpin", PoolMode::Transaction, |cfg| {
        cfg.pool.pool_size = 2;
    })
    .await;
    let port = s.port();
    let (l, mut notes) = listener_client(port).await;
    l.batch_execute("LISTEN jobs").await.unwrap();
    let sender = Client::login(port, "alice", "").await;
    const SENT: usize = 600;
    let sending = tokio::spawn(async move {
        for i in 0..SENT {
            sender.run(&format!("NOTIFY jobs, 'n{i}'")).await;
        }
        sender
    });
    let mut got = Vec::new();
    let mut next = async || {
        let n = tokio::time::timeout(PROMPT, notes.recv())
            .await
            .expect("a notification")
            .unwrap();
        n.payload().to_owned()
    };
    got.push(next().await);
    let mut moves = 0;
    while !sending.is_finished() && moves < 20 {
        l.batch_execute("SELECT pg_advisory_lock(7)").await.unwrap();
        got.push(next().await);
        l.batch_execute("SELECT pg_advisory_unlock(7)")
            .await
            .unwrap();
        got.push(next().await);
        moves += 1;
    }
    let sender = sending.await.unwrap();
    while got.len() < SENT {
        got.push(next().await);
    }
    let sent: Vec<String> = (0..SENT).map(|i| format!("n{i}")).collect();
    assert!(
        moves >= 3,
        "the client moved only {moves} times while notified"
    );
    assert_eq!(got, sent, "every notification once, in order");
    sender.run("NOTIFY jobs, 'after'").await;
    assert_eq!(next().await, "after", "and nothing twice after them");
    s.proxy.stop().await;
}

/// A raw client of the suite's listener (trusted), logged in and ready.
async fn raw_login(port: u16, user: &str) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut raw = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let mut body = 196_608u32.to_be_bytes().to_vec();
    body.extend_from_slice(format!("user\0{user}\0database\0postgres\0\0").as_bytes());
    let mut packet = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    packet.extend_from_slice(&body);
    raw.write_all(&packet).await.unwrap();
    read_to_ready(&mut raw).await;
    raw
}

/// A protocol message: its tag, length and body.
fn frame_of(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![tag];
    m.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    m.extend_from_slice(body);
    m
}

/// Parse of `sql` as `name`, no parameter types.
fn parse_msg(name: &str, sql: &str) -> Vec<u8> {
    frame_of(b'P', format!("{name}\0{sql}\0\0\0").as_bytes())
}

/// Bind of statement `name` to the unnamed portal (no parameters, text results), Execute
/// of it, and Sync.
fn bind_execute_sync(name: &str) -> Vec<u8> {
    let mut m = frame_of(b'B', format!("\0{name}\0\0\0\0\0\0\0").as_bytes());
    m.extend(frame_of(b'E', b"\0\0\0\0\0"));
    m.extend(frame_of(b'S', b""));
    m
}

/// Reads up to a ReadyForQuery: the first column of the last DataRow, or the error's
/// SQLSTATE and message.
async fn read_answer(raw: &mut tokio::net::TcpStream) -> Result<String, String> {
    use tokio::io::AsyncReadExt;
    let mut head = [0u8; 5];
    let mut answer = Ok(String::new());
    loop {
        tokio::time::timeout(PROMPT, raw.read_exact(&mut head))
            .await
            .expect("an answer in time")
            .unwrap();
        let len = u32::from_be_bytes(head[1..5].try_into().unwrap()) as usize;
        let mut rest = vec![0u8; len - 4];
        raw.read_exact(&mut rest).await.unwrap();
        match head[0] {
            b'D' => {
                let n = i32::from_be_bytes(rest[2..6].try_into().unwrap()) as usize;
                answer = Ok(String::from_utf8_lossy(&rest[6..6 + n]).into_owned());
            }
            b'E' => answer = Err(String::from_utf8_lossy(&rest).into_owned()),
            b'Z' => return answer,
            _ => {}
        }
    }
}

async fn raw_send(raw: &mut tokio::net::TcpStream, bytes: &[u8]) {
    use tokio::io::AsyncWriteExt;
    raw.write_all(bytes).await.unwrap();
}

/// The unnamed statement is the client's own, as direct: A's follows it to a later
/// transaction (whoever used the connection's meanwhile), and what it does when bound then
/// is seen; so is what a statement bound by a name A never prepared does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_unnamed_statement_is_its_clients_own() {
    let s = Suite::start("leakunnamed", PoolMode::Transaction, |cfg| {
        cfg.auth.trust = vec!["127.0.0.1/32".parse().unwrap()];
    })
    .await;
    let port = s.port();
    let mut a = raw_login(port, "sam").await;
    raw_send(
        &mut a,
        &[parse_msg("", "SELECT 'a-own'"), frame_of(b'S', b"")].concat(),
    )
    .await;
    assert_eq!(read_answer(&mut a).await, Ok(String::new()));
    // B uses the unnamed statement on the same server connection.
    let b = Client::login(port, "sam", "").await;
    let row = b.c.query_typed("SELECT 'b-own'", &[]).await.unwrap();
    assert_eq!(row[0].get::<_, &str>(0), "b-own");
    raw_send(&mut a, &bind_execute_sync("")).await;
    assert_eq!(read_answer(&mut a).await.as_deref(), Ok("a-own"));

    // Prepared in one transaction, run in the next.
    let sql = "SET SESSION AUTHORIZATION tenant_y";
    raw_send(&mut a, &[parse_msg("", sql), frame_of(b'S', b"")].concat()).await;
    assert_eq!(read_answer(&mut a).await, Ok(String::new()));
    raw_send(&mut a, &bind_execute_sync("")).await;
    assert_eq!(read_answer(&mut a).await, Ok(String::new()));
    assert_eq!(b.one("SELECT session_user::text").await, "sam");
    raw_send(&mut a, &frame_of(b'Q', b"SELECT session_user::text\0")).await;
    assert_eq!(read_answer(&mut a).await.as_deref(), Ok("tenant_y"));
    raw_send(&mut a, &frame_of(b'Q', b"RESET SESSION AUTHORIZATION\0")).await;
    read_answer(&mut a).await.unwrap();

    // Bound by the name the server knows another client's statement by.
    let c = Client::login(port, "sam", "").await;
    c.c.prepare(sql).await.unwrap();
    let find = format!("SELECT name FROM pg_prepared_statements WHERE statement = '{sql}'\0");
    raw_send(&mut a, &frame_of(b'Q', find.as_bytes())).await;
    let name = read_answer(&mut a).await.unwrap();
    assert!(name.starts_with("patroxy_"), "{name}");
    raw_send(&mut a, &bind_execute_sync(&name)).await;
    assert_eq!(read_answer(&mut a).await, Ok(String::new()));
    assert_eq!(b.one("SELECT session_user::text").await, "sam");
    raw_send(&mut a, &frame_of(b'Q', b"SELECT session_user::text\0")).await;
    assert_eq!(read_answer(&mut a).await.as_deref(), Ok("tenant_y"));
    s.proxy.stop().await;
}

/// A statement's meaning is fixed when it is parsed (its literals read under DateStyle and
/// TimeZone): the same text prepared by clients with other settings is another statement.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_text_under_other_settings_is_another_statement() {
    let s = Suite::start("leakmeaning", PoolMode::Transaction, |_| {}).await;
    let port = s.port();
    let dmy = Client::login(
        port,
        "alice",
        "options='-c DateStyle=ISO,DMY -c TimeZone=UTC'",
    )
    .await;
    let mdy = Client::login(
        port,
        "alice",
        "options='-c DateStyle=ISO,MDY -c TimeZone=Asia/Tokyo'",
    )
    .await;
    let sql = "SELECT '01/02/2024'::date::text || ' ' || '2024-01-01 00:00'::timestamptz::text";
    let first: String = dmy.c.query_one(sql, &[]).await.unwrap().get(0);
    assert_eq!(first, "2024-02-01 2024-01-01 00:00:00+00");
    let second: String = mdy.c.query_one(sql, &[]).await.unwrap().get(0);
    assert_eq!(second, "2024-01-02 2024-01-01 00:00:00+09");
    s.proxy.stop().await;
}

/// COPY FROM STDIN through the extended protocol (tokio-postgres, libpq's PQexecParams):
/// the server ignores the Sync sent with it, and the connection still comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_in_through_the_extended_protocol_gives_the_connection_back() {
    use futures_util::SinkExt;
    let s = Suite::start("leakcopy", PoolMode::Transaction, |_| {}).await;
    let port = s.port();
    let a = Client::login(port, "alice", "").await;
    a.run("CREATE TABLE copied (x int)").await;
    for round in 0..2 {
        let sink = a.c.copy_in("COPY copied FROM STDIN").await.unwrap();
        let mut sink = Box::pin(sink);
        sink.send(bytes::Bytes::from_static(b"1\n2\n3\n"))
            .await
            .unwrap();
        let rows = tokio::time::timeout(PROMPT, sink.as_mut().finish())
            .await
            .expect("COPY done in time")
            .unwrap();
        assert_eq!(rows, 3, "round {round}");
        let b = Client::login(port, "alice", "").await;
        assert_eq!(
            b.one("SELECT count(*)::text FROM copied").await,
            ((round + 1) * 3).to_string()
        );
        b.leave().await;
    }
    s.proxy.stop().await;
}

/// A client that sends the first bytes of its next message and stops holds no server
/// connection: the bytes wait with it, and the message goes when it is whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_cut_between_transactions_holds_no_connection() {
    let s = Suite::start("leakpartial", PoolMode::Transaction, |cfg| {
        cfg.auth.trust = vec!["127.0.0.1/32".parse().unwrap()];
    })
    .await;
    let port = s.port();
    let mut a = raw_login(port, "sam").await;
    let second = frame_of(b'Q', b"SELECT 2\0");
    // Cut in the same write as a whole query, then on its own.
    for with_query in [true, false] {
        let mut first = Vec::new();
        if with_query {
            first.extend(frame_of(b'Q', b"SELECT 1\0"));
        }
        first.extend_from_slice(&second[..3]);
        raw_send(&mut a, &first).await;
        if with_query {
            assert_eq!(read_answer(&mut a).await.as_deref(), Ok("1"));
        }
        let b = Client::login(port, "sam", "").await;
        assert_eq!(b.one("SELECT 3::text").await, "3", "B gets the connection");
        b.leave().await;
        raw_send(&mut a, &second[3..]).await;
        assert_eq!(read_answer(&mut a).await.as_deref(), Ok("2"));
    }
    s.proxy.stop().await;
}

/// A client pinned to its connection whose connection is lost is told: its temporary
/// tables and locks are gone with it, and it does not go on without them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_client_that_loses_its_connection_is_told() {
    let s = Suite::start("leakpinlost", PoolMode::Transaction, |_| {}).await;
    let port = s.port();
    let a = Client::login(port, "alice", "").await;
    a.run("SELECT pg_advisory_lock(11)").await;
    let pid = a.pid().await;
    let direct = connect(s.pg.port).await.unwrap();
    direct
        .batch_execute(&format!("SELECT pg_terminate_backend({pid})"))
        .await
        .unwrap();
    wait_for("the backend gone", PROMPT, || async {
        let c = connect(s.pg.port).await.ok()?;
        let n: i64 = c
            .query_one(
                &format!("SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}"),
                &[],
            )
            .await
            .ok()?
            .get(0);
        (n == 0).then_some(())
    })
    .await;
    let after = a.try_one("SELECT pg_advisory_unlock(11)::text").await;
    assert!(after.is_err(), "A went on without its lock: {after:?}");
    s.proxy.stop().await;
}

/// A pinned client keeps its client encoding through patroxy's own statements on its
/// connection (which speak UTF-8).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_client_keeps_its_encoding() {
    let s = Suite::start("leakpinenc", PoolMode::Transaction, |_| {}).await;
    let a = Client::login(s.port(), "alice", "").await;
    a.run("SET client_encoding = 'LATIN1'").await;
    a.run("SELECT pg_advisory_lock(12)").await;
    assert_eq!(a.one("SHOW client_encoding").await, "LATIN1");
    a.run("CREATE TEMP TABLE t (x int)").await;
    assert_eq!(a.one("SHOW client_encoding").await, "LATIN1");
    s.proxy.stop().await;
}

/// Session pooling with an empty `server_reset_query`: objects A left in its session
/// (temporary tables, locks, cursors, statements, LISTEN) mean the connection is closed,
/// not handed to B; so does a library A loaded, whatever the reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_pool_without_discard_all_never_hands_over_objects() {
    let s = Suite::start("leaknoresetobj", PoolMode::Session, |cfg| {
        cfg.pool.server_reset_query = String::new();
    })
    .await;
    let port = s.port();
    for object in OBJECTS {
        let a = Client::login(port, "alice", "").await;
        a.run(object.make).await;
        a.leave().await;
        let b = Client::login(port, "alice", "").await;
        assert_eq!(b.one(object.show).await, "0", "{}", object.name);
        b.leave().await;
    }
    let a = Client::login(port, "alice", "").await;
    a.run("LISTEN left_behind").await;
    a.leave().await;
    let b = Client::login(port, "alice", "").await;
    assert_eq!(
        b.one("SELECT count(*)::text FROM pg_listening_channels()")
            .await,
        "0"
    );
    b.leave().await;
    let loader = Client::login(port, "sam", "").await;
    loader.run("LOAD 'auto_explain'").await;
    loader.leave().await;
    let next = Client::login(port, "sam", "").await;
    let loaded = next
        .one("SELECT count(*)::text FROM pg_settings WHERE name LIKE 'auto_explain.%'")
        .await;
    assert_eq!(
        loaded, "0",
        "the next client's backend has no library of A's"
    );
    s.proxy.stop().await;
}
