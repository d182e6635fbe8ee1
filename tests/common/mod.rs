//! Helpers shared by the integration tests.

use eventlog::log::{Log, LogOptions};
use std::path::Path;

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
