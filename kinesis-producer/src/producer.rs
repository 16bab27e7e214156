//! The [`Producer`] handle: a cheap `Clone` over the pipelines of its streams (see `streams.rs`),
//! one bounded inbox each.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

use kinesis_aggregation::{HashKey, UserRecord, validate_partition_key};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::time::Instant;

use crate::config::ProducerConfig;
use crate::engine::Command;
use crate::error::{BuildError, PutError, PutErrorReason};
use crate::metrics::MetricsSnapshot;
use crate::pending::{Pending, record_size};
use crate::receipt::ReceiptFuture;
use crate::streams::{Pipeline, Streams};
use crate::transport::{KinesisTransport, Transport};

/// Builds a [`Producer`].
#[derive(Debug)]
pub struct ProducerBuilder {
    /// Where the pipelines' transports come from, or why there is none (a stream that is
    /// neither a name nor an ARN).
    source: Result<Source, BuildError>,
    config: ProducerConfig,
}

/// Where a producer's pipelines get their transports.
#[derive(Debug)]
enum Source {
    /// Over the SDK: any stream, and a default one for [`Producer::put`] if given.
    Client { client: aws_sdk_kinesis::Client, default: Option<kinesis_core::StreamAddress> },
    /// One transport: its one stream, the default.
    Transport(Arc<dyn TransportDebug>),
}

/// `Transport` with `Debug`, so that the builder can derive it.
trait TransportDebug: Transport + std::fmt::Debug {}
impl<T: Transport + std::fmt::Debug> TransportDebug for T {}

impl ProducerBuilder {
    /// Replaces the whole configuration.
    pub fn config(mut self, config: ProducerConfig) -> Self {
        self.config = config;
        self
    }

    /// Validates the configuration and starts the pipeline of the default stream, if any, on the
    /// current tokio runtime (other streams' pipelines start on their first record).
    ///
    /// # Errors
    /// [`BuildError::InvalidStream`] when the stream given to [`Producer::builder`] is neither a
    /// stream name nor a stream ARN; [`BuildError::InvalidConfig`] when a value is out of range.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn build(self) -> Result<Producer, BuildError> {
        let source = self.source?;
        self.config.validate()?;
        let config = self.config;
        let client = match &source {
            Source::Client { client, .. } => Some(client.clone()),
            Source::Transport(_) => None,
        };
        let (streams, stopped) = Streams::new(config.clone(), client);
        let default = match source {
            Source::Client { client, default: Some(stream) } => {
                let given = stream.to_string();
                Some(streams.start(&given, Arc::new(KinesisTransport::new(client, stream))))
            }
            Source::Client { default: None, .. } => None,
            Source::Transport(transport) => {
                let given = transport.stream_name().to_owned();
                Some(streams.start(&given, Arc::new(Upcast(transport))))
            }
        };
        Ok(Producer {
            inner: Arc::new(Inner {
                records: Arc::new(Semaphore::new(config.max_buffered_records)),
                bytes: Arc::new(Semaphore::new(config.max_buffered_bytes)),
                config,
                closed: AtomicBool::new(false),
                default,
                streams,
                stopped,
            }),
        })
    }
}

#[derive(Debug)]
struct Upcast(Arc<dyn TransportDebug>);
impl Transport for Upcast {
    fn put_records(
        &self,
        entries: Vec<crate::PutEntry>,
    ) -> crate::transport::BoxFuture<Result<Vec<crate::EntryResult>, crate::CallError>> {
        self.0.put_records(entries)
    }
    fn list_shards(&self) -> crate::transport::BoxFuture<Result<Vec<crate::ShardDescription>, crate::CallError>> {
        self.0.list_shards()
    }
    fn stream_limits(&self) -> crate::transport::BoxFuture<Result<crate::StreamLimits, crate::CallError>> {
        self.0.stream_limits()
    }
    fn stream_name(&self) -> &str {
        self.0.stream_name()
    }
}

/// A KPL-class producer: one stream or many. Clone it freely: clones share its pipelines.
///
/// ```no_run
/// # async fn example(client: aws_sdk_kinesis::Client) -> Result<(), Box<dyn std::error::Error>> {
/// use kinesis_producer::{Producer, UserRecord};
///
/// let producer = Producer::builder(client, "my-stream").build()?;
/// let receipt = producer.put(UserRecord::new("sensor-7", "{\"t\":21.5}")).await?; // buffered
/// let receipt = receipt.await?;                                                   // delivered
/// println!("{} {}", receipt.shard_id, receipt.sequence_number);
/// // Any other stream, through the same buffer, calls in flight and metrics:
/// let audit = producer.put_to("audit-log", UserRecord::new("sensor-7", "read")).await?;
/// producer.shutdown().await;
/// # Ok(()) }
/// ```
///
/// Each stream has its own pipeline (shard map, aggregation, rate limits, retries), started on
/// its first record, as the KPL keeps one per stream. They share `max_buffered_records`,
/// `max_buffered_bytes` and `max_in_flight_requests`; a stream that is throttled or missing holds
/// its own records back (or fails them), not the others'.
#[derive(Clone, Debug)]
pub struct Producer {
    pub(crate) inner: Arc<Inner>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    records: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
    config: ProducerConfig,
    closed: AtomicBool,
    /// The stream `put` sends to.
    default: Option<Pipeline>,
    pub(crate) streams: Streams,
    /// Closes once the producer is shut down (or dropped) and every pipeline task has returned,
    /// for the metrics publishers.
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    pub(crate) stopped: tokio::sync::watch::Receiver<()>,
}

impl Producer {
    /// A builder for a producer whose default stream ([`Producer::put`]) is `stream`, with the
    /// KPL's defaults; [`Producer::put_to`] reaches any other. `stream` is the stream's name, or
    /// its ARN (`arn:aws:kinesis:REGION:ACCOUNT:stream/NAME`): the way to write to another
    /// account's stream, whose resource policy must allow this caller `kinesis:PutRecords`,
    /// `kinesis:ListShards` and `kinesis:DescribeStreamSummary`. By ARN, every call carries
    /// `StreamARN` (see [`kinesis_core::StreamAddress`]).
    ///
    /// Text that is neither a valid name nor a valid ARN makes [`ProducerBuilder::build`] fail
    /// with [`BuildError::InvalidStream`].
    pub fn builder(client: aws_sdk_kinesis::Client, stream: impl Into<String>) -> ProducerBuilder {
        let source = kinesis_core::StreamAddress::parse(&stream.into())
            .map(|stream| Source::Client { client, default: Some(stream) })
            .map_err(BuildError::InvalidStream);
        ProducerBuilder { source, config: ProducerConfig::default() }
    }

    /// A builder for a producer without a default stream, the KPL's shape: every record names its
    /// stream ([`Producer::put_to`]); [`Producer::put`] fails with `NoDefaultStream`.
    pub fn multi_stream(client: aws_sdk_kinesis::Client) -> ProducerBuilder {
        ProducerBuilder { source: Ok(Source::Client { client, default: None }), config: ProducerConfig::default() }
    }

    /// A builder over another [`Transport`] (an in-memory sink for benchmarks, a fault injector):
    /// its one stream is the default, and [`Producer::put_to`] reaches no other.
    pub fn builder_with_transport(transport: impl Transport + std::fmt::Debug) -> ProducerBuilder {
        ProducerBuilder { source: Ok(Source::Transport(Arc::new(transport))), config: ProducerConfig::default() }
    }

    /// Buffers a record; waits while the buffer is full. The returned future resolves when the
    /// record is delivered (or fails for good).
    ///
    /// Cancel-safe: if the future is dropped before it returns, the record was not buffered.
    ///
    /// # Errors
    /// [`PutError`], handing the record back, for an invalid partition key, a record over the
    /// stream's record limit, or a producer that is shut down.
    pub async fn put(&self, record: UserRecord) -> Result<ReceiptFuture, PutError> {
        match &self.inner.default {
            Some(pipeline) => self.put_on(pipeline, record).await,
            None => Err(PutError::new(PutErrorReason::NoDefaultStream, record)),
        }
    }

    /// [`Producer::put`] to `stream` (its name or its ARN), any stream: its pipeline starts on
    /// its first record. Records of a stream that does not exist fail with `NotFound` once
    /// ListShards says so, and no other stream's.
    ///
    /// Cancel-safe as `put`.
    ///
    /// # Errors
    /// As [`Producer::put`]; [`PutErrorReason::InvalidStream`] when `stream` is neither a name
    /// nor an ARN, [`PutErrorReason::OtherStream`] on a producer over one [`Transport`].
    pub async fn put_to(&self, stream: &str, record: UserRecord) -> Result<ReceiptFuture, PutError> {
        match self.inner.streams.pipeline(stream) {
            Ok(pipeline) => self.put_on(&pipeline, record).await,
            Err(reason) => Err(PutError::new(reason, record)),
        }
    }

    /// [`Producer::try_put`] to `stream`.
    ///
    /// # Errors
    /// As [`Producer::put_to`], and `Full` when the buffer is full.
    pub async fn try_put_to(&self, stream: &str, record: UserRecord) -> Result<ReceiptFuture, PutError> {
        match self.inner.streams.pipeline(stream) {
            Ok(pipeline) => self.try_put_on(&pipeline, record).await,
            Err(reason) => Err(PutError::new(reason, record)),
        }
    }

    async fn put_on(&self, pipeline: &Pipeline, record: UserRecord) -> Result<ReceiptFuture, PutError> {
        let size = self.check(pipeline, &record).map_err(|reason| PutError::new(reason, record.clone()))?;
        let inner = &self.inner;
        // The uncontended path takes the permits without awaiting: an await on a tokio resource
        // spends the task's cooperative budget, and a putting task that yields every few dozen
        // records hands its thread to the pipeline task each time.
        let records = match inner.records.clone().try_acquire_owned() {
            Ok(permit) => Ok(permit),
            Err(_) => inner.records.clone().acquire_owned().await,
        };
        let cost = charge(size);
        let bytes = match inner.bytes.clone().try_acquire_many_owned(cost) {
            Ok(permit) => Ok(permit),
            Err(_) => inner.bytes.clone().acquire_many_owned(cost).await,
        };
        let (Ok(r), Ok(b)) = (records, bytes) else {
            return Err(PutError::new(PutErrorReason::Shutdown, record));
        };
        self.enqueue(pipeline, record, size, (r, b)).await
    }

    /// [`Producer::put`] with the explicit hash key as text, as the KPL's `addUserRecord` takes it:
    /// the record is routed by it instead of its partition key's MD5.
    ///
    /// # Errors
    /// As [`Producer::put`], and [`PutErrorReason::InvalidExplicitHashKey`], handing the record
    /// back unchanged, when the text is not a decimal from 0 to 2^128-1.
    pub async fn put_with_explicit_hash_key(
        &self,
        record: UserRecord,
        explicit_hash_key: &str,
    ) -> Result<ReceiptFuture, PutError> {
        match HashKey::parse(explicit_hash_key) {
            Ok(key) => self.put(record.with_explicit_hash_key(key)).await,
            Err(invalid) => Err(PutError::new(PutErrorReason::InvalidExplicitHashKey(invalid), record)),
        }
    }

    /// Like [`Producer::put`], but returns [`PutErrorReason::Full`] instead of waiting for space.
    ///
    /// # Errors
    /// As [`Producer::put`], and `Full` when the buffer is full.
    pub async fn try_put(&self, record: UserRecord) -> Result<ReceiptFuture, PutError> {
        match &self.inner.default {
            Some(pipeline) => self.try_put_on(pipeline, record).await,
            None => Err(PutError::new(PutErrorReason::NoDefaultStream, record)),
        }
    }

    async fn try_put_on(&self, pipeline: &Pipeline, record: UserRecord) -> Result<ReceiptFuture, PutError> {
        let size = match self.check(pipeline, &record) {
            Ok(size) => size,
            Err(reason) => return Err(PutError::new(reason, record)),
        };
        let inner = &self.inner;
        let r = inner.records.clone().try_acquire_owned();
        let b = inner.bytes.clone().try_acquire_many_owned(charge(size));
        let (Ok(r), Ok(b)) = (r, b) else {
            return Err(PutError::new(PutErrorReason::Full, record));
        };
        self.enqueue(pipeline, record, size, (r, b)).await
    }

    fn check(&self, pipeline: &Pipeline, record: &UserRecord) -> Result<usize, PutErrorReason> {
        if self.inner.closed.load(Relaxed) {
            return Err(PutErrorReason::Shutdown);
        }
        validate_partition_key(&record.partition_key).map_err(|_| PutErrorReason::InvalidPartitionKey)?;
        let size = record_size(record);
        // The configured limit, or the stream's own when DescribeStreamSummary said it is lower.
        let max = match pipeline.stream_limit.load(Relaxed) {
            0 => self.inner.config.max_record_bytes,
            stream => stream.min(self.inner.config.max_record_bytes),
        };
        if size > max {
            return Err(PutErrorReason::TooLarge { size, max });
        }
        Ok(size)
    }

    async fn enqueue(
        &self,
        pipeline: &Pipeline,
        record: UserRecord,
        size: usize,
        permits: (tokio::sync::OwnedSemaphorePermit, tokio::sync::OwnedSemaphorePermit),
    ) -> Result<ReceiptFuture, PutError> {
        let (reply, rx) = oneshot::channel();
        let now = Instant::now();
        let pending = Pending {
            hash_key: record.hash_key().0,
            record,
            size,
            reply,
            enqueued: now,
            deadline: now + self.inner.config.record_ttl,
            retry: None,
            _permits: permits,
        };
        let sent = match pipeline.tx.try_send(Command::Put(pending)) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(command)) => pipeline.tx.send(command).await,
            Err(mpsc::error::TrySendError::Closed(command)) => Err(mpsc::error::SendError(command)),
        };
        match sent {
            Ok(()) => {
                pipeline.metrics.user_records_received.fetch_add(1, Relaxed);
                Ok(ReceiptFuture::new(rx))
            }
            Err(mpsc::error::SendError(command)) => {
                let Command::Put(pending) = command else { unreachable!("sent a Put") };
                Err(PutError::new(PutErrorReason::Shutdown, pending.record))
            }
        }
    }

    /// Sends everything buffered now (every stream), without waiting for
    /// RecordMaxBufferedTime, and waits until every record buffered so far is resolved. (While
    /// other tasks keep putting, it waits for those too.)
    pub async fn flush(&self) {
        self.each_pipeline(self.inner.streams.all(), Command::Flush).await;
    }

    /// Stops accepting records, delivers (or expires) everything buffered on every stream, and
    /// stops the pipeline tasks. Every receipt is resolved when this returns. Later `put`s fail
    /// with `Shutdown`.
    pub async fn shutdown(&self) {
        self.inner.closed.store(true, Relaxed);
        self.each_pipeline(self.inner.streams.close(), Command::Shutdown).await;
        self.inner.streams.stop();
    }

    /// Sends every pipeline the command and waits for each answer.
    async fn each_pipeline(&self, pipelines: Vec<Pipeline>, command: fn(oneshot::Sender<()>) -> Command) {
        let mut answers = Vec::new();
        for pipeline in pipelines {
            let (tx, rx) = oneshot::channel();
            if pipeline.tx.send(command(tx)).await.is_ok() {
                answers.push(rx);
            }
        }
        for answer in answers {
            let _ = answer.await;
        }
    }

    /// The metrics now, every stream's added up.
    pub fn metrics(&self) -> MetricsSnapshot {
        let mut total = MetricsSnapshot::default();
        for (_, snapshot) in Streams::snapshots(&self.inner.streams.registry()) {
            total.add(&snapshot);
        }
        total
    }

    /// The metrics now, by stream name (a stream put to by name and by ARN has two entries).
    pub fn metrics_by_stream(&self) -> Vec<(String, MetricsSnapshot)> {
        Streams::snapshots(&self.inner.streams.registry())
            .into_iter()
            .map(|(stream, snapshot)| (stream.to_string(), snapshot))
            .collect()
    }
}

/// What a record of `size` bytes (partition key + data) takes from the byte budget. Validation
/// keeps it under `max_buffered_bytes`, itself under 4 GiB.
fn charge(size: usize) -> u32 {
    u32::try_from(size + crate::config::RECORD_OVERHEAD_BYTES).unwrap_or(u32::MAX)
}
