//! The streams a worker reads now: the one stream of a single-stream worker, or the streams its
//! tracker lists (resolved to their identifiers) and those it finds only in the lease table;
//! which of them are former streams and since when; and the deferred deletion of the leases of
//! retired ones.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use kinesis_core::StreamAddress;
use tokio::time::Instant;

use super::{FormerStreams, StreamConfig, StreamIdentifier};
use crate::error::KinesisError;
use crate::leases::lease::Lease;
use crate::leases::scope::LeaseScope;
use crate::leases::shard_sync::InitialPosition;
use crate::leases::table::LeaseTable;
use crate::retrieval::fan_out::{Retrieval, register};
use crate::retrieval::kinesis::KinesisApi;

/// One stream a worker reads.
#[derive(Debug)]
pub(crate) struct Served {
    /// `account:stream:creationEpoch`; `None` for the stream of a single-stream worker.
    pub identifier: Option<Arc<str>>,
    /// The stream's name.
    pub name: Arc<str>,
    pub api: KinesisApi,
    pub initial: InitialPosition,
    /// Enhanced fan-out: the consumer registered on this stream.
    pub consumer_arn: Option<Arc<str>>,
}

/// The streams of a worker.
#[derive(Debug)]
pub(crate) struct Tracked {
    client: aws_sdk_kinesis::Client,
    retrieval: Retrieval,
    former_streams: FormerStreams,
    single: Option<Arc<Served>>,
    /// The streams the tracker lists now, by the text it gave.
    listed: HashMap<String, Arc<Served>>,
    /// Streams read because their leases are in the table (the tracker no longer lists them, or
    /// never did), by identifier.
    orphans: HashMap<String, Arc<Served>>,
    /// Streams not listed now (left the list, or found only in the table), and since when this
    /// worker knows it.
    former: HashMap<String, Instant>,
    /// What this worker takes and processes; retired streams are left out.
    pub scope: Arc<LeaseScope>,
    /// Leases of retired streams that have an owner: the counter seen, and since when.
    watched: HashMap<String, (u64, Instant)>,
}

impl Tracked {
    /// The one stream of a single-stream worker (with fan-out, its consumer registered).
    ///
    /// # Errors
    /// Registering the fan-out consumer failed.
    pub(crate) async fn single(
        api: KinesisApi,
        initial: InitialPosition,
        retrieval: Retrieval,
        scope: Arc<LeaseScope>,
    ) -> Result<Self, KinesisError> {
        let mut tracked = Tracked::multi(api.client().clone(), retrieval, FormerStreams::Keep, scope);
        let consumer_arn = tracked.register(&api).await?;
        let served = Served { identifier: None, name: api.stream().into(), api, initial, consumer_arn };
        tracked.single = Some(Arc::new(served));
        Ok(tracked)
    }

    /// A multi-stream worker's streams, none yet.
    pub(crate) fn multi(
        client: aws_sdk_kinesis::Client,
        retrieval: Retrieval,
        former_streams: FormerStreams,
        scope: Arc<LeaseScope>,
    ) -> Self {
        Tracked {
            client,
            retrieval,
            former_streams,
            single: None,
            listed: HashMap::new(),
            orphans: HashMap::new(),
            former: HashMap::new(),
            scope,
            watched: HashMap::new(),
        }
    }

    /// The streams whose shards get leases: the single stream, or the listed ones.
    pub(crate) fn to_sync(&self) -> Vec<Arc<Served>> {
        match &self.single {
            Some(single) => vec![single.clone()],
            None => self.listed.values().cloned().collect(),
        }
    }

    /// Takes the tracker's list: new streams are resolved (DescribeStreamSummary, and with
    /// fan-out their consumer registered); streams no longer listed become former streams.
    /// Returns the identifiers of the streams listed now that were not before. A stream that
    /// cannot be resolved (it does not exist yet, a call failed) is left out until a later poll
    /// resolves it.
    pub(crate) async fn take_list(&mut self, configs: Vec<StreamConfig>, now: Instant) -> Vec<String> {
        let before: HashSet<Arc<str>> =
            self.listed.values().chain(self.orphans.values()).filter_map(|s| s.identifier.clone()).collect();
        let mut listed = HashMap::new();
        let mut added = Vec::new();
        for config in configs {
            if listed.contains_key(&config.stream) {
                continue;
            }
            let served = match self.listed.get(&config.stream) {
                Some(served) if served.initial == config.initial_position => served.clone(),
                _ => match self.resolve(&config).await {
                    Ok(served) => {
                        tracing::info!(stream = %config.stream, identifier = ?served.identifier, "stream tracked");
                        Arc::new(served)
                    }
                    Err(error) => {
                        tracing::warn!(stream = %config.stream, %error, "a tracked stream could not be resolved; trying at the next poll");
                        continue;
                    }
                },
            };
            listed.insert(config.stream.clone(), served);
        }
        for served in listed.values() {
            let id = served.identifier.clone().expect("multi-stream");
            if self.former.remove(id.as_ref()).is_some() {
                tracing::info!(stream = %id, "a former stream is listed again");
            }
            self.orphans.remove(id.as_ref());
            if !before.contains(&id) {
                added.push(id.to_string());
            }
        }
        let now_ids: HashSet<&str> = listed.values().filter_map(|s| s.identifier.as_deref()).collect();
        for served in self.listed.values() {
            let Some(gone) = served.identifier.as_deref() else { continue };
            if !now_ids.contains(gone) {
                tracing::info!(stream = gone, "a stream left the tracker's list");
                self.former.entry(gone.to_owned()).or_insert(now);
                // Read on as it was (by the name or ARN given, from its initial position) until
                // it is retired, or for good with FormerStreams::Keep.
                self.orphans.insert(gone.to_owned(), served.clone());
            }
        }
        self.listed = listed;
        added
    }

    /// A listed stream that Kinesis no longer has (its shard sync answered NotFound): its
    /// resolution is forgotten, so that the next poll resolves the name again (a stream created
    /// again under it is another stream, with another creation time), and the stream it was is
    /// a former stream from now on.
    pub(crate) fn forget(&mut self, identifier: &str, now: Instant) {
        let before = self.listed.len();
        self.listed.retain(|_, s| s.identifier.as_deref() != Some(identifier));
        if self.listed.len() < before {
            tracing::warn!(stream = identifier, "a tracked stream no longer exists; it is a former stream");
            self.former.entry(identifier.to_owned()).or_insert(now);
        }
    }

    async fn resolve(&self, config: &StreamConfig) -> Result<Served, KinesisError> {
        let invalid = |e: kinesis_core::InvalidStream| {
            KinesisError::new(crate::error::ErrorKind::Invalid, "DescribeStreamSummary", None, Some(e.into()))
        };
        let api = KinesisApi::new(self.client.clone(), StreamAddress::parse(&config.stream).map_err(invalid)?);
        let summary = api.describe().await?;
        let arn = kinesis_core::StreamArn::parse(&summary.arn).map_err(invalid)?;
        let identifier =
            StreamIdentifier::new(arn.account_id(), arn.stream_name(), summary.creation_epoch).map_err(invalid)?;
        let consumer_arn = self.register(&api).await?;
        Ok(Served {
            identifier: Some(identifier.to_string().into()),
            name: api.stream().into(),
            api,
            initial: config.initial_position,
            consumer_arn,
        })
    }

    async fn register(&self, api: &KinesisApi) -> Result<Option<Arc<str>>, KinesisError> {
        match &self.retrieval {
            Retrieval::Polling => Ok(None),
            Retrieval::FanOut(fan_out) => Ok(Some(register(&self.client, api.address(), fan_out).await?.into())),
        }
    }

    /// The stream of a lease (by its `streamName`), if this worker reads it: a lease of a stream the tracker does not
    /// list is read by ARN, built from its identifier and the Kinesis client's region (as the
    /// KCL does), with the initial position LATEST (the KCL's default for such streams).
    pub(crate) async fn for_lease(&mut self, stream_identifier: Option<&str>) -> Option<Arc<Served>> {
        let Some(id) = stream_identifier else { return self.single.clone() };
        if self.single.is_some() {
            return None;
        }
        if let Some(served) = self.listed.values().find(|s| s.identifier.as_deref() == Some(id)) {
            return Some(served.clone());
        }
        if let Some(served) = self.orphans.get(id) {
            return Some(served.clone());
        }
        let identifier = StreamIdentifier::parse(id).ok()?;
        let region = self.client.config().region().map(|r| r.to_string()).unwrap_or_else(|| "us-east-1".into());
        let arn = match identifier.arn(&region) {
            Ok(arn) => arn,
            Err(error) => {
                tracing::warn!(stream = id, %error, "a lease's stream cannot be named by ARN; it is not read here");
                return None;
            }
        };
        let api = KinesisApi::new(self.client.clone(), StreamAddress::Arn(arn));
        let consumer_arn = match self.register(&api).await {
            Ok(arn) => arn,
            Err(error) => {
                tracing::warn!(stream = id, %error, "registering the fan-out consumer of a lease's stream failed");
                return None;
            }
        };
        tracing::info!(stream = id, "reading a stream the tracker does not list (its leases are in the table)");
        let served = Arc::new(Served {
            identifier: Some(id.into()),
            name: identifier.stream_name().into(),
            api,
            initial: InitialPosition::Latest,
            consumer_arn,
        });
        self.orphans.insert(id.to_owned(), served.clone());
        Some(served)
    }

    /// With [`FormerStreams::DeleteAfter`]: notes the streams of the table's leases that the
    /// tracker does not list (former from now on, for this worker), and retires those former for
    /// longer than the wait. Returns the streams retired by this call.
    pub(crate) fn retire(&mut self, leases: &[Lease], now: Instant) -> Vec<String> {
        let FormerStreams::DeleteAfter(wait) = self.former_streams else { return Vec::new() };
        if self.single.is_some() {
            return Vec::new();
        }
        let listed: HashSet<&str> = self.listed.values().filter_map(|s| s.identifier.as_deref()).collect();
        for stream in leases.iter().filter_map(|l| l.stream_identifier.as_deref()) {
            if !listed.contains(stream) && !self.former.contains_key(stream) {
                tracing::info!(stream, ?wait, "leases of a stream the tracker does not list: deleted after the wait");
                self.former.insert(stream.to_owned(), now);
            }
        }
        let retired: HashSet<String> = self
            .former
            .iter()
            .filter(|(_, since)| now.duration_since(**since) >= wait)
            .map(|(id, _)| id.clone())
            .collect();
        let newly: Vec<String> = retired.iter().filter(|id| !self.scope.is_retired(Some(id))).cloned().collect();
        for id in &newly {
            tracing::info!(stream = %id, "a former stream is retired: its leases are released and deleted");
            self.orphans.remove(id);
        }
        self.scope.set_retired(retired);
        newly
    }

    /// Deletes the leases of retired streams that no worker processes: free ones, and those whose
    /// counter stood still for `failover` (their owner died). Each delete is conditional on the
    /// counter read, so a lease a worker renewed meanwhile stays. Returns how many were deleted.
    ///
    /// # Errors
    /// A delete that failed for another reason than its condition.
    pub(crate) async fn delete_retired(
        &mut self,
        table: &LeaseTable,
        leases: &[Lease],
        failover: Duration,
        now: Instant,
    ) -> Result<usize, crate::error::LeaseTableError> {
        let mut deleted = 0;
        let retired: Vec<&Lease> =
            leases.iter().filter(|l| self.scope.is_retired(l.stream_identifier.as_deref())).collect();
        self.watched.retain(|key, _| retired.iter().any(|l| &l.key == key));
        for lease in retired {
            let still = match lease.owner {
                None => true,
                Some(_) => match self.watched.get(&lease.key) {
                    Some((counter, since)) if *counter == lease.counter => now.duration_since(*since) >= failover,
                    _ => {
                        self.watched.insert(lease.key.clone(), (lease.counter, now));
                        false
                    }
                },
            };
            if still && table.delete(lease).await? {
                tracing::info!(lease = %lease.key, "a retired stream's lease deleted");
                self.watched.remove(&lease.key);
                deleted += 1;
            }
        }
        Ok(deleted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::leases::lease::Position;

    fn client() -> aws_sdk_kinesis::Client {
        let config = aws_sdk_kinesis::Config::builder()
            .behavior_version(aws_sdk_kinesis::config::BehaviorVersion::latest())
            .region(aws_sdk_kinesis::config::Region::new("eu-west-1"))
            .build();
        aws_sdk_kinesis::Client::from_conf(config)
    }

    fn tracked(former: FormerStreams) -> Tracked {
        Tracked::multi(client(), Retrieval::Polling, former, Arc::new(LeaseScope::new(true)))
    }

    #[tokio::test]
    async fn streams_found_only_in_the_table_are_retired_after_the_wait() {
        let wait = Duration::from_secs(60);
        let mut streams = tracked(FormerStreams::DeleteAfter(wait));
        let leases = [
            Lease::new_in_stream("111122223333:old:1", "shardId-000000000000", Position::Latest),
            Lease::new_in_stream("111122223333:old:1", "shardId-000000000001", Position::Latest),
        ];
        let t0 = Instant::now();
        assert!(streams.retire(&leases, t0).is_empty(), "former from now on, not yet retired");
        assert!(streams.scope.serves(&leases[0]), "read on during the wait");
        assert!(streams.retire(&leases, t0 + wait / 2).is_empty());
        assert_eq!(streams.retire(&leases, t0 + wait), ["111122223333:old:1"], "retired once the wait is over");
        assert!(!streams.scope.serves(&leases[0]));
        assert!(streams.retire(&leases, t0 + wait * 2).is_empty(), "retired once");
        let mut keep = tracked(FormerStreams::Keep);
        assert!(keep.retire(&leases, t0).is_empty() && keep.retire(&leases, t0 + wait * 100).is_empty());
        assert!(keep.scope.serves(&leases[0]), "Keep reads them on");
    }

    #[tokio::test]
    async fn a_stream_the_tracker_does_not_list_is_read_by_arn_in_the_clients_region() {
        let mut streams = tracked(FormerStreams::Keep);
        let served = streams.for_lease(Some("111122223333:orphan:1700000000")).await.expect("read by ARN");
        assert_eq!(
            served.api.address().arn().map(|a| a.as_str()),
            Some("arn:aws:kinesis:eu-west-1:111122223333:stream/orphan")
        );
        assert_eq!((served.name.as_ref(), served.initial), ("orphan", InitialPosition::Latest));
        assert!(streams.for_lease(None).await.is_none(), "a single-stream lease is not a multi-stream worker's");
        assert!(streams.for_lease(Some("not an identifier")).await.is_none());
        streams.forget("111122223333:orphan:1700000000", Instant::now());
    }
}
