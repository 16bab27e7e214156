//! What the caller gets back for each record: a receipt once it is delivered.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use tokio::sync::oneshot;

use crate::error::{DeliveryError, ErrorKind};

/// One attempt to send a record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attempt {
    /// When the PutRecords call started.
    pub at: SystemTime,
    /// How long the call took.
    pub duration: Duration,
    /// The error code of this attempt; `None` for the one that succeeded.
    pub error_code: Option<String>,
}

/// Where a record was written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Receipt {
    /// The shard that stored it.
    pub shard_id: String,
    /// The Kinesis record's sequence number (shared by every user record of an aggregate).
    pub sequence_number: String,
    /// The position in the aggregate (the sub-sequence number a consumer sees); `None` when the
    /// record was sent plain.
    pub aggregated_index: Option<u64>,
    /// Every attempt, the successful one last.
    pub attempts: Vec<Attempt>,
}

/// Resolves to the record's [`Receipt`], or a [`DeliveryError`] that hands the record back.
///
/// Dropping it does not cancel the delivery.
#[derive(Debug)]
#[must_use = "the receipt tells whether the record was delivered"]
pub struct ReceiptFuture {
    rx: oneshot::Receiver<Result<Receipt, DeliveryError>>,
}

impl ReceiptFuture {
    pub(crate) fn new(rx: oneshot::Receiver<Result<Receipt, DeliveryError>>) -> Self {
        ReceiptFuture { rx }
    }
}

impl Future for ReceiptFuture {
    type Output = Result<Receipt, DeliveryError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.rx).poll(cx).map(|r| {
            // The pipeline resolves every receipt before it drops it; a closed channel means the
            // background task is gone (a panic), which is reported, never silently ignored.
            r.unwrap_or_else(|_| {
                Err(DeliveryError::new(
                    ErrorKind::Fatal,
                    Some("ProducerTaskGone".into()),
                    kinesis_aggregation::UserRecord::new("?", bytes::Bytes::new()),
                    Vec::new(),
                ))
            })
        })
    }
}
