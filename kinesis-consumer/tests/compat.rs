//! Data and tables made by others: plain records, this crate's aggregates and the KPL reference
//! vectors read as raw Kinesis records; a restart from a checkpoint in the middle of an aggregate;
//! and the lease table in the KCL 2.x schema, written by us and pre-filled as the KCL leaves it.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_dynamodb::types::AttributeValue;
use aws_sdk_kinesis::primitives::Blob;
use base64::Engine as _;
use bytes::Bytes;
use common::*;
use kinesis_aggregation::{Aggregator, UserRecord};
use kinesis_consumer::{Batch, Checkpointer, LeaseTable, Position, Processor, Record, Scheduler};
use kinesis_testkit::{TestBed, unique_name};
use serde_json::Value;

fn vectors_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("KPL_VECTORS_DIR") {
        return PathBuf::from(dir);
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/vectors/kpl-aggregation");
    assert!(
        dir.is_dir(),
        "the KPL test vectors are missing: expected {} (the `shared/` folder beside this repository), \
         or set KPL_VECTORS_DIR",
        dir.display()
    );
    dir
}

/// Keeps every record it is given; checkpoints each batch.
#[derive(Clone, Default)]
struct Collect(Arc<Mutex<Vec<Record>>>);

impl Processor for Collect {
    async fn process_records(&mut self, batch: Batch, checkpointer: &mut Checkpointer) {
        self.0.lock().unwrap().extend(batch.records);
        checkpointer.checkpoint().await.unwrap();
    }

    async fn shard_ended(&mut self, checkpointer: &mut Checkpointer) {
        checkpointer.checkpoint().await.unwrap();
    }
}

/// (partition key, explicit hash key, data, sub-sequence number, aggregated)
type Expected = (String, Option<String>, Vec<u8>, u64, bool);

async fn put_raw(client: &aws_sdk_kinesis::Client, stream: &str, key: &str, data: Vec<u8>) -> String {
    client
        .put_record()
        .stream_name(stream)
        .partition_key(key)
        .data(Blob::new(data))
        .send()
        .await
        .expect("PutRecord")
        .sequence_number
}

fn read_json(path: PathBuf) -> Value {
    serde_json::from_slice(&std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

fn b64(text: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD.decode(text).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_records_our_aggregates_and_kpl_vectors_arrive_once_each() {
    let bed = TestBed::start().await.expect("start the emulators");
    let stream = bed.kinesis.create_stream(1).await.unwrap();
    let client = bed.kinesis.client();
    // (sequence number of the Kinesis record, what it must yield)
    let mut expected: Vec<(String, Vec<Expected>)> = Vec::new();

    let seq = put_raw(&client, &stream, "plain-key", b"plain one".to_vec()).await;
    expected.push((seq, vec![("plain-key".into(), None, b"plain one".to_vec(), 0, false)]));

    let mut aggregator = Aggregator::new();
    let mut ours = Vec::new();
    for i in 0..25u64 {
        let record = UserRecord::new(format!("ours-{i}"), Bytes::from(format!("our record {i}")));
        assert!(aggregator.try_push_ref(&record).unwrap());
        ours.push((format!("ours-{i}"), None, format!("our record {i}").into_bytes(), i, true));
    }
    let aggregate = aggregator.finish().unwrap();
    let seq = put_raw(&client, &stream, &aggregate.partition_key, aggregate.data.to_vec()).await;
    expected.push((seq, ours));

    let mut cases = 0;
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(vectors_dir()).unwrap().map(|e| e.unwrap().path()).collect();
    dirs.sort();
    for dir in dirs.into_iter().filter(|d| d.is_dir()) {
        let case = dir.file_name().unwrap().to_string_lossy().into_owned();
        let input = read_json(dir.join("input.json"));
        let outer_key = input["outer_record"]["partition_key"].as_str().unwrap().to_owned();
        let data = std::fs::read(dir.join("aggregated.bin")).unwrap();
        if data.len() + outer_key.len() > 1024 * 1024 {
            // g2: exactly 1 MiB of aggregate, which Kinesis takes only with no partition key.
            continue;
        }
        let want: Vec<Expected> = if case.starts_with("i4") {
            // The references drop the sub-records after a bad key index; handed over whole here.
            vec![(outer_key.clone(), None, data.clone(), 0, false)]
        } else {
            read_json(dir.join("expected_deagg_kcl.json"))
                .as_array()
                .unwrap()
                .iter()
                .map(|r| {
                    (
                        r["partition_key"].as_str().unwrap().to_owned(),
                        r["explicit_hash_key"].as_str().map(str::to_owned),
                        b64(r["data_b64"].as_str().unwrap()),
                        r["sub_sequence_number"].as_u64().unwrap_or(0),
                        r["aggregated"].as_bool().unwrap(),
                    )
                })
                .collect()
        };
        let seq = put_raw(&client, &stream, &outer_key, data).await;
        expected.push((seq, want));
        cases += 1;
    }
    assert!(cases >= 15, "the vectors were read: {cases}");
    // The producer's opt-in compressed form: F3 89 9A C3 + zlib of an aggregate, and of a plain record.
    let mut aggregator = Aggregator::new();
    let mut squeezed = Vec::new();
    for i in 0..10u64 {
        let record = UserRecord::new(format!("zip-{i}"), Bytes::from(format!("compressed {i}")));
        assert!(aggregator.try_push_ref(&record).unwrap());
        squeezed.push((format!("zip-{i}"), None, format!("compressed {i}").into_bytes(), i, true));
    }
    let aggregate = aggregator.finish().unwrap();
    let compressed = kinesis_aggregation::compression::compress(&aggregate.data);
    let seq = put_raw(&client, &stream, &aggregate.partition_key, compressed.to_vec()).await;
    expected.push((seq, squeezed));
    let compressed = kinesis_aggregation::compression::compress(b"a compressed plain record");
    let seq = put_raw(&client, &stream, "zip-plain", compressed.to_vec()).await;
    expected.push((seq, vec![("zip-plain".into(), None, b"a compressed plain record".to_vec(), 0, false)]));

    let seq = put_raw(&client, &stream, "plain-key", b"plain two".to_vec()).await;
    expected.push((seq, vec![("plain-key".into(), None, b"plain two".to_vec(), 0, false)]));

    let collect = Collect::default();
    let table = unique_name("leases");
    let worker = {
        let collect = collect.clone();
        Scheduler::start(bed.kinesis.client(), bed.dynamodb.client(), config(&stream, &table, "m"), move |_: &str| {
            collect.clone()
        })
        .unwrap()
    };
    let total: usize = expected.iter().map(|(_, w)| w.len()).sum();
    assert!(
        eventually(Duration::from_secs(60), || collect.0.lock().unwrap().len() >= total).await,
        "{} of {total} user records arrived",
        collect.0.lock().unwrap().len()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got = collect.0.lock().unwrap().clone();
    assert_eq!(got.len(), total, "every sub-record once, no more");
    let mut by_seq: HashMap<&str, Vec<Expected>> = HashMap::new();
    for r in &got {
        by_seq.entry(&r.sequence_number).or_default().push((
            r.partition_key.clone(),
            r.explicit_hash_key.clone(),
            r.data.to_vec(),
            r.sub_sequence_number,
            r.aggregated,
        ));
    }
    for (seq, want) in &expected {
        assert_eq!(by_seq.get(seq.as_str()), Some(want), "the user records of Kinesis record {seq}");
    }
    worker.shutdown().await.unwrap();
}

/// Checkpoints after the sub-record with sub-sequence number `at` of the first aggregate.
struct CheckpointMidAggregate {
    at: u64,
    seen: Arc<Mutex<Vec<Record>>>,
}

impl Processor for CheckpointMidAggregate {
    async fn process_records(&mut self, batch: Batch, checkpointer: &mut Checkpointer) {
        if let Some(record) = batch.records.iter().find(|r| r.aggregated && r.sub_sequence_number == self.at) {
            checkpointer.checkpoint_record(record).await.unwrap();
        }
        self.seen.lock().unwrap().extend(batch.records);
    }

    async fn shard_ended(&mut self, checkpointer: &mut Checkpointer) {
        checkpointer.checkpoint().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_resumes_after_the_checkpointed_sub_record() {
    let bed = TestBed::start().await.expect("start the emulators");
    let stream = bed.kinesis.create_stream(1).await.unwrap();
    let client = bed.kinesis.client();
    let mut aggregator = Aggregator::new();
    for i in 0..10 {
        assert!(aggregator.try_push_ref(&UserRecord::new(format!("k{i}"), Bytes::from(format!("sub {i}")))).unwrap());
    }
    let aggregate = aggregator.finish().unwrap();
    let agg_seq = put_raw(&client, &stream, &aggregate.partition_key, aggregate.data.to_vec()).await;
    let plain_seq = put_raw(&client, &stream, "p", b"after".to_vec()).await;

    let table = unique_name("leases");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let first = {
        let seen = seen.clone();
        Scheduler::start(
            bed.kinesis.client(),
            bed.dynamodb.client(),
            config(&stream, &table, "first"),
            move |_: &str| CheckpointMidAggregate { at: 4, seen: seen.clone() },
        )
        .unwrap()
    };
    assert!(eventually(Duration::from_secs(60), || seen.lock().unwrap().len() == 11).await);
    first.shutdown().await.unwrap();
    let leases = LeaseTable::new(bed.dynamodb.client(), table.clone()).list().await.unwrap();
    assert_eq!(leases[0].checkpoint.position, Position::Sequence(agg_seq.clone()));
    assert_eq!(leases[0].checkpoint.sub_sequence, 4);

    // A new worker resumes after sub-record 4.
    let log = Log::default();
    let second = start_worker(&bed, config(&stream, &table, "second"), &log, Duration::ZERO);
    assert!(eventually(Duration::from_secs(60), || log.received().len() == 6).await, "{:?}", log.received());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got: Vec<(String, u64)> = log.calls().into_iter().flat_map(|c| c.records).map(|(s, u, _)| (s, u)).collect();
    let mut want: Vec<(String, u64)> = (5..10).map(|u| (agg_seq.clone(), u)).collect();
    want.push((plain_seq, 0));
    assert_eq!(got, want);
    second.shutdown().await.unwrap();
}

async fn scan(client: &aws_sdk_dynamodb::Client, table: &str) -> Vec<HashMap<String, AttributeValue>> {
    client.scan().table_name(table).consistent_read(true).send().await.unwrap().items.unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lease_table_is_the_kcl_table_both_ways() {
    let bed = TestBed::start().await.expect("start the emulators");
    let stream = bed.kinesis.create_stream(2).await.unwrap();
    let client = bed.kinesis.client();
    let dynamodb = bed.dynamodb.client();
    let sent = put_plain(&client, &stream, "kcl", 200).await;
    let shards = kinesis_testkit::list_all_shards(&client, &stream).await.unwrap();
    let records = kinesis_testkit::read_stream(&client, &stream).await.unwrap();

    // The table as a KCL 2.x application leaves it: shard 0 held by a KCL worker that is gone,
    // shard 1 free and checkpointed at its 50th record; and a row that is not a lease.
    let table = unique_name("kcl-app");
    LeaseTable::new(dynamodb.clone(), table.clone()).create_if_missing(Duration::from_secs(30)).await.unwrap();
    let s = |v: &str| AttributeValue::S(v.to_owned());
    let n = |v: u64| AttributeValue::N(v.to_string());
    let of_shard1: Vec<_> = records.iter().filter(|r| r.shard_id == shards[1].shard_id).collect();
    let checkpoint = of_shard1[49].sequence_number.clone();
    for (shard, owner, counter, cp) in
        [(&shards[0], Some("kcl-worker-gone"), 7, "TRIM_HORIZON".to_owned()), (&shards[1], None, 3, checkpoint.clone())]
    {
        let mut put = dynamodb
            .put_item()
            .table_name(&table)
            .item("leaseKey", s(&shard.shard_id))
            .item("leaseCounter", n(counter))
            .item("checkpoint", s(&cp))
            .item("checkpointSubSequenceNumber", n(0))
            .item("ownerSwitchesSinceCheckpoint", n(0))
            .item("startingHashKey", s(&shard.starting_hash_key.to_string()))
            .item("endingHashKey", s(&shard.ending_hash_key.to_string()));
        if let Some(owner) = owner {
            put = put.item("leaseOwner", s(owner));
        }
        put.send().await.unwrap();
    }
    let other_row: HashMap<String, AttributeValue> = [
        ("leaseKey".to_owned(), s("WorkerMetricStats#kcl-worker-gone")),
        ("entityType".to_owned(), s("WORKER_METRICS")),
        ("leaseOwner".to_owned(), s("kcl-worker-gone")),
        ("leaseCounter".to_owned(), n(1)),
    ]
    .into_iter()
    .collect();
    dynamodb.put_item().table_name(&table).set_item(Some(other_row.clone())).send().await.unwrap();

    let log = Log::default();
    let worker = start_worker(&bed, config(&stream, &table, "rust"), &log, Duration::ZERO);
    let expected: Vec<&String> = sent
        .iter()
        .filter(|d| {
            let r = records.iter().find(|r| String::from_utf8_lossy(&r.data) == **d).unwrap();
            r.shard_id == shards[0].shard_id
                || kinesis_consumer::cmp_sequence_numbers(&r.sequence_number, &checkpoint).is_gt()
        })
        .collect();
    assert_eq!(expected.len(), 200 - 50);
    assert!(
        eventually(Duration::from_secs(60), || log.received().len() >= expected.len()).await,
        "the dead KCL worker's lease was taken and the checkpoint honoured: {} of {}",
        log.received().len(),
        expected.len()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let received = log.received();
    assert_eq!(received.len(), expected.len(), "nothing at or before shard 1's checkpoint");
    assert!(expected.iter().all(|d| received.get(*d) == Some(&1)));
    worker.shutdown().await.unwrap();

    // After the run: the non-lease row untouched; every lease row in the KCL's names and types.
    let items = scan(&dynamodb, &table).await;
    assert_eq!(items.len(), 3);
    assert!(items.contains(&other_row), "the non-LEASE row is left alone");
    for item in items.iter().filter(|i| common::is_lease_row(i)) {
        for (name, value) in item {
            let kcl = KCL_ATTRIBUTES.iter().find(|(n, _)| n == name);
            assert_eq!(kcl.map(|(_, t)| *t), Some(type_of(value)), "attribute {name} of {item:?}");
        }
        for required in
            ["leaseKey", "leaseCounter", "checkpoint", "checkpointSubSequenceNumber", "ownerSwitchesSinceCheckpoint"]
        {
            assert!(item.contains_key(required), "{required} missing from {item:?}");
        }
        assert!(!item.contains_key("leaseOwner"), "released at shutdown: {item:?}");
    }

    // A table this crate creates has the same shape.
    let ours = unique_name("ours");
    let log = Log::default();
    let mut settings = config(&stream, &ours, "rust");
    settings.lease_management = kinesis_consumer::LeaseManagement::Kcl3;
    let worker = start_worker(&bed, settings, &log, Duration::ZERO);
    assert!(eventually(Duration::from_secs(60), || log.received().len() >= 200).await);
    worker.shutdown().await.unwrap();
    let items = scan(&dynamodb, &ours).await;
    // A new table in KCL 3.x lease management: its Migration3.0 row as a new KCL 3.x application writes
    // it; after a graceful shutdown no leader lock and no worker-metrics row are left.
    let (leases, others): (Vec<_>, Vec<_>) = items.into_iter().partition(common::is_lease_row);
    assert_eq!(leases.len(), 2);
    assert_eq!(others.len(), 1, "{others:?}");
    let migration = &others[0];
    assert_eq!(migration["leaseKey"].as_s().unwrap(), "Migration3.0");
    assert_eq!(migration["cv"].as_s().unwrap(), "CLIENT_VERSION_3X");
    assert_eq!(migration["entityType"].as_s().unwrap(), "CLIENT_VERSION_MIGRATION");
    for item in &leases {
        for (name, value) in item {
            let kcl = KCL_ATTRIBUTES.iter().find(|(n, _)| n == name);
            assert_eq!(kcl.map(|(_, t)| *t), Some(type_of(value)), "attribute {name} of {item:?}");
        }
        for required in [
            "leaseKey",
            "leaseCounter",
            "checkpoint",
            "checkpointSubSequenceNumber",
            "ownerSwitchesSinceCheckpoint",
            "startingHashKey",
            "endingHashKey",
        ] {
            assert!(item.contains_key(required), "{required} missing from {item:?}");
        }
        assert!(common::is_lease_row(item) && item.contains_key("entityType"), "KCL 3.5 marks leases: {item:?}");
    }
}
