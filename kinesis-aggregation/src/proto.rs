//! The protobuf messages of the KPL aggregated record, declared with `prost`'s derive.
//!
//! The schema is proto2 (`messages.proto` of the KPL). Its `required` fields are declared here as
//! `optional` so that a decoded message can be checked for them: protobuf-java, which the KCL uses,
//! rejects a message that lacks a required field, and so do we (see [`AggregatedRecord::validate`]).
//! When encoding, every required field is `Some`, so it is always written, as the references do.
//!
//! The two key tables are `string` in the schema and `bytes` here: the wire format is the same, and
//! decoding from a `Bytes` buffer then slices the keys out of it instead of allocating a `String`
//! each. [`AggregatedRecord::validate`] checks that they are UTF-8.
//!
//! ```text
//! message AggregatedRecord { repeated string partition_key_table = 1;
//!                            repeated string explicit_hash_key_table = 2;
//!                            repeated Record records = 3; }
//! message Record { required uint64 partition_key_index = 1; optional uint64 explicit_hash_key_index = 2;
//!                  required bytes data = 3; repeated Tag tags = 4; }
//! message Tag    { required string key = 1; optional string value = 2; }
//! ```

use bytes::Bytes;

/// The protobuf body of an aggregated Kinesis record.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AggregatedRecord {
    /// Distinct partition keys (UTF-8), in first-use order.
    #[prost(bytes = "bytes", repeated, tag = "1")]
    pub partition_key_table: Vec<Bytes>,
    /// Distinct explicit hash keys (decimal strings, UTF-8), in first-use order.
    #[prost(bytes = "bytes", repeated, tag = "2")]
    pub explicit_hash_key_table: Vec<Bytes>,
    /// The user records.
    #[prost(message, repeated, tag = "3")]
    pub records: Vec<Record>,
}

/// One user record inside an aggregate.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Record {
    /// Index into `partition_key_table` (required).
    #[prost(uint64, optional, tag = "1")]
    pub partition_key_index: Option<u64>,
    /// Index into `explicit_hash_key_table`, present only when the record has an explicit hash key.
    #[prost(uint64, optional, tag = "2")]
    pub explicit_hash_key_index: Option<u64>,
    /// The user's data (required).
    #[prost(bytes = "bytes", optional, tag = "3")]
    pub data: Option<Bytes>,
    /// Tags: decoded so that a record carrying them is accepted; never written by this crate.
    #[prost(message, repeated, tag = "4")]
    pub tags: Vec<Tag>,
}

/// A key/value tag on a user record (unused by the KPL itself, but part of the schema).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Tag {
    /// The tag key (required).
    #[prost(string, optional, tag = "1")]
    pub key: Option<String>,
    /// The tag value.
    #[prost(string, optional, tag = "2")]
    pub value: Option<String>,
}

impl AggregatedRecord {
    /// Checks what protobuf-java checks on parse (required fields present, strings that are
    /// strings) and what the KCL needs to read the records (every index points into its table).
    ///
    /// # Errors
    /// The first problem found, which makes the aggregate corrupt.
    pub fn validate(&self) -> Result<(), Invalid> {
        let utf8 = |table: &[Bytes]| table.iter().all(|k| std::str::from_utf8(k).is_ok());
        if !utf8(&self.partition_key_table) || !utf8(&self.explicit_hash_key_table) {
            return Err(Invalid::NotUtf8);
        }
        let pks = self.partition_key_table.len() as u64;
        let ehks = self.explicit_hash_key_table.len() as u64;
        for r in &self.records {
            let Some(pk_index) = r.partition_key_index else { return Err(Invalid::MissingField) };
            if r.data.is_none() || r.tags.iter().any(|t| t.key.is_none()) {
                return Err(Invalid::MissingField);
            }
            if pk_index >= pks || r.explicit_hash_key_index.is_some_and(|i| i >= ehks) {
                return Err(Invalid::IndexOutOfRange);
            }
        }
        Ok(())
    }
}

/// What [`AggregatedRecord::validate`] found wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Invalid {
    /// A required field is missing.
    MissingField,
    /// A key table holds bytes that are not UTF-8.
    NotUtf8,
    /// A record's key index points past the end of its table.
    IndexOutOfRange,
}
