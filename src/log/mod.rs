//! The durable segment log: an append-only sequence of checksummed records.
//!
//! # Safety properties and how they are kept
//! - **An acknowledged append survives a crash** (under [`Durability::Sync`]): an append
//!   returns only after its bytes were written and `fdatasync`ed. Group commit lets many
//!   concurrent appenders share one `fdatasync`.
//! - **One append is atomic**: its last record carries the `BATCH_END` flag and recovery
//!   keeps records only up to the last such flag. An append never spans two segments.
//! - **No corrupt record is ever returned**: every read verifies the record's crc32 and its
//!   seq; a mismatch is a typed [`ReadError::Corrupt`] naming the segment and byte.
//! - **Readers never fault**: segments are memory-mapped once; readers read only below the
//!   segment's published end. Files are truncated only during recovery, before any reader
//!   exists, or past the published end.
//! - **A failed fsync is never retried and forgotten**: the log stops accepting writes
//!   ([`AppendError::Poisoned`]) until it is reopened and recovered.
//! - **Seqs are dense**: seq `n` is the `n`-th record (0-based), across segments.
//!
//! See `docs/FORMAT.md` for the bytes on disk and the recovery rules.

mod error;
mod helper;
mod prealloc;
pub mod record;
mod recovery;
pub mod segment;

pub use error::{AppendError, CorruptionSite, OpenError, ReadError, SyncError};
pub use recovery::{Quarantined, RecoveryReport, QUARANTINE_DIR, RECOVERY_POINT_FILE};

use crate::storage::{FsStorage, LockGuard, Storage};
use error::is_disk_full;
use parking_lot::{Condvar, Mutex, RwLock};
use prealloc::Preallocator;
use record::{Decoded, RECORD_HEADER_SIZE_BYTES, RECORD_PAYLOAD_SIZE_BYTES_LIMIT};
use recovery::RecoveryPoint;
use segment::{Segment, SEGMENT_HEADER_SIZE_BYTES};
use std::collections::VecDeque;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Name of the log's subdirectory inside a store directory.
pub const LOG_DIR_NAME: &str = "log";
/// Name of the lock file inside the log directory.
pub const LOCK_FILE: &str = "LOCK";
/// Default segment size: 128 MiB.
pub const SEGMENT_SIZE_BYTES_DEFAULT: u64 = 128 << 20;
/// Smallest allowed segment size: 4 KiB.
pub const SEGMENT_SIZE_BYTES_MIN: u64 = 4 << 10;
/// Largest allowed segment size: 4 GiB - 1 (offsets within a segment are u32).
pub const SEGMENT_SIZE_BYTES_MAX: u64 = u32::MAX as u64;
/// Default maximum record payload: 16 MiB.
pub const RECORD_SIZE_BYTES_MAX_DEFAULT: u32 = 16 << 20;
/// Default maximum records in one append: 100,000.
pub const BATCH_RECORDS_MAX_DEFAULT: usize = 100_000;
/// Default preallocation step: 8 MiB.
pub const PREALLOCATE_CHUNK_BYTES_DEFAULT: u64 = 8 << 20;
/// Default of [`LogOptions::recovery_point_step_bytes`].
pub const RECOVERY_POINT_STEP_BYTES_DEFAULT: u64 = 16 << 20;
/// How long an appender waits for its group commit before checking again that the leader
/// is alive. Waits loop on this, so no wait is unbounded and none spins.
const COMMIT_WAIT_SLICE: Duration = Duration::from_millis(100);
/// How many past write failures are remembered to tell a caller framing on a stale
/// [`Log::epoch`] which failure moved it on (an append's own waiter learns how its epoch
/// ended from the [`EpochEnd`] it holds, whatever the number of failures since).
const FAILURES_REMEMBERED_MAX: usize = 64;
const _: () =
    assert!(SEGMENT_SIZE_BYTES_MIN > (SEGMENT_HEADER_SIZE_BYTES + RECORD_HEADER_SIZE_BYTES) as u64);

/// When an append's bytes are made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// An append returns only after its records are written and `fdatasync`ed: they
    /// survive a process crash and a power loss. Concurrent appends share one `fdatasync`
    /// (group commit). Readers see a record only once it is durable.
    #[default]
    Sync,
    /// An append returns once its records are written to the OS; a background thread
    /// `fdatasync`s every given number of milliseconds. A process crash loses nothing; a
    /// power loss loses at most the last interval. Readers see records once written.
    Interval {
        /// Milliseconds between background syncs (at least 1).
        sync_interval_ms: u64,
    },
    /// An append returns once written to the OS; syncing is left to the OS (and to segment
    /// rolls and [`Log::sync`]). A process crash loses nothing; a power loss may lose
    /// anything not yet synced.
    None,
}

/// Options for [`Log::open`]. Start from `LogOptions::default()`.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct LogOptions {
    /// Roll to a new segment when the next append would make the current one larger than
    /// this. Default 128 MiB; 4 KiB ..= 4 GiB - 1.
    pub segment_size_bytes: u64,
    /// Largest record payload accepted. Default 16 MiB. With the headers it must fit in a
    /// segment.
    pub record_size_bytes_max: u32,
    /// Most records in one append. Default 100,000.
    pub batch_records_max: usize,
    /// When appends become durable. Default [`Durability::Sync`].
    pub durability: Durability,
    /// Disk space is reserved (by writing zeros) this far ahead of the writer, so a full
    /// disk shows up before a record is written and `fdatasync` overwrites data blocks
    /// instead of growing the file. Default 8 MiB; 0 turns preallocation off.
    pub preallocate_chunk_bytes: u64,
    /// Preallocate from a background thread, keeping one to two chunks ahead of the writer,
    /// instead of inline in the append that reaches the end of the reserved space. Default
    /// true. Only on a real file system: on simulated storage the log always preallocates
    /// inline, so that a seeded run does the same operations in the same order every time.
    pub preallocate_in_background: bool,
    /// On open, quarantine damaged parts of the log instead of refusing to open. Records
    /// from the damage on are lost; [`Log::recovery_report`] says which. Default false.
    pub repair: bool,
    /// Group commit: when the previous commit carried several appends and fewer are
    /// waiting now, the next leader waits up to this long for the rest to join, so that
    /// concurrent appenders keep sharing one `fdatasync` instead of splitting into
    /// alternating halves. A lone appender never waits. Default 100 µs; 0 turns it off.
    /// Trades up to this much latency for throughput under concurrency.
    pub group_commit_wait_us: u64,
    /// The recovery point follows the synced end of the active segment in steps of this
    /// many bytes (written by the preallocation thread, or by the appender when there is
    /// none), so that opening after a crash verifies the checksums of at most about this
    /// much of the last segment, not all of it (up to `segment_size_bytes`: about 0.1 s
    /// at 128 MiB here). A step costs writing a 32-byte file, two syncs and a rename.
    /// Default 16 MiB; 0 writes the recovery point only when a segment is rolled and when
    /// the log is closed.
    pub recovery_point_step_bytes: u64,
}

impl Default for LogOptions {
    fn default() -> Self {
        LogOptions {
            segment_size_bytes: SEGMENT_SIZE_BYTES_DEFAULT,
            record_size_bytes_max: RECORD_SIZE_BYTES_MAX_DEFAULT,
            batch_records_max: BATCH_RECORDS_MAX_DEFAULT,
            durability: Durability::Sync,
            preallocate_chunk_bytes: PREALLOCATE_CHUNK_BYTES_DEFAULT,
            preallocate_in_background: true,
            repair: false,
            group_commit_wait_us: 100,
            recovery_point_step_bytes: RECOVERY_POINT_STEP_BYTES_DEFAULT,
        }
    }
}

impl LogOptions {
    /// Checks that the options fit together.
    ///
    /// # Errors
    /// [`OpenError::InvalidOptions`] naming the offending option.
    pub fn validate(&self) -> Result<(), OpenError> {
        let bad = |m: String| Err(OpenError::InvalidOptions(m));
        if !(SEGMENT_SIZE_BYTES_MIN..=SEGMENT_SIZE_BYTES_MAX).contains(&self.segment_size_bytes) {
            return bad(format!(
                "segment_size_bytes is {}, must be {SEGMENT_SIZE_BYTES_MIN}..={SEGMENT_SIZE_BYTES_MAX}",
                self.segment_size_bytes
            ));
        }
        if self.record_size_bytes_max > RECORD_PAYLOAD_SIZE_BYTES_LIMIT {
            return bad(format!(
                "record_size_bytes_max is {}, must be at most {RECORD_PAYLOAD_SIZE_BYTES_LIMIT}",
                self.record_size_bytes_max
            ));
        }
        if self.segment_capacity_bytes()
            < record::framed_len(self.record_size_bytes_max as usize) as u64
        {
            return bad(format!(
                "a record of record_size_bytes_max ({}) plus headers does not fit in segment_size_bytes ({})",
                self.record_size_bytes_max, self.segment_size_bytes
            ));
        }
        if self.batch_records_max == 0 {
            return bad("batch_records_max must be at least 1".into());
        }
        if let Durability::Interval {
            sync_interval_ms: 0,
        } = self.durability
        {
            return bad("Durability::Interval needs sync_interval_ms of at least 1".into());
        }
        Ok(())
    }

    fn segment_capacity_bytes(&self) -> u64 {
        self.segment_size_bytes - SEGMENT_HEADER_SIZE_BYTES as u64
    }
}

/// A record read from the log. Holds its segment's map alive; the payload is not copied.
#[derive(Debug, Clone)]
pub struct Record {
    seq: u64,
    segment: Arc<Segment>,
    payload: Range<usize>,
}

impl Record {
    /// The record's sequence number.
    #[inline]
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The payload bytes, straight from the memory map.
    #[inline]
    pub fn payload(&self) -> &[u8] {
        &self.segment.map.bytes()[self.payload.clone()]
    }
}

/// Told about every group of records as it is written and as it becomes readable, in
/// seq order, before the appenders of those records are acknowledged. Higher layers use
/// it to keep derived state (indexes) in step with the log without re-reading it.
///
/// Each group is [`written`](CommitObserver::written) first and then either
/// [`published`](CommitObserver::published) or [`abandoned`](CommitObserver::abandoned),
/// before the next group is written. Under [`Durability::Sync`] the group's `fdatasync`
/// runs meanwhile (for large groups `written` runs on another thread, while the group is
/// still being written too), so between `written` and `published` the records are not
/// durable yet, or not even on disk: the observer must not show them to readers.
///
/// It runs on the committing thread while the log's writer is busy, so it must be quick
/// and must not call back into the log's append path. That thread holds the active
/// segment's lock meanwhile, which [`Log::sync`] and `LogSyncer::sync_up_to` take too:
/// a thread holding a lock the observer takes must not call them.
pub trait CommitObserver: Send + Sync + std::fmt::Debug {
    /// Records `first_seq ..` with these payloads are being (or were) written; not
    /// acknowledged yet.
    fn written(&self, first_seq: u64, payloads: &[&[u8]]);
    /// Every record below `next_seq` is acknowledged: durable as the log's durability
    /// says, and readable.
    fn published(&self, next_seq: u64);
    /// The records of the last [`written`](CommitObserver::written) group will never be
    /// acknowledged (their write failed, say on a full disk, or their sync failed and the
    /// log is poisoned): forget them.
    fn abandoned(&self);
}

/// Histograms of the log's work, from [`Log::metrics`].
#[derive(Debug)]
pub struct LogMetrics {
    /// `fdatasync` latency of appends, in microseconds.
    pub fsync_us: crate::metrics::Histogram,
    /// Records written per group commit.
    pub group_commit_records: crate::metrics::Histogram,
}

/// Counts and sizes of the log, from [`Log::stats`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LogStats {
    /// The next seq to be written: also the number of readable records.
    pub next_seq: u64,
    /// Number of segment files.
    pub segment_count: u64,
    /// Bytes of headers and records in all segments (not counting preallocated space).
    pub log_bytes: u64,
    /// Number of `fdatasync` calls made for appends since open.
    pub fsync_count: u64,
    /// Number of group commits (writes) since open.
    pub commit_count: u64,
    /// Records written since open.
    pub records_written: u64,
}

#[derive(Debug, Clone)]
enum FailKind {
    DiskFull(PathBuf),
    Io(PathBuf, &'static str, String),
    Poisoned(String),
}

impl FailKind {
    fn to_error(&self) -> AppendError {
        match self {
            FailKind::DiskFull(path) => AppendError::DiskFull { path: path.clone() },
            FailKind::Io(path, action, msg) => AppendError::Io {
                path: path.clone(),
                action,
                source: std::io::Error::other(msg.clone()),
            },
            FailKind::Poisoned(cause) => AppendError::Poisoned {
                cause: cause.clone(),
            },
        }
    }
}

/// Appends waiting to be written, and the bookkeeping of group commit.
#[derive(Debug)]
struct WriterState {
    /// The next seq to hand out.
    next_seq: u64,
    /// Framed records not yet handed to a leader, seqs from `pending_first_seq`.
    pending: Vec<u8>,
    pending_first_seq: u64,
    /// Framed length of each pending record.
    pending_lens: Vec<u32>,
    /// For each pending append: its record count and byte size.
    pending_batches: Vec<(usize, u64)>,
    /// Whether a leader is writing.
    leader_active: bool,
    /// A new leader is waiting for appends to join its group.
    gathering: bool,
    /// Appends in the previous group commit.
    last_group_appends: usize,
    /// Seqs below this are acknowledged (durable under `Sync`, written otherwise).
    acked_next: u64,
    /// Bumped whenever a write fails: every append not yet acknowledged then fails too.
    epoch: u64,
    /// How the current epoch ends, shared with the appends framed in it.
    epoch_end: Arc<EpochEnd>,
    /// The last write failures, oldest first.
    failures: VecDeque<Failure>,
    poisoned: Option<String>,
    closed: bool,
}

/// The active segment, owned by whichever thread is leader (or the sync thread).
#[derive(Debug)]
struct ActiveSegment {
    segment: Arc<Segment>,
    write_offset_bytes: u64,
    allocated_bytes: u64,
    /// Bytes of the active segment known durable.
    synced_offset_bytes: u64,
    written_next: u64,
    /// Where in the active segment the last recovery point was asked for (see
    /// [`LogOptions::recovery_point_step_bytes`]).
    recovery_point_asked_bytes: u64,
}

#[derive(Debug)]
struct Inner {
    storage: Arc<dyn Storage>,
    log_dir: PathBuf,
    options: LogOptions,
    segments: RwLock<Vec<Arc<Segment>>>,
    /// Seqs below this are readable.
    visible_next: AtomicU64,
    /// `WriterState::acked_next`, readable without the writer lock: stored after the
    /// group below it was published (to readers and to the commit observer).
    acked_next: AtomicU64,
    /// `WriterState::epoch`, readable without the writer lock.
    epoch: AtomicU64,
    /// Seqs below this are durable (synced). Moved only by [`Inner::fsync`], under the
    /// `active` lock; an atomic so that framing can read it without that lock: outside
    /// `Sync` it is the sync mark of the records framed now (see [`record`]).
    durable_next: AtomicU64,
    /// Whether the active segment takes sync offsets (format 2 on; see
    /// [`segment::Segment::has_sync_marks`]). Set by a roll, read when framing.
    active_has_sync_marks: std::sync::atomic::AtomicBool,
    visible_lock: Mutex<()>,
    visible_cv: Condvar,
    writer: Mutex<WriterState>,
    writer_cv: Condvar,
    /// Wakes a gathering leader when an append joins.
    gather_cv: Condvar,
    active: Mutex<ActiveSegment>,
    report: RecoveryReport,
    fsync_count: AtomicU64,
    commit_count: AtomicU64,
    records_written: AtomicU64,
    sync_thread_stop: Mutex<bool>,
    sync_thread_cv: Condvar,
    observer: std::sync::OnceLock<Arc<dyn CommitObserver>>,
    metrics: LogMetrics,
    /// Whether `preallocator` runs (see [`LogOptions::preallocate_in_background`]).
    preallocating_in_background: bool,
    preallocator: Preallocator,
    /// The recovery point last written, as (base seq, offset): the roll, the close and the
    /// preallocation thread all write it, and it only ever moves forward.
    recovery_point_written: Mutex<(u64, u64)>,
    /// Tells the observer about large groups while the leader syncs them (see
    /// [`helper`]). Started by the first group that can use it, so logs without an
    /// observer (dead-letter logs) run no such thread; `None` inside if it could not be
    /// started (groups then tell the observer inline).
    helper: std::sync::OnceLock<Option<helper::Helper>>,
    /// Whether groups may use the helper: under `Durability::Sync` on a real file system
    /// (simulated storage stays single-threaded, hence deterministic).
    helper_allowed: bool,
    _lock: Box<dyn LockGuard>,
}

/// The durable segment log.
///
/// # Examples
/// ```
/// use eventlog::log::{Log, LogOptions};
/// let dir = tempfile::tempdir()?;
/// let log = Log::open(dir.path(), LogOptions::default())?;
/// let seqs = log.append(&[b"first".as_slice(), b"second".as_slice()])?;
/// assert_eq!(seqs, 0..2);
/// assert_eq!(log.read(1)?.payload(), b"second");
/// drop(log);
/// let log = Log::open(dir.path(), LogOptions::default())?;
/// assert_eq!(log.next_seq(), 2);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct Log {
    inner: Arc<Inner>,
    sync_thread: Option<JoinHandle<()>>,
    preallocator_thread: Option<JoinHandle<()>>,
}

impl Log {
    /// Opens (creating if needed) the log in `<dir>/log/` on the real file system, and
    /// recovers it after a crash.
    ///
    /// # Errors
    /// [`OpenError::Locked`] if another process or open log holds the directory;
    /// [`OpenError::Corrupt`] for damage that is not a torn tail (unless `options.repair`);
    /// [`OpenError::Io`] for file system failures; [`OpenError::InvalidOptions`].
    pub fn open(dir: &Path, options: LogOptions) -> Result<Log, OpenError> {
        Self::open_with_storage(Arc::new(FsStorage::new()), dir, options)
    }

    /// Like [`Log::open`], through the given [`Storage`].
    ///
    /// # Errors
    /// As [`Log::open`].
    pub fn open_with_storage(
        storage: Arc<dyn Storage>,
        dir: &Path,
        options: LogOptions,
    ) -> Result<Log, OpenError> {
        options.validate()?;
        let log_dir = dir.join(LOG_DIR_NAME);
        // The directories this open creates (deepest last) must become durable entries
        // of their parents: a log whose directory vanishes at a power loss lost it all.
        let mut created = Vec::new();
        let mut probe = Some(log_dir.as_path());
        while let Some(p) = probe.filter(|p| !p.as_os_str().is_empty()) {
            if storage.exists(p).unwrap_or(false) {
                break;
            }
            created.push(p.to_path_buf());
            probe = p.parent();
        }
        storage
            .create_dir_all(&log_dir)
            .map_err(|source| OpenError::Io {
                path: log_dir.clone(),
                action: "creating the log directory",
                source,
            })?;
        for child in created.iter().rev() {
            if let Some(parent) = child.parent().filter(|p| !p.as_os_str().is_empty()) {
                storage.sync_dir(parent).map_err(|source| OpenError::Io {
                    path: parent.to_path_buf(),
                    action: "syncing a new directory's parent",
                    source,
                })?;
            }
        }
        let lock_path = log_dir.join(LOCK_FILE);
        let lock = storage
            .try_lock(&lock_path)
            .map_err(|source| OpenError::Io {
                path: lock_path.clone(),
                action: "taking the lock",
                source,
            })?
            .ok_or_else(|| OpenError::Locked {
                dir: dir.to_path_buf(),
            })?;
        let recovered = recovery::recover(storage.as_ref(), &log_dir, &options)?;
        let last = Arc::clone(
            recovered
                .segments
                .last()
                .expect("recovery yields at least one segment"),
        );
        let allocated_bytes = last.file.len_bytes().map_err(|source| OpenError::Io {
            path: last.path.clone(),
            action: "reading a segment's length",
            source,
        })?;
        let next_seq = recovered.next_seq;
        let preallocating_in_background = options.preallocate_in_background
            && options.preallocate_chunk_bytes > 0
            && storage.is_real_file_system();
        let helper_allowed =
            options.durability == Durability::Sync && storage.is_real_file_system();
        let preallocator = Preallocator::default();
        if preallocating_in_background {
            preallocator.set_segment(Arc::clone(&last), allocated_bytes);
        }
        let inner = Arc::new(Inner {
            storage,
            log_dir,
            segments: RwLock::new(recovered.segments),
            visible_next: AtomicU64::new(next_seq),
            acked_next: AtomicU64::new(next_seq),
            epoch: AtomicU64::new(0),
            // Recovery synced what it kept.
            durable_next: AtomicU64::new(next_seq),
            active_has_sync_marks: std::sync::atomic::AtomicBool::new(last.has_sync_marks),
            visible_lock: Mutex::new(()),
            visible_cv: Condvar::new(),
            writer: Mutex::new(WriterState {
                next_seq,
                pending: Vec::new(),
                pending_first_seq: next_seq,
                pending_lens: Vec::new(),
                pending_batches: Vec::new(),
                leader_active: false,
                gathering: false,
                last_group_appends: 0,
                acked_next: next_seq,
                epoch: 0,
                epoch_end: Arc::default(),
                failures: VecDeque::new(),
                poisoned: None,
                closed: false,
            }),
            writer_cv: Condvar::new(),
            gather_cv: Condvar::new(),
            active: Mutex::new(ActiveSegment {
                segment: last,
                write_offset_bytes: recovered.write_offset_bytes,
                allocated_bytes,
                synced_offset_bytes: recovered.write_offset_bytes,
                written_next: next_seq,
                recovery_point_asked_bytes: SEGMENT_HEADER_SIZE_BYTES as u64,
            }),
            report: recovered.report,
            fsync_count: AtomicU64::new(0),
            commit_count: AtomicU64::new(0),
            records_written: AtomicU64::new(0),
            sync_thread_stop: Mutex::new(false),
            sync_thread_cv: Condvar::new(),
            observer: std::sync::OnceLock::new(),
            metrics: LogMetrics {
                fsync_us: crate::metrics::Histogram::new(crate::metrics::LATENCY_US_BOUNDS),
                group_commit_records: crate::metrics::Histogram::new(crate::metrics::SIZE_BOUNDS),
            },
            preallocating_in_background,
            preallocator,
            recovery_point_written: Mutex::new((0, 0)),
            helper: std::sync::OnceLock::new(),
            helper_allowed,
            _lock: lock,
            options,
        });
        let sync_thread = match inner.options.durability {
            Durability::Interval { sync_interval_ms } => {
                let inner = Arc::clone(&inner);
                let spawned = std::thread::Builder::new()
                    .name("eventlog-sync".into())
                    .spawn(move || {
                        inner.interval_sync_loop(Duration::from_millis(sync_interval_ms))
                    });
                Some(spawned.map_err(|source| OpenError::Io {
                    path: PathBuf::new(),
                    action: "starting the background sync thread",
                    source,
                })?)
            }
            _ => None,
        };
        let preallocator_thread = if inner.preallocating_in_background {
            let inner = Arc::clone(&inner);
            let spawned = std::thread::Builder::new()
                .name("eventlog-prealloc".into())
                .spawn(move || {
                    inner
                        .preallocator
                        .run(|rp| inner.write_recovery_point_or_warn(rp))
                });
            Some(spawned.map_err(|source| OpenError::Io {
                path: PathBuf::new(),
                action: "starting the background preallocation thread",
                source,
            })?)
        } else {
            None
        };
        Ok(Log {
            inner,
            sync_thread,
            preallocator_thread,
        })
    }

    /// Appends `payloads` as consecutive records, atomically: after any crash either all
    /// of them are in the log or none. Returns their seqs. When it returns, the records are
    /// durable as the log's [`Durability`] promises.
    ///
    /// # Errors
    /// [`AppendError::RecordTooLarge`] or [`AppendError::BadBatchSize`] (nothing written);
    /// [`AppendError::DiskFull`] (nothing stored; retry after freeing space);
    /// [`AppendError::Poisoned`] after an earlier fsync or write failure; [`AppendError::Io`].
    pub fn append<P: AsRef<[u8]>>(&self, payloads: &[P]) -> Result<Range<u64>, AppendError> {
        let batch_bytes = self.inner.check_batch(payloads)?;
        let mut w = self.inner.writer.lock();
        let framed = self.inner.frame(&mut w, payloads, batch_bytes, None)?;
        self.inner.wait_acked(&mut w, framed)
    }

    /// The first half of [`Log::append`]: frames `payloads` into the next group commit and
    /// returns their seqs without waiting for the group to be written. Finish with
    /// [`Log::wait_appended`], which says whether the records were stored.
    ///
    /// Lets a caller that must keep appends in order (the store, per aggregate) let the
    /// next append go as soon as this one has its seqs, instead of after its `fdatasync`.
    /// With `epoch` set, frames only if no write failed since [`Log::epoch`] returned it:
    /// a caller that read the seqs of appends in flight then knows they are not handed out
    /// again (a failure takes back every seq not yet acknowledged).
    ///
    /// # Errors
    /// As [`Log::append`]; if the epoch has moved on, the failure that moved it.
    ///
    /// # Examples
    /// ```
    /// use eventlog::log::{Log, LogOptions};
    /// let dir = tempfile::tempdir()?;
    /// let log = Log::open(dir.path(), LogOptions::default())?;
    /// let framed = log.append_framed(&[b"first"], Some(log.epoch()))?;
    /// assert_eq!(framed.seqs(), 0..1);
    /// assert_eq!(log.wait_appended(framed)?, 0..1);
    /// assert_eq!(log.acked_next(), 1);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn append_framed<P: AsRef<[u8]>>(
        &self,
        payloads: &[P],
        epoch: Option<u64>,
    ) -> Result<FramedAppend, AppendError> {
        let batch_bytes = self.inner.check_batch(payloads)?;
        let mut w = self.inner.writer.lock();
        self.inner.frame(&mut w, payloads, batch_bytes, epoch)
    }

    /// Waits until the append framed by [`Log::append_framed`] is acknowledged (durable as
    /// the log's [`Durability`] promises) or has failed. Returns its seqs.
    ///
    /// # Errors
    /// As [`Log::append`]: the failure of the write or sync that took the records back.
    pub fn wait_appended(&self, framed: FramedAppend) -> Result<Range<u64>, AppendError> {
        let mut w = self.inner.writer.lock();
        self.inner.wait_acked(&mut w, framed)
    }

    /// Seqs below this are acknowledged: durable under [`Durability::Sync`], written
    /// otherwise, and in either case published to readers and to the commit observer.
    pub fn acked_next(&self) -> u64 {
        self.inner.acked_next.load(Ordering::Acquire)
    }

    /// Waits until seq `seq` is acknowledged, or a write failure has moved the log past
    /// `epoch` (so `seq` was acknowledged before it or never will be), or `timeout`
    /// passes. Returns whether one of the first two happened. Woken by group commits.
    pub fn wait_settled(&self, seq: u64, epoch: u64, timeout: Duration) -> bool {
        let deadline = crate::deadline::deadline_after(Instant::now(), timeout);
        let mut w = self.inner.writer.lock();
        loop {
            if w.acked_next > seq || w.epoch != epoch {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            self.inner
                .writer_cv
                .wait_for(&mut w, (deadline - now).min(COMMIT_WAIT_SLICE));
        }
    }

    /// The next seq to hand out: above [`Log::acked_next`] while appends are framed and
    /// not yet acknowledged. For diagnostics and tests; takes the writer lock.
    pub fn framed_next(&self) -> u64 {
        self.inner.writer.lock().next_seq
    }

    /// Counts the write failures so far: each one takes back every seq handed out and not
    /// yet acknowledged (see [`Log::append_framed`]).
    pub fn epoch(&self) -> u64 {
        self.inner.epoch.load(Ordering::Acquire)
    }

    /// Registers the [`CommitObserver`] told about every later commit. At most one per log.
    ///
    /// # Errors
    /// Returns the observer back if one is already registered.
    pub fn set_commit_observer(
        &self,
        observer: Arc<dyn CommitObserver>,
    ) -> Result<(), Arc<dyn CommitObserver>> {
        self.inner.observer.set(observer)
    }

    /// Reads the record with sequence number `seq`, verifying its checksum.
    ///
    /// # Errors
    /// [`ReadError::NotFound`] if `seq` is not (yet) readable; [`ReadError::Corrupt`] if
    /// the record's bytes are damaged.
    pub fn read(&self, seq: u64) -> Result<Record, ReadError> {
        self.inner.read(seq)
    }

    /// Iterates over records from `from_seq` up to the last readable record at the time
    /// each item is produced. Stops at the first error (after yielding it).
    pub fn iter_from(&self, from_seq: u64) -> LogIter {
        LogIter {
            inner: Arc::clone(&self.inner),
            next_seq: from_seq,
            visible_next: 0,
            cursor: None,
            failed: false,
        }
    }

    /// A reader of records at given seqs, a batch at a time (see [`BatchReader`]): for
    /// reading what an index points at, in seq order.
    pub fn batch_reader(&self) -> BatchReader {
        BatchReader {
            inner: Arc::clone(&self.inner),
            segments: Vec::new(),
            located: Vec::new(),
            pos: 0,
        }
    }

    /// The next seq to be written, which is also the number of readable records.
    pub fn next_seq(&self) -> u64 {
        self.inner.visible_next.load(Ordering::Acquire)
    }

    /// Waits until seq `seq` is readable, or `timeout` passes. Returns whether it is.
    /// Woken by commits, not by polling.
    pub fn wait_for(&self, seq: u64, timeout: Duration) -> bool {
        self.inner.wait_visible(seq, timeout)
    }

    /// Like [`Log::wait_for`], but also returns (false) when [`Log::wake_waiters`] is
    /// called, so that a waiter can look at other conditions (a stop request) promptly.
    pub fn wait_for_or_wake(&self, seq: u64, timeout: Duration) -> bool {
        self.inner.wait_visible_once(seq, timeout)
    }

    /// Wakes every thread in [`Log::wait_for_or_wake`] (and lets those in
    /// [`Log::wait_for`] re-check).
    pub fn wake_waiters(&self) {
        let _g = self.inner.visible_lock.lock();
        self.inner.visible_cv.notify_all();
    }

    /// Makes everything appended so far durable (useful under `Interval` or `None`).
    ///
    /// # Errors
    /// [`SyncError::Poisoned`] if this or an earlier sync failed.
    pub fn sync(&self) -> Result<(), SyncError> {
        self.inner.sync_active()
    }

    /// A handle that makes records durable up to a seq from another thread (see
    /// [`LogSyncer`]), without keeping the log open.
    pub(crate) fn syncer(&self) -> LogSyncer {
        LogSyncer {
            inner: Arc::downgrade(&self.inner),
        }
    }

    /// What opening the log found and did (tail truncation, rebuilt indexes, quarantine).
    pub fn recovery_report(&self) -> &RecoveryReport {
        &self.inner.report
    }

    /// Counts and sizes.
    pub fn stats(&self) -> LogStats {
        let segments = self.inner.segments.read();
        LogStats {
            next_seq: self.next_seq(),
            segment_count: segments.len() as u64,
            log_bytes: segments
                .iter()
                .map(|s| s.end_bytes.load(Ordering::Acquire))
                .sum(),
            fsync_count: self.inner.fsync_count.load(Ordering::Relaxed),
            commit_count: self.inner.commit_count.load(Ordering::Relaxed),
            records_written: self.inner.records_written.load(Ordering::Relaxed),
        }
    }

    /// The first seq still in the log: 0 unless old segments were removed with
    /// [`Log::remove_segments_before`].
    pub fn first_seq(&self) -> u64 {
        self.inner.segments.read().first().map_or(0, |s| s.base_seq)
    }

    /// The first seq of each segment, oldest first.
    pub fn segment_first_seqs(&self) -> Vec<u64> {
        self.inner
            .segments
            .read()
            .iter()
            .map(|s| s.base_seq)
            .collect()
    }

    /// Removes whole sealed segments whose records all lie below `seq` (oldest first),
    /// keeping at least the active segment. Returns how many records were removed.
    /// Readers holding records of a removed segment keep them readable (the map stays
    /// alive); later reads of those seqs get [`ReadError::NotFound`].
    ///
    /// # Errors
    /// [`SyncError::Poisoned`] if a file cannot be removed or the directory not synced;
    /// the log stays usable, and the next open sees a consistent prefix removed.
    pub fn remove_segments_before(&self, seq: u64) -> Result<u64, SyncError> {
        let inner = &self.inner;
        let removable: Vec<Arc<Segment>> = {
            let segments = inner.segments.read();
            let mut out = Vec::new();
            for pair in segments.windows(2) {
                // pair[1].base_seq is where pair[0] ends.
                if pair[1].base_seq <= seq {
                    out.push(Arc::clone(&pair[0]));
                } else {
                    break;
                }
            }
            out
        };
        let mut removed = 0;
        for segment in removable {
            // Oldest first, each removal made durable before the next, so a crash leaves a
            // contiguous log that starts later.
            let fail = |e: std::io::Error| SyncError::Poisoned {
                cause: format!("removing {}: {e}", segment.path.display()),
            };
            inner.storage.remove_file(&segment.path).map_err(fail)?;
            let idx = inner
                .log_dir
                .join(segment::index_file_name(segment.base_seq));
            if inner.storage.exists(&idx).unwrap_or(false) {
                inner.storage.remove_file(&idx).map_err(fail)?;
            }
            inner.storage.sync_dir(&inner.log_dir).map_err(fail)?;
            let mut segments = inner.segments.write();
            if segments.first().is_some_and(|s| Arc::ptr_eq(s, &segment)) && segments.len() > 1 {
                let gone = segments.remove(0);
                removed += segments[0].base_seq - gone.base_seq;
            }
        }
        Ok(removed)
    }

    /// Histograms: fsync latency and group-commit sizes.
    pub fn metrics(&self) -> &LogMetrics {
        &self.inner.metrics
    }

    /// The log directory (`<dir>/log`).
    pub fn log_dir(&self) -> &Path {
        &self.inner.log_dir
    }

    /// Syncs, records a recovery point at the end of the log (so the next open verifies
    /// nothing), and closes. Dropping the log does the same, ignoring errors.
    ///
    /// # Errors
    /// [`SyncError::Poisoned`] if the final sync failed or the log was already poisoned.
    pub fn close(mut self) -> Result<(), SyncError> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<(), SyncError> {
        {
            let mut w = self.inner.writer.lock();
            if w.closed {
                return Ok(());
            }
            w.closed = true;
            // Let an in-flight leader finish; bounded, since a leader never waits on us.
            let deadline = Instant::now() + Duration::from_secs(30);
            while w.leader_active && Instant::now() < deadline {
                self.inner.writer_cv.wait_for(&mut w, COMMIT_WAIT_SLICE);
            }
        }
        {
            *self.inner.sync_thread_stop.lock() = true;
            self.inner.sync_thread_cv.notify_all();
        }
        if let Some(t) = self.sync_thread.take() {
            let _ = t.join();
        }
        self.inner.preallocator.stop();
        if let Some(t) = self.preallocator_thread.take() {
            let _ = t.join();
        }
        self.inner.sync_active()?;
        let active = self.inner.active.lock();
        let rp = RecoveryPoint {
            base_seq: active.segment.base_seq,
            offset_bytes: active.write_offset_bytes,
        };
        self.inner
            .write_recovery_point(rp)
            .map_err(|e| SyncError::Poisoned {
                cause: format!("writing the recovery point: {e}"),
            })
    }
}

impl Drop for Log {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

/// Makes a log's records durable up to a seq, for a thread that derives data from the
/// records and must not make that durable before them (the index under
/// [`Durability::Interval`] and [`Durability::None`], where records are acknowledged once
/// written). Holds the log weakly: it never keeps the log (or its directory lock) alive.
#[derive(Debug, Clone)]
pub(crate) struct LogSyncer {
    inner: std::sync::Weak<Inner>,
}

impl LogSyncer {
    /// Makes every record below `next_seq` (a seq the log has written) durable: at once if
    /// they are (always under [`Durability::Sync`], which acknowledges only synced
    /// records), otherwise by syncing the active segment as [`Log::sync`] does (sealed
    /// segments are synced when rolled). Waits at most `timeout` for another thread's
    /// write or sync of the active segment, not for its own `fdatasync`.
    ///
    /// Never call it while holding a lock the log's [`CommitObserver`] takes (see there).
    ///
    /// # Errors
    /// [`SyncError::Poisoned`] if the sync fails, or an earlier one did;
    /// [`SyncError::Closed`] if the log was dropped; [`SyncError::Busy`] after `timeout`.
    pub(crate) fn sync_up_to(&self, next_seq: u64, timeout: Duration) -> Result<(), SyncError> {
        let inner = self.inner.upgrade().ok_or(SyncError::Closed)?;
        if inner.durable_next.load(Ordering::Acquire) >= next_seq {
            return Ok(());
        }
        inner.check_not_poisoned()?;
        let active = inner.active.try_lock_for(timeout).ok_or(SyncError::Busy {
            waited_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
        })?;
        inner.sync_active_locked(active)?;
        let durable_next = inner.durable_next.load(Ordering::Acquire);
        debug_assert!(
            durable_next >= next_seq,
            "synced the log to {durable_next}, asked for {next_seq}: a seq not written yet"
        );
        if durable_next < next_seq {
            return Err(SyncError::Poisoned {
                cause: format!(
                    "asked to make seqs below {next_seq} durable, but the log has written \
                     only up to {durable_next}"
                ),
            });
        }
        Ok(())
    }
}

impl Inner {
    /// Checks an append's sizes (before the writer lock is taken); returns its framed bytes.
    fn check_batch<P: AsRef<[u8]>>(&self, payloads: &[P]) -> Result<u64, AppendError> {
        let count = payloads.len();
        if count == 0 || count > self.options.batch_records_max {
            return Err(AppendError::BadBatchSize {
                count,
                max: self.options.batch_records_max,
            });
        }
        let mut batch_bytes = 0u64;
        for p in payloads {
            let len = p.as_ref().len();
            if len > self.options.record_size_bytes_max as usize {
                return Err(AppendError::RecordTooLarge {
                    size_bytes: len as u64,
                    limit_bytes: u64::from(self.options.record_size_bytes_max),
                });
            }
            batch_bytes += record::framed_len(len) as u64;
        }
        if batch_bytes > self.options.segment_capacity_bytes() {
            return Err(AppendError::RecordTooLarge {
                size_bytes: batch_bytes,
                limit_bytes: self.options.segment_capacity_bytes(),
            });
        }
        Ok(batch_bytes)
    }

    /// Frames `payloads`, checked by [`Inner::check_batch`] to take `batch_bytes`, into the
    /// pending group (see [`Log::append_framed`]).
    fn frame<P: AsRef<[u8]>>(
        &self,
        w: &mut parking_lot::MutexGuard<'_, WriterState>,
        payloads: &[P],
        batch_bytes: u64,
        epoch: Option<u64>,
    ) -> Result<FramedAppend, AppendError> {
        let count = payloads.len();
        if let Some(cause) = &w.poisoned {
            return Err(AppendError::Poisoned {
                cause: cause.clone(),
            });
        }
        if w.closed {
            return Err(AppendError::Closed);
        }
        if let Some(epoch) = epoch {
            if w.epoch != epoch {
                return Err(failure_for(w, epoch));
            }
        }
        let first = w.next_seq;
        if w.pending.is_empty() {
            w.pending_first_seq = first;
        }
        // The records' sync mark: a seq below which every record is durable by the time
        // they are written (see `record`), so recovery can tell a hole the crash made from
        // damage.
        let sync_mark = if !self.active_has_sync_marks.load(Ordering::Acquire) {
            // A format 1 segment: offset 0, as that format has (they may land in the next,
            // newer segment after a roll; 0 is right in any format).
            None
        } else if self.options.durability == Durability::Sync {
            // The leader writes the pending buffer as one group, and only after the
            // previous group's sync succeeded (after a failed one, nothing is written).
            Some(w.pending_first_seq)
        } else {
            // Writes go out before they are synced: only what is synced now is sure to be.
            Some(self.durable_next.load(Ordering::Acquire))
        };
        debug_assert!(
            sync_mark.is_none_or(|mark| mark <= first),
            "sync mark {sync_mark:?} above the first seq {first} of an append"
        );
        for (i, p) in payloads.iter().enumerate() {
            let flags = if i + 1 == count {
                record::FLAG_BATCH_END
            } else {
                0
            };
            let before = w.pending.len();
            let seq = first + i as u64;
            let sync_offset = sync_mark.map_or(0, |mark| seq.saturating_sub(mark));
            record::encode_into(&mut w.pending, seq, flags, sync_offset, p.as_ref());
            let framed = (w.pending.len() - before) as u32;
            w.pending_lens.push(framed);
        }
        w.pending_batches.push((count, batch_bytes));
        if w.gathering {
            self.gather_cv.notify_one();
        }
        w.next_seq = first + count as u64;
        Ok(FramedAppend {
            seqs: first..w.next_seq,
            end: Arc::clone(&w.epoch_end),
        })
    }

    /// Leads group commits or waits for them until `framed` is acknowledged or failed.
    fn wait_acked(
        &self,
        w: &mut parking_lot::MutexGuard<'_, WriterState>,
        framed: FramedAppend,
    ) -> Result<Range<u64>, AppendError> {
        let FramedAppend { seqs, end } = framed;
        loop {
            // Its epoch ended. A failure after this append was acknowledged does not undo
            // it: the records were stored, and their seqs are not handed out again.
            if let Some(f) = end.failure.get() {
                return if f.acked_next >= seqs.end {
                    Ok(seqs)
                } else {
                    Err(f.kind.to_error())
                };
            }
            if w.acked_next >= seqs.end {
                return Ok(seqs);
            }
            if !w.leader_active {
                w.leader_active = true;
                self.gather(w);
                self.lead(w);
                w.leader_active = false;
                self.writer_cv.notify_all();
                continue;
            }
            self.writer_cv.wait_for(w, COMMIT_WAIT_SLICE);
        }
    }

    /// Lets the appends of the previous group join this one (see
    /// `LogOptions::group_commit_wait_us`).
    fn gather(&self, w: &mut parking_lot::MutexGuard<'_, WriterState>) {
        let wait = Duration::from_micros(self.options.group_commit_wait_us);
        let target = w.last_group_appends;
        if !wait.is_zero() && w.pending_batches.len() < target {
            let deadline = crate::deadline::deadline_after(Instant::now(), wait);
            w.gathering = true;
            while w.pending_batches.len() < target && !w.closed {
                if self.gather_cv.wait_until(w, deadline).timed_out() {
                    break;
                }
            }
            w.gathering = false;
        }
        w.last_group_appends = w.pending_batches.len();
    }

    /// Writes everything pending (one group commit), releasing the writer lock during I/O.
    fn lead(&self, w: &mut parking_lot::MutexGuard<'_, WriterState>) {
        // Shared, so the commit helper can read the payloads while this thread syncs.
        let bytes = Arc::new(std::mem::take(&mut w.pending));
        let lens = std::mem::take(&mut w.pending_lens);
        let batches = std::mem::take(&mut w.pending_batches);
        let first_seq = w.pending_first_seq;
        let outcome = parking_lot::MutexGuard::unlocked(w, || {
            let mut active = self.active.lock();
            self.write_group(&mut active, &bytes, &lens, &batches, first_seq)
        });
        w.acked_next = w.acked_next.max(outcome.acked_next);
        self.acked_next.store(w.acked_next, Ordering::Release);
        if let Some(kind) = outcome.failure {
            // Everything not acknowledged fails: the seqs handed out after `acked_next`
            // are taken back, so the log stays dense.
            if let FailKind::Poisoned(cause) = &kind {
                w.poisoned = Some(cause.clone());
            }
            w.epoch += 1;
            self.epoch.store(w.epoch, Ordering::Release);
            let failure = Failure {
                epoch: w.epoch,
                acked_next: w.acked_next,
                kind,
            };
            // Told to the appends of the epoch that ended, before anyone can see it ended
            // (both under the writer lock), then a fresh one for the next.
            let told = w.epoch_end.failure.set(failure.clone()).is_ok();
            debug_assert!(told, "an epoch ends once");
            w.epoch_end = Arc::default();
            w.failures.push_back(failure);
            if w.failures.len() > FAILURES_REMEMBERED_MAX {
                w.failures.pop_front();
            }
            w.next_seq = w.acked_next;
            w.pending.clear();
            w.pending_lens.clear();
            w.pending_batches.clear();
            w.pending_first_seq = w.acked_next;
        }
        // Reuse the buffer's allocation for the next group (the helper's job, which
        // shared it, is done and dropped by now).
        if w.pending.is_empty() {
            if let Ok(mut bytes) = Arc::try_unwrap(bytes) {
                bytes.clear();
                w.pending = bytes;
            }
            w.pending_first_seq = w.next_seq;
        }
    }

    /// Writes one group of appends into the active segment (rolling as needed), syncs per
    /// the durability mode, and publishes what was written to readers.
    fn write_group(
        &self,
        active: &mut ActiveSegment,
        bytes: &Arc<Vec<u8>>,
        lens: &[u32],
        batches: &[(usize, u64)],
        first_seq: u64,
    ) -> GroupOutcome {
        let sync = self.options.durability == Durability::Sync;
        let mut acked_next = if sync {
            self.durable_next.load(Ordering::Acquire)
        } else {
            active.written_next
        };
        debug_assert_eq!(
            active.written_next, first_seq,
            "group must start where the log ends"
        );
        let mut byte_pos = 0usize;
        let mut rec_pos = 0usize;
        let mut seq = first_seq;
        let mut batch_iter = batches.iter().peekable();
        while batch_iter.peek().is_some() {
            // Gather the appends that fit in the active segment (at least one).
            let chunk_start_bytes = byte_pos;
            let chunk_first_rec = rec_pos;
            let mut chunk_bytes = 0u64;
            let mut chunk_records = 0usize;
            while let Some(&&(n, b)) = batch_iter.peek() {
                let fits =
                    active.write_offset_bytes + chunk_bytes + b <= self.options.segment_size_bytes;
                let segment_empty = active.write_offset_bytes == SEGMENT_HEADER_SIZE_BYTES as u64;
                if !(fits || chunk_records == 0 && segment_empty) {
                    break;
                }
                chunk_bytes += b;
                chunk_records += n;
                batch_iter.next();
            }
            if chunk_records == 0 {
                if let Err(kind) = self.roll(active) {
                    return GroupOutcome {
                        acked_next,
                        failure: Some(kind),
                    };
                }
                continue;
            }
            let chunk = &bytes[chunk_start_bytes..chunk_start_bytes + chunk_bytes as usize];
            let file_offset = active.write_offset_bytes;
            let mut offsets = Vec::with_capacity(chunk_records);
            let mut off = file_offset;
            for &len in &lens[chunk_first_rec..chunk_first_rec + chunk_records] {
                offsets.push(off as u32);
                off += u64::from(len);
            }
            debug_assert_eq!(off, file_offset + chunk_bytes);
            let observer = self.observer.get();
            let first_of_chunk = seq;
            // Where each record's payload is in `bytes`.
            let payload_ranges: Vec<Range<usize>> = match observer {
                Some(_) => offsets
                    .iter()
                    .zip(&lens[chunk_first_rec..chunk_first_rec + chunk_records])
                    .map(|(&o, &len)| {
                        let start = chunk_start_bytes
                            + (u64::from(o) - file_offset) as usize
                            + RECORD_HEADER_SIZE_BYTES;
                        start..start + len as usize - RECORD_HEADER_SIZE_BYTES
                    })
                    .collect(),
                None => Vec::new(),
            };
            let tell_written = {
                let observer = observer.cloned();
                let bytes = Arc::clone(bytes);
                move || {
                    if let Some(observer) = observer {
                        let payloads: Vec<&[u8]> =
                            payload_ranges.iter().map(|r| &bytes[r.clone()]).collect();
                        observer.written(first_of_chunk, &payloads);
                    }
                }
            };
            let write = |active: &mut ActiveSegment| -> Result<(), FailKind> {
                self.ensure_allocated(active, file_offset + chunk_bytes)?;
                if let Err(e) = active.segment.file.write_at(chunk, file_offset) {
                    return Err(self.undo_failed_write(active, file_offset, chunk.len(), e));
                }
                active.write_offset_bytes = off;
                active.written_next = first_of_chunk + chunk_records as u64;
                self.commit_count.fetch_add(1, Ordering::Relaxed);
                self.metrics
                    .group_commit_records
                    .observe(chunk_records as u64);
                self.records_written
                    .fetch_add(chunk_records as u64, Ordering::Relaxed);
                Ok(())
            };
            // A large chunk feeds the index on the helper while this thread writes and
            // syncs it: the memtable hides the chunk until it is published, and forgets
            // it if the write or the sync fails. A small one feeds it here, once written.
            let use_helper = sync
                && self.helper_allowed
                && observer.is_some()
                && chunk_records >= helper::OVERLAP_RECORDS_MIN;
            let helper = if use_helper { self.helper() } else { None };
            let outcome = match helper {
                Some(helper) => helper.run_while(Box::new(tell_written), || {
                    write(active)?;
                    self.fsync(active)
                }),
                None => {
                    if let Err(kind) = write(active) {
                        // Nothing was told to the observer yet.
                        return GroupOutcome {
                            acked_next,
                            failure: Some(kind),
                        };
                    }
                    tell_written();
                    if sync {
                        self.fsync(active)
                    } else {
                        Ok(())
                    }
                }
            };
            if let Err(kind) = outcome {
                if let Some(observer) = observer {
                    observer.abandoned();
                }
                return GroupOutcome {
                    acked_next,
                    failure: Some(kind),
                };
            }
            if sync {
                self.advance_recovery_point(active);
            }
            seq += chunk_records as u64;
            byte_pos += chunk_bytes as usize;
            rec_pos += chunk_records;
            self.publish(&active.segment, &offsets, off, seq);
            if let Some(observer) = observer {
                observer.published(seq);
            }
            acked_next = seq;
        }
        GroupOutcome {
            acked_next,
            failure: None,
        }
    }

    /// The commit helper, started on first use; `None` if it could not be started.
    fn helper(&self) -> Option<&helper::Helper> {
        self.helper
            .get_or_init(|| match helper::Helper::start() {
                Ok(helper) => Some(helper),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot start the commit helper thread; large groups feed the index before their sync instead of during it");
                    None
                }
            })
            .as_ref()
    }

    /// Writes `rp` unless a recovery point as far or further is written already.
    fn write_recovery_point(&self, rp: RecoveryPoint) -> std::io::Result<()> {
        let mut written = self.recovery_point_written.lock();
        if (rp.base_seq, rp.offset_bytes) <= *written {
            return Ok(());
        }
        rp.write(self.storage.as_ref(), &self.log_dir)?;
        *written = (rp.base_seq, rp.offset_bytes);
        Ok(())
    }

    /// [`Inner::write_recovery_point`] off the append path: a failure only means the next
    /// open verifies more of the log (the previous point stays, whole).
    fn write_recovery_point_or_warn(&self, rp: RecoveryPoint) {
        if let Err(e) = self.write_recovery_point(rp) {
            tracing::warn!(
                dir = %self.log_dir.display(),
                error = %e,
                "writing a recovery point failed; the next open verifies more of the log"
            );
        }
    }

    /// After a successful sync: once the synced end of the active segment is a step (see
    /// [`LogOptions::recovery_point_step_bytes`]) past the last recovery point asked for,
    /// asks for one there. The preallocation thread writes it, so the appender does not
    /// wait for its syncs; without that thread the appender writes it.
    fn advance_recovery_point(&self, active: &mut ActiveSegment) {
        let step = self.options.recovery_point_step_bytes;
        if step == 0 || active.synced_offset_bytes < active.recovery_point_asked_bytes + step {
            return;
        }
        // Synced, and at the end of a group: a record boundary after a whole append.
        let rp = RecoveryPoint {
            base_seq: active.segment.base_seq,
            offset_bytes: active.synced_offset_bytes,
        };
        active.recovery_point_asked_bytes = active.synced_offset_bytes;
        if self.preallocating_in_background {
            self.preallocator.ask_recovery_point(rp);
        } else {
            self.write_recovery_point_or_warn(rp);
        }
    }

    fn fsync(&self, active: &mut ActiveSegment) -> Result<(), FailKind> {
        self.fsync_count.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let synced = active.segment.file.sync_data();
        self.metrics
            .fsync_us
            .observe(started.elapsed().as_micros() as u64);
        match synced {
            Ok(()) => {
                active.synced_offset_bytes = active.write_offset_bytes;
                self.durable_next
                    .store(active.written_next, Ordering::Release);
                Ok(())
            }
            // Never retried: after a failed fsync the kernel may have dropped the dirty
            // pages, so a retry could "succeed" without the data (fsyncgate).
            Err(e) => {
                // Under Sync, unsynced records were never published, so they can be cut:
                // otherwise the page cache could still hold them at the next open, which
                // would take them for durable records the disk never got.
                // No zeros may land after the cut, and none are needed any more.
                self.preallocator.forget_segment();
                if self.options.durability == Durability::Sync
                    && active.synced_offset_bytes < active.write_offset_bytes
                {
                    let _ = active.segment.file.set_len(active.synced_offset_bytes);
                }
                Err(FailKind::Poisoned(format!(
                    "fdatasync of {} failed: {e}",
                    active.segment.path.display()
                )))
            }
        }
    }

    /// Makes written records readable.
    fn publish(&self, segment: &Segment, offsets: &[u32], end_bytes: u64, next_seq: u64) {
        segment.offsets.write().extend_from_slice(offsets);
        segment.end_bytes.store(end_bytes, Ordering::Release);
        self.visible_next.store(next_seq, Ordering::Release);
        let _g = self.visible_lock.lock();
        self.visible_cv.notify_all();
    }

    /// Makes sure `needed_bytes` of the active segment are allocated before records are
    /// written below that, asking the background thread (if any) to stay ahead.
    fn ensure_allocated(
        &self,
        active: &mut ActiveSegment,
        needed_bytes: u64,
    ) -> Result<(), FailKind> {
        let chunk = self.options.preallocate_chunk_bytes;
        let cap = self.options.segment_size_bytes;
        if chunk == 0 {
            return Ok(());
        }
        if self.preallocating_in_background {
            // Keep one to two chunks ahead: ask while less than one is left.
            if active.allocated_bytes < (needed_bytes + chunk).min(cap) {
                let now = self
                    .preallocator
                    .request(&active.segment, (needed_bytes + 2 * chunk).min(cap));
                active.allocated_bytes = active.allocated_bytes.max(now);
            }
            if needed_bytes <= active.allocated_bytes {
                return Ok(());
            }
        } else if needed_bytes <= active.allocated_bytes {
            return Ok(());
        }
        // The space is needed now: the thread fell behind or failed, or there is none.
        // Waits for a step the thread is writing, then allocates what is still missing.
        let Some(_writing) = self.preallocator.writing() else {
            return Err(FailKind::Io(
                active.segment.path.clone(),
                "waiting for the preallocation thread",
                format!(
                    "its write of zeros took longer than {} s; the disk may be stalled",
                    prealloc::STEP_WAIT_MAX.as_secs()
                ),
            ));
        };
        if self.preallocating_in_background {
            let now = self.preallocator.allocated_bytes(&active.segment);
            active.allocated_bytes = active.allocated_bytes.max(now);
            if needed_bytes <= active.allocated_bytes {
                return Ok(());
            }
        }
        let target = (needed_bytes + chunk).min(cap).max(needed_bytes);
        match active.segment.file.allocate(target) {
            Ok(()) => {
                active.allocated_bytes = target;
                if self.preallocating_in_background {
                    self.preallocator.note_allocated(&active.segment, target);
                }
                Ok(())
            }
            Err(e) if is_disk_full(&e) => Err(FailKind::DiskFull(active.segment.path.clone())),
            Err(e) => Err(FailKind::Io(
                active.segment.path.clone(),
                "preallocating space",
                e.to_string(),
            )),
        }
    }

    /// After a failed write, zero what may have landed so that no record of a failed append
    /// can resurface after a crash. If that fails too, the log is poisoned.
    fn undo_failed_write(
        &self,
        active: &mut ActiveSegment,
        offset: u64,
        len: usize,
        e: std::io::Error,
    ) -> FailKind {
        let path = active.segment.path.clone();
        // Only bytes inside the file can have landed; overwriting them needs no new space.
        let undone = active.segment.file.len_bytes().and_then(|file_len| {
            let end = (offset + len as u64).min(file_len);
            if end > offset {
                active
                    .segment
                    .file
                    .write_at(&vec![0u8; (end - offset) as usize], offset)?;
                // Synced, so a crash cannot bring back whole records of the failed
                // group, whose appenders were told it failed.
                active.segment.file.sync_data()?;
            }
            Ok(())
        });
        let undone = undone.is_ok();
        match (undone, is_disk_full(&e)) {
            (true, true) => FailKind::DiskFull(path),
            (true, false) => FailKind::Io(path, "writing records", e.to_string()),
            (false, _) => FailKind::Poisoned(format!(
                "write to {} failed ({e}) and its partial bytes could not be cleared",
                path.display()
            )),
        }
    }

    /// Seals the active segment (synced, offset index written) and starts the next one.
    fn roll(&self, active: &mut ActiveSegment) -> Result<(), FailKind> {
        // The sealed segment is synced before the next exists: recovery relies on every
        // segment but the last being complete and durable.
        self.fsync(active)?;
        let base = active.written_next;
        let new =
            recovery::create_segment(self.storage.as_ref(), &self.log_dir, base, &self.options)
                .map_err(|e| match e {
                    OpenError::Io { source, path, .. } if is_disk_full(&source) => {
                        FailKind::DiskFull(path)
                    }
                    // A failed directory sync or rename leaves the directory in an unknown
                    // state: stop, as after a failed fsync.
                    other => FailKind::Poisoned(format!("creating a segment failed: {other}")),
                })?;
        let old = Arc::clone(&active.segment);
        let index =
            segment::encode_index(old.base_seq, active.write_offset_bytes, &old.offsets.read());
        if let Err(e) = segment::write_file_atomically(
            self.storage.as_ref(),
            &self.log_dir,
            &segment::index_file_name(old.base_seq),
            &index,
        ) {
            // Not fatal: a missing index is rebuilt at the next open.
            let _ = e;
        }
        let allocated = new
            .file
            .len_bytes()
            .unwrap_or(SEGMENT_HEADER_SIZE_BYTES as u64);
        self.segments.write().push(Arc::clone(&new));
        if self.preallocating_in_background {
            self.preallocator.set_segment(Arc::clone(&new), allocated);
        }
        self.active_has_sync_marks
            .store(new.has_sync_marks, Ordering::Release);
        active.segment = new;
        active.write_offset_bytes = SEGMENT_HEADER_SIZE_BYTES as u64;
        active.synced_offset_bytes = SEGMENT_HEADER_SIZE_BYTES as u64;
        active.allocated_bytes = allocated;
        active.recovery_point_asked_bytes = SEGMENT_HEADER_SIZE_BYTES as u64;
        let rp = RecoveryPoint {
            base_seq: base,
            offset_bytes: SEGMENT_HEADER_SIZE_BYTES as u64,
        };
        self.write_recovery_point(rp)
            .map_err(|e| FailKind::Poisoned(format!("writing the recovery point failed: {e}")))
    }

    fn sync_active(&self) -> Result<(), SyncError> {
        self.check_not_poisoned()?;
        self.sync_active_locked(self.active.lock())
    }

    /// [`SyncError::Poisoned`] if a write or sync failed since open. Takes the writer lock
    /// briefly: call it before taking the active segment's lock.
    fn check_not_poisoned(&self) -> Result<(), SyncError> {
        match &self.writer.lock().poisoned {
            Some(cause) => Err(SyncError::Poisoned {
                cause: cause.clone(),
            }),
            None => Ok(()),
        }
    }

    /// [`Inner::sync_active`] once the active segment's lock is taken.
    fn sync_active_locked(
        &self,
        mut active: parking_lot::MutexGuard<'_, ActiveSegment>,
    ) -> Result<(), SyncError> {
        if self.durable_next.load(Ordering::Acquire) == active.written_next {
            return Ok(());
        }
        match self.fsync(&mut active) {
            Ok(()) => {
                self.advance_recovery_point(&mut active);
                Ok(())
            }
            Err(kind) => {
                let cause = match &kind {
                    FailKind::Poisoned(c) => c.clone(),
                    other => format!("{other:?}"),
                };
                let mut w = self.writer.lock();
                w.poisoned = Some(cause.clone());
                Err(SyncError::Poisoned { cause })
            }
        }
    }

    fn interval_sync_loop(&self, interval: Duration) {
        let mut stop = self.sync_thread_stop.lock();
        while !*stop {
            self.sync_thread_cv.wait_for(&mut stop, interval);
            if *stop {
                break;
            }
            parking_lot::MutexGuard::unlocked(&mut stop, || {
                // A failure poisons the log; appends then report it.
                let _ = self.sync_active();
            });
        }
    }

    fn wait_visible(&self, seq: u64, timeout: Duration) -> bool {
        if self.visible_next.load(Ordering::Acquire) > seq {
            return true;
        }
        let deadline = crate::deadline::deadline_after(Instant::now(), timeout);
        let mut g = self.visible_lock.lock();
        while self.visible_next.load(Ordering::Acquire) <= seq {
            if self.visible_cv.wait_until(&mut g, deadline).timed_out() {
                return self.visible_next.load(Ordering::Acquire) > seq;
            }
        }
        true
    }

    fn wait_visible_once(&self, seq: u64, timeout: Duration) -> bool {
        if self.visible_next.load(Ordering::Acquire) > seq {
            return true;
        }
        let mut g = self.visible_lock.lock();
        if self.visible_next.load(Ordering::Acquire) > seq {
            return true;
        }
        let _ = self.visible_cv.wait_for(&mut g, timeout);
        self.visible_next.load(Ordering::Acquire) > seq
    }

    fn segment_for(&self, seq: u64) -> Option<Arc<Segment>> {
        self.segment_and_end_for(seq).map(|(segment, _)| segment)
    }

    /// The segment holding `seq`, and the first seq of the next segment (`u64::MAX` for the
    /// last one).
    fn segment_and_end_for(&self, seq: u64) -> Option<(Arc<Segment>, u64)> {
        let segments = self.segments.read();
        let i = segments.partition_point(|s| s.base_seq <= seq);
        let segment = Arc::clone(segments.get(i.checked_sub(1)?)?);
        let end_seq = segments.get(i).map_or(u64::MAX, |s| s.base_seq);
        Some((segment, end_seq))
    }

    fn read(&self, seq: u64) -> Result<Record, ReadError> {
        let next_seq = self.visible_next.load(Ordering::Acquire);
        if seq >= next_seq {
            return Err(ReadError::NotFound { seq, next_seq });
        }
        let segment = self
            .segment_for(seq)
            .ok_or(ReadError::NotFound { seq, next_seq })?;
        let offset = segment
            .offsets
            .read()
            .get((seq - segment.base_seq) as usize)
            .copied();
        let offset = offset.ok_or(ReadError::NotFound { seq, next_seq })? as usize;
        let payload = self.verify_at(&segment, segment.readable(), offset, seq)?;
        Ok(Record {
            seq,
            segment,
            payload,
        })
    }

    /// Decodes and verifies (checksum, framing, seq) the record at `offset` of `segment`,
    /// which must be `seq`; returns where its payload is. `readable` is a prefix of the
    /// segment's readable bytes that the record is known to lie in when it was published
    /// (the whole readable part, or up to an end read earlier).
    #[inline]
    fn verify_at(
        &self,
        segment: &Segment,
        readable: &[u8],
        offset: usize,
        seq: u64,
    ) -> Result<Range<usize>, ReadError> {
        if let Some(bytes) = readable.get(offset..) {
            if let Decoded::Record(h) = record::decode(bytes, self.options.record_size_bytes_max) {
                if h.seq == seq {
                    let start = offset + RECORD_HEADER_SIZE_BYTES;
                    return Ok(start..start + h.payload_len as usize);
                }
            }
        }
        Err(self.corrupt(segment, offset, seq))
    }

    /// Why the record at `offset` of `segment` is not a valid record `seq`.
    #[cold]
    #[inline(never)]
    fn corrupt(&self, segment: &Segment, offset: usize, seq: u64) -> ReadError {
        let readable = segment.readable();
        let reason = match readable.get(offset..) {
            None => format!("offset past the readable end {}", readable.len()),
            Some(bytes) => match record::decode(bytes, self.options.record_size_bytes_max) {
                Decoded::Record(h) if h.seq == seq => {
                    // Only a prefix of the readable bytes was checked, and the record did
                    // not fit in it: the caller's idea of the end was wrong.
                    "record crosses the published end".to_string()
                }
                Decoded::Record(h) => format!("found seq {}", h.seq),
                Decoded::End => "zeroed bytes where a record should be".into(),
                Decoded::Truncated => "record cut short".into(),
                Decoded::Invalid(reason) => reason.to_string(),
            },
        };
        ReadError::Corrupt {
            seq,
            site: CorruptionSite {
                segment: segment.path.clone(),
                offset_bytes: offset as u64,
                reason,
            },
        }
    }
}

struct GroupOutcome {
    acked_next: u64,
    failure: Option<FailKind>,
}

/// An append framed by [`Log::append_framed`] and not yet waited for.
#[derive(Debug)]
#[must_use = "the append is not known to be stored until `Log::wait_appended` says so"]
pub struct FramedAppend {
    seqs: Range<u64>,
    /// How its epoch ends (set once it has): its waiter reads there whether it was stored.
    end: Arc<EpochEnd>,
}

impl FramedAppend {
    /// The seqs the records will have if they are stored.
    pub fn seqs(&self) -> Range<u64> {
        self.seqs.clone()
    }
}

/// How an epoch ended, shared by the appends framed in it: each can tell whether its epoch
/// ended, and then whether it was stored, however many epochs passed since (a bounded list
/// of failures could forget). Freed with the last append of the epoch.
#[derive(Debug, Default)]
struct EpochEnd {
    /// The failure that ended the epoch; set once, under the writer lock, before the
    /// epoch moves on.
    failure: std::sync::OnceLock<Failure>,
}

/// A write failure, remembered to tell the appends it ended what happened.
#[derive(Debug, Clone)]
struct Failure {
    /// The epoch it began.
    epoch: u64,
    /// The log's `acked_next` when it happened: the seqs it took back start here, and an
    /// append below it was stored.
    acked_next: u64,
    kind: FailKind,
}

/// Why `epoch` is over: the failure that ended it (each failure begins the next epoch),
/// or, if that one is no longer remembered ([`FAILURES_REMEMBERED_MAX`]), the oldest one
/// remembered, which also came after it.
fn failure_for(w: &WriterState, epoch: u64) -> AppendError {
    w.failures
        .iter()
        .find(|f| f.epoch == epoch + 1)
        .or_else(|| w.failures.front())
        .map_or_else(
            || AppendError::Poisoned {
                cause: "an earlier write failed".into(),
            },
            |f| f.kind.to_error(),
        )
}

/// Iterator over records from a seq on; see [`Log::iter_from`].
///
/// It walks a segment's records back to back: the segment list and offsets are looked up
/// only when it starts or moves to the next segment, and the published ends (of the log
/// and of the segment) are re-read only when it reaches the ones it last saw. Every record
/// is still verified (checksum, framing, seq) before it is returned.
#[derive(Debug)]
pub struct LogIter {
    inner: Arc<Inner>,
    next_seq: u64,
    /// Seqs below this are known to be readable (`visible_next` when last read).
    visible_next: u64,
    /// The segment being walked and where `next_seq` is in it.
    cursor: Option<Cursor>,
    failed: bool,
}

#[derive(Debug)]
struct Cursor {
    segment: Arc<Segment>,
    /// The offset of the next record.
    offset: usize,
    /// The segment's published end when last read: records starting below it are whole
    /// and readable.
    end: usize,
    /// Bytes below this were asked of the CPU ahead of the reads ([`prefetch`]).
    prefetched: usize,
}

impl LogIter {
    /// The seq the next item will have.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Finds the segment and offset of `seq` through the segment list and its offsets.
    #[cold]
    #[inline(never)]
    fn seek(&self, seq: u64) -> Result<Cursor, ReadError> {
        let not_found = || ReadError::NotFound {
            seq,
            next_seq: self.inner.visible_next.load(Ordering::Acquire),
        };
        let segment = self.inner.segment_for(seq).ok_or_else(not_found)?;
        let offset = segment
            .offsets
            .read()
            .get((seq - segment.base_seq) as usize)
            .copied()
            .ok_or_else(not_found)?;
        let end = segment.end_bytes.load(Ordering::Acquire) as usize;
        Ok(Cursor {
            segment,
            offset: offset as usize,
            end,
            prefetched: offset as usize,
        })
    }
}

impl Iterator for LogIter {
    type Item = Result<Record, ReadError>;

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        let seq = self.next_seq;
        if seq >= self.visible_next {
            self.visible_next = self.inner.visible_next.load(Ordering::Acquire);
            if seq >= self.visible_next {
                return None;
            }
        }
        // Seqs below `visible_next` are published, so a record starting below the
        // segment's published end is there; past it, it is in a later segment.
        let in_cursor = match &mut self.cursor {
            Some(c) if c.offset < c.end => true,
            Some(c) => {
                c.end = c.segment.end_bytes.load(Ordering::Acquire) as usize;
                c.offset < c.end
            }
            None => false,
        };
        if !in_cursor {
            match self.seek(seq) {
                Ok(c) => self.cursor = Some(c),
                Err(e) => {
                    self.cursor = None;
                    self.failed = true;
                    return Some(Err(e));
                }
            }
        }
        let c = self.cursor.as_mut()?;
        let bytes = c.segment.map.bytes();
        let readable = &bytes[..c.end.min(bytes.len())];
        // The records are read back to back: keep the CPU fetching a little ahead, across
        // the page boundaries its own prefetcher stops at.
        let ahead = (c.offset + ITER_PREFETCH_BYTES).min(readable.len());
        while c.prefetched < ahead {
            prefetch(readable, c.prefetched);
            c.prefetched += CACHE_LINE_BYTES;
        }
        match self.inner.verify_at(&c.segment, readable, c.offset, seq) {
            Ok(payload) => {
                c.offset = payload.end;
                self.next_seq += 1;
                Some(Ok(Record {
                    seq,
                    segment: Arc::clone(&c.segment),
                    payload,
                }))
            }
            Err(e) => {
                self.cursor = None;
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}

/// How many records ahead of the one being read [`BatchReader`] asks the CPU to fetch.
const BATCH_PREFETCH_AHEAD: usize = 4;
/// How far ahead of the record being read [`LogIter`] asks the CPU to fetch.
const ITER_PREFETCH_BYTES: usize = 2048;
const CACHE_LINE_BYTES: usize = 64;

/// Asks the CPU to start fetching the cache line holding `bytes[at]` (if `at` is in
/// `bytes`). Only a hint: nothing is read, and no fault can come of it.
#[inline]
pub(crate) fn prefetch(bytes: &[u8], at: usize) {
    if let Some(byte) = bytes.get(at) {
        prefetch_value(byte);
    }
}

/// Asks the CPU to load the cache line that `value` starts in, without waiting for it (a
/// no-op off x86_64).
#[inline]
pub(crate) fn prefetch_value<T>(value: &T) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        // SAFETY: SSE is part of the x86_64 baseline; the address is that of a live value,
        // and a prefetch never faults or reads anyway.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(std::ptr::from_ref(value).cast::<i8>()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = value;
}

/// Reads the records at a list of seqs, such as an index's postings, a batch at a time;
/// see [`Log::batch_reader`].
///
/// [`BatchReader::load`] finds where every seq of a batch is with one look-up of the
/// segment list and one of each segment's offsets (instead of two locked look-ups per
/// record); iterating then verifies each record (checksum, framing, seq) as it is
/// returned, exactly as [`Log::read`] does, with the same errors.
#[derive(Debug)]
pub struct BatchReader {
    inner: Arc<Inner>,
    /// The segments holding the batch's records.
    segments: Vec<Arc<Segment>>,
    /// The batch, in the order given.
    located: Vec<Located>,
    /// The next entry of `located` to read.
    pos: usize,
}

#[derive(Debug, Clone, Copy)]
struct Located {
    seq: u64,
    /// Index into `segments`, or [`Located::NOT_FOUND`].
    segment: u32,
    offset: u32,
}

impl Located {
    const NOT_FOUND: u32 = u32::MAX;
}

impl BatchReader {
    /// Replaces the batch with the records at `seqs` (any order; ascending is fastest).
    /// Seqs not readable now are returned as [`ReadError::NotFound`] in their turn.
    pub fn load(&mut self, seqs: &[u64]) {
        self.segments.clear();
        self.located.clear();
        self.pos = 0;
        let next_seq = self.inner.visible_next.load(Ordering::Acquire);
        let mut i = 0;
        while i < seqs.len() {
            let seq = seqs[i];
            let found = if seq < next_seq {
                self.inner.segment_and_end_for(seq)
            } else {
                None
            };
            let Some((segment, end_seq)) = found else {
                self.located.push(Located {
                    seq,
                    segment: Located::NOT_FOUND,
                    offset: 0,
                });
                i += 1;
                continue;
            };
            // Every following seq of this segment is resolved under one lock.
            let slot = u32::try_from(self.segments.len()).unwrap_or(Located::NOT_FOUND);
            {
                let offsets = segment.offsets.read();
                while let Some(&s) = seqs.get(i) {
                    if s < segment.base_seq || s >= end_seq || s >= next_seq {
                        break;
                    }
                    let located = match offsets.get((s - segment.base_seq) as usize) {
                        Some(&offset) => Located {
                            seq: s,
                            segment: slot,
                            offset,
                        },
                        None => Located {
                            seq: s,
                            segment: Located::NOT_FOUND,
                            offset: 0,
                        },
                    };
                    self.located.push(located);
                    i += 1;
                }
            }
            self.segments.push(segment);
        }
    }

    /// Records of the batch not yet returned.
    pub fn remaining(&self) -> usize {
        self.located.len() - self.pos
    }

    /// Asks the CPU to start fetching the record `ahead` entries on, so that its bytes
    /// arrive while the records before it are verified.
    #[inline]
    fn prefetch(&self, ahead: usize) {
        if let Some(l) = self.located.get(self.pos + ahead) {
            if let Some(segment) = self.segments.get(l.segment as usize) {
                let readable = segment.readable();
                // A 200-byte event and its header span four to five cache lines.
                for line in 0..5 {
                    prefetch(readable, l.offset as usize + line * CACHE_LINE_BYTES);
                }
            }
        }
    }
}

impl Iterator for BatchReader {
    type Item = Result<Record, ReadError>;

    fn next(&mut self) -> Option<Self::Item> {
        let l = *self.located.get(self.pos)?;
        if self.pos == 0 {
            for ahead in 0..BATCH_PREFETCH_AHEAD {
                self.prefetch(ahead);
            }
        }
        self.prefetch(BATCH_PREFETCH_AHEAD);
        self.pos += 1;
        let Some(segment) = self.segments.get(l.segment as usize) else {
            return Some(Err(ReadError::NotFound {
                seq: l.seq,
                next_seq: self.inner.visible_next.load(Ordering::Acquire),
            }));
        };
        let offset = l.offset as usize;
        Some(
            self.inner
                .verify_at(segment, segment.readable(), offset, l.seq)
                .map(|payload| Record {
                    seq: l.seq,
                    segment: Arc::clone(segment),
                    payload,
                }),
        )
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining(), Some(self.remaining()))
    }
}

#[cfg(test)]
mod read_tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn options() -> LogOptions {
        LogOptions {
            segment_size_bytes: 64 << 10,
            record_size_bytes_max: 16 << 10,
            preallocate_chunk_bytes: 0,
            ..LogOptions::default()
        }
    }

    fn payload(seq: u64) -> Vec<u8> {
        let len = 50 + (seq * 37 % 300) as usize;
        (0..len).map(|i| (seq as usize * 31 + i) as u8).collect()
    }

    fn filled(n: u64) -> (tempfile::TempDir, Log) {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(dir.path(), options()).unwrap();
        for chunk in (0..n).collect::<Vec<_>>().chunks(7) {
            let payloads: Vec<Vec<u8>> = chunk.iter().map(|&s| payload(s)).collect();
            log.append(&payloads).unwrap();
        }
        assert!(
            log.stats().segment_count >= 3,
            "the test wants several segments"
        );
        (dir, log)
    }

    /// Flips a byte of the payload of record `seq`, in the file under the log's maps.
    fn damage(log: &Log, seq: u64) {
        let segment = log.inner.segment_for(seq).unwrap();
        let offset = segment.offsets.read()[(seq - segment.base_seq) as usize];
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&segment.path)
            .unwrap();
        let at = u64::from(offset) + RECORD_HEADER_SIZE_BYTES as u64 + 3;
        let mut b = [0u8; 1];
        file.read_exact_at(&mut b, at).unwrap();
        file.write_all_at(&[b[0] ^ 0x04], at).unwrap();
        assert!(matches!(log.read(seq), Err(ReadError::Corrupt { .. })));
    }

    #[test]
    fn iteration_serves_every_record_across_segments_and_sees_later_appends() {
        let (_dir, log) = filled(2000);
        let mut it = log.iter_from(0);
        for seq in 0..2000 {
            let r = it.next().unwrap().unwrap();
            assert_eq!((r.seq(), r.payload()), (seq, payload(seq).as_slice()));
        }
        assert!(it.next().is_none());
        // Appended after the iterator caught up: it goes on, into new segments too.
        for seq in 2000..2600 {
            log.append(&[payload(seq)]).unwrap();
        }
        let rest: Vec<u64> = it.by_ref().map(|r| r.unwrap().seq()).collect();
        assert_eq!(rest, (2000..2600).collect::<Vec<_>>());
        let from_middle: Vec<u64> = log.iter_from(1234).map(|r| r.unwrap().seq()).collect();
        assert_eq!(from_middle, (1234..2600).collect::<Vec<_>>());
        assert!(log.iter_from(2600).next().is_none());
        assert!(log.iter_from(u64::MAX).next().is_none());
    }

    #[test]
    fn batch_reader_reads_what_read_reads_in_any_order() {
        let (_dir, log) = filled(2000);
        let mut seqs: Vec<u64> = (0..2000).step_by(13).collect();
        seqs.extend([1999, 0, 0, 700, 5, 2000, 1_000_000, 1998]);
        let mut reader = log.batch_reader();
        reader.load(&seqs);
        assert_eq!(reader.remaining(), seqs.len());
        for &seq in &seqs {
            match reader.next().unwrap() {
                Ok(r) => assert_eq!((r.seq(), r.payload()), (seq, payload(seq).as_slice())),
                Err(ReadError::NotFound { seq: s, next_seq }) => {
                    assert_eq!((s, next_seq), (seq, 2000));
                    assert!(seq >= 2000);
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert!(reader.next().is_none());
        reader.load(&[]);
        assert!(reader.next().is_none());
        reader.load(&[3]);
        assert_eq!(reader.next().unwrap().unwrap().payload(), payload(3));
    }

    #[test]
    fn a_damaged_record_is_never_served_by_any_reader() {
        let (_dir, log) = filled(2000);
        // In a sealed segment, then in the active one.
        for bad in [700, 1990] {
            damage(&log, bad);
            let served: Vec<_> = log.iter_from(bad - 100).collect();
            assert_eq!(served.len(), 101, "iteration stops at the damaged record");
            assert!(served[..100].iter().all(Result::is_ok));
            match &served[100] {
                Err(ReadError::Corrupt { seq, site }) => {
                    assert_eq!(*seq, bad);
                    assert!(site.reason.contains("checksum"), "{}", site.reason);
                }
                other => panic!("{other:?}"),
            }
            let mut reader = log.batch_reader();
            reader.load(&[bad - 1, bad, bad + 1]);
            assert_eq!(reader.next().unwrap().unwrap().seq(), bad - 1);
            assert!(
                matches!(reader.next(), Some(Err(ReadError::Corrupt { seq, .. })) if seq == bad)
            );
            assert_eq!(reader.next().unwrap().unwrap().seq(), bad + 1);
        }
    }
}

#[cfg(test)]
mod syncer_tests {
    use super::*;
    use crate::testing::{CrashFault, SimDisk};

    fn options(durability: Durability) -> LogOptions {
        LogOptions {
            segment_size_bytes: 64 << 10,
            record_size_bytes_max: 1 << 10,
            preallocate_chunk_bytes: 4 << 10,
            durability,
            ..LogOptions::default()
        }
    }

    #[test]
    fn a_syncer_makes_records_durable_up_to_a_seq_once_and_fails_once_the_log_is_gone() {
        let dir = Path::new("/sim/log");
        let disk = SimDisk::new(3);
        let log =
            Log::open_with_storage(disk.clone(), dir, options(Durability::None)).expect("open");
        disk.sync_all_dirs();
        let syncer = log.syncer();
        log.append(&[b"a", b"b", b"c"]).expect("append");
        let wait = Duration::from_secs(10);
        let syncs = log.stats().fsync_count;
        syncer.sync_up_to(2, wait).expect("sync");
        assert_eq!(log.stats().fsync_count, syncs + 1, "one fdatasync");
        syncer.sync_up_to(3, wait).expect("already durable");
        assert_eq!(log.stats().fsync_count, syncs + 1, "nothing more to sync");
        log.append(&[b"d"]).expect("append");
        let disk = disk.crash(CrashFault::DropUnsynced);
        drop(log);
        assert!(
            matches!(syncer.sync_up_to(4, wait), Err(SyncError::Closed)),
            "the log was dropped"
        );
        let log = Log::open_with_storage(disk, dir, options(Durability::None)).expect("reopen");
        assert_eq!(
            log.next_seq(),
            3,
            "what the syncer synced survived the power loss"
        );
    }

    #[test]
    fn a_syncer_needs_no_sync_under_sync_durability_and_reports_a_failed_one() {
        let dir = Path::new("/sim/log");
        let disk = SimDisk::new(4);
        let log =
            Log::open_with_storage(disk.clone(), dir, options(Durability::Sync)).expect("open");
        log.append(&[b"a"]).expect("append");
        let syncs = log.stats().fsync_count;
        let wait = Duration::from_secs(10);
        log.syncer()
            .sync_up_to(1, wait)
            .expect("acknowledged: durable");
        assert_eq!(log.stats().fsync_count, syncs);
        drop(log);

        let log =
            Log::open_with_storage(disk.clone(), dir, options(Durability::None)).expect("reopen");
        log.append(&[b"b"]).expect("append");
        disk.fail_next_fsync();
        let failed = log.syncer().sync_up_to(2, wait);
        assert!(
            matches!(failed, Err(SyncError::Poisoned { .. })),
            "{failed:?}"
        );
        let again = log.syncer().sync_up_to(2, wait);
        assert!(
            matches!(again, Err(SyncError::Poisoned { .. })),
            "never retried: {again:?}"
        );
        assert!(
            log.syncer().sync_up_to(1, wait).is_ok(),
            "seq 0 was durable before"
        );
    }
}
