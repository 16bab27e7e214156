//! The lease table in DynamoDB, in the KCL 2.x schema: create it, list it, and change leases with
//! writes that are all conditional.
//!
//! Every change is fenced on `leaseCounter` (the value this worker last saw) and, where the KCL
//! does so (renew, release, checkpoint), on `leaseOwner`; every change bumps the counter. A failed
//! condition means another worker changed the lease first: the call returns [`Outcome::Lost`],
//! a value, not an error.

use std::collections::HashMap;
use std::time::Duration;

use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType, ReturnValue,
    ReturnValuesOnConditionCheckFailure, ScalarAttributeType, TableStatus,
};

use crate::error::{ErrorKind, LeaseTableError, dynamodb_error as classify};
use crate::leases::lease::{self, Checkpoint, Lease};

/// The result of a conditional change.
#[derive(Clone, Debug, PartialEq)]
#[must_use = "a lost lease must stop its processing"]
pub enum Outcome {
    /// The change was made; the lease as it is now (with its new counter).
    Done(Box<Lease>),
    /// Another worker holds the lease now (it took it), or the row is gone: this worker no
    /// longer holds it, and this change was not made.
    Lost,
}

/// A WorkerMetricStats row, as a leader reads it.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct WorkerRow {
    pub worker_id: String,
    /// `lut`: epoch seconds of the worker's last write.
    pub last_update_seconds: u64,
    /// Its CPU utilisation in percent: the EMA (α 0.5, oldest first) of `sts.C`, skipping `-1`;
    /// `None` without CPU figures.
    pub cpu: Option<f64>,
    /// `opr.C[0]`: its CPU operating range, percent.
    pub cpu_max: Option<f64>,
    /// Whether its last CPU figure is `-1` (a failing metric: the KCL leader assigns it nothing).
    pub failing: bool,
}

impl WorkerRow {
    /// Whether the row was written at most `window` before `now_epoch` (epoch seconds): a worker
    /// the leader counts as active, and one an upgrade counts as running 3.x-capable code.
    pub fn is_fresh(&self, window: std::time::Duration, now_epoch: u64) -> bool {
        self.last_update_seconds + window.as_secs() >= now_epoch
    }

    /// Reads the row's `lut`, `sts` and `opr`.
    fn from_item(id: &str, item: &HashMap<String, AttributeValue>) -> Option<WorkerRow> {
        let lut = item.get("lut").and_then(|v| v.as_n().ok()).and_then(|n| n.parse::<f64>().ok())?;
        let numbers = |name: &str| -> Vec<f64> {
            item.get(name)
                .and_then(|v| v.as_m().ok())
                .and_then(|m| m.get("C"))
                .and_then(|v| v.as_l().ok())
                .map(|l| l.iter().filter_map(|n| n.as_n().ok().and_then(|n| n.parse::<f64>().ok())).collect())
                .unwrap_or_default()
        };
        let figures = numbers("sts");
        let failing = figures.last().is_some_and(|f| *f == -1.0);
        let cpu = figures.iter().filter(|f| **f >= 0.0).fold(None, |ema: Option<f64>, f| {
            Some(match ema {
                None => *f,
                Some(e) => 0.5 * f + 0.5 * e,
            })
        });
        Some(WorkerRow {
            worker_id: id.to_owned(),
            last_update_seconds: lut as u64,
            cpu,
            cpu_max: numbers("opr").first().copied(),
            failing,
        })
    }
}

/// The KCL 3.x index of the lease table: hash `leaseOwner`, range `leaseKey`, keys only.
pub(crate) const LEASE_OWNER_INDEX: &str = "LeaseOwnerToLeaseKeyIndex";

/// How many times a write fenced on the counter is made again when the counter moved but the
/// lease is still this worker's (an earlier write whose answer was lost was applied).
const SAME_OWNER_RETRIES: usize = 3;

/// What a conditional write found.
enum Written {
    Done(Lease),
    /// The condition failed; the row as it is (`None`: no such row, or not a lease).
    Conflict(Option<Lease>),
}

/// A lease table, as one running instance of a worker writes it.
#[derive(Clone, Debug)]
pub struct LeaseTable {
    client: aws_sdk_dynamodb::Client,
    name: String,
    /// Written as `leaseOwnerInstance` by every take (see [`Lease::owner_instance`]).
    instance: std::sync::Arc<str>,
}

impl LeaseTable {
    /// The table `name` through `client`.
    pub fn new(client: aws_sdk_dynamodb::Client, name: impl Into<String>) -> Self {
        LeaseTable { client, name: name.into(), instance: new_instance() }
    }

    test_util_pub! {
    /// The same table, written by another running instance (a lease coordinator makes its own:
    /// two coordinators with the same worker id are never mistaken for each other).
    fn for_new_instance(&self) -> Self {
        LeaseTable { instance: new_instance(), ..self.clone() }
    }
    }

    test_util_pub! {
    /// This instance's id, as takes write it in `leaseOwnerInstance`.
    #[cfg_attr(not(feature = "test-util"), allow(dead_code))]
    fn instance(&self) -> &str {
        &self.instance
    }
    }

    /// Whether `lease` is held by `owner` as this instance took it.
    fn held_here(&self, lease: &Lease, owner: &str) -> bool {
        lease.actual_owner() == Some(owner) && lease.owner_instance.as_deref() == Some(&*self.instance)
    }

    /// The DynamoDB client.
    pub(crate) fn client(&self) -> &aws_sdk_dynamodb::Client {
        &self.client
    }

    /// The table's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Creates the table (hash key `leaseKey`, on-demand billing) unless it exists, and waits until
    /// it is ACTIVE (up to `timeout`).
    ///
    /// # Errors
    /// When CreateTable or DescribeTable fail, or the table is not ACTIVE in time.
    pub async fn create_if_missing(&self, timeout: Duration) -> Result<(), LeaseTableError> {
        let created = self
            .client
            .create_table()
            .table_name(&self.name)
            .attribute_definitions(
                AttributeDefinition::builder()
                    .attribute_name(lease::LEASE_KEY)
                    .attribute_type(ScalarAttributeType::S)
                    .build()
                    .map_err(|e| LeaseTableError::invalid("CreateTable", e.to_string()))?,
            )
            .key_schema(
                KeySchemaElement::builder()
                    .attribute_name(lease::LEASE_KEY)
                    .key_type(KeyType::Hash)
                    .build()
                    .map_err(|e| LeaseTableError::invalid("CreateTable", e.to_string()))?,
            )
            .billing_mode(BillingMode::PayPerRequest)
            .send()
            .await;
        match created {
            Ok(_) => {}
            // It exists already (or is being created by another worker).
            Err(e) if e.code() == Some("ResourceInUseException") => {}
            Err(e) => return Err(classify("CreateTable", e)),
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let described = self.client.describe_table().table_name(&self.name).send().await;
            match described {
                Ok(out) if out.table().and_then(|t| t.table_status()) == Some(&TableStatus::Active) => return Ok(()),
                Ok(_) => {}
                // Not visible yet right after CreateTable on some endpoints.
                Err(e) if e.code() == Some("ResourceNotFoundException") => {}
                Err(e) => return Err(classify("DescribeTable", e)),
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(LeaseTableError::new(
                    ErrorKind::Transient,
                    "DescribeTable",
                    None,
                    Some(format!("table {} not ACTIVE within {timeout:?}", self.name).into()),
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    test_util_pub! {
    /// Creates the KCL 3.x index `LeaseOwnerToLeaseKeyIndex` (hash `leaseOwner`, range
    /// `leaseKey`, keys only) with UpdateTable unless the table has it, and waits until it is
    /// ACTIVE (up to `timeout`), as the KCL 3.x does before it assigns leases by leader.
    ///
    /// # Errors
    /// When UpdateTable or DescribeTable fail, or the index is not ACTIVE in time.
    async fn create_owner_index_if_missing(&self, timeout: Duration) -> Result<(), LeaseTableError> {
        use aws_sdk_dynamodb::types::{
            CreateGlobalSecondaryIndexAction, GlobalSecondaryIndexUpdate, IndexStatus, Projection, ProjectionType,
        };
        let invalid = |e: aws_sdk_dynamodb::error::BuildError| LeaseTableError::invalid("UpdateTable", e.to_string());
        let status = |out: &aws_sdk_dynamodb::operation::describe_table::DescribeTableOutput| {
            out.table()
                .map(|t| t.global_secondary_indexes())
                .unwrap_or_default()
                .iter()
                .find(|i| i.index_name() == Some(LEASE_OWNER_INDEX))
                .map(|i| i.index_status().cloned())
        };
        let described = self.client.describe_table().table_name(&self.name).send().await;
        let described = described.map_err(|e| classify("DescribeTable", e))?;
        if status(&described).is_none() {
            let key = |name: &str, kind: KeyType| KeySchemaElement::builder().attribute_name(name).key_type(kind).build();
            let index = CreateGlobalSecondaryIndexAction::builder()
                .index_name(LEASE_OWNER_INDEX)
                .key_schema(key(lease::LEASE_OWNER, KeyType::Hash).map_err(invalid)?)
                .key_schema(key(lease::LEASE_KEY, KeyType::Range).map_err(invalid)?)
                .projection(Projection::builder().projection_type(ProjectionType::KeysOnly).build())
                .build()
                .map_err(invalid)?;
            let attribute = |name: &str| {
                AttributeDefinition::builder().attribute_name(name).attribute_type(ScalarAttributeType::S).build()
            };
            let updated = self
                .client
                .update_table()
                .table_name(&self.name)
                .attribute_definitions(attribute(lease::LEASE_OWNER).map_err(invalid)?)
                .attribute_definitions(attribute(lease::LEASE_KEY).map_err(invalid)?)
                .global_secondary_index_updates(GlobalSecondaryIndexUpdate::builder().create(index).build())
                .send()
                .await;
            match updated {
                Ok(_) => {}
                // Another worker is creating it (or the table is being updated): wait for it.
                Err(e) if e.code() == Some("ResourceInUseException") || e.code() == Some("ValidationException") => {
                    tracing::debug!(error = %aws_sdk_dynamodb::error::DisplayErrorContext(&e), "creating the lease-owner index");
                }
                Err(e) => return Err(classify("UpdateTable", e)),
            }
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let described = self.client.describe_table().table_name(&self.name).send().await;
            let described = described.map_err(|e| classify("DescribeTable", e))?;
            if status(&described) == Some(Some(IndexStatus::Active)) {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(LeaseTableError::new(
                    ErrorKind::Transient,
                    "DescribeTable",
                    None,
                    Some(format!("index {LEASE_OWNER_INDEX} of {} not ACTIVE within {timeout:?}", self.name).into()),
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    }

    /// Every lease, read consistently (all pages). Rows that are not leases are skipped.
    ///
    /// # Errors
    /// When a Scan fails, or a row is not a valid lease.
    pub async fn list(&self) -> Result<Vec<Lease>, LeaseTableError> {
        Ok(self.scan_fleet().await?.0)
    }

    /// The keys of the leases whose `leaseOwner` is `owner`, from the KCL 3.x index
    /// `LeaseOwnerToLeaseKeyIndex` (keys only; eventually consistent: read each lease with
    /// [`LeaseTable::get`] before relying on it).
    ///
    /// # Errors
    /// When a Query fails (`NotFound` or `Invalid` when the table has no such index).
    pub(crate) async fn lease_keys_of(&self, owner: &str) -> Result<Vec<String>, LeaseTableError> {
        let mut keys = Vec::new();
        let mut start: Option<HashMap<String, AttributeValue>> = None;
        loop {
            let out = self
                .client
                .query()
                .table_name(&self.name)
                .index_name(LEASE_OWNER_INDEX)
                .key_condition_expression("#owner = :owner")
                .expression_attribute_names("#owner", lease::LEASE_OWNER)
                .expression_attribute_values(":owner", AttributeValue::S(owner.to_owned()))
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| classify("Query", e))?;
            keys.extend(out.items().iter().filter_map(|item| item.get(lease::LEASE_KEY)?.as_s().ok().cloned()));
            match out.last_evaluated_key() {
                Some(key) if !key.is_empty() => start = Some(key.clone()),
                _ => return Ok(keys),
            }
        }
    }

    /// Every lease and every WorkerMetricStats row (KCL 3.5 single-table layout), read
    /// consistently: what a KCL 3.x leader reads at each run. Other rows are skipped.
    ///
    /// # Errors
    /// When a Scan fails, or a lease row is not a valid lease.
    pub(crate) async fn scan_fleet(&self) -> Result<(Vec<Lease>, Vec<WorkerRow>), LeaseTableError> {
        let (mut leases, mut workers) = (Vec::new(), Vec::new());
        let mut start: Option<HashMap<String, AttributeValue>> = None;
        loop {
            let out = self
                .client
                .scan()
                .table_name(&self.name)
                .consistent_read(true)
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| classify("Scan", e))?;
            for item in out.items() {
                let kind = item.get(lease::ENTITY_TYPE).and_then(|v| v.as_s().ok()).map(String::as_str);
                if kind == Some(crate::worker_metrics::WORKER_METRICS_ENTITY) {
                    if let Some(row) = item
                        .get(lease::LEASE_KEY)
                        .and_then(|v| v.as_s().ok())
                        .and_then(|id| WorkerRow::from_item(id, item))
                    {
                        workers.push(row);
                    }
                } else if let Some(lease) =
                    Lease::from_item(item).map_err(|what| LeaseTableError::invalid("Scan", what))?
                {
                    leases.push(lease);
                }
            }
            match out.last_evaluated_key() {
                Some(key) if !key.is_empty() => start = Some(key.clone()),
                _ => return Ok((leases, workers)),
            }
        }
    }

    /// The leader's `assignLease` (KCL 3.x): `lease` goes to `to` (its `checkpointOwner` removed,
    /// the counter bumped, `ownerSwitchesSinceCheckpoint` bumped when it leaves another owner),
    /// if its owner and checkpoint owner are still the ones seen — and, with `fenced`, its
    /// counter too (an expired lease renewed since the leader's scan stays where it is).
    /// `Ok(false)`: the row changed.
    ///
    /// # Errors
    /// When UpdateItem fails for another reason than its condition.
    pub(crate) async fn assign(&self, lease: &Lease, to: &str, fenced: bool) -> Result<bool, LeaseTableError> {
        let switches = lease.owner.as_deref().is_some_and(|o| o != to) || lease.checkpoint_owner.as_deref() == Some(to);
        let mut expression = String::from("SET #owner = :to, #counter = #counter + :one");
        if switches {
            expression.push_str(", #switches = if_not_exists(#switches, :zero) + :one");
        }
        expression.push_str(" REMOVE #cpo");
        let mut condition = vec![match lease.owner {
            Some(_) => "#owner = :old_owner",
            None => "attribute_not_exists(#owner)",
        }];
        condition.push(match lease.checkpoint_owner {
            Some(_) => "#cpo = :old_cpo",
            None => "attribute_not_exists(#cpo)",
        });
        if fenced {
            condition.push("#counter = :seen");
        }
        let mut update = self
            .client
            .update_item()
            .table_name(&self.name)
            .key(lease::LEASE_KEY, AttributeValue::S(lease.key.clone()))
            .update_expression(expression)
            .condition_expression(condition.join(" AND "))
            .expression_attribute_names("#owner", lease::LEASE_OWNER)
            .expression_attribute_names("#counter", lease::LEASE_COUNTER)
            .expression_attribute_names("#cpo", lease::CHECKPOINT_OWNER)
            .expression_attribute_values(":to", AttributeValue::S(to.to_owned()))
            .expression_attribute_values(":one", AttributeValue::N("1".into()));
        if switches {
            update = update
                .expression_attribute_names("#switches", lease::OWNER_SWITCHES)
                .expression_attribute_values(":zero", AttributeValue::N("0".into()));
        }
        if let Some(owner) = &lease.owner {
            update = update.expression_attribute_values(":old_owner", AttributeValue::S(owner.clone()));
        }
        if let Some(cpo) = &lease.checkpoint_owner {
            update = update.expression_attribute_values(":old_cpo", AttributeValue::S(cpo.clone()));
        }
        if fenced {
            update = update.expression_attribute_values(":seen", AttributeValue::N(lease.counter.to_string()));
        }
        match update.send().await {
            Ok(_) => Ok(true),
            Err(e) if is_condition_failed(&e) => Ok(false),
            Err(e) => Err(classify("UpdateItem", e)),
        }
    }

    /// The leader's `initiateGracefulLeaseHandoff` (KCL 3.x): `leaseOwner` becomes `to` and
    /// `checkpointOwner` `from`, the counter untouched, if `from` still owns the lease and no
    /// handoff is under way. `from` then checkpoints and transfers. `Ok(false)`: the row changed.
    ///
    /// # Errors
    /// When UpdateItem fails for another reason than its condition.
    pub(crate) async fn hand_off(&self, key: &str, from: &str, to: &str) -> Result<bool, LeaseTableError> {
        let updated = self
            .client
            .update_item()
            .table_name(&self.name)
            .key(lease::LEASE_KEY, AttributeValue::S(key.to_owned()))
            .update_expression("SET #owner = :to, #cpo = :from")
            .condition_expression("#owner = :from AND attribute_not_exists(#cpo)")
            .expression_attribute_names("#owner", lease::LEASE_OWNER)
            .expression_attribute_names("#cpo", lease::CHECKPOINT_OWNER)
            .expression_attribute_values(":to", AttributeValue::S(to.to_owned()))
            .expression_attribute_values(":from", AttributeValue::S(from.to_owned()))
            .send()
            .await;
        match updated {
            Ok(_) => Ok(true),
            Err(e) if is_condition_failed(&e) => Ok(false),
            Err(e) => Err(classify("UpdateItem", e)),
        }
    }

    /// One lease, read consistently; `None` when there is no such row, or it is not a lease.
    ///
    /// # Errors
    /// When GetItem fails, or the row is not a valid lease.
    pub async fn get(&self, key: &str) -> Result<Option<Lease>, LeaseTableError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.name)
            .key(lease::LEASE_KEY, AttributeValue::S(key.to_owned()))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| classify("GetItem", e))?;
        match out.item() {
            Some(item) => Lease::from_item(item).map_err(|what| LeaseTableError::invalid("GetItem", what)),
            None => Ok(None),
        }
    }

    /// Writes a new lease unless a row with its key exists. `Ok(false)`: it exists.
    ///
    /// # Errors
    /// When PutItem fails for another reason.
    pub async fn create(&self, lease: &Lease) -> Result<bool, LeaseTableError> {
        let put = self
            .client
            .put_item()
            .table_name(&self.name)
            .set_item(Some(lease.to_item()))
            .condition_expression("attribute_not_exists(#key)")
            .expression_attribute_names("#key", lease::LEASE_KEY)
            .send()
            .await;
        match put {
            Ok(_) => Ok(true),
            Err(e) if is_condition_failed(&e) => Ok(false),
            Err(e) => Err(classify("PutItem", e)),
        }
    }

    /// Deletes a lease if its counter is still the one seen (a worker holding it then finds it
    /// gone at its next write). `Ok(false)`: it changed, or is gone already.
    ///
    /// # Errors
    /// When DeleteItem fails for another reason than the condition.
    pub async fn delete(&self, lease: &Lease) -> Result<bool, LeaseTableError> {
        let deleted = self
            .client
            .delete_item()
            .table_name(&self.name)
            .key(lease::LEASE_KEY, AttributeValue::S(lease.key.clone()))
            .condition_expression("#counter = :seen")
            .expression_attribute_names("#counter", lease::LEASE_COUNTER)
            .expression_attribute_values(":seen", AttributeValue::N(lease.counter.to_string()))
            .send()
            .await;
        match deleted {
            Ok(_) => Ok(true),
            Err(e) if is_condition_failed(&e) => Ok(false),
            Err(e) => Err(classify("DeleteItem", e)),
        }
    }

    test_util_pub! {
    /// Renews a held lease: bumps its counter (and writes this instance, and the lease's
    /// throughput when given, as a KCL 3.x renewal does), if the counter and the holder are still
    /// the ones seen.
    ///
    /// # Errors
    /// When UpdateItem fails for another reason than the condition.
    ///
    /// When the counter moved but the row still names this holder, an earlier write of this
    /// worker was applied without its answer arriving (a timeout, a reset connection): the lease
    /// is still held, and the renewal is made again at the counter the row has. When a KCL 3.x
    /// leader started a graceful handoff (the row names another owner and this worker as the
    /// `checkpointOwner`), the renewal is made again as the checkpoint owner: the answer's
    /// [`Lease::checkpoint_owner`] says so, and the lease must be transferred soon.
    async fn renew(&self, lease: &Lease, throughput_kbps: Option<f64>) -> Result<Outcome, LeaseTableError> {
        let instance = self.instance.to_string();
        self.owned_write(lease, |seen, holder| {
            let mut update = Update::new(seen, "SET #counter = #counter + :one, #instance = :instance")
                .held_by(seen, holder)
                .name("#instance", lease::OWNER_INSTANCE)
                .value(":instance", AttributeValue::S(instance.clone()));
            if let Some(kbps) = throughput_kbps {
                update.expression.push_str(", #kbps = :kbps");
                update = update
                    .name("#kbps", lease::THROUGHPUT_KBPS)
                    .value(":kbps", AttributeValue::N(lease::format_kbps(kbps)));
            }
            update
        })
        .await
    }
    }

    test_util_pub! {
    /// Ends a graceful handoff (KCL 3.x): the lease passes to the owner the leader chose — the
    /// `checkpointOwner` is removed and the counter bumped — if the row still names that owner
    /// and this worker as the checkpoint owner. Call it after the processor's last checkpoint.
    /// `Ok(Outcome::Done)` holds the lease as the new owner now has it.
    ///
    /// # Errors
    /// When UpdateItem fails for another reason than the condition.
    async fn transfer(&self, lease: &Lease) -> Result<Outcome, LeaseTableError> {
        let (Some(me), Some(new_owner)) = (lease.checkpoint_owner.as_deref(), lease.owner.as_deref()) else {
            return Ok(Outcome::Lost);
        };
        let updated = self
            .client
            .update_item()
            .table_name(&self.name)
            .key(lease::LEASE_KEY, AttributeValue::S(lease.key.clone()))
            .update_expression("SET #counter = #counter + :one REMOVE #cpo")
            .condition_expression("#owner = :new_owner AND #cpo = :me")
            .expression_attribute_names("#counter", lease::LEASE_COUNTER)
            .expression_attribute_names("#owner", lease::LEASE_OWNER)
            .expression_attribute_names("#cpo", lease::CHECKPOINT_OWNER)
            .expression_attribute_values(":one", AttributeValue::N("1".into()))
            .expression_attribute_values(":new_owner", AttributeValue::S(new_owner.to_owned()))
            .expression_attribute_values(":me", AttributeValue::S(me.to_owned()))
            .return_values(ReturnValue::AllNew)
            .send()
            .await;
        match updated {
            Ok(out) => match out.attributes().map(Lease::from_item) {
                Some(Ok(Some(lease))) => Ok(Outcome::Done(Box::new(lease))),
                _ => Err(LeaseTableError::invalid("UpdateItem", "a transfer returned no lease".into())),
            },
            Err(e) if is_condition_failed(&e) => Ok(Outcome::Lost),
            Err(e) => Err(classify("UpdateItem", e)),
        }
    }
    }

    /// A write fenced on the counter and the owner, made again (a few times) at the row's
    /// counter while the row still names the owner.
    async fn owned_write(
        &self,
        lease: &Lease,
        update: impl Fn(&Lease, &str) -> Update,
    ) -> Result<Outcome, LeaseTableError> {
        let Some(holder) = lease.actual_owner().map(str::to_owned) else { return Ok(Outcome::Lost) };
        let mut seen = lease.clone();
        for _ in 0..=SAME_OWNER_RETRIES {
            match update(&seen, &holder).run(self).await? {
                Written::Done(lease) => return Ok(Outcome::Done(Box::new(lease))),
                // A KCL 3.x leader began a graceful handoff from this worker: it still holds the
                // lease, as the checkpoint owner, until it transfers it.
                Written::Conflict(Some(current))
                    if seen.checkpoint_owner.is_none()
                        && current.checkpoint_owner.as_deref() == Some(holder.as_str())
                        && current.owner.as_deref() != Some(holder.as_str())
                        && current.counter == seen.counter =>
                {
                    tracing::info!(lease = %current.key, to = ?current.owner, "the leader asked for a graceful handoff");
                    seen = current;
                }
                Written::Conflict(Some(current)) if self.held_here(&current, &holder) => {
                    tracing::debug!(lease = %current.key, seen = seen.counter, now = current.counter,
                        "the counter moved under this owner (an answer was lost); writing again");
                    seen = current;
                }
                Written::Conflict(_) => return Ok(Outcome::Lost),
            }
        }
        Ok(Outcome::Lost)
    }

    test_util_pub! {
    /// Takes a lease (free, expired, or stolen) for `owner`, if its counter is still the one seen.
    /// Bumps the counter and `ownerSwitchesSinceCheckpoint`.
    ///
    /// # Errors
    /// When UpdateItem fails for another reason than the condition.
    ///
    /// When the condition fails and the row names `owner` with a higher counter, this take was
    /// applied and its answer lost: the lease is taken.
    async fn take(&self, lease: &Lease, owner: &str) -> Result<Outcome, LeaseTableError> {
        let written = Update::new(
            lease,
            "SET #counter = #counter + :one, #owner = :new_owner, #switches = if_not_exists(#switches, :zero) + :one, \
             #instance = :instance",
        )
        .value(":new_owner", AttributeValue::S(owner.to_owned()))
        .value(":instance", AttributeValue::S(self.instance.to_string()))
        .name("#instance", lease::OWNER_INSTANCE)
        .value(":zero", AttributeValue::N("0".into()))
        .name("#owner", lease::LEASE_OWNER)
        .name("#switches", lease::OWNER_SWITCHES)
        .run(self)
        .await?;
        Ok(match written {
            Written::Done(lease) => Outcome::Done(Box::new(lease)),
            Written::Conflict(Some(current)) if self.held_here(&current, owner) && current.counter > lease.counter => {
                Outcome::Done(Box::new(current))
            }
            Written::Conflict(_) => Outcome::Lost,
        })
    }
    }

    test_util_pub! {
    /// Gives a held lease up: removes the owner (so another worker can take it at once) and bumps
    /// the counter, if the counter and the owner are still the ones seen.
    ///
    /// # Errors
    /// When UpdateItem fails for another reason than the condition.
    async fn release(&self, lease: &Lease) -> Result<Outcome, LeaseTableError> {
        self.owned_write(lease, |seen, owner| {
            Update::new(seen, "SET #counter = #counter + :one REMOVE #owner").held_by(seen, owner)
        })
        .await
    }
    }

    test_util_pub! {
    /// Records a checkpoint on a held lease: sets it, clears the pending checkpoint and the owner
    /// switches, bumps the counter, if the counter and the owner are still the ones seen. A lost
    /// lease is never written: the new owner's progress stays.
    ///
    /// # Errors
    /// When UpdateItem fails for another reason than the condition.
    ///
    /// As with [`LeaseTable::renew`], a write whose counter moved under the same owner is made
    /// again. A row at SHARD_END is never moved back: that write is `Lost`.
    async fn checkpoint(&self, lease: &Lease, checkpoint: &Checkpoint) -> Result<Outcome, LeaseTableError> {
        self.owned_write(lease, |seen, owner| {
            let mut update = Update::new(
                seen,
                "SET #counter = #counter + :one, #checkpoint = :checkpoint, #sub = :sub, #switches = :zero \
                 REMOVE #pending, #pending_sub",
            )
            .held_by(seen, owner)
            .value(":checkpoint", AttributeValue::S(checkpoint.position.as_str().to_owned()))
            .value(":sub", AttributeValue::N(checkpoint.sub_sequence.to_string()))
            .value(":zero", AttributeValue::N("0".into()))
            .name("#checkpoint", lease::CHECKPOINT)
            .name("#sub", lease::CHECKPOINT_SUB_SEQUENCE)
            .name("#switches", lease::OWNER_SWITCHES)
            .name("#pending", lease::PENDING_CHECKPOINT)
            .name("#pending_sub", lease::PENDING_CHECKPOINT_SUB_SEQUENCE);
            if checkpoint.position != crate::leases::lease::Position::ShardEnd {
                update = update.not_at_shard_end();
            }
            update
        })
        .await
    }
    }

    /// The first phase of a two-phase checkpoint (the KCL's `prepareCheckpoint`): records
    /// `pending` as `pendingCheckpoint` on a held lease, fenced as [`LeaseTable::checkpoint`]. A
    /// worker that takes the lease over hands it to its processor's `initialize`.
    ///
    /// # Errors
    /// When UpdateItem fails for another reason than the condition.
    pub(crate) async fn prepare(&self, lease: &Lease, pending: &Checkpoint) -> Result<Outcome, LeaseTableError> {
        self.owned_write(lease, |seen, owner| {
            Update::new(seen, "SET #counter = #counter + :one, #pending = :pending, #pending_sub = :pending_sub")
                .held_by(seen, owner)
                .not_at_shard_end()
                .value(":pending", AttributeValue::S(pending.position.as_str().to_owned()))
                .value(":pending_sub", AttributeValue::N(pending.sub_sequence.to_string()))
                .name("#pending", lease::PENDING_CHECKPOINT)
                .name("#pending_sub", lease::PENDING_CHECKPOINT_SUB_SEQUENCE)
        })
        .await
    }
}

/// A conditional UpdateItem on one lease: `#counter = :seen` (and `#owner = :owner` when fenced
/// on the owner), returning the new row.
struct Update {
    key: String,
    expression: String,
    condition: String,
    names: HashMap<String, String>,
    values: HashMap<String, AttributeValue>,
}

impl Update {
    fn new(lease: &Lease, expression: &str) -> Self {
        let mut update = Update {
            key: lease.key.clone(),
            expression: expression.to_owned(),
            condition: "#counter = :seen".into(),
            names: HashMap::new(),
            values: HashMap::new(),
        };
        update.names.insert("#counter".into(), lease::LEASE_COUNTER.into());
        update.values.insert(":seen".into(), AttributeValue::N(lease.counter.to_string()));
        update.values.insert(":one".into(), AttributeValue::N("1".into()));
        update
    }

    /// Fenced on the holder too: `holder` is the owner and no handoff is under way, or (during a
    /// handoff, when `seen` says so) `holder` is the checkpoint owner.
    fn held_by(mut self, seen: &Lease, holder: &str) -> Self {
        if seen.checkpoint_owner.as_deref() == Some(holder) {
            self.condition.push_str(" AND #cpo = :holder");
        } else {
            self.condition.push_str(" AND #owner = :holder AND attribute_not_exists(#cpo)");
            self.names.insert("#owner".into(), lease::LEASE_OWNER.into());
        }
        self.names.insert("#cpo".into(), lease::CHECKPOINT_OWNER.into());
        self.values.insert(":holder".into(), AttributeValue::S(holder.to_owned()));
        self
    }

    /// The row is not at SHARD_END (which is final).
    fn not_at_shard_end(mut self) -> Self {
        self.condition.push_str(" AND #checkpoint <> :shard_end");
        self.names.insert("#checkpoint".into(), lease::CHECKPOINT.into());
        self.values.insert(":shard_end".into(), AttributeValue::S("SHARD_END".into()));
        self
    }

    fn name(mut self, placeholder: &str, attribute: &str) -> Self {
        self.names.insert(placeholder.into(), attribute.into());
        self
    }

    fn value(mut self, placeholder: &str, value: AttributeValue) -> Self {
        self.values.insert(placeholder.into(), value);
        self
    }

    async fn run(self, table: &LeaseTable) -> Result<Written, LeaseTableError> {
        let updated = table
            .client
            .update_item()
            .table_name(&table.name)
            .key(lease::LEASE_KEY, AttributeValue::S(self.key))
            .update_expression(self.expression)
            .condition_expression(self.condition)
            .set_expression_attribute_names(Some(self.names))
            .set_expression_attribute_values(Some(self.values))
            .return_values(ReturnValue::AllNew)
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .send()
            .await;
        match updated {
            Ok(out) => {
                let item = out.attributes().ok_or_else(|| {
                    LeaseTableError::invalid("UpdateItem", "UpdateItem returned no attributes".into())
                })?;
                match Lease::from_item(item).map_err(|what| LeaseTableError::invalid("UpdateItem", what))? {
                    Some(lease) => Ok(Written::Done(lease)),
                    None => Err(LeaseTableError::invalid("UpdateItem", "the row is not a lease".into())),
                }
            }
            Err(e) if is_condition_failed(&e) => {
                // The row as it is, when the service returned it (ALL_OLD): whose it is now.
                let current = e
                    .as_service_error()
                    .and_then(|s| match s {
                        aws_sdk_dynamodb::operation::update_item::UpdateItemError::ConditionalCheckFailedException(
                            c,
                        ) => c.item(),
                        _ => None,
                    })
                    .and_then(|item| Lease::from_item(item).ok().flatten());
                Ok(Written::Conflict(current))
            }
            Err(e) => Err(classify("UpdateItem", e)),
        }
    }
}

fn is_condition_failed<E: ProvideErrorMetadata, R>(error: &SdkError<E, R>) -> bool {
    error.code() == Some("ConditionalCheckFailedException")
}

/// A random id for a running instance.
fn new_instance() -> std::sync::Arc<str> {
    format!("{:016x}", fastrand::u64(..)).into()
}

#[cfg(test)]
mod worker_row_tests {
    use super::*;

    fn row(sts: &[f64], opr: Option<f64>) -> HashMap<String, AttributeValue> {
        let list = |v: &[f64]| AttributeValue::L(v.iter().map(|n| AttributeValue::N(n.to_string())).collect());
        let mut item = HashMap::from([("lut".to_owned(), AttributeValue::N("1700000000".into()))]);
        item.insert("sts".into(), AttributeValue::M(HashMap::from([("C".to_owned(), list(sts))])));
        if let Some(max) = opr {
            item.insert("opr".into(), AttributeValue::M(HashMap::from([("C".to_owned(), list(&[max]))])));
        }
        item
    }

    #[test]
    fn cpu_is_the_ema_of_the_figures_oldest_first_skipping_failures() {
        let w = WorkerRow::from_item("w", &row(&[10.0, 30.0, 50.0], Some(80.0))).unwrap();
        // 10, then 0.5*30 + 0.5*10 = 20, then 0.5*50 + 0.5*20 = 35.
        assert_eq!(
            (w.cpu, w.cpu_max, w.failing, w.last_update_seconds),
            (Some(35.0), Some(80.0), false, 1_700_000_000)
        );
        let w = WorkerRow::from_item("w", &row(&[10.0, -1.0, 30.0], None)).unwrap();
        assert_eq!((w.cpu, w.cpu_max, w.failing), (Some(20.0), None, false));
        let w = WorkerRow::from_item("w", &row(&[10.0, -1.0], None)).unwrap();
        assert!(w.failing, "a last figure of -1 is a failing metric");
        let w = WorkerRow::from_item("w", &row(&[], None)).unwrap();
        assert_eq!(w.cpu, None, "no figures: balanced by throughput");
        assert!(WorkerRow::from_item("w", &HashMap::new()).is_none(), "no lut: not a row");
    }
}
