//! The first packet a client sends: SSLRequest, GSSENCRequest, CancelRequest or StartupMessage.
//!
//! The length is checked before anything is reserved. pgwire decodes only an exactly-cut
//! packet whose length and shape are already known to be sane.

use bytes::{Bytes, BytesMut};
use pgwire::messages::cancel::CancelRequest;
use pgwire::messages::startup::Startup;
use pgwire::messages::{DecodeContext, Message, ProtocolVersion};

use super::codes;

/// The TLS record type of a handshake: a PostgreSQL 17 client with `sslnegotiation=direct`
/// opens with a ClientHello instead of an SSLRequest.
pub const TLS_HANDSHAKE_RECORD: u8 = 0x16;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StartupError {
    #[error("invalid length of startup packet: {0}")]
    BadLength(i64),
    #[error("unsupported frontend protocol {major}.{minor}: patroxy supports 3.0 to 3.2")]
    UnsupportedProtocol { major: u16, minor: u16 },
    #[error("invalid cancel request: length {0}")]
    BadCancel(usize),
    #[error("malformed startup packet")]
    Malformed,
    #[error("a direct TLS handshake arrived, but TLS is not enabled on this listener")]
    DirectTls,
}

impl StartupError {
    pub fn sqlstate(&self) -> &'static str {
        match self {
            StartupError::UnsupportedProtocol { .. } => codes::FEATURE_NOT_SUPPORTED,
            _ => codes::PROTOCOL_VIOLATION,
        }
    }
}

/// A cancel key exactly as the server issued it: a pid and a secret of 4 to 256 bytes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CancelKey {
    pub pid: i32,
    pub secret: Bytes,
}

/// What patroxy keeps of a StartupMessage: the untouched bytes to forward, the user and
/// database, and the other parameters (which pooled listeners apply to the server
/// connection they hand the client).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartupInfo {
    pub major: u16,
    pub minor: u16,
    pub user: Option<String>,
    pub database: Option<String>,
    /// The other parameters, by name.
    pub params: Vec<(String, String)>,
    pub raw: Bytes,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FirstPacket {
    SslRequest,
    GssEncRequest,
    Cancel(CancelKey),
    Startup(StartupInfo),
}

/// Parses one first packet off the front of `buf`. `Ok(None)` means "read more".
pub fn parse_first_packet(buf: &mut BytesMut) -> Result<Option<FirstPacket>, StartupError> {
    if buf.first() == Some(&TLS_HANDSHAKE_RECORD) {
        return Err(StartupError::DirectTls);
    }
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if len < 8 || len as usize > codes::MAX_STARTUP_PACKET_LEN {
        return Err(StartupError::BadLength(len.into()));
    }
    let len = len as usize;
    if buf.len() < len {
        return Ok(None);
    }
    let code = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]);
    let packet = buf.split_to(len);
    match code {
        codes::SSL_REQUEST_CODE | codes::GSSENC_REQUEST_CODE if len != 8 => {
            Err(StartupError::BadLength(len as i64))
        }
        codes::SSL_REQUEST_CODE => Ok(Some(FirstPacket::SslRequest)),
        codes::GSSENC_REQUEST_CODE => Ok(Some(FirstPacket::GssEncRequest)),
        codes::CANCEL_REQUEST_CODE => parse_cancel(packet).map(Some),
        _ => parse_startup(code, packet).map(Some),
    }
}

fn parse_cancel(mut packet: BytesMut) -> Result<FirstPacket, StartupError> {
    let len = packet.len();
    if !(16..=12 + codes::MAX_CANCEL_KEY_LEN).contains(&len) {
        return Err(StartupError::BadCancel(len));
    }
    // The context of protocol 3.2 decodes any key length (4 bytes is 3.0's key).
    let ctx = DecodeContext::new(ProtocolVersion::PROTOCOL3_2);
    match CancelRequest::decode(&mut packet, &ctx) {
        Ok(Some(req)) => Ok(FirstPacket::Cancel(CancelKey {
            pid: req.pid,
            secret: req.secret_key.to_bytes(),
        })),
        _ => Err(StartupError::BadCancel(len)),
    }
}

fn parse_startup(code: u32, packet: BytesMut) -> Result<FirstPacket, StartupError> {
    let (major, minor) = ((code >> 16) as u16, (code & 0xffff) as u16);
    if major != 3 {
        return Err(StartupError::UnsupportedProtocol { major, minor });
    }
    // A StartupMessage ends with an empty name: its last byte is the terminator.
    if packet.last() != Some(&0) {
        return Err(StartupError::Malformed);
    }
    let raw = packet.freeze();
    let mut copy = BytesMut::from(&raw[..]);
    let ctx = DecodeContext::new(ProtocolVersion::PROTOCOL3_2);
    let startup = match Startup::decode(&mut copy, &ctx) {
        Ok(Some(s)) => s,
        _ => return Err(StartupError::Malformed),
    };
    let mut params = startup.parameters;
    Ok(FirstPacket::Startup(StartupInfo {
        major,
        minor,
        user: params.remove("user"),
        database: params.remove("database"),
        params: params.into_iter().collect(),
        raw,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(code: u32, body: &[u8]) -> BytesMut {
        let mut v = BytesMut::new();
        v.extend_from_slice(&((body.len() + 8) as i32).to_be_bytes());
        v.extend_from_slice(&code.to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    fn parse(mut buf: BytesMut) -> Result<Option<FirstPacket>, StartupError> {
        parse_first_packet(&mut buf)
    }

    #[test]
    fn ssl_and_gssenc_requests() {
        assert_eq!(
            parse(packet(codes::SSL_REQUEST_CODE, b"")),
            Ok(Some(FirstPacket::SslRequest))
        );
        assert_eq!(
            parse(packet(codes::GSSENC_REQUEST_CODE, b"")),
            Ok(Some(FirstPacket::GssEncRequest))
        );
        assert!(parse(packet(codes::SSL_REQUEST_CODE, b"xx")).is_err());
    }

    #[test]
    fn startup_3_0_and_3_2_keep_the_raw_bytes() {
        for code in [codes::PROTOCOL_3_0, codes::PROTOCOL_3_2] {
            let wire = packet(code, b"user\0alice\0database\0app\0\0");
            let Some(FirstPacket::Startup(s)) = parse(wire.clone()).unwrap() else {
                panic!("not a startup");
            };
            assert_eq!((s.major, s.user.as_deref()), (3, Some("alice")));
            assert_eq!(s.database.as_deref(), Some("app"));
            assert_eq!(&s.raw[..], &wire[..]);
        }
    }

    #[test]
    fn the_packet_is_cut_exactly_and_what_follows_stays() {
        let mut wire = packet(codes::SSL_REQUEST_CODE, b"");
        wire.extend_from_slice(b"tail");
        assert_eq!(
            parse_first_packet(&mut wire),
            Ok(Some(FirstPacket::SslRequest))
        );
        assert_eq!(&wire[..], b"tail");
    }

    #[test]
    fn incomplete_packets_wait() {
        let wire = packet(codes::PROTOCOL_3_0, b"user\0a\0\0");
        for cut in 0..wire.len() {
            assert_eq!(parse(BytesMut::from(&wire[..cut])), Ok(None), "cut {cut}");
        }
    }

    #[test]
    fn cancel_requests_with_short_and_long_keys() {
        let mut body = 4242i32.to_be_bytes().to_vec();
        body.extend_from_slice(&[1, 2, 3, 4]);
        assert_eq!(
            parse(packet(codes::CANCEL_REQUEST_CODE, &body)),
            Ok(Some(FirstPacket::Cancel(CancelKey {
                pid: 4242,
                secret: Bytes::from_static(&[1, 2, 3, 4])
            })))
        );
        let mut long = 7i32.to_be_bytes().to_vec();
        long.extend_from_slice(&[9u8; 256]);
        assert!(matches!(
            parse(packet(codes::CANCEL_REQUEST_CODE, &long)),
            Ok(Some(FirstPacket::Cancel(k))) if k.secret.len() == 256
        ));
        for bad in [&body[..7], &[0u8; 4][..]] {
            assert!(parse(packet(codes::CANCEL_REQUEST_CODE, bad)).is_err());
        }
        let mut too_long = 7i32.to_be_bytes().to_vec();
        too_long.extend_from_slice(&[9u8; 257]);
        assert!(parse(packet(codes::CANCEL_REQUEST_CODE, &too_long)).is_err());
    }

    #[test]
    fn bad_lengths_are_refused_before_reading_on() {
        for len in [0i32, 4, 7, -1, i32::MIN, 10_001, i32::MAX] {
            let mut wire = BytesMut::new();
            wire.extend_from_slice(&len.to_be_bytes());
            assert_eq!(
                parse(wire),
                Err(StartupError::BadLength(len.into())),
                "{len}"
            );
        }
    }

    #[test]
    fn wrong_protocols_and_garbage() {
        assert_eq!(
            parse(packet(2 << 16, b"user\0a\0\0")),
            Err(StartupError::UnsupportedProtocol { major: 2, minor: 0 })
        );
        assert!(matches!(
            parse(BytesMut::from(&b"GET / HTTP/1.1\r\n\r\n"[..])),
            Err(StartupError::BadLength(_))
        ));
        assert_eq!(
            parse(BytesMut::from(&[0x16u8, 3, 1, 0, 200][..])),
            Err(StartupError::DirectTls)
        );
        assert_eq!(
            parse(packet(codes::PROTOCOL_3_0, b"user\0a")),
            Err(StartupError::Malformed)
        );
    }
}
