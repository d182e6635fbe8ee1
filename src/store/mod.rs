//! The event store: what an application embeds.
//!
//! A [`Store`] is a [`Log`] of events plus an [`Index`] derived from it. Appends check the
//! aggregate's expected version, encode the events (one log record each) and append them
//! atomically through the log's group commit. Reads go through the index to seqs and then
//! to the log's memory maps; every event read is checked against what the index claimed.
//!
//! Concurrency: appends to the same aggregate are serialized by a striped lock taken for
//! the version check and held until the events are framed in the log; appends to
//! different aggregates run in parallel and share `fdatasync`s. With other appends
//! running, an append lets go of its stripes once framed, so the next append to the same
//! aggregate joins the same or the next group commit instead of waiting for this one's
//! `fdatasync` (see `Stripe`). Such an append fails if the one before it does.

mod codec;
mod error;
pub mod event;
mod verify;

pub use codec::{
    BincodeCodec, Codec, CodecError, DomainEvent, JsonCodec, TypedAppendError, TypedEvent,
    TypedReadError,
};
pub use error::{AppendError, OpenError, ReadError};
pub use event::{ContentType, EventRef, Metadata, NewEvent, RecordedEvent};
pub use verify::{VerifyReport, VERIFY_PROBLEMS_LISTED_MAX};

use crate::hooks::{HookError, PendingAppend, Plugin, Plugins};
use crate::index::{keys, Index, IndexCounters, IndexOpenReport, IndexOptions};
use crate::log::{self, Log, LogOptions, RecoveryReport};
use crate::metrics::{Counter, Histogram};
use crate::storage::{FsStorage, Storage};
use event::{EventHead, Prev, ResolvedEvent};
use parking_lot::{Mutex, MutexGuard};
use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// Default largest event payload: 1 MiB.
pub const PAYLOAD_SIZE_BYTES_MAX_DEFAULT: usize = 1 << 20;
/// Default most events in one append: 10,000.
pub const EVENTS_PER_APPEND_MAX_DEFAULT: usize = 10_000;
/// Bytes an event's encoding may add to its payload, at most (names, ids, metadata are
/// bounded separately): used to size log records.
const EVENT_OVERHEAD_BYTES_MAX: usize = 64 << 10;
/// Most bytes of metadata (ids, keys and values together) one event may carry.
pub const METADATA_SIZE_BYTES_MAX: usize = 32 << 10;
const _: () = assert!(
    METADATA_SIZE_BYTES_MAX + 4 * event::NAME_LEN_BYTES_MAX + 1024 < EVENT_OVERHEAD_BYTES_MAX
);
/// Stripes of the per-aggregate append lock.
const APPEND_LOCK_STRIPES: usize = 256;
/// How many requests ahead of the one being checked an append asks for the names of.
const NAME_PREFETCH_AHEAD: usize = 8;

/// Options for [`Store::open`]. Start from `Options::default()`.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Options {
    /// The log's options (durability, segment size...). Its record and batch limits are
    /// raised as needed to fit the store's limits.
    pub log: LogOptions,
    /// The index's options (lag bound, flush cadence, sled cache).
    pub index: IndexOptions,
    /// Largest event payload. Default 1 MiB.
    pub payload_size_bytes_max: usize,
    /// Most events in one append. Default 10,000.
    pub events_per_append_max: usize,
    /// How long an append may wait for the index to make room. Default 30 s.
    pub append_timeout_ms: u64,
    /// The real directory that holds sled's databases (the index in `index/`, the
    /// publisher's checkpoints in `subscriptions/`). `None` (the default) means the store
    /// directory itself. Set it when the log lives on a simulated disk
    /// ([`Store::open_with_storage`] with a [`crate::testing::SimDisk`]): sled always
    /// writes real files, and since everything in it is derived from the log (or, for
    /// checkpoints, clamped to it), a test may delete it at a simulated crash to model
    /// its loss.
    pub sled_dir: Option<PathBuf>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            log: LogOptions::default(),
            index: IndexOptions::default(),
            payload_size_bytes_max: PAYLOAD_SIZE_BYTES_MAX_DEFAULT,
            events_per_append_max: EVENTS_PER_APPEND_MAX_DEFAULT,
            append_timeout_ms: 30_000,
            sled_dir: None,
        }
    }
}

/// What the caller expects of an aggregate's version before an append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpectedVersion {
    /// No check.
    Any,
    /// The aggregate has no events.
    NoStream,
    /// The aggregate has at least one event.
    Exists,
    /// The aggregate's latest version is exactly this (0 means no events).
    Exact(u64),
}

impl fmt::Display for ExpectedVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExpectedVersion::Any => f.write_str("any"),
            ExpectedVersion::NoStream => f.write_str("no stream"),
            ExpectedVersion::Exists => f.write_str("exists"),
            ExpectedVersion::Exact(v) => write!(f, "{v}"),
        }
    }
}

impl ExpectedVersion {
    fn admits(self, current: u64) -> bool {
        match self {
            ExpectedVersion::Any => true,
            ExpectedVersion::NoStream => current == 0,
            ExpectedVersion::Exists => current > 0,
            ExpectedVersion::Exact(v) => current == v,
        }
    }
}

/// The result of an append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// Seq of the first event appended.
    pub first_seq: u64,
    /// Seq of the last event appended.
    pub last_seq: u64,
    /// The aggregate's version after the append.
    pub last_version: u64,
}

/// Entries a stripe's in-flight map holds before the settled ones are swept out: a small
/// map stays cheap to keep, and its stale entries cost nothing but memory (see [`Stripe`]).
const IN_FLIGHT_SWEEP_AT: usize = 64;

/// One append lock stripe, and the aggregates of its stripe whose last append let go of
/// the lock before the log acknowledged it.
///
/// An append holds the stripes of its aggregates from its version checks until its
/// records are framed in the log. When no other append is running it keeps them until the
/// log has acknowledged the records (and the index has them): the next append then reads
/// the aggregates' versions from the index. Otherwise it lets them go as soon as it is
/// framed, and leaves here each aggregate's version and last seq, so that the next
/// append to it can frame into the same or the next group commit instead of waiting for
/// this one's `fdatasync`. An entry counts while its append is undecided: until the log
/// acknowledges its last seq, or a failed write takes back every seq not yet
/// acknowledged (the log's epoch moves on; an append that used the entry then fails to
/// frame, since it framed in an epoch that ended). Settled entries are ignored, and swept
/// out when the map grows past [`IN_FLIGHT_SWEEP_AT`].
#[derive(Debug, Default)]
struct Stripe {
    in_flight: HashMap<Box<str>, InFlight>,
}

/// Where an aggregate stands after an append that is framed and not yet acknowledged.
#[derive(Debug, Clone, Copy)]
struct InFlight {
    version: u64,
    last_seq: u64,
    /// The log's epoch the append was framed in.
    epoch: u64,
}

impl InFlight {
    /// Whether the append is still undecided, for an appender that read the log's `epoch`
    /// and then its `acked_next`. (A failure in between leaves it looking undecided; the
    /// appender's framing then fails on the epoch.)
    fn is_undecided(&self, epoch: u64, acked_next: u64) -> bool {
        self.epoch == epoch && self.last_seq >= acked_next
    }
}

/// The first request's aggregate whose undecided append (in `in_flight`, by request) this
/// append must wait for, unlocked, before it can go on:
/// - events with ids may retry an append, which must be stored (or have failed) before
///   this one can tell;
/// - an expected version that only holds if the undecided append fails would be a
///   conflict with a version that does not exist yet, and may never: the caller would
///   reload the aggregate, not find it, and retry in vain. Once it is decided, the
///   conflict is real (and names a readable version) or gone.
///
/// An expectation the undecided append satisfies goes on behind it (and fails with it).
fn must_wait_for<'r>(
    requests: &[AppendRequest<'r>],
    in_flight: &[Option<InFlight>],
) -> Option<(&'r str, InFlight)> {
    if in_flight.iter().all(Option::is_none) {
        return None;
    }
    // Each aggregate's version as the requests before see it: a request may name an
    // aggregate an earlier one of the batch appends to.
    let mut versions: HashMap<&str, u64> = HashMap::default();
    for (r, f) in requests.iter().zip(in_flight) {
        let Some(f) = f else { continue };
        let current = versions.entry(r.aggregate_id).or_insert(f.version);
        if r.events.iter().any(|e| e.event_id.is_some()) || !r.expected.admits(*current) {
            return Some((r.aggregate_id, *f));
        }
        *current += r.events.len() as u64;
    }
    None
}

/// Counts an append in [`Inner::appends_running`] while it lives.
struct RunningAppend<'a>(&'a AtomicUsize);

impl<'a> RunningAppend<'a> {
    fn enter(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        RunningAppend(count)
    }
}

impl Drop for RunningAppend<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Where an aggregate's newest event is while an append is being prepared.
#[derive(Debug, Clone, Copy)]
enum Tail {
    /// No events yet.
    None,
    /// Stored at this seq.
    Seq(u64),
    /// The payload with this index in the append being prepared.
    Payload(usize),
}

/// One aggregate's part of a multi-aggregate [`Store::append_batch`].
#[derive(Debug, Clone, Copy)]
pub struct AppendRequest<'a> {
    /// The aggregate.
    pub aggregate_id: &'a str,
    /// Its expected version.
    pub expected: ExpectedVersion,
    /// The events.
    pub events: &'a [NewEvent],
}

/// Reading direction within an aggregate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Oldest first.
    Forward,
    /// Newest first.
    Backward,
}

/// Which events a follower or subscription wants.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Only these event types (`None`: all).
    pub event_types: Option<Vec<String>>,
    /// Only aggregates whose id starts with this.
    pub aggregate_prefix: Option<String>,
}

impl Filter {
    /// Every event.
    pub fn all() -> Self {
        Filter::default()
    }

    /// Only events of these types.
    pub fn types<I: IntoIterator<Item = S>, S: Into<String>>(types: I) -> Self {
        Filter {
            event_types: Some(types.into_iter().map(Into::into).collect()),
            aggregate_prefix: None,
        }
    }

    /// Also require the aggregate id to start with `prefix`.
    pub fn with_aggregate_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.aggregate_prefix = Some(prefix.into());
        self
    }

    /// Whether an event of this aggregate and type passes.
    pub fn matches(&self, aggregate_id: &str, event_type: &str) -> bool {
        self.event_types
            .as_ref()
            .is_none_or(|ts| ts.iter().any(|t| t == event_type))
            && self
                .aggregate_prefix
                .as_ref()
                .is_none_or(|p| aggregate_id.starts_with(p.as_str()))
    }
}

/// A stored event as read: a handle on its bytes in the log's memory map.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    record: log::Record,
}

impl StoredEvent {
    /// The event's global seq.
    #[inline]
    pub fn seq(&self) -> u64 {
        self.record.seq()
    }

    /// The event, borrowed from the map (no copy).
    ///
    /// # Errors
    /// [`ReadError::BadEvent`] if the record is not a decodable event.
    #[inline]
    pub fn event(&self) -> Result<EventRef<'_>, ReadError> {
        match event::decode_fast(self.seq(), self.record.payload()) {
            Some(e) => Ok(e),
            None => Err(self.bad_event()),
        }
    }

    /// Why the record is not a decodable event.
    #[cold]
    #[inline(never)]
    fn bad_event(&self) -> ReadError {
        let reason = match event::decode(self.seq(), self.record.payload()) {
            Err(e) => e.0,
            Ok(_) => "malformed event encoding".into(),
        };
        ReadError::BadEvent {
            seq: self.seq(),
            reason,
        }
    }

    /// The event, copied out.
    ///
    /// # Errors
    /// As [`StoredEvent::event`].
    pub fn to_recorded(&self) -> Result<RecordedEvent, ReadError> {
        Ok(self.event()?.to_owned_event())
    }

    /// The raw encoded event (what `docs/FORMAT.md` describes).
    pub fn raw(&self) -> &[u8] {
        self.record.payload()
    }

    #[inline]
    fn head(&self) -> Result<EventHead<'_>, ReadError> {
        match event::decode_head_fast(self.record.payload()) {
            Some(h) => Ok(h),
            None => Err(self.bad_event()),
        }
    }
}

/// Counts and sizes, from [`Store::stats`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoreStats {
    /// The highest seq stored, `None` when empty.
    pub head_seq: Option<u64>,
    /// Events stored.
    pub event_count: u64,
    /// Aggregates with at least one event.
    pub aggregate_count: u64,
    /// Event types used.
    pub type_count: u64,
    /// Segment files of the log.
    pub segment_count: u64,
    /// Bytes of the log's records and headers.
    pub log_bytes: u64,
    /// Bytes sled reports for the index on disk.
    pub index_disk_bytes: u64,
    /// Events committed but not yet written to sled (served from memory meanwhile).
    pub index_lag_events: u64,
}

/// What opening the store found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenReport {
    /// The log's recovery.
    pub log: RecoveryReport,
    /// The index's catch-up or rebuild.
    pub index: IndexOpenReport,
}

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    /// Where sled's databases live (the store dir unless `Options::sled_dir` says).
    sled_dir: PathBuf,
    storage: Arc<dyn Storage>,
    /// Before `log`, so dropped (its memtable flushed to sled) first: a flush makes the
    /// log durable up to its batch first, which needs the log open.
    index: Index,
    log: Log,
    options: Options,
    stripes: Box<[Mutex<Stripe>]>,
    /// Appends past their checks and not yet returned: with more than one, an append lets
    /// go of its stripes once framed (see [`Stripe`]).
    appends_running: AtomicUsize,
    report: OpenReport,
    plugins: Plugins,
    metrics: StoreMetrics,
}

/// The store's own counters (the log and index keep theirs).
#[derive(Debug)]
struct StoreMetrics {
    appends: Counter,
    append_errors: Counter,
    events_appended: Counter,
    /// Appends that let go of their stripes once framed (see [`Stripe`]).
    appends_unlocked_when_framed: Counter,
    /// Appends that framed behind an undecided append to one of their aggregates.
    appends_behind_undecided: Counter,
    /// Waits for an undecided append to an aggregate, by appends with event ids or with an
    /// expected version only its failure would satisfy.
    waits_for_undecided: Counter,
    bytes_appended: Counter,
    append_us: Histogram,
}

impl Default for StoreMetrics {
    fn default() -> Self {
        StoreMetrics {
            appends: Counter::default(),
            append_errors: Counter::default(),
            events_appended: Counter::default(),
            appends_unlocked_when_framed: Counter::default(),
            appends_behind_undecided: Counter::default(),
            waits_for_undecided: Counter::default(),
            bytes_appended: Counter::default(),
            append_us: Histogram::new(crate::metrics::LATENCY_US_BOUNDS),
        }
    }
}

/// An embedded event store.
///
/// # Examples
/// ```
/// use eventlog::store::{Direction, ExpectedVersion, NewEvent, Options, Store};
/// let dir = tempfile::tempdir()?;
/// let store = Store::open(dir.path(), Options::default())?;
/// let appended = store.append(
///     "order-1",
///     ExpectedVersion::NoStream,
///     &[NewEvent::json_text("OrderPlaced", r#"{"total":12}"#)],
/// )?;
/// assert_eq!((appended.first_seq, appended.last_version), (0, 1));
/// let history: Vec<_> = store
///     .read_aggregate("order-1", 1, Direction::Forward, usize::MAX)?
///     .map(|e| e?.to_recorded())
///     .collect::<Result<_, _>>()?;
/// assert_eq!(history[0].event_type, "OrderPlaced");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

fn stripe_of(aggregate_id: &str) -> usize {
    // FNV-1a: stable and fast; only spreads aggregates over lock stripes.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in aggregate_id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % APPEND_LOCK_STRIPES as u64) as usize
}

fn check_name(what: &'static str, value: &str) -> Result<(), AppendError> {
    event::check_name(value).map_err(|reason| AppendError::InvalidName {
        what,
        value: value.chars().take(300).collect(),
        reason,
    })
}

impl Store {
    /// Opens (creating if needed) the store in `dir`: the log in `dir/log`, the index in
    /// `dir/index`. Recovers the log after a crash, then catches the index up from the
    /// log (or rebuilds it if missing or damaged) before returning.
    ///
    /// # Errors
    /// [`OpenError::Log`] (locked, corrupt, I/O), [`OpenError::Index`],
    /// [`OpenError::InvalidOptions`].
    pub fn open(dir: &Path, options: Options) -> Result<Store, OpenError> {
        Self::open_inner(Arc::new(FsStorage), dir, options, false, Vec::new())
    }

    /// Opens the store like [`Store::open`], with its log (and the publisher's dead
    /// letters) on `storage` instead of the real file system: a
    /// [`crate::testing::SimDisk`] lets a test cut the power and check what survives.
    /// sled's databases stay on the real disk, in [`Options::sled_dir`] (required here
    /// unless `storage` is the real file system).
    ///
    /// # Examples
    /// ```
    /// use eventlog::store::{ExpectedVersion, NewEvent, Options, Store};
    /// use eventlog::testing::SimDisk;
    /// use std::path::Path;
    ///
    /// let sled_dir = tempfile::tempdir()?;
    /// let mut options = Options::default();
    /// options.sled_dir = Some(sled_dir.path().to_path_buf());
    /// options.log.segment_size_bytes = 1 << 20; // the simulated disk holds files in memory
    /// options.payload_size_bytes_max = 4 << 10;
    ///
    /// let disk = SimDisk::new(42);
    /// let store = Store::open_with_storage(disk.clone(), Path::new("/sim/app"), options.clone())?;
    /// disk.sync_all_dirs(); // the directories existed, durably, before the test
    /// store.append("cart-1", ExpectedVersion::NoStream, &[NewEvent::json_text("Added", "{}")])?;
    ///
    /// let (disk, _fault) = disk.crash_random(); // power loss: unsynced writes go wrong
    /// drop(store);
    /// let store = Store::open_with_storage(disk, Path::new("/sim/app"), options)?;
    /// assert_eq!(store.aggregate_version("cart-1")?, 1); // acknowledged, so it survived
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// As [`Store::open`]; [`OpenError::InvalidOptions`] if `storage` is not the real file
    /// system and `options.sled_dir` is `None`.
    pub fn open_with_storage(
        storage: Arc<dyn Storage>,
        dir: &Path,
        options: Options,
    ) -> Result<Store, OpenError> {
        Self::open_inner(storage, dir, options, false, Vec::new())
    }

    /// Opens the store like [`Store::open`] with plugins that run around every append,
    /// in this order (see [`crate::hooks`]).
    ///
    /// # Errors
    /// As [`Store::open`].
    pub fn open_with_plugins(
        dir: &Path,
        options: Options,
        plugins: Vec<Arc<dyn Plugin>>,
    ) -> Result<Store, OpenError> {
        Self::open_inner(Arc::new(FsStorage), dir, options, false, plugins)
    }

    /// Opens the store like [`Store::open`], but first deletes the index so that it is
    /// rebuilt from the log (what `eventlog reindex` does).
    ///
    /// # Errors
    /// As [`Store::open`].
    pub fn open_rebuilding_index(dir: &Path, options: Options) -> Result<Store, OpenError> {
        Self::open_inner(Arc::new(FsStorage), dir, options, true, Vec::new())
    }

    fn open_inner(
        storage: Arc<dyn Storage>,
        dir: &Path,
        options: Options,
        rebuild_index: bool,
        plugins: Vec<Arc<dyn Plugin>>,
    ) -> Result<Store, OpenError> {
        let mut options = options;
        if options.events_per_append_max == 0 || options.payload_size_bytes_max == 0 {
            return Err(OpenError::InvalidOptions(
                "events_per_append_max and payload_size_bytes_max must be at least 1".into(),
            ));
        }
        let record_needed = options
            .payload_size_bytes_max
            .saturating_add(EVENT_OVERHEAD_BYTES_MAX);
        let record_needed = u32::try_from(record_needed)
            .map_err(|_| OpenError::InvalidOptions("payload_size_bytes_max is too large".into()))?;
        options.log.record_size_bytes_max = record_needed;
        options.log.batch_records_max = options
            .log
            .batch_records_max
            .max(options.events_per_append_max);
        let sled_dir = match &options.sled_dir {
            Some(d) => d.clone(),
            None if storage.is_real_file_system() => dir.to_path_buf(),
            None => {
                return Err(OpenError::InvalidOptions(
                    "a store on simulated storage needs options.sled_dir, a real directory \
                     for its sled databases"
                        .into(),
                ))
            }
        };
        let log = Log::open_with_storage(Arc::clone(&storage), dir, options.log.clone())?;
        if rebuild_index {
            // The log's lock is held, so no other process uses the index now.
            let index_dir = sled_dir.join(crate::index::INDEX_DIR_NAME);
            match std::fs::remove_dir_all(&index_dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(OpenError::InvalidOptions(format!(
                        "cannot remove {} to rebuild it: {e}",
                        index_dir.display()
                    )))
                }
            }
        }
        let (index, index_report) = Index::open(&sled_dir, &log, options.index.clone())?;
        let report = OpenReport {
            log: log.recovery_report().clone(),
            index: index_report,
        };
        Ok(Store {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                sled_dir,
                storage,
                log,
                index,
                options,
                stripes: (0..APPEND_LOCK_STRIPES)
                    .map(|_| Mutex::new(Stripe::default()))
                    .collect(),
                appends_running: AtomicUsize::new(0),
                report,
                plugins: Plugins::new(plugins),
                metrics: StoreMetrics::default(),
            }),
        })
    }

    /// What opening found and did: log recovery and index catch-up.
    pub fn open_report(&self) -> &OpenReport {
        &self.inner.report
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The real directory holding sled's databases (see [`Options::sled_dir`]).
    pub fn sled_dir(&self) -> &Path {
        &self.inner.sled_dir
    }

    /// The storage the log lives on (the publisher keeps its dead letters there too).
    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.inner.storage
    }

    /// The underlying log (read-only use: appending to it directly would bypass the index).
    pub fn log(&self) -> &Log {
        &self.inner.log
    }

    /// Appends `events` to `aggregate_id` atomically, if its version is as `expected`.
    ///
    /// Retrying an append whose events all carry ids, after it succeeded (say the caller
    /// timed out), returns the original [`Appended`] and stores nothing.
    ///
    /// `expected` is checked against the aggregate's last append, also one that another
    /// thread has framed and the log not yet made durable: if that append satisfies it,
    /// this one joins the same or the next group commit, and fails if that one does;
    /// otherwise this one waits (up to `Options::append_timeout_ms`) until that append is
    /// stored or has failed, so that a `WrongExpectedVersion` always names a version a
    /// read can see.
    ///
    /// # Errors
    /// [`AppendError::WrongExpectedVersion`], [`AppendError::InvalidName`],
    /// [`AppendError::PayloadTooLarge`], [`AppendError::BadEventCount`],
    /// [`AppendError::DuplicateEventId`], [`AppendError::IndexBehind`],
    /// [`AppendError::EarlierAppendPending`], [`AppendError::Log`] (disk full, poisoned,
    /// I/O). Nothing is stored on error.
    pub fn append(
        &self,
        aggregate_id: &str,
        expected: ExpectedVersion,
        events: &[NewEvent],
    ) -> Result<Appended, AppendError> {
        let mut results = self.append_batch(&[AppendRequest {
            aggregate_id,
            expected,
            events,
        }])?;
        Ok(results.remove(0))
    }

    /// Appends to several aggregates in one atomic write: either every request's events
    /// are stored or none, and every expected version must hold. Returns one [`Appended`]
    /// per request, in order. A request may name the same aggregate as an earlier one; it
    /// then sees that request's events.
    ///
    /// # Errors
    /// As [`Store::append`]; the limit on events counts all requests together.
    pub fn append_batch(
        &self,
        requests: &[AppendRequest<'_>],
    ) -> Result<Vec<Appended>, AppendError> {
        let started = Instant::now();
        let correlation_id = requests
            .first()
            .and_then(|r| r.events.first())
            .and_then(|e| e.metadata.correlation_id.as_deref())
            .unwrap_or("");
        let span = tracing::debug_span!("append", correlation_id, aggregates = requests.len());
        let _entered = span.enter();
        let outcome = if self.inner.plugins.is_empty() {
            self.append_batch_inner(requests)
        } else {
            self.append_with_plugins(requests)
        };
        let m = &self.inner.metrics;
        match &outcome {
            Ok(results) => {
                m.appends.add(1);
                let new: u64 = results
                    .iter()
                    .filter(|r| r.1)
                    .map(|r| r.0.last_seq - r.0.first_seq + 1)
                    .sum();
                m.events_appended.add(new);
                m.bytes_appended.add(
                    requests
                        .iter()
                        .flat_map(|r| r.events)
                        .map(|e| e.payload.len() as u64)
                        .sum(),
                );
                m.append_us.observe(started.elapsed().as_micros() as u64);
            }
            Err(e) => {
                m.append_errors.add(1);
                tracing::debug!(error = %e, "append failed");
            }
        }
        outcome.map(|results| results.into_iter().map(|r| r.0).collect())
    }

    /// Runs the plugins before and after the append.
    fn append_with_plugins(
        &self,
        requests: &[AppendRequest<'_>],
    ) -> Result<Vec<(Appended, bool)>, AppendError> {
        let mut pending: Vec<PendingAppend> = requests
            .iter()
            .map(|r| PendingAppend::new(r.aggregate_id, r.expected, r.events))
            .collect();
        self.inner
            .plugins
            .run_before(&mut pending)
            .map_err(|e| match e {
                HookError::Rejected { plugin, reason } => AppendError::Rejected { plugin, reason },
                HookError::Failed { plugin, message } => {
                    AppendError::PluginFailed { plugin, message }
                }
            })?;
        let requests: Vec<AppendRequest<'_>> = pending
            .iter()
            .map(|p| AppendRequest {
                aggregate_id: p.aggregate_id(),
                expected: p.expected(),
                events: &p.events,
            })
            .collect();
        let results = self.append_batch_inner(&requests)?;
        // after_commit sees the events as stored, read back from the log's maps.
        let mut stored = Vec::new();
        for (appended, new) in &results {
            if *new {
                for seq in appended.first_seq..=appended.last_seq {
                    match self.read_seq(seq) {
                        Ok(e) => stored.push(e),
                        Err(e) => {
                            tracing::error!(seq, error = %e, "reading a committed event for after_commit failed")
                        }
                    }
                }
            }
        }
        let events: Vec<EventRef<'_>> = stored.iter().filter_map(|e| e.event().ok()).collect();
        if !events.is_empty() {
            self.inner.plugins.run_after(&events);
        }
        Ok(results)
    }

    /// The append itself: checks, version control, encoding, the log write. Each result
    /// says whether it stored new events (false: a recognized retry).
    fn append_batch_inner(
        &self,
        requests: &[AppendRequest<'_>],
    ) -> Result<Vec<(Appended, bool)>, AppendError> {
        let inner = &self.inner;
        let total: usize = requests.iter().map(|r| r.events.len()).sum();
        let max = inner.options.events_per_append_max;
        if total > max || requests.iter().any(|r| r.events.is_empty()) || requests.is_empty() {
            return Err(AppendError::BadEventCount { count: total, max });
        }
        let mut index_in_append = 0;
        // Bytes the encoded events will take, about: sizes the one buffer they share.
        let mut encoded_bytes_estimate = 0usize;
        for (ri, r) in requests.iter().enumerate() {
            // The caller's strings are usually cold (ids picked from a large set): ask for
            // those of a few requests ahead, so the misses overlap instead of coming one
            // by one here, where each string is read first.
            if let Some(ahead) = requests.get(ri + NAME_PREFETCH_AHEAD) {
                log::prefetch(ahead.aggregate_id.as_bytes(), 0);
                if let Some(e) = ahead.events.first() {
                    log::prefetch(e.event_type.as_bytes(), 0);
                }
            }
            check_name("aggregate id", r.aggregate_id)?;
            for e in r.events {
                check_name("event type", &e.event_type)?;
                if e.payload.len() > inner.options.payload_size_bytes_max {
                    return Err(AppendError::PayloadTooLarge {
                        index: index_in_append,
                        size_bytes: e.payload.len(),
                        limit_bytes: inner.options.payload_size_bytes_max,
                    });
                }
                let metadata_bytes = e.metadata.len_bytes();
                if metadata_bytes > METADATA_SIZE_BYTES_MAX {
                    return Err(AppendError::MetadataTooLarge {
                        index: index_in_append,
                        size_bytes: metadata_bytes,
                        limit_bytes: METADATA_SIZE_BYTES_MAX,
                    });
                }
                encoded_bytes_estimate += event::encoded_len_estimate(r.aggregate_id, e);
                index_in_append += 1;
            }
        }
        let timeout = Duration::from_millis(inner.options.append_timeout_ms);
        if let Err(cause) = inner.index.wait_for_room(total, timeout) {
            return Err(AppendError::IndexBehind {
                lag_events: inner.index.lag_events(),
                cause,
            });
        }

        let _running = RunningAppend::enter(&inner.appends_running);
        let request_stripes: Vec<usize> =
            requests.iter().map(|r| stripe_of(r.aggregate_id)).collect();
        let mut stripes = request_stripes.clone();
        stripes.sort_unstable();
        stripes.dedup();
        // Which of `guards` holds each request's stripe.
        let guard_of: Vec<usize> = request_stripes
            .iter()
            .map(|&rs| stripes.partition_point(|&s| s < rs))
            .collect();
        let deadline = crate::deadline::deadline_after(Instant::now(), timeout);
        let (mut guards, epoch, in_flight) = loop {
            // Locks are taken in stripe order, so two batches cannot deadlock.
            let guards: Vec<MutexGuard<'_, Stripe>> =
                stripes.iter().map(|&s| inner.stripes[s].lock()).collect();
            // The epoch first: see `InFlight::is_undecided`.
            let epoch = inner.log.epoch();
            let acked_next = inner.log.acked_next();
            let in_flight: Vec<Option<InFlight>> = requests
                .iter()
                .enumerate()
                .map(|(ri, r)| {
                    guards[guard_of[ri]]
                        .in_flight
                        .get(r.aggregate_id)
                        .filter(|f| f.is_undecided(epoch, acked_next))
                        .copied()
                })
                .collect();
            let Some((aggregate_id, f)) = must_wait_for(requests, &in_flight) else {
                break (guards, epoch, in_flight);
            };
            drop(guards);
            inner.metrics.waits_for_undecided.add(1);
            let left = deadline.saturating_duration_since(Instant::now());
            if !inner.log.wait_settled(f.last_seq, f.epoch, left) {
                return Err(AppendError::EarlierAppendPending {
                    aggregate_id: aggregate_id.to_string(),
                    waited_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
                });
            }
        };

        let now = now_us();
        // Where each aggregate touched by this append stands: its version, and where its
        // last event is (stored at a seq, or an earlier payload of this append).
        let mut heads: HashMap<&str, (u64, Tail)> =
            HashMap::with_capacity_and_hasher(requests.len(), Default::default());
        let mut results: Vec<Option<(Appended, bool)>> = vec![None; requests.len()];
        // Every (aggregate, event id) this append stores: an id may appear once per
        // aggregate, also across the requests of one batch.
        let mut ids_placed: HashSet<(&str, Uuid)> = HashSet::default();
        // The events are encoded back to back into one buffer (an allocation per event
        // cost more than the encoding); `ends[i]` is where event `i` of the append ends.
        let mut encoded: Vec<u8> = Vec::with_capacity(encoded_bytes_estimate);
        let mut ends: Vec<usize> = Vec::with_capacity(total);
        // (request index, first payload index, count, last version)
        let mut placed: Vec<(usize, usize, usize, u64)> = Vec::with_capacity(requests.len());
        // Every aggregate's latest version at once (a repeated one is looked up again, and
        // then taken from `heads`): the lookups overlap their cache misses.
        // Seeded (one random UUID) only if some event comes without an id.
        let mut generated_ids: Option<event::GeneratedIds> = None;
        // The index answers for the aggregates with no undecided append (the index may be
        // answering for those while their group commits).
        let names: Vec<&str> = requests
            .iter()
            .zip(&in_flight)
            .filter(|(_, f)| f.is_none())
            .map(|(r, _)| r.aggregate_id)
            .collect();
        if names.len() < requests.len() {
            inner.metrics.appends_behind_undecided.add(1);
        }
        let mut indexed = Vec::with_capacity(names.len());
        inner.index.latest_for_append_many(&names, &mut indexed)?;
        debug_assert_eq!(indexed.len(), names.len(), "one answer per aggregate asked");
        let mut indexed = indexed.into_iter();
        let latest: Vec<Option<(u64, u64)>> = in_flight
            .iter()
            .map(|f| match f {
                Some(f) => Some((f.version, f.last_seq)),
                None => indexed.next().flatten(),
            })
            .collect();
        for (ri, r) in requests.iter().enumerate() {
            let (current, mut tail) = match heads.get(r.aggregate_id) {
                Some(&h) => h,
                None => match latest[ri] {
                    Some((version, seq)) => (version, Tail::Seq(seq)),
                    None => (0, Tail::None),
                },
            };
            // Ids are checked against the stored events (an earlier request of this
            // batch to the same aggregate stored nothing yet).
            let stored_version = latest[ri].map_or(0, |(version, _)| version);
            if stored_version > 0 && r.events.iter().any(|e| e.event_id.is_some()) {
                if let Some(original) = self.find_retry(r, stored_version)? {
                    results[ri] = Some((original, false));
                    continue;
                }
            }
            if !r.expected.admits(current) {
                return Err(AppendError::WrongExpectedVersion {
                    aggregate_id: r.aggregate_id.to_string(),
                    expected: r.expected,
                    actual: current,
                });
            }
            for (i, e) in r.events.iter().enumerate() {
                if let Some(id) = e.event_id {
                    if !ids_placed.insert((r.aggregate_id, id)) {
                        return Err(AppendError::DuplicateEventId {
                            aggregate_id: r.aggregate_id.into(),
                            event_id: id,
                            version: current + 1 + i as u64,
                        });
                    }
                }
            }
            let first_payload = ends.len();
            for (i, e) in r.events.iter().enumerate() {
                let here = ends.len();
                let version = current + 1 + i as u64;
                let prev = match tail {
                    Tail::None => Prev::First,
                    Tail::Seq(seq) => Prev::Seq(seq),
                    Tail::Payload(j) => Prev::Back(u32::try_from(here - j).unwrap_or(u32::MAX)),
                };
                event::encode_into(
                    &mut encoded,
                    &ResolvedEvent {
                        aggregate_id: r.aggregate_id,
                        version,
                        prev,
                        event_id: e.event_id.unwrap_or_else(|| {
                            generated_ids
                                .get_or_insert_with(event::GeneratedIds::new)
                                .next(version)
                        }),
                        timestamp_us: e.timestamp_us.unwrap_or(now),
                        event: e,
                    },
                );
                ends.push(encoded.len());
                tail = Tail::Payload(here);
            }
            let last_version = current + r.events.len() as u64;
            heads.insert(r.aggregate_id, (last_version, tail));
            placed.push((ri, first_payload, r.events.len(), last_version));
        }
        if !ends.is_empty() {
            let mut start = 0;
            let payloads: Vec<&[u8]> = ends
                .iter()
                .map(|&end| {
                    let p = &encoded[start..end];
                    start = end;
                    p
                })
                .collect();
            let framed = inner.log.append_framed(&payloads, Some(epoch))?;
            if inner.appends_running.load(Ordering::Relaxed) > 1 {
                inner.metrics.appends_unlocked_when_framed.add(1);
                let seqs = framed.seqs();
                for &(ri, first, count, last_version) in &placed {
                    let aggregate_id = requests[ri].aggregate_id;
                    let entry = InFlight {
                        version: last_version,
                        last_seq: seqs.start + (first + count) as u64 - 1,
                        epoch,
                    };
                    let map = &mut guards[guard_of[ri]].in_flight;
                    match map.get_mut(aggregate_id) {
                        Some(old) => *old = entry,
                        None => {
                            map.insert(aggregate_id.into(), entry);
                        }
                    }
                }
                let (epoch_now, acked_now) = (inner.log.epoch(), inner.log.acked_next());
                for guard in guards.iter_mut() {
                    if guard.in_flight.len() > IN_FLIGHT_SWEEP_AT {
                        guard
                            .in_flight
                            .retain(|_, f| f.is_undecided(epoch_now, acked_now));
                    }
                }
                drop(guards);
            }
            let seqs = inner.log.wait_appended(framed)?;
            for (ri, first, count, last_version) in placed {
                results[ri] = Some((
                    Appended {
                        first_seq: seqs.start + first as u64,
                        last_seq: seqs.start + (first + count) as u64 - 1,
                        last_version,
                    },
                    true,
                ));
            }
        }
        Ok(results
            .into_iter()
            .map(|r| r.expect("every request is either a retry or was placed in the append"))
            .collect())
    }

    /// If `r` repeats an append already stored (the same events with the same ids, in
    /// order, at a position the expectation admits), the original result. An id used by a
    /// different event is an error. `current` is the aggregate's stored version.
    ///
    /// Costs a lookup per id, not a read of the aggregate's history: see
    /// [`Store::stored_with_id`].
    fn find_retry(
        &self,
        r: &AppendRequest<'_>,
        current: u64,
    ) -> Result<Option<Appended>, AppendError> {
        let mut found: Vec<(usize, u64, u64)> = Vec::new(); // (event index, version, seq)
        let mut same_content = true;
        for (i, asked) in r.events.iter().enumerate() {
            let Some(id) = asked.event_id else {
                continue;
            };
            if let Some(stored) = self
                .stored_with_id(r.aggregate_id, &id, current)
                .map_err(|e| AppendError::Read(Box::new(e)))?
            {
                let e = stored.event().map_err(|e| AppendError::Read(Box::new(e)))?;
                same_content &= e.event_type == asked.event_type
                    && e.payload == asked.payload.as_slice()
                    && e.content_type == asked.content_type;
                found.push((i, e.version, e.seq));
            }
        }
        // In the order they are stored.
        found.sort_unstable_by_key(|&(_, version, _)| version);
        let Some(&(first_index, first_version, first_seq)) = found.first() else {
            return Ok(None);
        };
        let n = r.events.len();
        let is_retry = found.len() == n
            && same_content
            && r.events.iter().all(|e| e.event_id.is_some())
            && found
                .iter()
                .enumerate()
                .all(|(k, &(i, v, _))| i == k && v == first_version + k as u64)
            && first_index == 0
            && r.expected.admits(first_version - 1)
            && first_version + n as u64 - 1 <= current;
        if is_retry {
            let (_, last_version, last_seq) = found[n - 1];
            return Ok(Some(Appended {
                first_seq,
                last_seq,
                last_version,
            }));
        }
        let (i, version, _) = found[0];
        Err(AppendError::DuplicateEventId {
            aggregate_id: r.aggregate_id.to_string(),
            event_id: r.events[i].event_id.unwrap_or_default(),
            version,
        })
    }

    /// The stored event of `aggregate` (at most `current` versions) with id `id`, if any.
    /// The index holds every id except those naming their own event's version (generated
    /// ids, see `docs/FORMAT.md`); an id of that shape is looked for at the version it
    /// names as well. So this is one index lookup and at most one read.
    fn stored_with_id(
        &self,
        aggregate: &str,
        id: &Uuid,
        current: u64,
    ) -> Result<Option<StoredEvent>, ReadError> {
        if let Some(seq) = self.inner.index.event_seq(aggregate, id)? {
            let stored = self.read_seq(seq)?;
            // The head is enough to check the index's claim; the caller decodes the rest.
            let head = stored.head()?;
            if head.aggregate_id != aggregate || head.event_id != *id {
                return Err(ReadError::IndexMismatch {
                    seq,
                    expected: format!("event {id} of aggregate {aggregate:?}"),
                    found: format!(
                        "event {} of aggregate {:?}",
                        head.event_id, head.aggregate_id
                    ),
                });
            }
            return Ok(Some(stored));
        }
        let Some(version) = event::generated_id_version(id).filter(|&v| v <= current) else {
            return Ok(None);
        };
        match self
            .read_aggregate(aggregate, version, Direction::Forward, 1)?
            .next()
        {
            Some(item) => {
                let stored = item?;
                let holds_it = stored.head()?.event_id == *id;
                Ok(holds_it.then_some(stored))
            }
            None => Ok(None),
        }
    }

    /// The stored event of `aggregate_id` whose event id is `event_id`, if any: one index
    /// lookup and at most one read.
    ///
    /// # Errors
    /// [`ReadError::Index`], [`ReadError::Log`] or [`ReadError::IndexMismatch`].
    ///
    /// # Examples
    /// ```
    /// use eventlog::store::{ExpectedVersion, NewEvent, Options, Store};
    /// let dir = tempfile::tempdir()?;
    /// let store = Store::open(dir.path(), Options::default())?;
    /// let id = uuid::Uuid::new_v4();
    /// store.append("order-1", ExpectedVersion::Any, &[NewEvent::json_text("Placed", "{}").with_id(id)])?;
    /// let found = store.read_event_id("order-1", &id)?.expect("stored");
    /// assert_eq!(found.event()?.version, 1);
    /// assert!(store.read_event_id("order-2", &id)?.is_none());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn read_event_id(
        &self,
        aggregate_id: &str,
        event_id: &Uuid,
    ) -> Result<Option<StoredEvent>, ReadError> {
        let current = self.aggregate_version(aggregate_id)?;
        self.stored_with_id(aggregate_id, event_id, current)
    }

    /// Events of `aggregate_id` from `from_version` (1-based; for `Backward`, the newest
    /// version to start from, `u64::MAX` for the end), at most `limit`. Lazy.
    ///
    /// # Errors
    /// [`ReadError::Index`] if the index cannot be read. Items may be
    /// [`ReadError::Log`] (a corrupt record is never returned) or
    /// [`ReadError::IndexMismatch`].
    pub fn read_aggregate(
        &self,
        aggregate_id: &str,
        from_version: u64,
        direction: Direction,
        limit: usize,
    ) -> Result<AggregateEvents, ReadError> {
        let latest = self.inner.index.latest(aggregate_id)?;
        Ok(AggregateEvents {
            store: Arc::clone(&self.inner),
            aggregate_id: aggregate_id.to_string(),
            latest,
            direction,
            next_version: match direction {
                Direction::Forward => from_version.max(1),
                Direction::Backward => latest.map_or(0, |(v, _)| from_version.min(v)),
            },
            buffer: Vec::new(),
            remaining: limit,
            failed: false,
        })
    }

    /// Events of type `event_type` from seq `from_seq` on, at most `limit`. Lazy.
    ///
    /// # Errors
    /// As [`Store::read_aggregate`].
    pub fn read_type(
        &self,
        event_type: &str,
        from_seq: u64,
        limit: usize,
    ) -> Result<TypeEvents, ReadError> {
        let seqs = self.inner.index.type_seqs(event_type, from_seq)?;
        Ok(TypeEvents {
            _store: Arc::clone(&self.inner),
            event_type: event_type.to_string(),
            seqs,
            reader: self.inner.log.batch_reader(),
            batch: Vec::new(),
            pending_error: None,
            seqs_done: false,
            remaining: limit,
        })
    }

    /// All events from seq `from_seq` on, at most `limit`, straight from the log. Lazy.
    pub fn read_all(&self, from_seq: u64, limit: usize) -> AllEvents {
        AllEvents {
            iter: self.inner.log.iter_from(from_seq),
            remaining: limit,
        }
    }

    /// The event with this seq.
    ///
    /// # Errors
    /// [`ReadError::Log`] if it is not there or corrupt.
    pub fn read_seq(&self, seq: u64) -> Result<StoredEvent, ReadError> {
        Ok(StoredEvent {
            record: self.inner.log.read(seq)?,
        })
    }

    /// The latest version of `aggregate_id` (0 if it has no events).
    ///
    /// # Errors
    /// [`ReadError::Index`].
    pub fn aggregate_version(&self, aggregate_id: &str) -> Result<u64, ReadError> {
        Ok(self.inner.index.latest(aggregate_id)?.map_or(0, |(v, _)| v))
    }

    /// Follows the store from `from_seq`: stored events first, then new ones as they are
    /// committed, filtered by `filter`. Holds nothing but a position: dropping it frees
    /// everything.
    pub fn follow(&self, from_seq: u64, filter: Filter) -> Follower {
        Follower {
            store: Arc::clone(&self.inner),
            next_seq: from_seq,
            filter,
            cursor: None,
        }
    }

    /// Waits until the event with seq `seq` is stored, or `timeout` passes; returns
    /// whether it is. Woken by commits.
    pub fn wait_for(&self, seq: u64, timeout: Duration) -> bool {
        self.inner.log.wait_for(seq, timeout)
    }

    /// The next seq to be written (the number of events stored).
    pub fn next_seq(&self) -> u64 {
        self.inner.log.next_seq()
    }

    /// Head, counts and sizes.
    ///
    /// # Errors
    /// [`ReadError::Index`] if the index cannot be read.
    pub fn stats(&self) -> Result<StoreStats, ReadError> {
        let log = self.inner.log.stats();
        let (aggregate_count, type_count) = self.inner.index.counts()?;
        Ok(StoreStats {
            head_seq: log.next_seq.checked_sub(1),
            event_count: log.next_seq,
            aggregate_count,
            type_count,
            segment_count: log.segment_count,
            log_bytes: log.log_bytes,
            index_disk_bytes: self.inner.index.disk_bytes(),
            index_lag_events: self.inner.index.lag_events() as u64,
        })
    }

    /// Every metric of the store in the Prometheus text format: appends, events and bytes
    /// appended, append latency, fsync latency, group-commit sizes, index lag and sled
    /// writes, plugin timings and failures. Servers add their own and expose it.
    pub fn metrics_text(&self) -> String {
        use crate::metrics::render_value;
        let mut out = String::new();
        let m = &self.inner.metrics;
        render_value(
            &mut out,
            "eventlog_appends_total",
            "counter",
            "Successful append calls.",
            m.appends.get(),
        );
        render_value(
            &mut out,
            "eventlog_append_errors_total",
            "counter",
            "Failed append calls (nothing stored).",
            m.append_errors.get(),
        );
        render_value(
            &mut out,
            "eventlog_events_appended_total",
            "counter",
            "Events stored by appends.",
            m.events_appended.get(),
        );
        render_value(
            &mut out,
            "eventlog_appends_unlocked_when_framed_total",
            "counter",
            "Appends that let go of their aggregates' locks once framed, before their sync, because other appends were running.",
            m.appends_unlocked_when_framed.get(),
        );
        render_value(
            &mut out,
            "eventlog_appends_behind_undecided_total",
            "counter",
            "Appends that framed behind an append to one of their aggregates not yet synced (they fail if it does).",
            m.appends_behind_undecided.get(),
        );
        render_value(
            &mut out,
            "eventlog_append_waits_for_undecided_total",
            "counter",
            "Waits for an earlier append to the aggregate to be synced or fail, by appends carrying event ids (a retry is recognized only then) or expecting a version only its failure would give (a conflict is reported only once real).",
            m.waits_for_undecided.get(),
        );
        render_value(
            &mut out,
            "eventlog_bytes_appended_total",
            "counter",
            "Payload bytes passed to successful appends.",
            m.bytes_appended.get(),
        );
        m.append_us.render(
            &mut out,
            "eventlog_append_latency_us",
            "Append call latency, microseconds.",
            "",
        );
        let log = self.inner.log.metrics();
        log.fsync_us.render(
            &mut out,
            "eventlog_fsync_latency_us",
            "fdatasync latency of the log, microseconds.",
            "",
        );
        log.group_commit_records.render(
            &mut out,
            "eventlog_group_commit_records",
            "Records written per group commit.",
            "",
        );
        let stats = self.inner.log.stats();
        render_value(
            &mut out,
            "eventlog_head_seq_next",
            "gauge",
            "The next seq to be written.",
            stats.next_seq,
        );
        render_value(
            &mut out,
            "eventlog_log_bytes",
            "gauge",
            "Bytes of log records and headers.",
            stats.log_bytes,
        );
        render_value(
            &mut out,
            "eventlog_log_segments",
            "gauge",
            "Segment files of the log.",
            stats.segment_count,
        );
        let ix = self.inner.index.counters();
        render_value(
            &mut out,
            "eventlog_index_lag_events",
            "gauge",
            "Events committed but not yet in sled.",
            ix.lag_events,
        );
        render_value(
            &mut out,
            "eventlog_index_sled_writes_total",
            "counter",
            "sled entries written by the indexer.",
            ix.sled_writes,
        );
        render_value(
            &mut out,
            "eventlog_index_sled_reads_total",
            "counter",
            "Latest-version lookups that missed memory and read sled (one bucket each).",
            ix.sled_reads,
        );
        self.inner.plugins.render_metrics(&mut out);
        out
    }

    /// Counters of the index's work (lag, sled batches, writes and reads).
    pub fn index_counters(&self) -> IndexCounters {
        self.inner.index.counters()
    }

    /// Writes the index memtable to sled now (normally done in the background). Under
    /// `Durability::Interval` and `None` this first makes the log durable up to the
    /// events it writes (one `fdatasync` at most): the index never holds an event a power
    /// loss can take from the log.
    ///
    /// # Errors
    /// [`ReadError::Index`] if sled fails, or the log's sync fails (then nothing is
    /// written to sled; see [`crate::index::IndexError::LogSync`]).
    pub fn flush_index(&self) -> Result<(), ReadError> {
        Ok(self.inner.index.flush()?)
    }

    /// Every entry of every index tree: for checking that two indexes are identical.
    ///
    /// # Errors
    /// [`ReadError::Index`].
    #[doc(hidden)]
    pub fn index_dump(&self) -> Result<crate::index::IndexDump, ReadError> {
        Ok(self.inner.index.dump()?)
    }

    /// How many handles (the store, its clones, followers, iterators) share this store.
    #[doc(hidden)]
    pub fn handle_count(&self) -> usize {
        Arc::strong_count(&self.inner)
    }

    /// Drops the store as a crash between the log write and the index update would:
    /// the index memtable is discarded, not written. The log is synced as usual (its own
    /// crash behaviour is tested elsewhere). For tests. Other clones must be dropped first.
    #[doc(hidden)]
    pub fn crash(self) {
        if let Ok(inner) = Arc::try_unwrap(self.inner) {
            let Inner { log, index, .. } = inner;
            index.crash();
            drop(log);
        }
    }
}

/// Iterator over one aggregate's events; see [`Store::read_aggregate`].
///
/// It walks the events' back pointers through the log. Forward, it collects one chunk of
/// at most 64 versions at a time (between two checkpoints), so memory stays bounded;
/// backward, it follows the pointers one by one. It covers the versions that existed
/// when it was created.
#[derive(Debug)]
pub struct AggregateEvents {
    store: Arc<Inner>,
    aggregate_id: String,
    /// The aggregate's latest (version, seq) when the read started.
    latest: Option<(u64, u64)>,
    direction: Direction,
    /// The next version to yield (0 when done backward).
    next_version: u64,
    /// Forward: the rest of the current chunk, newest first (popped from the end).
    buffer: Vec<StoredEvent>,
    remaining: usize,
    failed: bool,
}

impl AggregateEvents {
    /// Reads the event at `seq`, which the index or a back pointer says is `version` of
    /// this aggregate; returns it and its back pointer.
    fn read_link(&self, seq: u64, version: u64) -> Result<(StoredEvent, Option<u64>), ReadError> {
        let stored = StoredEvent {
            record: self.store.log.read(seq)?,
        };
        let head = stored.head()?;
        if head.aggregate_id != self.aggregate_id || head.version != version {
            return Err(ReadError::IndexMismatch {
                seq,
                expected: format!("{} version {version}", self.aggregate_id),
                found: format!("{} version {}", head.aggregate_id, head.version),
            });
        }
        let prev = head.prev.resolve(seq);
        Ok((stored, prev))
    }

    /// The (version, seq) to start a backward walk that reaches `version`: the end of the
    /// chunk holding it (the latest event, or the event just before the next checkpoint).
    fn anchor_for(&self, version: u64) -> Result<Option<(u64, u64)>, ReadError> {
        let Some((latest_version, latest_seq)) = self.latest else {
            return Ok(None);
        };
        let next_checkpoint = keys::chunk_start(version) + keys::AGG_CHECKPOINT_VERSIONS;
        if next_checkpoint > latest_version {
            return Ok(Some((latest_version, latest_seq)));
        }
        match self
            .store
            .index
            .checkpoint(&self.aggregate_id, next_checkpoint)?
        {
            Some(seq) => {
                let (_, prev) = self.read_link(seq, next_checkpoint)?;
                match prev {
                    Some(p) => Ok(Some((next_checkpoint - 1, p))),
                    None => Err(ReadError::IndexMismatch {
                        seq,
                        expected: format!("a back pointer at version {next_checkpoint}"),
                        found: "none".into(),
                    }),
                }
            }
            // No checkpoint: the walk from the latest event still gets there.
            None => Ok(Some((latest_version, latest_seq))),
        }
    }

    /// Fills `buffer` with versions `next_version ..= end of its chunk`.
    fn fill_chunk(&mut self) -> Result<(), ReadError> {
        let Some((mut version, mut seq)) = self.anchor_for(self.next_version)? else {
            return Ok(());
        };
        let mut chunk = Vec::new();
        loop {
            let (stored, prev) = self.read_link(seq, version)?;
            if version <= self.latest.map_or(0, |l| l.0) && version >= self.next_version {
                chunk.push(stored);
            }
            if version == self.next_version {
                break;
            }
            match prev {
                Some(p) => {
                    seq = p;
                    version -= 1;
                }
                None => {
                    return Err(ReadError::IndexMismatch {
                        seq,
                        expected: format!("a back pointer at version {version}"),
                        found: "none".into(),
                    })
                }
            }
        }
        self.buffer = chunk;
        Ok(())
    }

    fn next_forward(&mut self) -> Option<Result<StoredEvent, ReadError>> {
        if self.buffer.is_empty() {
            let latest_version = self.latest?.0;
            if self.next_version > latest_version {
                return None;
            }
            if let Err(e) = self.fill_chunk() {
                return Some(Err(e));
            }
        }
        let e = self.buffer.pop()?;
        self.next_version += 1;
        Some(Ok(e))
    }

    fn next_backward(&mut self) -> Option<Result<StoredEvent, ReadError>> {
        if self.next_version == 0 {
            return None;
        }
        // `buffer` holds at most the one event whose back pointer leads to the next.
        let (version, seq) = match self.buffer.pop() {
            Some(prev_event) => {
                let prev = match prev_event.head() {
                    Ok(h) => h.prev.resolve(prev_event.seq()),
                    Err(e) => return Some(Err(e)),
                };
                match prev {
                    Some(p) => (self.next_version, p),
                    None => return None,
                }
            }
            None => {
                let anchor = match self.anchor_for(self.next_version) {
                    Ok(a) => a?,
                    Err(e) => return Some(Err(e)),
                };
                // Walk from the chunk's end down to the starting version.
                let (mut v, mut s) = anchor;
                while v > self.next_version {
                    match self.read_link(s, v) {
                        Ok((_, Some(p))) => {
                            s = p;
                            v -= 1;
                        }
                        Ok((_, None)) => return None,
                        Err(e) => return Some(Err(e)),
                    }
                }
                (v, s)
            }
        };
        match self.read_link(seq, version) {
            Ok((stored, _)) => {
                self.next_version -= 1;
                self.buffer.push(stored.clone());
                Some(Ok(stored))
            }
            Err(e) => Some(Err(e)),
        }
    }
}

impl Iterator for AggregateEvents {
    type Item = Result<StoredEvent, ReadError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.remaining == 0 || self.failed {
            return None;
        }
        let item = match self.direction {
            Direction::Forward => self.next_forward(),
            Direction::Backward => self.next_backward(),
        }?;
        self.remaining -= 1;
        self.failed = item.is_err();
        Some(item)
    }
}

/// Most seqs [`TypeEvents`] takes from the index at a time: their records are located in
/// the log with one look-up per batch.
const TYPE_READ_BATCH: usize = 256;

/// Iterator over one type's events; see [`Store::read_type`].
///
/// It takes the type's seqs from the index a batch at a time and locates the batch's
/// records in the log at once (one look-up of the segments and their offsets per batch);
/// each record is then verified (checksum, seq) and checked to be of the type the index
/// claimed as it is returned.
#[derive(Debug)]
pub struct TypeEvents {
    /// Keeps the store (index, log) alive while reading, as every reader does.
    _store: Arc<Inner>,
    event_type: String,
    seqs: crate::index::TypeSeqs,
    /// The current batch's records.
    reader: log::BatchReader,
    /// Where the index's seqs are gathered for a batch.
    batch: Vec<u64>,
    /// An index error met while gathering the current batch: returned after its records.
    pending_error: Option<crate::index::IndexError>,
    /// The index has no more seqs.
    seqs_done: bool,
    remaining: usize,
}

impl TypeEvents {
    /// Gathers the next batch of seqs from the index and locates their records.
    fn refill(&mut self) {
        self.batch.clear();
        let want = self.remaining.min(TYPE_READ_BATCH);
        match self.seqs.next_batch(&mut self.batch, want) {
            Ok(()) => self.seqs_done = self.batch.len() < want,
            Err(e) => self.pending_error = Some(e),
        }
        self.reader.load(&self.batch);
    }
}

impl Iterator for TypeEvents {
    type Item = Result<StoredEvent, ReadError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.remaining == 0 {
            return None;
        }
        let record = loop {
            if let Some(r) = self.reader.next() {
                break r;
            }
            if let Some(e) = self.pending_error.take() {
                self.remaining -= 1;
                return Some(Err(e.into()));
            }
            if self.seqs_done {
                return None;
            }
            self.refill();
        };
        self.remaining -= 1;
        let stored = match record {
            Ok(record) => StoredEvent { record },
            Err(e) => return Some(Err(e.into())),
        };
        Some(match stored.head() {
            Ok(h) if h.event_type == self.event_type => Ok(stored),
            Ok(h) => Err(ReadError::IndexMismatch {
                seq: stored.seq(),
                expected: format!("type {}", self.event_type),
                found: format!("type {}", h.event_type),
            }),
            Err(e) => Err(e),
        })
    }
}

/// Iterator over all events from a seq; see [`Store::read_all`].
#[derive(Debug)]
pub struct AllEvents {
    iter: log::LogIter,
    remaining: usize,
}

impl Iterator for AllEvents {
    type Item = Result<StoredEvent, ReadError>;

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        if self.remaining == 0 {
            return None;
        }
        self.remaining -= 1;
        Some(match self.iter.next()? {
            Ok(record) => Ok(StoredEvent { record }),
            Err(e) => Err(e.into()),
        })
    }
}

/// Records a filtered follower skips between two looks at its deadline and interrupt
/// flag: a filter that matches nothing in a long log would otherwise scan all of it
/// before a caller's timeout or stop request is noticed. A look is one clock read and
/// one atomic load, small beside decoding the heads of 1,024 records.
const FOLLOW_SKIPPED_RECORDS_PER_CHECK: u32 = 1_024;

/// A live follower; see [`Store::follow`].
#[derive(Debug)]
pub struct Follower {
    store: Arc<Inner>,
    next_seq: u64,
    filter: Filter,
    /// A cursor over the log from `next_seq`, so catching up walks the segments
    /// sequentially instead of looking every seq up.
    cursor: Option<log::LogIter>,
}

impl Follower {
    /// The next matching event, waiting up to `timeout` for one to be committed.
    /// `Ok(None)` when the timeout passed first, which can also happen while stored
    /// events the filter refuses are being skipped (the follower has moved past those
    /// it looked at; call again to go on).
    ///
    /// # Errors
    /// [`ReadError`] if a record cannot be read; the follower stays at that seq.
    pub fn next_timeout(&mut self, timeout: Duration) -> Result<Option<StoredEvent>, ReadError> {
        self.next_or_interrupt(timeout, None)
    }

    /// Like [`Follower::next_timeout`], but also returns `Ok(None)` early once
    /// `interrupted` is true and [`Log::wake_waiters`] was called (how a subscription's
    /// worker notices a stop request at once), or while skipping stored events the
    /// filter refuses (looked at every 1,024 of them).
    ///
    /// # Errors
    /// As [`Follower::next_timeout`].
    pub fn next_or_interrupt(
        &mut self,
        timeout: Duration,
        interrupted: Option<&std::sync::atomic::AtomicBool>,
    ) -> Result<Option<StoredEvent>, ReadError> {
        // The clock is read only when there is nothing to return at once, or after
        // `FOLLOW_SKIPPED_RECORDS_PER_CHECK` refused records (so a long scan's timeout
        // counts from that first look).
        let mut deadline: Option<Instant> = None;
        let mut skipped: u32 = 0;
        loop {
            let cursor = self
                .cursor
                .get_or_insert_with(|| self.store.log.iter_from(self.next_seq));
            for record in cursor.by_ref() {
                let stored = match record {
                    Ok(record) => StoredEvent { record },
                    Err(e) => {
                        self.cursor = None;
                        return Err(e.into());
                    }
                };
                self.next_seq = stored.seq() + 1;
                if self.filter.event_types.is_none() && self.filter.aggregate_prefix.is_none() {
                    return Ok(Some(stored));
                }
                let head = match stored.head() {
                    Ok(h) => h,
                    Err(e) => {
                        self.next_seq -= 1;
                        self.cursor = None;
                        return Err(e);
                    }
                };
                if self.filter.matches(head.aggregate_id, head.event_type) {
                    return Ok(Some(stored));
                }
                skipped += 1;
                if skipped == FOLLOW_SKIPPED_RECORDS_PER_CHECK {
                    skipped = 0;
                    let now = Instant::now();
                    let deadline = *deadline
                        .get_or_insert_with(|| crate::deadline::deadline_after(now, timeout));
                    if now >= deadline
                        || interrupted.is_some_and(|i| i.load(std::sync::atomic::Ordering::Acquire))
                    {
                        return Ok(None);
                    }
                }
            }
            let now = Instant::now();
            let deadline =
                *deadline.get_or_insert_with(|| crate::deadline::deadline_after(now, timeout));
            if now >= deadline
                || interrupted.is_some_and(|i| i.load(std::sync::atomic::Ordering::Acquire))
            {
                return Ok(None);
            }
            self.store
                .log
                .wait_for_or_wake(self.next_seq, deadline - now);
        }
    }

    /// The seq the follower will look at next.
    pub fn position(&self) -> u64 {
        self.next_seq
    }

    /// Moves the follower to `seq`.
    pub fn seek(&mut self, seq: u64) {
        self.next_seq = seq;
        self.cursor = None;
    }
}

#[cfg(test)]
mod open_tests {
    use super::*;

    /// An open whose catch-up fills the memtable while the indexer cannot write to sled
    /// fails with the indexer's error as soon as the indexer has failed once, instead of
    /// waiting `CATCH_UP_ROOM_WAIT_MAX` (600 s) for room that cannot come. Nothing is
    /// lost: the log is untouched and the next open catches the same events up again.
    #[test]
    fn a_catch_up_stops_at_the_indexers_first_failed_write() {
        let dir = tempfile::tempdir().unwrap();
        let mut options = Options::default();
        options.log.segment_size_bytes = 128 << 10;
        options.log.preallocate_chunk_bytes = 0;
        options.payload_size_bytes_max = 4 << 10;
        options.index.flush_events = 10;
        options.index.lag_events_max = 50;
        {
            let store = Store::open(dir.path(), options.clone()).unwrap();
            for i in 0..200u64 {
                let e = NewEvent::binary("t", i.to_le_bytes().to_vec());
                store
                    .append(&format!("agg-{}", i % 7), ExpectedVersion::Any, &[e])
                    .unwrap();
            }
        }
        // The index is rebuilt from the log at the next open: 200 events to catch up
        // through a memtable of 50.
        std::fs::remove_dir_all(dir.path().join("index")).unwrap();
        let mut failing = options.clone();
        failing.index.fail_flushes = true;
        let err = Store::open(dir.path(), failing).unwrap_err();
        let message = err.to_string();
        assert!(
            message.contains("writing the caught-up index to sled failed")
                && message.contains("injected by a test"),
            "{message}"
        );
        let store = Store::open(dir.path(), options).unwrap();
        assert_eq!(store.next_seq(), 200);
        let versions: u64 = (0..7)
            .map(|a| store.aggregate_version(&format!("agg-{a}")).unwrap())
            .sum();
        assert_eq!(versions, 200);
    }
}

#[cfg(test)]
mod read_tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    const EVENTS: u64 = 6000;

    fn type_of(i: u64) -> String {
        format!("type-{}", i % 5)
    }

    /// A store of `EVENTS` events over several segments; the last ones only in the index
    /// memtable, not yet in sled.
    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let mut options = Options::default();
        options.log.segment_size_bytes = 128 << 10;
        options.log.preallocate_chunk_bytes = 0;
        options.payload_size_bytes_max = 4 << 10;
        options.index.flush_events = 1 << 20;
        options.index.flush_interval_ms = 1 << 30;
        let store = Store::open(dir.path(), options).unwrap();
        let aggs: Vec<String> = (0..37).map(|a| format!("agg-{a}")).collect();
        let events: Vec<NewEvent> = (0..EVENTS)
            .map(|i| NewEvent::binary(type_of(i), i.to_le_bytes().to_vec()))
            .collect();
        for (k, chunk) in events.chunks(50).enumerate() {
            let requests: Vec<AppendRequest<'_>> = chunk
                .iter()
                .enumerate()
                .map(|(j, e)| AppendRequest {
                    aggregate_id: &aggs[(k * 50 + j) % 37],
                    expected: ExpectedVersion::Any,
                    events: std::slice::from_ref(e),
                })
                .collect();
            store.append_batch(&requests).unwrap();
            if k == 40 {
                store.flush_index().unwrap();
            }
        }
        assert!(store.stats().unwrap().segment_count >= 3);
        (dir, store)
    }

    /// Flips a bit in the stored bytes of event `seq`, under the log's maps.
    fn damage(store: &Store, seq: u64) {
        let raw = store.read_seq(seq).unwrap().raw().to_vec();
        for entry in std::fs::read_dir(store.dir().join("log")).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "seg") {
                continue;
            }
            let bytes = std::fs::read(&path).unwrap();
            if let Some(at) = bytes.windows(raw.len()).position(|w| w == raw.as_slice()) {
                let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
                let at = (at + raw.len() - 2) as u64;
                file.write_all_at(&[bytes[at as usize] ^ 0x20], at).unwrap();
                return;
            }
        }
        panic!("event {seq} not found in the segments");
    }

    #[test]
    fn read_type_is_read_all_filtered_from_any_seq_with_any_limit() {
        let (_dir, store) = store();
        let all: Vec<(u64, String)> = store
            .read_all(0, usize::MAX)
            .map(|e| {
                let e = e.unwrap();
                let ev = e.event().unwrap();
                assert_eq!(ev.payload, ev.seq.to_le_bytes());
                (ev.seq, ev.event_type.to_string())
            })
            .collect();
        assert_eq!(all.len() as u64, EVENTS);
        for ty in ["type-0", "type-3"] {
            for from in [0, 1, 777, 2040, 5999, 6000, u64::MAX] {
                for limit in [0, 1, 5, 255, 256, 257, 400, usize::MAX] {
                    let want: Vec<u64> = all
                        .iter()
                        .filter(|(s, t)| *s >= from && t == ty)
                        .map(|(s, _)| *s)
                        .take(limit)
                        .collect();
                    let got: Vec<u64> = store
                        .read_type(ty, from, limit)
                        .unwrap()
                        .map(|e| {
                            let e = e.unwrap();
                            assert_eq!(e.event().unwrap().event_type, ty);
                            e.seq()
                        })
                        .collect();
                    assert_eq!(got, want, "type {ty} from {from} limit {limit}");
                }
            }
        }
        assert_eq!(
            store
                .read_type("no-such-type", 0, usize::MAX)
                .unwrap()
                .count(),
            0
        );
        assert_eq!(store.read_all(5990, 4).count(), 4);
    }

    #[test]
    fn a_damaged_event_is_an_error_in_every_reader_and_never_served() {
        let (_dir, store) = store();
        let bad = 1234;
        damage(&store, bad);
        let all: Vec<_> = store.read_all(0, usize::MAX).collect();
        assert_eq!(all.len() as u64, bad + 1, "the replay stops at the damage");
        assert!(all[..bad as usize].iter().all(Result::is_ok));
        assert!(matches!(
            &all[bad as usize],
            Err(ReadError::Log(log::ReadError::Corrupt { seq, .. })) if *seq == bad
        ));
        // By type: the damaged event is an error in its place, the others are served.
        let ty = type_of(bad);
        let mut seen = 0;
        for item in store.read_type(&ty, 0, usize::MAX).unwrap() {
            match item {
                Ok(e) => {
                    assert_ne!(e.seq(), bad);
                    assert_eq!(e.event().unwrap().event_type, ty);
                }
                Err(ReadError::Log(log::ReadError::Corrupt { seq, .. })) => assert_eq!(seq, bad),
                Err(e) => panic!("{e}"),
            }
            seen += 1;
        }
        assert_eq!(seen, EVENTS / 5);
        let mut follower = store.follow(bad - 3, Filter::types([ty.clone()]));
        let mut before = 0;
        let err = loop {
            match follower.next_timeout(Duration::ZERO) {
                Ok(Some(e)) => {
                    assert!(e.seq() < bad);
                    before += 1;
                }
                Ok(None) => panic!("the follower passed the damage"),
                Err(e) => break e,
            }
        };
        assert_eq!(
            before,
            0,
            "no event of the type between {} and {bad}",
            bad - 3
        );
        assert!(matches!(err, ReadError::Log(log::ReadError::Corrupt { seq, .. }) if seq == bad));
        assert_eq!(follower.position(), bad);
    }
}
