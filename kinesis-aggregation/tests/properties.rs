//! Property tests: any records round-trip through aggregation, sizing is exact, and decoding never
//! panics whatever the bytes.

use bytes::Bytes;
use kinesis_aggregation::{
    Aggregator, AggregatorConfig, Deaggregator, HashKey, HashKeyRange, Outcome, TryPush, UserRecord, deaggregate,
    hash_key, limits,
};
use md5::{Digest, Md5};
use proptest::prelude::*;

fn partition_key() -> impl Strategy<Value = String> {
    prop_oneof![
        // Few distinct keys, so the tables deduplicate.
        "[a-d]{1,2}",
        // Any Unicode, 1 to 256 characters.
        proptest::collection::vec(any::<char>(), 1..=256).prop_map(|c| c.into_iter().collect()),
    ]
}

fn user_record() -> impl Strategy<Value = UserRecord> {
    (partition_key(), proptest::option::of(any::<u128>()), proptest::collection::vec(any::<u8>(), 0..600)).prop_map(
        |(pk, ehk, data)| {
            let mut r = UserRecord::new(pk, data);
            r.explicit_hash_key = ehk.map(HashKey);
            r
        },
    )
}

/// Aggregates in order, starting a new aggregate whenever the next record does not fit.
fn aggregate_all(records: Vec<UserRecord>, max_bytes: usize) -> Vec<(Bytes, usize, HashKey)> {
    let mut agg = Aggregator::with_config(AggregatorConfig::with_max_bytes(max_bytes));
    let mut out = Vec::new();
    let finish = |agg: &mut Aggregator, out: &mut Vec<_>| {
        let (size, n) = (agg.size_bytes(), agg.len());
        if let Some(r) = agg.finish() {
            assert_eq!(r.data.len(), size, "sizing is exact");
            out.push((r.data, n, r.explicit_hash_key.expect("an aggregate has an explicit hash key")));
        }
    };
    for mut record in records {
        loop {
            match agg.try_push(record).expect("every generated record fits an empty aggregate") {
                TryPush::Added => break,
                TryPush::NoCapacity(back) => {
                    finish(&mut agg, &mut out);
                    record = back;
                }
            }
        }
    }
    finish(&mut agg, &mut out);
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn records_round_trip(records in proptest::collection::vec(user_record(), 1..60),
                          max_bytes in 2_000usize..40_000) {
        let aggregates = aggregate_all(records.clone(), max_bytes);
        let mut back = Vec::new();
        for (data, n, outer_key) in aggregates {
            prop_assert!(data.len() <= max_bytes);
            let out = deaggregate("a", data);
            prop_assert_eq!(out.outcome, Outcome::Aggregated { dropped: 0 });
            prop_assert_eq!(out.records.len(), n);
            // The outer explicit hash key routes the aggregate with its first record.
            let first = &out.records[0];
            let first_key = first.explicit_hash_key().map_or_else(|| hash_key(first.partition_key()),
                |k| HashKey::parse(k).unwrap().0);
            prop_assert_eq!(outer_key.0, first_key);
            for (i, r) in out.records.into_iter().enumerate() {
                prop_assert_eq!(r.sub_sequence_number(), Some(i as u64));
                back.push(r);
            }
        }
        prop_assert_eq!(back.len(), records.len());
        for (got, want) in back.iter().zip(&records) {
            prop_assert_eq!(got.partition_key(), want.partition_key.as_str());
            prop_assert_eq!(got.explicit_hash_key().map(str::to_owned), want.explicit_hash_key.map(|k| k.to_string()));
            prop_assert_eq!(got.data(), &want.data);
        }
    }

    #[test]
    fn hash_range_filter_partitions_the_records(records in proptest::collection::vec(user_record(), 1..40),
                                                split in any::<u128>()) {
        let aggregates = aggregate_all(records, limits::MAX_RECORD_BYTES);
        let (data, n, _) = aggregates.into_iter().next().unwrap();
        let low = HashKeyRange::new(0, split).unwrap();
        let lo = Deaggregator::with_hash_range(low).deaggregate("a", data.clone());
        let hi = match split.checked_add(1) {
            Some(start) => Deaggregator::with_hash_range(HashKeyRange::new(start, u128::MAX).unwrap()).deaggregate("a", data),
            None => Deaggregator::with_hash_range(HashKeyRange::ALL).deaggregate("a", Bytes::new()),
        };
        prop_assert_eq!(lo.records.len() + lo.dropped(), n);
        if split < u128::MAX {
            prop_assert_eq!(hi.records.len() + hi.dropped(), n);
            prop_assert_eq!(lo.records.len(), hi.dropped());
            let mut positions: Vec<u64> = lo.records.iter().chain(&hi.records).map(|r| r.sub_sequence_number().unwrap()).collect();
            positions.sort_unstable();
            prop_assert_eq!(positions, (0..n as u64).collect::<Vec<_>>());
        }
    }

    #[test]
    fn decoding_arbitrary_bytes_never_panics(data in proptest::collection::vec(any::<u8>(), 0..2_000)) {
        let out = deaggregate("pk", Bytes::from(data.clone()));
        let aggregated = matches!(out.outcome, Outcome::Aggregated { .. });
        if !aggregated {
            prop_assert_eq!(out.records.len(), 1);
            prop_assert_eq!(out.records[0].data().as_ref(), &data[..]);
        }
    }

    #[test]
    fn decoding_arbitrary_protobuf_with_a_valid_checksum_never_panics(
        body in proptest::collection::vec(any::<u8>(), 0..2_000),
        range in any::<(u128, u128)>(),
    ) {
        // Framed with the magic and a correct MD5, so the bytes reach the protobuf decoder.
        let mut data = limits::MAGIC.to_vec();
        data.extend_from_slice(&body);
        data.extend_from_slice(&Md5::digest(&body));
        let data = Bytes::from(data);
        let out = deaggregate("pk", data.clone());
        match out.outcome {
            Outcome::Aggregated { dropped } => prop_assert_eq!(dropped, 0),
            _ => {
                prop_assert_eq!(out.records.len(), 1);
                prop_assert_eq!(out.records[0].data(), &data);
            }
        }
        let (a, b) = range;
        let filtered = Deaggregator::with_hash_range(HashKeyRange::new(a.min(b), a.max(b)).unwrap()).deaggregate("pk", data);
        prop_assert!(filtered.records.len() <= out.records.len().max(1));
    }
}
