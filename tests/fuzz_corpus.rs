//! Replays the committed fuzz corpus (`fuzz/corpus/<target>/`) through the fuzz target
//! bodies in `eventlog::fuzzing`, so `cargo test` (and CI) exercises them without
//! cargo-fuzz. A crash reproducer added to a corpus directory fails here until fixed.
//!
//! The seed files are made by the generators at the end of this file; the test
//! `seed_corpus_matches_its_generators` keeps them in step.

use eventlog::fuzzing::{self, ctl};
use eventlog::log::record::{encode_into, FLAG_BATCH_END};
use eventlog::log::segment::encode_segment_header;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz")
        .join("corpus")
        .join(target)
}

/// Runs `body` over every file of the target's corpus directory, which must not be empty,
/// and reports every file that panics.
fn replay(target: &str, body: fn(&[u8])) {
    let dir = corpus_dir(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus directory {}: {e}", dir.display()))
        .map(|e| e.expect("reading the corpus directory").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} holds no corpus files", dir.display());
    let mut failed = Vec::new();
    for file in &files {
        let data = std::fs::read(file).expect("reading a corpus file");
        if catch_unwind(AssertUnwindSafe(|| body(&data))).is_err() {
            failed.push(file.display().to_string());
        }
    }
    assert!(
        failed.is_empty(),
        "{target}: {} of {} corpus files fail:\n{}",
        failed.len(),
        files.len(),
        failed.join("\n")
    );
}

#[test]
fn record_decode_corpus() {
    replay("record_decode", fuzzing::record_decode);
}

#[test]
fn segment_recover_corpus() {
    replay("segment_recover", fuzzing::segment_recover);
}

// ---------------------------------------------------------------------------------------
// Seed corpus generation
// ---------------------------------------------------------------------------------------

/// Frames records `(seq, flags, payload)` back to back.
fn records(recs: &[(u64, u8, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for &(seq, flags, payload) in recs {
        encode_into(&mut out, seq, flags, payload);
    }
    out
}

const END: u8 = FLAG_BATCH_END;

/// Seqs `first..first + n`, in appends of `batch` records, payloads of varying length.
fn batches(first: u64, n: u64, batch: u64) -> Vec<u8> {
    let payloads: Vec<Vec<u8>> = (first..first + n)
        .map(|s| vec![b'a' + (s % 26) as u8; (s % 7 * 3) as usize])
        .collect();
    let recs: Vec<(u64, u8, &[u8])> = (first..first + n)
        .zip(&payloads)
        .map(|(s, p)| {
            let last_of_batch = (s - first + 1).is_multiple_of(batch) || s + 1 == first + n;
            (s, if last_of_batch { END } else { 0 }, p.as_slice())
        })
        .collect();
    records(&recs)
}

fn with(prefix: &[u8], rest: &[u8]) -> Vec<u8> {
    let mut v = prefix.to_vec();
    v.extend_from_slice(rest);
    v
}

fn flip(mut bytes: Vec<u8>, at: usize) -> Vec<u8> {
    bytes[at] ^= 0x10;
    bytes
}

fn seeds_record_decode() -> Vec<(&'static str, Vec<u8>)> {
    let seg = with(&encode_segment_header(0), &batches(0, 6, 2));
    let three = batches(0, 3, 1);
    let mut reserved = records(&[(0, END, b"reserved")]);
    reserved[18] = 1; // non-zero reserved byte, then fix the checksum
    let crc = crc32fast::hash(&reserved[4..]);
    reserved[..4].copy_from_slice(&crc.to_le_bytes());
    vec![
        // [ctl: payload_len_max selector, scan start, buffer...]
        (
            "seed-one-record",
            with(&[0, 0], &records(&[(0, END, b"hello")])),
        ),
        (
            "seed-empty-payload",
            with(&[1, 0], &records(&[(3, END, b"")])),
        ),
        (
            "seed-batches-incomplete-tail",
            with(
                &[1, 0],
                &with(&batches(5, 5, 3), &records(&[(10, 0, b"x")])),
            ),
        ),
        ("seed-segment", with(&[1, 32], &seg)),
        ("seed-torn", with(&[0, 0], &three[..three.len() - 5])),
        ("seed-bit-flipped", with(&[1, 0], &flip(three.clone(), 30))),
        (
            "seed-zero-hole",
            with(
                &[0, 0],
                &[
                    records(&[(0, END, b"aaaa")]),
                    vec![0; 40],
                    records(&[(2, END, b"cccc")]),
                ]
                .concat(),
            ),
        ),
        (
            "seed-too-long-for-max",
            with(&[2 | (8 << 2), 0], &records(&[(0, END, b"0123456789")])),
        ),
        ("seed-reserved", with(&[0, 0], &reserved)),
        ("seed-zeros", vec![0; 64]),
    ]
}

/// Splits `first` and `second` (record bytes) into a two-segment input: finds a split byte
/// and zero padding such that the split falls exactly after `first`.
fn two_segments(c: u8, first: &[u8], second: &[u8]) -> Vec<u8> {
    for pad in 0..1024 {
        for split in 1..=255u8 {
            let body_len = first.len() + pad + second.len();
            if body_len * usize::from(split) / 255 == first.len() + pad {
                let mut v = vec![c, split];
                v.extend_from_slice(first);
                v.resize(v.len() + pad, 0);
                v.extend_from_slice(second);
                return v;
            }
        }
    }
    unreachable!("no padding puts the split after the first segment");
}

/// A header-mode input with a recovery point at an arbitrary offset (odd selector byte)
/// that lands exactly on the record boundary `boundary` of `body` (after the segment
/// header), found by padding `body` with zeros.
fn arbitrary_recovery_point_at(body: &[u8], boundary: usize) -> Vec<u8> {
    for pad in 0..1024 {
        let len = body.len() + pad;
        for k in 0..127u8 {
            if len * usize::from(k) / 127 == boundary {
                let mut v = vec![ctl::RECOVERY_POINT, (k << 1) | 1];
                v.extend_from_slice(body);
                v.resize(v.len() + pad, 0);
                return v;
            }
        }
    }
    unreachable!("no recovery point selector hits the boundary");
}

fn seeds_segment_recover() -> Vec<(&'static str, Vec<u8>)> {
    // Raw mode: the input is the segment file (its first byte 'E' is odd); the last byte's
    // bit 1 asks for repair, so a trailing zero byte (harmless past the records) turns it off.
    let raw = with(&encode_segment_header(0), &batches(0, 7, 3));
    let no_repair = |v: Vec<u8>| with(&v, &[0]);
    // Header mode: control byte, then records after a generated segment header.
    // Record sizes of `body`: 20, 23, 26, 29, 32, 35 bytes.
    let body = batches(0, 6, 2);
    let two = ctl::TWO_SEGMENTS | ctl::SECOND_HEADER | ctl::SECOND_BASE_FROM_SCAN;
    let two_base_4 = ctl::TWO_SEGMENTS | ctl::SECOND_HEADER | (3 << ctl::SECOND_BASE_SHIFT);
    let first = batches(0, 4, 2);
    let second = batches(4, 3, 3);
    vec![
        ("seed-raw-segment", no_repair(raw.clone())),
        ("seed-raw-torn", raw[..raw.len() - 7].to_vec()),
        (
            "seed-raw-damage",
            no_repair(flip(raw.clone(), 32 + 20 + 23 + 22)),
        ),
        (
            "seed-raw-damage-repair",
            flip(raw.clone(), 32 + 20 + 23 + 22),
        ),
        (
            "seed-raw-incomplete-append",
            no_repair(with(&raw, &records(&[(7, 0, b"never finished")]))),
        ),
        ("seed-zeros", vec![0; 64]),
        ("seed-records", with(&[0], &body)),
        (
            "seed-repair-damage",
            with(&[ctl::REPAIR], &flip(body.clone(), 50)),
        ),
        ("seed-two-segments", two_segments(two, &first, &second)),
        (
            "seed-two-segments-sealed-damage",
            two_segments(two_base_4, &flip(first.clone(), 45), &second),
        ),
        (
            // The sealed segment ends with a record of an append that never finished; the
            // next segment starts at that record's seq. Recovery keeps neither copy's
            // duplicate: seq 4 comes from the second segment.
            "seed-two-segments-sealed-unfinished-tail",
            two_segments(
                two,
                &with(&first, &records(&[(4, 0, b"unfinished")])),
                &second,
            ),
        ),
        (
            "seed-two-segments-torn-second",
            two_segments(two, &first, &second[..second.len() - 3]),
        ),
        (
            "seed-recovery-point-valid",
            with(&[ctl::RECOVERY_POINT, 0], &body),
        ),
        (
            // A payload byte of seq 1 flipped below a recovery point that claims it was
            // verified: opens, and reading seq 1 reports corruption.
            "seed-recovery-point-over-damage",
            arbitrary_recovery_point_at(&flip(body.clone(), 41), 20 + 23 + 26),
        ),
    ]
}

/// The committed seeds are exactly what the generators below make, so a format change
/// cannot leave the corpus stale. After a deliberate format change, rewrite them with
/// `EVENTLOG_WRITE_SEEDS=1 cargo test --test fuzz_corpus`.
#[test]
fn seed_corpus_matches_its_generators() {
    let write = std::env::var_os("EVENTLOG_WRITE_SEEDS").is_some();
    for (target, seeds) in [
        ("record_decode", seeds_record_decode()),
        ("segment_recover", seeds_segment_recover()),
    ] {
        let dir = corpus_dir(target);
        std::fs::create_dir_all(&dir).expect("creating the corpus directory");
        for (name, bytes) in seeds {
            let path = dir.join(name);
            if write {
                std::fs::write(&path, &bytes).expect("writing a seed");
            } else {
                let committed =
                    std::fs::read(&path).unwrap_or_else(|e| panic!("seed {}: {e}", path.display()));
                assert_eq!(
                    committed,
                    bytes,
                    "seed {} differs from its generator; see this test's doc",
                    path.display()
                );
            }
        }
    }
}
