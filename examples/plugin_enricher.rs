//! A plugin that stamps every event with a correlation id (and the time it was accepted)
//! when the caller gave none, and an after-commit hook that logs what was committed.
//!
//! `cargo run --release --example plugin_enricher`

use eventlog::hooks::{PendingAppend, Plugin, Rejection};
use eventlog::store::{Direction, EventRef, ExpectedVersion, NewEvent, Options, Store};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Gives each append without a correlation id a fresh one, shared by all its events, so
/// that everything one request caused can be found together.
struct CorrelationStamp {
    next: AtomicU64,
    prefix: String,
}

impl Plugin for CorrelationStamp {
    fn name(&self) -> &str {
        "correlation-stamp"
    }

    fn before_append(&self, batch: &mut [PendingAppend]) -> Result<(), Rejection> {
        let id = format!(
            "{}-{}",
            self.prefix,
            self.next.fetch_add(1, Ordering::Relaxed)
        );
        for event in batch.iter_mut().flat_map(|a| a.events.iter_mut()) {
            if event.metadata.correlation_id.is_none() {
                event.metadata.correlation_id = Some(id.clone());
                event
                    .metadata
                    .extra
                    .insert("stamped-by".into(), "correlation-stamp".into());
            }
        }
        Ok(())
    }

    fn after_commit(&self, events: &[EventRef<'_>]) {
        for e in events {
            println!(
                "  committed seq {} {} v{} {} (correlation {})",
                e.seq,
                e.aggregate_id,
                e.version,
                e.event_type,
                e.correlation_id.unwrap_or("-")
            );
        }
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let stamp = CorrelationStamp {
        next: AtomicU64::new(1),
        prefix: format!("req-{}", std::process::id()),
    };
    let store = Store::open_with_plugins(dir.path(), Options::default(), vec![Arc::new(stamp)])?;

    println!("an append without a correlation id:");
    store.append(
        "cart-7",
        ExpectedVersion::NoStream,
        &[
            NewEvent::json_text("ItemAdded", r#"{"sku":"A1"}"#),
            NewEvent::json_text("ItemAdded", r#"{"sku":"B2"}"#),
        ],
    )?;
    println!("an append that brings its own:");
    store.append(
        "cart-7",
        ExpectedVersion::Exact(2),
        &[NewEvent::json_text("CheckedOut", "{}").with_correlation_id("checkout-42")],
    )?;

    for e in store.read_aggregate("cart-7", 1, Direction::Forward, usize::MAX)? {
        let e = e?.to_recorded()?;
        let stamped = e.metadata.extra.contains_key("stamped-by");
        println!(
            "v{} {} correlation={:?} stamped={stamped}",
            e.version, e.event_type, e.metadata.correlation_id
        );
        assert!(e.metadata.correlation_id.is_some());
    }
    Ok(())
}
