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

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, SystemTime};

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use hashbrown::HashMap;
use kinesis_aggregation::{Aggregator, AggregatorConfig, HashKeyRange, ShardRanges, UserRecord};
use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot};
use tokio::time::Instant;

use crate::batch::Batch;
use crate::config::ProducerConfig;
use crate::confirm::{Confirmations, Parked, Verdict, judge};
use crate::entry::Entry;
use crate::error::{DeliveryError, ErrorKind};
use crate::metrics::Metrics;
use crate::rate_limit::ShardLimiter;
use crate::ready::ReadyQueue;
use crate::receipt::{Attempt, Attempts, Receipt};
use crate::sender::{self, Response, Unresolved};
use crate::transport::{CallError, EntryResult, ShardDescription, Transport};

/// A buffered user record and everything needed to resolve it.
pub(crate) struct Pending {
    pub(crate) record: UserRecord,
    /// The hash key Kinesis routes it by (worked out by `put`, on the caller's task).
    pub(crate) hash_key: u128,
    /// Partition key + data, in bytes.
    pub(crate) size: usize,
    pub(crate) reply: oneshot::Sender<Result<Receipt, DeliveryError>>,
    pub(crate) enqueued: Instant,
    pub(crate) deadline: Instant,
    /// Failed attempts and the backoff, from the first failure on (most records never need it;
    /// boxed, it keeps the record small to move).
    pub(crate) retry: Option<Box<Retry>>,
    /// Buffer space, given back when the record is resolved (dropped).
    pub(crate) _permits: (OwnedSemaphorePermit, OwnedSemaphorePermit),
}

/// A record's history of failures.
#[derive(Default)]
pub(crate) struct Retry {
    attempts: Vec<Attempt>,
    backoff: Option<ExponentialBackoff>,
}

impl Pending {
    /// Notes a failed attempt.
    fn failed_attempt(&mut self, attempt: Attempt) {
        self.retry.get_or_insert_default().attempts.push(attempt);
    }

    /// The wait before the next try, from the record's own backoff.
    fn next_backoff(&mut self, backoff: &ExponentialBuilder) -> Option<Duration> {
        self.retry.get_or_insert_default().backoff.get_or_insert_with(|| backoff.build()).next()
    }

    /// The error code of the last failed attempt.
    fn last_code(&self) -> Option<String> {
        self.retry.as_ref()?.attempts.last()?.error_code.clone()
    }

    /// The attempts so far.
    pub(crate) fn take_attempts(&mut self) -> Attempts {
        Attempts::from_vec(self.retry.take().map(|r| r.attempts).unwrap_or_default())
    }
}

/// What the handle sends the task.
pub(crate) enum Command {
    Put(Pending),
    Flush(oneshot::Sender<()>),
    Shutdown(oneshot::Sender<()>),
}

struct ShardState {
    /// The hash-key range the shard had in the map its records were routed by. A listing that
    /// gives the shard id another range (the stream was re-created) dissolves the state.
    range: HashKeyRange,
    aggregator: Aggregator,
    members: Vec<Pending>,
    /// When the aggregate started filling: it is sealed `record_max_buffered_time` later. (Not the
    /// members' put time: retried records would then seal every aggregate at once, one or two
    /// records each.)
    aggregate_started: Option<Instant>,
    /// Sealed entries, oldest first, waiting for the rate limiter and a batch.
    ready: ReadyQueue<Entry>,
    /// Whether the shard is in the engine's `active` list.
    active: bool,
    limiter: ShardLimiter,
    /// Ordering mode: a call carrying this shard's record is in flight.
    busy: bool,
    /// Ordering mode: the shard's first record failed and waits for its backoff until then.
    blocked_until: Option<Instant>,
}

/// A ListShards answer, with the number of the listing (see `confirm.rs`).
type ShardList = (u64, Result<Vec<ShardDescription>, CallError>);

pub(crate) struct Engine {
    config: ProducerConfig,
    transport: Arc<dyn Transport>,
    metrics: Arc<Metrics>,
    map: Option<ShardRanges<Arc<str>>>,
    shards: HashMap<Arc<str>, ShardState>,
    /// Shards with ready entries, in the order the collector visits them (round robin).
    active: VecDeque<Arc<str>>,
    /// Ready entries over all shards, and their bytes.
    ready_count: usize,
    ready_bytes: usize,
    /// Records waiting for their backoff, or for a shard map; keyed by (not before, sequence).
    waiting: BTreeMap<(Instant, u64), Pending>,
    waiting_seq: u64,
    /// No later than the earliest deadline in `waiting` (exact after a scan).
    waiting_deadline: Option<Instant>,
    in_flight: usize,
    /// When the earliest entry held back by a shard's rate limiter may go.
    limiter_wake: Option<Instant>,
    outstanding: u64,
    flush_waiters: Vec<oneshot::Sender<()>>,
    shutdown_waiters: Vec<oneshot::Sender<()>>,
    closing: bool,
    refresh_in_flight: bool,
    refresh_due: Option<Instant>,
    /// A record landed on a shard other than the predicted one: the map is out of date, and
    /// routing waits for the next listing.
    map_stale: bool,
    refresh_backoff: ExponentialBackoff,
    backoff: ExponentialBuilder,
    responses: (mpsc::Sender<Response>, mpsc::Receiver<Response>),
    shard_lists: (mpsc::Sender<ShardList>, mpsc::Receiver<ShardList>),
    /// Stored aggregates whose receipts wait for a listing.
    confirmations: Confirmations,
    /// The stream's record limit in bytes, once DescribeStreamSummary said it (0: not known);
    /// shared with the handle, whose `put` checks it.
    stream_limit: Arc<AtomicUsize>,
    /// Calls to send again in parts: a call the service refused as invalid, split to find the
    /// entry it refused (see `on_call_failed`).
    splits: VecDeque<Vec<Entry>>,
    /// After a failed listing, the next one waits until then (its backoff).
    list_retry_at: Option<Instant>,
}

impl Engine {
    pub(crate) fn new(
        config: ProducerConfig,
        transport: Arc<dyn Transport>,
        metrics: Arc<Metrics>,
        stream_limit: Arc<AtomicUsize>,
    ) -> Self {
        let backoff = ExponentialBuilder::new()
            .with_min_delay(config.backoff_initial)
            .with_max_delay(config.backoff_max)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times();
        let in_flight = config.max_in_flight_requests;
        Engine {
            refresh_backoff: backoff.build(),
            backoff,
            config,
            transport,
            metrics,
            map: None,
            shards: HashMap::new(),
            active: VecDeque::new(),
            ready_count: 0,
            ready_bytes: 0,
            waiting: BTreeMap::new(),
            waiting_seq: 0,
            waiting_deadline: None,
            in_flight: 0,
            limiter_wake: None,
            outstanding: 0,
            flush_waiters: Vec::new(),
            shutdown_waiters: Vec::new(),
            closing: false,
            refresh_in_flight: false,
            refresh_due: Some(Instant::now()),
            map_stale: false,
            responses: mpsc::channel(in_flight + 1),
            shard_lists: mpsc::channel(1),
            confirmations: Confirmations::default(),
            stream_limit,
            splits: VecDeque::new(),
            list_retry_at: None,
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
            tokio::select! {
                biased;
                Some(response) = self.responses.1.recv() => self.on_response(response),
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

    /// Flush or shutdown: what is buffered now goes without waiting for the linger time. Records
    /// that come back later for a retry aggregate as usual, so a flush under throttling does not
    /// turn every retry into a one-record aggregate.
    fn send_buffered_now(&mut self, now: Instant) {
        let shards: Vec<Arc<str>> =
            self.shards.iter().filter(|(_, s)| !s.members.is_empty()).map(|(id, _)| id.clone()).collect();
        for shard in shards {
            self.seal(&shard);
        }
        for state in self.shards.values_mut() {
            for entry in state.ready.iter_mut() {
                entry.due = entry.due.min(now);
            }
        }
    }

    /// Puts a record in its shard's aggregator, or in `waiting` while there is no shard map.
    fn route(&mut self, member: Pending, now: Instant) {
        if now >= member.deadline {
            let code = member.last_code();
            return self.fail(member, ErrorKind::Expired, code);
        }
        let limit = self.stream_limit.load(Relaxed);
        if limit > 0 && member.size > limit {
            let message = format!(
                "the record has {} bytes (partition key + data), over the stream's record limit of {limit} (MaxRecordSizeInKiB)",
                member.size
            );
            return self.fail_with(member, ErrorKind::InvalidInput, Some(RECORD_TOO_LARGE.into()), Some(message));
        }
        let shard = match &self.map {
            Some(map) if !self.map_stale => map.lookup(member.hash_key).map(|(range, id)| (*range, id.clone())),
            _ => None,
        };
        let Some((range, shard)) = shard else {
            // No map yet, an out-of-date one, or a gap in it (mid-reshard): wait, in put order, for
            // the next listing; `step` routes waiting records only once there is a good map.
            if self.map.is_some() {
                self.map_out_of_date(now);
            }
            return self.wait(member, now);
        };
        let config = &self.config;
        if !self.shards.contains_key(&shard) {
            self.shards.insert(shard.clone(), ShardState::new(config, now, range));
        }
        let Some(state) = self.shards.get_mut(&shard) else { return self.wait(member, now) };
        if !config.aggregation {
            let entry = Entry::plain(config, shard, member);
            return self.push_ready(entry);
        }
        match state.aggregator.try_push_ref(&member.record) {
            Ok(true) => {
                state.aggregate_started.get_or_insert(now);
                state.members.push(member);
            }
            Ok(false) => {
                self.seal(&shard);
                let Some(state) = self.shards.get_mut(&shard) else { return };
                if matches!(state.aggregator.try_push_ref(&member.record), Ok(true)) {
                    state.aggregate_started = Some(now);
                    state.members.push(member);
                } else {
                    // Checked at put: a record within the record limit fits an empty aggregate,
                    // or is sent plain.
                    let entry = Entry::plain(&self.config, shard, member);
                    self.push_ready(entry);
                }
            }
            Err(_) => {
                let entry = Entry::plain(config, shard, member);
                self.push_ready(entry);
            }
        }
    }

    /// Turns a shard's aggregator into a ready entry.
    fn seal(&mut self, shard: &Arc<str>) {
        let Some(state) = self.shards.get_mut(shard) else { return };
        if state.members.is_empty() {
            return;
        }
        // The next aggregate will likely hold as many records as this one.
        let capacity = state.members.len();
        let members = std::mem::replace(&mut state.members, Vec::with_capacity(capacity));
        let started = state.aggregate_started.take().unwrap_or_else(Instant::now);
        if let Some(entry) = Entry::pack(&self.config, shard, &mut state.aggregator, members, started) {
            self.push_ready(entry);
        }
    }

    /// Queues an entry behind its shard's others.
    fn push_ready(&mut self, entry: Entry) {
        let Some(state) = self.shards.get_mut(&entry.shard) else {
            // Every routed shard has a state; an entry without one is routed again.
            return self.dissolve(entry, Instant::now());
        };
        self.ready_count += 1;
        self.ready_bytes += entry.size;
        if !state.active {
            state.active = true;
            self.active.push_back(entry.shard.clone());
        }
        state.ready.push_back(entry);
    }

    /// Puts entries back at the head of their shard's queue (ordering mode), in the given order.
    fn push_ready_front(&mut self, shard: &Arc<str>, entries: Vec<Entry>) {
        let Some(state) = self.shards.get_mut(shard) else {
            let now = Instant::now();
            return entries.into_iter().for_each(|entry| self.dissolve(entry, now));
        };
        for entry in entries.into_iter().rev() {
            self.ready_count += 1;
            self.ready_bytes += entry.size;
            state.ready.push_front(entry);
        }
        if !state.active && !state.ready.is_empty() {
            state.active = true;
            self.active.push_back(shard.clone());
        }
    }

    fn wait(&mut self, member: Pending, not_before: Instant) {
        self.waiting_seq += 1;
        self.waiting_deadline = Some(self.waiting_deadline.map_or(member.deadline, |d| d.min(member.deadline)));
        self.waiting.insert((not_before, self.waiting_seq), member);
    }

    /// Fails the waiting records whose deadline has passed.
    fn expire_waiting(&mut self, now: Instant) {
        let expired: Vec<(Instant, u64)> =
            self.waiting.iter().filter(|(_, m)| m.deadline <= now).map(|(key, _)| *key).collect();
        for key in expired {
            if let Some(member) = self.waiting.remove(&key) {
                let code = member.last_code();
                self.fail(member, ErrorKind::Expired, code);
            }
        }
        self.waiting_deadline = self.waiting.values().map(|m| m.deadline).min();
    }

    /// ListShards failed for good (the stream does not exist, access is denied): the records
    /// waiting for a shard map fail with its error.
    fn fail_waiting(&mut self, error: &CallError) {
        let code = error.code.clone().unwrap_or_else(|| format!("{:?}", error.kind));
        for (_, mut member) in std::mem::take(&mut self.waiting) {
            member.failed_attempt(Attempt {
                at: SystemTime::now(),
                duration: Duration::ZERO,
                error_code: Some(code.clone()),
            });
            self.fail(member, error.kind, Some(code.clone()));
        }
        self.waiting_deadline = None;
    }

    /// Everything time-driven: due retries, the shard map, lingering aggregates, sending.
    fn step(&mut self, now: Instant) {
        let confirm_due = self
            .confirmations
            .listing_due(self.config.shard_map_confirm_interval, now)
            .is_some_and(|due| due <= now && self.list_retry_at.is_none_or(|at| at <= now));
        if !self.refresh_in_flight && (self.refresh_due.is_some_and(|due| due <= now) || confirm_due) {
            self.refresh_due = None;
            self.refresh_in_flight = true;
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
        if self.map.is_some() && !self.map_stale {
            while let Some(entry) = self.waiting.first_entry() {
                if entry.key().0 > now {
                    break;
                }
                let member = entry.remove();
                self.route(member, now);
            }
        } else if self.waiting_deadline.is_some_and(|deadline| deadline <= now) {
            // No usable shard map (ListShards keeps failing, or the stream is mid-reshard): the
            // records waiting for one still expire on time.
            self.expire_waiting(now);
        }
        let linger = self.config.record_max_buffered_time;
        let lingering: Vec<Arc<str>> = self
            .shards
            .iter()
            .filter(|(_, s)| s.aggregate_started.is_some_and(|t| t + linger <= now))
            .map(|(id, _)| id.clone())
            .collect();
        for shard in lingering {
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

    /// The earliest `due` of the shards' oldest ready entries.
    fn earliest_due(&self) -> Option<Instant> {
        self.active.iter().filter_map(|id| self.shards.get(id)?.ready.front().map(|e| e.due)).min()
    }

    /// Sends batches while there is room in flight and something worth sending: a full batch's
    /// worth, or an entry that has waited its linger time.
    fn dispatch(&mut self, now: Instant) {
        self.limiter_wake = None;
        // Parts of a call the service refused as invalid go first, each as a call of its own.
        while self.in_flight < self.config.max_in_flight_requests {
            let Some(part) = self.splits.pop_front() else { break };
            self.in_flight += 1;
            let (transport, metrics, tx) = (self.transport.clone(), self.metrics.clone(), self.responses.0.clone());
            sender::spawn(transport, metrics, part, self.config.ordering, tx);
        }
        while self.in_flight < self.config.max_in_flight_requests && self.ready_count > 0 {
            let worth_it = self.ready_count >= self.config.collection_max_count
                || self.ready_bytes >= self.config.collection_max_bytes
                || self.earliest_due().is_some_and(|due| due <= now);
            if !worth_it {
                return;
            }
            let mut batch = Batch::new(self.config.collection_max_count, self.config.collection_max_bytes);
            // Visit every shard with ready entries once, starting where the last batch stopped.
            for _ in 0..self.active.len() {
                if batch.is_full() {
                    break;
                }
                let Some(shard) = self.active.pop_front() else { break };
                self.collect(&shard, &mut batch, now);
                if let Some(state) = self.shards.get_mut(&shard) {
                    if state.ready.is_empty() {
                        state.active = false;
                    } else {
                        self.active.push_back(shard);
                    }
                }
            }
            if batch.is_empty() {
                return;
            }
            self.in_flight += 1;
            let (transport, metrics, tx) = (self.transport.clone(), self.metrics.clone(), self.responses.0.clone());
            sender::spawn(transport, metrics, batch.into_entries(), self.config.ordering, tx);
        }
    }

    /// Moves a shard's ready entries into the batch while its rate limiter, the batch and (in
    /// ordering mode) its one call in flight allow.
    fn collect(&mut self, shard: &Arc<str>, batch: &mut Batch<Entry>, now: Instant) {
        let ordering = self.config.ordering;
        loop {
            let Some(state) = self.shards.get_mut(shard) else { return };
            let Some(front) = state.ready.front() else { return };
            if !batch.fits(front.size) {
                return;
            }
            if front.deadline <= now {
                let Some(entry) = state.ready.pop_front() else { return };
                self.ready_count -= 1;
                self.ready_bytes -= entry.size;
                if ordering {
                    // The survivors keep their place ahead of the shard's later records.
                    let rebuilt = self.rebuild(entry, now);
                    self.push_ready_front(shard, rebuilt);
                } else {
                    self.dissolve(entry, now);
                }
                continue;
            }
            if ordering && (state.busy || state.blocked_until.is_some_and(|t| t > now)) {
                if let Some(at) = state.blocked_until.filter(|t| *t > now) {
                    self.limiter_wake = Some(self.limiter_wake.map_or(at, |w| w.min(at)));
                }
                return;
            }
            if let Err(wait) = state.limiter.try_take(now, front.size) {
                let at = now + wait;
                self.limiter_wake = Some(self.limiter_wake.map_or(at, |w| w.min(at)));
                return;
            }
            let Some(entry) = state.ready.pop_front() else { return };
            self.ready_count -= 1;
            self.ready_bytes -= entry.size;
            let size = entry.size;
            if batch.try_push(entry, size).is_err() {
                unreachable!("checked with `fits` above");
            }
            if ordering {
                // One Kinesis record per shard per call, one call per shard in flight.
                state.busy = true;
                state.blocked_until = None;
                return;
            }
        }
    }

    /// Ordering mode: fails an entry's expired members and packs the others, in order, into new
    /// entries for the same shard (which the caller puts back where the old one was).
    fn rebuild(&mut self, entry: Entry, now: Instant) -> Vec<Entry> {
        let survivors = self.fail_expired(entry.members, now);
        // Each new entry is due a linger time after its oldest member was put.
        let oldest = |members: &[Pending]| members.iter().map(|m| m.enqueued).min().unwrap_or(now);
        let shard = entry.shard;
        let mut entries = Vec::new();
        let mut aggregator =
            Aggregator::with_config(AggregatorConfig::with_max_bytes(self.config.aggregation_max_bytes));
        let mut members: Vec<Pending> = Vec::new();
        for member in survivors {
            if self.config.aggregation {
                if matches!(aggregator.try_push_ref(&member.record), Ok(true)) {
                    members.push(member);
                    continue;
                }
                // Full: close this aggregate and start the next with the member.
                let batch = std::mem::take(&mut members);
                let started = oldest(&batch);
                entries.extend(Entry::pack(&self.config, &shard, &mut aggregator, batch, started));
                if matches!(aggregator.try_push_ref(&member.record), Ok(true)) {
                    members.push(member);
                    continue;
                }
            }
            entries.push(Entry::plain(&self.config, shard.clone(), member));
        }
        let started = oldest(&members);
        entries.extend(Entry::pack(&self.config, &shard, &mut aggregator, members, started));
        entries
    }

    /// Fails the members whose deadline has passed, and returns the others in order.
    fn fail_expired(&mut self, members: Vec<Pending>, now: Instant) -> Vec<Pending> {
        let mut survivors = Vec::with_capacity(members.len());
        for member in members {
            if member.deadline <= now {
                let code = member.last_code();
                self.fail(member, ErrorKind::Expired, code);
            } else {
                survivors.push(member);
            }
        }
        survivors
    }

    /// Takes an entry apart: expired members fail, the others are routed again.
    fn dissolve(&mut self, entry: Entry, now: Instant) {
        for member in self.fail_expired(entry.members, now) {
            self.route(member, now);
        }
    }

    fn on_response(&mut self, response: Response) {
        self.in_flight -= 1;
        let now = Instant::now();
        let Response { shards, delivered, map_out_of_date, unresolved, to_confirm, at, duration } = response;
        self.outstanding -= delivered;
        let after = self.confirmations.next_after();
        for (entry, shard_id, sequence_number) in to_confirm {
            let parked = Parked { entry, shard_id, sequence_number, after, at, duration };
            self.confirmations.park(parked, self.config.ordering);
        }
        for shard in &shards {
            // Ordering mode: a shard whose aggregate waits for its listing stays busy.
            if self.config.ordering && self.confirmations.holds_shard(shard) {
                continue;
            }
            if let Some(state) = self.shards.get_mut(shard) {
                state.busy = false;
            }
        }
        if map_out_of_date {
            self.map_out_of_date(now);
        }
        match unresolved {
            Unresolved::Call(error, entries) => self.on_call_failed(error, entries, at, duration, now),
            Unresolved::Entries(entries) => {
                for (entry, result) in entries {
                    match result {
                        EntryResult::Stored { shard_id, .. } => {
                            // An aggregate on a shard it was not built for (the stream was
                            // resharded): a KCL reader drops it whole when any sub-record is
                            // outside the shard. Send every member again, routed by a fresh map.
                            tracing::debug!(predicted = %entry.shard, actual = %shard_id, "aggregate landed on another shard");
                            self.map_out_of_date(now);
                            self.metrics.error(STALE_SHARD_MAP, entry.members.len() as u64);
                            for mut member in entry.members {
                                member.failed_attempt(Attempt {
                                    at,
                                    duration,
                                    error_code: Some(STALE_SHARD_MAP.into()),
                                });
                                self.retry_or_fail(member, ErrorKind::Transient, now);
                            }
                        }
                        EntryResult::Failed { code } => {
                            let kind = ErrorKind::of_code(&code);
                            self.metrics.error(&code, 1);
                            if kind == ErrorKind::Throttled
                                && let Some(state) = self.shards.get_mut(&entry.shard)
                            {
                                state.limiter.throttled(now);
                            }
                            self.entry_failed(entry, kind, &code, at, duration, now);
                        }
                    }
                }
            }
        }
    }

    /// A whole PutRecords call failed.
    ///
    /// - ResourceNotFound: the stream is gone (deleted, perhaps to be created again under the
    ///   same name, with other shards behind the same ids): the shard map is out of date.
    /// - A call the service refused as invalid (ValidationException, InvalidArgument): one entry
    ///   can make the service refuse every entry of a call (a record over the stream's limit).
    ///   The call is sent again in halves until the entry it refuses is alone; that one fails with
    ///   the service's message, the others are delivered. An aggregate refused alone is sent
    ///   again as its records, each plain.
    fn on_call_failed(
        &mut self,
        error: CallError,
        entries: Vec<Entry>,
        at: SystemTime,
        duration: Duration,
        now: Instant,
    ) {
        let code = error.code.clone().unwrap_or_else(|| format!("{:?}", error.kind));
        self.metrics.error(&code, entries.iter().map(|e| e.members.len() as u64).sum());
        tracing::debug!(kind = ?error.kind, %code, message = %error.message, entries = entries.len(), "PutRecords call failed");
        if error.kind == ErrorKind::NotFound {
            self.map_out_of_date(now);
        }
        if error.kind != ErrorKind::InvalidInput {
            for entry in entries {
                self.entry_failed(entry, error.kind, &code, at, duration, now);
            }
            return;
        }
        let mut entries = entries;
        for entry in &mut entries {
            for member in &mut entry.members {
                member.failed_attempt(Attempt { at, duration, error_code: Some(code.clone()) });
            }
        }
        let parts: Vec<Vec<Entry>> = match entries.len() {
            0 => Vec::new(),
            1 if entries[0].members.len() > 1 => {
                let Some(entry) = entries.pop() else { return };
                let shard = entry.shard.clone();
                vec![entry.members.into_iter().map(|m| Entry::plain(&self.config, shard.clone(), m)).collect()]
            }
            1 => {
                for entry in entries {
                    for member in entry.members {
                        self.fail_with(member, error.kind, Some(code.clone()), Some(error.message.clone()));
                    }
                }
                return;
            }
            n => {
                let second = entries.split_off(n / 2);
                vec![entries, second]
            }
        };
        for part in parts {
            if self.config.ordering {
                for entry in &part {
                    if let Some(state) = self.shards.get_mut(&entry.shard) {
                        state.busy = true;
                    }
                }
            }
            self.splits.push_back(part);
        }
    }

    /// A parked aggregate that no listing confirmed before a member's deadline: the expired
    /// members fail, the others are sent again (they may then be stored twice: at least once).
    fn unpark_unconfirmed(&mut self, parked: Parked, now: Instant) {
        let Parked { entry, at, duration, .. } = parked;
        self.unbusy_if_unparked(&entry.shard);
        for mut member in entry.members {
            member.failed_attempt(Attempt { at, duration, error_code: Some(UNCONFIRMED.into()) });
            self.retry_or_fail(member, ErrorKind::Transient, now);
        }
    }

    /// Ordering mode: a shard whose last parked aggregate was judged may send again.
    fn unbusy_if_unparked(&mut self, shard: &Arc<str>) {
        if self.config.ordering
            && !self.confirmations.holds_shard(shard)
            && let Some(state) = self.shards.get_mut(shard)
        {
            state.busy = false;
        }
    }

    /// An entry was refused: its records are retried (or fail). In ordering mode the entry keeps
    /// its place at the head of its shard, which waits for the backoff.
    fn entry_failed(
        &mut self,
        mut entry: Entry,
        kind: ErrorKind,
        code: &str,
        at: SystemTime,
        duration: Duration,
        now: Instant,
    ) {
        for member in &mut entry.members {
            member.failed_attempt(Attempt { at, duration, error_code: Some(code.to_owned()) });
        }
        if self.config.ordering && kind.is_retryable() {
            let delay = entry
                .members
                .first_mut()
                .and_then(|m| m.next_backoff(&self.backoff))
                .unwrap_or(self.config.backoff_max);
            let delay = retry_delay(kind, delay);
            let shard = entry.shard.clone();
            if let Some(state) = self.shards.get_mut(&shard) {
                state.blocked_until = Some(now + delay);
            }
            self.metrics.retries.fetch_add(entry.members.len() as u64, Relaxed);
            // Expired members are failed when the entry next comes up for sending.
            return self.push_ready_front(&shard, vec![entry]);
        }
        for member in entry.members {
            self.retry_or_fail(member, kind, now);
        }
    }

    fn retry_or_fail(&mut self, mut member: Pending, kind: ErrorKind, now: Instant) {
        if !kind.is_retryable() {
            let code = member.last_code();
            return self.fail(member, kind, code);
        }
        let delay = member.next_backoff(&self.backoff).unwrap_or(self.config.backoff_max);
        // A backoff that runs past the deadline still leaves one last try just before it.
        let last_chance = member.deadline.checked_sub(LAST_TRY_MARGIN).unwrap_or(now);
        let not_before = (now + retry_delay(kind, delay)).min(last_chance);
        if not_before <= now {
            let code = member.last_code();
            return self.fail(member, ErrorKind::Expired, code);
        }
        self.metrics.retries.fetch_add(1, Relaxed);
        self.wait(member, not_before);
    }

    fn fail(&mut self, member: Pending, kind: ErrorKind, code: Option<String>) {
        self.fail_with(member, kind, code, None);
    }

    /// Fails a record with the service's (or the producer's) message.
    fn fail_with(&mut self, member: Pending, kind: ErrorKind, code: Option<String>, message: Option<String>) {
        if kind == ErrorKind::Expired {
            self.metrics.user_records_expired.fetch_add(1, Relaxed);
        } else {
            self.metrics.user_records_failed.fetch_add(1, Relaxed);
        }
        let mut member = member;
        let attempts = member.take_attempts();
        let Pending { record, reply, _permits, .. } = member;
        let error = DeliveryError::new(kind, code, record, attempts).with_message(message);
        self.outstanding -= 1;
        let _ = reply.send(Err(error));
        drop(_permits);
    }

    /// A record landed on another shard than predicted: hold routing until a new listing.
    fn map_out_of_date(&mut self, now: Instant) {
        self.map_stale = true;
        if !self.refresh_in_flight && self.refresh_due.is_none() {
            self.refresh_due = Some(now);
        }
    }

    fn on_shard_list(&mut self, number: u64, list: Result<Vec<ShardDescription>, CallError>) {
        self.refresh_in_flight = false;
        let now = Instant::now();
        let shards = match list {
            Ok(shards) => shards,
            Err(error) => {
                tracing::warn!(%error, "ListShards failed; retrying with backoff");
                if error.kind == ErrorKind::NotFound {
                    // Stored, but the stream they were stored in is gone: no reader will see them.
                    for parked in self.confirmations.take_all() {
                        let Parked { entry, at, duration, .. } = parked;
                        self.unbusy_if_unparked(&entry.shard);
                        let message = format!(
                            "stored on {}, but the stream was deleted before its shard map could be confirmed: {}",
                            entry.shard, error.message
                        );
                        for mut member in entry.members {
                            member.failed_attempt(Attempt { at, duration, error_code: error.code.clone() });
                            self.fail_with(member, ErrorKind::NotFound, error.code.clone(), Some(message.clone()));
                        }
                    }
                }
                if !error.kind.is_retryable() {
                    self.metrics.error(error.code.as_deref().unwrap_or("ListShards"), self.waiting.len() as u64);
                    self.fail_waiting(&error);
                }
                let delay = self.refresh_backoff.next().unwrap_or(self.config.backoff_max);
                self.refresh_due = Some(now + delay);
                self.list_retry_at = Some(now + delay);
                return;
            }
        };
        self.list_retry_at = None;
        // Records to route again by this listing, oldest first: the members of aggregates that no
        // reader keeps, then what was buffered for shards whose id now names another range.
        let mut reroute: Vec<Pending> = Vec::new();
        for parked in self.confirmations.judged_by(number) {
            let Parked { entry, shard_id, sequence_number, at, duration, .. } = parked;
            self.unbusy_if_unparked(&entry.shard);
            match judge(entry.key_span, &shard_id, &shards) {
                Verdict::Readable => {
                    self.outstanding -=
                        sender::deliver(&self.metrics, entry, (shard_id, sequence_number), at, duration, now);
                }
                Verdict::Unreadable => {
                    // The shard id names another range than the one the aggregate was built
                    // for (the stream was deleted and created again): a reader drops it whole.
                    tracing::warn!(shard_id = %shard_id, records = entry.members.len(),
                        "an aggregate was stored on a shard whose range no longer holds its records (was the stream re-created?); sending them again");
                    self.metrics.error(STALE_SHARD_MAP, entry.members.len() as u64);
                    for mut member in entry.members {
                        member.failed_attempt(Attempt { at, duration, error_code: Some(STALE_SHARD_MAP.into()) });
                        reroute.push(member);
                    }
                }
            }
        }
        let open: Vec<_> =
            shards.into_iter().filter(|s| s.open).map(|s| (s.range, Arc::<str>::from(s.shard_id.as_str()))).collect();
        match ShardRanges::new(open) {
            Ok(map) if map.covers_all() => {
                self.refresh_backoff = self.backoff.build();
                self.map_stale = false;
                // Shards closed since, or whose id now names another range: what was buffered
                // for them goes back through routing, oldest first (the sealed entries, then the
                // aggregate being filled).
                let stale: Vec<Arc<str>> = self
                    .shards
                    .iter()
                    .filter(|(id, state)| !map.iter().any(|(range, open)| open == *id && *range == state.range))
                    .map(|(id, _)| id.clone())
                    .collect();
                self.map = Some(map);
                for shard in stale {
                    let Some(state) = self.shards.remove(&shard) else { continue };
                    if let Some(at) = self.active.iter().position(|id| *id == shard) {
                        self.active.remove(at);
                    }
                    self.ready_count -= state.ready.len();
                    for entry in state.ready.into_entries() {
                        self.ready_bytes -= entry.size;
                        reroute.extend(self.fail_expired(entry.members, now));
                    }
                    reroute.extend(state.members);
                }
                for member in reroute {
                    self.route(member, now);
                }
            }
            _ => {
                // Mid-reshard the open shards may not cover the space yet: list again shortly.
                for member in reroute {
                    self.retry_or_fail(member, ErrorKind::Transient, now);
                }
                let delay = self.refresh_backoff.next().unwrap_or(self.config.backoff_max);
                self.refresh_due = Some(now + delay);
            }
        }
    }

    /// When the task must wake up next, at the latest.
    fn next_wake(&self, now: Instant) -> Instant {
        let mut wake = now + Duration::from_secs(1);
        if let Some(due) = self.refresh_due {
            wake = wake.min(due);
        }
        if !self.refresh_in_flight
            && let Some(due) = self.confirmations.listing_due(self.config.shard_map_confirm_interval, now)
        {
            wake = wake.min(self.list_retry_at.map_or(due, |at| at.max(due)));
        }
        if let Some(deadline) = self.confirmations.earliest_deadline() {
            wake = wake.min(deadline);
        }
        if !self.splits.is_empty() && self.in_flight < self.config.max_in_flight_requests {
            wake = now;
        }
        if self.map.is_some() && !self.map_stale {
            if let Some(((at, _), _)) = self.waiting.first_key_value() {
                wake = wake.min(*at);
            }
        } else if let Some(deadline) = self.waiting_deadline {
            wake = wake.min(deadline);
        }
        let linger = self.config.record_max_buffered_time;
        for state in self.shards.values() {
            if let Some(started) = state.aggregate_started {
                wake = wake.min(started + linger);
            }
        }
        // With every request slot taken, a response wakes the task.
        if self.ready_count > 0 && self.in_flight < self.config.max_in_flight_requests {
            if let Some(at) = self.limiter_wake {
                wake = wake.min(at);
            }
            if let Some(due) = self.earliest_due().filter(|due| *due > now) {
                wake = wake.min(due);
            }
        }
        wake.max(now)
    }
}

impl ShardState {
    fn new(config: &ProducerConfig, now: Instant, range: HashKeyRange) -> Self {
        ShardState {
            range,
            aggregator: Aggregator::with_config(AggregatorConfig::with_max_bytes(config.aggregation_max_bytes)),
            members: Vec::new(),
            aggregate_started: None,
            ready: ReadyQueue::new(!config.ordering),
            active: false,
            limiter: ShardLimiter::new(
                config.rate_limit_percent,
                config.shard_records_per_second,
                config.shard_bytes_per_second,
                now,
            ),
            busy: false,
            blocked_until: None,
        }
    }
}

/// The longest wait before a throttled record is tried again. The shard's token buckets, which a
/// throttle empties, already pace what is sent to it; a per-record backoff growing to
/// `backoff_max` only left a slow tail of records waiting long after the shard had room.
const THROTTLED_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// How long before its deadline a record gets its last try.
const LAST_TRY_MARGIN: Duration = Duration::from_millis(10);

/// The wait before a retry: the exponential backoff; for throttling, capped and then jittered
/// over its upper half.
///
/// The jitter after the cap matters. A shard's limit is counted per one-second window, and a
/// record refused late in a window and tried again exactly one second later is late in the next
/// window too: with a fixed one-second wait, some records were refused 20 times in a row and
/// expired. Spread over [cap/2, cap], each try lands at a new point of the window.
fn retry_delay(kind: ErrorKind, backoff: Duration) -> Duration {
    match kind {
        ErrorKind::Throttled => backoff.min(THROTTLED_BACKOFF_MAX).mul_f64(0.5 + fastrand::f64() / 2.0),
        _ => backoff,
    }
}

/// The attempt code of an aggregate that landed on a shard it was not built for, or on a shard
/// whose id names another range than the one it was built for.
pub(crate) const STALE_SHARD_MAP: &str = "StaleShardMap";

/// The attempt code of an aggregate stored, but not confirmed by a listing before its deadline.
pub(crate) const UNCONFIRMED: &str = "ShardMapUnconfirmed";

/// The code of a record over the stream's record limit, found before it was sent.
pub(crate) const RECORD_TOO_LARGE: &str = "RecordTooLarge";

/// The largest user record (partition key + data) that can be sent: the stream's record limit.
pub(crate) fn record_size(record: &UserRecord) -> usize {
    record.partition_key.len() + record.data.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttled_retries_are_capped_and_spread_over_the_upper_half() {
        let delays: Vec<Duration> =
            (0..1_000).map(|_| retry_delay(ErrorKind::Throttled, Duration::from_secs(5))).collect();
        let (min, max) = (delays.iter().min().unwrap(), delays.iter().max().unwrap());
        assert!(*min >= Duration::from_millis(500) && *max <= THROTTLED_BACKOFF_MAX, "{min:?}..{max:?}");
        assert!(*max - *min > Duration::from_millis(300), "spread: {min:?}..{max:?}");
        // Other errors keep the backoff as it is.
        assert_eq!(retry_delay(ErrorKind::Transient, Duration::from_secs(3)), Duration::from_secs(3));
    }
}
