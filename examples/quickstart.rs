//! Appends events to a durable log, closes it, reopens it and reads everything back.
//!
//! `cargo run --release --example quickstart [DIR]` (default: a fresh temporary directory).

use eventlog::log::{Log, LogOptions};
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let tmp;
    let dir = match std::env::args().nth(1) {
        Some(d) => std::path::PathBuf::from(d),
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    println!("eventlog quickstart in {}", dir.display());

    let log = Log::open(&dir, LogOptions::default())?;
    let start_seq = log.next_seq();
    let started = Instant::now();
    let batches = 100u64;
    let per_batch = 1_000u64;
    for b in 0..batches {
        let payloads: Vec<String> = (0..per_batch)
            .map(|i| format!(r#"{{"order":{},"item":{i},"event":"ItemAdded"}}"#, b))
            .collect();
        log.append(&payloads)?;
    }
    let appended = batches * per_batch;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "appended {appended} records in {batches} durable (fdatasync'ed) appends: {:.0} records/s",
        appended as f64 / secs
    );
    log.close()?;

    let started = Instant::now();
    let log = Log::open(&dir, LogOptions::default())?;
    println!(
        "reopened in {:.1} ms: {} records, recovery verified {} bytes",
        started.elapsed().as_secs_f64() * 1e3,
        log.next_seq(),
        log.recovery_report().verified_bytes
    );
    let started = Instant::now();
    let mut bytes = 0usize;
    let mut count = 0u64;
    for record in log.iter_from(start_seq) {
        let record = record?;
        bytes += record.payload().len();
        count += 1;
    }
    println!(
        "read back {count} records ({bytes} payload bytes) in {:.1} ms, every checksum verified",
        started.elapsed().as_secs_f64() * 1e3
    );
    let last = log.read(log.next_seq() - 1)?;
    println!(
        "last record, seq {}: {}",
        last.seq(),
        String::from_utf8_lossy(last.payload())
    );
    assert_eq!(count, appended, "every appended record reads back");
    Ok(())
}
