//! The processor's side: Lambda-style batching, the Stream adapter, SHARD_END enforced, and a
//! checkpointer that cannot write once its lease is lost.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use kinesis_consumer::{Batch, Batches, CheckpointError, Checkpointer, LeaseTable, Position, Processor, Scheduler};
use kinesis_testkit::{TestBed, unique_name};
use tokio::time::Instant;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_hold_at_most_n_records_or_what_arrived_within_the_window() {
    let (bed, stream, table) = bed_and_stream(1).await;
    let sent = put_plain(&bed.kinesis.client(), &stream, "n", 100).await;

    // At most 7 records a call.
    let log = Log::default();
    let mut small = config(&stream, &table, "small");
    small.max_batch_records = 7;
    let worker = start_worker(&bed, small, &log, Duration::ZERO);
    assert!(eventually(Duration::from_secs(60), || log.received().len() == 100).await);
    worker.shutdown().await.unwrap();
    let sizes: Vec<usize> = log.calls().iter().map(|c| c.records.len()).collect();
    assert!(sizes.iter().all(|n| *n <= 7), "{sizes:?}");
    assert_eq!(sizes.iter().sum::<usize>(), 100);
    assert_eq!(sizes.iter().filter(|n| **n == 7).count(), 14, "full batches while records wait: {sizes:?}");
    assert_all_received(&log, &sent);

    // A trickle of one record every 100 ms, gathered for up to 1 s: batches of several pages.
    let (bed2, stream2, table2) = bed_and_stream(1).await;
    let log = Log::default();
    let mut config = config(&stream2, &table2, "window");
    config.max_batch_wait = Duration::from_secs(1);
    config.polling.idle_time_between_reads = Duration::from_millis(20);
    config.polling.min_time_between_reads = Duration::from_millis(20);
    let worker = start_worker(&bed2, config, &log, Duration::ZERO);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let client = bed2.kinesis.client();
    let mut sent = Vec::new();
    for i in 0..30 {
        sent.extend(put_plain(&client, &stream2, &format!("t{i}"), 1).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(eventually(Duration::from_secs(30), || log.received().len() == 30).await);
    worker.shutdown().await.unwrap();
    let sizes: Vec<usize> = log.calls().iter().map(|c| c.records.len()).collect();
    assert!(sizes.len() <= 6, "3 s of records in batches gathered for 1 s: {sizes:?}");
    assert!(sizes.iter().any(|n| *n >= 5), "{sizes:?}");
    assert_all_received(&log, &sent);
    drop(bed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_adapter_yields_every_batch_with_its_checkpointer() {
    let (bed, stream, table) = bed_and_stream(2).await;
    let sent = put_plain(&bed.kinesis.client(), &stream, "s", 300).await;
    let mut batches =
        Batches::start(bed.kinesis.client(), bed.dynamodb.client(), config(&stream, &table, "st"), 4).unwrap();
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while got.len() < sent.len() && Instant::now() < deadline {
        let Ok(Some(mut item)) = tokio::time::timeout(Duration::from_secs(5), batches.next()).await else { continue };
        got.extend(item.batch.records.iter().map(|r| String::from_utf8_lossy(&r.data).into_owned()));
        item.checkpointer.checkpoint().await.unwrap();
    }
    batches.shutdown().await.unwrap();
    got.sort();
    let mut want = sent.clone();
    want.sort();
    assert_eq!(got, want);
    let leases = LeaseTable::new(bed.dynamodb.client(), table).list().await.unwrap();
    assert!(leases.iter().all(|l| matches!(l.checkpoint.position, Position::Sequence(_))), "checkpointed: {leases:?}");
}

/// Never checkpoints SHARD_END.
struct Forgetful {
    seen: Arc<Mutex<Vec<String>>>,
    shard: String,
}

impl Processor for Forgetful {
    async fn process_records(&mut self, batch: Batch, checkpointer: &mut Checkpointer) {
        self.seen.lock().unwrap().extend(batch.records.iter().map(|_| self.shard.clone()));
        checkpointer.checkpoint().await.unwrap();
    }

    async fn shard_ended(&mut self, _checkpointer: &mut Checkpointer) {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_processor_that_does_not_checkpoint_shard_end_holds_the_children_back_and_is_told() {
    let (bed, stream, table) = bed_and_stream(1).await;
    let client = bed.kinesis.client();
    put_plain(&client, &stream, "p", 20).await;
    let parent = split_first_shard(&client, &stream).await;
    put_plain(&client, &stream, "c", 20).await;

    let seen = Arc::new(Mutex::new(Vec::new()));
    let worker = {
        let seen = seen.clone();
        Scheduler::start(client.clone(), bed.dynamodb.client(), config(&stream, &table, "f"), move |shard: &str| {
            Forgetful { seen: seen.clone(), shard: shard.to_owned() }
        })
        .unwrap()
    };
    assert!(
        eventually(Duration::from_secs(30), || worker.metrics().shard_end_not_checkpointed >= 1).await,
        "the missing SHARD_END is reported"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 20, "the parent's records only: the children wait for SHARD_END");
    assert!(seen.iter().all(|s| *s == parent.shard_id));
    let leases = LeaseTable::new(bed.dynamodb.client(), table).list().await.unwrap();
    let parent_lease = leases.iter().find(|l| l.key == parent.shard_id).unwrap();
    assert_ne!(parent_lease.checkpoint.position, Position::ShardEnd);
    worker.shutdown().await.unwrap();
}

/// Keeps a clone of its checkpointer, to try it after the lease is gone.
struct Keeper {
    kept: Arc<Mutex<Option<Checkpointer>>>,
}

impl Processor for Keeper {
    async fn process_records(&mut self, batch: Batch, checkpointer: &mut Checkpointer) {
        let _ = batch;
        *self.kept.lock().unwrap() = Some(checkpointer.clone());
    }

    async fn shard_ended(&mut self, checkpointer: &mut Checkpointer) {
        checkpointer.checkpoint().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_lease_cannot_be_checkpointed_and_the_new_owners_progress_stands() {
    let (bed, stream, table) = bed_and_stream(1).await;
    put_plain(&bed.kinesis.client(), &stream, "l", 10).await;
    let kept = Arc::new(Mutex::new(None));
    let old = {
        let kept = kept.clone();
        Scheduler::start(bed.kinesis.client(), bed.dynamodb.client(), config(&stream, &table, "old"), move |_: &str| {
            Keeper { kept: kept.clone() }
        })
        .unwrap()
    };
    assert!(eventually(Duration::from_secs(30), || kept.lock().unwrap().is_some()).await);
    // The old worker stops renewing (as if partitioned); its processor's checkpointer lives on.
    old.abort();
    let log = Log::default();
    let new = start_worker(&bed, config(&stream, &table, "new"), &log, Duration::ZERO);
    assert!(eventually(Duration::from_secs(30), || log.received().len() == 10).await, "the new owner took over");
    let leases = LeaseTable::new(bed.dynamodb.client(), table.clone());
    let before = leases.list().await.unwrap().remove(0);
    assert_eq!(before.owner.as_deref(), Some("new"));

    let mut stale = kept.lock().unwrap().take().unwrap();
    let error = stale.checkpoint().await.unwrap_err();
    assert!(matches!(error, CheckpointError::LeaseLost { .. }), "{error}");
    assert!(error.is_lease_lost());
    let after = leases.list().await.unwrap().remove(0);
    assert_eq!(after.checkpoint, before.checkpoint, "the new owner's progress stands");
    new.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_iterators_are_renewed_after_the_last_record_read() {
    // Iterators live 1 s; the worker idles 1.5 s after an empty read, so its iterators expire.
    let options = kinesis_testkit::KinesisOptions { iterator_ttl: Duration::from_secs(1), ..Default::default() };
    let bed = TestBed::start_with(options).await.expect("start the emulators");
    let stream = bed.kinesis.create_stream(1).await.unwrap();
    let table = unique_name("leases");
    let log = Log::default();
    let mut config = config(&stream, &table, "x");
    config.polling.idle_time_between_reads = Duration::from_millis(1500);
    let worker = start_worker(&bed, config, &log, Duration::ZERO);
    let client = bed.kinesis.client();
    let mut sent = Vec::new();
    for round in 0..4 {
        sent.extend(put_plain(&client, &stream, &format!("e{round}"), 10).await);
        let received = sent.len();
        assert!(eventually(Duration::from_secs(30), || log.received().len() == received).await);
        tokio::time::sleep(Duration::from_millis(2500)).await;
    }
    let metrics = worker.metrics();
    worker.shutdown().await.unwrap();
    assert!(metrics.expired_iterators >= 2, "{metrics:?}");
    let duplicates = log.received().values().filter(|n| **n > 1).count();
    assert_eq!(duplicates, 0, "renewed after the last record read: nothing read twice");
    assert_all_received(&log, &sent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latest_and_at_timestamp_start_where_they_say() {
    let (bed, stream, table) = bed_and_stream(1).await;
    let client = bed.kinesis.client();
    let old = put_plain(&client, &stream, "old", 10).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let since = std::time::SystemTime::now();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let middle = put_plain(&client, &stream, "middle", 10).await;

    // LATEST: only what is written once the worker reads.
    let log = Log::default();
    let mut latest = config(&stream, &table, "latest");
    latest.initial_position = kinesis_consumer::InitialPosition::Latest;
    let worker = start_worker(&bed, latest, &log, Duration::ZERO);
    assert!(eventually(Duration::from_secs(30), || worker.metrics().get_records_calls >= 1).await);
    let new = put_plain(&client, &stream, "new", 10).await;
    assert!(eventually(Duration::from_secs(30), || log.received().len() >= 10).await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    worker.shutdown().await.unwrap();
    let got: Vec<String> = log.received().into_keys().collect();
    let mut want = new.clone();
    want.sort();
    assert_eq!(got, want, "LATEST skips what was there before");

    // AT_TIMESTAMP, on a new application: from the timestamp on.
    let log = Log::default();
    let mut at = config(&stream, &unique_name("leases"), "at");
    at.initial_position = kinesis_consumer::InitialPosition::AtTimestamp(since);
    let worker = start_worker(&bed, at, &log, Duration::ZERO);
    assert!(eventually(Duration::from_secs(30), || log.received().len() >= 20).await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    worker.shutdown().await.unwrap();
    let got: Vec<String> = log.received().into_keys().collect();
    let mut want: Vec<String> = middle.iter().chain(&new).cloned().collect();
    want.sort();
    assert_eq!(got, want, "AT_TIMESTAMP skips the {} records before it", old.len());
}

/// Panics on the first batch holding the record `poison-0`; otherwise logs like [`Logging`].
struct PanicsOnce {
    inner: Logging,
    armed: Arc<std::sync::atomic::AtomicBool>,
}

impl Processor for PanicsOnce {
    async fn process_records(&mut self, batch: Batch, checkpointer: &mut Checkpointer) {
        let poisoned = batch.records.iter().any(|r| &r.data[..] == b"poison-0");
        if poisoned && self.armed.swap(false, std::sync::atomic::Ordering::SeqCst) {
            panic!("the processor of {} panicked on poison-0 (injected)", self.inner.shard);
        }
        self.inner.process_records(batch, checkpointer).await;
    }

    async fn shard_ended(&mut self, checkpointer: &mut Checkpointer) {
        self.inner.shard_ended(checkpointer).await;
    }

    async fn shutdown_requested(&mut self, checkpointer: &mut Checkpointer) {
        self.inner.shutdown_requested(checkpointer).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_processor_loses_its_lease_but_no_record_and_the_other_shards_go_on() {
    let (bed, stream, table) = bed_and_stream(4).await;
    let client = bed.kinesis.client();
    let mut sent = put_plain(&client, &stream, "before", 200).await;
    sent.extend(put_plain(&client, &stream, "poison", 1).await);
    sent.extend(put_plain(&client, &stream, "after", 200).await);

    let log = Log::default();
    let armed = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let (worker_id, factory_log, factory_armed) = ("p".to_owned(), log.clone(), armed.clone());
    let worker =
        Scheduler::start(client, bed.dynamodb.client(), config(&stream, &table, "p"), move |shard: &str| PanicsOnce {
            inner: Logging {
                worker: worker_id.clone(),
                shard: shard.to_owned(),
                log: factory_log.clone(),
                work: Duration::ZERO,
            },
            armed: factory_armed.clone(),
        })
        .expect("a valid config");

    // Policy: the panic ends that shard's consumer and releases its lease; a worker takes it
    // again and re-reads from the last checkpoint, so the batch is processed again, not skipped.
    all_received(&log, &sent, Duration::from_secs(60)).await;
    assert!(!armed.load(std::sync::atomic::Ordering::SeqCst), "the processor did panic");
    assert!(!worker.is_finished(), "the worker goes on after a processor's panic");
    assert_eq!(worker.held_leases().len(), 4, "and holds every lease again");
    assert!(worker.metrics().leases_released >= 1, "the panicking shard's lease was released: {:?}", worker.metrics());
    worker.shutdown().await.unwrap();
}
