//! The normalized event model that every SDK format is translated into, and property typing.
//!
//! Properties are typed per project the first time a key is seen (string, number, boolean or
//! datetime). A later value that does not fit the key's type is kept verbatim as a string next
//! to the typed value (see [`Coerced`]), so nothing the SDK sent is lost and equality filters
//! still compare string renderings as `spec/analytics.md` §1.3 requires.

use serde::{Deserialize, Serialize};

/// A property value as sent, after JSON `null` (meaning "not set") has been dropped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum PropValue {
    /// A JSON string.
    Str(String),
    /// A JSON number.
    Num(f64),
    /// A JSON boolean.
    Bool(bool),
    /// A JSON object or array, kept as its compact JSON text.
    Json(String),
}

impl PropValue {
    /// Converts a JSON value; `None` for JSON `null`, which means "not set".
    pub fn from_json(value: &serde_json::Value) -> Option<PropValue> {
        Some(match value {
            serde_json::Value::Null => return None,
            serde_json::Value::Bool(b) => PropValue::Bool(*b),
            serde_json::Value::Number(n) => PropValue::Num(n.as_f64().unwrap_or(f64::NAN)),
            serde_json::Value::String(s) => PropValue::Str(s.clone()),
            other => PropValue::Json(other.to_string()),
        })
    }

    /// The string rendering used by equality, substring and regex filters.
    pub fn render(&self) -> String {
        match self {
            PropValue::Str(s) | PropValue::Json(s) => s.clone(),
            PropValue::Num(n) => render_number(*n),
            PropValue::Bool(b) => b.to_string(),
        }
    }

    /// Back to JSON, for APIs that return properties.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            PropValue::Str(s) => serde_json::Value::String(s.clone()),
            PropValue::Num(n) => serde_json::Number::from_f64(*n)
                .map(serde_json::Value::Number)
                .unwrap_or(serde_json::Value::Null),
            PropValue::Bool(b) => serde_json::Value::Bool(*b),
            PropValue::Json(s) => serde_json::from_str(s).unwrap_or(serde_json::Value::Null),
        }
    }
}

/// A JSON object of properties read straight into a list (JSON nulls dropped), without building
/// a `serde_json::Value` map first: ingestion reads millions of these.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Properties(pub Vec<(String, PropValue)>);

/// Whether a key occurs twice. JSON allows it and SDKs do send it; every later stage (a
/// column per key, one value per row) needs each key once.
fn has_duplicate_keys<V>(items: &[(String, V)]) -> bool {
    if items.len() <= 16 {
        // Quadratic, but without allocating: objects this small are nearly all of them.
        items
            .iter()
            .enumerate()
            .any(|(i, (k, _))| items[..i].iter().any(|(seen, _)| seen == k))
    } else {
        let mut seen = std::collections::HashSet::with_capacity(items.len());
        items.iter().any(|(k, _)| !seen.insert(k.as_str()))
    }
}

/// Keeps only the last occurrence of each key (a later `null` included, which unsets it), as
/// JavaScript's `JSON.parse` and `serde_json`'s maps read such an object.
fn keep_last_of_each_key<V>(items: &mut Vec<(String, V)>) {
    let last: std::collections::HashMap<String, usize> = items
        .iter()
        .enumerate()
        .map(|(i, (k, _))| (k.clone(), i))
        .collect();
    let mut i = 0;
    items.retain(|(k, _)| {
        let keep = last[k] == i;
        i += 1;
        keep
    });
}

struct OptionalPropValue(Option<PropValue>);

impl<'de> Deserialize<'de> for OptionalPropValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = OptionalPropValue;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
                Ok(OptionalPropValue(Some(PropValue::Bool(v))))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
                Ok(OptionalPropValue(Some(PropValue::Num(v as f64))))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
                Ok(OptionalPropValue(Some(PropValue::Num(v as f64))))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
                Ok(OptionalPropValue(Some(PropValue::Num(v))))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(OptionalPropValue(Some(PropValue::Str(v.to_string()))))
            }
            fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
                Ok(OptionalPropValue(Some(PropValue::Str(v))))
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(OptionalPropValue(None))
            }
            fn visit_none<E>(self) -> Result<Self::Value, E> {
                Ok(OptionalPropValue(None))
            }
            fn visit_some<D: serde::Deserializer<'de>>(
                self,
                d: D,
            ) -> Result<Self::Value, D::Error> {
                OptionalPropValue::deserialize(d)
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<Self::Value, A::Error> {
                let v = serde_json::Value::deserialize(
                    serde::de::value::MapAccessDeserializer::new(map),
                )?;
                Ok(OptionalPropValue(Some(PropValue::Json(v.to_string()))))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                seq: A,
            ) -> Result<Self::Value, A::Error> {
                let v = serde_json::Value::deserialize(
                    serde::de::value::SeqAccessDeserializer::new(seq),
                )?;
                Ok(OptionalPropValue(Some(PropValue::Json(v.to_string()))))
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for Properties {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Properties;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(Properties::default())
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Self::Value, A::Error> {
                let mut out: Vec<(String, Option<PropValue>)> =
                    Vec::with_capacity(map.size_hint().unwrap_or(8).min(64));
                while let Some(key) = map.next_key::<String>()? {
                    let OptionalPropValue(v) = map.next_value()?;
                    out.push((key, v));
                }
                if has_duplicate_keys(&out) {
                    keep_last_of_each_key(&mut out);
                }
                Ok(Properties(
                    out.into_iter()
                        .filter_map(|(k, v)| v.map(|v| (k, v)))
                        .collect(),
                ))
            }
        }
        d.deserialize_any(V)
    }
}

/// Renders a number the way JavaScript and JSON do: integers without a fractional part.
pub fn render_number(n: f64) -> String {
    if n.is_finite() && n.fract() == 0.0 && n.abs() < 9.007_199_254_740_992e15 {
        format!("{}", n as i64)
    } else {
        format!("{n}")
    }
}

/// Parses an RFC 3339 / ISO-8601 instant into epoch milliseconds.
pub fn parse_datetime_ms(s: &str) -> Option<i64> {
    if s.len() < 10 || !s.as_bytes()[0].is_ascii_digit() {
        return None;
    }
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Some(t.timestamp_millis());
    }
    // Naive forms without an offset are read as UTC.
    for fmt in [
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%dT%H:%M:%S",
    ] {
        if let Ok(t) = chrono::NaiveDateTime::parse_from_str(s, fmt) {
            return Some(t.and_utc().timestamp_millis());
        }
    }
    None
}

/// The type a project gives a property key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PropType {
    /// UTF-8 text (also the type of JSON objects and arrays, kept as JSON text).
    String,
    /// A 64-bit float.
    Number,
    /// true or false.
    Boolean,
    /// An instant, stored as epoch milliseconds.
    DateTime,
}

impl PropType {
    /// The type a key gets from the first value seen for it.
    pub fn infer(value: &PropValue) -> PropType {
        match value {
            PropValue::Num(_) => PropType::Number,
            PropValue::Bool(_) => PropType::Boolean,
            PropValue::Str(s) if parse_datetime_ms(s).is_some() => PropType::DateTime,
            PropValue::Str(_) | PropValue::Json(_) => PropType::String,
        }
    }

    /// Its name in schemas and error messages.
    pub fn name(self) -> &'static str {
        match self {
            PropType::String => "string",
            PropType::Number => "number",
            PropType::Boolean => "boolean",
            PropType::DateTime => "datetime",
        }
    }
}

/// A value converted to its key's type, or kept as text when it does not fit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Coerced {
    /// Text of a string-typed key.
    Str(String),
    /// A number-typed key's value.
    Num(f64),
    /// A boolean-typed key's value.
    Bool(bool),
    /// A datetime-typed key's value in epoch milliseconds.
    DateTimeMs(i64),
    /// A value that does not fit the key's type, as its string rendering.
    Mismatch(String),
}

impl Coerced {
    /// Converts `value` to `ty`. Numeric strings become numbers only when the number renders
    /// back to the same text, so the string rendering of every stored value is exact.
    pub fn new(value: PropValue, ty: PropType) -> Coerced {
        match (ty, value) {
            (PropType::String, PropValue::Str(s) | PropValue::Json(s)) => Coerced::Str(s),
            (PropType::String, v) => Coerced::Str(v.render()),
            (PropType::Number, PropValue::Num(n)) => Coerced::Num(n),
            (PropType::Number, PropValue::Str(s)) => match s.trim().parse::<f64>() {
                Ok(n) if n.is_finite() && render_number(n) == s => Coerced::Num(n),
                _ => Coerced::Mismatch(s),
            },
            (PropType::Boolean, PropValue::Bool(b)) => Coerced::Bool(b),
            (PropType::DateTime, PropValue::Str(s)) => match parse_datetime_ms(&s) {
                Some(ms) => Coerced::DateTimeMs(ms),
                None => Coerced::Mismatch(s),
            },
            (_, v) => Coerced::Mismatch(v.render()),
        }
    }
}

/// One event after SDK-specific parsing and validation, ready to be routed to its partition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// The SDK's message id (Segment `messageId`, PostHog `uuid`), or a content hash when the
    /// SDK sent none, so retries of the same payload are deduplicated.
    pub message_id: String,
    /// The id the SDK sent (user id if known, else the anonymous id).
    pub distinct_id: String,
    /// The event name.
    pub event: String,
    /// When it happened, after clock-skew correction, in epoch milliseconds.
    pub timestamp_ms: i64,
    /// Event properties (JSON nulls removed).
    pub properties: Vec<(String, PropValue)>,
    /// Person properties to set (`$set`, Segment identify traits).
    pub person_set: Vec<(String, PropValue)>,
    /// Person properties to set only if not yet set (`$set_once`).
    pub person_set_once: Vec<(String, PropValue)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_render_like_json() {
        assert_eq!(render_number(40.0), "40");
        assert_eq!(render_number(-3.0), "-3");
        assert_eq!(render_number(2.5), "2.5");
        assert_eq!(render_number(0.1), "0.1");
    }

    #[test]
    fn numeric_strings_coerce_only_when_exact() {
        assert_eq!(
            Coerced::new(PropValue::Str("40".into()), PropType::Number),
            Coerced::Num(40.0)
        );
        assert_eq!(
            Coerced::new(PropValue::Str("40.0".into()), PropType::Number),
            Coerced::Mismatch("40.0".into())
        );
        assert_eq!(
            Coerced::new(PropValue::Str("abc".into()), PropType::Number),
            Coerced::Mismatch("abc".into())
        );
        // Non-finite values are no numbers for numeric math or filters.
        for text in ["NaN", "inf", "-inf"] {
            assert_eq!(
                Coerced::new(PropValue::Str(text.into()), PropType::Number),
                Coerced::Mismatch(text.into())
            );
        }
        assert_eq!(
            Coerced::new(PropValue::Num(7.0), PropType::String),
            Coerced::Str("7".into())
        );
    }

    #[test]
    fn properties_deserialize_without_nulls() {
        let p: Properties =
            serde_json::from_str(r#"{"a":"x","b":null,"c":2,"d":true,"e":{"f":[1]}}"#).unwrap();
        assert_eq!(
            p.0,
            vec![
                ("a".to_string(), PropValue::Str("x".into())),
                ("c".to_string(), PropValue::Num(2.0)),
                ("d".to_string(), PropValue::Bool(true)),
                ("e".to_string(), PropValue::Json(r#"{"f":[1]}"#.into())),
            ]
        );
        assert!(serde_json::from_str::<Properties>("[1]").is_err());
    }

    #[test]
    fn a_repeated_key_keeps_its_last_value() {
        let p: Properties =
            serde_json::from_str(r#"{"a":1,"b":"x","a":"two","c":true,"b":null}"#).unwrap();
        assert_eq!(
            p.0,
            vec![
                ("a".to_string(), PropValue::Str("two".into())),
                ("c".to_string(), PropValue::Bool(true)),
            ]
        );
        // Past the small-object path too.
        let mut text: Vec<String> = (0..40).map(|i| format!(r#""k{i}":{i}"#)).collect();
        text.push(r#""k3":"last""#.into());
        let p: Properties = serde_json::from_str(&format!("{{{}}}", text.join(","))).unwrap();
        assert_eq!(p.0.len(), 40);
        assert_eq!(
            p.0.iter().filter(|(k, _)| k == "k3").collect::<Vec<_>>(),
            vec![&("k3".to_string(), PropValue::Str("last".into()))]
        );
    }

    #[test]
    fn datetimes_are_inferred_from_iso_strings() {
        assert_eq!(
            PropType::infer(&PropValue::Str("2024-01-01T00:00:00Z".into())),
            PropType::DateTime
        );
        assert_eq!(
            PropType::infer(&PropValue::Str("2024".into())),
            PropType::String
        );
        assert_eq!(parse_datetime_ms("1970-01-01T00:00:01Z"), Some(1000));
    }
}
