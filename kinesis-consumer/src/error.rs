//! The consumer's errors, classified before any SDK error is boxed. A lost lease is not one of
//! them: it is [`crate::Outcome::Lost`] in the lease table, and [`CheckpointError::LeaseLost`] at a
//! checkpoint. `Display` describes this layer only; the cause is in `source()`.

/// Whether trying again can help.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The service refused for throughput (a shard's read limit, a table's capacity): retry
    /// later, more slowly.
    Throttled,
    /// A 5xx, a timeout or a connection error: retry later.
    Transient,
    /// A shard iterator expired (they live 5 minutes): get a new one.
    Expired,
    /// The table or the stream does not exist.
    NotFound,
    /// A row that is not a valid lease, or a request the service refused as invalid.
    Invalid,
    /// Anything else (access denied, ...).
    Fatal,
}

impl ErrorKind {
    /// Whether trying the same call again can succeed.
    pub fn is_retryable(self) -> bool {
        matches!(self, ErrorKind::Throttled | ErrorKind::Transient)
    }
}

use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};

type Source = Option<Box<dyn std::error::Error + Send + Sync>>;

fn code_suffix(code: &Option<String>) -> String {
    code.as_deref().map(|c| format!(": {c}")).unwrap_or_default()
}

/// A lease-table call failed.
#[derive(Debug, thiserror::Error)]
#[error("lease table {operation} failed ({kind:?}){}", code_suffix(code))]
pub struct LeaseTableError {
    /// What kind of failure, and so whether to retry.
    pub kind: ErrorKind,
    /// The call: "CreateTable", "Scan", "PutItem", "UpdateItem", ...
    pub operation: &'static str,
    /// The service's error code, when it gave one.
    pub code: Option<String>,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl LeaseTableError {
    pub(crate) fn new(kind: ErrorKind, operation: &'static str, code: Option<String>, source: Source) -> Self {
        LeaseTableError { kind, operation, code, source }
    }

    pub(crate) fn invalid(operation: &'static str, what: String) -> Self {
        LeaseTableError::new(ErrorKind::Invalid, operation, None, Some(what.into()))
    }
}

/// A Kinesis call failed.
#[derive(Debug, thiserror::Error)]
#[error("Kinesis {operation} failed ({kind:?}){}", code_suffix(code))]
pub struct KinesisError {
    /// What kind of failure, and so whether to retry.
    pub kind: ErrorKind,
    /// The call: "ListShards", "GetShardIterator", "GetRecords".
    pub operation: &'static str,
    /// The service's error code, when it gave one.
    pub code: Option<String>,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl KinesisError {
    pub(crate) fn new(kind: ErrorKind, operation: &'static str, code: Option<String>, source: Source) -> Self {
        KinesisError { kind, operation, code, source }
    }
}

/// A checkpoint was not recorded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CheckpointError {
    /// The lease is no longer this worker's: another worker took it, its row is gone, or it
    /// could not be renewed in time. This checkpoint was not written; the new owner's progress
    /// stands. Stop processing the shard. (An earlier checkpoint that failed with
    /// [`CheckpointError::Table`] may have been written: a lost answer is not a lost write. A
    /// write whose answer was lost is no reason for this error: the next write finds the row
    /// still names this worker, and goes on.)
    #[error("the lease of shard {shard_id} is no longer this worker's; this checkpoint was not written")]
    LeaseLost {
        /// The shard.
        shard_id: String,
    },
    /// The position is not one this processor may record: not a sequence number, beyond the
    /// records delivered, or before the checkpoint already recorded.
    #[error("cannot checkpoint shard {shard_id} at {position}: {reason}")]
    InvalidPosition {
        /// The shard.
        shard_id: String,
        /// The position asked for.
        position: String,
        /// Why not.
        reason: &'static str,
    },
    /// Writing to the lease table failed; the lease is still held, so trying again can succeed
    /// when the error is retryable. The write may have been applied (a timeout, a reset
    /// connection): writing the same checkpoint again is harmless.
    #[error("checkpointing shard {shard_id} failed")]
    Table {
        /// The shard.
        shard_id: String,
        /// The lease-table error.
        #[source]
        source: LeaseTableError,
    },
}

impl CheckpointError {
    /// Whether the lease is lost (stop processing), as opposed to a bad position or a failed write.
    pub fn is_lease_lost(&self) -> bool {
        matches!(self, CheckpointError::LeaseLost { .. })
    }
}

/// A scheduler's settings are not usable.
#[derive(Debug, thiserror::Error)]
#[error("invalid consumer configuration: {field} {problem}")]
pub struct ConfigError {
    /// The setting.
    pub field: &'static str,
    /// What is wrong with it.
    pub problem: String,
}

/// A scheduler stopped on an error it cannot work around.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SchedulerError {
    /// The lease table could not be created or read.
    #[error("the lease table is not usable")]
    LeaseTable(#[source] LeaseTableError),
    /// The stream's shards could not be listed.
    #[error("the stream's shards could not be listed")]
    Kinesis(#[source] KinesisError),
    /// The scheduler task panicked or was aborted.
    #[error("the scheduler task ended abnormally: {0}")]
    Task(String),
}

impl From<kinesis_core::ErrorClass> for ErrorKind {
    fn from(class: kinesis_core::ErrorClass) -> Self {
        use kinesis_core::ErrorClass;
        match class {
            ErrorClass::Throttled => ErrorKind::Throttled,
            ErrorClass::Transient => ErrorKind::Transient,
            ErrorClass::ExpiredIterator => ErrorKind::Expired,
            ErrorClass::NotFound => ErrorKind::NotFound,
            ErrorClass::Invalid => ErrorKind::Invalid,
            _ => ErrorKind::Fatal,
        }
    }
}

/// Classifies an SDK error before it is boxed, by the classification the producer shares
/// ([`kinesis_core::ErrorClass`]), with `of_code` for its service's codes.
pub(crate) fn classify_sdk<E, R>(
    error: &SdkError<E, R>,
    of_code: fn(&str) -> kinesis_core::ErrorClass,
) -> (ErrorKind, Option<String>)
where
    E: ProvideErrorMetadata,
{
    let (class, code) = kinesis_core::ErrorClass::of_sdk_error(error, of_code);
    (class.into(), code)
}

/// Classifies a DynamoDB SDK error of `operation` (lease table, leader lock, worker metrics)
/// before it is boxed.
pub(crate) fn dynamodb_error<E, R>(operation: &'static str, error: SdkError<E, R>) -> LeaseTableError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    let (kind, code) = classify_sdk(&error, kinesis_core::ErrorClass::of_dynamodb_code);
    LeaseTableError::new(kind, operation, code, Some(Box::new(error)))
}

impl From<kinesis_core::ServiceError> for KinesisError {
    fn from(error: kinesis_core::ServiceError) -> Self {
        let (kind, operation, code) = (error.class.into(), error.operation, error.code.clone());
        let message = error.message.clone();
        let source = error.into_source().unwrap_or_else(|| message.into());
        KinesisError::new(kind, operation, code, Some(source))
    }
}
