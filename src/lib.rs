//! flux-outbox: a durable write-ahead outbox worker that delivers entity property updates from
//! an edge gateway to Flux. See ARCHITECTURE.md for the bird's-eye view and the code map.

pub mod config;
pub mod ingest_parse;
pub mod model;
pub mod validate;
