//! What the caller gets back for each record: a receipt once it is delivered.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::sync::oneshot;

use crate::attempt::Attempts;
use crate::error::{DeliveryError, ErrorKind};

/// Where a record was written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Receipt {
    /// The stream's name (shared by every record of the stream).
    pub stream: Arc<str>,
    /// The shard that stored it (shared by every user record of an aggregate).
    pub shard_id: Arc<str>,
    /// The Kinesis record's sequence number (shared by every user record of an aggregate).
    pub sequence_number: Arc<str>,
    /// The position in the aggregate (the sub-sequence number a consumer sees); `None` when the
    /// record was sent plain.
    pub aggregated_index: Option<u64>,
    /// Every attempt, the successful one last.
    pub attempts: Attempts,
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
                    Attempts::default(),
                ))
            })
        })
    }
}
