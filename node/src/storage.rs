//! Event storage: columnar chunks in sled, and the partition state machine that writes them.

pub mod chunk;
pub mod partition;
