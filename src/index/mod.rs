//! Secondary indexes in sled: aggregate -> (version -> seq), type -> seq, the latest
//! version of each aggregate, and the highest seq indexed. Always rebuildable from the log.
//!
//! # How the index keeps up without slowing appends
//! Committed events enter an in-memory *memtable* straight from the log's commit path
//! ([`crate::log::CommitObserver`]), before their appenders are acknowledged, so a read
//! issued after an append returned always sees it (read-your-writes). A background
//! *indexer* thread moves the memtable into sled in large batches (every
//! `flush_events` events or `flush_interval_ms`), never flushing sled itself: sled's own
//! background flush makes it durable, and after a crash the index catches up from the log.
//! The memtable is bounded (`lag_events_max`); appends wait, with a timeout, while it is
//! full.
//!
//! Readers look at the memtable (and the batch being flushed) first, then sled, and drop
//! duplicates by version or seq, so no event is missed while it moves between them.
//!
//! # Crash safety
//! sled recovers to a prefix of its writes. Each flush writes names (interned ids),
//! postings, and last the `indexed_next` mark; re-applying any suffix is idempotent
//! (positions in aggregate chunks are overwritten, type buckets are unions), and ids are
//! handed out in order of first appearance in the log, so a rebuilt index is byte for byte
//! the index built incrementally.

pub mod keys;

use crate::log::{CommitObserver, Log};
use crate::store::event;
use keys::{agg_chunk_of, agg_key, decode_name_value, name_value, type_key, AGG_CHUNK_VERSIONS, NEXT_ID_KEY, TYPE_BUCKET_BITS};
use parking_lot::{Condvar, Mutex, RwLock};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Name of the index's subdirectory inside a store directory.
pub const INDEX_DIR_NAME: &str = "index";
/// Version of the index layout; a different stored version makes the index rebuild.
pub const INDEX_FORMAT_VERSION: u64 = 1;
const META_FORMAT_KEY: &[u8] = b"format";
const META_INDEXED_NEXT_KEY: &[u8] = b"indexed_next";
/// Events indexed per sled batch while catching up at open.
const CATCH_UP_BATCH_EVENTS: usize = 100_000;

/// Errors of the index layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IndexError {
    /// sled failed. The index is derived data: deleting the index directory makes the
    /// next open rebuild it from the log.
    #[error("index (sled) error in {dir}: {source}")]
    Sled {
        /// The index directory.
        dir: PathBuf,
        /// sled's error.
        #[source]
        source: sled::Error,
    },
    /// A stored index entry does not decode. Delete the index directory to rebuild it.
    #[error("index entry in tree {tree} is malformed; delete {dir} to rebuild the index")]
    Malformed {
        /// The tree.
        tree: &'static str,
        /// The index directory.
        dir: PathBuf,
    },
    /// The log could not be read while catching up.
    #[error("reading the log while catching up the index: {0}")]
    Log(String),
}

/// Tuning of the index; part of the store's options.
#[derive(Debug, Clone)]
pub struct IndexOptions {
    /// Events the memtable may hold before appends wait for the indexer. Default 200,000.
    pub lag_events_max: usize,
    /// The indexer writes to sled once this many events wait. Default 20,000.
    pub flush_events: usize,
    /// ... or once this much time has passed since the last write. Default 100 ms.
    pub flush_interval_ms: u64,
    /// sled's page cache. Default 32 MiB.
    pub cache_bytes: u64,
}

impl Default for IndexOptions {
    fn default() -> Self {
        IndexOptions {
            lag_events_max: 200_000,
            flush_events: 20_000,
            flush_interval_ms: 100,
            cache_bytes: 32 << 20,
        }
    }
}

/// Index entries not yet in sled.
#[derive(Debug, Default)]
struct Memtable {
    /// (version, seq) per aggregate, in version order.
    by_agg: HashMap<Arc<str>, Vec<(u64, u64)>>,
    /// Seqs per type, increasing.
    by_type: HashMap<Arc<str>, Vec<u64>>,
    /// Seqs covered: `first_seq .. next_seq`.
    first_seq: u64,
    next_seq: u64,
    len: usize,
    /// A record that was not a decodable event (the log should only hold events).
    error: Option<String>,
}

impl Memtable {
    fn empty_at(seq: u64) -> Self {
        Memtable {
            first_seq: seq,
            next_seq: seq,
            ..Default::default()
        }
    }

    fn insert(&mut self, seq: u64, payload: &[u8]) {
        debug_assert_eq!(seq, self.next_seq, "memtable must be fed in seq order");
        self.next_seq = seq + 1;
        let head = match event::decode_head(payload) {
            Ok(h) => h,
            Err(e) => {
                self.error.get_or_insert_with(|| format!("record {seq} is not an event: {e}"));
                return;
            }
        };
        match self.by_agg.get_mut(head.aggregate_id) {
            Some(v) => v.push((head.version, seq)),
            None => {
                self.by_agg.insert(Arc::from(head.aggregate_id), vec![(head.version, seq)]);
            }
        }
        match self.by_type.get_mut(head.event_type) {
            Some(v) => v.push(seq),
            None => {
                self.by_type.insert(Arc::from(head.event_type), vec![seq]);
            }
        }
        self.len += 1;
    }
}

#[derive(Debug)]
struct MemState {
    active: Memtable,
    flushing: Option<Arc<Memtable>>,
}

#[derive(Debug)]
struct Trees {
    db: sled::Db,
    aggregates: sled::Tree,
    agg_events: sled::Tree,
    types: sled::Tree,
    type_events: sled::Tree,
    meta: sled::Tree,
}

#[derive(Debug)]
struct Shared {
    dir: PathBuf,
    trees: Trees,
    mem: RwLock<MemState>,
    indexed_next: AtomicU64,
    signal: Mutex<Signal>,
    wake_cv: Condvar,
    room_cv: Condvar,
    options: IndexOptions,
    flushed_batches: AtomicU64,
}

#[derive(Debug, Default)]
struct Signal {
    stop: bool,
    last_error: Option<String>,
}

/// The index: sled trees plus the memtable, and the background indexer.
#[derive(Debug)]
pub struct Index {
    shared: Arc<Shared>,
    indexer: Option<JoinHandle<()>>,
}

/// How opening the index went.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IndexOpenReport {
    /// The index was missing, damaged, from another format, or ahead of the log, and was
    /// rebuilt from seq 0.
    pub rebuilt: bool,
    /// Why it was rebuilt.
    pub rebuild_reason: Option<String>,
    /// Events read from the log to catch up.
    pub caught_up_events: u64,
}

/// The commit observer that feeds the memtable.
#[derive(Debug)]
struct Feed(Arc<Shared>);

impl CommitObserver for Feed {
    fn committed(&self, first_seq: u64, payloads: &[&[u8]]) {
        let len = {
            let mut mem = self.0.mem.write();
            for (i, p) in payloads.iter().enumerate() {
                mem.active.insert(first_seq + i as u64, p);
            }
            mem.active.len
        };
        if len >= self.0.options.flush_events {
            self.0.wake_cv.notify_one();
        }
    }
}

fn sled_err(dir: &Path) -> impl FnOnce(sled::Error) -> IndexError + '_ {
    move |source| IndexError::Sled {
        dir: dir.to_path_buf(),
        source,
    }
}

fn open_trees(dir: &Path, options: &IndexOptions) -> Result<Trees, sled::Error> {
    let db = sled::Config::new()
        .path(dir)
        .cache_capacity(options.cache_bytes)
        .mode(sled::Mode::LowSpace)
        .flush_every_ms(Some(500))
        .open()?;
    Ok(Trees {
        aggregates: db.open_tree("aggregates")?,
        agg_events: db.open_tree("agg_events")?,
        types: db.open_tree("types")?,
        type_events: db.open_tree("type_events")?,
        meta: db.open_tree("meta")?,
        db,
    })
}

impl Index {
    /// Opens the index in `<dir>/index`, rebuilds it if it is missing or damaged, catches
    /// it up from the log, and starts the indexer. Registers itself as the log's commit
    /// observer, so the log must not have one yet and must not be appended to meanwhile.
    ///
    /// # Errors
    /// [`IndexError`] if sled fails even on a fresh directory, or the log cannot be read.
    pub fn open(dir: &Path, log: &Log, options: IndexOptions) -> Result<(Index, IndexOpenReport), IndexError> {
        let index_dir = dir.join(INDEX_DIR_NAME);
        let mut report = IndexOpenReport::default();
        let trees = match open_trees(&index_dir, &options) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(dir = %index_dir.display(), error = %e, "index cannot be opened; rebuilding it from the log");
                report.rebuild_reason = Some(format!("sled could not open it: {e}"));
                let _ = std::fs::remove_dir_all(&index_dir);
                open_trees(&index_dir, &options).map_err(sled_err(&index_dir))?
            }
        };
        let stored_format = trees.meta.get(META_FORMAT_KEY).map_err(sled_err(&index_dir))?;
        let mut indexed_next = match trees.meta.get(META_INDEXED_NEXT_KEY).map_err(sled_err(&index_dir))? {
            Some(v) => u64::from_be_bytes(v.as_ref().try_into().map_err(|_| IndexError::Malformed { tree: "meta", dir: index_dir.clone() })?),
            None => 0,
        };
        let format_ok = stored_format.as_deref() == Some(&INDEX_FORMAT_VERSION.to_be_bytes()[..]);
        let log_next = log.next_seq();
        let empty = trees.aggregates.is_empty() && trees.types.is_empty() && indexed_next == 0;
        let reason = if !format_ok && !empty {
            Some("index format differs".to_string())
        } else if indexed_next > log_next {
            Some(format!("index covers seqs up to {indexed_next}, the log only {log_next}"))
        } else {
            None
        };
        if let Some(reason) = reason.clone() {
            tracing::warn!(dir = %index_dir.display(), %reason, "rebuilding the index from the log");
            for t in [&trees.aggregates, &trees.agg_events, &trees.types, &trees.type_events, &trees.meta] {
                t.clear().map_err(sled_err(&index_dir))?;
            }
            indexed_next = 0;
        }
        if report.rebuild_reason.is_none() {
            report.rebuild_reason = reason;
        }
        report.rebuilt = report.rebuild_reason.is_some() || (indexed_next == 0 && log_next > 0);
        if report.rebuilt && report.rebuild_reason.is_none() {
            report.rebuild_reason = Some("index is empty".into());
        }
        trees.meta.insert(META_FORMAT_KEY, &INDEX_FORMAT_VERSION.to_be_bytes()).map_err(sled_err(&index_dir))?;

        let shared = Arc::new(Shared {
            dir: index_dir,
            trees,
            mem: RwLock::new(MemState {
                active: Memtable::empty_at(indexed_next),
                flushing: None,
            }),
            indexed_next: AtomicU64::new(indexed_next),
            signal: Mutex::new(Signal::default()),
            wake_cv: Condvar::new(),
            room_cv: Condvar::new(),
            options,
            flushed_batches: AtomicU64::new(0),
        });

        // Catch up from the log before anyone reads.
        let started = Instant::now();
        let total = log_next - indexed_next;
        let mut last_log = Instant::now();
        for record in log.iter_from(indexed_next) {
            let record = record.map_err(|e| IndexError::Log(e.to_string()))?;
            let len = {
                let mut mem = shared.mem.write();
                mem.active.insert(record.seq(), record.payload());
                mem.active.len
            };
            report.caught_up_events += 1;
            if len >= CATCH_UP_BATCH_EVENTS {
                shared.flush_once()?;
            }
            if last_log.elapsed() > Duration::from_secs(2) {
                last_log = Instant::now();
                tracing::info!(done = report.caught_up_events, total, "catching the index up from the log");
            }
        }
        shared.flush_once()?;
        if total > 0 {
            tracing::info!(events = report.caught_up_events, seconds = started.elapsed().as_secs_f64(), rebuilt = report.rebuilt, "index caught up from the log");
        }
        if let Err(rejected) = log.set_commit_observer(Arc::new(Feed(Arc::clone(&shared)))) {
            drop(rejected);
            return Err(IndexError::Log("the log already has a commit observer".into()));
        }
        let indexer = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("eventlog-indexer".into())
                .spawn(move || shared.run_indexer())
                .map_err(|e| IndexError::Log(format!("starting the indexer thread: {e}")))?
        };
        Ok((Index { shared, indexer: Some(indexer) }, report))
    }

    /// Seqs below this are in sled (the rest are in the memtable).
    pub fn indexed_next(&self) -> u64 {
        self.shared.indexed_next.load(Ordering::Acquire)
    }

    /// Events in the memtable, not yet in sled.
    pub fn lag_events(&self) -> usize {
        let mem = self.shared.mem.read();
        mem.active.len + mem.flushing.as_ref().map_or(0, |f| f.len)
    }

    /// Number of sled batches written since open.
    pub fn flushed_batches(&self) -> u64 {
        self.shared.flushed_batches.load(Ordering::Relaxed)
    }

    /// Waits until the memtable has room for `events` more, or `timeout` passes.
    /// Returns false on timeout (with the indexer's last error, if any).
    pub fn wait_for_room(&self, events: usize, timeout: Duration) -> Result<(), Option<String>> {
        let max = self.shared.options.lag_events_max;
        if self.lag_events() + events <= max || events > max && self.lag_events() == 0 {
            return Ok(());
        }
        let deadline = Instant::now() + timeout;
        let mut signal = self.shared.signal.lock();
        self.shared.wake_cv.notify_one();
        loop {
            let lag = self.lag_events();
            if lag + events <= max || lag == 0 {
                return Ok(());
            }
            if self.shared.room_cv.wait_until(&mut signal, deadline).timed_out() {
                return Err(signal.last_error.clone());
            }
        }
    }

    /// The latest version of `aggregate`, 0 if it has no events.
    pub fn latest_version(&self, aggregate: &str) -> Result<u64, IndexError> {
        {
            let mem = self.shared.mem.read();
            if let Some(v) = mem.active.by_agg.get(aggregate).and_then(|v| v.last()) {
                return Ok(v.0);
            }
            if let Some(v) = mem.flushing.as_ref().and_then(|f| f.by_agg.get(aggregate)).and_then(|v| v.last()) {
                return Ok(v.0);
            }
        }
        let shared = &self.shared;
        match shared.trees.aggregates.get(aggregate.as_bytes()).map_err(sled_err(&shared.dir))? {
            Some(v) => Ok(decode_name_value(&v).ok_or(IndexError::Malformed { tree: "aggregates", dir: shared.dir.clone() })?.1),
            None => Ok(0),
        }
    }

    /// (version, seq) of `aggregate`'s events from `from_version` on, ascending, or from
    /// `from_version` down, descending. Lazy: sled chunks are read as the iterator goes.
    pub fn aggregate_seqs(&self, aggregate: &str, from_version: u64, backward: bool) -> Result<AggregateSeqs, IndexError> {
        let shared = &self.shared;
        // Memtable first, then sled: an entry moving from one to the other is seen at
        // least once, and duplicates are dropped by version.
        let mut mem_entries: Vec<(u64, u64)> = Vec::new();
        {
            let mem = shared.mem.read();
            if let Some(f) = mem.flushing.as_ref().and_then(|f| f.by_agg.get(aggregate)) {
                mem_entries.extend_from_slice(f);
            }
            if let Some(a) = mem.active.by_agg.get(aggregate) {
                mem_entries.extend_from_slice(a);
            }
        }
        let agg_id = match shared.trees.aggregates.get(aggregate.as_bytes()).map_err(sled_err(&shared.dir))? {
            Some(v) => Some(decode_name_value(&v).ok_or(IndexError::Malformed { tree: "aggregates", dir: shared.dir.clone() })?.0),
            None => None,
        };
        let sled_iter = agg_id.map(|id| -> SledRange {
            let (chunk, _) = agg_chunk_of(from_version.max(1));
            if backward {
                Box::new(shared.trees.agg_events.range(agg_key(id, 0)..=agg_key(id, chunk)).rev())
            } else {
                Box::new(shared.trees.agg_events.range(agg_key(id, chunk)..=agg_key(id, u64::MAX)))
            }
        });
        if backward {
            mem_entries.reverse();
        }
        Ok(AggregateSeqs {
            dir: shared.dir.clone(),
            sled_iter,
            chunk: Vec::new(),
            chunk_pos: 0,
            mem_entries,
            mem_pos: 0,
            from_version,
            backward,
            last_version: None,
        })
    }

    /// Seqs of events of type `event_type` from `from_seq` on, ascending. Lazy.
    pub fn type_seqs(&self, event_type: &str, from_seq: u64) -> Result<TypeSeqs, IndexError> {
        let shared = &self.shared;
        let mut mem_seqs: Vec<u64> = Vec::new();
        {
            let mem = shared.mem.read();
            if let Some(f) = mem.flushing.as_ref().and_then(|f| f.by_type.get(event_type)) {
                mem_seqs.extend(f.iter().filter(|&&s| s >= from_seq));
            }
            if let Some(a) = mem.active.by_type.get(event_type) {
                mem_seqs.extend(a.iter().filter(|&&s| s >= from_seq));
            }
        }
        let type_id = match shared.trees.types.get(event_type.as_bytes()).map_err(sled_err(&shared.dir))? {
            Some(v) => Some(decode_name_value(&v).ok_or(IndexError::Malformed { tree: "types", dir: shared.dir.clone() })?.0),
            None => None,
        };
        let sled_iter = type_id.map(|id| shared.trees.type_events.range(type_key(id, from_seq >> TYPE_BUCKET_BITS)..=type_key(id, u64::MAX)));
        Ok(TypeSeqs {
            dir: shared.dir.clone(),
            sled_iter,
            bucket: Vec::new(),
            bucket_pos: 0,
            mem_seqs,
            mem_pos: 0,
            from_seq,
            last_seq: None,
        })
    }

    /// Number of aggregates and of types that have events.
    pub fn counts(&self) -> Result<(u64, u64), IndexError> {
        let shared = &self.shared;
        let next_id = |tree: &sled::Tree| -> Result<u64, IndexError> {
            Ok(match tree.get(NEXT_ID_KEY).map_err(sled_err(&shared.dir))? {
                Some(v) => u64::from_be_bytes(v.as_ref().try_into().map_err(|_| IndexError::Malformed { tree: "names", dir: shared.dir.clone() })?),
                None => 0,
            })
        };
        let mut aggs = next_id(&shared.trees.aggregates)?;
        let mut types = next_id(&shared.trees.types)?;
        let (new_aggs, new_types): (Vec<Arc<str>>, Vec<Arc<str>>) = {
            let mem = shared.mem.read();
            let mut a: Vec<Arc<str>> = mem.active.by_agg.keys().cloned().collect();
            let mut t: Vec<Arc<str>> = mem.active.by_type.keys().cloned().collect();
            if let Some(f) = &mem.flushing {
                a.extend(f.by_agg.keys().cloned());
                t.extend(f.by_type.keys().cloned());
            }
            a.sort_unstable();
            a.dedup();
            t.sort_unstable();
            t.dedup();
            (a, t)
        };
        for a in new_aggs {
            if !shared.trees.aggregates.contains_key(a.as_bytes()).map_err(sled_err(&shared.dir))? {
                aggs += 1;
            }
        }
        for t in new_types {
            if !shared.trees.types.contains_key(t.as_bytes()).map_err(sled_err(&shared.dir))? {
                types += 1;
            }
        }
        Ok((aggs, types))
    }

    /// Every key and value of every index tree, in order: for comparing two indexes.
    pub fn dump(&self) -> Result<BTreeMap<String, Vec<(Vec<u8>, Vec<u8>)>>, IndexError> {
        self.flush()?;
        let t = &self.shared.trees;
        let mut out = BTreeMap::new();
        for (name, tree) in [("aggregates", &t.aggregates), ("agg_events", &t.agg_events), ("types", &t.types), ("type_events", &t.type_events), ("meta", &t.meta)] {
            let mut entries = Vec::new();
            for kv in tree.iter() {
                let (k, v) = kv.map_err(sled_err(&self.shared.dir))?;
                entries.push((k.to_vec(), v.to_vec()));
            }
            out.insert(name.to_string(), entries);
        }
        Ok(out)
    }

    /// Writes the memtable to sled now (the indexer does this on its own).
    pub fn flush(&self) -> Result<(), IndexError> {
        self.shared.flush_once()
    }

    /// Flushes the memtable and sled itself, and stops the indexer.
    pub fn close(mut self) -> Result<(), IndexError> {
        self.shutdown(true)
    }

    /// Stops the indexer and drops the memtable without writing it: what a crash between
    /// the log write and the index update leaves. For tests.
    #[doc(hidden)]
    pub fn crash(mut self) {
        let _ = self.shutdown(false);
    }

    fn shutdown(&mut self, flush: bool) -> Result<(), IndexError> {
        self.shared.signal.lock().stop = true;
        self.shared.wake_cv.notify_all();
        if let Some(t) = self.indexer.take() {
            let _ = t.join();
        }
        if flush {
            self.shared.flush_once()?;
            self.shared.trees.db.flush().map_err(sled_err(&self.shared.dir))?;
        }
        Ok(())
    }

    /// Events in sled trees on disk: the size of the index directory in bytes.
    pub fn disk_bytes(&self) -> u64 {
        self.shared.trees.db.size_on_disk().unwrap_or(0)
    }
}

impl Drop for Index {
    fn drop(&mut self) {
        if self.indexer.is_some() {
            let _ = self.shutdown(true);
        }
    }
}

impl Shared {
    fn run_indexer(&self) {
        let interval = Duration::from_millis(self.options.flush_interval_ms.max(1));
        loop {
            {
                let mut signal = self.signal.lock();
                if signal.stop {
                    return;
                }
                let pending = self.mem.read().active.len;
                if pending < self.options.flush_events {
                    self.wake_cv.wait_for(&mut signal, interval);
                }
                if signal.stop {
                    return;
                }
            }
            let result = self.flush_once();
            let mut signal = self.signal.lock();
            match result {
                Ok(()) => signal.last_error = None,
                Err(e) => {
                    tracing::error!(error = %e, "index flush failed; will retry");
                    signal.last_error = Some(e.to_string());
                    drop(signal);
                    std::thread::sleep(interval);
                    continue;
                }
            }
            self.room_cv.notify_all();
        }
    }

    /// Moves the active memtable to sled (or retries the batch a failed flush left).
    fn flush_once(&self) -> Result<(), IndexError> {
        let batch = {
            let mut mem = self.mem.write();
            match &mem.flushing {
                Some(f) => Arc::clone(f),
                None => {
                    if mem.active.len == 0 && mem.active.next_seq == mem.active.first_seq {
                        return Ok(());
                    }
                    let next = mem.active.next_seq;
                    let taken = Arc::new(std::mem::replace(&mut mem.active, Memtable::empty_at(next)));
                    mem.flushing = Some(Arc::clone(&taken));
                    taken
                }
            }
        };
        if let Some(e) = &batch.error {
            return Err(IndexError::Log(e.clone()));
        }
        self.apply(&batch)?;
        self.indexed_next.store(batch.next_seq, Ordering::Release);
        self.mem.write().flushing = None;
        self.flushed_batches.fetch_add(1, Ordering::Relaxed);
        self.room_cv.notify_all();
        Ok(())
    }

    fn malformed(&self, tree: &'static str) -> IndexError {
        IndexError::Malformed { tree, dir: self.dir.clone() }
    }

    /// Interns names in order of first appearance; returns name -> id.
    fn intern<'a, I>(&self, tree: &sled::Tree, tree_name: &'static str, names: I) -> Result<(HashMap<&'a str, u64>, sled::Batch), IndexError>
    where
        I: Iterator<Item = (&'a str, u64 /*first seq*/, u64 /*latest version*/)>,
    {
        let mut names: Vec<_> = names.collect();
        names.sort_unstable_by_key(|n| n.1);
        let mut next_id = match tree.get(NEXT_ID_KEY).map_err(sled_err(&self.dir))? {
            Some(v) => u64::from_be_bytes(v.as_ref().try_into().map_err(|_| self.malformed(tree_name))?),
            None => 0,
        };
        let mut ids = HashMap::with_capacity(names.len());
        let mut batch = sled::Batch::default();
        for (name, _, latest) in names {
            let (id, stored_latest) = match tree.get(name.as_bytes()).map_err(sled_err(&self.dir))? {
                Some(v) => decode_name_value(&v).ok_or_else(|| self.malformed(tree_name))?,
                None => {
                    next_id += 1;
                    (next_id - 1, 0)
                }
            };
            batch.insert(name.as_bytes(), &name_value(id, latest.max(stored_latest))[..]);
            ids.insert(name, id);
        }
        batch.insert(NEXT_ID_KEY, &next_id.to_be_bytes()[..]);
        Ok((ids, batch))
    }

    fn apply(&self, m: &Memtable) -> Result<(), IndexError> {
        let t = &self.trees;
        let (agg_ids, agg_names) = self.intern(&t.aggregates, "aggregates", m.by_agg.iter().map(|(k, v)| (k.as_ref(), v[0].1, v[v.len() - 1].0)))?;
        let (type_ids, type_names) = self.intern(&t.types, "types", m.by_type.iter().map(|(k, v)| (k.as_ref(), v[0], 0)))?;

        let mut agg_batch = sled::Batch::default();
        for (name, entries) in &m.by_agg {
            let id = agg_ids[name.as_ref()];
            let mut i = 0;
            while i < entries.len() {
                let (chunk, _) = agg_chunk_of(entries[i].0);
                let key = agg_key(id, chunk);
                let mut seqs = match t.agg_events.get(key).map_err(sled_err(&self.dir))? {
                    Some(v) => keys::decode_seqs_fixed(&v).ok_or_else(|| self.malformed("agg_events"))?,
                    None => Vec::new(),
                };
                while i < entries.len() && agg_chunk_of(entries[i].0).0 == chunk {
                    let (version, seq) = entries[i];
                    let pos = agg_chunk_of(version).1;
                    if pos < seqs.len() {
                        seqs[pos] = seq; // re-applied after a crash: same value
                    } else if pos == seqs.len() {
                        seqs.push(seq);
                    } else {
                        return Err(IndexError::Log(format!(
                            "aggregate {name} jumps to version {version} with {} versions indexed in its chunk",
                            seqs.len()
                        )));
                    }
                    i += 1;
                }
                debug_assert!(seqs.len() as u64 <= AGG_CHUNK_VERSIONS);
                agg_batch.insert(&key[..], keys::encode_seqs_fixed(&seqs));
            }
        }
        let mut type_batch = sled::Batch::default();
        for (name, seqs) in &m.by_type {
            let id = type_ids[name.as_ref()];
            let mut i = 0;
            while i < seqs.len() {
                let bucket = seqs[i] >> TYPE_BUCKET_BITS;
                let key = type_key(id, bucket);
                let mut merged = match t.type_events.get(key).map_err(sled_err(&self.dir))? {
                    Some(v) => keys::decode_seqs_delta(&v).ok_or_else(|| self.malformed("type_events"))?,
                    None => Vec::new(),
                };
                let start = i;
                while i < seqs.len() && seqs[i] >> TYPE_BUCKET_BITS == bucket {
                    i += 1;
                }
                merged.extend_from_slice(&seqs[start..i]);
                merged.sort_unstable();
                merged.dedup();
                type_batch.insert(&key[..], keys::encode_seqs_delta(&merged));
            }
        }
        let err = sled_err(&self.dir);
        t.aggregates.apply_batch(agg_names).map_err(err)?;
        t.types.apply_batch(type_names).map_err(sled_err(&self.dir))?;
        t.agg_events.apply_batch(agg_batch).map_err(sled_err(&self.dir))?;
        t.type_events.apply_batch(type_batch).map_err(sled_err(&self.dir))?;
        t.meta.insert(META_INDEXED_NEXT_KEY, &m.next_seq.to_be_bytes()).map_err(sled_err(&self.dir))?;
        Ok(())
    }
}

type SledRange = Box<dyn Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>> + Send>;

/// Iterator over (version, seq) of one aggregate; see [`Index::aggregate_seqs`].
pub struct AggregateSeqs {
    dir: PathBuf,
    sled_iter: Option<SledRange>,
    /// The current sled chunk's (version, seq), in iteration order.
    chunk: Vec<(u64, u64)>,
    chunk_pos: usize,
    /// Memtable entries, in iteration order.
    mem_entries: Vec<(u64, u64)>,
    mem_pos: usize,
    from_version: u64,
    backward: bool,
    last_version: Option<u64>,
}

impl std::fmt::Debug for AggregateSeqs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AggregateSeqs").field("from_version", &self.from_version).field("backward", &self.backward).finish_non_exhaustive()
    }
}

impl AggregateSeqs {
    fn wanted(&self, version: u64) -> bool {
        let in_range = if self.backward { version <= self.from_version } else { version >= self.from_version };
        let fresh = match self.last_version {
            None => true,
            Some(last) if self.backward => version < last,
            Some(last) => version > last,
        };
        in_range && fresh
    }

    fn next_from_sled(&mut self) -> Option<Result<(u64, u64), IndexError>> {
        loop {
            if let Some(&entry) = self.chunk.get(self.chunk_pos) {
                self.chunk_pos += 1;
                return Some(Ok(entry));
            }
            let (k, v) = match self.sled_iter.as_mut()?.next()? {
                Ok(kv) => kv,
                Err(source) => return Some(Err(IndexError::Sled { dir: self.dir.clone(), source })),
            };
            let malformed = || IndexError::Malformed { tree: "agg_events", dir: self.dir.clone() };
            let Some((_, chunk)) = keys::decode_agg_key(&k) else { return Some(Err(malformed())) };
            let Some(seqs) = keys::decode_seqs_fixed(&v) else { return Some(Err(malformed())) };
            let first_version = chunk * AGG_CHUNK_VERSIONS + 1;
            self.chunk = seqs.iter().enumerate().map(|(i, &s)| (first_version + i as u64, s)).collect();
            if self.backward {
                self.chunk.reverse();
            }
            self.chunk_pos = 0;
        }
    }
}

impl Iterator for AggregateSeqs {
    type Item = Result<(u64, u64), IndexError>;

    fn next(&mut self) -> Option<Self::Item> {
        // Backward: newest first, so the memtable (newer) before sled; forward the reverse.
        loop {
            let item = if self.backward {
                match self.mem_entries.get(self.mem_pos) {
                    Some(&e) => {
                        self.mem_pos += 1;
                        Some(Ok(e))
                    }
                    None => self.next_from_sled(),
                }
            } else {
                match self.next_from_sled() {
                    Some(x) => Some(x),
                    None => self.mem_entries.get(self.mem_pos).map(|&e| {
                        self.mem_pos += 1;
                        Ok(e)
                    }),
                }
            };
            match item? {
                Ok((version, seq)) if self.wanted(version) => {
                    self.last_version = Some(version);
                    return Some(Ok((version, seq)));
                }
                Ok(_) => continue,
                Err(e) => return Some(Err(e)),
            }
        }
    }
}

/// Iterator over seqs of one event type; see [`Index::type_seqs`].
pub struct TypeSeqs {
    dir: PathBuf,
    sled_iter: Option<sled::Iter>,
    bucket: Vec<u64>,
    bucket_pos: usize,
    mem_seqs: Vec<u64>,
    mem_pos: usize,
    from_seq: u64,
    last_seq: Option<u64>,
}

impl std::fmt::Debug for TypeSeqs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TypeSeqs").field("from_seq", &self.from_seq).finish_non_exhaustive()
    }
}

impl Iterator for TypeSeqs {
    type Item = Result<u64, IndexError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let seq = if let Some(&s) = self.bucket.get(self.bucket_pos) {
                self.bucket_pos += 1;
                s
            } else if let Some(kv) = self.sled_iter.as_mut().and_then(|i| i.next()) {
                let (_, v) = match kv {
                    Ok(kv) => kv,
                    Err(source) => return Some(Err(IndexError::Sled { dir: self.dir.clone(), source })),
                };
                match keys::decode_seqs_delta(&v) {
                    Some(seqs) => {
                        self.bucket = seqs;
                        self.bucket_pos = 0;
                        continue;
                    }
                    None => return Some(Err(IndexError::Malformed { tree: "type_events", dir: self.dir.clone() })),
                }
            } else {
                self.sled_iter = None;
                let s = *self.mem_seqs.get(self.mem_pos)?;
                self.mem_pos += 1;
                s
            };
            if seq >= self.from_seq && self.last_seq.is_none_or(|l| seq > l) {
                self.last_seq = Some(seq);
                return Some(Ok(seq));
            }
        }
    }
}
