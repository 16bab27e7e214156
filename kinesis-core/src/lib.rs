//! What the producer, the consumer and the CLI share about the services they call.
//!
//! - [`ErrorClass`]: one classification of Kinesis and DynamoDB error codes (and of SDK errors
//!   that carry no code: timeouts, connection failures), so that a code is retried or not the
//!   same way on every side. Each crate maps the class to its own public error kind.
//! - [`list_shards`]: one ListShards pager, paged the way every endpoint accepts.
//! - [`StreamAddress`]: a stream named by its name or by its ARN, and the request fields each
//!   Kinesis call then carries.

mod errors;
mod shards;
mod stream;

pub use errors::{ErrorClass, ServiceError};
pub use shards::{Shard, StreamSummary, describe_stream, list_shards, list_shards_paged};
pub use stream::{InvalidStream, MAX_STREAM_ARN_CHARS, MAX_STREAM_NAME_CHARS, StreamAddress, StreamArn};
