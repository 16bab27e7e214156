//! A split and a merge in the middle of consumption, on ferrokinesis and on kinesis-local (which
//! closes parents with ChildShards, as AWS does): every record arrives, and every parent shard is
//! processed to its end before any of its children starts.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use kinesis_testkit::{DynamoDb, Kinesis, KinesisLocal, list_all_shards, unique_name, wait_until_stream_active};

async fn reshard_in_the_middle_of_consumption(
    kinesis: aws_sdk_kinesis::Client,
    dynamodb: DynamoDb,
    stream: &str,
    per_phase: usize,
) {
    let table = unique_name("leases");
    let log = Log::default();
    let workers: Vec<_> = ["r1", "r2"]
        .iter()
        .map(|w| start_worker_on(kinesis.clone(), dynamodb.client(), config(stream, &table, w), &log, Duration::ZERO))
        .collect();
    let mut sent = put_plain(&kinesis, stream, "before", per_phase).await;

    // Split the first shard in the middle of its range.
    let shards = list_all_shards(&kinesis, stream).await.unwrap();
    let first = &shards[0];
    let middle = first.starting_hash_key + (first.ending_hash_key - first.starting_hash_key) / 2;
    kinesis
        .split_shard()
        .stream_name(stream)
        .shard_to_split(&first.shard_id)
        .new_starting_hash_key((middle + 1).to_string())
        .send()
        .await
        .expect("SplitShard");
    wait_until_stream_active(&kinesis, stream).await.unwrap();
    sent.extend(put_plain(&kinesis, stream, "split", per_phase).await);

    // Merge the upper child with the second original shard (adjacent ranges).
    let shards = list_all_shards(&kinesis, stream).await.unwrap();
    let open: Vec<_> = shards.iter().filter(|s| !s.closed).collect();
    let upper_child = open.iter().find(|s| s.starting_hash_key == middle + 1).expect("the upper child");
    let second = open.iter().find(|s| s.starting_hash_key == first.ending_hash_key + 1).expect("the second shard");
    kinesis
        .merge_shards()
        .stream_name(stream)
        .shard_to_merge(&upper_child.shard_id)
        .adjacent_shard_to_merge(&second.shard_id)
        .send()
        .await
        .expect("MergeShards");
    wait_until_stream_active(&kinesis, stream).await.unwrap();
    sent.extend(put_plain(&kinesis, stream, "merged", per_phase).await);

    let all = eventually(Duration::from_secs(90), || {
        let received = log.received();
        sent.iter().all(|d| received.contains_key(d))
    })
    .await;
    if !all {
        assert_all_received(&log, &sent);
    }

    // Parents before children: every call on a parent ends before any call on a child starts.
    let shards = list_all_shards(&kinesis, stream).await.unwrap();
    let calls = log.calls();
    let mut first_start = BTreeMap::new();
    let mut last_end = BTreeMap::new();
    for call in &calls {
        first_start.entry(call.shard.clone()).and_modify(|t| *t = call.start.min(*t)).or_insert(call.start);
        last_end.entry(call.shard.clone()).and_modify(|t| *t = call.end.max(*t)).or_insert(call.end);
    }
    let ended: BTreeMap<String, tokio::time::Instant> =
        log.ended.lock().unwrap().iter().map(|(_, s, t)| (s.clone(), *t)).collect();
    let mut lineages = 0;
    for shard in &shards {
        for parent in shard.parents() {
            let Some(child_start) = first_start.get(&shard.shard_id) else { continue };
            let parent_end = ended
                .get(parent)
                .unwrap_or_else(|| panic!("parent {parent} of {} never reached SHARD_END", shard.shard_id));
            assert!(parent_end <= child_start, "child {} started before its parent {parent} ended", shard.shard_id);
            if let Some(end) = last_end.get(parent) {
                assert!(end <= child_start, "a call on {parent} overlaps {}", shard.shard_id);
            }
            lineages += 1;
        }
    }
    assert!(lineages >= 4, "two children of the split and two parents of the merge were processed: {lineages}");
    log.assert_exclusive();

    // Cleanup: once the children checkpointed, the finished parents' leases are deleted, oldest
    // first, and not created again; the open shards keep theirs.
    let leases = kinesis_consumer::LeaseTable::new(dynamodb.client(), &table);
    let open: std::collections::BTreeSet<String> =
        shards.iter().filter(|s| !s.closed).map(|s| s.shard_id.clone()).collect();
    let mut left: Vec<String>;
    let cleaned = {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            left = leases.list().await.unwrap().into_iter().map(|l| l.key).collect();
            if left.iter().cloned().collect::<std::collections::BTreeSet<_>>() == open {
                break true;
            }
            if tokio::time::Instant::now() > deadline {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    assert!(cleaned, "only the open shards' leases are left: {left:?}, open {open:?}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(leases.list().await.unwrap().len(), open.len(), "finished leases are not created again");
    for w in workers {
        w.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_and_merge_keep_parents_before_children_on_ferrokinesis() {
    let kinesis = Kinesis::start().await.expect("start Kinesis (embedded ferrokinesis)");
    let dynamodb = DynamoDb::start().await.expect("start DynamoDB (embedded dynoxide)");
    let stream = kinesis.create_stream(2).await.unwrap();
    reshard_in_the_middle_of_consumption(kinesis.client(), dynamodb, &stream, 3000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_and_merge_keep_parents_before_children_on_kinesis_local() {
    let local = KinesisLocal::start()
        .await
        .expect("kinesis-local must be available for this test (scripts/install-kinesis-local)");
    let dynamodb = DynamoDb::start().await.expect("start DynamoDB (embedded dynoxide)");
    let stream = local.create_stream(2).await.unwrap();
    reshard_in_the_middle_of_consumption(local.client(), dynamodb, &stream, 1000).await;
}
