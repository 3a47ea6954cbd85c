//! Authentication patroxy performs itself, for pooled listeners where a server connection
//! is shared and authentication cannot be relayed end to end: SCRAM-SHA-256 both ways
//! (`scram.rs`), md5 (`md5.rs`), the secrets it checks against (`userlist.rs`, PgBouncer's
//! `auth_file` format) and the lookup of those the file lacks (`lookup.rs`, `auth_query`;
//! its answers kept a while in `cache.rs`). Pure, no I/O.

pub mod cache;
pub mod lookup;
pub mod md5;
pub mod scram;
pub mod userlist;

/// Whether `a` and `b` are equal, in a time that depends on their lengths only.
pub fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
