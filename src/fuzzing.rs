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

use crate::log::record::{
    decode, encode_into, framed_len, peek_header, Decoded, InvalidReason, RecordHeader,
    FLAG_BATCH_END, RECORD_HEADER_SIZE_BYTES, RECORD_PAYLOAD_SIZE_BYTES_LIMIT,
};
use crate::log::segment::{
    decode_segment_header, encode_segment_header, parse_file_name, scan_records, segment_file_name,
    valid_record_after, walk_headers, Scan, ScanStop, SEGMENT_HEADER_SIZE_BYTES, SEGMENT_SUFFIX,
};
use crate::log::{Log, LogOptions, OpenError, ReadError, LOG_DIR_NAME, RECOVERY_POINT_FILE};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

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
        let mut framed = Vec::new();
        encode_into(&mut framed, first_seq, flags, buf);
        let want = RecordHeader {
            seq: first_seq,
            flags,
            payload_len: buf.len() as u32,
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
/// a record cut short; then the checksum over bytes 4..20+len; then flags and reserved.
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
    if buf[16] & !FLAG_BATCH_END != 0 || buf[17..20].iter().any(|&b| b != 0) {
        return Decoded::Invalid(InvalidReason::Reserved);
    }
    Decoded::Record(RecordHeader {
        seq: le_u64(buf, 8),
        flags: buf[16],
        payload_len,
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
    let valid_after = first_valid_after(valid, stop_at);
    match &scan.stop {
        ScanStop::End => {
            assert_eq!(stopped_on, Decoded::End, "scan said End at {stop_at}");
            assert_eq!(valid_after, None, "End, but a valid record follows");
        }
        ScanStop::TornTail { offset_bytes, .. } => {
            assert_eq!(*offset_bytes, stop_at as u64, "torn tail offset");
            assert_ne!(stopped_on, Decoded::End, "torn tail at the end of the log");
            assert_eq!(valid_after, None, "torn tail, but a valid record follows");
        }
        ScanStop::Damage { offset_bytes, .. } => {
            assert_eq!(*offset_bytes, stop_at as u64, "damage offset");
            assert!(valid_after.is_some(), "damage, but no valid record follows");
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
        assert_eq!(decode_segment_header(&bytes), Ok(base), "segment header");
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
                encode_into(&mut again, seq, framed[16], payload);
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

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}
