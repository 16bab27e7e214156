//! One classification of service error codes.
//!
//! Sources: the error lists of the Kinesis Data Streams and DynamoDB API references ("Common
//! Errors" and each action's "Errors"), and the AWS SDKs' retry rules (throttling codes retried
//! with backoff, 5xx and connection failures retried, everything else not).

use aws_sdk_kinesis::error::{ProvideErrorMetadata, SdkError};

/// What kind of failure a service error is, and so whether trying again can help.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorClass {
    /// The service refused for throughput (a shard's limits, a table's capacity, an account's
    /// request rate): retry later, more slowly.
    Throttled,
    /// A 5xx, a timeout, a connection failure, a resource busy changing state: retry later.
    Transient,
    /// A shard iterator expired (they live 5 minutes): get a new one.
    ExpiredIterator,
    /// The stream, table, shard or consumer does not exist.
    NotFound,
    /// The request was refused as invalid: trying it again as it is cannot succeed.
    Invalid,
    /// Anything else (access denied, KMS key problems, ...): trying again cannot help.
    Fatal,
}

impl ErrorClass {
    /// Whether trying the same call again can succeed.
    pub fn is_retryable(self) -> bool {
        matches!(self, ErrorClass::Throttled | ErrorClass::Transient)
    }

    /// Classifies a Kinesis error code (a whole call's, or a PutRecords entry's `ErrorCode`).
    pub fn of_kinesis_code(code: &str) -> ErrorClass {
        match code {
            "ProvisionedThroughputExceededException"
            | "ThrottlingException"
            | "Throttling"
            | "LimitExceededException"
            | "RequestLimitExceeded"
            | "KMSThrottlingException" => ErrorClass::Throttled,
            "InternalFailure"
            | "InternalFailureException"
            | "InternalServerError"
            | "ServiceUnavailable"
            | "ServiceUnavailableException"
            | "ResourceInUseException" => ErrorClass::Transient,
            "ExpiredIteratorException" => ErrorClass::ExpiredIterator,
            "ResourceNotFoundException" => ErrorClass::NotFound,
            "InvalidArgumentException"
            | "ValidationException"
            | "SerializationException"
            | "ExpiredNextTokenException" => ErrorClass::Invalid,
            _ => ErrorClass::Fatal,
        }
    }

    /// Classifies a DynamoDB error code.
    pub fn of_dynamodb_code(code: &str) -> ErrorClass {
        match code {
            "ProvisionedThroughputExceededException"
            | "ThrottlingException"
            | "Throttling"
            | "RequestLimitExceeded"
            | "LimitExceededException" => ErrorClass::Throttled,
            "InternalServerError"
            | "InternalFailure"
            | "ServiceUnavailable"
            | "ServiceUnavailableException"
            | "TransactionInProgressException"
            | "ResourceInUseException" => ErrorClass::Transient,
            "ResourceNotFoundException" => ErrorClass::NotFound,
            "ValidationException" | "SerializationException" => ErrorClass::Invalid,
            _ => ErrorClass::Fatal,
        }
    }

    /// Classifies an SDK error: a service error by its code (`of_code`), one without a code (an
    /// answer from something in between, a proxy's 503 page) as transient, a request that could not be built as invalid, and the rest (timeouts, dispatch and
    /// connection failures, unreadable answers) as transient. Also returns the code.
    pub fn of_sdk_error<E, R>(error: &SdkError<E, R>, of_code: fn(&str) -> ErrorClass) -> (ErrorClass, Option<String>)
    where
        E: ProvideErrorMetadata,
    {
        let code = error.code().map(str::to_owned);
        let class = match (error, code.as_deref()) {
            (SdkError::ServiceError(_), Some(code)) => of_code(code),
            (SdkError::ServiceError(_), None) => ErrorClass::Transient,
            (SdkError::ConstructionFailure(_), _) => ErrorClass::Invalid,
            _ => ErrorClass::Transient,
        };
        (class, code)
    }
}

/// A failed service call, classified before the SDK error is boxed. `Display` names the call,
/// the class and the code; the SDK error is the `source()`.
#[derive(Debug, thiserror::Error)]
#[error("{operation} failed ({class:?}){}", code.as_deref().map(|c| format!(": {c}")).unwrap_or_default())]
pub struct ServiceError {
    /// Whether and how to retry.
    pub class: ErrorClass,
    /// The call, e.g. "ListShards".
    pub operation: &'static str,
    /// The service's error code, when it gave one.
    pub code: Option<String>,
    /// The service's message, or a description of what went wrong.
    pub message: String,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl ServiceError {
    /// Classifies a Kinesis SDK error of `operation`.
    pub fn kinesis<E, R>(operation: &'static str, error: SdkError<E, R>) -> Self
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
        R: std::fmt::Debug + Send + Sync + 'static,
    {
        Self::of(operation, error, ErrorClass::of_kinesis_code)
    }

    /// Classifies an SDK error of `operation` with `of_code` for its service's codes (a DynamoDB
    /// error is an `SdkError` of the same type family).
    pub fn of<E, R>(operation: &'static str, error: SdkError<E, R>, of_code: fn(&str) -> ErrorClass) -> Self
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
        R: std::fmt::Debug + Send + Sync + 'static,
    {
        let (class, code) = ErrorClass::of_sdk_error(&error, of_code);
        let message = match &error {
            SdkError::ServiceError(e) => e.err().message().unwrap_or("service error").to_owned(),
            other => format!("{other:?}").chars().take(300).collect(),
        };
        ServiceError { class, operation, code, message, source: Some(Box::new(error)) }
    }

    /// An answer that cannot be right (a shard without a hash-key range, a page that repeats).
    pub fn invalid_answer(operation: &'static str, message: String) -> Self {
        ServiceError { class: ErrorClass::Invalid, operation, code: None, message, source: None }
    }

    /// Takes the SDK error out (for a caller that keeps its own boxed source).
    pub fn into_source(self) -> Option<Box<dyn std::error::Error + Send + Sync>> {
        self.source
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_classified_the_same_for_every_caller() {
        use ErrorClass::*;
        #[rustfmt::skip]
        let kinesis = [
            ("ProvisionedThroughputExceededException", Throttled), ("LimitExceededException", Throttled),
            ("KMSThrottlingException", Throttled), ("ThrottlingException", Throttled),
            ("InternalFailure", Transient), ("ServiceUnavailable", Transient),
            ("ServiceUnavailableException", Transient), ("ResourceInUseException", Transient),
            ("ExpiredIteratorException", ExpiredIterator), ("ResourceNotFoundException", NotFound),
            ("InvalidArgumentException", Invalid), ("ValidationException", Invalid),
            ("AccessDeniedException", Fatal), ("KMSAccessDeniedException", Fatal), ("KMSDisabledException", Fatal),
        ];
        for (code, class) in kinesis {
            assert_eq!(ErrorClass::of_kinesis_code(code), class, "Kinesis {code}");
        }
        #[rustfmt::skip]
        let dynamodb = [
            ("ProvisionedThroughputExceededException", Throttled), ("ThrottlingException", Throttled),
            ("RequestLimitExceeded", Throttled), ("LimitExceededException", Throttled),
            ("InternalServerError", Transient), ("ServiceUnavailable", Transient),
            ("ServiceUnavailableException", Transient), ("ResourceInUseException", Transient),
            ("ResourceNotFoundException", NotFound), ("ValidationException", Invalid),
            ("AccessDeniedException", Fatal), ("ConditionalCheckFailedException", Fatal),
        ];
        for (code, class) in dynamodb {
            assert_eq!(ErrorClass::of_dynamodb_code(code), class, "DynamoDB {code}");
        }
        assert!(Throttled.is_retryable() && Transient.is_retryable());
        assert!(!ExpiredIterator.is_retryable() && !NotFound.is_retryable() && !Fatal.is_retryable());
    }
}
