//! One write-ahead log per node for the Raft logs of every group, with group commit.
//!
//! Why not sled: a Raft log is written once, read back right away (to apply and to replicate),
//! and dropped from the front. sled 0.34 kept each group's entries in a B-tree whose leaves it
//! rewrote as they filled, so every byte of every entry was written several times by its I/O
//! threads, and one `flush` wrote out whatever else was dirty. Here every group appends to the
//! same file, and one `fdatasync` makes the appends of all groups durable at once.
//!
//! **Layout.** The directory holds numbered segment files (`00000000000000000042.wal`) and a
//! `LOCK` file. A segment starts with [`MAGIC`] and then holds records, each
//! `[body length u32][crc32 of body u32][body]`, little-endian. A body is a kind byte, the group
//! (u32) and the kind's payload: an entry (the bincode of openraft's `Entry`, whose first field is
//! its log id), a vote, the committed log id, a purge point, a truncation, a group dropped, or a
//! checkpoint. Every segment's first record is a checkpoint: each group's vote, committed and
//! purged log ids and last log id at the moment the segment began.
//!
//! **Memory.** Each group's vote, markers and the place of each live entry (segment, offset,
//! length, log id) are kept in memory and rebuilt at open by replaying the segments in order.
//! Entry bodies are read back from the files (the page cache, in practice) when asked for.
//!
//! **Rotation and deletion.** A segment is closed once it would grow past
//! [`WalOptions::segment_bytes`]: it is synced, the next one begins with a checkpoint, and every
//! closed segment that no live entry points into is deleted. A group that writes rarely would
//! otherwise pin its old segment for ever, so once more than [`WalOptions::max_segments`] are
//! kept, the live entries of the oldest are copied forward (same indexes, same bytes) when they
//! fill at most a quarter of it. The limit is soft: segments mostly live belong to busy groups,
//! which free them by purging (every few thousand entries, after a snapshot).
//!
//! **Why replay is right after deletions.** Replay applies records in file order, and a
//! checkpoint replaces each group's markers, drops entries outside (purged, last] and forgets
//! groups it does not name. The newest segment (never deleted) starts with a checkpoint that is
//! correct for that moment, and every later record is kept; every entry live at that checkpoint
//! was written before it and is kept (its segment is pinned), after any older write of the same
//! index. So whatever deleted segments held is superseded by the time replay is done.
//!
//! **Crashes.** A closed segment was synced whole before the next began (and opening syncs every
//! segment it keeps), so damage there is corruption and opening fails. Only the newest segment
//! can end in a torn record (written, not yet synced, so never acknowledged): replay stops at
//! the first record that fails its length or checksum and cuts the file there, unless a valid
//! record follows it (damage in the middle: opening fails). Segments are deleted only after the
//! checkpoint that supersedes them is synced.

use crate::{GroupId, LogId, TypeConfig, decode, encode, encode_into};
use openraft::storage::LogFlushed;
use openraft::{Entry, Vote};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, mpsc};

/// The first bytes of every segment (the format's version is its last two digits).
pub const MAGIC: &[u8; 8] = b"OPRWAL01";
/// Length and checksum in front of every record body.
const RECORD_HEADER: usize = 8;
/// Kind byte and group in front of every record payload.
const BODY_HEADER: usize = 5;

const KIND_ENTRY: u8 = 1;
const KIND_VOTE: u8 = 2;
const KIND_COMMITTED: u8 = 3;
const KIND_PURGED: u8 = 4;
const KIND_TRUNCATE: u8 = 5;
const KIND_DROP: u8 = 6;
const KIND_CHECKPOINT: u8 = 7;

/// Sizes of the log's files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalOptions {
    /// A segment is closed once an append would take it past this size.
    pub segment_bytes: u64,
    /// Segments kept before the live entries of the oldest are copied forward (when they fill
    /// at most a quarter of it).
    pub max_segments: usize,
}

impl Default for WalOptions {
    fn default() -> WalOptions {
        // 64 MiB holds several seconds of full-speed ingestion; past sixteen, the few entries a
        // group that rarely writes holds on to are copied forward out of old segments.
        WalOptions {
            segment_bytes: 64 << 20,
            max_segments: 16,
        }
    }
}

/// What can go wrong opening or writing the log.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    /// A file operation failed.
    #[error("cannot {action} {}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A closed segment does not read back as written.
    #[error("{} is corrupt at byte {offset}: {reason}", path.display())]
    Corrupt {
        /// The segment.
        path: PathBuf,
        /// Where its first bad record starts.
        offset: u64,
        /// What is wrong there.
        reason: String,
    },
    /// Another process has the directory open.
    #[error("{} is in use by another process", dir.display())]
    Locked {
        /// The log's directory.
        dir: PathBuf,
    },
}

fn io_at(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> WalError + use<> {
    let path = path.to_path_buf();
    move |source| WalError::Io {
        action,
        path,
        source,
    }
}

/// A group's vote and markers: what a checkpoint carries for it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupMeta {
    /// The last vote saved.
    pub vote: Option<Vote<u64>>,
    /// The last committed log id saved.
    pub committed: Option<LogId>,
    /// Entries up to this one are gone.
    pub purged: Option<LogId>,
}

#[derive(Debug, Serialize, Deserialize)]
struct CheckpointGroup {
    group: u32,
    meta: GroupMeta,
    last: Option<LogId>,
}

/// Where a live entry's bincode lies.
#[derive(Debug, Clone, Copy)]
struct Loc {
    segment: u64,
    offset: u64,
    len: u32,
    log_id: LogId,
}

#[derive(Debug, Default)]
struct GroupLog {
    meta: GroupMeta,
    entries: BTreeMap<u64, Loc>,
}

impl GroupLog {
    fn last(&self) -> Option<LogId> {
        self.entries
            .last_key_value()
            .map(|(_, loc)| loc.log_id)
            .or(self.meta.purged)
    }

    fn purge(&mut self, upto: LogId) {
        if self.meta.purged.is_none_or(|p| p.index < upto.index) {
            self.meta.purged = Some(upto);
        }
        self.entries = self.entries.split_off(&(upto.index + 1));
    }

    fn truncate(&mut self, since: u64) {
        self.entries.split_off(&since);
    }

    fn insert(&mut self, loc: Loc) {
        if self.meta.purged.is_none_or(|p| p.index < loc.log_id.index) {
            self.entries.insert(loc.log_id.index, loc);
        }
    }
}

#[derive(Debug)]
struct State {
    dir: PathBuf,
    options: WalOptions,
    groups: BTreeMap<GroupId, GroupLog>,
    /// Every kept segment, open for reading (the active one for appending too).
    segments: BTreeMap<u64, Arc<File>>,
    active: u64,
    active_len: u64,
    /// The active segment's length before its first append (its checkpoint and the entries
    /// copied into it): a segment is closed only once something was appended to it.
    active_began: u64,
    /// Set once a write or sync failed: what is on disk is unknown, so nothing more is written.
    failed: Option<String>,
    _lock: File,
}

/// Who waits for the next sync.
enum Waiter {
    /// openraft, for appended entries.
    Log(LogFlushed<TypeConfig>),
    /// A task, for a vote or truncation.
    Task(tokio::sync::oneshot::Sender<io::Result<()>>),
}

/// The node's Raft log. Cheap to clone; the files close when the last clone is gone.
#[derive(Clone)]
pub struct Wal {
    state: Arc<Mutex<State>>,
    /// Declared before `_sync_thread`: fields drop in order, so when the last handle drops,
    /// the last sender is gone (the thread's channel closed) before the thread is joined.
    commits: mpsc::Sender<Waiter>,
    _sync_thread: Arc<SyncThread>,
}

/// The sync thread, joined when the last handle of the log drops: it holds the state, and with
/// it the directory's lock, so joining releases the lock before the drop returns and the log
/// can be opened again at once (a node restarted in the same process). Without the join the
/// lock outlived the handles by however long the thread took to notice its channel closed.
struct SyncThread(Option<std::thread::JoinHandle<()>>);

impl Drop for SyncThread {
    fn drop(&mut self) {
        if let Some(thread) = self.0.take()
            && thread.thread().id() != std::thread::current().id()
        {
            let _ = thread.join();
        }
    }
}

impl std::fmt::Debug for Wal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.state.lock();
        f.debug_struct("Wal")
            .field("dir", &s.dir)
            .field("segments", &s.segments.len())
            .field("groups", &s.groups.len())
            .finish()
    }
}

fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:020}.wal"))
}

fn sync_dir(dir: &Path) -> Result<(), WalError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_at("sync", dir))
}

/// Appends one record to `out`: `payload` writes its payload. Returns where the payload starts.
fn push_record(out: &mut Vec<u8>, kind: u8, group: GroupId, payload: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    out.extend_from_slice(&[0; RECORD_HEADER]);
    out.push(kind);
    out.extend_from_slice(&group.0.to_le_bytes());
    payload(out);
    let body = &out[start + RECORD_HEADER..];
    let len = u32::try_from(body.len()).expect("a record body fits in 4 GiB");
    let crc = crc32fast::hash(body);
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// The records of a segment's bytes, from after its magic: `(offset of body, body)` each.
type Records<'a> = Vec<(usize, &'a [u8])>;

/// Why no whole record starts at some offset.
enum RecordFault {
    /// Fewer bytes left than a record header.
    CutHeader,
    /// The header claims a body of this many bytes, more than are left.
    CutBody(usize),
    /// The body is shorter than its kind and group, or fails its checksum.
    Checksum,
}

impl std::fmt::Display for RecordFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RecordFault::CutHeader => f.write_str("a record header is cut short"),
            RecordFault::CutBody(len) => write!(f, "a record of {len} bytes is cut short"),
            RecordFault::Checksum => f.write_str("a record fails its checksum"),
        }
    }
}

/// The body of the record whose header starts at `at`, if it reads back whole.
fn record_at(bytes: &[u8], at: usize) -> Result<&[u8], RecordFault> {
    let header = bytes
        .get(at..at + RECORD_HEADER)
        .ok_or(RecordFault::CutHeader)?;
    let len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(header[4..].try_into().expect("4 bytes"));
    let start = at + RECORD_HEADER;
    let body = bytes
        .get(start..start + len)
        .ok_or(RecordFault::CutBody(len))?;
    if len < BODY_HEADER || crc32fast::hash(body) != crc {
        return Err(RecordFault::Checksum);
    }
    Ok(body)
}

/// The records of a segment's bytes, and where and why reading stopped early, if it did.
fn read_records(bytes: &[u8]) -> (Records<'_>, Option<(usize, String)>) {
    let mut out = Vec::new();
    let mut at = MAGIC.len();
    while at < bytes.len() {
        match record_at(bytes, at) {
            Ok(body) => {
                out.push((at + RECORD_HEADER, body));
                at += RECORD_HEADER + body.len();
            }
            Err(fault) => return (out, Some((at, fault.to_string()))),
        }
    }
    (out, None)
}

/// Where the first record that reads back whole (of a known kind) starts at or after `from`.
fn next_valid_record(bytes: &[u8], from: usize) -> Option<usize> {
    (from..bytes.len()).find(|&at| {
        record_at(bytes, at).is_ok_and(|body| (KIND_ENTRY..=KIND_CHECKPOINT).contains(&body[0]))
    })
}

impl State {
    fn group(&mut self, group: GroupId) -> &mut GroupLog {
        self.groups.entry(group).or_default()
    }

    fn checkpoint(&self) -> Vec<u8> {
        let groups: Vec<CheckpointGroup> = self
            .groups
            .iter()
            .map(|(g, log)| CheckpointGroup {
                group: g.0,
                meta: log.meta.clone(),
                last: log.last(),
            })
            .collect();
        let mut out = Vec::new();
        push_record(&mut out, KIND_CHECKPOINT, GroupId(0), |b| {
            encode_into(&groups, b)
        });
        out
    }

    /// Applies a record read back from segment `segment`, whose body starts at `offset`.
    fn replay(&mut self, segment: u64, offset: u64, body: &[u8]) -> Result<(), String> {
        let kind = body[0];
        let group = GroupId(u32::from_le_bytes(body[1..5].try_into().expect("4 bytes")));
        let payload = &body[BODY_HEADER..];
        let bad = |e: bincode::error::DecodeError| format!("record of kind {kind}: {e}");
        match kind {
            KIND_ENTRY => {
                let log_id: LogId = decode(payload).map_err(bad)?;
                self.group(group).insert(Loc {
                    segment,
                    offset: offset + BODY_HEADER as u64,
                    len: payload.len() as u32,
                    log_id,
                });
            }
            KIND_VOTE => self.group(group).meta.vote = Some(decode(payload).map_err(bad)?),
            KIND_COMMITTED => self.group(group).meta.committed = decode(payload).map_err(bad)?,
            KIND_PURGED => self.group(group).purge(decode(payload).map_err(bad)?),
            KIND_TRUNCATE => self.group(group).truncate(decode(payload).map_err(bad)?),
            KIND_DROP => {
                self.groups.remove(&group);
            }
            KIND_CHECKPOINT => {
                let groups: Vec<CheckpointGroup> = decode(payload).map_err(bad)?;
                let mut kept = BTreeMap::new();
                for c in groups {
                    let mut log = self.groups.remove(&GroupId(c.group)).unwrap_or_default();
                    let first = c.meta.purged.map_or(0, |p| p.index + 1);
                    // No last log id: the group had no entries at all then.
                    match c.last {
                        Some(last) => log.entries.retain(|&i, _| i >= first && i <= last.index),
                        None => log.entries.clear(),
                    }
                    log.meta = c.meta;
                    kept.insert(GroupId(c.group), log);
                }
                self.groups = kept;
            }
            other => return Err(format!("unknown record kind {other}")),
        }
        Ok(())
    }

    fn check(&self) -> io::Result<()> {
        match &self.failed {
            None => Ok(()),
            Some(e) => Err(io::Error::other(format!(
                "the raft log stopped after an earlier failure: {e}"
            ))),
        }
    }

    /// Appends `bytes` to the active segment, closing it first if they do not fit. Returns the
    /// segment and offset they went to.
    fn write(&mut self, bytes: &[u8]) -> io::Result<(u64, u64)> {
        self.check()?;
        if self.active_len > self.active_began
            && self.active_len + bytes.len() as u64 > self.options.segment_bytes
            && let Err(e) = self.rotate()
        {
            tracing::error!(error = %e, "the raft log could not begin a new segment; it stops taking writes");
            self.failed = Some(e.to_string());
            return Err(io::Error::other(e.to_string()));
        }
        let offset = self.active_len;
        let file = Arc::clone(&self.segments[&self.active]);
        if let Err(e) = (&*file).write_all(bytes) {
            self.failed = Some(format!("writing the log: {e}"));
            return Err(e);
        }
        self.active_len += bytes.len() as u64;
        Ok((self.active, offset))
    }

    /// Starts segment `id`: its magic and a checkpoint of every group. Not synced.
    fn begin_segment(&mut self, id: u64) -> Result<(), WalError> {
        let path = segment_path(&self.dir, id);
        let file = OpenOptions::new()
            .create_new(true)
            .read(true)
            .append(true)
            .open(&path)
            .map_err(io_at("create", &path))?;
        let mut bytes = MAGIC.to_vec();
        bytes.extend(self.checkpoint());
        (&file).write_all(&bytes).map_err(io_at("write", &path))?;
        self.segments.insert(id, Arc::new(file));
        self.active = id;
        self.active_len = bytes.len() as u64;
        Ok(())
    }

    /// Closes the active segment, begins the next, and deletes what no live entry needs.
    fn rotate(&mut self) -> Result<(), WalError> {
        let started = std::time::Instant::now();
        let closing = self.active;
        self.segments[&closing]
            .sync_data()
            .map_err(io_at("sync", &segment_path(&self.dir, closing)))?;
        self.begin_segment(closing + 1)?;
        self.collect_garbage()?;
        self.active_began = self.active_len;
        tracing::debug!(
            segment = self.active,
            kept = self.segments.len(),
            ms = started.elapsed().as_secs_f64() * 1e3,
            "began a raft log segment"
        );
        Ok(())
    }

    /// Copies forward the live entries of the oldest segments beyond the limit, syncs the
    /// active segment (whose checkpoint supersedes the others), and deletes every closed
    /// segment no live entry points into.
    fn collect_garbage(&mut self) -> Result<(), WalError> {
        let mut live_bytes: BTreeMap<u64, u64> = BTreeMap::new();
        for loc in self.groups.values().flat_map(|g| g.entries.values()) {
            *live_bytes.entry(loc.segment).or_default() += u64::from(loc.len);
        }
        // Only segments that are mostly garbage are worth copying out of: one that is mostly
        // live belongs to a busy group, which frees it soon enough by purging.
        let excess = self
            .segments
            .len()
            .saturating_sub(self.options.max_segments);
        let evicted: BTreeSet<u64> = self
            .segments
            .keys()
            .copied()
            .filter(|&id| id != self.active)
            .take(excess)
            .filter(|id| live_bytes.get(id).copied().unwrap_or(0) <= self.options.segment_bytes / 4)
            .collect();
        if !evicted.is_empty() {
            self.copy_forward(&evicted)?;
        }
        let active_path = segment_path(&self.dir, self.active);
        self.segments[&self.active]
            .sync_data()
            .map_err(io_at("sync", &active_path))?;
        sync_dir(&self.dir)?;
        let unpinned: Vec<u64> = self
            .segments
            .keys()
            .copied()
            .filter(|id| {
                *id != self.active && (evicted.contains(id) || !live_bytes.contains_key(id))
            })
            .collect();
        for id in &unpinned {
            let path = segment_path(&self.dir, *id);
            std::fs::remove_file(&path).map_err(io_at("delete", &path))?;
            self.segments.remove(id);
        }
        if !unpinned.is_empty() {
            sync_dir(&self.dir)?;
        }
        Ok(())
    }

    /// Rewrites the live entries held in `segments` at the end of the active one.
    fn copy_forward(&mut self, segments: &BTreeSet<u64>) -> Result<(), WalError> {
        let active_path = segment_path(&self.dir, self.active);
        let active = Arc::clone(&self.segments[&self.active]);
        // The entries' new places, taken on only once all of them are written.
        let mut moved: Vec<(GroupId, u64, u64)> = Vec::new();
        let mut out = Vec::new();
        let mut base = self.active_len;
        for (group, log) in &self.groups {
            for (&index, loc) in &log.entries {
                if !segments.contains(&loc.segment) {
                    continue;
                }
                let path = segment_path(&self.dir, loc.segment);
                let mut payload = vec![0; loc.len as usize];
                self.segments[&loc.segment]
                    .read_exact_at(&mut payload, loc.offset)
                    .map_err(io_at("read", &path))?;
                let start = out.len();
                push_record(&mut out, KIND_ENTRY, *group, |b| {
                    b.extend_from_slice(&payload)
                });
                let offset = base + (start + RECORD_HEADER + BODY_HEADER) as u64;
                moved.push((*group, index, offset));
                if out.len() >= 1 << 20 {
                    (&*active)
                        .write_all(&out)
                        .map_err(io_at("write", &active_path))?;
                    base += out.len() as u64;
                    out.clear();
                }
            }
        }
        (&*active)
            .write_all(&out)
            .map_err(io_at("write", &active_path))?;
        self.active_len = base + out.len() as u64;
        for (group, index, offset) in &moved {
            let loc = self
                .groups
                .get_mut(group)
                .and_then(|log| log.entries.get_mut(index))
                .expect("an entry just copied is still live: the state lock is held");
            loc.segment = self.active;
            loc.offset = *offset;
        }
        if !moved.is_empty() {
            tracing::info!(
                entries = moved.len(),
                segments = segments.len(),
                "copied live raft log entries forward out of old segments"
            );
        }
        Ok(())
    }
}

impl Wal {
    /// Opens (or creates) the log in `dir` with default sizes.
    pub fn open(dir: &Path) -> Result<Wal, WalError> {
        Wal::open_with(dir, WalOptions::default())
    }

    /// Opens (or creates) the log in `dir`: replays every segment, cuts a torn record off the
    /// newest, and begins a new segment.
    pub fn open_with(dir: &Path, options: WalOptions) -> Result<Wal, WalError> {
        std::fs::create_dir_all(dir).map_err(io_at("create", dir))?;
        let lock_path = dir.join("LOCK");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_at("open", &lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(WalError::Locked {
                    dir: dir.to_path_buf(),
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io_at("lock", &lock_path)(e)),
        }
        let mut ids = Vec::new();
        for item in std::fs::read_dir(dir).map_err(io_at("list", dir))? {
            let name = item.map_err(io_at("list", dir))?.file_name();
            let name = name.to_string_lossy();
            if let Some(id) = name
                .strip_suffix(".wal")
                .and_then(|n| n.parse::<u64>().ok())
            {
                ids.push(id);
            }
        }
        ids.sort_unstable();
        let mut state = State {
            dir: dir.to_path_buf(),
            options,
            groups: BTreeMap::new(),
            segments: BTreeMap::new(),
            active: 0,
            active_len: 0,
            active_began: 0,
            failed: None,
            _lock: lock,
        };
        let newest = ids.last().copied();
        for &id in &ids {
            let path = segment_path(dir, id);
            let bytes = std::fs::read(&path).map_err(io_at("read", &path))?;
            let corrupt = |offset: usize, reason: String| WalError::Corrupt {
                path: path.clone(),
                offset: offset as u64,
                reason,
            };
            let is_newest = Some(id) == newest;
            if !bytes.starts_with(MAGIC) {
                // A segment whose creation a crash cut short holds nothing acknowledged.
                if is_newest && MAGIC.starts_with(&bytes[..bytes.len().min(MAGIC.len())]) {
                    std::fs::remove_file(&path).map_err(io_at("delete", &path))?;
                    continue;
                }
                return Err(corrupt(0, "not a raft log segment".into()));
            }
            let (records, stopped) = read_records(&bytes);
            for (offset, body) in records {
                state
                    .replay(id, offset as u64, body)
                    .map_err(|reason| corrupt(offset - RECORD_HEADER, reason))?;
            }
            if let Some((offset, reason)) = stopped {
                if !is_newest {
                    return Err(corrupt(offset, reason));
                }
                // A torn write leaves nothing readable after it; a valid record past a bad one
                // means a damaged one in the middle, and cutting there would drop records that
                // may have been acknowledged.
                if let Some(next) = next_valid_record(&bytes, offset + 1) {
                    return Err(corrupt(
                        offset,
                        format!("{reason}, and a valid record follows at byte {next}"),
                    ));
                }
                tracing::warn!(segment = %path.display(), offset, reason, "cutting a torn record off the raft log");
                let file = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(io_at("open", &path))?;
                file.set_len(offset as u64)
                    .and_then(|()| file.sync_all())
                    .map_err(io_at("truncate", &path))?;
            }
            let file = File::open(&path).map_err(io_at("open", &path))?;
            // After a process crash the newest segment's last records may be in the page cache
            // only, while the checkpoint about to be written (and synced) counts them.
            file.sync_data().map_err(io_at("sync", &path))?;
            state.segments.insert(id, Arc::new(file));
        }
        state.begin_segment(newest.map_or(1, |n| n + 1))?;
        state.collect_garbage()?;
        state.active_began = state.active_len;
        let state = Arc::new(Mutex::new(state));
        let (commits, waiting) = mpsc::channel();
        let synced = Arc::clone(&state);
        let sync_thread = std::thread::Builder::new()
            .name("raft-log-sync".into())
            .spawn(move || sync_loop(&synced, &waiting))
            .map_err(io_at("start the sync thread for", dir))?;
        Ok(Wal {
            state,
            commits,
            _sync_thread: Arc::new(SyncThread(Some(sync_thread))),
        })
    }

    /// Whether the log holds anything of `group`.
    pub fn knows(&self, group: GroupId) -> bool {
        self.state.lock().groups.contains_key(&group)
    }

    /// `group`'s vote and markers.
    pub fn meta(&self, group: GroupId) -> GroupMeta {
        let s = self.state.lock();
        s.groups
            .get(&group)
            .map(|g| g.meta.clone())
            .unwrap_or_default()
    }

    /// The log id of `group`'s last entry, or of its purge point when it has none.
    pub fn last_log_id(&self, group: GroupId) -> Option<LogId> {
        self.state
            .lock()
            .groups
            .get(&group)
            .and_then(GroupLog::last)
    }

    /// Appends `entries` of `group` (in index order, each after the last). Not yet durable:
    /// see [`Wal::sync_then`].
    pub fn append(&self, group: GroupId, entries: &[Entry<TypeConfig>]) -> io::Result<()> {
        let mut bytes = Vec::new();
        let mut placed = Vec::with_capacity(entries.len());
        for entry in entries {
            let start = bytes.len();
            push_record(&mut bytes, KIND_ENTRY, group, |b| encode_into(entry, b));
            let payload = start + RECORD_HEADER + BODY_HEADER;
            placed.push((payload, bytes.len() - payload, entry.log_id));
        }
        let mut s = self.state.lock();
        let (segment, base) = s.write(&bytes)?;
        let log = s.group(group);
        for (payload, len, log_id) in placed {
            log.insert(Loc {
                segment,
                offset: base + payload as u64,
                len: len as u32,
                log_id,
            });
        }
        Ok(())
    }

    fn record(
        &self,
        kind: u8,
        group: GroupId,
        payload: &[u8],
        update: impl FnOnce(&mut State),
    ) -> io::Result<()> {
        let mut bytes = Vec::with_capacity(payload.len() + RECORD_HEADER + BODY_HEADER);
        push_record(&mut bytes, kind, group, |b| b.extend_from_slice(payload));
        let mut s = self.state.lock();
        s.write(&bytes)?;
        update(&mut s);
        Ok(())
    }

    /// Records `group`'s vote. Not yet durable.
    pub fn save_vote(&self, group: GroupId, vote: &Vote<u64>) -> io::Result<()> {
        self.record(KIND_VOTE, group, &encode(vote), |s| {
            s.group(group).meta.vote = Some(*vote)
        })
    }

    /// Records `group`'s committed log id. Not yet durable.
    pub fn save_committed(&self, group: GroupId, committed: Option<LogId>) -> io::Result<()> {
        self.record(KIND_COMMITTED, group, &encode(&committed), |s| {
            s.group(group).meta.committed = committed
        })
    }

    /// Drops `group`'s entries up to and including `upto`.
    pub fn purge(&self, group: GroupId, upto: LogId) -> io::Result<()> {
        self.record(KIND_PURGED, group, &encode(&upto), |s| {
            s.group(group).purge(upto)
        })
    }

    /// Drops `group`'s entries from index `since` on.
    pub fn truncate(&self, group: GroupId, since: u64) -> io::Result<()> {
        self.record(KIND_TRUNCATE, group, &encode(&since), |s| {
            s.group(group).truncate(since)
        })
    }

    /// Forgets `group` (a replica moved away).
    pub fn drop_group(&self, group: GroupId) -> io::Result<()> {
        self.record(KIND_DROP, group, &[], |s| {
            s.groups.remove(&group);
        })
    }

    /// `group`'s entries with indexes in `start..end` (to the last without `end`).
    pub fn read(
        &self,
        group: GroupId,
        start: u64,
        end: Option<u64>,
    ) -> io::Result<Vec<Entry<TypeConfig>>> {
        let places: Vec<(Arc<File>, Loc)> = {
            let s = self.state.lock();
            let Some(log) = s.groups.get(&group) else {
                return Ok(Vec::new());
            };
            let range = match end {
                Some(e) => log.entries.range(start..e),
                None => log.entries.range(start..),
            };
            range
                .map(|(_, loc)| (Arc::clone(&s.segments[&loc.segment]), *loc))
                .collect()
        };
        let mut out = Vec::with_capacity(places.len());
        let mut buf = Vec::new();
        for (file, loc) in places {
            buf.resize(loc.len as usize, 0);
            // Deleted segments stay readable through an open handle.
            file.read_exact_at(&mut buf, loc.offset)?;
            out.push(decode(&buf).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("raft log entry {} of {group}: {e}", loc.log_id.index),
                )
            })?);
        }
        Ok(out)
    }

    /// Completes `callback` once everything written so far is durable.
    pub fn sync_then(&self, callback: LogFlushed<TypeConfig>) {
        if let Err(mpsc::SendError(Waiter::Log(callback))) =
            self.commits.send(Waiter::Log(callback))
        {
            callback.log_io_completed(Err(io::Error::other("the raft log has stopped")));
        }
    }

    /// Returns once everything written so far is durable.
    pub async fn sync(&self) -> io::Result<()> {
        let (done, wait) = tokio::sync::oneshot::channel();
        self.commits
            .send(Waiter::Task(done))
            .map_err(|_| io::Error::other("the raft log has stopped"))?;
        wait.await
            .map_err(|_| io::Error::other("the raft log has stopped"))?
    }

    /// The number of segment files kept (for tests and metrics).
    pub fn segments(&self) -> usize {
        self.state.lock().segments.len()
    }
}

/// How long the sync thread lets appends gather after the first one before it syncs.
///
/// Each `fdatasync` costs 100–190 µs of CPU on the virtual machines this runs on, and makes the
/// disk flush its cache, which every other writer then waits behind. At half load a member
/// synced about 350 times a second for two appends each; with this pause, members used 3% less
/// CPU and wrote 7% less, and acknowledgements were no slower (interleaved runs with pauses of
/// 0, 0.3, 0.7, 1 and 1.5 ms in `bench/notes.md`). It bounds what it adds to a commit.
const SYNC_GATHER: std::time::Duration = std::time::Duration::from_millis(1);

/// The sync thread: lets appends gather for [`SYNC_GATHER`] after the first, takes every waiter
/// queued, syncs the active segment once, completes them. A segment closes only after it is
/// synced, so the active one is all that can be pending.
fn sync_loop(state: &Mutex<State>, waiting: &mpsc::Receiver<Waiter>) {
    while let Ok(first) = waiting.recv() {
        std::thread::sleep(SYNC_GATHER);
        let mut pending = vec![first];
        pending.extend(waiting.try_iter());
        let (file, failed) = {
            let s = state.lock();
            (Arc::clone(&s.segments[&s.active]), s.check())
        };
        let result = failed.and_then(|()| file.sync_data());
        if let Err(e) = &result {
            state
                .lock()
                .failed
                .get_or_insert_with(|| format!("syncing the log: {e}"));
        }
        for waiter in pending {
            let outcome = match &result {
                Ok(()) => Ok(()),
                Err(e) => Err(io::Error::other(e.to_string())),
            };
            match waiter {
                Waiter::Log(callback) => callback.log_io_completed(outcome),
                Waiter::Task(done) => {
                    let _ = done.send(outcome);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{CommittedLeaderId, EntryPayload};

    fn log_id(term: u64, index: u64) -> LogId {
        LogId::new(CommittedLeaderId::new(term, 1), index)
    }

    fn entry(term: u64, index: u64) -> Entry<TypeConfig> {
        Entry {
            log_id: log_id(term, index),
            payload: EntryPayload::Normal(crate::Command(
                format!("t{term}-i{index}-{}", "x".repeat((index % 97) as usize)).into_bytes(),
            )),
        }
    }

    /// An entry whose record takes `bytes` in all.
    fn big_entry(term: u64, index: u64, bytes: usize) -> Entry<TypeConfig> {
        let mut e = entry(term, index);
        let overhead = {
            let mut b = Vec::new();
            push_record(&mut b, KIND_ENTRY, GroupId(0), |b| encode_into(&e, b));
            b.len()
        };
        if let EntryPayload::Normal(c) = &mut e.payload {
            let keep = c.0.len().saturating_sub(overhead.saturating_sub(bytes));
            c.0.truncate(keep);
            c.0.resize(keep + bytes.saturating_sub(overhead), b'y');
        }
        e
    }

    fn small() -> WalOptions {
        WalOptions {
            segment_bytes: 4096,
            max_segments: 4,
        }
    }

    fn indexes(wal: &Wal, group: GroupId) -> Vec<(u64, u64)> {
        wal.read(group, 0, None)
            .unwrap()
            .iter()
            .map(|e| (e.log_id.leader_id.term, e.log_id.index))
            .collect()
    }

    /// Drops `wal` and opens its directory again at once: dropping releases the lock.
    fn reopen(wal: Wal, dir: &Path, options: WalOptions) -> Wal {
        drop(wal);
        Wal::open_with(dir, options).unwrap()
    }

    #[test]
    fn votes_markers_and_entries_come_back_after_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let wal = Wal::open(dir.path()).unwrap();
        let (a, b) = (GroupId(1), GroupId(2));
        wal.append(a, &(1..=5).map(|i| entry(1, i)).collect::<Vec<_>>())
            .unwrap();
        wal.append(b, &[entry(2, 1)]).unwrap();
        let vote = Vote::new_committed(3, 2);
        wal.save_vote(a, &vote).unwrap();
        wal.save_committed(a, Some(log_id(1, 4))).unwrap();
        wal.purge(a, log_id(1, 2)).unwrap();
        wal.truncate(a, 5).unwrap();
        wal.append(a, &[entry(3, 5)]).unwrap();
        let wal = reopen(wal, dir.path(), WalOptions::default());
        assert_eq!(indexes(&wal, a), vec![(1, 3), (1, 4), (3, 5)]);
        assert_eq!(indexes(&wal, b), vec![(2, 1)]);
        assert_eq!(
            wal.meta(a),
            GroupMeta {
                vote: Some(vote),
                committed: Some(log_id(1, 4)),
                purged: Some(log_id(1, 2)),
            }
        );
        assert_eq!(wal.last_log_id(a), Some(log_id(3, 5)));
        assert_eq!(wal.read(a, 4, Some(5)).unwrap()[0], entry(1, 4));
        // Purged past the end: no entries, and the last log id is the purge point.
        wal.purge(b, log_id(2, 9)).unwrap();
        let wal = reopen(wal, dir.path(), WalOptions::default());
        assert_eq!(indexes(&wal, b), vec![]);
        assert_eq!(wal.last_log_id(b), Some(log_id(2, 9)));
    }

    #[test]
    fn a_torn_record_at_the_end_is_cut_and_the_log_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let wal = Wal::open(dir.path()).unwrap();
        let g = GroupId(1);
        wal.append(g, &[entry(1, 1), entry(1, 2)]).unwrap();
        let wal = {
            let s = wal.state.lock();
            // Half a record, as a crash in the middle of a write leaves it.
            let mut torn = Vec::new();
            push_record(&mut torn, KIND_ENTRY, g, |b| encode_into(&entry(1, 3), b));
            let file = &s.segments[&s.active];
            (&**file).write_all(&torn[..torn.len() / 2]).unwrap();
            drop(s);
            wal
        };
        let wal = reopen(wal, dir.path(), WalOptions::default());
        assert_eq!(indexes(&wal, g), vec![(1, 1), (1, 2)]);
        wal.append(g, &[entry(1, 3)]).unwrap();
        let wal = reopen(wal, dir.path(), WalOptions::default());
        assert_eq!(indexes(&wal, g), vec![(1, 1), (1, 2), (1, 3)]);
    }

    #[test]
    fn damage_in_a_closed_segment_fails_the_open_and_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let wal = Wal::open(dir.path()).unwrap();
        wal.append(GroupId(1), &[entry(1, 1)]).unwrap();
        // Opened again, the log begins segment 2: segment 1 is closed.
        drop(reopen(wal, dir.path(), WalOptions::default()));
        let first = segment_path(dir.path(), 1);
        let mut bytes = std::fs::read(&first).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&first, bytes).unwrap();
        // Damage in a closed segment is not a torn tail.
        let err = Wal::open(dir.path()).unwrap_err();
        assert!(
            matches!(&err, WalError::Corrupt { path, .. } if *path == first),
            "{err}"
        );
        assert!(err.to_string().contains("fails its checksum"), "{err}");
    }

    #[test]
    fn a_second_open_of_the_same_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _wal = Wal::open(dir.path()).unwrap();
        let err = Wal::open(dir.path()).unwrap_err();
        assert!(matches!(err, WalError::Locked { .. }), "{err}");
    }

    #[test]
    fn purged_segments_are_deleted_and_a_quiet_group_is_copied_forward() {
        let dir = tempfile::tempdir().unwrap();
        let options = small();
        let wal = Wal::open_with(dir.path(), options).unwrap();
        let (busy, quiet) = (GroupId(1), GroupId(2));
        wal.append(quiet, &[entry(1, 1), entry(1, 2)]).unwrap();
        for i in 1..=2_000 {
            wal.append(busy, &[entry(1, i)]).unwrap();
            if i % 50 == 0 {
                wal.purge(busy, log_id(1, i - 10)).unwrap();
            }
            assert!(wal.segments() <= options.max_segments + 1);
        }
        let files = std::fs::read_dir(dir.path()).unwrap().count();
        assert!(files <= options.max_segments + 2, "{files} files");
        let wal = reopen(wal, dir.path(), options);
        assert_eq!(indexes(&wal, quiet), vec![(1, 1), (1, 2)]);
        assert_eq!(
            indexes(&wal, busy),
            (1991..=2_000).map(|i| (1, i)).collect::<Vec<_>>()
        );
    }

    #[test]
    fn a_dropped_group_stays_dropped_after_its_records_are_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let wal = Wal::open_with(dir.path(), small()).unwrap();
        let (gone, other, quiet) = (GroupId(5), GroupId(1), GroupId(2));
        // A quiet group pins the first segment, so the old incarnation's entries stay on disk.
        wal.append(quiet, &[entry(1, 0)]).unwrap();
        wal.save_vote(gone, &Vote::new(1, 1)).unwrap();
        wal.append(gone, &[entry(1, 0), entry(1, 1)]).unwrap();
        // Segment 1 ends here: the drop goes to segment 2, which is later deleted.
        let fill = 4096 - wal.state.lock().active_len as usize;
        wal.append(other, &[big_entry(1, 0, fill)]).unwrap();
        wal.drop_group(gone).unwrap();
        // A new incarnation of the group, with a vote and no entries yet.
        wal.save_vote(gone, &Vote::new(2, 3)).unwrap();
        for i in 1..=300 {
            wal.append(other, &[entry(1, i)]).unwrap();
            if i % 20 == 0 {
                wal.purge(other, log_id(1, i - 2)).unwrap();
            }
        }
        assert!(
            segment_path(dir.path(), 1).exists(),
            "the quiet group pins segment 1"
        );
        assert!(
            !segment_path(dir.path(), 2).exists(),
            "segment 2 was deleted"
        );
        let wal = reopen(wal, dir.path(), small());
        assert!(indexes(&wal, gone).is_empty(), "{:?}", indexes(&wal, gone));
        assert_eq!(wal.last_log_id(gone), None);
        assert_eq!(wal.meta(gone).vote, Some(Vote::new(2, 3)));
        assert_eq!(indexes(&wal, quiet), vec![(1, 0)]);
        assert_eq!(indexes(&wal, other).len(), 2);
    }

    #[test]
    fn damage_in_the_middle_of_the_newest_segment_is_not_taken_for_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let wal = Wal::open(dir.path()).unwrap();
        let g = GroupId(1);
        wal.append(g, &[entry(1, 1)]).unwrap();
        wal.append(g, &[entry(1, 2)]).unwrap();
        let (path, first_payload) = {
            let s = wal.state.lock();
            let loc = s.groups[&g].entries[&1];
            (segment_path(dir.path(), s.active), loc.offset as usize)
        };
        drop(wal);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[first_payload] ^= 0xff;
        std::fs::write(&path, bytes).unwrap();
        let err = Wal::open(dir.path()).unwrap_err();
        assert!(err.to_string().contains("a valid record follows"), "{err}");
    }

    /// A small deterministic generator, so a failing run can be repeated from its seed.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }

    /// Random appends, truncations, purges, drops and reopenings of three groups, against a
    /// model of what each group's log must hold.
    #[test]
    fn random_operations_match_a_model_across_reopenings() {
        for seed in 1..=12u64 {
            let dir = tempfile::tempdir().unwrap();
            let options = WalOptions {
                segment_bytes: 2048,
                max_segments: 3,
            };
            let mut wal = Wal::open_with(dir.path(), options).unwrap();
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let mut model: BTreeMap<GroupId, (Option<LogId>, BTreeMap<u64, u64>)> = BTreeMap::new();
            let mut term = 1;
            for step in 0..1_500 {
                let group = GroupId(rng.below(3) as u32 + 1);
                let (purged, entries) = model.entry(group).or_default();
                let next = entries
                    .keys()
                    .last()
                    .map_or(purged.map_or(0, |p| p.index + 1), |l| l + 1);
                match rng.below(100) {
                    0..=69 => {
                        let n = rng.below(3) + 1;
                        let batch: Vec<_> = (next..next + n).map(|i| entry(term, i)).collect();
                        wal.append(group, &batch).unwrap();
                        entries.extend((next..next + n).map(|i| (i, term)));
                    }
                    70..=79 if next > purged.map_or(0, |p| p.index + 1) => {
                        let first = purged.map_or(0, |p| p.index + 1);
                        let since = first + rng.below(next - first);
                        term += 1;
                        wal.truncate(group, since).unwrap();
                        entries.split_off(&since);
                    }
                    80..=91 if !entries.is_empty() => {
                        let (&lo, _) = entries.first_key_value().unwrap();
                        let upto = lo + rng.below(next - lo);
                        let id = log_id(entries[&upto], upto);
                        wal.purge(group, id).unwrap();
                        *purged = Some(id);
                        *entries = entries.split_off(&(upto + 1));
                    }
                    92..=93 => {
                        wal.drop_group(group).unwrap();
                        model.remove(&group);
                    }
                    94..=96 => wal = reopen(wal, dir.path(), options),
                    _ => {}
                }
                for (g, (purged, entries)) in &model {
                    let got: Vec<(u64, u64)> = indexes(&wal, *g);
                    let want: Vec<(u64, u64)> = entries.iter().map(|(i, t)| (*t, *i)).collect();
                    assert_eq!(got, want, "seed {seed} step {step} group {g}");
                    assert_eq!(wal.meta(*g).purged, *purged, "seed {seed} step {step}");
                    let last = entries
                        .last_key_value()
                        .map(|(i, t)| log_id(*t, *i))
                        .or(*purged);
                    assert_eq!(
                        wal.last_log_id(*g),
                        last,
                        "seed {seed} step {step} group {g}"
                    );
                }
            }
            let wal = reopen(wal, dir.path(), options);
            for (g, (_, entries)) in &model {
                assert_eq!(indexes(&wal, *g).len(), entries.len(), "seed {seed}");
            }
        }
    }
}
