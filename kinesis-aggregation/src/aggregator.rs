//! Packs user records into one KPL aggregated record, with exact sizing.
//!
//! The size of the aggregate is kept exactly as records are pushed, with protobuf's varint arithmetic,
//! so [`Aggregator::try_push`] knows before it adds a record whether the result still fits in the
//! maximum. The maximum bounds the aggregate's data (magic + protobuf + MD5), as the references do.
//! A producer must keep that plus the one-byte outer partition key within the stream's record limit.
//!
//! Encoding writes the message with prost's field encoders (`encode_key`, `encode_varint`) rather
//! than its derived `Message::encode`: the derived path clones every `Bytes` field, which allocates
//! for `Vec`-backed data, and walks every record twice for lengths that are already known here. The
//! benchmark showed that path costing as much as the MD5. The bytes are the same; a property test
//! checks them against `prost::Message::encode` of the same message, and prost stays the decoder.

use std::hash::BuildHasher;

use bytes::Bytes;
use hashbrown::{DefaultHashBuilder, HashMap, HashTable};
use md5::{Digest, Md5};
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint};

use crate::error::{InvalidRecord, PushError};
use crate::hash::HashKey;
use crate::limits::{
    AGGREGATE_PARTITION_KEY, DEFAULT_MAX_AGGREGATE_BYTES, FRAMING_LEN, MAGIC, MAX_CONFIGURABLE_RECORD_BYTES,
};
use crate::record::{KinesisRecord, UserRecord, validate_partition_key};

/// What [`Aggregator::try_push`] did with a record.
#[derive(Debug)]
#[must_use = "a record that did not fit is handed back and must not be dropped"]
pub enum TryPush {
    /// The record is in the aggregate.
    Added,
    /// The record would make the aggregate too large (or too many records): it is handed back.
    /// Finish the aggregate and push it into the next one.
    NoCapacity(UserRecord),
}

/// Limits of one aggregate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
// Not `#[non_exhaustive]`: that would forbid `Config { x, ..Default::default() }` outside this
// crate, which is how it is meant to be written. New fields always get a default.
pub struct AggregatorConfig {
    /// The largest aggregate, magic + protobuf + MD5, in bytes. Default: the KPL's 51,200.
    pub max_bytes: usize,
    /// The most user records in one aggregate. Default: unbounded, as in the KPL.
    pub max_records: usize,
}

impl Default for AggregatorConfig {
    fn default() -> Self {
        AggregatorConfig { max_bytes: DEFAULT_MAX_AGGREGATE_BYTES, max_records: usize::MAX }
    }
}

impl AggregatorConfig {
    /// The default limits with another maximum size.
    pub fn with_max_bytes(max_bytes: usize) -> Self {
        AggregatorConfig { max_bytes, ..Default::default() }
    }
}

/// Collects user records into one aggregated Kinesis record.
///
/// ```
/// use kinesis_aggregation::{Aggregator, TryPush, UserRecord, deaggregate};
///
/// let mut agg = Aggregator::new();
/// for i in 0..3 {
///     let record = UserRecord::new(format!("key-{i}"), format!("payload {i}"));
///     assert!(matches!(agg.try_push(record)?, TryPush::Added));
/// }
/// let kinesis_record = agg.finish().expect("three records");
/// assert_eq!(kinesis_record.partition_key, "a");
///
/// let back = deaggregate(&kinesis_record.partition_key, kinesis_record.data);
/// assert_eq!(back.records.len(), 3);
/// assert_eq!(back.records[2].partition_key(), "key-2");
/// # Ok::<(), kinesis_aggregation::PushError>(())
/// ```
#[derive(Debug)]
pub struct Aggregator {
    config: AggregatorConfig,
    partition_key_table: Vec<String>,
    explicit_hash_key_table: Vec<String>,
    records: Vec<PendingRecord>,
    /// Indices into `partition_key_table`, hashed by the key they point at.
    partition_keys: HashTable<u64>,
    hasher: DefaultHashBuilder,
    explicit_hash_keys: HashMap<u128, u64>,
    /// Encoded length of `message`, kept exact.
    body_len: usize,
    /// Hash key of the first record: the explicit hash key of the Kinesis record.
    first_hash_key: HashKey,
}

/// Where a record goes and what it adds, worked out before anything changes.
struct Plan {
    pk_index: u64,
    /// The key's hash in the dedup table, when the key is new.
    new_pk: Option<u64>,
    ehk_index: Option<u64>,
    new_ehk: Option<(u128, String)>,
    added: usize,
    message_len: usize,
}

/// A pushed record, with the length of its encoded `Record` message.
#[derive(Debug)]
struct PendingRecord {
    partition_key_index: u64,
    explicit_hash_key_index: Option<u64>,
    data: Bytes,
    message_len: usize,
}

// Field numbers of `AggregatedRecord` and `Record`.
const PARTITION_KEY_TABLE: u32 = 1;
const EXPLICIT_HASH_KEY_TABLE: u32 = 2;
const RECORDS: u32 = 3;
const PARTITION_KEY_INDEX: u32 = 1;
const EXPLICIT_HASH_KEY_INDEX: u32 = 2;
const DATA: u32 = 3;

impl Default for Aggregator {
    fn default() -> Self {
        Aggregator::new()
    }
}

impl Aggregator {
    /// An aggregator with the KPL's default maximum of 51,200 bytes.
    pub fn new() -> Self {
        Aggregator::with_config(AggregatorConfig::default())
    }

    /// An aggregator with the given limits. `max_bytes` is capped at 10 MiB, the largest record a
    /// stream can be configured for.
    pub fn with_config(mut config: AggregatorConfig) -> Self {
        config.max_bytes = config.max_bytes.min(MAX_CONFIGURABLE_RECORD_BYTES);
        config.max_records = config.max_records.max(1);
        Aggregator {
            config,
            partition_key_table: Vec::new(),
            explicit_hash_key_table: Vec::new(),
            records: Vec::new(),
            partition_keys: HashTable::new(),
            hasher: DefaultHashBuilder::default(),
            explicit_hash_keys: HashMap::new(),
            body_len: 0,
            first_hash_key: HashKey(0),
        }
    }

    /// The limits in force.
    pub fn config(&self) -> AggregatorConfig {
        self.config
    }

    /// How many user records are in the aggregate.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Whether no record has been pushed since the last finish.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// The exact size the aggregate's data (magic + protobuf + MD5) would have if finished now.
    pub fn size_bytes(&self) -> usize {
        FRAMING_LEN + self.body_len
    }

    /// Adds a record when it fits, or hands it back.
    ///
    /// # Errors
    /// A [`PushError`], which hands the record back, when the record can never be aggregated: its
    /// partition key is empty or over 256 characters, or it alone exceeds the maximum size.
    pub fn try_push(&mut self, record: UserRecord) -> Result<TryPush, PushError> {
        let plan = match self.plan(&record.partition_key, record.explicit_hash_key, &record.data) {
            Err(reason) => return Err(PushError::new(reason, record)),
            Ok(None) => return Ok(TryPush::NoCapacity(record)),
            Ok(Some(plan)) => plan,
        };
        let UserRecord { partition_key, explicit_hash_key, data } = record;
        self.commit(plan, explicit_hash_key, data, move || partition_key);
        Ok(TryPush::Added)
    }

    /// Adds a copy of a borrowed record when it fits: the data is shared (`Bytes`), the partition
    /// key is copied only when the aggregate does not have it yet. Returns `false` when the record
    /// does not fit; the caller keeps it either way.
    ///
    /// # Errors
    /// [`InvalidRecord`] when the record can never be aggregated (see [`Aggregator::try_push`]).
    pub fn try_push_ref(&mut self, record: &UserRecord) -> Result<bool, InvalidRecord> {
        match self.plan(&record.partition_key, record.explicit_hash_key, &record.data)? {
            None => Ok(false),
            Some(plan) => {
                self.commit(plan, record.explicit_hash_key, record.data.clone(), || record.partition_key.clone());
                Ok(true)
            }
        }
    }

    /// Works out where a record would go and what it would add, without changing anything.
    /// `Ok(None)`: it does not fit.
    fn plan(
        &self,
        partition_key: &str,
        explicit_hash_key: Option<HashKey>,
        data: &Bytes,
    ) -> Result<Option<Plan>, InvalidRecord> {
        validate_partition_key(partition_key)?;
        let pk_hash = self.hasher.hash_one(partition_key.as_bytes());
        let table = &self.partition_key_table;
        let existing_pk = self.partition_keys.find(pk_hash, |&i| table[i as usize] == partition_key).copied();
        let pk_index = existing_pk.unwrap_or(self.partition_key_table.len() as u64);
        let mut added = match existing_pk {
            Some(_) => 0,
            None => table_entry_len(partition_key.len()),
        };

        let mut new_ehk = None;
        let ehk_index = explicit_hash_key.map(|HashKey(key)| match self.explicit_hash_keys.get(&key) {
            Some(&index) => index,
            None => {
                let text = key.to_string();
                added += table_entry_len(text.len());
                new_ehk = Some((key, text));
                self.explicit_hash_key_table.len() as u64
            }
        });

        let message_len = 1
            + encoded_len_varint(pk_index)
            + ehk_index.map_or(0, |i| 1 + encoded_len_varint(i))
            + 1
            + encoded_len_varint(data.len() as u64)
            + data.len();
        added += 1 + encoded_len_varint(message_len as u64) + message_len;

        let size = FRAMING_LEN + self.body_len + added;
        if size > self.config.max_bytes || self.len() >= self.config.max_records {
            if self.is_empty() {
                return Err(InvalidRecord::TooLarge { size, max: self.config.max_bytes });
            }
            return Ok(None);
        }
        let new_pk = existing_pk.is_none().then_some(pk_hash);
        Ok(Some(Plan { pk_index, new_pk, ehk_index, new_ehk, added, message_len }))
    }

    /// Applies a plan. `partition_key` is called only when the key is new to the table.
    fn commit(
        &mut self,
        plan: Plan,
        explicit_hash_key: Option<HashKey>,
        data: Bytes,
        partition_key: impl FnOnce() -> String,
    ) {
        let partition_key = plan.new_pk.map(|hash| (hash, partition_key()));
        if self.is_empty() {
            self.first_hash_key = match (explicit_hash_key, &partition_key) {
                (Some(key), _) => key,
                // The first record's key is always new to an empty table.
                (None, Some((_, key))) => HashKey::of_partition_key(key),
                (None, None) => HashKey(0),
            };
        }
        if let Some((key, text)) = plan.new_ehk {
            self.explicit_hash_keys.insert(key, plan.ehk_index.unwrap_or_default());
            self.explicit_hash_key_table.push(text);
        }
        if let Some((hash, key)) = partition_key {
            let (hasher, table) = (&self.hasher, &self.partition_key_table);
            self.partition_keys.insert_unique(hash, plan.pk_index, |&i| hasher.hash_one(table[i as usize].as_bytes()));
            self.partition_key_table.push(key);
        }
        self.records.push(PendingRecord {
            partition_key_index: plan.pk_index,
            explicit_hash_key_index: plan.ehk_index,
            data,
            message_len: plan.message_len,
        });
        self.body_len += plan.added;
    }

    /// Hands over what was pushed, as an aggregator to [`finish`](Aggregator::finish) elsewhere (on
    /// another task or thread: encoding and the MD5 are most of the cost), and starts a new
    /// aggregate here, with room for as many records as the one handed over.
    pub fn take(&mut self) -> Aggregator {
        let mut fresh = Aggregator::with_config(self.config);
        fresh.records.reserve(self.records.len());
        fresh.partition_key_table.reserve(self.partition_key_table.len());
        fresh.partition_keys.reserve(self.partition_key_table.len(), |_| 0);
        std::mem::replace(self, fresh)
    }

    /// Discards what was pushed, keeping the allocations.
    pub fn clear(&mut self) {
        self.partition_key_table.clear();
        self.explicit_hash_key_table.clear();
        self.records.clear();
        self.partition_keys.clear();
        self.explicit_hash_keys.clear();
        self.body_len = 0;
    }

    /// Encodes the aggregate and starts a new one. `None` when it is empty.
    ///
    /// The Kinesis record has partition key `"a"` and, as explicit hash key, the hash key of the
    /// first user record, so that it lands on that record's shard. A single record is finished as an
    /// aggregate too; whether to send a lone record plain instead is the producer's choice.
    pub fn finish(&mut self) -> Option<KinesisRecord> {
        if self.is_empty() {
            return None;
        }
        let mut data = Vec::with_capacity(FRAMING_LEN + self.body_len);
        data.extend_from_slice(&MAGIC);
        self.encode_body(&mut data);
        debug_assert_eq!(data.len() - MAGIC.len(), self.body_len, "aggregate sizing is exact");
        let digest = Md5::digest(&data[MAGIC.len()..]);
        data.extend_from_slice(&digest);

        // Keep the allocations for the next aggregate.
        self.clear();

        Some(KinesisRecord {
            partition_key: AGGREGATE_PARTITION_KEY.to_owned(),
            explicit_hash_key: Some(self.first_hash_key),
            data: Bytes::from(data),
        })
    }
}

impl Aggregator {
    /// Writes the protobuf `AggregatedRecord`: both tables, then the records, in push order.
    fn encode_body(&self, out: &mut Vec<u8>) {
        for key in &self.partition_key_table {
            put_length_delimited(PARTITION_KEY_TABLE, key.as_bytes(), out);
        }
        for key in &self.explicit_hash_key_table {
            put_length_delimited(EXPLICIT_HASH_KEY_TABLE, key.as_bytes(), out);
        }
        for record in &self.records {
            encode_key(RECORDS, WireType::LengthDelimited, out);
            encode_varint(record.message_len as u64, out);
            encode_key(PARTITION_KEY_INDEX, WireType::Varint, out);
            encode_varint(record.partition_key_index, out);
            if let Some(index) = record.explicit_hash_key_index {
                encode_key(EXPLICIT_HASH_KEY_INDEX, WireType::Varint, out);
                encode_varint(index, out);
            }
            put_length_delimited(DATA, &record.data, out);
        }
    }

    /// The aggregate as a prost message, for tests that compare the two encoders.
    #[cfg(test)]
    fn to_message(&self) -> crate::proto::AggregatedRecord {
        crate::proto::AggregatedRecord {
            partition_key_table: self.partition_key_table.iter().map(|k| Bytes::from(k.clone())).collect(),
            explicit_hash_key_table: self.explicit_hash_key_table.iter().map(|k| Bytes::from(k.clone())).collect(),
            records: self
                .records
                .iter()
                .map(|r| crate::proto::Record {
                    partition_key_index: Some(r.partition_key_index),
                    explicit_hash_key_index: r.explicit_hash_key_index,
                    data: Some(r.data.clone()),
                    tags: Vec::new(),
                })
                .collect(),
        }
    }
}

fn put_length_delimited(field: u32, value: &[u8], out: &mut Vec<u8>) {
    encode_key(field, WireType::LengthDelimited, out);
    encode_varint(value.len() as u64, out);
    out.extend_from_slice(value);
}

/// Bytes of one entry of a string table: tag, length, content.
fn table_entry_len(len: usize) -> usize {
    1 + encoded_len_varint(len as u64) + len
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deaggregate::deaggregate;
    use proptest::prelude::*;
    use prost::Message;

    proptest! {
        #[test]
        fn encoder_writes_exactly_what_prost_writes(
            records in proptest::collection::vec(
                ("[a-e]{1,3}|\\PC{1,40}", proptest::option::of(0u128..5), proptest::collection::vec(any::<u8>(), 0..300)),
                1..80),
        ) {
            let mut agg = Aggregator::with_config(AggregatorConfig::with_max_bytes(1 << 20));
            for (pk, ehk, data) in records {
                let mut r = UserRecord::new(pk, data);
                r.explicit_hash_key = ehk.map(|k| HashKey(k << 100));
                prop_assert!(matches!(agg.try_push(r).unwrap(), TryPush::Added));
            }
            let expected = agg.to_message().encode_to_vec();
            prop_assert_eq!(expected.len(), agg.size_bytes() - FRAMING_LEN);
            let data = agg.finish().unwrap().data;
            prop_assert_eq!(&data[MAGIC.len()..data.len() - 16], &expected[..]);
            prop_assert_eq!(&data[data.len() - 16..], &Md5::digest(&expected)[..]);
        }
    }

    fn record(pk: &str, len: usize) -> UserRecord {
        UserRecord::new(pk, vec![7u8; len])
    }

    #[test]
    fn sizing_is_exact_across_varint_boundaries() {
        // Data lengths around the one/two/three-byte varint boundaries, keys around 128 entries.
        let mut agg = Aggregator::with_config(AggregatorConfig::with_max_bytes(1 << 20));
        for (i, len) in
            [0usize, 1, 126, 127, 128, 129, 16_383, 16_384, 16_385].into_iter().cycle().take(300).enumerate()
        {
            let mut r = record(&format!("k{}", i % 140), len);
            if i % 3 == 0 {
                r = r.with_explicit_hash_key(HashKey((i as u128) << 100));
            }
            let before = agg.size_bytes();
            match agg.try_push(r).unwrap() {
                TryPush::Added => assert!(agg.size_bytes() > before),
                TryPush::NoCapacity(_) => break,
            }
        }
        let expected = agg.size_bytes();
        let n = agg.len();
        let out = agg.finish().unwrap();
        assert_eq!(out.data.len(), expected);
        assert_eq!(deaggregate("a", out.data).records.len(), n);
        assert!(agg.is_empty());
        assert_eq!(agg.size_bytes(), FRAMING_LEN);
    }

    #[test]
    fn full_aggregate_hands_the_record_back() {
        let mut agg = Aggregator::with_config(AggregatorConfig::with_max_bytes(200));
        let mut pushed = 0;
        let back = loop {
            match agg.try_push(record("key", 40)).unwrap() {
                TryPush::Added => pushed += 1,
                TryPush::NoCapacity(r) => break r,
            }
        };
        assert_eq!(back, record("key", 40));
        assert!(agg.size_bytes() <= 200);
        // One more record of this size would have crossed the limit.
        assert!(agg.size_bytes() + 1 + 1 + 1 + 1 + 1 + 1 + 40 > 200);
        assert_eq!(agg.len(), pushed);
        let out = agg.finish().unwrap();
        assert!(out.data.len() <= 200);
    }

    #[test]
    fn record_larger_than_an_empty_aggregate_is_an_error() {
        let mut agg = Aggregator::with_config(AggregatorConfig::with_max_bytes(100));
        let err = agg.try_push(record("key", 100)).unwrap_err();
        assert!(matches!(err.reason(), InvalidRecord::TooLarge { max: 100, .. }));
        assert_eq!(err.into_record(), record("key", 100));
        assert!(agg.is_empty());
    }

    #[test]
    fn bad_partition_keys_are_refused_and_handed_back() {
        let mut agg = Aggregator::new();
        let err = agg.try_push(record("", 1)).unwrap_err();
        assert_eq!(err.reason(), &InvalidRecord::EmptyPartitionKey);
        let long = "k".repeat(257);
        let err = agg.try_push(record(&long, 1)).unwrap_err();
        assert_eq!(err.reason(), &InvalidRecord::PartitionKeyTooLong { chars: 257 });
        assert_eq!(err.into_record().partition_key, long);
    }

    #[test]
    fn borrowed_and_owned_pushes_encode_the_same() {
        let records: Vec<UserRecord> = (0..50)
            .map(|i| {
                let r = UserRecord::new(format!("k{}", i % 7), vec![i as u8; i]);
                if i % 5 == 0 { r.with_explicit_hash_key(HashKey(i as u128)) } else { r }
            })
            .collect();
        let (mut owned, mut borrowed) = (Aggregator::new(), Aggregator::new());
        for r in &records {
            assert!(matches!(owned.try_push(r.clone()).unwrap(), TryPush::Added));
            assert!(borrowed.try_push_ref(r).unwrap());
        }
        assert_eq!(owned.finish(), borrowed.finish());
        let mut small = Aggregator::with_config(AggregatorConfig::with_max_bytes(60));
        assert!(small.try_push_ref(&record("k", 20)).unwrap());
        assert!(!small.try_push_ref(&record("k", 20)).unwrap());
        assert!(small.try_push_ref(&record("", 1)).is_err());
    }

    #[test]
    fn max_records_bounds_the_count() {
        let mut agg = Aggregator::with_config(AggregatorConfig { max_records: 2, ..Default::default() });
        assert!(matches!(agg.try_push(record("a", 1)).unwrap(), TryPush::Added));
        assert!(matches!(agg.try_push(record("b", 1)).unwrap(), TryPush::Added));
        assert!(matches!(agg.try_push(record("c", 1)).unwrap(), TryPush::NoCapacity(_)));
    }

    #[test]
    fn outer_record_is_routed_by_the_first_user_record() {
        let mut agg = Aggregator::new();
        let _ = agg.try_push(record("first", 1)).unwrap();
        let _ = agg.try_push(record("second", 1)).unwrap();
        let out = agg.finish().unwrap();
        assert_eq!(out.partition_key, "a");
        assert_eq!(out.explicit_hash_key, Some(HashKey::of_partition_key("first")));

        let ehk = HashKey(42);
        let _ = agg.try_push(record("x", 1).with_explicit_hash_key(ehk)).unwrap();
        assert_eq!(agg.finish().unwrap().explicit_hash_key, Some(ehk));
        assert!(agg.finish().is_none());
    }

    #[test]
    fn take_hands_over_the_aggregate_and_clear_discards_it() {
        let mut agg = Aggregator::with_config(AggregatorConfig::with_max_bytes(1_000));
        let _ = agg.try_push(record("first", 10)).unwrap();
        let _ = agg.try_push(record("second", 10)).unwrap();
        let size = agg.size_bytes();
        let mut taken = agg.take();
        assert!(agg.is_empty());
        assert_eq!(agg.config(), taken.config());
        assert_eq!(agg.size_bytes(), FRAMING_LEN);
        let _ = agg.try_push(record("third", 10)).unwrap();

        let out = taken.finish().unwrap();
        assert_eq!(out.data.len(), size);
        let back = deaggregate(&out.partition_key, out.data);
        let keys: Vec<&str> = back.records.iter().map(|r| r.partition_key()).collect();
        assert_eq!(keys, ["first", "second"]);
        assert_eq!(agg.finish().map(|r| deaggregate(&r.partition_key, r.data).records.len()), Some(1));

        let _ = agg.try_push(record("gone", 10)).unwrap();
        agg.clear();
        assert!(agg.is_empty() && agg.finish().is_none());
        assert_eq!(agg.size_bytes(), FRAMING_LEN);
    }

    #[test]
    fn key_tables_are_deduplicated_in_first_use_order() {
        let mut agg = Aggregator::new();
        for pk in ["b", "a", "b", "c", "a"] {
            let _ = agg.try_push(record(pk, 1).with_explicit_hash_key(HashKey(pk.len() as u128))).unwrap();
        }
        let body = agg.finish().unwrap().data;
        let message = crate::proto::AggregatedRecord::decode(&body[4..body.len() - 16]).unwrap();
        assert_eq!(message.partition_key_table, [&b"b"[..], b"a", b"c"].map(Bytes::from_static));
        assert_eq!(message.explicit_hash_key_table, [Bytes::from_static(b"1")]);
        let indices: Vec<_> = message.records.iter().map(|r| r.partition_key_index.unwrap()).collect();
        assert_eq!(indices, [0, 1, 0, 2, 1]);
    }
}
