//! Errors of the format crate. `Display` describes this layer; a cause, if any, is in `source()`.

use crate::record::UserRecord;

/// Text that is not a valid explicit hash key (a decimal `0 ..= 2^128-1`), or an inverted range.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid hash key {text:?}: expected a decimal integer from 0 to 2^128-1 without leading zeros")]
pub struct InvalidHashKey {
    text: String,
}

impl InvalidHashKey {
    pub(crate) fn new(text: &str) -> Self {
        // Keep the message one short line even for huge input.
        let text: String = text.chars().take(64).collect();
        InvalidHashKey { text }
    }
}

/// Why a user record cannot be aggregated.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidRecord {
    /// The partition key is empty; Kinesis needs 1 to 256 characters.
    #[error("the partition key is empty; Kinesis needs 1 to 256 characters")]
    EmptyPartitionKey,
    /// The partition key is longer than 256 Unicode characters.
    #[error("the partition key has {chars} characters; Kinesis allows at most 256")]
    PartitionKeyTooLong {
        /// How many characters it has.
        chars: usize,
    },
    /// The record alone makes an aggregate larger than the configured maximum.
    #[error("the record needs an aggregate of {size} bytes, over the maximum of {max}")]
    TooLarge {
        /// The size of an aggregate holding only this record.
        size: usize,
        /// The aggregator's maximum.
        max: usize,
    },
}

/// A user record that the aggregator refused, handed back with the reason.
#[derive(Debug, thiserror::Error)]
#[error("the aggregator refused a user record")]
pub struct PushError {
    #[source]
    reason: InvalidRecord,
    /// Boxed: the error path pays for the allocation, not every `Result`.
    record: Box<UserRecord>,
}

impl PushError {
    pub(crate) fn new(reason: InvalidRecord, record: UserRecord) -> Self {
        PushError { reason, record: Box::new(record) }
    }

    /// Why the record was refused.
    pub fn reason(&self) -> &InvalidRecord {
        &self.reason
    }

    /// The refused record, unchanged.
    pub fn into_record(self) -> UserRecord {
        *self.record
    }
}
