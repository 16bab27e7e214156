//! `kinesis loadgen`: N producer tasks put templated records through one [`Producer`], paced or
//! as fast as the shards take them; `--verify` runs a consumer group beside them and counts what
//! arrives.
//!
//! ```text
//! producer task 1..N ─ template ─▶ Producer (aggregation, per-shard limits, retries) ─▶ receipts ─┐
//!                                                                                                 ▼
//! consumer group (--workers, one lease table) ─▶ deaggregated records ─────────────────────▶ Tally
//! ```
//!
//! The N tasks share one [`Producer`], as the threads of one KPL process share one KPL: records of
//! every task are aggregated together per shard, and one set of per-shard rate limiters keeps the
//! shards busy without fighting each other.
//!
//! The stages, a module each: [`template`] renders the records; `put` runs the producer tasks and
//! awaits the receipts; [`verify`] runs the consumer group and keeps the tally; `progress` shows
//! the run and samples it once a second; [`latency`] and [`timeline`] keep the figures; [`report`]
//! prints the summary and draws the `--report` page.

pub mod latency;
mod progress;
mod put;
pub mod report;
pub mod template;
pub mod timeline;
pub mod verify;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use clap::{Args, ValueEnum};
use kinesis_producer::{Producer, ProducerConfig};
use tokio::sync::mpsc;

pub use self::report::{Report, ReportError};

use self::progress::{Progress, display, log_lines, totals};
use self::put::{Pending, await_receipts, put_loop};
use self::template::{DEFAULT_PARTITION_KEY, DEFAULT_TEMPLATE, Template, TemplateError};
use self::timeline::{Timeline, Totals};
use self::verify::{Group, Tally, wait_for_arrivals};
use crate::stream::{kinesis, wait_active};

/// Arguments of `kinesis loadgen`.
#[derive(Args, Debug, Clone)]
pub struct LoadgenArgs {
    /// The stream. Created with `--shards` shards when it does not exist. With `--local`, by default
    /// `loadgen`.
    pub stream: Option<String>,
    /// Producer tasks putting at once.
    #[arg(long, default_value_t = 4)]
    pub producers: usize,
    /// Records per second per producer, e.g. `100` or `100/s`; `unlimited` (the default): as fast
    /// as the producer's back-pressure allows.
    #[arg(long, value_parser = parse_rate)]
    pub rate: Option<Rate>,
    /// Records to send in all (split evenly between the producers). Default 100,000 when
    /// `--duration` is not given.
    #[arg(long, conflicts_with = "duration")]
    pub records: Option<u64>,
    /// How long to send, e.g. `30s`, `10m`, `1h`, or seconds.
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Shards of the stream when it is created. Default 4.
    #[arg(long)]
    pub shards: Option<u32>,
    /// The record template (see the placeholders in `--help`); default: the published benchmark's
    /// `{"id":"{{uuid}}","firstname":..,"lastname":..,"description":"{{sentence}}","balance":0}`.
    #[arg(long, conflicts_with = "template_file")]
    pub template: Option<String>,
    /// Read the record template from a file.
    #[arg(long)]
    pub template_file: Option<PathBuf>,
    /// The partition key template.
    #[arg(long, default_value = DEFAULT_PARTITION_KEY)]
    pub partition_key: String,
    /// Compress each Kinesis record (only readers built on this library can read them).
    #[arg(long)]
    pub compression: bool,
    /// Send every record as its own Kinesis record (no KPL aggregation).
    #[arg(long)]
    pub no_aggregation: bool,
    /// Run a consumer group beside the producers and count what arrives: sent, acknowledged,
    /// received, duplicates, lost.
    #[arg(long)]
    pub verify: bool,
    /// Consumer workers of the `--verify` group.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// How the `--verify` group shares its leases: `kcl3` (a leader assigns them, planned moves are
    /// graceful handoffs, nothing is delivered twice by them) or `kcl2` (workers take and steal; a
    /// stolen lease is read again from its last checkpoint).
    #[arg(long, value_enum, default_value_t = LeaseMode::Kcl3)]
    pub lease_management: LeaseMode,
    /// The lease table of the `--verify` group. Default: a new table per run, named after the
    /// stream (left in place: delete it with the AWS CLI when you are done).
    #[arg(long)]
    pub table: Option<String>,
    /// Print progress lines ("producer K has sent N records, ...") instead of a progress bar.
    #[arg(long)]
    pub log: bool,
    /// How often `--log` prints (and how often a terminal-less run prints a progress line).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub log_interval: Duration,
    /// Write one JSON line per acknowledged record to this file, as the receipts arrive:
    /// `{"producer":K,"seq":N,"shard_id":..,"sequence_number":..,"sub_sequence_number":..}` (the
    /// sub-sequence number is null for a record sent plain). If the process dies, the records
    /// named in the file are stored; the others may or may not be.
    #[arg(long)]
    pub receipts: Option<PathBuf>,
    /// How long `--verify` waits, after the last acknowledgement, for records still to arrive.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub verify_timeout: Duration,
    /// Also write the report as a self-contained HTML page with charts: records/s sent,
    /// acknowledged and received; put -> acknowledged latency percentiles; each shard's use of
    /// its write limit; throttles; all over time.
    #[arg(long, value_name = "FILE.html")]
    pub report: Option<PathBuf>,
}

/// The lease management of the `--verify` consumer group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LeaseMode {
    /// KCL 2.x: every worker takes and steals.
    Kcl2,
    /// KCL 3.x: a leader assigns; planned moves are graceful handoffs.
    Kcl3,
}

/// A pace per producer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate(pub f64);

fn parse_rate(text: &str) -> Result<Rate, String> {
    let number = text.trim().trim_end_matches("/s");
    if number == "unlimited" {
        return Err("leave --rate out for an unlimited rate".into());
    }
    match number.parse::<f64>() {
        Ok(rate) if rate.is_finite() && rate > 0.0 => Ok(Rate(rate)),
        _ => Err(format!("expected records per second, e.g. 100 or 100/s; got {text:?}")),
    }
}

/// Parses `30s`, `10m`, `1h`, `250ms` or a number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| c.is_ascii_alphabetic()) {
        Some(at) => text.split_at(at),
        None => (text, "s"),
    };
    let value: f64 = number.trim().parse().map_err(|_| format!("expected a duration like 30s or 10m; got {text:?}"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(format!("unknown unit {unit:?} in {text:?}: use ms, s, m or h")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|_| format!("not a duration: {text:?}"))
}

/// Why a load run could not start or did not deliver.
#[derive(Debug, thiserror::Error)]
pub enum LoadgenError {
    /// An argument out of range or missing.
    #[error("{0}")]
    BadArgument(String),
    /// The record or partition-key template does not parse.
    #[error("bad template")]
    Template(#[from] TemplateError),
    /// The template file cannot be read.
    #[error("cannot read the template file {path}")]
    TemplateFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The `--receipts` file cannot be created.
    #[error("cannot create the receipts file {path}")]
    ReceiptsFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A Kinesis call failed, or the stream did not become ACTIVE.
    #[error(transparent)]
    Stream(#[from] crate::stream::StreamError),
    /// The producer configuration was refused.
    #[error("the producer could not start")]
    Producer(#[from] kinesis_producer::BuildError),
    /// The consumer configuration was refused.
    #[error("the consumer group could not start")]
    Consumer(#[from] kinesis_consumer::ConfigError),
    /// `put` refused a record (for example a partition key over 256 characters).
    #[error("a record was refused")]
    Put(#[source] kinesis_producer::PutError),
    /// The run ended with records not delivered or not received.
    #[error("{failed} records were not delivered and {lost} acknowledged records were not received")]
    Undelivered {
        /// Receipts that failed.
        failed: u64,
        /// Acknowledged records the consumer group did not receive (with `--verify`).
        lost: u64,
    },
}

/// The clients a run uses.
#[derive(Debug, Clone)]
pub struct Clients {
    /// Kinesis.
    pub kinesis: aws_sdk_kinesis::Client,
    /// DynamoDB, for the `--verify` group's lease table.
    pub dynamodb: aws_sdk_dynamodb::Client,
}

struct Plan {
    template: Template,
    key: Template,
    /// Records per producer (records mode).
    quotas: Option<Vec<u64>>,
    duration: Option<Duration>,
    rate: Option<f64>,
}

fn plan(args: &LoadgenArgs) -> Result<Plan, LoadgenError> {
    if args.producers == 0 {
        return Err(LoadgenError::BadArgument("--producers must be at least 1".into()));
    }
    if args.verify && args.workers == 0 {
        return Err(LoadgenError::BadArgument("--workers must be at least 1".into()));
    }
    let text = match (&args.template, &args.template_file) {
        (Some(text), _) => text.clone(),
        (None, Some(path)) => std::fs::read_to_string(path)
            .map(|t| t.trim_end_matches('\n').to_owned())
            .map_err(|source| LoadgenError::TemplateFile { path: path.clone(), source })?,
        (None, None) => DEFAULT_TEMPLATE.to_owned(),
    };
    let template = Template::parse(&text)?;
    let key = Template::parse(&args.partition_key)?;
    if key.is_empty() {
        return Err(TemplateError::EmptyKey.into());
    }
    let quotas = match (args.records, args.duration) {
        (_, Some(_)) => None,
        (records, None) => {
            let records = records.unwrap_or(100_000);
            let producers = args.producers as u64;
            Some((0..producers).map(|k| records / producers + u64::from(k < records % producers)).collect())
        }
    };
    Ok(Plan { template, key, quotas, duration: args.duration, rate: args.rate.map(|r| r.0) })
}

/// Runs the load: creates the stream if needed, starts the `--verify` group, puts, waits for every
/// receipt (and with `--verify`, for every record to arrive), and returns what it measured.
///
/// # Errors
/// [`LoadgenError`] for bad arguments, a Kinesis call that fails, or records not delivered or not
/// received (the report is printed first).
pub async fn run_loadgen(clients: &Clients, args: LoadgenArgs, local: bool) -> Result<Report, LoadgenError> {
    let plan = plan(&args)?;
    let stream = match (&args.stream, local) {
        (Some(stream), _) => stream.clone(),
        (None, true) => "loadgen".to_owned(),
        (None, false) => return Err(LoadgenError::BadArgument("name the stream: kinesis loadgen STREAM".into())),
    };
    let (shards, created) = ensure_stream(&clients.kinesis, &stream, args.shards).await?;
    println!(
        "stream {stream}: {shards} open shards{}; {} producers, {}, {}",
        if created { " (created)" } else { "" },
        args.producers,
        match plan.rate {
            Some(rate) => format!("{rate} records/s each"),
            None => "unlimited rate".to_owned(),
        },
        match (&plan.quotas, plan.duration) {
            (_, Some(d)) => format!("for {:.0} s", d.as_secs_f64()),
            (Some(q), None) => format!("{} records", q.iter().sum::<u64>()),
            (None, None) => String::new(),
        }
    );

    let run_started = SystemTime::now();
    let tally = Arc::new(Tally::default());
    let group = if args.verify {
        let table = args.table.clone().unwrap_or_else(|| {
            format!("{stream}-verify-{}", uuid::Uuid::new_v4().simple().to_string().get(..8).unwrap_or("run"))
        });
        println!(
            "verify: {} consumer workers, lease table {table}, {:?} lease management",
            args.workers, args.lease_management
        );
        Some(Group::start(
            &clients.kinesis,
            &clients.dynamodb,
            &stream,
            &table,
            (args.workers, args.lease_management, verify::start_position(created, run_started)),
            &tally,
        )?)
    } else {
        None
    };

    let config =
        ProducerConfig { aggregation: !args.no_aggregation, compression: args.compression, ..Default::default() };
    let producer = Producer::builder(clients.kinesis.clone(), stream.clone()).config(config).build()?;
    let progress = Arc::new(Progress {
        sent: (0..args.producers).map(|_| AtomicU64::new(0)).collect(),
        last_put: (0..args.producers).map(|_| AtomicU64::new(0)).collect(),
        ..Default::default()
    });
    let stop = Arc::new(AtomicBool::new(false));
    let ctrl_c = tokio::spawn({
        let stop = stop.clone();
        async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("interrupted: stopping the producers, then the summary");
                stop.store(true, Ordering::Relaxed);
            }
        }
    });

    let started = Instant::now();
    let receipts_file = match &args.receipts {
        Some(path) => Some(
            std::fs::File::create(path).map_err(|source| LoadgenError::ReceiptsFile { path: path.clone(), source })?,
        ),
        None => None,
    };
    let (receipts_tx, receipts_rx) = mpsc::channel::<Pending>(4096);
    let timeline: Arc<Mutex<Timeline>> = Arc::default();
    timeline.lock().unwrap_or_else(|p| p.into_inner()).sample(Duration::ZERO, Totals::default());
    let receipts = tokio::spawn(await_receipts(
        receipts_rx,
        progress.clone(),
        args.verify.then(|| tally.clone()),
        receipts_file.map(std::io::LineWriter::new),
        (timeline.clone(), started),
    ));
    let samples: Arc<Mutex<Vec<u64>>> = Arc::default();
    let display = tokio::spawn(display(
        producer.clone(),
        progress.clone(),
        tally.clone(),
        args.clone(),
        plan.quotas.as_ref().map(|q| q.iter().sum()),
        started,
        (samples.clone(), timeline.clone()),
    ));

    let plan = Arc::new(plan);
    let mut tasks = Vec::with_capacity(args.producers);
    for k in 0..args.producers {
        let (producer, plan, progress, stop, receipts_tx) =
            (producer.clone(), plan.clone(), progress.clone(), stop.clone(), receipts_tx.clone());
        let producers = args.producers;
        tasks.push(tokio::spawn(async move {
            put_loop(k, producers, &producer, &plan, &progress, &stop, &receipts_tx, started).await
        }));
    }
    drop(receipts_tx);
    let mut refused = None;
    for task in tasks {
        if let Ok(Err(error)) = task.await {
            refused.get_or_insert(error);
        }
    }
    if args.log {
        // The last word of each producer, whatever the interval.
        log_lines(&progress, started.elapsed().as_secs_f64());
    }
    producer.flush().await;
    let ack_latency = receipts.await.ok().and_then(|latencies| latencies.summary());
    let produce_secs = started.elapsed().as_secs_f64();
    producer.shutdown().await;

    let verified = match group {
        Some(group) => {
            let counts = wait_for_arrivals(&tally, args.verify_timeout, &stop).await;
            let secs = started.elapsed().as_secs_f64();
            group.shutdown().await;
            Some((counts, tally.unexpected(), secs))
        }
        None => None,
    };
    display.abort();
    ctrl_c.abort();
    let mut timeline = std::mem::take(&mut *timeline.lock().unwrap_or_else(|p| p.into_inner()));
    // The last sample: the display's last one may be up to a second old.
    timeline.sample(started.elapsed(), totals(&producer, &progress, &tally));
    timeline.finish();

    let m = producer.metrics();
    let steady = {
        let mut loaded: Vec<u64> = samples.lock().unwrap_or_else(|p| p.into_inner()).iter().skip(2).copied().collect();
        loaded.sort_unstable();
        (loaded.len() >= 3).then(|| loaded[loaded.len() / 2] as f64)
    };
    let report = Report {
        stream,
        shards,
        sent: progress.sent_total(),
        acknowledged: progress.acked.load(Ordering::Relaxed),
        failed: progress.failed.load(Ordering::Relaxed),
        produce_secs,
        kinesis_records: m.kinesis_records_put,
        kinesis_bytes: m.kinesis_records_data_put,
        user_bytes: m.user_records_data_put,
        steady_bytes_per_sec: steady,
        retries: m.retries,
        errors_by_code: m.errors_by_code.clone(),
        per_producer: progress
            .sent
            .iter()
            .zip(&progress.last_put)
            .map(|(n, t)| (n.load(Ordering::Relaxed), t.load(Ordering::Relaxed) as f64 / 1e6))
            .collect(),
        rate: plan.rate,
        processed_latency: verified.as_ref().and_then(|_| tally.processed_latency().summary()),
        verified,
        ack_latency,
        timeline,
    };
    if let Some(error) = refused {
        return Err(LoadgenError::Put(error));
    }
    Ok(report)
}

/// Checks a finished run: every record acknowledged, and with `--verify`, received.
///
/// # Errors
/// [`LoadgenError::Undelivered`] naming what is missing.
pub fn check(report: &Report) -> Result<(), LoadgenError> {
    let lost = report.verified.as_ref().map_or(0, |(counts, _, _)| counts.lost());
    if report.failed > 0 || lost > 0 {
        return Err(LoadgenError::Undelivered { failed: report.failed, lost });
    }
    Ok(())
}

/// The stream's open shards, creating it first when it does not exist; and whether it was created.
async fn ensure_stream(
    client: &aws_sdk_kinesis::Client,
    stream: &str,
    shards: Option<u32>,
) -> Result<(u32, bool), LoadgenError> {
    let described = client.describe_stream_summary().stream_name(stream).send().await;
    let created = match described {
        Ok(_) => false,
        Err(error) if error.as_service_error().is_some_and(|e| e.is_resource_not_found_exception()) => {
            let count = shards.unwrap_or(4);
            let count = i32::try_from(count).map_err(|_| LoadgenError::BadArgument("--shards is too large".into()))?;
            client
                .create_stream()
                .stream_name(stream)
                .shard_count(count)
                .send()
                .await
                .map_err(kinesis("CreateStream"))?;
            true
        }
        Err(error) => return Err(kinesis("DescribeStreamSummary")(error).into()),
    };
    let open = wait_active(client, stream).await?;
    if let Some(asked) = shards
        && !created
        && asked != open
    {
        eprintln!("stream {stream} exists with {open} open shards; --shards {asked} is ignored");
    }
    Ok((open, created))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_rates_parse_as_people_write_them() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("10 parsecs").is_err());
        assert!(parse_duration("-3s").is_err());
        assert_eq!(parse_rate("100"), Ok(Rate(100.0)));
        assert_eq!(parse_rate("2.5/s"), Ok(Rate(2.5)));
        assert!(parse_rate("0").is_err());
        assert!(parse_rate("unlimited").is_err());
    }

    fn args(extra: &[&str]) -> LoadgenArgs {
        #[derive(clap::Parser)]
        struct Wrapper {
            #[command(flatten)]
            args: LoadgenArgs,
        }
        let mut argv = vec!["loadgen"];
        argv.extend_from_slice(extra);
        <Wrapper as clap::Parser>::try_parse_from(argv).unwrap().args
    }

    #[test]
    fn records_are_split_evenly_between_producers() {
        let quotas = plan_quotas(&["--producers", "32", "--records", "1920000"]);
        assert_eq!(quotas.len(), 32);
        assert!(quotas.iter().all(|&q| q == 60_000));
        let quotas = plan_quotas(&["--producers", "3", "--records", "10"]);
        assert_eq!(quotas, vec![4, 3, 3]);
        assert!(plan(&args(&["--duration", "10s"])).unwrap().quotas.is_none());
        assert_eq!(plan_quotas(&["--producers", "2"]).iter().sum::<u64>(), 100_000);
    }

    fn plan_quotas(extra: &[&str]) -> Vec<u64> {
        plan(&args(extra)).unwrap().quotas.unwrap()
    }

    #[test]
    fn bad_arguments_are_refused_before_anything_starts() {
        assert!(matches!(plan(&args(&["--producers", "0"])), Err(LoadgenError::BadArgument(_))));
        assert!(matches!(plan(&args(&["--template", "{{bogus}}"])), Err(LoadgenError::Template(_))));
        assert!(matches!(plan(&args(&["--partition-key", ""])), Err(LoadgenError::Template(TemplateError::EmptyKey))));
        assert!(matches!(
            plan(&args(&["--template-file", "/nonexistent/template"])),
            Err(LoadgenError::TemplateFile { .. })
        ));
    }
}
