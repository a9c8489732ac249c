//! Starting a group: its log, its state machine, its network, and openraft on top.

use crate::log_store::{NodeStorage, WalLogStore};
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
    /// Entries between snapshots (each snapshot lets the log be purged); each group on each
    /// member takes a point up to half as many again ([`GroupConfig::snapshot_every`]).
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
    /// Entries between snapshots of `group` on member `node_id`: from `snapshot_every_entries`
    /// to half as many again, at a point fixed by the two.
    ///
    /// Events are spread evenly over partitions, and every replica of a group holds the same
    /// log, so with one count for all every partition would snapshot, persist and purge at the
    /// same moment on every member: a burst on shared cores that held acknowledgements up for
    /// that second. Spread by the golden ratio, as the seals are.
    pub fn snapshot_every(&self, node_id: u64, group: GroupId) -> u64 {
        let phase =
            (f64::from(group.0) * 0.618_033_988_75 + node_id as f64 * 0.414_213_562_37).fract();
        self.snapshot_every_entries + (self.snapshot_every_entries as f64 * 0.5 * phase) as u64
    }

    /// The openraft configuration of `group` on member `node_id`.
    pub fn raft_config(&self, node_id: u64, group: GroupId) -> crate::Result<Arc<Config>> {
        let config = Config {
            cluster_name: format!("optiprism-{group}"),
            heartbeat_interval: self.heartbeat_interval.as_millis() as u64,
            election_timeout_min: self.election_timeout_min.as_millis() as u64,
            election_timeout_max: self.election_timeout_max.as_millis() as u64,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(self.snapshot_every(node_id, group)),
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

/// The sled trees where versions before the WAL kept a group's log entries and its vote and
/// markers.
fn sled_log_trees(group: GroupId) -> [String; 2] {
    [format!("g{}.log", group.0), format!("g{}.meta", group.0)]
}

/// Deletes what this node stores of `group` (its log, vote and markers, snapshot), once its Raft
/// instance here has stopped: a replica moved away. The log forgets the group durably before
/// sled does: otherwise a power loss could leave the log's markers with an empty state machine.
pub async fn drop_group_storage(storage: &NodeStorage, group: GroupId) -> crate::Result<()> {
    storage.wal.drop_group(group)?;
    storage.wal.sync().await?;
    for tree in sled_log_trees(group)
        .into_iter()
        .chain([snapshot_tree(group)])
    {
        storage.db.drop_tree(tree)?;
    }
    Ok(())
}

/// Moves the log a version before the WAL kept of `group` in sled into the WAL, durably, then
/// drops it from sled, durably too, before the group starts. sled's trees still there therefore
/// mean the move did not finish (a crash or an error part way): whatever the WAL holds of the
/// group then is an unfinished copy, which is forgotten and made again.
async fn adopt_sled_log(storage: &NodeStorage, group: GroupId) -> crate::Result<()> {
    use crate::{LogId, decode};
    let [log_name, meta_name] = sled_log_trees(group);
    let names = storage.db.tree_names();
    if !names
        .iter()
        .any(|n| **n == *log_name.as_bytes() || **n == *meta_name.as_bytes())
    {
        return Ok(());
    }
    let wal = &storage.wal;
    let corrupt = |what: &str| {
        let what = format!("{what} of {group} in sled");
        move |source| crate::Error::Corrupt { what, source }
    };
    if wal.knows(group) {
        wal.drop_group(group)?;
    }
    let meta = storage.db.open_tree(&meta_name)?;
    if let Some(bytes) = meta.get(b"last_purged")? {
        let purged: LogId = decode(&bytes).map_err(corrupt("purge point"))?;
        wal.purge(group, purged)?;
    }
    let mut batch = Vec::new();
    let mut moved = 0u64;
    for item in storage.db.open_tree(&log_name)?.iter() {
        let (_, bytes) = item?;
        batch.push(decode(&bytes).map_err(corrupt("log entry"))?);
        if batch.len() == 256 {
            wal.append(group, &batch)?;
            moved += batch.len() as u64;
            batch.clear();
        }
    }
    moved += batch.len() as u64;
    wal.append(group, &batch)?;
    if let Some(bytes) = meta.get(b"vote")? {
        wal.save_vote(group, &decode(&bytes).map_err(corrupt("vote"))?)?;
    }
    if let Some(bytes) = meta.get(b"committed")? {
        let committed: Option<LogId> = decode(&bytes).map_err(corrupt("committed log id"))?;
        wal.save_committed(group, committed)?;
    }
    wal.sync().await?;
    storage.db.drop_tree(log_name)?;
    storage.db.drop_tree(meta_name)?;
    let synced = storage.clone();
    tokio::task::spawn_blocking(move || synced.sync_state())
        .await
        .map_err(std::io::Error::other)??;
    tracing::info!(%group, entries = moved, "moved the raft log from sled to the WAL");
    Ok(())
}

/// Opens the storage of `group` and starts its Raft instance.
pub async fn start_group<S: StateMachineCore>(
    node_id: u64,
    group: GroupId,
    storage: &NodeStorage,
    core: S,
    transport: Arc<dyn RaftTransport>,
    config: &GroupConfig,
) -> crate::Result<(Raft, StateMachineStore<S>, WalLogStore)> {
    adopt_sled_log(storage, group).await?;
    let log = WalLogStore::new(storage, group);
    let snapshots = storage.db.open_tree(snapshot_tree(group))?;
    let state_machine = StateMachineStore::new(core, snapshots)?;
    let raft = Raft::new(
        node_id,
        config.raft_config(node_id, group)?,
        NetworkFactory::new(group, transport),
        log.clone(),
        state_machine.clone(),
    )
    .await
    .map_err(|source| crate::Error::Fatal { group, source })?;
    Ok((raft, state_machine, log))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Command, LogId, TypeConfig, Wal, encode};
    use openraft::{CommittedLeaderId, Entry, EntryPayload, Vote};

    #[test]
    fn groups_and_members_snapshot_at_different_counts_within_half_again() {
        let config = GroupConfig::default();
        let n = config.snapshot_every_entries;
        let counts: Vec<u64> = (1..=3)
            .flat_map(|node| (0..8).map(move |g| (node, GroupId(g))))
            .map(|(node, g)| config.snapshot_every(node, g))
            .collect();
        assert!(
            counts.iter().all(|&c| c >= n && c < n + n / 2),
            "{counts:?}"
        );
        let mut distinct = counts.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), counts.len(), "{counts:?}");
        assert!(
            distinct[distinct.len() - 1] - distinct[0] > n / 3,
            "{counts:?}"
        );
    }

    fn log_id(index: u64) -> LogId {
        LogId::new(CommittedLeaderId::new(2, 1), index)
    }

    fn storage(dir: &std::path::Path) -> NodeStorage {
        NodeStorage {
            db: sled::open(dir.join("sled")).unwrap(),
            sled_log: dir.join("sled/db"),
            wal: Wal::open(&dir.join("raft-wal")).unwrap(),
        }
    }

    /// Writes a group's log as versions before the WAL kept it in sled.
    fn write_sled_log(db: &sled::Db, group: GroupId, entries: std::ops::RangeInclusive<u64>) {
        let [log_name, meta_name] = sled_log_trees(group);
        let log = db.open_tree(log_name).unwrap();
        for i in entries {
            let entry: Entry<TypeConfig> = Entry {
                log_id: log_id(i),
                payload: EntryPayload::Normal(Command(format!("k{i}=v").into_bytes())),
            };
            log.insert(i.to_be_bytes(), encode(&entry)).unwrap();
        }
        let meta = db.open_tree(meta_name).unwrap();
        meta.insert("vote", encode(&Vote::<u64>::new_committed(2, 1)))
            .unwrap();
        meta.insert("committed", encode(&Some(log_id(7)))).unwrap();
        meta.insert("last_purged", encode(&log_id(4))).unwrap();
    }

    #[tokio::test]
    async fn a_log_an_older_version_kept_in_sled_moves_to_the_wal_and_a_move_cut_short_is_made_again()
     {
        let dir = tempfile::tempdir().unwrap();
        let (g, other) = (GroupId(3), GroupId(4));
        {
            let storage = storage(dir.path());
            write_sled_log(&storage.db, g, 5..=9);
            adopt_sled_log(&storage, g).await.unwrap();
            // A group without a log in sled is left alone.
            adopt_sled_log(&storage, other).await.unwrap();
            assert!(!storage.wal.knows(other));
        }
        // After a restart, from the WAL alone: sled's trees are gone.
        let storage = storage(dir.path());
        let names = storage.db.tree_names();
        for tree in sled_log_trees(g) {
            assert!(
                !names.iter().any(|n| **n == *tree.as_bytes()),
                "{tree} kept"
            );
        }
        let indexes: Vec<u64> = (storage.wal.read(g, 0, None).unwrap())
            .iter()
            .map(|e| e.log_id.index)
            .collect();
        assert_eq!(indexes, vec![5, 6, 7, 8, 9]);
        let meta = storage.wal.meta(g);
        assert_eq!(meta.vote, Some(Vote::new_committed(2, 1)));
        assert_eq!(meta.committed, Some(log_id(7)));
        assert_eq!(meta.purged, Some(log_id(4)));
        // A move cut short (here: only the purge point reached the WAL) leaves sled's trees,
        // and the next start makes the copy again from them.
        storage.wal.drop_group(g).unwrap();
        storage.wal.purge(g, log_id(4)).unwrap();
        write_sled_log(&storage.db, g, 5..=9);
        adopt_sled_log(&storage, g).await.unwrap();
        let indexes: Vec<u64> = (storage.wal.read(g, 0, None).unwrap())
            .iter()
            .map(|e| e.log_id.index)
            .collect();
        assert_eq!(indexes, vec![5, 6, 7, 8, 9]);
        assert_eq!(storage.wal.meta(g).vote, Some(Vote::new_committed(2, 1)));
        assert!(
            storage.db.tree_names().len() <= 1,
            "only sled's default tree"
        );
    }
}
