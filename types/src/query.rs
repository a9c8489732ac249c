//! The public JSON query format (`spec/analytics.md`) and its validation.
//!
//! Parsing is strict: unknown fields, unknown option values and inconsistent combinations are
//! refused with a [`QueryError`] that names the offending field by its JSON path
//! (`series[1].math`), so a user can fix the query without reading our source.

use crate::time::{Buckets, Interval, WeekStart, bucket_count_estimate};
use chrono::NaiveDate;
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;

/// A query that names the offending field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid query: `{field}`: {message}")]
pub struct QueryError {
    /// JSON path of the field (`series[0].math`), or `.` for the whole query.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl QueryError {
    fn new(field: impl Into<String>, message: impl Into<String>) -> QueryError {
        QueryError {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Any query of the public format, told apart by `kind`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Query {
    /// Trends (event segmentation), §2.
    Trends(TrendsQuery),
}

/// The query kinds this build answers.
pub const SUPPORTED_KINDS: &[&str] = &["trends"];

/// Parses and validates a query from JSON text.
pub fn parse_query(json: &[u8]) -> Result<Query, QueryError> {
    let mut value: serde_json::Value = serde_json::from_slice(json)
        .map_err(|e| QueryError::new(".", strip_position(&e.to_string())))?;
    let Some(object) = value.as_object_mut() else {
        return Err(QueryError::new(".", "expected a JSON object"));
    };
    // `kind` is read by hand rather than through an internally tagged enum, because serde
    // buffers tagged content and would lose the path of any error inside it.
    let kind = match object.remove("kind") {
        Some(serde_json::Value::String(kind)) => kind,
        Some(_) => return Err(QueryError::new("kind", "expected a string")),
        None => return Err(QueryError::new("kind", "missing field `kind`")),
    };
    let query = match kind.as_str() {
        "trends" => Query::Trends(from_value(value)?),
        other => {
            return Err(QueryError::new(
                "kind",
                format!(
                    "unknown query kind `{other}` (supported: {})",
                    SUPPORTED_KINDS.join(", ")
                ),
            ));
        }
    };
    match &query {
        Query::Trends(t) => t.validate()?,
    }
    Ok(query)
}

fn from_value<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> Result<T, QueryError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let message = strip_position(&e.into_inner().to_string());
        let path = if path.is_empty() || path == "." {
            None
        } else {
            Some(path)
        };
        // serde reports a missing field at its parent: name the field itself.
        let missing = message
            .strip_prefix("missing field `")
            .and_then(|m| m.strip_suffix('`'));
        let field = match (path, missing) {
            (Some(p), Some(m)) => format!("{p}.{m}"),
            (None, Some(m)) => m.to_string(),
            (Some(p), None) => p,
            (None, None) => ".".to_string(),
        };
        QueryError::new(field, message)
    })
}

fn strip_position(message: &str) -> String {
    match message.find(" at line ") {
        Some(i) => message[..i].to_string(),
        None => message.to_string(),
    }
}

/// The local date range of a query, both ends inclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DateRange {
    /// First local date.
    pub from: NaiveDate,
    /// Last local date (inclusive).
    pub to: NaiveDate,
}

/// How a series aggregates its events (§2.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Math {
    /// Number of events.
    Total,
    /// Number of distinct persons.
    UniqueUsers,
    /// Rolling 7-day active persons (not yet supported).
    WeeklyActive,
    /// Rolling 30-day active persons (not yet supported).
    MonthlyActive,
    /// Sum of a numeric property (not yet supported).
    Sum,
    /// Average of a numeric property (not yet supported).
    Avg,
    /// Minimum of a numeric property (not yet supported).
    Min,
    /// Maximum of a numeric property (not yet supported).
    Max,
    /// Median of a numeric property (not yet supported).
    Median,
    /// 75th percentile (not yet supported).
    P75,
    /// 90th percentile (not yet supported).
    P90,
    /// 95th percentile (not yet supported).
    P95,
    /// 99th percentile (not yet supported).
    P99,
}

impl Math {
    /// Whether this build computes it.
    pub fn is_supported(self) -> bool {
        matches!(self, Math::Total | Math::UniqueUsers)
    }

    /// Its name in the query format.
    pub fn name(self) -> String {
        serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default()
    }
}

/// One series of a trends query.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Series {
    /// Its id in the answer; defaults to `A`, `B`, … by position.
    #[serde(default)]
    pub id: Option<String>,
    /// The event name; absent means all events.
    #[serde(default)]
    pub event: Option<String>,
    /// The aggregation.
    #[serde(default = "default_math")]
    pub math: Math,
    /// The property of property math.
    #[serde(default)]
    pub property: Option<String>,
    /// Filters of this series only, AND-ed with the query's filters.
    #[serde(default)]
    pub filters: Vec<Filter>,
}

fn default_math() -> Math {
    Math::Total
}

/// Filter operators of §1.4, and the `and`/`or` group operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FilterOp {
    /// All nested filters hold.
    And,
    /// At least one nested filter holds.
    Or,
    /// String equality; a list means any of.
    #[serde(alias = "exact")]
    Eq,
    /// Not equal; a list means none of. True when not set.
    #[serde(alias = "is_not")]
    Neq,
    /// Case-insensitive substring.
    Icontains,
    /// Negation of `icontains`. True when not set.
    NotIcontains,
    /// Regular expression search on the string form.
    Regex,
    /// Negation of `regex`. True when not set.
    NotRegex,
    /// Numeric greater-than.
    Gt,
    /// Numeric greater-or-equal.
    Gte,
    /// Numeric less-than.
    Lt,
    /// Numeric less-or-equal.
    Lte,
    /// Key present and not null.
    IsSet,
    /// Key absent or null.
    IsNotSet,
    /// Membership in a list.
    In,
    /// Non-membership in a list. True when not set.
    NotIn,
    /// Datetime strictly before.
    IsDateBefore,
    /// Datetime strictly after.
    IsDateAfter,
    /// Datetime equal.
    IsDateExact,
}

/// Whose property a filter reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PropertySource {
    /// The event's own properties.
    #[default]
    Event,
    /// The person's current properties (not yet supported).
    Person,
}

/// A property filter, or an `and`/`or` group of filters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Filter {
    /// The operator.
    pub op: FilterOp,
    /// The property key (property filters).
    #[serde(default)]
    pub key: Option<String>,
    /// The operand (not for `is_set`/`is_not_set` and groups).
    #[serde(default)]
    pub value: Option<serde_json::Value>,
    /// Whose property.
    #[serde(default, rename = "type")]
    pub source: PropertySource,
    /// Nested filters (groups).
    #[serde(default)]
    pub filters: Vec<Filter>,
}

/// A breakdown of a trends query by one property.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Breakdown {
    /// The property key.
    pub property: String,
    /// Whose property.
    #[serde(default, rename = "type")]
    pub source: PropertySource,
    /// How many values to keep; the rest fold into `(other)`.
    #[serde(default = "default_breakdown_limit")]
    pub limit: usize,
}

fn default_breakdown_limit() -> usize {
    25
}

/// A trends query (§2).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrendsQuery {
    /// IANA time zone of the buckets.
    #[serde(default = "default_timezone")]
    pub timezone: String,
    /// The local dates covered.
    pub date_range: DateRange,
    /// Bucket width.
    #[serde(default = "default_interval")]
    pub interval: Interval,
    /// First day of weekly buckets.
    #[serde(default)]
    pub week_start: WeekStart,
    /// The series (1..=26).
    pub series: Vec<Series>,
    /// Filters applied to every series.
    #[serde(default)]
    pub filters: Vec<Filter>,
    /// Optional breakdown.
    #[serde(default)]
    pub breakdown: Option<Breakdown>,
    /// A formula over the series ids (not yet supported).
    #[serde(default)]
    pub formula: Option<String>,
    /// Also answer the previous period (not yet supported).
    #[serde(default)]
    pub compare_previous: bool,
    /// What a division by zero gives in formulas.
    #[serde(default)]
    pub divide_by_zero: Option<String>,
}

fn default_timezone() -> String {
    "UTC".to_string()
}

fn default_interval() -> Interval {
    Interval::Day
}

/// The largest number of buckets a query may ask for.
pub const MAX_BUCKETS: i64 = 10_000;
/// The largest number of series in one query.
pub const MAX_SERIES: usize = 26;
/// The deepest nesting of filter groups.
pub const MAX_FILTER_DEPTH: usize = 8;

impl TrendsQuery {
    /// The parsed time zone (valid after [`TrendsQuery::validate`]).
    pub fn tz(&self) -> Tz {
        self.timezone.parse().unwrap_or(Tz::UTC)
    }

    /// The buckets of the range.
    pub fn buckets(&self) -> Buckets {
        Buckets::new(
            self.date_range.from,
            self.date_range.to,
            self.tz(),
            self.interval,
            self.week_start,
        )
    }

    /// The id of series `i`: its `id`, or `A`, `B`, … by position.
    pub fn series_id(&self, i: usize) -> String {
        self.series[i]
            .id
            .clone()
            .unwrap_or_else(|| ((b'A' + (i % 26) as u8) as char).to_string())
    }

    /// Checks everything serde cannot: ranges, supported options, operands of operators.
    pub fn validate(&self) -> Result<(), QueryError> {
        if self.timezone.parse::<Tz>().is_err() {
            return Err(QueryError::new(
                "timezone",
                format!("unknown IANA time zone `{}`", self.timezone),
            ));
        }
        let DateRange { from, to } = self.date_range;
        if from > to {
            return Err(QueryError::new(
                "date_range",
                format!("`from` ({from}) is after `to` ({to})"),
            ));
        }
        if bucket_count_estimate(from, to, self.interval) > MAX_BUCKETS {
            return Err(QueryError::new(
                "date_range",
                format!("the range has more than {MAX_BUCKETS} buckets at this interval"),
            ));
        }
        if self.series.is_empty() {
            return Err(QueryError::new("series", "at least one series is required"));
        }
        if self.series.len() > MAX_SERIES {
            return Err(QueryError::new(
                "series",
                format!("at most {MAX_SERIES} series are allowed"),
            ));
        }
        let mut ids = HashSet::new();
        for (i, s) in self.series.iter().enumerate() {
            let field = format!("series[{i}]");
            let id = self.series_id(i);
            if id.is_empty() {
                return Err(QueryError::new(format!("{field}.id"), "must not be empty"));
            }
            if !ids.insert(id.clone()) {
                return Err(QueryError::new(
                    format!("{field}.id"),
                    format!("duplicate series id `{id}`"),
                ));
            }
            if !s.math.is_supported() {
                return Err(QueryError::new(
                    format!("{field}.math"),
                    format!(
                        "math `{}` is not supported yet (supported: total, unique_users)",
                        s.math.name()
                    ),
                ));
            }
            if s.property.is_some() {
                return Err(QueryError::new(
                    format!("{field}.property"),
                    format!("math `{}` takes no property", s.math.name()),
                ));
            }
            validate_filters(&s.filters, &format!("{field}.filters"), 0)?;
        }
        validate_filters(&self.filters, "filters", 0)?;
        if let Some(b) = &self.breakdown {
            if b.property.is_empty() {
                return Err(QueryError::new("breakdown.property", "must not be empty"));
            }
            if b.source == PropertySource::Person {
                return Err(QueryError::new(
                    "breakdown.type",
                    "person property breakdowns are not supported yet",
                ));
            }
            if b.limit == 0 || b.limit > 10_000 {
                return Err(QueryError::new(
                    "breakdown.limit",
                    "must be between 1 and 10000",
                ));
            }
        }
        if self.formula.is_some() {
            return Err(QueryError::new("formula", "formulas are not supported yet"));
        }
        if self.compare_previous {
            return Err(QueryError::new(
                "compare_previous",
                "comparing to the previous period is not supported yet",
            ));
        }
        if let Some(d) = &self.divide_by_zero
            && d != "null"
        {
            return Err(QueryError::new(
                "divide_by_zero",
                format!("unknown value `{d}` (expected `null`)"),
            ));
        }
        Ok(())
    }
}

fn validate_filters(filters: &[Filter], field: &str, depth: usize) -> Result<(), QueryError> {
    if depth > MAX_FILTER_DEPTH {
        return Err(QueryError::new(
            field,
            format!("filter groups nest deeper than {MAX_FILTER_DEPTH}"),
        ));
    }
    for (i, f) in filters.iter().enumerate() {
        let field = format!("{field}[{i}]");
        f.validate(&field, depth)?;
    }
    Ok(())
}

impl Filter {
    fn validate(&self, field: &str, depth: usize) -> Result<(), QueryError> {
        use FilterOp::*;
        match self.op {
            And | Or => {
                if self.key.is_some() || self.value.is_some() {
                    return Err(QueryError::new(
                        field,
                        "a filter group takes `filters`, not `key` or `value`",
                    ));
                }
                if self.filters.is_empty() {
                    return Err(QueryError::new(
                        format!("{field}.filters"),
                        "a filter group needs at least one filter",
                    ));
                }
                return validate_filters(&self.filters, &format!("{field}.filters"), depth + 1);
            }
            _ => {}
        }
        if !self.filters.is_empty() {
            return Err(QueryError::new(
                format!("{field}.filters"),
                "only `and`/`or` groups take nested filters",
            ));
        }
        match &self.key {
            None => {
                return Err(QueryError::new(
                    format!("{field}.key"),
                    "missing property key",
                ));
            }
            Some(k) if k.is_empty() => {
                return Err(QueryError::new(format!("{field}.key"), "must not be empty"));
            }
            Some(_) => {}
        }
        if self.source == PropertySource::Person {
            return Err(QueryError::new(
                format!("{field}.type"),
                "person property filters are not supported yet",
            ));
        }
        let value_field = format!("{field}.value");
        let value = self.value.as_ref();
        match self.op {
            IsSet | IsNotSet => {
                if value.is_some() {
                    return Err(QueryError::new(
                        value_field,
                        "`is_set`/`is_not_set` take no value",
                    ));
                }
            }
            Eq | Neq | In | NotIn => match value {
                None | Some(serde_json::Value::Null) => {
                    return Err(QueryError::new(value_field, "missing value"));
                }
                Some(serde_json::Value::Array(items)) => {
                    if items.is_empty() {
                        return Err(QueryError::new(value_field, "the list must not be empty"));
                    }
                    if items
                        .iter()
                        .any(|v| v.is_null() || v.is_object() || v.is_array())
                    {
                        return Err(QueryError::new(
                            value_field,
                            "list items must be strings, numbers or booleans",
                        ));
                    }
                }
                Some(serde_json::Value::Object(_)) => {
                    return Err(QueryError::new(
                        value_field,
                        "expected a string, number, boolean or list",
                    ));
                }
                Some(_) => {}
            },
            Icontains | NotIcontains | Regex | NotRegex => match value {
                Some(serde_json::Value::String(s)) => {
                    if matches!(self.op, Regex | NotRegex)
                        && let Err(e) = regex_syntax_check(s)
                    {
                        return Err(QueryError::new(
                            value_field,
                            format!("invalid regular expression: {e}"),
                        ));
                    }
                }
                Some(serde_json::Value::Number(_)) | Some(serde_json::Value::Bool(_)) => {}
                _ => return Err(QueryError::new(value_field, "expected a string")),
            },
            Gt | Gte | Lt | Lte => {
                if value.and_then(json_number).is_none() {
                    return Err(QueryError::new(
                        value_field,
                        "expected a number or a numeric string",
                    ));
                }
            }
            IsDateBefore | IsDateAfter | IsDateExact => {
                let ok = value
                    .and_then(|v| v.as_str())
                    .map(|s| resolve_date_operand(s, 0).is_some())
                    .unwrap_or(false);
                if !ok {
                    return Err(QueryError::new(
                        value_field,
                        "expected an ISO-8601 date or datetime, or a relative value like `-7d`",
                    ));
                }
            }
            And | Or => {}
        }
        Ok(())
    }
}

/// The numeric value of a JSON operand (numbers and numeric strings).
pub fn json_number(v: &serde_json::Value) -> Option<f64> {
    match v {
        serde_json::Value::Number(n) => n.as_f64(),
        serde_json::Value::String(s) => s.trim().parse::<f64>().ok().filter(|n| n.is_finite()),
        _ => None,
    }
}

/// The string rendering of a scalar JSON operand, as equality filters compare it.
pub fn json_render(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Number(n) => crate::event::render_number(n.as_f64().unwrap_or(f64::NAN)),
        other => other.to_string(),
    }
}

/// Resolves a datetime operand to epoch ms: an ISO date or datetime, or a relative value such
/// as `-7d`, `-3h`, `-2w`, `-1m` (30 days), `-1y` (365 days) counted back from `now_ms`.
pub fn resolve_date_operand(s: &str, now_ms: i64) -> Option<i64> {
    if let Some(ms) = crate::event::parse_datetime_ms(s) {
        return Some(ms);
    }
    if let Ok(d) = s.parse::<NaiveDate>() {
        return Some(d.and_hms_opt(0, 0, 0)?.and_utc().timestamp_millis());
    }
    let rest = s.strip_prefix('-')?;
    let (num, unit) = rest.split_at(rest.len().checked_sub(1)?);
    let n: i64 = num.parse().ok()?;
    let unit_ms: i64 = match unit {
        "h" => 3_600_000,
        "d" => 86_400_000,
        "w" => 7 * 86_400_000,
        "m" => 30 * 86_400_000,
        "y" => 365 * 86_400_000,
        _ => return None,
    };
    Some(now_ms - n.checked_mul(unit_ms)?)
}

fn regex_syntax_check(pattern: &str) -> Result<(), String> {
    // A tiny syntax check without pulling the regex crate into `types`: unbalanced parentheses
    // and brackets are the usual mistakes; the engine reports anything subtler.
    let mut depth = 0i32;
    let mut escaped = false;
    let mut in_class = false;
    for c in pattern.chars() {
        if escaped {
            escaped = false;
            continue;
        }
        match c {
            '\\' => escaped = true,
            '[' if !in_class => in_class = true,
            ']' if in_class => in_class = false,
            '(' if !in_class => depth += 1,
            ')' if !in_class => {
                depth -= 1;
                if depth < 0 {
                    return Err("unopened `)`".into());
                }
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err("unclosed `(`".into());
    }
    if in_class {
        return Err("unclosed `[`".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(json: &str) -> QueryError {
        parse_query(json.as_bytes()).expect_err("query should be refused")
    }

    const BASE: &str = r#"{"kind":"trends","date_range":{"from":"2024-01-01","to":"2024-01-02"},"series":[{"event":"a"}]}"#;

    #[test]
    fn a_minimal_query_parses_with_defaults() {
        let Query::Trends(q) = parse_query(BASE.as_bytes()).unwrap();
        assert_eq!(q.timezone, "UTC");
        assert_eq!(q.interval, Interval::Day);
        assert_eq!(q.series[0].math, Math::Total);
        assert_eq!(q.series_id(0), "A");
    }

    #[test]
    fn errors_name_the_field() {
        let e = err(
            r#"{"kind":"trends","date_range":{"from":"2024-01-01","to":"2024-01-02"},"series":[{"event":"a","math":"nope"}]}"#,
        );
        assert_eq!(e.field, "series[0].math");
        assert!(e.message.contains("unknown variant `nope`"), "{e}");

        let e = err(r#"{"kind":"trends","date_range":{"from":"2024-01-01"},"series":[]}"#);
        assert_eq!(e.field, "date_range.to");
        assert!(e.message.contains("missing field `to`"), "{e}");

        let e = err(r#"{"kind":"trends","series":[]}"#);
        assert_eq!(e.field, "date_range");

        let e = err(
            r#"{"kind":"trends","date_range":{"from":"2024-01-03","to":"2024-01-02"},"series":[{"event":"a"}]}"#,
        );
        assert_eq!(e.field, "date_range");

        let e = err(
            r#"{"kind":"trends","timezone":"Mars/Base","date_range":{"from":"2024-01-01","to":"2024-01-02"},"series":[{"event":"a"}]}"#,
        );
        assert_eq!(e.field, "timezone");

        let e = err(
            r#"{"kind":"trends","date_range":{"from":"2024-01-01","to":"2024-01-02"},"series":[{"event":"a","filters":[{"key":"x","op":"gt","value":"abc"}]}]}"#,
        );
        assert_eq!(e.field, "series[0].filters[0].value");

        let e = err(
            r#"{"kind":"trends","date_range":{"from":"2024-01-01","to":"2024-01-02"},"series":[{"event":"a"}],"bogus":1}"#,
        );
        assert!(e.message.contains("unknown field `bogus`"), "{e}");

        let e = err(r#"{"kind":"funnels"}"#);
        assert_eq!(e.field, "kind");
        assert!(e.message.contains("unknown query kind `funnels`"), "{e}");

        let e = err("{not json");
        assert_eq!(e.field, ".");
    }

    #[test]
    fn relative_dates_resolve() {
        assert_eq!(resolve_date_operand("-1d", 86_400_000), Some(0));
        assert_eq!(
            resolve_date_operand("2024-01-01", 0),
            Some(1_704_067_200_000)
        );
        assert_eq!(resolve_date_operand("yesterday", 0), None);
    }
}
