//! Smoke tests of the test bed's embedded emulators: ferrokinesis (Kinesis) and dynoxide
//! (DynamoDB), both started in-process by `kinesis-testkit`.
//!
//! With `AWS_ENDPOINT_URL_KINESIS` / `AWS_ENDPOINT_URL_DYNAMODB` set, the same tests run against
//! those endpoints instead. The throttling test needs an endpoint that throttles (the embedded
//! server with `enforce_limits`, or a real account).

use aws_sdk_dynamodb::operation::put_item::PutItemError;
use aws_sdk_dynamodb::types::AttributeValue;
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::{PutRecordsRequestEntry, Record, Shard, ShardIteratorType};
use kinesis_testkit::{DynamoDb, Kinesis, KinesisOptions, Origin, TestBed};
use md5::{Digest, Md5};
use std::collections::HashMap;

const THROTTLED: &str = "ProvisionedThroughputExceededException";

/// The record's hash key: MD5 of the partition key, read as a big-endian u128.
fn hash_key(partition_key: &str) -> u128 {
    let digest: [u8; 16] = Md5::digest(partition_key.as_bytes()).into();
    u128::from_be_bytes(digest)
}

/// The shard's inclusive hash key range.
fn hash_range(shard: &Shard) -> (u128, u128) {
    let range = shard.hash_key_range().expect("every shard has a hash key range");
    let parse = |key: &str| key.parse::<u128>().expect("hash keys are decimal u128");
    (parse(range.starting_hash_key()), parse(range.ending_hash_key()))
}

fn entry(partition_key: &str, data: &str) -> PutRecordsRequestEntry {
    PutRecordsRequestEntry::builder()
        .partition_key(partition_key)
        .data(Blob::new(data.as_bytes()))
        .build()
        .expect("partition key and data are set")
}

async fn list_shards(client: &aws_sdk_kinesis::Client, stream: &str) -> Vec<Shard> {
    // One page: ferrokinesis fails ListShards with only a NextToken, so avoid paging.
    let out = client.list_shards().stream_name(stream).max_results(1000).send().await.expect("ListShards");
    assert!(out.next_token().is_none(), "more than 1000 shards: this test does not page");
    out.shards().to_vec()
}

/// Reads an open shard from TRIM_HORIZON until GetRecords returns nothing and is not behind.
async fn read_open_shard(client: &aws_sdk_kinesis::Client, stream: &str, shard_id: &str) -> Vec<Record> {
    let mut iterator = client
        .get_shard_iterator()
        .stream_name(stream)
        .shard_id(shard_id)
        .shard_iterator_type(ShardIteratorType::TrimHorizon)
        .send()
        .await
        .expect("GetShardIterator")
        .shard_iterator()
        .map(str::to_owned);
    let mut records = Vec::new();
    for _ in 0..100 {
        let Some(current) = iterator else {
            panic!("shard {shard_id} is open but GetRecords returned no NextShardIterator");
        };
        let out = client.get_records().shard_iterator(current).limit(10_000).send().await.expect("GetRecords");
        let caught_up = out.records().is_empty() && out.millis_behind_latest().unwrap_or(0) == 0;
        records.extend_from_slice(out.records());
        if caught_up {
            return records;
        }
        iterator = out.next_shard_iterator().map(str::to_owned);
    }
    panic!("shard {shard_id} was still not caught up after 100 GetRecords calls");
}

#[tokio::test]
async fn every_record_comes_back_once_from_the_shard_of_its_hash_key() {
    let kinesis = Kinesis::start().await.expect("start Kinesis");
    let client = kinesis.client();
    let stream = kinesis.create_stream(4).await.expect("create a 4-shard stream");

    // Partition keys whose MD5s spread over the whole hash key space.
    let sent: Vec<(String, String)> =
        (0..500).map(|i| (format!("user-{}-{i}", (i * 7919) % 1009), format!("record number {i}"))).collect();
    let out = client
        .put_records()
        .stream_name(&stream)
        .set_records(Some(sent.iter().map(|(key, data)| entry(key, data)).collect()))
        .send()
        .await
        .expect("PutRecords");
    assert_eq!(out.failed_record_count(), Some(0), "no record may fail: {:?}", out.records());
    let put_shard: HashMap<&str, &str> = sent
        .iter()
        .zip(out.records())
        .map(|((_, data), result)| (data.as_str(), result.shard_id().expect("a successful record has a shard id")))
        .collect();

    let shards = list_shards(&client, &stream).await;
    assert_eq!(shards.len(), 4, "{shards:?}");

    // data -> (shard it was read from, partition key it came back with)
    let mut received: HashMap<String, (String, String)> = HashMap::new();
    for shard in &shards {
        let records = read_open_shard(&client, &stream, shard.shard_id()).await;
        assert!(!records.is_empty(), "shard {} got no records out of 500", shard.shard_id());
        for record in records {
            let data = String::from_utf8(record.data().as_ref().to_vec()).expect("the test sent UTF-8");
            let previous =
                received.insert(data.clone(), (shard.shard_id().to_owned(), record.partition_key().to_owned()));
            assert!(previous.is_none(), "{data:?} came back twice");
        }
    }

    assert_eq!(received.len(), sent.len(), "records read back");
    for (partition_key, data) in &sent {
        let (shard_id, got_key) = received.get(data).unwrap_or_else(|| panic!("{data:?} never came back"));
        assert_eq!(got_key, partition_key, "partition key of {data:?}");
        assert_eq!(put_shard[data.as_str()], shard_id, "PutRecords and GetRecords disagree on the shard of {data:?}");
        let shard = shards.iter().find(|s| s.shard_id() == shard_id).expect("the shard is listed");
        let (start, end) = hash_range(shard);
        let key = hash_key(partition_key);
        assert!(
            (start..=end).contains(&key),
            "{data:?} (hash key {key}) was on {shard_id}, whose range is {start}..={end}"
        );
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
