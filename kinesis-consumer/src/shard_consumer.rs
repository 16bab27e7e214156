//! One shard's consumer: a task per held lease, an explicit state machine.
//!
//! ```text
//! WaitingOnParents ─▶ Initializing ─▶ Processing ─▶ ShardEnded ─▶ (lease released)
//!        │                 │              │   └────▶ LeaseLost ─▶ (lease forgotten)
//!        └─────────────────┴──────────────┴────────▶ ShuttingDown ─▶ (lease released by the scheduler)
//! ```
//!
//! - **WaitingOnParents**: a child shard starts only when every parent's lease is at SHARD_END (a
//!   parent without a lease has aged out of the stream).
//! - **Initializing**: waits until the lease is usable (after a steal, until the old owner has
//!   stopped), calls `initialize`, and starts the fetcher at the checkpoint.
//! - **Processing**: batches of at most `max_batch_records`, gathered for at most
//!   `max_batch_wait` (Lambda-style); a batch is handed over only while the lease is usable.
//! - **ShardEnded**: `shard_ended` must checkpoint SHARD_END; if it does not, the error is
//!   reported and the call made again later. The shard's children wait until it does.
//! - **LeaseLost**: `lease_lost`, nothing written. **ShuttingDown**: `shutdown_requested`, the
//!   processor's last chance to checkpoint.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::checkpointer::Checkpointer;
use crate::fan_out::{FanOutConfig, FanOutFetcher};
use crate::fetcher::{Fetch, Fetcher, PollingConfig};
use crate::held::HeldLease;
use crate::kinesis::{KinesisApi, StartAt};
use crate::lease::Position;
use crate::lease_table::LeaseTable;
use crate::metrics::Metrics;
use crate::processor::{Initialization, Processor};
use crate::record::{Batch, Record, Unpacker};
use crate::shard_sync::InitialPosition;

/// Where a shard's consumer is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ShardConsumerState {
    /// Waiting until every parent shard is processed to its end.
    WaitingOnParents,
    /// Starting the processor and the fetcher.
    Initializing,
    /// Handing batches to the processor.
    Processing,
    /// Every record was handed over; the processor must checkpoint SHARD_END.
    ShardEnded,
    /// Another worker has the lease.
    LeaseLost,
    /// The worker is shutting down.
    ShuttingDown,
}

/// How a shard consumer ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Exit {
    /// SHARD_END is checkpointed (now, or before this consumer started).
    ShardEnded,
    LeaseLost,
    Shutdown,
    /// Reading the shard failed in a way retrying does not help.
    Failed,
    /// The processor asked to read the shard again from its checkpoint (the stream adapter, after
    /// a batch was abandoned): the lease is released.
    Restart,
}

/// What a shard consumer needs.
pub(crate) struct Context {
    pub held: Arc<HeldLease>,
    pub table: LeaseTable,
    pub api: KinesisApi,
    pub polling: PollingConfig,
    pub initial: InitialPosition,
    pub parent_poll_interval: Duration,
    pub max_batch_records: usize,
    pub max_batch_wait: Duration,
    pub metrics: Arc<Metrics>,
    pub shutdown: CancellationToken,
    /// Enhanced fan-out: the registered consumer's ARN and the settings. `None`: polling.
    pub fan_out: Option<(Arc<str>, FanOutConfig)>,
}

/// Aborts a task when dropped.
pub(crate) struct AbortOnDrop(pub tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What interrupted a wait.
enum Interrupt {
    Lost,
    Shutdown,
}

impl Context {
    /// Sleeps for `duration` unless the lease is lost or shutdown begins first.
    async fn pause(&self, duration: Duration) -> Result<(), Interrupt> {
        tokio::select! {
            biased;
            _ = self.held.lost() => Err(Interrupt::Lost),
            _ = self.shutdown.cancelled() => Err(Interrupt::Shutdown),
            _ = tokio::time::sleep(duration) => Ok(()),
        }
    }

    /// Waits until records may be processed under the lease.
    async fn until_usable(&self) -> Result<(), Interrupt> {
        loop {
            let now = Instant::now();
            if self.held.is_lost() {
                return Err(Interrupt::Lost);
            }
            if self.held.usable(now) {
                return Ok(());
            }
            let wait = self.held.not_before().saturating_duration_since(now).max(Duration::from_millis(10));
            self.pause(wait.min(Duration::from_millis(100))).await?;
        }
    }

    async fn parents_done(&self, parents: &[String]) -> bool {
        for parent in parents {
            match self.table.get(parent).await {
                Ok(None) => {}
                Ok(Some(lease)) if lease.checkpoint.position == Position::ShardEnd => {}
                Ok(Some(_)) => return false,
                Err(error) => {
                    tracing::warn!(shard_id = self.held.key(), parent = %parent, %error, "reading a parent's lease failed");
                    return false;
                }
            }
        }
        true
    }
}

fn interrupted(interrupt: Interrupt) -> ShardConsumerState {
    match interrupt {
        Interrupt::Lost => ShardConsumerState::LeaseLost,
        Interrupt::Shutdown => ShardConsumerState::ShuttingDown,
    }
}

/// Runs a shard's consumer to its end.
pub(crate) async fn run<P: Processor>(ctx: Context, mut processor: P) -> Exit {
    let shard_id: Arc<str> = ctx.held.key().into();
    let mut checkpointer = Checkpointer::new(ctx.held.clone(), ctx.table.clone(), ctx.metrics.clone());
    let mut initialized = false;
    let mut fetched: Option<(mpsc::Receiver<Fetch>, AbortOnDrop)> = None;
    let mut pending: VecDeque<Record> = VecDeque::new();
    let mut read_to_end = false;
    let mut behind = None;
    let mut shard_end_attempts = 0u32;
    let mut state = ShardConsumerState::WaitingOnParents;
    loop {
        tracing::debug!(shard_id = %shard_id, ?state, "shard consumer");
        state = match state {
            ShardConsumerState::WaitingOnParents => {
                let lease = ctx.held.lease().await;
                if lease.checkpoint.position == Position::ShardEnd {
                    return Exit::ShardEnded;
                }
                loop {
                    if ctx.parents_done(&lease.parent_shard_ids).await {
                        break ShardConsumerState::Initializing;
                    }
                    if let Err(i) = ctx.pause(ctx.parent_poll_interval).await {
                        break interrupted(i);
                    }
                }
            }
            ShardConsumerState::Initializing => match ctx.until_usable().await {
                Err(i) => interrupted(i),
                Ok(()) => {
                    let lease = ctx.held.lease().await;
                    let (start, resume_after) = match &lease.checkpoint.position {
                        Position::TrimHorizon => (StartAt::TrimHorizon, None),
                        Position::Latest => (StartAt::Latest, None),
                        Position::AtTimestamp => match ctx.initial {
                            InitialPosition::AtTimestamp(at) => (StartAt::AtTimestamp(at), None),
                            _ => {
                                tracing::warn!(shard_id = %shard_id, "lease at AT_TIMESTAMP but no timestamp configured: reading from TRIM_HORIZON");
                                (StartAt::TrimHorizon, None)
                            }
                        },
                        Position::Sequence(seq) => {
                            (StartAt::AtSequence(seq.clone()), Some((seq.clone(), lease.checkpoint.sub_sequence)))
                        }
                        Position::ShardEnd => return Exit::ShardEnded,
                    };
                    processor
                        .initialize(&Initialization {
                            shard_id: shard_id.to_string(),
                            checkpoint: lease.checkpoint.clone(),
                        })
                        .await;
                    initialized = true;
                    let (tx, rx) = mpsc::channel(ctx.polling.prefetch_pages.max(1));
                    let unpacker = Unpacker::new(shard_id.clone(), lease.hash_range, resume_after);
                    let task = match &ctx.fan_out {
                        None => {
                            let fetcher = Fetcher {
                                api: ctx.api.clone(),
                                shard_id: shard_id.clone(),
                                config: ctx.polling.clone(),
                                metrics: ctx.metrics.clone(),
                                unpacker,
                                skip_through: None,
                            };
                            tokio::spawn(fetcher.run(start, tx))
                        }
                        Some((consumer_arn, config)) => {
                            let fetcher = FanOutFetcher {
                                api: ctx.api.clone(),
                                client: ctx.api.client().clone(),
                                consumer_arn: consumer_arn.clone(),
                                shard_id: shard_id.clone(),
                                config: config.clone(),
                                metrics: ctx.metrics.clone(),
                                unpacker,
                                last_read: None,
                                last_records: Instant::now(),
                            };
                            tokio::spawn(fetcher.run(start, tx))
                        }
                    };
                    fetched = Some((rx, AbortOnDrop(task)));
                    ShardConsumerState::Processing
                }
            },
            ShardConsumerState::Processing => {
                let Some((rx, _)) = fetched.as_mut() else { return Exit::Failed };
                // Gather: the first page is awaited; more are added until the batch is full or
                // the gathering time is up.
                let mut next = ShardConsumerState::Processing;
                if pending.is_empty() && !read_to_end {
                    let first = tokio::select! {
                        biased;
                        _ = ctx.held.lost() => Err(Interrupt::Lost),
                        _ = ctx.shutdown.cancelled() => Err(Interrupt::Shutdown),
                        fetch = rx.recv() => Ok(fetch),
                    };
                    match first {
                        Err(i) => next = interrupted(i),
                        Ok(fetch) => {
                            if let Some(failed) = take_fetch(fetch, &mut pending, &mut read_to_end, &mut behind) {
                                tracing::error!(shard_id = %shard_id, error = %failed, "reading the shard failed");
                                return Exit::Failed;
                            }
                            let deadline = Instant::now() + ctx.max_batch_wait;
                            while !ctx.max_batch_wait.is_zero() && pending.len() < ctx.max_batch_records && !read_to_end
                            {
                                let fetch = tokio::select! {
                                    biased;
                                    _ = ctx.held.lost() => break,
                                    _ = ctx.shutdown.cancelled() => break,
                                    _ = tokio::time::sleep_until(deadline) => break,
                                    fetch = rx.recv() => fetch,
                                };
                                if let Some(failed) = take_fetch(fetch, &mut pending, &mut read_to_end, &mut behind) {
                                    tracing::error!(shard_id = %shard_id, error = %failed, "reading the shard failed");
                                    return Exit::Failed;
                                }
                            }
                        }
                    }
                }
                if next != ShardConsumerState::Processing {
                    next
                } else if pending.is_empty() {
                    if read_to_end { ShardConsumerState::ShardEnded } else { ShardConsumerState::Processing }
                } else {
                    match ctx.until_usable().await {
                        Err(i) => interrupted(i),
                        Ok(()) => {
                            let n = pending.len().min(ctx.max_batch_records);
                            let records: Vec<Record> = pending.drain(..n).collect();
                            let batch = Batch { shard_id: shard_id.clone(), records, millis_behind_latest: behind };
                            let (count, bytes) = (batch.records.len() as u64, batch.data_bytes() as u64);
                            checkpointer.delivering(&batch.records);
                            processor.process_records(batch, &mut checkpointer).await;
                            Metrics::add(&ctx.metrics.process_calls, 1);
                            Metrics::add(&ctx.metrics.records_processed, count);
                            Metrics::add(&ctx.metrics.bytes_processed, bytes);
                            if ctx.held.restart_requested() {
                                return Exit::Restart;
                            }
                            ShardConsumerState::Processing
                        }
                    }
                }
            }
            ShardConsumerState::ShardEnded => {
                fetched = None;
                checkpointer.at_shard_end();
                processor.shard_ended(&mut checkpointer).await;
                if ctx.held.restart_requested() {
                    return Exit::Restart;
                }
                if ctx.held.lease().await.checkpoint.position == Position::ShardEnd {
                    Metrics::add(&ctx.metrics.shards_ended, 1);
                    ctx.metrics.behind(&shard_id, None);
                    tracing::info!(shard_id = %shard_id, "shard processed to its end");
                    return Exit::ShardEnded;
                }
                if ctx.held.is_lost() {
                    ShardConsumerState::LeaseLost
                } else {
                    shard_end_attempts += 1;
                    Metrics::add(&ctx.metrics.shard_end_not_checkpointed, 1);
                    let wait = Duration::from_secs(1 << shard_end_attempts.min(5));
                    tracing::error!(shard_id = %shard_id, ?wait,
                        "the processor returned from shard_ended without checkpointing SHARD_END \
                         (call checkpointer.checkpoint()); the shard's children cannot start until it does; \
                         calling shard_ended again");
                    match ctx.pause(wait).await {
                        Ok(()) => ShardConsumerState::ShardEnded,
                        Err(i) => interrupted(i),
                    }
                }
            }
            ShardConsumerState::LeaseLost => {
                drop(fetched.take());
                ctx.metrics.behind(&shard_id, None);
                if initialized {
                    processor.lease_lost().await;
                }
                return Exit::LeaseLost;
            }
            ShardConsumerState::ShuttingDown => {
                drop(fetched.take());
                ctx.metrics.behind(&shard_id, None);
                if initialized {
                    processor.shutdown_requested(&mut checkpointer).await;
                }
                return Exit::Shutdown;
            }
        };
    }
}

/// Adds a fetched page to the pending records. Returns the error of a failed read.
fn take_fetch(
    fetch: Option<Fetch>,
    pending: &mut VecDeque<Record>,
    read_to_end: &mut bool,
    behind: &mut Option<i64>,
) -> Option<crate::KinesisError> {
    match fetch {
        Some(Fetch::Records { records, millis_behind_latest }) => {
            pending.extend(records);
            *behind = millis_behind_latest;
            None
        }
        Some(Fetch::End) => {
            *read_to_end = true;
            None
        }
        Some(Fetch::Failed(error)) => Some(error),
        // The fetcher stopped without a word: it cannot, unless it panicked.
        None => {
            *read_to_end = false;
            Some(crate::KinesisError::new(
                crate::ErrorKind::Fatal,
                "GetRecords",
                None,
                Some("the fetcher task stopped".into()),
            ))
        }
    }
}
