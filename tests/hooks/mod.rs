//! Plugin hooks: reject, enrich, transform; panics contained; metrics.

use crate::common::store_options;
use eventlog::hooks::{PendingAppend, Plugin, Rejection};
use eventlog::store::{
    AppendError, AppendRequest, Direction, EventRef, ExpectedVersion, NewEvent, Store,
};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

struct Enricher;
impl Plugin for Enricher {
    fn name(&self) -> &str {
        "enricher"
    }
    fn before_append(&self, batch: &mut [PendingAppend]) -> Result<(), Rejection> {
        for a in batch.iter_mut() {
            let agg = a.aggregate_id().to_string();
            for e in &mut a.events {
                e.metadata
                    .correlation_id
                    .get_or_insert_with(|| format!("corr-{agg}"));
                e.metadata
                    .extra
                    .insert("enriched-by".into(), "enricher".into());
            }
        }
        Ok(())
    }
}

struct Upper;
impl Plugin for Upper {
    fn name(&self) -> &str {
        "upper"
    }
    fn before_append(&self, batch: &mut [PendingAppend]) -> Result<(), Rejection> {
        for e in batch.iter_mut().flat_map(|a| a.events.iter_mut()) {
            // Runs after the enricher: sees its metadata.
            if e.metadata.extra.contains_key("enriched-by") {
                e.payload = e.payload.to_ascii_uppercase();
            }
        }
        Ok(())
    }
}

struct Guard;
impl Plugin for Guard {
    fn name(&self) -> &str {
        "guard"
    }
    fn before_append(&self, batch: &mut [PendingAppend]) -> Result<(), Rejection> {
        for a in batch.iter() {
            if a.aggregate_id().starts_with("forbidden") {
                return Err(Rejection(format!("{} is not allowed", a.aggregate_id())));
            }
            if a.events.iter().any(|e| e.event_type == "Boom") {
                panic!("guard cannot handle Boom");
            }
        }
        Ok(())
    }
}

#[derive(Default)]
struct Watcher {
    seen: Mutex<Vec<(u64, String, Option<String>)>>,
    calls: AtomicU64,
}
impl Plugin for Watcher {
    fn name(&self) -> &str {
        "watcher"
    }
    fn after_commit(&self, events: &[EventRef<'_>]) {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        for e in events {
            self.seen.lock().unwrap().push((
                e.seq,
                e.event_type.to_string(),
                e.correlation_id.map(str::to_string),
            ));
        }
        if n == 1 {
            panic!("watcher panics on its second call");
        }
    }
}

#[test]
fn plugins_enrich_transform_reject_and_observe_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let watcher = Arc::new(Watcher::default());
    let plugins: Vec<Arc<dyn Plugin>> = vec![
        Arc::new(Guard),
        Arc::new(Enricher),
        Arc::new(Upper),
        watcher.clone(),
    ];
    let store = Store::open_with_plugins(dir.path(), store_options(), plugins).unwrap();

    store
        .append(
            "order-1",
            ExpectedVersion::Any,
            &[NewEvent::json_text("Placed", r#""abc""#)],
        )
        .unwrap();
    let e = store
        .read_aggregate("order-1", 1, Direction::Forward, 1)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .to_recorded()
        .unwrap();
    assert_eq!(
        e.payload,
        br#""ABC""#.to_vec(),
        "transformed after enrichment, in registration order"
    );
    assert_eq!(e.metadata.correlation_id.as_deref(), Some("corr-order-1"));
    assert_eq!(
        e.metadata.extra.get("enriched-by").map(String::as_str),
        Some("enricher")
    );

    match store.append(
        "forbidden-1",
        ExpectedVersion::Any,
        &[NewEvent::json_text("Placed", "1")],
    ) {
        Err(AppendError::Rejected { plugin, reason }) => {
            assert_eq!(plugin, "guard");
            assert_eq!(reason, "forbidden-1 is not allowed");
        }
        other => panic!("{other:?}"),
    }
    match store.append(
        "order-2",
        ExpectedVersion::Any,
        &[NewEvent::json_text("Boom", "1")],
    ) {
        Err(AppendError::PluginFailed { plugin, message }) => {
            assert_eq!(plugin, "guard");
            assert!(message.contains("cannot handle Boom"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        store.next_seq(),
        1,
        "rejected and failed appends stored nothing"
    );

    // The watcher panics on its second after_commit: the append still succeeded, and
    // later appends work (no poisoned lock).
    store
        .append(
            "order-2",
            ExpectedVersion::Any,
            &[NewEvent::json_text("Paid", "2")],
        )
        .unwrap();
    store
        .append(
            "order-3",
            ExpectedVersion::Any,
            &[
                NewEvent::json_text("Paid", "3"),
                NewEvent::json_text("Shipped", "4"),
            ],
        )
        .unwrap();
    assert_eq!(store.next_seq(), 4);
    let seen = watcher.seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        vec![
            (0, "Placed".into(), Some("corr-order-1".into())),
            (1, "Paid".into(), Some("corr-order-2".into())),
            (2, "Paid".into(), Some("corr-order-3".into())),
            (3, "Shipped".into(), Some("corr-order-3".into())),
        ]
    );

    let metrics = store.metrics_text();
    assert!(
        metrics.contains("eventlog_plugin_rejections_total{plugin=\"guard\"} 1\n"),
        "{metrics}"
    );
    assert!(metrics.contains("eventlog_plugin_failures_total{plugin=\"guard\"} 1\n"));
    assert!(metrics.contains("eventlog_plugin_after_commit_panics_total{plugin=\"watcher\"} 1\n"));
    assert!(
        metrics.contains("eventlog_plugin_before_append_us_count{plugin=\"enricher\"} 3\n"),
        "enricher ran for the 3 appends the guard let through"
    );
    assert!(metrics.contains("eventlog_events_appended_total 4\n"));
    assert!(metrics.contains("eventlog_append_errors_total 2\n"));
}

#[test]
fn metrics_text_is_well_formed_prometheus() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), store_options()).unwrap();
    for i in 0..20 {
        store
            .append(
                &format!("a-{i}"),
                ExpectedVersion::Any,
                &[NewEvent::binary("T", vec![0; 10])],
            )
            .unwrap();
    }
    let text = store.metrics_text();
    let mut families = std::collections::HashSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split(' ');
            let name = parts.next().unwrap();
            assert!(
                families.insert(name.to_string()),
                "family {name} declared twice"
            );
            assert!(
                matches!(parts.next(), Some("counter" | "gauge" | "histogram")),
                "{line}"
            );
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("no value: {line}"));
        assert!(value.parse::<f64>().is_ok(), "{line}");
        let name = series.split('{').next().unwrap();
        assert!(
            name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'),
            "{line}"
        );
        let family = families.iter().any(|f| {
            name == f
                || name
                    .strip_prefix(f.as_str())
                    .is_some_and(|s| ["_bucket", "_sum", "_count"].contains(&s))
        });
        assert!(family, "series {name} has no TYPE line");
    }
    assert!(
        text.contains("eventlog_fsync_latency_us_count 20\n")
            || text.contains("eventlog_fsync_latency_us_count"),
        "{text}"
    );
    assert!(text.contains("eventlog_appends_total 20\n"));
    assert!(text.contains("eventlog_group_commit_records_count 20\n"));
}

/// Reorders or overwrites the requests it is given (which the `&mut` slice allows).
struct Retargeter;
impl Plugin for Retargeter {
    fn name(&self) -> &str {
        "retargeter"
    }
    fn before_append(&self, batch: &mut [PendingAppend]) -> Result<(), Rejection> {
        if batch.len() == 2 {
            batch[0] = batch[1].clone();
        } else {
            batch.reverse();
        }
        Ok(())
    }
}

/// A plugin may change events, not which aggregate a request appends to or what version
/// it expects: a plugin that overwrote one request with another would have let a debit
/// expecting version 5 of acct-A land as a second credit of acct-B, reported as success.
#[test]
fn a_plugin_that_changes_which_aggregate_a_request_appends_to_fails_the_append() {
    let dir = tempfile::tempdir().unwrap();
    let plain = Store::open(dir.path(), store_options()).unwrap();
    plain
        .append(
            "acct-A",
            ExpectedVersion::NoStream,
            &[NewEvent::json_text("Opened", "{}")],
        )
        .unwrap();
    drop(plain);
    let plugins: Vec<Arc<dyn Plugin>> = vec![Arc::new(Retargeter)];
    let store = Store::open_with_plugins(dir.path(), store_options(), plugins).unwrap();
    let debit = [NewEvent::json_text("Debit", "{}")];
    let credit = [NewEvent::json_text("Credit", "{}")];
    let outcome = store.append_batch(&[
        AppendRequest {
            aggregate_id: "acct-A",
            expected: ExpectedVersion::Exact(5),
            events: &debit,
        },
        AppendRequest {
            aggregate_id: "acct-B",
            expected: ExpectedVersion::Any,
            events: &credit,
        },
    ]);
    match outcome {
        Err(AppendError::PluginFailed { plugin, message }) => {
            assert_eq!(plugin, "retargeter");
            assert!(
                message.contains("acct-A") && message.contains("only the events"),
                "{message}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(store.next_seq(), 1, "nothing stored");
    assert_eq!(store.aggregate_version("acct-B").unwrap(), 0);
    // A batch of three, reversed: the same.
    let three: Vec<AppendRequest<'_>> = ["x", "y", "z"]
        .iter()
        .map(|id| AppendRequest {
            aggregate_id: id,
            expected: ExpectedVersion::Any,
            events: &credit,
        })
        .collect();
    assert!(matches!(
        store.append_batch(&three),
        Err(AppendError::PluginFailed { .. })
    ));
    assert_eq!(store.next_seq(), 1);
}
