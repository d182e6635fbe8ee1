//! Property: whatever order appends are framed, written by other appends' group commits,
//! waited for and failed in, what the log reports of each append is the truth. An append
//! reported stored is readable at the seqs it was given, after reopening too; one reported
//! failed is nowhere in the log; and the log holds exactly the appends reported stored,
//! densely from seq 0.

use crate::common::FullDisk;
use eventlog::log::{AppendError, FramedAppend, Log};
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

#[derive(Debug, Clone)]
enum Op {
    /// `append_framed` without waiting; `stale` frames on the epoch read at the last
    /// `ReadEpoch` instead of the current one.
    Frame {
        records: usize,
        stale: bool,
    },
    /// `append`: frames and waits, leading the group that writes whatever is pending.
    Append {
        records: usize,
    },
    /// `wait_appended` on one of the framed appends.
    Wait {
        which: usize,
    },
    ReadEpoch,
    DiskFull(bool),
    /// The next group's fdatasync fails: the log is poisoned until reopened.
    FailSync,
    /// Waits for every framed append, then closes and reopens the log.
    Reopen,
    /// A flapping disk: this many times, an append fails on a full disk and the next
    /// succeeds (each failure ends an epoch, with acknowledged appends between them).
    Flap {
        cycles: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (1usize..4, any::<bool>()).prop_map(|(records, stale)| Op::Frame { records, stale }),
        4 => (1usize..4).prop_map(|records| Op::Append { records }),
        5 => any::<usize>().prop_map(|which| Op::Wait { which }),
        1 => Just(Op::ReadEpoch),
        3 => any::<bool>().prop_map(Op::DiskFull),
        1 => Just(Op::FailSync),
        1 => Just(Op::Reopen),
        1 => (1usize..100).prop_map(|cycles| Op::Flap { cycles }),
    ]
}

/// What the test was told, to hold the log to: the payload of every record of an append
/// reported stored, by seq. (An append reported failed must be nowhere: `check` finds
/// every record the log holds among these.)
#[derive(Default)]
struct Told {
    stored: BTreeMap<u64, Vec<u8>>,
}

impl Told {
    /// Notes an append's outcome; `framed_at` is where it was framed, if it was.
    fn outcome(
        &mut self,
        result: Result<Range<u64>, AppendError>,
        payloads: &[Vec<u8>],
        framed_at: Option<Range<u64>>,
    ) {
        let Ok(seqs) = result else { return };
        if let Some(framed_at) = framed_at {
            assert_eq!(seqs, framed_at, "stored at the seqs it was framed at");
        }
        assert_eq!(
            seqs.end - seqs.start,
            payloads.len() as u64,
            "a seq per record"
        );
        for (seq, p) in seqs.zip(payloads) {
            assert!(
                self.stored.insert(seq, p.clone()).is_none(),
                "seq {seq} reported stored twice"
            );
        }
    }

    /// Waits for a framed append and notes its outcome.
    fn wait(&mut self, log: &Log, (framed, payloads): (FramedAppend, Vec<Vec<u8>>)) {
        let seqs = framed.seqs();
        self.outcome(log.wait_appended(framed), &payloads, Some(seqs));
    }

    /// The log holds exactly the appends reported stored, densely from seq 0.
    fn check(&self, log: &Log, when: &str) {
        let expected: Vec<u64> = (0..self.stored.len() as u64).collect();
        let told: Vec<u64> = self.stored.keys().copied().collect();
        assert_eq!(
            told, expected,
            "{when}: appends reported stored leave no gap"
        );
        assert_eq!(
            log.next_seq(),
            self.stored.len() as u64,
            "{when}: the log holds only what was reported stored"
        );
        for (seq, p) in &self.stored {
            let record = log
                .read(*seq)
                .unwrap_or_else(|e| panic!("{when}: seq {seq}, reported stored: {e}"));
            assert_eq!(
                record.payload(),
                &p[..],
                "{when}: seq {seq} holds another append's record"
            );
        }
    }
}

fn open(storage: &Arc<FullDisk>, dir: &Path, preallocate: bool) -> Log {
    let mut options = crate::common::small_options();
    if preallocate {
        options.preallocate_chunk_bytes = 8 << 10;
    }
    Log::open_with_storage(storage.clone(), dir, options).expect("the log reopens")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, .. ProptestConfig::default() })]
    #[test]
    fn every_reported_outcome_is_the_truth(
        ops in proptest::collection::vec(op(), 1..80),
        preallocate in any::<bool>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let storage = Arc::new(FullDisk::default());
        let mut log = open(&storage, dir.path(), preallocate);
        let mut told = Told::default();
        let mut framed: Vec<(FramedAppend, Vec<Vec<u8>>)> = Vec::new();
        let mut epoch_read = log.epoch();
        let mut next_payload = 0u64;
        let mut payloads = |n: usize| -> Vec<Vec<u8>> {
            (0..n).map(|_| { next_payload += 1; format!("payload {next_payload}").into_bytes() }).collect()
        };
        for op in ops {
            match op {
                Op::Frame { records, stale } => {
                    let ps = payloads(records);
                    let epoch = if stale { epoch_read } else { log.epoch() };
                    let current = log.epoch();
                    match log.append_framed(&ps, Some(epoch)) {
                        Ok(f) => {
                            prop_assert_eq!(epoch, current, "framed on an epoch a failure ended");
                            framed.push((f, ps));
                        }
                        // Refused, with nothing framed: only for a stale epoch, a full disk
                        // found by preallocation, or a poisoned log.
                        Err(e) => prop_assert!(
                            epoch != current
                                || matches!(e, AppendError::DiskFull { .. } | AppendError::Poisoned { .. }),
                            "refused for no reason: {e}"
                        ),
                    }
                }
                Op::Append { records } => {
                    let ps = payloads(records);
                    told.outcome(log.append(&ps), &ps, None);
                }
                Op::Wait { which } => {
                    if !framed.is_empty() {
                        told.wait(&log, framed.remove(which % framed.len()));
                    }
                }
                Op::ReadEpoch => epoch_read = log.epoch(),
                Op::DiskFull(full) => storage.full.store(full, Ordering::SeqCst),
                Op::FailSync => {
                    storage.fsync_fails.store(true, Ordering::SeqCst);
                    let ps = payloads(1);
                    let result = log.append(&ps);
                    storage.fsync_fails.store(false, Ordering::SeqCst);
                    told.outcome(result, &ps, None);
                }
                Op::Flap { cycles } => {
                    for _ in 0..cycles {
                        storage.full.store(true, Ordering::SeqCst);
                        let ps = payloads(1);
                        told.outcome(log.append(&ps), &ps, None);
                        storage.full.store(false, Ordering::SeqCst);
                        let ps = payloads(1);
                        told.outcome(log.append(&ps), &ps, None);
                    }
                }
                Op::Reopen => {
                    for f in framed.drain(..) {
                        told.wait(&log, f);
                    }
                    drop(log);
                    storage.full.store(false, Ordering::SeqCst);
                    log = open(&storage, dir.path(), preallocate);
                    told.check(&log, "after a reopen");
                }
            }
        }
        storage.full.store(false, Ordering::SeqCst);
        for f in framed.drain(..) {
            told.wait(&log, f);
        }
        // A poisoned log reads what it acknowledged, and so does the reopened one.
        told.check(&log, "at the end");
        drop(log);
        let log = open(&storage, dir.path(), preallocate);
        told.check(&log, "reopened at the end");
    }
}
