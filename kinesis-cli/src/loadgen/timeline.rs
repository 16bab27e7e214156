//! What a load run did second by second, for `--report`: records sent, acknowledged and received
//! per second, throttles and other errors per second, put -> acknowledged latency percentiles per
//! second, and each shard's use of its write limit per second.
//!
//! Two sources feed it:
//! - [`Timeline::sample`], once a second, with the run's running totals (the progress display
//!   reads them anyway); rates are the differences between samples, divided by the time between
//!   them;
//! - [`Timeline::acknowledged`], from the task that awaits receipts, once per acknowledged record:
//!   its latency goes into the histogram of the second it was acknowledged in, and its shard's
//!   counts for that second grow. Only one histogram is open at a time (receipts resolve in about
//!   the order of time); a closed second keeps its percentiles only.

use std::collections::BTreeMap;
use std::time::Duration;

use super::latency::{Latencies, LatencySummary};

/// Kinesis's write limit per shard: 1,000 records per second
/// (<https://docs.aws.amazon.com/streams/latest/dev/service-sizes-and-limits.html>).
pub const SHARD_RECORDS_PER_SEC: f64 = 1_000.0;
/// Kinesis's write limit per shard: 1 MiB per second (partition key + data).
pub const SHARD_BYTES_PER_SEC: f64 = 1_048_576.0;

/// The running totals of a run at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Totals {
    /// Records `put` accepted.
    pub sent: u64,
    /// Records acknowledged.
    pub acknowledged: u64,
    /// Records the `--verify` group received (first deliveries).
    pub received: u64,
    /// Records Kinesis refused for the shard's throughput (ProvisionedThroughputExceeded), and
    /// calls it refused with ThrottlingException or LimitExceededException.
    pub throttles: u64,
    /// Every other error the producer counted.
    pub other_errors: u64,
}

/// Per second, from one sample to the next.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rates {
    /// Seconds since the start, at the end of the interval.
    pub at: f64,
    /// Per second over the interval.
    pub sent: f64,
    /// See `sent`.
    pub acknowledged: f64,
    /// See `sent`.
    pub received: f64,
    /// See `sent`.
    pub throttles: f64,
    /// See `sent`.
    pub other_errors: f64,
}

/// One shard's acknowledged writes in one second.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShardSecond {
    /// Kinesis records (an aggregate counts once).
    pub kinesis_records: u64,
    /// User-record bytes (partition key + data, before any compression).
    pub user_bytes: u64,
}

impl ShardSecond {
    /// The larger of the two shares of the shard's write limits, as a fraction (1.0 = at the
    /// limit). User bytes stand for Kinesis bytes: an aggregate adds a few bytes per record,
    /// compression takes some away.
    pub fn utilisation(&self) -> f64 {
        (self.kinesis_records as f64 / SHARD_RECORDS_PER_SEC).max(self.user_bytes as f64 / SHARD_BYTES_PER_SEC)
    }
}

/// The second-by-second record of a run.
#[derive(Clone, Debug, Default)]
pub struct Timeline {
    samples: Vec<(f64, Totals)>,
    /// Per second index: the put -> acknowledged latencies of that second, once closed.
    latency: BTreeMap<u64, LatencySummary>,
    open: Option<(u64, Latencies)>,
    shards: BTreeMap<String, BTreeMap<u64, ShardSecond>>,
}

impl Timeline {
    /// Adds the running totals at `at` since the start. Samples come in time order.
    pub fn sample(&mut self, at: Duration, totals: Totals) {
        self.samples.push((at.as_secs_f64(), totals));
    }

    /// Counts one acknowledged record: acknowledged `at` since the start, `latency` after its put,
    /// stored in `shard` as a Kinesis record of its own or as sub-record `aggregated_index` of
    /// one, with `user_bytes` of partition key and data.
    pub fn acknowledged(
        &mut self,
        at: Duration,
        latency: Duration,
        shard: &str,
        aggregated_index: Option<u64>,
        user_bytes: u64,
    ) {
        let second = at.as_secs();
        match &mut self.open {
            // A late receipt of a closed second counts in the open one.
            Some((open, latencies)) if *open >= second => latencies.record(latency),
            _ => {
                self.close();
                let mut latencies = Latencies::default();
                latencies.record(latency);
                self.open = Some((second, latencies));
            }
        }
        let per_second = match self.shards.get_mut(shard) {
            Some(per_second) => per_second,
            None => self.shards.entry(shard.to_owned()).or_default(),
        };
        let counts = per_second.entry(second).or_default();
        // Every aggregate has a sub-record 0; a plain record has no index.
        counts.kinesis_records += u64::from(aggregated_index.is_none_or(|index| index == 0));
        counts.user_bytes += user_bytes;
    }

    fn close(&mut self) {
        if let Some((second, latencies)) = self.open.take()
            && let Some(summary) = latencies.summary()
        {
            self.latency.insert(second, summary);
        }
    }

    /// Closes the open second: call once no more receipts come.
    pub fn finish(&mut self) {
        self.close();
    }

    /// Rates between consecutive samples (none for fewer than two samples).
    pub fn rates(&self) -> Vec<Rates> {
        self.samples
            .windows(2)
            .filter_map(|pair| {
                let [(t0, a), (t1, b)] = pair else { return None };
                let dt = t1 - t0;
                let rate = |x: u64, y: u64| y.saturating_sub(x) as f64 / dt;
                (dt > 0.0).then(|| Rates {
                    at: *t1,
                    sent: rate(a.sent, b.sent),
                    acknowledged: rate(a.acknowledged, b.acknowledged),
                    received: rate(a.received, b.received),
                    throttles: rate(a.throttles, b.throttles),
                    other_errors: rate(a.other_errors, b.other_errors),
                })
            })
            .collect()
    }

    /// Put -> acknowledged latency per second acknowledged in: (second since the start, figures).
    pub fn latencies(&self) -> impl Iterator<Item = (u64, &LatencySummary)> {
        self.latency.iter().map(|(second, summary)| (*second, summary))
    }

    /// Per shard, in shard-id order: per second since the start, what it took.
    pub fn shards(&self) -> impl Iterator<Item = (&str, &BTreeMap<u64, ShardSecond>)> {
        self.shards.iter().map(|(shard, seconds)| (shard.as_str(), seconds))
    }

    /// The last second with anything in it.
    pub fn last_second(&self) -> u64 {
        let sampled = self.samples.last().map_or(0, |(at, _)| at.ceil() as u64);
        let acknowledged = self.latency.keys().next_back().copied().unwrap_or(0);
        sampled.max(acknowledged)
    }
}

/// Splits the producer's errors by code into throttles and the rest.
pub fn throttles_and_others(errors_by_code: &BTreeMap<String, u64>) -> (u64, u64) {
    errors_by_code.iter().fold((0, 0), |(throttles, others), (code, count)| {
        let throttle = matches!(
            code.as_str(),
            "ProvisionedThroughputExceededException" | "ThrottlingException" | "LimitExceededException"
        );
        if throttle { (throttles + count, others) } else { (throttles, others + count) }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    #[test]
    fn rates_are_differences_between_samples_over_their_interval() {
        let mut timeline = Timeline::default();
        timeline.sample(ms(1_000), Totals { sent: 100, acknowledged: 50, ..Totals::default() });
        timeline.sample(
            ms(2_000),
            Totals { sent: 1_100, acknowledged: 850, received: 400, throttles: 3, ..Totals::default() },
        );
        timeline.sample(
            ms(2_500),
            Totals { sent: 1_600, acknowledged: 1_600, received: 1_600, throttles: 3, other_errors: 1 },
        );
        let rates = timeline.rates();
        assert_eq!(rates.len(), 2);
        assert_eq!(
            (rates[0].at, rates[0].sent, rates[0].acknowledged, rates[0].received),
            (2.0, 1_000.0, 800.0, 400.0)
        );
        assert_eq!(rates[0].throttles, 3.0);
        assert_eq!((rates[1].sent, rates[1].acknowledged, rates[1].received), (1_000.0, 1_500.0, 2_400.0));
        assert_eq!((rates[1].throttles, rates[1].other_errors), (0.0, 2.0));
        assert_eq!(timeline.last_second(), 3);
    }

    #[test]
    fn each_second_gets_its_own_percentiles_and_a_late_receipt_counts_in_the_open_one() {
        let mut timeline = Timeline::default();
        for i in 0..100 {
            timeline.acknowledged(ms(200 + i), ms(10 + i), "shardId-0", None, 100);
        }
        for i in 0..10 {
            timeline.acknowledged(ms(1_100 + i), ms(500), "shardId-1", Some(i), 1_000);
        }
        // Acknowledged in second 0, seen after second 1 opened.
        timeline.acknowledged(ms(900), ms(5_000), "shardId-1", Some(10), 1_000);
        timeline.acknowledged(ms(3_000), ms(1), "shardId-0", None, 10);
        timeline.finish();
        let seconds: Vec<_> = timeline.latencies().map(|(s, l)| (s, l.count, l.p50, l.max)).collect();
        assert_eq!(seconds.len(), 3, "{seconds:?}");
        assert_eq!((seconds[0].0, seconds[0].1), (0, 100));
        assert!((seconds[0].2 - 59.0).abs() < 0.5 && (seconds[0].3 - 109.0).abs() < 0.5, "{seconds:?}");
        assert_eq!((seconds[1].0, seconds[1].1), (1, 11));
        assert!((seconds[1].3 - 5_000.0).abs() < 5.0, "{seconds:?}");
        assert_eq!((seconds[2].0, seconds[2].1), (3, 1));

        let shards: BTreeMap<_, _> = timeline.shards().map(|(id, s)| (id.to_owned(), s.clone())).collect();
        assert_eq!(shards["shardId-0"][&0], ShardSecond { kinesis_records: 100, user_bytes: 10_000 });
        // One aggregate (index 0) of 11 sub-records; the late one is counted in its own second.
        assert_eq!(shards["shardId-1"][&1], ShardSecond { kinesis_records: 1, user_bytes: 10_000 });
        assert_eq!(shards["shardId-1"][&0], ShardSecond { kinesis_records: 0, user_bytes: 1_000 });
        assert_eq!(shards["shardId-0"][&3].utilisation(), 0.001);
        let full = ShardSecond { kinesis_records: 500, user_bytes: 1_048_576 };
        assert_eq!(full.utilisation(), 1.0);
    }

    #[test]
    fn throttles_are_told_from_other_errors_by_code() {
        let codes: BTreeMap<String, u64> = [
            ("ProvisionedThroughputExceededException", 7),
            ("ThrottlingException", 1),
            ("InternalFailure", 2),
            ("ServiceUnavailable", 3),
        ]
        .into_iter()
        .map(|(code, n)| (code.to_owned(), n))
        .collect();
        assert_eq!(throttles_and_others(&codes), (8, 5));
    }
}
