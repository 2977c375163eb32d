#![no_main]
//! See `flux_outbox::fuzzing::record_decode` for the properties checked.

libfuzzer_sys::fuzz_target!(|data: &[u8]| flux_outbox::fuzzing::record_decode(data));
