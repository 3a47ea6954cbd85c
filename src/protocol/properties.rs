//! Property tests of the parsers: no input makes them panic, and what they report does not
//! depend on how the bytes were cut into reads.

use bytes::BytesMut;
use proptest::prelude::*;

use super::frame::{split_frame, Scanner, Seen, MAX_DECLARED_LEN};
use super::messages;
use super::startup::parse_first_packet;

fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    v.extend_from_slice(body);
    v
}

fn frames() -> impl Strategy<Value = Vec<(u8, Vec<u8>)>> {
    prop::collection::vec(
        (any::<u8>(), prop::collection::vec(any::<u8>(), 0..300)),
        0..20,
    )
}

fn scan_chunks(chunks: &[&[u8]]) -> Result<(Vec<Seen>, bool), super::FrameError> {
    let mut s = Scanner::new(MAX_DECLARED_LEN);
    let mut seen = Vec::new();
    for c in chunks {
        s.scan(c, |e| seen.push(e))?;
    }
    Ok((seen, s.at_boundary()))
}

/// First packets with a well-formed length prefix (or one off by a little): one of the known
/// codes or any other, a body of random bytes or of `key\0value\0` pairs, and trailing bytes.
/// Returns the bytes and the length the prefix declares.
fn first_packets() -> impl Strategy<Value = (Vec<u8>, usize, bool)> {
    let code = prop_oneof![
        Just(80_877_103u32),
        Just(80_877_104),
        Just(80_877_102),
        Just(196_608),
        Just(196_610),
        any::<u32>(),
    ];
    let pairs = prop::collection::vec(("[a-z_]{1,12}", "[ -~]{0,16}"), 0..6).prop_map(|kv| {
        let mut b = Vec::new();
        for (k, v) in kv {
            b.extend_from_slice(k.as_bytes());
            b.push(0);
            b.extend_from_slice(v.as_bytes());
            b.push(0);
        }
        b.push(0);
        b
    });
    let body = prop_oneof![prop::collection::vec(any::<u8>(), 0..64), pairs];
    let skew = prop_oneof![4 => Just(0i64), 1 => -3i64..=3];
    let trailing = prop::collection::vec(any::<u8>(), 0..16);
    (code, body, skew, trailing).prop_map(|(code, body, skew, trailing)| {
        let declared = ((8 + body.len()) as i64 + skew).max(0) as usize;
        let mut p = (declared as u32).to_be_bytes().to_vec();
        p.extend_from_slice(&code.to_be_bytes());
        p.extend_from_slice(&body);
        p.extend_from_slice(&trailing);
        (p, declared, skew == 0)
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn well_framed_first_packets_are_decided_and_cut_exactly((bytes, declared, exact) in first_packets()) {
        let mut buf = BytesMut::from(&bytes[..]);
        match parse_first_packet(&mut buf) {
            Ok(Some(_)) => prop_assert_eq!(bytes.len() - buf.len(), declared, "consumes what it declares"),
            // A whole, exactly framed packet is always decided: accepted or refused.
            Ok(None) => prop_assert!(!exact || declared > bytes.len(), "a whole packet left undecided"),
            Err(_) => {}
        }
    }

    #[test]
    fn first_packet_parsing_never_panics_and_consumes_what_it_says(bytes in prop::collection::vec(any::<u8>(), 0..12_000)) {
        let mut buf = BytesMut::from(&bytes[..]);
        match parse_first_packet(&mut buf) {
            Ok(None) => prop_assert_eq!(buf.len(), bytes.len(), "incomplete input must stay"),
            Ok(Some(_)) => {
                let declared = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
                prop_assert_eq!(bytes.len() - buf.len(), declared);
            }
            Err(_) => {}
        }
    }

    #[test]
    fn the_scanner_never_panics_and_ignores_read_boundaries(
        bytes in prop::collection::vec(any::<u8>(), 0..2_000),
        cut in any::<prop::sample::Index>(),
    ) {
        let at = cut.index(bytes.len() + 1);
        let whole = scan_chunks(&[&bytes]);
        let split = scan_chunks(&[&bytes[..at], &bytes[at..]]);
        prop_assert_eq!(whole.is_ok(), split.is_ok());
        if let (Ok(w), Ok(s)) = (whole, split) {
            prop_assert_eq!(w, s);
        }
    }

    #[test]
    fn valid_streams_are_followed_exactly(fs in frames(), cut in any::<prop::sample::Index>()) {
        let wire: Vec<u8> = fs.iter().flat_map(|(t, b)| frame(*t, b)).collect();
        let at = cut.index(wire.len() + 1);
        let (seen, at_boundary) = scan_chunks(&[&wire[..at], &wire[at..]]).unwrap();
        let headers: Vec<(u8, usize)> = seen
            .iter()
            .filter_map(|e| match e {
                Seen::Header { tag, len } => Some((*tag, *len)),
                Seen::ReadyForQuery(_) => None,
            })
            .collect();
        let expected: Vec<(u8, usize)> = fs.iter().map(|(t, b)| (*t, b.len() + 4)).collect();
        prop_assert_eq!(headers, expected);
        prop_assert!(at_boundary);

        let mut buf = BytesMut::from(&wire[..]);
        for (tag, body) in &fs {
            let f = split_frame(&mut buf, MAX_DECLARED_LEN).unwrap().unwrap();
            prop_assert_eq!(f.tag, *tag);
            prop_assert_eq!(f.body(), &body[..]);
        }
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn control_message_readers_never_panic(body in prop::collection::vec(any::<u8>(), 0..400)) {
        let _ = messages::error_fields(&body);
        let _ = messages::parameter_status(&body);
        let _ = messages::backend_key(&body);
        let _ = messages::auth_code(&body);
    }
}
