//! The Raft log of one group in sled, with group commit and a cache of recent entries.
//!
//! Layout: tree `g{group}.log` maps the big-endian index to the bincode of the entry (so sled's
//! order is log order); tree `g{group}.meta` holds the vote, the committed log id and the last
//! purged log id. Appends are acknowledged to openraft only after the [`Flusher`] has flushed
//! them, so an entry that openraft counts towards a quorum survives a process crash. (sled's
//! flush ends in `sync_file_range`: durable across process crashes, not power loss.)
//!
//! Entries just appended are kept decoded in a small cache: openraft reads them back right
//! away to apply them, and the cache saves decoding every batch twice.

use crate::flusher::Flusher;
use crate::{GroupId, LogId, StorageError, TypeConfig, decode, encode};
use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{Entry, OptionalSend, RaftLogReader, StorageIOError, Vote};
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

const VOTE_KEY: &[u8] = b"vote";
const COMMITTED_KEY: &[u8] = b"committed";
const PURGED_KEY: &[u8] = b"last_purged";
const CACHE_ENTRIES: usize = 512;

type EntryCache = Arc<Mutex<BTreeMap<u64, Entry<TypeConfig>>>>;

/// The log store of one group.
#[derive(Debug, Clone)]
pub struct SledLogStore {
    log: sled::Tree,
    meta: sled::Tree,
    flusher: Flusher,
    cache: EntryCache,
}

/// The sled tree of a group's log entries.
pub(crate) fn log_tree(group: GroupId) -> String {
    format!("g{}.log", group.0)
}

/// The sled tree of a group's vote, committed and purged markers.
pub(crate) fn meta_tree(group: GroupId) -> String {
    format!("g{}.meta", group.0)
}

fn io_err(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

impl SledLogStore {
    /// Opens (or creates) the log of `group` in `db`.
    pub fn open(db: &sled::Db, group: GroupId, flusher: Flusher) -> crate::Result<SledLogStore> {
        Ok(SledLogStore {
            log: db.open_tree(log_tree(group))?,
            meta: db.open_tree(meta_tree(group))?,
            flusher,
            cache: Arc::default(),
        })
    }

    fn read_meta<T: serde::de::DeserializeOwned>(
        &self,
        key: &[u8],
    ) -> Result<Option<T>, StorageError> {
        match self
            .meta
            .get(key)
            .map_err(|e| StorageIOError::read(&io_err(e)))?
        {
            None => Ok(None),
            Some(bytes) => decode(&bytes)
                .map(Some)
                .map_err(|e| StorageIOError::read(&io_err(e)).into()),
        }
    }

    fn decode_entry(bytes: &[u8]) -> Result<Entry<TypeConfig>, StorageError> {
        decode(bytes).map_err(|e| StorageIOError::read_logs(&io_err(e)).into())
    }
}

impl RaftLogReader<TypeConfig> for SledLogStore {
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
        let lo = start.to_be_bytes();
        let iter = match end {
            Some(e) => self.log.range(lo..e.to_be_bytes()),
            None => self.log.range(lo..),
        };
        let mut out = Vec::new();
        for item in iter {
            let (_, bytes) = item.map_err(|e| StorageIOError::read_logs(&io_err(e)))?;
            out.push(Self::decode_entry(&bytes)?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for SledLogStore {
    type LogReader = SledLogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged_log_id: Option<LogId> = self.read_meta(PURGED_KEY)?;
        let last = match self
            .log
            .last()
            .map_err(|e| StorageIOError::read_logs(&io_err(e)))?
        {
            Some((_, bytes)) => Some(Self::decode_entry(&bytes)?.log_id),
            None => None,
        };
        Ok(LogState {
            last_purged_log_id,
            last_log_id: last.or(last_purged_log_id),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> Result<(), StorageError> {
        self.meta
            .insert(VOTE_KEY, encode(vote))
            .map_err(|e| StorageIOError::write_vote(&io_err(e)))?;
        self.flusher
            .flush()
            .await
            .map_err(|e| StorageIOError::write_vote(&io_err(e)))?;
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<u64>>, StorageError> {
        self.read_meta(VOTE_KEY)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // Not flushed on its own: a lost committed marker only means less is re-applied at
        // start-up before the leader re-commits it.
        self.meta
            .insert(COMMITTED_KEY, encode(&committed))
            .map_err(|e| StorageIOError::write(&io_err(e)))?;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.read_meta::<Option<LogId>>(COMMITTED_KEY)?.flatten())
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
        // Entries go in one insert each, in index order, not as one sled batch: a batch holds
        // sled's process-wide write lock, so the appends of every group (and the flushes that
        // acknowledge them) took turns. sled recovers a prefix of its writes after a crash, so
        // an append cut short leaves a shorter log, never a gap, as an unflushed append does.
        let mut cache = self.cache.lock();
        for entry in entries {
            let index = entry.log_id.index;
            self.log
                .insert(index.to_be_bytes(), encode(&entry))
                .map_err(|e| StorageIOError::write_logs(&io_err(e)))?;
            cache.insert(index, entry);
        }
        while cache.len() > CACHE_ENTRIES {
            cache.pop_first();
        }
        drop(cache);
        self.flusher.flush_then(callback);
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.cache.lock().retain(|&i, _| i < log_id.index);
        let mut batch = sled::Batch::default();
        for item in self.log.range(log_id.index.to_be_bytes()..) {
            let (key, _) = item.map_err(|e| StorageIOError::write_logs(&io_err(e)))?;
            batch.remove(key);
        }
        self.log
            .apply_batch(batch)
            .map_err(|e| StorageIOError::write_logs(&io_err(e)))?;
        self.flusher
            .flush()
            .await
            .map_err(|e| StorageIOError::write_logs(&io_err(e)))?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        // Record the purge point first: a crash after it leaves extra entries, never a gap.
        self.meta
            .insert(PURGED_KEY, encode(&log_id))
            .map_err(|e| StorageIOError::write(&io_err(e)))?;
        self.flusher
            .flush()
            .await
            .map_err(|e| StorageIOError::write(&io_err(e)))?;
        self.cache.lock().retain(|&i, _| i > log_id.index);
        // One removal at a time rather than one batch: a sled batch holds sled's process-wide
        // write lock throughout, and thousands of removals held up the appends and flushes of
        // every group meanwhile. Nothing here needs to be atomic: the purge point is durable.
        for item in self.log.range(..=log_id.index.to_be_bytes()) {
            let (key, _) = item.map_err(|e| StorageIOError::write_logs(&io_err(e)))?;
            self.log
                .remove(key)
                .map_err(|e| StorageIOError::write_logs(&io_err(e)))?;
        }
        Ok(())
    }
}
