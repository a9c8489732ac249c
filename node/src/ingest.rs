//! Ingestion: SDK payloads in, durable events out.
//!
//! [`segment`] and [`posthog`] turn each SDK's wire format into [`Event`]s and identity merges,
//! checking every event and naming the bad ones by index. [`Ingestor`] then authenticates the
//! write key, registers new property keys (their type is the type of the first value ever seen,
//! decided in the metadata group so every node agrees), applies identity merges, routes each
//! event to the partition of its person and waits until every partition has committed and
//! applied it. Nothing of a rejected batch is written: every check happens before the first
//! proposal.

pub mod posthog;
pub mod segment;

use crate::config::IngestSection;
use crate::metadata::{MetaCommand, MetaResponse, Project};
use crate::server::{NodeShared, ProposeError};
use crate::storage::chunk::StoredEvent;
use crate::storage::partition::IngestOutcome;
use optiprism_types::PersonId;
use optiprism_types::event::{Coerced, Event, PropType};
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::Arc;

/// One rejected event of a batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EventError {
    /// Its position in the batch (0-based).
    pub index: usize,
    /// What is wrong with it.
    pub error: String,
}

/// Why a request was not ingested.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// No or unknown write key.
    #[error("{0}")]
    Unauthorized(String),
    /// The body is not a payload of this API.
    #[error("{0}")]
    Malformed(String),
    /// Some events are invalid; nothing was stored.
    #[error("{} invalid event(s); nothing was stored", .0.len())]
    InvalidEvents(Vec<EventError>),
    /// The body is over the size limit.
    #[error("request body is over the {limit}-byte limit")]
    TooLarge {
        /// The limit in bytes.
        limit: u64,
    },
    /// The events, within the body's limit, take more room in a log entry than it holds.
    #[error("{0}")]
    TooLargeForAnEntry(String),
    /// No leader or shutting down: retry later.
    #[error("{0}")]
    Unavailable(String),
    /// Something broke on our side.
    #[error("{0}")]
    Internal(String),
}

impl IngestError {
    /// A stable code for clients.
    pub fn code(&self) -> &'static str {
        match self {
            IngestError::Unauthorized(_) => "unauthorized",
            IngestError::Malformed(_) => "malformed",
            IngestError::InvalidEvents(_) => "invalid_events",
            IngestError::TooLarge { .. } | IngestError::TooLargeForAnEntry(_) => "too_large",
            IngestError::Unavailable(_) => "unavailable",
            IngestError::Internal(_) => "internal",
        }
    }

    /// Whether the client should retry the same request later.
    pub fn is_retryable(&self) -> bool {
        matches!(self, IngestError::Unavailable(_))
    }
}

impl From<ProposeError> for IngestError {
    fn from(e: ProposeError) -> IngestError {
        if let ProposeError::TooLarge { .. } = e {
            IngestError::TooLargeForAnEntry(e.to_string())
        } else if e.is_retryable() {
            IngestError::Unavailable(e.to_string())
        } else {
            IngestError::Internal(e.to_string())
        }
    }
}

/// A parsed request: events, identity merges, and the write key if the body carried one.
#[derive(Debug, Default)]
pub struct Parsed {
    /// Write key from the body.
    pub write_key: Option<String>,
    /// The events, in request order.
    pub events: Vec<Event>,
    /// `(from, into)`: merge the person of `from` into the person of `into`.
    pub merges: Vec<(String, String)>,
}

/// Context every parser needs: when the request arrived and the limits.
#[derive(Debug, Clone)]
pub struct ParseContext {
    /// Receive time, epoch ms.
    pub received_ms: i64,
    /// Limits.
    pub limits: IngestSection,
}

impl ParseContext {
    /// Applies clock-skew correction and checks the plausible range. `sent_at` is when the
    /// client sent the request by its own clock.
    pub fn event_time(&self, timestamp: Option<i64>, sent_at: Option<i64>) -> Result<i64, String> {
        let mut ts = timestamp.unwrap_or(self.received_ms);
        if let (Some(_), Some(sent)) = (timestamp, sent_at) {
            // The client's clock is off by (sent - received); shift its timestamps back.
            let skew = sent - self.received_ms;
            if skew.unsigned_abs() as u128 >= self.limits.clock_skew_threshold.0.as_millis() {
                ts -= skew;
            }
        }
        let oldest = self.received_ms - self.limits.max_event_age.0.as_millis() as i64;
        let newest = self.received_ms + self.limits.max_future_skew.0.as_millis() as i64;
        if ts < oldest || ts > newest {
            return Err(format!(
                "timestamp {} is outside the accepted range ({} to {})",
                format_ms(ts),
                format_ms(oldest),
                format_ms(newest)
            ));
        }
        Ok(ts)
    }

    /// Checks an event's size.
    pub fn check_size(&self, raw_len: usize) -> Result<(), String> {
        if raw_len as u64 > self.limits.max_event_size.0 {
            return Err(format!(
                "event is {raw_len} bytes, over the {}-byte limit",
                self.limits.max_event_size.0
            ));
        }
        Ok(())
    }
}

fn format_ms(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_else(|| ms.to_string())
}

/// Parses a timestamp: an ISO-8601 string or epoch milliseconds.
pub fn parse_timestamp(v: &serde_json::Value) -> Result<Option<i64>, String> {
    match v {
        serde_json::Value::Null => Ok(None),
        serde_json::Value::String(s) => optiprism_types::event::parse_datetime_ms(s)
            .map(Some)
            .ok_or_else(|| format!("invalid timestamp `{s}` (expected ISO-8601)")),
        serde_json::Value::Number(n) => n
            .as_i64()
            .map(Some)
            .ok_or_else(|| format!("invalid timestamp {n}")),
        other => Err(format!("invalid timestamp {other}")),
    }
}

/// A distinct or message id as SDKs send it: a string, or a number (rendered as text). Empty
/// strings and JSON nulls read as absent.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Id(pub Option<String>);

impl<'de> serde::Deserialize<'de> for Id {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Id;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string or a number")
            }
            fn visit_str<E>(self, v: &str) -> Result<Id, E> {
                Ok(Id((!v.is_empty()).then(|| v.to_string())))
            }
            fn visit_string<E>(self, v: String) -> Result<Id, E> {
                Ok(Id((!v.is_empty()).then_some(v)))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Id, E> {
                Ok(Id(Some(v.to_string())))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Id, E> {
                Ok(Id(Some(v.to_string())))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Id, E> {
                Ok(Id(Some(optiprism_types::event::render_number(v))))
            }
            fn visit_unit<E>(self) -> Result<Id, E> {
                Ok(Id(None))
            }
        }
        d.deserialize_any(V)
    }
}

/// A stable message id for events whose SDK sent none, so retries deduplicate.
pub fn content_id(distinct_id: &str, event: &str, timestamp: i64, raw: &str) -> String {
    let mut buf = Vec::with_capacity(raw.len() + 64);
    buf.extend_from_slice(distinct_id.as_bytes());
    buf.push(0);
    buf.extend_from_slice(event.as_bytes());
    buf.push(0);
    buf.extend_from_slice(&timestamp.to_le_bytes());
    buf.extend_from_slice(raw.as_bytes());
    format!("h-{:032x}", xxhash_rust::xxh3::xxh3_128(&buf))
}

/// The outcome of a request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct IngestSummary {
    /// Events stored now.
    pub accepted: u32,
    /// Events already stored before (same message id).
    pub duplicates: u32,
}

/// Drives a parsed request through the metadata group and the partitions.
#[derive(Debug, Clone)]
pub struct Ingestor {
    node: Arc<NodeShared>,
}

impl Ingestor {
    /// An ingestor of this node.
    pub fn new(node: Arc<NodeShared>) -> Ingestor {
        Ingestor { node }
    }

    /// Authenticates a write key.
    pub fn project(&self, write_key: Option<&str>) -> Result<Project, IngestError> {
        let key = write_key.ok_or_else(|| IngestError::Unauthorized("missing write key".into()))?;
        self.node
            .metadata
            .read(|m| m.project_by_write_key(key).cloned())
            .ok_or_else(|| IngestError::Unauthorized("unknown write key".into()))
    }

    /// Stores the events of `parsed` for `project`; returns once every partition applied them.
    pub async fn ingest(
        &self,
        project: &Project,
        parsed: Parsed,
    ) -> Result<IngestSummary, IngestError> {
        if self.node.is_shutting_down() {
            return Err(IngestError::Unavailable("node is shutting down".into()));
        }
        let p = project.id;
        // 1. Register property keys seen for the first time, with the type of their first value,
        // while the schema has room (a key left out is typed as text below).
        let mut new_keys: Vec<(String, PropType)> = Vec::new();
        let mut over_limit = 0u64;
        let limit = self.node.config.ingest.max_property_keys as usize;
        self.node.metadata.read(|m| {
            let schema = m.schemas.get(&p);
            let mut room = limit.saturating_sub(schema.map_or(0, BTreeMap::len));
            // A request names a few dozen keys over and over: the schema is asked once per key.
            let mut seen = foldhash::HashSet::default();
            for e in &parsed.events {
                for (k, v) in &e.properties {
                    if seen.insert(k.as_str()) && schema.is_none_or(|s| !s.contains_key(k)) {
                        if room > 0 {
                            new_keys.push((k.clone(), PropType::infer(v)));
                            room -= 1;
                        } else {
                            over_limit += 1;
                        }
                    }
                }
            }
        });
        if over_limit > 0 {
            self.node
                .metrics
                .ingest_keys_over_limit
                .fetch_add(over_limit, std::sync::atomic::Ordering::Relaxed);
            warn_keys_over_limit(&project.name, over_limit, limit);
        }
        let mut commands = Vec::new();
        if !new_keys.is_empty() {
            commands.push(MetaCommand::RegisterProperties {
                project: p,
                properties: new_keys,
            });
        }
        // 2. Identity merges, before routing, so later events of a merged id go to its person.
        for (from, into) in &parsed.merges {
            commands.push(MetaCommand::Merge {
                project: p,
                from: from.clone(),
                into: into.clone(),
            });
        }
        if !commands.is_empty() {
            let response = self
                .node
                .propose_metadata(MetaCommand::Batch(commands))
                .await?;
            if let MetaResponse::Batch(rs) = &response {
                for r in rs {
                    if let MetaResponse::MergeRefused(why) = r {
                        tracing::info!(project = %project.name, reason = %why, "identity merge refused");
                    }
                }
            }
        }
        // 3. Type, resolve and route (moving the parsed events, not copying them).
        let partitions = self.node.partition_count();
        let mut routed: BTreeMap<u32, Vec<StoredEvent>> = BTreeMap::new();
        let events = parsed.events;
        self.node.metadata.read(|m| {
            let empty = BTreeMap::new();
            let schema = m.schemas.get(&p).unwrap_or(&empty);
            let ids = m.identities.get(&p);
            let mut person_cache: foldhash::HashMap<String, PersonId> =
                foldhash::HashMap::default();
            // The committed schema's type of each key, asked once per key of the request.
            let mut types: foldhash::HashMap<String, PropType> = foldhash::HashMap::default();
            for e in events {
                let person = match person_cache.get(&e.distinct_id) {
                    Some(p) => *p,
                    None => {
                        let person = match ids {
                            Some(ids) => ids.person_of(p, &e.distinct_id),
                            None => PersonId::of_distinct_id(p, &e.distinct_id),
                        };
                        person_cache.insert(e.distinct_id.clone(), person);
                        person
                    }
                };
                let props = e
                    .properties
                    .into_iter()
                    .map(|(k, v)| {
                        let ty = match types.get(k.as_str()) {
                            Some(ty) => *ty,
                            None => {
                                let ty = schema.get(&k).map_or(PropType::String, |s| s.ty);
                                types.insert(k.clone(), ty);
                                ty
                            }
                        };
                        let value = Coerced::new(v, ty);
                        (k, value)
                    })
                    .collect();
                routed
                    .entry(person.partition(partitions).0)
                    .or_default()
                    .push(StoredEvent {
                        message_id: e.message_id,
                        distinct_id: e.distinct_id,
                        person_id: person.0,
                        event: e.event,
                        timestamp_ms: e.timestamp_ms,
                        props,
                        person_set: e.person_set,
                        person_set_once: e.person_set_once,
                    });
            }
        });
        // 4. Propose to every partition at once; answer after all of them applied.
        let proposals = routed.into_iter().map(|(partition, events)| {
            let node = Arc::clone(&self.node);
            async move {
                node.propose_events(optiprism_types::PartitionId(partition), p, events)
                    .await
            }
        });
        let outcomes: Vec<IngestOutcome> = futures::future::try_join_all(proposals).await?;
        let mut summary = IngestSummary::default();
        for o in outcomes {
            summary.accepted += o.accepted;
            summary.duplicates += o.duplicates;
        }
        self.node
            .metrics
            .record_ingest(summary.accepted, summary.duplicates);
        Ok(summary)
    }
}

/// Logs that a project's schema is full, at most once a minute per node: a client sending
/// made-up keys would otherwise log a line per request.
fn warn_keys_over_limit(project: &str, keys: u64, limit: usize) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST_WARNED_SECS: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let last = LAST_WARNED_SECS.load(Ordering::Relaxed);
    if now >= last + 60
        && LAST_WARNED_SECS
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        tracing::warn!(
            project,
            keys,
            limit,
            "the project's property schema is full (ingest.max-property-keys): new keys are stored as text without joining it"
        );
    }
}

/// Collects per-event errors; `finish` fails with all of them at once.
#[derive(Debug, Default)]
pub struct ErrorList(pub Vec<EventError>);

impl ErrorList {
    /// Records an error of event `index`.
    pub fn push(&mut self, index: usize, error: impl Into<String>) {
        self.0.push(EventError {
            index,
            error: error.into(),
        });
    }

    /// `Ok` when nothing was recorded.
    pub fn finish(self) -> Result<(), IngestError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(IngestError::InvalidEvents(self.0))
        }
    }
}

/// A parse context at a fixed receive time with default limits, for parser tests.
#[cfg(test)]
pub(crate) fn test_context() -> ParseContext {
    ParseContext {
        received_ms: 1_700_000_000_000,
        limits: IngestSection::default(),
    }
}
