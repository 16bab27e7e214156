//! A consumer worker process killed with SIGKILL in the middle of a batch.
//!
//! The worker runs in a child process (this test binary, run again on its ignored entry point),
//! writes each record it processes to a log file at the start of the batch, works on the batch for
//! a while, then checkpoints. The test kills it while batches are in flight, reads the checkpoints
//! the lease table holds at that moment, and starts a second worker process. It asserts that every
//! record is processed, and that the second worker processes nothing at or before the checkpoints
//! the dead one had written: the duplicates are the batch that was in flight, after its last
//! checkpoint.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Child;
use std::time::Duration;

use common::*;
use kinesis_consumer::{LeaseTable, Scheduler, cmp_sequence_numbers};
use kinesis_testkit::TestBed;

/// The child process: one worker until it is killed. Not a test; the parent runs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the child process of a_worker_killed_in_the_middle_of_a_batch_..., run by it"]
async fn child_worker_entry_point() {
    let var = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name} is set by the parent test"));
    let (stream, table, worker, log) = (var("CRASH_STREAM"), var("CRASH_TABLE"), var("CRASH_WORKER"), var("CRASH_LOG"));
    // TestBed::start connects to AWS_ENDPOINT_URL_KINESIS / _DYNAMODB, the parent's emulators.
    let bed = TestBed::start().await.expect("the parent's emulators");
    let work = Duration::from_millis(300);
    let scheduler = Scheduler::start(bed.kinesis.client(), bed.dynamodb.client(), config(&stream, &table, &worker), {
        let worker = worker.clone();
        move |shard: &str| FileLogging::open(&worker, shard, &log, work, Duration::ZERO)
    })
    .expect("a valid config");
    scheduler.wait().await.expect("the worker runs until it is killed");
}

fn spawn_worker(bed: &TestBed, stream: &str, table: &str, worker: &str, log: &std::path::Path) -> Child {
    let log = log.to_string_lossy();
    let vars = [("CRASH_STREAM", stream), ("CRASH_TABLE", table), ("CRASH_WORKER", worker), ("CRASH_LOG", &log)];
    spawn_child(bed, "child_worker_entry_point", &vars)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_in_the_middle_of_a_batch_loses_nothing_and_repeats_only_after_its_checkpoint() {
    let (bed, stream, table) = bed_and_stream(2).await;
    let dir = std::env::temp_dir().join(format!("kinesis-crash-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("processed.log");
    let client = bed.kinesis.client();

    // A steady load while the first worker runs.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = load_until(client.clone(), &stream, "c", 40, stop.clone());
    let mut first = spawn_worker(&bed, &stream, &table, "first", &log);
    let leases = LeaseTable::new(bed.dynamodb.client(), table.clone());
    // Once it has checkpointed a few batches on both shards, kill it (SIGKILL): with 300 ms of
    // work per batch, a batch is almost always in flight.
    until_checkpointed(&leases, 2, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    first.kill().expect("SIGKILL");
    first.wait().unwrap();
    let at_kill = checkpoints_now(&leases).await;
    let processed_by_first = read_file_log(&log).len();

    // A second worker process takes over once the dead one's leases expire.
    let mut second = spawn_worker(&bed, &stream, &table, "second", &log);
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent: BTreeSet<String> = load.await.unwrap().into_iter().collect();
    let all = eventually(Duration::from_secs(60), || {
        let seen: BTreeSet<String> = read_file_log(&log).into_iter().map(|r| r.4).collect();
        sent.iter().all(|d| seen.contains(d))
    })
    .await;
    second.kill().expect("stop the second worker");
    second.wait().unwrap();
    let records = read_file_log(&log);
    let seen: BTreeSet<&str> = records.iter().map(|r| r.4.as_str()).collect();
    let lost: Vec<&String> = sent.iter().filter(|d| !seen.contains(d.as_str())).collect();
    assert!(
        all && lost.is_empty(),
        "{} of {} records never processed, e.g. {:?}",
        lost.len(),
        sent.len(),
        lost.first()
    );

    // The second worker repeated nothing at or before the first one's checkpoints.
    let mut repeated = 0;
    for (worker, shard, seq, sub, _) in &records {
        let Some((cseq, csub)) = at_kill.get(shard) else { continue };
        if worker == "second" && cmp_sequence_numbers(seq, cseq).then(sub.cmp(csub)).is_le() {
            panic!("{shard} {seq}/{sub} processed again at or before the dead worker's checkpoint {cseq}/{csub}");
        }
    }
    let mut times: BTreeMap<(&str, &str, u64), usize> = BTreeMap::new();
    for (_, shard, seq, sub, _) in &records {
        *times.entry((shard, seq, *sub)).or_default() += 1;
    }
    repeated += times.values().filter(|n| **n > 1).count();
    eprintln!(
        "killed mid-batch: {} sent, {processed_by_first} processed by the dead worker, {repeated} processed again \
         (after its checkpoints), 0 lost",
        sent.len()
    );
    let _ = std::fs::remove_dir_all(&dir);
}
