//! The store's error types.

use super::ExpectedVersion;
use crate::index::IndexError;
use crate::log;

/// Errors from [`Store::open`](super::Store::open).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The log could not be opened or recovered.
    #[error(transparent)]
    Log(#[from] log::OpenError),
    /// The index could not be opened, rebuilt or caught up.
    #[error(transparent)]
    Index(#[from] IndexError),
    /// The options are inconsistent.
    #[error("invalid store options: {0}")]
    InvalidOptions(String),
}

/// Errors from appends. Whatever the error, nothing of the failed append was stored.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AppendError {
    /// The aggregate is not at the expected version. Reload it and decide again.
    #[error("aggregate {aggregate_id}: expected version {expected}, actual version {actual}")]
    WrongExpectedVersion {
        /// The aggregate.
        aggregate_id: String,
        /// What the caller expected.
        expected: ExpectedVersion,
        /// The aggregate's version (0: no events).
        actual: u64,
    },
    /// An aggregate id or event type is empty, too long, or has control characters.
    #[error("invalid {what} {value:?}: {reason}")]
    InvalidName {
        /// "aggregate id" or "event type".
        what: &'static str,
        /// The offending value (cut to 300 bytes).
        value: String,
        /// What is wrong.
        reason: String,
    },
    /// A payload is larger than `Options::payload_size_bytes_max`.
    #[error("payload of event {index} is {size_bytes} bytes, limit is {limit_bytes} bytes")]
    PayloadTooLarge {
        /// Position of the event in the append.
        index: usize,
        /// Its size.
        size_bytes: usize,
        /// The limit.
        limit_bytes: usize,
    },
    /// An event's metadata (correlation and causation ids, keys and values) is larger than
    /// `METADATA_SIZE_BYTES_MAX`. Move large data into the payload.
    #[error("metadata of event {index} is {size_bytes} bytes, limit is {limit_bytes} bytes")]
    MetadataTooLarge {
        /// Position of the event in the append.
        index: usize,
        /// Its size.
        size_bytes: usize,
        /// The limit.
        limit_bytes: usize,
    },
    /// No events, or more than `Options::events_per_append_max`.
    #[error("an append must hold 1..={max} events, got {count}")]
    BadEventCount {
        /// Events passed.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// An event id given by the caller is already used by another event of the aggregate
    /// (and this is not a retry of the same append).
    #[error(
        "event id {event_id} is already used in aggregate {aggregate_id} at version {version}"
    )]
    DuplicateEventId {
        /// The aggregate.
        aggregate_id: String,
        /// The id.
        event_id: uuid::Uuid,
        /// Where it is used.
        version: u64,
    },
    /// An earlier append to the aggregate, still being written, has not been
    /// acknowledged or failed within `Options::append_timeout_ms`, and this append could
    /// not be decided before it was: it carries event ids (whether it retries that one
    /// can only be told once it is stored), or its expected version holds only if that one
    /// fails. Retry later.
    #[error("aggregate {aggregate_id}: an earlier append is still being written after {waited_ms} ms; retry later")]
    EarlierAppendPending {
        /// The aggregate.
        aggregate_id: String,
        /// How long this append waited.
        waited_ms: u64,
    },
    /// The index fell behind by more than `IndexOptions::lag_events_max` and did not catch
    /// up within `Options::append_timeout_ms`. Retry later.
    #[error("index is {lag_events} events behind and did not catch up in time{}", cause.as_ref().map(|c| format!(" ({c})")).unwrap_or_default())]
    IndexBehind {
        /// Events waiting to be indexed.
        lag_events: usize,
        /// The indexer's last error, if it failed.
        cause: Option<String>,
    },
    /// A plugin refused the append.
    #[error("plugin {plugin} rejected the append: {reason}")]
    Rejected {
        /// The plugin's name.
        plugin: String,
        /// Why.
        reason: String,
    },
    /// A plugin panicked or failed while looking at the append.
    #[error("plugin {plugin} failed: {message}")]
    PluginFailed {
        /// The plugin's name.
        plugin: String,
        /// The panic message.
        message: String,
    },
    /// The log refused or failed the write.
    #[error(transparent)]
    Log(#[from] log::AppendError),
    /// The index could not be read to check versions.
    #[error(transparent)]
    Index(#[from] IndexError),
    /// Reading the aggregate's events (to check retried event ids) failed.
    #[error(transparent)]
    Read(#[from] Box<ReadError>),
}

/// Errors from reads.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReadError {
    /// The log could not serve a record (corrupt, or not there).
    #[error(transparent)]
    Log(#[from] log::ReadError),
    /// The index failed.
    #[error(transparent)]
    Index(#[from] IndexError),
    /// A record is not a decodable event.
    #[error("record {seq} is not a valid event: {reason}")]
    BadEvent {
        /// The record.
        seq: u64,
        /// What is wrong.
        reason: String,
    },
    /// The index points at an event that says it is something else: the index is stale or
    /// damaged. Delete the index directory (or run reindex) to rebuild it from the log.
    #[error("index points at seq {seq} for {expected}, but the event there is {found}; rebuild the index")]
    IndexMismatch {
        /// The seq.
        seq: u64,
        /// What the index said.
        expected: String,
        /// What the log has.
        found: String,
    },
}
