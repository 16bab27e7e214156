//! The scheduler: one worker of an application. It owns the lease coordinator, runs shard syncs,
//! starts a shard consumer for each lease it gains, and shuts down gracefully.
//!
//! ```text
//! Scheduler task ── renewer task (every failover/3)
//!      │ take round every 2 x failover (an expiry round half-way), shard sync at start / on
//!      │ shard end / every minute
//!      └─▶ one ShardConsumer task per held lease ─▶ fetcher task
//! ```
//!
//! [`Scheduler`] is the handle: metrics, held leases, [`Scheduler::shutdown`] (graceful: stop
//! fetching, `shutdown_requested`, release the leases) and [`Scheduler::abort`] (stop at once,
//! leases left to expire, as if the process died).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::coordinator::{CoordinatorConfig, LeaseCoordinator};
use crate::error::{ConfigError, SchedulerError};
use crate::fan_out::{Retrieval, register};
use crate::fetcher::PollingConfig;
use crate::held::HeldLease;
use crate::kinesis::KinesisApi;
use crate::lease_table::LeaseTable;
use crate::metrics::{Metrics, MetricsSnapshot};
use crate::processor::ProcessorFactory;
use crate::shard_consumer::{self, AbortOnDrop, Context, Exit};
use crate::shard_sync::{InitialPosition, SyncError, sync_shards};

/// Settings of a worker. Defaults are the KCL's; set fields on the value [`SchedulerConfig::new`]
/// returns.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct SchedulerConfig {
    /// The stream to read.
    pub stream_name: String,
    /// The application: the lease table's name, shared by its workers.
    pub application_name: String,
    /// This worker's id (`leaseOwner`); unique per worker. Default: `worker-<pid>-<random>`.
    pub worker_id: String,
    /// Where shards never read before start (KCL default: LATEST).
    pub initial_position: InitialPosition,
    /// A lease not renewed for this long is taken by another worker (KCL `failoverTimeMillis`:
    /// 10 s). Leases are renewed every third of it, take rounds run every twice it.
    pub failover: Duration,
    /// The most leases stolen from a busier worker in one take round (KCL: 1).
    pub max_steal_per_round: usize,
    /// How often the shards are listed to find new ones (KCL `shardSyncIntervalMillis`: 60 s).
    pub shard_sync_interval: Duration,
    /// How often a child shard checks whether its parents are done (KCL
    /// `parentShardPollIntervalMillis`: 10 s).
    pub parent_poll_interval: Duration,
    /// How shards are read: GetRecords polling (default) or enhanced fan-out.
    pub retrieval: Retrieval,
    /// GetRecords settings (polling; fan-out uses GetRecords only to find a shard's end when
    /// the server sends no ChildShards).
    pub polling: PollingConfig,
    /// The most records in one `process_records` call.
    pub max_batch_records: usize,
    /// How long records are gathered for a batch (Lambda's batching window). Zero: each
    /// GetRecords page is handed over as it arrives.
    pub max_batch_wait: Duration,
    /// How long a graceful shutdown waits for processors before it stops them.
    pub shutdown_timeout: Duration,
    /// How long to wait for a new lease table to become ACTIVE.
    pub table_create_timeout: Duration,
    /// What follows a failure a processor reports (`Checkpointer::fail_at`). Default: the
    /// batch is delivered again from the failed record, with backoff, for ever; nothing is
    /// skipped.
    pub failure_policy: crate::failure::FailurePolicy,
}

impl SchedulerConfig {
    /// A worker of `application_name` reading `stream_name`, with the KCL's defaults.
    pub fn new(stream_name: impl Into<String>, application_name: impl Into<String>) -> Self {
        let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().subsec_nanos();
        SchedulerConfig {
            stream_name: stream_name.into(),
            application_name: application_name.into(),
            worker_id: format!("worker-{}-{nanos:08x}", std::process::id()),
            initial_position: InitialPosition::Latest,
            failover: Duration::from_secs(10),
            max_steal_per_round: 1,
            shard_sync_interval: Duration::from_secs(60),
            parent_poll_interval: Duration::from_secs(10),
            retrieval: Retrieval::Polling,
            polling: PollingConfig::default(),
            max_batch_records: 10_000,
            max_batch_wait: Duration::ZERO,
            shutdown_timeout: Duration::from_secs(30),
            table_create_timeout: Duration::from_secs(120),
            failure_policy: crate::failure::FailurePolicy::default(),
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |field, problem: &str| Err(ConfigError { field, problem: problem.to_owned() });
        if self.stream_name.is_empty() || self.stream_name.len() > 128 {
            return bad("stream_name", "must be 1 to 128 characters");
        }
        let name = &self.application_name;
        if name.len() < 3
            || name.len() > 255
            || !name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        {
            return bad("application_name", "must be a DynamoDB table name: 3 to 255 of a-z A-Z 0-9 _ - .");
        }
        if self.worker_id.is_empty() {
            return bad("worker_id", "must not be empty");
        }
        if self.failover < Duration::from_millis(300) {
            return bad("failover", "must be at least 300 ms");
        }
        if self.max_steal_per_round == 0 {
            return bad("max_steal_per_round", "must be at least 1");
        }
        if !(1..=10_000).contains(&self.polling.max_records) {
            return bad("polling.max_records", "must be 1 to 10,000");
        }
        if self.max_batch_records == 0 {
            return bad("max_batch_records", "must be at least 1");
        }
        if let Retrieval::FanOut(fan_out) = &self.retrieval {
            let name = &fan_out.consumer_name;
            if name.is_empty()
                || name.len() > 128
                || !name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
            {
                return bad("retrieval.consumer_name", "must be 1 to 128 of a-z A-Z 0-9 _ - .");
            }
        }
        if let Err(problem) = self.failure_policy.validate() {
            return bad("failure_policy", problem);
        }
        if self.shard_sync_interval.is_zero() || self.parent_poll_interval.is_zero() {
            return bad("shard_sync_interval / parent_poll_interval", "must not be zero");
        }
        Ok(())
    }
}

/// A running worker. Dropping it stops the worker at once, like [`Scheduler::abort`].
#[derive(Debug)]
pub struct Scheduler {
    worker_id: String,
    coordinator: LeaseCoordinator,
    pub(crate) metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<Result<(), SchedulerError>>>,
    #[cfg(feature = "metrics")]
    pub(crate) publishing: crate::exporter::Publishing,
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

impl Scheduler {
    /// Validates `config` and starts the worker on the current tokio runtime. The lease table is
    /// created if missing.
    ///
    /// # Errors
    /// [`ConfigError`] for a setting out of range; nothing is started then.
    ///
    /// # Panics
    /// Outside a Tokio runtime (the worker's tasks are spawned on the current one).
    pub fn start<F: ProcessorFactory>(
        kinesis: aws_sdk_kinesis::Client,
        dynamodb: aws_sdk_dynamodb::Client,
        config: SchedulerConfig,
        factory: F,
    ) -> Result<Scheduler, ConfigError> {
        config.validate()?;
        let metrics = Arc::new(Metrics::default());
        let table = LeaseTable::new(dynamodb, config.application_name.clone());
        let mut coordinator_config = CoordinatorConfig::new(config.worker_id.clone()).with_failover(config.failover);
        coordinator_config.max_steal_per_round = config.max_steal_per_round;
        let coordinator = LeaseCoordinator::with_metrics(table, coordinator_config, metrics.clone());
        let shutdown = CancellationToken::new();
        #[cfg(feature = "metrics")]
        let publishing = crate::exporter::Publishing::new(&config);
        let worker = Worker {
            api: KinesisApi::new(kinesis, &config.stream_name),
            coordinator: coordinator.clone(),
            metrics: metrics.clone(),
            factory: Arc::new(factory),
            shutdown: shutdown.clone(),
            sync_now: Arc::new(Notify::new()),
            config,
        };
        let worker_id = worker.config.worker_id.clone();
        let task = tokio::spawn(worker.run());
        Ok(Scheduler {
            worker_id,
            coordinator,
            metrics,
            shutdown,
            task: Some(task),
            #[cfg(feature = "metrics")]
            publishing,
        })
    }

    /// This worker's id.
    pub fn worker_id(&self) -> &str {
        &self.worker_id
    }

    /// The counters now.
    pub fn metrics(&self) -> MetricsSnapshot {
        self.metrics.snapshot()
    }

    /// The keys (shard ids) of the leases held now.
    pub fn held_leases(&self) -> Vec<String> {
        self.coordinator.held_keys()
    }

    /// Whether the worker stopped (after a fatal error, or a shutdown).
    pub fn is_finished(&self) -> bool {
        self.task.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Shuts down gracefully: stops fetching, calls `shutdown_requested` on every processor (so
    /// they can checkpoint), waits for them (at most `shutdown_timeout`), then releases every
    /// lease so that other workers take them at once.
    ///
    /// # Errors
    /// The error the worker stopped on before, if it did.
    pub async fn shutdown(mut self) -> Result<(), SchedulerError> {
        self.shutdown.cancel();
        self.join().await
    }

    /// Runs until the worker stops on a fatal error (it does not stop otherwise).
    ///
    /// # Errors
    /// The error it stopped on.
    pub async fn wait(mut self) -> Result<(), SchedulerError> {
        self.join().await
    }

    async fn join(&mut self) -> Result<(), SchedulerError> {
        match self.task.take() {
            Some(task) => task.await.map_err(|e| SchedulerError::Task(e.to_string()))?,
            None => Ok(()),
        }
    }

    /// Stops at once: no processor is called, no lease is released (they expire after the
    /// failover time and other workers take them). What a crash does; for tests and emergencies.
    pub fn abort(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// First and largest wait before a shard sync asked for is tried again after it failed.
const SYNC_RETRY_BACKOFF: (Duration, Duration) = (Duration::from_millis(200), Duration::from_secs(10));

struct Worker<F> {
    api: KinesisApi,
    coordinator: LeaseCoordinator,
    metrics: Arc<Metrics>,
    factory: Arc<F>,
    shutdown: CancellationToken,
    sync_now: Arc<Notify>,
    config: SchedulerConfig,
}

impl<F: ProcessorFactory> Worker<F> {
    async fn run(self) -> Result<(), SchedulerError> {
        let table = self.coordinator.table().clone();
        let mut backoff = Duration::from_millis(100);
        loop {
            match table.create_if_missing(self.config.table_create_timeout).await {
                Ok(()) => break,
                Err(e) if e.kind.is_retryable() => {}
                Err(e) => return Err(SchedulerError::LeaseTable(e)),
            }
            self.pause(&mut backoff).await;
        }
        let consumer_arn: Option<Arc<str>> = match &self.config.retrieval {
            Retrieval::Polling => None,
            Retrieval::FanOut(fan_out) => match register(self.api.client(), self.api.stream(), fan_out).await {
                Ok(arn) => Some(arn.into()),
                Err(e) => return Err(SchedulerError::Kinesis(e)),
            },
        };
        loop {
            match self.sync().await {
                Ok(()) => break,
                Err(SyncError::Kinesis(e)) if !e.kind.is_retryable() => return Err(SchedulerError::Kinesis(e)),
                Err(SyncError::Table(e)) if !e.kind.is_retryable() => return Err(SchedulerError::LeaseTable(e)),
                Err(_) => self.pause(&mut backoff).await,
            }
            if self.shutdown.is_cancelled() {
                return Ok(());
            }
        }

        let renewer = self.coordinator.clone();
        let renew_interval = self.config.failover / 3;
        // Stopped between rounds at shutdown, never in the middle of one: a renewal cut off after
        // its write would leave this worker with a stale counter, and the release would fail.
        let stop_renewing = CancellationToken::new();
        let mut renewing = {
            let stop = stop_renewing.clone();
            AbortOnDrop(tokio::spawn(async move {
                let mut tick = tokio::time::interval(renew_interval);
                tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tick.tick() => {}
                    }
                    if let Err(error) = renewer.renew_round().await {
                        tracing::warn!(%error, "renew round failed");
                    }
                }
            }))
        };

        let stop_consumers = CancellationToken::new();
        let mut consumers: JoinSet<Exit> = JoinSet::new();
        let mut running: HashMap<tokio::task::Id, Arc<HeldLease>> = HashMap::new();
        // Leases gained while the consumer of an earlier hold of the same lease still runs (its
        // last call): they start when it ends, so that a shard never has two consumers here.
        let mut waiting: Vec<Arc<HeldLease>> = Vec::new();
        let take_interval = self.config.failover * 2;
        let take = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(take);
        let mut half_way = false;
        let mut sync =
            tokio::time::interval_at(Instant::now() + self.config.shard_sync_interval, self.config.shard_sync_interval);
        sync.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // A sync asked for (a shard ended, a lease row vanished) that failed is tried again with
        // backoff until it succeeds, not left to the periodic one: children wait for it.
        let retry_sync = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(retry_sync);
        let mut sync_wanted = false;
        let mut sync_backoff = crate::fetcher::backoff(SYNC_RETRY_BACKOFF);
        loop {
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => break,
                Some(joined) = consumers.join_next_with_id(), if !consumers.is_empty() => {
                    let (id, exit) = match joined {
                        Ok((id, exit)) => (id, Ok(exit)),
                        Err(e) => (e.id(), Err(e)),
                    };
                    let Some(held) = running.remove(&id) else { continue };
                    self.consumer_ended(&held, exit).await;
                    let (ready, still): (Vec<_>, Vec<_>) = std::mem::take(&mut waiting)
                        .into_iter()
                        .partition(|w| !running.values().any(|r| r.key() == w.key()));
                    waiting = still;
                    for held in ready {
                        self.spawn(&mut consumers, &mut running, held, &stop_consumers, &consumer_arn);
                    }
                }
                _ = &mut take => {
                    // Take rounds and expiry rounds alternate, a little more than a failover
                    // time apart: so a counter seen still from one listing to the next has
                    // stood still for longer than the failover time. The random part keeps the
                    // rounds of workers started together out of step with each other's renewals.
                    take.as_mut().reset(Instant::now() + (take_interval / 2).mul_f64(1.02 + fastrand::f64() * 0.08));
                    let full = !half_way;
                    half_way = !half_way;
                    let round = if full {
                        self.coordinator.take_round(Instant::now()).await
                    } else {
                        self.coordinator.expiry_round(Instant::now()).await
                    };
                    match round {
                        Ok(gained) => {
                            for held in gained {
                                if running.values().any(|r| r.key() == held.key()) {
                                    waiting.push(held);
                                } else {
                                    self.spawn(&mut consumers, &mut running, held, &stop_consumers, &consumer_arn);
                                }
                            }
                        }
                        Err(error) => tracing::warn!(%error, "take round failed"),
                    }
                }
                _ = sync.tick() => {
                    if self.sync_logged().await {
                        sync_wanted = false;
                    }
                }
                _ = self.sync_now.notified() => sync_wanted = true,
                _ = &mut retry_sync, if sync_wanted => {
                    if self.sync_logged().await {
                        sync_wanted = false;
                        sync_backoff = crate::fetcher::backoff(SYNC_RETRY_BACKOFF);
                    } else {
                        let wait = sync_backoff.next().unwrap_or(SYNC_RETRY_BACKOFF.1);
                        retry_sync.as_mut().reset(Instant::now() + wait);
                    }
                }
            }
        }

        // Graceful shutdown: processors get their last call, then the leases go.
        tracing::info!(worker = %self.config.worker_id, shards = running.len(), "shutting down");
        stop_consumers.cancel();
        let drained = tokio::time::timeout(self.config.shutdown_timeout, async {
            while let Some(joined) = consumers.join_next_with_id().await {
                if let Ok((id, Exit::ShardEnded)) = joined
                    && let Some(held) = running.remove(&id)
                {
                    self.consumer_ended(&held, Ok(Exit::ShardEnded)).await;
                }
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!("processors did not finish within the shutdown timeout; stopping them");
            consumers.abort_all();
        }
        stop_renewing.cancel();
        let _ = (&mut renewing.0).await;
        if let Err(error) = self.coordinator.release_all().await {
            tracing::warn!(%error, "releasing the leases failed; they expire after the failover time");
        }
        Ok(())
    }

    fn spawn(
        &self,
        consumers: &mut JoinSet<Exit>,
        running: &mut HashMap<tokio::task::Id, Arc<HeldLease>>,
        held: Arc<HeldLease>,
        stop: &CancellationToken,
        consumer_arn: &Option<Arc<str>>,
    ) {
        let processor = self.factory.create(held.key());
        let mut context = self.context(held.clone(), stop);
        if let (Retrieval::FanOut(config), Some(arn)) = (&self.config.retrieval, consumer_arn) {
            context.fan_out = Some((arn.clone(), config.clone()));
        }
        let handle = consumers.spawn(shard_consumer::run(context, processor));
        running.insert(handle.id(), held);
    }

    fn context(&self, held: Arc<HeldLease>, stop: &CancellationToken) -> Context {
        Context {
            held,
            table: self.coordinator.table().clone(),
            api: self.api.clone(),
            polling: self.config.polling.clone(),
            initial: self.config.initial_position,
            parent_poll_interval: self.config.parent_poll_interval,
            max_batch_records: self.config.max_batch_records,
            max_batch_wait: self.config.max_batch_wait,
            metrics: self.metrics.clone(),
            shutdown: stop.clone(),
            fan_out: None,
            failure_policy: self.config.failure_policy.clone(),
        }
    }

    /// Handles the end of the consumer of `held` (this hold of the lease, not a later one).
    async fn consumer_ended(&self, held: &Arc<HeldLease>, exit: Result<Exit, tokio::task::JoinError>) {
        let key = held.key();
        match exit {
            Ok(Exit::LeaseLost) => {
                self.coordinator.forget_held(held);
                // The row deleted under this worker, or at SHARD_END (the end was written, then the
                // lease moved): a sync now gives the shard (or its children) their leases,
                // instead of the next periodic one.
                match self.coordinator.table().get(key).await {
                    Ok(None) => {
                        tracing::warn!(shard_id = key, "the lease row is gone; syncing the shards now");
                        self.sync_now.notify_one();
                    }
                    Ok(Some(lease)) if lease.checkpoint.position == crate::Position::ShardEnd => {
                        self.sync_now.notify_one()
                    }
                    Ok(Some(_)) => {}
                    Err(error) => {
                        tracing::warn!(shard_id = key, %error, "reading a lost lease failed; syncing the shards now");
                        self.sync_now.notify_one();
                    }
                }
            }
            Ok(Exit::ShardEnded) => {
                // The shard is done: give its lease up (no worker takes a lease at SHARD_END),
                // and list the shards so that its children have leases.
                self.release(held).await;
                self.sync_now.notify_one();
            }
            Ok(Exit::Shutdown) => {}
            Ok(Exit::Failed) => self.release(held).await,
            Ok(Exit::Restart) => {
                tracing::info!(
                    shard_id = key,
                    "the processor asked to read the shard again from its checkpoint; the lease is released"
                );
                self.release(held).await;
            }
            Err(e) => {
                tracing::error!(shard_id = key, error = %e, "a shard's processor panicked; its lease is released");
                self.release(held).await;
            }
        }
    }

    async fn release(&self, held: &Arc<HeldLease>) {
        let key = held.key();
        if let Err(error) = self.coordinator.release_held(held).await {
            tracing::warn!(shard_id = key, %error, "releasing a lease failed; it expires after the failover time");
        }
    }

    async fn sync(&self) -> Result<(), SyncError> {
        let created =
            sync_shards(&self.api, self.coordinator.table(), self.config.initial_position, Some(&self.metrics)).await?;
        Metrics::add(&self.metrics.shard_syncs, 1);
        if created > 0 {
            tracing::info!(stream = self.api.stream(), created, "shard sync created leases");
        }
        Ok(())
    }

    /// Runs a shard sync; whether it succeeded.
    async fn sync_logged(&self) -> bool {
        match self.sync().await {
            Ok(()) => true,
            Err(error) => {
                tracing::warn!(%error, "shard sync failed");
                false
            }
        }
    }

    async fn pause(&self, backoff: &mut Duration) {
        tokio::select! {
            _ = self.shutdown.cancelled() => {}
            _ = tokio::time::sleep(*backoff) => {}
        }
        *backoff = (*backoff * 2).min(Duration::from_secs(10));
    }
}
