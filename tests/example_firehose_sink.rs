//! `examples/firehose_sink.rs` as a child process on the embedded emulators: killed (SIGKILL)
//! while records flow, every record at or before each shard's checkpoint is in a completed file;
//! restarted until idle, every record sent is in a file (duplicates allowed, none lost).

mod example_support;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use example_support::{Sent, example, logs, put, run_to_success, temp_dir};
use kinesis::consumer::{LeaseTable, Position, cmp_sequence_numbers};
use kinesis_testkit::{TestBed, unique_name};
use tokio::time::Instant;

/// A completed file: its shard directory, the positions its name gives, and its lines.
#[derive(Debug)]
struct SinkFile {
    shard_id: String,
    name: String,
    first: (String, u64),
    last: (String, u64),
    lines: Vec<String>,
}

/// Every completed file under `dir` (temporary `.*.tmp` files are not).
fn completed_files(dir: &Path) -> Vec<SinkFile> {
    let mut files = Vec::new();
    let Ok(shards) = std::fs::read_dir(dir) else { return files };
    for shard in shards {
        let shard = shard.unwrap().path();
        if !shard.is_dir() {
            continue;
        }
        let shard_id = shard.file_name().unwrap().to_string_lossy().into_owned();
        for entry in std::fs::read_dir(&shard).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if name.starts_with('.') {
                assert!(name.ends_with(".tmp"), "an unexpected hidden file {name}");
                continue;
            }
            let positions = name
                .strip_prefix("part-")
                .and_then(|n| n.strip_suffix(".ndjson"))
                .unwrap_or_else(|| panic!("a file name not of the form part-<first>_<last>.ndjson: {name}"));
            let parse = |p: &str| {
                let (seq, sub) = p.split_once('-').unwrap_or_else(|| panic!("no sub-sequence in {name}"));
                (seq.to_owned(), sub.parse::<u64>().unwrap())
            };
            let (first, last) = positions.split_once('_').unwrap_or_else(|| panic!("no range in {name}"));
            let lines = std::fs::read_to_string(&path).unwrap().lines().map(str::to_owned).collect();
            let (first, last) = (parse(first), parse(last));
            files.push(SinkFile { shard_id: shard_id.clone(), name, first, last, lines });
        }
    }
    files
}

/// Asserts what every file holds: records of its own shard, inside the range its name says, in
/// order; returns every line written, with how many times.
fn check_files(files: &[SinkFile], sent: &HashMap<&str, &Sent>) -> HashMap<String, usize> {
    let mut written = HashMap::new();
    for file in files {
        assert!(!file.lines.is_empty(), "an empty file {}", file.name);
        let mut previous: Option<&str> = None;
        for line in &file.lines {
            let record =
                sent.get(line.as_str()).unwrap_or_else(|| panic!("{} holds a line never sent: {line}", file.name));
            assert_eq!(record.shard_id, file.shard_id, "{} holds a record of another shard", file.name);
            let seq = record.sequence_number.as_str();
            assert!(
                cmp_sequence_numbers(seq, &file.first.0).is_ge() && cmp_sequence_numbers(seq, &file.last.0).is_le(),
                "{} holds {seq}, outside its name's range",
                file.name
            );
            if let Some(previous) = previous {
                assert!(cmp_sequence_numbers(previous, seq).is_lt(), "{} is not in sequence order", file.name);
            }
            previous = Some(seq);
            *written.entry(line.clone()).or_insert(0) += 1;
        }
        let last = sent[file.lines.last().unwrap().as_str()];
        assert_eq!(
            last.sequence_number, file.last.0,
            "{}: its last line is not the last record its name says",
            file.name
        );
    }
    written
}

/// Puts 20 records every 50 ms until `stop` is set.
fn keep_putting(bed: &TestBed, stream: &str, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<Vec<Sent>> {
    let (client, stream) = (bed.kinesis.client(), stream.to_owned());
    tokio::spawn(async move {
        let mut sent = Vec::new();
        let mut n = 0;
        while !stop.load(Ordering::Relaxed) {
            let records: Vec<(String, String)> = (n..n + 20)
                .map(|i| (format!("key-{}", i % 17), format!(r#"{{"n":{i},"pad":"{}"}}"#, "x".repeat(i % 40))))
                .collect();
            n += 20;
            sent.extend(put(&client, &stream, &records).await);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        sent
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_sink_loses_no_checkpointed_record_and_a_restart_writes_every_record() {
    let bed = TestBed::start().await.expect("start the emulators (ferrokinesis and dynoxide, embedded)");
    let stream = bed.kinesis.create_stream(2).await.expect("create the stream");
    let table = unique_name("firehose-test");
    let work = temp_dir("firehose-test");
    let dir: PathBuf = work.join("out");
    let dir_arg = dir.to_string_lossy().into_owned();
    let args = [
        "--stream",
        &stream,
        "--table",
        &table,
        "--dir",
        &dir_arg,
        "--max-bytes",
        "3000",
        "--interval-ms",
        "400",
        "--failover-ms",
        "1000",
    ];

    let stop = Arc::new(AtomicBool::new(false));
    let putter = keep_putting(&bed, &stream, stop.clone());
    let first_log = work.join("first");
    let mut first = example(&bed, "firehose_sink", &args, &first_log).spawn().expect("start firehose_sink");

    // Kill it once it has checkpointed a few files, with records still flowing.
    let leases = LeaseTable::new(bed.dynamodb.client(), &table);
    let started = Instant::now();
    loop {
        if let Ok(Some(status)) = first.try_wait() {
            panic!("firehose_sink exited early ({status})\n{}", logs(&first_log));
        }
        let checkpointed = leases
            .list()
            .await
            .map(|l| l.iter().filter(|l| matches!(l.checkpoint.position, Position::Sequence(_))).count())
            .unwrap_or(0);
        if checkpointed > 0 && completed_files(&dir).len() >= 4 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "no checkpoint within 20 s\n{}", logs(&first_log));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(fastrand::u64(0..400))).await;
    first.kill().await.expect("SIGKILL firehose_sink");
    let checkpoints: BTreeMap<String, Position> = leases
        .list()
        .await
        .expect("read the lease table")
        .into_iter()
        .map(|l| (l.key, l.checkpoint.position))
        .collect();
    stop.store(true, Ordering::Relaxed);
    let sent = putter.await.expect("the putting task");
    let by_data: HashMap<&str, &Sent> = sent.iter().map(|s| (s.data.as_str(), s)).collect();
    assert_eq!(by_data.len(), sent.len(), "every record's data is unique");

    // Every record at or before its shard's checkpoint is in a completed file.
    let written = check_files(&completed_files(&dir), &by_data);
    let mut covered = 0;
    for (shard, position) in &checkpoints {
        let Position::Sequence(checkpoint) = position else { continue };
        for record in sent.iter().filter(|s| &s.shard_id == shard) {
            if cmp_sequence_numbers(&record.sequence_number, checkpoint).is_le() {
                covered += 1;
                assert!(
                    written.contains_key(&record.data),
                    "{shard} is checkpointed at {checkpoint}, but {} ({}) is in no completed file",
                    record.data,
                    record.sequence_number
                );
            }
        }
    }
    assert!(covered > 0, "the kill came after a checkpoint: {checkpoints:?}");
    let in_flight = sent.len() - written.len();
    println!("killed with {} records sent, {covered} checkpointed, {in_flight} not in a file yet", sent.len());

    // Restarted, it takes the dead worker's leases over, resumes after the checkpoints and
    // writes everything else; then no record comes for 2 s and it stops gracefully.
    let second_log = work.join("second");
    let mut restart_args = args.to_vec();
    restart_args.extend(["--idle-exit", "2"]);
    run_to_success(example(&bed, "firehose_sink", &restart_args, &second_log), &second_log, Duration::from_secs(40))
        .await;
    let written = check_files(&completed_files(&dir), &by_data);
    let missing: Vec<&Sent> = sent.iter().filter(|s| !written.contains_key(&s.data)).collect();
    assert!(
        missing.is_empty(),
        "{} of {} records are in no file, e.g. {:?}\n{}",
        missing.len(),
        sent.len(),
        &missing[..missing.len().min(3)],
        logs(&second_log)
    );
    let duplicates: usize = written.values().map(|n| n - 1).sum();
    println!("after the restart: {} records in files, {duplicates} written twice", sent.len());

    // Each shard is checkpointed at its last record.
    for lease in leases.list().await.expect("read the lease table") {
        let last = sent
            .iter()
            .filter(|s| s.shard_id == lease.key)
            .map(|s| s.sequence_number.as_str())
            .max_by(|a, b| cmp_sequence_numbers(a, b));
        if let Some(last) = last {
            assert_eq!(lease.checkpoint.position, Position::Sequence(last.to_owned()), "{}", lease.key);
        }
    }
    let _ = std::fs::remove_dir_all(&work);
}
