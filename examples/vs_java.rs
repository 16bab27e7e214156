//! Side by side with the Java KPL 1.0.7 and KCL 3.5.1, each in one run, on one emulator.
//!
//! ```text
//! cargo run --release --example vs_java                       # both tables
//! cargo run --release --example vs_java -- --only producer    # or consumer
//! cargo run --release --example vs_java -- --records 500000 --failover-secs 10
//! ```
//!
//! This process hosts the emulators: ferrokinesis with the per-shard write limits on (1,000
//! records/s and 1 MiB/s a shard), behind a TLS front for the KPL, and dynoxide. Every producer
//! and consumer under test runs as a child process (ours: this binary again, with `--role`; the
//! Java ones: `interop/java`, built by the testkit), and each child's CPU time and resident memory
//! are read from /proc every 100 ms over its whole process tree (the KPL's native daemon is a
//! child of its JVM), so both sides are measured the same way.
//!
//! - **Producer**, 4 shards, records of 100 bytes with 16-character partition keys drawn from
//!   1,000, aggregation on (both libraries' default): shard utilisation (bytes stored, data and
//!   partition keys, over the write limit of the seconds in which records arrived), whole-run time
//!   (process start to exit, receipts of every record included), CPU seconds per million records,
//!   peak RSS of the process tree.
//! - **Consumer**, 8 shards pre-filled with aggregated records: records/s (from the first lease
//!   taken to the last record delivered),
//!   CPU seconds per million records, start-up time (process start to first record, on a new lease
//!   table), and failover time: two workers of one kind on a new table with the same failover
//!   setting; the one holding the most leases is killed with SIGKILL once no lease has moved for
//!   two failover times; the
//!   time until the other processes records again on every shard the dead one held.
//!
//! Linux only (/proc). Needs Java 17 and Maven, as the interoperability tests do.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kinesis_consumer::{Batch, Checkpointer, InitialPosition, Initialization, Processor, Scheduler, SchedulerConfig};
use kinesis_producer::{Producer, UserRecord};
use kinesis_testkit::{
    DynamoDb, JavaInterop, JsonLines, Kinesis, KinesisOptions, TlsFront, child_env, child_log, child_log_dir,
    unique_name,
};
use serde_json::Value;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const USAGE: &str =
    "usage: vs_java [--only producer|consumer] [--records N] [--consumer-records N] [--failover-secs S]";

/// The clock ticks per second of /proc/<pid>/stat's utime and stime (USER_HZ: 100 on Linux).
const TICKS_PER_SECOND: f64 = 100.0;

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn key_of(k: usize) -> String {
    let mut key = format!("key-{k}-");
    while key.len() < 16 {
        key.push('x');
    }
    key.truncate(16);
    key
}

/// Record `i` of the workload: its id in decimal, then zeros, 100 bytes (as `KplWriter --generate`).
fn record(i: usize) -> UserRecord {
    let mut data = i.to_string().into_bytes();
    data.resize(100, 0);
    UserRecord::new(key_of(i % 1_000), data)
}

// ---------------------------------------------------------------- child roles

/// `--role produce --stream S --records N`: puts the workload with our producer's defaults.
async fn role_produce(stream: &str, records: usize) -> Result<(), BoxError> {
    let config = aws_config::defaults(aws_config::BehaviorVersion::latest()).load().await;
    let producer = Producer::builder(aws_sdk_kinesis::Client::new(&config), stream.to_owned()).build()?;
    let mut receipts = Vec::with_capacity(records);
    for i in 0..records {
        receipts.push(producer.put(record(i)).await?);
    }
    let mut failed = 0;
    for receipt in receipts {
        failed += usize::from(receipt.await.is_err());
    }
    producer.shutdown().await;
    if failed > 0 {
        return Err(format!("{failed} records were not delivered").into());
    }
    Ok(())
}

/// Prints a line per batch, as `KclReader --report batches` does.
struct BatchLines {
    worker: String,
}

impl Processor for BatchLines {
    async fn initialize(&mut self, init: &Initialization) {
        println!(
            r#"{{"event":"initialized","worker":"{}","shard":"{}","t_ms":{}}}"#,
            self.worker,
            init.shard_id,
            now_ms()
        );
    }

    async fn process_records(&mut self, batch: Batch, checkpointer: &mut Checkpointer) {
        println!(
            r#"{{"event":"batch","worker":"{}","shard":"{}","count":{},"t_ms":{}}}"#,
            self.worker,
            batch.shard_id,
            batch.records.len(),
            now_ms()
        );
        let _ = checkpointer.checkpoint().await;
    }

    async fn shard_ended(&mut self, checkpointer: &mut Checkpointer) {
        let _ = checkpointer.checkpoint().await;
    }
}

/// `--role consume --stream S --app A --worker W --failover-ms F`: one worker of ours, until killed.
async fn role_consume(stream: &str, app: &str, worker: &str, failover_ms: u64) -> Result<(), BoxError> {
    let config = aws_config::defaults(aws_config::BehaviorVersion::latest()).load().await;
    let mut settings = SchedulerConfig::new(stream, app);
    settings.worker_id = worker.to_owned();
    settings.initial_position = InitialPosition::TrimHorizon;
    settings.failover = Duration::from_millis(failover_ms);
    let name = worker.to_owned();
    let scheduler = Scheduler::start(
        aws_sdk_kinesis::Client::new(&config),
        aws_sdk_dynamodb::Client::new(&config),
        settings,
        move |_: &str| BatchLines { worker: name.clone() },
    )?;
    scheduler.wait().await?;
    Ok(())
}

// ---------------------------------------------------------------- measuring a process tree

/// CPU seconds and peak resident memory of a process and its descendants, sampled from /proc.
#[derive(Default, Debug, Clone, Copy)]
struct Usage {
    cpu_seconds: f64,
    peak_rss_bytes: u64,
}

fn proc_stat(pid: u32) -> Option<(u32, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces: the fields after it start past the last ')'.
    let rest = &text[text.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ppid = fields.get(1)?.parse().ok()?;
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some((ppid, ticks))
}

fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("VmRSS:"))?.to_owned();
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .map_or(0, |kib| kib * 1024)
}

/// Samples the tree under `root` every 100 ms until `stop` is set.
fn sample_tree(root: u32, stop: Arc<std::sync::atomic::AtomicBool>) -> std::thread::JoinHandle<Usage> {
    std::thread::spawn(move || {
        let mut ticks: HashMap<u32, u64> = HashMap::new();
        let mut peak = 0u64;
        loop {
            let mut parents: HashMap<u32, u32> = HashMap::new();
            let mut all: HashMap<u32, u64> = HashMap::new();
            for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
                let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
                if let Some((ppid, t)) = proc_stat(pid) {
                    parents.insert(pid, ppid);
                    all.insert(pid, t);
                }
            }
            let in_tree = |mut pid: u32| {
                while pid > 1 {
                    if pid == root {
                        return true;
                    }
                    pid = parents.get(&pid).copied().unwrap_or(0);
                }
                false
            };
            let mut rss = 0;
            for (&pid, &t) in &all {
                if in_tree(pid) {
                    let seen = ticks.entry(pid).or_default();
                    *seen = (*seen).max(t);
                    rss += rss_bytes(pid);
                }
            }
            peak = peak.max(rss);
            if stop.load(std::sync::atomic::Ordering::Relaxed) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Usage { cpu_seconds: ticks.values().sum::<u64>() as f64 / TICKS_PER_SECOND, peak_rss_bytes: peak }
    })
}

/// A child under measurement, its JSON lines collected.
struct Measured {
    child: Child,
    started: Instant,
    started_ms: u64,
    lines: JsonLines,
    stop: Arc<std::sync::atomic::AtomicBool>,
    sampler: Option<std::thread::JoinHandle<Usage>>,
}

impl Measured {
    fn start(mut command: Command) -> Result<Measured, BoxError> {
        let started = Instant::now();
        let started_ms = now_ms();
        // Each child's log (the KCL's and KPL's included) goes to a file, for what a row claims.
        let (_, log) = child_log("vs_java")?;
        let mut child = command.stdout(Stdio::piped()).stderr(Stdio::from(log)).spawn()?;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sampler = Some(sample_tree(child.id(), stop.clone()));
        let lines = JsonLines::collect(child.stdout.take().ok_or("no stdout")?);
        Ok(Measured { child, started, started_ms, lines, stop, sampler })
    }

    fn records(&self) -> u64 {
        self.lines
            .with(|lines| lines.iter().filter(|l| l["event"] == "batch").filter_map(|l| l["count"].as_u64()).sum())
    }

    /// Ends the measurement: waits for the exit (or kills, when `kill`), returns the usage.
    fn finish(mut self, kill: bool) -> Result<(Usage, Duration, std::process::ExitStatus), BoxError> {
        if kill {
            let _ = self.child.kill();
        }
        let status = self.child.wait()?;
        let elapsed = self.started.elapsed();
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let usage = self.sampler.take().ok_or("sampled once")?.join().map_err(|_| "sampler panicked")?;
        Ok((usage, elapsed, status))
    }
}

impl Drop for Measured {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

// ---------------------------------------------------------------- the harness

struct Bed {
    kinesis: Kinesis,
    dynamodb: DynamoDb,
    tls: TlsFront,
    java: &'static JavaInterop,
}

impl Bed {
    fn env(&self) -> Vec<(&'static str, String)> {
        let mut env = child_env(Some(self.kinesis.endpoint_url()), Some(self.dynamodb.endpoint_url()));
        env.push(("KPL_KINESIS_ENDPOINT", self.tls.host_port()));
        env
    }

    fn ours(&self, args: &[&str]) -> Result<Command, BoxError> {
        let mut command = Command::new(std::env::current_exe()?);
        command.args(args).envs(self.env().iter().map(|(k, v)| (*k, v.as_str())));
        Ok(command)
    }

    fn java(&self, main: &str, args: &[&str]) -> Command {
        let mut command = self.java.command(&[], main, args);
        command.envs(self.env().iter().map(|(k, v)| (*k, v.as_str())));
        command
    }
}

/// Shard utilisation of what is stored in `stream`: bytes (data and partition keys) over the
/// write limit of its shards during the whole seconds in which records arrived.
async fn utilisation(kinesis: &Kinesis, stream: &str, shards: u64) -> Result<(f64, u64), BoxError> {
    let records = kinesis_testkit::read_stream(&kinesis.client(), stream).await?;
    let bytes: u64 = records.iter().map(|r| (r.data.len() + r.partition_key.len()) as u64).sum();
    let arrivals: Vec<u64> = records
        .iter()
        .filter_map(|r| r.approximate_arrival?.duration_since(UNIX_EPOCH).ok().map(|d| d.as_secs()))
        .collect();
    let (first, last) = (arrivals.iter().min().copied().unwrap_or(0), arrivals.iter().max().copied().unwrap_or(0));
    let seconds = (last - first + 1) as f64;
    Ok((bytes as f64 / (seconds * shards as f64 * 1024.0 * 1024.0), bytes))
}

async fn producer_table(bed: &Bed, records: usize) -> Result<(), BoxError> {
    println!("\nProducer: {records} records of 100 bytes, keys of 16 characters from 1,000, 4 shards, write limits on");
    println!("| producer | shard utilisation | whole run | CPU s per million records | peak RSS |");
    println!("|---|---:|---:|---:|---:|");
    for side in ["ours", "KPL 1.0.7"] {
        let stream = bed.kinesis.create_stream(4).await?;
        let n = records.to_string();
        let command = if side == "ours" {
            bed.ours(&["--role", "produce", "--stream", &stream, "--records", &n])?
        } else {
            bed.java(
                "KplWriter",
                &[
                    "--stream",
                    &stream,
                    "--generate",
                    &n,
                    "--size",
                    "100",
                    "--keys",
                    "1000",
                    "--key-len",
                    "16",
                    "--quiet",
                    "true",
                ],
            )
        };
        let measured = Measured::start(command)?;
        let (usage, elapsed, status) = tokio::task::spawn_blocking(move || measured.finish(false)).await??;
        if !status.success() {
            return Err(format!("{side}: the producer failed ({status})").into());
        }
        let (util, bytes) = utilisation(&bed.kinesis, &stream, 4).await?;
        println!(
            "| {side} | {:.1} % ({:.1} MB stored) | {:.1} s | {:.1} | {:.0} MiB |",
            util * 100.0,
            bytes as f64 / 1e6,
            elapsed.as_secs_f64(),
            usage.cpu_seconds / (records as f64 / 1e6),
            usage.peak_rss_bytes as f64 / (1024.0 * 1024.0)
        );
    }
    Ok(())
}

fn consumer_command(
    bed: &Bed,
    side: &str,
    stream: &str,
    app: &str,
    worker: &str,
    failover_ms: u64,
) -> Result<Command, BoxError> {
    let failover = failover_ms.to_string();
    Ok(if side == "ours" {
        bed.ours(&[
            "--role",
            "consume",
            "--stream",
            stream,
            "--app",
            app,
            "--worker",
            worker,
            "--failover-ms",
            &failover,
        ])?
    } else {
        bed.java(
            "KclReader",
            &["--stream", stream, "--app", app, "--worker", worker, "--failover-ms", &failover, "--report", "batches"],
        )
    })
}

/// Shards each worker holds now: its last `initialized` per shard, not followed by another
/// worker's.
fn holders(lines: &[(String, Value)]) -> BTreeMap<String, String> {
    let mut sorted: Vec<&(String, Value)> = lines.iter().filter(|(_, l)| l["event"] == "initialized").collect();
    sorted.sort_by_key(|(_, l)| l["t_ms"].as_u64());
    sorted.into_iter().map(|(w, l)| (l["shard"].as_str().unwrap_or("?").to_owned(), w.clone())).collect()
}

async fn consumer_table(bed: &Bed, records: usize, failover_ms: u64) -> Result<(), BoxError> {
    println!(
        "\nConsumer: {records} records (aggregated, 100 bytes) on 8 shards, a new lease table per run, failover {failover_ms} ms"
    );
    let stream = bed.kinesis.create_stream(8).await?;
    let producer = Producer::builder(bed.kinesis.client(), stream.clone()).build()?;
    let mut receipts = Vec::with_capacity(records);
    for i in 0..records {
        receipts.push(producer.put(record(i)).await?);
    }
    for receipt in receipts {
        receipt.await?;
    }
    producer.shutdown().await;

    println!("(the children's logs: {})", child_log_dir().display());
    println!(
        "| consumer | records/s | CPU s per million records | start-up to first record | failover after kill -9 |"
    );
    println!("|---|---:|---:|---:|---:|");
    for side in ["ours", "KCL 3.5.1"] {
        let app = unique_name("bench");
        let measured = Measured::start(consumer_command(bed, side, &stream, &app, "w-1", failover_ms)?)?;
        let deadline = Instant::now() + Duration::from_secs(600);
        while measured.records() < records as u64 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let lines = measured.lines.snapshot();
        let got = measured.records();
        let started_ms = measured.started_ms;
        let (usage, _, _) = tokio::task::spawn_blocking(move || measured.finish(true)).await??;
        let times = |event: &str| -> Vec<u64> {
            lines.iter().filter(|l| l["event"] == event).filter_map(|l| l["t_ms"].as_u64()).collect()
        };
        let (batches, starts) = (times("batch"), times("initialized"));
        let first = batches.iter().min().copied().unwrap_or(0);
        let last = batches.iter().max().copied().unwrap_or(0);
        // Reading starts when the first processor is initialized (its lease taken): the KCL
        // prefetches before it delivers, so first-to-last batch would leave its reads out.
        let reading_from = starts.iter().min().copied().unwrap_or(first).min(first);
        let rate = got as f64 / ((last - reading_from).max(1) as f64 / 1000.0);
        let failover = failover_time(bed, side, &stream, failover_ms).await?;
        println!(
            "| {side} | {rate:.0} ({got} read) | {:.1} | {:.1} s | {failover} |",
            usage.cpu_seconds / (got as f64 / 1e6),
            (first - started_ms) as f64 / 1000.0,
        );
    }
    Ok(())
}

/// Two workers of `side` on a new table; SIGKILL the one holding the most leases once no lease
/// has moved for two failover times; the time until the other has started a processor on every
/// shard the dead one held.
async fn failover_time(bed: &Bed, side: &str, stream: &str, failover_ms: u64) -> Result<String, BoxError> {
    let app = unique_name("failover");
    let mut workers = vec![
        ("w-1".to_owned(), Measured::start(consumer_command(bed, side, stream, &app, "w-1", failover_ms)?)?),
        ("w-2".to_owned(), Measured::start(consumer_command(bed, side, stream, &app, "w-2", failover_ms)?)?),
    ];
    let all = |workers: &Vec<(String, Measured)>| -> Vec<(String, Value)> {
        workers.iter().flat_map(|(w, m)| m.lines.snapshot().into_iter().map(move |l| (w.clone(), l))).collect()
    };
    // Settled: all 8 shards held, and no holder changed for two failover times (a 2.x-style
    // taker moves at most a few leases a round; the KCL 3.x leader assigns every 2 failover times).
    let settle = Duration::from_millis(2 * failover_ms);
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut last = (BTreeMap::new(), Instant::now());
    loop {
        let now = holders(&all(&workers));
        if now != last.0 {
            last = (now, Instant::now());
        } else if last.0.len() == 8 && last.1.elapsed() > settle {
            break;
        }
        if Instant::now() > deadline {
            return Ok(format!("not settled in 300 s: {:?}", last.0));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let held = last.0;
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for w in held.values() {
        *counts.entry(w.as_str()).or_default() += 1;
    }
    let victim = counts.iter().max_by_key(|(_, n)| **n).map(|(w, _)| (*w).to_owned()).ok_or("no holder")?;
    let orphaned: BTreeSet<String> = held.iter().filter(|(_, w)| **w == victim).map(|(s, _)| s.clone()).collect();
    let index = workers.iter().position(|(w, _)| *w == victim).ok_or("victim")?;
    let (_, killed) = workers.remove(index);
    let killed_at = now_ms();
    let _ = tokio::task::spawn_blocking(move || killed.finish(true)).await?;
    let survivor = &workers[0].1;
    let limit = Instant::now() + Duration::from_secs(300);
    loop {
        // (shard, when) of every start on the survivor since the kill.
        let starts: Vec<(String, u64)> = survivor.lines.with(|lines| {
            lines
                .iter()
                .filter(|l| l["event"] == "initialized")
                .filter_map(|l| Some((l["shard"].as_str()?.to_owned(), l["t_ms"].as_u64()?)))
                .filter(|(_, t)| *t >= killed_at)
                .collect()
        });
        let restarted: BTreeSet<String> = starts.iter().map(|(shard, _)| shard.clone()).collect();
        if orphaned.is_subset(&restarted) {
            let at = starts.iter().map(|(_, t)| *t).max().unwrap_or(killed_at);
            return Ok(format!("{:.1} s ({} of 8 leases moved)", (at - killed_at) as f64 / 1000.0, orphaned.len()));
        }
        if Instant::now() > limit {
            return Ok(format!(
                "> 300 s ({} of {} leases moved)",
                restarted.intersection(&orphaned).count(),
                orphaned.len()
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let number = |name: &str, default: u64| -> Result<u64, BoxError> {
        value(name).map_or(Ok(default), |v| v.parse().map_err(|_| format!("{name}: not a number. {USAGE}").into()))
    };
    if let Some(role) = value("--role") {
        let stream = value("--stream").ok_or(USAGE)?;
        return match role.as_str() {
            "produce" => role_produce(&stream, number("--records", 1_000_000)? as usize).await,
            "consume" => {
                let app = value("--app").ok_or(USAGE)?;
                let worker = value("--worker").ok_or(USAGE)?;
                role_consume(&stream, &app, &worker, number("--failover-ms", 10_000)?).await
            }
            other => Err(format!("unknown role {other}").into()),
        };
    }
    let records = number("--records", 1_000_000)? as usize;
    let consumer_records = number("--consumer-records", records as u64)? as usize;
    let failover_ms = number("--failover-secs", 10)? * 1000;
    let only = value("--only");
    let java = JavaInterop::get()?;
    let kinesis = Kinesis::embedded(KinesisOptions { enforce_limits: true, ..KinesisOptions::default() }).await?;
    let dynamodb = DynamoDb::embedded().await?;
    let tls = TlsFront::start(kinesis.endpoint_url()).await?;
    let bed = Bed { kinesis, dynamodb, tls, java };
    println!(
        "vs_java: {} cores; the emulators run in this process, each side in a child process",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    if only.as_deref() != Some("consumer") {
        producer_table(&bed, records).await?;
    }
    if only.as_deref() != Some("producer") {
        consumer_table(&bed, consumer_records, failover_ms).await?;
    }
    Ok(())
}
