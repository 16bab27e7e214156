//! The WorkerMetricStats row (KCL 3.x): how loaded this worker is, for a leader to balance by.
//!
//! A KCL 3.x leader assigns leases only to workers whose row it finds fresh (`lut` at most 60 s
//! old), so every worker of a 3.x fleet writes its row every `SchedulerConfig::worker_metrics_interval` (KCL: 30 s; the first 2 s after start),
//! as the KCL's `WorkerMetricStatsReporter` does:
//!
//! | attribute | type | value |
//! |---|---|---|
//! | `leaseKey` | S | the worker id (the KCL 3.0-3.4 table `<app>-WorkerMetricStats`: `wid`) |
//! | `entityType` | S | `WORKER_METRIC_STATS` (3.5 single table only) |
//! | `lut` | N | epoch seconds of this write |
//! | `sts` | M of L of N | `C` → the last (up to) 10 CPU figures, each the mean of the 1 s samples of a period, percent |
//! | `opr` | M of L of N | `C` → `[100]`, the operating range |
//! | `sup`, `slu` | N, N | support code 1 and epoch seconds (3.5) |
//!
//! Without a CPU figure (`CpuSource::Off`, or a source that cannot be read) `sts` and `opr`
//! are empty maps, which a KCL leader reads as "balance this worker by its leases' throughput".
//! Unlike the KCL (#1452: a stopped worker looks alive until its row is 60 s old), a worker that
//! shuts down gracefully deletes its row, so no lease is assigned to it afterwards.

pub(crate) mod cpu;

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, SystemTime};

use aws_sdk_dynamodb::types::AttributeValue;

use crate::error::{LeaseTableError, dynamodb_error as classify};
use cpu::CpuSource;

/// The first write, after start (the KCL: two sample intervals).
pub(crate) const FIRST_REPORT: Duration = Duration::from_secs(2);
/// How many figures per metric a row keeps (KCL `noOfPersistedMetricsPerWorkerMetrics`).
const KEPT: usize = 10;
/// `entityType` of the row in the 3.5 single-table layout.
pub(crate) const WORKER_METRICS_ENTITY: &str = "WORKER_METRIC_STATS";

/// Where a worker's row lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum RowPlace {
    /// The lease table, key `leaseKey` (KCL 3.5 single-table layout).
    LeaseTable(String),
    /// The table `<app>-WorkerMetricStats`, key `wid` (KCL 3.0 to 3.4).
    Legacy(String),
}

/// Collects CPU samples and makes the rows.
#[derive(Debug)]
pub(crate) struct WorkerMetrics {
    sampler: cpu::CpuSampler,
    /// Samples since the last row.
    samples: Vec<f64>,
    /// The figures of the last rows, oldest first.
    figures: VecDeque<f64>,
    cpu: bool,
}

impl WorkerMetrics {
    pub(crate) fn new(source: CpuSource) -> Self {
        WorkerMetrics {
            sampler: cpu::CpuSampler::new(source),
            samples: Vec::new(),
            figures: VecDeque::new(),
            cpu: source != CpuSource::Off,
        }
    }

    /// Takes a CPU sample (every second).
    pub(crate) fn sample(&mut self, now: tokio::time::Instant) {
        if let Some(percent) = self.sampler.sample(now) {
            self.samples.push(percent);
        }
    }

    /// The `sts` and `opr` of the next row: the mean of the samples since the last row joins the
    /// kept figures. Without any figure yet (or without a CPU source), both are empty.
    pub(crate) fn next_figures(&mut self) -> (HashMap<String, AttributeValue>, HashMap<String, AttributeValue>) {
        if self.cpu && !self.samples.is_empty() {
            let mean = self.samples.iter().sum::<f64>() / self.samples.len() as f64;
            self.samples.clear();
            if self.figures.len() == KEPT {
                self.figures.pop_front();
            }
            self.figures.push_back((mean * 1e6).round() / 1e6);
        }
        if self.figures.is_empty() {
            return (HashMap::new(), HashMap::new());
        }
        let list =
            |values: Vec<f64>| AttributeValue::L(values.into_iter().map(|v| AttributeValue::N(number(v))).collect());
        let sts = HashMap::from([("C".to_owned(), list(self.figures.iter().copied().collect()))]);
        let opr = HashMap::from([("C".to_owned(), list(vec![100.0]))]);
        (sts, opr)
    }
}

fn number(value: f64) -> String {
    crate::leases::lease::format_kbps(value)
}

/// `now` in whole seconds since the Unix epoch (the unit of a WorkerMetricStats row's `lut`).
pub(crate) fn epoch_seconds(now: SystemTime) -> u64 {
    now.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs()
}

/// Writes the row of `worker_id` (an UpdateItem that sets every attribute, as the KCL's does).
///
/// # Errors
/// When UpdateItem fails.
pub(crate) async fn publish(
    client: &aws_sdk_dynamodb::Client,
    place: &RowPlace,
    worker_id: &str,
    figures: (HashMap<String, AttributeValue>, HashMap<String, AttributeValue>),
    now: SystemTime,
) -> Result<(), LeaseTableError> {
    let seconds = AttributeValue::N(epoch_seconds(now).to_string());
    let (table, key) = match place {
        RowPlace::LeaseTable(table) => (table, crate::leases::lease::LEASE_KEY),
        RowPlace::Legacy(table) => (table, "wid"),
    };
    let mut update = client
        .update_item()
        .table_name(table)
        .key(key, AttributeValue::S(worker_id.to_owned()))
        .expression_attribute_names("#lut", "lut")
        .expression_attribute_names("#sts", "sts")
        .expression_attribute_names("#opr", "opr")
        .expression_attribute_values(":lut", seconds.clone())
        .expression_attribute_values(":sts", AttributeValue::M(figures.0))
        .expression_attribute_values(":opr", AttributeValue::M(figures.1));
    update = match place {
        RowPlace::LeaseTable(_) => update
            .update_expression("SET #lut = :lut, #sts = :sts, #opr = :opr, #sup = :sup, #slu = :lut, #et = :et")
            .expression_attribute_names("#sup", "sup")
            .expression_attribute_names("#slu", "slu")
            .expression_attribute_names("#et", crate::leases::lease::ENTITY_TYPE)
            .expression_attribute_values(":sup", AttributeValue::N("1".into()))
            .expression_attribute_values(":et", AttributeValue::S(WORKER_METRICS_ENTITY.into())),
        RowPlace::Legacy(_) => update.update_expression("SET #lut = :lut, #sts = :sts, #opr = :opr"),
    };
    update.send().await.map_err(|e| classify("UpdateItem", e))?;
    Ok(())
}

/// Deletes the row of `worker_id` (graceful shutdown), if it is a worker-metrics row.
///
/// # Errors
/// When DeleteItem fails for another reason than its condition.
pub(crate) async fn delete(
    client: &aws_sdk_dynamodb::Client,
    place: &RowPlace,
    worker_id: &str,
) -> Result<(), LeaseTableError> {
    let request = match place {
        RowPlace::LeaseTable(table) => client
            .delete_item()
            .table_name(table)
            .key(crate::leases::lease::LEASE_KEY, AttributeValue::S(worker_id.to_owned()))
            .condition_expression("#et = :et")
            .expression_attribute_names("#et", crate::leases::lease::ENTITY_TYPE)
            .expression_attribute_values(":et", AttributeValue::S(WORKER_METRICS_ENTITY.into())),
        RowPlace::Legacy(table) => {
            client.delete_item().table_name(table).key("wid", AttributeValue::S(worker_id.to_owned()))
        }
    };
    match request.send().await {
        Ok(_) => Ok(()),
        Err(e) if e.as_service_error().is_some_and(|s| s.is_conditional_check_failed_exception()) => Ok(()),
        Err(e) => Err(classify("DeleteItem", e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_keeps_the_last_ten_period_means() {
        let mut metrics = WorkerMetrics::new(CpuSource::Process);
        assert!(metrics.next_figures().0.is_empty(), "nothing sampled: balance by throughput");
        for period in 0..12 {
            metrics.samples = vec![period as f64, period as f64 + 2.0];
            let (sts, opr) = metrics.next_figures();
            let values = sts["C"].as_l().unwrap();
            assert_eq!(values.len(), (period + 1).min(10));
            assert_eq!(values.last().unwrap().as_n().unwrap(), &(period + 1).to_string(), "the period's mean");
            assert_eq!(opr["C"].as_l().unwrap()[0].as_n().unwrap(), "100");
        }
        // A period without samples repeats the figures, never -1 (which would exclude the worker).
        let (sts, _) = metrics.next_figures();
        assert!(sts["C"].as_l().unwrap().iter().all(|v| v.as_n().unwrap() != "-1"));
        let mut off = WorkerMetrics::new(CpuSource::Off);
        off.samples = vec![50.0];
        assert!(off.next_figures().0.is_empty());
    }
}
