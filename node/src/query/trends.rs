//! Trends (§2) on DataFusion, exact.
//!
//! One plan per series runs over the node's partitions, one DataFusion partition per Raft
//! partition: chunks are pruned by time and event name, DataFusion filters, computes each
//! event's bucket, breakdown value and resolved person, and aggregates where the data is
//! (partial aggregates per partition, merged by the final aggregate).
//!
//! Total math aggregates counts by (bucket, value); every other grouping (per bucket, per value,
//! folded values, the range) is a sum of those. Unique-user math aggregates the distinct
//! (bucket, value, person) triples, and the counts are taken from sets of persons, so a range
//! total is distinct over the range and `(other)` counts each person once across the values it
//! folds — never a sum of per-bucket or per-partition uniques.
//!
//! Property math, per-user math, rolling active users, cumulative distinct counts, formulas and
//! display transforms are in [`math`]. The previous period of `compare_previous` is the same
//! query over the earlier dates.

mod math;

use crate::metadata::Project;
use crate::query::QueryEngine;
use crate::query::QueryFailure;
use crate::query::filter::{ColumnLookup, all_of, named, referenced_keys, rendered};
use crate::query::frame::{PropertyColumns, RowsLookup, project};
use crate::query::udf::{BucketIndex, IdentityUdf, IdentityView, ToNumber};
use crate::storage::partition::ProjectRows;
use arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use arrow::datatypes::{DataType, Int32Type, Int64Type, UInt64Type};
use datafusion::datasource::MemTable;
use datafusion::error::Result as DfResult;
use datafusion::functions_aggregate::expr_fn::count;
use datafusion::logical_expr::{Expr, lit};
use datafusion::prelude::{DataFrame, SessionContext, cast};
use datafusion::scalar::ScalarValue;
use math::Triple;
use optiprism_types::answer::{
    BreakdownAnswer, NONE_LABEL, OTHER_LABEL, PreviousAnswer, SeriesAnswer, TrendsAnswer,
};
use optiprism_types::query::PropertySource;
use optiprism_types::query::{Display, Math, TrendsQuery};
use optiprism_types::stats::{moving_average, running_sum};
use optiprism_types::time::{Buckets, Interval};
use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

/// Person ids are already uniform 64-bit hashes: use them as their own hash (SipHash over
/// millions of ids was the largest cost of unique counts).
#[derive(Debug, Default)]
struct PersonHasher(u64);

impl Hasher for PersonHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

type PersonSet = HashSet<u64, BuildHasherDefault<PersonHasher>>;

/// The breakdown value of an event. Dictionary-encoded strings stay dictionaries, so grouping
/// compares small integer keys instead of strings.
fn breakdown_value(cols: &PropertyColumns) -> Expr {
    match (&cols.typed, &cols.text) {
        (Some((name, DataType::Dictionary(_, _))), None) => named(name),
        _ => rendered(cols),
    }
}

/// The property that identifies a session (PostHog's and our SDKs' `$session_id`).
const SESSION_KEY: &str = "$session_id";

/// The numeric value of a property (§1.3): numbers, and strings that are numbers; null for
/// anything else (booleans, datetimes, other text) and when not set.
fn number(cols: &PropertyColumns) -> Expr {
    let typed = cols.typed.as_ref().and_then(|(name, ty)| match ty {
        DataType::Float64 => Some(ToNumber::udf().call(vec![named(name)])),
        DataType::Utf8 | DataType::Dictionary(_, _) => {
            Some(ToNumber::udf().call(vec![cast(named(name), DataType::Utf8)]))
        }
        _ => None,
    });
    let text = cols
        .text
        .as_ref()
        .map(|n| ToNumber::udf().call(vec![named(n)]));
    match (typed, text) {
        // A row holds a value in at most one of the two columns.
        (Some(t), Some(x)) => datafusion::functions::expr_fn::coalesce(vec![t, x]),
        (Some(t), None) => t,
        (None, Some(x)) => x,
        (None, None) => lit(ScalarValue::Float64(None)),
    }
}

/// Whether a math counts or aggregates per resolved person.
fn needs_person(math: Math) -> bool {
    math == Math::UniqueUsers
        || math.rolling_days().is_some()
        || math.per_user_aggregate().is_some()
}

/// The filtered, projected rows of one series: columns `b` (bucket), optional `v` (breakdown
/// value), for unique, rolling and per-user math `p` (resolved person), for unique sessions
/// `k` (the session id, set and not empty), and with a property `x` (its numeric value; only
/// rows that have one, for event-level property math). `None` when no partition has rows.
fn filtered_frame(
    ctx: &SessionContext,
    parts: &[ProjectRows],
    q: &TrendsQuery,
    series: usize,
    buckets: &Buckets,
    identities: &Arc<IdentityView>,
    now_ms: i64,
) -> DfResult<Option<DataFrame>> {
    if parts.iter().all(|p| p.batches.is_empty()) {
        return Ok(None);
    }
    let s = &q.series[series];
    let lookup = RowsLookup {
        parts,
        now_ms,
        identities,
    };
    let mut keys = Vec::new();
    referenced_keys(&s.filters, &mut keys);
    referenced_keys(&q.filters, &mut keys);
    if let Some(b) = &q.breakdown
        && b.source == PropertySource::Event
    {
        keys.push(b.property.clone());
    }
    keys.extend(s.property.clone());
    if s.math == Math::UniqueSessions {
        keys.push(SESSION_KEY.to_string());
    }
    let mut names: Vec<String> = vec!["timestamp".into(), "event".into(), "person_id".into()];
    for k in &keys {
        let cols = lookup.property(k);
        names.extend(cols.typed.map(|(n, _)| n));
        names.extend(cols.text);
    }
    names.sort();
    names.dedup();
    let (schema, partitions) = project(parts, &names);
    let partitions: Vec<Vec<RecordBatch>> =
        partitions.into_iter().filter(|p| !p.is_empty()).collect();
    let table = MemTable::try_new(schema, partitions)?;
    let mut df = ctx.read_table(Arc::new(table))?;
    // No time predicate: the bucket function is null outside the range, and one null test
    // after it is cheaper than two timestamp comparisons on every row before it.
    let mut predicates = Vec::new();
    if let Some(event) = &s.event {
        predicates.push(named("event").eq(lit(event.clone())));
    }
    predicates.extend(all_of(&s.filters, &lookup));
    predicates.extend(all_of(&q.filters, &lookup));
    if let Some(predicate) = predicates.into_iter().reduce(Expr::and) {
        df = df.filter(predicate)?;
    }
    let bucket_udf = BucketIndex::udf(buckets.starts_ms.clone(), buckets.end_ms);
    let mut select = vec![bucket_udf.call(vec![named("timestamp")]).alias("b")];
    if let Some(b) = &q.breakdown {
        let cols = match b.source {
            PropertySource::Event => lookup.property(&b.property),
            PropertySource::Person => lookup.person_property(&b.property),
        };
        select.push(breakdown_value(&cols).alias("v"));
    }
    if needs_person(s.math) {
        select.push(
            IdentityUdf::resolve(Arc::clone(identities))
                .call(vec![named("person_id")])
                .alias("p"),
        );
    }
    if let Some(p) = &s.property {
        select.push(number(&lookup.property(p)).alias("x"));
    }
    if s.math == Math::UniqueSessions {
        select.push(rendered(&lookup.property(SESSION_KEY)).alias("k"));
    }
    let mut df = df.select(select)?.filter(named("b").is_not_null())?;
    if s.math.property_aggregate().is_some() {
        // Event-level property math ignores events without a numeric value (§1.3); per-user
        // math keeps them, as they still count as the person's events.
        df = df.filter(named("x").is_not_null())?;
    }
    if s.math == Math::UniqueSessions {
        // Events without a session, or with an empty id, belong to no session.
        df = df.filter(named("k").is_not_null().and(named("k").not_eq(lit(""))))?;
    }
    Ok(Some(df))
}

/// Column `v` of an aggregate's output as labels (`(none)` for not set).
fn labels(batch: &RecordBatch) -> DfResult<Option<Vec<String>>> {
    let Some(v) = batch.column_by_name("v") else {
        return Ok(None);
    };
    let v: ArrayRef = arrow::compute::cast(v, &DataType::Utf8)?;
    let v = v.as_string::<i32>();
    Ok(Some(
        (0..v.len())
            .map(|i| {
                if v.is_null(i) {
                    NONE_LABEL.to_string()
                } else {
                    v.value(i).to_string()
                }
            })
            .collect(),
    ))
}

fn rank(values: impl Iterator<Item = (String, f64)>, limit: usize) -> (Vec<String>, bool) {
    let mut ranked: Vec<(String, f64)> = values.collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let folded = ranked.len() > limit;
    (
        ranked.into_iter().take(limit).map(|(v, _)| v).collect(),
        folded,
    )
}

/// The labels a breakdown shows, in order: the top values, then `(other)` if any were folded.
fn shown(top: &[String], folded: bool) -> Vec<String> {
    let mut labels = top.to_vec();
    if folded {
        labels.push(OTHER_LABEL.to_string());
    }
    labels
}

fn fold<'a>(top: &[String], value: &'a str) -> &'a str {
    if top.iter().any(|t| t == value) {
        value
    } else {
        OTHER_LABEL
    }
}

/// A series of total math: counts by (bucket, value), everything else summed from them.
async fn total_series(
    q: &TrendsQuery,
    i: usize,
    frame: Option<DataFrame>,
    buckets: &Buckets,
) -> DfResult<SeriesAnswer> {
    let mut finest: HashMap<(i32, Option<String>), u64> = HashMap::new();
    if let Some(frame) = frame {
        let mut group = vec![named("b")];
        if q.breakdown.is_some() {
            group.push(named("v"));
        }
        for batch in frame
            .aggregate(group, vec![count(lit(1i64)).alias("n")])?
            .collect()
            .await?
        {
            let b = batch
                .column_by_name("b")
                .expect("b")
                .as_primitive::<Int32Type>()
                .clone();
            let n = batch
                .column_by_name("n")
                .expect("n")
                .as_primitive::<Int64Type>()
                .clone();
            let v = labels(&batch)?;
            for row in 0..batch.num_rows() {
                let value = v.as_ref().map(|v| v[row].clone());
                *finest.entry((b.value(row), value)).or_default() += n.value(row) as u64;
            }
        }
    }
    let mut values = vec![0.0; buckets.len()];
    for ((b, _), n) in &finest {
        values[*b as usize] += *n as f64;
    }
    let mut series = SeriesAnswer {
        id: q.series_id(i),
        total: Some(values.iter().sum()),
        values: present(values),
        breakdown: Vec::new(),
    };
    if let Some(b) = &q.breakdown {
        let mut per_value: HashMap<&str, f64> = HashMap::new();
        for ((_, v), n) in &finest {
            *per_value
                .entry(v.as_deref().unwrap_or_default())
                .or_default() += *n as f64;
        }
        let (top, folded) = rank(
            per_value.into_iter().map(|(v, n)| (v.to_string(), n)),
            b.limit,
        );
        let labels = shown(&top, folded);
        let mut rows: HashMap<&str, Vec<f64>> = labels
            .iter()
            .map(|l| (l.as_str(), vec![0.0; buckets.len()]))
            .collect();
        for ((bucket, v), n) in &finest {
            if let Some(row) = rows.get_mut(fold(&top, v.as_deref().unwrap_or_default())) {
                row[*bucket as usize] += *n as f64;
            }
        }
        for label in &labels {
            let values = rows.remove(label.as_str()).unwrap_or_default();
            series.breakdown.push(BreakdownAnswer {
                value: label.clone(),
                total: Some(values.iter().sum()),
                values: present(values),
            });
        }
    }
    Ok(series)
}

/// Wraps bucket values that are always defined (counts).
fn present(values: Vec<f64>) -> Vec<Option<f64>> {
    values.into_iter().map(Some).collect()
}

/// The distinct (bucket, value, unit) triples of a frame from DataFusion, the unit being the
/// resolved person (column `p`) or, for unique sessions, the session id (column `k`, numbered
/// here so the sets below hold integers).
async fn distinct_triples(
    q: &TrendsQuery,
    frame: Option<DataFrame>,
    unit: &str,
) -> DfResult<Vec<Triple>> {
    let mut triples: Vec<Triple> = Vec::new();
    let Some(frame) = frame else {
        return Ok(triples);
    };
    let mut group = vec![named("b"), named(unit)];
    if q.breakdown.is_some() {
        group.push(named("v"));
    }
    let mut numbering: HashMap<String, u64> = HashMap::new();
    for batch in frame.aggregate(group, vec![])?.collect().await? {
        let b = batch
            .column_by_name("b")
            .expect("b")
            .as_primitive::<Int32Type>()
            .clone();
        let column = batch.column_by_name(unit).expect("unit column");
        let units: Vec<u64> = if column.data_type() == &DataType::UInt64 {
            column.as_primitive::<UInt64Type>().values().to_vec()
        } else {
            let text = arrow::compute::cast(column, &DataType::Utf8)?;
            let text = text.as_string::<i32>();
            (0..text.len())
                .map(|row| {
                    let next = numbering.len() as u64;
                    *numbering.entry(text.value(row).to_string()).or_insert(next)
                })
                .collect()
        };
        let v = labels(&batch)?;
        for (row, unit) in units.into_iter().enumerate() {
            triples.push((b.value(row), v.as_ref().map(|v| v[row].clone()), unit));
        }
    }
    Ok(triples)
}

/// A series of unique math (users or sessions) from its distinct (bucket, value, unit)
/// triples: sets of units per group.
fn unique_series(
    q: &TrendsQuery,
    i: usize,
    triples: Vec<Triple>,
    buckets: &Buckets,
) -> SeriesAnswer {
    let mut values = vec![0.0; buckets.len()];
    let mut all = PersonSet::default();
    if q.breakdown.is_some() {
        // A person may come with several values in one bucket: count each once.
        let mut per_bucket: Vec<PersonSet> =
            (0..buckets.len()).map(|_| PersonSet::default()).collect();
        for (b, _, p) in &triples {
            per_bucket[*b as usize].insert(*p);
            all.insert(*p);
        }
        values = per_bucket.iter().map(|s| s.len() as f64).collect();
    } else {
        // Without a value the triples are distinct (bucket, person) pairs already.
        all.reserve(triples.len() / 4);
        for (b, _, p) in &triples {
            values[*b as usize] += 1.0;
            all.insert(*p);
        }
    }
    let mut series = SeriesAnswer {
        id: q.series_id(i),
        values: present(values),
        total: Some(all.len() as f64),
        breakdown: Vec::new(),
    };
    if let Some(b) = &q.breakdown {
        let mut per_value: HashMap<&str, PersonSet> = HashMap::new();
        for (_, v, p) in &triples {
            per_value
                .entry(v.as_deref().unwrap_or_default())
                .or_default()
                .insert(*p);
        }
        let (top, folded) = rank(
            per_value
                .iter()
                .map(|(v, s)| (v.to_string(), s.len() as f64)),
            b.limit,
        );
        let labels = shown(&top, folded);
        let mut cells: HashMap<&str, (Vec<PersonSet>, PersonSet)> = labels
            .iter()
            .map(|l| {
                let by_bucket = (0..buckets.len()).map(|_| PersonSet::default()).collect();
                (l.as_str(), (by_bucket, PersonSet::default()))
            })
            .collect();
        for (bucket, v, p) in &triples {
            if let Some((by_bucket, total)) =
                cells.get_mut(fold(&top, v.as_deref().unwrap_or_default()))
            {
                by_bucket[*bucket as usize].insert(*p);
                total.insert(*p);
            }
        }
        for label in &labels {
            let (by_bucket, total) = cells.remove(label.as_str()).unwrap_or_default();
            series.breakdown.push(BreakdownAnswer {
                value: label.clone(),
                values: by_bucket.iter().map(|s| Some(s.len() as f64)).collect(),
                total: Some(total.len() as f64),
            });
        }
    }
    series
}

/// What every series of a query reads.
struct Env<'a> {
    engine: &'a QueryEngine,
    project: &'a Project,
    ctx: SessionContext,
    identities: Arc<IdentityView>,
    now_ms: i64,
}

/// The series of `q` over its date range, display transforms applied.
async fn period_series(
    env: &Env<'_>,
    q: &TrendsQuery,
    buckets: &Buckets,
) -> Result<Vec<SeriesAnswer>, QueryFailure> {
    let mut out = Vec::with_capacity(q.series.len());
    for (i, s) in q.series.iter().enumerate() {
        // Rolling windows also read the days before `from` (§2.2): the look-back days are
        // buckets of their own, in front of the range's.
        let rolling = s.math.rolling_days();
        let read = match rolling {
            Some(window) => Buckets::new(
                q.date_range.from - chrono::Duration::days(window as i64 - 1),
                q.date_range.to,
                q.tz(),
                Interval::Day,
                q.week_start,
            ),
            None => buckets.clone(),
        };
        let events = s.event.as_ref().map(|e| vec![e.clone()]);
        let parts = env
            .engine
            .rows(env.project, read.start_ms(), read.end_ms, events.as_deref())
            .await?;
        let frame = filtered_frame(&env.ctx, &parts, q, i, &read, &env.identities, env.now_ms)?;
        let n = buckets.len();
        let mut series = if let Some(window) = rolling {
            let triples = distinct_triples(q, frame, "p").await?;
            math::rolling_series(q, i, triples, window, n)
        } else if let Some(agg) = s.math.property_aggregate() {
            math::property_series(q, i, frame, agg, n).await?
        } else if let Some(agg) = s.math.per_user_aggregate() {
            math::per_user_series(q, i, frame, agg, n).await?
        } else if matches!(s.math, Math::UniqueUsers | Math::UniqueSessions) {
            let unit = if s.math == Math::UniqueSessions {
                "k"
            } else {
                "p"
            };
            let triples = distinct_triples(q, frame, unit).await?;
            if q.display == Display::Cumulative {
                // Cumulative uniques are distinct over the prefix, not a running sum.
                math::cumulative_distinct_series(q, i, triples, n)
            } else {
                unique_series(q, i, triples, buckets)
            }
        } else {
            let mut series = total_series(q, i, frame, buckets).await?;
            if q.display == Display::Cumulative {
                math::map_rows(&mut series, &running_sum);
            }
            series
        };
        if q.display == Display::MovingAverage {
            let k = q.smoothing();
            math::map_rows(&mut series, &|values| moving_average(values, k));
        }
        out.push(series);
    }
    Ok(out)
}

/// Runs a trends query.
pub async fn run(
    engine: &QueryEngine,
    project: &Project,
    q: &TrendsQuery,
) -> Result<TrendsAnswer, QueryFailure> {
    let env = Env {
        engine,
        project,
        ctx: engine.session(),
        identities: Arc::new(engine.identity_view(project.id)),
        now_ms: chrono::Utc::now().timestamp_millis(),
    };
    let buckets = q.buckets();
    let series = period_series(&env, q, &buckets).await?;
    let previous = if q.compare_previous {
        // The same query over the previous period; percent change compares the series'
        // totals, so the previous period carries no breakdown.
        let mut pq = q.clone();
        pq.date_range = q.previous_range();
        pq.breakdown = None;
        let previous_buckets = pq.buckets();
        let series = period_series(&env, &pq, &previous_buckets).await?;
        Some(PreviousAnswer {
            buckets: previous_buckets.labels,
            starts_ms: previous_buckets.starts_ms,
            series,
        })
    } else {
        None
    };
    let formula = q
        .parsed_formula()
        .map(|f| math::formula_series(q, &f, &series, buckets.len()));
    let mut answer = TrendsAnswer {
        buckets: buckets.labels.clone(),
        breakdown_property: q.breakdown.as_ref().map(|b| b.property.clone()),
        series,
        formula,
        previous,
    };
    if q.log_scale {
        math::log_gaps(&mut answer);
    }
    Ok(answer)
}
