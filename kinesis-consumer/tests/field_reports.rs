//! Faults that field reports of other Kinesis consumers exposed, each a scenario on the embedded
//! emulators (ferrokinesis, dynoxide) with the right outcome:
//!
//! - **B.** A checkpoint that must be refused: a sequence number of another shard, anything after
//!   SHARD_END; the last record's position in `shard_ended` *is* SHARD_END (as in the KCL); a bad
//!   checkpoint already stored does not wedge the shard.
//! - **C.** A lease whose shard the stream no longer has (expired after the retention period) is
//!   ended, so its children start.
//! - **E.** The `Batches` stream: no checkpoint, SHARD_END included, passes a batch the
//!   application has not finished, whatever the order it finishes them in, or how it stops.
//! - **F.** A shard's end: by fan-out, only on the service's end signal; children start promptly
//!   when the answer to the SHARD_END write is lost, or when the shard sync after it is refused.
//! - **G.** A lease row deleted under a running worker comes back at once; a stream re-created
//!   under the same name is read from its start, not through the old stream's leases.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_kinesis::primitives::Blob;
use common::*;
use futures_util::StreamExt;
use kinesis_consumer::{
    Batch, Batches, CheckpointError, Checkpointer, FanOutConfig, Lease, LeaseTable, Position, Processor, Retrieval,
    Scheduler,
};
use kinesis_testkit::{DynamoDb, Fault, FaultProxy, Kinesis, Rule, TestBed, list_all_shards, read_shard, unique_name};

/// Puts `count` records routed to the shard holding `hash_key`; returns their data.
async fn put_at(
    client: &aws_sdk_kinesis::Client,
    stream: &str,
    hash_key: u128,
    prefix: &str,
    count: usize,
) -> Vec<String> {
    let mut sent = Vec::new();
    let mut request = client.put_records().stream_name(stream);
    for i in 0..count {
        let data = format!("{prefix}-{i}");
        request = request.records(
            aws_sdk_kinesis::types::PutRecordsRequestEntry::builder()
                .partition_key(format!("{prefix}-{i}"))
                .explicit_hash_key(hash_key.to_string())
                .data(Blob::new(data.clone()))
                .build()
                .unwrap(),
        );
        sent.push(data);
    }
    let out = request.send().await.expect("PutRecords");
    assert_eq!(out.failed_record_count().unwrap_or(0), 0);
    sent
}

const SHARD_0: &str = "shardId-000000000000";
const SHARD_1: &str = "shardId-000000000001";

/// Checkpoints after each batch; on shard 1, first tries to checkpoint at a sequence number
/// delivered on shard 0, and keeps what that returned.
struct CrossShard {
    shard: String,
    seen: Arc<Mutex<BTreeMap<String, Vec<String>>>>,
    data: Arc<Mutex<Vec<String>>>,
    tried: Arc<Mutex<Option<Result<(), CheckpointError>>>>,
}

impl Processor for CrossShard {
    async fn process_records(&mut self, batch: Batch, checkpointer: &mut Checkpointer) {
        self.data.lock().unwrap().extend(batch.records.iter().map(|r| String::from_utf8_lossy(&r.data).into_owned()));
        self.seen
            .lock()
            .unwrap()
            .entry(self.shard.clone())
            .or_default()
            .extend(batch.records.iter().map(|r| r.sequence_number.to_string()));
        if self.shard == SHARD_1 && self.tried.lock().unwrap().is_none() {
            let other = self.seen.lock().unwrap().get(SHARD_0).and_then(|s| s.first().cloned());
            if let Some(other) = other {
                let result = checkpointer.checkpoint_at(&other, 0).await;
                *self.tried.lock().unwrap() = Some(result);
            }
        }
        checkpointer.checkpoint().await.unwrap();
    }

    async fn shard_ended(&mut self, checkpointer: &mut Checkpointer) {
        checkpointer.checkpoint().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b_a_sequence_number_of_another_shard_is_refused_and_the_shard_goes_on() {
    let (bed, stream, table) = bed_and_stream(2).await;
    let client = bed.kinesis.client();
    let seen = Arc::new(Mutex::new(BTreeMap::new()));
    let data = Arc::new(Mutex::new(Vec::new()));
    let tried = Arc::new(Mutex::new(None));
    let factory = {
        let (seen, data, tried) = (seen.clone(), data.clone(), tried.clone());
        move |shard: &str| CrossShard {
            shard: shard.to_owned(),
            seen: seen.clone(),
            data: data.clone(),
            tried: tried.clone(),
        }
    };
    let worker =
        Scheduler::start(client.clone(), bed.dynamodb.client(), config(&stream, &table, "w"), factory).unwrap();
    put_at(&client, &stream, 1, "zero", 5).await;
    // Shard 1 gets its records once shard 0's are seen, so that its processor has one to misuse.
    assert!(eventually(Duration::from_secs(30), || seen.lock().unwrap().contains_key(SHARD_0)).await);
    put_at(&client, &stream, u128::MAX - 1, "one", 5).await;
    assert!(eventually(Duration::from_secs(30), || tried.lock().unwrap().is_some()).await);
    let result = tried.lock().unwrap().take().unwrap();
    assert!(matches!(result, Err(CheckpointError::InvalidPosition { .. })), "{result:?}");
    // The shard goes on: 5 more records arrive and are checkpointed.
    let more = put_at(&client, &stream, u128::MAX - 1, "more", 5).await;
    assert!(eventually(Duration::from_secs(30), || more.iter().all(|d| data.lock().unwrap().contains(d))).await);
    let leases = LeaseTable::new(bed.dynamodb.client(), &table).list().await.unwrap();
    let shard_1 = leases.iter().find(|l| l.key == SHARD_1).unwrap();
    let Position::Sequence(stored) = &shard_1.checkpoint.position else { panic!("{shard_1:?}") };
    assert!(seen.lock().unwrap()[SHARD_1].contains(stored), "shard 1's checkpoint is one of its own records");
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b_a_stored_checkpoint_kinesis_refuses_does_not_wedge_the_shard() {
    stored_foreign_checkpoint(false).await;
}

/// The same with enhanced fan-out: SubscribeToShard refuses the position the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b_a_stored_checkpoint_kinesis_refuses_does_not_wedge_a_fan_out_shard() {
    stored_foreign_checkpoint(true).await;
}

/// Polling, or fan-out.
fn retrieval(config: &mut kinesis_consumer::SchedulerConfig, fan_out: bool) {
    if fan_out {
        config.retrieval = Retrieval::FanOut(FanOutConfig::new(unique_name("efo")));
    }
}

async fn stored_foreign_checkpoint(fan_out: bool) {
    let (bed, stream, table) = bed_and_stream(2).await;
    let client = bed.kinesis.client();
    put_at(&client, &stream, 1, "zero", 3).await;
    let old = put_at(&client, &stream, u128::MAX - 1, "old", 3).await;
    let shards = list_all_shards(&client, &stream).await.unwrap();
    let zero = read_shard(&client, &stream, &shards[0]).await.unwrap();
    let foreign = zero.records[1].sequence_number.clone();
    // What an earlier version wrote for shard 1: a sequence number of shard 0.
    let leases = LeaseTable::new(bed.dynamodb.client(), &table);
    leases.create_if_missing(Duration::from_secs(30)).await.unwrap();
    for shard in shards {
        let position =
            if shard.shard_id == SHARD_1 { Position::Sequence(foreign.clone()) } else { Position::TrimHorizon };
        let mut lease = Lease::new(shard.shard_id.clone(), position);
        lease.hash_range =
            Some(kinesis_aggregation::HashKeyRange::new(shard.starting_hash_key, shard.ending_hash_key).unwrap());
        assert!(leases.create(&lease).await.unwrap());
    }
    let log = Log::default();
    let mut config = config(&stream, &table, "w");
    retrieval(&mut config, fan_out);
    let worker = start_worker(&bed, config, &log, Duration::ZERO);
    let new = put_at(&client, &stream, u128::MAX - 1, "new", 5).await;
    // Nothing of shard 1 is at or before the refused number (shard 0's numbers are lower), so all
    // of it is read from its start.
    all_received(&log, &[old, new].concat(), Duration::from_secs(30)).await;
    let metrics = worker.metrics();
    // GetShardIterator refuses the position on every server (Kinesis and ferrokinesis check the
    // shard a sequence number encodes). SubscribeToShard on ferrokinesis does not check it and
    // reads the shard anyway (Kinesis refuses it, and then the same fallback applies): with
    // fan-out, what this test asserts everywhere is that the shard is read, not wedged.
    if !fan_out {
        assert!(metrics.unusable_checkpoints >= 1, "{metrics:?}");
    }
    eprintln!(
        "B: a stored foreign checkpoint (fan-out: {fan_out}): {} unusable, 5 of 5 new records (and 3 old) processed",
        metrics.unusable_checkpoints
    );
    worker.shutdown().await.unwrap();
}

/// Tracks the last record; at the shard's end checkpoints it (the KCL stores SHARD_END for it),
/// then tries to move back.
struct EndsAtLastRecord {
    last: Option<(String, u64)>,
    first: Option<(String, u64)>,
    back: Arc<Mutex<Option<Result<(), CheckpointError>>>>,
    log: Log,
    shard: String,
}

impl Processor for EndsAtLastRecord {
    async fn process_records(&mut self, batch: Batch, _checkpointer: &mut Checkpointer) {
        for r in &batch.records {
            self.first.get_or_insert((r.sequence_number.to_string(), r.sub_sequence_number));
            self.last = Some((r.sequence_number.to_string(), r.sub_sequence_number));
        }
        let records = logged(&batch);
        let now = tokio::time::Instant::now();
        self.log.calls.lock().unwrap().push(Call {
            worker: "w".into(),
            shard: self.shard.clone(),
            start: now,
            end: now,
            records,
            checkpointed: true,
        });
    }

    async fn shard_ended(&mut self, checkpointer: &mut Checkpointer) {
        let (seq, sub) = self.last.clone().expect("records before the end");
        checkpointer.checkpoint_at(&seq, sub).await.expect("the last record's position is the shard's end");
        let (first, first_sub) = self.first.clone().unwrap();
        *self.back.lock().unwrap() = Some(checkpointer.checkpoint_at(&first, first_sub).await);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b_the_last_records_position_is_shard_end_and_shard_end_is_final() {
    let (bed, stream, table) = bed_and_stream(1).await;
    let client = bed.kinesis.client();
    let before = put_plain(&client, &stream, "p", 10).await;
    let parent = split_first_shard(&client, &stream).await;
    let after = put_plain(&client, &stream, "c", 20).await;
    let log = Log::default();
    let back = Arc::new(Mutex::new(None));
    let factory = {
        let (log, back) = (log.clone(), back.clone());
        move |shard: &str| EndsAtLastRecord {
            last: None,
            first: None,
            back: back.clone(),
            log: log.clone(),
            shard: shard.to_owned(),
        }
    };
    let worker =
        Scheduler::start(client.clone(), bed.dynamodb.client(), config(&stream, &table, "w"), factory).unwrap();
    // The children start: the parent's row is at SHARD_END.
    all_received(&log, &[before, after].concat(), Duration::from_secs(30)).await;
    let result = back.lock().unwrap().take().expect("shard_ended ran");
    assert!(matches!(result, Err(CheckpointError::InvalidPosition { .. })), "moving back from SHARD_END: {result:?}");
    let leases = LeaseTable::new(bed.dynamodb.client(), &table).list().await.unwrap();
    let row = leases.iter().find(|l| l.key == parent.shard_id).unwrap();
    assert_eq!(row.checkpoint.position, Position::ShardEnd, "SHARD_END stays: {row:?}");
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_a_parent_the_stream_no_longer_has_is_ended_so_its_child_is_read() {
    parent_gone(false).await;
}

/// The same with enhanced fan-out: SubscribeToShard answers ResourceNotFound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_a_parent_the_stream_no_longer_has_is_ended_with_fan_out_too() {
    parent_gone(true).await;
}

async fn parent_gone(fan_out: bool) {
    let (bed, stream, table) = bed_and_stream(1).await;
    let client = bed.kinesis.client();
    let gone = "shardId-000000000099";
    let leases = LeaseTable::new(bed.dynamodb.client(), &table);
    leases.create_if_missing(Duration::from_secs(30)).await.unwrap();
    // The parent was split long ago and expired from the stream before it was finished.
    assert!(leases.create(&Lease::new(gone, Position::TrimHorizon)).await.unwrap());
    let mut child = Lease::new(SHARD_0, Position::TrimHorizon);
    child.parent_shard_ids = vec![gone.to_owned()];
    assert!(leases.create(&child).await.unwrap());
    let sent = put_plain(&client, &stream, "c", 20).await;
    let log = Log::default();
    let started = tokio::time::Instant::now();
    let mut config = config(&stream, &table, "w");
    retrieval(&mut config, fan_out);
    let worker = start_worker(&bed, config, &log, Duration::ZERO);
    all_received(&log, &sent, Duration::from_secs(30)).await;
    eprintln!(
        "C: the child's {} records processed {:?} after start (parent gone from the stream)",
        sent.len(),
        started.elapsed()
    );
    let rows = leases.list().await.unwrap();
    // Finished (SHARD_END), or already cleaned up: its shard is gone and it has no children listed.
    let parent = rows.iter().find(|l| l.key == gone);
    assert!(parent.is_none_or(|l| l.checkpoint.position == Position::ShardEnd), "{parent:?}");
    worker.shutdown().await.unwrap();
}

/// The data of a batch.
fn data(batch: &Batch) -> Vec<String> {
    batch.records.iter().map(|r| String::from_utf8_lossy(&r.data).into_owned()).collect()
}

async fn next(batches: &mut Batches) -> kinesis_consumer::ShardBatch {
    tokio::time::timeout(Duration::from_secs(30), batches.next()).await.expect("a batch in time").expect("a batch")
}

async fn row(bed: &TestBed, table: &str, shard: &str) -> Lease {
    let leases = LeaseTable::new(bed.dynamodb.client(), table).list().await.unwrap();
    leases.into_iter().find(|l| l.key == shard).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e_shard_end_waits_for_a_held_batch_and_a_dropped_one_comes_again() {
    let (bed, stream, table) = bed_and_stream(1).await;
    let client = bed.kinesis.client();
    let sent = put_plain(&client, &stream, "p", 10).await;
    let parent = split_first_shard(&client, &stream).await;
    let mut config = config(&stream, &table, "first");
    config.max_batch_records = 5;
    let mut batches = Batches::start(client.clone(), bed.dynamodb.client(), config.clone(), 4).unwrap();
    let held = next(&mut batches).await;
    assert_eq!(held.batch.shard_id.as_ref(), parent.shard_id);
    let dropped = next(&mut batches).await;
    assert_eq!(data(&held.batch).len() + data(&dropped.batch).len(), 10);
    drop(dropped);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let parent_row = row(&bed, &table, &parent.shard_id).await;
    assert_ne!(parent_row.checkpoint.position, Position::ShardEnd, "SHARD_END passes the held batch: {parent_row:?}");
    // The process dies holding batch 1.
    drop(batches);
    drop(held);
    let mut again = Batches::start(
        client.clone(),
        bed.dynamodb.client(),
        {
            let mut c = config;
            c.worker_id = "second".into();
            c
        },
        4,
    )
    .unwrap();
    let mut got = Vec::new();
    while got.len() < 10 {
        let item = next(&mut again).await;
        if item.batch.shard_id.as_ref() == parent.shard_id {
            got.extend(data(&item.batch));
        }
        let mut checkpointer = item.checkpointer.clone();
        checkpointer.checkpoint().await.unwrap();
    }
    got.sort();
    let mut want = sent;
    want.sort();
    assert_eq!(got, want, "every record of the parent is delivered again");
    again.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e_unread_batches_at_shutdown_are_not_passed_by_shard_end() {
    let (bed, stream, table) = bed_and_stream(1).await;
    let client = bed.kinesis.client();
    let sent = put_plain(&client, &stream, "p", 15).await;
    let parent = split_first_shard(&client, &stream).await;
    let mut config = config(&stream, &table, "first");
    config.max_batch_records = 5;
    let batches = Batches::start(client.clone(), bed.dynamodb.client(), config.clone(), 8).unwrap();
    assert!(eventually(Duration::from_secs(30), || batches.scheduler().metrics().records_processed >= 15).await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    batches.shutdown().await.unwrap();
    let parent_row = row(&bed, &table, &parent.shard_id).await;
    assert_ne!(parent_row.checkpoint.position, Position::ShardEnd, "3 batches unread: {parent_row:?}");
    config.worker_id = "second".into();
    let mut again = Batches::start(client.clone(), bed.dynamodb.client(), config, 8).unwrap();
    let mut got = Vec::new();
    while got.len() < 15 {
        let mut item = next(&mut again).await;
        got.extend(data(&item.batch));
        item.checkpointer.checkpoint().await.unwrap();
    }
    got.sort();
    let mut want = sent;
    want.sort();
    assert_eq!(got, want);
    again.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e_batches_finished_out_of_order_checkpoint_only_over_the_finished_run() {
    let (bed, stream, table) = bed_and_stream(1).await;
    let client = bed.kinesis.client();
    put_plain(&client, &stream, "p", 15).await;
    let mut config = config(&stream, &table, "w");
    config.max_batch_records = 5;
    let mut batches = Batches::start(client.clone(), bed.dynamodb.client(), config, 8).unwrap();
    let mut first = next(&mut batches).await;
    let mut second = next(&mut batches).await;
    let third = next(&mut batches).await;
    let last_of = |item: &kinesis_consumer::ShardBatch| item.batch.records.last().unwrap().sequence_number.to_string();
    let (end_1, end_2) = (last_of(&first), last_of(&second));
    second.checkpointer.checkpoint().await.expect("finished; written once the first is");
    let r = row(&bed, &table, SHARD_0).await;
    assert_eq!(r.checkpoint.position, Position::TrimHorizon, "nothing passes the unfinished first batch");
    let at = third.batch.records[0].clone();
    let mut third_checkpointer = third.checkpointer.clone();
    let refused = third_checkpointer.checkpoint_record(&at).await;
    assert!(matches!(refused, Err(CheckpointError::InvalidPosition { .. })), "{refused:?}");
    first.checkpointer.checkpoint().await.unwrap();
    let r = row(&bed, &table, SHARD_0).await;
    assert_eq!(
        r.checkpoint.position,
        Position::Sequence(end_2.clone()),
        "both finished: over both (first ended at {end_1})"
    );
    third.finish();
    batches.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f_fan_out_reads_a_closed_shard_to_its_last_record() {
    let (bed, stream, table) = bed_and_stream(1).await;
    let client = bed.kinesis.client();
    let mut sent = Vec::new();
    for round in 0..24 {
        sent.extend(put_plain(&client, &stream, &format!("r{round}"), 500).await);
    }
    split_first_shard(&client, &stream).await;
    let log = Log::default();
    let mut config = config(&stream, &table, "w");
    config.retrieval = Retrieval::FanOut(FanOutConfig::new(unique_name("efo")));
    let worker = start_worker(&bed, config, &log, Duration::ZERO);
    all_received(&log, &sent, Duration::from_secs(60)).await;
    assert_eq!(sent.len(), 12_000);
    eprintln!("F: fan-out on a split shard: {} of 12000 records processed", log.received().len());
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f_children_start_promptly_when_the_shard_end_answer_is_lost_or_the_sync_is_refused() {
    for case in ["the answer to the SHARD_END write is lost", "the shard sync after the end is refused"] {
        let kinesis = Kinesis::start().await.unwrap();
        let dynamodb = DynamoDb::start().await.unwrap();
        let (kinesis_proxy, dynamodb_proxy) = (
            FaultProxy::start(kinesis.endpoint_url()).await.unwrap(),
            FaultProxy::start(dynamodb.endpoint_url()).await.unwrap(),
        );
        let stream = kinesis.create_stream(1).await.unwrap();
        let table = unique_name("leases");
        let client = kinesis.client();
        let before = put_plain(&client, &stream, "p", 20).await;
        let log = Log::default();
        let mut config = config(&stream, &table, "w");
        // Only a prompt sync makes the children's leases in time.
        config.shard_sync_interval = Duration::from_secs(120);
        let worker = start_worker_on(
            Kinesis::connect(kinesis_proxy.url()).client(),
            DynamoDb::connect(dynamodb_proxy.url()).client(),
            config,
            &log,
            Duration::ZERO,
        );
        all_received(&log, &before, Duration::from_secs(30)).await;
        let rule = if case.contains("lost") {
            dynamodb_proxy.add(Rule::new(Fault::DropResponse).on("UpdateItem").containing("SHARD_END").times(1))
        } else {
            kinesis_proxy.add(Rule::new(Fault::internal_error()).on("ListShards").times(4))
        };
        split_first_shard(&client, &stream).await;
        let after = put_plain(&client, &stream, "c", 20).await;
        let started = tokio::time::Instant::now();
        all_received(&log, &after, Duration::from_secs(30)).await;
        assert!(rule.fired() >= 1, "{case}: the fault happened");
        eprintln!("F: {case}: children's 20 records processed {:?} after the split", started.elapsed());
        assert!(started.elapsed() < Duration::from_secs(20), "{case}: children started after {:?}", started.elapsed());
        worker.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn g_a_lease_row_deleted_under_a_running_worker_comes_back_at_once() {
    let (bed, stream, table) = bed_and_stream(1).await;
    let client = bed.kinesis.client();
    let log = Log::default();
    let mut config = config(&stream, &table, "w");
    config.shard_sync_interval = Duration::from_secs(120);
    let worker = start_worker(&bed, config, &log, Duration::ZERO);
    let first = put_plain(&client, &stream, "a", 5).await;
    all_received(&log, &first, Duration::from_secs(30)).await;
    let leases = LeaseTable::new(bed.dynamodb.client(), &table);
    let lease = leases.get(SHARD_0).await.unwrap().unwrap();
    assert!(
        leases.delete(&lease).await.unwrap()
            || leases.delete(&leases.get(SHARD_0).await.unwrap().unwrap()).await.unwrap()
    );
    let started = tokio::time::Instant::now();
    // The worker finds out at its next write (the checkpoint after these, or a renewal).
    let second = put_plain(&client, &stream, "b", 5).await;
    all_received(&log, &second, Duration::from_secs(30)).await;
    let mut back = false;
    for _ in 0..100 {
        if leases.get(SHARD_0).await.unwrap().is_some() {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(back, "the row is not back after {:?}", started.elapsed());
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "back after {:?} (the periodic sync is 120 s)",
        started.elapsed()
    );
    eprintln!("G: a deleted lease row back {:?} after the deletion", started.elapsed());
    // Taken again and read on.
    let third = put_plain(&client, &stream, "c", 5).await;
    all_received(&log, &third, Duration::from_secs(30)).await;
    assert!(worker.metrics().leases_taken >= 2, "{:?}", worker.metrics());
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn g_a_stream_re_created_under_the_same_name_is_read_from_its_start() {
    let (bed, stream, table) = bed_and_stream(2).await;
    let client = bed.kinesis.client();
    let log = Log::default();
    let worker = start_worker(&bed, config(&stream, &table, "w"), &log, Duration::ZERO);
    let old = put_plain(&client, &stream, "old", 40).await;
    all_received(&log, &old, Duration::from_secs(30)).await;
    // 3 shards now: shard ids 0 and 1 name other hash ranges.
    kinesis_testkit::recreate_stream(&client, &stream, 3).await.unwrap();
    let new = put_plain(&client, &stream, "new", 60).await;
    all_received(&log, &new, Duration::from_secs(45)).await;
    assert!(worker.metrics().stale_leases_replaced >= 2, "{:?}", worker.metrics());
    eprintln!(
        "A (consumer): re-created stream: {} stale leases replaced, {} of 60 new records processed",
        worker.metrics().stale_leases_replaced,
        new.iter().filter(|d| log.received().contains_key(*d)).count()
    );
    worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn g_a_latest_start_is_durable_so_a_failover_re_delivers_instead_of_skipping() {
    let (bed, stream, table) = bed_and_stream(1).await;
    let client = bed.kinesis.client();
    let old = put_plain(&client, &stream, "old", 30).await;
    let mut config = config(&stream, &table, "first");
    config.initial_position = kinesis_consumer::InitialPosition::Latest;
    let log = Log::default();
    let first = start_worker(&bed, config.clone(), &log, Duration::ZERO);
    let leases = LeaseTable::new(bed.dynamodb.client(), &table);
    // The start is written before anything is processed: after the newest record, a sequence
    // number any KCL reads as "resume after it".
    let mut durable = None;
    for _ in 0..100 {
        // (The table may not exist yet.)
        if let Ok(Some(lease)) = leases.get(SHARD_0).await
            && let Position::Sequence(seq) = &lease.checkpoint.position
        {
            durable = Some(seq.clone());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let durable = durable.expect("the LATEST start was made durable");
    let newest_old =
        kinesis_testkit::read_stream(&client, &stream).await.unwrap().last().unwrap().sequence_number.clone();
    assert_eq!(durable, newest_old, "the start is right after the newest record");
    // The worker dies before any record comes; records are written while nobody reads.
    first.abort();
    let new = put_plain(&client, &stream, "new", 20).await;
    config.worker_id = "second".into();
    let second = start_worker(&bed, config, &log, Duration::ZERO);
    all_received(&log, &new, Duration::from_secs(30)).await;
    let received = log.received();
    assert!(old.iter().all(|d| !received.contains_key(d)), "nothing from before the start");
    second.shutdown().await.unwrap();
}
