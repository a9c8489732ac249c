//! Answers of queries, and their JSON form (the field names of `spec/cases/analytics.json`).

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
}

/// One series of a trends answer.
#[derive(Debug, Clone, PartialEq)]
pub struct SeriesAnswer {
    /// Series id.
    pub id: String,
    /// Value per bucket.
    pub values: Vec<f64>,
    /// The same math over the whole range (for uniques: distinct over the range).
    pub total: f64,
    /// Per breakdown value, ranked; empty without a breakdown.
    pub breakdown: Vec<BreakdownAnswer>,
}

/// One breakdown value of a series.
#[derive(Debug, Clone, PartialEq)]
pub struct BreakdownAnswer {
    /// The value, `(none)` or `(other)`.
    pub value: String,
    /// Value per bucket.
    pub values: Vec<f64>,
    /// Range total.
    pub total: f64,
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

impl TrendsAnswer {
    /// The JSON answer of the HTTP API.
    pub fn to_json(&self) -> Value {
        let mut series = Map::new();
        let mut totals = Map::new();
        for s in &self.series {
            series.insert(
                s.id.clone(),
                s.values.iter().copied().map(json_number).collect(),
            );
            totals.insert(s.id.clone(), json_number(s.total));
        }
        let mut out = Map::new();
        out.insert("buckets".into(), json!(self.buckets));
        out.insert("series".into(), Value::Object(series));
        out.insert("totals".into(), Value::Object(totals));
        if let Some(property) = &self.breakdown_property {
            let mut by_series = Map::new();
            for s in &self.series {
                let values: Vec<Value> = s
                    .breakdown
                    .iter()
                    .map(|b| {
                        json!({
                            "value": b.value,
                            "values": b.values.iter().copied().map(json_number).collect::<Vec<_>>(),
                            "total": json_number(b.total),
                        })
                    })
                    .collect();
                by_series.insert(s.id.clone(), Value::Array(values));
            }
            out.insert(
                "breakdown".into(),
                json!({ "property": property, "series": by_series }),
            );
        }
        Value::Object(out)
    }
}
