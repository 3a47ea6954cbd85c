//! Session pooling across a planned switchover: whether a client at rest on the old primary
//! holds state there that cannot follow it (advisory locks, temporary tables, cursors,
//! listens, SQL `PREPARE`), and the protocol-level prepared statements that can, replayed on
//! the new primary (a physical replica: same catalogs, so the same type OIDs).

use bytes::{BufMut, Bytes, BytesMut};

use crate::backend::conn::{ConnError, ServerConn};
use crate::protocol::codes;

/// What the client holds on its server connection.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Verdict {
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

/// Asks the server (idle, at rest) what the session holds. Two round trips.
pub(super) async fn inspect(conn: &mut ServerConn) -> Result<Verdict, ConnError> {
    let row = conn.query_rows(STATE).await?.pop().unwrap_or_default();
    if let Some(why) = holds(&row) {
        return Ok(Verdict::Stays(why));
    }
    let mut frames = Vec::new();
    for row in conn.query_rows(STATEMENTS).await? {
        let [Some(name), Some(sql), Some(types)] = &row[..] else {
            return Err(ConnError::Protocol("pg_prepared_statements: a null".into()));
        };
        let oids =
            oids(types).ok_or_else(|| ConnError::Protocol(format!("parameter types {types:?}")))?;
        frames.push(parse(name, sql, &oids));
    }
    Ok(Verdict::Moves(frames))
}

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

/// A Parse message for a named statement with its parameter types.
fn parse(name: &str, sql: &str, oids: &[u32]) -> Bytes {
    let mut body = BytesMut::with_capacity(name.len() + sql.len() + 4 + 4 * oids.len());
    body.put_slice(name.as_bytes());
    body.put_u8(0);
    body.put_slice(sql.as_bytes());
    body.put_u8(0);
    body.put_u16(oids.len() as u16);
    for oid in oids {
        body.put_u32(*oid);
    }
    let mut frame = BytesMut::with_capacity(body.len() + 5);
    frame.put_u8(codes::PARSE);
    frame.put_u32(body.len() as u32 + 4);
    frame.put_slice(&body);
    frame.freeze()
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
    fn parameter_types_read_back_into_a_parse() {
        assert_eq!(oids("{}"), Some(vec![]));
        assert_eq!(oids("{23,25}"), Some(vec![23, 25]));
        assert_eq!(oids("23"), None);
        let frame = parse("s1", "SELECT $1", &[23]);
        assert_eq!(
            &frame[..],
            b"P\0\0\0\x17s1\0SELECT $1\0\0\x01\0\0\0\x17".as_slice()
        );
    }
}
