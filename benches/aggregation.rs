//! Aggregate and deaggregate throughput of the KPL record format, on one core.
//!
//! The workload of issue 2: 100-byte payloads, 16-character partition keys drawn from 1,000
//! distinct keys, filling full 51,200-byte aggregates (the KPL default).
//!
//! Run: `cargo bench --bench aggregation`. Criterion reports user records/s ("elements");
//! multiply by the bytes per user record (116: key + payload) for MB/s.

use std::hint::black_box;

use bytes::Bytes;
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use kinesis_aggregation::{Aggregator, Deaggregator, HashKeyRange, TryPush, UserRecord, deaggregate};

mod common;

const RECORDS: usize = 100_000;

fn aggregate(records: Vec<UserRecord>) -> Vec<Bytes> {
    let mut agg = Aggregator::new();
    let mut out = Vec::with_capacity(records.len() / 400);
    for record in records {
        if let TryPush::NoCapacity(back) = agg.try_push(record).expect("valid record") {
            out.push(agg.finish().expect("full").data);
            let _ = agg.try_push(back).expect("valid record");
        }
    }
    out.extend(agg.finish().map(|r| r.data));
    out
}

fn bench(c: &mut Criterion) {
    let records = common::workload(RECORDS);
    let aggregates = aggregate(records.clone());
    eprintln!(
        "workload: {RECORDS} records, {} aggregates of about {} bytes ({} records each)",
        aggregates.len(),
        aggregates[0].len(),
        RECORDS / aggregates.len()
    );

    let mut group = c.benchmark_group("kpl");
    group.throughput(Throughput::Elements(RECORDS as u64));
    group.sample_size(20);
    // Steady state, as in a producer: each aggregate is handed on (here: dropped) once finished.
    group.bench_function("aggregate", |b| {
        b.iter_batched(
            || records.clone(),
            |records| {
                let mut agg = Aggregator::new();
                let mut bytes = 0;
                for record in records {
                    if let TryPush::NoCapacity(back) = agg.try_push(record).expect("valid record") {
                        bytes += black_box(agg.finish().expect("full").data).len();
                        let _ = agg.try_push(back).expect("valid record");
                    }
                }
                bytes + agg.finish().map_or(0, |r| r.data.len())
            },
            BatchSize::LargeInput,
        )
    });
    group.bench_function("deaggregate", |b| {
        b.iter(|| {
            let mut n = 0;
            for data in &aggregates {
                n += deaggregate("a", data.clone()).records.len();
            }
            assert_eq!(n, RECORDS);
            black_box(n)
        })
    });
    group.bench_function("deaggregate_hash_filtered", |b| {
        let mut deagg = Deaggregator::with_hash_range(HashKeyRange::ALL);
        b.iter(|| {
            let mut n = 0;
            for data in &aggregates {
                n += deagg.deaggregate("a", data.clone()).records.len();
            }
            black_box(n)
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
