//! A worker's settings, with the KCL's defaults, checked before anything starts.

use std::time::{Duration, SystemTime};

use kinesis_core::StreamAddress;

use crate::error::ConfigError;
use crate::leases::shard_sync::InitialPosition;
use crate::retrieval::fan_out::Retrieval;
use crate::retrieval::polling::PollingConfig;

/// Settings of a worker. Defaults are the KCL's; set fields on the value [`SchedulerConfig::new`]
/// returns.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct SchedulerConfig {
    /// The stream to read: its name, or its ARN (`arn:aws:kinesis:REGION:ACCOUNT:stream/NAME`),
    /// the way to read another account's stream. By ARN, every Kinesis call carries `StreamARN`
    /// (see [`kinesis_core::StreamAddress`]); the stream's resource policy must allow this caller
    /// `kinesis:DescribeStreamSummary`, `kinesis:ListShards`, `kinesis:GetShardIterator` and
    /// `kinesis:GetRecords` (with fan-out: `kinesis:RegisterStreamConsumer` and
    /// `kinesis:DescribeStreamConsumer`, and the consumer's policy `kinesis:SubscribeToShard`).
    /// Empty in a multi-stream application ([`SchedulerConfig::new_multi_stream`]).
    pub stream: String,
    /// Multi-stream mode (the KCL's `MultiStreamTracker`): the streams to read, instead of
    /// `stream`. Their leases are keyed `account:stream:creationEpoch:shardId` in one lease
    /// table, as the KCL's; each stream has its own initial position (`initial_position` is
    /// unused). `None`: single-stream mode.
    pub streams: Option<crate::StreamTracker>,
    /// Multi-stream mode: how often the tracker is asked for the streams (KCL: 60 s).
    pub stream_poll_interval: Duration,
    /// Multi-stream mode: what becomes of the leases of a stream no longer listed (default:
    /// kept and read, as the KCL's `NO_STREAMS_LEASES_DELETION`).
    pub former_streams: crate::FormerStreams,
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
    /// Where this worker's CPU utilisation is measured for its WorkerMetricStats row, which a KCL
    /// 3.x leader balances by (written only when the table is in KCL 3.x lease management).
    /// Default: this process.
    pub cpu_source: crate::CpuSource,
    /// How long a graceful handoff waits for the processor's `shutdown_requested` before the
    /// lease is transferred anyway (KCL `gracefulLeaseHandoffTimeoutMillis`: 30 s).
    pub handoff_timeout: Duration,
    /// How the leases of a new (empty) table are managed. A table that says otherwise in its
    /// `Migration3.0` row is managed as it says, as by the KCL; a table with leases and no such
    /// row is a KCL 2.x table and is managed the 2.x way (its workers would fight a leader).
    /// Default: [`LeaseManagement::Kcl3`], as the KCL 3.x. Set
    /// [`LeaseManagement::Kcl2Compatible`] for a new table that KCL 2.x workers will share.
    pub lease_management: LeaseManagement,
    /// KCL 3.x: how long the leader lock lasts without a heartbeat. A killed leader is replaced
    /// once another worker has seen its lock unchanged for this long, and until then nothing is
    /// assigned (a dead worker's leases wait too). `None` (default): 3 x `failover` (30 s with the
    /// default failover). The KCL's `dynamoDbLockBasedLeaderLeaseDurationInMillis` is 120 s; the
    /// lock row carries its duration, which KCL workers honour, so a fleet mixing both keeps one
    /// rule. A worker restarted under the same `worker_id` takes its own lock back at once.
    pub leader_lock_duration: Option<Duration>,
    /// KCL 3.x: how often the leader renews its lock. `None` (default): a third of the lock's
    /// duration (the KCL: 30 s of 120 s). At most half of it.
    pub leader_heartbeat: Option<Duration>,
    /// KCL 3.x: the most leases the leader gives one worker (KCL `maxLeasesForWorker`: no limit).
    pub max_leases_per_worker: usize,
    /// KCL 3.x: how the leader shares the leases (KCL `leaseAssignmentStrategy`). Default: by
    /// worker utilisation with the KCL's thresholds, as the KCL.
    pub assignment_strategy: crate::AssignmentStrategy,
    /// KCL 3.x: how often this worker writes its WorkerMetricStats row (KCL
    /// `workerMetricsReporterFreqInMillis`: 30 s). A leader counts a worker active while its row
    /// is at most twice this old, so every worker of a fleet must use the same value.
    pub worker_metrics_interval: Duration,
    /// KCL 2.x -> 3.x upgrade: how long a fleet upgrading a 2.x table must be ready (every
    /// lease owner publishing WorkerMetricStats, the lease-owner index ACTIVE) without a break
    /// before the table is flipped to 3.x (KCL: 600 s). A `Kcl3` worker starts the upgrade when it
    /// finds a 2.x table (leases, no `Migration3.0` row); `Kcl2Compatible` workers on that table
    /// follow it.
    pub upgrade_stabilisation: Duration,
}

/// How the leases of a table are shared among workers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum LeaseManagement {
    /// The KCL 2.x way: every worker takes free and expired leases up to its share, and steals
    /// from the busiest worker; a stolen lease is read again from its last checkpoint. For a
    /// table shared with KCL 2.x workers (or KCL 3.x ones in
    /// `CLIENT_VERSION_CONFIG_COMPATIBLE_WITH_2X`).
    Kcl2Compatible,
    /// The KCL 3.x way: one worker holds the leader lock and assigns every lease; a planned move
    /// is a graceful handoff (the old owner's processor gets `shutdown_requested`, checkpoints,
    /// and the new owner starts at exactly that checkpoint), so nothing is delivered twice.
    /// Workers publish WorkerMetricStats rows and find their leases through the
    /// `LeaseOwnerToLeaseKeyIndex`. A new table gets the KCL's `Migration3.0` row saying so.
    #[default]
    Kcl3,
}

impl SchedulerConfig {
    /// A worker of `application_name` reading `stream` (its name or its ARN), with the KCL's
    /// defaults.
    pub fn new(stream: impl Into<String>, application_name: impl Into<String>) -> Self {
        let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().subsec_nanos();
        SchedulerConfig {
            stream: stream.into(),
            streams: None,
            stream_poll_interval: Duration::from_secs(60),
            former_streams: crate::FormerStreams::default(),
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
            cpu_source: crate::CpuSource::default(),
            handoff_timeout: Duration::from_secs(30),
            lease_management: LeaseManagement::default(),
            leader_lock_duration: None,
            leader_heartbeat: None,
            max_leases_per_worker: usize::MAX,
            assignment_strategy: crate::AssignmentStrategy::default(),
            worker_metrics_interval: Duration::from_secs(30),
            upgrade_stabilisation: Duration::from_secs(600),
        }
    }

    /// A worker of `application_name` reading the streams `tracker` gives (the KCL's multi-stream
    /// mode), with the KCL's defaults. Every worker of the application must be given the same
    /// tracker.
    pub fn new_multi_stream(tracker: crate::StreamTracker, application_name: impl Into<String>) -> Self {
        SchedulerConfig { streams: Some(tracker), ..SchedulerConfig::new("", application_name) }
    }

    /// How old a worker's WorkerMetricStats row may be for the worker to count as running: twice
    /// `worker_metrics_interval` (so one missed write is forgiven). The leader's "active worker"
    /// and the 2.x -> 3.x upgrade's readiness both use it.
    pub(crate) fn worker_fresh(&self) -> Duration {
        self.worker_metrics_interval * 2
    }

    /// The leader lock's duration and heartbeat in effect.
    pub(crate) fn leader_lock(&self) -> (Duration, Duration) {
        let lock = self.leader_lock_duration.unwrap_or(self.failover * 3);
        (lock, self.leader_heartbeat.unwrap_or(lock / 3))
    }

    /// The stream, parsed; `None` in multi-stream mode.
    pub(crate) fn stream_address(&self) -> Result<Option<StreamAddress>, ConfigError> {
        if self.streams.is_some() {
            if !self.stream.is_empty() {
                return Err(ConfigError {
                    field: "stream",
                    problem: "must be empty in multi-stream mode (the tracker gives the streams)".into(),
                });
            }
            return Ok(None);
        }
        StreamAddress::parse(&self.stream).map(Some).map_err(|e| ConfigError { field: "stream", problem: e.reason })
    }

    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        let bad = |field, problem: &str| Err(ConfigError { field, problem: problem.to_owned() });
        self.stream_address()?;
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
        if crate::leases::lease::RESERVED_KEYS.contains(&self.worker_id.as_str())
            || self.worker_id.starts_with("shardId-")
        {
            // A KCL 3.5 table keys worker-metrics rows by worker id, beside the leases.
            return bad(
                "worker_id",
                "must not be a lease key or a key the KCL reserves (Leader, Migration3.0, TableMigration3.5)",
            );
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
        let (lock, heartbeat) = self.leader_lock();
        if lock.is_zero() || heartbeat.is_zero() || heartbeat * 2 > lock {
            return bad(
                "leader_heartbeat",
                "the lock's duration and heartbeat must be more than zero, the heartbeat at most half the duration",
            );
        }
        if self.worker_metrics_interval < Duration::from_secs(1) {
            return bad("worker_metrics_interval", "must be at least 1 s (the CPU is sampled every second)");
        }
        if let crate::AssignmentStrategy::WorkerUtilisation(u) = self.assignment_strategy
            && !(1..=100).contains(&u.dampening_percent)
        {
            return bad("assignment_strategy", "dampening_percent must be 1 to 100");
        }
        if self.max_leases_per_worker == 0 {
            return bad("max_leases_per_worker", "must be at least 1");
        }
        if let Some(streams) = self.streams.as_ref().and_then(|t| t.fixed_streams()) {
            for config in streams {
                if let Err(e) = StreamAddress::parse(&config.stream) {
                    return bad("streams", &e.to_string());
                }
            }
        }
        if self.stream_poll_interval.is_zero() {
            return bad("stream_poll_interval", "must not be zero");
        }
        if self.shard_sync_interval.is_zero() || self.parent_poll_interval.is_zero() {
            return bad("shard_sync_interval / parent_poll_interval", "must not be zero");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kcl3_settings_are_checked() {
        let good = SchedulerConfig::new("stream", "app");
        assert!(good.validate().is_ok());
        let field = |change: &dyn Fn(&mut SchedulerConfig)| {
            let mut config = good.clone();
            change(&mut config);
            config.validate().err().map(|e| e.field)
        };
        assert_eq!(field(&|c| c.worker_metrics_interval = Duration::from_millis(500)), Some("worker_metrics_interval"));
        assert_eq!(field(&|c| c.max_leases_per_worker = 0), Some("max_leases_per_worker"));
        let utilisation = crate::UtilisationConfig { dampening_percent: 0, ..Default::default() };
        let strategy = crate::AssignmentStrategy::WorkerUtilisation(utilisation);
        assert_eq!(field(&|c| c.assignment_strategy = strategy), Some("assignment_strategy"));
        assert_eq!(field(&|c| c.assignment_strategy = crate::AssignmentStrategy::LeaseCount), None);
    }

    #[test]
    fn the_stream_is_a_name_or_an_arn() {
        let arn = "arn:aws:kinesis:eu-west-1:111122223333:stream/orders";
        let by_arn = SchedulerConfig::new(arn, "app");
        assert!(by_arn.validate().is_ok());
        assert_eq!(by_arn.stream_address().unwrap().unwrap().arn().map(|a| a.account_id()), Some("111122223333"));
        for bad in ["", "orders/eu", "arn:aws:kinesis:eu-west-1:1111:stream/orders"] {
            let error = SchedulerConfig::new(bad, "app").validate().unwrap_err();
            assert_eq!(error.field, "stream", "{bad:?}: {error}");
        }
    }

    #[test]
    fn a_multi_stream_worker_has_a_tracker_and_no_stream() {
        use crate::{InitialPosition, StreamConfig, StreamTracker};
        let tracker = StreamTracker::fixed(vec![StreamConfig::new("orders", InitialPosition::TrimHorizon)]);
        let config = SchedulerConfig::new_multi_stream(tracker.clone(), "app");
        assert!(config.validate().is_ok());
        assert_eq!(config.stream_address().unwrap(), None);
        let both = SchedulerConfig { stream: "orders".into(), ..config.clone() };
        assert_eq!(both.validate().unwrap_err().field, "stream");
        let bad = StreamTracker::fixed(vec![StreamConfig::new("or/ders", InitialPosition::Latest)]);
        assert_eq!(SchedulerConfig::new_multi_stream(bad, "app").validate().unwrap_err().field, "streams");
    }
}
