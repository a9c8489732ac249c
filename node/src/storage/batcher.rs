//! Group commit of ingestion per partition: requests that arrive while earlier proposals of
//! the same partition are in flight wait, and go into the next proposal together.
//!
//! Each proposal costs the same Raft round (append, flush, commit, apply, and on a cluster a
//! replication round trip) whatever its size, so under load a partition commits a few large
//! entries instead of one small entry per request. When the partition is idle a request is
//! proposed at once, alone: batching never adds a wait. A proposal carries each request's
//! events as a separate part, so every request gets its own counts back, and a message id
//! repeated across requests counts as a duplicate in the later one, as if they had been
//! proposed one after the other.

use crate::server::{ProposeError, Proposer};
use crate::storage::chunk::StoredEvent;
use crate::storage::partition::{
    IngestOutcome, LocalProposals, PartitionCommand, ProposedRows, encode_rows,
};
use optiprism_consensus::{GroupId, Raft};
use optiprism_types::ProjectId;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::{Semaphore, mpsc, oneshot};

/// Proposals of one partition in flight at once: enough to keep the log flusher busy while
/// the previous entry is applied, few enough that waiting requests form large batches.
const MAX_IN_FLIGHT: usize = 2;

/// The most events one proposal takes; further waiting requests go into the next one.
const MAX_EVENTS_PER_PROPOSAL: usize = 32_768;

type Reply = oneshot::Sender<Result<IngestOutcome, ProposeError>>;

struct Request {
    project: ProjectId,
    events: Vec<StoredEvent>,
    reply: Reply,
}

/// Proposal tokens: a random epoch per process, then a counter, so tokens of a crashed
/// process replayed from the log never match this process's.
#[derive(Debug)]
pub struct Tokens {
    epoch: u64,
    next: AtomicU64,
}

impl Tokens {
    /// Tokens of a new process.
    pub fn new() -> Tokens {
        Tokens {
            epoch: rand::random(),
            next: AtomicU64::new(0),
        }
    }

    fn next(&self) -> u128 {
        (u128::from(self.epoch) << 64) | u128::from(self.next.fetch_add(1, Ordering::Relaxed))
    }
}

impl Default for Tokens {
    fn default() -> Tokens {
        Tokens::new()
    }
}

/// The ingestion front of one partition group.
#[derive(Debug, Clone)]
pub struct Batcher {
    group: GroupId,
    requests: mpsc::UnboundedSender<Request>,
}

/// What proposing to one partition group takes.
#[derive(Clone)]
pub struct Group {
    /// The group.
    pub group: GroupId,
    /// Its Raft handle on this node, when this node holds a replica.
    pub raft: Option<Raft>,
    /// Commits here or forwards to the leader.
    pub proposer: Proposer,
    /// This node's own proposals, decoded (for a group hosted here).
    pub local: Option<LocalProposals>,
    /// Proposal tokens of this process.
    pub tokens: Arc<Tokens>,
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Group").field("group", &self.group).finish()
    }
}

impl Batcher {
    /// Starts the batcher of `group` on the current runtime.
    pub fn start(group: Group) -> Self {
        let (requests, queue) = mpsc::unbounded_channel();
        let id = group.group;
        tokio::spawn(run(group, queue));
        Batcher {
            group: id,
            requests,
        }
    }

    /// Proposes `events` of `project`; returns once they are committed and applied.
    pub async fn ingest(
        &self,
        project: ProjectId,
        events: Vec<StoredEvent>,
    ) -> Result<IngestOutcome, ProposeError> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(Request {
                project,
                events,
                reply,
            })
            .map_err(|_| ProposeError::ShuttingDown)?;
        answer
            .await
            .unwrap_or(Err(ProposeError::NoLeader { group: self.group }))
    }
}

async fn run(group: Group, mut queue: mpsc::UnboundedReceiver<Request>) {
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut carried: Option<Request> = None;
    loop {
        let first = match carried.take() {
            Some(r) => r,
            None => match queue.recv().await {
                Some(r) => r,
                None => return,
            },
        };
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        // Everything that queued up while the slots were busy joins this proposal.
        let project = first.project;
        let mut events = first.events.len();
        let mut batch = vec![first];
        while events < MAX_EVENTS_PER_PROPOSAL {
            match queue.try_recv() {
                // One project per proposal: another project's request starts the next one.
                Ok(r) if r.project != project => {
                    carried = Some(r);
                    break;
                }
                Ok(r) => {
                    events += r.events.len();
                    batch.push(r);
                }
                Err(_) => break,
            }
        }
        let group = group.clone();
        tokio::spawn(async move {
            group.propose(project, batch).await;
            drop(slot);
        });
    }
}

impl Group {
    /// Proposes the requests of `batch` as one entry and answers each with its own outcome.
    async fn propose(&self, project: ProjectId, batch: Vec<Request>) {
        let Group {
            group,
            raft,
            proposer,
            local,
            tokens,
        } = self;
        let group = *group;
        let mut parts = Vec::with_capacity(batch.len());
        let mut replies = Vec::with_capacity(batch.len());
        let mut events = Vec::with_capacity(batch.iter().map(|r| r.events.len()).sum());
        for r in batch {
            parts.push(r.events.len() as u32);
            events.extend(r.events);
            replies.push(r.reply);
        }
        let token = tokens.next();
        let proposed = ProposedRows::of(&events);
        drop(events);
        let command = PartitionCommand::IngestRows {
            project,
            token,
            parts,
            rows: encode_rows(&proposed.batch),
            person_sets: proposed.person_sets.clone(),
        };
        if let Some(local) = local {
            local.insert(token, proposed);
        }
        let result = proposer
            .propose(group, raft.as_ref(), optiprism_consensus::encode(&command))
            .await
            .and_then(|bytes| {
                optiprism_consensus::decode::<Vec<IngestOutcome>>(&bytes).map_err(|e| {
                    ProposeError::Fatal {
                        group,
                        message: format!("undecodable response: {e}"),
                    }
                })
            });
        // An applied proposal took its events; a failed one must not leave them behind.
        if let Some(local) = local {
            local.take(token);
        }
        match result {
            Ok(outcomes) if outcomes.len() == replies.len() => {
                for (reply, outcome) in replies.into_iter().zip(outcomes) {
                    let _ = reply.send(Ok(outcome));
                }
            }
            Ok(outcomes) => {
                let message = format!(
                    "{} outcomes for a proposal of {} requests",
                    outcomes.len(),
                    replies.len()
                );
                for reply in replies {
                    let _ = reply.send(Err(ProposeError::Fatal {
                        group,
                        message: message.clone(),
                    }));
                }
            }
            Err(e) => {
                for reply in replies {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }
}
