//! Debug and Display of the library's handles, configs and errors never print credentials: the
//! secret access key and the session token stay out of every log line, whatever fails.

use std::time::Duration;

use kinesis::consumer::{LeaseTable, Scheduler, SchedulerConfig};
use kinesis::producer::{Producer, ProducerConfig, UserRecord};

const SECRET: &str = "wJalrXUtnFEMI-this-secret-must-not-print";
const TOKEN: &str = "FwoGZXIvYXdzE-this-session-token-must-not-print";

/// Clients that sign with known secrets and talk to a port where nothing listens.
fn clients() -> (aws_sdk_kinesis::Client, aws_sdk_dynamodb::Client) {
    let kinesis = aws_sdk_kinesis::config::Builder::new()
        .behavior_version(aws_sdk_kinesis::config::BehaviorVersion::latest())
        .region(aws_sdk_kinesis::config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_kinesis::config::Credentials::new(
            "AKIDEXAMPLE",
            SECRET,
            Some(TOKEN.to_owned()),
            None,
            "test",
        ))
        .endpoint_url("http://127.0.0.1:9")
        .build();
    let dynamodb = aws_sdk_dynamodb::config::Builder::new()
        .behavior_version(aws_sdk_dynamodb::config::BehaviorVersion::latest())
        .region(aws_sdk_dynamodb::config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_dynamodb::config::Credentials::new(
            "AKIDEXAMPLE",
            SECRET,
            Some(TOKEN.to_owned()),
            None,
            "test",
        ))
        .endpoint_url("http://127.0.0.1:9")
        .build();
    (aws_sdk_kinesis::Client::from_conf(kinesis), aws_sdk_dynamodb::Client::from_conf(dynamodb))
}

fn assert_clean(what: &str, text: &str) {
    assert!(!text.is_empty(), "{what} printed nothing");
    assert!(!text.contains(SECRET), "{what} printed the secret access key: {text}");
    assert!(!text.contains(TOKEN), "{what} printed the session token: {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handles_configs_and_errors_never_print_credentials() {
    let (kinesis, dynamodb) = clients();

    // The producer, its config, and the error of a record that could not be delivered.
    let config = ProducerConfig { record_ttl: Duration::from_secs(1), ..Default::default() };
    assert_clean("ProducerConfig", &format!("{config:?}"));
    let producer = Producer::builder(kinesis.clone(), "stream").config(config).build().expect("producer");
    assert_clean("Producer", &format!("{producer:?}"));
    let receipt = producer.put(UserRecord::new("key", "data")).await.expect("buffered");
    let error = receipt.await.expect_err("nothing listens: the record expires");
    assert_clean("DeliveryError (Debug)", &format!("{error:?}"));
    assert_clean("DeliveryError (Display)", &format!("{error}"));
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        assert_clean("a cause of DeliveryError", &format!("{cause:?} / {cause}"));
        source = cause.source();
    }
    let refused = producer.put(UserRecord::new("", "data")).await.expect_err("an empty key is refused");
    assert_clean("PutError", &format!("{refused:?} / {refused}"));
    producer.shutdown().await;

    // The consumer: its config, the lease table handle and its error, a running scheduler.
    let config = SchedulerConfig::new("stream", "app");
    assert_clean("SchedulerConfig", &format!("{config:?}"));
    let table = LeaseTable::new(dynamodb.clone(), "app");
    assert_clean("LeaseTable", &format!("{table:?}"));
    let error = table.list().await.expect_err("nothing listens");
    assert_clean("LeaseTableError", &format!("{error:?} / {error}"));
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        assert_clean("a cause of LeaseTableError", &format!("{cause:?} / {cause}"));
        source = cause.source();
    }
    let scheduler = Scheduler::start(kinesis, dynamodb, config, |_: &str| Nothing).expect("scheduler");
    assert_clean("Scheduler", &format!("{scheduler:?}"));
    scheduler.abort();
}

struct Nothing;

impl kinesis::consumer::Processor for Nothing {
    async fn process_records(
        &mut self,
        _batch: kinesis::consumer::Batch,
        _checkpointer: &mut kinesis::consumer::Checkpointer,
    ) {
    }

    async fn shard_ended(&mut self, checkpointer: &mut kinesis::consumer::Checkpointer) {
        let _ = checkpointer.checkpoint().await;
    }
}
