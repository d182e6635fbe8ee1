//! Recovery: torn tails are cut, damage is refused or quarantined, nothing bad is served.

use crate::common::{all_payloads, copy_dir, open, payload_for, segment_files, small_options};
use eventlog::log::record::{decode, framed_len, Decoded};
use eventlog::log::segment::{
    decode_segment_header, SEGMENT_FORMAT_VERSION, SEGMENT_HEADER_SIZE_BYTES,
};
use eventlog::log::{Log, OpenError, ReadError, QUARANTINE_DIR};
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;

/// Writes `n` single-record appends and returns the crash image's directory (the log was
/// still open when copied, so no clean-close recovery point exists).
fn crash_image(n: u64, len: usize) -> (tempfile::TempDir, Vec<Vec<u8>>) {
    let live = tempfile::tempdir().unwrap();
    let log = open(live.path(), small_options());
    let mut payloads = Vec::new();
    for seq in 0..n {
        let p = payload_for(seq, len);
        log.append(&[&p]).unwrap();
        payloads.push(p);
    }
    let image = tempfile::tempdir().unwrap();
    copy_dir(live.path(), image.path());
    drop(log);
    (image, payloads)
}

#[test]
fn recovery_keeps_exactly_the_records_before_a_torn_last_record_at_every_cut() {
    let len = 37;
    let (image, payloads) = crash_image(5, len);
    let seg = segment_files(image.path()).pop().unwrap();
    let full_len = std::fs::metadata(&seg).unwrap().len();
    let last_start = full_len - framed_len(len) as u64;
    for cut in 0..framed_len(len) as u64 {
        for zero_fill in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            copy_dir(image.path(), dir.path());
            let seg = segment_files(dir.path()).pop().unwrap();
            let f = OpenOptions::new().write(true).open(&seg).unwrap();
            if zero_fill {
                let zeros = vec![0u8; (full_len - last_start - cut) as usize];
                f.write_all_at(&zeros, last_start + cut).unwrap();
            } else {
                f.set_len(last_start + cut).unwrap();
            }
            drop(f);
            let log = open(dir.path(), small_options());
            assert_eq!(
                all_payloads(&log),
                payloads[..4],
                "cut {cut} zero_fill {zero_fill}"
            );
            assert_eq!(
                log.append(&[b"next"]).unwrap(),
                4..5,
                "appends resume at the cut"
            );
            drop(log);
            // Idempotent: a second open finds nothing more to do and the same records.
            let log = open(dir.path(), small_options());
            assert_eq!(log.recovery_report().truncated_tail_bytes, 0);
            assert_eq!(log.next_seq(), 5);
        }
    }
}

#[test]
fn unfinished_multi_record_append_disappears_whole() {
    let live = tempfile::tempdir().unwrap();
    let log = open(live.path(), small_options());
    log.append(&[b"one".as_slice()]).unwrap();
    log.append(&[b"two".as_slice(), b"three".as_slice(), b"four".as_slice()])
        .unwrap();
    let image = tempfile::tempdir().unwrap();
    copy_dir(live.path(), image.path());
    drop(log);
    let seg = segment_files(image.path()).pop().unwrap();
    let len = std::fs::metadata(&seg).unwrap().len();
    // Cut inside the last record of the three-record append.
    OpenOptions::new()
        .write(true)
        .open(&seg)
        .unwrap()
        .set_len(len - 2)
        .unwrap();
    let log = open(image.path(), small_options());
    assert_eq!(all_payloads(&log), vec![b"one".to_vec()]);
    assert!(log.recovery_report().truncated_tail_bytes > 0);
}

#[test]
fn the_recovery_point_follows_the_synced_end_so_a_crash_verifies_at_most_a_step() {
    const STEP_BYTES: u64 = 32 << 10;
    // Written by the preallocation thread, or by the appender when there is none.
    for in_background in [true, false] {
        let live = tempfile::tempdir().unwrap();
        let mut options = small_options();
        options.segment_size_bytes = 1 << 20;
        options.preallocate_chunk_bytes = 16 << 10;
        options.preallocate_in_background = in_background;
        options.recovery_point_step_bytes = STEP_BYTES;
        let log = open(live.path(), options.clone());
        let mut payloads = Vec::new();
        // About 600 KiB in one segment, four records an append.
        for i in 0..600u64 {
            let group: Vec<Vec<u8>> = (0..4).map(|j| payload_for(i * 4 + j, 250)).collect();
            log.append(&group).unwrap();
            payloads.extend(group);
        }
        let group_bytes = 4 * framed_len(250) as u64;
        // The thread writes the point after the append that asked for it returned: look
        // at crash images until one shows it (bounded).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let (image, verified_bytes) = loop {
            let image = tempfile::tempdir().unwrap();
            copy_dir(live.path(), image.path());
            let reopened = open(image.path(), options.clone());
            let verified = reopened.recovery_report().verified_bytes;
            assert_eq!(all_payloads(&reopened), payloads);
            drop(reopened);
            if verified <= STEP_BYTES + group_bytes || std::time::Instant::now() > deadline {
                break (image, verified);
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        assert!(
            verified_bytes <= STEP_BYTES + group_bytes,
            "in_background {in_background}: a crash image verified {verified_bytes} bytes"
        );
        drop(log);
        drop(image);
    }
}

/// Writes a log in `dir` (small options): records `0..count` of `payload_for(seq, 100)`,
/// one append each; then closes it.
fn write_records(dir: &std::path::Path, count: u64) {
    let log = open(dir, small_options());
    for seq in 0..count {
        log.append(&[payload_for(seq, 100)]).unwrap();
    }
    drop(log);
}

#[test]
fn clean_close_leaves_nothing_to_verify_and_crash_verifies_only_the_tail() {
    let dir = tempfile::tempdir().unwrap();
    write_records(dir.path(), 2000);
    let log = open(dir.path(), small_options());
    assert_eq!(
        log.recovery_report().verified_bytes,
        0,
        "{:?}",
        log.recovery_report()
    );
    assert_eq!(log.next_seq(), 2000);
    log.append(&[b"after reopen"]).unwrap();
    let image = tempfile::tempdir().unwrap();
    copy_dir(dir.path(), image.path());
    drop(log);
    let log = open(image.path(), small_options());
    // Only what was written since the recovery point (one record) needs its checksum verified.
    assert_eq!(log.recovery_report().verified_bytes, framed_len(12) as u64);
    assert_eq!(log.next_seq(), 2001);
}

fn flip_byte(path: &std::path::Path, offset: u64) {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).unwrap();
    b[0] ^= 0x10;
    f.write_all_at(&b, offset).unwrap();
}

#[test]
fn bit_flip_in_sealed_segment_is_reported_and_never_served() {
    let dir = tempfile::tempdir().unwrap();
    write_records(dir.path(), 3000);
    let segs = segment_files(dir.path());
    assert!(segs.len() >= 3);
    // Record 10 of the first segment: header 32 bytes, then 120-byte records.
    let record_offset = 32 + 10 * framed_len(100) as u64;
    flip_byte(&segs[0], record_offset + 50);

    // The sealed segment has an offset index, so open does not scan it; the read does.
    let log = open(dir.path(), small_options());
    match log.read(10) {
        Err(ReadError::Corrupt { seq, site }) => {
            assert_eq!(seq, 10);
            assert_eq!(site.segment, segs[0]);
            assert_eq!(site.offset_bytes, record_offset);
        }
        other => panic!("expected corruption, got {other:?}"),
    }
    assert_eq!(log.read(9).unwrap().payload(), payload_for(9, 100));
    let served: Vec<_> = log.iter_from(0).collect();
    assert_eq!(served.len(), 11, "iteration stops at the damaged record");
    assert!(served[10].is_err());
    drop(log);

    // Without the offset index, open rebuilds it by scanning and refuses the damage.
    std::fs::remove_file(segs[0].with_extension("idx")).unwrap();
    match Log::open(dir.path(), small_options()) {
        Err(OpenError::Corrupt { site }) => {
            assert_eq!(site.segment, segs[0]);
            assert_eq!(site.offset_bytes, record_offset);
        }
        other => panic!("expected corruption, got {other:?}"),
    }
}

#[test]
fn damage_before_valid_records_in_last_segment_is_refused_then_repaired_with_a_count() {
    let (image, payloads) = crash_image(50, 64);
    let seg = segment_files(image.path()).pop().unwrap();
    let record_offset = 32 + 20 * framed_len(64) as u64;
    flip_byte(&seg, record_offset + 30);
    match Log::open(image.path(), small_options()) {
        Err(OpenError::Corrupt { site }) => assert_eq!(site.offset_bytes, record_offset),
        other => panic!("a bad record followed by valid ones must not be cut as a tail: {other:?}"),
    }
    let bytes_before = std::fs::read(&seg).unwrap();
    assert_eq!(
        std::fs::read(&seg).unwrap(),
        bytes_before,
        "refusing changes nothing"
    );

    let mut options = small_options();
    options.repair = true;
    let log = open(image.path(), options);
    let report = log.recovery_report().clone();
    assert_eq!(report.quarantined.len(), 1, "{report:?}");
    let q = &report.quarantined[0];
    assert_eq!(q.first_lost_seq, 20);
    assert_eq!(q.records_lost, 30);
    assert!(q
        .moved_to
        .iter()
        .all(|p| p.starts_with(image.path().join("log").join(QUARANTINE_DIR))));
    assert!(std::fs::metadata(&q.moved_to[0]).unwrap().len() >= 30 * framed_len(64) as u64);
    assert_eq!(all_payloads(&log), payloads[..20]);
    assert_eq!(log.append(&[b"x"]).unwrap(), 20..21);
}

#[test]
fn repair_of_damaged_sealed_segment_quarantines_later_segments() {
    let dir = tempfile::tempdir().unwrap();
    write_records(dir.path(), 3000);
    let segs = segment_files(dir.path());
    std::fs::remove_file(segs[1].with_extension("idx")).unwrap();
    let per_segment = (64 * 1024 - 32) / framed_len(100) as u64;
    flip_byte(&segs[1], 32 + 5 * framed_len(100) as u64);
    let mut options = small_options();
    options.repair = true;
    let log = open(dir.path(), options);
    let q = &log.recovery_report().quarantined[0];
    assert_eq!(q.first_lost_seq, per_segment + 5);
    assert_eq!(q.records_lost, 3000 - (per_segment + 5));
    assert_eq!(log.next_seq(), per_segment + 5);
    assert_eq!(segment_files(dir.path()).len(), 2);
    assert_eq!(all_payloads(&log).len() as u64, per_segment + 5);
}

#[test]
fn garbage_after_the_last_record_is_cut_as_a_torn_tail() {
    let (image, payloads) = crash_image(10, 50);
    let seg = segment_files(image.path()).pop().unwrap();
    let len = std::fs::metadata(&seg).unwrap().len();
    let garbage: Vec<u8> = (0..3000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    OpenOptions::new()
        .write(true)
        .open(&seg)
        .unwrap()
        .write_all_at(&garbage, len)
        .unwrap();
    let log = open(image.path(), small_options());
    assert_eq!(all_payloads(&log), payloads);
    assert!(log.recovery_report().truncated_tail_bytes > 2900);
}

/// The sync offsets (header bytes 17..20) of the records of `seg`, walking from its header.
fn sync_offsets(seg: &std::path::Path) -> Vec<u32> {
    let bytes = std::fs::read(seg).unwrap();
    let mut offsets = Vec::new();
    let mut pos = SEGMENT_HEADER_SIZE_BYTES;
    while let Decoded::Record(h) = decode(&bytes[pos..], u32::MAX) {
        offsets.push(h.sync_offset);
        pos += h.framed_len();
    }
    offsets
}

#[test]
fn a_format_1_segment_is_read_and_appended_to_without_sync_offsets() {
    let dir = tempfile::tempdir().unwrap();
    write_records(dir.path(), 3);
    // What an older build left: a format 1 header (single-record appends under `Sync`
    // have offset 0 anyway, as format 1 requires).
    let seg = segment_files(dir.path()).pop().unwrap();
    let mut header = [0u8; SEGMENT_HEADER_SIZE_BYTES];
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&seg)
        .unwrap();
    file.read_exact_at(&mut header, 0).unwrap();
    header[8..12].copy_from_slice(&1u32.to_le_bytes());
    let crc = crc32fast::hash(&header[..28]);
    header[28..32].copy_from_slice(&crc.to_le_bytes());
    file.write_all_at(&header, 0).unwrap();
    drop(file);
    assert_eq!(decode_segment_header(&header).unwrap().format_version, 1);

    let log = open(dir.path(), small_options());
    let mut payloads: Vec<Vec<u8>> = (0..3).map(|seq| payload_for(seq, 100)).collect();
    // A multi-record append into the format 1 segment: offsets stay 0, so a build that
    // reads only format 1 reads it.
    let three: Vec<Vec<u8>> = (3..6).map(|seq| payload_for(seq, 100)).collect();
    log.append(&three).unwrap();
    payloads.extend(three);
    assert_eq!(sync_offsets(&seg), vec![0; 6]);
    // Fill the segment; the next one is format 2 and its records carry offsets.
    let mut seq = 6;
    while segment_files(dir.path()).len() < 2 {
        let p = payload_for(seq, 4000);
        log.append(&[&p]).unwrap();
        payloads.push(p);
        seq += 1;
    }
    let three: Vec<Vec<u8>> = (seq..seq + 3).map(|s| payload_for(s, 100)).collect();
    log.append(&three).unwrap();
    payloads.extend(three);
    let newer = segment_files(dir.path()).pop().unwrap();
    let header = std::fs::read(&newer).unwrap();
    assert_eq!(
        decode_segment_header(&header).unwrap().format_version,
        SEGMENT_FORMAT_VERSION
    );
    assert!(sync_offsets(&seg).iter().all(|&o| o == 0));
    assert_eq!(sync_offsets(&newer).last_chunk::<3>(), Some(&[0, 1, 2]));
    assert_eq!(all_payloads(&log), payloads);
    drop(log);
    let log = open(dir.path(), small_options());
    assert_eq!(
        all_payloads(&log),
        payloads,
        "both formats read back after a reopen"
    );
}
