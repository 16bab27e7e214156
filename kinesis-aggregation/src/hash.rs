//! Hash keys: MD5 of a partition key, explicit hash keys, and lookups over shards' hash-key ranges.
//!
//! Kinesis routes a record by its hash key: the explicit hash key when one is given, else the MD5 of
//! the partition key's UTF-8 bytes read as a big-endian `u128`. The shard is the one whose inclusive
//! range `[StartingHashKey, EndingHashKey]` contains it.

use std::fmt;
use std::str::FromStr;

use md5::{Digest, Md5};

use crate::error::InvalidHashKey;

/// A position in the 128-bit hash-key space of a stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct HashKey(pub u128);

impl HashKey {
    /// The hash key Kinesis gives a partition key: MD5 of its UTF-8 bytes, big-endian.
    pub fn of_partition_key(partition_key: &str) -> Self {
        HashKey(hash_key(partition_key))
    }

    /// Parses an explicit hash key as the Kinesis API accepts it: a decimal `0 ..= 2^128-1`
    /// with no sign, no spaces and no leading zeros (the API's pattern `0|([1-9]\d{0,38})`).
    ///
    /// # Errors
    /// [`InvalidHashKey`] when the text is not such a decimal.
    pub fn parse(text: &str) -> Result<Self, InvalidHashKey> {
        let bytes = text.as_bytes();
        let canonical = match bytes {
            [] => false,
            [b'0'] => true,
            [first, rest @ ..] => {
                (b'1'..=b'9').contains(first) && rest.len() <= 38 && rest.iter().all(u8::is_ascii_digit)
            }
        };
        if !canonical {
            return Err(InvalidHashKey::new(text));
        }
        // Digits only, so the one failure left is a value over 2^128-1.
        text.parse::<u128>().map(HashKey).map_err(|_| InvalidHashKey::new(text))
    }
}

impl fmt::Display for HashKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl FromStr for HashKey {
    type Err = InvalidHashKey;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        HashKey::parse(s)
    }
}

impl From<u128> for HashKey {
    fn from(value: u128) -> Self {
        HashKey(value)
    }
}

/// MD5 of the partition key's UTF-8 bytes, read as a big-endian `u128`.
pub fn hash_key(partition_key: &str) -> u128 {
    hash_key_of_bytes(partition_key.as_bytes())
}

pub(crate) fn hash_key_of_bytes(partition_key: &[u8]) -> u128 {
    if partition_key.len() <= ONE_BLOCK_MAX {
        return u128::from_be_bytes(md5_one_block(partition_key));
    }
    u128::from_be_bytes(Md5::digest(partition_key).into())
}

/// The longest message whose MD5 padding fits in one 64-byte block: 64 - 1 (the 0x80 byte) - 8
/// (the length).
const ONE_BLOCK_MAX: usize = 55;

/// MD5 of a message of at most [`ONE_BLOCK_MAX`] bytes (RFC 1321, section 3): the message, the
/// 0x80 byte, zeros, and the length in bits as a little-endian u64 make one block, compressed once
/// from the initial state. Most partition keys are this short; going through `Md5::digest` costs
/// more in buffering than the compression itself.
fn md5_one_block(message: &[u8]) -> [u8; 16] {
    debug_assert!(message.len() <= ONE_BLOCK_MAX);
    let mut block = [0u8; 64];
    block[..message.len()].copy_from_slice(message);
    block[message.len()] = 0x80;
    block[56..].copy_from_slice(&((message.len() as u64) * 8).to_le_bytes());
    let mut state: [u32; 4] = [0x6745_2301, 0xefcd_ab89, 0x98ba_dcfe, 0x1032_5476];
    md5::block_api::compress(&mut state, &[block]);
    let mut digest = [0u8; 16];
    for (out, word) in digest.chunks_exact_mut(4).zip(state) {
        out.copy_from_slice(&word.to_le_bytes());
    }
    digest
}

/// An inclusive range of hash keys, as a shard's `HashKeyRange` gives it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct HashKeyRange {
    /// `StartingHashKey`, inclusive.
    pub start: u128,
    /// `EndingHashKey`, inclusive.
    pub end: u128,
}

impl HashKeyRange {
    /// The whole hash-key space, `0 ..= 2^128-1`.
    pub const ALL: HashKeyRange = HashKeyRange { start: 0, end: u128::MAX };

    /// A range from its two inclusive ends.
    ///
    /// # Errors
    /// [`InvalidHashKey`] when `start > end`.
    pub fn new(start: u128, end: u128) -> Result<Self, InvalidHashKey> {
        if start > end {
            return Err(InvalidHashKey::new(&format!("{start}..={end}")));
        }
        Ok(HashKeyRange { start, end })
    }

    /// Parses the decimal `StartingHashKey` and `EndingHashKey` strings of a shard.
    ///
    /// # Errors
    /// [`InvalidHashKey`] when either is not a decimal in range, or `start > end`.
    pub fn parse(start: &str, end: &str) -> Result<Self, InvalidHashKey> {
        HashKeyRange::new(HashKey::parse(start)?.0, HashKey::parse(end)?.0)
    }

    /// Whether `key` lies in the range.
    pub fn contains(&self, key: u128) -> bool {
        self.start <= key && key <= self.end
    }
}

/// A lookup from hash key to shard over non-overlapping ranges, kept sorted.
///
/// Build it from the *open* shards of a stream; they cover the hash-key space without overlap.
/// A gap (mid-reshard, or a partial listing) makes [`ShardRanges::lookup`] return `None`.
#[derive(Clone, Debug)]
pub struct ShardRanges<T> {
    ranges: Vec<(HashKeyRange, T)>,
}

/// Two ranges handed to [`ShardRanges::new`] overlap.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("hash-key ranges overlap: {first:?} and {second:?}")]
pub struct OverlappingRanges {
    /// The range that starts first.
    pub first: HashKeyRange,
    /// The range that overlaps it.
    pub second: HashKeyRange,
}

impl<T> ShardRanges<T> {
    /// Sorts the ranges and checks that no two overlap.
    ///
    /// # Errors
    /// [`OverlappingRanges`] names the first pair that overlaps.
    pub fn new(mut ranges: Vec<(HashKeyRange, T)>) -> Result<Self, OverlappingRanges> {
        ranges.sort_by_key(|(r, _)| r.start);
        for pair in ranges.windows(2) {
            let (a, b) = (pair[0].0, pair[1].0);
            if b.start <= a.end {
                return Err(OverlappingRanges { first: a, second: b });
            }
        }
        Ok(ShardRanges { ranges })
    }

    /// The shard whose range contains `key`, with that range.
    pub fn lookup(&self, key: u128) -> Option<(&HashKeyRange, &T)> {
        let after = self.ranges.partition_point(|(r, _)| r.start <= key);
        let (range, value) = self.ranges.get(after.checked_sub(1)?)?;
        range.contains(key).then_some((range, value))
    }

    /// The ranges and their shards, in hash-key order.
    pub fn iter(&self) -> impl Iterator<Item = (&HashKeyRange, &T)> {
        self.ranges.iter().map(|(r, v)| (r, v))
    }

    /// How many ranges there are.
    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Whether the ranges cover the whole hash-key space with no gap.
    pub fn covers_all(&self) -> bool {
        let mut next = Some(0u128);
        for (r, _) in &self.ranges {
            match next {
                Some(n) if r.start == n => next = r.end.checked_add(1),
                _ => return false,
            }
        }
        next.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn md5_hash_keys_match_known_digests() {
        // RFC 1321 test suite digests, read as big-endian integers.
        assert_eq!(hash_key(""), 0xd41d8cd98f00b204e9800998ecf8427e);
        assert_eq!(hash_key("a"), 0x0cc175b9c0f1b6a831c399e269772661);
        assert_eq!(hash_key("abc"), 0x900150983cd24fb0d6963f7d28e17f72);
        // Non-ASCII keys hash their UTF-8 bytes.
        assert_eq!(hash_key("é"), u128::from_be_bytes(Md5::digest([0xC3, 0xA9]).into()));
    }

    #[test]
    fn the_one_block_md5_equals_the_digest_at_every_length() {
        let bytes: Vec<u8> = (0..200u32).map(|i| (i * 37 + 11) as u8).collect();
        for len in 0..=bytes.len() {
            let message = &bytes[..len];
            assert_eq!(hash_key_of_bytes(message), u128::from_be_bytes(Md5::digest(message).into()), "length {len}");
        }
    }

    #[test]
    fn explicit_hash_keys_follow_the_api_pattern() {
        let max = u128::MAX.to_string();
        let cases: &[(&str, Option<u128>)] = &[
            ("0", Some(0)),
            ("1", Some(1)),
            ("170141183460469231731687303715884105728", Some(1 << 127)),
            (max.as_str(), Some(u128::MAX)),
            ("340282366920938463463374607431768211456", None),  // 2^128
            ("9999999999999999999999999999999999999999", None), // 40 digits
            ("", None),
            ("00", None),
            ("01", None),
            ("-1", None),
            ("+1", None),
            (" 1", None),
            ("1 ", None),
            ("1e3", None),
            ("0x10", None),
            ("١", None), // a non-ASCII digit
        ];
        for (text, want) in cases {
            assert_eq!(HashKey::parse(text).ok().map(|k| k.0), *want, "{text:?}");
        }
    }

    #[test]
    fn hash_key_display_round_trips() {
        for v in [0u128, 7, 1 << 64, u128::MAX] {
            assert_eq!(HashKey::parse(&HashKey(v).to_string()), Ok(HashKey(v)));
        }
    }

    #[test]
    fn shard_lookup_over_sorted_ranges() {
        let third = u128::MAX / 3;
        let ranges = ShardRanges::new(vec![
            (HashKeyRange::new(2 * third + 1, u128::MAX).unwrap(), "c"),
            (HashKeyRange::new(0, third).unwrap(), "a"),
            (HashKeyRange::new(third + 1, 2 * third).unwrap(), "b"),
        ])
        .unwrap();
        assert!(ranges.covers_all());
        let find = |k| ranges.lookup(k).map(|(_, v)| *v);
        assert_eq!(find(0), Some("a"));
        assert_eq!(find(third), Some("a"));
        assert_eq!(find(third + 1), Some("b"));
        assert_eq!(find(2 * third), Some("b"));
        assert_eq!(find(2 * third + 1), Some("c"));
        assert_eq!(find(u128::MAX), Some("c"));
    }

    #[test]
    fn gaps_and_overlaps_are_reported() {
        let gap = ShardRanges::new(vec![
            (HashKeyRange::new(0, 10).unwrap(), 1),
            (HashKeyRange::new(20, u128::MAX).unwrap(), 2),
        ])
        .unwrap();
        assert!(!gap.covers_all());
        assert_eq!(gap.lookup(15), None);
        assert_eq!(gap.lookup(10).map(|(_, v)| *v), Some(1));
        assert!(ShardRanges::<u8>::new(vec![]).unwrap().lookup(0).is_none());

        let overlap =
            ShardRanges::new(vec![(HashKeyRange::new(0, 10).unwrap(), 1), (HashKeyRange::new(10, 20).unwrap(), 2)]);
        assert!(overlap.is_err());
        assert!(HashKeyRange::new(5, 4).is_err());
        assert!(HashKeyRange::parse("1", "x").is_err());
    }
}
