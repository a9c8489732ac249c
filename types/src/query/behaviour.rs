//! The query format of the person-level insights (`spec/analytics.md` §3–§9): funnels and
//! funnel trends, retention, stickiness, lifecycle, paths, cohorts and the identity report.
//!
//! Every struct denies unknown fields and every option is a closed enum, so a value the spec
//! does not define is refused with a [`QueryError`] naming the field; `validate` checks what
//! serde cannot (ranges, step references, filters).

use super::{
    DateRange, Filter, FilterOp, MAX_BUCKETS, QueryError, default_timezone, validate_filters,
};
use crate::time::{Buckets, Interval, WeekStart, bucket_count_estimate};
use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The most steps a funnel may have (steps and exclusions share one 64-bit tag per event).
pub const MAX_STEPS: usize = 20;
/// The most exclusions a funnel may have.
pub const MAX_EXCLUSIONS: usize = 20;
/// The longest conversion window: one year and a day.
pub const MAX_WINDOW_SECONDS: i64 = 366 * 86_400;

/// The events an insight step, series or condition matches: one event name (or any event)
/// and filters on its properties.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct EventSelector {
    /// The event name; absent means any event.
    #[serde(default)]
    pub event: Option<String>,
    /// Filters on the event's properties, AND-ed.
    #[serde(default)]
    pub filters: Vec<Filter>,
}

impl EventSelector {
    fn validate(&self, field: &str) -> Result<(), QueryError> {
        if self.event.as_deref() == Some("") {
            return Err(QueryError::new(
                format!("{field}.event"),
                "must not be empty",
            ));
        }
        validate_filters(&self.filters, &format!("{field}.filters"), 0)
    }

    /// Validates the selector of a cohort condition: its filters may not name cohorts
    /// themselves (combine conditions with `and`/`or`/`not` instead).
    fn validate_in_cohort(&self, field: &str) -> Result<(), QueryError> {
        self.validate(field)?;
        let mut cohorts = Vec::new();
        cohort_filters(&self.filters, &mut cohorts);
        if !cohorts.is_empty() {
            return Err(QueryError::new(
                format!("{field}.filters"),
                "a cohort condition's events cannot be filtered by another cohort; combine \
                 conditions with `and`, `or` and `not`",
            ));
        }
        Ok(())
    }
}

/// Every `in_cohort` / `not_in_cohort` filter in `filters`, nested groups included.
pub fn cohort_filters<'a>(filters: &'a [Filter], out: &mut Vec<&'a Filter>) {
    for f in filters {
        if matches!(f.op, FilterOp::InCohort | FilterOp::NotInCohort) {
            out.push(f);
        }
        cohort_filters(&f.filters, out);
    }
}

/// Every cohort filter of a query (segments), in a fixed order.
pub fn query_cohort_filters(q: &super::Query) -> Vec<&Filter> {
    let mut out = Vec::new();
    for l in query_filter_lists(q) {
        cohort_filters(l, &mut out);
    }
    out
}

/// The person properties a query reads (filters of `type: person`, person breakdowns),
/// sorted and distinct.
pub fn query_person_properties(q: &super::Query) -> Vec<String> {
    fn walk(filters: &[Filter], out: &mut Vec<String>) {
        for f in filters {
            if f.source == super::PropertySource::Person
                && let Some(k) = &f.key
            {
                out.push(k.clone());
            }
            walk(&f.filters, out);
        }
    }
    let mut out = Vec::new();
    for l in query_filter_lists(q) {
        walk(l, &mut out);
    }
    // The events of cohort conditions are selected by filters too: those of the query's
    // cohort filters (segments), and of cohort and cohort-timeline queries.
    let mut conditions: Vec<&CohortCondition> = query_cohort_filters(q)
        .into_iter()
        .filter_map(|f| f.cohort.as_deref())
        .collect();
    match q {
        super::Query::Cohort(c) => conditions.extend(c.cohorts.values()),
        super::Query::CohortTimeline(t) => conditions.push(&t.cohort),
        _ => {}
    }
    for c in conditions {
        for s in c.selectors() {
            walk(&s.filters, &mut out);
        }
    }
    match q {
        super::Query::Trends(t) => {
            if let Some(b) = &t.breakdown
                && b.source == super::PropertySource::Person
            {
                out.push(b.property.clone());
            }
        }
        super::Query::Funnel(f) | super::Query::FunnelTrends(f) => {
            if let Some(b) = &f.breakdown
                && b.source == super::PropertySource::Person
            {
                out.push(b.property.clone());
            }
        }
        _ => {}
    }
    out.sort();
    out.dedup();
    out
}

/// Every list of filters in a query.
fn query_filter_lists(q: &super::Query) -> Vec<&[Filter]> {
    use super::Query;
    let mut lists: Vec<&[Filter]> = Vec::new();
    match q {
        Query::Trends(t) => {
            lists.push(&t.filters);
            lists.extend(t.series.iter().map(|s| s.filters.as_slice()));
        }
        Query::Funnel(f) | Query::FunnelTrends(f) => {
            lists.push(&f.filters);
            lists.extend(f.steps.iter().map(|s| s.filters.as_slice()));
            lists.extend(f.exclusions.iter().map(|x| x.filters.as_slice()));
        }
        Query::Retention(r) => {
            lists.push(&r.filters);
            lists.push(&r.start.filters);
            lists.push(&r.return_event.filters);
        }
        Query::Stickiness(s) => {
            lists.push(&s.filters);
            lists.push(&s.series.filters);
        }
        Query::Lifecycle(l) => {
            lists.push(&l.filters);
            lists.push(&l.series.filters);
        }
        Query::Paths(p) => lists.push(&p.filters),
        Query::Identity(i) => lists.extend(i.funnel.steps.iter().map(|s| s.filters.as_slice())),
        Query::Cohort(_) | Query::CohortTimeline(_) => {}
    }
    lists
}

/// The time zone, range and calendar of a query.
fn check_calendar(timezone: &str, range: &DateRange, interval: Interval) -> Result<(), QueryError> {
    if timezone.parse::<Tz>().is_err() {
        return Err(QueryError::new(
            "timezone",
            format!("unknown IANA time zone `{timezone}`"),
        ));
    }
    if range.from > range.to {
        return Err(QueryError::new(
            "date_range",
            format!("`from` ({}) is after `to` ({})", range.from, range.to),
        ));
    }
    if bucket_count_estimate(range.from, range.to, interval) > MAX_BUCKETS {
        return Err(QueryError::new(
            "date_range",
            format!("the range has more than {MAX_BUCKETS} buckets at this interval"),
        ));
    }
    Ok(())
}

fn tz_of(timezone: &str) -> Tz {
    timezone.parse().unwrap_or(Tz::UTC)
}

/// How steps must follow each other (§3.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FunnelOrder {
    /// Steps in order; other events may come between.
    #[default]
    Ordered,
    /// Steps in order with no other event of the person between them.
    Strict,
    /// Steps in any order within one window.
    Unordered,
}

/// Which step-1 events start attempts (§3.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttemptPolicy {
    /// Every step-1 event starts an attempt; a unit's result is its furthest attempt, and the
    /// earliest of the furthest defines attribution and time to convert.
    #[default]
    Best,
    /// Only the unit's first step-1 event in the range starts an attempt.
    FirstEntry,
}

/// What an exclusion event does to the attempt it falls into (§3.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExclusionPolicy {
    /// A unit whose furthest attempt is tainted leaves every step, unless a clean attempt
    /// reaches as far.
    #[default]
    DropUser,
    /// The attempt ends at the last step it reached before the exclusion.
    EndAttempt,
}

/// An exclusion: events that must not happen between two steps of an attempt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Exclusion {
    /// The excluded event.
    pub event: String,
    /// Filters on it.
    #[serde(default)]
    pub filters: Vec<Filter>,
    /// The step (0-based) after which the exclusion applies.
    pub from_step: usize,
    /// The step (0-based) before which it applies.
    pub to_step: usize,
}

/// Which of a unit's values labels it in a funnel breakdown (§3.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Attribution {
    /// The earliest value set on any of the unit's step events in the range.
    FirstTouch,
    /// The latest value set on them.
    LastTouch,
    /// The value on the event that filled step `k` (1-based) of the defining attempt (the
    /// earliest of the furthest).
    Step(usize),
}

impl Serialize for Attribution {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Attribution::FirstTouch => s.serialize_str("first_touch"),
            Attribution::LastTouch => s.serialize_str("last_touch"),
            Attribution::Step(k) => s.serialize_str(&format!("step_{k}_earliest_longest")),
        }
    }
}

impl<'de> Deserialize<'de> for Attribution {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Attribution, D::Error> {
        let text = String::deserialize(d)?;
        let step = text
            .strip_prefix("step_")
            .and_then(|rest| rest.strip_suffix("_earliest_longest"))
            .and_then(|k| k.parse::<usize>().ok())
            .filter(|k| *k >= 1);
        match (text.as_str(), step) {
            ("first_touch", _) => Ok(Attribution::FirstTouch),
            ("last_touch", _) => Ok(Attribution::LastTouch),
            (_, Some(k)) => Ok(Attribution::Step(k)),
            _ => Err(serde::de::Error::custom(format!(
                "unknown attribution `{text}` (expected first_touch, last_touch or \
                 step_<k>_earliest_longest)"
            ))),
        }
    }
}

fn default_attribution() -> Attribution {
    Attribution::FirstTouch
}

fn default_breakdown_limit() -> usize {
    25
}

/// A funnel breakdown by an event property.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunnelBreakdown {
    /// The property.
    pub property: String,
    /// Whose property: the event's (default) or the person's current value.
    #[serde(default, rename = "type")]
    pub source: super::PropertySource,
    /// Which value labels a unit.
    #[serde(default = "default_attribution")]
    pub attribution: Attribution,
    /// How many values to show (ranked by units entering); the rest fold into `(other)`.
    #[serde(default = "default_breakdown_limit")]
    pub limit: usize,
}

fn default_window() -> i64 {
    14 * 86_400
}

/// A funnel (§3): its steps and policies. Also the body of a funnel-trends query.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunnelQuery {
    /// IANA time zone of the range.
    #[serde(default = "default_timezone")]
    pub timezone: String,
    /// Step 1 must fall in this range; later steps may follow up to the window after it.
    pub date_range: DateRange,
    /// The steps, 2 to 20.
    pub steps: Vec<EventSelector>,
    /// Conversion window from step 1, inclusive, in seconds (default 14 days).
    #[serde(default = "default_window")]
    pub window_seconds: i64,
    /// Step order.
    #[serde(default)]
    pub order: FunnelOrder,
    /// Which step-1 events start attempts.
    #[serde(default)]
    pub attempt_policy: AttemptPolicy,
    /// Events that must not happen between steps.
    #[serde(default)]
    pub exclusions: Vec<Exclusion>,
    /// What an exclusion does.
    #[serde(default)]
    pub exclusion_policy: ExclusionPolicy,
    /// Filters applied to every step.
    #[serde(default)]
    pub filters: Vec<Filter>,
    /// Optional breakdown.
    #[serde(default)]
    pub breakdown: Option<FunnelBreakdown>,
    /// Event properties held constant (at most 3): every step event of an attempt carries
    /// the same values, and the counting unit becomes (person, values) (§3.6).
    #[serde(default)]
    pub hold_constant: Vec<String>,
    /// Bins of the time-to-convert histogram (default: ⌈∛n⌉ clamped to 1..=60).
    #[serde(default)]
    pub histogram_bins: Option<usize>,
    /// Buckets of entry for funnel trends (default day).
    #[serde(default = "default_day")]
    pub interval: Interval,
    /// First day of weekly buckets.
    #[serde(default)]
    pub week_start: WeekStart,
}

fn default_day() -> Interval {
    Interval::Day
}

impl FunnelQuery {
    /// The parsed time zone.
    pub fn tz(&self) -> Tz {
        tz_of(&self.timezone)
    }

    /// The entry buckets (funnel trends) of the range.
    pub fn buckets(&self) -> Buckets {
        Buckets::new(
            self.date_range.from,
            self.date_range.to,
            self.tz(),
            self.interval,
            self.week_start,
        )
    }

    /// The window in milliseconds.
    pub fn window_ms(&self) -> i64 {
        self.window_seconds * 1000
    }

    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), QueryError> {
        check_calendar(&self.timezone, &self.date_range, self.interval)?;
        if self.steps.len() < 2 || self.steps.len() > MAX_STEPS {
            return Err(QueryError::new(
                "steps",
                format!("a funnel has 2 to {MAX_STEPS} steps"),
            ));
        }
        for (i, s) in self.steps.iter().enumerate() {
            s.validate(&format!("steps[{i}]"))?;
        }
        if self.window_seconds <= 0 || self.window_seconds > MAX_WINDOW_SECONDS {
            return Err(QueryError::new(
                "window_seconds",
                format!("must be between 1 and {MAX_WINDOW_SECONDS}"),
            ));
        }
        validate_filters(&self.filters, "filters", 0)?;
        if self.exclusions.len() > MAX_EXCLUSIONS {
            return Err(QueryError::new(
                "exclusions",
                format!("at most {MAX_EXCLUSIONS} exclusions are allowed"),
            ));
        }
        for (i, x) in self.exclusions.iter().enumerate() {
            let field = format!("exclusions[{i}]");
            if x.event.is_empty() {
                return Err(QueryError::new(
                    format!("{field}.event"),
                    "must not be empty",
                ));
            }
            validate_filters(&x.filters, &format!("{field}.filters"), 0)?;
            if x.from_step >= x.to_step || x.to_step >= self.steps.len() {
                return Err(QueryError::new(
                    format!("{field}.to_step"),
                    format!(
                        "an exclusion spans steps from_step < to_step < {} (0-based)",
                        self.steps.len()
                    ),
                ));
            }
            if self.order == FunnelOrder::Unordered
                && (x.from_step != 0 || x.to_step != self.steps.len() - 1)
            {
                return Err(QueryError::new(
                    format!("{field}.from_step"),
                    "an unordered funnel's exclusions must span the whole funnel",
                ));
            }
            let same_as_step = self.steps.iter().any(|s| {
                s.event.as_deref() == Some(x.event.as_str())
                    && s.filters.is_empty()
                    && x.filters.is_empty()
            });
            if same_as_step {
                return Err(QueryError::new(
                    format!("{field}.event"),
                    format!("`{}` is also a step of the funnel", x.event),
                ));
            }
        }
        if self.order == FunnelOrder::Unordered {
            for (i, s) in self.steps.iter().enumerate() {
                if self.steps[..i].contains(s) {
                    return Err(QueryError::new(
                        format!("steps[{i}]"),
                        "an unordered funnel cannot have the same step twice",
                    ));
                }
            }
        }
        if self.hold_constant.len() > 3 {
            return Err(QueryError::new(
                "hold_constant",
                "at most 3 properties can be held constant",
            ));
        }
        for (i, p) in self.hold_constant.iter().enumerate() {
            if p.is_empty() || self.hold_constant[..i].contains(p) {
                return Err(QueryError::new(
                    format!("hold_constant[{i}]"),
                    "must be a property name, given once",
                ));
            }
        }
        if let Some(bins) = self.histogram_bins
            && !(1..=90).contains(&bins)
        {
            return Err(QueryError::new(
                "histogram_bins",
                "must be between 1 and 90",
            ));
        }
        if let Some(b) = &self.breakdown {
            if b.property.is_empty() {
                return Err(QueryError::new("breakdown.property", "must not be empty"));
            }
            if let Attribution::Step(k) = b.attribution {
                if k > self.steps.len() {
                    return Err(QueryError::new(
                        "breakdown.attribution",
                        format!("the funnel has {} steps, not {k}", self.steps.len()),
                    ));
                }
                if self.order == FunnelOrder::Unordered && k != 1 {
                    return Err(QueryError::new(
                        "breakdown.attribution",
                        "an unordered funnel attributes to step 1 or by touch only",
                    ));
                }
            }
            if b.limit == 0 || b.limit > 10_000 {
                return Err(QueryError::new(
                    "breakdown.limit",
                    "must be between 1 and 10000",
                ));
            }
        }
        Ok(())
    }
}

/// Who joins a retention cohort (§4.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CohortType {
    /// A unit's cohort is the period of its first-ever start event, if inside the range.
    #[default]
    FirstTime,
    /// A unit joins the cohort of every period in which it did the start event.
    Recurring,
}

/// How retention periods are measured (§4.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimeMode {
    /// Period k is the calendar bucket k after the cohort's.
    Calendar,
    /// Period k is `[t0 + k·P, t0 + (k+1)·P)` from the unit's own start instant (P = 1 h, 24 h,
    /// 7 days or 30 days).
    #[serde(rename = "rolling_24h", alias = "rolling")]
    Rolling,
}

/// What counts as retained in column k (§4.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Counting {
    /// Returned in period k.
    #[default]
    Bounded,
    /// Returned in period k or any later observable period.
    Unbounded,
}

/// A retention query (§4).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionQuery {
    /// IANA time zone.
    #[serde(default = "default_timezone")]
    pub timezone: String,
    /// Cohorts are the periods of this range.
    pub date_range: DateRange,
    /// The cohorting event.
    pub start: EventSelector,
    /// The return event.
    #[serde(rename = "return")]
    pub return_event: EventSelector,
    /// First-time or recurring cohorts.
    #[serde(default)]
    pub cohort_type: CohortType,
    /// Period length.
    #[serde(default = "default_day")]
    pub period: Interval,
    /// Columns, including column 0 (the cohort itself).
    #[serde(default = "default_periods")]
    pub total_periods: usize,
    /// Calendar or rolling periods; default rolling for days and hours, calendar otherwise.
    #[serde(default)]
    pub time_mode: Option<TimeMode>,
    /// Bounded or unbounded counting.
    #[serde(default)]
    pub counting: Counting,
    /// Filters applied to start and return events.
    #[serde(default)]
    pub filters: Vec<Filter>,
    /// First day of weekly periods.
    #[serde(default)]
    pub week_start: WeekStart,
}

fn default_periods() -> usize {
    8
}

/// The most retention columns.
pub const MAX_PERIODS: usize = 400;

impl RetentionQuery {
    /// The parsed time zone.
    pub fn tz(&self) -> Tz {
        tz_of(&self.timezone)
    }

    /// The cohort periods.
    pub fn buckets(&self) -> Buckets {
        Buckets::new(
            self.date_range.from,
            self.date_range.to,
            self.tz(),
            self.period,
            self.week_start,
        )
    }

    /// The effective time mode.
    pub fn mode(&self) -> TimeMode {
        self.time_mode.unwrap_or(match self.period {
            Interval::Hour | Interval::Day => TimeMode::Rolling,
            Interval::Week | Interval::Month => TimeMode::Calendar,
        })
    }

    /// The length of a rolling period, ms.
    pub fn rolling_period_ms(&self) -> i64 {
        fixed_period_ms(self.period)
    }

    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), QueryError> {
        check_calendar(&self.timezone, &self.date_range, self.period)?;
        self.start.validate("start")?;
        self.return_event.validate("return")?;
        validate_filters(&self.filters, "filters", 0)?;
        if self.total_periods == 0 || self.total_periods > MAX_PERIODS {
            return Err(QueryError::new(
                "total_periods",
                format!("must be between 1 and {MAX_PERIODS}"),
            ));
        }
        Ok(())
    }
}

/// The fixed length of a rolling period: 1 hour, 24 hours, 7 days or 30 days (ms).
pub fn fixed_period_ms(interval: Interval) -> i64 {
    match interval {
        Interval::Hour => 3_600_000,
        Interval::Day => 86_400_000,
        Interval::Week => 7 * 86_400_000,
        Interval::Month => 30 * 86_400_000,
    }
}

/// The series of a stickiness or lifecycle query.
pub type ActivitySeries = EventSelector;

/// A stickiness query (§5).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StickinessQuery {
    /// IANA time zone.
    #[serde(default = "default_timezone")]
    pub timezone: String,
    /// The range, split into intervals.
    pub date_range: DateRange,
    /// Interval width.
    #[serde(default = "default_day")]
    pub interval: Interval,
    /// First day of weekly intervals.
    #[serde(default)]
    pub week_start: WeekStart,
    /// The event counted.
    pub series: ActivitySeries,
    /// An interval counts for a unit when it did the event at least this often in it.
    #[serde(default = "default_one")]
    pub min_per_interval: u64,
    /// Filters applied to the series.
    #[serde(default)]
    pub filters: Vec<Filter>,
}

fn default_one() -> u64 {
    1
}

impl StickinessQuery {
    /// The intervals.
    pub fn buckets(&self) -> Buckets {
        Buckets::new(
            self.date_range.from,
            self.date_range.to,
            tz_of(&self.timezone),
            self.interval,
            self.week_start,
        )
    }

    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), QueryError> {
        check_calendar(&self.timezone, &self.date_range, self.interval)?;
        self.series.validate("series")?;
        validate_filters(&self.filters, "filters", 0)?;
        if self.min_per_interval == 0 {
            return Err(QueryError::new("min_per_interval", "must be at least 1"));
        }
        Ok(())
    }
}

/// What makes a unit `new` in lifecycle (§6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NewDefinition {
    /// The period of the unit's first event of any kind (its person's creation).
    #[default]
    FirstSeenPeriod,
    /// The period of the unit's first event of this series.
    FirstEventPeriod,
}

/// A lifecycle query (§6).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LifecycleQuery {
    /// IANA time zone.
    #[serde(default = "default_timezone")]
    pub timezone: String,
    /// The periods shown.
    pub date_range: DateRange,
    /// Period width.
    #[serde(default = "default_day")]
    pub interval: Interval,
    /// First day of weekly periods.
    #[serde(default)]
    pub week_start: WeekStart,
    /// The event.
    pub series: ActivitySeries,
    /// What makes a unit new.
    #[serde(default)]
    pub new_definition: NewDefinition,
    /// Filters applied to the series.
    #[serde(default)]
    pub filters: Vec<Filter>,
}

impl LifecycleQuery {
    /// The parsed time zone.
    pub fn tz(&self) -> Tz {
        tz_of(&self.timezone)
    }

    /// The periods shown.
    pub fn buckets(&self) -> Buckets {
        Buckets::new(
            self.date_range.from,
            self.date_range.to,
            self.tz(),
            self.interval,
            self.week_start,
        )
    }

    /// Where the period before the first shown one starts (it ends where the range starts):
    /// the calendar period preceding the first shown period's calendar start (the hour before,
    /// for hours). Activity there classifies the first shown period (§6).
    pub fn previous_period_start_ms(&self) -> i64 {
        let shown = self.buckets();
        if self.interval == Interval::Hour {
            return shown.start_ms() - 3_600_000;
        }
        // Labels of days, weeks and months are their calendar start dates.
        let first = chrono::NaiveDate::parse_from_str(&shown.labels[0], "%Y-%m-%d")
            .unwrap_or(self.date_range.from);
        let before = match self.interval {
            Interval::Week => first.checked_sub_days(chrono::Days::new(7)),
            Interval::Month => first.checked_sub_months(chrono::Months::new(1)),
            Interval::Hour | Interval::Day => first.pred_opt(),
        }
        .unwrap_or(first);
        crate::time::local_midnight_ms(self.tz(), before)
    }

    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), QueryError> {
        check_calendar(&self.timezone, &self.date_range, self.interval)?;
        self.series.validate("series")?;
        validate_filters(&self.filters, "filters", 0)
    }
}

/// A path cleaning rule: items matching `regex` become `alias`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathCleaning {
    /// The pattern.
    pub regex: String,
    /// What matching items become.
    pub alias: String,
}

/// A paths query (§7).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathsQuery {
    /// IANA time zone.
    #[serde(default = "default_timezone")]
    pub timezone: String,
    /// Events in this range.
    pub date_range: DateRange,
    /// The events forming paths: `pageview`/`$pageview` items are URLs (`url`, else
    /// `$current_url`, trailing slash stripped), `$screen` items are `$screen_name`, other
    /// events are their names. Empty means every event, by name.
    #[serde(default)]
    pub event_types: Vec<String>,
    /// A gap this long or longer starts a new path instance.
    #[serde(default = "default_session_gap")]
    pub session_gap_seconds: i64,
    /// Items kept per instance.
    #[serde(default = "default_step_limit")]
    pub step_limit: usize,
    /// Paths start at the first occurrence of this item.
    #[serde(default)]
    pub start_point: Option<String>,
    /// Paths end at the first occurrence of this item.
    #[serde(default)]
    pub end_point: Option<String>,
    /// The heaviest edges kept.
    #[serde(default = "default_edge_limit")]
    pub edge_limit: usize,
    /// Edges lighter than this are dropped.
    #[serde(default)]
    pub min_edge_weight: Option<u64>,
    /// Edges heavier than this are dropped.
    #[serde(default)]
    pub max_edge_weight: Option<u64>,
    /// Regex → alias rules, first match wins.
    #[serde(default)]
    pub path_cleaning: Vec<PathCleaning>,
    /// Filters on the events.
    #[serde(default)]
    pub filters: Vec<Filter>,
}

fn default_session_gap() -> i64 {
    1800
}
fn default_step_limit() -> usize {
    5
}
fn default_edge_limit() -> usize {
    50
}

impl PathsQuery {
    /// The parsed time zone.
    pub fn tz(&self) -> Tz {
        tz_of(&self.timezone)
    }

    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), QueryError> {
        check_calendar(&self.timezone, &self.date_range, Interval::Day)?;
        if self.session_gap_seconds <= 0 || self.session_gap_seconds > MAX_WINDOW_SECONDS {
            return Err(QueryError::new(
                "session_gap_seconds",
                format!("must be between 1 and {MAX_WINDOW_SECONDS}"),
            ));
        }
        if !(2..=20).contains(&self.step_limit) {
            return Err(QueryError::new("step_limit", "must be between 2 and 20"));
        }
        if self.edge_limit == 0 || self.edge_limit > 10_000 {
            return Err(QueryError::new("edge_limit", "must be between 1 and 10000"));
        }
        if let (Some(min), Some(max)) = (self.min_edge_weight, self.max_edge_weight)
            && min > max
        {
            return Err(QueryError::new(
                "min_edge_weight",
                "is above max_edge_weight",
            ));
        }
        for (i, e) in self.event_types.iter().enumerate() {
            if e.is_empty() {
                return Err(QueryError::new(
                    format!("event_types[{i}]"),
                    "must not be empty",
                ));
            }
        }
        for (i, c) in self.path_cleaning.iter().enumerate() {
            if let Err(e) = super::regex_syntax_check(&c.regex) {
                return Err(QueryError::new(
                    format!("path_cleaning[{i}].regex"),
                    format!("invalid regular expression: {e}"),
                ));
            }
        }
        validate_filters(&self.filters, "filters", 0)
    }
}

/// A comparison of a count with a threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CountOp {
    /// `=`
    Eq,
    /// `≠`
    Neq,
    /// `>`
    Gt,
    /// `≥`
    Gte,
    /// `<`
    Lt,
    /// `≤`
    Lte,
}

impl CountOp {
    /// Whether `left op right`.
    pub fn holds(self, left: f64, right: f64) -> bool {
        match self {
            CountOp::Eq => left == right,
            CountOp::Neq => left != right,
            CountOp::Gt => left > right,
            CountOp::Gte => left >= right,
            CountOp::Lt => left < right,
            CountOp::Lte => left <= right,
        }
    }
}

/// A relative window `(T − X, T]`, given in days, hours or seconds (exactly one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Window {
    /// Days of 24 hours.
    #[serde(default)]
    pub days: Option<i64>,
    /// Hours.
    #[serde(default)]
    pub hours: Option<i64>,
    /// Seconds.
    #[serde(default)]
    pub seconds: Option<i64>,
}

impl Window {
    /// The window's length in ms, or `None` for "all time".
    pub fn ms(&self) -> Option<i64> {
        // Saturating: validation refuses windows over 10 years before any arithmetic.
        self.days
            .map(|d| d.saturating_mul(86_400_000))
            .or(self.hours.map(|h| h.saturating_mul(3_600_000)))
            .or(self.seconds.map(|s| s.saturating_mul(1000)))
    }

    fn validate(&self, field: &str) -> Result<(), QueryError> {
        let given = [self.days, self.hours, self.seconds]
            .iter()
            .filter(|v| v.is_some())
            .count();
        if given > 1 {
            return Err(QueryError::new(
                field,
                "give the window in one of `days`, `hours` or `seconds`",
            ));
        }
        if let Some(ms) = self.ms()
            && (ms <= 0 || ms > 10 * 366 * 86_400_000)
        {
            return Err(QueryError::new(
                field,
                "the window must be positive and at most 10 years",
            ));
        }
        Ok(())
    }
}

/// How a property is aggregated over a person's matching events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PropertyAggregate {
    /// Sum of numeric values.
    Sum,
    /// Number of distinct values set.
    DistinctCount,
}

/// A cohort condition (§8.1), evaluated at an instant T. In JSON, an object with a `type` and
/// the fields of that type (windows as `days`, `hours` or `seconds` beside them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawCondition", into = "RawCondition")]
pub enum CohortCondition {
    /// Matching events in `(T − X, T]` (all time without a window) compared with `value`.
    EventCount {
        /// The events counted.
        entity: EventSelector,
        /// The comparison.
        operator: CountOp,
        /// The threshold.
        value: u64,
        /// The window.
        window: Window,
    },
    /// The first-ever matching event lies in the window.
    FirstTime {
        /// The events.
        entity: EventSelector,
        /// The window.
        window: Window,
    },
    /// `count(a) op count(b)` over the window.
    RelativeCount {
        /// The left events.
        a: EventSelector,
        /// The right events.
        b: EventSelector,
        /// The comparison.
        operator: CountOp,
        /// The window.
        window: Window,
    },
    /// An aggregate of a property over matching events compared with `value`.
    AggregateProperty {
        /// The events.
        entity: EventSelector,
        /// The property.
        property: String,
        /// The aggregate.
        aggregate: PropertyAggregate,
        /// The comparison.
        operator: CountOp,
        /// The threshold.
        value: f64,
        /// The window.
        window: Window,
    },
    /// A then B within `within_seconds`, both in the window.
    Sequence {
        /// The first event.
        a: EventSelector,
        /// The second event.
        b: EventSelector,
        /// Most seconds from A to B.
        within_seconds: i64,
        /// The window.
        window: Window,
    },
    /// The person's current property satisfies a filter (§1.4).
    Property {
        /// The filter on the person's properties (`op`, `key`, `value`).
        filter: Filter,
    },
    /// Some event in the window carried a property value: an event matching `entity` (any
    /// event by default) whose property satisfies `filter` (values as stored on the event).
    HadProperty {
        /// The events.
        entity: EventSelector,
        /// The filter on the event's properties.
        filter: Filter,
        /// The window.
        window: Window,
    },
    /// Did it in the `previous` window before the recent one and not in the recent `window`.
    Stopped {
        /// The events.
        entity: EventSelector,
        /// The recent window `(T − X, T]`.
        window: Window,
        /// The earlier window, ending where the recent one starts.
        previous: Window,
    },
    /// Did it in the recent `window` and not in the `previous` window before it.
    Restarted {
        /// The events.
        entity: EventSelector,
        /// The recent window.
        window: Window,
        /// The earlier window.
        previous: Window,
    },
    /// Active in at least `min_periods` of the last `total_periods` periods (`(T − (k+1)·P,
    /// T − k·P]`, P = 1 h, 24 h, 7 days or 30 days).
    Regularly {
        /// The events.
        entity: EventSelector,
        /// The period length.
        period: Interval,
        /// Periods looked at.
        total_periods: u32,
        /// Periods with an event needed.
        min_periods: u32,
    },
    /// The unit's `nth` matching event ever (N ≤ 5) lies in the window.
    HistoricalCount {
        /// The events.
        entity: EventSelector,
        /// Which occurrence, from 1.
        nth: u32,
        /// The window.
        window: Window,
    },
    /// The steps reached in a funnel whose step 1 lies in the window, compared with `value`
    /// (`gte` n: converted to step n; `eq` k: dropped after step k).
    Funnel {
        /// The funnel.
        funnel: IdentityFunnel,
        /// The comparison.
        operator: CountOp,
        /// Steps reached.
        value: u64,
        /// The entry window.
        window: Window,
    },
    /// Returned in rolling period `returned_in` (`[t0 + k·P, t0 + (k+1)·P)`) after the unit's
    /// first start event in the window.
    Retention {
        /// The start event.
        start: EventSelector,
        /// The return event.
        return_event: EventSelector,
        /// The period length.
        period: Interval,
        /// The period returned in, from 1.
        returned_in: u32,
        /// The window of the start event.
        window: Window,
    },
    /// Every condition holds.
    And {
        /// The conditions.
        conditions: Vec<CohortCondition>,
    },
    /// At least one condition holds.
    Or {
        /// The conditions.
        conditions: Vec<CohortCondition>,
    },
    /// The condition does not hold.
    Not {
        /// The negated condition.
        condition: Box<CohortCondition>,
    },
}

/// The kinds of cohort conditions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum ConditionKind {
    EventCount,
    FirstTime,
    RelativeCount,
    AggregateProperty,
    Sequence,
    Property,
    HadProperty,
    Stopped,
    Restarted,
    Regularly,
    HistoricalCount,
    Funnel,
    Retention,
    And,
    Or,
    Not,
}

/// A condition as JSON: every field any kind takes, so unknown fields are refused; the
/// conversion refuses fields the kind does not take and names missing ones.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCondition {
    #[serde(rename = "type")]
    kind: ConditionKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    entity: Option<EventSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    a: Option<EventSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    b: Option<EventSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    operator: Option<CountOp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    value: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    days: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    hours: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    seconds: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    property: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    aggregate: Option<PropertyAggregate>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    within_seconds: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    filter: Option<Filter>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    conditions: Option<Vec<CohortCondition>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    condition: Option<Box<CohortCondition>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    previous: Option<Window>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    period: Option<Interval>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    total_periods: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    min_periods: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    nth: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    funnel: Option<IdentityFunnel>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    start: Option<EventSelector>,
    #[serde(default, rename = "return", skip_serializing_if = "Option::is_none")]
    return_event: Option<EventSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    returned_in: Option<u32>,
}

impl RawCondition {
    fn empty(kind: ConditionKind) -> RawCondition {
        RawCondition {
            kind,
            entity: None,
            a: None,
            b: None,
            operator: None,
            value: None,
            days: None,
            hours: None,
            seconds: None,
            property: None,
            aggregate: None,
            within_seconds: None,
            filter: None,
            conditions: None,
            condition: None,
            previous: None,
            period: None,
            total_periods: None,
            min_periods: None,
            nth: None,
            funnel: None,
            start: None,
            return_event: None,
            returned_in: None,
        }
    }

    fn window(&self) -> Window {
        Window {
            days: self.days,
            hours: self.hours,
            seconds: self.seconds,
        }
    }

    fn with_window(mut self, w: Window) -> RawCondition {
        self.days = w.days;
        self.hours = w.hours;
        self.seconds = w.seconds;
        self
    }
}

/// `value` as a count: a whole number, at least 0 (`what` names it in the error).
fn whole(value: f64, what: &str) -> Result<u64, String> {
    if value < 0.0 || value.fract() != 0.0 {
        return Err(format!("`value` is {what}: a whole number, at least 0"));
    }
    Ok(value as u64)
}

fn required<T>(v: Option<T>, name: &str) -> Result<T, String> {
    v.ok_or_else(|| format!("missing field `{name}`"))
}

impl TryFrom<RawCondition> for CohortCondition {
    type Error = String;

    fn try_from(raw: RawCondition) -> Result<CohortCondition, String> {
        use ConditionKind as K;
        let allowed: &[&str] = match raw.kind {
            K::EventCount => &["entity", "operator", "value", "window"],
            K::FirstTime => &["entity", "window"],
            K::RelativeCount => &["a", "b", "operator", "window"],
            K::AggregateProperty => &[
                "entity",
                "property",
                "aggregate",
                "operator",
                "value",
                "window",
            ],
            K::Sequence => &["a", "b", "within_seconds", "window"],
            K::Property => &["filter"],
            K::HadProperty => &["entity", "filter", "window"],
            K::Stopped | K::Restarted => &["entity", "window", "previous"],
            K::Regularly => &["entity", "period", "total_periods", "min_periods"],
            K::HistoricalCount => &["entity", "nth", "window"],
            K::Funnel => &["funnel", "operator", "value", "window"],
            K::Retention => &["start", "return", "period", "returned_in", "window"],
            K::And | K::Or => &["conditions"],
            K::Not => &["condition"],
        };
        let given = [
            ("entity", raw.entity.is_some()),
            ("a", raw.a.is_some()),
            ("b", raw.b.is_some()),
            ("operator", raw.operator.is_some()),
            ("value", raw.value.is_some()),
            ("days", raw.days.is_some()),
            ("hours", raw.hours.is_some()),
            ("seconds", raw.seconds.is_some()),
            ("property", raw.property.is_some()),
            ("aggregate", raw.aggregate.is_some()),
            ("within_seconds", raw.within_seconds.is_some()),
            ("filter", raw.filter.is_some()),
            ("conditions", raw.conditions.is_some()),
            ("condition", raw.condition.is_some()),
            ("previous", raw.previous.is_some()),
            ("period", raw.period.is_some()),
            ("total_periods", raw.total_periods.is_some()),
            ("min_periods", raw.min_periods.is_some()),
            ("nth", raw.nth.is_some()),
            ("funnel", raw.funnel.is_some()),
            ("start", raw.start.is_some()),
            ("return", raw.return_event.is_some()),
            ("returned_in", raw.returned_in.is_some()),
        ];
        for (name, present) in given {
            let window_field = matches!(name, "days" | "hours" | "seconds");
            let ok = allowed.contains(&name) || (window_field && allowed.contains(&"window"));
            if present && !ok {
                let kind = serde_json::to_value(raw.kind).unwrap_or_default();
                return Err(format!(
                    "a `{}` condition takes no field `{name}`",
                    kind.as_str().unwrap_or_default()
                ));
            }
        }
        let window = raw.window();
        Ok(match raw.kind {
            K::EventCount => {
                let value = whole(required(raw.value, "value")?, "an event count")?;
                CohortCondition::EventCount {
                    entity: required(raw.entity, "entity")?,
                    operator: required(raw.operator, "operator")?,
                    value,
                    window,
                }
            }
            K::FirstTime => CohortCondition::FirstTime {
                entity: required(raw.entity, "entity")?,
                window,
            },
            K::RelativeCount => CohortCondition::RelativeCount {
                a: required(raw.a, "a")?,
                b: required(raw.b, "b")?,
                operator: required(raw.operator, "operator")?,
                window,
            },
            K::AggregateProperty => CohortCondition::AggregateProperty {
                entity: required(raw.entity, "entity")?,
                property: required(raw.property, "property")?,
                aggregate: required(raw.aggregate, "aggregate")?,
                operator: required(raw.operator, "operator")?,
                value: required(raw.value, "value")?,
                window,
            },
            K::Sequence => CohortCondition::Sequence {
                a: required(raw.a, "a")?,
                b: required(raw.b, "b")?,
                within_seconds: required(raw.within_seconds, "within_seconds")?,
                window,
            },
            K::Property => CohortCondition::Property {
                filter: required(raw.filter, "filter")?,
            },
            K::HadProperty => CohortCondition::HadProperty {
                entity: raw.entity.unwrap_or_default(),
                filter: required(raw.filter, "filter")?,
                window,
            },
            K::Stopped => CohortCondition::Stopped {
                entity: required(raw.entity, "entity")?,
                window,
                previous: required(raw.previous, "previous")?,
            },
            K::Restarted => CohortCondition::Restarted {
                entity: required(raw.entity, "entity")?,
                window,
                previous: required(raw.previous, "previous")?,
            },
            K::Regularly => CohortCondition::Regularly {
                entity: required(raw.entity, "entity")?,
                period: required(raw.period, "period")?,
                total_periods: required(raw.total_periods, "total_periods")?,
                min_periods: required(raw.min_periods, "min_periods")?,
            },
            K::HistoricalCount => CohortCondition::HistoricalCount {
                entity: required(raw.entity, "entity")?,
                nth: required(raw.nth, "nth")?,
                window,
            },
            K::Funnel => {
                let value = whole(required(raw.value, "value")?, "a number of steps")?;
                CohortCondition::Funnel {
                    funnel: required(raw.funnel, "funnel")?,
                    operator: required(raw.operator, "operator")?,
                    value,
                    window,
                }
            }
            K::Retention => CohortCondition::Retention {
                start: required(raw.start, "start")?,
                return_event: required(raw.return_event, "return")?,
                period: required(raw.period, "period")?,
                returned_in: required(raw.returned_in, "returned_in")?,
                window,
            },
            K::And => CohortCondition::And {
                conditions: required(raw.conditions, "conditions")?,
            },
            K::Or => CohortCondition::Or {
                conditions: required(raw.conditions, "conditions")?,
            },
            K::Not => CohortCondition::Not {
                condition: required(raw.condition, "condition")?,
            },
        })
    }
}

impl From<CohortCondition> for RawCondition {
    fn from(c: CohortCondition) -> RawCondition {
        use ConditionKind as K;
        match c {
            CohortCondition::EventCount {
                entity,
                operator,
                value,
                window,
            } => RawCondition {
                entity: Some(entity),
                operator: Some(operator),
                value: Some(value as f64),
                ..RawCondition::empty(K::EventCount)
            }
            .with_window(window),
            CohortCondition::FirstTime { entity, window } => RawCondition {
                entity: Some(entity),
                ..RawCondition::empty(K::FirstTime)
            }
            .with_window(window),
            CohortCondition::RelativeCount {
                a,
                b,
                operator,
                window,
            } => RawCondition {
                a: Some(a),
                b: Some(b),
                operator: Some(operator),
                ..RawCondition::empty(K::RelativeCount)
            }
            .with_window(window),
            CohortCondition::AggregateProperty {
                entity,
                property,
                aggregate,
                operator,
                value,
                window,
            } => RawCondition {
                entity: Some(entity),
                property: Some(property),
                aggregate: Some(aggregate),
                operator: Some(operator),
                value: Some(value),
                ..RawCondition::empty(K::AggregateProperty)
            }
            .with_window(window),
            CohortCondition::Sequence {
                a,
                b,
                within_seconds,
                window,
            } => RawCondition {
                a: Some(a),
                b: Some(b),
                within_seconds: Some(within_seconds),
                ..RawCondition::empty(K::Sequence)
            }
            .with_window(window),
            CohortCondition::Property { filter } => RawCondition {
                filter: Some(filter),
                ..RawCondition::empty(K::Property)
            },
            CohortCondition::HadProperty {
                entity,
                filter,
                window,
            } => RawCondition {
                entity: Some(entity),
                filter: Some(filter),
                ..RawCondition::empty(K::HadProperty)
            }
            .with_window(window),
            CohortCondition::Stopped {
                entity,
                window,
                previous,
            } => RawCondition {
                entity: Some(entity),
                previous: Some(previous),
                ..RawCondition::empty(K::Stopped)
            }
            .with_window(window),
            CohortCondition::Restarted {
                entity,
                window,
                previous,
            } => RawCondition {
                entity: Some(entity),
                previous: Some(previous),
                ..RawCondition::empty(K::Restarted)
            }
            .with_window(window),
            CohortCondition::Regularly {
                entity,
                period,
                total_periods,
                min_periods,
            } => RawCondition {
                entity: Some(entity),
                period: Some(period),
                total_periods: Some(total_periods),
                min_periods: Some(min_periods),
                ..RawCondition::empty(K::Regularly)
            },
            CohortCondition::HistoricalCount {
                entity,
                nth,
                window,
            } => RawCondition {
                entity: Some(entity),
                nth: Some(nth),
                ..RawCondition::empty(K::HistoricalCount)
            }
            .with_window(window),
            CohortCondition::Funnel {
                funnel,
                operator,
                value,
                window,
            } => RawCondition {
                funnel: Some(funnel),
                operator: Some(operator),
                value: Some(value as f64),
                ..RawCondition::empty(K::Funnel)
            }
            .with_window(window),
            CohortCondition::Retention {
                start,
                return_event,
                period,
                returned_in,
                window,
            } => RawCondition {
                start: Some(start),
                return_event: Some(return_event),
                period: Some(period),
                returned_in: Some(returned_in),
                ..RawCondition::empty(K::Retention)
            }
            .with_window(window),
            CohortCondition::And { conditions } => RawCondition {
                conditions: Some(conditions),
                ..RawCondition::empty(K::And)
            },
            CohortCondition::Or { conditions } => RawCondition {
                conditions: Some(conditions),
                ..RawCondition::empty(K::Or)
            },
            CohortCondition::Not { condition } => RawCondition {
                condition: Some(condition),
                ..RawCondition::empty(K::Not)
            },
        }
    }
}

/// The most nested cohort conditions.
pub const MAX_CONDITION_DEPTH: usize = 8;

impl CohortCondition {
    /// Checks what serde cannot.
    pub fn validate(&self, field: &str, depth: usize) -> Result<(), QueryError> {
        if depth > MAX_CONDITION_DEPTH {
            return Err(QueryError::new(
                field,
                format!("conditions nest deeper than {MAX_CONDITION_DEPTH}"),
            ));
        }
        match self {
            CohortCondition::EventCount { entity, window, .. }
            | CohortCondition::FirstTime { entity, window } => {
                entity.validate_in_cohort(&format!("{field}.entity"))?;
                window.validate(field)
            }
            CohortCondition::RelativeCount { a, b, window, .. } => {
                a.validate_in_cohort(&format!("{field}.a"))?;
                b.validate_in_cohort(&format!("{field}.b"))?;
                window.validate(field)
            }
            CohortCondition::AggregateProperty {
                entity,
                property,
                value,
                window,
                ..
            } => {
                entity.validate_in_cohort(&format!("{field}.entity"))?;
                if property.is_empty() {
                    return Err(QueryError::new(
                        format!("{field}.property"),
                        "must not be empty",
                    ));
                }
                if !value.is_finite() {
                    return Err(QueryError::new(format!("{field}.value"), "must be finite"));
                }
                window.validate(field)
            }
            CohortCondition::Sequence {
                a,
                b,
                within_seconds,
                window,
            } => {
                a.validate_in_cohort(&format!("{field}.a"))?;
                b.validate_in_cohort(&format!("{field}.b"))?;
                if *within_seconds <= 0 || *within_seconds > MAX_WINDOW_SECONDS {
                    return Err(QueryError::new(
                        format!("{field}.within_seconds"),
                        format!("must be between 1 and {MAX_WINDOW_SECONDS}"),
                    ));
                }
                window.validate(field)
            }
            CohortCondition::Property { filter } => {
                if matches!(
                    filter.op,
                    FilterOp::And | FilterOp::Or | FilterOp::InCohort | FilterOp::NotInCohort
                ) {
                    return Err(QueryError::new(
                        format!("{field}.filter.op"),
                        "a property condition takes one property filter; combine conditions \
                         with `and`, `or` and `not`",
                    ));
                }
                let mut event_side = filter.clone();
                // The filter reads the person's properties whatever its `type` says.
                event_side.source = super::PropertySource::Event;
                event_side.validate(&format!("{field}.filter"), 0)
            }
            CohortCondition::HadProperty {
                entity,
                filter,
                window,
            } => {
                entity.validate_in_cohort(&format!("{field}.entity"))?;
                if matches!(
                    filter.op,
                    FilterOp::And | FilterOp::Or | FilterOp::InCohort | FilterOp::NotInCohort
                ) {
                    return Err(QueryError::new(
                        format!("{field}.filter.op"),
                        "a had_property condition takes one property filter",
                    ));
                }
                filter.validate(&format!("{field}.filter"), 0)?;
                window.validate(field)
            }
            CohortCondition::Stopped {
                entity,
                window,
                previous,
            }
            | CohortCondition::Restarted {
                entity,
                window,
                previous,
            } => {
                entity.validate_in_cohort(&format!("{field}.entity"))?;
                window.validate(field)?;
                previous.validate(&format!("{field}.previous"))?;
                if window.ms().is_none() || previous.ms().is_none() {
                    return Err(QueryError::new(
                        field,
                        "give both the recent window (`days`, `hours` or `seconds`) and \
                         `previous`",
                    ));
                }
                Ok(())
            }
            CohortCondition::Regularly {
                entity,
                total_periods,
                min_periods,
                ..
            } => {
                entity.validate_in_cohort(&format!("{field}.entity"))?;
                if *total_periods == 0 || *total_periods > 400 {
                    return Err(QueryError::new(
                        format!("{field}.total_periods"),
                        "must be between 1 and 400",
                    ));
                }
                if *min_periods == 0 || min_periods > total_periods {
                    return Err(QueryError::new(
                        format!("{field}.min_periods"),
                        "must be between 1 and total_periods",
                    ));
                }
                Ok(())
            }
            CohortCondition::HistoricalCount {
                entity,
                nth,
                window,
            } => {
                entity.validate_in_cohort(&format!("{field}.entity"))?;
                if !(1..=5).contains(nth) {
                    return Err(QueryError::new(
                        format!("{field}.nth"),
                        "must be between 1 and 5",
                    ));
                }
                window.validate(field)
            }
            CohortCondition::Funnel { funnel, window, .. } => {
                for (i, s) in funnel.steps.iter().enumerate() {
                    s.validate_in_cohort(&format!("{field}.funnel.steps[{i}]"))?;
                }
                if funnel.steps.len() < 2 || funnel.steps.len() > MAX_STEPS {
                    return Err(QueryError::new(
                        format!("{field}.funnel.steps"),
                        format!("a funnel has 2 to {MAX_STEPS} steps"),
                    ));
                }
                if funnel.window_seconds <= 0 || funnel.window_seconds > MAX_WINDOW_SECONDS {
                    return Err(QueryError::new(
                        format!("{field}.funnel.window_seconds"),
                        format!("must be between 1 and {MAX_WINDOW_SECONDS}"),
                    ));
                }
                window.validate(field)
            }
            CohortCondition::Retention {
                start,
                return_event,
                returned_in,
                window,
                ..
            } => {
                start.validate_in_cohort(&format!("{field}.start"))?;
                return_event.validate_in_cohort(&format!("{field}.return"))?;
                if *returned_in == 0 || *returned_in > 400 {
                    return Err(QueryError::new(
                        format!("{field}.returned_in"),
                        "must be between 1 and 400",
                    ));
                }
                window.validate(field)
            }
            CohortCondition::And { conditions } | CohortCondition::Or { conditions } => {
                if conditions.is_empty() {
                    return Err(QueryError::new(
                        format!("{field}.conditions"),
                        "needs at least one condition",
                    ));
                }
                for (i, c) in conditions.iter().enumerate() {
                    c.validate(&format!("{field}.conditions[{i}]"), depth + 1)?;
                }
                Ok(())
            }
            CohortCondition::Not { condition } => {
                condition.validate(&format!("{field}.condition"), depth + 1)
            }
        }
    }

    /// Every event selector the condition reads, in a fixed order (leaves left to right).
    pub fn selectors(&self) -> Vec<&EventSelector> {
        let mut out = Vec::new();
        self.collect_selectors(&mut out);
        out
    }

    fn collect_selectors<'a>(&'a self, out: &mut Vec<&'a EventSelector>) {
        match self {
            CohortCondition::EventCount { entity, .. }
            | CohortCondition::FirstTime { entity, .. }
            | CohortCondition::AggregateProperty { entity, .. } => out.push(entity),
            CohortCondition::RelativeCount { a, b, .. }
            | CohortCondition::Sequence { a, b, .. } => {
                out.push(a);
                out.push(b);
            }
            CohortCondition::HadProperty { entity, .. }
            | CohortCondition::Stopped { entity, .. }
            | CohortCondition::Restarted { entity, .. }
            | CohortCondition::Regularly { entity, .. }
            | CohortCondition::HistoricalCount { entity, .. } => out.push(entity),
            CohortCondition::Funnel { funnel, .. } => out.extend(funnel.steps.iter()),
            CohortCondition::Retention {
                start,
                return_event,
                ..
            } => {
                out.push(start);
                out.push(return_event);
            }
            CohortCondition::Property { .. } => {}
            CohortCondition::And { conditions } | CohortCondition::Or { conditions } => {
                for c in conditions {
                    c.collect_selectors(out);
                }
            }
            CohortCondition::Not { condition } => condition.collect_selectors(out),
        }
    }
}

/// A cohort query (§8): the members of named cohorts at an instant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CohortQuery {
    /// T, the evaluation instant (default: now).
    #[serde(default)]
    pub evaluate_at: Option<DateTime<Utc>>,
    /// The cohorts by name.
    pub cohorts: BTreeMap<String, CohortCondition>,
}

impl CohortQuery {
    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), QueryError> {
        if self.cohorts.is_empty() {
            return Err(QueryError::new("cohorts", "name at least one cohort"));
        }
        if self.cohorts.len() > 64 {
            return Err(QueryError::new("cohorts", "at most 64 cohorts per query"));
        }
        for (name, c) in &self.cohorts {
            c.validate(&format!("cohorts.{name}"), 0)?;
        }
        Ok(())
    }
}

/// A cohort timeline query (§8.2): when each person entered and left a cohort whose condition
/// is a windowed event count.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CohortTimelineQuery {
    /// The condition (an `event_count` with a window).
    pub cohort: CohortCondition,
    /// Transitions up to this instant (default: now).
    #[serde(default)]
    pub until: Option<DateTime<Utc>>,
}

impl CohortTimelineQuery {
    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), QueryError> {
        self.cohort.validate("cohort", 0)?;
        match &self.cohort {
            CohortCondition::EventCount { window, .. } if window.ms().is_some() => Ok(()),
            _ => Err(QueryError::new(
                "cohort.type",
                "a timeline follows an `event_count` condition with a window",
            )),
        }
    }
}

/// The identity report (§9): the same questions answered with merges applied, to show what
/// merges change — unique users and daily uniques of the funnel's first step, and the funnel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityQuery {
    /// IANA time zone.
    #[serde(default = "default_timezone")]
    pub timezone: String,
    /// The range.
    pub date_range: DateRange,
    /// The funnel (its range and time zone are the report's).
    pub funnel: IdentityFunnel,
}

/// The funnel of an identity report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityFunnel {
    /// The steps.
    pub steps: Vec<EventSelector>,
    /// Conversion window.
    #[serde(default = "default_window")]
    pub window_seconds: i64,
    /// Step order.
    #[serde(default)]
    pub order: FunnelOrder,
    /// Attempt policy.
    #[serde(default)]
    pub attempt_policy: AttemptPolicy,
}

impl IdentityQuery {
    /// The funnel as a full funnel query.
    pub fn funnel_query(&self) -> FunnelQuery {
        FunnelQuery {
            timezone: self.timezone.clone(),
            date_range: self.date_range,
            steps: self.funnel.steps.clone(),
            window_seconds: self.funnel.window_seconds,
            order: self.funnel.order,
            attempt_policy: self.funnel.attempt_policy,
            exclusions: Vec::new(),
            exclusion_policy: ExclusionPolicy::DropUser,
            filters: Vec::new(),
            breakdown: None,
            hold_constant: Vec::new(),
            histogram_bins: None,
            interval: Interval::Day,
            week_start: WeekStart::Monday,
        }
    }

    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), QueryError> {
        self.funnel_query().validate().map_err(|e| QueryError {
            field: match e.field.as_str() {
                "timezone" | "date_range" => e.field,
                f => format!("funnel.{f}"),
            },
            message: e.message,
        })?;
        if self.funnel.steps[0].event.is_none() {
            return Err(QueryError::new(
                "funnel.steps[0].event",
                "the report names the first step's event",
            ));
        }
        Ok(())
    }
}
