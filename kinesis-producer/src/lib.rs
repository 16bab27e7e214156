//! A KPL-class producer for Amazon Kinesis Data Streams: shard-aware aggregation, batching, per-shard
//! rate limiting, retries with backoff until a time to live, a receipt for every record, and bounded
//! memory.
//!
//! ```text
//! put ─▶ bounded inbox ─▶ shard map ─▶ per-shard aggregator ─▶ per-shard rate limiter
//!     ─▶ collector (500 entries / 5 MiB) ─▶ sender ─▶ retrier (back to the shard map) ─▶ receipt
//! ```
//!
//! - `put(record).await` returns once the record is buffered (it waits while the buffer is full:
//!   back-pressure), giving a [`ReceiptFuture`]; `try_put` returns `Full` instead of waiting.
//! - One producer puts to any number of streams (`put_to(stream, record)`, a name or an ARN), as
//!   one KPL instance does: a pipeline a stream, sharing the buffer caps, the calls in flight and
//!   the metrics registry.
//! - Records are aggregated in the KPL format per **predicted** shard (ListShards hash ranges + MD5
//!   of the partition key, or the explicit hash key), so every aggregate holds only records of the
//!   shard it lands on. A lone record is sent plain, as the KPL does.
//! - A per-record failure (ProvisionedThroughputExceeded, InternalFailure) or a retryable whole-call
//!   failure sends the records back through routing and aggregation with exponential backoff and
//!   jitter; a throttled shard empties its own token buckets and slows alone. Records keep their
//!   deadline (RecordTtl, 30 s): past it, the receipt fails with [`ErrorKind::Expired`] and hands
//!   the record back. The SDK's own retries are off; see [`transport`] for who retries what.
//! - Bad input (an empty or over-256-character partition key, a record over the stream's record
//!   limit, an explicit hash key given as text that is not a decimal in 0..2^128, a put after
//!   shutdown) fails at `put` with a [`PutError`] that hands the record back.
//! - [`Producer::metrics`] gives a [`MetricsSnapshot`] under the KPL's names. With the feature
//!   `metrics`, the `exporter` module publishes snapshots to the [`metrics`](https://docs.rs/metrics)
//!   crate's facade, with the CloudWatch stream metrics they stand for (`IncomingRecords`,
//!   `PutRecords.Success`, ...).

mod attempt;
mod batch;
mod config;
mod confirm;
mod engine;
mod entry;
mod error;
#[cfg(feature = "metrics")]
pub mod exporter;
pub mod memory;
mod metrics;
mod pending;
mod producer;
mod rate_limit;
mod receipt;
mod sender;
mod streams;
pub mod transport;

pub use attempt::{Attempt, Attempts};
pub use config::{ProducerConfig, RECORD_OVERHEAD_BYTES};
pub use error::{BuildError, DeliveryError, ErrorKind, PutError, PutErrorReason};
pub use kinesis_aggregation::{HashKey, UserRecord};
pub use kinesis_core::{InvalidStream, StreamAddress, StreamArn};
pub use memory::{Faults, MemoryTransport, StoredRecord};
pub use metrics::MetricsSnapshot;
pub use producer::{Producer, ProducerBuilder};
pub use receipt::{Receipt, ReceiptFuture};
pub use transport::{CallError, EntryResult, KinesisTransport, PutEntry, ShardDescription, StreamLimits, Transport};
