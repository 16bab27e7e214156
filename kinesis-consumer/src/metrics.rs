//! The consumer's counters, read as a [`MetricsSnapshot`]. Names follow the KCL's where it has one.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Counters shared by a worker's tasks.
#[derive(Debug, Default)]
pub(crate) struct Metrics {
    pub records_processed: AtomicU64,
    pub bytes_processed: AtomicU64,
    pub process_calls: AtomicU64,
    pub checkpoints: AtomicU64,
    pub checkpoint_failures: AtomicU64,
    pub leases_taken: AtomicU64,
    pub leases_stolen: AtomicU64,
    pub leases_lost: AtomicU64,
    pub leases_released: AtomicU64,
    pub shards_ended: AtomicU64,
    pub shard_end_not_checkpointed: AtomicU64,
    pub get_records_calls: AtomicU64,
    pub read_throttles: AtomicU64,
    pub expired_iterators: AtomicU64,
    pub sub_records_out_of_range: AtomicU64,
    pub records_before_checkpoint: AtomicU64,
    pub unusable_checkpoints: AtomicU64,
    pub stale_leases_replaced: AtomicU64,
    pub processing_failures: AtomicU64,
    pub records_diverted: AtomicU64,
    pub corrupt_aggregates: AtomicU64,
    pub shard_syncs: AtomicU64,
    pub subscriptions: AtomicU64,
    pub resubscriptions: AtomicU64,
    pub handoffs_started: AtomicU64,
    pub handoffs_completed: AtomicU64,
    pub handoffs_timed_out: AtomicU64,
    pub leases_discovered: AtomicU64,
    pub worker_metrics_published: AtomicU64,
    pub leader_elections: AtomicU64,
    pub leases_assigned: AtomicU64,
    pub handoffs_initiated: AtomicU64,
    pub leases_cleaned_up: AtomicU64,
    pub held: AtomicU64,
    pub millis_behind: Mutex<BTreeMap<String, i64>>,
    /// DynamoDB requests sent (each attempt), by operation.
    pub dynamodb_requests: Mutex<BTreeMap<String, u64>>,
}

impl Metrics {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    /// Counts what unpacking a page left out.
    pub(crate) fn unpacked(&self, counts: crate::record::Unpacked) {
        Metrics::add(&self.sub_records_out_of_range, counts.out_of_range as u64);
        Metrics::add(&self.records_before_checkpoint, counts.before_checkpoint as u64);
        Metrics::add(&self.corrupt_aggregates, counts.corrupt as u64);
    }

    /// Counts one DynamoDB request (an attempt) of `operation`.
    pub(crate) fn dynamodb_request(&self, operation: &str) {
        let mut requests = self.dynamodb_requests.lock().unwrap_or_else(|e| e.into_inner());
        match requests.get_mut(operation) {
            Some(n) => *n += 1,
            None => {
                requests.insert(operation.to_owned(), 1);
            }
        }
    }

    pub(crate) fn behind(&self, shard_id: &str, millis: Option<i64>) {
        let mut map = self.millis_behind.lock().unwrap_or_else(|e| e.into_inner());
        match millis {
            Some(m) => {
                map.insert(shard_id.to_owned(), m);
            }
            None => {
                map.remove(shard_id);
            }
        }
    }

    pub(crate) fn snapshot(&self) -> MetricsSnapshot {
        let get = |c: &AtomicU64| c.load(Relaxed);
        MetricsSnapshot {
            leases_held: get(&self.held),
            records_processed: get(&self.records_processed),
            bytes_processed: get(&self.bytes_processed),
            process_calls: get(&self.process_calls),
            millis_behind_latest: self.millis_behind.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            dynamodb_requests: self.dynamodb_requests.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            checkpoints: get(&self.checkpoints),
            checkpoint_failures: get(&self.checkpoint_failures),
            leases_taken: get(&self.leases_taken),
            leases_stolen: get(&self.leases_stolen),
            leases_lost: get(&self.leases_lost),
            leases_released: get(&self.leases_released),
            shards_ended: get(&self.shards_ended),
            shard_end_not_checkpointed: get(&self.shard_end_not_checkpointed),
            get_records_calls: get(&self.get_records_calls),
            read_throttles: get(&self.read_throttles),
            expired_iterators: get(&self.expired_iterators),
            sub_records_out_of_range: get(&self.sub_records_out_of_range),
            records_before_checkpoint: get(&self.records_before_checkpoint),
            unusable_checkpoints: get(&self.unusable_checkpoints),
            stale_leases_replaced: get(&self.stale_leases_replaced),
            processing_failures: get(&self.processing_failures),
            records_diverted: get(&self.records_diverted),
            corrupt_aggregates: get(&self.corrupt_aggregates),
            shard_syncs: get(&self.shard_syncs),
            subscriptions: get(&self.subscriptions),
            resubscriptions: get(&self.resubscriptions),
            leases_cleaned_up: get(&self.leases_cleaned_up),
            handoffs_initiated: get(&self.handoffs_initiated),
            leases_assigned: get(&self.leases_assigned),
            leader_elections: get(&self.leader_elections),
            worker_metrics_published: get(&self.worker_metrics_published),
            leases_discovered: get(&self.leases_discovered),
            handoffs_timed_out: get(&self.handoffs_timed_out),
            handoffs_completed: get(&self.handoffs_completed),
            handoffs_started: get(&self.handoffs_started),
        }
    }
}

/// A worker's counters at one moment. Counters only grow, except `leases_held` and the
/// per-shard lag.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct MetricsSnapshot {
    /// Leases this worker holds now.
    pub leases_held: u64,
    /// User records handed to processors.
    pub records_processed: u64,
    /// Data bytes of those records.
    pub bytes_processed: u64,
    /// `process_records` calls.
    pub process_calls: u64,
    /// `MillisBehindLatest` of each shard being read, from its last GetRecords.
    pub millis_behind_latest: BTreeMap<String, i64>,
    /// DynamoDB requests this worker sent since it started, by operation (`GetItem`, `Query`,
    /// `Scan`, `UpdateItem`, ...): lease renewals, checkpoints, discovery, the leader's scans,
    /// the leader lock and the worker-metrics row. Each attempt counts, retries included: what
    /// the lease table is billed for (on-demand: per request).
    pub dynamodb_requests: BTreeMap<String, u64>,
    /// Checkpoints written.
    pub checkpoints: u64,
    /// Checkpoints refused (lease lost) or failed.
    pub checkpoint_failures: u64,
    /// Leases taken (free, expired or stolen).
    pub leases_taken: u64,
    /// Of those, leases stolen from a busier worker.
    pub leases_stolen: u64,
    /// Leases lost to another worker (or not renewed in time).
    pub leases_lost: u64,
    /// Leases given up: at shutdown, or once their shard was done.
    pub leases_released: u64,
    /// Shards processed to their end (SHARD_END checkpointed).
    pub shards_ended: u64,
    /// Times a processor returned from `shard_ended` without checkpointing SHARD_END.
    pub shard_end_not_checkpointed: u64,
    /// GetRecords calls.
    pub get_records_calls: u64,
    /// GetRecords calls refused for throughput.
    pub read_throttles: u64,
    /// Shard iterators that expired and were renewed.
    pub expired_iterators: u64,
    /// Sub-records left out because they were outside their shard's hash range.
    pub sub_records_out_of_range: u64,
    /// Records left out on resume because they were at or before the checkpoint.
    pub records_before_checkpoint: u64,
    /// Checkpoints Kinesis refused as a starting position (InvalidArgument: a sequence number of
    /// another shard, or of an older stream of the same name). The shard was read from
    /// TRIM_HORIZON instead, leaving out every record up to the checkpoint's number.
    pub unusable_checkpoints: u64,
    /// Leases that belonged to an older stream of the same name (their shard id now names
    /// another hash range, or a lease at SHARD_END names an open shard), replaced by new ones
    /// at TRIM_HORIZON.
    pub stale_leases_replaced: u64,
    /// Failures processors reported (`Checkpointer::fail_at`).
    pub processing_failures: u64,
    /// Records handed to the failure policy's destination and skipped.
    pub records_diverted: u64,
    /// Records with the aggregate magic that were not valid aggregates (handed over whole).
    pub corrupt_aggregates: u64,
    /// Shard syncs run.
    pub shard_syncs: u64,
    /// SubscribeToShard subscriptions made (enhanced fan-out).
    pub subscriptions: u64,
    /// Of those, subscriptions made again after one ended or failed.
    pub resubscriptions: u64,
    /// Leases of finished shards deleted (their children checkpointed, their parents gone).
    pub leases_cleaned_up: u64,
    /// Times this worker became the leader of a KCL 3.x fleet.
    pub leader_elections: u64,
    /// Leases this worker assigned as the leader (free, expired, or a handoff it finished).
    pub leases_assigned: u64,
    /// Graceful handoffs this worker started as the leader.
    pub handoffs_initiated: u64,
    /// Graceful handoffs a KCL 3.x leader asked of this worker (`checkpointOwner` set).
    pub handoffs_started: u64,
    /// Of those, leases transferred to the new owner (after the processor's `shutdown_requested`).
    pub handoffs_completed: u64,
    /// Handoffs transferred because the processor did not finish within the handoff timeout.
    pub handoffs_timed_out: u64,
    /// Leases a KCL 3.x leader assigned to this worker, found through the `LeaseOwnerToLeaseKeyIndex`.
    pub leases_discovered: u64,
    /// WorkerMetricStats rows written (KCL 3.x: every 30 s).
    pub worker_metrics_published: u64,
}

/// Makes a DynamoDB client that counts every request it sends into `metrics`, by operation.
pub(crate) fn counting_requests(
    client: &aws_sdk_dynamodb::Client,
    metrics: &std::sync::Arc<Metrics>,
) -> aws_sdk_dynamodb::Client {
    let config = client.config().to_builder().interceptor(CountRequests(metrics.clone())).build();
    aws_sdk_dynamodb::Client::from_conf(config)
}

/// The interceptor behind [`counting_requests`]: one count per attempt, just before it is sent.
#[derive(Debug)]
struct CountRequests(std::sync::Arc<Metrics>);

impl aws_sdk_dynamodb::config::Intercept for CountRequests {
    fn name(&self) -> &'static str {
        "CountDynamoDbRequests"
    }

    fn read_before_transmit(
        &self,
        _context: &aws_sdk_dynamodb::config::interceptors::BeforeTransmitInterceptorContextRef<'_>,
        _components: &aws_sdk_dynamodb::config::RuntimeComponents,
        config: &mut aws_sdk_dynamodb::config::ConfigBag,
    ) -> Result<(), aws_sdk_dynamodb::error::BoxError> {
        let operation =
            config.load::<aws_smithy_runtime_api::client::orchestrator::Metadata>().map_or("unknown", |m| m.name());
        self.0.dynamodb_request(operation);
        Ok(())
    }
}
