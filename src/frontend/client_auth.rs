//! patroxy authenticating a client itself, for pooled listeners: SCRAM-SHA-256 against a
//! verifier (from the `auth_file`, or derived from a password there), md5 against an md5
//! secret, or trust for `auth.trust` addresses. An unknown user goes through a SCRAM
//! exchange with a mock verifier and fails exactly as a wrong password does: its salt is
//! fixed by its name (as a real user's stored salt is), and making it costs no PBKDF2, so
//! neither the salt nor the time to the first answer tells names apart. (A user with an
//! md5 secret is asked for md5: the method tells it apart.) The result says how patroxy will log in to PostgreSQL as that user.

use std::net::IpAddr;

use bytes::BytesMut;
use pgwire::messages::startup::Authentication;
use tokio::io::AsyncReadExt;

use super::context::ClientAuth;
use crate::auth::md5;
use crate::auth::scram::{self, Credential, ServerExchange, Verifier};
use crate::auth::userlist::Secret;
use crate::backend::conn::Login;
use crate::protocol::codes;
use crate::protocol::frame::{split_frame, Frame};
use crate::protocol::messages;
use crate::stream::{send, Stream};

/// Authentication messages are small: PostgreSQL caps them at 64 KiB too.
const AUTH_FRAME_LIMIT: usize = 65_536;

#[derive(Debug, thiserror::Error)]
pub enum AuthFailure {
    /// Wrong password or unknown user: the same words for both.
    #[error("password authentication failed for user \"{0}\"")]
    Password(String),
    #[error("{0}")]
    Protocol(String),
    #[error("client: {0}")]
    Io(#[from] std::io::Error),
    #[error("the client closed the connection during authentication")]
    Gone,
}

impl AuthFailure {
    pub fn label(&self) -> &'static str {
        match self {
            AuthFailure::Password(_) => "bad_password",
            AuthFailure::Protocol(_) => "auth_protocol",
            AuthFailure::Io(_) => "client_error",
            AuthFailure::Gone => "client_gone",
        }
    }

    /// What the client is told, if it can still hear it.
    pub fn client_error(&self) -> Option<(&'static str, String)> {
        match self {
            AuthFailure::Password(_) => Some((codes::INVALID_PASSWORD, self.to_string())),
            AuthFailure::Protocol(_) => {
                Some((codes::PROTOCOL_VIOLATION, format!("patroxy: {self}")))
            }
            AuthFailure::Io(_) | AuthFailure::Gone => None,
        }
    }
}

/// Authenticates `user` coming from `ip` (let in without a password if `trust` has it). On
/// success, returns how to log in as the user, and what the client is still owed
/// (SASLFinal, AuthenticationOk): the caller sends it with the greeting, in one write.
/// `secret` is the user's, from the auth_file or the auth_query; `None` for an unknown user.
pub async fn authenticate(
    client: &mut Stream,
    buf: &mut BytesMut,
    (user, ip): (&str, IpAddr),
    auth: &ClientAuth,
    trust: &[crate::allow::Cidr],
    secret: Option<&Secret>,
) -> Result<(Login, BytesMut), AuthFailure> {
    let mut owed = BytesMut::new();
    let trusted = !trust.is_empty() && crate::allow::allowed(trust, ip);
    let login = if trusted {
        // No proof from the client; to the server, whatever the file holds.
        match secret {
            Some(Secret::Plain(p)) => Login::Scram(Credential::Password(p.clone())),
            Some(Secret::Md5(s)) => Login::Md5(s.clone()),
            Some(Secret::Scram(_)) | None => Login::Trust,
        }
    } else {
        // Made for every user asked for a password, known or not, so both take the same
        // time to the first answer.
        let mock = Verifier::mock(user, &auth.mock_key);
        match secret {
            Some(Secret::Md5(stored)) => {
                md5_exchange(client, buf, user, stored).await?;
                Login::Md5(stored.clone())
            }
            Some(Secret::Scram(v)) => {
                let client_key = scram_exchange(client, buf, user, v.clone(), &mut owed).await?;
                Login::Scram(Credential::ClientKey {
                    client_key,
                    verifier: v.clone(),
                })
            }
            Some(Secret::Plain(p)) => {
                let v = plain_verifier(auth, user, p).await?;
                scram_exchange(client, buf, user, v, &mut owed).await?;
                Login::Scram(Credential::Password(p.clone()))
            }
            None => {
                // A verifier nobody knows the password of, with the salt this name always
                // gets: the exchange runs as for a real user, and fails.
                scram_exchange(client, buf, user, mock, &mut owed).await?;
                return Err(AuthFailure::Password(user.to_owned()));
            }
        }
    };
    owed.extend_from_slice(&messages::authentication(Authentication::Ok));
    Ok((login, owed))
}

/// A password user's verifier under its mock salt: made when the file was read, or (a
/// password `auth_query` found) now, on a blocking thread.
async fn plain_verifier(
    auth: &ClientAuth,
    user: &str,
    password: &str,
) -> Result<Verifier, AuthFailure> {
    if let Some(v) = auth.verifiers.get(user) {
        return Ok(v.clone());
    }
    let salt = scram::mock_salt(user, &auth.mock_key);
    let password = password.to_owned();
    let derive = move || Verifier::from_password(&password, &salt, scram::MOCK_ITERATIONS);
    tokio::task::spawn_blocking(derive)
        .await
        .map_err(|e| AuthFailure::Protocol(e.to_string()))
}

/// The client's next message, which must be a password-family message (`p`).
async fn password_frame(client: &mut Stream, buf: &mut BytesMut) -> Result<Frame, AuthFailure> {
    loop {
        let split = split_frame(buf, AUTH_FRAME_LIMIT);
        match split.map_err(|e| AuthFailure::Protocol(e.to_string()))? {
            Some(f) if f.tag == PASSWORD_MESSAGE => return Ok(f),
            Some(f) => {
                return Err(AuthFailure::Protocol(format!(
                    "expected a password message, got {:?}",
                    f.tag as char
                )))
            }
            None => {
                if client.read_buf(buf).await? == 0 {
                    return Err(AuthFailure::Gone);
                }
            }
        }
    }
}

const PASSWORD_MESSAGE: u8 = b'p';

async fn md5_exchange(
    client: &mut Stream,
    buf: &mut BytesMut,
    user: &str,
    stored: &str,
) -> Result<(), AuthFailure> {
    let salt: [u8; 4] = scram::random();
    let ask = Authentication::MD5Password(salt.to_vec());
    send(client, &messages::authentication(ask)).await?;
    let frame = password_frame(client, buf).await?;
    let answer = messages::password(frame.body())
        .ok_or_else(|| AuthFailure::Protocol("a malformed password message".into()))?;
    match md5::verify(stored, salt, answer) {
        true => Ok(()),
        false => Err(AuthFailure::Password(user.to_owned())),
    }
}

/// Runs SCRAM-SHA-256 as the server; the client's ClientKey when its proof holds, with the
/// SASLFinal it is owed put in `owed`.
async fn scram_exchange(
    client: &mut Stream,
    buf: &mut BytesMut,
    user: &str,
    verifier: Verifier,
    owed: &mut BytesMut,
) -> Result<[u8; 32], AuthFailure> {
    let protocol = |what: &str| AuthFailure::Protocol(format!("SCRAM: {what}"));
    let offer = Authentication::SASL(vec![scram::MECHANISM.to_owned()]);
    send(client, &messages::authentication(offer)).await?;
    let frame = password_frame(client, buf).await?;
    let (mechanism, first) = messages::sasl_initial_response(frame.body())
        .ok_or_else(|| protocol("a malformed SASLInitialResponse"))?;
    if mechanism != scram::MECHANISM {
        return Err(protocol(
            "the client chose a mechanism that was not offered",
        ));
    }
    let first = std::str::from_utf8(first).map_err(|_| protocol("not UTF-8"))?;
    let (exchange, server_first) = ServerExchange::start(verifier, first, &scram::nonce())
        .map_err(|e| AuthFailure::Protocol(e.to_string()))?;
    let next = Authentication::SASLContinue(server_first.into_bytes().into());
    send(client, &messages::authentication(next)).await?;
    let frame = password_frame(client, buf).await?;
    let last = std::str::from_utf8(frame.body()).map_err(|_| protocol("not UTF-8"))?;
    match exchange.finish(last) {
        Ok((server_final, client_key)) => {
            let done = Authentication::SASLFinal(server_final.into_bytes().into());
            owed.extend_from_slice(&messages::authentication(done));
            Ok(client_key)
        }
        Err(scram::ScramError::BadProof) => Err(AuthFailure::Password(user.to_owned())),
        Err(e) => Err(AuthFailure::Protocol(e.to_string())),
    }
}
