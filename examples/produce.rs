//! The producer end to end, and its load generator: put records, watch them go, await every
//! receipt, and print throughput, shard utilisation and peak memory.
//!
//! By default it runs against the embedded Kinesis emulator (ferrokinesis), started in a child
//! process of this example so that the peak RSS it reports is the producer's alone; or against the
//! endpoint in `AWS_ENDPOINT_URL_KINESIS`. With `--stream NAME` it writes to that existing stream
//! with the default AWS configuration (region, credentials) and creates nothing.
//!
//! ```text
//! cargo run --release --example produce                                   # 100,000 records, 4 shards
//! cargo run --release --example produce -- --throttle --duration 20 --compare plain   # the benchmark
//! cargo run --release --example produce -- --throttle --duration 60       # a 60 s throttled run: peak RSS
//! cargo run --release --example produce -- --throttle --duration 20 --compare ordering
//! cargo run --release --example produce -- --stream my-stream --records 1000       # a real stream
//! cargo run --release --example produce -- --throttle --duration 20 --streams 16  # one producer, 16 streams
//! ```
//!
//! With `--streams N` one producer (`Producer::multi_stream`) puts to N streams of `--shards`
//! shards each, record i to stream i mod N, and the summary adds each stream's share of its write
//! limit and the process's CPU seconds per million records.
//!
//! Records are 100 bytes, with 16-character partition keys drawn from 1,000 keys. Each mode runs
//! on a stream of its own: the main one (aggregated; `--no-aggregation` or `--ordering` change it),
//! then each mode of `--compare` with the same load. It exits with an error if any record was not
//! delivered.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_config::BehaviorVersion;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use kinesis_producer::{Producer, ProducerConfig, UserRecord};
use kinesis_testkit::{KINESIS_ENDPOINT_VAR, Kinesis, KinesisOptions};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const USAGE: &str = "usage: produce [--records N | --duration SECS] [--shards N] [--throttle] \
                     [--no-aggregation | --ordering] [--compare plain,ordering,aggregated] \
                     [--buffer-records N] [--buffer-mib N] [--stream NAME] [--streams N]";

/// How a run's producer is configured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// The KPL's defaults: aggregation per predicted shard.
    Aggregated,
    /// One PutRecords entry per user record: a plain client at the same rate limits.
    Plain,
    /// Aggregated, in ordering mode.
    Ordering,
}

impl Mode {
    fn parse(text: &str) -> Result<Mode, BoxError> {
        match text {
            "aggregated" => Ok(Mode::Aggregated),
            "plain" => Ok(Mode::Plain),
            "ordering" => Ok(Mode::Ordering),
            other => Err(format!("unknown mode {other}: aggregated, plain or ordering").into()),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Mode::Aggregated => "aggregated",
            Mode::Plain => "plain",
            Mode::Ordering => "ordering",
        }
    }

    fn config(self, args: &Args) -> ProducerConfig {
        let defaults = ProducerConfig::default();
        ProducerConfig {
            aggregation: self != Mode::Plain,
            ordering: self == Mode::Ordering,
            max_buffered_records: args.buffer_records.unwrap_or(defaults.max_buffered_records),
            max_buffered_bytes: args.buffer_mib.map_or(defaults.max_buffered_bytes, |mib| mib << 20),
            ..defaults
        }
    }
}

struct Args {
    records: u64,
    /// Put for this long instead of a count.
    duration: Option<Duration>,
    shards: u32,
    /// Streams one producer puts to (record i to stream i mod N).
    streams: u32,
    throttle: bool,
    modes: Vec<Mode>,
    stream: Option<String>,
    /// Buffer caps, when not the defaults.
    buffer_records: Option<usize>,
    buffer_mib: Option<usize>,
    /// Be the emulator process (internal: the parent starts it).
    serve_emulator: bool,
}

fn parse_args() -> Result<Args, BoxError> {
    let mut args = Args {
        records: 100_000,
        duration: None,
        shards: 4,
        streams: 1,
        throttle: false,
        modes: vec![Mode::Aggregated],
        stream: None,
        buffer_records: None,
        buffer_mib: None,
        serve_emulator: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{arg} needs a value; {USAGE}"));
        match arg.as_str() {
            "--records" => args.records = value()?.replace('_', "").parse()?,
            "--shards" => args.shards = value()?.parse()?,
            "--streams" => args.streams = value()?.parse::<u32>()?.max(1),
            "--stream" => args.stream = Some(value()?),
            "--throttle" => args.throttle = true,
            "--no-aggregation" => args.modes[0] = Mode::Plain,
            "--ordering" => args.modes[0] = Mode::Ordering,
            "--compare" => {
                for mode in value()?.split(',') {
                    args.modes.push(Mode::parse(mode)?);
                }
            }
            "--duration" => args.duration = Some(Duration::from_secs_f64(value()?.parse()?)),
            "--buffer-records" => args.buffer_records = Some(value()?.replace('_', "").parse()?),
            "--buffer-mib" => args.buffer_mib = Some(value()?.parse()?),
            "--serve-emulator" => args.serve_emulator = true,
            _ => return Err(format!("unknown argument {arg}; {USAGE}").into()),
        }
    }
    if args.stream.is_some() && (args.throttle || args.shards != 4 || args.streams != 1) {
        return Err("--shards, --streams and --throttle apply to the embedded emulator only, not with --stream".into());
    }
    Ok(args)
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args = parse_args()?;
    if args.serve_emulator {
        return serve_emulator(args.throttle).await;
    }

    // Where to write. Keep `_emulator` alive until the end: dropping it stops the emulator.
    let (_emulator, target) = match &args.stream {
        Some(stream) => {
            let config = aws_config::load_defaults(BehaviorVersion::latest()).await;
            println!("stream {stream} in {}", config.region().map_or("no region configured", |r| r.as_ref()));
            (None, Target::Stream(aws_sdk_kinesis::Client::new(&config), stream.clone()))
        }
        None if std::env::var_os(KINESIS_ENDPOINT_VAR).is_some() => {
            let kinesis = Kinesis::start().await?;
            println!("emulator at {} ({KINESIS_ENDPOINT_VAR})", kinesis.endpoint_url());
            (None, Target::Emulator(kinesis))
        }
        None => {
            let (child, kinesis) = start_emulator_process(args.throttle).await?;
            let limits = if args.throttle {
                "per-shard write limits on: 1,000 records/s and 1 MiB/s"
            } else {
                "the emulator does not throttle"
            };
            println!("emulator process {} at {} ({limits})", child.id().unwrap_or(0), kinesis.endpoint_url());
            (Some(child), Target::Emulator(kinesis))
        }
    };

    let mut results = Vec::new();
    for &mode in &args.modes {
        let (client, streams) = match &target {
            Target::Stream(client, stream) => (client.clone(), vec![stream.clone()]),
            Target::Emulator(kinesis) => {
                let mut streams = Vec::new();
                for _ in 0..args.streams {
                    streams.push(kinesis.create_stream(args.shards).await?);
                }
                (kinesis.client(), streams)
            }
        };
        println!("\n== {}: streams {}, {} shards each", mode.name(), streams.join(" "), args.shards);
        results.push(run(mode, client, streams, &args).await?);
    }

    print_summary(&results, &args);
    let failed: u64 = results.iter().map(|r| r.failed).sum();
    if failed > 0 {
        return Err(format!("{failed} records were not delivered").into());
    }
    Ok(())
}

enum Target {
    Stream(aws_sdk_kinesis::Client, String),
    Emulator(Kinesis),
}

/// One second of a run: (seconds since the start, user records delivered, Kinesis bytes
/// delivered, loaded: still putting or a backlog buffered).
type Sample = (f64, u64, u64, bool);

/// What one mode's run measured.
struct RunResult {
    mode: Mode,
    delivered: u64,
    failed: u64,
    secs: f64,
    /// Median per-second rates under load (putting, or a backlog buffered), leaving out the
    /// first two seconds (ramp-up): user records/s and Kinesis bytes/s (partition key + data).
    steady: Option<(f64, f64)>,
    retries: u64,
    peak_rss: Option<u64>,
    buffer_cap: usize,
    record_cap: usize,
    /// Each stream's Kinesis bytes (partition key + data) delivered over the whole run.
    stream_bytes: Vec<(String, u64)>,
    /// This process's CPU seconds (user + system) over the run.
    cpu_seconds: Option<f64>,
}

async fn run(
    mode: Mode,
    client: aws_sdk_kinesis::Client,
    streams: Vec<String>,
    args: &Args,
) -> Result<RunResult, BoxError> {
    let config = mode.config(args);
    let (buffer_cap, record_cap) = (config.max_buffered_bytes, config.max_buffered_records);
    reset_peak_rss();
    let cpu_at_start = cpu_seconds();
    let producer = match &streams[..] {
        [one] => Producer::builder(client, one.clone()).config(config).build()?,
        _ => Producer::multi_stream(client).config(config).build()?,
    };

    // Progress once a second, from the metrics; the per-second samples give the steady state.
    let started = Instant::now();
    let putting = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let samples: Arc<Mutex<Vec<Sample>>> = Arc::default();
    let progress = tokio::spawn({
        let (producer, putting, samples) = (producer.clone(), putting.clone(), samples.clone());
        async move {
            let mut tick = tokio::time::interval_at((started + Duration::from_secs(1)).into(), Duration::from_secs(1));
            let (mut last_records, mut last_bytes) = (0, 0);
            loop {
                tick.tick().await;
                let m = producer.metrics();
                let (records, bytes) = (m.user_records_put - last_records, m.kinesis_records_data_put - last_bytes);
                (last_records, last_bytes) = (m.user_records_put, m.kinesis_records_data_put);
                let t = started.elapsed().as_secs_f64();
                println!(
                    "{t:6.1} s  put {:>9}  delivered {:>9}  buffered {:>7}  {records:>7} records/s  {:>5.2} MB/s",
                    m.user_records_received,
                    m.user_records_put,
                    m.user_records_pending,
                    bytes as f64 / 1e6,
                );
                // Loaded: still putting, or at least a tenth of the buffer waiting to go.
                let loaded = putting.load(std::sync::atomic::Ordering::Relaxed)
                    || m.user_records_pending as usize >= record_cap / 10;
                samples.lock().unwrap_or_else(|p| p.into_inner()).push((t, records, bytes, loaded));
            }
        }
    });

    // Receipts are awaited by a task of their own, in whatever order they resolve (a record being
    // retried must not hold up the receipts behind it), while this one keeps putting.
    let (receipts_tx, mut receipts_rx) = tokio::sync::mpsc::channel(1024);
    let receipts = tokio::spawn(async move {
        let (mut delivered, mut failed) = (0u64, 0u64);
        let mut waiting = FuturesUnordered::new();
        let mut open = true;
        loop {
            tokio::select! {
                receipt = receipts_rx.recv(), if open => match receipt {
                    Some(receipt) => waiting.push(receipt),
                    None => open = false,
                },
                Some(result) = waiting.next(), if !waiting.is_empty() => match result as Result<kinesis_producer::Receipt, kinesis_producer::DeliveryError> {
                    Ok(_) => delivered += 1,
                    Err(error) => {
                        if failed < 5 {
                            let attempts = error.attempts();
                            let span = match (attempts.first(), attempts.last()) {
                                (Some(first), Some(last)) => last.at.duration_since(first.at).unwrap_or_default(),
                                _ => Duration::ZERO,
                            };
                            eprintln!(
                                "failed: {error} after {} attempts over {:.1} s",
                                attempts.len(),
                                span.as_secs_f64(),
                            );
                        }
                        failed += 1;
                    }
                },
                else => break,
            }
        }
        (delivered, failed)
    });

    // 16-character keys: "key-" and 12 digits.
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
        let receipt = match &streams[..] {
            [_] => producer.put(record).await?,
            _ => producer.put_to(&streams[(i % streams.len() as u64) as usize], record).await?,
        };
        receipts_tx.send(receipt).await?;
        sent += 1;
    }
    putting.store(false, std::sync::atomic::Ordering::Relaxed);
    producer.flush().await; // send what is lingering now, and wait for every record
    drop(receipts_tx);
    let (delivered, failed) = receipts.await?;
    let secs = started.elapsed().as_secs_f64();
    producer.shutdown().await;
    progress.abort();
    let cpu_seconds = cpu_seconds().zip(cpu_at_start).map(|(end, start)| end - start);
    let mut stream_bytes: Vec<(String, u64)> =
        producer.metrics_by_stream().into_iter().map(|(s, m)| (s, m.kinesis_records_data_put)).collect();
    stream_bytes.sort();

    let m = producer.metrics();
    let samples = samples.lock().unwrap_or_else(|p| p.into_inner()).clone();
    // Steady state: the loaded seconds after the first two.
    let steady: Vec<(u64, u64)> =
        samples.iter().filter(|&&(t, _, _, loaded)| t > 2.5 && loaded).map(|&(_, r, b, _)| (r, b)).collect();
    let steady = (steady.len() >= 3).then(|| {
        let median = |mut v: Vec<u64>| {
            v.sort_unstable();
            v[v.len() / 2] as f64
        };
        (median(steady.iter().map(|s| s.0).collect()), median(steady.iter().map(|s| s.1).collect()))
    });
    println!(
        "{}: {delivered} of {sent} delivered in {secs:.2} s; {} Kinesis records ({:.1} user records each); \
         {} PutRecords calls; {} retries; errors {:?}",
        mode.name(),
        m.kinesis_records_put,
        m.user_records_per_kinesis_record(),
        m.put_records_requests,
        m.retries,
        m.errors_by_code
    );
    Ok(RunResult {
        mode,
        delivered,
        failed,
        secs,
        steady,
        retries: m.retries,
        peak_rss: peak_rss_bytes(),
        buffer_cap,
        record_cap,
        stream_bytes,
        cpu_seconds,
    })
}

fn print_summary(results: &[RunResult], args: &Args) {
    // What the shards can take, in Kinesis bytes (partition key + data) per second.
    let stream_limit = f64::from(args.shards) * 1_048_576.0;
    let byte_limit = f64::from(args.streams) * stream_limit;
    println!(
        "\n== summary: {} stream(s) of {} shards; 100-byte records, 16-character keys from 1,000",
        args.streams, args.shards
    );
    println!(
        "{:<11} {:>9} {:>9} {:>14} {:>14} {:>12} {:>12} {:>9} {:>8} {:>10} {:>9}",
        "mode",
        "delivered",
        "seconds",
        "steady rec/s",
        "steady MB/s",
        "utilisation",
        "whole rec/s",
        "rec/shard",
        "retries",
        "peak RSS",
        "RSS/cap"
    );
    for (i, r) in results.iter().enumerate() {
        let (steady_records, steady_bytes) = r.steady.unwrap_or((f64::NAN, f64::NAN));
        let rss = r.peak_rss.map_or(f64::NAN, |b| b as f64 / 1_048_576.0);
        println!(
            "{:<11} {:>9} {:>9.2} {:>14.0} {:>14.3} {:>11.1}% {:>12.0} {:>9.0} {:>8} {:>6.1} MiB {:>8.2}x{}",
            r.mode.name(),
            r.delivered,
            r.secs,
            steady_records,
            steady_bytes / 1e6,
            100.0 * steady_bytes / byte_limit,
            r.delivered as f64 / r.secs,
            steady_records / f64::from(args.shards),
            r.retries,
            rss,
            rss * 1_048_576.0 / r.buffer_cap as f64,
            if i > 0 { " *" } else { "" },
        );
    }
    for r in results {
        let cpu = r.cpu_seconds.map_or(f64::NAN, |s| s / (r.delivered as f64 / 1e6));
        let shares: Vec<f64> =
            r.stream_bytes.iter().map(|(_, bytes)| 100.0 * *bytes as f64 / r.secs / stream_limit).collect();
        let (low, high) = shares.iter().fold((f64::INFINITY, 0.0f64), |(lo, hi), s| (lo.min(*s), hi.max(*s)));
        println!(
            "{}: {cpu:.2} CPU s per million records; over the whole run each stream used {low:.1}-{high:.1} % of its \
             write limit ({} streams)",
            r.mode.name(),
            shares.len()
        );
    }
    if let Some(first) = results.first() {
        for other in &results[1..] {
            let ratio = |a: Option<(f64, f64)>, b: Option<(f64, f64)>| match (a, b) {
                (Some(a), Some(b)) => a.0 / b.0,
                _ => f64::NAN,
            };
            println!(
                "{} / {}: {:.2}x steady user records/s, {:.2}x over the whole run",
                first.mode.name(),
                other.mode.name(),
                ratio(first.steady, other.steady),
                (first.delivered as f64 / first.secs) / (other.delivered as f64 / other.secs)
            );
        }
        if results.len() > 1 {
            println!("* after the first run, peak RSS includes what the allocator kept from the runs before");
        }
        println!(
            "buffer caps: {} MiB (each record counted with RECORD_OVERHEAD_BYTES), {} records; peak RSS is \
             this process's (the emulator runs in another)",
            first.buffer_cap >> 20,
            first.record_cap
        );
    }
}

/// Starts this example again as the emulator process; returns it and a handle on its endpoint.
/// The child stops when its stdin closes, that is when this process exits.
async fn start_emulator_process(throttle: bool) -> Result<(tokio::process::Child, Kinesis), BoxError> {
    let mut command = tokio::process::Command::new(std::env::current_exe()?);
    command.arg("--serve-emulator").stdin(Stdio::piped()).stdout(Stdio::piped()).kill_on_drop(true);
    if throttle {
        command.arg("--throttle");
    }
    let mut child = command.spawn()?;
    let stdout = child.stdout.take().ok_or("the emulator process has no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .map_err(|_| "the emulator process did not start within 30 s")??
        .ok_or("the emulator process exited before it said where it listens")?;
    let url = line.strip_prefix("listening ").ok_or_else(|| format!("unexpected line from the emulator: {line}"))?;
    Ok((child, Kinesis::connect(url)))
}

/// The emulator process: ferrokinesis on 127.0.0.1 until stdin closes.
async fn serve_emulator(throttle: bool) -> Result<(), BoxError> {
    let kinesis = Kinesis::start_with(KinesisOptions { enforce_limits: throttle, ..Default::default() }).await?;
    println!("listening {}", kinesis.endpoint_url());
    let mut sink = Vec::new();
    let _ = tokio::io::stdin().read_to_end(&mut sink).await;
    Ok(())
}

/// This process's CPU seconds so far (user + system, /proc/self/stat in USER_HZ ticks: 100 a
/// second on Linux), where the OS reports them.
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The fields after the command name (which may hold spaces) start after its ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

/// Resets the process's peak RSS (Linux: `5` to /proc/self/clear_refs), so each run reports its own.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// The process's peak resident set size (VmHWM), where the OS reports it (Linux).
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
