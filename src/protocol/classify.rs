//! What a statement does to the session it runs in, decided from its text (a simple Query's,
//! or a Parse's) with PostgreSQL's own parser (libpg_query, through `pg_query`): settings it
//! may change, objects it makes that live in the session, what it may end, and the prepared
//! statements it drops. Pure: text in, `Classified` out; a cache keyed by the text keeps the
//! parser off the hot path, and a scan for the few words that can matter keeps most texts
//! (pgbench's among them) off the parser altogether.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, RwLock};

use aho_corasick::AhoCorasick;
use pg_query::protobuf::{self, node::Node as N};
use serde_json::Value;

/// What a statement may do to its session, as bits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Effects(u16);

impl Effects {
    pub const NONE: Effects = Effects(0);
    /// Session settings, the role or the session authorization may have changed (`SET`,
    /// `RESET`, `set_config(.., false)`, `SET ROLE`, `SET SESSION AUTHORIZATION`, `DISCARD
    /// ALL`).
    pub const SETTINGS: Effects = Effects(1);
    /// A temporary object may have been made.
    pub const TEMP: Effects = Effects(1 << 1);
    /// A session-level advisory lock may have been taken.
    pub const ADVISORY: Effects = Effects(1 << 2);
    /// A `WITH HOLD` cursor, which outlives its transaction.
    pub const CURSOR: Effects = Effects(1 << 3);
    /// An SQL-level `PREPARE`.
    pub const PREPARE: Effects = Effects(1 << 4);
    /// `LISTEN`.
    pub const LISTEN: Effects = Effects(1 << 5);
    /// `LOAD`: a library loaded into the session, which nothing unloads.
    pub const LOAD: Effects = Effects(1 << 6);
    /// May end session objects: `DROP`, `CLOSE`, `DEALLOCATE`, `UNLISTEN`, advisory
    /// unlocks, `DISCARD`.
    pub const ENDS: Effects = Effects(1 << 7);
    /// Drops prepared statements (`DEALLOCATE`, `DISCARD ALL`), protocol-level ones too.
    pub const STATEMENTS: Effects = Effects(1 << 8);
    /// Cannot be told from the text (it does not parse, is too long to parse, or is a `DO`
    /// block): anything may have happened.
    pub const UNKNOWN: Effects = Effects(1 << 9);
    /// Settings go back to what the session started with (`RESET`, `SET .. TO DEFAULT`,
    /// `DISCARD ALL`): for a pooled client, the values of its startup packet.
    pub const RESETS: Effects = Effects(1 << 10);
    /// A setting set under a name the text does not spell out (`set_config(name, ..)` with
    /// a computed name): one PostgreSQL may not list (a custom setting is never in
    /// `pg_settings`), so nothing can follow or reset it but `DISCARD ALL`.
    pub const NAMELESS: Effects = Effects(1 << 11);
    /// The random seed (`setseed()`, `SET seed`): the session's later `random()` values
    /// follow from it, and nothing but a new backend forgets it.
    pub const SEED: Effects = Effects(1 << 12);

    /// A text too long to read (or a FunctionCall, by oid): it may have set a custom
    /// setting no session read shows, so its connection is closed, not lent again.
    pub const UNREAD: Effects = Effects(1 << 13);

    /// What no reset undoes: the connection is closed after its client.
    pub const UNRESETTABLE: Effects = Effects(Self::LOAD.0 | Self::SEED.0);

    /// What makes a session's state unable to follow its client to another connection.
    pub const OBJECTS: Effects = Effects(
        Self::TEMP.0
            | Self::ADVISORY.0
            | Self::CURSOR.0
            | Self::PREPARE.0
            | Self::NAMELESS.0
            | Self::UNRESETTABLE.0,
    );

    pub fn contains(self, other: Effects) -> bool {
        self.0 & other.0 == other.0
    }

    pub fn intersects(self, other: Effects) -> bool {
        self.0 & other.0 != 0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
}

impl std::ops::BitOr for Effects {
    type Output = Effects;
    fn bitor(self, rhs: Effects) -> Effects {
        Effects(self.0 | rhs.0)
    }
}

impl std::ops::BitOrAssign for Effects {
    fn bitor_assign(&mut self, rhs: Effects) {
        self.0 |= rhs.0;
    }
}

/// What one text does, with the names its statements end.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Classified {
    pub effects: Effects,
    /// `UNLISTEN` channels; `""` is every channel.
    pub unlisten: Vec<String>,
    /// `DEALLOCATE`d statements; `""` is every statement (`DEALLOCATE ALL`, `DISCARD ALL`).
    pub deallocated: Vec<String>,
    /// The text is one `DEALLOCATE name` and nothing else.
    pub only_deallocates: bool,
    /// Custom settings (`app.tenant`) it sets or resets, in lower case: PostgreSQL lists
    /// none of them in `pg_settings`, so they are asked for by name.
    pub custom: Vec<String>,
}

impl Classified {
    fn of(effects: Effects) -> Classified {
        Classified {
            effects,
            ..Classified::default()
        }
    }

    /// Every prepared statement of the session is dropped.
    pub fn drops_all_statements(&self) -> bool {
        self.deallocated.iter().any(String::is_empty)
    }

    /// What another reading of the text does, too.
    fn add(&mut self, other: &Classified) {
        self.effects |= other.effects;
        for name in &other.unlisten {
            if !self.unlisten.contains(name) {
                self.unlisten.push(name.clone());
            }
        }
        for name in &other.deallocated {
            if !self.deallocated.contains(name) {
                self.deallocated.push(name.clone());
            }
        }
        for name in &other.custom {
            if !self.custom.contains(name) {
                self.custom.push(name.clone());
            }
        }
        self.only_deallocates &= other.only_deallocates;
    }
}

/// What the statements of one loan may have done to the session, gathered as they pass.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Seen {
    pub effects: Effects,
    /// `UNLISTEN`ed channels (`""`: all), up to `MAX_NAMES`.
    pub unlisten: Vec<String>,
    /// `DEALLOCATE`d statements (`""`: all), up to `MAX_NAMES`; past it, `""`.
    pub deallocated: Vec<String>,
    /// Custom settings set or reset, up to `MAX_NAMES`; past it, `NAMELESS`.
    pub custom: Vec<String>,
}

/// Names kept per loan (a client listens on at most as many channels); a client that
/// deallocates more in one transaction is read as dropping all its statements (which the
/// server is then asked about).
const MAX_NAMES: usize = 1024;

impl Seen {
    pub fn add(&mut self, c: &Classified) {
        self.effects |= c.effects;
        for name in &c.unlisten {
            if self.unlisten.len() < MAX_NAMES && !self.unlisten.contains(name) {
                self.unlisten.push(name.clone());
            }
        }
        for name in &c.deallocated {
            match self.deallocated.len() < MAX_NAMES {
                true if !self.deallocated.contains(name) => self.deallocated.push(name.clone()),
                true => {}
                false if !self.deallocated.iter().any(String::is_empty) => {
                    self.deallocated.push(String::new())
                }
                false => {}
            }
        }
        for name in &c.custom {
            match self.custom.len() < MAX_NAMES {
                true if !self.custom.contains(name) => self.custom.push(name.clone()),
                true => {}
                false => self.effects |= Effects::NAMELESS,
            }
        }
    }

    /// What a later part of the same session saw, too.
    pub fn merge(&mut self, later: &Seen) {
        let c = Classified {
            effects: later.effects,
            unlisten: later.unlisten.clone(),
            deallocated: later.deallocated.clone(),
            custom: later.custom.clone(),
            only_deallocates: false,
        };
        self.add(&c);
    }

    /// Every prepared statement of the session may be gone.
    pub fn dropped_all_statements(&self) -> bool {
        self.deallocated.iter().any(String::is_empty)
    }
}

/// Texts longer than this are not parsed: if they contain a word that can matter, they
/// count as `UNKNOWN`.
pub const MAX_PARSED: usize = 64 * 1024;
/// Texts longer than this are classified but not cached.
const MAX_CACHED: usize = 4 * 1024;
/// The cache is emptied when its texts come to more than this.
const CACHE_BYTES: usize = 8 << 20;

/// Words one of which a statement with an effect must contain (ASCII, any case): `set`
/// covers `SET`, `RESET`, `set_config` and `SET ROLE`; `temp` covers `TEMPORARY` and
/// `pg_temp`; `u&` is a Unicode-escaped identifier, which could spell any of them.
const WORDS: [&[u8]; 14] = [
    b"set",
    b"temp",
    b"advisory",
    b"prepare",
    b"deallocate",
    b"listen",
    b"hold",
    b"discard",
    b"load",
    b"close",
    b"drop",
    b"do",
    b"u&",
    b"replication_slot",
];

/// Words that call for a walk of the whole tree (function calls, temporary objects, an
/// UPDATE of `pg_settings`, whose rule calls `set_config`).
const DEEP_WORDS: [&[u8]; 7] = [
    b"set_config",
    b"advisory",
    b"temp",
    b"u&",
    b"pg_settings",
    b"setseed",
    b"replication_slot",
];

/// Statement types whose effects the parse tree's top level shows.
const TOP_LEVEL: [&str; 11] = [
    "VariableSetStmt",
    "DiscardStmt",
    "DeallocateStmt",
    "PrepareStmt",
    "ListenStmt",
    "UnlistenStmt",
    "DeclareCursorStmt",
    "ClosePortalStmt",
    "DropStmt",
    "LoadStmt",
    "DoStmt",
];

static NOTHING: LazyLock<Arc<Classified>> = LazyLock::new(|| Arc::new(Classified::default()));

/// The scans for those words: every text on the hot path goes through the first.
static MAY_MATTER: LazyLock<AhoCorasick> = LazyLock::new(|| words(&WORDS));
static DEEP: LazyLock<AhoCorasick> = LazyLock::new(|| words(&DEEP_WORDS));

fn words(words: &[&[u8]]) -> AhoCorasick {
    AhoCorasick::builder()
        .ascii_case_insensitive(true)
        .build(words)
        .expect("a handful of short words always builds")
}

/// Classifies statement texts, with a cache shared by every session.
#[derive(Debug, Default)]
pub struct Classifier {
    cache: RwLock<Cache>,
}

#[derive(Debug, Default)]
struct Cache {
    /// By text, then by how its strings read (`Strings as usize`).
    by_text: HashMap<Box<str>, [Option<Arc<Classified>>; 3]>,
    bytes: usize,
}

impl Classifier {
    /// What `sql` (a frame's text, up to its NUL) does to the session, as the server reads
    /// it under `strings`.
    pub fn classify(&self, sql: &[u8], strings: Strings) -> Arc<Classified> {
        // Too long to read through on every execution: anything may happen.
        if sql.len() > MAX_PARSED {
            return Arc::new(Classified::of(Effects::UNKNOWN | Effects::UNREAD));
        }
        if !may_matter(sql) {
            return NOTHING.clone();
        }
        let Ok(text) = std::str::from_utf8(sql) else {
            return Arc::new(Classified::of(Effects::UNKNOWN | Effects::UNREAD));
        };
        // pgbench's UPDATE ... SET, with literals new each time: neither parsed nor cached.
        if !DEEP.is_match(text) && one_data_statement(text) {
            return NOTHING.clone();
        }
        let found = self
            .read()
            .by_text
            .get(text)
            .and_then(|e| e[strings as usize].clone());
        if let Some(c) = found {
            return c;
        }
        let c = Arc::new(classify_text(text, strings));
        if text.len() <= MAX_CACHED {
            let mut cache = self.cache.write().unwrap_or_else(|p| p.into_inner());
            if cache.bytes + text.len() > CACHE_BYTES {
                cache.by_text.clear();
                cache.bytes = 0;
            }
            if !cache.by_text.contains_key(text) {
                cache.bytes += text.len();
            }
            let entry = cache.by_text.entry(text.into()).or_default();
            entry[strings as usize] = Some(c.clone());
        }
        c
    }

    /// As `classify`, for a text whose ASCII bytes may not all be ASCII characters: in a
    /// client encoding (SJIS, BIG5, GBK, UHC, GB18030, JOHAB) where the second byte of a
    /// character can be a backslash or a quote, or in one the session may just have
    /// changed to. Read as UTF-8 such a text can hide a statement the server sees, so one
    /// with any byte past ASCII and a word that can matter may do anything.
    pub fn classify_in(&self, sql: &[u8], strings: Strings, ascii_safe: bool) -> Arc<Classified> {
        if !ascii_safe && !sql.is_ascii() && may_matter(sql) {
            return Arc::new(Classified::of(Effects::UNKNOWN | Effects::UNREAD));
        }
        self.classify(sql, strings)
    }

    /// What a statement of which only `prefix` was read may do: anything, if the part read
    /// has a word that can matter.
    pub fn classify_cut(&self, prefix: &[u8]) -> Effects {
        match may_matter(prefix) {
            true => Effects::UNKNOWN | Effects::UNREAD,
            false => Effects::NONE,
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Cache> {
        self.cache.read().unwrap_or_else(|p| p.into_inner())
    }
}

/// Whether the text is one data statement (no `;` but a last one, and it starts with
/// SELECT, INSERT, UPDATE, DELETE, MERGE, WITH, VALUES or TABLE): such a statement does
/// nothing to the session itself; only a function call or a temporary object in it could,
/// and their words are looked for apart. A text that starts otherwise (a comment, say) is
/// parsed.
fn one_data_statement(sql: &str) -> bool {
    let body = sql.trim_end();
    let body = body.strip_suffix(';').unwrap_or(body);
    if body.contains(';') {
        return false;
    }
    let start = body.trim_start();
    let word_end = start
        .find(|c: char| !c.is_ascii_alphabetic())
        .unwrap_or(start.len());
    let (word, after) = start.split_at(word_end);
    let data = [
        "select", "insert", "update", "delete", "merge", "with", "values", "table",
    ];
    data.iter().any(|d| word.eq_ignore_ascii_case(d))
        && after.starts_with(|c: char| c.is_ascii_whitespace() || c == '(')
}

/// Whether the text contains one of the words an effect needs.
fn may_matter(sql: &[u8]) -> bool {
    MAY_MATTER.is_match(sql)
}

/// How the server reads string literals: with `standard_conforming_strings` on (backslashes
/// are plain characters in `'...'`), or off (they escape), which changes where a literal
/// ends, and so which statements a text holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Strings {
    Standard,
    Backslash,
    /// Either: the session may have changed the setting since it was last known.
    Either,
}

impl Strings {
    /// As a session's `standard_conforming_strings` says.
    pub fn of(standard_conforming_strings: Option<&str>) -> Strings {
        match standard_conforming_strings {
            Some("off") => Strings::Backslash,
            _ => Strings::Standard,
        }
    }
}

/// Whether every ASCII byte of a text in `client_encoding` is an ASCII character, as in
/// UTF-8 and every other encoding but those whose multibyte characters reuse ASCII bytes.
pub fn ascii_safe(client_encoding: Option<&str>) -> bool {
    const UNSAFE: [&str; 17] = [
        "SJIS",
        "SHIFTJIS",
        "SHIFTJIS2004",
        "MSKANJI",
        "WIN932",
        "CP932",
        "BIG5",
        "WIN950",
        "CP950",
        "GBK",
        "WIN936",
        "CP936",
        "UHC",
        "WIN949",
        "CP949",
        "GB18030",
        "JOHAB",
    ];
    let Some(name) = client_encoding else {
        return true;
    };
    let name: String = name
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .map(|c| c.to_ascii_uppercase())
        .collect();
    !UNSAFE.contains(&name.as_str())
}

/// Classifies one text (uncached) as the server reads it under `strings`.
pub fn classify_text(sql: &str, strings: Strings) -> Classified {
    if strings == Strings::Either {
        let mut out = classify_text(sql, Strings::Standard);
        out.add(&classify_text(sql, Strings::Backslash));
        return out;
    }
    if sql.len() > MAX_PARSED || sql.contains('\0') {
        return Classified::of(Effects::UNKNOWN | Effects::UNREAD);
    }
    let options = match strings {
        Strings::Backslash => pg_query::ParserOptions::DISABLE_STANDARD_CONFORMING_STRINGS,
        _ => pg_query::ParserOptions::DEFAULT,
    };
    let deep = DEEP.is_match(sql);
    // The summary (statement types, from the parser's C side) is cheaper than the tree:
    // an UPDATE ... SET, say, stops here.
    if !deep {
        match pg_query::summary(sql, options, -1) {
            Ok(s)
                if !s
                    .statement_types
                    .iter()
                    .any(|t| TOP_LEVEL.contains(&t.as_str())) =>
            {
                return Classified::default();
            }
            Ok(_) => {}
            // Too deep for the parser's result, or syntax this parser does not know: the
            // server may still take it. Anything may happen.
            Err(_) => return Classified::of(Effects::UNKNOWN | Effects::UNREAD),
        }
    }
    let tree = match pg_query::parse(sql, options) {
        Ok(t) => t.protobuf,
        Err(_) => return Classified::of(Effects::UNKNOWN | Effects::UNREAD),
    };
    let mut out = Classified::default();
    let statements: Vec<&N> = tree
        .stmts
        .iter()
        .filter_map(|s| s.stmt.as_ref()?.node.as_ref())
        .collect();
    for node in &statements {
        top_level(node, &mut out);
    }
    out.only_deallocates =
        matches!(&statements[..], [N::DeallocateStmt(d)] if !d.isall && !d.name.is_empty());
    if deep {
        match serde_json::to_value(&tree) {
            Ok(v) => walk(&v, false, &mut out),
            Err(_) => out.effects |= Effects::UNKNOWN | Effects::UNREAD,
        }
    }
    out
}

/// A custom setting's name (`app.tenant`): one with a dot, which `pg_settings` never lists.
fn custom_name(name: &str) -> Option<String> {
    name.contains('.').then(|| name.to_ascii_lowercase())
}

/// The effects a statement shows at its top level.
fn top_level(node: &N, out: &mut Classified) {
    use protobuf::{DiscardMode, VariableSetKind};
    let effects = match node {
        N::VariableSetStmt(s) => {
            let transaction =
                s.kind == VariableSetKind::VarSetMulti as i32 && s.name == "TRANSACTION";
            let resets = [
                VariableSetKind::VarSetDefault,
                VariableSetKind::VarReset,
                VariableSetKind::VarResetAll,
            ]
            .iter()
            .any(|k| s.kind == *k as i32);
            let session = !(s.is_local || transaction);
            if session {
                out.custom.extend(custom_name(&s.name));
            }
            let seed = match session && s.name.eq_ignore_ascii_case("seed") {
                true => Effects::SEED,
                false => Effects::NONE,
            };
            seed | match (session, resets) {
                (false, _) => Effects::NONE,
                (true, true) => Effects::SETTINGS | Effects::RESETS,
                (true, false) => Effects::SETTINGS,
            }
        }
        N::DiscardStmt(d) if d.target == DiscardMode::DiscardAll as i32 => {
            out.deallocated.push(String::new());
            out.unlisten.push(String::new());
            Effects::SETTINGS | Effects::RESETS | Effects::ENDS | Effects::STATEMENTS
        }
        N::DiscardStmt(d) if d.target == DiscardMode::DiscardTemp as i32 => Effects::ENDS,
        N::DeallocateStmt(d) => {
            out.deallocated.push(if d.isall {
                String::new()
            } else {
                d.name.clone()
            });
            Effects::ENDS | Effects::STATEMENTS
        }
        N::PrepareStmt(_) => Effects::PREPARE,
        N::ListenStmt(_) => Effects::LISTEN,
        N::UnlistenStmt(u) => {
            out.unlisten.push(u.conditionname.clone());
            Effects::ENDS
        }
        // CURSOR_OPT_HOLD: the cursor outlives its transaction.
        N::DeclareCursorStmt(d) if d.options & 0x0020 != 0 => Effects::CURSOR,
        N::ClosePortalStmt(_) | N::DropStmt(_) => Effects::ENDS,
        N::LoadStmt(_) => Effects::LOAD,
        // The parser cannot see into a DO block.
        N::DoStmt(_) => Effects::UNKNOWN,
        _ => Effects::NONE,
    };
    out.effects |= effects;
}

/// Walks a parse tree (as JSON: every node type, without a walker per type) for function
/// calls with session effects, for temporary objects and for updates of `pg_settings`.
/// `drops_at_commit`: inside a statement whose object goes at commit (`ON COMMIT DROP`).
fn walk(v: &Value, drops_at_commit: bool, out: &mut Classified) {
    match v {
        Value::Array(items) => items.iter().for_each(|i| walk(i, drops_at_commit, out)),
        Value::Object(map) => {
            let effects = &mut out.effects;
            let on_commit_drop = protobuf::OnCommitAction::OncommitDrop as i64;
            let drops = drops_at_commit
                || ["oncommit", "on_commit"]
                    .iter()
                    .any(|k| map.get(*k).and_then(Value::as_i64) == Some(on_commit_drop));
            if map.get("relpersistence").and_then(Value::as_str) == Some("t") && !drops {
                *effects |= Effects::TEMP;
            }
            let updated = map.get("UpdateStmt").map(|u| &u["relation"]["relname"]);
            if updated.and_then(Value::as_str) == Some("pg_settings") {
                *effects |= Effects::SETTINGS;
            }
            if let Some(Value::String(s)) = map.get("sval") {
                if s.starts_with("pg_temp") {
                    *effects |= Effects::TEMP;
                }
            }
            if let Some(Value::String(s)) = map.get("schemaname") {
                if s.starts_with("pg_temp") {
                    *effects |= Effects::TEMP;
                }
            }
            if let Some(call) = map.get("FuncCall") {
                function_call(call, out);
            }
            map.values().for_each(|child| walk(child, drops, out));
        }
        _ => {}
    }
}

/// The effects of calling a function, by its name (any schema) and arguments.
fn function_call(call: &Value, out: &mut Classified) {
    let name = call["funcname"]
        .as_array()
        .and_then(|parts| parts.last())
        .and_then(|p| p["node"]["String"]["sval"].as_str())
        .unwrap_or_default();
    let args = call["args"].as_array();
    out.effects |= match name {
        "set_config" => match args.and_then(|a| a.get(2)) {
            Some(is_local) if is_true(is_local) => Effects::NONE,
            _ => match args.and_then(|a| a.first()).and_then(constant_text) {
                Some(name) => {
                    out.custom.extend(custom_name(name));
                    Effects::SETTINGS
                }
                None => Effects::SETTINGS | Effects::NAMELESS,
            },
        },
        "setseed" => Effects::SEED,
        // A temporary slot lives as long as the session.
        "pg_create_physical_replication_slot" | "pg_create_logical_replication_slot" => {
            Effects::TEMP
        }
        "pg_advisory_lock"
        | "pg_advisory_lock_shared"
        | "pg_try_advisory_lock"
        | "pg_try_advisory_lock_shared" => Effects::ADVISORY,
        "pg_advisory_unlock" | "pg_advisory_unlock_shared" | "pg_advisory_unlock_all" => {
            Effects::ENDS
        }
        _ => Effects::NONE,
    };
}

/// A string constant argument, bare or cast (`'app.tenant'::text`).
fn constant_text(arg: &Value) -> Option<&str> {
    let node = &arg["node"];
    let constant = match node.get("TypeCast") {
        Some(cast) => &cast["arg"]["node"],
        None => node,
    };
    constant["AConst"]["val"]["Sval"]["sval"].as_str()
}

/// A constant argument that PostgreSQL reads as `true`.
fn is_true(arg: &Value) -> bool {
    let val = &arg["node"]["AConst"]["val"];
    if let Some(b) = val["Boolval"]["boolval"].as_bool() {
        return b;
    }
    val["Sval"]["sval"].as_str().is_some_and(|s| {
        ["t", "true", "y", "yes", "on", "1"].contains(&s.trim().to_ascii_lowercase().as_str())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn effects(sql: &str) -> Effects {
        Classifier::default()
            .classify(sql.as_bytes(), Strings::Standard)
            .effects
    }

    #[test]
    fn settings_are_seen_in_every_form() {
        for sql in [
            "SET work_mem = '7MB'",
            "set search_path = a, public",
            "RESET ALL",
            "RESET statement_timeout",
            "SET ROLE tenant_x",
            "SET SESSION AUTHORIZATION tenant_y",
            "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE",
            "SET TIME ZONE 'UTC'",
            "SELECT pg_catalog.set_config('search_path', '', false)",
            "SELECT set_config('statement_timeout', '1', $1)",
            "SELECT 1; SELECT CASE WHEN true THEN set_config('a.b', 'c', 'off') END",
            "SELECT * FROM (SELECT set_config('x.y', '1', false)) s",
            "EXPLAIN ANALYZE SELECT set_config('x.y', '1', false)",
            "DISCARD ALL",
            "SELECT U&\"s\\0065t_config\"('a.b', '1', false)",
        ] {
            assert!(effects(sql).contains(Effects::SETTINGS), "{sql}");
        }
        for sql in [
            "RESET ALL",
            "RESET work_mem",
            "SET work_mem TO DEFAULT",
            "DISCARD ALL",
        ] {
            assert!(effects(sql).contains(Effects::RESETS), "{sql}");
        }
        assert!(!effects("SET work_mem = 1").contains(Effects::RESETS));
        for sql in [
            "SET LOCAL work_mem = '7MB'",
            "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
            "SELECT set_config('request.jwt.claims', $1, true)",
            "SELECT set_config('a.b', 'c', 'on')",
            "UPDATE pgbench_accounts SET abalance = abalance + 5 WHERE aid = 1",
            "SELECT abalance FROM pgbench_accounts WHERE aid = $1",
            "SELECT 'SET ROLE x'",
            "not sql at all; set",
        ] {
            assert!(!effects(sql).contains(Effects::SETTINGS), "{sql}");
        }
    }

    #[test]
    fn objects_that_live_in_the_session_are_seen() {
        let cases = [
            ("CREATE TEMP TABLE t (x int)", Effects::TEMP),
            ("create temporary table t as select 1", Effects::TEMP),
            ("SELECT 1 AS x INTO TEMP TABLE made", Effects::TEMP),
            ("CREATE TABLE pg_temp.t (x int)", Effects::TEMP),
            ("CREATE TEMP VIEW v AS SELECT 1", Effects::TEMP),
            ("CREATE TEMP SEQUENCE s", Effects::TEMP),
            (
                "CREATE FUNCTION pg_temp.f() RETURNS int AS 'SELECT 1' LANGUAGE sql",
                Effects::TEMP,
            ),
            ("SELECT pg_advisory_lock(42)", Effects::ADVISORY),
            (
                "SELECT pg_try_advisory_lock_shared(1, 2)",
                Effects::ADVISORY,
            ),
            ("DECLARE c CURSOR WITH HOLD FOR SELECT 1", Effects::CURSOR),
            ("PREPARE p1 AS SELECT 1", Effects::PREPARE),
            ("LISTEN news", Effects::LISTEN),
            ("LOAD 'auto_explain'", Effects::LOAD),
            ("DO $$ BEGIN PERFORM 1; END $$", Effects::UNKNOWN),
        ];
        for (sql, want) in cases {
            assert!(effects(sql).contains(want), "{sql}: {:?}", effects(sql));
        }
        for sql in [
            "CREATE TEMP TABLE t (x int) ON COMMIT DROP",
            "CREATE TEMP TABLE mine ON COMMIT DROP AS SELECT 1 AS id",
            "DECLARE c CURSOR FOR SELECT 1",
            "SELECT pg_advisory_xact_lock(42)",
            "CREATE TABLE t (x int)",
            "SELECT 'temp'",
        ] {
            assert!(!effects(sql).intersects(Effects::OBJECTS), "{sql}");
        }
    }

    #[test]
    fn what_ends_session_objects_and_statements_is_seen_with_its_names() {
        let c = Classifier::default();
        let d = c.classify_std(b"DEALLOCATE p1");
        assert!(d.effects.contains(Effects::ENDS | Effects::STATEMENTS));
        assert_eq!(d.deallocated, vec!["p1".to_owned()]);
        assert!(d.only_deallocates);
        let all = c.classify_std(b"DEALLOCATE ALL");
        assert!(all.drops_all_statements() && !all.only_deallocates);
        let discard = c.classify_std(b"discard all");
        assert!(discard.drops_all_statements());
        assert_eq!(discard.unlisten, vec![String::new()]);
        let u = c.classify_std(b"UNLISTEN news; UNLISTEN *");
        assert_eq!(u.unlisten, vec!["news".to_owned(), String::new()]);
        for sql in [
            "DROP TABLE mine",
            "CLOSE held",
            "SELECT pg_advisory_unlock(42)",
            "SELECT pg_advisory_unlock_all()",
            "DISCARD TEMP",
        ] {
            assert!(effects(sql).contains(Effects::ENDS), "{sql}");
        }
        assert!(!c.classify_std(b"SELECT 1; DEALLOCATE p1").only_deallocates);
    }

    #[test]
    fn texts_it_cannot_read_count_as_unknown_and_the_cache_is_bounded() {
        let long = format!("SELECT '{}' -- set", "x".repeat(MAX_PARSED));
        assert!(effects(&long).contains(Effects::UNKNOWN));
        assert!(Classifier::default()
            .classify(b"SET x = '\xff'", Strings::Standard)
            .effects
            .contains(Effects::UNKNOWN));
        let c = Classifier::default();
        for i in 0..3000 {
            c.classify(
                format!("SET application_name = '{i:>3000}'").as_bytes(),
                Strings::Standard,
            );
        }
        assert!(c.read().bytes <= CACHE_BYTES);
    }

    impl Classifier {
        fn classify_std(&self, sql: &[u8]) -> Arc<Classified> {
            self.classify(sql, Strings::Standard)
        }
    }

    #[test]
    fn a_text_is_read_as_the_server_reads_its_strings() {
        // With standard_conforming_strings off, the backslash escapes the quote: the text
        // holds a SET ROLE, which the standard reading hides in a comment.
        let sql = b"SELECT 'a\\' -- '; SET ROLE evil; --";
        let c = Classifier::default();
        assert!(!c
            .classify(sql, Strings::Standard)
            .effects
            .contains(Effects::SETTINGS));
        assert!(c
            .classify(sql, Strings::Backslash)
            .effects
            .contains(Effects::SETTINGS));
        assert!(c
            .classify(sql, Strings::Either)
            .effects
            .contains(Effects::SETTINGS));
        assert_eq!(Strings::of(Some("off")), Strings::Backslash);
        assert_eq!(Strings::of(Some("on")), Strings::Standard);
    }

    #[test]
    fn a_text_the_parser_refuses_counts_as_unknown() {
        // Nested deeper than the parser's result can carry: the server may still run it.
        let deep = format!("SET ROLE tenant_x; SELECT {}1", "1+".repeat(200));
        assert!(
            effects(&deep).contains(Effects::UNKNOWN),
            "{:?}",
            effects(&deep)
        );
        assert!(effects("SET ROLE (").contains(Effects::UNKNOWN));
    }

    #[test]
    fn one_data_statement_is_told_apart_without_the_parser() {
        for sql in [
            "UPDATE pgbench_accounts SET abalance = abalance + 5 WHERE aid = 42;",
            "select * from t where x = 'a'",
            "WITH d AS (DELETE FROM t RETURNING *) SELECT count(*) FROM d",
            "INSERT INTO t (settings) VALUES ('x')  ;  ",
        ] {
            assert!(one_data_statement(sql), "{sql}");
        }
        for sql in [
            "UPDATE t SET x = 1; SET ROLE evil",
            "/* */ SET ROLE evil",
            "SET ROLE evil",
            "SELECT 1 INTO TEMP t",
            "updated",
            "SELECT 'a;b'",
        ] {
            let both = one_data_statement(sql) && !DEEP.is_match(sql);
            assert!(!both, "{sql}");
        }
    }

    #[test]
    fn custom_settings_are_named_and_what_cannot_be_named_or_undone_is_told() {
        let c = Classifier::default();
        let named = |sql: &str| c.classify_std(sql.as_bytes()).custom.clone();
        assert_eq!(named("SET app.Tenant = '1'"), vec!["app.tenant".to_owned()]);
        assert_eq!(named("RESET app.tenant"), vec!["app.tenant".to_owned()]);
        assert_eq!(
            named("SELECT set_config('request.jwt.claims'::text, $1, false)"),
            vec!["request.jwt.claims".to_owned()]
        );
        assert!(named("SET LOCAL app.tenant = '1'").is_empty());
        assert!(named("SET work_mem = '1MB'").is_empty());
        for sql in [
            "SELECT set_config($1, $2, false)",
            "SELECT set_config('app.' || $1, '1', false)",
        ] {
            assert!(
                effects(sql).contains(Effects::NAMELESS | Effects::SETTINGS),
                "{sql}"
            );
        }
        assert!(!effects("SELECT set_config($1, $2, true)").contains(Effects::NAMELESS));
        for sql in [
            "UPDATE pg_settings SET setting = 'a' WHERE name = 'search_path'",
            "WITH u AS (UPDATE pg_catalog.pg_settings SET setting = '1' WHERE name = 'x' RETURNING 1) SELECT 1",
        ] {
            assert!(effects(sql).contains(Effects::SETTINGS), "{sql}");
        }
        assert!(!effects("SELECT name FROM pg_settings").contains(Effects::SETTINGS));
        for sql in ["SELECT setseed(0.5)", "SET seed = 0.5"] {
            assert!(effects(sql).contains(Effects::SEED), "{sql}");
        }
        assert!(
            effects("SELECT pg_create_logical_replication_slot('s', 'test_decoding', true)")
                .contains(Effects::TEMP)
        );
    }

    #[test]
    fn a_text_in_an_encoding_that_reuses_ascii_bytes_is_not_read_as_utf8() {
        // In SJIS, E3 81 and 81 5C are characters: the string ends at the quote after them.
        let sql = "SELECT E'\u{3041}\\'; SET ROLE tenant_x; -- '";
        let c = Classifier::default();
        let standard = c.classify_in(sql.as_bytes(), Strings::Standard, true);
        assert!(!standard.effects.contains(Effects::SETTINGS));
        let sjis = c.classify_in(sql.as_bytes(), Strings::Standard, false);
        // Not read at all: its connection is not lent again (a custom setting it made
        // would show in no session read).
        assert!(sjis.effects.contains(Effects::UNKNOWN | Effects::UNREAD));
        let not_utf8 = c.classify(
            b"SELECT set_config('app.x', '\xff', false)",
            Strings::Standard,
        );
        assert!(not_utf8
            .effects
            .contains(Effects::UNKNOWN | Effects::UNREAD));
        assert!(
            effects("SET ROLE (").contains(Effects::UNREAD),
            "does not parse"
        );
        assert!(!effects("DO $$ BEGIN PERFORM 1; END $$").contains(Effects::UNREAD));
        assert!(c
            .classify_in(b"SELECT 1", Strings::Standard, false)
            .effects
            .is_empty());
        assert!(!ascii_safe(Some("SJIS")) && !ascii_safe(Some("shift_jis_2004")));
        assert!(ascii_safe(Some("UTF8")) && ascii_safe(Some("LATIN1")) && ascii_safe(None));
    }

    #[test]
    fn texts_without_the_words_never_reach_the_parser() {
        assert!(!may_matter(
            b"SELECT abalance FROM pgbench_accounts WHERE aid = $1"
        ));
        assert!(!may_matter(
            b"INSERT INTO pgbench_history (tid, bid) VALUES ($1, $2)"
        ));
        assert!(may_matter(b"update t SET x = 1"));
        assert!(may_matter(b"select PG_ADVISORY_LOCK(1)"));
    }
}
