//! Any bytes as a client's first packet(s): parsing must not panic, and must consume exactly
//! what it reports.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use patroxy::protocol::startup::parse_first_packet;

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    // Like a session: parse packets until one is incomplete or wrong.
    while let Ok(Some(_)) = parse_first_packet(&mut buf) {}
});
