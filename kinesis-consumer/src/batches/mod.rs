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
//!     item.checkpointer.checkpoint().await.ok(); // finished: the progress may pass it
//! }
//! # }
//! ```
//!
//! Batches of one shard come in order; an application may hold several and finish them in any
//! order. A batch is **finished** when its checkpointer's [`Checkpointer::checkpoint`] is called
//! (which records the progress as far as every earlier batch of the shard is finished too), or
//! when [`ShardBatch::finish`] is called (no write; a later checkpoint covers it). No checkpoint
//! ever passes a record of a batch that is not finished:
//! - `checkpoint()` on a batch whose earlier batches are not finished returns `Ok` and writes
//!   nothing yet; the checkpoint of the batch that completes the run writes over all of them;
//! - `checkpoint_at` / `checkpoint_record` are refused (`InvalidPosition`) while an earlier batch
//!   is not finished;
//! - SHARD_END is written once every batch of an ended shard is finished.
//!
//! A batch dropped without being finished is **abandoned** (a batch dropped unread is not a batch
//! handled): nothing passes it, the shard's lease is released, and its records are delivered
//! again from the last checkpoint (by this worker or another). Batches left unread in the stream
//! when it is shut down or dropped are abandoned the same way: nothing of them is checkpointed.

pub(crate) mod handed_out;

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::sync::mpsc;

use std::sync::Arc;

use crate::batches::handed_out::HandedOut;
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
    /// Records this batch's progress: [`Checkpointer::checkpoint`] finishes the batch and records
    /// its end (once every earlier batch of the shard is finished).
    pub checkpointer: Checkpointer,
    guard: Guard,
}

impl ShardBatch {
    /// Marks the batch finished without writing a checkpoint: a later checkpoint (or SHARD_END)
    /// may pass its records.
    pub fn finish(self) {
        self.guard.handed.finish(self.guard.id);
    }
}

/// Reports a batch dropped: abandoned unless it was finished.
#[derive(Debug)]
struct Guard {
    handed: Arc<HandedOut>,
    id: u64,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.handed.dropped(self.id);
    }
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
        let scheduler = Scheduler::start(kinesis, dynamodb, config, move |_: &str| Forward {
            tx: tx.clone(),
            handed: Arc::new(HandedOut::default()),
        })?;
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

/// The processor behind the stream: forwards batches, and checkpoints SHARD_END once every one
/// was finished.
struct Forward {
    tx: mpsc::Sender<ShardBatch>,
    /// This hold's batches handed out.
    handed: Arc<HandedOut>,
}

impl Forward {
    /// A batch was abandoned: its records must come again, so this hold of the lease ends.
    fn abandoned(&self, checkpointer: &Checkpointer) -> bool {
        let abandoned = self.handed.abandoned();
        if abandoned > 0 {
            tracing::warn!(
                shard_id = checkpointer.shard_id(),
                abandoned,
                "a batch was dropped without being finished (checkpoint() or finish()); nothing passes it: \
                 the shard is read again from its last checkpoint"
            );
            checkpointer.restart();
        }
        abandoned > 0
    }
}

impl Processor for Forward {
    async fn process_records(&mut self, batch: Batch, checkpointer: &mut Checkpointer) {
        if self.abandoned(checkpointer) {
            return;
        }
        let Some(end) = checkpointer.batch_end() else { return };
        let id = self.handed.hand_out(end);
        let guard = Guard { handed: self.handed.clone(), id };
        let item = ShardBatch { batch, checkpointer: checkpointer.for_batch(self.handed.clone(), id), guard };
        // A stream that is gone drops the batch: abandoned.
        let _ = self.tx.send(item).await;
    }

    async fn shard_ended(&mut self, checkpointer: &mut Checkpointer) {
        if !self.handed.settled().await {
            self.abandoned(checkpointer);
            return;
        }
        if let Err(error) = checkpointer.checkpoint().await {
            tracing::warn!(shard_id = checkpointer.shard_id(), %error, "checkpointing SHARD_END failed");
        }
    }
}
