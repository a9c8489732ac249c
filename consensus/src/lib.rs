//! Multi-raft machinery over openraft, generic over what is replicated.
//!
//! One write-ahead log per process ([`wal`]) holds every group's Raft log, vote and commit
//! markers; one sled database holds the state machines' data (owned by the crate that owns the
//! data) and their snapshots. A group is one openraft `Raft` instance; the metadata group and
//! every partition are groups.
//!
//! What this crate knows: the log with group commit ([`wal`], [`log_store`]), an adapter from
//! openraft's state-machine traits to a small deterministic [`StateMachineCore`]
//! ([`state_machine`]), the transport abstraction that carries RPCs of every group between
//! nodes ([`network`]) with its QUIC implementation ([`quic`]) and the cluster's certificates
//! ([`tls`]), fast failover after a leader dies (`failover`), leader transfer ([`transfer`]), and
//! starting groups ([`group`]). What it does not know: events, persons,
//! projects. Those live with the state machines in the node crate.

// openraft's error types (StorageError, RPCError) are large by design and fixed by its trait
// signatures; boxing them only at our own boundaries would not make the hot paths cheaper.
#![allow(clippy::result_large_err)]

pub mod error;
mod failover;
pub mod group;
pub mod log_store;
pub mod network;
pub mod quic;
pub mod state_machine;
pub mod tls;
pub mod transfer;
pub mod wal;

use serde::{Deserialize, Serialize};
use std::fmt;
use std::io::Cursor;

pub use error::{Error, Result};
pub use group::{GroupConfig, drop_group_storage, start_group};
pub use log_store::{NodeStorage, WalLogStore};
pub use network::{LocalRouter, NetworkFactory, RaftTransport};
pub use quic::{LeaderError, QuicTransport};
pub use state_machine::{StateMachineCore, StateMachineStore};
pub use wal::{Wal, WalError, WalOptions};

/// A replicated command: opaque bytes that the group's state machine decodes.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Command(#[serde(with = "serde_bytes")] pub Vec<u8>);

/// The state machine's answer to a command, opaque bytes as well.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Response(#[serde(with = "serde_bytes")] pub Vec<u8>);

/// The addresses a node is reached at.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct NodeAddr {
    /// Raft transport address.
    pub raft: String,
    /// HTTP API address.
    pub http: String,
    /// Arrow Flight address.
    pub flight: String,
}

impl fmt::Display for NodeAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "raft={} http={} flight={}",
            self.raft, self.http, self.flight
        )
    }
}

/// A Raft group: the metadata group is 0, partition `p` is `p + 1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct GroupId(pub u32);

impl GroupId {
    /// The metadata group.
    pub const METADATA: GroupId = GroupId(0);

    /// The group of a partition.
    pub fn partition(p: optiprism_types::PartitionId) -> GroupId {
        GroupId(p.0 + 1)
    }

    /// The partition of this group, if it is one.
    pub fn as_partition(self) -> Option<optiprism_types::PartitionId> {
        self.0.checked_sub(1).map(optiprism_types::PartitionId)
    }
}

impl fmt::Display for GroupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.as_partition() {
            None => f.write_str("metadata"),
            Some(p) => write!(f, "partition-{p}"),
        }
    }
}

openraft::declare_raft_types!(
    /// The openraft type configuration shared by every group.
    pub TypeConfig:
        D = Command,
        R = Response,
        NodeId = u64,
        Node = NodeAddr,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// A group's Raft handle.
pub type Raft = openraft::Raft<TypeConfig>;
/// A log id of this crate's type configuration.
pub type LogId = openraft::LogId<u64>;
/// Storage errors as openraft wants them.
pub type StorageError = openraft::StorageError<u64>;

/// Commits `command` to `group` on this node, which must lead it.
pub async fn propose_local(
    raft: &Raft,
    node_id: u64,
    group: GroupId,
    command: Command,
) -> std::result::Result<Response, LeaderError> {
    use openraft::error::ClientWriteError;
    raft.client_write(command)
        .await
        .map(|response| response.data)
        .map_err(|e| {
            leader_error(node_id, group, e, |api| match api {
                ClientWriteError::ForwardToLeader(f) => Some(f.leader_id),
                _ => None,
            })
        })
}

/// The log index a linearizable read of `group` must see applied, confirmed by this node as
/// the group's leader (a heartbeat round shows no newer leader exists).
pub async fn read_index_local(
    raft: &Raft,
    node_id: u64,
    group: GroupId,
) -> std::result::Result<u64, LeaderError> {
    use openraft::error::CheckIsLeaderError;
    raft.ensure_linearizable()
        .await
        .map(|log_id| log_id.map(|l| l.index).unwrap_or(0))
        .map_err(|e| {
            leader_error(node_id, group, e, |api| match api {
                CheckIsLeaderError::ForwardToLeader(f) => Some(f.leader_id),
                _ => None,
            })
        })
}

/// What callers act on in an openraft error: another node leads (`forward_to` finds the leader
/// it names in the API error), the group stopped, or something failed.
fn leader_error<E: std::error::Error>(
    node: u64,
    group: GroupId,
    e: openraft::error::RaftError<u64, E>,
    forward_to: impl Fn(&E) -> Option<Option<u64>>,
) -> LeaderError {
    use openraft::error::{Fatal, RaftError};
    match e {
        RaftError::APIError(api) => match forward_to(&api) {
            Some(leader) => LeaderError::NotLeader {
                node,
                group,
                leader,
            },
            None => LeaderError::Failed(api.to_string()),
        },
        RaftError::Fatal(Fatal::Stopped) => LeaderError::Stopped,
        RaftError::Fatal(f) => LeaderError::Failed(f.to_string()),
    }
}

/// The bincode configuration of everything this crate writes.
pub(crate) fn bincode_config() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// Encodes a serde value with this crate's bincode configuration.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    bincode::serde::encode_to_vec(value, bincode_config())
        .expect("bincode encoding of in-memory values cannot fail")
}

/// Encodes a serde value onto the end of `out` (which the caller may have sized).
pub fn encode_into<T: Serialize>(value: &T, out: &mut Vec<u8>) {
    bincode::serde::encode_into_std_write(value, out, bincode_config())
        .expect("bincode encoding of in-memory values into a Vec cannot fail");
}

/// Decodes a serde value encoded by [`encode`], borrowing from `bytes` where `T` borrows.
pub fn decode_borrowed<'de, T: serde::Deserialize<'de>>(
    bytes: &'de [u8],
) -> std::result::Result<T, bincode::error::DecodeError> {
    bincode::serde::borrow_decode_from_slice(bytes, bincode_config()).map(|(v, _)| v)
}

/// Decodes with a serde seed (to decode into a value that already exists).
pub fn decode_seed<'de, S: serde::de::DeserializeSeed<'de>>(
    seed: S,
    bytes: &'de [u8],
) -> std::result::Result<S::Value, bincode::error::DecodeError> {
    bincode::serde::seed_decode_from_slice(seed, bytes, bincode_config()).map(|(v, _)| v)
}

/// Decodes a serde value encoded by [`encode`].
pub fn decode<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
) -> std::result::Result<T, bincode::error::DecodeError> {
    bincode::serde::decode_from_slice(bytes, bincode_config()).map(|(v, _)| v)
}
