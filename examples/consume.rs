//! The consumer's load generator: how fast a worker deaggregates, processes and checkpoints, and
//! how long failover takes after a worker dies. The emulators (ferrokinesis and dynoxide) run in a
//! child process, so the figures are the consumer's own use of the machine.
//!
//! ```text
//! cargo run --release --example consume -- [--shards N] [--records N] [--plain]
//! cargo run --release --example consume -- --failover [--failover-ms MS] [--rounds N]
//! ```
//!
//! Throughput: fills an N-shard stream with KPL aggregates (100-byte records, 16-character keys
//! from 1,000, 51,200-byte aggregates per predicted shard), then one worker reads it from TRIM_HORIZON, its processor
//! touching every byte and checkpointing every batch; the figure is user records per second from
//! the worker's start to the last record.
//!
//! Failover: two workers on a 4-shard stream under a steady load; one is aborted (no release, as
//! a crash); the time until the other holds every lease, over several rounds.

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use kinesis::aggregation::{Aggregator, HashKeyRange, ShardRanges, UserRecord, hash_key};
use kinesis::consumer::{Batch, Checkpointer, InitialPosition, Processor, Scheduler, SchedulerConfig};
use kinesis_testkit::{DynamoDb, Kinesis, unique_name};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

struct Args {
    shards: u32,
    records: usize,
    plain: bool,
    failover: bool,
    failover_ms: u64,
    rounds: usize,
    serve: bool,
}

fn args() -> Result<Args, BoxError> {
    let mut args = Args {
        shards: 1,
        records: 1_000_000,
        plain: false,
        failover: false,
        failover_ms: 2000,
        rounds: 5,
        serve: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--shards" => args.shards = value()?.parse()?,
            "--records" => args.records = value()?.parse()?,
            "--plain" => args.plain = true,
            "--failover" => args.failover = true,
            "--failover-ms" => args.failover_ms = value()?.parse()?,
            "--rounds" => args.rounds = value()?.parse()?,
            "--serve-emulators" => args.serve = true,
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    Ok(args)
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args = args()?;
    if args.serve {
        return serve_emulators().await;
    }
    let (_child, kinesis, dynamodb) = start_emulator_process().await?;
    if args.failover {
        failover(&args, &kinesis, &dynamodb).await
    } else {
        throughput(&args, &kinesis, &dynamodb).await
    }
}

/// Touches every byte (a checksum), so that the data is really read; checkpoints every batch.
struct Touch {
    records: Arc<AtomicU64>,
    sum: Arc<AtomicU64>,
}

impl Processor for Touch {
    async fn process_records(&mut self, batch: Batch, checkpointer: &mut Checkpointer) {
        let sum = batch.records.iter().flat_map(|r| r.data.iter()).fold(0u64, |s, b| s.wrapping_add(u64::from(*b)));
        self.sum.fetch_add(sum, Ordering::Relaxed);
        self.records.fetch_add(batch.records.len() as u64, Ordering::Relaxed);
        checkpointer.checkpoint().await.expect("checkpoint");
    }

    async fn shard_ended(&mut self, checkpointer: &mut Checkpointer) {
        checkpointer.checkpoint().await.expect("checkpoint SHARD_END");
    }
}

/// Fills the stream as a KPL producer does: records aggregated per predicted shard, each
/// aggregate sent with an explicit hash key inside its shard's range.
async fn fill(client: &aws_sdk_kinesis::Client, stream: &str, records: usize, plain: bool) -> Result<usize, BoxError> {
    let shards = kinesis_testkit::list_all_shards(client, stream).await?;
    let ranges: Vec<(HashKeyRange, u128)> = shards
        .iter()
        .filter(|s| !s.closed)
        .map(|s| Ok((HashKeyRange::new(s.starting_hash_key, s.ending_hash_key)?, s.starting_hash_key)))
        .collect::<Result<_, BoxError>>()?;
    let map = ShardRanges::new(ranges)?;
    let keys: Vec<String> = (0..1_000).map(|i| format!("key-{i:012}")).collect();
    let payload = vec![b'x'; 100];
    let mut entries: Vec<(String, Option<u128>, Vec<u8>)> = Vec::new();
    let mut aggregators: HashMap<u128, Aggregator> = HashMap::new();
    let mut kinesis_records = 0;
    for i in 0..records {
        let record = UserRecord::new(keys[i % keys.len()].clone(), payload.clone());
        if plain {
            entries.push((record.partition_key, None, record.data.to_vec()));
        } else {
            let (_, shard_start) = map.lookup(hash_key(&record.partition_key)).ok_or("no shard for a key")?;
            let aggregator = aggregators.entry(*shard_start).or_default();
            if !aggregator.try_push_ref(&record)? {
                let full = aggregator.finish().ok_or("an empty aggregate")?;
                entries.push((full.partition_key, Some(*shard_start), full.data.to_vec()));
                assert!(aggregator.try_push_ref(&record)?);
            }
        }
        if entries.len() >= 100 {
            kinesis_records += put(client, stream, std::mem::take(&mut entries)).await?;
        }
    }
    for (shard_start, aggregator) in &mut aggregators {
        if let Some(last) = aggregator.finish() {
            entries.push((last.partition_key, Some(*shard_start), last.data.to_vec()));
        }
    }
    kinesis_records += put(client, stream, entries).await?;
    Ok(kinesis_records)
}

async fn put(
    client: &aws_sdk_kinesis::Client,
    stream: &str,
    entries: Vec<(String, Option<u128>, Vec<u8>)>,
) -> Result<usize, BoxError> {
    let n = entries.len();
    for chunk in entries.chunks(100) {
        let mut request = client.put_records().stream_name(stream);
        for (key, explicit_hash_key, data) in chunk {
            request = request.records(
                PutRecordsRequestEntry::builder()
                    .partition_key(key)
                    .set_explicit_hash_key(explicit_hash_key.map(|k| k.to_string()))
                    .data(Blob::new(data.clone()))
                    .build()?,
            );
        }
        let out = request.send().await?;
        if out.failed_record_count().unwrap_or(0) > 0 {
            return Err("the emulator refused records".into());
        }
    }
    Ok(n)
}

async fn throughput(args: &Args, kinesis: &Kinesis, dynamodb: &DynamoDb) -> Result<(), BoxError> {
    let client = kinesis.client();
    let stream = kinesis.create_stream(args.shards).await?;
    let started = Instant::now();
    let kinesis_records = fill(&client, &stream, args.records, args.plain).await?;
    println!(
        "filled {stream}: {} shards, {} user records in {kinesis_records} Kinesis records ({}), {:.1} s",
        args.shards,
        args.records,
        if args.plain { "plain" } else { "KPL aggregates" },
        started.elapsed().as_secs_f64()
    );
    let (records, sum) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut config = SchedulerConfig::new(&stream, unique_name("consume-bench"));
    config.initial_position = InitialPosition::TrimHorizon;
    config.failover = Duration::from_secs(2);
    config.polling.idle_time_between_reads = Duration::from_millis(200);
    // A GetRecords answer holds at most 10 MB: about 200 full aggregates (the emulator has no cap).
    config.polling.max_records = if args.plain { 10_000 } else { 200 };
    let started = Instant::now();
    let worker = {
        let (records, sum) = (records.clone(), sum.clone());
        Scheduler::start(client.clone(), dynamodb.client(), config, move |_: &str| Touch {
            records: records.clone(),
            sum: sum.clone(),
        })?
    };
    let mut first = None;
    while records.load(Ordering::Relaxed) < args.records as u64 {
        if first.is_none() && records.load(Ordering::Relaxed) > 0 {
            first = Some(started.elapsed());
        }
        if started.elapsed() > Duration::from_secs(300) {
            let m = worker.metrics();
            return Err(format!("not every record arrived within 5 minutes: {m:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let took = started.elapsed();
    let metrics = worker.metrics();
    worker.shutdown().await?;
    if metrics.sub_records_out_of_range > 0 {
        return Err(format!("{} sub-records were outside their shard", metrics.sub_records_out_of_range).into());
    }
    let first = first.unwrap_or_default();
    let steady = args.records as f64 / (took - first).as_secs_f64();
    println!(
        "consumed {} user records in {:.2} s, {:.2} s after the first arrived: {:.0} records/s steady ({:.1} MB/s of data, \
         {:.0} per shard); {:.0} records/s including the worker's start",
        args.records,
        took.as_secs_f64(),
        (took - first).as_secs_f64(),
        steady,
        steady * 100.0 / 1e6,
        steady / f64::from(args.shards),
        args.records as f64 / took.as_secs_f64(),
    );
    println!(
        "{} process calls, {} checkpoints, {} GetRecords calls, checksum {}",
        metrics.process_calls,
        metrics.checkpoints,
        metrics.get_records_calls,
        sum.load(Ordering::Relaxed)
    );
    Ok(())
}

async fn failover(args: &Args, kinesis: &Kinesis, dynamodb: &DynamoDb) -> Result<(), BoxError> {
    let failover = Duration::from_millis(args.failover_ms);
    let mut times = Vec::new();
    for round in 0..args.rounds {
        let stream = kinesis.create_stream(4).await?;
        let table = unique_name("failover-bench");
        let counted = Arc::new(AtomicU64::new(0));
        let start = |id: &str| {
            let mut config = SchedulerConfig::new(&stream, &table);
            config.worker_id = id.to_owned();
            config.initial_position = InitialPosition::TrimHorizon;
            config.failover = failover;
            config.polling.idle_time_between_reads = Duration::from_millis(200);
            let counted = counted.clone();
            Scheduler::start(kinesis.client(), dynamodb.client(), config, move |_: &str| Touch {
                records: counted.clone(),
                sum: Arc::new(AtomicU64::new(0)),
            })
        };
        let (a, b) = (start("a")?, start("b")?);
        let settled = Instant::now();
        while (a.held_leases().len(), b.held_leases().len()) != (2, 2) {
            if settled.elapsed() > Duration::from_secs(60) {
                return Err("the workers did not share the leases within 60 s".into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let load = {
            let (client, stream) = (kinesis.client(), stream.clone());
            tokio::spawn(async move {
                loop {
                    let _ = fill(&client, &stream, 200, true).await;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        };
        // Die at a random point of the renew and take cycles.
        tokio::time::sleep(Duration::from_millis(1000 + fastrand::u64(..failover.as_millis() as u64 * 2))).await;
        a.abort();
        let died = Instant::now();
        while b.held_leases().len() < 4 {
            if died.elapsed() > Duration::from_secs(120) {
                return Err("the survivor did not take the leases within 120 s".into());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let took = died.elapsed();
        // Processing of the moved shards resumes at once (they were taken as expired).
        load.abort();
        b.shutdown().await?;
        println!("round {}: leases moved {:.2} s after the death", round + 1, took.as_secs_f64());
        times.push(took);
    }
    times.sort();
    let mean = times.iter().sum::<Duration>() / times.len() as u32;
    println!(
        "failover {:?} (renew every {:?}, take rounds every {:?}): moved after min {:.2} s, mean {:.2} s, max {:.2} s over {} rounds; \
         bound failover + one take interval = {:.1} s",
        failover,
        failover / 3,
        failover * 2,
        times[0].as_secs_f64(),
        mean.as_secs_f64(),
        times[times.len() - 1].as_secs_f64(),
        times.len(),
        (failover * 3).as_secs_f64()
    );
    Ok(())
}

/// Starts this example again as the emulators' process; returns it and handles on the endpoints.
async fn start_emulator_process() -> Result<(tokio::process::Child, Kinesis, DynamoDb), BoxError> {
    let mut command = tokio::process::Command::new(std::env::current_exe()?);
    command.arg("--serve-emulators").stdin(Stdio::piped()).stdout(Stdio::piped()).kill_on_drop(true);
    let mut child = command.spawn()?;
    let stdout = child.stdout.take().ok_or("the emulator process has no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .map_err(|_| "the emulator process did not start within 30 s")??
        .ok_or("the emulator process exited before it said where it listens")?;
    let mut urls = line.strip_prefix("listening ").ok_or_else(|| format!("unexpected line: {line}"))?.split(' ');
    let (Some(kinesis), Some(dynamodb)) = (urls.next(), urls.next()) else {
        return Err(format!("unexpected line: {line}").into());
    };
    Ok((child, Kinesis::connect(kinesis), DynamoDb::connect(dynamodb)))
}

/// The emulators' process: ferrokinesis and dynoxide on 127.0.0.1 until stdin closes.
async fn serve_emulators() -> Result<(), BoxError> {
    let kinesis = Kinesis::start().await?;
    let dynamodb = DynamoDb::start().await?;
    println!("listening {} {}", kinesis.endpoint_url(), dynamodb.endpoint_url());
    let mut sink = Vec::new();
    let _ = tokio::io::stdin().read_to_end(&mut sink).await;
    Ok(())
}
