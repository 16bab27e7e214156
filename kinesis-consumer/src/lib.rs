//! A KCL-compatible consumer for Amazon Kinesis Data Streams.
//!
//! ```text
//! Scheduler ─▶ lease coordinator (sync shards ─▶ leases, take, renew, steal)
//!           ─▶ one ShardConsumer per held lease ─▶ fetcher ─▶ deaggregate ─▶ processor ─▶ checkpointer
//! ```
//!
//! Landed so far: the lease table in the KCL 2.x schema ([`LeaseTable`]: every write conditional,
//! a lost condition a value, not an error), the lease planner ([`planner`]: which leases to take
//! or steal, judged by watching lease counters locally, never by comparing clocks), and a worker's
//! [`LeaseCoordinator`] (renew and take rounds, release on shutdown). The scheduler, shard
//! consumers and checkpointer build on them.

pub mod coordinator;
mod error;
pub mod lease;
mod lease_table;
pub mod planner;

pub use coordinator::{CoordinatorConfig, LeaseCoordinator};
pub use error::{ErrorKind, LeaseTableError};
pub use lease::{Checkpoint, Lease, Position};
pub use lease_table::{LeaseTable, Outcome};
