//! Segment files: header, naming, the per-segment offset index, and record scanning.
//!
//! A segment is named by the first seq it holds (`{base_seq:020}.seg`) and starts with a
//! 32-byte header. Records follow back to back. Space past the last record is zeros
//! (preallocated or never written). A sealed segment (any but the last) has a companion
//! `{base_seq:020}.idx` holding each record's byte offset, so opening the log never scans
//! sealed segments; a missing or damaged `.idx` is rebuilt from the segment.

use super::record::{self, Decoded, RecordHeader, RECORD_HEADER_SIZE_BYTES};
use crate::storage::{MappedRegion, Storage, StorageFile};
use parking_lot::RwLock;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Size of the segment header in bytes.
pub const SEGMENT_HEADER_SIZE_BYTES: usize = 32;
/// Magic bytes at the start of every segment file.
pub const SEGMENT_MAGIC: [u8; 8] = *b"EVLOGSEG";
/// The segment format version this build writes. Version 2 added records' sync offsets
/// (bytes 17..20 of a record header, zero in version 1).
pub const SEGMENT_FORMAT_VERSION: u32 = 2;
/// The oldest segment format version this build reads: version 1 records read with sync
/// offset 0 (every earlier record durable when they were written, the careful reading).
pub const SEGMENT_FORMAT_VERSION_OLDEST: u32 = 1;
/// Magic bytes at the start of every offset index file.
pub const INDEX_MAGIC: [u8; 8] = *b"EVLOGIDX";
/// Size of the offset index file header in bytes.
pub const INDEX_HEADER_SIZE_BYTES: usize = 40;
/// File name suffix of segments.
pub const SEGMENT_SUFFIX: &str = ".seg";
/// File name suffix of offset index files.
pub const INDEX_SUFFIX: &str = ".idx";

/// The file name of the segment starting at `base_seq`.
pub fn segment_file_name(base_seq: u64) -> String {
    format!("{base_seq:020}{SEGMENT_SUFFIX}")
}

/// The file name of the offset index of the segment starting at `base_seq`.
pub fn index_file_name(base_seq: u64) -> String {
    format!("{base_seq:020}{INDEX_SUFFIX}")
}

/// Parses `{base_seq:020}{suffix}`; `None` for any other name.
pub fn parse_file_name(name: &str, suffix: &str) -> Option<u64> {
    let digits = name.strip_suffix(suffix)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Encodes a segment header.
pub fn encode_segment_header(base_seq: u64) -> [u8; SEGMENT_HEADER_SIZE_BYTES] {
    let mut h = [0u8; SEGMENT_HEADER_SIZE_BYTES];
    h[0..8].copy_from_slice(&SEGMENT_MAGIC);
    h[8..12].copy_from_slice(&SEGMENT_FORMAT_VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&(SEGMENT_HEADER_SIZE_BYTES as u32).to_le_bytes());
    h[16..24].copy_from_slice(&base_seq.to_le_bytes());
    // 24..28 reserved, zero
    let crc = crc32fast::hash(&h[..28]);
    h[28..32].copy_from_slice(&crc.to_le_bytes());
    h
}

/// What a segment header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    /// The seq of the segment's first record.
    pub base_seq: u64,
    /// The format its records are written in (see [`SEGMENT_FORMAT_VERSION`]).
    pub format_version: u32,
}

impl SegmentHeader {
    /// Whether records in this segment carry sync offsets (format 2 on).
    pub fn has_sync_marks(&self) -> bool {
        self.format_version >= 2
    }
}

/// Decodes and checks a segment header; returns what it says or what is wrong.
pub fn decode_segment_header(bytes: &[u8]) -> Result<SegmentHeader, String> {
    let h = bytes.get(..SEGMENT_HEADER_SIZE_BYTES).ok_or_else(|| {
        format!(
            "file is {} bytes, shorter than a segment header",
            bytes.len()
        )
    })?;
    if h[0..8] != SEGMENT_MAGIC {
        return Err("bad magic bytes".into());
    }
    let stored = u32::from_le_bytes([h[28], h[29], h[30], h[31]]);
    if crc32fast::hash(&h[..28]) != stored {
        return Err("segment header checksum mismatch".into());
    }
    let version = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
    if !(SEGMENT_FORMAT_VERSION_OLDEST..=SEGMENT_FORMAT_VERSION).contains(&version) {
        return Err(format!(
            "format version {version}, this build reads {SEGMENT_FORMAT_VERSION_OLDEST} to {SEGMENT_FORMAT_VERSION}"
        ));
    }
    let header_len = u32::from_le_bytes([h[12], h[13], h[14], h[15]]);
    if header_len as usize != SEGMENT_HEADER_SIZE_BYTES {
        return Err(format!("header length {header_len}"));
    }
    let mut base = [0u8; 8];
    base.copy_from_slice(&h[16..24]);
    Ok(SegmentHeader {
        base_seq: u64::from_le_bytes(base),
        format_version: version,
    })
}

/// One segment file, open and mapped.
#[derive(Debug)]
pub(crate) struct Segment {
    pub base_seq: u64,
    pub path: PathBuf,
    pub file: Arc<dyn StorageFile>,
    pub map: Arc<dyn MappedRegion>,
    /// Whether its records carry sync offsets (format 2 on): records appended to an older
    /// segment are written with offset 0, so that builds reading only format 1 can read
    /// every segment they accept.
    pub has_sync_marks: bool,
    /// Byte offset of each record: `offsets[i]` is where seq `base_seq + i` starts.
    pub offsets: RwLock<Vec<u32>>,
    /// End of the last readable record in bytes. Only bytes below it are ever read.
    pub end_bytes: AtomicU64,
}

impl Segment {
    /// The bytes of whole, readable records (and the header).
    #[inline]
    pub fn readable(&self) -> &[u8] {
        let end = self.end_bytes.load(Ordering::Acquire) as usize;
        let bytes = self.map.bytes();
        &bytes[..end.min(bytes.len())]
    }
}

/// How a scan of a segment's records ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScanStop {
    /// Clean end: an all-zero header, or the end of the bytes.
    End,
    /// A bad or cut-short record at `offset_bytes` with nothing valid after it, or only
    /// records written while it was not yet durable (pages landed out of order): a torn
    /// tail.
    TornTail {
        /// Where the bad bytes start.
        offset_bytes: u64,
        /// What is wrong.
        reason: String,
    },
    /// A bad record at `offset_bytes` followed by a valid record written after it was
    /// durable: damage, not a crash.
    Damage {
        /// Where the bad bytes start.
        offset_bytes: u64,
        /// What is wrong.
        reason: String,
    },
}

/// The result of [`scan_records`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scan {
    /// Offsets of the records of complete atomic appends, in seq order.
    pub offsets: Vec<u32>,
    /// End of the last complete append (where the next record goes).
    pub end_bytes: u64,
    /// The seq after the last complete append.
    pub next_seq: u64,
    /// How the scan ended. Records after `end_bytes` (an incomplete append, or a bad
    /// record) are not in `offsets`.
    pub stop: ScanStop,
}

/// Verifies records from `start_bytes` on, expecting `first_seq` there, and says where the
/// valid, complete part ends and why. Never panics, whatever the bytes.
///
/// Records whose seq is not the expected one count as bad records. Records after the last
/// `BATCH_END` flag belong to an append that never completed and are not kept. How a
/// stop is classified: `docs/FORMAT.md`, recovery rule 4.
pub fn scan_records(
    bytes: &[u8],
    start_bytes: usize,
    first_seq: u64,
    payload_len_max: u32,
) -> Scan {
    let mut offsets = Vec::new();
    let mut batch_first = 0usize; // index into offsets where the open batch starts
    let mut pos = start_bytes.min(bytes.len());
    let mut seq = first_seq;
    let mut end_bytes = pos as u64;
    let mut next_seq = first_seq;
    let bad_reason = loop {
        match record::decode(&bytes[pos..], payload_len_max) {
            // The last seq, u64::MAX, is never used: the next one could not be named.
            Decoded::Record(h) if h.seq == seq && seq < u64::MAX && pos <= u32::MAX as usize => {
                offsets.push(pos as u32);
                pos += h.framed_len();
                seq += 1;
                if h.is_batch_end() {
                    batch_first = offsets.len();
                    end_bytes = pos as u64;
                    next_seq = seq;
                }
            }
            Decoded::Record(h) => break Some(format!("record has seq {}, expected {seq}", h.seq)),
            Decoded::End => break None,
            Decoded::Truncated => break Some("record cut short".to_string()),
            Decoded::Invalid(reason) => break Some(reason.to_string()),
        }
    };
    offsets.truncate(batch_first);
    // Whatever stopped the scan, a valid record further on that was written after the
    // record expected here was durable means the bytes in between are damage. The pages of
    // unsynced writes can land in any order, though, so valid records written while the
    // expected one was not yet durable may follow a hole the crash made: a torn tail like
    // any other (under `Sync` such records were never acknowledged; under `Interval` they
    // are within what a crash may lose).
    let stop = match records_after(bytes, pos, seq, payload_len_max) {
        After::WrittenAfterSync(at) => ScanStop::Damage {
            offset_bytes: pos as u64,
            reason: format!(
                "{}, then a valid record at byte {at} written after this place was synced",
                bad_reason.as_deref().unwrap_or("zeroed bytes")
            ),
        },
        After::OnlyUnsynced => ScanStop::TornTail {
            offset_bytes: pos as u64,
            reason: format!(
                "{} before records of writes that were not synced yet (their pages landed out of order)",
                bad_reason.as_deref().unwrap_or("zeroed bytes")
            ),
        },
        After::Nothing => match bad_reason {
            None => ScanStop::End,
            Some(reason) => ScanStop::TornTail {
                offset_bytes: pos as u64,
                reason,
            },
        },
    };
    Scan {
        offsets,
        end_bytes,
        next_seq,
        stop,
    }
}

/// Bytes looked at together when searching for a non-zero byte. Megabytes of
/// preallocated zeros follow the end of a log, and byte-by-byte searches through them were
/// most of the time of a clean reopen; a chunk ORed into one byte compiles to vector
/// instructions.
const ZERO_SCAN_CHUNK_BYTES: usize = 64;

fn any_nonzero(chunk: &[u8]) -> bool {
    chunk.iter().fold(0u8, |acc, &b| acc | b) != 0
}

/// The index of the first non-zero byte of `bytes`.
pub(crate) fn first_nonzero(bytes: &[u8]) -> Option<usize> {
    let chunks = bytes.chunks_exact(ZERO_SCAN_CHUNK_BYTES);
    let rest_at = bytes.len() - chunks.remainder().len();
    for (i, chunk) in chunks.enumerate() {
        if any_nonzero(chunk) {
            let at = chunk.iter().position(|&b| b != 0)?;
            return Some(i * ZERO_SCAN_CHUNK_BYTES + at);
        }
    }
    let at = bytes[rest_at..].iter().position(|&b| b != 0)?;
    Some(rest_at + at)
}

/// The index of the last non-zero byte of `bytes`.
pub(crate) fn last_nonzero(bytes: &[u8]) -> Option<usize> {
    let head_len = bytes.len() % ZERO_SCAN_CHUNK_BYTES;
    let (head, body) = bytes.split_at(head_len);
    for (i, chunk) in body.rchunks_exact(ZERO_SCAN_CHUNK_BYTES).enumerate() {
        if any_nonzero(chunk) {
            let at = chunk.iter().rposition(|&b| b != 0)?;
            return Some(bytes.len() - (i + 1) * ZERO_SCAN_CHUNK_BYTES + at);
        }
    }
    head.iter().rposition(|&b| b != 0)
}

/// What [`records_after`] found after a bad spot.
enum After {
    /// No valid record.
    Nothing,
    /// Valid records, all written while the record expected at the bad spot was not yet
    /// durable.
    OnlyUnsynced,
    /// A valid record at this offset written after the expected record was durable (or
    /// with no known sync mark).
    WrittenAfterSync(usize),
}

/// Looks at the valid records after `pos`, where the record with `expected_seq` should
/// have been: were they all written while that record was not yet durable?
///
/// Such a record has a seq past `expected_seq` and a sync mark at or below it. Records
/// follow each other within a write, so the walk steps from record to record and searches
/// byte by byte only across bad bytes.
fn records_after(bytes: &[u8], pos: usize, expected_seq: u64, payload_len_max: u32) -> After {
    let mut found = After::Nothing;
    let mut next = valid_header_after(bytes, pos, payload_len_max);
    while let Some((at, h)) = next {
        let unsynced_then =
            h.seq > expected_seq && h.sync_mark().is_some_and(|mark| mark <= expected_seq);
        if !unsynced_then {
            return After::WrittenAfterSync(at);
        }
        found = After::OnlyUnsynced;
        let end = at + h.framed_len();
        next = match record::decode(&bytes[end..], payload_len_max) {
            Decoded::Record(h) => Some((end, h)),
            _ => valid_header_after(bytes, end, payload_len_max),
        };
    }
    found
}

/// The offset of the first valid record strictly after `pos`, if any.
///
/// Runs of zeros are skipped quickly: a record header always has a non-zero byte, so only
/// positions up to 19 bytes before a non-zero byte can start one.
pub fn valid_record_after(bytes: &[u8], pos: usize, payload_len_max: u32) -> Option<usize> {
    valid_header_after(bytes, pos, payload_len_max).map(|(at, _)| at)
}

/// [`valid_record_after`], with the record's header.
fn valid_header_after(
    bytes: &[u8],
    pos: usize,
    payload_len_max: u32,
) -> Option<(usize, RecordHeader)> {
    let mut p = pos.checked_add(1)?;
    while p + RECORD_HEADER_SIZE_BYTES <= bytes.len() {
        let window = &bytes[p..p + RECORD_HEADER_SIZE_BYTES];
        if window.iter().all(|&b| b == 0) {
            let nonzero = first_nonzero(&bytes[p + RECORD_HEADER_SIZE_BYTES..])?;
            let nz = p + RECORD_HEADER_SIZE_BYTES + nonzero;
            p = (nz + 1).saturating_sub(RECORD_HEADER_SIZE_BYTES).max(p + 1);
            continue;
        }
        if let Decoded::Record(h) = record::decode(&bytes[p..], payload_len_max) {
            return Some((p, h));
        }
        p += 1;
    }
    None
}

/// Walks record headers from `start_bytes` to `stop_bytes` without verifying checksums,
/// collecting offsets. Used below the recovery point, where records were verified before.
/// Returns the offsets, or the offset where the walk found something inconsistent.
pub fn walk_headers(
    bytes: &[u8],
    start_bytes: usize,
    stop_bytes: usize,
    first_seq: u64,
    payload_len_max: u32,
) -> Result<Vec<u32>, u64> {
    let mut offsets = Vec::new();
    let mut pos = start_bytes;
    let mut seq = first_seq;
    if stop_bytes > bytes.len() {
        return Err(bytes.len() as u64);
    }
    while pos < stop_bytes {
        let header: RecordHeader = match record::peek_header(&bytes[pos..], payload_len_max) {
            Some(h) if h.seq == seq && seq < u64::MAX && pos + h.framed_len() <= stop_bytes => h,
            _ => return Err(pos as u64),
        };
        offsets.push(pos as u32);
        pos += header.framed_len();
        seq += 1;
    }
    if pos != stop_bytes {
        return Err(pos as u64);
    }
    Ok(offsets)
}

/// Encodes the offset index file of a sealed segment.
pub fn encode_index(base_seq: u64, end_bytes: u64, offsets: &[u32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(INDEX_HEADER_SIZE_BYTES + offsets.len() * 4 + 4);
    out.extend_from_slice(&INDEX_MAGIC);
    out.extend_from_slice(&SEGMENT_FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&base_seq.to_le_bytes());
    out.extend_from_slice(&(offsets.len() as u64).to_le_bytes());
    out.extend_from_slice(&end_bytes.to_le_bytes());
    debug_assert_eq!(out.len(), INDEX_HEADER_SIZE_BYTES);
    for o in offsets {
        out.extend_from_slice(&o.to_le_bytes());
    }
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// Decodes an offset index file; `None` if it is damaged or does not match `base_seq`.
pub fn decode_index(bytes: &[u8], base_seq: u64) -> Option<(u64, Vec<u32>)> {
    if bytes.len() < INDEX_HEADER_SIZE_BYTES + 4 || bytes[0..8] != INDEX_MAGIC {
        return None;
    }
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    if crc32fast::hash(body) != u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]) {
        return None;
    }
    let u64_at = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&body[at..at + 8]);
        u64::from_le_bytes(b)
    };
    let version = u32::from_le_bytes([body[8], body[9], body[10], body[11]]);
    if !(SEGMENT_FORMAT_VERSION_OLDEST..=SEGMENT_FORMAT_VERSION).contains(&version)
        || u64_at(16) != base_seq
    {
        return None;
    }
    let count = usize::try_from(u64_at(24)).ok()?;
    let end_bytes = u64_at(32);
    let entries = &body[INDEX_HEADER_SIZE_BYTES..];
    if entries.len() != count.checked_mul(4)? {
        return None;
    }
    let offsets: Vec<u32> = entries
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Some((end_bytes, offsets))
}

/// Writes `bytes` to `path` atomically: a temporary file, fdatasync, rename, directory sync.
pub(crate) fn write_file_atomically(
    storage: &dyn Storage,
    dir: &Path,
    name: &str,
    bytes: &[u8],
) -> io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    let path = dir.join(name);
    let file = storage.open_file(&tmp, true)?;
    file.set_len(0)?;
    file.write_at(bytes, 0)?;
    file.sync_data()?;
    drop(file);
    storage.rename(&tmp, &path)?;
    storage.sync_dir(dir)
}

/// Reads a whole (small) file.
pub(crate) fn read_whole_file(storage: &dyn Storage, path: &Path) -> io::Result<Vec<u8>> {
    let file = storage.open_file(path, false)?;
    let len = usize::try_from(file.len_bytes()?)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "file too large"))?;
    let mut buf = vec![0u8; len];
    file.read_at(&mut buf, 0)?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::record::{encode_into, FLAG_BATCH_END};

    fn segment_with(records: &[(u64, u8, &[u8])]) -> Vec<u8> {
        let marked: Vec<(u64, u8, u64, &[u8])> = records
            .iter()
            .map(|&(seq, flags, payload)| (seq, flags, 0, payload))
            .collect();
        segment_with_offsets(&marked)
    }

    /// Records given as (seq, flags, sync offset, payload).
    fn segment_with_offsets(records: &[(u64, u8, u64, &[u8])]) -> Vec<u8> {
        let mut buf = encode_segment_header(records.first().map_or(0, |r| r.0)).to_vec();
        for &(seq, flags, sync_offset, payload) in records {
            encode_into(&mut buf, seq, flags, sync_offset, payload);
        }
        buf
    }

    /// Two writes as the log makes them under `Sync`: seq 0 alone, synced; then seqs 1..=3
    /// (two appends: 1-2 and 3) with 4 KiB payloads, so that each record of the second
    /// write is on pages of its own, all with sync mark 1.
    fn two_writes() -> (Vec<u8>, [usize; 4]) {
        let big = vec![7u8; 4096];
        let buf = segment_with_offsets(&[
            (0, FLAG_BATCH_END, 0, b"acknowledged"),
            (1, 0, 0, &big),
            (2, FLAG_BATCH_END, 1, &big),
            (3, FLAG_BATCH_END, 2, &big),
        ]);
        let first = SEGMENT_HEADER_SIZE_BYTES;
        let second = first + RECORD_HEADER_SIZE_BYTES + 12;
        let step = RECORD_HEADER_SIZE_BYTES + 4096;
        (buf, [first, second, second + step, second + 2 * step])
    }

    /// Scans `buf` from seq 0 and checks that the scan stopped at damage.
    fn scan_expecting_damage(buf: &[u8]) -> Scan {
        let scan = scan_records(buf, SEGMENT_HEADER_SIZE_BYTES, 0, 1 << 20);
        assert!(
            matches!(scan.stop, ScanStop::Damage { .. }),
            "{:?}",
            scan.stop
        );
        scan
    }

    #[test]
    fn a_hole_before_records_written_while_it_was_unsynced_is_a_torn_tail() {
        let (mut buf, at) = two_writes();
        // The page with record 2's header never landed; records 1 and 3 did.
        buf[at[2]..at[2] + 4096].fill(0);
        let scan = scan_records(&buf, SEGMENT_HEADER_SIZE_BYTES, 0, 1 << 20);
        assert_eq!(scan.next_seq, 1, "only the first write's append is whole");
        assert_eq!(scan.end_bytes as usize, at[1]);
        assert!(
            matches!(&scan.stop, ScanStop::TornTail { offset_bytes, reason }
                if *offset_bytes as usize == at[2] && reason.contains("out of order")),
            "{:?}",
            scan.stop
        );
        // The same with record 1's payload damaged instead: records 2 and 3 follow.
        let (mut buf, at) = two_writes();
        buf[at[1] + 100] ^= 1;
        let scan = scan_records(&buf, SEGMENT_HEADER_SIZE_BYTES, 0, 1 << 20);
        assert!(
            matches!(scan.stop, ScanStop::TornTail { .. }),
            "{:?}",
            scan.stop
        );
        assert_eq!(scan.next_seq, 1);
    }

    #[test]
    fn a_hole_before_a_later_write_is_damage() {
        let (mut buf, at) = two_writes();
        // Record 0 (synced before the second write, which says so) is gone.
        buf[at[0]..at[1]].fill(0);
        assert_eq!(scan_expecting_damage(&buf).next_seq, 0);
    }

    #[test]
    fn records_without_a_known_sync_mark_after_a_hole_are_damage() {
        // Sync offset 0 everywhere (as in format version 1): all before each was durable.
        let big = vec![7u8; 4096];
        let mut buf = segment_with(&[(0, 0, &big), (1, FLAG_BATCH_END, &big)]);
        buf[SEGMENT_HEADER_SIZE_BYTES + 50] ^= 1;
        scan_expecting_damage(&buf);
        // The same with the offset saturated: the mark is not known.
        let mut buf = segment_with_offsets(&[(0, 0, 0, &big), (1, FLAG_BATCH_END, u64::MAX, &big)]);
        buf[SEGMENT_HEADER_SIZE_BYTES + 50] ^= 1;
        scan_expecting_damage(&buf);
    }

    #[test]
    fn one_record_written_after_the_hole_was_synced_makes_it_damage() {
        let (mut buf, at) = two_writes();
        buf[at[2]..at[2] + 4096].fill(0);
        // Record 3 says that everything before it was durable when it was written.
        let mut other = Vec::new();
        encode_into(&mut other, 3, FLAG_BATCH_END, 0, &[7u8; 4096]);
        buf[at[3]..at[3] + other.len()].copy_from_slice(&other);
        let scan = scan_expecting_damage(&buf);
        assert!(
            matches!(&scan.stop, ScanStop::Damage { reason, .. } if reason.contains("after this place was synced")),
            "{:?}",
            scan.stop
        );
    }

    #[test]
    fn chunked_nonzero_searches_agree_with_byte_by_byte_ones() {
        // Every length around the chunk size and its multiples, with one, two or no
        // non-zero bytes at every position (the chunk edges included).
        for len in [0, 1, 2, 63, 64, 65, 127, 128, 129, 200, 256, 300] {
            let mut cases = vec![vec![0u8; len]];
            for i in 0..len {
                let mut one = vec![0u8; len];
                one[i] = 0x80;
                cases.push(one.clone());
                let j = (i * 7 + 3) % len;
                one[j] |= 1;
                cases.push(one);
            }
            for bytes in &cases {
                assert_eq!(
                    first_nonzero(bytes),
                    bytes.iter().position(|&b| b != 0),
                    "{bytes:?}"
                );
                assert_eq!(
                    last_nonzero(bytes),
                    bytes.iter().rposition(|&b| b != 0),
                    "{bytes:?}"
                );
            }
        }
    }

    #[test]
    fn segment_header_round_trips_and_rejects_damage() {
        let h = encode_segment_header(123);
        assert_eq!(
            decode_segment_header(&h),
            Ok(SegmentHeader {
                base_seq: 123,
                format_version: SEGMENT_FORMAT_VERSION
            })
        );
        let mut bad = h;
        bad[17] ^= 1;
        assert!(decode_segment_header(&bad).is_err());
        assert!(decode_segment_header(&h[..10]).is_err());
    }

    #[test]
    fn file_names_sort_by_seq_and_parse_back() {
        assert_eq!(segment_file_name(42), "00000000000000000042.seg");
        assert_eq!(
            parse_file_name(&segment_file_name(42), SEGMENT_SUFFIX),
            Some(42)
        );
        assert_eq!(parse_file_name("42.seg", SEGMENT_SUFFIX), None);
        assert!(segment_file_name(9) < segment_file_name(10));
    }

    #[test]
    fn offset_index_round_trips_and_rejects_damage() {
        let bytes = encode_index(5, 999, &[32, 100, 400]);
        assert_eq!(decode_index(&bytes, 5), Some((999, vec![32, 100, 400])));
        assert_eq!(decode_index(&bytes, 6), None, "wrong base seq");
        let mut bad = bytes.clone();
        bad[INDEX_HEADER_SIZE_BYTES + 1] ^= 1;
        assert_eq!(decode_index(&bad, 5), None);
        assert_eq!(decode_index(&bytes[..bytes.len() - 1], 5), None);
    }

    #[test]
    fn scan_keeps_only_complete_batches() {
        let mut buf = segment_with(&[
            (0, FLAG_BATCH_END, b"a"),
            (1, 0, b"b"),
            (2, FLAG_BATCH_END, b"c"),
            (3, 0, b"d"),
        ]);
        buf.extend_from_slice(&[0u8; 100]);
        let scan = scan_records(&buf, SEGMENT_HEADER_SIZE_BYTES, 0, 1024);
        assert_eq!(scan.offsets.len(), 3);
        assert_eq!(scan.next_seq, 3);
        assert_eq!(scan.stop, ScanStop::End);
        assert_eq!(
            scan.end_bytes as usize,
            SEGMENT_HEADER_SIZE_BYTES + 3 * (RECORD_HEADER_SIZE_BYTES + 1)
        );
    }

    #[test]
    fn bad_record_followed_by_valid_one_is_damage() {
        let mut buf = segment_with(&[
            (0, FLAG_BATCH_END, b"aaaa"),
            (1, FLAG_BATCH_END, b"bbbb"),
            (2, FLAG_BATCH_END, b"cccc"),
        ]);
        let second = SEGMENT_HEADER_SIZE_BYTES + RECORD_HEADER_SIZE_BYTES + 4;
        buf[second + RECORD_HEADER_SIZE_BYTES] ^= 0x40;
        let scan = scan_records(&buf, SEGMENT_HEADER_SIZE_BYTES, 0, 1024);
        assert!(
            matches!(scan.stop, ScanStop::Damage { offset_bytes, .. } if offset_bytes as usize == second)
        );
        assert_eq!(scan.next_seq, 1);
    }

    #[test]
    fn zeroed_hole_before_valid_records_is_damage() {
        let mut buf = segment_with(&[
            (0, FLAG_BATCH_END, b"aaaa"),
            (1, FLAG_BATCH_END, b"bbbb"),
            (2, FLAG_BATCH_END, b"cccc"),
        ]);
        let second = SEGMENT_HEADER_SIZE_BYTES + RECORD_HEADER_SIZE_BYTES + 4;
        buf[second..second + RECORD_HEADER_SIZE_BYTES + 4].fill(0);
        let scan = scan_records(&buf, SEGMENT_HEADER_SIZE_BYTES, 0, 1024);
        assert!(
            matches!(scan.stop, ScanStop::Damage { .. }),
            "{:?}",
            scan.stop
        );
    }

    #[test]
    fn the_largest_seq_is_never_accepted_so_seqs_cannot_wrap() {
        let mut buf = encode_segment_header(u64::MAX).to_vec();
        encode_into(&mut buf, u64::MAX, FLAG_BATCH_END, 0, b"x");
        let scan = scan_records(&buf, SEGMENT_HEADER_SIZE_BYTES, u64::MAX, 1024);
        assert!(scan.offsets.is_empty());
        assert_eq!(scan.next_seq, u64::MAX);
        assert!(walk_headers(&buf, SEGMENT_HEADER_SIZE_BYTES, buf.len(), u64::MAX, 1024).is_err());
        assert!(
            walk_headers(&buf, SEGMENT_HEADER_SIZE_BYTES, buf.len() + 1, 0, 1024).is_err(),
            "a stop past the end is refused"
        );
    }

    #[test]
    fn valid_record_far_after_zeros_is_found() {
        let mut buf = vec![0u8; 10_000];
        let mut rec = Vec::new();
        encode_into(&mut rec, 9, FLAG_BATCH_END, 0, b"xyz");
        buf.extend_from_slice(&rec);
        buf.extend_from_slice(&[0u8; 50]);
        assert_eq!(valid_record_after(&buf, 0, 1024), Some(10_000));
    }

    #[test]
    fn walk_headers_matches_scan_and_detects_inconsistency() {
        let buf = segment_with(&[(4, FLAG_BATCH_END, b"aa"), (5, FLAG_BATCH_END, b"bbb")]);
        let scan = scan_records(&buf, SEGMENT_HEADER_SIZE_BYTES, 4, 1024);
        let walked = walk_headers(
            &buf,
            SEGMENT_HEADER_SIZE_BYTES,
            scan.end_bytes as usize,
            4,
            1024,
        );
        assert_eq!(walked, Ok(scan.offsets.clone()));
        assert!(walk_headers(
            &buf,
            SEGMENT_HEADER_SIZE_BYTES,
            scan.end_bytes as usize,
            5,
            1024
        )
        .is_err());
        assert!(walk_headers(
            &buf,
            SEGMENT_HEADER_SIZE_BYTES,
            scan.end_bytes as usize - 1,
            4,
            1024
        )
        .is_err());
    }
}
