//! Query planning and execution on DataFusion: the JSON insight queries and SQL.
//!
//! Queries run on their own tokio runtime (see `server`), never on the one that drives Raft,
//! so a heavy query cannot delay heartbeats into spurious elections.

pub mod filter;
pub mod frame;
pub mod insights;
pub mod sql;
pub mod trends;
pub mod udf;
pub mod units;

use crate::metadata::{MetadataHandle, Project};
use crate::storage::partition::{PartitionData, PersonRow, ProjectRows};
use arrow::array::{
    ArrayRef, Float64Builder, RecordBatch, StringArray, StringBuilder, TimestampMillisecondBuilder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::prelude::{SessionConfig, SessionContext};
use optiprism_types::answer::TrendsAnswer;
use optiprism_types::query::{Query, QueryError, parse_query};
use optiprism_types::{PersonId, ProjectId};
use parking_lot::RwLock;
use std::collections::BTreeMap;
use std::sync::Arc;

/// Why a query failed, classified for HTTP and Flight status codes.
#[derive(Debug, thiserror::Error)]
pub enum QueryFailure {
    /// The JSON query is invalid; names the field.
    #[error(transparent)]
    Invalid(#[from] QueryError),
    /// The SQL does not parse or plan.
    #[error("invalid SQL: {0}")]
    Sql(String),
    /// A partition's data cannot be read right now (no leader, a replica unreachable);
    /// retrying may succeed.
    #[error("{0}")]
    Unavailable(String),
    /// Execution failed.
    #[error("query failed: {0}")]
    Internal(String),
}

impl QueryFailure {
    /// A stable code for clients.
    pub fn code(&self) -> &'static str {
        match self {
            QueryFailure::Invalid(_) => "invalid_query",
            QueryFailure::Sql(_) => "invalid_sql",
            QueryFailure::Unavailable(_) => "unavailable",
            QueryFailure::Internal(_) => "internal",
        }
    }
}

impl From<datafusion::error::DataFusionError> for QueryFailure {
    fn from(e: datafusion::error::DataFusionError) -> QueryFailure {
        QueryFailure::Internal(e.strip_backtrace())
    }
}

/// An insight's answer, as JSON for HTTP and as Arrow for Flight.
#[derive(Debug, Clone)]
pub struct InsightAnswer {
    /// The JSON form.
    pub json: serde_json::Value,
    /// The Arrow form.
    pub batch: RecordBatch,
}

impl From<insights::Answer> for InsightAnswer {
    fn from((json, batch): insights::Answer) -> InsightAnswer {
        InsightAnswer { json, batch }
    }
}

/// Each partition held on this node, by number; shared with the node, which adds and removes
/// partitions as they move.
pub type PartitionRegistry = Arc<RwLock<BTreeMap<u32, Arc<RwLock<PartitionData>>>>>;

/// A person row of a partition, by person id.
pub type PersonRows = Vec<(PersonId, PersonRow)>;

/// Reads partitions held by other nodes (a cluster node whose replicas cover only part of the
/// partitions), each from a replica that first catches up with its leader.
#[async_trait::async_trait]
pub trait RemotePartitions: Send + Sync + std::fmt::Debug {
    /// What [`PartitionData::rows`] answers on a node holding `partition`.
    async fn rows(
        &self,
        partition: u32,
        project: &Project,
        start_ms: i64,
        end_ms: i64,
        events: Option<Vec<String>>,
    ) -> Result<ProjectRows, QueryFailure>;

    /// What [`PartitionData::persons`] answers on a node holding `partition`.
    async fn persons(&self, partition: u32, project: &Project) -> Result<PersonRows, QueryFailure>;
}

/// Reads partitions and metadata and runs queries over them.
#[derive(Debug, Clone)]
pub struct QueryEngine {
    partitions: PartitionRegistry,
    partition_count: u32,
    remote: Arc<std::sync::OnceLock<Arc<dyn RemotePartitions>>>,
    metadata: MetadataHandle,
    state: datafusion::execution::SessionState,
    /// Members of the cohort filters of the query being run (see [`QueryEngine::insight`]).
    segments: Arc<std::collections::HashMap<String, Arc<std::collections::HashSet<u64>>>>,
    /// Person properties the query being run reads, by key and current person.
    person_properties:
        Arc<std::collections::HashMap<String, Arc<std::collections::HashMap<u64, String>>>>,
    /// Whether segments and person properties were prepared for this query.
    prepared: bool,
}

impl QueryEngine {
    /// An engine over `partition_count` partitions, those in `partitions` held here, running
    /// plans on `threads` threads.
    pub fn new(
        partitions: PartitionRegistry,
        partition_count: u32,
        metadata: MetadataHandle,
        threads: usize,
    ) -> QueryEngine {
        let config = SessionConfig::new()
            .with_target_partitions(threads.max(1))
            .with_batch_size(8192)
            .with_information_schema(true);
        let state = SessionContext::new_with_config(config).state();
        QueryEngine {
            partitions,
            partition_count,
            remote: Arc::default(),
            metadata,
            state,
            segments: Arc::default(),
            person_properties: Arc::default(),
            prepared: false,
        }
    }

    /// Sets how partitions held elsewhere are read (once, at start-up of a cluster node).
    pub fn set_remote(&self, remote: Arc<dyn RemotePartitions>) {
        let _ = self.remote.set(remote);
    }

    /// A DataFusion session. Plans read one DataFusion partition per Raft partition and
    /// aggregate each partially before the final merge, on the query runtime's threads. The
    /// session state (configuration, function registry) is built once and cloned per query.
    /// The clone shares the catalog: use it for plans that register no tables.
    pub fn session(&self) -> SessionContext {
        SessionContext::new_with_state(self.state.clone())
    }

    /// A session with a catalog of its own, for SQL over registered tables.
    pub fn sql_session(&self) -> SessionContext {
        SessionContext::new_with_config(self.state.config().clone())
    }

    fn remote(&self, partition: u32) -> Result<&Arc<dyn RemotePartitions>, QueryFailure> {
        self.remote.get().ok_or_else(|| {
            QueryFailure::Internal(format!("partition {partition} is not held on this node"))
        })
    }

    /// Every partition's rows of `project` that may hold events in `[start_ms, end_ms)`:
    /// read here for the partitions held here, fetched from a replica for the others.
    pub async fn rows(
        &self,
        project: &Project,
        start_ms: i64,
        end_ms: i64,
        events: Option<&[String]>,
    ) -> Result<Vec<ProjectRows>, QueryFailure> {
        let local = self.partitions.read().clone();
        futures::future::try_join_all((0..self.partition_count).map(|p| {
            let data = local.get(&p).cloned();
            async move {
                match data {
                    Some(d) => Ok(d.read().rows(project.id, start_ms, end_ms, events)),
                    None => {
                        self.remote(p)?
                            .rows(p, project, start_ms, end_ms, events.map(<[String]>::to_vec))
                            .await
                    }
                }
            }
        }))
        .await
    }

    /// Every partition's person rows of `project`, as [`QueryEngine::rows`] reads rows.
    pub async fn persons(&self, project: &Project) -> Result<Vec<PersonRows>, QueryFailure> {
        let local = self.partitions.read().clone();
        futures::future::try_join_all((0..self.partition_count).map(|p| {
            let data = local.get(&p).cloned();
            async move {
                match data {
                    Some(d) => Ok(d.read().persons(project.id)),
                    None => self.remote(p)?.persons(p, project).await,
                }
            }
        }))
        .await
    }

    /// The data of the partitions held here.
    pub fn local_partitions(&self) -> BTreeMap<u32, Arc<RwLock<PartitionData>>> {
        self.partitions.read().clone()
    }

    /// The identity merges of a project.
    pub fn identity_view(&self, project: ProjectId) -> udf::IdentityView {
        self.metadata
            .read(|m| udf::IdentityView::new(m.identities.get(&project)))
            .with_segments((*self.segments).clone(), (*self.person_properties).clone())
    }

    /// Parses, validates and runs a JSON insight query.
    pub async fn insight(
        &self,
        project: &Project,
        json: &[u8],
    ) -> Result<InsightAnswer, QueryFailure> {
        if let Some((rest, cohorts)) = split_cohort_breakdown(json)? {
            return self.by_cohort(project, rest, cohorts).await;
        }
        let query = parse_query(json)?;
        // Cohort filters (segments) are evaluated first; the plans then test membership.
        // Person properties are read once per query too.
        let cohort_filters = optiprism_types::query::behaviour::query_cohort_filters(&query);
        let person_keys = optiprism_types::query::behaviour::query_person_properties(&query);
        if self.prepared || (cohort_filters.is_empty() && person_keys.is_empty()) {
            return self.run(project, query).await;
        }
        // Person properties and segments read every person at most once between them.
        let people = insights::PersonCache::default();
        let person_properties = if person_keys.is_empty() {
            std::collections::HashMap::new()
        } else {
            insights::person_property_values(self, project, &person_keys, &people).await?
        };
        // The cohorts' own events may be selected by person properties too.
        let with_persons = QueryEngine {
            person_properties: Arc::new(person_properties),
            prepared: true,
            ..self.clone()
        };
        let mut segments = std::collections::HashMap::new();
        for f in cohort_filters {
            let key = udf::segment_key(f);
            if let std::collections::hash_map::Entry::Vacant(slot) = segments.entry(key) {
                let members = insights::segment_members(&with_persons, project, f, &people).await?;
                slot.insert(Arc::new(members));
            }
        }
        let engine = QueryEngine {
            segments: Arc::new(segments),
            ..with_persons
        };
        Box::pin(engine.run(project, query)).await
    }

    /// Answers a query broken down by cohorts: the whole query, then the query once per
    /// cohort with the cohort as a filter. JSON: the whole answer plus `by_cohort: {name:
    /// answer}`; Arrow: the tables stacked, with a leading `cohort` column (null for the whole).
    async fn by_cohort(
        &self,
        project: &Project,
        rest: serde_json::Value,
        cohorts: Vec<(String, serde_json::Value)>,
    ) -> Result<InsightAnswer, QueryFailure> {
        let whole = Box::pin(self.insight(project, rest.to_string().as_bytes())).await?;
        let mut json = whole.json;
        let mut parts = vec![(None, whole.batch)];
        let mut by_cohort = serde_json::Map::new();
        for (name, cohort) in cohorts {
            let mut q = rest.clone();
            let filter = serde_json::json!({"op": "in_cohort", "cohort": cohort});
            match q.get_mut("filters") {
                Some(serde_json::Value::Array(filters)) => filters.push(filter),
                _ => q["filters"] = serde_json::json!([filter]),
            }
            let answer = Box::pin(self.insight(project, q.to_string().as_bytes())).await?;
            by_cohort.insert(name.clone(), answer.json);
            parts.push((Some(name), answer.batch));
        }
        json["by_cohort"] = serde_json::Value::Object(by_cohort);
        let mut batches = Vec::with_capacity(parts.len());
        for (name, batch) in parts {
            let label: ArrayRef =
                Arc::new(StringArray::from(vec![name.as_deref(); batch.num_rows()]));
            let mut fields = vec![Arc::new(Field::new("cohort", DataType::Utf8, true))];
            fields.extend(batch.schema().fields().iter().cloned());
            let mut columns = vec![label];
            columns.extend(batch.columns().iter().cloned());
            batches.push(
                RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)
                    .map_err(|e| QueryFailure::Internal(e.to_string()))?,
            );
        }
        let schema = batches[0].schema();
        let batch = arrow::compute::concat_batches(&schema, &batches)
            .map_err(|e| QueryFailure::Internal(e.to_string()))?;
        Ok(InsightAnswer { json, batch })
    }

    async fn run(&self, project: &Project, query: Query) -> Result<InsightAnswer, QueryFailure> {
        match query {
            Query::Trends(q) => {
                let answer = trends::run(self, project, &q).await?;
                let batch = trends_to_arrow(&answer, &q.buckets().starts_ms);
                Ok(InsightAnswer {
                    json: answer.to_json(),
                    batch,
                })
            }
            Query::Funnel(q) => insights::funnel(self, project, &q).await.map(Into::into),
            Query::FunnelTrends(q) => insights::funnel_trends(self, project, &q)
                .await
                .map(Into::into),
            Query::Retention(q) => insights::retention(self, project, &q).await.map(Into::into),
            Query::Stickiness(q) => insights::stickiness(self, project, &q)
                .await
                .map(Into::into),
            Query::Lifecycle(q) => insights::lifecycle(self, project, &q).await.map(Into::into),
            Query::Paths(q) => insights::paths(self, project, &q).await.map(Into::into),
            Query::Cohort(q) => insights::cohorts(self, project, &q).await.map(Into::into),
            Query::CohortTimeline(q) => insights::cohort_timeline(self, project, &q)
                .await
                .map(Into::into),
            Query::Identity(q) => insights::identity(self, project, &q).await.map(Into::into),
        }
    }
}

/// The query kinds that take top-level `filters`, and so a cohort breakdown.
const COHORT_BREAKDOWN_KINDS: &[&str] = &[
    "trends",
    "funnel",
    "funnel_trends",
    "retention",
    "stickiness",
    "lifecycle",
    "paths",
];

/// The most cohorts one query may break down by.
const MAX_COHORT_BREAKDOWN: usize = 20;

/// Takes `cohort_breakdown` (`{name: cohort condition}`) out of a query: the rest of the query
/// and the cohorts, or `None` when the query has none. Each condition is checked here, so an
/// error names `cohort_breakdown.<name>…`.
#[allow(clippy::type_complexity)]
fn split_cohort_breakdown(
    json: &[u8],
) -> Result<Option<(serde_json::Value, Vec<(String, serde_json::Value)>)>, QueryFailure> {
    let invalid =
        |field: String, message: String| QueryFailure::Invalid(QueryError { field, message });
    let Ok(serde_json::Value::Object(mut object)) = serde_json::from_slice(json) else {
        // Not an object: parse_query names the problem.
        return Ok(None);
    };
    let Some(cohorts) = object.remove("cohort_breakdown") else {
        return Ok(None);
    };
    let kind = object
        .get("kind")
        .and_then(|k| k.as_str())
        .unwrap_or_default();
    if !COHORT_BREAKDOWN_KINDS.contains(&kind) {
        return Err(invalid(
            "cohort_breakdown".into(),
            format!("`{kind}` queries take no cohort breakdown"),
        ));
    }
    let serde_json::Value::Object(cohorts) = cohorts else {
        return Err(invalid(
            "cohort_breakdown".into(),
            "expected an object of named cohort conditions".into(),
        ));
    };
    if cohorts.is_empty() || cohorts.len() > MAX_COHORT_BREAKDOWN {
        return Err(invalid(
            "cohort_breakdown".into(),
            format!("name 1 to {MAX_COHORT_BREAKDOWN} cohorts"),
        ));
    }
    let mut out = Vec::with_capacity(cohorts.len());
    for (name, condition) in cohorts {
        let field = format!("cohort_breakdown.{name}");
        let parsed: optiprism_types::query::behaviour::CohortCondition =
            serde_json::from_value(condition.clone())
                .map_err(|e| invalid(field.clone(), e.to_string()))?;
        parsed.validate(&field, 0)?;
        out.push((name, condition));
    }
    Ok(Some((serde_json::Value::Object(object), out)))
}

/// The Arrow form of a trends answer: one row per (series, breakdown value, bucket), plus a row
/// with null bucket for each range total. Formula rows have series `formula`; rows of the
/// previous period (§2.6) have `period` `previous` (and their own bucket labels and starts,
/// aligned with the current period's by order), the others `current`. `change_pct` is set on
/// the current range-total rows of compared series (null there when undefined, and on every
/// other row).
pub fn trends_to_arrow(answer: &TrendsAnswer, starts_ms: &[i64]) -> RecordBatch {
    let schema: SchemaRef = Arc::new(Schema::new(vec![
        Field::new("series", DataType::Utf8, false),
        Field::new("breakdown", DataType::Utf8, true),
        Field::new("bucket", DataType::Utf8, true),
        Field::new(
            "bucket_start",
            crate::storage::chunk::timestamp_type(),
            true,
        ),
        Field::new("value", DataType::Float64, true),
        Field::new("period", DataType::Utf8, false),
        Field::new("change_pct", DataType::Float64, true),
    ]));
    let mut series = StringBuilder::new();
    let mut breakdown = StringBuilder::new();
    let mut bucket = StringBuilder::new();
    let mut start = TimestampMillisecondBuilder::new().with_timezone("UTC");
    let mut value = Float64Builder::new();
    let mut period = StringBuilder::new();
    let mut change = Float64Builder::new();
    struct Period<'a> {
        name: &'a str,
        labels: &'a [String],
        starts_ms: &'a [i64],
    }
    let mut push = |p: &Period<'_>,
                    id: &str,
                    b: Option<&str>,
                    values: &[Option<f64>],
                    total: Option<f64>,
                    change_pct: Option<f64>| {
        for (i, v) in values.iter().enumerate() {
            series.append_value(id);
            breakdown.append_option(b);
            bucket.append_value(&p.labels[i]);
            start.append_value(p.starts_ms[i]);
            value.append_option(*v);
            period.append_value(p.name);
            change.append_null();
        }
        series.append_value(id);
        breakdown.append_option(b);
        bucket.append_null();
        start.append_null();
        value.append_option(total);
        period.append_value(p.name);
        change.append_option(change_pct);
    };
    let current = Period {
        name: "current",
        labels: &answer.buckets,
        starts_ms,
    };
    let previous_of = |id: &str| {
        answer
            .previous
            .as_ref()
            .and_then(|p| p.series.iter().find(|s| s.id == id))
    };
    for s in answer.series.iter().chain(answer.formula.iter()) {
        let pct =
            previous_of(&s.id).and_then(|p| optiprism_types::stats::change_pct(s.total, p.total));
        push(&current, &s.id, None, &s.values, s.total, pct);
        for b in &s.breakdown {
            push(&current, &s.id, Some(&b.value), &b.values, b.total, None);
        }
    }
    if let Some(p) = &answer.previous {
        let previous = Period {
            name: "previous",
            labels: &p.buckets,
            starts_ms: &p.starts_ms,
        };
        for s in &p.series {
            push(&previous, &s.id, None, &s.values, s.total, None);
        }
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(series.finish()),
        Arc::new(breakdown.finish()),
        Arc::new(bucket.finish()),
        Arc::new(start.finish()),
        Arc::new(value.finish()),
        Arc::new(period.finish()),
        Arc::new(change.finish()),
    ];
    RecordBatch::try_new(schema, columns).expect("columns follow the schema")
}
