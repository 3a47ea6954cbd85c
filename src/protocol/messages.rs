//! The control messages patroxy writes (ErrorResponse, CancelRequest, an empty Query) and
//! reads (Authentication code, ParameterStatus, BackendKeyData, an ErrorResponse's fields).
//!
//! Each reader gets one exactly-cut frame body and checks its shape before pgwire sees it:
//! pgwire 0.42 reads past a frame's end, and panics on some malformed bodies.

use bytes::{BufMut, Bytes, BytesMut};
use pgwire::error::ErrorInfo;
use pgwire::messages::cancel::CancelRequest;
use pgwire::messages::response::ErrorResponse;
use pgwire::messages::startup::{BackendKeyData, ParameterStatus, SecretKey};
use pgwire::messages::{DecodeContext, Message, ProtocolVersion};

use super::codes;
use super::startup::CancelKey;

/// Severity of an ErrorResponse that patroxy synthesizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
        }
    }
}

/// Encodes an ErrorResponse frame.
pub fn error_response(severity: Severity, sqlstate: &str, message: &str) -> Bytes {
    let mut info = ErrorInfo::new(
        severity.as_str().to_owned(),
        sqlstate.to_owned(),
        message.to_owned(),
    );
    info.severity_nonlocalized = Some(severity.as_str().to_owned());
    let mut buf = BytesMut::with_capacity(64 + message.len());
    ErrorResponse::from(info)
        .encode(&mut buf)
        .expect("an ErrorResponse of a short message always encodes");
    buf.freeze()
}

/// Encodes a CancelRequest packet for `key`.
pub fn cancel_request(key: &CancelKey) -> Bytes {
    let secret = if key.secret.len() == 4 {
        SecretKey::I32(i32::from_be_bytes([
            key.secret[0],
            key.secret[1],
            key.secret[2],
            key.secret[3],
        ]))
    } else {
        SecretKey::Bytes(key.secret.clone())
    };
    let mut buf = BytesMut::with_capacity(16 + key.secret.len());
    CancelRequest::new(key.pid, secret)
        .encode(&mut buf)
        .expect("a parsed cancel key is 4 to 256 bytes and always encodes");
    buf.freeze()
}

/// An empty simple Query. The server answers EmptyQueryResponse and ReadyForQuery, and before
/// that a ParameterStatus for any reported setting that changed, such as `in_hot_standby`
/// after a promotion.
pub fn empty_query() -> Bytes {
    let mut buf = BytesMut::with_capacity(6);
    buf.put_u8(codes::QUERY);
    buf.put_i32(5);
    buf.put_u8(0);
    buf.freeze()
}

/// The code inside an Authentication (`R`) message.
pub fn auth_code(body: &[u8]) -> Option<u32> {
    let b: [u8; 4] = body.get(..4)?.try_into().ok()?;
    Some(u32::from_be_bytes(b))
}

/// Splits a body into NUL-terminated strings; `None` when one is not terminated.
fn cstrings(body: &[u8]) -> Option<Vec<&[u8]>> {
    if body.last() != Some(&0) {
        return None;
    }
    Some(body[..body.len() - 1].split(|b| *b == 0).collect())
}

fn ctx() -> DecodeContext {
    DecodeContext::new(ProtocolVersion::PROTOCOL3_2)
}

/// Rebuilds a whole frame around `body`, so that pgwire reads exactly that frame.
fn framed(tag: u8, body: &[u8]) -> BytesMut {
    let mut buf = BytesMut::with_capacity(5 + body.len());
    buf.put_u8(tag);
    buf.put_i32(body.len() as i32 + 4);
    buf.put_slice(body);
    buf
}

/// A ParameterStatus body: exactly a name and a value.
pub fn parameter_status(body: &[u8]) -> Option<(String, String)> {
    if cstrings(body)?.len() != 2 {
        return None;
    }
    let ps = ParameterStatus::decode(&mut framed(codes::PARAMETER_STATUS, body), &ctx()).ok()??;
    Some((ps.name, ps.value))
}

/// A BackendKeyData body: a pid and a secret of 4 to 256 bytes.
pub fn backend_key(body: &[u8]) -> Option<CancelKey> {
    if !(8..=8 + codes::MAX_CANCEL_KEY_LEN).contains(&body.len()) {
        return None;
    }
    let k = BackendKeyData::decode(&mut framed(codes::BACKEND_KEY_DATA, body), &ctx()).ok()??;
    Some(CancelKey {
        pid: k.pid,
        secret: k.secret_key.to_bytes(),
    })
}

/// The fields of an ErrorResponse that patroxy acts on or logs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ErrorFields {
    pub severity: String,
    pub sqlstate: String,
    pub message: String,
}

/// An ErrorResponse body: fields of a type byte and a string, then a terminating NUL.
pub fn error_fields(body: &[u8]) -> Option<ErrorFields> {
    let strings = cstrings(body)?;
    // After the fields' strings comes the empty terminator; each field is non-empty.
    let (last, fields) = strings.split_last()?;
    if !last.is_empty() || fields.iter().any(|f| f.is_empty()) {
        return None;
    }
    let resp = ErrorResponse::decode(&mut framed(codes::ERROR_RESPONSE, body), &ctx()).ok()??;
    let mut out = ErrorFields::default();
    for (code, value) in resp.fields {
        match code {
            b'V' => out.severity = value,
            b'S' if out.severity.is_empty() => out.severity = value,
            b'C' => out.sqlstate = value,
            b'M' => out.message = value,
            _ => {}
        }
    }
    Some(out)
}

/// Any pgwire message, encoded as a whole frame.
pub fn encode<M: Message>(m: &M) -> Bytes {
    let mut buf = BytesMut::new();
    m.encode(&mut buf).expect("patroxy's own messages encode");
    buf.freeze()
}

/// A frame with this tag and body.
pub fn frame(tag: u8, body: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(5 + body.len());
    out.put_u8(tag);
    out.put_u32(body.len() as u32 + 4);
    out.put_slice(body);
    out.freeze()
}

/// A Parse of the statement `name` with its parameter types.
pub fn parse(name: &str, sql: &str, oids: &[u32]) -> Bytes {
    let mut body = BytesMut::with_capacity(name.len() + sql.len() + 4 + 4 * oids.len());
    body.put_slice(name.as_bytes());
    body.put_u8(0);
    body.put_slice(sql.as_bytes());
    body.put_u8(0);
    body.put_u16(oids.len() as u16);
    for oid in oids {
        body.put_u32(*oid);
    }
    frame(codes::PARSE, &body)
}

/// A Bind of the unnamed portal to the unnamed statement, with text parameters (`None` is
/// NULL) and text results.
pub fn bind_unnamed(params: &[Option<&str>]) -> Bytes {
    let mut body = BytesMut::new();
    body.put_slice(&[0, 0]); // portal, statement: both unnamed
    body.put_u16(0); // parameter formats: all text
    body.put_u16(params.len() as u16);
    for p in params {
        match p {
            Some(v) => {
                body.put_i32(v.len() as i32);
                body.put_slice(v.as_bytes());
            }
            None => body.put_i32(-1),
        }
    }
    body.put_u16(0); // result formats: all text
    frame(codes::BIND, &body)
}

/// An Execute of the unnamed portal, every row, then a Sync: the end of a request.
pub fn execute_unnamed_and_sync() -> [u8; 15] {
    [
        codes::EXECUTE,
        0,
        0,
        0,
        9,
        0,
        0,
        0,
        0,
        0,
        codes::SYNC,
        0,
        0,
        0,
        4,
    ]
}

/// A backend NegotiateProtocolVersion: the newest protocol version (the whole number, as
/// PostgreSQL sends it) for the one the client asked for, and the protocol options
/// (`_pq_.`) not recognized.
pub fn negotiate_protocol_version(newest: u32, unrecognized: &[&str]) -> Bytes {
    let mut body = BytesMut::new();
    body.put_u32(newest);
    body.put_u32(unrecognized.len() as u32);
    for name in unrecognized {
        body.put_slice(name.as_bytes());
        body.put_u8(0);
    }
    frame(codes::NEGOTIATE_PROTOCOL_VERSION, &body)
}

/// A Close of the prepared statement `name`.
pub fn close_statement(name: &str) -> Bytes {
    let mut body = Vec::with_capacity(name.len() + 2);
    body.push(b'S');
    body.extend_from_slice(name.as_bytes());
    body.push(0);
    frame(codes::CLOSE, &body)
}

/// A simple Query.
pub fn query(sql: &str) -> Bytes {
    encode(&pgwire::messages::simplequery::Query::new(sql.to_owned()))
}

/// An Authentication (`R`) body's code and what follows it.
pub fn auth_payload(body: &[u8]) -> Option<(u32, &[u8])> {
    Some((auth_code(body)?, &body[4..]))
}

/// A PasswordMessage body (cleartext or md5): the string before its NUL.
pub fn password(body: &[u8]) -> Option<&str> {
    match cstrings(body)?.as_slice() {
        [p] => std::str::from_utf8(p).ok(),
        _ => None,
    }
}

/// A SASLInitialResponse body: the mechanism, and the initial data (empty when -1).
pub fn sasl_initial_response(body: &[u8]) -> Option<(&str, &[u8])> {
    let nul = body.iter().position(|b| *b == 0)?;
    let mechanism = std::str::from_utf8(&body[..nul]).ok()?;
    let rest = &body[nul + 1..];
    let len = i32::from_be_bytes(rest.get(..4)?.try_into().ok()?);
    let data = &rest[4..];
    match len {
        -1 if data.is_empty() => Some((mechanism, &[])),
        n if n >= 0 && n as usize == data.len() => Some((mechanism, data)),
        _ => None,
    }
}

/// A frontend SASLInitialResponse (`p`).
pub fn sasl_initial(mechanism: &str, data: &[u8]) -> Bytes {
    use pgwire::messages::startup::SASLInitialResponse;
    let m = SASLInitialResponse::new(mechanism.to_owned(), Some(Bytes::copy_from_slice(data)));
    encode(&m)
}

/// A frontend SASLResponse (`p`).
pub fn sasl_response(data: &[u8]) -> Bytes {
    use pgwire::messages::startup::SASLResponse;
    encode(&SASLResponse::new(Bytes::copy_from_slice(data)))
}

/// A frontend PasswordMessage (`p`): cleartext or md5.
pub fn password_message(password: &str) -> Bytes {
    encode(&pgwire::messages::startup::Password::new(
        password.to_owned(),
    ))
}

/// A StartupMessage 3.0 with these parameters.
pub fn startup(params: &[(&str, &str)]) -> Bytes {
    let mut s = pgwire::messages::startup::Startup::new();
    for (k, v) in params {
        s.parameters.insert((*k).to_owned(), (*v).to_owned());
    }
    encode(&s)
}

/// Appends a backend ParameterStatus to `out`.
pub fn put_parameter_status(out: &mut BytesMut, name: &str, value: &str) {
    out.put_u8(codes::PARAMETER_STATUS);
    out.put_i32((4 + name.len() + 1 + value.len() + 1) as i32);
    out.put_slice(name.as_bytes());
    out.put_u8(0);
    out.put_slice(value.as_bytes());
    out.put_u8(0);
}

/// A backend BackendKeyData with patroxy's own key.
pub fn backend_key_data(key: &CancelKey) -> Bytes {
    let secret = SecretKey::Bytes(key.secret.clone());
    encode(&BackendKeyData::new(key.pid, secret))
}

/// A backend ReadyForQuery saying idle.
pub fn ready_for_query_idle() -> Bytes {
    use pgwire::messages::response::{ReadyForQuery, TransactionStatus};
    encode(&ReadyForQuery::new(TransactionStatus::Idle))
}

/// A backend Authentication message.
pub fn authentication(a: pgwire::messages::startup::Authentication) -> Bytes {
    encode(&a)
}

/// A DataRow body: each column as text, `None` for NULL; `None` when malformed.
pub fn data_row(body: &[u8]) -> Option<Vec<Option<String>>> {
    let n = u16::from_be_bytes(body.get(..2)?.try_into().ok()?) as usize;
    let mut rest = &body[2..];
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let len = i32::from_be_bytes(rest.get(..4)?.try_into().ok()?);
        rest = &rest[4..];
        if len < 0 {
            out.push(None);
            continue;
        }
        let v = rest.get(..len as usize)?;
        out.push(Some(String::from_utf8_lossy(v).into_owned()));
        rest = &rest[len as usize..];
    }
    rest.is_empty().then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_parse_carries_its_name_text_and_types() {
        let frame = parse("s1", "SELECT $1", &[23]);
        assert_eq!(
            &frame[..],
            b"P\0\0\0\x17s1\0SELECT $1\0\0\x01\0\0\0\x17".as_slice()
        );
        let close = close_statement("s1");
        assert_eq!(&close[..], b"C\0\0\0\x08Ss1\0".as_slice());
        let bind = bind_unnamed(&[Some("ab"), None]);
        assert_eq!(
            &bind[..],
            b"B\0\0\0\x16\0\0\0\0\0\x02\0\0\0\x02ab\xff\xff\xff\xff\0\0".as_slice()
        );
    }

    #[test]
    fn parameter_status_encodes_as_pgwire_does() {
        let mut ours = BytesMut::new();
        put_parameter_status(&mut ours, "TimeZone", "UTC");
        let theirs = encode(&ParameterStatus::new("TimeZone".into(), "UTC".into()));
        assert_eq!(&ours[..], &theirs[..]);
        assert_eq!(
            parameter_status(&ours[5..]),
            Some(("TimeZone".into(), "UTC".into()))
        );
    }

    #[test]
    fn data_rows_are_read_with_their_bounds_checked() {
        let body = [0, 2, 0, 0, 0, 1, b'a', 0xff, 0xff, 0xff, 0xff];
        assert_eq!(data_row(&body), Some(vec![Some("a".into()), None]));
        assert_eq!(data_row(&body[..6]), None);
        assert_eq!(data_row(&[0, 1, 0x7f, 0, 0, 0]), None);
        let mut trailing = body.to_vec();
        trailing.push(0);
        assert_eq!(data_row(&trailing), None);
    }
    use crate::protocol::frame::split_frame;

    #[test]
    fn synthesized_errors_read_back() {
        let wire = error_response(Severity::Fatal, codes::ADMIN_SHUTDOWN, "primary changed");
        let frame = split_frame(&mut BytesMut::from(&wire[..]), 4096)
            .unwrap()
            .unwrap();
        assert_eq!(frame.tag, codes::ERROR_RESPONSE);
        assert_eq!(
            error_fields(frame.body()),
            Some(ErrorFields {
                severity: "FATAL".into(),
                sqlstate: "57P01".into(),
                message: "primary changed".into()
            })
        );
    }

    #[test]
    fn malformed_error_bodies_are_refused_not_panicked_on() {
        for body in [
            &b""[..],
            b"\0\0",
            b"C57P03\0",
            b"C57P03",
            b"\0C57P03\0\0",
            b"S",
        ] {
            assert_eq!(error_fields(body), None, "{body:?}");
        }
        assert!(
            error_fields(b"\0").is_some(),
            "no fields at all is well-formed"
        );
    }

    #[test]
    fn backend_keys_of_every_length() {
        let mut body = 99i32.to_be_bytes().to_vec();
        body.extend_from_slice(&[1, 2, 3, 4]);
        let key = backend_key(&body).unwrap();
        assert_eq!((key.pid, &key.secret[..]), (99, &[1u8, 2, 3, 4][..]));
        body.extend_from_slice(&[5u8; 28]);
        assert_eq!(backend_key(&body).unwrap().secret.len(), 32);
        assert_eq!(backend_key(&[0, 0, 0, 1]), None, "a K with no secret");
        assert_eq!(backend_key(&[0u8; 8 + 257]), None);
    }

    #[test]
    fn cancel_requests_round_trip() {
        use crate::protocol::startup::{parse_first_packet, FirstPacket};
        for secret in [vec![1u8, 2, 3, 4], vec![7u8; 32]] {
            let key = CancelKey {
                pid: 1234,
                secret: Bytes::from(secret),
            };
            let wire = cancel_request(&key);
            let parsed = parse_first_packet(&mut BytesMut::from(&wire[..]));
            assert_eq!(parsed, Ok(Some(FirstPacket::Cancel(key))));
        }
    }

    #[test]
    fn parameter_status_needs_exactly_two_strings() {
        assert_eq!(
            parameter_status(b"in_hot_standby\0on\0"),
            Some(("in_hot_standby".into(), "on".into()))
        );
        assert_eq!(parameter_status(b"in_hot_standby\0on"), None);
        assert_eq!(parameter_status(b"a\0b\0c\0"), None);
    }

    #[test]
    fn auth_codes() {
        assert_eq!(auth_code(&[0, 0, 0, 0]), Some(codes::AUTH_OK));
        assert_eq!(auth_code(&[0, 0, 0, 10, b'S']), Some(10));
        assert_eq!(auth_code(&[0, 0]), None);
    }
}
