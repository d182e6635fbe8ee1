//! Index catch-up after a crash between the log write and the index update; rebuilds.

use crate::common::{history, open_store};
use eventlog::store::{ExpectedVersion, NewEvent, Store};

/// Appends events `from .. from + n`, one per append, to 37 aggregates; every third
/// carries an id of its own (the index keeps those), the others get generated ones.
fn fill(store: &Store, from: u64, n: u64) {
    for i in from..from + n {
        let agg = format!("agg-{}", i % 37);
        let e = NewEvent::binary(format!("type-{}", i % 5), i.to_le_bytes().to_vec());
        let e = if i % 3 == 0 {
            e.with_id(uuid::Uuid::from_u128(u128::from(i) + 1))
        } else {
            e
        };
        store.append(&agg, ExpectedVersion::Any, &[e]).unwrap();
    }
}

#[test]
fn index_catches_up_after_a_crash_between_log_write_and_index_update() {
    let dir = tempfile::tempdir().unwrap();
    // Half the events reach sled, then the indexer stays idle, so exactly the other half
    // is lost with the memtable at the crash (no background flush races the count).
    let mut options = crate::common::store_options();
    options.index.flush_events = usize::MAX;
    options.index.flush_interval_ms = 3_600_000;
    let store = Store::open(dir.path(), options.clone()).unwrap();
    fill(&store, 0, 1500);
    store.flush_index().unwrap();
    fill(&store, 1500, 1500);
    let before: Vec<_> = (0..37)
        .map(|a| history(&store, &format!("agg-{a}")))
        .collect();
    let lag = store.stats().unwrap().index_lag_events;
    assert_eq!(lag, 1500);
    store.crash();
    let store = Store::open(dir.path(), options).unwrap();
    let report = store.open_report().index.clone();
    assert_eq!(report.caught_up_events, lag, "{report:?}");
    // Reopening after a crash costs reading the log tail into memory, no sled write:
    // that is what keeps it fast (benches/compare: reopen after a crash).
    let counters = store.index_counters();
    assert_eq!((counters.flushed_batches, counters.sled_writes), (0, 0));
    assert_eq!(counters.lag_events, lag);
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
    assert_eq!(
        incremental["event_ids"].len(),
        5000_usize.div_ceil(3),
        "the ids given by appenders are indexed, generated ones not"
    );
    assert_eq!(rebuilt, incremental);
    assert_eq!(history(&store, "long"), hist_long);
}

#[test]
fn a_rebuild_longer_than_the_memtable_bound_goes_through_the_indexer_and_is_identical() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    fill(&store, 0, 5000);
    let incremental = store.index_dump().unwrap();
    drop(store);
    std::fs::remove_dir_all(dir.path().join("index")).unwrap();
    let mut options = crate::common::store_options();
    // 5,000 events through a memtable of at most 1,000: the catch-up must wait for the
    // indexer to write at least four batches to sled before it can finish.
    options.index.lag_events_max = 1000;
    options.index.flush_events = 300;
    options.index.flush_interval_ms = 3_600_000;
    let store = Store::open(dir.path(), options).unwrap();
    let report = store.open_report().index.clone();
    assert!(report.rebuilt, "{report:?}");
    assert_eq!(report.caught_up_events, 5000, "{report:?}");
    let counters = store.index_counters();
    assert!(counters.lag_events < 1000, "{counters:?}");
    assert!(counters.flushed_batches >= 4, "{counters:?}");
    assert_eq!(store.index_dump().unwrap(), incremental);
}

/// Child mode of the next test: appends one batch, waits until the indexer has written
/// it to sled, appends 10 more events, says so, and waits to be killed.
const ENV_FLUSHED_CHILD: &str = "EVENTLOG_TEST_FLUSHED_BATCH_CHILD";

fn flushed_batch_options() -> eventlog::store::Options {
    let mut options = crate::common::store_options();
    options.index.flush_events = 1000;
    // Only a full memtable is written: the indexer's timer stays out of the way.
    options.index.flush_interval_ms = 3_600_000;
    options
}

fn flushed_batch_child(dir: &str) {
    let store = Store::open(std::path::Path::new(dir), flushed_batch_options()).unwrap();
    let events: Vec<NewEvent> = (0..1000u32)
        .map(|i| NewEvent::binary("type-0", i.to_le_bytes().to_vec()))
        .collect();
    store
        .append("agg-batch", ExpectedVersion::NoStream, &events)
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while store.index_counters().flushed_batches == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the indexer wrote nothing"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    fill(&store, 0, 10);
    println!("ready");
    std::thread::sleep(std::time::Duration::from_secs(60));
    std::process::exit(3);
}

#[test]
fn a_batch_the_indexer_wrote_survives_a_kill_right_after() {
    if let Ok(dir) = std::env::var(ENV_FLUSHED_CHILD) {
        flushed_batch_child(&dir);
        return;
    }
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "store::crash::a_batch_the_indexer_wrote_survives_a_kill_right_after",
            "--exact",
            "--nocapture",
        ])
        .env(ENV_FLUSHED_CHILD, dir.path())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let ready = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .any(|l| l == "ready");
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert!(ready, "the child ended before it was ready: {status:?}");
    // sled keeps writes in memory until a flush; the indexer makes each batch durable
    // as it writes it, so only the 10 later events are caught up from the log.
    let store = Store::open(dir.path(), flushed_batch_options()).unwrap();
    let report = store.open_report().index.clone();
    assert!(!report.rebuilt, "{report:?}");
    assert_eq!(report.caught_up_events, 10, "{report:?}");
    assert_eq!(store.aggregate_version("agg-batch").unwrap(), 1000);
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

/// Sets `key` of the index's `meta` tree (in `index_dir`) to `value`, as damage or a
/// crash could leave it. The store that used the index must be dropped: its sled
/// releases the lock when its threads end, just after, so the open is retried for up to
/// 3 s.
fn set_index_meta(index_dir: &std::path::Path, key: &str, value: &[u8]) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    let db = loop {
        match sled::open(index_dir) {
            Ok(db) => break db,
            Err(e) if std::time::Instant::now() < deadline => {
                assert!(e.to_string().contains("could not acquire lock"), "{e}");
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(e) => panic!("opening the index's sled: {e}"),
        }
    };
    db.open_tree("meta").unwrap().insert(key, value).unwrap();
    db.flush().unwrap();
}

/// Regression: an `indexed_next` mark that is not 8 bytes made the open fail with
/// `IndexError::Malformed` instead of rebuilding the index, as other damage and another
/// format do.
#[test]
fn a_malformed_indexed_next_mark_makes_the_open_rebuild_the_index() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    fill(&store, 0, 500);
    let h = history(&store, "agg-3");
    let incremental = store.index_dump().unwrap();
    drop(store);
    set_index_meta(&dir.path().join("index"), "indexed_next", &[1, 2, 3]);
    let store = open_store(dir.path());
    let report = store.open_report().index.clone();
    assert!(report.rebuilt, "{report:?}");
    assert!(
        report
            .rebuild_reason
            .as_deref()
            .is_some_and(|r| r.contains("indexed_next mark is malformed (3 bytes")),
        "{report:?}"
    );
    assert_eq!(report.caught_up_events, 500, "{report:?}");
    assert_eq!(history(&store, "agg-3"), h);
    assert_eq!(store.index_dump().unwrap(), incremental);
}

/// Store options on a [`SimDisk`] (sled in `sled_dir`) with the given durability; the
/// index writes to sled only when the test flushes it.
fn sim_options(
    sled_dir: &std::path::Path,
    durability: eventlog::log::Durability,
) -> eventlog::store::Options {
    let mut options = crate::common::store_options();
    options.sled_dir = Some(sled_dir.to_path_buf());
    options.log.segment_size_bytes = 1 << 20;
    options.payload_size_bytes_max = 4 << 10;
    options.log.durability = durability;
    options.index.flush_events = usize::MAX;
    options.index.flush_interval_ms = 3_600_000;
    options
}

fn t_events(n: usize) -> Vec<NewEvent> {
    (0..n).map(|_| NewEvent::binary("T", vec![1])).collect()
}

/// Asserts that the index and the log agree on aggregate `x` (all of whose events are of
/// type `T`, the only type): its version is the length of the history the log holds, and
/// type `T` lists every event of the log. Returns x's version.
fn assert_index_agrees_with_log(store: &Store, context: &str) -> u64 {
    use eventlog::store::Direction;
    let version = store.aggregate_version("x").unwrap();
    let versions: Vec<Result<u64, String>> = store
        .read_aggregate("x", 1, Direction::Forward, usize::MAX)
        .unwrap()
        .map(|e| {
            e.map(|e| e.to_recorded().unwrap().version)
                .map_err(|e| e.to_string())
        })
        .collect();
    assert_eq!(
        versions,
        (1..=version).map(Ok).collect::<Vec<_>>(),
        "{context}: the index says x has {version} events; the log's history of x differs"
    );
    let typed: Vec<Result<u64, String>> = store
        .read_type("T", 0, usize::MAX)
        .unwrap()
        .map(|e| e.map(|e| e.seq()).map_err(|e| e.to_string()))
        .collect();
    assert_eq!(
        typed,
        (0..store.next_seq()).map(Ok).collect::<Vec<_>>(),
        "{context}: type T"
    );
    version
}

/// Regression: under `Durability::None` and `Interval` the indexer wrote to sled (and
/// sled's timed flush made durable) events the log had only written to the OS. A power
/// loss could then leave sled with a batch's entries but not its `indexed_next` mark
/// (written last; sled recovers to a prefix of its writes), which the open cannot see:
/// the index claimed versions the log lost, reads failed, and the next append wrote a
/// back pointer to a seq that then held another event. The test makes that sled state by
/// putting the mark back by hand. A flush now makes the log durable up to its batch
/// first.
#[test]
fn a_power_loss_after_an_index_flush_under_interval_or_none_leaves_index_and_log_agreeing() {
    use eventlog::log::Durability;
    use eventlog::testing::{CrashFault, SimDisk};
    use std::path::Path;
    for durability in [
        Durability::None,
        Durability::Interval {
            sync_interval_ms: 3_600_000,
        },
    ] {
        let context = format!("{durability:?}");
        let sled_dir = tempfile::tempdir().unwrap();
        let options = sim_options(sled_dir.path(), durability);
        let disk = SimDisk::new(7);
        let dir = Path::new("/sim/s");
        let store = Store::open_with_storage(disk.clone(), dir, options.clone()).unwrap();
        disk.sync_all_dirs();
        store
            .append("x", ExpectedVersion::NoStream, &t_events(3))
            .unwrap(); // seqs 0..3
        store.log().sync().unwrap();
        store.flush_index().unwrap(); // indexed_next 3
        store
            .append("x", ExpectedVersion::Exact(3), &t_events(2))
            .unwrap(); // seqs 3..5, written to the OS only
        store.flush_index().unwrap(); // x = (5, seq 4) in sled, indexed_next 5
        let disk = disk.crash(CrashFault::DropUnsynced);
        store.crash();
        // What a sled prefix without the batch's last write (the mark) leaves.
        set_index_meta(
            &sled_dir.path().join("index"),
            "indexed_next",
            &3u64.to_be_bytes(),
        );
        let store = Store::open_with_storage(disk, dir, options).unwrap();
        let version = assert_index_agrees_with_log(&store, &context);
        assert_eq!(
            store.next_seq(),
            5,
            "{context}: the flush made the log durable up to its batch before writing it \
             to sled"
        );
        store
            .append("x", ExpectedVersion::Exact(version), &t_events(1))
            .unwrap();
        assert_eq!(assert_index_agrees_with_log(&store, &context), version + 1);
    }
}

/// When the flush's sync of the log fails, the batch is not written to sled: the flush
/// fails (the indexer would retry), the events are served from memory meanwhile, and
/// after a power loss the reopened index agrees with what the log kept.
#[test]
fn a_failed_log_sync_keeps_the_index_batch_out_of_sled() {
    use eventlog::index::IndexError;
    use eventlog::log::Durability;
    use eventlog::store::ReadError;
    use eventlog::testing::{CrashFault, SimDisk};
    use std::path::Path;
    let sled_dir = tempfile::tempdir().unwrap();
    let options = sim_options(sled_dir.path(), Durability::None);
    let disk = SimDisk::new(11);
    let dir = Path::new("/sim/s");
    let store = Store::open_with_storage(disk.clone(), dir, options.clone()).unwrap();
    disk.sync_all_dirs();
    store
        .append("x", ExpectedVersion::NoStream, &t_events(3))
        .unwrap(); // written to the OS only
    disk.fail_next_fsync();
    match store.flush_index() {
        Err(ReadError::Index(IndexError::LogSync { next_seq: 3, .. })) => {}
        other => panic!("a flush whose log sync failed: {other:?}"),
    }
    let counters = store.index_counters();
    assert_eq!(
        (
            counters.indexed_next,
            counters.lag_events,
            counters.flushed_batches
        ),
        (0, 3, 0),
        "nothing of the batch reached sled: {counters:?}"
    );
    assert_eq!(
        store.aggregate_version("x").unwrap(),
        3,
        "served from memory"
    );
    // The log is poisoned now: a retry fails the same way, and still writes nothing.
    assert!(store.flush_index().is_err());
    assert_eq!(store.index_counters().indexed_next, 0);
    let disk = disk.crash(CrashFault::DropUnsynced);
    store.crash();
    let store = Store::open_with_storage(disk, dir, options).unwrap();
    assert_index_agrees_with_log(&store, "after the power loss");
}

/// Under `Interval`, flushes sync the log (from the indexer's thread and from callers of
/// `flush_index`) while appenders lead group commits that feed the memtable and the log's
/// own thread syncs every millisecond: none of them waits for another for good, and every
/// append ends up in sled.
#[test]
fn index_flushes_sync_the_log_beside_appends_and_the_logs_own_syncs() {
    use eventlog::log::Durability;
    let dir = tempfile::tempdir().unwrap();
    let mut options = crate::common::store_options();
    options.log.durability = Durability::Interval {
        sync_interval_ms: 1,
    };
    options.index.flush_events = 50;
    options.index.flush_interval_ms = 1;
    let store = Store::open(dir.path(), options).unwrap();
    const THREADS: u64 = 4;
    const APPENDS: u64 = 300;
    let appenders: Vec<_> = (0..THREADS)
        .map(|t| {
            let store = store.clone();
            std::thread::spawn(move || {
                for i in 0..APPENDS {
                    let aggregate = format!("agg-{}", (t * APPENDS + i) % 13);
                    store
                        .append(
                            &aggregate,
                            ExpectedVersion::Any,
                            &t_events(1 + i as usize % 3),
                        )
                        .unwrap();
                    if i % 50 == 0 {
                        store.flush_index().unwrap();
                    }
                }
            })
        })
        .collect();
    for a in appenders {
        a.join().unwrap();
    }
    store.flush_index().unwrap();
    let counters = store.index_counters();
    assert_eq!(counters.indexed_next, store.next_seq(), "{counters:?}");
    assert_eq!(counters.lag_events, 0, "{counters:?}");
    let mut events = 0;
    for a in 0..13 {
        let h = history(&store, &format!("agg-{a}"));
        assert!(
            h.iter().enumerate().all(|(i, e)| e.0 == i as u64 + 1),
            "agg-{a}: versions not contiguous"
        );
        events += h.len() as u64;
    }
    assert_eq!(events, store.next_seq());
}

/// A repair cuts the log at the damage it finds. The index may hold entries past the cut
/// even with its `indexed_next` mark below it (a batch whose mark a crash lost keeps its
/// entries), which catching up from the mark would not replace: an open whose repair
/// quarantined records rebuilds the index.
#[test]
fn an_open_whose_repair_cut_the_log_rebuilds_the_index() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    for _ in 0..200 {
        store
            .append("x", ExpectedVersion::Any, &t_events(1))
            .unwrap();
    }
    store.flush_index().unwrap();
    drop(store);
    // The last batch's mark lost, its entries kept: x = (200, seq 199) in sled.
    set_index_meta(
        &dir.path().join("index"),
        "indexed_next",
        &100u64.to_be_bytes(),
    );
    // Damage the header of seq 120, with valid records after it: damage, not a torn tail.
    let segment = crate::common::segment_files(dir.path()).pop().unwrap();
    let mut bytes = std::fs::read(&segment).unwrap();
    let mut offset = 32;
    for _ in 0..120 {
        let len = u32::from_le_bytes(bytes[offset + 4..offset + 8].try_into().unwrap());
        offset += 20 + len as usize;
    }
    bytes[offset + 8] ^= 0x40; // the seq field
    std::fs::write(&segment, &bytes).unwrap();
    let mut options = crate::common::store_options();
    options.log.repair = true;
    let store = Store::open(dir.path(), options).unwrap();
    let report = store.open_report().clone();
    assert_eq!(
        report
            .log
            .quarantined
            .iter()
            .map(|q| q.first_lost_seq)
            .collect::<Vec<_>>(),
        [120],
        "{report:?}"
    );
    assert!(report.index.rebuilt, "{report:?}");
    assert!(
        report
            .index
            .rebuild_reason
            .as_deref()
            .is_some_and(|r| r.contains("repair cut it at seq 120")),
        "{report:?}"
    );
    assert_eq!(
        assert_index_agrees_with_log(&store, "after the repair"),
        120
    );
    // What sled holds, not only what the in-memory latest map answers while it keeps x.
    let dump = store.index_dump().unwrap();
    let in_sled: Vec<(String, u64, u64)> = dump["aggregates"]
        .iter()
        .flat_map(|(_, bucket)| {
            eventlog::index::keys::decode_latest_bucket(bucket)
                .unwrap()
                .into_iter()
                .map(|(name, version, seq)| (name.to_string(), version, seq))
        })
        .collect();
    assert_eq!(in_sled, [("x".to_string(), 120, 119)]);
}

#[test]
fn verify_is_clean_on_a_good_store_and_names_index_disagreement() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    fill(&store, 0, 2000);
    for _ in 0..150 {
        store
            .append(
                "long",
                ExpectedVersion::Any,
                &[NewEvent::binary("type-0", vec![1])],
            )
            .unwrap();
    }
    let mut calls = 0;
    let report = store.verify(|_, _| calls += 1).unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);
    assert_eq!(
        (report.events_checked, report.aggregates, report.types),
        (2150, 38, 5)
    );
    assert!(calls >= 2);
    drop(store);

    // Another store of the same length, different contents: its index does not fit.
    let other = tempfile::tempdir().unwrap();
    let s2 = open_store(other.path());
    for i in 0..2150u64 {
        s2.append(
            &format!("x-{}", i % 11),
            ExpectedVersion::Any,
            &[NewEvent::binary("other", vec![2])],
        )
        .unwrap();
    }
    drop(s2);
    std::fs::remove_dir_all(dir.path().join("index")).unwrap();
    crate::common::copy_dir(&other.path().join("index"), &dir.path().join("index"));
    let store = open_store(dir.path());
    let report = store.verify(|_, _| {}).unwrap();
    assert!(!report.is_clean());
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.contains("index: aggregate agg-0 latest")),
        "{:?}",
        &report.problems[..3]
    );
    assert!(report
        .problems
        .iter()
        .any(|p| p.contains("index: type type-0")));
    drop(store);

    // Rebuilding the index fixes it.
    let store = Store::open_rebuilding_index(dir.path(), crate::common::store_options()).unwrap();
    assert!(store.open_report().index.rebuilt);
    assert!(store.verify(|_, _| {}).unwrap().is_clean());
}

#[test]
fn verify_reports_a_corrupt_record_and_keeps_going() {
    let dir = tempfile::tempdir().unwrap();
    let mut options = crate::common::store_options();
    options.log.segment_size_bytes = 256 << 10;
    options.payload_size_bytes_max = 64 << 10;
    let store = Store::open(dir.path(), options.clone()).unwrap();
    fill(&store, 0, 3000);
    drop(store);
    let seg = crate::common::segment_files(dir.path())[0].clone();
    let bytes = std::fs::read(&seg).unwrap();
    let mut damaged = bytes.clone();
    damaged[1000] ^= 0x01;
    std::fs::write(&seg, &damaged).unwrap();
    let store = Store::open(dir.path(), options).unwrap();
    let report = store.verify(|_, _| {}).unwrap();
    assert_eq!(report.events_checked, 3000);
    assert!(
        report.problems.iter().any(|p| p.contains("checksum")),
        "{:?}",
        report.problems
    );
}

/// `flush_index` returns only once everything appended before the call is in sled, also
/// when the background indexer is in the middle of a flush of its own. It used to apply
/// the indexer's batch a second time and return with the newer events still in memory
/// (seen as a flaky `deleted_index_is_rebuilt_identical_to_the_incremental_one`).
#[test]
fn flush_index_covers_every_earlier_append_while_the_indexer_flushes() {
    let dir = tempfile::tempdir().unwrap();
    let mut options = crate::common::store_options();
    // The indexer flushes after every few events, so a call often finds it mid-flush.
    options.index.flush_events = 3;
    options.index.flush_interval_ms = 1;
    let store = Store::open(dir.path(), options).unwrap();
    // Seqs below this were acknowledged (append returned), so they are in the memtable.
    let acked_next = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let writer = {
        let store = store.clone();
        let acked_next = acked_next.clone();
        std::thread::spawn(move || {
            for i in 0..3_000u64 {
                let a = store
                    .append(
                        &format!("agg-{}", i % 37),
                        ExpectedVersion::Any,
                        &[NewEvent::binary("type-0", i.to_le_bytes().to_vec())],
                    )
                    .unwrap();
                acked_next.store(a.last_seq + 1, std::sync::atomic::Ordering::Release);
            }
        })
    };
    let mut calls = 0u64;
    while !writer.is_finished() {
        let acked_before = acked_next.load(std::sync::atomic::Ordering::Acquire);
        store.flush_index().unwrap();
        let indexed = store.index_counters().indexed_next;
        assert!(
            indexed >= acked_before,
            "flush_index returned with sled at seq {indexed}, {acked_before} acknowledged \
             before the call (call {calls})"
        );
        calls += 1;
    }
    writer.join().unwrap();
    assert!(calls > 10, "only {calls} flushes overlapped the appends");
}

/// A record the store did not write (appended through the log API, say) stops the open
/// with an error naming it. Before, the open succeeded and the indexer then failed on
/// that record at every flush, for ever: reads kept working from memory while nothing
/// reached sled, until appends stopped with `IndexBehind`.
#[test]
fn a_record_that_is_not_an_event_stops_the_open_with_its_seq() {
    let dir = tempfile::tempdir().unwrap();
    let options = crate::common::store_options();
    let store = Store::open(dir.path(), options.clone()).unwrap();
    fill(&store, 0, 20);
    drop(store);
    let mut log_options = options.log.clone();
    log_options.record_size_bytes_max = 1 << 20; // within the test's 4 MiB segments
    let log = eventlog::log::Log::open(dir.path(), log_options.clone()).unwrap();
    let foreign = log.append(&[b"not an event".to_vec()]).unwrap();
    assert_eq!(foreign, 20..21);
    log.close().unwrap();

    let err = Store::open(dir.path(), options.clone()).unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains("record 20 is not an event"),
        "the error names the record: {message}"
    );
    // Nothing was changed: the log still holds every record, the foreign one too.
    let log = eventlog::log::Log::open(dir.path(), log_options).unwrap();
    assert_eq!(log.next_seq(), 21);
    assert_eq!(log.read(20).unwrap().payload(), b"not an event");
}

/// A disk that fills up during large appends. Their groups are fed to the index on the
/// commit helper while they are written, so a failed one was already in the memtable:
/// each failed append must leave no trace there (no version taken, nothing readable),
/// and appends must go on from the acknowledged events once there is space again.
/// With preallocation the allocation fails; without it, the write itself.
#[test]
fn disk_full_during_large_appends_leaves_the_index_at_the_acknowledged_events() {
    use crate::common::FullDisk;
    use eventlog::store::{AppendError, Direction};
    use std::sync::atomic::Ordering;
    const BATCH_EVENTS: u64 = 300; // at least the log's helper threshold (256 records)
    for preallocate_chunk_bytes in [64 << 10, 0] {
        let dir = tempfile::tempdir().unwrap();
        let storage = std::sync::Arc::new(FullDisk {
            real_fs: true,
            ..FullDisk::default()
        });
        let full = storage.full.clone();
        let mut options = crate::common::store_options();
        options.log.preallocate_chunk_bytes = preallocate_chunk_bytes;
        let store = Store::open_with_storage(storage, dir.path(), options.clone()).unwrap();
        let mut acked = [0u64; 3];
        let append = |k: u64| {
            let events: Vec<NewEvent> = (0..BATCH_EVENTS)
                .map(|i| NewEvent::binary("type-0", (k * 1000 + i).to_le_bytes().to_vec()))
                .collect();
            store.append(&format!("agg-{}", k % 3), ExpectedVersion::Any, &events)
        };
        let check = |store: &Store, acked: &[u64; 3]| {
            let total: u64 = acked.iter().sum();
            assert_eq!(store.next_seq(), total);
            assert_eq!(store.read_all(0, usize::MAX).count() as u64, total);
            for (a, &n) in acked.iter().enumerate() {
                let agg = format!("agg-{a}");
                assert_eq!(store.aggregate_version(&agg).unwrap(), n, "{agg}");
                let versions: Vec<u64> = store
                    .read_aggregate(&agg, 1, Direction::Forward, usize::MAX)
                    .unwrap()
                    .map(|e| e.unwrap().event().unwrap().version)
                    .collect();
                assert_eq!(versions, (1..=n).collect::<Vec<_>>(), "{agg}");
            }
        };
        for k in 0..6 {
            append(k).unwrap();
            acked[(k % 3) as usize] += BATCH_EVENTS;
        }
        full.store(true, Ordering::SeqCst);
        let mut failures = 0;
        for k in 6..400 {
            match append(k) {
                Ok(a) => {
                    acked[(k % 3) as usize] += BATCH_EVENTS;
                    assert_eq!(a.last_version, acked[(k % 3) as usize]);
                }
                Err(e @ AppendError::Log(_)) => {
                    assert!(e.to_string().contains("disk full"), "{e}");
                    check(&store, &acked);
                    failures += 1;
                    if failures == 3 {
                        break;
                    }
                }
                Err(other) => panic!("expected a full disk, got {other}"),
            }
        }
        assert_eq!(failures, 3, "the disk never filled up");
        full.store(false, Ordering::SeqCst);
        let resumed = append(1000).unwrap();
        acked[1] += BATCH_EVENTS;
        assert_eq!(resumed.last_version, acked[1]);
        assert_eq!(resumed.last_seq + 1, acked.iter().sum::<u64>());
        store.flush_index().unwrap();
        check(&store, &acked);
        drop(store);
        let store = Store::open(dir.path(), options).unwrap();
        check(&store, &acked);
    }
}
