//! A plugin that validates one event type against a small JSON schema before it is
//! stored: `OrderPlaced` must be a JSON object with a string `order_id` and a non-negative
//! integer `total_cents`, and nothing else. Other types pass untouched.
//!
//! `cargo run --release --example plugin_validator`

use eventlog::hooks::{PendingAppend, Plugin, Rejection};
use eventlog::store::{AppendError, ExpectedVersion, NewEvent, Options, Store};
use serde_json::Value;
use std::sync::Arc;

/// The required fields of a type and the JSON kind each must have.
struct Schema {
    event_type: &'static str,
    fields: &'static [(&'static str, Kind)],
    allow_other_fields: bool,
}

#[derive(Clone, Copy)]
enum Kind {
    String,
    NonNegativeInteger,
}

struct Validator {
    schemas: Vec<Schema>,
}

impl Validator {
    fn check(&self, schema: &Schema, payload: &[u8]) -> Result<(), String> {
        let value: Value =
            serde_json::from_slice(payload).map_err(|e| format!("payload is not JSON: {e}"))?;
        let object = value.as_object().ok_or("payload must be a JSON object")?;
        for (name, kind) in schema.fields {
            let v = object
                .get(*name)
                .ok_or_else(|| format!("missing field {name:?}"))?;
            let ok = match kind {
                Kind::String => v.is_string(),
                Kind::NonNegativeInteger => v.as_u64().is_some(),
            };
            if !ok {
                return Err(format!("field {name:?} has the wrong kind: {v}"));
            }
        }
        if !schema.allow_other_fields {
            if let Some(extra) = object
                .keys()
                .find(|k| !schema.fields.iter().any(|(n, _)| n == k))
            {
                return Err(format!("unexpected field {extra:?}"));
            }
        }
        Ok(())
    }
}

impl Plugin for Validator {
    fn name(&self) -> &str {
        "schema-validator"
    }

    fn before_append(&self, batch: &mut [PendingAppend]) -> Result<(), Rejection> {
        for append in batch.iter() {
            for (i, event) in append.events.iter().enumerate() {
                if let Some(schema) = self
                    .schemas
                    .iter()
                    .find(|s| s.event_type == event.event_type)
                {
                    self.check(schema, &event.payload).map_err(|why| {
                        Rejection(format!(
                            "{} event {i} ({}) is invalid: {why}",
                            append.aggregate_id(),
                            event.event_type
                        ))
                    })?;
                }
            }
        }
        Ok(())
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let validator = Validator {
        schemas: vec![Schema {
            event_type: "OrderPlaced",
            fields: &[
                ("order_id", Kind::String),
                ("total_cents", Kind::NonNegativeInteger),
            ],
            allow_other_fields: false,
        }],
    };
    let store =
        Store::open_with_plugins(dir.path(), Options::default(), vec![Arc::new(validator)])?;

    let good = NewEvent::json_text("OrderPlaced", r#"{"order_id":"o-1","total_cents":1250}"#);
    let a = store.append("order-1", ExpectedVersion::NoStream, &[good])?;
    println!("stored a valid OrderPlaced at seq {}", a.first_seq);

    for bad in [
        r#"{"order_id":"o-2"}"#,
        r#"{"order_id":"o-2","total_cents":-5}"#,
        r#"{"order_id":"o-2","total_cents":5,"coupon":"X"}"#,
        r#"not json"#,
    ] {
        match store.append(
            "order-2",
            ExpectedVersion::NoStream,
            &[NewEvent::json_text("OrderPlaced", bad)],
        ) {
            Err(AppendError::Rejected { plugin, reason }) => {
                println!("rejected by {plugin}: {reason}")
            }
            other => return Err(format!("expected a rejection for {bad}, got {other:?}").into()),
        }
    }
    // Other types are not checked.
    store.append(
        "order-1",
        ExpectedVersion::Exact(1),
        &[NewEvent::json_text("Note", r#""free text""#)],
    )?;
    println!(
        "{} events stored; every invalid OrderPlaced was refused and stored nothing",
        store.next_seq()
    );
    assert_eq!(store.next_seq(), 2);
    Ok(())
}
