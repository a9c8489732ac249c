//! `prismctl` against the embedded single node (`prism up`), across restarts.

use crate::support::prismctl;
use optiprism_testkit::{TestNode, WRITE_KEY};
use serde_json::{Value, json};

#[test]
fn a_node_started_again_on_other_ports_is_found_at_the_new_ones() {
    let mut node = TestNode::start();
    let batch: Vec<Value> = (0..3)
        .map(|i| json!({"type": "track", "event": "Opened", "userId": format!("u{i}"), "messageId": format!("m{i}")}))
        .collect();
    let (status, body) = node.post("/v1/batch", &json!({"writeKey": WRITE_KEY, "batch": batch}));
    assert_eq!(status, 200, "{body}");
    let (first_http, first_flight) = (node.http.clone(), node.flight.clone());
    // `prism up` in the test kit takes fresh ports on every start.
    node.restart();
    assert_ne!(node.flight, first_flight);
    let status = prismctl(&node.http, &["cluster", "status", "-o", "json"]);
    assert!(status.status.success(), "{status:?}");
    let status: Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(
        status["members"][0]["flight"],
        node.flight.as_str(),
        "{status}"
    );
    // Nor does any group of the node still name the old addresses.
    let text = status.to_string();
    let old_http = first_http.trim_start_matches("http://");
    assert!(
        !text.contains(&first_flight) && !text.contains(old_http),
        "{status}"
    );
    assert!(!status["groups"].as_array().unwrap().is_empty(), "{status}");
    let out = prismctl(
        &node.http,
        &[
            "query",
            "-o",
            "json",
            "--sql",
            "SELECT count(*) AS n FROM events",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows, json!([{"n": 3}]));
}
