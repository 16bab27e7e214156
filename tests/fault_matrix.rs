//! The fault matrix: a producer and a 2-worker consumer group under a steady load, with faults
//! injected between them and the emulators (`kinesis_testkit::FaultProxy`) or by the emulators
//! themselves. Each case counts what was sent, acknowledged, received, stored twice and
//! re-delivered, and asserts the promise:
//!
//! - nothing acknowledged is lost (every acknowledged record is processed), and
//! - a position is processed again only if it is after the last checkpoint written before that
//!   re-delivery (duplicates only from after the last checkpoint).
//!
//! Each case prints one row of the table in RELIABILITY.md (`-- --nocapture`): case | faults
//! injected | throttling errors seen | sent | acknowledged | failed | received | stored twice |
//! re-delivered | lost | catch-up. The sizes fit CI;
//! `FAULT_MATRIX_RECORDS=20000` (per case) runs larger loads.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt as _;
use futures_util::stream::FuturesUnordered;
use kinesis::consumer::{
    Batch, Checkpointer, InitialPosition, Processor, Scheduler, SchedulerConfig, cmp_sequence_numbers,
};
use kinesis::producer::{Producer, ProducerConfig, UserRecord};
use kinesis_testkit::{
    DynamoDb, Fault, FaultProxy, Kinesis, KinesisOptions, Rule, TestBed, create_stream, unique_name,
};
use tokio::time::Instant;

/// One processing of one record.
#[derive(Debug, Clone)]
struct Delivery {
    shard: String,
    seq: Arc<str>,
    sub: u64,
    data: String,
    batch_started: Instant,
}

#[derive(Debug, Default)]
struct Events {
    deliveries: Vec<Delivery>,
    /// (shard, sequence, sub-sequence, when the write returned) of each checkpoint written.
    checkpoints: Vec<(String, Arc<str>, u64, Instant)>,
}

struct Recorder {
    events: Arc<Mutex<Events>>,
}

impl Processor for Recorder {
    async fn process_records(&mut self, batch: Batch, checkpointer: &mut Checkpointer) {
        let started = Instant::now();
        {
            let mut events = self.events.lock().unwrap();
            for record in &batch.records {
                events.deliveries.push(Delivery {
                    shard: batch.shard_id.to_string(),
                    seq: record.sequence_number.clone(),
                    sub: record.sub_sequence_number,
                    data: String::from_utf8_lossy(&record.data).into_owned(),
                    batch_started: started,
                });
            }
        }
        let Some(last) = batch.records.last() else { return };
        if checkpointer.checkpoint().await.is_ok() {
            self.events.lock().unwrap().checkpoints.push((
                batch.shard_id.to_string(),
                last.sequence_number.clone(),
                last.sub_sequence_number,
                Instant::now(),
            ));
        }
    }

    async fn shard_ended(&mut self, checkpointer: &mut Checkpointer) {
        let _ = checkpointer.checkpoint().await;
    }

    async fn shutdown_requested(&mut self, checkpointer: &mut Checkpointer) {
        let _ = checkpointer.checkpoint().await;
    }
}

/// What a case measured.
#[derive(Debug)]
struct Outcome {
    sent: usize,
    acked: usize,
    failed: usize,
    /// Distinct acknowledged records processed.
    received: usize,
    /// Records stored at two or more positions (a write applied whose answer was lost, resent).
    stored_twice: usize,
    /// Deliveries of a position beyond its first (a lease moved before its checkpoint).
    redelivered: usize,
    lost: usize,
    /// From the last acknowledgement to the last record processed.
    catch_up: Duration,
    /// Faults injected (rules fired, requests black-holed) and throttling errors seen by the
    /// producer and the workers.
    injected: u64,
    throttled: u64,
}

/// Sets up the faults of a case as the load starts; returns the rules, each of which must fire.
type Inject = Box<dyn FnOnce(&Proxies) -> Vec<Arc<Rule>> + Send>;

struct Proxies {
    kinesis: FaultProxy,
    dynamodb: FaultProxy,
}

struct Case {
    name: &'static str,
    shards: u32,
    /// The emulator's per-shard write limits.
    throttle: bool,
    /// Aggregate (the KPL default) or send every record plain.
    aggregation: bool,
    /// Records per second the load puts.
    rate: usize,
    inject: Inject,
    /// Restart both emulators during the load (a third of the way: Kinesis; two thirds:
    /// DynamoDB), on their state kept on disk.
    restart: bool,
}

fn records_per_case() -> usize {
    std::env::var("FAULT_MATRIX_RECORDS").ok().and_then(|v| v.parse().ok()).unwrap_or(3000)
}

async fn run(case: Case) -> Outcome {
    // With restarts, the emulators keep their state on disk, and are always the embedded ones.
    let state = std::env::temp_dir().join(unique_name("fault-state"));
    let options = KinesisOptions {
        enforce_limits: case.throttle,
        state_dir: case.restart.then(|| state.join("kinesis")),
        ..Default::default()
    };
    let (mut kinesis_server, mut dynamodb_server) = if case.restart {
        std::fs::create_dir_all(&state).unwrap();
        (
            Kinesis::embedded(options.clone()).await.expect("start ferrokinesis (durable)"),
            DynamoDb::embedded_at(&state.join("leases.sqlite")).await.expect("start dynoxide (on a file)"),
        )
    } else {
        let bed =
            TestBed::start_with(options.clone()).await.expect("start the embedded emulators (ferrokinesis, dynoxide)");
        (bed.kinesis, bed.dynamodb)
    };
    let stream = create_stream(&kinesis_server.client(), case.shards).await.expect("create the stream");
    let proxies = Proxies {
        kinesis: FaultProxy::start(kinesis_server.endpoint_url()).await.expect("proxy in front of Kinesis"),
        dynamodb: FaultProxy::start(dynamodb_server.endpoint_url()).await.expect("proxy in front of DynamoDB"),
    };
    let kinesis = Kinesis::connect(proxies.kinesis.url()).client();
    let dynamodb = DynamoDb::connect(proxies.dynamodb.url()).client();

    let events = Arc::new(Mutex::new(Events::default()));
    let table = unique_name("faults");
    let workers: Vec<Scheduler> = (0..2)
        .map(|i| {
            let mut config = SchedulerConfig::new(&stream, &table);
            config.worker_id = format!("w{i}");
            config.initial_position = InitialPosition::TrimHorizon;
            config.failover = Duration::from_millis(1500);
            config.shard_sync_interval = Duration::from_secs(1);
            config.polling.idle_time_between_reads = Duration::from_millis(100);
            config.table_create_timeout = Duration::from_secs(30);
            // The matrix's faults are timed to the KCL 2.x start (both workers read within a
            // second); its figures in RELIABILITY.md were measured in that mode.
            config.lease_management = kinesis::consumer::LeaseManagement::Kcl2Compatible;
            let events = events.clone();
            Scheduler::start(kinesis.clone(), dynamodb.clone(), config, move |_: &str| Recorder {
                events: events.clone(),
            })
            .expect("a valid consumer config")
        })
        .collect();

    let config = ProducerConfig { aggregation: case.aggregation, ..Default::default() };
    let producer = Producer::builder(kinesis.clone(), stream.clone()).config(config).build().expect("producer");
    let rules = (case.inject)(&proxies);

    // The load: `records` records at `rate`/s, receipts awaited as they resolve.
    let total = records_per_case();
    let mut receipts = FuturesUnordered::new();
    let mut acked_data = Vec::with_capacity(total);
    let mut failed = 0;
    let started = Instant::now();
    let mut restarts = 0;
    for i in 0..total {
        let due = started + Duration::from_secs_f64(i as f64 / case.rate as f64);
        tokio::time::sleep_until(due).await;
        if case.restart && i == total / 3 {
            // Kinesis goes away for half a second and comes back on another port, on its state.
            kinesis_server.stop().await;
            tokio::time::sleep(Duration::from_millis(500)).await;
            kinesis_server = Kinesis::embedded(options.clone()).await.expect("restart ferrokinesis");
            proxies.kinesis.set_upstream(kinesis_server.endpoint_url()).unwrap();
            restarts += 1;
        }
        if case.restart && i == 2 * total / 3 {
            dynamodb_server.stop().await;
            tokio::time::sleep(Duration::from_millis(500)).await;
            dynamodb_server = DynamoDb::embedded_at(&state.join("leases.sqlite")).await.expect("restart dynoxide");
            proxies.dynamodb.set_upstream(dynamodb_server.endpoint_url()).unwrap();
            restarts += 1;
        }
        let data = format!("{}-{i}", case.name);
        let key = format!("key-{}", fastrand::u64(..));
        let receipt = producer.put(UserRecord::new(key, data.clone().into_bytes())).await.expect("put");
        receipts.push(async move { (data, receipt.await) });
        while let Some(Some((data, result))) = futures_util::FutureExt::now_or_never(receipts.next()) {
            match result {
                Ok(_) => acked_data.push(data),
                Err(_) => failed += 1,
            }
        }
    }
    while let Some((data, result)) = receipts.next().await {
        match result {
            Ok(_) => acked_data.push(data),
            Err(_) => failed += 1,
        }
    }
    let acked_at = Instant::now();
    proxies.kinesis.clear();
    proxies.dynamodb.clear();

    // Wait until every acknowledged record was processed (or 60 s pass).
    let mut last_new = Instant::now();
    loop {
        let seen: std::collections::HashSet<String> =
            events.lock().unwrap().deliveries.iter().map(|d| d.data.clone()).collect();
        let missing = acked_data.iter().filter(|d| !seen.contains(*d)).count();
        if missing == 0 {
            last_new = events.lock().unwrap().deliveries.iter().map(|d| d.batch_started).max().unwrap_or(last_new);
            break;
        }
        if acked_at.elapsed() > Duration::from_secs(60) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let read_throttles: u64 = workers.iter().map(|w| w.metrics().read_throttles).sum();
    for worker in workers {
        worker.shutdown().await.expect("graceful shutdown");
    }
    producer.shutdown().await;
    let write_throttles =
        producer.metrics().errors_by_code.get("ProvisionedThroughputExceededException").copied().unwrap_or(0);

    // The workers are shut down: nothing writes the events any more.
    let events = std::mem::take(&mut *events.lock().unwrap());
    let mut outcome = tally(&events, total, &acked_data, failed, last_new.saturating_duration_since(acked_at));
    if outcome.lost > 0 {
        explain_losses(&kinesis_server.client(), &stream, &events, &acked_data).await;
    }
    for rule in &rules {
        assert!(rule.fired() > 0, "{}: a rule never fired: {rule:?}", case.name);
    }
    outcome.injected = rules.iter().map(|r| r.fired()).sum::<u64>()
        + proxies.kinesis.black_holed()
        + proxies.dynamodb.black_holed()
        + restarts;
    drop((kinesis_server, dynamodb_server));
    let _ = std::fs::remove_dir_all(&state);
    outcome.throttled = write_throttles + read_throttles;
    println!(
        "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.1} s |",
        case.name,
        outcome.injected,
        outcome.throttled,
        outcome.sent,
        outcome.acked,
        outcome.failed,
        outcome.received,
        outcome.stored_twice,
        outcome.redelivered,
        outcome.lost,
        outcome.catch_up.as_secs_f64()
    );
    outcome
}

/// Counts the events and checks that every re-delivery is after the last checkpoint written
/// before it.
fn tally(events: &Events, sent: usize, acked: &[String], failed: usize, catch_up: Duration) -> Outcome {
    let mut by_position: BTreeMap<(String, Arc<str>, u64), Vec<&Delivery>> = BTreeMap::new();
    let mut positions_of: HashMap<&str, std::collections::BTreeSet<(&str, &str, u64)>> = HashMap::new();
    for d in &events.deliveries {
        by_position.entry((d.shard.clone(), d.seq.clone(), d.sub)).or_default().push(d);
        positions_of.entry(&d.data).or_default().insert((&d.shard, &d.seq, d.sub));
    }
    let mut redelivered = 0;
    for ((shard, seq, sub), deliveries) in &by_position {
        let mut deliveries = deliveries.clone();
        deliveries.sort_by_key(|d| d.batch_started);
        for again in &deliveries[1..] {
            redelivered += 1;
            // The furthest checkpoint of the shard written before this batch started.
            let checkpoint = events
                .checkpoints
                .iter()
                .filter(|(s, _, _, at)| s == shard && *at < again.batch_started)
                .max_by(|a, b| cmp_sequence_numbers(&a.1, &b.1).then(a.2.cmp(&b.2)));
            if let Some((_, cseq, csub, _)) = checkpoint {
                let after = cmp_sequence_numbers(seq, cseq).then(sub.cmp(csub)).is_gt();
                assert!(
                    after,
                    "{shard} {seq}/{sub} was processed again although the checkpoint {cseq}/{csub} was written before"
                );
            }
        }
    }
    let lost: Vec<&String> = acked.iter().filter(|d| !positions_of.contains_key(d.as_str())).collect();
    Outcome {
        sent,
        acked: acked.len(),
        failed,
        received: acked.len() - lost.len(),
        stored_twice: positions_of.values().filter(|p| p.len() > 1).count(),
        redelivered,
        lost: lost.len(),
        catch_up,
        injected: 0,
        throttled: 0,
    }
}

/// Prints, for each acknowledged record never processed, where the stream holds it and what
/// the workers delivered and checkpointed around it on its shard.
async fn explain_losses(direct: &aws_sdk_kinesis::Client, stream: &str, events: &Events, acked: &[String]) {
    let delivered: std::collections::HashSet<&str> = events.deliveries.iter().map(|d| d.data.as_str()).collect();
    let stored = kinesis_testkit::read_stream(direct, stream).await.unwrap_or_default();
    for data in acked.iter().filter(|d| !delivered.contains(d.as_str())) {
        for record in stored.iter().filter(|r| r.data == data.as_bytes()) {
            eprintln!("LOST {data}: stored in {} at {}", record.shard_id, record.sequence_number);
            let shard = record.shard_id.as_str();
            let mut near: Vec<&Delivery> = events.deliveries.iter().filter(|d| d.shard == shard).collect();
            near.sort_by(|a, b| cmp_sequence_numbers(&a.seq, &b.seq));
            let at = near.partition_point(|d| cmp_sequence_numbers(&d.seq, &record.sequence_number).is_lt());
            for d in &near[at.saturating_sub(3)..(at + 3).min(near.len())] {
                eprintln!("  delivered {} {} ({}) batch at {:?}", d.seq, d.sub, d.data, d.batch_started);
            }
            for (s, seq, sub, when) in events.checkpoints.iter().filter(|c| c.0 == shard) {
                if cmp_sequence_numbers(seq, &near.get(at.saturating_sub(3)).map_or("0".into(), |d| d.seq.clone()))
                    .is_ge()
                    && near.get(at + 3).is_none_or(|d| cmp_sequence_numbers(seq, &d.seq).is_le())
                {
                    eprintln!("  checkpoint {s} {seq}/{sub} written at {when:?}");
                }
            }
        }
    }
}

fn assert_promise(outcome: &Outcome) {
    assert_eq!(outcome.failed, 0, "every record delivered within its time to live: {outcome:?}");
    assert_eq!(outcome.acked, outcome.sent, "{outcome:?}");
    assert_eq!(outcome.lost, 0, "nothing acknowledged is lost: {outcome:?}");
}

fn no_fault() -> Inject {
    Box::new(|_| Vec::new())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttled_writes_from_the_emulators_per_shard_limits() {
    // Plain records at twice a shard's 1,000 records/s.
    let outcome = run(Case {
        name: "throttled writes",
        shards: 1,
        throttle: true,
        aggregation: false,
        rate: 2000,
        inject: no_fault(),
        restart: false,
    })
    .await;
    assert_promise(&outcome);
    assert!(outcome.throttled > 0, "the emulator throttled the writes: {outcome:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_put_records_failures() {
    let outcome = run(Case {
        name: "partial PutRecords failures",
        shards: 2,
        throttle: false,
        aggregation: false,
        rate: 1000,
        inject: Box::new(|p| {
            vec![p.kinesis.add(Rule::new(Fault::PartialFailure { every: 3 }).on("PutRecords").every(2))]
        }),
        restart: false,
    })
    .await;
    assert_promise(&outcome);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_resets_on_kinesis_and_dynamodb() {
    let outcome = run(Case {
        name: "connection resets (Kinesis and DynamoDB, 1 request in 7)",
        shards: 2,
        throttle: false,
        aggregation: true,
        rate: 1000,
        inject: Box::new(|p| {
            vec![p.kinesis.add(Rule::new(Fault::Reset).every(7)), p.dynamodb.add(Rule::new(Fault::Reset).every(7))]
        }),
        restart: false,
    })
    .await;
    assert_promise(&outcome);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_lost_after_the_write_was_applied() {
    let outcome = run(Case {
        name: "responses lost after the write (PutRecords 1 in 4, UpdateItem 1 in 9)",
        shards: 2,
        throttle: false,
        aggregation: false,
        rate: 1000,
        inject: Box::new(|p| {
            vec![
                p.kinesis.add(Rule::new(Fault::DropResponse).on("PutRecords").every(4)),
                p.dynamodb.add(Rule::new(Fault::DropResponse).on("UpdateItem").every(9)),
            ]
        }),
        restart: false,
    })
    .await;
    assert_promise(&outcome);
    // The resent records are stored twice: duplicates, documented, never a loss.
    assert!(outcome.stored_twice > 0, "a lost answer makes the producer resend: {outcome:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_500_and_503() {
    let outcome = run(Case {
        name: "HTTP 500 / 503 (Kinesis 1 in 5, DynamoDB 1 in 6)",
        shards: 2,
        throttle: false,
        aggregation: true,
        rate: 1000,
        inject: Box::new(|p| {
            vec![
                p.kinesis.add(Rule::new(Fault::internal_error()).every(10)),
                p.kinesis.add(Rule::new(Fault::service_unavailable()).every(9)),
                p.dynamodb.add(Rule::new(Fault::internal_error()).every(6)),
            ]
        }),
        restart: false,
    })
    .await;
    assert_promise(&outcome);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_records_throttling() {
    let outcome = run(Case {
        name: "GetRecords throttled (the first 40 calls and retries)",
        shards: 2,
        throttle: false,
        aggregation: true,
        rate: 1000,
        inject: Box::new(|p| vec![p.kinesis.add(Rule::new(Fault::kinesis_throttling()).on("GetRecords").times(40))]),
        restart: false,
    })
    .await;
    assert_promise(&outcome);
    // The SDK retries a throttled call (3 attempts); the fetcher sees what outlasts them.
    assert!(outcome.throttled > 0, "the workers saw the throttling: {outcome:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_table_writes_failing_in_the_middle_of_checkpoints() {
    let outcome = run(Case {
        name: "lease-table writes failing (UpdateItem throttled 1 in 3)",
        shards: 2,
        throttle: false,
        aggregation: true,
        rate: 1000,
        inject: Box::new(|p| vec![p.dynamodb.add(Rule::new(Fault::dynamodb_throttling()).on("UpdateItem").every(3))]),
        restart: false,
    })
    .await;
    assert_promise(&outcome);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn black_holes_of_kinesis_then_dynamodb() {
    let outcome = run(Case {
        name: "black holes: Kinesis 3 s, then DynamoDB 3 s",
        shards: 2,
        throttle: false,
        aggregation: true,
        rate: 1000,
        inject: Box::new(|p| {
            p.kinesis.black_hole_after(Duration::from_millis(500), Duration::from_secs(3));
            p.dynamodb.black_hole_after(Duration::from_millis(4000), Duration::from_secs(3));
            Vec::new()
        }),
        restart: false,
    })
    .await;
    assert_promise(&outcome);
    assert!(outcome.injected > 0, "requests fell into the black holes: {outcome:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_answers() {
    let outcome = run(Case {
        name: "slow answers (300 ms, 1 request in 3)",
        shards: 2,
        throttle: false,
        aggregation: true,
        rate: 1000,
        inject: Box::new(|p| {
            vec![
                p.kinesis.add(Rule::new(Fault::Delay(Duration::from_millis(300))).every(3)),
                p.dynamodb.add(Rule::new(Fault::Delay(Duration::from_millis(300))).every(3)),
            ]
        }),
        restart: false,
    })
    .await;
    assert_promise(&outcome);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emulator_restarts_with_their_state_on_disk() {
    let outcome = run(Case {
        name: "emulator restarts (Kinesis, then DynamoDB; state on disk, 0.5 s down, a new port)",
        shards: 2,
        throttle: false,
        aggregation: true,
        rate: 1000,
        inject: no_fault(),
        restart: true,
    })
    .await;
    assert_promise(&outcome);
    assert_eq!(outcome.injected, 2, "both emulators restarted: {outcome:?}");
}
