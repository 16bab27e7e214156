//! `kinesis loadgen` end to end: on its own embedded emulators (`--local`) with `--verify`, paced,
//! and against a given endpoint with a user template read back by `kinesis tail`.

use std::collections::BTreeMap;
use std::process::{Command, Output};

use kinesis_testkit::Kinesis;
use serde_json::Value;

fn kinesis(args: &[&str], endpoint: Option<&str>) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_kinesis"));
    command
        .args(args)
        .env_remove("AWS_ENDPOINT_URL_KINESIS")
        .env_remove("AWS_ENDPOINT_URL_DYNAMODB")
        .envs(kinesis_testkit::child_env(None, None));
    if let Some(endpoint) = endpoint {
        command.env("AWS_ENDPOINT_URL_KINESIS", endpoint);
    }
    command.output().expect("run kinesis")
}

/// The summary's `name value` lines.
fn summary(output: &Output) -> BTreeMap<String, String> {
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "kinesis loadgen failed:\n{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    stdout
        .lines()
        .skip_while(|l| !l.starts_with("== loadgen summary"))
        .filter_map(|l| l.split_once(char::is_whitespace))
        .map(|(k, v)| (k.to_owned(), v.trim().to_owned()))
        .collect()
}

fn number(summary: &BTreeMap<String, String>, key: &str) -> u64 {
    let value = summary.get(key).unwrap_or_else(|| panic!("no {key} in the summary: {summary:?}"));
    value.split_whitespace().next().unwrap().parse().unwrap()
}

#[test]
fn loadgen_on_local_emulators_verifies_that_every_record_arrived() {
    let output = kinesis(
        &[
            "--local",
            "loadgen",
            "--producers",
            "4",
            "--records",
            "3000",
            "--shards",
            "2",
            "--verify",
            "--log",
            "--log-interval",
            "500ms",
        ],
        None,
    );
    let summary = summary(&output);
    assert_eq!(number(&summary, "sent"), 3000);
    assert_eq!(number(&summary, "acknowledged"), 3000);
    assert_eq!(number(&summary, "received"), 3000);
    assert_eq!(number(&summary, "lost"), 0);
    assert_eq!(number(&summary, "failed"), 0);
    // Latencies: min <= p50 <= p90 <= p99 <= max, for every record acknowledged (and received).
    for (line, count) in [("put->ack", 3000), ("put->process", 3000)] {
        let text = summary.get(line).unwrap_or_else(|| panic!("a {line} line: {summary:?}"));
        let figures: Vec<f64> = ["min", "mean", "p50", "p90", "p99", "max"]
            .iter()
            .map(|name| {
                let at = text.find(&format!("{name} ")).unwrap_or_else(|| panic!("{name} in {text}")) + name.len() + 1;
                text[at..].split_whitespace().next().unwrap().parse().unwrap()
            })
            .collect();
        let (min, p50, p90, p99, max) = (figures[0], figures[2], figures[3], figures[4], figures[5]);
        assert!(min <= p50 && p50 <= p90 && p90 <= p99 && p99 <= max && max > 0.0, "{line}: {text}");
        assert!(text.ends_with(&format!("ms ({count} records)")), "{line}: {text}");
    }

    // The --log lines, in the published form, one per producer at each interval.
    let stdout = String::from_utf8_lossy(&output.stdout);
    let lines: Vec<&str> = stdout.lines().filter(|l| l.starts_with("producer ")).collect();
    assert!(lines.len() >= 4, "a line per producer: {stdout}");
    for line in &lines {
        let words: Vec<&str> = line.split([' ', ',']).filter(|w| !w.is_empty()).collect();
        // producer K has sent N records elapsed T s all producers have sent M records tps = X
        assert_eq!(words[..3], ["producer", words[1], "has"], "{line}");
        assert!((1..=4).contains(&words[1].parse::<u32>().unwrap()), "{line}");
        assert!(words[4].parse::<u64>().unwrap() <= 750, "{line}");
        assert_eq!(words[6], "elapsed", "{line}");
        assert!(words[7].parse::<f64>().unwrap() >= 0.0, "{line}");
        assert_eq!(words[9..13], ["all", "producers", "have", "sent"], "{line}");
        assert!(words[13].parse::<u64>().unwrap() <= 3000, "{line}");
        assert_eq!(words[15..17], ["tps", "="], "{line}");
        assert!(words[17].parse::<f64>().unwrap() > 0.0, "{line}");
    }
}

#[test]
fn paced_producers_send_what_their_rate_allows_in_the_duration() {
    let output = kinesis(
        &["--local", "--no-throttle", "loadgen", "--producers", "4", "--rate", "50/s", "--duration", "3s"],
        None,
    );
    let summary = summary(&output);
    // 4 producers x 50 records/s x 3 s: each puts the records due before the end.
    assert_eq!(number(&summary, "sent"), 600);
    assert_eq!(number(&summary, "acknowledged"), 600);
    let pacing = summary.get("pacing").expect("a pacing line");
    assert!(pacing.contains("50 records/s per producer asked"), "{pacing}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_template_shapes_the_records_and_the_keys() {
    let emulator = Kinesis::start().await.expect("start Kinesis (embedded ferrokinesis)");
    let stream = format!("loadgen-template-{}", std::process::id());
    let endpoint = Some(emulator.endpoint_url());
    let template = r#"{"who":"{{name}}","n":{{int:1:3}},"p":{{producer}},"i":{{seq}}}"#;
    let args = [
        "loadgen",
        &stream,
        "--shards",
        "1",
        "--producers",
        "2",
        "--records",
        "20",
        "--no-aggregation",
        "--template",
        template,
        "--partition-key",
        "key-{{producer}}",
    ];
    let output = kinesis(&args, endpoint);
    assert_eq!(number(&summary(&output), "acknowledged"), 20);

    let tail = kinesis(&["tail", &stream, "--from", "trim-horizon", "--idle-exit", "1"], endpoint);
    assert!(tail.status.success(), "{}", String::from_utf8_lossy(&tail.stderr));
    let lines: Vec<Value> =
        String::from_utf8_lossy(&tail.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 20);
    let mut per_producer: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for line in &lines {
        let record: Value = serde_json::from_str(line["data"].as_str().unwrap()).expect("the template is JSON");
        let producer = record["p"].as_u64().unwrap();
        assert_eq!(line["partition_key"], format!("key-{producer}"));
        assert!((1..=3).contains(&record["n"].as_u64().unwrap()), "{record}");
        assert_eq!(record["who"].as_str().unwrap().split(' ').count(), 2, "{record}");
        per_producer.entry(producer).or_default().push(record["i"].as_u64().unwrap());
    }
    // Each producer's ten records, each once.
    assert_eq!(per_producer.len(), 2);
    for seqs in per_producer.values_mut() {
        seqs.sort_unstable();
        assert_eq!(seqs, &(0..10).collect::<Vec<u64>>());
    }
}

#[test]
fn a_bad_template_is_refused_with_the_reason_before_anything_starts() {
    let output = kinesis(&["--local", "loadgen", "--template", "{{uuid}} {{color}}"], None);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("unknown placeholder {{color}}"), "{stderr}");
    let output = kinesis(&["loadgen", "--records", "5"], None);
    assert!(String::from_utf8_lossy(&output.stderr).contains("name the stream"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_process_killed_mid_load_loses_nothing_its_receipts_acknowledged() {
    let emulator = Kinesis::start().await.expect("start Kinesis (embedded ferrokinesis)");
    let stream = format!("loadgen-kill-{}", std::process::id());
    let dir = std::env::temp_dir().join(format!("kinesis-loadgen-kill-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let receipts_path = dir.join("receipts.jsonl");
    let template = r#"{"p":{{producer}},"i":{{seq}}}"#;
    let mut child = Command::new(env!("CARGO_BIN_EXE_kinesis"))
        .args(["loadgen", &stream, "--shards", "2", "--producers", "4", "--rate", "400", "--duration", "60s"])
        .args(["--template", template, "--receipts"])
        .arg(&receipts_path)
        .envs(kinesis_testkit::child_env(Some(emulator.endpoint_url()), None))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("run kinesis loadgen");
    // Kill it (SIGKILL) once a few thousand records were acknowledged, while it keeps putting.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while std::fs::read_to_string(&receipts_path).map_or(0, |t| t.lines().count()) < 2000 {
        assert!(std::time::Instant::now() < deadline, "loadgen acknowledged too little");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    child.kill().expect("SIGKILL");
    child.wait().unwrap();

    // The receipts: complete lines only (the kill may cut the last one).
    let text = std::fs::read_to_string(&receipts_path).unwrap();
    let receipts: Vec<Value> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    assert!(receipts.len() >= 2000);

    // What the stream holds, deaggregated, read with `kinesis tail`.
    let tail = kinesis(&["tail", &stream, "--from", "trim-horizon", "--idle-exit", "1"], Some(emulator.endpoint_url()));
    assert!(tail.status.success(), "{}", String::from_utf8_lossy(&tail.stderr));
    let stored: BTreeMap<(String, u64), Value> = String::from_utf8_lossy(&tail.stdout)
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .map(|l| {
            let position =
                (l["sequence_number"].as_str().unwrap().to_owned(), l["sub_sequence_number"].as_u64().unwrap_or(0));
            (position, serde_json::from_str(l["data"].as_str().unwrap()).unwrap())
        })
        .collect();

    // Every acknowledged record is stored, where its receipt says, with its data.
    for receipt in &receipts {
        let position = (
            receipt["sequence_number"].as_str().unwrap().to_owned(),
            receipt["sub_sequence_number"].as_u64().unwrap_or(0),
        );
        let data = stored.get(&position).unwrap_or_else(|| panic!("acknowledged but not stored: {receipt}"));
        assert_eq!((&data["p"], &data["i"]), (&receipt["producer"], &receipt["seq"]), "at {position:?}");
    }
    // Stored records the receipts do not name were in flight when the process died: stored,
    // unacknowledged. Records put but neither stored nor acknowledged are the only ones lost.
    let unacknowledged = stored.len() - receipts.len();
    eprintln!(
        "killed: {} acknowledged, {} stored, {unacknowledged} stored unacknowledged",
        receipts.len(),
        stored.len()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Loads a page in headless Chromium through `scripts/browser check` (playwright-core driving
/// Debian's chromium) and returns what it reported.
fn load_in_chromium(page: &std::path::Path) -> Value {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let output = Command::new("bash")
        .arg(root.join("scripts/browser"))
        .arg("check")
        .arg(page)
        .output()
        .expect("run scripts/browser");
    assert!(
        output.status.success(),
        "scripts/browser check failed. This test needs node, npm and Chromium \
         (apt-get install nodejs npm chromium; .ci/run installs them):\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("one JSON object from scripts/browser check")
}

#[test]
fn the_report_page_loads_in_headless_chromium_with_every_chart_drawn() {
    let dir = std::env::temp_dir().join(format!("kinesis-loadgen-report-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let page = dir.join("report.html");
    // Paced for 4 s, so that every chart has a point per second.
    let output = kinesis(
        &[
            "--local",
            "loadgen",
            "--producers",
            "4",
            "--rate",
            "250/s",
            "--duration",
            "4s",
            "--shards",
            "3",
            "--verify",
            "--report",
            page.to_str().unwrap(),
        ],
        None,
    );
    let summary = summary(&output);
    assert_eq!(number(&summary, "lost"), 0);
    assert_eq!(summary.get("report").map(String::as_str), page.to_str());

    let found = load_in_chromium(&page);
    assert_eq!(found["errors"], serde_json::json!([]), "no console or page errors: {found}");
    assert_eq!(found["title"], "kinesis loadgen: loadgen");
    let figures = found["figures"].as_array().expect("figures");
    let ids: Vec<&str> = figures.iter().map(|f| f["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["throughput", "latency", "shards", "throttles"], "{found}");
    // Data lines: sent, acknowledged, received; p50, p90, p99, max; one per shard; throttles and
    // other errors. Each drawn on a chart of non-zero size, with a point per second or more.
    for (figure, lines) in figures.iter().zip([3, 4, 3, 2]) {
        assert!(figure["width"].as_f64().unwrap() > 100.0 && figure["height"].as_f64().unwrap() > 100.0, "{figure}");
        assert_eq!(figure["lines"], lines, "{figure}");
        assert!(figure["points"].as_u64().unwrap() >= 3 * lines, "{figure}");
        assert!(figure["texts"].as_u64().unwrap() >= 8, "titles, axis labels and legends: {figure}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
