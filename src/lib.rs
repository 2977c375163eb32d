//! flux-outbox: a durable write-ahead outbox worker that delivers entity property updates from
//! an edge gateway to Flux. See ARCHITECTURE.md for the bird's-eye view and the code map.

pub mod model;
pub mod sim;
