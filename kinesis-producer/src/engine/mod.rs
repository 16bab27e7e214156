//! The pipeline task. It owns every buffered record from `put` until a sender task takes it.
//!
//! ```text
//!  inbox ──▶ route: shard map (hash key ─▶ open shard) ──▶ shard's aggregator ──seal──▶ shard's ready queue
//!                 ▲                                       (full, or RecordMaxBufferedTime)        │
//!                 │                                                                              ▼
//!  waiting (backoff, no shard map yet) ◀── retryable failure ◀── sender task ◀── batch ◀── shard's rate limiter
//!                                                                 │  (encode,    (500 / 5 MiB,  (round robin
//!                                                                 │   PutRecords) shards in turn) over shards)
//!                                                                 └──▶ receipts, metrics
//! ```
//!
//! Records that fail with a retryable error go back through `waiting` with backoff and are routed
//! and aggregated again, so a record of a shard that was split lands in the right child. A record
//! whose deadline (RecordTtl) passes fails with `Expired`, and the record is handed back. Work that
//! is per Kinesis record or per call (encoding and MD5 of aggregates, receipts) happens on the
//! sender tasks, so that this task, which sees every user record, does as little as it can.
//!
//! The stages, a file each:
//! - [`route`]: a record to its shard's aggregator (or to `waiting`), sealing aggregates;
//! - [`shard_map`]: the map routing goes by, and applying a ListShards answer;
//! - [`waiting`]: records waiting for their backoff or a usable map;
//! - [`ready`]: per shard, the aggregate filling and the sealed entries; the round robin and totals;
//! - [`queue`]: one shard's sealed entries in sending order (oldest record first; first in, first
//!   out in ordering mode);
//! - [`dispatch`]: the collector, batches of 500 entries / 5 MiB within each shard's rate limit;
//! - [`outcome`]: what comes back from a call: receipts, retries, failures;
//! - [`ordering`]: the pure parts of ordering mode;
//! - this file: the task's loop, its commands, and when it wakes.

mod dispatch;
mod ordering;
mod outcome;
mod queue;
mod ready;
mod route;
mod shard_map;
mod waiting;

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use backon::ExponentialBuilder;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::time::Instant;

use crate::config::ProducerConfig;
use crate::confirm::Confirmations;
use crate::entry::Entry;
use crate::metrics::Metrics;
use crate::pending::Pending;
use crate::sender::Response;
use crate::transport::{CallError, ShardDescription, Transport};
use ready::Shards;
use shard_map::ShardMap;
use waiting::Waiting;

use outcome::{RECORD_TOO_LARGE, STALE_SHARD_MAP};

/// What the handle sends the task.
pub(crate) enum Command {
    Put(Pending),
    Flush(oneshot::Sender<()>),
    Shutdown(oneshot::Sender<()>),
}

/// A ListShards answer, with the number of the listing (see `confirm.rs`).
type ShardList = (u64, Result<Vec<ShardDescription>, CallError>);

pub(crate) struct Engine {
    config: ProducerConfig,
    transport: Arc<dyn Transport>,
    metrics: Arc<Metrics>,
    /// The stream's name, for receipts.
    stream: Arc<str>,
    /// The producer's places for calls in flight (`max_in_flight_requests`), shared by the
    /// pipelines of every stream.
    slots: Arc<Semaphore>,
    /// A slot taken when one came free while this pipeline waited for one.
    spare_slot: Option<OwnedSemaphorePermit>,
    shard_map: ShardMap,
    shards: Shards,
    waiting: Waiting,
    /// This pipeline's PutRecords calls under way.
    in_flight: usize,
    /// When the earliest entry held back by a shard's rate limiter (or, in ordering mode, its
    /// backoff) may go.
    limiter_wake: Option<Instant>,
    /// User records taken in and not yet resolved.
    outstanding: u64,
    flush_waiters: Vec<oneshot::Sender<()>>,
    shutdown_waiters: Vec<oneshot::Sender<()>>,
    closing: bool,
    backoff: ExponentialBuilder,
    responses: (mpsc::Sender<Response>, mpsc::Receiver<Response>),
    shard_lists: (mpsc::Sender<ShardList>, mpsc::Receiver<ShardList>),
    /// Stored aggregates whose receipts wait for a listing.
    confirmations: Confirmations,
    /// The stream's record limit in bytes, once DescribeStreamSummary said it (0: not known);
    /// shared with the handle, whose `put` checks it.
    stream_limit: Arc<AtomicUsize>,
    /// Calls to send again in parts: a call the service refused as invalid, split to find the
    /// entry it refused (see `outcome.rs`).
    splits: VecDeque<Vec<Entry>>,
}

impl Engine {
    pub(crate) fn new(
        config: ProducerConfig,
        (stream, transport): (Arc<str>, Arc<dyn Transport>),
        metrics: Arc<Metrics>,
        stream_limit: Arc<AtomicUsize>,
        slots: Arc<Semaphore>,
    ) -> Self {
        let backoff = ExponentialBuilder::new()
            .with_min_delay(config.backoff_initial)
            .with_max_delay(config.backoff_max)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times();
        let in_flight = config.max_in_flight_requests;
        Engine {
            shard_map: ShardMap::new(&backoff, Instant::now()),
            backoff,
            config,
            transport,
            metrics,
            stream,
            slots,
            spare_slot: None,
            shards: Shards::default(),
            waiting: Waiting::default(),
            in_flight: 0,
            limiter_wake: None,
            outstanding: 0,
            flush_waiters: Vec::new(),
            shutdown_waiters: Vec::new(),
            closing: false,
            responses: mpsc::channel(in_flight + 1),
            shard_lists: mpsc::channel(1),
            confirmations: Confirmations::default(),
            stream_limit,
            splits: VecDeque::new(),
        }
    }
    /// Learns the stream's record limit (DescribeStreamSummary), on a task of its own. Records
    /// over it then fail at `put`, or when routed if they were buffered before, with the limit
    /// named, instead of failing a whole PutRecords call.
    fn learn_stream_limits(&self) {
        let (transport, limit, configured) =
            (self.transport.clone(), self.stream_limit.clone(), self.config.max_record_bytes);
        tokio::spawn(async move {
            match transport.stream_limits().await {
                Ok(limits) => {
                    if let Some(max) = limits.max_record_bytes {
                        if configured > max {
                            tracing::warn!(
                                configured,
                                stream = max,
                                "max_record_bytes is over the stream's record limit (MaxRecordSizeInKiB); records over the stream's limit are refused"
                            );
                        }
                        limit.store(max, Relaxed);
                    }
                }
                Err(error) => {
                    tracing::debug!(%error, "DescribeStreamSummary failed; the stream's record limit is not known")
                }
            }
        });
    }

    /// Runs until shut down (or every handle is dropped) and every record is resolved.
    pub(crate) async fn run(mut self, mut inbox: mpsc::Receiver<Command>) {
        self.learn_stream_limits();
        let mut inbox_open = true;
        loop {
            let now = Instant::now();
            self.step(now);
            if (self.closing || !inbox_open) && self.outstanding == 0 && self.in_flight == 0 {
                break;
            }
            let wake = self.next_wake(now);
            // With work to send and every slot taken (by this stream or another), a slot coming
            // free wakes the task.
            // (The semaphore is cloned only then: select! builds every branch's future each turn.)
            let wants_slot = (self.shards.count() > 0 || !self.splits.is_empty()) && !self.has_slot();
            let slots = wants_slot.then(|| self.slots.clone());
            tokio::select! {
                biased;
                Some(response) = self.responses.1.recv() => self.on_response(response),
                slot = async move {
                    match slots {
                        Some(slots) => slots.acquire_owned().await.ok(),
                        None => std::future::pending().await,
                    }
                }, if wants_slot => self.spare_slot = slot,
                Some((number, list)) = self.shard_lists.1.recv() => self.on_shard_list(number, list),
                command = inbox.recv(), if inbox_open => match command {
                    Some(command) => {
                        let now = Instant::now();
                        self.on_command(command, now);
                        // Take what else is queued, up to a bound, before the next step.
                        for _ in 0..1024 {
                            match inbox.try_recv() {
                                Ok(command) => self.on_command(command, now),
                                Err(_) => break,
                            }
                        }
                    }
                    None => inbox_open = false,
                },
                () = tokio::time::sleep_until(wake) => {}
            }
        }
        for waiter in self.flush_waiters.drain(..).chain(self.shutdown_waiters.drain(..)) {
            let _ = waiter.send(());
        }
    }

    fn on_command(&mut self, command: Command, now: Instant) {
        match command {
            Command::Put(member) => {
                self.outstanding += 1;
                self.route(member, now);
            }
            Command::Flush(waiter) => {
                self.flush_waiters.push(waiter);
                self.send_buffered_now(now);
            }
            Command::Shutdown(waiter) => {
                self.closing = true;
                self.shutdown_waiters.push(waiter);
                self.send_buffered_now(now);
            }
        }
    }

    /// Everything time-driven: due retries, the shard map, lingering aggregates, sending.
    fn step(&mut self, now: Instant) {
        let confirm = self
            .confirmations
            .listing_due(self.config.shard_map_confirm_interval, now)
            .is_some_and(|due| due <= now && self.shard_map.may_confirm(now));
        if self.shard_map.start_listing(now, confirm) {
            let number = self.confirmations.listing_started(now);
            let (transport, tx) = (self.transport.clone(), self.shard_lists.0.clone());
            tokio::spawn(async move {
                let _ = tx.send((number, transport.list_shards().await)).await;
            });
        }
        for parked in self.confirmations.expired(now) {
            // No listing could confirm it in time (ListShards kept failing): the expired
            // members fail, the others are sent again.
            self.unpark_unconfirmed(parked, now);
        }
        if self.shard_map.usable() {
            while self.shard_map.usable()
                && let Some(member) = self.waiting.pop_due(now)
            {
                self.route(member, now);
            }
        } else if self.waiting.deadline_passed(now) {
            // No usable shard map (ListShards keeps failing, or the stream is mid-reshard): the
            // records waiting for one still expire on time.
            self.expire_waiting(now);
        }
        for shard in self.shards.lingering(now, self.config.record_max_buffered_time) {
            self.seal(&shard);
        }
        self.dispatch(now);
        let pending = self.outstanding;
        self.metrics.user_records_pending.store(pending, Relaxed);
        if pending == 0 {
            for waiter in self.flush_waiters.drain(..) {
                let _ = waiter.send(());
            }
        }
    }

    /// When the task must wake up next, at the latest.
    fn next_wake(&self, now: Instant) -> Instant {
        let mut wake = now + Duration::from_secs(1);
        let confirm_due = self.confirmations.listing_due(self.config.shard_map_confirm_interval, now);
        if let Some(at) = self.shard_map.next_wake(confirm_due) {
            wake = wake.min(at);
        }
        if let Some(deadline) = self.confirmations.earliest_deadline() {
            wake = wake.min(deadline);
        }
        if !self.splits.is_empty() && self.has_slot() {
            wake = now;
        }
        let waiting = if self.shard_map.usable() { self.waiting.next_due() } else { self.waiting.earliest_deadline() };
        if let Some(at) = waiting {
            wake = wake.min(at);
        }
        if let Some(at) = self.shards.next_linger(self.config.record_max_buffered_time) {
            wake = wake.min(at);
        }
        // With every request slot taken, a slot coming free wakes the task.
        if self.shards.count() > 0 && self.has_slot() {
            if let Some(at) = self.limiter_wake {
                wake = wake.min(at);
            }
            if let Some(due) = self.shards.earliest_due().filter(|due| *due > now) {
                wake = wake.min(due);
            }
        }
        wake.max(now)
    }
}
