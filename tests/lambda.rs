//! `examples/lambda_deaggregate.rs`'s handler, in-process: on the sample Kinesis event of the AWS
//! Lambda documentation, and on an event made, as Lambda makes it, of the Kinesis records our
//! producer wrote to the embedded Kinesis (aggregated, compressed, and one plain record).

#[allow(dead_code)] // its `main` runs the Lambda runtime; the tests call its handler
#[path = "../examples/lambda_deaggregate.rs"]
mod example;

use std::collections::BTreeMap;

use base64::Engine as _;
use kinesis::aggregation::lambda::{KinesisEvent, LambdaUserRecord};
use kinesis::producer::{Producer, ProducerConfig, UserRecord};
use kinesis_testkit::{Kinesis, ReadRecord, read_stream};

/// The example Kinesis event of the AWS Lambda developer guide ("Using Lambda with Kinesis"), two
/// plain records, written out here.
const AWS_SAMPLE: &str = r#"{
  "Records": [
    {
      "kinesis": {
        "kinesisSchemaVersion": "1.0",
        "partitionKey": "1",
        "sequenceNumber": "49590338271490256608559692538361571095921575989136588898",
        "data": "SGVsbG8sIHRoaXMgaXMgYSB0ZXN0Lg==",
        "approximateArrivalTimestamp": 1545084650.987
      },
      "eventSource": "aws:kinesis",
      "eventVersion": "1.0",
      "eventID": "shardId-000000000006:49590338271490256608559692538361571095921575989136588898",
      "eventName": "aws:kinesis:record",
      "invokeIdentityArn": "arn:aws:iam::123456789012:role/lambda-role",
      "awsRegion": "us-east-2",
      "eventSourceARN": "arn:aws:kinesis:us-east-2:123456789012:stream/lambda-stream"
    },
    {
      "kinesis": {
        "kinesisSchemaVersion": "1.0",
        "partitionKey": "1",
        "sequenceNumber": "49590338271490256608559692540925702759324208523137515618",
        "data": "VGhpcyBpcyBvbmx5IGEgdGVzdC4=",
        "approximateArrivalTimestamp": 1545084711.166
      },
      "eventSource": "aws:kinesis",
      "eventVersion": "1.0",
      "eventID": "shardId-000000000006:49590338271490256608559692540925702759324208523137515618",
      "eventName": "aws:kinesis:record",
      "invokeIdentityArn": "arn:aws:iam::123456789012:role/lambda-role",
      "awsRegion": "us-east-2",
      "eventSourceARN": "arn:aws:kinesis:us-east-2:123456789012:stream/lambda-stream"
    }
  ]
}"#;

#[tokio::test]
async fn the_aws_sample_event_is_read_whole_and_nothing_fails() {
    let event: KinesisEvent = serde_json::from_str(AWS_SAMPLE).expect("the AWS sample event");
    let mut seen = Vec::new();
    let response = example::handle(&event, |r| {
        seen.push((String::from_utf8(r.data.to_vec()).unwrap(), r.sub_sequence_number, r.aggregated));
        example::process(r)
    });
    assert!(response.batch_item_failures.is_empty(), "{response:?}");
    assert_eq!(seen, [("Hello, this is a test.".into(), 0, false), ("This is only a test.".into(), 0, false)]);
    // The handler the Lambda runtime calls gives the same answer.
    let through_runtime = example::handler(lambda_runtime::LambdaEvent::new(event, Default::default())).await.unwrap();
    assert_eq!(through_runtime, response);
    let json = serde_json::to_value(&through_runtime).unwrap();
    assert_eq!(json, serde_json::json!({ "batchItemFailures": [] }));
}

/// An event as Lambda builds it from Kinesis records.
fn lambda_event(records: &[ReadRecord], stream: &str) -> KinesisEvent {
    let records: Vec<serde_json::Value> = records
        .iter()
        .map(|r| {
            let arrival =
                r.approximate_arrival.expect("an arrival time").duration_since(std::time::UNIX_EPOCH).unwrap();
            serde_json::json!({
                "kinesis": {
                    "kinesisSchemaVersion": "1.0",
                    "partitionKey": r.partition_key,
                    "sequenceNumber": r.sequence_number,
                    "data": base64::engine::general_purpose::STANDARD.encode(&r.data),
                    "approximateArrivalTimestamp": arrival.as_secs_f64()
                },
                "eventSource": "aws:kinesis",
                "eventVersion": "1.0",
                "eventID": format!("{}:{}", r.shard_id, r.sequence_number),
                "eventName": "aws:kinesis:record",
                "invokeIdentityArn": "arn:aws:iam::123456789012:role/lambda-role",
                "awsRegion": "us-east-1",
                "eventSourceARN": format!("arn:aws:kinesis:us-east-1:123456789012:stream/{stream}")
            })
        })
        .collect();
    serde_json::from_value(serde_json::json!({ "Records": records })).expect("a Lambda Kinesis event")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_producers_records_come_out_whole_and_a_failure_names_its_kinesis_record() {
    let kinesis = Kinesis::start().await.expect("start Kinesis (embedded ferrokinesis)");
    let stream = kinesis.create_stream(1).await.unwrap();
    // 500 records aggregated, 200 aggregated and compressed, then a plain put of one record that
    // is not UTF-8 (the example's failure) and 10 more.
    let mut sent: Vec<(String, Vec<u8>)> = Vec::new();
    for (count, compression) in [(500, false), (200, true)] {
        let config = ProducerConfig { compression, ..Default::default() };
        let producer = Producer::builder(kinesis.client(), stream.clone()).config(config).build().unwrap();
        let mut receipts = Vec::new();
        for i in 0..count {
            let (key, data) = (format!("user-{}", i % 37), format!("compressed-{compression}-{i}").into_bytes());
            receipts.push(producer.put(UserRecord::new(key.clone(), data.clone())).await.unwrap());
            sent.push((key, data));
        }
        for receipt in receipts {
            receipt.await.expect("delivered");
        }
        producer.shutdown().await;
    }
    let put = |key: &str, data: &[u8]| {
        kinesis
            .client()
            .put_record()
            .stream_name(&stream)
            .partition_key(key)
            .data(aws_sdk_kinesis::primitives::Blob::new(data))
            .send()
    };
    put("bad", &[0xff, 0xfe]).await.unwrap();
    for i in 0..10 {
        put("after", format!("after-{i}").as_bytes()).await.unwrap();
    }

    let read = read_stream(&kinesis.client(), &stream).await.unwrap();
    assert!(read.len() < sent.len(), "the producer aggregated: {} Kinesis records", read.len());
    let event = lambda_event(&read, &stream);
    let mut processed: Vec<LambdaUserRecord> = Vec::new();
    let response = example::handle(&event, |r| {
        example::process(r)?;
        processed.push(r.clone());
        Ok::<_, std::str::Utf8Error>(())
    });

    // Every record our producer wrote, once, in order per key, with its own partition key.
    let got: Vec<(String, Vec<u8>)> = processed.iter().map(|r| (r.partition_key.clone(), r.data.to_vec())).collect();
    fn per_key(records: &[(String, Vec<u8>)]) -> BTreeMap<&str, Vec<&[u8]>> {
        records.iter().fold(BTreeMap::new(), |mut m, (k, d)| {
            m.entry(k.as_str()).or_default().push(d.as_slice());
            m
        })
    }
    assert_eq!(got.len(), sent.len(), "each user record once, up to the failure");
    assert_eq!(per_key(&got), per_key(&sent), "in order per key, with its own partition key");
    assert!(processed.iter().any(|r| r.aggregated && r.sub_sequence_number > 0));
    // Sub-sequence numbers count 0.. within each Kinesis record.
    let mut by_record: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for r in &processed {
        by_record.entry(&r.sequence_number).or_default().push(r.sub_sequence_number);
    }
    assert!(by_record.values().all(|subs| subs.iter().copied().eq(0..subs.len() as u64)));

    // The failure names the bad record's Kinesis sequence number; nothing after it was processed.
    let bad = read.iter().find(|r| r.partition_key == "bad").unwrap();
    let json = serde_json::to_value(&response).unwrap();
    assert_eq!(json, serde_json::json!({ "batchItemFailures": [{ "itemIdentifier": bad.sequence_number }] }));
    assert!(processed.iter().all(|r| r.partition_key != "after"), "the batch stops at the failure");
}
