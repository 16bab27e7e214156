//! Enhanced fan-out on the emulators: a fan-out application beside a polling one, a worker death
//! while subscribed, a split during fan-out consumption, and subscriptions that end every second.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use kinesis_consumer::{FanOutConfig, Retrieval, SchedulerConfig, cmp_sequence_numbers};
use kinesis_testkit::{DynamoDb, Kinesis, KinesisLocal, KinesisOptions, unique_name};
use tokio::time::Instant;

/// A client with the `client()` accessor of the emulator handles.
struct Client(aws_sdk_kinesis::Client);

impl Client {
    fn client(&self) -> aws_sdk_kinesis::Client {
        self.0.clone()
    }
}

fn fan_out(stream: &str, table: &str, worker: &str, consumer: &str) -> SchedulerConfig {
    let mut config = config(stream, table, worker);
    let mut fan_out = FanOutConfig::new(consumer);
    fan_out.end_check_after = Duration::from_secs(2);
    config.retrieval = Retrieval::FanOut(fan_out);
    config
}

async fn polling_and_fan_out_side_by_side(kinesis: aws_sdk_kinesis::Client, dynamodb: &DynamoDb, stream: &str) {
    let (polled, fanned) = (Log::default(), Log::default());
    let poller = start_worker_on(
        kinesis.clone(),
        dynamodb.client(),
        config(stream, &unique_name("polling-app"), "poller"),
        &polled,
        Duration::ZERO,
    );
    let subscriber = start_worker_on(
        kinesis.clone(),
        dynamodb.client(),
        fan_out(stream, &unique_name("efo-app"), "subscriber", "efo-app"),
        &fanned,
        Duration::ZERO,
    );
    let mut sent = put_plain(&kinesis, stream, "before", 300).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    sent.extend(put_plain(&kinesis, stream, "during", 300).await);
    all_received(&polled, &sent, Duration::from_secs(60)).await;
    all_received(&fanned, &sent, Duration::from_secs(60)).await;
    let metrics = subscriber.metrics();
    assert!(metrics.subscriptions >= 2, "one subscription a shard at least: {metrics:?}");
    assert_eq!(poller.metrics().subscriptions, 0);
    assert_eq!(fanned.received().values().filter(|n| **n > 1).count(), 0, "no duplicates by fan-out");
    poller.shutdown().await.unwrap();
    subscriber.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fan_out_application_and_a_polling_one_both_get_every_record() {
    let kinesis = Kinesis::start().await.expect("start Kinesis (embedded ferrokinesis)");
    let dynamodb = DynamoDb::start().await.expect("start DynamoDB (embedded dynoxide)");
    let stream = kinesis.create_stream(2).await.unwrap();
    polling_and_fan_out_side_by_side(kinesis.client(), &dynamodb, &stream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fan_out_application_and_a_polling_one_both_get_every_record_on_kinesis_local() {
    let local =
        KinesisLocal::start().await.expect("kinesis-local must be available for this test (scripts/kinesis-local)");
    let dynamodb = DynamoDb::start().await.expect("start DynamoDB (embedded dynoxide)");
    let stream = local.create_stream(2).await.unwrap();
    polling_and_fan_out_side_by_side(local.client(), &dynamodb, &stream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscribed_worker_dies_and_the_new_owner_resumes_from_the_checkpoint() {
    let kinesis = Kinesis::start().await.expect("start Kinesis (embedded ferrokinesis)");
    let dynamodb = DynamoDb::start().await.expect("start DynamoDB (embedded dynoxide)");
    let stream = kinesis.create_stream(2).await.unwrap();
    worker_dies_while_subscribed(kinesis.client(), &dynamodb, &stream).await;
}

/// kinesis-local allows one subscription per consumer and shard: the new owner's first
/// subscriptions may be refused until the server sees the dead one's connection closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscribed_worker_dies_and_the_new_owner_resumes_from_the_checkpoint_on_kinesis_local() {
    let local =
        KinesisLocal::start().await.expect("kinesis-local must be available for this test (scripts/kinesis-local)");
    let dynamodb = DynamoDb::start().await.expect("start DynamoDB (embedded dynoxide)");
    let stream = local.create_stream(2).await.unwrap();
    worker_dies_while_subscribed(local.client(), &dynamodb, &stream).await;
}

async fn worker_dies_while_subscribed(client: aws_sdk_kinesis::Client, dynamodb: &DynamoDb, stream: &str) {
    let kinesis = Client(client);
    let stream = stream.to_owned();
    let table = unique_name("efo-leases");
    let log = Log::default();
    let a = start_worker_on(
        kinesis.client(),
        dynamodb.client(),
        fan_out(&stream, &table, "a", "efo"),
        &log,
        Duration::ZERO,
    );
    assert!(eventually(Duration::from_secs(30), || a.held_leases().len() == 2).await);
    let stop = Arc::new(AtomicBool::new(false));
    let load = load_until(kinesis.client(), &stream, "d", 20, stop.clone());
    assert!(eventually(Duration::from_secs(30), || a.metrics().records_processed >= 200).await);
    a.abort();
    let died = Instant::now();
    let b = start_worker_on(
        kinesis.client(),
        dynamodb.client(),
        fan_out(&stream, &table, "b", "efo"),
        &log,
        Duration::ZERO,
    );
    assert!(eventually(Duration::from_secs(60), || b.held_leases().len() == 2).await, "b took a's leases");
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let sent = load.await.unwrap();
    all_received(&log, &sent, Duration::from_secs(60)).await;
    // b resumed right after a's last checkpoint on each shard.
    let calls = log.calls();
    for shard in ["shardId-000000000000", "shardId-000000000001"] {
        let Some((seq, sub)) = last_checkpoint(&log, "a", shard) else { continue };
        for (s, u, _) in
            calls.iter().filter(|c| c.worker == "b" && c.shard == shard && c.start >= died).flat_map(|c| &c.records)
        {
            assert!(
                cmp_sequence_numbers(s, &seq).then(u.cmp(&sub)).is_gt(),
                "{shard}: {s}/{u} at or before {seq}/{sub}"
            );
        }
    }
    assert!(b.metrics().subscriptions >= 2);
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_during_fan_out_finishes_the_parent_before_the_children() {
    let kinesis = Kinesis::start().await.expect("start Kinesis (embedded ferrokinesis)");
    let dynamodb = DynamoDb::start().await.expect("start DynamoDB (embedded dynoxide)");
    let stream = kinesis.create_stream(1).await.unwrap();
    split_during_fan_out(kinesis.client(), &dynamodb, &stream).await;
}

/// kinesis-local never sends ChildShards nor ends a subscription at the shard's end: the fetcher's
/// end check (one GetRecords after a quiet spell) finds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_during_fan_out_finishes_the_parent_before_the_children_on_kinesis_local() {
    let local =
        KinesisLocal::start().await.expect("kinesis-local must be available for this test (scripts/kinesis-local)");
    let dynamodb = DynamoDb::start().await.expect("start DynamoDB (embedded dynoxide)");
    let stream = local.create_stream(1).await.unwrap();
    split_during_fan_out(local.client(), &dynamodb, &stream).await;
}

async fn split_during_fan_out(client: aws_sdk_kinesis::Client, dynamodb: &DynamoDb, stream: &str) {
    let stream = stream.to_owned();
    let log = Log::default();
    let worker = start_worker_on(
        client.clone(),
        dynamodb.client(),
        fan_out(&stream, &unique_name("efo"), "w", "efo"),
        &log,
        Duration::ZERO,
    );
    let mut sent = put_plain(&client, &stream, "parent", 500).await;
    assert!(eventually(Duration::from_secs(30), || log.received().len() >= 100).await);
    // The split well after the last record (on ferrokinesis, a position before the closing time
    // gets one more iterator before the shard's end shows).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let parent = split_first_shard(&client, &stream).await;
    sent.extend(put_plain(&client, &stream, "children", 500).await);
    all_received(&log, &sent, Duration::from_secs(60)).await;
    let calls = log.calls();
    let parent_end = log.ended.lock().unwrap().iter().find(|(_, s, _)| *s == parent.shard_id).map(|(_, _, t)| *t);
    let parent_end = parent_end.expect("the parent reached SHARD_END");
    let mut children = 0;
    for call in calls.iter().filter(|c| c.shard != parent.shard_id) {
        assert!(call.start >= parent_end, "a child call started before the parent ended");
        children += 1;
    }
    assert!(children > 0);
    assert_eq!(log.received().values().filter(|n| **n > 1).count(), 0, "no duplicates");
    worker.shutdown().await.unwrap();
}

/// The server ends every subscription after a second: a feature of the embedded ferrokinesis
/// (`Kinesis::start_with` fails, saying so, when `AWS_ENDPOINT_URL_KINESIS` names another
/// server). The same case on any server, with subscriptions the worker ends itself, is the
/// kinesis-local test below.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_that_end_every_second_leave_no_gap_and_no_duplicate() {
    let options = KinesisOptions { subscription_lifetime: Duration::from_secs(1), ..Default::default() };
    let kinesis = Kinesis::start_with(options).await.expect("the embedded ferrokinesis, which ends subscriptions");
    let dynamodb = DynamoDb::start().await.expect("start DynamoDB (embedded dynoxide)");
    let stream = kinesis.create_stream(2).await.unwrap();
    let config = fan_out(&stream, &unique_name("efo"), "w", "efo");
    resubscribing(kinesis.client(), &dynamodb, &stream, config).await;
}

/// kinesis-local's sessions last 5 minutes: the worker ends its own every second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_that_end_every_second_leave_no_gap_and_no_duplicate_on_kinesis_local() {
    let local =
        KinesisLocal::start().await.expect("kinesis-local must be available for this test (scripts/kinesis-local)");
    let dynamodb = DynamoDb::start().await.expect("start DynamoDB (embedded dynoxide)");
    let stream = local.create_stream(2).await.unwrap();
    let mut config = fan_out(&stream, &unique_name("efo"), "w", "efo");
    if let Retrieval::FanOut(f) = &mut config.retrieval {
        f.subscription_lifetime = Some(Duration::from_secs(1));
    }
    resubscribing(local.client(), &dynamodb, &stream, config).await;
}

/// The same on whatever Kinesis the test bed gives (the embedded one, or `AWS_ENDPOINT_URL_KINESIS`):
/// the worker ends its own subscriptions every second, which works on every server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_the_worker_ends_every_second_leave_no_gap_and_no_duplicate() {
    let kinesis = Kinesis::start().await.expect("start Kinesis");
    let dynamodb = DynamoDb::start().await.expect("start DynamoDB");
    let stream = kinesis.create_stream(2).await.unwrap();
    let mut config = fan_out(&stream, &unique_name("efo"), "w", "efo");
    if let Retrieval::FanOut(f) = &mut config.retrieval {
        f.subscription_lifetime = Some(Duration::from_secs(1));
    }
    resubscribing(kinesis.client(), &dynamodb, &stream, config).await;
}

async fn resubscribing(client: aws_sdk_kinesis::Client, dynamodb: &DynamoDb, stream: &str, config: SchedulerConfig) {
    let kinesis = Client(client);
    let stream = stream.to_owned();
    let log = Log::default();
    let worker = start_worker_on(kinesis.client(), dynamodb.client(), config, &log, Duration::ZERO);
    let stop = Arc::new(AtomicBool::new(false));
    let load = load_until(kinesis.client(), &stream, "r", 20, stop.clone());
    tokio::time::sleep(Duration::from_secs(6)).await;
    stop.store(true, Ordering::Relaxed);
    let sent = load.await.unwrap();
    all_received(&log, &sent, Duration::from_secs(60)).await;
    let metrics = worker.metrics();
    assert!(metrics.resubscriptions >= 6, "subscriptions end every second: {metrics:?}");
    let twice: BTreeMap<String, usize> = log.received().into_iter().filter(|(_, n)| *n > 1).collect();
    assert!(twice.is_empty(), "read twice across a resubscription: {twice:?}");
    worker.shutdown().await.unwrap();
}
