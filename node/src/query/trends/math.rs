//! Trends math beyond event counts and plain uniques: property math (§2.1, §1.3, §1.6),
//! per-user two-stage math (§2.3), rolling active users (§2.2), cumulative distinct counts
//! (§2.8), formulas (§2.4) and the display transforms.
//!
//! DataFusion filters and buckets the events and aggregates what can be merged (moments per
//! bucket and value, per-person partials); the arithmetic that decides the numbers lives in
//! `optiprism_types::stats` and `optiprism_types::formula`, where it is tested against naive
//! references. Every grouping of a series (per bucket, per breakdown value, `(other)`, the
//! range) is computed by merging the finest partial results of the values it covers — never
//! by combining finished numbers, which for averages, percentiles and distinct counts would be
//! wrong.

use super::{fold, labels, rank, shown};
use crate::query::filter::named;
use arrow::array::AsArray;
use arrow::datatypes::{Float64Type, Int32Type, Int64Type, UInt64Type};
use datafusion::error::Result as DfResult;
use datafusion::functions_aggregate::expr_fn::{count, max, min, sum};
use datafusion::logical_expr::lit;
use datafusion::prelude::DataFrame;
use optiprism_types::answer::{BreakdownAnswer, OTHER_LABEL, SeriesAnswer, TrendsAnswer};
use optiprism_types::formula::Formula;
use optiprism_types::query::{Display, Math, TrendsQuery};
use optiprism_types::stats::{
    Aggregate, Moments, PerUnit, cumulative_distinct, cumulative_quantiles, quantile,
    rolling_distinct, round_to,
};
use std::collections::HashMap;

/// A bucket and breakdown value (`None` without a breakdown): the finest grouping.
type Key = (i32, Option<String>);

/// A distinct (bucket, breakdown value, unit) triple.
pub(super) type Triple = (i32, Option<String>, u64);

/// The bucket values and the range total of one row of a series.
type Row = (Vec<Option<f64>>, Option<f64>);

/// A transform of a row's bucket values (a display mode).
pub(super) type Transform<'a> = &'a dyn Fn(&[Option<f64>]) -> Vec<Option<f64>>;

/// Counts the (bucket, unit) pairs of one row into its [`Row`].
type PairCount<'a> = &'a dyn Fn(&mut [(usize, u64)]) -> Row;

/// A mergeable partial aggregate of the events of one (bucket, value) cell.
pub(super) trait Cell: Default + Clone {
    /// What the finished value needs besides the partial (the aggregate, the quantile).
    type Ctx: Copy;
    /// Adds the events of `other`.
    fn merge(&mut self, other: &Self);
    /// The finished, rounded value; `None` for an empty aggregation.
    fn value(&self, ctx: Self::Ctx) -> Option<f64>;
    /// Values over the growing prefixes `[from, end of bucket b]` of a row of cells.
    fn cumulative(cells: &[Self], ctx: Self::Ctx) -> Vec<Option<f64>> {
        let mut acc = Self::default();
        cells
            .iter()
            .map(|c| {
                acc.merge(c);
                acc.value(ctx)
            })
            .collect()
    }
}

/// Sum, average, minimum and maximum need only the moments.
#[derive(Debug, Clone, Default)]
pub(super) struct MomentsCell(Moments);

impl Cell for MomentsCell {
    type Ctx = Aggregate;
    fn merge(&mut self, other: &Self) {
        self.0.merge(&other.0);
    }
    fn value(&self, agg: Aggregate) -> Option<f64> {
        self.0.value(agg).map(|x| agg.round(x))
    }
}

/// Quantiles need every value.
#[derive(Debug, Clone, Default)]
pub(super) struct ValuesCell(Vec<f64>);

impl Cell for ValuesCell {
    type Ctx = f64;
    fn merge(&mut self, other: &Self) {
        self.0.extend_from_slice(&other.0);
    }
    fn value(&self, p: f64) -> Option<f64> {
        quantile(&mut self.0.clone(), p).map(|x| round_to(x, 4))
    }
    fn cumulative(cells: &[Self], p: f64) -> Vec<Option<f64>> {
        let values: Vec<(usize, f64)> = cells
            .iter()
            .enumerate()
            .flat_map(|(b, c)| c.0.iter().map(move |x| (b, *x)))
            .collect();
        cumulative_quantiles(&values, cells.len(), p)
            .into_iter()
            .map(|v| v.map(|x| round_to(x, 4)))
            .collect()
    }
}

/// Per-user math keeps each person's event count and the moments of their numeric values, so
/// a person's stage-1 value over several buckets or values is computed from their merged
/// events, not from stage-1 values of the parts.
#[derive(Debug, Clone, Default)]
pub(super) struct UnitsCell(HashMap<u64, (u64, Moments)>);

impl Cell for UnitsCell {
    type Ctx = (PerUnit, Aggregate);
    fn merge(&mut self, other: &Self) {
        for (p, (n, m)) in &other.0 {
            let e = self.0.entry(*p).or_default();
            e.0 += n;
            e.1.merge(m);
        }
    }
    fn value(&self, (stage1, stage2): (PerUnit, Aggregate)) -> Option<f64> {
        let mut values: Vec<f64> = self
            .0
            .values()
            .filter_map(|(n, m)| stage1.value(*n, m))
            .collect();
        stage2.apply(&mut values).map(|x| stage2.round(x))
    }
}

/// Column `name` of an aggregate's output, as the primitive array it is.
fn primitive<T: arrow::datatypes::ArrowPrimitiveType>(
    batch: &arrow::array::RecordBatch,
    name: &str,
) -> arrow::array::PrimitiveArray<T> {
    batch
        .column_by_name(name)
        .unwrap_or_else(|| panic!("aggregate output has column {name}"))
        .as_primitive::<T>()
        .clone()
}

/// A series from the partial results of its finest cells.
pub(super) fn assemble<C: Cell>(
    q: &TrendsQuery,
    i: usize,
    finest: HashMap<Key, C>,
    buckets: usize,
    ctx: C::Ctx,
) -> SeriesAnswer {
    let row = |cells: &[C]| -> Vec<Option<f64>> {
        if q.display == Display::Cumulative {
            C::cumulative(cells, ctx)
        } else {
            cells.iter().map(|c| c.value(ctx)).collect()
        }
    };
    let mut by_bucket = vec![C::default(); buckets];
    for ((b, _), c) in &finest {
        by_bucket[*b as usize].merge(c);
    }
    let mut all = C::default();
    for c in &by_bucket {
        all.merge(c);
    }
    let mut series = SeriesAnswer {
        id: q.series_id(i),
        values: row(&by_bucket),
        total: all.value(ctx),
        breakdown: Vec::new(),
    };
    if let Some(b) = &q.breakdown {
        let mut per_value: HashMap<&str, C> = HashMap::new();
        for ((_, v), c) in &finest {
            per_value
                .entry(v.as_deref().unwrap_or_default())
                .or_default()
                .merge(c);
        }
        // Empty aggregations rank last.
        let (top, folded) = rank(
            per_value
                .iter()
                .map(|(v, c)| (v.to_string(), c.value(ctx).unwrap_or(f64::NEG_INFINITY))),
            b.limit,
        );
        let shown_labels = shown(&top, folded);
        let mut rows: HashMap<&str, Vec<C>> = shown_labels
            .iter()
            .map(|l| (l.as_str(), vec![C::default(); buckets]))
            .collect();
        for ((bucket, v), c) in &finest {
            if let Some(row) = rows.get_mut(fold(&top, v.as_deref().unwrap_or_default())) {
                row[*bucket as usize].merge(c);
            }
        }
        for label in &shown_labels {
            let cells = rows.remove(label.as_str()).unwrap_or_default();
            let mut total = C::default();
            for c in &cells {
                total.merge(c);
            }
            series.breakdown.push(BreakdownAnswer {
                value: label.clone(),
                values: row(&cells),
                total: total.value(ctx),
            });
        }
    }
    series
}

/// Event-level property math: moments per (bucket, value) from DataFusion for sums, averages,
/// minima and maxima; every value for quantiles. `frame` holds only events with a numeric
/// value (column `x`).
pub(super) async fn property_series(
    q: &TrendsQuery,
    i: usize,
    frame: Option<DataFrame>,
    agg: Aggregate,
    buckets: usize,
) -> DfResult<SeriesAnswer> {
    let mut group = vec![named("b")];
    if q.breakdown.is_some() {
        group.push(named("v"));
    }
    if let Aggregate::Quantile(p) = agg {
        let mut finest: HashMap<Key, ValuesCell> = HashMap::new();
        if let Some(frame) = frame {
            let mut select = group.clone();
            select.push(named("x"));
            for batch in frame.select(select)?.collect().await? {
                let b = primitive::<Int32Type>(&batch, "b");
                let x = primitive::<Float64Type>(&batch, "x");
                let v = labels(&batch)?;
                for row in 0..batch.num_rows() {
                    let key = (b.value(row), v.as_ref().map(|v| v[row].clone()));
                    finest.entry(key).or_default().0.push(x.value(row));
                }
            }
        }
        return Ok(assemble(q, i, finest, buckets, p));
    }
    let mut finest: HashMap<Key, MomentsCell> = HashMap::new();
    if let Some(frame) = frame {
        let aggregates = vec![
            count(named("x")).alias("n"),
            sum(named("x")).alias("s"),
            min(named("x")).alias("lo"),
            max(named("x")).alias("hi"),
        ];
        for batch in frame.aggregate(group, aggregates)?.collect().await? {
            let b = primitive::<Int32Type>(&batch, "b");
            let n = primitive::<Int64Type>(&batch, "n");
            let (s, lo, hi) = (
                primitive::<Float64Type>(&batch, "s"),
                primitive::<Float64Type>(&batch, "lo"),
                primitive::<Float64Type>(&batch, "hi"),
            );
            let v = labels(&batch)?;
            for row in 0..batch.num_rows() {
                let key = (b.value(row), v.as_ref().map(|v| v[row].clone()));
                let moments = Moments {
                    count: n.value(row) as u64,
                    sum: s.value(row),
                    min: lo.value(row),
                    max: hi.value(row),
                };
                finest.entry(key).or_default().0.merge(&moments);
            }
        }
    }
    Ok(assemble(q, i, finest, buckets, agg))
}

/// Per-user math (§2.3): each person's event count and numeric moments per (bucket, value)
/// from DataFusion (partial per partition, then final), then stage 1 and stage 2 here. Only
/// persons with events in a cell take part in it: "per user" means per *active* user.
pub(super) async fn per_user_series(
    q: &TrendsQuery,
    i: usize,
    frame: Option<DataFrame>,
    stage2: Aggregate,
    buckets: usize,
) -> DfResult<SeriesAnswer> {
    let stage1 = q.per_unit(i);
    let mut finest: HashMap<Key, UnitsCell> = HashMap::new();
    if let Some(frame) = frame {
        let mut group = vec![named("b"), named("p")];
        if q.breakdown.is_some() {
            group.push(named("v"));
        }
        let mut aggregates = vec![count(lit(1i64)).alias("e")];
        if stage1.needs_property() {
            aggregates.extend([
                count(named("x")).alias("n"),
                sum(named("x")).alias("s"),
                min(named("x")).alias("lo"),
                max(named("x")).alias("hi"),
            ]);
        }
        for batch in frame.aggregate(group, aggregates)?.collect().await? {
            let b = primitive::<Int32Type>(&batch, "b");
            let p = primitive::<UInt64Type>(&batch, "p");
            let e = primitive::<Int64Type>(&batch, "e");
            let numbers = stage1.needs_property().then(|| {
                (
                    primitive::<Int64Type>(&batch, "n"),
                    primitive::<Float64Type>(&batch, "s"),
                    primitive::<Float64Type>(&batch, "lo"),
                    primitive::<Float64Type>(&batch, "hi"),
                )
            });
            let v = labels(&batch)?;
            for row in 0..batch.num_rows() {
                let key = (b.value(row), v.as_ref().map(|v| v[row].clone()));
                let mut moments = Moments::default();
                if let Some((n, s, lo, hi)) = &numbers
                    && n.value(row) > 0
                {
                    moments = Moments {
                        count: n.value(row) as u64,
                        sum: s.value(row),
                        min: lo.value(row),
                        max: hi.value(row),
                    };
                }
                let unit = finest
                    .entry(key)
                    .or_default()
                    .0
                    .entry(p.value(row))
                    .or_default();
                unit.0 += e.value(row) as u64;
                unit.1.merge(&moments);
            }
        }
    }
    Ok(assemble(q, i, finest, buckets, (stage1, stage2)))
}

/// A distinct-count series computed from (bucket, value, unit) triples by `count`, which turns
/// the (bucket, unit) pairs of one row into its bucket values and range total. Each breakdown
/// row, `(other)` and the unbroken series are counted from their own pairs, so a unit is
/// counted once per row however many values or buckets it appears in.
pub(super) fn pairs_series(
    q: &TrendsQuery,
    i: usize,
    triples: Vec<Triple>,
    count: PairCount<'_>,
) -> SeriesAnswer {
    let mut all: Vec<(usize, u64)> = triples.iter().map(|(b, _, u)| (*b as usize, *u)).collect();
    let (values, total) = count(&mut all);
    drop(all);
    let mut series = SeriesAnswer {
        id: q.series_id(i),
        values,
        total,
        breakdown: Vec::new(),
    };
    if let Some(b) = &q.breakdown {
        let mut per_value: HashMap<String, Vec<(usize, u64)>> = HashMap::new();
        for (bucket, v, u) in triples {
            per_value
                .entry(v.unwrap_or_default())
                .or_default()
                .push((bucket as usize, u));
        }
        let mut counted: HashMap<String, Row> = per_value
            .iter_mut()
            .map(|(v, pairs)| (v.clone(), count(pairs)))
            .collect();
        let (top, folded) = rank(
            counted
                .iter()
                .map(|(v, (_, t))| (v.clone(), t.unwrap_or(f64::NEG_INFINITY))),
            b.limit,
        );
        for label in shown(&top, folded) {
            let (values, total) = if label == OTHER_LABEL {
                let mut pairs: Vec<(usize, u64)> = per_value
                    .iter()
                    .filter(|(v, _)| fold(&top, v) == OTHER_LABEL)
                    .flat_map(|(_, p)| p.iter().copied())
                    .collect();
                count(&mut pairs)
            } else {
                counted.remove(&label).unwrap_or_default()
            };
            series.breakdown.push(BreakdownAnswer {
                value: label,
                values,
                total,
            });
        }
    }
    series
}

/// Rolling active users (§2.2): pairs are bucketed by local day from the first look-back day;
/// each day counts the units active in the `window` days ending on it. The range total is the
/// window ending on `date_to` (the last day's value), as a single-number WAU/MAU reads.
pub(super) fn rolling_series(
    q: &TrendsQuery,
    i: usize,
    triples: Vec<Triple>,
    window: usize,
    days: usize,
) -> SeriesAnswer {
    let lookback = window - 1;
    pairs_series(q, i, triples, &|pairs| {
        let counts = rolling_distinct(pairs, window, lookback + days);
        let values: Vec<Option<f64>> = counts[lookback..].iter().map(|n| Some(*n as f64)).collect();
        let total = values.last().copied().flatten();
        (values, total)
    })
}

/// Cumulative distinct units (§2.8): each bucket counts the units seen from `from` to its end;
/// the last bucket's count is the range total.
pub(super) fn cumulative_distinct_series(
    q: &TrendsQuery,
    i: usize,
    triples: Vec<Triple>,
    buckets: usize,
) -> SeriesAnswer {
    pairs_series(q, i, triples, &|pairs| {
        let counts = cumulative_distinct(pairs, buckets);
        let total = counts.last().map(|n| *n as f64).or(Some(0.0));
        (counts.into_iter().map(|n| Some(n as f64)).collect(), total)
    })
}

/// Applies a transform to the bucket values of a series and of its breakdown rows.
pub(super) fn map_rows(series: &mut SeriesAnswer, f: Transform<'_>) {
    series.values = f(&series.values);
    for b in &mut series.breakdown {
        b.values = f(&b.values);
    }
}

/// Whether a math's empty aggregation is 0 (a count) rather than null.
fn counts(math: Math) -> bool {
    matches!(
        math,
        Math::Total
            | Math::UniqueUsers
            | Math::UniqueSessions
            | Math::WeeklyActive
            | Math::MonthlyActive
    )
}

/// The formula series (§2.4): evaluated per bucket over the series' (displayed) bucket values,
/// and over their range totals for the range value (`A_total / B_total`: a ratio of totals, not
/// a sum of per-bucket ratios).
///
/// With a breakdown it is evaluated per value, matching the series' rows by value, not by
/// position. A value missing from a series that folded nothing had no events there (its
/// empty aggregation: 0 for counts, null otherwise); missing from a series that folded values
/// into `(other)`, it is unknown (null). `(other)` itself folds different values in each
/// series and gets no formula row.
pub(super) fn formula_series(
    q: &TrendsQuery,
    formula: &Formula,
    series: &[SeriesAnswer],
    buckets: usize,
) -> SeriesAnswer {
    let zero = q.divide_by_zero.unwrap_or_default();
    let by_id: HashMap<&str, (usize, &SeriesAnswer)> = series
        .iter()
        .enumerate()
        .map(|(i, s)| (s.id.as_str(), (i, s)))
        .collect();
    let values: Vec<Option<f64>> = (0..buckets)
        .map(|b| formula.eval(&|id| by_id.get(id).and_then(|(_, s)| s.values[b]), zero))
        .collect();
    let total = formula.eval(&|id| by_id.get(id).and_then(|(_, s)| s.total), zero);
    let mut out = SeriesAnswer {
        id: optiprism_types::query::FORMULA_ID.to_string(),
        values,
        total,
        breakdown: Vec::new(),
    };
    if q.breakdown.is_some() {
        let mut labels: Vec<&str> = Vec::new();
        for s in series {
            for row in &s.breakdown {
                if row.value != OTHER_LABEL && !labels.contains(&row.value.as_str()) {
                    labels.push(&row.value);
                }
            }
        }
        for label in labels {
            // Per series: its row of this value, or what a missing row means.
            let cell = |id: &str, b: Option<usize>| -> Option<f64> {
                let (i, s) = by_id.get(id)?;
                match s.breakdown.iter().find(|r| r.value == label) {
                    Some(r) => match b {
                        Some(b) => r.values[b],
                        None => r.total,
                    },
                    None => {
                        let folded = s.breakdown.iter().any(|r| r.value == OTHER_LABEL);
                        (!folded && counts(q.series[*i].math)).then_some(0.0)
                    }
                }
            };
            out.breakdown.push(BreakdownAnswer {
                value: label.to_string(),
                values: (0..buckets)
                    .map(|b| formula.eval(&|id| cell(id, Some(b)), zero))
                    .collect(),
                total: formula.eval(&|id| cell(id, None), zero),
            });
        }
    }
    out
}

/// Logarithmic display (§2.8): points that are zero or negative cannot be drawn and become
/// gaps (null). Range totals and percent changes are numbers, not points, and stay.
pub(super) fn log_gaps(answer: &mut TrendsAnswer) {
    let gaps = |values: &[Option<f64>]| -> Vec<Option<f64>> {
        values.iter().map(|v| v.filter(|x| *x > 0.0)).collect()
    };
    let previous = answer.previous.iter_mut().flat_map(|p| p.series.iter_mut());
    for s in answer
        .series
        .iter_mut()
        .chain(answer.formula.iter_mut())
        .chain(previous)
    {
        map_rows(s, &gaps);
    }
}
