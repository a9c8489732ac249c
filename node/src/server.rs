//! The process: start-up in order, the handles every front end uses, and ordered shutdown.
//!
//! Start-up: open sled, start the group-commit flusher, start the metadata group and every
//! partition group, initialize a fresh single-node cluster, wait for leaders, make sure the
//! default project exists, then open HTTP and Flight. Shutdown runs the other way: stop taking
//! requests, seal every partition (so restart replays little), stop the groups, flush sled.

use crate::config::{DEFAULT_PROJECT, NodeConfig};
use crate::metadata::{MetaCommand, MetaResponse, MetadataCore, MetadataHandle, Project};
use crate::query::QueryEngine;
use crate::storage::batcher::{Batcher, Tokens};
use crate::storage::chunk::StoredEvent;
use crate::storage::partition::{IngestOutcome, PartitionCore};
use anyhow::Context;
use openraft::error::{ClientWriteError, RaftError};
use optiprism_consensus::flusher::Flusher;
use optiprism_consensus::{
    Command, GroupId, LocalRouter, NodeAddr, Raft, StateMachineStore, start_group,
};
use optiprism_types::PartitionId;
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
    /// Whether the same proposal may succeed later.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            ProposeError::NoLeader { .. } | ProposeError::ShuttingDown
        )
    }
}

/// Counters exported on `/metrics`.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Events stored.
    pub ingest_accepted: AtomicU64,
    /// Events dropped as duplicates.
    pub ingest_duplicates: AtomicU64,
    /// Requests rejected (4xx).
    pub ingest_rejected: AtomicU64,
    /// Queries answered.
    pub queries: AtomicU64,
    /// Queries failed.
    pub queries_failed: AtomicU64,
}

impl Metrics {
    /// Records an ingested batch.
    pub fn record_ingest(&self, accepted: u32, duplicates: u32) {
        self.ingest_accepted
            .fetch_add(u64::from(accepted), Ordering::Relaxed);
        self.ingest_duplicates
            .fetch_add(u64::from(duplicates), Ordering::Relaxed);
    }
}

struct Group<S> {
    id: GroupId,
    raft: Raft,
    state_machine: StateMachineStore<S>,
}

struct PartitionGroup {
    group: Group<PartitionCore>,
    batcher: Batcher,
}

/// Proposes `bytes` to `raft`, mapping openraft's errors to what callers act on.
pub async fn propose_to(
    group: GroupId,
    raft: &Raft,
    bytes: Vec<u8>,
) -> Result<Vec<u8>, ProposeError> {
    match raft.client_write(Command(bytes)).await {
        Ok(response) => Ok(response.data.0),
        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => {
            Err(ProposeError::NoLeader { group })
        }
        Err(RaftError::APIError(e)) => Err(ProposeError::Fatal {
            group,
            message: e.to_string(),
        }),
        Err(RaftError::Fatal(openraft::error::Fatal::Stopped)) => Err(ProposeError::ShuttingDown),
        Err(RaftError::Fatal(e)) => Err(ProposeError::Fatal {
            group,
            message: e.to_string(),
        }),
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
    pub metrics: Metrics,
    /// The runtime queries run on.
    pub query_runtime: tokio::runtime::Handle,
    node_id: u64,
    meta: Group<MetadataCore>,
    partitions: Vec<PartitionGroup>,
    shutting_down: AtomicBool,
    db: sled::Db,
}

impl std::fmt::Debug for NodeShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeShared")
            .field("node_id", &self.node_id)
            .field("partitions", &self.partitions.len())
            .finish()
    }
}

impl NodeShared {
    /// Number of partitions.
    pub fn partition_count(&self) -> u32 {
        self.partitions.len() as u32
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
        propose_to(group, raft, bytes).await
    }

    /// Commits a metadata command; returns once it is applied.
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
        let partition = &self.partitions[p.0 as usize];
        partition
            .batcher
            .ingest(partition.group.id, project, events)
            .await
    }

    /// Whether every group has a leader and the node is not shutting down.
    pub fn is_ready(&self) -> bool {
        !self.is_shutting_down()
            && std::iter::once(&self.meta.raft)
                .chain(self.partitions.iter().map(|g| &g.group.raft))
                .all(|r| r.metrics().borrow().current_leader.is_some())
    }

    /// Per-group status lines for `/metrics`: (group, is leader, last applied, last log index).
    pub fn group_status(&self) -> Vec<(GroupId, bool, u64, u64)> {
        let mut out = Vec::new();
        let mut push = |id: GroupId, raft: &Raft| {
            let m = raft.metrics().borrow().clone();
            out.push((
                id,
                m.current_leader == Some(self.node_id),
                m.last_applied.map(|l| l.index).unwrap_or(0),
                m.last_log_index.unwrap_or(0),
            ));
        };
        push(self.meta.id, &self.meta.raft);
        for g in &self.partitions {
            push(g.group.id, &g.group.raft);
        }
        out
    }

    /// Project by name.
    pub fn project(&self, name: &str) -> Option<Project> {
        self.metadata.read(|m| m.project_by_name(name).cloned())
    }

    /// Seals every partition now.
    pub fn seal_all(&self) {
        for g in &self.partitions {
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
        for g in &self.partitions {
            let _ = g.group.raft.shutdown().await;
        }
        let _ = self.meta.raft.shutdown().await;
        if let Err(e) = self.db.flush_async().await {
            tracing::error!(error = %e, "final flush failed");
        }
    }
}

fn random_key(prefix: &str) -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    let n: u128 = rng.random();
    format!("{prefix}{n:032x}")
}

async fn wait_for_leader(raft: &Raft, node_id: u64, group: GroupId) -> anyhow::Result<()> {
    raft.wait(Some(Duration::from_secs(60)))
        .current_leader(node_id, "leader")
        .await
        .with_context(|| format!("{group} elected no leader within 60 s"))?;
    Ok(())
}

/// Starts storage and every Raft group, and bootstraps a fresh node.
pub async fn start(
    config: NodeConfig,
    query_runtime: tokio::runtime::Handle,
) -> anyhow::Result<Arc<NodeShared>> {
    config.validate()?;
    if config.cluster.initial_members.len() > 1 {
        anyhow::bail!(
            "`cluster.initial-members`: this build runs single-node clusters only (replication over the QUIC transport is not built yet)"
        );
    }
    let node_id = config.node.id;
    std::fs::create_dir_all(&config.node.data_dir).with_context(|| {
        format!(
            "cannot create data directory {}",
            config.node.data_dir.display()
        )
    })?;
    let db = sled::Config::new()
        .path(config.node.data_dir.join("sled"))
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
    let flusher = Flusher::start(db.clone());
    let router = LocalRouter::new();
    let groups = config.group_config();
    let meta_core =
        MetadataCore::open(&db).map_err(|e| anyhow::anyhow!("cannot open metadata: {e}"))?;
    let metadata = meta_core.handle();
    let (raft, state_machine, _) = start_group(
        node_id,
        GroupId::METADATA,
        &db,
        flusher.clone(),
        meta_core,
        Arc::<LocalRouter>::clone(&router),
        &groups,
    )
    .await?;
    router.register(node_id, GroupId::METADATA, raft.clone());
    let meta = Group {
        id: GroupId::METADATA,
        raft,
        state_machine,
    };
    let tokens = Arc::new(Tokens::new());
    let mut partition_groups = Vec::new();
    let mut partition_data = Vec::new();
    for p in 0..partitions {
        let core = PartitionCore::open(&db, PartitionId(p), config.storage.seal_rows)
            .map_err(|e| anyhow::anyhow!("cannot open partition {p}: {e}"))?;
        partition_data.push(core.data());
        let local = core.local_proposals();
        let group = GroupId::partition(PartitionId(p));
        let (raft, state_machine, _) = start_group(
            node_id,
            group,
            &db,
            flusher.clone(),
            core,
            Arc::<LocalRouter>::clone(&router),
            &groups,
        )
        .await?;
        router.register(node_id, group, raft.clone());
        partition_groups.push(PartitionGroup {
            batcher: Batcher::start(group, raft.clone(), local, Arc::clone(&tokens)),
            group: Group {
                id: group,
                raft,
                state_machine,
            },
        });
    }
    let advertise =
        |listen: &String, adv: &Option<String>| adv.clone().unwrap_or_else(|| listen.clone());
    let me = NodeAddr {
        raft: advertise(&config.node.raft_listen, &config.node.raft_advertise),
        http: advertise(&config.node.http_listen, &config.node.http_advertise),
        flight: advertise(&config.node.flight_listen, &config.node.flight_advertise),
    };
    for raft in std::iter::once(&meta.raft).chain(partition_groups.iter().map(|g| &g.group.raft)) {
        if !raft.is_initialized().await? {
            raft.initialize(BTreeMap::from([(node_id, me.clone())]))
                .await
                .context("initializing the cluster")?;
        }
    }
    wait_for_leader(&meta.raft, node_id, meta.id).await?;
    for g in &partition_groups {
        wait_for_leader(&g.group.raft, node_id, g.group.id).await?;
    }
    let node = Arc::new(NodeShared {
        query: QueryEngine::new(partition_data, metadata.clone(), config.query.threads),
        metadata,
        metrics: Metrics::default(),
        query_runtime,
        node_id,
        meta,
        partitions: partition_groups,
        shutting_down: AtomicBool::new(false),
        db,
        config,
    });
    ensure_default_project(&node).await?;
    Ok(node)
}

async fn ensure_default_project(node: &NodeShared) -> anyhow::Result<()> {
    let existing = node.project(DEFAULT_PROJECT);
    let keys = &node.config.bootstrap;
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
        node.propose_metadata(MetaCommand::UpsertProject {
            name: DEFAULT_PROJECT.into(),
            write_key,
            api_token,
        })
        .await?;
    }
    Ok(())
}

/// Seals partitions periodically so the Raft log (the write-ahead log of unsealed rows) and
/// replay after a crash stay short.
pub fn spawn_sealer(node: Arc<NodeShared>) -> tokio::task::JoinHandle<()> {
    let interval = node.config.storage.seal_interval.0;
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.tick().await;
        loop {
            tick.tick().await;
            if node.is_shutting_down() {
                return;
            }
            let n = Arc::clone(&node);
            if tokio::task::spawn_blocking(move || n.seal_all())
                .await
                .is_err()
            {
                return;
            }
        }
    })
}
