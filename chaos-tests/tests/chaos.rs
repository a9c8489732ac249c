//! Chaos scenarios with real processes. `CHAOS_ITERATIONS` (default 3) sets how many crash
//! cycles of one node run, `CHAOS_LEADER_KILLS` (default 20) how many leaders of a three-node
//! cluster are killed in a row; CI runs the defaults on every change, nightly runs many. A
//! failure prints the seed to reproduce with `CHAOS_SEED=<seed>`.

use optiprism_chaos_tests::{History, check_exactly_once, stored_ids};
use optiprism_testkit::{TestCluster, TestNode, WRITE_KEY};
use serde_json::json;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// When each acknowledged batch was sent and when its acknowledgement arrived.
type AckTimes = Arc<Mutex<Vec<(Instant, Instant)>>>;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn batch_body(ids: &[String]) -> Vec<u8> {
    let batch: Vec<_> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            json!({"type": "track", "userId": format!("user-{}", i % 97), "event": "chaos", "messageId": id,
                   "timestamp": "2024-03-01T12:00:00Z", "properties": {"n": i}})
        })
        .collect();
    serde_json::to_vec(&json!({"writeKey": WRITE_KEY, "batch": batch})).unwrap()
}

/// Sends batches from `clients` threads until `stop`; records what was acknowledged.
fn sustained_ingestion(
    http: String,
    clients: usize,
    seed: u64,
    round: u64,
    stop: Arc<AtomicBool>,
    history: Arc<Mutex<History>>,
    ack_times: AckTimes,
) -> Vec<std::thread::JoinHandle<()>> {
    (0..clients)
        .map(|c| {
            let (http, stop, history, ack_times) = (
                http.clone(),
                Arc::clone(&stop),
                Arc::clone(&history),
                Arc::clone(&ack_times),
            );
            std::thread::spawn(move || {
                let client = reqwest::blocking::Client::builder()
                    .timeout(Duration::from_secs(10))
                    .build()
                    .unwrap();
                let mut n = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    n += 1;
                    let size = 1 + ((seed ^ n.wrapping_mul(2_654_435_761)) % 200) as usize;
                    let ids: Vec<String> = (0..size)
                        .map(|i| format!("s{seed}-r{round}-c{c}-b{n}-e{i}"))
                        .collect();
                    let sent = Instant::now();
                    match client
                        .post(format!("{http}/v1/batch"))
                        .body(batch_body(&ids))
                        .send()
                    {
                        Ok(r) if r.status().is_success() => {
                            ack_times.lock().unwrap().push((sent, Instant::now()));
                            history.lock().unwrap().acknowledged.extend(ids)
                        }
                        _ => {
                            history.lock().unwrap().unacknowledged.push(ids);
                            std::thread::sleep(Duration::from_millis(20));
                        }
                    }
                }
            })
        })
        .collect()
}

#[test]
fn kill_9_during_sustained_ingestion_loses_and_doubles_nothing() {
    let seed = env_u64("CHAOS_SEED", 0x5eed);
    let iterations = env_u64("CHAOS_ITERATIONS", 3);
    let mut node = TestNode::start_with(&["--partitions", "4"]);
    let history = Arc::new(Mutex::new(History::default()));
    for round in 0..iterations {
        let stop = Arc::new(AtomicBool::new(false));
        let clients = sustained_ingestion(
            node.http.clone(),
            4,
            seed,
            round,
            Arc::clone(&stop),
            Arc::clone(&history),
            AckTimes::default(),
        );
        // Let ingestion run, then crash mid-stream at a seed-derived moment.
        std::thread::sleep(Duration::from_millis(
            800 + (seed.wrapping_mul(round + 1) % 700),
        ));
        node.kill9();
        stop.store(true, Ordering::SeqCst);
        for c in clients {
            c.join().unwrap();
        }
        node.restart();
        let stored = stored_ids(&node).unwrap();
        if let Err(e) = check_exactly_once(&history.lock().unwrap(), &stored) {
            panic!(
                "after crash {round}: {e}\nreproduce: CHAOS_SEED={seed} CHAOS_ITERATIONS={iterations} cargo test -p optiprism-chaos-tests"
            );
        }
    }
    // Clients retry what was never acknowledged; afterwards those events are there once, too.
    let pending = std::mem::take(&mut history.lock().unwrap().unacknowledged);
    let client = reqwest::blocking::Client::new();
    for ids in pending {
        let response = client
            .post(format!("{}/v1/batch", node.http))
            .body(batch_body(&ids))
            .send()
            .unwrap();
        assert!(
            response.status().is_success(),
            "retry failed: {}",
            response.text().unwrap_or_default()
        );
        history.lock().unwrap().acknowledged.extend(ids);
    }
    let stored = stored_ids(&node).unwrap();
    let history = history.lock().unwrap();
    assert!(
        history.acknowledged.len() > 100,
        "the clients got too few acknowledgements to mean anything"
    );
    if let Err(e) = check_exactly_once(&history, &stored) {
        panic!(
            "after retries: {e}\nreproduce: CHAOS_SEED={seed} CHAOS_ITERATIONS={iterations} cargo test -p optiprism-chaos-tests"
        );
    }
    assert_eq!(
        stored.len(),
        history.acknowledged.len(),
        "stored events that no client sent"
    );
}

/// Counts of stored message ids as `node` sees them, retrying while a leader change makes the
/// node answer `Unavailable`.
fn stored_ids_when_available(node: &TestNode) -> HashMap<String, u64> {
    let mut attempts = 0;
    loop {
        match stored_ids(node) {
            Ok(stored) => return stored,
            Err(e) if format!("{e:#}").contains("Unavailable") && attempts < 300 => {
                attempts += 1;
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("reading stored ids: {e:#}"),
        }
    }
}

/// Kills the member leading the most partitions with `kill -9` while clients stream batches to
/// another member, restarts it, and repeats. Every acknowledged event must be stored exactly
/// once at the end. Prints how long ingestion stalled after each kill (from the kill to the
/// first acknowledgement of a batch sent after it), for `docs/benchmarks.md`. With
/// `CHAOS_DUMP=<dir>`, every member's log so far is written to `<dir>/round-<n>.log` after each
/// round, to see how an election went.
#[test]
fn leader_kills_in_a_row_during_ingestion_lose_and_double_nothing() {
    let seed = env_u64("CHAOS_SEED", 0x5eed);
    let kills = env_u64("CHAOS_LEADER_KILLS", 20);
    let mut cluster = TestCluster::start(3, 4);
    let history = Arc::new(Mutex::new(History::default()));
    let mut stalls = Vec::new();
    for round in 0..kills {
        let victim = cluster.busiest_leader();
        // Send through a member that survives, a different one from round to round.
        let sender = [1, 2, 3]
            .into_iter()
            .filter(|&id| id != victim)
            .nth((round % 2) as usize)
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let ack_times = AckTimes::default();
        let clients = sustained_ingestion(
            cluster.node(sender).http.clone(),
            3,
            seed,
            round,
            Arc::clone(&stop),
            Arc::clone(&history),
            Arc::clone(&ack_times),
        );
        std::thread::sleep(Duration::from_millis(
            500 + (seed.wrapping_mul(round + 1) % 500),
        ));
        let killed_at = Instant::now();
        cluster.node_mut(victim).kill9();
        // Ingestion resumes once every partition the victim led has a new leader.
        let resumed = |acks: &[(Instant, Instant)]| {
            acks.iter()
                .filter(|(sent, _)| *sent > killed_at)
                .map(|(_, acked)| *acked)
                .min()
        };
        let resumed_at = loop {
            if let Some(at) = resumed(&ack_times.lock().unwrap()) {
                break at;
            }
            assert!(
                killed_at.elapsed() < Duration::from_secs(120),
                "round {round}: ingestion did not resume within two minutes of killing node {victim}\n{}",
                cluster.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::SeqCst);
        for c in clients {
            c.join().unwrap();
        }
        let stall = resumed_at - killed_at;
        println!(
            "round {round}: killed node {victim} (sending to node {sender}); ingestion resumed after {} ms",
            stall.as_millis()
        );
        stalls.push(stall);
        if let Ok(dir) = std::env::var("CHAOS_DUMP") {
            std::fs::write(format!("{dir}/round-{round}.log"), cluster.logs()).unwrap();
        }
        cluster.node_mut(victim).restart();
    }
    // What no client got acknowledged is retried until acknowledged, as SDKs do.
    let pending = std::mem::take(&mut history.lock().unwrap().unacknowledged);
    let client = reqwest::blocking::Client::new();
    for ids in pending {
        for attempt in 0.. {
            let response = client
                .post(format!("{}/v1/batch", cluster.node(1).http))
                .body(batch_body(&ids))
                .send();
            if response.is_ok_and(|r| r.status().is_success()) {
                break;
            }
            assert!(attempt < 300, "a retried batch was never acknowledged");
            std::thread::sleep(Duration::from_millis(200));
        }
        history.lock().unwrap().acknowledged.extend(ids);
    }
    let history = history.lock().unwrap();
    assert!(
        history.acknowledged.len() > 100 * kills as usize,
        "the clients got too few acknowledgements to mean anything"
    );
    for id in 1..=3 {
        let stored = stored_ids_when_available(cluster.node(id));
        if let Err(e) = check_exactly_once(&history, &stored) {
            panic!(
                "node {id} after {kills} leader kills: {e}\nreproduce: CHAOS_SEED={seed} CHAOS_LEADER_KILLS={kills} cargo test -p optiprism-chaos-tests"
            );
        }
        assert_eq!(
            stored.len(),
            history.acknowledged.len(),
            "node {id} stores events that no client sent"
        );
    }
    stalls.sort();
    println!(
        "failover over {kills} leader kills (election timeout 1000-2000 ms): median {} ms, max {} ms, {} acknowledged events",
        stalls[stalls.len() / 2].as_millis(),
        stalls.last().unwrap().as_millis(),
        history.acknowledged.len()
    );
}
