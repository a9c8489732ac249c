//! Where partitions live: the partition map, hosting partition groups on this node as the map
//! changes, and moving a replica from one node to another.
//!
//! The partition map (partition → the nodes holding a replica) is part of the metadata group's
//! state, so every node reads the same map. A fresh cluster's map is computed alike by every
//! initial member from the configuration (replicas of partition `p` on the `replication-factor`
//! members starting at the `p`-th, round robin), and recorded by the bootstrap node.
//!
//! Each node hosts a partition group exactly when the map lists it: a watcher starts the groups
//! newly placed here (empty, to be filled by the leader's replication) and stops and deletes
//! those placed elsewhere. Moving a replica is run by the partition's leader in four committed
//! steps, each safe to stop after: record the new node in the map (it starts an empty group),
//! add it as a learner and wait until it caught up, replace the old voter with it in the
//! group's Raft membership, record the final map (the old node drops its copy).

use crate::metadata::MetaCommand;
use crate::query::PartitionRegistry;
use crate::server::{Group, Network, NodeShared, PartitionGroup, ProposeError};
use crate::storage::batcher::{self, Batcher, Tokens};
use crate::storage::partition::PartitionCore;
use anyhow::Context;
use optiprism_consensus::{GroupConfig, GroupId, NodeAddr, NodeStorage, start_group};
use optiprism_types::PartitionId;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

/// What starting a partition group on this node takes.
pub(crate) struct Hosting {
    /// sled (the partitions' trees) and the Raft log.
    pub(crate) storage: NodeStorage,
    /// Where partitions keep their data beside the sled trees.
    pub(crate) paths: crate::storage::partition::DataPaths,
    pub(crate) network: Network,
    pub(crate) groups: GroupConfig,
    pub(crate) tokens: Arc<Tokens>,
    pub(crate) seal_rows: usize,
    /// `ingest.linger`.
    pub(crate) linger: Duration,
    pub(crate) data: PartitionRegistry,
}

/// The initial partition map: partition `p` on the `replication_factor` members starting at the
/// `p`-th (members in id order, round robin).
pub fn initial_placement(
    members: &[u64],
    partitions: u32,
    replication_factor: u32,
) -> BTreeMap<u32, Vec<u64>> {
    let n = members.len();
    (0..partitions)
        .map(|p| {
            let mut replicas: Vec<u64> = (0..(replication_factor as usize).min(n))
                .map(|i| members[(p as usize + i) % n])
                .collect();
            replicas.sort_unstable();
            (p, replicas)
        })
        .collect()
}

/// The member that initializes partition `p` on a fresh cluster (and so usually leads it
/// first): the first of its initial replicas, so leaders start spread.
pub fn designated_member(members: &[u64], p: u32) -> u64 {
    members[p as usize % members.len()]
}

/// Why a replica could not be moved.
#[derive(Debug, thiserror::Error)]
pub enum MoveError {
    /// The request names something impossible.
    #[error("{0}")]
    Invalid(String),
    /// Another node leads the group and runs moves of it.
    #[error("node {leader:?} leads {group}; ask it")]
    NotLeader {
        /// The group.
        group: GroupId,
        /// Its leader, if known.
        leader: Option<u64>,
    },
    /// A step did not complete; the map is back as it was.
    #[error("{0}")]
    Failed(String),
    /// Committing to the metadata group failed.
    #[error(transparent)]
    Propose(#[from] ProposeError),
}

impl NodeShared {
    /// The partition map: as recorded in the metadata group, or, before the bootstrap node
    /// recorded it, the initial placement of the configuration.
    pub fn placement(&self) -> BTreeMap<u32, Vec<u64>> {
        self.proposer.placement()
    }

    /// Records the initial partition map, unless one is recorded (the bootstrap node does this
    /// once the metadata group has a leader).
    pub(crate) async fn record_initial_placement(
        &self,
        placement: &BTreeMap<u32, Vec<u64>>,
    ) -> anyhow::Result<()> {
        if self.metadata.read(|m| !m.placement.is_empty()) {
            return Ok(());
        }
        let command = MetaCommand::Batch(
            placement
                .iter()
                .map(|(&partition, replicas)| MetaCommand::SetPlacement {
                    partition,
                    replicas: replicas.clone(),
                })
                .collect(),
        );
        for attempt in 0.. {
            match self.propose_metadata(command.clone()).await {
                Ok(_) => return Ok(()),
                Err(e) if e.is_retryable() && attempt < 100 => {
                    tokio::time::sleep(Duration::from_millis(200)).await
                }
                Err(e) => return Err(e).context("recording the partition map"),
            }
        }
        unreachable!("the loop returns")
    }

    /// Starts partition `p`'s group here (with whatever this node stored of it).
    pub(crate) async fn host(&self, p: u32) -> anyhow::Result<()> {
        if self.partitions.read().contains_key(&p) {
            return Ok(());
        }
        let h = &self.hosting;
        let core = PartitionCore::open(&h.storage.db, &h.paths, PartitionId(p), h.seal_rows)
            .map_err(|e| anyhow::anyhow!("cannot open partition {p}: {e}"))?;
        let data = core.data();
        let local = core.local_proposals();
        let seal_failure = core.seal_failure();
        let group = GroupId::partition(PartitionId(p));
        let (raft, state_machine, _) = start_group(
            self.node_id,
            group,
            &h.storage,
            core,
            h.network.transport(),
            &h.groups,
        )
        .await?;
        h.network.serve(self.node_id, group, &raft);
        self.metrics.watch_leader_changes(group, &raft);
        let hosted = Arc::new(PartitionGroup {
            batcher: Batcher::start(batcher::Group {
                group,
                raft: Some(raft.clone()),
                proposer: self.proposer.clone(),
                local: Some(local),
                tokens: Arc::clone(&h.tokens),
                linger: h.linger,
            }),
            group: Group {
                id: group,
                raft,
                state_machine,
            },
            seal_failure,
        });
        h.data.write().insert(p, data);
        self.partitions.write().insert(p, hosted);
        self.remote.lock().remove(&p);
        tracing::info!(node_id = self.node_id, partition = p, "hosting partition");
        Ok(())
    }

    /// Stops partition `p`'s group here and deletes what this node stored of it.
    pub(crate) async fn unhost(&self, p: u32) -> anyhow::Result<()> {
        let Some(hosted) = self.partitions.write().remove(&p) else {
            return Ok(());
        };
        let h = &self.hosting;
        h.data.write().remove(&p);
        h.network.unserve(hosted.group.id);
        let _ = hosted.group.raft.shutdown().await;
        let group = hosted.group.id;
        optiprism_consensus::drop_group_storage(&h.storage, group).await?;
        // A seal the periodic sealer asks for from now on must not write into the directory.
        hosted.group.state_machine.with_core(|core| core.close());
        let (db, paths) = (h.storage.db.clone(), h.paths.clone());
        tokio::task::spawn_blocking(move || {
            crate::storage::partition::drop_partition_storage(&db, &paths, PartitionId(p))
        })
        .await?
        .map_err(|e| anyhow::anyhow!("dropping partition {p}: {e}"))?;
        tracing::info!(
            node_id = self.node_id,
            partition = p,
            "dropped partition moved away"
        );
        Ok(())
    }

    /// Brings the hosted partitions in line with the recorded partition map, and teaches the
    /// transport every member's address.
    pub(crate) async fn reconcile_placement(&self) -> anyhow::Result<()> {
        if let Some(quic) = &self.proposer.quic {
            for (id, addr) in self.members() {
                if id != self.node_id {
                    quic.set_peer(id, addr.raft);
                }
            }
        }
        let recorded = self.metadata.read(|m| m.placement.clone());
        if recorded.is_empty() {
            return Ok(());
        }
        for (&p, replicas) in &recorded {
            let here = self.partitions.read().contains_key(&p);
            match (here, replicas.contains(&self.node_id)) {
                (false, true) => self.host(p).await?,
                (true, false) => self.unhost(p).await?,
                _ => {}
            }
        }
        Ok(())
    }

    /// The cluster's members (the metadata group's voters and learners) with their addresses.
    pub fn members(&self) -> BTreeMap<u64, NodeAddr> {
        self.meta
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .nodes()
            .map(|(id, addr)| (*id, addr.clone()))
            .collect()
    }

    /// Moves partition `p`'s replica from node `from` to node `to`; run by the partition's
    /// leader (see the module documentation for the steps).
    pub async fn move_replica(&self, p: u32, from: u64, to: u64) -> Result<(), MoveError> {
        let group = GroupId::partition(PartitionId(p));
        if p >= self.partition_count {
            return Err(MoveError::Invalid(format!(
                "`partition`: {p} does not exist (the cluster has {})",
                self.partition_count
            )));
        }
        let hosted = self.partitions.read().get(&p).cloned();
        let placement = self.placement();
        let Some(hosted) = hosted else {
            return Err(MoveError::NotLeader {
                group,
                leader: placement.get(&p).and_then(|r| r.first().copied()),
            });
        };
        let raft = &hosted.group.raft;
        let metrics = raft.metrics().borrow().clone();
        if metrics.current_leader != Some(self.node_id) {
            return Err(MoveError::NotLeader {
                group,
                leader: metrics.current_leader,
            });
        }
        let voters: BTreeSet<u64> = metrics.membership_config.membership().voter_ids().collect();
        if !voters.contains(&from) {
            return Err(MoveError::Invalid(format!(
                "node {from} holds no replica of {group} (replicas: {voters:?})"
            )));
        }
        if voters.contains(&to) {
            return Err(MoveError::Invalid(format!(
                "node {to} already holds a replica of {group}"
            )));
        }
        let Some(to_addr) = self.members().get(&to).cloned() else {
            return Err(MoveError::Invalid(format!(
                "node {to} is not a member of the cluster (add it with `prismctl node add`)"
            )));
        };
        let set = |replicas: &BTreeSet<u64>| MetaCommand::SetPlacement {
            partition: p,
            replicas: replicas.iter().copied().collect(),
        };
        let mut with_new = voters.clone();
        with_new.insert(to);
        self.propose_metadata(set(&with_new)).await?;
        let mut after = with_new.clone();
        after.remove(&from);
        let changed = async {
            tokio::time::timeout(
                Duration::from_secs(300),
                raft.add_learner(to, to_addr, true),
            )
            .await
            .map_err(|_| format!("node {to} did not catch up with {group} within 5 minutes"))?
            .map_err(|e| format!("adding node {to} to {group} as a learner: {e}"))?;
            raft.change_membership(after.clone(), false)
                .await
                .map_err(|e| format!("replacing node {from} with node {to} in {group}: {e}"))?;
            Ok::<(), String>(())
        }
        .await;
        match changed {
            Ok(()) => {
                self.propose_metadata(set(&after)).await?;
                if from == self.node_id {
                    // This node led the group it just left: drop it now rather than at the
                    // next reconciliation, so no one takes it for the leader meanwhile.
                    self.unhost(p)
                        .await
                        .map_err(|e| MoveError::Failed(format!("{e:#}")))?;
                }
                tracing::info!(node_id = self.node_id, %group, from, to, "replica moved");
                Ok(())
            }
            Err(message) => {
                // Back to the replicas the group still has.
                let current: BTreeSet<u64> = raft
                    .metrics()
                    .borrow()
                    .membership_config
                    .membership()
                    .voter_ids()
                    .collect();
                self.propose_metadata(set(&current)).await?;
                Err(MoveError::Failed(message))
            }
        }
    }
}

impl NodeShared {
    /// The metadata group's metrics, if this node leads it; else who does.
    fn lead_metadata(&self) -> Result<openraft::RaftMetrics<u64, NodeAddr>, MoveError> {
        let metrics = self.meta.raft.metrics().borrow().clone();
        if metrics.current_leader != Some(self.node_id) {
            return Err(MoveError::NotLeader {
                group: GroupId::METADATA,
                leader: metrics.current_leader,
            });
        }
        Ok(metrics)
    }

    /// Adds node `id`, reachable at `addr`, to the cluster: a learner of the metadata group
    /// first, a voter once it caught up. Run by the metadata group's leader. It then holds no
    /// partition until replicas are moved to it.
    pub async fn add_node(&self, id: u64, addr: NodeAddr) -> Result<(), MoveError> {
        let metrics = self.lead_metadata()?;
        let membership = metrics.membership_config.membership().clone();
        if membership.voter_ids().any(|v| v == id) {
            return Err(MoveError::Invalid(format!("node {id} is already a member")));
        }
        for (key, value) in [
            ("raft", &addr.raft),
            ("http", &addr.http),
            ("flight", &addr.flight),
        ] {
            if value.parse::<std::net::SocketAddr>().is_err() {
                return Err(MoveError::Invalid(format!(
                    "`{key}`: `{value}` is not an address such as 127.0.0.4:8089"
                )));
            }
        }
        if let Some(quic) = &self.proposer.quic {
            quic.set_peer(id, addr.raft.clone());
        } else {
            return Err(MoveError::Invalid(
                "this node runs alone (`prism up`); start a cluster from cluster.toml to add nodes"
                    .into(),
            ));
        }
        tokio::time::timeout(
            Duration::from_secs(120),
            self.meta.raft.add_learner(id, addr.clone(), true),
        )
        .await
        .map_err(|_| {
            MoveError::Failed(format!(
                "node {id} did not catch up within 2 minutes: is it running at {} with the cluster's CA?",
                addr.raft
            ))
        })?
        .map_err(|e| MoveError::Failed(format!("adding node {id}: {e}")))?;
        let mut voters: BTreeSet<u64> = membership.voter_ids().collect();
        voters.insert(id);
        self.meta
            .raft
            .change_membership(voters, false)
            .await
            .map_err(|e| MoveError::Failed(format!("making node {id} a voter: {e}")))?;
        tracing::info!(node_id = self.node_id, added = id, "node added");
        Ok(())
    }

    /// Removes node `id` from the cluster. Refused while it still holds replicas (decommission
    /// moves them away first), when fewer members than the replication factor would remain, or
    /// when the members left that answer the leader would not be a majority of them.
    pub async fn remove_node(&self, id: u64) -> Result<(), MoveError> {
        let metrics = self.lead_metadata()?;
        let voters: BTreeSet<u64> = metrics.membership_config.membership().voter_ids().collect();
        if !voters.contains(&id) {
            return Err(MoveError::Invalid(format!("node {id} is not a member")));
        }
        let holding: Vec<u32> = self
            .placement()
            .iter()
            .filter(|(_, r)| r.contains(&id))
            .map(|(p, _)| *p)
            .collect();
        if !holding.is_empty() {
            return Err(MoveError::Invalid(format!(
                "node {id} still holds replicas of partitions {holding:?}: `prismctl node decommission --id {id}` moves them away first"
            )));
        }
        let after: BTreeSet<u64> = voters.iter().copied().filter(|&v| v != id).collect();
        let rf = self.config.cluster.replication_factor as usize;
        if after.len() < rf {
            return Err(MoveError::Invalid(format!(
                "removing node {id} would leave {} members, fewer than the replication factor {rf}",
                after.len()
            )));
        }
        // Members that replicate from the leader now (the leader itself included).
        let last = metrics.last_log_index.unwrap_or(0);
        let answering = after
            .iter()
            .filter(|&&v| {
                v == self.node_id
                    || metrics
                        .replication
                        .as_ref()
                        .and_then(|r| r.get(&v))
                        .is_some_and(|m| m.map(|l| l.index).unwrap_or(0) + 1_000 >= last)
            })
            .count();
        if answering * 2 <= after.len() {
            return Err(MoveError::Invalid(format!(
                "removing node {id} would leave {answering} of {} members answering: below a quorum",
                after.len()
            )));
        }
        self.meta
            .raft
            .change_membership(after, false)
            .await
            .map_err(|e| MoveError::Failed(format!("removing node {id}: {e}")))?;
        tracing::info!(node_id = self.node_id, removed = id, "node removed");
        Ok(())
    }

    /// Drains this node (or undoes it): `/readyz` turns unready, and every group it leads is
    /// handed to another voter. The answer lists each transfer's outcome.
    pub async fn drain(&self, draining: bool) -> Vec<(GroupId, Result<u64, String>)> {
        self.set_draining(draining);
        if !draining {
            return Vec::new();
        }
        let led: Vec<(GroupId, Vec<u64>)> = self
            .group_status()
            .into_iter()
            .filter(|g| g.is_leader)
            .map(|g| (g.group, g.voters))
            .collect();
        let transfers = led
            .into_iter()
            .enumerate()
            .map(|(i, (group, voters))| async move {
                let others: Vec<u64> = voters.into_iter().filter(|&v| v != self.node_id).collect();
                if others.is_empty() {
                    return (group, Err("no other voter to lead it".to_string()));
                }
                let to = others[i % others.len()];
                let result = self
                    .transfer_leader(group, to)
                    .await
                    .map(|()| to)
                    .map_err(|e| e.to_string());
                (group, result)
            });
        futures::future::join_all(transfers).await
    }
}

/// Reconciles hosted partitions with the partition map twice a second.
pub fn spawn_placement_watcher(node: Arc<NodeShared>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tick.tick().await;
            if node.is_shutting_down() {
                return;
            }
            if let Err(e) = node.reconcile_placement().await {
                tracing::warn!(error = %format!("{e:#}"), "reconciling the partition map failed");
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initial_placement_spreads_replicas_and_first_replicas() {
        let map = initial_placement(&[1, 2, 3, 4], 8, 3);
        let mut count = BTreeMap::new();
        for (p, replicas) in &map {
            assert_eq!(replicas.len(), 3);
            assert!(replicas.contains(&designated_member(&[1, 2, 3, 4], *p)));
            for r in replicas {
                *count.entry(*r).or_insert(0) += 1;
            }
        }
        assert_eq!(count, BTreeMap::from([(1, 6), (2, 6), (3, 6), (4, 6)]));
        // Replication factor equal to the members: every partition everywhere.
        assert!(
            initial_placement(&[1, 2, 3], 4, 3)
                .values()
                .all(|r| r == &[1, 2, 3])
        );
    }
}
