//! Criterion micro-benchmarks of the segment log: record framing, appends, reads.
//!
//! `cargo bench --bench log` (about two minutes). Log files go to a temporary directory
//! under `$EVENTLOG_BENCH_DIR`, or under the crate's `target/` (not `/tmp`, which may be a
//! tmpfs where `fdatasync` costs nothing).

use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use eventlog::log::record::{self, Decoded, FLAG_BATCH_END};
use eventlog::log::{Durability, Log, LogOptions};
use std::path::PathBuf;
use std::time::Duration;

const PAYLOAD_SIZE_BYTES: usize = 256;
const BATCH_RECORDS: usize = 1_000;
/// Records prefilled for the read benchmarks (64 MiB of payload: warm in the page cache).
const READ_RECORDS: u64 = 250_000;

fn bench_dir() -> PathBuf {
    let dir = std::env::var_os("EVENTLOG_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    std::fs::create_dir_all(&dir).expect("creating the bench directory");
    dir
}

fn temp_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("eventlog-bench-")
        .tempdir_in(bench_dir())
        .expect("creating a temporary directory")
}

/// Deterministic, incompressible-looking payload bytes.
fn payload(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn options(durability: Durability) -> LogOptions {
    let mut o = LogOptions::default();
    o.durability = durability;
    o
}

fn bench_record(c: &mut Criterion) {
    let mut g = c.benchmark_group("record");
    g.sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    for size in [PAYLOAD_SIZE_BYTES, 4096] {
        let p = payload(1, size);
        g.throughput(Throughput::Bytes(record::framed_len(size) as u64));
        let mut buf = Vec::with_capacity(record::framed_len(size));
        g.bench_function(format!("encode/{size}B"), |b| {
            b.iter(|| {
                buf.clear();
                record::encode_into(&mut buf, black_box(42), FLAG_BATCH_END, 0, black_box(&p));
                buf.len()
            })
        });
        let mut framed = Vec::new();
        record::encode_into(&mut framed, 42, FLAG_BATCH_END, 0, &p);
        g.bench_function(format!("decode_verify/{size}B"), |b| {
            b.iter(|| match record::decode(black_box(&framed), u32::MAX) {
                Decoded::Record(h) => h.payload_len,
                other => panic!("{other:?}"),
            })
        });
    }
    g.finish();
}

fn bench_append(c: &mut Criterion) {
    let mut g = c.benchmark_group("append");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));

    let payloads: Vec<Vec<u8>> = (0..BATCH_RECORDS as u64)
        .map(|i| payload(i, PAYLOAD_SIZE_BYTES))
        .collect();
    {
        let dir = temp_dir();
        let log = Log::open(dir.path(), options(Durability::Sync)).expect("open");
        g.throughput(Throughput::Elements(BATCH_RECORDS as u64));
        g.bench_function("sync_batch/1000x256B", |b| {
            b.iter(|| log.append(&payloads).expect("append"))
        });
    }
    {
        let dir = temp_dir();
        let log = Log::open(dir.path(), options(Durability::None)).expect("open");
        let one = [payloads[0].as_slice()];
        g.throughput(Throughput::Elements(1));
        g.bench_function("none_single/256B", |b| {
            b.iter(|| log.append(&one).expect("append"))
        });
    }
    g.finish();
}

/// A log of `READ_RECORDS` records of 256 B, written without syncing each append.
fn prefilled_log(dir: &tempfile::TempDir) -> Log {
    let log = Log::open(dir.path(), options(Durability::None)).expect("open");
    let payloads: Vec<Vec<u8>> = (0..BATCH_RECORDS as u64)
        .map(|i| payload(i, PAYLOAD_SIZE_BYTES))
        .collect();
    for _ in 0..READ_RECORDS / BATCH_RECORDS as u64 {
        log.append(&payloads).expect("append");
    }
    log.sync().expect("sync");
    assert_eq!(log.next_seq(), READ_RECORDS);
    log
}

fn bench_read(c: &mut Criterion) {
    let dir = temp_dir();
    let log = prefilled_log(&dir);
    // Warm the page cache and the maps.
    let total: usize = log
        .iter_from(0)
        .map(|r| r.expect("read").payload().len())
        .sum();
    assert_eq!(total, READ_RECORDS as usize * PAYLOAD_SIZE_BYTES);

    let mut g = c.benchmark_group("read");
    g.sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));

    // Random seqs from a fixed xorshift sequence, precomputed so the RNG is not measured.
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let seqs: Vec<u64> = (0..1 << 16)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % READ_RECORDS
        })
        .collect();
    g.throughput(Throughput::Bytes(PAYLOAD_SIZE_BYTES as u64));
    let mut i = 0usize;
    g.bench_function("by_seq_random/256B", |b| {
        b.iter(|| {
            let seq = seqs[i & (seqs.len() - 1)];
            i = i.wrapping_add(1);
            let r = log.read(seq).expect("read");
            r.payload()[0]
        })
    });

    // One pass takes tens of milliseconds: fewer samples keep the group short.
    g.sample_size(10);
    g.throughput(Throughput::Bytes(READ_RECORDS * PAYLOAD_SIZE_BYTES as u64));
    g.bench_function("iter_from_0/250k_x_256B", |b| {
        b.iter_batched(
            || log.iter_from(0),
            |iter| {
                let mut n = 0u64;
                let mut bytes = 0usize;
                for r in iter {
                    let r = r.expect("read");
                    bytes += r.payload().len();
                    n += 1;
                }
                assert_eq!(n, READ_RECORDS);
                bytes
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(benches, bench_record, bench_append, bench_read);
criterion_main!(benches);
