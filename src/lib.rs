//! flux-outbox: a durable write-ahead outbox worker that delivers entity property updates from
//! an edge gateway to Flux. See ARCHITECTURE.md for the bird's-eye view and the code map.

pub mod admin;
pub mod app;
pub mod child;
pub mod compactor;
pub mod config;
pub mod demo;
pub mod flusher;
pub mod flux_client;
#[doc(hidden)]
pub mod fuzzing;
pub mod heartbeat;
pub mod ingest;
pub mod ingest_parse;
pub mod mapper;
pub mod merge;
pub mod metrics;
pub mod model;
pub mod read_through;
pub mod record;
pub mod signals;
pub mod sim;
pub mod source_ws;
pub mod store;
pub mod validate;
pub mod watchdog;
