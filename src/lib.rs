//! Amazon Kinesis Data Streams for Rust: the facade of the workspace.
//!
//! - [`aggregation`]: the KPL aggregated-record format (re-export of `kinesis-aggregation`).
//! - [`producer`]: the KPL-class producer (re-export of `kinesis-producer`).
//! - [`consumer`]: the KCL-compatible consumer (re-export of `kinesis-consumer`).
//!
//! The command-line tools (`kinesis`, `kinesis-agg`) live in the `kinesis-cli` crate.
//!
//! The README follows, as the front page; its examples are compiled as doc-tests.
#![doc = include_str!("../README.md")]

pub use kinesis_aggregation as aggregation;
pub use kinesis_consumer as consumer;
pub use kinesis_producer as producer;
