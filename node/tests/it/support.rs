//! Helpers shared by the tests: the spec's cases, sending them, comparing answers.

use arrow::array::{Array, AsArray, RecordBatch};
use serde_json::{Value, json};
use std::collections::BTreeMap;

/// The spec's cases file (`../shared/spec/cases/analytics.json` next to the repository).
pub(crate) fn spec_cases() -> Vec<Value> {
    let path = optiprism_testkit::crate_dir().join("../../shared/spec/cases/analytics.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let all: Value = serde_json::from_str(&text).expect("cases are JSON");
    all["cases"].as_array().expect("cases array").clone()
}

/// The case named `name`.
pub(crate) fn case(name: &str) -> Value {
    spec_cases()
        .into_iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no case {name}"))
}

/// The events of a case as a PostHog batch (`{user, event, ts, props}` map one to one).
pub(crate) fn posthog_batch(events: &[Value], prefix: &str) -> Value {
    let batch: Vec<Value> = events
        .iter()
        .enumerate()
        .map(|(i, e)| {
            json!({
                "event": e["event"],
                "distinct_id": e["user"],
                "timestamp": e["ts"],
                "properties": e["props"],
                "uuid": format!("{prefix}-{i}"),
            })
        })
        .collect();
    json!({ "api_key": optiprism_testkit::WRITE_KEY, "batch": batch })
}

/// Numbers compare as floats (the answer prints integers without fractions; floats may differ
/// in their last bits).
pub(crate) fn assert_json_numbers(actual: &Value, expected: &Value, what: &str) {
    match (actual, expected) {
        (Value::Number(a), Value::Number(e)) => {
            let (a, e) = (a.as_f64().unwrap(), e.as_f64().unwrap());
            assert!((a - e).abs() < 1e-9, "{what}: {a} != {e}");
        }
        (Value::Array(a), Value::Array(e)) => {
            assert_eq!(a.len(), e.len(), "{what}: length of {actual} vs {expected}");
            for (i, (x, y)) in a.iter().zip(e).enumerate() {
                assert_json_numbers(x, y, &format!("{what}[{i}]"));
            }
        }
        (a, e) => assert_eq!(a, e, "{what}"),
    }
}

/// Compares every field of `expected` (`buckets`, `series`, `totals`) with `actual`.
pub(crate) fn assert_answer(actual: &Value, expected: &Value, case: &str) {
    if let Some(b) = expected.get("buckets") {
        assert_eq!(&actual["buckets"], b, "{case}: buckets");
    }
    for field in ["series", "totals"] {
        if let Some(map) = expected.get(field).and_then(Value::as_object) {
            for (id, value) in map {
                assert_json_numbers(&actual[field][id], value, &format!("{case}: {field}.{id}"));
            }
        }
    }
}

/// The Arrow answer of a trends query back in the JSON shape (`series`, `totals`).
pub(crate) fn arrow_to_json(batches: &[RecordBatch]) -> Value {
    let mut series: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut buckets: Vec<String> = Vec::new();
    let mut first_series: Option<String> = None;
    let mut totals: BTreeMap<String, f64> = BTreeMap::new();
    for b in batches {
        let s = b.column_by_name("series").unwrap().as_string::<i32>();
        let br = b.column_by_name("breakdown").unwrap().as_string::<i32>();
        let bucket = b.column_by_name("bucket").unwrap().as_string::<i32>();
        let value = b
            .column_by_name("value")
            .unwrap()
            .as_primitive::<arrow::datatypes::Float64Type>();
        for i in 0..b.num_rows() {
            if !br.is_null(i) {
                continue;
            }
            if bucket.is_null(i) {
                totals.insert(s.value(i).to_string(), value.value(i));
            } else {
                let id = s.value(i).to_string();
                if first_series.get_or_insert_with(|| id.clone()) == &id {
                    buckets.push(bucket.value(i).to_string());
                }
                series.entry(id).or_default().push(value.value(i));
            }
        }
    }
    json!({ "buckets": buckets, "series": series, "totals": totals })
}
