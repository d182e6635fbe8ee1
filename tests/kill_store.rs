//! Crash test of the store (log + index) with real processes and real `SIGKILL`s.
//!
//! The test binary runs in two modes:
//!
//! - **Child** (`EVENTLOG_KILL_STORE_CHILD=<dir>` set): opens the [`Store`] in `<dir>` with
//!   small segments, a small, often-flushing index (so a kill often lands in the middle of
//!   a sled write) and a tiny latest-version cache, prints `open <next_seq>
//!   <truncated_tail_bytes> <index_rebuilt 0|1> <caught_up_events> <rebuild reason or ->`,
//!   then runs [`THREADS`] threads that append forever:
//!   - to a few shared aggregates (`agg-0`..`agg-19`, so histories get long and cross many
//!     64-version checkpoints), sometimes to a new aggregate or to one the thread created;
//!   - 1..=5 events per append, or (sometimes) a multi-aggregate `append_batch` of 2..=3
//!     requests, possibly naming the same aggregate twice;
//!   - expecting `Exact(current)` (read through `aggregate_version`, retried on
//!     `WrongExpectedVersion`), `Any`, `NoStream` or `Exists`;
//!   - with event types among [`TYPES`], binary or JSON payloads of 0..60 KiB, sometimes
//!     caller-given event ids (and then sometimes the same append again, which must be
//!     recognized as a retry and return the original result) and correlation ids.
//!
//!   Every payload starts with a header naming (run, thread, counter, index in the append,
//!   events in the append, aggregate, type, flags, padding), followed by seeded padding, so
//!   the parent can identify any event it finds and recompute its bytes exactly. After each
//!   append returns `Ok`, the thread prints one line per event, `ack <seq> <version>
//!   <header>`, in one write followed by a flush.
//! - **Parent** (default): for `EVENTLOG_KILL_CYCLES` cycles (default 30), spawns one to
//!   three children in a row on the same directory and `SIGKILL`s each (usually 5..150 ms
//!   after it opened the store; sometimes 0..3 ms or 3..40 ms after spawning it, so the kill
//!   lands in log recovery or index catch-up). Every 5th cycle it also deletes the `index`
//!   directory (after taking a dump of the caught-up index) so the index is rebuilt from the
//!   log, and checks the rebuilt index is identical. Then it reopens the store and checks:
//!   - each child that opened the store found every event acknowledged before it; the log
//!     quarantined nothing; the index was never ahead of the log (it only ever sees synced
//!     events). Other index rebuilds (sled refusing its files after a kill) are allowed,
//!     since the store then rebuilds from the log, and are counted in the summary;
//!   - `read_all(0, MAX)` yields exactly `next_seq()` events, seqs `0..n`; every event is
//!     one a child (or the parent) wrote, with byte-identical payload, the aggregate, type,
//!     content type, event id and correlation id it was written with; each aggregate's
//!     versions in log order are `1, 2, 3, ..`; `read_seq(n)` fails;
//!   - the log seen at the previous check is a prefix of this one;
//!   - atomicity: the log is a sequence of whole appends (each append's events at adjacent
//!     seqs, all present), and each (run, thread) has appends `0, 1, 2, ..` in order, with
//!     no gap and no duplicate (a recognized retry stores nothing);
//!   - every acknowledged event, of this cycle and all earlier ones, is at its seq with its
//!     version, and `read_seq(seq)` returns the same aggregate, version, type and payload;
//!   - for every aggregate: `aggregate_version` is the length of its history;
//!     `read_aggregate(agg, 1, Forward, MAX)` is exactly its events (from the log) with
//!     contiguous versions `1..=n`; `read_aggregate(agg, u64::MAX, Backward, MAX)` is the
//!     reverse; random windows forward and backward with limits agree;
//!   - for every type: `read_type(type, 0, MAX)` is exactly the seqs of its events, and a
//!     random window agrees;
//!   - `stats()` counts events, aggregates and types right;
//!   - appends resume: the parent appends one event with `Exact(version)`, which lands at
//!     `next_seq()` with the next version.
//!
//! Environment: `EVENTLOG_KILL_CYCLES` (default 30), `EVENTLOG_KILL_SEED` (default: from
//! the clock; always printed so a failing run can be repeated with the same choices —
//! the kill timing itself is not reproducible).

#[path = "kill_harness/mod.rs"]
mod kill_harness;
use kill_harness::{env_u64, splitmix, Rng, ENV_CYCLES, ENV_SEED};

use eventlog::store::{
    AppendError, AppendRequest, ContentType, Direction, EventRef, ExpectedVersion, NewEvent,
    Options, Store,
};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use uuid::Uuid;

const ENV_CHILD_DIR: &str = "EVENTLOG_KILL_STORE_CHILD";
const ENV_CHILD_RUN: &str = "EVENTLOG_KILL_STORE_CHILD_RUN";
const ENV_CHILD_SEED: &str = "EVENTLOG_KILL_STORE_CHILD_SEED";

const TEST_NAME: &str = "kill_store";
const CYCLES_DEFAULT: u64 = 30;
/// Every this many cycles the index directory is deleted before the check.
const REBUILD_EVERY: u64 = 5;
const THREADS: u32 = 4;
const SEGMENT_SIZE_BYTES: u64 = 256 << 10;
const PREALLOCATE_CHUNK_BYTES: u64 = 64 << 10;
const PAYLOAD_SIZE_BYTES_MAX: usize = 64 << 10;
/// The largest padding: header and padding stay below `PAYLOAD_SIZE_BYTES_MAX`.
const PAD_MAX: u32 = 60_000;
/// Shared aggregates `agg-0..agg-{SHARED_AGGREGATES - 1}`.
const SHARED_AGGREGATES: u64 = 20;
const TYPES: [&str; 5] = [
    "OrderPlaced",
    "ItemAdded",
    "ItemRemoved",
    "AddressChanged",
    "a.rather.long.event.type.name.v2",
];
/// The `run` of the events the parent appends after each check.
const PARENT_RUN: u32 = u32::MAX;
const SIGKILL: i32 = 9;
/// How long the parent waits for a child's `open` line before giving up on it.
const OPEN_WAIT: Duration = Duration::from_secs(30);

const FLAG_JSON: u8 = 1;
const FLAG_ID: u8 = 2;
const FLAG_CORRELATION: u8 = 4;

const BINARY_PREFIX: &[u8] = b"KSB|";
const JSON_PREFIX: &[u8] = b"{\"ks\":\"";
const JSON_MIDDLE: &[u8] = b"\",\"pad\":\"";
const JSON_SUFFIX: &[u8] = b"\"}";

fn options() -> Options {
    let mut o = Options::default();
    o.log.segment_size_bytes = SEGMENT_SIZE_BYTES;
    o.log.preallocate_chunk_bytes = PREALLOCATE_CHUNK_BYTES;
    // Recovery points in the middle of segments too, written by the preallocation thread.
    o.log.recovery_point_step_bytes = 32 << 10;
    o.index.flush_events = 200;
    o.index.flush_interval_ms = 5;
    o.index.lag_events_max = 2_000;
    o.index.cache_bytes = 1 << 20;
    // Smaller than the number of aggregates: the cache empties and refills all the time,
    // so appends often ask sled (or the memtables) for the latest version.
    o.index.latest_cache_aggregates = 8;
    o.payload_size_bytes_max = PAYLOAD_SIZE_BYTES_MAX;
    o
}

/// What an event is: which append of which child thread, its place in that append, and
/// everything it was written with.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Desc {
    /// Child process number (0, 1, ..) over the whole test; [`PARENT_RUN`] for the parent.
    run: u32,
    thread: u32,
    /// The thread's successful append number, from 0 in each run (the cycle for the parent).
    counter: u64,
    /// Index in the append (over all requests of a batch), `0..count`.
    index: u32,
    /// Events in the append (over all requests of a batch).
    count: u32,
    aggregate: String,
    /// Index in [`TYPES`].
    ty: u8,
    /// [`FLAG_JSON`], [`FLAG_ID`], [`FLAG_CORRELATION`].
    flags: u8,
    /// Bytes of seeded padding after the header.
    pad: u32,
}

impl Desc {
    /// The header every payload starts with (after a prefix); space-separated, so an ack
    /// line can carry it too.
    fn header(&self) -> String {
        format!(
            "{} {} {} {} {} {} {} {} {}",
            self.run,
            self.thread,
            self.counter,
            self.index,
            self.count,
            self.aggregate,
            self.ty,
            self.flags,
            self.pad
        )
    }

    fn parse_header(h: &str) -> Option<Desc> {
        let w: Vec<&str> = h.split(' ').collect();
        if w.len() != 9 {
            return None;
        }
        let d = Desc {
            run: w[0].parse().ok()?,
            thread: w[1].parse().ok()?,
            counter: w[2].parse().ok()?,
            index: w[3].parse().ok()?,
            count: w[4].parse().ok()?,
            aggregate: w[5].to_string(),
            ty: w[6].parse().ok()?,
            flags: w[7].parse().ok()?,
            pad: w[8].parse().ok()?,
        };
        let sane = d.count > 0
            && d.index < d.count
            && usize::from(d.ty) < TYPES.len()
            && d.flags < 8
            && d.pad <= PAD_MAX
            && !d.aggregate.is_empty();
        sane.then_some(d)
    }

    fn event_type(&self) -> &'static str {
        TYPES[usize::from(self.ty)]
    }

    fn is_json(&self) -> bool {
        self.flags & FLAG_JSON != 0
    }

    fn content_type(&self) -> ContentType {
        if self.is_json() {
            ContentType::Json
        } else {
            ContentType::Binary
        }
    }

    fn event_id(&self) -> Option<Uuid> {
        (self.flags & FLAG_ID != 0).then(|| {
            Uuid::from_u64_pair(
                splitmix(u64::from(self.run) << 32 | u64::from(self.thread)),
                self.counter << 20 | u64::from(self.index),
            )
        })
    }

    fn correlation_id(&self) -> Option<String> {
        (self.flags & FLAG_CORRELATION != 0).then(|| {
            format!(
                "corr-{}-{}-{}-{}",
                self.run, self.thread, self.counter, self.index
            )
        })
    }

    fn pad_rng(&self) -> Rng {
        Rng::new(
            splitmix(u64::from(self.run) << 32 | u64::from(self.thread))
                ^ splitmix(self.counter ^ 0x5555_5555)
                ^ (u64::from(self.index) << 40 | u64::from(self.pad)),
        )
    }

    /// Writes the payload into `out` (cleared first).
    fn write_payload(&self, out: &mut Vec<u8>) {
        out.clear();
        let header = self.header();
        let json = self.is_json();
        out.extend_from_slice(if json { JSON_PREFIX } else { BINARY_PREFIX });
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(if json { JSON_MIDDLE } else { b"|" });
        let start = out.len();
        out.resize(start + self.pad as usize, 0);
        let mut rng = self.pad_rng();
        for chunk in out[start..].chunks_mut(8) {
            chunk.copy_from_slice(&rng.next().to_le_bytes()[..chunk.len()]);
        }
        if json {
            for b in &mut out[start..] {
                *b = b'a' + *b % 26;
            }
            out.extend_from_slice(JSON_SUFFIX);
        }
    }

    fn payload(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.write_payload(&mut v);
        v
    }

    fn new_event(&self) -> NewEvent {
        let payload = self.payload();
        let mut e = if self.is_json() {
            NewEvent::json_text(self.event_type(), payload)
        } else {
            NewEvent::binary(self.event_type(), payload)
        };
        if let Some(id) = self.event_id() {
            e = e.with_id(id);
        }
        if let Some(c) = self.correlation_id() {
            e = e.with_correlation_id(c);
        }
        e
    }

    /// Identifies an event from its payload and checks every byte of it (`buf` is scratch
    /// space).
    fn identify(bytes: &[u8], buf: &mut Vec<u8>) -> Result<Desc, String> {
        let header = if let Some(rest) = bytes.strip_prefix(BINARY_PREFIX) {
            rest.iter().position(|&b| b == b'|').map(|i| &rest[..i])
        } else if let Some(rest) = bytes.strip_prefix(JSON_PREFIX) {
            rest.iter().position(|&b| b == b'"').map(|i| &rest[..i])
        } else {
            None
        };
        let d = header
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(Desc::parse_header)
            .ok_or_else(|| {
                format!(
                    "payload of {} bytes is not one this test wrote (starts {:?})",
                    bytes.len(),
                    String::from_utf8_lossy(&bytes[..bytes.len().min(60)])
                )
            })?;
        d.check_payload(bytes, buf)?;
        Ok(d)
    }

    /// Whether `bytes` is exactly this event's payload (`buf` is scratch space).
    fn check_payload(&self, bytes: &[u8], buf: &mut Vec<u8>) -> Result<(), String> {
        self.write_payload(buf);
        if bytes == buf.as_slice() {
            return Ok(());
        }
        let i = (0..bytes.len().min(buf.len()))
            .find(|&i| bytes[i] != buf[i])
            .unwrap_or(bytes.len().min(buf.len()));
        Err(format!(
            "payload of {} bytes differs from the {} bytes written, first at byte {i}: {self:?}",
            bytes.len(),
            buf.len()
        ))
    }

    /// Checks an event read back against this description (everything but seq and version).
    fn check_event(&self, e: &EventRef<'_>, buf: &mut Vec<u8>) -> Result<(), String> {
        self.check_event_head(e)?;
        self.check_payload(e.payload, buf)
    }

    /// As [`Desc::check_event`], except the payload.
    fn check_event_head(&self, e: &EventRef<'_>) -> Result<(), String> {
        if e.aggregate_id != self.aggregate {
            return Err(format!(
                "aggregate is {:?}, expected {:?}",
                e.aggregate_id, self.aggregate
            ));
        }
        if e.event_type != self.event_type() {
            return Err(format!(
                "type is {:?}, expected {:?}",
                e.event_type,
                self.event_type()
            ));
        }
        if e.content_type != self.content_type() {
            return Err(format!(
                "content type is {:?}, expected {:?}",
                e.content_type,
                self.content_type()
            ));
        }
        if let Some(id) = self.event_id() {
            if e.event_id != id {
                return Err(format!("event id is {}, expected {id}", e.event_id));
            }
        }
        if e.correlation_id != self.correlation_id().as_deref() {
            return Err(format!(
                "correlation id is {:?}, expected {:?}",
                e.correlation_id,
                self.correlation_id()
            ));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Child
// ---------------------------------------------------------------------------------------

fn child_main(dir: &str) -> ! {
    let run = env_u64(ENV_CHILD_RUN).expect("child needs EVENTLOG_KILL_STORE_CHILD_RUN") as u32;
    let seed = env_u64(ENV_CHILD_SEED).expect("child needs EVENTLOG_KILL_STORE_CHILD_SEED");
    let store = match Store::open(Path::new(dir), options()) {
        Ok(store) => store,
        Err(e) => {
            eprintln!("child run {run}: open failed: {e}");
            std::process::exit(2);
        }
    };
    {
        let r = store.open_report();
        let mut out = std::io::stdout().lock();
        let _ = writeln!(
            out,
            "open {} {} {} {} {}",
            store.next_seq(),
            r.log.truncated_tail_bytes,
            u8::from(r.index.rebuilt),
            r.index.caught_up_events,
            r.index
                .rebuild_reason
                .as_deref()
                .unwrap_or("-")
                .replace('\n', " ")
        );
        let _ = out.flush();
    }
    std::thread::scope(|s| {
        for thread in 0..THREADS {
            let store = &store;
            s.spawn(move || child_append_loop(store, run, thread, seed));
        }
    });
    unreachable!("append loops never return");
}

fn die(run: u32, thread: u32, msg: String) -> ! {
    eprintln!("child run {run} thread {thread}: {msg}");
    std::process::exit(3);
}

fn choose_expected(rng: &mut Rng, current: u64) -> ExpectedVersion {
    match rng.below(100) {
        0..=54 => ExpectedVersion::Exact(current),
        55..=79 => ExpectedVersion::Any,
        _ if current == 0 => ExpectedVersion::NoStream,
        _ => ExpectedVersion::Exists,
    }
}

fn child_append_loop(store: &Store, run: u32, thread: u32, seed: u64) -> ! {
    let mut rng = Rng::new(seed ^ splitmix(u64::from(thread) + 1));
    // Aggregates this thread created.
    let mut own: Vec<String> = Vec::new();
    let mut lines = String::new();
    for counter in 0u64.. {
        // The plan: one request, or a batch of 2..=3 (maybe naming an aggregate twice).
        let batch = rng.chance(15);
        let n_requests = if batch { rng.range(2, 3) } else { 1 };
        let mut plan: Vec<(String, u32)> = Vec::new();
        for r in 0..n_requests {
            let aggregate = if r > 0 && rng.chance(20) {
                plan[0].0.clone()
            } else if rng.chance(5) {
                let name = format!("new-{run}-{thread}-{counter}-{r}");
                own.push(name.clone());
                name
            } else if !own.is_empty() && rng.chance(5) {
                own[rng.below(own.len() as u64) as usize].clone()
            } else if rng.chance(30) {
                format!("agg-{}", rng.below(3))
            } else {
                format!("agg-{}", rng.below(SHARED_AGGREGATES))
            };
            let n = if batch {
                rng.range(1, 3)
            } else {
                rng.range(1, 5)
            } as u32;
            plan.push((aggregate, n));
        }
        let count: u32 = plan.iter().map(|p| p.1).sum();
        let with_ids = rng.chance(10);
        let mut descs: Vec<Desc> = Vec::new();
        for (aggregate, n) in &plan {
            for _ in 0..*n {
                let mut flags = 0;
                if rng.chance(30) {
                    flags |= FLAG_JSON;
                }
                if with_ids {
                    flags |= FLAG_ID;
                }
                if rng.chance(10) {
                    flags |= FLAG_CORRELATION;
                }
                let pad = match rng.below(100) {
                    0..=69 => rng.range(0, 200),
                    70..=96 => rng.range(200, 2_000),
                    _ => rng.range(2_000, u64::from(PAD_MAX)),
                } as u32;
                descs.push(Desc {
                    run,
                    thread,
                    counter,
                    index: descs.len() as u32,
                    count,
                    aggregate: aggregate.clone(),
                    ty: rng.below(TYPES.len() as u64) as u8,
                    flags,
                    pad,
                });
            }
        }
        let events: Vec<NewEvent> = descs.iter().map(Desc::new_event).collect();
        let mut slices: Vec<&[NewEvent]> = Vec::new();
        let mut at = 0;
        for (_, n) in &plan {
            slices.push(&events[at..at + *n as usize]);
            at += *n as usize;
        }

        // Append, deciding the expected versions again after each conflict.
        let (expected, results) = loop {
            let mut view: HashMap<&str, u64> = HashMap::new();
            let mut expected = Vec::new();
            for (aggregate, n) in &plan {
                let current = match view.get(aggregate.as_str()) {
                    Some(&v) => v,
                    None => store
                        .aggregate_version(aggregate)
                        .unwrap_or_else(|e| die(run, thread, format!("aggregate_version: {e}"))),
                };
                expected.push(choose_expected(&mut rng, current));
                view.insert(aggregate, current + u64::from(*n));
            }
            let requests: Vec<AppendRequest<'_>> = plan
                .iter()
                .zip(&expected)
                .zip(&slices)
                .map(|(((aggregate, _), &expected), &events)| AppendRequest {
                    aggregate_id: aggregate,
                    expected,
                    events,
                })
                .collect();
            let result = if batch {
                store.append_batch(&requests)
            } else {
                store
                    .append(requests[0].aggregate_id, requests[0].expected, slices[0])
                    .map(|a| vec![a])
            };
            match result {
                Ok(results) => break (expected, results),
                Err(AppendError::WrongExpectedVersion { .. }) => {
                    let mut out = std::io::stdout().lock();
                    if out
                        .write_all(b"conflict\n")
                        .and_then(|()| out.flush())
                        .is_err()
                    {
                        std::process::exit(4);
                    }
                }
                Err(e) => die(run, thread, format!("append {counter} failed: {e}")),
            }
        };

        // The results must be consistent with what was asked.
        lines.clear();
        let mut next_seq = results[0].first_seq;
        let mut k = 0;
        for (i, ((_, n), appended)) in plan.iter().zip(&results).enumerate() {
            let n = u64::from(*n);
            let ok = appended.first_seq == next_seq
                && appended.last_seq == next_seq + n - 1
                && appended.last_version >= n
                && match expected[i] {
                    ExpectedVersion::Exact(v) => appended.last_version == v + n,
                    ExpectedVersion::NoStream => appended.last_version == n,
                    ExpectedVersion::Exists => appended.last_version > n,
                    ExpectedVersion::Any => true,
                };
            if !ok {
                die(
                    run,
                    thread,
                    format!(
                        "append {counter}: request {i} of {n} events expecting {:?} returned {appended:?} (requests {plan:?}, results {results:?})",
                        expected[i]
                    ),
                );
            }
            for j in 0..n {
                let d = &descs[k];
                let _ = writeln!(
                    lines,
                    "ack {} {} {}",
                    appended.first_seq + j,
                    appended.last_version - n + 1 + j,
                    d.header()
                );
                k += 1;
            }
            next_seq = appended.last_seq + 1;
        }
        let mut out = std::io::stdout().lock();
        if out
            .write_all(lines.as_bytes())
            .and_then(|()| out.flush())
            .is_err()
        {
            std::process::exit(4);
        }
        drop(out);

        // Sometimes send the same append again: with ids, it must be recognized as a retry.
        if with_ids && !batch && rng.chance(30) {
            let n = u64::from(plan[0].1);
            let again_expected = if rng.chance(50) {
                ExpectedVersion::Exact(results[0].last_version - n)
            } else {
                ExpectedVersion::Any
            };
            match store.append(&plan[0].0, again_expected, slices[0]) {
                Ok(again) if again == results[0] => {
                    let mut out = std::io::stdout().lock();
                    if out.write_all(b"retry-ok\n").and_then(|()| out.flush()).is_err() {
                        std::process::exit(4);
                    }
                }
                other => die(
                    run,
                    thread,
                    format!(
                        "append {counter} sent again (expecting {again_expected:?}) returned {other:?}, not the original {:?}",
                        results[0]
                    ),
                ),
            }
        }
    }
    unreachable!()
}

// ---------------------------------------------------------------------------------------
// Parent
// ---------------------------------------------------------------------------------------

/// What the child printed when it had the store open.
#[derive(Debug, Clone)]
struct Opened {
    next_seq: u64,
    truncated_tail_bytes: u64,
    index_rebuilt: bool,
    caught_up_events: u64,
    rebuild_reason: Option<String>,
}

/// An acknowledged event.
#[derive(Debug, Clone)]
struct Ack {
    seq: u64,
    version: u64,
    desc: Desc,
}

/// When to kill a child.
#[derive(Debug, Clone, Copy)]
enum KillAt {
    /// This long after spawning it.
    AfterSpawn(Duration),
    /// This long after it printed its `open` line.
    AfterOpen(Duration),
}

/// What one child process did before it was killed.
struct ChildRun {
    run: u32,
    kill_at: KillAt,
    opened: Option<Opened>,
    acks: Vec<Ack>,
    conflicts: u64,
    retries_recognized: u64,
    status: ExitStatus,
    stderr: String,
}

fn parse_child_output(run: u32, out: &[u8], r: &mut ChildRun) -> Result<(), String> {
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
            let w: Vec<&str> = rest.splitn(5, ' ').collect();
            if w.len() != 5 {
                return Err(bad());
            }
            let num = |s: &str| s.parse::<u64>().map_err(|_| bad());
            r.opened = Some(Opened {
                next_seq: num(w[0])?,
                truncated_tail_bytes: num(w[1])?,
                index_rebuilt: num(w[2])? != 0,
                caught_up_events: num(w[3])?,
                rebuild_reason: (w[4] != "-").then(|| w[4].to_string()),
            });
        } else if let Some(rest) = line.strip_prefix("ack ") {
            let mut w = rest.splitn(3, ' ');
            let seq = w.next().and_then(|s| s.parse().ok()).ok_or_else(bad)?;
            let version = w.next().and_then(|s| s.parse().ok()).ok_or_else(bad)?;
            let desc = w.next().and_then(Desc::parse_header).ok_or_else(bad)?;
            if desc.run != run {
                return Err(bad());
            }
            r.acks.push(Ack { seq, version, desc });
        } else if line == "conflict" {
            r.conflicts += 1;
        } else if line == "retry-ok" {
            r.retries_recognized += 1;
        } else {
            return Err(bad());
        }
    }
    Ok(())
}

fn spawn_and_kill(
    exe: &Path,
    dir: &Path,
    run: u32,
    seed: u64,
    kill_at: KillAt,
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
    let (first_line_tx, first_line_rx) = mpsc::channel::<()>();
    let out_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let mut chunk = vec![0u8; 64 << 10];
        let mut signalled = false;
        loop {
            match stdout.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    if !signalled && chunk[..n].contains(&b'\n') {
                        signalled = true;
                        let _ = first_line_tx.send(());
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        buf
    });
    let err_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stderr.read_to_end(&mut buf);
        buf
    });
    let mut open_timeout = false;
    match kill_at {
        KillAt::AfterSpawn(d) => std::thread::sleep(d),
        KillAt::AfterOpen(d) => match first_line_rx.recv_timeout(OPEN_WAIT) {
            Ok(()) => std::thread::sleep(d),
            // The child exited (its status says why).
            Err(mpsc::RecvTimeoutError::Disconnected) => {}
            Err(mpsc::RecvTimeoutError::Timeout) => open_timeout = true,
        },
    }
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
    let mut r = ChildRun {
        run,
        kill_at,
        opened: None,
        acks: Vec::new(),
        conflicts: 0,
        retries_recognized: 0,
        status,
        stderr,
    };
    parse_child_output(run, &out, &mut r)?;
    if open_timeout {
        return Err(format!(
            "child run {run} did not open the store within {OPEN_WAIT:?}; its stderr:\n{}",
            r.stderr
        ));
    }
    if status.signal() != Some(SIGKILL) {
        return Err(format!(
            "child run {run} was not ended by our SIGKILL but {status}; its stderr:\n{}",
            r.stderr
        ));
    }
    if !r.acks.is_empty() && r.opened.is_none() {
        return Err(format!(
            "child run {run} acknowledged appends without an `open` line"
        ));
    }
    Ok(r)
}

#[derive(Default)]
struct Totals {
    cycles: u64,
    child_runs: u64,
    /// Child runs killed before they had the store open.
    killed_before_open: u64,
    acked_events: u64,
    acked_appends: u64,
    acked_batches: u64,
    conflicts: u64,
    retries_recognized: u64,
    /// Events present after a kill that were never acknowledged — allowed.
    unacked_present: u64,
    /// Log tails cut at reopen, by the parent or a child, and the bytes cut.
    truncations: u64,
    truncated_bytes: u64,
    /// Events the index caught up from the log at reopen (parent and children).
    caught_up_events: u64,
    /// Index rebuilds not asked for (the index directory was there), by who opened the
    /// store and why.
    index_rebuilds: BTreeMap<String, u64>,
    /// Rebuilds after the parent deleted the index directory.
    deleted_index_rebuilds: u64,
    events_in_log: u64,
    aggregates: u64,
    longest_history: u64,
    segments: u64,
    /// Time spent reopening and checking in the parent.
    check_time: Duration,
}

impl Totals {
    fn count_open(
        &mut self,
        who: &str,
        truncated: u64,
        rebuilt: bool,
        reason: Option<&str>,
        caught: u64,
    ) {
        if truncated > 0 {
            self.truncations += 1;
            self.truncated_bytes += truncated;
        }
        if rebuilt {
            *self
                .index_rebuilds
                .entry(format!("{who}: {}", reason.unwrap_or("?")))
                .or_default() += 1;
        }
        self.caught_up_events += caught;
    }
}

/// An event of the log as the parent found it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Row {
    desc: Desc,
    version: u64,
    /// CRC-32 of the payload, which the scan checked byte for byte against the
    /// description: later reads of the same seq are compared to it.
    crc: u32,
}

/// Everything the parent knows about the store between cycles.
#[derive(Default)]
struct Known {
    /// Every event of the log at the end of the last cycle, by seq.
    records: Vec<Row>,
    /// Every acknowledged event, over all cycles.
    acked: Vec<Ack>,
}

/// `(seq, version)` of the events `read_aggregate` yields, each checked to belong to the
/// aggregate.
fn read_aggregate_seqs(
    store: &Store,
    aggregate: &str,
    from: u64,
    direction: Direction,
    limit: usize,
) -> Result<Vec<(u64, u64)>, String> {
    let what = format!("read_aggregate({aggregate:?}, {from}, {direction:?}, {limit})");
    let iter = store
        .read_aggregate(aggregate, from, direction, limit)
        .map_err(|e| format!("{what} failed: {e}"))?;
    let mut out = Vec::new();
    for (i, item) in iter.enumerate() {
        let stored = item.map_err(|e| format!("{what}: item {i} failed: {e}"))?;
        let e = stored
            .event()
            .map_err(|e| format!("{what}: item {i} does not decode: {e}"))?;
        if e.aggregate_id != aggregate || e.seq != stored.seq() {
            return Err(format!(
                "{what}: item {i} (seq {}) belongs to {:?}",
                stored.seq(),
                e.aggregate_id
            ));
        }
        out.push((e.seq, e.version));
    }
    Ok(out)
}

fn read_type_seqs(
    store: &Store,
    ty: &str,
    from_seq: u64,
    limit: usize,
) -> Result<Vec<u64>, String> {
    let what = format!("read_type({ty:?}, {from_seq}, {limit})");
    let iter = store
        .read_type(ty, from_seq, limit)
        .map_err(|e| format!("{what} failed: {e}"))?;
    let mut out = Vec::new();
    for (i, item) in iter.enumerate() {
        let stored = item.map_err(|e| format!("{what}: item {i} failed: {e}"))?;
        let e = stored
            .event()
            .map_err(|e| format!("{what}: item {i} does not decode: {e}"))?;
        if e.event_type != ty {
            return Err(format!(
                "{what}: item {i} (seq {}) has type {:?}",
                stored.seq(),
                e.event_type
            ));
        }
        out.push(stored.seq());
    }
    Ok(out)
}

/// The first position where two sequences differ, for messages.
fn first_mismatch<T: PartialEq + std::fmt::Debug>(found: &[T], expected: &[T]) -> String {
    let i = (0..found.len().min(expected.len()))
        .find(|&i| found[i] != expected[i])
        .unwrap_or(found.len().min(expected.len()));
    format!(
        "{} items, expected {}; first difference at item {i}: found {:?}, expected {:?}",
        found.len(),
        expected.len(),
        found.get(i),
        expected.get(i)
    )
}

/// What the log says each aggregate and type holds.
struct Expected {
    /// Seqs of each aggregate's events, in version order.
    aggregates: HashMap<String, Vec<u64>>,
    /// Seqs of each type's events, increasing.
    types: Vec<Vec<u64>>,
}

/// Reads the whole store through `read_all`: every event identified and checked.
fn scan_log(store: &Store, buf: &mut Vec<u8>) -> Result<(Vec<Row>, Expected), String> {
    let n = store.next_seq();
    let mut rows = Vec::with_capacity(n as usize);
    let mut expected = Expected {
        aggregates: HashMap::new(),
        types: vec![Vec::new(); TYPES.len()],
    };
    for (i, item) in store.read_all(0, usize::MAX).enumerate() {
        let i = i as u64;
        let stored =
            item.map_err(|e| format!("read_all(0) failed at item {i} (next_seq() is {n}): {e}"))?;
        if stored.seq() != i {
            return Err(format!("read_all(0) item {i} has seq {}", stored.seq()));
        }
        let e = stored
            .event()
            .map_err(|e| format!("event at seq {i} does not decode: {e}"))?;
        if e.seq != i {
            return Err(format!("event at seq {i} says it is seq {}", e.seq));
        }
        let desc = Desc::identify(e.payload, buf).map_err(|m| format!("event at seq {i}: {m}"))?;
        desc.check_event_head(&e)
            .map_err(|m| format!("event at seq {i}: {m}"))?;
        if !expected.aggregates.contains_key(&desc.aggregate) {
            expected
                .aggregates
                .insert(desc.aggregate.clone(), Vec::new());
        }
        let history = expected.aggregates.get_mut(&desc.aggregate).unwrap();
        if e.version != history.len() as u64 + 1 {
            return Err(format!(
                "event at seq {i} is version {} of {:?}, but the log holds {} earlier events of it (seqs ..{:?}): {desc:?}",
                e.version,
                desc.aggregate,
                history.len(),
                history.last()
            ));
        }
        history.push(i);
        expected.types[usize::from(desc.ty)].push(i);
        rows.push(Row {
            desc,
            version: e.version,
            crc: crc32fast::hash(e.payload),
        });
    }
    if rows.len() as u64 != n {
        return Err(format!(
            "read_all(0) yielded {} events but next_seq() is {n}",
            rows.len()
        ));
    }
    if let Ok(e) = store.read_seq(n) {
        return Err(format!(
            "read_seq(next_seq() = {n}) returned an event: seq {}",
            e.seq()
        ));
    }
    Ok((rows, expected))
}

/// The log is a sequence of whole appends; per (run, thread) the appends are 0, 1, 2, ..
/// in order (a thread appends again only after its previous append returned, and a
/// recognized retry stores nothing).
fn check_appends(rows: &[Row]) -> Result<(), String> {
    let mut next_counter: HashMap<(u32, u32), u64> = HashMap::new();
    let mut s = 0usize;
    while s < rows.len() {
        let head = &rows[s].desc;
        if head.index != 0 {
            return Err(format!(
                "seq {s} is event {} of an append of {} but the append's earlier events are not before it: {head:?}",
                head.index, head.count
            ));
        }
        for j in 0..head.count as usize {
            let Some(row) = rows.get(s + j) else {
                return Err(format!(
                    "append at seqs {s}..{} is torn: only {} of its {} events are in the log: {head:?}",
                    s + head.count as usize,
                    rows.len() - s,
                    head.count
                ));
            };
            let d = &row.desc;
            let same = d.run == head.run
                && d.thread == head.thread
                && d.counter == head.counter
                && d.count == head.count
                && d.index == j as u32;
            if !same {
                return Err(format!(
                    "append at seqs {s}..{} is not contiguous: seq {} holds {d:?}, expected event {j} of {head:?}",
                    s + head.count as usize,
                    s + j
                ));
            }
        }
        let expected = next_counter.entry((head.run, head.thread)).or_insert(0);
        if head.counter != *expected {
            return Err(format!(
                "run {} thread {}: append {} at seq {s}, expected append {} (lost, duplicated or reordered)",
                head.run, head.thread, head.counter, *expected
            ));
        }
        *expected = head.counter + 1;
        s += head.count as usize;
    }
    Ok(())
}

/// Every aggregate's history through the index, forward, backward and in windows.
fn check_aggregates(store: &Store, expected: &Expected, rng: &mut Rng) -> Result<(), String> {
    let mut names: Vec<&String> = expected.aggregates.keys().collect();
    names.sort();
    for name in names {
        let seqs = &expected.aggregates[name];
        let n = seqs.len() as u64;
        let version = store
            .aggregate_version(name)
            .map_err(|e| format!("aggregate_version({name:?}) failed: {e}"))?;
        if version != n {
            return Err(format!(
                "aggregate_version({name:?}) is {version}, but the log holds {n} events of it"
            ));
        }
        let want: Vec<(u64, u64)> = seqs.iter().copied().zip(1..).collect();
        let forward = read_aggregate_seqs(store, name, 1, Direction::Forward, usize::MAX)?;
        if forward != want {
            return Err(format!(
                "read_aggregate({name:?}, 1, Forward) differs from the log: {}",
                first_mismatch(&forward, &want)
            ));
        }
        let want_back: Vec<(u64, u64)> = want.iter().rev().copied().collect();
        let backward = read_aggregate_seqs(store, name, u64::MAX, Direction::Backward, usize::MAX)?;
        if backward != want_back {
            return Err(format!(
                "read_aggregate({name:?}, MAX, Backward) differs from the log: {}",
                first_mismatch(&backward, &want_back)
            ));
        }
        // A window each way, starting anywhere (often mid-chunk, far from the latest).
        let from = rng.range(1, n);
        let limit = rng.range(1, 150) as usize;
        let window = read_aggregate_seqs(store, name, from, Direction::Forward, limit)?;
        let lo = (from - 1) as usize;
        let want_window = &want[lo..(lo + limit).min(want.len())];
        if window != want_window {
            return Err(format!(
                "read_aggregate({name:?}, {from}, Forward, {limit}) differs from the log: {}",
                first_mismatch(&window, want_window)
            ));
        }
        let window = read_aggregate_seqs(store, name, from, Direction::Backward, limit)?;
        let want_window: Vec<(u64, u64)> = want
            [from.saturating_sub(limit as u64) as usize..from as usize]
            .iter()
            .rev()
            .copied()
            .collect();
        if window != want_window {
            return Err(format!(
                "read_aggregate({name:?}, {from}, Backward, {limit}) differs from the log: {}",
                first_mismatch(&window, &want_window)
            ));
        }
    }
    // An aggregate that was never written.
    let none = "never-written";
    let version = store
        .aggregate_version(none)
        .map_err(|e| format!("aggregate_version({none:?}) failed: {e}"))?;
    let events = read_aggregate_seqs(store, none, 1, Direction::Forward, usize::MAX)?;
    if version != 0 || !events.is_empty() {
        return Err(format!(
            "{none:?} has version {version} and events {events:?}"
        ));
    }
    Ok(())
}

fn check_types(store: &Store, expected: &Expected, rng: &mut Rng) -> Result<(), String> {
    for (t, want) in expected.types.iter().enumerate() {
        let ty = TYPES[t];
        let found = read_type_seqs(store, ty, 0, usize::MAX)?;
        if found != *want {
            return Err(format!(
                "read_type({ty:?}, 0) differs from the log: {}",
                first_mismatch(&found, want)
            ));
        }
        let from_seq = rng.below(store.next_seq() + 1);
        let limit = rng.range(1, 500) as usize;
        let found = read_type_seqs(store, ty, from_seq, limit)?;
        let start = want.partition_point(|&s| s < from_seq);
        let want_window = &want[start..(start + limit).min(want.len())];
        if found != want_window {
            return Err(format!(
                "read_type({ty:?}, {from_seq}, {limit}) differs from the log: {}",
                first_mismatch(&found, want_window)
            ));
        }
    }
    Ok(())
}

fn open_store(dir: &Path) -> Result<Store, String> {
    Store::open(dir, options()).map_err(|e| format!("reopening the store failed: {e}"))
}

/// Reopens the store after the kills and checks everything; then appends one event.
fn check_and_resume(
    dir: &Path,
    cycle: u64,
    runs: &[ChildRun],
    known: &mut Known,
    totals: &mut Totals,
    rng: &mut Rng,
) -> Result<(), String> {
    // A child that started on the store another child left behind must have found every
    // event acknowledged so far.
    let mut durable_next = known.records.len() as u64;
    for r in runs {
        if let Some(o) = &r.opened {
            if o.next_seq < durable_next {
                return Err(format!(
                    "child run {} opened the store with next_seq {}, but seqs below {durable_next} were acknowledged (or checked) before",
                    r.run, o.next_seq
                ));
            }
        }
        if let Some(a) = r.acks.iter().max_by_key(|a| a.seq) {
            durable_next = durable_next.max(a.seq + 1);
        }
    }

    let rebuild = cycle % REBUILD_EVERY == REBUILD_EVERY - 1;
    let mut dump_before = None;
    if rebuild {
        // The index as catch-up leaves it, then the same rebuilt from scratch.
        let store = open_store(dir)?;
        let r = store.open_report();
        totals.count_open(
            "parent",
            r.log.truncated_tail_bytes,
            r.index.rebuilt,
            r.index.rebuild_reason.as_deref(),
            r.index.caught_up_events,
        );
        dump_before = Some(
            store
                .index_dump()
                .map_err(|e| format!("index_dump() failed: {e}"))?,
        );
        drop(store);
        std::fs::remove_dir_all(dir.join("index"))
            .map_err(|e| format!("deleting the index directory failed: {e}"))?;
    }

    let store = open_store(dir)?;
    let report = store.open_report().clone();
    if !report.log.quarantined.is_empty() {
        return Err(format!("log recovery quarantined data: {report:?}"));
    }
    if rebuild {
        if !report.index.rebuilt || report.index.caught_up_events != store.next_seq() {
            return Err(format!(
                "after deleting the index, open did not rebuild it from all {} events: {report:?}",
                store.next_seq()
            ));
        }
        totals.deleted_index_rebuilds += 1;
        totals.caught_up_events += report.index.caught_up_events;
    } else {
        totals.count_open(
            "parent",
            report.log.truncated_tail_bytes,
            report.index.rebuilt,
            report.index.rebuild_reason.as_deref(),
            report.index.caught_up_events,
        );
    }
    if let Some(reason) = &report.index.rebuild_reason {
        // With Durability::Sync the index only ever sees synced events, which a SIGKILL
        // cannot take away: an index ahead of the log indexed events the log lost.
        if reason.contains("the log only") {
            return Err(format!("the index was ahead of the log: {report:?}"));
        }
    }

    let mut buf = Vec::new();
    let (mut rows, expected) = scan_log(&store, &mut buf)?;
    let n = rows.len() as u64;

    // Nothing that was there before is gone or changed.
    if rows.len() < known.records.len() {
        return Err(format!(
            "the log shrank from {} events (after the last cycle) to {}",
            known.records.len(),
            rows.len()
        ));
    }
    if let Some(seq) = (0..known.records.len()).find(|&s| rows[s] != known.records[s]) {
        return Err(format!(
            "seq {seq} held {:?} after the last cycle but now holds {:?}",
            known.records[seq], rows[seq]
        ));
    }
    check_appends(&rows)?;

    // Every acknowledged event is there, by the scan and by read_seq(), in this cycle and
    // all earlier ones.
    let new_acks = runs.iter().flat_map(|r| r.acks.iter().cloned());
    known.acked.extend(new_acks);
    for a in &known.acked {
        match rows.get(a.seq as usize) {
            Some(row) if row.desc == a.desc && row.version == a.version => {}
            found => {
                return Err(format!(
                    "acknowledged seq {} (version {} of {:?}) should hold {:?} but holds {found:?} (next_seq {n})",
                    a.seq, a.version, a.desc.aggregate, a.desc
                ))
            }
        }
        let stored = store
            .read_seq(a.seq)
            .map_err(|e| format!("read_seq({}) of an acknowledged event failed: {e}", a.seq))?;
        let e = stored
            .event()
            .map_err(|e| format!("read_seq({}) does not decode: {e}", a.seq))?;
        if e.seq != a.seq || e.version != a.version {
            return Err(format!(
                "read_seq({}) gave seq {} version {}, acknowledged as version {} of {:?}",
                a.seq, e.seq, e.version, a.version, a.desc.aggregate
            ));
        }
        let row = &rows[a.seq as usize];
        if crc32fast::hash(e.payload) != row.crc {
            // Find out what differs.
            a.desc
                .check_event(&e, &mut buf)
                .map_err(|m| format!("read_seq({}) of an acknowledged event: {m}", a.seq))?;
            return Err(format!(
                "read_seq({}) returned other payload bytes than the scan found at that seq",
                a.seq
            ));
        }
        a.desc
            .check_event_head(&e)
            .map_err(|m| format!("read_seq({}) of an acknowledged event: {m}", a.seq))?;
    }
    let acked_now: u64 = runs.iter().map(|r| r.acks.len() as u64).sum();
    totals.acked_events += acked_now;
    for r in runs {
        totals.acked_appends += r.acks.iter().filter(|a| a.desc.index == 0).count() as u64;
        // An append's ack lines are printed together, in order.
        let batches: HashSet<(u32, u64)> = r
            .acks
            .windows(2)
            .filter(|w| {
                let (a, b) = (&w[0].desc, &w[1].desc);
                (a.thread, a.counter) == (b.thread, b.counter) && a.aggregate != b.aggregate
            })
            .map(|w| (w[0].desc.thread, w[0].desc.counter))
            .collect();
        totals.acked_batches += batches.len() as u64;
    }
    totals.unacked_present +=
        (rows.len() - known.records.len()).saturating_sub(acked_now as usize) as u64;

    check_aggregates(&store, &expected, rng)?;
    check_types(&store, &expected, rng)?;
    let stats = store.stats().map_err(|e| format!("stats() failed: {e}"))?;
    let types_used = expected.types.iter().filter(|t| !t.is_empty()).count() as u64;
    if stats.event_count != n
        || stats.head_seq != n.checked_sub(1)
        || stats.aggregate_count != expected.aggregates.len() as u64
        || stats.type_count != types_used
    {
        return Err(format!(
            "stats() are {stats:?}, but the log holds {n} events of {} aggregates and {types_used} types",
            expected.aggregates.len()
        ));
    }
    if let Some(before) = dump_before {
        let after = store
            .index_dump()
            .map_err(|e| format!("index_dump() failed: {e}"))?;
        if after != before {
            let mut diffs = Vec::new();
            for (tree, entries) in &before {
                let other = after.get(tree).map_or(&[][..], Vec::as_slice);
                if entries.as_slice() != other {
                    diffs.push(format!(
                        "{tree}: {} entries caught up, {} rebuilt",
                        entries.len(),
                        other.len()
                    ));
                }
            }
            return Err(format!(
                "the index rebuilt from the log differs from the one caught up after the kill: {}",
                diffs.join("; ")
            ));
        }
    }

    // Appends resume where the log ends, at the aggregate's next version.
    let aggregate = format!("agg-{}", cycle % SHARED_AGGREGATES);
    let version = expected
        .aggregates
        .get(&aggregate)
        .map_or(0, |h| h.len() as u64);
    let d = Desc {
        run: PARENT_RUN,
        thread: 0,
        counter: cycle,
        index: 0,
        count: 1,
        aggregate: aggregate.clone(),
        ty: (cycle % TYPES.len() as u64) as u8,
        flags: (cycle % 8) as u8,
        pad: (cycle % 300) as u32,
    };
    let appended = store
        .append(
            &aggregate,
            ExpectedVersion::Exact(version),
            &[d.new_event()],
        )
        .map_err(|e| format!("the parent's append after recovery failed: {e}"))?;
    if (appended.first_seq, appended.last_seq, appended.last_version) != (n, n, version + 1) {
        return Err(format!(
            "the parent's append to {aggregate:?} at version {version} returned {appended:?}, expected seq {n}, version {}",
            version + 1
        ));
    }
    let back = store
        .read_seq(n)
        .map_err(|e| format!("reading back the parent's event at {n}: {e}"))?;
    let e = back
        .event()
        .map_err(|e| format!("the parent's event at {n} does not decode: {e}"))?;
    d.check_event(&e, &mut buf)
        .map_err(|m| format!("the parent's event at {n} reads back wrong: {m}"))?;
    let latest = read_aggregate_seqs(&store, &aggregate, u64::MAX, Direction::Backward, 1)?;
    if latest != [(n, version + 1)] {
        return Err(format!(
            "after the parent's append, the latest event of {aggregate:?} is {latest:?}, expected seq {n} version {}",
            version + 1
        ));
    }
    rows.push(Row {
        crc: crc32fast::hash(&d.payload()),
        desc: d,
        version: version + 1,
    });

    totals.events_in_log = rows.len() as u64;
    totals.aggregates = expected.aggregates.len() as u64;
    totals.longest_history = expected
        .aggregates
        .values()
        .map(|h| h.len() as u64)
        .max()
        .unwrap_or(0);
    totals.segments = stats.segment_count;
    drop(store);
    known.records = rows;
    Ok(())
}

fn choose_kill(rng: &mut Rng, last: bool) -> KillAt {
    if rng.chance(if last { 10 } else { 40 }) {
        // In startup or log recovery.
        KillAt::AfterSpawn(Duration::from_micros(rng.range(0, 3_000)))
    } else if rng.chance(10) {
        // Often in index catch-up, once the log is large.
        KillAt::AfterSpawn(Duration::from_micros(rng.range(3_000, 40_000)))
    } else {
        KillAt::AfterOpen(Duration::from_millis(rng.range(5, 150)))
    }
}

fn main() {
    if let Ok(dir) = std::env::var(ENV_CHILD_DIR) {
        child_main(&dir);
    }
    let Some(kill_harness::Run {
        started,
        seed,
        cycles,
    }) = kill_harness::begin(TEST_NAME, CYCLES_DEFAULT)
    else {
        return;
    };
    let exe = std::env::current_exe().expect("current_exe");
    let tmp = tempfile::tempdir().expect("creating a temp dir");
    let dir = tmp.path().to_path_buf();
    println!(
        "{TEST_NAME}: seed {seed} (set {ENV_SEED}={seed} to repeat), {cycles} cycles ({ENV_CYCLES}), store in {}",
        dir.display()
    );

    let mut rng = Rng::new(seed);
    let mut known = Known::default();
    let mut totals = Totals::default();
    let mut next_run = 0u32;
    for cycle in 0..cycles {
        // Usually one child per cycle; sometimes two or three in a row with no clean open
        // in between, so a child starts on a torn tail and a stale index, and may die in
        // recovery or catch-up.
        let children = if rng.chance(25) { rng.range(2, 3) } else { 1 };
        let mut runs = Vec::new();
        let mut failure = None;
        for k in 0..children {
            let kill_at = choose_kill(&mut rng, k + 1 == children);
            let run = next_run;
            next_run += 1;
            match spawn_and_kill(&exe, &dir, run, rng.next(), kill_at) {
                Ok(r) => {
                    totals.child_runs += 1;
                    totals.conflicts += r.conflicts;
                    totals.retries_recognized += r.retries_recognized;
                    match &r.opened {
                        None => totals.killed_before_open += 1,
                        Some(o) => totals.count_open(
                            "child",
                            o.truncated_tail_bytes,
                            o.index_rebuilt,
                            o.rebuild_reason.as_deref(),
                            o.caught_up_events,
                        ),
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
                let r = check_and_resume(&dir, cycle, &runs, &mut known, &mut totals, &mut rng);
                totals.check_time += t0.elapsed();
                r
            }
        };
        if let Err(msg) = result {
            let kept = tmp.keep();
            eprintln!();
            eprintln!(
                "{TEST_NAME}: FAILED at cycle {cycle} of {cycles}, seed {seed} (rerun with {ENV_SEED}={seed})"
            );
            eprintln!("{TEST_NAME}: {msg}");
            for r in &runs {
                eprintln!(
                    "{TEST_NAME}:   child run {} killed {:?}: opened {:?}, {} acks{}, status {}{}",
                    r.run,
                    r.kill_at,
                    r.opened,
                    r.acks.len(),
                    r.acks
                        .iter()
                        .map(|a| a.seq)
                        .max()
                        .map(|s| format!(" (last acked seq {s})"))
                        .unwrap_or_default(),
                    r.status,
                    if r.stderr.is_empty() {
                        String::new()
                    } else {
                        format!(", stderr:\n{}", r.stderr)
                    }
                );
            }
            eprintln!("{TEST_NAME}: store directory kept at {}", kept.display());
            println!("test {TEST_NAME} ... FAILED");
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
        "{TEST_NAME}: {} cycles, {} child processes SIGKILLed ({} before they had the store open)",
        t.cycles, t.child_runs, t.killed_before_open
    );
    println!(
        "{TEST_NAME}: {} acknowledged events ({} appends, {} multi-aggregate batches) all recovered; {} unacknowledged events also present",
        t.acked_events, t.acked_appends, t.acked_batches, t.unacked_present
    );
    println!(
        "{TEST_NAME}: {} version conflicts retried, {} repeated appends recognized as retries",
        t.conflicts, t.retries_recognized
    );
    println!(
        "{TEST_NAME}: {} events of {} aggregates (longest {} versions) in {} segments at the end",
        t.events_in_log, t.aggregates, t.longest_history, t.segments
    );
    println!(
        "{TEST_NAME}: reopens cut a torn log tail {} times ({} bytes); the index caught up {} events; rebuilt {} times after its directory was deleted",
        t.truncations, t.truncated_bytes, t.caught_up_events, t.deleted_index_rebuilds
    );
    for (reason, n) in &t.index_rebuilds {
        println!("{TEST_NAME}:   {n} x index rebuilt at reopen because: {reason}");
    }
    println!(
        "{TEST_NAME}: {:.2}s spent reopening and checking the store",
        t.check_time.as_secs_f64()
    );
    println!("test {TEST_NAME} ... ok");
    println!();
    println!(
        "test result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in {:.2}s",
        started.elapsed().as_secs_f64()
    );
    println!();
}
