//! The lease table against a real DynamoDB server (embedded dynoxide, or
//! `AWS_ENDPOINT_URL_DYNAMODB`): the KCL 2.x schema, and conditional writes that two workers race.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use aws_sdk_dynamodb::types::AttributeValue;
use common::{KCL_ATTRIBUTES, type_of};
use kinesis_consumer::test_util::Outcome;
use kinesis_consumer::{Checkpoint, Lease, LeaseTable, Position};
use kinesis_testkit::DynamoDb;

/// A new lease table (a unique name: the endpoint may be shared through the environment).
async fn table() -> (DynamoDb, LeaseTable) {
    static TABLES: AtomicUsize = AtomicUsize::new(0);
    let dynamodb = DynamoDb::start().await.expect("start DynamoDB");
    let name = format!("leases-{}-{}", std::process::id(), TABLES.fetch_add(1, Ordering::Relaxed));
    let table = LeaseTable::new(dynamodb.client(), name);
    table.create_if_missing(Duration::from_secs(30)).await.expect("create the lease table");
    (dynamodb, table)
}

fn done(outcome: Outcome) -> Lease {
    match outcome {
        Outcome::Done(lease) => *lease,
        Outcome::Lost => panic!("the lease was lost"),
    }
}

#[tokio::test]
async fn two_workers_race_and_every_write_is_fenced_on_the_counter() {
    let (_dynamodb, table) = table().await;
    // Creating the table again is a no-op.
    table.create_if_missing(Duration::from_secs(30)).await.expect("idempotent");
    assert!(table.list().await.unwrap().is_empty());

    let lease = Lease::new("shardId-000000000001", Position::TrimHorizon);
    assert!(table.create(&lease).await.unwrap());
    assert!(!table.create(&lease).await.unwrap(), "a lease is created once");

    // Both workers saw counter 0; only one take succeeds.
    let a = done(table.take(&lease, "worker-a").await.unwrap());
    assert_eq!((a.owner.as_deref(), a.counter, a.owner_switches_since_checkpoint), (Some("worker-a"), 1, 1));
    assert_eq!(table.take(&lease, "worker-b").await.unwrap(), Outcome::Lost, "b's view is stale");

    // a renews and checkpoints; each bumps the counter.
    let a = done(table.renew(&a, None).await.unwrap());
    assert_eq!(a.counter, 2);
    let position = Checkpoint {
        position: Position::Sequence("49590338271490256608559692538361571095921575989136588898".into()),
        sub_sequence: 3,
    };
    let a = done(table.checkpoint(&a, &position).await.unwrap());
    assert_eq!((a.counter, &a.checkpoint, a.owner_switches_since_checkpoint), (3, &position, 0));

    // b watches the counter, then takes the lease (as after a's death, or a steal).
    let seen_by_b = table.get(&lease.key).await.unwrap().expect("the lease");
    let b = done(table.take(&seen_by_b, "worker-b").await.unwrap());
    assert_eq!((b.owner.as_deref(), b.counter), (Some("worker-b"), 4));

    // a no longer holds it: its renew and checkpoint are refused, and b's progress stays.
    assert_eq!(table.renew(&a, None).await.unwrap(), Outcome::Lost);
    let later = Checkpoint {
        position: Position::Sequence("49590338271490256608559692538361571095921575989136599999".into()),
        sub_sequence: 0,
    };
    assert_eq!(table.checkpoint(&a, &later).await.unwrap(), Outcome::Lost, "a lost lease is never written");
    assert_eq!(table.get(&lease.key).await.unwrap().unwrap(), b);
    // Fencing on the owner: even with the current counter, another worker cannot checkpoint or renew.
    let forged = Lease { owner: Some("worker-a".into()), ..b.clone() };
    assert_eq!(table.checkpoint(&forged, &later).await.unwrap(), Outcome::Lost);
    assert_eq!(table.renew(&forged, None).await.unwrap(), Outcome::Lost);

    // b releases: the lease is free at once, and can be taken by its new counter.
    let free = done(table.release(&b).await.unwrap());
    assert_eq!((free.owner.as_deref(), free.counter), (None, 5));
    assert_eq!(table.release(&b).await.unwrap(), Outcome::Lost, "released once");
    let a = done(table.take(&free, "worker-a").await.unwrap());
    assert_eq!(
        (a.checkpoint, a.owner_switches_since_checkpoint),
        (position, 2),
        "the checkpoint survives two owner switches"
    );
}

#[tokio::test]
async fn rows_have_the_kcl_names_and_types_and_kcl_rows_are_read() {
    let (dynamodb, table) = table().await;
    let mut lease = Lease::new("shardId-000000000004", Position::ShardEnd);
    lease.parent_shard_ids = vec!["shardId-000000000001".into(), "shardId-000000000002".into()];
    lease.child_shard_ids = vec!["shardId-000000000007".into()];
    lease.hash_range = Some(kinesis_aggregation::HashKeyRange::new(10, 20).unwrap());
    lease.pending_checkpoint = Some(Checkpoint::at(Position::Sequence("123".into())));
    assert!(table.create(&lease).await.unwrap());
    let lease = done(table.take(&lease, "worker-a").await.unwrap());
    let _ = done(table.renew(&lease, None).await.unwrap());

    // A row written by the Java KCL (2.x), and a newer KCL row that is not a lease.
    let client = dynamodb.client();
    let kcl_row: HashMap<String, AttributeValue> = [
        ("leaseKey", AttributeValue::S("shardId-000000000009".into())),
        ("leaseOwner", AttributeValue::S("java-worker-1".into())),
        ("leaseCounter", AttributeValue::N("17".into())),
        ("checkpoint", AttributeValue::S("49590338271490256608559692538361571095921575989136588898".into())),
        ("checkpointSubSequenceNumber", AttributeValue::N("0".into())),
        ("ownerSwitchesSinceCheckpoint", AttributeValue::N("0".into())),
        ("parentShardId", AttributeValue::Ss(vec!["shardId-000000000003".into()])),
        ("startingHashKey", AttributeValue::S("0".into())),
        ("endingHashKey", AttributeValue::S("340282366920938463463374607431768211455".into())),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let other_row: HashMap<String, AttributeValue> = [
        ("leaseKey", AttributeValue::S("worker-metrics:java-worker-1".into())),
        ("entityType", AttributeValue::S("WORKER_METRICS_STATS".into())),
        ("lastUpdateTime", AttributeValue::N("1700000000".into())),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    for row in [kcl_row, other_row] {
        client.put_item().table_name(table.name()).set_item(Some(row)).send().await.expect("PutItem");
    }

    let mut leases = table.list().await.unwrap();
    leases.sort_by(|a, b| a.key.cmp(&b.key));
    let keys: Vec<&str> = leases.iter().map(|l| l.key.as_str()).collect();
    assert_eq!(keys, ["shardId-000000000004", "shardId-000000000009"], "the non-LEASE row is skipped");
    let java = &leases[1];
    assert_eq!((java.owner.as_deref(), java.counter), (Some("java-worker-1"), 17));
    assert_eq!(java.parent_shard_ids, ["shardId-000000000003"]);
    assert_eq!(java.hash_range, Some(kinesis_aggregation::HashKeyRange::ALL));

    // Our row, as stored: only KCL attribute names, each with the KCL type.
    let item = client
        .get_item()
        .table_name(table.name())
        .key("leaseKey", AttributeValue::S("shardId-000000000004".into()))
        .consistent_read(true)
        .send()
        .await
        .expect("GetItem")
        .item
        .expect("the row");
    for (name, value) in &item {
        let expected =
            KCL_ATTRIBUTES.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("{name} is not a KCL attribute"));
        assert_eq!(type_of(value), expected.1, "{name}");
    }
    for name in [
        "leaseKey",
        "leaseOwner",
        "leaseCounter",
        "checkpoint",
        "checkpointSubSequenceNumber",
        "ownerSwitchesSinceCheckpoint",
        "parentShardId",
        "childShardIds",
        "startingHashKey",
        "endingHashKey",
        "pendingCheckpoint",
    ] {
        assert!(item.contains_key(name), "{name} is written");
    }
}

#[tokio::test]
async fn a_missing_table_is_a_typed_not_found() {
    let dynamodb = DynamoDb::start().await.expect("start DynamoDB");
    let table = LeaseTable::new(dynamodb.client_without_retries(), "no-such-lease-table");
    let error = table.list().await.unwrap_err();
    assert_eq!(error.kind, kinesis_consumer::ErrorKind::NotFound, "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_racing_at_once_for_the_same_expired_leases_make_exactly_one_owner_each() {
    let (_dynamodb, table) = table().await;
    // 12 leases, each held by a worker that died (its counter no longer moves).
    let mut expired = Vec::new();
    for i in 0..12 {
        let lease = Lease::new(format!("shardId-{i:012}"), Position::TrimHorizon);
        assert!(table.create(&lease).await.unwrap());
        expired.push(done(table.take(&lease, "dead-worker").await.unwrap()));
    }
    // 6 workers saw the same counters and all take every lease at the same moment.
    let mut attempts = Vec::new();
    for w in 0..6 {
        for lease in &expired {
            let (table, lease, worker) = (table.clone(), lease.clone(), format!("worker-{w}"));
            attempts.push(tokio::spawn(async move {
                let outcome = table.take(&lease, &worker).await;
                (worker, lease.key.clone(), outcome)
            }));
        }
    }
    let mut winners: HashMap<String, Vec<String>> = HashMap::new();
    for attempt in attempts {
        let (worker, key, outcome) = attempt.await.unwrap();
        match outcome.expect("the take call itself succeeds") {
            Outcome::Done(lease) => {
                assert_eq!(lease.owner.as_deref(), Some(worker.as_str()));
                winners.entry(key).or_default().push(worker);
            }
            Outcome::Lost => {}
        }
    }
    for lease in &expired {
        let won = winners.get(&lease.key).cloned().unwrap_or_default();
        assert_eq!(won.len(), 1, "{}: exactly one winner, not {won:?}", lease.key);
        let stored = table.get(&lease.key).await.unwrap().unwrap();
        assert_eq!(stored.owner.as_deref(), Some(won[0].as_str()), "the table names the winner");
        assert_eq!(stored.counter, lease.counter + 1, "one take, one counter step");
    }
}

/// A write applied whose answer was lost (the proxy resets the connection after DynamoDB
/// answered) is not a lost lease: the next write finds the row still names this owner and this
/// instance, and goes on. A second instance under the same worker id that takes the lease is not
/// mistaken for this one. A row at SHARD_END is never moved back.
#[tokio::test]
async fn a_lost_answer_is_not_a_lost_lease_but_another_instance_of_the_same_worker_is() {
    use kinesis_testkit::{Fault, FaultProxy, Rule};
    let dynamodb = DynamoDb::start().await.expect("start DynamoDB");
    let proxy = FaultProxy::start(dynamodb.endpoint_url()).await.unwrap();
    let client = DynamoDb::connect(proxy.url()).client_without_retries();
    let table = LeaseTable::new(client, format!("leases-lost-{}", std::process::id()));
    table.create_if_missing(Duration::from_secs(30)).await.unwrap();
    let lease = Lease::new("shardId-000000000000", Position::TrimHorizon);
    assert!(table.create(&lease).await.unwrap());
    let held = done(table.take(&lease, "w").await.unwrap());
    assert_eq!(held.owner_instance.as_deref(), Some(table.instance()));

    // A renewal applied, its answer lost.
    let rule = proxy.add(Rule::new(Fault::DropResponse).on("UpdateItem").times(1));
    assert!(table.renew(&held, None).await.is_err(), "the answer was lost");
    assert_eq!(rule.fired(), 1);
    let row = table.get(&lease.key).await.unwrap().unwrap();
    assert_eq!(row.counter, held.counter + 1, "but the renewal was applied");
    // The next write, with the counter this instance last knew, goes on.
    let renewed = done(table.renew(&held, None).await.unwrap());
    assert_eq!(renewed.counter, held.counter + 2);

    // A checkpoint applied, its answer lost; writing it again succeeds.
    let at = Checkpoint { position: Position::Sequence("123".into()), sub_sequence: 0 };
    proxy.add(Rule::new(Fault::DropResponse).on("UpdateItem").times(1));
    assert!(table.checkpoint(&renewed, &at).await.is_err());
    let checkpointed = done(table.checkpoint(&renewed, &at).await.unwrap());
    assert_eq!(checkpointed.checkpoint, at);

    // SHARD_END, then a checkpoint that would move it back: refused.
    let ended = done(table.checkpoint(&checkpointed, &Checkpoint::at(Position::ShardEnd)).await.unwrap());
    assert_eq!(table.checkpoint(&ended, &at).await.unwrap(), Outcome::Lost);
    assert_eq!(table.get(&lease.key).await.unwrap().unwrap().checkpoint.position, Position::ShardEnd);

    // The same worker id, another instance (a restart while the old process still runs).
    let lease = Lease::new("shardId-000000000001", Position::TrimHorizon);
    assert!(table.create(&lease).await.unwrap());
    let old = done(table.take(&lease, "w").await.unwrap());
    let other = table.for_new_instance();
    let seen = other.get(&lease.key).await.unwrap().unwrap();
    done(other.take(&seen, "w").await.unwrap());
    assert_eq!(table.renew(&old, None).await.unwrap(), Outcome::Lost, "the old instance must stop");

    // A take applied, its answer lost: the taker holds it.
    let lease = Lease::new("shardId-000000000002", Position::TrimHorizon);
    assert!(table.create(&lease).await.unwrap());
    proxy.add(Rule::new(Fault::DropResponse).on("UpdateItem").times(1));
    assert!(table.take(&lease, "w").await.is_err());
    let taken = done(table.take(&lease, "w").await.unwrap());
    assert_eq!((taken.owner.as_deref(), taken.counter), (Some("w"), 1));
}
