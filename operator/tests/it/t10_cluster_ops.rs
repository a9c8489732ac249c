//! `prismctl` against a real three-node cluster: status and health as the nodes report them,
//! leader transfer and balancing while events stream in (none lost), queries, and the errors
//! and exit codes of bad requests.

use crate::support::prismctl;
use optiprism_testkit::{
    TestCluster, UnwritableChunks, WRITE_KEY, eventually, incompressible_batch,
};
use serde_json::{Value, json};
use std::process::Output;

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `cluster status -o json`, parsed.
fn status(endpoints: &str) -> Value {
    let o = prismctl(endpoints, &["-o", "json", "cluster", "status"]);
    assert!(o.status.success(), "{}", stderr(&o));
    serde_json::from_str(&stdout(&o)).expect("status is JSON")
}

fn leader_of(status: &Value, group: &str) -> Option<u64> {
    status["groups"]
        .as_array()?
        .iter()
        .find(|g| g["group"] == group)?["leader"]
        .as_u64()
}

fn leads(status: &Value) -> Vec<u64> {
    status["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["leads"].as_u64().unwrap())
        .collect()
}

fn batch(prefix: &str, n: usize) -> Value {
    let events: Vec<Value> = (0..n)
        .map(|i| {
            json!({"type": "track", "event": "op", "userId": format!("u{}", i % 37),
                   "messageId": format!("{prefix}-{i}"), "timestamp": "2024-03-01T12:00:00Z"})
        })
        .collect();
    json!({"writeKey": WRITE_KEY, "batch": events})
}

#[test]
fn operators_see_move_and_balance_leaders_of_a_live_cluster() {
    let mut cluster = TestCluster::start(3, 4);
    let endpoints = format!("{},{}", cluster.node(2).http, cluster.node(1).http);

    // Status: three ready members, five groups (metadata and four partitions) with leaders,
    // every replica applied.
    let before = status(&endpoints);
    let members = before["members"].as_array().unwrap();
    assert_eq!(members.len(), 3, "{before}");
    assert!(members.iter().all(|m| m["ready"] == true), "{before}");
    let groups = before["groups"].as_array().unwrap();
    assert_eq!(groups.len(), 5, "{before}");
    for g in groups {
        assert!(g["leader"].is_u64(), "{g}");
        assert_eq!(g["voters"], json!([1, 2, 3]), "{g}");
        assert_eq!(g["applied"].as_object().unwrap().len(), 3, "{g}");
    }
    let table = prismctl(&endpoints, &["cluster", "status"]);
    assert!(table.status.success());
    assert!(stdout(&table).contains("partition-3"), "{}", stdout(&table));
    let health = prismctl(&endpoints, &["cluster", "health"]);
    assert_eq!(health.status.code(), Some(0), "{}", stdout(&health));

    // Transfer partition 1's leadership while events stream into the cluster.
    let from = leader_of(&before, "partition-1").unwrap();
    let to = if from == 3 { 2 } else { 3 };
    let sender = cluster.node(if from == 1 { 2 } else { 1 }).http.clone();
    let writer = std::thread::spawn(move || {
        let client = reqwest_client();
        let mut acknowledged = 0;
        for b in 0..40 {
            let body = batch(&format!("t{b}"), 50);
            for _ in 0..100 {
                let r = client.post(format!("{sender}/v1/batch")).json(&body).send();
                if r.is_ok_and(|r| r.status().is_success()) {
                    acknowledged += 50;
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        acknowledged
    });
    let moved = prismctl(
        &endpoints,
        &[
            "leader",
            "transfer",
            "--group",
            "1",
            "--to",
            &to.to_string(),
        ],
    );
    assert!(
        moved.status.success(),
        "{}\n{}",
        stderr(&moved),
        cluster.logs()
    );
    assert_eq!(leader_of(&status(&endpoints), "partition-1"), Some(to));
    let acknowledged = writer.join().unwrap();
    assert_eq!(acknowledged, 2_000, "a batch was never acknowledged");

    // Every acknowledged event is there once, asked through prismctl query (Flight SQL).
    let counted = prismctl(
        &endpoints,
        &[
            "-o",
            "json",
            "query",
            "--sql",
            "SELECT count(*) AS n, count(DISTINCT uuid) AS d FROM events",
        ],
    );
    assert!(counted.status.success(), "{}", stderr(&counted));
    let rows: Value = serde_json::from_str(&stdout(&counted)).unwrap();
    assert_eq!(rows, json!([{"n": 2000, "d": 2000}]));
    // A JSON insight query through prismctl prints its table.
    let insight = prismctl(
        &endpoints,
        &[
            "query",
            r#"{"kind": "trends", "date_range": {"from": "2024-03-01", "to": "2024-03-01"}, "interval": "day", "series": [{"event": "op", "math": "total"}]}"#,
        ],
    );
    assert!(insight.status.success(), "{}", stderr(&insight));
    assert!(stdout(&insight).contains("2000"), "{}", stdout(&insight));

    // Balance: afterwards no member leads two more groups than another.
    let balanced = prismctl(&endpoints, &["partitions", "balance"]);
    assert!(
        balanced.status.success(),
        "{}\n{}",
        stderr(&balanced),
        stdout(&balanced)
    );
    let counts = leads(&status(&endpoints));
    assert!(
        counts.iter().max().unwrap() - counts.iter().min().unwrap() <= 1,
        "leaders per member after balancing: {counts:?}"
    );

    // Bad requests: one line naming the problem, exit 1 (2 for usage clap catches).
    let bad = prismctl(
        &endpoints,
        &["leader", "transfer", "--group", "nope", "--to", "2"],
    );
    assert_eq!(bad.status.code(), Some(1));
    assert!(stderr(&bad).contains("`nope`"), "{}", stderr(&bad));
    let missing = prismctl(
        &endpoints,
        &["leader", "transfer", "--group", "9", "--to", "2"],
    );
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        stderr(&missing).contains("does not exist"),
        "{}",
        stderr(&missing)
    );
    let stranger = prismctl(
        &endpoints,
        &["leader", "transfer", "--group", "0", "--to", "7"],
    );
    assert_eq!(stranger.status.code(), Some(1));
    assert!(
        stderr(&stranger).contains("not a voting replica"),
        "{}",
        stderr(&stranger)
    );
    let unauthorized = std::process::Command::new(env!("CARGO_BIN_EXE_prismctl"))
        .args([
            "--endpoints",
            &endpoints,
            "leader",
            "transfer",
            "--group",
            "0",
            "--to",
            "2",
        ])
        .env_remove("PRISM_ADMIN_TOKEN")
        .output()
        .unwrap();
    assert_eq!(unauthorized.status.code(), Some(1));
    assert!(
        stderr(&unauthorized).contains("admin token"),
        "{}",
        stderr(&unauthorized)
    );
    let usage = prismctl(&endpoints, &["leader", "transfer", "--to", "2"]);
    assert_eq!(usage.status.code(), Some(2));
    let nowhere = prismctl("127.0.0.1:1", &["cluster", "status"]);
    assert_eq!(nowhere.status.code(), Some(1));
    assert!(
        stderr(&nowhere).contains("no endpoint answered"),
        "{}",
        stderr(&nowhere)
    );

    // A dead member makes the cluster unhealthy: exit 3, naming it.
    cluster.node_mut(3).kill9();
    let health = prismctl(&endpoints, &["cluster", "health"]);
    assert_eq!(health.status.code(), Some(3), "{}", stdout(&health));
    assert!(
        stdout(&health).contains("node 3 is unreachable"),
        "{}",
        stdout(&health)
    );
}

fn reqwest_client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(std::time::Duration::from_secs(30))
        .build()
        .unwrap()
}

#[test]
fn operators_see_which_member_a_failed_disk_stopped_and_why() {
    let mut cluster = TestCluster::start(3, 4);
    // Member 3's files may not grow past 2 MiB: its Raft log's next write past that fails.
    cluster.node_mut(3).set_file_size_limit(Some(4096));
    cluster.node_mut(3).restart();
    let mut b = 0;
    while cluster.node(3).get("/livez").0 == 200 {
        assert!(b < 400, "member 3 never failed:\n{}", cluster.logs());
        let body = json!({"writeKey": WRITE_KEY, "batch": incompressible_batch("o", b, 500).1});
        // A 5xx while member 3's groups stop and the others elect is retried by the next
        // round with the next batch; only the failure matters here.
        let _ = cluster.node(1).post("/v1/batch", &body);
        b += 1;
    }
    let endpoints = cluster.node(1).http.clone();
    let member = |status: &Value, id: u64| -> Value {
        status["members"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["id"] == id)
            .cloned()
            .unwrap()
    };
    let json_status = status(&endpoints);
    let failed = member(&json_status, 3)["failed"].clone();
    assert!(
        failed.as_array().is_some_and(|f| !f.is_empty())
            && failed.to_string().contains("File too large"),
        "{json_status}"
    );
    assert_eq!(
        member(&json_status, 1)["failed"],
        json!([]),
        "{json_status}"
    );
    let table = prismctl(&endpoints, &["cluster", "status"]);
    assert!(
        stdout(&table).contains("failed (restart it)"),
        "{}",
        stdout(&table)
    );
    health_names_member_3_failed(&endpoints, "File too large");
}

/// `cluster health` exits 3 naming member 3 as failed, with `reason`.
fn health_names_member_3_failed(endpoints: &str, reason: &str) {
    health_names_member_3(
        endpoints,
        "node 3 failed and needs a restart once the cause is fixed",
        reason,
    );
}

fn health_names_member_3(endpoints: &str, problem: &str, reason: &str) {
    let health = prismctl(endpoints, &["cluster", "health"]);
    assert_eq!(health.status.code(), Some(3), "{}", stdout(&health));
    assert!(
        stdout(&health).contains(problem) && stdout(&health).contains(reason),
        "{}",
        stdout(&health)
    );
}

#[test]
fn operators_see_which_member_cannot_seal_and_why() {
    let cluster = TestCluster::start(3, 4);
    // Member 3's chunks directory becomes a plain file: its seals fail, its Raft log works.
    let chunks = UnwritableChunks::make(&cluster.node(3).data_dir);
    let mut b = 0;
    while cluster.node(3).get("/livez").0 == 200 {
        assert!(
            b < 600,
            "member 3 never failed to seal:\n{}",
            cluster.logs()
        );
        let body = json!({"writeKey": WRITE_KEY, "batch": incompressible_batch("c", b, 200).1});
        let (status, answer) = cluster.node(1).post("/v1/batch", &body);
        assert_eq!(status, 200, "{answer}");
        b += 1;
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let endpoints = cluster.node(1).http.clone();
    health_names_member_3(
        &endpoints,
        "node 3 cannot seal chunks and retries on its own",
        "sealing failed",
    );
    let status = prismctl(&endpoints, &["cluster", "status"]);
    assert!(
        stdout(&status).contains("cannot seal (retrying)"),
        "{}",
        stdout(&status)
    );
    // With the directory back, member 3's retries seal and the cluster is healthy again.
    chunks.restore();
    eventually(
        || stdout(&prismctl(&endpoints, &["cluster", "health"])),
        || prismctl(&endpoints, &["cluster", "health"]).status.code() == Some(0),
    );
}
