//! Which lease management a table is in: the KCL's `Migration3.0` row.
//!
//! | `cv` | lease management |
//! |---|---|
//! | `CLIENT_VERSION_3X`, `CLIENT_VERSION_3X_WITH_ROLLBACK` | KCL 3.x: a leader assigns leases; workers publish WorkerMetricStats, find their leases through the `LeaseOwnerToLeaseKeyIndex`, and hand leases off gracefully. Nobody takes or steals. |
//! | `CLIENT_VERSION_UPGRADE_FROM_2X`, `CLIENT_VERSION_2X`, no row | KCL 2.x: each worker takes and steals. During `UPGRADE_FROM_2X` workers publish WorkerMetricStats too, so that the leader can decide to flip the table to 3.x. |
//!
//! The row lives in the lease table (KCL 3.5, key `leaseKey`), or for a table of KCL 3.0 to 3.4
//! in `<app>-CoordinatorState` (key `key`). The row wins over a worker's configuration, as in the
//! KCL (`MigrationClientVersionStateInitializer`).

use aws_sdk_dynamodb::types::AttributeValue;

use crate::error::{LeaseTableError, dynamodb_error as classify};

/// The key of the row.
pub(crate) const MIGRATION_KEY: &str = "Migration3.0";

/// What the `Migration3.0` row says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum ClientVersion {
    /// No row: a KCL 2.x table (or one no KCL 3.x worker has seen yet).
    Absent,
    /// `CLIENT_VERSION_2X`: rolled back to 2.x.
    Kcl2,
    /// `CLIENT_VERSION_UPGRADE_FROM_2X`: 2.x behaviour, worker metrics published.
    UpgradeFrom2x,
    /// `CLIENT_VERSION_3X` or `CLIENT_VERSION_3X_WITH_ROLLBACK`.
    Kcl3,
    /// A value this library does not know: treated as 2.x, and said so in the log.
    Unknown(String),
}

impl ClientVersion {
    fn parse(cv: &str) -> Self {
        match cv {
            "CLIENT_VERSION_3X" | "CLIENT_VERSION_3X_WITH_ROLLBACK" => ClientVersion::Kcl3,
            "CLIENT_VERSION_UPGRADE_FROM_2X" => ClientVersion::UpgradeFrom2x,
            "CLIENT_VERSION_2X" => ClientVersion::Kcl2,
            other => ClientVersion::Unknown(other.to_owned()),
        }
    }

    /// Whether a leader assigns the leases (no taking, no stealing).
    pub(crate) fn leader_assigns(&self) -> bool {
        *self == ClientVersion::Kcl3
    }

    /// Whether workers publish their WorkerMetricStats rows.
    pub(crate) fn publishes_worker_metrics(&self) -> bool {
        matches!(self, ClientVersion::Kcl3 | ClientVersion::UpgradeFrom2x)
    }
}

/// Reads the row of the lease table `table`, or failing that of `<table>-CoordinatorState`.
///
/// # Errors
/// When a GetItem fails (other than for a missing legacy table).
pub(crate) async fn read(client: &aws_sdk_dynamodb::Client, table: &str) -> Result<ClientVersion, LeaseTableError> {
    let places = [(table.to_owned(), crate::leases::lease::LEASE_KEY), (format!("{table}-CoordinatorState"), "key")];
    for (table, key) in places {
        let got = client
            .get_item()
            .table_name(&table)
            .key(key, AttributeValue::S(MIGRATION_KEY.into()))
            .consistent_read(true)
            .send()
            .await;
        match got {
            Ok(out) => {
                if let Some(cv) = out.item().and_then(|item| item.get("cv")).and_then(|v| v.as_s().ok()) {
                    return Ok(ClientVersion::parse(cv));
                }
            }
            Err(e) if e.as_service_error().is_some_and(|s| s.is_resource_not_found_exception()) => {}
            Err(e) => return Err(classify("GetItem", e)),
        }
    }
    Ok(ClientVersion::Absent)
}

/// Writes the row a new KCL 3.x application writes (`cv` `CLIENT_VERSION_3X`, with the history
/// entry of its start), unless the table has one. Returns what the table says afterwards.
///
/// # Errors
/// When PutItem or GetItem fail for another reason than the row existing.
pub(crate) async fn start_3x(
    client: &aws_sdk_dynamodb::Client,
    table: &str,
    worker_id: &str,
) -> Result<ClientVersion, LeaseTableError> {
    create_row(client, table, worker_id, "CLIENT_VERSION_3X").await
}

/// Starts the upgrade of a KCL 2.x table (leases, no row), as a KCL 3.x worker configured for it
/// does: `cv` `CLIENT_VERSION_UPGRADE_FROM_2X`. Workers keep the 2.x lease management and publish
/// WorkerMetricStats rows until [`flip_to_3x`]. Returns what the table says afterwards.
///
/// # Errors
/// When PutItem or GetItem fail for another reason than the row existing.
pub(crate) async fn start_upgrade(
    client: &aws_sdk_dynamodb::Client,
    table: &str,
    worker_id: &str,
) -> Result<ClientVersion, LeaseTableError> {
    create_row(client, table, worker_id, "CLIENT_VERSION_UPGRADE_FROM_2X").await
}

fn history_entry(cv: &str, worker_id: &str, now: &AttributeValue) -> AttributeValue {
    let s = |v: &str| AttributeValue::S(v.to_owned());
    AttributeValue::M(std::collections::HashMap::from([
        ("cv".to_owned(), s(cv)),
        ("mb".to_owned(), s(worker_id)),
        ("mts".to_owned(), now.clone()),
    ]))
}

fn now_millis() -> AttributeValue {
    let millis = std::time::SystemTime::now().duration_since(std::time::SystemTime::UNIX_EPOCH).unwrap_or_default();
    AttributeValue::N(millis.as_millis().to_string())
}

async fn create_row(
    client: &aws_sdk_dynamodb::Client,
    table: &str,
    worker_id: &str,
    cv: &str,
) -> Result<ClientVersion, LeaseTableError> {
    let s = |v: &str| AttributeValue::S(v.to_owned());
    let now = now_millis();
    let history = AttributeValue::L(vec![history_entry("CLIENT_VERSION_INIT", worker_id, &now)]);
    let put = client
        .put_item()
        .table_name(table)
        .item(crate::leases::lease::LEASE_KEY, s(MIGRATION_KEY))
        .item(crate::leases::lease::ENTITY_TYPE, s("CLIENT_VERSION_MIGRATION"))
        .item("cv", s(cv))
        .item("mb", s(worker_id))
        .item("mts", now)
        .item("h", history)
        .condition_expression("attribute_not_exists(#key)")
        .expression_attribute_names("#key", crate::leases::lease::LEASE_KEY)
        .send()
        .await;
    match put {
        Ok(_) => Ok(ClientVersion::parse(cv)),
        Err(e) if e.as_service_error().is_some_and(|s| s.is_conditional_check_failed_exception()) => {
            read(client, table).await
        }
        Err(e) => Err(classify("PutItem", e)),
    }
}

/// Ends the upgrade, as the KCL's `MigrationReadyMonitor` does once the fleet has been ready for
/// its stabilisation time: `cv` `CLIENT_VERSION_UPGRADE_FROM_2X` becomes
/// `CLIENT_VERSION_3X_WITH_ROLLBACK`, the state left recorded in the row's history. Every worker
/// switches at its next read of the row. `Ok(false)`: the row no longer said UPGRADE_FROM_2X.
/// (The 3.5 single-table layout only.)
///
/// # Errors
/// When UpdateItem fails for another reason than its condition.
pub(crate) async fn flip_to_3x(
    client: &aws_sdk_dynamodb::Client,
    table: &str,
    worker_id: &str,
) -> Result<bool, LeaseTableError> {
    let s = |v: &str| AttributeValue::S(v.to_owned());
    let now = now_millis();
    let update = client
        .update_item()
        .table_name(table)
        .key(crate::leases::lease::LEASE_KEY, s(MIGRATION_KEY))
        .condition_expression("#cv = :from")
        .update_expression("SET #cv = :to, #mb = :mb, #mts = :mts, #h = list_append(:entry, if_not_exists(#h, :none))")
        .expression_attribute_names("#cv", "cv")
        .expression_attribute_names("#mb", "mb")
        .expression_attribute_names("#mts", "mts")
        .expression_attribute_names("#h", "h")
        .expression_attribute_values(":from", s("CLIENT_VERSION_UPGRADE_FROM_2X"))
        .expression_attribute_values(":to", s("CLIENT_VERSION_3X_WITH_ROLLBACK"))
        .expression_attribute_values(":mb", s(worker_id))
        .expression_attribute_values(":mts", now.clone())
        .expression_attribute_values(
            ":entry",
            AttributeValue::L(vec![history_entry("CLIENT_VERSION_UPGRADE_FROM_2X", worker_id, &now)]),
        )
        .expression_attribute_values(":none", AttributeValue::L(Vec::new()))
        .send()
        .await;
    match update {
        Ok(_) => Ok(true),
        Err(e) if e.as_service_error().is_some_and(|s| s.is_conditional_check_failed_exception()) => Ok(false),
        Err(e) => Err(classify("UpdateItem", e)),
    }
}

/// Whether an upgrading fleet is ready for 3.x (the KCL's `MigrationReadyMonitor`): every lease
/// has an owner, and every owner has a WorkerMetricStats row at most `fresh` old at
/// `now_epoch` (so every worker holding a lease runs 3.x-capable code). The lease-owner index
/// being ACTIVE is the caller's part.
pub(crate) fn upgrade_ready(
    leases: &[crate::leases::lease::Lease],
    workers: &[crate::leases::table::WorkerRow],
    fresh: std::time::Duration,
    now_epoch: u64,
) -> bool {
    !leases.is_empty()
        && leases.iter().all(|lease| {
            lease
                .owner
                .as_deref()
                .is_some_and(|owner| workers.iter().any(|w| w.worker_id == owner && w.is_fresh(fresh, now_epoch)))
        })
}

/// Where this worker's WorkerMetricStats row goes: the 3.0-3.4 table `<app>-WorkerMetricStats`
/// when the application still has its `<app>-CoordinatorState` table and has not finished the
/// 3.5 table migration (`TableMigration3.5` `tm` COMPLETE or PENDING); the lease table otherwise.
///
/// # Errors
/// When a DescribeTable or GetItem fails.
pub(crate) async fn worker_metrics_place(
    client: &aws_sdk_dynamodb::Client,
    table: &str,
) -> Result<crate::worker_metrics::RowPlace, LeaseTableError> {
    use crate::worker_metrics::RowPlace;
    let legacy = format!("{table}-CoordinatorState");
    match client.describe_table().table_name(&legacy).send().await {
        Ok(_) => {}
        Err(e) if e.as_service_error().is_some_and(|s| s.is_resource_not_found_exception()) => {
            return Ok(RowPlace::LeaseTable(table.to_owned()));
        }
        Err(e) => return Err(classify("DescribeTable", e)),
    }
    let out = client
        .get_item()
        .table_name(table)
        .key(crate::leases::lease::LEASE_KEY, AttributeValue::S("TableMigration3.5".into()))
        .consistent_read(true)
        .send()
        .await
        .map_err(|e| classify("GetItem", e))?;
    let migrated = out
        .item()
        .and_then(|item| item.get("tm"))
        .and_then(|v| v.as_s().ok())
        .is_some_and(|tm| tm == "TABLE_MIGRATION_STATUS_COMPLETE" || tm == "TABLE_MIGRATION_STATUS_PENDING");
    Ok(if migrated {
        RowPlace::LeaseTable(table.to_owned())
    } else {
        RowPlace::Legacy(format!("{table}-WorkerMetricStats"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_upgrade_is_ready_when_every_lease_owner_publishes_worker_metrics() {
        use crate::leases::lease::{Lease, Position};
        use crate::leases::table::WorkerRow;
        let lease = |owner: Option<&str>| {
            let mut l = Lease::new("shard", Position::TrimHorizon);
            l.owner = owner.map(str::to_owned);
            l
        };
        let row = |id: &str, lut: u64| WorkerRow {
            worker_id: id.to_owned(),
            last_update_seconds: lut,
            cpu: None,
            cpu_max: None,
            failing: false,
        };
        let workers = [row("a", 1_000), row("b", 990)];
        // (leases, now, ready)
        let cases: &[(Vec<Lease>, u64, bool)] = &[
            (vec![lease(Some("a")), lease(Some("b"))], 1_000, true),
            (vec![lease(Some("a")), lease(Some("c"))], 1_000, false),
            (vec![lease(Some("a")), lease(None)], 1_000, false),
            // b's row is 60 s old (fresh), then 61 s (stale).
            (vec![lease(Some("a")), lease(Some("b"))], 1_050, true),
            (vec![lease(Some("a")), lease(Some("b"))], 1_051, false),
            (vec![], 1_000, false),
        ];
        for (i, (leases, now, ready)) in cases.iter().enumerate() {
            assert_eq!(upgrade_ready(leases, &workers, std::time::Duration::from_secs(60), *now), *ready, "case {i}");
        }
    }

    #[test]
    fn the_row_says_who_assigns() {
        for (cv, assigns, publishes) in [
            ("CLIENT_VERSION_3X", true, true),
            ("CLIENT_VERSION_3X_WITH_ROLLBACK", true, true),
            ("CLIENT_VERSION_UPGRADE_FROM_2X", false, true),
            ("CLIENT_VERSION_2X", false, false),
            ("CLIENT_VERSION_9X", false, false),
        ] {
            let version = ClientVersion::parse(cv);
            assert_eq!(version.leader_assigns(), assigns, "{cv}");
            assert_eq!(version.publishes_worker_metrics(), publishes, "{cv}");
        }
        assert!(!ClientVersion::Absent.leader_assigns());
    }
}
