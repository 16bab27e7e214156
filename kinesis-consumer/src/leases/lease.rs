//! A lease: one row of the KCL lease table (the 2.x schema and the 3.x additions), one shard.
//!
//! | attribute | type | field |
//! |---|---|---|
//! | `leaseKey` | S | [`Lease::key`]: the shard id; in a multi-stream table `account:stream:creationEpoch:shardId` |
//! | `streamName` | S | [`Lease::stream_identifier`] (multi-stream tables only; KCL `MultiStreamLease`): `account:stream:creationEpoch` |
//! | `shardId` | S | [`Lease::shard_id`] (multi-stream tables only) |
//! | `leaseOwner` | S | [`Lease::owner`] (absent: free) |
//! | `leaseCounter` | N | [`Lease::counter`], the fencing token |
//! | `checkpoint` | S | [`Lease::checkpoint`]: a sequence number, or `TRIM_HORIZON` / `LATEST` / `AT_TIMESTAMP` / `SHARD_END` |
//! | `checkpointSubSequenceNumber` | N | the checkpoint's sub-sequence number |
//! | `pendingCheckpoint`, `pendingCheckpointSubSequenceNumber` | S, N | [`Lease::pending_checkpoint`] |
//! | `ownerSwitchesSinceCheckpoint` | N | [`Lease::owner_switches_since_checkpoint`] |
//! | `parentShardId` | SS | [`Lease::parent_shard_ids`] (absent when empty: a string set cannot be) |
//! | `childShardIds` | SS | [`Lease::child_shard_ids`] |
//! | `startingHashKey`, `endingHashKey` | S | [`Lease::hash_range`], decimal |
//! | `checkpointOwner` | S | [`Lease::checkpoint_owner`] (KCL 3.x: set during a graceful handoff) |
//! | `throughputKBps` | N | [`Lease::throughput_kbps`] (KCL 3.x: written by every renewal) |
//! | `entityType` | S | `LEASE` (KCL 3.5); rows whose type is set and is not `LEASE` are not leases |

use std::collections::HashMap;

use aws_sdk_dynamodb::types::AttributeValue;
use kinesis_aggregation::HashKeyRange;

/// Where a shard's processing stands (the `checkpoint` attribute).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Position {
    /// Not started; begin at the oldest record.
    TrimHorizon,
    /// Not started; begin at the newest.
    Latest,
    /// Not started; begin at the configured timestamp.
    AtTimestamp,
    /// The shard is closed and every record of it was processed.
    ShardEnd,
    /// Processed up to this sequence number.
    Sequence(String),
}

impl Position {
    /// The `checkpoint` attribute's text: `TRIM_HORIZON`, `LATEST`, `AT_TIMESTAMP`, `SHARD_END`,
    /// or the sequence number.
    pub fn as_str(&self) -> &str {
        match self {
            Position::TrimHorizon => "TRIM_HORIZON",
            Position::Latest => "LATEST",
            Position::AtTimestamp => "AT_TIMESTAMP",
            Position::ShardEnd => "SHARD_END",
            Position::Sequence(sequence) => sequence,
        }
    }

    fn parse(text: &str) -> Option<Position> {
        Some(match text {
            "TRIM_HORIZON" => Position::TrimHorizon,
            "LATEST" => Position::Latest,
            "AT_TIMESTAMP" => Position::AtTimestamp,
            "SHARD_END" => Position::ShardEnd,
            digits if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) => {
                Position::Sequence(digits.to_owned())
            }
            _ => return None,
        })
    }
}

/// A checkpoint: a position and, inside an aggregated Kinesis record, the sub-record.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Checkpoint {
    /// Where.
    pub position: Position,
    /// The sub-sequence number inside the Kinesis record at `position` (0 for plain records).
    pub sub_sequence: u64,
}

impl Checkpoint {
    /// A checkpoint at a position, sub-sequence 0.
    pub fn at(position: Position) -> Self {
        Checkpoint { position, sub_sequence: 0 }
    }
}

/// One lease, as read from the table.
#[derive(Clone, Debug, PartialEq)]
pub struct Lease {
    /// `leaseKey`: the shard id; in a multi-stream table (KCL `MultiStreamLease`), the stream
    /// identifier and the shard id, `account:stream:creationEpoch:shardId`.
    pub key: String,
    /// `streamName` (multi-stream tables only): the stream identifier
    /// `account:stream:creationEpoch` (the KCL's attribute name, though it holds more than a name).
    pub stream_identifier: Option<String>,
    /// `shardId` (multi-stream tables only): the shard. [`Lease::shard`] gives the shard id of
    /// any lease.
    pub shard_id: Option<String>,
    /// `leaseOwner`: the worker holding it; `None` when free.
    pub owner: Option<String>,
    /// `leaseCounter`: bumped by every renew, take, release and checkpoint. Every write is
    /// conditional on it, and other workers judge expiry by watching it change.
    pub counter: u64,
    /// `checkpoint` and `checkpointSubSequenceNumber`.
    pub checkpoint: Checkpoint,
    /// `pendingCheckpoint` and its sub-sequence number (the KCL's two-phase checkpoint).
    pub pending_checkpoint: Option<Checkpoint>,
    /// `ownerSwitchesSinceCheckpoint`.
    pub owner_switches_since_checkpoint: u64,
    /// `parentShardId`: the parent and, after a merge, the adjacent parent.
    pub parent_shard_ids: Vec<String>,
    /// `childShardIds`.
    pub child_shard_ids: Vec<String>,
    /// `startingHashKey` and `endingHashKey`.
    pub hash_range: Option<HashKeyRange>,
    /// `leaseOwnerInstance` (this library's; the KCL leaves it alone): which running instance of
    /// the owner took the lease, written by every take. A write whose answer was lost moves the
    /// counter; the next write finds the row still names this owner *and this instance*, and
    /// goes on, where a second instance running under the same worker id would have taken it.
    pub owner_instance: Option<String>,
    /// `checkpointOwner` (KCL 3.x): set while a graceful handoff is under way. The leader set
    /// `leaseOwner` to the new owner and this to the old one, which still processes the shard,
    /// checkpoints and then transfers the lease (removes this and bumps the counter). Until
    /// then the new owner does not start.
    pub checkpoint_owner: Option<String>,
    /// `throughputKBps` (KCL 3.x): the data delivered to the processor in KiB per second,
    /// smoothed, as its holder last renewed it. A KCL 3.x leader balances by it.
    pub throughput_kbps: Option<f64>,
}

impl Lease {
    /// A new, free lease for a shard, starting at `initial`.
    pub fn new(shard_id: impl Into<String>, initial: Position) -> Self {
        Lease {
            key: shard_id.into(),
            stream_identifier: None,
            shard_id: None,
            owner: None,
            counter: 0,
            checkpoint: Checkpoint::at(initial),
            pending_checkpoint: None,
            owner_switches_since_checkpoint: 0,
            parent_shard_ids: Vec::new(),
            child_shard_ids: Vec::new(),
            hash_range: None,
            owner_instance: None,
            checkpoint_owner: None,
            throughput_kbps: None,
        }
    }

    /// A new, free lease for a shard of a stream in a multi-stream table: key
    /// `account:stream:creationEpoch:shardId`, with the `streamName` and `shardId` attributes.
    pub fn new_in_stream(stream_identifier: &str, shard_id: impl Into<String>, initial: Position) -> Self {
        Lease::new(shard_id, initial).into_stream(stream_identifier)
    }

    /// This lease of a single-stream table (keyed by its shard id) as the lease of that shard of
    /// `stream_identifier` in a multi-stream table.
    pub(crate) fn into_stream(mut self, stream_identifier: &str) -> Self {
        let shard_id = std::mem::take(&mut self.key);
        self.key = lease_key(Some(stream_identifier), &shard_id);
        self.stream_identifier = Some(stream_identifier.to_owned());
        self.shard_id = Some(shard_id);
        self
    }

    /// The shard id: the `shardId` attribute in a multi-stream table, the key otherwise.
    pub fn shard(&self) -> &str {
        self.shard_id.as_deref().unwrap_or(&self.key)
    }

    /// The key of the lease of another shard of the same stream (a parent's or a child's): the
    /// shard id itself in a single-stream table.
    pub fn sibling_key(&self, shard_id: &str) -> String {
        lease_key(self.stream_identifier.as_deref(), shard_id)
    }

    /// Who processes the shard now: the checkpoint owner during a handoff, else the owner (the
    /// KCL's `actualOwner`).
    pub fn actual_owner(&self) -> Option<&str> {
        self.checkpoint_owner.as_deref().or(self.owner.as_deref())
    }

    /// The row, with the KCL's attribute names and types.
    pub fn to_item(&self) -> HashMap<String, AttributeValue> {
        let mut item = HashMap::new();
        let s = |v: &str| AttributeValue::S(v.to_owned());
        let n = |v: u64| AttributeValue::N(v.to_string());
        item.insert(LEASE_KEY.into(), s(&self.key));
        if let Some(stream) = &self.stream_identifier {
            item.insert(STREAM_NAME.into(), s(stream));
        }
        if let Some(shard_id) = &self.shard_id {
            item.insert(SHARD_ID.into(), s(shard_id));
        }
        if let Some(owner) = &self.owner {
            item.insert(LEASE_OWNER.into(), s(owner));
        }
        item.insert(LEASE_COUNTER.into(), n(self.counter));
        item.insert(CHECKPOINT.into(), s(self.checkpoint.position.as_str()));
        item.insert(CHECKPOINT_SUB_SEQUENCE.into(), n(self.checkpoint.sub_sequence));
        if let Some(pending) = &self.pending_checkpoint {
            item.insert(PENDING_CHECKPOINT.into(), s(pending.position.as_str()));
            item.insert(PENDING_CHECKPOINT_SUB_SEQUENCE.into(), n(pending.sub_sequence));
        }
        item.insert(OWNER_SWITCHES.into(), n(self.owner_switches_since_checkpoint));
        if !self.parent_shard_ids.is_empty() {
            item.insert(PARENT_SHARD_IDS.into(), AttributeValue::Ss(self.parent_shard_ids.clone()));
        }
        if !self.child_shard_ids.is_empty() {
            item.insert(CHILD_SHARD_IDS.into(), AttributeValue::Ss(self.child_shard_ids.clone()));
        }
        if let Some(range) = self.hash_range {
            item.insert(STARTING_HASH_KEY.into(), s(&range.start.to_string()));
            item.insert(ENDING_HASH_KEY.into(), s(&range.end.to_string()));
        }
        if let Some(instance) = &self.owner_instance {
            item.insert(OWNER_INSTANCE.into(), s(instance));
        }
        if let Some(owner) = &self.checkpoint_owner {
            item.insert(CHECKPOINT_OWNER.into(), s(owner));
        }
        if let Some(kbps) = self.throughput_kbps {
            item.insert(THROUGHPUT_KBPS.into(), AttributeValue::N(format_kbps(kbps)));
        }
        item.insert(ENTITY_TYPE.into(), s(LEASE_ENTITY));
        item
    }

    /// Reads a row. `Ok(None)` for a row that is not a lease (its `entityType` is set and is not
    /// `LEASE`).
    ///
    /// # Errors
    /// A description of the first attribute that is missing or malformed.
    pub fn from_item(item: &HashMap<String, AttributeValue>) -> Result<Option<Lease>, String> {
        if let Some(kind) = item.get(ENTITY_TYPE) {
            match kind.as_s() {
                Ok(kind) if kind == LEASE_ENTITY => {}
                _ => return Ok(None),
            }
        }
        let text = |name: &str| -> Result<Option<&String>, String> {
            item.get(name).map(|v| v.as_s().map_err(|_| format!("{name} is not a string"))).transpose()
        };
        let number = |name: &str| -> Result<Option<u64>, String> {
            item.get(name)
                .map(|v| {
                    v.as_n()
                        .map_err(|_| format!("{name} is not a number"))?
                        .parse::<u64>()
                        .map_err(|e| format!("{name}: {e}"))
                })
                .transpose()
        };
        let set = |name: &str| -> Result<Vec<String>, String> {
            match item.get(name) {
                None => Ok(Vec::new()),
                Some(AttributeValue::Ss(values)) => Ok(values.clone()),
                Some(_) => Err(format!("{name} is not a string set")),
            }
        };
        let key = text(LEASE_KEY)?.ok_or("no leaseKey")?.clone();
        let position = |name: &str| -> Result<Option<Position>, String> {
            text(name)?.map(|t| Position::parse(t).ok_or_else(|| format!("{name} {t:?} is not a position"))).transpose()
        };
        let checkpoint = Checkpoint {
            // The KCL writes a checkpoint with every lease; a row without one has not started.
            position: position(CHECKPOINT)?.unwrap_or(Position::TrimHorizon),
            sub_sequence: number(CHECKPOINT_SUB_SEQUENCE)?.unwrap_or(0),
        };
        let pending_checkpoint = position(PENDING_CHECKPOINT)?
            .map(|position| {
                Ok::<_, String>(Checkpoint {
                    position,
                    sub_sequence: number(PENDING_CHECKPOINT_SUB_SEQUENCE)?.unwrap_or(0),
                })
            })
            .transpose()?;
        let hash_range = match (text(STARTING_HASH_KEY)?, text(ENDING_HASH_KEY)?) {
            (Some(start), Some(end)) => Some(HashKeyRange::parse(start, end).map_err(|e| e.to_string())?),
            _ => None,
        };
        Ok(Some(Lease {
            key,
            stream_identifier: text(STREAM_NAME)?.cloned(),
            shard_id: text(SHARD_ID)?.cloned(),
            owner: text(LEASE_OWNER)?.cloned(),
            counter: number(LEASE_COUNTER)?.unwrap_or(0),
            checkpoint,
            pending_checkpoint,
            owner_switches_since_checkpoint: number(OWNER_SWITCHES)?.unwrap_or(0),
            parent_shard_ids: set(PARENT_SHARD_IDS)?,
            child_shard_ids: set(CHILD_SHARD_IDS)?,
            hash_range,
            owner_instance: text(OWNER_INSTANCE)?.cloned(),
            checkpoint_owner: text(CHECKPOINT_OWNER)?.cloned(),
            throughput_kbps: item
                .get(THROUGHPUT_KBPS)
                .map(|v| {
                    v.as_n()
                        .map_err(|_| format!("{THROUGHPUT_KBPS} is not a number"))?
                        .parse::<f64>()
                        .map_err(|e| format!("{THROUGHPUT_KBPS}: {e}"))
                })
                .transpose()?,
        }))
    }
}

// The KCL 2.x attribute names.
pub(crate) const LEASE_KEY: &str = "leaseKey";
pub(crate) const LEASE_OWNER: &str = "leaseOwner";
pub(crate) const LEASE_COUNTER: &str = "leaseCounter";
pub(crate) const CHECKPOINT: &str = "checkpoint";
pub(crate) const CHECKPOINT_SUB_SEQUENCE: &str = "checkpointSubSequenceNumber";
pub(crate) const PENDING_CHECKPOINT: &str = "pendingCheckpoint";
pub(crate) const PENDING_CHECKPOINT_SUB_SEQUENCE: &str = "pendingCheckpointSubSequenceNumber";
pub(crate) const OWNER_SWITCHES: &str = "ownerSwitchesSinceCheckpoint";
pub(crate) const PARENT_SHARD_IDS: &str = "parentShardId";
pub(crate) const CHILD_SHARD_IDS: &str = "childShardIds";
pub(crate) const STARTING_HASH_KEY: &str = "startingHashKey";
pub(crate) const ENDING_HASH_KEY: &str = "endingHashKey";
pub(crate) const ENTITY_TYPE: &str = "entityType";
/// Multi-stream tables (KCL `MultiStreamLease`): the stream identifier, and the shard id.
pub(crate) const STREAM_NAME: &str = "streamName";
pub(crate) const SHARD_ID: &str = "shardId";
pub(crate) const CHECKPOINT_OWNER: &str = "checkpointOwner";
pub(crate) const THROUGHPUT_KBPS: &str = "throughputKBps";
/// `entityType` of a lease row (KCL 3.5).
pub(crate) const LEASE_ENTITY: &str = "LEASE";
/// Keys of the rows a KCL 3.5 keeps beside the leases; never lease keys, never worker ids.
pub(crate) const RESERVED_KEYS: [&str; 3] = ["Leader", "Migration3.0", "TableMigration3.5"];

/// The key of a shard's lease: the shard id, or in a multi-stream table (KCL `MultiStreamLease`)
/// `account:stream:creationEpoch:shardId`.
pub(crate) fn lease_key(stream_identifier: Option<&str>, shard_id: &str) -> String {
    match stream_identifier {
        Some(stream) => format!("{stream}:{shard_id}"),
        None => shard_id.to_owned(),
    }
}

/// A throughput as DynamoDB takes it: a finite, non-negative decimal with at most 6 places (the
/// KCL rounds to 6).
pub(crate) fn format_kbps(kbps: f64) -> String {
    let kbps = if kbps.is_finite() && kbps > 0.0 { kbps } else { 0.0 };
    let text = format!("{kbps:.6}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    if text.is_empty() { "0".into() } else { text.into() }
}

/// This library's own attribute (see [`Lease::owner_instance`]).
pub(crate) const OWNER_INSTANCE: &str = "leaseOwnerInstance";

#[cfg(test)]
mod tests {
    use super::*;

    fn full() -> Lease {
        Lease {
            key: "shardId-000000000003".into(),
            stream_identifier: None,
            shard_id: None,
            owner: Some("worker-a".into()),
            counter: 42,
            checkpoint: Checkpoint {
                position: Position::Sequence("49590338271490256608559692538361571095921575989136588898".into()),
                sub_sequence: 7,
            },
            pending_checkpoint: Some(Checkpoint::at(Position::ShardEnd)),
            owner_switches_since_checkpoint: 2,
            parent_shard_ids: vec!["shardId-000000000000".into(), "shardId-000000000001".into()],
            child_shard_ids: vec!["shardId-000000000005".into()],
            hash_range: Some(HashKeyRange::new(0, u128::MAX / 2).unwrap()),
            owner_instance: Some("4f2a".into()),
            checkpoint_owner: Some("worker-b".into()),
            throughput_kbps: Some(12.5),
        }
    }

    #[test]
    fn a_lease_goes_to_a_kcl_row_and_back() {
        let lease = full();
        let item = lease.to_item();
        assert_eq!(Lease::from_item(&item).unwrap(), Some(lease.clone()));
        // The KCL's names and types.
        assert!(matches!(item["leaseCounter"], AttributeValue::N(ref n) if n == "42"));
        assert!(matches!(item["checkpointSubSequenceNumber"], AttributeValue::N(ref n) if n == "7"));
        assert!(matches!(item["parentShardId"], AttributeValue::Ss(ref v) if v.len() == 2));
        assert!(matches!(item["endingHashKey"], AttributeValue::S(ref s) if *s == (u128::MAX / 2).to_string()));
        assert!(matches!(item["pendingCheckpoint"], AttributeValue::S(ref s) if s == "SHARD_END"));
        assert!(matches!(item["checkpointOwner"], AttributeValue::S(ref s) if s == "worker-b"));
        assert!(matches!(item["throughputKBps"], AttributeValue::N(ref n) if n == "12.5"));
        assert!(matches!(item["entityType"], AttributeValue::S(ref s) if s == "LEASE"), "KCL 3.5 marks leases");
        assert_eq!(lease.actual_owner(), Some("worker-b"), "during a handoff the checkpoint owner processes");
    }

    #[test]
    fn a_multi_stream_lease_has_the_kcl_key_and_attributes() {
        let lease = Lease::new_in_stream("111122223333:orders:1700000000", "shardId-000000000002", Position::Latest);
        assert_eq!(lease.key, "111122223333:orders:1700000000:shardId-000000000002");
        assert_eq!(lease.shard(), "shardId-000000000002");
        assert_eq!(lease.sibling_key("shardId-000000000000"), "111122223333:orders:1700000000:shardId-000000000000");
        let item = lease.to_item();
        assert!(matches!(item["streamName"], AttributeValue::S(ref s) if s == "111122223333:orders:1700000000"));
        assert!(matches!(item["shardId"], AttributeValue::S(ref s) if s == "shardId-000000000002"));
        assert_eq!(Lease::from_item(&item).unwrap(), Some(lease));
        let single = Lease::new("shardId-000000000002", Position::Latest);
        assert_eq!((single.shard(), single.sibling_key("p").as_str()), ("shardId-000000000002", "p"));
        assert!(!single.to_item().contains_key("streamName"));
    }

    #[test]
    fn throughput_is_written_as_the_kcl_reads_it() {
        for (kbps, text) in [(0.0, "0"), (1.0, "1"), (12.3456789, "12.345679"), (-3.0, "0"), (f64::NAN, "0")] {
            assert_eq!(format_kbps(kbps), text, "{kbps}");
        }
    }

    #[test]
    fn a_free_new_lease_has_no_owner_and_no_empty_sets() {
        let item = Lease::new("shardId-000000000000", Position::TrimHorizon).to_item();
        assert!(!item.contains_key("leaseOwner"));
        assert!(!item.contains_key("parentShardId"), "a string set cannot be empty in DynamoDB");
        assert!(matches!(item["checkpoint"], AttributeValue::S(ref s) if s == "TRIM_HORIZON"));
    }

    #[test]
    fn rows_that_are_not_leases_are_skipped_and_bad_rows_are_errors() {
        let mut item = full().to_item();
        item.insert("entityType".into(), AttributeValue::S("WORKER_METRICS".into()));
        assert_eq!(Lease::from_item(&item), Ok(None));
        item.insert("entityType".into(), AttributeValue::S("LEASE".into()));
        assert!(Lease::from_item(&item).unwrap().is_some());
        item.insert("leaseCounter".into(), AttributeValue::S("x".into()));
        assert!(Lease::from_item(&item).unwrap_err().contains("leaseCounter"));
        let mut item = full().to_item();
        item.insert("checkpoint".into(), AttributeValue::S("somewhere".into()));
        assert!(Lease::from_item(&item).unwrap_err().contains("checkpoint"));
    }
}
