//! This crate against the real Java KPL 1.0.7 and KCL 3.5.1 (`interop/java`, run as child
//! processes), on the embedded emulators (ferrokinesis, with a TLS front for the KPL, and
//! dynoxide). Each test answers one question a team moving between Java and Rust asks:
//!
//! 1. Does our consumer read what the KPL writes? `kpl_records_are_read_by_our_consumer`
//! 2. Does the KCL read what our producer writes, across a split?
//!    `kcl_reads_what_our_producer_writes_across_a_split`
//! 3. Can an application move between them on one lease table, both ways, resuming exactly after
//!    the other's checkpoint (sequence and sub-sequence)? `kcl_3x_table_is_taken_over_by_our_workers`,
//!    `our_table_is_taken_over_by_the_kcl`
//! 4. Can both run on one table at once? `mixed_fleet_with_the_kcl_in_2x_mode`,
//!    `mixed_fleet_with_the_kcl_in_3x_mode`
//! 5. Does that hold for a multi-stream application (one table, many streams, the KCL's
//!    `account:stream:creationEpoch:shardId` leases)? `multi_stream_table_moves_both_ways`
//!
//! Without Java 17 and Maven these tests fail, saying how to install them.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kinesis::consumer::{Batch, Checkpointer, InitialPosition, Processor, Scheduler, SchedulerConfig};
use kinesis_testkit::{JavaInterop, JavaProcess, TestBed, TlsFront, unique_name};
use serde_json::Value;
use sha2::Digest as _;
use tokio::time::Instant;

/// One test at a time: each runs JVMs (the KCL, the KPL and its daemon) beside our workers, and
/// two at once on a 2-core machine starve lease renewals into steals the test did not cause.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn java() -> &'static JavaInterop {
    JavaInterop::get().unwrap_or_else(|e| panic!("{e}"))
}

fn sha256_hex(data: &[u8]) -> String {
    sha2::Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

/// One user record as a processor of ours saw it.
#[derive(Clone, Debug)]
struct Seen {
    #[allow(dead_code)] // shown in failure messages
    worker: String,
    shard: String,
    sequence: String,
    sub_sequence: u64,
    aggregated: bool,
    partition_key: String,
    explicit_hash_key: Option<String>,
    data: Vec<u8>,
}

impl Seen {
    fn of(worker: &str, shard: &str, r: &kinesis::consumer::Record) -> Seen {
        Seen {
            worker: worker.to_owned(),
            shard: shard.to_owned(),
            sequence: r.sequence_number.to_string(),
            sub_sequence: r.sub_sequence_number,
            aggregated: r.aggregated,
            partition_key: r.partition_key.clone(),
            explicit_hash_key: r.explicit_hash_key.clone(),
            data: r.data.to_vec(),
        }
    }
}

/// What the processors of our workers saw, shared between them.
#[derive(Clone, Default)]
struct SeenLog {
    records: Arc<Mutex<Vec<Seen>>>,
}

/// Keeps every record it is given in the log; checkpoints every batch.
struct Collect {
    worker: String,
    log: SeenLog,
}

impl Processor for Collect {
    async fn process_records(&mut self, batch: Batch, checkpointer: &mut Checkpointer) {
        {
            let mut records = self.log.records.lock().unwrap();
            for r in &batch.records {
                records.push(Seen::of(&self.worker, &batch.shard_id, r));
            }
        }
        let _ = checkpointer.checkpoint().await;
    }

    async fn shard_ended(&mut self, checkpointer: &mut Checkpointer) {
        let _ = checkpointer.checkpoint().await;
    }

    async fn shutdown_requested(&mut self, checkpointer: &mut Checkpointer) {
        let _ = checkpointer.checkpoint().await;
    }
}

/// Short timings, from the oldest record.
fn our_config(stream: &str, app: &str, worker: &str) -> SchedulerConfig {
    let mut config = SchedulerConfig::new(stream, app);
    config.worker_id = worker.to_owned();
    config.initial_position = InitialPosition::TrimHorizon;
    config.failover = Duration::from_secs(2);
    config.shard_sync_interval = Duration::from_secs(1);
    config.parent_poll_interval = Duration::from_millis(200);
    config.polling.idle_time_between_reads = Duration::from_millis(100);
    config.polling.min_time_between_reads = Duration::from_millis(50);
    // The KCL workers here run off AWS, so they report no CPU and their leader balances them by
    // throughput; a worker that reports CPU would be balanced on another scale, apart from them.
    config.cpu_source = kinesis::consumer::CpuSource::Off;
    config
}

fn start_ours(bed: &TestBed, config: SchedulerConfig, log: &SeenLog) -> Scheduler {
    let (worker, log) = (config.worker_id.clone(), log.clone());
    Scheduler::start(bed.kinesis.client(), bed.dynamodb.client(), config, move |_shard: &str| Collect {
        worker: worker.clone(),
        log: log.clone(),
    })
    .expect("a valid config")
}

async fn until(limit: Duration, what: &str, done: impl FnMut() -> bool) {
    until_or(limit, what, done, String::new).await;
}

/// As `until`, with `why()` in the failure message.
async fn until_or(limit: Duration, what: &str, mut done: impl FnMut() -> bool, why: impl Fn() -> String) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "timed out after {limit:?} waiting for {what}: {}", why());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Records per shard and the other events of a KCL reader, and its log's end: why it is stuck.
fn kcl_state(kcl: &JavaProcess) -> String {
    let mut per_shard: BTreeMap<String, usize> = BTreeMap::new();
    let mut events = Vec::new();
    for line in kcl.lines() {
        if line["event"] == "record" {
            *per_shard.entry(text(&line, "shard")).or_default() += 1;
        } else if line["event"] != "checkpointed" {
            events.push(line.to_string());
        }
    }
    format!(
        "the KCL ({}) read per shard {per_shard:?}; its events: {events:#?}; its log ({}) ends:\n{}",
        kcl.pid(),
        kcl.log_path().display(),
        kcl.log_tail(40)
    )
}

/// Waits for a Java process to exit by itself, off the runtime's threads.
async fn wait_java(mut process: JavaProcess, limit: Duration) -> (JavaProcess, std::process::ExitStatus) {
    tokio::task::spawn_blocking(move || {
        let status = process.wait_for(limit).unwrap_or_else(|e| panic!("{e}"));
        (process, status)
    })
    .await
    .unwrap()
}

/// A string field of a JSON line.
fn text(v: &Value, field: &str) -> String {
    v[field].as_str().unwrap_or_else(|| panic!("no {field} in {v}")).to_owned()
}

/// Question 1: 50,000 records written by the KPL (aggregated, keys from 2,000, a quarter of them
/// multi-byte, every tenth record with an explicit hash key) over 8 shards arrive at our consumer
/// once each, on the shard and at the sequence and sub-sequence numbers the KPL reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kpl_records_are_read_by_our_consumer() {
    let _serial = SERIAL.lock().await;
    const RECORDS: usize = 50_000;
    let java = java();
    let bed = TestBed::start().await.expect("start the emulators");
    let stream = bed.kinesis.create_stream(8).await.unwrap();
    let front = TlsFront::start(bed.kinesis.endpoint_url()).await.expect("a TLS front for the KPL");

    let keys: Vec<String> = (0..2_000)
        .map(|k| match k % 4 {
            0 => format!("ключ-{k}"),
            1 => format!("鍵-{k}-ü"),
            _ => format!("key-{k:05}"),
        })
        .collect();
    // (partition key, explicit hash key, data) by index
    let mut sent: Vec<(String, Option<String>, Vec<u8>)> = Vec::with_capacity(RECORDS);
    let mut input = String::new();
    for i in 0..RECORDS {
        let key = keys[(i * 7_919) % keys.len()].clone();
        let ehk = (i % 10 == 0).then(|| ((u128::MAX / RECORDS as u128) * i as u128).to_string());
        let data = format!("kpl-{i:06}-{}", "x".repeat(89)).into_bytes();
        let line = serde_json::json!({
            "partition_key": key,
            "explicit_hash_key": ehk,
            "data": base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &data),
        });
        input.push_str(&line.to_string());
        input.push('\n');
        sent.push((key, ehk, data));
    }
    let mut env = bed.child_env();
    env.push(("KPL_KINESIS_ENDPOINT", front.host_port()));
    let kpl = java.spawn("KplWriter", &["--stream", &stream], &env, Some(input.into_bytes())).expect("start the KPL");
    let (kpl, status) = wait_java(kpl, Duration::from_secs(240)).await;
    assert!(status.success(), "the KPL writer failed ({status}); its log ends:\n{}", kpl.log_tail(30));
    let results = kpl.events("result");
    assert_eq!(results.len(), RECORDS, "one result per record");
    let aggregated = results.iter().filter(|r| r["aggregate_size"].as_u64() > Some(1)).count();
    assert!(aggregated > RECORDS / 2, "the KPL aggregated only {aggregated} of {RECORDS} records");

    // Our consumer and the Java KCL read the stream side by side, each on its own lease table.
    let kcl = java
        .spawn(
            "KclReader",
            &["--stream", &stream, "--app", &unique_name("kcl-reader"), "--worker", "kcl-1"],
            &bed.child_env(),
            None,
        )
        .expect("start the KCL");
    let log = SeenLog::default();
    let worker = start_ours(&bed, our_config(&stream, &unique_name("kpl-reader"), "rust-1"), &log);
    until(Duration::from_secs(180), "every KPL record at our consumer and at the KCL", || {
        log.records.lock().unwrap().len() >= RECORDS && kcl.count("record") >= RECORDS
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await; // anything delivered twice shows up too
    worker.shutdown().await.expect("clean shutdown");
    let kcl_records = kcl.events("record");
    drop(kcl);

    let seen = log.records.lock().unwrap().clone();
    assert_eq!(seen.len(), RECORDS, "our consumer: each record exactly once");
    assert_eq!(kcl_records.len(), RECORDS, "the KCL: each record exactly once");
    let by_data: HashMap<&[u8], &Seen> = seen.iter().map(|s| (s.data.as_slice(), s)).collect();
    assert_eq!(by_data.len(), RECORDS, "no record twice");
    let by_hash: HashMap<String, &Value> = kcl_records.iter().map(|r| (text(r, "data_sha256"), r)).collect();
    // (shard, sequence) -> sub-sequence numbers seen, to check each aggregate is 0..size.
    let mut aggregates: HashMap<(String, String), Vec<u64>> = HashMap::new();
    for (i, (key, ehk, data)) in sent.iter().enumerate() {
        let s = by_data.get(data.as_slice()).unwrap_or_else(|| panic!("record {i} was not read"));
        let r = &results[i];
        assert_eq!(r["ok"], true, "{r}");
        assert_eq!(&s.partition_key, key, "record {i}");
        assert_eq!(s.shard, text(r, "shard"), "record {i}: the shard the KPL reported");
        assert_eq!(s.sequence, text(r, "sequence"), "record {i}: the sequence number the KPL reported");
        let size = r["aggregate_size"].as_u64().unwrap();
        assert_eq!(s.aggregated, size > 1, "record {i}: in an aggregate iff the KPL put others with it ({s:?}, {r})");
        if s.aggregated {
            // Kinesis keeps no explicit hash key on a record; only an aggregate's table has them.
            assert_eq!(&s.explicit_hash_key, ehk, "record {i}");
            aggregates.entry((s.shard.clone(), s.sequence.clone())).or_default().push(s.sub_sequence);
        } else {
            assert_eq!(s.sub_sequence, 0, "record {i}");
        }
        // The KCL saw the same user record at the same place.
        let k = by_hash.get(&sha256_hex(data)).unwrap_or_else(|| panic!("record {i} was not read by the KCL"));
        assert_eq!((text(k, "shard"), text(k, "sequence")), (s.shard.clone(), s.sequence.clone()), "record {i}");
        assert_eq!(k["sub_sequence"].as_u64(), Some(s.sub_sequence), "record {i}: the KCL's sub-sequence number");
        assert_eq!(k["aggregated"], s.aggregated, "record {i}");
        assert_eq!(text(k, "partition_key"), s.partition_key, "record {i}");
    }
    for ((shard, sequence), mut subs) in aggregates {
        subs.sort_unstable();
        let size = subs.len() as u64;
        assert_eq!(subs, (0..size).collect::<Vec<_>>(), "the aggregate {shard}/{sequence}: sub-sequences 0..{size}");
    }
    let shards: BTreeMap<&str, usize> = seen.iter().fold(BTreeMap::new(), |mut m, s| {
        *m.entry(s.shard.as_str()).or_default() += 1;
        m
    });
    println!("KPL -> ours: {RECORDS} records, {aggregated} in aggregates, per shard {shards:?}");
    assert_eq!(shards.len(), 8, "every shard had records");
}

/// Question 1, large records: the KPL writes records of up to the service's 1 MiB (partition key
/// and data), too big to aggregate, among small ones, and our consumer reads each whole, once.
/// (Records over 1 MiB on a stream raised with UpdateMaxRecordSize cannot be tried here:
/// ferrokinesis 0.7 accepts UpdateMaxRecordSize but its PutRecords still refuses data over
/// 1,048,576 bytes.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kpl_records_of_1_mib_are_read_by_our_consumer() {
    let _serial = SERIAL.lock().await;
    let java = java();
    let bed = TestBed::start().await.expect("start the emulators");
    let stream = bed.kinesis.create_stream(1).await.unwrap();
    let front = TlsFront::start(bed.kinesis.endpoint_url()).await.expect("a TLS front for the KPL");
    // Partition keys are "key-<i>": 5 bytes, so the largest data is 1 MiB less 5 bytes.
    let sizes = [100, 600_000, 200, 1_048_576 - 5, 300, 1_000_000, 400];
    let mut input = String::new();
    let mut sent = Vec::new();
    for (i, size) in sizes.iter().enumerate() {
        let mut data = format!("large-{i}-").into_bytes();
        data.resize(*size, b'a' + i as u8);
        let line = serde_json::json!({
            "partition_key": format!("key-{i}"),
            "data": base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &data),
        });
        input.push_str(&line.to_string());
        input.push('\n');
        sent.push(data);
    }
    let mut env = bed.child_env();
    env.push(("KPL_KINESIS_ENDPOINT", front.host_port()));
    let kpl = java.spawn("KplWriter", &["--stream", &stream], &env, Some(input.into_bytes())).expect("start the KPL");
    let (kpl, status) = wait_java(kpl, Duration::from_secs(120)).await;
    assert!(
        status.success(),
        "the KPL writer failed ({status}): {:?}; its log ends:\n{}",
        kpl.events("result"),
        kpl.log_tail(30)
    );

    let log = SeenLog::default();
    let worker = start_ours(&bed, our_config(&stream, &unique_name("large"), "rust-1"), &log);
    until(Duration::from_secs(60), "every large record", || log.records.lock().unwrap().len() >= sizes.len()).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    worker.shutdown().await.expect("clean shutdown");
    let seen = log.records.lock().unwrap().clone();
    assert_eq!(seen.len(), sizes.len(), "each once");
    for (i, data) in sent.iter().enumerate() {
        let s = seen
            .iter()
            .find(|s| s.partition_key == format!("key-{i}"))
            .unwrap_or_else(|| panic!("record {i} was not read"));
        assert_eq!(s.data.len(), data.len(), "record {i}");
        assert!(s.data == *data, "record {i}: the same bytes");
    }
    println!("KPL -> ours, large records: sizes {sizes:?} read whole");
}

/// Puts `count` records named `{prefix}-{i:06}` (100 bytes) with keys drawn from 1,000, through
/// our producer (aggregating per predicted shard); `halfway` runs once half are delivered (the
/// producer's shard map still has the shards from before `halfway`).
/// Returns their data and receipts, by index.
async fn produce_ours<F, Fut>(
    kinesis: aws_sdk_kinesis::Client,
    stream: &str,
    prefix: &str,
    count: usize,
    halfway: F,
) -> Vec<(Vec<u8>, kinesis::producer::Receipt)>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    use kinesis::producer::{Producer, UserRecord};
    let producer = Producer::builder(kinesis, stream.to_owned()).build().expect("producer");
    let mut receipts = Vec::with_capacity(count);
    let mut sent = Vec::with_capacity(count);
    let mut halfway = Some(halfway);
    for i in 0..count {
        if i == count / 2
            && let Some(f) = halfway.take()
        {
            producer.flush().await;
            f().await;
        }
        let mut data = format!("{prefix}-{i:06}-").into_bytes();
        data.resize(100, b'.');
        let key = format!("user-{:04}", fastrand::usize(..1_000));
        receipts.push(producer.put(UserRecord::new(key, data.clone())).await.expect("put"));
        sent.push(data);
    }
    let mut delivered = Vec::with_capacity(count);
    for (receipt, data) in receipts.into_iter().zip(sent) {
        delivered.push((data, receipt.await.expect("delivered")));
    }
    producer.shutdown().await;
    delivered
}

/// Question 2: the Java KCL (3.x default mode) reads 50,000 records of our producer, aggregated
/// per predicted shard, with a shard split in the middle of production: every record once, so no
/// aggregate was dropped (the KCL drops a whole aggregate when one sub-record is outside its
/// shard's hash range).
///
/// Kinesis is kinesis-local here: the KCL needs ChildShards at a shard's end (without them it
/// retries GetRecords on the closed parent forever) and ListShards' ShardFilter, and ferrokinesis
/// 0.7 has neither. DynamoDB is the embedded dynoxide.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kcl_reads_what_our_producer_writes_across_a_split() {
    let _serial = SERIAL.lock().await;
    const RECORDS: usize = 50_000;
    let java = java();
    let local = kinesis_testkit::KinesisLocal::start().await.expect("kinesis-local must be available for this test");
    let dynamodb = kinesis_testkit::DynamoDb::start().await.expect("start DynamoDB");
    let stream = local.create_stream(4).await.unwrap();
    let env = kinesis_testkit::child_env(Some(local.endpoint_url()), Some(dynamodb.endpoint_url()));
    let kcl = java
        .spawn(
            "KclReader",
            &["--stream", &stream, "--app", &unique_name("kcl-reader"), "--worker", "kcl-1", "--failover-ms", "2000"],
            &env,
            None,
        )
        .expect("start the KCL");
    // The reader runs while the records are written, as in production.
    until_or(Duration::from_secs(90), "the KCL on all 4 shards", || kcl.count("initialized") >= 4, || kcl_state(&kcl))
        .await;
    let client = local.client();
    let split = || async {
        let parent = kinesis_testkit::list_all_shards(&client, &stream).await.unwrap().remove(0);
        let middle = parent.starting_hash_key + (parent.ending_hash_key - parent.starting_hash_key) / 2;
        client
            .split_shard()
            .stream_name(&stream)
            .shard_to_split(&parent.shard_id)
            .new_starting_hash_key((middle + 1).to_string())
            .send()
            .await
            .expect("SplitShard");
    };
    let sent = produce_ours(local.client(), &stream, "ours", RECORDS, split).await;
    let shards = kinesis_testkit::list_all_shards(&client, &stream).await.unwrap();
    assert_eq!(shards.len(), 6, "the split happened: {shards:?}");

    let hashes: HashMap<String, usize> = sent.iter().enumerate().map(|(i, (d, _))| (sha256_hex(d), i)).collect();
    until_or(
        Duration::from_secs(240),
        "every record at the KCL",
        || {
            kcl.output().with(|lines| {
                let got: std::collections::HashSet<&str> =
                    lines.iter().filter(|r| r["event"] == "record").filter_map(|r| r["data_sha256"].as_str()).collect();
                got.len() >= RECORDS
            })
        },
        || kcl_state(&kcl),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await; // copies read later show up too
    let records = kcl.events("record");
    // Where the KCL delivered each record: (shard, sequence, sub-sequence).
    let mut delivered_at: Vec<Vec<(String, String, u64)>> = vec![Vec::new(); RECORDS];
    let mut per_shard: BTreeMap<String, usize> = BTreeMap::new();
    for r in &records {
        let i = *hashes
            .get(&text(r, "data_sha256"))
            .unwrap_or_else(|| panic!("the KCL read a record we did not write: {r}"));
        delivered_at[i].push((text(r, "shard"), text(r, "sequence"), r["sub_sequence"].as_u64().unwrap()));
        *per_shard.entry(text(r, "shard")).or_default() += 1;
    }
    // An aggregate that landed on a shard it was not built for (sent with the map from before the
    // split) is sent again, member by member, as the KPL does: the KCL drops such an aggregate
    // whole once it knows the child shard's range, and delivers it whole while its shard cache
    // lacks the child ("Cannot get the shard for this ProcessTask" in its log). Only those
    // records may be seen twice.
    let resent = |i: usize| sent[i].1.attempts.iter().any(|a| a.error_code.as_deref() == Some("StaleShardMap"));
    let (mut twice, mut resent_count) = (0, 0);
    for (i, (_, receipt)) in sent.iter().enumerate() {
        let at =
            (receipt.shard_id.to_string(), receipt.sequence_number.to_string(), receipt.aggregated_index.unwrap_or(0));
        assert!(
            delivered_at[i].contains(&at),
            "record {i}: its receipt says {at:?}, the KCL delivered it at {:?}; {}",
            delivered_at[i],
            kcl_state(&kcl)
        );
        resent_count += usize::from(resent(i));
        if delivered_at[i].len() > 1 {
            twice += 1;
            assert!(resent(i), "record {i} was seen twice ({:?}) but sent once: {:?}", delivered_at[i], receipt);
            assert_eq!(delivered_at[i].len(), 2, "record {i}");
        }
    }
    println!(
        "ours -> KCL: {} records read, {} aggregated, 0 missing, {twice} twice (of {resent_count} sent again \
         after their aggregate landed on a child shard), per shard {per_shard:?}",
        records.len(),
        records.iter().filter(|r| r["aggregated"] == true).count(),
    );
    assert_eq!(per_shard.len(), 6, "records on every shard, the parent and both children among them: {per_shard:?}");
    assert!(records.iter().filter(|r| r["aggregated"] == true).count() > RECORDS / 2, "most went out aggregated");
    let shard_ends = kcl.count("shard_ended");
    assert_eq!(shard_ends, 1, "the KCL finished the split parent");
}

/// Every item of a table, as JSON-ish text per attribute, for the checks below.
async fn scan_table(
    client: &aws_sdk_dynamodb::Client,
    table: &str,
) -> Vec<HashMap<String, aws_sdk_dynamodb::types::AttributeValue>> {
    let mut items = Vec::new();
    let mut start = None;
    loop {
        let out = client
            .scan()
            .table_name(table)
            .consistent_read(true)
            .set_exclusive_start_key(start)
            .send()
            .await
            .expect("Scan");
        items.extend(out.items.unwrap_or_default());
        start = out.last_evaluated_key;
        if start.is_none() {
            return items;
        }
    }
}

fn attr_s(item: &HashMap<String, aws_sdk_dynamodb::types::AttributeValue>, name: &str) -> Option<String> {
    item.get(name).and_then(|v| v.as_s().ok().or_else(|| v.as_n().ok())).cloned()
}

/// The handover tests: the first batch, what one side processes of each shard, and what comes after.
const FIRST: usize = 2_000;
const SECOND: usize = 1_000;
const STOP_AFTER: usize = 700;

/// A 2-shard stream with the first batch of records of ours in it, and a new application name.
async fn handover_start() -> (&'static JavaInterop, TestBed, String, String, Vec<(Vec<u8>, kinesis::producer::Receipt)>)
{
    let java = java();
    let bed = TestBed::start().await.expect("start the emulators");
    let stream = bed.kinesis.create_stream(2).await.unwrap();
    let app = unique_name("handover");
    let first = produce_ours(bed.kinesis.client(), &stream, "first", FIRST, || async {}).await;
    (java, bed, stream, app, first)
}

/// Question 3, from Java to Rust, on a table the KCL 3.x made (its GSI, its `Leader`,
/// `Migration3.0` and worker-metrics rows beside the leases): the KCL processes and checkpoints
/// the first 700 records of each of 2 shards (the checkpoint inside an aggregate: sequence and
/// sub-sequence), shuts down gracefully; more records are written; two of our workers start on the
/// same table and get exactly the records after the KCL's checkpoints, each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kcl_3x_table_is_taken_over_by_our_workers() {
    let _serial = SERIAL.lock().await;
    let (java, bed, stream, app, first) = handover_start().await;

    let mut kcl = java
        .spawn(
            "KclReader",
            &[
                "--stream",
                &stream,
                "--app",
                &app,
                "--worker",
                "kcl-1",
                "--failover-ms",
                "2000",
                "--stop-after",
                &STOP_AFTER.to_string(),
            ],
            &bed.child_env(),
            None,
        )
        .expect("start the KCL");
    until_or(
        Duration::from_secs(120),
        "the KCL's first 700 records of each shard",
        || kcl.count("record") >= 2 * STOP_AFTER,
        || kcl_state(&kcl),
    )
    .await;
    let status =
        tokio::task::block_in_place(|| kcl.terminate(Duration::from_secs(60))).expect("the KCL stops on SIGTERM");
    // 143: the JVM's exit code after SIGTERM, once its shutdown hooks (the graceful shutdown) ran.
    assert_eq!(status.code(), Some(143), "the KCL exited with {status}");
    let stopped = kcl.events("stopped");
    assert_eq!(stopped.len(), 1, "{}", kcl_state(&kcl));
    assert_eq!(stopped[0]["clean"], true, "graceful shutdown: {}", kcl_state(&kcl));
    let kcl_records = kcl.events("record");
    assert_eq!(kcl_records.len(), 2 * STOP_AFTER, "the KCL processed {STOP_AFTER} records a shard");
    // The KCL's last checkpoint on each shard: its 700th record there.
    let mut last_reported: BTreeMap<String, (String, u64)> = BTreeMap::new();
    for r in &kcl_records {
        last_reported.insert(text(r, "shard"), (text(r, "sequence"), r["sub_sequence"].as_u64().unwrap()));
    }

    // The table is the KCL 3.x's: GSI, non-lease rows, and the leases at the KCL's checkpoints.
    let dynamodb = bed.dynamodb.client();
    let described = dynamodb.describe_table().table_name(&app).send().await.expect("DescribeTable");
    let gsis: Vec<String> = described
        .table()
        .and_then(|t| t.global_secondary_indexes.clone())
        .unwrap_or_default()
        .iter()
        .filter_map(|g| g.index_name.clone())
        .collect();
    assert_eq!(gsis, vec!["LeaseOwnerToLeaseKeyIndex".to_owned()], "the KCL 3.x made its GSI");
    let items = scan_table(&dynamodb, &app).await;
    let keys: Vec<(String, Option<String>)> =
        items.iter().map(|i| (attr_s(i, "leaseKey").unwrap(), attr_s(i, "entityType"))).collect();
    println!("the KCL 3.x table: {keys:?}");
    // (Its `Leader` lock row is deleted when it shuts down gracefully; the mixed-fleet tests run
    // our workers beside it.)
    for reserved in ["Migration3.0", "kcl-1"] {
        assert!(keys.iter().any(|(k, _)| k == reserved), "the KCL wrote its {reserved} row: {keys:?}");
    }
    for (shard, (sequence, sub)) in &last_reported {
        let lease = items.iter().find(|i| attr_s(i, "leaseKey").as_deref() == Some(shard)).expect("a lease per shard");
        assert_eq!(attr_s(lease, "checkpoint").as_deref(), Some(sequence.as_str()), "{shard}: the KCL's checkpoint");
        assert_eq!(attr_s(lease, "checkpointSubSequenceNumber"), Some(sub.to_string()), "{shard}");
    }
    let inside_aggregates = last_reported.values().filter(|(_, sub)| *sub > 0).count();
    assert!(inside_aggregates > 0, "a checkpoint inside an aggregate: {last_reported:?}");

    let second = produce_ours(bed.kinesis.client(), &stream, "second", SECOND, || async {}).await;
    let kcl_saw: std::collections::HashSet<String> = kcl_records.iter().map(|r| text(r, "data_sha256")).collect();
    let expected: Vec<&Vec<u8>> =
        first.iter().chain(second.iter()).map(|(d, _)| d).filter(|d| !kcl_saw.contains(&sha256_hex(d))).collect();
    assert_eq!(expected.len(), FIRST + SECOND - 2 * STOP_AFTER);

    let log = SeenLog::default();
    let workers = [
        start_ours(&bed, our_config(&stream, &app, "rust-1"), &log),
        start_ours(&bed, our_config(&stream, &app, "rust-2"), &log),
    ];
    until(Duration::from_secs(60), "our workers to read what the KCL left", || {
        log.records.lock().unwrap().len() >= expected.len()
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    for worker in workers {
        worker.shutdown().await.expect("clean shutdown");
    }
    let seen = log.records.lock().unwrap().clone();
    let before: Vec<&Seen> = seen.iter().filter(|s| kcl_saw.contains(&sha256_hex(&s.data))).collect();
    assert!(
        before.is_empty(),
        "our workers re-read {} records the KCL had checkpointed, e.g. {:?}",
        before.len(),
        before.first()
    );
    let got: HashMap<&[u8], usize> = seen.iter().fold(HashMap::new(), |mut m, s| {
        *m.entry(s.data.as_slice()).or_default() += 1;
        m
    });
    for d in &expected {
        assert_eq!(got.get(d.as_slice()), Some(&1), "{} once", String::from_utf8_lossy(d));
    }
    assert_eq!(seen.len(), expected.len(), "nothing else, nothing twice");
    let first_after: Vec<&Seen> = seen.iter().filter(|s| s.data.starts_with(b"first-")).collect();
    println!(
        "KCL 3.x -> ours: the KCL checkpointed {} records ({inside_aggregates} of 2 checkpoints inside an aggregate); ours read the {} after them ({} of the first batch)",
        kcl_records.len(),
        seen.len(),
        first_after.len()
    );
}

/// Processes the first `stop_after` records of its shard, checkpoints at the last of them (by
/// sequence and sub-sequence) and ignores the rest. The count is kept per shard across workers:
/// a lease that moves between our two workers at start-up (a 2.x steal) is read again from its
/// last checkpoint by the new holder, which logs only what no worker logged before it, and
/// checkpoints again; the old holder's checkpoint then fails with `LeaseLost`, as it must.
struct FirstOnly {
    worker: String,
    stop_after: usize,
    log: SeenLog,
}

impl Processor for FirstOnly {
    async fn process_records(&mut self, batch: Batch, checkpointer: &mut Checkpointer) {
        let mut last = None;
        {
            let mut records = self.log.records.lock().unwrap();
            for r in &batch.records {
                let seen = Seen::of(&self.worker, &batch.shard_id, r);
                let again = records.iter().any(|s| {
                    s.shard == seen.shard && s.sequence == seen.sequence && s.sub_sequence == seen.sub_sequence
                });
                if !again {
                    if records.iter().filter(|s| *s.shard == *batch.shard_id).count() >= self.stop_after {
                        break;
                    }
                    records.push(seen);
                }
                last = Some(r);
            }
        }
        if let Some(r) = last {
            match checkpointer.checkpoint_record(r).await {
                Ok(()) | Err(kinesis::consumer::CheckpointError::LeaseLost { .. }) => {}
                Err(e) => panic!("checkpoint: {e}"),
            }
        }
    }

    async fn shard_ended(&mut self, _checkpointer: &mut Checkpointer) {}
}

/// Question 3, from Rust to Java: two of our workers process and checkpoint the first 700
/// records of each of 2 shards (inside an aggregate), shut down; more records are written; the
/// KCL 3.x starts on our table (it adds its GSI and rows) and gets exactly the records after our
/// checkpoints, each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_table_is_taken_over_by_the_kcl() {
    let _serial = SERIAL.lock().await;
    let (java, bed, stream, app, first) = handover_start().await;

    let log = SeenLog::default();
    let start = |worker: &str| {
        let (worker, log) = (worker.to_owned(), log.clone());
        Scheduler::start(
            bed.kinesis.client(),
            bed.dynamodb.client(),
            our_config(&stream, &app, &worker),
            move |_: &str| FirstOnly { worker: worker.clone(), stop_after: STOP_AFTER, log: log.clone() },
        )
        .expect("a valid config")
    };
    let workers = [start("rust-1"), start("rust-2")];
    until(Duration::from_secs(60), "our first 700 records of each shard", || {
        log.records.lock().unwrap().len() >= 2 * STOP_AFTER
    })
    .await;
    // The last of them checkpointed, by whichever worker holds each lease now.
    let dynamodb = bed.dynamodb.client();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let last: BTreeMap<String, (String, u64)> = log
            .records
            .lock()
            .unwrap()
            .iter()
            .map(|s| (s.shard.clone(), (s.sequence.clone(), s.sub_sequence)))
            .collect();
        let items = scan_table(&dynamodb, &app).await;
        let at_last = last.iter().all(|(shard, (sequence, sub))| {
            items.iter().any(|i| {
                attr_s(i, "leaseKey").as_deref() == Some(shard)
                    && attr_s(i, "checkpoint").as_deref() == Some(sequence)
                    && attr_s(i, "checkpointSubSequenceNumber") == Some(sub.to_string())
            })
        });
        if at_last {
            break;
        }
        assert!(Instant::now() < deadline, "timed out waiting for our checkpoints at {last:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for worker in workers {
        worker.shutdown().await.expect("clean shutdown");
    }
    let ours = log.records.lock().unwrap().clone();
    assert_eq!(ours.len(), 2 * STOP_AFTER);
    let checkpoints: Vec<(String, String, u64)> = {
        let mut last: BTreeMap<String, (String, u64)> = BTreeMap::new();
        for s in &ours {
            last.insert(s.shard.clone(), (s.sequence.clone(), s.sub_sequence));
        }
        last.into_iter().map(|(shard, (seq, sub))| (shard, seq, sub)).collect()
    };
    assert!(checkpoints.iter().any(|(_, _, sub)| *sub > 0), "a checkpoint inside an aggregate: {checkpoints:?}");

    let second = produce_ours(bed.kinesis.client(), &stream, "second", SECOND, || async {}).await;
    let ours_saw: std::collections::HashSet<&[u8]> = ours.iter().map(|s| s.data.as_slice()).collect();
    let expected: HashMap<String, usize> = first
        .iter()
        .chain(second.iter())
        .map(|(d, _)| d)
        .filter(|d| !ours_saw.contains(d.as_slice()))
        .enumerate()
        .map(|(i, d)| (sha256_hex(d), i))
        .collect();
    assert_eq!(expected.len(), FIRST + SECOND - 2 * STOP_AFTER);

    let kcl = java
        .spawn(
            "KclReader",
            &["--stream", &stream, "--app", &app, "--worker", "kcl-1", "--failover-ms", "2000"],
            &bed.child_env(),
            None,
        )
        .expect("start the KCL");
    until_or(
        Duration::from_secs(120),
        "the KCL to read what ours left",
        || kcl.count("record") >= expected.len(),
        || kcl_state(&kcl),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let records = kcl.events("record");
    let initialized = kcl.events("initialized");
    drop(kcl);
    for (shard, sequence, sub) in &checkpoints {
        let init = initialized.iter().find(|i| text(i, "shard") == *shard).expect("the KCL took every shard");
        assert_eq!(
            (text(init, "sequence"), init["sub_sequence"].as_u64()),
            (sequence.clone(), Some(*sub)),
            "{shard}: the KCL resumed from our checkpoint"
        );
    }
    let mut counts: HashMap<String, usize> = HashMap::new();
    for r in &records {
        let hash = text(r, "data_sha256");
        assert!(expected.contains_key(&hash), "the KCL delivered a record before our checkpoint: {r}");
        *counts.entry(hash).or_default() += 1;
    }
    assert_eq!(counts.len(), expected.len(), "every record after our checkpoints");
    assert!(counts.values().all(|&n| n == 1), "each once");
    println!(
        "ours -> KCL 3.x: we checkpointed {} records at {checkpoints:?}; the KCL read the {} after them",
        ours.len(),
        records.len()
    );
}

/// What a processor of ours did, with wall-clock times in epoch milliseconds (as the KCL reader
/// prints them).
#[derive(Clone, Debug)]
struct FleetEvent {
    /// One per processor instance, so that a worker that takes a shard again is a new holder.
    holder: String,
    shard: String,
    event: &'static str,
    t_ms: u64,
    /// SHA-256 of each record's data (as the KCL reader reports it).
    hashes: Vec<String>,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

#[derive(Clone, Default)]
struct FleetLog(Arc<Mutex<Vec<FleetEvent>>>);

struct FleetProcessor {
    holder: String,
    shard: String,
    log: FleetLog,
}

impl FleetProcessor {
    fn push(&self, event: &'static str, hashes: Vec<String>) {
        self.log.0.lock().unwrap().push(FleetEvent {
            holder: self.holder.clone(),
            shard: self.shard.clone(),
            event,
            t_ms: now_ms(),
            hashes,
        });
    }
}

impl Processor for FleetProcessor {
    async fn initialize(&mut self, _init: &kinesis::consumer::Initialization) {
        self.push("initialized", Vec::new());
    }

    async fn process_records(&mut self, batch: Batch, checkpointer: &mut Checkpointer) {
        self.push("records", batch.records.iter().map(|r| sha256_hex(&r.data)).collect());
        let _ = checkpointer.checkpoint().await;
    }

    async fn lease_lost(&mut self) {
        self.push("lease_lost", Vec::new());
    }

    async fn shard_ended(&mut self, checkpointer: &mut Checkpointer) {
        let _ = checkpointer.checkpoint().await;
        self.push("shard_ended", Vec::new());
    }

    async fn shutdown_requested(&mut self, checkpointer: &mut Checkpointer) {
        let _ = checkpointer.checkpoint().await;
        self.push("shutdown_requested", Vec::new());
    }
}

/// What a mixed fleet did.
#[derive(Debug)]
struct FleetReport {
    sent: usize,
    lost: usize,
    redelivered: usize,
    ours_records: usize,
    kcl_records: usize,
    holdings: usize,
    /// How often a shard passed from one kind of worker to another ("kcl -> rust": 3), by the
    /// order in which holders started on it.
    moves: BTreeMap<String, usize>,
    /// Per shard, its holders in order.
    timeline: BTreeMap<String, Vec<String>>,
    /// Pairs of holdings of one shard by two processors whose record deliveries interleave.
    overlaps: Vec<String>,
}

impl FleetReport {
    /// One paragraph for the test output and the README.
    fn summary(&self) -> String {
        format!(
            "sent {}, lost {}, re-delivered {}, processed by ours {} / by the KCL {}, {} holdings, moves {:?}, \
             overlaps {}; holders per shard {:?}",
            self.sent,
            self.lost,
            self.redelivered,
            self.ours_records,
            self.kcl_records,
            self.holdings,
            self.moves,
            self.overlaps.len(),
            self.timeline
        )
    }
}

/// Two of our workers and two KCL workers (in `mode`) on one table, under a steady load of about
/// 200 records/s for `duration`, over 8 shards; then the producer stops and the fleet drains.
async fn mixed_fleet(mode: &str, duration: Duration) -> FleetReport {
    let java = java();
    let bed = TestBed::start().await.expect("start the emulators");
    let stream = bed.kinesis.create_stream(8).await.unwrap();
    let app = unique_name("fleet");
    let log = FleetLog::default();
    let holders = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = |worker: &str| {
        let (worker, log, holders) = (worker.to_owned(), log.clone(), holders.clone());
        Scheduler::start(
            bed.kinesis.client(),
            bed.dynamodb.client(),
            {
                let mut config = our_config(&stream, &app, &worker);
                // Beside KCL workers in 2x mode, ours must be told: they may find the table
                // before the KCL has written a lease or its `Migration3.0` row.
                if mode == "2x" {
                    config.lease_management = kinesis::consumer::LeaseManagement::Kcl2Compatible;
                }
                config
            },
            move |shard: &str| {
                let n = holders.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                FleetProcessor { holder: format!("{worker}#{n}"), shard: shard.to_owned(), log: log.clone() }
            },
        )
        .expect("a valid config")
    };
    // The KCL first: it makes the table (and in 3.x mode its GSI and rows); ours join it.
    let spawn_kcl = |worker: &str| {
        let args = ["--stream", &stream, "--app", &app, "--worker", worker, "--failover-ms", "2000", "--mode", mode];
        java.spawn("KclReader", &args, &bed.child_env(), None).expect("start the KCL")
    };
    let kcls = [spawn_kcl("kcl-1"), spawn_kcl("kcl-2")];
    until_or(
        Duration::from_secs(120),
        "the KCL workers to start on shards",
        || kcls.iter().map(|k| k.count("initialized")).sum::<usize>() >= 1,
        || kcl_state(&kcls[0]),
    )
    .await;
    let ours = [start("rust-1"), start("rust-2")];

    // Steady load.
    let producer =
        kinesis::producer::Producer::builder(bed.kinesis.client(), stream.clone()).build().expect("producer");
    let mut sent = Vec::new();
    let mut receipts = Vec::new();
    let deadline = Instant::now() + duration;
    let mut i = 0usize;
    while Instant::now() < deadline {
        for _ in 0..20 {
            let data = format!("fleet-{i:07}").into_bytes();
            let key = format!("user-{:04}", fastrand::usize(..1_000));
            receipts.push(producer.put(kinesis::producer::UserRecord::new(key, data.clone())).await.expect("put"));
            sent.push(data);
            i += 1;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for receipt in receipts {
        receipt.await.expect("delivered");
    }
    producer.shutdown().await;

    // Drain: until every record was delivered somewhere, or a limit.
    let sent_set: std::collections::HashSet<String> = sent.iter().map(|d| sha256_hex(d)).collect();
    let delivered = |log: &FleetLog, kcls: &[JavaProcess]| -> HashMap<String, usize> {
        let mut m: HashMap<String, usize> = HashMap::new();
        for e in log.0.lock().unwrap().iter() {
            for h in &e.hashes {
                *m.entry(h.clone()).or_default() += 1;
            }
        }
        for k in kcls {
            k.output().with(|lines| {
                for r in lines.iter().filter(|r| r["event"] == "record") {
                    *m.entry(text(r, "data_sha256")).or_default() += 1;
                }
            });
        }
        m
    };
    let drain_deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < drain_deadline {
        let got = delivered(&log, &kcls);
        if sent_set.iter().all(|h| got.contains_key(h)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let got = delivered(&log, &kcls);
    for worker in ours {
        let _ = worker.shutdown().await;
    }

    // Holdings: per processor instance and shard, from its first to its last event; a KCL
    // processor is (worker, shard, the n-th "initialized" of that pair).
    let mut spans: BTreeMap<(String, String), (u64, u64, Vec<u64>)> = BTreeMap::new();
    let mut add = |holder: String, shard: String, t: u64, delivery: bool| {
        let e = spans.entry((holder, shard)).or_insert((t, t, Vec::new()));
        e.0 = e.0.min(t);
        e.1 = e.1.max(t);
        if delivery {
            e.2.push(t);
        }
    };
    for e in log.0.lock().unwrap().iter() {
        add(e.holder.clone(), e.shard.clone(), e.t_ms, e.event == "records");
    }
    let mut kcl_records = 0;
    for k in &kcls {
        let mut generation: HashMap<String, usize> = HashMap::new();
        for line in k.lines() {
            let Some(event) = line["event"].as_str() else { continue };
            let Some(shard) = line["shard"].as_str() else { continue };
            let worker = text(&line, "worker");
            if event == "initialized" {
                *generation.entry(shard.to_owned()).or_default() += 1;
            }
            let g = generation.get(shard).copied().unwrap_or(0);
            kcl_records += usize::from(event == "record");
            add(format!("{worker}#{g}"), shard.to_owned(), line["t_ms"].as_u64().unwrap(), event == "record");
        }
    }
    // Two holders of one shard overlap when one delivers records while the other's span is open
    // and the other delivers records during this one's span as well: both processed the shard at
    // the same time.
    let mut overlaps = Vec::new();
    let entries: Vec<_> = spans.iter().collect();
    for (a, ((ha, sa), (fa, ta, da))) in entries.iter().enumerate() {
        for ((hb, sb), (fb, tb, db)) in entries.iter().skip(a + 1) {
            if sa != sb || ha == hb {
                continue;
            }
            let a_in_b = da.iter().any(|t| t >= fb && t <= tb);
            let b_in_a = db.iter().any(|t| t >= fa && t <= ta);
            if a_in_b && b_in_a {
                overlaps.push(format!("{sa}: {ha} [{fa}..{ta}] and {hb} [{fb}..{tb}]"));
            }
        }
    }
    // Per shard, its holders by the time they started.
    let mut timeline: BTreeMap<String, Vec<(u64, String)>> = BTreeMap::new();
    for ((holder, shard), (from, _, _)) in &spans {
        timeline.entry(shard.clone()).or_default().push((*from, holder.clone()));
    }
    let kind = |holder: &str| if holder.starts_with("kcl") { "kcl" } else { "rust" };
    let mut moves: BTreeMap<String, usize> = BTreeMap::new();
    let timeline: BTreeMap<String, Vec<String>> = timeline
        .into_iter()
        .map(|(shard, mut hs)| {
            hs.sort();
            for pair in hs.windows(2) {
                *moves.entry(format!("{} -> {}", kind(&pair[0].1), kind(&pair[1].1))).or_default() += 1;
            }
            (shard, hs.into_iter().map(|(_, h)| h).collect())
        })
        .collect();
    let ours_records: usize = log.0.lock().unwrap().iter().map(|e| e.hashes.len()).sum();
    let lost = sent_set.iter().filter(|h| !got.contains_key(*h)).count();
    let redelivered = got.values().map(|n| n - 1).sum();
    drop(kcls);
    FleetReport {
        sent: sent.len(),
        lost,
        redelivered,
        ours_records,
        kcl_records,
        holdings: spans.len(),
        moves,
        timeline,
        overlaps,
    }
}

/// Question 4: a rolling migration. Two of our workers and two KCL 3.5.1 workers in
/// CLIENT_VERSION_CONFIG_COMPATIBLE_WITH_2X mode (the 2.x lease taker and stealer) share one
/// table under a steady load for a minute: both kinds process records, no two processors
/// process one shard at the same time, and nothing is lost. Re-deliveries are reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_fleet_with_the_kcl_in_2x_mode() {
    let _serial = SERIAL.lock().await;
    let report = mixed_fleet("2x", Duration::from_secs(60)).await;
    println!("mixed fleet, KCL in 2x mode: {}", report.summary());
    assert_eq!(report.lost, 0, "{report:#?}");
    assert!(report.ours_records > 0 && report.kcl_records > 0, "both kinds of worker processed records: {report:#?}");
    assert!(report.overlaps.is_empty(), "two processors on one shard at once: {report:#?}");
}

/// Question 4, with the KCL in its 3.x default mode: one worker holds the leader lock and
/// assigns every lease (nobody takes or steals); either kind may lead (the KCL workers start
/// first, and one of them usually wins the lock; ours contend for it too). Our workers are 3.x
/// citizens: they publish WorkerMetricStats rows, find the leases the leader gives them through
/// the `LeaseOwnerToLeaseKeyIndex`, and take part in graceful handoffs both ways. Nothing is
/// lost, nothing delivered twice, no shard has two processors at once, and leases move between
/// the kinds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_fleet_with_the_kcl_in_3x_mode() {
    let _serial = SERIAL.lock().await;
    let report = mixed_fleet("3x", Duration::from_secs(60)).await;
    println!("mixed fleet, KCL in 3.x mode: {}", report.summary());
    assert_eq!(report.lost, 0, "{report:#?}");
    assert!(report.overlaps.is_empty(), "two processors on one shard at once: {report:#?}");
    let across =
        report.moves.get("kcl -> rust").copied().unwrap_or(0) + report.moves.get("rust -> kcl").copied().unwrap_or(0);
    assert!(
        report.ours_records > 0 && report.kcl_records > 0 && across > 0,
        "both kinds processed records and leases moved between them by handoff: {report:#?}"
    );
    assert_eq!(report.redelivered, 0, "planned moves are graceful handoffs: {report:#?}");
}

/// The stream identifier a multi-stream application gives `stream` (`account:name:creationEpoch`,
/// from DescribeStreamSummary), as our workers find it and as the KCL is told it.
async fn stream_identifier(kinesis: &aws_sdk_kinesis::Client, stream: &str) -> String {
    let out = kinesis.describe_stream_summary().stream_name(stream).send().await.expect("DescribeStreamSummary");
    let summary = out.stream_description_summary().expect("a summary");
    let arn = kinesis::consumer::StreamArn::parse(summary.stream_arn()).expect("a stream ARN");
    format!("{}:{}:{}", arn.account_id(), arn.stream_name(), summary.stream_creation_timestamp().secs())
}

/// Question 5, multi-stream, both ways on one table. The KCL 3.x in multi-stream mode reads the
/// first 300 records of each shard of two streams (2 and 1 shards) and stops; the table holds its
/// multi-stream leases. Two of our multi-stream workers take the table over and read exactly the
/// rest, each once, under the right stream; they stop; more records come; the KCL takes the
/// table back and reads exactly those.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_stream_table_moves_both_ways() {
    use kinesis::consumer::{ShardInfo, StreamConfig, StreamTracker};
    const FIRST: usize = 1_500;
    const KCL_FIRST: usize = 300;
    const THIRD: usize = 600;
    let _serial = SERIAL.lock().await;
    let java = java();
    let bed = TestBed::start().await.expect("start the emulators");
    let streams = [bed.kinesis.create_stream(2).await.unwrap(), bed.kinesis.create_stream(1).await.unwrap()];
    let mut ids = Vec::new();
    for stream in &streams {
        ids.push(stream_identifier(&bed.kinesis.client(), stream).await);
    }
    let app = unique_name("multi-interop");
    // (stream, data) of every record written.
    let mut first: Vec<(String, Vec<u8>)> = Vec::new();
    for stream in &streams {
        let sent = produce_ours(bed.kinesis.client(), stream, &format!("{stream}-first"), FIRST, || async {}).await;
        first.extend(sent.into_iter().map(|(d, _)| (stream.clone(), d)));
    }

    let kcl_args = |worker: &'static str, stop_after: usize| {
        let mut args = vec!["--streams".to_owned(), ids.join(","), "--app".to_owned(), app.clone()];
        args.extend(["--worker", worker, "--failover-ms", "2000"].map(str::to_owned));
        args.extend(["--stop-after".to_owned(), stop_after.to_string()]);
        args
    };
    let run_kcl = |args: Vec<String>| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        java.spawn("KclReader", &args, &bed.child_env(), None).expect("start the KCL")
    };
    let stop_kcl = |kcl: &mut JavaProcess| {
        let status =
            tokio::task::block_in_place(|| kcl.terminate(Duration::from_secs(60))).expect("the KCL stops on SIGTERM");
        assert_eq!(status.code(), Some(143), "the KCL exited with {status}: {}", kcl_state(kcl));
    };

    // The KCL, multi-stream: the first 300 records of each of the 3 shards.
    let mut kcl = run_kcl(kcl_args("kcl-1", KCL_FIRST));
    until_or(
        Duration::from_secs(120),
        "the KCL's first 300 records of each shard of both streams",
        || kcl.count("record") >= 3 * KCL_FIRST,
        || kcl_state(&kcl),
    )
    .await;
    stop_kcl(&mut kcl);
    let kcl_records = kcl.events("record");
    assert_eq!(kcl_records.len(), 3 * KCL_FIRST, "{}", kcl_state(&kcl));
    let kcl_saw: std::collections::HashSet<String> = kcl_records.iter().map(|r| text(r, "data_sha256")).collect();
    for r in &kcl_records {
        let stream = text(r, "stream");
        assert!(streams.contains(&stream), "the KCL names the stream: {r}");
    }

    // The KCL's multi-stream rows: key `id:shard`, `streamName` the id, `shardId` the shard.
    let dynamodb = bed.dynamodb.client();
    let items = scan_table(&dynamodb, &app).await;
    let mut leases: Vec<(String, String, String)> = items
        .iter()
        .filter(|i| attr_s(i, "shardId").is_some())
        .map(|i| (attr_s(i, "leaseKey").unwrap(), attr_s(i, "streamName").unwrap(), attr_s(i, "shardId").unwrap()))
        .collect();
    leases.sort();
    println!("the KCL's multi-stream leases: {leases:?}");
    assert_eq!(leases.len(), 3, "a lease per shard of both streams: {leases:?}");
    for (key, stream, shard) in &leases {
        assert!(ids.contains(stream), "streamName is the stream identifier: {stream}");
        assert_eq!(key, &format!("{stream}:{shard}"), "the KCL's multi-stream key is ours");
    }

    // Our two multi-stream workers take the table over: the rest of the first records, each
    // once, each under the stream it was written to.
    /// (stream the factory was told, stream of the record, data).
    type Read = (String, String, Vec<u8>);
    #[derive(Clone, Default)]
    struct ByStream(Arc<Mutex<Vec<Read>>>);
    struct Reader(ByStream, String);
    impl Processor for Reader {
        async fn process_records(&mut self, batch: Batch, checkpointer: &mut Checkpointer) {
            {
                let mut seen = (self.0).0.lock().unwrap();
                for r in &batch.records {
                    seen.push((self.1.clone(), r.stream.to_string(), r.data.to_vec()));
                }
            }
            let _ = checkpointer.checkpoint().await;
        }
        async fn shard_ended(&mut self, checkpointer: &mut Checkpointer) {
            let _ = checkpointer.checkpoint().await;
        }
        async fn shutdown_requested(&mut self, checkpointer: &mut Checkpointer) {
            let _ = checkpointer.checkpoint().await;
        }
    }
    struct Factory(ByStream);
    impl kinesis::consumer::ProcessorFactory for Factory {
        type Processor = Reader;
        fn create(&self, _: &str) -> Reader {
            unreachable!("multi-stream workers make processors with create_for")
        }
        fn create_for(&self, shard: &ShardInfo) -> Reader {
            Reader(self.0.clone(), shard.stream.clone())
        }
    }
    let seen = ByStream::default();
    let tracker = StreamTracker::fixed(
        streams.iter().map(|s| StreamConfig::new(s.clone(), InitialPosition::TrimHorizon)).collect(),
    );
    let workers: Vec<Scheduler> = ["rust-1", "rust-2"]
        .iter()
        .map(|worker| {
            let single = our_config("unused", &app, worker);
            let mut config = SchedulerConfig::new_multi_stream(tracker.clone(), app.clone());
            config.worker_id = single.worker_id;
            config.failover = single.failover;
            config.shard_sync_interval = single.shard_sync_interval;
            config.polling = single.polling;
            config.cpu_source = single.cpu_source;
            Scheduler::start(bed.kinesis.client(), bed.dynamodb.client(), config, Factory(seen.clone()))
                .expect("a valid config")
        })
        .collect();
    let expected: Vec<&(String, Vec<u8>)> = first.iter().filter(|(_, d)| !kcl_saw.contains(&sha256_hex(d))).collect();
    assert_eq!(expected.len(), 2 * FIRST - 3 * KCL_FIRST);
    until(Duration::from_secs(90), "our workers to read what the KCL left", || {
        seen.0.lock().unwrap().len() >= expected.len()
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    for worker in workers {
        worker.shutdown().await.expect("clean shutdown");
    }
    let ours = seen.0.lock().unwrap().clone();
    let mut counts: HashMap<(&str, &[u8]), usize> = HashMap::new();
    for (told, stream, data) in &ours {
        assert_eq!(told, stream, "the factory and the record name one stream");
        *counts.entry((stream.as_str(), data.as_slice())).or_default() += 1;
    }
    for (stream, data) in &expected {
        assert_eq!(counts.get(&(stream.as_str(), data.as_slice())), Some(&1), "{} once", String::from_utf8_lossy(data));
    }
    assert_eq!(ours.len(), expected.len(), "nothing the KCL checkpointed, nothing twice");

    // More records; the KCL takes the table back and reads exactly those.
    let mut third: Vec<Vec<u8>> = Vec::new();
    for stream in &streams {
        let sent = produce_ours(bed.kinesis.client(), stream, &format!("{stream}-third"), THIRD, || async {}).await;
        third.extend(sent.into_iter().map(|(d, _)| d));
    }
    let mut kcl = run_kcl(kcl_args("kcl-2", usize::MAX / 2));
    until_or(
        Duration::from_secs(120),
        "the KCL's read of the records after our checkpoints",
        || kcl.count("record") >= third.len(),
        || kcl_state(&kcl),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop_kcl(&mut kcl);
    let back: Vec<String> = kcl.events("record").iter().map(|r| text(r, "data_sha256")).collect();
    let wanted: std::collections::HashSet<String> = third.iter().map(|d| sha256_hex(d)).collect();
    let extra = back.iter().filter(|h| !wanted.contains(*h)).count();
    assert_eq!(extra, 0, "the KCL re-read {extra} records our workers had checkpointed");
    assert_eq!(back.len(), third.len(), "the KCL read each new record once");
    println!(
        "multi-stream KCL -> ours -> KCL: the KCL read {} records of 2 streams, ours the {} after them, the KCL the {} after ours",
        kcl_records.len(),
        ours.len(),
        back.len()
    );
}
