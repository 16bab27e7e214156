//! Resharding end to end against kinesis-local, the emulator that reports ChildShards.
//!
//! The test starts kinesis-local through `kinesis_testkit::KinesisLocal` (which installs it with
//! `scripts/kinesis-local install` if needed). Without node and npm it fails with a message that
//! says how to install them.

use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use kinesis_testkit::{
    KinesisLocal, ReadRecord, ShardEnd, list_all_shards, parents_first, read_shard, read_stream,
    wait_until_stream_active,
};
use std::collections::{BTreeSet, HashMap};

const BEFORE: usize = 40;
const AFTER: usize = 40;

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

fn data_of(records: &[ReadRecord]) -> Vec<String> {
    records.iter().map(|r| String::from_utf8(r.data.clone()).expect("the test sent UTF-8")).collect()
}

#[tokio::test]
async fn split_shard_then_read_parent_before_children() {
    let local = KinesisLocal::start().await.expect("kinesis-local must be available for this test");
    let client = local.client();
    let stream = local.create_stream(1).await.expect("create a 1-shard stream");

    let before: Vec<String> = (0..BEFORE).map(|i| format!("before-split-{i}")).collect();
    let after: Vec<String> = (0..AFTER).map(|i| format!("after-split-{i}")).collect();

    let shards = list_all_shards(&client, &stream).await.expect("ListShards");
    assert_eq!(shards.len(), 1, "{shards:?}");
    let parent = shards[0].shard_id.clone();
    let put_shards = put(&client, &stream, &before).await;
    assert!(put_shards.iter().all(|s| *s == parent), "before the split every record goes to {parent}");

    let (start, end) = (shards[0].starting_hash_key, shards[0].ending_hash_key);
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
    let shards = list_all_shards(&client, &stream).await.expect("ListShards");
    let listed_children: BTreeSet<String> = shards
        .iter()
        .filter(|s| s.parent_shard_id.as_deref() == Some(parent.as_str()))
        .map(|s| s.shard_id.clone())
        .collect();
    assert_eq!(listed_children.len(), 2, "SplitShard makes two children of {parent}: {shards:?}");
    let closed = shards.iter().find(|s| s.shard_id == parent).expect("the parent is still listed");
    assert!(closed.closed, "the parent is closed");

    // Parent first, to its end (a missing NextShardIterator: kinesis-local's EndingSequenceNumber
    // is fake, so sequence numbers cannot tell).
    let parent_read = read_shard(&client, &stream, closed).await.expect("read the parent");
    let ShardEnd::Closed { child_shard_ids } = &parent_read.end else {
        panic!("the closed parent must be read to its end, not {:?}", parent_read.end);
    };
    let child_shards: BTreeSet<String> = child_shard_ids.iter().cloned().collect();
    assert_eq!(child_shards, listed_children, "ChildShards at the parent's end agree with ListShards");

    // Then both children.
    let mut child_records = Vec::new();
    for child in &listed_children {
        let shard = shards.iter().find(|s| &s.shard_id == child).expect("the child is listed");
        let (lo, hi) = (shard.starting_hash_key, shard.ending_hash_key);
        assert!(lo == start || lo == midpoint, "child {child} starts at an edge of the split: {lo}");
        assert!(hi == end || hi == midpoint - 1, "child {child} ends at an edge of the split: {hi}");
        let read = read_shard(&client, &stream, shard).await.expect("read a child");
        assert_eq!(read.end, ShardEnd::CaughtUp, "child {child} is open: it ends caught up");
        child_records.extend(read.records);
    }
    let child_data = data_of(&child_records);

    // Every record exactly once, on the side of the split it was put on.
    let parent_data = data_of(&parent_read.records);
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

    // The whole stream at once: the parent ordered before its children, and read_stream returns
    // the same records as the shard-by-shard reads, the parent's first.
    let ordered: Vec<String> =
        parents_first(shards.clone()).expect("no cycle").into_iter().map(|s| s.shard_id).collect();
    assert_eq!(ordered.first(), Some(&parent), "the parent comes before its children: {ordered:?}");
    let stream_records = read_stream(&client, &stream).await.expect("read the stream");
    let last_parent = stream_records.iter().rposition(|r| r.shard_id == parent);
    let first_child = stream_records.iter().position(|r| r.shard_id != parent);
    assert!(
        matches!((last_parent, first_child), (Some(p), Some(c)) if p < c),
        "read_stream returns every parent record before any child record"
    );
    let expected: Vec<ReadRecord> = parent_read.records.iter().chain(&child_records).cloned().collect();
    assert_eq!(stream_records, expected, "read_stream reads the parent, then the children in listed order");
}
