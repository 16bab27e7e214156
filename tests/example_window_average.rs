//! `examples/window_average.rs` (tumbling windows) as a child process on the embedded emulators:
//! the averages it writes to the output stream are exactly the ones computed here, also when it
//! is killed (SIGKILL) with windows open and restarted: its checkpoints never pass a window not
//! yet emitted.

mod example_support;

use example_support::window::{
    BASE_TS, assert_exact, expected, outputs, put_late_and_invalid, put_steps, readings, restart_until_idle,
    wait_for_windows,
};
use example_support::{assert_checkpointed_at_last_records, example, temp_dir};
use kinesis::consumer::LeaseTable;
use kinesis_testkit::{TestBed, unique_name};

const WINDOW_MS: i64 = 10_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn averages_are_exact_across_a_crash_with_windows_open() {
    let bed = TestBed::start().await.expect("start the emulators (ferrokinesis and dynoxide, embedded)");
    let input = bed.kinesis.create_stream(2).await.expect("create the input stream");
    let output = bed.kinesis.create_stream(1).await.expect("create the output stream");
    let table = unique_name("window-test");
    let work = temp_dir("window-test");
    let args = ["--stream", &input, "--output", &output, "--table", &table, "--failover-ms", "1000"];

    // First half: 25 steps, 17.5 s of event time; the windows from 10 s on are still open.
    let first_half = readings(0, 0, 25);
    let mut sent = put_steps(&bed, &input, &first_half).await;
    let first_log = work.join("first");
    let mut first = example(&bed, "window_average", &args, &first_log).spawn().expect("start window_average");
    let leases = LeaseTable::new(bed.dynamodb.client(), &table);
    // Every sensor's first window (0-10 s) is emitted, and both shards are checkpointed.
    wait_for_windows(&bed, &output, &leases, &mut first, &first_log, &[BASE_TS]).await;
    first.kill().await.expect("SIGKILL window_average");
    let before_crash = outputs(&bed, &output).await;
    assert!(
        before_crash.keys().all(|(_, start)| *start == BASE_TS),
        "only the windows the watermark closed were emitted: {:?}",
        before_crash.keys().collect::<Vec<_>>()
    );

    // Second half, a late reading and a record that is not a reading; then the restarted example
    // runs until idle.
    let second_half = readings(0, 25, 50);
    sent.extend(put_steps(&bed, &input, &second_half).await);
    sent.extend(put_late_and_invalid(&bed, &input).await);
    let second_log = work.join("second");
    restart_until_idle(&bed, &args, &second_log).await;

    let expected = expected(first_half.iter().chain(&second_half), WINDOW_MS, WINDOW_MS);
    let duplicates = assert_exact(&outputs(&bed, &output).await, &expected, WINDOW_MS, &second_log);
    println!("{} windows, all exact; {duplicates} emitted twice across the crash", expected.len());
    assert_checkpointed_at_last_records(&leases, &sent).await;
    let _ = std::fs::remove_dir_all(&work);
}
