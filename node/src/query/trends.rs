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
use datafusion::prelude::SessionContext;
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

/// The filtered, projected rows of one series in one partition: columns `b` (bucket),
/// optional `v` (breakdown value), and for unique math `p` (person) and `s` (shared person).
async fn materialize(
    ctx: &SessionContext,
    rows: &ProjectRows,
    q: &TrendsQuery,
    series: usize,
    buckets: &Buckets,
    identities: &Arc<IdentityView>,
    now_ms: i64,
) -> DfResult<Option<Arc<MemTable>>> {
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
    let df = df.select(select)?;
    let schema = Arc::new(df.schema().as_arrow().clone());
    let batches = df.collect().await?;
    Ok(Some(Arc::new(MemTable::try_new(schema, vec![batches])?)))
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
        let unique = s.math == Math::UniqueUsers;
        // Phase 1: filter and project every partition concurrently.
        let tables: Vec<Arc<MemTable>> = futures::future::try_join_all(
            snapshots
                .iter()
                .map(|rows| materialize(&ctx, rows, q, i, &buckets, &identities, now_ms)),
        )
        .await?
        .into_iter()
        .flatten()
        .collect();
        let merge_groups = |parts: Vec<Vec<(GroupKey, Partial)>>| {
            let mut merged: HashMap<GroupKey, Merged> = HashMap::new();
            for (key, partial) in parts.into_iter().flatten() {
                merged.entry(key).or_default().add(partial);
            }
            merged
        };
        let run_aggregate = |by_bucket: bool, label: Option<Expr>| {
            let ctx = &ctx;
            let tables = &tables;
            async move {
                let parts = futures::future::try_join_all(
                    tables
                        .iter()
                        .map(|t| aggregate(ctx, t, by_bucket, label.clone(), unique)),
                )
                .await?;
                Ok::<_, DataFusionError>(merge_groups(parts))
            }
        };
        let unbroken_buckets = run_aggregate(true, None).await?;
        let unbroken_total = run_aggregate(false, None).await?;
        let mut series = SeriesAnswer {
            id: q.series_id(i),
            values: (0..buckets.len())
                .map(|b| {
                    unbroken_buckets
                        .get(&(Some(b as i32), None))
                        .map(|m| m.value(s.math))
                        .unwrap_or(0.0)
                })
                .collect(),
            total: unbroken_total
                .get(&(None, None))
                .map(|m| m.value(s.math))
                .unwrap_or(0.0),
            breakdown: Vec::new(),
        };
        if let Some(b) = &q.breakdown {
            // Rank every value by the series' metric over the whole range.
            let ranking = run_aggregate(false, Some(label_expr())).await?;
            let mut ranked: Vec<(String, f64)> = ranking
                .iter()
                .filter_map(|((_, v), m)| v.clone().map(|v| (v, m.value(s.math))))
                .collect();
            ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
            let top: Vec<String> = ranked
                .iter()
                .take(b.limit)
                .map(|(v, _)| v.clone())
                .collect();
            let folded = folded_label(&top)?;
            let by_bucket = run_aggregate(true, Some(folded.clone())).await?;
            let totals = run_aggregate(false, Some(folded)).await?;
            let mut labels = top.clone();
            if ranked.len() > top.len() {
                labels.push(OTHER_LABEL.to_string());
            }
            for label in labels {
                let key = Some(label.clone());
                series.breakdown.push(BreakdownAnswer {
                    values: (0..buckets.len())
                        .map(|bk| {
                            by_bucket
                                .get(&(Some(bk as i32), key.clone()))
                                .map(|m| m.value(s.math))
                                .unwrap_or(0.0)
                        })
                        .collect(),
                    total: totals
                        .get(&(None, key))
                        .map(|m| m.value(s.math))
                        .unwrap_or(0.0),
                    value: label,
                });
            }
        }
        answer.series.push(series);
    }
    Ok(answer)
}
