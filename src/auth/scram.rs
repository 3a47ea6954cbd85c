//! SCRAM-SHA-256 (RFC 5802, RFC 7677) as PostgreSQL speaks it, both ways, with no I/O:
//! patroxy as the server checking a client's proof against a stored verifier (and recovering
//! the client's ClientKey from it), and patroxy as a client proving itself to PostgreSQL with
//! a password or with a recovered ClientKey ("SCRAM pass-through"). Channel binding is not
//! offered: it cannot pass through a proxy that terminates TLS.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ring::{digest, hmac, pbkdf2};

pub const MECHANISM: &str = "SCRAM-SHA-256";
const KEY_LEN: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScramError {
    #[error("not a SCRAM-SHA-256 verifier")]
    BadVerifier,
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    #[error("channel binding is not supported through patroxy")]
    ChannelBinding,
    #[error("the SCRAM nonce does not match")]
    Nonce,
    #[error("password authentication failed")]
    BadProof,
    #[error("the server's SCRAM signature does not match")]
    BadServerSignature,
    #[error("the server rejected the SCRAM exchange: {0}")]
    ServerError(String),
    #[error("the server's SCRAM secret for this user is not the one the client was checked against (auth_file out of date?)")]
    OtherSecret,
}

type Key = [u8; KEY_LEN];

/// The most iterations a server may ask patroxy for: PBKDF2 at a million takes about a
/// second of one thread (off the runtime's); PostgreSQL's default is 4096.
pub const MAX_ITERATIONS: u32 = 1_000_000;

/// The iteration count of the verifiers patroxy makes itself (PostgreSQL's default).
pub const MOCK_ITERATIONS: u32 = 4096;

/// The salt patroxy gives `user` when it derives a verifier itself (for an unknown user, or
/// from a password): 16 bytes, as PostgreSQL's, fixed by the name under `key`.
pub fn mock_salt(user: &str, key: &[u8; KEY_LEN]) -> Vec<u8> {
    hmac(key, user.as_bytes())[..16].to_vec()
}

/// The key mock salts are made under: a hash of `seed` (`auth.salt_key`, the same on every
/// instance that has it), or random without one.
pub fn mock_key(seed: &[u8]) -> Key {
    match seed.is_empty() {
        true => random(),
        false => hmac(b"patroxy mock salt", seed),
    }
}

fn hmac(key: &[u8], data: &[u8]) -> Key {
    let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), data);
    tag.as_ref().try_into().expect("SHA-256 is 32 bytes")
}

fn sha256(data: &[u8]) -> Key {
    digest::digest(&digest::SHA256, data)
        .as_ref()
        .try_into()
        .expect("SHA-256 is 32 bytes")
}

fn xor(a: &Key, b: &Key) -> Key {
    std::array::from_fn(|i| a[i] ^ b[i])
}

/// `SaltedPassword = Hi(password, salt, i)`.
fn salted_password(password: &str, salt: &[u8], iterations: u32) -> Key {
    let mut out = [0u8; KEY_LEN];
    let iterations = std::num::NonZeroU32::new(iterations.max(1)).expect("at least 1");
    pbkdf2::derive(
        pbkdf2::PBKDF2_HMAC_SHA256,
        iterations,
        salt,
        password.as_bytes(),
        &mut out,
    );
    out
}

/// A stored SCRAM secret, as in `pg_authid.rolpassword`:
/// `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`.
#[derive(Clone, PartialEq, Eq)]
pub struct Verifier {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: Key,
    pub server_key: Key,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Verifier(SCRAM-SHA-256, {} iterations)", self.iterations)
    }
}

impl Verifier {
    pub fn parse(text: &str) -> Result<Verifier, ScramError> {
        let rest = text
            .strip_prefix("SCRAM-SHA-256$")
            .ok_or(ScramError::BadVerifier)?;
        let (params, keys) = rest.split_once('$').ok_or(ScramError::BadVerifier)?;
        let (iterations, salt) = params.split_once(':').ok_or(ScramError::BadVerifier)?;
        let (stored, server) = keys.split_once(':').ok_or(ScramError::BadVerifier)?;
        let key = |s: &str| -> Result<Key, ScramError> {
            let bytes = B64.decode(s).map_err(|_| ScramError::BadVerifier)?;
            bytes.try_into().map_err(|_| ScramError::BadVerifier)
        };
        Ok(Verifier {
            iterations: iterations.parse().map_err(|_| ScramError::BadVerifier)?,
            salt: B64.decode(salt).map_err(|_| ScramError::BadVerifier)?,
            stored_key: key(stored)?,
            server_key: key(server)?,
        })
    }

    /// A verifier for a user patroxy has no secret for: a salt fixed by the name (a keyed
    /// hash under `key`, so a name gets the same salt every time, as a real user's stored
    /// one does), random keys (no proof holds), and no PBKDF2 to make it.
    pub fn mock(user: &str, key: &[u8; KEY_LEN]) -> Verifier {
        Verifier {
            iterations: MOCK_ITERATIONS,
            salt: mock_salt(user, key),
            stored_key: random(),
            server_key: random(),
        }
    }

    /// The verifier PostgreSQL would store for `password` with this salt and count.
    pub fn from_password(password: &str, salt: &[u8], iterations: u32) -> Verifier {
        let salted = salted_password(password, salt, iterations);
        Verifier {
            iterations,
            salt: salt.to_vec(),
            stored_key: sha256(&hmac(&salted, b"Client Key")),
            server_key: hmac(&salted, b"Server Key"),
        }
    }
}

impl std::fmt::Display for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "SCRAM-SHA-256${}:{}${}:{}",
            self.iterations,
            B64.encode(&self.salt),
            B64.encode(self.stored_key),
            B64.encode(self.server_key)
        )
    }
}

/// The attribute `name=` of a SCRAM message.
fn attr(msg: &str, name: char) -> Option<&str> {
    msg.split(',').find_map(|part| {
        let mut chars = part.chars();
        (chars.next() == Some(name) && chars.next() == Some('=')).then(|| &part[2..])
    })
}

/// patroxy as the server: checks a client's proof against a verifier.
#[derive(Debug)]
pub struct ServerExchange {
    verifier: Verifier,
    client_first_bare: String,
    server_first: String,
    nonce: String,
}

impl ServerExchange {
    /// Answers the client-first message (`n,,n=user,r=<nonce>`) with the server-first one.
    /// `server_nonce` must be fresh random printable text without commas.
    pub fn start(
        verifier: Verifier,
        client_first: &str,
        server_nonce: &str,
    ) -> Result<(ServerExchange, String), ScramError> {
        let bare = match client_first.split_once(",,") {
            Some(("n" | "y", bare)) => bare,
            Some((gs2, _)) if gs2.starts_with("p=") => return Err(ScramError::ChannelBinding),
            // An authzid (`n,a=someone,`) is not supported, as in PostgreSQL.
            _ => return Err(ScramError::Malformed("gs2 header")),
        };
        let client_nonce = attr(bare, 'r').ok_or(ScramError::Malformed("client nonce"))?;
        if client_nonce.is_empty() {
            return Err(ScramError::Malformed("client nonce"));
        }
        let nonce = format!("{client_nonce}{server_nonce}");
        let server_first = format!(
            "r={nonce},s={},i={}",
            B64.encode(&verifier.salt),
            verifier.iterations
        );
        let exchange = ServerExchange {
            verifier,
            client_first_bare: bare.to_owned(),
            server_first: server_first.clone(),
            nonce,
        };
        Ok((exchange, server_first))
    }

    /// Checks the client-final message; on success, the server-final message to send and the
    /// client's ClientKey, recovered from its proof.
    pub fn finish(self, client_final: &str) -> Result<(String, Key), ScramError> {
        let (without_proof, proof) = client_final
            .rsplit_once(",p=")
            .ok_or(ScramError::Malformed("client proof"))?;
        match attr(without_proof, 'c') {
            // base64 of "n,," or "y,,": no channel binding data.
            Some("biws" | "eSws") => {}
            Some(_) => return Err(ScramError::ChannelBinding),
            None => return Err(ScramError::Malformed("channel binding")),
        }
        if attr(without_proof, 'r') != Some(self.nonce.as_str()) {
            return Err(ScramError::Nonce);
        }
        let proof: Key = B64
            .decode(proof)
            .ok()
            .and_then(|p| p.try_into().ok())
            .ok_or(ScramError::Malformed("client proof"))?;
        let auth_message = format!(
            "{},{},{without_proof}",
            self.client_first_bare, self.server_first
        );
        let v = &self.verifier;
        let client_signature = hmac(&v.stored_key, auth_message.as_bytes());
        let client_key = xor(&proof, &client_signature);
        if !constant_time_eq(&sha256(&client_key), &v.stored_key) {
            return Err(ScramError::BadProof);
        }
        let server_signature = hmac(&v.server_key, auth_message.as_bytes());
        Ok((format!("v={}", B64.encode(server_signature)), client_key))
    }
}

fn constant_time_eq(a: &Key, b: &Key) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// What patroxy proves itself with to PostgreSQL.
#[derive(Clone)]
pub enum Credential {
    /// A password: keys are derived with the server's salt and iteration count.
    Password(String),
    /// A ClientKey recovered from a client's proof, and the verifier it was checked
    /// against (its ServerKey checks the server's signature).
    ClientKey { client_key: Key, verifier: Verifier },
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Credential::Password(_) => "Credential::Password(***)",
            Credential::ClientKey { .. } => "Credential::ClientKey(***)",
        })
    }
}

/// patroxy as a client of PostgreSQL's SCRAM exchange.
#[derive(Debug)]
pub struct ClientExchange {
    credential: Credential,
    client_first_bare: String,
    nonce: String,
    expected_server_signature: Option<Key>,
}

impl ClientExchange {
    /// The exchange and its client-first message. PostgreSQL takes the user from the startup
    /// packet, so the SCRAM user name is left empty, as libpq does.
    pub fn start(credential: Credential, client_nonce: &str) -> (ClientExchange, String) {
        let bare = format!("n=,r={client_nonce}");
        let first = format!("n,,{bare}");
        let exchange = ClientExchange {
            credential,
            client_first_bare: bare,
            nonce: client_nonce.to_owned(),
            expected_server_signature: None,
        };
        (exchange, first)
    }

    /// Answers the server-first message with the client-final one.
    pub fn respond(&mut self, server_first: &str) -> Result<String, ScramError> {
        let nonce = attr(server_first, 'r').ok_or(ScramError::Malformed("server nonce"))?;
        if !nonce.starts_with(&self.nonce) || nonce.len() == self.nonce.len() {
            return Err(ScramError::Nonce);
        }
        let salt = attr(server_first, 's')
            .and_then(|s| B64.decode(s).ok())
            .ok_or(ScramError::Malformed("salt"))?;
        let iterations: u32 = attr(server_first, 'i')
            .and_then(|i| i.parse().ok())
            .ok_or(ScramError::Malformed("iterations"))?;
        if !(1..=MAX_ITERATIONS).contains(&iterations) {
            return Err(ScramError::Malformed("iterations (more than 1,000,000)"));
        }
        let (client_key, server_key) = match &self.credential {
            // A server asking for few iterations would make a guess at the password cheap
            // to test offline from the proof.
            Credential::Password(_) if iterations < MOCK_ITERATIONS => {
                return Err(ScramError::Malformed(
                    "iterations (fewer than 4096, for a password)",
                ));
            }
            Credential::Password(p) => {
                let salted = salted_password(p, &salt, iterations);
                (hmac(&salted, b"Client Key"), hmac(&salted, b"Server Key"))
            }
            Credential::ClientKey {
                client_key,
                verifier,
            } => {
                // The server must be using the secret the key was recovered against.
                if verifier.salt != salt || verifier.iterations != iterations {
                    return Err(ScramError::OtherSecret);
                }
                (*client_key, verifier.server_key)
            }
        };
        let without_proof = format!("c=biws,r={nonce}");
        let auth_message = format!("{},{server_first},{without_proof}", self.client_first_bare);
        let client_signature = hmac(&sha256(&client_key), auth_message.as_bytes());
        let proof = xor(&client_key, &client_signature);
        self.expected_server_signature = Some(hmac(&server_key, auth_message.as_bytes()));
        Ok(format!("{without_proof},p={}", B64.encode(proof)))
    }

    /// Checks the server-final message.
    pub fn finish(self, server_final: &str) -> Result<(), ScramError> {
        if let Some(e) = attr(server_final, 'e') {
            return Err(ScramError::ServerError(e.to_owned()));
        }
        let signature = attr(server_final, 'v')
            .and_then(|v| B64.decode(v).ok())
            .and_then(|v| Key::try_from(v).ok())
            .ok_or(ScramError::Malformed("server signature"))?;
        match self.expected_server_signature {
            Some(expected) if constant_time_eq(&expected, &signature) => Ok(()),
            _ => Err(ScramError::BadServerSignature),
        }
    }
}

/// A fresh nonce: 18 random bytes in base64 (24 printable characters, no commas).
pub fn nonce() -> String {
    B64.encode(random::<18>())
}

/// `N` bytes from the system's random source: nonces, salts, cancel keys. The source is
/// read a block at a time per thread (each byte is handed out once): a new pooled client
/// costs no system call for its key.
pub fn random<const N: usize>() -> [u8; N] {
    const BLOCK: usize = 512;
    thread_local! {
        static POOL: std::cell::RefCell<(usize, [u8; BLOCK])> =
            const { std::cell::RefCell::new((BLOCK, [0; BLOCK])) };
    }
    let fill = |out: &mut [u8]| {
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), out)
            .expect("the system's random source")
    };
    let mut bytes = [0u8; N];
    if N > BLOCK {
        fill(&mut bytes);
        return bytes;
    }
    POOL.with_borrow_mut(|(used, block)| {
        if *used + N > BLOCK {
            fill(block);
            *used = 0;
        }
        bytes.copy_from_slice(&block[*used..*used + N]);
        // Handed out once: wiped where it was.
        block[*used..*used + N].fill(0);
        *used += N;
    });
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_bytes_are_never_handed_out_twice() {
        let mut seen = std::collections::HashSet::new();
        // Several blocks' worth, across refills.
        for _ in 0..2000 {
            assert!(seen.insert(random::<16>()));
        }
        assert_eq!(random::<1024>().len(), 1024);
    }

    // RFC 7677, section 3.
    const CLIENT_NONCE: &str = "rOprNGfwEbeRWgbNEkqO";
    const SERVER_NONCE: &str = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";
    const SERVER_FIRST: &str =
        "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
    const CLIENT_FINAL: &str = "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
    const SERVER_FINAL: &str = "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=";

    fn rfc_verifier() -> Verifier {
        let salt = B64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        Verifier::from_password("pencil", &salt, 4096)
    }

    #[test]
    fn the_server_side_checks_the_rfc_exchange_and_recovers_the_client_key() {
        let first = format!("n,,n=user,r={CLIENT_NONCE}");
        let (exchange, server_first) =
            ServerExchange::start(rfc_verifier(), &first, SERVER_NONCE).unwrap();
        assert_eq!(server_first, SERVER_FIRST);
        let (server_final, client_key) = exchange.finish(CLIENT_FINAL).unwrap();
        assert_eq!(server_final, SERVER_FINAL);
        // The recovered key is the password's own.
        let salt = B64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        let salted = salted_password("pencil", &salt, 4096);
        assert_eq!(client_key, hmac(&salted, b"Client Key"));
    }

    #[test]
    fn a_wrong_proof_or_nonce_fails() {
        let first = format!("n,,n=user,r={CLIENT_NONCE}");
        let wrong = Verifier::from_password("pen", &rfc_verifier().salt, 4096);
        let (exchange, _) = ServerExchange::start(wrong, &first, SERVER_NONCE).unwrap();
        assert_eq!(exchange.finish(CLIENT_FINAL), Err(ScramError::BadProof));
        let (exchange, _) = ServerExchange::start(rfc_verifier(), &first, "other").unwrap();
        assert_eq!(exchange.finish(CLIENT_FINAL), Err(ScramError::Nonce));
        let plus = ServerExchange::start(rfc_verifier(), "p=tls-server-end-point,,n=,r=x", "y");
        assert_eq!(plus.unwrap_err(), ScramError::ChannelBinding);
        for junk in ["", "n,", "x,,r=1", "n,,n=u"] {
            assert!(
                ServerExchange::start(rfc_verifier(), junk, "s").is_err(),
                "{junk:?}"
            );
        }
    }

    #[test]
    fn the_client_side_answers_with_a_password_or_a_recovered_key() {
        // With the password: the RFC's client-final, and the server's signature checks out.
        let (mut c, first) =
            ClientExchange::start(Credential::Password("pencil".into()), CLIENT_NONCE);
        assert_eq!(first, format!("n,,n=,r={CLIENT_NONCE}"));
        let final_ = c.respond(SERVER_FIRST).unwrap();
        assert!(final_.starts_with("c=biws,r="));
        // (The RFC's proof covers "n=user"; ours covers "n=", as PostgreSQL clients send.)
        // A full round against patroxy's own server side, with the recovered key:
        let verifier = rfc_verifier();
        let (server, server_first) =
            ServerExchange::start(verifier.clone(), &first, SERVER_NONCE).unwrap();
        let (mut c, _) = ClientExchange::start(Credential::Password("pencil".into()), CLIENT_NONCE);
        let client_final = c.respond(&server_first).unwrap();
        let (server_final, client_key) = server.finish(&client_final).unwrap();
        c.finish(&server_final).unwrap();
        // Pass-through: the recovered key proves the same user to another server exchange.
        let credential = Credential::ClientKey {
            client_key,
            verifier: verifier.clone(),
        };
        let (mut relay, relay_first) = ClientExchange::start(credential, "abc");
        let (server, server_first) = ServerExchange::start(verifier, &relay_first, "def").unwrap();
        let client_final = relay.respond(&server_first).unwrap();
        let (server_final, _) = server.finish(&client_final).unwrap();
        relay.finish(&server_final).unwrap();
    }

    #[test]
    fn verifiers_round_trip_and_junk_is_refused() {
        let v = rfc_verifier();
        assert_eq!(Verifier::parse(&v.to_string()).unwrap(), v);
        for junk in [
            "",
            "md5abc",
            "SCRAM-SHA-256$x:y$z:w",
            "SCRAM-SHA-256$4096:AAAA$AAAA:AAAA",
        ] {
            assert!(Verifier::parse(junk).is_err(), "{junk:?}");
        }
        assert!(!format!("{v:?}").contains(&B64.encode(v.stored_key)));
    }

    #[test]
    fn a_server_error_or_a_forged_signature_is_refused() {
        let (mut c, _) = ClientExchange::start(Credential::Password("pencil".into()), CLIENT_NONCE);
        c.respond(SERVER_FIRST).unwrap();
        assert_eq!(
            c.finish("e=invalid-proof"),
            Err(ScramError::ServerError("invalid-proof".into()))
        );
        let (mut c, _) = ClientExchange::start(Credential::Password("pencil".into()), CLIENT_NONCE);
        c.respond(SERVER_FIRST).unwrap();
        assert_eq!(
            c.finish("v=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="),
            Err(ScramError::BadServerSignature)
        );
        let (mut c, _) = ClientExchange::start(Credential::Password("p".into()), "abc");
        assert_eq!(c.respond("r=xyz,s=AAAA,i=1"), Err(ScramError::Nonce));
    }
}
