//! `kinesis stream ...` and `kinesis put`: stream administration and writing records (`tail.rs`
//! reads them). They talk to Kinesis through the
//! SDK client they are given, so the binary decides where that client points.

use std::io::{BufRead, Write};
use std::time::{Duration, SystemTime};

use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::StreamStatus;
use clap::{Args, Subcommand};
use kinesis_aggregation::HashKeyRange;
use kinesis_core::StreamAddress;
use serde::Serialize;

/// `kinesis stream ...`.
#[derive(Debug, Subcommand)]
pub enum StreamCommand {
    /// Create a stream (provisioned, N shards) and wait until it is ACTIVE.
    Create {
        /// The stream's name.
        name: String,
        /// The number of shards.
        #[arg(long, default_value_t = 1)]
        shards: i32,
    },
    /// Print a stream's status and shards as JSON.
    Describe {
        /// The stream's name, or its ARN (another account's stream).
        name: StreamAddress,
    },
    /// Print the stream names, one a line.
    List,
    /// Split a shard at a hash key (default: the middle of its range).
    Split {
        /// The stream's name.
        name: String,
        /// The shard to split.
        shard: String,
        /// The first hash key of the new upper shard.
        #[arg(long)]
        at: Option<u128>,
    },
    /// Merge two adjacent shards.
    Merge {
        /// The stream's name.
        name: String,
        /// The first shard.
        shard: String,
        /// The adjacent shard.
        adjacent: String,
    },
    /// Delete a stream.
    Delete {
        /// The stream's name.
        name: String,
    },
}

/// `kinesis put`.
#[derive(Debug, Args)]
pub struct PutArgs {
    /// The stream's name, or its ARN (another account's stream: every call then carries
    /// `StreamARN`).
    pub stream: StreamAddress,
    /// The record's data; without it, every line of stdin is a record.
    pub data: Option<String>,
    /// The partition key (default: a new one per record).
    #[arg(long)]
    pub key: Option<String>,
    /// An explicit hash key (decimal).
    #[arg(long)]
    pub explicit_hash_key: Option<String>,
}

/// A command failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StreamError {
    /// A Kinesis call failed.
    #[error("{operation} failed")]
    Kinesis {
        /// The call.
        operation: &'static str,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Reading input or writing output failed.
    #[error("i/o error")]
    Io(#[from] std::io::Error),
    /// A bad argument.
    #[error("{0}")]
    BadArgument(String),
}

pub(crate) fn kinesis<E: std::error::Error + Send + Sync + 'static>(
    operation: &'static str,
) -> impl FnOnce(E) -> StreamError {
    move |e| StreamError::Kinesis { operation, source: Box::new(e) }
}

/// Waits until the stream is ACTIVE (up to 60 s); returns its open shards.
pub(crate) async fn wait_active(client: &aws_sdk_kinesis::Client, name: &str) -> Result<u32, StreamError> {
    for _ in 0..600 {
        let out = client
            .describe_stream_summary()
            .stream_name(name)
            .send()
            .await
            .map_err(kinesis("DescribeStreamSummary"))?;
        if let Some(summary) = out.stream_description_summary()
            && summary.stream_status() == &StreamStatus::Active
        {
            return Ok(u32::try_from(summary.open_shard_count()).unwrap_or(0));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(StreamError::BadArgument(format!("stream {name} did not become ACTIVE within 60 s")))
}

#[derive(Serialize)]
struct ShardLine {
    shard_id: String,
    parent_shard_id: Option<String>,
    adjacent_parent_shard_id: Option<String>,
    starting_hash_key: String,
    ending_hash_key: String,
    open: bool,
}

async fn shards(client: &aws_sdk_kinesis::Client, stream: &StreamAddress) -> Result<Vec<ShardLine>, StreamError> {
    let shards = kinesis_core::list_shards(client, stream).await.map_err(kinesis("ListShards"))?;
    Ok(shards
        .into_iter()
        .map(|shard| ShardLine {
            starting_hash_key: shard.hash_range.start.to_string(),
            ending_hash_key: shard.hash_range.end.to_string(),
            shard_id: shard.shard_id,
            parent_shard_id: shard.parent_shard_id,
            adjacent_parent_shard_id: shard.adjacent_parent_shard_id,
            open: shard.open,
        })
        .collect())
}

/// Runs a `kinesis stream` command.
///
/// # Errors
/// [`StreamError`] when a call fails or an argument is bad.
pub async fn run_stream(
    client: &aws_sdk_kinesis::Client,
    command: StreamCommand,
    out: &mut dyn Write,
) -> Result<(), StreamError> {
    match command {
        StreamCommand::Create { name, shards } => {
            client
                .create_stream()
                .stream_name(&name)
                .shard_count(shards)
                .send()
                .await
                .map_err(kinesis("CreateStream"))?;
            wait_active(client, &name).await?;
            writeln!(out, "{}", serde_json::json!({"stream": name, "shards": shards, "status": "ACTIVE"}))?;
        }
        StreamCommand::Describe { name } => {
            let (stream_name, stream_arn) = name.request_fields();
            let summary = client
                .describe_stream_summary()
                .set_stream_name(stream_name)
                .set_stream_arn(stream_arn)
                .send()
                .await
                .map_err(kinesis("DescribeStreamSummary"))?;
            let summary = summary.stream_description_summary();
            let shards = shards(client, &name).await?;
            let description = serde_json::json!({
                "stream": name.name(),
                "arn": summary.map(|s| s.stream_arn()),
                "status": summary.map(|s| s.stream_status().as_str()),
                "open_shards": summary.map(|s| s.open_shard_count()),
                "shards": shards,
            });
            writeln!(out, "{}", serde_json::to_string_pretty(&description).unwrap_or_default())?;
        }
        StreamCommand::List => {
            let mut start: Option<String> = None;
            loop {
                let mut request = client.list_streams().limit(100);
                if let Some(after) = &start {
                    request = request.exclusive_start_stream_name(after);
                }
                let page = request.send().await.map_err(kinesis("ListStreams"))?;
                for name in page.stream_names() {
                    writeln!(out, "{name}")?;
                }
                match (page.has_more_streams(), page.stream_names().last()) {
                    (true, Some(last)) => start = Some(last.clone()),
                    _ => break,
                }
            }
        }
        StreamCommand::Split { name, shard, at } => {
            let all = shards(client, &StreamAddress::Name(name.clone())).await?;
            let target = all
                .iter()
                .find(|s| s.shard_id == shard)
                .ok_or_else(|| StreamError::BadArgument(format!("no shard {shard} in {name}")))?;
            let range = HashKeyRange::parse(&target.starting_hash_key, &target.ending_hash_key)
                .map_err(|e| StreamError::BadArgument(e.to_string()))?;
            let at = at.unwrap_or(range.start + (range.end - range.start) / 2 + 1);
            if at <= range.start || at > range.end {
                return Err(StreamError::BadArgument(format!("{at} is not inside {shard}'s range")));
            }
            client
                .split_shard()
                .stream_name(&name)
                .shard_to_split(&shard)
                .new_starting_hash_key(at.to_string())
                .send()
                .await
                .map_err(kinesis("SplitShard"))?;
            wait_active(client, &name).await?;
            writeln!(out, "{}", serde_json::json!({"stream": name, "split": shard, "at": at.to_string()}))?;
        }
        StreamCommand::Merge { name, shard, adjacent } => {
            client
                .merge_shards()
                .stream_name(&name)
                .shard_to_merge(&shard)
                .adjacent_shard_to_merge(&adjacent)
                .send()
                .await
                .map_err(kinesis("MergeShards"))?;
            wait_active(client, &name).await?;
            writeln!(out, "{}", serde_json::json!({"stream": name, "merged": [shard, adjacent]}))?;
        }
        StreamCommand::Delete { name } => {
            client.delete_stream().stream_name(&name).send().await.map_err(kinesis("DeleteStream"))?;
            writeln!(out, "{}", serde_json::json!({"stream": name, "status": "DELETING"}))?;
        }
    }
    Ok(())
}

/// Runs `kinesis put`: one record from the arguments, or one per line of `stdin`. Prints the
/// shard and sequence number of each.
///
/// # Errors
/// [`StreamError`] when a PutRecord fails.
pub async fn run_put(
    client: &aws_sdk_kinesis::Client,
    args: PutArgs,
    stdin: &mut dyn BufRead,
    out: &mut dyn Write,
) -> Result<(), StreamError> {
    let lines: Vec<String> = match &args.data {
        Some(data) => vec![data.clone()],
        None => stdin.lines().collect::<Result<_, _>>()?,
    };
    for (i, data) in lines.into_iter().enumerate() {
        let key = args.key.clone().unwrap_or_else(|| {
            let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_nanos();
            format!("{nanos:x}-{i}")
        });
        let (stream_name, stream_arn) = args.stream.request_fields();
        let put = client
            .put_record()
            .set_stream_name(stream_name)
            .set_stream_arn(stream_arn)
            .partition_key(&key)
            .set_explicit_hash_key(args.explicit_hash_key.clone())
            .data(Blob::new(data.into_bytes()))
            .send()
            .await
            .map_err(kinesis("PutRecord"))?;
        writeln!(
            out,
            "{}",
            serde_json::json!({"shard_id": put.shard_id(), "sequence_number": put.sequence_number(), "partition_key": key})
        )?;
    }
    Ok(())
}
