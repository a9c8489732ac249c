//! Reference implementations of the person-level insights, for property tests only.
//!
//! Everything here is a deliberately slow, from-scratch implementation of the definitions in
//! `docs/insights.md`, the evaluators' module docs and `spec/analytics.md` §3–§8. It shares no
//! code with the evaluators of [`super`] (only their plain input types, such as
//! [`UnitEvent`] and [`FunnelSpec`]) and none with [`crate::time::Buckets`]: funnel attempts are
//! found by enumerating every chain or every assignment, retention cells by set logic, periods
//! from local calendar dates, path graphs by literal splitting and counting. Two places test
//! against these: the evaluator property tests (`insight/properties.rs`) and the engine-level
//! property tests of the node, which compute whole answers from a raw event log with them.
//!
//! Do not use any of this to answer queries: the costs are exponential in places.
//!
//! Where a definition leaves a choice open the references follow the evaluators' module docs,
//! and say so:
//!
//! * strict-funnel ties with equal lowest steps are ordered by tags, then value (as
//!   [`super::funnel::sort_events`] does; the walk's result depends on it);
//! * an unordered attempt reaches its step `k` when `k + 1` distinct steps are filled, so an
//!   unordered exclusion (which spans the funnel) taints from entry until completion;
//! * unbounded retention column `k` counts a return in any later *column* that is observable
//!   (`k' < periods`, `c + k' < buckets`), not in periods beyond the table;
//! * path depth with both a start and an end point keeps the first `step_limit` items (no
//!   PostHog-style "..." node);
//! * a cohort sequence's `a` and a different `b` at one instant count whatever their order
//!   (as funnel steps sharing an instant fill in funnel order, §3.4).

use super::UnitEvent;
use super::funnel::FunnelSpec;
use crate::query::behaviour::{AttemptPolicy, CohortType, CountOp, Counting, ExclusionPolicy};
use crate::query::behaviour::{FunnelOrder, TimeMode};
use crate::time::{Interval, WeekStart};
use chrono::{Datelike, Duration, NaiveDate, Offset, TimeZone, Timelike, Weekday};
use chrono_tz::Tz;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Display;

// ---------------------------------------------------------------------------------------------
// Funnels
// ---------------------------------------------------------------------------------------------

/// An attempt as the references describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefAttempt {
    /// Instant of its step-1 event (of its first funnel event, for unordered funnels).
    pub start_ms: i64,
    /// Steps reached (after an `end_attempt` cut).
    pub level: usize,
    /// Whether an exclusion tainted it (`drop_user` only).
    pub tainted: bool,
    /// The instant at which each reached step was filled.
    pub times: Vec<i64>,
    /// The values of the filling events, for strict funnels only (ordered and unordered
    /// funnels may fill a step with any of several tied events, so the reference names none).
    pub values: Vec<u32>,
}

/// A unit's funnel result: its level (0 when it did not enter or was dropped) and the
/// attempt that defines attribution and time to convert (the earliest of the furthest clean
/// attempts).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RefFunnelUnit {
    /// Steps reached.
    pub level: usize,
    /// The defining attempt.
    pub defining: Option<RefAttempt>,
}

fn has(e: &UnitEvent, bit: usize) -> bool {
    (e.tags >> bit) & 1 == 1
}

fn enters(spec: &FunnelSpec, ts: i64) -> bool {
    spec.entry_start_ms <= ts && ts < spec.entry_end_ms
}

/// Records, for every step, the earliest instant at which any chain of the attempt at `t1`
/// fills it, by enumerating all chains.
fn all_chains(
    spec: &FunnelSpec,
    events: &[UnitEvent],
    t1: i64,
    step: usize,
    previous_ts: i64,
    used: &mut Vec<bool>,
    earliest: &mut Vec<Option<i64>>,
) {
    if step == spec.steps {
        return;
    }
    for i in 0..events.len() {
        let e = events[i];
        let fits = !used[i]
            && has(&e, step)
            && e.ts >= previous_ts
            && e.ts <= t1 + spec.window_ms
            && (step > 0 || e.ts == t1);
        if !fits {
            continue;
        }
        earliest[step] = Some(match earliest[step] {
            Some(t) if t <= e.ts => t,
            _ => e.ts,
        });
        used[i] = true;
        all_chains(spec, events, t1, step + 1, e.ts, used, earliest);
        used[i] = false;
    }
}

fn ordered_reference(spec: &FunnelSpec, events: &[UnitEvent]) -> Vec<RefAttempt> {
    let starts: BTreeSet<i64> = events
        .iter()
        .filter(|e| has(e, 0) && enters(spec, e.ts))
        .map(|e| e.ts)
        .collect();
    starts
        .into_iter()
        .map(|t1| {
            let mut earliest = vec![None; spec.steps];
            all_chains(
                spec,
                events,
                t1,
                0,
                t1,
                &mut vec![false; events.len()],
                &mut earliest,
            );
            let times: Vec<i64> = earliest.iter().map_while(|t| *t).collect();
            RefAttempt {
                start_ms: t1,
                level: times.len(),
                tainted: false,
                times,
                values: Vec::new(),
            }
        })
        .collect()
}

fn strict_reference(spec: &FunnelSpec, events: &[UnitEvent]) -> Vec<RefAttempt> {
    let lowest = |e: &UnitEvent| (0..spec.steps).find(|&s| has(e, s)).unwrap_or(usize::MAX);
    let mut order = events.to_vec();
    order.sort_by(|a, b| {
        a.ts.cmp(&b.ts)
            .then(lowest(a).cmp(&lowest(b)))
            .then(a.tags.cmp(&b.tags))
            .then(a.value.cmp(&b.value))
    });
    let mut out = Vec::new();
    for (i, first) in order.iter().enumerate() {
        if !has(first, 0) || !enters(spec, first.ts) {
            continue;
        }
        let mut filled: Vec<UnitEvent> = vec![*first];
        for e in &order[i + 1..] {
            let reached = filled.len();
            if reached == spec.steps || e.ts - first.ts > spec.window_ms {
                break;
            }
            let next_step = has(e, reached);
            let repeat = has(e, reached - 1);
            match (next_step, repeat) {
                (true, _) => filled.push(*e),
                (false, true) => {}
                (false, false) => break,
            }
        }
        out.push(RefAttempt {
            start_ms: first.ts,
            level: filled.len(),
            tainted: false,
            times: filled.iter().map(|e| e.ts).collect(),
            values: filled.iter().map(|e| e.value).collect(),
        });
    }
    out
}

/// The most distinct steps (from `step` on) that distinct events of `events` can fill, by
/// trying every assignment.
fn best_assignment(events: &[UnitEvent], steps: usize, step: usize, used: &mut Vec<bool>) -> usize {
    if step == steps {
        return 0;
    }
    let mut best = best_assignment(events, steps, step + 1, used);
    for i in 0..events.len() {
        if best == steps - step {
            break;
        }
        if used[i] || !has(&events[i], step) {
            continue;
        }
        used[i] = true;
        best = best.max(1 + best_assignment(events, steps, step + 1, used));
        used[i] = false;
    }
    best
}

fn unordered_reference(spec: &FunnelSpec, events: &[UnitEvent]) -> Vec<RefAttempt> {
    let any_step = |e: &UnitEvent| (0..spec.steps).any(|s| has(e, s));
    let starts: BTreeSet<i64> = events
        .iter()
        .filter(|e| any_step(e) && enters(spec, e.ts))
        .map(|e| e.ts)
        .collect();
    starts
        .into_iter()
        .map(|t1| {
            let window: Vec<UnitEvent> = events
                .iter()
                .filter(|e| e.ts >= t1 && e.ts <= t1 + spec.window_ms && any_step(e))
                .copied()
                .collect();
            let instants: BTreeSet<i64> = window.iter().map(|e| e.ts).collect();
            let mut times = Vec::new();
            for tau in instants {
                let prefix: Vec<UnitEvent> =
                    window.iter().filter(|e| e.ts <= tau).copied().collect();
                let filled =
                    best_assignment(&prefix, spec.steps, 0, &mut vec![false; prefix.len()]);
                while times.len() < filled {
                    times.push(tau);
                }
            }
            RefAttempt {
                start_ms: t1,
                level: times.len(),
                tainted: false,
                times,
                values: Vec::new(),
            }
        })
        .collect()
}

/// Applies the exclusions to an attempt from its reach instants (module doc of `funnel`).
fn exclusions_reference(spec: &FunnelSpec, events: &[UnitEvent], a: &mut RefAttempt) {
    let mut level = a.level;
    for (x, &(from, to)) in spec.exclusions.iter().enumerate() {
        if from >= a.level {
            continue;
        }
        let after = a.times[from];
        let inside = |ts: i64| {
            ts > after
                && if to < a.level {
                    ts < a.times[to]
                } else {
                    ts <= a.start_ms + spec.window_ms
                }
        };
        let first_hit = events
            .iter()
            .filter(|e| has(e, spec.steps + x) && inside(e.ts))
            .map(|e| e.ts)
            .min();
        if let Some(hit) = first_hit {
            match spec.exclusion_policy {
                ExclusionPolicy::DropUser => a.tainted = true,
                ExclusionPolicy::EndAttempt => {
                    let before = a.times.iter().filter(|&&t| t < hit).count();
                    level = level.min(before);
                }
            }
        }
    }
    a.level = level;
    a.times.truncate(level);
    a.values.truncate(level);
}

/// Every attempt of a unit (its events in any order; tag bit `k` for step `k`, bit
/// `steps + i` for exclusion `i`), in start order, after the attempt policy and exclusions.
pub fn funnel_attempts(spec: &FunnelSpec, events: &[UnitEvent]) -> Vec<RefAttempt> {
    let mut all = match spec.order {
        FunnelOrder::Ordered => ordered_reference(spec, events),
        FunnelOrder::Strict => strict_reference(spec, events),
        FunnelOrder::Unordered => unordered_reference(spec, events),
    };
    if spec.attempt_policy == AttemptPolicy::FirstEntry {
        all.truncate(1);
    }
    for a in &mut all {
        exclusions_reference(spec, events, a);
    }
    all
}

/// The unit's level and defining attempt from its attempts.
pub fn funnel_result(spec: &FunnelSpec, attempts: &[RefAttempt]) -> RefFunnelUnit {
    let Some(furthest) = attempts.iter().map(|a| a.level).max() else {
        return RefFunnelUnit::default();
    };
    if furthest == 0 {
        return RefFunnelUnit::default();
    }
    let earliest_clean = attempts.iter().find(|a| a.level == furthest && !a.tainted);
    match (earliest_clean, spec.exclusion_policy) {
        (Some(a), _) => RefFunnelUnit {
            level: furthest,
            defining: Some(a.clone()),
        },
        // Every furthest attempt is tainted: drop_user removes the unit.
        (None, ExclusionPolicy::DropUser) => RefFunnelUnit::default(),
        (None, ExclusionPolicy::EndAttempt) => unreachable!("end_attempt never taints"),
    }
}

/// A unit's funnel result from its events (any order).
pub fn funnel_unit(spec: &FunnelSpec, events: &[UnitEvent]) -> RefFunnelUnit {
    funnel_result(spec, &funnel_attempts(spec, events))
}

// ---------------------------------------------------------------------------------------------
// Calendar
// ---------------------------------------------------------------------------------------------

/// The week start on or before `d`, by walking back a day at a time.
pub fn week_start_of(d: NaiveDate, week_start: WeekStart) -> NaiveDate {
    let first = match week_start {
        WeekStart::Monday => Weekday::Mon,
        WeekStart::Sunday => Weekday::Sun,
    };
    let mut d = d;
    while d.weekday() != first {
        d = d.pred_opt().expect("date");
    }
    d
}

/// Months since year 0.
pub fn month_number(d: NaiveDate) -> i64 {
    i64::from(d.year()) * 12 + i64::from(d.month0())
}

/// The local `(date, clock hour, UTC offset in seconds)` of an instant.
pub fn hour_key(tz: Tz, ts: i64) -> (NaiveDate, u32, i32) {
    let local = tz.timestamp_millis_opt(ts).single().expect("instant");
    (
        local.date_naive(),
        local.hour(),
        local.offset().fix().local_minus_utc(),
    )
}

/// Local-calendar periods of a date range, computed from local dates and clock hours only.
#[derive(Debug, Clone)]
pub struct CalendarReference {
    tz: Tz,
    from: NaiveDate,
    to: NaiveDate,
    interval: Interval,
    week_start: WeekStart,
    /// For hours: the `(local date, hour, UTC offset)` of every local clock hour from the day
    /// before `from` through `to`, in time order, with the first instant of each.
    hours: Vec<((NaiveDate, u32, i32), i64)>,
    /// The index in `hours` of the first hour of `from`.
    first_hour: usize,
}

impl CalendarReference {
    /// The periods of `[from, to]` (local dates, inclusive) in `tz`.
    pub fn new(
        tz: Tz,
        from: NaiveDate,
        to: NaiveDate,
        interval: Interval,
        week_start: WeekStart,
    ) -> CalendarReference {
        let mut hours: Vec<((NaiveDate, u32, i32), i64)> = Vec::new();
        let mut first_hour = 0;
        if interval == Interval::Hour {
            let scan_from = from - Duration::days(1);
            // Every UTC offset is a multiple of 15 minutes: a 15-minute grid meets every
            // local hour, at its first instant.
            let mut t = utc_midnight_ms(scan_from - Duration::days(1));
            let stop = utc_midnight_ms(to + Duration::days(2));
            while t < stop {
                let key = hour_key(tz, t);
                if key.0 >= scan_from && key.0 <= to && hours.last().map(|h| h.0) != Some(key) {
                    if key.0 < from {
                        first_hour = hours.len() + 1;
                    }
                    hours.push((key, t));
                }
                t += 15 * 60_000;
            }
        }
        CalendarReference {
            tz,
            from,
            to,
            interval,
            week_start,
            hours,
            first_hour,
        }
    }

    /// The local date of an instant.
    pub fn date(&self, ts: i64) -> NaiveDate {
        self.tz
            .timestamp_millis_opt(ts)
            .single()
            .expect("instant")
            .date_naive()
    }

    /// Whether an instant's local date is inside the range.
    pub fn contains(&self, ts: i64) -> bool {
        let d = self.date(ts);
        d >= self.from && d <= self.to
    }

    /// The first instant of the range and the first instant after it, found by bisecting on
    /// local dates.
    pub fn range_ms(&self) -> (i64, i64) {
        let first_on_or_after = |d: NaiveDate| {
            // The answer lies within two days of UTC midnight of `d`.
            let (mut lo, mut hi) = (
                utc_midnight_ms(d) - 2 * 86_400_000,
                utc_midnight_ms(d) + 2 * 86_400_000,
            );
            while lo < hi {
                let mid = lo + (hi - lo) / 2;
                if self.date(mid) >= d {
                    hi = mid;
                } else {
                    lo = mid + 1;
                }
            }
            lo
        };
        (
            first_on_or_after(self.from),
            first_on_or_after(self.to + Duration::days(1)),
        )
    }

    /// The period of an instant relative to the first period of the range (negative before
    /// it, `>= count()` after it). Hours before the day preceding `from` are `i64::MIN / 4`.
    pub fn period(&self, ts: i64) -> i64 {
        let d = self.date(ts);
        match self.interval {
            Interval::Day => (d - self.from).num_days(),
            Interval::Week => {
                (week_start_of(d, self.week_start) - week_start_of(self.from, self.week_start))
                    .num_days()
                    / 7
            }
            Interval::Month => month_number(d) - month_number(self.from),
            Interval::Hour => {
                if d > self.to {
                    return i64::MAX / 4;
                }
                let key = hour_key(self.tz, ts);
                match self.hours.iter().position(|k| k.0 == key) {
                    Some(i) => i as i64 - self.first_hour as i64,
                    None => i64::MIN / 4,
                }
            }
        }
    }

    /// Number of periods in the range.
    pub fn count(&self) -> usize {
        let last = match self.interval {
            Interval::Hour => return self.hours.len() - self.first_hour,
            Interval::Day => (self.to - self.from).num_days(),
            Interval::Week => {
                (week_start_of(self.to, self.week_start)
                    - week_start_of(self.from, self.week_start))
                .num_days()
                    / 7
            }
            Interval::Month => month_number(self.to) - month_number(self.from),
        };
        last as usize + 1
    }

    /// The period of an instant inside the range.
    pub fn index(&self, ts: i64) -> Option<usize> {
        self.contains(ts).then(|| self.period(ts) as usize)
    }

    /// The label of period `p`: its calendar start date (`YYYY-MM-DD`, weeks and months
    /// unclipped), or for hours the local time and offset of its first instant.
    pub fn label(&self, p: usize) -> String {
        match self.interval {
            Interval::Hour => {
                let (_, t) = self.hours[self.first_hour + p];
                self.tz
                    .timestamp_millis_opt(t)
                    .single()
                    .expect("instant")
                    .format("%Y-%m-%dT%H:%M:%S%:z")
                    .to_string()
            }
            Interval::Day => (self.from + Duration::days(p as i64))
                .format("%Y-%m-%d")
                .to_string(),
            Interval::Week => (week_start_of(self.from, self.week_start)
                + Duration::days(7 * p as i64))
            .format("%Y-%m-%d")
            .to_string(),
            Interval::Month => {
                let m = month_number(self.from) + p as i64;
                NaiveDate::from_ymd_opt((m / 12) as i32, (m % 12) as u32 + 1, 1)
                    .expect("month")
                    .format("%Y-%m-%d")
                    .to_string()
            }
        }
    }
}

fn utc_midnight_ms(d: NaiveDate) -> i64 {
    Tz::UTC
        .from_utc_datetime(&d.and_hms_opt(0, 0, 0).expect("midnight"))
        .timestamp_millis()
}

// ---------------------------------------------------------------------------------------------
// Retention, stickiness, lifecycle
// ---------------------------------------------------------------------------------------------

/// What a retention reference needs besides the calendar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionParams {
    /// First-time or recurring cohorts.
    pub cohort_type: CohortType,
    /// Calendar or rolling periods.
    pub mode: TimeMode,
    /// Rolling period, ms.
    pub rolling_ms: i64,
    /// Bounded or unbounded counting.
    pub counting: Counting,
    /// Columns, including column 0.
    pub periods: usize,
}

/// Tag bit of a retention start event.
pub const RETENTION_START: u64 = 1;
/// Tag bit of a retention return event.
pub const RETENTION_RETURN: u64 = 2;

/// A retention table: cohort sizes and, per cohort, units retained in each column (column 0
/// is the size).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefRetention {
    /// Units per cohort.
    pub sizes: Vec<u64>,
    /// `retained[c][k]`.
    pub retained: Vec<Vec<u64>>,
}

/// The retention table by set logic: for every cohort cell, the units in it. Each unit's
/// events (any order) carry [`RETENTION_START`] and/or [`RETENTION_RETURN`]; start events
/// cover all history for first-time cohorts. Cells beyond the range (`c + k ≥ count`) are 0.
pub fn retention_table(
    params: &RetentionParams,
    calendar: &CalendarReference,
    units: &[Vec<UnitEvent>],
) -> RefRetention {
    let n = calendar.count();
    let mut table = RefRetention {
        sizes: vec![0; n],
        retained: vec![vec![0; params.periods]; n],
    };
    for events in units {
        let starts: Vec<i64> = events
            .iter()
            .filter(|e| e.tags & RETENTION_START != 0)
            .map(|e| e.ts)
            .collect();
        let returns: BTreeSet<i64> = events
            .iter()
            .filter(|e| e.tags & RETENTION_RETURN != 0)
            .map(|e| e.ts)
            .collect();
        // (cohort, t0) memberships of the unit.
        let memberships: Vec<(usize, i64)> = match params.cohort_type {
            CohortType::FirstTime => starts
                .iter()
                .min()
                .and_then(|&t0| calendar.index(t0).map(|c| (c, t0)))
                .into_iter()
                .collect(),
            CohortType::Recurring => (0..n)
                .filter_map(|c| {
                    starts
                        .iter()
                        .filter(|&&t| calendar.index(t) == Some(c))
                        .min()
                        .map(|&t0| (c, t0))
                })
                .collect(),
        };
        for (c, t0) in memberships {
            let returned_in = |k: usize| -> bool {
                c + k < n
                    && returns.iter().any(|&r| match params.mode {
                        TimeMode::Calendar => calendar.index(r) == Some(c + k),
                        TimeMode::Rolling => {
                            let p = params.rolling_ms;
                            r >= t0 + k as i64 * p && r < t0 + (k as i64 + 1) * p
                        }
                    })
            };
            table.sizes[c] += 1;
            table.retained[c][0] += 1;
            for k in 1..params.periods {
                let retained = match params.counting {
                    Counting::Bounded => returned_in(k),
                    Counting::Unbounded => (k..params.periods).any(returned_in),
                };
                if retained {
                    table.retained[c][k] += 1;
                }
            }
        }
    }
    table
}

/// The periods of the range in which a unit did the event at least `min_per_period` times
/// (its event instants in any order).
pub fn active_periods(
    calendar: &CalendarReference,
    times: &[i64],
    min_per_period: u64,
) -> BTreeSet<usize> {
    let mut per_period: BTreeMap<usize, u64> = BTreeMap::new();
    for &t in times {
        if let Some(p) = calendar.index(t) {
            *per_period.entry(p).or_default() += 1;
        }
    }
    per_period
        .into_iter()
        .filter(|(_, n)| *n >= min_per_period)
        .map(|(p, _)| p)
        .collect()
}

/// Stickiness from each unit's number of active periods: `(histogram, cumulative)` over
/// `periods` periods, `histogram[k - 1]` = units active in exactly k, `cumulative[k - 1]` =
/// in at least k.
pub fn stickiness(active_counts: &[usize], periods: usize) -> (Vec<u64>, Vec<u64>) {
    let histogram = (1..=periods)
        .map(|k| active_counts.iter().filter(|&&n| n == k).count() as u64)
        .collect();
    let cumulative = (1..=periods)
        .map(|k| active_counts.iter().filter(|&&n| n >= k).count() as u64)
        .collect();
    (histogram, cumulative)
}

/// Lifecycle counts per displayed period (dormant as a positive count).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefLifecycle {
    /// Active now, in the unit's first period.
    pub new: Vec<u64>,
    /// Active now and in the period before.
    pub returning: Vec<u64>,
    /// Active now, not before, not new.
    pub resurrecting: Vec<u64>,
    /// Active before, not now.
    pub dormant: Vec<u64>,
}

/// One unit of a lifecycle: the instants of its series events and the instant that makes it
/// new (its first event of any kind, or its first series event).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LifecycleUnit {
    /// Series event instants (any order, any time).
    pub series: Vec<i64>,
    /// The instant whose period is the unit's "new" period.
    pub first: Option<i64>,
}

/// Lifecycle statuses by the table of §6 over signed periods: the period before the first
/// displayed one is period −1; activity after the range is not read. Week and month ranges
/// must start on a period start (periods are numbered whole).
pub fn lifecycle(calendar: &CalendarReference, units: &[LifecycleUnit]) -> RefLifecycle {
    let n = calendar.count();
    let mut out = RefLifecycle {
        new: vec![0; n],
        returning: vec![0; n],
        resurrecting: vec![0; n],
        dormant: vec![0; n],
    };
    for u in units {
        let active: BTreeSet<i64> = u
            .series
            .iter()
            .filter(|&&t| calendar.date(t) <= calendar.to)
            .map(|&t| calendar.period(t))
            .collect();
        let first_period = u.first.map(|t| calendar.period(t));
        for p in 0..n {
            let now = active.contains(&(p as i64));
            let before = active.contains(&(p as i64 - 1));
            if now && first_period == Some(p as i64) {
                out.new[p] += 1;
            } else if now && before {
                out.returning[p] += 1;
            } else if now {
                out.resurrecting[p] += 1;
            } else if before {
                out.dormant[p] += 1;
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Paths
// ---------------------------------------------------------------------------------------------

/// A path node: `(position from 1, item)`.
pub type PathNode<I> = (usize, I);

/// Edges keyed by node pairs → (instances, sum of ms between the two events).
pub type PathEdges<I> = BTreeMap<(PathNode<I>, PathNode<I>), (u64, i64)>;

/// Edges with `"{position}_{item}"` node strings.
pub type StringEdges = BTreeMap<(String, String), (u64, i64)>;
/// Drop-offs with node strings.
pub type StringDropoffs = BTreeMap<String, u64>;

/// The path graph of §7 before edge limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefPathGraph<I: Ord> {
    /// Edge weights and timings.
    pub edges: PathEdges<I>,
    /// Instances ending at each node.
    pub dropoffs: BTreeMap<PathNode<I>, u64>,
}

/// The node string `"{pos}_{item}"`.
pub fn node_string<I: Display>(pos: usize, item: &I) -> String {
    format!("{pos}_{item}")
}

impl<I: Ord + Display> RefPathGraph<I> {
    /// The edges with node strings.
    pub fn edge_strings(&self) -> StringEdges {
        self.edges
            .iter()
            .map(|((s, t), w)| ((node_string(s.0, &s.1), node_string(t.0, &t.1)), *w))
            .collect()
    }

    /// The drop-offs with node strings.
    pub fn dropoff_strings(&self) -> StringDropoffs {
        self.dropoffs
            .iter()
            .map(|((p, i), n)| (node_string(*p, i), *n))
            .collect()
    }
}

/// What a paths reference needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathParams<I> {
    /// A gap this long or longer (ms) starts a new instance.
    pub session_gap_ms: i64,
    /// Items kept per instance.
    pub step_limit: usize,
    /// Instances start at the first occurrence of this item.
    pub start_point: Option<I>,
    /// Instances end at the first occurrence of this item.
    pub end_point: Option<I>,
}

/// The path graph straight from the pipeline of §7; each unit's `(ts, item)` events are in
/// the order they happened (ties in the caller's order).
pub fn path_graph<I: Ord + Clone>(
    params: &PathParams<I>,
    units: &[Vec<(i64, I)>],
) -> RefPathGraph<I> {
    let mut graph = RefPathGraph {
        edges: BTreeMap::new(),
        dropoffs: BTreeMap::new(),
    };
    for events in units {
        // 1. Split at gaps of at least the session gap.
        let mut split: Vec<Vec<(i64, I)>> = Vec::new();
        for (i, e) in events.iter().enumerate() {
            if i == 0 || e.0 - events[i - 1].0 >= params.session_gap_ms {
                split.push(Vec::new());
            }
            split.last_mut().expect("instance").push(e.clone());
        }
        for instance in split {
            // 2. Keep an event when the next one is a different item (the last of each run).
            let mut path: Vec<(i64, I)> = (0..instance.len())
                .filter(|&i| i + 1 == instance.len() || instance[i + 1].1 != instance[i].1)
                .map(|i| instance[i].clone())
                .collect();
            // 3. Start and end points.
            if let Some(start) = &params.start_point {
                let Some(at) = path.iter().position(|e| &e.1 == start) else {
                    continue;
                };
                path = path[at..].to_vec();
            }
            if let Some(end) = &params.end_point {
                let Some(at) = path.iter().position(|e| &e.1 == end) else {
                    continue;
                };
                path = path[..=at].to_vec();
            }
            // 4. Depth.
            if path.len() > params.step_limit {
                path = if params.end_point.is_some() && params.start_point.is_none() {
                    path[path.len() - params.step_limit..].to_vec()
                } else {
                    path[..params.step_limit].to_vec()
                };
            }
            // 5. Nodes and edges.
            for i in 1..path.len() {
                let edge = graph
                    .edges
                    .entry(((i, path[i - 1].1.clone()), (i + 1, path[i].1.clone())))
                    .or_insert((0, 0));
                edge.0 += 1;
                edge.1 += path[i].0 - path[i - 1].0;
            }
            if let Some(last) = path.last() {
                *graph
                    .dropoffs
                    .entry((path.len(), last.1.clone()))
                    .or_insert(0) += 1;
            }
        }
    }
    graph
}

/// One kept edge: source, target, instances, average seconds (4 decimals).
pub type RefEdge<I> = (PathNode<I>, PathNode<I>, u64, f64);

/// The heaviest `limit` edges within the weight bounds (ties by source, then target node,
/// each ordered by position then item), keeping those reachable from a position-1 node, by
/// sorting and a reachability fixpoint.
pub fn top_edges<I: Ord + Clone>(
    edges: &PathEdges<I>,
    limit: usize,
    min: Option<u64>,
    max: Option<u64>,
) -> Vec<RefEdge<I>> {
    let mut kept: Vec<(PathNode<I>, PathNode<I>, u64, i64)> = edges
        .iter()
        .filter(|(_, (n, _))| min.unwrap_or(0) <= *n && *n <= max.unwrap_or(u64::MAX))
        .map(|((s, t), &(n, ms))| (s.clone(), t.clone(), n, ms))
        .collect();
    kept.sort_by(|a, b| b.2.cmp(&a.2).then(a.0.cmp(&b.0)).then(a.1.cmp(&b.1)));
    kept.truncate(limit);
    let mut reachable: BTreeSet<PathNode<I>> = BTreeSet::new();
    loop {
        let before = reachable.len();
        for (s, t, _, _) in &kept {
            if s.0 == 1 || reachable.contains(s) {
                reachable.insert(t.clone());
            }
        }
        if reachable.len() == before {
            break;
        }
    }
    kept.into_iter()
        .filter(|(s, _, _, _)| s.0 == 1 || reachable.contains(s))
        .map(|(s, t, n, ms)| {
            let avg = (ms as f64 / n as f64 / 1000.0 * 10_000.0).round() / 10_000.0;
            (s, t, n, avg)
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Cohorts
// ---------------------------------------------------------------------------------------------

/// Tag bit of a leaf's main events (`entity` or `a`).
pub const COHORT_MAIN: u64 = 1;
/// Tag bit of a leaf's `b` events.
pub const COHORT_OTHER: u64 = 2;

/// Whether `ts` lies in `(t − window, t]` (`(−∞, t]` without a window).
pub fn in_window(ts: i64, t: i64, window: Option<i64>) -> bool {
    ts <= t && window.is_none_or(|w| t - w < ts)
}

fn count_bit(events: &[UnitEvent], bit: u64, t: i64, window: Option<i64>) -> u64 {
    events
        .iter()
        .filter(|e| e.tags & bit != 0 && in_window(e.ts, t, window))
        .count() as u64
}

/// `event_count`: matching events in the window compared with `value`.
pub fn event_count(
    events: &[UnitEvent],
    t: i64,
    window: Option<i64>,
    op: CountOp,
    value: f64,
) -> bool {
    op.holds(count_bit(events, COHORT_MAIN, t, window) as f64, value)
}

/// `first_time`: the first-ever matching event (events cover all history) is in the window.
pub fn first_time(events: &[UnitEvent], t: i64, window: Option<i64>) -> bool {
    events
        .iter()
        .filter(|e| e.tags & COHORT_MAIN != 0)
        .map(|e| e.ts)
        .min()
        .is_some_and(|f| in_window(f, t, window))
}

/// `relative_count`: `count(a) op count(b)` over the window.
pub fn relative_count(events: &[UnitEvent], t: i64, window: Option<i64>, op: CountOp) -> bool {
    op.holds(
        count_bit(events, COHORT_MAIN, t, window) as f64,
        count_bit(events, COHORT_OTHER, t, window) as f64,
    )
}

/// `sequence`: an `a` event and a different `b` event, both inside the window, the `b` at
/// the same instant as the `a` or at most `within_ms` after it, by trying every pair (the
/// list order does not matter).
pub fn sequence(events: &[UnitEvent], t: i64, window: Option<i64>, within_ms: i64) -> bool {
    let inside = |e: &UnitEvent| in_window(e.ts, t, window);
    (0..events.len()).any(|i| {
        (0..events.len()).any(|j| {
            i != j
                && events[i].tags & COHORT_MAIN != 0
                && events[j].tags & COHORT_OTHER != 0
                && inside(&events[i])
                && inside(&events[j])
                && events[j].ts >= events[i].ts
                && events[j].ts - events[i].ts <= within_ms
        })
    })
}

/// The aggregate of the values of the matching events in the window: the sum of the numbers,
/// or (`distinct`) the number of distinct numbers. `values[i]` is event `i`'s number (`None`:
/// not set or not numeric).
pub fn aggregate(
    events: &[UnitEvent],
    values: &[Option<f64>],
    t: i64,
    window: Option<i64>,
    distinct: bool,
) -> f64 {
    let matching = || {
        events
            .iter()
            .zip(values)
            .filter(|(e, _)| e.tags & COHORT_MAIN != 0 && in_window(e.ts, t, window))
            .filter_map(|(_, v)| *v)
    };
    if distinct {
        let mut seen: Vec<f64> = Vec::new();
        for v in matching() {
            if !seen.contains(&v) {
                seen.push(v);
            }
        }
        seen.len() as f64
    } else {
        matching().sum()
    }
}

/// The membership timeline of "count of events in `(x − window, x]` op value" up to `until`,
/// as `(instant, entered)`: membership is evaluated by the plain window definition at every
/// event instant and every expiry instant, and compared with the instant 1 ms before.
pub fn timeline(
    times: &[i64],
    window_ms: i64,
    op: CountOp,
    value: f64,
    until: i64,
) -> Vec<(i64, bool)> {
    let member = |x: i64| {
        let n = times
            .iter()
            .filter(|&&t| in_window(t, x, Some(window_ms)))
            .count();
        op.holds(n as f64, value)
    };
    let instants: BTreeSet<i64> = times
        .iter()
        .flat_map(|&t| [t, t + window_ms])
        .filter(|&x| x <= until)
        .collect();
    instants
        .into_iter()
        .filter(|&x| member(x) != member(x - 1))
        .map(|x| (x, member(x)))
        .collect()
}
