//! Group commit of ingestion per partition: requests that arrive while earlier proposals of
//! the same partition are in flight wait, and go into the next proposal together.
//!
//! Each proposal costs the same Raft round (append, flush, commit, apply, and on a cluster a
//! replication round trip) whatever its size, so under load a partition commits a few large
//! entries instead of one small entry per request. When the partition is idle a request is
//! proposed at once, alone. A partition that is busy but not saturated would still propose
//! nearly every request alone (its previous entry is done before the next request comes), and
//! then each entry's fixed cost, paid on every member, fills the cores at half the load they
//! could carry: so when requests have been arriving within a couple of lingers of each other
//! and a slot is free, the proposal stays open for up to `linger` for the next ones to join
//! (Kafka's `linger.ms`), for as long as the next request is due, at the recent pace, before
//! the linger ends: at a pace slower than the linger, waiting would add the linger to every
//! request and gather nothing; and only until the proposal holds three requests, where more
//! would hold the first one longer for little CPU saved, unless those three are small (SDKs
//! send a few dozen events a request, a partition's share of which is a handful): then it
//! lingers on until it holds a few hundred events. An idle partition never waits. A
//! proposal carries each request's events as a separate part, so every request gets its own
//! counts back, and a message id repeated across requests counts as a duplicate in the later
//! one, as if they had been proposed one after the other.

use crate::server::{ProposeError, Proposer};
use crate::storage::chunk::StoredEvent;
use crate::storage::partition::{
    IngestOutcome, LocalProposals, PartitionCommand, ProposedRows, encode_rows, rows_fit_an_entry,
};
use optiprism_consensus::{GroupId, Raft};
use optiprism_types::ProjectId;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::time::Instant;

/// Proposals of one partition in flight at once: enough to keep the log flusher busy while
/// the previous entry is applied, few enough that waiting requests form large batches.
const MAX_IN_FLIGHT: usize = 2;

/// The most events one proposal takes; further waiting requests go into the next one.
const MAX_EVENTS_PER_PROPOSAL: usize = 32_768;

/// A proposal with this many events stops lingering: an entry's fixed cost is already small
/// beside what its events cost.
const LINGER_ENOUGH_EVENTS: usize = 4_096;

/// A proposal of this many requests stops lingering. The first request that joins halves the
/// partition's entries and the second takes a further third off, but a third would take only
/// a quarter more off while holding the first request another gap: gathering two was better
/// than gathering three or none at half load on both machines the benchmark ran on
/// (`bench/notes.md`). With this cap, the linger is a ceiling for slow paces rather than what
/// sets how many requests a fast pace gathers.
const LINGER_ENOUGH_REQUESTS: usize = 3;

/// A proposal of fewer events than this keeps lingering however many requests it holds. An
/// SDK's request of 100 events gives each of 8 partitions about 12: stopping at three such
/// requests made entries of about 40 events, so each entry's fixed cost, paid on every
/// member, outweighed its events, and the members spent 37–40 µs of CPU per event against
/// 24–26 µs lingering until this many (`bench/notes.md`). Requests of 1,000 events (125 a
/// partition) reach it at the third request, so this changes nothing for them.
const LINGER_FEWEST_EVENTS: usize = 256;

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
    /// How long a busy partition's proposal waits for more requests (`ingest.linger`).
    pub linger: Duration,
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
    let linger = group.linger;
    let mut carried: Option<Request> = None;
    let mut arrivals = Arrivals::default();
    loop {
        let first = match carried.take() {
            Some(r) => r,
            None => match queue.recv().await {
                Some(r) => r,
                None => return,
            },
        };
        let arrived = Instant::now();
        let recently_busy = arrivals
            .last
            .is_some_and(|at| arrived.duration_since(at) < linger * 2);
        arrivals.note(arrived);
        // A request that had to wait for a slot already gathers everything that queued behind
        // the proposals in flight: lingering then would only leave the slot idle.
        let (slot, slot_was_free) = match Arc::clone(&slots).try_acquire_owned() {
            Ok(slot) => (slot, true),
            Err(_) => match Arc::clone(&slots).acquire_owned().await {
                Ok(slot) => (slot, false),
                Err(_) => return,
            },
        };
        // Everything that queued up while the slots were busy joins this proposal.
        let project = first.project;
        let mut batch = Gathering {
            events: first.events.len(),
            requests: vec![first],
        };
        while batch.events < MAX_EVENTS_PER_PROPOSAL {
            match queue.try_recv() {
                Ok(r) => {
                    arrivals.note(Instant::now());
                    if let Err(other) = batch.join(project, r) {
                        carried = Some(other);
                        break;
                    }
                }
                Err(_) => break,
            }
        }
        if recently_busy && slot_was_free && carried.is_none() && !linger.is_zero() {
            let deadline = arrived + linger;
            // Wait only while the next request is due before the deadline: at a pace slower
            // than the linger, waiting would add the linger to every request and gather none.
            while batch.worth_lingering(&arrivals, deadline) {
                let Ok(Some(r)) = tokio::time::timeout_at(deadline, queue.recv()).await else {
                    break;
                };
                arrivals.note(Instant::now());
                if let Err(other) = batch.join(project, r) {
                    carried = Some(other);
                    break;
                }
            }
        }
        let group = group.clone();
        tokio::spawn(async move {
            group.propose(project, batch.requests).await;
            drop(slot);
        });
    }
}

/// The pace of a partition's requests: when the last one came, and the usual gap between
/// them (a moving average, so one long or short gap does not swing it). Requests are noted
/// when the batcher takes them from its queue, not when they were sent to it: those that
/// queued behind proposals in flight count as a burst, which keeps a busy partition lingering.
/// Noting each at its own arrival gave a higher p99 at half load (`bench/notes.md`).
#[derive(Debug, Default)]
struct Arrivals {
    last: Option<Instant>,
    gap: Option<Duration>,
}

impl Arrivals {
    /// Notes a request that arrived at `at`.
    fn note(&mut self, at: Instant) {
        if let Some(last) = self.last {
            let gap = at.saturating_duration_since(last);
            // Weight 1/4 for the newest gap.
            self.gap = Some(match self.gap {
                Some(average) => (average * 3 + gap) / 4,
                None => gap,
            });
        }
        self.last = Some(at);
    }

    /// When the next request is due at the usual pace; `None` before two have come.
    fn next_due(&self) -> Option<Instant> {
        Some(self.last? + self.gap?)
    }

    /// Whether the next request is due before `deadline`: worth waiting for.
    fn next_due_before(&self, deadline: Instant) -> bool {
        self.next_due().is_some_and(|due| due < deadline)
    }
}

/// The requests of the next proposal.
struct Gathering {
    requests: Vec<Request>,
    events: usize,
}

impl Gathering {
    /// Whether to wait for the next request until `deadline`: while the proposal is still
    /// small and the next request is due, at the recent pace, before the deadline.
    fn worth_lingering(&self, arrivals: &Arrivals, deadline: Instant) -> bool {
        (self.requests.len() < LINGER_ENOUGH_REQUESTS || self.events < LINGER_FEWEST_EVENTS)
            && self.events < LINGER_ENOUGH_EVENTS
            && arrivals.next_due_before(deadline)
    }

    /// Adds `request`, or hands it back when it is of another project than `project`: one
    /// project per proposal, so another project's request starts the next one.
    fn join(&mut self, project: ProjectId, request: Request) -> Result<(), Request> {
        if request.project != project {
            return Err(request);
        }
        self.events += request.events.len();
        self.requests.push(request);
        Ok(())
    }
}

impl Group {
    /// Proposes the requests of `batch` as one entry and answers each with its own outcome.
    /// Rows too large for one entry go as one entry per request; a request too large alone is
    /// answered with [`ProposeError::TooLarge`] without being proposed.
    async fn propose(&self, project: ProjectId, batch: Vec<Request>) {
        let Group {
            group,
            raft,
            proposer,
            local,
            tokens,
            linger: _,
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
        let proposed = ProposedRows::of(&events);
        let rows = encode_rows(&proposed.batch);
        if let Err((bytes, limit)) = rows_fit_an_entry(&rows) {
            drop((proposed, rows));
            if replies.len() > 1 {
                // Several requests that each fit may not fit together: each goes alone.
                futures::future::join_all(
                    separate(project, replies, &parts, events)
                        .into_iter()
                        .map(|r| Box::pin(self.propose(project, vec![r]))),
                )
                .await;
            } else {
                for reply in replies {
                    let _ = reply.send(Err(ProposeError::TooLarge { bytes, limit }));
                }
            }
            return;
        }
        drop(events);
        let token = tokens.next();
        let command = PartitionCommand::IngestRows {
            project,
            token,
            parts,
            rows,
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

/// The requests a proposal merged, each with its own events again (`parts[i]` events for the
/// `i`th reply, in order).
fn separate(
    project: ProjectId,
    replies: Vec<Reply>,
    parts: &[u32],
    mut events: Vec<StoredEvent>,
) -> Vec<Request> {
    let mut requests = Vec::with_capacity(replies.len());
    for (reply, &n) in replies.into_iter().zip(parts) {
        let rest = events.split_off((n as usize).min(events.len()));
        requests.push(Request {
            project,
            events: std::mem::replace(&mut events, rest),
            reply,
        });
    }
    requests
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paced(gaps_ms: &[u64]) -> (Arrivals, Instant) {
        let mut arrivals = Arrivals::default();
        let mut at = Instant::now();
        arrivals.note(at);
        for &gap in gaps_ms {
            at += Duration::from_millis(gap);
            arrivals.note(at);
        }
        (arrivals, at)
    }

    #[test]
    fn the_next_request_is_due_one_usual_gap_after_the_last() {
        assert_eq!(Arrivals::default().next_due(), None);
        assert_eq!(paced(&[]).0.next_due(), None, "one arrival shows no pace");
        let (arrivals, last) = paced(&[12, 12, 12]);
        assert_eq!(arrivals.next_due(), Some(last + Duration::from_millis(12)));
        // One long gap moves the usual gap by a quarter of the difference, not all of it.
        let (arrivals, last) = paced(&[12, 12, 12, 52]);
        assert_eq!(arrivals.next_due(), Some(last + Duration::from_millis(22)));
    }

    #[test]
    fn a_linger_shorter_than_the_pace_is_not_worth_waiting_and_a_longer_one_is() {
        // Requests every 12 ms: a 10 ms linger would wait and gather nothing; 20 ms gathers one.
        let (arrivals, last) = paced(&[12, 12, 12, 12]);
        assert!(!arrivals.next_due_before(last + Duration::from_millis(10)));
        assert!(arrivals.next_due_before(last + Duration::from_millis(20)));
        // Before any pace is known, nothing is worth waiting for.
        assert!(!paced(&[]).0.next_due_before(last + Duration::from_secs(1)));
    }

    /// A proposal of `requests` requests of `events` events each.
    fn gathering(requests: usize, events: usize) -> Gathering {
        let requests = (0..requests)
            .map(|_| Request {
                project: ProjectId(1),
                events: Vec::new(),
                reply: oneshot::channel().0,
            })
            .collect::<Vec<_>>();
        Gathering {
            events: requests.len() * events,
            requests,
        }
    }

    #[test]
    fn a_merged_proposal_separates_into_its_requests_with_their_own_events() {
        let event = |id: &str| StoredEvent {
            message_id: id.to_string(),
            distinct_id: "d".into(),
            person_id: 1,
            event: "e".into(),
            timestamp_ms: 1_000,
            props: vec![],
            person_set: vec![],
            person_set_once: vec![],
        };
        let events: Vec<StoredEvent> = ["a", "b", "c", "d", "e", "f"].map(event).into();
        let (replies, answers): (Vec<Reply>, Vec<_>) = (0..3).map(|_| oneshot::channel()).unzip();
        let requests = separate(ProjectId(4), replies, &[2, 3, 1], events);
        let ids: Vec<Vec<&str>> = requests
            .iter()
            .map(|r| r.events.iter().map(|e| e.message_id.as_str()).collect())
            .collect();
        assert_eq!(ids, [vec!["a", "b"], vec!["c", "d", "e"], vec!["f"]]);
        assert!(requests.iter().all(|r| r.project == ProjectId(4)));
        // Each request answers its own caller.
        for (i, r) in requests.into_iter().enumerate() {
            let _ = r.reply.send(Ok(IngestOutcome {
                accepted: i as u32,
                duplicates: 0,
            }));
        }
        for (i, mut answer) in answers.into_iter().enumerate() {
            assert_eq!(answer.try_recv().unwrap().unwrap().accepted, i as u32);
        }
    }

    #[test]
    fn a_proposal_lingers_for_two_more_requests_at_most() {
        let linger = Duration::from_millis(25);
        // Requests every 6 ms: the linger would fit three more, but two are enough.
        let (arrivals, last) = paced(&[6, 6, 6, 6]);
        let deadline = last + linger;
        assert!(gathering(1, 125).worth_lingering(&arrivals, deadline));
        assert!(gathering(2, 125).worth_lingering(&arrivals, deadline));
        assert!(!gathering(3, 125).worth_lingering(&arrivals, deadline));
        // Large requests: one proposal already has enough events.
        assert!(!gathering(2, LINGER_ENOUGH_EVENTS / 2).worth_lingering(&arrivals, deadline));
        // Requests every 17 ms: one more is due within the linger.
        let (mut arrivals, first) = paced(&[17, 17, 17, 17]);
        assert!(gathering(1, 125).worth_lingering(&arrivals, first + linger));
        // Once it joined, the next is due 34 ms after the first: past the deadline.
        arrivals.note(first + Duration::from_millis(17));
        assert!(!gathering(2, 125).worth_lingering(&arrivals, first + linger));
    }

    #[test]
    fn small_requests_gather_past_three_until_a_few_hundred_events() {
        let linger = Duration::from_millis(25);
        // An SDK's requests of 100 events, a partition's share every 1.5 ms.
        let (arrivals, last) = paced(&[2, 1, 2, 1, 2, 1]);
        let deadline = last + linger;
        assert!(gathering(3, 12).worth_lingering(&arrivals, deadline));
        assert!(gathering(20, 12).worth_lingering(&arrivals, deadline));
        assert!(!gathering(22, 12).worth_lingering(&arrivals, deadline));
        // Still only while the next request is due before the deadline.
        assert!(!gathering(3, 12).worth_lingering(&arrivals, last));
    }
}
