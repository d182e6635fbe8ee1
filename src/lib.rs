//! # eventlog
//!
//! An embedded, durable event store. This crate is built in layers, each usable and
//! testable on its own:
//!
//! - [`storage`]: the seam all file I/O goes through (real files and memory maps, or a
//!   simulated disk in tests);
//! - [`log`]: the append-only segment log of checksummed records, with group commit and
//!   crash recovery;
//! - [`index`]: secondary indexes in sled (aggregate, type), derived from the log;
//! - [`store`]: the event store API: typed events, optimistic concurrency, reads, live
//!   follow;
//! - [`publisher`]: durable subscriptions with bounded retry and dead letters.
//!
//! What it is not (yet): a networked database. Everything runs in the embedding process.
//!
//! Hard limits: a record's payload is at most 1 GiB (16 MiB by default); a segment is at
//! most 4 GiB - 1 (128 MiB by default); one append fits in one segment.
#![warn(missing_docs)]

mod deadline;
/// Bodies of the cargo-fuzz targets in `fuzz/`, shared with the corpus replay test.
#[doc(hidden)]
pub mod fuzzing;
pub mod hooks;
pub mod index;
pub mod json;
pub mod log;
pub mod metrics;
pub mod publisher;
/// The WebSocket server: appends, reads and live subscriptions over JSON messages, with
/// bearer-token authentication and Prometheus metrics (feature `server`).
#[cfg(feature = "server")]
pub mod server;
pub mod storage;
pub mod store;
/// Test support: a simulated, fault-injecting disk ([`testing::SimDisk`]) for crash tests.
pub mod testing;
