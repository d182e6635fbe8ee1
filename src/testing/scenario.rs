//! The whole store on the simulated disk: the deterministic simulation behind
//! `tests/sim_store.rs` and the `store_ops` fuzz target. Not a stable API.
//!
//! One run opens a [`Store`] (log on a [`SimDisk`], sled in a real directory) and a
//! [`Publisher`] with one subscription whose handler is flaky, then takes steps picked by
//! a [`Choices`] source: appends by several logical clients to random aggregates with
//! random expected versions (single and multi-aggregate, retries of earlier appends with
//! the same event ids), reads checked against a model, live followers, injected faults
//! (failing fsyncs, a full disk, short writes, flipped bits, a power cut after a random
//! number of operations), redrives of dead letters, clean reopens, process crashes and
//! power losses with every [`CrashFault`]. At each crash the index is kept (stale) or
//! deleted (lost), at random.
//!
//! After every reopen it checks:
//! 1. every append acknowledged under `Durability::Sync` is present exactly once,
//!    byte-identical (ids, types, payloads, timestamps, metadata), at its seq and version;
//! 2. nothing is served that was never appended: records past the acknowledged ones must
//!    be whole appends that failed in doubt, in order; no read returns a corrupt record;
//! 3. each aggregate's versions are contiguous from 1, and the indexes (by aggregate, both
//!    directions, and by type) agree with the log;
//! 4. the subscription's stored checkpoint never passes an event its handler did not
//!    finish (handled, or parked in the dead letters, or counted as evicted); dead
//!    letters survive intact, naming real events; in the end every event is handled or
//!    parked;
//! 5. after an injected fsync failure the store refuses writes with a typed error until
//!    it is reopened, rather than losing data silently.
//!
//! Deterministic: the disk's faults come from the seed and the steps from the
//! [`Choices`]; the subscription's worker thread is always waited for between steps, so
//! every disk operation happens in the same order in every replay.

use crate::log::Durability;
use crate::publisher::{
    DeadLetterOptions, Handler, HandlerError, OnExhausted, Publisher, Redrive, RetryPolicy, Status,
    Subscription, SubscriptionOptions,
};
use crate::store::{
    AppendError, AppendRequest, Appended, ContentType, Direction, EventRef, ExpectedVersion,
    Filter, NewEvent, Options, ReadError, RecordedEvent, Store,
};
use crate::testing::{CrashFault, SimDisk, SimRng};
use parking_lot::Mutex;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

/// Where the simulated store lives on the simulated disk.
pub const SIM_STORE_DIR: &str = "/sim/store";
/// The subscription every run keeps.
pub const SIM_SUBSCRIPTION: &str = "sim-sub";
/// Aggregates the clients pick from.
const AGGREGATES: usize = 7;
/// Logical clients; each tags its events with its number.
const CLIENTS: u64 = 3;
const TYPES: [&str; 4] = ["Opened", "Deposited", "Withdrawn", "Noted"];
/// Largest payload an event of the simulation carries.
const SIM_PAYLOAD_SIZE_BYTES_MAX: usize = 600;
/// How long a step waits for the subscription to catch up before calling it stuck.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(20);
/// Attempts of the subscription's retry policy.
const ATTEMPTS_MAX: u32 = 3;
/// Lines of the step trace kept for a failure report.
const TRACE_LINES_MAX: usize = 400;

/// Where a run's decisions come from: a seeded generator, or a fuzzer's bytes.
pub trait Choices {
    /// A number in `0..n` (`n >= 1`).
    fn below(&mut self, n: u64) -> u64;
    /// True once the source has run dry (a fuzz input ended): the run then stops.
    fn is_exhausted(&self) -> bool {
        false
    }
}

impl Choices for SimRng {
    fn below(&mut self, n: u64) -> u64 {
        SimRng::below(self, n)
    }
}

/// Decisions read from a fuzzer's bytes: as many bytes per choice as `n` needs; zeros
/// once the input is used up (and [`Choices::is_exhausted`] says so).
#[derive(Debug)]
pub struct FuzzChoices<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> FuzzChoices<'a> {
    /// Choices from `data`.
    pub fn new(data: &'a [u8]) -> Self {
        FuzzChoices { data, pos: 0 }
    }
}

impl Choices for FuzzChoices<'_> {
    fn below(&mut self, n: u64) -> u64 {
        if n <= 1 {
            return 0;
        }
        let bytes = match n {
            0..=0x100 => 1,
            0x101..=0x1_0000 => 2,
            0x1_0001..=0x1_0000_0000 => 4,
            _ => 8,
        };
        let mut x: u64 = 0;
        for _ in 0..bytes {
            let b = self.data.get(self.pos).copied().unwrap_or(0);
            self.pos += 1;
            x = x << 8 | u64::from(b);
        }
        x % n
    }

    fn is_exhausted(&self) -> bool {
        self.pos >= self.data.len()
    }
}

/// How a run is set up.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Steps before the final checks.
    pub steps_max: usize,
    /// A real, empty directory for sled's databases; the caller removes it afterwards.
    pub sled_dir: PathBuf,
    /// Print each step to stderr as it happens (for replaying one seed).
    pub verbose: bool,
}

/// What a run did, summed over runs by the tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[allow(missing_docs)] // The field names say it.
pub struct SimStats {
    pub runs: u64,
    pub steps: u64,
    pub appends_acked: u64,
    pub events_acked: u64,
    pub appends_refused_expected_version: u64,
    pub retries_answered_idempotently: u64,
    pub appends_failed: u64,
    pub in_doubt_appends_found_stored: u64,
    pub writes_refused_after_fsync_failure: u64,
    pub power_losses: u64,
    pub process_crashes: u64,
    pub clean_reopens: u64,
    pub indexes_deleted: u64,
    pub faults_injected: u64,
    pub reads_checked: u64,
    pub read_errors_after_flips: u64,
    /// Opens after a crash run once with a bit flipped in one of recovery's reads.
    pub opens_with_a_flipped_read: u64,
    /// ... of which the open refused (damage, bad segment, reads that disagree).
    pub opens_refused_for_a_flipped_read: u64,
    pub follows_checked: u64,
    pub deliveries: u64,
    pub dead_letters_checked: u64,
    pub redrives: u64,
}

impl SimStats {
    /// Adds `other` into `self`.
    pub fn add(&mut self, other: &SimStats) {
        macro_rules! sum {
            ($($f:ident),*) => { $( self.$f += other.$f; )* };
        }
        sum!(
            runs,
            steps,
            appends_acked,
            events_acked,
            appends_refused_expected_version,
            retries_answered_idempotently,
            appends_failed,
            in_doubt_appends_found_stored,
            writes_refused_after_fsync_failure,
            power_losses,
            process_crashes,
            clean_reopens,
            indexes_deleted,
            faults_injected,
            reads_checked,
            read_errors_after_flips,
            opens_with_a_flipped_read,
            opens_refused_for_a_flipped_read,
            follows_checked,
            deliveries,
            dead_letters_checked,
            redrives
        );
    }
}

/// A run that broke an invariant (or panicked inside the library).
#[derive(Debug, Clone)]
pub struct SimFailure {
    /// What broke.
    pub message: String,
    /// The last steps, oldest first.
    pub trace: Vec<String>,
}

/// Runs one simulation. `seed` seeds the disk (its crash faults and flips); `choices`
/// picks the steps. See the module docs for what is checked.
///
/// # Errors
/// The first invariant that did not hold, with the trace of steps before it.
pub fn run(
    seed: u64,
    choices: &mut dyn Choices,
    config: &SimConfig,
) -> Result<SimStats, SimFailure> {
    let mut sim = Sim::new(seed, config);
    let result = sim.run(choices);
    sim.shut_down();
    match result {
        Ok(()) => {
            sim.stats.runs = 1;
            Ok(sim.stats)
        }
        Err(message) => Err(SimFailure {
            message,
            trace: sim.trace.into_iter().collect(),
        }),
    }
}

// ---------------------------------------------------------------------------------------
// The model

/// An event the model knows is stored.
#[derive(Debug, Clone, PartialEq)]
struct ModelEvent {
    aggregate: String,
    version: u64,
    event: NewEvent,
}

/// An append that failed in a way that leaves it in doubt: it may be stored.
#[derive(Debug, Clone)]
struct InDoubt {
    requests: Vec<(String, Vec<NewEvent>)>,
}

/// What the subscription's handler did, kept by "the application" (survives crashes).
#[derive(Debug, Default)]
struct HandlerLog {
    /// Seqs handled successfully, with the event id the handler saw.
    handled: BTreeMap<u64, Uuid>,
    /// The last seq delivered at attempt 1 in this incarnation: first deliveries come
    /// in seq order.
    last_first_attempt: Option<u64>,
    /// Problems seen inside the handler (reported by the next check).
    violations: Vec<String>,
    deliveries: u64,
}

#[derive(Debug)]
struct FlakyHandler {
    seed: u64,
    log: Arc<Mutex<HandlerLog>>,
}

/// What the handler does with an event, decided from the seed and its seq alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Behaviour {
    Ok,
    /// Fails with a retryable error on attempts below `until`.
    FailUntil(u32),
    /// A permanent error at the first attempt, fine afterwards (on redrive).
    PermanentOnce,
    /// Panics at the first attempt (a failed attempt), fine afterwards.
    PanicOnce,
    /// Never succeeds.
    Poison,
}

fn behaviour(seed: u64, seq: u64) -> Behaviour {
    let h = SimRng::new(seed ^ seq.wrapping_mul(0x9e37_79b9_7f4a_7c15)).next_u64() % 100;
    match h {
        0..=5 => Behaviour::FailUntil(2),
        6..=8 => Behaviour::FailUntil(ATTEMPTS_MAX + 1), // parked, then redrivable
        9..=10 => Behaviour::PermanentOnce,
        11 => Behaviour::PanicOnce,
        12 => Behaviour::Poison,
        _ => Behaviour::Ok,
    }
}

/// The message of the handler's deliberate panics, so that tests can keep them quiet.
pub const SIM_HANDLER_PANIC: &str = "simulated handler panic";

impl Handler for FlakyHandler {
    fn handle(&mut self, event: &EventRef<'_>, attempt: u32) -> Result<(), HandlerError> {
        {
            let mut log = self.log.lock();
            log.deliveries += 1;
            if attempt == 1 {
                if let Some(last) = log.last_first_attempt {
                    if event.seq <= last {
                        let v = format!(
                            "seq {} delivered (attempt 1) after seq {last}: out of order",
                            event.seq
                        );
                        log.violations.push(v);
                    }
                }
                log.last_first_attempt = Some(event.seq);
            }
        }
        let outcome = match behaviour(self.seed, event.seq) {
            Behaviour::Ok => Ok(()),
            Behaviour::FailUntil(n) if attempt < n => Err(HandlerError::Retryable(format!(
                "flaky at attempt {attempt}"
            ))),
            Behaviour::FailUntil(_) => Ok(()),
            Behaviour::PermanentOnce if attempt == 1 => {
                Err(HandlerError::Permanent("permanent".into()))
            }
            Behaviour::PermanentOnce => Ok(()),
            Behaviour::PanicOnce if attempt == 1 => std::panic::panic_any(SIM_HANDLER_PANIC),
            Behaviour::PanicOnce => Ok(()),
            Behaviour::Poison => Err(HandlerError::Retryable("poison".into())),
        };
        if outcome.is_ok() {
            let mut log = self.log.lock();
            let id = event.event_id;
            if let Some(old) = log.handled.insert(event.seq, id) {
                if old != id {
                    let v = format!(
                        "seq {} delivered as event {id}, earlier as {old}",
                        event.seq
                    );
                    log.violations.push(v);
                }
            }
        }
        outcome
    }
}

// ---------------------------------------------------------------------------------------
// The run

struct Open {
    store: Store,
    publisher: Publisher,
    subscription: Option<Subscription>,
}

struct Sim<'c> {
    seed: u64,
    config: &'c SimConfig,
    disk: Arc<SimDisk>,
    options: Options,
    sub_options: SubscriptionOptions,
    open: Option<Open>,
    /// Events known stored, by seq.
    events: Vec<ModelEvent>,
    versions: HashMap<String, u64>,
    /// Failed appends since the last certain point, oldest first.
    in_doubt: Vec<InDoubt>,
    /// Acknowledged appends, for retries: (aggregate, expected, events, result).
    acked: Vec<(String, ExpectedVersion, Vec<NewEvent>, Appended)>,
    handler_log: Arc<Mutex<HandlerLog>>,
    /// Dead letters lost to the bounds, as the publisher last reported.
    evicted_seen: u64,
    /// Injected fsync failures on the store's log files seen so far (since the reopen).
    log_fsync_failures_seen: usize,
    /// An fsync of the store's log failed: every write must fail until the next reopen.
    poisoned: bool,
    /// A bit flip was injected since the last reopen: read errors are expected.
    flips_injected: bool,
    /// The next reopen first opens once with a bit flipped in the read after this many.
    flip_on_next_open: Option<u64>,
    /// Other faults (full disk, short write, halt) injected since the last reopen.
    faults_since_open: bool,
    next_event: u64,
    started: std::time::Instant,
    stats: SimStats,
    trace: std::collections::VecDeque<String>,
}

fn is_validation_error(e: &AppendError) -> bool {
    matches!(
        e,
        AppendError::WrongExpectedVersion { .. }
            | AppendError::InvalidName { .. }
            | AppendError::PayloadTooLarge { .. }
            | AppendError::MetadataTooLarge { .. }
            | AppendError::BadEventCount { .. }
            | AppendError::DuplicateEventId { .. }
    )
}

impl<'c> Sim<'c> {
    fn new(seed: u64, config: &'c SimConfig) -> Self {
        let mut options = Options {
            sled_dir: Some(config.sled_dir.clone()),
            payload_size_bytes_max: SIM_PAYLOAD_SIZE_BYTES_MAX,
            events_per_append_max: 16,
            append_timeout_ms: 10_000,
            ..Options::default()
        };
        options.log.durability = Durability::Sync;
        options.log.segment_size_bytes = 96 << 10;
        options.log.preallocate_chunk_bytes = 16 << 10;
        options.log.group_commit_wait_us = 0;
        // Recovery points in the middle of segments, at seed-dependent places (written by
        // the appender here: simulated storage has no preallocation thread), so crashes
        // land before, during and after their writes.
        options.log.recovery_point_step_bytes = (4 + seed % 29) << 10;
        options.index.cache_bytes = 1 << 20;
        // Small and seed-dependent, so that index flushes interleave with appends and the
        // latest-version map drops its clean entries often (a miss must still find sled's).
        options.index.flush_events = 4 + (seed % 61) as usize;
        options.index.latest_cache_aggregates = 1 + (seed % 13) as usize;
        let sub_options = SubscriptionOptions {
            retry: RetryPolicy {
                attempts_max: ATTEMPTS_MAX,
                retry_delay_ms_min: 0,
                retry_delay_ms_max: 1,
                jitter: false,
            },
            on_exhausted: OnExhausted::DeadLetter,
            // Small bounds, so that eviction happens and is accounted for.
            dead_letters: DeadLetterOptions {
                entries_max: 6,
                size_bytes_max: 1 << 20,
                segment_size_bytes: 4 << 10,
            },
            checkpoint_every_events: 1 + seed % 7,
            checkpoint_interval_ms: 1_000,
            ..SubscriptionOptions::default()
        };
        Sim {
            seed,
            config,
            disk: SimDisk::new(seed),
            options,
            sub_options,
            open: None,
            events: Vec::new(),
            versions: HashMap::new(),
            in_doubt: Vec::new(),
            acked: Vec::new(),
            handler_log: Arc::new(Mutex::new(HandlerLog::default())),
            evicted_seen: 0,
            log_fsync_failures_seen: 0,
            poisoned: false,
            flips_injected: false,
            flip_on_next_open: None,
            faults_since_open: false,
            next_event: 0,
            started: std::time::Instant::now(),
            stats: SimStats::default(),
            trace: std::collections::VecDeque::new(),
        }
    }

    fn note(&mut self, line: String) {
        if self.config.verbose {
            let ms = self.started.elapsed().as_secs_f64() * 1e3;
            eprintln!("[sim {} {ms:8.1} ms] {line}", self.seed);
        }
        if self.trace.len() == TRACE_LINES_MAX {
            self.trace.pop_front();
        }
        self.trace.push_back(line);
    }

    fn run(&mut self, choices: &mut dyn Choices) -> Result<(), String> {
        self.reopen(true)?;
        // The directories existed, durably, before the application started.
        self.disk.sync_all_dirs();
        for step in 0..self.config.steps_max {
            if choices.is_exhausted() {
                break;
            }
            self.stats.steps += 1;
            self.step(step, choices)?;
            self.check_handler_log()?;
        }
        // The end: power comes back clean, everything is checked and caught up.
        self.note("final: clean crash and reopen".into());
        let (disk, _) = self.crash_with(CrashFault::KeepAll);
        self.disk = disk;
        self.reopen(false)?;
        self.catch_up_subscription()?;
        self.check_everything_delivered()
    }

    fn step(&mut self, step: usize, c: &mut dyn Choices) -> Result<(), String> {
        match c.below(100) {
            0..=44 => self.append(step, c, false),
            45..=51 => self.append(step, c, true),
            52..=56 => self.retry_acked(c),
            57..=59 => self.retry_in_doubt(c),
            60..=67 => self.check_reads(c),
            68..=70 => self.check_follow(c),
            71..=80 => self.inject_fault(c),
            81..=82 => self.redrive(),
            83..=85 if self.disk.is_halted() => {
                // The power is already out: this is a power loss, not a clean close.
                self.note("power loss after a halt".into());
                self.stats.power_losses += 1;
                let (disk, _) = self.crash_with(CrashFault::DropUnsynced);
                self.after_crash(disk, c)
            }
            83..=85 => {
                self.note("clean reopen".into());
                self.stats.clean_reopens += 1;
                self.close();
                self.reopen(false)
            }
            86..=89 => {
                self.note("process crash".into());
                self.stats.process_crashes += 1;
                let (disk, _) = self.crash_with(CrashFault::KeepAll);
                self.after_crash(disk, c)
            }
            _ => {
                let fault = CrashFault::ALL[c.below(CrashFault::ALL.len() as u64) as usize];
                self.note(format!("power loss: {fault:?}"));
                self.stats.power_losses += 1;
                let (disk, _) = self.crash_with(fault);
                self.after_crash(disk, c)
            }
        }?;
        self.wait_for_subscription()
    }

    fn store(&self) -> Result<&Store, String> {
        self.open
            .as_ref()
            .map(|o| &o.store)
            .ok_or_else(|| "no store open".to_string())
    }

    // --- appends ------------------------------------------------------------------------

    fn new_events(&mut self, c: &mut dyn Choices, client: u64, count: usize) -> Vec<NewEvent> {
        (0..count)
            .map(|_| {
                self.next_event += 1;
                let n = self.next_event;
                let event_type = TYPES[c.below(TYPES.len() as u64) as usize];
                let len = c.below(SIM_PAYLOAD_SIZE_BYTES_MAX as u64 + 1) as usize;
                let mut payload = vec![0u8; len];
                SimRng::new(self.seed ^ n << 20).fill(&mut payload);
                let id = Uuid::from_u64_pair(self.seed, n);
                let mut e = NewEvent::binary(event_type, payload)
                    .with_id(id)
                    .with_timestamp_us(1_700_000_000_000_000 + n as i64)
                    .with_correlation_id(format!("client-{client}"));
                if c.below(4) == 0 {
                    e.content_type = ContentType::Json;
                    e.payload = format!("{{\"n\":{n}}}").into_bytes();
                    e.metadata.extra.insert("k".into(), n.to_string());
                }
                e
            })
            .collect()
    }

    fn pick_expected(&self, c: &mut dyn Choices, aggregate: &str) -> ExpectedVersion {
        if !self.in_doubt.is_empty() {
            // The model cannot tell which version the store has until it reconciles.
            return ExpectedVersion::Any;
        }
        let current = self.versions.get(aggregate).copied().unwrap_or(0);
        match c.below(10) {
            0..=1 => ExpectedVersion::Any,
            2 => ExpectedVersion::NoStream,
            3 => ExpectedVersion::Exists,
            4 => ExpectedVersion::Exact(current.saturating_sub(1)),
            5 => ExpectedVersion::Exact(current + 1),
            _ => ExpectedVersion::Exact(current),
        }
    }

    fn append(&mut self, step: usize, c: &mut dyn Choices, multi: bool) -> Result<(), String> {
        let client = c.below(CLIENTS);
        let parts = if multi { 2 + c.below(2) as usize } else { 1 };
        let mut requests: Vec<(String, ExpectedVersion, Vec<NewEvent>)> = Vec::new();
        let mut room = self.options.events_per_append_max;
        for _ in 0..parts {
            let aggregate = format!("acct-{}", c.below(AGGREGATES as u64));
            if requests.iter().any(|r| r.0 == aggregate) {
                continue;
            }
            let expected = self.pick_expected(c, &aggregate);
            let count = if c.below(8) == 0 {
                1 + c.below(16) as usize
            } else {
                1 + c.below(3) as usize
            };
            let count = count.min(room);
            if count == 0 {
                break;
            }
            room -= count;
            let events = self.new_events(c, client, count);
            requests.push((aggregate, expected, events));
        }
        let desc: Vec<String> = requests
            .iter()
            .map(|(a, e, ev)| format!("{a} {e} x{}", ev.len()))
            .collect();
        let result = {
            let store = self.store()?;
            let reqs: Vec<AppendRequest<'_>> = requests
                .iter()
                .map(|(a, e, ev)| AppendRequest {
                    aggregate_id: a,
                    expected: *e,
                    events: ev,
                })
                .collect();
            store.append_batch(&reqs)
        };
        self.note(format!(
            "step {step}: client {client} appends [{}] -> {}",
            desc.join(", "),
            match &result {
                Ok(a) => format!("{a:?}"),
                Err(e) => format!("error: {e}"),
            }
        ));
        self.settle_append(&requests, result)
    }

    /// Checks an append's outcome against the model and records it.
    fn settle_append(
        &mut self,
        requests: &[(String, ExpectedVersion, Vec<NewEvent>)],
        result: Result<Vec<Appended>, AppendError>,
    ) -> Result<(), String> {
        let was_poisoned = self.poisoned;
        let fsync_failed_now = self.take_log_fsync_failures() > 0;
        match result {
            Ok(appended) => {
                if was_poisoned {
                    return Err("an append succeeded after an fsync of the log had failed, \
                                without a reopen"
                        .into());
                }
                if fsync_failed_now {
                    return Err(
                        "an append was acknowledged although an fsync of the log failed \
                         during it"
                            .into(),
                    );
                }
                let first_seq = appended.iter().map(|a| a.first_seq).min().unwrap_or(0);
                if first_seq > self.events.len() as u64 {
                    self.reconcile_gap(first_seq)?;
                } else {
                    self.in_doubt.clear();
                }
                if first_seq != self.events.len() as u64 {
                    return Err(format!(
                        "append acknowledged at seq {first_seq}, the model expected {}",
                        self.events.len()
                    ));
                }
                for ((aggregate, expected, events), a) in requests.iter().zip(&appended) {
                    let current = self.versions.get(aggregate).copied().unwrap_or(0);
                    if !admits(*expected, current) {
                        return Err(format!(
                            "{aggregate} at version {current} accepted an append expecting \
                             {expected}"
                        ));
                    }
                    let want = Appended {
                        first_seq: self.events.len() as u64,
                        last_seq: self.events.len() as u64 + events.len() as u64 - 1,
                        last_version: current + events.len() as u64,
                    };
                    if *a != want {
                        return Err(format!("{aggregate}: got {a:?}, the model says {want:?}"));
                    }
                    for (i, e) in events.iter().enumerate() {
                        self.events.push(ModelEvent {
                            aggregate: aggregate.clone(),
                            version: current + 1 + i as u64,
                            event: e.clone(),
                        });
                    }
                    self.versions.insert(aggregate.clone(), want.last_version);
                    self.acked
                        .push((aggregate.clone(), *expected, events.clone(), *a));
                    self.stats.events_acked += events.len() as u64;
                }
                self.stats.appends_acked += 1;
                Ok(())
            }
            Err(AppendError::WrongExpectedVersion {
                aggregate_id,
                expected,
                actual,
            }) => {
                self.stats.appends_refused_expected_version += 1;
                if !self.in_doubt.is_empty() {
                    return Err("expected version refused while the model forced Any".into());
                }
                let current = self.versions.get(&aggregate_id).copied().unwrap_or(0);
                if actual != current || admits(expected, current) {
                    return Err(format!(
                        "{aggregate_id}: refused expecting {expected} with actual {actual}, \
                         the model has version {current}"
                    ));
                }
                Ok(())
            }
            Err(e) if is_validation_error(&e) => Err(format!("unexpected refusal: {e}")),
            Err(e) => {
                self.stats.appends_failed += 1;
                if !self.faults_since_open && !self.flips_injected {
                    return Err(format!("append failed with no fault injected: {e}"));
                }
                if was_poisoned {
                    self.stats.writes_refused_after_fsync_failure += 1;
                }
                self.in_doubt.push(InDoubt {
                    requests: requests
                        .iter()
                        .map(|(a, _, ev)| (a.clone(), ev.clone()))
                        .collect(),
                });
                Ok(())
            }
        }
    }

    /// Retries an acknowledged append with the same ids: must answer the original.
    fn retry_acked(&mut self, c: &mut dyn Choices) -> Result<(), String> {
        if self.acked.is_empty() || !self.in_doubt.is_empty() {
            return Ok(());
        }
        let i = self.acked.len() - 1 - c.below(self.acked.len().min(4) as u64) as usize;
        let (aggregate, expected, events, original) = self.acked[i].clone();
        let result = self.store()?.append(&aggregate, expected, &events);
        self.note(format!(
            "retry of acked {aggregate} {expected} x{} -> {result:?}",
            events.len()
        ));
        match result {
            Ok(a) if a == original => {
                self.stats.retries_answered_idempotently += 1;
                Ok(())
            }
            Ok(a) => Err(format!(
                "retrying an acknowledged append gave {a:?}, originally {original:?}"
            )),
            Err(AppendError::WrongExpectedVersion { .. }) | Err(AppendError::Read(_))
                if self.flips_injected =>
            {
                Ok(())
            }
            Err(e) if !is_validation_error(&e) && self.faults_since_open => Ok(()),
            Err(e) => Err(format!("retrying an acknowledged append failed: {e}")),
        }
    }

    /// Retries the oldest in-doubt append with the same ids, as a client that saw an
    /// error would: stored or not, afterwards it is stored exactly once.
    fn retry_in_doubt(&mut self, c: &mut dyn Choices) -> Result<(), String> {
        let Some(doubt) = self.in_doubt.last().cloned() else {
            return Ok(());
        };
        if c.below(2) == 0 {
            self.disk.clear_injected_faults();
        }
        let requests: Vec<(String, ExpectedVersion, Vec<NewEvent>)> = doubt
            .requests
            .iter()
            .map(|(a, ev)| (a.clone(), ExpectedVersion::Any, ev.clone()))
            .collect();
        let result = {
            let store = self.store()?;
            let reqs: Vec<AppendRequest<'_>> = requests
                .iter()
                .map(|(a, e, ev)| AppendRequest {
                    aggregate_id: a,
                    expected: *e,
                    events: ev,
                })
                .collect();
            store.append_batch(&reqs)
        };
        self.note(format!("retry of in-doubt append -> {result:?}"));
        match result {
            Ok(appended) => {
                let first = appended.iter().map(|a| a.first_seq).min().unwrap_or(0);
                if first < self.events.len() as u64 {
                    // It was stored before: the answer must point at the stored copy.
                    self.reconcile_gap(self.store()?.next_seq())?;
                    for ((aggregate, _, events), a) in requests.iter().zip(&appended) {
                        self.check_stored_copy(aggregate, events, a)?;
                    }
                    self.stats.retries_answered_idempotently += 1;
                    Ok(())
                } else {
                    self.settle_append(&requests, Ok(appended))
                }
            }
            Err(e) => self.settle_append(&requests, Err(e)),
        }
    }

    fn check_stored_copy(
        &self,
        aggregate: &str,
        events: &[NewEvent],
        a: &Appended,
    ) -> Result<(), String> {
        for (i, e) in events.iter().enumerate() {
            let seq = a.first_seq + i as u64;
            let m = self
                .events
                .get(seq as usize)
                .ok_or_else(|| format!("retry answered seq {seq}, past the model's events"))?;
            if m.aggregate != aggregate || m.event != *e {
                return Err(format!(
                    "retry answered seq {seq}, which holds another event"
                ));
            }
        }
        Ok(())
    }

    /// The store holds seqs `self.events.len()..upto` that the model did not see
    /// acknowledged: they must be in-doubt appends, whole and in order. Adopts them.
    fn reconcile_gap(&mut self, upto: u64) -> Result<(), String> {
        let mut stored: Vec<RecordedEvent> = Vec::new();
        {
            let store = self.store()?;
            for seq in self.events.len() as u64..upto {
                let e = store
                    .read_seq(seq)
                    .and_then(|s| s.to_recorded())
                    .map_err(|e| format!("reading seq {seq} past the acknowledged ones: {e}"))?;
                stored.push(e);
            }
        }
        let mut at = 0;
        let mut doubts = std::mem::take(&mut self.in_doubt).into_iter();
        while at < stored.len() {
            let first = &stored[at];
            let Some(doubt) = doubts.find(|d| {
                d.requests
                    .first()
                    .and_then(|(_, ev)| ev.first())
                    .is_some_and(|e| e.event_id == Some(first.event_id))
            }) else {
                return Err(format!(
                    "seq {} holds event {} of {} that was never appended (or not whole, or \
                     out of order)",
                    first.seq, first.event_id, first.aggregate_id
                ));
            };
            for (aggregate, events) in &doubt.requests {
                let current = self.versions.get(aggregate).copied().unwrap_or(0);
                for (i, e) in events.iter().enumerate() {
                    let Some(s) = stored.get(at) else {
                        return Err(format!(
                            "an in-doubt append is stored only in part: its event {i} of \
                             {aggregate} is missing"
                        ));
                    };
                    let want = ModelEvent {
                        aggregate: aggregate.clone(),
                        version: current + 1 + i as u64,
                        event: e.clone(),
                    };
                    if !same_event(s, &want) {
                        return Err(format!(
                            "seq {} differs from the in-doubt append it belongs to: stored \
                             {s:?}, appended {want:?}",
                            s.seq
                        ));
                    }
                    self.events.push(want);
                    at += 1;
                }
                self.versions
                    .insert(aggregate.clone(), current + events.len() as u64);
            }
            self.stats.in_doubt_appends_found_stored += 1;
        }
        Ok(())
    }

    // --- faults -------------------------------------------------------------------------

    fn log_fsync_failures(&self) -> Vec<PathBuf> {
        let log_dir = Path::new(SIM_STORE_DIR).join(crate::log::LOG_DIR_NAME);
        self.disk
            .injected_fsync_failures()
            .into_iter()
            .filter(|p| p.starts_with(&log_dir))
            .collect()
    }

    /// How many injected fsync failures hit the store's log since last asked; any makes
    /// the store poisoned (invariant 5).
    fn take_log_fsync_failures(&mut self) -> usize {
        let all = self.log_fsync_failures().len();
        let new = all.saturating_sub(self.log_fsync_failures_seen);
        self.log_fsync_failures_seen = all;
        if new > 0 {
            self.poisoned = true;
        }
        new
    }

    fn inject_fault(&mut self, c: &mut dyn Choices) -> Result<(), String> {
        self.stats.faults_injected += 1;
        let what = c.below(9);
        match what {
            0 => {
                self.disk.fail_next_fsync();
                self.faults_since_open = true;
            }
            1 => {
                self.disk.fail_next_fsync_dropping_data();
                self.faults_since_open = true;
            }
            2 => {
                self.disk.fail_writes_with_enospc(true);
                self.faults_since_open = true;
            }
            3 => {
                self.disk.fail_writes_with_enospc(false);
            }
            4 => {
                self.disk.short_write_next();
                self.faults_since_open = true;
            }
            5 => {
                self.disk.flip_bit_on_read_after(c.below(4));
                self.flips_injected = true;
            }
            6 => {
                let dir = Path::new(SIM_STORE_DIR).join(crate::log::LOG_DIR_NAME);
                let segments = self.store()?.log().segment_first_seqs();
                if let Some(first) = segments.last() {
                    let path = dir.join(crate::log::segment::segment_file_name(*first));
                    if self.disk.flip_bit_in_maps(&path).is_some() {
                        self.flips_injected = true;
                    }
                }
            }
            7 => {
                self.disk.fail_next_dir_sync();
                self.faults_since_open = true;
            }
            _ => {
                let ops = c.below(12);
                self.disk.halt_after_ops(ops);
                self.faults_since_open = true;
                self.note(format!("power will fail after {ops} operations"));
                return Ok(());
            }
        }
        self.note(format!("fault injected: {what}"));
        Ok(())
    }

    fn crash_with(&mut self, fault: CrashFault) -> (Arc<SimDisk>, CrashFault) {
        let disk = self.disk.crash(fault);
        (disk, fault)
    }

    fn after_crash(&mut self, disk: Arc<SimDisk>, c: &mut dyn Choices) -> Result<(), String> {
        // The old store and worker see a dead disk; drop them before reopening.
        self.close();
        self.disk = disk;
        if c.below(3) == 0 {
            self.stats.indexes_deleted += 1;
            let index = self.config.sled_dir.join(crate::index::INDEX_DIR_NAME);
            self.note("index deleted".into());
            std::fs::remove_dir_all(&index)
                .map_err(|e| format!("deleting {}: {e}", index.display()))?;
        }
        if c.below(4) == 0 {
            // Recovery reads a segment header, maps, offset indexes, the recovery point.
            self.flip_on_next_open = Some(c.below(8));
        }
        self.reopen(false)
    }

    // --- open and close -----------------------------------------------------------------

    fn close(&mut self) {
        if let Some(open) = self.open.take() {
            if let Some(sub) = &open.subscription {
                // On a dead disk the worker fails at once; a stuck one is a finding of
                // its own, reported by the next catch-up.
                let _ = sub.stop(CATCH_UP_TIMEOUT);
            }
            drop(open);
        }
        let mut log = self.handler_log.lock();
        log.last_first_attempt = None;
    }

    fn shut_down(&mut self) {
        self.close();
    }

    fn reopen(&mut self, first: bool) -> Result<(), String> {
        self.close();
        if self.disk.is_halted() {
            // A pending power cut struck while closing: this is a power loss after all.
            let (disk, fault) = self.disk.crash_random();
            self.note(format!("the power failed while closing: {fault:?}"));
            self.stats.power_losses += 1;
            self.disk = disk;
        }
        self.poisoned = false;
        self.flips_injected = false;
        self.faults_since_open = false;
        self.disk.clear_injected_faults();
        let dir = Path::new(SIM_STORE_DIR);
        if let Some(skip) = self.flip_on_next_open.take() {
            self.open_with_a_flipped_read(skip);
        }
        let store = match Store::open_with_storage(self.disk.clone(), dir, self.options.clone()) {
            Ok(s) => s,
            // Under `Sync`, every crash recovers on its own, also when the pages of the
            // last write landed out of order (docs/FORMAT.md): a refusal (`Corrupt`) is a
            // bug like any other failed reopen.
            Err(e) => return Err(format!("reopen failed: {e}")),
        };
        if first {
            self.disk.sync_all_dirs();
        }
        self.log_fsync_failures_seen = self.log_fsync_failures().len();
        let next = store.next_seq();
        self.note(format!(
            "opened: next seq {next}, model {}",
            self.events.len()
        ));
        let publisher =
            Publisher::open(&store).map_err(|e| format!("opening the publisher: {e}"))?;
        self.open = Some(Open {
            store,
            publisher,
            subscription: None,
        });
        // 1 and 2: acknowledged events present, nothing else.
        if next < self.events.len() as u64 {
            return Err(format!(
                "after reopening the log ends at seq {next}: acknowledged events \
                 {next}..{} are lost",
                self.events.len()
            ));
        }
        self.reconcile_gap(next)?;
        self.in_doubt.clear();
        self.check_all()?;
        self.check_subscription_durability()?;
        self.start_subscription()
    }

    /// Opens the store once with a bit flipped in one read of its recovery and closes it
    /// again. It may refuse, or open and serve read errors, but it must not change what is
    /// stored: the reopen after it checks every acknowledged event (a recovery that took
    /// the flip for a torn tail and cut acknowledged records would be caught there).
    fn open_with_a_flipped_read(&mut self, skip: u64) {
        self.stats.opens_with_a_flipped_read += 1;
        self.disk.flip_bit_on_read_after(skip);
        let opened = Store::open_with_storage(
            self.disk.clone(),
            Path::new(SIM_STORE_DIR),
            self.options.clone(),
        );
        self.disk.clear_injected_faults();
        match opened {
            Ok(store) => {
                self.note(format!(
                    "opened with a bit flipped in read {skip}: next seq {}; closing it",
                    store.next_seq()
                ));
                drop(store);
            }
            Err(e) => {
                self.stats.opens_refused_for_a_flipped_read += 1;
                self.note(format!(
                    "open with a bit flipped in read {skip} refused: {e}"
                ));
            }
        }
    }

    fn start_subscription(&mut self) -> Result<(), String> {
        let handler = FlakyHandler {
            seed: self.seed,
            log: Arc::clone(&self.handler_log),
        };
        let options = self.sub_options.clone();
        let open = self.open.as_mut().ok_or("no store open")?;
        let sub = open
            .publisher
            .subscribe(SIM_SUBSCRIPTION, options, handler)
            .map_err(|e| format!("subscribing: {e}"))?;
        open.subscription = Some(sub);
        Ok(())
    }

    // --- checks -------------------------------------------------------------------------

    /// Everything the store serves agrees with the model.
    fn check_all(&mut self) -> Result<(), String> {
        let store = self.store()?;
        // By seq, through read_all.
        let mut n = 0u64;
        for item in store.read_all(0, usize::MAX) {
            let e = item
                .and_then(|s| s.to_recorded())
                .map_err(|e| format!("read error: read_all at {n}: {e}"))?;
            let m = self
                .events
                .get(n as usize)
                .ok_or_else(|| format!("read_all returned seq {} past the model", e.seq))?;
            if e.seq != n || !same_event(&e, m) {
                return Err(format!("read_all: seq {n} is {e:?}, the model has {m:?}"));
            }
            n += 1;
        }
        if n != self.events.len() as u64 {
            return Err(format!(
                "read_all returned {n} events, the model has {}",
                self.events.len()
            ));
        }
        // By aggregate and type, through the index.
        let aggregates: BTreeSet<&String> = self.events.iter().map(|e| &e.aggregate).collect();
        for a in aggregates {
            self.check_aggregate(store, a)?;
        }
        for t in TYPES {
            self.check_type(store, t)?;
        }
        let stats = store
            .stats()
            .map_err(|e| format!("read error: stats: {e}"))?;
        if stats.event_count != self.events.len() as u64 {
            return Err(format!(
                "stats count {} events, the model {}",
                stats.event_count,
                self.events.len()
            ));
        }
        self.stats.reads_checked += 1;
        Ok(())
    }

    fn check_aggregate(&self, store: &Store, aggregate: &str) -> Result<(), String> {
        let want: Vec<u64> = self
            .events
            .iter()
            .enumerate()
            .filter(|(_, e)| e.aggregate == aggregate)
            .map(|(seq, _)| seq as u64)
            .collect();
        for direction in [Direction::Forward, Direction::Backward] {
            let from = if direction == Direction::Forward {
                1
            } else {
                u64::MAX
            };
            let got: Vec<RecordedEvent> = store
                .read_aggregate(aggregate, from, direction, usize::MAX)
                .map_err(|e| format!("read error: read_aggregate {aggregate}: {e}"))?
                .map(|s| s.and_then(|s| s.to_recorded()))
                .collect::<Result<_, ReadError>>()
                .map_err(|e| format!("read error: read_aggregate {aggregate}: {e}"))?;
            let mut want = want.clone();
            if direction == Direction::Backward {
                want.reverse();
            }
            let got_seqs: Vec<u64> = got.iter().map(|e| e.seq).collect();
            if got_seqs != want {
                return Err(format!(
                    "read_aggregate {aggregate} {direction:?}: seqs {got_seqs:?}, the model \
                     {want:?}"
                ));
            }
            for e in &got {
                let m = &self.events[e.seq as usize];
                if !same_event(e, m) {
                    return Err(format!("read_aggregate {aggregate}: {e:?} vs {m:?}"));
                }
            }
        }
        let version = store
            .aggregate_version(aggregate)
            .map_err(|e| format!("read error: aggregate_version {aggregate}: {e}"))?;
        if version != want.len() as u64 {
            return Err(format!(
                "{aggregate} is at version {version}, the model {}",
                want.len()
            ));
        }
        Ok(())
    }

    fn check_type(&self, store: &Store, event_type: &str) -> Result<(), String> {
        let want: Vec<u64> = self
            .events
            .iter()
            .enumerate()
            .filter(|(_, e)| e.event.event_type == event_type)
            .map(|(seq, _)| seq as u64)
            .collect();
        let got: Vec<u64> = store
            .read_type(event_type, 0, usize::MAX)
            .map_err(|e| format!("read error: read_type {event_type}: {e}"))?
            .map(|s| s.map(|s| s.seq()))
            .collect::<Result<_, ReadError>>()
            .map_err(|e| format!("read error: read_type {event_type}: {e}"))?;
        if got != want {
            return Err(format!(
                "read_type {event_type}: {got:?}, the model {want:?}"
            ));
        }
        Ok(())
    }

    /// Reads while running (faults may be armed: only typed errors are excused).
    fn check_reads(&mut self, c: &mut dyn Choices) -> Result<(), String> {
        let result = if c.below(4) == 0 {
            self.check_all()
        } else {
            let store = self.store()?;
            let a = format!("acct-{}", c.below(AGGREGATES as u64));
            self.check_aggregate(store, &a)
                .and_then(|()| self.check_type(store, TYPES[c.below(4) as usize]))
        };
        self.note(format!("reads checked: {result:?}"));
        match result {
            Ok(()) => {
                self.stats.reads_checked += 1;
                Ok(())
            }
            // A flipped bit makes a read fail with a checksum error: typed, and never the
            // wrong data (a mismatch with the model would not be an Err from a read).
            Err(e) if self.flips_injected && e.starts_with("read error") => {
                self.stats.read_errors_after_flips += 1;
                Ok(())
            }
            Err(e) if !self.in_doubt.is_empty() => {
                // The model is behind until the in-doubt appends are reconciled.
                self.reconcile_gap(self.store()?.next_seq())
                    .map_err(|g| format!("{g} (while checking reads: {e})"))?;
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    fn check_follow(&mut self, c: &mut dyn Choices) -> Result<(), String> {
        let from = c.below(self.events.len() as u64 + 1);
        let head = self.store()?.next_seq();
        let mut follower = self.store()?.follow(from, Filter::all());
        let mut seq = from;
        while seq < head {
            match follower.next_timeout(Duration::from_millis(200)) {
                Ok(Some(s)) => {
                    let e = s.to_recorded().map_err(|e| format!("follow: {e}"))?;
                    match self.events.get(seq as usize) {
                        Some(m) if e.seq == seq && same_event(&e, m) => {}
                        _ if !self.in_doubt.is_empty() => {}
                        m => return Err(format!("follow at {seq}: {e:?}, the model {m:?}")),
                    }
                    seq += 1;
                }
                Ok(None) => return Err(format!("follower stalled at {seq} of {head}")),
                Err(e) if self.flips_injected => {
                    self.stats.read_errors_after_flips += 1;
                    self.note(format!("follow error after a flip: {e}"));
                    return Ok(());
                }
                Err(e) => return Err(format!("follow at {seq}: {e}")),
            }
        }
        // Nothing more is stored: a short wait times out.
        match follower.next_timeout(Duration::from_millis(1)) {
            Ok(None) => {}
            Ok(Some(s)) => return Err(format!("follower returned seq {} past the head", s.seq())),
            Err(e) => return Err(format!("follow past the head: {e}")),
        }
        self.stats.follows_checked += 1;
        Ok(())
    }

    // --- the subscription ---------------------------------------------------------------

    fn subscription(&self) -> Option<&Subscription> {
        self.open.as_ref().and_then(|o| o.subscription.as_ref())
    }

    /// Waits until the worker handled everything stored (or stopped on a fault), so that
    /// its disk operations never race the next step's.
    fn wait_for_subscription(&mut self) -> Result<(), String> {
        let Some(open) = &self.open else {
            return Ok(());
        };
        let head = open.store.next_seq();
        let Some(sub) = &open.subscription else {
            return Ok(());
        };
        if head == 0 || sub.wait_until_handled(head - 1, CATCH_UP_TIMEOUT) {
            return Ok(());
        }
        let stats = sub.stats();
        match stats.status {
            Status::Failed { .. } if self.faults_since_open || self.flips_injected => {
                self.note(format!(
                    "subscription stopped on a fault: {:?}",
                    stats.status
                ));
                Ok(())
            }
            status => Err(format!(
                "subscription did not catch up in {CATCH_UP_TIMEOUT:?}: {status:?}, position \
                 {} of {head}",
                stats.position
            )),
        }
    }

    fn catch_up_subscription(&mut self) -> Result<(), String> {
        self.wait_for_subscription()?;
        let Some(sub) = self.subscription() else {
            return Err("no subscription".into());
        };
        let stats = sub.stats();
        if stats.status != Status::Running {
            return Err(format!(
                "subscription not running after a clean reopen: {:?}",
                stats.status
            ));
        }
        Ok(())
    }

    fn redrive(&mut self) -> Result<(), String> {
        let Some(sub) = self.subscription() else {
            return Ok(());
        };
        let seq_of: HashMap<u64, u64> = sub
            .dead_letters()
            .map_err(|e| format!("dead letters of a running subscription: {e}"))?
            .iter()
            .map(|d| (d.id, d.seq))
            .collect();
        let result = sub.redrive(Redrive::All);
        self.note(format!("redrive -> {result:?}"));
        match result {
            Ok(report) => {
                self.stats.redrives += 1;
                let log = self.handler_log.lock();
                for id in &report.delivered {
                    let seq = seq_of.get(id).ok_or_else(|| {
                        format!("redrive reports dead letter {id} delivered, which was not listed")
                    })?;
                    if !log.handled.contains_key(seq) {
                        return Err(format!(
                            "redrive reports dead letter {id} (seq {seq}) delivered, the \
                             handler did not finish it"
                        ));
                    }
                }
                Ok(())
            }
            Err(_) if self.faults_since_open || self.flips_injected || self.poisoned => Ok(()),
            Err(e) => Err(format!("redrive failed with no fault injected: {e}")),
        }
    }

    fn check_handler_log(&mut self) -> Result<(), String> {
        let mut log = self.handler_log.lock();
        self.stats.deliveries = log.deliveries;
        if let Some(v) = log.violations.first() {
            return Err(format!("handler saw: {v}"));
        }
        for (&seq, id) in &log.handled {
            match self.events.get(seq as usize) {
                Some(m) if m.event.event_id == Some(*id) => {}
                // Delivered events are durable (Sync), but the model may not have
                // reconciled an in-doubt append the worker already saw.
                None if !self.in_doubt.is_empty() => {}
                m => {
                    let v = format!("handled seq {seq} as event {id}, the store has {m:?}");
                    log.violations.push(v.clone());
                    return Err(v);
                }
            }
        }
        Ok(())
    }

    /// 4: at open, the stored checkpoint passes only finished events; dead letters name
    /// real events.
    fn check_subscription_durability(&mut self) -> Result<(), String> {
        let open = self.open.as_ref().ok_or("no store open")?;
        // The dead letters first: opening them brings the stored evicted count up to the
        // one their log holds (a crash may have come between an eviction and its count).
        let dead = open
            .publisher
            .open_dead_letters(SIM_SUBSCRIPTION, self.sub_options.dead_letters.clone())
            .map_err(|e| format!("dead letters: {e}"))?;
        let stored = open
            .publisher
            .stored_subscriptions()
            .map_err(|e| format!("stored subscriptions: {e}"))?;
        let Some(sub) = stored.iter().find(|s| s.name == SIM_SUBSCRIPTION) else {
            return Ok(()); // never checkpointed yet
        };
        let parked: BTreeSet<u64> = dead.list().iter().map(|d| d.seq).collect();
        for d in dead.list() {
            let m = self
                .events
                .get(d.seq as usize)
                .ok_or_else(|| format!("dead letter {} names seq {}, past the log", d.id, d.seq))?;
            if d.aggregate_id != m.aggregate
                || d.version != m.version
                || d.event_type != m.event.event_type
                || d.attempts == 0
            {
                return Err(format!("dead letter {d:?} does not match {m:?}"));
            }
            self.stats.dead_letters_checked += 1;
        }
        if sub.dead_letters_evicted < self.evicted_seen {
            return Err(format!(
                "the evicted count went down from {} to {}",
                self.evicted_seen, sub.dead_letters_evicted
            ));
        }
        self.evicted_seen = sub.dead_letters_evicted;
        let log = self.handler_log.lock();
        let checkpoint = sub.checkpoint.min(self.events.len() as u64);
        let unfinished: Vec<u64> = (0..checkpoint)
            .filter(|s| !log.handled.contains_key(s) && !parked.contains(s))
            .collect();
        if unfinished.len() as u64 > sub.dead_letters_evicted {
            return Err(format!(
                "checkpoint {} passes {} events neither handled nor parked (first {:?}), and \
                 only {} dead letters were evicted",
                sub.checkpoint,
                unfinished.len(),
                &unfinished[..unfinished.len().min(5)],
                sub.dead_letters_evicted
            ));
        }
        Ok(())
    }

    /// At the end: every stored event was handled or is accounted for in the dead letters.
    fn check_everything_delivered(&mut self) -> Result<(), String> {
        let sub = self.subscription().ok_or("no subscription")?;
        let stats = sub.stats();
        let parked: BTreeSet<u64> = sub
            .dead_letters()
            .map_err(|e| format!("dead letters of a running subscription: {e}"))?
            .iter()
            .map(|d| d.seq)
            .collect();
        let log = self.handler_log.lock();
        let missing: Vec<u64> = (0..self.events.len() as u64)
            .filter(|s| !log.handled.contains_key(s) && !parked.contains(s))
            .collect();
        if missing.len() as u64 > stats.dead_letters_evicted {
            return Err(format!(
                "{} events never handled nor parked (first {:?}); {} dead letters evicted; \
                 position {}",
                missing.len(),
                &missing[..missing.len().min(5)],
                stats.dead_letters_evicted,
                stats.position
            ));
        }
        Ok(())
    }
}

/// Whether `expected` admits an aggregate at version `current`.
fn admits(expected: ExpectedVersion, current: u64) -> bool {
    match expected {
        ExpectedVersion::Any => true,
        ExpectedVersion::NoStream => current == 0,
        ExpectedVersion::Exists => current > 0,
        ExpectedVersion::Exact(v) => current == v,
    }
}

/// Whether a stored event is exactly the modelled one.
fn same_event(e: &RecordedEvent, m: &ModelEvent) -> bool {
    e.aggregate_id == m.aggregate
        && e.version == m.version
        && e.event_type == m.event.event_type
        && Some(e.event_id) == m.event.event_id
        && Some(e.timestamp_us) == m.event.timestamp_us
        && e.metadata == m.event.metadata
        && e.content_type == m.event.content_type
        && e.payload == m.event.payload
}

// ---------------------------------------------------------------------------------------
// The `store_ops` fuzz target

/// Steps a fuzz input may drive at most.
pub const FUZZ_STEPS_MAX: usize = 60;

/// Body of the `store_ops` fuzz target (and of its corpus replay in `cargo test`):
/// bytes 0..8 seed the simulated disk, the rest pick the steps ([`FuzzChoices`]).
/// Panics, with the failure and the trace of steps, if an invariant breaks.
///
/// sled's files go to a fresh directory under `$TMPDIR` (point it at a tmpfs such as
/// `/dev/shm` to go faster), removed afterwards.
pub fn fuzz_store_ops(data: &[u8]) {
    static QUIET: std::sync::Once = std::sync::Once::new();
    QUIET.call_once(|| {
        // The handler's deliberate panics are caught by the publisher; libFuzzer's hook
        // would abort on them, so let only other panics reach it.
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if info.payload().downcast_ref::<&str>() != Some(&SIM_HANDLER_PANIC) {
                previous(info);
            }
        }));
    });
    let mut seed_bytes = [0u8; 8];
    let n = data.len().min(8);
    seed_bytes[..n].copy_from_slice(&data[..n]);
    let seed = u64::from_le_bytes(seed_bytes);
    let mut choices = FuzzChoices::new(data.get(8..).unwrap_or(&[]));
    let sled_dir = match tempfile_dir() {
        Ok(d) => d,
        Err(e) => panic!("cannot make a directory for sled: {e}"),
    };
    let config = SimConfig {
        steps_max: FUZZ_STEPS_MAX,
        sled_dir: sled_dir.clone(),
        verbose: std::env::var_os("EVENTLOG_SIM_VERBOSE").is_some(),
    };
    let result = run(seed, &mut choices, &config);
    let _ = std::fs::remove_dir_all(&sled_dir);
    if let Err(failure) = result {
        panic!(
            "store_ops: {}\n  last steps:\n    {}",
            failure.message,
            failure.trace.join("\n    ")
        );
    }
}

/// A fresh directory under the temporary directory (no tempfile dependency in the
/// library: it is a dev-dependency).
fn tempfile_dir() -> std::io::Result<PathBuf> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("eventlog-store-ops-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
