//! Batching throughput of the producer: `put` → receipt, through the whole pipeline (routing,
//! per-shard aggregation, rate limiter, PutRecords batching, receipts), into the in-memory
//! PutRecords sink (`MemoryTransport::new(4).discarding()`: 4 shards, routes every entry as Kinesis
//! does, keeps nothing).
//!
//! The workload of the issue: 100-byte payloads, 16-character partition keys drawn from 1,000 keys,
//! 200,000 user records an iteration: put them all (keeping the receipts), flush, await every
//! receipt. Target: at least 1 M user records/s with aggregation on. `aggregated` puts from one
//! task; `aggregated_4_tasks` from four at once (a quarter each, as a server's request handlers
//! would); `plain` is one task with aggregation off (one Kinesis record per user record).
//!
//! Run: `cargo bench --bench producer`. Criterion reports user records/s ("elements").

use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use kinesis_producer::{MemoryTransport, Producer, ProducerConfig, UserRecord};
use tokio::runtime::Runtime;

mod common;

const RECORDS: usize = 200_000;

fn config(aggregation: bool) -> ProducerConfig {
    ProducerConfig {
        aggregation,
        // Room for a whole iteration, so that back-pressure never makes `put` wait: the bench
        // measures the pipeline, not the buffer's size.
        max_buffered_records: 2 * RECORDS,
        max_buffered_bytes: 1 << 30,
        // The rate limiter stays on (it is part of the pipeline's cost), but with limits that never
        // bind. With the real ones (150 % of 1,000 records/s and 1 MiB/s per shard), the 4 memory
        // shards would take 6,000 Kinesis records/s and 6 MiB/s: about 50,000 user records/s
        // aggregated, 6,000 plain, in real time, whatever the pipeline costs. `validate` only asks
        // for positive limits, and the limiter computes in f64, so u32::MAX cannot overflow.
        shard_records_per_second: u32::MAX,
        shard_bytes_per_second: u32::MAX,
        ..Default::default()
    }
}

/// One iteration: each share of the records is put (keeping the receipts) by a task of its own,
/// all at once; then flush and await every receipt.
async fn put_all(producer: Producer, shares: Vec<Vec<UserRecord>>) {
    let mut putters = Vec::with_capacity(shares.len());
    for share in shares {
        let producer = producer.clone();
        putters.push(tokio::spawn(async move {
            let mut receipts = Vec::with_capacity(share.len());
            for record in share {
                receipts.push(producer.put(record).await.expect("put"));
            }
            receipts
        }));
    }
    let mut all = Vec::with_capacity(putters.len());
    for putter in putters {
        all.push(putter.await.expect("a putting task"));
    }
    producer.flush().await;
    for receipt in all.into_iter().flatten() {
        receipt.await.expect("delivered");
    }
}

fn bench(c: &mut Criterion) {
    let records = common::workload(RECORDS);
    let rt: Runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");

    let mut group = c.benchmark_group("producer");
    group.throughput(Throughput::Elements(RECORDS as u64));
    // An iteration takes a fraction of a second: the same number of iterations in every sample.
    group.sampling_mode(SamplingMode::Flat);
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(15));
    for (name, aggregation, tasks) in [("aggregated", true, 1), ("aggregated_4_tasks", true, 4), ("plain", false, 1)] {
        // One producer per function, reused by every iteration (a producer in steady state; its
        // start-up, one ListShards, is not measured).
        let producer = {
            let _runtime = rt.enter();
            Producer::builder_with_transport(MemoryTransport::new(4).discarding())
                .config(config(aggregation))
                .build()
                .expect("valid config")
        };
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    // The records are cloned and shared out here, outside the timed part: a clone
                    // is a String allocation (the key) and a reference count (the data), not
                    // producer work.
                    let share = RECORDS.div_ceil(tasks);
                    let shares: Vec<Vec<UserRecord>> = records.chunks(share).map(<[UserRecord]>::to_vec).collect();
                    let started = Instant::now();
                    // `put_all` puts from tasks on the runtime, as an application would.
                    rt.block_on(put_all(producer.clone(), shares));
                    total += started.elapsed();
                }
                total
            })
        });
        rt.block_on(producer.shutdown());
        let m = producer.metrics();
        assert_eq!(m.user_records_failed + m.user_record_expired, 0, "{m:?}");
        eprintln!(
            "{name}: {:.1} user records per Kinesis record, {:.1} Kinesis records per PutRecords call",
            m.user_records_per_kinesis_record(),
            m.kinesis_records_per_put_records_request()
        );
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
