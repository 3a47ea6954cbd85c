//! The PostgreSQL wire protocol as patroxy needs it: frame splitting by header, first-packet
//! parsing, the few control messages it reads or writes, the renaming of prepared
//! statements for transaction pooling, and what a statement does to its session
//! (`classify.rs`). Nothing here does I/O.

pub mod classify;
pub mod codes;
pub mod frame;
pub mod messages;
pub mod prepared;
pub mod startup;

#[cfg(test)]
mod properties;

pub use frame::{FrameError, Scanner};
pub use startup::{FirstPacket, StartupError};
