//! Funnels (§3): one unit's attempts, its result, and the attempt that defines it.
//!
//! Definitions implemented here (the query engine and the docs rely on them):
//!
//! * An attempt starts at a timestamp `t1` of a step-1 event inside the entry range. Its chain
//!   takes, step after step, the earliest events that continue it: events of one timestamp may
//!   fill steps in funnel order whatever their arrival order (§3.4), one event fills at most
//!   one step, and every chain event lies in `[t1, t1 + W]` (inclusive window, §3.1). Among
//!   events sharing a timestamp the chain fills as many consecutive steps as distinct events
//!   allow (a small bipartite matching), which is what makes "earliest" optimal for reach.
//! * Strict order: from a step-1 event the events that follow (ties ordered by the lowest step
//!   they match, events matching none last) must each be the next step or a repeat of the step
//!   just reached; anything else ends the attempt (PostHog's and the spec's example 3.A).
//! * Unordered: an attempt at `t1` (any step's event) reaches the largest number of distinct
//!   steps that distinct events inside `[t1, t1 + W]` can fill. Its step `k` (0-based) counts
//!   as reached at the first instant `τ` by which distinct events in `[t1, τ]` fill `k + 1`
//!   distinct steps ("completed k + 1 of n"); exclusions and time to convert read these
//!   instants.
//! * Exclusion `(i, j)`: an attempt is tainted when an excluded event falls strictly after its
//!   chain reached step `i` and strictly before it reached step `j` (before `t1 + W`, inclusive,
//!   when it never reached `j`). `drop_user` removes a unit whose furthest attempt is tainted
//!   unless a clean attempt reaches as far; `end_attempt` cuts the attempt at the last step
//!   reached before the excluded event. An unordered funnel's exclusions span it (`0` to
//!   `n − 1`): from entry until all steps are filled.
//! * Best attempt: the result is the furthest attempt; the earliest of the furthest defines
//!   attribution and time to convert (§3.3 **R**). First entry: only the first attempt counts.

use super::UnitEvent;
use crate::query::behaviour::{AttemptPolicy, ExclusionPolicy, FunnelOrder};

/// What one funnel evaluation needs.
#[derive(Debug, Clone, PartialEq)]
pub struct FunnelSpec {
    /// Number of steps; step `k` is tag bit `k`.
    pub steps: usize,
    /// Conversion window, ms, inclusive.
    pub window_ms: i64,
    /// Step order.
    pub order: FunnelOrder,
    /// Which step-1 events start attempts.
    pub attempt_policy: AttemptPolicy,
    /// Exclusions `(from_step, to_step)`, 0-based; exclusion `i` is tag bit `steps + i`.
    pub exclusions: Vec<(usize, usize)>,
    /// What an exclusion does.
    pub exclusion_policy: ExclusionPolicy,
    /// Attempts start in `[entry_start_ms, entry_end_ms)`.
    pub entry_start_ms: i64,
    /// End of the entry range (exclusive).
    pub entry_end_ms: i64,
}

/// One attempt of a unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    /// When it started (its step-1 event).
    pub start_ms: i64,
    /// Steps reached (after an `end_attempt` cut).
    pub level: usize,
    /// Whether an exclusion tainted it (`drop_user` only; `end_attempt` cuts instead).
    pub tainted: bool,
    /// Instant at which each reached step was filled.
    pub times: Vec<i64>,
    /// The value on the event that filled each reached step.
    pub values: Vec<u32>,
}

/// A unit's funnel result.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UnitResult {
    /// Steps reached; 0 when the unit did not enter or was dropped by an exclusion.
    pub level: usize,
    /// The attempt that defines attribution and time to convert.
    pub defining: Option<Attempt>,
}

fn step_mask(spec: &FunnelSpec) -> u64 {
    if spec.steps >= 64 {
        u64::MAX
    } else {
        (1u64 << spec.steps) - 1
    }
}

fn lowest_step(e: &UnitEvent, mask: u64) -> u32 {
    let t = e.tags & mask;
    if t == 0 { u32::MAX } else { t.trailing_zeros() }
}

/// Sorts a unit's events the way every evaluation reads them: by time, and within a timestamp
/// by the lowest step an event matches (events matching no step last).
pub fn sort_events(spec: &FunnelSpec, events: &mut [UnitEvent]) {
    let mask = step_mask(spec);
    events.sort_by_key(|e| (e.ts, lowest_step(e, mask), e.tags, e.value));
}

/// Whether events are in the order of [`sort_events`] already.
pub fn is_sorted(spec: &FunnelSpec, events: &[UnitEvent]) -> bool {
    let mask = step_mask(spec);
    events.is_sorted_by_key(|e| (e.ts, lowest_step(e, mask), e.tags, e.value))
}

/// Tries to extend a matching of steps `first..step` onto events `group` by step `step`
/// (Kuhn's augmenting path). `owner[e]` is the step event `e` fills.
fn augment(
    step: usize,
    group: &[UnitEvent],
    owner: &mut [Option<usize>],
    seen: &mut [bool],
    usable: &dyn Fn(usize) -> bool,
) -> bool {
    for e in 0..group.len() {
        if seen[e] || !usable(e) || group[e].tags & (1 << step) == 0 {
            continue;
        }
        seen[e] = true;
        match owner[e] {
            None => {
                owner[e] = Some(step);
                return true;
            }
            Some(other) => {
                if augment(other, group, owner, seen, usable) {
                    owner[e] = Some(step);
                    return true;
                }
            }
        }
    }
    false
}

/// Fills as many consecutive steps from `from` as distinct events of `group` allow; returns
/// the event filling each of them.
fn fill_from_group(
    from: usize,
    steps: usize,
    group: &[UnitEvent],
    usable: &dyn Fn(usize) -> bool,
) -> Vec<usize> {
    let mut owner: Vec<Option<usize>> = vec![None; group.len()];
    let mut filled = 0;
    for step in from..steps {
        let mut seen = vec![false; group.len()];
        if !augment(step, group, &mut owner, &mut seen, usable) {
            break;
        }
        filled += 1;
    }
    let mut by_step = vec![usize::MAX; filled];
    for (e, o) in owner.iter().enumerate() {
        if let Some(s) = o {
            by_step[s - from] = e;
        }
    }
    by_step
}

/// The end (exclusive) of the run of events sharing `events[i].ts`.
fn group_end(events: &[UnitEvent], i: usize) -> usize {
    let ts = events[i].ts;
    i + events[i..].iter().take_while(|e| e.ts == ts).count()
}

/// The ordered chain of the attempt at the timestamp group starting at `start`.
fn ordered_chain(spec: &FunnelSpec, events: &[UnitEvent], start: usize) -> Attempt {
    let t1 = events[start].ts;
    let mut attempt = Attempt {
        start_ms: t1,
        level: 0,
        tainted: false,
        times: Vec::new(),
        values: Vec::new(),
    };
    let mut i = start;
    while i < events.len() && attempt.level < spec.steps && events[i].ts <= t1 + spec.window_ms {
        let end = group_end(events, i);
        let group = &events[i..end];
        let filled = fill_from_group(attempt.level, spec.steps, group, &|_| true);
        if attempt.level == 0 && filled.is_empty() {
            return attempt;
        }
        for e in filled {
            attempt.level += 1;
            attempt.times.push(group[e].ts);
            attempt.values.push(group[e].value);
        }
        i = end;
    }
    attempt
}

/// Where each step's events are, for units whose events each match at most one step: then an
/// ordered chain is found by jumping to the next event of each step (a step's event sharing an
/// instant with the previous step's sorts after it, so "next position" is exact), instead of
/// scanning the window.
struct StepPositions {
    positions: Vec<Vec<u32>>,
}

impl StepPositions {
    /// `None` when some event matches several steps (the general path handles those).
    fn new(spec: &FunnelSpec, events: &[UnitEvent]) -> Option<StepPositions> {
        let mask = step_mask(spec);
        let mut positions = vec![Vec::new(); spec.steps];
        for (i, e) in events.iter().enumerate() {
            let steps = e.tags & mask;
            if steps.count_ones() > 1 {
                return None;
            }
            if steps != 0 {
                positions[steps.trailing_zeros() as usize].push(i as u32);
            }
        }
        Some(StepPositions { positions })
    }

    /// The first event of `step` at or after position `from`.
    fn next(&self, step: usize, from: usize) -> Option<usize> {
        let p = &self.positions[step];
        p.get(p.partition_point(|&x| (x as usize) < from))
            .map(|&x| x as usize)
    }

    /// The ordered chain of the attempt at the timestamp group starting at `start`.
    fn chain(&self, spec: &FunnelSpec, events: &[UnitEvent], start: usize) -> Attempt {
        let t1 = events[start].ts;
        let mut attempt = Attempt {
            start_ms: t1,
            level: 0,
            tainted: false,
            times: Vec::with_capacity(spec.steps),
            values: Vec::with_capacity(spec.steps),
        };
        let mut from = start;
        for step in 0..spec.steps {
            match self.next(step, from) {
                Some(at) if events[at].ts <= t1 + spec.window_ms => {
                    attempt.level += 1;
                    attempt.times.push(events[at].ts);
                    attempt.values.push(events[at].value);
                    from = at + 1;
                }
                _ => break,
            }
        }
        attempt
    }
}

/// The strict chain of the attempt started by the step-1 event `events[start]`.
fn strict_chain(spec: &FunnelSpec, events: &[UnitEvent], start: usize) -> Attempt {
    let first = events[start];
    let mut attempt = Attempt {
        start_ms: first.ts,
        level: 1,
        tainted: false,
        times: vec![first.ts],
        values: vec![first.value],
    };
    for e in &events[start + 1..] {
        if attempt.level == spec.steps || e.ts > first.ts + spec.window_ms {
            break;
        }
        if e.tags & (1 << attempt.level) != 0 {
            attempt.level += 1;
            attempt.times.push(e.ts);
            attempt.values.push(e.value);
        } else if e.tags & (1 << (attempt.level - 1)) == 0 {
            break;
        }
    }
    attempt
}

/// The unordered attempt at the events from index `start` (all sharing or following its time).
/// Its `k`-th step counts as reached at the first instant by which `k` distinct steps are
/// filled.
fn unordered_attempt(spec: &FunnelSpec, events: &[UnitEvent], start: usize) -> Attempt {
    let t1 = events[start].ts;
    // Events at `t1` that sort before `start` belong to the window too.
    let lo = events.partition_point(|e| e.ts < t1);
    let hi = events.partition_point(|e| e.ts <= t1 + spec.window_ms);
    // A matching needs at most `steps` candidates per step: keep the earliest ones (also
    // enough for every prefix of the window).
    let mut per_step = vec![0usize; spec.steps];
    let mut kept: Vec<UnitEvent> = Vec::new();
    for e in &events[lo..hi] {
        let mut keep = false;
        for (s, n) in per_step.iter_mut().enumerate() {
            if e.tags & (1 << s) != 0 && *n < spec.steps {
                *n += 1;
                keep = true;
            }
        }
        if keep {
            kept.push(*e);
        }
    }
    // Grow the matching one timestamp at a time: each step it gains is reached then.
    let mut owner: Vec<Option<usize>> = vec![None; kept.len()];
    let mut matched = vec![false; spec.steps];
    let mut times = Vec::new();
    let mut i = 0;
    while i < kept.len() && times.len() < spec.steps {
        let end = group_end(&kept, i);
        for (step, done) in matched.iter_mut().enumerate() {
            let mut seen = vec![false; kept.len()];
            if !*done && augment(step, &kept, &mut owner, &mut seen, &|e| e < end) {
                *done = true;
                times.push(kept[i].ts);
            }
        }
        i = end;
    }
    let level = times.len();
    Attempt {
        start_ms: t1,
        level,
        tainted: false,
        times,
        values: vec![events[start].value; level.min(1)],
    }
}

/// Applies the exclusions to an attempt's chain.
fn apply_exclusions(spec: &FunnelSpec, events: &[UnitEvent], attempt: &mut Attempt) {
    let deadline = attempt.start_ms + spec.window_ms;
    let mut cut = attempt.level;
    for (x, &(from, to)) in spec.exclusions.iter().enumerate() {
        if attempt.level <= from {
            continue;
        }
        let bit = 1u64 << (spec.steps + x);
        let after = attempt.times[from];
        // Events are sorted by time: start after `after` instead of at the first event.
        let later = &events[events.partition_point(|e| e.ts <= after)..];
        let hit = if attempt.level > to {
            let before = attempt.times[to];
            later
                .iter()
                .take_while(|e| e.ts < before)
                .find(|e| e.tags & bit != 0)
                .map(|e| e.ts)
        } else {
            later
                .iter()
                .take_while(|e| e.ts <= deadline)
                .find(|e| e.tags & bit != 0)
                .map(|e| e.ts)
        };
        if let Some(ts) = hit {
            match spec.exclusion_policy {
                ExclusionPolicy::DropUser => attempt.tainted = true,
                ExclusionPolicy::EndAttempt => {
                    let reached = attempt.times.iter().filter(|t| **t < ts).count().max(1);
                    cut = cut.min(reached.max(from + 1));
                }
            }
        }
    }
    if cut < attempt.level {
        attempt.level = cut;
        attempt.times.truncate(cut);
        attempt.values.truncate(cut.min(attempt.values.len()));
    }
}

/// Calls `f` with every attempt of a unit whose events are sorted by [`sort_events`], in
/// start order, until it returns `false`.
fn for_each_attempt(spec: &FunnelSpec, events: &[UnitEvent], mut f: impl FnMut(Attempt) -> bool) {
    let fast = match spec.order {
        FunnelOrder::Ordered => StepPositions::new(spec, events),
        _ => None,
    };
    let mut i = 0;
    while i < events.len() {
        let e = events[i];
        if e.ts >= spec.entry_end_ms {
            break;
        }
        let in_range = e.ts >= spec.entry_start_ms;
        let attempt = match spec.order {
            FunnelOrder::Ordered => {
                let end = group_end(events, i);
                let starts = in_range && events[i..end].iter().any(|e| e.tags & 1 != 0);
                let a = starts.then(|| match &fast {
                    Some(positions) => positions.chain(spec, events, i),
                    None => ordered_chain(spec, events, i),
                });
                i = end;
                a
            }
            FunnelOrder::Strict => {
                let a = (in_range && e.tags & 1 != 0).then(|| strict_chain(spec, events, i));
                i += 1;
                a
            }
            FunnelOrder::Unordered => {
                let end = group_end(events, i);
                let starts =
                    in_range && events[i..end].iter().any(|e| e.tags & step_mask(spec) != 0);
                // The group's first funnel event opens the attempt (its value labels it).
                let a = starts.then(|| {
                    let first = (i..end)
                        .find(|&k| events[k].tags & step_mask(spec) != 0)
                        .unwrap_or(i);
                    unordered_attempt(spec, events, first)
                });
                i = end;
                a
            }
        };
        if let Some(mut a) = attempt.filter(|a| a.level > 0) {
            apply_exclusions(spec, events, &mut a);
            if !f(a) || spec.attempt_policy == AttemptPolicy::FirstEntry {
                break;
            }
        }
    }
}

/// Every attempt of a unit whose events are sorted by [`sort_events`], in start order.
pub fn attempts(spec: &FunnelSpec, events: &[UnitEvent]) -> Vec<Attempt> {
    let mut out = Vec::new();
    for_each_attempt(spec, events, |a| {
        out.push(a);
        true
    });
    out
}

/// A unit's funnel result from its events sorted by [`sort_events`] (see the module
/// documentation), without keeping every attempt. The attempts come in start order, so the
/// first clean attempt that reaches the last step decides the result and ends the scan.
pub fn evaluate(spec: &FunnelSpec, events: &[UnitEvent]) -> UnitResult {
    let mut furthest = 0;
    let mut defining: Option<Attempt> = None;
    for_each_attempt(spec, events, |a| {
        furthest = furthest.max(a.level);
        let better = !a.tainted && defining.as_ref().is_none_or(|d| a.level > d.level);
        let done = better && a.level == spec.steps;
        if better {
            defining = Some(a);
        }
        !done
    });
    let furthest_clean = defining.as_ref().map_or(0, |d| d.level);
    if furthest == 0
        || (spec.exclusion_policy == ExclusionPolicy::DropUser && furthest_clean < furthest)
    {
        return UnitResult::default();
    }
    // With `end_attempt` no attempt is tainted, so the defining attempt reaches `furthest`.
    UnitResult {
        level: furthest,
        defining,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: i64 = 60_000;

    fn spec(steps: usize, window_ms: i64, order: FunnelOrder) -> FunnelSpec {
        FunnelSpec {
            steps,
            window_ms,
            order,
            attempt_policy: AttemptPolicy::Best,
            exclusions: Vec::new(),
            exclusion_policy: ExclusionPolicy::DropUser,
            entry_start_ms: 0,
            entry_end_ms: i64::MAX,
        }
    }

    /// Events from `(minute, tags)`.
    fn events(spec: &FunnelSpec, list: &[(i64, u64)]) -> Vec<UnitEvent> {
        let mut v: Vec<UnitEvent> = list
            .iter()
            .map(|&(m, tags)| UnitEvent {
                ts: m * MIN,
                tags,
                value: 0,
            })
            .collect();
        sort_events(spec, &mut v);
        v
    }

    const A: u64 = 1;
    const B: u64 = 2;
    const C: u64 = 4;
    const X: u64 = 0;

    #[test]
    fn strict_order_follows_example_3a() {
        let s = spec(3, 1440 * MIN, FunnelOrder::Strict);
        let level = |l: &[(i64, u64)]| evaluate(&s, &events(&s, l)).level;
        assert_eq!(level(&[(0, A), (1, B), (2, C)]), 3);
        assert_eq!(level(&[(0, A), (1, X), (2, B), (3, C)]), 1);
        assert_eq!(level(&[(0, A), (1, B), (2, A), (3, B), (4, C)]), 3);
        assert_eq!(level(&[(0, A), (1, B), (2, B), (3, C)]), 3);
        assert_eq!(level(&[(0, A), (1, B), (2, A), (3, C)]), 2);
        let o = spec(3, 1440 * MIN, FunnelOrder::Ordered);
        let level = |l: &[(i64, u64)]| evaluate(&o, &events(&o, l)).level;
        assert_eq!(level(&[(0, A), (1, X), (2, B), (3, C)]), 3);
        assert_eq!(level(&[(0, A), (1, B), (2, A), (3, C)]), 3);
    }

    #[test]
    fn unordered_follows_example_3b() {
        let s = spec(3, 60 * MIN, FunnelOrder::Unordered);
        let level = |l: &[(i64, u64)]| evaluate(&s, &events(&s, l)).level;
        assert_eq!(level(&[(0, C), (10, A), (20, B)]), 3);
        assert_eq!(level(&[(0, B), (5, B), (90, C)]), 1);
        assert_eq!(level(&[(0, A), (50, C), (70, B)]), 2);
        assert_eq!(level(&[(0, A), (1, A)]), 1);
    }

    #[test]
    fn unordered_steps_are_reached_when_filled_and_exclusions_stop_at_completion() {
        const X: u64 = 8;
        let mut s = spec(3, 7, FunnelOrder::Unordered);
        s.exclusions = vec![(0, 2)];
        let raw = |list: &[(i64, u64)]| {
            let mut v: Vec<UnitEvent> = list
                .iter()
                .map(|&(ts, tags)| UnitEvent { ts, tags, value: 0 })
                .collect();
            sort_events(&s, &mut v);
            v
        };
        // Shrunk by the property tests: all steps at 5, the excluded event after completion.
        let r = evaluate(&s, &raw(&[(5, A), (5, B), (5, C), (6, X)]));
        assert_eq!(r.level, 3);
        let r = evaluate(&s, &raw(&[(0, C), (2, A), (4, A), (7, B)]));
        assert_eq!(r.defining.unwrap().times, vec![0, 2, 7]);
        // An excluded event before completion: drop_user drops (the clean attempt from B
        // reaches 2 only), end_attempt cuts the first attempt to 1 (the one from B reaches 2).
        let e = raw(&[(0, A), (1, X), (2, B), (3, C)]);
        assert_eq!(evaluate(&s, &e).level, 0);
        s.exclusion_policy = ExclusionPolicy::EndAttempt;
        assert_eq!(evaluate(&s, &e).level, 2);
        s.attempt_policy = AttemptPolicy::FirstEntry;
        assert_eq!(evaluate(&s, &e).level, 1);
        // Shrunk: the event filling the last step is also excluded, at the completion instant.
        let mut s = spec(2, 1, FunnelOrder::Unordered);
        s.exclusions = vec![(0, 1)];
        let mut e = vec![
            UnitEvent {
                ts: 7,
                tags: A | B | 4,
                value: 0,
            },
            UnitEvent {
                ts: 6,
                tags: A,
                value: 0,
            },
        ];
        sort_events(&s, &mut e);
        assert_eq!(evaluate(&s, &e).level, 2);
    }

    #[test]
    fn ties_fill_steps_in_funnel_order_but_one_event_fills_one_step() {
        let s = spec(2, 1440 * MIN, FunnelOrder::Ordered);
        // checkout (B) sent before view_cart (A) in the same instant converts.
        assert_eq!(evaluate(&s, &events(&s, &[(0, B), (0, A)])).level, 2);
        assert_eq!(evaluate(&s, &events(&s, &[(0, B), (1, A)])).level, 1);
        // One event matching both steps reaches step 1 only.
        assert_eq!(evaluate(&s, &events(&s, &[(0, A | B)])).level, 1);
        // Two events in one instant, one matching both: the matching uses both.
        assert_eq!(evaluate(&s, &events(&s, &[(0, A | B), (0, A)])).level, 2);
    }

    #[test]
    fn best_attempt_and_the_earliest_of_the_furthest() {
        let s = spec(2, 60 * MIN, FunnelOrder::Ordered);
        let e = events(&s, &[(0, A), (45, A), (90, B)]);
        let r = evaluate(&s, &e);
        assert_eq!(r.level, 2);
        assert_eq!(r.defining.unwrap().start_ms, 45 * MIN);
        let first = FunnelSpec {
            attempt_policy: AttemptPolicy::FirstEntry,
            ..s.clone()
        };
        assert_eq!(evaluate(&first, &e).level, 1);
        // A@0, A@10, B@20: the earliest attempt reaching 2 starts at 0 (time to convert 20).
        let e = events(&s, &[(0, A), (10, A), (20, B)]);
        let d = evaluate(&s, &e).defining.unwrap();
        assert_eq!(d.times, vec![0, 20 * MIN]);
    }

    #[test]
    fn exclusions_drop_the_user_or_end_the_attempt() {
        let mut s = spec(3, 1440 * MIN, FunnelOrder::Ordered);
        s.exclusions = vec![(1, 2)];
        const R: u64 = 8;
        let level = |s: &FunnelSpec, l: &[(i64, u64)]| evaluate(s, &events(s, l)).level;
        let u1 = [(0, A), (1, B), (2, R), (3, C)];
        let u2 = [(0, A), (1, R), (2, B), (3, C)];
        let u3 = [(0, A), (1, B), (2, C), (3, R)];
        assert_eq!(level(&s, &u1), 0);
        assert_eq!(level(&s, &u2), 3);
        assert_eq!(level(&s, &u3), 3);
        s.exclusion_policy = ExclusionPolicy::EndAttempt;
        assert_eq!(level(&s, &u1), 2);
    }

    #[test]
    fn the_window_is_inclusive_and_entries_must_be_in_range() {
        let mut s = spec(2, 60 * MIN, FunnelOrder::Ordered);
        assert_eq!(evaluate(&s, &events(&s, &[(0, A), (60, B)])).level, 2);
        assert_eq!(evaluate(&s, &events(&s, &[(0, A), (61, B)])).level, 1);
        s.entry_start_ms = MIN;
        assert_eq!(evaluate(&s, &events(&s, &[(0, A), (30, B)])).level, 0);
    }
}
