//! Entry points for the fuzz targets (`fuzz/`) and their property tests: each runs one of
//! patroxy's readers of untrusted bytes over any input, as the proxy would. Not an API.

use bytes::BytesMut;

use crate::auth::scram::{ServerExchange, Verifier};
use crate::protocol::classify::{Classifier, Seen};
use crate::protocol::frame::{long_frame, split_frame};
use crate::protocol::messages;
use crate::protocol::prepared::{
    ClientStatements, Naming, Reading, Responses, Rewriter, ServerStatements,
};

/// A client's SCRAM exchange before it has proven anything, as `client_auth.rs` reads it:
/// the body of its SASLInitialResponse, then its client-final message, against an
/// unknown user's mock verifier.
pub fn scram_server(initial: &[u8], client_final: &[u8]) {
    let Some((_, first)) = messages::sasl_initial_response(initial) else {
        return;
    };
    let Ok(first) = std::str::from_utf8(first) else {
        return;
    };
    let verifier = Verifier::mock("fuzz", &[7; 32]);
    let Ok((exchange, server_first)) = ServerExchange::start(verifier, first, "n0nce") else {
        return;
    };
    assert!(server_first.starts_with("r="));
    if let Ok(last) = std::str::from_utf8(client_final) {
        let _ = exchange.finish(last);
    }
}

/// A client's bytes through the transaction-mode rewriter: first as a batch patroxy may
/// answer itself between transactions, then frame by frame (a frame longer than `long`
/// as the pump sees its start); then `server_tags` as the server's answers.
pub fn rewrite(client: &[u8], long: usize, server_tags: &[u8]) {
    let (classifier, naming) = (Classifier::default(), Naming::default());
    let reading = Reading::plain(&naming, &classifier);
    let mut statements = ClientStatements::default();
    if let Some(reply) = statements.answer_locally(client, reading) {
        assert_eq!(reply.last(), Some(&b'I'), "ends with ReadyForQuery");
    }
    let mut server = ServerStatements::default();
    let mut seen = Seen::default();
    let mut responses = Responses::default();
    let mut rw = Rewriter {
        client: &mut statements,
        server: &mut server,
        capacity: 4,
        memory: 1 << 20,
        settings_held: 0,
        reading,
        seen: &mut seen,
        unsynced: false,
        in_failed_transaction: false,
    };
    let mut buf = BytesMut::from(client);
    loop {
        if let Ok(Some((tag, total))) = long_frame(&buf, long, 1 << 30) {
            if let Some((out, replaced)) = rw.rewrite_long(tag, &buf, total) {
                assert!(replaced <= buf.len() && replaced <= total);
                responses.extend(out.expect);
            }
            break;
        }
        let Ok(Some(frame)) = split_frame(&mut buf, 1 << 30) else {
            break;
        };
        let out = rw.rewrite(frame.tag, frame.body(), frame.bytes.clone());
        responses.extend(out.expect);
        let _ = rw.over_memory(0);
    }
    for &tag in server_tags {
        let _ = responses.route(tag);
        let _ = responses.due();
    }
    rw.forget(&responses.take_failed());
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    /// Client frames of the kinds the rewriter reads, with names from a small set (so
    /// that Binds find Parses), and some of any tag.
    fn client_frames() -> impl Strategy<Value = Vec<u8>> {
        let name = prop_oneof![Just(""), Just("s1"), Just("s2"), Just("patroxy_x")];
        let text = prop_oneof![
            Just("SELECT 1".to_owned()),
            Just("SET app.x = 'y'".to_owned()),
            Just("DEALLOCATE s1".to_owned()),
            Just("DISCARD ALL".to_owned()),
            "[ -~]{0,40}",
        ];
        let tag = prop_oneof![
            Just(b'P'),
            Just(b'B'),
            Just(b'D'),
            Just(b'C'),
            Just(b'Q'),
            Just(b'E'),
            Just(b'S'),
            Just(b'H'),
            Just(b'F'),
            Just(b'd'),
            any::<u8>(),
        ];
        let frame = (tag, name, text, prop::collection::vec(any::<u8>(), 0..12)).prop_map(
            |(tag, name, text, junk)| {
                let mut body = Vec::new();
                match tag {
                    b'P' => body.extend_from_slice(format!("{name}\0{text}\0\0\0").as_bytes()),
                    b'B' => body.extend_from_slice(format!("\0{name}\0\0\0\0\0\0\0").as_bytes()),
                    b'D' | b'C' => body.extend_from_slice(format!("S{name}\0").as_bytes()),
                    b'Q' => body.extend_from_slice(format!("{text}\0").as_bytes()),
                    _ => {}
                }
                body.extend_from_slice(&junk);
                let mut f = vec![tag];
                f.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
                f.extend_from_slice(&body);
                f
            },
        );
        prop::collection::vec(frame, 0..12).prop_map(|v| v.concat())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        #[test]
        fn the_rewriter_takes_any_client_bytes(
            frames in client_frames(),
            junk in prop::collection::vec(any::<u8>(), 0..64),
            cut in 0usize..400,
            long in prop_oneof![Just(16usize), Just(64 * 1024)],
            tags in prop::collection::vec(any::<u8>(), 0..24),
        ) {
            let mut bytes = frames;
            bytes.truncate(cut.max(1).min(bytes.len()));
            super::rewrite(&bytes, long, &tags);
            super::rewrite(&junk, long, &tags);
        }

        #[test]
        fn the_scram_server_takes_any_client_messages(
            first in "(n|y|p=x|n,a=u)?,,(n=[a-z]{0,4},)?(r=[ -~]{0,30})?(,[ -~]{0,10})?",
            last in "(c=(biws|eSws|[a-zA-Z0-9+/=]{0,8}),)?(r=[ -~]{0,40})?(,p=[a-zA-Z0-9+/=]{0,50})?",
            junk in prop::collection::vec(any::<u8>(), 0..64),
        ) {
            let mut initial = b"SCRAM-SHA-256\0".to_vec();
            initial.extend_from_slice(&(first.len() as i32).to_be_bytes());
            initial.extend_from_slice(first.as_bytes());
            super::scram_server(&initial, last.as_bytes());
            super::scram_server(&junk, &junk);
        }
    }
}
