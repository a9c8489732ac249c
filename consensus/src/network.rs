//! How Raft RPCs of every group travel between nodes.
//!
//! openraft asks a [`NetworkFactory`] (one per group) for a client per peer; the client tags each
//! RPC with its group and hands it to a [`RaftTransport`], which is shared by all groups of the
//! node so that one connection per peer carries every group. [`LocalRouter`] is the in-process
//! transport: it delivers RPCs to `Raft` handles registered in the same process, which is what a
//! single node needs and what in-process cluster tests use.

use crate::{GroupId, NodeAddr, Raft, TypeConfig};
use openraft::error::{InstallSnapshotError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use parking_lot::RwLock;
use std::collections::HashMap;
use std::sync::Arc;

/// An RPC error of this crate's types.
pub type RpcError<E = openraft::error::Infallible> = RPCError<u64, NodeAddr, RaftError<u64, E>>;

/// Carries the RPCs of every group to other nodes.
#[async_trait::async_trait]
pub trait RaftTransport: Send + Sync + std::fmt::Debug + 'static {
    /// Learns where `target` is reached, from the group's membership (called when openraft
    /// makes a client for a peer). Transports that route by node id alone ignore it.
    fn peer_address(&self, _target: u64, _addr: &NodeAddr) {}

    /// Sends AppendEntries of `group` to `target`.
    async fn append_entries(
        &self,
        target: u64,
        group: GroupId,
        rpc: AppendEntriesRequest<TypeConfig>,
    ) -> Result<AppendEntriesResponse<u64>, RpcError>;

    /// Sends RequestVote of `group` to `target`.
    async fn vote(
        &self,
        target: u64,
        group: GroupId,
        rpc: VoteRequest<u64>,
    ) -> Result<VoteResponse<u64>, RpcError>;

    /// Sends one InstallSnapshot chunk of `group` to `target`.
    async fn install_snapshot(
        &self,
        target: u64,
        group: GroupId,
        rpc: InstallSnapshotRequest<TypeConfig>,
    ) -> Result<InstallSnapshotResponse<u64>, RpcError<InstallSnapshotError>>;
}

/// The network factory of one group.
#[derive(Debug, Clone)]
pub struct NetworkFactory {
    group: GroupId,
    transport: Arc<dyn RaftTransport>,
}

impl NetworkFactory {
    /// A factory for `group` over `transport`.
    pub fn new(group: GroupId, transport: Arc<dyn RaftTransport>) -> NetworkFactory {
        NetworkFactory { group, transport }
    }
}

/// A client of one group to one peer.
#[derive(Debug, Clone)]
pub struct GroupClient {
    group: GroupId,
    target: u64,
    transport: Arc<dyn RaftTransport>,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = GroupClient;

    async fn new_client(&mut self, target: u64, node: &NodeAddr) -> GroupClient {
        self.transport.peer_address(target, node);
        GroupClient {
            group: self.group,
            target,
            transport: Arc::clone(&self.transport),
        }
    }
}

impl RaftNetwork<TypeConfig> for GroupClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RpcError> {
        self.transport
            .append_entries(self.target, self.group, rpc)
            .await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<InstallSnapshotResponse<u64>, RpcError<InstallSnapshotError>> {
        self.transport
            .install_snapshot(self.target, self.group, rpc)
            .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        _option: RPCOption,
    ) -> Result<VoteResponse<u64>, RpcError> {
        self.transport.vote(self.target, self.group, rpc).await
    }
}

#[derive(Debug, thiserror::Error)]
#[error("node {target} has no group {group} in this process")]
struct NotRegistered {
    target: u64,
    group: GroupId,
}

/// Delivers RPCs to groups registered in this process.
#[derive(Default)]
pub struct LocalRouter {
    groups: RwLock<HashMap<(u64, GroupId), Raft>>,
}

impl std::fmt::Debug for LocalRouter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalRouter")
            .field("groups", &self.groups.read().len())
            .finish()
    }
}

impl LocalRouter {
    /// An empty router.
    pub fn new() -> Arc<LocalRouter> {
        Arc::new(LocalRouter::default())
    }

    /// Makes `raft`, the group `group` of node `node`, reachable.
    pub fn register(&self, node: u64, group: GroupId, raft: Raft) {
        self.groups.write().insert((node, group), raft);
    }

    /// Makes a node unreachable (as if it crashed), for tests.
    pub fn unregister_node(&self, node: u64) {
        self.groups.write().retain(|(n, _), _| *n != node);
    }

    fn get<E: std::error::Error>(&self, target: u64, group: GroupId) -> Result<Raft, RpcError<E>> {
        self.groups
            .read()
            .get(&(target, group))
            .cloned()
            .ok_or_else(|| {
                RPCError::Unreachable(Unreachable::new(&NotRegistered { target, group }))
            })
    }
}

#[async_trait::async_trait]
impl RaftTransport for LocalRouter {
    async fn append_entries(
        &self,
        target: u64,
        group: GroupId,
        rpc: AppendEntriesRequest<TypeConfig>,
    ) -> Result<AppendEntriesResponse<u64>, RpcError> {
        let raft = self.get(target, group)?;
        raft.append_entries(rpc)
            .await
            .map_err(|e| RPCError::RemoteError(RemoteError::new(target, e)))
    }

    async fn vote(
        &self,
        target: u64,
        group: GroupId,
        rpc: VoteRequest<u64>,
    ) -> Result<VoteResponse<u64>, RpcError> {
        let raft = self.get(target, group)?;
        raft.vote(rpc)
            .await
            .map_err(|e| RPCError::RemoteError(RemoteError::new(target, e)))
    }

    async fn install_snapshot(
        &self,
        target: u64,
        group: GroupId,
        rpc: InstallSnapshotRequest<TypeConfig>,
    ) -> Result<InstallSnapshotResponse<u64>, RpcError<InstallSnapshotError>> {
        let raft = self.get(target, group)?;
        raft.install_snapshot(rpc)
            .await
            .map_err(|e| RPCError::RemoteError(RemoteError::new(target, e)))
    }
}
