//! The funnel, retention, stickiness, lifecycle, paths, cohort and identity cases of
//! `spec/cases/analytics.json`, end to end: events in through HTTP ingestion, answers out
//! through HTTP and through Arrow Flight (the Arrow table turned back into the JSON shape), on
//! one node; and every case of the file, trends included, on a three-node cluster (events sent
//! to node 2, questions asked of node 3). Also segments, person properties, time to convert,
//! held properties, every cohort condition and cohort breakdowns.

use crate::support::{posthog_batch, spec_cases};
use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{Float64Type, Int64Type, TimestampMillisecondType};
use optiprism_testkit::{TestCluster, TestNode};
use serde_json::{Map, Value, json};

/// Every field of `expected` is in `actual` with the same value (numbers as floats).
fn assert_subset(actual: &Value, expected: &Value, path: &str) {
    match (actual, expected) {
        (Value::Number(a), Value::Number(e)) => {
            let (a, e) = (a.as_f64().unwrap(), e.as_f64().unwrap());
            assert!((a - e).abs() < 1e-9, "{path}: {a} != {e}");
        }
        (Value::Array(a), Value::Array(e)) => {
            assert_eq!(a.len(), e.len(), "{path}: {actual} vs {expected}");
            for (i, (x, y)) in a.iter().zip(e).enumerate() {
                assert_subset(x, y, &format!("{path}[{i}]"));
            }
        }
        (Value::Object(a), Value::Object(e)) => {
            for (k, v) in e {
                let got = a
                    .get(k)
                    .unwrap_or_else(|| panic!("{path}.{k} missing in {actual}"));
                assert_subset(got, v, &format!("{path}.{k}"));
            }
        }
        (a, e) => assert_eq!(a, e, "{path}"),
    }
}

fn text(b: &RecordBatch, name: &str, row: usize) -> Option<String> {
    let c = b.column_by_name(name)?;
    let c = c.as_string::<i32>();
    (!c.is_null(row)).then(|| c.value(row).to_string())
}

fn int(b: &RecordBatch, name: &str, row: usize) -> Value {
    let c = b.column_by_name(name).unwrap().as_primitive::<Int64Type>();
    if c.is_null(row) {
        Value::Null
    } else {
        json!(c.value(row))
    }
}

fn float(b: &RecordBatch, name: &str, row: usize) -> Value {
    let c = b
        .column_by_name(name)
        .unwrap()
        .as_primitive::<Float64Type>();
    if c.is_null(row) {
        Value::Null
    } else {
        json!(c.value(row))
    }
}

fn rows(batches: &[RecordBatch]) -> impl Iterator<Item = (&RecordBatch, usize)> {
    batches
        .iter()
        .flat_map(|b| (0..b.num_rows()).map(move |r| (b, r)))
}

/// The Arrow answer of an insight back in the JSON shape of the cases.
fn arrow_to_json(kind: &str, batches: &[RecordBatch]) -> Value {
    let mut out = Map::new();
    match kind {
        "funnel" => {
            let mut counts = Vec::new();
            let mut from_start = Vec::new();
            let mut from_previous = Vec::new();
            let mut breakdown = Map::new();
            for (b, r) in rows(batches) {
                match text(b, "breakdown", r) {
                    None => {
                        counts.push(int(b, "count", r));
                        from_start.push(float(b, "conversion_from_start_pct", r));
                        from_previous.push(float(b, "conversion_from_previous_pct", r));
                    }
                    Some(label) => {
                        let entry = breakdown.entry(label).or_insert_with(|| json!([]));
                        entry.as_array_mut().unwrap().push(int(b, "count", r));
                    }
                }
            }
            out.insert("step_counts".into(), Value::Array(counts));
            out.insert("conversion_from_start_pct".into(), Value::Array(from_start));
            out.insert(
                "conversion_from_previous_pct".into(),
                Value::Array(from_previous),
            );
            out.insert("breakdown".into(), Value::Object(breakdown));
        }
        "funnel_trends" => {
            let mut by = Map::new();
            for (b, r) in rows(batches) {
                by.insert(
                    text(b, "bucket", r).unwrap(),
                    json!({"entered": int(b, "entered", r), "converted": int(b, "converted", r),
                           "rate_pct": float(b, "rate_pct", r)}),
                );
            }
            out.insert("by_entry_day".into(), Value::Object(by));
        }
        "retention" => {
            let mut cohorts: Vec<Value> = Vec::new();
            for (b, r) in rows(batches) {
                let cohort = text(b, "cohort", r).unwrap();
                if cohorts.last().map(|c| c["cohort"] != cohort.as_str()) != Some(false) {
                    cohorts.push(json!({"cohort": cohort, "size": int(b, "size", r),
                                        "retained": [], "pct": []}));
                }
                let last = cohorts.last_mut().unwrap();
                let retained = float(b, "retained", r);
                last["retained"].as_array_mut().unwrap().push(retained);
                last["pct"].as_array_mut().unwrap().push(float(b, "pct", r));
            }
            out.insert("cohorts".into(), Value::Array(cohorts));
        }
        "stickiness" => {
            let (mut h, mut c) = (Vec::new(), Vec::new());
            for (b, r) in rows(batches) {
                h.push(int(b, "units", r));
                c.push(int(b, "cumulative", r));
            }
            out.insert("histogram".into(), Value::Array(h));
            out.insert("cumulative".into(), Value::Array(c));
        }
        "lifecycle" => {
            let mut by = Map::new();
            for (b, r) in rows(batches) {
                let entry = by
                    .entry(text(b, "period", r).unwrap())
                    .or_insert_with(|| json!({}));
                entry[text(b, "status", r).unwrap()] = int(b, "units", r);
            }
            out.insert("by_period".into(), Value::Object(by));
        }
        "paths" => {
            let mut edges = Vec::new();
            let mut dropoffs = Map::new();
            for (b, r) in rows(batches) {
                let source = text(b, "source", r).unwrap();
                if text(b, "kind", r).as_deref() == Some("edge") {
                    edges.push(json!({"source": source, "target": text(b, "target", r),
                                      "value": int(b, "value", r),
                                      "avg_seconds": float(b, "avg_seconds", r)}));
                } else {
                    dropoffs.insert(source, int(b, "value", r));
                }
            }
            out.insert("edges".into(), Value::Array(edges));
            out.insert("dropoffs".into(), Value::Object(dropoffs));
        }
        "cohort" => {
            let mut members = Map::new();
            for (b, r) in rows(batches) {
                let entry = members
                    .entry(text(b, "cohort", r).unwrap())
                    .or_insert_with(|| json!([]));
                entry
                    .as_array_mut()
                    .unwrap()
                    .push(json!(text(b, "distinct_id", r)));
            }
            out.insert("members".into(), Value::Object(members));
        }
        "cohort_timeline" => {
            let mut transitions = Map::new();
            for (b, r) in rows(batches) {
                let at = b
                    .column_by_name("at")
                    .unwrap()
                    .as_primitive::<TimestampMillisecondType>()
                    .value(r);
                let at = chrono::DateTime::from_timestamp_millis(at)
                    .unwrap()
                    .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
                let entry = transitions
                    .entry(text(b, "distinct_id", r).unwrap())
                    .or_insert_with(|| json!([]));
                entry
                    .as_array_mut()
                    .unwrap()
                    .push(json!({"at": at, "change": text(b, "change", r)}));
            }
            out.insert("transitions".into(), Value::Object(transitions));
        }
        "identity" => {
            for (b, r) in rows(batches) {
                let metric = text(b, "metric", r).unwrap();
                let Some(name) = metric.strip_prefix("merged.") else {
                    continue;
                };
                if b.column_by_name("index").unwrap().is_null(r) {
                    out.insert(name.to_string(), float(b, "value", r));
                } else {
                    let entry = out.entry(name.to_string()).or_insert_with(|| json!([]));
                    entry.as_array_mut().unwrap().push(float(b, "value", r));
                }
            }
        }
        other => panic!("no Arrow shape for {other}"),
    }
    Value::Object(out)
}

fn insight_cases() -> Vec<Value> {
    spec_cases()
        .into_iter()
        .filter(|c| c["query"]["kind"] != "trends")
        .collect()
}

fn check(ingest_to: &TestNode, ask: &TestNode, c: &Value) {
    let name = c["name"].as_str().unwrap();
    let (status, body) = ingest_to.post(
        "/batch/",
        &posthog_batch(c["events"].as_array().unwrap(), name),
    );
    assert_eq!(status, 200, "{name}: ingest: {body}");
    let (status, answer) = ask.query(&c["query"]);
    assert_eq!(status, 200, "{name}: {answer}");
    let kind = c["query"]["kind"].as_str().unwrap();
    let batches = ask.flight_query(&c["query"]).expect("flight query");
    if kind == "trends" {
        // The trends answer and its Arrow shape are those of t10_spec_cases.
        crate::support::assert_answer(&answer, &c["expected"], name);
        crate::support::assert_answer(
            &crate::support::arrow_to_json(&batches),
            &c["expected"],
            &format!("{name} (Flight)"),
        );
        return;
    }
    assert_subset(&answer, &c["expected"], name);
    assert_subset(
        &arrow_to_json(kind, &batches),
        &c["expected"],
        &format!("{name} (Flight)"),
    );
}

#[test]
fn every_insight_case_on_one_node() {
    for c in insight_cases() {
        let node = TestNode::start();
        check(&node, &node, &c);
    }
}

#[test]
fn the_identity_report_shows_what_merges_change() {
    // The case's notes: counted by raw distinct id, the same events give 3 page viewers, daily
    // uniques [1, 2] and a funnel of [3, 0].
    let c = spec_cases()
        .into_iter()
        .find(|c| c["name"] == "identity_merge_effects")
        .unwrap();
    let node = TestNode::start();
    let (status, _) = node.post(
        "/batch/",
        &posthog_batch(c["events"].as_array().unwrap(), "id"),
    );
    assert_eq!(status, 200);
    let (status, answer) = node.query(&c["query"]);
    assert_eq!(status, 200, "{answer}");
    assert_subset(
        &answer["unmerged"],
        &json!({"pageview_unique_users_total": 3, "pageview_dau": [1, 2],
                "funnel_step_counts": [3, 0]}),
        "unmerged",
    );
}

#[test]
fn every_case_on_a_three_node_cluster() {
    // All of them, trends included (t10_spec_cases asks one node of those).
    for c in spec_cases() {
        let cluster = TestCluster::start(3, 4);
        check(cluster.node(2), cluster.node(3), &c);
    }
}

/// Cohort filters (segments) in trends, stickiness and funnels, over the events of
/// `cohort_event_count_window_boundaries`: at T the cohort "3+ purchases in the last 7 days"
/// is {u1, u2, u3}, who made 10 purchases from Mar 20 to 31; u5 made the other 2, on 2 days.
fn check_segments(ingest_to: &TestNode, ask: &TestNode) {
    let c = spec_cases()
        .into_iter()
        .find(|c| c["name"] == "cohort_event_count_window_boundaries")
        .unwrap();
    let (status, _) = ingest_to.post(
        "/batch/",
        &posthog_batch(c["events"].as_array().unwrap(), "seg"),
    );
    assert_eq!(status, 200);
    let cohort = json!({"type": "event_count", "entity": {"event": "purchase"},
                        "operator": "gte", "value": 3, "days": 7});
    let at = "2024-03-31T12:00:00Z";
    let range = json!({"from": "2024-03-20", "to": "2024-03-31"});
    let trends = |op: &str, math: &str| {
        json!({"kind": "trends", "date_range": range, "interval": "day",
               "series": [{"id": "P", "event": "purchase", "math": math}],
               "filters": [{"op": op, "cohort": cohort, "evaluate_at": at}]})
    };
    for (op, math, total) in [
        ("in_cohort", "total", 10),
        ("not_in_cohort", "total", 2),
        ("in_cohort", "unique_users", 3),
    ] {
        let (status, answer) = ask.query(&trends(op, math));
        assert_eq!(status, 200, "{answer}");
        assert_subset(
            &answer["totals"],
            &json!({"P": total}),
            &format!("{op} {math}"),
        );
    }
    let (status, answer) = ask.query(&json!({
        "kind": "stickiness", "date_range": range, "series": {"event": "purchase"},
        "filters": [{"op": "not_in_cohort", "cohort": cohort, "evaluate_at": at}]}));
    assert_eq!(status, 200, "{answer}");
    assert_subset(
        &answer["histogram"],
        &json!([0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
        "stickiness",
    );
    let (status, answer) = ask.query(&json!({
        "kind": "funnel", "date_range": range, "window_seconds": 604800,
        "steps": [{"event": "purchase"}, {"event": "purchase"}, {"event": "purchase"}],
        "filters": [{"op": "in_cohort", "cohort": cohort, "evaluate_at": at}]}));
    assert_eq!(status, 200, "{answer}");
    assert_subset(&answer["step_counts"], &json!([3, 3, 3]), "funnel");
    // A cohort's own events cannot be filtered by another cohort.
    let nested = json!({"kind": "cohort", "cohorts": {"x": {"type": "event_count",
        "entity": {"event": "purchase", "filters": [{"op": "in_cohort", "cohort": cohort}]},
        "operator": "gte", "value": 1}}});
    let (status, answer) = ask.query(&nested);
    assert_eq!(status, 400, "{answer}");
    assert_eq!(
        answer["error"]["field"], "cohorts.x.entity.filters",
        "{answer}"
    );
}

#[test]
fn cohort_filters_segment_every_insight_on_one_node() {
    let node = TestNode::start();
    check_segments(&node, &node);
}

#[test]
fn cohort_filters_segment_every_insight_on_a_cluster() {
    let cluster = TestCluster::start(3, 4);
    check_segments(cluster.node(1), cluster.node(3));
}

/// Person property filters and breakdowns read each person's current value (`$set`), for
/// every event of the person, before or after the value changed.
#[test]
fn person_properties_filter_and_break_down_by_the_current_value() {
    let node = TestNode::start();
    let events = json!([
        {"user": "u1", "event": "view", "ts": "2024-05-01T10:00:00Z", "props": {"$set": {"plan": "free"}}},
        {"user": "u1", "event": "buy", "ts": "2024-05-01T11:00:00Z", "props": {}},
        {"user": "u1", "event": "upgrade", "ts": "2024-05-02T10:00:00Z", "props": {"$set": {"plan": "pro"}}},
        {"user": "u2", "event": "view", "ts": "2024-05-01T10:00:00Z", "props": {"$set": {"plan": "free", "age": "41"}}},
        {"user": "u3", "event": "view", "ts": "2024-05-02T10:00:00Z", "props": {}},
        {"user": "u3", "event": "buy", "ts": "2024-05-02T10:30:00Z", "props": {}},
    ]);
    let (status, body) = node.post("/batch/", &posthog_batch(events.as_array().unwrap(), "pp"));
    assert_eq!(status, 200, "{body}");
    let range = json!({"from": "2024-05-01", "to": "2024-05-02"});
    let viewers = |filter: Value| {
        json!({"kind": "trends", "date_range": range, "interval": "day",
               "series": [{"id": "V", "event": "view", "math": "unique_users"}],
               "filters": [filter]})
    };
    for (filter, expected) in [
        (
            json!({"type": "person", "key": "plan", "op": "eq", "value": "pro"}),
            1,
        ),
        (
            json!({"type": "person", "key": "plan", "op": "neq", "value": "pro"}),
            2,
        ),
        (
            json!({"type": "person", "key": "plan", "op": "is_not_set"}),
            1,
        ),
        (
            json!({"type": "person", "key": "age", "op": "gt", "value": 40}),
            1,
        ),
    ] {
        let (status, answer) = node.query(&viewers(filter.clone()));
        assert_eq!(status, 200, "{answer}");
        assert_subset(
            &answer["totals"],
            &json!({"V": expected}),
            &filter.to_string(),
        );
    }
    let (status, answer) = node.query(&json!({
        "kind": "funnel", "date_range": range, "window_seconds": 86400,
        "steps": [{"event": "view"}, {"event": "buy"}],
        "breakdown": {"type": "person", "property": "plan"}}));
    assert_eq!(status, 200, "{answer}");
    assert_subset(
        &answer["breakdown"],
        &json!({"pro": [1, 1], "free": [1, 0], "(none)": [1, 1]}),
        "funnel by person plan",
    );
    let (status, answer) = node.query(&json!({
        "kind": "trends", "date_range": range, "interval": "day",
        "series": [{"id": "V", "event": "view", "math": "unique_users"}],
        "breakdown": {"type": "person", "property": "plan"}}));
    assert_eq!(status, 200, "{answer}");
    let by_value: serde_json::Map<String, Value> = answer["breakdown"]["series"]["V"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| (b["value"].as_str().unwrap().to_string(), b["total"].clone()))
        .collect();
    assert_subset(
        &Value::Object(by_value),
        &json!({"pro": 1, "free": 1, "(none)": 1}),
        "trends by person plan",
    );
}

/// Time to convert (example 3.E): per step and overall, averages, medians and PostHog's
/// histogram; and a property held constant makes (person, value) the counting unit.
#[test]
fn time_to_convert_and_held_properties() {
    let node = TestNode::start();
    let at = |m: u32| format!("2024-08-01T{:02}:{:02}:00Z", m / 60, m % 60);
    let mut events = Vec::new();
    for (user, a, b, c) in [
        ("u1", 0, Some(10), Some(30)),
        ("u2", 0, Some(60), Some(180)),
        ("u3", 0, Some(5), None),
        ("u4", 0, Some(0), Some(20)),
    ] {
        let a = json!({"user": user, "event": "A", "ts": at(a), "props": {}});
        let b = b.map(|b| json!({"user": user, "event": "B", "ts": at(b), "props": {}}));
        if user == "u4" {
            // u4's B is sent before its A, in the same instant.
            events.extend(b);
            events.push(a);
        } else {
            events.push(a);
            events.extend(b);
        }
        if let Some(c) = c {
            events.push(json!({"user": user, "event": "C", "ts": at(c), "props": {}}));
        }
    }
    for (user, second) in [("h1", "B"), ("h2", "A")] {
        events.push(
            json!({"user": user, "event": "view", "ts": at(600), "props": {"campaign": "A"}}),
        );
        events.push(
            json!({"user": user, "event": "buy", "ts": at(630), "props": {"campaign": second}}),
        );
    }
    let (status, body) = node.post("/batch/", &posthog_batch(&events, "ttc"));
    assert_eq!(status, 200, "{body}");
    let range = json!({"from": "2024-08-01", "to": "2024-08-01"});
    let (status, answer) = node.query(&json!({
        "kind": "funnel", "date_range": range, "window_seconds": 86400,
        "steps": [{"event": "A"}, {"event": "B"}, {"event": "C"}], "histogram_bins": 2}));
    assert_eq!(status, 200, "{answer}");
    assert_subset(
        &answer["time_to_convert"],
        &json!({
            "steps": [
                {"from_step": 0, "to_step": 1, "units": 4, "avg_seconds": 1125, "median_seconds": 450},
                {"from_step": 1, "to_step": 2, "units": 3, "avg_seconds": 3200, "median_seconds": 1200},
            ],
            "overall": {"units": 3, "avg_seconds": 4600, "median_seconds": 1800,
                        "histogram": [[1200, 2], [6000, 0], [10800, 1]]},
        }),
        "time to convert",
    );
    let (status, answer) = node.query(&json!({
        "kind": "funnel", "date_range": range, "window_seconds": 86400,
        "steps": [{"event": "view"}, {"event": "buy"}], "hold_constant": ["campaign"]}));
    assert_eq!(status, 200, "{answer}");
    assert_subset(&answer["step_counts"], &json!([2, 1]), "held campaign");
}

/// The other conditions of §8.1: had a property value, stopped, restarted, did regularly,
/// did it for the Nth time, converted in a funnel, returned in a retention period.
#[test]
fn every_cohort_condition_kind() {
    let node = TestNode::start();
    let ev = |user: &str, event: &str, ts: &str, props: Value| json!({"user": user, "event": event, "ts": ts, "props": props});
    let events = vec![
        ev("s1", "signup", "2024-06-09T10:00:00Z", json!({})),
        ev("s1", "use", "2024-06-10T10:00:00Z", json!({"plan": "pro"})),
        ev("s2", "use", "2024-06-28T10:00:00Z", json!({})),
        ev("s2", "buy", "2024-06-28T12:00:00Z", json!({})),
        ev("s3", "use", "2024-06-26T10:00:00Z", json!({})),
        ev("s3", "use", "2024-06-28T10:00:00Z", json!({})),
        ev("s3", "use", "2024-06-29T10:00:00Z", json!({})),
    ];
    let (status, body) = node.post("/batch/", &posthog_batch(&events, "conds"));
    assert_eq!(status, 200, "{body}");
    let used = json!({"event": "use"});
    let query = json!({"kind": "cohort", "evaluate_at": "2024-06-30T00:00:00Z", "cohorts": {
        "stopped": {"type": "stopped", "entity": used, "days": 7, "previous": {"days": 30}},
        "restarted": {"type": "restarted", "entity": used, "days": 7, "previous": {"days": 30}},
        "regular": {"type": "regularly", "entity": used, "period": "day",
                    "total_periods": 4, "min_periods": 3},
        "had_pro": {"type": "had_property", "days": 30,
                    "filter": {"key": "plan", "op": "eq", "value": "pro"}},
        "second_time": {"type": "historical_count", "entity": used, "nth": 2, "days": 7},
        "converted": {"type": "funnel", "operator": "gte", "value": 2, "days": 30,
                      "funnel": {"steps": [{"event": "use"}, {"event": "buy"}],
                                 "window_seconds": 86400}},
        "returned": {"type": "retention", "start": {"event": "signup"},
                     "return": {"event": "use"}, "period": "day", "returned_in": 1,
                     "days": 30},
    }});
    let (status, answer) = node.query(&query);
    assert_eq!(status, 200, "{answer}");
    assert_subset(
        &answer["members"],
        &json!({"stopped": ["s1"], "restarted": ["s2", "s3"], "regular": ["s3"],
                "had_pro": ["s1"], "second_time": ["s3"], "converted": ["s2"],
                "returned": ["s1"]}),
        "members",
    );
    // A field a kind does not take is named.
    let (status, answer) = node.query(&json!({"kind": "cohort", "cohorts": {
        "x": {"type": "stopped", "entity": used, "days": 7, "previous": {"days": 30}, "nth": 2}}}));
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("`nth`"),
        "{answer}"
    );
}

/// A cohort breakdown answers the query once per cohort (each as a segment) beside the whole:
/// over the events of `cohort_event_count_window_boundaries`, persons with 3+ purchases
/// (u1, u2, u3) made 10 of the 12, persons with at most 2 (u4, u5) the other 2.
#[test]
fn cohort_breakdowns_answer_every_cohort_beside_the_whole() {
    let node = TestNode::start();
    let c = spec_cases()
        .into_iter()
        .find(|c| c["name"] == "cohort_event_count_window_boundaries")
        .unwrap();
    let (status, _) = node.post(
        "/batch/",
        &posthog_batch(c["events"].as_array().unwrap(), "cb"),
    );
    assert_eq!(status, 200);
    let cohorts = json!({
        "buyers": {"type": "event_count", "entity": {"event": "purchase"}, "operator": "gte", "value": 3},
        "few": {"type": "event_count", "entity": {"event": "purchase"}, "operator": "lte", "value": 2},
    });
    let range = json!({"from": "2024-03-20", "to": "2024-03-31"});
    let trends = json!({"kind": "trends", "date_range": range,
        "series": [{"id": "P", "event": "purchase"}], "cohort_breakdown": cohorts});
    let (status, answer) = node.query(&trends);
    assert_eq!(status, 200, "{answer}");
    assert_subset(
        &answer,
        &json!({"totals": {"P": 12}, "by_cohort": {"buyers": {"totals": {"P": 10}},
                                                   "few": {"totals": {"P": 2}}}}),
        "trends by cohort",
    );
    let funnel = json!({"kind": "funnel", "date_range": range, "window_seconds": 604800,
        "steps": [{"event": "purchase"}, {"event": "purchase"}], "cohort_breakdown": cohorts});
    let (status, answer) = node.query(&funnel);
    assert_eq!(status, 200, "{answer}");
    assert_subset(
        &answer,
        &json!({"step_counts": [4, 4], "by_cohort": {"buyers": {"step_counts": [3, 3]},
                                                     "few": {"step_counts": [1, 1]}}}),
        "funnel by cohort",
    );
    // Flight: the tables stacked with a leading cohort column.
    let batches = node.flight_query(&funnel).unwrap();
    let labels: Vec<Option<String>> = rows(&batches).map(|(b, r)| text(b, "cohort", r)).collect();
    assert_eq!(labels.len(), 6, "{labels:?}");
    assert_eq!(
        labels
            .iter()
            .filter(|l| l.as_deref() == Some("buyers"))
            .count(),
        2
    );
    // A kind without filters, and a bad condition, are refused naming the field.
    let (status, answer) = node.query(
        &json!({"kind": "cohort", "cohorts": {"a": cohorts["buyers"]},
        "cohort_breakdown": cohorts}),
    );
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["error"]["field"], "cohort_breakdown", "{answer}");
    let (status, answer) = node.query(&json!({"kind": "trends", "date_range": range,
        "series": [{"event": "purchase"}], "cohort_breakdown": {"x": {"type": "event_count"}}}));
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer["error"]["field"]
            .as_str()
            .unwrap()
            .starts_with("cohort_breakdown.x"),
        "{answer}"
    );
}

/// One person's events read as several batches of one partition (sealed chunks are sliced per
/// event name) stay one unit: the plan must not spread a partition's batches over several
/// outputs, or the person would enter a funnel twice and never convert.
#[test]
fn a_person_in_several_batches_of_one_partition_is_one_unit() {
    let started = crate::support::in_process_node(8);
    let (runtime, node) = (&started.runtime, &started.node);
    let project = node.project("default").unwrap();
    let events = json!([
        {"user": "solo", "event": "view", "ts": "2024-09-01T10:00:00Z", "props": {}},
        {"user": "solo", "event": "buy", "ts": "2024-09-01T10:01:00Z", "props": {}},
        {"user": "solo", "event": "view", "ts": "2024-09-02T10:00:00Z", "props": {}},
    ]);
    runtime.block_on(crate::support::ingest_case_events(
        node,
        &project,
        events.as_array().unwrap(),
        "solo",
    ));
    node.seal_all();
    let ask = |q: Value| {
        runtime
            .block_on(node.query.insight(&project, q.to_string().as_bytes()))
            .unwrap()
            .json
    };
    let range = json!({"from": "2024-09-01", "to": "2024-09-02"});
    let funnel = ask(
        json!({"kind": "funnel", "date_range": range, "window_seconds": 3600,
        "steps": [{"event": "view"}, {"event": "buy"}]}),
    );
    assert_subset(&funnel["step_counts"], &json!([1, 1]), "funnel");
    let sticky = ask(json!({"kind": "stickiness", "date_range": range, "series": {}}));
    assert_subset(&sticky["histogram"], &json!([0, 1]), "stickiness");
}

/// Non-finite numeric strings are no numbers for numeric filters, and a bare date in
/// `is_date_exact` means that whole day in cohort property conditions as in event filters.
#[test]
fn non_finite_numbers_and_bare_dates_filter_alike_everywhere() {
    let node = TestNode::start();
    let events = json!([
        {"user": "n1", "event": "buy", "ts": "2024-10-01T10:00:00Z", "props": {"price": 10}},
        {"user": "n2", "event": "buy", "ts": "2024-10-01T11:00:00Z", "props": {"price": "NaN"}},
        {"user": "n3", "event": "buy", "ts": "2024-10-01T12:00:00Z",
         "props": {"price": "inf", "$set": {"signup": "2024-01-05T10:00:00Z"}}},
    ]);
    let (status, body) = node.post("/batch/", &posthog_batch(events.as_array().unwrap(), "nan"));
    assert_eq!(status, 200, "{body}");
    let (status, answer) = node.query(&json!({"kind": "trends",
        "date_range": {"from": "2024-10-01", "to": "2024-10-01"},
        "series": [{"id": "B", "event": "buy"}],
        "filters": [{"key": "price", "op": "gt", "value": 5}]}));
    assert_eq!(status, 200, "{answer}");
    assert_subset(&answer["totals"], &json!({"B": 1}), "price > 5");
    let (status, answer) = node.query(&json!({"kind": "cohort",
        "evaluate_at": "2024-10-02T00:00:00Z", "cohorts": {"jan5": {"type": "property",
        "filter": {"key": "signup", "op": "is_date_exact", "value": "2024-01-05"}}}}));
    assert_eq!(status, 200, "{answer}");
    assert_subset(
        &answer["members"],
        &json!({"jan5": ["n3"]}),
        "signup on Jan 5",
    );
}
