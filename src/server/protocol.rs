//! The wire format: requests parsed from JSON text, answers and pushed messages written
//! as JSON text. `docs/PROTOCOL.md` is the reference; this module is the only place that
//! knows the field names.
//!
//! Parsing never trusts the input: every field is checked for its type, unknown fields
//! are refused (a typo must not silently drop an `expected_version`), and an event's
//! `data` is kept as the exact text it had in the message, as the command line's import
//! does.

use crate::json::{base64_decode, parse_rfc3339_us};
use crate::store::{ContentType, ExpectedVersion, NewEvent};
use serde_json::value::RawValue;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;
use uuid::Uuid;

/// What went wrong with a request, as the `code` of an error answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorCode {
    /// The message is not a JSON object (or not text).
    InvalidJson,
    /// A field is missing, unknown, or of the wrong type.
    BadRequest,
    /// `op` names no operation.
    UnknownOp,
    /// The message is larger than the server's limit.
    MessageTooLarge,
    /// The token does not allow this operation or this aggregate.
    Forbidden,
    /// The aggregate is not at the expected version; the error holds `expected` and
    /// `actual`.
    WrongExpectedVersion,
    /// An event id is already used by another event of the aggregate.
    DuplicateEventId,
    /// An event is not acceptable: bad name, payload or metadata too large, too many.
    InvalidEvent,
    /// A plugin of the store refused the append.
    Rejected,
    /// The store cannot take the append now (index behind); retry later.
    Unavailable,
    /// The connection (or the server) has as many subscriptions as allowed.
    TooManySubscriptions,
    /// `unsubscribe` names no active subscription of this connection.
    UnknownSubscription,
    /// Reading the store failed (damaged log or index).
    ReadFailed,
    /// The store failed the write (disk full, I/O error); nothing was stored.
    StorageFailed,
    /// The server is shutting down.
    ShuttingDown,
}

impl ErrorCode {
    /// The code as sent.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidJson => "invalid_json",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::UnknownOp => "unknown_op",
            ErrorCode::MessageTooLarge => "message_too_large",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::WrongExpectedVersion => "wrong_expected_version",
            ErrorCode::DuplicateEventId => "duplicate_event_id",
            ErrorCode::InvalidEvent => "invalid_event",
            ErrorCode::Rejected => "rejected",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::TooManySubscriptions => "too_many_subscriptions",
            ErrorCode::UnknownSubscription => "unknown_subscription",
            ErrorCode::ReadFailed => "read_failed",
            ErrorCode::StorageFailed => "storage_failed",
            ErrorCode::ShuttingDown => "shutting_down",
        }
    }
}

/// An error answer's content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct WireError {
    pub code: ErrorCode,
    pub message: String,
    /// For `wrong_expected_version`: the expectation as given, and the actual version.
    pub conflict: Option<(ExpectedVersion, u64)>,
}

impl WireError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> WireError {
        WireError {
            code,
            message: message.into(),
            conflict: None,
        }
    }

    fn bad(message: impl Into<String>) -> WireError {
        WireError::new(ErrorCode::BadRequest, message)
    }
}

/// An `append`: one aggregate, one or more events.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct AppendOp {
    pub aggregate: String,
    pub expected: ExpectedVersion,
    pub events: Vec<NewEvent>,
}

/// What a `read` reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ReadSource {
    /// One aggregate, from a version.
    Aggregate(String),
    /// One event type, from a seq.
    Type(String),
    /// Everything, from a seq.
    All,
}

/// A `read`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ReadOp {
    pub source: ReadSource,
    /// A version for aggregates (default 1), a seq otherwise (default 0).
    pub from: Option<u64>,
    pub limit: Option<u64>,
}

/// A `subscribe`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SubscribeOp {
    /// The first seq; `None`: the end of the log (only new events).
    pub from: Option<u64>,
    pub types: Option<Vec<String>>,
    pub aggregate_prefix: Option<String>,
}

/// The operations.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Op {
    Append(AppendOp),
    Read(ReadOp),
    Subscribe(SubscribeOp),
    Unsubscribe { sub: u64 },
}

impl Op {
    pub fn name(&self) -> &'static str {
        match self {
            Op::Append(_) => "append",
            Op::Read(_) => "read",
            Op::Subscribe(_) => "subscribe",
            Op::Unsubscribe { .. } => "unsubscribe",
        }
    }
}

/// A parsed request, or why it could not be (with its id when that much was readable).
pub(crate) type Parsed = Result<(u64, Op), (Option<u64>, WireError)>;

type Fields<'a> = HashMap<String, &'a RawValue>;

fn parse_as<'a, T: serde::Deserialize<'a>>(
    field: &str,
    raw: &'a RawValue,
    expected: &str,
) -> Result<T, WireError> {
    serde_json::from_str(raw.get())
        .map_err(|_| WireError::bad(format!("{field} must be {expected}")))
}

fn check_fields(fields: &Fields<'_>, allowed: &[&str], context: &str) -> Result<(), WireError> {
    let mut unknown: Vec<&str> = fields
        .keys()
        .map(String::as_str)
        .filter(|k| !allowed.contains(k))
        .collect();
    unknown.sort_unstable();
    match unknown.first() {
        None => Ok(()),
        Some(k) => Err(WireError::bad(format!(
            "unknown field {k:?} {context}; allowed: {}",
            allowed.join(", ")
        ))),
    }
}

fn string_field(fields: &Fields<'_>, name: &str) -> Result<Option<String>, WireError> {
    fields
        .get(name)
        .map(|raw| parse_as::<String>(name, raw, "a string"))
        .transpose()
}

fn u64_field(fields: &Fields<'_>, name: &str) -> Result<Option<u64>, WireError> {
    fields
        .get(name)
        .map(|raw| parse_as::<u64>(name, raw, "a non-negative integer"))
        .transpose()
}

/// Parses one request message.
pub(crate) fn parse_request(text: &str) -> Parsed {
    let fields: Fields<'_> = match serde_json::from_str(text) {
        Ok(f) => f,
        Err(e) => {
            let message = match serde_json::from_str::<serde::de::IgnoredAny>(text) {
                Ok(_) => "a request must be a JSON object".to_string(),
                Err(_) => format!("not valid JSON: {e}"),
            };
            return Err((None, WireError::new(ErrorCode::InvalidJson, message)));
        }
    };
    let id = match fields.get("id") {
        None => return Err((None, WireError::bad("missing field \"id\""))),
        Some(raw) => match serde_json::from_str::<u64>(raw.get()) {
            Ok(id) => id,
            Err(_) => return Err((None, WireError::bad("id must be a non-negative integer"))),
        },
    };
    parse_op(&fields)
        .map(|op| (id, op))
        .map_err(|e| (Some(id), e))
}

fn parse_op(fields: &Fields<'_>) -> Result<Op, WireError> {
    let op = string_field(fields, "op")?.ok_or_else(|| WireError::bad("missing field \"op\""))?;
    match op.as_str() {
        "append" => parse_append(fields).map(Op::Append),
        "read" => parse_read(fields).map(Op::Read),
        "subscribe" => parse_subscribe(fields).map(Op::Subscribe),
        "unsubscribe" => {
            check_fields(fields, &["id", "op", "sub"], "for op unsubscribe")?;
            let sub =
                u64_field(fields, "sub")?.ok_or_else(|| WireError::bad("missing field \"sub\""))?;
            Ok(Op::Unsubscribe { sub })
        }
        other => Err(WireError::new(
            ErrorCode::UnknownOp,
            format!("unknown op {other:?}; the ops are append, read, subscribe, unsubscribe"),
        )),
    }
}

/// Fields of one event, in a single-event `append` or in an item of `events`.
const EVENT_FIELDS: [&str; 7] = [
    "type",
    "data",
    "data_base64",
    "content_type",
    "event_id",
    "metadata",
    "ts",
];

fn parse_expected(raw: &RawValue) -> Result<ExpectedVersion, WireError> {
    let message = "expected_version must be a version number, \"any\", \"none\" or \"exists\"";
    match serde_json::from_str::<serde_json::Value>(raw.get()) {
        Ok(serde_json::Value::Number(n)) => n
            .as_u64()
            .map(ExpectedVersion::Exact)
            .ok_or_else(|| WireError::bad(message)),
        Ok(serde_json::Value::String(s)) => match s.as_str() {
            "any" => Ok(ExpectedVersion::Any),
            "none" => Ok(ExpectedVersion::NoStream),
            "exists" => Ok(ExpectedVersion::Exists),
            _ => Err(WireError::bad(message)),
        },
        _ => Err(WireError::bad(message)),
    }
}

/// The expectation in the form a request gives it.
pub(crate) fn expected_json(e: ExpectedVersion) -> String {
    match e {
        ExpectedVersion::Any => "\"any\"".into(),
        ExpectedVersion::NoStream => "\"none\"".into(),
        ExpectedVersion::Exists => "\"exists\"".into(),
        ExpectedVersion::Exact(v) => v.to_string(),
    }
}

fn parse_event(fields: &Fields<'_>, at: &str) -> Result<NewEvent, WireError> {
    let bad = |m: String| WireError::bad(format!("{at}{m}"));
    let event_type = string_field(fields, "type")
        .map_err(|e| bad(e.message))?
        .ok_or_else(|| bad("missing field \"type\"".into()))?;
    let content_type = match string_field(fields, "content_type").map_err(|e| bad(e.message))? {
        None => None,
        Some(s) if s == "json" => Some(ContentType::Json),
        Some(s) if s == "binary" => Some(ContentType::Binary),
        Some(s) => return Err(bad(format!("content_type {s:?} is not json or binary"))),
    };
    let (payload, content_type) = match (fields.get("data"), fields.get("data_base64")) {
        (Some(_), Some(_)) => return Err(bad("give either data or data_base64, not both".into())),
        (Some(raw), None) => {
            if content_type == Some(ContentType::Binary) {
                return Err(bad("binary payloads are given as data_base64".into()));
            }
            (raw.get().as_bytes().to_vec(), ContentType::Json)
        }
        (None, Some(raw)) => {
            let text: String =
                parse_as("data_base64", raw, "a base64 string").map_err(|e| bad(e.message))?;
            let bytes = base64_decode(&text).map_err(|r| bad(format!("data_base64: {r}")))?;
            (bytes, content_type.unwrap_or(ContentType::Binary))
        }
        (None, None) => return Err(bad("missing field \"data\" (or \"data_base64\")".into())),
    };
    let mut event = NewEvent::json_text(event_type, payload);
    event.content_type = content_type;
    if let Some(s) = string_field(fields, "event_id").map_err(|e| bad(e.message))? {
        event.event_id =
            Some(Uuid::parse_str(&s).map_err(|e| bad(format!("event_id {s:?}: {e}")))?);
    }
    if let Some(raw) = fields.get("ts") {
        event.timestamp_us = Some(match serde_json::from_str::<serde_json::Value>(raw.get()) {
            Ok(serde_json::Value::String(s)) => {
                parse_rfc3339_us(&s).map_err(|r| bad(format!("ts {s:?}: {r}")))?
            }
            Ok(serde_json::Value::Number(n)) => n.as_i64().ok_or_else(|| {
                bad("ts must be RFC 3339 or whole microseconds since the epoch".into())
            })?,
            _ => return Err(bad("ts must be an RFC 3339 string".into())),
        });
    }
    if let Some(raw) = fields.get("metadata") {
        let map: BTreeMap<String, serde_json::Value> =
            parse_as("metadata", raw, "an object of strings").map_err(|e| bad(e.message))?;
        for (k, v) in map {
            let serde_json::Value::String(v) = v else {
                return Err(bad(format!("metadata value of {k:?} must be a string")));
            };
            match k.as_str() {
                "correlation_id" => event.metadata.correlation_id = Some(v),
                "causation_id" => event.metadata.causation_id = Some(v),
                _ => {
                    event.metadata.extra.insert(k, v);
                }
            }
        }
    }
    Ok(event)
}

fn parse_append(fields: &Fields<'_>) -> Result<AppendOp, WireError> {
    let aggregate = string_field(fields, "aggregate")?
        .ok_or_else(|| WireError::bad("missing field \"aggregate\""))?;
    let expected = match fields.get("expected_version") {
        None => ExpectedVersion::Any,
        Some(raw) => parse_expected(raw)?,
    };
    let events = match fields.get("events") {
        Some(raw) => {
            check_fields(
                fields,
                &["id", "op", "aggregate", "expected_version", "events"],
                "for op append with events (each event's fields go inside its item)",
            )?;
            let items: Vec<&RawValue> = parse_as("events", raw, "an array of event objects")?;
            if items.is_empty() {
                return Err(WireError::bad("events must hold at least one event"));
            }
            let mut events = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                let at = format!("events[{i}]: ");
                let item_fields: Fields<'_> = serde_json::from_str(item.get())
                    .map_err(|_| WireError::bad(format!("{at}must be an object")))?;
                check_fields(&item_fields, &EVENT_FIELDS, &format!("in events[{i}]"))?;
                events.push(parse_event(&item_fields, &at)?);
            }
            events
        }
        None => {
            let mut allowed = vec!["id", "op", "aggregate", "expected_version"];
            allowed.extend(EVENT_FIELDS);
            check_fields(fields, &allowed, "for op append")?;
            vec![parse_event(fields, "")?]
        }
    };
    Ok(AppendOp {
        aggregate,
        expected,
        events,
    })
}

fn parse_read(fields: &Fields<'_>) -> Result<ReadOp, WireError> {
    check_fields(
        fields,
        &["id", "op", "aggregate", "type", "all", "from", "limit"],
        "for op read",
    )?;
    let aggregate = string_field(fields, "aggregate")?;
    let event_type = string_field(fields, "type")?;
    let all = match fields.get("all") {
        None => false,
        Some(raw) => parse_as::<bool>("all", raw, "true or false")?,
    };
    let source = match (aggregate, event_type, all) {
        (Some(a), None, false) => ReadSource::Aggregate(a),
        (None, Some(t), false) => ReadSource::Type(t),
        (None, None, true) => ReadSource::All,
        _ => {
            return Err(WireError::bad(
                "give exactly one of aggregate, type or \"all\": true",
            ))
        }
    };
    Ok(ReadOp {
        source,
        from: u64_field(fields, "from")?,
        limit: u64_field(fields, "limit")?,
    })
}

fn parse_subscribe(fields: &Fields<'_>) -> Result<SubscribeOp, WireError> {
    check_fields(
        fields,
        &["id", "op", "from", "types", "aggregate_prefix"],
        "for op subscribe",
    )?;
    let types = match fields.get("types") {
        None => None,
        Some(raw) => Some(parse_as::<Vec<String>>(
            "types",
            raw,
            "an array of strings",
        )?),
    };
    Ok(SubscribeOp {
        from: u64_field(fields, "from")?,
        types,
        aggregate_prefix: string_field(fields, "aggregate_prefix")?,
    })
}

/// A JSON string literal.
pub(crate) fn quote(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

fn id_json(id: Option<u64>) -> String {
    id.map_or_else(|| "null".into(), |i| i.to_string())
}

/// `{"id":N,"ok":false,"error":{...}}`.
pub(crate) fn error_answer(id: Option<u64>, e: &WireError) -> String {
    let mut out = format!(
        "{{\"id\":{},\"ok\":false,\"error\":{{\"code\":\"{}\",\"message\":{}",
        id_json(id),
        e.code.as_str(),
        quote(&e.message)
    );
    if let Some((expected, actual)) = e.conflict {
        let _ = write!(
            out,
            ",\"expected\":{},\"actual\":{actual}",
            expected_json(expected)
        );
    }
    out.push_str("}}");
    out
}

/// `{"id":N,"ok":true}` followed by `extra` fields (each starting with a comma).
pub(crate) fn ok_answer(id: u64, extra: &str) -> String {
    format!("{{\"id\":{id},\"ok\":true{extra}}}")
}

/// The start of a subscription's event message, up to the event object.
pub(crate) fn sub_event_prefix(sub: u64) -> String {
    format!("{{\"sub\":{sub},\"event\":")
}

/// `{"sub":N,"end":{"code":...,"message":...}}`: the subscription is over.
pub(crate) fn sub_end(sub: u64, code: &str, message: &str) -> String {
    format!(
        "{{\"sub\":{sub},\"end\":{{\"code\":{},\"message\":{}}}}}",
        quote(code),
        quote(message)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Parsed {
        parse_request(text)
    }

    fn err(text: &str) -> (Option<u64>, ErrorCode, String) {
        let (id, e) = parse(text).unwrap_err();
        (id, e.code, e.message)
    }

    #[test]
    fn a_single_event_append_keeps_the_exact_data_text() {
        let (id, op) = parse(
            r#"{"id":7,"op":"append","aggregate":"a-1","type":"T","data":{"b":1, "a":2},
                "expected_version":0,"event_id":"6f1c3a52-9a7c-4d2b-8c51-0c7d8b1e2f3a",
                "metadata":{"correlation_id":"c-1","k":"v"}}"#,
        )
        .unwrap();
        assert_eq!(id, 7);
        let Op::Append(a) = op else { panic!() };
        assert_eq!(a.aggregate, "a-1");
        assert_eq!(a.expected, ExpectedVersion::Exact(0));
        assert_eq!(a.events.len(), 1);
        assert_eq!(a.events[0].payload, br#"{"b":1, "a":2}"#);
        assert_eq!(a.events[0].metadata.correlation_id.as_deref(), Some("c-1"));
        assert_eq!(a.events[0].metadata.extra["k"], "v");
        assert!(a.events[0].event_id.is_some());
    }

    #[test]
    fn several_events_go_in_events() {
        let (_, op) = parse(
            r#"{"id":1,"op":"append","aggregate":"a","expected_version":"none",
                "events":[{"type":"A","data":1},{"type":"B","data_base64":"AAE="}]}"#,
        )
        .unwrap();
        let Op::Append(a) = op else { panic!() };
        assert_eq!(a.expected, ExpectedVersion::NoStream);
        assert_eq!(a.events[1].payload, vec![0, 1]);
        assert_eq!(a.events[1].content_type, ContentType::Binary);
    }

    #[test]
    fn bad_requests_keep_their_id_and_name_the_problem() {
        assert_eq!(err("{nope").1, ErrorCode::InvalidJson);
        assert_eq!(err("[1,2]").1, ErrorCode::InvalidJson);
        assert_eq!(err(r#"{"op":"read"}"#).0, None);
        assert_eq!(err(r#"{"id":-1,"op":"read"}"#).0, None);
        let (id, code, _) = err(r#"{"id":3,"op":"fly"}"#);
        assert_eq!((id, code), (Some(3), ErrorCode::UnknownOp));
        let (id, code, m) = err(
            r#"{"id":4,"op":"append","aggregate":"a","type":"T","data":1,"expected_versoin":2}"#,
        );
        assert_eq!((id, code), (Some(4), ErrorCode::BadRequest));
        assert!(m.contains("expected_versoin"), "{m}");
        let (_, _, m) = err(r#"{"id":5,"op":"read","aggregate":"a","all":true}"#);
        assert!(m.contains("exactly one"), "{m}");
        let (_, _, m) = err(r#"{"id":6,"op":"append","aggregate":"a","events":[{"type":"T"}]}"#);
        assert!(m.contains("events[0]") && m.contains("data"), "{m}");
    }

    #[test]
    fn reads_and_subscriptions_parse() {
        let (_, op) = parse(r#"{"id":1,"op":"read","type":"T","from":5,"limit":2}"#).unwrap();
        assert_eq!(
            op,
            Op::Read(ReadOp {
                source: ReadSource::Type("T".into()),
                from: Some(5),
                limit: Some(2)
            })
        );
        let (_, op) =
            parse(r#"{"id":2,"op":"subscribe","from":0,"types":["A"],"aggregate_prefix":"x"}"#)
                .unwrap();
        assert_eq!(
            op,
            Op::Subscribe(SubscribeOp {
                from: Some(0),
                types: Some(vec!["A".into()]),
                aggregate_prefix: Some("x".into())
            })
        );
        let (_, op) = parse(r#"{"id":3,"op":"unsubscribe","sub":1}"#).unwrap();
        assert_eq!(op, Op::Unsubscribe { sub: 1 });
    }

    #[test]
    fn answers_are_json() {
        let mut e = WireError::new(ErrorCode::WrongExpectedVersion, "say \"hi\"");
        e.conflict = Some((ExpectedVersion::Exact(2), 5));
        let v: serde_json::Value = serde_json::from_str(&error_answer(Some(9), &e)).unwrap();
        assert_eq!(v["id"], 9);
        assert_eq!(v["ok"], false);
        assert_eq!(v["error"]["code"], "wrong_expected_version");
        assert_eq!(v["error"]["expected"], 2);
        assert_eq!(v["error"]["actual"], 5);
        let v: serde_json::Value = serde_json::from_str(&ok_answer(1, ",\"seq\":3")).unwrap();
        assert_eq!(v["seq"], 3);
        let v: serde_json::Value = serde_json::from_str(&sub_end(2, "x", "y")).unwrap();
        assert_eq!(v["end"]["code"], "x");
    }
}
