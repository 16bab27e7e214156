//! The pipeline's one background task. It owns every buffered record from `put` to its receipt.
//!
//! ```text
//!  inbox ──▶ route: shard map (hash key ─▶ open shard) ──▶ shard's aggregator ──seal──▶ ready queue
//!                 ▲                                       (full, or RecordMaxBufferedTime)      │
//!                 │                                                                            ▼
//!  waiting (backoff, no shard map yet) ◀── retryable failure ◀── sender task ◀── batch ◀── rate limiter
//!                                                                    │   (500 / 5 MiB)   (per shard)
//!                                                                    └──▶ receipts, metrics
//! ```
//!
//! Records that fail with a retryable error go back through `waiting` with backoff and are routed
//! and aggregated again, so a record of a shard that was split lands in the right child. A record
//! whose deadline (RecordTtl) passes fails with `Expired`, and the record is handed back.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use hashbrown::HashMap;
use kinesis_aggregation::{Aggregator, AggregatorConfig, KinesisRecord, ShardRanges, UserRecord};
use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot};
use tokio::time::Instant;

use crate::batch::Batch;
use crate::config::ProducerConfig;
use crate::error::{DeliveryError, ErrorKind};
use crate::metrics::Metrics;
use crate::rate_limit::ShardLimiter;
use crate::receipt::{Attempt, Receipt};
use crate::transport::{CallError, EntryResult, PutEntry, ShardDescription, Transport};

use std::sync::atomic::Ordering::Relaxed;

/// A buffered user record and everything needed to resolve it.
pub(crate) struct Pending {
    pub(crate) record: UserRecord,
    /// Partition key + data, in bytes.
    pub(crate) size: usize,
    pub(crate) reply: oneshot::Sender<Result<Receipt, DeliveryError>>,
    pub(crate) enqueued: Instant,
    pub(crate) deadline: Instant,
    pub(crate) attempts: Vec<Attempt>,
    pub(crate) backoff: Option<ExponentialBackoff>,
    /// Buffer space, given back when the record is resolved (dropped).
    pub(crate) _permits: (OwnedSemaphorePermit, OwnedSemaphorePermit),
}

/// What the handle sends the task.
pub(crate) enum Command {
    Put(Box<Pending>),
    Flush(oneshot::Sender<()>),
    Shutdown(oneshot::Sender<()>),
}

/// A Kinesis record ready to send, with the user records it carries.
struct Entry {
    shard: Arc<str>,
    kinesis: KinesisRecord,
    members: Vec<Pending>,
    aggregated: bool,
    /// Partition key + data.
    size: usize,
    /// When the oldest member has waited RecordMaxBufferedTime.
    due: Instant,
}

struct ShardState {
    aggregator: Aggregator,
    members: Vec<Pending>,
    /// When the aggregate started filling: it is sealed `record_max_buffered_time` later. (Not the
    /// members' put time: retried records would then seal every aggregate at once, one or two
    /// records each.)
    aggregate_started: Option<Instant>,
    limiter: ShardLimiter,
    /// Ordering mode: a call carrying this shard's record is in flight.
    busy: bool,
    /// Ordering mode: the shard's first record failed and waits for its backoff until then.
    blocked_until: Option<Instant>,
}

/// A ListShards answer.
type ShardList = Result<Vec<ShardDescription>, CallError>;

struct Response {
    entries: Vec<Entry>,
    result: Result<Vec<EntryResult>, CallError>,
    at: SystemTime,
    duration: Duration,
}

pub(crate) struct Engine {
    config: ProducerConfig,
    transport: Arc<dyn Transport>,
    metrics: Arc<Metrics>,
    map: Option<ShardRanges<Arc<str>>>,
    shards: HashMap<Arc<str>, ShardState>,
    ready: VecDeque<Entry>,
    ready_bytes: usize,
    /// Records waiting for their backoff, or for a shard map; keyed by (not before, sequence).
    waiting: BTreeMap<(Instant, u64), Pending>,
    waiting_seq: u64,
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
}

impl Engine {
    pub(crate) fn new(config: ProducerConfig, transport: Arc<dyn Transport>, metrics: Arc<Metrics>) -> Self {
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
            ready: VecDeque::new(),
            ready_bytes: 0,
            waiting: BTreeMap::new(),
            waiting_seq: 0,
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
        }
    }

    /// Runs until shut down (or every handle is dropped) and every record is resolved.
    pub(crate) async fn run(mut self, mut inbox: mpsc::Receiver<Command>) {
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
                Some(list) = self.shard_lists.1.recv() => self.on_shard_list(list),
                command = inbox.recv(), if inbox_open => match command {
                    Some(command) => {
                        self.on_command(command);
                        // Take what else is queued, up to a bound, before the next step.
                        for _ in 0..1024 {
                            match inbox.try_recv() {
                                Ok(command) => self.on_command(command),
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

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Put(pending) => {
                self.outstanding += 1;
                self.metrics.user_records_pending.store(self.outstanding, Relaxed);
                self.route(*pending, Instant::now());
            }
            Command::Flush(waiter) => {
                self.flush_waiters.push(waiter);
                self.send_buffered_now(Instant::now());
            }
            Command::Shutdown(waiter) => {
                self.closing = true;
                self.shutdown_waiters.push(waiter);
                self.send_buffered_now(Instant::now());
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
        for entry in &mut self.ready {
            entry.due = entry.due.min(now);
        }
    }

    /// Puts a record in its shard's aggregator, or in `waiting` while there is no shard map.
    fn route(&mut self, pending: Pending, now: Instant) {
        if now >= pending.deadline {
            let code = member_code(&pending);
            return self.fail(pending, ErrorKind::Expired, code);
        }
        let shard = match &self.map {
            Some(map) if !self.map_stale => map.lookup(pending.record.hash_key().0).map(|(_, id)| id.clone()),
            _ => None,
        };
        let Some(shard) = shard else {
            // No map yet, an out-of-date one, or a gap in it (mid-reshard): wait, in put order, for
            // the next listing; `step` routes waiting records only once there is a good map.
            if self.map.is_some() {
                self.map_out_of_date(now);
            }
            return self.wait(pending, now);
        };
        // Every routed shard has a state, whose limiter the dispatcher consults.
        self.shard_state(&shard, now);
        if !self.config.aggregation {
            let entry = plain_entry(&self.config, shard, pending);
            return self.push_ready(entry);
        }
        let state = self.shard_state(&shard, now);
        match state.aggregator.try_push_ref(&pending.record) {
            Ok(true) => {
                state.aggregate_started.get_or_insert(now);
                state.members.push(pending);
            }
            Ok(false) => {
                self.seal(&shard);
                let state = self.shard_state(&shard, now);
                match state.aggregator.try_push_ref(&pending.record) {
                    Ok(true) => {
                        state.aggregate_started = Some(now);
                        state.members.push(pending);
                    }
                    // Checked at put: a record that fits the record limit fits an empty aggregate,
                    // or is sent plain.
                    _ => {
                        let entry = plain_entry(&self.config, shard, pending);
                        self.push_ready(entry);
                    }
                }
            }
            Err(_) => {
                let entry = plain_entry(&self.config, shard, pending);
                self.push_ready(entry);
            }
        }
    }

    fn shard_state(&mut self, shard: &Arc<str>, now: Instant) -> &mut ShardState {
        let config = &self.config;
        self.shards.entry(shard.clone()).or_insert_with(|| ShardState {
            aggregator: Aggregator::with_config(AggregatorConfig::with_max_bytes(config.aggregation_max_bytes)),
            members: Vec::new(),
            aggregate_started: None,
            limiter: ShardLimiter::new(
                config.rate_limit_percent,
                config.shard_records_per_second,
                config.shard_bytes_per_second,
                now,
            ),
            busy: false,
            blocked_until: None,
        })
    }

    /// Turns a shard's aggregator into a ready entry. A lone record goes plain, as with the KPL.
    fn seal(&mut self, shard: &Arc<str>) {
        let Some(state) = self.shards.get_mut(shard) else { return };
        if state.members.is_empty() {
            return;
        }
        let members = std::mem::take(&mut state.members);
        let started = state.aggregate_started.take().unwrap_or_else(Instant::now);
        if let Some(entry) = pack(&self.config, shard, &mut state.aggregator, members, started) {
            self.push_ready(entry);
        }
    }

    fn push_ready(&mut self, entry: Entry) {
        self.ready_bytes += entry.size;
        self.ready.push_back(entry);
    }

    fn wait(&mut self, pending: Pending, not_before: Instant) {
        self.waiting_seq += 1;
        self.waiting.insert((not_before, self.waiting_seq), pending);
    }

    /// Everything time-driven: due retries, the shard map, lingering aggregates, sending.
    fn step(&mut self, now: Instant) {
        if self.refresh_due.is_some_and(|due| due <= now) && !self.refresh_in_flight {
            self.refresh_due = None;
            self.refresh_in_flight = true;
            let (transport, tx) = (self.transport.clone(), self.shard_lists.0.clone());
            tokio::spawn(async move {
                let _ = tx.send(transport.list_shards().await).await;
            });
        }
        if self.map.is_some() && !self.map_stale {
            while let Some(entry) = self.waiting.first_entry() {
                if entry.key().0 > now {
                    break;
                }
                let pending = entry.remove();
                self.route(pending, now);
            }
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

    /// Sends batches while there is room in flight and something worth sending.
    fn dispatch(&mut self, now: Instant) {
        self.limiter_wake = None;
        while self.in_flight < self.config.max_in_flight_requests && !self.ready.is_empty() {
            let worth_it = self.ready.len() >= self.config.collection_max_count
                || self.ready_bytes >= self.config.collection_max_bytes
                || self.ready.iter().any(|e| e.due <= now);
            if !worth_it {
                return;
            }
            let mut batch = Batch::new(self.config.collection_max_count, self.config.collection_max_bytes);
            let mut kept = VecDeque::with_capacity(self.ready.len());
            let ordering = self.config.ordering;
            // Ordering mode: shards met in this pass; their later entries must wait their turn.
            let mut met: hashbrown::HashSet<Arc<str>> = hashbrown::HashSet::new();
            while let Some(entry) = self.ready.pop_front() {
                if ordering && !met.insert(entry.shard.clone()) {
                    kept.push_back(entry);
                    continue;
                }
                if batch.is_full() || !batch.fits(entry.size) {
                    kept.push_back(entry);
                    continue;
                }
                if entry.members.iter().any(|m| m.deadline <= now) {
                    self.ready_bytes -= entry.size;
                    if ordering {
                        // Keep the survivors' place ahead of the shard's later records.
                        for rebuilt in self.rebuild(entry, now) {
                            self.ready_bytes += rebuilt.size;
                            kept.push_back(rebuilt);
                        }
                    } else {
                        self.dissolve(entry, now);
                    }
                    continue;
                }
                let Some(state) = self.shards.get_mut(&entry.shard) else {
                    kept.push_back(entry);
                    continue;
                };
                if ordering && (state.busy || state.blocked_until.is_some_and(|t| t > now)) {
                    if let Some(at) = state.blocked_until.filter(|t| *t > now) {
                        self.limiter_wake = Some(self.limiter_wake.map_or(at, |w| w.min(at)));
                    }
                    kept.push_back(entry);
                    continue;
                }
                if let Err(wait) = state.limiter.try_take(now, entry.size) {
                    let at = now + wait;
                    self.limiter_wake = Some(self.limiter_wake.map_or(at, |w| w.min(at)));
                    kept.push_back(entry);
                    continue;
                }
                if ordering {
                    state.busy = true;
                    state.blocked_until = None;
                }
                self.ready_bytes -= entry.size;
                let size = entry.size;
                if let Err(entry) = batch.try_push(entry, size) {
                    self.ready_bytes += entry.size;
                    kept.push_back(entry);
                }
            }
            self.ready = kept;
            if batch.is_empty() {
                return;
            }
            self.send(batch.into_entries());
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
                entries.extend(pack(&self.config, &shard, &mut aggregator, batch, started));
                if matches!(aggregator.try_push_ref(&member.record), Ok(true)) {
                    members.push(member);
                    continue;
                }
            }
            entries.push(plain_entry(&self.config, shard.clone(), member));
        }
        let started = oldest(&members);
        entries.extend(pack(&self.config, &shard, &mut aggregator, members, started));
        entries
    }

    /// Fails the members whose deadline has passed, and returns the others in order.
    fn fail_expired(&mut self, members: Vec<Pending>, now: Instant) -> Vec<Pending> {
        let mut survivors = Vec::with_capacity(members.len());
        for member in members {
            if member.deadline <= now {
                let code = member_code(&member);
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

    fn send(&mut self, entries: Vec<Entry>) {
        self.in_flight += 1;
        let puts: Vec<PutEntry> = entries
            .iter()
            .map(|e| PutEntry {
                partition_key: e.kinesis.partition_key.clone(),
                explicit_hash_key: e.kinesis.explicit_hash_key,
                data: e.kinesis.data.clone(),
            })
            .collect();
        tracing::trace!(entries = puts.len(), "PutRecords");
        let (transport, tx) = (self.transport.clone(), self.responses.0.clone());
        tokio::spawn(async move {
            let at = SystemTime::now();
            let started = Instant::now();
            let result = transport.put_records(puts).await;
            let duration = started.elapsed();
            let _ = tx.send(Response { entries, result, at, duration }).await;
        });
    }

    fn on_response(&mut self, response: Response) {
        self.in_flight -= 1;
        let now = Instant::now();
        let Response { entries, result, at, duration } = response;
        self.metrics.put_records_requests.fetch_add(1, Relaxed);
        for entry in &entries {
            if let Some(state) = self.shards.get_mut(&entry.shard) {
                state.busy = false;
            }
        }
        self.metrics.request_time_micros.fetch_add(duration.as_micros() as u64, Relaxed);
        match result {
            Err(error) => {
                let code = error.code.clone().unwrap_or_else(|| format!("{:?}", error.kind));
                self.metrics.error(&code, entries.len() as u64);
                tracing::debug!(kind = ?error.kind, %code, "PutRecords call failed");
                for entry in entries {
                    self.entry_failed(entry, error.kind, &code, at, duration, now);
                }
            }
            Ok(results) => {
                for (entry, result) in entries.into_iter().zip(results) {
                    match result {
                        EntryResult::Stored { shard_id, sequence_number } => {
                            if *shard_id == *entry.shard || !entry.aggregated {
                                // A plain record is readable wherever it lands.
                                if *shard_id != *entry.shard {
                                    self.map_out_of_date(now);
                                }
                                self.deliver(entry, &shard_id, &sequence_number, at, duration, now);
                            } else {
                                // An aggregate on a shard it was not built for (the stream was
                                // resharded): a KCL reader drops it whole when any sub-record is
                                // outside the shard. Send every member again, routed by a fresh map.
                                tracing::debug!(predicted = %entry.shard, actual = %shard_id, "aggregate landed on another shard");
                                self.map_out_of_date(now);
                                self.metrics.error(STALE_SHARD_MAP, entry.members.len() as u64);
                                for mut member in entry.members {
                                    member.attempts.push(Attempt {
                                        at,
                                        duration,
                                        error_code: Some(STALE_SHARD_MAP.into()),
                                    });
                                    self.retry_or_fail(member, ErrorKind::Transient, now);
                                }
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

    fn deliver(
        &mut self,
        entry: Entry,
        shard_id: &str,
        sequence_number: &str,
        at: SystemTime,
        duration: Duration,
        now: Instant,
    ) {
        let m = self.metrics.clone();
        m.kinesis_records_put.fetch_add(1, Relaxed);
        m.kinesis_records_data_put.fetch_add(entry.size as u64, Relaxed);
        for (index, mut member) in entry.members.into_iter().enumerate() {
            m.user_records_put.fetch_add(1, Relaxed);
            m.user_records_data_put.fetch_add(member.size as u64, Relaxed);
            m.buffering_time_micros
                .fetch_add(now.saturating_duration_since(member.enqueued).as_micros() as u64, Relaxed);
            member.attempts.push(Attempt { at, duration, error_code: None });
            let receipt = Receipt {
                shard_id: shard_id.to_owned(),
                sequence_number: sequence_number.to_owned(),
                aggregated_index: entry.aggregated.then_some(index as u64),
                attempts: std::mem::take(&mut member.attempts),
            };
            self.resolve(member, Ok(receipt));
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
            member.attempts.push(Attempt { at, duration, error_code: Some(code.to_owned()) });
        }
        if self.config.ordering && kind.is_retryable() {
            let delay = entry
                .members
                .first_mut()
                .and_then(|m| m.backoff.get_or_insert_with(|| self.backoff.build()).next())
                .unwrap_or(self.config.backoff_max);
            let delay = retry_delay(kind, delay);
            if let Some(state) = self.shards.get_mut(&entry.shard) {
                state.blocked_until = Some(now + delay);
            }
            self.metrics.retries.fetch_add(entry.members.len() as u64, Relaxed);
            // Expired members are failed when the entry next comes up for sending.
            self.ready_bytes += entry.size;
            self.ready.push_front(entry);
            return;
        }
        for member in entry.members {
            self.retry_or_fail(member, kind, now);
        }
    }

    fn retry_or_fail(&mut self, mut member: Pending, kind: ErrorKind, now: Instant) {
        if !kind.is_retryable() {
            let code = member_code(&member);
            return self.fail(member, kind, code);
        }
        let delay =
            member.backoff.get_or_insert_with(|| self.backoff.build()).next().unwrap_or(self.config.backoff_max);
        // A backoff that runs past the deadline still leaves one last try just before it.
        let last_chance = member.deadline.checked_sub(LAST_TRY_MARGIN).unwrap_or(now);
        let not_before = (now + retry_delay(kind, delay)).min(last_chance);
        if not_before <= now {
            let code = member_code(&member);
            return self.fail(member, ErrorKind::Expired, code);
        }
        self.metrics.retries.fetch_add(1, Relaxed);
        self.wait(member, not_before);
    }

    fn fail(&mut self, member: Pending, kind: ErrorKind, code: Option<String>) {
        if kind == ErrorKind::Expired {
            self.metrics.user_records_expired.fetch_add(1, Relaxed);
        } else {
            self.metrics.user_records_failed.fetch_add(1, Relaxed);
        }
        let Pending { record, attempts, reply, _permits, .. } = member;
        let error = DeliveryError::new(kind, code, record, attempts);
        self.outstanding -= 1;
        let _ = reply.send(Err(error));
        drop(_permits);
    }

    fn resolve(&mut self, member: Pending, receipt: Result<Receipt, DeliveryError>) {
        self.outstanding -= 1;
        let _ = member.reply.send(receipt);
    }

    /// A record landed on another shard than predicted: hold routing until a new listing.
    fn map_out_of_date(&mut self, now: Instant) {
        self.map_stale = true;
        if !self.refresh_in_flight && self.refresh_due.is_none() {
            self.refresh_due = Some(now);
        }
    }

    fn on_shard_list(&mut self, list: ShardList) {
        self.refresh_in_flight = false;
        let now = Instant::now();
        let shards = match list {
            Ok(shards) => shards,
            Err(error) => {
                tracing::warn!(%error, "ListShards failed; retrying with backoff");
                let delay = self.refresh_backoff.next().unwrap_or(self.config.backoff_max);
                self.refresh_due = Some(now + delay);
                return;
            }
        };
        let open: Vec<_> =
            shards.into_iter().filter(|s| s.open).map(|s| (s.range, Arc::<str>::from(s.shard_id.as_str()))).collect();
        match ShardRanges::new(open) {
            Ok(map) if map.covers_all() => {
                self.refresh_backoff = self.backoff.build();
                self.map_stale = false;
                // Records held for shards that are gone go back through routing.
                let gone: Vec<Arc<str>> =
                    self.shards.keys().filter(|id| !map.iter().any(|(_, open)| open == *id)).cloned().collect();
                self.map = Some(map);
                for shard in gone {
                    if let Some(state) = self.shards.remove(&shard) {
                        for member in state.members {
                            self.route(member, now);
                        }
                    }
                    let (stale, keep): (VecDeque<Entry>, VecDeque<Entry>) =
                        std::mem::take(&mut self.ready).into_iter().partition(|e| e.shard == shard);
                    self.ready = keep;
                    for entry in stale {
                        self.ready_bytes -= entry.size;
                        self.dissolve(entry, now);
                    }
                }
            }
            _ => {
                // Mid-reshard the open shards may not cover the space yet: list again shortly.
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
        if let Some(((at, _), _)) = self.waiting.first_key_value()
            && self.map.is_some()
            && !self.map_stale
        {
            wake = wake.min(*at);
        }
        let linger = self.config.record_max_buffered_time;
        for state in self.shards.values() {
            if let Some(started) = state.aggregate_started {
                wake = wake.min(started + linger);
            }
        }
        // With every request slot taken, a response wakes the task.
        if !self.ready.is_empty() && self.in_flight < self.config.max_in_flight_requests {
            if let Some(at) = self.limiter_wake {
                wake = wake.min(at);
            }
            if let Some(due) = self.ready.iter().map(|e| e.due).filter(|due| *due > now).min() {
                wake = wake.min(due);
            }
        }
        wake.max(now)
    }
}

/// The entry for one user record sent as it is (compressed when that is on and makes it smaller).
fn plain_entry(config: &ProducerConfig, shard: Arc<str>, pending: Pending) -> Entry {
    let kinesis = compressed(
        config,
        KinesisRecord {
            partition_key: pending.record.partition_key.clone(),
            explicit_hash_key: pending.record.explicit_hash_key,
            data: pending.record.data.clone(),
        },
    );
    let due = pending.enqueued + config.record_max_buffered_time;
    let size = kinesis.data.len() + kinesis.partition_key.len();
    Entry { shard, size, kinesis, members: vec![pending], aggregated: false, due }
}

/// The entry for what an aggregator holds, which it empties; a lone record goes plain, as with the
/// KPL. `started` is when the batch began waiting: it is due a linger time later.
fn pack(
    config: &ProducerConfig,
    shard: &Arc<str>,
    aggregator: &mut Aggregator,
    members: Vec<Pending>,
    started: Instant,
) -> Option<Entry> {
    let aggregate = aggregator.finish()?;
    if members.len() == 1 {
        return members.into_iter().next().map(|m| plain_entry(config, shard.clone(), m));
    }
    let kinesis = compressed(config, aggregate);
    let size = kinesis.data.len() + kinesis.partition_key.len();
    Some(Entry {
        shard: shard.clone(),
        kinesis,
        members,
        aggregated: true,
        size,
        due: started + config.record_max_buffered_time,
    })
}

/// The record with its data compressed, when compression is on and it makes the data smaller.
fn compressed(config: &ProducerConfig, mut kinesis: KinesisRecord) -> KinesisRecord {
    if config.compression {
        let packed = kinesis_aggregation::compression::compress(&kinesis.data);
        if packed.len() < kinesis.data.len() {
            kinesis.data = packed;
        }
    }
    kinesis
}

/// The longest wait before a throttled record is tried again. The shard's token buckets, which a
/// throttle empties, already pace what is sent to it; a per-record backoff growing to
/// `backoff_max` only left a slow tail of records waiting long after the shard had room.
const THROTTLED_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// How long before its deadline a record gets its last try.
const LAST_TRY_MARGIN: Duration = Duration::from_millis(10);

/// The wait before a retry: the exponential backoff, capped for throttling.
fn retry_delay(kind: ErrorKind, backoff: Duration) -> Duration {
    match kind {
        ErrorKind::Throttled => backoff.min(THROTTLED_BACKOFF_MAX),
        _ => backoff,
    }
}

/// The attempt code of an aggregate that landed on a shard it was not built for.
pub(crate) const STALE_SHARD_MAP: &str = "StaleShardMap";

/// The last error code of a record's attempts.
fn member_code(member: &Pending) -> Option<String> {
    member.attempts.last().and_then(|a| a.error_code.clone())
}

/// The largest user record (partition key + data) that can be sent: the stream's record limit.
pub(crate) fn record_size(record: &UserRecord) -> usize {
    record.partition_key.len() + record.data.len()
}
