//! The worker task: creates the lease table, syncs shards (`sync.rs`), runs the renewer and the take rounds,
//! starts one shard consumer per lease gained, and shuts down gracefully.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::{LeaseManagement, SchedulerConfig};
use crate::error::SchedulerError;
use crate::leases::coordinator::LeaseCoordinator;
use crate::leases::held::HeldLease;
use crate::leases::migration::{self, ClientVersion};
use crate::leases::scope::LeaseScope;
use crate::leases::shard_sync::SyncError;
use crate::lifecycle::{self, AbortOnDrop, Context, Exit};
use crate::metrics::Metrics;
use crate::processor::{ProcessorFactory, ShardInfo};
use crate::retrieval::fan_out::Retrieval;
use crate::retrieval::kinesis::KinesisApi;
use crate::streams::tracked::{Served, Tracked};
use crate::worker_metrics::{RowPlace, WorkerMetrics};

/// The consumers running: the hold of the lease each reads, and its own stop token.
pub(super) type Running = HashMap<tokio::task::Id, (Arc<HeldLease>, CancellationToken)>;

/// First and largest wait before a shard sync asked for is tried again after it failed.
const SYNC_RETRY_BACKOFF: (Duration, Duration) = (Duration::from_millis(200), Duration::from_secs(10));

pub(crate) struct Worker<F> {
    pub(crate) kinesis: aws_sdk_kinesis::Client,
    /// The stream of a single-stream worker; `None` in multi-stream mode (`config.streams`).
    pub(crate) stream: Option<kinesis_core::StreamAddress>,
    /// The leases this worker reads (shared with its coordinator and leader).
    pub(crate) scope: Arc<LeaseScope>,
    pub(crate) coordinator: LeaseCoordinator,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) factory: Arc<F>,
    pub(crate) shutdown: CancellationToken,
    pub(crate) sync_now: Arc<Notify>,
    pub(crate) config: SchedulerConfig,
}

impl<F: ProcessorFactory> Worker<F> {
    pub(crate) async fn run(self) -> Result<(), SchedulerError> {
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
        let mut version = self.client_version(ClientVersion::Absent).await;
        // A new (empty) table starts in KCL 3.x lease management. A table with leases and no
        // Migration3.0 row is a KCL 2.x table, whose workers would fight a leader: it starts the
        // KCL's upgrade instead (2.x lease management, worker metrics published, 3.x once every
        // lease owner publishes them; see `upgrade_step`).
        if version == ClientVersion::Absent && self.config.lease_management == LeaseManagement::Kcl3 {
            let empty = self.table_is_empty().await;
            let table = self.coordinator.table();
            loop {
                let started = match table.create_owner_index_if_missing(self.config.table_create_timeout).await {
                    Ok(()) if empty => migration::start_3x(table.client(), table.name(), &self.config.worker_id).await,
                    Ok(()) => migration::start_upgrade(table.client(), table.name(), &self.config.worker_id).await,
                    Err(error) => Err(error),
                };
                match started {
                    Ok(started) => {
                        version = started;
                        break;
                    }
                    Err(e) if e.kind.is_retryable() => {}
                    Err(e) => return Err(SchedulerError::LeaseTable(e)),
                }
                self.pause(&mut backoff).await;
                if self.shutdown.is_cancelled() {
                    return Ok(());
                }
            }
            tracing::info!(worker = %self.config.worker_id, ?version, empty, "the table's lease management");
        }
        let mut tracked = match &self.stream {
            Some(address) => {
                let api = KinesisApi::new(self.kinesis.clone(), address.clone());
                let (initial, retrieval) = (self.config.initial_position, self.config.retrieval.clone());
                Tracked::single(api, initial, retrieval, self.scope.clone()).await.map_err(SchedulerError::Kinesis)?
            }
            None => {
                let mut tracked = Tracked::multi(
                    self.kinesis.clone(),
                    self.config.retrieval.clone(),
                    self.config.former_streams,
                    self.scope.clone(),
                );
                self.poll_streams(&mut tracked).await;
                tracked
            }
        };
        loop {
            match self.sync(&mut tracked).await {
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
        let renew_interval = self.coordinator.config().renew_interval();
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

        // KCL 3.x: the WorkerMetricStats row, sampled every second, written every 30 s while the
        // table asks for it.
        let publishing = Arc::new(AtomicBool::new(version.publishes_worker_metrics()));
        let metrics_place = self.worker_metrics_place().await;
        let _publisher = AbortOnDrop(tokio::spawn(publish_worker_metrics(
            table.client().clone(),
            metrics_place.clone(),
            self.config.worker_id.clone(),
            self.config.cpu_source,
            publishing.clone(),
            self.config.worker_metrics_interval,
            self.metrics.clone(),
        )));

        // KCL 3.x: every worker contends for the leader lock; the leader assigns the leases.
        let stop_leading = CancellationToken::new();
        let mut leading: Option<AbortOnDrop> = None;
        // Woken by this process's leader when it assigned this worker a lease.
        let assigned_here = Arc::new(Notify::new());
        self.lead_if_3x(&version, &mut leading, &stop_leading, &assigned_here);

        let stop_consumers = CancellationToken::new();
        let mut consumers: JoinSet<Exit> = JoinSet::new();
        let mut running: Running = HashMap::new();
        // Leases gained while the consumer of an earlier hold of the same lease still runs (its
        // last call): they start when it ends, so that a shard never has two consumers here.
        let mut waiting: Vec<Arc<HeldLease>> = Vec::new();
        let take_interval = self.coordinator.config().take_interval();
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
        // KCL 2.x -> 3.x upgrade: since when the fleet has been ready without a break.
        let mut upgrade_ready_since: Option<Instant> = None;
        let mut sync_backoff = crate::retrieval::polling::backoff(SYNC_RETRY_BACKOFF);
        // Multi-stream: the tracker asked for the streams.
        let poll_every = self.config.stream_poll_interval;
        let mut stream_poll = tokio::time::interval_at(Instant::now() + poll_every, poll_every);
        stream_poll.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => break,
                Some(joined) = consumers.join_next_with_id(), if !consumers.is_empty() => {
                    let (id, exit) = match joined {
                        Ok((id, exit)) => (id, Ok(exit)),
                        Err(e) => (e.id(), Err(e)),
                    };
                    let Some((held, _)) = running.remove(&id) else { continue };
                    self.consumer_ended(&held, exit).await;
                    let (ready, still): (Vec<_>, Vec<_>) = std::mem::take(&mut waiting)
                        .into_iter()
                        .partition(|w| !running.values().any(|(r, _)| r.key() == w.key()));
                    waiting = still;
                    for held in ready {
                        self.spawn(&mut tracked, &mut consumers, &mut running, held, &stop_consumers).await;
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
                    let round = if version.leader_assigns() {
                        // A leader assigns; this worker finds what it was given.
                        self.coordinator.discovery_round().await
                    } else if full {
                        self.coordinator.take_round(Instant::now()).await
                    } else {
                        self.coordinator.expiry_round(Instant::now()).await
                    };
                    match round {
                        Ok(gained) => {
                            for held in gained {
                                if running.values().any(|(r, _)| r.key() == held.key()) {
                                    waiting.push(held);
                                } else {
                                    self.spawn(&mut tracked, &mut consumers, &mut running, held, &stop_consumers).await;
                                }
                            }
                        }
                        Err(error) => tracing::warn!(%error, "take round failed"),
                    }
                }
                _ = stream_poll.tick(), if self.stream.is_none() => {
                    if self.poll_streams(&mut tracked).await {
                        // A new stream: its leases now, not at the next periodic sync.
                        sync_wanted = true;
                        retry_sync.as_mut().reset(Instant::now());
                    }
                    self.retire_streams(&mut tracked, &running).await;
                }
                _ = sync.tick() => {
                    if self.sync_logged(&mut tracked).await {
                        sync_wanted = false;
                    }
                    version = self.client_version(version).await;
                    if version == ClientVersion::UpgradeFrom2x && self.upgrade_step(&mut upgrade_ready_since).await {
                        version = self.client_version(version).await;
                    }
                    publishing.store(version.publishes_worker_metrics(), Ordering::Relaxed);
                    self.lead_if_3x(&version, &mut leading, &stop_leading, &assigned_here);
                }
                _ = self.sync_now.notified() => sync_wanted = true,
                // The leader here gave this worker a lease: discover it now, not at the next round.
                _ = assigned_here.notified(), if version.leader_assigns() => take.as_mut().reset(Instant::now()),
                _ = &mut retry_sync, if sync_wanted => {
                    if self.sync_logged(&mut tracked).await {
                        sync_wanted = false;
                        sync_backoff = crate::retrieval::polling::backoff(SYNC_RETRY_BACKOFF);
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
                    && let Some((held, _)) = running.remove(&id)
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
        // The lock goes first, so that another worker leads (and assigns these leases) at once.
        stop_leading.cancel();
        if let Some(task) = leading.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), task.wait()).await;
        }
        // No leader assigns anything to a worker that is gone (unlike the KCL, #1452).
        publishing.store(false, Ordering::Relaxed);
        if version.publishes_worker_metrics()
            && let Some(place) = &metrics_place
            && let Err(error) = crate::worker_metrics::delete(table.client(), place, &self.config.worker_id).await
        {
            tracing::warn!(%error, "deleting this worker's WorkerMetricStats row failed; it ages out in 60 s");
        }
        stop_renewing.cancel();
        let _ = (&mut renewing.0).await;
        if let Err(error) = self.coordinator.release_all().await {
            tracing::warn!(%error, "releasing the leases failed; they expire after the failover time");
        }
        Ok(())
    }

    /// Starts the consumer of a lease gained, with a stop token of its own (a child of `stop`).
    async fn spawn(
        &self,
        tracked: &mut Tracked,
        consumers: &mut JoinSet<Exit>,
        running: &mut Running,
        held: Arc<HeldLease>,
        stop: &CancellationToken,
    ) {
        let stream = match tracked.for_lease(held.stream_identifier()).await {
            Some(stream) if !self.scope.is_retired(held.stream_identifier()) => stream,
            _ => {
                tracing::warn!(lease = held.key(), "a lease of a stream this worker does not read; released");
                self.release(&held).await;
                return;
            }
        };
        let info = ShardInfo {
            stream: stream.name.to_string(),
            stream_identifier: stream.identifier.as_deref().map(str::to_owned),
            shard_id: held.shard_id().to_owned(),
            lease_key: held.key().to_owned(),
        };
        let processor = self.factory.create_for(&info);
        let stop = stop.child_token();
        let mut context = self.context(held.clone(), &stream, &stop);
        if let (Retrieval::FanOut(config), Some(arn)) = (&self.config.retrieval, &stream.consumer_arn) {
            context.fan_out = Some((arn.clone(), config.clone()));
        }
        let handle = consumers.spawn(lifecycle::run(context, processor));
        running.insert(handle.id(), (held, stop));
    }

    fn context(&self, held: Arc<HeldLease>, stream: &Served, stop: &CancellationToken) -> Context {
        Context {
            held,
            stream: stream.name.clone(),
            stream_identifier: stream.identifier.clone(),
            table: self.coordinator.table().clone(),
            api: stream.api.clone(),
            polling: self.config.polling.clone(),
            initial: stream.initial,
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
            Ok(Exit::Shutdown) => {
                // Stopped because its stream is retired (not because the worker shuts down):
                // the lease goes, to be deleted.
                if self.scope.is_retired(held.stream_identifier()) {
                    self.release(held).await;
                }
            }
            Ok(Exit::HandedOff) => {
                if let Err(error) = self.coordinator.transfer_held(held).await {
                    tracing::warn!(shard_id = key, %error, "transferring a lease failed; the leader forces it after its timeout");
                }
            }
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

    /// Starts contending for the leader lock when the table is in KCL 3.x lease management (and
    /// stops when it no longer is).
    fn lead_if_3x(
        &self,
        version: &ClientVersion,
        leading: &mut Option<AbortOnDrop>,
        stop: &CancellationToken,
        assigned_here: &Arc<Notify>,
    ) {
        if !version.leader_assigns() {
            *leading = None;
            return;
        }
        if leading.is_some() {
            return;
        }
        let (lock_duration, heartbeat) = self.config.leader_lock();
        let config = crate::leader::LeaderConfig {
            worker_id: self.config.worker_id.clone(),
            failover: self.config.failover,
            lock_duration,
            heartbeat,
            handoff_timeout: self.config.handoff_timeout,
            max_per_worker: self.config.max_leases_per_worker,
            worker_fresh: self.config.worker_fresh(),
            strategy: self.config.assignment_strategy,
            assigned_here: assigned_here.clone(),
            scope: self.scope.clone(),
        };
        let table = self.coordinator.table().clone();
        *leading =
            Some(AbortOnDrop(tokio::spawn(crate::leader::run(table, config, self.metrics.clone(), stop.clone()))));
    }

    /// Whether the lease table holds no lease (a new table); false when that cannot be read.
    async fn table_is_empty(&self) -> bool {
        match self.coordinator.table().list().await {
            Ok(leases) => leases.is_empty(),
            Err(error) => {
                tracing::warn!(%error, "listing the lease table failed; treating it as a KCL 2.x table");
                false
            }
        }
    }

    /// One check of an upgrading table (the KCL's `MigrationReadyMonitor`, here on every worker:
    /// the flip is conditional, so only one write wins): the lease-owner index ACTIVE and every
    /// lease owner publishing WorkerMetricStats, without a break for `upgrade_stabilisation`,
    /// flips the table to 3.x. Returns whether this call flipped it.
    async fn upgrade_step(&self, ready_since: &mut Option<Instant>) -> bool {
        let table = self.coordinator.table();
        let now_epoch = crate::worker_metrics::epoch_seconds(std::time::SystemTime::now());
        let ready = match table.scan_fleet().await {
            Ok((leases, workers)) => migration::upgrade_ready(&leases, &workers, self.config.worker_fresh(), now_epoch),
            Err(error) => {
                tracing::warn!(%error, "reading the fleet for the 3.x upgrade failed");
                return false;
            }
        } && table.create_owner_index_if_missing(self.config.table_create_timeout).await.is_ok();
        if !ready {
            *ready_since = None;
            return false;
        }
        let since = *ready_since.get_or_insert_with(Instant::now);
        if since.elapsed() < self.config.upgrade_stabilisation {
            return false;
        }
        match migration::flip_to_3x(table.client(), table.name(), &self.config.worker_id).await {
            Ok(flipped) => {
                if flipped {
                    tracing::info!(worker = %self.config.worker_id, "the table is upgraded to KCL 3.x lease management");
                }
                flipped
            }
            Err(error) => {
                tracing::warn!(%error, "flipping the table to KCL 3.x failed");
                false
            }
        }
    }

    /// What the table's `Migration3.0` row says now; `current` when it cannot be read.
    async fn client_version(&self, current: ClientVersion) -> ClientVersion {
        match migration::read(self.coordinator.table().client(), self.coordinator.table().name()).await {
            Ok(version) => {
                if version != current {
                    tracing::info!(worker = %self.config.worker_id, ?version, leader_assigns = version.leader_assigns(),
                        "lease management of the table");
                    if version.publishes_worker_metrics() {
                        // The KCL creates it when a table enters 3.x (or the upgrade to it);
                        // discovery needs it.
                        let table = self.coordinator.table();
                        if let Err(error) = table.create_owner_index_if_missing(self.config.table_create_timeout).await
                        {
                            tracing::warn!(%error, "creating the lease-owner index failed; trying again later");
                            return current;
                        }
                    }
                }
                version
            }
            Err(error) => {
                tracing::warn!(%error, "reading the table's Migration3.0 row failed");
                current
            }
        }
    }

    /// Where this worker's WorkerMetricStats row goes; `None` when that cannot be found out (no
    /// row is written then).
    async fn worker_metrics_place(&self) -> Option<RowPlace> {
        let table = self.coordinator.table();
        match migration::worker_metrics_place(table.client(), table.name()).await {
            Ok(place) => Some(place),
            Err(error) => {
                tracing::warn!(%error, "finding the WorkerMetricStats table failed; this worker publishes no metrics");
                None
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

/// Samples this worker's CPU every second and writes its WorkerMetricStats row every 30 s (the
/// first after 2 s) while `publishing` is set.
async fn publish_worker_metrics(
    client: aws_sdk_dynamodb::Client,
    place: Option<RowPlace>,
    worker_id: String,
    source: crate::CpuSource,
    publishing: Arc<AtomicBool>,
    interval: Duration,
    metrics: Arc<Metrics>,
) {
    let Some(place) = place else { return };
    let mut figures = WorkerMetrics::new(source);
    let mut sample = tokio::time::interval(crate::worker_metrics::cpu::SAMPLE_INTERVAL);
    sample.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut next_report = Instant::now() + crate::worker_metrics::FIRST_REPORT;
    loop {
        sample.tick().await;
        // A table in 2.x lease management wants no row: nothing is sampled either.
        if !publishing.load(Ordering::Relaxed) {
            continue;
        }
        figures.sample(Instant::now());
        if Instant::now() < next_report {
            continue;
        }
        next_report = Instant::now() + interval;
        let row = figures.next_figures();
        match crate::worker_metrics::publish(&client, &place, &worker_id, row, std::time::SystemTime::now()).await {
            Ok(()) => Metrics::add(&metrics.worker_metrics_published, 1),
            Err(error) => tracing::warn!(%error, "writing this worker's WorkerMetricStats row failed"),
        }
    }
}
