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

/// Compares every field of `expected` with `actual`: `buckets`, the per-series maps `series`,
/// `totals`, `previous`, `previous_totals` and `change_pct`, and `formula`, `formula_total`.
/// A null expected value must be null (and a number must not be null).
pub(crate) fn assert_answer(actual: &Value, expected: &Value, case: &str) {
    if let Some(b) = expected.get("buckets") {
        assert_eq!(&actual["buckets"], b, "{case}: buckets");
    }
    for field in [
        "series",
        "totals",
        "previous",
        "previous_totals",
        "change_pct",
    ] {
        if let Some(map) = expected.get(field).and_then(Value::as_object) {
            for (id, value) in map {
                assert!(
                    actual[field].get(id).is_some(),
                    "{case}: {field}.{id} missing in {actual}"
                );
                assert_json_numbers(&actual[field][id], value, &format!("{case}: {field}.{id}"));
            }
        }
    }
    for field in ["formula", "formula_total"] {
        if let Some(value) = expected.get(field) {
            assert!(
                actual.get(field).is_some(),
                "{case}: {field} missing in {actual}"
            );
            assert_json_numbers(&actual[field], value, &format!("{case}: {field}"));
        }
    }
}

/// The Arrow answer of a trends query back in the JSON shape: `buckets`, `series`, `totals`,
/// and when present `formula`, `formula_total`, `previous_buckets`, `previous`,
/// `previous_totals` and `change_pct` (unbroken rows only).
pub(crate) fn arrow_to_json(batches: &[RecordBatch]) -> Value {
    let number = |x: Option<f64>| x.map_or(Value::Null, |x| json!(x));
    let mut buckets: Vec<String> = Vec::new();
    let mut previous_buckets: Vec<String> = Vec::new();
    let mut first: BTreeMap<String, String> = BTreeMap::new();
    let mut series: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    let mut totals: BTreeMap<String, Value> = BTreeMap::new();
    let mut previous: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    let mut previous_totals: BTreeMap<String, Value> = BTreeMap::new();
    let mut change: BTreeMap<String, Value> = BTreeMap::new();
    let mut out = serde_json::Map::new();
    for b in batches {
        let s = b.column_by_name("series").unwrap().as_string::<i32>();
        let br = b.column_by_name("breakdown").unwrap().as_string::<i32>();
        let bucket = b.column_by_name("bucket").unwrap().as_string::<i32>();
        let value = b
            .column_by_name("value")
            .unwrap()
            .as_primitive::<arrow::datatypes::Float64Type>();
        let period = b.column_by_name("period").unwrap().as_string::<i32>();
        let pct = b
            .column_by_name("change_pct")
            .unwrap()
            .as_primitive::<arrow::datatypes::Float64Type>();
        for i in 0..b.num_rows() {
            if !br.is_null(i) {
                continue;
            }
            let id = s.value(i).to_string();
            let v = number((!value.is_null(i)).then(|| value.value(i)));
            let current = period.value(i) == "current";
            if current && id == "formula" {
                if bucket.is_null(i) {
                    out.insert("formula_total".into(), v);
                } else {
                    out.entry("formula")
                        .or_insert_with(|| json!([]))
                        .as_array_mut()
                        .unwrap()
                        .push(v);
                }
                continue;
            }
            let (values, totals, labels) = if current {
                (&mut series, &mut totals, &mut buckets)
            } else {
                (&mut previous, &mut previous_totals, &mut previous_buckets)
            };
            if bucket.is_null(i) {
                totals.insert(id.clone(), v);
                if current {
                    change.insert(id, number((!pct.is_null(i)).then(|| pct.value(i))));
                }
            } else {
                if first
                    .entry(period.value(i).to_string())
                    .or_insert_with(|| id.clone())
                    == &id
                {
                    labels.push(bucket.value(i).to_string());
                }
                values.entry(id).or_default().push(v);
            }
        }
    }
    out.insert("buckets".into(), json!(buckets));
    out.insert("series".into(), json!(series));
    out.insert("totals".into(), json!(totals));
    if !previous.is_empty() {
        change.retain(|id, _| previous.contains_key(id));
        out.insert("previous_buckets".into(), json!(previous_buckets));
        out.insert("previous".into(), json!(previous));
        out.insert("previous_totals".into(), json!(previous_totals));
        out.insert("change_pct".into(), json!(change));
    }
    Value::Object(out)
}

/// A real node started in this process (no HTTP client in between), for property tests that
/// ingest and query many small logs quickly. Dropped with its runtime and data directory.
pub(crate) struct InProcessNode {
    /// The runtime the node and its queries run on.
    pub runtime: std::sync::Arc<tokio::runtime::Runtime>,
    /// The node.
    pub node: std::sync::Arc<optiprism_node::server::NodeShared>,
    _dir: tempfile::TempDir,
}

/// Starts an in-process node with `partitions` partitions on a two-thread runtime.
pub(crate) fn in_process_node(partitions: u32) -> InProcessNode {
    let runtime = std::sync::Arc::new(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap(),
    );
    let dir = tempfile::tempdir().unwrap();
    let mut config = optiprism_node::config::NodeConfig::default();
    config.node.data_dir = dir.path().to_path_buf();
    config.cluster.partitions = partitions;
    let node = runtime
        .block_on(optiprism_node::server::start(
            config,
            runtime.handle().clone(),
        ))
        .unwrap();
    InProcessNode {
        runtime,
        node,
        _dir: dir,
    }
}

/// Creates project `name` on an in-process node (its keys derived from the name).
pub(crate) async fn new_project(
    node: &optiprism_node::server::NodeShared,
    name: &str,
) -> optiprism_node::metadata::Project {
    use optiprism_node::metadata::{MetaCommand, MetaResponse};
    let response = node
        .propose_metadata(MetaCommand::UpsertProject {
            name: name.to_string(),
            write_key: format!("wk_{name}_key"),
            api_token: format!("pat_{name}_token"),
        })
        .await
        .expect("project");
    assert!(matches!(response, MetaResponse::Project(_)), "{response:?}");
    node.project(name).expect("project")
}

/// Ingests case events (`{user, event, ts, props}`) into `project` of an in-process node, as
/// a PostHog batch with message ids `{prefix}-{i}`.
pub(crate) async fn ingest_case_events(
    node: &std::sync::Arc<optiprism_node::server::NodeShared>,
    project: &optiprism_node::metadata::Project,
    events: &[Value],
    prefix: &str,
) {
    let ctx = optiprism_node::ingest::ParseContext {
        received_ms: chrono::Utc::now().timestamp_millis(),
        limits: Default::default(),
    };
    let body = serde_json::to_vec(&posthog_batch(events, prefix)).unwrap();
    let mut parsed = optiprism_node::ingest::posthog::parse(&body, &ctx).expect("events parse");
    parsed.write_key = None;
    optiprism_node::ingest::Ingestor::new(std::sync::Arc::clone(node))
        .ingest(project, parsed)
        .await
        .expect("ingest");
}

/// Every stored message id with how many rows carry it, over Flight SQL.
pub(crate) fn uuid_counts(node: &optiprism_testkit::TestNode) -> Vec<(String, i64)> {
    let sql = "SELECT uuid, count(*) AS n FROM events GROUP BY uuid";
    // Unavailable (a leader change under way) is retryable; anything else fails the test.
    let mut attempts = 0;
    let batches = loop {
        match node.sql(sql) {
            Ok(batches) => break batches,
            Err(e) if format!("{e:#}").to_lowercase().contains("unavailable") && attempts < 300 => {
                attempts += 1;
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
            Err(e) => panic!("{sql}: {e:#}"),
        }
    };
    let mut out = Vec::new();
    for b in &batches {
        let uuid = arrow::compute::cast(b.column(0), &arrow::datatypes::DataType::Utf8).unwrap();
        let uuid = uuid.as_string::<i32>();
        let n = b.column(1).as_primitive::<arrow::datatypes::Int64Type>();
        for i in 0..b.num_rows() {
            out.push((uuid.value(i).to_string(), n.value(i)));
        }
    }
    out
}
