//! Faults that field reports of other Kinesis producers exposed, on the in-memory stream with
//! tokio's paused clock (the same cases run against ferrokinesis in `emulator.rs`):
//!
//! - **A. A shard map stale with the ids unchanged**: a stream deleted and created again under the
//!   same name numbers its shards from 0 again over other ranges. No receipt may say delivered
//!   for a record in an aggregate that a reader drops.
//! - **D. One bad entry fails a whole PutRecords call**: only the offender fails, with the
//!   service's message; the records that shared its call are delivered.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use kinesis_aggregation::{Deaggregator, HashKeyRange, hash_key};
use kinesis_producer::{
    ErrorKind, MemoryTransport, Producer, ProducerConfig, PutErrorReason, Receipt, ShardDescription, StoredRecord,
    UserRecord,
};

fn producer(transport: &MemoryTransport, config: ProducerConfig) -> Producer {
    Producer::builder_with_transport(transport.clone()).config(config).build().expect("valid config")
}

/// Where a reader finds each user record of the generation `generation`: data -> (shard,
/// sequence, sub-sequence). A reader drops an aggregate whole when one of its records is outside
/// the shard's range (the KCL does), so such an aggregate yields nothing here.
fn readable(
    stored: &[StoredRecord],
    generation: u32,
    shards: &[ShardDescription],
) -> HashMap<Bytes, Vec<(String, String, Option<u64>)>> {
    let ranges: HashMap<&str, HashKeyRange> = shards.iter().map(|s| (s.shard_id.as_str(), s.range)).collect();
    let mut found: HashMap<Bytes, Vec<(String, String, Option<u64>)>> = HashMap::new();
    for record in stored.iter().filter(|r| r.generation == generation) {
        let mut deaggregator = Deaggregator::with_hash_range(ranges[record.shard_id.as_str()]);
        let out = deaggregator.deaggregate(&record.entry.partition_key, record.entry.data.clone());
        if out.dropped() > 0 {
            continue;
        }
        for user in out.records {
            let at = (record.shard_id.clone(), record.sequence_number.clone(), user.sub_sequence_number());
            found.entry(user.into_data()).or_default().push(at);
        }
    }
    found
}

fn place(receipt: &Receipt) -> (String, String, Option<u64>) {
    (receipt.shard_id.to_string(), receipt.sequence_number.to_string(), receipt.aggregated_index)
}

#[test]
fn the_keys_of_the_field_report_hash_where_it_says() {
    let fraction = |key: &str| hash_key(key) as f64 / u128::MAX as f64;
    // a-5 in the first third; b-5 just past the first third but in the first half.
    assert!(fraction("a-5") < 1.0 / 3.0);
    assert!(fraction("b-5") > 1.0 / 3.0 && fraction("b-5") < 0.5, "{}", fraction("b-5"));
}

#[tokio::test(start_paused = true)]
async fn after_a_stream_is_re_created_no_receipt_points_into_an_aggregate_a_reader_drops() {
    let transport = MemoryTransport::new(2);
    let p = producer(&transport, ProducerConfig::default());
    // One record delivered: the producer holds the 2-shard map.
    p.put(UserRecord::new("first", "0")).await.unwrap().await.expect("delivered");
    transport.delete();
    transport.recreate(3);
    let a = p.put(UserRecord::new("a-5", "a")).await.unwrap();
    let b = p.put(UserRecord::new("b-5", "b")).await.unwrap();
    p.flush().await;
    let (a, b) = (a.await.expect("a-5 delivered"), b.await.expect("b-5 delivered"));
    let found = readable(&transport.stored(), 1, &transport.shards());
    for (receipt, data) in [(&a, "a"), (&b, "b")] {
        let places = found.get(data.as_bytes()).unwrap_or_else(|| panic!("{data} is not readable"));
        assert!(places.contains(&place(receipt)), "{data}: receipt {:?}, readable at {places:?}", place(receipt));
    }
    assert_eq!(&*b.shard_id, "shardId-000000000001", "b-5 belongs to the new shard 1");
    // The first try went into one aggregate on the new shard 0, which a reader drops: the
    // attempt says why it was sent again.
    assert!(b.attempts.iter().any(|at| at.error_code.as_deref() == Some("StaleShardMap")), "{:?}", b.attempts);
    assert!(p.metrics().errors_by_code.get("StaleShardMap").copied().unwrap_or(0) >= 2);
    p.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn under_steady_load_across_a_delete_and_re_create_every_acknowledged_record_is_readable() {
    let transport = MemoryTransport::new(2);
    let p = producer(&transport, ProducerConfig::default());
    let mut receipts = Vec::new();
    let mut next = 0usize;
    let mut put_for = async |p: &Producer, receipts: &mut Vec<_>, millis: u64| {
        for _ in 0..millis {
            for _ in 0..20 {
                let data = format!("record-{next:06}");
                receipts
                    .push((data.clone(), p.put(UserRecord::new(format!("key-{}", next % 97), data)).await.unwrap()));
                next += 1;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    };
    put_for(&p, &mut receipts, 300).await;
    transport.delete();
    put_for(&p, &mut receipts, 50).await;
    transport.recreate(3);
    put_for(&p, &mut receipts, 300).await;
    p.flush().await;
    let stored = transport.stored();
    let old_layout = MemoryTransport::new(2).shards();
    let (mut ok, mut not_found) = (0, 0);
    let readable_by_generation = [readable(&stored, 0, &old_layout), readable(&stored, 1, &transport.shards())];
    for (data, receipt) in receipts {
        match receipt.await {
            Ok(receipt) => {
                ok += 1;
                let found = readable_by_generation.iter().find_map(|g| g.get(data.as_bytes()));
                let places = found.unwrap_or_else(|| panic!("{data} acknowledged ({receipt:?}) but not readable"));
                assert!(places.contains(&place(&receipt)), "{data}: receipt {receipt:?}, readable at {places:?}");
            }
            Err(failed) => {
                // Put while the stream did not exist: a typed error, the record handed back.
                assert_eq!(failed.kind(), ErrorKind::NotFound, "{failed:?}");
                assert_eq!(failed.into_record().data, Bytes::from(data));
                not_found += 1;
            }
        }
    }
    assert!(ok > 10_000 && not_found > 0, "ok {ok}, not found {not_found}");
    p.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_stream_re_created_with_the_same_shards_keeps_its_aggregates() {
    let transport = MemoryTransport::new(2);
    let p = producer(&transport, ProducerConfig::default());
    p.put(UserRecord::new("first", "0")).await.unwrap().await.expect("delivered");
    transport.delete();
    transport.recreate(2);
    let receipts: Vec<_> = futures_collect(&p, 50).await;
    p.flush().await;
    for receipt in receipts {
        let receipt = receipt.await.expect("delivered");
        assert_eq!(receipt.attempts.len(), 1, "readable at once: nothing sent again");
        assert!(receipt.aggregated_index.is_some());
    }
    assert_eq!(p.metrics().errors_by_code.get("StaleShardMap"), None);
    p.shutdown().await;
}

async fn futures_collect(p: &Producer, n: usize) -> Vec<kinesis_producer::ReceiptFuture> {
    let mut out = Vec::new();
    for i in 0..n {
        out.push(p.put(UserRecord::new(format!("k{i}"), format!("d{i}"))).await.unwrap());
    }
    out
}

#[tokio::test(start_paused = true)]
async fn aggregates_stored_in_a_stream_that_is_then_deleted_fail_with_not_found() {
    let transport = MemoryTransport::new(2);
    // Listings at most every second: the stream is deleted between the put and the listing.
    let config = ProducerConfig { shard_map_confirm_interval: Duration::from_secs(1), ..Default::default() };
    let p = producer(&transport, config);
    let receipts = futures_collect(&p, 20).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(transport.stored().len() >= 2, "stored, waiting for a listing");
    transport.delete();
    for receipt in receipts {
        let failed = receipt.await.expect_err("its stream is gone");
        assert_eq!(failed.kind(), ErrorKind::NotFound);
        assert!(failed.message().is_some_and(|m| m.contains("deleted")), "{:?}", failed.message());
    }
    p.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn receipts_of_aggregates_wait_for_one_listing_after_the_put_and_listings_are_spaced() {
    let transport = MemoryTransport::new(4);
    let p = producer(&transport, ProducerConfig::default());
    let start = tokio::time::Instant::now();
    let receipts = futures_collect(&p, 2_000).await;
    p.flush().await;
    let flushed = start.elapsed();
    for receipt in receipts {
        receipt.await.expect("delivered");
    }
    let lists = transport.list_calls();
    // The first map, then listings at most every 50 ms while aggregates wait.
    assert!(lists >= 2, "a listing confirmed the aggregates: {lists}");
    assert!(lists as u128 <= 2 + flushed.as_millis() / 50, "{lists} listings in {flushed:?}");
    // A single user record (or one key) is never held for a listing.
    let before = transport.list_calls();
    let lone = p.put(UserRecord::new("alone", "x")).await.unwrap().await.expect("delivered");
    assert_eq!(lone.aggregated_index, None);
    let same_key: Vec<_> = {
        let mut v = Vec::new();
        for i in 0..10 {
            v.push(p.put(UserRecord::new("one-key", format!("{i}"))).await.unwrap());
        }
        v
    };
    p.flush().await;
    for receipt in same_key {
        assert!(receipt.await.expect("delivered").aggregated_index.is_some());
    }
    assert_eq!(transport.list_calls(), before, "no listing for records readable on any shard");
    p.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn one_record_over_the_streams_limit_fails_alone_and_the_rest_of_its_call_is_delivered() {
    for small in [1usize, 1_000] {
        let transport = MemoryTransport::new(2);
        // The stream takes 1 MiB records but does not say so; the producer was told 10 MiB.
        transport.set_record_limit(1024 * 1024, false);
        let config = ProducerConfig {
            max_record_bytes: 10 * 1024 * 1024,
            collection_max_bytes: 10 * 1024 * 1024,
            aggregation: false,
            ..Default::default()
        };
        let p = producer(&transport, config);
        let big = p.put(UserRecord::new("big", Bytes::from(vec![7u8; 2 * 1024 * 1024]))).await.unwrap();
        let mut receipts = Vec::new();
        for i in 0..small {
            receipts.push(p.put(UserRecord::new(format!("k{i}"), format!("small-{i}"))).await.unwrap());
        }
        p.flush().await;
        let failed = big.await.expect_err("over the stream's limit");
        assert_eq!(failed.kind(), ErrorKind::InvalidInput);
        assert_eq!(failed.code(), Some("ValidationException"));
        assert!(failed.message().is_some_and(|m| m.contains("1048576")), "the limit is named: {:?}", failed.message());
        assert_eq!(failed.into_record().data.len(), 2 * 1024 * 1024, "handed back");
        for receipt in receipts {
            receipt.await.expect("an innocent record is delivered");
        }
        assert_eq!(transport.stored().len(), small);
        p.shutdown().await;
    }
}

#[tokio::test(start_paused = true)]
async fn an_aggregate_the_stream_refuses_is_sent_again_as_its_records() {
    let transport = MemoryTransport::new(1);
    transport.set_record_limit(1024 * 1024, false);
    // Aggregates of up to 2 MiB, on a stream that takes 1 MiB.
    let config = ProducerConfig {
        max_record_bytes: 10 * 1024 * 1024,
        collection_max_bytes: 10 * 1024 * 1024,
        aggregation_max_bytes: 2 * 1024 * 1024,
        ..Default::default()
    };
    let p = producer(&transport, config);
    let mut receipts = Vec::new();
    for i in 0..6 {
        receipts.push(p.put(UserRecord::new(format!("k{i}"), Bytes::from(vec![i as u8; 300_000]))).await.unwrap());
    }
    p.flush().await;
    for receipt in receipts {
        let receipt = receipt.await.expect("each record fits the stream");
        assert_eq!(receipt.aggregated_index, None, "sent plain after the aggregate was refused");
    }
}

#[tokio::test(start_paused = true)]
async fn a_limit_the_stream_reports_is_checked_at_put() {
    let transport = MemoryTransport::new(1);
    transport.set_record_limit(1024 * 1024, true);
    let config = ProducerConfig {
        max_record_bytes: 10 * 1024 * 1024,
        collection_max_bytes: 10 * 1024 * 1024,
        ..Default::default()
    };
    let p = producer(&transport, config);
    // Buffered before the producer learned the limit: refused when routed, not sent.
    let early = p.put(UserRecord::new("early", Bytes::from(vec![1u8; 2 * 1024 * 1024]))).await.unwrap();
    let failed = early.await.expect_err("over the stream's limit");
    assert_eq!((failed.kind(), failed.code()), (ErrorKind::InvalidInput, Some("RecordTooLarge")));
    assert!(failed.message().is_some_and(|m| m.contains("1048576")), "{:?}", failed.message());
    // From then on `put` refuses it with the record.
    let refused = p.put(UserRecord::new("late", Bytes::from(vec![1u8; 2 * 1024 * 1024]))).await.expect_err("too large");
    match refused.reason() {
        PutErrorReason::TooLarge { max, .. } => assert_eq!(*max, 1024 * 1024),
        other => panic!("{other:?}"),
    }
    assert_eq!(transport.calls(), 0, "nothing was sent");
}
