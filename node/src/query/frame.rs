//! A project's rows as one DataFusion input: the columns a query needs, with a uniform schema,
//! and one DataFusion partition per Raft partition.
//!
//! Chunks of a project differ in their property columns (a key that no event of the chunk had
//! is absent, and a key too rare in the chunk for a column has its values in the sparse
//! column). A query names the columns it reads; each batch is projected onto them, a rare key's
//! column built from the sparse column's values, absent ones filled with nulls of the type the
//! project's other batches have, so every batch of the plan has the same schema.

use crate::storage::chunk::{
    property_arrays, property_column, property_text_column, sparse_field_type,
};
use crate::storage::partition::ProjectRows;
use arrow::array::RecordBatch;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use std::sync::Arc;

/// The columns of a property key present in the rows.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PropertyColumns {
    /// The typed column and its type.
    pub typed: Option<(String, DataType)>,
    /// The column of mismatched values, if any batch has one.
    pub text: Option<String>,
    /// An expression giving the rendered value instead of columns (person properties).
    pub computed: Option<datafusion::logical_expr::Expr>,
}

/// Finds the field named `name` in any batch of any partition: a column of its own, or else
/// values of it in a sparse column.
fn find_field(parts: &[ProjectRows], name: &str) -> Option<Field> {
    let batches = || parts.iter().flat_map(|p| &p.batches);
    batches()
        .find_map(|b| b.schema().field_with_name(name).ok().cloned())
        .or_else(|| {
            batches().find_map(|b| sparse_field_type(b, name).map(|ty| Field::new(name, ty, true)))
        })
}

/// The columns of property `key` in these rows.
pub fn property_columns(parts: &[ProjectRows], key: &str) -> PropertyColumns {
    let typed_name = property_column(key);
    let text_name = property_text_column(key);
    PropertyColumns {
        typed: find_field(parts, &typed_name).map(|f| (typed_name, f.data_type().clone())),
        text: find_field(parts, &text_name).map(|_| text_name),
        computed: None,
    }
}

/// Projects every batch onto `names` (columns that exist somewhere in `parts`); one list of
/// batches per partition.
pub fn project(parts: &[ProjectRows], names: &[String]) -> (SchemaRef, Vec<Vec<RecordBatch>>) {
    let fields: Vec<Field> = names
        .iter()
        .filter_map(|n| find_field(parts, n).map(|f| f.with_nullable(true)))
        .collect();
    let schema = Arc::new(Schema::new(fields));
    let fields: Vec<&Field> = schema.fields().iter().map(|f| f.as_ref()).collect();
    let partitions = parts
        .iter()
        .map(|part| {
            part.batches
                .iter()
                .map(|b| {
                    RecordBatch::try_new(Arc::clone(&schema), property_arrays(b, &fields))
                        .expect("columns follow the schema")
                })
                .collect()
        })
        .collect();
    (schema, partitions)
}

/// Property columns of a project's rows, for filters over them (see
/// [`crate::query::filter::ColumnLookup`]).
#[derive(Debug)]
pub struct RowsLookup<'a> {
    /// The rows, one entry per partition.
    pub parts: &'a [ProjectRows],
    /// "Now" for relative dates, epoch ms.
    pub now_ms: i64,
    /// Identity merges, segments and person properties of the query.
    pub identities: &'a Arc<crate::query::udf::IdentityView>,
}

impl crate::query::filter::ColumnLookup for RowsLookup<'_> {
    fn property(&self, key: &str) -> PropertyColumns {
        property_columns(self.parts, key)
    }
    fn now_ms(&self) -> i64 {
        self.now_ms
    }
    fn identities(&self) -> &Arc<crate::query::udf::IdentityView> {
        self.identities
    }
}
