//! Event encoding: decode arbitrary bytes, round-trip built events. See
//! `eventlog::fuzzing::event_decode`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    eventlog::fuzzing::event_decode(data);
});
