//! A KCL-compatible consumer for Amazon Kinesis Data Streams.
//!
//! ```text
//! Scheduler ─▶ lease coordinator (sync shards ─▶ leases, take, renew, steal)
//!           ─▶ one ShardConsumer per held lease ─▶ fetcher ─▶ deaggregate ─▶ processor ─▶ checkpointer
//! ```
//!
//! Workers of one application share a DynamoDB lease table in the KCL 2.x schema ([`LeaseTable`]:
//! every write conditional on the lease counter, a lost condition a value, not an error). Each
//! worker's [`Scheduler`] keeps its leases ([`LeaseCoordinator`]: renew every failover/3, take and
//! steal every 2 x failover, expiry judged by watching counters, never by comparing clocks), and
//! runs one shard consumer per lease: a polling fetcher, deaggregation filtered to the shard's hash
//! range, a [`Processor`] with the KCL's lifecycle, and a [`Checkpointer`] fenced by the lease.
//!
//! Retries, in one place: the SDK clients handed in retry single calls as they are configured.
//! This crate retries GetRecords and GetShardIterator (throttled or transient) with exponential
//! backoff for as long as the lease is held; a failed renewal is tried again the next round; a
//! failed checkpoint is returned to the processor ([`CheckpointError`]), which decides.
//!
//! [`Scheduler::metrics`] gives a [`MetricsSnapshot`]. With the feature `metrics`, the `exporter`
//! module publishes snapshots to the [`metrics`](https://docs.rs/metrics) crate's facade under the
//! KCL's names (`RecordsProcessed`, `MillisBehindLatest` per shard, ...) and CloudWatch's
//! `GetRecords.IteratorAgeMilliseconds`.

mod batches;
mod checkpointer;
pub mod coordinator;
mod error;
#[cfg(feature = "metrics")]
pub mod exporter;
mod failure;
mod fan_out;
mod fetcher;
mod handed_out;
mod held;
mod kinesis;
mod latest;
pub mod lease;
mod lease_table;
mod metrics;
pub mod planner;
mod processor;
mod record;
mod scheduler;
mod shard_consumer;
pub mod shard_sync;

pub use batches::{Batches, ShardBatch};
pub use checkpointer::Checkpointer;
pub use coordinator::{CoordinatorConfig, LeaseCoordinator};
pub use error::{CheckpointError, ConfigError, ErrorKind, KinesisError, LeaseTableError, SchedulerError};
pub use failure::{DestinationError, FailedRecords, FailedRecordsFile, FailedRecordsStream, FailurePolicy, OnFailure};
pub use fan_out::{FanOutConfig, Retrieval};
pub use fetcher::PollingConfig;
pub use held::HeldLease;
pub use kinesis::Shard;
pub use lease::{Checkpoint, Lease, Position};
pub use lease_table::{LeaseTable, Outcome};
pub use metrics::MetricsSnapshot;
pub use processor::{Initialization, Processor, ProcessorFactory};
pub use record::{Batch, Record, cmp_sequence_numbers};
pub use scheduler::{Scheduler, SchedulerConfig};
pub use shard_consumer::ShardConsumerState;
pub use shard_sync::InitialPosition;
