//! The trends cases of `spec/cases/analytics.json` that this build answers, end to end:
//! events in through HTTP ingestion, answers out through HTTP and through Arrow Flight.

use crate::support::{arrow_to_json, assert_answer, assert_json_numbers, case, posthog_batch};
use optiprism_testkit::TestNode;
use serde_json::{Value, json};

fn ingest(node: &TestNode, events: &[Value], prefix: &str) {
    let (status, body) = node.post("/batch/", &posthog_batch(events, prefix));
    assert_eq!(status, 200, "ingest: {body}");
    assert_eq!(
        body["accepted"].as_u64(),
        Some(events.len() as u64),
        "{body}"
    );
}

fn check_case(name: &str) {
    let c = case(name);
    let node = TestNode::start();
    ingest(&node, c["events"].as_array().unwrap(), name);
    let (status, answer) = node.query(&c["query"]);
    assert_eq!(status, 200, "{name}: {answer}");
    assert_answer(&answer, &c["expected"], name);
    let batches = node.flight_query(&c["query"]).expect("flight query");
    assert_answer(
        &arrow_to_json(&batches),
        &c["expected"],
        &format!("{name} (Flight)"),
    );
}

#[test]
fn trends_total_vs_unique_users_daily_utc() {
    check_case("trends_total_vs_unique_users_daily_utc");
}

#[test]
fn trends_filter_operators_null_semantics() {
    check_case("trends_filter_operators_null_semantics");
}

#[test]
fn identity_merge_effects_on_trends() {
    // The case's trends part: unique page viewers and DAU after `$identify` merges (its funnel
    // part belongs to the funnel engine).
    let c = case("identity_merge_effects");
    let node = TestNode::start();
    ingest(&node, c["events"].as_array().unwrap(), "identity");
    let query = json!({
        "kind": "trends", "timezone": "UTC",
        "date_range": c["query"]["date_range"],
        "interval": "day",
        "series": [{"id": "V", "event": "pageview", "math": "unique_users"}],
    });
    let (status, answer) = node.query(&query);
    assert_eq!(status, 200, "{answer}");
    assert_json_numbers(
        &answer["totals"]["V"],
        &c["expected"]["pageview_unique_users_total"],
        "unique viewers",
    );
    assert_json_numbers(
        &answer["series"]["V"],
        &c["expected"]["pageview_dau"],
        "DAU",
    );
    let flight = arrow_to_json(&node.flight_query(&query).unwrap());
    assert_json_numbers(
        &flight["totals"]["V"],
        &c["expected"]["pageview_unique_users_total"],
        "unique viewers (Flight)",
    );
    // And SQL sees the merged person: the three ids of U1 are one person.
    let batches = node
        .sql("SELECT count(DISTINCT person_id) AS persons FROM events")
        .unwrap();
    let persons =
        arrow::compute::cast(batches[0].column(0), &arrow::datatypes::DataType::Int64).unwrap();
    assert_eq!(
        persons
            .as_any()
            .downcast_ref::<arrow::array::Int64Array>()
            .unwrap()
            .value(0),
        2
    );
}

#[test]
fn time_zones_and_breakdowns_follow_the_spec_examples() {
    let node = TestNode::start();
    // §2.7: the same events in New York and in UTC.
    let events: Vec<Value> = [
        "2024-03-01T03:00:00Z",
        "2024-03-01T09:00:00Z",
        "2024-03-02T02:30:00Z",
        "2024-03-02T06:00:00Z",
        "2024-03-04T02:00:00Z",
    ]
    .iter()
    .map(|ts| json!({"user": "u1", "event": "tz", "ts": ts, "props": {}}))
    .collect();
    ingest(&node, &events, "tz");
    let q = |tz: &str| json!({"kind": "trends", "timezone": tz, "date_range": {"from": "2024-03-01", "to": "2024-03-03"}, "series": [{"event": "tz"}]});
    let (_, ny) = node.query(&q("America/New_York"));
    assert_json_numbers(&ny["series"]["A"], &json!([2, 1, 1]), "New York");
    let (_, utc) = node.query(&q("UTC"));
    assert_json_numbers(&utc["series"]["A"], &json!([2, 2, 0]), "UTC");
    // Hourly buckets, labelled with their local offset.
    let (_, hourly) = node.query(
        &json!({"kind": "trends", "timezone": "America/New_York", "interval": "hour",
        "date_range": {"from": "2024-03-01", "to": "2024-03-01"}, "series": [{"event": "tz"}]}),
    );
    let values = hourly["series"]["A"].as_array().unwrap();
    assert_eq!(values.len(), 24);
    assert_eq!(hourly["buckets"][4], "2024-03-01T04:00:00-05:00");
    assert_eq!(
        (values[4].as_f64(), values[21].as_f64()),
        (Some(1.0), Some(1.0)),
        "{hourly}"
    );
    assert_json_numbers(&hourly["totals"]["A"], &json!(2), "hourly total");
    // §2.5, example 2.D: top 2 browsers plus (other), for totals and unique users.
    let views = [
        ("u1", "Chrome"),
        ("u1", "Chrome"),
        ("u2", "Chrome"),
        ("u3", "Chrome"),
        ("u1", "Safari"),
        ("u4", "Safari"),
        ("u5", "Safari"),
        ("u6", "Firefox"),
        ("u6", "Firefox"),
        ("u7", "Edge"),
        ("u8", ""),
        ("u9", ""),
    ];
    let events: Vec<Value> = views
        .iter()
        .map(|(u, b)| {
            let props = if b.is_empty() {
                json!({})
            } else {
                json!({"browser": b})
            };
            json!({"user": u, "event": "view", "ts": "2024-05-01T10:00:00Z", "props": props})
        })
        .collect();
    ingest(&node, &events, "bd");
    let q = |math: &str| json!({"kind": "trends", "date_range": {"from": "2024-05-01", "to": "2024-05-01"}, "series": [{"event": "view", "math": math}], "breakdown": {"property": "browser", "limit": 2}});
    let expect = |answer: &Value, expected: &[(&str, f64)]| {
        let got: Vec<(String, f64)> = answer["breakdown"]["series"]["A"]
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
        let want: Vec<(String, f64)> = expected.iter().map(|(v, n)| (v.to_string(), *n)).collect();
        assert_eq!(got, want, "{answer}");
    };
    let (_, totals) = node.query(&q("total"));
    expect(
        &totals,
        &[("Chrome", 4.0), ("Safari", 3.0), ("(other)", 5.0)],
    );
    assert_json_numbers(&totals["totals"]["A"], &json!(12), "unbroken total");
    let (_, uniques) = node.query(&q("unique_users"));
    expect(
        &uniques,
        &[("Chrome", 3.0), ("Safari", 3.0), ("(other)", 4.0)],
    );
    assert_json_numbers(&uniques["totals"]["A"], &json!(9), "unbroken uniques");
}
