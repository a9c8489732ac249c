//! Per-unit evaluation of the person-level insights (`spec/analytics.md` §3–§8), as pure
//! functions over one unit's events sorted by time.
//!
//! The query engine reads and filters events, tags each with the predicates it satisfies (one
//! bit per funnel step, exclusion, retention start/return, ...), resolves the unit (person after
//! identity merges), and hands each unit's events here. Keeping the semantics in plain Rust,
//! free of I/O and of DataFusion, lets property tests check them against the from-scratch
//! references of [`reference`] over many random logs in seconds.

pub mod activity;
pub mod cohort;
pub mod funnel;
pub mod paths;
#[cfg(test)]
mod properties;
pub mod reference;
pub mod retention;

/// One event of a unit, as the evaluators see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UnitEvent {
    /// Event instant, epoch ms.
    pub ts: i64,
    /// Bit `i` set when the event satisfies the insight's predicate `i`.
    pub tags: u64,
    /// An interned value the insight attaches (breakdown value, path item); [`NO_VALUE`] when
    /// the property is not set.
    pub value: u32,
}

/// The interned value of an event without the property.
pub const NO_VALUE: u32 = 0;

/// `part / whole` as a percentage rounded to 2 decimals; `None` when `whole` is 0.
pub fn pct(part: f64, whole: f64) -> Option<f64> {
    if whole == 0.0 {
        None
    } else {
        Some(crate::stats::round_to(part / whole * 100.0, 2))
    }
}

/// Rounds to 4 decimals (averages and percentiles in answers).
pub fn round4(x: f64) -> f64 {
    crate::stats::round_to(x, 4)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentages_round_to_two_decimals() {
        assert_eq!(pct(2.0, 3.0), Some(66.67));
        assert_eq!(pct(1.0, 0.0), None);
    }
}
