//! Resharding end to end against kinesis-local, the emulator that reports ChildShards.
//!
//! The test starts kinesis-local through `kinesis_testkit::KinesisLocal` (which installs it with
//! `scripts/kinesis-local install` if needed). Without node and npm it fails with a message that
//! says how to install them.

use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::{PutRecordsRequestEntry, Record, Shard, ShardIteratorType};
use kinesis_testkit::{KinesisLocal, wait_until_stream_active};
use std::collections::{BTreeSet, HashMap};

const BEFORE: usize = 40;
const AFTER: usize = 40;

fn hash_range(shard: &Shard) -> (u128, u128) {
    let range = shard.hash_key_range().expect("every shard has a hash key range");
    let parse = |key: &str| key.parse::<u128>().expect("hash keys are decimal u128");
    (parse(range.starting_hash_key()), parse(range.ending_hash_key()))
}

/// Puts `data` with partition keys `pk-<data>` and returns the shard each record went to.
async fn put(client: &aws_sdk_kinesis::Client, stream: &str, data: &[String]) -> Vec<String> {
    let entries = data
        .iter()
        .map(|d| {
            PutRecordsRequestEntry::builder()
                .partition_key(format!("pk-{d}"))
                .data(Blob::new(d.as_bytes()))
                .build()
                .expect("partition key and data are set")
        })
        .collect();
    let out = client.put_records().stream_name(stream).set_records(Some(entries)).send().await.expect("PutRecords");
    assert_eq!(out.failed_record_count(), Some(0), "{:?}", out.records());
    out.records().iter().map(|r| r.shard_id().expect("a successful record has a shard id").to_owned()).collect()
}

async fn list_shards(client: &aws_sdk_kinesis::Client, stream: &str) -> Vec<Shard> {
    let out = client.list_shards().stream_name(stream).max_results(1000).send().await.expect("ListShards");
    assert!(out.next_token().is_none(), "more than 1000 shards: this test does not page");
    out.shards().to_vec()
}

async fn trim_horizon(client: &aws_sdk_kinesis::Client, stream: &str, shard_id: &str) -> String {
    client
        .get_shard_iterator()
        .stream_name(stream)
        .shard_id(shard_id)
        .shard_iterator_type(ShardIteratorType::TrimHorizon)
        .send()
        .await
        .expect("GetShardIterator")
        .shard_iterator()
        .expect("GetShardIterator returns an iterator")
        .to_owned()
}

/// Reads a closed shard to its end, which is when GetRecords returns no NextShardIterator
/// (kinesis-local's EndingSequenceNumber is fake, so sequence numbers cannot tell). Returns the
/// records and the ChildShards ids of the last response.
async fn read_closed_shard(
    client: &aws_sdk_kinesis::Client,
    stream: &str,
    shard_id: &str,
) -> (Vec<Record>, BTreeSet<String>) {
    let mut iterator = trim_horizon(client, stream, shard_id).await;
    let mut records = Vec::new();
    for _ in 0..1000 {
        let out = client.get_records().shard_iterator(iterator).limit(10_000).send().await.expect("GetRecords");
        records.extend_from_slice(out.records());
        match out.next_shard_iterator() {
            Some(next) => iterator = next.to_owned(),
            None => {
                let children = out.child_shards().iter().map(|c| c.shard_id().to_owned()).collect();
                return (records, children);
            }
        }
    }
    panic!("closed shard {shard_id} did not end after 1000 GetRecords calls");
}

/// Reads an open shard from TRIM_HORIZON until GetRecords returns nothing and is not behind.
async fn read_open_shard(client: &aws_sdk_kinesis::Client, stream: &str, shard_id: &str) -> Vec<Record> {
    let mut iterator = trim_horizon(client, stream, shard_id).await;
    let mut records = Vec::new();
    for _ in 0..1000 {
        let out = client.get_records().shard_iterator(iterator).limit(10_000).send().await.expect("GetRecords");
        let caught_up = out.records().is_empty() && out.millis_behind_latest().unwrap_or(0) == 0;
        records.extend_from_slice(out.records());
        if caught_up {
            return records;
        }
        iterator = out.next_shard_iterator().expect("an open shard always has a next iterator").to_owned();
    }
    panic!("open shard {shard_id} was still not caught up after 1000 GetRecords calls");
}

fn data_of(records: &[Record]) -> Vec<String> {
    records.iter().map(|r| String::from_utf8(r.data().as_ref().to_vec()).expect("the test sent UTF-8")).collect()
}

#[tokio::test]
async fn split_shard_then_read_parent_before_children() {
    let local = KinesisLocal::start().await.expect("kinesis-local must be available for this test");
    let client = local.client();
    let stream = local.create_stream(1).await.expect("create a 1-shard stream");

    let before: Vec<String> = (0..BEFORE).map(|i| format!("before-split-{i}")).collect();
    let after: Vec<String> = (0..AFTER).map(|i| format!("after-split-{i}")).collect();

    let shards = list_shards(&client, &stream).await;
    assert_eq!(shards.len(), 1, "{shards:?}");
    let parent = shards[0].shard_id().to_owned();
    let put_shards = put(&client, &stream, &before).await;
    assert!(put_shards.iter().all(|s| *s == parent), "before the split every record goes to {parent}");

    let (start, end) = hash_range(&shards[0]);
    let midpoint = start + (end - start) / 2 + 1;
    client
        .split_shard()
        .stream_name(&stream)
        .shard_to_split(&parent)
        .new_starting_hash_key(midpoint.to_string())
        .send()
        .await
        .expect("SplitShard");
    wait_until_stream_active(&client, &stream).await.expect("the stream is ACTIVE again after the split");

    let put_shards = put(&client, &stream, &after).await;
    assert!(put_shards.iter().all(|s| *s != parent), "after the split no record goes to the closed parent");

    // Lineage from ListShards: the children name the parent.
    let shards = list_shards(&client, &stream).await;
    let listed_children: BTreeSet<String> = shards
        .iter()
        .filter(|s| s.parent_shard_id() == Some(parent.as_str()))
        .map(|s| s.shard_id().to_owned())
        .collect();
    assert_eq!(listed_children.len(), 2, "SplitShard makes two children of {parent}: {shards:?}");
    let closed = shards.iter().find(|s| s.shard_id() == parent).expect("the parent is still listed");
    assert!(closed.sequence_number_range().and_then(|r| r.ending_sequence_number()).is_some(), "the parent is closed");

    // Parent first, to its end.
    let (parent_records, child_shards) = read_closed_shard(&client, &stream, &parent).await;
    assert_eq!(child_shards, listed_children, "ChildShards at the parent's end agree with ListShards");

    // Then both children.
    let mut child_data = Vec::new();
    for child in &listed_children {
        let shard = shards.iter().find(|s| s.shard_id() == child).expect("the child is listed");
        let (lo, hi) = hash_range(shard);
        assert!(lo == start || lo == midpoint, "child {child} starts at an edge of the split: {lo}");
        assert!(hi == end || hi == midpoint - 1, "child {child} ends at an edge of the split: {hi}");
        child_data.extend(data_of(&read_open_shard(&client, &stream, child).await));
    }

    // Every record exactly once, on the side of the split it was put on.
    let parent_data = data_of(&parent_records);
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for data in parent_data.iter().chain(&child_data) {
        *counts.entry(data.as_str()).or_default() += 1;
    }
    for data in before.iter().chain(&after) {
        assert_eq!(counts.get(data.as_str()), Some(&1), "{data:?} must arrive exactly once");
    }
    assert_eq!(counts.len(), BEFORE + AFTER, "nothing but the records put arrives");
    let parent_set: BTreeSet<&String> = parent_data.iter().collect();
    let child_set: BTreeSet<&String> = child_data.iter().collect();
    assert_eq!(parent_set, before.iter().collect(), "the parent holds exactly the records put before the split");
    assert_eq!(child_set, after.iter().collect(), "the children hold exactly the records put after the split");
    assert_eq!(parent_data, before, "the parent returns its records in the order they were put");
}
