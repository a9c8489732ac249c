//! Answers of queries, and their JSON form (the field names of `spec/cases/analytics.json`).

use crate::stats::change_pct;
use serde_json::{Map, Value, json};

/// The label of the breakdown value for events without the property.
pub const NONE_LABEL: &str = "(none)";
/// The label that folds the values beyond the breakdown limit.
pub const OTHER_LABEL: &str = "(other)";

/// The answer of a trends query.
#[derive(Debug, Clone, PartialEq)]
pub struct TrendsAnswer {
    /// Bucket labels.
    pub buckets: Vec<String>,
    /// The breakdown property, if the query had one.
    pub breakdown_property: Option<String>,
    /// One entry per series, in query order.
    pub series: Vec<SeriesAnswer>,
    /// The formula's values (id [`crate::query::FORMULA_ID`]), if the query has one: per
    /// bucket, per breakdown value, and over the series' range totals.
    pub formula: Option<SeriesAnswer>,
    /// The previous period (§2.6), if the query compares with it.
    pub previous: Option<PreviousAnswer>,
}

/// The previous period of a trends answer, aligned with the current one bucket by bucket.
#[derive(Debug, Clone, PartialEq)]
pub struct PreviousAnswer {
    /// Its own bucket labels (their number differs from the current period's only where a
    /// week or month boundary, or a DST change in hourly buckets, falls differently).
    pub buckets: Vec<String>,
    /// Start instant of each bucket, epoch ms.
    pub starts_ms: Vec<i64>,
    /// The same series over the previous period (no breakdown rows).
    pub series: Vec<SeriesAnswer>,
}

/// One series of a trends answer.
#[derive(Debug, Clone, PartialEq)]
pub struct SeriesAnswer {
    /// Series id.
    pub id: String,
    /// Value per bucket; null where the aggregation is empty (property math) or undefined.
    pub values: Vec<Option<f64>>,
    /// The same math over the whole range (for uniques: distinct over the range; for rolling
    /// active users: the window ending on the last day).
    pub total: Option<f64>,
    /// Per breakdown value, ranked; empty without a breakdown.
    pub breakdown: Vec<BreakdownAnswer>,
}

/// One breakdown value of a series.
#[derive(Debug, Clone, PartialEq)]
pub struct BreakdownAnswer {
    /// The value, `(none)` or `(other)`.
    pub value: String,
    /// Value per bucket.
    pub values: Vec<Option<f64>>,
    /// Range total.
    pub total: Option<f64>,
}

/// A JSON number that prints integers without a fraction (counts are integers).
pub fn json_number(x: f64) -> Value {
    if x.is_finite() && x.fract() == 0.0 && x.abs() < 9.007_199_254_740_992e15 {
        json!(x as i64)
    } else {
        serde_json::Number::from_f64(x)
            .map(Value::Number)
            .unwrap_or(Value::Null)
    }
}

/// [`json_number`] of a value that may be undefined (JSON null).
pub fn json_option(x: Option<f64>) -> Value {
    x.map(json_number).unwrap_or(Value::Null)
}

fn json_values(values: &[Option<f64>]) -> Value {
    Value::Array(values.iter().copied().map(json_option).collect())
}

fn json_breakdown(rows: &[BreakdownAnswer]) -> Value {
    Value::Array(
        rows.iter()
            .map(|b| {
                json!({
                    "value": b.value,
                    "values": json_values(&b.values),
                    "total": json_option(b.total),
                })
            })
            .collect(),
    )
}

impl TrendsAnswer {
    /// The JSON answer of the HTTP API.
    pub fn to_json(&self) -> Value {
        let mut series = Map::new();
        let mut totals = Map::new();
        for s in &self.series {
            series.insert(s.id.clone(), json_values(&s.values));
            totals.insert(s.id.clone(), json_option(s.total));
        }
        let mut out = Map::new();
        out.insert("buckets".into(), json!(self.buckets));
        out.insert("series".into(), Value::Object(series));
        out.insert("totals".into(), Value::Object(totals));
        if let Some(f) = &self.formula {
            out.insert("formula".into(), json_values(&f.values));
            out.insert("formula_total".into(), json_option(f.total));
        }
        if let Some(p) = &self.previous {
            let mut previous = Map::new();
            let mut previous_totals = Map::new();
            let mut change = Map::new();
            for (s, current) in p.series.iter().zip(&self.series) {
                previous.insert(s.id.clone(), json_values(&s.values));
                previous_totals.insert(s.id.clone(), json_option(s.total));
                change.insert(
                    s.id.clone(),
                    json_option(change_pct(current.total, s.total)),
                );
            }
            out.insert("previous_buckets".into(), json!(p.buckets));
            out.insert("previous".into(), Value::Object(previous));
            out.insert("previous_totals".into(), Value::Object(previous_totals));
            out.insert("change_pct".into(), Value::Object(change));
        }
        if let Some(property) = &self.breakdown_property {
            let mut by_series = Map::new();
            for s in &self.series {
                by_series.insert(s.id.clone(), json_breakdown(&s.breakdown));
            }
            let mut breakdown = Map::new();
            breakdown.insert("property".into(), json!(property));
            breakdown.insert("series".into(), Value::Object(by_series));
            if let Some(f) = &self.formula {
                breakdown.insert("formula".into(), json_breakdown(&f.breakdown));
            }
            out.insert("breakdown".into(), Value::Object(breakdown));
        }
        Value::Object(out)
    }
}
