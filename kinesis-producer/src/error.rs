//! Errors. `Display` describes this layer only; causes are in `source()`. No SDK type appears in a
//! public variant: SDK errors are classified (see [`ErrorKind`]) and carried as their code.

use kinesis_aggregation::UserRecord;

/// What kind of failure an error is, and so whether trying again can help.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The service refused for throughput (ProvisionedThroughputExceeded, throttling): retry later.
    Throttled,
    /// A failure that may pass (InternalFailure, 5xx, timeout, connection): retry.
    Transient,
    /// The record's time to live ran out before it was delivered.
    Expired,
    /// The input is invalid; it will never be accepted.
    InvalidInput,
    /// The stream does not exist.
    NotFound,
    /// Anything else that trying again cannot fix (access denied, KMS key problems, ...).
    Fatal,
}

impl ErrorKind {
    /// Whether trying again can succeed.
    pub fn is_retryable(self) -> bool {
        matches!(self, ErrorKind::Throttled | ErrorKind::Transient)
    }

    /// Classifies a Kinesis error code (whole-call or per-record), by the classification the
    /// consumer shares ([`kinesis_core::ErrorClass::of_kinesis_code`]).
    pub fn of_code(code: &str) -> ErrorKind {
        ErrorKind::from(kinesis_core::ErrorClass::of_kinesis_code(code))
    }
}

impl From<kinesis_core::ErrorClass> for ErrorKind {
    fn from(class: kinesis_core::ErrorClass) -> Self {
        use kinesis_core::ErrorClass;
        match class {
            ErrorClass::Throttled => ErrorKind::Throttled,
            // An expired iterator is a reader's error; a producer never sees it, and a new call
            // may pass.
            ErrorClass::Transient | ErrorClass::ExpiredIterator => ErrorKind::Transient,
            ErrorClass::NotFound => ErrorKind::NotFound,
            ErrorClass::Invalid => ErrorKind::InvalidInput,
            _ => ErrorKind::Fatal,
        }
    }
}

/// Why `put` refused a record. The record is handed back.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PutErrorReason {
    /// The partition key is empty or longer than 256 characters.
    #[error("the partition key must have 1 to 256 characters")]
    InvalidPartitionKey,
    /// Partition key plus data exceed the stream's record limit (or the buffer's byte cap).
    #[error("the record has {size} bytes (partition key + data), over the limit of {max}")]
    TooLarge {
        /// Partition key + data, in bytes.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The explicit hash key given as text is not a decimal from 0 to 2^128-1.
    #[error("invalid explicit hash key")]
    InvalidExplicitHashKey(#[source] kinesis_aggregation::InvalidHashKey),
    /// The producer is shut down.
    #[error("the producer is shut down")]
    Shutdown,
    /// `try_put` only: the buffer is full.
    #[error("the producer's buffer is full")]
    Full,
    /// `put_to`: the stream is neither a stream name nor a stream ARN.
    #[error(transparent)]
    InvalidStream(kinesis_core::InvalidStream),
    /// `put` or `try_put` on a producer built with [`crate::Producer::multi_stream`], which has
    /// no default stream: name the stream with `put_to`.
    #[error("the producer has no default stream: use put_to")]
    NoDefaultStream,
    /// `put_to` another stream than the one transport of a producer built with
    /// [`crate::Producer::builder_with_transport`].
    #[error("the producer writes through one transport, to its stream only, not to {0}")]
    OtherStream(String),
}

/// A record that `put` / `try_put` refused, handed back with the reason.
#[derive(Debug, thiserror::Error)]
#[error("the producer refused a record")]
pub struct PutError {
    #[source]
    reason: PutErrorReason,
    record: Box<UserRecord>,
}

impl PutError {
    pub(crate) fn new(reason: PutErrorReason, record: UserRecord) -> Self {
        PutError { reason, record: Box::new(record) }
    }

    /// Why the record was refused.
    pub fn reason(&self) -> &PutErrorReason {
        &self.reason
    }

    /// Whether the buffer was full (only `try_put` says so; `put` waits instead).
    pub fn is_full(&self) -> bool {
        matches!(self.reason, PutErrorReason::Full)
    }

    /// The refused record, unchanged.
    pub fn into_record(self) -> UserRecord {
        *self.record
    }
}

/// A buffered record that could not be delivered. The record is handed back.
#[derive(Debug, thiserror::Error)]
#[error("the record was not delivered ({kind:?}{})", code.as_deref().map(|c| format!(", last error {c}")).unwrap_or_default())]
pub struct DeliveryError {
    kind: ErrorKind,
    code: Option<String>,
    message: Option<String>,
    record: Box<UserRecord>,
    attempts: crate::attempt::Attempts,
}

impl DeliveryError {
    pub(crate) fn new(
        kind: ErrorKind,
        code: Option<String>,
        record: UserRecord,
        attempts: crate::attempt::Attempts,
    ) -> Self {
        DeliveryError { kind, code, message: None, record: Box::new(record), attempts }
    }

    pub(crate) fn with_message(mut self, message: Option<String>) -> Self {
        self.message = message;
        self
    }

    /// What the service (or the producer) said about the failure, when there is more than the
    /// code: a ValidationException's text names the limit the record broke.
    pub fn message(&self) -> Option<&str> {
        self.message.as_deref()
    }

    /// Why: [`ErrorKind::Expired`] when the time to live ran out, or the kind of a fatal error.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The last error code from Kinesis, if any.
    pub fn code(&self) -> Option<&str> {
        self.code.as_deref()
    }

    /// Every attempt made to send the record.
    pub fn attempts(&self) -> &[crate::attempt::Attempt] {
        &self.attempts
    }

    /// The undelivered record, unchanged.
    pub fn into_record(self) -> UserRecord {
        *self.record
    }
}

/// An error building or starting a producer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// A configuration value is out of range.
    #[error("invalid producer configuration: {0}")]
    InvalidConfig(String),
    /// The stream is neither a valid stream name nor a valid stream ARN.
    #[error("invalid producer configuration: {0}")]
    InvalidStream(#[from] kinesis_core::InvalidStream),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_are_classified() {
        let table = [
            ("ProvisionedThroughputExceededException", ErrorKind::Throttled, true),
            ("KMSThrottlingException", ErrorKind::Throttled, true),
            ("InternalFailure", ErrorKind::Transient, true),
            ("ServiceUnavailable", ErrorKind::Transient, true),
            ("ResourceNotFoundException", ErrorKind::NotFound, false),
            ("AccessDeniedException", ErrorKind::Fatal, false),
            ("KMSAccessDeniedException", ErrorKind::Fatal, false),
            ("InvalidArgumentException", ErrorKind::InvalidInput, false),
            ("SomethingNew", ErrorKind::Fatal, false),
        ];
        for (code, kind, retryable) in table {
            assert_eq!(ErrorKind::of_code(code), kind, "{code}");
            assert_eq!(ErrorKind::of_code(code).is_retryable(), retryable, "{code}");
        }
    }
}
