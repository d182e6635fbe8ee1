//! eventlog against the raw limit of the same disk, in one run.
//!
//! `cargo bench --bench log_vs_raw [-- --records N --reps N --thread-secs S --threads 1,4,16
//! --json FILE --dir DIR --sections batched,threads,reads --variants KEY,..]`. Files go to a
//! temporary directory under `--dir`, else `$EVENTLOG_BENCH_DIR`, else `./target/` (never
//! `/tmp`, which may be a tmpfs where `fdatasync` is free). Every figure is the median of `--reps` repetitions, run
//! interleaved so that drift of the disk affects every variant alike.
//!
//! Workloads:
//! - batched durable append: N records of 256 B in appends of 1,000 records, one
//!   `fdatasync` per append, against the same framed bytes written with `write(2)` and one
//!   `fdatasync` per 1,000 records (the raw limit);
//! - the same with and without preallocation, on both sides;
//! - single-record durable appends from 1, 4 and 16 threads (group commit);
//! - sequential and random reads of the N records, warm.

use eventlog::log::record::{self, Decoded, FLAG_BATCH_END};
use eventlog::log::{Durability, Log, LogOptions, PREALLOCATE_CHUNK_BYTES_DEFAULT};
use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::hint::black_box;
use std::io::Write as _;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Barrier;
use std::time::{Duration, Instant};

const MB: f64 = 1e6;
const GB: f64 = 1e9;

struct Config {
    records: u64,
    reps: usize,
    batch: usize,
    payload_bytes: usize,
    thread_secs: f64,
    threads: Vec<usize>,
    json: Option<PathBuf>,
    dir: Option<PathBuf>,
    /// Which parts to run: `batched`, `threads`, `reads`.
    sections: Vec<String>,
    /// Batched variants to run (by key); empty means all.
    variants: Vec<String>,
}

impl Config {
    fn from_args() -> Config {
        let mut c = Config {
            records: 1_000_000,
            reps: 3,
            batch: 1_000,
            payload_bytes: 256,
            thread_secs: 3.0,
            threads: vec![1, 4, 16],
            json: None,
            dir: None,
            sections: vec!["batched".into(), "threads".into(), "reads".into()],
            variants: Vec::new(),
        };
        let args: Vec<String> = std::env::args().skip(1).collect();
        let mut i = 0;
        while i < args.len() {
            // Accept both `--flag value` and `--flag=value`; ignore anything unknown (cargo
            // passes `--bench`).
            let (flag, inline) = match args[i].split_once('=') {
                Some((f, v)) => (f.to_string(), Some(v.to_string())),
                None => (args[i].clone(), None),
            };
            let known = matches!(
                flag.as_str(),
                "--records"
                    | "--reps"
                    | "--batch"
                    | "--payload-bytes"
                    | "--thread-secs"
                    | "--threads"
                    | "--json"
                    | "--dir"
                    | "--sections"
                    | "--variants"
            );
            if !known {
                i += 1;
                continue;
            }
            let value = match inline {
                Some(v) => v,
                None => {
                    i += 1;
                    args.get(i)
                        .cloned()
                        .unwrap_or_else(|| die(&format!("{flag} needs a value")))
                }
            };
            let num = |v: &str| -> u64 {
                v.replace(['_', ','], "")
                    .parse()
                    .unwrap_or_else(|_| die(&format!("{flag}: not a number: {v}")))
            };
            match flag.as_str() {
                "--records" => c.records = num(&value),
                "--reps" => c.reps = num(&value).max(1) as usize,
                "--batch" => c.batch = num(&value).max(1) as usize,
                "--payload-bytes" => c.payload_bytes = num(&value) as usize,
                "--thread-secs" => {
                    c.thread_secs = value
                        .parse()
                        .unwrap_or_else(|_| die(&format!("--thread-secs: not a number: {value}")))
                }
                "--threads" => c.threads = value.split(',').map(|t| num(t) as usize).collect(),
                "--json" => c.json = Some(PathBuf::from(value)),
                "--dir" => c.dir = Some(PathBuf::from(value)),
                "--sections" => c.sections = value.split(',').map(String::from).collect(),
                "--variants" => c.variants = value.split(',').map(String::from).collect(),
                _ => unreachable!(),
            }
            i += 1;
        }
        c.records = c.records.div_ceil(c.batch as u64) * c.batch as u64;
        c
    }

    fn runs(&self, section: &str) -> bool {
        self.sections.iter().any(|s| s == section)
    }

    fn batches(&self) -> u64 {
        self.records / self.batch as u64
    }

    fn framed_bytes(&self) -> u64 {
        self.records * record::framed_len(self.payload_bytes) as u64
    }
}

fn die(msg: &str) -> ! {
    eprintln!("log_vs_raw: {msg}");
    std::process::exit(2)
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

/// Frames one batch of records exactly as `Log::append` does: seqs from `first_seq`, the
/// last record flagged as the end of the atomic append.
fn frame_batch(out: &mut Vec<u8>, first_seq: u64, payloads: &[Vec<u8>]) {
    for (i, p) in payloads.iter().enumerate() {
        let flags = if i + 1 == payloads.len() {
            FLAG_BATCH_END
        } else {
            0
        };
        record::encode_into(out, first_seq + i as u64, flags, i as u64, p);
    }
}

fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn percentile_ns(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn thousands(n: f64) -> String {
    let s = format!("{:.0}", n);
    let (sign, digits) = s.strip_prefix('-').map_or(("", s.as_str()), |d| ("-", d));
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    format!("{sign}{out}")
}

fn ms(ns: f64) -> String {
    format!("{:.3}", ns / 1e6)
}

/// Result rows for `--json`, and the markdown report.
#[derive(Default)]
struct Report {
    rows: Vec<(String, String, String, f64, String)>,
    text: String,
}

impl Report {
    fn row(&mut self, workload: &str, store: &str, metric: &str, value: f64, unit: &str) {
        self.rows.push((
            workload.into(),
            store.into(),
            metric.into(),
            value,
            unit.into(),
        ));
    }

    fn line(&mut self, s: impl AsRef<str>) {
        self.text.push_str(s.as_ref());
        self.text.push('\n');
    }

    fn json(&self) -> String {
        let esc = |s: &str| {
            let mut o = String::new();
            for ch in s.chars() {
                match ch {
                    '"' => o.push_str("\\\""),
                    '\\' => o.push_str("\\\\"),
                    c if (c as u32) < 0x20 => {
                        let _ = write!(o, "\\u{:04x}", c as u32);
                    }
                    c => o.push(c),
                }
            }
            o
        };
        let mut out = String::from("[\n");
        for (i, (w, s, m, v, u)) in self.rows.iter().enumerate() {
            let value = if v.is_finite() {
                format!("{v}")
            } else {
                "null".into()
            };
            let _ = write!(
                out,
                "  {{\"workload\": \"{}\", \"store\": \"{}\", \"metric\": \"{}\", \"value\": {}, \"unit\": \"{}\"}}",
                esc(w),
                esc(s),
                esc(m),
                value,
                esc(u)
            );
            out.push_str(if i + 1 < self.rows.len() { ",\n" } else { "\n" });
        }
        out.push_str("]\n");
        out
    }
}

// ---------------------------------------------------------------------------------------
// The machine.

struct Machine {
    cpus: usize,
    cpu_model: String,
    mem_total: String,
    kernel: String,
    dir: PathBuf,
    fs_type: String,
    device: String,
    mount_point: String,
    mount_options: String,
}

/// Load average and pressure stall figures: how busy the machine was (other processes
/// sharing the disk or the CPUs make every figure here worse).
fn load_now() -> String {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let load: Vec<String> = read("/proc/loadavg")
        .split_whitespace()
        .take(3)
        .map(String::from)
        .collect();
    let psi = |kind: &str| {
        read(&format!("/proc/pressure/{kind}"))
            .lines()
            .find(|l| l.starts_with("some"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|f| f.strip_prefix("avg10="))
            .map_or_else(|| "n/a".to_string(), |v| format!("{v}%"))
    };
    format!(
        "load average {}; pressure (some, avg10): cpu {}, io {}",
        load.join(" "),
        psi("cpu"),
        psi("io")
    )
}

fn machine(dir: &Path) -> Machine {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let cpu_model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let meminfo = read("/proc/meminfo");
    let mem_total = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| format!("{:.1} GiB", kb / 1024.0 / 1024.0))
        .unwrap_or_else(|| "unknown".into());
    let kernel = read("/proc/sys/kernel/osrelease").trim().to_string();
    // The mount holding `dir`: the longest mount point that is a prefix of it.
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let mounts = read("/proc/mounts");
    let mut best: Option<(usize, [String; 4])> = None;
    for l in mounts.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() < 4 {
            continue;
        }
        let mp = f[1].replace("\\040", " ");
        if dir.starts_with(&mp) && best.as_ref().is_none_or(|(len, _)| mp.len() >= *len) {
            best = Some((
                mp.len(),
                [f[0].into(), mp.clone(), f[2].into(), f[3].into()],
            ));
        }
    }
    let [device, mount_point, fs_type, mount_options] = best
        .map(|(_, m)| m)
        .unwrap_or_else(|| ["?".into(), "?".into(), "unknown".into(), String::new()]);
    Machine {
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model,
        mem_total,
        kernel,
        dir,
        fs_type,
        device,
        mount_point,
        mount_options,
    }
}

/// Median and p90 latency in ns of `n` fdatasyncs, each after a 4 KiB write: overwriting
/// block 0 (`append == false`), or extending the file (`append == true`).
fn fsync_latency(dir: &Path, n: usize, append: bool) -> (f64, f64) {
    let path = dir.join(if append {
        "fsync-probe-append"
    } else {
        "fsync-probe-overwrite"
    });
    let file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)
        .expect("creating the fsync probe");
    let block = payload(7, 4096);
    file.write_all_at(&block, 0).expect("write");
    file.sync_all().expect("fsync");
    let mut lat = Vec::with_capacity(n);
    for i in 0..n {
        let off = if append { 4096 * (i as u64 + 1) } else { 0 };
        file.write_all_at(&block, off).expect("write");
        let t = Instant::now();
        file.sync_data().expect("fdatasync");
        lat.push(t.elapsed().as_nanos() as u64);
    }
    drop(file);
    let _ = std::fs::remove_file(&path);
    lat.sort_unstable();
    (
        percentile_ns(&lat, 0.5) as f64,
        percentile_ns(&lat, 0.9) as f64,
    )
}

// ---------------------------------------------------------------------------------------
// Batched durable appends.

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Batched {
    /// `Log::append` of each batch, `Durability::Sync`, the given preallocation step.
    Eventlog { preallocate_chunk_bytes: u64 },
    /// write(2) of pre-framed bytes + fdatasync per batch, to a fresh empty file.
    Raw,
    /// As `Raw`, into a file `posix_fallocate`d to its full size beforehand.
    RawFallocated,
    /// As `Raw`, into a file filled with zeros and synced beforehand (pure overwrite: no
    /// metadata to commit at fdatasync).
    RawPrezeroed,
    /// As `Raw`, but framing each batch (encode + crc32) inside the timed loop, as the log
    /// must.
    RawEncodeInLoop,
    /// As `Raw`, but whenever a batch would pass the zeroed end, first write zeros 8 MiB
    /// (the log's default preallocation step) ahead, inside the timed loop: preallocation
    /// by writing instead of `fallocate`, so later batches are pure overwrites.
    RawZeroAhead,
}

impl Batched {
    fn store(&self) -> &'static str {
        match self {
            Batched::Eventlog { .. } => "eventlog",
            _ => "raw",
        }
    }

    fn label(&self) -> String {
        match self {
            Batched::Eventlog {
                preallocate_chunk_bytes: 0,
            } => "eventlog, preallocate_chunk_bytes = 0".into(),
            Batched::Eventlog {
                preallocate_chunk_bytes,
            } => format!(
                "eventlog, preallocate_chunk_bytes = {} MiB (default)",
                preallocate_chunk_bytes >> 20
            ),
            Batched::Raw => "raw write+fdatasync, fresh file (**the raw limit**)".into(),
            Batched::RawFallocated => "raw, file posix_fallocate'd to full size first".into(),
            Batched::RawPrezeroed => "raw, file pre-written with zeros (pure overwrite)".into(),
            Batched::RawEncodeInLoop => "raw, fresh file, framing (encode+crc) in the loop".into(),
            Batched::RawZeroAhead => {
                "raw, fresh file, zeros written 8 MiB ahead in the loop (timed)".into()
            }
        }
    }

    fn key(&self) -> String {
        match self {
            Batched::Eventlog {
                preallocate_chunk_bytes,
            } => format!("eventlog_prealloc_{preallocate_chunk_bytes}"),
            Batched::Raw => "raw_fresh".into(),
            Batched::RawFallocated => "raw_fallocated".into(),
            Batched::RawPrezeroed => "raw_prezeroed".into(),
            Batched::RawEncodeInLoop => "raw_fresh_encode_in_loop".into(),
            Batched::RawZeroAhead => "raw_zero_ahead".into(),
        }
    }
}

struct BatchedRun {
    secs: f64,
    fsyncs: u64,
}

fn run_batched(
    cfg: &Config,
    base: &Path,
    variant: Batched,
    payloads: &[Vec<u8>],
    framed: &[u8],
) -> BatchedRun {
    let dir = tempfile::Builder::new()
        .prefix("log-vs-raw-")
        .tempdir_in(base)
        .expect("temp dir");
    let batch_bytes = cfg.batch * record::framed_len(cfg.payload_bytes);
    match variant {
        Batched::Eventlog {
            preallocate_chunk_bytes,
        } => {
            let mut o = LogOptions::default();
            o.durability = Durability::Sync;
            o.preallocate_chunk_bytes = preallocate_chunk_bytes;
            let log = Log::open(dir.path(), o).expect("open");
            let t = Instant::now();
            for _ in 0..cfg.batches() {
                log.append(payloads).expect("append");
            }
            let secs = t.elapsed().as_secs_f64();
            let stats = log.stats();
            assert_eq!(stats.next_seq, cfg.records);
            drop(log);
            BatchedRun {
                secs,
                fsyncs: stats.fsync_count,
            }
        }
        _ => {
            let path = dir.path().join("raw.log");
            let mut file = OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .open(&path)
                .expect("create");
            let total = cfg.framed_bytes();
            match variant {
                Batched::RawFallocated => {
                    // SAFETY: a plain syscall on a descriptor we own; no memory is passed.
                    let rc =
                        unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, total as libc::off_t) };
                    assert_eq!(rc, 0, "posix_fallocate failed: errno {rc}");
                    file.sync_all().expect("fsync");
                }
                Batched::RawPrezeroed => {
                    let zeros = vec![0u8; 8 << 20];
                    let mut left = total;
                    while left > 0 {
                        let n = left.min(zeros.len() as u64) as usize;
                        file.write_all(&zeros[..n]).expect("write");
                        left -= n as u64;
                    }
                    file.sync_all().expect("fsync");
                    drop(file);
                    file = OpenOptions::new().write(true).open(&path).expect("reopen");
                }
                _ => {}
            }
            let mut fsyncs = 0u64;
            let t = Instant::now();
            if variant == Batched::RawEncodeInLoop {
                let mut buf = Vec::with_capacity(batch_bytes);
                for b in 0..cfg.batches() {
                    buf.clear();
                    frame_batch(&mut buf, b * cfg.batch as u64, payloads);
                    file.write_all(&buf).expect("write");
                    file.sync_data().expect("fdatasync");
                    fsyncs += 1;
                }
            } else if variant == Batched::RawZeroAhead {
                let step = PREALLOCATE_CHUNK_BYTES_DEFAULT;
                let zeros = vec![0u8; step as usize];
                let mut zeroed_to = 0u64;
                let mut pos = 0u64;
                for chunk in framed.chunks(batch_bytes) {
                    let end = pos + chunk.len() as u64;
                    if end > zeroed_to {
                        let target = end + step;
                        while zeroed_to < target {
                            let n = (target - zeroed_to).min(step) as usize;
                            file.write_all_at(&zeros[..n], zeroed_to).expect("write");
                            zeroed_to += n as u64;
                        }
                    }
                    file.write_all_at(chunk, pos).expect("write");
                    pos = end;
                    file.sync_data().expect("fdatasync");
                    fsyncs += 1;
                }
            } else {
                for chunk in framed.chunks(batch_bytes) {
                    file.write_all(chunk).expect("write");
                    file.sync_data().expect("fdatasync");
                    fsyncs += 1;
                }
            }
            let secs = t.elapsed().as_secs_f64();
            BatchedRun { secs, fsyncs }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Concurrent single-record appends.

struct ThreadsRun {
    records: u64,
    secs: f64,
    p50_ns: f64,
    p99_ns: f64,
    fsyncs: u64,
}

fn run_threads(
    base: &Path,
    threads: usize,
    preallocate_chunk_bytes: u64,
    secs: f64,
    p: &[u8],
) -> ThreadsRun {
    let dir = tempfile::Builder::new()
        .prefix("log-vs-raw-threads-")
        .tempdir_in(base)
        .expect("temp dir");
    let mut o = LogOptions::default();
    o.preallocate_chunk_bytes = preallocate_chunk_bytes;
    let log = Log::open(dir.path(), o).expect("open");
    let barrier = Barrier::new(threads + 1);
    let dur = Duration::from_secs_f64(secs);
    let (mut lat, elapsed) = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut lat = Vec::with_capacity(1 << 16);
                    barrier.wait();
                    let deadline = Instant::now() + dur;
                    loop {
                        let t = Instant::now();
                        if t >= deadline {
                            break;
                        }
                        log.append(&[p]).expect("append");
                        lat.push(t.elapsed().as_nanos() as u64);
                    }
                    lat
                })
            })
            .collect();
        barrier.wait();
        let t = Instant::now();
        let lat: Vec<u64> = handles
            .into_iter()
            .flat_map(|h| h.join().expect("appender panicked"))
            .collect();
        (lat, t.elapsed().as_secs_f64())
    });
    let stats = log.stats();
    assert_eq!(stats.next_seq, lat.len() as u64);
    lat.sort_unstable();
    ThreadsRun {
        records: lat.len() as u64,
        secs: elapsed,
        p50_ns: percentile_ns(&lat, 0.5) as f64,
        p99_ns: percentile_ns(&lat, 0.99) as f64,
        fsyncs: stats.fsync_count,
    }
}

/// The raw equivalent of one appender: write one framed record, fdatasync, repeat; to a
/// fresh file, or to one `posix_fallocate`d (64 MiB) beforehand.
fn run_raw_single(base: &Path, fallocate: bool, secs: f64, p: &[u8]) -> ThreadsRun {
    let dir = tempfile::Builder::new()
        .prefix("log-vs-raw-single-")
        .tempdir_in(base)
        .expect("temp dir");
    let mut file = File::create(dir.path().join("raw.log")).expect("create");
    if fallocate {
        // SAFETY: a plain syscall on a descriptor we own; no memory is passed.
        let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, 64 << 20) };
        assert_eq!(rc, 0, "posix_fallocate failed: errno {rc}");
        file.sync_all().expect("fsync");
    }
    let mut buf = Vec::new();
    let mut lat = Vec::with_capacity(1 << 16);
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let mut seq = 0;
    loop {
        let t = Instant::now();
        if t >= deadline {
            break;
        }
        buf.clear();
        record::encode_into(&mut buf, seq, FLAG_BATCH_END, 0, p);
        file.write_all(&buf).expect("write");
        file.sync_data().expect("fdatasync");
        lat.push(t.elapsed().as_nanos() as u64);
        seq += 1;
    }
    let elapsed = start.elapsed().as_secs_f64();
    lat.sort_unstable();
    ThreadsRun {
        records: seq,
        secs: elapsed,
        p50_ns: percentile_ns(&lat, 0.5) as f64,
        p99_ns: percentile_ns(&lat, 0.99) as f64,
        fsyncs: seq,
    }
}

// ---------------------------------------------------------------------------------------
// Reads.

/// Seconds for one full `iter_from(0)` pass, checking every record.
fn iterate_all(log: &Log, records: u64, payload_bytes: usize) -> f64 {
    let t = Instant::now();
    let mut n = 0u64;
    let mut acc = 0u8;
    for r in log.iter_from(0) {
        let r = r.expect("read");
        let p = r.payload();
        debug_assert_eq!(p.len(), payload_bytes);
        acc ^= p[p.len() - 1];
        n += 1;
    }
    let secs = t.elapsed().as_secs_f64();
    black_box(acc);
    assert_eq!(n, records, "iteration saw every record");
    secs
}

/// Seconds to read `seqs` by seq.
fn read_random(log: &Log, seqs: &[u64]) -> f64 {
    let t = Instant::now();
    let mut acc = 0u8;
    for &s in seqs {
        let r = log.read(s).expect("read");
        acc ^= r.payload()[0];
    }
    let secs = t.elapsed().as_secs_f64();
    black_box(acc);
    secs
}

/// Seconds to walk the framed bytes in memory with `record::decode` (crc32 verified): the
/// CPU limit of a verifying reader.
fn decode_all(framed: &[u8], records: u64) -> f64 {
    let t = Instant::now();
    let mut pos = 0usize;
    let mut n = 0u64;
    let mut acc = 0u8;
    while pos < framed.len() {
        match record::decode(&framed[pos..], u32::MAX) {
            Decoded::Record(h) => {
                let end = pos + h.framed_len();
                acc ^= framed[end - 1];
                pos = end;
                n += 1;
            }
            other => panic!("decode at {pos}: {other:?}"),
        }
    }
    let secs = t.elapsed().as_secs_f64();
    black_box(acc);
    assert_eq!(n, records);
    secs
}

// ---------------------------------------------------------------------------------------

fn main() {
    let cfg = Config::from_args();
    let base = cfg
        .dir
        .clone()
        .or_else(|| std::env::var_os("EVENTLOG_BENCH_DIR").map(PathBuf::from))
        .unwrap_or_else(|| {
            std::env::current_dir()
                .expect("current directory")
                .join("target")
        });
    std::fs::create_dir_all(&base).expect("creating the bench directory");
    let root = tempfile::Builder::new()
        .prefix("log-vs-raw-")
        .tempdir_in(&base)
        .expect("temp dir");
    let base = root.path();
    let m = machine(base);
    if m.fs_type == "tmpfs" || m.fs_type == "ramfs" {
        eprintln!(
            "log_vs_raw: WARNING: {} is on {}; fdatasync is free there and the numbers mean \
             little. Set EVENTLOG_BENCH_DIR or --dir to a directory on a real disk.",
            m.dir.display(),
            m.fs_type
        );
    }
    let mut rep = Report::default();
    let wall = Instant::now();

    eprintln!("log_vs_raw: measuring fdatasync latency ...");
    let (fs_over_p50, fs_over_p90) = fsync_latency(base, 50, false);
    let (fs_app_p50, fs_app_p90) = fsync_latency(base, 50, true);

    rep.line("## Machine");
    rep.line("");
    rep.line(format!("- CPUs: {} ({})", m.cpus, m.cpu_model));
    rep.line(format!("- memory: {}", m.mem_total));
    rep.line(format!("- at start: {}", load_now()));
    rep.line(format!("- kernel: {}", m.kernel));
    rep.line(format!(
        "- bench dir: {} — **{}** on {} (mounted at {}, {})",
        m.dir.display(),
        m.fs_type,
        m.device,
        m.mount_point,
        m.mount_options
    ));
    rep.line(format!(
        "- fdatasync after a 4 KiB overwrite (median of 50): **{} ms** (p90 {} ms)",
        ms(fs_over_p50),
        ms(fs_over_p90)
    ));
    rep.line(format!(
        "- fdatasync after a 4 KiB append (file grows; median of 50): **{} ms** (p90 {} ms)",
        ms(fs_app_p50),
        ms(fs_app_p90)
    ));
    rep.line(format!(
        "- config: {} records × {} B payload ({} B framed), batches of {}, {} reps (medians shown)",
        thousands(cfg.records as f64),
        cfg.payload_bytes,
        record::framed_len(cfg.payload_bytes),
        thousands(cfg.batch as f64),
        cfg.reps
    ));
    rep.line("");
    rep.row("machine", "-", "cpus", m.cpus as f64, "count");
    rep.row(
        "fsync_probe",
        "raw",
        "fdatasync_4k_overwrite_p50",
        fs_over_p50 / 1e6,
        "ms",
    );
    rep.row(
        "fsync_probe",
        "raw",
        "fdatasync_4k_append_p50",
        fs_app_p50 / 1e6,
        "ms",
    );

    // Payloads of one batch, reused for every batch; and the whole run framed up front.
    let payloads: Vec<Vec<u8>> = (0..cfg.batch as u64)
        .map(|i| payload(i + 1, cfg.payload_bytes))
        .collect();
    let mut framed = Vec::with_capacity(cfg.framed_bytes() as usize);
    for b in 0..cfg.batches() {
        frame_batch(&mut framed, b * cfg.batch as u64, &payloads);
    }

    if cfg.runs("batched") {
        section_batched(&cfg, base, &mut rep, &payloads, &framed);
    }
    if cfg.runs("threads") {
        section_threads(&cfg, base, &mut rep, &payloads[0]);
    }
    if cfg.runs("reads") {
        section_reads(&cfg, base, &mut rep, &payloads, &framed);
    }
    rep.line(format!(
        "_total bench time {:.0} s; at end: {}_",
        wall.elapsed().as_secs_f64(),
        load_now()
    ));

    print!("{}", rep.text);
    if let Some(path) = &cfg.json {
        std::fs::write(path, rep.json()).expect("writing the JSON file");
        eprintln!("log_vs_raw: wrote {}", path.display());
    }
}

fn section_batched(
    cfg: &Config,
    base: &Path,
    rep: &mut Report,
    payloads: &[Vec<u8>],
    framed: &[u8],
) {
    // The first two are the headline pair; the rest explain it.
    let variants: Vec<Batched> = [
        Batched::Eventlog {
            preallocate_chunk_bytes: PREALLOCATE_CHUNK_BYTES_DEFAULT,
        },
        Batched::Raw,
        Batched::Eventlog {
            preallocate_chunk_bytes: 0,
        },
        Batched::RawFallocated,
        Batched::RawPrezeroed,
        Batched::RawEncodeInLoop,
        Batched::RawZeroAhead,
    ]
    .into_iter()
    .filter(|v| cfg.variants.is_empty() || cfg.variants.contains(&v.key()))
    .collect();
    let mut batched: Vec<Vec<BatchedRun>> = variants.iter().map(|_| Vec::new()).collect();
    for r in 0..cfg.reps {
        for (vi, v) in variants.iter().enumerate() {
            eprintln!(
                "log_vs_raw: batched rep {}/{}: {}",
                r + 1,
                cfg.reps,
                v.key()
            );
            batched[vi].push(run_batched(cfg, base, *v, payloads, framed));
        }
    }
    let framed_len = record::framed_len(cfg.payload_bytes) as f64;
    let med_secs = |runs: &[BatchedRun]| median(&runs.iter().map(|r| r.secs).collect::<Vec<_>>());
    let rps_of = |v: Batched| {
        variants
            .iter()
            .position(|&x| x == v)
            .map(|vi| cfg.records as f64 / med_secs(&batched[vi]))
    };
    let raw_rps = rps_of(Batched::Raw).unwrap_or(f64::NAN);
    rep.line(format!(
        "## Batched durable append: {} × {} B, {} records per append/fdatasync",
        thousands(cfg.records as f64),
        cfg.payload_bytes,
        thousands(cfg.batch as f64)
    ));
    rep.line("");
    rep.line("| variant | records/s | payload MB/s | disk MB/s | ms per batch | fdatasyncs | vs raw limit |");
    rep.line("|---|---:|---:|---:|---:|---:|---:|");
    for (vi, v) in variants.iter().enumerate() {
        let secs = med_secs(&batched[vi]);
        let rps = cfg.records as f64 / secs;
        rep.line(format!(
            "| {} | {} | {:.1} | {:.1} | {:.3} | {} | {:.2} |",
            v.label(),
            thousands(rps),
            rps * cfg.payload_bytes as f64 / MB,
            rps * framed_len / MB,
            secs * 1e3 / cfg.batches() as f64,
            batched[vi][0].fsyncs,
            rps / raw_rps
        ));
        let w = "batched_sync_append";
        let key = v.key();
        rep.row(
            w,
            v.store(),
            &format!("{key}_records_per_s"),
            rps,
            "records/s",
        );
        rep.row(
            w,
            v.store(),
            &format!("{key}_payload_mb_per_s"),
            rps * cfg.payload_bytes as f64 / MB,
            "MB/s",
        );
    }
    rep.line("");
    if let (Some(el_rps), true) = (
        rps_of(Batched::Eventlog {
            preallocate_chunk_bytes: PREALLOCATE_CHUNK_BYTES_DEFAULT,
        }),
        raw_rps.is_finite(),
    ) {
        let ratio = el_rps / raw_rps;
        // The disk's speed drifts (shared or throttled virtual disks especially); each
        // eventlog run is followed directly by its raw run, so the ratio within a rep is
        // steadier than the ratio of medians.
        let runs_of = |v: Batched| {
            variants
                .iter()
                .position(|&x| x == v)
                .map_or(&[][..], |vi| batched[vi].as_slice())
        };
        let paired = median(
            &runs_of(Batched::Eventlog {
                preallocate_chunk_bytes: PREALLOCATE_CHUNK_BYTES_DEFAULT,
            })
            .iter()
            .zip(runs_of(Batched::Raw))
            .map(|(e, r)| r.secs / e.secs)
            .collect::<Vec<_>>(),
        );
        rep.line(format!(
            "**eventlog / raw = {:.2}** (goal ≥ 0.80: {}); median of the per-rep ratios: {:.2}",
            ratio,
            if ratio >= 0.80 { "met" } else { "NOT met" },
            paired
        ));
        rep.row(
            "batched_sync_append",
            "eventlog",
            "paired_ratio_eventlog_over_raw",
            paired,
            "ratio",
        );
        rep.row(
            "batched_sync_append",
            "eventlog",
            "ratio_eventlog_over_raw",
            ratio,
            "ratio",
        );
        rep.line("");
    }
    let per_rep: Vec<String> = variants
        .iter()
        .enumerate()
        .map(|(vi, v)| {
            let s: Vec<String> = batched[vi]
                .iter()
                .map(|r| format!("{:.2}", r.secs))
                .collect();
            format!("{}: [{}]", v.key(), s.join(", "))
        })
        .collect();
    rep.line(format!("per-rep seconds: {}", per_rep.join("; ")));
    rep.line("");
}

/// One line of the concurrent-append table.
#[derive(Clone, Copy)]
enum Appenders {
    Eventlog {
        threads: usize,
        preallocate_chunk_bytes: u64,
    },
    Raw {
        fallocate: bool,
    },
}

impl Appenders {
    fn label(&self) -> String {
        match *self {
            Appenders::Eventlog {
                preallocate_chunk_bytes: PREALLOCATE_CHUNK_BYTES_DEFAULT,
                ..
            } => "eventlog".into(),
            Appenders::Eventlog {
                preallocate_chunk_bytes,
                ..
            } => format!("eventlog, preallocate_chunk_bytes = {preallocate_chunk_bytes}"),
            Appenders::Raw { fallocate: false } => "raw write+fdatasync, fresh file".into(),
            Appenders::Raw { fallocate: true } => {
                "raw write+fdatasync, posix_fallocate'd file".into()
            }
        }
    }

    fn key(&self) -> (&'static str, String) {
        match *self {
            Appenders::Eventlog {
                threads,
                preallocate_chunk_bytes: PREALLOCATE_CHUNK_BYTES_DEFAULT,
            } => ("eventlog", format!("sync_single_append_{threads}_threads")),
            Appenders::Eventlog {
                threads,
                preallocate_chunk_bytes,
            } => (
                "eventlog",
                format!("sync_single_append_{threads}_threads_prealloc_{preallocate_chunk_bytes}"),
            ),
            Appenders::Raw { fallocate: false } => ("raw", "sync_single_append_1_threads".into()),
            Appenders::Raw { fallocate: true } => {
                ("raw", "sync_single_append_1_threads_fallocated".into())
            }
        }
    }

    fn threads(&self) -> usize {
        match *self {
            Appenders::Eventlog { threads, .. } => threads,
            Appenders::Raw { .. } => 1,
        }
    }
}

fn section_threads(cfg: &Config, base: &Path, rep: &mut Report, one: &[u8]) {
    let mut variants: Vec<Appenders> = cfg
        .threads
        .iter()
        .map(|&threads| Appenders::Eventlog {
            threads,
            preallocate_chunk_bytes: PREALLOCATE_CHUNK_BYTES_DEFAULT,
        })
        .collect();
    // What preallocation is worth to a lone appender, on both sides.
    variants.push(Appenders::Eventlog {
        threads: 1,
        preallocate_chunk_bytes: 0,
    });
    variants.push(Appenders::Raw { fallocate: false });
    variants.push(Appenders::Raw { fallocate: true });
    let mut runs: Vec<Vec<ThreadsRun>> = variants.iter().map(|_| Vec::new()).collect();
    for r in 0..cfg.reps {
        for (vi, v) in variants.iter().enumerate() {
            eprintln!(
                "log_vs_raw: threads rep {}/{}: {}, {} appenders",
                r + 1,
                cfg.reps,
                v.label(),
                v.threads()
            );
            let run = match *v {
                Appenders::Eventlog {
                    threads,
                    preallocate_chunk_bytes,
                } => run_threads(base, threads, preallocate_chunk_bytes, cfg.thread_secs, one),
                Appenders::Raw { fallocate } => {
                    run_raw_single(base, fallocate, cfg.thread_secs, one)
                }
            };
            runs[vi].push(run);
        }
    }
    rep.line(format!(
        "## Single-record durable appends (Durability::Sync, {} B), {:.0} s per run",
        cfg.payload_bytes, cfg.thread_secs
    ));
    rep.line("");
    rep.line("| store | appenders | total records/s | vs 1 appender | p50 latency ms | p99 latency ms | records per fdatasync |");
    rep.line("|---|---:|---:|---:|---:|---:|---:|");
    let summarize = |runs: &[ThreadsRun]| {
        let rps = median(
            &runs
                .iter()
                .map(|r| r.records as f64 / r.secs)
                .collect::<Vec<_>>(),
        );
        let p50 = median(&runs.iter().map(|r| r.p50_ns).collect::<Vec<_>>());
        let p99 = median(&runs.iter().map(|r| r.p99_ns).collect::<Vec<_>>());
        let per_sync = median(
            &runs
                .iter()
                .map(|r| r.records as f64 / r.fsyncs.max(1) as f64)
                .collect::<Vec<_>>(),
        );
        (rps, p50, p99, per_sync)
    };
    let base_rps = runs.first().map_or(f64::NAN, |r| summarize(r).0);
    for (vi, v) in variants.iter().enumerate() {
        let (rps, p50, p99, per_sync) = summarize(&runs[vi]);
        rep.line(format!(
            "| {} | {} | {} | {:.1}× | {} | {} | {:.1} |",
            v.label(),
            v.threads(),
            thousands(rps),
            rps / base_rps,
            ms(p50),
            ms(p99),
            per_sync
        ));
        let (store, w) = v.key();
        rep.row(&w, store, "records_per_s", rps, "records/s");
        rep.row(&w, store, "append_latency_p50", p50 / 1e6, "ms");
        rep.row(&w, store, "append_latency_p99", p99 / 1e6, "ms");
        rep.row(&w, store, "records_per_fdatasync", per_sync, "records");
    }
    rep.line("");
}

fn section_reads(cfg: &Config, base: &Path, rep: &mut Report, payloads: &[Vec<u8>], framed: &[u8]) {
    eprintln!("log_vs_raw: filling a log for the read tests ...");
    let read_dir = tempfile::Builder::new()
        .prefix("log-vs-raw-read-")
        .tempdir_in(base)
        .expect("temp dir");
    let mut o = LogOptions::default();
    o.durability = Durability::None;
    let log = Log::open(read_dir.path(), o).expect("open");
    for _ in 0..cfg.batches() {
        log.append(payloads).expect("append");
    }
    log.sync().expect("sync");
    let first_pass = iterate_all(&log, cfg.records, cfg.payload_bytes);
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let seqs: Vec<u64> = (0..cfg.records)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % cfg.records
        })
        .collect();
    let mut iter_secs = Vec::new();
    let mut random_secs = Vec::new();
    let mut decode_secs = Vec::new();
    for r in 0..cfg.reps {
        eprintln!("log_vs_raw: read rep {}/{}", r + 1, cfg.reps);
        iter_secs.push(iterate_all(&log, cfg.records, cfg.payload_bytes));
        random_secs.push(read_random(&log, &seqs));
        decode_secs.push(decode_all(framed, cfg.records));
    }
    drop(log);
    rep.line(format!(
        "## Reads of {} × {} B (warm; first pass took {:.3} s)",
        thousands(cfg.records as f64),
        cfg.payload_bytes,
        first_pass
    ));
    rep.line("");
    rep.line("| workload | records/s | payload GB/s | ns per record |");
    rep.line("|---|---:|---:|---:|");
    for (name, key, store, secs) in [
        (
            "eventlog `iter_from(0)`, sequential",
            "sequential_iter",
            "eventlog",
            median(&iter_secs),
        ),
        (
            "eventlog `read(seq)`, random seqs",
            "random_read",
            "eventlog",
            median(&random_secs),
        ),
        (
            "limit: `record::decode` loop over the framed bytes in memory",
            "decode_loop",
            "raw",
            median(&decode_secs),
        ),
    ] {
        let rps = cfg.records as f64 / secs;
        let gbps = rps * cfg.payload_bytes as f64 / GB;
        rep.line(format!(
            "| {} | {} | {:.2} | {:.1} |",
            name,
            thousands(rps),
            gbps,
            1e9 / rps
        ));
        rep.row(key, store, "records_per_s", rps, "records/s");
        rep.row(key, store, "payload_gb_per_s", gbps, "GB/s");
    }
    let iter_gbps = cfg.records as f64 * cfg.payload_bytes as f64 / median(&iter_secs) / GB;
    rep.line("");
    rep.line(format!(
        "**sequential read = {:.2} GB/s of payload** (goal > 1 GB/s: {})",
        iter_gbps,
        if iter_gbps > 1.0 { "met" } else { "NOT met" }
    ));
    rep.line("");
}
