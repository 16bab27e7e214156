//! Reads user records back out of a Kinesis record, with the KCL's semantics.
//!
//! A Kinesis record is unpacked when it starts with the magic, has more than 16 bytes after it, its
//! MD5 matches, and its protobuf decodes with every required field and every table index valid.
//! Otherwise it is handed over whole, as one plain record, exactly as the KCL's `AggregatorUtil`
//! does — with one deliberate difference: a key index out of range makes the whole record corrupt
//! (handed over whole, and reported), where the Python reference silently drops the sub-records
//! after it.
//!
//! Sub-records get sub-sequence numbers `0..n` (their position in the aggregate). A sub-record has an
//! explicit hash key only when its index field is present. A valid aggregate that holds no records
//! (only key tables) yields no user records, as in the KCL: there is no user data in it to lose.
//!
//! Optionally, sub-records whose hash key falls outside a shard's range are left out and counted in
//! [`Outcome::Aggregated::dropped`]; the others keep their positions as sub-sequence numbers. (The KCL
//! drops the whole aggregate in that case; this crate keeps what belongs to the shard, and says how
//! much it left out, so the caller can count it.)

use bytes::Bytes;
use hashbrown::HashMap;
use md5::{Digest, Md5};
use prost::Message;

use crate::hash::{HashKey, HashKeyRange, hash_key_of_bytes};
use crate::limits::{DIGEST_LEN, MAGIC};
use crate::proto;
use crate::record::DeaggregatedRecord;

/// Why a record that starts with the magic was not unpacked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Corruption {
    /// 16 bytes or fewer follow the magic.
    TooShort,
    /// The MD5 at the end does not match the protobuf.
    ChecksumMismatch,
    /// The protobuf does not decode, or lacks a required field.
    Undecodable,
    /// A record points past the end of a key table.
    IndexOutOfRange,
    /// With a hash-range filter on: an explicit hash key in the table is not a valid decimal.
    InvalidExplicitHashKey,
}

/// What [`Deaggregator::deaggregate`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// An aggregate: its sub-records are the records.
    Aggregated {
        /// Sub-records left out because their hash key is outside the filter's range.
        dropped: usize,
    },
    /// No magic: a plain record, handed over whole.
    Plain,
    /// The magic, but not a valid aggregate: handed over whole, as the KCL does.
    Corrupt(Corruption),
}

/// The user records of one Kinesis record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Deaggregated {
    /// The user records, in order.
    pub records: Vec<DeaggregatedRecord>,
    /// How the Kinesis record was read.
    pub outcome: Outcome,
}

impl Deaggregated {
    /// Sub-records left out by the hash-range filter.
    pub fn dropped(&self) -> usize {
        match self.outcome {
            Outcome::Aggregated { dropped } => dropped,
            _ => 0,
        }
    }
}

/// Deaggregation settings, and a cache of partition-key hashes for the hash-range filter.
///
/// Keep one per shard and reuse it: with a filter on, every sub-record's partition key is hashed
/// (MD5), and the cache makes that a lookup for keys seen before. The cache holds at most
/// [`Deaggregator::HASH_CACHE_ENTRIES`] keys and starts over when full.
#[derive(Clone, Debug, Default)]
pub struct Deaggregator {
    hash_range: Option<HashKeyRange>,
    hashes: HashMap<Box<[u8]>, u128>,
}

/// Deaggregates with the default settings (no hash-range filter).
///
/// `partition_key` is the Kinesis record's own; a record handed over whole keeps it.
pub fn deaggregate(partition_key: &str, data: Bytes) -> Deaggregated {
    Deaggregator::new().deaggregate(partition_key, data)
}

impl Deaggregator {
    /// The most partition keys whose hashes are kept.
    pub const HASH_CACHE_ENTRIES: usize = 16_384;

    /// No filter: every sub-record is returned.
    pub fn new() -> Self {
        Deaggregator::default()
    }

    /// Leaves out sub-records whose hash key is outside `range` (a shard's range), and counts them.
    pub fn with_hash_range(range: HashKeyRange) -> Self {
        Deaggregator { hash_range: Some(range), hashes: HashMap::new() }
    }

    /// The filter's range, if any.
    pub fn hash_range(&self) -> Option<HashKeyRange> {
        self.hash_range
    }

    /// Reads the user records of one Kinesis record. Never panics, whatever the bytes.
    ///
    /// Data in this library's compressed form ([`crate::compression`]) is inflated first; a
    /// record that is not an aggregate then comes out as the inflated data.
    pub fn deaggregate(&mut self, partition_key: &str, data: Bytes) -> Deaggregated {
        let data = match crate::compression::is_compressed(&data) {
            true => crate::compression::decompress(&data).unwrap_or(data),
            false => data,
        };
        match self.unpack(&data) {
            Ok(done) => done,
            Err(outcome) => Deaggregated { records: vec![DeaggregatedRecord::plain(partition_key, data)], outcome },
        }
    }

    fn unpack(&mut self, data: &Bytes) -> Result<Deaggregated, Outcome> {
        if data.len() < MAGIC.len() || data[..MAGIC.len()] != MAGIC {
            return Err(Outcome::Plain);
        }
        if data.len() <= MAGIC.len() + DIGEST_LEN {
            return Err(Outcome::Corrupt(Corruption::TooShort));
        }
        let body_end = data.len() - DIGEST_LEN;
        let body = data.slice(MAGIC.len()..body_end);
        if Md5::digest(&body)[..] != data[body_end..] {
            return Err(Outcome::Corrupt(Corruption::ChecksumMismatch));
        }
        let message = proto::AggregatedRecord::decode(body).map_err(|_| Outcome::Corrupt(Corruption::Undecodable))?;
        message.validate().map_err(|invalid| {
            Outcome::Corrupt(match invalid {
                proto::Invalid::IndexOutOfRange => Corruption::IndexOutOfRange,
                proto::Invalid::MissingField | proto::Invalid::NotUtf8 => Corruption::Undecodable,
            })
        })?;

        let mut filter = match self.hash_range {
            None => None,
            Some(range) => Some(RangeFilter::new(range, &message, &mut self.hashes)?),
        };

        let mut records = Vec::with_capacity(message.records.len());
        let mut dropped = 0;
        for (position, record) in message.records.into_iter().enumerate() {
            // `validate` proved both indices in range and the data present.
            let pk_index = record.partition_key_index.unwrap_or_default() as usize;
            let ehk_index = record.explicit_hash_key_index.map(|i| i as usize);
            if let Some(filter) = filter.as_mut()
                && !filter.keeps(pk_index, ehk_index, &message.partition_key_table)
            {
                dropped += 1;
                continue;
            }
            records.push(DeaggregatedRecord::sub_record(
                message.partition_key_table[pk_index].clone(),
                ehk_index.map(|i| message.explicit_hash_key_table[i].clone()),
                record.data.unwrap_or_default(),
                position as u64,
            ));
        }
        Ok(Deaggregated { records, outcome: Outcome::Aggregated { dropped } })
    }
}

/// Hash-range filtering, with each table entry hashed or parsed at most once per aggregate, and
/// partition-key hashes remembered across aggregates.
struct RangeFilter<'a> {
    range: HashKeyRange,
    explicit: Vec<u128>,
    partition: Vec<Option<u128>>,
    cache: &'a mut HashMap<Box<[u8]>, u128>,
}

impl<'a> RangeFilter<'a> {
    fn new(
        range: HashKeyRange,
        message: &proto::AggregatedRecord,
        cache: &'a mut HashMap<Box<[u8]>, u128>,
    ) -> Result<Self, Outcome> {
        let explicit = message
            .explicit_hash_key_table
            .iter()
            .map(|text| std::str::from_utf8(text).ok().and_then(|t| HashKey::parse(t).ok()).map(|k| k.0))
            .collect::<Option<Vec<_>>>()
            .ok_or(Outcome::Corrupt(Corruption::InvalidExplicitHashKey))?;
        Ok(RangeFilter { range, explicit, partition: vec![None; message.partition_key_table.len()], cache })
    }

    fn keeps(&mut self, pk_index: usize, ehk_index: Option<usize>, partition_keys: &[Bytes]) -> bool {
        let key = match ehk_index {
            Some(i) => self.explicit[i],
            None => match self.partition[pk_index] {
                Some(hash) => hash,
                None => {
                    let hash = Self::cached_hash(self.cache, &partition_keys[pk_index]);
                    self.partition[pk_index] = Some(hash);
                    hash
                }
            },
        };
        self.range.contains(key)
    }

    fn cached_hash(cache: &mut HashMap<Box<[u8]>, u128>, partition_key: &[u8]) -> u128 {
        if let Some(&hash) = cache.get(partition_key) {
            return hash;
        }
        if cache.len() >= Deaggregator::HASH_CACHE_ENTRIES {
            cache.clear();
        }
        // A copy of the key: a slice would keep the whole Kinesis record alive.
        let hash = hash_key_of_bytes(partition_key);
        cache.insert(partition_key.into(), hash);
        hash
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregator::{Aggregator, TryPush};
    use crate::hash::hash_key;
    use crate::record::UserRecord;

    fn frame(body: &[u8]) -> Bytes {
        let mut data = MAGIC.to_vec();
        data.extend_from_slice(body);
        data.extend_from_slice(&Md5::digest(body));
        Bytes::from(data)
    }

    #[test]
    fn plain_and_corrupt_records_are_handed_over_whole() {
        let cases: Vec<(Bytes, Outcome)> = vec![
            (Bytes::from_static(b""), Outcome::Plain),
            (Bytes::from_static(b"\xF3\x89\x9A"), Outcome::Plain),
            (Bytes::from_static(b"hello world, not aggregated"), Outcome::Plain),
            (frame(b""), Outcome::Corrupt(Corruption::TooShort)),
            (frame(b"\xff\xff\xff"), Outcome::Corrupt(Corruption::Undecodable)),
            // A record (field 3) with no partition key index: a missing required field.
            (frame(&[0x1A, 0x02, 0x1A, 0x00]), Outcome::Corrupt(Corruption::Undecodable)),
            // A record pointing at partition key 0 of an empty table.
            (frame(&[0x1A, 0x04, 0x08, 0x00, 0x1A, 0x00]), Outcome::Corrupt(Corruption::IndexOutOfRange)),
        ];
        for (data, outcome) in cases {
            let out = deaggregate("outer", data.clone());
            assert_eq!(out.outcome, outcome, "{data:?}");
            assert_eq!(out.records, vec![DeaggregatedRecord::plain("outer", data)]);
        }

        let mut good = frame(&[0x0A, 0x01, b'k', 0x1A, 0x04, 0x08, 0x00, 0x1A, 0x00]).to_vec();
        let last = good.len() - 1;
        good[last] ^= 1;
        let out = deaggregate("outer", Bytes::from(good));
        assert_eq!(out.outcome, Outcome::Corrupt(Corruption::ChecksumMismatch));
    }

    #[test]
    fn an_aggregate_with_only_key_tables_has_no_user_records() {
        let out = deaggregate("outer", frame(&[0x0A, 0x01, b'k']));
        assert_eq!(out.outcome, Outcome::Aggregated { dropped: 0 });
        assert!(out.records.is_empty());
    }

    #[test]
    fn hash_range_filter_keeps_positions_and_counts_the_rest() {
        let mut agg = Aggregator::new();
        let mid = u128::MAX / 2;
        let keys = [HashKey(1), HashKey(mid + 1), HashKey(2), HashKey(u128::MAX)];
        for (i, key) in keys.iter().enumerate() {
            let r = UserRecord::new(format!("k{i}"), vec![i as u8]).with_explicit_hash_key(*key);
            assert!(matches!(agg.try_push(r).unwrap(), TryPush::Added));
        }
        let _ = agg.try_push(UserRecord::new("by-md5", "x")).unwrap();
        let data = agg.finish().unwrap().data;

        let low = Deaggregator::with_hash_range(HashKeyRange::new(0, mid).unwrap()).deaggregate("a", data.clone());
        let high = Deaggregator::with_hash_range(HashKeyRange::new(mid + 1, u128::MAX).unwrap()).deaggregate("a", data);
        let md5_is_low = hash_key("by-md5") <= mid;
        let positions =
            |d: &Deaggregated| d.records.iter().map(|r| r.sub_sequence_number().unwrap()).collect::<Vec<_>>();
        let mut want_low = vec![0, 2];
        let mut want_high = vec![1, 3];
        if md5_is_low {
            want_low.push(4)
        } else {
            want_high.push(4)
        }
        assert_eq!(positions(&low), want_low);
        assert_eq!(positions(&high), want_high);
        assert_eq!(low.dropped(), 5 - want_low.len());
        assert_eq!(high.dropped(), 5 - want_high.len());
    }

    #[test]
    fn a_reused_deaggregator_filters_like_a_fresh_one() {
        let mid = u128::MAX / 2;
        let aggregate = |keys: &[&str]| {
            let mut agg = Aggregator::new();
            for key in keys {
                let _ = agg.try_push(UserRecord::new(*key, "x")).unwrap();
            }
            agg.finish().unwrap().data
        };
        let first = aggregate(&["k1", "k2", "k3", "k4"]);
        let second = aggregate(&["k3", "k4", "k5", "k1"]);
        let range = HashKeyRange::new(0, mid).unwrap();
        let mut reused = Deaggregator::with_hash_range(range);
        for data in [first, second] {
            let warm = reused.deaggregate("a", data.clone());
            let cold = Deaggregator::with_hash_range(range).deaggregate("a", data);
            assert_eq!(warm, cold);
        }
        assert_eq!(reused.hashes.len(), 5);
    }

    #[test]
    fn unparsable_explicit_hash_key_with_a_filter_is_corrupt() {
        // Table: pk "k", ehk "x"; one record using both.
        let body = [0x0A, 0x01, b'k', 0x12, 0x01, b'x', 0x1A, 0x06, 0x08, 0x00, 0x10, 0x00, 0x1A, 0x00];
        let data = frame(&body);
        assert_eq!(deaggregate("o", data.clone()).records[0].explicit_hash_key(), Some("x"));
        let out = Deaggregator::with_hash_range(HashKeyRange::ALL).deaggregate("o", data);
        assert_eq!(out.outcome, Outcome::Corrupt(Corruption::InvalidExplicitHashKey));
        assert_eq!(out.records.len(), 1);
    }
}
