//! Acknowledged events survive a stop, a `kill -9` and a restart, exactly once.

use optiprism_testkit::{TestNode, WRITE_KEY};
use serde_json::json;

fn total(node: &TestNode) -> u64 {
    let (status, answer) = node.query(&json!({
        "kind": "trends", "date_range": {"from": "2024-02-01", "to": "2024-02-29"}, "interval": "week",
        "series": [{"event": "tick", "math": "total"}, {"event": "tick", "math": "unique_users"}],
    }));
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer["totals"]["B"].as_u64(),
        Some(10),
        "ten users: {answer}"
    );
    answer["totals"]["A"].as_u64().unwrap()
}

fn send(node: &TestNode, from: usize, to: usize) {
    let batch: Vec<_> = (from..to)
        .map(|i| json!({"type": "track", "userId": format!("u{}", i % 10), "event": "tick", "messageId": format!("m{i}"),
                        "timestamp": format!("2024-02-{:02}T10:00:00Z", 1 + i % 28)}))
        .collect();
    let (status, body) = node.post("/v1/batch", &json!({"writeKey": WRITE_KEY, "batch": batch}));
    assert_eq!(status, 200, "{body}");
}

#[test]
fn events_survive_stop_and_kill_and_are_not_doubled_by_retries() {
    let mut node = TestNode::start_with(&["--partitions", "4"]);
    send(&node, 0, 500);
    node.stop();
    node.restart();
    assert_eq!(total(&node), 500);
    // Unsealed rows live only in the Raft log until sealed: a kill -9 now must replay them.
    send(&node, 500, 900);
    node.kill9();
    node.restart();
    assert_eq!(total(&node), 900);
    // A client that never saw the acknowledgement retries: deduplicated, after replay too.
    send(&node, 400, 900);
    assert_eq!(total(&node), 900);
    node.kill9();
    node.restart();
    assert_eq!(total(&node), 900);
    // The partition count is part of the data directory.
    node.kill9();
    let out = std::process::Command::new(optiprism_testkit::prism_binary())
        .args([
            "up",
            "--partitions",
            "8",
            "--http",
            "127.0.0.1:0",
            "--flight",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(&node.data_dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cluster.partitions"), "{stderr}");
}

#[test]
fn bad_configuration_stops_start_up_with_the_key_named() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("cluster.toml");
    for (text, key) in [
        ("[node]\nhttp-listn = \"127.0.0.1:1\"\n", "http-listn"),
        ("[node]\nhttp-listen = \"localhost\"\n", "node.http-listen"),
        (
            "[cluster]\nreplication-factor = 3\n",
            "cluster.replication-factor",
        ),
        ("[ingest]\nmax-event-size = \"lots\"\n", "max-event-size"),
    ] {
        std::fs::write(&config, text).unwrap();
        let out = std::process::Command::new(optiprism_testkit::prism_binary())
            .args(["check-config", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{text}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(key), "{text}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "one-line error: {stderr}");
    }
    // The repository's commented example parses and validates.
    let example = optiprism_testkit::crate_dir().join("../cluster.toml");
    let out = std::process::Command::new(optiprism_testkit::prism_binary())
        .args(["check-config", "--config"])
        .arg(&example)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn json_logs_are_one_object_per_line_with_fields() {
    let node = TestNode::start_with(&["--log-format", "json"]);
    let log = node.log();
    let mut lines = 0;
    for line in log.lines().filter(|l| l.starts_with('{')) {
        let entry: serde_json::Value = serde_json::from_str(line).expect("a JSON log line");
        assert!(entry["level"].is_string(), "{line}");
        assert!(entry["fields"]["message"].is_string(), "{line}");
        lines += 1;
    }
    assert!(log.contains("\"hosting partition\""), "{log}");
    assert!(lines >= 2, "{log}");
}

/// The `THP_enabled` line of a process's status (Linux).
#[cfg(target_os = "linux")]
fn transparent_huge_pages(pid: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("process status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("THP_enabled:"))
        .expect("the kernel reports THP_enabled")
        .trim()
        .to_string()
}

#[test]
#[cfg(target_os = "linux")]
fn nodes_opt_out_of_transparent_huge_pages_unless_asked() {
    let node = TestNode::start();
    let pid = node.pid().unwrap().to_string();
    assert_eq!(transparent_huge_pages(&pid), "0");
    // Asked, the node keeps the system's policy, as this test process does.
    let node = TestNode::start_with(&["--huge-pages"]);
    let pid = node.pid().unwrap().to_string();
    assert_eq!(transparent_huge_pages(&pid), transparent_huge_pages("self"));
}
