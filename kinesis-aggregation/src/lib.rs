//! The KPL aggregated-record format of Amazon Kinesis Data Streams: encode, decode, hash keys, limits.
//!
//! This crate does no I/O. The producer aggregates with it, the consumer deaggregates with it, and
//! the `kinesis-agg` command-line tool wraps both.
//!
//! An aggregated record is `F3 89 9A C2` ++ protobuf `AggregatedRecord` ++ MD5(protobuf):
//!
//! ```text
//!   user records ──try_push──▶ Aggregator ──finish──▶ KinesisRecord { "a", hash key of the first, data }
//!                                                                  │
//!   DeaggregatedRecord × n ◀──deaggregate── (partition key, data) ◀┘  (plain records pass through)
//! ```
//!
//! - [`Aggregator`] packs user records with exact sizing up to a maximum (51,200 bytes by default,
//!   the KPL's), handing back the record that does not fit ([`TryPush::NoCapacity`]).
//! - [`deaggregate`] / [`Deaggregator`] follow the KCL: anything that is not a valid aggregate is
//!   handed over whole as one record; sub-records get sub-sequence numbers from 0.
//! - [`hash_key`], [`HashKey`], [`HashKeyRange`] and [`ShardRanges`] route records to shards.
//! - [`compression`]: the opt-in compressed form (`F3 89 9A C3` ++ zlib) that only this library
//!   reads; [`deaggregate`] inflates it first.
//! - `lambda` (feature `lambda`): the user records of an AWS Lambda Kinesis event, and the partial
//!   batch response naming a failed one.

mod aggregator;
pub mod compression;
mod deaggregate;
mod error;
mod hash;
#[cfg(feature = "lambda")]
pub mod lambda;
pub mod limits;
pub mod proto;
mod record;

pub use aggregator::{Aggregator, AggregatorConfig, TryPush};
pub use deaggregate::{Corruption, Deaggregated, Deaggregator, Outcome, deaggregate};
pub use error::{InvalidHashKey, InvalidRecord, PushError};
pub use hash::{HashKey, HashKeyRange, OverlappingRanges, ShardRanges, hash_key};
pub use record::{DeaggregatedRecord, KinesisRecord, UserRecord, validate_partition_key};
