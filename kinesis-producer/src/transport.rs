//! The seam between the pipeline and Kinesis: two calls, PutRecords and ListShards.
//!
//! [`KinesisTransport`] is the real one, over `aws_sdk_kinesis::Client`. Tests and benchmarks can
//! plug in another [`Transport`] (an in-memory sink, a fault injector) without touching the
//! pipeline.
//!
//! **Who retries what.** The SDK's own retries are turned off for these calls
//! (`RetryConfig::disabled()`): the producer is the single retry layer. A whole-call failure that
//! can pass (throttling, 5xx, timeout, connection error) sends every record of the call back into
//! the pipeline with backoff; a per-record failure (ProvisionedThroughputExceeded, InternalFailure)
//! does the same for that record only. Either way a record keeps its original deadline (RecordTtl).

use std::future::Future;
use std::pin::Pin;

use aws_sdk_kinesis::config::retry::RetryConfig;
use aws_sdk_kinesis::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use bytes::Bytes;
use kinesis_aggregation::{HashKey, HashKeyRange};
use kinesis_core::StreamAddress;

use crate::error::ErrorKind;

/// A boxed future, as the transport returns.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// One entry of a PutRecords call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PutEntry {
    /// The entry's partition key.
    pub partition_key: String,
    /// The entry's explicit hash key.
    pub explicit_hash_key: Option<HashKey>,
    /// The entry's data.
    pub data: Bytes,
}

/// The outcome of one entry of a PutRecords call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EntryResult {
    /// Stored.
    Stored {
        /// The shard that stored it.
        shard_id: String,
        /// Its sequence number.
        sequence_number: String,
    },
    /// Refused, with the error code (e.g. ProvisionedThroughputExceededException).
    Failed {
        /// The error code.
        code: String,
    },
}

/// A whole call failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("Kinesis call failed ({kind:?}): {message}")]
pub struct CallError {
    /// Whether and how to retry.
    pub kind: ErrorKind,
    /// The service's error code, if it gave one.
    pub code: Option<String>,
    /// What happened.
    pub message: String,
}

/// A shard as ListShards describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardDescription {
    /// The shard id.
    pub shard_id: String,
    /// Its hash-key range.
    pub range: HashKeyRange,
    /// Whether it still takes writes (no EndingSequenceNumber).
    pub open: bool,
}

/// The stream's own limits, where the service says them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StreamLimits {
    /// The largest record (partition key + data) the stream takes, in bytes: DescribeStreamSummary's
    /// `MaxRecordSizeInKiB` x 1024 (1 MiB by default, up to 10 MiB when raised with
    /// UpdateMaxRecordSize). `None` when the service did not say (older endpoints, emulators).
    pub max_record_bytes: Option<usize>,
}

impl StreamLimits {
    /// Limits with the given record limit, in bytes.
    pub fn with_max_record_bytes(max_record_bytes: Option<usize>) -> Self {
        StreamLimits { max_record_bytes }
    }
}

/// What the pipeline needs from Kinesis.
pub trait Transport: Send + Sync + 'static {
    /// One PutRecords call; the results are in the order of the entries.
    fn put_records(&self, entries: Vec<PutEntry>) -> BoxFuture<Result<Vec<EntryResult>, CallError>>;
    /// Every shard of the stream (all pages), open and closed.
    fn list_shards(&self) -> BoxFuture<Result<Vec<ShardDescription>, CallError>>;
    /// The stream's limits (DescribeStreamSummary). The default says nothing is known.
    fn stream_limits(&self) -> BoxFuture<Result<StreamLimits, CallError>> {
        Box::pin(std::future::ready(Ok(StreamLimits::default())))
    }
    /// The stream's name, as receipts ([`crate::Receipt::stream`]) and metrics labels give it.
    /// The default: `custom`.
    fn stream_name(&self) -> &str {
        "custom"
    }
}

/// The real transport, over the AWS SDK.
#[derive(Clone, Debug)]
pub struct KinesisTransport {
    client: aws_sdk_kinesis::Client,
    stream: StreamAddress,
}

impl KinesisTransport {
    /// Wraps a client (its retries turned off: the producer retries) for one stream, named by its
    /// name or its ARN (then every call carries `StreamARN`: see [`StreamAddress::request_fields`]).
    pub fn new(client: aws_sdk_kinesis::Client, stream: StreamAddress) -> Self {
        let config = client.config().to_builder().retry_config(RetryConfig::disabled()).build();
        KinesisTransport { client: aws_sdk_kinesis::Client::from_conf(config), stream }
    }
}

fn classify<E, R>(operation: &'static str, error: SdkError<E, R>) -> CallError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    CallError::from(kinesis_core::ServiceError::kinesis(operation, error))
}

impl From<kinesis_core::ServiceError> for CallError {
    fn from(error: kinesis_core::ServiceError) -> Self {
        CallError { kind: error.class.into(), code: error.code, message: error.message }
    }
}

impl Transport for KinesisTransport {
    fn put_records(&self, entries: Vec<PutEntry>) -> BoxFuture<Result<Vec<EntryResult>, CallError>> {
        let (client, (name, arn)) = (self.client.clone(), self.stream.request_fields());
        Box::pin(async move {
            let count = entries.len();
            let mut request = Vec::with_capacity(count);
            for entry in entries {
                let built = PutRecordsRequestEntry::builder()
                    .partition_key(entry.partition_key)
                    .set_explicit_hash_key(entry.explicit_hash_key.map(|k| k.to_string()))
                    .data(Blob::new(Vec::from(entry.data)))
                    .build()
                    .map_err(|e| CallError { kind: ErrorKind::InvalidInput, code: None, message: e.to_string() })?;
                request.push(built);
            }
            let out = client
                .put_records()
                .set_stream_name(name)
                .set_stream_arn(arn)
                .set_records(Some(request))
                .send()
                .await
                .map_err(|e| classify("PutRecords", e))?;
            let results: Vec<EntryResult> = out
                .records()
                .iter()
                .map(|r| match (r.error_code(), r.shard_id(), r.sequence_number()) {
                    (None, Some(shard_id), Some(sequence_number)) => EntryResult::Stored {
                        shard_id: shard_id.to_owned(),
                        sequence_number: sequence_number.to_owned(),
                    },
                    (code, _, _) => EntryResult::Failed { code: code.unwrap_or("InternalFailure").to_owned() },
                })
                .collect();
            if results.len() != count {
                return Err(CallError {
                    kind: ErrorKind::Transient,
                    code: None,
                    message: format!("PutRecords answered {} results for {count} entries", results.len()),
                });
            }
            Ok(results)
        })
    }

    fn stream_limits(&self) -> BoxFuture<Result<StreamLimits, CallError>> {
        let (client, stream) = (self.client.clone(), self.stream.clone());
        Box::pin(async move {
            let summary = kinesis_core::describe_stream(&client, &stream).await?;
            Ok(StreamLimits { max_record_bytes: summary.max_record_bytes })
        })
    }

    fn stream_name(&self) -> &str {
        self.stream.name()
    }

    fn list_shards(&self) -> BoxFuture<Result<Vec<ShardDescription>, CallError>> {
        let (client, stream) = (self.client.clone(), self.stream.clone());
        Box::pin(async move {
            let shards = kinesis_core::list_shards(&client, &stream).await?;
            Ok(shards
                .into_iter()
                .map(|shard| ShardDescription { shard_id: shard.shard_id, range: shard.hash_range, open: shard.open })
                .collect())
        })
    }
}
