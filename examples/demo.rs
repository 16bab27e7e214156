//! The main demo: a producer and two consumer workers in one process, on embedded emulators.
//!
//! It starts ferrokinesis (Kinesis) and dynoxide (DynamoDB) in-process, creates a 4-shard stream,
//! and runs the producer (KPL aggregation per predicted shard) alongside two consumer workers that
//! share one KCL 2.x lease table. It prints progress every second, then a summary: sent, received,
//! duplicates, lost (must be 0), throughput, and how the leases were shared.
//!
//! ```text
//! cargo run --release --example demo [-- RECORDS]      (default 200,000)
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kinesis::consumer::{Batch, Checkpointer, InitialPosition, Processor, Scheduler, SchedulerConfig};
use kinesis::producer::{Producer, UserRecord};
use kinesis_testkit::{TestBed, unique_name};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What the two workers received: a count per record number.
struct Received {
    counts: Mutex<Vec<u8>>,
    per_worker: [AtomicU64; 2],
    unknown: AtomicU64,
    first: Mutex<Option<Instant>>,
    last: Mutex<Option<Instant>>,
}

/// Counts each record by the number at the start of its data; checkpoints every batch.
struct Count {
    worker: usize,
    received: Arc<Received>,
}

impl Processor for Count {
    async fn process_records(&mut self, batch: Batch, checkpointer: &mut Checkpointer) {
        let now = Instant::now();
        self.received.first.lock().unwrap().get_or_insert(now);
        *self.received.last.lock().unwrap() = Some(now);
        {
            let mut counts = self.received.counts.lock().unwrap();
            for record in &batch.records {
                let number = std::str::from_utf8(&record.data[..10.min(record.data.len())])
                    .ok()
                    .and_then(|n| n.parse::<usize>().ok());
                match number.and_then(|n| counts.get_mut(n)) {
                    Some(count) => *count = count.saturating_add(1),
                    None => {
                        self.received.unknown.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        self.received.per_worker[self.worker].fetch_add(batch.records.len() as u64, Ordering::Relaxed);
        if let Err(error) = checkpointer.checkpoint().await {
            eprintln!("worker {}: checkpoint of {} failed: {error}", self.worker + 1, checkpointer.shard_id());
        }
    }

    async fn shard_ended(&mut self, checkpointer: &mut Checkpointer) {
        checkpointer.checkpoint().await.ok();
    }

    async fn shutdown_requested(&mut self, checkpointer: &mut Checkpointer) {
        checkpointer.checkpoint().await.ok();
    }
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let total: usize = std::env::args().nth(1).map(|n| n.parse()).transpose()?.unwrap_or(200_000);
    let bed = TestBed::start().await?;
    let stream = bed.kinesis.create_stream(4).await?;
    let application = unique_name("demo-app");
    println!(
        "Kinesis (ferrokinesis) at {}, DynamoDB (dynoxide) at {}",
        bed.kinesis.endpoint_url(),
        bed.dynamodb.endpoint_url()
    );
    println!("stream {stream}: 4 shards; lease table {application}; {total} records of 100 bytes");

    let received = Arc::new(Received {
        counts: Mutex::new(vec![0; total]),
        per_worker: [AtomicU64::new(0), AtomicU64::new(0)],
        unknown: AtomicU64::new(0),
        first: Mutex::new(None),
        last: Mutex::new(None),
    });
    let mut workers = Vec::new();
    for worker in 0..2 {
        let mut config = SchedulerConfig::new(&stream, &application);
        config.worker_id = format!("worker-{}", worker + 1);
        config.initial_position = InitialPosition::TrimHorizon;
        config.failover = Duration::from_secs(1);
        config.polling.idle_time_between_reads = Duration::from_millis(200);
        let received = received.clone();
        workers.push(Scheduler::start(bed.kinesis.client(), bed.dynamodb.client(), config, move |_: &str| Count {
            worker,
            received: received.clone(),
        })?);
    }

    // The workers share the 4 leases out (the second one steals from the first) before the load.
    let sharing = Instant::now();
    while workers.iter().map(|w| w.held_leases().len()).collect::<Vec<_>>() != [2, 2]
        && sharing.elapsed() < Duration::from_secs(30)
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "leases shared after {:.1} s: {}",
        sharing.elapsed().as_secs_f64(),
        workers.iter().map(|w| format!("{} holds {:?}", w.worker_id(), w.held_leases())).collect::<Vec<_>>().join(", ")
    );

    let producer = Producer::builder(bed.kinesis.client(), &stream).build()?;
    let started = Instant::now();
    let progress = {
        let received = received.clone();
        let metrics: Vec<_> = workers.iter().map(|w| w.worker_id().to_owned()).collect();
        let producer = producer.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            loop {
                tick.tick().await;
                let got: u64 = received.per_worker.iter().map(|c| c.load(Ordering::Relaxed)).sum();
                let put = producer.metrics().user_records_put;
                println!(
                    "{:>5.1} s  delivered {put:>8}  received {got:>8}  ({}: {}, {}: {})",
                    started.elapsed().as_secs_f64(),
                    metrics[0],
                    received.per_worker[0].load(Ordering::Relaxed),
                    metrics[1],
                    received.per_worker[1].load(Ordering::Relaxed),
                );
            }
        })
    };

    let keys: Vec<String> = (0..1_000).map(|i| format!("sensor-{i:09}")).collect();
    let mut receipts = Vec::with_capacity(total);
    for i in 0..total {
        let data = format!("{i:010} {:089}", i % 97);
        receipts.push(producer.put(UserRecord::new(keys[i % keys.len()].clone(), data)).await?);
    }
    let mut failed = 0;
    for receipt in receipts {
        if receipt.await.is_err() {
            failed += 1;
        }
    }
    let produced_in = started.elapsed();
    producer.shutdown().await;
    let put = total - failed;

    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let missing = received.counts.lock().unwrap().iter().filter(|c| **c == 0).count();
        if missing == failed || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    progress.abort();
    let leases: Vec<(String, usize, u64)> =
        workers.iter().map(|w| (w.worker_id().to_owned(), w.held_leases().len(), w.metrics().checkpoints)).collect();
    for worker in workers {
        worker.shutdown().await?;
    }

    let counts = received.counts.lock().unwrap();
    let unique = counts.iter().filter(|c| **c > 0).count();
    let duplicates: usize = counts.iter().map(|c| (*c as usize).saturating_sub(1)).sum();
    let lost = put - unique.min(put);
    let first = received.first.lock().unwrap().unwrap_or(started);
    let last = received.last.lock().unwrap().unwrap_or(started);
    println!();
    println!("sent        {put} ({failed} not delivered by the producer)");
    println!("received    {unique}");
    println!("duplicates  {duplicates}");
    println!("lost        {lost}");
    println!("unknown     {}", received.unknown.load(Ordering::Relaxed));
    println!(
        "throughput  produced {:.0} records/s; consumed {:.0} records/s (first to last record received)",
        put as f64 / produced_in.as_secs_f64(),
        unique as f64 / last.duration_since(first).as_secs_f64().max(0.001),
    );
    for (id, held, checkpoints) in leases {
        println!("{id}: held {held} leases at the end, {checkpoints} checkpoints");
    }
    if lost > 0 || failed > 0 {
        return Err(format!("{lost} records lost, {failed} not delivered").into());
    }
    Ok(())
}
