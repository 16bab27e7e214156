//! DynamoDB requests per lease-hour: what holding and sharing leases costs in lease-table requests,
//! for our workers in both lease-management modes and for the Java KCL 3.5.1, in one run.
//!
//! ```text
//! cargo run --release --example lease_cost
//! cargo run --release --example lease_cost -- --shards 32 --workers 3 --warmup-secs 30 --measure-secs 120
//! cargo run --release --example lease_cost -- --only ours      # without Java
//! ```
//!
//! One stream of `--shards` shards on the embedded ferrokinesis, no records (so no checkpoint
//! is written: what is counted is the cost of the lease management itself), and for each fleet a
//! new lease table on the embedded dynoxide behind a counting proxy (`kinesis-testkit`'s fault
//! proxy, with no fault: it counts every request by its `X-Amz-Target` operation). `--workers`
//! workers share the leases with the KCL's default timings (10 s failover). Once every lease is held
//! and `--warmup-secs` have passed, the requests of `--measure-secs` are counted:
//! requests / leases / hours. Every request counts, whoever makes it (our workers in this process,
//! the KCL's in child JVMs), so both sides are measured the same way.
//!
//! Needs Java 17 and Maven for the KCL's fleet, as the interoperability tests do.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use kinesis_consumer::{
    AssignmentStrategy, Batch, Checkpointer, InitialPosition, LeaseManagement, LeaseTable, Processor, Scheduler,
    SchedulerConfig,
};
use kinesis_testkit::{
    DynamoDb, FaultProxy, JavaInterop, JavaProcess, Kinesis, KinesisOptions, child_env, unique_name,
};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const USAGE: &str =
    "usage: lease_cost [--shards N] [--workers N] [--warmup-secs S] [--measure-secs S] [--only ours|kcl]";

/// Checkpoints every batch (there are none here: the stream stays empty).
struct Checkpointing;

impl Processor for Checkpointing {
    async fn process_records(&mut self, _batch: Batch, checkpointer: &mut Checkpointer) {
        let _ = checkpointer.checkpoint().await;
    }

    async fn shard_ended(&mut self, checkpointer: &mut Checkpointer) {
        let _ = checkpointer.checkpoint().await;
    }

    async fn shutdown_requested(&mut self, checkpointer: &mut Checkpointer) {
        let _ = checkpointer.checkpoint().await;
    }
}

/// A fleet under measurement.
enum Fleet {
    Ours(Vec<Scheduler>),
    Kcl(Vec<JavaProcess>),
}

impl Fleet {
    async fn stop(self) {
        match self {
            Fleet::Ours(workers) => {
                for worker in workers {
                    let _ = worker.shutdown().await;
                }
            }
            Fleet::Kcl(processes) => drop(processes),
        }
    }
}

struct Settings {
    shards: u32,
    workers: usize,
    warmup: Duration,
    measure: Duration,
}

/// Counts of one fleet's measured window.
struct Measured {
    name: &'static str,
    requests: BTreeMap<String, u64>,
    lease_hours: f64,
}

impl Measured {
    fn per_lease_hour(&self, n: u64) -> f64 {
        n as f64 / self.lease_hours
    }
}

async fn measure(
    name: &'static str,
    dynamodb: &DynamoDb,
    settings: &Settings,
    start: impl FnOnce(&str, &FaultProxy) -> Result<Fleet, BoxError>,
) -> Result<Measured, BoxError> {
    let proxy = FaultProxy::start(dynamodb.endpoint_url()).await?;
    let app = unique_name("lease-cost");
    let fleet = start(&app, &proxy)?;
    // Every lease held; then, for up to a minute, held by every worker. (A KCL 3.x fleet whose
    // workers publish no CPU balances by throughput, and with no records it never moves a lease:
    // its first worker keeps every lease it was given.)
    let leases = LeaseTable::new(dynamodb.client(), app.clone());
    let started = Instant::now();
    let mut all_held: Option<Instant> = None;
    let owners = loop {
        let rows = leases.list().await.unwrap_or_default();
        let mut owners: BTreeMap<String, usize> = BTreeMap::new();
        for owner in rows.iter().filter_map(|l| l.owner.clone()) {
            *owners.entry(owner).or_default() += 1;
        }
        let held = rows.len() == settings.shards as usize
            && rows.iter().all(|l| l.owner.is_some() && l.checkpoint_owner.is_none());
        if held {
            let since = *all_held.get_or_insert_with(Instant::now);
            if owners.len() == settings.workers || since.elapsed() > Duration::from_secs(60) {
                break owners;
            }
        }
        if started.elapsed() > Duration::from_secs(300) {
            return Err(format!("{name}: the leases were not held within 300 s: {owners:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    println!("{name}: every lease held after {:.1} s, {owners:?}; warming up", started.elapsed().as_secs_f64());
    tokio::time::sleep(settings.warmup).await;
    let before = proxy.request_counts();
    let window = Instant::now();
    tokio::time::sleep(settings.measure).await;
    let after = proxy.request_counts();
    let hours = window.elapsed().as_secs_f64() / 3600.0;
    fleet.stop().await;
    let requests = after.iter().map(|(op, n)| (op.clone(), n - before.get(op).copied().unwrap_or(0))).collect();
    Ok(Measured { name, requests, lease_hours: hours * f64::from(settings.shards) })
}

fn ours(
    kinesis: &Kinesis,
    stream: &str,
    app: &str,
    proxy: &FaultProxy,
    workers: usize,
    mode: LeaseManagement,
) -> Result<Fleet, BoxError> {
    let dynamodb = DynamoDb::connect(proxy.url()).client();
    let mut started = Vec::new();
    for i in 0..workers {
        let mut config = SchedulerConfig::new(stream, app);
        config.worker_id = format!("rust-{}", i + 1);
        config.initial_position = InitialPosition::TrimHorizon;
        config.lease_management = mode;
        // Workers in one process report the same CPU: balance them by count.
        config.assignment_strategy = AssignmentStrategy::LeaseCount;
        started.push(Scheduler::start(kinesis.client(), dynamodb.clone(), config, |_: &str| Checkpointing)?);
    }
    Ok(Fleet::Ours(started))
}

fn kcl(
    java: &JavaInterop,
    kinesis: &Kinesis,
    stream: &str,
    app: &str,
    proxy: &FaultProxy,
    workers: usize,
) -> Result<Fleet, BoxError> {
    let env = child_env(Some(kinesis.endpoint_url()), Some(proxy.url()));
    let mut started = Vec::new();
    for i in 0..workers {
        let worker = format!("kcl-{}", i + 1);
        // The KCL's default shard-sync interval (60 s), as ours.
        let args = [
            "--stream",
            stream,
            "--app",
            app,
            "--worker",
            &worker,
            "--mode",
            "3x",
            "--report",
            "batches",
            "--shard-sync-ms",
            "60000",
        ];
        started.push(java.spawn("KclReader", &args, &env, None)?);
    }
    Ok(Fleet::Kcl(started))
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<(), BoxError> {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let value = |name: &str| argv.iter().position(|a| a == name).and_then(|i| argv.get(i + 1)).cloned();
    let number = |name: &str, default: u64| -> Result<u64, BoxError> {
        value(name).map_or(Ok(default), |v| v.parse().map_err(|_| format!("{name}: {v}? {USAGE}").into()))
    };
    let settings = Settings {
        shards: number("--shards", 32)? as u32,
        workers: number("--workers", 3)? as usize,
        warmup: Duration::from_secs(number("--warmup-secs", 30)?),
        measure: Duration::from_secs(number("--measure-secs", 120)?),
    };
    let only = value("--only");
    let kinesis = Kinesis::embedded(KinesisOptions::default()).await?;
    let dynamodb = DynamoDb::embedded().await?;
    let stream = kinesis.create_stream(settings.shards).await?;
    println!(
        "lease_cost: {} shards, {} workers a fleet, no records; {} s of warm-up, then {} s counted",
        settings.shards,
        settings.workers,
        settings.warmup.as_secs(),
        settings.measure.as_secs()
    );
    let mut results = Vec::new();
    if only.as_deref() != Some("kcl") {
        for (name, mode) in
            [("ours, KCL 2.x mode", LeaseManagement::Kcl2Compatible), ("ours, KCL 3.x mode", LeaseManagement::Kcl3)]
        {
            let workers = settings.workers;
            results.push(
                measure(name, &dynamodb, &settings, |app, proxy| ours(&kinesis, &stream, app, proxy, workers, mode))
                    .await?,
            );
        }
    }
    if only.as_deref() != Some("ours") {
        let java = JavaInterop::get()?;
        let workers = settings.workers;
        results.push(
            measure("KCL 3.5.1, 3.x mode", &dynamodb, &settings, |app, proxy| {
                kcl(java, &kinesis, &stream, app, proxy, workers)
            })
            .await?,
        );
    }

    let operations: std::collections::BTreeSet<&String> = results.iter().flat_map(|r| r.requests.keys()).collect();
    println!("\nDynamoDB requests per lease-hour ({} leases, {} workers, idle):", settings.shards, settings.workers);
    let mut header = String::from("| fleet | all |");
    let mut rule = String::from("|---|---|");
    for op in &operations {
        header.push_str(&format!(" {op} |"));
        rule.push_str("---|");
    }
    println!("{header}\n{rule}");
    for r in &results {
        let total: u64 = r.requests.values().sum();
        let mut line = format!("| {} | **{:.0}** |", r.name, r.per_lease_hour(total));
        for op in &operations {
            line.push_str(&format!(" {:.0} |", r.per_lease_hour(r.requests.get(*op).copied().unwrap_or(0))));
        }
        println!("{line}");
    }
    Ok(())
}
