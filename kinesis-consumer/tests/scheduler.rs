//! Workers of one application on real emulators (ferrokinesis + dynoxide): exclusive ownership,
//! a worker's death, a worker joining, and a graceful shutdown.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use kinesis_consumer::{LeaseTable, Scheduler, cmp_sequence_numbers};
use kinesis_testkit::TestBed;
use tokio::time::Instant;

fn holdings(workers: &[&Scheduler]) -> Vec<usize> {
    workers.iter().map(|w| w.held_leases().len()).collect()
}

/// Puts `rounds` rounds of `per_round` records, 100 ms apart, on a task of its own.
fn steady_load(
    bed: &TestBed,
    stream: &str,
    prefix: &str,
    rounds: usize,
    per_round: usize,
) -> tokio::task::JoinHandle<Vec<String>> {
    let (client, stream, prefix) = (bed.kinesis.client(), stream.to_owned(), prefix.to_owned());
    tokio::spawn(async move {
        let mut sent = Vec::new();
        for round in 0..rounds {
            sent.extend(put_plain(&client, &stream, &format!("{prefix}{round}"), per_round).await);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        sent
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_on_eight_shards_never_process_a_shard_at_the_same_time() {
    let (bed, stream, table) = bed_and_stream(8).await;
    let log = Log::default();
    let stop = Arc::new(AtomicBool::new(false));
    let load = load_until(bed.kinesis.client(), &stream, "x", 40, stop.clone());
    let workers: Vec<Scheduler> = ["w1", "w2", "w3"]
        .iter()
        .map(|w| start_worker(&bed, config(&stream, &table, w), &log, Duration::from_millis(2)))
        .collect();
    let refs: Vec<&Scheduler> = workers.iter().collect();
    let settled = eventually(Duration::from_secs(60), || {
        let h = holdings(&refs);
        h.iter().sum::<usize>() == 8 && h.iter().all(|n| (2..=3).contains(n))
    })
    .await;
    assert!(settled, "workers settle at 2-3 leases each: {:?}", holdings(&refs));
    let settled_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, Ordering::Relaxed);
    let sent = load.await.unwrap();
    all_received(&log, &sent, Duration::from_secs(60)).await;
    let h = holdings(&refs);
    assert!(h.iter().sum::<usize>() == 8 && h.iter().all(|n| (2..=3).contains(n)), "still settled: {h:?}");
    log.assert_exclusive();
    let calls = log.calls();
    assert!(calls.len() > 100, "a steady load means many calls: {}", calls.len());
    let per_worker: Vec<usize> = ["w1", "w2", "w3"]
        .iter()
        .map(|w| {
            let shards: std::collections::BTreeSet<&str> =
                calls.iter().filter(|c| c.worker == *w && c.start >= settled_at).map(|c| c.shard.as_str()).collect();
            shards.len()
        })
        .collect();
    assert!(
        per_worker.iter().all(|n| (2..=3).contains(n)),
        "once settled, each worker processes 2-3 shards: {per_worker:?}"
    );
    for w in workers {
        w.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_workers_shards_move_and_resume_after_its_last_checkpoint() {
    let (bed, stream, table) = bed_and_stream(4).await;
    let log = Log::default();
    let a = start_worker(&bed, config(&stream, &table, "a"), &log, Duration::from_millis(2));
    let b = start_worker(&bed, config(&stream, &table, "b"), &log, Duration::from_millis(2));
    assert!(
        eventually(Duration::from_secs(60), || holdings(&[&a, &b]) == [2, 2]).await,
        "settled: {:?}",
        holdings(&[&a, &b])
    );
    let load = steady_load(&bed, &stream, "d", 60, 40);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let dead_shards = a.held_leases();
    a.abort();
    let died = Instant::now();
    assert!(
        eventually(Duration::from_secs(60), || b.held_leases().len() == 4).await,
        "b took the dead worker's leases"
    );
    let moved = died.elapsed();
    // Within the failover time and one take interval (2 x failover), and a second of slack for
    // a loaded machine.
    let bound = FAILOVER + FAILOVER * 2 + Duration::from_secs(1);
    assert!(moved <= bound, "moved after {moved:?}, bound {bound:?}");
    let sent = load.await.unwrap();
    all_received(&log, &sent, Duration::from_secs(60)).await;

    // b resumed each of a's shards right after a's last checkpoint: nothing at or before it again.
    let calls = log.calls();
    for shard in &dead_shards {
        let Some((seq, sub)) = last_checkpoint(&log, "a", shard) else { continue };
        let after_death =
            calls.iter().filter(|c| c.worker == "b" && &c.shard == shard && c.start >= died).flat_map(|c| &c.records);
        for (s, u, _) in after_death {
            assert!(
                cmp_sequence_numbers(s, &seq).then(u.cmp(&sub)).is_gt(),
                "{shard}: b redelivered {s}/{u}, at or before a's last checkpoint {seq}/{sub}"
            );
        }
    }
    log.assert_exclusive();
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joining_worker_gets_its_share() {
    let (bed, stream, table) = bed_and_stream(6).await;
    let log = Log::default();
    let a = start_worker(&bed, config(&stream, &table, "a"), &log, Duration::from_millis(2));
    assert!(eventually(Duration::from_secs(60), || a.held_leases().len() == 6).await);
    let load = steady_load(&bed, &stream, "j", 80, 30);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let b = start_worker(&bed, config(&stream, &table, "b"), &log, Duration::from_millis(2));
    let joined = Instant::now();
    let balanced = eventually(Duration::from_secs(60), || {
        let h = holdings(&[&a, &b]);
        h.iter().sum::<usize>() == 6 && h.iter().max().unwrap() - h.iter().min().unwrap() <= 1
    })
    .await;
    assert!(balanced, "within one of each other: {:?}", holdings(&[&a, &b]));
    eprintln!("balanced {:?} after the join", joined.elapsed());
    let sent = load.await.unwrap();
    all_received(&log, &sent, Duration::from_secs(60)).await;
    log.assert_exclusive();
    assert!(!log.lost.lock().unwrap().is_empty(), "a lost the stolen leases and was told");
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_shutdown_hands_leases_over_at_once_with_no_duplicates() {
    let (bed, stream, table) = bed_and_stream(4).await;
    let log = Log::default();
    let a = start_worker(&bed, config(&stream, &table, "a"), &log, Duration::from_millis(2));
    let b = start_worker(&bed, config(&stream, &table, "b"), &log, Duration::from_millis(2));
    assert!(eventually(Duration::from_secs(60), || holdings(&[&a, &b]) == [2, 2]).await);
    let load = steady_load(&bed, &stream, "g", 60, 40);
    tokio::time::sleep(Duration::from_secs(2)).await;
    a.shutdown().await.unwrap();
    let stopped = Instant::now();
    let leases = LeaseTable::new(bed.dynamodb.client(), table.clone()).list().await.unwrap();
    assert!(leases.iter().all(|l| l.owner.as_deref() != Some("a")), "a released every lease: {leases:?}");
    assert!(eventually(Duration::from_secs(30), || b.held_leases().len() == 4).await);
    let took = stopped.elapsed();
    assert!(took <= FAILOVER * 2 + Duration::from_secs(1), "taken at the next take round, not after expiry: {took:?}");
    let sent = load.await.unwrap();
    all_received(&log, &sent, Duration::from_secs(60)).await;
    let duplicates: Vec<(String, usize)> = log.received().into_iter().filter(|(_, n)| *n > 1).collect();
    assert!(duplicates.is_empty(), "{} records processed twice, e.g. {:?}", duplicates.len(), duplicates.first());
    log.assert_exclusive();
    b.shutdown().await.unwrap();
}
