//! The [`Producer`] handle: a cheap `Clone` over a bounded channel to the pipeline task.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};

use kinesis_aggregation::{HashKey, UserRecord, validate_partition_key};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::time::Instant;

use crate::config::ProducerConfig;
use crate::engine::{Command, Engine};
use crate::error::{BuildError, PutError, PutErrorReason};
use crate::metrics::{Metrics, MetricsSnapshot};
use crate::pending::{Pending, record_size};
use crate::receipt::ReceiptFuture;
use crate::transport::{KinesisTransport, Transport};

/// Builds a [`Producer`].
#[derive(Debug)]
pub struct ProducerBuilder {
    /// The transport, or why there is none (a stream that is neither a name nor an ARN).
    transport: Result<Arc<dyn TransportDebug>, BuildError>,
    config: ProducerConfig,
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

    /// Validates the configuration and starts the pipeline task on the current tokio runtime.
    ///
    /// # Errors
    /// [`BuildError::InvalidStream`] when the stream given to [`Producer::builder`] is neither a
    /// stream name nor a stream ARN; [`BuildError::InvalidConfig`] when a value is out of range.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn build(self) -> Result<Producer, BuildError> {
        let transport = self.transport?;
        self.config.validate()?;
        let config = self.config;
        let metrics = Arc::new(Metrics::default());
        // The inbox is bounded; buffer space is bounded by the two semaphores below.
        let (tx, rx) = mpsc::channel(16384);
        let transport: Arc<dyn Transport> = Arc::new(Upcast(transport));
        let stream_limit = Arc::new(AtomicUsize::new(0));
        let engine = Engine::new(config.clone(), transport, metrics.clone(), stream_limit.clone());
        #[cfg(feature = "metrics")]
        let (running, stopped) = tokio::sync::watch::channel(());
        tokio::spawn(async move {
            engine.run(rx).await;
            #[cfg(feature = "metrics")]
            drop(running);
        });
        Ok(Producer {
            inner: Arc::new(Inner {
                records: Arc::new(Semaphore::new(config.max_buffered_records)),
                bytes: Arc::new(Semaphore::new(config.max_buffered_bytes)),
                tx,
                config,
                metrics,
                closed: AtomicBool::new(false),
                stream_limit,
                #[cfg(feature = "metrics")]
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
}

/// A KPL-class producer for one stream. Clone it freely: clones share one pipeline.
///
/// ```no_run
/// # async fn example(client: aws_sdk_kinesis::Client) -> Result<(), Box<dyn std::error::Error>> {
/// use kinesis_producer::{Producer, UserRecord};
///
/// let producer = Producer::builder(client, "my-stream").build()?;
/// let receipt = producer.put(UserRecord::new("sensor-7", "{\"t\":21.5}")).await?; // buffered
/// let receipt = receipt.await?;                                                   // delivered
/// println!("{} {}", receipt.shard_id, receipt.sequence_number);
/// producer.shutdown().await;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct Producer {
    pub(crate) inner: Arc<Inner>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    tx: mpsc::Sender<Command>,
    records: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
    config: ProducerConfig,
    pub(crate) metrics: Arc<Metrics>,
    closed: AtomicBool,
    /// The stream's record limit, once the pipeline learned it (0: not known).
    stream_limit: Arc<AtomicUsize>,
    /// Changes (closes) when the pipeline task has returned, for the metrics publishers.
    #[cfg(feature = "metrics")]
    pub(crate) stopped: tokio::sync::watch::Receiver<()>,
}

impl Producer {
    /// A builder for a producer on `stream`, with the KPL's defaults. `stream` is the stream's
    /// name, or its ARN (`arn:aws:kinesis:REGION:ACCOUNT:stream/NAME`): the way to write to
    /// another account's stream, whose resource policy must allow this caller
    /// `kinesis:PutRecords`, `kinesis:ListShards` and `kinesis:DescribeStreamSummary`. By ARN,
    /// every call carries `StreamARN` (see [`kinesis_core::StreamAddress`]).
    ///
    /// Text that is neither a valid name nor a valid ARN makes [`ProducerBuilder::build`] fail
    /// with [`BuildError::InvalidStream`].
    pub fn builder(client: aws_sdk_kinesis::Client, stream: impl Into<String>) -> ProducerBuilder {
        match kinesis_core::StreamAddress::parse(&stream.into()) {
            Ok(stream) => Self::builder_with_transport(KinesisTransport::new(client, stream)),
            Err(error) => {
                ProducerBuilder { transport: Err(BuildError::InvalidStream(error)), config: ProducerConfig::default() }
            }
        }
    }

    /// A builder over another [`Transport`] (an in-memory sink for benchmarks, a fault injector).
    pub fn builder_with_transport(transport: impl Transport + std::fmt::Debug) -> ProducerBuilder {
        ProducerBuilder { transport: Ok(Arc::new(transport)), config: ProducerConfig::default() }
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
        let size = self.check(&record).map_err(|reason| PutError::new(reason, record.clone()))?;
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
        self.enqueue(record, size, (r, b)).await
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
        let size = match self.check(&record) {
            Ok(size) => size,
            Err(reason) => return Err(PutError::new(reason, record)),
        };
        let inner = &self.inner;
        let r = inner.records.clone().try_acquire_owned();
        let b = inner.bytes.clone().try_acquire_many_owned(charge(size));
        let (Ok(r), Ok(b)) = (r, b) else {
            return Err(PutError::new(PutErrorReason::Full, record));
        };
        self.enqueue(record, size, (r, b)).await
    }

    fn check(&self, record: &UserRecord) -> Result<usize, PutErrorReason> {
        if self.inner.closed.load(Relaxed) {
            return Err(PutErrorReason::Shutdown);
        }
        validate_partition_key(&record.partition_key).map_err(|_| PutErrorReason::InvalidPartitionKey)?;
        let size = record_size(record);
        // The configured limit, or the stream's own when DescribeStreamSummary said it is lower.
        let max = match self.inner.stream_limit.load(Relaxed) {
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
        let sent = match self.inner.tx.try_send(Command::Put(pending)) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(command)) => self.inner.tx.send(command).await,
            Err(mpsc::error::TrySendError::Closed(command)) => Err(mpsc::error::SendError(command)),
        };
        match sent {
            Ok(()) => {
                self.inner.metrics.user_records_received.fetch_add(1, Relaxed);
                Ok(ReceiptFuture::new(rx))
            }
            Err(mpsc::error::SendError(command)) => {
                let Command::Put(pending) = command else { unreachable!("sent a Put") };
                Err(PutError::new(PutErrorReason::Shutdown, pending.record))
            }
        }
    }

    /// Sends everything buffered now, without waiting for RecordMaxBufferedTime, and waits until
    /// every record buffered so far is resolved. (While other tasks keep putting, it waits for
    /// those too.)
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.inner.tx.send(Command::Flush(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// Stops accepting records, delivers (or expires) everything buffered, and stops the task.
    /// Every receipt is resolved when this returns. Later `put`s fail with `Shutdown`.
    pub async fn shutdown(&self) {
        self.inner.closed.store(true, Relaxed);
        let (tx, rx) = oneshot::channel();
        if self.inner.tx.send(Command::Shutdown(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// The metrics now.
    pub fn metrics(&self) -> MetricsSnapshot {
        self.inner.metrics.snapshot()
    }
}

/// What a record of `size` bytes (partition key + data) takes from the byte budget. Validation
/// keeps it under `max_buffered_bytes`, itself under 4 GiB.
fn charge(size: usize) -> u32 {
    u32::try_from(size + crate::config::RECORD_OVERHEAD_BYTES).unwrap_or(u32::MAX)
}
