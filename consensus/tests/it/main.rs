//! Integration tests of the consensus crate: openraft's storage suite against the WAL log store
//! and the state-machine adapter, and in-process multi-raft clusters over the local router and
//! over real QUIC sockets with mutual TLS.

mod cluster;
mod kv;
mod t10_storage_suite;
mod t20_multi_raft;
mod t30_quic;
