//! Starting a group: its log, its state machine, its network, and openraft on top.

use crate::flusher::Flusher;
use crate::log_store::SledLogStore;
use crate::network::{NetworkFactory, RaftTransport};
use crate::state_machine::{StateMachineCore, StateMachineStore};
use crate::{GroupId, Raft};
use openraft::{Config, SnapshotPolicy};
use std::sync::Arc;
use std::time::Duration;

/// Timing and log-retention settings shared by every group of a node.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupConfig {
    /// How often a leader heartbeats.
    pub heartbeat_interval: Duration,
    /// Lower bound of the randomized election timeout.
    pub election_timeout_min: Duration,
    /// Upper bound of the randomized election timeout.
    pub election_timeout_max: Duration,
    /// Entries between snapshots (each snapshot lets the log be purged).
    pub snapshot_every_entries: u64,
    /// Entries kept in the log behind the last snapshot, for slow followers.
    pub keep_entries_after_snapshot: u64,
}

impl Default for GroupConfig {
    fn default() -> GroupConfig {
        // Generous timeouts: these machines have two cores shared by queries, ingestion and
        // every group, and a spurious election costs more than a slow failover.
        GroupConfig {
            heartbeat_interval: Duration::from_millis(250),
            election_timeout_min: Duration::from_millis(1_500),
            election_timeout_max: Duration::from_millis(3_000),
            snapshot_every_entries: 2_000,
            keep_entries_after_snapshot: 200,
        }
    }
}

impl GroupConfig {
    /// The openraft configuration of `group`.
    pub fn raft_config(&self, group: GroupId) -> crate::Result<Arc<Config>> {
        let config = Config {
            cluster_name: format!("optiprism-{group}"),
            heartbeat_interval: self.heartbeat_interval.as_millis() as u64,
            election_timeout_min: self.election_timeout_min.as_millis() as u64,
            election_timeout_max: self.election_timeout_max.as_millis() as u64,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(self.snapshot_every_entries),
            max_in_snapshot_log_to_keep: self.keep_entries_after_snapshot,
            purge_batch_size: 64,
            max_payload_entries: 64,
            ..Config::default()
        };
        Ok(Arc::new(config.validate()?))
    }
}

fn snapshot_tree(group: GroupId) -> String {
    format!("g{}.snapshot", group.0)
}

/// Deletes what `db` holds of `group` (its log, vote and markers, snapshot), once its Raft
/// instance here has stopped: a replica moved away.
pub fn drop_group_storage(db: &sled::Db, group: GroupId) -> crate::Result<()> {
    use crate::log_store::{log_tree, meta_tree};
    for tree in [log_tree(group), meta_tree(group), snapshot_tree(group)] {
        db.drop_tree(tree)?;
    }
    Ok(())
}

/// Opens the storage of `group` in `db` and starts its Raft instance.
pub async fn start_group<S: StateMachineCore>(
    node_id: u64,
    group: GroupId,
    db: &sled::Db,
    flusher: Flusher,
    core: S,
    transport: Arc<dyn RaftTransport>,
    config: &GroupConfig,
) -> crate::Result<(Raft, StateMachineStore<S>, SledLogStore)> {
    let log = SledLogStore::open(db, group, flusher)?;
    let snapshots = db.open_tree(snapshot_tree(group))?;
    let state_machine = StateMachineStore::new(core, snapshots)?;
    let raft = Raft::new(
        node_id,
        config.raft_config(group)?,
        NetworkFactory::new(group, transport),
        log.clone(),
        state_machine.clone(),
    )
    .await
    .map_err(|source| crate::Error::Fatal { group, source })?;
    Ok((raft, state_machine, log))
}
