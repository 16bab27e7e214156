//! The leader lock: the `Leader` row of the lease table, in the protocol of the DynamoDB lock
//! client 1.4.0 that the KCL 3.x uses, so that KCL workers and ours elect one leader among them.
//!
//! | attribute | type | value |
//! |---|---|---|
//! | `leaseKey` | S | `Leader` |
//! | `ownerName` | S | the leader's worker id |
//! | `leaseDuration` | S | how long the lock lasts without a heartbeat, in milliseconds (KCL: `"120000"`) |
//! | `recordVersionNumber` | S | a random UUID, new at every acquisition and heartbeat |
//! | `entityType` | S | `LEADER` (a KCL 3.5 leader reads a row without it as a lease) |
//!
//! - **Acquire** (a PutItem of the whole row): when there is no row (`attribute_not_exists`),
//!   when the row is released (`isReleased`, which the lock client can write), or when it is
//!   expired: *this* worker has seen the same `recordVersionNumber` for longer than the row's
//!   `leaseDuration` on its own monotonic clock (the condition is that number: whoever changed it
//!   first wins). Clocks of different workers are never compared.
//! - **Heartbeat** (every `heartbeat`): a new `recordVersionNumber`, conditional on the one this
//!   worker wrote and on its name. A failed condition: another worker has the lock now.
//! - **Release** (graceful shutdown): a DeleteItem on the same condition.
//!
//! Unlike what the KCL's #1803 reports (a dead leader's lock never taken over), a leader that
//! was killed is replaced once one worker has watched its row stand still for `leaseDuration`.
//! A leader that cannot heartbeat in time stops acting as leader before another may take over.

use std::time::Duration;

use aws_sdk_dynamodb::types::AttributeValue;
use tokio::time::Instant;

use crate::error::{LeaseTableError, dynamodb_error as classify};
use crate::leases::lease::{ENTITY_TYPE, LEASE_KEY};

/// The key of the row.
pub(crate) const LEADER_KEY: &str = "Leader";
const OWNER_NAME: &str = "ownerName";
const LEASE_DURATION: &str = "leaseDuration";
const VERSION: &str = "recordVersionNumber";
const IS_RELEASED: &str = "isReleased";

/// The row as read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct LockRow {
    pub owner: String,
    pub version: String,
    pub duration: Duration,
    pub released: bool,
}

impl LockRow {
    fn from_item(item: &std::collections::HashMap<String, AttributeValue>) -> Option<LockRow> {
        let text = |name: &str| item.get(name).and_then(|v| v.as_s().ok()).cloned();
        Some(LockRow {
            owner: text(OWNER_NAME)?,
            version: text(VERSION)?,
            duration: Duration::from_millis(text(LEASE_DURATION).and_then(|d| d.parse().ok()).unwrap_or(120_000)),
            released: item.contains_key(IS_RELEASED),
        })
    }
}

/// What this worker has seen of a lock it does not hold: a version, and since when.
#[derive(Clone, Debug, Default)]
pub(crate) struct Observer {
    seen: Option<(String, Instant)>,
}

impl Observer {
    /// Notes the row seen at `now`; whether it is expired: the same version seen for longer than
    /// its duration.
    pub(crate) fn expired(&mut self, row: &LockRow, now: Instant) -> bool {
        match &self.seen {
            Some((version, since)) if *version == row.version => now.saturating_duration_since(*since) > row.duration,
            _ => {
                self.seen = Some((row.version.clone(), now));
                false
            }
        }
    }
}

/// The lock, as one worker contends for it.
#[derive(Debug)]
pub(crate) struct LeaderLock {
    client: aws_sdk_dynamodb::Client,
    table: String,
    me: String,
    duration: Duration,
    /// The version this worker wrote last and when it was sent, while it holds the lock.
    held: Option<(String, Instant)>,
    observer: Observer,
}

fn new_version() -> String {
    let (a, b) = (fastrand::u64(..), fastrand::u64(..));
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        0x8000 | ((b >> 48) & 0x3fff),
        b & 0xffff_ffff_ffff
    )
}

impl LeaderLock {
    pub(crate) fn new(client: aws_sdk_dynamodb::Client, table: &str, me: &str, duration: Duration) -> Self {
        LeaderLock {
            client,
            table: table.to_owned(),
            me: me.to_owned(),
            duration,
            held: None,
            observer: Observer::default(),
        }
    }

    /// Whether this worker holds the lock, judged locally: its last write (acquisition or
    /// heartbeat) was sent less than two thirds of the duration ago, so it stops leading before
    /// anyone may see the lock as expired.
    pub(crate) fn holds(&self, now: Instant) -> bool {
        self.held.as_ref().is_some_and(|(_, sent)| now.saturating_duration_since(*sent) < self.duration * 2 / 3)
    }

    /// Leads if it can: true when this worker holds the lock (or just acquired it).
    ///
    /// # Errors
    /// When a call fails for another reason than its condition.
    pub(crate) async fn try_lead(&mut self) -> Result<bool, LeaseTableError> {
        let now = Instant::now();
        if self.holds(now) {
            return Ok(true);
        }
        self.held = None;
        let got = self
            .client
            .get_item()
            .table_name(&self.table)
            .key(LEASE_KEY, AttributeValue::S(LEADER_KEY.into()))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| classify("GetItem", e))?;
        let row = got.item().and_then(LockRow::from_item);
        let condition = match &row {
            None => Acquire::New,
            Some(row) if row.released => Acquire::Released,
            // This worker's own lock, from before a restart under the same worker id (or a
            // heartbeat whose answer was lost): nobody else holds it, so it is taken back at once
            // (conditioned on the version seen) instead of after its duration; worker ids are
            // unique in a fleet, as the KCL requires.
            Some(row) if row.owner == self.me => Acquire::Expired(row.version.clone()),
            Some(row) if self.observer.expired(row, now) => Acquire::Expired(row.version.clone()),
            Some(_) => return Ok(false),
        };
        self.acquire(condition).await
    }

    async fn acquire(&mut self, condition: Acquire) -> Result<bool, LeaseTableError> {
        let version = new_version();
        let s = |v: &str| AttributeValue::S(v.to_owned());
        let mut put = self
            .client
            .put_item()
            .table_name(&self.table)
            .item(LEASE_KEY, s(LEADER_KEY))
            .item(OWNER_NAME, s(&self.me))
            .item(LEASE_DURATION, s(&self.duration.as_millis().to_string()))
            .item(VERSION, s(&version))
            .item(ENTITY_TYPE, s("LEADER"))
            .expression_attribute_names("#pk", LEASE_KEY);
        put = match &condition {
            Acquire::New => put.condition_expression("attribute_not_exists(#pk)"),
            Acquire::Released => put
                .condition_expression("attribute_exists(#pk) AND #ir = :ir")
                .expression_attribute_names("#ir", IS_RELEASED)
                .expression_attribute_values(":ir", s("1")),
            Acquire::Expired(seen) => put
                .condition_expression("attribute_exists(#pk) AND #rvn = :rvn")
                .expression_attribute_names("#rvn", VERSION)
                .expression_attribute_values(":rvn", s(seen)),
        };
        let sent = Instant::now();
        match put.send().await {
            Ok(_) => {
                tracing::info!(worker = %self.me, how = ?condition, "this worker is the leader now");
                self.held = Some((version, sent));
                Ok(true)
            }
            Err(e) if e.as_service_error().is_some_and(|s| s.is_conditional_check_failed_exception()) => Ok(false),
            Err(e) => Err(classify("PutItem", e)),
        }
    }

    /// Renews a held lock (a new version). `Ok(false)`: it is no longer this worker's.
    ///
    /// # Errors
    /// When UpdateItem fails for another reason than its condition (the lock is still held
    /// until its local validity ends).
    pub(crate) async fn heartbeat(&mut self) -> Result<bool, LeaseTableError> {
        let Some((version, _)) = self.held.clone() else { return Ok(false) };
        if !self.holds(Instant::now()) {
            self.held = None;
            return Ok(false);
        }
        let next = new_version();
        let sent = Instant::now();
        let updated = self
            .client
            .update_item()
            .table_name(&self.table)
            .key(LEASE_KEY, AttributeValue::S(LEADER_KEY.into()))
            .update_expression("SET #ld = :ld, #rvn = :next")
            .condition_expression("attribute_exists(#pk) AND #rvn = :rvn AND #on = :on")
            .expression_attribute_names("#pk", LEASE_KEY)
            .expression_attribute_names("#ld", LEASE_DURATION)
            .expression_attribute_names("#rvn", VERSION)
            .expression_attribute_names("#on", OWNER_NAME)
            .expression_attribute_values(":ld", AttributeValue::S(self.duration.as_millis().to_string()))
            .expression_attribute_values(":next", AttributeValue::S(next.clone()))
            .expression_attribute_values(":rvn", AttributeValue::S(version))
            .expression_attribute_values(":on", AttributeValue::S(self.me.clone()))
            .send()
            .await;
        match updated {
            Ok(_) => {
                self.held = Some((next, sent));
                Ok(true)
            }
            Err(e) if e.as_service_error().is_some_and(|s| s.is_conditional_check_failed_exception()) => {
                tracing::warn!(worker = %self.me, "the leader lock was taken over");
                self.held = None;
                Ok(false)
            }
            Err(e) => Err(classify("UpdateItem", e)),
        }
    }

    /// Gives the lock up (graceful shutdown, or a leader that keeps failing), so that another
    /// worker leads at once.
    ///
    /// # Errors
    /// When DeleteItem fails for another reason than its condition.
    pub(crate) async fn release(&mut self) -> Result<(), LeaseTableError> {
        let Some((version, _)) = self.held.take() else { return Ok(()) };
        let deleted = self
            .client
            .delete_item()
            .table_name(&self.table)
            .key(LEASE_KEY, AttributeValue::S(LEADER_KEY.into()))
            .condition_expression("attribute_exists(#pk) AND #rvn = :rvn AND #on = :on")
            .expression_attribute_names("#pk", LEASE_KEY)
            .expression_attribute_names("#rvn", VERSION)
            .expression_attribute_names("#on", OWNER_NAME)
            .expression_attribute_values(":rvn", AttributeValue::S(version))
            .expression_attribute_values(":on", AttributeValue::S(self.me.clone()))
            .send()
            .await;
        match deleted {
            Ok(_) => Ok(()),
            Err(e) if e.as_service_error().is_some_and(|s| s.is_conditional_check_failed_exception()) => Ok(()),
            Err(e) => Err(classify("DeleteItem", e)),
        }
    }
}

/// How the lock is acquired.
#[derive(Clone, Debug)]
enum Acquire {
    New,
    Released,
    Expired(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(version: &str, seconds: u64) -> LockRow {
        LockRow { owner: "w".into(), version: version.into(), duration: Duration::from_secs(seconds), released: false }
    }

    #[tokio::test(start_paused = true)]
    async fn a_lock_is_expired_when_one_observer_saw_it_unchanged_for_its_duration() {
        let mut observer = Observer::default();
        let t0 = Instant::now();
        assert!(!observer.expired(&row("v1", 120), t0), "first sighting starts the clock");
        assert!(!observer.expired(&row("v1", 120), t0 + Duration::from_secs(120)), "not longer than the duration");
        assert!(observer.expired(&row("v1", 120), t0 + Duration::from_secs(121)));
        // A heartbeat (a new version) starts the clock again.
        assert!(!observer.expired(&row("v2", 120), t0 + Duration::from_secs(122)));
        assert!(!observer.expired(&row("v2", 120), t0 + Duration::from_secs(200)));
        // The row's own duration counts, not this worker's setting.
        assert!(observer.expired(&row("v2", 10), t0 + Duration::from_secs(200)));
    }

    #[test]
    fn versions_look_like_the_lock_clients_uuids() {
        let v = new_version();
        assert_eq!(v.len(), 36, "{v}");
        assert_eq!(v.matches('-').count(), 4, "{v}");
        assert_ne!(v, new_version());
    }

    #[tokio::test(start_paused = true)]
    async fn a_leader_stops_leading_before_anyone_may_take_over() {
        let client = aws_sdk_dynamodb::Client::from_conf(
            aws_sdk_dynamodb::Config::builder()
                .behavior_version(aws_sdk_dynamodb::config::BehaviorVersion::latest())
                .build(),
        );
        let mut lock = LeaderLock::new(client, "t", "me", Duration::from_secs(30));
        let now = Instant::now();
        assert!(!lock.holds(now));
        lock.held = Some(("v".into(), now));
        assert!(lock.holds(now + Duration::from_secs(19)));
        assert!(!lock.holds(now + Duration::from_secs(20)), "two thirds of the duration");
    }
}
