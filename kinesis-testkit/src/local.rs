//! kinesis-local (the Node build of kinesis-mock), run as a child process through
//! `scripts/kinesis-local`.
//!
//! kinesis-local is slow but the most faithful emulator on resharding (ChildShards, ShardFilter,
//! lineage after UpdateShardCount), so the resharding tests run against it.

use crate::connection::{Connection, Origin};
use crate::error::{Error, Result};
use crate::kinesis::Kinesis;
use std::fs::File;
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Overrides where the testkit looks for the `kinesis-local` script.
pub const SCRIPT_VAR: &str = "KINESIS_LOCAL_SCRIPT";

/// How to make kinesis-local available; every "could not start" error ends with it.
const HOW_TO_INSTALL: &str = "kinesis-local needs Node.js and npm (Debian/Ubuntu: `apt-get install nodejs npm`). \
     Install it with `scripts/kinesis-local install` from the workspace root, \
     and check that it starts with `scripts/kinesis-local start --port 4568`.";

/// How many times `start` tries fresh ports when the process exits before it is ready.
const START_ATTEMPTS: u32 = 3;

/// Serializes `scripts/kinesis-local install` within this process (tests run in parallel).
static INSTALL: Mutex<bool> = Mutex::new(false);

/// Options for [`KinesisLocal::start_with`].
///
/// ```
/// use std::time::Duration;
/// let options = kinesis_testkit::KinesisLocalOptions {
///     operation_delay: Duration::from_millis(20),
///     ..Default::default()
/// };
/// # let _ = options;
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KinesisLocalOptions {
    /// Every `*_DURATION` setting (CreateStream, SplitShard, MergeShards, UpdateShardCount,
    /// consumers, encryption...): how long a stream stays CREATING / UPDATING. Default: 50 ms
    /// (kinesis-local: 500 ms).
    pub operation_delay: Duration,
    /// `SHARD_LIMIT`. Default: 1000 (kinesis-local: 50).
    pub shard_limit: u32,
    /// How long to wait for the process to answer, after installing. Default: 60 s.
    pub ready_timeout: Duration,
}

impl Default for KinesisLocalOptions {
    fn default() -> Self {
        Self { operation_delay: Duration::from_millis(50), shard_limit: 1000, ready_timeout: Duration::from_secs(60) }
    }
}

/// A kinesis-local process on 127.0.0.1, killed when this handle is dropped.
///
/// [`KinesisLocal::start`] installs kinesis-local into `.kinesis-local/` if needed (through
/// `scripts/kinesis-local install`, which needs node and npm), starts it on a free plain-HTTP
/// port and a free TLS port, and waits until it answers ListStreams. If anything of that fails,
/// the error says how to install and start it by hand: a test that needs kinesis-local fails, it
/// never passes without it. It always starts its own process, whatever `AWS_ENDPOINT_URL_KINESIS`
/// says.
///
/// kinesis-local listens on all interfaces (it has no bind-address setting); the clients use
/// 127.0.0.1.
#[derive(Debug)]
pub struct KinesisLocal {
    kinesis: Kinesis,
    process: Child,
    tls_port: u16,
    log_path: PathBuf,
}

impl KinesisLocal {
    /// [`KinesisLocal::start_with`] the default options.
    ///
    /// # Errors
    /// See [`KinesisLocal::start_with`].
    pub async fn start() -> Result<Self> {
        Self::start_with(KinesisLocalOptions::default()).await
    }

    /// Installs (if needed) and starts kinesis-local, then waits until it is ready.
    ///
    /// # Errors
    /// When the script is missing, node or npm are missing, the install fails, or the server does
    /// not answer within `ready_timeout`. The message says how to fix it.
    pub async fn start_with(options: KinesisLocalOptions) -> Result<Self> {
        let script = script_path();
        if !script.is_file() {
            return Err(Error::msg(format!(
                "kinesis-local: the script {} does not exist (set {SCRIPT_VAR} to its path). {HOW_TO_INSTALL}",
                script.display()
            )));
        }
        install(script.clone()).await?;

        let mut last_error = None;
        for _ in 0..START_ATTEMPTS {
            match start_once(&script, &options).await {
                Ok(local) => return Ok(local),
                // The process exited early: most likely a port taken between our probe and its bind.
                Err(StartError::Exited(e)) => last_error = Some(e),
                Err(StartError::Failed(e)) => return Err(e),
            }
        }
        Err(last_error.unwrap_or_else(|| Error::msg("kinesis-local did not start")))
    }

    /// The Kinesis handle: endpoint, clients, stream helper.
    pub fn kinesis(&self) -> &Kinesis {
        &self.kinesis
    }

    /// A client with the SDK's standard retries.
    pub fn client(&self) -> aws_sdk_kinesis::Client {
        self.kinesis.client()
    }

    /// A client that makes one attempt per call.
    pub fn client_without_retries(&self) -> aws_sdk_kinesis::Client {
        self.kinesis.client_without_retries()
    }

    /// The plain-HTTP endpoint, `http://127.0.0.1:<port>`.
    pub fn endpoint_url(&self) -> &str {
        self.kinesis.endpoint_url()
    }

    /// The TLS port (HTTPS and HTTP/2, with kinesis-local's self-signed certificate).
    pub fn tls_port(&self) -> u16 {
        self.tls_port
    }

    /// The file that receives the process's stdout and stderr. It is deleted on drop, unless the
    /// thread is panicking (a failed test keeps it).
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Creates a uniquely named stream, waits until it is ACTIVE and returns its name.
    ///
    /// # Errors
    /// When CreateStream fails or the stream does not become ACTIVE in time.
    pub async fn create_stream(&self, shard_count: u32) -> Result<String> {
        self.kinesis.create_stream(shard_count).await
    }
}

impl Drop for KinesisLocal {
    fn drop(&mut self) {
        // SIGKILL, then reap: the process is gone a moment after the signal.
        let _ = self.process.kill();
        let _ = self.process.wait();
        // Keep the log of a test that failed.
        if !std::thread::panicking() {
            let _ = std::fs::remove_file(&self.log_path);
        }
    }
}

/// `$KINESIS_LOCAL_SCRIPT`, or `scripts/kinesis-local` in this workspace.
fn script_path() -> PathBuf {
    match std::env::var_os(SCRIPT_VAR) {
        Some(path) if !path.is_empty() => PathBuf::from(path),
        _ => {
            let testkit = Path::new(env!("CARGO_MANIFEST_DIR"));
            testkit.parent().unwrap_or(testkit).join("scripts").join("kinesis-local")
        }
    }
}

/// Runs `scripts/kinesis-local install` once per process (it is idempotent anyway).
async fn install(script: PathBuf) -> Result<()> {
    let outcome = tokio::task::spawn_blocking(move || {
        let mut installed = INSTALL.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if *installed {
            return Ok(());
        }
        let output = Command::new(&script).arg("install").stdin(Stdio::null()).output().map_err(|e| {
            Error::with_source(format!("kinesis-local: could not run {}. {HOW_TO_INSTALL}", script.display()), e)
        })?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            return Err(Error::msg(format!(
                "kinesis-local could not be installed ({} install exited with {}):\n{}\n{HOW_TO_INSTALL}",
                script.display(),
                output.status,
                stderr.trim_end()
            )));
        }
        *installed = true;
        Ok(())
    })
    .await;
    match outcome {
        Ok(result) => result,
        Err(e) => Err(Error::with_source("kinesis-local: the install task failed", e)),
    }
}

enum StartError {
    /// The process exited before it was ready; another attempt may work.
    Exited(Error),
    /// Anything else.
    Failed(Error),
}

async fn start_once(script: &Path, options: &KinesisLocalOptions) -> Result<KinesisLocal, StartError> {
    let (port, tls_port) = two_free_ports().map_err(StartError::Failed)?;
    let log_path = std::env::temp_dir().join(format!("kinesis-local-{}-{port}.log", std::process::id()));
    let log = File::create(&log_path)
        .and_then(|f| f.try_clone().map(|g| (f, g)))
        .map_err(|e| StartError::Failed(Error::with_source(format!("could not create {}", log_path.display()), e)))?;

    let delay = format!("{}ms", options.operation_delay.as_millis());
    let mut command = Command::new(script);
    command
        .args(["start", "--port", &port.to_string(), "--tls-port", &tls_port.to_string()])
        .env("SHARD_LIMIT", options.shard_limit.to_string())
        .stdin(Stdio::null())
        .stdout(log.0)
        .stderr(log.1);
    for operation in [
        "CREATE_STREAM",
        "DELETE_STREAM",
        "REGISTER_STREAM_CONSUMER",
        "DEREGISTER_STREAM_CONSUMER",
        "START_STREAM_ENCRYPTION",
        "STOP_STREAM_ENCRYPTION",
        "MERGE_SHARDS",
        "SPLIT_SHARD",
        "UPDATE_SHARD_COUNT",
        "UPDATE_STREAM_MODE",
    ] {
        command.env(format!("{operation}_DURATION"), &delay);
    }
    // The script execs node, so this child is the server itself and killing it stops the server.
    let process = command.spawn().map_err(|e| {
        StartError::Failed(Error::with_source(
            format!("kinesis-local: could not run {}. {HOW_TO_INSTALL}", script.display()),
            e,
        ))
    })?;

    let connection = Connection::local(format!("http://127.0.0.1:{port}"), Origin::KinesisLocal);
    let mut local = KinesisLocal { kinesis: Kinesis::external(connection), process, tls_port, log_path };
    wait_ready(&mut local, options.ready_timeout).await?;
    Ok(local)
}

/// Polls ListStreams (signed by the SDK, so it carries `X-Amz-Date`) until it succeeds.
async fn wait_ready(local: &mut KinesisLocal, timeout: Duration) -> Result<(), StartError> {
    let client = local.client_without_retries();
    let deadline = Instant::now() + timeout;
    loop {
        match local.process.try_wait() {
            Ok(Some(status)) => {
                return Err(StartError::Exited(Error::msg(format!(
                    "kinesis-local exited ({status}) before it was ready on {}.\n{}\n{HOW_TO_INSTALL}",
                    local.endpoint_url(),
                    log_tail(&local.log_path)
                ))));
            }
            Ok(None) => {}
            Err(e) => {
                return Err(StartError::Failed(Error::with_source("kinesis-local: could not poll the process", e)));
            }
        }
        if client.list_streams().send().await.is_ok() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(StartError::Failed(Error::msg(format!(
                "kinesis-local did not answer on {} within {timeout:?}.\n{}\n{HOW_TO_INSTALL}",
                local.endpoint_url(),
                log_tail(&local.log_path)
            ))));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Two distinct ports that are free on 127.0.0.1 right now.
fn two_free_ports() -> Result<(u16, u16)> {
    let bind = || {
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr().map(|a| (l, a.port())))
            .map_err(|e| Error::with_source("could not find a free port on 127.0.0.1", e))
    };
    // Both listeners are open at once, so the ports differ.
    let (_first, plain) = bind()?;
    let (_second, tls) = bind()?;
    Ok((plain, tls))
}

/// The last lines of the process's log, for error messages.
fn log_tail(path: &Path) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(20)..].join("\n");
            format!("--- last lines of {}:\n{tail}\n---", path.display())
        }
        Err(e) => format!("(could not read {}: {e})", path.display()),
    }
}
