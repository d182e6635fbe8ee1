//! Index catch-up after a crash between the log write and the index update; rebuilds.

use crate::common::{history, open_store};
use eventlog::store::{ExpectedVersion, NewEvent, Store};

fn fill(store: &Store, from: u64, n: u64) {
    for i in from..from + n {
        let agg = format!("agg-{}", i % 37);
        store
            .append(
                &agg,
                ExpectedVersion::Any,
                &[NewEvent::binary(
                    format!("type-{}", i % 5),
                    i.to_le_bytes().to_vec(),
                )],
            )
            .unwrap();
    }
}

#[test]
fn index_catches_up_after_a_crash_between_log_write_and_index_update() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    fill(&store, 0, 3000);
    let before: Vec<_> = (0..37)
        .map(|a| history(&store, &format!("agg-{a}")))
        .collect();
    let lag = store.stats().unwrap().index_lag_events;
    store.crash();
    let store = open_store(dir.path());
    let report = store.open_report().index.clone();
    assert!(report.caught_up_events >= lag, "{report:?} lag {lag}");
    let after: Vec<_> = (0..37)
        .map(|a| history(&store, &format!("agg-{a}")))
        .collect();
    assert_eq!(before, after);
    fill(&store, 3000, 10);
    assert_eq!(
        store.aggregate_version("agg-0").unwrap(),
        3010_u64.div_ceil(37)
    );
}

#[test]
fn deleted_index_is_rebuilt_identical_to_the_incremental_one() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    fill(&store, 0, 5000);
    // Long aggregates span several postings chunks; one type has many buckets.
    for _ in 0..200 {
        store
            .append(
                "long",
                ExpectedVersion::Any,
                &[NewEvent::binary("type-0", vec![1])],
            )
            .unwrap();
    }
    let incremental = store.index_dump().unwrap();
    let hist_long = history(&store, "long");
    drop(store);
    std::fs::remove_dir_all(dir.path().join("index")).unwrap();
    let store = open_store(dir.path());
    assert!(store.open_report().index.rebuilt);
    assert_eq!(store.open_report().index.caught_up_events, 5200);
    let rebuilt = store.index_dump().unwrap();
    assert_eq!(rebuilt, incremental);
    assert_eq!(history(&store, "long"), hist_long);
}

#[test]
fn damaged_index_directory_is_rebuilt_from_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    fill(&store, 0, 500);
    let h = history(&store, "agg-3");
    drop(store);
    // Replace sled's files with garbage.
    for entry in std::fs::read_dir(dir.path().join("index")).unwrap() {
        let p = entry.unwrap().path();
        if p.is_file() {
            std::fs::write(&p, b"garbage garbage garbage").unwrap();
        }
    }
    let store = open_store(dir.path());
    assert!(
        store.open_report().index.rebuilt,
        "{:?}",
        store.open_report()
    );
    assert_eq!(history(&store, "agg-3"), h);
}
