//! What the pipeline sends: one Kinesis record (an aggregate, or a user record sent plain) with the
//! buffered user records it carries.

use std::sync::Arc;

use kinesis_aggregation::{Aggregator, KinesisRecord};
use tokio::time::Instant;

use crate::config::ProducerConfig;
use crate::pending::Pending;
use crate::transport::PutEntry;

/// The Kinesis record's data, encoded now or by the sender.
pub(crate) enum Payload {
    /// Encoded: a plain record, or a compressed aggregate (compressed when sealed, so that its size
    /// is known to the rate limiter and the batch).
    Ready(KinesisRecord),
    /// An aggregate still to encode. The sender task encodes it (protobuf and MD5, most of the
    /// cost of aggregation), off the pipeline task; its size is already exact.
    Aggregate(Box<Aggregator>),
}

/// A Kinesis record ready to send, with the user records it carries.
pub(crate) struct Entry {
    /// The predicted shard.
    pub(crate) shard: Arc<str>,
    pub(crate) payload: Payload,
    /// In aggregate order (a member's index is its sub-sequence number).
    pub(crate) members: Vec<Pending>,
    pub(crate) aggregated: bool,
    /// Partition key + data: what the shard's limits and the batch count.
    pub(crate) size: usize,
    /// When the oldest member has waited RecordMaxBufferedTime.
    pub(crate) due: Instant,
    /// The earliest deadline of the members.
    pub(crate) deadline: Instant,
    /// When the oldest member was put.
    pub(crate) oldest: Instant,
    /// The lowest and highest hash key of the members: a reader keeps the Kinesis record on a
    /// shard whose range holds both.
    pub(crate) key_span: (u128, u128),
}

impl Entry {
    /// One user record sent as it is (compressed when that is on and makes it smaller).
    pub(crate) fn plain(config: &ProducerConfig, shard: Arc<str>, member: Pending) -> Entry {
        let kinesis = compressed(
            config,
            KinesisRecord {
                partition_key: member.record.partition_key.clone(),
                explicit_hash_key: member.record.explicit_hash_key,
                data: member.record.data.clone(),
            },
        );
        let size = kinesis.data.len() + kinesis.partition_key.len();
        Entry {
            shard,
            size,
            payload: Payload::Ready(kinesis),
            due: member.enqueued + config.record_max_buffered_time,
            deadline: member.deadline,
            oldest: member.enqueued,
            key_span: (member.hash_key, member.hash_key),
            members: vec![member],
            aggregated: false,
        }
    }

    /// What an aggregator holds, which it empties; a lone record goes plain, as with the KPL.
    /// `started` is when the aggregate began waiting: it is due a linger time later.
    pub(crate) fn pack(
        config: &ProducerConfig,
        shard: &Arc<str>,
        aggregator: &mut Aggregator,
        mut members: Vec<Pending>,
        started: Instant,
    ) -> Option<Entry> {
        if members.len() <= 1 {
            aggregator.clear();
            return members.pop().map(|member| Entry::plain(config, shard.clone(), member));
        }
        let (payload, size) = if config.compression {
            let kinesis = compressed(config, aggregator.finish()?);
            let size = kinesis.data.len() + kinesis.partition_key.len();
            (Payload::Ready(kinesis), size)
        } else {
            let size = aggregator.size_bytes() + kinesis_aggregation::limits::AGGREGATE_PARTITION_KEY.len();
            (Payload::Aggregate(Box::new(aggregator.take())), size)
        };
        let deadline = members.iter().map(|m| m.deadline).min().unwrap_or(started);
        let oldest = members.iter().map(|m| m.enqueued).min().unwrap_or(started);
        let key_span = members.iter().fold((u128::MAX, 0), |(lo, hi), m| (lo.min(m.hash_key), hi.max(m.hash_key)));
        Some(Entry {
            shard: shard.clone(),
            payload,
            members,
            aggregated: true,
            size,
            due: started + config.record_max_buffered_time,
            deadline,
            oldest,
            key_span,
        })
    }

    /// Whether a reader keeps this Kinesis record on any shard that takes it: a plain record, or
    /// an aggregate whose members share one hash key.
    pub(crate) fn readable_anywhere(&self) -> bool {
        !self.aggregated || self.key_span.0 == self.key_span.1
    }

    /// The PutRecords entry. An aggregate is encoded the first time.
    pub(crate) fn put_entry(&mut self) -> PutEntry {
        if let Payload::Aggregate(aggregator) = &mut self.payload {
            let kinesis = aggregator.finish().expect("an aggregate entry holds two records or more");
            debug_assert_eq!(kinesis.data.len() + kinesis.partition_key.len(), self.size, "sized exactly");
            self.payload = Payload::Ready(kinesis);
        }
        match &self.payload {
            Payload::Ready(kinesis) => PutEntry {
                partition_key: kinesis.partition_key.clone(),
                explicit_hash_key: kinesis.explicit_hash_key,
                data: kinesis.data.clone(),
            },
            Payload::Aggregate(_) => unreachable!("encoded above"),
        }
    }
}

/// The record with its data compressed, when compression is on and it makes the data smaller.
fn compressed(config: &ProducerConfig, mut kinesis: KinesisRecord) -> KinesisRecord {
    if config.compression {
        let packed = kinesis_aggregation::compression::compress(&kinesis.data);
        if packed.len() < kinesis.data.len() {
            kinesis.data = packed;
        }
    }
    kinesis
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Arc;

    use kinesis_aggregation::Aggregator;
    use tokio::time::Instant;

    use super::Entry;
    use crate::config::ProducerConfig;
    use crate::pending::Pending;
    pub(crate) use crate::pending::tests::pending;

    /// An entry of `n` records with keys `key-0`.. (aggregated when `n` > 1).
    pub(crate) fn entry(n: usize) -> Entry {
        let config = ProducerConfig::default();
        let mut aggregator = Aggregator::new();
        let members: Vec<Pending> = (0..n).map(|i| pending(&format!("key-{i}"))).collect();
        for member in &members {
            assert!(aggregator.try_push_ref(&member.record).unwrap());
        }
        Entry::pack(&config, &Arc::from("shardId-000000000000"), &mut aggregator, members, Instant::now()).unwrap()
    }

    #[test]
    fn an_entry_knows_the_span_of_its_members_hash_keys() {
        let one = entry(1);
        assert!(one.readable_anywhere() && !one.aggregated);
        let many = entry(5);
        let keys: Vec<u128> = many.members.iter().map(|m| m.hash_key).collect();
        assert_eq!(many.key_span, (*keys.iter().min().unwrap(), *keys.iter().max().unwrap()));
        assert!(many.aggregated && !many.readable_anywhere());
    }
}
