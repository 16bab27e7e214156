//! The producer end to end: put records, watch them go, await every receipt, print the metrics.
//!
//! By default it runs against an embedded Kinesis emulator (ferrokinesis, in-process; or the
//! endpoint in `AWS_ENDPOINT_URL_KINESIS`) on a new stream. With `--stream NAME` it writes to that
//! existing stream with the default AWS configuration (region, credentials) and creates nothing.
//!
//! ```text
//! cargo run --release --example produce                                  # 100,000 records, 4 shards
//! cargo run --release --example produce -- --records 20000 --throttle --shards 2  # per-shard limits on
//! cargo run --release --example produce -- --stream my-stream --records 1000      # a real stream
//! cargo run --release --example produce -- --throttle --no-aggregation           # one entry per record
//! cargo run --release --example produce -- --throttle --duration 60              # put for 60 s; peak RSS
//! ```
//!
//! Records are 100 bytes, with 16-character partition keys drawn from 1,000 keys. It exits with
//! an error if any record was not delivered.

use std::time::{Duration, Instant};

use aws_config::BehaviorVersion;
use kinesis_producer::{Producer, ProducerConfig, UserRecord};
use kinesis_testkit::{Kinesis, KinesisOptions};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const USAGE: &str =
    "usage: produce [--records N | --duration SECS] [--shards N] [--throttle] [--no-aggregation] [--stream NAME]";

struct Args {
    records: u64,
    /// Put for this long instead of a count.
    duration: Option<Duration>,
    shards: u32,
    throttle: bool,
    aggregation: bool,
    stream: Option<String>,
}

fn parse_args() -> Result<Args, BoxError> {
    let mut args =
        Args { records: 100_000, duration: None, shards: 4, throttle: false, aggregation: true, stream: None };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{arg} needs a value; {USAGE}"));
        match arg.as_str() {
            "--records" => args.records = value()?.replace('_', "").parse()?,
            "--shards" => args.shards = value()?.parse()?,
            "--stream" => args.stream = Some(value()?),
            "--throttle" => args.throttle = true,
            "--no-aggregation" => args.aggregation = false,
            "--duration" => args.duration = Some(Duration::from_secs_f64(value()?.parse()?)),
            _ => return Err(format!("unknown argument {arg}; {USAGE}").into()),
        }
    }
    if args.stream.is_some() && (args.throttle || args.shards != 4) {
        return Err("--shards and --throttle apply to the embedded emulator only, not with --stream".into());
    }
    Ok(args)
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args = parse_args()?;

    // Keep the emulator handle alive until the end: dropping it stops the server.
    let (_server, client, stream) = match args.stream {
        Some(stream) => {
            let config = aws_config::load_defaults(BehaviorVersion::latest()).await;
            println!("stream {stream} in {}", config.region().map_or("no region configured", |r| r.as_ref()));
            (None, aws_sdk_kinesis::Client::new(&config), stream)
        }
        None => {
            let server =
                Kinesis::start_with(KinesisOptions { enforce_limits: args.throttle, ..Default::default() }).await?;
            let stream = server.create_stream(args.shards).await?;
            let limits = if args.throttle { "per-shard write limits on" } else { "the emulator does not throttle" };
            println!("stream {stream}: {} shards at {} ({limits})", args.shards, server.endpoint_url());
            let client = server.client();
            (Some(server), client, stream)
        }
    };

    // The KPL's defaults: aggregation, 100 ms linger, 150 % of each shard's limit, 30 s TTL.
    let config = ProducerConfig { aggregation: args.aggregation, ..Default::default() };
    let buffer_cap = config.max_buffered_bytes;
    let receipt_backlog = config.max_buffered_records;
    let producer = Producer::builder(client, stream).config(config).build()?;

    // Progress, once a second, from the metrics.
    let started = Instant::now();
    let progress = tokio::spawn({
        let producer = producer.clone();
        async move {
            let mut tick = tokio::time::interval_at((started + Duration::from_secs(1)).into(), Duration::from_secs(1));
            let mut last = 0;
            loop {
                tick.tick().await;
                let m = producer.metrics();
                println!(
                    "{:6.1} s  put {:>9}  delivered {:>9}  in flight {:>7}  {:>9} records/s",
                    started.elapsed().as_secs_f64(),
                    m.user_records_received,
                    m.user_records_put,
                    m.user_records_pending,
                    m.user_records_put - last
                );
                last = m.user_records_put;
            }
        }
    });

    // Receipts are awaited by a task of their own, as they come, while this one keeps putting.
    // Bounded like the producer's buffer: a receipt is queued here only after its record was accepted.
    let (receipts_tx, mut receipts_rx) = tokio::sync::mpsc::channel(receipt_backlog);
    let receipts = tokio::spawn(async move {
        let (mut delivered, mut failed) = (0u64, 0u64);
        while let Some(receipt) = receipts_rx.recv().await {
            match receipt.await {
                Ok(_) => delivered += 1,
                Err(error) => {
                    if failed == 0 {
                        eprintln!("first failure: {error}");
                    }
                    failed += 1;
                }
            }
        }
        (delivered, failed)
    });

    let keys: Vec<String> = (0..1_000).map(|i| format!("key-{i:012}")).collect();
    let mut sent = 0u64;
    for i in 0.. {
        let done = match args.duration {
            Some(duration) => started.elapsed() >= duration,
            None => i >= args.records,
        };
        if done {
            break;
        }
        let key = keys[(i % 1_000) as usize].clone();
        let record = UserRecord::new(key, format!("{i:0>100}")); // 100 bytes
        // Waits while the producer's buffer is full (back-pressure).
        let receipt = producer.put(record).await?;
        receipts_tx.send(receipt).await?;
        sent += 1;
    }
    producer.flush().await; // send what is lingering now, and wait for every record
    drop(receipts_tx);
    let (delivered, failed) = receipts.await?;
    let elapsed = started.elapsed();
    producer.shutdown().await;
    progress.abort();

    let m = producer.metrics();
    let secs = elapsed.as_secs_f64();
    println!();
    println!("sent                          {sent}");
    println!("delivered                     {delivered}");
    println!("failed                        {failed}");
    println!("Kinesis records               {}", m.kinesis_records_put);
    println!("user records / Kinesis record {:.1}", m.user_records_per_kinesis_record());
    println!("PutRecords calls              {}", m.put_records_requests);
    println!("retries                       {}", m.retries);
    println!("errors by code                {:?}", m.errors_by_code);
    println!("elapsed                       {secs:.2} s");
    println!("user records/s                {:.0}", delivered as f64 / secs);
    println!(
        "Kinesis bytes/s               {:.0} ({:.2} MB/s)",
        m.kinesis_records_data_put as f64 / secs,
        m.kinesis_records_data_put as f64 / secs / 1e6
    );
    if let Some(peak) = peak_rss_bytes() {
        println!(
            "peak RSS                      {:.1} MiB = {:.2} x the buffer cap ({} MiB)",
            peak as f64 / 1048576.0,
            peak as f64 / buffer_cap as f64,
            buffer_cap >> 20
        );
    }
    if failed > 0 {
        return Err(format!("{failed} of {sent} records were not delivered").into());
    }
    Ok(())
}

/// The process's peak resident set size (VmHWM), where the OS reports it (Linux).
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
