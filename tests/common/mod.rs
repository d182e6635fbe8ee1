//! Helpers shared by the integration tests.

use eventlog::log::{Log, LogOptions};
use eventlog::storage::{FsStorage, LockGuard, MappedRegion, Storage, StorageFile};
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Small segments so tests exercise rolling, preallocation off so files hold only data.
pub fn small_options() -> LogOptions {
    let mut o = LogOptions::default();
    o.segment_size_bytes = 64 << 10;
    o.record_size_bytes_max = 16 << 10;
    o.preallocate_chunk_bytes = 0;
    o
}

/// A payload that differs per seq, so a record at the wrong place is caught.
pub fn payload_for(seq: u64, len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len);
    let mut x = seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.push(x as u8);
    }
    v
}

/// Opens the log, panicking with the error on failure.
pub fn open(dir: &Path, options: LogOptions) -> Log {
    match Log::open(dir, options) {
        Ok(log) => log,
        Err(e) => panic!("open failed: {e}"),
    }
}

/// Copies every file of `from` into `to` (one level of subdirectories): a crash image of a
/// log directory taken while the log is open, since everything written is in the files.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// The segment files of a log directory, sorted.
pub fn segment_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir.join("log"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    v.sort();
    v
}

/// All payloads of the log, in seq order, panicking on any read error.
pub fn all_payloads(log: &Log) -> Vec<Vec<u8>> {
    log.iter_from(0)
        .enumerate()
        .map(|(i, r)| {
            let r = r.unwrap_or_else(|e| panic!("read of seq {i} failed: {e}"));
            assert_eq!(r.seq(), i as u64);
            r.payload().to_vec()
        })
        .collect()
}

/// Store options for tests: small segments, small index batches so flushes happen often.
pub fn store_options() -> eventlog::store::Options {
    let mut o = eventlog::store::Options::default();
    o.log.segment_size_bytes = 4 << 20;
    o.log.preallocate_chunk_bytes = 64 << 10;
    o.index.flush_events = 500;
    o.index.flush_interval_ms = 5;
    o.index.cache_bytes = 4 << 20;
    o
}

/// Opens a store, panicking with the error on failure.
pub fn open_store(dir: &Path) -> eventlog::store::Store {
    eventlog::store::Store::open(dir, store_options())
        .unwrap_or_else(|e| panic!("store open failed: {e}"))
}

/// An aggregate's history as (version, seq, type, payload).
pub fn history(
    store: &eventlog::store::Store,
    aggregate: &str,
) -> Vec<(u64, u64, String, Vec<u8>)> {
    store
        .read_aggregate(
            aggregate,
            1,
            eventlog::store::Direction::Forward,
            usize::MAX,
        )
        .unwrap()
        .map(|e| {
            let e = e.unwrap().to_recorded().unwrap();
            (e.version, e.seq, e.event_type, e.payload)
        })
        .collect()
}

/// The real file system, except that while `full` is set, growing a file fails with ENOSPC
/// (a write that would grow it lands only its first half, as a real short write can).
#[derive(Debug, Default)]
pub struct FullDisk {
    pub full: Arc<AtomicBool>,
    /// While set, every fdatasync fails with EIO.
    pub fsync_fails: Arc<AtomicBool>,
    /// While closed, every fdatasync waits for it to open (see [`SyncGate`]).
    pub sync_gate: Arc<SyncGate>,
    /// Whether the log may treat it as the real file system (its commit helper and
    /// preallocation thread run only there); by default it does not.
    pub real_fs: bool,
}

#[derive(Debug)]
struct FullDiskFile {
    file: Arc<dyn StorageFile>,
    full: Arc<AtomicBool>,
    fsync_fails: Arc<AtomicBool>,
    sync_gate: Arc<SyncGate>,
}

/// Holds fdatasyncs while closed, so a test can keep a group commit in flight and look
/// at what other appends do meanwhile. Opens by itself after [`SyncGate::HOLD_MAX`], so a
/// failing test cannot hang.
#[derive(Debug, Default)]
pub struct SyncGate {
    /// (closed, syncs waiting)
    state: std::sync::Mutex<(bool, usize)>,
    cv: std::sync::Condvar,
}

impl SyncGate {
    pub const HOLD_MAX: std::time::Duration = std::time::Duration::from_secs(30);

    pub fn close(&self) {
        self.state.lock().unwrap().0 = true;
    }

    pub fn open(&self) {
        self.state.lock().unwrap().0 = false;
        self.cv.notify_all();
    }

    /// Waits until `count` syncs are held; false if that takes longer than 10 s.
    pub fn wait_held(&self, count: usize) -> bool {
        let st = self.state.lock().unwrap();
        let (st, _) = self
            .cv
            .wait_timeout_while(st, std::time::Duration::from_secs(10), |st| st.1 < count)
            .unwrap();
        st.1 >= count
    }

    fn pass(&self) {
        let mut st = self.state.lock().unwrap();
        if !st.0 {
            return;
        }
        st.1 += 1;
        self.cv.notify_all();
        let (mut st, _) = self
            .cv
            .wait_timeout_while(st, Self::HOLD_MAX, |st| st.0)
            .unwrap();
        st.1 -= 1;
    }
}

/// ENOSPC on Linux ("No space left on device").
const ENOSPC: i32 = 28;

fn enospc() -> io::Error {
    io::Error::from_raw_os_error(ENOSPC)
}

impl Storage for FullDisk {
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        FsStorage.create_dir_all(path)
    }
    fn list_dir(&self, path: &Path) -> io::Result<Vec<String>> {
        FsStorage.list_dir(path)
    }
    fn open_file(&self, path: &Path, create: bool) -> io::Result<Arc<dyn StorageFile>> {
        if create && self.full.load(Ordering::SeqCst) && !path.exists() {
            return Err(enospc());
        }
        let file = FsStorage.open_file(path, create)?;
        Ok(Arc::new(FullDiskFile {
            file,
            full: self.full.clone(),
            fsync_fails: self.fsync_fails.clone(),
            sync_gate: self.sync_gate.clone(),
        }))
    }
    fn exists(&self, path: &Path) -> io::Result<bool> {
        FsStorage.exists(path)
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        FsStorage.remove_file(path)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        FsStorage.rename(from, to)
    }
    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        FsStorage.sync_dir(path)
    }
    fn try_lock(&self, path: &Path) -> io::Result<Option<Box<dyn LockGuard>>> {
        FsStorage.try_lock(path)
    }
    fn is_real_file_system(&self) -> bool {
        self.real_fs
    }
}

impl StorageFile for FullDiskFile {
    fn len_bytes(&self) -> io::Result<u64> {
        self.file.len_bytes()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let len = self.file.len_bytes()?;
        if self.full.load(Ordering::SeqCst) && offset + buf.len() as u64 > len {
            let half = buf.len() / 2;
            self.file.write_at(&buf[..half], offset)?;
            return Err(enospc());
        }
        self.file.write_at(buf, offset)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.sync_gate.pass();
        if self.fsync_fails.load(Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(5));
        }
        self.file.sync_data()
    }
    fn set_len(&self, len_bytes: u64) -> io::Result<()> {
        self.file.set_len(len_bytes)
    }
    fn allocate(&self, len_bytes: u64) -> io::Result<()> {
        if self.full.load(Ordering::SeqCst) && len_bytes > self.file.len_bytes()? {
            return Err(enospc());
        }
        self.file.allocate(len_bytes)
    }
    fn map(&self, len_bytes: u64) -> io::Result<Arc<dyn MappedRegion>> {
        self.file.map(len_bytes)
    }
}
