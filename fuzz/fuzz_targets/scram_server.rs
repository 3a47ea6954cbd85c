//! Any bytes as a client's SASLInitialResponse and client-final message, before it has
//! proven anything: the SCRAM server's readers.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The two messages, split at the first 0xff (never in valid UTF-8).
    let cut = data.iter().position(|b| *b == 0xff).unwrap_or(data.len());
    let (initial, last) = data.split_at(cut);
    patroxy::fuzzing::scram_server(initial, last.get(1..).unwrap_or_default());
});
