//! Fault-injection scenarios against real `prism` processes, and the invariant checkers they
//! share. No production code lives here.
//!
//! The history oracle: every batch a client sent is either acknowledged (HTTP 200) or not.
//! After any sequence of crashes and restarts, every event of an acknowledged batch must be
//! stored exactly once, and an unacknowledged batch, once retried until acknowledged, too.

use arrow::array::{Array, AsArray};
use std::collections::{BTreeSet, HashMap};

/// What the clients saw.
#[derive(Debug, Default, Clone)]
pub struct History {
    /// Message ids of events in acknowledged batches.
    pub acknowledged: BTreeSet<String>,
    /// Batches sent without an acknowledgement (error or crash mid-request), to retry.
    pub unacknowledged: Vec<Vec<String>>,
}

/// Counts how often each message id is stored, over Flight SQL.
pub fn stored_ids(node: &optiprism_testkit::TestNode) -> anyhow::Result<HashMap<String, u64>> {
    let batches = node.sql("SELECT uuid, count(*) AS n FROM events GROUP BY uuid")?;
    let mut out = HashMap::new();
    for b in batches {
        let ids = arrow::compute::cast(b.column(0), &arrow::datatypes::DataType::Utf8)?;
        let ids = ids.as_string::<i32>();
        let n = arrow::compute::cast(b.column(1), &arrow::datatypes::DataType::UInt64)?;
        let n = n.as_primitive::<arrow::datatypes::UInt64Type>();
        for i in 0..b.num_rows() {
            if !ids.is_null(i) {
                out.insert(ids.value(i).to_string(), n.value(i));
            }
        }
    }
    Ok(out)
}

/// Checks the exactly-once invariant: every acknowledged id stored once, nothing stored twice.
pub fn check_exactly_once(history: &History, stored: &HashMap<String, u64>) -> Result<(), String> {
    let missing: Vec<&String> = history
        .acknowledged
        .iter()
        .filter(|id| !stored.contains_key(*id))
        .take(10)
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "{} acknowledged event(s) lost, e.g. {missing:?}",
            history
                .acknowledged
                .iter()
                .filter(|id| !stored.contains_key(*id))
                .count()
        ));
    }
    let doubled: Vec<(&String, &u64)> = stored.iter().filter(|(_, n)| **n > 1).take(10).collect();
    if !doubled.is_empty() {
        return Err(format!("events stored more than once: {doubled:?}"));
    }
    Ok(())
}
