//! For single-process use: the records of every shard this worker holds, as a `Stream` of
//! batches, each with the checkpointer of its shard.
//!
//! ```no_run
//! # async fn example(kinesis: aws_sdk_kinesis::Client, dynamodb: aws_sdk_dynamodb::Client) {
//! use futures_util::StreamExt;
//! use kinesis_consumer::{Batches, SchedulerConfig};
//!
//! let mut batches = Batches::start(kinesis, dynamodb, SchedulerConfig::new("orders", "orders-app"), 16).unwrap();
//! while let Some(mut item) = batches.next().await {
//!     for record in &item.batch.records {
//!         println!("{} {}", record.sequence_number, record.data.len());
//!     }
//!     item.checkpointer.checkpoint().await.ok();
//! }
//! # }
//! ```
//!
//! Batches of one shard come in order. A shard's SHARD_END is checkpointed once every batch of it
//! was dropped: handling a batch ends when it is dropped.

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::sync::{mpsc, oneshot};

use crate::checkpointer::Checkpointer;
use crate::error::{ConfigError, SchedulerError};
use crate::processor::Processor;
use crate::record::Batch;
use crate::scheduler::{Scheduler, SchedulerConfig};

/// One batch of one shard, and the checkpointer to record its progress.
#[derive(Debug)]
#[non_exhaustive]
pub struct ShardBatch {
    /// The records.
    pub batch: Batch,
    /// Records this batch's progress: [`Checkpointer::checkpoint`] records its end.
    pub checkpointer: Checkpointer,
    _handled: oneshot::Sender<()>,
}

/// A worker whose batches are read as a `Stream`.
#[derive(Debug)]
pub struct Batches {
    rx: Option<mpsc::Receiver<ShardBatch>>,
    scheduler: Scheduler,
}

impl Batches {
    /// Starts a worker; at most `capacity` batches wait in the stream (then the shards' reads
    /// wait).
    ///
    /// # Errors
    /// [`ConfigError`] for a setting out of range.
    pub fn start(
        kinesis: aws_sdk_kinesis::Client,
        dynamodb: aws_sdk_dynamodb::Client,
        config: SchedulerConfig,
        capacity: usize,
    ) -> Result<Batches, ConfigError> {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let scheduler =
            Scheduler::start(kinesis, dynamodb, config, move |_: &str| Forward { tx: tx.clone(), last: None })?;
        Ok(Batches { rx: Some(rx), scheduler })
    }

    /// The worker.
    pub fn scheduler(&self) -> &Scheduler {
        &self.scheduler
    }

    /// Stops the stream and shuts the worker down gracefully (see [`Scheduler::shutdown`]).
    /// Checkpoint what was handled before.
    ///
    /// # Errors
    /// As [`Scheduler::shutdown`].
    pub async fn shutdown(mut self) -> Result<(), SchedulerError> {
        drop(self.rx.take());
        self.scheduler.shutdown().await
    }
}

impl futures_util::Stream for Batches {
    type Item = ShardBatch;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<ShardBatch>> {
        match self.rx.as_mut() {
            Some(rx) => rx.poll_recv(cx),
            None => Poll::Ready(None),
        }
    }
}

/// The processor behind the stream: forwards batches, and checkpoints SHARD_END once the last
/// one was handled.
struct Forward {
    tx: mpsc::Sender<ShardBatch>,
    last: Option<oneshot::Receiver<()>>,
}

impl Processor for Forward {
    async fn process_records(&mut self, batch: Batch, checkpointer: &mut Checkpointer) {
        let (handled, done) = oneshot::channel();
        self.last = Some(done);
        let _ = self.tx.send(ShardBatch { batch, checkpointer: checkpointer.clone(), _handled: handled }).await;
    }

    async fn shard_ended(&mut self, checkpointer: &mut Checkpointer) {
        if let Some(done) = self.last.take() {
            let _ = done.await;
        }
        if let Err(error) = checkpointer.checkpoint().await {
            tracing::warn!(shard_id = checkpointer.shard_id(), %error, "checkpointing SHARD_END failed");
        }
    }
}
