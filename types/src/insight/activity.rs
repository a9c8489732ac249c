//! Stickiness (§5) and lifecycle (§6): a unit's active periods and what they make it.

use super::UnitEvent;
use crate::time::Buckets;

/// The periods (bucket indices, ascending, distinct) in which a unit did the event at least
/// `min_per_period` times; events outside the buckets are ignored.
pub fn active_periods(buckets: &Buckets, events: &[UnitEvent], min_per_period: u64) -> Vec<usize> {
    let mut out = Vec::new();
    let mut current: Option<(usize, u64)> = None;
    let flush = |c: Option<(usize, u64)>, out: &mut Vec<usize>| {
        if let Some((b, n)) = c
            && n >= min_per_period
        {
            out.push(b);
        }
    };
    for e in events {
        let Some(b) = buckets.index_of(e.ts) else {
            continue;
        };
        match &mut current {
            Some((cb, n)) if *cb == b => *n += 1,
            _ => {
                flush(current.take(), &mut out);
                current = Some((b, 1));
            }
        }
    }
    flush(current, &mut out);
    out
}

/// Stickiness counts: `histogram[k - 1]` units were active in exactly `k` periods.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stickiness {
    /// Units active in exactly k periods, k = 1..=K.
    pub histogram: Vec<u64>,
}

impl Stickiness {
    /// An empty histogram over `periods` periods.
    pub fn new(periods: usize) -> Stickiness {
        Stickiness {
            histogram: vec![0; periods],
        }
    }

    /// Adds a unit active in `active` periods.
    pub fn add(&mut self, active: usize) {
        if active > 0 {
            self.histogram[active - 1] += 1;
        }
    }

    /// Units active in at least k periods.
    pub fn cumulative(&self) -> Vec<u64> {
        let mut out = self.histogram.clone();
        for k in (0..out.len().saturating_sub(1)).rev() {
            out[k] += out[k + 1];
        }
        out
    }
}

/// Lifecycle counts per displayed period.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lifecycle {
    /// First active period of the unit.
    pub new: Vec<u64>,
    /// Active now and in the period before.
    pub returning: Vec<u64>,
    /// Active now, not in the period before, and not new.
    pub resurrecting: Vec<u64>,
    /// Not active now but in the period before (reported as a negative number).
    pub dormant: Vec<u64>,
}

/// Where a unit was first seen, relative to the displayed periods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FirstSeen {
    /// Before the period preceding the first displayed one.
    Earlier,
    /// In the period preceding the first displayed one.
    Previous,
    /// In displayed period `i`.
    At(usize),
    /// After the range.
    Later,
}

impl Lifecycle {
    /// Empty counts for `periods` periods.
    pub fn new(periods: usize) -> Lifecycle {
        Lifecycle {
            new: vec![0; periods],
            returning: vec![0; periods],
            resurrecting: vec![0; periods],
            dormant: vec![0; periods],
        }
    }

    /// Adds a unit: `active_before` says whether it was active in the period preceding the
    /// first displayed one, `active` lists its displayed active periods (ascending).
    pub fn add(&mut self, first_seen: FirstSeen, active_before: bool, active: &[usize]) {
        let periods = self.new.len();
        let mut previous = active_before;
        let mut next = active.iter().peekable();
        for p in 0..periods {
            let now = next.next_if(|&&a| a == p).is_some();
            if now {
                if first_seen == FirstSeen::At(p) {
                    self.new[p] += 1;
                } else if previous {
                    self.returning[p] += 1;
                } else {
                    self.resurrecting[p] += 1;
                }
            } else if previous {
                self.dormant[p] += 1;
            }
            previous = now;
        }
    }

    /// Adds another unit set's counts.
    pub fn merge(&mut self, other: &Lifecycle) {
        for (a, b) in [
            (&mut self.new, &other.new),
            (&mut self.returning, &other.returning),
            (&mut self.resurrecting, &other.resurrecting),
            (&mut self.dormant, &other.dormant),
        ] {
            for (x, y) in a.iter_mut().zip(b) {
                *x += y;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stickiness_follows_the_spec_example() {
        let mut s = Stickiness::new(5);
        for active in [3, 1, 5, 2] {
            s.add(active);
        }
        assert_eq!(s.histogram, vec![1, 1, 1, 0, 1]);
        assert_eq!(s.cumulative(), vec![4, 3, 2, 1, 1]);
    }

    #[test]
    fn lifecycle_follows_example_6a() {
        // Range Jan 2-5 (periods 0..4); the period before is Jan 1.
        let mut l = Lifecycle::new(4);
        l.add(FirstSeen::Previous, true, &[0, 1]); // u1: Jan 1, 2, 3
        l.add(FirstSeen::At(1), false, &[1, 3]); // u2: Jan 3, 5
        l.add(FirstSeen::Earlier, false, &[2]); // u3: visit Dec 20, use Jan 4
        l.add(FirstSeen::At(0), false, &[0]); // u4: Jan 2
        l.add(FirstSeen::At(2), false, &[3]); // u5: visit Jan 4, use Jan 5
        assert_eq!(l.new, vec![1, 1, 0, 0]);
        assert_eq!(l.returning, vec![1, 1, 0, 0]);
        assert_eq!(l.resurrecting, vec![0, 0, 1, 2]);
        assert_eq!(l.dormant, vec![0, 1, 2, 1]);
    }
}
