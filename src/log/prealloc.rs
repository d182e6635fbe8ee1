//! Background preallocation of the active segment.
//!
//! The log reserves disk space by writing zeros ahead of the writer (see
//! [`LogOptions::preallocate_chunk_bytes`](super::LogOptions::preallocate_chunk_bytes)).
//! Done inline, every few megabytes of records one append paid for writing a whole chunk
//! of zeros, and the next `fdatasync` for carrying them to the device: a 5-10 ms stall,
//! about a third of all the time spent in `fdatasync` at 1,000-event appends. Here a thread
//! of its own keeps the allocation between one and two chunks ahead of the writer, in
//! steps of [`PREALLOCATE_STEP_BYTES`], so appends find the space ready and their syncs
//! overwrite blocks that are already on the device.
//!
//! The writer never depends on the thread: when it reaches the end of the allocated space
//! (the thread fell behind, or failed, for instance on a full disk) it allocates inline as
//! before, and gets the error itself. The two never write zeros at the same time: both
//! hold [`Preallocator::writing`] while they do, and they only ever write past the end of
//! the file, where the writer's records never are.
//!
//! The thread also writes the recovery points the writer asks for as its synced end moves
//! on (see [`LogOptions::recovery_point_step_bytes`](super::LogOptions)), so appends do not
//! wait for those syncs either.

use super::recovery::RecoveryPoint;
use super::segment::Segment;
use parking_lot::{Condvar, Mutex, MutexGuard};
use std::sync::Arc;
use std::time::Duration;

/// Zeros written per step by the background thread: small enough that a writer that must
/// allocate inline waits for at most one step, large enough to keep syscalls few.
pub(crate) const PREALLOCATE_STEP_BYTES: u64 = 1 << 20;

/// How long the idle thread sleeps between checks for `stop`, when nobody wakes it.
const IDLE_WAIT: Duration = Duration::from_secs(1);

/// Longest an appender waits for the thread to finish writing a step of zeros (a 1 MiB
/// write: milliseconds on a working disk) before its append fails with an I/O error.
pub(crate) const STEP_WAIT_MAX: Duration = Duration::from_secs(30);

#[derive(Debug, Default)]
struct State {
    /// The segment being preallocated: the active one, `None` once the log stops writing.
    segment: Option<Arc<Segment>>,
    /// Bytes of `segment` known to be allocated.
    allocated_bytes: u64,
    /// Bytes of `segment` the writer wants allocated.
    wanted_bytes: u64,
    /// The last step failed: no more are tried (nor warned about) until the writer has
    /// allocated inline again, which shows there is space, or moves to a new segment.
    /// Without this a full disk would cost a failed step and a warning per append.
    failed: bool,
    /// A recovery point the writer asked for, to write off its path.
    recovery_point_due: Option<RecoveryPoint>,
    stop: bool,
}

impl State {
    /// Whether `segment` is the one being preallocated.
    fn is_current(&self, segment: &Arc<Segment>) -> bool {
        self.segment
            .as_ref()
            .is_some_and(|s| Arc::ptr_eq(s, segment))
    }
}

/// Shared between the writer and the background thread. See the module docs.
#[derive(Debug, Default)]
pub(crate) struct Preallocator {
    state: Mutex<State>,
    cv: Condvar,
    writing: Mutex<()>,
}

impl Preallocator {
    /// Starts preallocating `segment`, of which `allocated_bytes` are allocated.
    pub(crate) fn set_segment(&self, segment: Arc<Segment>, allocated_bytes: u64) {
        let mut st = self.state.lock();
        st.segment = Some(segment);
        st.allocated_bytes = allocated_bytes;
        st.wanted_bytes = allocated_bytes;
        st.failed = false;
    }

    /// Stops preallocating (the log is poisoned or closing its segment for good). Holds
    /// the caller until a step in progress has finished, so that no zeros land after it.
    pub(crate) fn forget_segment(&self) {
        let _writing = self.writing.lock();
        let mut st = self.state.lock();
        st.segment = None;
    }

    /// Asks for `segment` to be allocated up to `wanted_bytes`. Returns how much of it is
    /// allocated now (0 if the thread is not working on `segment`).
    pub(crate) fn request(&self, segment: &Arc<Segment>, wanted_bytes: u64) -> u64 {
        let mut st = self.state.lock();
        if !st.is_current(segment) {
            return 0;
        }
        if wanted_bytes > st.wanted_bytes && !st.failed {
            st.wanted_bytes = wanted_bytes;
            self.cv.notify_one();
        }
        st.allocated_bytes
    }

    /// How much of `segment` is allocated (0 if the thread is not working on it).
    pub(crate) fn allocated_bytes(&self, segment: &Arc<Segment>) -> u64 {
        let st = self.state.lock();
        if st.is_current(segment) {
            st.allocated_bytes
        } else {
            0
        }
    }

    /// Records that the writer itself allocated `segment` up to `bytes`.
    pub(crate) fn note_allocated(&self, segment: &Arc<Segment>, bytes: u64) {
        let mut st = self.state.lock();
        if st.is_current(segment) {
            st.allocated_bytes = st.allocated_bytes.max(bytes);
            st.failed = false;
        }
    }

    /// Held while zeros are written, by the thread or by the writer allocating inline.
    /// `None` if the thread's step did not finish within [`STEP_WAIT_MAX`]. (The thread and
    /// [`Preallocator::forget_segment`] wait without a limit: only for one write of the
    /// writer's, the same kind of write that this limit is waiting on.)
    pub(crate) fn writing(&self) -> Option<MutexGuard<'_, ()>> {
        self.writing_within(STEP_WAIT_MAX)
    }

    fn writing_within(&self, wait_max: Duration) -> Option<MutexGuard<'_, ()>> {
        self.writing.try_lock_for(wait_max)
    }

    /// Asks the thread to write `rp` (replacing one asked for earlier and not yet
    /// written, which it covers).
    pub(crate) fn ask_recovery_point(&self, rp: RecoveryPoint) {
        let mut st = self.state.lock();
        st.recovery_point_due = Some(rp);
        self.cv.notify_one();
    }

    /// Ends [`Preallocator::run`].
    pub(crate) fn stop(&self) {
        let mut st = self.state.lock();
        st.stop = true;
        st.segment = None;
        self.cv.notify_all();
    }

    /// The background thread's body: allocates what the writer asked for, one step at a
    /// time, and writes the recovery points it asked for with `write_recovery_point`,
    /// until [`Preallocator::stop`].
    pub(crate) fn run(&self, write_recovery_point: impl Fn(RecoveryPoint)) {
        loop {
            let (segment, step_end) = {
                let mut st = self.state.lock();
                loop {
                    if st.stop {
                        return;
                    }
                    if let Some(rp) = st.recovery_point_due.take() {
                        drop(st);
                        write_recovery_point(rp);
                        st = self.state.lock();
                        continue;
                    }
                    if let Some(segment) = &st.segment {
                        if st.allocated_bytes < st.wanted_bytes {
                            let end =
                                (st.allocated_bytes + PREALLOCATE_STEP_BYTES).min(st.wanted_bytes);
                            break (Arc::clone(segment), end);
                        }
                    }
                    self.cv.wait_for(&mut st, IDLE_WAIT);
                }
            };
            let _writing = self.writing.lock();
            {
                // The writer may have allocated this far itself, or moved on, meanwhile.
                let st = self.state.lock();
                if st.stop || !st.is_current(&segment) || st.allocated_bytes >= step_end {
                    continue;
                }
            }
            let allocated = segment.file.allocate(step_end);
            let mut st = self.state.lock();
            let current = st.is_current(&segment);
            match allocated {
                Ok(()) if current => st.allocated_bytes = st.allocated_bytes.max(step_end),
                Ok(()) => {}
                Err(e) => {
                    // Not retried until the writer has allocated inline (see `failed`): on
                    // a full disk it would only spin. The writer reports the error itself.
                    tracing::warn!(
                        segment = %segment.path.display(),
                        to_bytes = step_end,
                        error = %e,
                        "background preallocation failed; appends will allocate as they go"
                    );
                    if current {
                        st.wanted_bytes = st.allocated_bytes;
                        st.failed = true;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Preallocator;
    use crate::log::{Log, LogOptions};
    use std::time::Duration;

    #[test]
    fn the_writer_waits_for_a_step_of_zeros_only_so_long() {
        let p = Preallocator::default();
        let step = p.writing().expect("free");
        // A step that never ends: the writer gives up instead of waiting for ever.
        std::thread::scope(|s| {
            let waited = s.spawn(|| p.writing_within(Duration::from_millis(50)).is_none());
            assert!(
                waited.join().expect("no panic"),
                "the lock was taken while held"
            );
        });
        drop(step);
        assert!(p.writing_within(Duration::from_millis(50)).is_some());
    }

    fn options(in_background: bool) -> LogOptions {
        LogOptions {
            segment_size_bytes: 256 << 10,
            record_size_bytes_max: 16 << 10,
            preallocate_chunk_bytes: 8 << 10,
            preallocate_in_background: in_background,
            ..LogOptions::default()
        }
    }

    fn payload(seq: u64) -> Vec<u8> {
        let len = 50 + (seq * 7919 % 3000) as usize;
        (0..len).map(|i| (seq as usize + i) as u8).collect()
    }

    /// Appends across many chunks and several segment rolls, the thread racing the writer
    /// (and the rolls) the whole time: every record reads back, before and after a reopen,
    /// exactly as with inline preallocation, and no segment file ends before its records.
    #[test]
    fn background_preallocation_keeps_every_record_across_rolls_and_reopens() {
        for in_background in [true, false] {
            let dir = tempfile::tempdir().expect("tempdir");
            let log = Log::open(dir.path(), options(in_background)).expect("open");
            let mut seq = 0u64;
            for batch in 0..400u64 {
                let payloads: Vec<Vec<u8>> = (seq..seq + 1 + batch % 5).map(payload).collect();
                let range = log.append(&payloads).expect("append");
                assert_eq!(range.start, seq);
                seq = range.end;
            }
            assert!(
                log.stats().segment_count >= 4,
                "the test wants several rolls, got {} segments",
                log.stats().segment_count
            );
            let check = |log: &Log| {
                for s in 0..seq {
                    let r = log.read(s).expect("read");
                    assert_eq!(r.payload(), payload(s).as_slice(), "record {s}");
                }
                for segment in log.inner.segments.read().iter() {
                    let len = segment.file.len_bytes().expect("len");
                    assert!(
                        len >= segment.readable().len() as u64,
                        "{} is {len} bytes, shorter than its records",
                        segment.path.display()
                    );
                }
            };
            check(&log);
            drop(log);
            let log = Log::open(dir.path(), options(in_background)).expect("reopen");
            assert_eq!(log.next_seq(), seq);
            check(&log);
            // And appends go on after the reopen (the thread starts on the last segment).
            log.append(&[payload(seq)]).expect("append after reopen");
            assert_eq!(
                log.read(seq).expect("read").payload(),
                payload(seq).as_slice()
            );
        }
    }
}
