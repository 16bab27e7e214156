//! The records on either side of the format: user records and the Kinesis records that carry them.

use bytes::Bytes;

use crate::error::InvalidRecord;
use crate::hash::HashKey;
use crate::limits::MAX_PARTITION_KEY_CHARS;

/// A record as the user puts it: partition key, optional explicit hash key, data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserRecord {
    /// 1 to 256 Unicode characters.
    pub partition_key: String,
    /// Routes the record instead of the partition key's MD5 when present.
    pub explicit_hash_key: Option<HashKey>,
    /// The payload.
    pub data: Bytes,
}

impl UserRecord {
    /// A record routed by its partition key.
    pub fn new(partition_key: impl Into<String>, data: impl Into<Bytes>) -> Self {
        UserRecord { partition_key: partition_key.into(), explicit_hash_key: None, data: data.into() }
    }

    /// The same record, routed by `explicit_hash_key` instead.
    pub fn with_explicit_hash_key(mut self, explicit_hash_key: HashKey) -> Self {
        self.explicit_hash_key = Some(explicit_hash_key);
        self
    }

    /// The hash key Kinesis routes this record by.
    pub fn hash_key(&self) -> HashKey {
        self.explicit_hash_key.unwrap_or_else(|| HashKey::of_partition_key(&self.partition_key))
    }
}

/// Checks a partition key against the Kinesis limits: 1 to 256 Unicode characters.
///
/// # Errors
/// [`InvalidRecord::EmptyPartitionKey`] or [`InvalidRecord::PartitionKeyTooLong`].
pub fn validate_partition_key(partition_key: &str) -> Result<(), InvalidRecord> {
    if partition_key.is_empty() {
        return Err(InvalidRecord::EmptyPartitionKey);
    }
    // A key of at most 256 bytes has at most 256 characters; count only the longer ones.
    if partition_key.len() > MAX_PARTITION_KEY_CHARS {
        let chars = partition_key.chars().count();
        if chars > MAX_PARTITION_KEY_CHARS {
            return Err(InvalidRecord::PartitionKeyTooLong { chars });
        }
    }
    Ok(())
}

/// A record as Kinesis stores it: what one PutRecords entry carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KinesisRecord {
    /// The partition key of the entry (`"a"` for an aggregate).
    pub partition_key: String,
    /// The explicit hash key of the entry (an aggregate's is its first user record's hash key).
    pub explicit_hash_key: Option<HashKey>,
    /// The data: for an aggregate, magic + protobuf + MD5.
    pub data: Bytes,
}

/// A user record read back out of a Kinesis record.
///
/// A record that was not an aggregate comes out whole, with the Kinesis record's partition key and
/// no sub-sequence number.
///
/// The keys are slices of the Kinesis record's bytes (no copy), checked to be UTF-8 when the
/// aggregate was read; only this module builds a record, so the accessors can rely on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeaggregatedRecord {
    partition_key: Bytes,
    explicit_hash_key: Option<Bytes>,
    data: Bytes,
    sub_sequence_number: Option<u64>,
}

impl DeaggregatedRecord {
    /// A record that was not aggregated: the Kinesis record itself.
    pub fn plain(partition_key: &str, data: Bytes) -> Self {
        DeaggregatedRecord {
            partition_key: Bytes::copy_from_slice(partition_key.as_bytes()),
            explicit_hash_key: None,
            data,
            sub_sequence_number: None,
        }
    }

    /// A sub-record of an aggregate. The caller has checked that both keys are UTF-8.
    pub(crate) fn sub_record(
        partition_key: Bytes,
        explicit_hash_key: Option<Bytes>,
        data: Bytes,
        sub_sequence_number: u64,
    ) -> Self {
        debug_assert!(std::str::from_utf8(&partition_key).is_ok());
        DeaggregatedRecord { partition_key, explicit_hash_key, data, sub_sequence_number: Some(sub_sequence_number) }
    }

    /// The user record's partition key.
    pub fn partition_key(&self) -> &str {
        utf8(&self.partition_key)
    }

    /// The explicit hash key, as written in the aggregate; `None` when the sub-record has none
    /// (the KCL's reading: only a present index gives a key).
    pub fn explicit_hash_key(&self) -> Option<&str> {
        self.explicit_hash_key.as_deref().map(utf8)
    }

    /// The user's data.
    pub fn data(&self) -> &Bytes {
        &self.data
    }

    /// The user's data, taken out.
    pub fn into_data(self) -> Bytes {
        self.data
    }

    /// The position inside the aggregate, from 0; `None` for a record that was not aggregated.
    pub fn sub_sequence_number(&self) -> Option<u64> {
        self.sub_sequence_number
    }

    /// Whether the record came out of an aggregate.
    pub fn is_aggregated(&self) -> bool {
        self.sub_sequence_number.is_some()
    }
}

/// Text of a key that was checked to be UTF-8 when the record was built (so never empty by error).
fn utf8(key: &[u8]) -> &str {
    std::str::from_utf8(key).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_key_limits_count_characters_not_bytes() {
        assert_eq!(validate_partition_key(""), Err(InvalidRecord::EmptyPartitionKey));
        assert_eq!(validate_partition_key("k"), Ok(()));
        assert_eq!(validate_partition_key(&"x".repeat(256)), Ok(()));
        assert_eq!(validate_partition_key(&"x".repeat(257)), Err(InvalidRecord::PartitionKeyTooLong { chars: 257 }));
        // 256 two-byte characters are 512 bytes, and allowed.
        assert_eq!(validate_partition_key(&"é".repeat(256)), Ok(()));
        assert_eq!(validate_partition_key(&"é".repeat(257)), Err(InvalidRecord::PartitionKeyTooLong { chars: 257 }));
    }
}
