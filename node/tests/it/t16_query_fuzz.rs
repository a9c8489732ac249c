//! Random query JSON never panics a node: every spec case's query, mutated at random places
//! (values swapped for nulls, wrong types, extreme numbers, odd strings, deep nesting; keys
//! dropped or added), is answered or refused with a named field, in process against a real
//! node with data, and over HTTP against a real `prism` process that must stay up.

use crate::support::spec_cases;
use optiprism_node::query::QueryFailure;
use optiprism_testkit::TestNode;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{Value, json};

/// One mutation: which node of the JSON tree (by pre-order index), what to do, and a value.
#[derive(Debug, Clone)]
struct Mutation {
    at: usize,
    op: u8,
    value: Value,
}

fn deep_array(depth: usize) -> Value {
    (0..depth).fold(json!(1), |inner, _| json!([inner]))
}

fn odd_values() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        Just(json!(true)),
        Just(json!(-1)),
        Just(json!(0)),
        Just(json!(1e308)),
        Just(json!(-9_223_372_036_854_775_808i64)),
        Just(json!(u64::MAX)),
        Just(json!(0.5)),
        Just(json!("")),
        Just(json!("9999-99-99")),
        Just(json!("2024-02-30")),
        Just(json!("Mars/Olympus")),
        Just(json!("(((")),
        Just(json!([])),
        Just(json!({})),
        Just(deep_array(40)),
        Just(
            json!({"op": "and", "filters": [{"op": "or", "filters": [{"op": "and", "filters": []}]}]})
        ),
        Just(
            json!({"type": "not", "condition": {"type": "not", "condition": {"type": "and", "conditions": []}}})
        ),
        "[a-z_$]{0,12}".prop_map(Value::String),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|x| serde_json::Number::from_f64(x)
            .map(Value::Number)
            .unwrap_or(Value::Null)),
    ]
}

fn mutations() -> impl Strategy<Value = Vec<Mutation>> {
    proptest::collection::vec(
        (any::<usize>(), 0u8..4, odd_values()).prop_map(|(at, op, value)| Mutation {
            at,
            op,
            value,
        }),
        1..4,
    )
}

fn count(v: &Value) -> usize {
    1 + match v {
        Value::Array(a) => a.iter().map(count).sum(),
        Value::Object(o) => o.values().map(count).sum(),
        _ => 0,
    }
}

/// Applies `m` to the `target`-th node in pre-order; returns whether it was applied.
fn apply(v: &mut Value, target: &mut usize, m: &Mutation) -> bool {
    if *target == 0 {
        match (m.op, &mut *v) {
            // Add an unknown key, or push an odd element.
            (1, Value::Object(o)) => {
                o.insert("unexpected_field".into(), m.value.clone());
            }
            (1, Value::Array(a)) => a.push(m.value.clone()),
            // Drop a key or an element.
            (2, Value::Object(o)) => {
                let key = o.keys().next().cloned();
                if let Some(k) = key {
                    o.remove(&k);
                }
            }
            (2, Value::Array(a)) => {
                a.pop();
            }
            // Duplicate the node inside an array.
            (3, node) => *node = json!([node.clone(), node.clone()]),
            _ => *v = m.value.clone(),
        }
        return true;
    }
    *target -= 1;
    match v {
        Value::Array(a) => a.iter_mut().any(|x| apply(x, target, m)),
        Value::Object(o) => o.values_mut().any(|x| apply(x, target, m)),
        _ => false,
    }
}

fn mutated(base: &Value, ms: &[Mutation]) -> Value {
    let mut q = base.clone();
    for m in ms {
        let mut target = m.at % count(&q);
        apply(&mut q, &mut target, m);
    }
    q
}

fn case_queries() -> Vec<Value> {
    spec_cases()
        .into_iter()
        .map(|c| c["query"].clone())
        .collect()
}

#[test]
fn mutated_queries_are_answered_or_refused_with_a_field_in_process() {
    let started = crate::support::in_process_node(4);
    let (runtime, node) = (&started.runtime, &started.node);
    let project = node.project("default").unwrap();
    // Data for the queries to run over: every case's events.
    for (i, c) in spec_cases().iter().enumerate() {
        let events = c["events"].as_array().unwrap();
        runtime.block_on(crate::support::ingest_case_events(
            node,
            &project,
            events,
            &format!("fuzz{i}"),
        ));
    }
    let bases = case_queries();
    let mut runner = TestRunner::new(Config {
        cases: 1500,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&(0..bases.len(), mutations()), |(i, ms)| {
            let q = mutated(&bases[i], &ms);
            let body = serde_json::to_vec(&q).unwrap();
            let outcome = runtime.block_on(node.query.insight(&project, &body));
            match outcome {
                Ok(answer) => prop_assert!(answer.json.is_object(), "{q}"),
                Err(QueryFailure::Invalid(e)) => {
                    prop_assert!(!e.field.is_empty() && !e.message.is_empty(), "{q}: {e}")
                }
                Err(other) => prop_assert!(false, "{q}: unexpected failure {other}"),
            }
            Ok(())
        })
        .unwrap();
    runtime.block_on(node.shutdown());
}

#[test]
fn mutated_queries_over_http_get_json_errors_and_the_node_stays_up() {
    let node = TestNode::start();
    let bases = case_queries();
    let mut runner = TestRunner::new(Config {
        cases: 150,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&(0..bases.len(), mutations()), |(i, ms)| {
            let q = mutated(&bases[i], &ms);
            let (status, body) = node.query(&q);
            prop_assert!(status == 200 || status == 400, "{q}: {status} {body}");
            if status == 400 {
                prop_assert!(body["error"]["field"].is_string(), "{q}: {body}");
            }
            Ok(())
        })
        .unwrap();
    // Not JSON at all, and JSON that is not an object.
    let bearer = format!("Bearer {}", optiprism_testkit::API_TOKEN);
    for raw in ["", "{", "[]", "null", "\"trends\"", "{\"kind\": 7}"] {
        let (status, body) = node.post_raw(
            "/api/v1/projects/default/query",
            raw.as_bytes().to_vec(),
            &[
                ("content-type", "application/json"),
                ("authorization", &bearer),
            ],
        );
        assert_eq!(status, 400, "{raw}: {body}");
    }
    let (status, _) = node.get("/livez");
    assert_eq!(status, 200);
}
