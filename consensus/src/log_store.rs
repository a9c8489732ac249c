//! The Raft log of one group: its view of the node's [`Wal`], with a cache of recent entries.
//!
//! Appends are acknowledged to openraft only after the log's sync thread has made them durable
//! (`fdatasync`), so an entry that openraft counts towards a quorum survives a power loss. Votes
//! are synced before `save_vote` returns.
//!
//! The Raft log is also the write-ahead log of the state machines, which persist lazily to
//! sled: a purge may drop only entries whose effects are durable there. So a purge first
//! flushes sled and syncs its file ([`NodeStorage::sync_state`]), then records the purge point.
//!
//! Entries just appended are kept decoded in a small cache: openraft reads them back right
//! away to apply them, and the cache saves decoding every batch twice.

use crate::wal::Wal;
use crate::{GroupId, LogId, StorageError, TypeConfig};
use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{Entry, OptionalSend, RaftLogReader, StorageIOError, Vote};
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::Arc;

const CACHE_ENTRIES: usize = 512;

type EntryCache = Arc<Mutex<BTreeMap<u64, Entry<TypeConfig>>>>;

/// What a node stores: sled for the state machines and snapshots, the [`Wal`] for Raft logs.
#[derive(Debug, Clone)]
pub struct NodeStorage {
    /// The state machines' and snapshots' database.
    pub db: sled::Db,
    /// sled's log file, synced before a purge (sled's own flush is `sync_file_range`).
    pub sled_log: PathBuf,
    /// Every group's Raft log.
    pub wal: Wal,
}

impl NodeStorage {
    /// Makes everything written to sled so far durable, across a power loss too.
    pub fn sync_state(&self) -> std::io::Result<()> {
        sync_sled(&self.db, &self.sled_log)
    }
}

/// Flushes the sled database `tree` belongs to, then `fsync`s its log file `log_file`: sled's
/// own flush ends in `sync_file_range`, which leaves the disk's cache unflushed.
pub fn sync_sled(tree: &sled::Tree, log_file: &Path) -> std::io::Result<()> {
    tree.flush().map_err(std::io::Error::other)?;
    std::fs::File::open(log_file)
        .and_then(|f| f.sync_all())
        .map_err(|e| std::io::Error::new(e.kind(), format!("syncing {}: {e}", log_file.display())))
}

/// The log store of one group.
#[derive(Debug, Clone)]
pub struct WalLogStore {
    storage: NodeStorage,
    group: GroupId,
    cache: EntryCache,
}

fn io_err(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

impl WalLogStore {
    /// The log of `group` in `storage`.
    pub fn new(storage: &NodeStorage, group: GroupId) -> WalLogStore {
        WalLogStore {
            storage: storage.clone(),
            group,
            cache: Arc::default(),
        }
    }

    fn wal(&self) -> &Wal {
        &self.storage.wal
    }
}

impl RaftLogReader<TypeConfig> for WalLogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError> {
        let start = match range.start_bound() {
            Bound::Included(&s) => s,
            Bound::Excluded(&s) => s.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(&e) => e.checked_add(1),
            Bound::Excluded(&e) => Some(e),
            Bound::Unbounded => None,
        };
        if end.is_some_and(|e| e <= start) {
            return Ok(Vec::new());
        }
        // Fast path: the whole range is cached (the apply right after an append).
        {
            let cache = self.cache.lock();
            if let (Some(e), Some((&first, _))) = (end, cache.first_key_value())
                && first <= start
                && cache.contains_key(&(e - 1))
            {
                let entries: Vec<_> = cache.range(start..e).map(|(_, v)| v.clone()).collect();
                if entries.len() as u64 == e - start {
                    return Ok(entries);
                }
            }
        }
        self.wal()
            .read(self.group, start, end)
            .map_err(|e| StorageIOError::read_logs(&e).into())
    }
}

impl RaftLogStorage<TypeConfig> for WalLogStore {
    type LogReader = WalLogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged_log_id = self.wal().meta(self.group).purged;
        Ok(LogState {
            last_purged_log_id,
            last_log_id: self.wal().last_log_id(self.group),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> Result<(), StorageError> {
        self.wal()
            .save_vote(self.group, vote)
            .map_err(|e| StorageIOError::write_vote(&e))?;
        self.wal()
            .sync()
            .await
            .map_err(|e| StorageIOError::write_vote(&e))?;
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<u64>>, StorageError> {
        Ok(self.wal().meta(self.group).vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // Not synced on its own: a lost committed marker only means less is re-applied at
        // start-up before the leader re-commits it.
        self.wal()
            .save_committed(self.group, committed)
            .map_err(|e| StorageIOError::write(&e))?;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.wal().meta(self.group).committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry<TypeConfig>> = entries.into_iter().collect();
        self.wal()
            .append(self.group, &entries)
            .map_err(|e| StorageIOError::write_logs(&e))?;
        let mut cache = self.cache.lock();
        for entry in entries {
            cache.insert(entry.log_id.index, entry);
        }
        while cache.len() > CACHE_ENTRIES {
            cache.pop_first();
        }
        drop(cache);
        self.wal().sync_then(callback);
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.cache.lock().retain(|&i, _| i < log_id.index);
        self.wal()
            .truncate(self.group, log_id.index)
            .map_err(|e| StorageIOError::write_logs(&e))?;
        // Synced before it returns: openraft truncates conflicting entries before it installs
        // a snapshot, and that install becomes durable in sled on its own.
        self.wal()
            .sync()
            .await
            .map_err(|e| StorageIOError::write_logs(&e))?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        // The state machine's effects of the purged entries must be durable first: once the
        // purge point is, a restart cannot apply those entries again.
        let storage = self.storage.clone();
        let started = std::time::Instant::now();
        tokio::task::spawn_blocking(move || storage.sync_state())
            .await
            .map_err(|e| StorageIOError::write(&io_err(e)))?
            .map_err(|e| StorageIOError::write(&e))?;
        tracing::debug!(group = %self.group, upto = log_id.index, ms = started.elapsed().as_secs_f64() * 1e3, "synced the state machines to purge the log");
        self.wal()
            .purge(self.group, log_id)
            .map_err(|e| StorageIOError::write_logs(&e))?;
        self.cache.lock().retain(|&i, _| i > log_id.index);
        Ok(())
    }
}
