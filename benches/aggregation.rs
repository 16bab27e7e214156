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

const KEYS: usize = 1_000;
const PAYLOAD: usize = 100;
const RECORDS: usize = 100_000;

/// A small deterministic generator, so that every run uses the same keys and payloads.
struct XorShift(u64);
impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn workload() -> Vec<UserRecord> {
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let keys: Vec<String> = (0..KEYS)
        .map(|_| (0..16).map(|_| ALPHABET[(rng.next() % ALPHABET.len() as u64) as usize] as char).collect())
        .collect();
    (0..RECORDS)
        .map(|_| {
            let key = keys[(rng.next() % KEYS as u64) as usize].clone();
            let data: Vec<u8> = (0..PAYLOAD).map(|_| rng.next() as u8).collect();
            UserRecord::new(key, data)
        })
        .collect()
}

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
    let records = workload();
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
