//! The session state a pooled server connection carries beyond its login, and how it is
//! made to fit the client that borrows it: the settings that client wants (`Wanted`), set on
//! the connection where they differ and reset where another client left them (`fit`); the
//! settings a client's own commands left there, taken up as that client's (`take_up`); and
//! what the session holds that cannot follow a client elsewhere (`inspect`).

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;

use super::conn::{ConnError, ServerConn};
use super::pool::Defaults;
use crate::protocol::messages;

/// Reported parameters that describe the server, not a setting a client chose.
pub const SERVER_OWNED: [&str; 9] = [
    "in_hot_standby",
    "server_version",
    "server_encoding",
    "integer_datetimes",
    "is_superuser",
    "session_authorization",
    "default_transaction_read_only",
    "scram_iterations",
    "standard_conforming_strings",
];

/// The settings a client wants on whichever server connection serves it: its pool's login
/// defaults (every reported setting, so no other client's choice survives on a connection
/// this one gets), shared by the pool's clients, with the client's own values over them.
pub struct Wanted {
    defaults: Arc<Defaults>,
    own: BTreeMap<String, String>,
}

impl Wanted {
    pub fn new(defaults: Arc<Defaults>) -> Wanted {
        Wanted {
            defaults,
            own: BTreeMap::new(),
        }
    }

    fn default_of(&self, name: &str) -> Option<&String> {
        (!SERVER_OWNED.contains(&name))
            .then(|| self.defaults.params.get(name))
            .flatten()
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.own
            .get(name)
            .or_else(|| self.default_of(name))
            .map(String::as_str)
    }

    fn contains_key(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// A value of the client's own; kept only where it differs from the default.
    pub fn insert(&mut self, name: String, value: String) {
        match self.default_of(&name) == Some(&value) {
            true => self.own.remove(&name),
            false => self.own.insert(name, value),
        };
    }

    fn remove(&mut self, name: &str) {
        self.own.remove(name);
    }

    /// Every wanted setting, defaults first where the client has no value of its own.
    fn iter(&self) -> impl Iterator<Item = (&String, &String)> {
        let defaults = self.defaults.params.iter().filter(|(name, _)| {
            !SERVER_OWNED.contains(&name.as_str()) && !self.own.contains_key(*name)
        });
        defaults.chain(self.own.iter())
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
}

impl ServerConn {
    /// Sets the client's wanted parameters on the connection where they differ, and resets
    /// those another client had applied that this one does not want.
    pub async fn fit(&mut self, wanted: &Wanted) -> Result<(), ConnError> {
        let current = |name: &str| self.params.get(name).or_else(|| self.extra.get(name));
        let mut sql: Vec<String> = wanted
            .iter()
            .filter(|(name, value)| current(name) != Some(*value))
            .map(|(name, value)| format!("SET {} TO {}", quote_ident(name), quote_literal(value)))
            .collect();
        let stale: Vec<String> = self
            .extra
            .keys()
            .filter(|name| !wanted.contains_key(name))
            .cloned()
            .collect();
        sql.extend(
            stale
                .iter()
                .map(|name| format!("RESET {}", quote_ident(name))),
        );
        if sql.is_empty() {
            return Ok(());
        }
        self.execute(&sql.join("; ")).await?;
        for name in &stale {
            self.extra.remove(name);
        }
        // What the server did not report back, patroxy remembers it applied.
        for (name, value) in wanted.iter() {
            if !self.params.contains_key(name) {
                self.extra.insert(name.clone(), value.clone());
            }
        }
        Ok(())
    }

    /// Takes up the session settings the client's commands left on the connection as the
    /// client's own (set again on each connection it gets, reset on the others).
    pub async fn take_up(&mut self, wanted: &mut Wanted) -> Result<(), ConnError> {
        let sql = "SELECT name, current_setting(name) FROM pg_settings WHERE source = 'session'";
        let now: BTreeMap<String, String> = self
            .query_rows(sql)
            .await?
            .into_iter()
            .filter_map(|mut row| {
                let value = row.pop()??;
                Some((row.pop()??, value))
            })
            .collect();
        // Reported settings are followed through ParameterStatus already.
        for (name, value) in now.iter().filter(|(n, _)| !self.params.contains_key(*n)) {
            wanted.insert(name.clone(), value.clone());
            self.extra.insert(name.clone(), value.clone());
        }
        // What patroxy had set that is back at its default: the client reset it.
        let reset: Vec<String> = self
            .extra
            .keys()
            .filter(|n| !now.contains_key(*n))
            .cloned()
            .collect();
        for name in reset {
            self.extra.remove(&name);
            wanted.remove(&name);
        }
        Ok(())
    }

    /// What the session holds (idle, at rest): state that cannot follow its client to
    /// another server, or the Parse frames that recreate its named statements there. Two
    /// round trips.
    pub async fn inspect(&mut self) -> Result<Verdict, ConnError> {
        let row = self.query_rows(STATE).await?.pop().unwrap_or_default();
        if let Some(why) = holds(&row) {
            return Ok(Verdict::Stays(why));
        }
        let mut frames = Vec::new();
        for row in self.query_rows(STATEMENTS).await? {
            let [Some(name), Some(sql), Some(types)] = &row[..] else {
                return Err(ConnError::Protocol("pg_prepared_statements: a null".into()));
            };
            let oids = oids(types)
                .ok_or_else(|| ConnError::Protocol(format!("parameter types {types:?}")))?;
            frames.push(messages::parse(name, sql, &oids));
        }
        Ok(Verdict::Moves(frames))
    }
}

/// What a client holds on its server connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing that cannot follow: these Parse frames recreate its named statements.
    Moves(Vec<Bytes>),
    /// Something that cannot follow, said in words for the log.
    Stays(String),
}

const STATE: &str = "SELECT \
    (SELECT count(*) FROM pg_locks WHERE pid = pg_backend_pid() AND locktype = 'advisory'), \
    (SELECT count(*) FROM pg_class WHERE relnamespace = pg_my_temp_schema()), \
    (SELECT count(*) FROM pg_cursors), \
    (SELECT count(*) FROM pg_listening_channels()), \
    (SELECT count(*) FROM pg_prepared_statements WHERE from_sql)";

const STATEMENTS: &str = "SELECT name, statement, parameter_types::oid[]::text \
    FROM pg_prepared_statements WHERE NOT from_sql";

/// The state that pins the session to its server, from the counts `STATE` returns.
fn holds(counts: &[Option<String>]) -> Option<String> {
    const WHAT: [&str; 5] = [
        "advisory locks",
        "temporary tables",
        "open cursors",
        "LISTEN channels",
        "SQL-level prepared statements",
    ];
    let held: Vec<String> = WHAT
        .iter()
        .zip(counts)
        .filter_map(|(what, n)| {
            let n = n.as_deref()?.parse::<u64>().ok()?;
            (n > 0).then(|| format!("{n} {what}"))
        })
        .collect();
    if counts.len() != WHAT.len() {
        return Some("its state could not be read".into());
    }
    (!held.is_empty()).then(|| held.join(", "))
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

    fn counts(n: [u64; 5]) -> Vec<Option<String>> {
        n.iter().map(|n| Some(n.to_string())).collect()
    }

    #[test]
    fn a_session_holding_nothing_moves() {
        assert_eq!(holds(&counts([0; 5])), None);
        let why = holds(&counts([1, 0, 0, 2, 0])).unwrap();
        assert_eq!(why, "1 advisory locks, 2 LISTEN channels");
        assert!(holds(&counts([0; 5])[..4]).is_some());
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
