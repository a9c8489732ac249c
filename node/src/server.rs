//! The process: start-up in order, the handles every front end uses, and ordered shutdown.
//!
//! Start-up: open sled, start the group-commit flusher, start the metadata group and every
//! partition group, initialize a fresh single-node cluster, wait for leaders, make sure the
//! default project exists, then open HTTP and Flight. Shutdown runs the other way: stop taking
//! requests, seal every partition (so restart replays little), stop the groups, flush sled.

use crate::config::{DEFAULT_PROJECT, NodeConfig};
use crate::metadata::{MetaCommand, MetaResponse, MetadataCore, MetadataHandle, Project};
use crate::query::QueryEngine;
use crate::storage::batcher::{self, Batcher, Tokens};
use crate::storage::chunk::StoredEvent;
use crate::storage::partition::{IngestOutcome, PartitionCore};
use anyhow::Context;
use optiprism_consensus::tls::{ClusterCa, NodeIdentity};
use optiprism_consensus::{
    Command, GroupId, LeaderError, LocalRouter, NodeAddr, NodeStorage, QuicTransport, Raft,
    RaftTransport, StateMachineStore, start_group,
};
use optiprism_types::PartitionId;
use parking_lot::RwLock;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// A proposal that did not commit.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProposeError {
    /// The group has no leader on this node right now (election under way).
    #[error("no leader for {group} right now; retry shortly")]
    NoLeader {
        /// The group.
        group: GroupId,
    },
    /// The node is shutting down.
    #[error("node is shutting down")]
    ShuttingDown,
    /// A request's events take more room in a log entry than an entry may hold.
    #[error(
        "the request's events take {bytes} bytes in a log entry, over the {limit} bytes an entry may hold; send them in smaller batches"
    )]
    TooLarge {
        /// Their size in an entry (Arrow IPC, uncompressed).
        bytes: usize,
        /// The most an entry holds.
        limit: usize,
    },
    /// The group stopped with a fatal error.
    #[error("raft group {group} failed: {message}")]
    Fatal {
        /// The group.
        group: GroupId,
        /// What happened.
        message: String,
    },
}

impl ProposeError {
    fn from_leader(group: GroupId, e: LeaderError) -> ProposeError {
        match e {
            LeaderError::Stopped => ProposeError::ShuttingDown,
            LeaderError::Failed(message) => ProposeError::Fatal { group, message },
            LeaderError::NotLeader { .. } | LeaderError::Unreachable(_) => {
                ProposeError::NoLeader { group }
            }
        }
    }

    /// Whether the same proposal may succeed later.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            ProposeError::NoLeader { .. } | ProposeError::ShuttingDown
        )
    }
}

/// Upper bounds (seconds) of the query latency histogram's buckets.
pub const QUERY_BUCKETS: [f64; 12] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Counters exported on `/metrics`.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Events stored.
    pub ingest_accepted: AtomicU64,
    /// Events dropped as duplicates.
    pub ingest_duplicates: AtomicU64,
    /// Requests rejected (4xx).
    pub ingest_rejected: AtomicU64,
    /// New property keys left out of a full project schema (`ingest.max-property-keys`), once
    /// per request that sent them.
    pub ingest_keys_over_limit: AtomicU64,
    /// Queries answered.
    pub queries: AtomicU64,
    /// Queries failed.
    pub queries_failed: AtomicU64,
    /// Proposals (ingestion or metadata) that did not commit.
    pub proposals_failed: AtomicU64,
    /// Queries per latency bucket (not cumulative; see [`QUERY_BUCKETS`]), and above the last.
    query_buckets: [AtomicU64; QUERY_BUCKETS.len() + 1],
    /// Sum of query latencies in microseconds.
    query_micros: AtomicU64,
    /// Leader changes seen per group since start.
    leader_changes: parking_lot::Mutex<BTreeMap<GroupId, u64>>,
}

impl Metrics {
    /// Records an ingested batch.
    pub fn record_ingest(&self, accepted: u32, duplicates: u32) {
        self.ingest_accepted
            .fetch_add(u64::from(accepted), Ordering::Relaxed);
        self.ingest_duplicates
            .fetch_add(u64::from(duplicates), Ordering::Relaxed);
    }

    /// Records a query (JSON insight or SQL, over HTTP or Flight) and how long it took.
    pub fn record_query(&self, elapsed: Duration, ok: bool) {
        if ok {
            self.queries.fetch_add(1, Ordering::Relaxed);
        } else {
            self.queries_failed.fetch_add(1, Ordering::Relaxed);
        }
        let seconds = elapsed.as_secs_f64();
        let bucket = QUERY_BUCKETS
            .iter()
            .position(|&upper| seconds <= upper)
            .unwrap_or(QUERY_BUCKETS.len());
        self.query_buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.query_micros
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
    }

    /// The query latency histogram: cumulative counts per bucket bound, the count and the sum
    /// in seconds.
    pub fn query_histogram(&self) -> (Vec<(f64, u64)>, u64, f64) {
        let mut cumulative = 0;
        let mut buckets = Vec::with_capacity(QUERY_BUCKETS.len());
        for (i, upper) in QUERY_BUCKETS.iter().enumerate() {
            cumulative += self.query_buckets[i].load(Ordering::Relaxed);
            buckets.push((*upper, cumulative));
        }
        cumulative += self.query_buckets[QUERY_BUCKETS.len()].load(Ordering::Relaxed);
        let sum = self.query_micros.load(Ordering::Relaxed) as f64 / 1e6;
        (buckets, cumulative, sum)
    }

    /// Leader changes seen per group.
    pub fn leader_changes(&self) -> BTreeMap<GroupId, u64> {
        self.leader_changes.lock().clone()
    }

    /// Counts the leader changes of `group` this node sees, until the group stops here.
    pub(crate) fn watch_leader_changes(self: &Arc<Self>, group: GroupId, raft: &Raft) {
        let mut watch = raft.metrics();
        let metrics = Arc::clone(self);
        metrics.leader_changes.lock().entry(group).or_insert(0);
        tokio::spawn(async move {
            let mut leader = watch.borrow_and_update().current_leader;
            while watch.changed().await.is_ok() {
                let now = watch.borrow_and_update().current_leader;
                if now != leader && now.is_some() {
                    *metrics.leader_changes.lock().entry(group).or_insert(0) += 1;
                }
                leader = now.or(leader);
            }
        });
    }
}

pub(crate) struct Group<S> {
    pub(crate) id: GroupId,
    pub(crate) raft: Raft,
    pub(crate) state_machine: StateMachineStore<S>,
}

/// A partition group hosted on this node.
pub(crate) struct PartitionGroup {
    pub(crate) group: Group<PartitionCore>,
    pub(crate) batcher: Batcher,
    pub(crate) seal_failure: crate::storage::partition::SealFailure,
}

/// Commits commands to groups: on this node when it leads the group, otherwise forwarded over
/// QUIC to the group's leader (in a cluster).
#[derive(Debug, Clone)]
pub struct Proposer {
    node_id: u64,
    pub(crate) quic: Option<Arc<QuicTransport>>,
    metadata: MetadataHandle,
    /// The partition map every member computes from the configuration, in force until the
    /// bootstrap node records it in the metadata group.
    initial_placement: Arc<BTreeMap<u32, Vec<u64>>>,
    /// The leader last seen answering, per group this node does not host.
    leader_hints: Arc<parking_lot::Mutex<std::collections::HashMap<GroupId, u64>>>,
}

impl Proposer {
    /// Commits `bytes` to `group`; returns the state machine's response. A forwarded proposal
    /// follows the leader: when this node learns of a new leader while waiting on the old one
    /// (a dead leader is only noticed by the connection's idle timeout), it sends the proposal
    /// to the new one. Apply drops message ids it has seen, so a proposal that the old leader
    /// also commits is stored once. A node that answers it no longer leads (after an election
    /// or a leader transfer) is followed to the leader it names.
    pub async fn propose(
        &self,
        group: GroupId,
        raft: Option<&Raft>,
        bytes: Vec<u8>,
    ) -> Result<Vec<u8>, ProposeError> {
        let Some(raft) = raft else {
            return self.propose_elsewhere(group, bytes).await;
        };
        let Some(quic) = &self.quic else {
            return optiprism_consensus::propose_local(raft, self.node_id, group, Command(bytes))
                .await
                .map(|response| response.0)
                .map_err(|e| ProposeError::from_leader(group, e));
        };
        let mut metrics = raft.metrics();
        // A node that refuses as no longer the leader names its successor: try it next, a few
        // times (leadership moves on a transfer or an election).
        let mut named_leader = None;
        let mut redirects = 0;
        loop {
            let leader = named_leader
                .take()
                .or(metrics.borrow_and_update().current_leader);
            let result = match leader {
                Some(leader) if leader != self.node_id => {
                    let forward = quic.propose(leader, group, Command(bytes.clone()));
                    match while_leader(&mut metrics, leader, forward).await {
                        LeaderCall::Done(result) => result,
                        LeaderCall::Moved => continue,
                        LeaderCall::Stopped => Err(LeaderError::Stopped),
                    }
                }
                _ => quic.propose_here(raft, group, Command(bytes.clone())).await,
            };
            match result {
                Err(LeaderError::NotLeader {
                    leader: Some(next), ..
                }) if redirects < 3 => {
                    redirects += 1;
                    named_leader = Some(next);
                }
                result => {
                    return result
                        .map(|response| response.0)
                        .map_err(|e| ProposeError::from_leader(group, e));
                }
            }
        }
    }

    /// The partition map: as recorded in the metadata group, or, before the bootstrap node
    /// recorded it, the initial placement of the configuration.
    pub fn placement(&self) -> BTreeMap<u32, Vec<u64>> {
        let recorded = self.metadata.read(|m| m.placement.clone());
        if recorded.is_empty() {
            (*self.initial_placement).clone()
        } else {
            recorded
        }
    }

    /// The nodes to ask for a partition group held elsewhere: the leader last seen answering
    /// first, then the partition's replicas in the map.
    pub fn candidates(&self, group: GroupId) -> Vec<u64> {
        let Some(p) = group.as_partition() else {
            return Vec::new();
        };
        let recorded = self.metadata.read(|m| {
            (!m.placement.is_empty()).then(|| m.placement.get(&p.0).cloned().unwrap_or_default())
        });
        let mut candidates = recorded
            .or_else(|| self.initial_placement.get(&p.0).cloned())
            .unwrap_or_default();
        if let Some(hint) = self.leader_hints.lock().get(&group).copied() {
            candidates.retain(|&c| c != hint);
            candidates.insert(0, hint);
        }
        candidates
    }

    /// Commits `bytes` to a group this node holds no replica of: to the leader last seen,
    /// else to the replicas of the partition map in turn, following the leader each names.
    async fn propose_elsewhere(
        &self,
        group: GroupId,
        bytes: Vec<u8>,
    ) -> Result<Vec<u8>, ProposeError> {
        let Some(quic) = &self.quic else {
            return Err(ProposeError::Fatal {
                group,
                message: "this node holds no replica of the group".into(),
            });
        };
        let mut candidates: std::collections::VecDeque<u64> =
            self.candidates(group).into_iter().collect();
        let rounds = 3 * candidates.len().max(1) + 3;
        for attempt in 0..rounds {
            let Some(target) = candidates.pop_front() else {
                break;
            };
            match quic.propose(target, group, Command(bytes.clone())).await {
                Ok(response) => {
                    self.leader_hints.lock().insert(group, target);
                    return Ok(response.0);
                }
                Err(LeaderError::NotLeader {
                    leader: Some(next), ..
                }) if next != target => {
                    candidates.retain(|&c| c != next);
                    candidates.push_front(next);
                    candidates.push_back(target);
                }
                Err(e) if e.is_retryable() => {
                    candidates.push_back(target);
                    if attempt + 1 >= candidates.len() {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
                Err(e) => return Err(ProposeError::from_leader(group, e)),
            }
        }
        self.leader_hints.lock().remove(&group);
        Err(ProposeError::NoLeader { group })
    }
}

/// How a call to a group's leader ended.
enum LeaderCall<T> {
    /// It answered (or failed).
    Done(T),
    /// This node learned of another leader first.
    Moved,
    /// The group stopped on this node.
    Stopped,
}

/// Runs `call` to `leader` of a group until it ends or this node sees another leader elected.
async fn while_leader<T>(
    metrics: &mut tokio::sync::watch::Receiver<openraft::RaftMetrics<u64, NodeAddr>>,
    leader: u64,
    call: impl std::future::Future<Output = T>,
) -> LeaderCall<T> {
    let moved = metrics.wait_for(|m| m.current_leader.is_some_and(|l| l != leader));
    tokio::select! {
        result = call => LeaderCall::Done(result),
        moved = moved => match moved {
            Ok(_) => LeaderCall::Moved,
            Err(_) => LeaderCall::Stopped,
        },
    }
}

/// One group as this node sees it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct GroupStatus {
    /// The group.
    pub group: GroupId,
    /// Its leader, if one is known.
    pub leader: Option<u64>,
    /// Whether this node leads it.
    pub is_leader: bool,
    /// Last log index applied here.
    pub applied: u64,
    /// Last log index held here.
    pub last_log: u64,
    /// Log purged up to here (entries at or below are only in snapshots).
    pub purged: Option<u64>,
    /// Index of the snapshot held here.
    pub snapshot: Option<u64>,
    /// Voting replicas.
    pub voters: Vec<u64>,
    /// Non-voting replicas (catching up before they vote).
    pub learners: Vec<u64>,
    /// When this node leads: the last log index each replica is known to hold.
    pub replication: Option<BTreeMap<u64, u64>>,
    /// The addresses of the group's replicas.
    pub addresses: BTreeMap<u64, NodeAddr>,
    /// Why the group stopped here, when an error stopped it (its storage failed, say): it
    /// takes no writes until the node restarts.
    pub failed: Option<String>,
    /// Why sealing the partition failed here, when it did (see [`NodeShared::failed_seals`]).
    pub seal_failed: Option<String>,
}

/// Why a group stopped, when an error stopped it rather than a shutdown.
fn failure(metrics: &openraft::RaftMetrics<u64, NodeAddr>) -> Option<String> {
    match &metrics.running_state {
        Ok(()) | Err(openraft::error::Fatal::Stopped) => None,
        Err(e) => Some(e.to_string()),
    }
}

/// What every front end (HTTP, Flight) of the node shares.
pub struct NodeShared {
    /// The validated configuration.
    pub config: NodeConfig,
    /// Applied metadata.
    pub metadata: MetadataHandle,
    /// The query engine.
    pub query: QueryEngine,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// The runtime queries run on.
    pub query_runtime: tokio::runtime::Handle,
    pub(crate) node_id: u64,
    pub(crate) proposer: Proposer,
    pub(crate) meta: Group<MetadataCore>,
    /// The partitions this node holds a replica of.
    pub(crate) partitions: RwLock<BTreeMap<u32, Arc<PartitionGroup>>>,
    /// Batchers of partitions held elsewhere (created on first use).
    pub(crate) remote: parking_lot::Mutex<std::collections::HashMap<u32, Batcher>>,
    pub(crate) hosting: crate::placement::Hosting,
    pub(crate) partition_count: u32,
    shutting_down: AtomicBool,
    draining: AtomicBool,
    db: sled::Db,
}

impl std::fmt::Debug for NodeShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeShared")
            .field("node_id", &self.node_id)
            .field("hosted", &self.partitions.read().len())
            .finish()
    }
}

impl NodeShared {
    /// Number of partitions.
    pub fn partition_count(&self) -> u32 {
        self.partition_count
    }

    /// The metadata group and every partition group held here, with their Raft handles.
    fn groups(&self) -> Vec<(GroupId, Raft)> {
        std::iter::once((self.meta.id, self.meta.raft.clone()))
            .chain(
                self.hosted()
                    .iter()
                    .map(|g| (g.group.id, g.group.raft.clone())),
            )
            .collect()
    }

    /// The partitions hosted here, in order.
    pub(crate) fn hosted(&self) -> Vec<Arc<PartitionGroup>> {
        self.partitions.read().values().cloned().collect()
    }

    /// Whether shutdown has begun.
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }

    async fn propose(
        &self,
        group: GroupId,
        raft: &Raft,
        bytes: Vec<u8>,
    ) -> Result<Vec<u8>, ProposeError> {
        if self.is_shutting_down() {
            return Err(ProposeError::ShuttingDown);
        }
        let result = self.proposer.propose(group, Some(raft), bytes).await;
        if result.is_err() {
            self.metrics
                .proposals_failed
                .fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    /// Commits a metadata command; returns once it is applied on this node.
    pub async fn propose_metadata(
        &self,
        command: MetaCommand,
    ) -> Result<MetaResponse, ProposeError> {
        let bytes = self
            .propose(
                self.meta.id,
                &self.meta.raft,
                optiprism_consensus::encode(&command),
            )
            .await?;
        // Committed on the leader is not yet applied here: callers read the metadata they just
        // changed (property types, identity merges) right after.
        self.group_barrier(self.meta.id, &self.meta.raft).await?;
        optiprism_consensus::decode(&bytes).map_err(|e| ProposeError::Fatal {
            group: self.meta.id,
            message: format!("undecodable response: {e}"),
        })
    }

    /// Commits events of a project to a partition; returns once they are applied.
    pub async fn propose_events(
        &self,
        p: PartitionId,
        project: optiprism_types::ProjectId,
        events: Vec<StoredEvent>,
    ) -> Result<IngestOutcome, ProposeError> {
        if self.is_shutting_down() {
            return Err(ProposeError::ShuttingDown);
        }
        let hosted = self.partitions.read().get(&p.0).map(|g| g.batcher.clone());
        let batcher = match hosted {
            Some(b) => b,
            None => self.remote_batcher(p),
        };
        let result = batcher.ingest(project, events).await;
        if result.is_err() {
            self.metrics
                .proposals_failed
                .fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    /// The batcher that forwards a partition held elsewhere to its leader.
    fn remote_batcher(&self, p: PartitionId) -> Batcher {
        self.remote
            .lock()
            .entry(p.0)
            .or_insert_with(|| {
                Batcher::start(batcher::Group {
                    group: GroupId::partition(p),
                    raft: None,
                    proposer: self.proposer.clone(),
                    local: None,
                    tokens: Arc::clone(&self.hosting.tokens),
                    linger: self.hosting.linger,
                })
            })
            .clone()
    }

    /// In a cluster, waits until this node has applied everything each group had committed
    /// when the call began (a read index its leader confirms), so a query on any node sees
    /// every acknowledged event. A node alone applies before it acknowledges: nothing to wait
    /// for.
    pub async fn read_barrier(&self) -> Result<(), ProposeError> {
        if self.proposer.quic.is_none() {
            return Ok(());
        }
        let groups = self.groups();
        futures::future::try_join_all(
            groups
                .iter()
                .map(|(group, raft)| self.group_barrier(*group, raft)),
        )
        .await?;
        Ok(())
    }

    /// The read barrier of one group: waits until this node has applied what the group's
    /// leader had committed when the call began.
    pub(crate) async fn group_barrier(
        &self,
        group: GroupId,
        raft: &Raft,
    ) -> Result<(), ProposeError> {
        let Some(quic) = &self.proposer.quic else {
            return Ok(());
        };
        let mut metrics = raft.metrics();
        let index = loop {
            let leader = metrics.borrow_and_update().current_leader;
            break match leader {
                None => return Err(ProposeError::NoLeader { group }),
                Some(leader) if leader == self.node_id => quic.read_index_here(raft, group).await,
                Some(leader) => {
                    match while_leader(&mut metrics, leader, quic.read_index(leader, group)).await {
                        LeaderCall::Done(index) => index,
                        LeaderCall::Moved => continue,
                        LeaderCall::Stopped => Err(LeaderError::Stopped),
                    }
                }
            };
        }
        .map_err(|e| ProposeError::from_leader(group, e))?;
        raft.wait(Some(Duration::from_secs(10)))
            .applied_index_at_least(Some(index), "read index")
            .await
            .map_err(|_| ProposeError::NoLeader { group })?;
        Ok(())
    }

    /// This node's id.
    pub fn node_id(&self) -> u64 {
        self.node_id
    }

    /// Makes node `to` the leader of `group` (see `optiprism_consensus::transfer`); asked of
    /// any node, run by the group's leader.
    pub async fn transfer_leader(&self, group: GroupId, to: u64) -> Result<(), LeaderError> {
        match &self.proposer.quic {
            Some(quic) => quic.transfer_leader(group, to).await,
            None if to == self.node_id => Ok(()),
            None => Err(LeaderError::Failed(format!(
                "this node runs alone: there is no node {to} to lead {group}"
            ))),
        }
    }

    /// Whether the node takes traffic: not shutting down or draining, and the metadata group
    /// and every partition held here have a leader.
    pub fn is_ready(&self) -> bool {
        !self.is_shutting_down()
            && !self.is_draining()
            && self.groups().iter().all(|(_, r)| {
                let metrics = r.metrics();
                let m = metrics.borrow();
                m.current_leader.is_some() && m.running_state.is_ok()
            })
    }

    /// The groups here that an error stopped (not a shutdown), with the error. Such a group
    /// takes no writes until the node restarts: the Raft log stops at its first failed write
    /// or sync, as what reached the disk after it is unknown.
    pub fn failed_groups(&self) -> Vec<(GroupId, String)> {
        self.groups()
            .into_iter()
            .filter_map(|(group, raft)| Some((group, failure(&raft.metrics().borrow())?)))
            .collect()
    }

    /// The partitions here whose sealing failed, with the error: they keep taking events
    /// (the Raft log holds them) but seal nothing until a retry of the failed seal succeeds.
    pub fn failed_seals(&self) -> Vec<(GroupId, String)> {
        self.hosted()
            .iter()
            .filter_map(|g| Some((g.group.id, g.seal_failure.error()?)))
            .collect()
    }

    /// Whether an operator drained this node (see [`NodeShared::drain`]).
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Marks the node drained (or not): `/readyz` answers 503 so load balancers move traffic
    /// away; requests that still arrive are served.
    pub fn set_draining(&self, draining: bool) {
        self.draining.store(draining, Ordering::SeqCst);
    }

    /// Per-group status for `/metrics` (and operators).
    pub fn group_status(&self) -> Vec<GroupStatus> {
        let mut seals: BTreeMap<GroupId, String> = self.failed_seals().into_iter().collect();
        self.groups()
            .into_iter()
            .map(|(group, raft)| {
                let m = raft.metrics().borrow().clone();
                GroupStatus {
                    group,
                    leader: m.current_leader,
                    is_leader: m.current_leader == Some(self.node_id),
                    applied: m.last_applied.map(|l| l.index).unwrap_or(0),
                    last_log: m.last_log_index.unwrap_or(0),
                    purged: m.purged.map(|l| l.index),
                    snapshot: m.snapshot.map(|l| l.index),
                    voters: m.membership_config.membership().voter_ids().collect(),
                    learners: m.membership_config.membership().learner_ids().collect(),
                    replication: m.replication.as_ref().map(|r| {
                        r.iter()
                            .map(|(id, matched)| (*id, matched.map(|l| l.index).unwrap_or(0)))
                            .collect()
                    }),
                    addresses: m
                        .membership_config
                        .membership()
                        .nodes()
                        .map(|(id, addr)| (*id, addr.clone()))
                        .collect(),
                    failed: failure(&m),
                    seal_failed: seals.remove(&group),
                }
            })
            .collect()
    }

    /// Project by name.
    pub fn project(&self, name: &str) -> Option<Project> {
        self.metadata.read(|m| m.project_by_name(name).cloned())
    }

    /// Seals every partition now and waits until the chunks are written.
    pub fn seal_all(&self) {
        for g in self.hosted() {
            if let Err(e) = g.group.state_machine.persist_now() {
                tracing::error!(partition_id = %g.group.id, error = %e, "sealing failed");
            }
        }
    }

    /// Starts draining: `/readyz` turns unready and new writes get 503 with `Retry-After`, while
    /// requests already in flight finish.
    pub fn begin_drain(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
    }

    /// Stops taking writes, seals, stops the groups and flushes storage.
    pub async fn shutdown(&self) {
        self.begin_drain();
        self.seal_all();
        for g in self.hosted() {
            let _ = g.group.raft.shutdown().await;
        }
        let _ = self.meta.raft.shutdown().await;
        if let Some(quic) = &self.proposer.quic {
            quic.close();
        }
        let db = self.db.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || db.flush())
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()))
        {
            tracing::error!(error = %e, "final flush failed");
        }
        // Appends and votes are synced as they happen; this keeps the last committed markers.
        if let Err(e) = self.hosting.storage.wal.sync().await {
            tracing::error!(error = %e, "final sync of the raft log failed");
        }
    }
}

fn random_key(prefix: &str) -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    let n: u128 = rng.random();
    format!("{prefix}{n:032x}")
}

async fn wait_for_leader(raft: &Raft, group: GroupId, members: usize) -> anyhow::Result<()> {
    raft.wait(Some(Duration::from_secs(120)))
        .metrics(|m| m.current_leader.is_some(), "a leader")
        .await
        .with_context(|| {
            if members > 1 {
                format!(
                    "{group} elected no leader within 120 s: are a majority of the {members} initial members running and reachable?"
                )
            } else {
                format!("{group} elected no leader within 120 s")
            }
        })?;
    Ok(())
}

/// Initializes `group` with `members` unless this node has already taken part in it (it holds
/// the initial membership, or voted for a member that initialized it).
async fn initialize(
    raft: &Raft,
    group: GroupId,
    members: &BTreeMap<u64, NodeAddr>,
) -> anyhow::Result<()> {
    use openraft::error::{InitializeError, RaftError};
    if raft.is_initialized().await? {
        return Ok(());
    }
    match raft.initialize(members.clone()).await {
        Ok(()) | Err(RaftError::APIError(InitializeError::NotAllowed(_))) => Ok(()),
        Err(e) => Err(e).with_context(|| format!("initializing {group}")),
    }
}

/// The initial members with their addresses; a node alone is its own single member.
pub(crate) fn initial_members(config: &NodeConfig) -> BTreeMap<u64, NodeAddr> {
    if config.cluster.initial_members.is_empty() {
        let advertise =
            |listen: &String, adv: &Option<String>| adv.clone().unwrap_or_else(|| listen.clone());
        let me = NodeAddr {
            raft: advertise(&config.node.raft_listen, &config.node.raft_advertise),
            http: advertise(&config.node.http_listen, &config.node.http_advertise),
            flight: advertise(&config.node.flight_listen, &config.node.flight_advertise),
        };
        return BTreeMap::from([(config.node.id, me)]);
    }
    config
        .cluster
        .initial_members
        .iter()
        .map(|m| {
            let addr = NodeAddr {
                raft: m.raft.clone(),
                http: m.http.clone(),
                flight: m.flight.clone(),
            };
            (m.id, addr)
        })
        .collect()
}

/// How this node's groups reach the others: in-process for a node alone, QUIC with mutual TLS
/// in a cluster.
#[derive(Clone)]
pub(crate) enum Network {
    Local(Arc<LocalRouter>),
    Quic(Arc<QuicTransport>),
}

impl Network {
    async fn start(config: &NodeConfig) -> anyhow::Result<Network> {
        if !config.is_cluster() {
            return Ok(Network::Local(LocalRouter::new()));
        }
        let identity = node_identity(config).await?;
        let listen: std::net::SocketAddr = tokio::net::lookup_host(&config.node.raft_listen)
            .await
            .ok()
            .and_then(|mut a| a.next())
            .with_context(|| {
                format!(
                    "`node.raft-listen`: cannot resolve {}",
                    config.node.raft_listen
                )
            })?;
        let quic = QuicTransport::bind(&identity, listen)?;
        for (id, addr) in initial_members(config) {
            if id != config.node.id {
                quic.set_peer(id, addr.raft);
            }
        }
        Ok(Network::Quic(quic))
    }

    pub(crate) fn transport(&self) -> Arc<dyn RaftTransport> {
        match self {
            Network::Local(router) => Arc::clone(router) as Arc<dyn RaftTransport>,
            Network::Quic(quic) => Arc::clone(quic) as Arc<dyn RaftTransport>,
        }
    }

    fn quic(&self) -> Option<Arc<QuicTransport>> {
        match self {
            Network::Local(_) => None,
            Network::Quic(quic) => Some(Arc::clone(quic)),
        }
    }

    pub(crate) fn serve(&self, node_id: u64, group: GroupId, raft: &Raft) {
        match self {
            Network::Local(router) => router.register(node_id, group, raft.clone()),
            Network::Quic(quic) => quic.register(group, raft.clone()),
        }
    }

    /// Stops serving a group moved away (a node alone never moves one).
    pub(crate) fn unserve(&self, group: GroupId) {
        if let Network::Quic(quic) = self {
            quic.unregister(group);
        }
    }
}

/// This node's certificate: read from `{data-dir}/tls/`, or issued there on first start from
/// the cluster CA in `cluster.ca-dir` (which the first node to get here creates).
async fn node_identity(config: &NodeConfig) -> anyhow::Result<NodeIdentity> {
    let dir = config.node.data_dir.join("tls");
    let id = config.node.id;
    if dir.join("node.pem").exists() {
        return Ok(NodeIdentity::load(&dir, id)?);
    }
    let ca_dir = &config.cluster.ca_dir;
    std::fs::create_dir_all(ca_dir)
        .with_context(|| format!("`cluster.ca-dir`: cannot create {}", ca_dir.display()))?;
    let claim = ca_dir.join("creating");
    let ca = match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&claim)
    {
        // This node claimed the CA's creation, unless it already exists.
        Ok(_) if ca_dir.join("ca.key").exists() => ClusterCa::load(ca_dir)?,
        Ok(_) => {
            let ca = ClusterCa::generate("optiprism")?;
            ca.save(ca_dir)?;
            tracing::info!(ca_dir = %ca_dir.display(), "created the cluster CA");
            ca
        }
        // Another node is creating it (or did): wait for both files.
        Err(_) => {
            let mut waited = 0;
            loop {
                if let Ok(ca) = ClusterCa::load(ca_dir)
                    && ca.issue(id).is_ok()
                {
                    break ca;
                }
                if waited >= 300 {
                    anyhow::bail!(
                        "`cluster.ca-dir`: {} is claimed but holds no usable CA after 30 s; if no node is starting, delete {} and retry",
                        ca_dir.display(),
                        claim.display()
                    );
                }
                waited += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let identity = ca.issue(id)?;
    identity.save(&dir)?;
    tracing::info!(node_id = id, dir = %dir.display(), "issued this node's certificate");
    Ok(identity)
}

/// Starts storage and every Raft group, and bootstraps a fresh node.
pub async fn start(
    config: NodeConfig,
    query_runtime: tokio::runtime::Handle,
) -> anyhow::Result<Arc<NodeShared>> {
    config.validate()?;
    let node_id = config.node.id;
    std::fs::create_dir_all(&config.node.data_dir).with_context(|| {
        format!(
            "cannot create data directory {}",
            config.node.data_dir.display()
        )
    })?;
    let sled_dir = config.node.data_dir.join("sled");
    let db = sled::Config::new()
        .path(&sled_dir)
        .cache_capacity(256 << 20)
        .mode(sled::Mode::HighThroughput)
        .open()
        .with_context(|| {
            format!(
                "cannot open storage in {} (is another prism using it?)",
                config.node.data_dir.display()
            )
        })?;
    // The partition count decides where every person's events live: it cannot change later.
    let node_tree = db.open_tree("node")?;
    let partitions = config.cluster.partitions;
    match node_tree.get("partitions")? {
        Some(v) => {
            let stored =
                u32::from_be_bytes(v.as_ref().try_into().context("corrupt partition count")?);
            if stored != partitions {
                anyhow::bail!(
                    "`cluster.partitions`: the data directory was created with {stored} partitions, not {partitions}"
                );
            }
        }
        None => {
            node_tree.insert("partitions", &partitions.to_be_bytes())?;
        }
    }
    let wal_dir = config.node.data_dir.join("raft-wal");
    let wal = optiprism_consensus::Wal::open(&wal_dir)
        .with_context(|| format!("cannot open the raft log in {}", wal_dir.display()))?;
    let storage = NodeStorage {
        db: db.clone(),
        // sled 0.34 keeps its log in the file `db` of its directory.
        sled_log: sled_dir.join("db"),
        wal,
    };
    let network = Network::start(&config).await?;
    let transport = network.transport();
    let groups = config.group_config();
    let meta_core =
        MetadataCore::open(&db).map_err(|e| anyhow::anyhow!("cannot open metadata: {e}"))?;
    let metadata = meta_core.handle();
    let member_ids: Vec<u64> = initial_members(&config).keys().copied().collect();
    let proposer = Proposer {
        node_id,
        quic: network.quic(),
        metadata: metadata.clone(),
        initial_placement: Arc::new(crate::placement::initial_placement(
            &member_ids,
            partitions,
            config.cluster.replication_factor,
        )),
        leader_hints: Arc::default(),
    };
    let (raft, state_machine, _) = start_group(
        node_id,
        GroupId::METADATA,
        &storage,
        meta_core,
        Arc::clone(&transport),
        &groups,
    )
    .await?;
    network.serve(node_id, GroupId::METADATA, &raft);
    let meta = Group {
        id: GroupId::METADATA,
        raft,
        state_machine,
    };
    let metrics = Arc::new(Metrics::default());
    metrics.watch_leader_changes(GroupId::METADATA, &meta.raft);
    let registry = crate::query::PartitionRegistry::default();
    let node = Arc::new(NodeShared {
        query: QueryEngine::new(
            Arc::clone(&registry),
            partitions,
            metadata.clone(),
            config.query.threads,
        ),
        metadata,
        metrics,
        query_runtime,
        node_id,
        proposer,
        meta,
        partitions: RwLock::default(),
        remote: parking_lot::Mutex::default(),
        hosting: crate::placement::Hosting {
            paths: crate::storage::partition::DataPaths {
                chunks: config.node.data_dir.join("chunks"),
                sled_log: storage.sled_log.clone(),
            },
            storage,
            network,
            groups,
            tokens: Arc::new(Tokens::new()),
            seal_rows: config.storage.seal_rows,
            linger: config.ingest.linger.0,
            data: registry,
        },
        partition_count: partitions,
        shutting_down: AtomicBool::new(false),
        draining: AtomicBool::new(false),
        db,
        config,
    });
    if node.proposer.quic.is_some() {
        node.query.set_remote(
            crate::remote::FlightRemote::new(&node) as Arc<dyn crate::query::RemotePartitions>
        );
    }
    let members = initial_members(&node.config);
    let bootstrap = members.keys().next() == Some(&node_id);
    // The partitions that live here: by the partition map, or on a fresh cluster by the initial
    // placement every member computes alike from the configuration.
    let placement = node.placement();
    for (&p, replicas) in &placement {
        if replicas.contains(&node_id) {
            node.host(p).await?;
        }
    }
    let joining = !members.contains_key(&node_id);
    if joining {
        tracing::info!(
            node_id,
            "not an initial member: waiting to be added (`prismctl node add`)"
        );
    } else {
        initialize_groups(&node, &members, &placement).await?;
    }
    ensure_default_project(&node, bootstrap, joining).await?;
    if bootstrap {
        node.record_initial_placement(&placement).await?;
    }
    if !node.config.is_cluster() {
        record_own_addresses(&node).await?;
    }
    Ok(node)
}

/// A node alone records its addresses in its groups' memberships when it is first started.
/// Started again with other `--http` or `--flight` addresses, it records the new ones:
/// `prismctl` finds a node's Flight endpoint through them, and would dial the old.
async fn record_own_addresses(node: &NodeShared) -> anyhow::Result<()> {
    let id = node.node_id;
    let Some(wanted) = initial_members(&node.config).remove(&id) else {
        return Ok(());
    };
    let hosted = node.hosted();
    let groups = std::iter::once((node.meta.id, node.meta.raft.clone()))
        .chain(hosted.iter().map(|g| (g.group.id, g.group.raft.clone())));
    for (group, raft) in groups {
        let recorded = raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .get_node(&id)
            .cloned();
        if recorded.as_ref() == Some(&wanted) {
            continue;
        }
        raft.change_membership(
            openraft::ChangeMembers::SetNodes(BTreeMap::from([(id, wanted.clone())])),
            false,
        )
        .await
        .with_context(|| format!("recording this node's new addresses in {group}"))?;
    }
    Ok(())
}

/// Initializes this node's groups of a fresh cluster, then waits for their leaders.
///
/// The metadata group has every initial member; a partition, the replicas of the initial
/// placement. Each group is initialized first by its designated member, which campaigns at
/// once and so usually leads it: leaders start spread over the members. Initializing with the
/// same members on several nodes is safe (the vote decides), so the lowest id of each group then
/// initializes whatever is still untouched, in case a designated member is not coming.
async fn initialize_groups(
    node: &NodeShared,
    members: &BTreeMap<u64, NodeAddr>,
    placement: &BTreeMap<u32, Vec<u64>>,
) -> anyhow::Result<()> {
    let node_id = node.node_id;
    let hosted = node.hosted();
    let ids: Vec<u64> = members.keys().copied().collect();
    let mut plan = vec![(
        node.meta.id,
        node.meta.raft.clone(),
        members.clone(),
        ids[0],
    )];
    for g in &hosted {
        let p = g.group.id.as_partition().expect("a partition group").0;
        let replicas: BTreeMap<u64, NodeAddr> = placement
            .get(&p)
            .into_iter()
            .flatten()
            .filter_map(|id| Some((*id, members.get(id)?.clone())))
            .collect();
        let designated = crate::placement::designated_member(&ids, p);
        plan.push((g.group.id, g.group.raft.clone(), replicas, designated));
    }
    for (group, raft, replicas, designated) in &plan {
        if *designated == node_id {
            initialize(raft, *group, replicas).await?;
        }
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    for (group, raft, replicas, _) in &plan {
        if replicas.len() > 1 && replicas.keys().next() == Some(&node_id) {
            let _ = raft
                .wait(Some(
                    deadline.saturating_duration_since(tokio::time::Instant::now()),
                ))
                .metrics(|m| m.current_leader.is_some(), "a leader")
                .await;
            initialize(raft, *group, replicas).await?;
        }
    }
    for (group, raft, replicas, _) in &plan {
        wait_for_leader(raft, *group, replicas.len()).await?;
    }
    Ok(())
}

/// Creates the default project on a fresh cluster (its bootstrap node does), or updates its keys
/// when flags pin them. Other nodes of a fresh cluster wait until it has been replicated to them.
async fn ensure_default_project(
    node: &NodeShared,
    bootstrap: bool,
    joining: bool,
) -> anyhow::Result<()> {
    // A node outside the initial members learns the metadata once an operator adds it.
    let mut waited = 0u64;
    while joining && node.project(DEFAULT_PROJECT).is_none() {
        if waited.is_multiple_of(300) {
            let c = &node.config.node;
            tracing::info!(
                "node {} is not a member yet; add it with `prismctl node add --id {} --raft {} --http {} --flight {}`",
                node.node_id,
                node.node_id,
                c.raft_advertise.as_ref().unwrap_or(&c.raft_listen),
                c.http_advertise.as_ref().unwrap_or(&c.http_listen),
                c.flight_advertise.as_ref().unwrap_or(&c.flight_listen),
            );
        }
        waited += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let keys = &node.config.bootstrap;
    let pinned = keys.write_key.is_some() || keys.api_token.is_some();
    if !bootstrap && !pinned {
        for _ in 0..1200 {
            if node.project(DEFAULT_PROJECT).is_some() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        anyhow::bail!("the default project was not created within 120 s");
    }
    let existing = node.project(DEFAULT_PROJECT);
    let write_key = keys
        .write_key
        .clone()
        .or_else(|| existing.as_ref().map(|p| p.write_key.clone()))
        .unwrap_or_else(|| random_key("wk_"));
    let api_token = keys
        .api_token
        .clone()
        .or_else(|| existing.as_ref().map(|p| p.api_token.clone()))
        .unwrap_or_else(|| random_key("pat_"));
    let unchanged = existing
        .as_ref()
        .is_some_and(|p| p.write_key == write_key && p.api_token == api_token);
    if !unchanged {
        // Retried while the metadata group settles on a leader (a fresh cluster's first
        // election may move it).
        let mut attempt = 0;
        loop {
            let command = MetaCommand::UpsertProject {
                name: DEFAULT_PROJECT.into(),
                write_key: write_key.clone(),
                api_token: api_token.clone(),
            };
            match node.propose_metadata(command).await {
                Ok(_) => break,
                Err(e) if e.is_retryable() && attempt < 100 => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}

/// How long from `now` until the wall clock is next at `phase` (0..1) of a `step`.
fn until_phase(now: std::time::SystemTime, step: Duration, phase: f64) -> Duration {
    let step_ns = step.as_nanos().max(1);
    let now_ns = now
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let offset = (phase.clamp(0.0, 1.0) * step_ns as f64) as u128 % step_ns;
    let into = (now_ns + step_ns - offset) % step_ns;
    let mut wait = step_ns - into;
    // Timers run on the monotonic clock and the phase is read from the wall clock: a wake just
    // short of the phase (the wall clock slewed back) would otherwise tick twice in a row.
    if wait * 10 < step_ns {
        wait += step_ns;
    }
    Duration::from_nanos(u64::try_from(wait).unwrap_or(u64::MAX))
}

/// How often [`spawn_failure_watch`] looks for groups an error stopped.
const FAILURE_WATCH_TICK: Duration = Duration::from_millis(200);

/// Stops every group of the node once an error stopped one of them. They share the node's
/// Raft log, which takes no writes after a failed one until the node restarts; a group that
/// has not tried to write since (a leader with no new entries sends heartbeats, which write
/// nothing) would go on leading, and its followers would elect a leader that can write only
/// after its next write failed: for the metadata group, the next new property key or
/// identity merge, which would fail first.
pub fn spawn_failure_watch(node: Arc<NodeShared>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(FAILURE_WATCH_TICK).await;
            if node.is_shutting_down() {
                return;
            }
            let failed = node.failed_groups();
            let Some((group, error)) = failed.first() else {
                continue;
            };
            tracing::error!(
                %group,
                %error,
                "a raft group stopped on an error: stopping every group here until the node restarts"
            );
            for (group, raft) in node.groups() {
                if let Err(e) = raft.shutdown().await {
                    tracing::warn!(%group, error = %e, "stopping the group");
                }
            }
            return;
        }
    })
}

/// Seals partitions periodically so the Raft log (the write-ahead log of unsealed rows) and
/// replay after a crash stay short: each partition at least every `seal-interval`, one at a
/// time in turn (a tick every interval divided by the partitions held). Sealing sorts, encodes
/// and compresses the rows; all partitions at once, on every member of a cluster sharing the
/// cores, was a burst that held acknowledgements up by hundreds of milliseconds.
pub fn spawn_sealer(node: Arc<NodeShared>) -> tokio::task::JoinHandle<()> {
    let interval = node.config.storage.seal_interval.0;
    // Members of a cluster start their rounds at the same moment and host the same
    // partitions, so without an offset every replica of a partition would seal it at once:
    // the bursts of all members would land together on shared cores, and a partition whose
    // voters all pause apply at the same moment stalls its commits. Each member therefore
    // starts at its own point of the round (by the golden ratio of its id: spread for any
    // number of members) and at its own moment within a step.
    let phase = (node.node_id as f64 * 0.618_033_988_75).fract();
    tokio::spawn(async move {
        let mut turn = (phase * node.hosted().len() as f64) as usize;
        loop {
            let hosted = node.hosted();
            let step = interval / u32::try_from(hosted.len().max(1)).unwrap_or(u32::MAX);
            // Steps fall on the wall clock, at this member's phase of the step: members
            // started at different moments (or restarted) still seal apart, where offsets from
            // each one's start cancelled out as often as not.
            tokio::time::sleep(until_phase(std::time::SystemTime::now(), step, phase)).await;
            if node.is_shutting_down() {
                return;
            }
            if hosted.is_empty() {
                continue;
            }
            let g = Arc::clone(&hosted[turn % hosted.len()]);
            turn = turn.wrapping_add(1);
            let sealed = tokio::task::spawn_blocking(move || {
                if let Err(e) = g.group.state_machine.persist_soon() {
                    tracing::error!(partition_id = %g.group.id, error = %e, "sealing failed");
                }
            })
            .await;
            if sealed.is_err() {
                return;
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::until_phase;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn seal_steps_fall_on_each_members_phase_of_the_wall_clock() {
        let step = Duration::from_millis(1_000);
        let at = |ms: u64| UNIX_EPOCH + Duration::from_millis(ms);
        // Phase 0.25 of a 1 s step: every 250 ms past a whole second.
        assert_eq!(
            until_phase(at(10_000), step, 0.25),
            Duration::from_millis(250)
        );
        assert_eq!(
            until_phase(at(10_100), step, 0.25),
            Duration::from_millis(150)
        );
        assert_eq!(
            until_phase(at(10_900), step, 0.25),
            Duration::from_millis(350)
        );
        // Exactly at the phase: the next step, never a zero wait that would spin.
        assert_eq!(until_phase(at(10_250), step, 0.25), step);
        // Just short of it (a wake on the monotonic clock while the wall clock slewed back):
        // the step after, not two ticks in a row.
        assert_eq!(
            until_phase(at(10_240), step, 0.25),
            Duration::from_millis(1_010)
        );
        // Whatever moment two members ask, they wake at their own phases, apart.
        for now in [0, 1, 333, 999, 123_456_789] {
            let a = at(now) + until_phase(at(now), step, 0.618);
            let b = at(now) + until_phase(at(now), step, 0.236);
            let gap = a.duration_since(b).unwrap_or_else(|e| e.duration());
            assert!(
                gap >= Duration::from_millis(381) && gap <= Duration::from_millis(619),
                "{gap:?}"
            );
        }
    }
}
