//! The PostHog capture API (`/batch/`, `/e/`, `/i/v0/e/`, `/capture/`).
//!
//! A body is a batch object (`{"api_key", "batch": [...], "sent_at"}`), an array of events or a
//! single event. The project key is `api_key` (or `token`) at the top, in an event, or in its
//! properties. `$identify` with `$anon_distinct_id` merges the anonymous id into the event's
//! distinct id, `$create_alias` merges `alias` into it, `$set`/`$set_once` update the person,
//! and `uuid` deduplicates.

use crate::ingest::{
    ErrorList, Id, IngestError, ParseContext, Parsed, content_id, parse_timestamp,
};
use optiprism_types::event::{Event, PropValue, Properties};
use serde_json::Value;
use serde_json::value::RawValue;
use std::borrow::Cow;

#[derive(serde::Deserialize)]
struct Top<'a> {
    /// Borrowed from the body: each message is read twice (its size, then its fields), and
    /// borrowing spares a copy of every message.
    #[serde(default, borrow)]
    batch: Option<Vec<&'a RawValue>>,
    #[serde(default)]
    api_key: Option<Value>,
    #[serde(default)]
    token: Option<Value>,
    #[serde(default)]
    sent_at: Option<Value>,
}

fn malformed(e: impl std::fmt::Display) -> IngestError {
    IngestError::Malformed(format!("request body is not valid UTF-8 JSON: {e}"))
}

/// Parses a PostHog capture body (already decompressed).
pub fn parse(body: &[u8], ctx: &ParseContext) -> Result<Parsed, IngestError> {
    // Told apart by hand: serde's untagged enums buffer their input, which raw values cannot
    // survive.
    let first = body.iter().find(|b| !b.is_ascii_whitespace()).copied();
    let (raw, key, sent_at) = match first {
        Some(b'[') => (
            serde_json::from_slice::<Vec<&RawValue>>(body).map_err(malformed)?,
            None,
            None,
        ),
        Some(b'{') => {
            let top: Top<'_> = serde_json::from_slice(body).map_err(malformed)?;
            let key = top
                .api_key
                .or(top.token)
                .and_then(|v| v.as_str().map(str::to_string));
            let sent = top
                .sent_at
                .as_ref()
                .map(parse_timestamp)
                .transpose()
                .ok()
                .flatten()
                .flatten();
            match top.batch {
                Some(batch) => (batch, key, sent),
                None => {
                    let whole: &RawValue = serde_json::from_slice(body).map_err(malformed)?;
                    (vec![whole], None, None)
                }
            }
        }
        _ => {
            return Err(IngestError::Malformed(
                "request body must be a JSON object or array".into(),
            ));
        }
    };
    if raw.is_empty() {
        return Err(IngestError::Malformed("the batch is empty".into()));
    }
    let mut parsed = Parsed {
        write_key: key,
        ..Parsed::default()
    };
    let mut errors = ErrorList::default();
    for (index, e) in raw.iter().enumerate() {
        if let Err(err) = ctx.check_size(e.get().len()) {
            errors.push(index, err);
            continue;
        }
        if let Err(err) = event(e.get(), sent_at, ctx, &mut parsed) {
            errors.push(index, err);
        }
    }
    errors.finish()?;
    Ok(parsed)
}

#[derive(serde::Deserialize)]
struct PostHogEvent<'a> {
    #[serde(default, borrow)]
    event: Option<Cow<'a, str>>,
    #[serde(default)]
    distinct_id: Id,
    #[serde(default)]
    properties: Option<Properties>,
    #[serde(rename = "$set", default)]
    set: Option<Properties>,
    #[serde(rename = "$set_once", default)]
    set_once: Option<Properties>,
    #[serde(default)]
    timestamp: Option<Value>,
    #[serde(default)]
    offset: Option<i64>,
    #[serde(default)]
    sent_at: Option<Value>,
    #[serde(default)]
    uuid: Id,
    #[serde(default)]
    api_key: Option<String>,
    #[serde(default)]
    token: Option<String>,
}

/// Person properties nested in event properties (`$set` as a JSON object).
fn nested(value: PropValue, field: &str) -> Result<Vec<(String, PropValue)>, String> {
    match value {
        PropValue::Json(text) => serde_json::from_str::<Properties>(&text)
            .map(|p| p.0)
            .map_err(|_| format!("`{field}` must be an object")),
        _ => Err(format!("`{field}` must be an object")),
    }
}

fn event(
    raw: &str,
    batch_sent_at: Option<i64>,
    ctx: &ParseContext,
    parsed: &mut Parsed,
) -> Result<(), String> {
    let e: PostHogEvent<'_> =
        serde_json::from_str(raw).map_err(|e| format!("invalid event: {e}"))?;
    let mut set = e.set.unwrap_or_default().0;
    let mut set_once = e.set_once.unwrap_or_default().0;
    let mut distinct_id = e.distinct_id.0;
    let mut key = e.api_key.or(e.token);
    let mut anon = None;
    let mut alias = None;
    let mut props = Vec::new();
    for (k, v) in e.properties.unwrap_or_default().0 {
        match k.as_str() {
            "$set" => set.extend(nested(v, "properties.$set")?),
            "$set_once" => set_once.extend(nested(v, "properties.$set_once")?),
            "token" => {
                if let PropValue::Str(t) = v {
                    key.get_or_insert(t);
                }
            }
            "distinct_id" | "$distinct_id" => {
                if distinct_id.is_none() {
                    distinct_id = Some(v.render()).filter(|s| !s.is_empty());
                }
            }
            _ => {
                if k == "$anon_distinct_id" {
                    anon = Some(v.render());
                } else if k == "alias" {
                    alias = Some(v.render());
                }
                props.push((k, v));
            }
        }
    }
    if parsed.write_key.is_none() {
        parsed.write_key = key;
    }
    let name = e
        .event
        .filter(|s| !s.is_empty())
        .ok_or("missing `event`")?
        .into_owned();
    let distinct_id = distinct_id.ok_or("missing `distinct_id`")?;
    match name.as_str() {
        "$identify" => {
            if let Some(anon) = anon.filter(|a| !a.is_empty()) {
                parsed.merges.push((anon, distinct_id.clone()));
            }
        }
        "$create_alias" => {
            if let Some(alias) = alias.filter(|a| !a.is_empty()) {
                parsed.merges.push((alias, distinct_id.clone()));
            }
        }
        _ => {}
    }
    let mut timestamp = e
        .timestamp
        .as_ref()
        .map(parse_timestamp)
        .transpose()?
        .flatten();
    if timestamp.is_none()
        && let Some(offset) = e.offset
    {
        timestamp = Some(ctx.received_ms - offset);
    }
    let sent_at = match &e.sent_at {
        Some(s) => parse_timestamp(s)?,
        None => batch_sent_at,
    };
    let timestamp_ms = ctx.event_time(timestamp, sent_at)?;
    let message_id = match e.uuid.0 {
        Some(id) => id,
        None => content_id(&distinct_id, &name, timestamp_ms, raw),
    };
    parsed.events.push(Event {
        message_id,
        distinct_id,
        event: name,
        timestamp_ms,
        properties: props,
        person_set: set,
        person_set_once: set_once,
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> ParseContext {
        crate::ingest::test_context()
    }

    #[test]
    fn identify_with_anon_id_merges() {
        let body = br#"{"api_key":"k","batch":[{"event":"$identify","distinct_id":"U1","properties":{"$anon_distinct_id":"anon-1","$set":{"email":"a@b"}},"uuid":"x","timestamp":"2023-11-14T22:00:00Z"}]}"#;
        let parsed = parse(body, &ctx()).unwrap();
        assert_eq!(parsed.write_key.as_deref(), Some("k"));
        assert_eq!(
            parsed.merges,
            vec![("anon-1".to_string(), "U1".to_string())]
        );
        assert_eq!(parsed.events[0].person_set.len(), 1);
        assert!(parsed.events[0].properties.iter().all(|(k, _)| k != "$set"));
    }

    #[test]
    fn single_events_and_arrays_parse() {
        let one = parse(br#"{"event":"e","distinct_id":"d","api_key":"k"}"#, &ctx()).unwrap();
        assert_eq!(one.events.len(), 1);
        assert_eq!(one.write_key.as_deref(), Some("k"));
        let many = parse(br#"[{"event":"e","distinct_id":"d"},{"event":"f","properties":{"distinct_id":"d","token":"k"}}]"#, &ctx()).unwrap();
        assert_eq!(many.events.len(), 2);
        assert_eq!(many.write_key.as_deref(), Some("k"));
        let Err(IngestError::InvalidEvents(e)) = parse(br#"[{"event":"e"}]"#, &ctx()) else {
            panic!()
        };
        assert_eq!(e[0].index, 0);
    }
}
