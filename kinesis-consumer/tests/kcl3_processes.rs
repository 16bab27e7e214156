//! A KCL 3.x fleet of worker processes: what needs workers that a leader can tell apart by their
//! CPU, or that can be killed with SIGKILL.
//!
//! Each worker runs in a child process (this test binary, run again on its ignored entry point),
//! with `CpuSource::Process` and the default utilisation-aware assignment. It writes each record it
//! processes to a shared log file (one write per batch), burns `KCL3_BURN_MICROS` of CPU per
//! record, and checkpoints every batch and when asked to hand a lease off.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Child;
use std::time::Duration;

use common::*;
use kinesis_consumer::{LeaseTable, Position, Scheduler};
use kinesis_testkit::TestBed;
use tokio::time::Instant;

/// A worker of the fleet: KCL 3.x lease management with short timings, CPU from this process.
fn process_config(stream: &str, table: &str, worker: &str) -> kinesis_consumer::SchedulerConfig {
    let mut settings = config(stream, table, worker);
    settings.lease_management = kinesis_consumer::LeaseManagement::Kcl3;
    settings.leader_lock_duration = Some(Duration::from_secs(6));
    settings.leader_heartbeat = Some(Duration::from_millis(1500));
    settings.handoff_timeout = Duration::from_secs(10);
    settings.worker_metrics_interval = Duration::from_secs(2);
    settings.cpu_source = kinesis_consumer::CpuSource::Process;
    // Batches of at most 100 records: a busy processor finishes its batch, and so a handoff, in
    // about a second.
    settings.polling.max_records = 100;
    settings
}

/// The tests of this file one at a time: each runs three worker processes, and the busy one's
/// CPU must stand out on a 2-core machine.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The child process: one worker until it is killed. Not a test; the parent runs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the child process of the tests in this file, run by them"]
async fn kcl3_worker_entry_point() {
    let var = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name} is set by the parent test"));
    let (stream, table, worker, log) = (var("KCL3_STREAM"), var("KCL3_TABLE"), var("KCL3_WORKER"), var("KCL3_LOG"));
    let burn_per_record = Duration::from_micros(var("KCL3_BURN_MICROS").parse().expect("microseconds"));
    let bed = TestBed::start().await.expect("the parent's emulators");
    let scheduler =
        Scheduler::start(bed.kinesis.client(), bed.dynamodb.client(), process_config(&stream, &table, &worker), {
            let worker = worker.clone();
            move |shard: &str| FileLogging::open(&worker, shard, &log, Duration::ZERO, burn_per_record)
        })
        .expect("a valid config");
    scheduler.wait().await.expect("the worker runs until it is killed");
}

fn spawn_worker(
    bed: &TestBed,
    stream: &str,
    table: &str,
    worker: &str,
    log: &std::path::Path,
    burn: Duration,
) -> Child {
    let (log, burn) = (log.to_string_lossy(), burn.as_micros().to_string());
    let vars = [
        ("KCL3_STREAM", stream),
        ("KCL3_TABLE", table),
        ("KCL3_WORKER", worker),
        ("KCL3_LOG", &log),
        ("KCL3_BURN_MICROS", &burn),
    ];
    spawn_child(bed, "kcl3_worker_entry_point", &vars)
}

/// Leases held per worker, and whether a handoff is under way; SHARD_END leases left out.
async fn holdings(leases: &LeaseTable) -> (BTreeMap<String, usize>, bool) {
    let rows = leases.list().await.unwrap_or_default();
    let mut held = BTreeMap::new();
    for lease in rows.iter().filter(|l| l.checkpoint.position != Position::ShardEnd) {
        if let Some(owner) = &lease.owner {
            *held.entry(owner.clone()).or_default() += 1;
        }
    }
    (held, rows.iter().any(|l| l.checkpoint_owner.is_some()))
}

/// The owner of each lease.
async fn owners(leases: &LeaseTable) -> BTreeMap<String, Option<String>> {
    leases.list().await.unwrap_or_default().into_iter().map(|l| (l.key, l.owner)).collect()
}

fn log_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("kinesis-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("processed.log")
}

/// Kills the children when the test ends, passed or not.
struct Fleet(Vec<Child>);

impl Drop for Fleet {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Issue 14, "Utilisation": one of three workers burns 20 ms of CPU per record; under a steady
/// load its CPU is far above the fleet's average, so the leader hands leases that carry records
/// from it to the two that join it, gracefully (nothing delivered twice), until it holds fewer
/// than either of them: at most 2 of the 8, where balancing by count ends 3/3/2 with the busy
/// worker, the donor, keeping 3. Whether it goes on to 1 depends on noise: the leader does not
/// make a move that its estimate says would put the receiver above the fleet's average (the KCL's
/// rule), and with 8 leases among 3 workers one lease is 3/8 of an average worker's load, so a
/// calm worker whose CPU reads above 5/8 of the average takes no more. Once the load stops, the
/// fleet is idle and no lease moves again, though the workers' CPU figures go on differing by
/// noise (the KCL's PR #1814: its leader keeps moving idle leases).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_worker_ends_with_fewer_leases_and_an_idle_fleet_moves_none() {
    let _serial = SERIAL.lock().await;
    let (bed, stream, table) = bed_and_stream(8).await;
    let log = log_dir("kcl3-busy");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = load_until(bed.kinesis.client(), &stream, "u", 8, stop.clone());
    let leases = LeaseTable::new(bed.dynamodb.client(), table.clone());
    // The busy worker alone first: it holds all 8 leases. Then two calm workers join.
    let mut fleet = Fleet(vec![spawn_worker(&bed, &stream, &table, "busy", &log, Duration::from_millis(20))]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while holdings(&leases).await.0.get("busy") != Some(&8) {
        assert!(Instant::now() < deadline, "the first worker holding every lease: {:?}", holdings(&leases).await);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    for calm in ["calm-1", "calm-2"] {
        fleet.0.push(spawn_worker(&bed, &stream, &table, calm, &log, Duration::ZERO));
    }

    // Balanced by count the fleet would end 3/3/2, the busy worker keeping 3. By utilisation it
    // sheds leases until it holds fewer than each calm worker.
    let joined = Instant::now();
    // 37-47 s here; a loaded 2-core CI machine once took 170 s.
    let deadline = joined + Duration::from_secs(300);
    let mut seen: Vec<(u64, BTreeMap<String, usize>)> = Vec::new();
    loop {
        let (held, handing_off) = holdings(&leases).await;
        let busy = held.get("busy").copied().unwrap_or(0);
        let calm = ["calm-1", "calm-2"].map(|w| held.get(w).copied().unwrap_or(0));
        if seen.last().map(|(_, h)| h) != Some(&held) {
            seen.push((joined.elapsed().as_secs(), held.clone()));
        }
        if !handing_off
            && busy <= 2
            && calm.iter().all(|&c| c > busy && c >= 3)
            && calm.iter().sum::<usize>() + busy == 8
        {
            println!("holdings over time (seconds after the calm workers started): {seen:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the busy worker did not shed its leases (seconds after the calm workers started): {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Idle: once the leases' throughput has decayed, nothing moves over several balancing runs
    // (every 6 x failover: 9 s here).
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent = load.await.unwrap();
    tokio::time::sleep(Duration::from_secs(12)).await;
    let before = owners(&leases).await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    let after = owners(&leases).await;
    assert_eq!(before, after, "an idle fleet moved leases");

    let records = read_file_log(&log);
    let mut times: BTreeMap<&str, usize> = BTreeMap::new();
    for r in &records {
        *times.entry(r.4.as_str()).or_default() += 1;
    }
    let lost: Vec<&String> = sent.iter().filter(|d| !times.contains_key(d.as_str())).collect();
    assert!(lost.is_empty(), "{} of {} records never processed, e.g. {:?}", lost.len(), sent.len(), lost.first());
    let twice: Vec<(&&str, &usize)> = times.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "planned moves delivered {} records twice, e.g. {:?}", twice.len(), twice.first());
    println!("{} records, each once; holdings {:?}", sent.len(), holdings(&leases).await.0);
}

/// Issue 14, "Crash": a worker that is not the leader is killed with SIGKILL. Its leases go to the
/// others once the leader has seen their counters stand still for longer than the failover time:
/// within the failover time and one KCL assignment round (2 x failover), as the issue asks (the
/// leader reads every 1.1 x failover, so that is two of its reads after the last renewal); the
/// new owners deliver nothing at or before the checkpoints the dead worker had written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_s_leases_move_to_the_others_and_repeat_only_after_its_checkpoints() {
    let _serial = SERIAL.lock().await;
    let (bed, stream, table) = bed_and_stream(6).await;
    let log = log_dir("kcl3-kill");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = load_until(bed.kinesis.client(), &stream, "k", 12, stop.clone());
    let names = ["w-1", "w-2", "w-3"];
    let mut fleet = Fleet(names.iter().map(|w| spawn_worker(&bed, &stream, &table, w, &log, Duration::ZERO)).collect());
    let leases = LeaseTable::new(bed.dynamodb.client(), table.clone());
    let dynamodb = bed.dynamodb.client();

    // Every worker holds leases, all checkpointed; the leader is known.
    let deadline = Instant::now() + Duration::from_secs(120);
    let (victim, leader) = loop {
        let (held, handing_off) = holdings(&leases).await;
        let rows = leases.list().await.unwrap_or_default();
        let checkpointed = rows.iter().all(|l| matches!(l.checkpoint.position, Position::Sequence(_)));
        let leader = dynamodb
            .get_item()
            .table_name(&table)
            .key("leaseKey", aws_sdk_dynamodb::types::AttributeValue::S("Leader".into()))
            .consistent_read(true)
            .send()
            .await
            .ok()
            .and_then(|o| o.item)
            .and_then(|i| i.get("ownerName").and_then(|v| v.as_s().ok()).cloned());
        if let Some(leader) = leader
            && !handing_off
            && checkpointed
            && rows.len() == 6
            && names.iter().all(|w| held.get(*w).is_some_and(|&n| n > 0))
        {
            let victim = names.iter().position(|w| **w != leader).unwrap();
            break (victim, leader);
        }
        assert!(Instant::now() < deadline, "every worker holding leases, and a leader: {held:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let dead = names[victim];
    fleet.0[victim].kill().expect("SIGKILL");
    fleet.0[victim].wait().unwrap();
    let killed_at = Instant::now();
    let rows_at_kill = leases.list().await.unwrap();
    let at_kill = checkpoints_of(&rows_at_kill);
    let dead_leases: BTreeSet<String> =
        rows_at_kill.into_iter().filter(|l| l.owner.as_deref() == Some(dead)).map(|l| l.key).collect();

    // Moved within failover (1.5 s) + one KCL assignment round (2 x failover = 3 s), with 1.5 s
    // for a busy machine.
    let moved = loop {
        let rows = leases.list().await.unwrap_or_default();
        if rows
            .iter()
            .filter(|l| dead_leases.contains(&l.key))
            .all(|l| l.owner.is_some() && l.owner.as_deref() != Some(dead))
        {
            break killed_at.elapsed();
        }
        assert!(killed_at.elapsed() < Duration::from_secs(30), "the dead worker's leases still its own: {rows:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!("{dead} (leader {leader}) held {dead_leases:?}; they moved {moved:?} after the kill");
    assert!(moved < Duration::from_secs(6), "the leases moved only {moved:?} after the kill");

    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent: BTreeSet<String> = load.await.unwrap().into_iter().collect();
    let all = eventually(Duration::from_secs(60), || {
        let seen: BTreeSet<String> = read_file_log(&log).into_iter().map(|r| r.4).collect();
        sent.iter().all(|d| seen.contains(d))
    })
    .await;
    drop(fleet);
    let records = read_file_log(&log);
    assert!(all, "every record processed");
    // Nothing at or before a checkpoint the dead worker wrote was delivered again by another.
    for (worker, shard, seq, sub, data) in &records {
        if worker == dead || !dead_leases.contains(shard) {
            continue;
        }
        if let Some((at, at_sub)) = at_kill.get(shard) {
            let order = kinesis_consumer::cmp_sequence_numbers(seq, at).then(sub.cmp(at_sub));
            let again = records.iter().any(|r| r.0 == dead && r.4 == *data);
            assert!(
                !(again && order.is_le()),
                "{worker} re-delivered {data} of {shard}, at or before the dead worker's checkpoint {at}/{at_sub}"
            );
        }
    }
    let repeated = records.iter().filter(|r| r.0 != dead && records.iter().any(|d| d.0 == dead && d.4 == r.4)).count();
    println!("{} records; {repeated} delivered again after the dead worker's last checkpoints", sent.len());
}
