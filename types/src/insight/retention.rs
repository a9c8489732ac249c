//! Retention (§4): which cohort rows a unit joins and which columns it is retained in.
//!
//! Cohorts are the periods (buckets) of the query range. Column 0 is the cohort itself; a
//! return in the cohort's own period counts nowhere. Column `k ≥ 1` is, in calendar mode, the
//! bucket `k` after the cohort's and, in rolling mode, `[t0 + k·P, t0 + (k+1)·P)` from the
//! unit's own start instant `t0`. A cell is observable while its cohort index plus `k` stays
//! inside the range; the caller turns the others into nulls.

use super::UnitEvent;
use crate::query::behaviour::{CohortType, Counting, TimeMode};
use crate::time::Buckets;

/// Tag bit of a start (cohorting) event.
pub const START: u64 = 1;
/// Tag bit of a return event.
pub const RETURN: u64 = 2;

/// What a retention evaluation needs.
#[derive(Debug, Clone, PartialEq)]
pub struct RetentionSpec {
    /// The cohort periods.
    pub buckets: Buckets,
    /// First-time or recurring.
    pub cohort_type: CohortType,
    /// Calendar or rolling.
    pub mode: TimeMode,
    /// Rolling period, ms.
    pub rolling_ms: i64,
    /// Bounded or unbounded.
    pub counting: Counting,
    /// Columns, including column 0.
    pub periods: usize,
}

/// Cohort sizes and retained counts, summed over units.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetentionTable {
    /// Units per cohort.
    pub sizes: Vec<u64>,
    /// `retained[c][k]`: units of cohort `c` retained in column `k` (column 0 = size).
    pub retained: Vec<Vec<u64>>,
}

impl RetentionTable {
    /// An empty table for `spec`.
    pub fn new(spec: &RetentionSpec) -> RetentionTable {
        RetentionTable {
            sizes: vec![0; spec.buckets.len()],
            retained: vec![vec![0; spec.periods]; spec.buckets.len()],
        }
    }

    /// Adds another table's counts (units are disjoint across partitions of the work).
    pub fn merge(&mut self, other: &RetentionTable) {
        for (a, b) in self.sizes.iter_mut().zip(&other.sizes) {
            *a += b;
        }
        for (row, other_row) in self.retained.iter_mut().zip(&other.retained) {
            for (a, b) in row.iter_mut().zip(other_row) {
                *a += b;
            }
        }
    }

    /// Whether cell `(c, k)` can be observed in the range.
    pub fn observable(&self, c: usize, k: usize) -> bool {
        c + k < self.sizes.len()
    }
}

/// Adds one unit, its events sorted by time (start events over all history for first-time
/// cohorts, returns up to the end of the last observable period).
pub fn add_unit(spec: &RetentionSpec, events: &[UnitEvent], table: &mut RetentionTable) {
    let n = spec.buckets.len();
    let mut cohorts: Vec<(usize, i64)> = Vec::new();
    match spec.cohort_type {
        CohortType::FirstTime => {
            if let Some(first) = events.iter().find(|e| e.tags & START != 0)
                && let Some(c) = spec.buckets.index_of(first.ts)
            {
                cohorts.push((c, first.ts));
            }
        }
        CohortType::Recurring => {
            for e in events.iter().filter(|e| e.tags & START != 0) {
                if let Some(c) = spec.buckets.index_of(e.ts)
                    && cohorts.last().map(|(last, _)| *last) != Some(c)
                {
                    cohorts.push((c, e.ts));
                }
            }
        }
    }
    let mut returned = vec![false; spec.periods];
    for (c, t0) in cohorts {
        returned.iter_mut().for_each(|r| *r = false);
        for e in events.iter().filter(|e| e.tags & RETURN != 0 && e.ts >= t0) {
            let k = match spec.mode {
                TimeMode::Calendar => match spec.buckets.index_of(e.ts) {
                    Some(j) if j > c => j - c,
                    _ => continue,
                },
                TimeMode::Rolling => ((e.ts - t0) / spec.rolling_ms) as usize,
            };
            if k >= 1 && k < spec.periods && c + k < n {
                returned[k] = true;
            }
        }
        table.sizes[c] += 1;
        table.retained[c][0] += 1;
        match spec.counting {
            Counting::Bounded => {
                for (k, _) in returned.iter().enumerate().skip(1).filter(|(_, r)| **r) {
                    table.retained[c][k] += 1;
                }
            }
            Counting::Unbounded => {
                if let Some(last) = (1..spec.periods).rev().find(|&k| returned[k]) {
                    for k in 1..=last {
                        table.retained[c][k] += 1;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::{Interval, WeekStart};
    use chrono::NaiveDate;

    fn ms(s: &str) -> i64 {
        chrono::DateTime::parse_from_rfc3339(s)
            .unwrap()
            .timestamp_millis()
    }

    fn spec(
        days: u32,
        periods: usize,
        ty: CohortType,
        mode: TimeMode,
        c: Counting,
    ) -> RetentionSpec {
        RetentionSpec {
            buckets: Buckets::new(
                NaiveDate::from_ymd_opt(2024, 1, 1).unwrap(),
                NaiveDate::from_ymd_opt(2024, 1, days).unwrap(),
                chrono_tz::Tz::UTC,
                Interval::Day,
                WeekStart::Monday,
            ),
            cohort_type: ty,
            mode,
            rolling_ms: 86_400_000,
            counting: c,
            periods,
        }
    }

    fn ev(s: &str, tags: u64) -> UnitEvent {
        UnitEvent {
            ts: ms(s),
            tags,
            value: 0,
        }
    }

    #[test]
    fn recurring_bounded_and_unbounded_follow_example_4b() {
        let units = [
            vec![
                ev("2024-01-01T10:00:00Z", 3),
                ev("2024-01-02T10:00:00Z", 3),
                ev("2024-01-03T10:00:00Z", 3),
            ],
            vec![ev("2024-01-01T10:00:00Z", 3), ev("2024-01-03T10:00:00Z", 3)],
            vec![ev("2024-01-02T10:00:00Z", 3)],
        ];
        for (counting, row0) in [
            (Counting::Bounded, [2, 1, 2]),
            (Counting::Unbounded, [2, 2, 2]),
        ] {
            let s = spec(3, 3, CohortType::Recurring, TimeMode::Calendar, counting);
            let mut t = RetentionTable::new(&s);
            for u in &units {
                add_unit(&s, u, &mut t);
            }
            assert_eq!(t.retained[0], row0.to_vec());
            assert_eq!(t.retained[1][..2], [2, 1]);
        }
    }

    #[test]
    fn rolling_days_follow_example_4c() {
        let units = [
            vec![
                ev("2024-01-01T22:00:00Z", START),
                ev("2024-01-02T06:00:00Z", RETURN),
                ev("2024-01-02T23:00:00Z", RETURN),
            ],
            vec![
                ev("2024-01-01T08:00:00Z", START),
                ev("2024-01-02T07:59:00Z", RETURN),
            ],
        ];
        let s = spec(
            2,
            2,
            CohortType::FirstTime,
            TimeMode::Rolling,
            Counting::Bounded,
        );
        let mut t = RetentionTable::new(&s);
        for u in &units {
            add_unit(&s, u, &mut t);
        }
        assert_eq!(t.retained[0], vec![2, 1]);
        let s = spec(
            2,
            2,
            CohortType::FirstTime,
            TimeMode::Calendar,
            Counting::Bounded,
        );
        let mut t = RetentionTable::new(&s);
        for u in &units {
            add_unit(&s, u, &mut t);
        }
        assert_eq!(t.retained[0], vec![2, 2]);
    }
}
