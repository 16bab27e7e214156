//! A DynamoDB endpoint: the embedded dynoxide server, or the one the environment names.

use crate::connection::{Connection, Origin, env_endpoint};
use crate::error::{Error, Result};
use crate::server::ServerThread;

/// The variable that points the test bed at an external DynamoDB endpoint.
pub const DYNAMODB_ENDPOINT_VAR: &str = "AWS_ENDPOINT_URL_DYNAMODB";

/// A DynamoDB endpoint with ready clients. Dropping it stops the embedded server, if any, so keep
/// it alive as long as its clients are in use.
///
/// [`DynamoDb::start`] uses the endpoint in `AWS_ENDPOINT_URL_DYNAMODB` when that is set, and
/// otherwise starts dynoxide in-process, with an in-memory database, on 127.0.0.1 with a port the
/// OS chooses.
#[derive(Debug)]
pub struct DynamoDb {
    connection: Connection,
    server: Option<ServerThread>,
}

impl DynamoDb {
    /// Connects to `AWS_ENDPOINT_URL_DYNAMODB` if it is set, or starts an embedded dynoxide server.
    ///
    /// # Errors
    /// When the embedded server cannot create its database, bind a port or start its thread.
    pub async fn start() -> Result<Self> {
        if let Some(url) = env_endpoint(DYNAMODB_ENDPOINT_VAR) {
            return Ok(Self { connection: Connection::from_environment(url).await, server: None });
        }
        Self::embedded().await
    }

    /// Starts an embedded dynoxide server (in memory), whatever the environment says.
    ///
    /// # Errors
    /// When the embedded server cannot create its database, bind a port or start its thread.
    pub async fn embedded() -> Result<Self> {
        Self::embedded_with(None).await
    }

    /// Starts an embedded dynoxide server whose tables live in the SQLite file `path` (created if
    /// missing), so that a server started again on it after [`DynamoDb::stop`] finds them.
    ///
    /// # Errors
    /// When the embedded server cannot open the file, bind a port or start its thread.
    pub async fn embedded_at(path: &std::path::Path) -> Result<Self> {
        Self::embedded_with(Some(path.to_path_buf())).await
    }

    async fn embedded_with(path: Option<std::path::PathBuf>) -> Result<Self> {
        let server = ServerThread::spawn("dynoxide", 1, move |listener, stop| {
            let db = match &path {
                Some(path) => dynoxide::Database::new(&path.to_string_lossy())
                    .map_err(|e| format!("database file {}: {e}", path.display()))?,
                None => dynoxide::Database::memory().map_err(|e| format!("in-memory database: {e}"))?,
            };
            Ok(dynoxide::server::serve_with_shutdown(listener, db, async move {
                let _ = stop.await;
            }))
        })
        .await
        .map_err(|e| Error::with_source("could not start the embedded DynamoDB server (dynoxide)", e))?;
        let connection = Connection::local(server.url(), Origin::Embedded);
        Ok(Self { connection, server: Some(server) })
    }

    /// A handle on a local server at `endpoint_url` that something else runs (another process
    /// of this test bed, a standalone emulator): dummy credentials, `us-east-1`.
    pub fn connect(endpoint_url: impl Into<String>) -> Self {
        Self { connection: Connection::local(endpoint_url.into(), Origin::Given), server: None }
    }

    /// Stops the embedded server and waits until it has ended (a file-backed one has its tables
    /// on disk). Nothing to do for an endpoint run elsewhere.
    pub async fn stop(mut self) {
        if let Some(server) = self.server.take() {
            server.stop().await;
        }
    }

    /// The endpoint URL, e.g. `http://127.0.0.1:38212`.
    pub fn endpoint_url(&self) -> &str {
        &self.connection.endpoint_url
    }

    /// Where the endpoint came from.
    pub fn origin(&self) -> Origin {
        self.connection.origin
    }

    /// A client with the SDK's standard retries (3 attempts).
    pub fn client(&self) -> aws_sdk_dynamodb::Client {
        aws_sdk_dynamodb::Client::from_conf(self.connection.dynamodb_config(true))
    }

    /// A client that makes one attempt per call.
    pub fn client_without_retries(&self) -> aws_sdk_dynamodb::Client {
        aws_sdk_dynamodb::Client::from_conf(self.connection.dynamodb_config(false))
    }

    /// Creates a uniquely named on-demand table keyed by the string attribute `hash_key`, waits
    /// until it is ACTIVE and returns its name. See [`create_table`](crate::create_table).
    ///
    /// # Errors
    /// When CreateTable fails or the table does not become ACTIVE in time.
    pub async fn create_table(&self, hash_key: &str) -> Result<String> {
        crate::resources::create_table(&self.client(), hash_key).await
    }
}
