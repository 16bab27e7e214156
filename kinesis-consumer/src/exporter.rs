//! Publishing [`MetricsSnapshot`]s to the [`metrics`] crate's facade (feature `metrics`): under the
//! KCL's names where it has one, and under the CloudWatch stream metrics a worker can stand for.
//!
//! The library never installs a recorder: without one, publishing does nothing. Install an exporter
//! (Prometheus, StatsD, ...) in the application, then call [`MetricsSnapshot::publish`] with the
//! labels you want, or let [`Scheduler::spawn_metrics_publisher`] do it every few seconds.
//!
//! | name                                   | kind    | from the snapshot             | KCL / CloudWatch     |
//! |----------------------------------------|---------|-------------------------------|----------------------|
//! | `RecordsProcessed`                     | counter | `records_processed`           | KCL (ProcessTask)    |
//! | `DataBytesProcessed`                   | counter | `bytes_processed`             | KCL (ProcessTask)    |
//! | `MillisBehindLatest` (label `shard_id`)| gauge   | `millis_behind_latest[shard]` | KCL (ProcessTask)    |
//! | `GetRecords.IteratorAgeMilliseconds`   | gauge   | max of `millis_behind_latest` | CloudWatch (stream)  |
//! | `ExpiredIterator`                      | counter | `expired_iterators`           | KCL                  |
//! | `CurrentLeases`                        | gauge   | `leases_held`                 | KCL (RenewAllLeases) |
//! | `TakenLeases`                          | counter | `leases_taken`                | KCL (TakeLeases)     |
//! | `LostLeases`                           | counter | `leases_lost`                 | KCL (RenewAllLeases) |
//! | `ReadProvisionedThroughputExceeded`    | counter | `read_throttles`              | CloudWatch (stream)  |
//! | `StolenLeases`                         | counter | `leases_stolen`               | ours                 |
//! | `ReleasedLeases`                       | counter | `leases_released`             | ours                 |
//! | `ProcessRecordsCalls`                  | counter | `process_calls`               | ours                 |
//! | `Checkpoints`                          | counter | `checkpoints`                 | ours                 |
//! | `CheckpointFailures`                   | counter | `checkpoint_failures`         | ours                 |
//! | `ShardsEnded`                          | counter | `shards_ended`                | ours                 |
//! | `ShardEndNotCheckpointed`              | counter | `shard_end_not_checkpointed`  | ours                 |
//! | `GetRecordsCalls`                      | counter | `get_records_calls`           | ours                 |
//! | `SubRecordsOutOfRange`                 | counter | `sub_records_out_of_range`    | ours                 |
//! | `RecordsBeforeCheckpoint`              | counter | `records_before_checkpoint`   | ours                 |
//! | `CorruptAggregates`                    | counter | `corrupt_aggregates`          | ours                 |
//! | `ShardSyncs`                           | counter | `shard_syncs`                 | ours                 |
//! | `Subscriptions`                        | counter | `subscriptions`               | ours                 |
//! | `Resubscriptions`                      | counter | `resubscriptions`             | ours                 |
//! | `DiscoveredLeases`                     | counter | `leases_discovered`           | ours (KCL 3.x)       |
//! | `LeaderElections`                      | counter | `leader_elections`            | ours (KCL 3.x)       |
//! | `LeasesAssigned`                       | counter | `leases_assigned`             | ours (KCL 3.x)       |
//! | `HandoffsInitiated`                    | counter | `handoffs_initiated`          | ours (KCL 3.x)       |
//! | `HandoffsStarted`                      | counter | `handoffs_started`            | ours (KCL 3.x)       |
//! | `HandoffsCompleted`                    | counter | `handoffs_completed`          | ours (KCL 3.x)       |
//! | `HandoffsTimedOut`                     | counter | `handoffs_timed_out`          | ours (KCL 3.x)       |
//! | `LeasesCleanedUp`                      | counter | `leases_cleaned_up`           | ours                 |
//! | `DynamoDbRequests` (label `operation`) | counter | `dynamodb_requests[op]`       | ours                 |
//!
//! The KCL publishes per operation and period; here every counter is the worker's total since it
//! started (set with `absolute`), and `TakenLeases` counts every lease taken, stolen ones included
//! (KCL 2.x lease management); in 3.x lease management a worker takes none itself, and
//! `DiscoveredLeases` counts those a leader assigned to it.
//! `GetRecords.IteratorAgeMilliseconds` is the largest `MillisBehindLatest` of the shards this
//! worker reads (0 when it reads none): how far behind the tip it is, which is what CloudWatch's
//! iterator age shows for a consumer that keeps up with its reads. CloudWatch's own metric is the
//! stream's, over every consumer.
//!
//! Two workers publishing with the same labels overwrite each other, which is why
//! [`Scheduler::spawn_metrics_publisher`] labels by worker too.

use std::collections::BTreeSet;
use std::time::Duration;

use metrics::{Label, counter, gauge};
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::metrics::MetricsSnapshot;
use crate::scheduler::{Scheduler, SchedulerConfig};

/// A counter's name and how to read it.
type Counter = (&'static str, fn(&MetricsSnapshot) -> u64);

const COUNTERS: &[Counter] = &[
    ("RecordsProcessed", |s| s.records_processed),
    ("DataBytesProcessed", |s| s.bytes_processed),
    ("ExpiredIterator", |s| s.expired_iterators),
    ("TakenLeases", |s| s.leases_taken),
    ("LostLeases", |s| s.leases_lost),
    ("ReadProvisionedThroughputExceeded", |s| s.read_throttles),
    ("StolenLeases", |s| s.leases_stolen),
    ("ReleasedLeases", |s| s.leases_released),
    ("ProcessRecordsCalls", |s| s.process_calls),
    ("Checkpoints", |s| s.checkpoints),
    ("CheckpointFailures", |s| s.checkpoint_failures),
    ("ShardsEnded", |s| s.shards_ended),
    ("ShardEndNotCheckpointed", |s| s.shard_end_not_checkpointed),
    ("GetRecordsCalls", |s| s.get_records_calls),
    ("SubRecordsOutOfRange", |s| s.sub_records_out_of_range),
    ("RecordsBeforeCheckpoint", |s| s.records_before_checkpoint),
    ("CorruptAggregates", |s| s.corrupt_aggregates),
    ("ShardSyncs", |s| s.shard_syncs),
    ("DiscoveredLeases", |s| s.leases_discovered),
    ("LeaderElections", |s| s.leader_elections),
    ("LeasesAssigned", |s| s.leases_assigned),
    ("HandoffsInitiated", |s| s.handoffs_initiated),
    ("HandoffsStarted", |s| s.handoffs_started),
    ("HandoffsCompleted", |s| s.handoffs_completed),
    ("HandoffsTimedOut", |s| s.handoffs_timed_out),
    ("LeasesCleanedUp", |s| s.leases_cleaned_up),
    ("Subscriptions", |s| s.subscriptions),
    ("Resubscriptions", |s| s.resubscriptions),
];

fn labels_of(labels: &[(&str, &str)]) -> Vec<Label> {
    labels.iter().map(|&(k, v)| Label::new(k.to_owned(), v.to_owned())).collect()
}

fn with_shard(labels: &[Label], shard_id: &str) -> Vec<Label> {
    let mut labels = labels.to_vec();
    labels.push(Label::new("shard_id", shard_id.to_owned()));
    labels
}

impl MetricsSnapshot {
    /// Publishes this snapshot to the `metrics` facade's recorder, with `labels` on every metric
    /// (and `shard_id` on `MillisBehindLatest`), under the names in the [`exporter`](crate::exporter)
    /// module's table. Does nothing when no recorder is installed.
    ///
    /// ```
    /// # fn example(worker: &kinesis_consumer::Scheduler) {
    /// worker.metrics().publish(&[("stream", "orders"), ("application", "billing")]);
    /// # }
    /// ```
    pub fn publish(&self, labels: &[(&str, &str)]) {
        let labels = labels_of(labels);
        for &(name, read) in COUNTERS {
            counter!(name, labels.clone()).absolute(read(self));
        }
        gauge!("CurrentLeases", labels.clone()).set(self.leases_held as f64);
        for (shard_id, &millis) in &self.millis_behind_latest {
            gauge!("MillisBehindLatest", with_shard(&labels, shard_id)).set(millis as f64);
        }
        for (operation, &n) in &self.dynamodb_requests {
            let mut labels = labels.clone();
            labels.push(Label::new("operation", operation.clone()));
            counter!("DynamoDbRequests", labels).absolute(n);
        }
        let age = self.millis_behind_latest.values().copied().max().unwrap_or(0);
        gauge!("GetRecords.IteratorAgeMilliseconds", labels).set(age as f64);
    }
}

/// What a [`Scheduler`] keeps for its metrics publishers: their labels, and a token cancelled when
/// the scheduler is dropped (after a shutdown, an abort, or on its own).
#[derive(Debug)]
pub(crate) struct Publishing {
    labels: [(&'static str, String); 3],
    dropped: CancellationToken,
}

impl Publishing {
    /// `stream`: the stream's name (the config may give its ARN).
    pub(crate) fn new(config: &SchedulerConfig, stream: &str) -> Self {
        Publishing {
            labels: [
                ("stream", stream.to_owned()),
                ("application", config.application_name.clone()),
                ("worker", config.worker_id.clone()),
            ],
            dropped: CancellationToken::new(),
        }
    }
}

impl Drop for Publishing {
    fn drop(&mut self) {
        self.dropped.cancel();
    }
}

impl Scheduler {
    /// Spawns a task that publishes this worker's metrics ([`MetricsSnapshot::publish`], labelled
    /// `stream`, `application` and `worker`: set `SchedulerConfig::worker_id` to something stable,
    /// such as the host name, to keep the label across restarts) at once and then every `every`,
    /// until the scheduler is dropped (by [`Scheduler::shutdown`], [`Scheduler::abort`] or
    /// otherwise); it publishes a last time then. A shard this worker stopped reading gets a
    /// `MillisBehindLatest` of 0, so that a stale lag does not linger. The task keeps nothing of
    /// the worker alive but its counters; abort it through the returned handle to stop it sooner.
    ///
    /// # Panics
    /// When `every` is zero, or outside a tokio runtime.
    pub fn spawn_metrics_publisher(&self, every: Duration) -> tokio::task::JoinHandle<()> {
        let metrics = self.metrics.clone();
        let labels = self.publishing.labels.clone();
        let dropped = self.publishing.dropped.clone();
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        tokio::spawn(async move {
            let labels: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let base = labels_of(&labels);
            let mut shards = BTreeSet::new();
            let mut publish = || {
                let snapshot = metrics.snapshot();
                snapshot.publish(&labels);
                let now: BTreeSet<String> = snapshot.millis_behind_latest.into_keys().collect();
                for gone in shards.difference(&now) {
                    gauge!("MillisBehindLatest", with_shard(&base, gone)).set(0.0);
                }
                shards = now;
            };
            loop {
                publish();
                tokio::select! {
                    _ = tick.tick() => {}
                    () = dropped.cancelled() => break,
                }
            }
            publish();
        })
    }
}
