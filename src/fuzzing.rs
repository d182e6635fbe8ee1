//! The bodies of the fuzz targets in `fuzz/`, as plain functions over `&[u8]`.
//!
//! The cargo-fuzz targets (`fuzz/fuzz_targets/*.rs`) call these, and so does the corpus
//! replay test (`tests/fuzz_corpus.rs`), so `cargo test` runs every target over its
//! committed seed corpus. Each function panics if and only if it finds a bug: a panic in
//! the library, or a property of the log that does not hold. Not a stable API.
//!
//! The checks are written against the on-disk format (`docs/FORMAT.md`) rather than by
//! calling the code under test a second time: checksums are recomputed with `crc32fast`
//! directly, and records are found in segment files by walking their headers by hand.
//! Events are checked against bincode 1.x, which defines their encoding, and index keys
//! and values against reference decoders written from their layouts.

use crate::index::keys;
use crate::log::record::{
    decode, encode_into, framed_len, peek_header, Decoded, InvalidReason, RecordHeader,
    FLAG_BATCH_END, RECORD_HEADER_SIZE_BYTES, RECORD_PAYLOAD_SIZE_BYTES_LIMIT,
};
use crate::log::segment::{
    decode_segment_header, encode_segment_header, parse_file_name, scan_records, segment_file_name,
    valid_record_after, walk_headers, Scan, ScanStop, SEGMENT_HEADER_SIZE_BYTES, SEGMENT_SUFFIX,
};
use crate::log::{Log, LogOptions, OpenError, ReadError, LOG_DIR_NAME, RECOVERY_POINT_FILE};
use crate::store::event::{
    self, ContentType, EventHead, EventRef, Metadata, NewEvent, Prev, RecordedEvent, ResolvedEvent,
    EVENT_FORMAT_VERSION, NAME_LEN_BYTES_MAX,
};
use bincode::Options as _;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use uuid::Uuid;

/// Segment size of the logs [`segment_recover`] opens: small, so appends can roll.
pub const FUZZ_SEGMENT_SIZE_BYTES: u64 = 64 << 10;
/// Largest record payload of the logs [`segment_recover`] opens.
pub const FUZZ_RECORD_SIZE_BYTES_MAX: u32 = 16 << 10;

// ---------------------------------------------------------------------------------------
// record_decode
// ---------------------------------------------------------------------------------------

/// Fuzz target body for record framing: [`decode`], [`peek_header`], [`encode_into`],
/// [`scan_records`], [`valid_record_after`] and [`walk_headers`].
///
/// Input layout: byte 0 picks the `payload_len_max` passed to `decode` (see
/// [`payload_len_max_for`]), byte 1 is the byte offset where `scan_records` starts, and
/// the rest is the buffer under test. Shorter inputs use zeros for the missing control
/// bytes and an empty buffer.
///
/// Checks: `decode` agrees at every offset of the buffer with a reference decoder written
/// from the format description; every record it accepts has a checksum that recomputes
/// and re-encodes to exactly its bytes; `scan_records` returns contiguous records with
/// consecutive seqs that end on a `BATCH_END` record, and a stop reason consistent with
/// what follows; `valid_record_after` finds exactly the first valid record after a
/// position; `walk_headers` agrees with the scan; nothing panics.
pub fn record_decode(data: &[u8]) {
    let ctl = data.first().copied().unwrap_or(0);
    let start = usize::from(data.get(1).copied().unwrap_or(0));
    let buf = data.get(2..).unwrap_or(&[]);
    let max = payload_len_max_for(ctl, buf);

    // Decode at every offset, including the empty tail.
    let mut valid = vec![false; buf.len() + 1];
    for (at, is_valid) in valid.iter_mut().enumerate() {
        let rest = &buf[at..];
        let got = decode(rest, max);
        let want = reference_decode(rest, max);
        assert_eq!(got, want, "decode at offset {at} disagrees with the format");
        if let Decoded::Record(h) = got {
            check_record_bytes(rest, h);
            assert_eq!(peek_header(rest, max), Some(h), "peek_header at {at}");
            *is_valid = true;
        }
    }

    // Scan from `start`, expecting the seq of the record found there (or 0). A first seq
    // so close to u64::MAX that the scan could count past it is out of this target's
    // domain: seqs come from segment file names and are dense from 0.
    let s = start.min(buf.len());
    let first_seq = match decode(&buf[s..], max) {
        Decoded::Record(h) if h.seq <= u64::MAX - buf.len() as u64 => h.seq,
        _ => 0,
    };
    let scan = scan_records(buf, start, first_seq, max);
    check_scan(buf, s, first_seq, max, &scan, &valid);

    // valid_record_after from a few positions, against the table of valid offsets.
    let some_pos = usize::from(ctl) * 17 % (buf.len() + 1);
    for pos in [0, s, some_pos, usize::MAX] {
        let want = first_valid_after(&valid, pos);
        assert_eq!(
            valid_record_after(buf, pos, max),
            want,
            "valid_record_after({pos})"
        );
    }

    // Whatever the bytes, framing them as a payload round-trips.
    if buf.len() <= RECORD_PAYLOAD_SIZE_BYTES_LIMIT as usize {
        let flags = ctl & FLAG_BATCH_END;
        // Any offset, including ones past the seq and the saturated value.
        let sync_offset = u64::from(ctl).pow(4);
        let mut framed = Vec::new();
        encode_into(&mut framed, first_seq, flags, sync_offset, buf);
        let want = RecordHeader {
            seq: first_seq,
            flags,
            payload_len: buf.len() as u32,
            sync_offset: sync_offset.min(0xFF_FFFF) as u32,
        };
        assert_eq!(decode(&framed, u32::MAX), Decoded::Record(want));
        assert_eq!(reference_decode(&framed, u32::MAX), Decoded::Record(want));
        assert_eq!(&framed[RECORD_HEADER_SIZE_BYTES..], buf);
    }
}

/// The `payload_len_max` [`record_decode`] uses for control byte `ctl`: its low two bits
/// pick no limit, 16 KiB, a tiny limit (`ctl >> 2`, 0..=63), or a limit read from the
/// first four bytes of `buf` (so any value, including above the hard limit).
pub fn payload_len_max_for(ctl: u8, buf: &[u8]) -> u32 {
    match ctl & 3 {
        0 => u32::MAX,
        1 => 16 << 10,
        2 => u32::from(ctl >> 2),
        _ => buf.get(..4).map_or(0, |b| le_u32(b, 0)),
    }
}

/// What `decode` must return for `buf`, written from the format description:
/// an all-zero header (or a short all-zero buffer) is the end; then the length limit; then
/// a record cut short; then the checksum over bytes 4..20+len; then the flags.
fn reference_decode(buf: &[u8], max: u32) -> Decoded {
    if buf.len() < RECORD_HEADER_SIZE_BYTES {
        return if buf.iter().all(|&b| b == 0) {
            Decoded::End
        } else {
            Decoded::Truncated
        };
    }
    if buf[..RECORD_HEADER_SIZE_BYTES].iter().all(|&b| b == 0) {
        return Decoded::End;
    }
    let payload_len = le_u32(buf, 4);
    if u64::from(payload_len) > u64::from(max.min(RECORD_PAYLOAD_SIZE_BYTES_LIMIT)) {
        return Decoded::Invalid(InvalidReason::TooLong { payload_len });
    }
    let total = RECORD_HEADER_SIZE_BYTES + payload_len as usize;
    if buf.len() < total {
        return Decoded::Truncated;
    }
    let stored = le_u32(buf, 0);
    // Hash in two pieces on purpose: a different path through crc32fast than `decode`.
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&buf[4..RECORD_HEADER_SIZE_BYTES]);
    hasher.update(&buf[RECORD_HEADER_SIZE_BYTES..total]);
    let computed = hasher.finalize();
    if computed != stored {
        return Decoded::Invalid(InvalidReason::Checksum { stored, computed });
    }
    if buf[16] & !FLAG_BATCH_END != 0 {
        return Decoded::Invalid(InvalidReason::UnknownFlags);
    }
    Decoded::Record(RecordHeader {
        seq: le_u64(buf, 8),
        flags: buf[16],
        payload_len,
        sync_offset: sync_offset_field(buf, 0),
    })
}

/// `h` was decoded from the start of `buf`: its checksum must recompute, and framing its
/// payload again must give back exactly its bytes.
fn check_record_bytes(buf: &[u8], h: RecordHeader) {
    let total = framed_len(h.payload_len as usize);
    let bytes = &buf[..total];
    assert_eq!(
        crc32fast::hash(&bytes[4..]),
        le_u32(bytes, 0),
        "a record with a bad checksum was accepted: {h:?}"
    );
    assert_eq!(le_u32(bytes, 4), h.payload_len);
    assert_eq!(le_u64(bytes, 8), h.seq);
    let mut again = Vec::with_capacity(total);
    encode_into(
        &mut again,
        h.seq,
        h.flags,
        u64::from(h.sync_offset),
        &bytes[RECORD_HEADER_SIZE_BYTES..],
    );
    assert_eq!(again, bytes, "re-encoding {h:?} gives other bytes");
}

/// The first offset after `pos` where a whole valid record starts, from the table built by
/// decoding at every offset.
fn first_valid_after(valid: &[bool], pos: usize) -> Option<usize> {
    let from = pos.checked_add(1)?;
    (from..valid.len()).find(|&i| valid[i])
}

fn check_scan(buf: &[u8], start: usize, first_seq: u64, max: u32, scan: &Scan, valid: &[bool]) {
    // The kept records: contiguous from `start`, consecutive seqs, last one ends a batch.
    let mut pos = start;
    let mut last: Option<RecordHeader> = None;
    for (i, &off) in scan.offsets.iter().enumerate() {
        assert_eq!(off as usize, pos, "scan offset {i} is not contiguous");
        let Decoded::Record(h) = decode(&buf[pos..], max) else {
            panic!("scan kept offset {pos}, which does not decode as a record");
        };
        assert_eq!(
            h.seq,
            first_seq + i as u64,
            "scan kept a record out of order"
        );
        pos += h.framed_len();
        last = Some(h);
    }
    if let Some(h) = last {
        assert!(
            h.is_batch_end(),
            "scan kept records of an unfinished append"
        );
    }
    assert_eq!(scan.end_bytes, pos as u64, "scan end_bytes");
    assert_eq!(
        scan.next_seq,
        first_seq + scan.offsets.len() as u64,
        "scan next_seq"
    );

    // Past the kept records: records of an append that never finished (no BATCH_END),
    // then the place the scan stopped.
    let mut seq = scan.next_seq;
    let stop_at = loop {
        match decode(&buf[pos..], max) {
            Decoded::Record(h) if h.seq == seq => {
                assert!(
                    !h.is_batch_end(),
                    "scan stopped before a complete append at {pos}"
                );
                pos += h.framed_len();
                seq += 1;
            }
            _ => break pos,
        }
    };
    let stopped_on = decode(&buf[stop_at..], max);
    // The valid records after the stop, stepping from one to the next where they follow
    // each other, and to the next valid offset otherwise; and whether each was written
    // while the record expected at the stop (`seq`) was not yet durable: a later seq, with
    // a sync mark (seq minus sync offset) at or below it.
    let mut after = Vec::new();
    let mut next = first_valid_after(valid, stop_at);
    while let Some(at) = next {
        let Decoded::Record(h) = decode(&buf[at..], max) else {
            panic!("offset {at} is in the table of valid records but does not decode");
        };
        let offset = u64::from(sync_offset_field(buf, at));
        let unsynced_then = h.seq > seq
            && offset < 0xFF_FFFF
            && h.seq.checked_sub(offset).is_some_and(|first| first <= seq);
        after.push(unsynced_then);
        let end = at + h.framed_len();
        next = if valid[end] {
            Some(end)
        } else {
            first_valid_after(valid, end)
        };
    }
    match &scan.stop {
        ScanStop::End => {
            assert_eq!(stopped_on, Decoded::End, "scan said End at {stop_at}");
            assert!(after.is_empty(), "End, but a valid record follows");
        }
        ScanStop::TornTail { offset_bytes, .. } => {
            assert_eq!(*offset_bytes, stop_at as u64, "torn tail offset");
            assert!(
                stopped_on != Decoded::End || !after.is_empty(),
                "torn tail at the end of the log"
            );
            assert!(
                after.iter().all(|&unsynced_then| unsynced_then),
                "torn tail, but a valid record written after the stop was durable follows"
            );
        }
        ScanStop::Damage { offset_bytes, .. } => {
            assert_eq!(*offset_bytes, stop_at as u64, "damage offset");
            assert!(
                after.iter().any(|&unsynced_then| !unsynced_then),
                "damage, but every valid record after it was written before the stop was durable"
            );
        }
    }

    // Walking the headers of the kept part gives the same offsets.
    assert_eq!(
        walk_headers(buf, start, scan.end_bytes as usize, first_seq, max),
        Ok(scan.offsets.clone()),
        "walk_headers disagrees with scan_records"
    );
}

// ---------------------------------------------------------------------------------------
// segment_recover
// ---------------------------------------------------------------------------------------

/// Fuzz target body for recovery: writes a log directory made from `data`, opens it with
/// [`Log::open`], and checks what recovery made of it.
///
/// Input layout (see [`RecoverPlan::from_input`]): byte 0 is a control byte. If it is odd,
/// the whole input is segment `00000000000000000000.seg` as is (so a fuzzed header is
/// tested too; `E`, the first byte of the magic, is odd). If it is even, a valid segment
/// header is put before the rest, its bits choose repair, a second (sealed) segment and a
/// recovery point file, and the next bytes say where to split and where the recovery point
/// is.
///
/// Checks: opening never panics. If it fails without `repair`, the segment files are
/// unchanged, and if it failed for damage, opening with `repair` succeeds. A successful
/// open yields `next_seq()` readable records with seqs 0.. whose bytes, found by walking
/// the segment files independently, have good checksums and re-encode exactly; each
/// segment ends on a `BATCH_END` record and the last one holds nothing past its end.
/// Reopening gives the same records and truncates nothing (recovery is idempotent); an
/// append then works, reads back, and survives another reopen.
pub fn segment_recover(data: &[u8]) {
    let Some(plan) = RecoverPlan::from_input(data) else {
        return;
    };
    let scratch = ScratchDir::new();
    let dir = scratch.path();
    let log_dir = dir.join(LOG_DIR_NAME);
    std::fs::create_dir_all(&log_dir).expect("creating the scratch log directory");
    for (base, bytes) in &plan.segments {
        std::fs::write(log_dir.join(segment_file_name(*base)), bytes).expect("writing a segment");
    }
    if let Some((base_seq, offset_bytes)) = plan.recovery_point {
        std::fs::write(
            log_dir.join(RECOVERY_POINT_FILE),
            encode_recovery_point(base_seq, offset_bytes),
        )
        .expect("writing the recovery point");
    }

    match Log::open(dir, fuzz_options(plan.repair)) {
        Ok(log) => check_lifecycle(dir, log, plan.strict),
        Err(err) => {
            if plan.repair {
                return;
            }
            for (base, bytes) in &plan.segments {
                let path = log_dir.join(segment_file_name(*base));
                // A last segment whose header is all zeros is an interrupted creation and
                // is removed; any segment still there must be as it was.
                if let Ok(now) = std::fs::read(&path) {
                    assert!(
                        now == *bytes,
                        "open failed ({err}) but changed {}",
                        path.display()
                    );
                }
            }
            if let OpenError::Corrupt { .. } = err {
                match Log::open(dir, fuzz_options(true)) {
                    Ok(log) => check_lifecycle(dir, log, plan.strict),
                    Err(e) => panic!("open failed with damage ({err}), repair failed too: {e}"),
                }
            }
        }
    }
}

/// How [`segment_recover`] lays out a log directory for one input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoverPlan {
    /// Segment files to write: base seq (names the file) and contents.
    pub segments: Vec<(u64, Vec<u8>)>,
    /// A recovery point file to write: base seq and byte offset.
    pub recovery_point: Option<(u64, u64)>,
    /// Open with `LogOptions::repair`.
    pub repair: bool,
    /// Whether every record below the recovery point was verified when it was written.
    /// False for a recovery point at an arbitrary offset: the bytes below it were never
    /// verified, so reads may find corrupt records there (reported as errors, never
    /// returned).
    pub strict: bool,
}

/// Control byte bits of [`segment_recover`] inputs in header mode (control byte even).
pub mod ctl {
    /// Set: the control byte is odd; the whole input is the segment file, no header added.
    pub const RAW: u8 = 0x01;
    /// Open with `repair`.
    pub const REPAIR: u8 = 0x02;
    /// Split the data into two segments (the first becomes sealed, without an `.idx`). The
    /// next input byte says where, in 255ths of the data.
    pub const TWO_SEGMENTS: u8 = 0x04;
    /// Give the second segment a valid header (else its bytes are used as they are).
    pub const SECOND_HEADER: u8 = 0x08;
    /// Name the second segment after the seq where a scan of the first one ends (else
    /// after [`SECOND_BASE_SHIFT`]).
    pub const SECOND_BASE_FROM_SCAN: u8 = 0x10;
    /// Write a recovery point for the last segment. The next input byte says where: even,
    /// where a scan of that segment ends (a recovery point the log could have written);
    /// odd, at an arbitrary offset (`byte >> 1` in 127ths of the segment, 255 past its end).
    pub const RECOVERY_POINT: u8 = 0x20;
    /// Without [`SECOND_BASE_FROM_SCAN`], the second segment's base is 1 + (ctl >> 6).
    pub const SECOND_BASE_SHIFT: u32 = 6;
}

impl RecoverPlan {
    /// Lays out the log directory for input `data`; `None` for an empty input.
    pub fn from_input(data: &[u8]) -> Option<RecoverPlan> {
        let (&c, mut body) = data.split_first()?;
        if c & ctl::RAW != 0 {
            return Some(RecoverPlan {
                segments: vec![(0, data.to_vec())],
                recovery_point: None,
                repair: data[data.len() - 1] & ctl::REPAIR != 0,
                strict: true,
            });
        }
        let mut take = || {
            let (&b, rest) = body.split_first().unwrap_or((&0, &[]));
            body = rest;
            b
        };
        let split = if c & ctl::TWO_SEGMENTS != 0 {
            Some(take())
        } else {
            None
        };
        let rp = if c & ctl::RECOVERY_POINT != 0 {
            Some(take())
        } else {
            None
        };
        let mut first = encode_segment_header(0).to_vec();
        let mut segments = Vec::new();
        match split {
            None => {
                first.extend_from_slice(body);
                segments.push((0, first));
            }
            Some(split) => {
                let at = body.len() * usize::from(split) / 255;
                first.extend_from_slice(&body[..at]);
                let base = if c & ctl::SECOND_BASE_FROM_SCAN != 0 {
                    scan_records(
                        &first,
                        SEGMENT_HEADER_SIZE_BYTES,
                        0,
                        FUZZ_RECORD_SIZE_BYTES_MAX,
                    )
                    .next_seq
                    .max(1)
                } else {
                    1 + u64::from(c >> ctl::SECOND_BASE_SHIFT)
                };
                let mut second = if c & ctl::SECOND_HEADER != 0 {
                    encode_segment_header(base).to_vec()
                } else {
                    Vec::new()
                };
                second.extend_from_slice(&body[at..]);
                segments.push((0, first));
                segments.push((base, second));
            }
        }
        let mut strict = true;
        let recovery_point = rp.map(|r| {
            let (base, bytes) = segments.last().expect("at least one segment");
            let offset = if r & 1 == 0 {
                scan_records(
                    bytes,
                    SEGMENT_HEADER_SIZE_BYTES,
                    *base,
                    FUZZ_RECORD_SIZE_BYTES_MAX,
                )
                .end_bytes
            } else {
                strict = false;
                let len = bytes.len() as u64;
                if r == 0xff {
                    len + 1
                } else {
                    let body = len.saturating_sub(SEGMENT_HEADER_SIZE_BYTES as u64);
                    SEGMENT_HEADER_SIZE_BYTES as u64 + body * u64::from(r >> 1) / 127
                }
            };
            (*base, offset)
        });
        Some(RecoverPlan {
            segments,
            recovery_point,
            repair: c & ctl::REPAIR != 0,
            strict,
        })
    }
}

/// The options of every log [`segment_recover`] opens.
pub fn fuzz_options(repair: bool) -> LogOptions {
    LogOptions {
        segment_size_bytes: FUZZ_SEGMENT_SIZE_BYTES,
        record_size_bytes_max: FUZZ_RECORD_SIZE_BYTES_MAX,
        preallocate_chunk_bytes: 0,
        repair,
        ..LogOptions::default()
    }
}

/// A recovery point file, encoded from the format description: magic, base seq, offset,
/// four reserved bytes, crc32 of the first 28 bytes.
pub fn encode_recovery_point(base_seq: u64, offset_bytes: u64) -> [u8; 32] {
    let mut b = [0u8; 32];
    b[0..8].copy_from_slice(b"EVLOGRCP");
    b[8..16].copy_from_slice(&base_seq.to_le_bytes());
    b[16..24].copy_from_slice(&offset_bytes.to_le_bytes());
    let crc = crc32fast::hash(&b[..28]);
    b[28..32].copy_from_slice(&crc.to_le_bytes());
    b
}

/// Checks a freshly recovered log, reopens it, appends, reopens again.
fn check_lifecycle(dir: &Path, log: Log, strict: bool) {
    let records = check_log(dir, &log, strict);
    let n = records.len() as u64;
    drop(log);

    let log = Log::open(dir, fuzz_options(false))
        .unwrap_or_else(|e| panic!("reopening a recovered log failed: {e}"));
    let report = log.recovery_report();
    assert_eq!(report.truncated_tail_bytes, 0, "second recovery cut a tail");
    assert!(report.quarantined.is_empty(), "second recovery quarantined");
    assert_eq!(
        check_log(dir, &log, strict),
        records,
        "reopening changed the records"
    );

    let appended: [&[u8]; 2] = [b"fuzz append 0", b"fuzz append 1"];
    let seqs = log
        .append(&appended)
        .unwrap_or_else(|e| panic!("append to a recovered log failed: {e}"));
    assert_eq!(seqs, n..n + 2, "append seqs");
    for (seq, payload) in seqs.zip(appended) {
        let r = log
            .read(seq)
            .unwrap_or_else(|e| panic!("reading back appended seq {seq}: {e}"));
        assert_eq!(r.payload(), payload);
    }
    let mut expected = records;
    expected.extend(appended.iter().map(|p| Some(p.to_vec())));
    assert_eq!(check_log(dir, &log, strict), expected, "after append");
    drop(log);

    let log = Log::open(dir, fuzz_options(false))
        .unwrap_or_else(|e| panic!("reopening after an append failed: {e}"));
    assert_eq!(
        check_log(dir, &log, strict),
        expected,
        "reopening after an append changed the records"
    );
}

/// Reads every record of `log` (by seq and by iterator) and checks them against the
/// segment files on disk. Returns the payloads; `None` for a record that reads as corrupt,
/// allowed only when not `strict`.
fn check_log(dir: &Path, log: &Log, strict: bool) -> Vec<Option<Vec<u8>>> {
    let n = log.next_seq();
    let mut records = Vec::new();
    for seq in 0..n {
        match log.read(seq) {
            Ok(r) => {
                assert_eq!(r.seq(), seq, "read({seq}) returned another seq");
                records.push(Some(r.payload().to_vec()));
            }
            Err(ReadError::Corrupt { seq: s, .. }) if !strict => {
                assert_eq!(s, seq);
                records.push(None);
            }
            Err(e) => panic!("record {seq} of {n} does not read: {e}"),
        }
    }
    assert!(
        matches!(log.read(n), Err(ReadError::NotFound { .. })),
        "read(next_seq) found something"
    );

    // The iterator yields the same records, stopping only at a corrupt one.
    let mut it = log.iter_from(0);
    for (seq, want) in records.iter().enumerate() {
        match it.next() {
            Some(Ok(r)) => {
                assert_eq!(r.seq(), seq as u64, "iterator seq");
                assert_eq!(Some(r.payload()), want.as_deref(), "iterator payload {seq}");
            }
            Some(Err(e)) => {
                assert!(
                    want.is_none(),
                    "iterator failed at {seq}, read did not: {e}"
                );
                break;
            }
            None => panic!("iterator ended at {seq}, next_seq is {n}"),
        }
    }
    if records.iter().all(Option::is_some) {
        assert!(it.next().is_none(), "iterator went past next_seq");
    }

    check_segment_files(dir, &records, strict);
    assert_eq!(log.stats().next_seq, n);
    records
}

/// Finds the records in the segment files by walking them by hand, and checks each one the
/// log returned: good checksum, exact bytes, same payload. In `strict` mode each segment
/// must end on a `BATCH_END` record. The last segment must hold only zeros past its last
/// record, so no stale record can ever be read back; a sealed one may hold only records of
/// an unfinished append there.
fn check_segment_files(dir: &Path, records: &[Option<Vec<u8>>], strict: bool) {
    let log_dir = dir.join(LOG_DIR_NAME);
    let mut bases: Vec<u64> = std::fs::read_dir(&log_dir)
        .expect("listing the log directory")
        .filter_map(|e| {
            let name = e.expect("reading the log directory").file_name();
            parse_file_name(name.to_str()?, SEGMENT_SUFFIX)
        })
        .collect();
    bases.sort_unstable();
    assert!(!bases.is_empty(), "no segment files after open");
    let n = records.len() as u64;
    let mut seq = 0u64;
    for (i, &base) in bases.iter().enumerate() {
        let path = log_dir.join(segment_file_name(base));
        let bytes = std::fs::read(&path).expect("reading a segment");
        assert_eq!(base, seq, "{} does not start at seq {seq}", path.display());
        assert_eq!(
            decode_segment_header(&bytes).map(|h| h.base_seq),
            Ok(base),
            "segment header"
        );
        let is_last = i + 1 == bases.len();
        let end = if is_last { n } else { bases[i + 1] };
        assert!(
            base <= end && end <= n,
            "segment bases {bases:?} do not fit next_seq {n}"
        );
        let mut pos = SEGMENT_HEADER_SIZE_BYTES;
        let mut last_flags = None;
        while seq < end {
            let header = bytes
                .get(pos..pos + RECORD_HEADER_SIZE_BYTES)
                .unwrap_or_else(|| panic!("record {seq} is past the end of {}", path.display()));
            let payload_len = le_u32(header, 4) as usize;
            assert_eq!(le_u64(header, 8), seq, "seq field of record {seq}");
            assert!(payload_len <= FUZZ_RECORD_SIZE_BYTES_MAX as usize);
            let total = framed_len(payload_len);
            let framed = bytes
                .get(pos..pos + total)
                .unwrap_or_else(|| panic!("record {seq} is cut short in {}", path.display()));
            if let Some(payload) = &records[seq as usize] {
                // The log returned this record: its bytes on disk must be exactly the
                // framing of what it returned, with a good checksum.
                assert_eq!(
                    crc32fast::hash(&framed[4..]),
                    le_u32(framed, 0),
                    "record {seq} was returned but its checksum is bad"
                );
                let mut again = Vec::with_capacity(total);
                let sync_offset = u64::from(sync_offset_field(framed, 0));
                encode_into(&mut again, seq, framed[16], sync_offset, payload);
                assert_eq!(again, framed, "record {seq} bytes");
            }
            last_flags = Some(framed[16]);
            pos += total;
            seq += 1;
        }
        if strict {
            if let Some(flags) = last_flags {
                assert!(
                    flags & FLAG_BATCH_END != 0,
                    "{} ends inside an append",
                    path.display()
                );
            }
        }
        let rest = &bytes[pos..];
        if is_last {
            assert!(
                rest.iter().all(|&b| b == 0),
                "non-zero bytes past the end of the last segment {}",
                path.display()
            );
        } else {
            // A sealed segment is never cut. Past its last record it may only hold records
            // of an append that never finished (consecutive seqs, no `BATCH_END`): recovery
            // keeps none of them, as in the last segment. Then comes the end.
            let mut rest = rest;
            let mut next = end;
            let stop = loop {
                match decode(rest, FUZZ_RECORD_SIZE_BYTES_MAX) {
                    Decoded::Record(h) if h.seq == next && !h.is_batch_end() => {
                        rest = &rest[h.framed_len()..];
                        next += 1;
                    }
                    other => break other,
                }
            };
            assert_eq!(
                stop,
                Decoded::End,
                "sealed segment {} goes on past its last record",
                path.display()
            );
        }
    }
    assert_eq!(seq, n, "segments hold fewer records than next_seq");
}

// ---------------------------------------------------------------------------------------
// Building values from fuzz bytes
// ---------------------------------------------------------------------------------------

/// A fuzz input read front to back, to build valid values from. Reads past its end give
/// zeros (and empty slices), so every input builds something.
pub struct FuzzBytes<'a>(&'a [u8]);

impl<'a> FuzzBytes<'a> {
    /// Reads `data` from its start.
    pub fn new(data: &'a [u8]) -> FuzzBytes<'a> {
        FuzzBytes(data)
    }

    /// The next byte, or 0.
    pub fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }

    /// The next `n` bytes, or as many as are left.
    pub fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.0.split_at(n.min(self.0.len()));
        self.0 = rest;
        head
    }

    /// Everything left.
    pub fn rest(&mut self) -> &'a [u8] {
        self.take(self.0.len())
    }

    /// An integer: a selector byte whose low three bits pick a width of 0, 1, 2, 3, 4, 5, 6
    /// or 8 bytes, read little endian; bit 3 set inverts the value bitwise (so few bytes
    /// reach values near `u64::MAX`, and negative numbers as `i64`).
    pub fn int(&mut self) -> u64 {
        const WIDTHS: [usize; 8] = [0, 1, 2, 3, 4, 5, 6, 8];
        let s = self.u8();
        let mut x = [0u8; 8];
        let b = self.take(WIDTHS[usize::from(s & 7)]);
        x[..b.len()].copy_from_slice(b);
        let x = u64::from_le_bytes(x);
        if s & 8 != 0 {
            !x
        } else {
            x
        }
    }

    /// A valid aggregate id or event type (see `check_name`): a length byte, then that many
    /// bytes read as lossy UTF-8, control characters replaced by `?`, cut to at most
    /// [`NAME_LEN_BYTES_MAX`] bytes on a character boundary; `"a"` if that leaves nothing.
    pub fn name(&mut self) -> String {
        let len = usize::from(self.u8());
        let raw = String::from_utf8_lossy(self.take(len));
        let mut name = String::with_capacity(raw.len());
        for c in raw.chars() {
            let c = if c.is_control() { '?' } else { c };
            if name.len() + c.len_utf8() > NAME_LEN_BYTES_MAX {
                break;
            }
            name.push(c);
        }
        if name.is_empty() {
            name.push('a');
        }
        name
    }

    /// Any string: a length byte, then that many bytes read as lossy UTF-8.
    pub fn string(&mut self) -> String {
        let len = usize::from(self.u8());
        String::from_utf8_lossy(self.take(len)).into_owned()
    }
}

// ---------------------------------------------------------------------------------------
// event_decode
// ---------------------------------------------------------------------------------------

/// First byte of an [`event_decode`] input that builds an event from the rest (see
/// [`build_event`]) instead of being the event record itself.
pub const EVENT_BUILD: u8 = 0;

/// Fuzz target body for the event encoding (`store::event`): `decode`, `decode_head` and
/// `encode`, against bincode 1.x, which the format is defined by (`docs/FORMAT.md`).
///
/// Input layout: if byte 0 is [`EVENT_BUILD`], the rest builds a valid event
/// ([`build_event`]); otherwise the whole input is an event record payload (its byte 0 is
/// the format version, so 0 would only be one more unknown version).
///
/// Checks on any bytes (see [`check_event_bytes`]): nothing panics; `decode` accepts
/// exactly what bincode deserializes (with a known version byte and content type) and
/// returns the same fields; `decode_head` accepts exactly what bincode deserializes as the
/// head struct, agrees with `decode`, and a `decode` success implies a `decode_head` one.
/// Re-encoding what was decoded gives bincode's encoding of the decoded event, which
/// decodes to the same event; it is byte for byte the input exactly when the input is
/// canonical (every varint in its shortest form and the extra metadata keys strictly
/// increasing; the format allows other varint forms, and `decode` does not sort or dedup
/// the extra pairs). Every strict prefix of a decodable input fails to decode, and
/// `decode_head` fails on the prefixes shorter than the head and succeeds with the same
/// head on the longer ones.
///
/// Checks on built events: the names pass `check_name`; `decode(encode(e)) == e`; the
/// encoding is bincode's, canonical, and its head is exactly as long as bincode's encoding
/// of the head; plus every check above on the encoding.
pub fn event_decode(data: &[u8]) {
    match data.split_first() {
        Some((&EVENT_BUILD, rest)) => {
            let built = build_event(rest);
            check_built_event(&built);
        }
        _ => {
            check_event_bytes(data.len() as u64, data);
        }
    }
}

/// A valid event built from fuzz bytes, and the back pointer it is stored with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuiltEvent {
    /// The event, with the seq to decode it at.
    pub event: RecordedEvent,
    /// Its back pointer.
    pub prev: Prev,
}

/// Flag bits of the first byte [`build_event`] reads.
pub mod event_flags {
    /// Set: binary payload; clear: JSON (not checked to be JSON, like `NewEvent::json_text`).
    pub const BINARY: u8 = 0x01;
    /// Bits 1..=2 pick the back pointer: 0 `First`, 1 `Seq`, 2 `Back`, 3 `Seq`.
    pub const PREV_SHIFT: u32 = 1;
    /// Set: a correlation id.
    pub const CORRELATION: u8 = 0x08;
    /// Set: a causation id.
    pub const CAUSATION: u8 = 0x10;
    /// Bits 5..=7: the number of extra metadata pairs read (duplicate keys collapse).
    pub const EXTRA_SHIFT: u32 = 5;
}

/// Builds a valid event from `data`, read as [`FuzzBytes`]: a flags byte
/// ([`event_flags`]), then as integers ([`FuzzBytes::int`]) the seq, version, back pointer
/// value (cut to `u32` for `Back`) and timestamp (as `i64`), 16 bytes of event id, the
/// aggregate id and event type ([`FuzzBytes::name`]), the correlation and causation ids if
/// flagged and the extra pairs ([`FuzzBytes::string`]), and the rest of the input as the
/// payload.
pub fn build_event(data: &[u8]) -> BuiltEvent {
    let mut r = FuzzBytes::new(data);
    let flags = r.u8();
    let seq = r.int();
    let version = r.int();
    let prev_value = r.int();
    let prev = match (flags >> event_flags::PREV_SHIFT) & 3 {
        0 => Prev::First,
        2 => Prev::Back(prev_value as u32),
        _ => Prev::Seq(prev_value),
    };
    let timestamp_us = r.int() as i64;
    let mut id = [0u8; 16];
    let b = r.take(16);
    id[..b.len()].copy_from_slice(b);
    let aggregate_id = r.name();
    let event_type = r.name();
    let correlation_id = (flags & event_flags::CORRELATION != 0).then(|| r.string());
    let causation_id = (flags & event_flags::CAUSATION != 0).then(|| r.string());
    let mut extra = BTreeMap::new();
    for _ in 0..flags >> event_flags::EXTRA_SHIFT {
        let k = r.string();
        extra.insert(k, r.string());
    }
    let content_type = if flags & event_flags::BINARY != 0 {
        ContentType::Binary
    } else {
        ContentType::Json
    };
    BuiltEvent {
        event: RecordedEvent {
            seq,
            aggregate_id,
            version,
            event_type,
            event_id: Uuid::from_bytes(id),
            timestamp_us,
            metadata: Metadata {
                correlation_id,
                causation_id,
                extra,
            },
            content_type,
            payload: r.rest().to_vec(),
        },
        prev,
    }
}

/// Encodes an event as the store does (`store::event::encode`), with back pointer `prev`.
pub fn encode_event(e: &RecordedEvent, prev: Prev) -> Vec<u8> {
    let new = NewEvent {
        event_type: e.event_type.clone(),
        payload: e.payload.clone(),
        content_type: e.content_type,
        event_id: Some(e.event_id),
        timestamp_us: Some(e.timestamp_us),
        metadata: e.metadata.clone(),
    };
    event::encode(&ResolvedEvent {
        aggregate_id: &e.aggregate_id,
        version: e.version,
        prev,
        event_id: e.event_id,
        timestamp_us: e.timestamp_us,
        event: &new,
    })
}

fn check_built_event(built: &BuiltEvent) {
    let e = &built.event;
    assert_eq!(
        event::check_name(&e.aggregate_id),
        Ok(()),
        "built aggregate id"
    );
    assert_eq!(event::check_name(&e.event_type), Ok(()), "built event type");
    let bytes = encode_event(e, built.prev);

    // The encoding is bincode's.
    let wire = Wire::of_owned(e, built.prev);
    assert_eq!(bytes, wire.to_bytes(), "encoding differs from bincode");

    // decode(encode(e)) == e, and the head.
    let back = event::decode(e.seq, &bytes)
        .unwrap_or_else(|err| panic!("an encoded event does not decode: {err}"));
    assert_eq!(&back.to_owned_event(), e, "decode(encode(e)) != e");
    let head = event::decode_head(&bytes)
        .unwrap_or_else(|err| panic!("an encoded event's head does not decode: {err}"));
    assert_eq!(head.prev, built.prev, "decoded back pointer");

    // The encoding is canonical; the head ends where bincode's encoding of it ends.
    let canonical = check_event_bytes(e.seq, &bytes);
    assert_eq!(canonical, Some(true), "an encoded event is not canonical");
    let head_len = 1 + bincode_options()
        .serialized_size(&WireHead::of(&head))
        .expect("sizing the head") as usize;
    assert_eq!(
        head_prefix_len(&bytes, &head),
        head_len,
        "decode_head needs a prefix other than the encoded head"
    );
}

/// The [`event_decode`] checks on one record payload. Returns `None` if it is not an event,
/// else whether it is canonical (re-encodes to exactly its bytes).
pub fn check_event_bytes(seq: u64, b: &[u8]) -> Option<bool> {
    let got = event::decode(seq, b);
    let head = event::decode_head(b);
    let versioned = match b.split_first() {
        Some((&EVENT_FORMAT_VERSION, rest)) => Some(rest),
        _ => None,
    };
    let wire: Option<Wire<'_>> = versioned
        .and_then(|rest| bincode_options().deserialize(rest).ok())
        .filter(|w: &Wire<'_>| content_type_of(w.content_type).is_some());
    let wire_head: Option<WireHead<'_>> = versioned.and_then(|rest| {
        bincode_options()
            .allow_trailing_bytes()
            .deserialize(rest)
            .ok()
    });

    // decode_head against bincode.
    match (&head, &wire_head) {
        (Ok(h), Some(w)) => assert_eq!(WireHead::of(h), *w, "decode_head disagrees with bincode"),
        (Err(_), None) => {}
        (h, w) => panic!("decode_head gives {h:?}, bincode {w:?}"),
    }

    // decode against bincode.
    let e = match (got, wire) {
        (Ok(e), Some(w)) => {
            let head = head
                .as_ref()
                .expect("decode accepted what decode_head refuses");
            assert_eq!(
                Wire::of_ref(&e, head.prev),
                w,
                "decode disagrees with bincode"
            );
            e
        }
        (Err(_), None) => return None,
        (got, w) => panic!("decode gives {got:?}, bincode {w:?}"),
    };
    let head = head.expect("checked above");
    assert_eq!(e.seq, seq, "decoded seq");
    assert_eq!(
        (
            head.aggregate_id,
            head.event_type,
            head.version,
            head.event_id
        ),
        (e.aggregate_id, e.event_type, e.version, e.event_id),
        "decode_head disagrees with decode"
    );

    // Re-encoding. Bincode writes every varint in its shortest form, so its encoding of the
    // decoded fields (extra pairs in their stored order) is the input exactly when the
    // input's varints are all shortest; encode also sorts and dedups the extra pairs.
    let owned = e.to_owned_event();
    let again = encode_event(&owned, head.prev);
    let shortest_varints = Wire::of_ref(&e, head.prev).to_bytes() == b;
    let extra_sorted = e.extra.windows(2).all(|p| p[0].0 < p[1].0);
    let canonical = shortest_varints && extra_sorted;
    assert_eq!(
        again == b,
        canonical,
        "re-encoding gives {} bytes (shortest varints: {shortest_varints}, extra sorted: \
         {extra_sorted})",
        if again == b { "the same" } else { "other" }
    );
    assert!(again.len() <= b.len(), "re-encoding is longer");
    assert_eq!(
        again,
        Wire::of_owned(&owned, head.prev).to_bytes(),
        "re-encoding differs from bincode"
    );
    let back = event::decode(seq, &again)
        .unwrap_or_else(|err| panic!("a re-encoded event does not decode: {err}"));
    assert_eq!(
        back.to_owned_event(),
        owned,
        "re-encoded event decodes differently"
    );
    assert_eq!(
        event::decode_head(&again).ok(),
        Some(head),
        "re-encoded head"
    );

    // Strict prefixes.
    head_prefix_len(b, &head);
    Some(canonical)
}

/// Checks every strict prefix of the decodable `b`: `decode` fails, `decode_head` fails up
/// to some length and from there on returns `head`. Returns that length.
fn head_prefix_len(b: &[u8], head: &EventHead<'_>) -> usize {
    let mut head_from = None;
    for k in 0..b.len() {
        let prefix = &b[..k];
        assert!(
            event::decode(0, prefix).is_err(),
            "a strict prefix of {k} of {} bytes decodes",
            b.len()
        );
        match event::decode_head(prefix) {
            Ok(h) => {
                assert_eq!(h, *head, "the head of a {k}-byte prefix");
                head_from.get_or_insert(k);
            }
            Err(_) => assert!(
                head_from.is_none(),
                "decode_head fails on {k} bytes but not on {head_from:?}"
            ),
        }
    }
    head_from.unwrap_or(b.len())
}

/// The options the event format is defined with (`docs/FORMAT.md`).
fn bincode_options() -> impl bincode::Options + Copy {
    bincode::DefaultOptions::new()
        .with_varint_encoding()
        .with_little_endian()
        .reject_trailing_bytes()
}

fn content_type_of(b: u8) -> Option<ContentType> {
    match b {
        1 => Some(ContentType::Json),
        2 => Some(ContentType::Binary),
        _ => None,
    }
}

fn content_type_byte(c: ContentType) -> u8 {
    match c {
        ContentType::Json => 1,
        ContentType::Binary => 2,
    }
}

/// An event as `docs/FORMAT.md` defines it: this struct in bincode, after the version byte.
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Wire<'a> {
    #[serde(borrow)]
    aggregate_id: &'a str,
    #[serde(borrow)]
    event_type: &'a str,
    version: u64,
    prev: Prev,
    event_id: [u8; 16],
    timestamp_us: i64,
    content_type: u8,
    #[serde(borrow)]
    correlation_id: Option<&'a str>,
    #[serde(borrow)]
    causation_id: Option<&'a str>,
    #[serde(borrow)]
    extra: Vec<(&'a str, &'a str)>,
    #[serde(with = "serde_bytes", borrow)]
    payload: &'a [u8],
}

impl<'a> Wire<'a> {
    fn of_ref(e: &EventRef<'a>, prev: Prev) -> Wire<'a> {
        Wire {
            aggregate_id: e.aggregate_id,
            event_type: e.event_type,
            version: e.version,
            prev,
            event_id: *e.event_id.as_bytes(),
            timestamp_us: e.timestamp_us,
            content_type: content_type_byte(e.content_type),
            correlation_id: e.correlation_id,
            causation_id: e.causation_id,
            extra: e.extra.clone(),
            payload: e.payload,
        }
    }

    fn of_owned(e: &'a RecordedEvent, prev: Prev) -> Wire<'a> {
        let m = &e.metadata;
        Wire {
            aggregate_id: &e.aggregate_id,
            event_type: &e.event_type,
            version: e.version,
            prev,
            event_id: *e.event_id.as_bytes(),
            timestamp_us: e.timestamp_us,
            content_type: content_type_byte(e.content_type),
            correlation_id: m.correlation_id.as_deref(),
            causation_id: m.causation_id.as_deref(),
            extra: m
                .extra
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect(),
            payload: &e.payload,
        }
    }

    /// The version byte, then bincode.
    fn to_bytes(&self) -> Vec<u8> {
        let mut out = vec![EVENT_FORMAT_VERSION];
        bincode_options()
            .serialize_into(&mut out, self)
            .expect("bincode serializes into a Vec");
        out
    }
}

/// The first five fields of [`Wire`]: what `decode_head` reads.
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
struct WireHead<'a> {
    #[serde(borrow)]
    aggregate_id: &'a str,
    #[serde(borrow)]
    event_type: &'a str,
    version: u64,
    prev: Prev,
    event_id: [u8; 16],
}

impl<'a> WireHead<'a> {
    fn of(h: &EventHead<'a>) -> WireHead<'a> {
        WireHead {
            aggregate_id: h.aggregate_id,
            event_type: h.event_type,
            version: h.version,
            prev: h.prev,
            event_id: *h.event_id.as_bytes(),
        }
    }
}

// ---------------------------------------------------------------------------------------
// index_key_decode
// ---------------------------------------------------------------------------------------

/// Fuzz target body for the index's key and value layouts (`index::keys`):
/// `decode_latest_bucket`, `find_in_latest_bucket`, `decode_name_key`, `decode_u64`,
/// `decode_seqs_delta` and their encoders.
///
/// Input layout: the whole input is given to every decoder as it is (an `aggregates`
/// value, a name key, a u64 value, a type postings value), and is also read as
/// [`FuzzBytes`] to build valid values ([`check_built_keys`]).
///
/// Checks on the raw bytes, against reference decoders written from `docs/FORMAT.md`
/// (LEB128: at most ten bytes, the tenth holding only bit 63): each decoder accepts exactly
/// what its reference accepts, with the same result, and nothing panics;
/// `find_in_latest_bucket` returns, for every name in the bucket and a name not in it,
/// the first matching entry before any malformed one (it reads no further and does not
/// check the other names' UTF-8), else "absent" if the whole value is well formed, else
/// `None`. Whatever decodes re-encodes to a value that decodes the same, and to exactly the
/// input bytes when the input's varints are all in their shortest form (always, for name
/// keys and u64 values, whose encodings are unique); decoded type postings are strictly
/// increasing.
pub fn index_key_decode(data: &[u8]) {
    check_latest_bucket_bytes(data);
    check_name_key_bytes(data);
    check_u64_bytes(data);
    check_seqs_delta_bytes(data);
    check_built_keys(data);
}

/// One LEB128 varint of a u64 at the start of `v`, from the format: seven bits a byte, low
/// bits first, the high bit set on every byte but the last; at most ten bytes, the tenth
/// holding only bit 63. Returns the value, its length in bytes, and whether that is the
/// shortest encoding of the value.
fn reference_leb128(v: &[u8]) -> Option<(u64, usize, bool)> {
    let mut x = 0u64;
    for i in 0..10 {
        let b = *v.get(i)?;
        let bits = u64::from(b & 0x7f);
        if i == 9 && bits > 1 {
            return None;
        }
        x |= bits << (7 * i);
        if b & 0x80 == 0 {
            return Some((x, i + 1, i == 0 || b != 0));
        }
    }
    None
}

/// An `aggregates` value read by the format: the entries before the first malformed one,
/// whether the value is well formed to its end (ignoring UTF-8), and whether all their
/// varints are shortest.
struct RefBucket<'a> {
    entries: Vec<(&'a [u8], u64, u64)>,
    complete: bool,
    shortest: bool,
}

fn reference_latest_bucket(mut v: &[u8]) -> RefBucket<'_> {
    let mut out = RefBucket {
        entries: Vec::new(),
        complete: false,
        shortest: true,
    };
    loop {
        let Some((&len, rest)) = v.split_first() else {
            out.complete = true;
            return out;
        };
        let len = usize::from(len);
        let Some(name) = rest.get(..len) else {
            return out;
        };
        let Some((version, n1, s1)) = reference_leb128(&rest[len..]) else {
            return out;
        };
        let Some((seq, n2, s2)) = reference_leb128(&rest[len + n1..]) else {
            return out;
        };
        out.entries.push((name, version, seq));
        out.shortest &= s1 && s2;
        v = &rest[len + n1 + n2..];
    }
}

fn check_latest_bucket_bytes(v: &[u8]) {
    let r = reference_latest_bucket(v);
    let utf8: Option<Vec<(&str, u64, u64)>> = r
        .entries
        .iter()
        .map(|&(n, ver, seq)| Some((std::str::from_utf8(n).ok()?, ver, seq)))
        .collect();
    let want = if r.complete { utf8 } else { None };
    let got = keys::decode_latest_bucket(v);
    assert_eq!(got, want, "decode_latest_bucket disagrees with the format");

    // find_in_latest_bucket: every name before the first malformed entry, and one absent.
    let mut names: Vec<&str> = r
        .entries
        .iter()
        .filter_map(|&(n, _, _)| std::str::from_utf8(n).ok())
        .collect();
    let mut absent = String::from("absent");
    while r.entries.iter().any(|&(n, _, _)| n == absent.as_bytes()) {
        absent.push('!');
    }
    names.push(&absent);
    for name in names {
        let first = r
            .entries
            .iter()
            .find(|&&(n, _, _)| n == name.as_bytes())
            .map(|&(_, ver, seq)| (ver, seq));
        let want = match first {
            Some(found) => Some(Some(found)),
            None if r.complete => Some(None),
            None => None,
        };
        assert_eq!(
            keys::find_in_latest_bucket(v, name),
            want,
            "find_in_latest_bucket({name:?})"
        );
    }

    if let Some(entries) = got {
        let again = keys::encode_latest_bucket(entries.iter().copied());
        assert_eq!(
            again == v,
            r.shortest,
            "re-encoding an aggregates value (shortest varints: {})",
            r.shortest
        );
        assert_eq!(
            keys::decode_latest_bucket(&again),
            Some(entries),
            "a re-encoded aggregates value decodes differently"
        );
    }
}

fn check_name_key_bytes(k: &[u8]) {
    let want = k.len().checked_sub(9).and_then(|at| {
        let (name, rest) = k.split_at(at);
        if rest[0] != 0 || name.contains(&0) {
            return None;
        }
        let n = u64::from_be_bytes(rest[1..].try_into().expect("eight bytes"));
        Some((std::str::from_utf8(name).ok()?, n))
    });
    let got = keys::decode_name_key(k);
    assert_eq!(got, want, "decode_name_key disagrees with the format");
    if let Some((name, n)) = got {
        assert_eq!(keys::name_key(name, n), k, "re-encoding a name key");
    }
}

fn check_u64_bytes(v: &[u8]) {
    let want = (v.len() == 8).then(|| u64::from_be_bytes(v.try_into().expect("eight bytes")));
    let got = keys::decode_u64(v);
    assert_eq!(got, want, "decode_u64");
    if let Some(x) = got {
        assert_eq!(x.to_be_bytes(), v, "re-encoding a u64 value");
    }
}

/// A type postings value read by the format: deltas as LEB128, the first seq relative to
/// 0, every later delta above 0, no seq past `u64::MAX`. Also whether every varint is
/// shortest.
fn reference_seqs_delta(mut v: &[u8]) -> Option<(Vec<u64>, bool)> {
    let mut seqs: Vec<u64> = Vec::new();
    let mut shortest = true;
    while !v.is_empty() {
        let (d, n, s) = reference_leb128(v)?;
        let seq = match seqs.last() {
            None => d,
            Some(_) if d == 0 => return None,
            Some(&p) => p.checked_add(d)?,
        };
        seqs.push(seq);
        shortest &= s;
        v = &v[n..];
    }
    Some((seqs, shortest))
}

fn check_seqs_delta_bytes(v: &[u8]) {
    let want = reference_seqs_delta(v);
    let got = keys::decode_seqs_delta(v);
    assert_eq!(
        got.as_ref(),
        want.as_ref().map(|(s, _)| s),
        "decode_seqs_delta disagrees with the format"
    );
    if let (Some(seqs), Some((_, shortest))) = (got, want) {
        assert!(
            seqs.windows(2).all(|p| p[0] < p[1]),
            "decoded postings are not strictly increasing"
        );
        let again = keys::encode_seqs_delta(&seqs);
        assert_eq!(
            again == v,
            shortest,
            "re-encoding type postings (shortest varints: {shortest})"
        );
        assert_eq!(
            keys::decode_seqs_delta(&again),
            Some(seqs),
            "re-encoded postings decode differently"
        );
    }
}

/// Builds valid keys and values from `data` (read as [`FuzzBytes`]) and checks them:
///
/// - name keys: two names (valid as `check_name` requires; the second extends the first
///   when byte 0 is odd) and two numbers. Each key decodes to its name and number; the keys
///   compare as (name bytes, number) do, which is what sled's byte order gives the index:
///   all keys of a name lie within `name_key(name, 0)..=name_key(name, u64::MAX)` and in
///   numeric order, and no other name's key does. Checkpoint versions and `chunk_start`
///   are consistent for the numbers, and the bucket of a name is below `AGG_BUCKETS`.
/// - a u64 value round-trips.
/// - an `aggregates` value: up to 15 entries (sorted and unique by name, as the index
///   writes them) round-trip, `find_in_latest_bucket` finds each and not an absent name,
///   and a prefix of the value decodes exactly when it ends on an entry boundary.
/// - type postings: up to 63 strictly increasing seqs round-trip, and a prefix of the value
///   decodes exactly when it ends on a varint boundary, to the seqs before it.
pub fn check_built_keys(data: &[u8]) {
    let mut r = FuzzBytes::new(data);
    let ctl = r.u8();

    // Name keys.
    let a = r.name();
    let b = if ctl & 1 != 0 {
        let mut b = a.clone();
        for c in r.name().chars() {
            if b.len() + c.len_utf8() > NAME_LEN_BYTES_MAX {
                break;
            }
            b.push(c);
        }
        b
    } else {
        r.name()
    };
    let (x, y) = (r.int(), r.int());
    for name in [&a, &b] {
        assert_eq!(event::check_name(name), Ok(()), "built name {name:?}");
        assert!(keys::agg_bucket(name) < keys::AGG_BUCKETS, "agg_bucket");
    }
    let (ka, kb) = (keys::name_key(&a, x), keys::name_key(&b, y));
    assert_eq!(keys::decode_name_key(&ka), Some((a.as_str(), x)));
    assert_eq!(keys::decode_name_key(&kb), Some((b.as_str(), y)));
    assert_eq!(
        ka.cmp(&kb),
        (a.as_bytes(), x).cmp(&(b.as_bytes(), y)),
        "name keys ({a:?}, {x}) and ({b:?}, {y}) sort out of (name, number) order"
    );
    let range_a = keys::name_key(&a, 0)..=keys::name_key(&a, u64::MAX);
    assert!(range_a.contains(&ka), "a key outside its name's range");
    assert_eq!(
        range_a.contains(&kb),
        a == b,
        "range of {a:?} and key of {b:?}"
    );
    // The type postings scan from bucket x: keys of the name from x on, nothing else.
    let from_x = keys::name_key(&a, x)..=keys::name_key(&a, u64::MAX);
    assert_eq!(from_x.contains(&kb), a == b && y >= x, "scan from {x}");
    for v in [x, y] {
        if v >= 1 {
            let c = keys::chunk_start(v);
            assert!(
                c <= v && v - c < keys::AGG_CHECKPOINT_VERSIONS,
                "chunk_start({v})"
            );
            assert!(c == 1 || keys::is_checkpoint_version(c), "chunk_start({v})");
            assert_eq!(
                keys::is_checkpoint_version(v),
                v > 1 && c == v,
                "checkpoint {v}"
            );
        }
    }

    // u64 values.
    assert_eq!(keys::decode_u64(&x.to_be_bytes()), Some(x));

    // An aggregates value.
    let n = usize::from(r.u8() & 15);
    let mut latest = BTreeMap::new();
    for _ in 0..n {
        let name = r.name();
        let version = r.int();
        latest.insert(name, (version, r.int()));
    }
    let entries: Vec<(&str, u64, u64)> = latest
        .iter()
        .map(|(name, &(ver, seq))| (name.as_str(), ver, seq))
        .collect();
    let value = keys::encode_latest_bucket(entries.iter().copied());
    assert_eq!(
        keys::decode_latest_bucket(&value).as_ref(),
        Some(&entries),
        "an aggregates value does not round-trip"
    );
    for &(name, ver, seq) in &entries {
        assert_eq!(
            keys::find_in_latest_bucket(&value, name),
            Some(Some((ver, seq))),
            "find_in_latest_bucket({name:?})"
        );
    }
    let mut absent = String::from("absent");
    while latest.contains_key(&absent) {
        absent.push('!');
    }
    assert_eq!(keys::find_in_latest_bucket(&value, &absent), Some(None));
    let mut boundaries = vec![0];
    for &e in &entries {
        boundaries.push(boundaries.last().unwrap() + keys::encode_latest_bucket([e]).len());
    }
    for k in 0..value.len() {
        let want = boundaries
            .iter()
            .position(|&at| at == k)
            .map(|i| entries[..i].to_vec());
        assert_eq!(
            keys::decode_latest_bucket(&value[..k]),
            want,
            "an aggregates value cut at {k}"
        );
    }

    // Type postings.
    let n = usize::from(r.u8() & 63);
    let mut seqs = Vec::with_capacity(n);
    let mut next = Some(r.int());
    for _ in 0..n {
        let Some(s) = next else { break };
        seqs.push(s);
        next = s.checked_add(r.int().max(1));
    }
    let value = keys::encode_seqs_delta(&seqs);
    assert_eq!(
        keys::decode_seqs_delta(&value).as_ref(),
        Some(&seqs),
        "type postings do not round-trip"
    );
    let mut boundaries = vec![0];
    let mut prev = 0;
    for (i, &s) in seqs.iter().enumerate() {
        let d = if i == 0 { s } else { s - prev };
        prev = s;
        boundaries.push(boundaries.last().unwrap() + keys::encode_seqs_delta(&[d]).len());
    }
    for k in 0..value.len() {
        let want = boundaries
            .iter()
            .position(|&at| at == k)
            .map(|i| seqs[..i].to_vec());
        assert_eq!(
            keys::decode_seqs_delta(&value[..k]),
            want,
            "type postings cut at {k}"
        );
    }
}

/// A unique scratch directory under `std::env::temp_dir()`, removed on drop.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new() -> ScratchDir {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let path = std::env::temp_dir().join(format!(
            "eventlog-fuzz-{}-{}-{nanos}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).expect("creating a scratch directory");
        ScratchDir(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The sync offset of the record at `at`: header bytes 17..20, a u24 little endian (read
/// here from the format description, not by the decoder under test).
fn sync_offset_field(b: &[u8], at: usize) -> u32 {
    u32::from(b[at + 17]) | u32::from(b[at + 18]) << 8 | u32::from(b[at + 19]) << 16
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}
