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

/// Keeps what every processor of a worker saw; checkpoints every batch.
#[derive(Clone, Default)]
struct Seen_ {
    records: Arc<Mutex<Vec<Seen>>>,
}

struct Collect {
    worker: String,
    log: Seen_,
}

impl Processor for Collect {
    async fn process_records(&mut self, batch: Batch, checkpointer: &mut Checkpointer) {
        {
            let mut records = self.log.records.lock().unwrap();
            for r in &batch.records {
                records.push(Seen {
                    worker: self.worker.clone(),
                    shard: batch.shard_id.to_string(),
                    sequence: r.sequence_number.to_string(),
                    sub_sequence: r.sub_sequence_number,
                    aggregated: r.aggregated,
                    partition_key: r.partition_key.clone(),
                    explicit_hash_key: r.explicit_hash_key.clone(),
                    data: r.data.to_vec(),
                });
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
    config
}

fn start_ours(bed: &TestBed, config: SchedulerConfig, log: &Seen_) -> Scheduler {
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
    let log = Seen_::default();
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
            let got: std::collections::HashSet<String> =
                kcl.events("record").iter().map(|r| text(r, "data_sha256")).collect();
            got.len() >= RECORDS
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
