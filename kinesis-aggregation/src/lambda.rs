//! AWS Lambda: the user records of a Kinesis event, and the partial batch response that names a
//! failed one (feature `lambda`).
//!
//! Lambda hands a function the *Kinesis* records of a shard; a KPL-aggregated record (or one of
//! this library's producer) arrives as one event record, usually with partition key `"a"`, holding
//! many user records. [`user_records`] unpacks them with the KCL's rules ([`crate::deaggregate`]):
//! an aggregate gives its sub-records (sub-sequence numbers from 0, their own partition and
//! explicit hash keys); a plain record, or one with the magic that is not a valid aggregate, is
//! handed over whole (sub-sequence 0); this library's compressed form is inflated. Nothing is
//! filtered by hash range: Lambda does not say which shard's range applies.
//!
//! **Partial batch responses** (event source mapping with `FunctionResponseTypes:
//! ReportBatchItemFailures`): Lambda takes the *Kinesis* sequence number of the first record that
//! failed ([`failure_response`]) and, after the function returns, retries the shard's batch from
//! that Kinesis record on. An aggregate is one Kinesis record: the user records before the failed
//! one *in the same aggregate* come again, as do all that follow it in the batch. Keep the
//! (sequence number, sub-sequence number) of the last user record done if repeats matter, and
//! skip up to it on the retry ([`LambdaUserRecord::position`]).
//!
//! ```
//! use kinesis_aggregation::lambda::{KinesisEvent, KinesisEventResponse, failure_response, user_records};
//!
//! fn handle(event: &KinesisEvent) -> KinesisEventResponse {
//!     for record in user_records(event) {
//!         if record.data.is_empty() {
//!             // Lambda retries from this record's Kinesis record on.
//!             return failure_response(Some(&record));
//!         }
//!     }
//!     failure_response(None) // nothing failed
//! }
//! # let event: KinesisEvent = serde_json::from_str(r#"{"Records": []}"#).unwrap();
//! # assert!(handle(&event).batch_item_failures.is_empty());
//! ```

use std::time::SystemTime;

pub use aws_lambda_events::event::kinesis::{KinesisEvent, KinesisEventRecord};
pub use aws_lambda_events::event::streams::{KinesisBatchItemFailure, KinesisEventResponse};
use bytes::Bytes;

use crate::deaggregate::{Corruption, Deaggregator, Outcome};

/// One user record of a Lambda Kinesis event.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct LambdaUserRecord {
    /// The partition key: the sub-record's own for an aggregated record.
    pub partition_key: String,
    /// The sub-record's explicit hash key (decimal), when it has one.
    pub explicit_hash_key: Option<String>,
    /// The data (inflated, when the producer compressed it).
    pub data: Bytes,
    /// The Kinesis record's sequence number (shared by every sub-record of an aggregate): what a
    /// partial batch response names.
    pub sequence_number: String,
    /// The position inside the aggregate, from 0; 0 for a record that was not aggregated.
    pub sub_sequence_number: u64,
    /// Whether the record came out of an aggregate.
    pub aggregated: bool,
    /// When Kinesis received the Kinesis record (Lambda gives it to the millisecond). As
    /// `aws_lambda_events` 1.2 reads it: it takes the digits after the point as milliseconds, so
    /// a time Lambda writes with fewer than three (`…650.98`, `…650.5`) is read 10 or 100 times
    /// too few milliseconds past the second.
    pub approximate_arrival: SystemTime,
    /// The shard, from the event record's `eventID` (`shardId-...:sequence`), when it has one.
    pub shard_id: Option<String>,
    /// The index of the Kinesis record in the event's `Records`.
    pub event_index: usize,
}

impl LambdaUserRecord {
    /// (sequence number, sub-sequence number): the record's place in its shard, in the order the
    /// records come (compare sequence numbers as numbers: by length, then digit by digit).
    pub fn position(&self) -> (&str, u64) {
        (&self.sequence_number, self.sub_sequence_number)
    }
}

/// What [`deaggregate_event`] found, beside the records.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct EventSummary {
    /// Kinesis records that were aggregates.
    pub aggregates: usize,
    /// Kinesis records that were plain.
    pub plain: usize,
    /// Kinesis records with the aggregate magic that were not valid aggregates, handed over whole
    /// (as the KCL does), with why: (index in the event, why).
    pub corrupt: Vec<(usize, Corruption)>,
}

/// The user records of `event`, in order (see the module docs).
pub fn user_records(event: &KinesisEvent) -> Vec<LambdaUserRecord> {
    deaggregate_event(event).0
}

/// The user records of `event`, in order, and what was found: how many aggregates, plain and
/// corrupt records.
pub fn deaggregate_event(event: &KinesisEvent) -> (Vec<LambdaUserRecord>, EventSummary) {
    let mut deaggregator = Deaggregator::new();
    let mut records = Vec::new();
    let mut summary = EventSummary::default();
    for (event_index, event_record) in event.records.iter().enumerate() {
        let kinesis = &event_record.kinesis;
        let arrival: SystemTime = kinesis.approximate_arrival_timestamp.0.into();
        let shard_id = event_record
            .event_id
            .as_deref()
            .and_then(|id| id.split_once(':'))
            .map(|(shard, _)| shard.to_owned())
            .filter(|shard| shard.starts_with("shardId-"));
        let data = Bytes::copy_from_slice(&kinesis.data.0);
        let unpacked = deaggregator.deaggregate(&kinesis.partition_key, data);
        match unpacked.outcome {
            Outcome::Aggregated { .. } => summary.aggregates += 1,
            Outcome::Plain => summary.plain += 1,
            Outcome::Corrupt(why) => summary.corrupt.push((event_index, why)),
        }
        for user in unpacked.records {
            records.push(LambdaUserRecord {
                partition_key: user.partition_key().to_owned(),
                explicit_hash_key: user.explicit_hash_key().map(str::to_owned),
                sequence_number: kinesis.sequence_number.clone(),
                sub_sequence_number: user.sub_sequence_number().unwrap_or(0),
                aggregated: user.is_aggregated(),
                approximate_arrival: arrival,
                shard_id: shard_id.clone(),
                event_index,
                data: user.into_data(),
            });
        }
    }
    (records, summary)
}

/// The partial batch response for a batch whose first failed user record is `failed` (`None`:
/// nothing failed, the whole batch is done). Lambda retries from that record's Kinesis record on
/// (see the module docs for what comes again).
pub fn failure_response(failed: Option<&LambdaUserRecord>) -> KinesisEventResponse {
    let mut response = KinesisEventResponse::default();
    if let Some(record) = failed {
        response.add_failure(record.sequence_number.clone());
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Aggregator, TryPush, UserRecord};
    use base64::Engine as _;

    /// An event of these (partition key, data) Kinesis records, sequence numbers 100, 101, ...
    fn event(records: &[(&str, Vec<u8>)]) -> KinesisEvent {
        let records: Vec<serde_json::Value> = records
            .iter()
            .enumerate()
            .map(|(i, (key, data))| {
                let sequence = format!("{}", 100 + i);
                serde_json::json!({
                    "kinesis": {
                        "kinesisSchemaVersion": "1.0",
                        "partitionKey": key,
                        "sequenceNumber": sequence,
                        "data": base64::engine::general_purpose::STANDARD.encode(data),
                        "approximateArrivalTimestamp": 1_700_000_000.987
                    },
                    "eventSource": "aws:kinesis",
                    "eventVersion": "1.0",
                    "eventID": format!("shardId-000000000003:{sequence}"),
                    "eventName": "aws:kinesis:record",
                    "invokeIdentityArn": "arn:aws:iam::123456789012:role/lambda-role",
                    "awsRegion": "us-east-1",
                    "eventSourceARN": "arn:aws:kinesis:us-east-1:123456789012:stream/orders"
                })
            })
            .collect();
        serde_json::from_value(serde_json::json!({ "Records": records })).expect("a Kinesis event")
    }

    #[test]
    fn aggregates_plain_and_corrupt_records_come_out_as_the_kcl_gives_them() {
        let mut aggregator = Aggregator::new();
        for i in 0..3 {
            assert!(matches!(
                aggregator.try_push(UserRecord::new(format!("user-{i}"), format!("sub-{i}"))),
                Ok(TryPush::Added)
            ));
        }
        let aggregate = aggregator.finish().unwrap();
        let mut corrupt = aggregate.data.to_vec();
        let last = corrupt.len() - 1;
        corrupt[last] ^= 0xff; // the MD5 no longer matches
        let compressed = crate::compression::compress(b"squeezed");
        let event = event(&[
            ("plain-key", b"plain".to_vec()),
            (&aggregate.partition_key, aggregate.data.to_vec()),
            ("a", corrupt.clone()),
            ("z", compressed.to_vec()),
        ]);
        let (records, summary) = deaggregate_event(&event);
        let got: Vec<(&str, &[u8], &str, u64, bool)> = records
            .iter()
            .map(|r| {
                (r.partition_key.as_str(), &r.data[..], r.sequence_number.as_str(), r.sub_sequence_number, r.aggregated)
            })
            .collect();
        assert_eq!(
            got,
            [
                ("plain-key", &b"plain"[..], "100", 0, false),
                ("user-0", b"sub-0", "101", 0, true),
                ("user-1", b"sub-1", "101", 1, true),
                ("user-2", b"sub-2", "101", 2, true),
                ("a", &corrupt[..], "102", 0, false),
                ("z", b"squeezed", "103", 0, false),
            ]
        );
        assert_eq!((summary.aggregates, summary.plain), (1, 2));
        assert_eq!(summary.corrupt, [(2, Corruption::ChecksumMismatch)]);
        assert!(records.iter().all(|r| r.shard_id.as_deref() == Some("shardId-000000000003")));
        let arrival = records[0].approximate_arrival.duration_since(SystemTime::UNIX_EPOCH).unwrap();
        assert_eq!(arrival.as_millis(), 1_700_000_000_987);
        assert_eq!(records[2].event_index, 1);
    }

    #[test]
    fn a_failure_names_the_kinesis_record_of_the_failed_user_record() {
        let mut aggregator = Aggregator::new();
        for (key, data) in [("k1", "one"), ("k2", "two")] {
            assert!(matches!(aggregator.try_push(UserRecord::new(key, data)), Ok(TryPush::Added)));
        }
        let aggregate = aggregator.finish().unwrap();
        let event = event(&[("p", b"first".to_vec()), (&aggregate.partition_key, aggregate.data.to_vec())]);
        let records = user_records(&event);
        let response = failure_response(Some(&records[2]));
        let json = serde_json::to_value(&response).unwrap();
        assert_eq!(json, serde_json::json!({ "batchItemFailures": [{ "itemIdentifier": "101" }] }));
        assert_eq!(records[2].position(), ("101", 1));
        let none = serde_json::to_value(failure_response(None)).unwrap();
        assert_eq!(none, serde_json::json!({ "batchItemFailures": [] }));
    }
}
