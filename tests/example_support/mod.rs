//! Shared by the tests that run the examples as child processes: where the example binaries are,
//! the environment that points them at the test's emulators, and a writer of plain records that
//! remembers where each one went.
#![allow(dead_code)]

pub mod window;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use kinesis_testkit::TestBed;

/// The compiled example `name`: `target/<profile>/deps/<test>-<hash>` is this test, the examples
/// are in `target/<profile>/examples/`. `cargo test` builds them; `cargo test --test <name>`
/// alone does not, so the test says how to build a missing or stale one.
pub fn example_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let profile_dir = exe.parent().and_then(Path::parent).expect("the test binary is in target/<profile>/deps");
    let binary = profile_dir.join("examples").join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    let build = format!(
        "`cargo test` builds the examples, `cargo test --test <file>` does not: run `cargo build -p kinesis --example {name}` (with the same --release, if any) first"
    );
    let built = std::fs::metadata(&binary)
        .and_then(|m| m.modified())
        .unwrap_or_else(|_| panic!("the example binary {} is missing. {build}", binary.display()));
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples").join(format!("{name}.rs"));
    if let Ok(changed) = std::fs::metadata(&source).and_then(|m| m.modified()) {
        assert!(
            built >= changed,
            "the example binary {} is older than {}. {build}",
            binary.display(),
            source.display()
        );
    }
    binary
}

/// A command running the example `name` against the test bed's endpoints, with dummy
/// credentials and no AWS configuration files; its stdout and stderr go to `<log>.out` and
/// `<log>.err`. Killed when dropped.
pub fn example(bed: &TestBed, name: &str, args: &[&str], log: &Path) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(example_binary(name));
    command
        .args(args)
        .envs(bed.child_env())
        .stdin(Stdio::null())
        .stdout(Stdio::from(std::fs::File::create(log.with_extension("out")).expect("create the stdout log")))
        .stderr(Stdio::from(std::fs::File::create(log.with_extension("err")).expect("create the stderr log")))
        .kill_on_drop(true);
    command
}

/// What a child wrote, for failure messages.
pub fn logs(log: &Path) -> String {
    let read = |ext| std::fs::read_to_string(log.with_extension(ext)).unwrap_or_default();
    format!("--- stdout ---\n{}\n--- stderr ---\n{}", read("out"), read("err"))
}

/// Runs `command` to its end (at most `limit`) and asserts that it succeeded.
pub async fn run_to_success(mut command: tokio::process::Command, log: &Path, limit: Duration) {
    let mut child = command.spawn().expect("start the example");
    let status = match tokio::time::timeout(limit, child.wait()).await {
        Ok(status) => status.expect("wait for the example"),
        Err(_) => {
            let _ = child.kill().await;
            panic!("the example did not finish within {limit:?}\n{}", logs(log));
        }
    };
    assert!(status.success(), "the example failed ({status})\n{}", logs(log));
}

/// A record put by a test, and where Kinesis stored it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sent {
    pub data: String,
    pub partition_key: String,
    pub shard_id: String,
    pub sequence_number: String,
}

/// Puts plain records (one PutRecords call, in order) and returns where each went.
pub async fn put(client: &aws_sdk_kinesis::Client, stream: &str, records: &[(String, String)]) -> Vec<Sent> {
    let mut sent = Vec::with_capacity(records.len());
    for chunk in records.chunks(500) {
        let mut request = client.put_records().stream_name(stream);
        for (key, data) in chunk {
            let entry = PutRecordsRequestEntry::builder()
                .partition_key(key)
                .data(Blob::new(data.as_bytes()))
                .build()
                .expect("a valid entry");
            request = request.records(entry);
        }
        let out = request.send().await.expect("PutRecords");
        assert_eq!(out.failed_record_count().unwrap_or(0), 0, "the emulator refused records");
        for ((key, data), result) in chunk.iter().zip(out.records()) {
            sent.push(Sent {
                data: data.clone(),
                partition_key: key.clone(),
                shard_id: result.shard_id().expect("a shard id").to_owned(),
                sequence_number: result.sequence_number().expect("a sequence number").to_owned(),
            });
        }
    }
    sent
}

/// A new empty directory under the system's temporary directory.
pub fn temp_dir(prefix: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(kinesis_testkit::unique_name(prefix));
    std::fs::create_dir_all(&dir).expect("create a temporary directory");
    dir
}

/// Each shard is checkpointed at its last record put (every record was handled).
pub async fn assert_checkpointed_at_last_records(leases: &kinesis::consumer::LeaseTable, sent: &[Sent]) {
    for lease in leases.list().await.expect("read the lease table") {
        let last = sent
            .iter()
            .filter(|s| s.shard_id == lease.key)
            .map(|s| s.sequence_number.as_str())
            .max_by(|a, b| kinesis::consumer::cmp_sequence_numbers(a, b))
            .expect("records in every shard");
        assert_eq!(lease.checkpoint.position, kinesis::consumer::Position::Sequence(last.to_owned()), "{}", lease.key);
    }
}
