//! Errors of the lease table. A lost lease is not one of them: it is [`crate::Outcome::Lost`].
//! `Display` describes this layer only; the cause is in `source()`.

/// Whether trying again can help.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Throttling, a 5xx, a timeout or a connection error: retry later.
    Transient,
    /// The table does not exist.
    NotFound,
    /// A row that is not a valid lease, or a request the service refused as invalid.
    Invalid,
    /// Anything else (access denied, ...).
    Fatal,
}

impl ErrorKind {
    /// Whether trying again can succeed.
    pub fn is_retryable(self) -> bool {
        self == ErrorKind::Transient
    }
}

/// A lease-table call failed.
#[derive(Debug, thiserror::Error)]
#[error("lease table {operation} failed ({kind:?}){}", code.as_deref().map(|c| format!(": {c}")).unwrap_or_default())]
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
    pub(crate) fn new(
        kind: ErrorKind,
        operation: &'static str,
        code: Option<String>,
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        LeaseTableError { kind, operation, code, source }
    }

    pub(crate) fn invalid(operation: &'static str, what: String) -> Self {
        LeaseTableError::new(ErrorKind::Invalid, operation, None, Some(what.into()))
    }
}

/// Classifies a DynamoDB error code.
pub(crate) fn kind_of_code(code: &str) -> ErrorKind {
    match code {
        "ProvisionedThroughputExceededException"
        | "ThrottlingException"
        | "RequestLimitExceeded"
        | "InternalServerError"
        | "ServiceUnavailable"
        | "LimitExceededException" => ErrorKind::Transient,
        "ResourceNotFoundException" => ErrorKind::NotFound,
        "ValidationException" | "SerializationException" => ErrorKind::Invalid,
        _ => ErrorKind::Fatal,
    }
}
