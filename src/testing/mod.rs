//! [`SimDisk`](crate::testing::SimDisk) implements [`Storage`](crate::storage::Storage) in
//! memory. It is deterministic from a seed and tracks what has been synced, so a test can
//! cut the power at any point, crash with a chosen
//! [`CrashFault`](crate::testing::CrashFault) (drop, keep a prefix of, tear, zero-fill,
//! reorder or scatter what was not synced; forget directory entries whose directory was not
//! synced), and check what the log recovers. While running, it injects failing fsyncs, a
//! full disk, short writes and flipped bits on read. [`SimRng`](crate::testing::SimRng) is
//! the seeded generator behind it, handy for tests too.
//!
//! Always compiled (it needs no dependency and costs nothing unless used), so that
//! integration tests and applications embedding the log can test against it.
//!
//! # Examples
//! Crash recovery in a few lines: every append acknowledged under
//! [`Durability::Sync`](crate::log::Durability::Sync) survives the crash, whatever it did
//! to the writes that were not synced.
//! ```
//! use eventlog::log::{Log, LogOptions};
//! use eventlog::testing::SimDisk;
//! use std::path::Path;
//!
//! let dir = Path::new("/sim/store");
//! let mut options = LogOptions::default(); // Durability::Sync
//! options.segment_size_bytes = 16 << 10; // the simulator holds files in memory
//! options.record_size_bytes_max = 1 << 10;
//! options.preallocate_chunk_bytes = 4 << 10;
//!
//! let disk = SimDisk::new(7);
//! let log = Log::open_with_storage(disk.clone(), dir, options.clone())?;
//! // `/sim` and `/sim/store` stand for directories the application made durable before;
//! // make every directory entry durable so that the crash below tests the log's files.
//! disk.sync_all_dirs();
//! let mut acked = Vec::new();
//! for i in 0..300u32 {
//!     if i == 250 {
//!         disk.halt_after_ops(1); // the power goes out in the middle of an append
//!     }
//!     let payload = i.to_le_bytes().repeat(1 + i as usize % 20);
//!     match log.append(&[&payload]) {
//!         Ok(_) => acked.push(payload),
//!         Err(_) => break,
//!     }
//! }
//! let (disk, fault) = disk.crash_random();
//! drop(log); // the log from before the crash: whatever it still tries fails harmlessly
//!
//! let log = Log::open_with_storage(disk.clone(), dir, options)?;
//! assert!(log.next_seq() >= acked.len() as u64, "{fault:?}: {:?}", disk.fault_log());
//! for (seq, payload) in acked.iter().enumerate() {
//!     assert_eq!(log.read(seq as u64)?.payload(), payload.as_slice(), "{fault:?}");
//! }
//! log.append(&[b"and life goes on"])?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod rng;
#[doc(hidden)]
pub mod scenario;
mod simdisk;

pub use rng::SimRng;
pub use simdisk::{
    CrashFault, SimDisk, SIM_FAULT_LOG_LEN_MAX, SIM_FILE_SIZE_BYTES_MAX, SIM_PAGE_SIZE_BYTES,
};
