//! `prismctl gen` against a real node: what it reports matches what was stored, and the latency
//! log has one line per batch.

use optiprism_testkit::{TestNode, WRITE_KEY};
use serde_json::{Value, json};
use std::process::{Command, Output};

fn gen_cmd(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_prismctl"))
        .arg("gen")
        .args(args)
        .output()
        .expect("run prismctl gen")
}

/// How many events `node` stores, by a trends query over all time.
fn stored_events(node: &TestNode) -> u64 {
    let (status, answer) = node.query(&json!({
        "kind": "trends", "date_range": {"from": "2020-01-01", "to": "2030-12-31"}, "interval": "month",
        "series": [{"math": "total"}],
    }));
    assert_eq!(status, 200, "{answer}");
    answer["totals"]["A"]
        .as_u64()
        .unwrap_or_else(|| panic!("no total in {answer}"))
}

#[test]
fn gen_sends_every_event_and_logs_each_batch_latency() {
    let node = TestNode::start();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("latency.csv");
    let out = gen_cmd(&[
        "--events",
        "2500",
        "--seed",
        "3",
        "--target",
        &node.http,
        "--write-key",
        WRITE_KEY,
        "--batch-size",
        "400",
        "--concurrency",
        "3",
        "--rate",
        "20000",
        "--json",
        "--latency-log",
        log.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap()
            .as_bytes(),
    )
    .unwrap();
    assert_eq!(report["events"], 2500, "{report}");
    assert!(report["latency_ms_p99"].as_f64().unwrap() > 0.0, "{report}");

    // 2,500 events in batches of 400: 7 batches, in the order they were sent.
    let text = std::fs::read_to_string(&log).unwrap();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("sent_unix_ms,latency_ms"));
    let rows: Vec<(f64, f64)> = lines
        .map(|l| {
            let (sent, latency) = l.split_once(',').unwrap();
            (sent.parse().unwrap(), latency.parse().unwrap())
        })
        .collect();
    assert_eq!(rows.len(), 7, "{text}");
    assert!(rows.windows(2).all(|w| w[0].0 <= w[1].0), "{text}");
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as f64;
    assert!(
        rows.iter()
            .all(|&(sent, latency)| latency > 0.0 && sent < now_ms && sent > now_ms - 600_000.0),
        "{text}"
    );

    assert_eq!(stored_events(&node), 2500);
}

#[test]
fn gen_spreads_batches_over_several_targets_in_turn() {
    let (first, second) = (TestNode::start(), TestNode::start());
    let targets = format!("{},{}", first.http, second.http);
    let out = gen_cmd(&[
        "--events",
        "2500",
        "--seed",
        "5",
        "--target",
        &targets,
        "--write-key",
        WRITE_KEY,
        "--batch-size",
        "400",
        "--concurrency",
        "2",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Seven batches of 400 (the last of 100), in turn: 0, 2, 4 and 6 to the first node.
    assert_eq!(stored_events(&first), 1300);
    assert_eq!(stored_events(&second), 1200);
}

#[test]
fn gen_renders_ahead_only_its_budget_and_sends_the_rest_as_it_renders() {
    let (first, second) = (TestNode::start(), TestNode::start());
    let targets = format!("{},{}", first.http, second.http);
    // No budget: the queue holds two bodies per sender, 4 of the 30, and the other 26 are
    // rendered while the first ones are sent.
    let out = gen_cmd(&[
        "--events",
        "2950",
        "--seed",
        "6",
        "--target",
        &targets,
        "--write-key",
        WRITE_KEY,
        "--batch-size",
        "100",
        "--concurrency",
        "2",
        "--render-ahead-mb",
        "0",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Batches keep their numbers when rendered late: the even ones to the first node, and the
    // last (29, of 50 events) to the second.
    assert_eq!(stored_events(&first), 1500);
    assert_eq!(stored_events(&second), 1450);
}

#[test]
fn gen_refuses_bad_flags_with_a_message() {
    let zero_rate = gen_cmd(&[
        "--events",
        "10",
        "--target",
        "http://127.0.0.1:9",
        "--write-key",
        WRITE_KEY,
        "--rate",
        "0",
    ]);
    assert!(!zero_rate.status.success());
    assert!(
        String::from_utf8_lossy(&zero_rate.stderr).contains("--rate"),
        "{}",
        String::from_utf8_lossy(&zero_rate.stderr)
    );
    let empty_target = gen_cmd(&[
        "--events",
        "10",
        "--target",
        "http://127.0.0.1:9,",
        "--write-key",
        WRITE_KEY,
    ]);
    assert!(!empty_target.status.success());
    assert!(
        String::from_utf8_lossy(&empty_target.stderr).contains("empty address"),
        "{}",
        String::from_utf8_lossy(&empty_target.stderr)
    );
    // A latency log only means something when sending.
    let dir = tempfile::tempdir().unwrap();
    let (log, out) = (dir.path().join("x.csv"), dir.path().join("x.arrow"));
    let no_target = gen_cmd(&[
        "--events",
        "10",
        "--latency-log",
        log.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!no_target.status.success());
    assert!(
        String::from_utf8_lossy(&no_target.stderr).contains("--latency-log"),
        "{}",
        String::from_utf8_lossy(&no_target.stderr)
    );
    assert!(!out.exists() && !log.exists());
}

#[test]
fn a_refused_batch_fails_gen_and_the_latency_log_is_still_written() {
    let node = TestNode::start();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("latency.csv");
    let out = gen_cmd(&[
        "--events",
        "500",
        "--target",
        &node.http,
        "--write-key",
        "wk_not_the_key_0000",
        "--batch-size",
        "100",
        "--latency-log",
        log.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("401"), "{stderr}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        text.lines().next(),
        Some("sent_unix_ms,latency_ms"),
        "{text}"
    );
}
