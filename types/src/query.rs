//! The public JSON query format (`spec/analytics.md`) and its validation.
//!
//! Parsing is strict: unknown fields, unknown option values and inconsistent combinations are
//! refused with a [`QueryError`] that names the offending field by its JSON path
//! (`series[1].math`), so a user can fix the query without reading our source.

pub mod behaviour;

pub use behaviour::{
    CohortQuery, CohortTimelineQuery, FunnelQuery, IdentityQuery, LifecycleQuery, PathsQuery,
    RetentionQuery, StickinessQuery,
};

use crate::formula::{DivideByZero, Formula};
use crate::stats::{Aggregate, PerUnit};
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
    /// Funnels, §3.
    Funnel(FunnelQuery),
    /// Funnel conversion by entry period, §3.8.
    FunnelTrends(FunnelQuery),
    /// Retention, §4.
    Retention(RetentionQuery),
    /// Stickiness, §5.
    Stickiness(StickinessQuery),
    /// Lifecycle, §6.
    Lifecycle(LifecycleQuery),
    /// User paths, §7.
    Paths(PathsQuery),
    /// Cohort membership at an instant, §8.1.
    Cohort(CohortQuery),
    /// Cohort entries and exits over time, §8.2.
    CohortTimeline(CohortTimelineQuery),
    /// What identity merges change, §9.
    Identity(IdentityQuery),
}

/// The query kinds this build answers.
pub const SUPPORTED_KINDS: &[&str] = &[
    "trends",
    "funnel",
    "funnel_trends",
    "retention",
    "stickiness",
    "lifecycle",
    "paths",
    "cohort",
    "cohort_timeline",
    "identity",
];

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
        "funnel" => Query::Funnel(from_value(value)?),
        "funnel_trends" => Query::FunnelTrends(from_value(value)?),
        "retention" => Query::Retention(from_value(value)?),
        "stickiness" => Query::Stickiness(from_value(value)?),
        "lifecycle" => Query::Lifecycle(from_value(value)?),
        "paths" => Query::Paths(from_value(value)?),
        "cohort" => Query::Cohort(from_value(value)?),
        "cohort_timeline" => Query::CohortTimeline(from_value(value)?),
        "identity" => Query::Identity(from_value(value)?),
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
        Query::Funnel(q) | Query::FunnelTrends(q) => q.validate()?,
        Query::Retention(q) => q.validate()?,
        Query::Stickiness(q) => q.validate()?,
        Query::Lifecycle(q) => q.validate()?,
        Query::Paths(q) => q.validate()?,
        Query::Cohort(q) => q.validate()?,
        Query::CohortTimeline(q) => q.validate()?,
        Query::Identity(q) => q.validate()?,
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
    /// Number of distinct `$session_id` values (unset and empty ones skipped).
    UniqueSessions,
    /// Rolling 7-day active persons per day (§2.2); daily interval only.
    WeeklyActive,
    /// Rolling 30-day active persons per day (§2.2); daily interval only.
    MonthlyActive,
    /// Sum of a numeric property.
    Sum,
    /// Average of a numeric property.
    Avg,
    /// Minimum of a numeric property.
    Min,
    /// Maximum of a numeric property.
    Max,
    /// Median of a numeric property.
    Median,
    /// 75th percentile of a numeric property.
    P75,
    /// 90th percentile of a numeric property.
    P90,
    /// 95th percentile of a numeric property.
    P95,
    /// 99th percentile of a numeric property.
    P99,
    /// Per-user (two-stage) math, §2.3: the average over persons of their `per_user` value.
    AvgPerUser,
    /// The smallest per-person value.
    MinPerUser,
    /// The largest per-person value.
    MaxPerUser,
    /// The median per-person value.
    MedianPerUser,
    /// The 75th percentile of per-person values.
    P75PerUser,
    /// The 90th percentile of per-person values.
    P90PerUser,
    /// The 95th percentile of per-person values.
    P95PerUser,
    /// The 99th percentile of per-person values.
    P99PerUser,
}

impl Math {
    /// The aggregate of event-level property math (`sum` … `p99`).
    pub fn property_aggregate(self) -> Option<Aggregate> {
        Some(match self {
            Math::Sum => Aggregate::Sum,
            Math::Avg => Aggregate::Avg,
            Math::Min => Aggregate::Min,
            Math::Max => Aggregate::Max,
            Math::Median => Aggregate::Quantile(0.5),
            Math::P75 => Aggregate::Quantile(0.75),
            Math::P90 => Aggregate::Quantile(0.9),
            Math::P95 => Aggregate::Quantile(0.95),
            Math::P99 => Aggregate::Quantile(0.99),
            _ => return None,
        })
    }

    /// Stage 2 of per-user math (`avg_per_user` … `p99_per_user`).
    pub fn per_user_aggregate(self) -> Option<Aggregate> {
        Some(match self {
            Math::AvgPerUser => Aggregate::Avg,
            Math::MinPerUser => Aggregate::Min,
            Math::MaxPerUser => Aggregate::Max,
            Math::MedianPerUser => Aggregate::Quantile(0.5),
            Math::P75PerUser => Aggregate::Quantile(0.75),
            Math::P90PerUser => Aggregate::Quantile(0.9),
            Math::P95PerUser => Aggregate::Quantile(0.95),
            Math::P99PerUser => Aggregate::Quantile(0.99),
            _ => return None,
        })
    }

    /// The rolling window in days of active-user math.
    pub fn rolling_days(self) -> Option<usize> {
        match self {
            Math::WeeklyActive => Some(7),
            Math::MonthlyActive => Some(30),
            _ => None,
        }
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
    /// The property of property math (and of per-user math other than counts).
    #[serde(default)]
    pub property: Option<String>,
    /// Stage 1 of per-user math: `count` (default without a property), `sum` (default with
    /// one), `avg`, `min`, `max`.
    #[serde(default)]
    pub per_user: Option<PerUnit>,
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
    /// The event's person is in the cohort `cohort` (a segment).
    InCohort,
    /// The event's person is not in the cohort `cohort`.
    NotInCohort,
}

/// Whose property a filter reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PropertySource {
    /// The event's own properties.
    #[default]
    Event,
    /// The person's current properties.
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
    /// The cohort of `in_cohort` / `not_in_cohort`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cohort: Option<Box<behaviour::CohortCondition>>,
    /// When the cohort is evaluated (default: when the query runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evaluate_at: Option<chrono::DateTime<chrono::Utc>>,
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
    /// A formula over the series ids (§2.4), evaluated per bucket and over the range totals.
    #[serde(default)]
    pub formula: Option<String>,
    /// Also answer the previous period of the same length (§2.6).
    #[serde(default)]
    pub compare_previous: bool,
    /// What a division by zero gives in formulas (`null` by default).
    #[serde(default)]
    pub divide_by_zero: Option<DivideByZero>,
    /// How bucket values are shown (§2.8).
    #[serde(default)]
    pub display: Display,
    /// The number of buckets a moving average spans (`moving_average` only; default 7).
    #[serde(default)]
    pub smoothing_intervals: Option<usize>,
    /// Logarithmic display: points that are not positive cannot be drawn and become gaps.
    #[serde(default)]
    pub log_scale: bool,
}

/// How a trends answer shows bucket values (§2.8); range totals are never transformed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Display {
    /// The buckets' own values.
    #[default]
    Linear,
    /// Each bucket covers `[from, bucket end]`: a running sum for counts and sums, cumulative
    /// distinct for unique math, the aggregate recomputed over the prefix otherwise.
    Cumulative,
    /// The trailing mean of the last `smoothing_intervals` bucket values.
    MovingAverage,
}

/// The default span of a moving average.
pub const DEFAULT_SMOOTHING_INTERVALS: usize = 7;
/// The id of formula rows in the Arrow answer, which no series may take when a formula is set.
pub const FORMULA_ID: &str = "formula";

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

    /// The parsed formula (valid after [`TrendsQuery::validate`]).
    pub fn parsed_formula(&self) -> Option<Formula> {
        self.formula.as_deref().and_then(|f| Formula::parse(f).ok())
    }

    /// The previous period of §2.6: as many days, ending the day before `from`.
    pub fn previous_range(&self) -> DateRange {
        let DateRange { from, to } = self.date_range;
        let days = (to - from).num_days() + 1;
        DateRange {
            from: from - chrono::Duration::days(days),
            to: from - chrono::Duration::days(1),
        }
    }

    /// The moving average's span.
    pub fn smoothing(&self) -> usize {
        self.smoothing_intervals
            .unwrap_or(DEFAULT_SMOOTHING_INTERVALS)
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
            self.validate_math(s, &field)?;
            if self.formula.is_some() && id == FORMULA_ID {
                return Err(QueryError::new(
                    format!("{field}.id"),
                    format!("`{FORMULA_ID}` names the formula's rows: choose another series id"),
                ));
            }
            validate_filters(&s.filters, &format!("{field}.filters"), 0)?;
        }
        validate_filters(&self.filters, "filters", 0)?;
        if let Some(b) = &self.breakdown {
            if b.property.is_empty() {
                return Err(QueryError::new("breakdown.property", "must not be empty"));
            }
            if b.limit == 0 || b.limit > 10_000 {
                return Err(QueryError::new(
                    "breakdown.limit",
                    "must be between 1 and 10000",
                ));
            }
        }
        if let Some(text) = &self.formula {
            let formula = Formula::parse(text)
                .map_err(|e| QueryError::new("formula", format!("cannot parse formula: {e}")))?;
            for name in formula.series_ids() {
                if !ids.contains(name) {
                    let mut known: Vec<&str> = ids.iter().map(String::as_str).collect();
                    known.sort_unstable();
                    return Err(QueryError::new(
                        "formula",
                        format!("unknown series id `{name}` (series: {})", known.join(", ")),
                    ));
                }
            }
        } else if self.divide_by_zero.is_some() {
            return Err(QueryError::new(
                "divide_by_zero",
                "only a query with a `formula` divides",
            ));
        }
        if self.compare_previous {
            let DateRange { from, to } = self.date_range;
            let days = (to - from).num_days() + 1;
            if from
                .checked_sub_signed(chrono::Duration::days(days))
                .is_none()
            {
                return Err(QueryError::new(
                    "compare_previous",
                    "the previous period is before the earliest date",
                ));
            }
        }
        match (self.display, self.smoothing_intervals) {
            (Display::MovingAverage, Some(k)) if k == 0 || k > MAX_BUCKETS as usize => {
                return Err(QueryError::new(
                    "smoothing_intervals",
                    format!("must be between 1 and {MAX_BUCKETS}"),
                ));
            }
            (Display::Linear | Display::Cumulative, Some(_)) => {
                return Err(QueryError::new(
                    "smoothing_intervals",
                    "only `display: moving_average` takes smoothing intervals",
                ));
            }
            _ => {}
        }
        if self.display == Display::Cumulative {
            for (i, s) in self.series.iter().enumerate() {
                // Rolling windows already look back, and a cumulative per-user value would
                // need every person's state per bucket prefix: both are refused, not guessed.
                if s.math.rolling_days().is_some() || s.math.per_user_aggregate().is_some() {
                    return Err(QueryError::new(
                        "display",
                        format!(
                            "`cumulative` is not defined for math `{}` of series[{i}]",
                            s.math.name()
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The math of one series and the fields that go with it (`property`, `per_user`).
    fn validate_math(&self, s: &Series, field: &str) -> Result<(), QueryError> {
        let math = s.math.name();
        if let Some(days) = s.math.rolling_days()
            && self.interval != Interval::Day
        {
            return Err(QueryError::new(
                format!("{field}.math"),
                format!(
                    "`{math}` counts persons active in the {days} days up to each day and needs \
                     `interval: day` (use `unique_users` for distinct persons per calendar \
                     week or month)"
                ),
            ));
        }
        let per_user = s.math.per_user_aggregate().is_some();
        if s.per_user.is_some() && !per_user {
            return Err(QueryError::new(
                format!("{field}.per_user"),
                format!("math `{math}` is not per-user math (`avg_per_user`, …)"),
            ));
        }
        let needs_property = s.math.property_aggregate().is_some()
            || (per_user && s.per_user.is_some_and(PerUnit::needs_property));
        let takes_property = needs_property || (per_user && s.per_user.is_none());
        match &s.property {
            None if needs_property => Err(QueryError::new(
                format!("{field}.property"),
                format!("math `{math}` needs a numeric `property`"),
            )),
            Some(_) if !takes_property => Err(QueryError::new(
                format!("{field}.property"),
                if per_user {
                    "`per_user: count` counts events and takes no property".to_string()
                } else {
                    format!("math `{math}` takes no property")
                },
            )),
            Some(p) if p.is_empty() => Err(QueryError::new(
                format!("{field}.property"),
                "must not be empty",
            )),
            _ => Ok(()),
        }
    }

    /// Stage 1 of per-user math of series `i`: as given, else a sum of the property if there
    /// is one, else the event count.
    pub fn per_unit(&self, i: usize) -> PerUnit {
        let s = &self.series[i];
        s.per_user.unwrap_or(if s.property.is_some() {
            PerUnit::Sum
        } else {
            PerUnit::Count
        })
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
            InCohort | NotInCohort => {
                if self.key.is_some() || self.value.is_some() || !self.filters.is_empty() {
                    return Err(QueryError::new(
                        field,
                        "a cohort filter takes `cohort` (and `evaluate_at`), not `key`, `value` \
                         or `filters`",
                    ));
                }
                return match &self.cohort {
                    None => Err(QueryError::new(
                        format!("{field}.cohort"),
                        "missing the cohort condition",
                    )),
                    Some(c) => c.validate(&format!("{field}.cohort"), 0),
                };
            }
            _ => {}
        }
        if self.cohort.is_some() || self.evaluate_at.is_some() {
            return Err(QueryError::new(
                format!("{field}.cohort"),
                "only `in_cohort` / `not_in_cohort` filters take a cohort",
            ));
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
            And | Or | InCohort | NotInCohort => {}
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
        let Ok(Query::Trends(q)) = parse_query(BASE.as_bytes()) else {
            panic!("a trends query")
        };
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

    /// A trends query with `extra` fields merged into a one-day, one-series query.
    fn trends_err(series: &str, extra: &str) -> QueryError {
        err(&format!(
            r#"{{"kind":"trends","date_range":{{"from":"2024-01-01","to":"2024-01-02"}},"series":[{series}]{extra}}}"#
        ))
    }

    fn trends_ok(series: &str, extra: &str) -> TrendsQuery {
        let json = format!(
            r#"{{"kind":"trends","date_range":{{"from":"2024-01-01","to":"2024-01-07"}},"series":[{series}]{extra}}}"#
        );
        match parse_query(json.as_bytes()) {
            Ok(Query::Trends(q)) => q,
            other => panic!("{json}: {other:?}"),
        }
    }

    #[test]
    fn trends_math_checks_its_property() {
        let e = trends_err(r#"{"event":"a","math":"sum"}"#, "");
        assert_eq!(e.field, "series[0].property");
        let e = trends_err(r#"{"event":"a","math":"unique_users","property":"x"}"#, "");
        assert_eq!(e.field, "series[0].property");
        let e = trends_err(r#"{"event":"a","math":"p90","property":""}"#, "");
        assert_eq!(e.field, "series[0].property");
        let e = trends_err(r#"{"event":"a","math":"total","per_user":"sum"}"#, "");
        assert_eq!(e.field, "series[0].per_user");
        let e = trends_err(
            r#"{"event":"a","math":"avg_per_user","per_user":"count","property":"x"}"#,
            "",
        );
        assert_eq!(e.field, "series[0].property");
        let e = trends_err(
            r#"{"event":"a","math":"avg_per_user","per_user":"max"}"#,
            "",
        );
        assert_eq!(e.field, "series[0].property");
        let e = trends_err(
            r#"{"event":"a","math":"weekly_active"}"#,
            r#","interval":"week""#,
        );
        assert_eq!(e.field, "series[0].math");
        assert!(e.message.contains("interval: day"), "{e}");
        let q = trends_ok(
            r#"{"math":"median","property":"x"},{"math":"avg_per_user"},{"math":"max_per_user","property":"d"},{"math":"unique_sessions"},{"math":"monthly_active"}"#,
            "",
        );
        assert_eq!(
            q.series[0].math.property_aggregate(),
            Some(Aggregate::Quantile(0.5))
        );
        assert_eq!(q.per_unit(1), PerUnit::Count);
        assert_eq!(q.per_unit(2), PerUnit::Sum);
    }

    #[test]
    fn formulas_name_the_formula_field() {
        let q = trends_ok(
            r#"{"id":"A"},{"id":"B"}"#,
            r#","formula":"A / B * 100","divide_by_zero":"zero""#,
        );
        assert_eq!(q.divide_by_zero, Some(DivideByZero::Zero));
        assert!(q.parsed_formula().is_some());
        let e = trends_err(r#"{"id":"A"}"#, r#","formula":"A / C""#);
        assert_eq!(e.field, "formula");
        assert!(e.message.contains("unknown series id `C`"), "{e}");
        let e = trends_err(r#"{"id":"A"}"#, r#","formula":"A /""#);
        assert_eq!(e.field, "formula");
        let e = trends_err(r#"{"id":"A"}"#, r#","formula":"A","divide_by_zero":"nan""#);
        assert_eq!(e.field, "divide_by_zero");
        let e = trends_err(r#"{"id":"A"}"#, r#","divide_by_zero":"zero""#);
        assert_eq!(e.field, "divide_by_zero");
        let e = trends_err(r#"{"id":"formula"}"#, r#","formula":"formula""#);
        assert_eq!(e.field, "series[0].id");
    }

    #[test]
    fn display_modes_and_previous_period() {
        let q = trends_ok(
            r#"{"event":"a"}"#,
            r#","display":"moving_average","smoothing_intervals":2,"log_scale":true,"compare_previous":true"#,
        );
        assert_eq!(
            (q.display, q.smoothing(), q.log_scale),
            (Display::MovingAverage, 2, true)
        );
        let p = q.previous_range();
        assert_eq!(
            (p.from.to_string(), p.to.to_string()),
            ("2023-12-25".into(), "2023-12-31".into())
        );
        let e = trends_err(r#"{"event":"a"}"#, r#","display":"stacked""#);
        assert_eq!(e.field, "display");
        let e = trends_err(r#"{"event":"a"}"#, r#","smoothing_intervals":3"#);
        assert_eq!(e.field, "smoothing_intervals");
        let e = trends_err(
            r#"{"event":"a"}"#,
            r#","display":"moving_average","smoothing_intervals":0"#,
        );
        assert_eq!(e.field, "smoothing_intervals");
        let e = trends_err(
            r#"{"event":"a","math":"weekly_active"}"#,
            r#","display":"cumulative""#,
        );
        assert_eq!(e.field, "display");
    }
}
