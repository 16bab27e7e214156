//! The numbers of the format and of the Kinesis service that bound it.

/// The four bytes that start every KPL aggregated record.
pub const MAGIC: [u8; 4] = [0xF3, 0x89, 0x9A, 0xC2];

/// Length of the MD5 digest that ends every aggregated record.
pub const DIGEST_LEN: usize = 16;

/// Magic plus digest: the bytes an aggregate has besides its protobuf body.
pub const FRAMING_LEN: usize = MAGIC.len() + DIGEST_LEN;

/// The KPL's default `AggregationMaxSize`: the largest aggregate (magic + protobuf + MD5), in bytes.
pub const DEFAULT_MAX_AGGREGATE_BYTES: usize = 51_200;

/// The Kinesis record size limit on a stream with default settings: data plus partition key, 1 MiB.
pub const MAX_RECORD_BYTES: usize = 1024 * 1024;

/// The largest Kinesis record size a stream can be configured for, 10 MiB.
pub const MAX_CONFIGURABLE_RECORD_BYTES: usize = 10 * 1024 * 1024;

/// The longest partition key, in Unicode characters (scalar values).
pub const MAX_PARTITION_KEY_CHARS: usize = 256;

/// The partition key the KPL gives the Kinesis record of an aggregate. The aggregate is routed by
/// its explicit hash key, so this key only costs one byte of the record's size.
pub const AGGREGATE_PARTITION_KEY: &str = "a";
