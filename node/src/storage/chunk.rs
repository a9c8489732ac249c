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
//!
//! Rows are sorted by (event, person, time) when sealed, and the chunk's metadata records where
//! each event name's rows are: a query for one event reads a zero-copy slice of the chunk
//! instead of filtering all of it, and within an event each person's rows are contiguous and in
//! time order (what per-person work such as funnels and retention reads).

use arrow::array::{
    ArrayBuilder, ArrayRef, BooleanBuilder, Float64Builder, RecordBatch, StringBuilder,
    StringDictionaryBuilder, TimestampMillisecondBuilder, UInt64Builder,
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

/// The type of a typed property column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PropKind {
    Str,
    Num,
    Bool,
    Time,
}

impl PropKind {
    fn of(ty: &DataType) -> Option<PropKind> {
        match ty {
            DataType::Float64 => Some(PropKind::Num),
            DataType::Boolean => Some(PropKind::Bool),
            t if *t == dictionary_type() => Some(PropKind::Str),
            t if *t == timestamp_type() => Some(PropKind::Time),
            _ => None,
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

/// The value of typed column `column` (of `kind`) at `row`, if any.
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
    })
}

/// The columns of a batch of [`ChunkBuilder`] layout, checked: the five fixed columns with
/// their types and no nulls, then typed property columns and text columns, each key once.
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
        for (field, column) in schema
            .fields()
            .iter()
            .zip(batch.columns())
            .skip(fixed.len())
        {
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
                    string_dictionary(column)?;
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
        })
    }
}

enum PropBuilder {
    Str(StringDictionaryBuilder<Int32Type>),
    Num(Float64Builder),
    Bool(BooleanBuilder),
    Time(TimestampMillisecondBuilder),
}

impl PropBuilder {
    fn for_value(v: CoercedRef<'_>) -> Option<PropBuilder> {
        Some(match v {
            CoercedRef::Str(_) => PropBuilder::Str(StringDictionaryBuilder::new()),
            CoercedRef::Num(_) => PropBuilder::Num(Float64Builder::new()),
            CoercedRef::Bool(_) => PropBuilder::Bool(BooleanBuilder::new()),
            CoercedRef::DateTimeMs(_) => {
                PropBuilder::Time(TimestampMillisecondBuilder::new().with_timezone("UTC"))
            }
            CoercedRef::Mismatch(_) => return None,
        })
    }

    fn of_kind(kind: PropKind) -> PropBuilder {
        match kind {
            PropKind::Str => PropBuilder::Str(StringDictionaryBuilder::new()),
            PropKind::Num => PropBuilder::Num(Float64Builder::new()),
            PropKind::Bool => PropBuilder::Bool(BooleanBuilder::new()),
            PropKind::Time => {
                PropBuilder::Time(TimestampMillisecondBuilder::new().with_timezone("UTC"))
            }
        }
    }

    fn kind(&self) -> PropKind {
        match self {
            PropBuilder::Str(_) => PropKind::Str,
            PropBuilder::Num(_) => PropKind::Num,
            PropBuilder::Bool(_) => PropKind::Bool,
            PropBuilder::Time(_) => PropKind::Time,
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
        }
        Ok(())
    }

    fn len(&self) -> usize {
        match self {
            PropBuilder::Str(b) => b.len(),
            PropBuilder::Num(b) => b.len(),
            PropBuilder::Bool(b) => b.len(),
            PropBuilder::Time(b) => b.len(),
        }
    }

    fn pad_to(&mut self, rows: usize) {
        let missing = rows.saturating_sub(self.len());
        match self {
            PropBuilder::Str(b) => (0..missing).for_each(|_| b.append_null()),
            PropBuilder::Num(b) => b.append_nulls(missing),
            PropBuilder::Bool(b) => b.append_nulls(missing),
            PropBuilder::Time(b) => b.append_nulls(missing),
        }
    }

    /// Appends `v` if it has this builder's type; returns false otherwise.
    fn append(&mut self, v: CoercedRef<'_>) -> bool {
        match (self, v) {
            (PropBuilder::Str(b), CoercedRef::Str(s)) => b.append_value(s),
            (PropBuilder::Num(b), CoercedRef::Num(n)) => b.append_value(n),
            (PropBuilder::Bool(b), CoercedRef::Bool(x)) => b.append_value(x),
            (PropBuilder::Time(b), CoercedRef::DateTimeMs(ms)) => b.append_value(ms),
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
        }
    }

    fn finish_cloned(&self) -> (DataType, ArrayRef) {
        match self {
            PropBuilder::Str(b) => (dictionary_type(), Arc::new(b.finish_cloned())),
            PropBuilder::Num(b) => (DataType::Float64, Arc::new(b.finish_cloned())),
            PropBuilder::Bool(b) => (DataType::Boolean, Arc::new(b.finish_cloned())),
            PropBuilder::Time(b) => (timestamp_type(), Arc::new(b.finish_cloned())),
        }
    }
}

/// Arrow builders that events are appended to as they are applied, so unsealed rows are held
/// columnar (a tenth of the memory of the events themselves) and sealing only sorts them.
pub struct ChunkBuilder {
    rows: usize,
    uuid: StringBuilder,
    event: StringDictionaryBuilder<Int32Type>,
    timestamp: TimestampMillisecondBuilder,
    distinct: StringDictionaryBuilder<Int32Type>,
    person: UInt64Builder,
    // Hashed, not ordered: every property of every event looks its builder up, and a tree of
    // a few dozen keys cost several string comparisons each. Batches put the columns in key
    // order (`sorted`), so it is the same whatever order properties arrived in.
    props: foldhash::HashMap<String, PropBuilder>,
    texts: foldhash::HashMap<String, StringBuilder>,
}

impl std::fmt::Debug for ChunkBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkBuilder")
            .field("rows", &self.rows)
            .field("properties", &self.props.len())
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
            props: foldhash::HashMap::default(),
            texts: foldhash::HashMap::default(),
        }
    }
}

impl ChunkBuilder {
    /// Rows appended since the last [`ChunkBuilder::finish`].
    pub fn len(&self) -> usize {
        self.rows
    }

    /// Whether no rows are held.
    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    /// Appends one event as a row.
    pub fn append(&mut self, e: &impl EventRow) {
        let row = self.rows;
        self.uuid.append_value(e.message_id());
        self.event.append_value(e.event());
        self.timestamp.append_value(e.timestamp_ms());
        self.distinct.append_value(e.distinct_id());
        self.person.append_value(e.person_id());
        for (key, value) in e.props() {
            let typed = match self.props.get_mut(key) {
                Some(b) => Some(b),
                None => PropBuilder::for_value(value)
                    .map(|b| self.props.entry(key.to_string()).or_insert(b)),
            };
            // A key given twice in one event keeps its first value: a second would make the
            // column a row longer than the chunk. (Ingestion keeps one value per key; this
            // guards entries written before it did, and any other way to an event.)
            let stored = match typed {
                Some(b) if b.len() > row => continue,
                Some(b) => {
                    b.pad_to(row);
                    b.append(value)
                }
                None => false,
            };
            if !stored {
                let b = match self.texts.get_mut(key) {
                    Some(b) => b,
                    None => self.texts.entry(key.to_string()).or_default(),
                };
                if b.len() > row {
                    continue;
                }
                let text = render_coerced(value);
                (b.len()..row).for_each(|_| b.append_null());
                b.append_value(text);
            }
        }
        self.rows += 1;
    }

    /// Appends the rows of a batch of this layout (another builder's [`Self::finish`], as a
    /// leader replicates its proposals) column by column: for such a batch, the rows
    /// [`Self::append`] of each of its events would give, without reading the events one by
    /// one. (Rows filtered out of such a batch leave their strings in its dictionaries, and a
    /// key retyped within one batch has sent its later values to the key's text column; every
    /// replica appends the same batch, so they agree.) A batch not of this layout is refused
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
        // Typed columns of another type than this builder's column of the key: their values go
        // to the key's text column.
        let conflicting: Vec<(&str, PropKind, &ArrayRef)> = layout
            .typed
            .iter()
            .filter(|(key, kind, _)| self.props.get(*key).is_some_and(|b| b.kind() != *kind))
            .copied()
            .collect();
        self.uuid.append_array(layout.uuid)?;
        self.event.extend_dictionary(&layout.event)?;
        self.timestamp.append_slice(layout.timestamp.values());
        self.distinct.extend_dictionary(&layout.distinct)?;
        self.person.append_slice(layout.person.values());
        for &(key, kind, column) in &layout.typed {
            // As `append`: a key gets a column with its first value, and a value of another
            // type than its column's goes to the key's text column (below).
            if column.null_count() == rows || conflicting.iter().any(|c| c.0 == key) {
                continue;
            }
            let b = match self.props.get_mut(key) {
                Some(b) => b,
                None => self
                    .props
                    .entry(key.to_string())
                    .or_insert_with(|| PropBuilder::of_kind(kind)),
            };
            b.pad_to(start);
            b.extend(column)?;
        }
        let mut text_keys: Vec<&str> = layout.texts.iter().map(|(k, _)| *k).collect();
        for &(key, ..) in &conflicting {
            if !text_keys.contains(&key) {
                text_keys.push(key);
            }
        }
        for key in text_keys {
            let text = layout.texts.iter().find(|(k, _)| *k == key).map(|(_, c)| {
                use arrow::array::AsArray;
                c.as_string::<i32>()
            });
            let typed = conflicting
                .iter()
                .find(|c| c.0 == key)
                .map(|&(_, kind, column)| (kind, column));
            if typed.is_none() && text.is_some_and(|t| arrow::array::Array::null_count(t) == rows) {
                continue;
            }
            let b = match self.texts.get_mut(key) {
                Some(b) => b,
                None => self.texts.entry(key.to_string()).or_default(),
            };
            (b.len()..start).for_each(|_| b.append_null());
            match (typed, text) {
                (None, Some(text)) => b.append_array(text)?,
                _ => {
                    for row in 0..rows {
                        use arrow::array::Array;
                        let value = typed
                            .and_then(|(kind, column)| typed_value(column, kind, row))
                            .map(render_coerced)
                            .or_else(|| {
                                text.filter(|t| t.is_valid(row))
                                    .map(|t| t.value(row).to_string())
                            });
                        b.append_option(value);
                    }
                }
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
        let props = sorted(self.props.iter())
            .into_iter()
            .map(|(k, b)| (k.as_str(), b.finish_cloned()));
        let texts = sorted(self.texts.iter())
            .into_iter()
            .map(|(k, b)| (k.as_str(), Arc::new(b.finish_cloned()) as ArrayRef));
        assemble(self.rows, fixed, props, texts)
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
        // Padded in the builders, so `assemble` has nothing to copy.
        let props = sorted(built.props.iter_mut()).into_iter().map(|(k, b)| {
            b.pad_to(rows);
            (k.as_str(), b.finish())
        });
        let texts = sorted(built.texts.iter_mut()).into_iter().map(|(k, b)| {
            (b.len()..rows).for_each(|_| b.append_null());
            (k.as_str(), Arc::new(b.finish()) as ArrayRef)
        });
        assemble(rows, fixed, props, texts)
    }
}

/// A builder's columns in key order.
fn sorted<'a, B>(columns: impl Iterator<Item = (&'a String, B)>) -> Vec<(&'a String, B)> {
    let mut columns: Vec<_> = columns.collect();
    columns.sort_unstable_by(|a, b| a.0.cmp(b.0));
    columns
}

/// A batch of `rows` rows from the fixed columns, then the property columns and the columns of
/// mismatched values, each in key order and padded with nulls to `rows`.
fn assemble<'a>(
    rows: usize,
    fixed: [ArrayRef; 5],
    props: impl Iterator<Item = (&'a str, (DataType, ArrayRef))>,
    texts: impl Iterator<Item = (&'a str, ArrayRef)>,
) -> RecordBatch {
    let mut fields = fixed_fields();
    let mut columns: Vec<ArrayRef> = fixed.into();
    for (key, (ty, array)) in props {
        fields.push(Field::new(property_column(key), ty, true));
        columns.push(pad_with_nulls(array, rows));
    }
    for (key, array) in texts {
        fields.push(Field::new(property_text_column(key), DataType::Utf8, true));
        columns.push(pad_with_nulls(array, rows));
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
