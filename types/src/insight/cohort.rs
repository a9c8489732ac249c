//! Cohort conditions (§8) on one unit's events, and membership timelines (§8.2).
//!
//! Event conditions read the window `(T − X, T]` (every event up to T without a window). A
//! leaf is evaluated per unit from the unit's events tagged for that leaf: bit 0 for the
//! condition's events (`entity`, or `a`), bit 1 for `b`. Units with no events still have
//! counts of 0, so the caller evaluates every leaf over the whole person universe.

use super::UnitEvent;
use crate::query::behaviour::{CountOp, PropertyAggregate};

/// Tag bit of a leaf's main events (`entity` or `a`).
pub const MAIN: u64 = 1;
/// Tag bit of the `b` events of a relative count or sequence.
pub const OTHER: u64 = 2;

/// The window of a condition at T: `(from, to]` in ms, `from = None` for all time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowAt {
    /// Exclusive lower bound.
    pub from: Option<i64>,
    /// Inclusive upper bound (T).
    pub to: i64,
}

impl WindowAt {
    /// The window ending at `t` of length `ms` (all time for `None`).
    pub fn new(t: i64, ms: Option<i64>) -> WindowAt {
        WindowAt {
            from: ms.map(|m| t - m),
            to: t,
        }
    }

    /// Whether `ts` is inside.
    pub fn contains(&self, ts: i64) -> bool {
        ts <= self.to && self.from.is_none_or(|f| ts > f)
    }
}

fn count(events: &[UnitEvent], bit: u64, w: WindowAt) -> u64 {
    events
        .iter()
        .filter(|e| e.tags & bit != 0 && w.contains(e.ts))
        .count() as u64
}

/// `count(entity) op value`.
pub fn event_count(events: &[UnitEvent], w: WindowAt, op: CountOp, value: u64) -> bool {
    op.holds(count(events, MAIN, w) as f64, value as f64)
}

/// The first-ever matching event lies in the window (events cover all history).
pub fn first_time(events: &[UnitEvent], w: WindowAt) -> bool {
    events
        .iter()
        .filter(|e| e.tags & MAIN != 0)
        .map(|e| e.ts)
        .min()
        .is_some_and(|t| w.contains(t))
}

/// `count(a) op count(b)`.
pub fn relative_count(events: &[UnitEvent], w: WindowAt, op: CountOp) -> bool {
    op.holds(
        count(events, MAIN, w) as f64,
        count(events, OTHER, w) as f64,
    )
}

/// An aggregate of the values (`values[i]` of event `i`: the property's numeric value, and its
/// rendering for distinct counts) compared with `value`.
pub fn aggregate_property(
    events: &[UnitEvent],
    values: &[(Option<f64>, Option<&str>)],
    w: WindowAt,
    aggregate: PropertyAggregate,
    op: CountOp,
    value: f64,
) -> bool {
    let inside = events
        .iter()
        .zip(values)
        .filter(|(e, _)| e.tags & MAIN != 0 && w.contains(e.ts))
        .map(|(_, v)| v);
    let total = match aggregate {
        PropertyAggregate::Sum => inside.filter_map(|(n, _)| *n).sum::<f64>(),
        PropertyAggregate::DistinctCount => {
            let set: std::collections::BTreeSet<&str> = inside.filter_map(|(_, s)| *s).collect();
            set.len() as f64
        }
    };
    op.holds(total, value)
}

/// An `a` event followed by a different `b` event at most `within_ms` later, both inside the
/// window (events sorted by time). Events sharing an instant follow each other whatever their
/// order in the list (as funnel steps do, §3.4): an `a` and a different `b` at one instant
/// count.
pub fn sequence(events: &[UnitEvent], w: WindowAt, within_ms: i64) -> bool {
    // The latest instant before the current one with an `a` event inside the window.
    let mut last_a: Option<i64> = None;
    let mut i = 0;
    while i < events.len() {
        let ts = events[i].ts;
        let end = i + events[i..].iter().take_while(|e| e.ts == ts).count();
        if w.contains(ts) {
            let group = &events[i..end];
            let a_here = group.iter().filter(|e| e.tags & MAIN != 0).count();
            let followed = group.iter().filter(|e| e.tags & OTHER != 0).any(|b| {
                // Another `a` at this instant, or one earlier within reach.
                a_here > usize::from(b.tags & MAIN != 0)
                    || last_a.is_some_and(|at| ts - at <= within_ms)
            });
            if followed {
                return true;
            }
            if a_here > 0 {
                last_a = Some(ts);
            }
        }
        i = end;
    }
    false
}

/// Whether the unit did a `MAIN` event in `(from, to]`.
fn any_in(events: &[UnitEvent], from: i64, to: i64) -> bool {
    events
        .iter()
        .any(|e| e.tags & MAIN != 0 && e.ts > from && e.ts <= to)
}

/// Did it in the `previous_ms` before the recent window `(t − recent_ms, t]`, and not in it.
pub fn stopped(events: &[UnitEvent], t: i64, recent_ms: i64, previous_ms: i64) -> bool {
    let start = t - recent_ms;
    any_in(events, start - previous_ms, start) && !any_in(events, start, t)
}

/// Did it in the recent window `(t − recent_ms, t]`, and not in the `previous_ms` before it.
pub fn restarted(events: &[UnitEvent], t: i64, recent_ms: i64, previous_ms: i64) -> bool {
    let start = t - recent_ms;
    any_in(events, start, t) && !any_in(events, start - previous_ms, start)
}

/// Active in at least `min` of the `total` periods `(t − (k+1)·P, t − k·P]`, k = 0..total.
pub fn regularly(events: &[UnitEvent], t: i64, period_ms: i64, total: u32, min: u32) -> bool {
    let active = (0..i64::from(total))
        .filter(|k| any_in(events, t - (k + 1) * period_ms, t - k * period_ms))
        .count();
    active >= min as usize
}

/// The unit's `nth` matching event ever (events cover all history, sorted) lies in the window.
pub fn historical_count(events: &[UnitEvent], w: WindowAt, nth: u32) -> bool {
    events
        .iter()
        .filter(|e| e.tags & MAIN != 0)
        .nth(nth as usize - 1)
        .is_some_and(|e| w.contains(e.ts))
}

/// After the unit's first start (`MAIN`) event in the window at `t0`, a return (`OTHER`) event
/// in `[t0 + k·P, t0 + (k+1)·P)`, no later than the window's end (events sorted).
pub fn returned_in(events: &[UnitEvent], w: WindowAt, period_ms: i64, k: u32) -> bool {
    let Some(t0) = events
        .iter()
        .find(|e| e.tags & MAIN != 0 && w.contains(e.ts))
        .map(|e| e.ts)
    else {
        return false;
    };
    let from = t0 + i64::from(k) * period_ms;
    let to = from + period_ms;
    events
        .iter()
        .any(|e| e.tags & OTHER != 0 && e.ts >= from && e.ts < to && e.ts <= w.to)
}

/// A change of membership.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    /// When it happened, ms.
    pub at: i64,
    /// True for entered, false for left.
    pub entered: bool,
}

/// When a unit enters and leaves "count of events in `(t − window, t]` op value" over time,
/// up to `until`: counts rise at each event and fall when it expires, exactly `window` later
/// (the expiry sweep of §8.2). Membership before the first event is that of a count of 0;
/// only changes from it are reported. `times` are sorted.
pub fn timeline(
    times: &[i64],
    window_ms: i64,
    op: CountOp,
    value: u64,
    until: i64,
) -> Vec<Transition> {
    let mut changes: Vec<(i64, i64)> = Vec::with_capacity(times.len() * 2);
    for &t in times {
        changes.push((t, 1));
        changes.push((t + window_ms, -1));
    }
    changes.sort_unstable();
    let mut out = Vec::new();
    let mut n: i64 = 0;
    let mut member = op.holds(0.0, value as f64);
    let mut i = 0;
    while i < changes.len() {
        let at = changes[i].0;
        if at > until {
            break;
        }
        while i < changes.len() && changes[i].0 == at {
            n += changes[i].1;
            i += 1;
        }
        let now = op.holds(n as f64, value as f64);
        if now != member {
            out.push(Transition { at, entered: now });
            member = now;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: i64 = 3_600_000;

    fn ev(ts: i64, tags: u64) -> UnitEvent {
        UnitEvent { ts, tags, value: 0 }
    }

    #[test]
    fn window_excludes_its_open_bound() {
        let t = 100 * H;
        let w = WindowAt::new(t, Some(7 * 24 * H));
        assert!(!w.contains(t - 7 * 24 * H));
        assert!(w.contains(t - 7 * 24 * H + 1));
        assert!(w.contains(t));
        assert!(!w.contains(t + 1));
    }

    #[test]
    fn timeline_follows_example_8c() {
        // Logins Jan 1 10:00, Jan 2 09:00, Jan 5 08:00 (hours from Jan 1 00:00).
        let times = [10 * H, 33 * H, 104 * H];
        let t = timeline(&times, 72 * H, CountOp::Gte, 2, i64::MAX);
        let got: Vec<(i64, bool)> = t.iter().map(|x| (x.at, x.entered)).collect();
        assert_eq!(
            got,
            vec![
                (33 * H, true),
                (82 * H, false),
                (104 * H, true),
                (105 * H, false)
            ]
        );
    }

    #[test]
    fn stopped_restarted_regularly_and_nth_occurrences() {
        let day = 24 * H;
        let t = 100 * day;
        let at = |d: i64| ev(t - d * day, MAIN);
        // Did it 20 days ago, not in the last 7: stopped, not restarted.
        assert!(stopped(&[at(20)], t, 7 * day, 30 * day));
        assert!(!restarted(&[at(20)], t, 7 * day, 30 * day));
        // Did it 2 days ago only: restarted.
        assert!(restarted(&[at(2)], t, 7 * day, 30 * day));
        assert!(!stopped(&[at(2), at(20)], t, 7 * day, 30 * day));
        // Active 3 of the last 4 days (day periods ending at t).
        let events = [at(0), at(1), at(3)];
        assert!(regularly(&events, t, day, 4, 3));
        assert!(!regularly(&events, t, day, 4, 4));
        // The second-ever event falls in the last 5 days, the first does not.
        let w = WindowAt::new(t, Some(5 * day));
        let events = [at(9), at(3), at(1)];
        assert!(historical_count(&events, w, 2));
        assert!(!historical_count(&events, w, 1));
        // First start in the window, a return 1 period (a day) later.
        let events = [ev(t - 3 * day, MAIN), ev(t - 2 * day + H, OTHER)];
        assert!(returned_in(&events, w, day, 1));
        assert!(!returned_in(&events, w, day, 2));
    }

    #[test]
    fn sequences_need_a_later_b_within_the_limit() {
        let w = WindowAt::new(100 * H, None);
        assert!(sequence(&[ev(0, MAIN), ev(H, OTHER)], w, H));
        assert!(!sequence(&[ev(0, MAIN), ev(2 * H, OTHER)], w, H));
        assert!(!sequence(&[ev(0, OTHER), ev(H, MAIN)], w, H));
        assert!(!sequence(&[ev(0, MAIN | OTHER)], w, H));
        // One instant: an `a` and a different `b` count in either list order, also when the
        // `a` matches `b` too (shrunk by the engine-level properties: `view` then any event,
        // with a `view` and an `add` at one instant, was not counted when the `add` came
        // first in the list).
        assert!(sequence(&[ev(0, OTHER), ev(0, MAIN | OTHER)], w, H));
        assert!(sequence(&[ev(0, OTHER), ev(0, MAIN)], w, H));
        assert!(sequence(&[ev(0, MAIN | OTHER), ev(0, MAIN | OTHER)], w, H));
        assert!(!sequence(&[ev(0, MAIN), ev(0, MAIN)], w, H));
    }
}
