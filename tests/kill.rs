//! Crash test with real processes and real `SIGKILL`s.
//!
//! The test binary runs in two modes:
//!
//! - **Child** (`EVENTLOG_KILL_CHILD=<dir>` set): opens the log in `<dir>` with small
//!   segments, prints `open <next_seq> <truncated_tail_bytes> <rebuilt_index_files>
//!   <truncated_tail_reason or ->`, then
//!   runs [`THREADS`] threads that append forever: single records and atomic appends of
//!   2..=8 records, with payloads of 32..=2000 bytes derived deterministically from (run,
//!   thread, counter, index in batch, batch size, length): a 32-byte header naming those,
//!   then a seeded byte stream, so the parent can identify any record it finds in the log
//!   and recompute its bytes exactly. After each append returns `Ok`, the thread
//!   prints one line per acknowledged record, `ack <seq> <run> <thread> <counter> <index>
//!   <count> <len>`, in one write followed by a flush.
//! - **Parent** (default): for `EVENTLOG_KILL_CYCLES` cycles (default 50), spawns one to
//!   three children in a row on the same directory, `SIGKILL`s each after a random time
//!   (sometimes 0..=2 ms, so the kill lands in startup or in recovery of the previous
//!   child's torn tail), then reopens the log and checks:
//!   - `iter_from(0)` yields exactly `next_seq()` records, seqs `0..n`, with no error, and
//!     every record is self-identifying with byte-identical content;
//!   - every acknowledged record is at its seq (via `read` and via the iterator), in this
//!     and all earlier cycles; the log seen at the previous check is a prefix of this one;
//!   - atomicity: the log is a sequence of whole appends (each append's records at
//!     adjacent seqs, all present), and each (run, thread) has counters `0, 1, 2, ..` in
//!     order, with no gap or duplicate;
//!   - appends resume: one record appended by the parent lands at `next_seq()`.
//!
//! Environment: `EVENTLOG_KILL_CYCLES` (default 50), `EVENTLOG_KILL_SEED` (default: from
//! the clock; always printed so a failing run can be repeated with the same choices —
//! the kill timing itself is not reproducible).

#[path = "kill_harness/mod.rs"]
mod kill_harness;
use kill_harness::{env_u64, splitmix, Rng, ENV_CYCLES, ENV_SEED};

use eventlog::log::{Log, LogOptions, ReadError};
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

const ENV_CHILD_DIR: &str = "EVENTLOG_KILL_CHILD";
const ENV_CHILD_RUN: &str = "EVENTLOG_KILL_CHILD_RUN";
const ENV_CHILD_SEED: &str = "EVENTLOG_KILL_CHILD_SEED";

const CYCLES_DEFAULT: u64 = 50;
const THREADS: u32 = 4;
const SEGMENT_SIZE_BYTES: u64 = 256 << 10;
const PREALLOCATE_CHUNK_BYTES: u64 = 64 << 10;

/// Every payload starts with this header, so any record found in the log says which
/// append it belongs to and what its bytes must be.
const PAYLOAD_MAGIC: [u8; 4] = *b"KILL";
/// magic 4, run 4, thread 4, counter 8, index 4, count 4, len 4.
const PAYLOAD_HEADER_BYTES: u32 = 32;
const PAYLOAD_LEN_MAX: u32 = 2000;
const BATCH_RECORDS_MAX: u32 = 8;
/// The `thread` of the record the parent appends after each check.
const PARENT_THREAD: u32 = u32::MAX;
const SIGKILL: i32 = 9;

fn options() -> LogOptions {
    let mut o = LogOptions::default();
    o.segment_size_bytes = SEGMENT_SIZE_BYTES;
    o.preallocate_chunk_bytes = PREALLOCATE_CHUNK_BYTES;
    // Recovery points in the middle of segments too, written by the preallocation thread.
    o.recovery_point_step_bytes = 16 << 10;
    // Must fit in a segment; the test's payloads are at most PAYLOAD_LEN_MAX anyway.
    o.record_size_bytes_max = 16 << 10;
    o
}

/// What a record is: which append of which child thread, and its place in that append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Desc {
    /// Child process number (0, 1, ..) over the whole test.
    run: u32,
    thread: u32,
    /// The thread's append number, from 0 in each run.
    counter: u64,
    /// Index in the append, `0..count`.
    index: u32,
    /// Records in the append.
    count: u32,
    /// Payload length in bytes.
    len: u32,
}

impl Desc {
    /// The seeded stream the payload body (after the header) is cut from.
    fn body_rng(&self) -> Rng {
        Rng::new(
            splitmix(u64::from(self.run) << 32 | u64::from(self.thread))
                ^ splitmix(self.counter)
                ^ (u64::from(self.index) << 40 | u64::from(self.len)),
        )
    }

    fn header(&self) -> [u8; PAYLOAD_HEADER_BYTES as usize] {
        let mut h = [0u8; PAYLOAD_HEADER_BYTES as usize];
        h[0..4].copy_from_slice(&PAYLOAD_MAGIC);
        h[4..8].copy_from_slice(&self.run.to_le_bytes());
        h[8..12].copy_from_slice(&self.thread.to_le_bytes());
        h[12..20].copy_from_slice(&self.counter.to_le_bytes());
        h[20..24].copy_from_slice(&self.index.to_le_bytes());
        h[24..28].copy_from_slice(&self.count.to_le_bytes());
        h[28..32].copy_from_slice(&self.len.to_le_bytes());
        h
    }

    /// The payload: the header, then `len - 32` bytes of the seeded stream.
    fn payload(&self) -> Vec<u8> {
        let len = self.len as usize;
        let mut v = Vec::with_capacity(len + 8);
        v.extend_from_slice(&self.header());
        let mut rng = self.body_rng();
        while v.len() < len {
            v.extend_from_slice(&rng.next().to_le_bytes());
        }
        v.truncate(len);
        v
    }

    /// Where `bytes` first differs from this record's payload, if anywhere. No allocation:
    /// checking every byte of the whole log each cycle must stay cheap.
    fn first_difference(&self, bytes: &[u8]) -> Option<usize> {
        let header = self.header();
        if let Some(i) = (0..header.len().min(bytes.len())).find(|&i| bytes[i] != header[i]) {
            return Some(i);
        }
        if bytes.len() != self.len as usize {
            return Some(bytes.len().min(self.len as usize));
        }
        let mut rng = self.body_rng();
        let body = &bytes[header.len()..];
        let mut words = body.chunks_exact(8);
        for (k, word) in words.by_ref().enumerate() {
            let expected = rng.next();
            let found = u64::from_le_bytes(word.try_into().unwrap());
            if found != expected {
                let j = ((found ^ expected).trailing_zeros() / 8) as usize;
                return Some(header.len() + 8 * k + j);
            }
        }
        let rest = words.remainder();
        let expected = rng.next().to_le_bytes();
        if let Some(j) = (0..rest.len()).find(|&j| rest[j] != expected[j]) {
            return Some(bytes.len() - rest.len() + j);
        }
        None
    }

    /// Identifies a record from its payload and checks every byte of it.
    fn identify(bytes: &[u8]) -> Result<Desc, String> {
        if bytes.len() < PAYLOAD_HEADER_BYTES as usize || bytes[0..4] != PAYLOAD_MAGIC {
            return Err(format!(
                "payload of {} bytes is not one this test wrote (starts {:02x?})",
                bytes.len(),
                &bytes[..bytes.len().min(16)]
            ));
        }
        let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().unwrap());
        let d = Desc {
            run: u32_at(4),
            thread: u32_at(8),
            counter: u64::from_le_bytes(bytes[12..20].try_into().unwrap()),
            index: u32_at(20),
            count: u32_at(24),
            len: u32_at(28),
        };
        if d.len as usize != bytes.len() {
            return Err(format!(
                "payload header says {} bytes, record has {}: {d:?}",
                d.len,
                bytes.len()
            ));
        }
        if d.count == 0 || d.count > BATCH_RECORDS_MAX || d.index >= d.count {
            return Err(format!("payload header is inconsistent: {d:?}"));
        }
        if let Some(i) = d.first_difference(bytes) {
            let expected = d.payload();
            return Err(format!(
                "payload differs from what was written at byte {i} (found {:#04x}, expected {:#04x}): {d:?}",
                bytes[i], expected[i]
            ));
        }
        Ok(d)
    }
}

// ---------------------------------------------------------------------------------------
// Child
// ---------------------------------------------------------------------------------------

fn child_main(dir: &str) -> ! {
    let run = env_u64(ENV_CHILD_RUN).expect("child needs EVENTLOG_KILL_CHILD_RUN") as u32;
    let seed = env_u64(ENV_CHILD_SEED).expect("child needs EVENTLOG_KILL_CHILD_SEED");
    let log = match Log::open(Path::new(dir), options()) {
        Ok(log) => log,
        Err(e) => {
            eprintln!("child run {run}: open failed: {e}");
            std::process::exit(2);
        }
    };
    {
        let r = log.recovery_report();
        let mut out = std::io::stdout().lock();
        let _ = writeln!(
            out,
            "open {} {} {} {}",
            log.next_seq(),
            r.truncated_tail_bytes,
            r.rebuilt_index_files,
            r.truncated_tail_reason
                .as_deref()
                .unwrap_or("-")
                .replace('\n', " ")
        );
        let _ = out.flush();
    }
    std::thread::scope(|s| {
        for thread in 0..THREADS {
            let log = &log;
            s.spawn(move || child_append_loop(log, run, thread, seed));
        }
    });
    unreachable!("append loops never return");
}

fn child_append_loop(log: &Log, run: u32, thread: u32, seed: u64) -> ! {
    let mut rng = Rng::new(seed ^ splitmix(u64::from(thread) + 1));
    let mut lines = String::new();
    for counter in 0u64.. {
        let count = if rng.chance(50) {
            1
        } else {
            rng.range(2, u64::from(BATCH_RECORDS_MAX)) as u32
        };
        let len_max = if rng.chance(20) { 64 } else { PAYLOAD_LEN_MAX };
        let descs: Vec<Desc> = (0..count)
            .map(|index| Desc {
                run,
                thread,
                counter,
                index,
                count,
                len: rng.range(u64::from(PAYLOAD_HEADER_BYTES), u64::from(len_max)) as u32,
            })
            .collect();
        let payloads: Vec<Vec<u8>> = descs.iter().map(Desc::payload).collect();
        let seqs = match log.append(&payloads) {
            Ok(seqs) => seqs,
            Err(e) => {
                eprintln!("child run {run} thread {thread}: append {counter} failed: {e}");
                std::process::exit(3);
            }
        };
        if seqs.end - seqs.start != u64::from(count) {
            eprintln!(
                "child run {run} thread {thread}: append of {count} records returned seqs {seqs:?}"
            );
            std::process::exit(3);
        }
        lines.clear();
        for (seq, d) in seqs.zip(&descs) {
            let _ = writeln!(
                lines,
                "ack {seq} {} {} {} {} {} {}",
                d.run, d.thread, d.counter, d.index, d.count, d.len
            );
        }
        let mut out = std::io::stdout().lock();
        if out
            .write_all(lines.as_bytes())
            .and_then(|()| out.flush())
            .is_err()
        {
            std::process::exit(4);
        }
    }
    unreachable!()
}

// ---------------------------------------------------------------------------------------
// Parent
// ---------------------------------------------------------------------------------------

/// What one child process did before it was killed.
struct ChildRun {
    run: u32,
    kill_after: Duration,
    /// `(next_seq, truncated_tail_bytes, rebuilt_index_files, truncated_tail_reason)` if
    /// it got its log open.
    opened: Option<(u64, u64, u32, Option<String>)>,
    acks: Vec<(u64, Desc)>,
    status: ExitStatus,
    stderr: String,
}

fn spawn_and_kill(
    exe: &Path,
    dir: &Path,
    run: u32,
    seed: u64,
    kill_after: Duration,
) -> Result<ChildRun, String> {
    let mut child = Command::new(exe)
        .env(ENV_CHILD_DIR, dir)
        .env(ENV_CHILD_RUN, run.to_string())
        .env(ENV_CHILD_SEED, seed.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawning child {}: {e}", exe.display()))?;
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stdout.read_to_end(&mut buf);
        buf
    });
    let err_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stderr.read_to_end(&mut buf);
        buf
    });
    std::thread::sleep(kill_after);
    // SIGKILL. A child that already exited is a zombie until waited for, so this succeeds.
    child
        .kill()
        .map_err(|e| format!("killing child run {run}: {e}"))?;
    let status = child
        .wait()
        .map_err(|e| format!("waiting for child run {run}: {e}"))?;
    let out = out_reader.join().expect("stdout reader panicked");
    let stderr =
        String::from_utf8_lossy(&err_reader.join().expect("stderr reader panicked")).into_owned();

    let mut opened = None;
    let mut acks = Vec::new();
    // Only lines ending in '\n' were fully written; the rest is a line cut by the kill.
    let complete = match out.iter().rposition(|&b| b == b'\n') {
        Some(i) => &out[..=i],
        None => &[][..],
    };
    let text = std::str::from_utf8(complete)
        .map_err(|e| format!("child run {run} printed non-UTF-8 output: {e}"))?;
    for line in text.lines() {
        let bad = || format!("child run {run} printed an unexpected line: {line:?}");
        if let Some(rest) = line.strip_prefix("open ") {
            let mut words = rest.splitn(4, ' ');
            let mut num = || {
                words
                    .next()
                    .and_then(|w| w.parse::<u64>().ok())
                    .ok_or_else(bad)
            };
            let (next, truncated, rebuilt) = (num()?, num()?, num()?);
            let reason = words.next().filter(|r| *r != "-").map(str::to_string);
            let rebuilt = u32::try_from(rebuilt).map_err(|_| bad())?;
            opened = Some((next, truncated, rebuilt, reason));
            continue;
        }
        let mut words = line.split(' ');
        let tag = words.next().unwrap_or("");
        let nums: Vec<u64> = words
            .map(|w| w.parse::<u64>().map_err(|_| bad()))
            .collect::<Result<_, _>>()?;
        match (tag, nums.as_slice()) {
            ("ack", &[seq, run, thread, counter, index, count, len]) => {
                let n32 = |x: u64| u32::try_from(x).map_err(|_| bad());
                acks.push((
                    seq,
                    Desc {
                        run: n32(run)?,
                        thread: n32(thread)?,
                        counter,
                        index: n32(index)?,
                        count: n32(count)?,
                        len: n32(len)?,
                    },
                ));
            }
            _ => return Err(bad()),
        }
    }
    let child_run = ChildRun {
        run,
        kill_after,
        opened,
        acks,
        status,
        stderr,
    };
    if status.signal() != Some(SIGKILL) {
        return Err(format!(
            "child run {run} was not ended by our SIGKILL but {status}; its stderr:\n{}",
            child_run.stderr
        ));
    }
    if !child_run.acks.is_empty() && child_run.opened.is_none() {
        return Err(format!(
            "child run {run} acknowledged appends without an `open` line"
        ));
    }
    Ok(child_run)
}

#[derive(Default)]
struct Totals {
    cycles: u64,
    child_runs: u64,
    /// Child runs killed before they had the log open.
    killed_before_open: u64,
    acked_records: u64,
    /// Reopens (by the parent or by a child) that cut a torn tail, and the bytes cut.
    parent_truncations: u64,
    parent_truncated_bytes: u64,
    child_truncations: u64,
    child_truncated_bytes: u64,
    rebuilt_index_files: u64,
    /// Why tails were truncated, and how often.
    truncation_reasons: BTreeMap<String, u64>,
    /// Records present after a kill that were never acknowledged (written and synced, but
    /// killed before the ack line got out) — allowed.
    unacked_present: u64,
    records_in_log: u64,
    segments: u64,
    /// Time spent reopening and checking in the parent.
    check_time: Duration,
}

/// Everything the parent knows about the log between cycles.
#[derive(Default)]
struct Known {
    /// Every record of the log at the end of the last cycle, by seq.
    records: Vec<Desc>,
    /// Every acknowledged record, over all cycles.
    acked: Vec<(u64, Desc)>,
}

/// Reopens the log after the kills and checks everything; then appends one record.
fn check_and_resume(
    dir: &Path,
    cycle: u64,
    runs: &[ChildRun],
    known: &mut Known,
    totals: &mut Totals,
) -> Result<(), String> {
    // A child that started on the log another child left behind must have found every
    // record acknowledged so far.
    let mut durable_next = known.records.len() as u64;
    for r in runs {
        if let Some((next, ..)) = &r.opened {
            if *next < durable_next {
                return Err(format!(
                    "child run {} opened the log with next_seq {next}, but seqs below {durable_next} were acknowledged (or checked) before",
                    r.run
                ));
            }
        }
        if let Some(&(seq, _)) = r.acks.iter().max_by_key(|(seq, _)| *seq) {
            durable_next = durable_next.max(seq + 1);
        }
    }

    let log = Log::open(dir, options()).map_err(|e| format!("reopening the log failed: {e}"))?;
    let report = log.recovery_report().clone();
    if !report.quarantined.is_empty() {
        return Err(format!("recovery quarantined data: {report:?}"));
    }
    if report.truncated_tail_bytes > 0 {
        totals.parent_truncations += 1;
        totals.parent_truncated_bytes += report.truncated_tail_bytes;
        let reason = report.truncated_tail_reason.clone().unwrap_or_default();
        *totals.truncation_reasons.entry(reason).or_default() += 1;
    }
    totals.rebuilt_index_files += u64::from(report.rebuilt_index_files);

    // The whole log, in order, every record identified and its bytes checked.
    let n = log.next_seq();
    let mut records = Vec::with_capacity(n as usize);
    for (i, item) in log.iter_from(0).enumerate() {
        let record =
            item.map_err(|e| format!("iter_from(0) failed at item {i} (next_seq() is {n}): {e}"))?;
        if record.seq() != i as u64 {
            return Err(format!("iter_from(0) item {i} has seq {}", record.seq()));
        }
        let d = Desc::identify(record.payload()).map_err(|e| format!("record at seq {i}: {e}"))?;
        records.push(d);
    }
    if records.len() as u64 != n {
        return Err(format!(
            "iter_from(0) yielded {} records but next_seq() is {n}",
            records.len()
        ));
    }
    match log.read(n) {
        Err(ReadError::NotFound { .. }) => {}
        other => {
            return Err(format!(
                "read(next_seq() = {n}) gave {other:?}, not NotFound"
            ))
        }
    }

    // Nothing that was there before is gone or changed.
    if records.len() < known.records.len() {
        return Err(format!(
            "the log shrank from {} records (after the last cycle) to {}",
            known.records.len(),
            records.len()
        ));
    }
    if let Some(seq) = (0..known.records.len()).find(|&s| records[s] != known.records[s]) {
        return Err(format!(
            "seq {seq} held {:?} after the last cycle but now holds {:?}",
            known.records[seq], records[seq]
        ));
    }

    // The log is a sequence of whole appends; per (run, thread) the appends are
    // 0, 1, 2, .. in order (a thread appends again only after its previous append returned).
    let mut next_counter: HashMap<(u32, u32), u64> = HashMap::new();
    let mut s = 0usize;
    while s < records.len() {
        let head = records[s];
        if head.index != 0 {
            return Err(format!(
                "seq {s} is record {} of an append of {} but the append's earlier records are not before it: {head:?}",
                head.index, head.count
            ));
        }
        for j in 0..head.count as usize {
            let Some(&d) = records.get(s + j) else {
                return Err(format!(
                    "append at seqs {s}..{} is torn: only {} of its {} records are in the log (next_seq {n}): {head:?}",
                    s + head.count as usize,
                    records.len() - s,
                    head.count
                ));
            };
            let same = d.run == head.run
                && d.thread == head.thread
                && d.counter == head.counter
                && d.count == head.count
                && d.index == j as u32;
            if !same {
                return Err(format!(
                    "append at seqs {s}..{} is not contiguous: seq {} holds {d:?}, expected record {j} of {head:?}",
                    s + head.count as usize,
                    s + j
                ));
            }
        }
        let expected = next_counter.entry((head.run, head.thread)).or_insert(0);
        if head.thread != PARENT_THREAD && head.counter != *expected {
            return Err(format!(
                "run {} thread {}: append {} at seq {s}, expected append {} (lost, duplicated or reordered)",
                head.run, head.thread, head.counter, *expected
            ));
        }
        *expected = head.counter + 1;
        s += head.count as usize;
    }

    // Every acknowledged record is there, by iteration and by read(), in this cycle and all
    // earlier ones.
    let new_acks: Vec<(u64, Desc)> = runs.iter().flat_map(|r| r.acks.iter().copied()).collect();
    for &(seq, d) in &new_acks {
        let Some(&found) = records.get(seq as usize) else {
            return Err(format!(
                "acknowledged seq {seq} ({d:?}) is missing: the log has {n} records"
            ));
        };
        if found != d {
            return Err(format!(
                "acknowledged seq {seq} should hold {d:?} but holds {found:?}"
            ));
        }
        let via_read = log
            .read(seq)
            .map_err(|e| format!("read({seq}) of an acknowledged record failed: {e}"))?;
        if d.first_difference(via_read.payload()).is_some() {
            return Err(format!(
                "read({seq}) returned other bytes than written for {d:?}"
            ));
        }
    }
    known.acked.extend_from_slice(&new_acks);
    for &(seq, d) in &known.acked {
        if records.get(seq as usize) != Some(&d) {
            return Err(format!(
                "seq {seq}, acknowledged in an earlier cycle as {d:?}, now holds {:?}",
                records.get(seq as usize)
            ));
        }
    }
    totals.acked_records += new_acks.len() as u64;
    totals.unacked_present +=
        (records.len() - known.records.len()).saturating_sub(new_acks.len()) as u64;

    // Appends resume where the log ends.
    let d = Desc {
        run: u32::MAX,
        thread: PARENT_THREAD,
        counter: cycle,
        index: 0,
        count: 1,
        len: PAYLOAD_HEADER_BYTES + (cycle % 100) as u32,
    };
    let seqs = log
        .append(&[d.payload()])
        .map_err(|e| format!("the parent's append after recovery failed: {e}"))?;
    if seqs != (n..n + 1) {
        return Err(format!(
            "the parent's append got seqs {seqs:?}, expected {n}..{}",
            n + 1
        ));
    }
    let back = log
        .read(n)
        .map_err(|e| format!("reading back the parent's record at {n}: {e}"))?;
    if back.payload() != d.payload().as_slice() {
        return Err(format!("the parent's record at {n} reads back wrong"));
    }
    records.push(d);
    totals.records_in_log = records.len() as u64;
    totals.segments = log.stats().segment_count;
    log.close()
        .map_err(|e| format!("closing the log after the check failed: {e}"))?;
    known.records = records;
    Ok(())
}

fn main() {
    if let Ok(dir) = std::env::var(ENV_CHILD_DIR) {
        child_main(&dir);
    }
    let Some(kill_harness::Run {
        started,
        seed,
        cycles,
    }) = kill_harness::begin("kill", CYCLES_DEFAULT)
    else {
        return;
    };
    let exe = std::env::current_exe().expect("current_exe");
    let tmp = tempfile::tempdir().expect("creating a temp dir");
    let dir = tmp.path().to_path_buf();
    println!(
        "kill: seed {seed} (set {ENV_SEED}={seed} to repeat), {cycles} cycles ({ENV_CYCLES}), log in {}",
        dir.display()
    );

    let mut rng = Rng::new(seed);
    let mut known = Known::default();
    let mut totals = Totals::default();
    let mut next_run = 0u32;
    for cycle in 0..cycles {
        // Usually one child per cycle; sometimes two or three in a row with no clean open
        // in between, so a child starts on a torn tail and may die inside recovery.
        let children = if rng.chance(25) { rng.range(2, 3) } else { 1 };
        let mut runs = Vec::new();
        let mut failure = None;
        for k in 0..children {
            let last = k + 1 == children;
            let early = rng.chance(if last { 15 } else { 50 });
            let kill_after = if early {
                Duration::from_micros(rng.range(0, 2_000))
            } else if rng.chance(5) {
                Duration::from_millis(rng.range(100, 300))
            } else {
                Duration::from_millis(rng.range(5, 80))
            };
            let run = next_run;
            next_run += 1;
            match spawn_and_kill(&exe, &dir, run, rng.next(), kill_after) {
                Ok(r) => {
                    totals.child_runs += 1;
                    match &r.opened {
                        None => totals.killed_before_open += 1,
                        Some((_, truncated, rebuilt, reason)) => {
                            if *truncated > 0 {
                                totals.child_truncations += 1;
                                totals.child_truncated_bytes += truncated;
                                let reason = reason.clone().unwrap_or_default();
                                *totals.truncation_reasons.entry(reason).or_default() += 1;
                            }
                            totals.rebuilt_index_files += u64::from(*rebuilt);
                        }
                    }
                    runs.push(r);
                }
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        let result = match failure {
            Some(e) => Err(e),
            None => {
                let t0 = Instant::now();
                let r = check_and_resume(&dir, cycle, &runs, &mut known, &mut totals);
                totals.check_time += t0.elapsed();
                r
            }
        };
        if let Err(msg) = result {
            let kept = tmp.keep();
            eprintln!();
            eprintln!("kill: FAILED at cycle {cycle} of {cycles}, seed {seed} (rerun with {ENV_SEED}={seed})");
            eprintln!("kill: {msg}");
            for r in &runs {
                eprintln!(
                    "kill:   child run {} killed after {:?}: opened {:?}, {} acks{}, status {}{}",
                    r.run,
                    r.kill_after,
                    r.opened,
                    r.acks.len(),
                    r.acks
                        .last()
                        .map(|(s, _)| format!(" (last acked seq {s})"))
                        .unwrap_or_default(),
                    r.status,
                    if r.stderr.is_empty() {
                        String::new()
                    } else {
                        format!(", stderr:\n{}", r.stderr)
                    }
                );
            }
            eprintln!("kill: log directory kept at {}", kept.display());
            println!("test kill ... FAILED");
            println!();
            println!(
                "test result: FAILED. 0 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in {:.2}s",
                started.elapsed().as_secs_f64()
            );
            std::process::exit(101);
        }
        totals.cycles += 1;
    }

    let t = &totals;
    println!(
        "kill: {} cycles, {} child processes SIGKILLed ({} before they had the log open)",
        t.cycles, t.child_runs, t.killed_before_open
    );
    println!(
        "kill: {} acknowledged records all recovered; {} unacknowledged records also present; {} records in {} segments at the end",
        t.acked_records, t.unacked_present, t.records_in_log, t.segments
    );
    println!(
        "kill: recovery truncated a torn tail {} times in the parent ({} bytes) and {} times in children ({} bytes); {} index files rebuilt",
        t.parent_truncations,
        t.parent_truncated_bytes,
        t.child_truncations,
        t.child_truncated_bytes,
        t.rebuilt_index_files
    );
    println!(
        "kill: {:.2}s spent reopening and checking the log",
        t.check_time.as_secs_f64()
    );
    for (reason, n) in &t.truncation_reasons {
        println!("kill:   {n} x truncated because: {reason}");
    }
    println!("test kill ... ok");
    println!();
    println!(
        "test result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in {:.2}s",
        started.elapsed().as_secs_f64()
    );
    println!();
}
