//! `examples/window_average.rs` with sliding windows (`--window-ms 10000 --slide-ms 5000`: 10 s
//! windows every 5 s) as a child process on the embedded emulators: every window's count and
//! average are exactly the ones computed here, also when it is killed (SIGKILL) with windows open
//! and restarted. A reading belongs to two windows: a restart must neither lose a window not yet
//! emitted nor rebuild an emitted one from a part of its readings (emitting it again, whole and
//! the same, is allowed).

mod example_support;

use std::time::Duration;

use example_support::window::{
    BASE_TS, STEP_MS, assert_exact, expected, outputs, put_late_and_invalid, put_steps, readings, restart_until_idle,
    wait_for_windows,
};
use example_support::{assert_checkpointed_at_last_records, example, temp_dir};
use kinesis::consumer::LeaseTable;
use kinesis_testkit::{TestBed, unique_name};

const WINDOW_MS: i64 = 10_000;
const SLIDE_MS: i64 = 5_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sliding_averages_are_exact_across_a_crash_with_windows_open() {
    let bed = TestBed::start().await.expect("start the emulators (ferrokinesis and dynoxide, embedded)");
    let input = bed.kinesis.create_stream(2).await.expect("create the input stream");
    let output = bed.kinesis.create_stream(1).await.expect("create the output stream");
    let table = unique_name("window-sliding-test");
    let work = temp_dir("window-sliding-test");
    let (window, slide) = (WINDOW_MS.to_string(), SLIDE_MS.to_string());
    let args = [
        "--stream",
        &input,
        "--output",
        &output,
        "--table",
        &table,
        "--failover-ms",
        "1000",
        "--window-ms",
        &window,
        "--slide-ms",
        &slide,
    ];

    // 0 to 12.6 s of event time: the windows starting at -5 s and 0 s close; those at 5 s and
    // 10 s stay open. The checkpoint goes just before the first reading at 5 s or later.
    let first = readings(0, 0, 19);
    let mut sent = put_steps(&bed, &input, &first).await;
    let first_log = work.join("first");
    let mut child = example(&bed, "window_average", &args, &first_log).spawn().expect("start window_average");
    let leases = LeaseTable::new(bed.dynamodb.client(), &table);
    wait_for_windows(&bed, &output, &leases, &mut child, &first_log, &[BASE_TS - SLIDE_MS, BASE_TS]).await;

    // Then a jump of event time to 20 s (to 22.1 s): the windows at 5 s and 10 s close, the one at
    // 15 s stays open with no reading before 20 s. A checkpoint just before the reading at 20 s
    // would resume with 20 s as the oldest window not emitted and lose the one at 15 s: the
    // checkpoint must stay where it was.
    let jump = readings(20_000, 0, 4);
    sent.extend(put_steps(&bed, &input, &jump).await);
    wait_for_windows(&bed, &output, &leases, &mut child, &first_log, &[BASE_TS + SLIDE_MS, BASE_TS + 2 * SLIDE_MS])
        .await;
    // The batch's checkpoint (if it wrote one) is written right after its windows are emitted.
    tokio::time::sleep(Duration::from_secs(1)).await;
    child.kill().await.expect("SIGKILL window_average");
    let before_crash = outputs(&bed, &output).await;
    let watermark = BASE_TS + 20_000 + 3 * STEP_MS;
    assert!(
        before_crash.keys().all(|(_, start)| start + WINDOW_MS <= watermark),
        "only the windows the watermark closed were emitted: {:?}",
        before_crash.keys().collect::<Vec<_>>()
    );

    // The rest, from 22.8 s to 39.6 s, a late reading (its windows closed long since) and a record
    // that is not a reading; then the restarted example runs until idle.
    let rest = readings(20_000, 4, 28);
    sent.extend(put_steps(&bed, &input, &rest).await);
    sent.extend(put_late_and_invalid(&bed, &input).await);
    let second_log = work.join("second");
    restart_until_idle(&bed, &args, &second_log).await;

    let expected = expected(first.iter().chain(&jump).chain(&rest), WINDOW_MS, SLIDE_MS);
    let duplicates = assert_exact(&outputs(&bed, &output).await, &expected, WINDOW_MS, &second_log);
    println!("{} windows, all exact; {duplicates} emitted twice across the crash", expected.len());
    assert_checkpointed_at_last_records(&leases, &sent).await;
    let _ = std::fs::remove_dir_all(&work);
}
