//! In-process nodes of the multi-raft tests: start one over any transport, write through
//! whichever node leads a group, find a group's leader.

use crate::kv::KvCore;
use optiprism_consensus::{
    Command, GroupConfig, GroupId, LocalRouter, NodeAddr, NodeStorage, QuicTransport, Raft,
    RaftTransport, Wal, WalError, start_group,
};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// Makes a started group reachable through a transport.
pub(crate) trait Serve: RaftTransport {
    fn serve(&self, node: u64, group: GroupId, raft: Raft);
}

impl Serve for LocalRouter {
    fn serve(&self, node: u64, group: GroupId, raft: Raft) {
        self.register(node, group, raft);
    }
}

impl Serve for QuicTransport {
    fn serve(&self, _node: u64, group: GroupId, raft: Raft) {
        self.register(group, raft);
    }
}

fn fast_config() -> GroupConfig {
    GroupConfig {
        // Loose enough that a loaded two-core CI machine does not trigger spurious elections.
        heartbeat_interval: Duration::from_millis(100),
        election_timeout_min: Duration::from_millis(800),
        election_timeout_max: Duration::from_millis(1_600),
        snapshot_every_entries: 20,
        keep_entries_after_snapshot: 5,
    }
}

/// Opens a node's sled database and Raft log. A node restarted in the same process may find
/// their locks still held for a moment: a stopped group's tasks drop their handles after
/// `shutdown` returns.
async fn open_storage(dir: &std::path::Path) -> NodeStorage {
    let sled_dir = dir.join("sled");
    let mut db = None;
    for _ in 0..100 {
        match sled::open(&sled_dir) {
            Ok(opened) => {
                db = Some(opened);
                break;
            }
            Err(sled::Error::Io(e)) if e.to_string().contains("could not acquire lock") => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("cannot open {}: {e}", sled_dir.display()),
        }
    }
    let db = db.unwrap_or_else(|| {
        panic!(
            "{} stayed locked for 10 s after its node stopped",
            sled_dir.display()
        )
    });
    for _ in 0..100 {
        match Wal::open(&dir.join("raft-wal")) {
            Ok(wal) => {
                return NodeStorage {
                    db,
                    sled_log: sled_dir.join("db"),
                    wal,
                };
            }
            Err(WalError::Locked { .. }) => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(e) => panic!("cannot open the raft log in {}: {e}", dir.display()),
        }
    }
    panic!(
        "the raft log in {} stayed locked for 10 s after its node stopped",
        dir.display()
    );
}

/// One in-process node: its sled database and its groups.
pub(crate) struct Node {
    _storage: NodeStorage,
    pub(crate) groups: BTreeMap<GroupId, (Raft, optiprism_consensus::StateMachineStore<KvCore>)>,
}

/// Starts node `id` with `groups` over `transport`, which then serves them to peers.
pub(crate) async fn start_node<T: Serve>(
    id: u64,
    dir: &std::path::Path,
    transport: Arc<T>,
    groups: &[GroupId],
) -> Node {
    let storage = open_storage(&dir.join(format!("node-{id}"))).await;
    let mut map = BTreeMap::new();
    for &g in groups {
        let core = KvCore::open(storage.db.open_tree(format!("kv-{}", g.0)).unwrap(), 3);
        let (raft, sm, _) = start_group(
            id,
            g,
            &storage,
            core,
            Arc::clone(&transport) as Arc<dyn RaftTransport>,
            &fast_config(),
        )
        .await
        .unwrap();
        transport.serve(id, g, raft.clone());
        map.insert(g, (raft, sm));
    }
    Node {
        _storage: storage,
        groups: map,
    }
}

/// Writes through whichever node leads `g`, retrying while leadership moves; returns the log
/// index of the committed entry.
pub(crate) async fn write(nodes: &BTreeMap<u64, Node>, g: GroupId, command: String) -> u64 {
    for _ in 0..50 {
        let leader = leader_of(nodes, g).await;
        match leader
            .client_write(Command(command.clone().into_bytes()))
            .await
        {
            Ok(response) => return response.log_id.index,
            Err(e) if e.forward_to_leader::<NodeAddr>().is_some() => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("write to {g} failed: {e}"),
        }
    }
    panic!("no stable leader for {g}");
}

pub(crate) async fn leader_of(nodes: &BTreeMap<u64, Node>, g: GroupId) -> Raft {
    for _ in 0..200 {
        for node in nodes.values() {
            let raft = &node.groups[&g].0;
            if let Some(leader) = raft.current_leader().await
                && let Some(n) = nodes.get(&leader)
            {
                return n.groups[&g].0.clone();
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no leader for {g}");
}

/// Initializes every group in `groups` through node 1 with `members`.
pub(crate) async fn initialize(
    nodes: &BTreeMap<u64, Node>,
    groups: &[GroupId],
    members: &BTreeMap<u64, NodeAddr>,
) {
    for g in groups {
        nodes[&1].groups[g]
            .0
            .initialize(members.clone())
            .await
            .unwrap();
    }
}

/// Writes `k0..k{count}` to every group and checks that every replica applied them all (up to
/// the last write's index: a new leader may not have applied everything yet, so its own
/// metrics are not the target), waiting up to `wait` per replica.
pub(crate) async fn write_and_check_replicated(
    nodes: &BTreeMap<u64, Node>,
    groups: &[GroupId],
    count: usize,
    wait: Duration,
) {
    let mut last_index = BTreeMap::new();
    for g in groups {
        for i in 0..count {
            last_index.insert(*g, write(nodes, *g, format!("k{i}=g{}-v{i}", g.0)).await);
        }
    }
    let last_key = format!("k{}", count - 1);
    for g in groups {
        for node in nodes.values() {
            node.groups[g]
                .0
                .wait(Some(wait))
                .applied_index_at_least(Some(last_index[g]), "replicated")
                .await
                .unwrap();
            let value = node.groups[g]
                .1
                .with_core(|c| c.map.get(&last_key).cloned());
            assert_eq!(value, Some(format!("g{}-v{}", g.0, count - 1)));
        }
    }
}
