//! Our workers in a lease table in KCL 3.x lease management, led by a KCL 3.x leader. The test
//! is the leader: it makes the table's 3.x rows and index and writes its assignments and
//! handoffs as the KCL 3.5.1's LeaseAssignmentManager writes them (`assignLease`:
//! `leaseOwner` set, `checkpointOwner` removed, `leaseCounter` + 1; `initiateGracefulLeaseHandoff`:
//! `leaseOwner` set to the new owner and `checkpointOwner` to the old, counter untouched), on
//! the embedded DynamoDB. The same moves made by the real Java KCL leader are in the facade's
//! `interop_java` tests.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use aws_sdk_dynamodb::types::AttributeValue;
use common::{Log, bed_and_stream, config, eventually, last_checkpoint, load_until, start_worker};
use kinesis_consumer::{Batch, Checkpointer, LeaseTable, Processor, Scheduler};

/// The leader's side of a 3.x table, as the test plays it.
struct Leader {
    client: aws_sdk_dynamodb::Client,
    table: String,
}

impl Leader {
    /// Makes `table` a KCL 3.x table: the lease table, its `LeaseOwnerToLeaseKeyIndex`, the
    /// `Migration3.0` row a new KCL 3.x application writes, and the leader lock, held.
    async fn new_table(client: aws_sdk_dynamodb::Client, table: &str) -> Leader {
        let leases = LeaseTable::new(client.clone(), table);
        leases.create_if_missing(Duration::from_secs(30)).await.expect("create the lease table");
        leases.create_owner_index_if_missing(Duration::from_secs(30)).await.expect("create the index");
        let s = |v: &str| AttributeValue::S(v.to_owned());
        let now = AttributeValue::N("1796000000000".into());
        let history = AttributeValue::L(vec![AttributeValue::M(HashMap::from([
            ("cv".to_owned(), s("CLIENT_VERSION_INIT")),
            ("mb".to_owned(), s("leader")),
            ("mts".to_owned(), now.clone()),
        ]))]);
        client
            .put_item()
            .table_name(table)
            .item("leaseKey", s("Migration3.0"))
            .item("entityType", s("CLIENT_VERSION_MIGRATION"))
            .item("cv", s("CLIENT_VERSION_3X"))
            .item("mb", s("leader"))
            .item("mts", now)
            .item("h", history)
            .condition_expression("attribute_not_exists(leaseKey)")
            .send()
            .await
            .expect("write Migration3.0");
        // The test holds the leader lock (10 minutes), so that our workers follow it.
        client
            .put_item()
            .table_name(table)
            .item("leaseKey", s("Leader"))
            .item("ownerName", s("test-leader"))
            .item("leaseDuration", s("600000"))
            .item("recordVersionNumber", s("00000000-0000-4000-8000-000000000000"))
            .item("entityType", s("LEADER"))
            .send()
            .await
            .expect("write the leader lock");
        Leader { client, table: table.to_owned() }
    }

    /// `assignLease`: the lease goes to `to`, whoever had it.
    async fn assign(&self, key: &str, to: &str) {
        self.client
            .update_item()
            .table_name(&self.table)
            .key("leaseKey", AttributeValue::S(key.to_owned()))
            .update_expression("SET leaseOwner = :to ADD leaseCounter :one REMOVE checkpointOwner")
            .condition_expression("attribute_exists(leaseKey)")
            .expression_attribute_values(":to", AttributeValue::S(to.to_owned()))
            .expression_attribute_values(":one", AttributeValue::N("1".into()))
            .send()
            .await
            .expect("assign a lease");
    }

    /// `initiateGracefulLeaseHandoff`: `from` is to hand the lease to `to`.
    async fn hand_off(&self, key: &str, from: &str, to: &str) {
        self.client
            .update_item()
            .table_name(&self.table)
            .key("leaseKey", AttributeValue::S(key.to_owned()))
            .update_expression("SET leaseOwner = :to, checkpointOwner = :from")
            .condition_expression("leaseOwner = :from AND attribute_not_exists(checkpointOwner)")
            .expression_attribute_values(":to", AttributeValue::S(to.to_owned()))
            .expression_attribute_values(":from", AttributeValue::S(from.to_owned()))
            .send()
            .await
            .expect("start a handoff");
    }

    /// Every row of the table, by key.
    async fn rows(&self) -> HashMap<String, HashMap<String, AttributeValue>> {
        let out = self.client.scan().table_name(&self.table).consistent_read(true).send().await.expect("Scan");
        out.items().iter().map(|item| (item["leaseKey"].as_s().unwrap().clone(), item.clone())).collect()
    }
}

fn text(row: &HashMap<String, AttributeValue>, name: &str) -> Option<String> {
    row.get(name).and_then(|v| v.as_s().ok()).cloned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planned_moves_are_graceful_handoffs_and_deliver_nothing_twice() {
    let (bed, stream, app) = bed_and_stream(4).await;
    let leader = Leader::new_table(bed.dynamodb.client(), &app).await;
    let log = Log::default();
    let a = start_worker(&bed, config(&stream, &app, "worker-a"), &log, Duration::ZERO);
    let b = start_worker(&bed, config(&stream, &app, "worker-b"), &log, Duration::ZERO);

    // The shard sync makes the leases; in a 3.x table nobody takes one: the leader assigns.
    let leases = LeaseTable::new(bed.dynamodb.client(), &app);
    assert!(eventually(Duration::from_secs(20), || a.metrics().shard_syncs > 0 && b.metrics().shard_syncs > 0).await);
    tokio::time::sleep(common::FAILOVER * 3).await;
    let listed = leases.list().await.unwrap();
    assert_eq!(listed.len(), 4);
    assert!(listed.iter().all(|l| l.owner.is_none()), "no worker takes a lease of a 3.x table: {listed:?}");
    // Both publish their WorkerMetricStats rows (the first 2 s after start).
    let rows = leader.rows().await;
    for worker in ["worker-a", "worker-b"] {
        let row = rows.get(worker).unwrap_or_else(|| panic!("{worker} published no WorkerMetricStats row"));
        assert_eq!(text(row, "entityType").as_deref(), Some("WORKER_METRIC_STATS"));
        assert!(row["lut"].as_n().is_ok() && row["sts"].as_m().is_ok() && row["opr"].as_m().is_ok(), "{row:?}");
    }

    let stop = Arc::new(AtomicBool::new(false));
    let load = load_until(bed.kinesis.client(), &stream, "r", 40, stop.clone());
    let shards: Vec<String> = listed.iter().map(|l| l.key.clone()).collect();
    for shard in &shards {
        leader.assign(shard, "worker-a").await;
    }
    assert!(
        eventually(Duration::from_secs(30), || common::shards_of(&log, "worker-a").len() == 4).await,
        "worker-a found the leases assigned to it and processes all four shards"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Two planned moves under load, A -> B.
    for shard in &shards[..2] {
        leader.hand_off(shard, "worker-a", "worker-b").await;
    }
    assert!(
        eventually(Duration::from_secs(30), || {
            let b_shards = common::shards_of(&log, "worker-b");
            shards[..2].iter().all(|s| b_shards.contains(s))
        })
        .await,
        "worker-b processes the shards handed to it"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let sent = load.await.unwrap();
    common::all_received(&log, &sent, Duration::from_secs(30)).await;

    let twice: Vec<_> = log.received().into_iter().filter(|(_, n)| *n > 1).collect();
    assert!(twice.is_empty(), "records delivered twice across planned moves: {:?}", &twice[..twice.len().min(5)]);
    log.assert_exclusive();
    let a_metrics = a.metrics();
    assert_eq!((a_metrics.handoffs_started, a_metrics.handoffs_completed, a_metrics.handoffs_timed_out), (2, 2, 0));
    assert_eq!(a_metrics.leases_lost, 0, "a handoff is not a lost lease");
    assert_eq!(b.metrics().leases_discovered, 2);
    // B started each moved shard exactly at A's last checkpoint.
    let initialized = log.initialized.lock().unwrap().clone();
    for shard in &shards[..2] {
        let (sequence, sub) = last_checkpoint(&log, "worker-a", shard).expect("worker-a checkpointed the shard");
        let b_start = initialized.iter().find(|(w, s, _)| w == "worker-b" && s == shard).map(|(_, _, at)| at.clone());
        assert_eq!(b_start, Some(format!("Sequence({sequence:?})/{sub}")), "{shard}");
    }
    // The rows: moved leases are B's with no checkpoint owner, every lease says it is one, and
    // renewals carry the lease's throughput.
    let rows = leader.rows().await;
    for shard in &shards {
        let row = &rows[shard];
        let owner = if shards[..2].contains(shard) { "worker-b" } else { "worker-a" };
        assert_eq!(text(row, "leaseOwner").as_deref(), Some(owner), "{shard}");
        assert!(!row.contains_key("checkpointOwner"), "{shard}: {row:?}");
        assert_eq!(text(row, "entityType").as_deref(), Some("LEASE"), "{shard}");
        let kbps: f64 = row["throughputKBps"].as_n().expect("throughputKBps written by renewals").parse().unwrap();
        assert!(kbps >= 0.0, "{shard}: {kbps}");
    }

    // A graceful shutdown releases the leases (the leader assigns them at its next run) and
    // removes the worker's metrics row, so that nothing is assigned to a worker that is gone.
    a.shutdown().await.unwrap();
    let rows = leader.rows().await;
    assert!(!rows.contains_key("worker-a"), "worker-a's WorkerMetricStats row is deleted at shutdown");
    for shard in &shards[2..] {
        assert_eq!(text(&rows[shard], "leaseOwner"), None, "{shard} released at shutdown");
    }
    assert!(rows.contains_key("worker-b"));
    b.shutdown().await.unwrap();
}

/// Processes, checkpoints, and never returns from `shutdown_requested`.
struct Stuck;

impl Processor for Stuck {
    async fn process_records(&mut self, _batch: Batch, checkpointer: &mut Checkpointer) {
        let _ = checkpointer.checkpoint().await;
    }

    async fn shard_ended(&mut self, checkpointer: &mut Checkpointer) {
        let _ = checkpointer.checkpoint().await;
    }

    async fn shutdown_requested(&mut self, _checkpointer: &mut Checkpointer) {
        std::future::pending::<()>().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handoff_whose_processor_does_not_finish_is_transferred_at_the_timeout() {
    let (bed, stream, app) = bed_and_stream(1).await;
    let leader = Leader::new_table(bed.dynamodb.client(), &app).await;
    let mut settings = config(&stream, &app, "worker-a");
    settings.handoff_timeout = Duration::from_secs(2);
    let a = Scheduler::start(bed.kinesis.client(), bed.dynamodb.client(), settings, |_: &str| Stuck).unwrap();
    let leases = LeaseTable::new(bed.dynamodb.client(), &app);
    assert!(eventually(Duration::from_secs(20), || a.metrics().shard_syncs > 0).await);
    let shard = leases.list().await.unwrap()[0].key.clone();
    leader.assign(&shard, "worker-a").await;
    common::put_plain(&bed.kinesis.client(), &stream, "s", 10).await;
    assert!(eventually(Duration::from_secs(20), || a.metrics().records_processed == 10).await);

    let before = leases.get(&shard).await.unwrap().unwrap();
    leader.hand_off(&shard, "worker-a", "worker-z").await;
    assert!(
        eventually(Duration::from_secs(20), || a.metrics().handoffs_timed_out == 1).await,
        "the transfer is forced once the handoff timeout passed: {:?}",
        a.metrics()
    );
    let after = leases.get(&shard).await.unwrap().unwrap();
    assert_eq!(after.owner.as_deref(), Some("worker-z"));
    assert_eq!(after.checkpoint_owner, None);
    assert!(after.counter > before.counter, "the transfer bumps the counter");
    assert_eq!(after.checkpoint, before.checkpoint, "the checkpoint stays where the processor left it");
    assert_eq!(a.metrics().leases_held, 0);
    a.abort();
}

/// Settings of a worker of an all-Rust KCL 3.x fleet, with short timings.
fn fleet_config(stream: &str, app: &str, worker: &str) -> kinesis_consumer::SchedulerConfig {
    let mut settings = config(stream, app, worker);
    settings.lease_management = kinesis_consumer::LeaseManagement::Kcl3;
    settings.leader_lock_duration = Some(Duration::from_secs(6));
    settings.leader_heartbeat = Some(Duration::from_millis(1500));
    settings.handoff_timeout = Duration::from_secs(10);
    // Workers in one process report the same CPU, so utilisation cannot tell them apart: these
    // tests balance by count (`kcl3_processes.rs` tests the utilisation strategy across processes).
    settings.assignment_strategy = kinesis_consumer::AssignmentStrategy::LeaseCount;
    settings
}

/// How many shards each running worker processed in the last `window`.
fn recent_holdings(log: &Log, window: Duration) -> std::collections::BTreeMap<String, usize> {
    let since = tokio::time::Instant::now() - window;
    let mut shards: std::collections::BTreeMap<String, std::collections::BTreeSet<String>> = Default::default();
    for call in log.calls().into_iter().filter(|c| c.end >= since) {
        shards.entry(call.worker).or_default().insert(call.shard);
    }
    shards.into_iter().map(|(w, s)| (w, s.len())).collect()
}

/// Planned moves in a fleet of ours alone, led by one of ours: 1 worker, then 3, then 5, then 2
/// (three graceful stops), on 12 shards under a steady load. Every move is a graceful handoff
/// (or, for a stopping worker, a release after its last checkpoint): nothing is delivered twice,
/// nothing lost, and never two processors on one shard at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planned_moves_in_a_fleet_of_ours_deliver_nothing_twice() {
    let (bed, stream, app) = bed_and_stream(12).await;
    let log = Log::default();
    let start = |name: &str| start_worker(&bed, fleet_config(&stream, &app, name), &log, Duration::ZERO);
    let mut workers = vec![start("w1")];
    let stop = Arc::new(AtomicBool::new(false));
    let load = load_until(bed.kinesis.client(), &stream, "p", 60, stop.clone());
    let settled = |want: &'static [usize]| {
        let log = log.clone();
        move || {
            let mut counts: Vec<usize> = recent_holdings(&log, Duration::from_secs(2)).into_values().collect();
            counts.sort_unstable();
            counts == want
        }
    };
    assert!(eventually(Duration::from_secs(30), settled(&[12])).await, "the first worker leads and gets all 12");
    for name in ["w2", "w3"] {
        workers.push(start(name));
    }
    assert!(
        eventually(Duration::from_secs(60), settled(&[4, 4, 4])).await,
        "three workers hold 4 each: {:?}",
        recent_holdings(&log, Duration::from_secs(2))
    );
    for name in ["w4", "w5"] {
        workers.push(start(name));
    }
    assert!(
        eventually(Duration::from_secs(60), settled(&[2, 2, 2, 3, 3])).await,
        "five workers within one of each other: {:?}",
        recent_holdings(&log, Duration::from_secs(2))
    );
    // Three graceful stops, the leader among them.
    let leader = workers.iter().position(|w| w.metrics().leader_elections > 0).expect("a leader");
    let mut stopped = Vec::new();
    for i in [leader, 0, 1] {
        let i = if i >= workers.len() { workers.len() - 1 } else { i };
        let worker = workers.remove(i);
        stopped.push((worker.worker_id().to_owned(), worker.metrics()));
        worker.shutdown().await.unwrap();
    }
    assert!(
        eventually(Duration::from_secs(60), settled(&[6, 6])).await,
        "the two left hold 6 each: {:?}",
        recent_holdings(&log, Duration::from_secs(2))
    );
    stop.store(true, Ordering::Relaxed);
    let sent = load.await.unwrap();
    common::all_received(&log, &sent, Duration::from_secs(30)).await;

    let twice: Vec<_> = log.received().into_iter().filter(|(_, n)| *n > 1).collect();
    log.assert_exclusive();
    let mut all: Vec<(String, kinesis_consumer::MetricsSnapshot)> = stopped;
    all.extend(workers.iter().map(|w| (w.worker_id().to_owned(), w.metrics())));
    let sum = |f: fn(&kinesis_consumer::MetricsSnapshot) -> u64| all.iter().map(|(_, m)| f(m)).sum::<u64>();
    println!(
        "planned moves: {} records, {} delivered twice; leader elections {}, handoffs started {} completed {} timed out {}, leases lost {}",
        sent.len(),
        twice.len(),
        sum(|m| m.leader_elections),
        sum(|m| m.handoffs_initiated),
        sum(|m| m.handoffs_completed),
        sum(|m| m.handoffs_timed_out),
        sum(|m| m.leases_lost)
    );
    assert!(twice.is_empty(), "delivered twice: {:?}", &twice[..twice.len().min(5)]);
    assert!(sum(|m| m.handoffs_completed) >= 8, "the joins moved leases by handoff");
    assert_eq!(sum(|m| m.handoffs_timed_out), 0);
    assert_eq!(sum(|m| m.leases_lost), 0, "no lease was taken from a worker that held it");
    assert!(sum(|m| m.leader_elections) >= 2, "the leader stopped and another took over");
    for worker in workers {
        worker.shutdown().await.unwrap();
    }
}

/// A new application's first worker (a new table in KCL 3.x lease management) processes records
/// within seconds, not after an assignment interval. The leader's first run comes before the
/// worker's first WorkerMetricStats row, so it finds no active worker; it runs again soon (with
/// backoff) while leases are left without an owner, and wakes its own worker's discovery when it
/// assigns it a lease. (The KCL waits the interval, 2 x failover: here 60 s.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_fleet_processes_within_seconds_not_an_assignment_interval() {
    let (bed, stream, app) = bed_and_stream(4).await;
    let sent = common::put_plain(&bed.kinesis.client(), &stream, "first", 100).await;
    let log = Log::default();
    let mut settings = fleet_config(&stream, &app, "only");
    settings.failover = Duration::from_secs(30);
    let started = tokio::time::Instant::now();
    let worker = start_worker(&bed, settings, &log, Duration::ZERO);
    common::all_received(&log, &sent, Duration::from_secs(60)).await;
    let took = started.elapsed();
    println!("a new 3.x fleet processed its first records {took:?} after its start");
    assert!(
        took < Duration::from_secs(15),
        "every record {took:?} after the start: the leader waited for its 60 s interval instead of running again soon"
    );
    assert_eq!(worker.metrics().leader_elections, 1);
    worker.shutdown().await.unwrap();
}

/// A leader killed (no graceful stop: its lock row stays) is replaced once another worker has
/// seen the lock unchanged for its duration, and the dead worker's leases go to the survivor.
/// (The KCL's #1803 reports a dead leader's lock never taken over.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_leader_is_replaced_within_the_lock_duration() {
    let (bed, stream, app) = bed_and_stream(4).await;
    let log = Log::default();
    let first = start_worker(&bed, fleet_config(&stream, &app, "first"), &log, Duration::ZERO);
    assert!(eventually(Duration::from_secs(30), || first.metrics().leader_elections == 1).await);
    let second = start_worker(&bed, fleet_config(&stream, &app, "second"), &log, Duration::ZERO);
    common::put_plain(&bed.kinesis.client(), &stream, "before", 200).await;
    assert!(
        eventually(Duration::from_secs(40), || first.metrics().leases_held == 2 && second.metrics().leases_held == 2)
            .await
    );
    let killed = tokio::time::Instant::now();
    first.abort();
    let sent = common::put_plain(&bed.kinesis.client(), &stream, "after", 200).await;
    assert!(eventually(Duration::from_secs(30), || second.metrics().leader_elections == 1).await, "the survivor leads");
    let took = killed.elapsed();
    // The lock lasts 6 s; the survivor must first see it unchanged for that long, and it looks
    // every assignment interval (2 x failover = 3 s).
    assert!(took < Duration::from_secs(6 + 3 + 3), "a new leader {took:?} after the kill");
    common::all_received(&log, &sent, Duration::from_secs(30)).await;
    assert_eq!(second.metrics().leases_held, 4);
    second.shutdown().await.unwrap();
}

/// A worker killed and started again under the same worker id (a restarted process with a fixed
/// id) takes its own leader lock back at its first run instead of waiting out the lock's
/// duration, and resumes its leases from their checkpoints.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_restarted_under_its_id_leads_again_at_once() {
    let (bed, stream, app) = bed_and_stream(2).await;
    let log = Log::default();
    let mut settings = fleet_config(&stream, &app, "only");
    settings.leader_lock_duration = Some(Duration::from_secs(60));
    settings.leader_heartbeat = Some(Duration::from_secs(10));
    let first = start_worker(&bed, settings.clone(), &log, Duration::ZERO);
    assert!(eventually(Duration::from_secs(30), || first.metrics().leader_elections == 1).await);
    common::put_plain(&bed.kinesis.client(), &stream, "before", 100).await;
    assert!(eventually(Duration::from_secs(30), || first.metrics().leases_held == 2).await);
    first.abort();
    let restarted_at = tokio::time::Instant::now();
    let again = start_worker(&bed, settings, &log, Duration::ZERO);
    let sent = common::put_plain(&bed.kinesis.client(), &stream, "after", 100).await;
    assert!(
        eventually(Duration::from_secs(20), || again.metrics().leader_elections == 1).await,
        "the restarted worker leads again well within the lock's 60 s"
    );
    println!("led again {:?} after the restart", restarted_at.elapsed());
    common::all_received(&log, &sent, Duration::from_secs(30)).await;
    again.shutdown().await.unwrap();
}

/// Issue 14, "Migration": a table of two workers in KCL 2.x lease management (leases taken, no
/// `Migration3.0` row) is upgraded in place while they run. A worker configured `Kcl3` joins: it
/// finds a 2.x table, creates the lease-owner index and writes `CLIENT_VERSION_UPGRADE_FROM_2X`
/// (as a KCL 3.x worker does); the 2.x workers follow the row and publish WorkerMetricStats; once
/// every lease owner has published for the stabilisation time, the table flips to
/// `CLIENT_VERSION_3X_WITH_ROLLBACK` and every worker runs 3.x: a leader assigns, nobody steals,
/// and a graceful stop afterwards moves its leases without delivering a record twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_2x_table_is_upgraded_to_3x_in_place() {
    let (bed, stream, app) = bed_and_stream(4).await;
    let log = Log::default();
    let old = ["old-1", "old-2"].map(|w| start_worker(&bed, config(&stream, &app, w), &log, Duration::ZERO));
    common::put_plain(&bed.kinesis.client(), &stream, "before", 200).await;
    assert!(
        eventually(Duration::from_secs(30), || old.iter().map(|w| w.metrics().leases_held).sum::<u64>() == 4).await,
        "the 2.x workers hold every lease"
    );
    let table = Leader { client: bed.dynamodb.client(), table: app.clone() };
    assert!(!table.rows().await.contains_key("Migration3.0"), "a 2.x table has no Migration3.0 row");

    let mut settings = fleet_config(&stream, &app, "new-1");
    settings.upgrade_stabilisation = Duration::from_secs(3);
    let new = start_worker(&bed, settings, &log, Duration::ZERO);
    let cv = |rows: &HashMap<String, HashMap<String, AttributeValue>>| {
        rows.get("Migration3.0").and_then(|r| text(r, "cv")).unwrap_or_default()
    };
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let now = cv(&table.rows().await);
        if seen.last() != Some(&now) {
            seen.push(now.clone());
        }
        if now == "CLIENT_VERSION_3X_WITH_ROLLBACK" {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the table did not flip to 3.x: {seen:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        seen.contains(&"CLIENT_VERSION_UPGRADE_FROM_2X".to_owned()),
        "the upgrade went through UPGRADE_FROM_2X: {seen:?}"
    );
    let rows = table.rows().await;
    let history: Vec<String> = rows["Migration3.0"]["h"]
        .as_l()
        .unwrap()
        .iter()
        .filter_map(|e| e.as_m().ok().and_then(|m| m.get("cv")).and_then(|v| v.as_s().ok()).cloned())
        .collect();
    assert_eq!(history, ["CLIENT_VERSION_UPGRADE_FROM_2X", "CLIENT_VERSION_INIT"], "the row's history, newest first");
    for w in ["old-1", "old-2"] {
        assert!(rows.contains_key(w), "{w} published its WorkerMetricStats row during the upgrade: {:?}", rows.keys());
    }

    // 3.x from now on: a leader, nobody steals; a graceful stop hands nothing out twice.
    let workers = [&old[0], &old[1], &new];
    assert!(
        eventually(Duration::from_secs(30), || workers.iter().map(|w| w.metrics().leader_elections).sum::<u64>() >= 1)
            .await,
        "a leader after the flip"
    );
    // Every worker reads the row once a shard-sync interval (1 s here): all of them are in 3.x.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stolen = |ws: &[&Scheduler]| ws.iter().map(|w| w.metrics().leases_stolen).sum::<u64>();
    let stolen_at_flip = stolen(&workers);
    let sent = common::put_plain(&bed.kinesis.client(), &stream, "after", 300).await;
    common::all_received(&log, &sent, Duration::from_secs(30)).await;
    assert_eq!(stolen(&workers), stolen_at_flip, "a lease was stolen after the flip");
    let [old_1, old_2] = old;
    old_1.shutdown().await.unwrap();
    let stolen_of_the_rest = stolen(&[&old_2, &new]);
    let more = common::put_plain(&bed.kinesis.client(), &stream, "later", 300).await;
    common::all_received(&log, &more, Duration::from_secs(30)).await;
    assert_eq!(stolen(&[&old_2, &new]), stolen_of_the_rest, "a lease was stolen after the flip");
    let received = log.received();
    let twice: Vec<&String> =
        sent.iter().chain(more.iter()).filter(|d| received.get(*d).copied().unwrap_or(0) > 1).collect();
    assert!(twice.is_empty(), "after the flip, {} records were delivered twice, e.g. {:?}", twice.len(), twice.first());
    log.assert_exclusive();
    old_2.shutdown().await.unwrap();
    new.shutdown().await.unwrap();
}
