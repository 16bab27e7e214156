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

mod config;
mod sync;
mod worker;

use std::sync::Arc;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

pub use config::{LeaseManagement, SchedulerConfig};
use worker::Worker;

use crate::error::{ConfigError, SchedulerError};
use crate::leases::coordinator::{CoordinatorConfig, LeaseCoordinator};
use crate::leases::scope::LeaseScope;
use crate::leases::table::LeaseTable;
use crate::metrics::{Metrics, MetricsSnapshot};
use crate::processor::ProcessorFactory;

/// The `stream` label of a multi-stream worker's metrics.
#[cfg(feature = "metrics")]
const MULTI_STREAM_LABEL: &str = "(multi-stream)";

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
        let stream = config.stream_address()?;
        let scope = Arc::new(LeaseScope::new(stream.is_none()));
        let metrics = Arc::new(Metrics::default());
        let dynamodb = crate::metrics::counting_requests(&dynamodb, &metrics);
        let table = LeaseTable::new(dynamodb, config.application_name.clone());
        let mut coordinator_config = CoordinatorConfig::new(config.worker_id.clone()).with_failover(config.failover);
        coordinator_config.max_steal_per_round = config.max_steal_per_round;
        coordinator_config.handoff_timeout = config.handoff_timeout;
        let coordinator =
            LeaseCoordinator::with_metrics(table, coordinator_config, metrics.clone()).with_scope(scope.clone());
        let shutdown = CancellationToken::new();
        #[cfg(feature = "metrics")]
        let publishing =
            crate::exporter::Publishing::new(&config, stream.as_ref().map_or(MULTI_STREAM_LABEL, |s| s.name()));
        let worker = Worker {
            kinesis,
            stream,
            scope,
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

    /// The keys of the leases held now: shard ids, or in a multi-stream application
    /// `account:stream:creationEpoch:shardId`.
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
