//! The whole store (log, index, store API, publisher with dead letters) on the simulated
//! disk, over many seeds: several logical clients append with random expected versions,
//! read, follow, retry; a subscription with a flaky handler delivers; faults are injected
//! (failing fsyncs, full disk, short writes, flipped bits, power cut after a random
//! number of operations) and the power fails with every crash fault, the index kept
//! stale or deleted. The invariants are listed in `eventlog::testing::scenario`.
//!
//! Environment:
//! - `EVENTLOG_SIM_SEEDS=<n>`: seeds to run (default 500; 60 in debug builds);
//! - `EVENTLOG_SIM_SEED_START=<n>`: the first seed (default 0), to split long runs;
//! - `EVENTLOG_SIM_THREADS=<n>`: worker threads (default: the cores, at most 4);
//! - `EVENTLOG_SEED=<n>`: replay only that seed, printing every step.
//!
//! A failing seed is printed with the command that replays it.

use eventlog::testing::scenario::{self, SimConfig, SimStats, SIM_HANDLER_PANIC};
use eventlog::testing::SimRng;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

const SEEDS_DEFAULT: u64 = if cfg!(debug_assertions) { 60 } else { 500 };
const STEPS_PER_SEED: usize = 80;
/// Long runs report progress every this many seeds.
const PROGRESS_EVERY_SEEDS: u64 = 1_000;
/// Worker threads by default (`EVENTLOG_SIM_THREADS` overrides): seeds are
/// independent, so a 2-core CI machine runs two at a time.
const THREADS_DEFAULT_MAX: usize = 4;
/// Failures described in full; the rest only by seed.
const FAILURES_SHOWN_MAX: usize = 3;

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    Some(
        v.parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
    )
}

/// A real directory for sled, on tmpfs when there is one (sled flushes on every
/// checkpoint; the simulation is about the log's disk, not sled's).
fn sled_root() -> tempfile::TempDir {
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(d) = tempfile::Builder::new()
            .prefix("eventlog-sim")
            .tempdir_in(shm)
        {
            return d;
        }
    }
    tempfile::Builder::new()
        .prefix("eventlog-sim")
        .tempdir()
        .expect("a temporary directory")
}

/// Keeps the handler's deliberate panics (the publisher catches them) off stderr.
fn quiet_handler_panics() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if info.payload().downcast_ref::<&str>() == Some(&SIM_HANDLER_PANIC) {
            return;
        }
        default_hook(info);
    }));
}

fn run_seed(seed: u64, root: &std::path::Path, verbose: bool) -> Result<SimStats, String> {
    let sled_dir: PathBuf = root.join(format!("seed-{seed}"));
    std::fs::create_dir_all(&sled_dir).map_err(|e| e.to_string())?;
    let config = SimConfig {
        steps_max: STEPS_PER_SEED,
        sled_dir: sled_dir.clone(),
        verbose,
    };
    let mut choices = SimRng::new(seed.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ 0x5eed);
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        scenario::run(seed, &mut choices, &config)
    }));
    let _ = std::fs::remove_dir_all(&sled_dir);
    match outcome {
        Ok(Ok(stats)) => Ok(stats),
        Ok(Err(failure)) => Err(format!(
            "{}\n  last steps:\n    {}",
            failure.message,
            failure.trace.join("\n    ")
        )),
        Err(panic) => Err(format!(
            "panicked: {}",
            panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("?")
        )),
    }
}

/// sled allocates its 2-4 MiB page-table nodes zeroed at every open. Once glibc has seen
/// such blocks freed it raises its mmap threshold above them and then zeroes each one with
/// memset, a quarter of this test's CPU (a seed reopens sled a dozen times). A fixed
/// threshold keeps them on fresh mmaps the kernel zeroes only where touched. This changes
/// how the test process allocates, not what the store does.
fn allocate_large_blocks_by_mmap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; it is called before the workers
    // start and glibc serializes it with allocations anyway.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

#[test]
fn store_survives_crashes_and_faults_over_many_seeds() {
    quiet_handler_panics();
    allocate_large_blocks_by_mmap();
    let root = sled_root();
    let (seeds, verbose) = match env_u64("EVENTLOG_SEED") {
        Some(seed) => (seed..seed + 1, true),
        None => {
            let start = env_u64("EVENTLOG_SIM_SEED_START").unwrap_or(0);
            let n = env_u64("EVENTLOG_SIM_SEEDS").unwrap_or(SEEDS_DEFAULT);
            (start..start + n, false)
        }
    };
    let started = Instant::now();
    let threads = env_u64("EVENTLOG_SIM_THREADS")
        .map(|n| n.max(1) as usize)
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
                .min(THREADS_DEFAULT_MAX)
        });
    // Seeds are independent and deterministic each, so workers take them from a shared
    // counter; which worker runs a seed does not change its run.
    let next_seed = AtomicU64::new(seeds.start);
    let seeds_done = AtomicU64::new(0);
    let failures: Mutex<Vec<(u64, String)>> = Mutex::new(Vec::new());
    let mut total = SimStats::default();
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut stats_worker = SimStats::default();
                    loop {
                        let seed = next_seed.fetch_add(1, Ordering::Relaxed);
                        if seed >= seeds.end {
                            break;
                        }
                        match run_seed(seed, root.path(), verbose) {
                            Ok(stats) => stats_worker.add(&stats),
                            Err(e) => {
                                eprintln!("seed {seed} FAILED: {}", e.lines().next().unwrap_or(""));
                                failures
                                    .lock()
                                    .unwrap_or_else(|p| p.into_inner())
                                    .push((seed, e));
                            }
                        }
                        let done = seeds_done.fetch_add(1, Ordering::Relaxed) + 1;
                        if done.is_multiple_of(PROGRESS_EVERY_SEEDS) {
                            eprintln!(
                                "sim_store: {done} seeds done (from {}) in {:.0?}, {} failed",
                                seeds.start,
                                started.elapsed(),
                                failures.lock().unwrap_or_else(|p| p.into_inner()).len()
                            );
                        }
                    }
                    stats_worker
                })
            })
            .collect();
        for worker in workers {
            total.add(&worker.join().expect("a simulation worker"));
        }
    });
    let mut failures = failures.into_inner().unwrap_or_else(|p| p.into_inner());
    failures.sort_by_key(|(seed, _)| *seed);
    eprintln!(
        "sim_store: seeds {}..{} on {threads} threads in {:.1?}, {} failed\n  {total:?}",
        seeds.start,
        seeds.end,
        started.elapsed(),
        failures.len()
    );
    if !failures.is_empty() {
        let listed: Vec<String> = failures
            .iter()
            .map(|(seed, e)| {
                format!(
                    "seed {seed}: {}  (replay: EVENTLOG_SEED={seed} cargo test --release \
                     --test sim_store)",
                    e.lines().next().unwrap_or("")
                )
            })
            .collect();
        let shown: Vec<String> = failures
            .iter()
            .take(FAILURES_SHOWN_MAX)
            .map(|(seed, e)| format!("seed {seed}: {e}"))
            .collect();
        panic!(
            "{} of {} seeds failed\n{}\n\n{}",
            failures.len(),
            seeds.end - seeds.start,
            listed.join("\n"),
            shown.join("\n\n")
        );
    }
    // The mix must actually exercise what it claims to.
    if seeds.end - seeds.start >= 100 {
        assert!(
            total.power_losses > 0 && total.process_crashes > 0,
            "{total:?}"
        );
        assert!(
            total.appends_acked > 0 && total.appends_failed > 0,
            "{total:?}"
        );
        assert!(total.appends_refused_expected_version > 0, "{total:?}");
        assert!(total.retries_answered_idempotently > 0, "{total:?}");
        assert!(
            total.indexes_deleted > 0 && total.faults_injected > 0,
            "{total:?}"
        );
        assert!(
            total.deliveries > 0 && total.dead_letters_checked > 0,
            "{total:?}"
        );
        assert!(total.writes_refused_after_fsync_failure > 0, "{total:?}");
    }
}

/// The committed seed corpus of the `store_ops` fuzz target (`fuzz/corpus/store_ops/`)
/// replays through the same body as the fuzzer.
#[test]
fn store_ops_fuzz_corpus_replays() {
    quiet_handler_panics();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/store_ops");
    let mut inputs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("a directory entry").path())
        .collect();
    inputs.sort();
    assert!(inputs.len() >= 10, "the seed corpus is missing");
    for input in &inputs {
        let data = std::fs::read(input).expect("a corpus file");
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            scenario::fuzz_store_ops(&data);
        }));
        assert!(outcome.is_ok(), "{} failed (see above)", input.display());
    }
}
