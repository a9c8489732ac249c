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

#[test]
fn trends_wau_mau_rolling_windows() {
    check_case("trends_wau_mau_rolling_windows");
}

#[test]
fn trends_property_math_with_dirty_values() {
    check_case("trends_property_math_with_dirty_values");
}

#[test]
fn trends_formula_conversion_ratio() {
    check_case("trends_formula_conversion_ratio");
}

#[test]
fn trends_compare_to_previous_period() {
    check_case("trends_compare_to_previous_period");
}

fn ev(user: &str, event: &str, ts: &str, props: Value) -> Value {
    json!({"user": user, "event": event, "ts": ts, "props": props})
}

/// Both answers of a query (HTTP, and Flight back in the JSON shape), checked against the
/// same expectation.
fn check_both(node: &TestNode, query: &Value, expected: &Value, what: &str) -> Value {
    let (status, answer) = node.query(query);
    assert_eq!(status, 200, "{what}: {answer}");
    assert_answer(&answer, expected, what);
    let flight = arrow_to_json(&node.flight_query(query).expect("flight query"));
    assert_answer(&flight, expected, &format!("{what} (Flight)"));
    answer
}

#[test]
fn display_modes_sessions_and_per_user_math_follow_the_spec_examples() {
    let node = TestNode::start();
    // §2.8: daily signups [2, 2, 0, 3] by [2, 2, 0, 2] distinct users.
    let signups = [
        ("u1", "2024-06-01T10:00:00Z"),
        ("u2", "2024-06-01T11:00:00Z"),
        ("u2", "2024-06-02T10:00:00Z"),
        ("u3", "2024-06-02T11:00:00Z"),
        ("u1", "2024-06-04T10:00:00Z"),
        ("u4", "2024-06-04T11:00:00Z"),
        ("u4", "2024-06-04T12:00:00Z"),
    ];
    let events: Vec<Value> = signups
        .iter()
        .map(|(u, ts)| ev(u, "signup", ts, json!({})))
        .collect();
    ingest(&node, &events, "signup");
    let q = |display: Value| {
        let mut q = json!({"kind": "trends", "date_range": {"from": "2024-06-01", "to": "2024-06-04"},
            "series": [{"id": "T", "event": "signup"}, {"id": "U", "event": "signup", "math": "unique_users"}]});
        for (k, v) in display.as_object().unwrap() {
            q[k] = v.clone();
        }
        q
    };
    check_both(
        &node,
        &q(json!({})),
        &json!({"series": {"T": [2, 2, 0, 3], "U": [2, 2, 0, 2]}, "totals": {"T": 7, "U": 4}}),
        "linear",
    );
    check_both(
        &node,
        &q(json!({"display": "cumulative"})),
        &json!({"series": {"T": [2, 4, 4, 7], "U": [2, 3, 3, 4]}, "totals": {"T": 7, "U": 4}}),
        "cumulative",
    );
    check_both(
        &node,
        &q(json!({"display": "moving_average", "smoothing_intervals": 2})),
        &json!({"series": {"T": [2, 2, 1, 1.5], "U": [2, 2, 1, 1]}, "totals": {"T": 7, "U": 4}}),
        "moving average",
    );
    // Logarithmic display: the empty day is a gap, totals stay.
    check_both(
        &node,
        &q(json!({"log_scale": true})),
        &json!({"series": {"T": [2, 2, null, 3]}, "totals": {"T": 7}}),
        "log scale",
    );

    // §2.3 example 2.C: per-user counts 3, 1, 2, 4 and sums 600, 50, 150, 40.
    let plays = [
        ("u1", 100),
        ("u1", 200),
        ("u1", 300),
        ("u2", 50),
        ("u3", 60),
        ("u3", 90),
        ("u4", 10),
        ("u4", 10),
        ("u4", 10),
        ("u4", 10),
    ];
    let events: Vec<Value> = plays
        .iter()
        .map(|(u, d)| {
            ev(
                u,
                "song_played",
                "2024-07-01T10:00:00Z",
                json!({"duration": d}),
            )
        })
        .collect();
    ingest(&node, &events, "songs");
    let series = json!([
        {"id": "avg_count", "event": "song_played", "math": "avg_per_user"},
        {"id": "median_count", "event": "song_played", "math": "median_per_user"},
        {"id": "max_count", "event": "song_played", "math": "max_per_user", "per_user": "count"},
        {"id": "avg_sum", "event": "song_played", "math": "avg_per_user", "property": "duration"},
        {"id": "median_sum", "event": "song_played", "math": "median_per_user", "property": "duration", "per_user": "sum"},
        {"id": "max_avg", "event": "song_played", "math": "max_per_user", "property": "duration", "per_user": "avg"},
        {"id": "event_avg", "event": "song_played", "math": "avg", "property": "duration"},
    ]);
    check_both(
        &node,
        &json!({"kind": "trends", "date_range": {"from": "2024-06-30", "to": "2024-07-01"}, "series": series}),
        &json!({
            "series": {"avg_count": [null, 2.5], "event_avg": [null, 84]},
            "totals": {"avg_count": 2.5, "median_count": 2.5, "max_count": 4, "avg_sum": 210,
                       "median_sum": 100, "max_avg": 200, "event_avg": 84},
        }),
        "per-user math",
    );

    // Unique sessions: distinct `$session_id` values, unset and empty ones skipped.
    let events = vec![
        ev(
            "u1",
            "hit",
            "2024-08-01T10:00:00Z",
            json!({"$session_id": "s1"}),
        ),
        ev(
            "u1",
            "hit",
            "2024-08-01T10:05:00Z",
            json!({"$session_id": "s1"}),
        ),
        ev(
            "u2",
            "hit",
            "2024-08-01T11:00:00Z",
            json!({"$session_id": "s2"}),
        ),
        ev(
            "u2",
            "hit",
            "2024-08-01T12:00:00Z",
            json!({"$session_id": ""}),
        ),
        ev("u3", "hit", "2024-08-01T12:00:00Z", json!({})),
        ev(
            "u1",
            "hit",
            "2024-08-02T09:00:00Z",
            json!({"$session_id": "s1"}),
        ),
        ev(
            "u3",
            "hit",
            "2024-08-02T10:00:00Z",
            json!({"$session_id": "s3"}),
        ),
    ];
    ingest(&node, &events, "sessions");
    check_both(
        &node,
        &json!({"kind": "trends", "date_range": {"from": "2024-08-01", "to": "2024-08-02"},
                "series": [{"id": "S", "event": "hit", "math": "unique_sessions"}]}),
        &json!({"series": {"S": [2, 2]}, "totals": {"S": 3}}),
        "unique sessions",
    );
    check_both(
        &node,
        &json!({"kind": "trends", "date_range": {"from": "2024-08-01", "to": "2024-08-02"}, "display": "cumulative",
                "series": [{"id": "S", "event": "hit", "math": "unique_sessions"}]}),
        &json!({"series": {"S": [2, 3]}, "totals": {"S": 3}}),
        "cumulative sessions",
    );
}

#[test]
fn formulas_match_breakdown_values_by_key_and_divide_by_zero_as_asked() {
    let node = TestNode::start();
    // Viewers per browser: Chrome u1 u2 u3 u4, Safari u5 u6, Edge u7; buyers: Chrome u1, Safari
    // u5 u6, Firefox u8 (who viewed nothing).
    let mut events = Vec::new();
    for (u, browser) in [
        ("u1", "Chrome"),
        ("u2", "Chrome"),
        ("u3", "Chrome"),
        ("u4", "Chrome"),
        ("u5", "Safari"),
        ("u6", "Safari"),
        ("u7", "Edge"),
    ] {
        events.push(ev(
            u,
            "view",
            "2024-09-01T10:00:00Z",
            json!({"browser": browser}),
        ));
    }
    for (u, browser) in [
        ("u1", "Chrome"),
        ("u5", "Safari"),
        ("u6", "Safari"),
        ("u8", "Firefox"),
    ] {
        events.push(ev(
            u,
            "buy",
            "2024-09-01T11:00:00Z",
            json!({"browser": browser}),
        ));
    }
    ingest(&node, &events, "formula");
    let query = json!({"kind": "trends", "date_range": {"from": "2024-09-01", "to": "2024-09-02"},
        "series": [{"id": "B", "event": "buy", "math": "unique_users"}, {"id": "V", "event": "view", "math": "unique_users"}],
        "formula": "B / V * 100", "divide_by_zero": "zero",
        "breakdown": {"property": "browser"}});
    let answer = check_both(
        &node,
        &query,
        &json!({"formula": [400.0 / 7.0, 0], "formula_total": 400.0 / 7.0}),
        "formula",
    );
    let rows: Vec<(String, Value)> = answer["breakdown"]["formula"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["value"].as_str().unwrap().to_string(), r["total"].clone()))
        .collect();
    // Firefox had buyers and no viewers: a division by zero, 0 as asked; Edge no buyers: 0.
    assert_eq!(
        rows,
        vec![
            ("Safari".to_string(), json!(100)),
            ("Chrome".to_string(), json!(25)),
            ("Firefox".to_string(), json!(0)),
            ("Edge".to_string(), json!(0)),
        ],
        "{answer}"
    );
}

#[test]
fn trends_options_are_refused_naming_the_field() {
    let node = TestNode::start();
    let base = json!({"kind": "trends", "date_range": {"from": "2024-01-01", "to": "2024-01-31"}});
    for (extra, field) in [
        (
            json!({"interval": "week", "series": [{"event": "e", "math": "weekly_active"}]}),
            "series[0].math",
        ),
        (
            json!({"series": [{"event": "e", "math": "p95"}]}),
            "series[0].property",
        ),
        (
            json!({"series": [{"event": "e"}, {"event": "e", "math": "total", "property": "x"}]}),
            "series[1].property",
        ),
        (
            json!({"series": [{"event": "e"}], "formula": "A / Z"}),
            "formula",
        ),
        (
            json!({"series": [{"event": "e"}], "formula": "A /* 2"}),
            "formula",
        ),
        (
            json!({"series": [{"event": "e"}], "formula": "A", "divide_by_zero": "inf"}),
            "divide_by_zero",
        ),
        (
            json!({"series": [{"event": "e"}], "display": "stacked"}),
            "display",
        ),
    ] {
        let mut query = base.clone();
        for (k, v) in extra.as_object().unwrap() {
            query[k] = v.clone();
        }
        let (status, body) = node.query(&query);
        assert_eq!(status, 400, "{query}: {body}");
        assert_eq!(body["error"]["field"], field, "{query}: {body}");
    }
}
