//! Lease items in DynamoDB and the conditional writes on them.
//!
//! One item per lease, partition key `pk`: `<cluster>#leader` and
//! `<cluster>#slot#<k>`. Every write changes the record version number `rvn`
//! (random), and every write is conditional on the version the writer last
//! saw, so two writers can never both succeed from the same state. Wall-clock
//! times in items (`renewed_at`) are for people only; nothing compares them.

use std::collections::HashMap;
use std::time::Duration;

use aws_sdk_dynamodb::operation::put_item::PutItemError;
use aws_sdk_dynamodb::operation::update_item::UpdateItemError;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType, KeysAndAttributes,
    ReturnValuesOnConditionCheckFailure, ScalarAttributeType,
};
use aws_sdk_dynamodb::Client;

use crate::aws::AwsCallError;
use crate::clock::WallClock;

/// IAM actions the lease code needs on the table, for error messages.
pub const IAM_ACTIONS: &str =
    "dynamodb:GetItem, dynamodb:BatchGetItem, dynamodb:PutItem, dynamodb:UpdateItem";

/// Conditional writes one renewal or release makes while the item stays this
/// process's at versions it did not write in that call (answers lost, delayed
/// writes landing): past that it is treated as lost.
const WRITES_ON_OWN_ITEM: usize = 3;

/// Longest lease an item may claim: a corrupted `lease_ms` must not make an item
/// untakeable for ever.
pub const MAX_LEASE: Duration = Duration::from_secs(3600);

/// A lease as stored.
#[derive(Clone, Debug, PartialEq)]
pub struct LeaseItem {
    pub pk: String,
    pub holder: String,
    pub addr: String,
    pub weight: f64,
    pub rvn: String,
    pub lease: Duration,
    /// Incremented on every acquisition; the fencing token of the leader item.
    pub term: u64,
    pub released: bool,
    /// Holder's wall clock at the last write, informational.
    pub renewed_at_ms: i64,
    /// The process that wrote it (random per start), so that two processes
    /// sharing one `REPLICA_ID` are told apart.
    pub incarnation: String,
}

/// What this replica writes into items it holds.
#[derive(Clone, Debug)]
pub struct HolderInfo {
    pub id: String,
    /// Random per process start: see [`LeaseItem::incarnation`].
    pub incarnation: String,
    pub addr: String,
    pub weight: f64,
    pub lease: Duration,
}

/// Why a lease operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LeaseError {
    /// The condition did not hold: someone else wrote the item.
    #[error("lease {pk} was taken or changed by another writer")]
    Lost { pk: String },
    #[error(
        "DynamoDB table {table:?} does not exist in this region: create it (partition key `pk`, \
         type String; see deploy/) or set CREATE_TABLE=true for development"
    )]
    TableMissing { table: String },
    #[error(
        "access to DynamoDB table {table:?} denied: the task role needs {IAM_ACTIONS} \
         (and dynamodb:CreateTable, dynamodb:DescribeTable with CREATE_TABLE=true) on the table: {detail}"
    )]
    AccessDenied { table: String, detail: String },
    #[error(
        "lease {pk} is held by another running process with the same REPLICA_ID {id:?}: give \
         every replica its own REPLICA_ID (the default, the ECS task ARN, is unique)"
    )]
    SameReplicaId { id: String, pk: String },
    #[error(transparent)]
    Aws(AwsCallError),
}

impl LeaseError {
    /// Errors an operator must fix (as opposed to transient ones).
    pub fn is_configuration(&self) -> bool {
        matches!(
            self,
            LeaseError::TableMissing { .. }
                | LeaseError::AccessDenied { .. }
                | LeaseError::SameReplicaId { .. }
        )
    }
}

/// A fresh random id, for record versions and incarnations.
pub fn new_rvn() -> String {
    format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..))
}

fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}

fn n(v: impl ToString) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

impl LeaseItem {
    fn from_attrs(attrs: &HashMap<String, AttributeValue>) -> Option<LeaseItem> {
        let get_s = |k: &str| attrs.get(k).and_then(|v| v.as_s().ok()).cloned();
        let get_n = |k: &str| {
            attrs
                .get(k)
                .and_then(|v| v.as_n().ok())
                .and_then(|n| n.parse::<f64>().ok())
                .filter(|n| n.is_finite())
        };
        // Whole numbers as written; anything else (a fraction, an exponent, a
        // negative) reads as 0, which the next acquisition writes over.
        let get_u64 = |k: &str| {
            attrs
                .get(k)
                .and_then(|v| v.as_n().ok())
                .and_then(|n| n.parse::<u64>().ok())
        };
        Some(LeaseItem {
            pk: get_s("pk")?,
            holder: get_s("holder").unwrap_or_default(),
            addr: get_s("addr").unwrap_or_default(),
            weight: get_n("weight").filter(|w| *w > 0.0).unwrap_or(1.0),
            rvn: get_s("rvn").unwrap_or_default(),
            lease: Duration::from_millis(get_u64("lease_ms").unwrap_or(0)).min(MAX_LEASE),
            term: get_u64("term").unwrap_or(0),
            released: attrs
                .get("released")
                .and_then(|v| v.as_bool().ok())
                .copied()
                .unwrap_or(false),
            renewed_at_ms: get_n("renewed_at").unwrap_or(0.0) as i64,
            incarnation: get_s("inc").unwrap_or_default(),
        })
    }
}

/// The lease items of one cluster in one table.
#[derive(Clone, Debug)]
pub struct LeaseTable {
    client: Client,
    table: String,
    cluster: String,
    clock: WallClock,
}

impl LeaseTable {
    pub fn new(client: Client, table: String, cluster: String, clock: WallClock) -> Self {
        LeaseTable {
            client,
            table,
            cluster,
            clock,
        }
    }

    pub fn table(&self) -> &str {
        &self.table
    }

    pub fn leader_pk(&self) -> String {
        format!("{}#leader", self.cluster)
    }

    pub fn slot_pk(&self, slot: u32) -> String {
        format!("{}#slot#{slot}", self.cluster)
    }

    /// The slot number of a slot item's key, if it is one of this cluster's.
    pub fn slot_of(&self, pk: &str) -> Option<u32> {
        pk.strip_prefix(&self.cluster)?
            .strip_prefix("#slot#")?
            .parse()
            .ok()
    }

    fn classify<E, R>(
        &self,
        operation: &'static str,
        pk: &str,
        err: &aws_smithy_runtime_api::client::result::SdkError<E, R>,
    ) -> LeaseError
    where
        E: aws_smithy_types::error::metadata::ProvideErrorMetadata + std::error::Error + 'static,
        R: std::fmt::Debug,
    {
        let call = AwsCallError::new(
            operation,
            IAM_ACTIONS,
            format!("table {:?} item {pk:?}", self.table),
            err,
        );
        match call.code.as_deref() {
            Some("ResourceNotFoundException") => LeaseError::TableMissing {
                table: self.table.clone(),
            },
            Some(c) if c.contains("AccessDenied") || c == "UnrecognizedClientException" => {
                LeaseError::AccessDenied {
                    table: self.table.clone(),
                    detail: call.detail,
                }
            }
            _ => LeaseError::Aws(call),
        }
    }

    /// Creates the table (on-demand billing) if it does not exist.
    pub async fn create_if_missing(&self) -> Result<(), LeaseError> {
        let result = self
            .client
            .create_table()
            .table_name(&self.table)
            .billing_mode(BillingMode::PayPerRequest)
            .attribute_definitions(
                AttributeDefinition::builder()
                    .attribute_name("pk")
                    .attribute_type(ScalarAttributeType::S)
                    .build()
                    .map_err(|e| {
                        LeaseError::Aws(AwsCallError::local("dynamodb:CreateTable", &self.table, e))
                    })?,
            )
            .key_schema(
                KeySchemaElement::builder()
                    .attribute_name("pk")
                    .key_type(KeyType::Hash)
                    .build()
                    .map_err(|e| {
                        LeaseError::Aws(AwsCallError::local("dynamodb:CreateTable", &self.table, e))
                    })?,
            )
            .send()
            .await;
        match result {
            Ok(_) => {
                tracing::info!(table = %self.table, "created DynamoDB lease table");
                Ok(())
            }
            Err(err)
                if err
                    .as_service_error()
                    .is_some_and(|e| e.is_resource_in_use_exception()) =>
            {
                Ok(())
            }
            Err(err) => Err(self.classify("dynamodb:CreateTable", "-", &err)),
        }
    }

    /// Reads items with strongly consistent reads. Missing items are absent from the map.
    pub async fn read(&self, pks: &[String]) -> Result<HashMap<String, LeaseItem>, LeaseError> {
        let mut out = HashMap::new();
        for chunk in pks.chunks(100) {
            let mut keys: Vec<HashMap<String, AttributeValue>> = chunk
                .iter()
                .map(|pk| HashMap::from([("pk".to_owned(), s(pk))]))
                .collect();
            // BatchGetItem may return some keys unprocessed; ask again for those.
            for _ in 0..5 {
                if keys.is_empty() {
                    break;
                }
                let request = KeysAndAttributes::builder()
                    .set_keys(Some(keys.clone()))
                    .consistent_read(true)
                    .build()
                    .map_err(|e| {
                        LeaseError::Aws(AwsCallError::local(
                            "dynamodb:BatchGetItem",
                            &self.table,
                            e,
                        ))
                    })?;
                let resp = self
                    .client
                    .batch_get_item()
                    .request_items(&self.table, request)
                    .send()
                    .await
                    .map_err(|e| self.classify("dynamodb:BatchGetItem", &chunk[0], &e))?;
                for attrs in resp
                    .responses()
                    .and_then(|r| r.get(&self.table))
                    .into_iter()
                    .flatten()
                {
                    if let Some(item) = LeaseItem::from_attrs(attrs) {
                        out.insert(item.pk.clone(), item);
                    }
                }
                keys = resp
                    .unprocessed_keys()
                    .and_then(|u| u.get(&self.table))
                    .map(|k| k.keys().to_vec())
                    .unwrap_or_default();
            }
        }
        Ok(out)
    }

    /// Takes a lease that is missing (`seen` is `None`) or that was seen released
    /// or expired with version `seen.rvn`. The new term is one above both the seen
    /// item's and `after_term` (the highest this replica knows, so that terms grow
    /// even if the item was deleted). Returns the item as written. As with
    /// renewals, a condition failure whose old item carries the version this call
    /// wrote is the success of an earlier attempt whose answer was lost.
    pub async fn acquire(
        &self,
        pk: &str,
        seen: Option<&LeaseItem>,
        after_term: u64,
        me: &HolderInfo,
    ) -> Result<LeaseItem, LeaseError> {
        let item = LeaseItem {
            pk: pk.to_owned(),
            holder: me.id.clone(),
            addr: me.addr.clone(),
            weight: me.weight,
            rvn: new_rvn(),
            lease: me.lease,
            term: seen.map_or(0, |s| s.term).max(after_term).saturating_add(1),
            released: false,
            renewed_at_ms: self.clock.now_ms(),
            incarnation: me.incarnation.clone(),
        };
        let mut req = self
            .client
            .put_item()
            .table_name(&self.table)
            .item("pk", s(pk))
            .item("holder", s(&item.holder))
            .item("addr", s(&item.addr))
            .item("weight", n(item.weight))
            .item("rvn", s(&item.rvn))
            .item("lease_ms", n(item.lease.as_millis()))
            .item("term", n(item.term))
            .item("released", AttributeValue::Bool(false))
            .item("renewed_at", n(item.renewed_at_ms))
            .item("acquired_at", n(item.renewed_at_ms))
            .item("inc", s(&item.incarnation));
        req = match seen {
            None => req.condition_expression("attribute_not_exists(pk)"),
            Some(seen) => req
                .condition_expression("rvn = :seen")
                .expression_attribute_values(":seen", s(&seen.rvn)),
        }
        .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld);
        match req.send().await {
            Ok(_) => Ok(item),
            Err(err) => match err.as_service_error() {
                Some(PutItemError::ConditionalCheckFailedException(failed)) => {
                    // The SDK retried a write whose answer was lost: the item is ours.
                    let current = failed.item().and_then(LeaseItem::from_attrs);
                    if current.is_some_and(|cur| cur.rvn == item.rvn) {
                        Ok(item)
                    } else {
                        Err(LeaseError::Lost { pk: pk.to_owned() })
                    }
                }
                _ => Err(self.classify("dynamodb:PutItem", pk, &err)),
            },
        }
    }

    /// Renews a held lease: a new version, conditional on holder and current version.
    /// A condition failure whose old item already carries the new version is the
    /// success of an earlier attempt of this same call (the SDK retried it).
    pub async fn renew(&self, held: &LeaseItem, me: &HolderInfo) -> Result<LeaseItem, LeaseError> {
        self.write_conditional(held, me, false).await
    }

    /// Releases a held lease (keeping its term), so a successor can take it at once.
    pub async fn release(
        &self,
        held: &LeaseItem,
        me: &HolderInfo,
    ) -> Result<LeaseItem, LeaseError> {
        self.write_conditional(held, me, true).await
    }

    /// A condition failure whose old item is still this process's (holder and
    /// incarnation ours, not released) means an earlier write of ours was applied
    /// but its answer lost (or a delayed one landed meanwhile): the write is made
    /// again on the version found, up to [`WRITES_ON_OWN_ITEM`] writes in all.
    async fn write_conditional(
        &self,
        held: &LeaseItem,
        me: &HolderInfo,
        release: bool,
    ) -> Result<LeaseItem, LeaseError> {
        let mut on = held.clone();
        for _ in 0..WRITES_ON_OWN_ITEM {
            match self.write_conditional_once(&on, me, release).await {
                Ok(item) => return Ok(item),
                Err(Retry::Failed(err)) => return Err(err),
                Err(Retry::On(current)) => on = current,
            }
        }
        Err(LeaseError::Lost {
            pk: held.pk.clone(),
        })
    }

    async fn write_conditional_once(
        &self,
        held: &LeaseItem,
        me: &HolderInfo,
        release: bool,
    ) -> Result<LeaseItem, Retry> {
        let mut next = held.clone();
        next.rvn = new_rvn();
        next.renewed_at_ms = self.clock.now_ms();
        next.addr = me.addr.clone();
        next.weight = me.weight;
        next.lease = me.lease;
        next.released = release;
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("pk", s(&held.pk))
            .update_expression(
                "SET rvn = :new, renewed_at = :now, addr = :addr, weight = :w, lease_ms = :l, released = :rel",
            )
            .condition_expression("holder = :me AND inc = :inc AND rvn = :old")
            .expression_attribute_values(":new", s(&next.rvn))
            .expression_attribute_values(":now", n(next.renewed_at_ms))
            .expression_attribute_values(":addr", s(&next.addr))
            .expression_attribute_values(":w", n(next.weight))
            .expression_attribute_values(":l", n(next.lease.as_millis()))
            .expression_attribute_values(":rel", AttributeValue::Bool(release))
            .expression_attribute_values(":me", s(&me.id))
            .expression_attribute_values(":inc", s(&me.incarnation))
            .expression_attribute_values(":old", s(&held.rvn))
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .send()
            .await;
        match result {
            Ok(_) => Ok(next),
            Err(err) => match err.as_service_error() {
                Some(UpdateItemError::ConditionalCheckFailedException(failed)) => {
                    let current = failed.item().and_then(LeaseItem::from_attrs);
                    match current {
                        Some(cur) if cur.holder == me.id && cur.rvn == next.rvn => Ok(next),
                        Some(cur) if cur.holder == me.id && cur.incarnation != me.incarnation => {
                            Err(Retry::Failed(LeaseError::SameReplicaId {
                                id: me.id.clone(),
                                pk: held.pk.clone(),
                            }))
                        }
                        // Still ours, in the same term: an earlier write of this holding.
                        Some(cur)
                            if cur.holder == me.id && !cur.released && cur.term == held.term =>
                        {
                            Err(Retry::On(cur))
                        }
                        _ => Err(Retry::Failed(LeaseError::Lost {
                            pk: held.pk.clone(),
                        })),
                    }
                }
                _ => Err(Retry::Failed(self.classify(
                    "dynamodb:UpdateItem",
                    &held.pk,
                    &err,
                ))),
            },
        }
    }
}

/// Why one conditional write did not succeed.
enum Retry {
    /// The item is still ours, at this version: write again on it.
    On(LeaseItem),
    Failed(LeaseError),
}
