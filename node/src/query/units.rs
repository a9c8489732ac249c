//! Per-unit event streams for the person-level insights (funnels, retention, stickiness,
//! lifecycle, paths, cohorts).
//!
//! One DataFusion plan per request reads the partitions (pruned by time and, unless the
//! insight needs every event, by event name), keeps the events that match any of the
//! insight's selectors, and computes per event: its instant, its unit (person after identity
//! merges), a tag with bit `i` set when selector `i` matches, and the requested values as
//! strings. The rows are then grouped by unit and sorted by time here, and each unit's events
//! go to the pure evaluators of `optiprism_types::insight`.

use crate::metadata::Project;
use crate::query::filter::{ColumnLookup, all_of, named, referenced_keys, rendered};
use crate::query::frame::{RowsLookup, project};
use crate::query::udf::{IdentityUdf, IdentityView};
use crate::query::{QueryEngine, QueryFailure};
use crate::storage::partition::FoldHasher;
use crate::storage::partition::ProjectRows;
use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{DataType, Int64Type, UInt64Type};
use datafusion::datasource::MemTable;
use datafusion::execution::SendableRecordBatchStream;
use datafusion::logical_expr::{Expr, lit, when};
use datafusion::prelude::cast;
use futures::TryStreamExt;
use optiprism_types::insight::{NO_VALUE, UnitEvent};
use optiprism_types::query::behaviour::EventSelector;
use std::collections::HashMap;
use std::hash::BuildHasherDefault;
use std::sync::Arc;

/// Interned strings; id 0 ([`NO_VALUE`]) is "not set".
#[derive(Debug, Default)]
pub struct Interner {
    ids: HashMap<String, u32>,
    names: Vec<String>,
}

impl Interner {
    /// The id of `s`.
    pub fn intern(&mut self, s: &str) -> u32 {
        if let Some(id) = self.ids.get(s) {
            return *id;
        }
        self.names.push(s.to_string());
        let id = self.names.len() as u32;
        self.ids.insert(s.to_string(), id);
        id
    }

    /// The string of `id` (`None` for [`NO_VALUE`]).
    pub fn name(&self, id: u32) -> Option<&str> {
        if id == NO_VALUE {
            None
        } else {
            self.names.get(id as usize - 1).map(String::as_str)
        }
    }
}

/// What to read.
#[derive(Debug, Clone)]
pub struct StreamSpec<'a> {
    /// Events in `[start_ms, end_ms)`.
    pub start_ms: i64,
    /// End, exclusive.
    pub end_ms: i64,
    /// Selector `i` sets tag bit `i`.
    pub selectors: Vec<&'a EventSelector>,
    /// Keep events matching no selector too (strict funnels see the whole stream).
    pub all_events: bool,
    /// Per event, the value of each of these (strings; not set → `None`).
    pub values: Vec<ValueSource>,
    /// Count units by the raw distinct id each event was sent with, ignoring identity merges
    /// (the identity report shows what merges change).
    pub raw_persons: bool,
}

impl<'a> StreamSpec<'a> {
    /// The events of `[start_ms, end_ms)` matching `selectors`, by person after merges, with no
    /// values; the other fields are set with struct update syntax where an insight needs them.
    pub fn new(start_ms: i64, end_ms: i64, selectors: Vec<&'a EventSelector>) -> StreamSpec<'a> {
        StreamSpec {
            start_ms,
            end_ms,
            selectors,
            all_events: false,
            values: Vec::new(),
            raw_persons: false,
        }
    }
}

/// A value read per event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ValueSource {
    /// An event property, rendered as a string.
    Property(String),
    /// The current value of a property of the event's person, rendered.
    PersonProperty(String),
    /// The event name.
    EventName,
}

/// The events of every unit, grouped by unit and sorted by time.
#[derive(Debug, Default)]
pub struct UnitStreams {
    /// Unit ids, one per group (ascending within each plan partition's groups).
    pub units: Vec<u64>,
    /// `offsets[i]..offsets[i + 1]` are unit `i`'s events.
    pub offsets: Vec<usize>,
    /// All events; `value` is the first requested value's id.
    pub events: Vec<UnitEvent>,
    /// Per requested value beyond the first, one id per event (same order as `events`).
    pub more_values: Vec<Vec<u32>>,
    /// The strings of every value id.
    pub interner: Interner,
}

impl UnitStreams {
    /// Unit `i`'s id and events.
    pub fn unit(&self, i: usize) -> (u64, &[UnitEvent]) {
        (
            self.units[i],
            &self.events[self.offsets[i]..self.offsets[i + 1]],
        )
    }

    /// Number of units.
    pub fn len(&self) -> usize {
        self.units.len()
    }

    /// True when no unit has events.
    pub fn is_empty(&self) -> bool {
        self.units.is_empty()
    }

    /// Value `k` (in the order the values were requested) of the event at `at`.
    pub fn value(&self, at: usize, k: usize) -> u32 {
        if k == 0 {
            self.events[at].value
        } else {
            self.more_values[k - 1][at]
        }
    }

    /// The range of unit `i` in `events`.
    pub fn range(&self, i: usize) -> std::ops::Range<usize> {
        self.offsets[i]..self.offsets[i + 1]
    }
}

fn selector_predicate(s: &EventSelector, lookup: &RowsLookup<'_>) -> Expr {
    let mut parts = Vec::new();
    if let Some(event) = &s.event {
        parts.push(named("event").eq(lit(event.clone())));
    }
    parts.extend(all_of(&s.filters, lookup));
    parts.into_iter().reduce(Expr::and).unwrap_or(lit(true))
}

/// Reads the unit streams `spec` asks for.
pub async fn read(
    engine: &QueryEngine,
    project: &Project,
    spec: &StreamSpec<'_>,
) -> Result<UnitStreams, QueryFailure> {
    let names: Option<Vec<String>> =
        if spec.all_events || spec.selectors.iter().any(|s| s.event.is_none()) {
            None
        } else {
            let mut n: Vec<String> = spec
                .selectors
                .iter()
                .filter_map(|s| s.event.clone())
                .collect();
            n.sort();
            n.dedup();
            Some(n)
        };
    let parts = engine
        .rows(project, spec.start_ms, spec.end_ms, names.as_deref())
        .await?;
    let identities = Arc::new(engine.identity_view(project.id));
    let (streams, inputs) = plan(engine, &parts, spec, Arc::clone(&identities)).await?;
    let outputs = streams.len();
    let values = spec.values.len();
    // Each output partition of the plan is grouped on its own task; units split across
    // partitions (identity merges) are joined afterwards.
    let tasks: Vec<_> = streams
        .into_iter()
        .map(|stream| {
            tokio::spawn(async move {
                let batches: Vec<RecordBatch> = stream.try_collect().await?;
                Ok::<_, datafusion::error::DataFusionError>(group(batches, values))
            })
        })
        .collect();
    let mut partials = Vec::with_capacity(tasks.len());
    for t in tasks {
        partials.push(
            t.await
                .map_err(|e| QueryFailure::Internal(format!("grouping task failed: {e}")))??,
        );
    }
    // A person's events can sit in several partitions only through identity merges (or, by
    // raw distinct id, when a merge moved an id's later events to another partition).
    let may_split = spec.raw_persons || !identities.merged.is_empty() || outputs != inputs;
    let mut merged = merge(partials, values, may_split);
    canonicalize(&mut merged);
    Ok(merged)
}

async fn plan(
    engine: &QueryEngine,
    parts: &[ProjectRows],
    spec: &StreamSpec<'_>,
    identities: Arc<IdentityView>,
) -> Result<(Vec<SendableRecordBatchStream>, usize), QueryFailure> {
    if parts.iter().all(|p| p.batches.is_empty()) {
        return Ok((Vec::new(), 0));
    }
    let lookup = RowsLookup {
        parts,
        now_ms: chrono::Utc::now().timestamp_millis(),
        identities: &identities,
    };
    let mut keys = Vec::new();
    for s in &spec.selectors {
        referenced_keys(&s.filters, &mut keys);
    }
    for v in &spec.values {
        if let ValueSource::Property(k) = v {
            keys.push(k.clone());
        }
    }
    let mut columns: Vec<String> = vec![
        "timestamp".into(),
        "event".into(),
        "person_id".into(),
        "distinct_id".into(),
    ];
    for k in &keys {
        let cols = lookup.property(k);
        columns.extend(cols.typed.map(|(n, _)| n));
        columns.extend(cols.text);
    }
    columns.sort();
    columns.dedup();
    let (schema, partitions) = project(parts, &columns);
    let partitions: Vec<Vec<RecordBatch>> =
        partitions.into_iter().filter(|p| !p.is_empty()).collect();
    let inputs = partitions.len();
    let table = MemTable::try_new(schema, partitions)?;
    // Output partition i must read input partition i only: a round-robin repartition would
    // spread one person's batches over several outputs, and `merge` joins a person's groups
    // only when identity merges can split them (it checks the counts match too).
    let mut state = engine.state.clone();
    state
        .config_mut()
        .options_mut()
        .optimizer
        .enable_round_robin_repartition = false;
    let ctx = datafusion::prelude::SessionContext::new_with_state(state);
    let mut df = ctx.read_table(Arc::new(table))?;
    let ts = cast(named("timestamp"), DataType::Int64);
    let mut predicate = ts
        .clone()
        .gt_eq(lit(spec.start_ms))
        .and(ts.clone().lt(lit(spec.end_ms)));
    // Each selector's predicate tags the events; unless every event is kept, their OR filters.
    let predicates: Vec<Expr> = spec
        .selectors
        .iter()
        .map(|s| selector_predicate(s, &lookup))
        .collect();
    let tags = predicates
        .iter()
        .enumerate()
        .map(|(i, p)| {
            when(p.clone(), lit(1i64 << i))
                .otherwise(lit(0i64))
                .expect("a case with an else")
        })
        .reduce(|a, b| a + b)
        .unwrap_or(lit(0i64));
    if !spec.all_events {
        let any = predicates
            .into_iter()
            .reduce(Expr::or)
            .unwrap_or(lit(false));
        predicate = predicate.and(any);
    }
    df = df.filter(predicate)?;
    let unit = if spec.raw_persons {
        cast(named("distinct_id"), DataType::Utf8)
    } else {
        IdentityUdf::resolve(Arc::clone(&identities)).call(vec![named("person_id")])
    };
    let mut select = vec![ts.alias("ts"), unit.alias("p"), tags.alias("tags")];
    for (i, v) in spec.values.iter().enumerate() {
        let e = match v {
            ValueSource::Property(k) => rendered(&lookup.property(k)),
            ValueSource::PersonProperty(k) => rendered(&lookup.person_property(k)),
            ValueSource::EventName => cast(named("event"), DataType::Utf8),
        };
        select.push(cast(e, DataType::Utf8).alias(format!("v{i}")));
    }
    let streams = df.select(select)?.execute_stream_partitioned().await?;
    Ok((streams, inputs))
}

/// Groups rows by unit and sorts each unit's events by time (then tags and value, so the
/// order does not depend on partition or arrival order). Value ids are local to the result.
fn group(batches: Vec<RecordBatch>, values: usize) -> UnitStreams {
    let mut interner = Interner::default();
    let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
    let mut keyed: Vec<(u64, UnitEvent, usize)> = Vec::with_capacity(rows);
    let mut extra: Vec<Vec<u32>> = vec![Vec::with_capacity(rows); values.saturating_sub(1)];
    for b in &batches {
        let ts = b.column(0).as_primitive::<Int64Type>();
        let p = b.column(1);
        let tags = b.column(2).as_primitive::<Int64Type>();
        let vals: Vec<_> = (0..values)
            .map(|i| b.column(3 + i).as_string::<i32>())
            .collect();
        for r in 0..b.num_rows() {
            let mut ids = vals.iter().map(|v| {
                if v.is_null(r) {
                    NO_VALUE
                } else {
                    interner.intern(v.value(r))
                }
            });
            let value = ids.next().unwrap_or(NO_VALUE);
            let at = keyed.len();
            for (i, id) in ids.enumerate() {
                extra[i].push(id);
            }
            let unit = match p.data_type() {
                DataType::UInt64 => p.as_primitive::<UInt64Type>().value(r),
                // Raw distinct ids: their hash names the unit (only distinctness matters).
                _ => xxhash_rust::xxh3::xxh3_64(p.as_string::<i32>().value(r).as_bytes()),
            };
            keyed.push((
                unit,
                UnitEvent {
                    ts: ts.value(r),
                    tags: tags.value(r) as u64,
                    value,
                },
                at,
            ));
        }
    }
    // Stable, so equal events keep their input order; the input is a concatenation of runs
    // already sorted by (person, time) (sealed chunks sort by event, person, time), which the
    // stable sort merges instead of sorting from scratch.
    keyed.sort_by_key(|(p, e, _)| (*p, e.ts, e.tags, e.value));
    let mut out = UnitStreams {
        interner,
        more_values: vec![Vec::with_capacity(rows); extra.len()],
        ..UnitStreams::default()
    };
    out.events.reserve(rows);
    for (p, e, at) in keyed {
        if out.units.last() != Some(&p) {
            out.units.push(p);
            out.offsets.push(out.events.len());
        }
        out.events.push(e);
        for (i, col) in extra.iter().enumerate() {
            out.more_values[i].push(col[at]);
        }
    }
    out.offsets.push(out.events.len());
    out
}

/// Joins the groups of several plan partitions into one: value ids are renumbered into one
/// interner, and a unit found in several partitions (its events were stamped with persons
/// merged later) gets one group with its events in order.
fn merge(partials: Vec<UnitStreams>, values: usize, may_split: bool) -> UnitStreams {
    let mut partials = partials;
    partials.retain(|p| !p.is_empty());
    if partials.len() == 1 {
        return partials.pop().expect("one partial");
    }
    let mut out = UnitStreams {
        more_values: vec![Vec::new(); values.saturating_sub(1)],
        ..UnitStreams::default()
    };
    let total: usize = partials.iter().map(|p| p.events.len()).sum();
    out.events.reserve(total);
    if !may_split {
        // Every person's events are in one partition: the groups only need concatenating.
        for p in partials {
            let remap = remap_values(&p, &mut out.interner);
            let base = out.events.len();
            out.units.extend_from_slice(&p.units);
            out.offsets
                .extend(p.offsets[..p.units.len()].iter().map(|o| o + base));
            match &remap {
                None => out.events.extend_from_slice(&p.events),
                Some(remap) => out.events.extend(p.events.iter().map(|e| UnitEvent {
                    value: remap[e.value as usize],
                    ..*e
                })),
            }
            for (c, col) in p.more_values.iter().enumerate() {
                out.more_values[c].extend(col.iter().map(|v| match &remap {
                    None => *v,
                    Some(remap) => remap[*v as usize],
                }));
            }
        }
        out.offsets.push(out.events.len());
        return out;
    }
    let mut seen: HashMap<u64, u32, BuildHasherDefault<FoldHasher>> = HashMap::default();
    for p in &partials {
        for u in &p.units {
            *seen.entry(*u).or_default() += 1;
        }
    }
    type Split = Vec<(UnitEvent, Vec<u32>)>;
    let mut split: std::collections::BTreeMap<u64, Split> = std::collections::BTreeMap::new();
    for p in partials {
        let remap: Vec<u32> = std::iter::once(NO_VALUE)
            .chain(p.interner.names.iter().map(|n| out.interner.intern(n)))
            .collect();
        for i in 0..p.len() {
            let unit = p.units[i];
            let range = p.range(i);
            if seen[&unit] > 1 {
                let entry = split.entry(unit).or_default();
                for at in range {
                    let mut e = p.events[at];
                    e.value = remap[e.value as usize];
                    let more = p
                        .more_values
                        .iter()
                        .map(|c| remap[c[at] as usize])
                        .collect();
                    entry.push((e, more));
                }
                continue;
            }
            out.units.push(unit);
            out.offsets.push(out.events.len());
            for at in range {
                let mut e = p.events[at];
                e.value = remap[e.value as usize];
                out.events.push(e);
                for (c, col) in p.more_values.iter().enumerate() {
                    out.more_values[c].push(remap[col[at] as usize]);
                }
            }
        }
    }
    for (unit, mut events) in split {
        events.sort_by_key(|(e, more)| (e.ts, e.tags, e.value, more.clone()));
        out.units.push(unit);
        out.offsets.push(out.events.len());
        for (e, more) in events {
            out.events.push(e);
            for (c, v) in more.into_iter().enumerate() {
                out.more_values[c].push(v);
            }
        }
    }
    out.offsets.push(out.events.len());
    out
}

/// The renumbering of a partial's value ids into `into`; `None` when it has no values.
fn remap_values(p: &UnitStreams, into: &mut Interner) -> Option<Vec<u32>> {
    if p.interner.names.is_empty() {
        return None;
    }
    Some(
        std::iter::once(NO_VALUE)
            .chain(p.interner.names.iter().map(|n| into.intern(n)))
            .collect(),
    )
}

/// Numbers values in string order and re-sorts each unit's events by (time, tags, values), so
/// events sharing an instant come in the same order whichever partitions they were read from
/// (and answers do not depend on the number of partitions or nodes).
fn canonicalize(streams: &mut UnitStreams) {
    if streams.interner.names.is_empty() {
        return;
    }
    let mut order: Vec<u32> = (1..=streams.interner.names.len() as u32).collect();
    order.sort_by(|a, b| {
        streams.interner.names[*a as usize - 1].cmp(&streams.interner.names[*b as usize - 1])
    });
    let mut renumber = vec![NO_VALUE; order.len() + 1];
    for (rank, old) in order.iter().enumerate() {
        renumber[*old as usize] = rank as u32 + 1;
    }
    let names = std::mem::take(&mut streams.interner.names);
    let mut interner = Interner::default();
    for old in &order {
        interner.intern(&names[*old as usize - 1]);
    }
    streams.interner = interner;
    for e in &mut streams.events {
        e.value = renumber[e.value as usize];
    }
    for col in &mut streams.more_values {
        for v in col.iter_mut() {
            *v = renumber[*v as usize];
        }
    }
    let mut index: Vec<usize> = Vec::new();
    for i in 0..streams.len() {
        let range = streams.range(i);
        if range.len() < 2 {
            continue;
        }
        index.clear();
        index.extend(range.clone());
        let key = |at: usize| {
            let e = streams.events[at];
            (e.ts, e.tags, e.value)
        };
        index.sort_by(|&a, &b| {
            key(a).cmp(&key(b)).then_with(|| {
                streams
                    .more_values
                    .iter()
                    .map(|c| c[a].cmp(&c[b]))
                    .find(|o| o.is_ne())
                    .unwrap_or(std::cmp::Ordering::Equal)
            })
        });
        if index.iter().copied().eq(range.clone()) {
            continue;
        }
        let events: Vec<UnitEvent> = index.iter().map(|&at| streams.events[at]).collect();
        streams.events[range.clone()].copy_from_slice(&events);
        for col in &mut streams.more_values {
            let sorted: Vec<u32> = index.iter().map(|&at| col[at]).collect();
            col[range.clone()].copy_from_slice(&sorted);
        }
    }
}
