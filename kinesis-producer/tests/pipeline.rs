//! The pipeline with the in-memory transport and tokio's paused clock: linger, batching, retries,
//! time to live, back-pressure and bad input, deterministically. (The emulator tests in
//! `emulator.rs` cover the same paths against a real Kinesis server.)

use std::time::Duration;

use bytes::Bytes;
use kinesis_aggregation::deaggregate;
use kinesis_producer::{ErrorKind, Faults, MemoryTransport, Producer, ProducerConfig, PutErrorReason, UserRecord};
use tokio::time::Instant;

fn producer(transport: &MemoryTransport, config: ProducerConfig) -> Producer {
    Producer::builder_with_transport(transport.clone()).config(config).build().expect("valid config")
}

fn record(i: usize) -> UserRecord {
    UserRecord::new(format!("key-{}", i % 100), format!("payload-{i:06}"))
}

#[tokio::test(start_paused = true)]
async fn a_record_waits_for_the_linger_time_then_goes() {
    let transport = MemoryTransport::new(1);
    let p = producer(&transport, ProducerConfig::default());
    let started = Instant::now();
    let receipt = p.put(record(1)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(transport.calls(), 0, "nothing is sent before RecordMaxBufferedTime");
    let receipt = receipt.await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(100), "{:?}", started.elapsed());
    assert_eq!(transport.calls(), 1);
    assert_eq!(receipt.attempts.len(), 1);
    // A lone record goes plain, as with the KPL.
    assert_eq!(receipt.aggregated_index, None);
    assert_eq!(transport.stored()[0].entry.data, Bytes::from("payload-000001"));
}

#[tokio::test(start_paused = true)]
async fn records_are_aggregated_per_predicted_shard_and_receipts_match() {
    let transport = MemoryTransport::new(4);
    let p = producer(&transport, ProducerConfig::default());
    let mut receipts = Vec::new();
    for i in 0..5_000 {
        receipts.push((i, p.put(record(i)).await.unwrap()));
    }
    p.flush().await;
    // Each stored Kinesis record, deaggregated once, by sequence number.
    let width = u128::MAX / 4;
    let mut by_sequence = std::collections::HashMap::new();
    for kinesis in transport.stored() {
        let user = deaggregate(&kinesis.entry.partition_key, kinesis.entry.data.clone());
        // Every sub-record of the aggregate belongs to the shard it is on.
        let shard = kinesis.shard_id.trim_start_matches("shardId-").parse::<u128>().unwrap();
        for r in &user.records {
            let key = kinesis_aggregation::hash_key(r.partition_key());
            assert_eq!((key / width).min(3), shard, "{}", r.partition_key());
        }
        by_sequence.insert(kinesis.sequence_number.clone(), (kinesis.shard_id, user));
    }
    for (i, receipt) in receipts {
        let receipt = receipt.await.unwrap();
        let (shard_id, user) = &by_sequence[&*receipt.sequence_number];
        assert_eq!(shard_id.as_str(), &*receipt.shard_id);
        let index = receipt.aggregated_index.expect("aggregated") as usize;
        assert_eq!(user.records[index].data(), &record(i).data);
    }
    let m = p.metrics();
    assert_eq!(m.user_records_put, 5_000);
    assert!(m.kinesis_records_put < 100, "aggregated into few Kinesis records: {}", m.kinesis_records_put);
    assert_eq!(m.user_records_pending, 0);
}

#[tokio::test(start_paused = true)]
async fn throttled_records_are_retried_with_backoff_until_they_go() {
    let transport = MemoryTransport::new(2);
    transport.set_faults(Faults::RejectRecords("ProvisionedThroughputExceededException".into()));
    let p = producer(&transport, ProducerConfig::default());
    let receipt = p.put(record(7)).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let calls_while_throttled = transport.calls();
    assert!(calls_while_throttled >= 2, "retried: {calls_while_throttled}");
    // Backoff: far fewer calls than one per millisecond.
    assert!(calls_while_throttled < 20, "backs off: {calls_while_throttled}");
    transport.set_faults(Faults::None);
    let receipt = receipt.await.unwrap();
    assert!(receipt.attempts.len() >= 3);
    assert!(
        receipt.attempts[..receipt.attempts.len() - 1]
            .iter()
            .all(|a| a.error_code.as_deref() == Some("ProvisionedThroughputExceededException"))
    );
    assert_eq!(receipt.attempts.last().unwrap().error_code, None);
    let m = p.metrics();
    assert!(m.retries >= 2);
    assert!(m.errors_by_code["ProvisionedThroughputExceededException"] >= 2);
}

#[tokio::test(start_paused = true)]
async fn a_stream_that_rejects_everything_expires_records_after_the_ttl_and_hands_them_back() {
    let transport = MemoryTransport::new(1);
    transport.set_faults(Faults::FailCalls("InternalFailure".into()));
    let config =
        ProducerConfig { record_ttl: Duration::from_secs(5), max_buffered_records: 1_000, ..Default::default() };
    let p = producer(&transport, config);
    let started = Instant::now();
    let mut receipts = Vec::new();
    for i in 0..500 {
        receipts.push(p.put(record(i)).await.unwrap());
    }
    for (i, receipt) in receipts.into_iter().enumerate() {
        let error = receipt.await.unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Expired);
        assert_eq!(error.code(), Some("InternalFailure"));
        assert!(!error.attempts().is_empty());
        assert_eq!(error.into_record(), record(i), "the record comes back unchanged");
    }
    assert!(started.elapsed() <= Duration::from_secs(6), "expired at the TTL: {:?}", started.elapsed());
    let m = p.metrics();
    assert_eq!(m.user_record_expired, 500);
    assert_eq!(m.user_records_pending, 0);
    // Buffer space came back: the buffer takes a full load again.
    for i in 0..1_000 {
        assert!(p.try_put(record(i)).await.is_ok(), "space for record {i}");
    }
    p.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn fatal_errors_fail_at_once_with_the_record() {
    let transport = MemoryTransport::new(1);
    transport.set_faults(Faults::FailCalls("ResourceNotFoundException".into()));
    let p = producer(&transport, ProducerConfig::default());
    let error = p.put(record(3)).await.unwrap().await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::NotFound);
    assert_eq!(error.attempts().len(), 1);
    assert_eq!(error.into_record(), record(3));
}

#[tokio::test(start_paused = true)]
async fn a_stream_listshards_cannot_find_fails_the_waiting_records_with_their_data() {
    let transport = MemoryTransport::new(2);
    transport.set_list_shards_fault(Some("ResourceNotFoundException".into()));
    let p = producer(&transport, ProducerConfig::default());
    let started = Instant::now();
    let receipts: Vec<_> = futures_collect(&p, 0..10).await;
    for (i, receipt) in receipts.into_iter().enumerate() {
        let error =
            tokio::time::timeout(Duration::from_secs(60), receipt).await.expect("resolved, not stuck").unwrap_err();
        assert_eq!(error.kind(), ErrorKind::NotFound);
        assert_eq!(error.code(), Some("ResourceNotFoundException"));
        assert_eq!(error.into_record(), record(i));
    }
    assert!(started.elapsed() < Duration::from_secs(1), "failed at the first listing: {:?}", started.elapsed());
    assert_eq!(transport.calls(), 0, "nothing was sent without a shard map");
    assert_eq!(p.metrics().user_records_pending, 0);
}

#[tokio::test(start_paused = true)]
async fn records_waiting_for_a_shard_map_that_never_comes_expire_at_the_ttl() {
    let transport = MemoryTransport::new(2);
    transport.set_list_shards_fault(Some("InternalFailure".into()));
    let config = ProducerConfig { record_ttl: Duration::from_secs(3), ..Default::default() };
    let p = producer(&transport, config);
    let started = Instant::now();
    let receipts: Vec<_> = futures_collect(&p, 0..10).await;
    for (i, receipt) in receipts.into_iter().enumerate() {
        let error =
            tokio::time::timeout(Duration::from_secs(60), receipt).await.expect("resolved, not stuck").unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Expired);
        assert_eq!(error.into_record(), record(i));
    }
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(3) && waited < Duration::from_millis(3_100),
        "expired at the TTL: {waited:?}"
    );
    // ListShards answers again: new records go.
    transport.set_list_shards_fault(None);
    let receipt = p.put(record(99)).await.unwrap().await.expect("delivered once there is a map");
    assert_eq!(receipt.attempts.len(), 1);
}

async fn futures_collect(p: &Producer, range: std::ops::Range<usize>) -> Vec<kinesis_producer::ReceiptFuture> {
    let mut receipts = Vec::new();
    for i in range {
        receipts.push(p.put(record(i)).await.unwrap());
    }
    receipts
}
#[tokio::test(start_paused = true)]
async fn a_full_buffer_makes_put_wait_and_try_put_refuse() {
    let transport = MemoryTransport::new(1);
    transport.set_faults(Faults::RejectRecords("ProvisionedThroughputExceededException".into()));
    let config = ProducerConfig { max_buffered_records: 10, ..Default::default() };
    let p = producer(&transport, config);
    let mut receipts = Vec::new();
    for i in 0..10 {
        receipts.push(p.put(record(i)).await.unwrap());
    }
    let refused = p.try_put(record(10)).await.unwrap_err();
    assert!(refused.is_full());
    assert_eq!(refused.into_record(), record(10));
    // put waits; it goes through once the throttling stops and space frees up.
    let waiting = tokio::spawn({
        let p = p.clone();
        async move { p.put(record(11)).await.map(|_| ()) }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!waiting.is_finished(), "put waits while the buffer is full");
    transport.set_faults(Faults::None);
    waiting.await.unwrap().unwrap();
    for receipt in receipts {
        receipt.await.unwrap();
    }
    p.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn the_byte_cap_counts_each_record_with_its_overhead() {
    let transport = MemoryTransport::new(1);
    transport.set_faults(Faults::RejectRecords("ProvisionedThroughputExceededException".into()));
    // Room for exactly 3 records of 1 MiB with their overhead, not 4.
    let big = |i: u8| UserRecord::new(format!("k{i}"), vec![i; (1 << 20) - 2]);
    let cap = 3 * ((1 << 20) + kinesis_producer::RECORD_OVERHEAD_BYTES) + 100;
    let config = ProducerConfig { max_buffered_bytes: cap, ..Default::default() };
    let p = producer(&transport, config);
    let mut receipts = Vec::new();
    for i in 0..3 {
        receipts.push(p.try_put(big(i)).await.expect("room for three"));
    }
    let refused = p.try_put(big(3)).await.unwrap_err();
    assert!(refused.is_full());
    // Small records: the overhead, not their size, is what fills the rest.
    let small = p.try_put(UserRecord::new("s", "x")).await;
    assert!(small.is_err(), "100 bytes left is less than one record's overhead");
    drop(receipts);
}

#[tokio::test(start_paused = true)]
async fn bad_input_is_refused_at_put_with_the_record() {
    let transport = MemoryTransport::new(1);
    let p = producer(&transport, ProducerConfig::default());
    let cases = [
        (UserRecord::new("", "x"), "partition key"),
        (UserRecord::new("k".repeat(257), "x"), "partition key"),
        (UserRecord::new("k", vec![0u8; 1024 * 1024]), "over the limit"),
    ];
    for (bad, words) in cases {
        let error = p.put(bad.clone()).await.unwrap_err();
        assert!(error.reason().to_string().contains(words), "{}", error.reason());
        assert_eq!(error.into_record(), bad);
    }
    // An explicit hash key as text: a decimal from 0 to 2^128-1, or the record comes back.
    for text in ["", "-1", "01", "1e3", "340282366920938463463374607431768211456", "abc"] {
        let error = p.put_with_explicit_hash_key(record(5), text).await.unwrap_err();
        assert!(matches!(error.reason(), PutErrorReason::InvalidExplicitHashKey(_)), "{text:?}: {:?}", error.reason());
        assert_eq!(error.into_record(), record(5));
    }
    let receipt = p.put_with_explicit_hash_key(record(6), "340282366920938463463374607431768211455").await.unwrap();
    assert!(receipt.await.is_ok(), "2^128-1 is a valid explicit hash key");
    // 1 MiB including the key is allowed.
    let fits = UserRecord::new("k", vec![0u8; 1024 * 1024 - 1]);
    assert!(p.put(fits).await.unwrap().await.is_ok());
    p.shutdown().await;
    let after = p.put(record(1)).await.unwrap_err();
    assert!(matches!(after.reason(), PutErrorReason::Shutdown));
    assert_eq!(after.into_record(), record(1));
}

#[tokio::test(start_paused = true)]
async fn shutdown_delivers_everything_buffered() {
    let transport = MemoryTransport::new(3);
    let p = producer(&transport, ProducerConfig { aggregation: false, ..Default::default() });
    let mut receipts = Vec::new();
    for i in 0..2_000 {
        receipts.push(p.put(record(i)).await.unwrap());
    }
    p.shutdown().await;
    for receipt in receipts {
        let r = receipt.await.unwrap();
        assert_eq!(r.aggregated_index, None, "aggregation off: plain records");
    }
    assert_eq!(transport.stored().len(), 2_000);
    // Calls hold at most 500 entries.
    assert!(transport.calls() >= 4);
}

#[tokio::test(start_paused = true)]
async fn a_split_in_the_middle_of_production_loses_nothing() {
    let transport = MemoryTransport::new(2);
    let p = producer(&transport, ProducerConfig::default());
    let mut receipts = Vec::new();
    for i in 0..6_000 {
        if i == 3_000 {
            // Let some aggregates go, then split under the producer's feet.
            tokio::time::sleep(Duration::from_millis(150)).await;
            transport.split_shard("shardId-000000000000");
        }
        receipts.push((i, p.put(record(i)).await.unwrap()));
    }
    p.flush().await;
    let shards = transport.shards();
    let range = |id: &str| shards.iter().find(|s| s.shard_id == id).unwrap().range;
    // Read as a KCL reader would: an aggregate with any sub-record outside its shard is dropped whole.
    let mut readable = std::collections::HashMap::new();
    let mut dropped_aggregates = 0;
    for kinesis in transport.stored() {
        let user = deaggregate(&kinesis.entry.partition_key, kinesis.entry.data.clone());
        let r = range(&kinesis.shard_id);
        if user.records.iter().any(|u| !r.contains(kinesis_aggregation::hash_key(u.partition_key()))) {
            dropped_aggregates += 1;
            continue;
        }
        for (i, u) in user.records.iter().enumerate() {
            let at = (kinesis.shard_id.clone(), kinesis.sequence_number.clone(), user.records.len() > 1);
            readable.entry(u.data().clone()).or_insert_with(Vec::new).push((at, i));
        }
    }
    assert!(dropped_aggregates > 0, "the split misplaced some aggregates (else the test proves nothing)");
    for (i, receipt) in receipts {
        let receipt = receipt.await.unwrap_or_else(|e| panic!("record {i}: {e}"));
        let places = readable.get(&record(i).data).unwrap_or_else(|| panic!("record {i} is not readable"));
        assert!(
            places.iter().any(|((shard, seq, _), _)| shard.as_str() == &*receipt.shard_id
                && seq.as_str() == &*receipt.sequence_number),
            "record {i}: the receipt points at a readable copy"
        );
        if i >= 3_000 {
            // The parent is closed: nothing put after the split is on it.
            assert_ne!(&*receipt.shard_id, "shardId-000000000000", "record {i}");
        }
    }
    let m = p.metrics();
    assert!(m.errors_by_code.get("StaleShardMap").copied().unwrap_or(0) > 0);
}

/// Puts records of 20 keys while every 3rd entry is throttled; returns, per key, the sequence
/// of payloads in stream order (sequence number, then position in the aggregate).
async fn stream_order_per_key(ordering: bool) -> (Vec<Vec<String>>, Vec<Vec<String>>) {
    let transport = MemoryTransport::new(2);
    transport.set_faults(Faults::RejectEveryNth(3, "ProvisionedThroughputExceededException".into()));
    let config = ProducerConfig { ordering, aggregation_max_bytes: 400, ..Default::default() };
    let p = producer(&transport, config);
    let mut put_order = vec![Vec::new(); 20];
    let mut receipts = Vec::new();
    for i in 0..3_000 {
        let key = i % 20;
        let payload = format!("{i:05}");
        put_order[key].push(payload.clone());
        receipts.push(p.put(UserRecord::new(format!("key-{key}"), payload)).await.unwrap());
        if i % 100 == 0 {
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
    }
    for receipt in receipts {
        receipt.await.unwrap();
    }
    let mut stored = transport.stored();
    stored.sort_by(|a, b| a.sequence_number.cmp(&b.sequence_number));
    let mut stream_order = vec![Vec::new(); 20];
    for kinesis in stored {
        for user in deaggregate(&kinesis.entry.partition_key, kinesis.entry.data.clone()).records {
            let key: usize = user.partition_key().trim_start_matches("key-").parse().unwrap();
            stream_order[key].push(String::from_utf8(user.data().to_vec()).unwrap());
        }
    }
    p.shutdown().await;
    (put_order, stream_order)
}

#[tokio::test(start_paused = true)]
async fn ordering_mode_keeps_put_order_per_key_across_retries() {
    let (put_order, stream_order) = stream_order_per_key(true).await;
    for (key, (put, stream)) in put_order.iter().zip(&stream_order).enumerate() {
        let diverges = put.iter().zip(stream).position(|(a, b)| a != b);
        assert_eq!(diverges, None, "key {key}: first out-of-order position");
        assert_eq!(put.len(), stream.len(), "key {key}");
    }
    // Without it, retried records overtake: the same faults do reorder.
    let (put_order, stream_order) = stream_order_per_key(false).await;
    assert_ne!(stream_order, put_order, "the fault pattern reorders records when ordering is off");
    for (put, stream) in put_order.iter().zip(&stream_order) {
        let mut a = put.clone();
        let mut b = stream.clone();
        a.sort();
        b.sort();
        assert_eq!(a, b, "every record arrives either way");
    }
}

#[tokio::test(start_paused = true)]
async fn compressed_records_are_smaller_and_deaggregate_back() {
    for aggregation in [true, false] {
        let transport = MemoryTransport::new(2);
        let config = ProducerConfig { compression: true, aggregation, ..Default::default() };
        let p = producer(&transport, config);
        let data = |i: usize| format!("{{\"sensor\":\"s-{}\",\"reading\":{},\"unit\":\"celsius\"}}", i % 10, i % 37);
        for i in 0..2_000 {
            drop(p.put(UserRecord::new(format!("key-{}", i % 50), data(i))).await.unwrap());
        }
        p.shutdown().await;
        let mut back = Vec::new();
        let mut stored_bytes = 0;
        for kinesis in transport.stored() {
            // Aggregates shrink, so they go compressed; a short plain record may not, and then
            // goes as it is (either way the reader gets the original back).
            if aggregation {
                assert!(kinesis_aggregation::compression::is_compressed(&kinesis.entry.data), "compressed");
            }
            stored_bytes += kinesis.entry.data.len();
            for user in deaggregate(&kinesis.entry.partition_key, kinesis.entry.data).records {
                back.push(String::from_utf8(user.data().to_vec()).unwrap());
            }
        }
        back.sort();
        let mut sent: Vec<String> = (0..2_000).map(data).collect();
        sent.sort();
        assert_eq!(back, sent, "aggregation {aggregation}");
        let raw: usize = (0..2_000).map(|i| data(i).len()).sum();
        if aggregation {
            assert!(stored_bytes * 4 < raw, "aggregates compress well: {stored_bytes} of {raw}");
        }
        assert!(p.metrics().kinesis_records_data_put as usize >= stored_bytes);
    }
}

#[tokio::test(start_paused = true)]
async fn a_flush_under_throttling_keeps_retries_aggregated() {
    let transport = MemoryTransport::new(1);
    transport.set_faults(Faults::RejectEveryNth(2, "ProvisionedThroughputExceededException".into()));
    // Half of all entries are refused, so some records need many attempts: a TTL long enough
    // for all of them (this test is about aggregation; the TTL has tests of its own).
    let p = producer(&transport, ProducerConfig { record_ttl: Duration::from_secs(600), ..Default::default() });
    let mut receipts = Vec::new();
    for i in 0..20_000 {
        receipts.push(p.put(record(i)).await.unwrap());
    }
    // The flush sends what is buffered now; records that come back for a retry aggregate again.
    p.flush().await;
    for receipt in receipts {
        receipt.await.unwrap();
    }
    let m = p.metrics();
    assert!(m.retries > 0);
    assert!(m.user_records_per_kinesis_record() > 100.0, "{}", m.user_records_per_kinesis_record());
}

#[tokio::test(start_paused = true)]
async fn after_long_throttling_records_go_within_a_second_of_the_shard_having_room() {
    let transport = MemoryTransport::new(1);
    transport.set_faults(Faults::RejectRecords("ProvisionedThroughputExceededException".into()));
    let p = producer(&transport, ProducerConfig::default());
    let mut receipts = Vec::new();
    for i in 0..1_000 {
        receipts.push(p.put(record(i)).await.unwrap());
    }
    // Throttled for 20 s: the exponential backoff would have grown to its 5 s maximum.
    tokio::time::sleep(Duration::from_secs(20)).await;
    transport.set_faults(Faults::None);
    let cleared = Instant::now();
    for receipt in receipts {
        receipt.await.unwrap();
    }
    let tail = cleared.elapsed();
    assert!(tail <= Duration::from_millis(1_300), "throttled records wait at most about 1 s: {tail:?}");
    // Transient errors keep the full exponential backoff (checked by the TTL test's attempt count).
}

#[tokio::test(start_paused = true)]
async fn sustained_overload_of_a_shard_window_limit_expires_nothing() {
    use futures_util::StreamExt;
    // Kinesis's limits, counted per one-second window as the service (and ferrokinesis) does.
    let transport = MemoryTransport::new(4).discarding();
    transport.set_faults(Faults::ShardLimits { bytes: 1 << 20, records: 1_000 });
    let config = ProducerConfig { max_buffered_records: 100_000, ..Default::default() };
    let p = producer(&transport, config);
    // Put as fast as back-pressure allows, for 45 s: more than the TTL (30 s) of sustained overload.
    let started = Instant::now();
    let mut receipts = futures_util::stream::FuturesUnordered::<kinesis_producer::ReceiptFuture>::new();
    let (mut sent, mut delivered, mut max_attempts) = (0usize, 0usize, 0usize);
    let mut failures = Vec::new();
    while started.elapsed() < Duration::from_secs(45) {
        let record = UserRecord::new(format!("key-{:012}", sent % 1_000), format!("{sent:0>100}"));
        tokio::select! {
            biased;
            Some(result) = receipts.next(), if !receipts.is_empty() => match result {
                Ok(receipt) => { delivered += 1; max_attempts = max_attempts.max(receipt.attempts.len()); }
                Err(error) => failures.push(error),
            },
            put = p.put(record) => { receipts.push(put.unwrap()); sent += 1; }
        }
    }
    p.flush().await;
    while let Some(result) = receipts.next().await {
        match result {
            Ok(receipt) => {
                delivered += 1;
                max_attempts = max_attempts.max(receipt.attempts.len());
            }
            Err(error) => failures.push(error),
        }
    }
    let m = p.metrics();
    assert!(m.retries > 0, "the shard was overloaded: {m:?}");
    assert!(
        failures.is_empty(),
        "{} of {sent} records failed, the first: {:?}",
        failures.len(),
        failures[0].attempts()
    );
    assert_eq!(delivered, sent);
    eprintln!("{sent} records over 45 s: at most {max_attempts} attempts, {} retries", m.retries);
}
