//! The JSON shape of an event: what the `eventlog` command line prints and imports, and
//! what a wire protocol can reuse.
//!
//! One event is one JSON object, fields in this order:
//!
//! ```json
//! {"seq":0,"aggregate":"INC0000045","version":1,"type":"New",
//!  "ts":"2016-02-29T01:23:00.000000Z","id":"6f1c…","metadata":{"correlation_id":"c-1"},
//!  "data":{"active":"true"}}
//! ```
//!
//! - `ts` is RFC 3339 in UTC with microseconds and `Z` (the store's precision). A time
//!   outside the years 0000..=9999 has no RFC 3339 form and is written as an integer of
//!   microseconds since the Unix epoch; import accepts both.
//! - `metadata` holds `correlation_id` and `causation_id` when set, then the free key/values
//!   (strings). A free key named `correlation_id` or `causation_id` cannot be told apart
//!   from the ids: it is written only when the id of that name is not set (and reads back
//!   as that id).
//! - A JSON payload is `data`, the payload itself. A binary payload is `data_base64`
//!   (standard alphabet, padded). A JSON payload that cannot be embedded byte for byte (not
//!   valid JSON, surrounding whitespace, or a line break) is written as `data_base64` with
//!   `"content_type":"json"`, so that export and import reproduce every payload exactly.
//!
//! Import lines ([`new_event_from_json_str`]) need `aggregate`, `type` and one of `data` or
//! `data_base64`; `ts`, `id`, `metadata` and `content_type` are optional, and other fields
//! (such as the `seq` and `version` of an export) are ignored. `data` is stored as the exact
//! text it has in the line, so key order, number formatting and spacing are kept.

use crate::store::event::check_name;
use crate::store::{ContentType, EventRef, NewEvent};
use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;
use serde_json::value::RawValue;
use std::collections::{BTreeMap, HashMap};
use std::io;
use uuid::Uuid;

/// Microseconds in a second.
const MICROS_PER_SECOND: i64 = 1_000_000;
/// Seconds in a day.
const SECONDS_PER_DAY: i64 = 86_400;
/// Metadata keys that carry the ids rather than free values.
const CORRELATION_ID: &str = "correlation_id";
const CAUSATION_ID: &str = "causation_id";

/// Why a line of JSON is not an event to import.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JsonEventError {
    /// The text is not JSON. Fix the line (one JSON object per line).
    #[error("not valid JSON: {0}")]
    Syntax(String),
    /// The text is JSON but not an object.
    #[error("not a JSON object")]
    NotAnObject,
    /// A required field is absent.
    #[error("missing field {0:?}")]
    Missing(&'static str),
    /// A field has the wrong type or an unusable value; `reason` says which and why.
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

fn invalid(field: &'static str, reason: impl Into<String>) -> JsonEventError {
    JsonEventError::Invalid {
        field,
        reason: reason.into(),
    }
}

/// `ts` as written: RFC 3339 when the year fits in four digits, else microseconds.
#[derive(Serialize)]
#[serde(untagged)]
enum Ts {
    Text(String),
    Micros(i64),
}

impl Ts {
    fn of(timestamp_us: i64) -> Ts {
        format_rfc3339_us(timestamp_us).map_or(Ts::Micros(timestamp_us), Ts::Text)
    }
}

/// The metadata object, serialized without building a map.
struct MetadataJson<'e, 'a>(&'e EventRef<'a>);

impl Serialize for MetadataJson<'_, '_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let e = self.0;
        let mut map = serializer.serialize_map(None)?;
        if let Some(c) = e.correlation_id {
            map.serialize_entry(CORRELATION_ID, c)?;
        }
        if let Some(c) = e.causation_id {
            map.serialize_entry(CAUSATION_ID, c)?;
        }
        for (k, v) in &e.extra {
            let shadowed = (*k == CORRELATION_ID && e.correlation_id.is_some())
                || (*k == CAUSATION_ID && e.causation_id.is_some());
            if !shadowed {
                map.serialize_entry(k, v)?;
            }
        }
        map.end()
    }
}

/// One event in its JSON shape; `data` borrows the payload when it can be embedded.
#[derive(Serialize)]
struct EventJson<'e, 'a> {
    seq: u64,
    aggregate: &'a str,
    version: u64,
    #[serde(rename = "type")]
    event_type: &'a str,
    ts: Ts,
    id: Uuid,
    metadata: MetadataJson<'e, 'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data_base64: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content_type: Option<&'static str>,
}

/// The payload as embeddable JSON text: valid JSON, nothing around it, no line break (so
/// the event stays one line). `None` when it cannot be embedded byte for byte.
fn embeddable_json(payload: &[u8]) -> Option<&RawValue> {
    if payload.iter().any(|&b| b == b'\n' || b == b'\r') {
        return None;
    }
    let text = std::str::from_utf8(payload).ok()?;
    let raw: &RawValue = serde_json::from_str(text).ok()?;
    (raw.get().len() == text.len()).then_some(raw)
}

fn shape<'e, 'a>(e: &'e EventRef<'a>) -> EventJson<'e, 'a> {
    let (data, data_base64, content_type) = match e.content_type {
        ContentType::Json => match embeddable_json(e.payload) {
            Some(raw) => (Some(raw), None, None),
            None => (None, Some(base64_encode(e.payload)), Some("json")),
        },
        ContentType::Binary => (None, Some(base64_encode(e.payload)), None),
    };
    EventJson {
        seq: e.seq,
        aggregate: e.aggregate_id,
        version: e.version,
        event_type: e.event_type,
        ts: Ts::of(e.timestamp_us),
        id: e.event_id,
        metadata: MetadataJson(e),
        data,
        data_base64,
        content_type,
    }
}

/// Writes `e` as one line of JSON (without the newline) in the shape the module docs
/// describe. A JSON payload is embedded byte for byte, so reading the line back with
/// [`new_event_from_json_str`] gives the same payload bytes.
///
/// # Errors
/// Whatever `out` returns.
pub fn write_event_json<W: io::Write>(out: W, e: &EventRef<'_>) -> io::Result<()> {
    serde_json::to_writer(out, &shape(e)).map_err(io::Error::from)
}

/// `e` as one line of JSON text; see [`write_event_json`].
pub fn event_to_json_string(e: &EventRef<'_>) -> String {
    let mut out = Vec::with_capacity(256 + e.payload.len());
    // Writing into a Vec cannot fail, and every field serializes.
    if write_event_json(&mut out, e).is_err() {
        out.clear();
    }
    String::from_utf8(out).unwrap_or_default()
}

/// `e` as a JSON value in the shape the module docs describe.
///
/// Unlike [`write_event_json`], `data` is any payload that parses as JSON, whatever its
/// spacing, and a `Value`'s object keys are sorted: use this to inspect an event, and
/// [`write_event_json`] to reproduce its bytes.
pub fn event_to_json(e: &EventRef<'_>) -> serde_json::Value {
    let mut shaped = shape(e);
    let parsed: Option<serde_json::Value> = match (e.content_type, shaped.data) {
        (ContentType::Json, None) => serde_json::from_slice(e.payload).ok(),
        _ => None,
    };
    let mut value = match serde_json::to_value(&shaped) {
        Ok(v) => v,
        Err(_) => {
            // Only a payload serde_json cannot re-read gets here; show it as bytes.
            shaped.data = None;
            shaped.data_base64 = Some(base64_encode(e.payload));
            shaped.content_type = Some("json");
            serde_json::to_value(&shaped).unwrap_or(serde_json::Value::Null)
        }
    };
    if let (Some(data), Some(obj)) = (parsed, value.as_object_mut()) {
        obj.remove("data_base64");
        obj.remove("content_type");
        obj.insert("data".into(), data);
    }
    value
}

/// An import line as a JSON value: the aggregate and the event to append. See
/// [`new_event_from_json_str`]; the payload is the value's compact serialization (object
/// keys sorted), so prefer the text form to keep a payload's exact bytes.
///
/// # Errors
/// As [`new_event_from_json_str`].
pub fn new_event_from_json(line: &serde_json::Value) -> Result<(String, NewEvent), JsonEventError> {
    if !line.is_object() {
        return Err(JsonEventError::NotAnObject);
    }
    new_event_from_json_str(&line.to_string())
}

fn parse_field<'de, T: serde::Deserialize<'de>>(
    field: &'static str,
    raw: &'de RawValue,
    expected: &str,
) -> Result<T, JsonEventError> {
    serde_json::from_str(raw.get()).map_err(|_| invalid(field, format!("must be {expected}")))
}

/// Parses one import line (a JSON object) into the aggregate and the event to append.
///
/// Fields: `aggregate` and `type` (strings, 1..=255 bytes, no control characters); `data`
/// (any JSON, stored as its exact text with [`ContentType::Json`]) or `data_base64`
/// (stored as [`ContentType::Binary`], or as JSON with `"content_type":"json"`); optional
/// `ts` (RFC 3339, or integer microseconds since the epoch), `id` (a UUID) and `metadata`
/// (an object of strings; `correlation_id` and `causation_id` set the ids). Other fields
/// are ignored.
///
/// # Errors
/// [`JsonEventError`] naming the field and what is wrong.
///
/// # Examples
/// ```
/// let (aggregate, event) = eventlog::json::new_event_from_json_str(
///     r#"{"aggregate":"INC1","type":"New","ts":"2016-02-29T01:23:00.000Z","data":{"b":1,"a":2}}"#,
/// )?;
/// assert_eq!((aggregate.as_str(), event.event_type.as_str()), ("INC1", "New"));
/// assert_eq!(event.payload, br#"{"b":1,"a":2}"#);
/// assert_eq!(event.timestamp_us, Some(1_456_708_980_000_000));
/// # Ok::<(), eventlog::json::JsonEventError>(())
/// ```
pub fn new_event_from_json_str(line: &str) -> Result<(String, NewEvent), JsonEventError> {
    let fields: HashMap<String, &RawValue> = match serde_json::from_str(line) {
        Ok(f) => f,
        Err(e) => {
            return Err(match serde_json::from_str::<serde::de::IgnoredAny>(line) {
                Ok(_) => JsonEventError::NotAnObject,
                Err(_) => JsonEventError::Syntax(e.to_string()),
            })
        }
    };
    let get = |name: &str| fields.get(name).copied();
    let string = |field: &'static str| -> Result<String, JsonEventError> {
        let raw = get(field).ok_or(JsonEventError::Missing(field))?;
        let s: String = parse_field(field, raw, "a string")?;
        check_name(&s).map_err(|reason| invalid(field, format!("{s:?} {reason}")))?;
        Ok(s)
    };
    let aggregate = string("aggregate")?;
    let event_type = string("type")?;

    let content_type = match get("content_type") {
        None => None,
        Some(raw) => {
            let s: String = parse_field("content_type", raw, "\"json\" or \"binary\"")?;
            match s.as_str() {
                "json" => Some(ContentType::Json),
                "binary" => Some(ContentType::Binary),
                _ => {
                    return Err(invalid(
                        "content_type",
                        format!("{s:?} is not json or binary"),
                    ))
                }
            }
        }
    };
    let (payload, content_type) = match (get("data"), get("data_base64")) {
        (Some(_), Some(_)) => {
            return Err(invalid("data", "give either data or data_base64, not both"))
        }
        (Some(raw), None) => {
            if content_type == Some(ContentType::Binary) {
                return Err(invalid(
                    "content_type",
                    "binary payloads are given as data_base64",
                ));
            }
            (raw.get().as_bytes().to_vec(), ContentType::Json)
        }
        (None, Some(raw)) => {
            let text: String = parse_field("data_base64", raw, "a base64 string")?;
            let bytes = base64_decode(&text).map_err(|r| invalid("data_base64", r))?;
            (bytes, content_type.unwrap_or(ContentType::Binary))
        }
        (None, None) => return Err(JsonEventError::Missing("data")),
    };

    let mut event = NewEvent::json_text(event_type, payload);
    event.content_type = content_type;
    if let Some(raw) = get("ts") {
        let value: serde_json::Value = parse_field("ts", raw, "a time")?;
        event.timestamp_us = Some(match value {
            serde_json::Value::String(s) => {
                parse_rfc3339_us(&s).map_err(|r| invalid("ts", format!("{s:?}: {r}")))?
            }
            serde_json::Value::Number(n) => n.as_i64().ok_or_else(|| {
                invalid("ts", "a number must be whole microseconds since the epoch")
            })?,
            _ => return Err(invalid("ts", "must be an RFC 3339 string")),
        });
    }
    if let Some(raw) = get("id") {
        let s: String = parse_field("id", raw, "a UUID string")?;
        let id = Uuid::parse_str(&s).map_err(|e| invalid("id", format!("{s:?}: {e}")))?;
        event.event_id = Some(id);
    }
    if let Some(raw) = get("metadata") {
        let map: BTreeMap<String, serde_json::Value> =
            parse_field("metadata", raw, "an object of strings")?;
        for (k, v) in map {
            let v = match v {
                serde_json::Value::String(s) => s,
                serde_json::Value::Null if k == CORRELATION_ID || k == CAUSATION_ID => continue,
                _ => {
                    return Err(invalid(
                        "metadata",
                        format!("value of {k:?} must be a string"),
                    ))
                }
            };
            match k.as_str() {
                CORRELATION_ID => event.metadata.correlation_id = Some(v),
                CAUSATION_ID => event.metadata.causation_id = Some(v),
                _ => {
                    event.metadata.extra.insert(k, v);
                }
            }
        }
    }
    Ok((aggregate, event))
}

/// Validates JSON text and removes the whitespace outside strings, keeping key order and
/// number formatting: what the command line stores for `--data`.
///
/// # Errors
/// serde_json's error if the text is not JSON.
pub fn compact_json(text: &str) -> Result<String, serde_json::Error> {
    serde_json::from_str::<serde::de::IgnoredAny>(text)?;
    let mut out = String::with_capacity(text.len());
    let mut in_string = false;
    let mut escaped = false;
    for c in text.chars() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
            out.push(c);
        } else if !matches!(c, ' ' | '\t' | '\n' | '\r') {
            out.push(c);
        }
    }
    Ok(out)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's `days_from_civil`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day count since 1970-01-01 (H. Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn is_leap(year: i64) -> bool {
    year % 4 == 0 && (year % 100 != 0 || year % 400 == 0)
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Formats microseconds since the Unix epoch as RFC 3339 in UTC with six fractional
/// digits and `Z`, such as `2016-02-29T01:23:00.000000Z`. `None` outside the years
/// 0000..=9999, which RFC 3339 cannot write.
pub fn format_rfc3339_us(timestamp_us: i64) -> Option<String> {
    let seconds = timestamp_us.div_euclid(MICROS_PER_SECOND);
    let micros = timestamp_us.rem_euclid(MICROS_PER_SECOND);
    let days = seconds.div_euclid(SECONDS_PER_DAY);
    let sod = seconds.rem_euclid(SECONDS_PER_DAY);
    let (year, month, day) = civil_from_days(days);
    if !(0..=9999).contains(&year) {
        return None;
    }
    Some(format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{micros:06}Z",
        sod / 3600,
        sod / 60 % 60,
        sod % 60
    ))
}

/// Parses an RFC 3339 time (`2016-02-29T01:23:00Z`, `2016-02-29T01:23:00.5+01:00`, ...)
/// into microseconds since the Unix epoch. Fractions finer than a microsecond are cut;
/// `t` or a space may separate date and time; leap seconds (`:60`) are refused.
///
/// # Errors
/// A short reason when the text is not such a time.
pub fn parse_rfc3339_us(text: &str) -> Result<i64, String> {
    let b = text.as_bytes();
    let digits = |at: usize, n: usize| -> Result<i64, String> {
        let part = b
            .get(at..at + n)
            .filter(|p| p.iter().all(u8::is_ascii_digit))
            .ok_or_else(|| format!("expected {n} digits at byte {at}"))?;
        Ok(part
            .iter()
            .fold(0i64, |acc, d| acc * 10 + i64::from(d - b'0')))
    };
    let expect = |at: usize, what: &[u8]| -> Result<(), String> {
        match b.get(at) {
            Some(c) if what.contains(c) => Ok(()),
            _ => Err(format!(
                "expected {} at byte {at}",
                what.iter()
                    .map(|&c| format!("{:?}", char::from(c)))
                    .collect::<Vec<_>>()
                    .join(" or ")
            )),
        }
    };
    let year = digits(0, 4)?;
    expect(4, b"-")?;
    let month = digits(5, 2)?;
    expect(7, b"-")?;
    let day = digits(8, 2)?;
    expect(10, b"Tt ")?;
    let hour = digits(11, 2)?;
    expect(13, b":")?;
    let minute = digits(14, 2)?;
    expect(16, b":")?;
    let second = digits(17, 2)?;
    if !(1..=12).contains(&month) {
        return Err(format!("month {month} is not 1..=12"));
    }
    if !(1..=days_in_month(year, month)).contains(&day) {
        return Err(format!("day {day} is not in {year:04}-{month:02}"));
    }
    if hour > 23 || minute > 59 {
        return Err(format!("{hour:02}:{minute:02} is not a time of day"));
    }
    if second == 60 {
        return Err("leap seconds are not supported".into());
    }
    if second > 59 {
        return Err(format!("second {second} is not 0..=59"));
    }
    let mut at = 19;
    let mut micros = 0i64;
    if b.get(at) == Some(&b'.') {
        at += 1;
        let start = at;
        while b.get(at).is_some_and(u8::is_ascii_digit) {
            if at - start < 6 {
                micros = micros * 10 + i64::from(b[at] - b'0');
            }
            at += 1;
        }
        let n = at - start;
        if n == 0 {
            return Err("expected digits after '.'".into());
        }
        for _ in n..6 {
            micros *= 10;
        }
    }
    let offset_seconds = match b.get(at) {
        Some(b'Z' | b'z') => {
            at += 1;
            0
        }
        Some(&sign @ (b'+' | b'-')) => {
            let oh = digits(at + 1, 2)?;
            expect(at + 3, b":")?;
            let om = digits(at + 4, 2)?;
            if oh > 23 || om > 59 {
                return Err(format!("offset {oh:02}:{om:02} is out of range"));
            }
            at += 6;
            let s = oh * 3600 + om * 60;
            if sign == b'-' {
                -s
            } else {
                s
            }
        }
        _ => {
            return Err(format!(
                "expected 'Z' or an offset like +01:00 at byte {at}"
            ))
        }
    };
    if at != b.len() {
        return Err(format!("unexpected text after byte {at}"));
    }
    let seconds =
        days_from_civil(year, month, day) * SECONDS_PER_DAY + hour * 3600 + minute * 60 + second
            - offset_seconds;
    Ok(seconds * MICROS_PER_SECOND + micros)
}

const BASE64_ALPHABET: &[u8; 64] =
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Encodes bytes as base64 (standard alphabet, `=` padding).
pub fn base64_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, &b)| acc | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(
                    BASE64_ALPHABET[(n >> (18 - 6 * i) & 63) as usize],
                ));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Decodes base64 (standard alphabet; `=` padding optional).
///
/// # Errors
/// A short reason naming the first bad character or a bad length.
pub fn base64_decode(text: &str) -> Result<Vec<u8>, String> {
    let trimmed = text.trim_end_matches('=');
    if text.len() - trimmed.len() > 2
        || (text.len() != trimmed.len() && !text.len().is_multiple_of(4))
    {
        return Err("bad padding".into());
    }
    if trimmed.len() % 4 == 1 {
        return Err(format!("length {} is not a base64 length", trimmed.len()));
    }
    let mut out = Vec::with_capacity(trimmed.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0;
    for (i, c) in trimmed.bytes().enumerate() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => {
                return Err(format!(
                    "character {:?} at {i} is not base64",
                    char::from(c)
                ))
            }
        };
        acc = acc << 6 | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    if acc != 0 {
        return Err("trailing bits are not zero".into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event<'a>(payload: &'a [u8], content_type: ContentType) -> EventRef<'a> {
        EventRef {
            seq: 7,
            aggregate_id: "INC0000045",
            version: 2,
            event_type: "Resolved",
            event_id: Uuid::from_u128(0x1234),
            timestamp_us: 1_456_732_380_123_456,
            correlation_id: Some("req-1"),
            causation_id: None,
            extra: vec![("source", "uci")],
            content_type,
            payload,
        }
    }

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(
            format_rfc3339_us(0).as_deref(),
            Some("1970-01-01T00:00:00.000000Z")
        );
        assert_eq!(
            format_rfc3339_us(1_456_708_980_000_000).as_deref(),
            Some("2016-02-29T01:23:00.000000Z")
        );
        assert_eq!(
            format_rfc3339_us(-1).as_deref(),
            Some("1969-12-31T23:59:59.999999Z")
        );
        assert_eq!(format_rfc3339_us(i64::MAX), None);
        assert_eq!(format_rfc3339_us(i64::MIN), None);
    }

    #[test]
    fn rfc3339_parses_what_it_formats_across_centuries() {
        let mut t = -62_000_000_000_000_000i64; // year 0005
        while t < 250_000_000_000_000_000 {
            let text = format_rfc3339_us(t).unwrap();
            assert_eq!(parse_rfc3339_us(&text), Ok(t), "{text}");
            t += 987_654_321_987_653;
        }
    }

    #[test]
    fn rfc3339_parses_offsets_fractions_and_separators() {
        let base = 1_456_708_980_000_000;
        assert_eq!(parse_rfc3339_us("2016-02-29T01:23:00.000Z"), Ok(base));
        assert_eq!(parse_rfc3339_us("2016-02-29t01:23:00z"), Ok(base));
        assert_eq!(parse_rfc3339_us("2016-02-29 02:23:00+01:00"), Ok(base));
        assert_eq!(parse_rfc3339_us("2016-02-28T23:23:00-02:00"), Ok(base));
        assert_eq!(
            parse_rfc3339_us("2016-02-29T01:23:00.5Z"),
            Ok(base + 500_000)
        );
        assert_eq!(
            parse_rfc3339_us("2016-02-29T01:23:00.123456789Z"),
            Ok(base + 123_456)
        );
    }

    #[test]
    fn rfc3339_rejects_impossible_times() {
        for bad in [
            "2015-02-29T00:00:00Z",
            "2016-13-01T00:00:00Z",
            "2016-01-01T24:00:00Z",
            "2016-01-01T00:00:60Z",
            "2016-01-01T00:00:00",
            "2016-01-01T00:00:00.Z",
            "2016-01-01T00:00:00Zjunk",
            "2016-1-01T00:00:00Z",
            "",
        ] {
            assert!(parse_rfc3339_us(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn base64_matches_rfc4648_vectors_and_round_trips() {
        let vectors = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ];
        for (plain, encoded) in vectors {
            assert_eq!(base64_encode(plain.as_bytes()), encoded);
            assert_eq!(base64_decode(encoded).unwrap(), plain.as_bytes());
        }
        assert_eq!(base64_decode("Zm8").unwrap(), b"fo");
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(base64_decode(&base64_encode(&all)).unwrap(), all);
        assert!(base64_decode("Zm9v!").is_err());
        assert!(base64_decode("Z").is_err());
        assert!(base64_decode("Zg===").is_err());
    }

    #[test]
    fn json_payload_is_embedded_byte_for_byte() {
        let payload = br#"{"z":1,"a":[1.50, "x"]}"#;
        let e = event(payload, ContentType::Json);
        let line = event_to_json_string(&e);
        assert_eq!(
            line,
            r#"{"seq":7,"aggregate":"INC0000045","version":2,"type":"Resolved","ts":"2016-02-29T07:53:00.123456Z","id":"00000000-0000-0000-0000-000000001234","metadata":{"correlation_id":"req-1","source":"uci"},"data":{"z":1,"a":[1.50, "x"]}}"#
        );
        let (aggregate, back) = new_event_from_json_str(&line).unwrap();
        assert_eq!(aggregate, "INC0000045");
        assert_eq!(back.event_type, "Resolved");
        assert_eq!(back.payload, payload);
        assert_eq!(back.content_type, ContentType::Json);
        assert_eq!(back.timestamp_us, Some(e.timestamp_us));
        assert_eq!(back.event_id, Some(e.event_id));
        assert_eq!(back.metadata.correlation_id.as_deref(), Some("req-1"));
        assert_eq!(
            back.metadata.extra.get("source").map(String::as_str),
            Some("uci")
        );
    }

    #[test]
    fn payloads_that_cannot_be_embedded_round_trip_as_base64() {
        for (payload, content_type) in [
            (&b"{\n  \"a\": 1\n}"[..], ContentType::Json),
            (&b" {}"[..], ContentType::Json),
            (&b"not json"[..], ContentType::Json),
            (&b"\x00\xff binary"[..], ContentType::Binary),
            (&b""[..], ContentType::Binary),
        ] {
            let line = event_to_json_string(&event(payload, content_type));
            assert!(!line.contains('\n'));
            assert!(line.contains("data_base64"), "{line}");
            let (_, back) = new_event_from_json_str(&line).unwrap();
            assert_eq!(back.payload, payload);
            assert_eq!(back.content_type, content_type);
        }
    }

    #[test]
    fn value_shape_has_every_field() {
        let e = event(b"{\n\"b\":2,\"a\":1}", ContentType::Json);
        let v = event_to_json(&e);
        assert_eq!(v["seq"], 7);
        assert_eq!(v["aggregate"], "INC0000045");
        assert_eq!(v["version"], 2);
        assert_eq!(v["type"], "Resolved");
        assert_eq!(v["ts"], "2016-02-29T07:53:00.123456Z");
        assert_eq!(v["id"], "00000000-0000-0000-0000-000000001234");
        assert_eq!(v["metadata"]["correlation_id"], "req-1");
        assert_eq!(v["data"], serde_json::json!({"a": 1, "b": 2}));
        assert!(v.get("data_base64").is_none());
        let embedded = event_to_json(&event(br#"{"b":2,"a":1}"#, ContentType::Json));
        assert_eq!(embedded["data"], serde_json::json!({"a": 1, "b": 2}));
        assert!(embedded.get("content_type").is_none());
        let b = event_to_json(&event(b"\x01\x02", ContentType::Binary));
        assert_eq!(b["data_base64"], "AQI=");
        assert!(b.get("data").is_none());
        let (_, back) = new_event_from_json(&v).unwrap();
        assert_eq!(back.payload, br#"{"a":1,"b":2}"#);
    }

    #[test]
    fn out_of_range_times_are_written_as_microseconds() {
        let mut e = event(b"1", ContentType::Json);
        e.timestamp_us = i64::MIN;
        let line = event_to_json_string(&e);
        assert!(line.contains(&format!("\"ts\":{}", i64::MIN)), "{line}");
        let (_, back) = new_event_from_json_str(&line).unwrap();
        assert_eq!(back.timestamp_us, Some(i64::MIN));
    }

    #[test]
    fn import_lines_need_aggregate_type_and_data() {
        let (agg, e) =
            new_event_from_json_str(r#"{"aggregate":"a","type":"T","data":null}"#).unwrap();
        assert_eq!((agg.as_str(), e.payload.as_slice()), ("a", &b"null"[..]));
        assert_eq!((e.timestamp_us, e.event_id), (None, None));
        let cases = [
            ("{", "not valid JSON"),
            ("[1]", "not a JSON object"),
            (r#"{"type":"T","data":1}"#, "missing field \"aggregate\""),
            (r#"{"aggregate":"a","data":1}"#, "missing field \"type\""),
            (r#"{"aggregate":"a","type":"T"}"#, "missing field \"data\""),
            (
                r#"{"aggregate":5,"type":"T","data":1}"#,
                "invalid aggregate: must be a string",
            ),
            (
                r#"{"aggregate":"","type":"T","data":1}"#,
                "invalid aggregate",
            ),
            (
                r#"{"aggregate":"a","type":"T\n","data":1}"#,
                "control character",
            ),
            (
                r#"{"aggregate":"a","type":"T","data":1,"data_base64":""}"#,
                "not both",
            ),
            (
                r#"{"aggregate":"a","type":"T","data_base64":"!!"}"#,
                "invalid data_base64",
            ),
            (
                r#"{"aggregate":"a","type":"T","data":1,"ts":"yesterday"}"#,
                "invalid ts",
            ),
            (
                r#"{"aggregate":"a","type":"T","data":1,"ts":1.5}"#,
                "invalid ts",
            ),
            (
                r#"{"aggregate":"a","type":"T","data":1,"id":"x"}"#,
                "invalid id",
            ),
            (
                r#"{"aggregate":"a","type":"T","data":1,"metadata":{"k":1}}"#,
                "invalid metadata",
            ),
            (
                r#"{"aggregate":"a","type":"T","data":1,"metadata":[]}"#,
                "invalid metadata",
            ),
            (
                r#"{"aggregate":"a","type":"T","data":1,"content_type":"xml"}"#,
                "invalid content_type",
            ),
        ];
        for (line, want) in cases {
            let err = new_event_from_json_str(line).unwrap_err().to_string();
            assert!(err.contains(want), "{line}: {err}");
        }
    }

    #[test]
    fn import_lines_keep_every_optional_field() {
        let (_, e) = new_event_from_json_str(
            r#"{"seq":99,"version":3,"aggregate":"a","type":"T","ts":5,"id":"00000000-0000-0000-0000-000000000009","metadata":{"causation_id":"c","correlation_id":null,"k":"v"},"data_base64":"e30=","content_type":"json"}"#,
        )
        .unwrap();
        assert_eq!(e.payload, b"{}");
        assert_eq!(e.content_type, ContentType::Json);
        assert_eq!(e.timestamp_us, Some(5));
        assert_eq!(e.event_id, Some(Uuid::from_u128(9)));
        assert_eq!(e.metadata.causation_id.as_deref(), Some("c"));
        assert_eq!(e.metadata.correlation_id, None);
        assert_eq!(e.metadata.extra.len(), 1);
    }

    #[test]
    fn compact_json_keeps_strings_and_key_order() {
        assert_eq!(
            compact_json("{ \"b\" : [1, 2],\n \"a\": \"x y \\\" z\" }").unwrap(),
            r#"{"b":[1,2],"a":"x y \" z"}"#
        );
        assert!(compact_json("{").is_err());
    }
}
