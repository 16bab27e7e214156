//! The Java side of the interoperability tests: the real KCL 3.x and KPL 1.x, driven by the two
//! programs of `interop/java/` (`KclReader`, `KplWriter`; their options and output lines are
//! documented in their sources), run as child processes that print one JSON object per line.
//!
//! [`JavaInterop::get`] finds `java` and `mvn`, and builds `interop/java` once per process when
//! its classes or dependencies are missing or older than its sources (`scripts/test` builds it
//! before the tests, so test binaries never race on the build). When Java or Maven is missing it
//! fails with a message that says how to install them: these tests never pass without Java.
//!
//! What each Java client needs to talk to the emulators here:
//!
//! | client | needs |
//! |---|---|
//! | KCL 3.5.1 | its own HTTP/1.1 Netty client (not `KinesisClientUtil`, which forces HTTP/2); polling retrieval (fan-out is the default); `NullMetricsFactory`; `disableWorkerMetrics(true)` (no EC2 metadata probe); endpoints by `endpointOverride`. The embedded ferrokinesis answers its CBOR, and dynoxide its lease-table calls (legacy `Expected`/`AttributeUpdates`, the GSI made by `UpdateTable`, the lock client's conditional writes, parallel scans) |
//! | KPL 1.0.7 | TLS to Kinesis ([`crate::TlsFront`] in front of ferrokinesis, `VerifyCertificate=false`), a region, `MetricsLevel=none`, static credentials; its native daemon (linux-x86_64, glibc 2.12+) is extracted from the jar |
//!
//! Emulator gaps met:
//! - ferrokinesis 0.7 returns no `ChildShards` at the end of a closed shard: the KCL then retries
//!   GetRecords on the parent for ever ("Timeout occurred while waiting for response from
//!   Kinesis"). Its `ShardFilter` `AT_TRIM_HORIZON` also lists the children of a closed shard, and
//!   the KCL's initial shard sync refuses that list ("Incomplete hash range"). A test that reshards
//!   under the Java KCL uses [`crate::KinesisLocal`], which has both right.
//! - The KCL pulls protobuf-java 4.27.5, and the KPL's generated classes refuse a runtime older
//!   than 4.29.0: `interop/java/pom.xml` pins 4.29.0.
//! - On a new lease table the KCL 3.x waits a random 1–30 s before its first shard sync, and
//!   deletes its `Leader` row when it shuts down gracefully.
//! - The JVM exits with 143 after SIGTERM, once the graceful shutdown (a shutdown hook) has run.

use crate::error::{Error, Result};
use crate::json_lines::JsonLines;
use serde_json::Value;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How to install what the Java tests need, for error messages.
pub const JAVA_INSTALL_HINT: &str = "the interoperability tests run the real Java KCL and KPL: they need Java 17+ \
     (`java`) and Maven (`mvn`) on PATH. Install them (Debian: `apt-get install -y openjdk-17-jdk-headless maven`), \
     or run `.ci/run`, which does";

/// The built `interop/java` project.
#[derive(Debug)]
pub struct JavaInterop {
    dir: PathBuf,
    classpath: String,
}

static BUILT: OnceLock<std::result::Result<JavaInterop, String>> = OnceLock::new();

impl JavaInterop {
    /// The project, built if needed (once per process).
    ///
    /// # Errors
    /// When `java` or `mvn` is missing ([`JAVA_INSTALL_HINT`]), or the Maven build fails (its
    /// output is in the message).
    pub fn get() -> Result<&'static JavaInterop> {
        BUILT.get_or_init(|| Self::build().map_err(|e| e.to_string())).as_ref().map_err(|m| Error::msg(m.clone()))
    }

    /// `interop/java` of this repository.
    pub fn project_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../interop/java")
    }

    fn build() -> Result<JavaInterop> {
        for tool in ["java", "mvn"] {
            let found = Command::new(tool)
                .arg("-version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !found {
                return Err(Error::msg(format!("`{tool}` is missing: {JAVA_INSTALL_HINT}")));
            }
        }
        let dir = Self::project_dir();
        let dir = dir.canonicalize().map_err(|e| Error::with_source(format!("{}", dir.display()), e))?;
        let stamp = dir.join("target/lib/.built");
        if newest_source(&dir) > modified(&stamp) {
            let output = Command::new("mvn")
                .args(["-q", "-B", "-f"])
                .arg(dir.join("pom.xml"))
                .arg("package")
                .output()
                .map_err(|e| Error::with_source("could not run mvn", e))?;
            if !output.status.success() {
                return Err(Error::msg(format!(
                    "building interop/java failed (mvn package, {}):\n{}{}",
                    output.status,
                    String::from_utf8_lossy(&output.stdout),
                    String::from_utf8_lossy(&output.stderr)
                )));
            }
            std::fs::write(&stamp, b"").map_err(|e| Error::with_source("could not write the build stamp", e))?;
        }
        let classpath = format!("{}:{}/*", dir.join("target/classes").display(), dir.join("target/lib").display());
        Ok(JavaInterop { dir, classpath })
    }

    /// `java <jvm_options> -cp <the project's classes and dependencies> dev.kinesisrs.interop.<main>
    /// <args>`, not started: for callers that measure or pipe the process themselves (the
    /// `vs_java` benchmark); [`JavaInterop::spawn`] for tests.
    pub fn command(&self, jvm_options: &[&str], main: &str, args: &[&str]) -> Command {
        let mut command = Command::new("java");
        command
            .args(jvm_options)
            .arg("-cp")
            .arg(&self.classpath)
            .arg(format!("dev.kinesisrs.interop.{main}"))
            .args(args);
        command
    }

    /// Starts `dev.kinesisrs.interop.<main>` with `args`, the environment `env` (endpoints and
    /// credentials: [`crate::child_env`]), and `stdin` written to its standard input (then
    /// closed). Its standard error goes to a log file ([`JavaProcess::log_path`]).
    ///
    /// # Errors
    /// When the JVM cannot be started.
    pub fn spawn(
        &self,
        main: &str,
        args: &[&str],
        env: &[(&str, String)],
        stdin: Option<Vec<u8>>,
    ) -> Result<JavaProcess> {
        let (log_path, log) = child_log(main)?;
        let mut command = self.command(&["-Xmx768m"], main, args);
        command
            .env_remove("AWS_PROFILE")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .current_dir(&self.dir)
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log));
        let mut child = command.spawn().map_err(|e| Error::with_source(format!("could not start java {main}"), e))?;
        if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
            std::thread::spawn(move || {
                let _ = pipe.write_all(&input);
            });
        }
        let lines = JsonLines::collect(child.stdout.take().expect("stdout is piped"));
        Ok(JavaProcess { child, lines, log_path, name: main.to_owned() })
    }
}

/// Where the logs of the Java programs (and of other child processes of the interop tests and
/// benchmarks) go: `<temp dir>/kinesis-interop-logs`.
pub fn child_log_dir() -> PathBuf {
    std::env::temp_dir().join("kinesis-interop-logs")
}

/// A new log file in [`child_log_dir`], named `<name>-<this process id>-<unique>.log`.
///
/// # Errors
/// When the folder or the file cannot be made.
pub fn child_log(name: &str) -> Result<(PathBuf, std::fs::File)> {
    let dir = child_log_dir();
    std::fs::create_dir_all(&dir).map_err(|e| Error::with_source("could not make the log folder", e))?;
    let path = dir.join(format!("{name}-{}-{}.log", std::process::id(), crate::unique_name("run")));
    let file = std::fs::File::create(&path).map_err(|e| Error::with_source("could not create the log", e))?;
    Ok((path, file))
}

fn modified(path: &Path) -> std::time::SystemTime {
    std::fs::metadata(path).and_then(|m| m.modified()).unwrap_or(std::time::UNIX_EPOCH)
}

fn newest_source(dir: &Path) -> std::time::SystemTime {
    fn walk(path: &Path, newest: &mut std::time::SystemTime) {
        if path.is_dir() {
            for entry in std::fs::read_dir(path).into_iter().flatten().flatten() {
                walk(&entry.path(), newest);
            }
        } else {
            *newest = (*newest).max(modified(path));
        }
    }
    let mut newest = modified(&dir.join("pom.xml"));
    walk(&dir.join("src"), &mut newest);
    newest
}

/// A running Java program of `interop/java`; killed (SIGKILL) when dropped.
#[derive(Debug)]
pub struct JavaProcess {
    child: Child,
    lines: JsonLines,
    log_path: PathBuf,
    name: String,
}

impl JavaProcess {
    /// Every line printed so far, parsed (a line that is not JSON is a JSON string).
    pub fn lines(&self) -> Vec<Value> {
        self.lines.snapshot()
    }

    /// Its output so far, to read without copying ([`JsonLines::with`]).
    pub fn output(&self) -> &JsonLines {
        &self.lines
    }

    /// The lines whose `"event"` is `event`.
    pub fn events(&self, event: &str) -> Vec<Value> {
        self.lines.events(event)
    }

    /// How many lines have `"event"` equal to `event`.
    pub fn count(&self, event: &str) -> usize {
        self.lines.count(event)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Where its standard error (the KCL's and KPL's logs) goes.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The last `n` lines of its log, for failure messages.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Whether it is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends SIGTERM (the KCL reader shuts down gracefully on it) and waits up to `limit` for
    /// the exit; SIGKILL after that.
    ///
    /// # Errors
    /// When it had to be killed, or waiting failed.
    pub fn terminate(&mut self, limit: Duration) -> Result<ExitStatus> {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        self.wait_for(limit)
    }

    /// Waits up to `limit` for it to exit by itself; SIGKILL after that.
    ///
    /// # Errors
    /// When it had to be killed, or waiting failed.
    pub fn wait_for(&mut self, limit: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => {
                    self.lines.finish();
                    return Ok(status);
                }
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
                Ok(None) => {
                    self.kill();
                    return Err(Error::msg(format!(
                        "{} did not exit within {limit:?}; killed. Its log ({}) ends:\n{}",
                        self.name,
                        self.log_path.display(),
                        self.log_tail(30)
                    )));
                }
                Err(e) => return Err(Error::with_source("waiting for the java process", e)),
            }
        }
    }

    /// SIGKILL, and waits for the exit.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.lines.finish();
    }
}

impl Drop for JavaProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
