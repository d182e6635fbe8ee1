//! Index key and value layouts: decode arbitrary bytes, round-trip built keys. See
//! `eventlog::fuzzing::index_key_decode`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    eventlog::fuzzing::index_key_decode(data);
});
