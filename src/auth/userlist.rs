//! The secrets patroxy checks clients against, from an `auth_file` in PgBouncer's userlist
//! format: one `"user" "secret"` per line, `""` for a quote inside a name, anything else a
//! comment. A secret is a SCRAM verifier, an md5 secret, or a plain password.

use std::collections::HashMap;

use super::md5;
use super::scram::Verifier;

#[derive(Clone, PartialEq, Eq)]
pub enum Secret {
    Scram(Verifier),
    Md5(String),
    Plain(String),
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Secret::Scram(_) => "Secret::Scram(***)",
            Secret::Md5(_) => "Secret::Md5(***)",
            Secret::Plain(_) => "Secret::Plain(***)",
        })
    }
}

impl Secret {
    /// Reads a secret as PostgreSQL stores it (`pg_authid.rolpassword`) or as written in a
    /// userlist.
    pub fn parse(text: &str) -> Secret {
        if text.starts_with("SCRAM-SHA-256$") {
            if let Ok(v) = Verifier::parse(text) {
                return Secret::Scram(v);
            }
        }
        if md5::is_stored(text) {
            return Secret::Md5(text.to_owned());
        }
        Secret::Plain(text.to_owned())
    }

    /// The secret as written (a verifier in PostgreSQL's form).
    pub fn text(&self) -> String {
        match self {
            Secret::Scram(v) => v.to_string(),
            Secret::Md5(s) | Secret::Plain(s) => s.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("auth_file line {line}: {why}")]
pub struct UserlistError {
    pub line: usize,
    pub why: &'static str,
}

/// Parses a userlist; the first malformed line is an error, naming its number.
pub fn parse(text: &str) -> Result<HashMap<String, Secret>, UserlistError> {
    let mut users = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if !line.starts_with('"') {
            continue; // a comment or blank
        }
        let fail = |why| UserlistError { line: i + 1, why };
        let (user, rest) = quoted(line).ok_or(fail("unterminated user name"))?;
        let rest = rest.trim_start();
        if !rest.starts_with('"') {
            return Err(fail("expected a quoted secret after the user name"));
        }
        let (secret, _) = quoted(rest).ok_or(fail("unterminated secret"))?;
        users.insert(user, Secret::parse(&secret));
    }
    Ok(users)
}

/// A `"..."` string at the start of `s` (with `""` for a quote), and what follows it.
fn quoted(s: &str) -> Option<(String, &str)> {
    let mut out = String::new();
    let mut chars = s.char_indices().skip(1).peekable();
    while let Some((i, c)) = chars.next() {
        if c == '"' {
            if matches!(chars.peek(), Some((_, '"'))) {
                chars.next();
                out.push('"');
                continue;
            }
            return Some((out, &s[i + 1..]));
        }
        out.push(c);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_pgbouncer_userlists() {
        let v = Verifier::from_password("wonder", b"0123456789abcdef", 4096);
        let text = format!(
            "; comment\n\"alice\" \"{v}\"\n\"bob\" \"{}\"\n\n\"carol\" \"plain \"\"quoted\"\"\"\n\"we\"\"ird\" \"x\" extra\n",
            md5::stored("builder", "bob")
        );
        let users = parse(&text).unwrap();
        assert_eq!(users["alice"], Secret::Scram(v));
        assert!(matches!(&users["bob"], Secret::Md5(s) if s.starts_with("md5")));
        assert_eq!(users["carol"], Secret::Plain("plain \"quoted\"".into()));
        assert_eq!(users["we\"ird"], Secret::Plain("x".into()));
        assert_eq!(users.len(), 4);
    }

    #[test]
    fn malformed_lines_name_their_number() {
        assert_eq!(parse("\"a\" \"b\"\n\"broken").unwrap_err().line, 2);
        assert_eq!(
            parse("\"a\" b").unwrap_err().why,
            "expected a quoted secret after the user name"
        );
        assert!(!format!("{:?}", Secret::Plain("pw".into())).contains("pw"));
    }
}
