//! What the three kill tests (`tests/kill.rs`, `tests/kill_store.rs`,
//! `tests/kill_publisher.rs`) share: the `harness = false` prologue that speaks cargo
//! test's language (`--list`, name filters, the closing line), the seed, and a small
//! seeded generator. Each test includes it with `#[path = "kill_harness/mod.rs"] mod`.

use std::time::Instant;

/// Env var that sets the number of kill cycles.
pub const ENV_CYCLES: &str = "EVENTLOG_KILL_CYCLES";
/// Env var that replays one run's random choices.
pub const ENV_SEED: &str = "EVENTLOG_KILL_SEED";

/// SplitMix64: spreads a seed over all bits.
pub fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// xorshift64*: small, seeded, no dependency.
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(splitmix(seed) | 1)
    }

    /// The next 64 random bits.
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    /// True with `percent` % probability.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// A number from the environment; a malformed one is a test setup error.
pub fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    match v.trim().parse() {
        Ok(n) => Some(n),
        Err(e) => panic!("{name}={v:?} is not a number: {e}"),
    }
}

/// A run that is going ahead: when it started, its seed and its cycles.
pub struct Run {
    /// When the test started.
    pub started: Instant,
    /// The seed of its random choices (`EVENTLOG_KILL_SEED`, or from the clock).
    pub seed: u64,
    /// Kill cycles (`EVENTLOG_KILL_CYCLES`, or `cycles_default`).
    pub cycles: u64,
}

/// Answers `--list` and name filters as cargo test would, printing what it prints; returns
/// `None` when the test is not to run, else its seed and cycle count.
pub fn begin(test_name: &str, cycles_default: u64) -> Option<Run> {
    let mut list = false;
    let mut ignored_only = false;
    let mut filters = Vec::new();
    for a in std::env::args().skip(1) {
        match a.as_str() {
            "--list" => list = true,
            "--ignored" => ignored_only = true,
            s if s.starts_with('-') => {}
            s => filters.push(s.to_string()),
        }
    }
    if list {
        println!("{test_name}: test");
        return None;
    }
    println!();
    let name_matches = filters.is_empty() || filters.iter().any(|f| test_name.contains(f.as_str()));
    if ignored_only || !name_matches {
        println!("running 0 tests");
        println!();
        println!("test result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 1 filtered out; finished in 0.00s");
        println!();
        return None;
    }
    println!("running 1 test");
    let started = Instant::now();
    let cycles = env_u64(ENV_CYCLES).unwrap_or(cycles_default);
    let seed = env_u64(ENV_SEED).unwrap_or_else(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        splitmix(nanos ^ u64::from(std::process::id()))
    });
    Some(Run {
        started,
        seed,
        cycles,
    })
}
