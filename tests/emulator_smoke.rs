//! Smoke tests of the test bed's embedded emulators: ferrokinesis (Kinesis) and dynoxide
//! (DynamoDB), both started in-process by `kinesis-testkit`.
//!
//! With `AWS_ENDPOINT_URL_KINESIS` / `AWS_ENDPOINT_URL_DYNAMODB` set, the same tests run against
//! those endpoints instead. The throttling test needs an endpoint that throttles (the embedded
//! server with `enforce_limits`, or a real account).

use aws_sdk_dynamodb::operation::put_item::PutItemError;
use aws_sdk_dynamodb::types::AttributeValue;
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use kinesis_testkit::{
    DynamoDb, Kinesis, KinesisOptions, Origin, ShardEnd, TestBed, list_all_shards, read_shard, read_stream,
};
use md5::{Digest, Md5};
use std::collections::HashMap;

const THROTTLED: &str = "ProvisionedThroughputExceededException";

/// The record's hash key: MD5 of the partition key, read as a big-endian u128.
fn hash_key(partition_key: &str) -> u128 {
    let digest: [u8; 16] = Md5::digest(partition_key.as_bytes()).into();
    u128::from_be_bytes(digest)
}

fn entry(partition_key: &str, data: &str) -> PutRecordsRequestEntry {
    PutRecordsRequestEntry::builder()
        .partition_key(partition_key)
        .data(Blob::new(data.as_bytes()))
        .build()
        .expect("partition key and data are set")
}

/// `(partition key, data)` pairs whose partition keys' MD5s spread over the whole hash key space.
fn spread_records(count: usize) -> Vec<(String, String)> {
    (0..count).map(|i| (format!("user-{}-{i}", (i * 7919) % 1009), format!("record number {i}"))).collect()
}

/// A decimal sequence number as a sortable key: no leading zeros, so longer is larger.
fn sequence_key(sequence_number: &str) -> (usize, &str) {
    (sequence_number.len(), sequence_number)
}

/// One PutRecords call with every `(partition key, data)` pair; none may fail.
async fn put_all(
    client: &aws_sdk_kinesis::Client,
    stream: &str,
    sent: &[(String, String)],
) -> aws_sdk_kinesis::operation::put_records::PutRecordsOutput {
    let out = client
        .put_records()
        .stream_name(stream)
        .set_records(Some(sent.iter().map(|(key, data)| entry(key, data)).collect()))
        .send()
        .await
        .expect("PutRecords");
    assert_eq!(out.failed_record_count(), Some(0), "no record may fail: {:?}", out.records());
    out
}

#[tokio::test]
async fn every_record_comes_back_once_from_the_shard_of_its_hash_key() {
    let kinesis = Kinesis::start().await.expect("start Kinesis");
    let client = kinesis.client();
    let stream = kinesis.create_stream(4).await.expect("create a 4-shard stream");

    let sent = spread_records(500);
    let out = put_all(&client, &stream, &sent).await;
    let put_shard: HashMap<&str, &str> = sent
        .iter()
        .zip(out.records())
        .map(|((_, data), result)| (data.as_str(), result.shard_id().expect("a successful record has a shard id")))
        .collect();

    let shards = list_all_shards(&client, &stream).await.expect("ListShards");
    assert_eq!(shards.len(), 4, "{shards:?}");

    // data -> (shard it was read from, partition key it came back with)
    let mut received: HashMap<String, (String, String)> = HashMap::new();
    for shard in &shards {
        let read = read_shard(&client, &stream, shard).await.expect("read the shard");
        assert_eq!(read.end, ShardEnd::CaughtUp, "shard {} is open: it ends caught up", shard.shard_id);
        assert!(!read.records.is_empty(), "shard {} got no records out of 500", shard.shard_id);
        for record in read.records {
            assert_eq!(record.shard_id, shard.shard_id, "a record is labelled with the shard it was read from");
            let data = String::from_utf8(record.data).expect("the test sent UTF-8");
            let previous = received.insert(data.clone(), (shard.shard_id.clone(), record.partition_key));
            assert!(previous.is_none(), "{data:?} came back twice");
        }
    }

    assert_eq!(received.len(), sent.len(), "records read back");
    for (partition_key, data) in &sent {
        let (shard_id, got_key) = received.get(data).unwrap_or_else(|| panic!("{data:?} never came back"));
        assert_eq!(got_key, partition_key, "partition key of {data:?}");
        assert_eq!(put_shard[data.as_str()], shard_id, "PutRecords and GetRecords disagree on the shard of {data:?}");
        let shard = shards.iter().find(|s| &s.shard_id == shard_id).expect("the shard is listed");
        let (start, end) = (shard.starting_hash_key, shard.ending_hash_key);
        let key = hash_key(partition_key);
        assert!(shard.contains(key), "{data:?} (hash key {key}) was on {shard_id}, whose range is {start}..={end}");
    }
}

#[tokio::test]
async fn read_stream_returns_every_record_once_on_the_shard_of_its_hash_key() {
    let kinesis = Kinesis::start().await.expect("start Kinesis");
    let client = kinesis.client();
    let stream = kinesis.create_stream(3).await.expect("create a 3-shard stream");

    let sent = spread_records(300);
    let out = put_all(&client, &stream, &sent).await;
    // data -> (partition key, shard id, sequence number) as PutRecords reported them
    let put: HashMap<&str, (&str, &str, &str)> = sent
        .iter()
        .zip(out.records())
        .map(|((key, data), result)| {
            let shard_id = result.shard_id().expect("a successful record has a shard id");
            let sequence_number = result.sequence_number().expect("a successful record has a sequence number");
            (data.as_str(), (key.as_str(), shard_id, sequence_number))
        })
        .collect();

    let shards = list_all_shards(&client, &stream).await.expect("ListShards");
    assert_eq!(shards.len(), 3, "{shards:?}");
    assert!(shards.iter().all(|s| !s.closed), "a new stream has only open shards: {shards:?}");

    let records = read_stream(&client, &stream).await.expect("read the stream");
    assert_eq!(records.len(), sent.len(), "every record comes back once, and nothing else");

    let mut received: HashMap<String, usize> = HashMap::new();
    for record in &records {
        let data = String::from_utf8(record.data.clone()).expect("the test sent UTF-8");
        let &(partition_key, put_shard, put_sequence) =
            put.get(data.as_str()).unwrap_or_else(|| panic!("{data:?} was never put"));
        *received.entry(data.clone()).or_default() += 1;
        assert_eq!(record.partition_key, partition_key, "partition key of {data:?}");
        assert_eq!(record.shard_id, put_shard, "PutRecords and read_stream disagree on the shard of {data:?}");
        assert_eq!(record.sequence_number, put_sequence, "sequence number of {data:?}");
        assert!(record.approximate_arrival.is_some(), "{data:?} has an ApproximateArrivalTimestamp");
        let shard = shards.iter().find(|s| s.shard_id == record.shard_id).expect("the shard is listed");
        let key = hash_key(partition_key);
        assert!(
            shard.contains(key),
            "{data:?} (hash key {key}) was on {}, whose range is {}..={}",
            shard.shard_id,
            shard.starting_hash_key,
            shard.ending_hash_key
        );
    }
    for (_, data) in &sent {
        assert_eq!(received.get(data), Some(&1), "{data:?} must come back exactly once");
    }

    // Shard by shard (each shard's records together, in the listed order as no shard has a
    // parent), and within a shard in sequence number order.
    let mut shard_runs: Vec<&str> = records.iter().map(|r| r.shard_id.as_str()).collect();
    shard_runs.dedup();
    let listed: Vec<&str> = shards.iter().map(|s| s.shard_id.as_str()).collect();
    assert_eq!(shard_runs, listed, "every shard got records, and they come shard by shard");
    for pair in records.windows(2).filter(|pair| pair[0].shard_id == pair[1].shard_id) {
        assert!(
            sequence_key(&pair[0].sequence_number) < sequence_key(&pair[1].sequence_number),
            "records of {} out of order: {} then {}",
            pair[0].shard_id,
            pair[0].sequence_number,
            pair[1].sequence_number
        );
    }
}

/// A merge closes two shards: read_stream reads both to their end, and before the merged child.
#[tokio::test]
async fn read_stream_reads_closed_parents_before_the_merged_child() {
    let kinesis = Kinesis::start().await.expect("start Kinesis");
    let client = kinesis.client();
    let stream = kinesis.create_stream(3).await.expect("create a 3-shard stream");
    let put = |records: &[(String, String)]| {
        client
            .put_records()
            .stream_name(&stream)
            .set_records(Some(records.iter().map(|(key, data)| entry(key, data)).collect()))
            .send()
    };

    let before: Vec<(String, String)> = spread_records(90);
    let out = put(&before).await.expect("PutRecords before the merge");
    assert_eq!(out.failed_record_count(), Some(0), "{:?}", out.records());

    let shards = list_all_shards(&client, &stream).await.expect("ListShards");
    assert_eq!(shards.len(), 3, "{shards:?}");
    let (first, second) = (shards[0].shard_id.clone(), shards[1].shard_id.clone());
    assert_eq!(shards[0].ending_hash_key + 1, shards[1].starting_hash_key, "the first two shards are adjacent");
    client
        .merge_shards()
        .stream_name(&stream)
        .shard_to_merge(&first)
        .adjacent_shard_to_merge(&second)
        .send()
        .await
        .expect("MergeShards");
    kinesis_testkit::wait_until_stream_active(&client, &stream).await.expect("ACTIVE again after the merge");

    let after: Vec<(String, String)> =
        spread_records(90).into_iter().map(|(key, data)| (key, format!("{data} after the merge"))).collect();
    let out = put(&after).await.expect("PutRecords after the merge");
    assert_eq!(out.failed_record_count(), Some(0), "{:?}", out.records());

    let shards = list_all_shards(&client, &stream).await.expect("ListShards");
    let child = shards
        .iter()
        .find(|s| s.parent_shard_id.as_deref() == Some(first.as_str()))
        .unwrap_or_else(|| panic!("the merged shard names {first} as its parent: {shards:?}"));
    assert_eq!(child.adjacent_parent_shard_id.as_deref(), Some(second.as_str()), "{child:?}");
    let closed: Vec<&str> = shards.iter().filter(|s| s.closed).map(|s| s.shard_id.as_str()).collect();
    assert_eq!(closed, [first.as_str(), second.as_str()], "the merged shards are closed");

    let records = read_stream(&client, &stream).await.expect("read the stream");
    let mut counts: HashMap<&[u8], usize> = HashMap::new();
    for record in &records {
        *counts.entry(record.data.as_slice()).or_default() += 1;
    }
    for (_, data) in before.iter().chain(&after) {
        assert_eq!(counts.get(data.as_bytes()), Some(&1), "{data:?} must come back exactly once");
    }
    assert_eq!(records.len(), before.len() + after.len(), "nothing but the records put comes back");

    let position = |shard_id: &str| {
        let at: Vec<usize> = (0..records.len()).filter(|&i| records[i].shard_id == shard_id).collect();
        assert!(!at.is_empty(), "shard {shard_id} got records");
        (at[0], at[at.len() - 1])
    };
    let (first_start, first_end) = position(&first);
    let (second_start, second_end) = position(&second);
    let (child_start, _) = position(&child.shard_id);
    assert!(first_end < child_start && second_end < child_start, "both parents are read before the merged child");
    assert!(first_end < second_start || second_end < first_start, "each shard's records are together");
    for record in records.iter().filter(|r| r.shard_id == child.shard_id) {
        assert!(record.data.ends_with(b" after the merge"), "only records put after the merge are on the child");
    }
}

#[tokio::test]
async fn enforce_limits_throttles_records_over_1000_per_second_per_shard() {
    let kinesis = Kinesis::start_with(KinesisOptions { enforce_limits: true, ..Default::default() })
        .await
        .expect("start Kinesis with enforce_limits");
    let client = kinesis.client_without_retries();
    let stream = kinesis.create_stream(1).await.expect("create a 1-shard stream");

    // 1,000 records/s per shard, counted in a fixed one-second window: put batches of 500 into
    // the only shard until a window has seen more than 1,000 and refuses records. No timing is
    // assumed beyond the emulator taking well under a second for a few batches.
    let mut accepted = 0;
    for batch in 0..20 {
        let entries = (0..500).map(|i| entry(&format!("key-{batch}-{i}"), "payload")).collect();
        let out = client
            .put_records()
            .stream_name(&stream)
            .set_records(Some(entries))
            .send()
            .await
            .expect("PutRecords answers throttling per record, not for the whole call");
        let mut throttled = 0;
        for result in out.records() {
            match result.error_code() {
                None => {
                    assert!(result.sequence_number().is_some(), "an accepted record has a sequence number");
                    accepted += 1;
                }
                Some(THROTTLED) => {
                    assert!(result.sequence_number().is_none(), "a throttled record has no sequence number");
                    throttled += 1;
                }
                Some(other) => panic!("unexpected per-record error {other}: {:?}", result.error_message()),
            }
        }
        assert_eq!(out.failed_record_count(), Some(throttled), "FailedRecordCount counts the throttled records");
        if throttled > 0 {
            assert!(accepted >= 1000, "the first 1,000 records of a window are accepted (accepted {accepted})");
            return;
        }
    }
    panic!(
        "no record was throttled after 20 batches of 500 into one shard ({accepted} accepted); \
         this needs an endpoint that throttles: the embedded server with enforce_limits, or AWS \
         (kinesis-local does not throttle)"
    );
}

#[tokio::test]
async fn conditional_put_fails_with_a_typed_error_when_the_item_exists() {
    let dynamodb = DynamoDb::start().await.expect("start DynamoDB");
    let client = dynamodb.client();
    let table = dynamodb.create_table("pk").await.expect("create a table");

    let put = |owner: &str| {
        client
            .put_item()
            .table_name(&table)
            .item("pk", AttributeValue::S("shardId-000000000000".into()))
            .item("owner", AttributeValue::S(owner.into()))
            .condition_expression("attribute_not_exists(pk)")
    };
    put("worker-a").send().await.expect("the first conditional put succeeds");
    let error = put("worker-b").send().await.expect_err("the second conditional put must fail").into_service_error();
    assert!(matches!(error, PutItemError::ConditionalCheckFailedException(_)), "got {error:?}");

    let item = client
        .get_item()
        .table_name(&table)
        .key("pk", AttributeValue::S("shardId-000000000000".into()))
        .consistent_read(true)
        .send()
        .await
        .expect("GetItem");
    let owner = item.item().and_then(|item| item.get("owner")).and_then(|v| v.as_s().ok());
    assert_eq!(owner.map(String::as_str), Some("worker-a"), "the failed put changed nothing");
}

#[tokio::test]
async fn test_bed_starts_both_servers_on_loopback() {
    let bed = TestBed::start().await.expect("start the test bed");
    for (origin, url) in
        [(bed.kinesis.origin(), bed.kinesis.endpoint_url()), (bed.dynamodb.origin(), bed.dynamodb.endpoint_url())]
    {
        if origin == Origin::Embedded {
            assert!(url.starts_with("http://127.0.0.1:"), "{url}");
        }
    }
    bed.kinesis.client().list_streams().send().await.expect("ListStreams");
    bed.dynamodb.client().list_tables().send().await.expect("ListTables");
}

/// A plain `fn main` may build a runtime per step; the servers run on their own threads, so a
/// handle outlives the runtime that started it.
#[test]
fn servers_outlive_the_runtime_that_started_them() {
    let runtime = || tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
    let (kinesis, dynamodb) = runtime().block_on(async {
        (Kinesis::start().await.expect("start Kinesis"), DynamoDb::start().await.expect("start DynamoDB"))
    });
    runtime().block_on(async {
        let stream = kinesis.create_stream(2).await.expect("create a stream from another runtime");
        let table = dynamodb.create_table("pk").await.expect("create a table from another runtime");
        assert_ne!(stream, table);
    });
}
