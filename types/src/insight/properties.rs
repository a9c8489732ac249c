//! Property tests: every evaluator of [`super`] against the naive references of
//! [`super::reference`].
//!
//! The references are built directly from the definitions in the evaluators' module docs and
//! `spec/analytics.md` §3–§8, and share no code with the evaluators they check (only the input
//! types); the reference module's doc lists the choices they make where a definition leaves
//! one open. They are brute force on purpose, so the random logs are small: many units with
//! few event kinds, so that identical timestamps, repeats, events matching several steps, and
//! events exactly on window and bucket edges are frequent.
//!
//! * **Funnels** (`funnel`): for every step-1 timestamp `t1` in the entry range, an *ordered*
//!   attempt enumerates every chain of distinct events (non-decreasing timestamps, event `k`
//!   matching step `k`, all in `[t1, t1 + W]`) by exhaustive recursion and records the earliest
//!   instant each step can be filled; the earliest-events chain of the module doc fills every
//!   step at exactly these instants. A *strict* attempt follows the documented walk over the
//!   events ordered by `(timestamp, lowest step matched, tags)` from every step-1 event. An
//!   *unordered* attempt at `t1` tries every assignment of distinct window events to distinct
//!   steps, once per prefix of the window, so step `k` is "reached" when `k + 1` distinct steps
//!   are filled. Exclusions are applied to these reach instants as the module doc states
//!   (strictly between reaching steps `i` and `j`, or up to `t1 + W` when `j` was not reached);
//!   `drop_user` and `end_attempt`, best attempt and first entry, are then applied to the list of
//!   attempts. Compared: every attempt (start, level, taint, fill instants), the unit's level,
//!   the defining attempt (earliest of the furthest clean ones), and that its values name a valid
//!   chain of the unit's events.
//! * **Retention** (`retention`): cohort rows and retained cells by set logic per unit and cell,
//!   with periods computed from local calendar dates (or, for hours, from the local
//!   `(date, hour, UTC offset)` of a 15-minute scan), never from [`Buckets`].
//! * **Stickiness / lifecycle** (`activity`): a unit's active periods as a set built from the
//!   same calendar reference, the histogram by counting, lifecycle statuses by the table of §6
//!   (`new`, `returning`, `resurrecting`, `dormant`) per displayed period, with the previous
//!   period read as period `-1`.
//! * **Buckets** (`time`): `Buckets::new` and `index_of` agree with the calendar reference in
//!   several time zones and across DST changes (including a midnight DST change).
//! * **Paths** (`paths`): instances by literal splitting and collapsing, nodes as the strings
//!   `"{pos}_{item}"`, edge weights, timings and drop-offs by counting; drop-off = inflow −
//!   outflow at every node; `top_edges` by sorting and a reachability fixpoint.
//! * **Cohorts** (`cohort`): the membership timeline by evaluating the plain window definition
//!   `(T − X, T]` at every event instant, every expiry instant, and 1 ms before each; the
//!   condition leaves by counting over the window.
//!
//! Not covered here: lifecycle ranges starting mid-week or mid-month,
//! because the calendar reference numbers whole periods
//! (the lifecycle property uses aligned ranges).

use super::UnitEvent;
use super::activity::{self, FirstSeen, Lifecycle, Stickiness};
use super::cohort::{self, Transition, WindowAt};
use super::funnel::{self, Attempt, FunnelSpec};
use super::paths::{self, Node, PathGraph, PathsSpec};
use super::reference::{
    self, CalendarReference, LifecycleUnit, PathParams, RefAttempt, RetentionParams,
    StringDropoffs, StringEdges, month_number, node_string, week_start_of,
};
use super::retention::{self, RetentionSpec, RetentionTable};
use crate::query::DateRange;
use crate::query::behaviour::{
    AttemptPolicy, CohortType, CountOp, Counting, EventSelector, ExclusionPolicy, FunnelOrder,
    LifecycleQuery, NewDefinition, PropertyAggregate, TimeMode,
};
use crate::time::{Buckets, Interval, WeekStart};
use chrono::{Datelike, Duration, NaiveDate};
use chrono_tz::Tz;
use proptest::prelude::*;
use std::collections::BTreeSet;

// ---------------------------------------------------------------------------------------------
// Funnels
// ---------------------------------------------------------------------------------------------

fn project(spec: &FunnelSpec, a: &Attempt) -> RefAttempt {
    RefAttempt {
        start_ms: a.start_ms,
        level: a.level,
        tainted: a.tainted,
        times: a.times.clone(),
        // Only strict funnels name the filling events (module doc of `reference`).
        values: if spec.order == FunnelOrder::Strict {
            a.values.clone()
        } else {
            Vec::new()
        },
    }
}

fn has(e: &UnitEvent, bit: usize) -> bool {
    (e.tags >> bit) & 1 == 1
}

/// Checks that the defining attempt's values name real events that fill its steps.
fn check_witness(spec: &FunnelSpec, unit: &[UnitEvent], d: &Attempt) -> Result<(), TestCaseError> {
    let by_value = |v: u32| unit.iter().find(|e| e.value == v).copied();
    match spec.order {
        FunnelOrder::Ordered | FunnelOrder::Strict => {
            prop_assert_eq!(d.values.len(), d.level);
            let distinct: BTreeSet<u32> = d.values.iter().copied().collect();
            prop_assert_eq!(distinct.len(), d.level, "an event fills two steps: {:?}", d);
            for (k, &v) in d.values.iter().enumerate() {
                let e = by_value(v);
                prop_assert!(e.is_some(), "value {} names no event", v);
                let e = e.unwrap_or(UnitEvent {
                    ts: 0,
                    tags: 0,
                    value: 0,
                });
                prop_assert!(has(&e, k), "event {:?} does not match step {}", e, k);
                prop_assert_eq!(e.ts, d.times[k]);
            }
        }
        FunnelOrder::Unordered => {
            prop_assert_eq!(d.values.len(), 1);
            let e = by_value(d.values[0]);
            prop_assert!(
                e.is_some_and(|e| e.ts == d.start_ms && (0..spec.steps).any(|s| has(&e, s))),
                "the opening event {:?} is not a step event at the start",
                e
            );
        }
    }
    Ok(())
}

#[derive(Debug, Clone)]
struct FunnelCase {
    spec: FunnelSpec,
    units: Vec<Vec<UnitEvent>>,
}

/// Tags from a generated `(kind, raw)`: mostly one step, sometimes an exclusion, nothing, two
/// steps, a step and an exclusion, or any mix.
fn funnel_tags(kind: u8, raw: u64, steps: usize, exclusions: usize) -> u64 {
    let step = |r: u64| 1u64 << (r % steps as u64);
    let exclusion = |r: u64| {
        if exclusions == 0 {
            step(r)
        } else {
            1u64 << (steps + (r % exclusions as u64) as usize)
        }
    };
    match kind {
        0..=4 => step(raw),
        5 => exclusion(raw),
        6 => 0,
        7 => raw & ((1u64 << (steps + exclusions)) - 1),
        8 => step(raw) | step(raw >> 8),
        _ => step(raw) | exclusion(raw >> 8),
    }
}

fn order_strategy() -> impl Strategy<Value = FunnelOrder> {
    prop::sample::select(vec![
        FunnelOrder::Ordered,
        FunnelOrder::Strict,
        FunnelOrder::Unordered,
    ])
}

fn funnel_case() -> impl Strategy<Value = FunnelCase> {
    let units = prop::collection::vec(
        prop::collection::vec((0i64..=16, 0u8..10, any::<u64>()), 0..=10),
        1..=4,
    );
    (
        (
            2usize..=4,
            0usize..=2,
            order_strategy(),
            any::<bool>(),
            any::<bool>(),
        ),
        (0i64..=8, 0i64..=4, 0i64..=20, any::<bool>()),
        prop::collection::vec((any::<usize>(), any::<usize>()), 2),
        units,
    )
        .prop_map(
            |(
                (steps, n_excl, order, first_entry, end_attempt),
                (window_ms, entry_start_ms, entry_len, open_end),
                raw_exclusions,
                raw_units,
            )| {
                let exclusions = raw_exclusions[..n_excl]
                    .iter()
                    .map(|&(a, b)| {
                        if order == FunnelOrder::Unordered {
                            // Validation only lets unordered exclusions span the funnel.
                            (0, steps - 1)
                        } else {
                            let from = a % (steps - 1);
                            (from, from + 1 + b % (steps - 1 - from))
                        }
                    })
                    .collect();
                let spec = FunnelSpec {
                    steps,
                    window_ms,
                    order,
                    attempt_policy: if first_entry {
                        AttemptPolicy::FirstEntry
                    } else {
                        AttemptPolicy::Best
                    },
                    exclusions,
                    exclusion_policy: if end_attempt {
                        ExclusionPolicy::EndAttempt
                    } else {
                        ExclusionPolicy::DropUser
                    },
                    entry_start_ms,
                    entry_end_ms: if open_end {
                        i64::MAX
                    } else {
                        entry_start_ms + entry_len
                    },
                };
                let units = raw_units
                    .iter()
                    .map(|events| {
                        events
                            .iter()
                            .enumerate()
                            .map(|(i, &(ts, kind, raw))| UnitEvent {
                                ts,
                                tags: funnel_tags(kind, raw, steps, n_excl),
                                // Unique per event, so a value names its event.
                                value: i as u32 + 1,
                            })
                            .collect()
                    })
                    .collect();
                FunnelCase { spec, units }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(20000))]

    #[test]
    fn funnels_match_a_brute_force_reference(case in funnel_case()) {
        let spec = &case.spec;
        let mut counts = vec![0u64; spec.steps + 1];
        let mut expected_counts = vec![0u64; spec.steps + 1];
        for unit in &case.units {
            let mut sorted = unit.clone();
            funnel::sort_events(spec, &mut sorted);
            let got: Vec<RefAttempt> =
                funnel::attempts(spec, &sorted).iter().map(|a| project(spec, a)).collect();
            let want = reference::funnel_attempts(spec, unit);
            prop_assert_eq!(&got, &want, "attempts of {:?}", unit);

            let result = funnel::evaluate(spec, &sorted);
            let reference::RefFunnelUnit { level, defining } =
                reference::funnel_result(spec, &want);
            prop_assert_eq!(result.level, level, "level of {:?}", unit);
            prop_assert_eq!(
                result.defining.as_ref().map(|d| project(spec, d)),
                defining,
                "defining attempt of {:?}",
                unit
            );
            if let Some(d) = &result.defining {
                check_witness(spec, unit, d)?;
            }
            counts[result.level] += 1;
            expected_counts[level] += 1;
        }
        prop_assert_eq!(counts, expected_counts);
    }
}

// ---------------------------------------------------------------------------------------------
// Calendar reference (retention, stickiness, lifecycle, buckets)
// ---------------------------------------------------------------------------------------------

/// Zones and dates near their DST changes (Sao Paulo's 2018/2019 changes happened at local
/// midnight; Lord Howe moves by 30 minutes).
const ZONES: &[(&str, &[&str])] = &[
    ("UTC", &["2024-01-01", "2024-02-28", "2023-12-30"]),
    (
        "America/New_York",
        &["2024-03-10", "2024-11-03", "2024-01-01"],
    ),
    ("Asia/Kolkata", &["2024-03-31", "2023-12-31"]),
    ("Australia/Lord_Howe", &["2024-04-07", "2024-10-06"]),
    ("Europe/Berlin", &["2024-03-31", "2024-10-27"]),
    ("America/Sao_Paulo", &["2018-11-04", "2019-02-16"]),
];

#[derive(Debug, Clone)]
struct Calendar {
    zone: &'static str,
    tz: Tz,
    from: NaiveDate,
    to: NaiveDate,
    interval: Interval,
    week_start: WeekStart,
}

impl Calendar {
    fn buckets(&self) -> Buckets {
        Buckets::new(self.from, self.to, self.tz, self.interval, self.week_start)
    }

    fn reference(&self) -> CalendarReference {
        CalendarReference::new(self.tz, self.from, self.to, self.interval, self.week_start)
    }

    /// A nominal period length, ms, for generating timestamps around the range.
    fn nominal_ms(&self) -> i64 {
        match self.interval {
            Interval::Hour => 3_600_000,
            Interval::Day => 86_400_000,
            Interval::Week => 7 * 86_400_000,
            Interval::Month => 30 * 86_400_000,
        }
    }
}

/// A calendar; with `aligned`, weekly and monthly ranges start on a period start.
fn calendar(aligned: bool) -> impl Strategy<Value = Calendar> {
    (
        0..ZONES.len(),
        any::<usize>(),
        0i64..4,
        any::<u16>(),
        0u8..4,
        any::<bool>(),
    )
        .prop_map(move |(z, anchor, back, len, interval, sunday)| {
            let (zone, anchors) = ZONES[z];
            let anchor: NaiveDate = anchors[anchor % anchors.len()].parse().expect("date");
            let interval = [
                Interval::Hour,
                Interval::Day,
                Interval::Week,
                Interval::Month,
            ][interval as usize];
            let week_start = if sunday {
                WeekStart::Sunday
            } else {
                WeekStart::Monday
            };
            let mut from = anchor - Duration::days(back);
            let days = i64::from(len)
                % match interval {
                    Interval::Hour => 2,
                    Interval::Day => 8,
                    Interval::Week => 36,
                    Interval::Month => 100,
                };
            if aligned {
                from = match interval {
                    Interval::Week => week_start_of(from, week_start),
                    Interval::Month => from.with_day(1).expect("day 1"),
                    Interval::Hour | Interval::Day => from,
                };
            }
            Calendar {
                zone,
                tz: zone.parse().expect("zone"),
                from,
                to: from + Duration::days(days),
                interval,
                week_start,
            }
        })
}

/// Raw events: `(kind, a, b, tag)` turned into instants around a calendar's range.
type RawEvents = Vec<(u8, u64, u8, u8)>;

fn raw_units() -> impl Strategy<Value = Vec<RawEvents>> {
    prop::collection::vec(
        prop::collection::vec((0u8..10, any::<u64>(), any::<u8>(), any::<u8>()), 0..=14),
        1..=6,
    )
}

/// Instants (sorted, with their tag byte) from raw events: uniform around the range, on a
/// bucket boundary ±1 ms, a whole number of `step_ms` after the previous instant ±1 ms, or
/// equal to it.
fn instants(buckets: &Buckets, nominal_ms: i64, step_ms: i64, raw: &RawEvents) -> Vec<(i64, u8)> {
    let lo = buckets.start_ms() - 2 * nominal_ms - 3_600_000;
    let hi = buckets.end_ms + 2 * nominal_ms + 3_600_000;
    let mut edges = buckets.starts_ms.clone();
    edges.push(buckets.end_ms);
    let mut out: Vec<(i64, u8)> = Vec::new();
    let mut previous = buckets.start_ms();
    for &(kind, a, b, tag) in raw {
        let delta = i64::from(b % 3) - 1;
        let ts = match kind {
            0..=3 => lo + (a % (hi - lo) as u64) as i64,
            4..=5 => edges[a as usize % edges.len()] + delta,
            6..=8 => previous + (a % 4) as i64 * step_ms + delta,
            _ => previous,
        };
        previous = ts;
        out.push((ts, tag));
    }
    out.sort();
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn buckets_follow_the_local_calendar(cal in calendar(false), raw in raw_units()) {
        let buckets = cal.buckets();
        let reference = cal.reference();
        prop_assert_eq!(buckets.len(), reference.count());
        if cal.interval != Interval::Hour {
            for (p, label) in buckets.labels.iter().enumerate() {
                let start = match cal.interval {
                    Interval::Day => cal.from + Duration::days(p as i64),
                    Interval::Week => {
                        week_start_of(cal.from, cal.week_start) + Duration::days(7 * p as i64)
                    }
                    _ => {
                        let m = month_number(cal.from) + p as i64;
                        NaiveDate::from_ymd_opt((m / 12) as i32, (m % 12) as u32 + 1, 1)
                            .expect("month")
                    }
                };
                prop_assert_eq!(label, &start.format("%Y-%m-%d").to_string());
            }
        }
        for unit in &raw {
            for (ts, _) in instants(&buckets, cal.nominal_ms(), 3_600_000, unit) {
                prop_assert_eq!(buckets.index_of(ts), reference.index(ts), "instant {}", ts);
            }
        }
    }
}

/// After Lord Howe's 30-minute DST change, hourly buckets still start on the local clock hour
/// (stepping 3600 s from midnight would start them at :30).
#[test]
fn lord_howe_hours_are_local_clock_hours() {
    let cal = Calendar {
        zone: "Australia/Lord_Howe",
        tz: "Australia/Lord_Howe".parse().expect("zone"),
        from: "2024-10-06".parse().expect("date"),
        to: "2024-10-06".parse().expect("date"),
        interval: Interval::Hour,
        week_start: WeekStart::Monday,
    };
    let buckets = cal.buckets();
    let reference = cal.reference();
    assert_eq!(buckets.len(), reference.count());
    let mut t = buckets.start_ms();
    while t < buckets.end_ms {
        assert_eq!(buckets.index_of(t), reference.index(t), "instant {t}");
        t += 15 * 60_000;
    }
}

fn period_ms(interval: Interval) -> i64 {
    match interval {
        Interval::Hour => 3_600_000,
        Interval::Day => 86_400_000,
        Interval::Week => 7 * 86_400_000,
        Interval::Month => 30 * 86_400_000,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn retention_matches_set_logic_per_cohort_cell(
        cal in calendar(false),
        raw in raw_units(),
        periods in 1usize..=6,
        recurring in any::<bool>(),
        rolling in any::<bool>(),
        unbounded in any::<bool>(),
    ) {
        let spec = RetentionSpec {
            buckets: cal.buckets(),
            cohort_type: if recurring { CohortType::Recurring } else { CohortType::FirstTime },
            mode: if rolling { TimeMode::Rolling } else { TimeMode::Calendar },
            rolling_ms: period_ms(cal.interval),
            counting: if unbounded { Counting::Unbounded } else { Counting::Bounded },
            periods,
        };
        let reference = cal.reference();
        let units: Vec<Vec<UnitEvent>> = raw
            .iter()
            .map(|r| {
                instants(&spec.buckets, cal.nominal_ms(), spec.rolling_ms, r)
                    .into_iter()
                    .map(|(ts, tag)| UnitEvent {
                        ts,
                        // Start, return, or both.
                        tags: u64::from(tag % 3) + 1,
                        value: 0,
                    })
                    .collect()
            })
            .collect();
        let mut got = RetentionTable::new(&spec);
        for u in &units {
            let mut one = RetentionTable::new(&spec);
            retention::add_unit(&spec, u, &mut one);
            got.merge(&one);
        }
        let params = RetentionParams {
            cohort_type: spec.cohort_type,
            mode: spec.mode,
            rolling_ms: spec.rolling_ms,
            counting: spec.counting,
            periods,
        };
        let want = reference::retention_table(&params, &reference, &units);
        prop_assert_eq!(&got.sizes, &want.sizes);
        prop_assert_eq!(&got.retained, &want.retained);
        for c in 0..want.sizes.len() {
            for k in 0..periods {
                prop_assert_eq!(got.observable(c, k), c + k < reference.count());
            }
        }
    }

    #[test]
    fn stickiness_counts_sets_of_active_periods(
        cal in calendar(false),
        raw in raw_units(),
        min_per_period in 1u64..=3,
    ) {
        let buckets = cal.buckets();
        let reference = cal.reference();
        let k_max = reference.count();
        let mut got = Stickiness::new(buckets.len());
        let mut active_counts = Vec::new();
        for r in &raw {
            let events: Vec<UnitEvent> = instants(&buckets, cal.nominal_ms(), cal.nominal_ms(), r)
                .into_iter()
                .map(|(ts, _)| UnitEvent { ts, tags: 1, value: 0 })
                .collect();
            let active = activity::active_periods(&buckets, &events, min_per_period);
            let times: Vec<i64> = events.iter().map(|e| e.ts).collect();
            let want: Vec<usize> = reference::active_periods(&reference, &times, min_per_period)
                .into_iter()
                .collect();
            prop_assert_eq!(&active, &want);
            got.add(active.len());
            active_counts.push(want.len());
        }
        let (histogram, cumulative) = reference::stickiness(&active_counts, k_max);
        prop_assert_eq!(&got.histogram, &histogram);
        prop_assert_eq!(got.cumulative(), cumulative);
    }

    #[test]
    fn lifecycle_follows_the_status_table(
        cal in calendar(true),
        raw in raw_units(),
        first_event in any::<bool>(),
    ) {
        let query = LifecycleQuery {
            timezone: cal.zone.to_string(),
            date_range: DateRange { from: cal.from, to: cal.to },
            interval: cal.interval,
            week_start: cal.week_start,
            series: EventSelector::default(),
            new_definition: if first_event {
                NewDefinition::FirstEventPeriod
            } else {
                NewDefinition::FirstSeenPeriod
            },
            filters: Vec::new(),
        };
        let shown = query.buckets();
        let previous_start = query.previous_period_start_ms();
        prop_assert!(previous_start < shown.start_ms());
        let reference = cal.reference();
        let mut got = Lifecycle::new(shown.len());
        let mut units = Vec::new();
        for r in &raw {
            // Tag bit 0: the series event; other events only make the unit seen.
            let events: Vec<(i64, bool)> =
                instants(&shown, cal.nominal_ms(), cal.nominal_ms(), r)
                    .into_iter()
                    .map(|(ts, tag)| (ts, tag % 3 != 0))
                    .collect();
            let series: Vec<UnitEvent> = events
                .iter()
                .filter(|(_, s)| *s)
                .map(|&(ts, _)| UnitEvent { ts, tags: 1, value: 0 })
                .collect();
            let first = if first_event {
                series.first().map(|e| e.ts)
            } else {
                events.first().map(|e| e.0)
            };

            // The evaluator, fed the way the engine does: active periods over the range,
            // activity in the period before it, and where the unit was first seen.
            let shown_active = activity::active_periods(&shown, &series, 1);
            let active_before = series
                .iter()
                .any(|e| e.ts >= previous_start && e.ts < shown.start_ms());
            let first_seen = match first {
                None => FirstSeen::Later,
                Some(t) if t < previous_start => FirstSeen::Earlier,
                Some(t) if t < shown.start_ms() => FirstSeen::Previous,
                Some(t) => shown.index_of(t).map(FirstSeen::At).unwrap_or(FirstSeen::Later),
            };
            got.add(first_seen, active_before, &shown_active);

            units.push(LifecycleUnit {
                series: series.iter().map(|e| e.ts).collect(),
                first,
            });
        }
        // The reference: the status table of §6 over signed periods.
        let want = reference::lifecycle(&reference, &units);
        prop_assert_eq!(
            (&got.new, &got.returning, &got.resurrecting, &got.dormant),
            (&want.new, &want.returning, &want.resurrecting, &want.dormant)
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Paths
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct PathsCase {
    spec: PathsSpec,
    units: Vec<Vec<(i64, u32)>>,
    limit: usize,
    min: Option<u64>,
    max: Option<u64>,
}

fn paths_case() -> impl Strategy<Value = PathsCase> {
    let units = prop::collection::vec(
        prop::collection::vec((0u8..8, 0i64..40, 1u32..=4), 0..=12),
        1..=6,
    );
    (
        1i64..=10,
        1usize..=5,
        prop::option::of(1u32..=4),
        prop::option::of(1u32..=4),
        units,
        (
            1usize..=12,
            prop::option::of(1u64..=3),
            prop::option::of(1u64..=6),
        ),
    )
        .prop_map(
            |(gap, step_limit, start_point, end_point, raw, (limit, min, max))| {
                let units = raw
                    .iter()
                    .map(|events| {
                        // Gaps of 0, just under, exactly, and just over the session gap, or any.
                        let mut ts = 0;
                        events
                            .iter()
                            .map(|&(kind, any, item)| {
                                ts += match kind {
                                    0 | 1 => 0,
                                    2 => gap - 1,
                                    3 => gap,
                                    4 => gap + 1,
                                    _ => any,
                                };
                                (ts, item)
                            })
                            .collect()
                    })
                    .collect();
                PathsCase {
                    spec: PathsSpec {
                        session_gap_ms: gap,
                        step_limit,
                        start_point,
                        end_point,
                    },
                    units,
                    limit,
                    min,
                    max,
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(10000))]

    #[test]
    fn paths_match_literal_node_strings(case in paths_case()) {
        let mut graph = PathGraph::default();
        for u in &case.units {
            let mut one = PathGraph::default();
            paths::add_unit(&case.spec, u, &mut one);
            graph.merge(one);
        }
        let got_edges: StringEdges = graph
            .edges
            .iter()
            .map(|(&(s, t), &w)| ((node_string(s.0, &s.1), node_string(t.0, &t.1)), w))
            .collect();
        let got_dropoffs: StringDropoffs =
            graph.dropoffs.iter().map(|(&(p, i), &n)| (node_string(p, &i), n)).collect();
        let params = PathParams {
            session_gap_ms: case.spec.session_gap_ms,
            step_limit: case.spec.step_limit,
            start_point: case.spec.start_point,
            end_point: case.spec.end_point,
        };
        let want = reference::path_graph(&params, &case.units);
        prop_assert_eq!(&got_edges, &want.edge_strings());
        prop_assert_eq!(&got_dropoffs, &want.dropoff_strings());

        // Drop-off = inflow − outflow (instances starting at a position-1 node count as inflow).
        let mut nodes: BTreeSet<Node> = graph.dropoffs.keys().copied().collect();
        for &(s, t) in graph.edges.keys() {
            nodes.insert(s);
            nodes.insert(t);
        }
        let starts: u64 = graph.dropoffs.values().sum();
        let first_out: u64 = graph.edges.iter().filter(|((s, _), _)| s.0 == 1).map(|(_, w)| w.0).sum();
        let first_drop: u64 = graph.dropoffs.iter().filter(|(n, _)| n.0 == 1).map(|(_, d)| d).sum();
        prop_assert_eq!(starts, first_out + first_drop, "every instance starts at position 1");
        for n in nodes.iter().filter(|n| n.0 > 1) {
            let inflow: u64 = graph.edges.iter().filter(|((_, t), _)| t == n).map(|(_, w)| w.0).sum();
            let outflow: u64 = graph.edges.iter().filter(|((s, _), _)| s == n).map(|(_, w)| w.0).sum();
            prop_assert_eq!(graph.dropoffs.get(n).copied().unwrap_or(0), inflow - outflow);
        }

        let top: Vec<(Node, Node, u64, f64)> =
            paths::top_edges(&graph, case.limit, case.min, case.max)
                .into_iter()
                .map(|e| (e.source, e.target, e.value, e.avg_seconds))
                .collect();
        prop_assert_eq!(
            top,
            reference::top_edges(&graph.edges, case.limit, case.min, case.max)
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Cohorts
// ---------------------------------------------------------------------------------------------

fn count_op() -> impl Strategy<Value = CountOp> {
    prop::sample::select(vec![
        CountOp::Eq,
        CountOp::Neq,
        CountOp::Gt,
        CountOp::Gte,
        CountOp::Lt,
        CountOp::Lte,
    ])
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(10000))]

    #[test]
    fn timelines_match_membership_at_every_instant(
        raw_times in prop::collection::vec(0i64..30, 0..=10),
        scale in prop::sample::select(vec![1i64, 1000, 3_600_000]),
        w in 1i64..=12,
        adjust in -1i64..=1,
        op in count_op(),
        value in 0u64..=4,
        until in prop::option::of(0i64..45),
    ) {
        let mut times: Vec<i64> = raw_times.iter().map(|t| t * scale).collect();
        times.sort();
        // Windows that are whole multiples of the spacing of the events, or 1 ms off.
        let window = (w * scale + adjust).max(1);
        let until = until.map_or(i64::MAX, |u| u * scale + adjust);
        let want: Vec<Transition> = reference::timeline(&times, window, op, value as f64, until)
            .into_iter()
            .map(|(at, entered)| Transition { at, entered })
            .collect();
        prop_assert_eq!(cohort::timeline(&times, window, op, value, until), want);
    }

    #[test]
    fn cohort_leaves_count_over_the_window(
        raw in prop::collection::vec((0i64..30, 0u64..4, prop::option::of(0u8..5)), 0..=12),
        t in 0i64..35,
        window in prop::option::of(1i64..=15),
        op in count_op(),
        value in 0u64..=4,
        within in 0i64..=6,
        distinct in any::<bool>(),
    ) {
        let mut raw = raw;
        raw.sort_by_key(|r| r.0);
        let events: Vec<UnitEvent> =
            raw.iter().map(|&(ts, tags, _)| UnitEvent { ts, tags, value: 0 }).collect();
        let renderings: Vec<Option<String>> =
            raw.iter().map(|r| r.2.map(|v| format!("v{v}"))).collect();
        let values: Vec<(Option<f64>, Option<&str>)> = raw
            .iter()
            .zip(&renderings)
            .map(|(r, s)| (r.2.map(f64::from), s.as_deref()))
            .collect();
        let w = WindowAt::new(t, window);
        for e in &events {
            prop_assert_eq!(w.contains(e.ts), reference::in_window(e.ts, t, window));
        }
        prop_assert_eq!(
            cohort::event_count(&events, w, op, value),
            reference::event_count(&events, t, window, op, value as f64)
        );
        prop_assert_eq!(
            cohort::relative_count(&events, w, op),
            reference::relative_count(&events, t, window, op)
        );
        prop_assert_eq!(cohort::first_time(&events, w), reference::first_time(&events, t, window));
        // The events are sorted by time; ties keep their generated order, which must not
        // matter.
        prop_assert_eq!(
            cohort::sequence(&events, w, within),
            reference::sequence(&events, t, window, within)
        );
        let aggregate = if distinct { PropertyAggregate::DistinctCount } else { PropertyAggregate::Sum };
        let numbers: Vec<Option<f64>> = raw.iter().map(|r| r.2.map(f64::from)).collect();
        let total = reference::aggregate(&events, &numbers, t, window, distinct);
        let threshold = value as f64 * 2.0;
        prop_assert_eq!(
            cohort::aggregate_property(&events, &values, w, aggregate, op, threshold),
            op.holds(total, threshold)
        );
    }
}
