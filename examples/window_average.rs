//! Stream processing with event time: a 10-second average temperature per sensor, tumbling or
//! sliding, read from one stream and written to another with the producer, checkpointed only
//! behind what was emitted and acknowledged.
//!
//! ```text
//! cargo run --example window_average                     # demo: embedded emulators, sample data
//! cargo run --example window_average -- --stream IN --output OUT [--table NAME] [--window-ms 10000]
//!     [--slide-ms 5000] [--idle-exit SECS] [--from trim-horizon|latest] [--failover-ms 10000]
//! ```
//!
//! Input records are JSON readings, `{"sensor":"s-3","temperature":21.5,"ts":<epoch ms>}`, put
//! with the sensor as partition key (so a sensor's readings are in one shard, in order). The
//! windows are `[k*S, k*S + W)` (W = `--window-ms`, S = `--slide-ms`, by default W: tumbling;
//! W must be a multiple of S). With `--window-ms 10000 --slide-ms 5000` they are Flink's "10 s
//! windows every 5 s". For each shard:
//! - a reading goes to the W/S windows of its sensor whose range holds its `ts`;
//! - the shard's **watermark** is the largest `ts` seen; a window is closed once the watermark
//!   reaches its end, and a reading whose windows are all closed is **late**: counted and left
//!   out (a reading with some of its windows open goes to those);
//! - closed windows are emitted to the output stream as
//!   `{"sensor","window_start","window_end","count","average","closed_by"}` (partition key: the
//!   sensor), and the producer's receipts are awaited;
//! - then the shard is checkpointed behind everything a window not yet emitted (or not yet
//!   acknowledged) needs, so that after a crash those windows are read again whole, and the
//!   windows already emitted are not rebuilt from a part of their readings (an emitted window
//!   whose checkpoint did not make it may come out twice, the same). The rule, with s_O the
//!   start of the oldest window not emitted (windows close in the order of their starts, so every
//!   window before s_O is emitted and acknowledged) and R* the first reading, in the shard's
//!   order, with `ts >= s_O` (every reading a window not emitted needs is at or after R*):
//!   - the checkpoint goes just before R* (at the record, or the aggregated sub-record, before
//!     it), but only when R* lies in the slide `[s_O, s_O + S)`. A processor that resumes from a
//!     checkpoint (a sequence number) then finds s_O again from the first reading it reads, as
//!     `ts - ts mod S`, and never builds a window that starts before it: a reading that only
//!     belongs to such windows (emitted before the restart) is counted as late;
//!   - otherwise (the readings jumped a slide or more ahead at s_O) the previous checkpoint
//!     stays: it is older, and reading again from it only emits again, whole and the same,
//!     windows already emitted;
//!   - with W = S (tumbling) R* always lies in its slide: the checkpoint is just before the first
//!     reading of the oldest window still open, and skipping is the late rule itself;
//!   - before the first reading of a shard started at its beginning (or at LATEST), invalid
//!     records are checkpointed past only with W = S (with sliding windows the first reading
//!     would otherwise be taken for R*);
//! - at the end of a shard, and at a graceful shutdown, the open windows are emitted too
//!   (`closed_by` says `shard_end` or `shutdown`) and the shard is checkpointed at its last
//!   record. A window cut by a shutdown may go on after a restart, as a second record for the
//!   same window; with sliding windows, only the windows from the slide of the first reading read
//!   after the restart on do (that reading's slide is taken for s_O, as after a crash).
//!
//! Without `--stream` it is a demo: it starts the embedded emulators (or uses
//! `AWS_ENDPOINT_URL_KINESIS` / `AWS_ENDPOINT_URL_DYNAMODB` when set), creates a 2-shard input
//! and a 1-shard output stream, writes a minute of readings from 6 sensors (and one late and one
//! invalid record), computes the averages, reads the output back and checks every window. With
//! `--stream` it runs until Ctrl-C, or until `--idle-exit` seconds without a record once its
//! shards are read.

mod support;

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, SystemTime};

use clap::Parser;
use kinesis::consumer::{
    Batch, CheckpointError, Checkpointer, ConfigError, Initialization, Position, Processor, Scheduler, SchedulerConfig,
    SchedulerError, cmp_sequence_numbers,
};
use kinesis::producer::{BuildError, Producer, ProducerConfig, PutError, UserRecord};
use kinesis_testkit::TestBed;
use serde::{Deserialize, Serialize};

use support::{Idle, StartFrom, exit_code, idle_limit};

/// Tumbling- or sliding-window average temperature per sensor, from one Kinesis stream to another.
#[derive(Parser, Debug)]
#[command(name = "window_average")]
struct Args {
    /// The stream of readings. Without it, demo streams are created and filled.
    #[arg(long)]
    stream: Option<String>,
    /// The stream the averages are written to (required with --stream).
    #[arg(long)]
    output: Option<String>,
    /// The lease table (the application's name). Default: `window-average-<stream>`.
    #[arg(long)]
    table: Option<String>,
    /// The window length, in milliseconds of event time.
    #[arg(long, default_value_t = 10_000)]
    window_ms: u32,
    /// How far apart windows start, in milliseconds of event time: a divisor of the window length.
    /// Default: the window length (tumbling windows).
    #[arg(long)]
    slide_ms: Option<u32>,
    /// Shut down gracefully (emitting the open windows) after this many seconds without a record,
    /// once every shard held has been read. Default: run until Ctrl-C (demo: 2).
    #[arg(long)]
    idle_exit: Option<f64>,
    /// Where shards never read before start.
    #[arg(long, value_enum, default_value_t = StartFrom::TrimHorizon)]
    from: StartFrom,
    /// The lease failover time: a crashed worker's shards are taken over after about this long.
    #[arg(long, default_value_t = 10_000)]
    failover_ms: u64,
}

/// What can stop the example.
#[derive(Debug, thiserror::Error)]
enum AverageError {
    #[error("invalid argument: {0}")]
    Usage(String),
    #[error("could not reach or start the emulators")]
    TestBed(#[source] kinesis_testkit::Error),
    #[error("the consumer's settings were refused")]
    Config(#[source] ConfigError),
    #[error("the consumer stopped")]
    Scheduler(#[source] SchedulerError),
    #[error("the consumer stopped by itself")]
    Stopped,
    #[error("the producer could not start")]
    Producer(#[source] BuildError),
    #[error("the demo's producer refused a record")]
    Put(#[source] PutError),
    #[error("demo check failed: {0}")]
    Demo(String),
}

/// An input record.
#[derive(Debug, Deserialize)]
struct Reading {
    sensor: String,
    temperature: f64,
    ts: i64,
}

/// The largest `ts` taken (in magnitude, 2^60 ms: 36 million years); beyond it a record is
/// invalid, so that window arithmetic cannot overflow.
const MAX_TS: i64 = 1 << 60;

/// The windows: `[k*slide, k*slide + length)` for every k; `length` is a multiple of `slide`.
#[derive(Clone, Copy, Debug)]
struct Windows {
    length: i64,
    slide: i64,
}

impl Windows {
    /// The start of the slide (the pane) holding `ts`: the newest window holding it.
    fn pane(self, ts: i64) -> i64 {
        ts.div_euclid(self.slide) * self.slide
    }

    /// The starts of the windows holding `ts`, oldest first.
    fn starts(self, ts: i64) -> impl Iterator<Item = i64> {
        let newest = self.pane(ts);
        (0..self.length / self.slide).rev().map(move |k| newest - k * self.slide)
    }

    /// The start of the oldest window the watermark has not closed.
    fn oldest_open(self, watermark: i64) -> i64 {
        self.pane(watermark - self.length) + self.slide
    }
}

/// An output record.
#[derive(Debug, Serialize)]
struct Average<'a> {
    sensor: &'a str,
    window_start: i64,
    window_end: i64,
    count: u64,
    average: f64,
    closed_by: &'static str,
}

/// Counters shared by the shards' processors.
#[derive(Debug, Default)]
struct Counters {
    readings: AtomicU64,
    late: AtomicU64,
    invalid: AtomicU64,
    windows: AtomicU64,
    delivery_failures: AtomicU64,
}

/// A position in a shard: (sequence number, sub-sequence number).
type At = (Arc<str>, u64);

fn cmp_at(a: &At, b: &At) -> Ordering {
    cmp_sequence_numbers(&a.0, &b.0).then(a.1.cmp(&b.1))
}

/// One sensor's window being summed.
#[derive(Debug)]
struct Window {
    sum: f64,
    count: u64,
}

/// The first reading of a pane (a slide of event time) in this processor's life.
#[derive(Debug)]
struct First {
    /// The reading's rank among the readings of this processor's life.
    rank: u64,
    /// The record just before it (`None`: nothing before it in this processor's life).
    before: Option<At>,
}

/// Which windows a processor may build.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Floor {
    /// Every window: the shard is read from its start (or LATEST, or a time), nothing was emitted.
    Any,
    /// Resumed from a checkpoint: the first reading's pane is the oldest window not emitted.
    FirstReading,
    /// Only the windows starting at or after this one; those before were emitted.
    From(i64),
}

/// One shard's windows.
struct Averager {
    shard: String,
    geometry: Windows,
    producer: Producer,
    counters: Arc<Counters>,
    watermark: Option<i64>,
    floor: Floor,
    /// Open (and closed but not yet acknowledged) windows by (start, sensor).
    windows: BTreeMap<(i64, String), Window>,
    /// The first reading of each pane from the oldest window not emitted on.
    panes: BTreeMap<i64, First>,
    /// The readings of this processor's life so far.
    ranks: u64,
    /// The newest record seen.
    last: Option<At>,
    /// The newest checkpoint written (or resumed from).
    saved: Option<At>,
}

impl Averager {
    fn new(shard: &str, geometry: Windows, producer: Producer, counters: Arc<Counters>) -> Self {
        Averager {
            shard: shard.to_owned(),
            geometry,
            producer,
            counters,
            watermark: None,
            floor: Floor::Any,
            windows: BTreeMap::new(),
            panes: BTreeMap::new(),
            ranks: 0,
            last: None,
            saved: None,
        }
    }

    fn end_of(&self, start: i64) -> i64 {
        start.saturating_add(self.geometry.length)
    }

    /// Emits the windows the watermark has closed (or every window, with `all`), and waits for
    /// their receipts. Acknowledged windows are done; the others stay, to be emitted again.
    /// Returns whether every window due was acknowledged.
    async fn emit(&mut self, all: bool, closed_by: &'static str) -> bool {
        let due: Vec<(i64, String)> = self
            .windows
            .keys()
            .filter(|(start, _)| all || self.watermark.is_some_and(|w| self.end_of(*start) <= w))
            .cloned()
            .collect();
        let mut receipts = Vec::with_capacity(due.len());
        let mut complete = true;
        for key in due {
            let window = &self.windows[&key];
            let average = Average {
                sensor: &key.1,
                window_start: key.0,
                window_end: self.end_of(key.0),
                count: window.count,
                average: window.sum / window.count as f64,
                closed_by,
            };
            let line = match serde_json::to_string(&average) {
                Ok(line) => line,
                Err(error) => {
                    eprintln!("{}: cannot encode {average:?}: {error}", self.shard);
                    complete = false;
                    continue;
                }
            };
            match self.producer.put(UserRecord::new(key.1.clone(), line.clone())).await {
                Ok(receipt) => receipts.push((key, line, receipt)),
                Err(error) => {
                    eprintln!("{}: the producer refused a window ({error})", self.shard);
                    self.counters.delivery_failures.fetch_add(1, Relaxed);
                    complete = false;
                }
            }
        }
        for (key, line, receipt) in receipts {
            match receipt.await {
                Ok(_) => {
                    self.windows.remove(&key);
                    self.counters.windows.fetch_add(1, Relaxed);
                    println!("{}: {} {line}", self.shard, clock(key.0));
                }
                Err(error) => {
                    eprintln!("{}: a window was not delivered ({error}); it is emitted again later", self.shard);
                    self.counters.delivery_failures.fetch_add(1, Relaxed);
                    complete = false;
                }
            }
        }
        complete
    }

    /// [`Averager::emit`] with `all`, tried up to three times.
    async fn emit_all(&mut self, closed_by: &'static str) -> bool {
        for attempt in 0..3 {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            if self.emit(true, closed_by).await {
                return true;
            }
        }
        false
    }

    /// Where a checkpoint is safe now (see the module's docs), if anywhere: just before R*, the
    /// first reading at or after the start s_O of the oldest window not emitted, when R* lies in
    /// the pane `[s_O, s_O + S)`. Forgets the panes before s_O.
    fn resume_point(&mut self) -> Option<At> {
        let Some(watermark) = self.watermark else {
            // No reading yet: the first one read again is the first one to come, and takes the
            // place of R* after a restart from a checkpoint, or for tumbling windows.
            let first_is_r = self.floor == Floor::FirstReading || self.geometry.length == self.geometry.slide;
            return if first_is_r { self.last.clone() } else { None };
        };
        let mut oldest = self.geometry.oldest_open(watermark);
        if let Floor::From(floor) = self.floor {
            oldest = oldest.max(floor);
        }
        if let Some(((start, _), _)) = self.windows.first_key_value() {
            // A closed window not acknowledged yet.
            oldest = oldest.min(*start);
        }
        self.panes = self.panes.split_off(&oldest);
        let (pane, first) = self.panes.iter().min_by_key(|(_, first)| first.rank)?;
        if *pane != oldest {
            // R* jumped a slide or more: a restart from just before it would take its pane for
            // s_O and leave out the windows in between.
            return None;
        }
        first.before.clone()
    }

    /// Checkpoints as far as is safe: at the newest record when every window was emitted and
    /// acknowledged (after a reading: before, as at [`Averager::resume_point`]), at
    /// [`Averager::resume_point`] otherwise (or not at all).
    async fn checkpoint(&mut self, checkpointer: &mut Checkpointer, all_emitted: bool) {
        let safe = if all_emitted && self.watermark.is_some() { self.last.clone() } else { self.resume_point() };
        let Some(safe) = safe else { return };
        if self.saved.as_ref().is_some_and(|saved| cmp_at(&safe, saved) != Ordering::Greater) {
            return;
        }
        match checkpointer.checkpoint_at(&safe.0, safe.1).await {
            Ok(()) => self.saved = Some(safe),
            Err(CheckpointError::LeaseLost { .. }) => self.forget(),
            Err(error) => eprintln!("{}: checkpoint failed ({error}); the next batch tries again", self.shard),
        }
    }

    fn forget(&mut self) {
        self.windows.clear();
        self.panes.clear();
        self.watermark = None;
    }
}

impl Processor for Averager {
    async fn initialize(&mut self, init: &Initialization) {
        if let Position::Sequence(sequence) = &init.checkpoint.position {
            let at: At = (sequence.as_str().into(), init.checkpoint.sub_sequence);
            self.last = Some(at.clone());
            self.saved = Some(at);
            self.floor = Floor::FirstReading;
        }
    }

    async fn process_records(&mut self, batch: Batch, checkpointer: &mut Checkpointer) {
        for record in &batch.records {
            let before = self.last.replace((record.sequence_number.clone(), record.sub_sequence_number));
            let reading = match serde_json::from_slice::<Reading>(&record.data) {
                Ok(reading) if reading.ts.unsigned_abs() <= MAX_TS.unsigned_abs() => reading,
                _ => {
                    self.counters.invalid.fetch_add(1, Relaxed);
                    continue;
                }
            };
            let pane = self.geometry.pane(reading.ts);
            let floor = match self.floor {
                Floor::Any => i64::MIN,
                Floor::FirstReading => {
                    self.floor = Floor::From(pane);
                    pane
                }
                Floor::From(floor) => floor,
            };
            if pane < floor {
                // Its windows were emitted before the restart.
                self.counters.late.fetch_add(1, Relaxed);
                continue;
            }
            self.ranks += 1;
            self.panes.entry(pane).or_insert(First { rank: self.ranks, before });
            let mut taken = false;
            for start in self.geometry.starts(reading.ts) {
                if start < floor || self.watermark.is_some_and(|w| self.end_of(start) <= w) {
                    continue;
                }
                let window =
                    self.windows.entry((start, reading.sensor.clone())).or_insert(Window { sum: 0.0, count: 0 });
                window.sum += reading.temperature;
                window.count += 1;
                taken = true;
            }
            if !taken {
                self.counters.late.fetch_add(1, Relaxed);
                continue;
            }
            self.watermark = Some(self.watermark.map_or(reading.ts, |w| w.max(reading.ts)));
            self.counters.readings.fetch_add(1, Relaxed);
        }
        self.emit(false, "watermark").await;
        self.checkpoint(checkpointer, false).await;
    }

    async fn lease_lost(&mut self) {
        self.forget();
    }

    async fn shard_ended(&mut self, checkpointer: &mut Checkpointer) {
        // Every reading of the shard is in: the open windows are complete.
        if self.emit_all("shard_end").await {
            if let Err(error) = checkpointer.checkpoint().await {
                eprintln!("{}: checkpointing SHARD_END failed ({error})", self.shard);
            }
        } else {
            eprintln!("{}: windows not delivered; SHARD_END is checkpointed at the next try", self.shard);
        }
    }

    async fn shutdown_requested(&mut self, checkpointer: &mut Checkpointer) {
        let all_emitted = self.emit_all("shutdown").await;
        self.checkpoint(checkpointer, all_emitted).await;
    }
}

/// The time of day (UTC) of an epoch-millisecond time, for the log.
fn clock(epoch_ms: i64) -> String {
    let secs = epoch_ms.div_euclid(1000).rem_euclid(86_400);
    format!("{:02}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60)
}

#[tokio::main]
async fn main() -> ExitCode {
    exit_code("window_average", run(Args::parse()).await)
}

async fn run(args: Args) -> Result<(), AverageError> {
    let geometry = geometry(args.window_ms, args.slide_ms).map_err(AverageError::Usage)?;
    let idle_exit = idle_limit(args.idle_exit.or(args.stream.is_none().then_some(2.0))).map_err(AverageError::Usage)?;
    let existing = match (&args.stream, &args.output) {
        (Some(input), Some(output)) => Some((input.clone(), output.clone())),
        (Some(_), None) => return Err(AverageError::Usage("--output is required with --stream".into())),
        (None, _) => None,
    };
    let bed = TestBed::start().await.map_err(AverageError::TestBed)?;
    println!("Kinesis at {}, DynamoDB at {}", bed.kinesis.endpoint_url(), bed.dynamodb.endpoint_url());
    let (input, output, expected) = match existing {
        Some((input, output)) => (input, output, None),
        None => {
            let input = bed.kinesis.create_stream(2).await.map_err(AverageError::TestBed)?;
            let output = bed.kinesis.create_stream(1).await.map_err(AverageError::TestBed)?;
            let expected = write_sample(&bed, &input, geometry).await?;
            (input, output, Some(expected))
        }
    };
    let table = args.table.clone().unwrap_or_else(|| format!("window-average-{input}"));
    let mut config = SchedulerConfig::new(&input, &table);
    config.initial_position = args.from.position();
    config.failover = Duration::from_millis(args.failover_ms);
    // An idle shard is read twice a second (the KCL's 1.5 s saves calls; records come sooner).
    config.polling.idle_time_between_reads = Duration::from_millis(500);
    let Windows { length, slide } = geometry;
    println!("averaging {input} over {length} ms windows every {slide} ms into {output} (lease table {table})");

    let producer = Producer::builder(bed.kinesis.client(), &output).build().map_err(AverageError::Producer)?;
    let counters = Arc::new(Counters::default());
    let scheduler = {
        let (producer, counters) = (producer.clone(), counters.clone());
        Scheduler::start(bed.kinesis.client(), bed.dynamodb.client(), config, move |shard: &str| {
            Averager::new(shard, geometry, producer.clone(), counters.clone())
        })
        .map_err(AverageError::Config)?
    };
    let stopped = wait(&scheduler, idle_exit).await;
    let shut_down = scheduler.shutdown().await;
    producer.shutdown().await;
    shut_down.map_err(AverageError::Scheduler)?;
    if stopped {
        return Err(AverageError::Stopped);
    }
    let get = |c: &AtomicU64| c.load(Relaxed);
    println!(
        "done: {} readings, {} late, {} invalid; {} windows emitted, {} delivery failures",
        get(&counters.readings),
        get(&counters.late),
        get(&counters.invalid),
        get(&counters.windows),
        get(&counters.delivery_failures)
    );
    if let Some(expected) = expected {
        check_demo(&bed, &output, &expected).await?;
    }
    Ok(())
}

/// `--window-ms` and `--slide-ms` (default: the window) as windows; the message names the bad
/// value.
fn geometry(window_ms: u32, slide_ms: Option<u32>) -> Result<Windows, String> {
    let slide_ms = slide_ms.unwrap_or(window_ms);
    if window_ms == 0 {
        return Err("--window-ms must be positive".into());
    }
    if slide_ms == 0 {
        return Err("--slide-ms must be positive".into());
    }
    if !window_ms.is_multiple_of(slide_ms) {
        return Err(format!(
            "--window-ms {window_ms} is not a multiple of --slide-ms {slide_ms} (a reading must belong to a whole number of windows)"
        ));
    }
    Ok(Windows { length: i64::from(window_ms), slide: i64::from(slide_ms) })
}

/// Waits for Ctrl-C or the idle exit; returns whether the worker stopped by itself instead.
async fn wait(scheduler: &Scheduler, idle_exit: Option<Duration>) -> bool {
    let mut idle = Idle::new(idle_exit);
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut ctrl_c_armed = true;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if scheduler.is_finished() {
                    return true;
                }
                if idle.poll(scheduler) {
                    println!("no record for {:?}: shutting down", idle_exit.unwrap_or_default());
                    return false;
                }
            }
            signal = &mut ctrl_c, if ctrl_c_armed => {
                ctrl_c_armed = false;
                match signal {
                    Ok(()) => {
                        println!("Ctrl-C: emitting the open windows and shutting down");
                        return false;
                    }
                    Err(error) => eprintln!("Ctrl-C cannot be watched ({error}); stop with --idle-exit or a signal"),
                }
            }
        }
    }
}

/// The demo's averages: (sensor, window start) to (count, average).
type Expected = BTreeMap<(String, i64), (u64, f64)>;

/// Writes a minute of readings of 6 sensors (one a second each, in time order), then one late
/// reading and one invalid record; returns the averages they must give.
async fn write_sample(bed: &TestBed, stream: &str, geometry: Windows) -> Result<Expected, AverageError> {
    // Per partition key in put order, across retries: a sensor's readings stay in time order.
    let config = ProducerConfig { ordering: true, ..Default::default() };
    let producer =
        Producer::builder(bed.kinesis.client(), stream).config(config).build().map_err(AverageError::Producer)?;
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_millis();
    let start = i64::try_from(now).unwrap_or(i64::MAX / 2) - 120_000;
    let mut sums: BTreeMap<(String, i64), (u64, f64)> = BTreeMap::new();
    let mut records = Vec::new();
    for second in 0..60 {
        let ts = start + second * 1000;
        for sensor in 0..6 {
            let name = format!("s-{sensor}");
            let temperature = format!("{:.1}", 18.0 + f64::from(sensor) + fastrand::f64() * 4.0);
            // The value the consumer reads is the one written: parsed from the same text.
            let value: f64 = temperature.parse().map_err(|_| AverageError::Demo("a bad sample".into()))?;
            for window in geometry.starts(ts) {
                let entry = sums.entry((name.clone(), window)).or_insert((0, 0.0));
                entry.0 += 1;
                entry.1 += value;
            }
            records.push((name.clone(), format!(r#"{{"sensor":"{name}","temperature":{temperature},"ts":{ts}}}"#)));
        }
    }
    // Late: its window closed long before (its shard's watermark is a minute later).
    records.push(("s-0".into(), format!(r#"{{"sensor":"s-0","temperature":99.9,"ts":{start}}}"#)));
    records.push(("s-1".into(), "not a reading".into()));
    let mut receipts = Vec::new();
    for (key, data) in &records {
        receipts.push(producer.put(UserRecord::new(key.clone(), data.clone())).await.map_err(AverageError::Put)?);
    }
    let mut failed = 0;
    for receipt in receipts {
        failed += usize::from(receipt.await.is_err());
    }
    producer.shutdown().await;
    if failed > 0 {
        return Err(AverageError::Demo(format!("{failed} sample records were not delivered")));
    }
    println!("demo: wrote {} readings of 6 sensors over 60 s (one late, one invalid) to {stream}", records.len());
    Ok(sums.into_iter().map(|(key, (count, sum))| (key, (count, sum / count as f64))).collect())
}

/// Reads the output stream back and compares every window with the expected average.
async fn check_demo(bed: &TestBed, output: &str, expected: &Expected) -> Result<(), AverageError> {
    let records = kinesis_testkit::read_stream(&bed.kinesis.client(), output).await.map_err(AverageError::TestBed)?;
    let mut got: Expected = BTreeMap::new();
    for record in records {
        let unpacked = kinesis::aggregation::deaggregate(&record.partition_key, record.data.into());
        for user in unpacked.records {
            let value: serde_json::Value = serde_json::from_slice(user.data())
                .map_err(|e| AverageError::Demo(format!("an output record is not JSON: {e}")))?;
            let (Some(sensor), Some(start), Some(count), Some(average)) = (
                value["sensor"].as_str(),
                value["window_start"].as_i64(),
                value["count"].as_u64(),
                value["average"].as_f64(),
            ) else {
                return Err(AverageError::Demo(format!("an output record lacks a field: {value}")));
            };
            got.insert((sensor.to_owned(), start), (count, average));
        }
    }
    let wrong: Vec<_> = expected.iter().filter(|(key, want)| got.get(*key) != Some(want)).collect();
    println!("demo: {} windows expected, {} emitted, {} wrong or missing", expected.len(), got.len(), wrong.len());
    if !wrong.is_empty() || got.len() != expected.len() {
        return Err(AverageError::Demo(format!("windows differ from the expected averages, e.g. {:?}", wrong.first())));
    }
    Ok(())
}
