//! Bad input gets a clear 4xx with a JSON body naming the problem, and nothing of a rejected
//! batch is stored.

use optiprism_testkit::{API_TOKEN, TestNode, WRITE_KEY};
use serde_json::{Value, json};
use std::io::Write;

fn count_events(node: &TestNode) -> u64 {
    let (status, answer) = node.query(&json!({
        "kind": "trends", "date_range": {"from": "2020-01-01", "to": "2030-12-31"}, "interval": "month",
        "series": [{"math": "total"}],
    }));
    assert_eq!(status, 200, "{answer}");
    answer["totals"]["A"].as_u64().unwrap()
}

fn track(user: &str, event: &str, id: &str) -> Value {
    json!({"type": "track", "userId": user, "event": event, "messageId": id, "timestamp": "2024-01-01T00:00:00Z"})
}

#[test]
fn ingestion_rejects_bad_input_and_stores_nothing_of_it() {
    let node = TestNode::start();
    // Unknown or missing key: 401 with a JSON error.
    let (status, body) = node.post_raw(
        "/v1/batch",
        br#"{"batch":[{"type":"track","userId":"u","event":"e"}]}"#.to_vec(),
        &[],
    );
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"]["code"], "unauthorized");
    let (status, body) = node.post_raw(
        "/batch/",
        br#"{"api_key":"nope","batch":[{"event":"e","distinct_id":"d"}]}"#.to_vec(),
        &[],
    );
    assert_eq!(status, 401, "{body}");

    // Malformed JSON and invalid UTF-8: 400 naming the problem.
    let (status, body) = node.post_raw("/v1/batch", b"{not json".to_vec(), &[]);
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("JSON"),
        "{body}"
    );
    let mut invalid_utf8 =
        br#"{"writeKey":"x","batch":[{"type":"track","userId":"u","event":"#.to_vec();
    invalid_utf8.extend_from_slice(&[b'"', 0xff, 0xfe, b'"', b'}', b']', b'}']);
    let (status, body) = node.post_raw("/v1/batch", invalid_utf8, &[]);
    assert_eq!(status, 400, "{body}");

    // A batch with bad events: 400, every bad one named by index, the good ones not stored.
    let batch = json!({"writeKey": WRITE_KEY, "batch": [
        track("u1", "ok", "good-1"),
        {"type": "track", "userId": "u1", "messageId": "no-event"},
        {"type": "track", "event": "x", "messageId": "no-user"},
        {"type": "track", "userId": "u1", "event": "old", "timestamp": "1970-01-01T00:00:00Z"},
        {"type": "track", "userId": "u1", "event": "big", "properties": {"blob": "x".repeat(40_000)}},
        track("u2", "ok", "good-2"),
    ]});
    let (status, body) = node.post_raw("/v1/batch", serde_json::to_vec(&batch).unwrap(), &[]);
    assert_eq!(status, 400, "{body}");
    let indexes: Vec<u64> = body["error"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["index"].as_u64().unwrap())
        .collect();
    assert_eq!(indexes, [1, 2, 3, 4], "{body}");
    let messages: Vec<&str> = body["error"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["error"].as_str().unwrap())
        .collect();
    assert!(
        messages[0].contains("`event`") && messages[1].contains("userId"),
        "{messages:?}"
    );
    assert!(
        messages[2].contains("outside the accepted range") && messages[3].contains("limit"),
        "{messages:?}"
    );
    assert_eq!(
        count_events(&node),
        0,
        "nothing of a rejected batch may be stored"
    );

    // A body over the batch limit: 413 with a JSON body.
    let huge = json!({"writeKey": WRITE_KEY, "batch": (0..40).map(|i| json!({"type":"track","userId":"u","event":"e","messageId":i.to_string(),"properties":{"p":"y".repeat(20_000)}})).collect::<Vec<_>>()});
    let (status, body) = node.post_raw("/v1/batch", serde_json::to_vec(&huge).unwrap(), &[]);
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["error"]["code"], "too_large");
    assert_eq!(count_events(&node), 0);

    // Good batches are stored once, however often they are retried.
    let good =
        json!({"writeKey": WRITE_KEY, "batch": [track("u1", "ok", "g1"), track("u2", "ok", "g2")]});
    for attempt in 0..3 {
        let (status, body) = node.post("/v1/batch", &good);
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            body["duplicates"].as_u64(),
            Some(if attempt == 0 { 0 } else { 2 }),
            "{body}"
        );
    }
    assert_eq!(count_events(&node), 2);
}

#[test]
fn gzip_cors_and_posthog_shapes_are_accepted() {
    let node = TestNode::start();
    let body = serde_json::to_vec(&json!({"api_key": WRITE_KEY, "batch": [
        {"event": "g", "distinct_id": "d1", "uuid": "z1", "timestamp": "2024-01-01T00:00:00Z"},
    ]}))
    .unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&body).unwrap();
    let gz = gz.finish().unwrap();
    // With and without Content-Encoding.
    let (status, answer) = node.post_raw("/batch/", gz.clone(), &[("content-encoding", "gzip")]);
    assert_eq!(status, 200, "{answer}");
    let (status, answer) = node.post_raw("/e/", gz, &[("content-type", "text/plain")]);
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["duplicates"], 1);
    // A single event and an array on the other capture paths.
    let single = json!({"event": "g", "distinct_id": "d2", "api_key": WRITE_KEY, "uuid": "z2", "timestamp": "2024-01-01T00:00:00Z"});
    assert_eq!(
        node.post_raw("/i/v0/e/", serde_json::to_vec(&single).unwrap(), &[])
            .0,
        200
    );
    let array = json!([{"event": "g", "distinct_id": "d3", "uuid": "z3", "properties": {"token": WRITE_KEY}, "timestamp": "2024-01-01T00:00:00Z"}]);
    assert_eq!(
        node.post_raw("/capture/", serde_json::to_vec(&array).unwrap(), &[])
            .0,
        200
    );
    // Segment's browser short path with `text/plain`, as analytics.js sends to avoid preflights.
    let t = json!({"writeKey": WRITE_KEY, "userId": "d4", "event": "g", "messageId": "z4", "timestamp": "2024-01-01T00:00:00Z"});
    assert_eq!(
        node.post_raw(
            "/v1/t",
            serde_json::to_vec(&t).unwrap(),
            &[("content-type", "text/plain")]
        )
        .0,
        200
    );
    assert_eq!(count_events_named(&node, "g"), 4);
    // CORS preflight.
    let client = reqwest::blocking::Client::new();
    let response = client
        .request(reqwest::Method::OPTIONS, format!("{}/v1/batch", node.http))
        .header("origin", "https://app.example.com")
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "content-type,authorization",
        )
        .send()
        .unwrap();
    assert!(response.status().is_success());
    assert!(
        response
            .headers()
            .get("access-control-allow-origin")
            .is_some()
    );
}

fn count_events_named(node: &TestNode, event: &str) -> u64 {
    let (_, answer) = node.query(&json!({
        "kind": "trends", "date_range": {"from": "2024-01-01", "to": "2024-01-01"},
        "series": [{"event": event}],
    }));
    answer["totals"]["A"].as_u64().unwrap()
}

#[test]
fn queries_reject_bad_tokens_and_name_bad_fields() {
    let node = TestNode::start();
    let client = reqwest::blocking::Client::new();
    let url = format!("{}/api/v1/projects/default/query", node.http);
    let response = client.post(&url).body("{}").send().unwrap();
    assert_eq!(response.status().as_u16(), 401);
    let response = client
        .post(&url)
        .bearer_auth("pat_wrong_token")
        .body("{}")
        .send()
        .unwrap();
    assert_eq!(response.status().as_u16(), 401);
    let response = client
        .post(format!("{}/api/v1/projects/other/query", node.http))
        .bearer_auth(API_TOKEN)
        .body("{}")
        .send()
        .unwrap();
    assert_eq!(response.status().as_u16(), 403);
    let (status, body) = node.query(&json!({"kind": "trends", "date_range": {"from": "2024-01-01", "to": "2024-01-02"}, "series": [{"event": "e", "math": "bogus"}]}));
    assert_eq!(status, 400);
    assert_eq!(body["error"]["field"], "series[0].math", "{body}");
    let (status, body) = node.query(&json!({"kind": "trends", "date_range": {"from": "2024-01-01", "to": "2024-01-02"}, "series": [{"event": "e", "filters": [{"key": "p", "op": "regex", "value": "(unclosed"}]}]}));
    assert_eq!(status, 400);
    assert_eq!(
        body["error"]["field"], "series[0].filters[0].value",
        "{body}"
    );
    // Over Flight: InvalidArgument naming the field.
    let err = node
        .flight_query(
            &json!({"kind": "trends", "date_range": {"from": "2024-01-01"}, "series": []}),
        )
        .unwrap_err();
    let text = format!("{err:#}");
    assert!(
        text.contains("InvalidArgument")
            || text.contains("invalid argument")
            || text.contains("Invalid argument"),
        "{text}"
    );
    assert!(text.contains("date_range.to"), "{text}");
    let err = node.sql("SELEC 1").unwrap_err();
    assert!(
        format!("{err:#}").to_lowercase().contains("invalid"),
        "{err:#}"
    );
    // Unknown routes are JSON too.
    let response = client.get(format!("{}/nope", node.http)).send().unwrap();
    assert_eq!(response.status().as_u16(), 404);
    assert!(
        response.json::<Value>().unwrap()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("/nope")
    );
}

/// JSON allows a key twice in one object, and SDKs do send it. The last value counts (as in
/// `JSON.parse`); before, both went into the event and the column held a row more than its
/// chunk, which panicked the partition's apply at its next seal, on every replica and again
/// on every replay.
#[test]
fn a_property_given_twice_keeps_its_last_value_through_a_seal_and_a_restart() {
    let mut node = TestNode::start();
    let body = format!(
        r#"{{"writeKey":"{WRITE_KEY}","batch":[
            {{"type":"track","userId":"u1","event":"paid","messageId":"dup-1","timestamp":"2024-01-01T00:00:00Z",
              "properties":{{"plan":"free","price":1,"plan":"pro","price":"n/a","note":"x","note":null}}}},
            {{"type":"track","userId":"u2","event":"paid","messageId":"dup-2","timestamp":"2024-01-01T00:00:00Z",
              "properties":{{"plan":"team","price":3}}}}]}}"#
    );
    let (status, answer) = node.post_raw("/v1/batch", body.into_bytes(), &[]);
    assert_eq!(status, 200, "{answer}");
    let plans = |node: &TestNode| {
        let sql = r#"SELECT "properties.plan" AS plan FROM events ORDER BY uuid"#;
        let batches = node.sql(sql).unwrap();
        let mut out = Vec::new();
        for b in &batches {
            let col = arrow::compute::cast(b.column(0), &arrow::datatypes::DataType::Utf8).unwrap();
            let col = col
                .as_any()
                .downcast_ref::<arrow::array::StringArray>()
                .unwrap();
            out.extend(col.iter().map(|v| v.map(str::to_string)));
        }
        out
    };
    // Unsealed rows, then sealed by an ordered shutdown and read back from disk.
    assert_eq!(plans(&node), [Some("pro".into()), Some("team".into())]);
    node.stop();
    node.restart();
    assert_eq!(plans(&node), [Some("pro".into()), Some("team".into())]);
    assert_eq!(count_events(&node), 2);
    assert!(node.is_running(), "{}", node.log());
}

/// The node's resident memory in MB.
fn resident_mb(node: &TestNode) -> u64 {
    let pid = node.pid().expect("the node runs");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb / 1024
}

/// Write keys are public in browser SDKs, so property names are whatever a client sends. Events
/// whose names are their own (an id used as a key) used to cost rows × distinct names, each a
/// column with a null in every other row: 1.9 MB of such JSON took a node from 65 MB to 744 MB.
/// Now a name too rare for a column of its own keeps its values in a sparse column: memory
/// follows the values, and every value still answers filters, breakdowns and SQL, unsealed and
/// after a restart has read it back from chunks.
#[test]
fn events_whose_property_names_are_their_own_cost_their_size_and_answer_queries() {
    let mut node = TestNode::start();
    let before = resident_mb(&node);
    let (requests, per_request) = (12, 1_500);
    for r in 0..requests {
        let batch: Vec<Value> = (0..per_request)
            .map(|i| {
                let n = r * per_request + i;
                let plan = if n % 2 == 0 { "free" } else { "pro" };
                json!({"type": "track", "userId": format!("u{}", n % 50), "event": "order",
                       "messageId": format!("wide-{n}"), "timestamp": "2024-01-01T00:00:00Z",
                       "properties": {format!("order_{n}"): n, "plan": plan}})
            })
            .collect();
        let (status, answer) =
            node.post("/v1/batch", &json!({"writeKey": WRITE_KEY, "batch": batch}));
        assert_eq!(status, 200, "{answer}");
    }
    let grown = resident_mb(&node).saturating_sub(before);
    assert!(grown < 120, "the node grew by {grown} MB for 18,000 events");
    // The first request again beside 10 new events: the duplicates are filtered out of the
    // proposal's rows, sparse column and all.
    let batch: Vec<Value> = (0..per_request + 10)
        .map(|i| {
            let n = if i < per_request { i } else { 100_000 + i };
            json!({"type": "track", "userId": format!("u{}", n % 50), "event": "order", "messageId": format!("wide-{n}"),
                   "timestamp": "2024-01-01T00:00:00Z", "properties": {format!("order_{n}"): n, "plan": "pro"}})
        })
        .collect();
    let (status, answer) = node.post("/v1/batch", &json!({"writeKey": WRITE_KEY, "batch": batch}));
    assert_eq!(status, 200, "{answer}");
    let answers = |node: &TestNode| {
        let (status, filtered) = node.query(&json!({
            "kind": "trends", "date_range": {"from": "2024-01-01", "to": "2024-01-01"}, "interval": "day",
            "series": [{"event": "order", "math": "total", "filters": [{"key": "order_9001", "op": "gte", "value": 9000}]}],
        }));
        assert_eq!(status, 200, "{filtered}");
        let (status, broken_down) = node.query(&json!({
            "kind": "trends", "date_range": {"from": "2024-01-01", "to": "2024-01-01"}, "interval": "day",
            "series": [{"event": "order", "math": "total"}], "breakdown": {"property": "order_17"},
        }));
        assert_eq!(status, 200, "{broken_down}");
        let batches = node
            .sql(r#"SELECT count(*), count("properties.order_17000"), sum("properties.order_7000"), count("properties.plan") FROM events"#)
            .unwrap();
        let row: Vec<String> = batches[0]
            .columns()
            .iter()
            .map(|c| arrow::util::display::array_value_to_string(c, 0).unwrap())
            .collect();
        (
            filtered["totals"]["A"].clone(),
            broken_down["breakdown"]["series"]["A"].clone(),
            row,
        )
    };
    let (filtered, broken_down, row) = answers(&node);
    assert_eq!(filtered, json!(1));
    assert_eq!(row, ["18010", "1", "7000.0", "18010"]);
    // The schema took `plan` and 9,999 of the names (`ingest.max-property-keys`); the values of
    // the other 8,011 are stored as text.
    let (_, metrics) = node.get("/metrics");
    assert!(
        metrics.contains("\noptiprism_node_ingest_keys_over_limit_total 8011\n"),
        "{metrics}"
    );
    assert_eq!(
        broken_down,
        json!([{"value": "(none)", "values": [18_009], "total": 18_009},
               {"value": "17", "values": [1], "total": 1}])
    );
    // Sealed by an ordered shutdown and read back from disk.
    node.stop();
    node.restart();
    assert_eq!(answers(&node), (filtered, broken_down, row));
}

/// A project's schema holds at most `ingest.max-property-keys` keys. Keys first seen after that
/// do not join it: their values are stored as text and still answer queries (numeric filters
/// coerce numeric text), and `/metrics` counts them.
#[test]
fn keys_past_the_schema_limit_are_stored_as_text_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("prism.toml");
    std::fs::write(&config, "[ingest]\nmax-property-keys = 3\n").unwrap();
    let node = TestNode::start_with(&["--config", config.to_str().unwrap()]);
    let send = |id: &str, props: Value| {
        let event = json!({"type": "track", "userId": "u1", "event": "paid", "messageId": id,
                           "timestamp": "2024-01-01T00:00:00Z", "properties": props});
        let (status, answer) = node.post(
            "/v1/batch",
            &json!({"writeKey": WRITE_KEY, "batch": [event]}),
        );
        assert_eq!(status, 200, "{answer}");
    };
    send("k-1", json!({"a": 1, "b": 2}));
    // `c` fills the schema; `d` and `e` are past it.
    send("k-2", json!({"c": 3, "d": 4, "e": "five"}));
    send("k-3", json!({"a": 10, "d": 40}));
    let (status, metrics) = node.get("/metrics");
    assert_eq!(status, 200);
    let counted = metrics
        .lines()
        .find_map(|l| l.strip_prefix("optiprism_node_ingest_keys_over_limit_total "))
        .unwrap_or_else(|| panic!("no over-limit counter in {metrics}"));
    // `d` and `e` in the second request, `d` again in the third.
    assert_eq!(counted, "3");
    let batches = node
        .sql(r#"SELECT arrow_typeof("properties.a"), arrow_typeof("properties.d"), CAST("properties.d" AS VARCHAR), CAST("properties.e" AS VARCHAR) FROM events WHERE "properties.d" IS NOT NULL ORDER BY uuid"#)
        .unwrap();
    let rows: Vec<Vec<String>> = batches
        .iter()
        .flat_map(|b| {
            (0..b.num_rows()).map(move |r| {
                b.columns()
                    .iter()
                    .map(|c| arrow::util::display::array_value_to_string(c, r).unwrap())
                    .collect()
            })
        })
        .collect();
    let text = "Dictionary(Int32, Utf8)";
    assert_eq!(
        rows,
        [
            vec!["Float64", text, "4", "five"],
            vec!["Float64", text, "40", ""]
        ]
    );
    let (status, answer) = node.query(&json!({
        "kind": "trends", "date_range": {"from": "2024-01-01", "to": "2024-01-01"}, "interval": "day",
        "series": [{"event": "paid", "math": "total", "filters": [{"key": "d", "op": "gte", "value": 5}]}],
    }));
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["totals"]["A"], json!(1), "{answer}");
}
