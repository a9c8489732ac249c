//! Acknowledged events survive a stop, a `kill -9`, a disk that refuses writes and a restart,
//! exactly once.

use crate::support::uuid_counts;
use optiprism_testkit::{TestNode, UnwritableChunks, WRITE_KEY, eventually, incompressible_batch};
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

#[test]
fn a_disk_that_refuses_writes_fails_requests_clearly_and_a_restart_keeps_every_acknowledged_event()
{
    // No file may grow past 2 MiB: the Raft log's segment outgrows that after some thousands of
    // these events, and its next write fails with EFBIG, as on a full or failing disk.
    let mut node = TestNode::start_with_file_size_limit(&["--partitions", "4"], 4096);
    let batch = |b: usize| {
        let (ids, events) = incompressible_batch("f", b, 500);
        (ids, json!({"writeKey": WRITE_KEY, "batch": events}))
    };
    let mut acknowledged = Vec::new();
    let mut refusal = None;
    for b in 0..400 {
        let (ids, body) = batch(b);
        let (status, answer) = node.post("/v1/batch", &body);
        if status == 200 {
            acknowledged.extend(ids);
        } else {
            refusal = Some((status, answer));
            break;
        }
    }
    let (status, answer) = refusal.expect("a write past the limit fails");
    assert_eq!(status, 500, "{answer}");
    let message = answer["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("File too large"), "{answer}");
    assert!(
        !acknowledged.is_empty(),
        "the limit left room for some events"
    );
    // The node stays up, answers every later request with the same error instead of hanging,
    // and tells load balancers and supervisors why it is neither ready nor alive.
    let (status, answer) = node.post("/v1/batch", &batch(1_000).1);
    assert_eq!(status, 500, "{answer}");
    for path in ["/readyz", "/livez"] {
        let (status, body) = node.get(path);
        assert_eq!(status, 503, "{path}: {body}");
        assert!(
            body.contains("take no writes until the node restarts")
                && body.contains("File too large"),
            "{path}: {body}"
        );
    }
    let metrics = node.get("/metrics").1;
    assert!(
        metrics.lines().any(
            |l| l.starts_with("optiprism_consensus_failed{group=\"partition-") && l.ends_with(" 1")
        ),
        "{metrics}"
    );
    node.stop();
    // With the disk fixed, a restart keeps every acknowledged event, each once.
    node.set_file_size_limit(None);
    node.restart();
    let stored: std::collections::HashMap<String, i64> = uuid_counts(&node).into_iter().collect();
    for id in &acknowledged {
        assert_eq!(stored.get(id), Some(&1), "acknowledged {id}");
    }
    assert!(stored.values().all(|&n| n == 1), "an event stored twice");
    let (status, answer) = node.post("/v1/batch", &batch(2_000).1);
    assert_eq!(status, 200, "{answer}");
}

/// Sends batch `b` of 200 incompressible events; checks it is acknowledged; returns its ids.
fn send_acknowledged(node: &TestNode, b: usize) -> Vec<String> {
    let (ids, events) = incompressible_batch("s", b, 200);
    let body = json!({"writeKey": WRITE_KEY, "batch": events});
    let (status, answer) = node.post("/v1/batch", &body);
    assert_eq!(status, 200, "{answer}");
    ids
}

#[test]
fn a_partition_that_cannot_write_its_chunks_keeps_taking_events_says_so_retries_and_loses_none() {
    let mut node = TestNode::start_with(&["--partitions", "2"]);
    // The chunk files' directory becomes a plain file before anything is sealed: every seal's
    // write fails, while the Raft log (elsewhere in the data directory) works.
    let chunks = UnwritableChunks::make(&node.data_dir);
    let mut acknowledged = Vec::new();
    let mut b = 0;
    // Events are still acknowledged (durable in the Raft log) once a seal has failed, and
    // `/livez` says what failed.
    while node.get("/livez").0 == 200 {
        assert!(b < 600, "no seal failed:\n{}", node.log());
        acknowledged.extend(send_acknowledged(&node, b));
        b += 1;
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let (_, live) = node.get("/livez");
    assert!(
        live.contains("sealing failed") && live.contains("retried") && live.contains("partition-"),
        "{live}"
    );
    assert_eq!(node.get("/readyz").0, 200, "it still takes events");
    acknowledged.extend(send_acknowledged(&node, b));
    b += 1;
    let seal_failed = |node: &TestNode, value: &str| {
        node.get("/metrics").1.lines().any(|l| {
            l.starts_with("optiprism_storage_seal_failed{group=\"partition-")
                && l.ends_with(&format!(" {value}"))
        })
    };
    assert!(seal_failed(&node, "1"), "{}", node.get("/metrics").1);
    // With the directory back, the sealer's retry writes the held rows without a restart.
    chunks.restore();
    eventually(
        || format!("{:?}\n{}", node.get("/livez"), node.log()),
        || node.get("/livez").0 == 200,
    );
    assert!(!seal_failed(&node, "1"), "{}", node.get("/metrics").1);
    // Files in the partitions' directories (the directories themselves were put back empty).
    let written: usize = std::fs::read_dir(chunks.path())
        .expect("list chunks")
        .map(|d| {
            std::fs::read_dir(d.expect("list chunks").path())
                .expect("list a partition's chunks")
                .count()
        })
        .sum();
    assert!(written > 0, "the retried seals wrote no chunk files");
    acknowledged.extend(send_acknowledged(&node, b));
    let stored: std::collections::HashMap<String, i64> = uuid_counts(&node).into_iter().collect();
    for id in &acknowledged {
        assert_eq!(
            stored.get(id),
            Some(&1),
            "acknowledged {id} before the restart"
        );
    }
    // What the retries sealed is what a restart reads back, with the rows after them.
    node.restart();
    let stored: std::collections::HashMap<String, i64> = uuid_counts(&node).into_iter().collect();
    for id in &acknowledged {
        assert_eq!(stored.get(id), Some(&1), "acknowledged {id}");
    }
    assert_eq!(node.get("/livez").0, 200, "{}", node.get("/livez").1);
}
