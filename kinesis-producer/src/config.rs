//! Producer settings, with the KPL's defaults.

use std::time::Duration;

use kinesis_aggregation::limits;

use crate::error::BuildError;

/// What a buffered record costs beyond its partition key and data, counted against
/// [`ProducerConfig::max_buffered_bytes`]: its place in the pipeline, its receipt channel, its
/// slot in an aggregate, the allocator's rounding. Measured with the `produce` example: peak RSS
/// grows by about 870 bytes per buffered 116-byte record (20,000 against 200,000 records
/// buffered); 1 KiB keeps the whole process under the cap plus its fixed baseline.
pub const RECORD_OVERHEAD_BYTES: usize = 1024;

/// Producer settings. Start from [`ProducerConfig::default`] (the KPL's defaults) and change
/// fields with `..Default::default()`; [`crate::ProducerBuilder::build`] validates them.
#[derive(Clone, Debug, PartialEq, Eq)]
// Not `#[non_exhaustive]`: that would forbid `Config { x, ..Default::default() }` outside this
// crate, which is how it is meant to be written. New fields always get a default.
pub struct ProducerConfig {
    /// Aggregate user records per predicted shard (KPL `AggregationEnabled`). Default: on.
    pub aggregation: bool,
    /// The largest aggregate, magic + protobuf + MD5 (KPL `AggregationMaxSize`). Default 51,200.
    pub aggregation_max_bytes: usize,
    /// The most entries in one PutRecords call (KPL `CollectionMaxCount`). Default and maximum 500.
    pub collection_max_count: usize,
    /// The most bytes (data + partition keys) in one PutRecords call (KPL `CollectionMaxSize`).
    /// Default 5 MiB; up to 10 MiB for streams whose limit was raised.
    pub collection_max_bytes: usize,
    /// The stream's record limit: partition key + data of one Kinesis record. Default 1 MiB.
    pub max_record_bytes: usize,
    /// How long a record may wait to be batched (KPL `RecordMaxBufferedTime`). Default 100 ms.
    pub record_max_buffered_time: Duration,
    /// How long a record may take to be delivered, retries included (KPL `RecordTtl`). Default 30 s.
    pub record_ttl: Duration,
    /// Per-shard rate limit as a percentage of the shard's write limit (KPL `RateLimit`). Default
    /// 150. It is the ceiling: a throttled shard cuts its own rate below it and grows it back.
    pub rate_limit_percent: u32,
    /// A shard's write limit in records per second. Default 1,000.
    pub shard_records_per_second: u32,
    /// A shard's write limit in bytes per second. Default 1 MiB.
    pub shard_bytes_per_second: u32,
    /// PutRecords calls in flight at once (KPL `MaxConnections`). Default 24.
    pub max_in_flight_requests: usize,
    /// The most user records buffered (put, not yet resolved). `put` waits beyond it.
    pub max_buffered_records: usize,
    /// The most memory buffered records may take, as the producer counts it: each record's
    /// partition key and data plus [`RECORD_OVERHEAD_BYTES`] for what the producer keeps with it
    /// (the record's place in the pipeline, its receipt channel, its slot in an aggregate). `put`
    /// waits beyond it. Default 64 MiB.
    pub max_buffered_bytes: usize,
    /// First backoff after a failure; doubled each time, with jitter. Default 100 ms.
    pub backoff_initial: Duration,
    /// The longest backoff. Default 5 s.
    pub backoff_max: Duration,
    /// Keep the put order of records with the same partition key, across retries. Default off.
    ///
    /// Each shard then has at most one PutRecords call in flight, carrying one Kinesis record of
    /// that shard, and a failed record blocks its shard until it succeeds (or expires). The cost:
    /// a shard carries one aggregate (up to `aggregation_max_bytes`) per round trip instead of
    /// filling its rate limit, so throughput per shard is about `aggregation_max_bytes / RTT`.
    pub ordering: bool,
    /// Compress every Kinesis record's data (aggregate or plain) with zlib, in the format of
    /// `kinesis_aggregation::compression`. Default off: **the stock KCL, Lambda and Firehose cannot
    /// read compressed records**; only readers built on this library can. A record whose compressed
    /// form is not smaller is sent as it is.
    pub compression: bool,
    /// How often, at most, a ListShards confirms the shards that aggregates were stored on.
    /// Default 50 ms.
    ///
    /// An aggregate is readable only on a shard whose hash-key range holds all its records, and
    /// PutRecords answers with a shard id only; a stream deleted and created again under the same
    /// name reuses the ids over other ranges. So the receipts of an aggregate whose records do
    /// not share one hash key resolve once a listing made after it was stored shows its shard
    /// with a range that holds them all; otherwise its records are sent again. One listing
    /// confirms every aggregate stored before it started; at most one is in flight. This adds
    /// up to this interval plus a ListShards round trip to such receipts (not to throughput),
    /// and makes at most 1 / interval ListShards calls a second (the service allows 1,000 a
    /// second per stream). In ordering mode the listing does not wait for the interval.
    pub shard_map_confirm_interval: Duration,
}

impl Default for ProducerConfig {
    fn default() -> Self {
        ProducerConfig {
            aggregation: true,
            aggregation_max_bytes: limits::DEFAULT_MAX_AGGREGATE_BYTES,
            collection_max_count: 500,
            collection_max_bytes: 5 * 1024 * 1024,
            max_record_bytes: limits::MAX_RECORD_BYTES,
            record_max_buffered_time: Duration::from_millis(100),
            record_ttl: Duration::from_secs(30),
            rate_limit_percent: 150,
            shard_records_per_second: 1_000,
            shard_bytes_per_second: 1024 * 1024,
            max_in_flight_requests: 24,
            max_buffered_records: 100_000,
            max_buffered_bytes: 64 * 1024 * 1024,
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            ordering: false,
            compression: false,
            shard_map_confirm_interval: Duration::from_millis(50),
        }
    }
}

impl ProducerConfig {
    /// Checks every value against the service limits and against each other.
    ///
    /// # Errors
    /// [`BuildError::InvalidConfig`] naming the first value out of range.
    pub fn validate(&self) -> Result<(), BuildError> {
        let bad = |what: String| Err(BuildError::InvalidConfig(what));
        if !(1..=500).contains(&self.collection_max_count) {
            return bad(format!("collection_max_count {} must be 1 to 500", self.collection_max_count));
        }
        if !(1..=limits::MAX_CONFIGURABLE_RECORD_BYTES).contains(&self.max_record_bytes) {
            return bad(format!("max_record_bytes {} must be 1 to 10 MiB", self.max_record_bytes));
        }
        if self.collection_max_bytes < self.max_record_bytes
            || self.collection_max_bytes > limits::MAX_CONFIGURABLE_RECORD_BYTES
        {
            return bad(format!(
                "collection_max_bytes {} must be at least max_record_bytes ({}) and at most 10 MiB",
                self.collection_max_bytes, self.max_record_bytes
            ));
        }
        // The aggregate's data plus its one-byte partition key must be a valid record.
        let agg_limit = self.max_record_bytes - limits::AGGREGATE_PARTITION_KEY.len();
        if self.aggregation && !(limits::FRAMING_LEN + 8..=agg_limit).contains(&self.aggregation_max_bytes) {
            return bad(format!(
                "aggregation_max_bytes {} must be {} to {agg_limit} (the record limit less the partition key)",
                self.aggregation_max_bytes,
                limits::FRAMING_LEN + 8
            ));
        }
        if self.rate_limit_percent == 0 || self.shard_records_per_second == 0 || self.shard_bytes_per_second == 0 {
            return bad("rate limits must be positive".into());
        }
        if self.max_in_flight_requests == 0 {
            return bad("max_in_flight_requests must be positive".into());
        }
        if self.max_buffered_records == 0 || self.max_buffered_bytes < self.max_record_bytes + RECORD_OVERHEAD_BYTES {
            return bad(format!(
                "the buffer must hold at least one record of max_record_bytes ({}) and its {RECORD_OVERHEAD_BYTES} bytes \
                 of overhead; max_buffered_bytes is {}",
                self.max_record_bytes, self.max_buffered_bytes
            ));
        }
        if self.max_buffered_bytes > u32::MAX as usize {
            return bad("max_buffered_bytes must be under 4 GiB".into());
        }
        if self.record_ttl.is_zero() || self.backoff_initial.is_zero() || self.backoff_max < self.backoff_initial {
            return bad("record_ttl and backoff_initial must be positive, backoff_max >= backoff_initial".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_kpl_defaults_and_valid() {
        let c = ProducerConfig::default();
        assert!(c.validate().is_ok());
        assert_eq!(c.aggregation_max_bytes, 51_200);
        assert_eq!(c.collection_max_count, 500);
        assert_eq!(c.record_max_buffered_time, Duration::from_millis(100));
        assert_eq!(c.record_ttl, Duration::from_secs(30));
        assert_eq!(c.rate_limit_percent, 150);
    }

    #[test]
    fn out_of_range_values_are_refused() {
        let cases = [
            ProducerConfig { collection_max_count: 501, ..Default::default() },
            ProducerConfig { collection_max_count: 0, ..Default::default() },
            ProducerConfig { aggregation_max_bytes: 1024 * 1024, ..Default::default() },
            ProducerConfig { collection_max_bytes: 1000, ..Default::default() },
            ProducerConfig { max_buffered_bytes: 10, ..Default::default() },
            ProducerConfig { rate_limit_percent: 0, ..Default::default() },
            ProducerConfig { record_ttl: Duration::ZERO, ..Default::default() },
        ];
        for c in cases {
            assert!(c.validate().is_err(), "{c:?}");
        }
        // A raised stream limit allows 10 MiB calls and 1 MiB aggregates.
        let raised = ProducerConfig {
            max_record_bytes: 10 * 1024 * 1024,
            collection_max_bytes: 10 * 1024 * 1024,
            aggregation_max_bytes: 1024 * 1024,
            ..Default::default()
        };
        assert!(raised.validate().is_ok());
    }
}
