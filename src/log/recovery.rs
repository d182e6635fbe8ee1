//! Opening a log directory: find segments, verify what a crash may have left unfinished,
//! truncate a torn tail, refuse (or, with `repair`, quarantine) real damage.
//!
//! Rules (see `docs/FORMAT.md`, "Recovery"):
//! - Sealed segments (all but the last) were fdatasync'ed before the next one was created,
//!   so any bad record in them is damage. Their offsets come from `.idx` files; a missing
//!   or damaged `.idx` is rebuilt by a full checksum scan of that one segment.
//! - The last segment is verified from the recovery point on (checksums); below it only
//!   record headers are walked to rebuild offsets, so recovery costs what was written since
//!   the recovery point: at most about `LogOptions::recovery_point_step_bytes`, since the
//!   point follows the synced end of the log in steps of that size.
//! - In the last segment, a bad record followed by no valid record, or only by records
//!   written while it was not yet durable (their sync marks say so), is a torn tail and is
//!   cut off; a bad record followed by a record written after it was durable is damage
//!   (see `segment::scan_records`).
//! - Every write recovery makes is idempotent: crashing during recovery and opening again
//!   reaches the same state.

use super::error::{CorruptionSite, OpenError};
use super::record::{self, Decoded};
use super::segment::{
    self, decode_index, decode_segment_header, encode_index, encode_segment_header,
    index_file_name, last_nonzero, parse_file_name, scan_records, segment_file_name,
    valid_record_after, walk_headers, write_file_atomically, ScanStop, Segment,
    SEGMENT_HEADER_SIZE_BYTES, SEGMENT_SUFFIX,
};
use super::LogOptions;
use crate::storage::{Storage, StorageFile};
use parking_lot::RwLock;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

/// Name of the recovery point file in the log directory.
pub const RECOVERY_POINT_FILE: &str = "recovery-point";
/// Magic bytes of the recovery point file.
pub const RECOVERY_POINT_MAGIC: [u8; 8] = *b"EVLOGRCP";
/// Size of the recovery point file in bytes.
pub const RECOVERY_POINT_SIZE_BYTES: usize = 32;
/// Name of the directory damaged parts are moved to by repair.
pub const QUARANTINE_DIR: &str = "quarantine";
/// How many separate damaged places one repair will quarantine before giving up.
const REPAIR_ROUNDS_MAX: usize = 1_000;

/// What opening the log found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Bytes of a torn or incomplete tail cut from the last segment.
    pub truncated_tail_bytes: u64,
    /// Why the tail was cut, if it was.
    pub truncated_tail_reason: Option<String>,
    /// Offset index files that were missing or damaged and were rebuilt.
    pub rebuilt_index_files: u32,
    /// Bytes whose checksums were verified during open.
    pub verified_bytes: u64,
    /// Damaged parts moved aside by repair (empty unless `LogOptions::repair` was set).
    pub quarantined: Vec<Quarantined>,
}

/// A damaged part of the log moved aside by repair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quarantined {
    /// Where the damage was.
    pub site: CorruptionSite,
    /// The first seq that is no longer in the log.
    pub first_lost_seq: u64,
    /// How many records were lost: every record from `first_lost_seq` to the old end of
    /// the log, as far as the quarantined bytes show.
    pub records_lost: u64,
    /// Where the bytes went.
    pub moved_to: Vec<PathBuf>,
}

/// The recovery point: everything in segment `base_seq` below `offset_bytes` (and every
/// earlier segment) was verified and synced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RecoveryPoint {
    pub base_seq: u64,
    pub offset_bytes: u64,
}

impl RecoveryPoint {
    pub fn encode(&self) -> [u8; RECOVERY_POINT_SIZE_BYTES] {
        let mut b = [0u8; RECOVERY_POINT_SIZE_BYTES];
        b[0..8].copy_from_slice(&RECOVERY_POINT_MAGIC);
        b[8..16].copy_from_slice(&self.base_seq.to_le_bytes());
        b[16..24].copy_from_slice(&self.offset_bytes.to_le_bytes());
        let crc = crc32fast::hash(&b[..28]);
        b[28..32].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Option<Self> {
        if b.len() != RECOVERY_POINT_SIZE_BYTES || b[0..8] != RECOVERY_POINT_MAGIC {
            return None;
        }
        if crc32fast::hash(&b[..28]) != u32::from_le_bytes([b[28], b[29], b[30], b[31]]) {
            return None;
        }
        let mut x = [0u8; 8];
        x.copy_from_slice(&b[8..16]);
        let base_seq = u64::from_le_bytes(x);
        x.copy_from_slice(&b[16..24]);
        Some(RecoveryPoint {
            base_seq,
            offset_bytes: u64::from_le_bytes(x),
        })
    }

    pub fn write(&self, storage: &dyn Storage, log_dir: &Path) -> io::Result<()> {
        write_file_atomically(storage, log_dir, RECOVERY_POINT_FILE, &self.encode())
    }
}

/// The state recovery hands to the writer.
#[derive(Debug)]
pub(crate) struct Recovered {
    pub segments: Vec<Arc<Segment>>,
    /// Where the next record goes in the last segment.
    pub write_offset_bytes: u64,
    pub next_seq: u64,
    pub report: RecoveryReport,
}

fn io_err<'a>(path: &'a Path, action: &'static str) -> impl FnOnce(io::Error) -> OpenError + 'a {
    move |source| OpenError::Io {
        path: path.to_path_buf(),
        action,
        source,
    }
}

/// Damage found during one recovery attempt, to be refused or quarantined.
struct Damage {
    base_seq: u64,
    /// End of the last good, complete append before the damage.
    good_end_bytes: u64,
    /// The first seq lost.
    first_lost_seq: u64,
    site: CorruptionSite,
}

enum Attempt {
    Done(Recovered),
    Damaged(Damage),
}

/// Opens and recovers the segments of `log_dir`. The caller holds the directory lock.
pub(crate) fn recover(
    storage: &dyn Storage,
    log_dir: &Path,
    options: &LogOptions,
) -> Result<Recovered, OpenError> {
    let mut quarantined = Vec::new();
    for _ in 0..REPAIR_ROUNDS_MAX {
        match attempt(storage, log_dir, options)? {
            Attempt::Done(mut recovered) => {
                recovered.report.quarantined = quarantined;
                return Ok(recovered);
            }
            Attempt::Damaged(damage) if options.repair => {
                quarantined.push(quarantine(storage, log_dir, options, damage)?);
            }
            Attempt::Damaged(damage) => return Err(OpenError::Corrupt { site: damage.site }),
        }
    }
    Err(OpenError::InvalidOptions(format!(
        "repair gave up after quarantining {REPAIR_ROUNDS_MAX} damaged places"
    )))
}

fn list_segments(storage: &dyn Storage, log_dir: &Path) -> Result<Vec<u64>, OpenError> {
    let names = storage
        .list_dir(log_dir)
        .map_err(io_err(log_dir, "listing the log directory"))?;
    let mut bases = Vec::new();
    for name in names {
        if name.ends_with(".tmp") {
            // A temporary file from an interrupted atomic write: never renamed, so unused.
            let path = log_dir.join(&name);
            storage
                .remove_file(&path)
                .map_err(io_err(&path, "removing a leftover temporary file"))?;
        } else if let Some(base) = parse_file_name(&name, SEGMENT_SUFFIX) {
            bases.push(base);
        }
    }
    bases.sort_unstable();
    Ok(bases)
}

fn attempt(
    storage: &dyn Storage,
    log_dir: &Path,
    options: &LogOptions,
) -> Result<Attempt, OpenError> {
    let payload_max = options.record_size_bytes_max;
    let mut bases = list_segments(storage, log_dir)?;
    let mut report = RecoveryReport::default();

    // A last segment with an all-zero or missing header is a creation the crash interrupted
    // (possible only where renames are not atomic); drop it.
    while let Some(&last) = bases.last() {
        let path = log_dir.join(segment_file_name(last));
        let file = storage
            .open_file(&path, false)
            .map_err(io_err(&path, "opening a segment"))?;
        let mut header = [0u8; SEGMENT_HEADER_SIZE_BYTES];
        let len = file
            .len_bytes()
            .map_err(io_err(&path, "reading a segment's length"))?;
        let short = len < SEGMENT_HEADER_SIZE_BYTES as u64;
        if !short {
            file.read_at(&mut header, 0)
                .map_err(io_err(&path, "reading a segment header"))?;
        }
        if (short || header.iter().all(|&b| b == 0)) && header.iter().all(|&b| b == 0) {
            drop(file);
            storage
                .remove_file(&path)
                .map_err(io_err(&path, "removing an unfinished segment"))?;
            storage
                .sync_dir(log_dir)
                .map_err(io_err(log_dir, "syncing the log directory"))?;
            bases.pop();
            continue;
        }
        break;
    }

    if bases.is_empty() {
        let seg = create_segment(storage, log_dir, 0, options)?;
        return Ok(Attempt::Done(Recovered {
            segments: vec![seg],
            write_offset_bytes: SEGMENT_HEADER_SIZE_BYTES as u64,
            next_seq: 0,
            report,
        }));
    }

    let recovery_point = match segment::read_whole_file(storage, &log_dir.join(RECOVERY_POINT_FILE))
    {
        Ok(bytes) => RecoveryPoint::decode(&bytes),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => {
            return Err(io_err(
                &log_dir.join(RECOVERY_POINT_FILE),
                "reading the recovery point",
            )(e))
        }
    };

    let mut segments = Vec::with_capacity(bases.len());
    let mut expected_base = bases[0];
    let last_index = bases.len() - 1;
    for (i, &base) in bases.iter().enumerate() {
        let path = log_dir.join(segment_file_name(base));
        if base != expected_base {
            return Err(OpenError::MissingSegment {
                expected: expected_base,
                path,
            });
        }
        let file = storage
            .open_file(&path, false)
            .map_err(io_err(&path, "opening a segment"))?;
        let file_len = file
            .len_bytes()
            .map_err(io_err(&path, "reading a segment's length"))?;
        let mut header = [0u8; SEGMENT_HEADER_SIZE_BYTES];
        if file_len >= SEGMENT_HEADER_SIZE_BYTES as u64 {
            file.read_at(&mut header, 0)
                .map_err(io_err(&path, "reading a segment header"))?;
        }
        let has_sync_marks = match decode_segment_header(&header) {
            Ok(h) if h.base_seq == base => h.has_sync_marks(),
            Ok(h) => {
                return Err(OpenError::BadSegmentFile {
                    path,
                    reason: format!("header says base seq {}, file name says {base}", h.base_seq),
                })
            }
            Err(reason) => return Err(OpenError::BadSegmentFile { path, reason }),
        };
        let is_last = i == last_index;
        let map_len = if is_last {
            file_len.max(options.segment_size_bytes)
        } else {
            file_len
        };
        let map = file
            .map(map_len)
            .map_err(io_err(&path, "mapping a segment"))?;
        let bytes = &map.bytes()[..file_len as usize];

        let (offsets, end_bytes) = if !is_last {
            let idx_path = log_dir.join(index_file_name(base));
            let loaded = match segment::read_whole_file(storage, &idx_path) {
                Ok(b) => decode_index(&b, base).filter(|(end, offs)| {
                    sealed_index_is_consistent(bytes, *end, offs, base, bases[i + 1], payload_max)
                }),
                Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                Err(e) => return Err(io_err(&idx_path, "reading an offset index")(e)),
            };
            match loaded {
                Some((end, offs)) => (offs, end),
                None => {
                    let scan = scan_records(bytes, SEGMENT_HEADER_SIZE_BYTES, base, payload_max);
                    report.verified_bytes += scan.end_bytes;
                    let complete = scan.next_seq == bases[i + 1] && scan.stop == ScanStop::End;
                    if !complete {
                        let (offset_bytes, reason) = match scan.stop {
                            ScanStop::End => (
                                scan.end_bytes,
                                format!(
                                    "sealed segment ends at seq {}, next segment starts at {}",
                                    scan.next_seq,
                                    bases[i + 1]
                                ),
                            ),
                            ScanStop::TornTail {
                                offset_bytes,
                                reason,
                            }
                            | ScanStop::Damage {
                                offset_bytes,
                                reason,
                            } => (offset_bytes, reason),
                        };
                        return Ok(Attempt::Damaged(Damage {
                            base_seq: base,
                            good_end_bytes: scan.end_bytes,
                            first_lost_seq: scan.next_seq,
                            site: CorruptionSite {
                                segment: path,
                                offset_bytes,
                                reason,
                            },
                        }));
                    }
                    write_file_atomically(
                        storage,
                        log_dir,
                        &index_file_name(base),
                        &encode_index(base, scan.end_bytes, &scan.offsets),
                    )
                    .map_err(io_err(&idx_path, "rebuilding an offset index"))?;
                    report.rebuilt_index_files += 1;
                    (scan.offsets, scan.end_bytes)
                }
            }
        } else {
            // The last segment: walk headers below the recovery point, verify after it.
            let mut verify_from = SEGMENT_HEADER_SIZE_BYTES;
            let mut walked = Vec::new();
            if let Some(rp) = recovery_point.filter(|rp| rp.base_seq == base) {
                let rp_offset = rp.offset_bytes as usize;
                if rp_offset > bytes.len() || rp_offset < SEGMENT_HEADER_SIZE_BYTES {
                    return Ok(Attempt::Damaged(Damage {
                        base_seq: base,
                        good_end_bytes: SEGMENT_HEADER_SIZE_BYTES as u64,
                        first_lost_seq: base,
                        site: CorruptionSite {
                            segment: path,
                            offset_bytes: rp.offset_bytes,
                            reason: format!(
                                "recovery point at byte {rp_offset} is outside the {}-byte segment",
                                bytes.len()
                            ),
                        },
                    }));
                }
                match walk_headers(
                    bytes,
                    SEGMENT_HEADER_SIZE_BYTES,
                    rp_offset,
                    base,
                    payload_max,
                ) {
                    Ok(offs) => {
                        walked = offs;
                        verify_from = rp_offset;
                    }
                    Err(bad_at) => {
                        // Below the recovery point everything was verified once; a header
                        // that no longer walks is damage. Find the good prefix for repair.
                        let scan =
                            scan_records(bytes, SEGMENT_HEADER_SIZE_BYTES, base, payload_max);
                        return Ok(Attempt::Damaged(Damage {
                            base_seq: base,
                            good_end_bytes: scan.end_bytes.min(bad_at),
                            first_lost_seq: scan.next_seq,
                            site: CorruptionSite {
                                segment: path,
                                offset_bytes: bad_at,
                                reason: "record before the recovery point no longer reads back"
                                    .into(),
                            },
                        }));
                    }
                }
            }
            let first_seq = base + walked.len() as u64;
            let scan = scan_records(bytes, verify_from, first_seq, payload_max);
            report.verified_bytes += scan.end_bytes - verify_from as u64;
            match scan.stop {
                ScanStop::End => {}
                ScanStop::Damage {
                    offset_bytes,
                    reason,
                } => {
                    return Ok(Attempt::Damaged(Damage {
                        base_seq: base,
                        good_end_bytes: scan.end_bytes,
                        first_lost_seq: scan.next_seq,
                        site: CorruptionSite {
                            segment: path,
                            offset_bytes,
                            reason,
                        },
                    }));
                }
                ScanStop::TornTail { reason, .. } => {
                    report.truncated_tail_reason = Some(reason);
                }
            }
            // Cut anything past the last complete append: a torn record, or the records of
            // an append that never finished. Zeros past the end are left alone.
            let data_end = last_nonzero(bytes).map_or(0, |p| p as u64 + 1);
            if data_end > scan.end_bytes {
                // Cutting destroys data, and what looked torn may have been one bad read
                // (a flipped bit in a record would make it, and every acknowledged record
                // after it, look like a torn tail). Cut only what reads back the same.
                confirm_tail_reads_back(
                    file.as_ref(),
                    &path,
                    &bytes[scan.end_bytes as usize..data_end as usize],
                    scan.end_bytes,
                )?;
                report.truncated_tail_bytes = data_end - scan.end_bytes;
                if report.truncated_tail_reason.is_none() {
                    report.truncated_tail_reason = Some("records of an unfinished append".into());
                }
                truncate_tail(file.as_ref(), &path, scan.end_bytes)?;
                RecoveryPoint {
                    base_seq: base,
                    offset_bytes: scan.end_bytes,
                }
                .write(storage, log_dir)
                .map_err(io_err(log_dir, "writing the recovery point"))?;
            }
            // Records recovered from the page cache after a process crash may never have
            // been synced; sync them now, before anything is appended after them, so a
            // later power loss cannot leave a hole before newer, synced records.
            file.sync_data()
                .map_err(io_err(&path, "syncing the recovered tail"))?;
            walked.extend_from_slice(&scan.offsets);
            (walked, scan.end_bytes)
        };

        expected_base = base + offsets.len() as u64;
        segments.push(Arc::new(Segment {
            base_seq: base,
            path,
            file,
            map,
            has_sync_marks,
            offsets: RwLock::new(offsets),
            end_bytes: AtomicU64::new(end_bytes),
        }));
    }

    let last = &segments[segments.len() - 1];
    let write_offset_bytes = last.end_bytes.load(std::sync::atomic::Ordering::Relaxed);
    Ok(Attempt::Done(Recovered {
        next_seq: expected_base,
        write_offset_bytes,
        segments,
        report,
    }))
}

/// Whether a loaded `.idx` agrees with its segment: offsets increase from the header, the
/// count reaches the next segment's base, and the last record's header is where it says.
fn sealed_index_is_consistent(
    bytes: &[u8],
    end_bytes: u64,
    offsets: &[u32],
    base: u64,
    next_base: u64,
    payload_max: u32,
) -> bool {
    if base + offsets.len() as u64 != next_base || end_bytes as usize > bytes.len() {
        return false;
    }
    let Some(&last) = offsets.last() else {
        return end_bytes == SEGMENT_HEADER_SIZE_BYTES as u64;
    };
    if offsets[0] as usize != SEGMENT_HEADER_SIZE_BYTES || offsets.windows(2).any(|w| w[0] >= w[1])
    {
        return false;
    }
    matches!(
        record::peek_header(&bytes[last as usize..], payload_max),
        Some(h) if h.seq == next_base - 1 && last as u64 + h.framed_len() as u64 == end_bytes
    )
}

/// Reads `seen.len()` bytes of `file` from `offset_bytes` again, with a read of its own
/// rather than through the map, and fails with [`OpenError::UnstableRead`] unless they
/// are `seen`.
fn confirm_tail_reads_back(
    file: &dyn StorageFile,
    path: &Path,
    seen: &[u8],
    offset_bytes: u64,
) -> Result<(), OpenError> {
    let mut again = vec![0u8; seen.len()];
    file.read_at(&mut again, offset_bytes)
        .map_err(io_err(path, "reading a torn tail again"))?;
    if again != seen {
        return Err(OpenError::UnstableRead {
            path: path.to_path_buf(),
            offset_bytes,
        });
    }
    Ok(())
}

/// Cuts a segment back to `end_bytes` and makes that durable. The region past the end is
/// not mapped by any reader yet (recovery runs before the log is shared).
fn truncate_tail(file: &dyn StorageFile, path: &Path, end_bytes: u64) -> Result<(), OpenError> {
    file.set_len(end_bytes)
        .map_err(io_err(path, "truncating a torn tail"))?;
    file.sync_data()
        .map_err(io_err(path, "syncing a truncated segment"))
}

/// Creates a segment durably: header written to a temporary file, synced, renamed, the
/// directory synced. A `.seg` file therefore always has a whole header.
pub(crate) fn create_segment(
    storage: &dyn Storage,
    log_dir: &Path,
    base_seq: u64,
    options: &LogOptions,
) -> Result<Arc<Segment>, OpenError> {
    let name = segment_file_name(base_seq);
    let path = log_dir.join(&name);
    let tmp = log_dir.join(format!("{name}.tmp"));
    let result = (|| {
        let file = storage.open_file(&tmp, true)?;
        file.set_len(0)?;
        file.write_at(&encode_segment_header(base_seq), 0)?;
        if options.preallocate_chunk_bytes > 0 {
            let first = (SEGMENT_HEADER_SIZE_BYTES as u64 + options.preallocate_chunk_bytes)
                .min(options.segment_size_bytes);
            file.allocate(first)?;
        }
        file.sync_data()?;
        storage.rename(&tmp, &path)?;
        storage.sync_dir(log_dir)?;
        let map = file.map(options.segment_size_bytes)?;
        Ok((file, map))
    })();
    let (file, map) = match result {
        Ok(x) => x,
        Err(source) => {
            // Best effort: the temporary file would be removed at the next open anyway.
            let _ = storage.remove_file(&tmp);
            return Err(OpenError::Io {
                path,
                action: "creating a segment",
                source,
            });
        }
    };
    Ok(Arc::new(Segment {
        base_seq,
        path,
        file,
        map,
        has_sync_marks: true,
        offsets: RwLock::new(Vec::new()),
        end_bytes: AtomicU64::new(SEGMENT_HEADER_SIZE_BYTES as u64),
    }))
}

/// Moves the damaged part aside: the segment's bytes from the last good append on, and
/// every later segment, go to `quarantine/`; the segment is cut back to its good prefix.
fn quarantine(
    storage: &dyn Storage,
    log_dir: &Path,
    options: &LogOptions,
    damage: Damage,
) -> Result<Quarantined, OpenError> {
    let qdir = log_dir.join(QUARANTINE_DIR);
    storage
        .create_dir_all(&qdir)
        .map_err(io_err(&qdir, "creating the quarantine directory"))?;
    let bases = list_segments(storage, log_dir)?;
    let path = damage.site.segment.clone();
    let file = storage
        .open_file(&path, false)
        .map_err(io_err(&path, "opening a damaged segment"))?;
    let len = file
        .len_bytes()
        .map_err(io_err(&path, "reading a segment's length"))?;
    let start = damage.good_end_bytes.min(len);
    let mut tail = vec![0u8; (len - start) as usize];
    file.read_at(&mut tail, start)
        .map_err(io_err(&path, "reading a damaged segment"))?;
    let tail_len = last_nonzero(&tail).map_or(0, |p| p + 1);
    tail.truncate(tail_len);

    // Count what the quarantined bytes still show, to say how much was lost.
    let mut max_seq_seen = max_valid_seq(&tail, options.record_size_bytes_max);

    let mut moved_to = Vec::new();
    let tail_name = format!("{}-at-{}.bad", segment_file_name(damage.base_seq), start);
    let tail_path = qdir.join(&tail_name);
    write_file_atomically(storage, &qdir, &tail_name, &tail)
        .map_err(io_err(&tail_path, "writing a quarantine file"))?;
    moved_to.push(tail_path);
    for &later in bases.iter().filter(|&&b| b > damage.base_seq) {
        let from = log_dir.join(segment_file_name(later));
        if let Ok(bytes) = segment::read_whole_file(storage, &from) {
            let seen = max_valid_seq(&bytes, options.record_size_bytes_max);
            max_seq_seen = max_seq_seen.max(seen);
        }
        let to = qdir.join(segment_file_name(later));
        storage
            .rename(&from, &to)
            .map_err(io_err(&from, "moving a segment to quarantine"))?;
        moved_to.push(to);
        let idx = log_dir.join(index_file_name(later));
        if storage.exists(&idx).unwrap_or(false) {
            storage
                .remove_file(&idx)
                .map_err(io_err(&idx, "removing an offset index"))?;
        }
    }
    storage
        .sync_dir(&qdir)
        .map_err(io_err(&qdir, "syncing the quarantine directory"))?;
    // The damaged segment becomes the last one: cut it and drop its (now wrong) index.
    truncate_tail(file.as_ref(), &path, start)?;
    let idx = log_dir.join(index_file_name(damage.base_seq));
    if storage.exists(&idx).unwrap_or(false) {
        storage
            .remove_file(&idx)
            .map_err(io_err(&idx, "removing an offset index"))?;
    }
    RecoveryPoint {
        base_seq: damage.base_seq,
        offset_bytes: start,
    }
    .write(storage, log_dir)
    .map_err(io_err(log_dir, "writing the recovery point"))?;
    storage
        .sync_dir(log_dir)
        .map_err(io_err(log_dir, "syncing the log directory"))?;
    let records_lost = match max_seq_seen {
        Some(m) if m >= damage.first_lost_seq => m - damage.first_lost_seq + 1,
        _ => u64::from(!tail.is_empty()),
    };
    Ok(Quarantined {
        site: damage.site,
        first_lost_seq: damage.first_lost_seq,
        records_lost,
        moved_to,
    })
}

/// The highest seq of any valid record in `bytes` (records found by their checksums).
fn max_valid_seq(bytes: &[u8], payload_max: u32) -> Option<u64> {
    let mut max_seq: Option<u64> = None;
    let mut at = match record::decode(bytes, payload_max) {
        Decoded::Record(_) => Some(0),
        _ => valid_record_after(bytes, 0, payload_max),
    };
    while let Some(p) = at {
        let Decoded::Record(h) = record::decode(&bytes[p..], payload_max) else {
            break;
        };
        max_seq = max_seq.max(Some(h.seq));
        let next = p + h.framed_len();
        at = match bytes
            .get(next..)
            .map(|rest| record::decode(rest, payload_max))
        {
            Some(Decoded::Record(_)) => Some(next),
            _ => valid_record_after(bytes, next.saturating_sub(1).max(p), payload_max),
        };
    }
    max_seq
}
