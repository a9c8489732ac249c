//! The person-level insights: funnels and funnel trends, retention, stickiness, lifecycle,
//! paths, cohorts, cohort timelines and the identity report.
//!
//! Each reads its unit streams through [`units::read`] (one DataFusion plan over the
//! partitions, events tagged by the insight's selectors), evaluates every unit with the pure
//! functions of `optiprism_types::insight`, and sums the per-unit results. Units are persons
//! after identity merges, so a merged person's events from several partitions are evaluated
//! together and counted once.

use crate::metadata::Project;
use crate::query::units::{self, StreamSpec, UnitStreams, ValueSource};
use crate::query::{QueryEngine, QueryFailure};
use arrow::array::{
    ArrayRef, BooleanArray, Float64Array, Int64Array, RecordBatch, StringArray,
    TimestampMillisecondArray,
};
use arrow::datatypes::{Field, Schema};
use chrono::{DateTime, SecondsFormat, Utc};
use optiprism_types::answer::{NONE_LABEL, OTHER_LABEL, json_number};
use optiprism_types::event::PropValue;
use optiprism_types::insight::activity::{FirstSeen, Lifecycle, Stickiness, active_periods};
use optiprism_types::insight::cohort::{self, WindowAt};
use optiprism_types::insight::funnel::{self, FunnelSpec};
use optiprism_types::insight::paths::{self, PathGraph, PathsSpec};
use optiprism_types::insight::retention::{self, RetentionSpec, RetentionTable};
use optiprism_types::insight::{NO_VALUE, UnitEvent, pct, round4};
use optiprism_types::query::behaviour::{
    Attribution, CohortCondition, CohortQuery, CohortTimelineQuery, CountOp, EventSelector,
    ExclusionPolicy, FunnelOrder, FunnelQuery, IdentityQuery, LifecycleQuery, NewDefinition,
    PathsQuery, RetentionQuery, StickinessQuery, TimeMode, fixed_period_ms,
};
use optiprism_types::query::{
    Filter, FilterOp, PropertySource, json_number as operand_number, json_render,
};
use optiprism_types::stats::quantile_sorted;
use optiprism_types::time::{Interval, local_midnight_ms};
use serde_json::{Map, Value, json};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

/// An insight's answer: JSON for HTTP, one Arrow table for Flight.
pub type Answer = (Value, RecordBatch);

/// A text column of an Arrow answer, built row by row.
type TextColumn = Vec<Option<String>>;
/// An integer column.
type IntColumn = Vec<Option<i64>>;
/// A float column.
type FloatColumn = Vec<Option<f64>>;

/// One row of a funnel's Arrow answer: breakdown value, step, count, conversions.
type FunnelRow = (Option<String>, usize, u64, Option<f64>, Option<f64>);

/// Columns of an Arrow answer, built row by row.
#[derive(Default)]
struct Table {
    fields: Vec<Field>,
    columns: Vec<ArrayRef>,
}

impl Table {
    fn column(mut self, name: &str, array: ArrayRef) -> Table {
        self.fields
            .push(Field::new(name, array.data_type().clone(), true));
        self.columns.push(array);
        self
    }
    fn text(self, name: &str, values: TextColumn) -> Table {
        self.column(name, Arc::new(StringArray::from(values)))
    }
    fn int(self, name: &str, values: IntColumn) -> Table {
        self.column(name, Arc::new(Int64Array::from(values)))
    }
    fn float(self, name: &str, values: FloatColumn) -> Table {
        self.column(name, Arc::new(Float64Array::from(values)))
    }
    fn boolean(self, name: &str, values: Vec<bool>) -> Table {
        self.column(name, Arc::new(BooleanArray::from(values)))
    }
    fn instant(self, name: &str, values: IntColumn) -> Table {
        let array = TimestampMillisecondArray::from(values).with_timezone("UTC");
        self.column(name, Arc::new(array))
    }
    fn finish(self) -> RecordBatch {
        RecordBatch::try_new(Arc::new(Schema::new(self.fields)), self.columns)
            .expect("columns of equal length")
    }
}

fn opt_json(x: Option<f64>) -> Value {
    x.map(json_number).unwrap_or(Value::Null)
}

/// A selector with extra filters AND-ed in.
fn with_filters(s: &EventSelector, filters: &[Filter]) -> EventSelector {
    let mut out = s.clone();
    out.filters.extend(filters.iter().cloned());
    out
}

fn iso(ms: i64) -> String {
    let t = DateTime::<Utc>::from_timestamp_millis(ms).unwrap_or_default();
    if ms % 1000 == 0 {
        t.to_rfc3339_opts(SecondsFormat::Secs, true)
    } else {
        t.to_rfc3339_opts(SecondsFormat::Millis, true)
    }
}

fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

// ---------------------------------------------------------------------------------------------
// Funnels

/// Per-unit funnel results of a query: each unit's result and its label.
struct FunnelRun {
    spec: FunnelSpec,
    streams: UnitStreams,
    /// Properties held constant (values `first_held..` of the streams).
    held: usize,
    first_held: usize,
}

fn funnel_spec(q: &FunnelQuery) -> FunnelSpec {
    let buckets = q.buckets();
    FunnelSpec {
        steps: q.steps.len(),
        window_ms: q.window_ms(),
        order: q.order,
        attempt_policy: q.attempt_policy,
        exclusions: q
            .exclusions
            .iter()
            .map(|x| (x.from_step, x.to_step))
            .collect(),
        exclusion_policy: q.exclusion_policy,
        entry_start_ms: buckets.start_ms(),
        entry_end_ms: buckets.end_ms,
    }
}

async fn run_funnel(
    engine: &QueryEngine,
    project: &Project,
    q: &FunnelQuery,
    raw_persons: bool,
) -> Result<FunnelRun, QueryFailure> {
    let spec = funnel_spec(q);
    let mut selectors: Vec<EventSelector> = q
        .steps
        .iter()
        .map(|s| with_filters(s, &q.filters))
        .collect();
    for x in &q.exclusions {
        selectors.push(EventSelector {
            event: Some(x.event.clone()),
            filters: x.filters.clone(),
        });
    }
    let stream_spec = StreamSpec {
        all_events: q.order == FunnelOrder::Strict,
        // The breakdown's value first (it labels units), then the properties held constant.
        values: q
            .breakdown
            .iter()
            .map(|b| match b.source {
                PropertySource::Event => ValueSource::Property(b.property.clone()),
                PropertySource::Person => ValueSource::PersonProperty(b.property.clone()),
            })
            .chain(
                q.hold_constant
                    .iter()
                    .map(|p| ValueSource::Property(p.clone())),
            )
            .collect(),
        raw_persons,
        ..StreamSpec::new(
            spec.entry_start_ms,
            spec.entry_end_ms.saturating_add(spec.window_ms + 1),
            selectors.iter().collect(),
        )
    };
    let streams = units::read(engine, project, &stream_spec).await?;
    Ok(FunnelRun {
        spec,
        streams,
        held: q.hold_constant.len(),
        first_held: usize::from(q.breakdown.is_some()),
    })
}

impl FunnelRun {
    /// Calls `f` with the events of every counting unit, sorted for the funnel evaluator: a
    /// person, or with properties held constant, a (person, held values) pair.
    fn for_each_unit(&self, mut f: impl FnMut(&[UnitEvent])) {
        let mut buffer = Vec::new();
        for i in 0..self.streams.len() {
            let range = self.streams.range(i);
            if self.held == 0 {
                let events = &self.streams.events[range];
                // Streams come sorted by (time, tags, value); with one step per event that is
                // already the evaluator's order, and the copy is skipped.
                if funnel::is_sorted(&self.spec, events) {
                    f(events);
                } else {
                    buffer.clear();
                    buffer.extend_from_slice(events);
                    funnel::sort_events(&self.spec, &mut buffer);
                    f(&buffer);
                }
                continue;
            }
            let mut by_values: BTreeMap<Vec<u32>, Vec<UnitEvent>> = BTreeMap::new();
            for at in range {
                let key = (0..self.held)
                    .map(|h| self.streams.value(at, self.first_held + h))
                    .collect();
                by_values
                    .entry(key)
                    .or_default()
                    .push(self.streams.events[at]);
            }
            for (_, mut events) in by_values {
                funnel::sort_events(&self.spec, &mut events);
                f(&events);
            }
        }
    }
}

/// PostHog's time-to-convert histogram (§3.7): `bins` = ⌈∛n⌉ clamped to 1..=60 unless given,
/// width ⌈(⌈max⌉ − ⌊min⌋) / bins⌉ (60 s when 0), bins starting at `min + k·width`, and an extra
/// last bin holding `max`. `[[bin start seconds, units]]`.
fn histogram(seconds: &[f64], bins: Option<usize>) -> Vec<(f64, u64)> {
    if seconds.is_empty() {
        return Vec::new();
    }
    let min = seconds
        .iter()
        .copied()
        .fold(f64::INFINITY, f64::min)
        .floor();
    let max = seconds
        .iter()
        .copied()
        .fold(f64::NEG_INFINITY, f64::max)
        .ceil();
    let n = bins.unwrap_or_else(|| ((seconds.len() as f64).cbrt().ceil() as usize).clamp(1, 60));
    let mut width = ((max - min) / n as f64).ceil();
    if width == 0.0 {
        width = 60.0;
    }
    let mut out: Vec<(f64, u64)> = (0..=n).map(|k| (min + k as f64 * width, 0)).collect();
    for s in seconds {
        let k = (((s - min) / width).floor() as usize).min(n);
        out[k].1 += 1;
    }
    out
}

/// The label of a unit in a funnel breakdown.
fn attribution(
    q: &FunnelQuery,
    spec: &FunnelSpec,
    events: &[UnitEvent],
    result: &funnel::UnitResult,
) -> u32 {
    let Some(b) = &q.breakdown else {
        return NO_VALUE;
    };
    let mask = (1u64 << spec.steps) - 1;
    let touches = events.iter().filter(|e| {
        e.tags & mask != 0
            && e.value != NO_VALUE
            && e.ts >= spec.entry_start_ms
            && e.ts < spec.entry_end_ms
    });
    match b.attribution {
        Attribution::FirstTouch => touches.map(|e| e.value).next().unwrap_or(NO_VALUE),
        Attribution::LastTouch => touches.map(|e| e.value).next_back().unwrap_or(NO_VALUE),
        Attribution::Step(k) => result
            .defining
            .as_ref()
            .and_then(|d| d.values.get(k - 1).copied())
            .unwrap_or(NO_VALUE),
    }
}

fn step_counts(levels: &[usize], steps: usize) -> Vec<u64> {
    let mut counts = vec![0u64; steps];
    for &l in levels {
        for c in counts.iter_mut().take(l) {
            *c += 1;
        }
    }
    counts
}

fn conversions(counts: &[u64]) -> (FloatColumn, FloatColumn) {
    let first = counts.first().copied().unwrap_or(0) as f64;
    let from_start = counts.iter().map(|&c| pct(c as f64, first)).collect();
    let from_previous = counts
        .iter()
        .enumerate()
        .map(|(k, &c)| {
            let prev = if k == 0 { c } else { counts[k - 1] };
            pct(c as f64, prev as f64)
        })
        .collect();
    (from_start, from_previous)
}

fn seconds_summary(mut values: Vec<f64>) -> Value {
    values.sort_by(f64::total_cmp);
    let avg = (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64);
    json!({
        "units": values.len(),
        "avg_seconds": opt_json(avg.map(round4)),
        "median_seconds": opt_json(quantile_sorted(&values, 0.5).map(round4)),
    })
}

/// Runs a funnel query.
pub async fn funnel(
    engine: &QueryEngine,
    project: &Project,
    q: &FunnelQuery,
) -> Result<Answer, QueryFailure> {
    let run = run_funnel(engine, project, q, false).await?;
    let n = q.steps.len();
    let mut levels = Vec::with_capacity(run.streams.len());
    let mut labels: Vec<u32> = Vec::new();
    let mut step_seconds: Vec<Vec<f64>> = vec![Vec::new(); n];
    let mut overall = Vec::new();
    run.for_each_unit(|events| {
        let r = funnel::evaluate(&run.spec, events);
        if r.level == 0 {
            return;
        }
        if q.order != FunnelOrder::Unordered
            && let Some(d) = &r.defining
        {
            for (j, pair) in d.times.windows(2).enumerate() {
                step_seconds[j + 1].push((pair[1] - pair[0]) as f64 / 1000.0);
            }
            if d.level == n {
                overall.push((d.times[n - 1] - d.times[0]) as f64 / 1000.0);
            }
        }
        labels.push(attribution(q, &run.spec, events, &r));
        levels.push(r.level);
    });
    let counts = step_counts(&levels, n);
    let (from_start, from_previous) = conversions(&counts);
    let steps_json: Vec<Value> = q
        .steps
        .iter()
        .enumerate()
        .map(|(k, s)| {
            json!({
                "event": s.event,
                "count": counts[k],
                "conversion_from_start_pct": opt_json(from_start[k]),
                "conversion_from_previous_pct": opt_json(from_previous[k]),
                "dropoff": if k == 0 { 0 } else { counts[k - 1] - counts[k] },
            })
        })
        .collect();
    let mut out = Map::new();
    out.insert("step_counts".into(), json!(counts));
    out.insert(
        "conversion_from_start_pct".into(),
        from_start.iter().map(|x| opt_json(*x)).collect(),
    );
    out.insert(
        "conversion_from_previous_pct".into(),
        from_previous.iter().map(|x| opt_json(*x)).collect(),
    );
    out.insert("steps".into(), Value::Array(steps_json));
    if q.order != FunnelOrder::Unordered {
        let per_step: Vec<Value> = (1..n)
            .map(|j| {
                let mut s = seconds_summary(step_seconds[j].clone());
                s["from_step"] = json!(j - 1);
                s["to_step"] = json!(j);
                s
            })
            .collect();
        let mut total = seconds_summary(overall.clone());
        total["histogram"] = histogram(&overall, q.histogram_bins)
            .into_iter()
            .map(|(start, units)| json!([json_number(start), units]))
            .collect();
        out.insert(
            "time_to_convert".into(),
            json!({ "steps": per_step, "overall": total }),
        );
    }
    let mut table_rows: Vec<FunnelRow> = (0..n)
        .map(|k| (None, k, counts[k], from_start[k], from_previous[k]))
        .collect();
    if let Some(b) = &q.breakdown {
        let label_of = |id: u32| -> String {
            run.streams
                .interner
                .name(id)
                .map(str::to_string)
                .unwrap_or_else(|| NONE_LABEL.to_string())
        };
        let mut by_label: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (l, level) in labels.iter().zip(&levels) {
            by_label.entry(label_of(*l)).or_default().push(*level);
        }
        let mut ranked: Vec<(String, Vec<u64>)> = by_label
            .into_iter()
            .map(|(label, lv)| (label, step_counts(&lv, n)))
            .collect();
        ranked.sort_by(|a, b| b.1[0].cmp(&a.1[0]).then_with(|| a.0.cmp(&b.0)));
        if ranked.len() > b.limit {
            let folded: Vec<(String, Vec<u64>)> = ranked.split_off(b.limit);
            let mut other = vec![0u64; n];
            for (_, c) in folded {
                for (o, x) in other.iter_mut().zip(c) {
                    *o += x;
                }
            }
            ranked.push((OTHER_LABEL.to_string(), other));
        }
        let mut breakdown = Map::new();
        let mut conversion = Map::new();
        for (label, c) in &ranked {
            breakdown.insert(label.clone(), json!(c));
            let (fs, fp) = conversions(c);
            conversion.insert(
                label.clone(),
                json!({
                    "conversion_from_start_pct": fs.iter().map(|x| opt_json(*x)).collect::<Vec<_>>(),
                    "conversion_from_previous_pct": fp.iter().map(|x| opt_json(*x)).collect::<Vec<_>>(),
                }),
            );
            for k in 0..n {
                table_rows.push((Some(label.clone()), k, c[k], fs[k], fp[k]));
            }
        }
        out.insert("breakdown_property".into(), json!(b.property));
        out.insert("breakdown".into(), Value::Object(breakdown));
        out.insert("breakdown_conversion".into(), Value::Object(conversion));
    }
    let table = Table::default()
        .text(
            "breakdown",
            table_rows.iter().map(|r| r.0.clone()).collect(),
        )
        .int(
            "step",
            table_rows.iter().map(|r| Some(r.1 as i64)).collect(),
        )
        .text(
            "event",
            table_rows
                .iter()
                .map(|r| q.steps[r.1].event.clone())
                .collect(),
        )
        .int(
            "count",
            table_rows.iter().map(|r| Some(r.2 as i64)).collect(),
        )
        .float(
            "conversion_from_start_pct",
            table_rows.iter().map(|r| r.3).collect(),
        )
        .float(
            "conversion_from_previous_pct",
            table_rows.iter().map(|r| r.4).collect(),
        )
        .finish();
    Ok((Value::Object(out), table))
}

/// Runs a funnel-trends query: conversion of the attempts entering in each period (§3.8).
pub async fn funnel_trends(
    engine: &QueryEngine,
    project: &Project,
    q: &FunnelQuery,
) -> Result<Answer, QueryFailure> {
    let run = run_funnel(engine, project, q, false).await?;
    let buckets = q.buckets();
    let nb = buckets.len();
    let n = q.steps.len();
    let mut entered = vec![0u64; nb];
    let mut converted = vec![0u64; nb];
    run.for_each_unit(|events| {
        // (bucket, converted) of each attempt, in start order: buckets come in order, so a
        // unit's attempts in one bucket are adjacent (only its buckets are touched).
        let mut current: Option<(usize, bool)> = None;
        let mut flush = |c: Option<(usize, bool)>| {
            if let Some((b, conv)) = c {
                entered[b] += 1;
                converted[b] += u64::from(conv);
            }
        };
        for a in funnel::attempts(&run.spec, events) {
            let Some(b) = buckets.index_of(a.start_ms) else {
                continue;
            };
            let conv = a.level == n && !a.tainted;
            match &mut current {
                Some((cb, c)) if *cb == b => *c |= conv,
                _ => {
                    flush(current.take());
                    current = Some((b, conv));
                }
            }
        }
        flush(current);
    });
    let now = now_ms();
    let mut by_entry = Map::new();
    let mut maturing = Vec::with_capacity(nb);
    let mut rates = Vec::with_capacity(nb);
    for b in 0..nb {
        let end = buckets
            .starts_ms
            .get(b + 1)
            .copied()
            .unwrap_or(buckets.end_ms);
        let m = end + q.window_ms() > now;
        let rate = pct(converted[b] as f64, entered[b] as f64);
        maturing.push(m);
        rates.push(rate);
        by_entry.insert(
            buckets.labels[b].clone(),
            json!({
                "entered": entered[b],
                "converted": converted[b],
                "rate_pct": opt_json(rate),
                "maturing": m,
            }),
        );
    }
    let key = match q.interval {
        Interval::Hour => "by_entry_hour",
        Interval::Day => "by_entry_day",
        Interval::Week => "by_entry_week",
        Interval::Month => "by_entry_month",
    };
    let json = json!({ key: by_entry, "buckets": buckets.labels });
    let table = Table::default()
        .text("bucket", buckets.labels.iter().cloned().map(Some).collect())
        .instant(
            "bucket_start",
            buckets.starts_ms.iter().copied().map(Some).collect(),
        )
        .int("entered", entered.iter().map(|&x| Some(x as i64)).collect())
        .int(
            "converted",
            converted.iter().map(|&x| Some(x as i64)).collect(),
        )
        .float("rate_pct", rates)
        .boolean("maturing", maturing)
        .finish();
    Ok((json, table))
}

// ---------------------------------------------------------------------------------------------
// Retention

/// Runs a retention query.
pub async fn retention(
    engine: &QueryEngine,
    project: &Project,
    q: &RetentionQuery,
) -> Result<Answer, QueryFailure> {
    let buckets = q.buckets();
    let mode = q.mode();
    let spec = RetentionSpec {
        buckets: buckets.clone(),
        cohort_type: q.cohort_type,
        mode,
        rolling_ms: q.rolling_period_ms(),
        counting: q.counting,
        periods: q.total_periods,
    };
    let start = with_filters(&q.start, &q.filters);
    let ret = with_filters(&q.return_event, &q.filters);
    let end_ms = match mode {
        TimeMode::Calendar => buckets.end_ms,
        TimeMode::Rolling => buckets
            .end_ms
            .saturating_add(q.rolling_period_ms() * q.total_periods as i64),
    };
    let start_ms = match q.cohort_type {
        // A first-time cohort is the period of the first start event over all history.
        optiprism_types::query::behaviour::CohortType::FirstTime => i64::MIN / 2,
        optiprism_types::query::behaviour::CohortType::Recurring => buckets.start_ms(),
    };
    let streams = units::read(
        engine,
        project,
        &StreamSpec::new(start_ms, end_ms, vec![&start, &ret]),
    )
    .await?;
    let mut table = RetentionTable::new(&spec);
    for i in 0..streams.len() {
        retention::add_unit(&spec, streams.unit(i).1, &mut table);
    }
    let now = now_ms();
    let nb = buckets.len();
    let mut cohorts = Vec::with_capacity(nb);
    let mut rows: (TextColumn, IntColumn, IntColumn) = Default::default();
    let mut cells: (FloatColumn, FloatColumn) = Default::default();
    for c in 0..nb {
        let size = table.sizes[c];
        let mut retained = Vec::with_capacity(q.total_periods);
        let mut pcts = Vec::with_capacity(q.total_periods);
        for k in 0..q.total_periods {
            let observable = table.observable(c, k) && buckets.starts_ms[c + k] <= now;
            let cell = (observable || k == 0).then_some(table.retained[c][k]);
            let p = cell.and_then(|r| pct(r as f64, size as f64));
            retained.push(cell.map(|r| json!(r)).unwrap_or(Value::Null));
            pcts.push(opt_json(p));
            rows.0.push(Some(buckets.labels[c].clone()));
            rows.1.push(Some(size as i64));
            rows.2.push(Some(k as i64));
            cells.0.push(cell.map(|r| r as f64));
            cells.1.push(p);
        }
        cohorts.push(json!({
            "cohort": buckets.labels[c],
            "size": size,
            "retained": retained,
            "pct": pcts,
        }));
    }
    let json = json!({ "cohorts": cohorts, "time_mode": mode, "counting": q.counting });
    let batch = Table::default()
        .text("cohort", rows.0)
        .int("size", rows.1)
        .int("period", rows.2)
        .float("retained", cells.0)
        .float("pct", cells.1)
        .finish();
    Ok((json, batch))
}

// ---------------------------------------------------------------------------------------------
// Stickiness and lifecycle

/// Runs a stickiness query.
pub async fn stickiness(
    engine: &QueryEngine,
    project: &Project,
    q: &StickinessQuery,
) -> Result<Answer, QueryFailure> {
    let buckets = q.buckets();
    let series = with_filters(&q.series, &q.filters);
    let streams = units::read(
        engine,
        project,
        &StreamSpec::new(buckets.start_ms(), buckets.end_ms, vec![&series]),
    )
    .await?;
    let mut s = Stickiness::new(buckets.len());
    for i in 0..streams.len() {
        s.add(active_periods(&buckets, streams.unit(i).1, q.min_per_interval).len());
    }
    let cumulative = s.cumulative();
    let json = json!({
        "intervals": buckets.len(),
        "histogram": s.histogram,
        "cumulative": cumulative,
    });
    let k = s.histogram.len();
    let batch = Table::default()
        .int("intervals", (1..=k as i64).map(Some).collect())
        .int(
            "units",
            s.histogram.iter().map(|&x| Some(x as i64)).collect(),
        )
        .int(
            "cumulative",
            cumulative.iter().map(|&x| Some(x as i64)).collect(),
        )
        .finish();
    Ok((json, batch))
}

/// The persons of a project after merges: created-at (earliest of the merged rows), current
/// properties (the surviving person's win), and a display id.
#[derive(Debug, Default)]
struct Persons {
    created_at: HashMap<u64, i64>,
    properties: HashMap<u64, BTreeMap<String, PropValue>>,
    display: HashMap<u64, String>,
}

async fn persons(engine: &QueryEngine, project: &Project) -> Result<Persons, QueryFailure> {
    let view = engine.identity_view(project.id);
    let mut out = Persons {
        created_at: HashMap::new(),
        properties: HashMap::new(),
        display: HashMap::new(),
    };
    let mut merged_rows: Vec<(u64, u64, BTreeMap<String, PropValue>)> = Vec::new();
    for part in engine.persons(project).await? {
        for (id, row) in part {
            let unit = view.resolve(id.0);
            let c = out.created_at.entry(unit).or_insert(row.created_at_ms);
            *c = (*c).min(row.created_at_ms);
            // The person's own id (its distinct id hashes to it) names it; else any of its ids.
            let own = row
                .distinct_ids
                .iter()
                .find(|d| optiprism_types::PersonId::of_distinct_id(project.id, d).0 == unit)
                .or(row.distinct_ids.first());
            if let Some(d) = own {
                let better = row
                    .distinct_ids
                    .iter()
                    .any(|d| optiprism_types::PersonId::of_distinct_id(project.id, d).0 == unit);
                let slot = out.display.entry(unit).or_insert_with(|| d.clone());
                if better {
                    *slot = d.clone();
                }
            }
            merged_rows.push((unit, id.0, row.properties));
        }
    }
    // Merged persons' properties first, the surviving person's last, so its values win.
    merged_rows.sort_by_key(|(unit, id, _)| (*unit, id == unit));
    for (unit, _, props) in merged_rows {
        out.properties.entry(unit).or_default().extend(props);
    }
    Ok(out)
}

/// Runs a lifecycle query.
pub async fn lifecycle(
    engine: &QueryEngine,
    project: &Project,
    q: &LifecycleQuery,
) -> Result<Answer, QueryFailure> {
    let buckets = q.buckets();
    let range_start = buckets.start_ms();
    let previous_start = q.previous_period_start_ms();
    let series = with_filters(&q.series, &q.filters);
    let first_event = q.new_definition == NewDefinition::FirstEventPeriod;
    let streams = units::read(
        engine,
        project,
        &StreamSpec::new(
            if first_event {
                i64::MIN / 2
            } else {
                previous_start
            },
            buckets.end_ms,
            vec![&series],
        ),
    )
    .await?;
    let created = if first_event {
        HashMap::new()
    } else {
        persons(engine, project).await?.created_at
    };
    let mut l = Lifecycle::new(buckets.len());
    for i in 0..streams.len() {
        let (unit, events) = streams.unit(i);
        let earliest = events.first().map(|e| e.ts).unwrap_or(i64::MAX);
        let first = if first_event {
            earliest
        } else {
            created
                .get(&unit)
                .copied()
                .unwrap_or(earliest)
                .min(earliest)
        };
        let first_seen = if first < previous_start {
            FirstSeen::Earlier
        } else if first < range_start {
            FirstSeen::Previous
        } else {
            buckets
                .index_of(first)
                .map(FirstSeen::At)
                .unwrap_or(FirstSeen::Later)
        };
        let active_before = events
            .iter()
            .any(|e| e.ts >= previous_start && e.ts < range_start);
        l.add(
            first_seen,
            active_before,
            &active_periods(&buckets, events, 1),
        );
    }
    let mut by_period = Map::new();
    let mut rows: (TextColumn, TextColumn, IntColumn) = Default::default();
    for (p, label) in buckets.labels.iter().enumerate() {
        let values = [
            ("new", l.new[p] as i64),
            ("returning", l.returning[p] as i64),
            ("resurrecting", l.resurrecting[p] as i64),
            ("dormant", -(l.dormant[p] as i64)),
        ];
        let mut o = Map::new();
        for (status, v) in values {
            o.insert(status.into(), json!(v));
            rows.0.push(Some(label.clone()));
            rows.1.push(Some(status.to_string()));
            rows.2.push(Some(v));
        }
        by_period.insert(label.clone(), Value::Object(o));
    }
    let batch = Table::default()
        .text("period", rows.0)
        .text("status", rows.1)
        .int("units", rows.2)
        .finish();
    Ok((json!({ "by_period": by_period }), batch))
}

// ---------------------------------------------------------------------------------------------
// Paths

fn path_item(
    cleaning: &[(regex::Regex, String)],
    event: Option<&str>,
    url: Option<&str>,
    current_url: Option<&str>,
    screen: Option<&str>,
) -> String {
    let event = event.unwrap_or_default();
    let raw = match event {
        "pageview" | "$pageview" => match url.or(current_url) {
            Some(u) if u.len() > 1 => u.strip_suffix('/').unwrap_or(u).to_string(),
            Some(u) => u.to_string(),
            None => event.to_string(),
        },
        "$screen" => screen.unwrap_or(event).to_string(),
        _ => event.to_string(),
    };
    for (re, alias) in cleaning {
        if re.is_match(&raw) {
            return alias.clone();
        }
    }
    raw
}

/// Runs a paths query.
pub async fn paths(
    engine: &QueryEngine,
    project: &Project,
    q: &PathsQuery,
) -> Result<Answer, QueryFailure> {
    let tz = q.tz();
    let start_ms = local_midnight_ms(tz, q.date_range.from);
    let end_ms = local_midnight_ms(tz, q.date_range.to.succ_opt().unwrap_or(q.date_range.to));
    let selectors: Vec<EventSelector> = if q.event_types.is_empty() {
        vec![EventSelector {
            event: None,
            filters: q.filters.clone(),
        }]
    } else {
        q.event_types
            .iter()
            .map(|e| EventSelector {
                event: Some(e.clone()),
                filters: q.filters.clone(),
            })
            .collect()
    };
    let streams = units::read(
        engine,
        project,
        &StreamSpec {
            values: vec![
                ValueSource::EventName,
                ValueSource::Property("url".into()),
                ValueSource::Property("$current_url".into()),
                ValueSource::Property("$screen_name".into()),
            ],
            ..StreamSpec::new(start_ms, end_ms, selectors.iter().collect())
        },
    )
    .await?;
    let cleaning: Vec<(regex::Regex, String)> = q
        .path_cleaning
        .iter()
        .filter_map(|c| {
            regex::Regex::new(&c.regex)
                .ok()
                .map(|r| (r, c.alias.clone()))
        })
        .collect();
    // Items, ranked by label so ties between equal edges break by label.
    let name = |id: u32| streams.interner.name(id);
    let mut items: Vec<String> = Vec::with_capacity(streams.events.len());
    for (i, e) in streams.events.iter().enumerate() {
        items.push(path_item(
            &cleaning,
            name(e.value),
            name(streams.more_values[0][i]),
            name(streams.more_values[1][i]),
            name(streams.more_values[2][i]),
        ));
    }
    let mut labels: Vec<&str> = items.iter().map(String::as_str).collect();
    labels.sort_unstable();
    labels.dedup();
    let rank: HashMap<&str, u32> = labels
        .iter()
        .enumerate()
        .map(|(i, l)| (*l, i as u32 + 1))
        .collect();
    let spec = PathsSpec {
        session_gap_ms: q.session_gap_seconds * 1000,
        step_limit: q.step_limit,
        start_point: q
            .start_point
            .as_deref()
            .map(|s| rank.get(s).copied().unwrap_or(0)),
        end_point: q
            .end_point
            .as_deref()
            .map(|s| rank.get(s).copied().unwrap_or(0)),
    };
    let mut graph = PathGraph::default();
    let mut unit_events: Vec<(i64, u32)> = Vec::new();
    for i in 0..streams.len() {
        unit_events.clear();
        for at in streams.range(i) {
            unit_events.push((streams.events[at].ts, rank[items[at].as_str()]));
        }
        // Events sharing an instant are taken in item order (ranks follow the labels), so the
        // order of `event_types` does not change the paths.
        unit_events.sort_unstable();
        paths::add_unit(&spec, &unit_events, &mut graph);
    }
    let node = |(pos, id): (usize, u32)| format!("{pos}_{}", labels[id as usize - 1]);
    let edges = paths::top_edges(&graph, q.edge_limit, q.min_edge_weight, q.max_edge_weight);
    let edges_json: Vec<Value> = edges
        .iter()
        .map(|e| {
            json!({
                "source": node(e.source),
                "target": node(e.target),
                "value": e.value,
                "avg_seconds": json_number(e.avg_seconds),
            })
        })
        .collect();
    let mut dropoffs = Map::new();
    for (n, count) in &graph.dropoffs {
        dropoffs.insert(node(*n), json!(count));
    }
    let mut rows: (TextColumn, TextColumn, TextColumn) = Default::default();
    let mut values: (IntColumn, FloatColumn) = Default::default();
    for e in &edges {
        rows.0.push(Some("edge".into()));
        rows.1.push(Some(node(e.source)));
        rows.2.push(Some(node(e.target)));
        values.0.push(Some(e.value as i64));
        values.1.push(Some(e.avg_seconds));
    }
    for (n, count) in &graph.dropoffs {
        rows.0.push(Some("dropoff".into()));
        rows.1.push(Some(node(*n)));
        rows.2.push(None);
        values.0.push(Some(*count as i64));
        values.1.push(None);
    }
    let batch = Table::default()
        .text("kind", rows.0)
        .text("source", rows.1)
        .text("target", rows.2)
        .int("value", values.0)
        .float("avg_seconds", values.1)
        .finish();
    Ok((json!({ "edges": edges_json, "dropoffs": dropoffs }), batch))
}

// ---------------------------------------------------------------------------------------------
// Cohorts

/// Whether a person property filter (§1.4) holds for a value (`None`: not set).
pub fn property_matches(f: &Filter, value: Option<&PropValue>, now_ms: i64) -> bool {
    use FilterOp::*;
    let operand = f.value.clone().unwrap_or(Value::Null);
    let text = value.map(PropValue::render);
    let number = value.and_then(|v| match v {
        PropValue::Num(n) => Some(*n),
        PropValue::Str(s) => operand_number(&Value::String(s.clone())),
        _ => None,
    });
    let list = |v: &Value| -> Vec<String> {
        match v {
            Value::Array(items) => items.iter().map(json_render).collect(),
            other => vec![json_render(other)],
        }
    };
    let equal = || text.as_ref().is_some_and(|t| list(&operand).contains(t));
    let contains = || {
        text.as_ref().is_some_and(|t| {
            t.to_lowercase()
                .contains(&json_render(&operand).to_lowercase())
        })
    };
    let regex = || {
        text.as_ref()
            .is_some_and(|t| regex::Regex::new(&json_render(&operand)).is_ok_and(|r| r.is_match(t)))
    };
    let compare = |o: fn(f64, f64) -> bool| match (number, operand_number(&operand)) {
        (Some(x), Some(y)) => o(x, y),
        _ => false,
    };
    let instant = || -> Option<(i64, i64)> {
        let at = optiprism_types::query::resolve_date_operand(operand.as_str()?, now_ms)?;
        let x = optiprism_types::query::resolve_date_operand(text.as_deref()?, now_ms)?;
        Some((x, at))
    };
    match f.op {
        And => f.filters.iter().all(|x| property_matches(x, value, now_ms)),
        Or => f.filters.iter().any(|x| property_matches(x, value, now_ms)),
        Eq | In => equal(),
        Neq | NotIn => !equal(),
        Icontains => contains(),
        NotIcontains => !contains(),
        Regex => regex(),
        NotRegex => !regex(),
        Gt => compare(|x, y| x > y),
        Gte => compare(|x, y| x >= y),
        Lt => compare(|x, y| x < y),
        Lte => compare(|x, y| x <= y),
        IsSet => value.is_some(),
        IsNotSet => value.is_none(),
        IsDateBefore => instant().is_some_and(|(x, at)| x < at),
        IsDateAfter => instant().is_some_and(|(x, at)| x > at),
        // A bare date means that whole (UTC) day, as in event filters.
        IsDateExact => instant().is_some_and(|(x, at)| {
            if operand.as_str().is_some_and(|t| t.len() == 10) {
                x >= at && x < at + 86_400_000
            } else {
                x == at
            }
        }),
        // Refused by validation: a property condition holds one property filter.
        InCohort | NotInCohort => false,
    }
}

/// Every unit's events for one cohort leaf, keyed by unit.
async fn leaf_streams(
    engine: &QueryEngine,
    project: &Project,
    selectors: Vec<&EventSelector>,
    values: Vec<ValueSource>,
    window: WindowAt,
    all_history: bool,
) -> Result<UnitStreams, QueryFailure> {
    let start_ms = if all_history {
        i64::MIN / 2
    } else {
        window.from.unwrap_or(i64::MIN / 2)
    };
    units::read(
        engine,
        project,
        &StreamSpec {
            values,
            ..StreamSpec::new(start_ms, window.to.saturating_add(1), selectors)
        },
    )
    .await
}

/// The members of a condition among `universe`.
fn evaluate_condition<'a>(
    engine: &'a QueryEngine,
    project: &'a Project,
    c: &'a CohortCondition,
    at: i64,
    universe: &'a BTreeSet<u64>,
    people: &'a Persons,
) -> futures::future::BoxFuture<'a, Result<BTreeSet<u64>, QueryFailure>> {
    Box::pin(async move {
        let per_unit = |streams: &UnitStreams, test: &dyn Fn(&[UnitEvent], usize) -> bool| {
            // Units without events are members only when the condition holds for none; only
            // then is the whole person universe walked (see `needs_universe`).
            if !test(&[], usize::MAX) {
                return (0..streams.len())
                    .filter(|&i| test(streams.unit(i).1, i))
                    .map(|i| streams.units[i])
                    .collect::<BTreeSet<u64>>();
            }
            let index: HashMap<u64, usize> = streams
                .units
                .iter()
                .enumerate()
                .map(|(i, u)| (*u, i))
                .collect();
            universe
                .iter()
                .copied()
                .filter(|u| match index.get(u) {
                    Some(&i) => test(streams.unit(i).1, i),
                    None => test(&[], usize::MAX),
                })
                .collect::<BTreeSet<u64>>()
        };
        Ok(match c {
            CohortCondition::EventCount {
                entity,
                operator,
                value,
                window,
            } => {
                let w = WindowAt::new(at, window.ms());
                let s = leaf_streams(engine, project, vec![entity], vec![], w, false).await?;
                per_unit(&s, &|e, _| cohort::event_count(e, w, *operator, *value))
            }
            CohortCondition::FirstTime { entity, window } => {
                let w = WindowAt::new(at, window.ms());
                let s = leaf_streams(engine, project, vec![entity], vec![], w, true).await?;
                per_unit(&s, &|e, _| cohort::first_time(e, w))
            }
            CohortCondition::RelativeCount {
                a,
                b,
                operator,
                window,
            } => {
                let w = WindowAt::new(at, window.ms());
                let s = leaf_streams(engine, project, vec![a, b], vec![], w, false).await?;
                per_unit(&s, &|e, _| cohort::relative_count(e, w, *operator))
            }
            CohortCondition::AggregateProperty {
                entity,
                property,
                aggregate,
                operator,
                value,
                window,
            } => {
                let w = WindowAt::new(at, window.ms());
                let s = leaf_streams(
                    engine,
                    project,
                    vec![entity],
                    vec![ValueSource::Property(property.clone())],
                    w,
                    false,
                )
                .await?;
                per_unit(&s, &|e, i| {
                    let values: Vec<(Option<f64>, Option<&str>)> = if i == usize::MAX {
                        Vec::new()
                    } else {
                        s.range(i)
                            .map(|at| {
                                let text = s.interner.name(s.events[at].value);
                                let number = text
                                    .and_then(|t| operand_number(&Value::String(t.to_string())));
                                (number, text)
                            })
                            .collect()
                    };
                    cohort::aggregate_property(e, &values, w, *aggregate, *operator, *value)
                })
            }
            CohortCondition::Sequence {
                a,
                b,
                within_seconds,
                window,
            } => {
                let w = WindowAt::new(at, window.ms());
                let s = leaf_streams(engine, project, vec![a, b], vec![], w, false).await?;
                per_unit(&s, &|e, _| cohort::sequence(e, w, within_seconds * 1000))
            }
            CohortCondition::HadProperty {
                entity,
                filter,
                window,
            } => {
                let w = WindowAt::new(at, window.ms());
                let carrying = with_filters(entity, std::slice::from_ref(filter));
                let s = leaf_streams(engine, project, vec![&carrying], vec![], w, false).await?;
                per_unit(&s, &|e, _| cohort::event_count(e, w, CountOp::Gte, 1))
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
                let recent = window.ms().unwrap_or_default();
                let before = previous.ms().unwrap_or_default();
                let w = WindowAt::new(at, Some(recent.saturating_add(before)));
                let s = leaf_streams(engine, project, vec![entity], vec![], w, false).await?;
                let stopped = matches!(c, CohortCondition::Stopped { .. });
                per_unit(&s, &|e, _| {
                    if stopped {
                        cohort::stopped(e, at, recent, before)
                    } else {
                        cohort::restarted(e, at, recent, before)
                    }
                })
            }
            CohortCondition::Regularly {
                entity,
                period,
                total_periods,
                min_periods,
            } => {
                let p = fixed_period_ms(*period);
                let w = WindowAt::new(at, Some(p * i64::from(*total_periods)));
                let s = leaf_streams(engine, project, vec![entity], vec![], w, false).await?;
                per_unit(&s, &|e, _| {
                    cohort::regularly(e, at, p, *total_periods, *min_periods)
                })
            }
            CohortCondition::HistoricalCount {
                entity,
                nth,
                window,
            } => {
                let w = WindowAt::new(at, window.ms());
                let s = leaf_streams(engine, project, vec![entity], vec![], w, true).await?;
                per_unit(&s, &|e, _| cohort::historical_count(e, w, *nth))
            }
            CohortCondition::Funnel {
                funnel: f,
                operator,
                value,
                window,
            } => {
                let w = WindowAt::new(at, window.ms());
                let spec = FunnelSpec {
                    steps: f.steps.len(),
                    window_ms: f.window_seconds * 1000,
                    order: f.order,
                    attempt_policy: f.attempt_policy,
                    exclusions: Vec::new(),
                    exclusion_policy: ExclusionPolicy::DropUser,
                    entry_start_ms: w.from.map_or(i64::MIN / 2, |from| from + 1),
                    entry_end_ms: at.saturating_add(1),
                };
                // Later steps may follow up to T only: what happened by T.
                let s = units::read(
                    engine,
                    project,
                    &StreamSpec {
                        all_events: f.order == FunnelOrder::Strict,
                        ..StreamSpec::new(
                            spec.entry_start_ms,
                            at.saturating_add(1),
                            f.steps.iter().collect(),
                        )
                    },
                )
                .await?;
                per_unit(&s, &|e, _| {
                    let mut events = e.to_vec();
                    funnel::sort_events(&spec, &mut events);
                    let level = funnel::evaluate(&spec, &events).level;
                    operator.holds(level as f64, *value as f64)
                })
            }
            CohortCondition::Retention {
                start,
                return_event,
                period,
                returned_in,
                window,
            } => {
                let w = WindowAt::new(at, window.ms());
                let s = leaf_streams(engine, project, vec![start, return_event], vec![], w, false)
                    .await?;
                let p = fixed_period_ms(*period);
                per_unit(&s, &|e, _| cohort::returned_in(e, w, p, *returned_in))
            }
            CohortCondition::Property { filter } => {
                let key = filter.key.clone().unwrap_or_default();
                universe
                    .iter()
                    .copied()
                    .filter(|u| {
                        let v = people.properties.get(u).and_then(|p| p.get(&key));
                        property_matches(filter, v, at)
                    })
                    .collect()
            }
            CohortCondition::And { conditions } => {
                let mut acc: Option<BTreeSet<u64>> = None;
                for x in conditions {
                    let m = evaluate_condition(engine, project, x, at, universe, people).await?;
                    acc = Some(match acc {
                        None => m,
                        Some(a) => a.intersection(&m).copied().collect(),
                    });
                }
                acc.unwrap_or_default()
            }
            CohortCondition::Or { conditions } => {
                let mut acc = BTreeSet::new();
                for x in conditions {
                    acc.extend(evaluate_condition(engine, project, x, at, universe, people).await?);
                }
                acc
            }
            CohortCondition::Not { condition } => {
                let m =
                    evaluate_condition(engine, project, condition, at, universe, people).await?;
                universe.difference(&m).copied().collect()
            }
        })
    })
}

/// The members (current persons) of a cohort filter's cohort, evaluated at its `evaluate_at`
/// or now.
pub async fn segment_members(
    engine: &QueryEngine,
    project: &Project,
    filter: &Filter,
    people: &PersonCache,
) -> Result<HashSet<u64>, QueryFailure> {
    let Some(condition) = &filter.cohort else {
        return Ok(HashSet::new());
    };
    let at = filter
        .evaluate_at
        .map(|t| t.timestamp_millis())
        .unwrap_or_else(now_ms);
    // Reading every person is the dearest part of a segment: only conditions that persons
    // without events can meet (counts of 0, negations, person properties) need them.
    let nobody = Persons::default();
    let people = if needs_universe(condition) {
        people.get(engine, project).await?
    } else {
        &nobody
    };
    let universe: BTreeSet<u64> = people
        .created_at
        .iter()
        .filter(|(_, c)| **c <= at)
        .map(|(u, _)| *u)
        .collect();
    let members = evaluate_condition(engine, project, condition, at, &universe, people).await?;
    Ok(members.into_iter().collect())
}

/// Every person of a project, read at most once for all the segments and person properties
/// one query needs.
#[derive(Debug, Default)]
pub struct PersonCache(tokio::sync::OnceCell<Persons>);

impl PersonCache {
    async fn get(&self, engine: &QueryEngine, project: &Project) -> Result<&Persons, QueryFailure> {
        self.0.get_or_try_init(|| persons(engine, project)).await
    }
}

/// Whether evaluating `c` reads the person universe: persons with no matching events are
/// members of a leaf exactly when it holds for no events.
fn needs_universe(c: &CohortCondition) -> bool {
    match c {
        CohortCondition::Not { .. } | CohortCondition::Property { .. } => true,
        CohortCondition::And { conditions } | CohortCondition::Or { conditions } => {
            conditions.iter().any(needs_universe)
        }
        CohortCondition::EventCount {
            operator, value, ..
        }
        | CohortCondition::Funnel {
            operator, value, ..
        } => operator.holds(0.0, *value as f64),
        CohortCondition::AggregateProperty {
            operator, value, ..
        } => operator.holds(0.0, *value),
        CohortCondition::RelativeCount { operator, .. } => operator.holds(0.0, 0.0),
        CohortCondition::FirstTime { .. }
        | CohortCondition::Sequence { .. }
        | CohortCondition::HadProperty { .. }
        | CohortCondition::Stopped { .. }
        | CohortCondition::Restarted { .. }
        | CohortCondition::Regularly { .. }
        | CohortCondition::HistoricalCount { .. }
        | CohortCondition::Retention { .. } => false,
    }
}

/// The current values (rendered) of person properties `keys`, by key and current person.
pub async fn person_property_values(
    engine: &QueryEngine,
    project: &Project,
    keys: &[String],
    people: &PersonCache,
) -> Result<HashMap<String, Arc<HashMap<u64, String>>>, QueryFailure> {
    let people = people.get(engine, project).await?;
    Ok(keys
        .iter()
        .map(|k| {
            let values: HashMap<u64, String> = people
                .properties
                .iter()
                .filter_map(|(u, props)| props.get(k).map(|v| (*u, v.render())))
                .collect();
            (k.clone(), Arc::new(values))
        })
        .collect())
}

fn display(people: &Persons, unit: u64) -> String {
    people
        .display
        .get(&unit)
        .cloned()
        .unwrap_or_else(|| format!("person:{unit:016x}"))
}

/// Runs a cohort query.
pub async fn cohorts(
    engine: &QueryEngine,
    project: &Project,
    q: &CohortQuery,
) -> Result<Answer, QueryFailure> {
    let at = q
        .evaluate_at
        .map(|t| t.timestamp_millis())
        .unwrap_or_else(now_ms);
    let people = persons(engine, project).await?;
    // The universe is every person seen by T.
    let universe: BTreeSet<u64> = people
        .created_at
        .iter()
        .filter(|(_, c)| **c <= at)
        .map(|(u, _)| *u)
        .collect();
    let mut members = Map::new();
    let mut sizes = Map::new();
    let mut rows: (TextColumn, TextColumn) = Default::default();
    for (name, c) in &q.cohorts {
        let set = evaluate_condition(engine, project, c, at, &universe, &people).await?;
        let mut ids: Vec<String> = set.iter().map(|u| display(&people, *u)).collect();
        ids.sort();
        for id in &ids {
            rows.0.push(Some(name.clone()));
            rows.1.push(Some(id.clone()));
        }
        sizes.insert(name.clone(), json!(ids.len()));
        members.insert(name.clone(), json!(ids));
    }
    let batch = Table::default()
        .text("cohort", rows.0)
        .text("distinct_id", rows.1)
        .finish();
    Ok((
        json!({ "evaluated_at": iso(at), "members": members, "sizes": sizes }),
        batch,
    ))
}

/// Runs a cohort timeline query.
pub async fn cohort_timeline(
    engine: &QueryEngine,
    project: &Project,
    q: &CohortTimelineQuery,
) -> Result<Answer, QueryFailure> {
    let CohortCondition::EventCount {
        entity,
        operator,
        value,
        window,
    } = &q.cohort
    else {
        unreachable!("validated: an event count");
    };
    let until = q.until.map(|t| t.timestamp_millis()).unwrap_or_else(now_ms);
    let window_ms = window.ms().unwrap_or(i64::MAX / 4);
    let streams = leaf_streams(
        engine,
        project,
        vec![entity],
        vec![],
        WindowAt::new(until, None),
        true,
    )
    .await?;
    let people = persons(engine, project).await?;
    let mut by_unit: BTreeMap<String, Vec<cohort::Transition>> = BTreeMap::new();
    let mut times = Vec::new();
    for i in 0..streams.len() {
        let (unit, events) = streams.unit(i);
        times.clear();
        times.extend(events.iter().map(|e| e.ts));
        let t = cohort::timeline(&times, window_ms, *operator, *value, until);
        if !t.is_empty() {
            by_unit.insert(display(&people, unit), t);
        }
    }
    let mut transitions = Map::new();
    let mut rows: (TextColumn, IntColumn, TextColumn) = Default::default();
    for (id, list) in &by_unit {
        let change = |t: &cohort::Transition| if t.entered { "entered" } else { "left" };
        transitions.insert(
            id.clone(),
            list.iter()
                .map(|t| json!({ "at": iso(t.at), "change": change(t) }))
                .collect(),
        );
        for t in list {
            rows.0.push(Some(id.clone()));
            rows.1.push(Some(t.at));
            rows.2.push(Some(change(t).to_string()));
        }
    }
    let batch = Table::default()
        .text("distinct_id", rows.0)
        .instant("at", rows.1)
        .text("change", rows.2)
        .finish();
    Ok((json!({ "transitions": transitions }), batch))
}

// ---------------------------------------------------------------------------------------------
// Identity report

/// Runs the identity report: unique users and daily uniques of the funnel's first step, and
/// the funnel, with merges applied (`merged`) and by the person each event was stamped with at
/// ingestion (`unmerged`, what a system without query-time merges shows).
pub async fn identity(
    engine: &QueryEngine,
    project: &Project,
    q: &IdentityQuery,
) -> Result<Answer, QueryFailure> {
    let fq = q.funnel_query();
    let buckets = fq.buckets();
    let first = fq.steps[0].clone();
    let event = first.event.clone().unwrap_or_default();
    let mut rows: (TextColumn, IntColumn, FloatColumn) = Default::default();
    let mut out = Map::new();
    for raw in [false, true] {
        let streams = units::read(
            engine,
            project,
            &StreamSpec {
                raw_persons: raw,
                ..StreamSpec::new(buckets.start_ms(), buckets.end_ms, vec![&first])
            },
        )
        .await?;
        let mut daily: Vec<HashSet<u64>> = vec![HashSet::new(); buckets.len()];
        for i in 0..streams.len() {
            let (unit, events) = streams.unit(i);
            for e in events {
                if let Some(b) = buckets.index_of(e.ts) {
                    daily[b].insert(unit);
                }
            }
        }
        let run = run_funnel(engine, project, &fq, raw).await?;
        let mut levels = Vec::new();
        run.for_each_unit(|events| levels.push(funnel::evaluate(&run.spec, events).level));
        let counts = step_counts(&levels, fq.steps.len());
        let dau: Vec<usize> = daily.iter().map(HashSet::len).collect();
        let report = json!({
            format!("{event}_unique_users_total"): streams.len(),
            format!("{event}_dau"): dau,
            "funnel_step_counts": counts,
        });
        let prefix = if raw { "unmerged" } else { "merged" };
        rows.0
            .push(Some(format!("{prefix}.{event}_unique_users_total")));
        rows.1.push(None);
        rows.2.push(Some(streams.len() as f64));
        for (i, d) in dau.iter().enumerate() {
            rows.0.push(Some(format!("{prefix}.{event}_dau")));
            rows.1.push(Some(i as i64));
            rows.2.push(Some(*d as f64));
        }
        for (i, c) in counts.iter().enumerate() {
            rows.0.push(Some(format!("{prefix}.funnel_step_counts")));
            rows.1.push(Some(i as i64));
            rows.2.push(Some(*c as f64));
        }
        if raw {
            out.insert("unmerged".into(), report);
        } else if let Value::Object(m) = report {
            out.extend(m);
        }
    }
    out.insert("buckets".into(), json!(buckets.labels));
    let batch = Table::default()
        .text("metric", rows.0)
        .int("index", rows.1)
        .float("value", rows.2)
        .finish();
    Ok((Value::Object(out), batch))
}
