//! The session state a pooled server connection carries beyond its login, and how it is
//! made to fit the client that borrows it: the settings that client wants (`Wanted`: its
//! pool's login defaults, under its startup values, under what its own commands set), set on
//! the connection where they differ and reset where another client left them (`fit`); what
//! the session has now, as the server says (`inspect`, one round trip); and the settings a
//! client's commands left there, taken up as that client's own (`take_up`).
//!
//! Settings are applied with `set_config()`, which reads a value as PostgreSQL's own
//! configuration does: `search_path = 'a, public'` is two schemas, where `SET search_path TO
//! 'a, public'` would be one schema of that name. The role and the session authorization are
//! settings like the others here (`role`, `session_authorization`), set in that order.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;

use super::conn::{ConnError, ServerConn};
use super::pool::Defaults;
use crate::protocol::{codes, messages};

/// Reported parameters that describe the server (or follow from the role), not a setting a
/// client chose. Every other reported parameter is a setting, followed like the rest.
pub const SERVER_OWNED: [&str; 5] = [
    "in_hot_standby",
    "server_version",
    "server_encoding",
    "integer_datetimes",
    "is_superuser",
];

const ROLE: &str = "role";
const SESSION_AUTHORIZATION: &str = "session_authorization";

/// The settings a client wants on whichever server connection serves it: its pool's login
/// defaults (every reported setting, so no other client's choice survives on a connection
/// this one gets), under the values of its startup packet (what `RESET` returns to), under
/// what its own commands set since.
#[derive(Debug)]
pub struct Wanted {
    defaults: Arc<Defaults>,
    startup: BTreeMap<String, String>,
    own: BTreeMap<String, String>,
    /// `statement_context`, built once per change of the settings (it is asked for at
    /// every request).
    context: std::sync::OnceLock<String>,
}

impl Wanted {
    pub fn new(defaults: Arc<Defaults>) -> Wanted {
        Wanted {
            defaults,
            startup: BTreeMap::new(),
            own: BTreeMap::new(),
            context: std::sync::OnceLock::new(),
        }
    }

    /// A value from the client's startup packet.
    pub fn startup(&mut self, name: String, value: String) {
        self.context.take();
        self.startup.insert(name, value);
    }

    fn default_of(&self, name: &str) -> Option<&String> {
        (!SERVER_OWNED.contains(&name))
            .then(|| self.defaults.params.get(name))
            .flatten()
    }

    /// What `RESET name` gives the client: its startup value, or the login default.
    fn reset_value(&self, name: &str) -> Option<&String> {
        self.startup.get(name).or_else(|| self.default_of(name))
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.own
            .get(name)
            .or_else(|| self.reset_value(name))
            .map(String::as_str)
    }

    /// A value the client's commands set; kept only where it differs from what `RESET`
    /// would give.
    pub fn insert(&mut self, name: String, value: String) {
        self.context.take();
        match self.reset_value(&name) == Some(&value) {
            true => self.own.remove(&name),
            false => self.own.insert(name, value),
        };
    }

    /// The bytes of the settings the client's own commands set (its startup values and
    /// the login defaults are bounded by the startup packet and the server).
    pub fn held(&self) -> usize {
        self.own.iter().map(|(n, v)| n.len() + v.len() + 64).sum()
    }

    /// The custom settings (`app.tenant`) the client has, from its startup packet or its
    /// own commands: asked for by name when its session is read.
    pub fn custom(&self) -> impl Iterator<Item = &str> {
        self.startup
            .keys()
            .chain(self.own.keys())
            .map(String::as_str)
            .filter(|n| n.contains('.'))
    }

    /// What a statement's text means depends on these: its identity on the servers.
    /// Literals are read when it is parsed (a date under DateStyle, a time under
    /// TimeZone, bytes under client_encoding, backslashes under
    /// standard_conforming_strings), names under search_path.
    pub fn statement_context(&self) -> &str {
        const MEANING: [&str; 6] = [
            "search_path",
            "DateStyle",
            "TimeZone",
            "IntervalStyle",
            "client_encoding",
            "standard_conforming_strings",
        ];
        self.context.get_or_init(|| {
            let mut context = String::new();
            for name in MEANING {
                context.push_str(self.get(name).unwrap_or_default());
                context.push('\0');
            }
            context
        })
    }

    /// The client reset `name`.
    fn reset(&mut self, name: &str) {
        self.context.take();
        self.own.remove(name);
    }

    /// Every wanted setting, each once: the client's own over its startup values over the
    /// login defaults. Nothing allocated: it is walked at every loan.
    fn each(&self) -> impl Iterator<Item = (&str, &str)> {
        let defaults = self.defaults.params.iter().filter(|(name, _)| {
            !SERVER_OWNED.contains(&name.as_str())
                && !self.startup.contains_key(*name)
                && !self.own.contains_key(*name)
        });
        let startup = self
            .startup
            .iter()
            .filter(|(name, _)| !self.own.contains_key(*name));
        defaults
            .chain(startup)
            .chain(self.own.iter())
            .map(|(n, v)| (n.as_str(), v.as_str()))
    }

    /// The server reported these during a loan: they are true of the connection now, and
    /// what the client wants.
    pub fn follow_reported(&mut self, conn: &mut ServerConn, reported: Vec<(String, String)>) {
        for (name, value) in reported {
            conn.params.insert(name.clone(), value.clone());
            if !SERVER_OWNED.contains(&name.as_str()) {
                self.insert(name, value);
            }
        }
    }

    /// Takes up what a client's commands left in its session (`now`: its session-level
    /// settings, as `inspect` reads them) as the client's own, so that they follow it to its
    /// next connections; what it reset goes back to its startup value or the default.
    pub fn take_up(&mut self, conn: &mut ServerConn, now: &BTreeMap<String, String>) {
        for (name, value) in now {
            // Reported settings are followed through ParameterStatus already.
            if !conn.params.contains_key(name) {
                self.insert(name.clone(), value.clone());
                conn.extra.insert(name.clone(), value.clone());
            }
        }
        let gone: Vec<String> = conn
            .extra
            .keys()
            .filter(|n| !now.contains_key(*n))
            .cloned()
            .collect();
        for name in gone {
            conn.extra.remove(&name);
            self.reset(&name);
        }
        // A reported setting the client had set that is no longer the session's own: it
        // was reset (to the login value; its startup value is set again on its next loan).
        let reset: Vec<String> = self
            .own
            .keys()
            .filter(|n| conn.params.contains_key(*n) && !now.contains_key(*n))
            .cloned()
            .collect();
        for name in reset {
            self.reset(&name);
        }
    }
}

impl ServerConn {
    /// Sets the client's wanted settings on the connection where they differ, and resets
    /// those another client left that this one does not want. One round trip, or none.
    pub async fn fit(&mut self, wanted: &Wanted) -> Result<(), ConnError> {
        let plan = self.plan(wanted);
        if plan.is_empty() {
            return Ok(());
        }
        self.run_own(&plan.sql()).await?;
        if plan.reset_role {
            self.extra.remove(ROLE);
        }
        for name in &plan.reset {
            self.extra.remove(name);
        }
        for (name, value) in plan
            .set
            .into_iter()
            .chain(plan.role.map(|r| (ROLE.to_owned(), r)))
        {
            // What the server reports, it says itself; the rest patroxy remembers.
            if !self.params.contains_key(&name) {
                self.extra.insert(name, value);
            }
        }
        Ok(())
    }

    /// Whether the connection has the client's wanted settings already (`fit` would do
    /// nothing).
    pub fn fits(&self, wanted: &Wanted) -> bool {
        self.plan(wanted).is_empty()
    }

    /// What `fit` does, without doing it.
    fn plan(&self, wanted: &Wanted) -> Plan {
        let mut plan = Plan::default();
        let current = |name: &str| -> Option<&str> {
            self.params
                .get(name)
                .or_else(|| self.extra.get(name))
                .map(String::as_str)
        };
        let differs = |name: &str| current(name) != wanted.get(name);
        // The role goes first, so that nothing below runs as another client's role, and
        // comes back last; a new session authorization ends any role too.
        let auth_changes =
            wanted.get(SESSION_AUTHORIZATION).is_some() && differs(SESSION_AUTHORIZATION);
        plan.reset_role = self.extra.contains_key(ROLE) && (auth_changes || differs(ROLE));
        let role_now = current(ROLE).filter(|_| !plan.reset_role);
        plan.role = wanted
            .get(ROLE)
            .filter(|r| role_now != Some(*r))
            .map(str::to_owned);
        for (name, value) in wanted.each() {
            if name == ROLE || current(name) == Some(value) {
                continue;
            }
            match self.defaults.get(name).map(String::as_str) == Some(value) {
                true => plan.reset.push(name.to_owned()),
                false => plan.set.push((name.to_owned(), value.to_owned())),
            }
        }
        for name in self.extra.keys() {
            if name != ROLE && wanted.get(name).is_none() {
                plan.reset.push(name.clone());
            }
        }
        // The session authorization first (it ends the role), the client's encoding last
        // (patroxy speaks UTF-8 to the server until then).
        let rank = |n: &str| match n {
            SESSION_AUTHORIZATION => 0,
            "client_encoding" => 2,
            _ => 1,
        };
        plan.reset.sort_by_key(|n| rank(n));
        plan.set.sort_by_key(|(n, _)| rank(n));
        plan
    }

    /// What patroxy knows of the session, as the server says it (after a reset that was
    /// not `DISCARD ALL`): the settings it has beyond the login's, and the statements.
    pub fn resync(&mut self, s: &Snapshot) {
        self.extra = s
            .settings
            .iter()
            .filter(|(name, _)| !self.params.contains_key(*name))
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect();
        let names: Vec<&str> = s.statements.iter().map(|st| st.0.as_str()).collect();
        self.prepared.resync(&names);
    }

    /// Runs one of patroxy's own requests, in UTF-8 (what patroxy writes and reads): a
    /// connection left in another client encoding is switched first, in the same write.
    pub async fn run_own(&mut self, sql: &str) -> Result<u8, ConnError> {
        match self.speaks_utf8() {
            true => self.execute(sql).await,
            false => {
                let switch = "SET client_encoding TO 'UTF8'";
                self.execute_each(&[switch, sql]).await
            }
        }
    }

    /// Sets the client's encoding again where patroxy's own statements left UTF-8 (on a
    /// connection the client keeps, which is not fitted again).
    pub async fn fit_encoding(&mut self, wanted: &Wanted) -> Result<(), ConnError> {
        let want = wanted.get("client_encoding").unwrap_or("UTF8");
        let now = self.params.get("client_encoding").map(String::as_str);
        if now.is_some_and(|now| now.eq_ignore_ascii_case(want)) {
            return Ok(());
        }
        let sql = format!(
            "SELECT pg_catalog.set_config('client_encoding', {}, false)",
            quote_literal(want)
        );
        self.execute(&sql).await.map(|_| ())
    }

    fn speaks_utf8(&self) -> bool {
        self.params.get("client_encoding").map_or(true, |e| {
            e.eq_ignore_ascii_case("UTF8") || e.eq_ignore_ascii_case("UTF-8")
        })
    }

    /// What the session has now, as the server says: the parts `look` asks for. The
    /// session must be idle. The query runs in a transaction of its own with the timeouts
    /// off, so that no timeout the client set cuts it short; the timeouts' own values are
    /// read first, in the cheapest statement there is, and set back to the login's for a
    /// moment, to compare. A client's timeout can still cut that first statement short (one
    /// of a millisecond, say): then it is asked once more.
    pub async fn inspect(&mut self, mut look: Look) -> Result<Snapshot, ConnError> {
        if !self.speaks_utf8() {
            self.execute("SET client_encoding TO 'UTF8'").await?;
        }
        // The custom settings patroxy knows the session has are asked for by name too.
        look.ask_for(self.extra.keys().map(String::as_str));
        let sql = look.sql();
        let rows = match self.query_rows(&sql).await {
            // Cut short before its transaction began, or (a client's late cancel) in it.
            Err(ConnError::Refused { sqlstate, .. }) if sqlstate == codes::QUERY_CANCELED => {
                self.query_rows(&format!("ROLLBACK; {sql}")).await?
            }
            r => r?,
        };
        let login = self.defaults.get(SESSION_AUTHORIZATION).cloned();
        Snapshot::read(rows, login.as_deref())
    }
}

/// The statements that make a connection fit a client, in their order: the old role
/// ended, then resets, then the settings (session authorization first), the role last.
#[derive(Debug, Default, PartialEq, Eq)]
struct Plan {
    reset_role: bool,
    reset: Vec<String>,
    set: Vec<(String, String)>,
    role: Option<String>,
}

impl Plan {
    fn is_empty(&self) -> bool {
        !self.reset_role && self.reset.is_empty() && self.set.is_empty() && self.role.is_none()
    }

    fn sql(&self) -> String {
        let mut sql: Vec<String> = Vec::new();
        if self.reset_role {
            sql.push("RESET ROLE".into());
        }
        sql.extend(
            self.reset
                .iter()
                .map(|n| format!("RESET {}", quote_ident(n))),
        );
        let calls: Vec<String> = self
            .set
            .iter()
            .map(|(n, v)| {
                format!(
                    "pg_catalog.set_config({}, {}, false)",
                    quote_literal(n),
                    quote_literal(v)
                )
            })
            .collect();
        if !calls.is_empty() {
            sql.push(format!("SELECT {}", calls.join(", ")));
        }
        if let Some(role) = &self.role {
            sql.push(format!(
                "SELECT pg_catalog.set_config('role', {}, false)",
                quote_literal(role)
            ));
        }
        sql.join("; ")
    }
}

/// What to read of a session, in one query.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Look {
    /// Its session-level settings, role and session authorization.
    pub settings: bool,
    /// What it holds that cannot follow a client elsewhere.
    pub objects: bool,
    /// The channels it listens on.
    pub listens: bool,
    /// Its protocol-level prepared statements.
    pub statements: bool,
    /// With the settings: the custom ones (`app.tenant`) to ask for by name, as
    /// `pg_settings` lists none.
    pub custom: Vec<String>,
}

impl Look {
    pub const ALL: Look = Look {
        settings: true,
        objects: true,
        listens: true,
        statements: true,
        custom: Vec::new(),
    };

    pub fn any(&self) -> bool {
        self.settings || self.objects || self.listens || self.statements
    }

    /// Adds the custom settings among `names` to those asked for.
    pub fn ask_for<'n>(&mut self, names: impl IntoIterator<Item = &'n str>) {
        for name in names {
            let name = name.to_ascii_lowercase();
            if name.contains('.') && !self.custom.contains(&name) {
                self.custom.push(name);
            }
        }
    }

    /// The query: rows of (kind, name, value, more), every name schema-qualified, so that
    /// nothing a client put on its search path stands in for the catalogs. The settings no
    /// catalog shows as the session's own (the timeouts, which patroxy's own transaction
    /// turns off, and custom settings) are read before it begins and again, reset, in it:
    /// where the two differ, the value is the session's.
    fn sql(&self) -> String {
        let (first, login) = match self.settings {
            true => {
                let names = self.compared();
                (
                    format!("SELECT 't', n, pg_catalog.current_setting(n, true), '' {names}; "),
                    format!("SELECT 'r', n, pg_catalog.set_config(n, NULL, true), '' {names}; "),
                )
            }
            false => (String::new(), String::new()),
        };
        format!(
            "{first}BEGIN; {login}{NO_TIMEOUTS_SQL}{}; COMMIT",
            self.parts()
        )
    }

    /// The settings read twice, as a FROM clause: those the session has.
    fn compared(&self) -> String {
        let names: Vec<String> = COMPARED
            .iter()
            .map(|n| quote_literal(n))
            .chain(self.custom.iter().map(|n| quote_literal(n)))
            .collect();
        format!(
            "FROM pg_catalog.unnest(ARRAY[{}]::pg_catalog.text[]) AS n \
             WHERE pg_catalog.current_setting(n, true) IS NOT NULL",
            names.join(", ")
        )
    }

    fn parts(&self) -> String {
        let mut parts = Vec::new();
        if self.settings {
            parts.push(SETTINGS_SQL);
        }
        if self.objects {
            parts.push(OBJECTS_SQL);
        }
        if self.listens {
            parts.push(LISTENS_SQL);
        }
        if self.statements {
            parts.push(STATEMENTS_SQL);
        }
        parts.join(" UNION ALL ")
    }
}

// Every name, type and operator below is schema-qualified: a client's search path (its
// own functions, operators, types or views named like the catalogs') stands in for none.

/// The timeouts, which patroxy's own transaction turns off for itself: read before it
/// begins, and compared with the login's values (`transaction_timeout` where the server
/// has it, PostgreSQL 17 on).
const COMPARED: [&str; 3] = ["statement_timeout", "lock_timeout", "transaction_timeout"];

/// Patroxy's own transaction: no timeout of the client's cuts it short (PostgreSQL 17's
/// `transaction_timeout` where there is one).
const NO_TIMEOUTS_SQL: &str = "SET LOCAL statement_timeout = 0; SET LOCAL lock_timeout = 0; \
    SELECT 'x', '', pg_catalog.set_config('transaction_timeout', '0', true), '' \
    WHERE pg_catalog.current_setting('transaction_timeout', true) IS NOT NULL; ";

const SETTINGS_SQL: &str = "SELECT 's', name::pg_catalog.text, \
    pg_catalog.current_setting(name), '' FROM pg_catalog.pg_settings \
    WHERE source OPERATOR(pg_catalog.=) 'session' \
    AND name::pg_catalog.text OPERATOR(pg_catalog.<>) ALL (ARRAY['statement_timeout', 'lock_timeout', \
      'transaction_timeout']::pg_catalog.text[]) \
    UNION ALL SELECT 's', 'role', pg_catalog.current_setting('role'), '' \
    UNION ALL SELECT 's', 'session_authorization', \
    pg_catalog.current_setting('session_authorization'), ''";

const OBJECTS_SQL: &str = "SELECT 'o', 'advisory locks', \
    pg_catalog.count(*)::pg_catalog.text, '' FROM pg_catalog.pg_locks \
    WHERE pid OPERATOR(pg_catalog.=) pg_catalog.pg_backend_pid() \
    AND locktype OPERATOR(pg_catalog.=) 'advisory' \
    UNION ALL SELECT 'o', 'temporary objects', pg_catalog.count(*)::pg_catalog.text, '' \
    FROM pg_catalog.pg_depend WHERE refclassid OPERATOR(pg_catalog.=) \
      'pg_catalog.pg_namespace'::pg_catalog.regclass \
    AND refobjid OPERATOR(pg_catalog.=) pg_catalog.pg_my_temp_schema() \
    AND pg_catalog.pg_my_temp_schema() OPERATOR(pg_catalog.<>) 0 \
    UNION ALL SELECT 'o', 'temporary replication slots', \
    pg_catalog.count(*)::pg_catalog.text, '' FROM pg_catalog.pg_replication_slots \
    WHERE temporary AND active_pid OPERATOR(pg_catalog.=) pg_catalog.pg_backend_pid() \
    UNION ALL SELECT 'o', 'open cursors', pg_catalog.count(*)::pg_catalog.text, '' \
    FROM pg_catalog.pg_cursors \
    UNION ALL SELECT 'o', 'SQL-level prepared statements', \
    pg_catalog.count(*)::pg_catalog.text, '' FROM pg_catalog.pg_prepared_statements \
    WHERE from_sql";

const LISTENS_SQL: &str = "SELECT 'l', c::pg_catalog.text, '', '' \
    FROM pg_catalog.pg_listening_channels() AS c";

const STATEMENTS_SQL: &str = "SELECT 'p', name::pg_catalog.text, statement, \
    parameter_types::pg_catalog.oid[]::pg_catalog.text \
    FROM pg_catalog.pg_prepared_statements WHERE NOT from_sql";

/// A session as the server described it.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Its session-level settings, with the role (when one is set) and the session
    /// authorization (when it is not the login's).
    pub settings: BTreeMap<String, String>,
    /// What it holds that cannot follow its client, with how many.
    pub held: Vec<(String, u64)>,
    pub listens: Vec<String>,
    /// Its protocol-level prepared statements: name, text and parameter types.
    pub statements: Vec<(String, String, Vec<u32>)>,
}

impl Snapshot {
    fn read(rows: Vec<Vec<Option<String>>>, login: Option<&str>) -> Result<Snapshot, ConnError> {
        let mut out = Snapshot::default();
        let bad = |what: &str| ConnError::Protocol(format!("reading the session's state: {what}"));
        let mut timeouts = BTreeMap::new();
        let mut login_timeouts = BTreeMap::new();
        for row in rows {
            let [Some(kind), Some(name), Some(value), more] = &row[..] else {
                return Err(bad("a row of the wrong shape"));
            };
            match kind.as_str() {
                "s" if name == ROLE && value == "none" => {}
                "s" if name == SESSION_AUTHORIZATION && Some(value.as_str()) == login => {}
                "s" => {
                    out.settings.insert(name.clone(), value.clone());
                }
                // patroxy's own transaction_timeout, switched off.
                "x" => {}
                "t" => {
                    timeouts.insert(name.clone(), value.clone());
                }
                "r" => {
                    login_timeouts.insert(name.clone(), value.clone());
                }
                "o" => {
                    let n: u64 = value.parse().map_err(|_| bad("a count"))?;
                    if n > 0 {
                        out.held.push((name.clone(), n));
                    }
                }
                "l" => out.listens.push(name.clone()),
                "p" => {
                    let types = more.as_deref().unwrap_or_default();
                    let oids = oids(types).ok_or_else(|| bad("parameter types"))?;
                    out.statements.push((name.clone(), value.clone(), oids));
                }
                _ => return Err(bad("a row of the wrong kind")),
            }
        }
        for (name, value) in timeouts {
            if login_timeouts.get(&name) != Some(&value) {
                out.settings.insert(name, value);
            }
        }
        Ok(out)
    }

    /// What it holds that cannot follow its client, in words for the log; `None` if
    /// nothing.
    pub fn holds(&self) -> Option<String> {
        let held: Vec<String> = self.held.iter().map(|(w, n)| format!("{n} {w}")).collect();
        (!held.is_empty()).then(|| held.join(", "))
    }

    /// The Parse frames that recreate its protocol-level prepared statements elsewhere.
    pub fn parses(&self) -> Vec<Bytes> {
        self.statements
            .iter()
            .map(|(name, sql, oids)| messages::parse(name, sql, oids))
            .collect()
    }
}

/// `{23,25}` as PostgreSQL prints an `oid[]`.
fn oids(text: &str) -> Option<Vec<u32>> {
    let inner = text.strip_prefix('{')?.strip_suffix('}')?;
    if inner.is_empty() {
        return Some(Vec::new());
    }
    inner.split(',').map(|o| o.trim().parse().ok()).collect()
}

pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

pub fn quote_literal(s: &str) -> String {
    match s.contains('\\') {
        true => format!("E'{}'", s.replace('\\', "\\\\").replace('\'', "''")),
        false => format!("'{}'", s.replace('\'', "''")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(cells: [&str; 4]) -> Vec<Option<String>> {
        cells.iter().map(|c| Some(c.to_string())).collect()
    }

    #[test]
    fn a_snapshot_reads_settings_objects_listens_and_statements() {
        let rows = vec![
            row(["s", "search_path", "a, public", ""]),
            row(["s", "role", "none", ""]),
            row(["s", "session_authorization", "sam", ""]),
            row(["o", "advisory locks", "1", ""]),
            row(["o", "open cursors", "0", ""]),
            row(["l", "news", "", ""]),
            row(["p", "patroxy_1", "SELECT $1", "{23,25}"]),
        ];
        let s = Snapshot::read(rows, Some("sam")).unwrap();
        assert_eq!(
            s.settings.len(),
            1,
            "no role, the login's own authorization"
        );
        assert_eq!(s.holds().as_deref(), Some("1 advisory locks"));
        assert_eq!(s.listens, vec!["news".to_owned()]);
        assert_eq!(s.statements[0].2, vec![23, 25]);
        assert_eq!(s.parses().len(), 1);
        let s = Snapshot::read(vec![row(["s", "role", "tenant_x", ""])], Some("sam")).unwrap();
        assert_eq!(s.settings.get("role").map(String::as_str), Some("tenant_x"));
        assert!(Snapshot::read(vec![vec![None]], None).is_err());
        assert!(Snapshot::read(vec![row(["o", "x", "many", ""])], None).is_err());
    }

    #[test]
    fn a_look_asks_only_for_its_parts_with_catalogs_named_in_full() {
        let mut look = Look {
            settings: true,
            listens: true,
            ..Look::default()
        };
        let sql = look.parts();
        assert!(sql.contains("pg_catalog.pg_settings") && sql.contains("pg_listening_channels"));
        assert!(!sql.contains("pg_locks") && !sql.contains("pg_prepared_statements"));
        assert!(!Look::default().any());
        look.ask_for(["work_mem", "App.Tenant", "app.tenant"]);
        assert_eq!(look.custom, vec!["app.tenant".to_owned()]);
        let sql = look.sql();
        assert!(sql
            .contains("'statement_timeout', 'lock_timeout', 'transaction_timeout', 'app.tenant'"));
        assert!(sql.contains("pg_catalog.set_config(n, NULL, true)"));
    }

    #[test]
    fn a_plan_resets_to_the_login_value_and_sets_with_set_config_authorization_first() {
        let plan = Plan {
            reset_role: true,
            reset: vec!["work_mem".into()],
            set: vec![
                ("session_authorization".into(), "alice".into()),
                ("search_path".into(), "a, public".into()),
            ],
            role: Some("tenant_x".into()),
        };
        assert_eq!(
            plan.sql(),
            "RESET ROLE; RESET \"work_mem\"; SELECT pg_catalog.set_config('session_authorization', 'alice', false), pg_catalog.set_config('search_path', 'a, public', false); SELECT pg_catalog.set_config('role', 'tenant_x', false)"
        );
    }

    #[test]
    fn parameter_types_read_back() {
        assert_eq!(oids("{}"), Some(vec![]));
        assert_eq!(oids("{23,25}"), Some(vec![23, 25]));
        assert_eq!(oids("23"), None);
    }

    #[test]
    fn settings_are_quoted() {
        assert_eq!(quote_ident("search_path"), "\"search_path\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_literal("c:\\x"), "E'c:\\\\x'");
    }
}
