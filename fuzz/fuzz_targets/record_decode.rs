//! Record framing: decode at every offset, scan, walk. See `eventlog::fuzzing::record_decode`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    eventlog::fuzzing::record_decode(data);
});
