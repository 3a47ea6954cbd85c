//! PostgreSQL's md5 password scheme: the stored secret `md5` + hex(md5(password + user)),
//! and the challenge response `md5` + hex(md5(hex(md5(password + user)) + salt)).

use md5::{Digest, Md5};

fn hex_md5(parts: &[&[u8]]) -> String {
    let mut h = Md5::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// The secret PostgreSQL stores for `password` of `user`: `md5<32 hex digits>`.
pub fn stored(password: &str, user: &str) -> String {
    format!("md5{}", hex_md5(&[password.as_bytes(), user.as_bytes()]))
}

/// Is `text` a stored md5 secret?
pub fn is_stored(text: &str) -> bool {
    text.len() == 35 && text.starts_with("md5") && text[3..].bytes().all(|b| b.is_ascii_hexdigit())
}

/// The response to an md5 challenge with `salt`, from the stored secret.
pub fn response(stored: &str, salt: [u8; 4]) -> String {
    let inner = stored.strip_prefix("md5").unwrap_or(stored);
    format!("md5{}", hex_md5(&[inner.as_bytes(), &salt]))
}

/// Does a client's response to the challenge `salt` match the stored secret?
pub fn verify(stored: &str, salt: [u8; 4], client_response: &str) -> bool {
    super::same(
        response(stored, salt).as_bytes(),
        client_response.as_bytes(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_postgresql() {
        // SELECT 'md5' || md5('builder' || 'bob');
        assert_eq!(
            stored("builder", "bob"),
            "md5".to_owned() + &hex_md5(&[b"builderbob"])
        );
        let s = stored("builder", "bob");
        assert!(is_stored(&s));
        assert!(!is_stored("builder"));
        let salt = [1, 2, 3, 4];
        let r = response(&s, salt);
        assert!(verify(&s, salt, &r));
        assert!(!verify(&s, [4, 3, 2, 1], &r));
        assert!(!verify(&s, salt, "md5"));
    }
}
