//! Lambda-style processing: batches of at most N records gathered for at most a batching window,
//! a handler that reports the record it failed on (ReportBatchItemFailures), retries from that
//! record, and an on-failure destination for records that fail too often.
//!
//! ```text
//! cargo run --example lambda_style                       # demo: embedded emulators, sample orders
//! cargo run --example lambda_style -- --stream NAME [--table NAME] [--batch-size 100]
//!     [--batch-window-ms 0] [--max-retries 3] [--retry-delay-ms 200] [--on-failure PATH] [--json]
//!     [--idle-exit SECS] [--from trim-horizon|latest] [--failover-ms 10000]
//! ```
//!
//! What it shows, next to a Lambda event source mapping for Kinesis:
//! - `--batch-size` is `BatchSize` ([`SchedulerConfig::max_batch_records`]) and
//!   `--batch-window-ms` is `MaximumBatchingWindowInSeconds` ([`SchedulerConfig::max_batch_wait`]):
//!   a batch is handed over when it is full or when the window is up, never larger.
//! - The handler (`Handler::handle`) returns `batch_item_failures`, as a function with
//!   `ReportBatchItemFailures` does. The shard is checkpointed at the record before the first
//!   failed one, and the handler is invoked again from that record (after `--retry-delay-ms`),
//!   so records before it are never handled twice and the shard's order holds.
//! - After `--max-retries` retries (`MaximumRetryAttempts`; 1 + N attempts in all) the record is
//!   written to the on-failure destination (`DestinationConfig.OnFailure`: a file with
//!   `--on-failure`, fsynced before the checkpoint moves past it; standard error otherwise),
//!   checkpointed, and skipped.
//!
//! Unlike Lambda, a retry re-invokes the handler with the rest of the same batch (Lambda reads
//! again from the checkpoint and may add newer records); and a crash resumes after the last
//! checkpoint, so the record that was failing starts its retries over.
//!
//! The sample handler reads orders, `{"order":17,"amount":12.5,"fail":2}`: it fails an order
//! `fail` times (a transient error) before handling it, and fails anything that is not an order
//! every time. Each invocation is printed (`--json`: one JSON object a line, for scripts).
//!
//! Without `--stream` it is a demo: it starts the embedded emulators (or uses
//! `AWS_ENDPOINT_URL_KINESIS` / `AWS_ENDPOINT_URL_DYNAMODB` when set), creates a 2-shard stream,
//! writes 100 orders (three of them failing 1, 2 and 9 times) and one record that is not an order,
//! handles them in batches of 10 gathered for up to 500 ms with 2 retries, and checks the result.
//! With `--stream` it runs until Ctrl-C, or until `--idle-exit` seconds without a record once its
//! shards are read.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use clap::Parser;
use kinesis::consumer::{
    Batch, CheckpointError, Checkpointer, ConfigError, Processor, Record, Scheduler, SchedulerConfig, SchedulerError,
};
use kinesis::producer::{BuildError, Producer, PutError, UserRecord};
use kinesis_testkit::TestBed;
use serde::Deserialize;
use serde_json::json;

use support::{Idle, StartFrom, exit_code, idle_limit};

/// Lambda-style batch processing of a Kinesis stream.
#[derive(Parser, Debug)]
#[command(name = "lambda_style")]
struct Args {
    /// The stream to process. Without it, a demo stream is created and filled.
    #[arg(long)]
    stream: Option<String>,
    /// The lease table (the application's name). Default: `lambda-style-<stream>`.
    #[arg(long)]
    table: Option<String>,
    /// The most records a batch holds (Lambda's BatchSize), 1 to 10,000. Default: 100 (demo: 10).
    #[arg(long)]
    batch_size: Option<usize>,
    /// How long records are gathered for a batch (MaximumBatchingWindowInSeconds, in ms).
    /// Default: 0, each read handed over as it comes (demo: 500).
    #[arg(long)]
    batch_window_ms: Option<u64>,
    /// Retries of a failing record before it goes to the on-failure destination
    /// (MaximumRetryAttempts). Default: 3 (demo: 2).
    #[arg(long)]
    max_retries: Option<u32>,
    /// The pause before a retry.
    #[arg(long, default_value_t = 200)]
    retry_delay_ms: u64,
    /// Append records that failed every attempt to this file (JSON lines). Default: standard error.
    #[arg(long)]
    on_failure: Option<PathBuf>,
    /// Print each invocation as a JSON object on a line of its own.
    #[arg(long)]
    json: bool,
    /// Shut down gracefully after this many seconds without a record, once every shard held has
    /// been read. Default: run until Ctrl-C (demo: 2).
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
enum LambdaError {
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
    #[error("stopped: {0}")]
    Fatal(String),
    #[error("cannot open the on-failure file {}", path.display())]
    OnFailure {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the demo's producer could not start")]
    Producer(#[source] BuildError),
    #[error("the demo's producer refused a record")]
    Put(#[source] PutError),
    #[error("demo check failed: {0}")]
    Demo(String),
}

// ---------------------------------------------------------------------------------------------
// The function.

/// One record the handler could not handle (Lambda's `batchItemFailures[]`).
#[derive(Debug)]
struct ItemFailure {
    /// The record's id: its sequence number (`<sequence>:<sub>` for a KPL sub-record).
    item_identifier: String,
    /// Why, for the log.
    reason: String,
}

/// What the handler returns (Lambda's `StreamsEventResponse`). Empty: the whole batch was
/// handled.
#[derive(Debug, Default)]
struct BatchResponse {
    batch_item_failures: Vec<ItemFailure>,
}

/// An order, as the demo writes them.
#[derive(Debug, Deserialize)]
struct Order {
    order: u64,
    amount: f64,
    /// How many times handling it fails before it succeeds.
    #[serde(default)]
    fail: u32,
}

/// The sample function: handles orders in order and stops at the first it cannot handle.
struct Handler {
    /// Failed attempts so far, per order.
    attempts: HashMap<u64, u32>,
    results: Arc<Results>,
}

/// What the handlers did, across shards.
#[derive(Debug, Default)]
struct Results {
    /// Times each order was handled.
    handled: Mutex<BTreeMap<u64, u32>>,
    amount_cents: AtomicU64,
    invocations: AtomicU64,
    retries: AtomicU64,
    sent_on_failure: AtomicU64,
}

impl Handler {
    async fn handle(&mut self, records: &[Record]) -> BatchResponse {
        let mut response = BatchResponse::default();
        for record in records {
            let failure = match serde_json::from_slice::<Order>(&record.data) {
                Err(error) => Some(format!("not an order: {error}")),
                Ok(order) => {
                    let failed = self.attempts.entry(order.order).or_insert(0);
                    if *failed < order.fail {
                        *failed += 1;
                        Some(format!("order {}: simulated failure {} of {}", order.order, failed, order.fail))
                    } else {
                        self.attempts.remove(&order.order);
                        let cents = (order.amount * 100.0).round().max(0.0) as u64;
                        self.results.amount_cents.fetch_add(cents, Relaxed);
                        *lock(&self.results.handled).entry(order.order).or_insert(0) += 1;
                        None
                    }
                }
            };
            if let Some(reason) = failure {
                // Stop here: the records after it are retried with it, in order.
                response.batch_item_failures.push(ItemFailure { item_identifier: item_id(record), reason });
                break;
            }
        }
        response
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A record's id, as the handler reports failures: the sequence number, with the sub-sequence
/// number for a KPL sub-record (they share the sequence number).
fn item_id(record: &Record) -> String {
    if record.aggregated {
        format!("{}:{}", record.sequence_number, record.sub_sequence_number)
    } else {
        record.sequence_number.to_string()
    }
}

// ---------------------------------------------------------------------------------------------
// The event source mapping.

/// How failures are handled and invocations reported.
#[derive(Debug)]
struct Settings {
    max_retries: u32,
    retry_delay: Duration,
    json: bool,
    on_failure: Destination,
    /// Set when the on-failure destination keeps failing: the worker must stop at once.
    fatal: Mutex<Option<String>>,
}

/// Where records that failed every attempt go.
#[derive(Debug)]
enum Destination {
    Stderr,
    File(PathBuf, Arc<Mutex<std::fs::File>>),
}

impl Destination {
    /// Writes one line; a file is fsynced before this returns.
    async fn send(&self, line: String) -> std::io::Result<()> {
        match self {
            Destination::Stderr => {
                eprintln!("ON-FAILURE {line}");
                Ok(())
            }
            Destination::File(_, file) => {
                let file = file.clone();
                tokio::task::spawn_blocking(move || {
                    let mut file = lock(&file);
                    file.write_all(format!("{line}\n").as_bytes())?;
                    file.sync_data()
                })
                .await
                .map_err(std::io::Error::other)?
            }
        }
    }
}

/// One shard's invocations.
struct EventSource {
    shard: String,
    handler: Handler,
    settings: Arc<Settings>,
    invocation: u64,
}

impl EventSource {
    /// Prints one invocation.
    fn report(&self, records: &[Record], retry: u32, handled: usize, failure: Option<&ItemFailure>, note: &str) {
        let results = &self.handler.results;
        results.invocations.fetch_add(1, Relaxed);
        if retry > 0 {
            results.retries.fetch_add(1, Relaxed);
        }
        if self.settings.json {
            let event = json!({
                "event": "batch",
                "shard": self.shard,
                "invocation": self.invocation,
                "size": records.len(),
                "retry": retry,
                "items": records.iter().map(item_id).collect::<Vec<_>>(),
                "handled": handled,
                "failed": failure.map(|f| f.item_identifier.as_str()),
                "reason": failure.map(|f| f.reason.as_str()),
                "next": note,
            });
            println!("{event}");
        } else {
            // The end of the sequence number is enough to tell records apart in the log.
            let short = |r: &Record| {
                let seq = &r.sequence_number[r.sequence_number.len().saturating_sub(6)..];
                if r.aggregated { format!("…{seq}:{}", r.sub_sequence_number) } else { format!("…{seq}") }
            };
            let range = match records {
                [first, .., last] => format!("{}..{}", short(first), short(last)),
                [only] => short(only),
                [] => String::new(),
            };
            let outcome = match failure {
                None => format!("all {handled} handled"),
                Some(f) => format!("{handled} handled, then failed at {} ({})", short(&records[handled]), f.reason),
            };
            let retry = if retry > 0 { format!(", retry {retry}") } else { String::new() };
            println!(
                "{} #{}: {} record{} [{range}]{retry}: {outcome}{}",
                self.shard,
                self.invocation,
                records.len(),
                if records.len() == 1 { "" } else { "s" },
                if note.is_empty() { String::new() } else { format!("; {note}") }
            );
        }
    }

    /// Checkpoints after `record` (the end of the batch when `None`). `false`: the lease is
    /// lost, stop.
    async fn checkpoint(&self, checkpointer: &mut Checkpointer, record: Option<&Record>) -> bool {
        let result = match record {
            Some(record) => checkpointer.checkpoint_record(record).await,
            None => checkpointer.checkpoint().await,
        };
        match result {
            Ok(()) => true,
            Err(CheckpointError::LeaseLost { .. }) => {
                println!("{}: lease lost; another worker goes on from its last checkpoint", self.shard);
                false
            }
            // The next checkpoint covers this one.
            Err(error) => {
                eprintln!("{}: checkpoint failed ({error})", self.shard);
                true
            }
        }
    }

    /// Sends a record that failed every attempt to the on-failure destination.
    async fn give_up(&self, record: &Record, attempts: u32, reason: &str) -> std::io::Result<()> {
        let mut line = json!({
            "condition": "RetryAttemptsExhausted",
            "shard": self.shard,
            "item": item_id(record),
            "sequence_number": &*record.sequence_number,
            "sub_sequence_number": record.sub_sequence_number,
            "partition_key": record.partition_key,
            "attempts": attempts,
            "reason": reason,
        });
        match std::str::from_utf8(&record.data) {
            Ok(text) => line["data"] = json!(text),
            Err(_) => line["data_base64"] = json!(base64::engine::general_purpose::STANDARD.encode(&record.data)),
        }
        self.settings.on_failure.send(line.to_string()).await?;
        self.handler.results.sent_on_failure.fetch_add(1, Relaxed);
        if self.settings.json {
            println!(
                "{}",
                json!({"event": "on_failure", "shard": self.shard, "item": item_id(record), "attempts": attempts})
            );
        }
        Ok(())
    }
}

impl Processor for EventSource {
    async fn process_records(&mut self, batch: Batch, checkpointer: &mut Checkpointer) {
        let mut records = &batch.records[..];
        // Failed attempts of records[0] so far.
        let mut failures = 0u32;
        while !records.is_empty() {
            self.invocation += 1;
            let response = self.handler.handle(records).await;
            // As Lambda: the failure with the lowest position counts; an id not in the batch
            // fails the whole batch.
            let failed = response.batch_item_failures.iter().fold(None::<(usize, &ItemFailure)>, |first, f| {
                let at = records.iter().position(|r| item_id(r) == f.item_identifier).unwrap_or(0);
                match first {
                    Some((i, _)) if i <= at => first,
                    _ => Some((at, f)),
                }
            });
            let Some((at, failure)) = failed else {
                self.report(records, failures, records.len(), None, "");
                if !self.checkpoint(checkpointer, None).await {
                    return;
                }
                break;
            };
            let attempts = if at == 0 { failures + 1 } else { 1 };
            let exhausted = attempts > self.settings.max_retries;
            let note = match (at, exhausted) {
                (0, false) => format!("retrying in {} ms", self.settings.retry_delay.as_millis()),
                (_, false) => {
                    format!("checkpointed before it, retrying from it in {} ms", self.settings.retry_delay.as_millis())
                }
                (_, true) => format!("{attempts} attempts: sent to the on-failure destination, skipped"),
            };
            self.report(records, failures, at, Some(failure), &note);
            if at > 0 && !self.checkpoint(checkpointer, Some(&records[at - 1])).await {
                return;
            }
            records = &records[at..];
            failures = attempts;
            if exhausted {
                let reason = failure.reason.clone();
                let mut tries = 0;
                while let Err(error) = self.give_up(&records[0], attempts, &reason).await {
                    // Never checkpoint past a record that is neither handled nor recorded: after
                    // five tries the worker stops as a crash would, and this shard goes no further.
                    tries += 1;
                    eprintln!("{}: the on-failure destination failed ({error})", self.shard);
                    if tries == 5 {
                        *lock(&self.settings.fatal) = Some(format!("the on-failure destination failed: {error}"));
                        std::future::pending::<()>().await;
                    }
                    tokio::time::sleep(self.settings.retry_delay).await;
                }
                if !self.checkpoint(checkpointer, Some(&records[0])).await {
                    return;
                }
                records = &records[1..];
                failures = 0;
            } else {
                tokio::time::sleep(self.settings.retry_delay).await;
            }
        }
    }

    async fn shard_ended(&mut self, checkpointer: &mut Checkpointer) {
        // Every record was handled or sent on: SHARD_END lets the children start.
        let _ = self.checkpoint(checkpointer, None).await;
    }
}

// ---------------------------------------------------------------------------------------------
// The program.

#[tokio::main]
async fn main() -> ExitCode {
    exit_code("lambda_style", run(Args::parse()).await)
}

async fn run(args: Args) -> Result<(), LambdaError> {
    let demo = args.stream.is_none();
    let batch_size = args.batch_size.unwrap_or(if demo { 10 } else { 100 });
    if !(1..=10_000).contains(&batch_size) {
        return Err(LambdaError::Usage(format!("--batch-size {batch_size}: must be 1 to 10,000")));
    }
    let batch_window = Duration::from_millis(args.batch_window_ms.unwrap_or(if demo { 500 } else { 0 }));
    let idle_exit = idle_limit(args.idle_exit.or(demo.then_some(2.0))).map_err(LambdaError::Usage)?;
    let on_failure = match &args.on_failure {
        None => Destination::Stderr,
        Some(path) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| LambdaError::OnFailure { path: path.clone(), source })?;
            Destination::File(path.clone(), Arc::new(Mutex::new(file)))
        }
    };
    let settings = Arc::new(Settings {
        max_retries: args.max_retries.unwrap_or(if demo { 2 } else { 3 }),
        retry_delay: Duration::from_millis(args.retry_delay_ms),
        json: args.json,
        on_failure,
        fatal: Mutex::new(None),
    });

    let bed = TestBed::start().await.map_err(LambdaError::TestBed)?;
    if !args.json {
        println!("Kinesis at {}, DynamoDB at {}", bed.kinesis.endpoint_url(), bed.dynamodb.endpoint_url());
    }
    let stream = match &args.stream {
        Some(stream) => stream.clone(),
        None => {
            let stream = bed.kinesis.create_stream(2).await.map_err(LambdaError::TestBed)?;
            write_sample(&bed, &stream).await?;
            stream
        }
    };
    let table = args.table.clone().unwrap_or_else(|| format!("lambda-style-{stream}"));
    let mut config = SchedulerConfig::new(&stream, &table);
    config.initial_position = args.from.position();
    config.failover = Duration::from_millis(args.failover_ms);
    config.max_batch_records = batch_size;
    config.max_batch_wait = batch_window;
    // An idle shard is read twice a second (the KCL's 1.5 s saves calls; records come sooner).
    config.polling.idle_time_between_reads = Duration::from_millis(500);
    if !args.json {
        let destination = match &settings.on_failure {
            Destination::Stderr => "standard error".to_owned(),
            Destination::File(path, _) => path.display().to_string(),
        };
        println!(
            "processing {stream} (lease table {table}): batches of at most {batch_size} records gathered for up to {} ms, \
             {} retries {} ms apart, then to {destination}",
            batch_window.as_millis(),
            settings.max_retries,
            settings.retry_delay.as_millis()
        );
    }

    let results = Arc::new(Results::default());
    let scheduler = {
        let (settings, results) = (settings.clone(), results.clone());
        Scheduler::start(bed.kinesis.client(), bed.dynamodb.client(), config, move |shard: &str| EventSource {
            shard: shard.to_owned(),
            handler: Handler { attempts: HashMap::new(), results: results.clone() },
            settings: settings.clone(),
            invocation: 0,
        })
        .map_err(LambdaError::Config)?
    };
    match wait(&scheduler, &settings, idle_exit).await {
        Stop::Graceful => scheduler.shutdown().await.map_err(LambdaError::Scheduler)?,
        Stop::Stopped => {
            scheduler.shutdown().await.map_err(LambdaError::Scheduler)?;
            return Err(LambdaError::Stopped);
        }
        Stop::Fatal(why) => {
            // As a crash: nothing more is checkpointed; the leases expire and are taken over.
            scheduler.abort();
            return Err(LambdaError::Fatal(why));
        }
    }

    let handled = lock(&results.handled).clone();
    let (orders, twice) = (handled.len(), handled.values().filter(|n| **n > 1).count());
    let cents = results.amount_cents.load(Relaxed);
    let (invocations, retries, sent_on) =
        (results.invocations.load(Relaxed), results.retries.load(Relaxed), results.sent_on_failure.load(Relaxed));
    if args.json {
        let summary = json!({"event": "summary", "orders_handled": orders, "handled_twice": twice,
            "invocations": invocations, "retries": retries, "sent_on_failure": sent_on});
        println!("{summary}");
    } else {
        println!(
            "done: {orders} orders handled ({twice} more than once), amount {}.{:02}; {invocations} invocations, \
             {retries} of them retries; {sent_on} records sent to the on-failure destination",
            cents / 100,
            cents % 100
        );
    }
    if demo {
        let missing: Vec<u64> = (0..100).filter(|o| *o != 42 && !handled.contains_key(o)).collect();
        if !missing.is_empty() || handled.contains_key(&42) || twice > 0 || sent_on != 2 {
            return Err(LambdaError::Demo(format!(
                "expected orders 0-99 but 42 handled once each and 2 records sent on; missing {missing:?}, \
                 {twice} handled twice, {sent_on} sent on"
            )));
        }
        println!("demo: as expected (order 42 and the record that is not an order went to the on-failure destination)");
    }
    Ok(())
}

/// Writes 100 orders (order 7 fails once, 23 twice, 42 nine times) and one record that is not
/// an order.
async fn write_sample(bed: &TestBed, stream: &str) -> Result<(), LambdaError> {
    let producer = Producer::builder(bed.kinesis.client(), stream).build().map_err(LambdaError::Producer)?;
    let mut receipts = Vec::new();
    for order in 0..100u64 {
        let fail = match order {
            7 => 1,
            23 => 2,
            42 => 9,
            _ => 0,
        };
        let data = format!(r#"{{"order":{order},"amount":{}.{:02},"fail":{fail}}}"#, 10 + order % 7, order % 100);
        let record = UserRecord::new(format!("customer-{}", order % 5), data);
        receipts.push(producer.put(record).await.map_err(LambdaError::Put)?);
        if order == 60 {
            let garbage = UserRecord::new("customer-0", "this is not an order");
            receipts.push(producer.put(garbage).await.map_err(LambdaError::Put)?);
        }
    }
    let mut failed = 0;
    for receipt in receipts {
        failed += usize::from(receipt.await.is_err());
    }
    producer.shutdown().await;
    if failed > 0 {
        return Err(LambdaError::Demo(format!("{failed} sample records were not delivered")));
    }
    println!("demo: wrote 100 orders (7 fails once, 23 twice, 42 nine times) and one record that is not an order");
    Ok(())
}

/// Why the worker stops.
enum Stop {
    /// Ctrl-C or the idle exit.
    Graceful,
    /// The worker stopped by itself.
    Stopped,
    /// A processor cannot go on.
    Fatal(String),
}

/// Waits for Ctrl-C, the idle exit, or a reason to stop.
async fn wait(scheduler: &Scheduler, settings: &Settings, idle_exit: Option<Duration>) -> Stop {
    let mut idle = Idle::new(idle_exit);
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut ctrl_c_armed = true;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if let Some(why) = lock(&settings.fatal).take() {
                    return Stop::Fatal(why);
                }
                if scheduler.is_finished() {
                    return Stop::Stopped;
                }
                if idle.poll(scheduler) {
                    if !settings.json {
                        println!("no record for {:?}: shutting down", idle_exit.unwrap_or_default());
                    }
                    return Stop::Graceful;
                }
            }
            signal = &mut ctrl_c, if ctrl_c_armed => {
                ctrl_c_armed = false;
                match signal {
                    Ok(()) => {
                        eprintln!("Ctrl-C: finishing the batches in hand and shutting down");
                        return Stop::Graceful;
                    }
                    Err(error) => eprintln!("Ctrl-C cannot be watched ({error}); stop with --idle-exit or a signal"),
                }
            }
        }
    }
}
