//! The Kinesis calls a consumer makes (ListShards, GetShardIterator, GetRecords), with their errors
//! classified before they are boxed.
//!
//! Retries: the SDK client the user hands in retries single calls as configured; this crate's
//! fetcher retries throttled and transient GetRecords calls with its own backoff for as long as the
//! lease is held, and gets a new iterator when one expires.

use std::sync::Arc;
use std::time::SystemTime;

use aws_sdk_kinesis::primitives::DateTime;
use aws_sdk_kinesis::types::ShardIteratorType;

use kinesis_core::StreamAddress;

use crate::error::{KinesisError, classify_sdk};

pub use kinesis_core::Shard;

/// Where a shard iterator starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum StartAt {
    TrimHorizon,
    Latest,
    AtTimestamp(SystemTime),
    AtSequence(String),
    AfterSequence(String),
}

/// One GetRecords answer.
pub(crate) struct Fetched {
    pub records: Vec<aws_sdk_kinesis::types::Record>,
    /// `None`: the shard is closed and every record of it was read.
    pub next_iterator: Option<String>,
    pub millis_behind_latest: Option<i64>,
}

/// A stream's Kinesis calls.
#[derive(Clone, Debug)]
pub(crate) struct KinesisApi {
    client: aws_sdk_kinesis::Client,
    stream: Arc<StreamAddress>,
}

/// Classifies a Kinesis SDK error before it is boxed.
pub(crate) fn error<E, R>(operation: &'static str, e: aws_sdk_kinesis::error::SdkError<E, R>) -> KinesisError
where
    E: aws_sdk_kinesis::error::ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    let (kind, code) = classify_sdk(&e, kinesis_core::ErrorClass::of_kinesis_code);
    KinesisError::new(kind, operation, code, Some(Box::new(e)))
}

impl KinesisApi {
    pub(crate) fn new(client: aws_sdk_kinesis::Client, stream: StreamAddress) -> Self {
        KinesisApi { client, stream: Arc::new(stream) }
    }

    pub(crate) fn client(&self) -> &aws_sdk_kinesis::Client {
        &self.client
    }

    /// The stream's name (for logs and metrics).
    pub(crate) fn stream(&self) -> &str {
        self.stream.name()
    }

    /// The stream as the calls name it.
    pub(crate) fn address(&self) -> &StreamAddress {
        &self.stream
    }

    /// DescribeStreamSummary: the stream's ARN and creation time.
    ///
    /// # Errors
    /// As DescribeStreamSummary (`NotFound` for a stream that does not exist).
    pub(crate) async fn describe(&self) -> Result<kinesis_core::StreamSummary, KinesisError> {
        Ok(kinesis_core::describe_stream(&self.client, &self.stream).await?)
    }

    /// Every shard of the stream, open and closed, all pages.
    pub(crate) async fn list_shards(&self) -> Result<Vec<Shard>, KinesisError> {
        Ok(kinesis_core::list_shards(&self.client, &self.stream).await?)
    }

    /// Whether the stream still lists `shard_id` (a shard is listed until it expires, after the
    /// stream's retention period from its closing).
    ///
    /// # Errors
    /// As ListShards: `NotFound` when the stream is gone.
    pub(crate) async fn shard_listed(&self, shard_id: &str) -> Result<bool, KinesisError> {
        Ok(self.list_shards().await?.iter().any(|s| s.shard_id == shard_id))
    }

    /// A shard iterator. `None` when the shard has nothing more at that position (a closed shard
    /// read to its end).
    pub(crate) async fn shard_iterator(&self, shard_id: &str, at: &StartAt) -> Result<Option<String>, KinesisError> {
        let (name, arn) = self.stream.request_fields();
        let request = self.client.get_shard_iterator().set_stream_name(name).set_stream_arn(arn).shard_id(shard_id);
        let request = match at {
            StartAt::TrimHorizon => request.shard_iterator_type(ShardIteratorType::TrimHorizon),
            StartAt::Latest => request.shard_iterator_type(ShardIteratorType::Latest),
            StartAt::AtTimestamp(at) => {
                request.shard_iterator_type(ShardIteratorType::AtTimestamp).timestamp(DateTime::from(*at))
            }
            StartAt::AtSequence(sequence) => {
                request.shard_iterator_type(ShardIteratorType::AtSequenceNumber).starting_sequence_number(sequence)
            }
            StartAt::AfterSequence(sequence) => {
                request.shard_iterator_type(ShardIteratorType::AfterSequenceNumber).starting_sequence_number(sequence)
            }
        };
        let out = request.send().await.map_err(|e| error("GetShardIterator", e))?;
        Ok(out.shard_iterator().map(str::to_owned))
    }

    /// One GetRecords call.
    pub(crate) async fn get_records(&self, iterator: &str, limit: i32) -> Result<Fetched, KinesisError> {
        let out = self
            .client
            .get_records()
            // By ARN, GetRecords carries it too (the iterator alone names the shard; AWS checks
            // another account's resource policy against the ARN).
            .set_stream_arn(self.stream.arn().map(|a| a.as_str().to_owned()))
            .shard_iterator(iterator)
            .limit(limit)
            .send()
            .await
            .map_err(|e| error("GetRecords", e))?;
        let next_iterator = out.next_shard_iterator().filter(|it| !it.is_empty()).map(str::to_owned);
        let millis_behind_latest = out.millis_behind_latest();
        Ok(Fetched { records: out.records, next_iterator, millis_behind_latest })
    }
}
