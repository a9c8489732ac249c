//! Leader transfer: moving a group's leadership to a chosen voter, which openraft 0.9 has no
//! call for.
//!
//! A follower refuses to vote while its leader lease runs (the election timeout's upper bound
//! after it last heard from the leader), so the target cannot simply campaign. The leader
//! therefore goes quiet: it holds new proposals and linearizable reads of the group (each would
//! reach the followers and renew their lease), stops heartbeating, and has every other voter
//! hold its own elections so only the target campaigns. Once the leases have run out, the
//! target campaigns and wins with the votes of the others (its log is checked to be complete
//! first). Then everything resumes: held proposals find the new leader, and every hold expires
//! by itself should a step of the transfer not finish (a crash mid-transfer never leaves a
//! group without elections). Writes to the group wait about one lease meanwhile.

use crate::quic::{QuicTransport, Reply, Request};
use crate::{Command, GroupId, LeaderError, Raft, Response};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Holds of one node: groups whose proposals wait, and groups whose elections are off, each
/// until a deadline.
#[derive(Debug, Default)]
pub(crate) struct Holds {
    proposals: Mutex<HashMap<GroupId, Instant>>,
    elections: Mutex<HashMap<GroupId, Instant>>,
}

impl Holds {
    /// Holds or releases (`hold` of zero) the elections of `group` on this node.
    fn hold_elections(self: &Arc<Self>, raft: &Raft, group: GroupId, hold: Duration) {
        if hold.is_zero() {
            self.elections.lock().remove(&group);
            raft.runtime_config().elect(true);
            return;
        }
        let until = Instant::now() + hold;
        self.elections.lock().insert(group, until);
        raft.runtime_config().elect(false);
        let (holds, raft) = (Arc::clone(self), raft.clone());
        tokio::spawn(async move {
            tokio::time::sleep_until(until).await;
            let mut held = holds.elections.lock();
            // A later hold of the same group owns the release.
            if held.get(&group).is_some_and(|&u| u <= Instant::now()) {
                held.remove(&group);
                raft.runtime_config().elect(true);
            }
        });
    }

    /// Whether a leader transfer holds this node's elections of `group`.
    pub(crate) fn elections_held(&self, group: GroupId) -> bool {
        self.elections
            .lock()
            .get(&group)
            .is_some_and(|&until| until > Instant::now())
    }

    /// Waits while proposals of `group` are held.
    async fn wait_for_proposals(&self, group: GroupId) {
        loop {
            let until = self.proposals.lock().get(&group).copied();
            match until {
                Some(until) if until > Instant::now() => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                _ => return,
            }
        }
    }
}

impl QuicTransport {
    /// Commits `command` to `group` on this node, which must lead it, once no leader transfer
    /// holds the group's proposals.
    pub async fn propose_here(
        &self,
        raft: &Raft,
        group: GroupId,
        command: Command,
    ) -> Result<Response, LeaderError> {
        self.holds.wait_for_proposals(group).await;
        crate::propose_local(raft, self.node_id, group, command).await
    }

    /// The read index of `group` confirmed by this node as its leader, once no leader transfer
    /// holds the group (the confirming heartbeat round would renew the followers' lease).
    pub async fn read_index_here(&self, raft: &Raft, group: GroupId) -> Result<u64, LeaderError> {
        self.holds.wait_for_proposals(group).await;
        crate::read_index_local(raft, self.node_id, group).await
    }

    /// Holds (or, with zero, releases) elections of `group` on this node.
    pub(crate) fn hold_elections(&self, raft: &Raft, group: GroupId, hold: Duration) {
        self.holds.hold_elections(raft, group, hold);
    }

    /// Makes node `to` the leader of `group`. Any node may be asked: the request goes to the
    /// group's current leader, which runs the transfer. Fails with a message when `to` is not
    /// a voter of the group, has not caught up, or did not win.
    pub async fn transfer_leader(&self, group: GroupId, to: u64) -> Result<(), LeaderError> {
        let raft = self
            .group(group)
            .ok_or_else(|| LeaderError::Failed(format!("node {} has no {group}", self.node_id)))?;
        let metrics = raft.metrics().borrow().clone();
        match metrics.current_leader {
            None => {
                return Err(LeaderError::NotLeader {
                    node: self.node_id,
                    group,
                    leader: None,
                });
            }
            Some(leader) if leader != self.node_id => {
                return self
                    .leader_rpc(leader, group, Request::TransferLeader { to }, done)
                    .await;
            }
            Some(_) => {}
        }
        if to == self.node_id {
            return Ok(());
        }
        let voters: Vec<u64> = metrics.membership_config.membership().voter_ids().collect();
        if !voters.contains(&to) {
            return Err(LeaderError::Failed(format!(
                "node {to} is not a voting replica of {group} (voters: {voters:?})"
            )));
        }
        let last_log = metrics.last_log_index;
        raft.wait(Some(Duration::from_secs(5)))
            .metrics(
                |m| {
                    m.replication
                        .as_ref()
                        .and_then(|r| r.get(&to))
                        .is_some_and(|matched| matched.map(|l| l.index) >= last_log)
                },
                "the target holds the whole log",
            )
            .await
            .map_err(|_| {
                LeaderError::Failed(format!(
                    "node {to} has not caught up with the log of {group} within 5 s; try again"
                ))
            })?;
        let lease = Duration::from_millis(raft.config().election_timeout_max);
        // Every hold outlives the transfer's own steps, and expires on its own.
        let hold = lease * 3 + Duration::from_secs(2);
        let others: Vec<u64> = voters
            .iter()
            .copied()
            .filter(|&v| v != to && v != self.node_id)
            .collect();
        self.holds
            .proposals
            .lock()
            .insert(group, Instant::now() + hold);
        raft.runtime_config().heartbeat(false);
        self.hold_elections(&raft, group, hold);
        for &voter in &others {
            // A voter that cannot be reached cannot vote either; the transfer goes on.
            let _ = self.hold_elections_on(voter, group, hold).await;
        }
        // Proposals already past the hold may still be replicating: wait out the lease they
        // renewed, with a margin.
        tokio::time::sleep(lease + Duration::from_millis(300)).await;
        let campaign = self.leader_rpc(to, group, Request::Campaign, done).await;
        let won = match &campaign {
            Ok(()) => raft
                .wait(Some(lease * 2))
                .metrics(|m| m.current_leader == Some(to), "the target leads")
                .await
                .is_ok(),
            Err(_) => false,
        };
        raft.runtime_config().heartbeat(true);
        self.hold_elections(&raft, group, Duration::ZERO);
        for &voter in &others {
            let _ = self.hold_elections_on(voter, group, Duration::ZERO).await;
        }
        self.holds.proposals.lock().remove(&group);
        campaign?;
        if !won {
            return Err(LeaderError::Failed(format!(
                "node {to} did not win the election of {group}; its leader may be unchanged"
            )));
        }
        tracing::info!(node_id = self.node_id, %group, to, "leadership transferred");
        Ok(())
    }

    async fn hold_elections_on(
        &self,
        voter: u64,
        group: GroupId,
        hold: Duration,
    ) -> Result<(), LeaderError> {
        let millis = hold.as_millis() as u64;
        self.leader_rpc(voter, group, Request::HoldElections { millis }, done)
            .await
    }
}

/// The answer of a request that only succeeds or fails.
pub(crate) fn done(reply: Reply) -> Option<Result<(), LeaderError>> {
    match reply {
        Reply::Done(result) => Some(result),
        _ => None,
    }
}
