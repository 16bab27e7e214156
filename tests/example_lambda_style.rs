//! `examples/lambda_style.rs` as a child process on the embedded emulators: batches never exceed
//! the batch size, every record is handled once or sent to the on-failure destination, a failed
//! record is retried from where it failed after a checkpoint just before it, and a record that
//! fails every attempt is sent on and skipped.

mod example_support;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use example_support::{Sent, assert_checkpointed_at_last_records, example, logs, put, run_to_success, temp_dir};
use kinesis::consumer::{LeaseTable, cmp_sequence_numbers};
use kinesis_testkit::{TestBed, unique_name};
use serde_json::Value;

const BATCH_SIZE: usize = 8;
const MAX_RETRIES: u64 = 2;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_retries_and_the_on_failure_destination_behave_as_lambda() {
    let bed = TestBed::start().await.expect("start the emulators (ferrokinesis and dynoxide, embedded)");
    let stream = bed.kinesis.create_stream(2).await.expect("create the stream");
    let table = unique_name("lambda-test");
    let work = temp_dir("lambda-test");

    // 120 orders; order 5 fails once, 30 twice (both within the retries), 77 three times (one
    // more than 1 + 2 attempts); and a record that is not an order.
    let fails: HashMap<u64, u64> = HashMap::from([(5, 1), (30, 2), (77, 3)]);
    let mut records: Vec<(String, String)> = (0..120u64)
        .map(|order| {
            let fail = fails.get(&order).copied().unwrap_or(0);
            (format!("customer-{}", order % 7), format!(r#"{{"order":{order},"amount":1.5,"fail":{fail}}}"#))
        })
        .collect();
    records.insert(50, ("customer-3".into(), "garbage".into()));
    let sent = put(&bed.kinesis.client(), &stream, &records).await;
    let by_id: HashMap<&str, &Sent> = sent.iter().map(|s| (s.sequence_number.as_str(), s)).collect();
    let order_of =
        |s: &Sent| -> Option<u64> { serde_json::from_str::<Value>(&s.data).ok().and_then(|v| v["order"].as_u64()) };

    let on_failure = work.join("on-failure.ndjson");
    let on_failure_arg = on_failure.to_string_lossy().into_owned();
    let log = work.join("run");
    let args = [
        "--stream",
        &stream,
        "--table",
        &table,
        "--batch-size",
        "8",
        "--batch-window-ms",
        "300",
        "--max-retries",
        "2",
        "--retry-delay-ms",
        "50",
        "--on-failure",
        &on_failure_arg,
        "--json",
        "--idle-exit",
        "2",
        "--failover-ms",
        "1000",
    ];
    run_to_success(example(&bed, "lambda_style", &args, &log), &log, Duration::from_secs(40)).await;
    let stdout = std::fs::read_to_string(log.with_extension("out")).unwrap();
    let events: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}\n{}", logs(&log))))
        .collect();
    let batches: Vec<&Value> = events.iter().filter(|e| e["event"] == "batch").collect();
    let ids = |e: &Value| -> Vec<String> {
        e["items"].as_array().unwrap().iter().map(|i| i.as_str().unwrap().to_owned()).collect()
    };

    // Batches never exceed the batch size; full ones are made while records wait.
    let sizes: Vec<usize> = batches.iter().map(|b| ids(b).len()).collect();
    assert!(sizes.iter().all(|n| (1..=BATCH_SIZE).contains(n)), "batch sizes {sizes:?}");
    assert!(sizes.contains(&BATCH_SIZE), "records waiting make full batches: {sizes:?}");
    assert!(batches.iter().all(|b| b["size"].as_u64() == Some(ids(b).len() as u64)));

    // What was handled (the items before the failed one), what failed, and how often.
    let mut handled: BTreeMap<String, usize> = BTreeMap::new();
    let mut failed: BTreeMap<String, u64> = BTreeMap::new();
    for batch in &batches {
        let items = ids(batch);
        let n = batch["handled"].as_u64().unwrap() as usize;
        for item in &items[..n] {
            *handled.entry(item.clone()).or_default() += 1;
        }
        match batch["failed"].as_str() {
            Some(item) => {
                assert_eq!(items.get(n).map(String::as_str), Some(item), "the failed item follows the handled ones");
                *failed.entry(item.to_owned()).or_default() += 1;
            }
            None => assert_eq!(n, items.len(), "a batch without a failure is handled whole"),
        }
    }
    let lines: Vec<Value> = std::fs::read_to_string(&on_failure)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line in the on-failure file"))
        .collect();
    let sent_on: BTreeMap<String, u64> =
        lines.iter().map(|l| (l["item"].as_str().unwrap().to_owned(), l["attempts"].as_u64().unwrap())).collect();
    assert_eq!(sent_on.len(), lines.len(), "each record sent on once: {lines:?}");

    for record in &sent {
        let id = record.sequence_number.as_str();
        let fail = order_of(record).map_or(u64::MAX, |o| fails.get(&o).copied().unwrap_or(0));
        if fail <= MAX_RETRIES {
            // Handled once, after failing `fail` times; never sent on.
            assert_eq!(handled.get(id), Some(&1), "{} handled once", record.data);
            assert_eq!(failed.get(id).copied().unwrap_or(0), fail, "{} failed {fail} times", record.data);
            assert!(!sent_on.contains_key(id), "{} was not sent on", record.data);
        } else {
            // Failed 1 + MAX_RETRIES times, sent on, never handled.
            assert!(!handled.contains_key(id), "{} is never handled", record.data);
            assert_eq!(failed.get(id), Some(&(MAX_RETRIES + 1)), "{} failed every attempt", record.data);
            assert_eq!(sent_on.get(id), Some(&(MAX_RETRIES + 1)), "{} sent on after its attempts", record.data);
        }
    }
    assert!(handled.keys().chain(failed.keys()).all(|id| by_id.contains_key(id.as_str())), "only records sent");
    assert_eq!(sent_on.len(), 2, "order 77 and the garbage record");

    // A failed record is retried from where it failed: the shard's next invocation starts with
    // it (one retry more) until it succeeds or is sent on; after that it never comes again.
    let mut by_shard: BTreeMap<&str, Vec<&Value>> = BTreeMap::new();
    for batch in &batches {
        by_shard.entry(batch["shard"].as_str().unwrap()).or_default().push(batch);
    }
    for (shard, invocations) in &by_shard {
        for (i, batch) in invocations.iter().enumerate() {
            let Some(item) = batch["failed"].as_str() else { continue };
            let retry = batch["retry"].as_u64().unwrap();
            let handled_here = batch["handled"].as_u64().unwrap();
            let attempts = if handled_here == 0 { retry + 1 } else { 1 };
            let later: Vec<&&Value> = invocations[i + 1..].iter().collect();
            if attempts > MAX_RETRIES {
                assert!(later.iter().all(|b| !ids(b).iter().any(|id| id == item)), "{shard}: {item} skipped");
            } else {
                let next = later.first().unwrap_or_else(|| panic!("{shard}: {item} is retried"));
                assert_eq!(ids(next)[0], item, "{shard}: the retry starts at the failed record");
                assert_eq!(next["retry"].as_u64(), Some(attempts), "{shard}: the retry count");
            }
        }
        // In the shard's order: an invocation starts after the previous one's last record, or at
        // or after the record it failed on.
        for pair in invocations.windows(2) {
            let next = ids(pair[1]).remove(0);
            match pair[0]["failed"].as_str() {
                Some(item) => assert!(cmp_sequence_numbers(item, &next).is_le(), "{shard}: {next} before {item}"),
                None => {
                    let last = ids(pair[0]).pop().unwrap();
                    assert!(cmp_sequence_numbers(&last, &next).is_lt(), "{shard}: {next} again after {last}");
                }
            }
        }
    }

    // Every record was handled or sent on: each shard is checkpointed at its last record.
    assert_checkpointed_at_last_records(&LeaseTable::new(bed.dynamodb.client(), &table), &sent).await;
    let summary = events.last().expect("a summary");
    assert_eq!(summary["event"], "summary");
    assert_eq!(summary["orders_handled"], 119);
    let _ = std::fs::remove_dir_all(&work);
}
