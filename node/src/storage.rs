//! Event storage: columnar chunks (bodies in files, metadata in sled), the partition state
//! machine that writes them, and the group commit that feeds it.

pub mod batcher;
pub mod chunk;
pub mod chunk_files;
pub mod partition;
