//! Shared by the tests of `examples/window_average.rs` (tumbling and sliding): the readings put,
//! the windows read back from the output stream, the expected averages, and the checks made
//! after a crash and a restart.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use kinesis::consumer::{LeaseTable, Position};
use kinesis_testkit::TestBed;
use tokio::time::Instant;

use super::{Sent, example, logs, put, run_to_success};

/// A multiple of every window: readings start at a window's start.
pub const BASE_TS: i64 = 1_700_000_000_000;
pub const SENSORS: usize = 8;
/// Readings 700 ms apart in event time, one per sensor at each step.
pub const STEP_MS: i64 = 700;

/// A reading put: its sensor (the partition key), the record's data, and what it says.
pub struct Reading {
    pub sensor: String,
    pub data: String,
    pub temperature: f64,
    pub ts: i64,
}

/// A window the example wrote.
#[derive(Debug)]
pub struct Emitted {
    pub end: i64,
    pub count: u64,
    pub average: f64,
}

/// The output stream: (sensor, window start) to each record written for it.
pub type Outputs = BTreeMap<(String, i64), Vec<Emitted>>;

/// Readings at `BASE_TS + offset_ms + step * STEP_MS` for the steps `from..to`, one per sensor at
/// each step.
pub fn readings(offset_ms: i64, from: i64, to: i64) -> Vec<Reading> {
    let mut out = Vec::new();
    for step in from..to {
        let ts = BASE_TS + offset_ms + step * STEP_MS;
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
pub async fn put_steps(bed: &TestBed, stream: &str, readings: &[Reading]) -> Vec<Sent> {
    let mut sent = Vec::new();
    for step in readings.chunks(SENSORS) {
        let records: Vec<(String, String)> = step.iter().map(|r| (r.sensor.clone(), r.data.clone())).collect();
        sent.extend(put(&bed.kinesis.client(), stream, &records).await);
    }
    sent
}

/// Runs `window_average` with `args` until 2 s idle (a graceful shutdown, emitting the open
/// windows), and checks that it counted one late reading and one invalid record (those of
/// [`put_late_and_invalid`]).
pub async fn restart_until_idle(bed: &TestBed, args: &[&str], log: &Path) {
    let mut args = args.to_vec();
    args.extend(["--idle-exit", "2"]);
    run_to_success(example(bed, "window_average", &args, log), log, Duration::from_secs(40)).await;
    let summary = std::fs::read_to_string(log.with_extension("out")).unwrap();
    assert!(summary.contains(", 1 late, 1 invalid;"), "one late reading and one invalid record\n{summary}");
}

/// A late reading (for the first window, closed long since) and a record that is not a reading.
pub async fn put_late_and_invalid(bed: &TestBed, stream: &str) -> Vec<Sent> {
    let late = format!(r#"{{"sensor":"s-0","temperature":99.9,"ts":{}}}"#, BASE_TS + 100);
    put(&bed.kinesis.client(), stream, &[("s-0".into(), late), ("s-1".into(), "not a reading".into())]).await
}

/// Every output record so far.
pub async fn outputs(bed: &TestBed, stream: &str) -> Outputs {
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

/// Waits until every sensor's windows starting at `starts` are emitted and both shards are
/// checkpointed (at a sequence number).
pub async fn wait_for_windows(
    bed: &TestBed,
    output: &str,
    leases: &LeaseTable,
    child: &mut tokio::process::Child,
    log: &Path,
    starts: &[i64],
) {
    let started = Instant::now();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("window_average exited early ({status})\n{}", logs(log));
        }
        let emitted = outputs(bed, output).await.keys().filter(|(_, start)| starts.contains(start)).count();
        let checkpointed = leases
            .list()
            .await
            .map(|l| l.iter().filter(|l| matches!(l.checkpoint.position, Position::Sequence(_))).count())
            .unwrap_or(0);
        if emitted == SENSORS * starts.len() && checkpointed == 2 {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "windows {starts:?} not emitted within 20 s\n{}",
            logs(log)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The (count, sum) of every window `[k*slide, k*slide + window)` with readings, summed in the
/// order each sensor's readings were put.
pub fn expected<'a>(
    readings: impl IntoIterator<Item = &'a Reading>,
    window_ms: i64,
    slide_ms: i64,
) -> BTreeMap<(String, i64), (u64, f64)> {
    let mut expected: BTreeMap<(String, i64), (u64, f64)> = BTreeMap::new();
    for reading in readings {
        let newest = reading.ts.div_euclid(slide_ms) * slide_ms;
        for k in 0..window_ms / slide_ms {
            let entry = expected.entry((reading.sensor.clone(), newest - k * slide_ms)).or_insert((0, 0.0));
            entry.0 += 1;
            entry.1 += reading.temperature;
        }
    }
    expected
}

/// Checks that the output has exactly the expected windows, each record of each with its exact
/// count and average; returns how many were emitted more than once.
pub fn assert_exact(
    got: &Outputs,
    expected: &BTreeMap<(String, i64), (u64, f64)>,
    window_ms: i64,
    log: &Path,
) -> usize {
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>(),
        "one window per sensor and window start with readings\n{}",
        logs(log)
    );
    for (key, (count, sum)) in expected {
        let average = sum / *count as f64;
        for emitted in &got[key] {
            assert_eq!(emitted.end, key.1 + window_ms, "{key:?}: the window's end");
            assert_eq!(
                (emitted.count, emitted.average),
                (*count, average),
                "{key:?}: count and average (all records: {:?})\n{}",
                got[key],
                logs(log)
            );
        }
    }
    got.values().map(|v| v.len() - 1).sum()
}
