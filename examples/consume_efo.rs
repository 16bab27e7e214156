//! Enhanced fan-out against the embedded emulators, and the put-to-process latency of three
//! applications reading one stream at once: polling with a 200 ms idle time, polling with the
//! default idle time (1.5 s), and enhanced fan-out (SubscribeToShard).
//!
//! ```text
//! cargo run --release --example consume_efo [-- --duration SECS] [--rate RECORDS_PER_SEC]
//! ```
//!
//! Each record carries the time it was put; each application's processor notes how long after
//! that it saw the record. The load is low and steady (default 20 records/s for 30 s over 2
//! shards), so what is measured is the reading, not a queue.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aws_sdk_kinesis::primitives::Blob;
use kinesis::consumer::{
    Batch, Checkpointer, FanOutConfig, InitialPosition, Processor, Retrieval, Scheduler, SchedulerConfig,
};
use kinesis_testkit::{TestBed, unique_name};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Notes each record's put-to-process latency.
struct Latency(Arc<Mutex<Vec<Duration>>>);

impl Processor for Latency {
    async fn process_records(&mut self, batch: Batch, checkpointer: &mut Checkpointer) {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        {
            let mut seen = self.0.lock().unwrap();
            for record in &batch.records {
                if let Some(put) = std::str::from_utf8(&record.data).ok().and_then(|t| t.parse::<u128>().ok()) {
                    seen.push(now.saturating_sub(Duration::from_nanos(u64::try_from(put).unwrap_or(u64::MAX))));
                }
            }
        }
        checkpointer.checkpoint().await.ok();
    }

    async fn shard_ended(&mut self, checkpointer: &mut Checkpointer) {
        checkpointer.checkpoint().await.ok();
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let mut duration = Duration::from_secs(30);
    let mut rate = 20u64;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--duration" => duration = Duration::from_secs(args.next().ok_or("--duration SECS")?.parse()?),
            "--rate" => rate = args.next().ok_or("--rate N")?.parse()?,
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    let bed = TestBed::start().await?;
    let stream = bed.kinesis.create_stream(2).await?;
    println!("stream {stream}: 2 shards on {}; {rate} records/s for {duration:?}", bed.kinesis.endpoint_url());

    let mut apps = Vec::new();
    for (name, retrieval, idle) in [
        ("polling, 200 ms idle", Retrieval::Polling, Duration::from_millis(200)),
        ("polling, default 1.5 s idle", Retrieval::Polling, Duration::from_millis(1500)),
        ("enhanced fan-out", Retrieval::FanOut(FanOutConfig::new("latency-efo")), Duration::from_millis(1500)),
    ] {
        let mut config = SchedulerConfig::new(&stream, unique_name("latency"));
        config.initial_position = InitialPosition::TrimHorizon;
        config.retrieval = retrieval;
        config.polling.idle_time_between_reads = idle;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let worker = {
            let seen = seen.clone();
            Scheduler::start(bed.kinesis.client(), bed.dynamodb.client(), config, move |_: &str| Latency(seen.clone()))?
        };
        apps.push((name, worker, seen));
    }
    // Every application holds both shards and reads them before the load starts.
    let ready = Instant::now();
    while apps.iter().any(|(_, w, _)| {
        w.held_leases().len() < 2 || (w.metrics().get_records_calls < 2 && w.metrics().subscriptions < 2)
    }) {
        if ready.elapsed() > Duration::from_secs(60) {
            return Err("the applications did not start reading within 60 s".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    println!("all three applications reading after {:.1} s; putting", ready.elapsed().as_secs_f64());

    let client = bed.kinesis.client();
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let started = Instant::now();
    let mut sent = 0usize;
    let mut tick = tokio::time::interval(interval);
    while started.elapsed() < duration {
        tick.tick().await;
        let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos();
        client
            .put_record()
            .stream_name(&stream)
            .partition_key(format!("key-{sent}"))
            .data(Blob::new(now.to_string()))
            .send()
            .await?;
        sent += 1;
    }
    let drained = Instant::now();
    while apps.iter().any(|(_, _, seen)| seen.lock().unwrap().len() < sent)
        && drained.elapsed() < Duration::from_secs(30)
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    println!();
    println!("| retrieval | records | p50 | p99 | max |");
    println!("|---|---|---|---|---|");
    let mut failed = false;
    for (name, worker, seen) in apps {
        let metrics = worker.metrics();
        worker.shutdown().await?;
        let mut seen = seen.lock().unwrap().clone();
        seen.sort();
        failed |= seen.len() < sent;
        println!(
            "| {name} | {}/{sent} | {:.0} ms | {:.0} ms | {:.0} ms |",
            seen.len(),
            percentile(&seen, 50.0).as_secs_f64() * 1e3,
            percentile(&seen, 99.0).as_secs_f64() * 1e3,
            seen.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
        );
        if metrics.subscriptions > 0 {
            println!(
                "|   (subscriptions {}, resubscriptions {}) | | | | |",
                metrics.subscriptions, metrics.resubscriptions
            );
        }
    }
    if failed {
        return Err("an application missed records".into());
    }
    Ok(())
}
