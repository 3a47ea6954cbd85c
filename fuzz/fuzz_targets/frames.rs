//! Any bytes through the relay's frame scanner, in two reads, and through the splitter.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use patroxy::protocol::frame::{split_frame, Scanner, MAX_DECLARED_LEN};

fuzz_target!(|data: &[u8]| {
    let cut = data.first().map_or(0, |b| *b as usize).min(data.len());
    let mut s = Scanner::new(MAX_DECLARED_LEN);
    let mut n = 0usize;
    if s.scan(&data[..cut], |_| n += 1).is_ok() {
        let _ = s.scan(&data[cut..], |_| n += 1);
    }
    let mut buf = BytesMut::from(data);
    while let Ok(Some(f)) = split_frame(&mut buf, 1 << 20) {
        assert!(f.bytes.len() >= 5);
    }
});
