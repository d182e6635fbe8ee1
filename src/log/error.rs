//! The log's error types: one enum per family of operations.

use std::io;
use std::path::PathBuf;

/// Where a corrupt record was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorruptionSite {
    /// The segment file.
    pub segment: PathBuf,
    /// Byte offset of the record within the segment file.
    pub offset_bytes: u64,
    /// What is wrong with the bytes there.
    pub reason: String,
}

impl std::fmt::Display for CorruptionSite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} at byte {}: {}",
            self.segment.display(),
            self.offset_bytes,
            self.reason
        )
    }
}

/// Errors from [`Log::open`](super::Log::open) and recovery.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// Another process, or another open in this process, holds the log's lock file.
    /// Close the other user of the directory first.
    #[error("log directory {dir} is locked by another process or another open log")]
    Locked {
        /// The log directory.
        dir: PathBuf,
    },
    /// The options are inconsistent. The message says which one and why.
    #[error("invalid log options: {0}")]
    InvalidOptions(String),
    /// Damaged data that is not a torn tail: a bad record followed by valid ones, a bad
    /// record in a sealed segment, or before the recovery point. Nothing was changed.
    /// Restore from a backup, or reopen with `LogOptions::repair` set to quarantine the
    /// damaged part (records from the damage on are lost).
    #[error("log is corrupt at {site}; reopen with repair to quarantine the damaged part")]
    Corrupt {
        /// Where the damage is.
        site: CorruptionSite,
    },
    /// A file is not an eventlog segment, or has an unsupported format version.
    #[error("{path} is not a supported segment file: {reason}")]
    BadSegmentFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Segments are missing in the middle of the log (a gap in sequence numbers).
    #[error("segment files are missing: expected seq {expected} to start {path}")]
    MissingSegment {
        /// The seq the next segment should start at.
        expected: u64,
        /// The segment that starts elsewhere.
        path: PathBuf,
    },
    /// Recovery was about to cut a segment's tail, but reading the tail again gave other
    /// bytes: the disk (or memory) does not return the same data twice, so what looked
    /// torn may be intact. Nothing was cut. Retry the open; if this persists, check the
    /// disk and memory before trusting the machine with the log.
    #[error(
        "two reads of {path} from byte {offset_bytes} disagree; its tail was not cut          (retry the open; if it persists, check the disk)"
    )]
    UnstableRead {
        /// The segment.
        path: PathBuf,
        /// Where the tail that would have been cut starts.
        offset_bytes: u64,
    },
    /// An I/O error while opening or recovering.
    #[error("i/o error on {path} while {action}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What the log was doing.
        action: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

/// Errors from appends.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AppendError {
    /// A record exceeds `LogOptions::record_size_bytes_max`. Nothing was written.
    /// Split the payload, or raise the limit when opening the log.
    #[error("record is {size_bytes} bytes, limit is {limit_bytes} bytes")]
    RecordTooLarge {
        /// The payload size.
        size_bytes: u64,
        /// The configured maximum.
        limit_bytes: u64,
    },
    /// An append of zero records, or more records than one append may hold.
    #[error("an append must hold 1..={max} records, got {count}")]
    BadBatchSize {
        /// Records passed.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// An earlier fsync or write failed, so durability can no longer be promised.
    /// Nothing more is accepted; reopen the log to run recovery.
    #[error("log stopped accepting writes after an earlier failure ({cause}); reopen it")]
    Poisoned {
        /// The original failure.
        cause: String,
    },
    /// The disk is full. Nothing of this append was stored; appends work again once space
    /// is freed.
    #[error("disk full while appending to {path}; free space and retry")]
    DiskFull {
        /// The file being written.
        path: PathBuf,
    },
    /// An I/O error; nothing of this append was acknowledged.
    #[error("i/o error on {path} while {action}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the log was doing.
        action: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The log is closed.
    #[error("log is closed")]
    Closed,
}

/// Errors from reads.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReadError {
    /// The seq has not been written (or is not yet visible).
    #[error("seq {seq} is not in the log (next seq is {next_seq})")]
    NotFound {
        /// The seq asked for.
        seq: u64,
        /// The first seq not yet written.
        next_seq: u64,
    },
    /// The record's bytes are damaged; it is never returned.
    #[error("corrupt record for seq {seq} in {site}")]
    Corrupt {
        /// The seq asked for.
        seq: u64,
        /// Where.
        site: CorruptionSite,
    },
}

/// Errors from [`Log::sync`](super::Log::sync).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SyncError {
    /// The log stopped accepting writes after an earlier failure; reopen it.
    #[error("log stopped accepting writes after an earlier failure ({cause}); reopen it")]
    Poisoned {
        /// The original failure.
        cause: String,
    },
    /// A sync through a handle that outlived its log (the index's, say): nothing was
    /// synced. Reopening the log recovers what it holds.
    #[error("the log was closed before the sync")]
    Closed,
    /// A sync through a handle waited this long for another thread's write or sync of the
    /// active segment (a stalled disk) and did nothing. Retry later.
    #[error("another write or sync held the log's active segment for more than {waited_ms} ms")]
    Busy {
        /// How long it waited.
        waited_ms: u64,
    },
}

pub(crate) fn is_disk_full(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::ENOSPC) || e.kind() == io::ErrorKind::StorageFull
}
