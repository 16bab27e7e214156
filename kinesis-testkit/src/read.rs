//! Reading back everything in a stream, for tests that check what a producer wrote or what a
//! consumer should have seen.
//!
//! [`list_all_shards`] lists every shard, open and closed, with its lineage and hash key range.
//! [`read_shard`] reads one shard from TRIM_HORIZON to its end (a closed shard) or until it is
//! caught up (an open shard). [`read_stream`] does both for a whole stream, parents before
//! children. They work against every endpoint the test bed supports, and avoid what the
//! emulators get wrong:
//! - ListShards is paged with the stream name and ExclusiveStartShardId, never with NextToken:
//!   ferrokinesis fails a call with only a NextToken, and ferrokinesis, kinesis-local and AWS all
//!   refuse NextToken together with the stream name.
//! - The end of a closed shard is a GetRecords response without NextShardIterator; sequence
//!   numbers are never compared (kinesis-local reports a fake EndingSequenceNumber).
//! - Lineage comes from ListShards (ParentShardId / AdjacentParentShardId), as ferrokinesis sends
//!   no ChildShards. ferrokinesis also gives no ParentShardId to the shards UpdateShardCount
//!   makes, so there [`read_stream`] cannot order those shards after their parents.
//!
//! No timing is assumed: the reads stop on what the responses say, and give up with an error
//! after a bounded number of calls ([`MAX_GET_RECORDS_CALLS`], [`MAX_LIST_SHARDS_CALLS`]).
//!
//! Read a stream once nothing writes to it or reshards it any more: records put while a shard
//! is read may or may not be included, and shards created after the listing are not read.

use crate::error::{Error, Result};
use aws_sdk_kinesis::types::{Shard, ShardIteratorType};
use std::collections::HashSet;
use std::time::SystemTime;

/// The most GetRecords calls [`read_shard`] makes for one shard before it gives up.
pub const MAX_GET_RECORDS_CALLS: usize = 1000;

/// The most ListShards calls (pages) [`list_all_shards`] makes before it gives up.
pub const MAX_LIST_SHARDS_CALLS: usize = 1000;

/// Shards asked for per ListShards call: the most AWS allows.
const LIST_SHARDS_PAGE_SIZE: i32 = 10_000;

/// Records asked for per GetRecords call: the most AWS allows.
const GET_RECORDS_LIMIT: i32 = 10_000;

/// One record as GetRecords returned it, with the shard it was read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadRecord {
    /// The shard the record was read from.
    pub shard_id: String,
    /// Its sequence number, as the endpoint wrote it (a decimal string).
    pub sequence_number: String,
    /// Its partition key.
    pub partition_key: String,
    /// Its data blob, as stored: a KPL aggregated record is not deaggregated.
    pub data: Vec<u8>,
    /// ApproximateArrivalTimestamp, when the endpoint sent one (ferrokinesis: whole seconds).
    pub approximate_arrival: Option<SystemTime>,
}

/// A shard as ListShards describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardInfo {
    /// The shard id, e.g. `shardId-000000000000`.
    pub shard_id: String,
    /// ParentShardId: the shard this one was split from, or the first of the two it was merged
    /// from. `None` for an original shard, and on ferrokinesis for shards made by
    /// UpdateShardCount.
    pub parent_shard_id: Option<String>,
    /// AdjacentParentShardId: the second shard of a merge.
    pub adjacent_parent_shard_id: Option<String>,
    /// The first hash key of the shard's range, inclusive.
    pub starting_hash_key: u128,
    /// The last hash key of the shard's range, inclusive.
    pub ending_hash_key: u128,
    /// Whether the shard is closed: its sequence number range has an EndingSequenceNumber. (The
    /// value itself is not kept: kinesis-local's is fake.)
    pub closed: bool,
}

impl ShardInfo {
    /// Whether `hash_key` is in the shard's range.
    pub fn contains(&self, hash_key: u128) -> bool {
        (self.starting_hash_key..=self.ending_hash_key).contains(&hash_key)
    }

    /// The parent and the adjacent parent, those that are set.
    pub fn parents(&self) -> impl Iterator<Item = &str> {
        self.parent_shard_id.as_deref().into_iter().chain(self.adjacent_parent_shard_id.as_deref())
    }

    fn from_shard(stream: &str, shard: &Shard) -> Result<Self> {
        let shard_id = shard.shard_id();
        let range = shard
            .hash_key_range()
            .ok_or_else(|| Error::msg(format!("ListShards {stream}: shard {shard_id} has no HashKeyRange")))?;
        let parse = |key: &str| {
            key.parse::<u128>().map_err(|e| {
                Error::with_source(format!("ListShards {stream}: shard {shard_id} has a bad hash key {key:?}"), e)
            })
        };
        Ok(Self {
            shard_id: shard_id.to_owned(),
            parent_shard_id: shard.parent_shard_id().map(str::to_owned),
            adjacent_parent_shard_id: shard.adjacent_parent_shard_id().map(str::to_owned),
            starting_hash_key: parse(range.starting_hash_key())?,
            ending_hash_key: parse(range.ending_hash_key())?,
            closed: shard.sequence_number_range().and_then(|r| r.ending_sequence_number()).is_some(),
        })
    }
}

/// How [`read_shard`] stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShardEnd {
    /// A GetRecords response had no NextShardIterator: the shard is closed and was read to its
    /// end.
    Closed {
        /// The ChildShards of that last response; empty when the endpoint sends none
        /// (ferrokinesis never does).
        child_shard_ids: Vec<String>,
    },
    /// The shard was open when listed, and a GetRecords call returned no records and was not
    /// behind (MillisBehindLatest 0 or absent): every record put before that call was read.
    CaughtUp,
}

/// Everything [`read_shard`] read from one shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardRead {
    /// The shard that was read.
    pub shard_id: String,
    /// Its records from TRIM_HORIZON, in the order GetRecords returned them.
    pub records: Vec<ReadRecord>,
    /// Why the read stopped.
    pub end: ShardEnd,
}

/// Lists every shard of `stream`, open and closed, in the order ListShards gives them (by shard
/// id).
///
/// No ShardFilter is sent (ferrokinesis ignores it), so closed shards are included, as far as
/// the endpoint still lists them (AWS drops those past the retention period). Each call asks for
/// 10,000 shards; when a response has a NextToken, the next call sends the stream name with
/// ExclusiveStartShardId set to the last shard listed, which every endpoint accepts.
///
/// # Errors
/// When ListShards fails, a shard has no or a malformed hash key range, the endpoint lists a
/// shard twice (it ignored ExclusiveStartShardId), or there are still more shards after
/// [`MAX_LIST_SHARDS_CALLS`] calls.
pub async fn list_all_shards(client: &aws_sdk_kinesis::Client, stream: &str) -> Result<Vec<ShardInfo>> {
    list_shards_in_pages(client, stream, LIST_SHARDS_PAGE_SIZE).await
}

async fn list_shards_in_pages(
    client: &aws_sdk_kinesis::Client,
    stream: &str,
    page_size: i32,
) -> Result<Vec<ShardInfo>> {
    let mut shards: Vec<ShardInfo> = Vec::new();
    let mut seen = HashSet::new();
    for _ in 0..MAX_LIST_SHARDS_CALLS {
        let out = client
            .list_shards()
            .stream_name(stream)
            .max_results(page_size)
            .set_exclusive_start_shard_id(shards.last().map(|s| s.shard_id.clone()))
            .send()
            .await
            .map_err(|e| Error::with_source(format!("ListShards {stream} failed"), e))?;
        for shard in out.shards() {
            if !seen.insert(shard.shard_id().to_owned()) {
                return Err(Error::msg(format!(
                    "ListShards {stream} listed shard {} twice: the endpoint does not page by ExclusiveStartShardId",
                    shard.shard_id()
                )));
            }
            shards.push(ShardInfo::from_shard(stream, shard)?);
        }
        if out.next_token().is_none() || out.shards().is_empty() {
            return Ok(shards);
        }
    }
    Err(Error::msg(format!(
        "ListShards {stream}: still more shards after {MAX_LIST_SHARDS_CALLS} calls ({} listed)",
        shards.len()
    )))
}

/// Reads `shard` of `stream` from TRIM_HORIZON with GetRecords (10,000 records per call).
///
/// The read stops at the first response without NextShardIterator ([`ShardEnd::Closed`]). A
/// shard that was open when listed (`shard.closed == false`) also stops at the first call that
/// returns no records with MillisBehindLatest 0 or absent ([`ShardEnd::CaughtUp`]); a closed one
/// is read on through empty responses to its end.
///
/// # Errors
/// When GetShardIterator or GetRecords fails (the client's retry policy applies), the endpoint
/// returns no shard iterator, or the shard has not ended after [`MAX_GET_RECORDS_CALLS`]
/// GetRecords calls (for example because something keeps writing to it).
pub async fn read_shard(client: &aws_sdk_kinesis::Client, stream: &str, shard: &ShardInfo) -> Result<ShardRead> {
    let shard_id = shard.shard_id.as_str();
    let mut iterator = client
        .get_shard_iterator()
        .stream_name(stream)
        .shard_id(shard_id)
        .shard_iterator_type(ShardIteratorType::TrimHorizon)
        .send()
        .await
        .map_err(|e| Error::with_source(format!("GetShardIterator {stream}/{shard_id} (TRIM_HORIZON) failed"), e))?
        .shard_iterator
        .ok_or_else(|| Error::msg(format!("GetShardIterator {stream}/{shard_id} returned no shard iterator")))?;
    let mut records = Vec::new();
    for _ in 0..MAX_GET_RECORDS_CALLS {
        let out = client
            .get_records()
            .shard_iterator(iterator)
            .limit(GET_RECORDS_LIMIT)
            .send()
            .await
            .map_err(|e| Error::with_source(format!("GetRecords {stream}/{shard_id} failed"), e))?;
        let caught_up = out.records.is_empty() && out.millis_behind_latest.unwrap_or(0) == 0;
        for record in out.records {
            let approximate_arrival =
                record.approximate_arrival_timestamp.map(SystemTime::try_from).transpose().map_err(|e| {
                    Error::with_source(
                        format!(
                            "GetRecords {stream}/{shard_id}: record {} has an ApproximateArrivalTimestamp out of range",
                            record.sequence_number
                        ),
                        e,
                    )
                })?;
            records.push(ReadRecord {
                shard_id: shard_id.to_owned(),
                sequence_number: record.sequence_number,
                partition_key: record.partition_key,
                data: record.data.into_inner(),
                approximate_arrival,
            });
        }
        let Some(next) = out.next_shard_iterator else {
            let child_shard_ids = out.child_shards.unwrap_or_default().into_iter().map(|c| c.shard_id).collect();
            return Ok(ShardRead { shard_id: shard_id.to_owned(), records, end: ShardEnd::Closed { child_shard_ids } });
        };
        if caught_up && !shard.closed {
            return Ok(ShardRead { shard_id: shard_id.to_owned(), records, end: ShardEnd::CaughtUp });
        }
        iterator = next;
    }
    let state = if shard.closed { "closed shard did not end" } else { "open shard was still not caught up" };
    Err(Error::msg(format!(
        "{stream}/{shard_id}: the {state} after {MAX_GET_RECORDS_CALLS} GetRecords calls ({} records read)",
        records.len()
    )))
}

/// Reads every record of `stream`: [`list_all_shards`], ordered by [`parents_first`], then
/// [`read_shard`] on each. The records of each shard are together and in shard order, and a
/// shard's records come after those of its parents.
///
/// # Errors
/// When listing or reading a shard fails (see [`list_all_shards`] and [`read_shard`]), or the
/// listed lineage has a cycle.
pub async fn read_stream(client: &aws_sdk_kinesis::Client, stream: &str) -> Result<Vec<ReadRecord>> {
    let shards = parents_first(list_all_shards(client, stream).await?)?;
    let mut records = Vec::new();
    for shard in &shards {
        records.extend(read_shard(client, stream, shard).await?.records);
    }
    Ok(records)
}

/// Orders shards so that each comes after its parent and adjacent parent, keeping the given
/// order otherwise. A parent that is not in `shards` (for example trimmed past the retention
/// period) is ignored.
///
/// # Errors
/// When the lineage has a cycle, which no endpoint should report.
pub fn parents_first(shards: Vec<ShardInfo>) -> Result<Vec<ShardInfo>> {
    let listed: HashSet<String> = shards.iter().map(|s| s.shard_id.clone()).collect();
    let mut placed: HashSet<String> = HashSet::new();
    let mut ordered = Vec::with_capacity(shards.len());
    let mut waiting = shards;
    while !waiting.is_empty() {
        let before = waiting.len();
        let mut still_waiting = Vec::new();
        for shard in waiting {
            if shard.parents().all(|p| placed.contains(p) || !listed.contains(p)) {
                placed.insert(shard.shard_id.clone());
                ordered.push(shard);
            } else {
                still_waiting.push(shard);
            }
        }
        if still_waiting.len() == before {
            let ids: Vec<&str> = still_waiting.iter().map(|s| s.shard_id.as_str()).collect();
            return Err(Error::msg(format!("the shard lineage has a cycle among {ids:?}")));
        }
        waiting = still_waiting;
    }
    Ok(ordered)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard(id: &str, parent: Option<&str>, adjacent: Option<&str>) -> ShardInfo {
        ShardInfo {
            shard_id: id.to_owned(),
            parent_shard_id: parent.map(str::to_owned),
            adjacent_parent_shard_id: adjacent.map(str::to_owned),
            starting_hash_key: 0,
            ending_hash_key: u128::MAX,
            closed: false,
        }
    }

    fn ids(shards: &[ShardInfo]) -> Vec<&str> {
        shards.iter().map(|s| s.shard_id.as_str()).collect()
    }

    #[test]
    fn parents_first_keeps_an_order_that_is_already_right() {
        let shards = vec![shard("a", None, None), shard("b", None, None), shard("c", Some("a"), None)];
        assert_eq!(ids(&parents_first(shards).expect("no cycle")), ["a", "b", "c"]);
    }

    #[test]
    fn parents_first_moves_children_after_parent_and_adjacent_parent() {
        // A merge child listed before both its parents, and a split child of the merge child.
        let shards = vec![
            shard("d", Some("c"), None),
            shard("c", Some("a"), Some("b")),
            shard("x", None, None),
            shard("b", None, None),
            shard("a", None, None),
        ];
        let ordered = parents_first(shards).expect("no cycle");
        let order = ids(&ordered);
        let at = |id: &str| order.iter().position(|s| *s == id).expect("every shard is kept");
        assert_eq!(order.len(), 5);
        assert!(at("a") < at("c") && at("b") < at("c") && at("c") < at("d"), "{order:?}");
        assert_eq!(order, ["x", "b", "a", "c", "d"], "otherwise the given order is kept");
    }

    #[test]
    fn parents_first_ignores_parents_that_are_not_listed() {
        let shards = vec![shard("c", Some("gone"), Some("also-gone")), shard("d", Some("c"), None)];
        assert_eq!(ids(&parents_first(shards).expect("no cycle")), ["c", "d"]);
    }

    #[test]
    fn parents_first_reports_a_cycle() {
        let shards = vec![shard("a", Some("b"), None), shard("b", Some("a"), None), shard("c", None, None)];
        let err = parents_first(shards).expect_err("a cycle");
        assert!(err.to_string().contains("cycle"), "{err}");
    }

    #[test]
    fn contains_is_inclusive() {
        let s = ShardInfo { starting_hash_key: 10, ending_hash_key: 20, ..shard("a", None, None) };
        assert!(s.contains(10) && s.contains(20) && !s.contains(9) && !s.contains(21));
        assert_eq!(s.parents().count(), 0);
    }

    /// Pages of two shards, so that every page after the first goes by ExclusiveStartShardId.
    /// Runs on the embedded ferrokinesis, or on `AWS_ENDPOINT_URL_KINESIS`.
    #[tokio::test]
    async fn list_shards_pages_by_exclusive_start_shard_id() {
        let kinesis = crate::Kinesis::start().await.expect("start Kinesis");
        let client = kinesis.client();
        let stream = kinesis.create_stream(5).await.expect("create a 5-shard stream");
        let paged = list_shards_in_pages(&client, &stream, 2).await.expect("list in pages of 2");
        let whole = list_all_shards(&client, &stream).await.expect("list in one page");
        assert_eq!(paged.len(), 5, "{paged:?}");
        assert_eq!(paged, whole);
        assert!(paged.iter().all(|s| !s.closed && s.parent_shard_id.is_none()), "{paged:?}");
        assert_eq!(paged.first().map(|s| s.starting_hash_key), Some(0));
        assert_eq!(paged.last().map(|s| s.ending_hash_key), Some(u128::MAX));
        for pair in paged.windows(2) {
            assert_eq!(pair[0].ending_hash_key + 1, pair[1].starting_hash_key, "{paged:?}");
        }
    }
}
