//! Scalar functions the planner uses: time buckets, value rendering, identity resolution.

use arrow::array::{
    Array, ArrayRef, AsArray, Int32Builder, Int64Builder, StringBuilder, UInt64Array,
};
use arrow::datatypes::{DataType, Float64Type, TimeUnit, TimestampMillisecondType};
use datafusion::common::{Result, exec_err};
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

/// `bucket_index(timestamp)`: the index of the query bucket holding an instant, or null.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct BucketIndex {
    starts_ms: Vec<i64>,
    end_ms: i64,
    signature: Signature,
}

impl BucketIndex {
    /// The function for buckets starting at `starts_ms` and ending at `end_ms`.
    pub fn udf(starts_ms: Vec<i64>, end_ms: i64) -> ScalarUDF {
        ScalarUDF::new_from_impl(BucketIndex {
            starts_ms,
            end_ms,
            signature: Signature::exact(
                vec![DataType::Timestamp(
                    TimeUnit::Millisecond,
                    Some("UTC".into()),
                )],
                Volatility::Immutable,
            ),
        })
    }
}

impl ScalarUDFImpl for BucketIndex {
    fn name(&self) -> &str {
        "bucket_index"
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, _: &[DataType]) -> Result<DataType> {
        Ok(DataType::Int32)
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let array = args.args[0].to_array(args.number_rows)?;
        let ts = array.as_primitive::<TimestampMillisecondType>();
        let start = self.starts_ms.first().copied().unwrap_or(self.end_ms);
        let mut out = Int32Builder::with_capacity(ts.len());
        // Equal-width buckets (hours, or days without a DST change): a division, not a search.
        let width = self
            .starts_ms
            .get(1)
            .map(|s1| s1 - start)
            .unwrap_or(self.end_ms - start);
        let uniform = width > 0
            && self.starts_ms.windows(2).all(|w| w[1] - w[0] == width)
            && self.end_ms - self.starts_ms.last().copied().unwrap_or(start) == width;
        if uniform {
            for v in ts.iter() {
                match v {
                    Some(ms) if ms >= start && ms < self.end_ms => {
                        out.append_value(((ms - start) / width) as i32)
                    }
                    _ => out.append_null(),
                }
            }
            return Ok(ColumnarValue::Array(Arc::new(out.finish())));
        }
        // Consecutive rows are usually in the same bucket: remember the last one.
        let mut last: Option<(i64, i64, i32)> = None;
        for v in ts.iter() {
            match v {
                Some(ms) if ms >= start && ms < self.end_ms => {
                    if let Some((lo, hi, idx)) = last
                        && ms >= lo
                        && ms < hi
                    {
                        out.append_value(idx);
                        continue;
                    }
                    let i = self.starts_ms.partition_point(|&s| s <= ms) - 1;
                    let hi = self.starts_ms.get(i + 1).copied().unwrap_or(self.end_ms);
                    last = Some((self.starts_ms[i], hi, i as i32));
                    out.append_value(i as i32);
                }
                _ => out.append_null(),
            }
        }
        Ok(ColumnarValue::Array(Arc::new(out.finish())))
    }
}

/// `render_value(x)`: the string rendering filters and breakdowns compare (§1.3): numbers as
/// JSON prints them, booleans as `true`/`false`, instants as RFC 3339.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct RenderValue {
    signature: Signature,
}

impl RenderValue {
    /// The function.
    pub fn udf() -> ScalarUDF {
        ScalarUDF::new_from_impl(RenderValue {
            signature: Signature::any(1, Volatility::Immutable),
        })
    }
}

impl ScalarUDFImpl for RenderValue {
    fn name(&self) -> &str {
        "render_value"
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, _: &[DataType]) -> Result<DataType> {
        Ok(DataType::Utf8)
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let array = args.args[0].to_array(args.number_rows)?;
        Ok(ColumnarValue::Array(render_array(&array)?))
    }
}

/// Renders any supported array as strings.
pub fn render_array(array: &ArrayRef) -> Result<ArrayRef> {
    let mut out = StringBuilder::with_capacity(array.len(), array.len() * 8);
    match array.data_type() {
        DataType::Float64 => {
            for v in array.as_primitive::<Float64Type>().iter() {
                match v {
                    Some(n) => out.append_value(optiprism_types::event::render_number(n)),
                    None => out.append_null(),
                }
            }
        }
        DataType::Boolean => {
            for v in array.as_boolean().iter() {
                match v {
                    Some(b) => out.append_value(if b { "true" } else { "false" }),
                    None => out.append_null(),
                }
            }
        }
        DataType::Timestamp(TimeUnit::Millisecond, _) => {
            for v in array.as_primitive::<TimestampMillisecondType>().iter() {
                match v.and_then(chrono::DateTime::from_timestamp_millis) {
                    Some(t) => {
                        out.append_value(t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
                    }
                    None => out.append_null(),
                }
            }
        }
        DataType::Utf8 | DataType::Dictionary(_, _) | DataType::Null => {
            let strings = arrow::compute::cast(array, &DataType::Utf8)?;
            return Ok(strings);
        }
        other => return exec_err!("render_value does not support {other}"),
    }
    Ok(Arc::new(out.finish()))
}

/// `parse_datetime_ms(text)`: epoch ms of an ISO-8601 string, null when it is not one.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct ParseDatetime {
    signature: Signature,
}

impl ParseDatetime {
    /// The function.
    pub fn udf() -> ScalarUDF {
        ScalarUDF::new_from_impl(ParseDatetime {
            signature: Signature::exact(vec![DataType::Utf8], Volatility::Immutable),
        })
    }
}

impl ScalarUDFImpl for ParseDatetime {
    fn name(&self) -> &str {
        "parse_datetime_ms"
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, _: &[DataType]) -> Result<DataType> {
        Ok(DataType::Int64)
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let array = args.args[0].to_array(args.number_rows)?;
        let mut out = Int64Builder::with_capacity(array.len());
        for v in array.as_string::<i32>().iter() {
            out.append_option(v.and_then(optiprism_types::event::parse_datetime_ms));
        }
        Ok(ColumnarValue::Array(Arc::new(out.finish())))
    }
}

/// The persons of a project as a query sees them: identity merges, and the members of the
/// cohorts the query filters by (segments, computed before the query's plans are built).
#[derive(Debug, Default)]
pub struct IdentityView {
    /// Stamped person → current person.
    pub merged: HashMap<u64, u64>,
    /// Members (current persons) of each cohort filter, by [`segment_key`].
    pub segments: HashMap<String, Arc<std::collections::HashSet<u64>>>,
    /// Current (rendered) value of each person property the query reads, by key and person.
    pub person_properties: HashMap<String, Arc<HashMap<u64, String>>>,
}

/// The key of a cohort filter's members: its condition and evaluation instant.
pub fn segment_key(f: &optiprism_types::query::Filter) -> String {
    serde_json::to_string(&(&f.cohort, &f.evaluate_at)).unwrap_or_default()
}

impl IdentityView {
    /// The view of a project's identities.
    pub fn new(ids: Option<&crate::metadata::Identities>) -> IdentityView {
        let mut view = IdentityView::default();
        if let Some(ids) = ids {
            for (from, to) in &ids.merged {
                view.merged.insert(from.0, to.0);
            }
        }
        view
    }

    /// The same view with the members of a query's cohort filters and the person properties
    /// it reads.
    pub fn with_segments(
        mut self,
        segments: HashMap<String, Arc<std::collections::HashSet<u64>>>,
        person_properties: HashMap<String, Arc<HashMap<u64, String>>>,
    ) -> IdentityView {
        self.segments = segments;
        self.person_properties = person_properties;
        self
    }

    /// The current person of a stamped person.
    pub fn resolve(&self, p: u64) -> u64 {
        self.merged.get(&p).copied().unwrap_or(p)
    }
}

/// `resolve_person(person_id)`: the current person of the person an event was stamped with.
#[derive(Debug)]
pub struct IdentityUdf {
    view: Arc<IdentityView>,
    signature: Signature,
}

impl PartialEq for IdentityUdf {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.view, &other.view)
    }
}
impl Eq for IdentityUdf {}
impl Hash for IdentityUdf {
    fn hash<H: Hasher>(&self, state: &mut H) {
        (Arc::as_ptr(&self.view) as usize).hash(state);
    }
}

impl IdentityUdf {
    /// `resolve_person` over `view`.
    pub fn resolve(view: Arc<IdentityView>) -> ScalarUDF {
        ScalarUDF::new_from_impl(IdentityUdf {
            view,
            signature: Signature::exact(vec![DataType::UInt64], Volatility::Immutable),
        })
    }
}

impl ScalarUDFImpl for IdentityUdf {
    fn name(&self) -> &str {
        "resolve_person"
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, _: &[DataType]) -> Result<DataType> {
        Ok(DataType::UInt64)
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let array = args.args[0].to_array(args.number_rows)?;
        if self.view.merged.is_empty() {
            return Ok(ColumnarValue::Array(array));
        }
        let ids = array.as_primitive::<arrow::datatypes::UInt64Type>();
        let out: UInt64Array = ids
            .iter()
            .map(|v| v.map(|p| self.view.resolve(p)))
            .collect();
        Ok(ColumnarValue::Array(Arc::new(out)))
    }
}

/// `to_number(x)`: the numeric value of a property (§1.3: numbers and numeric strings count),
/// null for anything else. Text goes through [`optiprism_types::stats::parse_number`] rather
/// than a SQL cast, so property math and the types crate agree on what a number is; casts
/// accept `NaN` and `inf`, and so does ingestion for a number-typed key (the string `"NaN"`
/// renders back to itself), so non-finite numbers are nulled too: they would poison every sum.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct ToNumber {
    signature: Signature,
}

impl ToNumber {
    /// The function.
    pub fn udf() -> ScalarUDF {
        ScalarUDF::new_from_impl(ToNumber {
            signature: Signature::uniform(
                1,
                vec![DataType::Utf8, DataType::Float64],
                Volatility::Immutable,
            ),
        })
    }
}

impl ScalarUDFImpl for ToNumber {
    fn name(&self) -> &str {
        "to_number"
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, _: &[DataType]) -> Result<DataType> {
        Ok(DataType::Float64)
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let array = args.args[0].to_array(args.number_rows)?;
        if array.data_type() == &DataType::Float64 {
            let numbers = array.as_primitive::<Float64Type>();
            if numbers.values().iter().all(|x| x.is_finite()) {
                return Ok(ColumnarValue::Array(array));
            }
            let out: arrow::array::Float64Array = numbers
                .iter()
                .map(|v| v.filter(|x| x.is_finite()))
                .collect();
            return Ok(ColumnarValue::Array(Arc::new(out)));
        }
        let out: arrow::array::Float64Array = array
            .as_string::<i32>()
            .iter()
            .map(|v| v.and_then(optiprism_types::stats::parse_number))
            .collect();
        Ok(ColumnarValue::Array(Arc::new(out)))
    }
}

/// What a [`PersonUdf`] looks up for an event's current person.
#[derive(Debug)]
enum PersonLookup {
    /// Membership in one cohort filter's cohort (Boolean).
    Segment(Arc<std::collections::HashSet<u64>>),
    /// The rendered current value of one person property (Utf8, null when not set).
    Property(Arc<HashMap<u64, String>>),
}

/// `in_segment(person_id)` / `person_property(person_id)`: something about the current person
/// (after identity merges) of each event, from values computed before the plan was built.
#[derive(Debug)]
pub struct PersonUdf {
    view: Arc<IdentityView>,
    lookup: PersonLookup,
    key: String,
    signature: Signature,
}

impl PartialEq for PersonUdf {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.view, &other.view) && self.key == other.key
    }
}
impl Eq for PersonUdf {}
impl Hash for PersonUdf {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.key.hash(state);
    }
}

impl PersonUdf {
    fn udf(view: Arc<IdentityView>, lookup: PersonLookup, key: String) -> ScalarUDF {
        ScalarUDF::new_from_impl(PersonUdf {
            view,
            lookup,
            key,
            signature: Signature::exact(vec![DataType::UInt64], Volatility::Immutable),
        })
    }

    /// Membership in the cohort of `filter`, whose members `view` carries (a missing segment
    /// has no members: [`crate::query::QueryEngine::insight`] computes every one first).
    pub fn segment(view: Arc<IdentityView>, filter: &optiprism_types::query::Filter) -> ScalarUDF {
        let key = segment_key(filter);
        let members = view.segments.get(&key).cloned().unwrap_or_default();
        PersonUdf::udf(
            view,
            PersonLookup::Segment(members),
            format!("segment:{key}"),
        )
    }

    /// Person property `key`, whose values `view` carries.
    pub fn property(view: Arc<IdentityView>, key: &str) -> ScalarUDF {
        let values = view.person_properties.get(key).cloned().unwrap_or_default();
        PersonUdf::udf(
            view,
            PersonLookup::Property(values),
            format!("property:{key}"),
        )
    }
}

impl ScalarUDFImpl for PersonUdf {
    fn name(&self) -> &str {
        match self.lookup {
            PersonLookup::Segment(_) => "in_segment",
            PersonLookup::Property(_) => "person_property",
        }
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, _: &[DataType]) -> Result<DataType> {
        Ok(match self.lookup {
            PersonLookup::Segment(_) => DataType::Boolean,
            PersonLookup::Property(_) => DataType::Utf8,
        })
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let array = args.args[0].to_array(args.number_rows)?;
        let ids = array.as_primitive::<arrow::datatypes::UInt64Type>();
        let persons = ids.iter().map(|v| v.map(|p| self.view.resolve(p)));
        let out: ArrayRef = match &self.lookup {
            PersonLookup::Segment(members) => Arc::new(
                persons
                    .map(|p| Some(p.is_some_and(|p| members.contains(&p))))
                    .collect::<arrow::array::BooleanArray>(),
            ),
            PersonLookup::Property(values) => Arc::new(
                persons
                    .map(|p| p.and_then(|p| values.get(&p).map(String::as_str)))
                    .collect::<arrow::array::StringArray>(),
            ),
        };
        Ok(ColumnarValue::Array(out))
    }
}
