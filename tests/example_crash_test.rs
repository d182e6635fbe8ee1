//! Runs the check loop of `examples/crash_test.rs` (a bank application crash-testing its
//! own invariants on the simulated disk) for a few seeds, so that `cargo test` keeps the
//! example working. More seeds: `cargo run --release --example crash_test -- --seeds 2000`.

#[allow(dead_code)] // the example's `main` is not called here
#[path = "../examples/crash_test.rs"]
mod example;

#[test]
fn bank_invariants_hold_across_simulated_crashes() {
    let summary = example::run_seeds(0..30).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(summary.seeds, 30);
    assert!(summary.crashes >= 60, "{summary:?}");
    // The run exercised what it claims to: in-doubt appends both ways, version conflicts
    // and a full disk.
    assert!(
        summary.in_doubt_landed > 0 && summary.in_doubt_lost > 0,
        "{summary:?}"
    );
    assert!(
        summary.conflicts > 0 && summary.disk_full > 0,
        "{summary:?}"
    );
    assert!(summary.events_checked > 1_000, "{summary:?}");
}
