//! Lease coordinators of several workers over one lease table on a real DynamoDB server, with a
//! short failover time: they share the leases out, take a dead worker's, make room for a new one,
//! and hand leases over at once on a graceful shutdown.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use super::{CoordinatorConfig, LeaseCoordinator};
use crate::leases::lease::{Lease, Position};
use crate::leases::table::LeaseTable;
use kinesis_testkit::DynamoDb;
use tokio::time::Instant;

const FAILOVER: Duration = Duration::from_millis(600);

async fn table_with_leases(dynamodb: &DynamoDb, count: usize) -> LeaseTable {
    static TABLES: AtomicUsize = AtomicUsize::new(0);
    let name = format!("coordinator-{}-{}", std::process::id(), TABLES.fetch_add(1, Ordering::Relaxed));
    let table = LeaseTable::new(dynamodb.client(), name);
    table.create_if_missing(Duration::from_secs(30)).await.expect("create the lease table");
    for i in 0..count {
        assert!(table.create(&Lease::new(format!("shardId-{i:012}"), Position::TrimHorizon)).await.unwrap());
    }
    table
}

fn worker(table: &LeaseTable, id: &str) -> LeaseCoordinator {
    LeaseCoordinator::new(table.clone(), CoordinatorConfig::new(id).with_failover(FAILOVER))
}

/// Runs renew rounds every failover/3 and take rounds every 2 x failover (the KCL's cadence) for
/// the live workers until `done` holds of them, or for at most `limit`. Returns how long it took.
async fn run_until(
    workers: &mut [&mut LeaseCoordinator],
    limit: Duration,
    done: impl Fn(&[&mut LeaseCoordinator]) -> bool,
) -> Duration {
    let started = Instant::now();
    let mut next_take = started;
    while started.elapsed() < limit && !done(workers) {
        let now = Instant::now();
        for w in workers.iter_mut() {
            w.renew_round().await.expect("renew round");
        }
        if now >= next_take {
            for w in workers.iter_mut() {
                w.take_round(now).await.expect("take round");
            }
            next_take = now + FAILOVER * 2;
        }
        tokio::time::sleep(FAILOVER / 3).await;
    }
    started.elapsed()
}

/// Generous: the rounds are real time, and CI machines are slow.
const LIMIT: Duration = Duration::from_secs(30);

/// Who holds what, as the table says.
async fn owners(table: &LeaseTable) -> BTreeMap<String, usize> {
    let mut count = BTreeMap::new();
    for lease in table.list().await.unwrap() {
        *count.entry(lease.owner.unwrap_or_default()).or_default() += 1;
    }
    count
}

fn held(w: &LeaseCoordinator) -> Vec<String> {
    w.held_keys()
}

#[tokio::test]
async fn workers_share_out_take_from_the_dead_and_make_room_for_the_new() {
    let dynamodb = DynamoDb::start().await.expect("start DynamoDB");
    let table = table_with_leases(&dynamodb, 8).await;
    let (mut a, mut b, mut c) = (worker(&table, "a"), worker(&table, "b"), worker(&table, "c"));

    // Three workers settle at 3, 3, 2 (the target is ceil(8 / 3) = 3), each lease held once.
    let settled = |ws: &[&mut LeaseCoordinator]| {
        let mut counts: Vec<usize> = ws.iter().map(|w| held(w).len()).collect();
        counts.sort_unstable();
        counts == [2, 3, 3]
    };
    run_until(&mut [&mut a, &mut b, &mut c], LIMIT, settled).await;
    let mut counts: Vec<usize> = [&a, &b, &c].iter().map(|w| held(w).len()).collect();
    counts.sort_unstable();
    assert_eq!(counts, [2, 3, 3], "{:?}", owners(&table).await);
    let mut all: Vec<String> = [&a, &b, &c].iter().flat_map(|w| held(w)).collect();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 8, "every lease held, none twice");

    // c dies without releasing: its leases move once their counters have stood still for the
    // failover time, as watched over take rounds (2 x failover apart).
    let dead = held(&c);
    drop(c);
    let moved = |ws: &[&mut LeaseCoordinator]| {
        let survivors: Vec<String> = ws.iter().flat_map(|w| held(w)).collect();
        dead.iter().all(|k| survivors.contains(k))
    };
    let took = run_until(&mut [&mut a, &mut b], LIMIT, moved).await;
    assert!(moved(&[&mut a, &mut b]), "the dead worker's leases {dead:?} moved");
    assert_eq!((held(&a).len(), held(&b).len()), (4, 4));
    // Two observations a take round apart, then the take: at most about three take rounds.
    assert!(took <= FAILOVER * 2 * 3 + Duration::from_secs(2), "moved after {took:?}");

    // d joins: stealing one a round, everyone ends within one of each other.
    let mut d = worker(&table, "d");
    let balanced = |ws: &[&mut LeaseCoordinator]| {
        let counts: Vec<usize> = ws.iter().map(|w| held(w).len()).collect();
        counts.iter().max().unwrap() - counts.iter().min().unwrap() <= 1
    };
    run_until(&mut [&mut a, &mut b, &mut d], LIMIT, balanced).await;
    let counts: Vec<usize> = [&a, &b, &d].iter().map(|w| held(w).len()).collect();
    let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
    assert!(max - min <= 1, "within one of each other: {counts:?}");
    assert_eq!(counts.iter().sum::<usize>(), 8);

    // A graceful shutdown releases d's leases; the others take them at their next round.
    let released = held(&d);
    d.release_all().await.unwrap();
    let free = table.list().await.unwrap().into_iter().filter(|l| l.owner.is_none()).count();
    assert_eq!(free, released.len(), "released at once, not left to expire");
    let now = Instant::now();
    a.take_round(now).await.unwrap();
    b.take_round(now).await.unwrap();
    assert_eq!(held(&a).len() + held(&b).len(), 8, "taken at once: {:?}", owners(&table).await);
}

#[tokio::test]
async fn a_restarted_worker_takes_back_the_leases_the_table_says_it_holds() {
    let dynamodb = DynamoDb::start().await.expect("start DynamoDB");
    let table = table_with_leases(&dynamodb, 2).await;
    let before = worker(&table, "w");
    before.take_round(Instant::now()).await.unwrap();
    assert_eq!(held(&before).len(), 2);
    // The same worker id, restarted: nothing in memory.
    let after = worker(&table, "w");
    let gained = after.take_round(Instant::now()).await.unwrap();
    assert_eq!(gained.len(), 2, "taken back at once, not left to expire");
    assert_eq!(before.renew_round().await.unwrap().len(), 2, "the old instance lost them");
}
