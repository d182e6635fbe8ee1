//! Dead-letter segments: events a subscription gave up on, kept where a person can see
//! them and send them again.
//!
//! Each subscription's dead letters are a [`Log`] of their own in
//! `<dir>/deadletter/<subscription>/log/`, in the main log's checksummed record format and
//! with its crash recovery. Records are serde + bincode with a version byte: an `Entry` when
//! an event is parked, `Updated` when a redrive failed again, `RedriveRequested`,
//! `Resolved` when a redrive succeeded or the entry was purged, `Carried` when compaction
//! moved a live entry forward (keeping its id) and `Evicted` when the bounds dropped
//! entries. The live entries are rebuilt from the records at open (`docs/FORMAT.md`).
//!
//! Bounded, with a stated eviction policy:
//! - when an event is parked past `entries_max` live entries, or past half of
//!   `size_bytes_max` bytes of live entries, the oldest live entries are evicted first
//!   (FIFO), counted, logged and recorded durably. Only parking evicts: a redrive, an
//!   update or a purge never costs another live entry (whoever opened the dead letters,
//!   with whatever bounds);
//! - the segments themselves are kept within `size_bytes_max` after every write: when
//!   they grow past it (updates and resolutions add records too), the oldest segment's
//!   live entries are carried forward, with their ids and state, and the segment is
//!   dropped. Compaction never loses a live entry.

use crate::log::record::RECORD_HEADER_SIZE_BYTES;
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

/// Records carried forward or evicted in one append, at most: one append must fit in a
/// segment.
const RECORDS_PER_APPEND_MAX: usize = 256;
/// Ids named by one `Evicted` record, at most (it must fit in the smallest segment's
/// record limit, half of 4 KiB).
const EVICTED_IDS_PER_RECORD_MAX: usize = 200;

/// Bounds of a subscription's dead letters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterOptions {
    /// Most live dead letters kept; past it the oldest are evicted. Default 100,000.
    pub entries_max: u64,
    /// Most bytes of dead-letter segments kept (compaction after every write keeps them
    /// there, as long as the live ones fit). The live dead letters may fill half of it
    /// (past that, parking evicts the oldest); the other half is room for the records that
    /// redrives, purges and resolutions add until compaction reclaims them. At least twice
    /// `segment_size_bytes`. Default 64 MiB.
    pub size_bytes_max: u64,
    /// Size of one dead-letter segment: compaction drops a whole segment at a time.
    /// Default 1 MiB.
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
    /// A live entry moved forward by compaction: its whole state, under its own id.
    Carried(DeadLetter),
    /// Entries dropped by the bounds, and the subscription's evicted count after them.
    Evicted {
        ids: Vec<u64>,
        evicted_total: u64,
    },
}
// Variants are only ever added at the end: bincode encodes the variant's index.

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

/// Bytes a live entry's full state takes as a record (what carrying it forward writes).
fn entry_record_bytes(d: &DeadLetter) -> u64 {
    // A failure to size it would also fail to encode it (`encode` says so); the estimate
    // only steers the bounds.
    1 + 4 + bincode::serialized_size(d).unwrap_or(0) + RECORD_HEADER_SIZE_BYTES as u64
}

/// One subscription's dead letters.
#[derive(Debug)]
pub struct DeadLetters {
    log: Log,
    dir: PathBuf,
    entries: BTreeMap<u64, DeadLetter>,
    /// Id -> seq of the record holding the entry's full state (its `Entry`, or the
    /// `Carried` record compaction wrote): compaction carries entries whose record lies in
    /// the segment it drops.
    record_of: HashMap<u64, u64>,
    /// Store seq -> ids of the live entries that parked it (normally one).
    parked_seqs: HashMap<u64, Vec<u64>>,
    /// Sum of [`entry_record_bytes`] over the live entries.
    live_bytes: u64,
    /// Seq of the last `Evicted` record: compaction carries it forward too, so the evicted
    /// count it holds survives until the publisher has stored it.
    last_evicted_record: Option<u64>,
    /// The segment size in use (`options.segment_size_bytes`, raised to the log's minimum).
    segment_size_bytes: u64,
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
        if options.size_bytes_max < 2 * log_options.segment_size_bytes {
            return Err(PublishError::InvalidOptions(format!(
                "dead letters: size_bytes_max ({}) must be at least twice the segment size ({})",
                options.size_bytes_max, log_options.segment_size_bytes
            )));
        }
        let segment_size_bytes = log_options.segment_size_bytes;
        let err = |e: String| PublishError::DeadLetters {
            dir: dir.to_path_buf(),
            message: e,
        };
        let log =
            Log::open_with_storage(storage, dir, log_options).map_err(|e| err(e.to_string()))?;
        let mut entries = BTreeMap::new();
        let mut record_of = HashMap::new();
        let mut evicted = evicted;
        let mut last_evicted_record = None;
        for record in log.iter_from(log.first_seq()) {
            let record = record.map_err(|e| err(e.to_string()))?;
            match decode(record.payload()) {
                Some(DeadLetterRecord::Entry(mut d)) => {
                    d.id = record.seq();
                    record_of.insert(d.id, record.seq());
                    entries.insert(d.id, d);
                }
                Some(DeadLetterRecord::Carried(d)) => {
                    record_of.insert(d.id, record.seq());
                    entries.insert(d.id, d);
                }
                Some(DeadLetterRecord::Evicted { ids, evicted_total }) => {
                    for id in ids {
                        entries.remove(&id);
                        record_of.remove(&id);
                    }
                    // The publisher stores the count after the eviction: a crash between
                    // the two leaves the higher count here.
                    evicted = evicted.max(evicted_total);
                    last_evicted_record = Some(record.seq());
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
                    record_of.remove(&id);
                }
                None => return Err(err(format!("record {} is not a dead letter", record.seq()))),
            }
        }
        let mut parked_seqs: HashMap<u64, Vec<u64>> = HashMap::new();
        for d in entries.values() {
            parked_seqs.entry(d.seq).or_default().push(d.id);
        }
        let live_bytes = entries.values().map(entry_record_bytes).sum();
        Ok(DeadLetters {
            log,
            dir: dir.to_path_buf(),
            entries,
            record_of,
            parked_seqs,
            live_bytes,
            last_evicted_record,
            segment_size_bytes,
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
        self.insert_entry(id, entry);
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
            self.live_bytes -= entry_record_bytes(d);
            d.attempts = attempts;
            d.last_error = last_error;
            d.last_failure_us = now_us;
            d.redrive_requested = false;
            self.live_bytes += entry_record_bytes(d);
        }
        self.compact()?;
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
        self.compact()?;
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
            self.compact()?;
        }
        Ok(())
    }

    /// Removes the entries `ids` (unknown ones are skipped) in as few durable writes as
    /// fit; returns how many were removed. A purge of many entries costs a few syncs, not
    /// one each.
    ///
    /// # Errors
    /// [`PublishError::DeadLetters`] if a write fails (the entries of the writes that
    /// succeeded are removed).
    pub fn resolve_all(&mut self, ids: &[u64]) -> Result<u64, PublishError> {
        let live: Vec<u64> = ids
            .iter()
            .copied()
            .filter(|id| self.entries.contains_key(id))
            .collect();
        for chunk in live.chunks(RECORDS_PER_APPEND_MAX) {
            let records: Vec<DeadLetterRecord> = chunk
                .iter()
                .map(|&id| DeadLetterRecord::Resolved { id })
                .collect();
            self.append_all(&records)?;
            for &id in chunk {
                self.remove_entry(id);
            }
        }
        self.compact()?;
        Ok(live.len() as u64)
    }

    /// The live entries, oldest first.
    pub fn list(&self) -> Vec<DeadLetter> {
        self.entries.values().cloned().collect()
    }

    /// Whether some live entry parked store seq `seq` (it may have been another event,
    /// if the log lost its tail since and the seq was reused: see
    /// [`DeadLetters::find_event`]).
    pub fn contains_seq(&self, seq: u64) -> bool {
        self.parked_seqs.contains_key(&seq)
    }

    /// The id of the live entry that parked this very event: the one at store seq `seq`
    /// with this aggregate and version (an undecodable event was parked as aggregate `""`,
    /// version 0).
    pub fn find_event(&self, seq: u64, aggregate_id: &str, version: u64) -> Option<u64> {
        self.parked_seqs.get(&seq)?.iter().copied().find(|id| {
            self.entries
                .get(id)
                .is_some_and(|d| d.aggregate_id == aggregate_id && d.version == version)
        })
    }

    /// Bytes the live entries take as records (bounded by half of `size_bytes_max`).
    pub fn live_bytes(&self) -> u64 {
        self.live_bytes
    }

    /// One entry.
    pub fn get(&self, id: u64) -> Option<&DeadLetter> {
        self.entries.get(&id)
    }

    /// The id the next dead letter will get: every entry parked so far has a lower one.
    pub fn next_id(&self) -> u64 {
        self.log.next_seq()
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

    fn insert_entry(&mut self, record: u64, entry: DeadLetter) {
        self.record_of.insert(entry.id, record);
        self.parked_seqs
            .entry(entry.seq)
            .or_default()
            .push(entry.id);
        self.live_bytes += entry_record_bytes(&entry);
        self.entries.insert(entry.id, entry);
    }

    fn remove_entry(&mut self, id: u64) {
        if let Some(d) = self.entries.remove(&id) {
            self.live_bytes -= entry_record_bytes(&d);
            self.record_of.remove(&id);
            if let Some(ids) = self.parked_seqs.get_mut(&d.seq) {
                ids.retain(|&other| other != id);
                if ids.is_empty() {
                    self.parked_seqs.remove(&d.seq);
                }
            }
        }
    }

    fn append(&mut self, r: &DeadLetterRecord) -> Result<u64, PublishError> {
        let seqs = self.append_all(std::slice::from_ref(r))?;
        Ok(seqs.first().copied().unwrap_or(0))
    }

    /// Appends records, in as few durable writes as fit a quarter segment each (an append
    /// never spans segments; one record is at most half of one); returns their seqs.
    fn append_all(&mut self, rs: &[DeadLetterRecord]) -> Result<Vec<u64>, PublishError> {
        let budget_bytes = (self.segment_size_bytes / 4) as usize;
        let mut seqs = Vec::with_capacity(rs.len());
        let mut batch: Vec<Vec<u8>> = Vec::new();
        let mut batch_bytes = 0;
        for (i, r) in rs.iter().enumerate() {
            let bytes = encode(r);
            batch_bytes += bytes.len() + RECORD_HEADER_SIZE_BYTES;
            batch.push(bytes);
            let full = batch.len() >= RECORDS_PER_APPEND_MAX || batch_bytes >= budget_bytes;
            if full || i + 1 == rs.len() {
                let written = self
                    .log
                    .append(&batch)
                    .map_err(|e| PublishError::DeadLetters {
                        dir: self.dir.clone(),
                        message: e.to_string(),
                    })?;
                seqs.extend(written);
                batch.clear();
                batch_bytes = 0;
            }
        }
        Ok(seqs)
    }

    /// Evicts past the live bounds, then compacts past the size bound; returns the live
    /// entries evicted.
    fn enforce_bounds(&mut self) -> Result<u64, PublishError> {
        let evicted = self.evict_over_bounds()?;
        self.compact()?;
        Ok(evicted)
    }

    /// Drops the oldest live entries while there are more than `entries_max` of them or
    /// they take more than half of `size_bytes_max`. The eviction is written (with the
    /// new evicted count) before the entries leave memory.
    fn evict_over_bounds(&mut self) -> Result<u64, PublishError> {
        let live_bytes_max = self.options.size_bytes_max / 2;
        let mut gone = Vec::new();
        let (mut count, mut bytes) = (self.len(), self.live_bytes);
        for (&id, d) in &self.entries {
            if count <= self.options.entries_max && bytes <= live_bytes_max {
                break;
            }
            gone.push(id);
            count -= 1;
            bytes -= entry_record_bytes(d);
        }
        if gone.is_empty() {
            return Ok(0);
        }
        let evicted_total = self.evicted + gone.len() as u64;
        // Each record's total counts the ids up to its own: the records may be split over
        // several writes, and a crash between them keeps an exact count.
        let mut total = self.evicted;
        let records: Vec<DeadLetterRecord> = gone
            .chunks(EVICTED_IDS_PER_RECORD_MAX)
            .map(|ids| {
                total += ids.len() as u64;
                DeadLetterRecord::Evicted {
                    ids: ids.to_vec(),
                    evicted_total: total,
                }
            })
            .collect();
        let seqs = self.append_all(&records)?;
        self.last_evicted_record = seqs.last().copied();
        for &id in &gone {
            self.remove_entry(id);
        }
        self.evicted = evicted_total;
        tracing::warn!(dir = %self.dir.display(), evicted = gone.len(), evicted_total, "dead letters over their bound: oldest evicted");
        Ok(gone.len() as u64)
    }

    /// While the segments take more than `size_bytes_max`, carries the live entries whose
    /// records lie in the oldest segment (and the last `Evicted` record) forward, then
    /// drops that segment. One pass over the segments at most: the live entries take at
    /// most half of the bound, so a pass brings the size under it.
    fn compact(&mut self) -> Result<(), PublishError> {
        let passes = self.log.segment_first_seqs().len().saturating_sub(1);
        for _ in 0..passes {
            if self.size_bytes() <= self.options.size_bytes_max {
                break;
            }
            let Some(&second) = self.log.segment_first_seqs().get(1) else {
                break; // only the active segment is left: it cannot be dropped
            };
            let mut carry: Vec<DeadLetterRecord> = self
                .entries
                .values()
                .filter(|d| self.record_of.get(&d.id).is_some_and(|&r| r < second))
                .map(|d| DeadLetterRecord::Carried(d.clone()))
                .collect();
            if self.last_evicted_record.is_some_and(|r| r < second) {
                carry.push(DeadLetterRecord::Evicted {
                    ids: Vec::new(),
                    evicted_total: self.evicted,
                });
            }
            let seqs = self.append_all(&carry)?;
            for (record, seq) in carry.iter().zip(seqs) {
                match record {
                    DeadLetterRecord::Carried(d) => {
                        self.record_of.insert(d.id, seq);
                    }
                    _ => self.last_evicted_record = Some(seq),
                }
            }
            // Everything live in the segment is written again (durably) further on.
            self.log
                .remove_segments_before(second)
                .map_err(|e| PublishError::DeadLetters {
                    dir: self.dir.clone(),
                    message: e.to_string(),
                })?;
            if self.log.first_seq() < second {
                break; // could not remove it; the next write tries again
            }
        }
        Ok(())
    }
}
