//! Membership with real processes and `prismctl`: a fourth node joins and takes replicas, every
//! member (each now holding only some partitions) answers as before, a node is decommissioned
//! and a drained node turns unready, with the refusals an operator should see.

use crate::support::prismctl;
use optiprism_testkit::{TestCluster, TestNode, WRITE_KEY};
use serde_json::{Value, json};
use std::process::Output;

fn check(o: &Output) -> String {
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "prismctl failed: {}\n{out}",
        String::from_utf8_lossy(&o.stderr)
    );
    out
}

/// `n` events from 80 users over two days, ids prefixed by `prefix`.
fn send(node: &TestNode, prefix: &str, n: usize) {
    for chunk in (0..n).collect::<Vec<_>>().chunks(100) {
        let batch: Vec<Value> = chunk
            .iter()
            .map(|i| {
                let event = ["view", "buy"][i % 2];
                json!({"type": "track", "event": event,
                       "userId": format!("user-{}", (i * 31) % 80),
                       "messageId": format!("{prefix}-{i}"),
                       "timestamp": format!("2024-05-{:02}T{:02}:00:00Z", 1 + i % 2, i % 24),
                       "properties": {"amount": (i % 9) as f64}})
            })
            .collect();
        let body = json!({"writeKey": WRITE_KEY, "batch": batch});
        for attempt in 0.. {
            let (status, answer) = node.post("/v1/batch", &body);
            if status == 200 {
                break;
            }
            assert!(status == 503 && attempt < 100, "{status}: {answer}");
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }
}

fn query() -> Value {
    json!({"kind": "trends", "date_range": {"from": "2024-05-01", "to": "2024-05-02"},
           "interval": "day", "series": [{"event": "view", "math": "total"}, {"math": "unique_users"}],
           "breakdown": {"property": "amount"}})
}

/// The answer of `node`, retried while it is briefly unavailable (a leader moving).
fn answer(node: &TestNode) -> Value {
    for _ in 0..150 {
        let (status, answer) = node.query(&query());
        if status == 200 {
            return answer;
        }
        assert_eq!(status, 503, "{answer}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    panic!("no answer within 30 s");
}

fn stored(node: &TestNode) -> i64 {
    use arrow::array::AsArray;
    let batches = node
        .sql("SELECT count(DISTINCT uuid) AS n FROM events")
        .expect("SQL");
    batches[0]
        .column(0)
        .as_primitive::<arrow::datatypes::Int64Type>()
        .value(0)
}

fn status(endpoints: &str) -> Value {
    serde_json::from_str(&check(&prismctl(
        endpoints,
        &["-o", "json", "cluster", "status"],
    )))
    .unwrap()
}

/// Partitions whose replicas include `id`.
fn held_by(status: &Value, id: u64) -> usize {
    status["groups"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|g| g["group"] != "metadata")
        .filter(|g| g["voters"].as_array().unwrap().contains(&json!(id)))
        .count()
}

#[test]
fn a_fourth_node_takes_replicas_and_a_decommissioned_node_gives_them_away() {
    let mut cluster = TestCluster::start(3, 4);
    send(cluster.node(1), "a", 1_200);
    let expected = answer(cluster.node(1));

    // Node 4 starts outside the members, waits, and joins through prismctl.
    let [raft, http, flight] = cluster.start_joining(4);
    let endpoints = format!("{},{}", cluster.node(2).http, cluster.node(3).http);
    check(&prismctl(
        &endpoints,
        &[
            "node", "add", "--id", "4", "--raft", &raft, "--http", &http, "--flight", &flight,
        ],
    ));
    cluster.node_mut(4).wait_ready();
    let again = prismctl(
        &endpoints,
        &[
            "node", "add", "--id", "4", "--raft", &raft, "--http", &http, "--flight", &flight,
        ],
    );
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("already a member"));

    // Balancing moves replicas onto it: 4 partitions x 3 replicas, 3 per member.
    check(&prismctl(
        &endpoints,
        &["partitions", "balance", "--replicas"],
    ));
    let after = status(&endpoints);
    for id in 1..=4 {
        assert_eq!(held_by(&after, id), 3, "node {id} in {after}");
    }
    // Each member holds only some partitions now, and still answers for all of them, in
    // order: events sent to node 4 reach the partitions it does not hold, too.
    for id in 1..=4 {
        assert_eq!(answer(cluster.node(id)), expected, "node {id}");
    }
    send(cluster.node(4), "b", 600);
    let grown = answer(cluster.node(2));
    assert_ne!(grown, expected);
    for id in [1, 3, 4] {
        assert_eq!(answer(cluster.node(id)), grown, "node {id}");
    }
    assert_eq!(stored(cluster.node(4)), 1_800);

    // A node holding replicas is not removed outright.
    let refused = prismctl(&endpoints, &["node", "remove", "--id", "2"]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("still holds replicas"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );

    // Decommission node 1: its replicas move to the others, then it leaves the members.
    check(&prismctl(
        &endpoints,
        &["node", "decommission", "--id", "1"],
    ));
    let endpoints = format!("{},{}", cluster.node(3).http, cluster.node(4).http);
    let members = |s: &Value| -> Vec<u64> {
        s["members"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_u64().unwrap())
            .collect()
    };
    // The member asked may apply the last membership change a moment after its leader.
    let mut after = status(&endpoints);
    for _ in 0..50 {
        if members(&after) == [2, 3, 4] {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        after = status(&endpoints);
    }
    assert_eq!(members(&after), vec![2, 3, 4], "{after}");
    assert_eq!(held_by(&after, 1), 0, "{after}");
    for id in 2..=4 {
        assert_eq!(held_by(&after, id), 4, "node {id} in {after}");
        assert_eq!(
            answer(cluster.node(id)),
            grown,
            "node {id} after decommission"
        );
    }
    assert_eq!(stored(cluster.node(3)), 1_800);
    // Three members left with replication factor 3: removing another is refused.
    let refused = prismctl(&endpoints, &["node", "decommission", "--id", "2"]);
    assert_eq!(refused.status.code(), Some(1));

    // Draining node 3 hands its leaderships over and turns it unready; undoing it restores.
    check(&prismctl(&endpoints, &["node", "drain", "--id", "3"]));
    assert_eq!(cluster.node(3).get("/readyz").0, 503);
    let drained = status(&endpoints);
    let leads_3 = drained["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == 3)
        .unwrap()["leads"]
        .clone();
    assert_eq!(leads_3, json!(0), "{drained}");
    check(&prismctl(
        &endpoints,
        &["node", "drain", "--id", "3", "--undo"],
    ));
    assert_eq!(cluster.node(3).get("/readyz").0, 200);
    assert_eq!(answer(cluster.node(3)), grown);
}
