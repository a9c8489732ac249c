//! Three real `prism node` processes replicating every partition over QUIC: events sent to one
//! node are answered identically by the others and by a single node given the same events, and
//! killing the busiest leader during ingestion loses and doubles no acknowledged event (with
//! property keys too rare for columns of their own among the events). A busy
//! partition gathers requests within `ingest.linger` into one entry; an idle one does not wait.

use crate::support::uuid_counts;
use optiprism_testkit::{TestCluster, TestNode, eventually, incompressible_batch};
use serde_json::{Value, json};
use std::collections::BTreeSet;

/// `n` Segment messages from `users` users over three days, with a browser on most.
fn messages(prefix: &str, n: usize, users: usize) -> Vec<Value> {
    (0..n)
        .map(|i| {
            let browser = ["Chrome", "Firefox", "Safari"][i % 3];
            let event = ["signup", "pageview", "purchase"][(i / 7) % 3];
            let mut m = json!({
                "type": "track",
                "event": event,
                "userId": format!("{prefix}-user-{}", (i * 7919) % users),
                "messageId": format!("{prefix}-{i}"),
                "timestamp": format!("2024-03-{:02}T{:02}:00:00Z", 1 + i % 3, i % 24),
                "properties": {"$browser": browser, "price": (i % 50) as f64},
            });
            if i % 10 == 9 {
                m["properties"] = json!({"price": 1.0});
            }
            // Keys too rare for columns of their own: one in 50 events has a referrer, and one
            // in 97 a coupon key of its own.
            if i % 50 == 3 {
                m["properties"]["ref"] = json!(["mail", "ads"][(i / 50) % 2]);
            }
            if i % 97 == 0 {
                m["properties"][format!("coupon_{i}")] = json!(i);
            }
            m
        })
        .collect()
}

fn queries() -> Vec<Value> {
    let range = json!({"from": "2024-03-01", "to": "2024-03-03"});
    vec![
        json!({"kind": "trends", "date_range": range, "interval": "day",
               "series": [{"event": "pageview", "math": "total"}]}),
        json!({"kind": "trends", "date_range": range, "interval": "day",
               "series": [{"math": "unique_users"}], "breakdown": {"property": "$browser"}}),
        json!({"kind": "trends", "date_range": range, "interval": "hour", "timezone": "America/New_York",
               "series": [{"event": "purchase", "math": "unique_users",
                           "filters": [{"key": "price", "op": "gt", "value": 10}]}]}),
        json!({"kind": "trends", "date_range": range, "interval": "day",
               "series": [{"math": "total", "filters": [{"key": "coupon_194", "op": "is_set"}]}],
               "breakdown": {"property": "ref"}}),
    ]
}

/// Runs a query, retrying while the node answers 503 (a leader change under way: the retryable
/// error a query may get instead of an answer).
fn query_when_available(node: &TestNode, query: &Value) -> (u16, Value) {
    for _ in 0..300 {
        let (status, answer) = node.query(query);
        if status != 503 {
            return (status, answer);
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    panic!("node answered 503 for a minute");
}

fn send(node: &TestNode, batch: &[Value]) -> (u16, Value) {
    node.post("/v1/batch", &json!({ "batch": batch }))
}

#[test]
fn events_sent_to_one_member_are_answered_by_every_member_as_by_a_single_node() {
    let cluster = TestCluster::start(3, 4);
    let single = TestNode::start();
    let events = messages("a", 900, 60);
    for batch in events.chunks(100) {
        let (status, body) = send(cluster.node(2), batch);
        assert_eq!(status, 200, "{body}\n{}", cluster.logs());
        assert_eq!(send(&single, batch).0, 200);
    }
    for query in queries() {
        let (status, expected) = single.query(&query);
        assert_eq!(status, 200, "{expected}");
        // Over HTTP from node 3, and as a Flight ticket from node 1.
        let (status, answer) = query_when_available(cluster.node(3), &query);
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer, expected, "node 3 differs for {query}");
        let flight = cluster.node(1).flight_query(&query).unwrap();
        let single_flight = single.flight_query(&query).unwrap();
        assert_eq!(
            crate::support::arrow_to_json(&flight),
            crate::support::arrow_to_json(&single_flight),
            "node 1 over Flight differs for {query}"
        );
    }
    // The rare-key query found its one event (so the equality above says something).
    let (_, coupon) = single.query(&queries()[3]);
    assert_eq!(coupon["totals"]["A"], json!(1), "{coupon}");
    // Flight SQL on node 2 sees the same rows, rare keys' values included.
    let count = |node: &TestNode| uuid_counts(node).len();
    assert_eq!(count(cluster.node(2)), 900);
    assert_eq!(count(&single), 900);
    let rare = |node: &TestNode| {
        let sql = r#"SELECT CAST("properties.ref" AS VARCHAR) AS r, count(*), count("properties.coupon_97"), sum("properties.coupon_873") FROM events GROUP BY r ORDER BY r"#;
        let mut rows = Vec::new();
        for b in node.sql(sql).unwrap() {
            for r in 0..b.num_rows() {
                let row: Vec<String> = b
                    .columns()
                    .iter()
                    .map(|c| arrow::util::display::array_value_to_string(c, r).unwrap())
                    .collect();
                rows.push(row.join(","));
            }
        }
        rows
    };
    let expected = rare(&single);
    assert_eq!(expected, ["ads,9,0,", "mail,9,0,", ",882,1,873.0"]);
    assert_eq!(rare(cluster.node(2)), expected);
    // What operators scrape: node 2 took the events, node 3 answered the HTTP queries, and
    // every group's leader changes are counted from the first election.
    let metric = |id: u64, line: &str| -> u64 {
        let text = cluster.node(id).get("/metrics").1;
        text.lines()
            .find_map(|l| l.strip_prefix(line)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no `{line}` in\n{text}"))
    };
    assert_eq!(metric(2, "optiprism_node_ingest_accepted_total "), 900);
    assert!(metric(3, "optiprism_node_query_duration_seconds_count ") >= 3);
    assert!(
        metric(
            3,
            "optiprism_node_query_duration_seconds_bucket{le=\"+Inf\"} "
        ) >= 3
    );
    assert_eq!(metric(1, "optiprism_node_proposals_failed_total "), 0);
    for group in ["metadata", "partition-0", "partition-3"] {
        let line = format!("optiprism_consensus_leader_changes_total{{group=\"{group}\"}} ");
        assert!(metric(1, &line) >= 1, "{group}");
    }
}

#[test]
fn killing_the_busiest_leader_during_ingestion_loses_and_doubles_no_acknowledged_event() {
    let mut cluster = TestCluster::start(3, 4);
    let victim = cluster.busiest_leader();
    let sender = if victim == 2 { 3 } else { 2 };
    let reader = 6 - victim - sender;
    let events = messages("k", 3_000, 200);
    let mut acknowledged: BTreeSet<String> = BTreeSet::new();
    for (i, batch) in events.chunks(50).enumerate() {
        if i == 20 {
            cluster.node_mut(victim).kill9();
        }
        // Retry until acknowledged: 503 during the election, or a connection reset.
        let mut attempts = 0;
        loop {
            let (status, body) = send(cluster.node(sender), batch);
            if status == 200 {
                break;
            }
            assert!(
                status == 503 || status == 0,
                "unexpected {status}: {body}\n{}",
                cluster.logs()
            );
            attempts += 1;
            assert!(
                attempts < 300,
                "no leader after a minute:\n{}",
                cluster.logs()
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        acknowledged.extend(
            batch
                .iter()
                .map(|m| m["messageId"].as_str().unwrap().into()),
        );
    }
    // The kill mattered: the victim led groups, and the survivors come to lead all five
    // (requests meanwhile waited for the new leaders or were refused as retryable).
    let led_by_survivors = || -> usize {
        [sender, reader]
            .iter()
            .map(|&id| {
                cluster
                    .node(id)
                    .get("/metrics")
                    .1
                    .lines()
                    .filter(|l| {
                        l.starts_with("optiprism_consensus_is_leader{") && l.ends_with(" 1")
                    })
                    .count()
            })
            .sum()
    };
    eventually(|| cluster.logs(), || led_by_survivors() == 5);
    // Every acknowledged event is stored exactly once, as the surviving reader sees it.
    let mut seen = BTreeSet::new();
    for (uuid, n) in uuid_counts(cluster.node(reader)) {
        assert_eq!(n, 1, "{uuid} stored {n} times");
        seen.insert(uuid);
    }
    let lost: Vec<_> = acknowledged.difference(&seen).take(5).collect();
    assert!(lost.is_empty(), "acknowledged but lost: {lost:?}");
    // And the killed node, restarted, catches up to the same answer.
    cluster.node_mut(victim).restart();
    let query = &queries()[1];
    let (_, expected) = query_when_available(cluster.node(reader), query);
    let (status, answer) = query_when_available(cluster.node(victim), query);
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer, expected);
}

#[test]
fn a_member_restarted_after_the_log_moved_past_it_catches_up_from_a_snapshot() {
    // Snapshots every 10 entries, 2 kept behind: the log moves past a stopped member quickly.
    let mut cluster = TestCluster::start_with(
        3,
        2,
        "snapshot-every-entries = 10\nkeep-entries-after-snapshot = 2",
    );
    let events = messages("s", 2_400, 150);
    let (early, late) = events.split_at(300);
    for batch in early.chunks(50) {
        assert_eq!(send(cluster.node(1), batch).0, 200);
    }
    let behind = cluster.gauge(3, "optiprism_consensus_applied_index", "partition-0");
    cluster.node_mut(3).kill9();
    for batch in late.chunks(50) {
        let (status, body) = send(cluster.node(1), batch);
        assert_eq!(status, 200, "{body}\n{}", cluster.logs());
    }
    // Keep writing until the leader has purged its log past what node 3 holds (it postpones
    // purging while a replication to node 3 is in flight): appends cannot bring node 3 back.
    // Both others, as either may lead by the time node 3 is back (with only one purged, node
    // 3 caught up from the other's log now and then, and held no snapshot).
    let purged_past_node_3 = |cluster: &TestCluster| {
        let purged: Vec<u64> = (1..=2)
            .filter_map(|id| cluster.gauge(id, "optiprism_consensus_purged_index", "partition-0"))
            .collect();
        purged
            .iter()
            .min()
            .copied()
            .filter(|&p| purged.len() == 2 && Some(p) > behind)
    };
    let extra = messages("t", 3_000, 150);
    let mut more = extra.chunks(20);
    let purged = loop {
        if let Some(p) = purged_past_node_3(&cluster) {
            break Some(p);
        }
        let batch = more.next().unwrap_or_else(|| {
            panic!(
                "the log was never purged past node 3 (at {behind:?})\n{}",
                cluster.logs()
            )
        });
        assert_eq!(send(cluster.node(1), batch).0, 200);
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    cluster.node_mut(3).restart();
    for query in queries() {
        let (_, expected) = query_when_available(cluster.node(1), &query);
        let (status, answer) = query_when_available(cluster.node(3), &query);
        assert_eq!(status, 200, "{answer}\n{}", cluster.logs());
        assert_eq!(answer, expected, "node 3 after catching up, {query}");
    }
    assert!(
        cluster.gauge(3, "optiprism_consensus_snapshot_index", "partition-0") >= purged,
        "node 3 holds no snapshot from the leader\n{}",
        cluster.logs()
    );
    assert_eq!(
        uuid_counts(cluster.node(3)).len(),
        uuid_counts(cluster.node(1)).len()
    );
}

#[test]
fn partitions_on_three_of_four_members_are_answered_by_every_member_as_by_a_single_node() {
    let cluster = TestCluster::start_placed(4, 4, 3, "");
    let single = TestNode::start();
    let events = messages("p", 800, 70);
    for (i, batch) in events.chunks(100).enumerate() {
        // Each member takes some: it forwards the partitions it does not hold.
        let (status, body) = send(cluster.node(1 + (i as u64 % 4)), batch);
        assert_eq!(status, 200, "{body}\n{}", cluster.logs());
        assert_eq!(send(&single, batch).0, 200);
    }
    // Each member holds three of the four partitions.
    for id in 1..=4 {
        let hosted = cluster
            .node(id)
            .get("/metrics")
            .1
            .lines()
            .filter(|l| l.starts_with("optiprism_consensus_is_leader{group=\"partition-"))
            .count();
        assert_eq!(hosted, 3, "node {id}");
    }
    for query in queries() {
        let (_, expected) = single.query(&query);
        for id in 1..=4 {
            let (status, answer) = query_when_available(cluster.node(id), &query);
            assert_eq!(status, 200, "{answer}");
            assert_eq!(answer, expected, "node {id} differs for {query}");
        }
    }
    assert_eq!(uuid_counts(cluster.node(4)).len(), 800);
}

/// The highest applied index of `group` over the members: the leader's, once it acknowledged.
fn applied_entries(cluster: &TestCluster, members: u64, group: &str) -> u64 {
    (1..=members)
        .filter_map(|id| cluster.gauge(id, "optiprism_consensus_applied_index", group))
        .max()
        .expect("an applied index")
}

/// Sends `first` and, 50 ms later, `second` to `node`, both at once; checks both are stored.
fn send_two_apart(node: &TestNode, first: &[Value], second: &[Value]) {
    std::thread::scope(|s| {
        let first = s.spawn(|| (first.len(), send(node, first)));
        std::thread::sleep(std::time::Duration::from_millis(50));
        let second = s.spawn(|| (second.len(), send(node, second)));
        for request in [first, second] {
            let (sent, (status, body)) = request.join().expect("request thread");
            assert_eq!(status, 200, "{body}");
            assert_eq!(body["accepted"], sent, "{body}");
        }
    });
}

#[test]
fn a_busy_partition_lingers_for_the_next_request_and_an_idle_one_proposes_at_once() {
    // A linger far longer than the gaps below, so the test does not depend on the host's pace.
    let cluster = TestCluster::start_with(3, 1, "\n[ingest]\nlinger = \"1s\"");
    let events = messages("l", 40, 10);
    let applied = || applied_entries(&cluster, 3, "partition-0");
    // The partition has been idle: the first request is proposed at once, alone.
    assert_eq!(send(cluster.node(2), &events[..10]).0, 200);
    let before = applied();
    // Two more right behind it: the first of them waits for the second, one entry for both.
    send_two_apart(cluster.node(2), &events[10..20], &events[20..30]);
    assert_eq!(applied(), before + 1, "{}", cluster.logs());
    // After a quiet spell longer than two lingers, a request does not wait for the one right
    // behind it: two entries.
    std::thread::sleep(std::time::Duration::from_millis(2_500));
    let before = applied();
    send_two_apart(cluster.node(2), &events[30..35], &events[35..40]);
    assert_eq!(applied(), before + 2, "{}", cluster.logs());
    assert_eq!(uuid_counts(cluster.node(3)).len(), 40);
}

/// Sends `events` to `node` until they are acknowledged: a 5xx (a leader that stopped, an
/// election under way) is retried, as a client would; message ids make retries safe.
fn send_until_acknowledged(node: &TestNode, events: &[Value]) {
    for _ in 0..300 {
        let (status, body) = send(node, events);
        match status {
            200 => return,
            500..=599 => std::thread::sleep(std::time::Duration::from_millis(200)),
            _ => panic!("{status}: {body}"),
        }
    }
    panic!("not acknowledged after 300 attempts");
}

#[test]
fn a_member_whose_disk_fails_leaves_the_others_taking_events_and_catches_up_after_a_restart() {
    let mut cluster = TestCluster::start(3, 4);
    // Member 3's files may not grow past 2 MiB: its Raft log's next write past that fails, and
    // every group on it stops, leaders included.
    cluster.node_mut(3).set_file_size_limit(Some(4096));
    cluster.node_mut(3).restart();
    // It leads the metadata group and two partitions when it fails.
    for group in ["metadata", "partition-0", "partition-1"] {
        let transfer = json!({"group": group, "to": 3});
        eventually(
            || format!("{group} to member 3"),
            || {
                cluster
                    .node(1)
                    .post_admin("/admin/v1/leader-transfer", &transfer)
                    .0
                    == 200
            },
        );
        assert_eq!(
            cluster.gauge(3, "optiprism_consensus_is_leader", group),
            Some(1),
            "{group}"
        );
    }
    let mut acknowledged = Vec::new();
    let mut b = 0;
    while cluster.node(3).get("/livez").0 == 200 {
        assert!(b < 400, "member 3 never failed:\n{}", cluster.logs());
        let (ids, events) = incompressible_batch("d", b, 500);
        send_until_acknowledged(cluster.node(1), &events);
        acknowledged.extend(ids);
        b += 1;
    }
    let (status, body) = cluster.node(3).get("/readyz");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("File too large"), "{body}");
    // The other two elect leaders for what member 3 led and go on acknowledging events.
    for _ in 0..5 {
        let (ids, events) = incompressible_batch("d", b, 500);
        send_until_acknowledged(cluster.node(2), &events);
        acknowledged.extend(ids);
        b += 1;
    }
    // Every group has a leader again, the metadata group included (no ingestion request
    // needed it here).
    for group in [
        "metadata",
        "partition-0",
        "partition-1",
        "partition-2",
        "partition-3",
    ] {
        eventually(
            || format!("{group} has a leader on members 1-2:\n{}", cluster.logs()),
            || {
                let leads = |id| cluster.gauge(id, "optiprism_consensus_is_leader", group);
                cluster.gauge(1, "optiprism_consensus_has_leader", group) == Some(1)
                    && (leads(1) == Some(1) || leads(2) == Some(1))
            },
        );
    }
    // With its disk fixed, member 3 restarts and catches up: every member holds every
    // acknowledged event, once.
    cluster.node_mut(3).set_file_size_limit(None);
    cluster.node_mut(3).restart();
    for id in 1..=3 {
        eventually(
            || format!("member {id} holds every acknowledged event"),
            || uuid_counts(cluster.node(id)).len() >= acknowledged.len(),
        );
        let stored = uuid_counts(cluster.node(id));
        let stored: std::collections::HashMap<String, i64> = stored.into_iter().collect();
        for message_id in &acknowledged {
            assert_eq!(
                stored.get(message_id),
                Some(&1),
                "member {id}: {message_id}"
            );
        }
        assert!(
            stored.values().all(|&n| n == 1),
            "member {id} stored an event twice"
        );
    }
}
