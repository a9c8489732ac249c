//! Columnar chunks: a batch of one project's events as Arrow arrays, LZ4-compressed Arrow IPC,
//! one sled key per chunk, with a small separate metadata record used for pruning.
//!
//! Column layout of every chunk (and of the `events` SQL table):
//!
//! | column | Arrow type | note |
//! |---|---|---|
//! | `uuid` | Utf8 | the message id |
//! | `event` | Dictionary(Int32, Utf8) | |
//! | `timestamp` | Timestamp(ms, UTC) | |
//! | `distinct_id` | Dictionary(Int32, Utf8) | |
//! | `person_id` | UInt64 | the person at ingestion; merges are resolved at query time |
//! | `properties.<key>` | Utf8 dictionary, Float64, Boolean or Timestamp(ms, UTC) | typed per project |
//! | `properties.<key>#text` | Utf8 | values that did not fit the key's type, verbatim |
//! | `sparse_properties` | Map(LargeUtf8, LargeUtf8) | values of keys too rare in the batch for their own columns, tagged with their type (last, and only when there are any) |
//!
//! Rows are sorted by (event, person, time) when sealed, and the chunk's metadata records where
//! each event name's rows are: a query for one event reads a zero-copy slice of the chunk
//! instead of filtering all of it, and within an event each person's rows are contiguous and in
//! time order (what per-person work such as funnels and retention reads).

use arrow::array::{
    ArrayBuilder, ArrayRef, BooleanBuilder, Float64Builder, RecordBatch, StringBuilder,
    StringDictionaryBuilder, TimestampMillisecondBuilder, UInt64Builder, new_null_array,
};
use arrow::datatypes::{DataType, Field, Int32Type, Schema, SchemaRef, TimeUnit};
use arrow::error::ArrowError;
use arrow_ipc::CompressionType;
use arrow_ipc::reader::StreamReader;
use arrow_ipc::writer::{IpcWriteOptions, StreamWriter};
use optiprism_types::ProjectId;
use optiprism_types::event::{Coerced, PropValue};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Name prefix of property columns.
pub const PROPERTY_PREFIX: &str = "properties.";
/// Suffix of the column holding values that did not fit the key's type.
pub const TEXT_SUFFIX: &str = "#text";

/// The column of property `key`.
pub fn property_column(key: &str) -> String {
    format!("{PROPERTY_PREFIX}{key}")
}

/// The column of property `key`'s mismatched values.
pub fn property_text_column(key: &str) -> String {
    format!("{PROPERTY_PREFIX}{key}{TEXT_SUFFIX}")
}

/// The Arrow type of a UTC millisecond timestamp.
pub fn timestamp_type() -> DataType {
    DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()))
}

/// The Arrow type of dictionary-encoded strings.
pub fn dictionary_type() -> DataType {
    DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8))
}

/// The fixed columns every chunk starts with.
pub fn fixed_fields() -> Vec<Field> {
    vec![
        Field::new("uuid", DataType::Utf8, false),
        Field::new("event", dictionary_type(), false),
        Field::new("timestamp", timestamp_type(), false),
        Field::new("distinct_id", dictionary_type(), false),
        Field::new("person_id", DataType::UInt64, false),
    ]
}

/// An event as the partition state machine stores it: typed by the project schema at ingestion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredEvent {
    /// Message id (dedupe key).
    pub message_id: String,
    /// The id the SDK sent.
    pub distinct_id: String,
    /// The person at ingestion.
    pub person_id: u64,
    /// Event name.
    pub event: String,
    /// Epoch milliseconds.
    pub timestamp_ms: i64,
    /// Event properties, coerced to the project's types.
    pub props: Vec<(String, Coerced)>,
    /// Person properties to set.
    pub person_set: Vec<(String, PropValue)>,
    /// Person properties to set once.
    pub person_set_once: Vec<(String, PropValue)>,
}

/// A property value as a replica reads it from a log entry: [`Coerced`] with its text borrowed
/// from the entry instead of copied out of it. Variant for variant the same as [`Coerced`], so
/// it decodes what `Coerced` encoded.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
pub enum CoercedRef<'a> {
    /// Text of a string-typed key.
    Str(&'a str),
    /// A number-typed key's value.
    Num(f64),
    /// A boolean-typed key's value.
    Bool(bool),
    /// A datetime-typed key's value in epoch milliseconds.
    DateTimeMs(i64),
    /// A value that does not fit the key's type, as its string rendering.
    Mismatch(&'a str),
}

impl<'a> From<&'a Coerced> for CoercedRef<'a> {
    fn from(v: &'a Coerced) -> CoercedRef<'a> {
        match v {
            Coerced::Str(s) => CoercedRef::Str(s),
            Coerced::Num(n) => CoercedRef::Num(*n),
            Coerced::Bool(b) => CoercedRef::Bool(*b),
            Coerced::DateTimeMs(ms) => CoercedRef::DateTimeMs(*ms),
            Coerced::Mismatch(s) => CoercedRef::Mismatch(s),
        }
    }
}

/// [`StoredEvent`] as a replica reads it from a log entry: field for field the same, with its
/// text borrowed from the entry. Replicas decode every entry they apply, and allocating a
/// string per id, name and property value was most of what decoding cost.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct StoredEventRef<'a> {
    /// Message id (dedupe key).
    pub message_id: &'a str,
    /// The id the SDK sent.
    pub distinct_id: &'a str,
    /// The person at ingestion.
    pub person_id: u64,
    /// Event name.
    pub event: &'a str,
    /// Epoch milliseconds.
    pub timestamp_ms: i64,
    /// Event properties, coerced to the project's types.
    #[serde(borrow)]
    pub props: Vec<(&'a str, CoercedRef<'a>)>,
    /// Person properties to set (rare: owned).
    pub person_set: Vec<(String, PropValue)>,
    /// Person properties to set once (rare: owned).
    pub person_set_once: Vec<(String, PropValue)>,
}

/// What apply reads of an event, whether the node decoded it from the log
/// ([`StoredEventRef`]) or proposed it itself and still holds it ([`StoredEvent`]).
pub trait EventRow {
    /// Message id (dedupe key).
    fn message_id(&self) -> &str;
    /// The id the SDK sent.
    fn distinct_id(&self) -> &str;
    /// The person at ingestion.
    fn person_id(&self) -> u64;
    /// Event name.
    fn event(&self) -> &str;
    /// Epoch milliseconds.
    fn timestamp_ms(&self) -> i64;
    /// Event properties, coerced to the project's types.
    fn props(&self) -> impl Iterator<Item = (&str, CoercedRef<'_>)>;
    /// Person properties to set.
    fn person_set(&self) -> &[(String, PropValue)];
    /// Person properties to set once.
    fn person_set_once(&self) -> &[(String, PropValue)];
}

impl EventRow for StoredEvent {
    fn message_id(&self) -> &str {
        &self.message_id
    }
    fn distinct_id(&self) -> &str {
        &self.distinct_id
    }
    fn person_id(&self) -> u64 {
        self.person_id
    }
    fn event(&self) -> &str {
        &self.event
    }
    fn timestamp_ms(&self) -> i64 {
        self.timestamp_ms
    }
    fn props(&self) -> impl Iterator<Item = (&str, CoercedRef<'_>)> {
        self.props.iter().map(|(k, v)| (k.as_str(), v.into()))
    }
    fn person_set(&self) -> &[(String, PropValue)] {
        &self.person_set
    }
    fn person_set_once(&self) -> &[(String, PropValue)] {
        &self.person_set_once
    }
}

impl EventRow for StoredEventRef<'_> {
    fn message_id(&self) -> &str {
        self.message_id
    }
    fn distinct_id(&self) -> &str {
        self.distinct_id
    }
    fn person_id(&self) -> u64 {
        self.person_id
    }
    fn event(&self) -> &str {
        self.event
    }
    fn timestamp_ms(&self) -> i64 {
        self.timestamp_ms
    }
    fn props(&self) -> impl Iterator<Item = (&str, CoercedRef<'_>)> {
        self.props.iter().copied()
    }
    fn person_set(&self) -> &[(String, PropValue)] {
        &self.person_set
    }
    fn person_set_once(&self) -> &[(String, PropValue)] {
        &self.person_set_once
    }
}

/// What is known about a chunk without reading it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChunkMeta {
    /// The project.
    pub project: ProjectId,
    /// Unique within the partition and project, increasing.
    pub id: u64,
    /// Rows.
    pub rows: u64,
    /// Earliest event time.
    pub min_ts: i64,
    /// Latest event time.
    pub max_ts: i64,
    /// Smallest person id.
    pub min_person: u64,
    /// Largest person id.
    pub max_person: u64,
    /// Each event name in the chunk with the offset and length of its rows.
    pub event_rows: Vec<(String, u64, u64)>,
    /// Compressed size in bytes.
    pub bytes: u64,
}

impl ChunkMeta {
    /// Whether the chunk can hold events in `[start_ms, end_ms)`.
    pub fn overlaps(&self, start_ms: i64, end_ms: i64) -> bool {
        self.min_ts < end_ms && self.max_ts >= start_ms
    }

    /// The rows (offset, length) of events named `event`, if the chunk has any.
    pub fn rows_of(&self, event: &str) -> Option<(usize, usize)> {
        self.event_rows
            .iter()
            .find(|(e, _, _)| e == event)
            .map(|(_, o, n)| (*o as usize, *n as usize))
    }
}

/// A sealed chunk, decoded and kept in memory for queries.
#[derive(Debug, Clone)]
pub struct Chunk {
    /// Its metadata.
    pub meta: ChunkMeta,
    /// Its rows.
    pub batch: RecordBatch,
}

/// The type of a property column: a typed one's, or `Text` for the column of a key's values
/// that did not fit its type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PropKind {
    Str,
    Num,
    Bool,
    Time,
    Text,
}

impl PropKind {
    /// The kind of a column's Arrow type.
    fn of(ty: &DataType) -> Option<PropKind> {
        match ty {
            DataType::Utf8 => Some(PropKind::Text),
            DataType::Float64 => Some(PropKind::Num),
            DataType::Boolean => Some(PropKind::Bool),
            t if *t == dictionary_type() => Some(PropKind::Str),
            t if *t == timestamp_type() => Some(PropKind::Time),
            _ => None,
        }
    }

    /// The kind of column `v` belongs in, given no other.
    fn of_value(v: CoercedRef<'_>) -> PropKind {
        match v {
            CoercedRef::Str(_) => PropKind::Str,
            CoercedRef::Num(_) => PropKind::Num,
            CoercedRef::Bool(_) => PropKind::Bool,
            CoercedRef::DateTimeMs(_) => PropKind::Time,
            CoercedRef::Mismatch(_) => PropKind::Text,
        }
    }

    fn data_type(self) -> DataType {
        match self {
            PropKind::Str => dictionary_type(),
            PropKind::Num => DataType::Float64,
            PropKind::Bool => DataType::Boolean,
            PropKind::Time => timestamp_type(),
            PropKind::Text => DataType::Utf8,
        }
    }
}

/// A dictionary column of strings, typed.
fn string_dictionary(
    column: &ArrayRef,
) -> Result<arrow::array::TypedDictionaryArray<'_, Int32Type, arrow::array::StringArray>, ArrowError>
{
    use arrow::array::AsArray;
    column
        .as_dictionary_opt::<Int32Type>()
        .and_then(|d| d.downcast_dict::<arrow::array::StringArray>())
        .ok_or_else(|| ArrowError::InvalidArgumentError("not a dictionary of strings".into()))
}

/// The value of column `column` (of `kind`) at `row`, if any.
fn typed_value(column: &ArrayRef, kind: PropKind, row: usize) -> Option<CoercedRef<'_>> {
    use arrow::array::{Array, ArrayAccessor, AsArray};
    use arrow::datatypes::{Float64Type, TimestampMillisecondType};
    if column.is_null(row) {
        return None;
    }
    Some(match kind {
        PropKind::Str => CoercedRef::Str(string_dictionary(column).ok()?.value(row)),
        PropKind::Num => CoercedRef::Num(column.as_primitive::<Float64Type>().value(row)),
        PropKind::Bool => CoercedRef::Bool(column.as_boolean().value(row)),
        PropKind::Time => {
            CoercedRef::DateTimeMs(column.as_primitive::<TimestampMillisecondType>().value(row))
        }
        PropKind::Text => CoercedRef::Mismatch(column.as_string_opt::<i32>()?.value(row)),
    })
}

/// The column of a batch holding, row by row, the values of keys too rare in the batch for
/// columns of their own: a map from each key to its value, tagged with its type (see
/// [`tag_value`]). A column costs a value or a null in every row, so a batch of events whose
/// property names are mostly their own would cost rows × keys in columns; here it costs what
/// the values take.
pub const SPARSE_COLUMN: &str = "sparse_properties";

/// A key's values get a column of their own once they fill at least one row in this many...
const DENSE_FILL: usize = 8;
/// ...and go back to the sparse column when they fill fewer than one row in this many. Apart,
/// so that a key near the line does not go back and forth; together they bound what columns
/// cost to this many rows of a column per value.
const SPARSE_FILL: usize = 32;

/// Whether `values` in `rows` rows are enough for a column.
fn dense_enough(values: usize, rows: usize) -> bool {
    values * DENSE_FILL >= rows
}

/// Whether a column of `values` in `rows` rows should go back to the sparse column.
fn too_sparse(values: usize, rows: usize) -> bool {
    values * SPARSE_FILL < rows
}

/// The Arrow type of [`SPARSE_COLUMN`]. Its text has 64-bit offsets: one map holds the rare
/// keys' values of every row of a batch (a partition's unsealed rows), which may pass the 2 GiB
/// that 32-bit offsets allow.
pub fn sparse_type() -> DataType {
    DataType::Map(
        Arc::new(Field::new(
            "entries",
            DataType::Struct(
                vec![
                    Field::new("keys", DataType::LargeUtf8, false),
                    Field::new("values", DataType::LargeUtf8, false),
                ]
                .into(),
            ),
            false,
        )),
        false,
    )
}

/// Appends `v` to `out` as the sparse column holds it: a letter for its type, then its text.
/// A value that did not fit its key's type (`x`) belongs to the key's `#text` column.
fn tag_value(v: CoercedRef<'_>, out: &mut String) {
    use std::fmt::Write;
    match v {
        CoercedRef::Str(s) => {
            out.push('s');
            out.push_str(s);
        }
        // `Display` of an f64 is the shortest text that parses back to the same number.
        CoercedRef::Num(n) => write!(out, "n{n}").expect("writing to a String"),
        CoercedRef::Bool(b) => out.push(if b { 'T' } else { 'F' }),
        CoercedRef::DateTimeMs(ms) => write!(out, "d{ms}").expect("writing to a String"),
        CoercedRef::Mismatch(s) => {
            out.push('x');
            out.push_str(s);
        }
    }
}

/// Reads what [`tag_value`] wrote.
fn untag(tagged: &str) -> Option<CoercedRef<'_>> {
    let rest = tagged.get(1..)?;
    Some(match tagged.as_bytes().first()? {
        b's' => CoercedRef::Str(rest),
        b'n' => CoercedRef::Num(rest.parse().ok()?),
        b'T' if rest.is_empty() => CoercedRef::Bool(true),
        b'F' if rest.is_empty() => CoercedRef::Bool(false),
        b'd' => CoercedRef::DateTimeMs(rest.parse().ok()?),
        b'x' => CoercedRef::Mismatch(rest),
        _ => return None,
    })
}

/// The sparse column of `batch`, if it has one.
pub fn sparse_column(batch: &RecordBatch) -> Option<&arrow::array::MapArray> {
    use arrow::array::AsArray;
    batch.column_by_name(SPARSE_COLUMN)?.as_map_opt()
}

/// Every entry of a sparse column: its row, key and tagged value.
fn sparse_entries(map: &arrow::array::MapArray) -> impl Iterator<Item = (usize, &str, &str)> {
    use arrow::array::AsArray;
    let keys = map.keys().as_string::<i64>();
    let values = map.values().as_string::<i64>();
    map.offsets()
        .windows(2)
        .enumerate()
        .flat_map(move |(row, w)| {
            (w[0] as usize..w[1] as usize).map(move |i| (row, keys.value(i), values.value(i)))
        })
}

/// The keys whose values property column `name` may hold: the typed column of key `rest`, and,
/// for a name ending in `#text`, the text column of the key before it (the two can share a
/// name; the sparse column's tags tell them apart).
fn sparse_names(name: &str) -> Option<(&str, Option<&str>)> {
    let rest = name.strip_prefix(PROPERTY_PREFIX)?;
    Some((rest, rest.strip_suffix(TEXT_SUFFIX)))
}

/// The kind of a tagged value, if its tag is one.
fn tagged_kind(tagged: &str) -> Option<PropKind> {
    untag(tagged).map(PropKind::of_value)
}

/// The type of property column `name` as the sparse column of `batch` holds it, if it holds
/// any of its values.
pub fn sparse_field_type(batch: &RecordBatch, name: &str) -> Option<DataType> {
    let map = sparse_column(batch)?;
    let (typed_key, text_key) = sparse_names(name)?;
    sparse_entries(map).find_map(|(_, key, value)| {
        let kind = tagged_kind(value)?;
        if key == typed_key && kind != PropKind::Text {
            Some(kind.data_type())
        } else if Some(key) == text_key && kind == PropKind::Text {
            Some(DataType::Utf8)
        } else {
            None
        }
    })
}

/// The property columns the sparse column of `batch` holds values of, with their types, each
/// once.
pub fn sparse_fields(batch: &RecordBatch) -> Vec<Field> {
    let Some(map) = sparse_column(batch) else {
        return Vec::new();
    };
    let mut seen: foldhash::HashMap<(&str, bool), PropKind> = foldhash::HashMap::default();
    for (_, key, value) in sparse_entries(map) {
        if let Some(kind) = tagged_kind(value) {
            seen.entry((key, kind == PropKind::Text)).or_insert(kind);
        }
    }
    let mut fields: Vec<Field> = seen
        .into_iter()
        .map(|((key, text), kind)| {
            let name = if text {
                property_text_column(key)
            } else {
                property_column(key)
            };
            Field::new(name, kind.data_type(), true)
        })
        .collect();
    fields.sort_by(|a, b| a.name().cmp(b.name()));
    fields
}

/// Columns `fields` of `batch`, as queries read them: the batch's own column of each name, or
/// else one built from the sparse column's values of it, or else nulls. One pass over the
/// sparse column builds every column it holds values of (a pass per column would make a query
/// of many rare keys read the map once for each).
pub fn property_arrays(batch: &RecordBatch, fields: &[&Field]) -> Vec<ArrayRef> {
    let rows = batch.num_rows();
    let map = sparse_column(batch);
    let mut out: Vec<Option<ArrayRef>> = Vec::with_capacity(fields.len());
    // Columns to build from the map, by (key, whether the key's text column).
    let mut wanted: foldhash::HashMap<(&str, bool), usize> = foldhash::HashMap::default();
    let mut built: Vec<(usize, PropKind, PropBuilder)> = Vec::new();
    for (i, field) in fields.iter().enumerate() {
        let data_type = field.data_type();
        if let Some(column) = batch.column_by_name(field.name()) {
            out.push(if column.data_type() == data_type {
                Some(Arc::clone(column))
            } else {
                // `properties.k#text` names both key `k`'s text column (Utf8) and key
                // `k#text`'s typed column, so batches may disagree on its type: read one as the
                // other where Arrow can.
                arrow::compute::cast(column, data_type).ok()
            });
            continue;
        }
        out.push(None);
        let Some((typed_key, text_key)) = map.and(sparse_names(field.name())) else {
            continue;
        };
        let Some(want) = PropKind::of(data_type) else {
            continue;
        };
        let key = match (want, text_key) {
            (PropKind::Text, Some(key)) => key,
            (PropKind::Text, None) => continue,
            _ => typed_key,
        };
        wanted
            .entry((key, want == PropKind::Text))
            .or_insert_with(|| {
                built.push((i, want, PropBuilder::of_kind(want, rows)));
                built.len() - 1
            });
    }
    if let Some(map) = map.filter(|_| !built.is_empty()) {
        for (row, key, value) in sparse_entries(map) {
            let Some(v) = untag(value) else {
                continue;
            };
            let kind = PropKind::of_value(v);
            let Some(&at) = wanted.get(&(key, kind == PropKind::Text)) else {
                continue;
            };
            let (_, want, builder) = &mut built[at];
            if kind != *want || builder.len() > row {
                continue;
            }
            builder.pad_to(row);
            builder.append(v);
        }
        for (i, _, mut builder) in built {
            builder.pad_to(rows);
            out[i] = Some(builder.finish().1);
        }
    }
    out.into_iter()
        .zip(fields)
        .map(|(column, f)| column.unwrap_or_else(|| new_null_array(f.data_type(), rows)))
        .collect()
}

/// The columns of a batch of [`ChunkBuilder`] layout, checked: the five fixed columns with
/// their types and no nulls, then typed property columns and text columns, each key once, then
/// perhaps the sparse column, every value of it tagged.
#[derive(Debug)]
pub struct BatchLayout<'a> {
    /// `uuid`.
    pub uuid: &'a arrow::array::StringArray,
    /// `event`.
    pub event: arrow::array::TypedDictionaryArray<'a, Int32Type, arrow::array::StringArray>,
    /// `timestamp`.
    pub timestamp: &'a arrow::array::TimestampMillisecondArray,
    /// `distinct_id`.
    pub distinct: arrow::array::TypedDictionaryArray<'a, Int32Type, arrow::array::StringArray>,
    /// `person_id`.
    pub person: &'a arrow::array::UInt64Array,
    typed: Vec<(&'a str, PropKind, &'a ArrayRef)>,
    texts: Vec<(&'a str, &'a ArrayRef)>,
    sparse: Option<&'a arrow::array::MapArray>,
}

impl<'a> BatchLayout<'a> {
    /// Checks `batch` and names its columns; an error says what is wrong.
    pub fn read(batch: &'a RecordBatch) -> Result<BatchLayout<'a>, ArrowError> {
        use arrow::array::{Array, AsArray};
        use arrow::datatypes::{TimestampMillisecondType, UInt64Type};
        let bad = |what: String| Err(ArrowError::InvalidArgumentError(what));
        let schema = batch.schema_ref();
        let fixed = fixed_fields();
        if schema.fields().len() < fixed.len() {
            return bad(format!(
                "{} columns, fewer than the fixed ones",
                schema.fields().len()
            ));
        }
        for (i, want) in fixed.iter().enumerate() {
            let got = schema.field(i);
            if got.name() != want.name() || got.data_type() != want.data_type() {
                return bad(format!(
                    "column {i} is {} {}, not {} {}",
                    got.name(),
                    got.data_type(),
                    want.name(),
                    want.data_type()
                ));
            }
            // Logical: a dictionary's nulls may be in its values, not its keys.
            if batch.column(i).logical_null_count() > 0 {
                return bad(format!("column {} has nulls", want.name()));
            }
        }
        let mut typed = Vec::new();
        let mut texts = Vec::new();
        let mut sparse = None;
        let columns = schema.fields().len();
        for (i, (field, column)) in schema
            .fields()
            .iter()
            .zip(batch.columns())
            .enumerate()
            .skip(fixed.len())
        {
            if field.name() == SPARSE_COLUMN {
                if i + 1 != columns {
                    return bad(format!("{SPARSE_COLUMN} is not the last column"));
                }
                let map = match (field.data_type() == &sparse_type(), column.as_map_opt()) {
                    (true, Some(map)) => map,
                    _ => {
                        return bad(format!(
                            "{SPARSE_COLUMN} has type {}, not {}",
                            field.data_type(),
                            sparse_type()
                        ));
                    }
                };
                if map.logical_null_count() > 0 || map.values().logical_null_count() > 0 {
                    return bad(format!("{SPARSE_COLUMN} has nulls"));
                }
                if let Some((_, key, value)) =
                    sparse_entries(map).find(|(_, _, value)| untag(value).is_none())
                {
                    return bad(format!("{SPARSE_COLUMN} holds {value:?} for {key:?}"));
                }
                sparse = Some(map);
                continue;
            }
            let Some(name) = field.name().strip_prefix(PROPERTY_PREFIX) else {
                return bad(format!("column {} is not a property", field.name()));
            };
            if *field.data_type() == DataType::Utf8 {
                let Some(key) = name.strip_suffix(TEXT_SUFFIX) else {
                    return bad(format!("text column {} lacks {TEXT_SUFFIX}", field.name()));
                };
                if texts.iter().any(|(k, _)| *k == key) {
                    return bad(format!("text column {} twice", field.name()));
                }
                texts.push((key, column));
            } else {
                let Some(kind) = PropKind::of(field.data_type()) else {
                    return bad(format!(
                        "column {} has type {}",
                        field.name(),
                        field.data_type()
                    ));
                };
                if kind == PropKind::Str {
                    // A null among the dictionary's values would read as a null appended whole
                    // and as "" value by value, and replicas take either way by their own rows.
                    if string_dictionary(column)?.values().null_count() > 0 {
                        return bad(format!(
                            "column {} has null dictionary values",
                            field.name()
                        ));
                    }
                }
                if typed.iter().any(|(k, _, _)| *k == name) {
                    return bad(format!("column {} twice", field.name()));
                }
                typed.push((name, kind, column));
            }
        }
        Ok(BatchLayout {
            uuid: batch.column(0).as_string::<i32>(),
            event: string_dictionary(batch.column(1))?,
            timestamp: batch.column(2).as_primitive::<TimestampMillisecondType>(),
            distinct: string_dictionary(batch.column(3))?,
            person: batch.column(4).as_primitive::<UInt64Type>(),
            typed,
            texts,
            sparse,
        })
    }
}

/// The Arrow builder of one property column.
enum PropBuilder {
    Str(StringDictionaryBuilder<Int32Type>),
    Num(Float64Builder),
    Bool(BooleanBuilder),
    Time(TimestampMillisecondBuilder),
    Text(StringBuilder),
}

impl PropBuilder {
    /// A builder of `kind` with room for `rows` rows. (Arrow's own default is room for 1,024,
    /// which a key with a handful of values would mostly leave empty.)
    fn of_kind(kind: PropKind, rows: usize) -> PropBuilder {
        match kind {
            PropKind::Str => PropBuilder::Str(StringDictionaryBuilder::with_capacity(rows, 16, 64)),
            PropKind::Num => PropBuilder::Num(Float64Builder::with_capacity(rows)),
            PropKind::Bool => PropBuilder::Bool(BooleanBuilder::with_capacity(rows)),
            PropKind::Time => PropBuilder::Time(
                TimestampMillisecondBuilder::with_capacity(rows).with_timezone("UTC"),
            ),
            PropKind::Text => PropBuilder::Text(StringBuilder::with_capacity(rows, 64)),
        }
    }

    /// Appends every value of `column`, a column of this builder's kind (checked by
    /// [`BatchLayout::read`]).
    fn extend(&mut self, column: &ArrayRef) -> Result<(), ArrowError> {
        use arrow::array::AsArray;
        use arrow::datatypes::{Float64Type, TimestampMillisecondType};
        match self {
            PropBuilder::Str(b) => b.extend_dictionary(&string_dictionary(column)?)?,
            PropBuilder::Num(b) => b.extend(column.as_primitive::<Float64Type>().iter()),
            PropBuilder::Bool(b) => b.append_array(column.as_boolean()),
            PropBuilder::Time(b) => {
                b.extend(column.as_primitive::<TimestampMillisecondType>().iter())
            }
            PropBuilder::Text(b) => b.append_array(column.as_string::<i32>())?,
        }
        Ok(())
    }

    fn len(&self) -> usize {
        match self {
            PropBuilder::Str(b) => b.len(),
            PropBuilder::Num(b) => b.len(),
            PropBuilder::Bool(b) => b.len(),
            PropBuilder::Time(b) => b.len(),
            PropBuilder::Text(b) => b.len(),
        }
    }

    /// Whether row `row` (below [`Self::len`]) holds a value.
    fn is_valid(&self, row: usize) -> bool {
        let validity = match self {
            PropBuilder::Str(b) => b.validity_slice(),
            PropBuilder::Num(b) => b.validity_slice(),
            PropBuilder::Bool(b) => b.validity_slice(),
            PropBuilder::Time(b) => b.validity_slice(),
            PropBuilder::Text(b) => b.validity_slice(),
        };
        validity.is_none_or(|bits| arrow::util::bit_util::get_bit(bits, row))
    }

    fn pad_to(&mut self, rows: usize) {
        let missing = rows.saturating_sub(self.len());
        match self {
            PropBuilder::Str(b) => (0..missing).for_each(|_| b.append_null()),
            PropBuilder::Num(b) => b.append_nulls(missing),
            PropBuilder::Bool(b) => b.append_nulls(missing),
            PropBuilder::Time(b) => b.append_nulls(missing),
            PropBuilder::Text(b) => (0..missing).for_each(|_| b.append_null()),
        }
    }

    /// Appends `v` if it is of this builder's kind; returns false otherwise.
    fn append(&mut self, v: CoercedRef<'_>) -> bool {
        match (self, v) {
            (PropBuilder::Str(b), CoercedRef::Str(s)) => b.append_value(s),
            (PropBuilder::Num(b), CoercedRef::Num(n)) => b.append_value(n),
            (PropBuilder::Bool(b), CoercedRef::Bool(x)) => b.append_value(x),
            (PropBuilder::Time(b), CoercedRef::DateTimeMs(ms)) => b.append_value(ms),
            (PropBuilder::Text(b), CoercedRef::Mismatch(s)) => b.append_value(s),
            _ => return false,
        }
        true
    }

    fn finish(&mut self) -> (DataType, ArrayRef) {
        match self {
            PropBuilder::Str(b) => (dictionary_type(), Arc::new(b.finish())),
            PropBuilder::Num(b) => (DataType::Float64, Arc::new(b.finish())),
            PropBuilder::Bool(b) => (DataType::Boolean, Arc::new(b.finish())),
            PropBuilder::Time(b) => (timestamp_type(), Arc::new(b.finish())),
            PropBuilder::Text(b) => (DataType::Utf8, Arc::new(b.finish())),
        }
    }

    fn finish_cloned(&self) -> (DataType, ArrayRef) {
        match self {
            PropBuilder::Str(b) => (dictionary_type(), Arc::new(b.finish_cloned())),
            PropBuilder::Num(b) => (DataType::Float64, Arc::new(b.finish_cloned())),
            PropBuilder::Bool(b) => (DataType::Boolean, Arc::new(b.finish_cloned())),
            PropBuilder::Time(b) => (timestamp_type(), Arc::new(b.finish_cloned())),
            PropBuilder::Text(b) => (DataType::Utf8, Arc::new(b.finish_cloned())),
        }
    }
}

/// A value of a key held for the sparse column, its text in the builder's [`Store`].
#[derive(Debug, Clone, Copy)]
enum Held {
    Str(usize, u32),
    Num(f64),
    Bool(bool),
    Time(i64),
    Text(usize, u32),
}

impl Held {
    fn hold(v: CoercedRef<'_>, arena: &mut String) -> Held {
        let mut keep = |s: &str| {
            let start = arena.len();
            arena.push_str(s);
            (start, s.len() as u32)
        };
        match v {
            CoercedRef::Str(s) => {
                let (start, len) = keep(s);
                Held::Str(start, len)
            }
            CoercedRef::Num(n) => Held::Num(n),
            CoercedRef::Bool(b) => Held::Bool(b),
            CoercedRef::DateTimeMs(ms) => Held::Time(ms),
            CoercedRef::Mismatch(s) => {
                let (start, len) = keep(s);
                Held::Text(start, len)
            }
        }
    }

    fn get(self, arena: &str) -> CoercedRef<'_> {
        match self {
            Held::Str(start, len) => CoercedRef::Str(&arena[start..start + len as usize]),
            Held::Num(n) => CoercedRef::Num(n),
            Held::Bool(b) => CoercedRef::Bool(b),
            Held::Time(ms) => CoercedRef::DateTimeMs(ms),
            Held::Text(start, len) => CoercedRef::Mismatch(&arena[start..start + len as usize]),
        }
    }

    /// The slot of [`KeyColumns`] the value belongs to.
    fn slot(self) -> usize {
        match self {
            Held::Text(..) => TEXT,
            _ => TYPED,
        }
    }
}

/// Slots of [`KeyColumns`]: a key's typed values, and its values that did not fit the type.
const TYPED: usize = 0;
const TEXT: usize = 1;

/// A key's values in a [`ChunkBuilder`]: for each slot, a column if its values are common
/// enough in the rows, else entries for the sparse column.
#[derive(Default)]
struct KeyColumns {
    /// The typed column's kind: the first typed value's (values of another type go to text).
    kind: Option<PropKind>,
    /// The typed column and the text column, when a slot's values have one.
    columns: [Option<Box<PropBuilder>>; 2],
    /// Values of each slot.
    values: [usize; 2],
    /// Values of the slots without a column, by row (rows ascending).
    sparse: Vec<(u32, Held)>,
}

/// What a [`ChunkBuilder`]'s keys share: the text of values held for the sparse column, and
/// the room new columns start with.
#[derive(Debug, Default)]
struct Store {
    text: String,
    /// Rows the builder expects (a proposal knows its events), so that its first columns start
    /// with room for them instead of growing to it.
    expected_rows: usize,
    /// Columns that may still start with room for `expected_rows`: enough for the keys events
    /// commonly carry, and few enough that keys a client makes up cannot make them rows ×
    /// keys.
    presized_left: usize,
}

/// How many columns of a builder start with room for its expected rows.
const PRESIZED_COLUMNS: usize = 64;

impl Store {
    /// The room a new column of a builder with `rows` rows so far starts with.
    fn room(&mut self, rows: usize) -> usize {
        if self.expected_rows > rows && self.presized_left > 0 {
            self.presized_left -= 1;
            self.expected_rows
        } else {
            rows
        }
    }
}

impl KeyColumns {
    fn slot_kind(&self, slot: usize) -> PropKind {
        if slot == TEXT {
            PropKind::Text
        } else {
            self.kind.expect("a typed value set the kind")
        }
    }

    /// Adds `v` (of `slot`'s kind) at `row`. A second value of a slot in one row is dropped.
    fn add(&mut self, slot: usize, row: usize, v: CoercedRef<'_>, store: &mut Store) {
        if let Some(column) = &mut self.columns[slot] {
            let len = column.len();
            if len > row && column.is_valid(row) {
                return;
            }
            if len == row || (len < row && !too_sparse(self.values[slot] + 1, row + 1)) {
                column.pad_to(row);
                column.append(v);
                self.values[slot] += 1;
                return;
            }
            // Too sparse now, or a row the column has passed (a batch's values come column by
            // column and then from its sparse column, so a key's values that change slot may
            // come out of row order): sparse entries take any row.
            self.demote(slot, store);
        }
        let at = self.sparse.partition_point(|(r, _)| *r as usize <= row);
        let taken = self.sparse[..at]
            .iter()
            .rev()
            .take_while(|(r, _)| *r as usize == row)
            .any(|(_, held)| held.slot() == slot);
        if taken {
            return;
        }
        self.sparse
            .insert(at, (row as u32, Held::hold(v, &mut store.text)));
        self.values[slot] += 1;
        // Rows ascend, so the last entry's row is the latest, at or past `row`.
        let rows = self.sparse.last().map_or(row, |(r, _)| *r as usize) + 1;
        if dense_enough(self.values[slot], rows) {
            self.promote(slot, rows, store);
        }
    }

    /// Appends column `column` (of `slot`'s kind) of a batch whose rows start at `start`.
    fn add_column(
        &mut self,
        slot: usize,
        column: &ArrayRef,
        start: usize,
        store: &mut Store,
    ) -> Result<(), ArrowError> {
        let rows = column.len();
        let values = rows - column.logical_null_count();
        if values == 0 {
            return Ok(());
        }
        let (total, end) = (self.values[slot] + values, start + rows);
        let whole = match self.columns[slot].as_ref().map(|c| c.len()) {
            // Values already held in the batch's rows (only a malformed batch has a key's
            // values twice) leave it to `add`, which takes rows in any order.
            Some(len) if len > start => false,
            None if self
                .sparse
                .last()
                .is_some_and(|(r, _)| *r as usize >= start) =>
            {
                false
            }
            Some(_) if too_sparse(total, end) => {
                self.demote(slot, store);
                false
            }
            Some(_) => true,
            None if dense_enough(total, end) => {
                self.promote(slot, end, store);
                true
            }
            None => false,
        };
        if whole {
            let column_builder = self.columns[slot].as_mut().expect("a column");
            column_builder.pad_to(start);
            column_builder.extend(column)?;
            self.values[slot] = total;
        } else {
            let kind = self.slot_kind(slot);
            for row in 0..rows {
                if let Some(v) = typed_value(column, kind, row) {
                    self.add(slot, start + row, v, store);
                }
            }
        }
        Ok(())
    }

    /// Gives `slot` a column, holding its sparse entries, with room for `rows` rows or the rows
    /// the builder expects.
    fn promote(&mut self, slot: usize, rows: usize, store: &mut Store) {
        let mut column = PropBuilder::of_kind(self.slot_kind(slot), store.room(rows));
        self.sparse.retain(|&(row, v)| {
            if v.slot() != slot {
                return true;
            }
            column.pad_to(row as usize);
            column.append(v.get(&store.text));
            false
        });
        self.columns[slot] = Some(Box::new(column));
    }

    /// Moves `slot`'s column into sparse entries.
    fn demote(&mut self, slot: usize, store: &mut Store) {
        let Some(mut column) = self.columns[slot].take() else {
            return;
        };
        let kind = self.slot_kind(slot);
        let (_, array) = column.finish();
        for row in 0..array.len() {
            if let Some(v) = typed_value(&array, kind, row) {
                self.sparse
                    .push((row as u32, Held::hold(v, &mut store.text)));
            }
        }
        // Stable: values of one row keep their order.
        self.sparse.sort_by_key(|(row, _)| *row);
    }
}

/// Arrow builders that events are appended to as they are applied, so unsealed rows are held
/// columnar (a tenth of the memory of the events themselves) and sealing only sorts them.
/// A key's values have a column while they fill enough of the rows, and are otherwise held for
/// the sparse column ([`SPARSE_COLUMN`]), so rows cost what their values take whatever their
/// keys.
pub struct ChunkBuilder {
    rows: usize,
    uuid: StringBuilder,
    event: StringDictionaryBuilder<Int32Type>,
    timestamp: TimestampMillisecondBuilder,
    distinct: StringDictionaryBuilder<Int32Type>,
    person: UInt64Builder,
    // Hashed, not ordered: every property of every event looks its key up, and a tree of a
    // few dozen keys cost several string comparisons each. Batches put the columns in key
    // order, so it is the same whatever order properties arrived in.
    keys: foldhash::HashMap<String, KeyColumns>,
    store: Store,
}

impl std::fmt::Debug for ChunkBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkBuilder")
            .field("rows", &self.rows)
            .field("properties", &self.keys.len())
            .finish()
    }
}

impl Default for ChunkBuilder {
    fn default() -> ChunkBuilder {
        ChunkBuilder {
            rows: 0,
            uuid: StringBuilder::new(),
            event: StringDictionaryBuilder::new(),
            timestamp: TimestampMillisecondBuilder::new().with_timezone("UTC"),
            distinct: StringDictionaryBuilder::new(),
            person: UInt64Builder::new(),
            keys: foldhash::HashMap::default(),
            store: Store::default(),
        }
    }
}

/// A key's values as a batch is made of them: a column per slot, or sparse entries.
struct KeyOut<'a> {
    key: &'a str,
    kind: Option<PropKind>,
    columns: [Option<(DataType, ArrayRef)>; 2],
    values: [usize; 2],
    sparse: &'a [(u32, Held)],
}

impl ChunkBuilder {
    /// A builder for about `rows` rows (a proposal's events): the columns of the keys events
    /// commonly carry start with room for them.
    pub fn with_expected_rows(rows: usize) -> ChunkBuilder {
        let mut builder = ChunkBuilder::default();
        builder.store.expected_rows = rows;
        builder.store.presized_left = PRESIZED_COLUMNS;
        builder
    }

    /// Rows appended since the last [`ChunkBuilder::finish`].
    pub fn len(&self) -> usize {
        self.rows
    }

    /// Whether no rows are held.
    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    /// Adds `v` as key `key`'s value at `row`. A value of another type than the key's first
    /// goes to the key's text column, rendered.
    fn add(&mut self, key: &str, row: usize, v: CoercedRef<'_>) {
        let columns = match self.keys.get_mut(key) {
            Some(c) => c,
            None => self.keys.entry(key.to_string()).or_default(),
        };
        let kind = PropKind::of_value(v);
        if kind != PropKind::Text && columns.kind.is_none() {
            columns.kind = Some(kind);
        }
        if kind == PropKind::Text || columns.kind == Some(kind) {
            let slot = if kind == PropKind::Text { TEXT } else { TYPED };
            columns.add(slot, row, v, &mut self.store);
        } else {
            let text = render_coerced(v);
            columns.add(TEXT, row, CoercedRef::Mismatch(&text), &mut self.store);
        }
    }

    /// Appends one event as a row.
    pub fn append(&mut self, e: &impl EventRow) {
        let row = self.rows;
        self.uuid.append_value(e.message_id());
        self.event.append_value(e.event());
        self.timestamp.append_value(e.timestamp_ms());
        self.distinct.append_value(e.distinct_id());
        self.person.append_value(e.person_id());
        // A key given twice in one event keeps its first value: a second would make the
        // column a row longer than the chunk. (Ingestion keeps one value per key; this guards
        // entries written before it did, and any other way to an event.)
        for (key, value) in e.props() {
            self.add(key, row, value);
        }
        self.rows += 1;
    }

    /// Appends the rows of a batch of this layout (another builder's [`Self::finish`], as a
    /// leader replicates its proposals) column by column: for such a batch, the rows
    /// [`Self::append`] of each of its events would give, without reading the events one by
    /// one. (Rows filtered out of such a batch leave their strings in its dictionaries, and a
    /// key retyped within one batch has sent its later values to the key's text column; every
    /// replica appends the same batches, so they agree.) A batch not of this layout is refused
    /// with nothing appended; past that check only a column outgrowing Arrow's 32-bit offsets
    /// fails.
    pub fn append_batch(&mut self, batch: &RecordBatch) -> Result<(), ArrowError> {
        let layout = BatchLayout::read(batch)?;
        let start = self.rows;
        let rows = batch.num_rows();
        if rows == 0 {
            // (A dictionary of values without keys is refused by `extend_dictionary`.)
            return Ok(());
        }
        self.uuid.append_array(layout.uuid)?;
        self.event.extend_dictionary(&layout.event)?;
        self.timestamp.append_slice(layout.timestamp.values());
        self.distinct.extend_dictionary(&layout.distinct)?;
        self.person.append_slice(layout.person.values());
        let mut retyped: Vec<&str> = Vec::new();
        for &(key, kind, column) in &layout.typed {
            if arrow::array::Array::logical_null_count(column.as_ref()) == rows {
                continue;
            }
            let columns = match self.keys.get_mut(key) {
                Some(c) => c,
                None => self.keys.entry(key.to_string()).or_default(),
            };
            columns.kind.get_or_insert(kind);
            if columns.kind == Some(kind) {
                columns.add_column(TYPED, column, start, &mut self.store)?;
            } else {
                // Another type than this builder's column of the key: as `append`, the values
                // go to the key's text column, in row order with the batch's text values of the
                // key (added after them, those would come out of row order, and each would send
                // the key's text column back to sparse entries).
                let text = layout
                    .texts
                    .iter()
                    .find(|(k, _)| *k == key)
                    .map(|(_, c)| *c);
                for row in 0..rows {
                    let value = typed_value(column, kind, row)
                        .or_else(|| text.and_then(|c| typed_value(c, PropKind::Text, row)));
                    if let Some(v) = value {
                        self.add(key, start + row, v);
                    }
                }
                retyped.push(key);
            }
        }
        for &(key, column) in &layout.texts {
            if retyped.contains(&key) {
                continue;
            }
            let columns = match self.keys.get_mut(key) {
                Some(c) => c,
                None => self.keys.entry(key.to_string()).or_default(),
            };
            columns.add_column(TEXT, column, start, &mut self.store)?;
        }
        if let Some(map) = layout.sparse {
            for (row, key, value) in sparse_entries(map) {
                let v = untag(value).expect("checked by BatchLayout::read");
                self.add(key, start + row, v);
            }
        }
        self.rows += rows;
        Ok(())
    }

    /// The rows so far as a batch, in the order they were appended; the builder keeps them.
    pub fn snapshot(&self) -> RecordBatch {
        let fixed = [
            Arc::new(self.uuid.finish_cloned()) as ArrayRef,
            Arc::new(self.event.finish_cloned()),
            Arc::new(self.timestamp.finish_cloned()),
            Arc::new(self.distinct.finish_cloned()),
            Arc::new(self.person.finish_cloned()),
        ];
        let keys = self
            .keys
            .iter()
            .map(|(key, c)| KeyOut {
                key,
                kind: c.kind,
                columns: [TYPED, TEXT].map(|s| c.columns[s].as_ref().map(|b| b.finish_cloned())),
                values: c.values,
                sparse: &c.sparse,
            })
            .collect();
        assemble(self.rows, fixed, keys, &self.store.text)
    }

    /// The rows as a batch, in the order they were appended; the builder is left empty. The
    /// batch takes over the builders' buffers instead of copying them, as [`Self::snapshot`]
    /// must: a seal starts with this, on the apply path of its partition, and the copy of tens
    /// of thousands of rows held that partition's apply (and commits) up for milliseconds.
    pub fn finish(&mut self) -> RecordBatch {
        let mut built = std::mem::take(self);
        let rows = built.rows;
        let fixed = [
            Arc::new(built.uuid.finish()) as ArrayRef,
            Arc::new(built.event.finish()),
            Arc::new(built.timestamp.finish()),
            Arc::new(built.distinct.finish()),
            Arc::new(built.person.finish()),
        ];
        let keys = built
            .keys
            .iter_mut()
            .map(|(key, c)| {
                let values = c.values;
                let columns = [TYPED, TEXT].map(|s| {
                    c.columns[s].as_mut().map(|b| {
                        // Padded in the builder when it stays a column, so `assemble` has
                        // nothing to copy.
                        if !too_sparse(values[s], rows) {
                            b.pad_to(rows);
                        }
                        b.finish()
                    })
                });
                KeyOut {
                    key,
                    kind: c.kind,
                    columns,
                    values,
                    sparse: &c.sparse,
                }
            })
            .collect();
        assemble(rows, fixed, keys, &built.store.text)
    }
}

/// A batch of `rows` rows from the fixed columns, then the property columns and the columns of
/// mismatched values, each in key order and padded with nulls to `rows`, then, if any key's
/// values are too few for a column, the sparse column.
fn assemble(
    rows: usize,
    fixed: [ArrayRef; 5],
    mut keys: Vec<KeyOut<'_>>,
    arena: &str,
) -> RecordBatch {
    keys.sort_unstable_by(|a, b| a.key.cmp(b.key));
    let mut fields = fixed_fields();
    let mut columns: Vec<ArrayRef> = fixed.into();
    // Sparse entries: (row, key, tagged value's range in `tagged`), in key order.
    let mut entries: Vec<(u32, &str, std::ops::Range<usize>)> = Vec::new();
    let mut tagged = String::new();
    let mut hold = |row: u32, key, v: CoercedRef<'_>, entries: &mut Vec<_>| {
        let start = tagged.len();
        tag_value(v, &mut tagged);
        entries.push((row, key, start..tagged.len()));
    };
    for slot in [TYPED, TEXT] {
        for out in &mut keys {
            let Some((ty, array)) = out.columns[slot].take() else {
                continue;
            };
            if !too_sparse(out.values[slot], rows) {
                let name = if slot == TEXT {
                    property_text_column(out.key)
                } else {
                    property_column(out.key)
                };
                fields.push(Field::new(name, ty, true));
                columns.push(pad_with_nulls(array, rows));
                continue;
            }
            let kind = if slot == TEXT {
                PropKind::Text
            } else {
                out.kind.expect("a typed column has a kind")
            };
            for row in 0..array.len() {
                if let Some(v) = typed_value(&array, kind, row) {
                    hold(row as u32, out.key, v, &mut entries);
                }
            }
        }
    }
    for out in &keys {
        for &(row, v) in out.sparse {
            hold(row, out.key, v.get(arena), &mut entries);
        }
    }
    if !entries.is_empty() {
        let mut order: Vec<usize> = (0..entries.len()).collect();
        // Stable: within a row, entries keep key order.
        order.sort_by_key(|&i| entries[i].0);
        let mut map = arrow::array::MapBuilder::with_capacity(
            None,
            arrow::array::LargeStringBuilder::with_capacity(entries.len(), entries.len() * 8),
            arrow::array::LargeStringBuilder::with_capacity(entries.len(), tagged.len()),
            rows,
        )
        .with_values_field(Field::new("values", DataType::LargeUtf8, false));
        let mut next = order.iter().peekable();
        for row in 0..rows as u32 {
            while let Some(&&i) = next.peek() {
                if entries[i].0 != row {
                    break;
                }
                map.keys().append_value(entries[i].1);
                map.values().append_value(&tagged[entries[i].2.clone()]);
                next.next();
            }
            map.append(true).expect("keys and values appended alike");
        }
        let map = map.finish();
        fields.push(Field::new(SPARSE_COLUMN, sparse_type(), false));
        columns.push(Arc::new(map));
    }
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)
        .expect("columns match their fields")
}

/// `array` extended with nulls to `rows` (rows after a property's last value have none).
fn pad_with_nulls(array: ArrayRef, rows: usize) -> ArrayRef {
    if array.len() >= rows {
        return array;
    }
    let nulls = arrow::array::new_null_array(array.data_type(), rows - array.len());
    arrow::compute::concat(&[array.as_ref(), nulls.as_ref()]).expect("same data type")
}

fn render_coerced(v: CoercedRef<'_>) -> String {
    match v {
        CoercedRef::Str(s) | CoercedRef::Mismatch(s) => s.to_string(),
        CoercedRef::Num(n) => optiprism_types::event::render_number(n),
        CoercedRef::Bool(b) => b.to_string(),
        CoercedRef::DateTimeMs(ms) => chrono::DateTime::from_timestamp_millis(ms)
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
            .unwrap_or_default(),
    }
}

/// Seals `rows` (a [`ChunkBuilder`]'s batch) of `project` into a chunk: sorted by (event,
/// person, time), ties in arrival order, encoded and compressed.
pub fn seal(project: ProjectId, id: u64, rows: &RecordBatch) -> (ChunkMeta, Vec<u8>, RecordBatch) {
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::{TimestampMillisecondType, UInt64Type};
    let events = rows.column(1).as_dictionary::<Int32Type>();
    let names = events.values().as_string::<i32>();
    // Rank each dictionary entry by its name, so rows sort by integers, not strings.
    let mut by_name: Vec<usize> = (0..names.len()).collect();
    by_name.sort_by_key(|&i| names.value(i));
    let mut rank = vec![0u32; names.len()];
    for (r, &i) in by_name.iter().enumerate() {
        rank[i] = r as u32;
    }
    let persons = rows.column(4).as_primitive::<UInt64Type>().values();
    let times = rows
        .column(2)
        .as_primitive::<TimestampMillisecondType>()
        .values();
    let mut order: Vec<(u32, u64, i64, u32)> = events
        .keys()
        .values()
        .iter()
        .enumerate()
        .map(|(row, &key)| (rank[key as usize], persons[row], times[row], row as u32))
        .collect();
    order.sort_unstable();
    let indices = arrow::array::UInt32Array::from_iter_values(order.iter().map(|o| o.3));
    let batch = arrow::compute::take_record_batch(rows, &indices).expect("indices are in range");
    let mut event_rows: Vec<(String, u64, u64)> = Vec::new();
    let mut last_rank = None;
    for (row, (r, ..)) in order.iter().enumerate() {
        match event_rows.last_mut() {
            Some((_, _, len)) if last_rank == Some(*r) => *len += 1,
            _ => {
                let name = names.value(by_name[*r as usize]).to_string();
                event_rows.push((name, row as u64, 1));
                last_rank = Some(*r);
            }
        }
    }
    let bytes = encode(&batch);
    let meta = ChunkMeta {
        project,
        id,
        rows: batch.num_rows() as u64,
        min_ts: times.iter().copied().min().unwrap_or(0),
        max_ts: times.iter().copied().max().unwrap_or(0),
        min_person: persons.iter().copied().min().unwrap_or(0),
        max_person: persons.iter().copied().max().unwrap_or(0),
        event_rows,
        bytes: bytes.len() as u64,
    };
    (meta, bytes, batch)
}

/// Encodes a batch as LZ4-compressed Arrow IPC.
pub fn encode(batch: &RecordBatch) -> Vec<u8> {
    let options = IpcWriteOptions::default()
        .try_with_compression(Some(CompressionType::LZ4_FRAME))
        .expect("lz4 is compiled in");
    // Room for about what the compressed body takes: a seal's body is megabytes, and growing
    // the buffer by doubling copies it over and over (reallocation showed in the sealer's
    // profile).
    let mut out = Vec::with_capacity(batch.get_array_memory_size() / 2);
    {
        let mut writer = StreamWriter::try_new_with_options(&mut out, &batch.schema(), options)
            .expect("writing to a Vec");
        writer.write(batch).expect("writing to a Vec");
        writer.finish().expect("writing to a Vec");
    }
    out
}

/// Decodes a chunk body written by [`encode`].
pub fn decode(bytes: &[u8]) -> Result<RecordBatch, arrow::error::ArrowError> {
    let reader = StreamReader::try_new(std::io::Cursor::new(bytes), None)?;
    let schema: SchemaRef = reader.schema();
    let batches: Vec<RecordBatch> = reader.collect::<Result<_, _>>()?;
    arrow::compute::concat_batches(&schema, &batches)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Array, AsArray};
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    /// The Arrow batch of `events`, in the given order.
    fn build_batch(events: &[StoredEvent]) -> RecordBatch {
        let mut builder = ChunkBuilder::default();
        events.iter().for_each(|e| builder.append(e));
        builder.finish()
    }

    fn event(i: u64, props: Vec<(String, Coerced)>) -> StoredEvent {
        StoredEvent {
            message_id: format!("m{i}"),
            distinct_id: format!("u{}", i % 3),
            person_id: i % 3,
            event: if i.is_multiple_of(2) {
                "a".into()
            } else {
                "b".into()
            },
            timestamp_ms: 1_000 + i as i64,
            props,
            person_set: vec![],
            person_set_once: vec![],
        }
    }

    #[test]
    fn batches_with_null_fixed_values_are_refused_and_empty_ones_append_nothing() {
        use arrow::array::{DictionaryArray, Int32Array, StringArray};
        let mut one = ChunkBuilder::default();
        one.append(&event(0, vec![]));
        let good = one.finish();
        // A null in the values of the `event` dictionary, none in its keys.
        let null_name: DictionaryArray<Int32Type> = DictionaryArray::new(
            Int32Array::from(vec![0]),
            Arc::new(StringArray::from(vec![None::<&str>])),
        );
        let mut columns = good.columns().to_vec();
        columns[1] = Arc::new(null_name);
        let bad = RecordBatch::try_new(good.schema(), columns).unwrap();
        let mut builder = ChunkBuilder::default();
        assert!(builder.append_batch(&bad).is_err());
        // No rows, but a dictionary with a value: nothing appended, no error.
        let empty = good.slice(0, 0);
        builder.append_batch(&empty).unwrap();
        builder.append_batch(&good).unwrap();
        assert_eq!(builder.len(), 1);
        assert_eq!(builder.finish(), good);
    }

    #[test]
    fn a_key_given_twice_in_one_event_keeps_its_first_value() {
        let mut builder = ChunkBuilder::default();
        builder.append(&event(
            0,
            vec![
                ("n".into(), Coerced::Num(1.0)),
                ("n".into(), Coerced::Num(2.0)),
                ("s".into(), Coerced::Mismatch("a".into())),
                ("s".into(), Coerced::Mismatch("b".into())),
            ],
        ));
        builder.append(&event(1, vec![("n".into(), Coerced::Num(3.0))]));
        let batch = builder.finish();
        assert_eq!(batch.num_rows(), 2);
        let n = batch.column_by_name("properties.n").unwrap();
        let n = n.as_primitive::<arrow::datatypes::Float64Type>();
        assert_eq!(n.values().to_vec(), vec![1.0, 3.0]);
        let s = batch.column_by_name("properties.s#text").unwrap();
        assert_eq!(s.as_string::<i32>().value(0), "a");
    }

    #[test]
    fn columns_are_in_key_order_whatever_order_properties_arrive_in() {
        let keys = ["zone", "a", "m", "b9", "b10", "plan"];
        let columns = |keys: &[&str]| {
            let props = keys
                .iter()
                .map(|k| (k.to_string(), Coerced::Str("v".into())))
                .chain(
                    keys.iter()
                        .map(|k| (format!("{k}!"), Coerced::Mismatch("x".into()))),
                )
                .collect();
            let mut builder = ChunkBuilder::default();
            builder.append(&event(0, props));
            let snapshot = builder.snapshot();
            let finished = builder.finish();
            assert_eq!(snapshot, finished);
            finished
                .schema()
                .fields()
                .iter()
                .map(|f| f.name().clone())
                .collect::<Vec<_>>()
        };
        let forward = columns(&keys);
        let mut reversed = keys;
        reversed.reverse();
        assert_eq!(columns(&reversed), forward);
        let mut typed: Vec<String> = keys.iter().map(|k| property_column(k)).collect();
        typed.sort();
        let mut texts: Vec<String> = keys
            .iter()
            .map(|k| property_text_column(&format!("{k}!")))
            .collect();
        texts.sort();
        let expected: Vec<String> = fixed_fields()
            .iter()
            .map(|f| f.name().clone())
            .chain(typed)
            .chain(texts)
            .collect();
        assert_eq!(forward, expected);
    }

    #[test]
    fn sparse_and_mismatched_properties_land_in_their_columns() {
        let events = [
            event(
                0,
                vec![
                    ("plan".into(), Coerced::Str("pro".into())),
                    ("price".into(), Coerced::Num(10.0)),
                ],
            ),
            event(1, vec![("price".into(), Coerced::Mismatch("abc".into()))]),
            event(2, vec![]),
        ];
        let (meta, bytes, batch) = seal(ProjectId(1), 7, &build_batch(&events));
        assert_eq!(meta.rows, 3);
        assert_eq!(
            meta.event_rows,
            [("a".to_string(), 0, 2), ("b".to_string(), 2, 1)]
        );
        let back = decode(&bytes).unwrap();
        assert_eq!(back, batch);
        let price = back
            .column_by_name("properties.price")
            .unwrap()
            .as_primitive::<arrow::datatypes::Float64Type>();
        assert_eq!(price.null_count(), 2);
        let text = back
            .column_by_name("properties.price#text")
            .unwrap()
            .as_string::<i32>();
        assert_eq!(text.iter().flatten().collect::<Vec<_>>(), ["abc"]);
    }

    /// Every property value of `batch` by (row, column name), from its own columns and its
    /// sparse column alike. The sparse column is read entry by entry here, and checked against
    /// columns [`property_arrays`] builds from it for queries.
    fn values_of(batch: &RecordBatch) -> BTreeMap<(usize, String), String> {
        let mut out = BTreeMap::new();
        let mut record = |row: usize, name: String, v: CoercedRef<'_>| {
            let previous = out.insert((row, name.clone()), format!("{v:?}"));
            assert_eq!(previous, None, "two values of {name} in row {row}");
        };
        let own = batch
            .schema()
            .fields()
            .iter()
            .skip(fixed_fields().len())
            .filter(|f| f.name() != SPARSE_COLUMN)
            .map(|f| f.as_ref().clone())
            .collect::<Vec<_>>();
        for field in &own {
            let column = batch.column_by_name(field.name()).unwrap();
            let kind = PropKind::of(field.data_type()).unwrap();
            for row in 0..column.len() {
                if let Some(v) = typed_value(column, kind, row) {
                    record(row, field.name().clone(), v);
                }
            }
        }
        if let Some(map) = sparse_column(batch) {
            for (row, key, value) in sparse_entries(map) {
                let v = untag(value).unwrap();
                let name = match v {
                    CoercedRef::Mismatch(_) => property_text_column(key),
                    _ => property_column(key),
                };
                record(row, name, v);
            }
        }
        // Columns built from the sparse column, as queries build them, hold the same (checked
        // on a hundred of them at most: each is as long as the batch).
        let sparse = sparse_fields(batch);
        let step = sparse.len().div_ceil(100).max(1);
        let sparse: Vec<Field> = sparse.into_iter().step_by(step).collect();
        let fields: Vec<&Field> = sparse.iter().collect();
        for (field, column) in sparse.iter().zip(property_arrays(batch, &fields)) {
            assert_eq!(column.len(), batch.num_rows(), "{}", field.name());
            for row in 0..column.len() {
                let v = typed_value(&column, PropKind::of(field.data_type()).unwrap(), row)
                    .map(|v| format!("{v:?}"));
                assert_eq!(
                    v.as_ref(),
                    out.get(&(row, field.name().clone())),
                    "{} row {row}",
                    field.name()
                );
            }
        }
        out
    }

    /// Column `name` of `batch` as queries read it, as `data_type`.
    fn property_array(batch: &RecordBatch, name: &str, data_type: &DataType) -> ArrayRef {
        let field = Field::new(name, data_type.clone(), true);
        property_arrays(batch, &[&field]).pop().unwrap()
    }

    /// What [`values_of`] should find for `events`: a key's column has the type of its first
    /// typed value, and its values of other types are in its text column, rendered.
    fn expected_values(events: &[StoredEvent]) -> BTreeMap<(usize, String), String> {
        let mut kinds: BTreeMap<&str, PropKind> = BTreeMap::new();
        let mut out = BTreeMap::new();
        for (row, e) in events.iter().enumerate() {
            for (key, value) in &e.props {
                let v = CoercedRef::from(value);
                let kind = PropKind::of_value(v);
                let typed = kind != PropKind::Text && *kinds.entry(key).or_insert(kind) == kind;
                let (name, shown) = if typed {
                    (property_column(key), format!("{v:?}"))
                } else {
                    let text = render_coerced(v);
                    (
                        property_text_column(key),
                        format!("{:?}", CoercedRef::Mismatch(&text)),
                    )
                };
                out.entry((row, name)).or_insert(shown);
            }
        }
        out
    }

    /// Checks what bounds a builder's memory: a column of a key has at most [`SPARSE_FILL`]
    /// rows per value of it.
    fn columns_are_full_enough(builder: &ChunkBuilder) -> Result<(), String> {
        for (key, c) in &builder.keys {
            for slot in [TYPED, TEXT] {
                if let Some(column) = &c.columns[slot]
                    && column.len() > SPARSE_FILL * c.values[slot]
                {
                    return Err(format!(
                        "{key}: a column of {} rows for {} values",
                        column.len(),
                        c.values[slot]
                    ));
                }
            }
        }
        Ok(())
    }

    #[test]
    fn events_with_keys_of_their_own_cost_what_their_values_take() {
        // Each event has one key no other has (an id used as a name), and one all share.
        let events: Vec<StoredEvent> = (0..5_000u64)
            .map(|i| {
                let props = vec![
                    (format!("order_{i}"), Coerced::Num(i as f64)),
                    ("plan".to_string(), Coerced::Str(format!("p{}", i % 3))),
                ];
                event(i, props)
            })
            .collect();
        // As a proposal's builder: its first columns start with room for every row.
        let mut builder = ChunkBuilder::with_expected_rows(events.len());
        for e in &events {
            builder.append(e);
        }
        columns_are_full_enough(&builder).unwrap();
        let snapshot = builder.snapshot();
        let batch = builder.finish();
        assert_eq!(snapshot, batch);
        // As columns these would be 5,000 of 5,000 rows each: over a hundred megabytes.
        let bytes = batch.get_array_memory_size();
        assert!(bytes < 200 * events.len(), "{bytes} bytes");
        assert!(batch.column_by_name("properties.plan").is_some());
        assert!(batch.column_by_name("properties.order_7").is_none());
        assert_eq!(values_of(&batch), expected_values(&events));
        // A replica appending the batch, and a chunk sealed from it, hold the same.
        let mut replica = ChunkBuilder::default();
        replica.append_batch(&batch).unwrap();
        columns_are_full_enough(&replica).unwrap();
        assert_eq!(values_of(&replica.finish()), expected_values(&events));
        let (_, bytes, sealed) = seal(ProjectId(1), 1, &batch);
        assert_eq!(decode(&bytes).unwrap(), sealed);
        let order_7 = property_array(&sealed, "properties.order_7", &DataType::Float64);
        assert_eq!(order_7.len() - order_7.null_count(), 1);
        assert_eq!(
            sparse_field_type(&sealed, "properties.order_7"),
            Some(DataType::Float64)
        );
        assert_eq!(sparse_field_type(&sealed, "properties.order_7#text"), None);
    }

    #[test]
    fn a_proposal_presizes_the_columns_of_its_first_keys_only() {
        // A first event with 100 keys: each is worth a column at once, and the first
        // `PRESIZED_COLUMNS` start with room for the 1,000 rows expected.
        let props = (0..100)
            .map(|k| (format!("k{k}"), Coerced::Num(k as f64)))
            .collect();
        let mut builder = ChunkBuilder::with_expected_rows(1_000);
        builder.append(&event(0, props));
        let presized = builder
            .keys
            .values()
            .filter(|c| match c.columns[TYPED].as_deref() {
                Some(PropBuilder::Num(b)) => b.capacity() >= 1_000,
                _ => false,
            })
            .count();
        assert_eq!(builder.keys.len(), 100);
        assert_eq!(presized, PRESIZED_COLUMNS);
    }

    #[test]
    fn a_key_that_stops_coming_goes_to_the_sparse_column_and_back_when_it_returns() {
        // `k` in each of the first 10 rows, then in none of 1,000, then in every one of 1,000.
        let events: Vec<StoredEvent> = (0..2_010u64)
            .map(|i| {
                let props = if !(10..1_010).contains(&i) {
                    vec![("k".to_string(), Coerced::Bool(i % 2 == 0))]
                } else {
                    vec![]
                };
                event(i, props)
            })
            .collect();
        let mut builder = ChunkBuilder::default();
        for (i, e) in events.iter().enumerate() {
            builder.append(e);
            columns_are_full_enough(&builder).unwrap();
            if i == 1_009 {
                // Ten values in a thousand rows: not worth a column.
                let shown = builder.snapshot();
                assert!(shown.column_by_name("properties.k").is_none());
                assert_eq!(values_of(&shown), expected_values(&events[..1_010]));
            }
        }
        let batch = builder.finish();
        assert!(batch.column_by_name("properties.k").is_some());
        assert!(sparse_column(&batch).is_none());
        assert_eq!(values_of(&batch), expected_values(&events));
    }

    #[test]
    fn a_retyped_key_whose_text_values_become_a_column_in_one_batch_keeps_every_row() {
        // `k` is a number in the first proposal; in the second it is a string in 10 rows (a
        // column in that batch, whose values go to the builder's text column value by value,
        // too few there for a column) and does not fit in 200 more (its text column in that
        // batch, enough for a column in the builder).
        let first: Vec<StoredEvent> = (0..1_000)
            .map(|i| event(i, vec![("k".into(), Coerced::Num(i as f64))]))
            .collect();
        let second: Vec<StoredEvent> = (1_000..1_210)
            .map(|i| {
                let v = if i < 1_010 {
                    Coerced::Str(format!("s{i}"))
                } else {
                    Coerced::Mismatch(format!("m{i}"))
                };
                event(i, vec![("k".into(), v)])
            })
            .collect();
        let mut by_batch = ChunkBuilder::default();
        for proposal in [&first, &second] {
            let mut builder = ChunkBuilder::default();
            proposal.iter().for_each(|e| builder.append(e));
            by_batch.append_batch(&builder.finish()).unwrap();
        }
        columns_are_full_enough(&by_batch).unwrap();
        let all: Vec<StoredEvent> = first.into_iter().chain(second).collect();
        let batch = by_batch.finish();
        assert_eq!(values_of(&batch), expected_values(&all));
        assert!(batch.column_by_name("properties.k#text").is_some());
    }

    #[test]
    fn string_columns_with_null_dictionary_values_are_refused() {
        use arrow::array::{DictionaryArray, Int32Array, StringArray};
        let mut builder = ChunkBuilder::default();
        builder.append(&event(0, vec![("s".into(), Coerced::Str("a".into()))]));
        let good = builder.finish();
        let null_value: DictionaryArray<Int32Type> = DictionaryArray::new(
            Int32Array::from(vec![0]),
            Arc::new(StringArray::from(vec![None::<&str>])),
        );
        let mut columns = good.columns().to_vec();
        *columns.last_mut().unwrap() = Arc::new(null_value);
        let bad = RecordBatch::try_new(good.schema(), columns).unwrap();
        let err = ChunkBuilder::default().append_batch(&bad).unwrap_err();
        assert!(err.to_string().contains("null dictionary values"), "{err}");
    }

    #[test]
    fn a_column_name_two_keys_share_reads_as_the_type_a_query_asks_for() {
        // `properties.k#text` is key `k`'s text column in one batch and key `k#text`'s string
        // column in another.
        let mut text = ChunkBuilder::default();
        text.append(&event(0, vec![("k".into(), Coerced::Mismatch("x".into()))]));
        let text = text.finish();
        let mut typed = ChunkBuilder::default();
        typed.append(&event(0, vec![("k#text".into(), Coerced::Str("y".into()))]));
        let typed = typed.finish();
        let name = property_text_column("k");
        let as_dictionary = property_array(&text, &name, &dictionary_type());
        assert_eq!(as_dictionary.data_type(), &dictionary_type());
        let as_text = property_array(&typed, &name, &DataType::Utf8);
        assert_eq!(as_text.as_string::<i32>().value(0), "y");
    }

    #[test]
    fn sparse_columns_with_values_that_are_not_tagged_are_refused() {
        let mut builder = ChunkBuilder::default();
        builder.append(&event(0, vec![("common".into(), Coerced::Num(1.0))]));
        for i in 1..100 {
            builder.append(&event(i, vec![]));
        }
        builder.append(&event(100, vec![("rare".into(), Coerced::DateTimeMs(5))]));
        let good = builder.finish();
        let map = sparse_column(&good).expect("rare keys are in the sparse column");
        assert_eq!(sparse_entries(map).count(), 2);
        for value in ["", "q1", "nx", "Tz", "d1.5"] {
            let mut entries = arrow::array::MapBuilder::new(
                None,
                arrow::array::LargeStringBuilder::new(),
                arrow::array::LargeStringBuilder::new(),
            )
            .with_values_field(Field::new("values", DataType::LargeUtf8, false));
            for row in 0..good.num_rows() {
                if row == 3 {
                    entries.keys().append_value("rare");
                    entries.values().append_value(value);
                }
                entries.append(true).unwrap();
            }
            let mut columns = good.columns().to_vec();
            *columns.last_mut().unwrap() = Arc::new(entries.finish());
            let bad = RecordBatch::try_new(good.schema(), columns).unwrap();
            let err = ChunkBuilder::default().append_batch(&bad).unwrap_err();
            assert!(err.to_string().contains("sparse_properties holds"), "{err}");
        }
        let mut appended = ChunkBuilder::default();
        appended.append_batch(&good).unwrap();
        assert_eq!(appended.finish(), good);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Keys from common to rare, proposals of any size, keys that change type: whichever
        /// rows a key's values are in, the node that made a proposal, the replicas that append
        /// it and a snapshot of either read the same values, and no key's column holds more
        /// than [`SPARSE_FILL`] rows per value.
        #[test]
        fn every_value_reads_back_whether_its_key_has_a_column_or_not(
            rows in proptest::collection::vec(
                proptest::collection::vec((0u32..400, -1e3f64..1e3, any::<bool>()), 0..4),
                1..400,
            ),
            cuts in proptest::collection::vec(1usize..120, 1..8),
            retype in any::<bool>(),
        ) {
            // The proposal of each event.
            let mut proposal_of = Vec::with_capacity(rows.len());
            for (n, cut) in cuts.iter().cycle().enumerate() {
                if proposal_of.len() >= rows.len() { break; }
                proposal_of.extend(std::iter::repeat_n(n, *cut));
            }
            let events: Vec<StoredEvent> = rows.iter().enumerate().map(|(i, props)| {
                let mut seen = std::collections::BTreeSet::new();
                // Key numbers spread so that low ones are common and high ones rare.
                let props = props.iter().filter_map(|&(k, n, mismatch)| {
                    let k = (k * k) / 400;
                    seen.insert(k).then(|| {
                        // Retyped keys change type from one proposal to the next (within
                        // one, a project's schema gives each key one type).
                        let kind = (k as usize + if retype { proposal_of[i] } else { 0 }) % 4;
                        let value = match (mismatch, kind) {
                            (true, _) => Coerced::Mismatch(format!("m{n}")),
                            (_, 0) => Coerced::Num(n),
                            (_, 1) => Coerced::Str(format!("s{}", n as i64)),
                            (_, 2) => Coerced::Bool(n > 0.0),
                            _ => Coerced::DateTimeMs(n as i64),
                        };
                        (format!("k{k}"), value)
                    })
                }).collect();
                event(i as u64, props)
            }).collect();
            let expected = expected_values(&events);
            let mut by_event = ChunkBuilder::default();
            let mut by_batch = ChunkBuilder::default();
            let mut start = 0;
            for (n, cut) in cuts.iter().cycle().enumerate() {
                if start >= events.len() { break; }
                let end = (start + cut).min(events.len());
                prop_assert!(proposal_of[start..end].iter().all(|&p| p == n));
                let mut proposal = ChunkBuilder::default();
                for e in &events[start..end] {
                    by_event.append(e);
                    proposal.append(e);
                }
                prop_assert!(columns_are_full_enough(&proposal).is_ok());
                by_batch.append_batch(&proposal.finish()).unwrap();
                prop_assert!(columns_are_full_enough(&by_batch).is_ok(), "after proposal {}", n);
                start = end;
            }
            prop_assert!(columns_are_full_enough(&by_event).is_ok());
            let shown = by_batch.snapshot();
            prop_assert_eq!(&values_of(&shown), &expected);
            let (a, b) = (by_event.finish(), by_batch.finish());
            prop_assert_eq!(&b, &shown);
            prop_assert_eq!(&values_of(&a), &expected);
            prop_assert_eq!(&values_of(&b), &expected);
            // Columns in a batch are full enough too, and a sealed chunk reads the same.
            for batch in [&a, &b] {
                for column in batch.columns().iter().skip(fixed_fields().len()) {
                    if column.data_type() != &sparse_type() {
                        prop_assert!(SPARSE_FILL * (column.len() - column.logical_null_count()) >= column.len());
                    }
                }
            }
            let (_, bytes, sealed) = seal(ProjectId(2), 1, &a);
            let decoded = decode(&bytes).unwrap();
            let uuids = |b: &RecordBatch| b.column(0).as_string::<i32>().iter().map(|u| u.unwrap().to_string()).collect::<Vec<_>>();
            let sealed_rows = uuids(&decoded);
            // The chunk is sorted: compare by message id.
            let by_id = |b: &RecordBatch, ids: &[String]| values_of(b).into_iter().map(|((row, name), v)| ((ids[row].clone(), name), v)).collect::<BTreeMap<_, _>>();
            prop_assert_eq!(by_id(&decoded, &sealed_rows), by_id(&a, &uuids(&a)));
            prop_assert_eq!(decoded, sealed);
        }
    }

    proptest! {
        /// `finish` takes the builders' buffers; `snapshot` copies them for queries of unsealed
        /// rows. Both must give the same batch, sparse, mismatched and late columns included.
        #[test]
        fn finishing_gives_what_a_snapshot_shows(values in proptest::collection::vec((0u8..6, proptest::option::of(-1e6f64..1e6), proptest::option::of("[a-z]{0,6}"), any::<bool>()), 1..120)) {
            let mut builder = ChunkBuilder::default();
            for (i, (kind, n, s, flag)) in values.iter().enumerate() {
                let mut props = vec![];
                if let Some(n) = n { props.push(("n".to_string(), Coerced::Num(*n))); }
                if let Some(s) = s { props.push(("s".to_string(), Coerced::Str(s.clone()))); }
                match kind {
                    0 => props.push(("n".to_string(), Coerced::Mismatch("text".into()))),
                    1 => props.push(("b".to_string(), Coerced::Bool(*flag))),
                    2 => props.push(("t".to_string(), Coerced::DateTimeMs(i as i64))),
                    _ => {}
                }
                builder.append(&event(i as u64, props));
            }
            let shown = builder.snapshot();
            let finished = builder.finish();
            prop_assert_eq!(&finished, &shown);
            prop_assert_eq!(builder.len(), 0);
        }

        /// Replicas append a proposal's rows column by column; the node that built them
        /// appended its events one by one. Over several proposals, with sparse keys, values
        /// that do not fit a key's type, and a key whose type differs from one proposal to the
        /// next, both must hold the same rows.
        #[test]
        fn appending_a_batch_gives_what_appending_its_events_gives(
            proposals in proptest::collection::vec(
                (0u8..4, proptest::collection::vec((any::<bool>(), 0u8..3, -1e3f64..1e3, "[a-c]{0,2}"), 1..30)),
                1..5,
            )
        ) {
            let mut by_event = ChunkBuilder::default();
            let mut by_batch = ChunkBuilder::default();
            let mut i = 0;
            for (kind_of_k, rows) in &proposals {
                let mut proposal = ChunkBuilder::default();
                for (has_k, other, n, text) in rows {
                    let mut props = vec![];
                    if *has_k {
                        // One type for `k` within a proposal, as a project's schema gives.
                        props.push(("k".to_string(), match kind_of_k {
                            0 => Coerced::Num(*n),
                            1 => Coerced::Str(text.clone()),
                            2 => Coerced::Bool(*n > 0.0),
                            _ => Coerced::DateTimeMs(*n as i64),
                        }));
                    }
                    match other {
                        0 => props.push(("m".to_string(), Coerced::Mismatch(text.clone()))),
                        1 => props.push(("s".to_string(), Coerced::Str(text.clone()))),
                        _ => {}
                    }
                    let e = event(i, props);
                    i += 1;
                    by_event.append(&e);
                    proposal.append(&e);
                }
                by_batch.append_batch(&proposal.finish()).unwrap();
            }
            prop_assert_eq!(by_batch.len(), by_event.len());
            prop_assert_eq!(by_batch.finish(), by_event.finish());
        }

        #[test]
        fn chunks_round_trip(values in proptest::collection::vec((0u64..50, proptest::option::of(-1e6f64..1e6), proptest::option::of("[a-z]{0,6}")), 1..200)) {
            let events: Vec<StoredEvent> = values.iter().enumerate().map(|(i, (p, n, s))| {
                let mut props = vec![];
                if let Some(n) = n { props.push(("n".to_string(), Coerced::Num(*n))); }
                if let Some(s) = s { props.push(("s".to_string(), Coerced::Str(s.clone()))); }
                StoredEvent { person_id: *p, ..event(i as u64, props) }
            }).collect();
            let (meta, bytes, batch) = seal(ProjectId(3), 1, &build_batch(&events));
            prop_assert_eq!(meta.rows as usize, events.len());
            prop_assert_eq!(decode(&bytes).unwrap(), batch.clone());
            // Every value comes back; within each event's rows, in (person, time) order.
            let persons = batch.column_by_name("person_id").unwrap().as_primitive::<arrow::datatypes::UInt64Type>();
            let mut covered = 0;
            for (_, offset, len) in &meta.event_rows {
                let slice = &persons.values()[*offset as usize..(*offset + *len) as usize];
                prop_assert!(slice.windows(2).all(|w| w[0] <= w[1]));
                covered += len;
            }
            prop_assert_eq!(covered, meta.rows);
            let non_null_n = events.iter().filter(|e| e.props.iter().any(|(k, _)| k == "n")).count();
            if let Some(col) = batch.column_by_name("properties.n") {
                prop_assert_eq!(col.len() - col.null_count(), non_null_n);
            } else {
                prop_assert_eq!(non_null_n, 0);
            }
        }
    }
}
