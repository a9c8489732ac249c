//! Trends math on random event logs against a naive reference: property math over dirty
//! values (§1.3, §1.6), per-user two-stage math (§2.3) and rolling active users (§2.2), with and
//! without a breakdown, answered by a real in-process node with 8 partitions (half the cases
//! from sealed chunks), in JSON and in Arrow.

use crate::support::{arrow_to_json, assert_json_numbers};
use optiprism_node::ingest::{Ingestor, Parsed};
use optiprism_types::event::{Event, PropValue};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// A raw `amount` as an SDK might send it.
#[derive(Debug, Clone)]
enum Amount {
    Int(i32),
    Half(i32),
    NumericString(i32),
    Junk(&'static str),
    Bool,
    Object,
    Absent,
}

impl Amount {
    fn prop(&self) -> Option<PropValue> {
        Some(match self {
            Amount::Int(n) => PropValue::Num(f64::from(*n)),
            Amount::Half(n) => PropValue::Num(f64::from(*n) + 0.5),
            Amount::NumericString(n) => PropValue::Str(n.to_string()),
            Amount::Junk(s) => PropValue::Str(s.to_string()),
            Amount::Bool => PropValue::Bool(true),
            Amount::Object => PropValue::Json(r#"{"a":1}"#.into()),
            Amount::Absent => return None,
        })
    }

    /// The reference coercion of §1.3: numbers and numeric strings.
    fn number(&self) -> Option<f64> {
        match self {
            Amount::Int(n) | Amount::NumericString(n) => Some(f64::from(*n)),
            Amount::Half(n) => Some(f64::from(*n) + 0.5),
            _ => None,
        }
    }
}

fn amounts() -> impl Strategy<Value = Amount> {
    prop_oneof![
        4 => (-20i32..100).prop_map(Amount::Int),
        2 => (-20i32..100).prop_map(Amount::Half),
        2 => (-20i32..100).prop_map(Amount::NumericString),
        1 => prop_oneof![Just("abc"), Just(""), Just("NaN"), Just("1,5")].prop_map(Amount::Junk),
        1 => Just(Amount::Bool),
        1 => Just(Amount::Object),
        2 => Just(Amount::Absent),
    ]
}

/// (user, day 0..20, amount, plan)
type Log = Vec<(usize, i64, Amount, Option<u8>)>;
/// Breakdown rows: (value, range total).
type Rows = Vec<(String, Option<f64>)>;
/// Per series id: the bucket values, and the range totals.
type Expected = (
    BTreeMap<String, Vec<Option<f64>>>,
    BTreeMap<String, Option<f64>>,
);

const PLANS: [&str; 3] = ["free", "pro", "team"];
/// The query covers days 10..=19 (2024-03-11 ..= 2024-03-20); earlier days feed look-backs.
const FIRST: i64 = 10;
const DAYS: i64 = 10;
const DAY_MS: i64 = 86_400_000;
/// 2024-03-01T00:00:00Z
const BASE_MS: i64 = 1_709_251_200_000;

fn logs() -> impl Strategy<Value = Log> {
    proptest::collection::vec(
        (
            0usize..7,
            0i64..20,
            amounts(),
            proptest::option::weighted(0.8, 0u8..3),
        ),
        1..90,
    )
}

fn event(n: usize, (user, day, amount, plan): &(usize, i64, Amount, Option<u8>)) -> Event {
    let mut properties = Vec::new();
    if let Some(a) = amount.prop() {
        properties.push(("amount".to_string(), a));
    }
    if let Some(p) = plan {
        properties.push((
            "plan".to_string(),
            PropValue::Str(PLANS[*p as usize].into()),
        ));
    }
    Event {
        message_id: format!("m{n}"),
        distinct_id: format!("user-{user}"),
        event: "buy".into(),
        timestamp_ms: BASE_MS + day * DAY_MS + (n as i64 % 600) * 60_000,
        properties,
        person_set: Vec::new(),
        person_set_once: Vec::new(),
    }
}

fn quantile(values: &[f64], p: f64) -> Option<f64> {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return None;
    }
    let h = (v.len() - 1) as f64 * p;
    let lo = h.floor() as usize;
    let hi = (lo + 1).min(v.len() - 1);
    Some(v[lo] + (h - lo as f64) * (v[hi] - v[lo]))
}

fn round4(x: f64) -> f64 {
    (x * 1e4).round() / 1e4
}

/// The reference math over some numbers.
fn math(name: &str, values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let sum: f64 = values.iter().sum();
    Some(match name {
        "sum" => sum,
        "avg" => round4(sum / values.len() as f64),
        "min" => values.iter().copied().fold(f64::INFINITY, f64::min),
        "max" => values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        "median" => round4(quantile(values, 0.5)?),
        "p75" => round4(quantile(values, 0.75)?),
        "p90" => round4(quantile(values, 0.9)?),
        "p99" => round4(quantile(values, 0.99)?),
        other => panic!("no reference for {other}"),
    })
}

fn in_range(day: i64) -> bool {
    (FIRST..FIRST + DAYS).contains(&day)
}

fn label(plan: Option<u8>) -> String {
    plan.map(|p| PLANS[p as usize].to_string())
        .unwrap_or_else(|| "(none)".into())
}

/// Expected `series` and `totals` of the unbroken query.
fn reference(log: &Log) -> Expected {
    let mut series = BTreeMap::new();
    let mut totals = BTreeMap::new();
    let numbers = |days: &dyn Fn(i64) -> bool| -> Vec<f64> {
        log.iter()
            .filter(|e| days(e.1))
            .filter_map(|e| e.2.number())
            .collect()
    };
    for name in ["sum", "avg", "min", "max", "median", "p75", "p99"] {
        series.insert(
            name.to_string(),
            (FIRST..FIRST + DAYS)
                .map(|d| math(name, &numbers(&|x| x == d)))
                .collect(),
        );
        totals.insert(name.to_string(), math(name, &numbers(&in_range)));
    }
    for (name, window) in [("wau", 7), ("mau", 30)] {
        let active = |d: i64| -> f64 {
            let users: BTreeSet<usize> = log
                .iter()
                .filter(|e| e.1 <= d && e.1 > d - window)
                .map(|e| e.0)
                .collect();
            users.len() as f64
        };
        series.insert(
            name.to_string(),
            (FIRST..FIRST + DAYS).map(|d| Some(active(d))).collect(),
        );
        totals.insert(name.to_string(), Some(active(FIRST + DAYS - 1)));
    }
    // Per user: event counts, and sums of numeric amounts (users with none leave stage 2).
    let per_user = |days: &dyn Fn(i64) -> bool| -> (Vec<f64>, Vec<f64>) {
        let mut counts: BTreeMap<usize, f64> = BTreeMap::new();
        let mut sums: BTreeMap<usize, f64> = BTreeMap::new();
        for e in log.iter().filter(|e| days(e.1)) {
            *counts.entry(e.0).or_default() += 1.0;
            if let Some(x) = e.2.number() {
                *sums.entry(e.0).or_default() += x;
            }
        }
        (counts.into_values().collect(), sums.into_values().collect())
    };
    let (avg_count, p90_sum) = (
        |days: &dyn Fn(i64) -> bool| math("avg", &per_user(days).0),
        |days: &dyn Fn(i64) -> bool| math("p90", &per_user(days).1),
    );
    series.insert(
        "avg_count".into(),
        (FIRST..FIRST + DAYS)
            .map(|d| avg_count(&|x| x == d))
            .collect(),
    );
    totals.insert("avg_count".into(), avg_count(&in_range));
    series.insert(
        "p90_sum".into(),
        (FIRST..FIRST + DAYS)
            .map(|d| p90_sum(&|x| x == d))
            .collect(),
    );
    totals.insert("p90_sum".into(), p90_sum(&in_range));
    (series, totals)
}

/// Top-2 ranking and `(other)` folding of §2.5 by each row's range total.
fn fold(per_value: BTreeMap<String, Vec<usize>>, total: &dyn Fn(&[usize]) -> Option<f64>) -> Rows {
    let mut ranked: Rows = per_value
        .iter()
        .map(|(v, events)| (v.clone(), total(events)))
        .collect();
    ranked.sort_by(|a, b| {
        let key = |x: Option<f64>| x.unwrap_or(f64::NEG_INFINITY);
        key(b.1).total_cmp(&key(a.1)).then_with(|| a.0.cmp(&b.0))
    });
    let mut rows: Rows = ranked.iter().take(2).cloned().collect();
    if ranked.len() > 2 {
        let folded: Vec<usize> = ranked[2..]
            .iter()
            .flat_map(|(v, _)| per_value[v].iter().copied())
            .collect();
        rows.push(("(other)".into(), total(&folded)));
    }
    rows
}

/// Expected breakdown rows (value, total) of the median and of WAU by plan, top 2.
fn reference_breakdown(log: &Log) -> (Rows, Rows) {
    // Median: only events with a numeric amount in the range make a value appear.
    let mut by_plan: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (i, e) in log.iter().enumerate() {
        if in_range(e.1) && e.2.number().is_some() {
            by_plan.entry(label(e.3)).or_default().push(i);
        }
    }
    let median = fold(by_plan, &|events| {
        let values: Vec<f64> = events.iter().filter_map(|i| log[*i].2.number()).collect();
        math("median", &values)
    });
    // WAU: events of the look-back days make values appear too; a row's total is the window
    // ending on the last day.
    let last = FIRST + DAYS - 1;
    let mut by_plan: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (i, e) in log.iter().enumerate() {
        if e.1 > FIRST - 7 && e.1 <= last {
            by_plan.entry(label(e.3)).or_default().push(i);
        }
    }
    let wau = fold(by_plan, &|events| {
        let users: BTreeSet<usize> = events
            .iter()
            .filter(|i| log[**i].1 > last - 7)
            .map(|i| log[*i].0)
            .collect();
        Some(users.len() as f64)
    });
    (median, wau)
}

fn rows(answer: &Value, id: &str) -> Rows {
    answer["breakdown"]["series"][id]
        .as_array()
        .unwrap_or_else(|| panic!("no breakdown of {id}: {answer}"))
        .iter()
        .map(|r| {
            (
                r["value"].as_str().unwrap().to_string(),
                r["total"].as_f64(),
            )
        })
        .collect()
}

fn close(a: Option<f64>, b: Option<f64>) -> bool {
    match (a, b) {
        // Averages and percentiles are rounded to 4 decimals on both sides; a sum's last bits
        // depend on the order of additions.
        (Some(a), Some(b)) => (a - b).abs() <= 1e-4 + 1e-9 * a.abs(),
        (None, None) => true,
        _ => false,
    }
}

#[test]
fn property_per_user_and_rolling_math_match_a_naive_reference() {
    let started = crate::support::in_process_node(8);
    let (runtime, node) = (&started.runtime, &started.node);
    let ingestor = Ingestor::new(Arc::clone(node));
    let mut runner = TestRunner::new(Config {
        cases: 24,
        failure_persistence: None,
        ..Config::default()
    });
    let counter = std::sync::atomic::AtomicUsize::new(0);
    let series = json!([
        {"id": "sum", "event": "buy", "math": "sum", "property": "amount"},
        {"id": "avg", "event": "buy", "math": "avg", "property": "amount"},
        {"id": "min", "event": "buy", "math": "min", "property": "amount"},
        {"id": "max", "event": "buy", "math": "max", "property": "amount"},
        {"id": "median", "event": "buy", "math": "median", "property": "amount"},
        {"id": "p75", "event": "buy", "math": "p75", "property": "amount"},
        {"id": "p99", "event": "buy", "math": "p99", "property": "amount"},
        {"id": "wau", "event": "buy", "math": "weekly_active"},
        {"id": "mau", "event": "buy", "math": "monthly_active"},
        {"id": "avg_count", "event": "buy", "math": "avg_per_user"},
        {"id": "p90_sum", "event": "buy", "math": "p90_per_user", "property": "amount"},
    ]);
    let query = json!({
        "kind": "trends", "date_range": {"from": "2024-03-11", "to": "2024-03-20"},
        "series": series,
    });
    let broken = json!({
        "kind": "trends", "date_range": {"from": "2024-03-11", "to": "2024-03-20"},
        "series": [
            {"id": "median", "event": "buy", "math": "median", "property": "amount"},
            {"id": "wau", "event": "buy", "math": "weekly_active"},
        ],
        "breakdown": {"property": "plan", "limit": 2},
    });
    runner
        .run(&logs(), |log| {
            let case_no = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            let name = format!("math{case_no}");
            let (answer, arrow, broken_answer) = runtime.block_on(async {
                let project = crate::support::new_project(node, &name).await;
                let events: Vec<Event> = log.iter().enumerate().map(|(n, e)| event(n, e)).collect();
                ingestor
                    .ingest(
                        &project,
                        Parsed {
                            write_key: None,
                            events,
                            merges: Vec::new(),
                        },
                    )
                    .await
                    .unwrap();
                if case_no.is_multiple_of(2) {
                    node.seal_all();
                }
                let answer = node
                    .query
                    .insight(&project, query.to_string().as_bytes())
                    .await
                    .unwrap();
                let broken = node
                    .query
                    .insight(&project, broken.to_string().as_bytes())
                    .await
                    .unwrap();
                (answer.json, arrow_to_json(&[answer.batch]), broken.json)
            });
            let (series, totals) = reference(&log);
            for (id, want) in &series {
                let got: Vec<Option<f64>> = answer["series"][id]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(Value::as_f64)
                    .collect();
                prop_assert_eq!(got.len(), want.len());
                for (d, (g, w)) in got.iter().zip(want).enumerate() {
                    prop_assert!(
                        close(*g, *w),
                        "{} day {}: {:?} vs {:?} of {:?}",
                        id,
                        d,
                        g,
                        w,
                        log
                    );
                }
                let total = answer["totals"][id].as_f64();
                prop_assert!(
                    close(total, totals[id]),
                    "{} total: {:?} vs {:?} of {:?}",
                    id,
                    total,
                    totals[id],
                    log
                );
                // The Arrow answer carries the same numbers.
                assert_json_numbers(&arrow["series"][id], &answer["series"][id], id);
                assert_json_numbers(&arrow["totals"][id], &answer["totals"][id], id);
            }
            let (median, wau) = reference_breakdown(&log);
            let got = rows(&broken_answer, "median");
            prop_assert_eq!(got.len(), median.len(), "{:?} vs {:?}", got, median);
            for (g, w) in got.iter().zip(&median) {
                prop_assert_eq!(&g.0, &w.0, "{:?} vs {:?}", got, median);
                prop_assert!(close(g.1, w.1), "{:?} vs {:?}", got, median);
            }
            prop_assert_eq!(rows(&broken_answer, "wau"), wau);
            Ok(())
        })
        .unwrap();
    runtime.block_on(node.shutdown());
}
