//! Chaos scenarios with real processes. `CHAOS_ITERATIONS` (default 3) sets how many crash
//! cycles run; CI runs the default on every change, nightly runs many. A failure prints the
//! seed to reproduce with `CHAOS_SEED=<seed>`.

use optiprism_chaos_tests::{History, check_exactly_once, stored_ids};
use optiprism_testkit::{TestNode, WRITE_KEY};
use serde_json::json;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

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
) -> Vec<std::thread::JoinHandle<()>> {
    (0..clients)
        .map(|c| {
            let (http, stop, history) = (http.clone(), Arc::clone(&stop), Arc::clone(&history));
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
                    match client
                        .post(format!("{http}/v1/batch"))
                        .body(batch_body(&ids))
                        .send()
                    {
                        Ok(r) if r.status().is_success() => {
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
