//! The producer against a real Kinesis server: embedded ferrokinesis from the test bed (or the
//! endpoint in `AWS_ENDPOINT_URL_KINESIS`). Everything put is read back with GetRecords and
//! deaggregated, and checked against the receipts.

use std::collections::HashMap;

use bytes::Bytes;
use kinesis_aggregation::{Deaggregator, HashKeyRange};
use kinesis_producer::{Producer, UserRecord};
use kinesis_testkit::{Kinesis, KinesisOptions, list_all_shards, read_stream};

/// Where each user record was found: data -> (shard, sequence number, sub-sequence number).
/// Every aggregate must be on a shard that holds all its records.
async fn read_back(
    client: &aws_sdk_kinesis::Client,
    stream: &str,
) -> HashMap<Bytes, Vec<(String, String, Option<u64>)>> {
    let (found, dropped) = kcl_view(client, stream).await;
    assert_eq!(dropped, 0, "an aggregate holds a record of another shard");
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_thousand_records_over_eight_shards_all_arrive_where_the_receipts_say() {
    const RECORDS: usize = 200_000;
    let kinesis = Kinesis::start().await.expect("start Kinesis");
    let stream = kinesis.create_stream(8).await.expect("create an 8-shard stream");
    let producer = Producer::builder(kinesis.client(), &stream).build().expect("producer");

    let mut receipts = Vec::with_capacity(RECORDS);
    for i in 0..RECORDS {
        let record = UserRecord::new(format!("device-{}", i % 1_000), format!("reading {i:07}"));
        receipts.push(producer.put(record).await.expect("buffered"));
    }
    producer.flush().await;
    let found = read_back(&kinesis.client(), &stream).await;
    assert_eq!(found.len(), RECORDS, "distinct records read back");
    let mut shards_used = std::collections::HashSet::new();
    for (i, receipt) in receipts.into_iter().enumerate() {
        let receipt = receipt.await.unwrap_or_else(|e| panic!("record {i} failed: {e}"));
        let data = Bytes::from(format!("reading {i:07}"));
        let places = found.get(&data).unwrap_or_else(|| panic!("record {i} never arrived"));
        assert_eq!(places.len(), 1, "record {i} arrived {} times", places.len());
        assert_eq!(
            places[0],
            (receipt.shard_id.to_string(), receipt.sequence_number.to_string(), receipt.aggregated_index)
        );
        shards_used.insert(receipt.shard_id);
    }
    assert_eq!(shards_used.len(), 8);
    let m = producer.metrics();
    assert_eq!(m.user_records_put, RECORDS as u64);
    assert!(m.user_records_per_kinesis_record() > 100.0, "aggregated: {}", m.user_records_per_kinesis_record());
    producer.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_of_three_times_a_throttled_shard_is_all_delivered_with_retries() {
    // ferrokinesis's per-shard limits: 1,000 records/s and 1 MiB/s, per-record throttling.
    let kinesis = Kinesis::start_with(KinesisOptions { enforce_limits: true, ..Default::default() })
        .await
        .expect("start Kinesis with limits");
    let stream = kinesis.create_stream(1).await.expect("create a 1-shard stream");
    let producer = Producer::builder(kinesis.client(), &stream).build().expect("producer");

    // 3 MiB of data at once: three times what the shard takes in a second.
    let payload = vec![b'x'; 1_000];
    let mut receipts = Vec::new();
    for i in 0..3_146 {
        let mut data = format!("{i:06}-").into_bytes();
        data.extend_from_slice(&payload);
        receipts.push(producer.put(UserRecord::new(format!("k{}", i % 50), data)).await.expect("buffered"));
    }
    let mut retried = 0;
    for receipt in receipts {
        let receipt = receipt.await.expect("delivered despite throttling");
        if receipt.attempts.len() > 1 {
            retried += 1;
            assert!(receipt.attempts[0].error_code.is_some());
        }
    }
    let m = producer.metrics();
    assert!(retried > 0, "some records needed more than one attempt");
    assert!(m.errors_by_code.get("ProvisionedThroughputExceededException").copied().unwrap_or(0) > 0, "{m:?}");
    assert!(m.retries > 0);
    assert_eq!(m.user_records_put, 3_146);
    // Retried records are aggregated again, not sent one by one.
    assert!(m.user_records_per_kinesis_record() > 20.0, "{}", m.user_records_per_kinesis_record());
    let found = read_back(&kinesis.client(), &stream).await;
    assert_eq!(found.len(), 3_146);
    assert!(found.values().all(|places| places.len() == 1), "no duplicates");
    producer.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_split_in_the_middle_of_production_loses_nothing() {
    let kinesis = Kinesis::start().await.expect("start Kinesis");
    let stream = kinesis.create_stream(2).await.expect("create a 2-shard stream");
    split_in_the_middle_of_production(kinesis.client(), &stream, 20_000).await;
}

/// The same against kinesis-local, which closes the parent with ChildShards and pages ListShards
/// as the service does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_split_in_the_middle_of_production_loses_nothing_on_kinesis_local() {
    let local = kinesis_testkit::KinesisLocal::start().await.expect("kinesis-local must be available for this test");
    let stream = local.create_stream(2).await.expect("create a 2-shard stream");
    split_in_the_middle_of_production(local.client(), &stream, 6_000).await;
}

/// Produces `records` records to a 2-shard stream, splitting its first shard half way; then reads
/// everything back as the KCL would and checks every receipt against it.
async fn split_in_the_middle_of_production(client: aws_sdk_kinesis::Client, stream: &str, records: usize) {
    let producer = Producer::builder(client.clone(), stream).build().expect("producer");

    let mut receipts = Vec::new();
    for i in 0..records {
        if i == records / 2 {
            producer.flush().await;
            let parent = list_all_shards(&client, stream).await.unwrap().remove(0);
            let middle = parent.starting_hash_key + (parent.ending_hash_key - parent.starting_hash_key) / 2;
            client
                .split_shard()
                .stream_name(stream)
                .shard_to_split(&parent.shard_id)
                .new_starting_hash_key((middle + 1).to_string())
                .send()
                .await
                .expect("SplitShard");
            kinesis_testkit::wait_until_stream_active(&client, stream).await.expect("ACTIVE after the split");
        }
        let record = UserRecord::new(format!("device-{}", i % 500), format!("reading {i:06}"));
        receipts.push(producer.put(record).await.expect("buffered"));
    }
    producer.flush().await;

    // Read as the KCL does: an aggregate holding any sub-record outside its shard is dropped whole.
    let shards = list_all_shards(&client, stream).await.unwrap();
    assert_eq!(shards.len(), 4, "two shards, one split into two");
    let (readable, _) = kcl_view(&client, stream).await;
    for (i, receipt) in receipts.into_iter().enumerate() {
        let receipt = receipt.await.unwrap_or_else(|e| panic!("record {i} failed: {e}"));
        let places = readable.get(format!("reading {i:06}").as_bytes()).unwrap_or_else(|| panic!("record {i} lost"));
        let at = (receipt.shard_id.to_string(), receipt.sequence_number.to_string(), receipt.aggregated_index);
        assert!(places.contains(&at), "record {i}: the receipt points at a readable copy ({at:?} not in {places:?})");
    }
    // The producer did predict the closed parent at first, and recovered: the path was exercised.
    let stale = producer.metrics().errors_by_code.get("StaleShardMap").copied().unwrap_or(0);
    assert!(stale > 0, "no aggregate landed on an unexpected shard; the test proves nothing");
    producer.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordering_mode_under_throttling_keeps_put_order_per_key() {
    let kinesis = Kinesis::start_with(KinesisOptions { enforce_limits: true, ..Default::default() })
        .await
        .expect("start Kinesis with limits");
    let client = kinesis.client();
    let stream = kinesis.create_stream(2).await.expect("create a 2-shard stream");
    let config = kinesis_producer::ProducerConfig { ordering: true, ..Default::default() };
    let producer = Producer::builder(client.clone(), &stream).config(config).build().expect("producer");

    // About 2 MiB per shard at once: twice what a shard takes in a second, so records are throttled.
    // On a machine too busy to put them that fast, another round follows (at most three).
    let mut put_order: HashMap<String, Vec<Bytes>> = HashMap::new();
    for round in 0..3 {
        let mut receipts = Vec::new();
        for i in round * 4_000..(round + 1) * 4_000 {
            let key = format!("k{}", i % 40);
            let mut data = format!("{i:06}-").into_bytes();
            data.resize(1_000, b'.');
            put_order.entry(key.clone()).or_default().push(Bytes::from(data.clone()));
            receipts.push(producer.put(UserRecord::new(key, data)).await.expect("buffered"));
        }
        for receipt in receipts {
            receipt.await.expect("delivered");
        }
        if producer.metrics().retries > 0 {
            break;
        }
    }
    assert!(producer.metrics().retries > 0, "the load was throttled, so order had something to survive");

    // Stream order: shard by shard, sequence number then sub-sequence number.
    let mut read_order: HashMap<String, Vec<Bytes>> = HashMap::new();
    for record in read_stream(&client, &stream).await.expect("read the stream") {
        for user in kinesis_aggregation::deaggregate(&record.partition_key, Bytes::from(record.data)).records {
            read_order.entry(user.partition_key().to_owned()).or_default().push(user.into_data());
        }
    }
    for (key, put) in &put_order {
        let read = &read_order[key];
        let diverges = put.iter().zip(read).position(|(a, b)| a != b);
        assert_eq!(diverges, None, "key {key}: first position where read order differs from put order");
        assert_eq!(put.len(), read.len(), "key {key}: every record once");
    }
    producer.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_records_round_trip_through_kinesis() {
    let kinesis = Kinesis::start().await.expect("start Kinesis");
    let stream = kinesis.create_stream(2).await.expect("create a 2-shard stream");
    let config = kinesis_producer::ProducerConfig { compression: true, ..Default::default() };
    let producer = Producer::builder(kinesis.client(), &stream).config(config).build().expect("producer");
    let mut receipts = Vec::new();
    for i in 0..10_000 {
        let record = UserRecord::new(format!("device-{}", i % 100), format!("{{\"n\":{i:05},\"status\":\"ok\"}}"));
        receipts.push(producer.put(record).await.expect("buffered"));
    }
    producer.flush().await;
    // read_back deaggregates with the consumer side's Deaggregator, which inflates first.
    let found = read_back(&kinesis.client(), &stream).await;
    for (i, receipt) in receipts.into_iter().enumerate() {
        let receipt = receipt.await.expect("delivered");
        let data = format!("{{\"n\":{i:05},\"status\":\"ok\"}}");
        let places = found.get(data.as_bytes()).unwrap_or_else(|| panic!("record {i} lost"));
        assert_eq!(
            places,
            &vec![(receipt.shard_id.to_string(), receipt.sequence_number.to_string(), receipt.aggregated_index)]
        );
    }
    let raw = read_stream(&kinesis.client(), &stream).await.unwrap();
    assert!(raw.iter().all(|r| kinesis_aggregation::compression::is_compressed(&r.data)));
    producer.shutdown().await;
}

/// Where a KCL reader finds each user record in the stream now: data -> (shard, sequence,
/// sub-sequence); and how many aggregates it drops whole (a sub-record outside its shard's range).
async fn kcl_view(
    client: &aws_sdk_kinesis::Client,
    stream: &str,
) -> (HashMap<Bytes, Vec<(String, String, Option<u64>)>>, usize) {
    let shards = list_all_shards(client, stream).await.expect("ListShards");
    let ranges: HashMap<String, HashKeyRange> = shards
        .iter()
        .map(|s| (s.shard_id.clone(), HashKeyRange::new(s.starting_hash_key, s.ending_hash_key).unwrap()))
        .collect();
    let mut found: HashMap<Bytes, Vec<(String, String, Option<u64>)>> = HashMap::new();
    let mut dropped = 0;
    let mut deaggregators: HashMap<String, Deaggregator> = HashMap::new();
    for record in read_stream(client, stream).await.expect("read the stream") {
        // One deaggregator a shard: it keeps the hashes of the partition keys it has seen.
        let deaggregator = deaggregators
            .entry(record.shard_id.clone())
            .or_insert_with(|| Deaggregator::with_hash_range(ranges[&record.shard_id]));
        let out = deaggregator.deaggregate(&record.partition_key, Bytes::from(record.data));
        if out.dropped() > 0 {
            dropped += 1;
            continue;
        }
        for user in out.records {
            let at = (record.shard_id.clone(), record.sequence_number.clone(), user.sub_sequence_number());
            found.entry(user.into_data()).or_default().push(at);
        }
    }
    (found, dropped)
}

/// Field report A: a stream deleted and created again under the same name with 3 shards instead
/// of 2. `a-5` and `b-5` (hash keys about 0.03 and 0.33 of the space) were both on the old shard 0;
/// now only `a-5` is. Both receipts must point where a reader finds the record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_stream_is_re_created_every_receipt_points_where_a_reader_finds_the_record() {
    let kinesis = Kinesis::start().await.expect("start Kinesis");
    let client = kinesis.client();
    let stream = kinesis.create_stream(2).await.expect("create a 2-shard stream");
    let producer = Producer::builder(client.clone(), &stream).build().expect("producer");
    producer.put(UserRecord::new("first", "0")).await.unwrap().await.expect("delivered: the producer has the map");
    kinesis_testkit::recreate_stream(&client, &stream, 3).await.expect("re-create the stream with 3 shards");
    let a = producer.put(UserRecord::new("a-5", "a")).await.unwrap();
    let b = producer.put(UserRecord::new("b-5", "b")).await.unwrap();
    producer.flush().await;
    let receipts = [("a", a.await.expect("a-5 delivered")), ("b", b.await.expect("b-5 delivered"))];
    let (found, _) = kcl_view(&client, &stream).await;
    for (data, receipt) in &receipts {
        let at = (receipt.shard_id.to_string(), receipt.sequence_number.to_string(), receipt.aggregated_index);
        let places = found.get(data.as_bytes()).unwrap_or_else(|| panic!("{data} is not readable"));
        assert!(places.contains(&at), "{data}: receipt {at:?}, readable at {places:?}");
    }
    assert_eq!(&*receipts[1].1.shard_id, "shardId-000000000001");
    producer.shutdown().await;
}

/// Field report A under load: a producer puts steadily while the stream is deleted and created
/// again. Records put while it did not exist fail, typed, handed back; every record acknowledged
/// is where its receipt says and readable there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_steady_load_across_a_re_creation_every_acknowledged_record_is_readable() {
    let kinesis = Kinesis::start().await.expect("start Kinesis");
    let client = kinesis.client();
    let stream = kinesis.create_stream(2).await.expect("create a 2-shard stream");
    let producer = Producer::builder(client.clone(), &stream).build().expect("producer");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let putting = {
        let (producer, stop) = (producer.clone(), stop.clone());
        tokio::spawn(async move {
            let mut receipts = Vec::new();
            let mut i = 0usize;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for _ in 0..50 {
                    let data = format!("steady {i:07}");
                    let receipt = producer.put(UserRecord::new(format!("key-{}", i % 211), data.clone())).await;
                    receipts.push((data, receipt.expect("buffered")));
                    i += 1;
                }
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            receipts
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    client.delete_stream().stream_name(&stream).send().await.expect("DeleteStream");
    while client.describe_stream_summary().stream_name(&stream).send().await.is_ok() {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    // From here on, a call that stores records stores them in the new stream.
    let gone_at = std::time::SystemTime::now();
    client.create_stream().stream_name(&stream).shard_count(3).send().await.expect("CreateStream");
    kinesis_testkit::wait_until_stream_active(&client, &stream).await.expect("ACTIVE");
    tokio::time::sleep(std::time::Duration::from_millis(1_000)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let receipts = putting.await.unwrap();
    producer.flush().await;
    let (found, _) = kcl_view(&client, &stream).await;
    let (mut acknowledged, mut failed) = (0, 0);
    for (data, receipt) in receipts {
        match receipt.await {
            Ok(receipt) => {
                let at = (receipt.shard_id.to_string(), receipt.sequence_number.to_string(), receipt.aggregated_index);
                // Stored by a call made before the old stream was gone: in the deleted stream, gone
                // with it. Stored by a later call: readable where the receipt says.
                let stored_by = receipt.attempts.last().expect("the successful attempt").at;
                if stored_by >= gone_at {
                    let places = found
                        .get(data.as_bytes())
                        .unwrap_or_else(|| panic!("{data} acknowledged at {at:?}, not readable"));
                    assert!(places.contains(&at), "{data}: receipt {at:?}, readable at {places:?}");
                    acknowledged += 1;
                }
            }
            Err(error) => {
                assert_eq!(error.into_record().data, Bytes::from(data), "a failed record is handed back");
                failed += 1;
            }
        }
    }
    assert!(acknowledged > 1_000, "acknowledged and readable after the re-creation: {acknowledged} (failed {failed})");
    let m = producer.metrics();
    eprintln!(
        "re-created under load: {acknowledged} acknowledged after the re-creation, all readable where their receipts say; \
         {failed} failed (typed, handed back); StaleShardMap {}; unreadable acknowledged 0",
        m.errors_by_code.get("StaleShardMap").copied().unwrap_or(0)
    );
    producer.shutdown().await;
}

/// Field report D: the producer is told 10 MiB records, the stream takes 1 MiB (and ferrokinesis,
/// like older endpoints, does not say so in DescribeStreamSummary). A 2 MiB record makes the
/// service refuse its whole call; only that record may fail, with the service's message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_over_the_streams_limit_fails_alone_with_the_services_message() {
    let kinesis = Kinesis::start().await.expect("start Kinesis");
    let client = kinesis.client();
    for small in [1usize, 1_000] {
        let stream = kinesis.create_stream(2).await.expect("create a 2-shard stream");
        let config = kinesis_producer::ProducerConfig {
            max_record_bytes: 10 * 1024 * 1024,
            collection_max_bytes: 10 * 1024 * 1024,
            ..Default::default()
        };
        let producer = Producer::builder(client.clone(), &stream).config(config).build().expect("producer");
        let big = producer.put(UserRecord::new("big", vec![1u8; 2 * 1024 * 1024])).await.expect("buffered");
        let mut receipts = Vec::new();
        for i in 0..small {
            receipts
                .push(producer.put(UserRecord::new(format!("k{i}"), format!("small {i}"))).await.expect("buffered"));
        }
        producer.flush().await;
        let failed = big.await.expect_err("the stream takes 1 MiB records");
        assert_eq!(failed.kind(), kinesis_producer::ErrorKind::InvalidInput, "{failed:?}");
        let message = failed.message().unwrap_or_default().to_owned();
        assert!(message.contains("1048576"), "the service's message names the limit: {message}");
        assert_eq!(failed.into_record().data.len(), 2 * 1024 * 1024);
        for receipt in receipts {
            receipt.await.expect("a record that shared the call is delivered");
        }
        let found = read_back(&client, &stream).await;
        assert_eq!(found.len(), small, "every small record is in the stream");
        eprintln!(
            "a 2 MiB record among {small} small: 1 failed ({message:.60}...), {} delivered, {} PutRecords calls",
            found.len(),
            producer.metrics().put_records_requests
        );
        producer.shutdown().await;
    }
}

/// Issue 15: one producer, three streams (2, 3 and 1 shards) and a fourth that does not exist.
/// 100,000 records over the three: every receipt names the stream it was put to and a shard
/// where a reader of that stream finds the record, once; the missing stream's records fail with
/// `NotFound` and no other stream's fail. The metrics are kept by stream and add up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_producer_puts_to_three_streams_and_a_missing_one_fails_only_its_own_records() {
    const RECORDS: usize = 100_000;
    let kinesis = Kinesis::start().await.expect("start Kinesis");
    let mut streams = Vec::new();
    for shards in [2, 3, 1] {
        streams.push(kinesis.create_stream(shards).await.expect("create a stream"));
    }
    let missing = kinesis_testkit::unique_name("no-such-stream");
    let producer = Producer::multi_stream(kinesis.client()).build().expect("producer");
    let no_default = producer.put(UserRecord::new("k", "v")).await.expect_err("no default stream");
    assert!(matches!(no_default.reason(), kinesis_producer::PutErrorReason::NoDefaultStream), "{no_default}");
    let invalid = producer.put_to("not a stream", UserRecord::new("k", "v")).await.expect_err("invalid");
    assert!(matches!(invalid.reason(), kinesis_producer::PutErrorReason::InvalidStream(_)), "{invalid}");

    let mut receipts = Vec::with_capacity(RECORDS);
    let mut lost_cause = Vec::new();
    for i in 0..RECORDS {
        let stream = &streams[i % 3];
        let record = UserRecord::new(format!("device-{}", i % 1_000), format!("{stream} {i:06}"));
        receipts.push((stream.clone(), producer.put_to(stream, record).await.expect("buffered")));
        if i % 10_000 == 0 {
            let record = UserRecord::new("device-0", format!("nowhere {i}"));
            lost_cause.push(producer.put_to(&missing, record).await.expect("buffered"));
        }
    }
    for receipt in lost_cause {
        let failed = receipt.await.expect_err("a record of a missing stream fails");
        assert_eq!(failed.kind(), kinesis_producer::ErrorKind::NotFound, "{failed}");
    }
    producer.flush().await;
    let mut found = HashMap::new();
    for stream in &streams {
        found.insert(stream.clone(), read_back(&kinesis.client(), stream).await);
    }
    for (i, (stream, receipt)) in receipts.into_iter().enumerate() {
        let receipt = receipt.await.unwrap_or_else(|e| panic!("record {i} to {stream} failed: {e}"));
        assert_eq!(&*receipt.stream, stream.as_str(), "record {i}'s receipt names its stream");
        let data = Bytes::from(format!("{stream} {i:06}"));
        let places = found[&stream].get(&data).unwrap_or_else(|| panic!("record {i} never arrived in {stream}"));
        assert_eq!(places.len(), 1, "record {i} arrived {} times", places.len());
        let place = (receipt.shard_id.to_string(), receipt.sequence_number.to_string(), receipt.aggregated_index);
        assert_eq!(places[0], place, "record {i}: the receipt points where a reader of {stream} finds it");
    }
    let by_stream: HashMap<String, kinesis_producer::MetricsSnapshot> =
        producer.metrics_by_stream().into_iter().collect();
    for stream in &streams {
        assert_eq!(by_stream[stream].user_records_put, (RECORDS / 3 + usize::from(stream == &streams[0])) as u64);
        assert_eq!(by_stream[stream].user_records_failed, 0, "{stream}");
    }
    assert_eq!(by_stream[&missing].user_records_put, 0);
    let total = producer.metrics();
    assert_eq!(total.user_records_put, RECORDS as u64);
    assert_eq!(total.user_records_received, RECORDS as u64 + 10);
    producer.shutdown().await;
}

/// Issue 15: one stream of three refuses every PutRecords as throttled (a proxy in front of
/// Kinesis). The other two streams' records are all delivered while the throttled stream's are
/// still being retried: none of them resolved before the last of the others did, and then they
/// expire at their time to live, with the throttling in their attempts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_throttled_hard_does_not_hold_the_others_back() {
    let kinesis = Kinesis::start().await.expect("start Kinesis");
    let streams = [kinesis.create_stream(2).await.unwrap(), kinesis.create_stream(2).await.unwrap()];
    let throttled = kinesis.create_stream(2).await.unwrap();
    let proxy = kinesis_testkit::FaultProxy::start(kinesis.endpoint_url()).await.expect("a proxy");
    let refusing = proxy.add(
        kinesis_testkit::Rule::new(kinesis_testkit::Fault::kinesis_throttling())
            .on("PutRecords")
            .containing(format!("\"StreamName\":\"{throttled}\"")),
    );
    let config =
        kinesis_producer::ProducerConfig { record_ttl: std::time::Duration::from_secs(10), ..Default::default() };
    let producer = Producer::multi_stream(Kinesis::connect(proxy.url()).client()).config(config).build().unwrap();
    let (mut fine, mut held) = (Vec::new(), Vec::new());
    for i in 0..20_000 {
        let record = UserRecord::new(format!("k-{}", i % 500), format!("record {i}"));
        match i % 3 {
            2 => held.push(producer.put_to(&throttled, record).await.expect("buffered")),
            n => fine.push(producer.put_to(&streams[n], record).await.expect("buffered")),
        }
    }
    let mut held = futures_util::future::join_all(held);
    let all_fine = futures_util::future::join_all(fine);
    let fine = tokio::select! {
        fine = all_fine => fine,
        _ = &mut held => panic!("the throttled stream's records resolved before the others were delivered"),
    };
    assert!(fine.iter().all(Result::is_ok), "the other streams' records delivered");
    let held = held.await;
    assert!(refusing.fired() > 0);
    for failed in held {
        let failed = failed.expect_err("refused until its time to live ran out");
        assert_eq!(failed.kind(), kinesis_producer::ErrorKind::Expired, "{failed}");
        assert!(
            failed.attempts().iter().any(|a| a.error_code.as_deref() == Some("ProvisionedThroughputExceededException"))
        );
    }
    producer.shutdown().await;
}

/// Issue 15: the calls in flight are the producer's, shared by its streams. Four streams, a cap
/// of two calls, every PutRecords answer held 200 ms by a proxy: the proxy never has more than two
/// PutRecords at once (four pipelines with a cap each would have up to eight), and every record
/// is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_calls_in_flight_are_shared_by_every_stream() {
    let kinesis = Kinesis::start().await.expect("start Kinesis");
    let mut streams = Vec::new();
    for _ in 0..4 {
        streams.push(kinesis.create_stream(2).await.expect("create a stream"));
    }
    let proxy = kinesis_testkit::FaultProxy::start(kinesis.endpoint_url()).await.expect("a proxy");
    let delay = std::time::Duration::from_millis(200);
    proxy.add(kinesis_testkit::Rule::new(kinesis_testkit::Fault::Delay(delay)).on("PutRecords"));
    let config = kinesis_producer::ProducerConfig { max_in_flight_requests: 2, ..Default::default() };
    let producer = Producer::multi_stream(Kinesis::connect(proxy.url()).client()).config(config).build().unwrap();
    let mut receipts = Vec::new();
    for i in 0..4_000 {
        let record = UserRecord::new(format!("k-{}", i % 100), format!("record {i}"));
        receipts.push(producer.put_to(&streams[i % 4], record).await.expect("buffered"));
    }
    for receipt in futures_util::future::join_all(receipts).await {
        receipt.expect("delivered");
    }
    assert!(proxy.requests("PutRecords") >= 4, "a call a stream at least: {:?}", proxy.request_counts());
    assert_eq!(proxy.max_concurrent("PutRecords"), 2, "at most the producer's two calls in flight, and both used");
    producer.shutdown().await;
}
