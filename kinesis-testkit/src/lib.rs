//! Test bed for the workspace: Kinesis and DynamoDB emulators on 127.0.0.1 with ready SDK clients.
//!
//! # What it starts
//!
//! | handle | server | where it runs |
//! |---|---|---|
//! | [`Kinesis`] | [ferrokinesis] 0.7, embedded | its own OS thread and tokio runtime, port chosen by the OS |
//! | [`DynamoDb`] | [dynoxide] 3.2, embedded, in-memory | its own OS thread and tokio runtime, port chosen by the OS |
//! | [`KinesisLocal`] | kinesis-local (npm), via `scripts/kinesis-local` | a child process, free ports |
//! | [`TestBed`] | a [`Kinesis`] and a [`DynamoDb`] together | |
//! | [`FaultProxy`] | an HTTP proxy in front of either, injecting [`Fault`]s by [`Rule`] | its own OS thread and tokio runtime |
//!
//! Each embedded server runs on a dedicated thread, so it keeps serving whatever the caller's
//! runtime does: a current-thread `#[tokio::test]`, a multi-thread runtime, or a plain `fn main`
//! that builds a runtime to drive the SDK. Dropping a handle stops its server: the drop sends a
//! signal and returns at once, and the thread finishes on its own. Keep the handle alive while
//! you use its clients. Every handle gives a client with the SDK's standard retries
//! ([`Kinesis::client`]) and one with a single attempt per call
//! ([`Kinesis::client_without_retries`], `RetryConfig::standard().with_max_attempts(1)`), for
//! tests that want to see throttling as it comes.
//!
//! ferrokinesis starts with a shard limit of 1000 instead of its default 10, and with 10 ms
//! stream transitions instead of 500 ms; see [`KinesisOptions`]. Its per-shard write throttling
//! (1,000 records/s and 1 MiB/s, per-record `ProvisionedThroughputExceededException`) is off
//! unless [`KinesisOptions::enforce_limits`] is set.
//!
//! # Pointing the same tests at another endpoint
//!
//! When `AWS_ENDPOINT_URL_KINESIS` or `AWS_ENDPOINT_URL_DYNAMODB` is set (and not blank),
//! [`Kinesis::start`] / [`DynamoDb::start`] start no server and use that endpoint: kinesis-local,
//! LocalStack, DynamoDB Local or a real account. Region and credentials then come from
//! aws-config's default chains; if no region is configured it is `us-east-1`, and if no
//! credentials are found the clients sign with dummy ones, which every emulator accepts. (With no
//! credentials configured at all, the lookup can take a few seconds, as aws-config tries the EC2
//! instance metadata service.) The embedded and kinesis-local servers always get dummy static
//! credentials and `us-east-1`. [`Kinesis::origin`] says which case you have.
//!
//! ```text
//! scripts/kinesis-local start --port 4568 --background
//! AWS_ENDPOINT_URL_KINESIS=http://127.0.0.1:4568 cargo test
//! ```
//!
//! # Streams and tables
//!
//! [`create_stream`] and [`create_table`] create uniquely named resources (see [`unique_name`])
//! and wait until they are ACTIVE, so tests can share one server and run in parallel.
//!
//! # Reading a stream back
//!
//! [`read_stream`] returns every record of a stream, shard by shard, parents before children;
//! [`list_all_shards`] and [`read_shard`] do it a shard at a time. They take a client, so they
//! work on every endpoint, and they avoid what the emulators get wrong (below): ListShards is
//! paged with ExclusiveStartShardId, and a closed shard ends at a missing NextShardIterator.
//!
//! # Example
//!
//! ```no_run
//! # async fn example() -> kinesis_testkit::Result<()> {
//! use kinesis_testkit::TestBed;
//!
//! let bed = TestBed::start().await?;
//! let stream = bed.kinesis.create_stream(4).await?;
//! let table = bed.dynamodb.create_table("leaseKey").await?;
//! let kinesis = bed.kinesis.client();
//! let shards = kinesis.list_shards().stream_name(&stream).send().await;
//! // ... put records, then read them all back:
//! let records = kinesis_testkit::read_stream(&kinesis, &stream).await?;
//! # let _ = (shards, table, records);
//! # Ok(())
//! # }
//! ```
//!
//! # kinesis-local
//!
//! [`KinesisLocal::start`] runs `scripts/kinesis-local install` (idempotent: an `npm install
//! --prefix .kinesis-local`, needs node and npm), then `scripts/kinesis-local start` on a free
//! plain port and a free TLS port with every `*_DURATION` at 50 ms, and waits until ListStreams
//! answers. The process is killed when the handle is dropped. When node or npm are missing or the
//! install fails, the error says how to install them and start kinesis-local by hand; the test
//! fails rather than passing without the emulator.
//!
//! # What the emulators get wrong
//!
//! Write tests so that they hold on every endpoint, or pick the endpoint that does the thing:
//! - ferrokinesis gives no ChildShards at the end of a shard, ignores ShardFilter, fails
//!   ListShards with only a NextToken (use a large MaxResults, or page with the stream name and
//!   ExclusiveStartShardId; NextToken together with the stream name is refused everywhere), gives
//!   no ParentShardId to shards made by UpdateShardCount, and does not rate-limit GetRecords. Take
//!   lineage from ListShards. It is the only emulator that throttles writes.
//! - kinesis-local reports a fake EndingSequenceNumber on closed shards: detect the end of a shard
//!   by a missing NextShardIterator. It is slow (about 1 k records/s): no benchmarks against it.
//! - dynoxide passed every DynamoDB check this workspace needs (conditional writes with a typed
//!   ConditionalCheckFailedException, transactions, GSIs, Scan paging).
//!
//! [ferrokinesis]: https://crates.io/crates/ferrokinesis
//! [dynoxide]: https://crates.io/crates/dynoxide-rs

mod connection;
mod dynamodb;
mod error;
mod java;
mod json_lines;
mod kinesis;
mod local;
mod proxy;
mod read;
mod resources;
mod server;
mod tls;

pub use connection::Origin;
pub use dynamodb::{DYNAMODB_ENDPOINT_VAR, DynamoDb};
pub use error::{Error, Result};
pub use java::{JAVA_INSTALL_HINT, JavaInterop, JavaProcess, child_log, child_log_dir};
pub use json_lines::JsonLines;
pub use kinesis::{KINESIS_ENDPOINT_VAR, Kinesis, KinesisOptions};
pub use local::{KinesisLocal, KinesisLocalOptions, SCRIPT_VAR};
pub use proxy::{Fault, FaultProxy, Rule};
pub use read::{
    MAX_GET_RECORDS_CALLS, MAX_LIST_SHARDS_CALLS, ReadRecord, ShardEnd, ShardInfo, ShardRead, list_all_shards,
    parents_first, read_shard, read_stream,
};
pub use resources::{
    ACTIVE_TIMEOUT, create_stream, create_table, recreate_stream, unique_name, wait_until_stream_active,
    wait_until_table_active,
};
pub use tls::TlsFront;

/// The environment of a child process (an example, the `kinesis` binary, a worker process of a
/// test) that must use these endpoints as `aws-config` reads them: `AWS_ENDPOINT_URL_KINESIS` and
/// `AWS_ENDPOINT_URL_DYNAMODB` when given, dummy static credentials, `us-east-1`, and no AWS
/// configuration files (so nothing on the machine changes what the child does). Give it to
/// `Command::envs`.
pub fn child_env(kinesis: Option<&str>, dynamodb: Option<&str>) -> Vec<(&'static str, String)> {
    let mut env = vec![
        ("AWS_ACCESS_KEY_ID", "test".to_owned()),
        ("AWS_SECRET_ACCESS_KEY", "test".to_owned()),
        ("AWS_REGION", "us-east-1".to_owned()),
        ("AWS_CONFIG_FILE", "/nonexistent".to_owned()),
        ("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent".to_owned()),
    ];
    if let Some(url) = kinesis {
        env.push((KINESIS_ENDPOINT_VAR, url.to_owned()));
    }
    if let Some(url) = dynamodb {
        env.push((DYNAMODB_ENDPOINT_VAR, url.to_owned()));
    }
    env
}

/// A [`Kinesis`] and a [`DynamoDb`] endpoint, started together.
#[derive(Debug)]
pub struct TestBed {
    /// Kinesis: embedded ferrokinesis, or `AWS_ENDPOINT_URL_KINESIS`.
    pub kinesis: Kinesis,
    /// DynamoDB: embedded dynoxide, or `AWS_ENDPOINT_URL_DYNAMODB`.
    pub dynamodb: DynamoDb,
}

impl TestBed {
    /// Starts both with the default [`KinesisOptions`].
    ///
    /// # Errors
    /// When either server cannot start.
    pub async fn start() -> Result<Self> {
        Self::start_with(KinesisOptions::default()).await
    }

    /// Starts both, the Kinesis server with `options`.
    ///
    /// # Errors
    /// When either server cannot start.
    pub async fn start_with(options: KinesisOptions) -> Result<Self> {
        Ok(Self { kinesis: Kinesis::start_with(options).await?, dynamodb: DynamoDb::start().await? })
    }

    /// [`child_env`] for both endpoints: a child process that uses this test bed.
    pub fn child_env(&self) -> Vec<(&'static str, String)> {
        child_env(Some(self.kinesis.endpoint_url()), Some(self.dynamodb.endpoint_url()))
    }
}
