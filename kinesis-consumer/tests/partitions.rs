//! Workers cut off from the world without dying:
//!
//! - **A zombie**: a worker process stopped (SIGSTOP) for longer than the failover time while its
//!   leases move to another worker, then continued (SIGCONT). It may finish the batch it was in
//!   the middle of (the overlap), its checkpoint is refused, and it starts nothing more.
//! - **A worker cut off from DynamoDB but not from Kinesis**: it can still read records but cannot
//!   renew its leases; it stops processing before another worker may take them, so no shard is
//!   processed by two workers at overlapping times.
//!
//! Both: nothing lost.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::process::{Child, Command};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use kinesis_consumer::{Batch, Checkpointer, LeaseTable, Processor, Scheduler};
use kinesis_testkit::{DynamoDb, FaultProxy, TestBed};

fn millis() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis()
}

/// Logs `rec <worker> <shard> <ms> <data>` per record at the start of a batch, works, checkpoints,
/// then logs `done <worker> <shard> <ms> <ok|lost|error>`.
struct Timed {
    worker: String,
    shard: String,
    log: std::fs::File,
    work: Duration,
}

impl Processor for Timed {
    async fn process_records(&mut self, batch: Batch, checkpointer: &mut Checkpointer) {
        let now = millis();
        let mut lines = String::new();
        for r in &batch.records {
            lines.push_str(&format!("rec {} {} {now} {}\n", self.worker, self.shard, String::from_utf8_lossy(&r.data)));
        }
        self.log.write_all(lines.as_bytes()).expect("write the log");
        tokio::time::sleep(self.work).await;
        let result = match checkpointer.checkpoint().await {
            Ok(()) => "ok",
            Err(e) if e.is_lease_lost() => "lost",
            Err(_) => "error",
        };
        self.log
            .write_all(format!("done {} {} {} {result}\n", self.worker, self.shard, millis()).as_bytes())
            .expect("write the log");
    }

    async fn shard_ended(&mut self, checkpointer: &mut Checkpointer) {
        let _ = checkpointer.checkpoint().await;
    }
}

/// The child process: one worker until it is killed. Not a test; the parent runs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the child process of a_zombie_worker_..., run by it"]
async fn zombie_child_entry_point() {
    let var = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name} is set by the parent test"));
    let (stream, table, worker, log) =
        (var("ZOMBIE_STREAM"), var("ZOMBIE_TABLE"), var("ZOMBIE_WORKER"), var("ZOMBIE_LOG"));
    let bed = TestBed::start().await.expect("the parent's emulators");
    let scheduler = Scheduler::start(bed.kinesis.client(), bed.dynamodb.client(), config(&stream, &table, &worker), {
        let worker = worker.clone();
        move |shard: &str| Timed {
            worker: worker.clone(),
            shard: shard.to_owned(),
            log: std::fs::OpenOptions::new().create(true).append(true).open(&log).expect("open the log"),
            work: Duration::from_millis(300),
        }
    })
    .expect("a valid config");
    scheduler.wait().await.expect("the worker runs until it is killed");
}

fn spawn_worker(bed: &TestBed, stream: &str, table: &str, worker: &str, log: &std::path::Path) -> Child {
    let log = log.to_string_lossy();
    let vars = [("ZOMBIE_STREAM", stream), ("ZOMBIE_TABLE", table), ("ZOMBIE_WORKER", worker), ("ZOMBIE_LOG", &log)];
    spawn_child(bed, "zombie_child_entry_point", &vars)
}

fn signal(child: &Child, signal: &str) {
    let status = Command::new("kill").args([signal, &child.id().to_string()]).status().expect("run kill");
    assert!(status.success(), "kill {signal}");
}

/// One log line: (kind, worker, shard, millis, rest).
type Line = (String, String, String, u128, String);

fn read_log(path: &std::path::Path) -> Vec<Line> {
    read_log_lines(path)
        .into_iter()
        .filter_map(|[kind, worker, shard, millis, rest]| Some((kind, worker, shard, millis.parse().ok()?, rest)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zombie_worker_finishes_at_most_its_batch_in_flight_and_its_checkpoint_is_refused() {
    let (bed, stream, table) = bed_and_stream(2).await;
    let dir = std::env::temp_dir().join(format!("kinesis-zombie-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("processed.log");
    let client = bed.kinesis.client();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = load_until(client.clone(), &stream, "z", 40, stop.clone());
    let mut zombie = spawn_worker(&bed, &stream, &table, "zombie", &log);
    let leases = LeaseTable::new(bed.dynamodb.client(), table.clone());
    until_checkpointed(&leases, 2, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_millis(450)).await;
    // Stopped in the middle of a batch (300 ms of work each), for more than 3 failover times.
    signal(&zombie, "-STOP");
    let stopped_at = millis();
    let mut heir = spawn_worker(&bed, &stream, &table, "heir", &log);
    let heir_has_both = eventually(Duration::from_secs(30), || {
        let lines = read_log(&log);
        let shards: BTreeSet<&str> =
            lines.iter().filter(|l| l.0 == "rec" && l.1 == "heir").map(|l| l.2.as_str()).collect();
        shards.len() == 2
    })
    .await;
    assert!(heir_has_both, "the heir took both shards while the zombie was stopped");
    signal(&zombie, "-CONT");
    let continued_at = millis();
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent: BTreeSet<String> = load.await.unwrap().into_iter().collect();
    let all = eventually(Duration::from_secs(60), || {
        let seen: BTreeSet<String> = read_log(&log).into_iter().filter(|l| l.0 == "rec").map(|l| l.4).collect();
        sent.iter().all(|d| seen.contains(d))
    })
    .await;
    for child in [&mut zombie, &mut heir] {
        child.kill().unwrap();
        child.wait().unwrap();
    }
    let lines = read_log(&log);
    assert!(all, "every record processed");
    // After SIGCONT the zombie started no batch under the leases it held before: it may end the
    // one it was in, and its checkpoint is refused. (Later it may take a lease again by a steal in
    // a take round, whose processing waits one failover time: that is balancing, not a zombie.)
    let started_after: Vec<&Line> = lines
        .iter()
        .filter(|l| l.0 == "rec" && l.1 == "zombie" && l.3 >= continued_at && l.3 < continued_at + FAILOVER.as_millis())
        .collect();
    assert!(started_after.is_empty(), "the zombie started a batch after it was continued: {:?}", started_after.first());
    let ended_after: Vec<&Line> = lines
        .iter()
        .filter(|l| {
            l.0 == "done" && l.1 == "zombie" && l.3 >= continued_at && l.3 < continued_at + FAILOVER.as_millis()
        })
        .collect();
    // (Stopped in the middle of a batch on each shard, almost always: 300 ms of work per batch,
    // records every 100 ms. A batch not in flight has nothing to end.)
    for line in &ended_after {
        assert_ne!(line.4, "ok", "the zombie's checkpoint after it was continued was written: {line:?}");
    }
    // The overlap: from the heir's first batch on a shard to the zombie's end of its batch there.
    let mut overlap = BTreeMap::new();
    for done in &ended_after {
        let heir_start = lines.iter().filter(|l| l.0 == "rec" && l.1 == "heir" && l.2 == done.2).map(|l| l.3).min();
        if let Some(start) = heir_start {
            overlap.insert(done.2.clone(), done.3.saturating_sub(start.max(stopped_at)));
        }
    }
    let processed_by_zombie = lines.iter().filter(|l| l.0 == "rec" && l.1 == "zombie").count();
    eprintln!(
        "zombie: stopped {} ms; {} sent, {processed_by_zombie} processed by the zombie, {} batches ended after SIGCONT \
         (checkpoints: {:?}), overlap per shard (ms): {overlap:?}, 0 lost",
        continued_at - stopped_at,
        sent.len(),
        ended_after.len(),
        ended_after.iter().map(|l| l.4.as_str()).collect::<Vec<_>>()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_cut_off_from_dynamodb_but_not_kinesis_stops_before_its_leases_move() {
    let (bed, stream, table) = bed_and_stream(4).await;
    let proxy = FaultProxy::start(bed.dynamodb.endpoint_url()).await.unwrap();
    let client = bed.kinesis.client();
    let log = Log::default();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = load_until(client.clone(), &stream, "p", 40, stop.clone());
    // The island reaches Kinesis directly, DynamoDB only through the proxy.
    let island = start_worker_on(
        client.clone(),
        DynamoDb::connect(proxy.url()).client(),
        config(&stream, &table, "island"),
        &log,
        Duration::from_millis(100),
    );
    assert!(eventually(Duration::from_secs(30), || shards_of(&log, "island").len() == 4).await);
    let mainland = start_worker(&bed, config(&stream, &table, "mainland"), &log, Duration::from_millis(100));
    assert!(eventually(Duration::from_secs(30), || !shards_of(&log, "mainland").is_empty()).await, "balanced in");
    // Cut the island off from DynamoDB for 4 failover times: every lease it holds moves.
    let cut_at = tokio::time::Instant::now();
    proxy.black_hole(FAILOVER * 4);
    tokio::time::sleep(FAILOVER * 4 + Duration::from_secs(2)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent = load.await.unwrap();
    all_received(&log, &sent, Duration::from_secs(60)).await;
    island.shutdown().await.unwrap();
    mainland.shutdown().await.unwrap();
    assert!(proxy.black_holed() > 0, "the island's DynamoDB calls fell into the hole");
    // No shard was processed by both at overlapping times.
    log.assert_exclusive();
    // While cut off, the island stopped processing within its lease's validity (2/3 of the failover
    // time after its last renewal), before any other worker may take a lease as expired.
    let last_island_call = log
        .calls()
        .iter()
        .filter(|c| c.worker == "island" && c.start >= cut_at && c.start < cut_at + FAILOVER * 4)
        .map(|c| c.end)
        .max();
    // That it stopped in time is what `assert_exclusive` checked above: the mainland took every
    // lease, never while the island was in a batch of the same shard. (Its last batch ends within
    // its lease's validity, 2/3 of the failover time after its last renewal, plus one batch.)
    let moved = log
        .calls()
        .iter()
        .filter(|c| c.worker == "mainland" && c.start >= cut_at)
        .map(|c| c.shard.clone())
        .collect::<BTreeSet<_>>();
    assert_eq!(moved.len(), 4, "every shard moved to the mainland: {moved:?}");
    eprintln!(
        "DynamoDB-only partition: {} sent, {} received, island's last batch ended {:?} after the cut, 0 lost, no overlap",
        sent.len(),
        log.received().len(),
        last_island_call.map(|l| l.duration_since(cut_at))
    );
}
