//! The records a processor gets: user records, deaggregated from the Kinesis records of one shard,
//! with their sequence and sub-sequence numbers; and the [`Unpacker`] that makes them.

use std::cmp::Ordering;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use kinesis_aggregation::{Deaggregator, HashKeyRange, Outcome};

/// Compares two Kinesis sequence numbers (decimal strings of up to 129 digits): by length, then
/// digit by digit.
pub fn cmp_sequence_numbers(a: &str, b: &str) -> Ordering {
    let (a, b) = (a.trim_start_matches('0'), b.trim_start_matches('0'));
    a.len().cmp(&b.len()).then_with(|| a.cmp(b))
}

/// Compares (sequence number, sub-sequence number) pairs.
pub(crate) fn cmp_positions(a: (&str, u64), b: (&str, u64)) -> Ordering {
    cmp_sequence_numbers(a.0, b.0).then(a.1.cmp(&b.1))
}

/// One user record.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Record {
    /// The Kinesis record's sequence number (shared by every sub-record of an aggregate).
    pub sequence_number: Arc<str>,
    /// The position inside the aggregate, from 0; 0 for a record that was not aggregated.
    pub sub_sequence_number: u64,
    /// Whether the record came out of an aggregate.
    pub aggregated: bool,
    /// The partition key (the sub-record's own, for an aggregated record).
    pub partition_key: String,
    /// The explicit hash key of a sub-record, when it has one.
    pub explicit_hash_key: Option<String>,
    /// The data (inflated, when the producer compressed it).
    pub data: Bytes,
    /// When Kinesis received the Kinesis record.
    pub approximate_arrival: Option<SystemTime>,
    /// The stream's name (empty in a record made by [`Record::new`]).
    pub stream: Arc<str>,
}

/// Records of one shard, handed to a processor together.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Batch {
    /// The stream's name.
    pub stream: Arc<str>,
    /// In a multi-stream application, the stream's identifier `account:stream:creationEpoch`
    /// (two accounts may have streams of one name); `None` otherwise.
    pub stream_identifier: Option<Arc<str>>,
    /// The shard.
    pub shard_id: Arc<str>,
    /// The records, in the shard's order.
    pub records: Vec<Record>,
    /// How far behind the newest record of the shard the read was, as the last GetRecords said.
    pub millis_behind_latest: Option<i64>,
}

impl Record {
    /// A record at (`sequence_number`, `sub_sequence_number`), not aggregated and with no arrival
    /// time: for processors' unit tests. Set the public fields for more.
    pub fn new(
        sequence_number: impl Into<Arc<str>>,
        sub_sequence_number: u64,
        partition_key: impl Into<String>,
        data: impl Into<Bytes>,
    ) -> Self {
        Self {
            sequence_number: sequence_number.into(),
            sub_sequence_number,
            aggregated: false,
            partition_key: partition_key.into(),
            explicit_hash_key: None,
            data: data.into(),
            approximate_arrival: None,
            stream: "".into(),
        }
    }
}

impl Batch {
    /// A batch of `records` of `shard_id`: for processors' unit tests.
    pub fn new(shard_id: impl Into<Arc<str>>, records: Vec<Record>) -> Self {
        Self {
            stream: records.first().map_or_else(|| "".into(), |r| r.stream.clone()),
            stream_identifier: None,
            shard_id: shard_id.into(),
            records,
            millis_behind_latest: None,
        }
    }

    /// The data bytes of the records.
    pub fn data_bytes(&self) -> usize {
        self.records.iter().map(|r| r.data.len()).sum()
    }
}

/// What unpacking a page of Kinesis records left out, to be counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Unpacked {
    /// Sub-records outside the shard's hash range (an aggregate put into the wrong shard).
    pub out_of_range: usize,
    /// User records at or before the checkpoint the shard resumed from.
    pub before_checkpoint: usize,
    /// Kinesis records that looked like aggregates but were not valid (handed over whole).
    pub corrupt: usize,
}

/// Turns a shard's Kinesis records into user records: deaggregates (filtered to the shard's hash
/// range), inflates, and drops what is at or before the checkpoint the shard resumed from.
#[derive(Debug)]
pub(crate) struct Unpacker {
    shard_id: Arc<str>,
    /// The stream's name, given to every record.
    stream: Arc<str>,
    deaggregator: Deaggregator,
    /// Resuming: (sequence, sub-sequence) pairs at or before this were processed already.
    resume_after: Option<(String, u64)>,
    /// With `resume_after`: keep the position itself (reading again *from* a record).
    keep_resume_position: bool,
}

impl Unpacker {
    pub(crate) fn new(shard_id: Arc<str>, range: Option<HashKeyRange>, resume_after: Option<(String, u64)>) -> Self {
        let deaggregator = range.map_or_else(Deaggregator::new, Deaggregator::with_hash_range);
        Unpacker { shard_id, stream: "".into(), deaggregator, resume_after, keep_resume_position: false }
    }

    /// The same, naming `stream` in every record.
    pub(crate) fn in_stream(self, stream: Arc<str>) -> Self {
        Unpacker { stream, ..self }
    }

    /// An unpacker that leaves out what is before (sequence, sub-sequence) and keeps the rest:
    /// reading a shard again from one record.
    pub(crate) fn starting_at(shard_id: Arc<str>, range: Option<HashKeyRange>, from: (String, u64)) -> Self {
        Unpacker { keep_resume_position: true, ..Unpacker::new(shard_id, range, Some(from)) }
    }

    /// Leaves out, from now on, every record at or before `sequence` (all its sub-records), unless
    /// the resume filter already reaches further: reading a shard from an earlier point again
    /// (TRIM_HORIZON, after a position Kinesis refused) without handing anything over twice.
    pub(crate) fn skip_through(&mut self, sequence: &str) {
        let through = (sequence.to_owned(), u64::MAX);
        let further = self
            .resume_after
            .as_ref()
            .is_some_and(|(seq, sub)| cmp_positions((seq, *sub), (&through.0, through.1)).is_ge());
        if !further {
            self.resume_after = Some(through);
            self.keep_resume_position = false;
        }
    }

    pub(crate) fn unpack(&mut self, records: Vec<aws_sdk_kinesis::types::Record>, out: &mut Vec<Record>) -> Unpacked {
        let mut counts = Unpacked::default();
        for record in records {
            let sequence_number: Arc<str> = record.sequence_number.as_str().into();
            let arrival = record.approximate_arrival_timestamp.and_then(|t| SystemTime::try_from(t).ok());
            let data = Bytes::from(record.data.into_inner());
            let unpacked = self.deaggregator.deaggregate(&record.partition_key, data);
            match unpacked.outcome {
                Outcome::Aggregated { dropped } => counts.out_of_range += dropped,
                Outcome::Corrupt(corruption) => {
                    counts.corrupt += 1;
                    tracing::warn!(shard_id = %self.shard_id, sequence_number = %sequence_number, ?corruption,
                        "a record with the aggregate magic is not a valid aggregate; handed over whole");
                }
                _ => {}
            }
            for user in unpacked.records {
                let sub = user.sub_sequence_number().unwrap_or(0);
                if let Some((seq, sub_cp)) = &self.resume_after {
                    match cmp_positions((&sequence_number, sub), (seq, *sub_cp)) {
                        Ordering::Equal if self.keep_resume_position => self.resume_after = None,
                        Ordering::Less | Ordering::Equal => {
                            counts.before_checkpoint += 1;
                            continue;
                        }
                        Ordering::Greater => self.resume_after = None,
                    }
                }
                out.push(Record {
                    sequence_number: sequence_number.clone(),
                    sub_sequence_number: sub,
                    aggregated: user.is_aggregated(),
                    partition_key: user.partition_key().to_owned(),
                    explicit_hash_key: user.explicit_hash_key().map(str::to_owned),
                    approximate_arrival: arrival,
                    data: user.into_data(),
                    stream: self.stream.clone(),
                });
            }
        }
        if counts.out_of_range > 0 {
            tracing::debug!(shard_id = %self.shard_id, sub_records = counts.out_of_range,
                "sub-records outside the shard's hash range left out (their producer re-sends them to the right shard)");
        }
        counts
    }
}

#[cfg(test)]
mod tests {
    use aws_sdk_kinesis::primitives::Blob;
    use kinesis_aggregation::{Aggregator, UserRecord};

    use super::*;

    #[test]
    fn sequence_numbers_compare_as_numbers() {
        assert_eq!(cmp_sequence_numbers("9", "10"), Ordering::Less);
        assert_eq!(
            cmp_sequence_numbers(
                "49590338271490256608559692538361571095921575989136588898",
                "49590338271490256608559692538361571095921575989136588899"
            ),
            Ordering::Less
        );
        assert_eq!(cmp_sequence_numbers("100", "100"), Ordering::Equal);
        assert_eq!(cmp_sequence_numbers("200", "199"), Ordering::Greater);
        assert_eq!(cmp_positions(("5", 3), ("5", 2)), Ordering::Greater);
        assert_eq!(cmp_positions(("4", 9), ("5", 0)), Ordering::Less);
    }

    fn kinesis_record(seq: &str, key: &str, data: Bytes) -> aws_sdk_kinesis::types::Record {
        aws_sdk_kinesis::types::Record::builder()
            .sequence_number(seq)
            .partition_key(key)
            .data(Blob::new(data.to_vec()))
            .build()
            .unwrap()
    }

    fn aggregate(n: usize) -> Bytes {
        let mut aggregator = Aggregator::new();
        for i in 0..n {
            let record = UserRecord::new(format!("key-{i}"), Bytes::from(format!("data-{i}")));
            assert!(aggregator.try_push_ref(&record).unwrap());
        }
        aggregator.finish().unwrap().data
    }

    #[test]
    fn resuming_mid_aggregate_skips_the_processed_sub_records_only() {
        let page = vec![
            kinesis_record("100", "plain", Bytes::from_static(b"before")),
            kinesis_record("200", "agg", aggregate(5)),
            kinesis_record("300", "plain", Bytes::from_static(b"after")),
        ];
        let mut unpacker = Unpacker::new("s".into(), None, Some(("200".into(), 2)));
        let mut out = Vec::new();
        let counts = unpacker.unpack(page, &mut out);
        let got: Vec<(&str, u64)> = out.iter().map(|r| (&*r.sequence_number, r.sub_sequence_number)).collect();
        assert_eq!(got, [("200", 3), ("200", 4), ("300", 0)]);
        assert_eq!(counts.before_checkpoint, 4);
        assert!(out[0].aggregated && !out[2].aggregated);
        assert_eq!(out[0].data, Bytes::from_static(b"data-3"));
        assert_eq!(out[0].partition_key, "key-3");
    }

    #[test]
    fn reading_again_from_a_sub_record_keeps_it_and_what_follows() {
        let page = vec![
            kinesis_record("200", "agg", aggregate(5)),
            kinesis_record("300", "plain", Bytes::from_static(b"after")),
        ];
        let mut unpacker = Unpacker::starting_at("s".into(), None, ("200".into(), 2));
        let mut out = Vec::new();
        unpacker.unpack(page, &mut out);
        let got: Vec<(&str, u64)> = out.iter().map(|r| (&*r.sequence_number, r.sub_sequence_number)).collect();
        assert_eq!(got, [("200", 2), ("200", 3), ("200", 4), ("300", 0)]);
    }

    #[test]
    fn skipping_through_a_record_leaves_out_all_of_it_but_never_shortens_the_resume_filter() {
        let page = || {
            vec![
                kinesis_record("100", "p", Bytes::from_static(b"x")),
                kinesis_record("200", "agg", aggregate(3)),
                kinesis_record("300", "p", Bytes::from_static(b"y")),
            ]
        };
        let mut unpacker = Unpacker::new("s".into(), None, None);
        unpacker.skip_through("200");
        let mut out = Vec::new();
        unpacker.unpack(page(), &mut out);
        let got: Vec<(&str, u64)> = out.iter().map(|r| (&*r.sequence_number, r.sub_sequence_number)).collect();
        assert_eq!(got, [("300", 0)]);
        // A checkpoint further on stays the filter.
        let mut unpacker = Unpacker::new("s".into(), None, Some(("300".into(), 0)));
        unpacker.skip_through("200");
        let mut out = Vec::new();
        unpacker.unpack(page(), &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn the_resume_filter_ends_at_the_first_newer_record() {
        let mut unpacker = Unpacker::new("s".into(), None, Some(("100".into(), 0)));
        let mut out = Vec::new();
        unpacker.unpack(vec![kinesis_record("100", "k", Bytes::from_static(b"x"))], &mut out);
        assert!(out.is_empty());
        unpacker.unpack(vec![kinesis_record("101", "k", Bytes::from_static(b"y"))], &mut out);
        unpacker.unpack(vec![kinesis_record("101", "k", Bytes::from_static(b"z"))], &mut out);
        assert_eq!(out.len(), 2, "after resuming, nothing more is filtered");
    }

    #[test]
    fn sub_records_outside_the_shard_are_counted_not_delivered() {
        let data = aggregate(50);
        let half = HashKeyRange::new(0, u128::MAX / 2).unwrap();
        let mut unpacker = Unpacker::new("s".into(), Some(half), None);
        let mut out = Vec::new();
        let counts = unpacker.unpack(vec![kinesis_record("1", "agg", data)], &mut out);
        assert!(counts.out_of_range > 0 && !out.is_empty());
        assert_eq!(out.len() + counts.out_of_range, 50);
        assert!(out.iter().all(|r| half.contains(kinesis_aggregation::hash_key(&r.partition_key))));
    }
}
