//! A full disk fails the append with a clear error, stores nothing of it, damages nothing,
//! and appends work again once space is freed.

use crate::common::{all_payloads, copy_dir, payload_for, small_options, FullDisk};
use eventlog::log::{AppendError, Log, LogOptions};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

fn disk_full_cycle(options: LogOptions) {
    let dir = tempfile::tempdir().unwrap();
    let storage = Arc::new(FullDisk::default());
    let full = storage.full.clone();
    let log = Log::open_with_storage(storage, dir.path(), options.clone()).unwrap();
    let mut stored = Vec::new();
    for seq in 0..10 {
        let p = payload_for(seq, 300);
        log.append(&[&p]).unwrap();
        stored.push(p);
    }
    full.store(true, Ordering::SeqCst);
    let mut failures = 0;
    let mut message = String::new();
    // Keep appending until the disk is "full" (with preallocation the first chunk has room).
    for i in 0..2000u64 {
        let p = payload_for(1_000_000 + i, 300);
        match log.append(&[p.as_slice(), p.as_slice()]) {
            Ok(_) => {
                stored.push(p.clone());
                stored.push(p);
            }
            Err(e @ AppendError::DiskFull { .. }) => {
                message = e.to_string();
                let AppendError::DiskFull { path } = e else {
                    unreachable!()
                };
                assert!(path.to_string_lossy().ends_with(".seg"), "{path:?}");
                failures += 1;
                assert_eq!(
                    log.next_seq(),
                    stored.len() as u64,
                    "nothing of the failed append is counted"
                );
                if failures == 3 {
                    break;
                }
            }
            Err(other) => panic!("expected DiskFull, got {other}"),
        }
    }
    assert_eq!(failures, 3, "the disk never filled up");
    assert!(
        message.contains("disk full") && message.contains("free space"),
        "{message}"
    );
    assert_eq!(
        all_payloads(&log),
        stored,
        "nothing stored before was damaged"
    );

    full.store(false, Ordering::SeqCst);
    let p = payload_for(42, 300);
    let seqs = log.append(&[&p]).unwrap();
    assert_eq!(
        seqs.start,
        stored.len() as u64,
        "appends resume with the next seq"
    );
    stored.push(p);

    // A crash image now holds exactly the acknowledged records.
    let image = tempfile::tempdir().unwrap();
    copy_dir(dir.path(), image.path());
    drop(log);
    let log = Log::open(image.path(), options).unwrap();
    assert_eq!(all_payloads(&log), stored);
}

#[test]
fn disk_full_during_write_fails_the_append_and_damages_nothing() {
    disk_full_cycle(small_options());
}

#[test]
fn disk_full_at_preallocation_fails_the_append_and_damages_nothing() {
    let mut options = small_options();
    options.preallocate_chunk_bytes = 4096;
    disk_full_cycle(options);
}

#[test]
fn failed_fsync_stops_writes_until_reopen_and_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let storage = Arc::new(FullDisk::default());
    let fsync_fails = storage.fsync_fails.clone();
    let log = Log::open_with_storage(storage, dir.path(), small_options()).unwrap();
    let stored: Vec<Vec<u8>> = (0..20).map(|s| payload_for(s, 200)).collect();
    for p in &stored {
        log.append(&[p]).unwrap();
    }
    fsync_fails.store(true, Ordering::SeqCst);
    match log.append(&[b"never acknowledged"]) {
        Err(AppendError::Poisoned { cause }) => assert!(cause.contains("fdatasync"), "{cause}"),
        other => panic!("expected Poisoned, got {other:?}"),
    }
    // Not retried and forgotten: even with fsync working again, writes stay refused.
    fsync_fails.store(false, Ordering::SeqCst);
    assert!(matches!(
        log.append(&[b"later"]),
        Err(AppendError::Poisoned { .. })
    ));
    assert!(log.sync().is_err());
    assert_eq!(
        all_payloads(&log),
        stored,
        "reads of acknowledged records still work"
    );
    drop(log);
    let log = Log::open(dir.path(), small_options()).unwrap();
    // The unacknowledged record was cut when its fsync failed, so the page cache cannot
    // pass it off as durable at the next open.
    assert_eq!(all_payloads(&log), stored);
    log.append(&[b"resumed"]).unwrap();
}

/// The same on a real, tiny tmpfs (needs root to mount; CI runs as root).
#[test]
fn disk_full_on_a_real_small_filesystem() {
    let mount = tempfile::tempdir().unwrap();
    let status = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(mount.path())
        .status();
    if !matches!(status, Ok(s) if s.success()) {
        eprintln!("NOTE: disk_full_on_a_real_small_filesystem could not mount a tmpfs (needs root); only the injected-ENOSPC tests ran");
        return;
    }
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(self.0).status();
        }
    }
    let _unmount = Unmount(mount.path());
    let dir = mount.path().join("store");
    let filler = mount.path().join("filler");
    std::fs::write(&filler, vec![1u8; 600 << 10]).unwrap();
    let mut options = LogOptions::default();
    options.segment_size_bytes = 128 << 10;
    options.record_size_bytes_max = 4096;
    options.preallocate_chunk_bytes = 32 << 10;
    let log = Log::open(&dir, options.clone()).unwrap();
    let mut stored = Vec::new();
    let mut full_seen = false;
    for seq in 0..10_000u64 {
        let p = payload_for(seq, 1000);
        match log.append(&[&p]) {
            Ok(_) => stored.push(p),
            Err(AppendError::DiskFull { .. }) => {
                full_seen = true;
                break;
            }
            Err(e) => panic!("expected DiskFull, got {e}"),
        }
    }
    assert!(full_seen, "a 1 MiB filesystem cannot hold 10 MB");
    assert_eq!(all_payloads(&log), stored);
    std::fs::remove_file(&filler).unwrap();
    let p = payload_for(7, 1000);
    assert_eq!(log.append(&[&p]).unwrap().start, stored.len() as u64);
    stored.push(p);
    drop(log);
    let log = Log::open(&dir, options).unwrap();
    assert_eq!(all_payloads(&log), stored);
}

/// A log on a disk that can fill up, where every write grows the file (so a full disk
/// fails it).
fn open_without_preallocation(dir: &Path) -> (Log, Arc<FullDisk>) {
    let storage = Arc::new(FullDisk::default());
    let mut options = small_options();
    options.preallocate_chunk_bytes = 0;
    let log = Log::open_with_storage(storage.clone(), dir, options).unwrap();
    (log, storage)
}

/// A caller that read the log's epoch before a failed write (and perhaps the seqs of
/// appends that failed with it) cannot frame on that reading: the seqs it saw are handed
/// out again.
#[test]
fn a_framed_append_in_an_epoch_a_failure_ended_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (log, storage) = open_without_preallocation(dir.path());
    log.append(&[b"kept"]).unwrap();
    let epoch = log.epoch();
    let framed = log.append_framed(&[b"doomed"], Some(epoch)).unwrap();
    assert_eq!(framed.seqs(), 1..2);
    assert_eq!(log.framed_next(), 2);
    assert!(
        log.acked_next() <= 1,
        "not acknowledged before it is written"
    );
    storage.full.store(true, Ordering::SeqCst);
    assert!(matches!(
        log.wait_appended(framed),
        Err(AppendError::DiskFull { .. })
    ));
    assert_eq!(log.epoch(), epoch + 1);
    assert!(log.wait_settled(1, epoch, std::time::Duration::ZERO));
    storage.full.store(false, Ordering::SeqCst);
    // Seq 1 is free again: a stale reading of the log is refused with the failure...
    assert!(matches!(
        log.append_framed(&[b"stale"], Some(epoch)),
        Err(AppendError::DiskFull { .. })
    ));
    // ... and a fresh one frames there.
    let framed = log.append_framed(&[b"fresh"], Some(log.epoch())).unwrap();
    assert_eq!(log.wait_appended(framed).unwrap(), 1..2);
    assert_eq!(log.acked_next(), 2);
    assert_eq!(log.read(1).unwrap().payload(), b"fresh");
}

/// An append acknowledged before a later write failed is stored, and its waiter hears so,
/// however late it looks: a failure takes back only the seqs not yet acknowledged.
#[test]
fn an_append_acknowledged_before_a_failure_is_reported_stored_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let (log, storage) = open_without_preallocation(dir.path());
    // Framed, then written and synced in the group the next append leads.
    let framed = log.append_framed(&[b"first"], Some(log.epoch())).unwrap();
    assert_eq!(log.append(&[b"second"]).unwrap(), 1..2);
    storage.full.store(true, Ordering::SeqCst);
    assert!(matches!(
        log.append(&[b"failed"]),
        Err(AppendError::DiskFull { .. })
    ));
    storage.full.store(false, Ordering::SeqCst);
    assert_eq!(log.wait_appended(framed).unwrap(), 0..1);
    assert_eq!(log.read(0).unwrap().payload(), b"first");
    assert_eq!(log.append(&[b"third"]).unwrap(), 2..3);
}

/// However many writes fail while an append's waiter is away, it hears what happened to
/// its own records: stored if they were acknowledged before its epoch ended, else the
/// failure that ended it. (A bounded list of failures once forgot the oldest, and the
/// waiter of an append the first failure took back was then told it was stored, with its
/// seq holding another append's record.)
#[test]
fn a_waiter_hears_its_own_outcome_after_many_later_failures() {
    const LATER_FAILURES: usize = 200;
    let dir = tempfile::tempdir().unwrap();
    let (log, storage) = open_without_preallocation(dir.path());
    // Acknowledged in the group the next append leads, then many failures.
    let stored = log.append_framed(&[b"stored"], Some(log.epoch())).unwrap();
    assert_eq!(log.append(&[b"leader"]).unwrap(), 1..2);
    // Framed, never written: the first failure below takes it back.
    let lost = log.append_framed(&[b"lost"], Some(log.epoch())).unwrap();
    assert_eq!(lost.seqs(), 2..3);
    storage.full.store(true, Ordering::SeqCst);
    for _ in 0..LATER_FAILURES {
        assert!(matches!(
            log.append(&[b"failed"]),
            Err(AppendError::DiskFull { .. })
        ));
    }
    storage.full.store(false, Ordering::SeqCst);
    // Acknowledged appends in between, and failures after them, as a flapping disk does.
    for i in 0..LATER_FAILURES as u64 {
        assert_eq!(log.append(&[b"between"]).unwrap(), 2 + i..3 + i);
        storage.full.store(true, Ordering::SeqCst);
        assert!(log.append(&[b"failed"]).is_err());
        storage.full.store(false, Ordering::SeqCst);
    }
    assert_eq!(
        log.epoch(),
        2 * LATER_FAILURES as u64,
        "one epoch a failure"
    );
    assert_eq!(log.wait_appended(stored).unwrap(), 0..1);
    let outcome = log.wait_appended(lost);
    assert!(
        matches!(outcome, Err(AppendError::DiskFull { .. })),
        "taken back by the failure that ended its epoch, yet told {outcome:?}"
    );
    assert_eq!(log.read(0).unwrap().payload(), b"stored");
    assert_eq!(log.read(2).unwrap().payload(), b"between");
}
