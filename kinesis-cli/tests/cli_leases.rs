//! `kinesis leases` on a table our consumer wrote and on one the Java KCL 3.5.1 wrote (issue 9's
//! harness, `interop/java`), against the embedded emulators: a row per lease with its checkpoint
//! and the Kinesis records after it, counted exactly.

use std::collections::BTreeMap;
use std::process::{Command, Output};
use std::time::Duration;

use aws_sdk_kinesis::primitives::Blob;
use kinesis_consumer::{Batch, Checkpointer, InitialPosition, LeaseManagement, Processor, Scheduler, SchedulerConfig};
use kinesis_testkit::{JavaInterop, TestBed, unique_name};
use serde_json::Value;

fn leases(bed: &TestBed, args: &[&str]) -> Vec<Value> {
    let output: Output = Command::new(env!("CARGO_BIN_EXE_kinesis"))
        .arg("leases")
        .args(args)
        .envs(bed.child_env())
        .output()
        .expect("run kinesis leases");
    assert!(output.status.success(), "failed: {}", String::from_utf8_lossy(&output.stderr));
    let text = String::from_utf8(output.stdout).unwrap();
    text.lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect()
}

/// Puts `count` plain records `{prefix}-{i}` with keys spread over the shards; returns how many
/// went to each shard.
async fn put(bed: &TestBed, stream: &str, prefix: &str, count: usize) -> BTreeMap<String, u64> {
    let mut per_shard = BTreeMap::new();
    for i in 0..count {
        let out = bed
            .kinesis
            .client()
            .put_record()
            .stream_name(stream)
            .partition_key(format!("key-{i}"))
            .data(Blob::new(format!("{prefix}-{i}")))
            .send()
            .await
            .unwrap();
        *per_shard.entry(out.shard_id().to_owned()).or_default() += 1;
    }
    per_shard
}

/// Checkpoints every batch.
struct Checkpointing;

impl Processor for Checkpointing {
    async fn process_records(&mut self, _batch: Batch, checkpointer: &mut Checkpointer) {
        let _ = checkpointer.checkpoint().await;
    }
    async fn shard_ended(&mut self, checkpointer: &mut Checkpointer) {
        let _ = checkpointer.checkpoint().await;
    }
    async fn shutdown_requested(&mut self, checkpointer: &mut Checkpointer) {
        let _ = checkpointer.checkpoint().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_table_shows_owners_checkpoints_and_what_is_left() {
    let bed = TestBed::start().await.expect("start the emulators");
    let stream = bed.kinesis.create_stream(2).await.unwrap();
    let app = unique_name("leases-cli");
    put(&bed, &stream, "first", 100).await;
    let mut config = SchedulerConfig::new(stream.clone(), app.clone());
    config.worker_id = "worker-a".into();
    config.initial_position = InitialPosition::TrimHorizon;
    config.lease_management = LeaseManagement::Kcl2Compatible;
    config.failover = Duration::from_secs(2);
    let worker = Scheduler::start(bed.kinesis.client(), bed.dynamodb.client(), config, |_: &str| Checkpointing)
        .expect("a valid config");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while worker.metrics().records_processed < 100 {
        assert!(tokio::time::Instant::now() < deadline, "the worker read the first 100 records");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Held, caught up.
    let rows = leases(&bed, &[&app, "--stream", &stream, "--json"]);
    let (leases_rows, workers): (Vec<&Value>, Vec<&Value>) = rows.iter().partition(|r| r.get("shard_id").is_some());
    assert_eq!(leases_rows.len(), 2, "{rows:?}");
    assert!(leases_rows.iter().all(|r| r["owner"] == "worker-a" && r["behind_records"] == 0), "{rows:?}");
    assert_eq!(workers, [&serde_json::json!({ "worker": "worker-a", "leases": 2 })]);

    // Stopped (leases released), then 40 more records: each shard is behind by exactly its share.
    worker.shutdown().await.unwrap();
    let late = put(&bed, &stream, "late", 40).await;
    let rows = leases(&bed, &[&app, "--stream", &stream, "--json"]);
    for row in rows.iter().filter(|r| r.get("shard_id").is_some()) {
        let shard = row["shard_id"].as_str().unwrap();
        assert_eq!(row["owner"], Value::Null, "released at shutdown: {row}");
        assert_eq!(row["behind_records"], late.get(shard).copied().unwrap_or(0), "{row}");
        assert_eq!(row["behind_records_more"], false);
        assert!(row["checkpoint"].as_str().unwrap().bytes().all(|b| b.is_ascii_digit()), "{row}");
        if late.contains_key(shard) {
            assert!(row["behind_ms"].as_u64().is_some(), "{row}");
        }
    }
    // The table form: a header, a row per lease, the count per worker.
    let output = Command::new(env!("CARGO_BIN_EXE_kinesis"))
        .args(["leases", &app, "--stream", &stream])
        .envs(bed.child_env())
        .output()
        .unwrap();
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(text.contains("behind (records)") && text.contains("(none): 2 leases"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kcl_table_shows_the_kcls_checkpoints() {
    const STOP_AFTER: usize = 30;
    let java = JavaInterop::get().unwrap_or_else(|e| panic!("{e}"));
    let bed = TestBed::start().await.expect("start the emulators");
    let stream = bed.kinesis.create_stream(2).await.unwrap();
    let app = unique_name("leases-kcl");
    let per_shard = put(&bed, &stream, "kcl", 200).await;
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
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while kcl.count("record") < 2 * STOP_AFTER {
        assert!(std::time::Instant::now() < deadline, "the KCL checkpoints 30 records of each shard");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::task::block_in_place(|| kcl.terminate(Duration::from_secs(60))).expect("the KCL stops");
    // Its checkpoint on each shard: the last record it reported there (a checkpoint every batch,
    // and at shutdown).
    let mut checkpointed: BTreeMap<String, String> = BTreeMap::new();
    for line in kcl.events("record") {
        checkpointed.insert(line["shard"].as_str().unwrap().to_owned(), line["sequence"].as_str().unwrap().to_owned());
    }

    let rows = leases(&bed, &[&app, "--stream", &stream, "--json"]);
    let lease_rows: Vec<&Value> = rows.iter().filter(|r| r.get("shard_id").is_some()).collect();
    assert_eq!(lease_rows.len(), 2, "the KCL's leases only (not its Migration3.0 or worker rows): {rows:?}");
    for row in lease_rows {
        let shard = row["shard_id"].as_str().unwrap();
        assert_eq!(row["checkpoint"].as_str(), checkpointed.get(shard).map(String::as_str), "{row}");
        assert_eq!(row["behind_records"], per_shard[shard] - STOP_AFTER as u64, "what the KCL left: {row}");
    }
}
