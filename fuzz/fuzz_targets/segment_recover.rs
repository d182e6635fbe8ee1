//! Recovery of an arbitrary segment file. See `eventlog::fuzzing::segment_recover`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    eventlog::fuzzing::segment_recover(data);
});
