//! Fuzz target: deaggregation never panics and never loses the record, whatever the bytes.
//!
//! The input is used twice: as raw record data, and framed as an aggregate (magic + the bytes +
//! their MD5) so that the fuzzer reaches the protobuf decoder instead of the checksum. The first 32
//! bytes also pick a hash-key range for the filtering path.
#![no_main]

use bytes::Bytes;
use kinesis_aggregation::{Deaggregator, HashKeyRange, Outcome, deaggregate, limits};
use libfuzzer_sys::fuzz_target;
use md5::{Digest, Md5};

fuzz_target!(|input: &[u8]| {
    let raw = Bytes::copy_from_slice(input);
    check(&mut Deaggregator::new(), raw.clone());

    let mut framed = limits::MAGIC.to_vec();
    framed.extend_from_slice(input);
    framed.extend_from_slice(&Md5::digest(input));
    let framed = Bytes::from(framed);
    check(&mut Deaggregator::new(), framed.clone());

    if input.len() >= 32 {
        let a = u128::from_be_bytes(input[..16].try_into().unwrap());
        let b = u128::from_be_bytes(input[16..32].try_into().unwrap());
        let range = HashKeyRange::new(a.min(b), a.max(b)).unwrap();
        check(&mut Deaggregator::with_hash_range(range), framed);
    }
    let _ = deaggregate("", raw);
});

fn check(deaggregator: &mut Deaggregator, data: Bytes) {
    let out = deaggregator.deaggregate("pk", data.clone());
    match out.outcome {
        // A valid aggregate: every sub-record is returned or counted.
        Outcome::Aggregated { .. } => {}
        // Anything else comes out whole, as one record.
        _ => {
            assert_eq!(out.records.len(), 1);
            assert_eq!(out.records[0].data(), &data);
            assert_eq!(out.records[0].sub_sequence_number(), None);
        }
    }
}
