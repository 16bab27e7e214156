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
use crate::failure::{FailedRecords, FailurePolicy, Next, Retrying};
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
    /// What follows a failure the processor reports.
    pub failure_policy: FailurePolicy,
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

    /// Starts reading the shard at `start` on a task of its own.
    fn spawn_fetcher(
        &self,
        shard_id: &Arc<str>,
        start: StartAt,
        unpacker: Unpacker,
    ) -> (mpsc::Receiver<Fetch>, AbortOnDrop) {
        let (tx, rx) = mpsc::channel(self.polling.prefetch_pages.max(1));
        let task = match &self.fan_out {
            None => {
                let fetcher = Fetcher {
                    api: self.api.clone(),
                    shard_id: shard_id.clone(),
                    config: self.polling.clone(),
                    metrics: self.metrics.clone(),
                    unpacker,
                };
                tokio::spawn(fetcher.run(start, tx))
            }
            Some((consumer_arn, config)) => {
                let fetcher = FanOutFetcher {
                    api: self.api.clone(),
                    client: self.api.client().clone(),
                    consumer_arn: consumer_arn.clone(),
                    shard_id: shard_id.clone(),
                    config: config.clone(),
                    metrics: self.metrics.clone(),
                    unpacker,
                    last_read: None,
                    last_records: Instant::now(),
                };
                tokio::spawn(fetcher.run(start, tx))
            }
        };
        (rx, AbortOnDrop(task))
    }

    /// Hands failed records to the policy's destination, trying until it takes them (or the
    /// lease is lost, or shutdown begins).
    async fn divert(&self, failed: FailedRecords) -> Result<(), Interrupt> {
        let Some(destination) = self.failure_policy.destination.clone() else { return Ok(()) };
        let mut waits = crate::fetcher::backoff(self.failure_policy.backoff);
        loop {
            match destination.failed(failed.clone()).await {
                Ok(()) => return Ok(()),
                Err(error) => {
                    let wait = waits.next().unwrap_or(self.failure_policy.backoff.1);
                    tracing::warn!(shard_id = %failed.shard_id, %error, ?wait, "the on-failure destination refused the records; trying again");
                    self.pause(wait).await?;
                }
            }
        }
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
    // A failed range being retried (the poison-record policy), and the positions of the last
    // batch delivered (the allocation is reused).
    let mut retrying: Option<Retrying> = None;
    let mut positions: Vec<(Arc<str>, u64)> = Vec::new();
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
                    let mut lease = ctx.held.lease().await;
                    if lease.checkpoint.position == Position::Latest {
                        // Make the start durable before anything is processed (see latest.rs).
                        match crate::latest::durable_start(&ctx.api, &shard_id, std::time::SystemTime::now()).await {
                            Some(anchor) => match checkpointer.anchor(anchor.clone()).await {
                                Ok(()) => {
                                    tracing::debug!(shard_id = %shard_id, checkpoint = anchor.position.as_str(), "LATEST made durable");
                                    lease = ctx.held.lease().await;
                                }
                                Err(error) => {
                                    tracing::warn!(shard_id = %shard_id, %error, "writing the start of a LATEST lease failed; it stays at LATEST until the first checkpoint");
                                }
                            },
                            None => tracing::warn!(shard_id = %shard_id,
                                "the newest record of the shard was not found within the pages searched; the lease stays at LATEST until the first checkpoint"),
                        }
                    }
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
                    let unpacker = Unpacker::new(shard_id.clone(), lease.hash_range, resume_after);
                    fetched = Some(ctx.spawn_fetcher(&shard_id, start, unpacker));
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
                            let limit = retrying.as_ref().map_or(usize::MAX, |r| r.limit);
                            let n = pending.len().min(ctx.max_batch_records).min(limit);
                            let records: Vec<Record> = pending.drain(..n).collect();
                            positions.clear();
                            positions
                                .extend(records.iter().map(|r| (r.sequence_number.clone(), r.sub_sequence_number)));
                            // A retried delivery is kept: its records may go to the destination.
                            let kept = retrying.as_ref().map(|_| records.clone());
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
                            match checkpointer.take_failure() {
                                None => {
                                    retrying = None;
                                    ShardConsumerState::Processing
                                }
                                Some(failed) => {
                                    Metrics::add(&ctx.metrics.processing_failures, 1);
                                    let from = (failed.sequence_number.clone(), failed.sub_sequence_number);
                                    let at = positions.iter().position(|p| *p == from).unwrap_or(0);
                                    let range = positions.len() - at;
                                    let policy = &ctx.failure_policy;
                                    let current =
                                        retrying.get_or_insert_with(|| Retrying::new(policy, from.clone(), range));
                                    match current.failed(policy, from.clone(), range) {
                                        Next::Retry { wait, .. } => {
                                            tracing::warn!(shard_id = %shard_id, sequence_number = %from.0, sub = from.1,
                                                attempts = current.attempts, ?wait, "the processor failed at a record; delivering it again");
                                            // Read again from the failed record.
                                            drop(fetched.take());
                                            pending.clear();
                                            read_to_end = false;
                                            match ctx.pause(wait).await {
                                                Err(i) => interrupted(i),
                                                Ok(()) => {
                                                    let hash_range = ctx.held.lease().await.hash_range;
                                                    let unpacker = Unpacker::starting_at(
                                                        shard_id.clone(),
                                                        hash_range,
                                                        (from.0.to_string(), from.1),
                                                    );
                                                    let start = StartAt::AtSequence(from.0.to_string());
                                                    fetched = Some(ctx.spawn_fetcher(&shard_id, start, unpacker));
                                                    ShardConsumerState::Processing
                                                }
                                            }
                                        }
                                        Next::Divert => {
                                            let attempts = current.attempts;
                                            retrying = None;
                                            let records: Vec<Record> = kept.unwrap_or_default().split_off(at);
                                            let last = records
                                                .last()
                                                .map(|r| (r.sequence_number.clone(), r.sub_sequence_number));
                                            let n = records.len() as u64;
                                            tracing::warn!(shard_id = %shard_id, records = n, attempts,
                                                "records still fail after the policy's retries: handing them to the on-failure destination and moving on");
                                            let failed =
                                                FailedRecords { shard_id: shard_id.clone(), records, attempts };
                                            match ctx.divert(failed).await {
                                                Err(i) => interrupted(i),
                                                Ok(()) => {
                                                    Metrics::add(&ctx.metrics.records_diverted, n);
                                                    if let Some((seq, sub)) = last
                                                        && let Err(error) = checkpointer.checkpoint_at(&seq, sub).await
                                                    {
                                                        tracing::warn!(shard_id = %shard_id, %error, "checkpointing after the diverted records failed");
                                                    }
                                                    ShardConsumerState::Processing
                                                }
                                            }
                                        }
                                    }
                                }
                            }
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
