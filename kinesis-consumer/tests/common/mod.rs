//! Shared parts of the scheduler tests: a processor that logs every call, a config with short
//! timings, and a writer of plain records.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_kinesis::primitives::Blob;
use kinesis_consumer::{
    Batch, Checkpointer, InitialPosition, Initialization, Processor, Scheduler, SchedulerConfig, cmp_sequence_numbers,
};
use kinesis_testkit::TestBed;
use tokio::time::Instant;

pub const FAILOVER: Duration = Duration::from_millis(1500);

/// One `process_records` call.
#[derive(Clone, Debug)]
pub struct Call {
    pub worker: String,
    pub shard: String,
    pub start: Instant,
    pub end: Instant,
    /// (sequence number, sub-sequence number, data) of each record.
    pub records: Vec<(String, u64, String)>,
    /// Whether the checkpoint after the call was written.
    pub checkpointed: bool,
}

/// Everything the processors of a test saw.
#[derive(Clone, Debug, Default)]
pub struct Log {
    pub calls: Arc<Mutex<Vec<Call>>>,
    /// (worker, shard) of each `shard_ended` that checkpointed SHARD_END.
    pub ended: Arc<Mutex<Vec<(String, String, Instant)>>>,
    /// (worker, shard) of each `lease_lost`.
    pub lost: Arc<Mutex<Vec<(String, String)>>>,
    /// (worker, shard, checkpoint) of each `initialize`.
    pub initialized: Arc<Mutex<Vec<(String, String, String)>>>,
}

impl Log {
    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    /// The data of every record processed, with how many times each was.
    pub fn received(&self) -> BTreeMap<String, usize> {
        let mut seen = BTreeMap::new();
        for call in self.calls() {
            for (_, _, data) in call.records {
                *seen.entry(data).or_default() += 1;
            }
        }
        seen
    }

    /// Asserts that no two workers processed one shard at overlapping times.
    pub fn assert_exclusive(&self) {
        let calls = self.calls();
        let mut by_shard: BTreeMap<&str, Vec<&Call>> = BTreeMap::new();
        for call in &calls {
            by_shard.entry(&call.shard).or_default().push(call);
        }
        for (shard, calls) in by_shard {
            for a in &calls {
                for b in &calls {
                    if a.worker != b.worker {
                        assert!(
                            a.end <= b.start || b.end <= a.start,
                            "{} and {} processed {shard} at overlapping times",
                            a.worker,
                            b.worker
                        );
                    }
                }
            }
        }
    }
}

/// (sequence number, sub-sequence number, data) of each record of a batch, as a `Call` logs them.
pub fn logged(batch: &Batch) -> Vec<(String, u64, String)> {
    batch
        .records
        .iter()
        .map(|r| (r.sequence_number.to_string(), r.sub_sequence_number, String::from_utf8_lossy(&r.data).into_owned()))
        .collect()
}

/// Logs every call; checkpoints after each batch, at SHARD_END and at shutdown.
pub struct Logging {
    pub worker: String,
    pub shard: String,
    pub log: Log,
    /// How long each batch takes.
    pub work: Duration,
}

impl Processor for Logging {
    async fn initialize(&mut self, init: &Initialization) {
        let at = format!("{:?}/{}", init.checkpoint.position, init.checkpoint.sub_sequence);
        self.log.initialized.lock().unwrap().push((self.worker.clone(), self.shard.clone(), at));
    }

    async fn process_records(&mut self, batch: Batch, checkpointer: &mut Checkpointer) {
        let start = Instant::now();
        let records = logged(&batch);
        if !self.work.is_zero() {
            tokio::time::sleep(self.work).await;
        }
        let end = Instant::now();
        // The records are processed now: log them before the checkpoint, as a real sink would
        // have written them. A worker aborted while its checkpoint is in flight may have stored
        // the checkpoint without seeing the reply; logging afterwards would miss those records.
        let index = {
            let mut calls = self.log.calls.lock().unwrap();
            calls.push(Call {
                worker: self.worker.clone(),
                shard: self.shard.clone(),
                start,
                end,
                records,
                checkpointed: false,
            });
            calls.len() - 1
        };
        if checkpointer.checkpoint().await.is_ok() {
            self.log.calls.lock().unwrap()[index].checkpointed = true;
        }
    }

    async fn lease_lost(&mut self) {
        self.log.lost.lock().unwrap().push((self.worker.clone(), self.shard.clone()));
    }

    async fn shard_ended(&mut self, checkpointer: &mut Checkpointer) {
        if checkpointer.checkpoint().await.is_ok() {
            self.log.ended.lock().unwrap().push((self.worker.clone(), self.shard.clone(), Instant::now()));
        }
    }

    async fn shutdown_requested(&mut self, checkpointer: &mut Checkpointer) {
        let _ = checkpointer.checkpoint().await;
    }
}

/// Short timings, reading from the oldest record, KCL 2.x lease management.
pub fn config(stream: &str, table: &str, worker: &str) -> SchedulerConfig {
    let mut config = SchedulerConfig::new(stream, table);
    config.worker_id = worker.to_owned();
    config.initial_position = InitialPosition::TrimHorizon;
    config.failover = FAILOVER;
    config.shard_sync_interval = Duration::from_secs(1);
    config.parent_poll_interval = Duration::from_millis(200);
    config.polling.idle_time_between_reads = Duration::from_millis(100);
    config.polling.min_time_between_reads = Duration::from_millis(50);
    config.table_create_timeout = Duration::from_secs(30);
    // These tests are of the KCL 2.x lease management (taking, stealing, failover by expiry);
    // tests/kcl3.rs has the 3.x fleet.
    config.lease_management = kinesis_consumer::LeaseManagement::Kcl2Compatible;
    config
}

/// Starts a worker whose processors log into `log`.
pub fn start_worker(bed: &TestBed, config: SchedulerConfig, log: &Log, work: Duration) -> Scheduler {
    start_worker_on(bed.kinesis.client(), bed.dynamodb.client(), config, log, work)
}

/// Starts a worker on the given endpoints whose processors log into `log`.
pub fn start_worker_on(
    kinesis: aws_sdk_kinesis::Client,
    dynamodb: aws_sdk_dynamodb::Client,
    config: SchedulerConfig,
    log: &Log,
    work: Duration,
) -> Scheduler {
    let (worker, log) = (config.worker_id.clone(), log.clone());
    Scheduler::start(kinesis, dynamodb, config, move |shard: &str| Logging {
        worker: worker.clone(),
        shard: shard.to_owned(),
        log: log.clone(),
        work,
    })
    .expect("a valid config")
}

/// Puts `count` plain records named `{prefix}-{i}` with random keys; returns their data.
pub async fn put_plain(client: &aws_sdk_kinesis::Client, stream: &str, prefix: &str, count: usize) -> Vec<String> {
    let mut sent = Vec::with_capacity(count);
    for chunk in (0..count).collect::<Vec<_>>().chunks(500) {
        let mut request = client.put_records().stream_name(stream);
        for i in chunk {
            let data = format!("{prefix}-{i}");
            let entry = aws_sdk_kinesis::types::PutRecordsRequestEntry::builder()
                .partition_key(format!("key-{}", fastrand_key(*i, prefix)))
                .data(Blob::new(data.clone()))
                .build()
                .unwrap();
            request = request.records(entry);
            sent.push(data);
        }
        let out = request.send().await.expect("PutRecords");
        assert_eq!(out.failed_record_count().unwrap_or(0), 0, "the emulator refused records");
    }
    sent
}

fn fastrand_key(i: usize, prefix: &str) -> u64 {
    // A cheap spread of keys over the shards, repeatable per record.
    let mut h: u64 = 1469598103934665603;
    for b in prefix.bytes().chain(i.to_le_bytes()) {
        h = (h ^ u64::from(b)).wrapping_mul(1099511628211);
    }
    h
}

/// Waits until `done` holds, checking every 100 ms, for at most `limit`. Returns whether it held.
pub async fn eventually(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    done()
}

/// Starts both emulators and creates a stream; returns them, the stream and a lease-table name.
pub async fn bed_and_stream(shards: u32) -> (TestBed, String, String) {
    let bed = TestBed::start().await.expect("start the emulators (ferrokinesis and dynoxide, embedded)");
    let stream = bed.kinesis.create_stream(shards).await.expect("create the stream");
    (bed, stream, kinesis_testkit::unique_name("leases"))
}

/// Puts rounds of `per_round` records, 100 ms apart, on a task of its own until `stop` is set.
pub fn load_until(
    client: aws_sdk_kinesis::Client,
    stream: &str,
    prefix: &str,
    per_round: usize,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<Vec<String>> {
    let (stream, prefix) = (stream.to_owned(), prefix.to_owned());
    tokio::spawn(async move {
        let mut sent = Vec::new();
        let mut round = 0;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            sent.extend(put_plain(&client, &stream, &format!("{prefix}{round}"), per_round).await);
            round += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        sent
    })
}

/// Waits up to `limit` until every record in `sent` was received; then asserts it.
pub async fn all_received(log: &Log, sent: &[String], limit: Duration) {
    let done = eventually(limit, || {
        let received = log.received();
        sent.iter().all(|d| received.contains_key(d))
    })
    .await;
    if !done {
        assert_all_received(log, sent);
    }
}

/// Splits the stream's first shard in the middle of the hash-key space and waits until the
/// stream is ACTIVE again; returns the parent.
pub async fn split_first_shard(client: &aws_sdk_kinesis::Client, stream: &str) -> kinesis_testkit::ShardInfo {
    let parent = kinesis_testkit::list_all_shards(client, stream).await.unwrap().remove(0);
    client
        .split_shard()
        .stream_name(stream)
        .shard_to_split(&parent.shard_id)
        .new_starting_hash_key((u128::MAX / 2).to_string())
        .send()
        .await
        .unwrap();
    kinesis_testkit::wait_until_stream_active(client, stream).await.unwrap();
    parent
}

/// The KCL's lease attributes and their types (2.x, and the 3.x additions), and the one
/// attribute of this library's own (`leaseOwnerInstance`, which the KCL leaves alone).
pub const KCL_ATTRIBUTES: &[(&str, &str)] = &[
    ("leaseOwnerInstance", "S"),
    ("leaseKey", "S"),
    ("leaseOwner", "S"),
    ("leaseCounter", "N"),
    ("checkpoint", "S"),
    ("checkpointSubSequenceNumber", "N"),
    ("pendingCheckpoint", "S"),
    ("pendingCheckpointSubSequenceNumber", "N"),
    ("ownerSwitchesSinceCheckpoint", "N"),
    ("parentShardId", "SS"),
    ("childShardIds", "SS"),
    ("startingHashKey", "S"),
    ("endingHashKey", "S"),
    ("checkpointOwner", "S"),
    ("throughputKBps", "N"),
    ("entityType", "S"),
];

/// Whether a row of the lease table is a lease (no `entityType`, or `LEASE`).
pub fn is_lease_row(item: &std::collections::HashMap<String, aws_sdk_dynamodb::types::AttributeValue>) -> bool {
    item.get("entityType").is_none_or(|t| t.as_s().is_ok_and(|t| t == "LEASE"))
}

/// The DynamoDB type of an attribute value, as the KCL schema names it.
pub fn type_of(value: &aws_sdk_dynamodb::types::AttributeValue) -> &'static str {
    use aws_sdk_dynamodb::types::AttributeValue;
    match value {
        AttributeValue::S(_) => "S",
        AttributeValue::N(_) => "N",
        AttributeValue::Ss(_) => "SS",
        AttributeValue::Ns(_) => "NS",
        AttributeValue::Bool(_) => "BOOL",
        AttributeValue::M(_) => "M",
        AttributeValue::L(_) => "L",
        _ => "other",
    }
}

/// Asserts every record in `sent` was received.
pub fn assert_all_received(log: &Log, sent: &[String]) {
    let received = log.received();
    let missing: Vec<&String> = sent.iter().filter(|d| !received.contains_key(*d)).collect();
    assert!(
        missing.is_empty(),
        "{} of {} records never processed, e.g. {:?}",
        missing.len(),
        sent.len(),
        &missing[..missing.len().min(5)]
    );
}

/// The sequence numbers checkpointed by `worker` on `shard` (last of them).
pub fn last_checkpoint(log: &Log, worker: &str, shard: &str) -> Option<(String, u64)> {
    log.calls()
        .into_iter()
        .filter(|c| c.worker == worker && c.shard == shard && c.checkpointed)
        .filter_map(|c| c.records.last().map(|(s, sub, _)| (s.clone(), *sub)))
        .max_by(|a, b| cmp_sequence_numbers(&a.0, &b.0).then(a.1.cmp(&b.1)))
}

pub fn shards_of(log: &Log, worker: &str) -> BTreeSet<String> {
    log.calls().into_iter().filter(|c| c.worker == worker).map(|c| c.shard).collect()
}

/// Runs this test binary again, as a child process, on its ignored test `entry` (a worker that
/// runs until it is killed), with the test bed's endpoints and `vars`. Its output is discarded.
pub fn spawn_child(bed: &TestBed, entry: &str, vars: &[(&str, &str)]) -> std::process::Child {
    std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", entry, "--nocapture"])
        .envs(bed.child_env())
        .envs(vars.iter().copied())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start the child process")
}

/// The lines of a log that child processes append to, each split into its first four words and
/// the rest.
pub fn read_log_lines(path: &std::path::Path) -> Vec<[String; 5]> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut f = l.splitn(5, ' ');
            Some([f.next()?.into(), f.next()?.into(), f.next()?.into(), f.next()?.into(), f.next()?.into()])
        })
        .collect()
}

/// Waits until every lease of `table` is checkpointed at a sequence number, and there are
/// `shards` of them (at most `limit`).
pub async fn until_checkpointed(leases: &kinesis_consumer::LeaseTable, shards: usize, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let rows = leases.list().await.unwrap_or_default();
        if rows.len() == shards
            && rows.iter().all(|l| matches!(l.checkpoint.position, kinesis_consumer::Position::Sequence(_)))
        {
            return;
        }
        assert!(Instant::now() < deadline, "every shard checkpointed within {limit:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A processor of a worker in a child process: appends `worker shard sequence sub data` per record
/// to a log file (one write per batch, so a kill cannot cut a line in two), burns
/// `burn_per_record` of CPU per record, sleeps `work`, then checkpoints; it checkpoints at shard
/// end and when asked to shut down or hand the lease off.
pub struct FileLogging {
    pub worker: String,
    pub shard: String,
    pub log: std::fs::File,
    pub work: Duration,
    pub burn_per_record: Duration,
}

impl FileLogging {
    /// A processor of `worker` for `shard` appending to the file at `log`.
    pub fn open(worker: &str, shard: &str, log: &str, work: Duration, burn_per_record: Duration) -> Self {
        FileLogging {
            worker: worker.to_owned(),
            shard: shard.to_owned(),
            log: std::fs::OpenOptions::new().create(true).append(true).open(log).expect("open the log"),
            work,
            burn_per_record,
        }
    }
}

impl Processor for FileLogging {
    async fn process_records(&mut self, batch: Batch, checkpointer: &mut Checkpointer) {
        use std::io::Write as _;
        let mut lines = String::new();
        for r in &batch.records {
            let data = String::from_utf8_lossy(&r.data);
            lines.push_str(&format!(
                "{} {} {} {} {data}\n",
                self.worker, self.shard, r.sequence_number, r.sub_sequence_number
            ));
        }
        self.log.write_all(lines.as_bytes()).expect("write the log");
        let end = std::time::Instant::now() + self.burn_per_record * batch.records.len() as u32;
        while std::time::Instant::now() < end {
            std::hint::spin_loop();
        }
        tokio::time::sleep(self.work).await;
        let _ = checkpointer.checkpoint().await;
    }

    async fn shard_ended(&mut self, checkpointer: &mut Checkpointer) {
        let _ = checkpointer.checkpoint().await;
    }

    async fn shutdown_requested(&mut self, checkpointer: &mut Checkpointer) {
        let _ = checkpointer.checkpoint().await;
    }
}

/// (worker, shard, sequence, sub, data) per record of a `FileLogging` log.
pub fn read_file_log(path: &std::path::Path) -> Vec<(String, String, String, u64, String)> {
    read_log_lines(path)
        .into_iter()
        .filter_map(|[worker, shard, seq, sub, data]| Some((worker, shard, seq, sub.parse().ok()?, data)))
        .collect()
}

/// Each lease's checkpoint now, for those at a sequence number: (sequence, sub-sequence) by key.
pub async fn checkpoints_now(leases: &kinesis_consumer::LeaseTable) -> BTreeMap<String, (String, u64)> {
    checkpoints_of(&leases.list().await.unwrap())
}

/// The checkpoints of `rows` that are at a sequence number: (sequence, sub-sequence) by key.
pub fn checkpoints_of(rows: &[kinesis_consumer::Lease]) -> BTreeMap<String, (String, u64)> {
    rows.iter()
        .filter_map(|l| match &l.checkpoint.position {
            kinesis_consumer::Position::Sequence(seq) => {
                Some((l.key.clone(), (seq.clone(), l.checkpoint.sub_sequence)))
            }
            _ => None,
        })
        .collect()
}
