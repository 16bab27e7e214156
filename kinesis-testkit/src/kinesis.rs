//! A Kinesis endpoint: the embedded ferrokinesis server, or the one the environment names.

use crate::connection::{Connection, Origin, env_endpoint};
use crate::error::{Error, Result};
use crate::server::ServerThread;
use std::time::Duration;

/// The variable that points the test bed at an external Kinesis endpoint.
pub const KINESIS_ENDPOINT_VAR: &str = "AWS_ENDPOINT_URL_KINESIS";

/// Options for the embedded Kinesis server (ferrokinesis).
///
/// They apply only when the server is embedded; an endpoint from the environment behaves as it
/// does. Fill in what you need and take the rest from `Default`:
///
/// ```
/// let options = kinesis_testkit::KinesisOptions { enforce_limits: true, ..Default::default() };
/// assert_eq!(options.shard_limit, 1000);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KinesisOptions {
    /// Per-shard write throttling as in AWS: 1,000 records/s and 1 MiB/s per shard, counted in a
    /// fixed one-second window. Records over it fail inside the PutRecords response with
    /// `ProvisionedThroughputExceededException`. Default: off.
    pub enforce_limits: bool,
    /// Open shards allowed across all streams of this server. Default: 1000 (ferrokinesis: 10).
    pub shard_limit: u32,
    /// How long CreateStream, DeleteStream and the resharding calls keep the stream in
    /// CREATING / DELETING / UPDATING. Default: 10 ms (ferrokinesis: 500 ms).
    pub transition_delay: Duration,
    /// How long a shard iterator lives (whole seconds, at least 1). Default: 300 s, as in AWS.
    pub iterator_ttl: Duration,
    /// How long a SubscribeToShard subscription lasts before the server ends it. Default: 5
    /// minutes, as in AWS.
    pub subscription_lifetime: Duration,
    /// Keep the streams and their records on disk in this directory (ferrokinesis's durable
    /// mode: a write-ahead log and snapshots), so that a server started again on it after
    /// [`Kinesis::stop`] finds them. Default: in memory.
    pub state_dir: Option<std::path::PathBuf>,
}

impl KinesisOptions {
    /// What of these options only the embedded server can honour (empty: any endpoint will do).
    /// The shard limit and the transition delay are not among them: another endpoint may have
    /// other ones, and tests do not depend on them.
    pub fn embedded_only(&self) -> Vec<&'static str> {
        let default = KinesisOptions::default();
        let mut needs = Vec::new();
        if self.enforce_limits {
            needs.push("per-shard write throttling (enforce_limits)");
        }
        if self.iterator_ttl != default.iterator_ttl {
            needs.push("a shard iterator lifetime other than 5 minutes (iterator_ttl)");
        }
        if self.subscription_lifetime != default.subscription_lifetime {
            needs.push("a SubscribeToShard lifetime other than 5 minutes (subscription_lifetime)");
        }
        if self.state_dir.is_some() {
            needs.push("streams kept on disk across a restart of the server (state_dir)");
        }
        needs
    }
}

impl Default for KinesisOptions {
    fn default() -> Self {
        Self {
            enforce_limits: false,
            shard_limit: 1000,
            transition_delay: Duration::from_millis(10),
            iterator_ttl: Duration::from_secs(300),
            subscription_lifetime: Duration::from_secs(300),
            state_dir: None,
        }
    }
}

/// A Kinesis endpoint with ready clients. Dropping it stops the embedded server, if any, so keep
/// it alive as long as its clients are in use.
///
/// [`Kinesis::start`] uses the endpoint in `AWS_ENDPOINT_URL_KINESIS` when that is set, and
/// otherwise starts ferrokinesis in-process on 127.0.0.1 with a port the OS chooses.
#[derive(Debug)]
pub struct Kinesis {
    connection: Connection,
    server: Option<ServerThread>,
}

impl Kinesis {
    /// [`Kinesis::start_with`] the default options.
    ///
    /// # Errors
    /// See [`Kinesis::start_with`].
    pub async fn start() -> Result<Self> {
        Self::start_with(KinesisOptions::default()).await
    }

    /// Connects to `AWS_ENDPOINT_URL_KINESIS` if it is set, or starts an embedded ferrokinesis
    /// server with `options`.
    ///
    /// Options that only the embedded server can honour ([`KinesisOptions::embedded_only`]:
    /// write throttling, short iterator or subscription lifetimes, state on disk) cannot be given
    /// to an endpoint from the environment: then this fails, naming what the caller needs,
    /// instead of connecting to a server that would make the test mean something else.
    ///
    /// The server accepts request bodies up to 16 MiB, room for a PutRecords call of 10 MiB of data.
    ///
    /// # Errors
    /// When the embedded server cannot bind a port or start its thread, or when
    /// `AWS_ENDPOINT_URL_KINESIS` is set and `options` need the embedded server.
    pub async fn start_with(options: KinesisOptions) -> Result<Self> {
        if let Some(url) = env_endpoint(KINESIS_ENDPOINT_VAR) {
            let needs = options.embedded_only();
            if !needs.is_empty() {
                return Err(Error::msg(format!(
                    "this needs the embedded ferrokinesis for {}, which {url} ({KINESIS_ENDPOINT_VAR}) cannot be told to \
                     give; unset {KINESIS_ENDPOINT_VAR} to run it",
                    needs.join(", ")
                )));
            }
            return Ok(Self::external(Connection::from_environment(url).await));
        }
        Self::embedded(options).await
    }

    /// Starts an embedded ferrokinesis server with `options`, whatever the environment says.
    ///
    /// # Errors
    /// When the embedded server cannot bind a port or start its thread.
    pub async fn embedded(options: KinesisOptions) -> Result<Self> {
        let delay_ms = u64::try_from(options.transition_delay.as_millis()).unwrap_or(u64::MAX);
        let store_options = ferrokinesis::store::StoreOptions {
            create_stream_ms: delay_ms,
            delete_stream_ms: delay_ms,
            update_stream_ms: delay_ms,
            shard_limit: options.shard_limit,
            enforce_limits: options.enforce_limits,
            iterator_ttl_seconds: options.iterator_ttl.as_secs().max(1),
            subscribe_to_shard_session_ms: u64::try_from(options.subscription_lifetime.as_millis()).unwrap_or(u64::MAX),
            durable: options.state_dir.clone().map(|state_dir| ferrokinesis::store::DurableStateOptions {
                state_dir,
                snapshot_interval_secs: 1,
                max_retained_bytes: None,
            }),
            ..Default::default()
        };
        let server = ServerThread::spawn("ferrokinesis", 2, move |listener, stop| {
            // Inside the server's runtime: create_app may spawn background tasks.
            let (app, _store) = ferrokinesis::create_app(store_options);
            // The embedded router keeps axum's 2 MB body limit; a full PutRecords call (5 MiB of
            // data, base64 in JSON) needs more. 16 MiB also covers 10 MiB calls. The standalone
            // ferrokinesis binary sets 7 MB the same way.
            let app = app.layer(axum::extract::DefaultBodyLimit::max(MAX_REQUEST_BODY_BYTES));
            // ferrokinesis 0.7 gives a PutRecords call its sequence numbers first and stores the
            // records later, after other awaits: two calls on one shard can store out of sequence
            // order, and a reader that sees the later records first moves past the earlier ones,
            // which it then never reads. Kinesis never does that (a shard's records are readable in
            // sequence order), so the embedded server takes one put at a time.
            let puts = std::sync::Arc::new(tokio::sync::Mutex::new(()));
            let app = app.layer(axum::middleware::from_fn(
                move |request: axum::extract::Request, next: axum::middleware::Next| {
                    let puts = puts.clone();
                    async move {
                        let is_put = request
                            .headers()
                            .get("x-amz-target")
                            .and_then(|v| v.to_str().ok())
                            .is_some_and(|t| t.ends_with(".PutRecords") || t.ends_with(".PutRecord"));
                        if is_put {
                            let _one_at_a_time = puts.lock().await;
                            next.run(request).await
                        } else {
                            next.run(request).await
                        }
                    }
                },
            ));
            Ok(async move {
                // axum's own server: ferrokinesis's `serve_plain_http` needs its `server` feature,
                // which also builds its CLI, OpenTelemetry export and mirroring.
                axum::serve(listener, app)
                    .with_graceful_shutdown(async move {
                        let _ = stop.await;
                    })
                    .await
                    .map_err(|e| e.to_string())
            })
        })
        .await
        .map_err(|e| Error::with_source("could not start the embedded Kinesis server (ferrokinesis)", e))?;
        let connection = Connection::local(server.url(), Origin::Embedded);
        Ok(Self { connection, server: Some(server) })
    }

    /// A handle on a local server at `endpoint_url` that something else runs (another process
    /// of this test bed, a standalone emulator): dummy credentials, `us-east-1`.
    pub fn connect(endpoint_url: impl Into<String>) -> Self {
        Self::external(Connection::local(endpoint_url.into(), Origin::Given))
    }

    /// A handle on an endpoint that something else runs.
    pub(crate) fn external(connection: Connection) -> Self {
        Self { connection, server: None }
    }

    /// The endpoint URL, e.g. `http://127.0.0.1:38211`.
    pub fn endpoint_url(&self) -> &str {
        &self.connection.endpoint_url
    }

    /// Where the endpoint came from.
    pub fn origin(&self) -> Origin {
        self.connection.origin
    }

    /// A client with the SDK's standard retries (3 attempts).
    pub fn client(&self) -> aws_sdk_kinesis::Client {
        aws_sdk_kinesis::Client::from_conf(self.connection.kinesis_config(true))
    }

    /// Stops the embedded server and waits until it has ended (with
    /// [`KinesisOptions::state_dir`], its state is on disk: a server started again on the same
    /// directory finds the streams and records). Nothing to do for an endpoint run elsewhere.
    pub async fn stop(mut self) {
        if let Some(server) = self.server.take() {
            server.stop().await;
        }
    }

    /// A client that makes one attempt per call, so that throttling and other errors reach the
    /// caller as they are.
    pub fn client_without_retries(&self) -> aws_sdk_kinesis::Client {
        aws_sdk_kinesis::Client::from_conf(self.connection.kinesis_config(false))
    }

    /// Creates a uniquely named stream with `shard_count` shards, waits until it is ACTIVE and
    /// returns its name. See [`create_stream`](crate::create_stream).
    ///
    /// # Errors
    /// When CreateStream fails or the stream does not become ACTIVE in time.
    pub async fn create_stream(&self, shard_count: u32) -> Result<String> {
        crate::resources::create_stream(&self.client(), shard_count).await
    }
}

/// The largest request body the embedded server accepts.
const MAX_REQUEST_BODY_BYTES: usize = 16 * 1024 * 1024;
