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

use crate::metadata::Project;
use crate::query::QueryEngine;
use crate::query::QueryFailure;
use crate::query::filter::{ColumnLookup, all_of, named, rendered};
use crate::query::frame::{PropertyColumns, project, property_columns};
use crate::query::udf::{BucketIndex, IdentityUdf, IdentityView};
use crate::storage::partition::ProjectRows;
use arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use arrow::datatypes::{DataType, Int32Type, Int64Type, UInt64Type};
use datafusion::datasource::MemTable;
use datafusion::error::Result as DfResult;
use datafusion::functions_aggregate::expr_fn::count;
use datafusion::logical_expr::{Expr, lit};
use datafusion::prelude::{DataFrame, SessionContext};
use optiprism_types::answer::{
    BreakdownAnswer, NONE_LABEL, OTHER_LABEL, SeriesAnswer, TrendsAnswer,
};
use optiprism_types::query::{Math, TrendsQuery};
use optiprism_types::time::Buckets;
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

struct Lookup<'a> {
    parts: &'a [ProjectRows],
    now_ms: i64,
}

impl ColumnLookup for Lookup<'_> {
    fn property(&self, key: &str) -> PropertyColumns {
        property_columns(self.parts, key)
    }
    fn now_ms(&self) -> i64 {
        self.now_ms
    }
}

fn referenced_keys(filters: &[optiprism_types::query::Filter], out: &mut Vec<String>) {
    for f in filters {
        if let Some(k) = &f.key {
            out.push(k.clone());
        }
        referenced_keys(&f.filters, out);
    }
}

/// The breakdown value of an event. Dictionary-encoded strings stay dictionaries, so grouping
/// compares small integer keys instead of strings.
fn breakdown_value(cols: &PropertyColumns) -> Expr {
    match (&cols.typed, &cols.text) {
        (Some((name, DataType::Dictionary(_, _))), None) => named(name),
        _ => rendered(cols),
    }
}

/// The filtered, projected rows of one series: columns `b` (bucket), optional `v` (breakdown
/// value), and for unique math `p` (resolved person). `None` when no partition has rows.
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
    let lookup = Lookup { parts, now_ms };
    let mut keys = Vec::new();
    referenced_keys(&s.filters, &mut keys);
    referenced_keys(&q.filters, &mut keys);
    if let Some(b) = &q.breakdown {
        keys.push(b.property.clone());
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
        select.push(breakdown_value(&lookup.property(&b.property)).alias("v"));
    }
    if s.math == Math::UniqueUsers {
        select.push(
            IdentityUdf::resolve(Arc::clone(identities))
                .call(vec![named("person_id")])
                .alias("p"),
        );
    }
    Ok(Some(df.select(select)?.filter(named("b").is_not_null())?))
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
        total: values.iter().sum(),
        values,
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
                total: values.iter().sum(),
                values,
            });
        }
    }
    Ok(series)
}

/// A series of unique-user math: distinct (bucket, value, person) triples from DataFusion, then
/// sets of persons per group.
async fn unique_series(
    q: &TrendsQuery,
    i: usize,
    frame: Option<DataFrame>,
    buckets: &Buckets,
) -> DfResult<SeriesAnswer> {
    let mut triples: Vec<(i32, Option<String>, u64)> = Vec::new();
    if let Some(frame) = frame {
        let mut group = vec![named("b"), named("p")];
        if q.breakdown.is_some() {
            group.push(named("v"));
        }
        for batch in frame.aggregate(group, vec![])?.collect().await? {
            let b = batch
                .column_by_name("b")
                .expect("b")
                .as_primitive::<Int32Type>()
                .clone();
            let p = batch
                .column_by_name("p")
                .expect("p")
                .as_primitive::<UInt64Type>()
                .clone();
            let v = labels(&batch)?;
            for row in 0..batch.num_rows() {
                triples.push((
                    b.value(row),
                    v.as_ref().map(|v| v[row].clone()),
                    p.value(row),
                ));
            }
        }
    }
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
        values,
        total: all.len() as f64,
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
                values: by_bucket.iter().map(|s| s.len() as f64).collect(),
                total: total.len() as f64,
            });
        }
    }
    Ok(series)
}

/// Runs a trends query.
pub async fn run(
    engine: &QueryEngine,
    project: &Project,
    q: &TrendsQuery,
) -> Result<TrendsAnswer, QueryFailure> {
    let buckets = q.buckets();
    let identities = Arc::new(engine.identity_view(project.id));
    let now_ms = chrono::Utc::now().timestamp_millis();
    let ctx = engine.session();
    let mut answer = TrendsAnswer {
        buckets: buckets.labels.clone(),
        breakdown_property: q.breakdown.as_ref().map(|b| b.property.clone()),
        series: Vec::new(),
    };
    for (i, s) in q.series.iter().enumerate() {
        let events = s.event.as_ref().map(|e| vec![e.clone()]);
        let parts = engine
            .rows(
                project,
                buckets.start_ms(),
                buckets.end_ms,
                events.as_deref(),
            )
            .await?;
        let frame = filtered_frame(&ctx, &parts, q, i, &buckets, &identities, now_ms)?;
        let series = match s.math {
            Math::UniqueUsers => unique_series(q, i, frame, &buckets).await?,
            _ => total_series(q, i, frame, &buckets).await?,
        };
        answer.series.push(series);
    }
    Ok(answer)
}
