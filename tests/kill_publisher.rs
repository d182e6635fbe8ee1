//! Crash test of the publisher with real processes and real `SIGKILL`s.
//!
//! The store holds events of four kinds (the event type says which), and the handler's
//! answer depends only on the kind and the attempt number:
//!
//! | kind             | share | normal delivery                                   |
//! |------------------|-------|---------------------------------------------------|
//! | `ok`             | ~91 % | `Ok` at attempt 1                                 |
//! | `fail-twice`     | ~5 %  | `Retryable` at attempts 1, 2; `Ok` at 3 (retried)  |
//! | `fail-always`    | ~2 %  | `Retryable` at attempts 1..=4: dead-lettered      |
//! | `fail-permanent` | ~2 %  | `Permanent` at attempt 1: dead-lettered at once   |
//!
//! A redrive (attempt 5 of a `fail-always`, attempt 2 of a `fail-permanent`) succeeds.
//!
//! The test binary runs in two modes:
//!
//! - **Child** (`EVENTLOG_KILL_PUB_CHILD=<dir>` set): opens the store in `<dir>/store` and
//!   the publisher, and subscribes `sub` (4 attempts, retry delays 2..20 ms, checkpoint
//!   every [`CHECKPOINT_EVERY`] events, checkpoint interval given by the parent, 4 KiB
//!   dead-letter segments). For each delivery attempt the handler appends one line,
//!   `ok|fail <seq> <attempt> <event type>`, to `<dir>/handled-<run>.log` and
//!   `fdatasync`s it *before* it returns. It prints `stored <checkpoint>` (before it
//!   subscribes) and `subscribed <checkpoint> <position>`.
//!   Then, by `EVENTLOG_KILL_PUB_MODE`:
//!   - `kill`: a second thread appends a few events of random kinds every few ms (so
//!     events are also delivered live), until the parent `SIGKILL`s the process;
//!   - `drain`: waits until every stored event is handled, stops the subscription
//!     (which saves the checkpoint), prints `drained <position> <checkpoint>`, exits 0;
//!   - `idle`: the subscription is caught up, and its worker redrives the dead letters
//!     marked offline when idle; waits until none is marked, stops, prints
//!     `idle-left <marked> <live dead letters>`, exits 0 (`idle-forever`: waits to be
//!     killed);
//!   - `redrive`: redrives all dead letters, prints `redrive <delivered> <failed>`, stops,
//!     prints `left <live dead letters>`, exits 0 (`redrive-forever`: waits to be killed
//!     after the redrive).
//! - **Parent** (default): appends [`INITIAL_EVENTS`] events, then for
//!   `EVENTLOG_KILL_CYCLES` cycles (default 30) appends some more, runs a `kill` child and
//!   `SIGKILL`s it: 0..5 ms after spawning it (while it opens the store, the publisher,
//!   the dead letters), 5..200 ms after, or — following the child's lines file — right
//!   after the handler wrote the last failure of a parking event (so the kill lands while
//!   the dead letter is written, or just after), a failure that will be retried (in the
//!   backoff), or the `checkpoint_every_events`-th handled event (while the checkpoint is
//!   saved). Most children have a checkpoint interval longer than they live, some
//!   5..30 ms. After each kill the parent opens the store and the publisher *without*
//!   running the subscription (the stored checkpoint from `stored_subscriptions`, the dead
//!   letters from `open_dead_letters`) and checks:
//!   - the store still holds every event seen before, unchanged;
//!   - the child started at the checkpoint the parent saw last; the checkpoint `C` never
//!     decreases and never passes an unhandled event: every `ok`/`fail-twice` event below
//!     `C` has an `ok` line, every `fail-always`/`fail-permanent` event below `C` has a
//!     dead letter, and `C` is not beyond what this child handled;
//!   - the child's lines are exactly the handler scripts of seqs `C_prev, C_prev+1, ..` in
//!     order, each script complete before the next seq starts (the last one may be cut by
//!     the kill): delivery is in seq order, starts at the checkpoint, skips nothing, and
//!     retries with attempt numbers 1, 2, 3, ..; every parking script that was followed by
//!     a further delivery has its dead letter, written by this child, and this child wrote
//!     no other dead letter;
//!   - dead letters are intact: ids unique and increasing, every earlier one still there
//!     unchanged, each naming a parking event with its aggregate, version, type, attempt
//!     count (4 or 1) and last error; nothing evicted;
//!   - re-delivery stays within the documented window: every handled seq (an `ok` line or
//!     a dead letter) at or above `C` is below `C + checkpoint_every_events`, and the next
//!     child delivers again at most `checkpoint_every_events` events that were handled
//!     before it started (it has to: those are above the checkpoint). A dead letter for
//!     a seq that already has one is accepted only as part of such a re-delivery (see
//!     [`DUPLICATE_DEAD_LETTERS_ALLOWED`]).
//!
//!   After half of the cycles, and after the last, a `drain` child runs to completion: the
//!   checkpoint must reach the head and every event be handled (checked as above). So the
//!   first half of the cycles mostly catches up on stored events, the second half mostly
//!   follows the head, delivering live events.
//!
//!   Then the parent marks about half of the dead letters for redrive offline
//!   (`DeadLetters::request_redrive`), and [`REDRIVE_KILLS`] `idle-forever` children are
//!   killed at random moments while their worker redrives the marked ones, and an `idle`
//!   child finishes; then [`REDRIVE_KILLS`] `redrive-forever` children (`Redrive::All`) are
//!   killed and a last `redrive` one runs to completion. After each: the store and the checkpoint are
//!   unchanged, the child's lines are one successful redrive attempt (`attempts + 1`) per
//!   candidate dead letter in id order, the candidates resolved are a prefix of those
//!   (at most the last delivery unresolved), and every other dead letter is unchanged;
//!   at the end the unmarked ones remain after the idle phase, none is left after the
//!   last redrive, and every parked event was redriven.
//!
//! Environment: `EVENTLOG_KILL_CYCLES` (default 30), `EVENTLOG_KILL_SEED` (default: from
//! the clock; always printed so a failing run can be repeated with the same choices —
//! the kill timing itself is not reproducible).

#[path = "kill_harness/mod.rs"]
mod kill_harness;
use kill_harness::{env_u64, Rng, ENV_CYCLES, ENV_SEED};

use eventlog::publisher::{
    DeadLetter, DeadLetterOptions, HandlerError, Publisher, Redrive, RetryPolicy,
    SubscriptionOptions,
};
use eventlog::store::{EventRef, ExpectedVersion, NewEvent, Options, Store};
use std::collections::{BTreeMap, BTreeSet};
use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

const ENV_CHILD_DIR: &str = "EVENTLOG_KILL_PUB_CHILD";
const ENV_CHILD_RUN: &str = "EVENTLOG_KILL_PUB_RUN";
const ENV_CHILD_MODE: &str = "EVENTLOG_KILL_PUB_MODE";
const ENV_CHILD_SEED: &str = "EVENTLOG_KILL_PUB_SEED";
const ENV_CHILD_INTERVAL: &str = "EVENTLOG_KILL_PUB_INTERVAL_MS";

const TEST_NAME: &str = "kill_publisher";
const SUB: &str = "sub";
const CYCLES_DEFAULT: u64 = 30;
/// Redrive children killed at random moments before the last one runs to completion.
const REDRIVE_KILLS: u64 = 5;
const INITIAL_EVENTS: u64 = 1_000;
const ATTEMPTS_MAX: u32 = 4;
const CHECKPOINT_EVERY: u64 = 50;
/// The checkpoint interval of most runs: longer than any child lives, so only the count
/// bound saves checkpoints. Some runs get a short one instead.
const CHECKPOINT_INTERVAL_LONG_MS: u64 = 10_000;
const DEAD_LETTER_SEGMENT_BYTES: u64 = 4 << 10;
/// How long a child that is not killed may take.
const CHILD_TIMEOUT: Duration = Duration::from_secs(120);
const SIGKILL: i32 = 9;
/// Whether an event parked, then delivered again after a crash (it was above the stored
/// checkpoint) may be parked a second time, leaving two dead letters with the same seq.
/// The publisher skips events that already have a live dead letter, so this is `false`:
/// one dead letter per event.
const DUPLICATE_DEAD_LETTERS_ALLOWED: bool = false;

/// What the handler does with an event: its event type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Ok,
    FailTwice,
    FailAlways,
    FailPermanent,
}

impl Kind {
    fn type_name(self) -> &'static str {
        match self {
            Kind::Ok => "ok",
            Kind::FailTwice => "fail-twice",
            Kind::FailAlways => "fail-always",
            Kind::FailPermanent => "fail-permanent",
        }
    }

    fn from_type(t: &str) -> Option<Kind> {
        [
            Kind::Ok,
            Kind::FailTwice,
            Kind::FailAlways,
            Kind::FailPermanent,
        ]
        .into_iter()
        .find(|k| k.type_name() == t)
    }

    fn pick(rng: &mut Rng) -> Kind {
        match rng.below(100) {
            0..=1 => Kind::FailAlways,
            2..=3 => Kind::FailPermanent,
            4..=8 => Kind::FailTwice,
            _ => Kind::Ok,
        }
    }

    /// Whether the handler returns `Ok` at this attempt (redrives included).
    fn succeeds(self, attempt: u32) -> bool {
        match self {
            Kind::Ok => true,
            Kind::FailTwice => attempt >= 3,
            Kind::FailAlways => attempt > ATTEMPTS_MAX,
            Kind::FailPermanent => attempt >= 2,
        }
    }

    /// Whether a normal delivery ends in the dead letters.
    fn parks(self) -> bool {
        matches!(self, Kind::FailAlways | Kind::FailPermanent)
    }

    /// The attempt a normal delivery ends with.
    fn last_attempt(self) -> u32 {
        match self {
            Kind::Ok | Kind::FailPermanent => 1,
            Kind::FailTwice => 3,
            Kind::FailAlways => ATTEMPTS_MAX,
        }
    }

    fn error_text(self, seq: u64, attempt: u32) -> String {
        format!("{}: seq {seq} attempt {attempt}", self.type_name())
    }

    fn error(self, seq: u64, attempt: u32) -> HandlerError {
        let text = self.error_text(seq, attempt);
        if self == Kind::FailPermanent {
            HandlerError::Permanent(text)
        } else {
            HandlerError::Retryable(text)
        }
    }
}

fn new_event(kind: Kind, agg: &str, tag: &str) -> NewEvent {
    NewEvent::binary(
        kind.type_name(),
        format!("{}|{agg}|{tag}", kind.type_name()).into_bytes(),
    )
}

fn dead_letter_options() -> DeadLetterOptions {
    DeadLetterOptions {
        entries_max: 1_000_000,
        size_bytes_max: 1 << 30,
        segment_size_bytes: DEAD_LETTER_SEGMENT_BYTES,
    }
}

fn subscription_options(interval_ms: u64) -> SubscriptionOptions {
    let mut o = SubscriptionOptions::default();
    o.retry = RetryPolicy {
        attempts_max: ATTEMPTS_MAX,
        retry_delay_ms_min: 2,
        retry_delay_ms_max: 20,
        jitter: true,
    };
    o.checkpoint_every_events = CHECKPOINT_EVERY;
    o.checkpoint_interval_ms = interval_ms;
    o.dead_letters = dead_letter_options();
    o
}

fn lines_path(root: &Path, run: u32) -> std::path::PathBuf {
    root.join(format!("handled-{run}.log"))
}

// ---------------------------------------------------------------------------------------
// Child
// ---------------------------------------------------------------------------------------

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
        std::process::exit(4);
    }
}

fn die(code: i32, msg: &str) -> ! {
    eprintln!("{msg}");
    std::process::exit(code);
}

fn child_main(dir: &str) -> ! {
    let root = Path::new(dir);
    let run = env_u64(ENV_CHILD_RUN).expect("child needs its run") as u32;
    let seed = env_u64(ENV_CHILD_SEED).expect("child needs a seed");
    let interval_ms = env_u64(ENV_CHILD_INTERVAL).expect("child needs an interval");
    let mode = std::env::var(ENV_CHILD_MODE).expect("child needs a mode");
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(lines_path(root, run))
        .unwrap_or_else(|e| die(2, &format!("child run {run}: opening its lines file: {e}")));
    let store = Store::open(&root.join("store"), Options::default())
        .unwrap_or_else(|e| die(2, &format!("child run {run}: opening the store: {e}")));
    let publisher = Publisher::open(&store)
        .unwrap_or_else(|e| die(2, &format!("child run {run}: opening the publisher: {e}")));
    let handler = move |e: &EventRef<'_>, attempt: u32| -> Result<(), HandlerError> {
        let Some(kind) = Kind::from_type(e.event_type) else {
            die(
                6,
                &format!("child run {run}: seq {} has type {:?}", e.seq, e.event_type),
            );
        };
        let ok = kind.succeeds(attempt);
        let line = format!(
            "{} {} {attempt} {}\n",
            if ok { "ok" } else { "fail" },
            e.seq,
            e.event_type
        );
        // One write, then fdatasync: the line is durable before the handler returns.
        if let Err(err) = file
            .write_all(line.as_bytes())
            .and_then(|()| file.sync_data())
        {
            die(
                5,
                &format!("child run {run}: writing a handled line: {err}"),
            );
        }
        if ok {
            Ok(())
        } else {
            Err(kind.error(e.seq, attempt))
        }
    };
    let stored = publisher
        .stored_subscriptions()
        .unwrap_or_else(|e| die(2, &format!("child run {run}: stored_subscriptions: {e}")));
    say(&format!(
        "stored {}",
        stored
            .iter()
            .find(|s| s.name == SUB)
            .map_or_else(|| "-".to_string(), |s| s.checkpoint.to_string())
    ));
    let sub = publisher
        .subscribe(SUB, subscription_options(interval_ms), handler)
        .unwrap_or_else(|e| die(2, &format!("child run {run}: subscribing: {e}")));
    let stats = sub.stats();
    say(&format!(
        "subscribed {} {}",
        stats.checkpoint, stats.position
    ));
    match mode.as_str() {
        "kill" => {
            let mut rng = Rng::new(seed);
            let agg = format!("live-{run}");
            for counter in 0u64.. {
                std::thread::sleep(Duration::from_micros(rng.range(2_000, 15_000)));
                let events: Vec<NewEvent> = (0..rng.range(1, 3))
                    .map(|i| new_event(Kind::pick(&mut rng), &agg, &format!("{counter}.{i}")))
                    .collect();
                if let Err(e) = store.append(&agg, ExpectedVersion::Any, &events) {
                    die(3, &format!("child run {run}: live append failed: {e}"));
                }
            }
            unreachable!()
        }
        "drain" => {
            let head = store.next_seq();
            if head > 0 && !sub.wait_until_handled(head - 1, CHILD_TIMEOUT) {
                die(
                    7,
                    &format!(
                        "child run {run}: not all of {head} events handled in time: {:?}",
                        sub.stats()
                    ),
                );
            }
            if let Err(e) = sub.stop(Duration::from_secs(30)) {
                die(8, &format!("child run {run}: stop failed: {e}"));
            }
            let stats = sub.stats();
            say(&format!("drained {} {}", stats.position, stats.checkpoint));
        }
        "idle-forever" => loop {
            std::thread::sleep(Duration::from_secs(1));
        },
        "idle" => {
            // The worker redrives the marked dead letters when it is idle.
            let deadline = Instant::now() + CHILD_TIMEOUT;
            while sub
                .dead_letters()
                .unwrap()
                .iter()
                .any(|d| d.redrive_requested)
            {
                if Instant::now() > deadline {
                    die(
                        7,
                        &format!(
                            "child run {run}: requested redrives not done in time: {:?}",
                            sub.dead_letters()
                        ),
                    );
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            // Listed before the stop: stopping releases the dead letters.
            let left = sub.dead_letters().unwrap();
            if let Err(e) = sub.stop(Duration::from_secs(30)) {
                die(8, &format!("child run {run}: stop failed: {e}"));
            }
            say(&format!(
                "idle-left {} {}",
                left.iter().filter(|d| d.redrive_requested).count(),
                left.len()
            ));
        }
        "redrive" | "redrive-forever" => {
            let report = sub
                .redrive(Redrive::All)
                .unwrap_or_else(|e| die(9, &format!("child run {run}: redrive failed: {e}")));
            if mode == "redrive-forever" {
                loop {
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
            say(&format!(
                "redrive {} {}",
                report.delivered.len(),
                report.failed.len()
            ));
            // Listed before the stop: stopping releases the dead letters.
            let left = sub.dead_letters().unwrap().len();
            if let Err(e) = sub.stop(Duration::from_secs(30)) {
                die(8, &format!("child run {run}: stop failed: {e}"));
            }
            say(&format!("left {left}"));
        }
        other => die(2, &format!("child run {run}: unknown mode {other:?}")),
    }
    drop(sub);
    drop(publisher);
    drop(store);
    std::process::exit(0);
}

// ---------------------------------------------------------------------------------------
// Parent
// ---------------------------------------------------------------------------------------

/// What one child process did.
struct ChildRun {
    run: u32,
    mode: &'static str,
    interval_ms: u64,
    /// How it was to be killed, if at all, and when it was.
    kill: Option<String>,
    /// For a kill on a line: what for, and whether such a line came.
    targeted: Option<(&'static str, bool)>,
    status: ExitStatus,
    /// Complete stdout lines.
    said: Vec<String>,
    stderr: String,
}

impl ChildRun {
    fn describe(&self) -> String {
        format!(
            "child run {} ({} mode, checkpoint interval {} ms{}): status {}, said {:?}{}",
            self.run,
            self.mode,
            self.interval_ms,
            self.kill
                .as_deref()
                .map(|k| format!(", {k}"))
                .unwrap_or_default(),
            self.status,
            self.said,
            if self.stderr.is_empty() {
                String::new()
            } else {
                format!(", stderr:\n{}", self.stderr)
            }
        )
    }

    /// The numbers after `word` in the first line starting with it.
    fn said_numbers(&self, word: &str) -> Option<Vec<u64>> {
        self.said.iter().find_map(|l| {
            let rest = l.strip_prefix(word)?.strip_prefix(' ')?;
            rest.split(' ').map(|w| w.parse().ok()).collect()
        })
    }
}

/// When the parent kills a child.
enum KillPlan<'a> {
    /// It runs to completion.
    Never,
    /// This long after it was spawned.
    After(Duration),
    /// `delay` after its handler wrote the `skip + 1`-th line `matches` accepts (the
    /// parent polls the lines file), or `fallback` after spawning if none came by then.
    OnLine {
        what: &'static str,
        matches: &'a mut dyn FnMut(&Line) -> bool,
        skip: u64,
        delay: Duration,
        fallback: Duration,
    },
}

/// Follows a child's lines file while it runs.
struct Tail {
    path: std::path::PathBuf,
    file: Option<std::fs::File>,
    buf: Vec<u8>,
}

impl Tail {
    /// The complete lines written since the last call.
    fn poll(&mut self) -> Vec<Line> {
        if self.file.is_none() {
            self.file = std::fs::File::open(&self.path).ok();
        }
        let Some(f) = self.file.as_mut() else {
            return Vec::new();
        };
        let _ = f.read_to_end(&mut self.buf);
        let Some(end) = self.buf.iter().rposition(|&b| b == b'\n') else {
            return Vec::new();
        };
        let complete: Vec<u8> = self.buf.drain(..=end).collect();
        String::from_utf8_lossy(&complete)
            .lines()
            .filter_map(parse_line)
            .collect()
    }
}

fn run_child(
    exe: &Path,
    root: &Path,
    run: u32,
    mode: &'static str,
    seed: u64,
    interval_ms: u64,
    kill: KillPlan<'_>,
) -> Result<ChildRun, String> {
    let spawned = Instant::now();
    let mut child = Command::new(exe)
        .env(ENV_CHILD_DIR, root)
        .env(ENV_CHILD_RUN, run.to_string())
        .env(ENV_CHILD_MODE, mode)
        .env(ENV_CHILD_SEED, seed.to_string())
        .env(ENV_CHILD_INTERVAL, interval_ms.to_string())
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
    let mut kill_note = None;
    let mut targeted = None;
    let kill_at = match kill {
        KillPlan::Never => None,
        KillPlan::After(after) => {
            std::thread::sleep(after);
            kill_note = Some(format!("killed {after:?} after spawning"));
            Some(())
        }
        KillPlan::OnLine {
            what,
            matches,
            mut skip,
            delay,
            fallback,
        } => {
            let mut tail = Tail {
                path: lines_path(root, run),
                file: None,
                buf: Vec::new(),
            };
            let deadline = spawned + fallback;
            let mut seen = None;
            while seen.is_none() && Instant::now() < deadline {
                seen = tail.poll().into_iter().find(|l| {
                    if !matches(l) {
                        return false;
                    }
                    if skip == 0 {
                        return true;
                    }
                    skip -= 1;
                    false
                });
                if seen.is_none() {
                    std::thread::sleep(Duration::from_micros(100));
                }
            }
            targeted = Some((what, seen.is_some()));
            if let Some(l) = seen {
                std::thread::sleep(delay);
                kill_note = Some(format!(
                    "killed {delay:?} after the parent saw {l:?} ({what})"
                ));
            } else {
                kill_note = Some(format!(
                    "killed {fallback:?} after spawning: no line for {what} came"
                ));
            }
            Some(())
        }
    };
    let status = match kill_at {
        Some(()) => {
            // SIGKILL. A child that already exited is a zombie until waited for.
            child
                .kill()
                .map_err(|e| format!("killing child run {run}: {e}"))?;
            child
                .wait()
                .map_err(|e| format!("waiting for child run {run}: {e}"))?
        }
        None => {
            let deadline = Instant::now() + CHILD_TIMEOUT;
            loop {
                match child.try_wait() {
                    Ok(Some(status)) => break status,
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Ok(None) => {
                        let _ = child.kill();
                        let _ = child.wait();
                        return Err(format!(
                            "child run {run} ({mode} mode) did not finish within {CHILD_TIMEOUT:?}"
                        ));
                    }
                    Err(e) => return Err(format!("waiting for child run {run}: {e}")),
                }
            }
        }
    };
    let out = out_reader.join().expect("stdout reader panicked");
    let stderr =
        String::from_utf8_lossy(&err_reader.join().expect("stderr reader panicked")).into_owned();
    let complete = match out.iter().rposition(|&b| b == b'\n') {
        Some(i) => &out[..=i],
        None => &[][..],
    };
    let said = String::from_utf8_lossy(complete)
        .lines()
        .map(str::to_string)
        .collect();
    Ok(ChildRun {
        run,
        mode,
        interval_ms,
        kill: kill_note,
        targeted,
        status,
        said,
        stderr,
    })
}

/// One handler call, from a child's lines file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Line {
    ok: bool,
    seq: u64,
    attempt: u32,
    /// The event's kind as the handler saw it.
    kind: Kind,
}

fn parse_line(l: &str) -> Option<Line> {
    let mut w = l.split(' ');
    let ok = match w.next()? {
        "ok" => true,
        "fail" => false,
        _ => return None,
    };
    let seq = w.next()?.parse().ok()?;
    let attempt = w.next()?.parse().ok()?;
    let kind = Kind::from_type(w.next()?)?;
    if w.next().is_some() {
        return None;
    }
    Some(Line {
        ok,
        seq,
        attempt,
        kind,
    })
}

/// Reads a child's lines; a last line without its newline (cut by the kill while the
/// handler was writing it, so before the handler returned) is ignored and reported.
fn read_lines(root: &Path, run: u32) -> Result<(Vec<Line>, bool), String> {
    let bytes = match std::fs::read(lines_path(root, run)) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(format!("reading the lines of child run {run}: {e}")),
    };
    let cut = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let torn = cut < bytes.len();
    let text = std::str::from_utf8(&bytes[..cut])
        .map_err(|e| format!("lines of child run {run} are not UTF-8: {e}"))?;
    let mut lines = Vec::new();
    for (i, l) in text.lines().enumerate() {
        let line =
            parse_line(l).ok_or_else(|| format!("child run {run} line {i} is malformed: {l:?}"))?;
        lines.push(line);
    }
    Ok((lines, torn))
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Ev {
    agg: String,
    version: u64,
    kind: Kind,
}

/// Everything the parent knows between cycles.
#[derive(Default)]
struct State {
    /// Every event of the store, by seq.
    events: Vec<Ev>,
    /// The durable checkpoint at the last check (`None`: none stored yet).
    checkpoint: Option<u64>,
    /// `ok` lines of normal deliveries, per seq, over all runs.
    ok_lines: Vec<u32>,
    /// Dead letters ever written, per seq.
    parked: Vec<u32>,
    /// Handled: an `ok` line or a dead letter, per seq.
    handled: Vec<bool>,
    /// Successful redrive deliveries, per seq.
    redriven: Vec<u32>,
    /// Dead letters redriven successfully (at least once).
    redriven_ids: BTreeSet<u64>,
    /// The live dead letters at the last check, by id.
    dead_letters: BTreeMap<u64, DeadLetter>,
    /// Tags of events the parent appended.
    appended: u64,
    /// The store's head after the parent's last appends.
    head: u64,
}

impl State {
    fn checkpoint(&self) -> u64 {
        self.checkpoint.unwrap_or(0)
    }
}

#[derive(Default)]
struct Totals {
    cycles: u64,
    kill_children: u64,
    killed_before_subscribed: u64,
    torn_lines: u64,
    ok_lines: u64,
    fail_lines: u64,
    /// Kills whose last line was a failed attempt that was to be retried.
    killed_in_retry: u64,
    /// Kills whose last line was the last failed attempt of a parking event, before its
    /// dead letter was written / after.
    killed_before_park: u64,
    killed_after_park: u64,
    /// Kills that left at least one handled event above the stored checkpoint.
    killed_with_unsaved: u64,
    /// Events handled before a child started that it delivered again.
    redelivered: u64,
    redelivered_max: u64,
    /// Most handled events above the stored checkpoint after a kill.
    unsaved_max: u64,
    checkpoint_advances: u64,
    short_interval_runs: u64,
    parent_appended: u64,
    child_appended: u64,
    dead_letters_written: u64,
    /// Seqs with more than one dead letter (parked again after a re-delivery).
    dead_letter_seq_duplicates: u64,
    redrive_runs: u64,
    redrive_lines: u64,
    redrive_repeats: u64,
    check_time: Duration,
    /// Kills on a line, by what for: (the line came, it did not).
    targeted: BTreeMap<&'static str, (u64, u64)>,
    /// Kills that left exactly checkpoint_every_events handled events above the checkpoint.
    unsaved_at_bound: u64,
    /// Wall time of the kill cycles, the drain, the redrives.
    phase_time: [Duration; 3],
    /// The checkpoint and the head before the drain.
    before_drain: (u64, u64),
    /// Dead letters marked for redrive offline.
    redrive_requested: u64,
    /// Kill-mode children within 5 events of the head when they died.
    caught_up_runs: u64,
    halfway_drain: Duration,
}

/// The store, the publisher and the dead letters as a stopped subscription leaves them.
struct Snapshot {
    n: u64,
    checkpoint: Option<u64>,
    dead_letters: BTreeMap<u64, DeadLetter>,
}

/// Opens the store (reading every event into `state.events`, checking nothing seen
/// before changed) and the publisher; returns what it found, then `after` runs with the
/// store still open (to append), and everything is closed again.
fn snapshot(
    root: &Path,
    state: &mut State,
    after: impl FnOnce(&Store, &mut State) -> Result<(), String>,
) -> Result<Snapshot, String> {
    let store = Store::open(&root.join("store"), Options::default())
        .map_err(|e| format!("opening the store failed: {e}"))?;
    let n = store.next_seq();
    let mut events = Vec::with_capacity(n as usize);
    for (i, item) in store.read_all(0, usize::MAX).enumerate() {
        let stored = item.map_err(|e| format!("read_all(0) failed at item {i}: {e}"))?;
        let e = stored
            .event()
            .map_err(|e| format!("event at seq {} cannot be decoded: {e}", stored.seq()))?;
        if e.seq != i as u64 {
            return Err(format!("read_all(0) item {i} has seq {}", e.seq));
        }
        let kind = Kind::from_type(e.event_type)
            .ok_or_else(|| format!("seq {i} has type {:?}", e.event_type))?;
        let prefix = format!("{}|{}|", e.event_type, e.aggregate_id);
        if !e.payload.starts_with(prefix.as_bytes()) {
            return Err(format!(
                "seq {i} ({} of {}) has payload {:?}",
                e.event_type,
                e.aggregate_id,
                String::from_utf8_lossy(e.payload)
            ));
        }
        events.push(Ev {
            agg: e.aggregate_id.to_string(),
            version: e.version,
            kind,
        });
    }
    if events.len() as u64 != n {
        return Err(format!(
            "read_all(0) yielded {} events but next_seq() is {n}",
            events.len()
        ));
    }
    if events.len() < state.events.len() {
        return Err(format!(
            "the store shrank from {} events to {}",
            state.events.len(),
            events.len()
        ));
    }
    if let Some(s) = (0..state.events.len()).find(|&s| events[s] != state.events[s]) {
        return Err(format!(
            "seq {s} was {:?} but is now {:?}",
            state.events[s], events[s]
        ));
    }
    state.events = events;
    let len = state.events.len();
    state.ok_lines.resize(len, 0);
    state.parked.resize(len, 0);
    state.handled.resize(len, false);
    state.redriven.resize(len, 0);

    let publisher =
        Publisher::open(&store).map_err(|e| format!("opening the publisher failed: {e}"))?;
    let stored = publisher
        .stored_subscriptions()
        .map_err(|e| format!("stored_subscriptions failed: {e}"))?;
    if let Some(other) = stored.iter().find(|s| s.name != SUB) {
        return Err(format!(
            "a subscription nobody created is stored: {other:?}"
        ));
    }
    let checkpoint = stored.first().map(|s| s.checkpoint);
    if let Some(s) = stored.first() {
        if s.dead_letters_evicted != 0 {
            return Err(format!("dead letters were evicted: {s:?}"));
        }
    }
    let dead_letters = {
        let dl = publisher
            .open_dead_letters(SUB, dead_letter_options())
            .map_err(|e| format!("opening the dead letters failed: {e}"))?;
        if dl.evicted() != 0 {
            return Err(format!("{} dead letters were evicted", dl.evicted()));
        }
        let list = dl.list();
        if dl.len() != list.len() as u64 {
            return Err(format!(
                "dead letters: len() {} but list() has {}",
                dl.len(),
                list.len()
            ));
        }
        let mut map = BTreeMap::new();
        for d in list {
            if let Some(old) = map.insert(d.id, d) {
                return Err(format!("dead letter id {} is listed twice", old.id));
            }
        }
        if !map.keys().eq(dl.list().iter().map(|d| &d.id)) {
            return Err("dead letters are not listed oldest (lowest id) first".into());
        }
        map
    };
    drop(publisher);
    after(&store, state)?;
    store
        .log()
        .sync()
        .map_err(|e| format!("syncing the store failed: {e}"))?;
    drop(store);
    Ok(Snapshot {
        n,
        checkpoint,
        dead_letters,
    })
}

/// Marks dead letters `ids` for redrive offline, and checks exactly those are marked.
fn request_redrives(root: &Path, ids: &[u64], state: &mut State) -> Result<(), String> {
    {
        let store = Store::open(&root.join("store"), Options::default())
            .map_err(|e| format!("opening the store failed: {e}"))?;
        let publisher =
            Publisher::open(&store).map_err(|e| format!("opening the publisher failed: {e}"))?;
        let mut dl = publisher
            .open_dead_letters(SUB, dead_letter_options())
            .map_err(|e| format!("opening the dead letters failed: {e}"))?;
        let marked = dl
            .request_redrive(ids)
            .map_err(|e| format!("request_redrive failed: {e}"))?;
        if marked != ids {
            return Err(format!("request_redrive({ids:?}) marked {marked:?}"));
        }
    }
    let snap = snapshot(root, state, |_, _| Ok(()))?;
    let wanted: BTreeSet<u64> = ids.iter().copied().collect();
    for (id, d) in &snap.dead_letters {
        let mut before = state.dead_letters.get(id).cloned().ok_or_else(|| {
            format!("dead letter {id} appeared when redrives were requested: {d:?}")
        })?;
        before.redrive_requested = wanted.contains(id);
        if *d != before {
            return Err(format!(
                "dead letter {id} should be {before:?} after the redrive request, but is {d:?}"
            ));
        }
    }
    if snap.dead_letters.len() != state.dead_letters.len() {
        return Err(format!(
            "{} dead letters after the redrive request, {} before",
            snap.dead_letters.len(),
            state.dead_letters.len()
        ));
    }
    state.dead_letters = snap.dead_letters;
    Ok(())
}

/// A dead letter must name a parking event exactly as the subscription saw it.
fn check_dead_letter(d: &DeadLetter, events: &[Ev]) -> Result<(), String> {
    let ev = events
        .get(d.seq as usize)
        .ok_or_else(|| format!("dead letter {d:?} names a seq past the store's head"))?;
    if !ev.kind.parks() {
        return Err(format!(
            "dead letter {} is for seq {}, a {:?} event that is never parked: {d:?}",
            d.id, d.seq, ev.kind
        ));
    }
    let attempts = ev.kind.last_attempt();
    let ok = d.aggregate_id == ev.agg
        && d.version == ev.version
        && d.event_type == ev.kind.type_name()
        && d.attempts == attempts
        && d.last_error == ev.kind.error_text(d.seq, attempts)
        && d.first_failure_us > 0
        && d.last_failure_us > 0;
    if !ok {
        return Err(format!(
            "dead letter {} is not intact: {d:?}; the event at seq {} is {ev:?}, expected {attempts} attempts and error {:?}",
            d.id,
            d.seq,
            ev.kind.error_text(d.seq, attempts)
        ));
    }
    Ok(())
}

/// Checks after a `kill` or `drain` child: see the module docs.
fn check_delivery_run(
    root: &Path,
    child: &ChildRun,
    rng: &mut Rng,
    append: u64,
    state: &mut State,
    totals: &mut Totals,
) -> Result<(), String> {
    let run = child.run;
    let (lines, torn) = read_lines(root, run)?;
    totals.torn_lines += u64::from(torn);
    let expected_n = state.head;
    let snap = snapshot(root, state, |store, state| {
        // The parent's appends for the next cycle.
        let mut left = append;
        while left > 0 {
            let k = rng.range(1, 20).min(left);
            let agg = format!("agg-{}", rng.below(40));
            let events: Vec<NewEvent> = (0..k)
                .map(|_| {
                    state.appended += 1;
                    new_event(Kind::pick(rng), &agg, &format!("p{}", state.appended))
                })
                .collect();
            store
                .append(&agg, ExpectedVersion::Any, &events)
                .map_err(|e| format!("the parent's append failed: {e}"))?;
            left -= k;
        }
        state.head = store.next_seq();
        Ok(())
    })?;
    totals.parent_appended += append;
    let n = snap.n;
    if n < expected_n {
        return Err(format!(
            "the store has {n} events, but the parent's appends had brought it to {expected_n}"
        ));
    }
    totals.child_appended += n - expected_n;
    let events = &state.events;
    let c_prev = state.checkpoint();

    // The child started where the parent saw the checkpoint.
    let stored_line = child.said.iter().find(|l| l.starts_with("stored "));
    let expected_line = format!(
        "stored {}",
        state
            .checkpoint
            .map_or_else(|| "-".to_string(), |c| c.to_string())
    );
    if stored_line.is_some_and(|l| *l != expected_line) {
        return Err(format!(
            "child run {run} found the checkpoint {stored_line:?}, but the parent saw {expected_line:?}"
        ));
    }
    match child.said_numbers("subscribed") {
        // The worker may have moved on by the time the child asks.
        Some(v) if v.len() == 2 => {
            if v[0] < c_prev || v[1] < v[0] {
                return Err(format!(
                    "child run {run} started at checkpoint {} position {}, but the stored checkpoint was {c_prev}",
                    v[0], v[1]
                ));
            }
        }
        Some(v) => return Err(format!("child run {run} said subscribed {v:?}")),
        // Killed before it said so (its worker may have started delivering already).
        None => totals.killed_before_subscribed += 1,
    }
    if stored_line.is_none() && !lines.is_empty() {
        return Err(format!(
            "child run {run} handled events before it looked at the stored checkpoint"
        ));
    }

    // The checkpoint.
    let c = match (snap.checkpoint, state.checkpoint) {
        (Some(c), _) => c,
        (None, None) => 0,
        (None, Some(old)) => {
            return Err(format!(
                "the stored checkpoint (was {old}) is gone after the kill"
            ))
        }
    };
    if c < c_prev {
        return Err(format!("the checkpoint went back from {c_prev} to {c}"));
    }
    if c > n {
        return Err(format!("the checkpoint {c} is past the head {n}"));
    }

    // Dead letters: every earlier one still there unchanged, new ones after them.
    for (id, d) in &state.dead_letters {
        match snap.dead_letters.get(id) {
            Some(now) if now == d => {}
            Some(now) => {
                return Err(format!(
                    "dead letter {id} changed from {d:?} to {now:?} without a redrive"
                ))
            }
            None => return Err(format!("dead letter {id} is lost: {d:?}")),
        }
    }
    let old_max = state.dead_letters.keys().next_back().copied();
    let new_dead: Vec<&DeadLetter> = snap
        .dead_letters
        .values()
        .filter(|d| !state.dead_letters.contains_key(&d.id))
        .collect();
    if let (Some(first), Some(old_max)) = (new_dead.first(), old_max) {
        if first.id <= old_max {
            return Err(format!(
                "new dead letter {} has an id not after the earlier ones (up to {old_max})",
                first.id
            ));
        }
    }
    for d in snap.dead_letters.values() {
        check_dead_letter(d, events)?;
    }

    // The child's lines: the handler scripts of c_prev, c_prev + 1, .. in order, except
    // that an event already parked before this child started is not delivered again (it
    // keeps its one dead letter; redrive delivers it).
    let parked_before: BTreeSet<u64> = state.dead_letters.values().map(|d| d.seq).collect();
    let skip_parked = |mut seq: u64| {
        while parked_before.contains(&seq) {
            seq += 1;
        }
        seq
    };
    let mut expect_seq = skip_parked(c_prev);
    let mut expect_attempt = 1;
    let mut redelivered = BTreeSet::new();
    let mut ok_seqs = Vec::new();
    // Parking scripts completed, and whether a further delivery followed each.
    let mut parks: Vec<(u64, bool)> = Vec::new();
    // 1 + the last seq this run handled (a parking one only if its dead letter is there).
    let mut frontier = c_prev;
    for (i, l) in lines.iter().enumerate() {
        if l.seq != expect_seq || l.attempt != expect_attempt {
            return Err(format!(
                "child run {run} line {i}: delivered seq {} attempt {}, expected seq {expect_seq} attempt {expect_attempt} (delivery starts at the checkpoint {c_prev} and goes in seq order, each event until handled)",
                l.seq, l.attempt
            ));
        }
        let Some(ev) = events.get(l.seq as usize) else {
            return Err(format!(
                "child run {run} line {i}: delivered seq {}, but the store has {n} events",
                l.seq
            ));
        };
        if l.kind != ev.kind || l.ok != ev.kind.succeeds(l.attempt) {
            return Err(format!(
                "child run {run} line {i}: {l:?} is not what the handler answers for {ev:?}"
            ));
        }
        if state.handled[l.seq as usize] {
            redelivered.insert(l.seq);
        }
        if let Some(last) = parks.last_mut() {
            last.1 = true;
        }
        if l.ok {
            totals.ok_lines += 1;
            ok_seqs.push(l.seq);
            frontier = l.seq + 1;
            expect_seq = skip_parked(expect_seq + 1);
            expect_attempt = 1;
        } else {
            totals.fail_lines += 1;
            if l.attempt == ev.kind.last_attempt() {
                parks.push((l.seq, false));
                expect_seq = skip_parked(expect_seq + 1);
                expect_attempt = 1;
            } else {
                expect_attempt += 1;
            }
        }
    }
    // The parking scripts and the new dead letters: the same seqs in the same order; only
    // the last script's dead letter may be missing, if nothing was delivered after it.
    let new_seqs: Vec<u64> = new_dead.iter().map(|d| d.seq).collect();
    let park_seqs: Vec<u64> = parks.iter().map(|p| p.0).collect();
    let last_unparked = match parks.last() {
        Some(&(seq, false)) if new_seqs.len() + 1 == park_seqs.len() => Some(seq),
        _ => None,
    };
    if new_seqs[..] != park_seqs[..park_seqs.len() - usize::from(last_unparked.is_some())] {
        return Err(format!(
            "child run {run} completed the parking scripts of seqs {park_seqs:?} (the last followed by a further delivery: {}) but wrote dead letters for seqs {new_seqs:?}",
            parks.last().is_some_and(|p| p.1)
        ));
    }
    for &seq in &new_seqs {
        frontier = frontier.max(seq + 1);
    }
    if child.kill.is_some() {
        match lines.last() {
            Some(l) if !l.ok => {
                let kind = events[l.seq as usize].kind;
                if l.attempt < kind.last_attempt() {
                    totals.killed_in_retry += 1;
                } else if last_unparked.is_some() {
                    totals.killed_before_park += 1;
                } else {
                    totals.killed_after_park += 1;
                }
            }
            _ => {}
        }
    } else {
        if let Some(seq) = last_unparked {
            return Err(format!(
                "child run {run} stopped cleanly, but seq {seq} has no dead letter after its last failed attempt"
            ));
        }
        if expect_attempt != 1 {
            return Err(format!(
                "child run {run} stopped cleanly in the middle of seq {expect_seq}'s retries"
            ));
        }
    }

    if child.kill.is_some() && expect_seq + 5 >= n {
        totals.caught_up_runs += 1;
    }

    // Re-delivery: only events handled above the last stored checkpoint, at most
    // checkpoint_every_events of them.
    if let Some(&s) = redelivered
        .iter()
        .find(|&&s| s >= c_prev + CHECKPOINT_EVERY)
    {
        return Err(format!(
            "child run {run} delivered seq {s} again, which was handled before, but it is not within {CHECKPOINT_EVERY} events of the checkpoint {c_prev}"
        ));
    }
    if redelivered.len() as u64 > CHECKPOINT_EVERY {
        return Err(format!(
            "child run {run} delivered {} handled events again, more than checkpoint_every_events = {CHECKPOINT_EVERY}",
            redelivered.len()
        ));
    }
    totals.redelivered += redelivered.len() as u64;
    totals.redelivered_max = totals.redelivered_max.max(redelivered.len() as u64);

    // Record what was handled.
    for &s in &ok_seqs {
        state.ok_lines[s as usize] += 1;
        state.handled[s as usize] = true;
    }
    for d in &new_dead {
        let s = d.seq as usize;
        state.parked[s] += 1;
        state.handled[s] = true;
        if state.parked[s] == 2 {
            totals.dead_letter_seq_duplicates += 1;
            if !DUPLICATE_DEAD_LETTERS_ALLOWED {
                let all: Vec<&DeadLetter> = snap
                    .dead_letters
                    .values()
                    .filter(|e| e.seq == d.seq)
                    .collect();
                return Err(format!(
                    "seq {s} was parked again by child run {run} (it started at checkpoint {c_prev}, the seq was parked before): dead letters {all:?}"
                ));
            }
        }
    }
    totals.dead_letters_written += new_dead.len() as u64;

    // The checkpoint never passes an unhandled event ...
    if c > frontier.max(c_prev) {
        return Err(format!(
            "the checkpoint {c} is ahead of what child run {run} handled (up to seq {frontier} exclusive; it started at {c_prev})"
        ));
    }
    let parked_seqs: BTreeSet<u64> = snap.dead_letters.values().map(|d| d.seq).collect();
    for s in c_prev..c {
        let ev = &events[s as usize];
        let handled = if ev.kind.parks() {
            parked_seqs.contains(&s)
        } else {
            state.ok_lines[s as usize] > 0
        };
        if !handled {
            return Err(format!(
                "the checkpoint moved from {c_prev} to {c}, past seq {s} ({ev:?}), which {}",
                if ev.kind.parks() {
                    "has no dead letter"
                } else {
                    "was never handled (no ok line)"
                }
            ));
        }
    }
    // ... and stays within checkpoint_every_events of everything handled.
    let unsaved: Vec<u64> = (c..n).filter(|&s| state.handled[s as usize]).collect();
    if let Some(&s) = unsaved.iter().find(|&&s| s >= c + CHECKPOINT_EVERY) {
        return Err(format!(
            "seq {s} was handled but the stored checkpoint is {c}: more than checkpoint_every_events = {CHECKPOINT_EVERY} behind"
        ));
    }
    totals.unsaved_max = totals.unsaved_max.max(unsaved.len() as u64);
    totals.unsaved_at_bound += u64::from(unsaved.len() as u64 == CHECKPOINT_EVERY);
    totals.killed_with_unsaved += u64::from(!unsaved.is_empty());
    totals.checkpoint_advances += u64::from(c > c_prev);
    state.checkpoint = snap.checkpoint;
    state.dead_letters = snap.dead_letters;
    Ok(())
}

/// Checks after a `redrive` child: see the module docs.
fn check_redrive_run(
    root: &Path,
    child: &ChildRun,
    requested_only: bool,
    state: &mut State,
    totals: &mut Totals,
) -> Result<(), String> {
    let run = child.run;
    let (lines, torn) = read_lines(root, run)?;
    totals.torn_lines += u64::from(torn);
    let n = state.events.len() as u64;
    let snap = snapshot(root, state, |_, _| Ok(()))?;
    if snap.n != n {
        return Err(format!(
            "the store has {} events after a redrive, had {n}",
            snap.n
        ));
    }
    if snap.checkpoint != Some(n) {
        return Err(format!(
            "the checkpoint is {:?} after a redrive, was {n}",
            snap.checkpoint
        ));
    }
    // The lines: one successful attempt per live dead letter (marked for redrive, if
    // `requested_only`), oldest first.
    let all: Vec<&DeadLetter> = state.dead_letters.values().collect();
    let live: Vec<&DeadLetter> = all
        .iter()
        .copied()
        .filter(|d| !requested_only || d.redrive_requested)
        .collect();
    if lines.len() > live.len() {
        return Err(format!(
            "child run {run} made {} redrive deliveries for {} dead letters",
            lines.len(),
            live.len()
        ));
    }
    for (i, (l, d)) in lines.iter().zip(&live).enumerate() {
        let expected = Line {
            ok: true,
            seq: d.seq,
            attempt: d.attempts + 1,
            kind: state.events[d.seq as usize].kind,
        };
        if *l != expected {
            return Err(format!(
                "child run {run} line {i}: {l:?}, but the redrive of dead letter {d:?} should deliver {expected:?}"
            ));
        }
        state.redriven[d.seq as usize] += 1;
        if !state.redriven_ids.insert(d.id) {
            totals.redrive_repeats += 1;
        }
    }
    totals.redrive_lines += lines.len() as u64;
    // Resolved: the first j of them, j = lines or lines - 1; the rest unchanged.
    let resolved = live
        .iter()
        .take_while(|d| !snap.dead_letters.contains_key(&d.id))
        .count();
    if resolved > lines.len() || resolved + 1 < lines.len() {
        return Err(format!(
            "child run {run} redelivered {} dead letters, but the first {resolved} are resolved",
            lines.len()
        ));
    }
    let resolved_ids: BTreeSet<u64> = live[..resolved].iter().map(|d| d.id).collect();
    for d in all.iter().filter(|d| !resolved_ids.contains(&d.id)) {
        if snap.dead_letters.get(&d.id) != Some(d) {
            return Err(format!(
                "dead letter {} was {d:?} before the redrive and is {:?} after (child run {run} redelivered {} of {}, the first {resolved} resolved)",
                d.id,
                snap.dead_letters.get(&d.id),
                lines.len(),
                live.len()
            ));
        }
    }
    if snap.dead_letters.len() != all.len() - resolved {
        return Err(format!(
            "{} dead letters after the redrive, expected {}",
            snap.dead_letters.len(),
            all.len() - resolved
        ));
    }
    state.dead_letters = snap.dead_letters;
    totals.redrive_runs += 1;
    Ok(())
}

/// Runs a `drain` child to completion and checks that every event up to the head was
/// handled and the checkpoint is at the head.
fn drain(
    exe: &Path,
    root: &Path,
    run: &mut u32,
    what: &str,
    rng: &mut Rng,
    state: &mut State,
    totals: &mut Totals,
) -> Result<(), (String, Option<Box<ChildRun>>)> {
    let child = run_child(
        exe,
        root,
        *run,
        "drain",
        rng.next(),
        CHECKPOINT_INTERVAL_LONG_MS,
        KillPlan::Never,
    )
    .map_err(|e| (format!("{what}: {e}"), None))?;
    *run += 1;
    if !child.status.success() {
        return Err((format!("{what}: the child failed"), Some(Box::new(child))));
    }
    let n = state.head;
    if let Err(e) = check_delivery_run(root, &child, rng, 0, state, totals) {
        return Err((format!("{what}: {e}"), Some(Box::new(child))));
    }
    let n_after = state.events.len() as u64;
    if n_after != n {
        return Err((
            format!("{what}: the store grew from {n} to {n_after} events"),
            Some(Box::new(child)),
        ));
    }
    if child.said_numbers("drained") != Some(vec![n, n]) || state.checkpoint != Some(n) {
        return Err((
            format!(
                "{what}: the subscription should be at the head {n} with its checkpoint there; the stored checkpoint is {:?}",
                state.checkpoint
            ),
            Some(Box::new(child)),
        ));
    }
    let parked: BTreeSet<u64> = state.dead_letters.values().map(|d| d.seq).collect();
    for (s, ev) in state.events.iter().enumerate() {
        let handled = if ev.kind.parks() {
            parked.contains(&(s as u64))
        } else {
            state.ok_lines[s] > 0
        };
        if !handled {
            return Err((
                format!("{what}: seq {s} ({ev:?}) was never handled"),
                Some(Box::new(child)),
            ));
        }
    }

    Ok(())
}

/// The whole test; on failure, the message and the child it was about.
fn run_test(
    exe: &Path,
    root: &Path,
    cycles: u64,
    rng: &mut Rng,
    state: &mut State,
    totals: &mut Totals,
) -> Result<(), (String, Option<Box<ChildRun>>)> {
    // The initial events.
    snapshot(root, state, |store, state| {
        let mut left = INITIAL_EVENTS;
        while left > 0 {
            let k = rng.range(1, 20).min(left);
            let agg = format!("agg-{}", rng.below(40));
            let events: Vec<NewEvent> = (0..k)
                .map(|_| {
                    state.appended += 1;
                    new_event(Kind::pick(rng), &agg, &format!("p{}", state.appended))
                })
                .collect();
            store
                .append(&agg, ExpectedVersion::Any, &events)
                .map_err(|e| format!("the parent's append failed: {e}"))?;
            left -= k;
        }
        state.head = store.next_seq();
        Ok(())
    })
    .map_err(|e| (format!("setup: {e}"), None))?;
    totals.parent_appended += INITIAL_EVENTS;

    let mut run = 0u32;
    let mut t0 = Instant::now();
    let phase = |what: String| move |e: String| (format!("{what}: {e}"), None);
    for cycle in 0..cycles {
        let interval_ms = if rng.chance(30) {
            totals.short_interval_runs += 1;
            rng.range(5, 30)
        } else {
            CHECKPOINT_INTERVAL_LONG_MS
        };
        let child_seed = rng.next();
        let c_prev = state.checkpoint();
        // Kill right after the handler's last failure of a parking event (so the kill
        // lands while the dead letter is written, or just after), after a failure that is
        // to be retried (in the backoff), or after a checkpoint_every_events-th handled
        // event (while the checkpoint is saved); not always at the first such line, so the
        // child gets work done and the checkpoint moves on.
        let mut parking = |l: &Line| !l.ok && l.kind.parks() && l.attempt == l.kind.last_attempt();
        let mut retrying = |l: &Line| !l.ok && l.attempt < l.kind.last_attempt();
        let mut saving = |l: &Line| {
            l.ok && l
                .seq
                .checked_sub(c_prev)
                .is_some_and(|d| (d + 1).is_multiple_of(CHECKPOINT_EVERY))
        };
        let fallback = Duration::from_millis(rng.range(100, 400));
        let kill = match rng.below(100) {
            // While it starts: opening the store, the publisher, the dead letters.
            0..=9 => KillPlan::After(Duration::from_micros(rng.range(0, 5_000))),
            10..=49 => KillPlan::After(Duration::from_millis(rng.range(5, 200))),
            50..=66 => KillPlan::OnLine {
                what: "parking",
                matches: &mut parking,
                skip: rng.range(0, 5),
                delay: Duration::from_micros(rng.range(0, 300)),
                fallback,
            },
            67..=83 => KillPlan::OnLine {
                what: "retrying",
                matches: &mut retrying,
                skip: rng.range(0, 10),
                delay: Duration::from_micros(rng.range(0, 3_000)),
                fallback,
            },
            _ => KillPlan::OnLine {
                what: "saving the checkpoint",
                matches: &mut saving,
                skip: rng.range(0, 2),
                delay: Duration::from_micros(rng.range(0, 300)),
                fallback,
            },
        };
        let child = run_child(exe, root, run, "kill", child_seed, interval_ms, kill)
            .map_err(phase(format!("cycle {cycle}")))?;
        run += 1;
        totals.kill_children += 1;
        if let Some((what, came)) = child.targeted {
            let t = totals.targeted.entry(what).or_default();
            if came {
                t.0 += 1;
            } else {
                t.1 += 1;
            }
        }
        if child.status.signal() != Some(SIGKILL) {
            return Err((
                format!("cycle {cycle}: the child was not killed by SIGKILL but ended on its own"),
                Some(Box::new(child)),
            ));
        }
        // Fewer in the second half, so the subscription can keep up with the head.
        let append = rng.range(0, if cycle < cycles / 2 { 40 } else { 10 });
        let t0 = Instant::now();
        let r = check_delivery_run(root, &child, rng, append, state, totals);
        totals.check_time += t0.elapsed();
        if let Err(e) = r {
            return Err((format!("cycle {cycle}: {e}"), Some(Box::new(child))));
        }
        totals.cycles += 1;
        if cycle + 1 == cycles / 2 {
            // Halfway, catch up, so the second half runs at the head, on live events.
            let t1 = Instant::now();
            drain(exe, root, &mut run, "halfway drain", rng, state, totals)?;
            totals.halfway_drain = t1.elapsed();
        }
    }

    totals.phase_time[0] = t0.elapsed();
    totals.before_drain = (state.checkpoint(), state.head);
    t0 = Instant::now();
    drain(exe, root, &mut run, "drain", rng, state, totals)?;
    let parked: BTreeSet<u64> = state.dead_letters.values().map(|d| d.seq).collect();
    let parked_count = state.dead_letters.len() as u64;

    totals.phase_time[1] = t0.elapsed();
    t0 = Instant::now();

    // Offline redrive requests (as `eventlog deadletters redrive` makes them) for about
    // half of the dead letters; the subscription delivers them when idle. Killed a few
    // times, then to completion.
    let ids: Vec<u64> = state
        .dead_letters
        .keys()
        .copied()
        .filter(|_| rng.chance(50))
        .collect();
    request_redrives(root, &ids, state).map_err(phase("requesting redrives".into()))?;
    totals.redrive_requested = ids.len() as u64;
    for k in 0..=REDRIVE_KILLS {
        let last = k == REDRIVE_KILLS;
        let kill = if last {
            KillPlan::Never
        } else {
            // The worker looks at the requests once it has waited 100 ms for events.
            KillPlan::After(Duration::from_millis(rng.range(20, 250)))
        };
        let child = run_child(
            exe,
            root,
            run,
            if last { "idle" } else { "idle-forever" },
            rng.next(),
            CHECKPOINT_INTERVAL_LONG_MS,
            kill,
        )
        .map_err(phase(format!("requested redrive {k}")))?;
        run += 1;
        let status_ok = if last {
            child.status.success()
        } else {
            child.status.signal() == Some(SIGKILL)
        };
        if !status_ok {
            return Err((
                format!("requested redrive {k}: the child ended wrongly"),
                Some(Box::new(child)),
            ));
        }
        if let Err(e) = check_redrive_run(root, &child, true, state, totals) {
            return Err((format!("requested redrive {k}: {e}"), Some(Box::new(child))));
        }
        if last {
            let left = state.dead_letters.len() as u64;
            if child.said_numbers("idle-left") != Some(vec![0, left])
                || state.dead_letters.values().any(|d| d.redrive_requested)
                || left + ids.len() as u64 != parked_count
            {
                return Err((
                    format!(
                        "requested redrive {k}: all {} requested dead letters should be delivered, the other {} left; {left} are left",
                        ids.len(),
                        parked_count - ids.len() as u64
                    ),
                    Some(Box::new(child)),
                ));
            }
        }
    }

    // Redrive, killed a few times, then to completion.
    for k in 0..=REDRIVE_KILLS {
        let last = k == REDRIVE_KILLS;
        let kill = if last {
            KillPlan::Never
        } else {
            KillPlan::After(Duration::from_millis(rng.range(3, 60)))
        };
        let child = run_child(
            exe,
            root,
            run,
            if last { "redrive" } else { "redrive-forever" },
            rng.next(),
            CHECKPOINT_INTERVAL_LONG_MS,
            kill,
        )
        .map_err(phase(format!("redrive {k}")))?;
        run += 1;
        let live = state.dead_letters.len() as u64;
        let status_ok = if last {
            child.status.success()
        } else {
            child.status.signal() == Some(SIGKILL)
        };
        if !status_ok {
            return Err((
                format!("redrive {k}: the child ended wrongly"),
                Some(Box::new(child)),
            ));
        }
        if let Err(e) = check_redrive_run(root, &child, false, state, totals) {
            return Err((format!("redrive {k}: {e}"), Some(Box::new(child))));
        }
        if last {
            if child.said_numbers("redrive") != Some(vec![live, 0])
                || child.said_numbers("left") != Some(vec![0])
                || !state.dead_letters.is_empty()
            {
                return Err((
                    format!(
                        "redrive {k}: all {live} dead letters should have been delivered and none left; {} are left",
                        state.dead_letters.len()
                    ),
                    Some(Box::new(child)),
                ));
            }
            if let Some(s) = parked.iter().find(|&&s| state.redriven[s as usize] == 0) {
                return Err((
                    format!("redrive {k}: parked seq {s} was never redriven"),
                    Some(Box::new(child)),
                ));
            }
        }
    }
    totals.phase_time[2] = t0.elapsed();
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
    }) = kill_harness::begin(TEST_NAME, CYCLES_DEFAULT)
    else {
        return;
    };
    let exe = std::env::current_exe().expect("current_exe");
    let tmp = tempfile::tempdir().expect("creating a temp dir");
    let root = tmp.path().to_path_buf();
    println!(
        "{TEST_NAME}: seed {seed} (set {ENV_SEED}={seed} to repeat), {cycles} cycles ({ENV_CYCLES}), in {}",
        root.display()
    );
    let mut rng = Rng::new(seed);
    let mut state = State::default();
    let mut totals = Totals::default();
    if let Err((msg, child)) = run_test(&exe, &root, cycles, &mut rng, &mut state, &mut totals) {
        let kept = tmp.keep();
        eprintln!();
        eprintln!(
            "{TEST_NAME}: FAILED after {} of {cycles} kill cycles, seed {seed} (rerun with {ENV_SEED}={seed})",
            totals.cycles
        );
        eprintln!("{TEST_NAME}: {msg}");
        if let Some(child) = child {
            eprintln!("{TEST_NAME}:   {}", child.describe());
        }
        eprintln!(
            "{TEST_NAME}: directory kept at {} (store in store/, each child's handler lines in handled-<run>.log)",
            kept.display()
        );
        println!("test {TEST_NAME} ... FAILED");
        println!();
        println!(
            "test result: FAILED. 0 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in {:.2}s",
            started.elapsed().as_secs_f64()
        );
        std::process::exit(101);
    }

    let t = &totals;
    println!(
        "{TEST_NAME}: {} cycles: {} children SIGKILLed ({} before they subscribed, {} with a short checkpoint interval, {} within 5 events of the head), then one drained, {} redrive runs ({} killed)",
        t.cycles, t.kill_children, t.killed_before_subscribed, t.short_interval_runs, t.caught_up_runs, t.redrive_runs, 2 * REDRIVE_KILLS
    );
    println!(
        "{TEST_NAME}: {} events ({} appended by the parent, {} live by children); {} ok and {} failed handler calls; {} torn lines",
        state.events.len(),
        t.parent_appended,
        t.child_appended,
        t.ok_lines,
        t.fail_lines,
        t.torn_lines
    );
    println!(
        "{TEST_NAME}: killed while retrying {} times, after a last failure before its dead letter {} times, after the dead letter {} times",
        t.killed_in_retry, t.killed_before_park, t.killed_after_park
    );
    let targeted: Vec<String> = t
        .targeted
        .iter()
        .map(|(what, (came, not))| format!("{came} {what} ({not} fell back to a timed kill)"))
        .collect();
    println!(
        "{TEST_NAME}: kills right after a handler line: {}",
        targeted.join(", ")
    );
    println!(
        "{TEST_NAME}: checkpoint advanced in {} runs; {} kills left handled events above it (at most {}, {} times exactly the bound {CHECKPOINT_EVERY}); {} handled events delivered again (at most {} per crash; bound {CHECKPOINT_EVERY})",
        t.checkpoint_advances, t.killed_with_unsaved, t.unsaved_max, t.unsaved_at_bound, t.redelivered, t.redelivered_max
    );
    println!(
        "{TEST_NAME}: {} dead letters written ({} seqs parked more than once, after a re-delivery); {} marked for redrive offline; {} redrive deliveries ({} repeated after a kill)",
        t.dead_letters_written, t.dead_letter_seq_duplicates, t.redrive_requested, t.redrive_lines, t.redrive_repeats
    );
    println!(
        "{TEST_NAME}: {:.2}s in kill cycles ({:.2}s of it reopening and checking, {:.2}s the halfway drain), {:.2}s draining (from checkpoint {} to head {}), {:.2}s redriving",
        t.phase_time[0].as_secs_f64(),
        t.check_time.as_secs_f64(),
        t.halfway_drain.as_secs_f64(),
        t.phase_time[1].as_secs_f64(),
        t.before_drain.0,
        t.before_drain.1,
        t.phase_time[2].as_secs_f64()
    );
    println!("test {TEST_NAME} ... ok");
    println!();
    println!(
        "test result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in {:.2}s",
        started.elapsed().as_secs_f64()
    );
    println!();
}
