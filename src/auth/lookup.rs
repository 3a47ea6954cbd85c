//! Looking up the secret of a user the auth_file does not have (`auth.auth_query`, run as
//! `auth.auth_user`): the query goes as a Parse with the user's name bound to `$1`, never
//! spliced into its text, and the first row's last column is the secret. Pure: the bytes
//! of the request out, the rows in.

use bytes::{Bytes, BytesMut};

use super::userlist::Secret;
use crate::protocol::messages;

/// The request that runs `auth_query` for `user`: Parse, Bind, Execute, Sync.
pub fn request(auth_query: &str, user: &str) -> Bytes {
    let mut out = BytesMut::new();
    out.extend_from_slice(&messages::parse("", auth_query, &[]));
    out.extend_from_slice(&messages::bind_unnamed(&[Some(user)]));
    out.extend_from_slice(&messages::execute_unnamed_and_sync());
    out.freeze()
}

/// The secret in the answer: the last column of the first row. `None` for a user
/// PostgreSQL does not know, or one without a password.
pub fn secret(rows: Vec<Vec<Option<String>>>) -> Option<Secret> {
    let text = rows.into_iter().next()?.pop()??;
    Some(Secret::parse(&text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_user_name_is_a_parameter_not_part_of_the_query() {
        let sql = "SELECT usename, passwd FROM pg_shadow WHERE usename=$1";
        let r = request(sql, "x' OR true --");
        let text = String::from_utf8_lossy(&r);
        assert!(text.contains(sql), "the query is sent as written");
        assert_eq!(r[0], b'P');
        assert!(r.windows(13).any(|w| w == b"x' OR true --"));
        assert!(r.ends_with(&[b'S', 0, 0, 0, 4]));
    }

    #[test]
    fn the_secret_is_the_first_rows_last_column() {
        let row = |s: Option<&str>| vec![Some("alice".to_owned()), s.map(str::to_owned)];
        assert_eq!(
            secret(vec![row(Some("md5abc")), row(Some("other"))]),
            Some(Secret::Plain("md5abc".into()))
        );
        assert_eq!(secret(vec![row(None)]), None);
        assert_eq!(secret(vec![]), None);
    }
}
