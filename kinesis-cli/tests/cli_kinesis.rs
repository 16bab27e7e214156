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

/// `tail` from a time (`… ago`, RFC 3339), up to a time, one shard, `--grep`, `--pretty`; and
/// `shard-for`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_by_time_shard_and_pattern_and_shard_for() {
    let kinesis = Kinesis::start().await.expect("start Kinesis (embedded ferrokinesis)");
    let name = kinesis.create_stream(2).await.unwrap();
    let put = |key: &'static str, data: &'static str| {
        let client = kinesis.client();
        let name = name.clone();
        async move {
            let out = client.put_record().stream_name(&name).partition_key(key).data(Blob::new(data)).send().await;
            out.unwrap().shard_id().to_owned()
        }
    };
    let early_shard = put("k-early", r#"{"n":1,"kind":"early"}"#).await;
    // ferrokinesis stamps arrival times in whole seconds: a second apart, the times tell them apart.
    tokio::time::sleep(std::time::Duration::from_millis(2_100)).await;
    let between = std::time::SystemTime::now() - std::time::Duration::from_millis(1_000);
    let between_rfc3339 = humantime::format_rfc3339_seconds(between).to_string();
    for (key, data) in [("k-late", r#"{"n":2,"kind":"late"}"#), ("k-other", "not json")] {
        put(key, data).await;
    }

    let data_of = |lines: &[Value]| -> BTreeSet<String> { lines.iter().map(|l| l["data"].to_string()).collect() };
    let all = ok(run(&kinesis, &["tail", &name, "--from", "10m ago", "--idle-exit", "1"], b""));
    assert_eq!(all.len(), 3, "{all:?}");
    assert!(all.iter().all(|l| l["approximate_arrival"].as_f64().is_some()));
    let later = ok(run(&kinesis, &["tail", &name, "--from", &between_rfc3339, "--idle-exit", "1"], b""));
    assert_eq!(later.len(), 2, "from an RFC 3339 time between the puts: {later:?}");
    assert!(later.iter().all(|l| !l["data"].as_str().unwrap().contains("early")));
    let until = ok(run(&kinesis, &["tail", &name, "--from", "trim-horizon", "--to", &between_rfc3339], b""));
    assert_eq!(data_of(&until), BTreeSet::from([r#""{\"n\":1,\"kind\":\"early\"}""#.to_owned()]), "up to a time");
    let grep = ok(run(
        &kinesis,
        &["tail", &name, "--from", "trim-horizon", "--grep", r#""kind":"l.te""#, "--idle-exit", "1"],
        b"",
    ));
    assert_eq!(grep.len(), 1, "{grep:?}");
    assert_eq!(grep[0]["partition_key"], "k-late");
    let one =
        ok(run(&kinesis, &["tail", &name, "--from", "trim-horizon", "--shard", &early_shard, "--idle-exit", "1"], b""));
    assert!(!one.is_empty() && one.iter().all(|l| l["shard_id"] == early_shard.as_str()), "{one:?}");
    let pretty = run(
        &kinesis,
        &["tail", &name, "--from", "trim-horizon", "--grep", "early", "--pretty", "--idle-exit", "1"],
        b"",
    );
    assert!(pretty.status.success());
    let text = String::from_utf8(pretty.stdout).unwrap();
    let value: Value = serde_json::from_str(&text).expect("one indented JSON value");
    assert_eq!(value["data"]["kind"], "early", "JSON data as JSON: {text}");
    assert!(text.lines().count() > 5, "indented");
    let bad = run(&kinesis, &["tail", &name, "--from", "last tuesday"], b"");
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("10m ago"));

    let hashed = ok(run(&kinesis, &["shard-for", "k-early"], b""));
    let expected = kinesis_aggregation::hash_key("k-early").to_string();
    assert_eq!(hashed[0]["hash_key"], expected.as_str());
    let routed = ok(run(&kinesis, &["shard-for", "k-early", "--stream", &name], b""));
    assert_eq!(routed[0]["shard_id"], early_shard.as_str(), "the shard Kinesis put it in");
}
