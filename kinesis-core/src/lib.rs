//! What the producer, the consumer and the CLI share about the services they call.
//!
//! - [`ErrorClass`]: one classification of Kinesis and DynamoDB error codes (and of SDK errors
//!   that carry no code: timeouts, connection failures), so that a code is retried or not the
//!   same way on every side. Each crate maps the class to its own public error kind.
//! - [`list_shards`]: one ListShards pager, paged the way every endpoint accepts.

mod errors;
mod shards;

pub use errors::{ErrorClass, ServiceError};
pub use shards::{Shard, list_shards, list_shards_paged};
