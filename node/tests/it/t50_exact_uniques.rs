//! Unique counts merged across partitions are exact: random event logs with identity merges,
//! answered by a real in-process node with 8 partitions, against a naive reference.

use optiprism_node::config::NodeConfig;
use optiprism_node::ingest::{Ingestor, Parsed};
use optiprism_node::server;
use optiprism_types::event::{Event, PropValue};
use optiprism_types::query::{Query, parse_query};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

#[derive(Debug, Clone)]
struct Log {
    /// (person index, day, browser index or none, second round?)
    events: Vec<(usize, u8, Option<u8>, bool)>,
    /// anonymous person index -> user person index.
    merges: BTreeMap<usize, usize>,
}

const USERS: usize = 12;
const ANONS: usize = 12;
const BROWSERS: [&str; 4] = ["Chrome", "Safari", "Firefox", "Edge"];

fn logs() -> impl Strategy<Value = Log> {
    (
        proptest::collection::vec(
            (
                0..USERS + ANONS,
                0u8..5,
                proptest::option::weighted(0.8, 0u8..4),
                any::<bool>(),
            ),
            1..120,
        ),
        proptest::collection::btree_map(USERS..USERS + ANONS, 0..USERS, 0..ANONS),
    )
        .prop_map(|(events, merges)| Log { events, merges })
}

fn id(i: usize) -> String {
    if i < USERS {
        format!("user-{i}")
    } else {
        format!("anon-{i}")
    }
}

fn event(i: usize, day: u8, browser: Option<u8>, n: usize) -> Event {
    Event {
        message_id: format!("m{n}"),
        distinct_id: id(i),
        event: "view".into(),
        timestamp_ms: 1_717_200_000_000 + i64::from(day) * 86_400_000 + (n as i64 % 1000) * 1000,
        properties: browser
            .map(|b| {
                vec![(
                    "browser".to_string(),
                    PropValue::Str(BROWSERS[b as usize].into()),
                )]
            })
            .unwrap_or_default(),
        person_set: Vec::new(),
        person_set_once: Vec::new(),
    }
}

/// The reference: per day and per browser value, distinct canonical persons, by brute force.
fn reference(log: &Log, limit: usize) -> (Vec<f64>, f64, Vec<(String, f64)>) {
    let canonical = |i: usize| log.merges.get(&i).copied().unwrap_or(i);
    let mut per_day: Vec<BTreeSet<usize>> = vec![BTreeSet::new(); 5];
    let mut all = BTreeSet::new();
    let mut per_value: BTreeMap<String, BTreeSet<usize>> = BTreeMap::new();
    for &(i, day, browser, _) in &log.events {
        let p = canonical(i);
        per_day[day as usize].insert(p);
        all.insert(p);
        let label = browser
            .map(|b| BROWSERS[b as usize].to_string())
            .unwrap_or_else(|| "(none)".into());
        per_value.entry(label).or_default().insert(p);
    }
    let mut ranked: Vec<(String, usize)> = per_value
        .iter()
        .map(|(v, s)| (v.clone(), s.len()))
        .collect();
    ranked.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let top: Vec<String> = ranked.iter().take(limit).map(|(v, _)| v.clone()).collect();
    let mut breakdown: Vec<(String, f64)> = top
        .iter()
        .map(|v| (v.clone(), per_value[v].len() as f64))
        .collect();
    if ranked.len() > limit {
        let other: BTreeSet<usize> = per_value
            .iter()
            .filter(|(v, _)| !top.contains(v))
            .flat_map(|(_, s)| s.iter().copied())
            .collect();
        breakdown.push(("(other)".into(), other.len() as f64));
    }
    (
        per_day.iter().map(|s| s.len() as f64).collect(),
        all.len() as f64,
        breakdown,
    )
}

/// The reference for total math: event counts.
fn reference_counts(log: &Log, limit: usize) -> (Vec<f64>, f64, Vec<(String, f64)>) {
    let mut per_day = vec![0.0; 5];
    let mut per_value: BTreeMap<String, f64> = BTreeMap::new();
    for &(_, day, browser, _) in &log.events {
        per_day[day as usize] += 1.0;
        let label = browser
            .map(|b| BROWSERS[b as usize].to_string())
            .unwrap_or_else(|| "(none)".into());
        *per_value.entry(label).or_default() += 1.0;
    }
    let mut ranked: Vec<(String, f64)> = per_value.into_iter().collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let mut breakdown: Vec<(String, f64)> = ranked.iter().take(limit).cloned().collect();
    if ranked.len() > limit {
        breakdown.push((
            "(other)".into(),
            ranked[limit..].iter().map(|(_, n)| n).sum(),
        ));
    }
    (per_day.clone(), per_day.iter().sum(), breakdown)
}

#[test]
fn unique_users_across_partitions_match_a_naive_reference() {
    let started = crate::support::in_process_node(8);
    let (runtime, node) = (&started.runtime, &started.node);
    let ingestor = Ingestor::new(Arc::clone(node));
    let mut runner = TestRunner::new(Config {
        cases: 40,
        failure_persistence: None,
        ..Config::default()
    });
    let counter = std::sync::atomic::AtomicUsize::new(0);
    runner
        .run(&logs(), |log| {
            let case_no = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            let name = format!("case{case_no}");
            let result = runtime.block_on(async {
                let project = crate::support::new_project(node, &name).await;
                // Round one, the merges (as `$identify` would make them), round two.
                for round in [false, true] {
                    let events: Vec<Event> = log
                        .events
                        .iter()
                        .enumerate()
                        .filter(|(_, e)| e.3 == round)
                        .map(|(n, &(i, day, b, _))| event(i, day, b, n))
                        .collect();
                    let merges = if round {
                        Vec::new()
                    } else {
                        log.merges.iter().map(|(a, u)| (id(*a), id(*u))).collect()
                    };
                    if events.is_empty() && merges.is_empty() {
                        continue;
                    }
                    if events.is_empty() {
                        // Merges ride on an identify event of the user.
                        let (_, u) = log.merges.iter().next().unwrap();
                        let mut identify = event(*u, 0, None, 100_000 + case_no);
                        identify.event = "$identify".into();
                        ingestor
                            .ingest(
                                &project,
                                Parsed {
                                    write_key: None,
                                    events: vec![identify],
                                    merges,
                                },
                            )
                            .await
                            .unwrap();
                    } else {
                        ingestor
                            .ingest(
                                &project,
                                Parsed {
                                    write_key: None,
                                    events,
                                    merges,
                                },
                            )
                            .await
                            .unwrap();
                    }
                }
                // Half the cases read sealed chunks (event slices), half unsealed rows.
                if case_no.is_multiple_of(2) {
                    node.seal_all();
                }
                let query = json!({
                    "kind": "trends", "date_range": {"from": "2024-06-01", "to": "2024-06-05"},
                    "series": [{"event": "view", "math": "unique_users"}, {"event": "view", "math": "total"}],
                    "breakdown": {"property": "browser", "limit": 2},
                });
                assert!(matches!(
                    parse_query(query.to_string().as_bytes()),
                    Ok(Query::Trends(_))
                ));
                node.query
                    .insight(&project, query.to_string().as_bytes())
                    .await
                    .unwrap()
                    .json
            });
            let (days, total, breakdown) = reference(&log, 2);
            let got_days: Vec<f64> = result["series"]["A"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect();
            prop_assert_eq!(&got_days, &days, "per-day uniques of {:?}", log);
            prop_assert_eq!(result["totals"]["A"].as_f64().unwrap(), total);
            let got: Vec<(String, f64)> = result["breakdown"]["series"]["A"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| {
                    (
                        b["value"].as_str().unwrap().to_string(),
                        b["total"].as_f64().unwrap(),
                    )
                })
                .collect();
            prop_assert_eq!(got, breakdown);
            // Total math: counts per day, per value with the same top-2 + (other) folding.
            let (count_days, count_total, count_breakdown) = reference_counts(&log, 2);
            let got_days: Vec<f64> = result["series"]["B"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
            prop_assert_eq!(got_days, count_days);
            prop_assert_eq!(result["totals"]["B"].as_f64().unwrap(), count_total);
            let got: Vec<(String, f64)> = result["breakdown"]["series"]["B"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| (b["value"].as_str().unwrap().to_string(), b["total"].as_f64().unwrap()))
                .collect();
            prop_assert_eq!(got, count_breakdown);
            Ok(())
        })
        .unwrap();
    runtime.block_on(node.shutdown());
}

#[test]
fn a_draining_node_answers_503_with_retry_after() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = NodeConfig::default();
    config.node.data_dir = dir.path().to_path_buf();
    config.cluster.partitions = 2;
    config.bootstrap.write_key = Some(optiprism_testkit::WRITE_KEY.into());
    let node = runtime
        .block_on(server::start(config, runtime.handle().clone()))
        .unwrap();
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let app = optiprism_node::http::router(Arc::clone(&node));
    runtime.spawn(async move { axum::serve(listener, app).await });
    let client = reqwest::blocking::Client::new();
    let batch = json!({"writeKey": optiprism_testkit::WRITE_KEY, "batch": [{"type": "track", "userId": "u", "event": "e", "messageId": "1"}]});
    let ok = client
        .post(format!("{url}/v1/batch"))
        .json(&batch)
        .send()
        .unwrap();
    assert_eq!(ok.status().as_u16(), 200);
    node.begin_drain();
    let refused = client
        .post(format!("{url}/v1/batch"))
        .json(&batch)
        .send()
        .unwrap();
    assert_eq!(refused.status().as_u16(), 503);
    assert_eq!(refused.headers().get("retry-after").unwrap(), "1");
    let body: serde_json::Value = refused.json().unwrap();
    assert_eq!(body["error"]["code"], "unavailable");
    assert_eq!(
        client
            .get(format!("{url}/readyz"))
            .send()
            .unwrap()
            .status()
            .as_u16(),
        503
    );
    runtime.block_on(node.shutdown());
}
