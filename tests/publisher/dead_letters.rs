//! Dead letters across restarts, replays, lost log tails and long redrive churn: each
//! dead letter stands for one event, and the bounds never cost a live one.

use super::{fast_retry, fill, recorder, seqs, Seen, WAIT};
use crate::common::open_store;
use eventlog::publisher::{
    DeadLetter, DeadLetterOptions, DeadLetters, HandlerError, PublishError, Publisher, Redrive,
    Subscription,
};
use eventlog::storage::FsStorage;
use eventlog::store::{EventRef, Store};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A handler that parks `bad` until `fixed` is set, recording what it accepts.
pub(super) fn failing_at(
    bad: u64,
    fixed: &Arc<AtomicBool>,
    seen: &Seen,
) -> impl FnMut(&EventRef<'_>, u32) -> Result<(), HandlerError> + Send + 'static {
    let (fixed, seen) = (Arc::clone(fixed), Arc::clone(seen));
    move |e: &EventRef<'_>, attempt: u32| {
        if e.seq == bad && !fixed.load(Ordering::SeqCst) {
            return Err(HandlerError::Permanent("bug".into()));
        }
        seen.lock().unwrap().push((e.seq, attempt));
        Ok(())
    }
}

/// Five stored events and subscription "proj" (`attempts` per event), whose handler
/// parks seq 2 until `fixed` is set; all five handled.
struct SeqTwoParked {
    dir: tempfile::TempDir,
    store: Store,
    publisher: Publisher,
    sub: Subscription,
    fixed: Arc<AtomicBool>,
    seen: Seen,
}

fn seq_two_parked(attempts: u32) -> SeqTwoParked {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    fill(&store, 5);
    let publisher = Publisher::open(&store).unwrap();
    let fixed = Arc::new(AtomicBool::new(false));
    let seen: Seen = Arc::default();
    let sub = publisher
        .subscribe("proj", fast_retry(attempts), failing_at(2, &fixed, &seen))
        .unwrap();
    assert!(sub.wait_until_handled(4, WAIT));
    assert_eq!(seqs(&seen), vec![0, 1, 3, 4]);
    SeqTwoParked {
        dir,
        store,
        publisher,
        sub,
        fixed,
        seen,
    }
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// A handler bug parked seq 2; the bug is fixed and the projection rebuilt from 0: the
/// replay delivers seq 2 in order, and its dead letter goes.
#[test]
fn a_replay_after_reset_delivers_parked_events_in_order_and_clears_their_dead_letters() {
    let parked = seq_two_parked(1);
    let (sub, fixed, seen) = (&parked.sub, &parked.fixed, &parked.seen);
    assert_eq!(sub.dead_letters().unwrap().len(), 1);
    fixed.store(true, Ordering::SeqCst);
    seen.lock().unwrap().clear();
    sub.reset_to(0);
    wait_for("the replay", || seen.lock().unwrap().len() >= 5);
    assert_eq!(seqs(seen), vec![0, 1, 2, 3, 4]);
    assert!(sub.dead_letters().unwrap().is_empty());
    assert_eq!(sub.stats().dead_letters, 0);
}

/// A replay after a reset that is stopped part way goes on after the restart, parked
/// events included: the reset's checkpoint marks every dead letter then existing as one
/// to deliver again.
#[test]
fn a_replay_stopped_part_way_still_delivers_the_parked_events_after_a_restart() {
    let parked = seq_two_parked(1);
    let block = Arc::new(AtomicBool::new(false));
    let at_one = Arc::new(AtomicBool::new(false));
    parked.fixed.store(true, Ordering::SeqCst);
    parked.sub.stop(WAIT).unwrap();
    let seen: Seen = Arc::default();
    let handler = {
        let (block, at_one, seen) = (block.clone(), at_one.clone(), seen.clone());
        move |e: &EventRef<'_>, attempt: u32| {
            if e.seq == 1 && block.load(Ordering::SeqCst) {
                at_one.store(true, Ordering::SeqCst);
                let deadline = Instant::now() + WAIT;
                while block.load(Ordering::SeqCst) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            seen.lock().unwrap().push((e.seq, attempt));
            Ok(())
        }
    };
    block.store(true, Ordering::SeqCst);
    let sub = parked
        .publisher
        .subscribe("proj", fast_retry(1), handler)
        .unwrap();
    sub.reset_to(0);
    wait_for("the replay to reach seq 1", || {
        at_one.load(Ordering::SeqCst)
    });
    // Paused while seq 1 is in the handler: it stops after seq 1, before seq 2.
    sub.pause();
    block.store(false, Ordering::SeqCst);
    wait_for("seq 1 handled", || sub.stats().position == 2);
    sub.stop(WAIT).unwrap();
    assert!(!seqs(&seen).contains(&2), "stopped before seq 2");
    let again = parked
        .publisher
        .subscribe("proj", fast_retry(1), recorder(&seen))
        .unwrap();
    assert!(again.wait_until_handled(4, WAIT));
    assert!(
        seqs(&seen).contains(&2),
        "seq 2 delivered: {:?}",
        seqs(&seen)
    );
    assert!(again.dead_letters().unwrap().is_empty());
}

/// Only parking evicts: a redrive request or an update through dead letters opened with
/// smaller bounds than the subscription's (say by the CLI, with the defaults) costs no
/// live entry.
#[test]
fn only_parking_evicts_whatever_bounds_the_dead_letters_are_opened_with() {
    let dir = tempfile::tempdir().unwrap();
    let roomy = DeadLetterOptions {
        entries_max: 200,
        size_bytes_max: 1 << 20,
        segment_size_bytes: 64 << 10,
    };
    let mut dl = DeadLetters::open(Arc::new(FsStorage), dir.path(), roomy.clone(), 0).unwrap();
    for seq in 0..150 {
        dl.park(entry(seq)).unwrap();
    }
    drop(dl);
    let tight = DeadLetterOptions {
        entries_max: 100,
        ..roomy
    };
    let mut dl = DeadLetters::open(Arc::new(FsStorage), dir.path(), tight, 0).unwrap();
    let last = dl.list()[149].id;
    dl.request_redrive(&[last]).unwrap();
    dl.update(last, 9, "again", 3).unwrap();
    dl.resolve_all(&[dl.list()[0].id]).unwrap();
    assert_eq!((dl.len(), dl.evicted()), (149, 0));
    dl.park(entry(150)).unwrap();
    assert_eq!(
        (dl.len(), dl.evicted()),
        (100, 50),
        "parking applies the bounds"
    );
}

/// A replayed parked event that fails again keeps its one dead letter, with the attempts
/// of the replay added.
#[test]
fn a_replayed_parked_event_that_fails_again_updates_its_one_dead_letter() {
    let parked = seq_two_parked(2);
    let (sub, seen) = (&parked.sub, &parked.seen);
    let first = sub.dead_letters().unwrap();
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].attempts, 1, "a permanent failure is not retried");
    seen.lock().unwrap().clear();
    sub.reset_to(0);
    wait_for("the replay", || seen.lock().unwrap().len() >= 4);
    assert!(sub.wait_until_handled(4, WAIT));
    let again = sub.dead_letters().unwrap();
    assert_eq!(again.len(), 1, "still one dead letter for seq 2: {again:?}");
    assert_eq!(
        (again[0].id, again[0].seq, again[0].attempts),
        (first[0].id, 2, 2)
    );
}

/// The checkpoint was left before a parked event, as a crash leaves it (the checkpoint
/// saved at seq 0, when no dead letter existed yet): the restarted subscription meets the
/// event again, and it stays one dead letter, not delivered.
#[test]
fn an_event_parked_after_the_last_checkpoint_stays_one_dead_letter_after_a_restart() {
    let SeqTwoParked {
        dir,
        store,
        publisher,
        sub,
        ..
    } = seq_two_parked(1);
    sub.stop(WAIT).unwrap();
    drop((sub, publisher));
    {
        // docs/FORMAT.md: next seq 0, dead letters' next id 0, no fingerprints.
        let db = sled::open(dir.path().join("subscriptions")).unwrap();
        let value = [0u64.to_be_bytes(), 0u64.to_be_bytes()].concat();
        let value = [value, vec![0u8]].concat();
        db.open_tree("checkpoints")
            .unwrap()
            .insert("proj", value)
            .unwrap();
        db.flush().unwrap();
    }
    let publisher = Publisher::open(&store).unwrap();
    let seen: Seen = Arc::default();
    let sub = publisher
        .subscribe("proj", fast_retry(1), recorder(&seen))
        .unwrap();
    assert!(sub.wait_until_handled(4, WAIT));
    assert_eq!(seqs(&seen), vec![0, 1, 3, 4]);
    assert_eq!(sub.dead_letters().unwrap().len(), 1);
}

/// `stop` releases the dead letters: the subscription starts again, or they are opened,
/// while the old handle still exists; the old handle says it is stopped.
#[test]
fn a_stopped_subscription_releases_its_dead_letters() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    fill(&store, 3);
    let publisher = Publisher::open(&store).unwrap();
    let seen: Seen = Arc::default();
    let sub = publisher
        .subscribe("r", fast_retry(1), recorder(&seen))
        .unwrap();
    assert!(sub.wait_until_handled(2, WAIT));
    sub.stop(WAIT).unwrap();
    assert!(matches!(
        sub.dead_letters(),
        Err(PublishError::Stopped { ref name }) if name == "r"
    ));
    assert!(matches!(
        sub.redrive(Redrive::All),
        Err(PublishError::Stopped { .. })
    ));
    let opened = publisher
        .open_dead_letters("r", DeadLetterOptions::default())
        .unwrap();
    drop(opened);
    let again = publisher
        .subscribe("r", fast_retry(1), recorder(&seen))
        .unwrap();
    assert!(matches!(
        publisher.open_dead_letters("r", DeadLetterOptions::default()),
        Err(PublishError::AlreadyRunning { .. })
    ));
    drop(sub);
    assert!(again.dead_letters().unwrap().is_empty());
}

fn entry(seq: u64) -> DeadLetter {
    DeadLetter {
        id: 0,
        seq,
        aggregate_id: format!("agg-{seq}"),
        version: 1,
        event_type: "T".into(),
        attempts: 5,
        last_error: "x".into(),
        first_failure_us: 1,
        last_failure_us: 2,
        redrive_requested: false,
    }
}

/// Failed redrives add a record each: the segments stay within `size_bytes_max` by
/// compaction, which carries the live entries forward with their ids and state, so two
/// live dead letters far below both bounds are never evicted.
#[test]
fn redrive_churn_stays_within_the_size_bound_and_evicts_nothing_live() {
    let dir = tempfile::tempdir().unwrap();
    let options = DeadLetterOptions {
        entries_max: 1000,
        size_bytes_max: 16 * 1024,
        segment_size_bytes: 4096,
    };
    let mut dl = DeadLetters::open(Arc::new(FsStorage), dir.path(), options.clone(), 0).unwrap();
    let (first, _) = dl.park(entry(0)).unwrap();
    for i in 0..400u32 {
        dl.update(first, i + 6, &"smtp down ".repeat(10), i64::from(i))
            .unwrap();
        assert!(
            dl.size_bytes() <= 16 * 1024,
            "after {} failed redrives: {} bytes",
            i + 1,
            dl.size_bytes()
        );
        if i == 200 {
            dl.request_redrive(&[first]).unwrap();
        }
    }
    let (second, evicted) = dl.park(entry(1)).unwrap();
    assert_eq!(evicted, 0);
    assert_eq!(dl.evicted(), 0);
    let want = dl.list();
    assert_eq!(want.len(), 2);
    assert_eq!((want[0].id, want[0].attempts), (first, 405));
    assert_eq!(want[0].last_error, "smtp down ".repeat(10));
    assert_eq!(want[1].id, second);
    drop(dl);
    let reopened = DeadLetters::open(Arc::new(FsStorage), dir.path(), options, 0).unwrap();
    assert_eq!(reopened.list(), want, "compaction kept ids and state");
}

/// Past `entries_max` or half of `size_bytes_max` of live entries, the oldest go first,
/// exactly, and the evicted count is kept in the dead-letter log itself (the publisher
/// stores it too, after: a crash between the two does not undercount).
#[test]
fn evictions_are_oldest_first_exact_and_their_count_survives_in_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let options = DeadLetterOptions {
        entries_max: 40,
        size_bytes_max: 64 * 1024,
        segment_size_bytes: 4096,
    };
    let mut dl = DeadLetters::open(Arc::new(FsStorage), dir.path(), options.clone(), 0).unwrap();
    for seq in 0..300 {
        dl.park(entry(seq)).unwrap();
        assert_eq!(dl.len(), (seq + 1).min(40));
        assert!(dl.size_bytes() <= 64 * 1024);
    }
    assert_eq!(dl.evicted(), 260);
    let kept: Vec<u64> = dl.list().iter().map(|d| d.seq).collect();
    assert_eq!(kept, (260..300).collect::<Vec<_>>());
    drop(dl);
    // As if the publisher's stored count (0 here) had missed the evictions.
    let reopened = DeadLetters::open(Arc::new(FsStorage), dir.path(), options, 0).unwrap();
    assert_eq!(reopened.evicted(), 260);
    assert_eq!(reopened.list().len(), 40);

    // The bytes bound on live entries: half of size_bytes_max.
    let dir = tempfile::tempdir().unwrap();
    let options = DeadLetterOptions {
        entries_max: 1_000_000,
        size_bytes_max: 16 * 1024,
        segment_size_bytes: 4096,
    };
    let mut dl = DeadLetters::open(Arc::new(FsStorage), dir.path(), options, 0).unwrap();
    for seq in 0..500 {
        dl.park(entry(seq)).unwrap();
        assert!(dl.live_bytes() <= 8 * 1024 && dl.size_bytes() <= 16 * 1024);
    }
    assert_eq!(dl.len() + dl.evicted(), 500);
    let kept: Vec<u64> = dl.list().iter().map(|d| d.seq).collect();
    assert_eq!(kept, (dl.evicted()..500).collect::<Vec<_>>());
}

/// Bounds that cannot hold (live entries must fit half of the size) are refused.
#[test]
fn a_size_bound_below_two_segments_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let options = DeadLetterOptions {
        entries_max: 10,
        size_bytes_max: 6 * 1024,
        segment_size_bytes: 4096,
    };
    let err = DeadLetters::open(Arc::new(FsStorage), dir.path(), options, 0).unwrap_err();
    assert!(
        matches!(err, PublishError::InvalidOptions(ref m) if m.contains("twice")),
        "{err}"
    );
}

/// A purge of many entries (batched writes) removes exactly those, durably; unknown ids
/// are skipped.
#[test]
fn resolving_many_at_once_removes_exactly_those_durably() {
    let dir = tempfile::tempdir().unwrap();
    let options = DeadLetterOptions {
        entries_max: 10_000,
        size_bytes_max: 1 << 20,
        segment_size_bytes: 64 << 10,
    };
    let mut dl = DeadLetters::open(Arc::new(FsStorage), dir.path(), options.clone(), 0).unwrap();
    let ids: Vec<u64> = (0..600).map(|seq| dl.park(entry(seq)).unwrap().0).collect();
    let mut purge: Vec<u64> = ids.iter().copied().step_by(2).collect();
    purge.push(1_000_000);
    assert_eq!(dl.resolve_all(&purge).unwrap(), 300);
    let want: Vec<u64> = ids.iter().copied().skip(1).step_by(2).collect();
    let listed = |dl: &DeadLetters| dl.list().iter().map(|d| d.id).collect::<Vec<_>>();
    assert_eq!(listed(&dl), want);
    drop(dl);
    let dl = DeadLetters::open(Arc::new(FsStorage), dir.path(), options, 0).unwrap();
    assert_eq!(listed(&dl), want);
    assert_eq!(dl.evicted(), 0);
}
