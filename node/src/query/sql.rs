//! SQL over a project's `events` and `persons` (Flight SQL).
//!
//! `events` has one DataFusion partition per Raft partition, with the union of every chunk's
//! columns (properties a chunk lacks read as null; a key too rare in a chunk for a column of its
//! own reads from the chunk's sparse column) and `person_id` resolved through identity
//! merges. `persons` has one row per current person. Only queries run: DDL, DML and other
//! statements are refused.

use crate::metadata::Project;
use crate::query::{QueryEngine, QueryFailure};
use crate::storage::chunk::{
    SPARSE_COLUMN, fixed_fields, property_arrays, sparse_fields, timestamp_type,
};
use arrow::array::{
    ArrayRef, ListBuilder, RecordBatch, StringBuilder, TimestampMillisecondBuilder, UInt64Array,
    UInt64Builder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::common::ParamValues;
use datafusion::datasource::MemTable;
use datafusion::execution::context::SQLOptions;
use datafusion::prelude::SessionContext;
use datafusion::scalar::ScalarValue;
use std::collections::BTreeMap;
use std::sync::Arc;

/// Rewrites `?` placeholders (ADBC, JDBC) into DataFusion's `$1`, `$2`, …, leaving string
/// literals and quoted identifiers alone.
pub fn number_placeholders(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 8);
    let mut n = 0;
    let mut quote: Option<char> = None;
    for c in sql.chars() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '\'' || c == '"' => quote = Some(c),
            None if c == '?' => {
                n += 1;
                out.push_str(&format!("${n}"));
                continue;
            }
            None => {}
        }
        out.push(c);
    }
    out
}

/// `events`: every column any batch of the project has, its own or in a sparse column. A scan
/// builds only the columns the query reads: a project whose events carry thousands of rare keys
/// would otherwise build every row of every one of them (nulls mostly) for a `count(*)`.
#[derive(Debug)]
struct EventsTable {
    schema: SchemaRef,
    /// The batches as stored, one list per partition.
    partitions: Vec<Vec<RecordBatch>>,
    view: crate::query::udf::IdentityView,
}

impl EventsTable {
    /// The columns `fields` of `batch`, rows of absent ones null, `person_id` resolved through
    /// identity merges.
    fn columns(&self, batch: &RecordBatch, fields: &[&Field]) -> Vec<ArrayRef> {
        property_arrays(batch, fields)
            .into_iter()
            .zip(fields)
            .map(|(column, f)| {
                if f.name() == "person_id" && !self.view.merged.is_empty() {
                    let ids = column
                        .as_any()
                        .downcast_ref::<UInt64Array>()
                        .expect("person_id is u64");
                    Arc::new(
                        ids.iter()
                            .map(|p| p.map(|p| self.view.resolve(p)))
                            .collect::<UInt64Array>(),
                    ) as ArrayRef
                } else {
                    column
                }
            })
            .collect()
    }
}

#[async_trait::async_trait]
impl datafusion::catalog::TableProvider for EventsTable {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn table_type(&self) -> datafusion::datasource::TableType {
        datafusion::datasource::TableType::Base
    }

    async fn scan(
        &self,
        _state: &dyn datafusion::catalog::Session,
        projection: Option<&Vec<usize>>,
        _filters: &[datafusion::logical_expr::Expr],
        _limit: Option<usize>,
    ) -> datafusion::error::Result<Arc<dyn datafusion::physical_plan::ExecutionPlan>> {
        let schema = match projection {
            Some(indices) => Arc::new(self.schema.project(indices)?),
            None => Arc::clone(&self.schema),
        };
        let fields: Vec<&Field> = schema.fields().iter().map(|f| f.as_ref()).collect();
        let mut partitions = Vec::with_capacity(self.partitions.len());
        for part in &self.partitions {
            let mut batches = Vec::with_capacity(part.len());
            for batch in part {
                let columns = self.columns(batch, &fields);
                // Built column by column, so a projection of no columns (`count(*)`) still
                // says how many rows there are.
                let options =
                    arrow::array::RecordBatchOptions::new().with_row_count(Some(batch.num_rows()));
                batches.push(RecordBatch::try_new_with_options(
                    Arc::clone(&schema),
                    columns,
                    &options,
                )?);
            }
            partitions.push(batches);
        }
        Ok(
            datafusion::datasource::memory::MemorySourceConfig::try_new_exec(
                &partitions,
                schema,
                None,
            )?,
        )
    }
}

async fn events_table(
    engine: &QueryEngine,
    project: &Project,
) -> Result<EventsTable, QueryFailure> {
    let rows = engine.rows(project, i64::MIN, i64::MAX, None).await?;
    let mut fields: Vec<Field> = fixed_fields();
    let mut extra: BTreeMap<String, Field> = BTreeMap::new();
    for part in &rows {
        for batch in &part.batches {
            let own = batch.schema_ref().fields().iter().skip(fields.len());
            let own = own
                .filter(|f| f.name() != SPARSE_COLUMN)
                .map(|f| f.as_ref().clone());
            for f in own.chain(sparse_fields(batch)) {
                extra
                    .entry(f.name().clone())
                    .or_insert_with(|| f.with_nullable(true));
            }
        }
    }
    fields.extend(extra.into_values());
    Ok(EventsTable {
        schema: Arc::new(Schema::new(fields)),
        partitions: rows.into_iter().map(|part| part.batches).collect(),
        view: engine.identity_view(project.id),
    })
}

async fn persons_table(engine: &QueryEngine, project: &Project) -> Result<MemTable, QueryFailure> {
    let view = engine.identity_view(project.id);
    // Fold merged persons into the person they became: earliest creation, every distinct id,
    // the surviving person's properties winning over those of persons merged into it.
    let mut groups: BTreeMap<u64, Vec<(bool, crate::storage::partition::PersonRow)>> =
        BTreeMap::new();
    for partition in engine.persons(project).await? {
        for (id, row) in partition {
            let current = view.resolve(id.0);
            groups
                .entry(current)
                .or_default()
                .push((current == id.0, row));
        }
    }
    let mut persons = Vec::with_capacity(groups.len());
    for (person, mut rows) in groups {
        rows.sort_by_key(|(survivor, _)| !*survivor);
        let created_at = rows.iter().map(|(_, r)| r.created_at_ms).min().unwrap_or(0);
        let mut distinct: Vec<String> = rows
            .iter()
            .flat_map(|(_, r)| r.distinct_ids.iter().cloned())
            .collect();
        let mut properties = serde_json::Map::new();
        for (_, row) in &rows {
            for (k, v) in &row.properties {
                properties.entry(k.clone()).or_insert_with(|| v.to_json());
            }
        }
        distinct.sort();
        distinct.dedup();
        persons.push((person, created_at, distinct, properties));
    }
    let schema: SchemaRef = Arc::new(Schema::new(vec![
        Field::new("person_id", DataType::UInt64, false),
        Field::new("created_at", timestamp_type(), false),
        Field::new(
            "distinct_ids",
            DataType::List(Arc::new(Field::new("item", DataType::Utf8, true))),
            false,
        ),
        Field::new("properties", DataType::Utf8, false),
    ]));
    let mut id = UInt64Builder::new();
    let mut created = TimestampMillisecondBuilder::new().with_timezone("UTC");
    let mut ids = ListBuilder::new(StringBuilder::new());
    let mut props = StringBuilder::new();
    for (person, created_at, distinct, properties) in persons {
        id.append_value(person);
        created.append_value(created_at);
        for d in distinct {
            ids.values().append_value(d);
        }
        ids.append(true);
        props.append_value(serde_json::Value::Object(properties).to_string());
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(id.finish()),
        Arc::new(created.finish()),
        Arc::new(ids.finish()),
        Arc::new(props.finish()),
    ];
    let batch = RecordBatch::try_new(Arc::clone(&schema), columns)
        .map_err(|e| QueryFailure::Internal(e.to_string()))?;
    Ok(MemTable::try_new(schema, vec![vec![batch]])?)
}

/// A SQL session over a project's tables.
pub async fn session(
    engine: &QueryEngine,
    project: &Project,
) -> Result<SessionContext, QueryFailure> {
    let ctx = engine.sql_session();
    ctx.register_table("events", Arc::new(events_table(engine, project).await?))?;
    ctx.register_table("persons", Arc::new(persons_table(engine, project).await?))?;
    Ok(ctx)
}

fn options() -> SQLOptions {
    SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false)
}

/// The result schema of a query, without running it.
pub async fn schema(
    engine: &QueryEngine,
    project: &Project,
    sql: &str,
) -> Result<SchemaRef, QueryFailure> {
    let ctx = session(engine, project).await?;
    let df = ctx
        .sql_with_options(&number_placeholders(sql), options())
        .await
        .map_err(|e| QueryFailure::Sql(e.strip_backtrace()))?;
    Ok(Arc::new(df.schema().as_arrow().clone()))
}

/// Runs a query with optional positional parameters (one row of `params`).
pub async fn run(
    engine: &QueryEngine,
    project: &Project,
    sql: &str,
    params: Option<&RecordBatch>,
) -> Result<(SchemaRef, Vec<RecordBatch>), QueryFailure> {
    let ctx = session(engine, project).await?;
    let mut df = ctx
        .sql_with_options(&number_placeholders(sql), options())
        .await
        .map_err(|e| QueryFailure::Sql(e.strip_backtrace()))?;
    if let Some(params) = params {
        if params.num_rows() != 1 {
            return Err(QueryFailure::Sql(format!(
                "expected one row of parameters, got {}",
                params.num_rows()
            )));
        }
        let values: Vec<ScalarValue> = params
            .columns()
            .iter()
            .map(|c| ScalarValue::try_from_array(c, 0))
            .collect::<Result<_, _>>()?;
        df = df
            .with_param_values(ParamValues::from(values))
            .map_err(|e| QueryFailure::Sql(e.strip_backtrace()))?;
    }
    let schema = Arc::new(df.schema().as_arrow().clone());
    let batches = df.collect().await.map_err(|e| match e {
        datafusion::error::DataFusionError::Plan(_)
        | datafusion::error::DataFusionError::SchemaError(..) => {
            QueryFailure::Sql(e.strip_backtrace())
        }
        other => QueryFailure::from(other),
    })?;
    Ok((schema, batches))
}

/// Tables of a project and their schemas (Flight SQL `GetTables`).
pub async fn tables(
    engine: &QueryEngine,
    project: &Project,
) -> Result<Vec<(String, SchemaRef)>, QueryFailure> {
    use datafusion::catalog::TableProvider;
    let events = events_table(engine, project).await?;
    let persons = persons_table(engine, project).await?;
    Ok(vec![
        ("events".to_string(), events.schema()),
        ("persons".to_string(), persons.schema()),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_numbered_outside_quotes() {
        assert_eq!(
            number_placeholders("SELECT ? , '?' , \"a?\" , ?"),
            "SELECT $1 , '?' , \"a?\" , $2"
        );
    }
}
