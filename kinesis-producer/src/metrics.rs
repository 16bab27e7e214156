//! Counters with the KPL's metric names, read as a [`MetricsSnapshot`].

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Live counters, shared by the handle and the pipeline.
#[derive(Debug, Default)]
pub(crate) struct Metrics {
    pub(crate) user_records_received: AtomicU64,
    pub(crate) user_records_pending: AtomicU64,
    pub(crate) user_records_put: AtomicU64,
    pub(crate) user_records_data_put: AtomicU64,
    pub(crate) kinesis_records_put: AtomicU64,
    pub(crate) kinesis_records_data_put: AtomicU64,
    pub(crate) all_errors: AtomicU64,
    pub(crate) retries: AtomicU64,
    pub(crate) user_records_expired: AtomicU64,
    pub(crate) user_records_failed: AtomicU64,
    pub(crate) put_records_requests: AtomicU64,
    pub(crate) put_records_succeeded: AtomicU64,
    pub(crate) request_time_micros: AtomicU64,
    pub(crate) buffering_time_micros: AtomicU64,
    pub(crate) errors_by_code: Mutex<BTreeMap<String, u64>>,
}

impl Metrics {
    pub(crate) fn error(&self, code: &str, count: u64) {
        self.all_errors.fetch_add(count, Relaxed);
        // Held for one insert, never across an await.
        let mut map = self.errors_by_code.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        *map.entry(code.to_owned()).or_default() += count;
    }

    pub(crate) fn snapshot(&self) -> MetricsSnapshot {
        let put = self.user_records_put.load(Relaxed);
        let requests = self.put_records_requests.load(Relaxed);
        MetricsSnapshot {
            user_records_received: self.user_records_received.load(Relaxed),
            user_records_pending: self.user_records_pending.load(Relaxed),
            user_records_put: put,
            user_records_data_put: self.user_records_data_put.load(Relaxed),
            kinesis_records_put: self.kinesis_records_put.load(Relaxed),
            kinesis_records_data_put: self.kinesis_records_data_put.load(Relaxed),
            errors_by_code: self.errors_by_code.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            all_errors: self.all_errors.load(Relaxed),
            retries: self.retries.load(Relaxed),
            user_record_expired: self.user_records_expired.load(Relaxed),
            user_records_failed: self.user_records_failed.load(Relaxed),
            put_records_requests: requests,
            put_records_succeeded: self.put_records_succeeded.load(Relaxed),
            request_time_micros_total: self.request_time_micros.load(Relaxed),
            buffering_time_micros_total: self.buffering_time_micros.load(Relaxed),
        }
    }
}

/// A point-in-time copy of the producer's metrics, named after the KPL's.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct MetricsSnapshot {
    /// `UserRecordsReceived`: records accepted by `put`.
    pub user_records_received: u64,
    /// `UserRecordsPending`: records buffered, not yet resolved, as the pipeline task last counted
    /// them (it may lag a receipt by one pass of the task; after `flush` it is exact).
    pub user_records_pending: u64,
    /// `UserRecordsPut`: records delivered.
    pub user_records_put: u64,
    /// `UserRecordsDataPut`: bytes of delivered records (partition key + data).
    pub user_records_data_put: u64,
    /// `KinesisRecordsPut`: Kinesis records (aggregates or plain) stored.
    pub kinesis_records_put: u64,
    /// `KinesisRecordsDataPut`: bytes of stored Kinesis records (partition key + data).
    pub kinesis_records_data_put: u64,
    /// `ErrorsByCode`: errors by Kinesis error code (per record and per call).
    pub errors_by_code: BTreeMap<String, u64>,
    /// `AllErrors`.
    pub all_errors: u64,
    /// `RetriesPerRecord`, summed: user-record retries.
    pub retries: u64,
    /// `UserRecordExpired`: records whose time to live ran out.
    pub user_record_expired: u64,
    /// Records failed by a fatal error.
    pub user_records_failed: u64,
    /// PutRecords calls answered (any outcome).
    pub put_records_requests: u64,
    /// PutRecords calls that stored at least one record (CloudWatch's `PutRecords.Success`).
    pub put_records_succeeded: u64,
    /// `RequestTime`, summed over calls, in microseconds.
    pub request_time_micros_total: u64,
    /// `BufferingTime`, summed over delivered records, in microseconds.
    pub buffering_time_micros_total: u64,
}

impl MetricsSnapshot {
    /// `UserRecordsPerKinesisRecord`, averaged.
    pub fn user_records_per_kinesis_record(&self) -> f64 {
        self.user_records_put as f64 / self.kinesis_records_put.max(1) as f64
    }

    /// `KinesisRecordsPerPutRecordsRequest`, averaged.
    pub fn kinesis_records_per_put_records_request(&self) -> f64 {
        self.kinesis_records_put as f64 / self.put_records_requests.max(1) as f64
    }

    /// Adds another stream's counts to these (every field is a count or a total).
    pub(crate) fn add(&mut self, other: &MetricsSnapshot) {
        let MetricsSnapshot {
            user_records_received,
            user_records_pending,
            user_records_put,
            user_records_data_put,
            kinesis_records_put,
            kinesis_records_data_put,
            errors_by_code,
            all_errors,
            retries,
            user_record_expired,
            user_records_failed,
            put_records_requests,
            put_records_succeeded,
            request_time_micros_total,
            buffering_time_micros_total,
        } = other;
        self.user_records_received += user_records_received;
        self.user_records_pending += user_records_pending;
        self.user_records_put += user_records_put;
        self.user_records_data_put += user_records_data_put;
        self.kinesis_records_put += kinesis_records_put;
        self.kinesis_records_data_put += kinesis_records_data_put;
        for (code, count) in errors_by_code {
            *self.errors_by_code.entry(code.clone()).or_default() += count;
        }
        self.all_errors += all_errors;
        self.retries += retries;
        self.user_record_expired += user_record_expired;
        self.user_records_failed += user_records_failed;
        self.put_records_requests += put_records_requests;
        self.put_records_succeeded += put_records_succeeded;
        self.request_time_micros_total += request_time_micros_total;
        self.buffering_time_micros_total += buffering_time_micros_total;
    }
}
