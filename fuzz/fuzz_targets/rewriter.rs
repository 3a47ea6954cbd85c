//! Any bytes as a transaction-pooled client's messages through the rewriter (and as a
//! batch patroxy may answer itself), then any server tags as the answers.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&how, rest)) = data.split_first() else {
        return;
    };
    let long = if how & 1 == 0 { 16 } else { 64 * 1024 };
    let tags = usize::from(how >> 1).min(rest.len());
    let (client, server_tags) = rest.split_at(rest.len() - tags);
    patroxy::fuzzing::rewrite(client, long, server_tags);
});
