//! Replays the committed fuzz corpus (`fuzz/corpus/<target>/`) through the fuzz target
//! bodies in `eventlog::fuzzing`, so `cargo test` (and CI) exercises them without
//! cargo-fuzz. A crash reproducer added to a corpus directory fails here until fixed.
//!
//! The seed files are made by the generators at the end of this file; the test
//! `seed_corpus_matches_its_generators` keeps them in step.

use eventlog::fuzzing::{self, ctl, event_flags, EVENT_BUILD};
use eventlog::index::keys;
use eventlog::log::record::{encode_into, FLAG_BATCH_END};
use eventlog::log::segment::encode_segment_header;
use eventlog::store::event::{Prev, EVENT_FORMAT_VERSION};
use eventlog::store::{ContentType, Metadata, RecordedEvent};
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

#[test]
fn event_decode_corpus() {
    replay("event_decode", fuzzing::event_decode);
}

#[test]
fn index_key_decode_corpus() {
    replay("index_key_decode", fuzzing::index_key_decode);
}

// ---------------------------------------------------------------------------------------
// Seed corpus generation
// ---------------------------------------------------------------------------------------

/// Frames records `(seq, flags, payload)` back to back, each with sync offset 0 (all
/// earlier records durable when it was written).
fn records(recs: &[(u64, u8, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for &(seq, flags, payload) in recs {
        encode_into(&mut out, seq, flags, 0, payload);
    }
    out
}

/// Seq 0, synced; then seqs 1..=3 written with sync mark 1, record 2 lost (its bytes zero):
/// the pages of a torn write that landed out of order.
fn write_with_a_hole() -> Vec<u8> {
    let mut out = records(&[(0, END, b"acked")]);
    for (seq, flags) in [(1, 0), (2, END), (3, END)] {
        let at = out.len();
        encode_into(&mut out, seq, flags, seq - 1, b"torn write");
        if seq == 2 {
            out[at..].fill(0);
        }
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
    let mut past_seq = records(&[(0, END, b"offset")]);
    past_seq[18] = 1; // sync offset 256 in record 0, then fix the checksum
    let crc = crc32fast::hash(&past_seq[4..]);
    past_seq[..4].copy_from_slice(&crc.to_le_bytes());
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
        ("seed-sync-offset-past-seq", with(&[0, 0], &past_seq)),
        (
            "seed-write-with-a-hole",
            with(&[0, 0], &write_with_a_hole()),
        ),
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
        ("seed-write-with-a-hole", with(&[0], &write_with_a_hole())),
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

/// An event with every field set, for `event_decode` seeds.
fn full_event() -> RecordedEvent {
    RecordedEvent {
        seq: 41,
        aggregate_id: "order-1".into(),
        version: 300,
        event_type: "OrderPlaced".into(),
        event_id: uuid::Uuid::from_u128(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef),
        timestamp_us: -1_700_000_000_000_000,
        metadata: Metadata {
            correlation_id: Some("req-17".into()),
            causation_id: Some("cmd-9".into()),
            extra: [("k", "v"), ("tenant", "acme"), ("z", "")]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
        },
        content_type: ContentType::Json,
        payload: br#"{"total":12,"items":["a","b"]}"#.to_vec(),
    }
}

/// A small event written by hand from `docs/FORMAT.md`, with its varints and extra pairs
/// given as bytes, so seeds can hold encodings `encode` never makes: `[1][01 'a'][01 'T']
/// [version][prev][id: 16 zeros][timestamp 0][content type][no ids][extra][payload "p"]`.
fn hand_event(version: &[u8], prev: &[u8], content_type: u8, extra: &[(&str, &str)]) -> Vec<u8> {
    let mut v = vec![EVENT_FORMAT_VERSION, 1, b'a', 1, b'T'];
    v.extend_from_slice(version);
    v.extend_from_slice(prev);
    v.extend_from_slice(&[0; 16]);
    v.extend_from_slice(&[0, content_type, 0, 0, extra.len() as u8]);
    for (k, val) in extra {
        v.push(k.len() as u8);
        v.extend_from_slice(k.as_bytes());
        v.push(val.len() as u8);
        v.extend_from_slice(val.as_bytes());
    }
    v.extend_from_slice(&[1, b'p']);
    v
}

/// A length byte, then the bytes (a `FuzzBytes` name or string).
fn lp(bytes: &[u8]) -> Vec<u8> {
    with(&[bytes.len() as u8], bytes)
}

fn seeds_event_decode() -> Vec<(&'static str, Vec<u8>)> {
    let full = fuzzing::encode_event(&full_event(), Prev::Seq(1 << 40));
    let mut minimal = full_event();
    minimal.metadata = Metadata::default();
    minimal.payload.clear();
    minimal.version = 1;
    let mut back = full_event();
    back.content_type = ContentType::Binary;
    back.payload = (0..=255).collect();
    back.version = u64::MAX;
    back.timestamp_us = i64::MIN;
    let mut version_2 = full.clone();
    version_2[0] = 2;
    let mut bad_utf8 = hand_event(&[1], &[0], 1, &[]);
    bad_utf8[2] = 0xff;
    // Build mode: [EVENT_BUILD][flags][seq][version][prev][timestamp][id][names][ids][extra]
    // [payload]; integers are a width selector and little-endian bytes.
    let flags = event_flags::BINARY
        | (1 << event_flags::PREV_SHIFT)
        | event_flags::CORRELATION
        | event_flags::CAUSATION
        | (3 << event_flags::EXTRA_SHIFT);
    let build_full = [
        &[EVENT_BUILD, flags][..],
        &[7, 1, 2, 3, 4, 5, 6, 7, 8],     // seq: 8 bytes
        &[2, 0x2c, 0x01],                 // version 300
        &[4, 0, 0, 0, 1],                 // prev seq 1 << 24
        &[8 | 7, 0, 0, 0, 0, 0, 0, 0, 0], // timestamp -1
        &[0xab; 16],
        &lp("ordér-1".as_bytes()),
        &lp(b"OrderPlaced"),
        &lp(b"req-17"),
        &lp(b"cmd-9"),
        &lp(b"k"),
        &lp(b"v"),
        &lp(b"a"),
        &lp(b""),
        &lp(b"k"), // a duplicate key: the later value wins
        &lp(b"w"),
        b"\x00\x01binary payload\xff",
    ]
    .concat();
    let build_back = [
        &[EVENT_BUILD, 2 << event_flags::PREV_SHIFT][..],
        &[1, 9],                 // seq 9
        &[1, 251],               // version 251: a three-byte varint
        &[3, 0xff, 0xff, 1],     // back 0x1ffff
        &[8 | 5, 0, 0, 0, 0, 0], // timestamp -(1 << 40)
        &[0; 16],
        &lp(b"a\x00b\x7fc\xff"), // control characters and bad UTF-8, made valid
        &lp(&[0xc3; 255]),       // a long invalid name: cut to 255 bytes
        br#"{"x":1}"#,
    ]
    .concat();
    vec![
        // Raw mode: the input is an event record payload.
        ("seed-full", full.clone()),
        ("seed-minimal", fuzzing::encode_event(&minimal, Prev::First)),
        (
            "seed-back-binary",
            fuzzing::encode_event(&back, Prev::Back(3)),
        ),
        (
            "seed-hand",
            hand_event(&[1], &[0], 1, &[("a", "1"), ("b", "")]),
        ),
        (
            "seed-long-varints",
            hand_event(&[251, 1, 0], &[1, 252, 5, 0, 0, 0], 2, &[]),
        ),
        (
            "seed-unsorted-extra",
            hand_event(&[1], &[0], 1, &[("z", ""), ("a", "1")]),
        ),
        (
            "seed-duplicate-extra",
            hand_event(&[1], &[0], 1, &[("k", "1"), ("k", "2")]),
        ),
        ("seed-truncated", full[..full.len() - 3].to_vec()),
        ("seed-trailing-byte", with(&full, &[0])),
        ("seed-version-2", version_2),
        ("seed-bad-content-type", hand_event(&[1], &[0], 3, &[])),
        ("seed-bad-prev", hand_event(&[1], &[3], 1, &[])),
        (
            "seed-back-too-big",
            hand_event(&[1], &[2, 253, 0, 0, 0, 0, 1, 0, 0, 0], 1, &[]),
        ),
        ("seed-bad-utf8", bad_utf8),
        // Build mode.
        ("seed-build-zeros", vec![EVENT_BUILD]),
        ("seed-build-full", build_full),
        ("seed-build-back", build_back),
    ]
}

fn seeds_index_key_decode() -> Vec<(&'static str, Vec<u8>)> {
    let bucket = keys::encode_latest_bucket([("a", 1, 0), ("order-7", 300, 1 << 40)]);
    // Every input is also read to build keys: [ctl][name a][name b][x][y][n][n x (name,
    // version, seq)][m][m seq deltas], integers as a width selector and little-endian bytes.
    let built = [
        &[1][..],
        &lp(b"order"),
        &lp(b"-1"),
        &[1, 65],
        &[8, 0],
        &[3],
        &lp("é".as_bytes()),
        &[2, 0x2c, 0x01],
        &[1, 7],
        &lp(b"order-1"),
        &[8],
        &[7, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
        &lp(b"order-1"), // a duplicate: the later entry wins
        &[1, 1],
        &[1, 2],
        &[5],
        &[0],
        &[1, 1],
        &[2, 0, 0x10],
        &[8 | 7, 0, 0, 0, 0, 0, 0, 0, 0x80],
        &[1, 1],
    ]
    .concat();
    vec![
        // Raw: every decoder reads the whole input.
        ("seed-latest-bucket", bucket.clone()),
        (
            "seed-latest-bucket-max",
            keys::encode_latest_bucket([("x", u64::MAX, u64::MAX)]),
        ),
        (
            "seed-latest-bucket-long-varint",
            vec![1, b'a', 0x81, 0x00, 0x80, 0x80, 0x00],
        ),
        (
            // A tenth varint byte above 1: past u64::MAX, malformed (the decoder used to
            // drop the high bits; found by this target).
            "seed-latest-bucket-varint-overflow",
            [&[1, b'a'][..], &[0xff; 9], &[0x02, 0]].concat(),
        ),
        (
            "seed-latest-bucket-bad-utf8",
            vec![1, 0xff, 1, 1, 1, b'a', 2, 3],
        ),
        (
            "seed-latest-bucket-truncated",
            bucket[..bucket.len() - 1].to_vec(),
        ),
        ("seed-name-key", keys::name_key("order-1", 9)),
        ("seed-name-key-max", keys::name_key("é", u64::MAX)),
        (
            "seed-name-key-zero-in-name",
            b"a\0b\0\0\0\0\0\0\0\0\x01".to_vec(),
        ),
        ("seed-u64", 0x0102_0304_0506_0708u64.to_be_bytes().to_vec()),
        (
            "seed-seqs-delta",
            keys::encode_seqs_delta(&[0, 1, 5, 4096, 1 << 40, u64::MAX]),
        ),
        ("seed-seqs-delta-zero-delta", vec![1, 0]),
        (
            "seed-seqs-delta-long-varint",
            vec![0x85, 0x00, 0x81, 0x80, 0x00],
        ),
        (
            "seed-seqs-delta-overflow",
            [&[0xff; 9][..], &[0x02]].concat(),
        ),
        (
            "seed-seqs-delta-past-max",
            [&keys::encode_seqs_delta(&[u64::MAX])[..], &[1]].concat(),
        ),
        // Built: mostly read by the builder.
        ("seed-built", built),
        ("seed-empty", Vec::new()),
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
        ("event_decode", seeds_event_decode()),
        ("index_key_decode", seeds_index_key_decode()),
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
