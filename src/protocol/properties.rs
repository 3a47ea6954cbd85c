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

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

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
