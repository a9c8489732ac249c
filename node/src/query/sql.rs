//! SQL over a project's `events` and `persons` (Flight SQL).
//!
//! `events` has one DataFusion partition per Raft partition, with the union of every chunk's
//! columns (properties a chunk lacks read as null) and `person_id` resolved through identity
//! merges. `persons` has one row per current person. Only queries run: DDL, DML and other
//! statements are refused.

use crate::metadata::Project;
use crate::query::{QueryEngine, QueryFailure};
use crate::storage::chunk::{fixed_fields, timestamp_type};
use arrow::array::{
    ArrayRef, ListBuilder, RecordBatch, StringBuilder, TimestampMillisecondBuilder, UInt64Array,
    UInt64Builder, new_null_array,
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

async fn events_table(engine: &QueryEngine, project: &Project) -> Result<MemTable, QueryFailure> {
    let rows = engine.rows(project, i64::MIN, i64::MAX, None).await?;
    let mut fields: Vec<Field> = fixed_fields();
    let mut extra: BTreeMap<String, Field> = BTreeMap::new();
    for part in &rows {
        for batch in &part.batches {
            for f in batch.schema().fields().iter().skip(fields.len()) {
                extra
                    .entry(f.name().clone())
                    .or_insert_with(|| f.as_ref().clone().with_nullable(true));
            }
        }
    }
    fields.extend(extra.into_values());
    let schema: SchemaRef = Arc::new(Schema::new(fields));
    let view = engine.identity_view(project.id);
    let mut partitions = Vec::with_capacity(rows.len());
    for part in rows {
        let mut batches = Vec::with_capacity(part.batches.len());
        for batch in part.batches {
            let columns: Vec<ArrayRef> = schema
                .fields()
                .iter()
                .map(|f| {
                    let column = batch
                        .column_by_name(f.name())
                        .cloned()
                        .unwrap_or_else(|| new_null_array(f.data_type(), batch.num_rows()));
                    if f.name() == "person_id" && !view.merged.is_empty() {
                        let ids = column
                            .as_any()
                            .downcast_ref::<UInt64Array>()
                            .expect("person_id is u64");
                        Arc::new(
                            ids.iter()
                                .map(|p| p.map(|p| view.resolve(p)))
                                .collect::<UInt64Array>(),
                        ) as ArrayRef
                    } else {
                        column
                    }
                })
                .collect();
            batches.push(
                RecordBatch::try_new(Arc::clone(&schema), columns)
                    .map_err(|e| QueryFailure::Internal(e.to_string()))?,
            );
        }
        partitions.push(batches);
    }
    Ok(MemTable::try_new(schema, partitions)?)
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
