//! `kinesis` end to end against the embedded Kinesis emulator: stream administration, put (from
//! arguments and stdin), tail (deaggregated, from several starting points), and the agg commands.

use std::collections::BTreeSet;
use std::io::Write;
use std::process::{Command, Output, Stdio};

use aws_sdk_kinesis::primitives::Blob;
use bytes::Bytes;
use kinesis_aggregation::{Aggregator, UserRecord};
use kinesis_testkit::Kinesis;
use serde_json::Value;

fn run(kinesis: &Kinesis, args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kinesis"))
        .args(args)
        .envs(kinesis_testkit::child_env(Some(kinesis.endpoint_url()), None))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run kinesis");
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

fn ok(output: Output) -> Vec<Value> {
    assert!(output.status.success(), "failed: {}", String::from_utf8_lossy(&output.stderr));
    let text = String::from_utf8(output.stdout).unwrap();
    text.lines().filter(|l| l.starts_with('{')).map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_records_and_tail_from_the_command_line() {
    let kinesis = Kinesis::start().await.expect("start Kinesis (embedded ferrokinesis)");
    let name = format!("cli-{}", std::process::id());

    let created = ok(run(&kinesis, &["stream", "create", &name, "--shards", "2"], b""));
    assert_eq!(created[0]["status"], "ACTIVE");
    let listed = run(&kinesis, &["stream", "list"], b"");
    assert!(String::from_utf8_lossy(&listed.stdout).lines().any(|l| l == name));

    let hello = ok(run(&kinesis, &["put", &name, "--key", "k1", "hello"], b""));
    let hello_seq = hello[0]["sequence_number"].as_str().unwrap().to_owned();
    let hello_shard = hello[0]["shard_id"].as_str().unwrap().to_owned();
    let lines = ok(run(&kinesis, &["put", &name], b"a\nb\nc\n"));
    assert_eq!(lines.len(), 3);

    // An aggregate, put with the SDK (one key, so one shard): tail deaggregates it.
    let mut aggregator = Aggregator::new();
    for i in 0..3 {
        assert!(aggregator.try_push_ref(&UserRecord::new("one-key", Bytes::from(format!("sub {i}")))).unwrap());
    }
    let aggregate = aggregator.finish().unwrap();
    kinesis
        .client()
        .put_record()
        .stream_name(&name)
        .partition_key(&aggregate.partition_key)
        .explicit_hash_key(aggregate.explicit_hash_key.unwrap().0.to_string())
        .data(Blob::new(aggregate.data.to_vec()))
        .send()
        .await
        .unwrap();

    let all = ok(run(&kinesis, &["tail", &name, "--from", "trim-horizon", "--idle-exit", "1"], b""));
    let data: BTreeSet<&str> = all.iter().map(|l| l["data"].as_str().unwrap()).collect();
    assert_eq!(data, BTreeSet::from(["hello", "a", "b", "c", "sub 0", "sub 1", "sub 2"]));
    let subs: Vec<u64> = all.iter().filter_map(|l| l["sub_sequence_number"].as_u64()).collect();
    assert_eq!(subs, [0, 1, 2]);

    let after = ok(run(&kinesis, &["tail", &name, "--from", &format!("after {hello_seq}"), "--idle-exit", "1"], b""));
    assert!(after.iter().all(|l| l["data"] != "hello"), "after hello's sequence number");
    assert_eq!(after.len(), 6);
    let at = ok(run(&kinesis, &["tail", &name, "--from", &format!("at {hello_seq}"), "--max-records", "1"], b""));
    assert!(at.len() == 1 && (at[0]["data"] == "hello" || at[0]["shard_id"] != hello_shard.as_str()));

    ok(run(&kinesis, &["stream", "split", &name, "shardId-000000000000"], b""));
    let described = run(&kinesis, &["stream", "describe", &name], b"");
    assert!(described.status.success());
    let described: Value = serde_json::from_slice(&described.stdout).unwrap();
    let shards = described["shards"].as_array().unwrap();
    assert_eq!(shards.len(), 4);
    assert_eq!(shards.iter().filter(|s| s["open"] == false).count(), 1);
    assert_eq!(ok(run(&kinesis, &["stream", "delete", &name], b""))[0]["status"], "DELETING");
}

#[tokio::test]
async fn bad_input_is_a_clear_error_and_help_lists_the_commands() {
    let kinesis = Kinesis::start().await.expect("start Kinesis (embedded ferrokinesis)");
    let bad = run(&kinesis, &["tail", "s", "--from", "yesterday"], b"");
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("trim-horizon"));
    let missing = run(&kinesis, &["stream", "describe", "no-such-stream"], b"");
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("kinesis: error: DescribeStreamSummary failed"));
    let help = run(&kinesis, &["--help"], b"");
    let help = String::from_utf8_lossy(&help.stdout);
    // Each command on a line of its own under "Commands:", and --local among the options.
    for command in ["stream", "put", "tail", "agg", "loadgen", "local"] {
        assert!(help.lines().any(|l| l.trim_start().starts_with(&format!("{command} "))), "{command} in {help}");
    }
    assert!(help.contains("--local"), "{help}");
    // The agg commands are kinesis-agg's.
    let encoded = run(&kinesis, &["agg", "encode"], b"{\"partition_key\":\"k\",\"data_b64\":\"aGk=\"}\n");
    assert!(encoded.status.success());
    let line: Value = serde_json::from_slice(&encoded.stdout).unwrap();
    assert!(line["data_b64"].as_str().unwrap().starts_with("84maw"));
}
