//! Dead-letter segments: events a subscription gave up on, kept where a person can see
//! them and send them again.
//!
//! Each subscription's dead letters are a [`Log`] of their own in
//! `<dir>/deadletter/<subscription>/log/`, in the main log's checksummed record format and
//! with its crash recovery. Records are serde + bincode with a version byte: an `Entry` when
//! an event is parked, `Updated` when a redrive failed again, `Resolved` when a redrive
//! succeeded or the entry was purged. The live entries are rebuilt from the records at open.
//!
//! Bounded: past `entries_max` live entries or `size_bytes_max` bytes, the oldest whole
//! segments are dropped first (FIFO); the live entries dropped are counted as evicted,
//! logged, and the count is kept durably.

use crate::log::{Durability, Log, LogOptions};
use crate::storage::Storage;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::PublishError;

/// Version byte of dead-letter records.
const DEAD_LETTER_FORMAT_VERSION: u8 = 1;
/// Longest error text kept with a dead letter, in bytes.
pub const ERROR_TEXT_BYTES_MAX: usize = 4096;

/// Bounds of a subscription's dead letters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterOptions {
    /// Most live dead letters kept. Default 100,000.
    pub entries_max: u64,
    /// Most bytes of dead-letter segments kept. Default 64 MiB.
    pub size_bytes_max: u64,
    /// Size of one dead-letter segment: eviction drops whole segments, so this is also
    /// the granularity of the bounds. Default 1 MiB.
    pub segment_size_bytes: u64,
}

impl Default for DeadLetterOptions {
    fn default() -> Self {
        DeadLetterOptions {
            entries_max: 100_000,
            size_bytes_max: 64 << 20,
            segment_size_bytes: 1 << 20,
        }
    }
}

/// An event a subscription gave up on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// Position of this dead letter in the subscription's dead-letter log.
    pub id: u64,
    /// The event's seq in the store.
    pub seq: u64,
    /// Its aggregate.
    pub aggregate_id: String,
    /// Its version.
    pub version: u64,
    /// Its type.
    pub event_type: String,
    /// Delivery attempts made so far (redrives included).
    pub attempts: u32,
    /// The last error the handler reported.
    pub last_error: String,
    /// When delivery first failed, microseconds since the epoch.
    pub first_failure_us: i64,
    /// When delivery last failed.
    pub last_failure_us: i64,
    /// A redrive was requested (say by `eventlog deadletters redrive`) and the running
    /// subscription has not tried it yet.
    pub redrive_requested: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
enum DeadLetterRecord {
    Entry(DeadLetter),
    Updated {
        id: u64,
        attempts: u32,
        last_error: String,
        last_failure_us: i64,
    },
    Resolved {
        id: u64,
    },
    RedriveRequested {
        id: u64,
    },
}

fn encode(r: &DeadLetterRecord) -> Vec<u8> {
    let mut out = vec![DEAD_LETTER_FORMAT_VERSION];
    if let Err(e) = bincode::serialize_into(&mut out, r) {
        unreachable!("encoding a dead letter into memory failed: {e}");
    }
    out
}

fn decode(bytes: &[u8]) -> Option<DeadLetterRecord> {
    match bytes.split_first() {
        Some((&DEAD_LETTER_FORMAT_VERSION, rest)) => bincode::deserialize(rest).ok(),
        _ => None,
    }
}

/// Cuts an error text to [`ERROR_TEXT_BYTES_MAX`] at a character boundary.
pub(crate) fn clip_error(text: &str) -> String {
    if text.len() <= ERROR_TEXT_BYTES_MAX {
        return text.to_string();
    }
    let mut end = ERROR_TEXT_BYTES_MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

/// One subscription's dead letters.
#[derive(Debug)]
pub struct DeadLetters {
    log: Log,
    dir: PathBuf,
    entries: BTreeMap<u64, DeadLetter>,
    /// Store seq -> how many live entries hold it (normally one).
    parked_seqs: HashMap<u64, u32>,
    options: DeadLetterOptions,
    evicted: u64,
}

impl DeadLetters {
    /// Opens (creating) the dead letters in `dir` (`<store>/deadletter/<subscription>`),
    /// with `evicted` entries already counted as lost.
    ///
    /// # Errors
    /// [`PublishError::DeadLetters`] if the log cannot be opened or holds a record that is
    /// not a dead letter.
    pub fn open(
        storage: Arc<dyn Storage>,
        dir: &Path,
        options: DeadLetterOptions,
        evicted: u64,
    ) -> Result<DeadLetters, PublishError> {
        let mut log_options = LogOptions::default();
        log_options.durability = Durability::Sync;
        log_options.segment_size_bytes = options
            .segment_size_bytes
            .max(crate::log::SEGMENT_SIZE_BYTES_MIN);
        log_options.record_size_bytes_max = (log_options.segment_size_bytes / 2) as u32;
        log_options.preallocate_chunk_bytes = 0;
        let err = |e: String| PublishError::DeadLetters {
            dir: dir.to_path_buf(),
            message: e,
        };
        let log =
            Log::open_with_storage(storage, dir, log_options).map_err(|e| err(e.to_string()))?;
        let mut entries = BTreeMap::new();
        for record in log.iter_from(log.first_seq()) {
            let record = record.map_err(|e| err(e.to_string()))?;
            match decode(record.payload()) {
                Some(DeadLetterRecord::Entry(mut d)) => {
                    d.id = record.seq();
                    entries.insert(d.id, d);
                }
                Some(DeadLetterRecord::Updated {
                    id,
                    attempts,
                    last_error,
                    last_failure_us,
                }) => {
                    if let Some(d) = entries.get_mut(&id) {
                        d.attempts = attempts;
                        d.last_error = last_error;
                        d.last_failure_us = last_failure_us;
                        d.redrive_requested = false;
                    }
                }
                Some(DeadLetterRecord::RedriveRequested { id }) => {
                    if let Some(d) = entries.get_mut(&id) {
                        d.redrive_requested = true;
                    }
                }
                Some(DeadLetterRecord::Resolved { id }) => {
                    entries.remove(&id);
                }
                None => return Err(err(format!("record {} is not a dead letter", record.seq()))),
            }
        }
        let mut parked_seqs = HashMap::new();
        for d in entries.values() {
            *parked_seqs.entry(d.seq).or_insert(0) += 1;
        }
        Ok(DeadLetters {
            log,
            dir: dir.to_path_buf(),
            entries,
            parked_seqs,
            options,
            evicted,
        })
    }

    /// Parks an event. Returns its dead-letter id and how many older entries the bounds
    /// evicted to make room.
    ///
    /// # Errors
    /// [`PublishError::DeadLetters`] if the write fails (the caller must not move past
    /// the event then).
    pub fn park(&mut self, mut entry: DeadLetter) -> Result<(u64, u64), PublishError> {
        entry.last_error = clip_error(&entry.last_error);
        let id = self.append(&DeadLetterRecord::Entry(entry.clone()))?;
        entry.id = id;
        *self.parked_seqs.entry(entry.seq).or_insert(0) += 1;
        self.entries.insert(id, entry);
        let evicted = self.enforce_bounds()?;
        Ok((id, evicted))
    }

    /// Records that entry `id` failed again.
    ///
    /// # Errors
    /// [`PublishError::DeadLetters`] if the write fails.
    pub fn update(
        &mut self,
        id: u64,
        attempts: u32,
        last_error: &str,
        now_us: i64,
    ) -> Result<(), PublishError> {
        let last_error = clip_error(last_error);
        self.append(&DeadLetterRecord::Updated {
            id,
            attempts,
            last_error: last_error.clone(),
            last_failure_us: now_us,
        })?;
        if let Some(d) = self.entries.get_mut(&id) {
            d.attempts = attempts;
            d.last_error = last_error;
            d.last_failure_us = now_us;
            d.redrive_requested = false;
        }
        Ok(())
    }

    /// Marks entries for redelivery by the subscription when it runs (next time it is
    /// idle). Returns the ids marked; unknown ids are skipped.
    ///
    /// # Errors
    /// [`PublishError::DeadLetters`] if the write fails.
    pub fn request_redrive(&mut self, ids: &[u64]) -> Result<Vec<u64>, PublishError> {
        let mut marked = Vec::new();
        for &id in ids {
            if self.entries.get(&id).is_some_and(|d| !d.redrive_requested) {
                self.append(&DeadLetterRecord::RedriveRequested { id })?;
                if let Some(d) = self.entries.get_mut(&id) {
                    d.redrive_requested = true;
                }
                marked.push(id);
            }
        }
        Ok(marked)
    }

    /// Entries marked by [`DeadLetters::request_redrive`], oldest first.
    pub fn redrive_requested(&self) -> Vec<DeadLetter> {
        self.entries
            .values()
            .filter(|d| d.redrive_requested)
            .cloned()
            .collect()
    }

    /// Removes entry `id` (delivered by a redrive, or purged).
    ///
    /// # Errors
    /// [`PublishError::DeadLetters`] if the write fails.
    pub fn resolve(&mut self, id: u64) -> Result<(), PublishError> {
        if self.entries.contains_key(&id) {
            self.append(&DeadLetterRecord::Resolved { id })?;
            self.remove_entry(id);
        }
        Ok(())
    }

    /// The live entries, oldest first.
    pub fn list(&self) -> Vec<DeadLetter> {
        self.entries.values().cloned().collect()
    }

    /// Whether the event with store seq `seq` is parked (a live entry).
    pub fn contains_seq(&self, seq: u64) -> bool {
        self.parked_seqs.contains_key(&seq)
    }

    /// One entry.
    pub fn get(&self, id: u64) -> Option<&DeadLetter> {
        self.entries.get(&id)
    }

    /// Live entries.
    pub fn len(&self) -> u64 {
        self.entries.len() as u64
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Entries lost to the bounds since the subscription was created.
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    /// Bytes of dead-letter segments.
    pub fn size_bytes(&self) -> u64 {
        self.log.stats().log_bytes
    }

    fn remove_entry(&mut self, id: u64) {
        if let Some(d) = self.entries.remove(&id) {
            if let Some(n) = self.parked_seqs.get_mut(&d.seq) {
                *n -= 1;
                if *n == 0 {
                    self.parked_seqs.remove(&d.seq);
                }
            }
        }
    }

    fn append(&mut self, r: &DeadLetterRecord) -> Result<u64, PublishError> {
        let bytes = encode(r);
        let seqs = self
            .log
            .append(&[bytes])
            .map_err(|e| PublishError::DeadLetters {
                dir: self.dir.clone(),
                message: e.to_string(),
            })?;
        Ok(seqs.start)
    }

    /// Drops the oldest segments while a bound is exceeded; returns live entries dropped.
    fn enforce_bounds(&mut self) -> Result<u64, PublishError> {
        let mut dropped = 0;
        while self.len() > self.options.entries_max
            || self.size_bytes() > self.options.size_bytes_max
        {
            let bases = self.log.segment_first_seqs();
            let Some(&second) = bases.get(1) else {
                break; // only the active segment is left: it cannot be dropped
            };
            self.log
                .remove_segments_before(second)
                .map_err(|e| PublishError::DeadLetters {
                    dir: self.dir.clone(),
                    message: e.to_string(),
                })?;
            let removed = self.log.first_seq();
            if removed < second {
                break;
            }
            let gone: Vec<u64> = self.entries.range(..removed).map(|(&id, _)| id).collect();
            for &id in &gone {
                self.remove_entry(id);
            }
            dropped += gone.len() as u64;
        }
        if dropped > 0 {
            self.evicted += dropped;
            tracing::warn!(dir = %self.dir.display(), evicted = dropped, evicted_total = self.evicted, "dead letters over their bound: oldest evicted");
        }
        Ok(dropped)
    }
}
