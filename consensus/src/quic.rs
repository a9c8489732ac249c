//! Raft RPCs of every group between nodes over QUIC with mutual TLS.
//!
//! One QUIC connection per pair of nodes carries the RPCs of every group, each RPC on its own
//! bidirectional stream: a heartbeat never waits behind a large append or a snapshot chunk, as
//! it would on one TCP stream. A request is one bincode frame (its group and the RPC), the
//! stream's end marks its end, and the answer comes back the same way on the same stream.
//!
//! Both sides authenticate: a node connecting to node `n` checks that the server's certificate
//! is `n`'s (see [`crate::tls`]), and the server refuses a client without a certificate from
//! the cluster CA. A lost connection is dropped and the next RPC to that peer reconnects;
//! openraft retries what failed.

use crate::network::{RaftTransport, RpcError};
use crate::tls::{NodeIdentity, TlsError, node_name, node_of_certificate};
use crate::{Command, GroupId, NodeAddr, Raft, Response, TypeConfig};
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use parking_lot::RwLock;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Weak};

/// The largest frame either side reads: an append of many large entries, or a snapshot chunk.
const MAX_FRAME_BYTES: usize = 512 << 20;

/// Why the transport could not start.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The TLS configuration is unusable.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The listen address could not be bound.
    #[error("cannot listen for Raft traffic on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// Why one RPC failed on our side of the wire.
#[derive(Debug, thiserror::Error)]
enum CallError {
    #[error("no address known for node {0}")]
    NoAddress(u64),
    #[error("cannot resolve {addr}: {message}")]
    Resolve { addr: String, message: String },
    #[error("cannot connect to node {target} at {addr}: {message}")]
    Connect {
        target: u64,
        addr: SocketAddr,
        message: String,
    },
    #[error("connection to node {target} lost: {message}")]
    Stream { target: u64, message: String },
    #[error("node {target} answered with an undecodable frame: {message}")]
    Decode { target: u64, message: String },
    #[error("node {target} has no group {group}")]
    NoGroup { target: u64, group: GroupId },
    #[error("node {target} answered an RPC of another kind")]
    WrongReply { target: u64 },
}

impl CallError {
    /// Whether the peer could not be reached at all (rather than failing mid-RPC).
    fn is_unreachable(&self) -> bool {
        matches!(
            self,
            CallError::NoAddress(_) | CallError::Resolve { .. } | CallError::Connect { .. }
        )
    }

    fn into_rpc<E: std::error::Error>(self) -> RpcError<E> {
        if self.is_unreachable() {
            RPCError::Unreachable(Unreachable::new(&self))
        } else {
            RPCError::Network(NetworkError::new(&self))
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Request {
    Append(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<u64>),
    Snapshot(InstallSnapshotRequest<TypeConfig>),
    /// A command proposed on another node, for this node's leader of the group to commit.
    Propose(Command),
    /// The log index a linearizable read of the group must wait for (asked of its leader).
    ReadIndex,
    /// Hold (or, with zero, release) this node's elections of the group for a while.
    HoldElections {
        /// How long.
        millis: u64,
    },
    /// Campaign for the group's leadership now.
    Campaign,
    /// Move the group's leadership to node `to` (asked of its leader).
    TransferLeader {
        /// The node to lead.
        to: u64,
    },
    /// This node's standing in the group, for a voter deciding whether to campaign (see
    /// [`crate::failover`]).
    Standing,
}

/// Why a leader did not commit a forwarded command or confirm a read index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum LeaderError {
    /// The node asked is not (or no longer) the group's leader.
    #[error("node {node} is not the leader of {group} (leader: {leader:?})")]
    NotLeader {
        /// The node asked.
        node: u64,
        /// The group.
        group: GroupId,
        /// The leader it knows of, if any.
        leader: Option<u64>,
    },
    /// The leader could not be reached.
    #[error("{0}")]
    Unreachable(String),
    /// The group is shutting down on the node asked.
    #[error("the group is shutting down")]
    Stopped,
    /// The leader failed the request.
    #[error("{0}")]
    Failed(String),
}

impl LeaderError {
    /// Whether trying again (at the leader named, or after an election) may succeed.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, LeaderError::Failed(_))
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Frame {
    group: GroupId,
    request: Request,
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Reply {
    Append(Result<AppendEntriesResponse<u64>, RaftError<u64>>),
    Vote(Result<VoteResponse<u64>, RaftError<u64>>),
    Snapshot(Result<InstallSnapshotResponse<u64>, RaftError<u64, InstallSnapshotError>>),
    Propose(Result<Response, LeaderError>),
    ReadIndex(Result<u64, LeaderError>),
    Done(Result<(), LeaderError>),
    Standing(crate::failover::Standing),
    NoGroup,
}

/// A peer group's answer to a Raft RPC.
type RaftResult<T, E> = Result<T, RaftError<u64, E>>;

type Slot = Arc<tokio::sync::Mutex<Option<quinn::Connection>>>;

/// The QUIC transport of one node: serves its groups to peers and carries its groups' RPCs to
/// theirs.
pub struct QuicTransport {
    pub(crate) node_id: u64,
    endpoint: quinn::Endpoint,
    groups: RwLock<HashMap<GroupId, Raft>>,
    peers: RwLock<HashMap<u64, String>>,
    connections: parking_lot::Mutex<HashMap<u64, Slot>>,
    pub(crate) holds: Arc<crate::transfer::Holds>,
    /// When this transport started: a group not heard from since has been silent as long.
    pub(crate) started: tokio::time::Instant,
    /// When each group last took an append from its leader here.
    pub(crate) heard: parking_lot::Mutex<HashMap<GroupId, tokio::time::Instant>>,
    /// When this node last campaigned for each group on its own initiative.
    pub(crate) campaigned: parking_lot::Mutex<HashMap<GroupId, tokio::time::Instant>>,
}

impl std::fmt::Debug for QuicTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuicTransport")
            .field("node_id", &self.node_id)
            .field("local_addr", &self.endpoint.local_addr().ok())
            .field("groups", &self.groups.read().len())
            .finish()
    }
}

impl QuicTransport {
    /// Listens on `listen` as `identity`'s node and starts serving peers (on the current tokio
    /// runtime). Groups become reachable once [`QuicTransport::register`]ed.
    pub fn bind(
        identity: &NodeIdentity,
        listen: SocketAddr,
    ) -> Result<Arc<QuicTransport>, TransportError> {
        let mut endpoint =
            quinn::Endpoint::server(identity.server_config()?, listen).map_err(|source| {
                TransportError::Bind {
                    addr: listen,
                    source,
                }
            })?;
        endpoint.set_default_client_config(identity.client_config()?);
        let transport = Arc::new(QuicTransport {
            node_id: identity.node_id,
            endpoint: endpoint.clone(),
            groups: RwLock::default(),
            peers: RwLock::default(),
            connections: parking_lot::Mutex::default(),
            holds: Arc::default(),
            started: tokio::time::Instant::now(),
            heard: parking_lot::Mutex::default(),
            campaigned: parking_lot::Mutex::default(),
        });
        tokio::spawn(accept(endpoint, Arc::downgrade(&transport)));
        crate::failover::start(&transport);
        Ok(transport)
    }

    /// The address peers reach this node at (the bound port when listening on port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.endpoint
            .local_addr()
            .expect("a bound endpoint has an address")
    }

    /// Serves `raft`, this node's group `group`, to peers.
    pub fn register(&self, group: GroupId, raft: Raft) {
        self.groups.write().insert(group, raft);
    }

    /// Stops serving group `group`.
    pub fn unregister(&self, group: GroupId) {
        self.groups.write().remove(&group);
    }

    /// Records where node `id` listens (`host:port`).
    pub fn set_peer(&self, id: u64, addr: impl Into<String>) {
        let addr = addr.into();
        let changed = self.peers.write().insert(id, addr.clone()) != Some(addr);
        if changed {
            // A connection to the old address is of no use any more.
            self.connections.lock().remove(&id);
        }
    }

    /// Closes every connection and stops listening.
    pub fn close(&self) {
        self.endpoint
            .close(quinn::VarInt::from_u32(0), b"shutting down");
    }

    /// Has `leader` commit `command` to `group`; returns the state machine's response.
    pub async fn propose(
        &self,
        leader: u64,
        group: GroupId,
        command: Command,
    ) -> Result<Response, LeaderError> {
        self.leader_rpc(
            leader,
            group,
            Request::Propose(command),
            |reply| match reply {
                Reply::Propose(result) => Some(result),
                _ => None,
            },
        )
        .await
    }

    /// Asks `leader` for the index a linearizable read of `group` must see applied.
    pub async fn read_index(&self, leader: u64, group: GroupId) -> Result<u64, LeaderError> {
        self.leader_rpc(leader, group, Request::ReadIndex, |reply| match reply {
            Reply::ReadIndex(result) => Some(result),
            _ => None,
        })
        .await
    }

    /// A Raft RPC: the answer `unpack` finds in the reply, the peer's Raft error, or why the
    /// call itself failed.
    async fn raft_rpc<T, E: std::error::Error>(
        &self,
        target: u64,
        group: GroupId,
        request: Request,
        unpack: fn(Reply) -> Option<RaftResult<T, E>>,
    ) -> Result<T, RpcError<E>> {
        match self
            .call(target, &Frame { group, request })
            .await
            .map(unpack)
        {
            Ok(Some(Ok(answer))) => Ok(answer),
            Ok(Some(Err(e))) => Err(RPCError::RemoteError(RemoteError::new(target, e))),
            Ok(None) => Err(CallError::WrongReply { target }.into_rpc()),
            Err(e) => Err(e.into_rpc()),
        }
    }

    /// This node's Raft instance of `group`, if it serves one.
    pub(crate) fn group(&self, group: GroupId) -> Option<Raft> {
        self.groups.read().get(&group).cloned()
    }

    /// Every group this node serves.
    pub(crate) fn groups_snapshot(&self) -> Vec<(GroupId, Raft)> {
        self.groups
            .read()
            .iter()
            .map(|(g, r)| (*g, r.clone()))
            .collect()
    }

    /// A request only a group's leader answers (or one to a chosen node).
    pub(crate) async fn leader_rpc<T>(
        &self,
        leader: u64,
        group: GroupId,
        request: Request,
        unpack: fn(Reply) -> Option<Result<T, LeaderError>>,
    ) -> Result<T, LeaderError> {
        match self
            .call(leader, &Frame { group, request })
            .await
            .map(unpack)
        {
            Ok(Some(result)) => result,
            Ok(None) => Err(LeaderError::Failed(
                CallError::WrongReply { target: leader }.to_string(),
            )),
            Err(e) => Err(LeaderError::Unreachable(e.to_string())),
        }
    }

    async fn connection(&self, target: u64) -> Result<quinn::Connection, CallError> {
        let slot = Arc::clone(self.connections.lock().entry(target).or_default());
        let mut cached = slot.lock().await;
        if let Some(c) = cached.as_ref().filter(|c| c.close_reason().is_none()) {
            return Ok(c.clone());
        }
        let addr = self
            .peers
            .read()
            .get(&target)
            .cloned()
            .ok_or(CallError::NoAddress(target))?;
        let resolved = tokio::net::lookup_host(&addr)
            .await
            .map_err(|e| e.to_string())
            .and_then(|mut a| a.next().ok_or_else(|| "no address".to_string()))
            .map_err(|message| CallError::Resolve {
                addr: addr.clone(),
                message,
            })?;
        let connect = |message: String| CallError::Connect {
            target,
            addr: resolved,
            message,
        };
        let connection = self
            .endpoint
            .connect(resolved, &node_name(target))
            .map_err(|e| connect(e.to_string()))?
            .await
            .map_err(|e| connect(e.to_string()))?;
        tracing::debug!(node_id = self.node_id, peer = target, %resolved, "connected");
        *cached = Some(connection.clone());
        Ok(connection)
    }

    async fn call(&self, target: u64, frame: &Frame) -> Result<Reply, CallError> {
        let connection = self.connection(target).await?;
        let lost = |e: &dyn std::fmt::Display| CallError::Stream {
            target,
            message: e.to_string(),
        };
        let (mut send, mut recv) = connection.open_bi().await.map_err(|e| lost(&e))?;
        send.write_all(&crate::encode(frame))
            .await
            .map_err(|e| lost(&e))?;
        send.finish().map_err(|e| lost(&e))?;
        let bytes = recv
            .read_to_end(MAX_FRAME_BYTES)
            .await
            .map_err(|e| lost(&e))?;
        let reply: Reply = crate::decode(&bytes).map_err(|e| CallError::Decode {
            target,
            message: e.to_string(),
        })?;
        if let Reply::NoGroup = reply {
            return Err(CallError::NoGroup {
                target,
                group: frame.group,
            });
        }
        Ok(reply)
    }
}

async fn accept(endpoint: quinn::Endpoint, transport: Weak<QuicTransport>) {
    while let Some(incoming) = endpoint.accept().await {
        let Some(transport) = transport.upgrade() else {
            return;
        };
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            match incoming.await {
                Ok(connection) => serve(transport, connection).await,
                // A peer without a certificate of the cluster CA ends here.
                Err(e @ quinn::ConnectionError::TransportError(_)) => {
                    tracing::warn!(node_id = transport.node_id, %remote, error = %e, "refused a connection")
                }
                // The peer gave up on its own (it restarted, or dialled twice at once).
                Err(e) => {
                    tracing::debug!(node_id = transport.node_id, %remote, error = %e, "a connection attempt ended")
                }
            }
        });
    }
}

/// The node id in the certificate a connected peer presented.
fn peer_node(connection: &quinn::Connection) -> Option<u64> {
    let certificates = connection
        .peer_identity()?
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    node_of_certificate(certificates.first()?)
}

async fn serve(transport: Arc<QuicTransport>, connection: quinn::Connection) {
    let Some(peer) = peer_node(&connection) else {
        tracing::warn!(node_id = transport.node_id, remote = %connection.remote_address(), "refused a peer whose certificate names no node");
        connection.close(quinn::VarInt::from_u32(1), b"certificate names no node");
        return;
    };
    tracing::debug!(node_id = transport.node_id, peer, "peer connected");
    let transport = Arc::downgrade(&transport);
    while let Ok((send, recv)) = connection.accept_bi().await {
        let Some(transport) = transport.upgrade() else {
            return;
        };
        tokio::spawn(async move {
            if let Err(e) = answer(&transport, send, recv).await {
                tracing::debug!(node_id = transport.node_id, peer, error = %e, "RPC from peer failed");
            }
        });
    }
}

async fn answer(
    transport: &QuicTransport,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) -> Result<(), String> {
    let bytes = recv
        .read_to_end(MAX_FRAME_BYTES)
        .await
        .map_err(|e| e.to_string())?;
    let frame: Frame = crate::decode(&bytes).map_err(|e| e.to_string())?;
    let raft = transport.groups.read().get(&frame.group).cloned();
    let reply = match raft {
        None => Reply::NoGroup,
        Some(raft) => match frame.request {
            Request::Append(rpc) => {
                let answer = raft.append_entries(rpc).await;
                // Unless the sender was deposed (a higher vote), the append renewed the
                // follower's lease, whether or not its entries matched.
                if answer
                    .as_ref()
                    .is_ok_and(|a| !matches!(a, AppendEntriesResponse::HigherVote(_)))
                {
                    transport.heard_from_leader(frame.group);
                }
                Reply::Append(answer)
            }
            Request::Vote(rpc) => Reply::Vote(raft.vote(rpc).await),
            Request::Snapshot(rpc) => Reply::Snapshot(raft.install_snapshot(rpc).await),
            Request::Propose(command) => {
                Reply::Propose(transport.propose_here(&raft, frame.group, command).await)
            }
            Request::ReadIndex => {
                Reply::ReadIndex(transport.read_index_here(&raft, frame.group).await)
            }
            Request::HoldElections { millis } => {
                let hold = std::time::Duration::from_millis(millis);
                transport.hold_elections(&raft, frame.group, hold);
                Reply::Done(Ok(()))
            }
            Request::Campaign => Reply::Done(
                raft.trigger()
                    .elect()
                    .await
                    .map_err(|e| LeaderError::Failed(e.to_string())),
            ),
            Request::TransferLeader { to } => {
                Reply::Done(transport.transfer_leader(frame.group, to).await)
            }
            Request::Standing => Reply::Standing(transport.standing(&raft, frame.group)),
        },
    };
    send.write_all(&crate::encode(&reply))
        .await
        .map_err(|e| e.to_string())?;
    send.finish().map_err(|e| e.to_string())
}

#[async_trait::async_trait]
impl RaftTransport for QuicTransport {
    fn peer_address(&self, target: u64, addr: &NodeAddr) {
        if self.peers.read().get(&target) != Some(&addr.raft) {
            self.set_peer(target, addr.raft.clone());
        }
    }

    async fn append_entries(
        &self,
        target: u64,
        group: GroupId,
        rpc: AppendEntriesRequest<TypeConfig>,
    ) -> Result<AppendEntriesResponse<u64>, RpcError> {
        self.raft_rpc(target, group, Request::Append(rpc), |reply| match reply {
            Reply::Append(result) => Some(result),
            _ => None,
        })
        .await
    }

    async fn vote(
        &self,
        target: u64,
        group: GroupId,
        rpc: VoteRequest<u64>,
    ) -> Result<VoteResponse<u64>, RpcError> {
        self.raft_rpc(target, group, Request::Vote(rpc), |reply| match reply {
            Reply::Vote(result) => Some(result),
            _ => None,
        })
        .await
    }

    async fn install_snapshot(
        &self,
        target: u64,
        group: GroupId,
        rpc: InstallSnapshotRequest<TypeConfig>,
    ) -> Result<InstallSnapshotResponse<u64>, RpcError<InstallSnapshotError>> {
        self.raft_rpc(target, group, Request::Snapshot(rpc), |reply| match reply {
            Reply::Snapshot(result) => Some(result),
            _ => None,
        })
        .await
    }
}
