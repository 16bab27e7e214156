//! A fault-injecting HTTP proxy on 127.0.0.1, in front of an emulator.
//!
//! Point a client at [`FaultProxy::url`] instead of the emulator; the proxy forwards each request
//! (HTTP/1.1, bodies streamed both ways, so SubscribeToShard passes too) and, when a [`Rule`]
//! fires, injects its [`Fault`] instead:
//!
//! | fault | the client sees | the server |
//! |---|---|---|
//! | [`Fault::Reset`] | the connection reset (TCP RST) before an answer | never sees the request |
//! | [`Fault::Delay`] | the answer, late | applied it at once |
//! | [`Fault::Error`] | an AWS JSON error (500, 503, a throttling error, ...) | never sees the request |
//! | [`Fault::DropResponse`] | the connection reset instead of the answer | **applied** the request |
//! | [`Fault::PartialFailure`] | PutRecords with some entries failed (ProvisionedThroughputExceeded) | stored only the others |
//! | [`FaultProxy::black_hole`] | no answer at all for T, then a reset | never sees the requests |
//!
//! Rules match an operation (the `X-Amz-Target` suffix, `PutRecords`, `UpdateItem`, ...) or every
//! request, and optionally only requests whose body contains a text (`"SHARD_END"`: the write that
//! ends a shard) or lacks one (`"StreamARN"`: an endpoint that requires it); they fire on every n-th match, and may stop after a number of firings. Counters tell a test
//! how many requests each operation had and how many faults were injected.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

use crate::error::{Error, Result};
use crate::server::ServerThread;

/// What the proxy does to a request when a rule fires.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Reset the client's connection (TCP RST) before the request reaches the server.
    Reset,
    /// Forward the request, then hold the answer this long.
    Delay(Duration),
    /// Answer with this status and an AWS JSON error of this type; the server never sees it.
    Error {
        /// The HTTP status.
        status: u16,
        /// The `__type` of the error, e.g. `ProvisionedThroughputExceededException`.
        error_type: String,
    },
    /// Forward the request and read the server's answer (the server has applied it), then reset
    /// the client's connection instead of answering: the client cannot know the write happened.
    DropResponse,
    /// PutRecords only: every `every`-th entry of the call (the 1st, the (every+1)-th, ...) fails
    /// with ProvisionedThroughputExceededException and does not reach the server; the other
    /// entries are forwarded and answered as the server answers them.
    PartialFailure {
        /// Fail one entry in this many.
        every: usize,
    },
}

impl Fault {
    /// HTTP 500, `InternalFailure`.
    pub fn internal_error() -> Self {
        Self::Error { status: 500, error_type: "InternalFailure".into() }
    }

    /// HTTP 503, `ServiceUnavailable`.
    pub fn service_unavailable() -> Self {
        Self::Error { status: 503, error_type: "ServiceUnavailable".into() }
    }

    /// Kinesis throttling: HTTP 400, `ProvisionedThroughputExceededException`.
    pub fn kinesis_throttling() -> Self {
        Self::Error { status: 400, error_type: "ProvisionedThroughputExceededException".into() }
    }

    /// DynamoDB throttling: HTTP 400, `ThrottlingException`.
    pub fn dynamodb_throttling() -> Self {
        Self::Error { status: 400, error_type: "com.amazonaws.dynamodb.v20120810#ThrottlingException".into() }
    }
}

/// When a fault is injected.
#[derive(Debug)]
pub struct Rule {
    fault: Fault,
    operation: Option<String>,
    containing: Option<String>,
    lacking: Option<String>,
    every: u64,
    limit: Option<u64>,
    matched: AtomicU64,
    fired: AtomicU64,
}

impl Rule {
    /// A rule that injects `fault` into every request.
    pub fn new(fault: Fault) -> Self {
        Self {
            fault,
            operation: None,
            containing: None,
            lacking: None,
            every: 1,
            limit: None,
            matched: AtomicU64::new(0),
            fired: AtomicU64::new(0),
        }
    }

    /// Only requests whose body contains `text` (the request as the SDK sends it: JSON for
    /// DynamoDB, and for Kinesis unless it sends CBOR).
    pub fn containing(mut self, text: impl Into<String>) -> Self {
        self.containing = Some(text.into());
        self
    }

    /// Only requests whose body does not contain `text`: with an error fault, an endpoint that
    /// requires a field, e.g. `"\"StreamARN\""` for a stream shared from another account.
    pub fn lacking(mut self, text: impl Into<String>) -> Self {
        self.lacking = Some(text.into());
        self
    }

    /// Only requests for this operation (`PutRecords`, `GetRecords`, `UpdateItem`, ...).
    pub fn on(mut self, operation: impl Into<String>) -> Self {
        self.operation = Some(operation.into());
        self
    }

    /// Fire on every `n`-th matching request (the n-th, 2n-th, ...).
    pub fn every(mut self, n: u64) -> Self {
        self.every = n.max(1);
        self
    }

    /// Fire at most `n` times.
    pub fn times(mut self, n: u64) -> Self {
        self.limit = Some(n);
        self
    }

    /// How many times the rule fired.
    pub fn fired(&self) -> u64 {
        self.fired.load(Ordering::Relaxed)
    }

    fn fires(&self, operation: &str, body: &[u8]) -> bool {
        if self.operation.as_deref().is_some_and(|o| o != operation) {
            return false;
        }
        let contains = |text: &str| body.windows(text.len().max(1)).any(|w| w == text.as_bytes());
        if self.containing.as_deref().is_some_and(|text| !contains(text)) {
            return false;
        }
        if self.lacking.as_deref().is_some_and(contains) {
            return false;
        }
        let n = self.matched.fetch_add(1, Ordering::Relaxed) + 1;
        if !n.is_multiple_of(self.every) {
            return false;
        }
        let fired = self.fired.fetch_add(1, Ordering::Relaxed);
        if self.limit.is_some_and(|limit| fired >= limit) {
            self.fired.fetch_sub(1, Ordering::Relaxed);
            return false;
        }
        true
    }
}

#[derive(Debug)]
struct State {
    /// Where requests go; [`FaultProxy::set_upstream`] moves it (a restarted server).
    upstream: Mutex<SocketAddr>,
    rules: Mutex<Vec<Arc<Rule>>>,
    /// Requests arriving in [start, end) get no answer until `end`, then a reset.
    black_hole: Mutex<Option<(Instant, Instant)>>,
    requests: Mutex<BTreeMap<String, u64>>,
    /// By operation: requests being handled now, and the most there ever were at once.
    concurrent: Mutex<BTreeMap<String, (u64, u64)>>,
    black_holed: AtomicU64,
}

impl State {
    fn pick(&self, operation: &str, body: &[u8]) -> Option<Fault> {
        let rules = self.rules.lock().unwrap_or_else(|p| p.into_inner()).clone();
        rules.iter().find(|rule| rule.fires(operation, body)).map(|rule| rule.fault.clone())
    }
}

/// A fault-injecting proxy in front of one server; stops when dropped.
#[derive(Debug)]
pub struct FaultProxy {
    url: String,
    state: Arc<State>,
    _server: ServerThread,
}

type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// A client connection's own connection to the server, and the address it goes to.
type Upstream = (SocketAddr, hyper::client::conn::http1::SendRequest<ProxyBody>);

/// Why the proxy closed a connection without answering.
#[derive(Debug)]
struct Injected;

impl std::fmt::Display for Injected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("fault injected: connection reset")
    }
}

impl std::error::Error for Injected {}

impl FaultProxy {
    /// Starts a proxy in front of `upstream_url` (`http://127.0.0.1:PORT`).
    ///
    /// # Errors
    /// When the URL is not `http://HOST:PORT` of an IP address, or the proxy cannot start.
    pub async fn start(upstream_url: &str) -> Result<Self> {
        let state = Arc::new(State {
            upstream: Mutex::new(socket_address(upstream_url)?),
            rules: Mutex::default(),
            black_hole: Mutex::default(),
            requests: Mutex::default(),
            concurrent: Mutex::default(),
            black_holed: AtomicU64::new(0),
        });
        let shared = state.clone();
        let server = ServerThread::spawn("fault-proxy", 2, move |listener, stop| {
            Ok(async move {
                tokio::select! {
                    () = accept_loop(listener, shared) => Ok(()),
                    _ = stop => Ok(()),
                }
            })
        })
        .await
        .map_err(|e| Error::with_source("could not start the fault proxy", e))?;
        Ok(Self { url: server.url(), state, _server: server })
    }

    /// The proxy's URL: give it to clients instead of the server's.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Sends requests to `upstream_url` from now on: a server restarted on another port. Open
    /// connections to the old one fail (their clients see a reset) and reconnect.
    ///
    /// # Errors
    /// When the URL is not `http://IP:PORT`.
    pub fn set_upstream(&self, upstream_url: &str) -> Result<()> {
        *self.state.upstream.lock().unwrap_or_else(|p| p.into_inner()) = socket_address(upstream_url)?;
        Ok(())
    }

    /// Adds a rule (rules are tried in the order they were added; the first that fires wins).
    /// The returned handle tells how often it fired.
    pub fn add(&self, rule: Rule) -> Arc<Rule> {
        let rule = Arc::new(rule);
        self.state.rules.lock().unwrap_or_else(|p| p.into_inner()).push(rule.clone());
        rule
    }

    /// Removes every rule.
    pub fn clear(&self) {
        self.state.rules.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// For `duration` from now, answers nothing: requests wait until the end of the window, and
    /// their connections are then reset. The server sees none of them.
    pub fn black_hole(&self, duration: Duration) {
        self.black_hole_after(Duration::ZERO, duration);
    }

    /// [`FaultProxy::black_hole`] for `duration`, starting `delay` from now.
    pub fn black_hole_after(&self, delay: Duration, duration: Duration) {
        let start = Instant::now() + delay;
        *self.state.black_hole.lock().unwrap_or_else(|p| p.into_inner()) = Some((start, start + duration));
    }

    /// Requests that fell into a black hole.
    pub fn black_holed(&self) -> u64 {
        self.state.black_holed.load(Ordering::Relaxed)
    }

    /// Requests seen so far, faulted or not, by operation.
    pub fn request_counts(&self) -> std::collections::BTreeMap<String, u64> {
        self.state.requests.lock().unwrap_or_else(|p| p.into_inner()).iter().map(|(k, v)| (k.clone(), *v)).collect()
    }

    /// The most requests for `operation` the proxy was handling at once (from the request's
    /// arrival to its answer, a delay included).
    pub fn max_concurrent(&self, operation: &str) -> u64 {
        self.state.concurrent.lock().unwrap_or_else(|p| p.into_inner()).get(operation).map_or(0, |c| c.1)
    }

    /// Requests seen for `operation`, faulted or not.
    pub fn requests(&self, operation: &str) -> u64 {
        self.state.requests.lock().unwrap_or_else(|p| p.into_inner()).get(operation).copied().unwrap_or(0)
    }
}

/// A request being handled, counted in [`State::concurrent`] until dropped.
struct Handling<'a> {
    state: &'a State,
    operation: String,
}

impl<'a> Handling<'a> {
    fn start(state: &'a State, operation: &str) -> Self {
        let mut concurrent = state.concurrent.lock().unwrap_or_else(|p| p.into_inner());
        let (now, most) = concurrent.entry(operation.to_owned()).or_default();
        *now += 1;
        *most = (*most).max(*now);
        Handling { state, operation: operation.to_owned() }
    }
}

impl Drop for Handling<'_> {
    fn drop(&mut self) {
        let mut concurrent = self.state.concurrent.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((now, _)) = concurrent.get_mut(&self.operation) {
            *now -= 1;
        }
    }
}

fn socket_address(url: &str) -> Result<SocketAddr> {
    url.strip_prefix("http://")
        .and_then(|rest| rest.trim_end_matches('/').parse().ok())
        .ok_or_else(|| Error::msg(format!("the fault proxy needs http://IP:PORT, not {url}")))
}

async fn accept_loop(listener: TcpListener, state: Arc<State>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        // A zero linger turns the close after an injected fault into a reset (RST), as a
        // connection torn down by the network would be.
        let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        tokio::spawn(async move {
            // One upstream connection per client connection: HTTP/1.1 requests on it are sequential.
            let upstream_conn: Arc<tokio::sync::Mutex<Option<Upstream>>> = Arc::default();
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let (state, upstream_conn) = (state.clone(), upstream_conn.clone());
                async move { handle(request, &state, &upstream_conn).await }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn operation(request: &Request<Incoming>) -> String {
    request
        .headers()
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .and_then(|t| t.rsplit('.').next())
        .unwrap_or("other")
        .to_owned()
}

fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into()).map_err(|never: Infallible| match never {}).boxed()
}

async fn handle(
    request: Request<Incoming>,
    state: &State,
    upstream_conn: &tokio::sync::Mutex<Option<Upstream>>,
) -> std::result::Result<Response<ProxyBody>, Injected> {
    let operation = operation(&request);
    let _handling = Handling::start(state, &operation);
    *state.requests.lock().unwrap_or_else(|p| p.into_inner()).entry(operation.clone()).or_default() += 1;

    let black_hole = *state.black_hole.lock().unwrap_or_else(|p| p.into_inner());
    let now = Instant::now();
    if let Some((start, end)) = black_hole
        && start <= now
        && now < end
    {
        state.black_holed.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep_until(end).await;
        return Err(Injected);
    }

    // Requests are small (a PutRecords call is at most a few MiB): read each whole, so that rules
    // can look into it. (Answers are streamed: SubscribeToShard's goes on for minutes.)
    let (parts, body) = request.into_parts();
    let bytes = body.collect().await.map_err(|_| Injected)?.to_bytes();
    let fault = state.pick(&operation, &bytes);
    let body: ProxyBody = match &fault {
        Some(Fault::Reset) => return Err(Injected),
        Some(Fault::Error { status, error_type }) => {
            let text = serde_json::json!({"__type": error_type, "message": "injected by the fault proxy"}).to_string();
            let response = Response::builder()
                .status(*status)
                .header("content-type", "application/x-amz-json-1.1")
                .header("x-amzn-errortype", error_type.as_str())
                .body(full(text))
                .map_err(|_| Injected)?;
            return Ok(response);
        }
        Some(Fault::PartialFailure { every }) if operation == "PutRecords" => {
            match split_put_records(&bytes, *every) {
                Some((_, failed)) if failed.len() == records_in(&bytes) => {
                    // Every entry fails: answer without the server (Kinesis refuses an empty call).
                    let answer = serde_json::json!({"FailedRecordCount": 0, "Records": []}).to_string();
                    let response = Response::builder()
                        .status(200)
                        .header("content-type", "application/x-amz-json-1.1")
                        .body(full(answer))
                        .map_err(|_| Injected)?;
                    return merge_put_records(response, &failed).await;
                }
                Some((forwarded, failed)) => {
                    let mut request = Request::from_parts(parts, full(forwarded));
                    request.headers_mut().remove("content-length");
                    let response = forward(request, state, upstream_conn).await?;
                    return merge_put_records(response, &failed).await;
                }
                None => full(bytes),
            }
        }
        _ => full(bytes),
    };
    let response = forward(Request::from_parts(parts, body), state, upstream_conn).await?;
    match fault {
        Some(Fault::Delay(delay)) => {
            tokio::time::sleep(delay).await;
            Ok(response)
        }
        Some(Fault::DropResponse) => {
            // The whole answer was produced: the server applied the request.
            let _ = response.into_body().collect().await;
            Err(Injected)
        }
        _ => Ok(response),
    }
}

async fn forward(
    request: Request<ProxyBody>,
    state: &State,
    upstream_conn: &tokio::sync::Mutex<Option<Upstream>>,
) -> std::result::Result<Response<ProxyBody>, Injected> {
    let mut conn = upstream_conn.lock().await;
    let upstream = *state.upstream.lock().unwrap_or_else(|p| p.into_inner());
    if conn.as_ref().is_none_or(|(to, sender)| *to != upstream || sender.is_closed()) {
        let stream = TcpStream::connect(upstream).await.map_err(|_| Injected)?;
        let _ = stream.set_nodelay(true);
        let (sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|_| Injected)?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        *conn = Some((upstream, sender));
    }
    let (_, sender) = conn.as_mut().ok_or(Injected)?;
    sender.ready().await.map_err(|_| Injected)?;
    let response = sender.send_request(request).await.map_err(|_| Injected)?;
    Ok(response.map(BodyExt::boxed))
}

/// Splits a PutRecords request: the body without every `every`-th entry, and the positions
/// removed. `None` when the body is not a PutRecords JSON request.
fn split_put_records(body: &[u8], every: usize) -> Option<(Vec<u8>, Vec<usize>)> {
    let mut request: serde_json::Value = serde_json::from_slice(body).ok()?;
    let records = request.get_mut("Records")?.as_array_mut()?;
    let every = every.max(1);
    let failed: Vec<usize> = (0..records.len()).filter(|i| i % every == 0).collect();
    let mut index = 0;
    records.retain(|_| {
        let keep = index % every != 0;
        index += 1;
        keep
    });
    Some((serde_json::to_vec(&request).ok()?, failed))
}

fn records_in(body: &[u8]) -> usize {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("Records").and_then(|r| r.as_array()).map(Vec::len))
        .unwrap_or(0)
}

/// Puts the failed entries back into the server's PutRecords answer, at their positions.
async fn merge_put_records(
    response: Response<ProxyBody>,
    failed: &[usize],
) -> std::result::Result<Response<ProxyBody>, Injected> {
    let (mut parts, body) = response.into_parts();
    let bytes = body.collect().await.map_err(|_| Injected)?.to_bytes();
    let Ok(mut answer) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
        return Ok(Response::from_parts(parts, full(bytes)));
    };
    let Some(stored) = answer.get("Records").and_then(|r| r.as_array()).cloned() else {
        return Ok(Response::from_parts(parts, full(bytes)));
    };
    let total = stored.len() + failed.len();
    let mut stored = stored.into_iter();
    let mut records = Vec::with_capacity(total);
    for i in 0..total {
        if failed.binary_search(&i).is_ok() {
            records.push(serde_json::json!({
                "ErrorCode": "ProvisionedThroughputExceededException",
                "ErrorMessage": "Rate exceeded for shard (injected by the fault proxy)",
            }));
        } else {
            records.push(stored.next().unwrap_or(serde_json::Value::Null));
        }
    }
    let failed_before = answer.get("FailedRecordCount").and_then(serde_json::Value::as_u64).unwrap_or(0);
    answer["FailedRecordCount"] = (failed_before + failed.len() as u64).into();
    answer["Records"] = records.into();
    let text = serde_json::to_vec(&answer).map_err(|_| Injected)?;
    parts.headers.remove("content-length");
    Ok(Response::from_parts(parts, full(text)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_put_records_call_is_split_and_merged_back_in_order() {
        let body = serde_json::json!({
            "StreamName": "s",
            "Records": [{"PartitionKey": "a"}, {"PartitionKey": "b"}, {"PartitionKey": "c"}, {"PartitionKey": "d"}],
        });
        let (forwarded, failed) = split_put_records(&serde_json::to_vec(&body).unwrap(), 3).unwrap();
        let forwarded: serde_json::Value = serde_json::from_slice(&forwarded).unwrap();
        let keys: Vec<&str> =
            forwarded["Records"].as_array().unwrap().iter().map(|r| r["PartitionKey"].as_str().unwrap()).collect();
        assert_eq!(keys, ["b", "c"]);
        assert_eq!(failed, [0, 3]);
        // A one-entry call fails whole (the proxy then answers it itself).
        let one =
            serde_json::to_vec(&serde_json::json!({"StreamName": "s", "Records": [{"PartitionKey": "a"}]})).unwrap();
        assert_eq!(split_put_records(&one, 5).unwrap().1, [0]);
        assert_eq!(records_in(&one), 1);
    }

    #[test]
    fn rules_fire_on_every_nth_match_up_to_their_limit() {
        let rule = Rule::new(Fault::Reset).on("PutRecords").every(2).times(2);
        let fired: Vec<bool> = (0..8).map(|_| rule.fires("PutRecords", b"")).collect();
        assert_eq!(fired, [false, true, false, true, false, false, false, false]);
        assert!(!rule.fires("GetRecords", b""));
        assert_eq!(rule.fired(), 2);
    }

    #[test]
    fn a_rule_with_a_text_fires_only_on_bodies_that_contain_it() {
        let rule = Rule::new(Fault::DropResponse).on("UpdateItem").containing("SHARD_END");
        assert!(!rule.fires("UpdateItem", br#"{":checkpoint":{"S":"4959"}}"#));
        assert!(rule.fires("UpdateItem", br#"{":checkpoint":{"S":"SHARD_END"}}"#));
        assert!(!rule.fires("PutItem", b"SHARD_END"));
    }

    #[test]
    fn a_rule_with_a_lacking_text_fires_only_on_bodies_without_it() {
        let rule = Rule::new(Fault::internal_error()).on("ListShards").lacking("\"StreamARN\"");
        assert!(rule.fires("ListShards", br#"{"StreamName":"s","MaxResults":1000}"#));
        assert!(!rule.fires("ListShards", br#"{"StreamARN":"arn:aws:kinesis:us-east-1:000000000000:stream/s"}"#));
        assert!(!rule.fires("GetRecords", br#"{"ShardIterator":"x"}"#));
        assert_eq!(rule.fired(), 1);
    }
}
