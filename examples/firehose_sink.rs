//! A Firehose-style sink: a consumer that buffers each shard's records by size or by time and
//! writes them to rotated, newline-delimited files, checkpointing only what is durably on disk.
//!
//! ```text
//! cargo run --example firehose_sink                      # demo: embedded emulators, sample data
//! cargo run --example firehose_sink -- --stream NAME [--table NAME] [--dir PATH] [--prefix part]
//!     [--max-bytes 5242880] [--interval-ms 60000] [--idle-exit SECS]
//!     [--from trim-horizon|latest] [--failover-ms 10000]
//! ```
//!
//! What it shows:
//! - **Buffering as Firehose does**: per shard, a file is written when the buffered lines reach
//!   `--max-bytes` (default 5 MiB) or when the oldest buffered record has waited `--interval-ms`
//!   (default 60 s), whichever comes first. A file never holds more than `--max-bytes` unless a
//!   single record is larger.
//! - **Files whose names say what they hold**:
//!   `<dir>/<shard-id>/<prefix>-<first-seq>-<first-sub>_<last-seq>-<last-sub>.ndjson`, one record's
//!   data a line (a newline inside a record becomes a space: JSON, whose strings cannot hold a raw
//!   newline, keeps its value). Names sort in the shard's order; a record delivered again after a
//!   crash lands in a file of the same name, which the rename replaces.
//! - **Checkpoints only after a file is durable**: write `.<name>.tmp`, fsync it, rename it, fsync
//!   the directory, and only then checkpoint at the file's last record. A crash at any point
//!   loses nothing that was checkpointed: what is after the checkpoint is read again. Temporary
//!   files left by a crash are removed when the shard is next written.
//! - The [`Batches`] stream adapter: one loop owns every shard's buffer, so a timer can flush a
//!   shard that no longer receives records. A buffer keeps its batches until they are written, so
//!   a closed shard's SHARD_END is not checkpointed before its last records are on disk.
//!
//! Without `--stream` it is a demo: it starts the embedded emulators (ferrokinesis and dynoxide;
//! or uses `AWS_ENDPOINT_URL_KINESIS` / `AWS_ENDPOINT_URL_DYNAMODB` when set), creates a 2-shard
//! stream, writes `--records` JSON records with the producer, sinks them (files of 256 KiB or 2 s,
//! unless given), and checks that every record is in a file. With `--stream`, it sinks that
//! stream until Ctrl-C, or until `--idle-exit` seconds without a record once its shards are read.

mod support;

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use futures_util::StreamExt;
use kinesis::consumer::{
    Batches, CheckpointError, Checkpointer, ConfigError, Record, SchedulerConfig, SchedulerError, ShardBatch,
};
use kinesis::producer::{BuildError, Producer, PutError, UserRecord};
use kinesis_testkit::TestBed;
use tokio::time::Instant;

use support::{Idle, StartFrom, exit_code, idle_limit};

/// Reads a Kinesis stream into rotated newline-delimited files, Firehose style.
#[derive(Parser, Debug)]
#[command(name = "firehose_sink")]
struct Args {
    /// An existing stream to sink. Without it, a demo stream is created and filled.
    #[arg(long)]
    stream: Option<String>,
    /// The lease table (the application's name). Default: `firehose-sink-<stream>`.
    #[arg(long)]
    table: Option<String>,
    /// Where files go: `<dir>/<shard-id>/<prefix>-...ndjson`. Default: `./firehose-out` (demo: a
    /// new directory under the system's temporary directory).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// The start of every file name.
    #[arg(long, default_value = "part")]
    prefix: String,
    /// Write a file once a shard's buffer holds this many bytes. Default: 5 MiB (demo: 256 KiB).
    #[arg(long)]
    max_bytes: Option<u64>,
    /// Write a file once a shard's oldest buffered record has waited this long. Default: 60,000
    /// (demo: 2,000).
    #[arg(long)]
    interval_ms: Option<u64>,
    /// Shut down gracefully (writing every buffer) after this many seconds without a record, once
    /// every shard held has been read. Default: run until Ctrl-C (demo: 2).
    #[arg(long)]
    idle_exit: Option<f64>,
    /// Where shards never read before start.
    #[arg(long, value_enum, default_value_t = StartFrom::TrimHorizon)]
    from: StartFrom,
    /// The lease failover time: a crashed worker's shards are taken over after about this long.
    #[arg(long, default_value_t = 10_000)]
    failover_ms: u64,
    /// Demo only: how many records to write.
    #[arg(long, default_value_t = 20_000)]
    records: usize,
}

/// What can stop the sink.
#[derive(Debug, thiserror::Error)]
enum SinkError {
    #[error("invalid argument: {0}")]
    Usage(String),
    #[error("could not reach or start the emulators")]
    TestBed(#[source] kinesis_testkit::Error),
    #[error("the consumer's settings were refused")]
    Config(#[source] ConfigError),
    #[error("the consumer stopped")]
    Scheduler(#[source] SchedulerError),
    #[error("could not write {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the demo's producer could not start")]
    Producer(#[source] BuildError),
    #[error("the demo's producer refused a record")]
    Put(#[source] PutError),
    #[error("the consumer stopped by itself")]
    Stopped,
    #[error("demo check failed: {0}")]
    Demo(String),
}

/// How files are cut.
#[derive(Clone, Debug)]
struct Settings {
    dir: PathBuf,
    prefix: String,
    max_bytes: u64,
    interval: Duration,
}

#[tokio::main]
async fn main() -> ExitCode {
    exit_code("firehose_sink", run(Args::parse()).await)
}

async fn run(args: Args) -> Result<(), SinkError> {
    let demo = args.stream.is_none();
    if args.prefix.is_empty() || args.prefix.starts_with('.') || args.prefix.contains(['/', '\\']) {
        return Err(SinkError::Usage(format!("--prefix {:?}: must be a file-name start, not a path", args.prefix)));
    }
    let positive = |value: Option<u64>, flag: &str, default: u64| match value {
        Some(0) => Err(SinkError::Usage(format!("{flag} must be positive"))),
        Some(v) => Ok(v),
        None => Ok(default),
    };
    let settings = Settings {
        dir: match (&args.dir, demo) {
            (Some(dir), _) => dir.clone(),
            (None, true) => std::env::temp_dir().join(kinesis_testkit::unique_name("firehose-sink")),
            (None, false) => PathBuf::from("firehose-out"),
        },
        prefix: args.prefix.clone(),
        max_bytes: positive(args.max_bytes, "--max-bytes", if demo { 256 * 1024 } else { 5 * 1024 * 1024 })?,
        interval: Duration::from_millis(positive(
            args.interval_ms,
            "--interval-ms",
            if demo { 2_000 } else { 60_000 },
        )?),
    };
    let idle_exit = idle_limit(args.idle_exit.or(demo.then_some(2.0))).map_err(SinkError::Usage)?;

    let bed = TestBed::start().await.map_err(SinkError::TestBed)?;
    println!("Kinesis at {}, DynamoDB at {}", bed.kinesis.endpoint_url(), bed.dynamodb.endpoint_url());
    let stream = match &args.stream {
        Some(stream) => stream.clone(),
        None => {
            let stream = bed.kinesis.create_stream(2).await.map_err(SinkError::TestBed)?;
            write_sample(&bed, &stream, args.records).await?;
            println!("demo: wrote {} JSON records to the 2-shard stream {stream}", args.records);
            stream
        }
    };
    let table = args.table.clone().unwrap_or_else(|| format!("firehose-sink-{stream}"));
    let mut config = SchedulerConfig::new(&stream, &table);
    config.initial_position = args.from.position();
    config.failover = Duration::from_millis(args.failover_ms);
    // An idle shard is read twice a second (the KCL's 1.5 s saves calls; records come sooner).
    config.polling.idle_time_between_reads = Duration::from_millis(500);
    println!(
        "sinking {stream} (lease table {table}) into {}: files of at most {} bytes, or after {} ms",
        settings.dir.display(),
        settings.max_bytes,
        settings.interval.as_millis()
    );

    let batches = Batches::start(bed.kinesis.client(), bed.dynamodb.client(), config, 64).map_err(SinkError::Config)?;
    let totals = sink(batches, &settings, idle_exit).await?;
    println!(
        "done: {} records in {} files ({} bytes), {} checkpoints, {} failed checkpoints",
        totals.records, totals.files, totals.bytes, totals.checkpoints, totals.checkpoint_failures
    );
    if demo {
        check_demo(&settings.dir, args.records)?;
    }
    Ok(())
}

/// Writes `count` JSON records with the producer (KPL aggregation on, as by default).
async fn write_sample(bed: &TestBed, stream: &str, count: usize) -> Result<(), SinkError> {
    let producer = Producer::builder(bed.kinesis.client(), stream).build().map_err(SinkError::Producer)?;
    let mut receipts = Vec::with_capacity(count);
    for id in 0..count {
        let sensor = format!("s-{}", id % 10);
        let data = format!(
            r#"{{"id":{id},"sensor":"{sensor}","reading":{:.1},"note":"sample record"}}"#,
            20.0 + (id % 70) as f64 / 10.0
        );
        receipts.push(producer.put(UserRecord::new(sensor, data)).await.map_err(SinkError::Put)?);
    }
    let mut failed = 0;
    for receipt in receipts {
        failed += usize::from(receipt.await.is_err());
    }
    producer.shutdown().await;
    if failed > 0 {
        return Err(SinkError::Demo(format!("{failed} sample records were not delivered")));
    }
    Ok(())
}

/// Reads the demo's files back: every id must be there.
fn check_demo(dir: &Path, count: usize) -> Result<(), SinkError> {
    let mut seen = vec![0u32; count];
    let (mut files, mut lines) = (0, 0);
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| SinkError::Io { path, source }
    };
    for shard in fs::read_dir(dir).map_err(io(dir))? {
        let shard = shard.map_err(io(dir))?.path();
        for file in fs::read_dir(&shard).map_err(io(&shard))? {
            let path = file.map_err(io(&shard))?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if name.starts_with('.') || !name.ends_with(".ndjson") {
                continue;
            }
            files += 1;
            for line in fs::read_to_string(&path).map_err(io(&path))?.lines() {
                lines += 1;
                let id = serde_json::from_str::<serde_json::Value>(line).ok().and_then(|v| v["id"].as_u64());
                match id.and_then(|id| seen.get_mut(usize::try_from(id).ok()?)) {
                    Some(n) => *n += 1,
                    None => return Err(SinkError::Demo(format!("{}: unexpected line {line:?}", path.display()))),
                }
            }
        }
    }
    let missing = seen.iter().filter(|n| **n == 0).count();
    let duplicates: u32 = seen.iter().map(|n| n.saturating_sub(1)).sum();
    println!("demo: {files} files, {lines} lines: {} of {count} records, {duplicates} duplicates", count - missing);
    if missing > 0 {
        return Err(SinkError::Demo(format!("{missing} records are in no file")));
    }
    Ok(())
}

/// What the sink did.
#[derive(Debug, Default)]
struct Totals {
    records: u64,
    files: u64,
    bytes: u64,
    checkpoints: u64,
    checkpoint_failures: u64,
}

/// One shard's records not yet in a file.
struct Buffer {
    records: VecDeque<Record>,
    /// The bytes the buffered records take in a file (data and newline).
    bytes: u64,
    /// The batches the buffered records came in, with how many of each are still buffered and
    /// when each arrived. Held until written, then finished: the shard's end is checkpointed only
    /// once every batch of it is finished.
    holds: VecDeque<(ShardBatch, usize, Instant)>,
    /// A checkpoint whose write failed (not for a lost lease), tried again at the next tick.
    unsaved: Option<(Checkpointer, Arc<str>, u64)>,
}

impl Buffer {
    fn new() -> Self {
        Buffer { records: VecDeque::new(), bytes: 0, holds: VecDeque::new(), unsaved: None }
    }

    /// When the oldest buffered record arrived.
    fn since(&self) -> Option<Instant> {
        self.holds.front().map(|(_, _, arrived)| *arrived)
    }

    fn push(&mut self, mut item: ShardBatch) {
        let records = std::mem::take(&mut item.batch.records);
        if records.is_empty() {
            return;
        }
        self.bytes += records.iter().map(line_len).sum::<u64>();
        self.holds.push_back((item, records.len(), Instant::now()));
        self.records.extend(records);
    }

    /// How many records from the front fill one file of at most `max_bytes` (at least one).
    fn file_len(&self, max_bytes: u64) -> usize {
        let mut bytes = 0;
        let mut n = 0;
        for record in &self.records {
            bytes += line_len(record);
            if n > 0 && bytes > max_bytes {
                break;
            }
            n += 1;
        }
        n
    }

    /// The first `n` records, to be written.
    fn first(&self, n: usize) -> Vec<Record> {
        self.records.iter().take(n).cloned().collect()
    }

    /// The first `n` records are durably written: takes them off, drops the batches now wholly
    /// written, and returns a checkpointer that may checkpoint the last of them. (Until then, a
    /// failed write leaves the buffer as it was.)
    fn written(&mut self, n: usize) -> Checkpointer {
        let bytes: u64 = self.records.drain(..n).map(|r| line_len(&r)).sum();
        self.bytes -= bytes;
        let mut left = n;
        let mut checkpointer = None;
        while let Some((hold, count, _)) = self.holds.front_mut() {
            checkpointer = Some(hold.checkpointer.clone());
            if *count > left {
                *count -= left;
                break;
            }
            left -= *count;
            // Wholly in a file: finished (the Batches stream lets a checkpoint pass it). A batch
            // dropped without being finished would be read again.
            if let Some((hold, _, _)) = self.holds.pop_front() {
                hold.finish();
            }
            if left == 0 {
                break;
            }
        }
        // `n` is at least 1 and every buffered record has a hold, so one was found.
        checkpointer.expect("a buffered record always has its batch held")
    }
}

/// The bytes a record takes in a file.
fn line_len(record: &Record) -> u64 {
    let data = record.data.strip_suffix(b"\n").unwrap_or(&record.data);
    data.len() as u64 + 1
}

/// Why a file was written.
#[derive(Clone, Copy, Debug)]
enum Reason {
    Size,
    Interval,
    Shutdown,
}

/// How the loop ended.
enum Ended {
    /// Ctrl-C or the idle exit.
    Graceful,
    /// The worker stopped by itself.
    Stopped,
}

/// Batches in, files out, until a graceful stop; then every buffer is written and checkpointed
/// before the leases are released. After a write error nothing more is checkpointed: the buffers
/// (and their batches) are kept until the worker is down, so that not even a shard's end is.
async fn sink(mut batches: Batches, settings: &Settings, idle_exit: Option<Duration>) -> Result<Totals, SinkError> {
    let mut buffers: BTreeMap<Arc<str>, Buffer> = BTreeMap::new();
    let mut totals = Totals::default();
    let ended = match pump(&mut batches, &mut buffers, settings, idle_exit, &mut totals).await {
        Ok(Ended::Graceful) => drain(&mut buffers, settings, &mut totals).await.map(|()| Ended::Graceful),
        other => other,
    };
    if ended.is_ok() {
        drop(std::mem::take(&mut buffers));
    }
    let shutdown = batches.shutdown().await;
    drop(buffers);
    match ended? {
        Ended::Graceful => shutdown.map(|()| totals).map_err(SinkError::Scheduler),
        Ended::Stopped => Err(shutdown.err().map_or(SinkError::Stopped, SinkError::Scheduler)),
    }
}

/// The loop: batches in, files out; a timer for the interval and the idle exit; Ctrl-C.
async fn pump(
    batches: &mut Batches,
    buffers: &mut BTreeMap<Arc<str>, Buffer>,
    settings: &Settings,
    idle_exit: Option<Duration>,
    totals: &mut Totals,
) -> Result<Ended, SinkError> {
    let mut cleaned: HashSet<Arc<str>> = HashSet::new();
    let mut idle = Idle::new(idle_exit);
    let mut tick =
        tokio::time::interval((settings.interval / 10).clamp(Duration::from_millis(10), Duration::from_secs(1)));
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut ctrl_c_armed = true;
    loop {
        tokio::select! {
            item = batches.next() => {
                let Some(item) = item else { return Ok(Ended::Stopped) };
                let shard = item.batch.shard_id.clone();
                if cleaned.insert(shard.clone()) {
                    remove_temp_files(&settings.dir.join(&*shard)).await;
                }
                let buffer = buffers.entry(shard.clone()).or_insert_with(Buffer::new);
                buffer.push(item);
                while buffer.bytes >= settings.max_bytes {
                    flush(&shard, buffer, settings, Reason::Size, totals).await?;
                }
            }
            _ = tick.tick() => {
                for (shard, buffer) in buffers.iter_mut() {
                    retry_checkpoint(shard, buffer, totals).await;
                    if buffer.since().is_some_and(|since| since.elapsed() >= settings.interval) {
                        while !buffer.records.is_empty() {
                            flush(shard, buffer, settings, Reason::Interval, totals).await?;
                        }
                    }
                }
                buffers.retain(|_, b| !b.records.is_empty() || b.unsaved.is_some());
                if idle.poll(batches.scheduler()) {
                    println!("no record for {:?}: shutting down", idle_exit.unwrap_or_default());
                    return Ok(Ended::Graceful);
                }
            }
            signal = &mut ctrl_c, if ctrl_c_armed => {
                ctrl_c_armed = false;
                match signal {
                    Ok(()) => {
                        println!("Ctrl-C: writing the buffers and shutting down");
                        return Ok(Ended::Graceful);
                    }
                    Err(error) => eprintln!("Ctrl-C cannot be watched ({error}); stop with --idle-exit or a signal"),
                }
            }
        }
    }
}

/// Writes and checkpoints everything buffered.
async fn drain(
    buffers: &mut BTreeMap<Arc<str>, Buffer>,
    settings: &Settings,
    totals: &mut Totals,
) -> Result<(), SinkError> {
    for (shard, buffer) in buffers.iter_mut() {
        while !buffer.records.is_empty() {
            flush(shard, buffer, settings, Reason::Shutdown, totals).await?;
        }
        retry_checkpoint(shard, buffer, totals).await;
    }
    Ok(())
}

/// Writes one file from the front of a buffer, durably, then checkpoints its last record.
async fn flush(
    shard: &Arc<str>,
    buffer: &mut Buffer,
    settings: &Settings,
    reason: Reason,
    totals: &mut Totals,
) -> Result<(), SinkError> {
    let n = buffer.file_len(settings.max_bytes);
    let records = buffer.first(n);
    let (dir, prefix, shard_name) = (settings.dir.clone(), settings.prefix.clone(), shard.to_string());
    let (records, written) = tokio::task::spawn_blocking(move || {
        let written = write_file(&dir, &shard_name, &prefix, &records);
        (records, written)
    })
    .await
    .map_err(|e| SinkError::Io { path: settings.dir.clone(), source: std::io::Error::other(e) })?;
    let (path, bytes) = written?;
    let mut checkpointer = buffer.written(n);
    let last = &records[records.len() - 1];
    totals.records += records.len() as u64;
    totals.files += 1;
    totals.bytes += bytes;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    println!("{shard}: wrote {name} ({} records, {bytes} bytes, {reason:?})", records.len());
    match checkpointer.checkpoint_at(&last.sequence_number, last.sub_sequence_number).await {
        Ok(()) => totals.checkpoints += 1,
        Err(CheckpointError::LeaseLost { .. }) => {
            // Another worker reads the shard from its last checkpoint: what is buffered here is
            // read again there. The file stays (a duplicate at worst).
            println!("{shard}: lease lost; dropping {} buffered records", buffer.records.len());
            totals.checkpoint_failures += 1;
            *buffer = Buffer::new();
        }
        Err(error @ CheckpointError::Table { .. }) => {
            eprintln!("{shard}: checkpoint failed ({error}); trying again");
            totals.checkpoint_failures += 1;
            buffer.unsaved = Some((checkpointer, last.sequence_number.clone(), last.sub_sequence_number));
            return Ok(());
        }
        Err(error) => {
            eprintln!("{shard}: checkpoint refused ({error})");
            totals.checkpoint_failures += 1;
        }
    }
    buffer.unsaved = None;
    Ok(())
}

/// Tries a failed checkpoint again (its file is on disk).
async fn retry_checkpoint(shard: &str, buffer: &mut Buffer, totals: &mut Totals) {
    let Some((mut checkpointer, sequence, sub)) = buffer.unsaved.take() else { return };
    match checkpointer.checkpoint_at(&sequence, sub).await {
        Ok(()) => totals.checkpoints += 1,
        Err(CheckpointError::LeaseLost { .. }) => *buffer = Buffer::new(),
        Err(error @ CheckpointError::Table { .. }) => {
            eprintln!("{shard}: checkpoint failed again ({error})");
            buffer.unsaved = Some((checkpointer, sequence, sub));
        }
        Err(error) => eprintln!("{shard}: checkpoint refused ({error})"),
    }
}

/// Writes `records` to `<dir>/<shard>/<prefix>-<first>_<last>.ndjson`: a temporary file, fsync,
/// rename, fsync of the directory. Returns the path and the bytes written.
fn write_file(dir: &Path, shard: &str, prefix: &str, records: &[Record]) -> Result<(PathBuf, u64), SinkError> {
    let shard_dir = dir.join(shard);
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| SinkError::Io { path, source }
    };
    create_dir_durably(&shard_dir).map_err(io(&shard_dir))?;
    let (first, last) = match records {
        [first, .., last] => (first, last),
        [only] => (only, only),
        [] => return Err(SinkError::Io { path: shard_dir, source: std::io::Error::other("no records to write") }),
    };
    let name = format!(
        "{prefix}-{}-{:06}_{}-{:06}.ndjson",
        first.sequence_number, first.sub_sequence_number, last.sequence_number, last.sub_sequence_number
    );
    let path = shard_dir.join(&name);
    let temp = shard_dir.join(format!(".{name}.tmp"));
    let mut file = BufWriter::new(File::create(&temp).map_err(io(&temp))?);
    let mut bytes = 0;
    for record in records {
        let data = record.data.strip_suffix(b"\n").unwrap_or(&record.data);
        let line: Vec<u8> = data.iter().map(|&b| if b == b'\n' || b == b'\r' { b' ' } else { b }).collect();
        file.write_all(&line).and_then(|()| file.write_all(b"\n")).map_err(io(&temp))?;
        bytes += line.len() as u64 + 1;
    }
    let file = file.into_inner().map_err(|e| SinkError::Io { path: temp.clone(), source: e.into_error() })?;
    file.sync_all().map_err(io(&temp))?;
    drop(file);
    fs::rename(&temp, &path).map_err(io(&path))?;
    File::open(&shard_dir).and_then(|d| d.sync_all()).map_err(io(&shard_dir))?;
    Ok((path, bytes))
}

/// Creates a directory (and its parents) so that it survives a crash: each new entry's parent is
/// fsynced.
fn create_dir_durably(dir: &Path) -> std::io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        create_dir_durably(parent)?;
    }
    match fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(()),
        Err(e) => return Err(e),
    }
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    File::open(parent)?.sync_all()
}

/// Removes the temporary files a crash left in a shard's directory.
async fn remove_temp_files(shard_dir: &Path) {
    let shard_dir = shard_dir.to_owned();
    let _ = tokio::task::spawn_blocking(move || {
        let Ok(entries) = fs::read_dir(&shard_dir) else { return };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') && name.ends_with(".tmp") {
                let _ = fs::remove_file(entry.path());
            }
        }
    })
    .await;
}
