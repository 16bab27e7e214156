//! Publishing [`MetricsSnapshot`]s to the [`metrics`] crate's facade (feature `metrics`): under the
//! KPL's names, and under the CloudWatch stream metrics this producer's own counts can stand for.
//!
//! The library never installs a recorder: without one, publishing does nothing. Install an exporter
//! (Prometheus, StatsD, ...) in the application, then call [`MetricsSnapshot::publish`] with the
//! labels you want, or let [`Producer::spawn_metrics_publisher`] do it every few seconds.
//!
//! | name                                 | kind    | from the snapshot                      |
//! |--------------------------------------|---------|----------------------------------------|
//! | `UserRecordsReceived`                | counter | `user_records_received`                |
//! | `UserRecordsPending`                 | gauge   | `user_records_pending`                 |
//! | `UserRecordsPut`                     | counter | `user_records_put`                     |
//! | `UserRecordsDataPut`                 | counter | `user_records_data_put` (bytes)        |
//! | `KinesisRecordsPut`                  | counter | `kinesis_records_put`                  |
//! | `KinesisRecordsDataPut`              | counter | `kinesis_records_data_put` (bytes)     |
//! | `ErrorsByCode` (label `error_code`)  | counter | `errors_by_code[code]`                 |
//! | `AllErrors`                          | counter | `all_errors`                           |
//! | `RetriesPerRecord`                   | counter | `retries` (a sum over records)         |
//! | `UserRecordExpired`                  | counter | `user_record_expired`                  |
//! | `UserRecordsFailed`                  | counter | `user_records_failed` (not a KPL name) |
//! | `PutRecordsRequests`                 | counter | `put_records_requests` (not a KPL name)|
//! | `RequestTimeMicrosTotal`             | counter | `request_time_micros_total`            |
//! | `BufferingTimeMicrosTotal`           | counter | `buffering_time_micros_total`          |
//! | `UserRecordsPerKinesisRecord`        | gauge   | its method, averaged since the start   |
//! | `KinesisRecordsPerPutRecordsRequest` | gauge   | its method, averaged since the start   |
//! | `IncomingRecords`                    | counter | `kinesis_records_put`                  |
//! | `IncomingBytes`                      | counter | `kinesis_records_data_put`             |
//! | `PutRecords.Success`                 | counter | `put_records_succeeded`                |
//! | `PutRecords.SuccessfulRecords`       | counter | `kinesis_records_put`                  |
//! | `PutRecords.ThrottledRecords`        | counter | `errors_by_code["ProvisionedThroughputExceededException"]` |
//!
//! The KPL publishes `RequestTime`, `BufferingTime` and `RetriesPerRecord` as distributions; here
//! they are sums, so a rate of the sum over a rate of `PutRecordsRequests` (or `UserRecordsPut`)
//! gives the mean.
//!
//! The CloudWatch names (the last five) count what **this producer** wrote, in CloudWatch's units:
//! Kinesis records (aggregates count once), and `PutRecords.Success` counts PutRecords calls that
//! stored at least one record, as CloudWatch does. The stream's own CloudWatch metrics add up every
//! writer, and its `IncomingBytes` leaves out the partition keys that `KinesisRecordsDataPut`
//! counts. `PutRecords.ThrottledRecords` counts the Kinesis records refused with
//! ProvisionedThroughputExceededException (each attempt; the records were retried).
//!
//! Counters are set with `absolute`: they are this producer's totals since it was built. Two
//! producers publishing with the same labels overwrite each other; tell them apart with a label.

use std::time::Duration;

use metrics::{Label, counter, gauge};
use tokio::time::MissedTickBehavior;

use crate::metrics::MetricsSnapshot;
use crate::producer::Producer;
use crate::streams::Streams;

/// The error code `PutRecords.ThrottledRecords` counts.
const THROTTLED: &str = "ProvisionedThroughputExceededException";

/// How a metric is read from a snapshot.
type Read<T> = fn(&MetricsSnapshot) -> T;

const COUNTERS: &[(&str, Read<u64>)] = &[
    ("UserRecordsReceived", |s| s.user_records_received),
    ("UserRecordsPut", |s| s.user_records_put),
    ("UserRecordsDataPut", |s| s.user_records_data_put),
    ("KinesisRecordsPut", |s| s.kinesis_records_put),
    ("KinesisRecordsDataPut", |s| s.kinesis_records_data_put),
    ("AllErrors", |s| s.all_errors),
    ("RetriesPerRecord", |s| s.retries),
    ("UserRecordExpired", |s| s.user_record_expired),
    ("UserRecordsFailed", |s| s.user_records_failed),
    ("PutRecordsRequests", |s| s.put_records_requests),
    ("RequestTimeMicrosTotal", |s| s.request_time_micros_total),
    ("BufferingTimeMicrosTotal", |s| s.buffering_time_micros_total),
    ("IncomingRecords", |s| s.kinesis_records_put),
    ("IncomingBytes", |s| s.kinesis_records_data_put),
    ("PutRecords.Success", |s| s.put_records_succeeded),
    ("PutRecords.SuccessfulRecords", |s| s.kinesis_records_put),
    ("PutRecords.ThrottledRecords", |s| s.errors_by_code.get(THROTTLED).copied().unwrap_or(0)),
];

const GAUGES: &[(&str, Read<f64>)] = &[
    ("UserRecordsPending", |s| s.user_records_pending as f64),
    ("UserRecordsPerKinesisRecord", MetricsSnapshot::user_records_per_kinesis_record),
    ("KinesisRecordsPerPutRecordsRequest", MetricsSnapshot::kinesis_records_per_put_records_request),
];

impl MetricsSnapshot {
    /// Publishes this snapshot to the `metrics` facade's recorder, with `labels` on every metric
    /// (and `error_code` on `ErrorsByCode`), under the names in the [`exporter`](crate::exporter)
    /// module's table. Does nothing when no recorder is installed.
    ///
    /// ```
    /// # fn example(producer: &kinesis_producer::Producer) {
    /// producer.metrics().publish(&[("stream", "orders")]);
    /// # }
    /// ```
    pub fn publish(&self, labels: &[(&str, &str)]) {
        let labels: Vec<Label> = labels.iter().map(|&(k, v)| Label::new(k.to_owned(), v.to_owned())).collect();
        for &(name, read) in COUNTERS {
            counter!(name, labels.clone()).absolute(read(self));
        }
        for &(name, read) in GAUGES {
            gauge!(name, labels.clone()).set(read(self));
        }
        for (code, &count) in &self.errors_by_code {
            let mut labels = labels.clone();
            labels.push(Label::new("error_code", code.clone()));
            counter!("ErrorsByCode", labels).absolute(count);
        }
    }
}

impl Producer {
    /// Spawns a task that publishes this producer's metrics ([`MetricsSnapshot::publish`]), one
    /// series a stream labelled `stream` with its name, at once and then every `every`, until the
    /// pipelines stop: after [`Producer::shutdown`], or once every handle is dropped and every
    /// record resolved. It publishes a last time then, so the final counts are seen. The task
    /// holds no handle, so it keeps nothing alive; abort it through the returned handle to stop
    /// it sooner. Streams first put to later are published from then on.
    ///
    /// # Panics
    /// When `every` is zero, or outside a tokio runtime.
    pub fn spawn_metrics_publisher(&self, every: Duration) -> tokio::task::JoinHandle<()> {
        let registry = self.inner.streams.registry();
        let mut stopped = self.inner.stopped.clone();
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let publish = move || {
            for (stream, snapshot) in Streams::snapshots(&registry) {
                snapshot.publish(&[("stream", &stream)]);
            }
        };
        tokio::spawn(async move {
            loop {
                publish();
                tokio::select! {
                    _ = tick.tick() => {}
                    // Nothing is ever sent: this fails once the pipeline tasks drop the senders.
                    _ = stopped.changed() => break,
                }
            }
            publish();
        })
    }
}
