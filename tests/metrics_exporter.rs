//! The `metrics` exporters of the producer and the consumer (their `metrics` features, which the
//! facade's dev-dependencies turn on), on the embedded emulators, read back from what the
//! Prometheus recorder renders; and the `prometheus` example, run as a child process and scraped
//! over HTTP.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kinesis::consumer::{Batch, Checkpointer, InitialPosition, Processor, Scheduler, SchedulerConfig};
use kinesis::producer::{Faults, MemoryTransport, Producer, UserRecord};
use kinesis_testkit::{TestBed, list_all_shards, unique_name};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusRecorder};

type Result<T = ()> = std::result::Result<T, Box<dyn std::error::Error>>;

const THROTTLED: &str = "ProvisionedThroughputExceededException";

/// One line of a Prometheus text page: `name{label="value",...} value`.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// The samples of a Prometheus text page (comments and blank lines skipped).
fn parse(page: &str) -> Vec<Sample> {
    let mut samples = Vec::new();
    for line in page.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no value in {line:?}"));
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("bad value in {line:?}"));
        let (name, labels) = match series.split_once('{') {
            None => (series.to_owned(), BTreeMap::new()),
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').unwrap_or_else(|| panic!("unclosed labels in {line:?}"));
                (name.to_owned(), parse_labels(body, line))
            }
        };
        samples.push(Sample { name, labels, value });
    }
    samples
}

/// `key="value",key="value"`, values with `\"` and `\\` escapes.
fn parse_labels(mut body: &str, line: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    while !body.is_empty() {
        let (key, rest) = body.split_once("=\"").unwrap_or_else(|| panic!("bad label in {line:?}"));
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next() {
                Some((_, '\\')) => value.extend(chars.next().map(|(_, c)| c)),
                Some((i, '"')) => break i,
                Some((_, c)) => value.push(c),
                None => panic!("unterminated label value in {line:?}"),
            }
        };
        labels.insert(key.to_owned(), value);
        body = rest[end + 1..].trim_start_matches(',');
    }
    labels
}

/// The samples named `name` whose labels include `labels`.
fn find<'a>(samples: &'a [Sample], name: &str, labels: &[(&str, &str)]) -> Vec<&'a Sample> {
    samples
        .iter()
        .filter(|s| s.name == name && labels.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v)))
        .collect()
}

/// The value of the one sample named `name` whose labels include `labels`.
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    match find(samples, name, labels)[..] {
        [sample] => sample.value,
        ref found => panic!("{} samples of {name} with {labels:?}, not one: {found:?}", found.len()),
    }
}

fn render(recorder: &PrometheusRecorder) -> Vec<Sample> {
    parse(&recorder.handle().render())
}

/// Counts what it is given; checkpoints every batch.
struct Checkpointing;

impl Processor for Checkpointing {
    async fn process_records(&mut self, _batch: Batch, checkpointer: &mut Checkpointer) {
        checkpointer.checkpoint().await.expect("one worker: the lease stays");
    }
    async fn shard_ended(&mut self, checkpointer: &mut Checkpointer) {
        checkpointer.checkpoint().await.ok();
    }
}

fn worker_config(stream: &str, application: &str) -> SchedulerConfig {
    let mut config = SchedulerConfig::new(stream, application);
    config.worker_id = "worker-1".to_owned();
    config.initial_position = InitialPosition::TrimHorizon;
    config.failover = Duration::from_secs(2);
    config.polling.idle_time_between_reads = Duration::from_millis(200);
    config
}

/// Waits until the worker's metrics count `records` processed records.
async fn processed(worker: &Scheduler, records: u64) {
    let deadline = Instant::now() + Duration::from_secs(90);
    while worker.metrics().records_processed < records {
        assert!(Instant::now() < deadline, "not every record processed within 90 s: {:?}", worker.metrics());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Puts `count` records over 100 partition keys; returns the bytes put (partition keys + data) and
/// the data bytes.
async fn put(producer: &Producer, count: usize) -> Result<(u64, u64)> {
    let (mut total, mut data_bytes) = (0, 0);
    let mut receipts = Vec::with_capacity(count);
    for i in 0..count {
        let (key, data) = (format!("key-{}", i % 100), format!("record {i:06}"));
        total += (key.len() + data.len()) as u64;
        data_bytes += data.len() as u64;
        receipts.push(producer.put(UserRecord::new(key, data)).await?);
    }
    for receipt in receipts {
        receipt.await?;
    }
    Ok((total, data_bytes))
}

#[tokio::test]
async fn snapshots_are_published_under_the_kpl_kcl_and_cloudwatch_names() -> Result {
    const RECORDS: usize = 2_000;
    let bed = TestBed::start().await?;
    let stream = bed.kinesis.create_stream(4).await?;
    let shards: BTreeSet<String> =
        list_all_shards(&bed.kinesis.client(), &stream).await?.into_iter().map(|s| s.shard_id).collect();

    let producer = Producer::builder(bed.kinesis.client(), &stream).build()?;
    let (bytes_put, data_bytes) = put(&producer, RECORDS).await?;
    producer.flush().await; // UserRecordsPending is exact after a flush
    let snapshot = producer.metrics();
    let recorder = PrometheusBuilder::new().build_recorder();
    metrics::with_local_recorder(&recorder, || snapshot.publish(&[("stream", &stream)]));
    let page = render(&recorder);
    let at = |name: &str| value(&page, name, &[("stream", &stream)]);

    let records = RECORDS as f64;
    assert_eq!(at("UserRecordsReceived"), records);
    assert_eq!(at("UserRecordsPut"), records);
    assert_eq!(at("UserRecordsPending"), 0.0);
    assert_eq!(at("UserRecordsDataPut"), bytes_put as f64);
    let kinesis_records = at("KinesisRecordsPut");
    assert_eq!(kinesis_records, snapshot.kinesis_records_put as f64);
    assert!(kinesis_records > 0.0 && kinesis_records < records, "aggregated: {kinesis_records} Kinesis records");
    assert_eq!(at("IncomingRecords"), kinesis_records);
    assert_eq!(at("PutRecords_SuccessfulRecords"), kinesis_records);
    assert_eq!(at("IncomingBytes"), at("KinesisRecordsDataPut"));
    assert_eq!(at("IncomingBytes"), snapshot.kinesis_records_data_put as f64);
    // Nothing refused: every call stored something.
    assert!(at("PutRecordsRequests") >= 1.0);
    assert_eq!(at("PutRecords_Success"), at("PutRecordsRequests"));
    assert_eq!(at("PutRecords_ThrottledRecords"), 0.0);
    assert_eq!(at("AllErrors"), 0.0);
    assert!(find(&page, "ErrorsByCode", &[]).is_empty());
    assert_eq!(at("UserRecordsPerKinesisRecord"), snapshot.user_records_per_kinesis_record());

    let application = unique_name("metrics-app");
    let worker = Scheduler::start(
        bed.kinesis.client(),
        bed.dynamodb.client(),
        worker_config(&stream, &application),
        |_: &str| Checkpointing,
    )?;
    processed(&worker, RECORDS as u64).await;
    let snapshot = worker.metrics();
    let labels = [("stream", stream.as_str()), ("application", application.as_str()), ("worker", "worker-1")];
    metrics::with_local_recorder(&recorder, || snapshot.publish(&labels));
    let page = render(&recorder);
    let at = |name: &str| value(&page, name, &labels);

    assert_eq!(at("RecordsProcessed"), records);
    assert_eq!(at("DataBytesProcessed"), data_bytes as f64);
    assert_eq!(at("CurrentLeases"), 4.0);
    // In 3.x lease management (the default) the leader assigns the leases and the worker finds
    // them; in 2.x it takes them.
    assert_eq!(at("TakenLeases") + at("DiscoveredLeases"), 4.0);
    assert_eq!(at("DiscoveredLeases"), snapshot.leases_discovered as f64);
    // Renewals and checkpoints are UpdateItems, counted by operation.
    let updates = value(&page, "DynamoDbRequests", &[labels[0], labels[1], labels[2], ("operation", "UpdateItem")]);
    assert!(updates >= 4.0, "UpdateItem requests: {updates}");
    assert_eq!(updates, snapshot.dynamodb_requests["UpdateItem"] as f64);
    assert_eq!(at("LostLeases"), 0.0);
    assert!(at("Checkpoints") >= 4.0, "a checkpoint a batch, at least one batch a shard");
    assert!(at("GetRecordsCalls") >= 4.0);
    // Every shard was read, so each has its MillisBehindLatest, labelled with its id.
    let lags = find(&page, "MillisBehindLatest", &labels);
    let lagging: BTreeSet<String> = lags.iter().map(|s| s.labels["shard_id"].clone()).collect();
    assert_eq!(lagging, shards);
    let slowest = lags.iter().map(|s| s.value).fold(f64::MIN, f64::max);
    assert_eq!(at("GetRecords_IteratorAgeMilliseconds"), slowest);
    assert_eq!(slowest, *snapshot.millis_behind_latest.values().max().expect("four shards") as f64);

    worker.shutdown().await?;
    producer.shutdown().await;
    Ok(())
}

/// Waits until the recorder has a sample of `name` with `labels` (the publisher's first one).
async fn published(recorder: &PrometheusRecorder, name: &str, labels: &[(&str, &str)]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while find(&render(recorder), name, labels).is_empty() {
        assert!(Instant::now() < deadline, "nothing published as {name} {labels:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The publishers run on this test's thread (the default runtime has one), so a local recorder
/// sees them. The producers' publishers have a period of an hour: all they publish is the first
/// snapshot and the last one.
#[tokio::test]
async fn publishers_publish_at_once_and_a_last_time_when_what_they_watch_stops() -> Result {
    const RECORDS: usize = 500;
    const HOUR: Duration = Duration::from_secs(3600);
    const GUARD: Duration = Duration::from_secs(60); // against a hang, not a timing
    let recorder = PrometheusBuilder::new().build_recorder();
    let _local = metrics::set_default_local_recorder(&recorder);
    let bed = TestBed::start().await?;
    let stream = bed.kinesis.create_stream(2).await?;

    // A producer shut down.
    let producer = Producer::builder(bed.kinesis.client(), &stream).build()?;
    let publisher = producer.spawn_metrics_publisher(HOUR);
    published(&recorder, "UserRecordsPut", &[("stream", &stream)]).await;
    assert_eq!(value(&render(&recorder), "UserRecordsPut", &[("stream", &stream)]), 0.0);
    put(&producer, RECORDS).await?;
    assert_eq!(value(&render(&recorder), "UserRecordsPut", &[("stream", &stream)]), 0.0, "not an hour yet");
    producer.shutdown().await;
    tokio::time::timeout(GUARD, publisher).await.expect("the publisher stops with its producer")?;
    assert_eq!(value(&render(&recorder), "UserRecordsPut", &[("stream", &stream)]), RECORDS as f64);

    // A worker shut down, publishing every 200 ms meanwhile.
    let application = unique_name("metrics-app");
    let worker = Scheduler::start(
        bed.kinesis.client(),
        bed.dynamodb.client(),
        worker_config(&stream, &application),
        |_: &str| Checkpointing,
    )?;
    let publisher = worker.spawn_metrics_publisher(Duration::from_millis(200));
    let labels = [("stream", stream.as_str()), ("application", application.as_str()), ("worker", "worker-1")];
    processed(&worker, RECORDS as u64).await;
    let deadline = Instant::now() + GUARD;
    while find(&render(&recorder), "MillisBehindLatest", &labels).len() < 2 {
        assert!(Instant::now() < deadline, "no MillisBehindLatest for both shards");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    worker.shutdown().await?;
    tokio::time::timeout(GUARD, publisher).await.expect("the publisher stops with its worker")?;
    let page = render(&recorder);
    assert_eq!(value(&page, "RecordsProcessed", &labels), RECORDS as f64);
    assert_eq!(value(&page, "CurrentLeases", &labels), 0.0, "released at shutdown");
    // The shards it read are not lagging on its account any more.
    let lags = find(&page, "MillisBehindLatest", &labels);
    assert_eq!(lags.len(), 2, "{lags:?}");
    assert!(lags.iter().all(|s| s.value == 0.0), "{lags:?}");
    assert_eq!(value(&page, "GetRecords_IteratorAgeMilliseconds", &labels), 0.0);

    // A producer whose handles are all dropped, on a memory stream that refuses every other
    // Kinesis record as throttled: the retried records get through, and the throttling shows.
    let memory = MemoryTransport::new(2);
    memory.set_faults(Faults::RejectEveryNth(2, THROTTLED.to_owned()));
    let producer = Producer::builder_with_transport(memory).build()?;
    let publisher = producer.spawn_metrics_publisher(HOUR);
    put(&producer, RECORDS).await?;
    drop(producer);
    tokio::time::timeout(GUARD, publisher).await.expect("the publisher stops once the handles are gone")?;
    let page = render(&recorder);
    let at = |name: &str| value(&page, name, &[("stream", "memory")]);
    assert_eq!(at("UserRecordsPut"), RECORDS as f64);
    let throttled = at("PutRecords_ThrottledRecords");
    assert!(throttled > 0.0);
    assert_eq!(value(&page, "ErrorsByCode", &[("stream", "memory"), ("error_code", THROTTLED)]), throttled);
    assert_eq!(at("AllErrors"), throttled);
    assert!(at("RetriesPerRecord") >= throttled, "every member of a refused record is retried");
    assert!(at("PutRecords_Success") <= at("PutRecordsRequests"));
    Ok(())
}

/// The example binary, next to this test's: `target/<profile>/deps/<test>` and
/// `target/<profile>/examples/prometheus`. `cargo test` builds the package's examples before it
/// runs any test, unless targets are selected (`--test`): then `cargo build --example prometheus`.
fn example_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("the test's path");
    let profile = exe.parent().and_then(|deps| deps.parent()).expect("target/<profile>/deps/<test>");
    let binary = profile.join("examples").join(format!("prometheus{}", std::env::consts::EXE_SUFFIX));
    assert!(
        binary.exists(),
        "{} is missing: run `cargo test` without selecting targets, or `cargo build --example prometheus` first",
        binary.display()
    );
    binary
}

/// Kills the child when the test ends early.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One HTTP/1.1 GET over a plain TCP connection: (status line, headers, body).
fn get(address: &str, path: &str) -> std::io::Result<(String, String, String)> {
    let mut connection = TcpStream::connect(address)?;
    connection.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(connection, "GET {path} HTTP/1.1\r\nHost: {address}\r\nAccept: text/plain\r\n\r\n")?;
    let mut response = String::new();
    connection.read_to_string(&mut response)?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    Ok((status.to_owned(), headers.to_owned(), body.to_owned()))
}

#[test]
fn the_prometheus_example_serves_the_metrics_page() {
    let mut child = Command::new(example_binary())
        .args(["--port", "0", "--duration", "20", "--rate", "200"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the example");
    let stdout = child.stdout.take().expect("piped");
    let mut child = Killed(child);
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut output = Vec::new();
    let url = loop {
        let line = lines.recv_timeout(Duration::from_secs(60)).expect("the example prints its URL");
        output.push(line.clone());
        if let Some(url) = line.strip_prefix("metrics at ") {
            break url.to_owned();
        }
    };
    let address = url
        .strip_prefix("http://")
        .and_then(|rest| rest.strip_suffix("/metrics"))
        .unwrap_or_else(|| panic!("not a metrics URL: {url}"))
        .to_owned();

    // Scrape until the consumer has processed something.
    let deadline = Instant::now() + Duration::from_secs(60);
    let (headers, page) = loop {
        assert!(child.0.try_wait().expect("the child's status").is_none(), "the example ended early: {output:?}");
        let (status, headers, body) = get(&address, "/metrics").expect("GET /metrics");
        assert_eq!(status, "HTTP/1.1 200 OK");
        let page = parse(&body);
        if find(&page, "RecordsProcessed", &[]).first().is_some_and(|s| s.value > 0.0) {
            break (headers, page);
        }
        assert!(Instant::now() < deadline, "nothing processed after 60 s: {body}");
        std::thread::sleep(Duration::from_millis(250));
    };
    assert!(headers.to_ascii_lowercase().contains("content-type: text/plain"), "{headers}");
    for name in ["UserRecordsPut", "KinesisRecordsPut", "IncomingRecords", "IncomingBytes", "PutRecords_Success"] {
        let samples = find(&page, name, &[]);
        assert!(samples.len() == 1 && samples[0].value > 0.0 && samples[0].labels.contains_key("stream"), "{name}");
    }
    for name in ["PutRecords_ThrottledRecords", "LostLeases", "GetRecords_IteratorAgeMilliseconds"] {
        assert_eq!(find(&page, name, &[]).len(), 1, "{name}");
    }
    assert!(value(&page, "CurrentLeases", &[("worker", "worker-1")]) > 0.0);
    assert!(find(&page, "MillisBehindLatest", &[]).iter().all(|s| s.labels["shard_id"].starts_with("shardId-")));
    assert!(!find(&page, "MillisBehindLatest", &[]).is_empty());
    let (status, _, _) = get(&address, "/").expect("GET /");
    assert_eq!(status, "HTTP/1.1 404 Not Found");

    // It ends by itself after --duration, gracefully.
    let deadline = Instant::now() + Duration::from_secs(90);
    let status = loop {
        if let Some(status) = child.0.try_wait().expect("the child's status") {
            break status;
        }
        assert!(Instant::now() < deadline, "the example did not end after --duration");
        std::thread::sleep(Duration::from_millis(200));
    };
    output.extend(lines.try_iter());
    assert!(status.success(), "{status}: {output:?}");
    assert!(output.iter().any(|l| l == "shutting down"), "{output:?}");
}
