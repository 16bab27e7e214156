//! Uniquely named streams and tables, created and waited on until ACTIVE.
//!
//! These work against any endpoint, so they take a client rather than a server handle.
//! Nothing here deletes what it creates: the embedded servers forget everything when they
//! stop, but against a real account the streams and tables stay (and cost money) until you
//! delete them.

use crate::error::{Error, Result};
use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType, TableStatus,
};
use aws_sdk_kinesis::types::StreamStatus;
use std::future::Future;
use std::time::{Duration, Instant};

/// How long [`wait_until_stream_active`] and [`wait_until_table_active`] wait. The local servers
/// take milliseconds; a real account can take a minute or more.
pub const ACTIVE_TIMEOUT: Duration = Duration::from_secs(300);

/// `<prefix>-<32 hex digits>`: a name no other test (or test run) uses.
///
/// Valid as a stream name and as a table name when `prefix` is (letters, digits, `_`, `.`, `-`).
pub fn unique_name(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// Creates a provisioned stream with `shard_count` shards and a unique name, waits until it is
/// ACTIVE, and returns its name.
///
/// # Errors
/// When CreateStream fails (for example over the emulator's shard limit), or the stream is not
/// ACTIVE within [`ACTIVE_TIMEOUT`].
pub async fn create_stream(client: &aws_sdk_kinesis::Client, shard_count: u32) -> Result<String> {
    let name = unique_name("testkit-stream");
    let shards = i32::try_from(shard_count)
        .map_err(|_| Error::msg(format!("shard count {shard_count} does not fit the API's i32")))?;
    client
        .create_stream()
        .stream_name(&name)
        .shard_count(shards)
        .send()
        .await
        .map_err(|e| Error::with_source(format!("CreateStream {name} ({shard_count} shards) failed"), e))?;
    wait_until_stream_active(client, &name).await?;
    Ok(name)
}

/// Deletes the stream `name`, waits until it is gone, creates it again under the same name with
/// `shard_count` shards and waits until it is ACTIVE: what a user does to "empty" a stream, and
/// what makes shard ids name other hash ranges (they start at `shardId-000000000000` again).
///
/// # Errors
/// When DeleteStream or CreateStream fail, or a state is not reached within [`ACTIVE_TIMEOUT`].
pub async fn recreate_stream(client: &aws_sdk_kinesis::Client, name: &str, shard_count: u32) -> Result<()> {
    client
        .delete_stream()
        .stream_name(name)
        .enforce_consumer_deletion(true)
        .send()
        .await
        .map_err(|e| Error::with_source(format!("DeleteStream {name} failed"), e))?;
    poll_until(&format!("stream {name} to be deleted"), ACTIVE_TIMEOUT, || async {
        match client.describe_stream_summary().stream_name(name).send().await {
            Ok(_) => Ok(false),
            Err(e) if e.as_service_error().is_some_and(|s| s.is_resource_not_found_exception()) => Ok(true),
            Err(e) => Err(Error::with_source(format!("DescribeStreamSummary {name} failed"), e)),
        }
    })
    .await?;
    let shards = i32::try_from(shard_count)
        .map_err(|_| Error::msg(format!("shard count {shard_count} does not fit the API's i32")))?;
    client
        .create_stream()
        .stream_name(name)
        .shard_count(shards)
        .send()
        .await
        .map_err(|e| Error::with_source(format!("CreateStream {name} ({shard_count} shards) failed"), e))?;
    wait_until_stream_active(client, name).await
}

/// Polls DescribeStreamSummary until the stream is ACTIVE; use it after CreateStream,
/// SplitShard, MergeShards or UpdateShardCount.
///
/// # Errors
/// When DescribeStreamSummary fails, or the stream is not ACTIVE within [`ACTIVE_TIMEOUT`].
pub async fn wait_until_stream_active(client: &aws_sdk_kinesis::Client, name: &str) -> Result<()> {
    poll_until(&format!("stream {name} to be ACTIVE"), ACTIVE_TIMEOUT, || async {
        let out = client
            .describe_stream_summary()
            .stream_name(name)
            .send()
            .await
            .map_err(|e| Error::with_source(format!("DescribeStreamSummary {name} failed"), e))?;
        Ok(out.stream_description_summary().is_some_and(|s| s.stream_status() == &StreamStatus::Active))
    })
    .await
}

/// Creates an on-demand table with a unique name whose key is the string hash key `hash_key`,
/// waits until it is ACTIVE, and returns its name.
///
/// # Errors
/// When CreateTable fails, or the table is not ACTIVE within [`ACTIVE_TIMEOUT`].
pub async fn create_table(client: &aws_sdk_dynamodb::Client, hash_key: &str) -> Result<String> {
    let name = unique_name("testkit-table");
    let build_error = |e| Error::with_source("invalid CreateTable input", e);
    client
        .create_table()
        .table_name(&name)
        .attribute_definitions(
            AttributeDefinition::builder()
                .attribute_name(hash_key)
                .attribute_type(ScalarAttributeType::S)
                .build()
                .map_err(build_error)?,
        )
        .key_schema(
            KeySchemaElement::builder()
                .attribute_name(hash_key)
                .key_type(KeyType::Hash)
                .build()
                .map_err(build_error)?,
        )
        .billing_mode(BillingMode::PayPerRequest)
        .send()
        .await
        .map_err(|e| Error::with_source(format!("CreateTable {name} failed"), e))?;
    wait_until_table_active(client, &name).await?;
    Ok(name)
}

/// Polls DescribeTable until the table is ACTIVE.
///
/// # Errors
/// When DescribeTable fails, or the table is not ACTIVE within [`ACTIVE_TIMEOUT`].
pub async fn wait_until_table_active(client: &aws_sdk_dynamodb::Client, name: &str) -> Result<()> {
    poll_until(&format!("table {name} to be ACTIVE"), ACTIVE_TIMEOUT, || async {
        let out = client
            .describe_table()
            .table_name(name)
            .send()
            .await
            .map_err(|e| Error::with_source(format!("DescribeTable {name} failed"), e))?;
        Ok(out.table().and_then(|t| t.table_status()) == Some(&TableStatus::Active))
    })
    .await
}

/// Calls `check` until it returns `true`, sleeping 20 ms, 40 ms, ... up to 1 s in between.
pub(crate) async fn poll_until<F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool>>,
{
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(20);
    loop {
        if check().await? {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(Error::msg(format!("gave up waiting for {what} after {timeout:?}")));
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(1));
    }
}
