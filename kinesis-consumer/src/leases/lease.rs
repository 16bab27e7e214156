//! A lease: one row of the KCL 2.x lease table, one shard.
//!
//! | attribute | type | field |
//! |---|---|---|
//! | `leaseKey` | S | [`Lease::key`] (the shard id) |
//! | `leaseOwner` | S | [`Lease::owner`] (absent: free) |
//! | `leaseCounter` | N | [`Lease::counter`], the fencing token |
//! | `checkpoint` | S | [`Lease::checkpoint`]: a sequence number, or `TRIM_HORIZON` / `LATEST` / `AT_TIMESTAMP` / `SHARD_END` |
//! | `checkpointSubSequenceNumber` | N | the checkpoint's sub-sequence number |
//! | `pendingCheckpoint`, `pendingCheckpointSubSequenceNumber` | S, N | [`Lease::pending_checkpoint`] |
//! | `ownerSwitchesSinceCheckpoint` | N | [`Lease::owner_switches_since_checkpoint`] |
//! | `parentShardId` | SS | [`Lease::parent_shard_ids`] (absent when empty: a string set cannot be) |
//! | `childShardIds` | SS | [`Lease::child_shard_ids`] |
//! | `startingHashKey`, `endingHashKey` | S | [`Lease::hash_range`], decimal |
//! | `entityType` | S | rows whose type is set and is not `LEASE` are not leases |

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
    pub(crate) fn as_str(&self) -> &str {
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
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    /// `leaseKey`: the shard id.
    pub key: String,
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
}

impl Lease {
    /// A new, free lease for a shard, starting at `initial`.
    pub fn new(shard_id: impl Into<String>, initial: Position) -> Self {
        Lease {
            key: shard_id.into(),
            owner: None,
            counter: 0,
            checkpoint: Checkpoint::at(initial),
            pending_checkpoint: None,
            owner_switches_since_checkpoint: 0,
            parent_shard_ids: Vec::new(),
            child_shard_ids: Vec::new(),
            hash_range: None,
            owner_instance: None,
        }
    }

    /// The row, with the KCL's attribute names and types.
    pub fn to_item(&self) -> HashMap<String, AttributeValue> {
        let mut item = HashMap::new();
        let s = |v: &str| AttributeValue::S(v.to_owned());
        let n = |v: u64| AttributeValue::N(v.to_string());
        item.insert(LEASE_KEY.into(), s(&self.key));
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
                Ok(kind) if kind == "LEASE" => {}
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
            owner: text(LEASE_OWNER)?.cloned(),
            counter: number(LEASE_COUNTER)?.unwrap_or(0),
            checkpoint,
            pending_checkpoint,
            owner_switches_since_checkpoint: number(OWNER_SWITCHES)?.unwrap_or(0),
            parent_shard_ids: set(PARENT_SHARD_IDS)?,
            child_shard_ids: set(CHILD_SHARD_IDS)?,
            hash_range,
            owner_instance: text(OWNER_INSTANCE)?.cloned(),
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
/// This library's own attribute (see [`Lease::owner_instance`]).
pub(crate) const OWNER_INSTANCE: &str = "leaseOwnerInstance";

#[cfg(test)]
mod tests {
    use super::*;

    fn full() -> Lease {
        Lease {
            key: "shardId-000000000003".into(),
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
        }
    }

    #[test]
    fn a_lease_goes_to_a_kcl_row_and_back() {
        let lease = full();
        let item = lease.to_item();
        assert_eq!(Lease::from_item(&item).unwrap(), Some(lease));
        // The KCL's names and types.
        assert!(matches!(item["leaseCounter"], AttributeValue::N(ref n) if n == "42"));
        assert!(matches!(item["checkpointSubSequenceNumber"], AttributeValue::N(ref n) if n == "7"));
        assert!(matches!(item["parentShardId"], AttributeValue::Ss(ref v) if v.len() == 2));
        assert!(matches!(item["endingHashKey"], AttributeValue::S(ref s) if *s == (u128::MAX / 2).to_string()));
        assert!(matches!(item["pendingCheckpoint"], AttributeValue::S(ref s) if s == "SHARD_END"));
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
