//! An application crash-testing its OWN invariants on eventlog's simulated disk.
//!
//! eventlog promises that an append that returned `Ok` survives any crash (the default
//! `Durability::Sync`). An application needs more: that its own rules still hold after
//! recovery. Here a small bank (accounts are opened, credited and debited, never
//! overdrawn) runs on `eventlog::testing::SimDisk`, an in-memory disk that drops, tears
//! or reorders unsynced writes when the power goes. The bank keeps its own record of
//! every acknowledged event; after each crash it reopens the store and checks that
//! record, its balances and its versions against what the store recovered.
//!
//! Everything follows from a seed, so a failure replays exactly:
//! `cargo run --release --example crash_test [-- --seeds N | --seed S]` (default 200 seeds).

use eventlog::log::AppendError as LogAppendError;
use eventlog::store::{
    AppendError, DomainEvent, ExpectedVersion, JsonCodec, Options, Store, TypedAppendError,
    TypedEvent,
};
use eventlog::testing::{SimDisk, SimRng};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

// ---- The domain: what the application has anyway ----

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum AccountEvent {
    Opened,
    Deposited { amount: u64, memo: String },
    Withdrawn { amount: u64, memo: String },
}

impl DomainEvent for AccountEvent {
    fn event_type(&self) -> &str {
        match self {
            AccountEvent::Opened => "AccountOpened",
            AccountEvent::Deposited { .. } => "MoneyDeposited",
            AccountEvent::Withdrawn { .. } => "MoneyWithdrawn",
        }
    }
}

impl AccountEvent {
    /// What the event does to the balance (signed, so a broken history shows as negative).
    fn delta(&self) -> i64 {
        match self {
            AccountEvent::Opened => 0,
            AccountEvent::Deposited { amount, .. } => *amount as i64,
            AccountEvent::Withdrawn { amount, .. } => -(*amount as i64),
        }
    }
}

#[derive(Debug, Clone)]
enum Command {
    Open,
    Deposit { amount: u64, memo: String },
    Withdraw { amount: u64, memo: String },
}

const ACCOUNTS: [&str; 4] = ["acct-alice", "acct-bob", "acct-carol", "acct-dave"];

fn history(store: &Store, id: &str) -> Result<Vec<TypedEvent<AccountEvent>>, String> {
    (store.read_typed::<JsonCodec, AccountEvent>(id)).map_err(|e| format!("reading {id}: {e}"))
}

/// The domain rules, on the account rebuilt from its history: no overdraft, no deposit to
/// an unopened account. Returns the event and the version it was decided at, or `None`.
fn decide(store: &Store, id: &str, cmd: &Command) -> Result<Option<(AccountEvent, u64)>, String> {
    let events = history(store, id)?;
    let balance: i64 = events.iter().map(|e| e.data.delta()).sum();
    let opened = !events.is_empty();
    let event = match cmd {
        Command::Open if !opened => AccountEvent::Opened,
        Command::Deposit { amount, memo } if opened => AccountEvent::Deposited {
            amount: *amount,
            memo: memo.clone(),
        },
        Command::Withdraw { amount, memo } if opened && balance >= *amount as i64 => {
            AccountEvent::Withdrawn {
                amount: *amount,
                memo: memo.clone(),
            }
        }
        _ => return Ok(None),
    };
    Ok(Some((event, events.len() as u64)))
}

// ---- The test: the application's own record, faults, and checks ----

/// What the store acknowledged, per account, as (seq, event); index = version - 1.
type Ledger = BTreeMap<&'static str, Vec<(u64, AccountEvent)>>;

fn acked(ledger: &Ledger, id: &str) -> u64 {
    ledger.get(id).map_or(0, |v| v.len() as u64)
}

/// An append that failed as the power went: it may or may not have reached the disk.
#[derive(Debug)]
struct InDoubt {
    id: &'static str,
    version: u64,
    event: AccountEvent,
}

/// Why a command stopped.
enum Stop {
    /// The store failed it (expected once a fault is armed); the append, if any, is in doubt.
    Failed(String, Option<InDoubt>),
    /// The disk was full. The store promises that nothing of the append was stored.
    DiskFull,
    /// The store broke a promise: the test fails.
    Broken(String),
}

/// What a run did.
#[derive(Debug, Default)]
pub struct Summary {
    pub seeds: u64,
    pub crashes: u64,
    pub events_checked: u64,
    pub in_doubt_landed: u64,
    pub in_doubt_lost: u64,
    pub conflicts: u64,
    pub disk_full: u64,
    pub elapsed: Duration,
}

/// Runs one command as the application does: decide on fresh state, append with
/// `ExpectedVersion::Exact`, decide again on a conflict. With `rival`, a second clerk runs
/// the same command between our decision and our append: both saw the same balance, and
/// only the version check keeps them from spending it twice.
fn execute(
    store: &Store,
    id: &'static str,
    cmd: &Command,
    mut rival: bool,
    ledger: &mut Ledger,
    summary: &mut Summary,
) -> Result<(), Stop> {
    loop {
        let decided = decide(store, id, cmd).map_err(|e| Stop::Failed(e, None))?;
        let Some((event, version)) = decided else {
            return Ok(()); // refused by the rules
        };
        if version != acked(ledger, id) {
            let n = acked(ledger, id);
            return Err(Stop::Broken(format!(
                "{id} is at version {version}, {n} acknowledged"
            )));
        }
        if std::mem::take(&mut rival) {
            execute(store, id, cmd, false, ledger, summary)?;
        }
        let expected = ExpectedVersion::Exact(version);
        match store.append_typed::<JsonCodec, _>(id, expected, std::slice::from_ref(&event)) {
            Ok(a) if acked(ledger, id) == version && a.last_version == version + 1 => {
                ledger.entry(id).or_default().push((a.first_seq, event));
                return Ok(());
            }
            Ok(a) => return Err(Stop::Broken(format!("{id}: {expected:?} gave {a:?}"))),
            Err(TypedAppendError::Append(AppendError::WrongExpectedVersion { .. })) => {
                summary.conflicts += 1; // the rival got there first: decide again
            }
            Err(TypedAppendError::Append(AppendError::Log(LogAppendError::DiskFull {
                ..
            }))) => {
                return Err(Stop::DiskFull);
            }
            Err(e) => {
                let in_doubt = InDoubt {
                    id,
                    version: version + 1,
                    event,
                };
                return Err(Stop::Failed(e.to_string(), Some(in_doubt)));
            }
        }
    }
}

/// How a round ends.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
    /// The power goes between two commands.
    None,
    /// The power goes in the middle of the store's writes.
    PowerCut,
    /// An fsync fails: the store must stop, it can no longer promise durability.
    FsyncError,
    /// The disk fills up for a while, then the power goes between two commands.
    DiskFull,
}

/// A customer's command on a random account, and whether a rival clerk runs it too.
fn random_command(rng: &mut SimRng) -> (&'static str, Command, bool) {
    let id = *rng.pick(&ACCOUNTS);
    // The customer's reference, up to a few hundred bytes: fewer events fill a segment.
    let memo = format!("{:016x} ", rng.next_u64()).repeat(rng.below(16) as usize);
    let cmd = match rng.below(8) {
        0 => Command::Open,
        1..=4 => Command::Deposit {
            amount: rng.range(1, 100),
            memo,
        },
        _ => Command::Withdraw {
            amount: rng.range(1, 150),
            memo,
        },
    };
    let rival = matches!(cmd, Command::Withdraw { .. }) && rng.chance(1, 4);
    (id, cmd, rival)
}

/// Runs random commands until the power goes: between two commands, or after a fault is
/// armed and a command fails under it (that command is in doubt).
fn run_until_crash(
    store: &Store,
    disk: &SimDisk,
    rng: &mut SimRng,
    ledger: &mut Ledger,
    summary: &mut Summary,
) -> Result<Option<InDoubt>, String> {
    // Now and then a busy day, long enough to fill a log segment and start the next.
    let commands = if rng.chance(1, 10) {
        rng.range(100, 600)
    } else {
        rng.range(1, 40)
    };
    let arm_at = rng.below(commands);
    let faults = [
        Fault::None,
        Fault::PowerCut,
        Fault::FsyncError,
        Fault::DiskFull,
    ];
    let fault = *rng.pick(&faults);
    let mut armed = fault != Fault::None;
    for i in 0..commands + 1_000 {
        if i >= commands && !armed {
            return Ok(None);
        }
        if i == arm_at {
            match fault {
                Fault::None => {}
                Fault::PowerCut => disk.halt_after_ops(rng.below(6)), // within a few writes
                Fault::FsyncError => disk.fail_next_fsync(),
                Fault::DiskFull => disk.fail_writes_with_enospc(true),
            }
        }
        let (id, cmd, rival) = random_command(rng);
        match execute(store, id, &cmd, rival, ledger, summary) {
            Ok(()) => {}
            // Nothing stored, the store stays usable: free space and carry on.
            Err(Stop::DiskFull) if fault == Fault::DiskFull => {
                summary.disk_full += 1;
                disk.fail_writes_with_enospc(false);
                armed = false;
            }
            Err(Stop::Failed(_, in_doubt))
                if matches!(fault, Fault::PowerCut | Fault::FsyncError) =>
            {
                return Ok(in_doubt); // the power goes now
            }
            Err(Stop::Failed(e, _) | Stop::Broken(e)) => return Err(e),
            Err(Stop::DiskFull) => return Err("disk full with no fault armed".into()),
        }
    }
    Err("the armed fault never fired".into())
}

/// The application's invariants, on a recovered (or running) store.
fn check(
    store: &Store,
    ledger: &mut Ledger,
    in_doubt: Option<InDoubt>,
    summary: &mut Summary,
) -> Result<(), String> {
    // The append in doubt landed whole or not at all; if it landed, it counts from now on.
    if let Some(d) = in_doubt {
        match history(store, d.id)?.get(acked(ledger, d.id) as usize) {
            None => summary.in_doubt_lost += 1,
            Some(e) if e.version == d.version && e.data == d.event => {
                ledger.entry(d.id).or_default().push((e.seq, d.event));
                summary.in_doubt_landed += 1;
            }
            Some(e) => return Err(format!("found {e:?}, the append in doubt was {d:?}")),
        }
    }
    let mut total = 0;
    for id in ACCOUNTS {
        let acked = ledger.get(id).map_or(&[][..], Vec::as_slice);
        let stored = history(store, id)?;
        // Every acknowledged event is there, at its seq and version, and nothing else.
        if stored.len() != acked.len() {
            let (s, a) = (stored.len(), acked.len());
            return Err(format!("{id}: {s} events stored, {a} acknowledged"));
        }
        let mut balance = 0;
        for (version, (e, (seq, event))) in (1..).zip(stored.iter().zip(acked)) {
            if (e.version, e.seq, &e.data) != (version, *seq, event) {
                return Err(format!(
                    "{id}: stored {e:?}, acknowledged {event:?} at {seq}"
                ));
            }
            balance += e.data.delta();
            if balance < 0 {
                return Err(format!("{id} is overdrawn at version {version}: {balance}"));
            }
        }
        let expected: i64 = acked.iter().map(|(_, e)| e.delta()).sum();
        if balance != expected {
            return Err(format!("{id}: balance {balance}, acknowledged {expected}"));
        }
        total += acked.len() as u64;
    }
    // No event the application did not write (or have in doubt) appeared.
    if store.next_seq() != total {
        return Err(format!(
            "{} events in the log, {total} known",
            store.next_seq()
        ));
    }
    summary.events_checked += total;
    Ok(())
}

/// One seed: a few rounds of business, power cut, recovery and checks, then more business.
fn run_seed(seed: u64, summary: &mut Summary) -> Result<(), String> {
    // The application's choices; the disk draws its own faults from the same seed.
    let mut rng = SimRng::new(seed ^ 0xBA4C);
    // sled's real fsyncs would take most of the time: keep it in memory (tmpfs) if we can.
    let shm = Path::new("/dev/shm");
    let sled_dir = if shm.is_dir() {
        tempfile::tempdir_in(shm)
    } else {
        tempfile::tempdir()
    };
    let sled_dir = sled_dir.map_err(|e| e.to_string())?;
    let mut options = Options::default(); // Durability::Sync: Ok means on disk
    options.sled_dir = Some(sled_dir.path().to_path_buf()); // sled writes real files
    options.log.segment_size_bytes = 72 << 10; // the simulated disk holds files in memory
    options.log.preallocate_chunk_bytes = 4 << 10; // the file grows often: more to crash in
    options.payload_size_bytes_max = 512;
    options.index.flush_events = 16; // the index reaches sled often, so crashes find it there
    let open = |disk: &std::sync::Arc<SimDisk>| {
        Store::open_with_storage(disk.clone(), Path::new("/sim/bank"), options.clone())
            .map_err(|e| format!("open: {e}"))
    };
    let mut disk = SimDisk::new(seed);
    let mut store = open(&disk)?;
    let mut ledger = Ledger::new();
    for round in 0..rng.range(2, 4) {
        let in_doubt = run_until_crash(&store, &disk, &mut rng, &mut ledger, summary)
            .map_err(|e| format!("round {round}, before the crash: {e}"))?;
        let (rebooted, fault) = disk.crash_random();
        rebooted.clear_injected_faults(); // they survive a crash; this test's do not
        disk = rebooted;
        summary.crashes += 1;
        // The store from before the crash: what it still tries to write fails harmlessly.
        drop(store);
        // sled is on the real disk and survived. Sometimes lose it, as a power cut might:
        // everything in it is derived from the log.
        let lose_index = rng.chance(1, 3);
        if lose_index {
            std::fs::remove_dir_all(sled_dir.path()).map_err(|e| e.to_string())?;
        }
        // Sometimes the power goes again while the store recovers (or right after).
        let mut context = format!("round {round}, after {fault:?} (index lost: {lose_index})");
        if rng.chance(1, 5) {
            disk.halt_after_ops(rng.below(8));
            drop(open(&disk)); // fails if the power went during recovery
            let (rebooted, fault) = disk.crash_random();
            disk = rebooted;
            summary.crashes += 1;
            context += &format!(", then {fault:?} while reopening");
        }
        store = open(&disk).map_err(|e| format!("{context}: {e}"))?;
        check(&store, &mut ledger, in_doubt, summary).map_err(|e| format!("{context}: {e}"))?;
    }
    // Life goes on: the recovered store takes new business, and the books still balance.
    for _ in 0..20 {
        let (id, cmd, rival) = random_command(&mut rng);
        match execute(&store, id, &cmd, rival, &mut ledger, summary) {
            Ok(()) => {}
            Err(Stop::Failed(e, _) | Stop::Broken(e)) => return Err(format!("at the end: {e}")),
            Err(Stop::DiskFull) => return Err("at the end: disk full".into()),
        }
    }
    check(&store, &mut ledger, None, summary).map_err(|e| format!("at the end: {e}"))
}

/// Runs `seeds`; on the first failure, says which seed failed and how to replay it.
pub fn run_seeds(seeds: std::ops::Range<u64>) -> Result<Summary, String> {
    let started = Instant::now();
    let mut summary = Summary::default();
    for seed in seeds {
        // A panic inside the store fails the seed like any broken promise.
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run_seed(seed, &mut summary)
        }));
        let error = outcome.unwrap_or_else(|_| Err("panicked (message above)".into()));
        if let Err(error) = error {
            return Err(format!(
                "seed {seed} FAILED: {error}\n\
                 replay: cargo run --release --example crash_test -- --seed {seed}"
            ));
        }
        summary.seeds += 1;
    }
    summary.elapsed = started.elapsed();
    Ok(summary)
}

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let n = args.get(1).and_then(|s| s.parse::<u64>().ok());
    let seeds = match (args.first().map(String::as_str), n, args.len()) {
        (None, _, _) => 0..200,
        (Some("--seeds"), Some(n), 2) => 0..n,
        (Some("--seed"), Some(s), 2) => s..s + 1,
        _ => {
            eprintln!("usage: crash_test [--seeds N | --seed S]");
            return std::process::ExitCode::from(2);
        }
    };
    match run_seeds(seeds) {
        Ok(s) => {
            println!(
                "{} seeds, {} crashes, {} acknowledged events checked in {:.1} s \
                 (appends in doubt at a crash: {} landed, {} lost; {} version conflicts \
                 retried; {} appends refused by a full disk)",
                s.seeds,
                s.crashes,
                s.events_checked,
                s.elapsed.as_secs_f64(),
                s.in_doubt_landed,
                s.in_doubt_lost,
                s.conflicts,
                s.disk_full,
            );
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            std::process::ExitCode::FAILURE
        }
    }
}
