//! `examples/window_average.rs` as a child process on the embedded emulators: the averages it
//! writes to the output stream are exactly the ones computed here, also when it is killed
//! (SIGKILL) with windows open and restarted: its checkpoints never pass a window not yet emitted.

mod example_support;

use std::collections::BTreeMap;
use std::time::Duration;

use example_support::{Sent, example, logs, put, run_to_success, temp_dir};
use kinesis::consumer::{LeaseTable, Position, cmp_sequence_numbers};
use kinesis_testkit::{TestBed, unique_name};
use tokio::time::Instant;

const WINDOW_MS: i64 = 10_000;
/// A multiple of the window: readings start at a window's start.
const BASE_TS: i64 = 1_700_000_000_000;
const SENSORS: usize = 8;
/// Readings 700 ms apart in event time, one per sensor at each step.
const STEP_MS: i64 = 700;

/// A reading put: its sensor (the partition key), the record's data, and what it says.
struct Reading {
    sensor: String,
    data: String,
    temperature: f64,
    ts: i64,
}

/// A window the example wrote.
#[derive(Debug)]
struct Emitted {
    end: i64,
    count: u64,
    average: f64,
}

/// The output stream: (sensor, window start) to each record written for it.
type Outputs = BTreeMap<(String, i64), Vec<Emitted>>;

/// The readings of steps `from..to`, one per sensor at each step.
fn readings(from: i64, to: i64) -> Vec<Reading> {
    let mut out = Vec::new();
    for step in from..to {
        let ts = BASE_TS + step * STEP_MS;
        for i in 0..SENSORS {
            let sensor = format!("s-{i}");
            let text = format!("{:.1}", 15.0 + i as f64 + fastrand::f64() * 10.0);
            let data = format!(r#"{{"sensor":"{sensor}","temperature":{text},"ts":{ts}}}"#);
            out.push(Reading { sensor, data, temperature: text.parse().unwrap(), ts });
        }
    }
    out
}

/// Puts the readings a step at a time (a call each, in order), so that each sensor's readings
/// are in its shard in time order.
async fn put_steps(bed: &TestBed, stream: &str, readings: &[Reading]) -> Vec<Sent> {
    let mut sent = Vec::new();
    for step in readings.chunks(SENSORS) {
        let records: Vec<(String, String)> = step.iter().map(|r| (r.sensor.clone(), r.data.clone())).collect();
        sent.extend(put(&bed.kinesis.client(), stream, &records).await);
    }
    sent
}

/// Every output record so far.
async fn outputs(bed: &TestBed, stream: &str) -> Outputs {
    let mut out = Outputs::new();
    for record in kinesis_testkit::read_stream(&bed.kinesis.client(), stream).await.expect("read the output stream") {
        for user in kinesis::aggregation::deaggregate(&record.partition_key, record.data.into()).records {
            let value: serde_json::Value = serde_json::from_slice(user.data()).expect("an output record is JSON");
            let sensor = value["sensor"].as_str().expect("sensor").to_owned();
            assert_eq!(user.partition_key(), sensor, "the partition key is the sensor");
            let start = value["window_start"].as_i64().expect("window_start");
            let end = value["window_end"].as_i64().expect("window_end");
            let count = value["count"].as_u64().expect("count");
            let average = value["average"].as_f64().expect("average");
            out.entry((sensor, start)).or_default().push(Emitted { end, count, average });
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn averages_are_exact_across_a_crash_with_windows_open() {
    let bed = TestBed::start().await.expect("start the emulators (ferrokinesis and dynoxide, embedded)");
    let input = bed.kinesis.create_stream(2).await.expect("create the input stream");
    let output = bed.kinesis.create_stream(1).await.expect("create the output stream");
    let table = unique_name("window-test");
    let work = temp_dir("window-test");
    let args = ["--stream", &input, "--output", &output, "--table", &table, "--failover-ms", "1000"];

    // First half: 25 steps, 17.5 s of event time; the windows from 10 s on are still open.
    let first_half = readings(0, 25);
    let mut sent = put_steps(&bed, &input, &first_half).await;
    let first_log = work.join("first");
    let mut first = example(&bed, "window_average", &args, &first_log).spawn().expect("start window_average");
    let leases = LeaseTable::new(bed.dynamodb.client(), &table);
    let started = Instant::now();
    loop {
        if let Ok(Some(status)) = first.try_wait() {
            panic!("window_average exited early ({status})\n{}", logs(&first_log));
        }
        // Every sensor's first window (0-10 s) is emitted, and both shards are checkpointed.
        let emitted = outputs(&bed, &output).await.keys().filter(|(_, start)| *start == BASE_TS).count();
        let checkpointed = leases
            .list()
            .await
            .map(|l| l.iter().filter(|l| matches!(l.checkpoint.position, Position::Sequence(_))).count())
            .unwrap_or(0);
        if emitted == SENSORS && checkpointed == 2 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "no window emitted within 20 s\n{}", logs(&first_log));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    first.kill().await.expect("SIGKILL window_average");
    let before_crash = outputs(&bed, &output).await;
    assert!(
        before_crash.keys().all(|(_, start)| *start == BASE_TS),
        "only the windows the watermark closed were emitted: {:?}",
        before_crash.keys().collect::<Vec<_>>()
    );

    // Second half, a late reading (for the first window, closed long since) and a record that is
    // not a reading; then the restarted example runs until idle.
    let second_half = readings(25, 50);
    sent.extend(put_steps(&bed, &input, &second_half).await);
    let late = format!(r#"{{"sensor":"s-0","temperature":99.9,"ts":{}}}"#, BASE_TS + 100);
    sent.extend(
        put(&bed.kinesis.client(), &input, &[("s-0".into(), late), ("s-1".into(), "not a reading".into())]).await,
    );
    let second_log = work.join("second");
    let mut restart_args = args.to_vec();
    restart_args.extend(["--idle-exit", "2"]);
    run_to_success(example(&bed, "window_average", &restart_args, &second_log), &second_log, Duration::from_secs(40))
        .await;
    let summary = std::fs::read_to_string(second_log.with_extension("out")).unwrap();
    assert!(summary.contains(", 1 late, 1 invalid;"), "one late reading and one invalid record\n{summary}");

    // The averages, summed here in the order each sensor's readings were put.
    let mut expected: BTreeMap<(String, i64), (u64, f64)> = BTreeMap::new();
    for reading in first_half.iter().chain(&second_half) {
        let start = reading.ts.div_euclid(WINDOW_MS) * WINDOW_MS;
        let entry = expected.entry((reading.sensor.clone(), start)).or_insert((0, 0.0));
        entry.0 += 1;
        entry.1 += reading.temperature;
    }
    let got = outputs(&bed, &output).await;
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>(),
        "one window per sensor and 10 s of event time\n{}",
        logs(&second_log)
    );
    for (key, (count, sum)) in &expected {
        let average = sum / *count as f64;
        for emitted in &got[key] {
            assert_eq!(emitted.end, key.1 + WINDOW_MS, "{key:?}: the window's end");
            assert_eq!((emitted.count, emitted.average), (*count, average), "{key:?}: count and average");
        }
    }
    let duplicates: usize = got.values().map(|v| v.len() - 1).sum();
    println!("{} windows, all exact; {duplicates} emitted twice across the crash", expected.len());

    // Every window was emitted at the graceful shutdown: each shard is checkpointed at its last
    // record.
    for lease in leases.list().await.expect("read the lease table") {
        let last = sent
            .iter()
            .filter(|s| s.shard_id == lease.key)
            .map(|s| s.sequence_number.as_str())
            .max_by(|a, b| cmp_sequence_numbers(a, b))
            .expect("records in every shard");
        assert_eq!(lease.checkpoint.position, Position::Sequence(last.to_owned()), "{}", lease.key);
    }
    let _ = std::fs::remove_dir_all(&work);
}
