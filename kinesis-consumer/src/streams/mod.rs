//! Many streams, one application (the KCL's multi-stream mode): which streams a worker reads
//! ([`StreamTracker`]), where each starts ([`StreamConfig`]), how a stream is named in the lease
//! table ([`StreamIdentifier`]), and what becomes of the leases of a stream that leaves the list
//! ([`FormerStreams`]). The worker's side, the streams it reads now, is `tracked`.
//!
//! ```text
//! tracker (every stream_poll_interval) ─▶ streams resolved (DescribeStreamSummary: account,
//!   creation time) ─▶ shard sync per stream ─▶ leases `account:stream:creationEpoch:shardId`
//! stream gone from the list ─▶ (FormerStreams::DeleteAfter: wait) ─▶ its consumers stop
//!   gracefully, its leases are released ─▶ deleted
//! ```

pub(crate) mod tracked;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use kinesis_core::{InvalidStream, StreamArn};

use crate::leases::shard_sync::InitialPosition;

/// A stream in the lease table of a multi-stream application, `account:stream:creationEpoch`
/// (the KCL's `StreamIdentifier` in its multi-stream form): the stream's 12-digit account id, its
/// name and its creation time in seconds since the epoch, so that a stream deleted and created
/// again under the same name is another stream, and streams of two accounts never share leases.
/// Written as each lease's `streamName` attribute and the first part of its key.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamIdentifier {
    account_id: String,
    stream_name: String,
    creation_epoch: u64,
}

impl StreamIdentifier {
    /// An identifier from its parts.
    ///
    /// # Errors
    /// [`InvalidStream`] when the account id is not digits or the name is not a stream name.
    pub fn new(
        account_id: impl Into<String>,
        stream_name: impl Into<String>,
        creation_epoch: u64,
    ) -> Result<Self, InvalidStream> {
        let (account_id, stream_name) = (account_id.into(), stream_name.into());
        let given = format!("{account_id}:{stream_name}:{creation_epoch}");
        if account_id.is_empty() || !account_id.bytes().all(|b| b.is_ascii_digit()) {
            return Err(InvalidStream { given, reason: "the account id of a stream identifier is digits".into() });
        }
        if let Err(e) = kinesis_core::StreamAddress::parse(&stream_name) {
            return Err(InvalidStream { given, reason: e.reason });
        }
        Ok(StreamIdentifier { account_id, stream_name, creation_epoch })
    }

    /// An identifier from its text, `account:stream:creationEpoch` (the KCL's
    /// `([0-9]+):([^:]+):([0-9]+)`).
    ///
    /// # Errors
    /// [`InvalidStream`] when the text has not that shape.
    pub fn parse(text: &str) -> Result<Self, InvalidStream> {
        let invalid = || InvalidStream {
            given: text.to_owned(),
            reason: "a stream identifier is ACCOUNT:STREAM:CREATION_EPOCH".into(),
        };
        let mut parts = text.split(':');
        let (Some(account), Some(name), Some(epoch), None) = (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(invalid());
        };
        let epoch = epoch.parse::<u64>().map_err(|_| invalid())?;
        StreamIdentifier::new(account, name, epoch)
    }

    /// The 12-digit id of the account that owns the stream.
    pub fn account_id(&self) -> &str {
        &self.account_id
    }

    /// The stream's name.
    pub fn stream_name(&self) -> &str {
        &self.stream_name
    }

    /// When the stream was created, in seconds since the Unix epoch.
    pub fn creation_epoch(&self) -> u64 {
        self.creation_epoch
    }

    /// The stream's ARN in `region` (as the KCL builds it for a stream it knows only from the
    /// lease table: the partition `aws`, the Kinesis client's region).
    ///
    /// # Errors
    /// [`InvalidStream`] when the account id is not 12 digits or the region is not a region name.
    pub fn arn(&self, region: &str) -> Result<StreamArn, InvalidStream> {
        StreamArn::parse(&format!("arn:aws:kinesis:{region}:{}:stream/{}", self.account_id, self.stream_name))
    }
}

impl fmt::Display for StreamIdentifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.account_id, self.stream_name, self.creation_epoch)
    }
}

/// A stream of a multi-stream application and where its shards start (the KCL's
/// `StreamConfig`).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct StreamConfig {
    /// The stream's name, or its ARN (another account's stream: see
    /// [`crate::SchedulerConfig::stream`] for the permissions).
    pub stream: String,
    /// Where its shards that were never read start.
    pub initial_position: InitialPosition,
}

impl StreamConfig {
    /// `stream` (name or ARN), its new shards starting at `initial_position`.
    pub fn new(stream: impl Into<String>, initial_position: InitialPosition) -> Self {
        StreamConfig { stream: stream.into(), initial_position }
    }
}

/// The error a tracker function reports; the streams stay as they were.
pub type TrackerError = Box<dyn std::error::Error + Send + Sync>;

type PollFn = dyn Fn() -> Pin<Box<dyn Future<Output = Result<Vec<StreamConfig>, TrackerError>> + Send>> + Send + Sync;

/// Which streams a multi-stream application reads (the KCL's `MultiStreamTracker`): a fixed list,
/// or a function asked every [`crate::SchedulerConfig::stream_poll_interval`] (the KCL: 60 s), so
/// that streams come and go while the workers run. Give every worker of an application the same
/// tracker: each worker creates the leases of the streams its tracker lists, and stops reading
/// (and deletes the leases of) the streams it no longer lists.
#[derive(Clone)]
pub struct StreamTracker {
    source: Source,
}

#[derive(Clone)]
enum Source {
    Fixed(Vec<StreamConfig>),
    Polled(Arc<PollFn>),
}

impl StreamTracker {
    /// These streams, for as long as the worker runs.
    pub fn fixed(streams: Vec<StreamConfig>) -> Self {
        StreamTracker { source: Source::Fixed(streams) }
    }

    /// The streams `poll` gives, asked at start and then every `stream_poll_interval`. A call that
    /// fails leaves the streams as they were (and is logged); so does a call that takes longer
    /// than the interval. Cancel safety: a call may be dropped while it runs (at shutdown).
    pub fn polled<F, Fut>(poll: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Vec<StreamConfig>, TrackerError>> + Send + 'static,
    {
        StreamTracker { source: Source::Polled(Arc::new(move || Box::pin(poll()))) }
    }

    /// The streams now.
    pub(crate) async fn streams(&self) -> Result<Vec<StreamConfig>, TrackerError> {
        match &self.source {
            Source::Fixed(streams) => Ok(streams.clone()),
            Source::Polled(poll) => poll().await,
        }
    }

    /// The fixed list, if it is one.
    pub(crate) fn fixed_streams(&self) -> Option<&[StreamConfig]> {
        match &self.source {
            Source::Fixed(streams) => Some(streams),
            Source::Polled(_) => None,
        }
    }
}

impl fmt::Debug for StreamTracker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            Source::Fixed(streams) => f.debug_tuple("StreamTracker::fixed").field(streams).finish(),
            Source::Polled(_) => f.write_str("StreamTracker::polled(..)"),
        }
    }
}

impl PartialEq for StreamTracker {
    fn eq(&self, other: &Self) -> bool {
        match (&self.source, &other.source) {
            (Source::Fixed(a), Source::Fixed(b)) => a == b,
            (Source::Polled(a), Source::Polled(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

impl Eq for StreamTracker {}

/// What becomes of the leases of a stream that is no longer read (the KCL's
/// `FormerStreamsLeasesDeletionStrategy`). A former stream is one the tracker listed and no longer
/// lists, or one whose leases a worker finds in the table while its tracker never listed it (the
/// KCL's auto-detection).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FormerStreams {
    /// Its leases stay and are read as before (the KCL's `NO_STREAMS_LEASES_DELETION`): a stream
    /// that left the list as the tracker named it, a stream only found in the table by ARN built
    /// from its stream identifier and the Kinesis client's region (as the KCL). Nothing is
    /// deleted unless asked: the default.
    #[default]
    Keep,
    /// After the wait (counted by each worker from when it first saw the stream gone), its
    /// leases are no longer read: the worker holding one stops its processor gracefully
    /// (`shutdown_requested`, its last checkpoint) and releases it, no worker takes or is
    /// assigned one, and each free lease is deleted (conditionally on its counter, so never one a
    /// worker still holds; the lease of a worker that died is deleted once its counter has stood
    /// still for a failover time). The KCL's `FORMER_STREAMS_AUTO_DETECTION_DEFERRED_DELETION`
    /// with `waitPeriodToDeleteFormerStreams`, except that the KCL deletes leases still held.
    DeleteAfter(Duration),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_identifier_is_account_name_and_creation_epoch() {
        let id = StreamIdentifier::parse("111122223333:orders:1700000000").unwrap();
        assert_eq!((id.account_id(), id.stream_name(), id.creation_epoch()), ("111122223333", "orders", 1700000000));
        assert_eq!(id.to_string(), "111122223333:orders:1700000000");
        assert_eq!(id.arn("eu-west-1").unwrap().as_str(), "arn:aws:kinesis:eu-west-1:111122223333:stream/orders");
        for bad in ["orders", "1:orders", "x:orders:1", "1:orders:x", "1:or/ders:1", "1:a:2:3", "1::2"] {
            assert!(StreamIdentifier::parse(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn a_tracker_is_a_list_or_a_function() {
        let list = vec![StreamConfig::new("a", InitialPosition::TrimHorizon)];
        let fixed = StreamTracker::fixed(list.clone());
        assert_eq!(fixed.streams().await.unwrap(), list);
        assert_eq!(fixed, StreamTracker::fixed(list.clone()));
        let polled = StreamTracker::polled(|| async { Err::<Vec<StreamConfig>, TrackerError>("down".into()) });
        assert_eq!(polled.streams().await.unwrap_err().to_string(), "down");
        assert_eq!(polled, polled.clone());
        assert_ne!(polled, fixed);
        assert!(polled.fixed_streams().is_none());
    }
}
