//! Arbitrary operation sequences with crashes and faults through the simulated disk. See
//! `eventlog::testing::scenario::fuzz_store_ops`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    eventlog::testing::scenario::fuzz_store_ops(data);
});
