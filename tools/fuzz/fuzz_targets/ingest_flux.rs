#![no_main]
//! See `flux_outbox::fuzzing::ingest_flux` for the properties checked.

libfuzzer_sys::fuzz_target!(|data: &[u8]| flux_outbox::fuzzing::ingest_flux(data));
