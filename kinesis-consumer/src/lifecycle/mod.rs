//! One shard's consumer: a task per held lease, an explicit state machine.
//!
//! ```text
//! WaitingOnParents ─▶ Initializing ─▶ Processing ─▶ ShardEnded ─▶ (lease released)
//!        │                 │              │   ├────▶ LeaseLost ─▶ (lease forgotten)
//!        │                 │              │   └────▶ HandingOff ─▶ (lease transferred to the new owner)
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
//! - **HandingOff**: a KCL 3.x leader moves the lease to another worker (a graceful handoff):
//!   reading stops, `shutdown_requested` checkpoints what was processed, and the scheduler
//!   transfers the lease; the new owner starts at exactly that checkpoint.
//!
//! Each state is a method in a file of its own (`parents`, `initialize`, `process`,
//! `shard_end`).

mod initialize;
mod parents;
mod process;
mod shard_end;

use std::collections::VecDeque;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::checkpointer::Checkpointer;
use crate::failure::{FailedRecords, FailurePolicy, Retrying};
use crate::leases::held::HeldLease;
use crate::leases::lease::Position;
use crate::leases::shard_sync::InitialPosition;
use crate::leases::table::LeaseTable;
use crate::metrics::Metrics;
use crate::processor::Processor;
use crate::record::{Record, Unpacker};
use crate::retrieval::fan_out::{FanOutConfig, FanOutFetcher};
use crate::retrieval::kinesis::{KinesisApi, StartAt};
use crate::retrieval::polling::{Fetch, Fetcher, PollingConfig};

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
    /// The lease moves to another worker (KCL 3.x graceful handoff).
    HandingOff,
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
    /// A graceful handoff: the processor had its `shutdown_requested`; the lease is transferred.
    HandedOff,
}

/// What a shard consumer needs.
pub(crate) struct Context {
    pub held: Arc<HeldLease>,
    /// The stream's name, and its identifier in a multi-stream application.
    pub stream: Arc<str>,
    pub stream_identifier: Option<Arc<str>>,
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

impl AbortOnDrop {
    /// Waits for the task to end (it is aborted if this wait is dropped first).
    pub(crate) async fn wait(mut self) {
        let _ = (&mut self.0).await;
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What interrupted a wait.
enum Interrupt {
    Lost,
    Handoff,
    Shutdown,
}

impl Context {
    /// Resolves when the lease is lost, a handoff is asked for, or shutdown begins, in that order
    /// of precedence.
    async fn interrupted(&self) -> Interrupt {
        tokio::select! {
            biased;
            _ = self.held.lost() => Interrupt::Lost,
            _ = self.held.handoff_requested() => Interrupt::Handoff,
            _ = self.shutdown.cancelled() => Interrupt::Shutdown,
        }
    }

    /// Sleeps for `duration` unless interrupted first.
    async fn pause(&self, duration: Duration) -> Result<(), Interrupt> {
        tokio::select! {
            biased;
            interrupt = self.interrupted() => Err(interrupt),
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
            if self.held.is_handing_off() {
                return Err(Interrupt::Handoff);
            }
            if self.held.usable(now) {
                return Ok(());
            }
            let wait = self.held.not_before().saturating_duration_since(now).max(Duration::from_millis(10));
            self.pause(wait.min(Duration::from_millis(100))).await?;
        }
    }

    /// Whether every parent of `lease` (shard ids, of the same stream) is processed to its end.
    async fn parents_done(&self, lease: &crate::Lease) -> bool {
        for parent in &lease.parent_shard_ids {
            match self.table.get(&lease.sibling_key(parent)).await {
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
                    lease_key: self.held.key().into(),
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
                    lease_key: self.held.key().into(),
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
        let mut waits = crate::retrieval::polling::backoff(self.failure_policy.backoff);
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
        Interrupt::Handoff => ShardConsumerState::HandingOff,
        Interrupt::Shutdown => ShardConsumerState::ShuttingDown,
    }
}

/// A shard's consumer: the processor, its checkpointer, and what the states share.
struct ShardConsumer<P> {
    ctx: Context,
    processor: P,
    shard_id: Arc<str>,
    checkpointer: Checkpointer,
    /// Whether `initialize` was called (the ending calls are made only then).
    initialized: bool,
    /// The fetcher reading the shard, while one runs.
    fetched: Option<(mpsc::Receiver<Fetch>, AbortOnDrop)>,
    /// Records fetched and not yet delivered.
    pending: VecDeque<Record>,
    /// The fetcher reached the end of the closed shard.
    read_to_end: bool,
    /// MillisBehindLatest of the last page.
    behind: Option<i64>,
    /// How many times `shard_ended` returned without checkpointing SHARD_END.
    shard_end_attempts: u32,
    /// A failed range being retried (the poison-record policy).
    retrying: Option<Retrying>,
    /// The positions of the last batch delivered (the allocation is reused).
    positions: Vec<(Arc<str>, u64)>,
}

/// What a state leads to: the next state, or the consumer's end.
type Step = ControlFlow<Exit, ShardConsumerState>;

/// Runs a shard's consumer to its end.
pub(crate) async fn run<P: Processor>(ctx: Context, processor: P) -> Exit {
    let shard_id: Arc<str> = ctx.held.shard_id().into();
    let checkpointer = Checkpointer::new(ctx.held.clone(), ctx.table.clone(), ctx.metrics.clone());
    let mut consumer = ShardConsumer {
        ctx,
        processor,
        shard_id,
        checkpointer,
        initialized: false,
        fetched: None,
        pending: VecDeque::new(),
        read_to_end: false,
        behind: None,
        shard_end_attempts: 0,
        retrying: None,
        positions: Vec::new(),
    };
    let mut state = ShardConsumerState::WaitingOnParents;
    loop {
        tracing::debug!(shard_id = %consumer.shard_id, ?state, "shard consumer");
        let step = match state {
            ShardConsumerState::WaitingOnParents => consumer.waiting_on_parents().await,
            ShardConsumerState::Initializing => consumer.initializing().await,
            ShardConsumerState::Processing => consumer.processing().await,
            ShardConsumerState::ShardEnded => consumer.shard_ended().await,
            ShardConsumerState::LeaseLost => consumer.lease_lost().await,
            ShardConsumerState::ShuttingDown => consumer.shutting_down().await,
            ShardConsumerState::HandingOff => consumer.handing_off().await,
        };
        match step {
            ControlFlow::Continue(next) => state = next,
            ControlFlow::Break(exit) => return exit,
        }
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
