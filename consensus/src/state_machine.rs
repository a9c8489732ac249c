//! The adapter from openraft's state-machine traits to a small deterministic core.
//!
//! A [`StateMachineCore`] applies commands in log order and persists its state together with an
//! opaque *applied marker* (the last applied log id and the membership) in one atomic write, so
//! that after a crash the marker says exactly which entries are already in the state. Cores may
//! persist lazily: entries applied but not yet persisted are simply applied again from the Raft
//! log after a restart (openraft re-applies everything after the marker up to the committed
//! index), and the log is never purged past a snapshot, which is always taken right after a
//! persist. The Raft log is thus the write-ahead log of the state machine, and an event is
//! written once on the hot path.

use crate::{LogId, Response, StorageError, TypeConfig, decode, encode};
use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    AnyError, Entry, EntryPayload, OptionalSend, RaftSnapshotBuilder, SnapshotMeta, StorageIOError,
    StoredMembership,
};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::io::Cursor;
use std::sync::Arc;

/// Errors of a core: anything that implements `Error`.
pub type CoreError = Box<dyn std::error::Error + Send + Sync>;

/// A deterministic state machine driven by a Raft group.
pub trait StateMachineCore: Send + 'static {
    /// Applies the command at log `index`. Must be deterministic: every replica applies the same
    /// commands in the same order and must reach the same state and the same response.
    fn apply(&mut self, index: u64, command: &[u8]) -> Vec<u8>;

    /// The marker stored by the last [`StateMachineCore::persist`], read when the core opened.
    fn persisted_marker(&self) -> Option<Vec<u8>>;

    /// Whether the core wants its applied state persisted now (after an apply batch).
    fn wants_persist(&self) -> bool;

    /// Makes everything applied so far durable together with `marker`, atomically.
    fn persist(&mut self, marker: &[u8]) -> Result<(), CoreError>;

    /// Starts making everything applied so far durable with `marker`, and may return before it
    /// is: what has been started must be durable, in order, by the end of the next
    /// [`StateMachineCore::persist`] (which snapshots, and so log purges, always run first).
    /// The default persists right away.
    fn persist_soon(&mut self, marker: &[u8]) -> Result<(), CoreError> {
        self.persist(marker)
    }

    /// A description of the state as of the last persist, for a Raft snapshot. Built every
    /// few thousand entries, so it may name durable immutable data instead of copying it.
    fn snapshot(&mut self) -> Result<Vec<u8>, CoreError>;

    /// A reader of the state as of the last *completed* persist (its marker and a description
    /// as [`StateMachineCore::snapshot`] makes), runnable without the core, so a snapshot
    /// need not hold up apply while it persists. `None` (the default): snapshots persist first.
    fn durable_snapshot(&self) -> Option<DurableSnapshot> {
        None
    }

    /// What a follower receives for the snapshot `description` (one [`snapshot`] made): by
    /// default the description itself; a core whose description names data returns the data.
    ///
    /// [`snapshot`]: StateMachineCore::snapshot
    fn ship(&self, description: &[u8]) -> Result<Vec<u8>, CoreError> {
        Ok(description.to_vec())
    }

    /// Replaces the state with a shipped snapshot's (what [`StateMachineCore::ship`] made on
    /// the leader) and persists it with `marker`.
    fn install(&mut self, shipped: &[u8], marker: &[u8]) -> Result<(), CoreError>;
}

/// A core's durable state: its marker and a snapshot description of it.
pub type DurableCut = (Vec<u8>, Vec<u8>);

/// Reads a core's [`DurableCut`] (`None` when nothing has been persisted yet).
pub type DurableSnapshot = Box<dyn FnOnce() -> Result<Option<DurableCut>, CoreError> + Send>;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct AppliedMarker {
    last_applied: Option<LogId>,
    membership: StoredMembership<u64, crate::NodeAddr>,
}

#[derive(Debug, Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<u64, crate::NodeAddr>,
    #[serde(with = "serde_bytes")]
    data: Vec<u8>,
}

#[derive(Debug)]
struct Inner<S> {
    core: S,
    applied: AppliedMarker,
    snapshot_seq: u64,
    /// The index of the last snapshot built here.
    last_snapshot: Option<LogId>,
}

/// openraft's state machine over a [`StateMachineCore`]. Cheap to clone; clones share the core.
#[derive(Debug)]
pub struct StateMachineStore<S> {
    inner: Arc<Mutex<Inner<S>>>,
    snapshots: sled::Tree,
}

impl<S> Clone for StateMachineStore<S> {
    fn clone(&self) -> Self {
        StateMachineStore {
            inner: Arc::clone(&self.inner),
            snapshots: self.snapshots.clone(),
        }
    }
}

const CURRENT_SNAPSHOT: &[u8] = b"current";

fn sm_err(e: impl std::fmt::Display) -> StorageError {
    StorageIOError::write_state_machine(AnyError::error(e.to_string())).into()
}

impl<S: StateMachineCore> StateMachineStore<S> {
    /// Wraps `core`; `snapshots` is the tree where the current snapshot is kept.
    pub fn new(core: S, snapshots: sled::Tree) -> crate::Result<StateMachineStore<S>> {
        let applied = match core.persisted_marker() {
            None => AppliedMarker::default(),
            Some(bytes) => decode(&bytes).map_err(|source| crate::Error::Corrupt {
                what: "applied marker".into(),
                source,
            })?,
        };
        Ok(StateMachineStore {
            inner: Arc::new(Mutex::new(Inner {
                core,
                applied,
                snapshot_seq: 0,
                last_snapshot: None,
            })),
            snapshots,
        })
    }

    /// Runs `f` on the core (reads for queries, metrics).
    pub fn with_core<T>(&self, f: impl FnOnce(&mut S) -> T) -> T {
        f(&mut self.inner.lock().core)
    }

    /// Makes `stored` the current snapshot, durably (what `get_current_snapshot` returns).
    async fn store_current(&self, stored: &StoredSnapshot) -> Result<(), StorageError> {
        self.snapshots
            .insert(CURRENT_SNAPSHOT, encode(stored))
            .map_err(sm_err)?;
        // On a blocking thread, not sled's `flush_async`: that one waits on a thread of sled's own
        // small pool, the pool that also writes the buffers waited for, and enough concurrent
        // waits left no thread to write them (a hang seen at a cluster's first election).
        let tree = self.snapshots.clone();
        tokio::task::spawn_blocking(move || tree.flush())
            .await
            .map_err(|e| sm_err(e.to_string()))?
            .map_err(sm_err)?;
        Ok(())
    }

    /// Persists everything applied so far (ordered shutdown).
    pub fn persist_now(&self) -> Result<(), CoreError> {
        let mut inner = self.inner.lock();
        let marker = encode(&inner.applied);
        inner.core.persist(&marker)
    }

    /// Starts persisting everything applied so far without waiting (periodic sealing).
    pub fn persist_soon(&self) -> Result<(), CoreError> {
        let mut inner = self.inner.lock();
        let marker = encode(&inner.applied);
        inner.core.persist_soon(&marker)
    }
}

impl<S: StateMachineCore> RaftStateMachine<TypeConfig> for StateMachineStore<S> {
    type SnapshotBuilder = StateMachineStore<S>;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId>, StoredMembership<u64, crate::NodeAddr>), StorageError> {
        let inner = self.inner.lock();
        Ok((inner.applied.last_applied, inner.applied.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut inner = self.inner.lock();
        let mut responses = Vec::new();
        for entry in entries {
            let response = match &entry.payload {
                EntryPayload::Blank => Response::default(),
                EntryPayload::Normal(command) => {
                    Response(inner.core.apply(entry.log_id.index, &command.0))
                }
                EntryPayload::Membership(m) => {
                    inner.applied.membership = StoredMembership::new(Some(entry.log_id), m.clone());
                    Response::default()
                }
            };
            inner.applied.last_applied = Some(entry.log_id);
            responses.push(response);
        }
        if inner.core.wants_persist() {
            let marker = encode(&inner.applied);
            inner.core.persist_soon(&marker).map_err(sm_err)?;
        }
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, crate::NodeAddr>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let data = snapshot.into_inner();
        let applied = AppliedMarker {
            last_applied: meta.last_log_id,
            membership: meta.last_membership.clone(),
        };
        let description = {
            let mut inner = self.inner.lock();
            inner
                .core
                .install(&data, &encode(&applied))
                .map_err(sm_err)?;
            inner.applied = applied;
            // Kept as this node's current snapshot in the compact form it builds itself.
            inner.core.snapshot().map_err(sm_err)?
        };
        self.store_current(&StoredSnapshot {
            meta: meta.clone(),
            data: description,
        })
        .await
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let Some(bytes) = self.snapshots.get(CURRENT_SNAPSHOT).map_err(sm_err)? else {
            return Ok(None);
        };
        let stored: StoredSnapshot = decode(&bytes).map_err(sm_err)?;
        // openraft asks for the current snapshot to send it to a follower.
        let shipped = self.inner.lock().core.ship(&stored.data).map_err(sm_err)?;
        Ok(Some(Snapshot {
            meta: stored.meta,
            snapshot: Box::new(Cursor::new(shipped)),
        }))
    }
}

impl<S: StateMachineCore> RaftSnapshotBuilder<TypeConfig> for StateMachineStore<S> {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        // Cut at the last completed persist when the core can read it without holding up
        // apply, and it is newer than the last snapshot.
        let durable = self.inner.lock().core.durable_snapshot();
        let mut cut = None;
        if let Some(read) = durable {
            let read = tokio::task::spawn_blocking(read)
                .await
                .map_err(sm_err)?
                .map_err(sm_err)?;
            if let Some((marker, data)) = read {
                let applied: AppliedMarker = crate::decode(&marker).map_err(sm_err)?;
                if applied.last_applied > self.inner.lock().last_snapshot {
                    cut = Some((applied, data));
                }
            }
        }
        // Otherwise persist first: the snapshot (and the log purge openraft does after it)
        // must never run ahead of what is durable in the state machine.
        let (meta, data) = {
            let mut inner = self.inner.lock();
            let (applied, data) = match cut {
                Some(cut) => cut,
                None => {
                    let marker = encode(&inner.applied);
                    inner.core.persist(&marker).map_err(sm_err)?;
                    (
                        inner.applied.clone(),
                        inner.core.snapshot().map_err(sm_err)?,
                    )
                }
            };
            inner.snapshot_seq += 1;
            let last = applied.last_applied;
            inner.last_snapshot = last;
            let meta = SnapshotMeta {
                last_log_id: last,
                last_membership: applied.membership,
                snapshot_id: format!(
                    "{}-{}",
                    last.map(|l| l.index).unwrap_or(0),
                    inner.snapshot_seq
                ),
            };
            (meta, data)
        };
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data,
        };
        self.store_current(&stored).await?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(stored.data)),
        })
    }
}
