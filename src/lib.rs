//! Amazon Kinesis Data Streams for Rust: the facade of the workspace.
//!
//! - [`aggregation`]: the KPL aggregated-record format (re-export of `kinesis-aggregation`).
//! - [`cli`]: the command-line tools' logic (`kinesis-agg`), kept in the library so that every
//!   binary shares one implementation.
//!
//! The producer (`kinesis-producer`) and the consumer (`kinesis-consumer`) join as their crates land.
//!
//! The README follows, as the front page; its examples are compiled as doc-tests.
#![doc = include_str!("../README.md")]

pub use kinesis_aggregation as aggregation;

pub mod cli;
