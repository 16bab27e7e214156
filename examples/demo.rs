//! The main demo: KPL-format records through a real (embedded) Kinesis emulator and back.
//!
//! It starts ferrokinesis in-process, creates a 4-shard stream, aggregates user records per
//! predicted shard (ListShards hash ranges + MD5 of the partition key), sends the aggregates with
//! PutRecords, reads every shard back with GetRecords, deaggregates with each shard's hash range,
//! and checks that every user record arrived exactly once, on the shard it was predicted for.
//!
//! ```text
//! cargo run --release --example demo [-- RECORDS]
//! ```
//!
//! (The producer and consumer crates will take over this pipeline as they land.)

use std::collections::HashMap;
use std::time::Instant;

use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::{PutRecordsRequestEntry, ShardIteratorType};
use bytes::Bytes;
use kinesis::aggregation::{Aggregator, Deaggregator, HashKeyRange, KinesisRecord, ShardRanges, TryPush, UserRecord};
use kinesis_testkit::Kinesis;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let total: usize = std::env::args().nth(1).map(|n| n.parse()).transpose()?.unwrap_or(50_000);
    let started = Instant::now();

    let server = Kinesis::start().await?;
    let client = server.client();
    let stream = server.create_stream(4).await?;
    println!("stream {stream} with 4 shards at {}", server.endpoint_url());

    // The shard map: open shards' hash-key ranges.
    let shards = client.list_shards().stream_name(&stream).max_results(1000).send().await?;
    let mut ranges = Vec::new();
    for shard in shards.shards() {
        let range = shard.hash_key_range().ok_or("shard without a hash key range")?;
        ranges.push((
            HashKeyRange::parse(range.starting_hash_key(), range.ending_hash_key())?,
            shard.shard_id().to_owned(),
        ));
    }
    let map = ShardRanges::new(ranges)?;

    // Aggregate per predicted shard.
    let keys: Vec<String> = (0..1_000).map(|i| format!("sensor-{i:09}")).collect();
    let mut aggregators: HashMap<String, Aggregator> = HashMap::new();
    let mut outgoing: Vec<KinesisRecord> = Vec::new();
    let mut sent_per_shard: HashMap<String, usize> = HashMap::new();
    for i in 0..total {
        let record = UserRecord::new(keys[i % keys.len()].clone(), format!("{{\"n\":{i},\"reading\":{}}}", i % 97));
        let (_, shard) = map.lookup(record.hash_key().0).ok_or("hash key outside every shard")?;
        *sent_per_shard.entry(shard.clone()).or_default() += 1;
        let agg = aggregators.entry(shard.clone()).or_default();
        if let TryPush::NoCapacity(back) = agg.try_push(record)? {
            outgoing.extend(agg.finish());
            let _ = agg.try_push(back)?;
        }
    }
    outgoing.extend(aggregators.values_mut().filter_map(Aggregator::finish));
    let bytes: usize = outgoing.iter().map(|r| r.data.len() + r.partition_key.len()).sum();
    println!("aggregated {total} user records into {} Kinesis records ({bytes} bytes)", outgoing.len());

    // PutRecords, at most 500 entries and 5 MiB a call; resend what the service refused.
    let mut pending = outgoing;
    let mut calls = 0;
    while !pending.is_empty() {
        let mut refused = Vec::new();
        for batch in batches(&pending) {
            let entries = batch
                .iter()
                .map(|r| {
                    PutRecordsRequestEntry::builder()
                        .partition_key(&r.partition_key)
                        .set_explicit_hash_key(r.explicit_hash_key.map(|k| k.to_string()))
                        .data(Blob::new(r.data.to_vec()))
                        .build()
                })
                .collect::<Result<Vec<_>, _>>()?;
            let out = client.put_records().stream_name(&stream).set_records(Some(entries)).send().await?;
            calls += 1;
            for (entry, result) in batch.iter().zip(out.records()) {
                if result.error_code().is_some() {
                    refused.push(entry.clone());
                }
            }
        }
        println!("  PutRecords call {calls}: {} refused, to resend", refused.len());
        pending = refused;
    }

    // Read every shard back and deaggregate with its hash range.
    let mut received = 0usize;
    let mut seen: HashMap<Bytes, usize> = HashMap::new();
    let mut misplaced = 0usize;
    for (range, shard_id) in map.iter() {
        let mut deaggregator = Deaggregator::with_hash_range(*range);
        let mut iterator = client
            .get_shard_iterator()
            .stream_name(&stream)
            .shard_id(shard_id)
            .shard_iterator_type(ShardIteratorType::TrimHorizon)
            .send()
            .await?
            .shard_iterator()
            .map(str::to_owned);
        let mut on_shard = 0;
        while let Some(current) = iterator.take() {
            let out = client.get_records().shard_iterator(current).limit(10_000).send().await?;
            for record in out.records() {
                let data = Bytes::copy_from_slice(record.data().as_ref());
                let result = deaggregator.deaggregate(record.partition_key(), data);
                misplaced += result.dropped();
                for user in result.records {
                    *seen.entry(user.into_data()).or_default() += 1;
                    on_shard += 1;
                }
            }
            if out.records().is_empty() && out.millis_behind_latest() == Some(0) {
                break;
            }
            iterator = out.next_shard_iterator().map(str::to_owned);
        }
        let predicted = sent_per_shard.get(shard_id).copied().unwrap_or(0);
        println!("  {shard_id}: {on_shard} user records (predicted {predicted})");
        received += on_shard;
    }

    let duplicates: usize = seen.values().map(|n| n - 1).sum();
    let lost = total - seen.len();
    let elapsed = started.elapsed();
    println!();
    println!("sent        {total}");
    println!("received    {received}");
    println!("duplicates  {duplicates}");
    println!("lost        {lost}");
    println!("misplaced   {misplaced}");
    println!(
        "elapsed     {:.2} s ({:.0} user records/s end to end)",
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64()
    );
    if lost != 0 || duplicates != 0 || misplaced != 0 {
        return Err("the demo lost, duplicated or misplaced records".into());
    }
    Ok(())
}

/// Splits records into PutRecords calls of at most 500 entries and 5 MiB (data + partition keys).
fn batches(records: &[KinesisRecord]) -> Vec<&[KinesisRecord]> {
    const MAX_ENTRIES: usize = 500;
    const MAX_BYTES: usize = 5 * 1024 * 1024;
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, record) in records.iter().enumerate() {
        let size = record.data.len() + record.partition_key.len();
        if i > start && (i - start == MAX_ENTRIES || bytes + size > MAX_BYTES) {
            out.push(&records[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += size;
    }
    if start < records.len() {
        out.push(&records[start..]);
    }
    out
}
