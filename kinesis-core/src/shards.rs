//! One ListShards pager.
//!
//! Every page asks for `page_size` shards (at most 10,000) by the stream's name or ARN, and the
//! next page starts after the last shard listed (`ExclusiveStartShardId`). A `NextToken` may not
//! be sent together with the stream's name or ARN, and a NextToken-only call fails on ferrokinesis;
//! this form works on AWS and on both emulators (by ARN: on AWS and kinesis-local; ferrokinesis
//! 0.7 lists by name only). No `ShardFilter` is sent: closed shards are listed too,
//! as far as the service still lists them (it drops those closed longer ago than the retention
//! period).

use std::collections::HashSet;

use kinesis_aggregation::HashKeyRange;

use crate::errors::ServiceError;
use crate::stream::StreamAddress;

/// The most ListShards calls one listing makes (10,000 shards a page: far more shards than a
/// stream may have).
const MAX_CALLS: usize = 1_000;

/// A shard as ListShards describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shard {
    /// `ShardId`.
    pub shard_id: String,
    /// `ParentShardId`: the shard this one was split from, or the first of two merged.
    pub parent_shard_id: Option<String>,
    /// `AdjacentParentShardId`: the second shard of a merge.
    pub adjacent_parent_shard_id: Option<String>,
    /// `HashKeyRange`.
    pub hash_range: HashKeyRange,
    /// Whether the shard still takes records (its sequence-number range has no ending number).
    pub open: bool,
}

impl Shard {
    /// A shard (for tests and in-memory transports).
    pub fn new(shard_id: impl Into<String>, hash_range: HashKeyRange, open: bool) -> Self {
        Shard { shard_id: shard_id.into(), parent_shard_id: None, adjacent_parent_shard_id: None, hash_range, open }
    }

    /// The parent and the adjacent parent, those that are set.
    pub fn parents(&self) -> impl Iterator<Item = &str> {
        self.parent_shard_id.iter().chain(&self.adjacent_parent_shard_id).map(String::as_str)
    }
}

/// What DescribeStreamSummary says of a stream that a producer or consumer needs.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct StreamSummary {
    /// The stream's ARN (its account and region: a multi-stream consumer's stream identifier).
    pub arn: String,
    /// When the stream was created, in whole seconds since the Unix epoch.
    pub creation_epoch: u64,
    /// `MaxRecordSizeInKiB` in bytes, when the endpoint tells it (AWS: 1 MiB by default, up to
    /// 10 MiB since 2025).
    pub max_record_bytes: Option<usize>,
}

/// One DescribeStreamSummary call.
///
/// # Errors
/// A classified [`ServiceError`] (`NotFound`: no such stream); `Invalid` for an answer without a
/// summary.
pub async fn describe_stream(
    client: &aws_sdk_kinesis::Client,
    stream: &StreamAddress,
) -> Result<StreamSummary, ServiceError> {
    let (name, arn) = stream.request_fields();
    let out = client
        .describe_stream_summary()
        .set_stream_name(name)
        .set_stream_arn(arn)
        .send()
        .await
        .map_err(|e| ServiceError::kinesis("DescribeStreamSummary", e))?;
    let Some(summary) = out.stream_description_summary() else {
        return Err(ServiceError::invalid_answer("DescribeStreamSummary", format!("no summary of {stream}")));
    };
    let kib = summary.max_record_size_in_kib();
    Ok(StreamSummary {
        arn: summary.stream_arn().to_owned(),
        creation_epoch: summary.stream_creation_timestamp().secs().max(0) as u64,
        max_record_bytes: kib.and_then(|k| usize::try_from(k).ok()).filter(|k| *k > 0).map(|k| k * 1024),
    })
}

/// Every shard of `stream`, open and closed, in the order the service lists them (by shard id),
/// 1,000 a page.
///
/// # Errors
/// As [`list_shards_paged`].
pub async fn list_shards(client: &aws_sdk_kinesis::Client, stream: &StreamAddress) -> Result<Vec<Shard>, ServiceError> {
    list_shards_paged(client, stream, 1000).await
}

/// Every shard of `stream`, `page_size` a call.
///
/// # Errors
/// A classified [`ServiceError`] when a call fails (`NotFound`: no such stream); `Invalid` when
/// the answer cannot be right: a shard without a valid hash-key range, a shard listed twice (the
/// endpoint ignored `ExclusiveStartShardId`), or still more shards after 1,000 calls.
pub async fn list_shards_paged(
    client: &aws_sdk_kinesis::Client,
    stream: &StreamAddress,
    page_size: i32,
) -> Result<Vec<Shard>, ServiceError> {
    let mut shards: Vec<Shard> = Vec::new();
    let mut seen = HashSet::new();
    let (name, arn) = stream.request_fields();
    for _ in 0..MAX_CALLS {
        let out = client
            .list_shards()
            .set_stream_name(name.clone())
            .set_stream_arn(arn.clone())
            .max_results(page_size)
            .set_exclusive_start_shard_id(shards.last().map(|s| s.shard_id.clone()))
            .send()
            .await
            .map_err(|e| ServiceError::kinesis("ListShards", e))?;
        for shard in out.shards() {
            let shard_id = shard.shard_id();
            if !seen.insert(shard_id.to_owned()) {
                return Err(ServiceError::invalid_answer(
                    "ListShards",
                    format!(
                        "shard {shard_id} of {stream} listed twice: the endpoint does not page by ExclusiveStartShardId"
                    ),
                ));
            }
            let hash_range = shard
                .hash_key_range()
                .and_then(|r| HashKeyRange::parse(r.starting_hash_key(), r.ending_hash_key()).ok())
                .ok_or_else(|| {
                    ServiceError::invalid_answer("ListShards", format!("shard {shard_id} has no valid hash-key range"))
                })?;
            shards.push(Shard {
                shard_id: shard_id.to_owned(),
                parent_shard_id: shard.parent_shard_id().map(str::to_owned),
                adjacent_parent_shard_id: shard.adjacent_parent_shard_id().map(str::to_owned),
                hash_range,
                open: shard.sequence_number_range().is_none_or(|r| r.ending_sequence_number().is_none()),
            });
        }
        if out.next_token().is_none_or(str::is_empty) || out.shards().is_empty() {
            return Ok(shards);
        }
    }
    Err(ServiceError::invalid_answer(
        "ListShards",
        format!("{stream}: still more shards after {MAX_CALLS} calls ({} listed)", shards.len()),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_shard_is_listed_once_across_pages() {
        let kinesis = kinesis_testkit::Kinesis::start().await.unwrap();
        let client = kinesis.client();
        let stream = StreamAddress::parse(&kinesis.create_stream(5).await.unwrap()).unwrap();
        let one_a_page = list_shards_paged(&client, &stream, 1).await.unwrap();
        let all = list_shards(&client, &stream).await.unwrap();
        assert_eq!(one_a_page, all);
        assert_eq!(all.len(), 5);
        assert!(all.iter().all(|s| s.open && s.parents().next().is_none()));
        assert_eq!(all.first().unwrap().hash_range.start, 0);
        assert_eq!(all.last().unwrap().hash_range.end, u128::MAX);
        let missing = list_shards(&client, &StreamAddress::parse("no-such-stream").unwrap()).await.unwrap_err();
        assert_eq!(missing.class, crate::ErrorClass::NotFound, "{missing}");
    }
}
