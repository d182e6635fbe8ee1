use crate::common::{history, open_store};
use eventlog::store::{
    AppendError, AppendRequest, Direction, ExpectedVersion, Filter, NewEvent, Store,
};
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

fn ev(t: &str, data: &str) -> NewEvent {
    NewEvent::json_text(t, data.as_bytes().to_vec())
}

#[test]
fn append_and_read_by_aggregate_type_and_all() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let a = store
        .append(
            "order-1",
            ExpectedVersion::NoStream,
            &[ev("Placed", "1"), ev("Paid", "2")],
        )
        .unwrap();
    assert_eq!((a.first_seq, a.last_seq, a.last_version), (0, 1, 2));
    let b = store
        .append("order-2", ExpectedVersion::Any, &[ev("Placed", "3")])
        .unwrap();
    assert_eq!((b.first_seq, b.last_version), (2, 1));
    let c = store
        .append("order-1", ExpectedVersion::Exact(2), &[ev("Shipped", "4")])
        .unwrap();
    assert_eq!((c.first_seq, c.last_version), (3, 3));

    let h = history(&store, "order-1");
    assert_eq!(
        h.iter()
            .map(|x| (x.0, x.1, x.2.as_str()))
            .collect::<Vec<_>>(),
        vec![(1, 0, "Placed"), (2, 1, "Paid"), (3, 3, "Shipped")]
    );
    let back: Vec<u64> = store
        .read_aggregate("order-1", u64::MAX, Direction::Backward, 2)
        .unwrap()
        .map(|e| e.unwrap().event().unwrap().version)
        .collect();
    assert_eq!(back, vec![3, 2]);
    let from2: Vec<u64> = store
        .read_aggregate("order-1", 2, Direction::Forward, 10)
        .unwrap()
        .map(|e| e.unwrap().seq())
        .collect();
    assert_eq!(from2, vec![1, 3]);
    let placed: Vec<u64> = store
        .read_type("Placed", 0, 10)
        .unwrap()
        .map(|e| e.unwrap().seq())
        .collect();
    assert_eq!(placed, vec![0, 2]);
    let placed_late: Vec<u64> = store
        .read_type("Placed", 1, 10)
        .unwrap()
        .map(|e| e.unwrap().seq())
        .collect();
    assert_eq!(placed_late, vec![2]);
    let all: Vec<u64> = store.read_all(1, 2).map(|e| e.unwrap().seq()).collect();
    assert_eq!(all, vec![1, 2]);
    assert!(history(&store, "nobody").is_empty());
    let stats = store.stats().unwrap();
    assert_eq!(
        (
            stats.head_seq,
            stats.event_count,
            stats.aggregate_count,
            stats.type_count
        ),
        (Some(3), 4, 2, 3)
    );

    // Same answers once everything moved from memory to sled, and after reopening.
    store.flush_index().unwrap();
    assert_eq!(history(&store, "order-1"), h);
    drop(store);
    let store = open_store(dir.path());
    assert_eq!(history(&store, "order-1"), h);
    let stats = store.stats().unwrap();
    assert_eq!(
        (
            stats.aggregate_count,
            stats.type_count,
            stats.index_lag_events
        ),
        (2, 3, 0)
    );
}

#[test]
fn every_expected_version_kind_is_enforced_and_a_mismatch_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let wrong = |r: Result<_, AppendError>, actual_want: u64| match r {
        Err(AppendError::WrongExpectedVersion { actual, .. }) => assert_eq!(actual, actual_want),
        other => panic!("expected a version conflict, got {other:?}"),
    };
    wrong(
        store.append("a", ExpectedVersion::Exists, &[ev("T", "1")]),
        0,
    );
    wrong(
        store.append("a", ExpectedVersion::Exact(1), &[ev("T", "1")]),
        0,
    );
    store
        .append("a", ExpectedVersion::Exact(0), &[ev("T", "1")])
        .unwrap();
    wrong(
        store.append("a", ExpectedVersion::NoStream, &[ev("T", "2")]),
        1,
    );
    wrong(
        store.append("a", ExpectedVersion::Exact(0), &[ev("T", "2")]),
        1,
    );
    store
        .append("a", ExpectedVersion::Exists, &[ev("T", "2")])
        .unwrap();
    store
        .append("a", ExpectedVersion::Any, &[ev("T", "3")])
        .unwrap();
    assert_eq!(store.next_seq(), 3);
    assert_eq!(store.aggregate_version("a").unwrap(), 3);
    let msg = store
        .append("a", ExpectedVersion::Exact(7), &[ev("T", "x")])
        .unwrap_err()
        .to_string();
    assert_eq!(msg, "aggregate a: expected version 7, actual version 3");
}

#[test]
fn invalid_input_gets_typed_errors_and_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    assert!(matches!(
        store.append("", ExpectedVersion::Any, &[ev("T", "1")]),
        Err(AppendError::InvalidName {
            what: "aggregate id",
            ..
        })
    ));
    assert!(matches!(
        store.append(&"x".repeat(256), ExpectedVersion::Any, &[ev("T", "1")]),
        Err(AppendError::InvalidName { .. })
    ));
    assert!(matches!(
        store.append("a\u{7}", ExpectedVersion::Any, &[ev("T", "1")]),
        Err(AppendError::InvalidName { .. })
    ));
    assert!(matches!(
        store.append("a", ExpectedVersion::Any, &[ev("", "1")]),
        Err(AppendError::InvalidName {
            what: "event type",
            ..
        })
    ));
    assert!(matches!(
        store.append("a", ExpectedVersion::Any, &[]),
        Err(AppendError::BadEventCount { count: 0, .. })
    ));
    let fat = ev("T", "1").with_meta("k", "v".repeat(40_000));
    assert!(matches!(
        store.append("a", ExpectedVersion::Any, &[fat]),
        Err(AppendError::MetadataTooLarge { index: 0, .. })
    ));
    let big = NewEvent::binary("T", vec![0u8; (1 << 20) + 1]);
    match store.append("a", ExpectedVersion::Any, &[ev("T", "ok"), big]) {
        Err(AppendError::PayloadTooLarge {
            index,
            size_bytes,
            limit_bytes,
        }) => assert_eq!(
            (index, size_bytes, limit_bytes),
            (1, (1 << 20) + 1, 1 << 20)
        ),
        other => panic!("{other:?}"),
    }
    let many: Vec<NewEvent> = (0..10_001).map(|_| ev("T", "1")).collect();
    assert!(matches!(
        store.append("a", ExpectedVersion::Any, &many),
        Err(AppendError::BadEventCount {
            count: 10_001,
            max: 10_000
        })
    ));
    assert_eq!(store.next_seq(), 0);
    let exactly_max: Vec<NewEvent> = (0..10_000).map(|_| ev("T", "1")).collect();
    assert_eq!(
        store
            .append("a", ExpectedVersion::Any, &exactly_max)
            .unwrap()
            .last_version,
        10_000
    );
}

/// A store in a fresh directory whose aggregate `acct` has one event, `Opened` with `{}`
/// (its append's result third).
fn store_with_opened_account() -> (tempfile::TempDir, Store, eventlog::store::Appended) {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let opened = store
        .append("acct", ExpectedVersion::NoStream, &[ev("Opened", "{}")])
        .unwrap();
    (dir, store, opened)
}

#[test]
fn retrying_an_append_with_the_same_ids_returns_the_original_result() {
    let (dir, store, _) = store_with_opened_account();
    let ids = [Uuid::from_u128(1), Uuid::from_u128(2)];
    let events: Vec<NewEvent> = ids
        .iter()
        .map(|&id| ev("Deposited", "{}").with_id(id))
        .collect();
    let first = store
        .append("acct", ExpectedVersion::Exact(1), &events)
        .unwrap();
    store
        .append("acct", ExpectedVersion::Any, &[ev("Withdrawn", "{}")])
        .unwrap();
    let retry = store
        .append("acct", ExpectedVersion::Exact(1), &events)
        .unwrap();
    assert_eq!(retry, first);
    assert_eq!(store.next_seq(), 4, "the retry stored nothing");
    // Reusing one of the ids for a different event is an error.
    match store.append(
        "acct",
        ExpectedVersion::Any,
        &[ev("Deposited", "{\"other\":1}").with_id(ids[1])],
    ) {
        Err(AppendError::DuplicateEventId {
            event_id, version, ..
        }) => assert_eq!((event_id, version), (ids[1], 3)),
        other => panic!("{other:?}"),
    }
    // The same id twice in one append is an error too.
    let twice = [
        ev("X", "{}").with_id(Uuid::from_u128(9)),
        ev("X", "{}").with_id(Uuid::from_u128(9)),
    ];
    assert!(matches!(
        store.append("acct", ExpectedVersion::Any, &twice),
        Err(AppendError::DuplicateEventId { .. })
    ));
    // Ids stay idempotent after a reopen (they live in the log).
    drop(store);
    let store = open_store(dir.path());
    assert_eq!(
        store
            .append("acct", ExpectedVersion::Exact(1), &events)
            .unwrap(),
        first
    );
    let recorded = history(&store, "acct");
    assert_eq!(recorded.len(), 4);
}

/// Appends `appends` (their numbers), each two events to `acct` with ids `2k + 1` and
/// `2k + 2` (versions `2k + 1` and `2k + 2`).
fn append_with_ids(
    store: &Store,
    appends: std::ops::Range<u64>,
) -> Vec<(Vec<NewEvent>, eventlog::store::Appended)> {
    appends
        .map(|k| {
            let events: Vec<NewEvent> = (0..2)
                .map(|j| {
                    ev("Deposited", &format!("{{\"n\":{}}}", 2 * k + j))
                        .with_id(Uuid::from_u128(u128::from(2 * k + j + 1)))
                })
                .collect();
            let appended = store
                .append("acct", ExpectedVersion::Exact(2 * k), &events)
                .unwrap();
            (events, appended)
        })
        .collect()
}

#[test]
fn retries_are_recognized_through_the_event_id_index_wherever_the_ids_are() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    // The first half reaches sled, the second half stays in the memtable.
    let mut appends = append_with_ids(&store, 0..150);
    store.flush_index().unwrap();
    appends.extend(append_with_ids(&store, 150..300));
    let stored = store.next_seq();
    assert_eq!(stored, 600);
    let check = |store: &Store, when: &str| {
        for k in [0usize, 1, 149, 150, 298, 299] {
            let (events, original) = &appends[k];
            let expected = ExpectedVersion::Exact(2 * k as u64);
            assert_eq!(
                store.append("acct", expected, events).unwrap(),
                *original,
                "{when}: retry of append {k}"
            );
            assert_eq!(
                store.append("acct", ExpectedVersion::Any, events).unwrap(),
                *original,
                "{when}: retry of append {k} with Any"
            );
        }
        // An id reused for another event, in sled or in the memtable: an error.
        for (k, version) in [(10u64, 22u64), (290, 582)] {
            let reused =
                ev("Deposited", "{\"other\":1}").with_id(Uuid::from_u128(u128::from(2 * k + 2)));
            match store.append("acct", ExpectedVersion::Any, &[reused]) {
                Err(AppendError::DuplicateEventId { version: v, .. }) => {
                    assert_eq!(v, version, "{when}: the version holding the id")
                }
                other => panic!("{when}: reusing an id of append {k}: {other:?}"),
            }
        }
        // Half a retry (the first event again with a new one): an error, not a retry.
        let (events, _) = &appends[5];
        let half = [
            events[0].clone(),
            ev("Deposited", "{}").with_id(Uuid::from_u128(99_999)),
        ];
        assert!(
            matches!(
                store.append("acct", ExpectedVersion::Exact(10), &half),
                Err(AppendError::DuplicateEventId { .. })
            ),
            "{when}: half a retry"
        );
        // The same ids for the same aggregate at another position are no retry.
        assert!(
            matches!(
                store.append("acct", ExpectedVersion::Exact(0), &appends[7].0),
                Err(AppendError::DuplicateEventId { .. })
            ),
            "{when}: a retry at another position"
        );
        // Another aggregate may use the same ids (stored the first time, a retry after).
        let other = store.append("other", ExpectedVersion::Any, &appends[0].0);
        assert_eq!(other.unwrap().last_version, 2, "{when}");
    };
    check(&store, "open");
    assert_eq!(store.next_seq(), stored + 2, "retries stored nothing");

    // After a reopen (the memtable part caught up from the log), a crash before the index
    // got the second half, and a deleted index rebuilt from the log.
    drop(store);
    let store = open_store(dir.path());
    check(&store, "reopened");
    store.crash();
    let store = open_store(dir.path());
    check(&store, "after a crash");
    drop(store);
    std::fs::remove_dir_all(dir.path().join("index")).unwrap();
    let store = open_store(dir.path());
    check(&store, "rebuilt");
    assert_eq!(store.next_seq(), stored + 2);
    let recorded = history(&store, "acct");
    assert_eq!(recorded.len(), 600, "no retry stored anything");
}

#[test]
fn copies_of_generated_ids_are_found_where_they_are_wherever_they_were_copied() {
    let (dir, store, opened) = store_with_opened_account();
    store
        .append("acct", ExpectedVersion::Any, &[ev("Noted", "{}")])
        .unwrap();
    let id_at = |seq: u64| store.read_seq(seq).unwrap().event().unwrap().event_id;
    let (first, second) = (id_at(0), id_at(1));
    assert_eq!(first.get_version_num(), 8, "generated ids are version 8");
    assert!(
        store.index_dump().unwrap()["event_ids"].is_empty(),
        "generated ids take no index entry"
    );
    // Reusing a generated id for another event is an error; sending the same event again
    // with it is a retry.
    match store.append(
        "acct",
        ExpectedVersion::Any,
        &[ev("Other", "{}").with_id(first)],
    ) {
        Err(AppendError::DuplicateEventId { version, .. }) => assert_eq!(version, 1),
        other => panic!("{other:?}"),
    }
    let opened_again = [ev("Opened", "{}").with_id(first)];
    assert_eq!(
        store
            .append("acct", ExpectedVersion::NoStream, &opened_again)
            .unwrap(),
        opened
    );
    // Copied to another aggregate (as an import does): at the version the id names, and
    // at another one. Both are found again, the second through the index.
    let copy_same = store
        .append("copy-1", ExpectedVersion::NoStream, &opened_again)
        .unwrap();
    assert_eq!(copy_same.last_version, 1);
    let noted_again = [ev("Noted", "{}").with_id(second)];
    let copy_other = store
        .append("copy-2", ExpectedVersion::NoStream, &noted_again)
        .unwrap();
    assert_eq!(copy_other.last_version, 1, "the id names version 2");
    assert_eq!(store.index_dump().unwrap()["event_ids"].len(), 1);
    for _ in 0..2 {
        assert_eq!(
            store
                .append("copy-1", ExpectedVersion::NoStream, &opened_again)
                .unwrap(),
            copy_same
        );
        assert_eq!(
            store
                .append("copy-2", ExpectedVersion::NoStream, &noted_again)
                .unwrap(),
            copy_other
        );
        for (aggregate, id) in [("copy-1", first), ("copy-2", second)] {
            assert!(matches!(
                store.append(aggregate, ExpectedVersion::Any, &[ev("X", "1").with_id(id)]),
                Err(AppendError::DuplicateEventId { version: 1, .. })
            ));
        }
        assert_eq!(store.next_seq(), 4, "nothing stored");
        // Again with the index in sled.
        store.flush_index().unwrap();
    }
    drop(store);
    std::fs::remove_dir_all(dir.path().join("index")).unwrap();
    let store = open_store(dir.path());
    assert_eq!(
        store
            .append("copy-2", ExpectedVersion::NoStream, &noted_again)
            .unwrap(),
        copy_other
    );
    assert!(store.verify(|_, _| {}).unwrap().is_clean());
}

#[test]
fn an_id_twice_for_one_aggregate_in_one_batch_is_an_error() {
    let (_dir, store, _) = store_with_opened_account();
    let id = Uuid::from_u128(7);
    let one = [ev("Deposited", "1").with_id(id)];
    let two = [ev("Deposited", "2").with_id(id)];
    let requests = [
        AppendRequest {
            aggregate_id: "acct",
            expected: ExpectedVersion::Any,
            events: &one,
        },
        AppendRequest {
            aggregate_id: "acct",
            expected: ExpectedVersion::Any,
            events: &two,
        },
    ];
    assert!(matches!(
        store.append_batch(&requests),
        Err(AppendError::DuplicateEventId { version: 3, .. })
    ));
    assert_eq!(store.next_seq(), 1, "nothing stored");
    // In two aggregates it is fine.
    let requests = [
        requests[0],
        AppendRequest {
            aggregate_id: "other",
            ..requests[1]
        },
    ];
    store.append_batch(&requests).unwrap();
    assert_eq!(store.next_seq(), 3);
}

#[test]
fn multi_aggregate_batch_is_all_or_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    store
        .append("b", ExpectedVersion::NoStream, &[ev("T", "1")])
        .unwrap();
    let e1 = [ev("T", "a1")];
    let e2 = [ev("T", "b2")];
    let bad = store.append_batch(&[
        AppendRequest {
            aggregate_id: "a",
            expected: ExpectedVersion::NoStream,
            events: &e1,
        },
        AppendRequest {
            aggregate_id: "b",
            expected: ExpectedVersion::NoStream,
            events: &e2,
        },
    ]);
    assert!(matches!(bad, Err(AppendError::WrongExpectedVersion { .. })));
    assert_eq!(store.next_seq(), 1);
    let ok = store
        .append_batch(&[
            AppendRequest {
                aggregate_id: "a",
                expected: ExpectedVersion::NoStream,
                events: &e1,
            },
            AppendRequest {
                aggregate_id: "b",
                expected: ExpectedVersion::Exact(1),
                events: &e2,
            },
            AppendRequest {
                aggregate_id: "a",
                expected: ExpectedVersion::Exact(1),
                events: &e2,
            },
        ])
        .unwrap();
    assert_eq!(
        ok.iter()
            .map(|a| (a.first_seq, a.last_version))
            .collect::<Vec<_>>(),
        vec![(1, 1), (2, 2), (3, 2)]
    );
}

#[test]
fn concurrent_appends_to_one_aggregate_never_lose_or_duplicate_a_version() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let store = store.clone();
            std::thread::spawn(move || {
                let mut done = 0;
                while done < 50 {
                    let v = store.aggregate_version("counter").unwrap();
                    match store.append(
                        "counter",
                        ExpectedVersion::Exact(v),
                        &[ev("Inc", &format!("{t}"))],
                    ) {
                        Ok(a) => {
                            assert_eq!(a.last_version, v + 1);
                            done += 1;
                        }
                        Err(AppendError::WrongExpectedVersion { .. }) => {}
                        Err(e) => panic!("{e}"),
                    }
                    // Appends to other aggregates run alongside.
                    store
                        .append(
                            &format!("other-{t}"),
                            ExpectedVersion::Any,
                            &[ev("X", "{}")],
                        )
                        .unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let h = history(&store, "counter");
    assert_eq!(h.len(), 400);
    for (i, e) in h.iter().enumerate() {
        assert_eq!(e.0, i as u64 + 1, "versions contiguous");
    }
    assert!(
        h.windows(2).all(|w| w[0].1 < w[1].1),
        "seqs increase with versions"
    );
}

/// Reader threads, each running its check over and over (with the round number) until
/// [`Readers::finish`], and at least `rounds_min` times.
struct Readers {
    stop: Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<u64>>,
    rounds_min: u64,
}

/// Starts `count` readers; `make(r)` gives reader `r` its check.
fn spawn_readers<F>(store: &Store, count: u64, rounds_min: u64, make: impl Fn(u64) -> F) -> Readers
where
    F: FnMut(&Store, u64) + Send + 'static,
{
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let threads = (0..count)
        .map(|r| {
            let store = store.clone();
            let stop = stop.clone();
            let mut check = make(r);
            std::thread::spawn(move || {
                let mut rounds = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) || rounds < rounds_min {
                    check(&store, rounds);
                    rounds += 1;
                }
                rounds
            })
        })
        .collect();
    Readers {
        stop,
        threads,
        rounds_min,
    }
}

impl Readers {
    /// Stops the readers; panics if one failed a check or ran too few rounds.
    fn finish(self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self.threads {
            assert!(t.join().unwrap() >= self.rounds_min);
        }
    }
}

/// `agg`'s history as reader `reader` sees it, checked to run from version 1 without a gap,
/// each event's payload being `agg:version`.
fn contiguous_history(store: &Store, agg: &str, reader: u64) -> Vec<(u64, u64, String, Vec<u8>)> {
    let h = history(store, agg);
    for (i, e) in h.iter().enumerate() {
        assert_eq!(e.0, i as u64 + 1, "reader {reader} saw a gap in {agg}");
        assert_eq!(e.3, format!("{agg}:{}", e.0).into_bytes());
    }
    h
}

#[test]
fn readers_on_threads_see_consistent_histories_while_writers_append() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let readers = spawn_readers(&store, 3, 10, |r| {
        move |store: &Store, round: u64| {
            contiguous_history(store, &format!("agg-{}", round % 10), r);
            let mut last = None;
            for e in store.read_all(0, usize::MAX) {
                let s = e.unwrap().seq();
                assert!(last.is_none_or(|l| s == l + 1));
                last = Some(s);
            }
        }
    });
    let writers: Vec<_> = (0..2)
        .map(|w| {
            let store = store.clone();
            std::thread::spawn(move || {
                for i in 0..300u64 {
                    let agg = format!("agg-{}", (i * 2 + w) % 10);
                    let v = store.aggregate_version(&agg).unwrap();
                    let r = store.append(
                        &agg,
                        ExpectedVersion::Exact(v),
                        &[NewEvent::binary("T", format!("{agg}:{}", v + 1))],
                    );
                    assert!(matches!(
                        r,
                        Ok(_) | Err(AppendError::WrongExpectedVersion { .. })
                    ));
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    readers.finish();
}

#[test]
fn follower_yields_stored_then_live_events_filtered_and_times_out() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    store
        .append(
            "order-1",
            ExpectedVersion::Any,
            &[ev("Placed", "1"), ev("Noise", "x")],
        )
        .unwrap();
    let mut f = store.follow(
        0,
        Filter::types(["Placed", "Shipped"]).with_aggregate_prefix("order-"),
    );
    assert_eq!(
        f.next_timeout(Duration::from_millis(10))
            .unwrap()
            .unwrap()
            .seq(),
        0
    );
    assert!(
        f.next_timeout(Duration::from_millis(20)).unwrap().is_none(),
        "times out when caught up"
    );
    let writer = {
        let store = store.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            store
                .append("user-1", ExpectedVersion::Any, &[ev("Placed", "no")])
                .unwrap();
            store
                .append("order-2", ExpectedVersion::Any, &[ev("Shipped", "yes")])
                .unwrap();
        })
    };
    let got = f.next_timeout(Duration::from_secs(10)).unwrap().unwrap();
    assert_eq!(got.event().unwrap().aggregate_id, "order-2");
    assert_eq!(got.seq(), 3);
    writer.join().unwrap();
    assert!(store.wait_for(3, Duration::from_millis(1)));
    assert!(!store.wait_for(4, Duration::from_millis(10)));
}

/// A filtered follower that skips a long run of stored events the filter refuses looks
/// at its deadline and its interrupt flag on the way (every 1,024 skipped), instead of
/// scanning to the head first: an unsubscribed server subscription with a filter that
/// matches nothing used to read the whole log before it noticed its stop flag. The
/// position, not a clock, shows where it stopped.
#[test]
fn a_filtered_follower_skipping_stored_events_honours_its_deadline_and_interrupt_flag() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    const STORED: u64 = 5_000;
    let batch: Vec<_> = (0..1_000).map(|_| ev("Noise", "0")).collect();
    for b in 0..STORED / 1_000 {
        store
            .append(&format!("a-{b}"), ExpectedVersion::Any, &batch)
            .unwrap();
    }
    store
        .append("a-last", ExpectedVersion::Any, &[ev("Wanted", "1")])
        .unwrap();

    // A zero timeout: it returns after the first 1,024 refused events, not at the head.
    let mut f = store.follow(0, Filter::types(["Wanted"]));
    assert!(f.next_timeout(Duration::ZERO).unwrap().is_none());
    let first_stop = f.position();
    assert!(
        (1..STORED).contains(&first_stop),
        "scanned to {first_stop} of {STORED} refused events before looking at the clock"
    );
    // Called again, it goes on from there and finds the match.
    let found = loop {
        if let Some(e) = f.next_timeout(Duration::ZERO).unwrap() {
            break e;
        }
        assert!(f.position() > first_stop);
    };
    assert_eq!(found.seq(), STORED);

    // A raised interrupt flag ends a scan with a long timeout the same way, with no
    // `wake_waiters` needed.
    let stop = std::sync::atomic::AtomicBool::new(true);
    let mut f = store.follow(0, Filter::types(["Wanted"]));
    assert!(f
        .next_or_interrupt(Duration::from_secs(600), Some(&stop))
        .unwrap()
        .is_none());
    assert!(
        f.position() < STORED,
        "interrupted only at {} of {STORED}",
        f.position()
    );
    // Without the flag it runs to the match.
    let mut f = store.follow(0, Filter::types(["Wanted"]));
    let got = f
        .next_or_interrupt(Duration::from_secs(600), None)
        .unwrap()
        .map(|e| e.seq());
    assert_eq!(got, Some(STORED));
}

fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|d| d.count())
        .unwrap_or(0)
}

#[test]
fn ten_thousand_followers_created_and_dropped_leave_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    store
        .append("a", ExpectedVersion::Any, &[ev("T", "1")])
        .unwrap();
    let handles_before = store.handle_count();
    let threads_before = thread_count();
    let mut alive = Vec::new();
    for i in 0..10_000u64 {
        let mut f = store.follow(i % 2, Filter::all());
        let got = f.next_timeout(Duration::from_micros(50)).unwrap();
        assert_eq!(
            got.map(|e| e.seq()),
            if i % 2 == 0 { Some(0) } else { None }
        );
        alive.push(f);
    }
    assert_eq!(store.handle_count(), handles_before + 10_000);
    // Other tests run in this process too, so allow their threads, but not one per follower.
    assert!(
        thread_count() < threads_before + 100,
        "threads grew from {threads_before} to {}",
        thread_count()
    );
    drop(alive);
    assert_eq!(
        store.handle_count(),
        handles_before,
        "dropped followers hold nothing"
    );
    // A waiting follower that is dropped leaves no waiter behind: the next commit still
    // wakes a new one promptly.
    let mut f = store.follow(1, Filter::all());
    assert!(f.next_timeout(Duration::from_millis(1)).unwrap().is_none());
    drop(f);
    let store2 = store.clone();
    let t = std::thread::spawn(move || {
        store2
            .follow(1, Filter::all())
            .next_timeout(Duration::from_secs(10))
            .unwrap()
            .map(|e| e.seq())
    });
    std::thread::sleep(Duration::from_millis(20));
    store
        .append("a", ExpectedVersion::Any, &[ev("T", "2")])
        .unwrap();
    assert_eq!(t.join().unwrap(), Some(1));
}

#[test]
fn typed_events_round_trip_with_both_codecs() {
    use eventlog::store::{BincodeCodec, DomainEvent, JsonCodec};
    #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq, Clone)]
    enum Account {
        Opened { owner: String },
        Deposited { cents: u64 },
    }
    impl DomainEvent for Account {
        fn event_type(&self) -> &str {
            match self {
                Account::Opened { .. } => "Opened",
                Account::Deposited { .. } => "Deposited",
            }
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let events = vec![
        Account::Opened {
            owner: "ann".into(),
        },
        Account::Deposited { cents: 250 },
    ];
    store
        .append_typed::<JsonCodec, _>("acct-json", ExpectedVersion::NoStream, &events)
        .unwrap();
    store
        .append_typed::<BincodeCodec, _>("acct-bin", ExpectedVersion::NoStream, &events)
        .unwrap();
    let json: Vec<Account> = store
        .read_typed::<JsonCodec, Account>("acct-json")
        .unwrap()
        .into_iter()
        .map(|e| e.data)
        .collect();
    let bin: Vec<Account> = store
        .read_typed::<BincodeCodec, Account>("acct-bin")
        .unwrap()
        .into_iter()
        .map(|e| e.data)
        .collect();
    assert_eq!(json, events);
    assert_eq!(bin, events);
    let raw = store
        .read_aggregate("acct-json", 2, Direction::Forward, 1)
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    assert_eq!(
        raw.event().unwrap().payload,
        br#"{"Deposited":{"cents":250}}"#
    );
    assert!(
        store.read_typed::<JsonCodec, Account>("acct-bin").is_err(),
        "wrong codec is an error, not garbage"
    );
    let _: Option<Store> = None;
}

#[test]
fn long_aggregates_read_from_any_version_in_both_directions() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let mut version = 0u64;
    let mut batch = 1usize;
    while version < 300 {
        let n = batch.min(300 - version as usize);
        let events: Vec<NewEvent> = (0..n)
            .map(|i| ev("T", &format!("{}", version + 1 + i as u64)))
            .collect();
        store
            .append("long", ExpectedVersion::Exact(version), &events)
            .unwrap();
        store
            .append("noise", ExpectedVersion::Any, &[ev("N", "x")])
            .unwrap();
        version += n as u64;
        batch = batch % 7 + 1;
    }
    let check = |store: &Store, when: &str| {
        for from in [
            1u64, 2, 63, 64, 65, 66, 128, 129, 130, 200, 299, 300, 301, 1000,
        ] {
            let fwd: Vec<u64> = store
                .read_aggregate("long", from, Direction::Forward, usize::MAX)
                .unwrap()
                .map(|e| e.unwrap().event().unwrap().version)
                .collect();
            let want: Vec<u64> = (from.max(1)..=300).collect();
            assert_eq!(fwd, want, "{when}: forward from {from}");
            let back: Vec<u64> = store
                .read_aggregate("long", from, Direction::Backward, usize::MAX)
                .unwrap()
                .map(|e| e.unwrap().event().unwrap().version)
                .collect();
            let want: Vec<u64> = (1..=from.min(300)).rev().collect();
            assert_eq!(back, want, "{when}: backward from {from}");
            let limited: Vec<u64> = store
                .read_aggregate("long", from, Direction::Forward, 70)
                .unwrap()
                .map(|e| e.unwrap().event().unwrap().version)
                .collect();
            assert_eq!(
                limited.len(),
                70.min(301usize.saturating_sub(from as usize)),
                "{when}: limit from {from}"
            );
        }
        for e in store
            .read_aggregate("long", 1, Direction::Forward, usize::MAX)
            .unwrap()
        {
            let e = e.unwrap().to_recorded().unwrap();
            assert_eq!(e.payload, e.version.to_string().into_bytes());
        }
    };
    check(&store, "in memory");
    store.flush_index().unwrap();
    check(&store, "in sled");
    drop(store);
    let store = open_store(dir.path());
    check(&store, "reopened");
}

/// Appends one event to each of `ids` under `expected`, 5,000 requests per batch.
fn append_one_each(store: &Store, ids: &[String], expected: ExpectedVersion) {
    let event = [ev("Opened", "{}")];
    for chunk in ids.chunks(5_000) {
        let requests: Vec<AppendRequest<'_>> = chunk
            .iter()
            .map(|id| AppendRequest {
                aggregate_id: id,
                expected,
                events: &event,
            })
            .collect();
        store
            .append_batch(&requests)
            .unwrap_or_else(|e| panic!("appending under {expected:?}: {e}"));
    }
}

/// A new aggregate's version lookup misses memory; its sled bucket is read once and
/// remembered whole, so new aggregates cost at most one sled read per bucket, not one
/// each. The versions stay right through flushes and through prunings of the remembered
/// entries (a small latest-version cache), and after a reopen.
#[test]
fn new_aggregates_cost_a_sled_read_per_bucket_not_per_aggregate() {
    use eventlog::index::keys::AGG_BUCKETS;
    let dir = tempfile::tempdir().unwrap();
    let mut options = crate::common::store_options();
    let store = Store::open(dir.path(), options.clone()).unwrap();
    let first: Vec<String> = (0..20_000).map(|i| format!("account-{i}")).collect();
    append_one_each(&store, &first, ExpectedVersion::NoStream);
    let reads = store.index_counters().sled_reads;
    assert!(
        reads <= u64::from(AGG_BUCKETS),
        "20,000 new aggregates read sled {reads} times, more than once per bucket ({AGG_BUCKETS})"
    );
    store.flush_index().unwrap();
    drop(store);
    // Their second events, with the cache far smaller than the aggregates: entries are
    // dropped and buckets read again, and every expected version must still hold.
    options.index.latest_cache_aggregates = 2_000;
    let store = Store::open(dir.path(), options.clone()).unwrap();
    append_one_each(&store, &first, ExpectedVersion::Exact(1));
    let second: Vec<String> = (0..20_000).map(|i| format!("ledger-{i}")).collect();
    append_one_each(&store, &second, ExpectedVersion::NoStream);
    store.flush_index().unwrap();
    append_one_each(&store, &second, ExpectedVersion::Exact(1));
    append_one_each(&store, &first, ExpectedVersion::Exact(2));
    drop(store);
    let store = Store::open(dir.path(), options).unwrap();
    for (ids, version) in [(&first, 3), (&second, 2)] {
        for id in ids.iter().step_by(97) {
            assert_eq!(store.aggregate_version(id).unwrap(), version, "{id}");
            assert_eq!(history(&store, id).len() as u64, version, "{id}");
        }
    }
    append_one_each(&store, &second, ExpectedVersion::Exact(2));
}

/// Large groups (1,000 events, enough for the log to update the index on its helper
/// thread while it syncs) with readers and index flushes running throughout: a reader
/// never sees an event the log has not acknowledged (every seq the index hands out reads
/// back, histories stay contiguous, versions never go backwards), and every append is
/// readable as soon as it returned.
#[test]
fn readers_never_see_a_large_group_before_it_is_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    const AGGREGATES: u64 = 200;
    let readers = spawn_readers(&store, 3, 20, |r| {
        let mut seen_versions = vec![0u64; AGGREGATES as usize];
        move |store: &Store, round: u64| {
            let a = (round * 7 + r) % AGGREGATES;
            let agg = format!("acct-{a}");
            let version = store.aggregate_version(&agg).unwrap();
            assert!(
                version >= seen_versions[a as usize],
                "reader {r}: {agg} went back from {} to {version}",
                seen_versions[a as usize]
            );
            seen_versions[a as usize] = version;
            let h = contiguous_history(store, &agg, r);
            assert!(
                h.len() as u64 >= version,
                "{agg}: history shorter than its version"
            );
            let mut last = None;
            for e in store.read_type("Deposited", 0, usize::MAX).unwrap() {
                let s = e.expect("every seq the type index gives reads back").seq();
                assert!(last.is_none_or(|l| s > l), "type seqs increase");
                last = Some(s);
            }
        }
    });
    let mut next_version = vec![0u64; AGGREGATES as usize];
    for batch in 0..30u64 {
        let events: Vec<(String, [NewEvent; 1])> = (0..1_000u64)
            .map(|i| {
                let a = (batch * 1_000 + i) % AGGREGATES;
                next_version[a as usize] += 1;
                let agg = format!("acct-{a}");
                let data = format!("{agg}:{}", next_version[a as usize]);
                (agg, [NewEvent::binary("Deposited", data)])
            })
            .collect();
        let requests: Vec<AppendRequest<'_>> = events
            .iter()
            .map(|(agg, event)| AppendRequest {
                aggregate_id: agg,
                expected: ExpectedVersion::Any,
                events: event,
            })
            .collect();
        let appended = store.append_batch(&requests).unwrap();
        let last = appended.last().unwrap();
        let (agg, _) = events.last().unwrap();
        assert_eq!(
            store.aggregate_version(agg).unwrap(),
            last.last_version,
            "read-your-writes: the version of the append that just returned"
        );
        let newest_deposit = store
            .read_type("Deposited", last.last_seq, 1)
            .unwrap()
            .next()
            .expect("the append that just returned is readable by type")
            .unwrap();
        assert_eq!(newest_deposit.seq(), last.last_seq);
    }
    readers.finish();
    for (a, &version) in next_version.iter().enumerate() {
        assert_eq!(
            store.aggregate_version(&format!("acct-{a}")).unwrap(),
            version
        );
    }
}
