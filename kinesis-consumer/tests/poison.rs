//! A poison record: a processor that fails on one record every time, among 10,000.
//!
//! - The default policy retries for ever: the shard holds at the record, nothing is skipped.
//! - With retries, bisection and an on-failure destination (a file, a stream), the poison record
//!   alone goes to the destination, every other record is processed, and the shard moves on.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use kinesis_consumer::{
    Batch, Checkpointer, FailedRecordsFile, FailedRecordsStream, FailurePolicy, LeaseTable, Position, Processor,
    Scheduler, SchedulerConfig, cmp_sequence_numbers,
};

const POISON: &str = "n-4242";

/// Processes records in order until the poison one, where it reports the failure and stops.
struct FailsOnPoison {
    processed: Arc<Mutex<BTreeMap<String, usize>>>,
    poison_deliveries: Arc<Mutex<usize>>,
}

impl Processor for FailsOnPoison {
    async fn process_records(&mut self, batch: Batch, checkpointer: &mut Checkpointer) {
        for record in &batch.records {
            let data = String::from_utf8_lossy(&record.data).into_owned();
            if data == POISON {
                *self.poison_deliveries.lock().unwrap() += 1;
                checkpointer.fail_at(record);
                return;
            }
            *self.processed.lock().unwrap().entry(data).or_default() += 1;
        }
        checkpointer.checkpoint().await.unwrap();
    }

    async fn shard_ended(&mut self, checkpointer: &mut Checkpointer) {
        checkpointer.checkpoint().await.unwrap();
    }
}

struct Run {
    processed: Arc<Mutex<BTreeMap<String, usize>>>,
    poison_deliveries: Arc<Mutex<usize>>,
    worker: Scheduler,
}

fn start(bed: &kinesis_testkit::TestBed, config: SchedulerConfig) -> Run {
    let processed = Arc::new(Mutex::new(BTreeMap::new()));
    let poison_deliveries = Arc::new(Mutex::new(0));
    let factory = {
        let (processed, poison_deliveries) = (processed.clone(), poison_deliveries.clone());
        move |_: &str| FailsOnPoison { processed: processed.clone(), poison_deliveries: poison_deliveries.clone() }
    };
    let worker = Scheduler::start(bed.kinesis.client(), bed.dynamodb.client(), config, factory).unwrap();
    Run { processed, poison_deliveries, worker }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_default_a_poison_record_holds_its_shard_and_nothing_is_skipped() {
    let (bed, stream, table) = bed_and_stream(1).await;
    put_plain(&bed.kinesis.client(), &stream, "n", 10_000).await;
    let mut config = config(&stream, &table, "w");
    config.max_batch_records = 500;
    config.failure_policy =
        FailurePolicy::default().with_backoff(Duration::from_millis(20), Duration::from_millis(200));
    let run = start(&bed, config);
    assert!(eventually(Duration::from_secs(30), || *run.poison_deliveries.lock().unwrap() >= 5).await);
    let processed = run.processed.lock().unwrap().clone();
    // Everything before the poison record, nothing after it.
    assert!(processed.contains_key("n-4241") && !processed.contains_key("n-4243"), "{} processed", processed.len());
    assert_eq!(processed.len(), 4242);
    let row = LeaseTable::new(bed.dynamodb.client(), &table).list().await.unwrap().remove(0);
    let poison_seq = {
        let read = kinesis_testkit::read_stream(&bed.kinesis.client(), &stream).await.unwrap();
        read.into_iter().find(|r| r.data == POISON.as_bytes()).unwrap().sequence_number
    };
    let Position::Sequence(checkpoint) = &row.checkpoint.position else { panic!("{row:?}") };
    assert!(cmp_sequence_numbers(checkpoint, &poison_seq).is_lt(), "the checkpoint never passes the poison record");
    let metrics = run.worker.metrics();
    assert!(metrics.processing_failures >= 5 && metrics.records_diverted == 0, "{metrics:?}");
    eprintln!(
        "poison, default policy: {} records processed (all before it), the poison delivered {} times, checkpoint held before it, 0 skipped",
        processed.len(),
        run.poison_deliveries.lock().unwrap()
    );
    run.worker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_retries_bisection_and_a_file_only_the_poison_record_is_set_aside() {
    let (bed, stream, table) = bed_and_stream(1).await;
    let sent = put_plain(&bed.kinesis.client(), &stream, "n", 10_000).await;
    let dir = std::env::temp_dir().join(format!("kinesis-poison-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("failed.ndjson");
    let mut config = config(&stream, &table, "w");
    config.max_batch_records = 500;
    config.failure_policy = FailurePolicy::skip_to(2, true, FailedRecordsFile::new(&file))
        .with_backoff(Duration::from_millis(10), Duration::from_millis(50));
    let run = start(&bed, config);
    let others: Vec<&String> = sent.iter().filter(|d| *d != POISON).collect();
    assert!(
        eventually(Duration::from_secs(60), || {
            let processed = run.processed.lock().unwrap();
            others.iter().all(|d| processed.contains_key(*d))
        })
        .await,
        "every other record is processed"
    );
    let lines = std::fs::read_to_string(&file).unwrap();
    let lines: Vec<serde_json::Value> = lines.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 1, "only the poison record: {lines:?}");
    use base64::Engine;
    let data = base64::engine::general_purpose::STANDARD.decode(lines[0]["data"].as_str().unwrap()).unwrap();
    assert_eq!(data, POISON.as_bytes());
    let metrics = run.worker.metrics();
    assert_eq!(metrics.records_diverted, 1, "{metrics:?}");
    eprintln!(
        "poison, 2 retries + bisection + file: 9,999 others processed ({} deliveries in all), 1 record in the file, the poison delivered {} times",
        run.processed.lock().unwrap().values().sum::<usize>(),
        run.poison_deliveries.lock().unwrap()
    );
    // Retried twice whole, then halves: 500 -> 250 -> ... -> 1, each tried 3 times.
    assert!(*run.poison_deliveries.lock().unwrap() >= 3 * 9, "{}", run.poison_deliveries.lock().unwrap());
    // The shard moved past it.
    let read = kinesis_testkit::read_stream(&bed.kinesis.client(), &stream).await.unwrap();
    let last_seq = read.last().unwrap().sequence_number.clone();
    let leases = LeaseTable::new(bed.dynamodb.client(), &table);
    let mut row = leases.list().await.unwrap().remove(0);
    for _ in 0..100 {
        if row.checkpoint.position == Position::Sequence(last_seq.clone()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        row = leases.list().await.unwrap().remove(0);
    }
    assert_eq!(row.checkpoint.position, Position::Sequence(last_seq), "checkpointed to the shard's last record");
    run.worker.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_bisection_the_failed_range_goes_to_a_dead_letter_stream() {
    let (bed, stream, table) = bed_and_stream(1).await;
    let client = bed.kinesis.client();
    let sent = put_plain(&client, &stream, "n", 10_000).await;
    let dead_letters = bed.kinesis.create_stream(1).await.unwrap();
    let mut config = config(&stream, &table, "w");
    config.max_batch_records = 100;
    config.failure_policy =
        FailurePolicy::skip_to(1, false, FailedRecordsStream::new(client.clone(), &dead_letters).unwrap())
            .with_backoff(Duration::from_millis(10), Duration::from_millis(50));
    let run = start(&bed, config);
    // The poison record and the rest of its batch go to the dead letters; the others are processed.
    assert!(eventually(Duration::from_secs(60), || run.worker.metrics().records_diverted > 0).await);
    let dead: Vec<String> = kinesis_testkit::read_stream(&client, &dead_letters)
        .await
        .unwrap()
        .into_iter()
        .map(|r| String::from_utf8(r.data).unwrap())
        .collect();
    assert_eq!(dead.first().map(String::as_str), Some(POISON));
    assert!(dead.len() <= 100, "at most the rest of one batch: {}", dead.len());
    let expected: Vec<&String> = sent.iter().filter(|d| !dead.contains(d)).collect();
    assert!(
        eventually(Duration::from_secs(60), || {
            let processed = run.processed.lock().unwrap();
            expected.iter().all(|d| processed.contains_key(*d))
        })
        .await
    );
    assert_eq!(run.worker.metrics().records_diverted, dead.len() as u64);
    eprintln!(
        "poison, 1 retry, no bisection, dead-letter stream: {} records to the dead letters (the poison and the rest of its batch), the others processed",
        dead.len()
    );
    run.worker.shutdown().await.unwrap();
}
