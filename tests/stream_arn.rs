//! Streams named by ARN (issue 15), against an endpoint that requires `StreamARN`.
//!
//! Reading or writing another account's stream (Kinesis resource policies) needs every call to
//! name the stream by ARN: named by its name, the stream is looked for in the caller's own
//! account, and AWS answers `ResourceNotFoundException`. A fault proxy in front of kinesis-local
//! plays that endpoint: each call that names a stream and lacks `"StreamARN"` gets that answer.
//!
//! kinesis-local, not the embedded ferrokinesis: ferrokinesis 0.7 takes `StreamARN` on PutRecords
//! only, and answers ListShards, GetShardIterator and DescribeStreamSummary by stream name alone.
//! Without node and npm this test fails, saying how to install them.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kinesis::consumer::{Batch, Checkpointer, InitialPosition, Processor, Scheduler, SchedulerConfig};
use kinesis::producer::{BuildError, Producer, UserRecord};
use kinesis_testkit::{DynamoDb, Fault, FaultProxy, Kinesis, KinesisLocal, Rule, unique_name};
use tokio::time::Instant;

/// The Kinesis operations our producer and consumer make that name a stream.
const NAMING_A_STREAM: [&str; 5] =
    ["PutRecords", "ListShards", "GetShardIterator", "GetRecords", "DescribeStreamSummary"];

struct Recorder(Arc<Mutex<BTreeMap<String, usize>>>);

impl Processor for Recorder {
    async fn process_records(&mut self, batch: Batch, checkpointer: &mut Checkpointer) {
        {
            let mut seen = self.0.lock().unwrap();
            for record in &batch.records {
                *seen.entry(String::from_utf8_lossy(&record.data).into_owned()).or_default() += 1;
            }
        }
        let _ = checkpointer.checkpoint().await;
    }

    async fn shard_ended(&mut self, checkpointer: &mut Checkpointer) {
        let _ = checkpointer.checkpoint().await;
    }
}

/// kinesis-local with streams of the given shard counts, behind a proxy that answers every call
/// naming a stream without `StreamARN` with ResourceNotFound; DynamoDB beside it.
struct Checking {
    _local: KinesisLocal,
    dynamodb: DynamoDb,
    proxy: FaultProxy,
    refusals: Vec<Arc<Rule>>,
    /// A client of the proxy.
    client: aws_sdk_kinesis::Client,
    names: Vec<String>,
    arns: Vec<String>,
}

impl Checking {
    async fn start(shard_counts: &[u32]) -> Checking {
        let local = KinesisLocal::start()
            .await
            .expect("kinesis-local must be available for this test (scripts/kinesis-local): ferrokinesis 0.7 does not list shards or give iterators by StreamARN");
        let dynamodb = DynamoDb::start().await.expect("start DynamoDB (embedded dynoxide)");
        let (mut names, mut arns) = (Vec::new(), Vec::new());
        for shards in shard_counts {
            let name = local.create_stream(*shards).await.unwrap();
            let summary = local.client().describe_stream_summary().stream_name(&name).send().await.unwrap();
            arns.push(summary.stream_description_summary().unwrap().stream_arn().to_owned());
            names.push(name);
        }
        let proxy = FaultProxy::start(local.endpoint_url()).await.expect("a proxy in front of kinesis-local");
        let refusals = NAMING_A_STREAM
            .iter()
            .map(|operation| {
                let not_in_this_account = Fault::Error { status: 400, error_type: "ResourceNotFoundException".into() };
                proxy.add(Rule::new(not_in_this_account).on(*operation).lacking("\"StreamARN\""))
            })
            .collect();
        let client = Kinesis::connect(proxy.url()).client();
        Checking { _local: local, dynamodb, proxy, refusals, client, names, arns }
    }

    /// How many calls the proxy refused.
    fn refused(&self) -> u64 {
        self.refusals.iter().map(|r| r.fired()).sum()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_and_a_consumer_by_arn_work_where_every_call_must_carry_it() {
    let bed = Checking::start(&[2]).await;
    let (name, arn, client, proxy) = (bed.names[0].clone(), bed.arns[0].clone(), bed.client.clone(), &bed.proxy);
    let dynamodb = &bed.dynamodb;
    let refused = || bed.refused();

    // The endpoint refuses a stream named by its name: the check can fail.
    let error = client.list_shards().stream_name(&name).send().await.unwrap_err();
    assert!(error.as_service_error().is_some_and(|e| e.is_resource_not_found_exception()), "{error:?}");
    assert_eq!(refused(), 1);

    // Text that is neither a name nor an ARN: a typed error where the producer is built.
    let bad = Producer::builder(client.clone(), "arn:aws:kinesis:us-east-1:12345:stream/x").build().unwrap_err();
    assert!(matches!(bad, BuildError::InvalidStream(_)), "{bad}");

    // By ARN: a producer writes, a consumer reads every record once.
    let producer = Producer::builder(client.clone(), arn.clone()).build().expect("a producer by ARN");
    let mut receipts = Vec::new();
    for i in 0..2_000 {
        let record = UserRecord::new(format!("key-{i}"), format!("record-{i}"));
        receipts.push(producer.put(record).await.expect("buffered"));
    }
    for receipt in receipts {
        receipt.await.expect("delivered to the stream named by ARN");
    }
    producer.shutdown().await;

    let seen = Arc::new(Mutex::new(BTreeMap::new()));
    let mut config = SchedulerConfig::new(arn.clone(), unique_name("by-arn"));
    config.initial_position = InitialPosition::TrimHorizon;
    config.table_create_timeout = Duration::from_secs(30);
    let consumer = Scheduler::start(client.clone(), dynamodb.client(), config, {
        let seen = seen.clone();
        move |_: &str| Recorder(seen.clone())
    })
    .expect("a consumer by ARN");
    let deadline = Instant::now() + Duration::from_secs(90);
    while seen.lock().unwrap().len() < 2_000 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    consumer.shutdown().await.expect("a clean shutdown");

    let seen = seen.lock().unwrap().clone();
    let missing: Vec<String> = (0..2_000).map(|i| format!("record-{i}")).filter(|d| !seen.contains_key(d)).collect();
    assert!(missing.is_empty(), "{} of 2,000 records not read by ARN, e.g. {:?}", missing.len(), missing.first());
    assert!(seen.values().all(|n| *n == 1), "each record once");
    assert_eq!(refused(), 1, "every call by ARN carried StreamARN");
    for operation in NAMING_A_STREAM {
        assert!(
            proxy.requests(operation) > 0,
            "{operation} went through the checking endpoint: {:?}",
            proxy.request_counts()
        );
    }
}

/// Many streams by ARN: one producer writes two streams with `put_to(arn, ..)`, one multi-stream
/// worker reads both, every call carrying StreamARN, each record once and under its stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_stream_producer_and_consumer_by_arn_work_where_every_call_must_carry_it() {
    use kinesis::consumer::{ShardInfo, StreamConfig, StreamTracker};

    let bed = Checking::start(&[2, 1]).await;
    let (arns, client, dynamodb) = (&bed.arns, bed.client.clone(), &bed.dynamodb);

    let producer = Producer::multi_stream(client.clone()).build().expect("a multi-stream producer");
    let mut receipts = Vec::new();
    for i in 0..1_000 {
        let arn = &arns[i % 2];
        receipts
            .push(producer.put_to(arn, UserRecord::new(format!("key-{i}"), format!("{i}"))).await.expect("buffered"));
    }
    for receipt in receipts {
        receipt.await.expect("delivered to the stream named by ARN");
    }
    producer.shutdown().await;

    // (stream named by the batch, data) of every record read.
    let seen: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    struct ByStream(Arc<Mutex<Vec<(String, String)>>>);
    impl Processor for ByStream {
        async fn process_records(&mut self, batch: Batch, checkpointer: &mut Checkpointer) {
            {
                let mut seen = self.0.lock().unwrap();
                for record in &batch.records {
                    seen.push((batch.stream.to_string(), String::from_utf8_lossy(&record.data).into_owned()));
                }
            }
            let _ = checkpointer.checkpoint().await;
        }
        async fn shard_ended(&mut self, checkpointer: &mut Checkpointer) {
            let _ = checkpointer.checkpoint().await;
        }
    }
    struct Factory(Arc<Mutex<Vec<(String, String)>>>);
    impl kinesis::consumer::ProcessorFactory for Factory {
        type Processor = ByStream;
        fn create(&self, _: &str) -> ByStream {
            ByStream(self.0.clone())
        }
        fn create_for(&self, _: &ShardInfo) -> ByStream {
            ByStream(self.0.clone())
        }
    }
    let tracker = StreamTracker::fixed(
        arns.iter().map(|arn| StreamConfig::new(arn.clone(), InitialPosition::TrimHorizon)).collect(),
    );
    let mut config = SchedulerConfig::new_multi_stream(tracker, unique_name("multi-by-arn"));
    config.table_create_timeout = Duration::from_secs(30);
    let consumer = Scheduler::start(client.clone(), dynamodb.client(), config, Factory(seen.clone()))
        .expect("a multi-stream consumer by ARN");
    let deadline = Instant::now() + Duration::from_secs(90);
    while seen.lock().unwrap().len() < 1_000 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    consumer.shutdown().await.expect("a clean shutdown");

    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1_000, "each of 1,000 records read once");
    let names: Vec<&str> = arns.iter().map(|a| a.rsplit('/').next().unwrap()).collect();
    for (stream, data) in &seen {
        let i: usize = data.parse().unwrap();
        assert_eq!(stream, names[i % 2], "record {i} read under the stream it was put to");
    }
    assert_eq!(bed.refused(), 0, "every call by ARN carried StreamARN");
}
