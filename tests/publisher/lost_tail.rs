//! A log that lost its tail (a power loss under `Durability::None` or `Interval`, or a
//! repair) and took new events at the lost seqs: the subscription delivers the new events,
//! whether they came before or after it started again, and its dead letters still name
//! only the events they parked.

use super::dead_letters::failing_at;
use super::{fast_retry, recorder, seqs, Seen, WAIT};
use eventlog::log::Durability;
use eventlog::publisher::{Publisher, Redrive};
use eventlog::store::{ExpectedVersion, NewEvent, Options, Store};
use eventlog::testing::{CrashFault, SimDisk};
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

const ROOT: &str = "/sim/app";

fn options(sled: &Path) -> Options {
    let mut options = crate::common::store_options();
    options.sled_dir = Some(sled.to_path_buf());
    options.log.segment_size_bytes = 1 << 20;
    options.log.durability = Durability::None;
    options.payload_size_bytes_max = 4 << 10;
    // No index flush during a test: under `None` a flush syncs the log up to the events
    // it indexes, which would keep the events the power loss is meant to take.
    options.index.flush_events = usize::MAX;
    options.index.flush_interval_ms = 3_600_000;
    options
}

fn append(store: &Store, prefix: &str, n: u64) {
    for i in 0..n {
        store
            .append(
                &format!("{prefix}-{i}"),
                ExpectedVersion::Any,
                &[NewEvent::json_text(prefix, "{}")],
            )
            .unwrap();
    }
}

/// Three events, handled by subscription "s" (seq `bad` parked, if any) and checkpointed
/// past; then a power loss takes them all. Returns the store reopened on what is left.
fn handled_then_lost(sled: &Path, bad: Option<u64>) -> Store {
    let disk = SimDisk::new(7);
    let store = Store::open_with_storage(disk.clone(), Path::new(ROOT), options(sled)).unwrap();
    disk.sync_all_dirs();
    append(&store, "old", 3);
    {
        let publisher = Publisher::open(&store).unwrap();
        let never = Arc::new(AtomicBool::new(false));
        let seen: Seen = Arc::default();
        let sub = publisher
            .subscribe(
                "s",
                fast_retry(1),
                failing_at(bad.unwrap_or(u64::MAX), &never, &seen),
            )
            .unwrap();
        assert!(sub.wait_until_handled(2, WAIT));
        sub.stop(WAIT).unwrap();
        assert_eq!(sub.stats().checkpoint, 3);
    }
    // The main log's unsynced appends are gone; sled and the dead-letter log synced theirs.
    let disk = disk.crash(CrashFault::DropUnsynced);
    drop(store);
    let store = Store::open_with_storage(disk, Path::new(ROOT), options(sled)).unwrap();
    assert_eq!(store.next_seq(), 0, "the three old events were lost");
    store
}

/// New events appended before the subscription starts again are not taken for the
/// handled ones whose seqs they took (the checkpoint, 3, is not past the log's end any
/// more): its fingerprints no longer match, so delivery starts over at 0.
#[test]
fn new_events_at_lost_seqs_appended_before_the_restart_are_delivered() {
    let sled = tempfile::tempdir().unwrap();
    let store = handled_then_lost(sled.path(), None);
    append(&store, "new", 4);
    let publisher = Publisher::open(&store).unwrap();
    let seen: Seen = Arc::default();
    let sub = publisher
        .subscribe("s", fast_retry(1), recorder(&seen))
        .unwrap();
    assert!(sub.wait_until_handled(3, WAIT));
    assert_eq!(seqs(&seen), vec![0, 1, 2, 3]);
}

/// The log lost its unsynced tail (`Durability::None`, power loss) after the subscription
/// parked seq 1. New events reuse seqs 0..3: the one at seq 1 is another event and is
/// delivered, and the stale dead letter's redrive names the loss instead of handing the
/// handler the new event under the old entry.
#[test]
fn a_new_event_at_the_seq_of_a_lost_parked_one_is_delivered() {
    let sled = tempfile::tempdir().unwrap();
    let store = handled_then_lost(sled.path(), Some(1));
    let publisher = Publisher::open(&store).unwrap();
    let seen: Seen = Arc::default();
    let sub = publisher
        .subscribe("s", fast_retry(1), recorder(&seen))
        .unwrap();
    append(&store, "new", 3);
    assert!(sub.wait_until_handled(2, WAIT));
    assert_eq!(seqs(&seen), vec![0, 1, 2], "new-1 at seq 1 was delivered");
    let stale = sub.dead_letters().unwrap();
    assert_eq!(stale.len(), 1);
    assert_eq!((stale[0].seq, stale[0].aggregate_id.as_str()), (1, "old-1"));
    let report = sub.redrive(Redrive::All).unwrap();
    assert_eq!(report.failed, vec![stale[0].id]);
    assert_eq!(seqs(&seen), vec![0, 1, 2], "the handler got nothing more");
    let kept = sub.dead_letters().unwrap();
    assert!(
        kept[0].last_error.contains("now holds another event")
            && kept[0].last_error.contains("old-1"),
        "{}",
        kept[0].last_error
    );
}
