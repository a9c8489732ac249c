//! User paths (§7): a unit's events become path instances, instances become weighted edges
//! between position-indexed nodes.
//!
//! Pipeline per unit (events sorted by time, items already cleaned): split into instances at
//! gaps of at least the session gap; collapse consecutive repeats keeping the last event of each
//! run (PostHog's rule, which sets edge timings); cut at the first start point and/or after the
//! first end point, dropping instances without them; keep the first `step_limit` items (the
//! last ones when only an end point is set). Edge weights count instances, not units.

use std::collections::BTreeMap;

/// What a paths evaluation needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathsSpec {
    /// A gap this long or longer (ms) starts a new instance.
    pub session_gap_ms: i64,
    /// Items kept per instance.
    pub step_limit: usize,
    /// Instances start at the first occurrence of this item.
    pub start_point: Option<u32>,
    /// Instances end at the first occurrence of this item.
    pub end_point: Option<u32>,
}

/// A node: `(position, item)`, positions from 1.
pub type Node = (usize, u32);

/// Edge and drop-off totals, keyed by `(position, item)` nodes (positions from 1).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PathGraph {
    /// `(source, target)` → (instances, sum of ms between the two events).
    pub edges: BTreeMap<(Node, Node), (u64, i64)>,
    /// Node → instances ending there.
    pub dropoffs: BTreeMap<Node, u64>,
}

impl PathGraph {
    /// Adds another graph's totals.
    pub fn merge(&mut self, other: PathGraph) {
        for (k, (n, ms)) in other.edges {
            let e = self.edges.entry(k).or_default();
            e.0 += n;
            e.1 += ms;
        }
        for (k, n) in other.dropoffs {
            *self.dropoffs.entry(k).or_default() += n;
        }
    }
}

/// The instances of one unit: `(ts, item)` sorted by time.
pub fn instances(spec: &PathsSpec, events: &[(i64, u32)]) -> Vec<Vec<(i64, u32)>> {
    let mut out: Vec<Vec<(i64, u32)>> = Vec::new();
    let mut current: Vec<(i64, u32)> = Vec::new();
    for &(ts, item) in events {
        if let Some(&(last_ts, last_item)) = current.last() {
            if ts - last_ts >= spec.session_gap_ms {
                out.push(std::mem::take(&mut current));
            } else if last_item == item {
                // Keep the last event of a run of repeats.
                current.pop();
            }
        }
        current.push((ts, item));
    }
    if !current.is_empty() {
        out.push(current);
    }
    out.into_iter()
        .filter_map(|mut inst| {
            if let Some(start) = spec.start_point {
                let at = inst.iter().position(|(_, i)| *i == start)?;
                inst.drain(..at);
            }
            if let Some(end) = spec.end_point {
                let at = inst.iter().position(|(_, i)| *i == end)?;
                inst.truncate(at + 1);
            }
            if inst.len() > spec.step_limit {
                if spec.end_point.is_some() && spec.start_point.is_none() {
                    inst.drain(..inst.len() - spec.step_limit);
                } else {
                    inst.truncate(spec.step_limit);
                }
            }
            Some(inst)
        })
        .collect()
}

/// Adds one unit's instances to `graph`.
pub fn add_unit(spec: &PathsSpec, events: &[(i64, u32)], graph: &mut PathGraph) {
    for inst in instances(spec, events) {
        for (pos, pair) in inst.windows(2).enumerate() {
            let e = graph
                .edges
                .entry(((pos + 1, pair[0].1), (pos + 2, pair[1].1)))
                .or_default();
            e.0 += 1;
            e.1 += pair[1].0 - pair[0].0;
        }
        if let Some(&(_, last)) = inst.last() {
            *graph.dropoffs.entry((inst.len(), last)).or_default() += 1;
        }
    }
}

/// One edge of the answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Edge {
    /// Source node.
    pub source: (usize, u32),
    /// Target node.
    pub target: (usize, u32),
    /// Instances traversing it.
    pub value: u64,
    /// Average seconds between the two events.
    pub avg_seconds: f64,
}

/// The heaviest `limit` edges within the weight bounds (ties by node order), keeping only
/// edges reachable from a position-1 node.
pub fn top_edges(graph: &PathGraph, limit: usize, min: Option<u64>, max: Option<u64>) -> Vec<Edge> {
    let mut edges: Vec<Edge> = graph
        .edges
        .iter()
        .filter(|(_, (n, _))| min.is_none_or(|m| *n >= m) && max.is_none_or(|m| *n <= m))
        .map(|(&(source, target), &(value, ms))| Edge {
            source,
            target,
            value,
            avg_seconds: super::round4(ms as f64 / value as f64 / 1000.0),
        })
        .collect();
    // Sort by weight, then by node position and item id for determinism; callers re-sort
    // equal weights by their labels.
    edges.sort_by(|a, b| {
        b.value
            .cmp(&a.value)
            .then(a.source.cmp(&b.source))
            .then(a.target.cmp(&b.target))
    });
    edges.truncate(limit);
    let mut reachable: std::collections::BTreeSet<(usize, u32)> = std::collections::BTreeSet::new();
    let mut by_position: Vec<&Edge> = edges.iter().collect();
    by_position.sort_by_key(|e| e.source.0);
    for e in by_position {
        if e.source.0 == 1 || reachable.contains(&e.source) {
            reachable.insert(e.target);
        }
    }
    edges.retain(|e| e.source.0 == 1 || reachable.contains(&e.source));
    edges
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: i64 = 60_000;

    #[test]
    fn example_7a_edges_and_dropoffs() {
        let (home, pricing, signup, blog, docs) = (1, 2, 3, 4, 5);
        let spec = PathsSpec {
            session_gap_ms: 30 * MIN,
            step_limit: 5,
            start_point: None,
            end_point: None,
        };
        let units = [
            vec![
                (0, home),
                (MIN, pricing),
                (2 * MIN, pricing),
                (3 * MIN, signup),
            ],
            vec![(0, home), (2 * MIN, blog), (3 * MIN, pricing)],
            vec![
                (0, home),
                (5 * MIN, pricing),
                (60 * MIN, home),
                (61 * MIN, docs),
            ],
        ];
        let mut g = PathGraph::default();
        for u in &units {
            add_unit(&spec, u, &mut g);
        }
        let edges = top_edges(&g, 50, None, None);
        assert_eq!(edges[0].value, 2);
        assert_eq!(edges[0].avg_seconds, 210.0);
        assert_eq!(edges.len(), 5);
        assert_eq!(g.dropoffs.get(&(2, pricing)), Some(&1));
        assert_eq!(g.dropoffs.get(&(3, signup)), Some(&1));
        let start = PathsSpec {
            start_point: Some(pricing),
            ..spec
        };
        let mut g = PathGraph::default();
        for u in &units {
            add_unit(&start, u, &mut g);
        }
        assert_eq!(g.edges.len(), 1);
        assert_eq!(g.dropoffs.get(&(1, pricing)), Some(&2));
    }
}
