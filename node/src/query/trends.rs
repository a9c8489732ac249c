//! Trends (§2): per-partition DataFusion plans, merged exactly.
//!
//! Each partition runs its part next to its data: prune chunks by time and event name, filter
//! and project with DataFusion (bucket of the event, breakdown value, resolved person), then
//! aggregate. Counts merge by addition. Unique persons merge exactly: a person who was never
//! part of an identity merge has all its events in one partition, so partitions count them
//! locally and the counts add up; persons involved in merges may span partitions, so partitions
//! return their ids and the coordinator takes the union. Nothing is ever averaged or summed
//! across partitions that could double count.
//!
//! With a breakdown, a first pass ranks values by the series' own metric over the range; the
//! second pass folds values beyond the limit into `(other)`, so `(other)` unique users are
//! distinct across the folded values, not a sum.

use crate::query::QueryEngine;
use crate::query::filter::{ColumnLookup, all_of, named, rendered};
use crate::query::frame::{PropertyColumns, project, property_columns};
use crate::query::udf::{BucketIndex, IdentityUdf, IdentityView};
use crate::storage::partition::ProjectRows;
use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{Int32Type, Int64Type, UInt64Type};
use datafusion::datasource::MemTable;
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::functions_aggregate::expr_fn::{array_agg, count};
use datafusion::logical_expr::{Expr, ExprFunctionExt, case, lit};
use datafusion::prelude::{DataFrame, SessionContext};
use datafusion::scalar::ScalarValue;
use optiprism_types::ProjectId;
use optiprism_types::answer::{
    BreakdownAnswer, NONE_LABEL, OTHER_LABEL, SeriesAnswer, TrendsAnswer,
};
use optiprism_types::query::{Math, TrendsQuery};
use optiprism_types::time::Buckets;
use std::collections::{HashMap, HashSet};
use std::ops::Not;
use std::sync::Arc;

/// Group key: bucket (None = range total) and breakdown label (None = unbroken).
type GroupKey = (Option<i32>, Option<String>);

/// A partition's partial aggregate of one group.
#[derive(Debug, Clone, Default)]
struct Partial {
    events: u64,
    local_persons: u64,
    shared_persons: Vec<u64>,
}

/// Merged partials.
#[derive(Debug, Default)]
struct Merged {
    events: u64,
    local_persons: u64,
    shared_persons: HashSet<u64>,
}

impl Merged {
    fn add(&mut self, p: Partial) {
        self.events += p.events;
        self.local_persons += p.local_persons;
        self.shared_persons.extend(p.shared_persons);
    }

    fn value(&self, math: Math) -> f64 {
        match math {
            Math::UniqueUsers => (self.local_persons + self.shared_persons.len() as u64) as f64,
            _ => self.events as f64,
        }
    }
}

struct Lookup<'a> {
    rows: &'a ProjectRows,
    now_ms: i64,
}

impl ColumnLookup for Lookup<'_> {
    fn property(&self, key: &str) -> PropertyColumns {
        property_columns(self.rows, key)
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

fn ts_literal(ms: i64) -> Expr {
    lit(ScalarValue::TimestampMillisecond(
        Some(ms),
        Some("UTC".into()),
    ))
}

/// The filtered, projected rows of one series in one partition as a DataFusion frame: columns
/// `b` (bucket), optional `v` (breakdown value), and for unique math `p` (person) and `s`
/// (shared person). `None` when the partition holds no rows of the project.
fn filtered_frame(
    ctx: &SessionContext,
    rows: &ProjectRows,
    q: &TrendsQuery,
    series: usize,
    buckets: &Buckets,
    identities: &Arc<IdentityView>,
    now_ms: i64,
) -> DfResult<Option<DataFrame>> {
    if rows.batches.is_empty() {
        return Ok(None);
    }
    let s = &q.series[series];
    let lookup = Lookup { rows, now_ms };
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
    let (schema, batches) = project(rows, &names);
    let table = MemTable::try_new(schema, vec![batches])?;
    let mut df = ctx.read_table(Arc::new(table))?;
    let mut predicate = named("timestamp")
        .gt_eq(ts_literal(buckets.start_ms()))
        .and(named("timestamp").lt(ts_literal(buckets.end_ms)));
    if let Some(event) = &s.event {
        predicate = predicate.and(named("event").eq(lit(event.clone())));
    }
    if let Some(f) = all_of(&s.filters, &lookup) {
        predicate = predicate.and(f);
    }
    if let Some(f) = all_of(&q.filters, &lookup) {
        predicate = predicate.and(f);
    }
    df = df.filter(predicate)?;
    let bucket_udf = BucketIndex::udf(buckets.starts_ms.clone(), buckets.end_ms);
    let mut select = vec![bucket_udf.call(vec![named("timestamp")]).alias("b")];
    if let Some(b) = &q.breakdown {
        select.push(rendered(&lookup.property(&b.property)).alias("v"));
    }
    if s.math == Math::UniqueUsers {
        select.push(
            IdentityUdf::resolve(Arc::clone(identities))
                .call(vec![named("person_id")])
                .alias("p"),
        );
        select.push(
            IdentityUdf::is_shared(Arc::clone(identities))
                .call(vec![named("person_id")])
                .alias("s"),
        );
    }
    Ok(Some(df.select(select)?))
}

/// Unique math: the filtered rows, materialized once for the several aggregations.
async fn materialize(frame: DataFrame) -> DfResult<Arc<MemTable>> {
    let schema = Arc::new(frame.schema().as_arrow().clone());
    let batches = frame.collect().await?;
    Ok(Arc::new(MemTable::try_new(schema, vec![batches])?))
}

/// Total math: event counts per (bucket, breakdown value), aggregated where the data is. Every
/// other grouping (per bucket, per value, folded values, the range) is a sum of these.
async fn count_finest(
    frame: DataFrame,
    with_value: bool,
) -> DfResult<Vec<((i32, Option<String>), u64)>> {
    let mut group = vec![named("b")];
    if with_value {
        group.push(named("v"));
    }
    let batches = frame
        .aggregate(group, vec![count(lit(1i64)).alias("n")])?
        .collect()
        .await?;
    let mut out = Vec::new();
    for batch in batches {
        let b = batch
            .column_by_name("b")
            .expect("b")
            .as_primitive::<Int32Type>()
            .clone();
        let v = batch
            .column_by_name("v")
            .map(|c| arrow::compute::cast(c, &arrow::datatypes::DataType::Utf8))
            .transpose()?;
        let n = batch
            .column_by_name("n")
            .expect("n")
            .as_primitive::<Int64Type>()
            .clone();
        for row in 0..batch.num_rows() {
            let value = v.as_ref().map(|a| {
                let a = a.as_string::<i32>();
                if a.is_null(row) {
                    NONE_LABEL.to_string()
                } else {
                    a.value(row).to_string()
                }
            });
            out.push(((b.value(row), value), n.value(row) as u64));
        }
    }
    Ok(out)
}

/// Aggregates a materialized table by the given keys into partials.
async fn aggregate(
    ctx: &SessionContext,
    table: &Arc<MemTable>,
    by_bucket: bool,
    label: Option<Expr>,
    unique: bool,
) -> DfResult<Vec<(GroupKey, Partial)>> {
    let df = ctx.read_table(Arc::clone(table) as Arc<dyn datafusion::catalog::TableProvider>)?;
    let mut group = Vec::new();
    if by_bucket {
        group.push(named("b").alias("gb"));
    }
    if let Some(l) = label.clone() {
        group.push(l.alias("gv"));
    }
    let mut aggs = vec![count(lit(1i64)).alias("n")];
    if unique {
        aggs.push(
            count(named("p"))
                .distinct()
                .filter(named("s").not())
                .build()?
                .alias("lu"),
        );
        aggs.push(
            array_agg(named("p"))
                .distinct()
                .filter(named("s"))
                .build()?
                .alias("su"),
        );
    }
    let batches: Vec<RecordBatch> = df.aggregate(group, aggs)?.collect().await?;
    let mut out = Vec::new();
    for batch in batches {
        let gb = batch
            .column_by_name("gb")
            .map(|c| c.as_primitive::<Int32Type>().clone());
        let gv = batch
            .column_by_name("gv")
            .map(|c| arrow::compute::cast(c, &arrow::datatypes::DataType::Utf8))
            .transpose()?;
        let n = batch
            .column_by_name("n")
            .expect("n")
            .as_primitive::<Int64Type>()
            .clone();
        let lu = batch
            .column_by_name("lu")
            .map(|c| c.as_primitive::<Int64Type>().clone());
        let su = batch
            .column_by_name("su")
            .map(|c| c.as_list::<i32>().clone());
        for row in 0..batch.num_rows() {
            let bucket = gb.as_ref().map(|a| a.value(row));
            let value = gv.as_ref().map(|a| {
                let a = a.as_string::<i32>();
                if a.is_null(row) {
                    NONE_LABEL.to_string()
                } else {
                    a.value(row).to_string()
                }
            });
            let shared = match &su {
                Some(list) if !list.is_null(row) => list
                    .value(row)
                    .as_primitive::<UInt64Type>()
                    .iter()
                    .flatten()
                    .collect(),
                _ => Vec::new(),
            };
            let partial = Partial {
                events: n.value(row) as u64,
                local_persons: lu.as_ref().map(|a| a.value(row) as u64).unwrap_or(0),
                shared_persons: shared,
            };
            out.push(((bucket, value), partial));
        }
    }
    Ok(out)
}

fn label_expr() -> Expr {
    // Nulls (property not set) are the "(none)" value, ranked like any other.
    datafusion::functions::expr_fn::coalesce(vec![named("v"), lit(NONE_LABEL)])
}

fn folded_label(top: &[String]) -> DfResult<Expr> {
    let keep: Vec<Expr> = top.iter().map(|v| lit(v.clone())).collect();
    case(label_expr().in_list(keep, false))
        .when(lit(true), label_expr())
        .otherwise(lit(OTHER_LABEL))
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

/// A series of total math: one aggregation per partition, everything else summed.
async fn total_series(
    q: &TrendsQuery,
    i: usize,
    frames: Vec<DataFrame>,
    buckets: &Buckets,
) -> DfResult<SeriesAnswer> {
    let with_value = q.breakdown.is_some();
    let parts =
        futures::future::try_join_all(frames.into_iter().map(|f| count_finest(f, with_value)))
            .await?;
    let mut finest: HashMap<(i32, Option<String>), u64> = HashMap::new();
    for (key, n) in parts.into_iter().flatten() {
        *finest.entry(key).or_default() += n;
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
        let mut per_value: HashMap<String, f64> = HashMap::new();
        for ((_, v), n) in &finest {
            *per_value.entry(v.clone().unwrap_or_default()).or_default() += *n as f64;
        }
        let (top, folded) = rank(per_value.into_iter(), b.limit);
        let mut labels = top.clone();
        if folded {
            labels.push(OTHER_LABEL.to_string());
        }
        let mut rows: HashMap<&str, Vec<f64>> = labels
            .iter()
            .map(|l| (l.as_str(), vec![0.0; buckets.len()]))
            .collect();
        for ((bucket, v), n) in &finest {
            let v = v.as_deref().unwrap_or_default();
            let label = if top.iter().any(|t| t == v) {
                v
            } else {
                OTHER_LABEL
            };
            if let Some(row) = rows.get_mut(label) {
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

/// A series of unique-user math: distinct persons per group, merged exactly.
async fn unique_series(
    ctx: &SessionContext,
    q: &TrendsQuery,
    i: usize,
    frames: Vec<DataFrame>,
    buckets: &Buckets,
) -> DfResult<SeriesAnswer> {
    let math = Math::UniqueUsers;
    let tables: Vec<Arc<MemTable>> =
        futures::future::try_join_all(frames.into_iter().map(materialize)).await?;
    let run_aggregate = |by_bucket: bool, label: Option<Expr>| {
        let tables = &tables;
        async move {
            let parts = futures::future::try_join_all(
                tables
                    .iter()
                    .map(|t| aggregate(ctx, t, by_bucket, label.clone(), true)),
            )
            .await?;
            let mut merged: HashMap<GroupKey, Merged> = HashMap::new();
            for (key, partial) in parts.into_iter().flatten() {
                merged.entry(key).or_default().add(partial);
            }
            Ok::<_, DataFusionError>(merged)
        }
    };
    let by_bucket = run_aggregate(true, None).await?;
    let total = run_aggregate(false, None).await?;
    let mut series = SeriesAnswer {
        id: q.series_id(i),
        values: (0..buckets.len())
            .map(|b| {
                by_bucket
                    .get(&(Some(b as i32), None))
                    .map(|m| m.value(math))
                    .unwrap_or(0.0)
            })
            .collect(),
        total: total
            .get(&(None, None))
            .map(|m| m.value(math))
            .unwrap_or(0.0),
        breakdown: Vec::new(),
    };
    if let Some(b) = &q.breakdown {
        // Rank every value by distinct persons over the whole range, then fold the rest, so
        // `(other)` counts each person once across the folded values.
        let ranking = run_aggregate(false, Some(label_expr())).await?;
        let (top, folded) = rank(
            ranking
                .iter()
                .filter_map(|((_, v), m)| v.clone().map(|v| (v, m.value(math)))),
            b.limit,
        );
        let label = folded_label(&top)?;
        let by_bucket = run_aggregate(true, Some(label.clone())).await?;
        let totals = run_aggregate(false, Some(label)).await?;
        let mut labels = top;
        if folded {
            labels.push(OTHER_LABEL.to_string());
        }
        for label in labels {
            let key = Some(label.clone());
            series.breakdown.push(BreakdownAnswer {
                values: (0..buckets.len())
                    .map(|bk| {
                        by_bucket
                            .get(&(Some(bk as i32), key.clone()))
                            .map(|m| m.value(math))
                            .unwrap_or(0.0)
                    })
                    .collect(),
                total: totals
                    .get(&(None, key))
                    .map(|m| m.value(math))
                    .unwrap_or(0.0),
                value: label,
            });
        }
    }
    Ok(series)
}

/// Runs a trends query.
pub async fn run(
    engine: &QueryEngine,
    project: ProjectId,
    q: &TrendsQuery,
) -> DfResult<TrendsAnswer> {
    let buckets = q.buckets();
    let identities = Arc::new(engine.identity_view(project));
    let now_ms = chrono::Utc::now().timestamp_millis();
    let ctx = engine.session();
    let mut answer = TrendsAnswer {
        buckets: buckets.labels.clone(),
        breakdown_property: q.breakdown.as_ref().map(|b| b.property.clone()),
        series: Vec::new(),
    };
    for (i, s) in q.series.iter().enumerate() {
        let events = s.event.as_ref().map(|e| vec![e.clone()]);
        let snapshots = engine.rows(
            project,
            buckets.start_ms(),
            buckets.end_ms,
            events.as_deref(),
        );
        let frames: Vec<DataFrame> = snapshots
            .iter()
            .map(|rows| filtered_frame(&ctx, rows, q, i, &buckets, &identities, now_ms))
            .collect::<DfResult<Vec<_>>>()?
            .into_iter()
            .flatten()
            .collect();
        let series = match s.math {
            Math::UniqueUsers => unique_series(&ctx, q, i, frames, &buckets).await?,
            _ => total_series(q, i, frames, &buckets).await?,
        };
        answer.series.push(series);
    }
    Ok(answer)
}
