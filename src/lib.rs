//! flux-outbox: a durable write-ahead outbox worker that delivers entity property updates from
//! an edge gateway to Flux. See ARCHITECTURE.md for the bird's-eye view and the code map.

pub mod compactor;
pub mod model;
pub mod record;
pub mod store;
pub mod metrics;
pub mod admin;
pub mod app;
pub mod flusher;
pub mod ingest;
pub mod signals;
