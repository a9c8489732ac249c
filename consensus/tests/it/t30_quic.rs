//! Three in-process nodes over real QUIC sockets with mutual TLS: every group replicates over
//! one connection per pair of nodes and survives the loss of a leader; a peer whose certificate
//! is not from the cluster CA, or is another node's, is refused.

use crate::cluster::{initialize, leader_of, start_node, write, write_and_check_replicated};
use openraft::raft::VoteRequest;
use optiprism_consensus::tls::{ClusterCa, NodeIdentity};
use optiprism_consensus::{GroupId, NodeAddr, QuicTransport, RaftTransport};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

fn loopback() -> std::net::SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_replicate_over_quic_and_survive_a_leader_loss() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ClusterCa::generate("test").unwrap();
    let groups = [GroupId::METADATA, GroupId(1), GroupId(2)];
    let mut transports = BTreeMap::new();
    for id in 1..=3u64 {
        let identity = ca.issue(id).unwrap();
        transports.insert(id, QuicTransport::bind(&identity, loopback()).unwrap());
    }
    // Addresses come from the membership, as in a real cluster.
    let members: BTreeMap<u64, NodeAddr> = transports
        .iter()
        .map(|(&id, t)| {
            let addr = NodeAddr {
                raft: t.local_addr().to_string(),
                ..NodeAddr::default()
            };
            (id, addr)
        })
        .collect();
    let mut nodes = BTreeMap::new();
    for (&id, transport) in &transports {
        nodes.insert(
            id,
            start_node(id, dir.path(), Arc::clone(transport), &groups).await,
        );
    }
    initialize(&nodes, &groups, &members).await;
    write_and_check_replicated(&nodes, &groups, 40, Duration::from_secs(20)).await;
    // Stop the leader of group 1 and close its sockets: the others elect a new leader over
    // their own connection, and writes go on.
    let old = leader_of(&nodes, GroupId(1)).await;
    let old_id = old.metrics().borrow().id;
    let stopped = nodes.remove(&old_id).unwrap();
    for (raft, _) in stopped.groups.values() {
        raft.shutdown().await.unwrap();
    }
    transports[&old_id].close();
    let new_leader = leader_of(&nodes, GroupId(1)).await;
    assert_ne!(new_leader.metrics().borrow().id, old_id);
    let index = write(&nodes, GroupId(1), "after=failover".to_string()).await;
    for node in nodes.values() {
        let (raft, sm) = &node.groups[&GroupId(1)];
        raft.wait(Some(Duration::from_secs(20)))
            .applied_index_at_least(Some(index), "applied after failover")
            .await
            .unwrap();
        assert_eq!(
            sm.with_core(|c| c.map.get("after").cloned()).as_deref(),
            Some("failover")
        );
    }
    for node in nodes.values() {
        for (raft, _) in node.groups.values() {
            raft.shutdown().await.unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_without_the_clusters_certificate_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ClusterCa::generate("ours").unwrap();
    let server = QuicTransport::bind(&ca.issue(1).unwrap(), loopback()).unwrap();
    let node = start_node(1, dir.path(), Arc::clone(&server), &[GroupId(1)]).await;
    node.groups[&GroupId(1)]
        .0
        .initialize(BTreeMap::from([(1u64, NodeAddr::default())]))
        .await
        .unwrap();
    node.groups[&GroupId(1)]
        .0
        .wait(Some(Duration::from_secs(10)))
        .current_leader(1, "single-node leader")
        .await
        .unwrap();
    let term_before = node.groups[&GroupId(1)].0.metrics().borrow().current_term;
    let vote = VoteRequest::new(openraft::Vote::new(term_before + 5, 9), None);

    // A node certified by another CA (that trusts ours, so only node 1's check of the client
    // certificate stands in its way): the handshake fails, nothing reaches the group.
    let foreign = ClusterCa::generate("theirs").unwrap();
    let impostor = NodeIdentity {
        ca_pem: ca.cert_pem.clone(),
        ..foreign.issue(9).unwrap()
    };
    let intruder = QuicTransport::bind(&impostor, loopback()).unwrap();
    intruder.set_peer(1, server.local_addr().to_string());
    let refused = intruder.vote(1, GroupId(1), vote.clone()).await;
    let refused = refused
        .expect_err("a foreign certificate got through")
        .to_string();
    // TLS 1.3 clients finish their side of the handshake before the server has checked their
    // certificate: the refusal arrives as the connection being closed under the RPC.
    assert!(refused.contains("node 1"), "{refused}");
    assert_eq!(
        node.groups[&GroupId(1)].0.metrics().borrow().current_term,
        term_before
    );

    // A member of the cluster that dials node 1's address believing it is node 2: the
    // certificate there is node 1's, so the client refuses it.
    let member = QuicTransport::bind(&ca.issue(3).unwrap(), loopback()).unwrap();
    member.set_peer(2, server.local_addr().to_string());
    let mistaken = member.vote(2, GroupId(1), vote.clone()).await;
    let mistaken = mistaken
        .expect_err("reached node 1 while asking for node 2")
        .to_string();
    assert!(mistaken.contains("node-2.optiprism"), "{mistaken}");

    // The same member asking for node 1 gets through (and is answered by the group).
    member.set_peer(1, server.local_addr().to_string());
    let answered = member.vote(1, GroupId(1), vote).await;
    // The group itself answered: it refuses the vote (its leader holds a lease) with its own.
    let answered = answered.expect("a cluster member was refused");
    assert!(!answered.vote_granted);
    assert_eq!(answered.vote.leader_id().voted_for(), Some(1));
    node.groups[&GroupId(1)].0.shutdown().await.unwrap();
}
