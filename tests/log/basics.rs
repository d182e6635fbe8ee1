use crate::common::{open, payload_for, small_options};
use eventlog::log::{AppendError, Log, OpenError, ReadError};

#[test]
fn appended_records_read_back_after_reopen_across_segments() {
    let dir = tempfile::tempdir().unwrap();
    let options = small_options();
    let log = open(dir.path(), options.clone());
    let mut next = 0u64;
    for batch in 0..200u64 {
        let n = (batch % 7 + 1) as usize;
        let payloads: Vec<Vec<u8>> = (0..n as u64)
            .map(|i| payload_for(next + i, 100 + (batch as usize * 13) % 900))
            .collect();
        let seqs = log.append(&payloads).unwrap();
        assert_eq!(seqs, next..next + n as u64);
        next += n as u64;
    }
    assert!(
        log.stats().segment_count > 3,
        "test should roll segments: {:?}",
        log.stats()
    );
    drop(log);
    let log = open(dir.path(), options);
    assert_eq!(log.next_seq(), next);
    let mut expected = 0u64;
    for r in log.iter_from(0) {
        let r = r.unwrap();
        assert_eq!(r.seq(), expected);
        assert_eq!(log.read(r.seq()).unwrap().payload(), r.payload());
        expected += 1;
    }
    assert_eq!(expected, next);
    assert_eq!(log.append(&[b"more"]).unwrap(), next..next + 1);
}

#[test]
fn oversized_record_is_rejected_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path(), small_options());
    log.append(&[b"a"]).unwrap();
    let big = vec![0u8; (16 << 10) + 1];
    match log.append(&[big]) {
        Err(AppendError::RecordTooLarge {
            size_bytes,
            limit_bytes,
        }) => {
            assert_eq!((size_bytes, limit_bytes), ((16 << 10) + 1, 16 << 10));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(log.next_seq(), 1);
    assert_eq!(log.append(&[b"b"]).unwrap(), 1..2);
}

#[test]
fn second_open_of_same_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let _log = open(dir.path(), small_options());
    match Log::open(dir.path(), small_options()) {
        Err(OpenError::Locked { .. }) => {}
        other => panic!("{other:?}"),
    }
}

#[test]
fn reading_past_the_end_is_not_found() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path(), small_options());
    log.append(&[b"x"]).unwrap();
    assert!(matches!(
        log.read(1),
        Err(ReadError::NotFound {
            seq: 1,
            next_seq: 1
        })
    ));
}

#[test]
fn concurrent_appenders_get_dense_unique_seqs_and_share_fsyncs() {
    let dir = tempfile::tempdir().unwrap();
    let log = std::sync::Arc::new(open(dir.path(), small_options()));
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let log = log.clone();
            std::thread::spawn(move || {
                let mut mine = Vec::new();
                for i in 0..100u64 {
                    let seqs = log.append(&[format!("{t}-{i}")]).unwrap();
                    mine.push((seqs.start, format!("{t}-{i}")));
                }
                mine
            })
        })
        .collect();
    let mut all: Vec<(u64, String)> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    all.sort();
    for (i, (seq, payload)) in all.iter().enumerate() {
        assert_eq!(*seq, i as u64);
        assert_eq!(log.read(*seq).unwrap().payload(), payload.as_bytes());
    }
    let stats = log.stats();
    assert_eq!(stats.next_seq, 800);
    assert!(stats.fsync_count <= 800, "{stats:?}");
}

#[test]
fn removing_old_segments_keeps_the_rest_readable_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let options = small_options();
    let log = open(dir.path(), options.clone());
    for seq in 0..3000u64 {
        log.append(&[payload_for(seq, 100)]).unwrap();
    }
    let segments_before = log.stats().segment_count;
    let held = log.read(5).unwrap();
    let removed = log.remove_segments_before(1500).unwrap();
    assert!(removed > 0 && removed <= 1500, "removed {removed}");
    assert_eq!(log.first_seq(), removed);
    assert!(log.stats().segment_count < segments_before);
    assert_eq!(
        held.payload(),
        payload_for(5, 100),
        "a record read before removal stays valid"
    );
    assert!(matches!(
        log.read(removed - 1),
        Err(ReadError::NotFound { .. })
    ));
    assert_eq!(
        log.read(removed).unwrap().payload(),
        payload_for(removed, 100)
    );
    assert_eq!(log.iter_from(removed).count() as u64, 3000 - removed);
    // Removing everything keeps the active segment.
    log.remove_segments_before(u64::MAX).unwrap();
    assert_eq!(log.stats().segment_count, 1);
    let first = log.first_seq();
    drop(log);
    let log = open(dir.path(), options);
    assert_eq!(log.first_seq(), first);
    assert_eq!(log.next_seq(), 3000);
    assert_eq!(log.read(2999).unwrap().payload(), payload_for(2999, 100));
    assert_eq!(log.append(&[b"x"]).unwrap(), 3000..3001);
}
