#![no_main]
//! See `flux_outbox::fuzzing::ingest_native` for the properties checked.

libfuzzer_sys::fuzz_target!(|data: &[u8]| flux_outbox::fuzzing::ingest_native(data));
