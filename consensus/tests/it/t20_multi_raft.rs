//! Several groups on several in-process nodes: replication, leader loss, restart with replay.

use crate::cluster::{initialize, leader_of, start_node, write, write_and_check_replicated};
use optiprism_consensus::{Command, GroupId, LocalRouter, NodeAddr};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_replicate_every_group_and_survive_a_leader_loss() {
    let dir = tempfile::tempdir().unwrap();
    let router = LocalRouter::new();
    let groups = [GroupId::METADATA, GroupId(1), GroupId(2)];
    let mut nodes = BTreeMap::new();
    for id in 1..=3 {
        nodes.insert(
            id,
            start_node(id, dir.path(), Arc::clone(&router), &groups).await,
        );
    }
    let members: BTreeMap<u64, NodeAddr> = (1..=3).map(|id| (id, NodeAddr::default())).collect();
    initialize(&nodes, &groups, &members).await;
    write_and_check_replicated(&nodes, &groups, 50, Duration::from_secs(10)).await;
    // Stop the leader of group 1; the others elect a new one and keep accepting writes.
    let old = leader_of(&nodes, GroupId(1)).await;
    let old_id = old.metrics().borrow().id;
    let stopped = nodes.remove(&old_id).unwrap();
    router.unregister_node(old_id);
    for (raft, _) in stopped.groups.values() {
        raft.shutdown().await.unwrap();
    }
    let new_leader = leader_of(&nodes, GroupId(1)).await;
    assert_ne!(new_leader.metrics().borrow().id, old_id);
    write(&nodes, GroupId(1), "after=failover".to_string()).await;
    for node in nodes.values() {
        node.groups[&GroupId(1)].0.shutdown().await.unwrap();
        node.groups[&GroupId(2)].0.shutdown().await.unwrap();
        node.groups[&GroupId::METADATA].0.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_single_node_replays_unpersisted_entries_and_purges_its_log() {
    let dir = tempfile::tempdir().unwrap();
    let router = LocalRouter::new();
    let g = GroupId(1);
    {
        let node = start_node(1, dir.path(), Arc::clone(&router), &[g]).await;
        let raft = node.groups[&g].0.clone();
        raft.initialize(BTreeMap::from([(1u64, NodeAddr::default())]))
            .await
            .unwrap();
        raft.wait(Some(Duration::from_secs(10)))
            .current_leader(1, "leader")
            .await
            .unwrap();
        for i in 0..101 {
            raft.client_write(Command(format!("k{i}=v{i}").into_bytes()))
                .await
                .unwrap();
        }
        // Snapshots every 20 entries let the log be purged behind them.
        raft.wait(Some(Duration::from_secs(10)))
            .purged(Some(openraft::testing::log_id(1, 1, 80)), "purged")
            .await
            .ok();
        assert!(
            raft.metrics().borrow().purged.is_some(),
            "log was never purged"
        );
        raft.shutdown().await.unwrap();
        router.unregister_node(1);
    }
    let node = start_node(1, dir.path(), Arc::clone(&router), &[g]).await;
    let (raft, sm) = &node.groups[&g];
    raft.wait(Some(Duration::from_secs(10)))
        .current_leader(1, "leader after restart")
        .await
        .unwrap();
    // Persisted every 3 applies: some writes came back only by replaying the log.
    let map = sm.with_core(|c| c.map.clone());
    assert_eq!(map.len(), 101);
    assert_eq!(map["k100"], "v100");
    raft.shutdown().await.unwrap();
}
