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
