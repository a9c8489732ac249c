//! The Segment HTTP tracking API (`/v1/batch`, `/v1/track`, … and the browser short paths).
//!
//! Mapping: `track` keeps its event name; `identify` becomes `$identify` with its traits set
//! on the person and merges `anonymousId` into `userId`; `page` becomes `$pageview`, `screen`
//! `$screen`, `group` `$groupidentify`, and `alias` `$create_alias`, which merges `previousId`
//! into `userId`. The distinct id is `userId`, else `anonymousId`. The write key comes from
//! Basic auth (user name) or `writeKey` in the body. `sentAt` corrects client clock skew, and
//! `messageId` deduplicates.

use crate::ingest::{
    ErrorList, Id, IngestError, ParseContext, Parsed, content_id, parse_timestamp,
};
use optiprism_types::event::{Event, PropValue, Properties};
use serde_json::Value;
use serde_json::value::RawValue;
use std::borrow::Cow;

/// The message type a path implies when the body has no `type`.
pub fn type_of_path(path: &str) -> Option<&'static str> {
    Some(match path.trim_end_matches('/').rsplit('/').next()? {
        "track" | "t" => "track",
        "identify" | "i" => "identify",
        "page" | "p" => "page",
        "screen" | "s" => "screen",
        "group" | "g" => "group",
        "alias" | "a" => "alias",
        _ => return None,
    })
}

#[derive(serde::Deserialize)]
struct Top<'a> {
    #[serde(rename = "writeKey", default)]
    write_key: Option<Value>,
    #[serde(rename = "sentAt", default)]
    sent_at: Option<Value>,
    /// Borrowed from the body: each message is read twice (its size, then its fields), and
    /// borrowing spares a copy of every message.
    #[serde(default, borrow)]
    batch: Option<Vec<&'a RawValue>>,
}

/// Parses a Segment body. `single_type` is the type implied by a single-message path.
pub fn parse(
    body: &[u8],
    single_type: Option<&str>,
    ctx: &ParseContext,
) -> Result<Parsed, IngestError> {
    let top: Top<'_> = serde_json::from_slice(body).map_err(|e| {
        IngestError::Malformed(format!(
            "request body is not a valid UTF-8 JSON object of the Segment API: {e}"
        ))
    })?;
    let mut parsed = Parsed {
        write_key: top
            .write_key
            .as_ref()
            .and_then(Value::as_str)
            .map(str::to_string),
        ..Parsed::default()
    };
    let batch_sent_at = top
        .sent_at
        .as_ref()
        .map(parse_timestamp)
        .transpose()
        .ok()
        .flatten()
        .flatten();
    let raw: Vec<&RawValue> = match (single_type, top.batch) {
        (None, Some(batch)) => batch,
        (None, None) => return Err(IngestError::Malformed("missing `batch` array".into())),
        (Some(_), _) => {
            let whole: &RawValue = serde_json::from_slice(body).map_err(|e| {
                IngestError::Malformed(format!("request body is not valid UTF-8 JSON: {e}"))
            })?;
            vec![whole]
        }
    };
    if raw.is_empty() {
        return Err(IngestError::Malformed("`batch` is empty".into()));
    }
    let mut errors = ErrorList::default();
    for (index, msg) in raw.iter().enumerate() {
        if let Err(e) = ctx.check_size(msg.get().len()) {
            errors.push(index, e);
            continue;
        }
        match message(msg.get(), single_type, batch_sent_at, ctx, &mut parsed) {
            Ok(()) => {}
            Err(e) => errors.push(index, e),
        }
    }
    errors.finish()?;
    Ok(parsed)
}

#[derive(serde::Deserialize)]
struct Context {
    #[serde(default)]
    traits: Option<Properties>,
}

#[derive(serde::Deserialize)]
struct Message<'a> {
    #[serde(rename = "type", default, borrow)]
    kind: Option<Cow<'a, str>>,
    #[serde(rename = "userId", default)]
    user_id: Id,
    #[serde(rename = "anonymousId", default)]
    anonymous_id: Id,
    #[serde(default, borrow)]
    event: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    name: Option<Cow<'a, str>>,
    #[serde(default)]
    properties: Option<Properties>,
    #[serde(default)]
    traits: Option<Properties>,
    #[serde(default)]
    context: Option<Context>,
    #[serde(default)]
    timestamp: Option<Value>,
    #[serde(rename = "originalTimestamp", default)]
    original_timestamp: Option<Value>,
    #[serde(rename = "sentAt", default)]
    sent_at: Option<Value>,
    #[serde(rename = "messageId", default)]
    message_id: Id,
    #[serde(rename = "previousId", default)]
    previous_id: Id,
    #[serde(rename = "groupId", default)]
    group_id: Id,
    #[serde(rename = "writeKey", default)]
    write_key: Option<String>,
}

fn message(
    raw: &str,
    single_type: Option<&str>,
    batch_sent_at: Option<i64>,
    ctx: &ParseContext,
    parsed: &mut Parsed,
) -> Result<(), String> {
    let m: Message<'_> = serde_json::from_str(raw).map_err(|e| format!("invalid message: {e}"))?;
    if parsed.write_key.is_none() {
        parsed.write_key = m.write_key;
    }
    let kind = match m.kind.as_deref() {
        Some(t) => t,
        None => single_type.ok_or("missing `type`")?,
    };
    let user_id = m.user_id.0;
    let anonymous_id = m.anonymous_id.0;
    let distinct_id = user_id
        .clone()
        .or_else(|| anonymous_id.clone())
        .ok_or("missing `userId` or `anonymousId`")?;
    let mut props = m.properties.unwrap_or_default().0;
    let traits = m
        .traits
        .or_else(|| m.context.and_then(|c| c.traits))
        .unwrap_or_default()
        .0;
    let (event, person_set) = match kind {
        "track" => {
            let name = m.event.filter(|s| !s.is_empty()).ok_or("missing `event`")?;
            (name.into_owned(), Vec::new())
        }
        "identify" => {
            if let (Some(anon), Some(user)) = (&anonymous_id, &user_id) {
                parsed.merges.push((anon.clone(), user.clone()));
            }
            ("$identify".to_string(), traits)
        }
        "page" | "screen" => {
            if let Some(name) = m.name {
                let key = if kind == "page" {
                    "name"
                } else {
                    "$screen_name"
                };
                set_property(&mut props, key, PropValue::Str(name.into_owned()));
            }
            (
                if kind == "page" {
                    "$pageview"
                } else {
                    "$screen"
                }
                .to_string(),
                Vec::new(),
            )
        }
        "group" => {
            if let Some(group) = m.group_id.0 {
                set_property(&mut props, "$group_key", PropValue::Str(group));
            }
            ("$groupidentify".to_string(), Vec::new())
        }
        "alias" => {
            let previous = m.previous_id.0.ok_or("missing `previousId`")?;
            let user = user_id.clone().ok_or("missing `userId`")?;
            parsed.merges.push((previous, user));
            ("$create_alias".to_string(), Vec::new())
        }
        other => return Err(format!("unknown message type `{other}`")),
    };
    let timestamp = match m.timestamp.as_ref().filter(|v| !v.is_null()) {
        Some(t) => parse_timestamp(t)?,
        None => m
            .original_timestamp
            .as_ref()
            .map(parse_timestamp)
            .transpose()?
            .flatten(),
    };
    let sent_at = match &m.sent_at {
        Some(s) => parse_timestamp(s)?,
        None => batch_sent_at,
    };
    let timestamp_ms = ctx.event_time(timestamp, sent_at)?;
    let message_id = match m.message_id.0 {
        Some(id) => id,
        None => content_id(&distinct_id, &event, timestamp_ms, raw),
    };
    parsed.events.push(Event {
        message_id,
        distinct_id,
        event,
        timestamp_ms,
        properties: props,
        person_set,
        person_set_once: Vec::new(),
    });
    Ok(())
}

/// Sets `key`, replacing a property of that name the message also sent: the event keeps one
/// value per key, and the message's own field (a page's `name`, a group's id) is the one meant.
fn set_property(props: &mut Vec<(String, PropValue)>, key: &str, value: PropValue) {
    props.retain(|(k, _)| k != key);
    props.push((key.to_string(), value));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> ParseContext {
        crate::ingest::test_context()
    }

    #[test]
    fn batch_with_identify_merges_and_corrects_skew() {
        let body = br#"{"writeKey":"wk","sentAt":"2023-11-14T22:15:00Z","batch":[
            {"type":"track","userId":"u1","event":"Signed Up","properties":{"plan":"pro","n":null},"timestamp":"2023-11-14T22:14:00Z","messageId":"m1"},
            {"type":"identify","userId":"u1","anonymousId":"a1","traits":{"email":"x@y"},"messageId":"m2"}
        ]}"#;
        let parsed = parse(body, None, &ctx()).unwrap();
        assert_eq!(parsed.write_key.as_deref(), Some("wk"));
        assert_eq!(parsed.events.len(), 2);
        assert_eq!(
            parsed.events[0].properties,
            vec![("plan".to_string(), PropValue::Str("pro".into()))]
        );
        // The client clock is 100 s ahead of the receive time: its timestamps move back.
        assert_eq!(parsed.events[0].timestamp_ms, 1_700_000_040_000 - 100_000);
        assert_eq!(parsed.merges, vec![("a1".to_string(), "u1".to_string())]);
        assert_eq!(parsed.events[1].event, "$identify");
    }

    #[test]
    fn bad_events_are_named_by_index() {
        let body = br#"{"batch":[{"type":"track","userId":"u1","event":"ok"},{"type":"track","userId":"u1"},{"type":"track","event":"x"},{"type":"track","userId":"u","event":"e","timestamp":"1970-01-01T00:00:00Z"}]}"#;
        let Err(IngestError::InvalidEvents(errors)) = parse(body, None, &ctx()) else {
            panic!("expected errors")
        };
        let indexes: Vec<usize> = errors.iter().map(|e| e.index).collect();
        assert_eq!(indexes, [1, 2, 3]);
        assert!(errors[0].error.contains("event"));
        assert!(errors[1].error.contains("userId"));
        assert!(errors[2].error.contains("outside the accepted range"));
    }

    #[test]
    fn short_paths_imply_the_type() {
        assert_eq!(type_of_path("/v1/t"), Some("track"));
        assert_eq!(type_of_path("/v1/identify"), Some("identify"));
        assert_eq!(type_of_path("/v1/batch"), None);
        let parsed = parse(
            br#"{"userId":"u","event":"e","writeKey":"k"}"#,
            Some("track"),
            &ctx(),
        )
        .unwrap();
        assert_eq!(parsed.events[0].event, "e");
        assert!(parsed.events[0].message_id.starts_with("h-"));
    }

    #[test]
    fn a_messages_own_field_replaces_a_property_of_the_same_name() {
        let body = br#"{"batch":[
            {"type":"page","userId":"u","name":"Home","properties":{"name":"theirs","path":"/"},"messageId":"p1"},
            {"type":"group","userId":"u","groupId":"g1","traits":{},"properties":{"$group_key":"x"},"messageId":"g1"}
        ]}"#;
        let parsed = parse(body, None, &ctx()).unwrap();
        let names: Vec<_> = parsed.events[0]
            .properties
            .iter()
            .filter(|(k, _)| k == "name")
            .collect();
        assert_eq!(
            names,
            [&("name".to_string(), PropValue::Str("Home".into()))]
        );
        let keys: Vec<_> = parsed.events[1]
            .properties
            .iter()
            .filter(|(k, _)| k == "$group_key")
            .collect();
        assert_eq!(
            keys,
            [&("$group_key".to_string(), PropValue::Str("g1".into()))]
        );
    }
}
