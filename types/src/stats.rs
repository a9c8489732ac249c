//! The pure arithmetic of trends math (`spec/analytics.md` §1.3, §1.6, §2.2, §2.3, §2.6, §2.8).
//!
//! Everything here works on plain numbers and ids, so the node's DataFusion plans only have to
//! gather the values, and the rules (numeric coercion, type-7 percentiles, rolling windows,
//! cumulative distinct counts, moving averages, percent change) are defined, and tested against
//! naive references, in one place without a query engine.

use serde::{Deserialize, Serialize};

/// The numeric value of a property's string form (§1.3): numbers and numeric strings count,
/// surrounding whitespace is ignored, and anything else, including `NaN` and infinities that
/// Rust's parser would accept, is not a number.
pub fn parse_number(s: &str) -> Option<f64> {
    // `f64::from_str` also accepts `inf`, `infinity` and `nan`: words, not numbers, for a
    // user's property, and they would poison every sum.
    s.trim().parse::<f64>().ok().filter(|n| n.is_finite())
}

/// Rounds to `decimals` decimal places (the spec's output precision: 4 for averages and
/// percentiles, 2 for percentages). Values too large to carry that many decimals are returned
/// unchanged rather than overflowing.
pub fn round_to(x: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    let scaled = x * scale;
    if !scaled.is_finite() || scaled.abs() >= 9.007_199_254_740_992e15 {
        return x;
    }
    let r = scaled.round() / scale;
    // `-0.0` would print as `-0`.
    if r == 0.0 { 0.0 } else { r }
}

/// The type-7 quantile (Hyndman–Fan, §1.6) of values sorted ascending: with `h = (n−1)·p`,
/// `x[⌊h⌋] + (h−⌊h⌋)·(x[⌊h⌋+1] − x[⌊h⌋])`. `None` for no values.
pub fn quantile_sorted(sorted: &[f64], p: f64) -> Option<f64> {
    let n = sorted.len();
    if n == 0 {
        return None;
    }
    let h = (n - 1) as f64 * p.clamp(0.0, 1.0);
    let lo = h.floor() as usize;
    let frac = h - lo as f64;
    let x = sorted[lo];
    if frac == 0.0 || lo + 1 >= n {
        return Some(x);
    }
    Some(x + frac * (sorted[lo + 1] - x))
}

/// The type-7 quantile of unsorted values, in linear time: only the two order statistics the
/// interpolation needs are selected, the values are reordered.
pub fn quantile(values: &mut [f64], p: f64) -> Option<f64> {
    let n = values.len();
    if n == 0 {
        return None;
    }
    let h = (n - 1) as f64 * p.clamp(0.0, 1.0);
    let lo = h.floor() as usize;
    let frac = h - lo as f64;
    let (_, x, above) = values.select_nth_unstable_by(lo, f64::total_cmp);
    let x = *x;
    if frac == 0.0 || above.is_empty() {
        return Some(x);
    }
    // The next order statistic is the smallest value above the `lo`-th.
    let next = above.iter().copied().fold(f64::INFINITY, f64::min);
    Some(x + frac * (next - x))
}

/// An aggregation of numbers: event-level property math (§2.1) and stage 2 of per-user math
/// (§2.3).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Aggregate {
    /// Sum.
    Sum,
    /// Arithmetic mean.
    Avg,
    /// Smallest value.
    Min,
    /// Largest value.
    Max,
    /// Type-7 quantile at `p` in `[0, 1]` (the median is 0.5).
    Quantile(f64),
}

impl Aggregate {
    /// The aggregate of `values` (reordered), unrounded; `None` when there are none (§2.1: an
    /// empty aggregation is null, not 0).
    pub fn apply(self, values: &mut [f64]) -> Option<f64> {
        match self {
            Aggregate::Quantile(p) => quantile(values, p),
            _ => {
                let mut m = Moments::default();
                for x in values.iter() {
                    m.push(*x);
                }
                m.value(self)
            }
        }
    }

    /// Whether the aggregate needs every value (quantiles) rather than [`Moments`].
    pub fn needs_values(self) -> bool {
        matches!(self, Aggregate::Quantile(_))
    }

    /// A result rounded as the spec prints it: averages and percentiles to 4 decimals; sums,
    /// minima and maxima are values of the data and stay exact.
    pub fn round(self, x: f64) -> f64 {
        match self {
            Aggregate::Avg | Aggregate::Quantile(_) => round_to(x, 4),
            Aggregate::Sum | Aggregate::Min | Aggregate::Max => x,
        }
    }
}

/// Count, sum, minimum and maximum of some numbers: enough for every aggregate but quantiles,
/// and mergeable, so partial results of buckets, partitions and breakdown values combine.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Moments {
    /// How many numbers.
    pub count: u64,
    /// Their sum.
    pub sum: f64,
    /// The smallest (`+∞` when none).
    pub min: f64,
    /// The largest (`−∞` when none).
    pub max: f64,
}

impl Default for Moments {
    fn default() -> Moments {
        Moments {
            count: 0,
            sum: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
        }
    }
}

impl Moments {
    /// Adds one number.
    pub fn push(&mut self, x: f64) {
        self.count += 1;
        self.sum += x;
        self.min = self.min.min(x);
        self.max = self.max.max(x);
    }

    /// Adds the numbers of `other`.
    pub fn merge(&mut self, other: &Moments) {
        self.count += other.count;
        self.sum += other.sum;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
    }

    /// `agg` of the numbers, unrounded; `None` when there are none or `agg` is a quantile.
    pub fn value(&self, agg: Aggregate) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        match agg {
            Aggregate::Sum => Some(self.sum),
            Aggregate::Avg => Some(self.sum / self.count as f64),
            Aggregate::Min => Some(self.min),
            Aggregate::Max => Some(self.max),
            Aggregate::Quantile(_) => None,
        }
    }
}

/// Stage 1 of per-user math (§2.3): the value computed for each unit over its events in a
/// bucket, before stage 2 aggregates them across the units.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PerUnit {
    /// The unit's number of events.
    #[default]
    Count,
    /// The sum of the unit's numeric property values.
    Sum,
    /// Their mean.
    Avg,
    /// Their minimum.
    Min,
    /// Their maximum.
    Max,
}

impl PerUnit {
    /// The unit's stage-1 value from its event count and the moments of its numeric values;
    /// `None` (the unit leaves stage 2) when a property aggregate has no numeric value to
    /// aggregate, as event-level property math ignores such events.
    pub fn value(self, events: u64, numbers: &Moments) -> Option<f64> {
        match self {
            PerUnit::Count => Some(events as f64),
            PerUnit::Sum => numbers.value(Aggregate::Sum),
            PerUnit::Avg => numbers.value(Aggregate::Avg),
            PerUnit::Min => numbers.value(Aggregate::Min),
            PerUnit::Max => numbers.value(Aggregate::Max),
        }
    }

    /// Whether stage 1 reads a property.
    pub fn needs_property(self) -> bool {
        self != PerUnit::Count
    }
}

/// Rolling distinct counts (§2.2): `pairs` are (day index, unit) activity with days counted
/// from the first look-back day; the result has one count per day `d` in `0..days`: the
/// distinct units active on any of the days `d−window+1 ..= d`.
///
/// Each unit's active days are turned into the union of the intervals `[a, a+window−1]` they
/// cover, and the days under those intervals are counted with a difference array, so the cost
/// is the sort of the pairs, not `days × window` set unions.
pub fn rolling_distinct(pairs: &mut [(usize, u64)], window: usize, days: usize) -> Vec<u64> {
    let window = window.max(1);
    if days == 0 {
        return Vec::new();
    }
    pairs.sort_unstable_by_key(|&(d, u)| (u, d));
    let mut diff = vec![0i64; days + 1];
    let mut open: Option<(u64, usize, usize)> = None;
    let close = |(_, start, end): (u64, usize, usize), diff: &mut Vec<i64>| {
        diff[start] += 1;
        diff[end.min(days - 1) + 1] -= 1;
    };
    for &(day, unit) in pairs.iter().filter(|(d, _)| *d < days) {
        let end = day + window - 1;
        open = match open {
            // A day inside (or right after) the unit's current interval extends it.
            Some((u, start, e)) if u == unit && day <= e + 1 => Some((u, start, e.max(end))),
            Some(interval) => {
                close(interval, &mut diff);
                Some((unit, day, end))
            }
            None => Some((unit, day, end)),
        };
    }
    if let Some(interval) = open {
        close(interval, &mut diff);
    }
    let mut running = 0i64;
    diff[..days]
        .iter()
        .map(|d| {
            running += d;
            running as u64
        })
        .collect()
}

/// Cumulative distinct counts (§2.8): for each bucket `b` in `0..buckets`, the number of units
/// in any of the `pairs` (bucket, unit) with a bucket up to and including `b` — not a running
/// sum of the buckets' distinct counts, which would count a returning unit again.
pub fn cumulative_distinct(pairs: &mut [(usize, u64)], buckets: usize) -> Vec<u64> {
    pairs.sort_unstable_by_key(|&(b, u)| (u, b));
    let mut first_seen = vec![0u64; buckets];
    let mut last: Option<u64> = None;
    for &(b, u) in pairs.iter() {
        if last != Some(u) && b < buckets {
            first_seen[b] += 1;
            last = Some(u);
        }
    }
    let mut running = 0u64;
    first_seen
        .into_iter()
        .map(|n| {
            running += n;
            running
        })
        .collect()
}

/// Cumulative type-7 quantiles (§2.8, "recompute over `[from, bucket end]`"): for each bucket
/// `b`, the quantile `p` of every value in buckets `0..=b`, unrounded; `None` while there are
/// none.
///
/// Values are ranked once; a Fenwick tree over the ranks holds the values seen so far, and the
/// two order statistics of each bucket's quantile are found by descending it, so the cost is
/// `O(n log n)` instead of re-sorting a growing prefix for every bucket.
pub fn cumulative_quantiles(values: &[(usize, f64)], buckets: usize, p: f64) -> Vec<Option<f64>> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_unstable_by(|&a, &b| values[a].1.total_cmp(&values[b].1));
    let sorted: Vec<f64> = order.iter().map(|&i| values[i].1).collect();
    let mut ranks_by_bucket: Vec<Vec<usize>> = vec![Vec::new(); buckets];
    for (rank, &i) in order.iter().enumerate() {
        if let Some(list) = ranks_by_bucket.get_mut(values[i].0) {
            list.push(rank);
        }
    }
    let mut tree = Fenwick::new(sorted.len());
    let mut seen = 0usize;
    let p = p.clamp(0.0, 1.0);
    ranks_by_bucket
        .into_iter()
        .map(|ranks| {
            for r in ranks {
                tree.add(r);
                seen += 1;
            }
            if seen == 0 {
                return None;
            }
            let h = (seen - 1) as f64 * p;
            let lo = h.floor() as usize;
            let frac = h - lo as f64;
            let x = sorted[tree.nth(lo)];
            if frac == 0.0 || lo + 1 >= seen {
                return Some(x);
            }
            let y = sorted[tree.nth(lo + 1)];
            Some(x + frac * (y - x))
        })
        .collect()
}

/// Counts of inserted ranks, for order statistics of a growing multiset.
struct Fenwick {
    tree: Vec<usize>,
}

impl Fenwick {
    fn new(n: usize) -> Fenwick {
        Fenwick {
            tree: vec![0; n + 1],
        }
    }

    fn add(&mut self, rank: usize) {
        let mut i = rank + 1;
        while i < self.tree.len() {
            self.tree[i] += 1;
            i += i & i.wrapping_neg();
        }
    }

    /// The rank of the `k`-th (0-based) smallest inserted element; `k` must be below the count.
    fn nth(&self, k: usize) -> usize {
        let n = self.tree.len() - 1;
        let mut pos = 0usize;
        let mut remaining = k + 1;
        let mut step = n.next_power_of_two();
        while step > 0 {
            let next = pos + step;
            if next <= n && self.tree[next] < remaining {
                pos = next;
                remaining -= self.tree[next];
            }
            step >>= 1;
        }
        pos
    }
}

/// Trailing moving average (§2.8, "smoothing"): the mean of the last `k` bucket values; the
/// first buckets average what is available, and null values (empty aggregations) are left
/// out of the mean rather than counted as 0. Rounded to 4 decimals, as averages are.
pub fn moving_average(values: &[Option<f64>], k: usize) -> Vec<Option<f64>> {
    let k = k.max(1);
    (0..values.len())
        .map(|i| {
            let window = &values[(i + 1).saturating_sub(k)..=i];
            let present: Vec<f64> = window.iter().flatten().copied().collect();
            if present.is_empty() {
                None
            } else {
                Some(round_to(
                    present.iter().sum::<f64>() / present.len() as f64,
                    4,
                ))
            }
        })
        .collect()
}

/// Running sums (§2.8 cumulative, for additive math); null until the first non-null value.
pub fn running_sum(values: &[Option<f64>]) -> Vec<Option<f64>> {
    let mut acc: Option<f64> = None;
    values
        .iter()
        .map(|v| {
            if let Some(x) = v {
                acc = Some(acc.unwrap_or(0.0) + x);
            }
            acc
        })
        .collect()
}

/// Percent change from `previous` to `current` (§2.6), rounded to 2 decimals; undefined (null)
/// when either is null or the previous value is 0.
pub fn change_pct(current: Option<f64>, previous: Option<f64>) -> Option<f64> {
    match (current, previous) {
        (Some(c), Some(p)) if p != 0.0 => {
            let pct = (c - p) / p * 100.0;
            pct.is_finite().then(|| round_to(pct, 2))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    #[test]
    fn numbers_and_numeric_strings_coerce() {
        assert_eq!(parse_number("40"), Some(40.0));
        assert_eq!(parse_number(" 2.5 "), Some(2.5));
        assert_eq!(parse_number("-1e3"), Some(-1000.0));
        for s in [
            "abc",
            "",
            "  ",
            "NaN",
            "inf",
            "-Infinity",
            "1,5",
            "true",
            "{}",
        ] {
            assert_eq!(parse_number(s), None, "{s}");
        }
    }

    #[test]
    fn percentiles_interpolate_linearly() {
        // §2.3 example 2.B: usable values [10, 20, 30, 40, 100].
        let v = [10.0, 20.0, 30.0, 40.0, 100.0];
        assert_eq!(quantile_sorted(&v, 0.5), Some(30.0));
        assert_eq!(quantile_sorted(&v, 0.75), Some(40.0));
        assert_eq!(quantile_sorted(&v, 0.9), Some(76.0));
        assert_eq!(quantile_sorted(&[1.0, 1.0, 2.0, 3.0], 0.5), Some(1.5));
        let zero_to_nine: Vec<f64> = (0..10).map(f64::from).collect();
        assert_eq!(quantile_sorted(&zero_to_nine, 0.5), Some(4.5));
        assert_eq!(quantile_sorted(&[7.0], 0.99), Some(7.0));
        assert_eq!(quantile_sorted(&[], 0.5), None);
        let mut shuffled = [100.0, 30.0, 10.0, 40.0, 20.0];
        assert_eq!(quantile(&mut shuffled, 0.9), Some(76.0));
    }

    #[test]
    fn aggregates_of_example_2b() {
        let v = [10.0, 20.0, 30.0, 40.0, 100.0];
        let of = |a: Aggregate| a.apply(&mut v.clone());
        assert_eq!(of(Aggregate::Sum), Some(200.0));
        assert_eq!(of(Aggregate::Avg), Some(40.0));
        assert_eq!(of(Aggregate::Min), Some(10.0));
        assert_eq!(of(Aggregate::Max), Some(100.0));
        assert_eq!(Aggregate::Sum.apply(&mut []), None);
    }

    #[test]
    fn per_user_two_stage_example_2c() {
        // Per-user counts 3, 1, 2, 4 and sums 600, 50, 150, 40.
        let mut counts = [3.0, 1.0, 2.0, 4.0];
        assert_eq!(Aggregate::Avg.apply(&mut counts), Some(2.5));
        assert_eq!(Aggregate::Quantile(0.5).apply(&mut counts), Some(2.5));
        assert_eq!(Aggregate::Max.apply(&mut counts), Some(4.0));
        let mut sums = [600.0, 50.0, 150.0, 40.0];
        assert_eq!(Aggregate::Avg.apply(&mut sums), Some(210.0));
        assert_eq!(Aggregate::Quantile(0.5).apply(&mut sums), Some(100.0));
        let mut m = Moments::default();
        m.push(100.0);
        m.push(200.0);
        assert_eq!(PerUnit::Sum.value(3, &m), Some(300.0));
        assert_eq!(PerUnit::Count.value(3, &m), Some(3.0));
        assert_eq!(PerUnit::Avg.value(1, &Moments::default()), None);
    }

    #[test]
    fn rolling_windows_of_example_2a() {
        // Look-back starts Jan 1 (day 0); the range is Jan 7..10 (days 6..9).
        let (u1, u2, u3) = (1, 2, 3);
        let mut pairs = vec![(0, u1), (2, u2), (7, u3), (8, u1)];
        let wau = rolling_distinct(&mut pairs.clone(), 7, 10);
        assert_eq!(&wau[6..], &[2, 2, 3, 2]);
        let mau = rolling_distinct(&mut pairs, 30, 10);
        assert_eq!(&mau[6..], &[2, 3, 3, 3]);
    }

    #[test]
    fn display_transforms_of_section_2_8() {
        let totals = [Some(2.0), Some(2.0), Some(0.0), Some(3.0)];
        assert_eq!(
            running_sum(&totals),
            [Some(2.0), Some(4.0), Some(4.0), Some(7.0)]
        );
        assert_eq!(
            moving_average(&totals, 2),
            [Some(2.0), Some(2.0), Some(1.0), Some(1.5)]
        );
        // Daily uniques [2, 2, 0, 2] whose cumulative distinct is [2, 3, 3, 4].
        let mut pairs = vec![(0, 1), (0, 2), (1, 2), (1, 3), (3, 1), (3, 4)];
        assert_eq!(cumulative_distinct(&mut pairs, 4), [2, 3, 3, 4]);
        assert_eq!(moving_average(&[None, Some(4.0)], 2), [None, Some(4.0)]);
    }

    #[test]
    fn percent_change() {
        assert_eq!(change_pct(Some(6.0), Some(4.0)), Some(50.0));
        assert_eq!(change_pct(Some(1.0), Some(3.0)), Some(-66.67));
        assert_eq!(change_pct(Some(1.0), Some(0.0)), None);
        assert_eq!(change_pct(None, Some(1.0)), None);
    }

    /// The quantile of the spec's formula over a from-scratch sort.
    fn naive_quantile(values: &[f64], p: f64) -> Option<f64> {
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        if v.is_empty() {
            return None;
        }
        let h = (v.len() - 1) as f64 * p;
        let lo = h.floor() as usize;
        let hi = (lo + 1).min(v.len() - 1);
        Some(v[lo] + (h - lo as f64) * (v[hi] - v[lo]))
    }

    fn close(a: Option<f64>, b: Option<f64>) -> bool {
        match (a, b) {
            (Some(a), Some(b)) => (a - b).abs() <= 1e-9 * (1.0 + a.abs().max(b.abs())),
            (None, None) => true,
            _ => false,
        }
    }

    /// Raw property values as JSON would send them: numbers, numeric and other strings.
    fn raw_value() -> impl Strategy<Value = String> {
        prop_oneof![
            (-1e6f64..1e6).prop_map(|x| x.to_string()),
            (-1000i64..1000).prop_map(|x| x.to_string()),
            Just("abc".to_string()),
            Just("".to_string()),
            Just("NaN".to_string()),
            Just("true".to_string()),
        ]
    }

    proptest! {
        #[test]
        fn property_math_matches_a_naive_reference(
            raw in proptest::collection::vec(raw_value(), 0..60),
            p in 0.0f64..=1.0,
        ) {
            let numbers: Vec<f64> = raw.iter().filter_map(|s| parse_number(s)).collect();
            // The reference coercion: what a JSON number or numeric string is.
            let reference: Vec<f64> = raw
                .iter()
                .filter_map(|s| s.parse::<f64>().ok().filter(|x| x.is_finite()))
                .collect();
            prop_assert_eq!(&numbers, &reference);
            let sum: f64 = reference.iter().sum();
            let expect = |agg: Aggregate| -> Option<f64> {
                if reference.is_empty() {
                    return None;
                }
                Some(match agg {
                    Aggregate::Sum => sum,
                    Aggregate::Avg => sum / reference.len() as f64,
                    Aggregate::Min => reference.iter().copied().fold(f64::INFINITY, f64::min),
                    Aggregate::Max => reference.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                    Aggregate::Quantile(p) => naive_quantile(&reference, p)?,
                })
            };
            for agg in [
                Aggregate::Sum,
                Aggregate::Avg,
                Aggregate::Min,
                Aggregate::Max,
                Aggregate::Quantile(p),
                Aggregate::Quantile(0.5),
                Aggregate::Quantile(0.99),
            ] {
                let got = agg.apply(&mut numbers.clone());
                prop_assert!(close(got, expect(agg)), "{:?}: {:?} vs {:?}", agg, got, expect(agg));
            }
            let mut sorted = numbers.clone();
            sorted.sort_by(f64::total_cmp);
            prop_assert!(close(quantile_sorted(&sorted, p), naive_quantile(&numbers, p)));
        }

        #[test]
        fn cumulative_quantiles_match_resorting_every_prefix(
            values in proptest::collection::vec((0usize..6, -100f64..100.0), 0..80),
            p in 0.0f64..=1.0,
        ) {
            let got = cumulative_quantiles(&values, 6, p);
            for (b, g) in got.iter().enumerate() {
                let prefix: Vec<f64> =
                    values.iter().filter(|(vb, _)| *vb <= b).map(|(_, x)| *x).collect();
                prop_assert!(close(*g, naive_quantile(&prefix, p)), "bucket {}: {:?}", b, g);
            }
        }

        #[test]
        fn rolling_and_cumulative_distinct_match_set_unions(
            pairs in proptest::collection::vec((0usize..40, 0u64..12), 0..120),
            window in 1usize..35,
        ) {
            let days = 40;
            let rolling = rolling_distinct(&mut pairs.clone(), window, days);
            let cumulative = cumulative_distinct(&mut pairs.clone(), days);
            prop_assert_eq!((rolling.len(), cumulative.len()), (days, days));
            for (d, (r, c)) in rolling.iter().zip(&cumulative).enumerate() {
                let in_window: HashSet<u64> = pairs
                    .iter()
                    .filter(|(a, _)| *a <= d && *a + window > d)
                    .map(|(_, u)| *u)
                    .collect();
                prop_assert_eq!(*r, in_window.len() as u64, "day {}", d);
                let so_far: HashSet<u64> =
                    pairs.iter().filter(|(a, _)| *a <= d).map(|(_, u)| *u).collect();
                prop_assert_eq!(*c, so_far.len() as u64, "day {}", d);
            }
        }

        #[test]
        fn moving_average_matches_its_definition(
            values in proptest::collection::vec(proptest::option::of(0f64..1000.0), 0..30),
            k in 1usize..8,
        ) {
            let got = moving_average(&values, k);
            prop_assert_eq!(got.len(), values.len());
            for (i, g) in got.iter().enumerate() {
                let window: Vec<f64> =
                    values[i.saturating_sub(k - 1)..=i].iter().flatten().copied().collect();
                let want = (!window.is_empty())
                    .then(|| round_to(window.iter().sum::<f64>() / window.len() as f64, 4));
                prop_assert!(close(*g, want));
            }
        }
    }
}
