//! Fast failover: elects the best surviving voter of a group as soon as its dead leader's lease
//! has run out, a pre-vote openraft 0.9 does not have.
//!
//! On its own, openraft lets a follower campaign only after the leader lease (the election
//! timeout's upper bound) *plus* its randomized election timeout have passed without word from
//! the leader, and the first follower to campaign is whichever timer fires first, not the one
//! with the longest log. When that one's log is shorter (common under load: followers receive
//! the dead leader's last appends at different moments), the other voter refuses it, the two
//! then split the next term between them, and the group stays leaderless for a second or third
//! timeout. Each group the dead node led goes through this on its own, and a batch of events
//! waits for all of them.
//!
//! The watch here runs on every node of a cluster. For each group where this node is a voting
//! follower that has heard no append for longer than the lease, it asks the other voters for
//! their standing: their last log id, how long they have been without a leader, whether they
//! lead. It campaigns only when every voter that answers would grant its vote (silent past the
//! lease too, so the lease check passes; not leading; no longer log, and on a tie the lowest
//! node id goes first) and those voters with this node make a quorum. Every survivor decides
//! alike, so exactly one campaigns, about one lease after the leader's last heartbeat instead
//! of one lease and one or more timeouts. A campaign that has not produced a leader shortly
//! after is run again under the same checks: a voter whose own timer fired first (one
//! restarted a moment ago, say) holds that term for itself and refuses this node in it, but
//! grants the next. openraft's own timers stay on as the fallback, and a group whose elections
//! a leader transfer holds is left alone.

use crate::quic::{QuicTransport, Reply, Request};
use crate::{GroupId, LogId, Raft};
use openraft::ServerState;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::time::Instant;

/// How often the watch looks at every group.
const TICK: Duration = Duration::from_millis(100);

/// Silence beyond the lease before a node campaigns: covers the time between a voter's lease
/// renewal inside openraft and the moment the transport notes the append that renewed it.
const MARGIN: Duration = Duration::from_millis(100);

/// How long a voter has to tell its standing; one that does not is treated as gone.
const ASK_TIMEOUT: Duration = Duration::from_millis(300);

/// How soon a campaign that has not ended in a leader is tried again. A voter whose own timer
/// fired (one restarted a moment ago, say) may hold the next term for itself with a shorter
/// log: this node's campaign for the same term is then refused, and the next term is not.
const RETRY: Duration = Duration::from_millis(250);

/// A voter's view of one group, as it answers a [`Request::Standing`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Standing {
    /// The id of its last log entry.
    last_log: Option<LogId>,
    /// Milliseconds since it last took an append from a leader (or since it started).
    silent_millis: u64,
    /// Whether it leads the group.
    leads: bool,
}

impl QuicTransport {
    /// Notes that `group` just took an append from its leader (its followers' lease is renewed).
    pub(crate) fn heard_from_leader(&self, group: GroupId) {
        self.heard.lock().insert(group, Instant::now());
    }

    /// How long `group` has gone without an append from a leader on this node.
    fn silence(&self, group: GroupId) -> Duration {
        let heard = self.heard.lock().get(&group).copied();
        heard.unwrap_or(self.started).elapsed()
    }

    /// This node's standing in `group`, for a peer deciding whether to campaign.
    pub(crate) fn standing(&self, raft: &Raft, group: GroupId) -> Standing {
        Standing {
            last_log: raft.data_metrics().borrow().last_log,
            silent_millis: self.silence(group).as_millis() as u64,
            leads: raft.metrics().borrow().state == ServerState::Leader,
        }
    }

    async fn standing_of(&self, voter: u64, group: GroupId) -> Option<Standing> {
        let ask = self.leader_rpc(voter, group, Request::Standing, |reply| match reply {
            Reply::Standing(standing) => Some(Ok(standing)),
            _ => None,
        });
        tokio::time::timeout(ASK_TIMEOUT, ask).await.ok()?.ok()
    }

    /// Campaigns for `group`, silent past `lease`, when its leader is gone and this node is
    /// the voter the others would elect; see the module documentation.
    async fn campaign_if_best(&self, group: GroupId, raft: &Raft, lease: Duration) {
        let (voters, silent_leader) = {
            let metrics = raft.metrics();
            let m = metrics.borrow();
            if !matches!(m.state, ServerState::Follower | ServerState::Candidate) {
                return;
            }
            let voters: Vec<u64> = m.membership_config.membership().voter_ids().collect();
            (voters, m.current_leader)
        };
        if voters.len() < 2 || !voters.contains(&self.node_id) {
            return;
        }
        if self.holds.elections_held(group) {
            return;
        }
        if self
            .campaigned
            .lock()
            .get(&group)
            .is_some_and(|at| at.elapsed() < RETRY)
        {
            return;
        }
        let mine = raft.data_metrics().borrow().last_log;
        // The leader that went silent is not asked: it is most likely dead, and would only be
        // waited for. Were it alive but cut off from this node, openraft's own timer would
        // depose it a moment later anyway.
        let others: Vec<u64> = voters
            .iter()
            .copied()
            .filter(|&v| v != self.node_id && Some(v) != silent_leader)
            .collect();
        let answers =
            futures::future::join_all(others.iter().map(|&v| self.standing_of(v, group))).await;
        let answers: Vec<(u64, Standing)> = others
            .into_iter()
            .zip(answers)
            .filter_map(|(voter, standing)| Some((voter, standing?)))
            .collect();
        if !would_be_elected(self.node_id, mine, voters.len(), lease + MARGIN, &answers) {
            return;
        }
        // The answers took a moment: campaign only if nothing was heard meanwhile.
        if self.silence(group) <= lease + MARGIN
            || raft.metrics().borrow().state == ServerState::Leader
        {
            return;
        }
        self.campaigned.lock().insert(group, Instant::now());
        tracing::info!(
            node_id = self.node_id,
            %group,
            silent_ms = self.silence(group).as_millis() as u64,
            "the leader is silent past its lease and this node has the longest log: campaigning"
        );
        if let Err(e) = raft.trigger().elect().await {
            tracing::warn!(node_id = self.node_id, %group, error = %e, "could not campaign");
        }
    }
}

/// Whether node `me`, with `mine` as its last log id, is the one voter of `voters` to campaign
/// given the standings of the voters that `answered`: each of them would grant its vote
/// (silent for longer than `lease`, not leading, no longer log, and on equal logs a higher
/// node id), and with `me` they make a quorum.
fn would_be_elected(
    me: u64,
    mine: Option<LogId>,
    voters: usize,
    lease: Duration,
    answered: &[(u64, Standing)],
) -> bool {
    let objects = |&(voter, ref standing): &(u64, Standing)| {
        standing.leads
            || Duration::from_millis(standing.silent_millis) <= lease
            || (standing.last_log, std::cmp::Reverse(voter)) > (mine, std::cmp::Reverse(me))
    };
    !answered.iter().any(objects) && 1 + answered.len() > voters / 2
}

/// Watches every group of `transport` for a dead leader until the transport is gone. Each
/// group is checked on its own task, so a check waiting for an answer holds up no other group
/// and no later tick.
pub(crate) async fn watch(transport: Weak<QuicTransport>) {
    let checking: Arc<parking_lot::Mutex<HashSet<GroupId>>> = Arc::default();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(transport) = transport.upgrade() else {
            return;
        };
        for (group, raft) in transport.groups_snapshot() {
            // A group that heard from its leader lately needs no task at all.
            let lease = Duration::from_millis(raft.config().election_timeout_max);
            if transport.silence(group) <= lease + MARGIN || !checking.lock().insert(group) {
                continue;
            }
            let (transport, checking) = (Arc::clone(&transport), Arc::clone(&checking));
            tokio::spawn(async move {
                transport.campaign_if_best(group, &raft, lease).await;
                checking.lock().remove(&group);
            });
        }
    }
}

/// Starts the watch of `transport` on the current runtime.
pub(crate) fn start(transport: &Arc<QuicTransport>) {
    tokio::spawn(watch(Arc::downgrade(transport)));
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::CommittedLeaderId;

    fn log(term: u64, index: u64) -> Option<LogId> {
        Some(LogId::new(CommittedLeaderId::new(term, 1), index))
    }

    fn silent(last_log: Option<LogId>, silent_millis: u64) -> Standing {
        Standing {
            last_log,
            silent_millis,
            leads: false,
        }
    }

    const LEASE: Duration = Duration::from_millis(2_000);

    #[test]
    fn the_longest_log_campaigns_and_the_shorter_waits() {
        let longer = [(2, silent(log(3, 60), 2_500))];
        assert!(!would_be_elected(1, log(3, 57), 3, LEASE, &longer));
        let shorter = [(1, silent(log(3, 57), 2_500))];
        assert!(would_be_elected(2, log(3, 60), 3, LEASE, &shorter));
        // A later term outranks a longer log of an earlier one, as in Raft's vote check.
        let newer_term = [(2, silent(log(4, 10), 2_500))];
        assert!(!would_be_elected(1, log(3, 60), 3, LEASE, &newer_term));
    }

    #[test]
    fn on_equal_logs_only_the_lowest_node_id_campaigns() {
        assert!(would_be_elected(
            1,
            log(3, 60),
            3,
            LEASE,
            &[(2, silent(log(3, 60), 2_500))]
        ));
        assert!(!would_be_elected(
            2,
            log(3, 60),
            3,
            LEASE,
            &[(1, silent(log(3, 60), 2_500))]
        ));
    }

    #[test]
    fn a_voter_still_in_its_lease_or_a_live_leader_stops_the_campaign() {
        let renewed = [(2, silent(log(3, 10), 1_999))];
        assert!(!would_be_elected(1, log(3, 60), 3, LEASE, &renewed));
        let leads = [(
            2,
            Standing {
                leads: true,
                ..silent(log(3, 10), 2_500)
            },
        )];
        assert!(!would_be_elected(1, log(3, 60), 3, LEASE, &leads));
    }

    #[test]
    fn without_a_quorum_of_answers_nobody_campaigns() {
        // Three voters: this node and one that answered make two, a majority.
        let one = [(2, silent(log(3, 10), 2_500))];
        assert!(would_be_elected(1, log(3, 60), 3, LEASE, &one));
        // Five voters: two of five is not.
        assert!(!would_be_elected(1, log(3, 60), 5, LEASE, &one));
        // Alone of three: the others may be alive and merely slow to answer.
        assert!(!would_be_elected(1, log(3, 60), 3, LEASE, &[]));
    }
}
