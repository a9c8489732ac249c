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
/// window (events sorted by time).
pub fn sequence(events: &[UnitEvent], w: WindowAt, within_ms: i64) -> bool {
    let mut last_a: Option<(usize, i64)> = None;
    for (i, e) in events.iter().enumerate() {
        if !w.contains(e.ts) {
            continue;
        }
        if e.tags & OTHER != 0
            && let Some((ai, at)) = last_a
            && ai != i
            && e.ts - at <= within_ms
        {
            return true;
        }
        if e.tags & MAIN != 0 {
            last_a = Some((i, e.ts));
        }
    }
    false
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
    fn sequences_need_a_later_b_within_the_limit() {
        let w = WindowAt::new(100 * H, None);
        assert!(sequence(&[ev(0, MAIN), ev(H, OTHER)], w, H));
        assert!(!sequence(&[ev(0, MAIN), ev(2 * H, OTHER)], w, H));
        assert!(!sequence(&[ev(0, OTHER), ev(H, MAIN)], w, H));
        assert!(!sequence(&[ev(0, MAIN | OTHER)], w, H));
    }
}
