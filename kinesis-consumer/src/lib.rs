//! A KCL-compatible consumer for Amazon Kinesis Data Streams.
//!
//! The modules follow the data flow: `scheduler` (one worker: its handle, settings and task),
//! `leases` (the lease table, its rows, the leases held and renewed, the shard sync),
//! `assignment` (who processes which lease), `lifecycle` (one shard's consumer, a function per
//! state), `retrieval` (polling or fan-out), then the processor's side: `record`, `checkpointer`,
//! `failure` (the poison-record policy), `batches` (the records as a `Stream`), and `streams`
//! (many streams, one application: the KCL's multi-stream mode).
//!
//! ```text
//! Scheduler ─▶ lease coordinator (sync shards ─▶ leases, take, renew, steal)
//!           ─▶ one ShardConsumer per held lease ─▶ fetcher ─▶ deaggregate ─▶ processor ─▶ checkpointer
//! ```
//!
//! Workers of one application share a DynamoDB lease table in the KCL 2.x schema ([`LeaseTable`]:
//! every write conditional on the lease counter, a lost condition a value, not an error). Each
//! worker's [`Scheduler`] keeps its leases (renew every failover/3, take and steal every
//! 2 x failover, expiry judged by watching counters, never by comparing clocks), and
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

/// `pub` with the feature `test-util` (so that integration tests can set a lease table up as a
/// worker would leave it), `pub(crate)` otherwise: not a promise of the public API.
macro_rules! test_util_pub {
    ($(#[$attr:meta])* async fn $name:ident $($rest:tt)*) => {
        #[cfg(feature = "test-util")]
        $(#[$attr])*
        pub async fn $name $($rest)*
        #[cfg(not(feature = "test-util"))]
        $(#[$attr])*
        pub(crate) async fn $name $($rest)*
    };
    ($(#[$attr:meta])* fn $name:ident $($rest:tt)*) => {
        #[cfg(feature = "test-util")]
        $(#[$attr])*
        pub fn $name $($rest)*
        #[cfg(not(feature = "test-util"))]
        $(#[$attr])*
        pub(crate) fn $name $($rest)*
    };
}

mod assignment;
mod batches;
mod checkpointer;
mod error;
#[cfg(feature = "metrics")]
pub mod exporter;
mod failure;
mod leader;
mod leases;
mod lifecycle;
mod metrics;
mod processor;
mod record;
mod retrieval;
mod scheduler;
mod streams;
#[cfg(feature = "test-util")]
pub mod test_util;
mod worker_metrics;

pub use assignment::{AssignmentStrategy, UtilisationConfig};
pub use batches::{Batches, ShardBatch};
pub use checkpointer::{Checkpointer, PreparedCheckpoint};
pub use error::{CheckpointError, ConfigError, ErrorKind, KinesisError, LeaseTableError, SchedulerError};
pub use failure::{DestinationError, FailedRecords, FailedRecordsFile, FailedRecordsStream, FailurePolicy, OnFailure};
pub use kinesis_core::{InvalidStream, StreamAddress, StreamArn};
pub use leases::lease::{Checkpoint, Lease, Position};
pub use leases::shard_sync::InitialPosition;
pub use leases::table::LeaseTable;
pub use lifecycle::ShardConsumerState;
pub use metrics::MetricsSnapshot;
pub use processor::{Initialization, Processor, ProcessorFactory, ShardInfo};
pub use record::{Batch, Record, cmp_sequence_numbers};
pub use retrieval::fan_out::{FanOutConfig, Retrieval};
pub use retrieval::polling::PollingConfig;
pub use scheduler::{LeaseManagement, Scheduler, SchedulerConfig};
pub use streams::{FormerStreams, StreamConfig, StreamIdentifier, StreamTracker, TrackerError};
pub use worker_metrics::cpu::CpuSource;
