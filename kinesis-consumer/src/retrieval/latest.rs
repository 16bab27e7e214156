//! Making a LATEST start durable.
//!
//! A lease at LATEST (never read) is read from "now". The KCL (and this crate before) keeps LATEST
//! in the lease until the processor's first checkpoint, so a worker that dies in between leaves
//! LATEST behind, and the next one starts at its own "now": what was written in between is
//! skipped. Instead, when reading starts, the shard's newest record is found, and the lease is
//! checkpointed at it before anything is processed: a sequence number, which every KCL reads as
//! "resume after this record". Reading then starts after it. A failover re-delivers instead of
//! skipping.
//!
//! Finding the newest record: Kinesis cannot read backwards, so the shard is read forward to its
//! tip from `AT_TIMESTAMP` 10 seconds back, then 5 minutes back (`WINDOWS`: a busy shard has its
//! newest records within seconds, a quiet one within minutes), and failing that (nothing written
//! in either, or the local clock ahead of the service's) from `TRIM_HORIZON`, each time for at
//! most `MAX_PAGES` pages. The tip is a page that is not full and not behind
//! (`MillisBehindLatest` 0). An empty shard is checkpointed at TRIM_HORIZON (everything in it is
//! new). If the tip is not reached within the pages (a shard quiet for minutes after hours of
//! traffic), the lease stays at LATEST until the first checkpoint, as with the KCL, and the log
//! says so.

use std::time::{Duration, SystemTime};

use crate::leases::lease::{Checkpoint, Position};
use crate::retrieval::kinesis::StartAt;
use crate::retrieval::polling::Reader;

/// How far back the searches for the newest record start.
pub(crate) const WINDOWS: [Duration; 2] = [Duration::from_secs(10), Duration::from_secs(300)];

/// Records asked for per GetRecords call.
const PAGE: i32 = 10_000;

/// The most GetRecords pages read in each of the two searches.
pub(crate) const MAX_PAGES: usize = 20;

/// Where a LATEST start can be made durable: after the shard's newest record, or at TRIM_HORIZON
/// for an empty shard. `None`: not found within the pages.
pub(crate) async fn durable_start<R: Reader>(reader: &R, shard_id: &str, now: SystemTime) -> Option<Checkpoint> {
    for window in WINDOWS {
        let since = now.checked_sub(window).unwrap_or(SystemTime::UNIX_EPOCH);
        if let Some(Some(found)) = newest(reader, shard_id, StartAt::AtTimestamp(since)).await {
            return Some(found);
        }
    }
    match newest(reader, shard_id, StartAt::TrimHorizon).await {
        Some(Some(found)) => Some(found),
        // Read to its tip from the horizon and nothing there: an empty shard.
        Some(None) => Some(Checkpoint::at(Position::TrimHorizon)),
        None => None,
    }
}

/// Reads from `at` to the shard's tip. `Some(Some(checkpoint))`: after the newest record;
/// `Some(None)`: the tip was reached with nothing read; `None`: not reached (pages spent, or a
/// call failed).
async fn newest<R: Reader>(reader: &R, shard_id: &str, at: StartAt) -> Option<Option<Checkpoint>> {
    let mut iterator = reader.shard_iterator(shard_id, &at).await.ok()??;
    let mut last: Option<aws_sdk_kinesis::types::Record> = None;
    for _ in 0..MAX_PAGES {
        let page = reader.get_records(&iterator, PAGE).await.ok()?;
        let full = page.records.len() >= PAGE as usize;
        if let Some(record) = page.records.into_iter().last() {
            last = Some(record);
        }
        let at_tip = !full && page.millis_behind_latest.is_none_or(|m| m == 0);
        match page.next_iterator {
            Some(next) if !at_tip => iterator = next,
            _ => {
                return Some(last.map(|record| {
                    // After the whole Kinesis record: its last sub-record, if it is an aggregate.
                    let data = bytes::Bytes::from(record.data.into_inner());
                    let sub_records = kinesis_aggregation::deaggregate(&record.partition_key, data).records.len();
                    Checkpoint {
                        position: Position::Sequence(record.sequence_number),
                        sub_sequence: sub_records.saturating_sub(1) as u64,
                    }
                }));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::retrieval::kinesis::Fetched;
    use crate::retrieval::polling::tests::{Scripted, page};

    fn empty() -> Result<Fetched, crate::ErrorKind> {
        Ok(Fetched { records: Vec::new(), next_iterator: Some("next".into()), millis_behind_latest: Some(0) })
    }

    #[tokio::test]
    async fn a_busy_shard_has_its_newest_record_in_the_first_window() {
        let reader = Arc::new(Scripted::default());
        reader.answers.lock().unwrap().push_back(page(&["7", "8", "9"], Some("next")));
        let anchor = durable_start(&reader, "s", SystemTime::now()).await;
        assert_eq!(anchor, Some(Checkpoint { position: Position::Sequence("9".into()), sub_sequence: 0 }));
        let iterators = reader.iterators.lock().unwrap().clone();
        assert!(matches!(iterators[..], [StartAt::AtTimestamp(_)]), "{iterators:?}");
    }

    #[tokio::test]
    async fn a_quiet_shard_is_searched_from_its_horizon_and_an_empty_one_starts_there() {
        let reader = Arc::new(Scripted::default());
        reader.answers.lock().unwrap().extend([empty(), empty(), page(&["1", "2"], Some("next"))]);
        let anchor = durable_start(&reader, "s", SystemTime::now()).await;
        assert_eq!(anchor, Some(Checkpoint { position: Position::Sequence("2".into()), sub_sequence: 0 }));
        assert_eq!(reader.iterators.lock().unwrap().last(), Some(&StartAt::TrimHorizon));

        let reader = Arc::new(Scripted::default());
        reader.answers.lock().unwrap().extend([empty(), empty(), empty()]);
        assert_eq!(durable_start(&reader, "s", SystemTime::now()).await, Some(Checkpoint::at(Position::TrimHorizon)));
    }

    #[tokio::test]
    async fn a_tip_behind_the_pages_searched_is_not_guessed() {
        let reader = Arc::new(Scripted::default());
        // Always behind: the tip is never reached.
        let behind =
            || Ok(Fetched { records: Vec::new(), next_iterator: Some("n".into()), millis_behind_latest: Some(5_000) });
        reader.answers.lock().unwrap().extend((0..3 * MAX_PAGES).map(|_| behind()));
        assert_eq!(durable_start(&reader, "s", SystemTime::now()).await, None);
    }
}
