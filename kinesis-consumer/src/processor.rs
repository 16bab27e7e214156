//! What users implement: a [`Processor`] per shard, made by a [`ProcessorFactory`]. The lifecycle is
//! the KCL's `ShardRecordProcessor`:
//!
//! ```text
//! initialize ─▶ process_records* ─┬─▶ shard_ended        (must checkpoint SHARD_END)
//!                                 ├─▶ lease_lost         (another worker has the shard; no checkpoint)
//!                                 └─▶ shutdown_requested (last chance to checkpoint)
//! ```
//!
//! Calls for one shard never overlap. A processor does not return errors: what it cannot process,
//! it must retry or record itself; records it returns from without checkpointing are delivered
//! again after a failover or restart (at least once).

use std::future::Future;

use crate::checkpointer::Checkpointer;
use crate::leases::lease::Checkpoint;
use crate::record::Batch;

/// What a processor learns when it starts on a shard.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Initialization {
    /// The stream's name.
    pub stream: String,
    /// In a multi-stream application, the stream's identifier `account:stream:creationEpoch`.
    pub stream_identifier: Option<String>,
    /// The shard.
    pub shard_id: String,
    /// The checkpoint processing resumes after (or the initial position).
    pub checkpoint: Checkpoint,
    /// A checkpoint the previous holder prepared and did not commit
    /// ([`crate::Checkpointer::prepare_checkpoint`]): what it processed beyond `checkpoint` may
    /// have had effects, which this processor can finish or undo. Records after `checkpoint`
    /// are delivered again.
    pub pending_checkpoint: Option<Checkpoint>,
}

/// Processes the records of one shard.
pub trait Processor: Send + 'static {
    /// Called once, before any records.
    fn initialize(&mut self, init: &Initialization) -> impl Future<Output = ()> + Send {
        let _ = init;
        async {}
    }

    /// Called with each batch of records, in the shard's order. Checkpoint when the batch is done
    /// (or less often; records after the last checkpoint are delivered again after a failover).
    fn process_records(&mut self, batch: Batch, checkpointer: &mut Checkpointer) -> impl Future<Output = ()> + Send;

    /// The lease was lost: another worker processes the shard now. Checkpointing is not possible.
    fn lease_lost(&mut self) -> impl Future<Output = ()> + Send {
        async {}
    }

    /// Every record of the shard was delivered: the processor must call
    /// [`Checkpointer::checkpoint`], which records SHARD_END, so that the shard's children may
    /// start. If it does not, the consumer reports an error and calls `shard_ended` again later.
    fn shard_ended(&mut self, checkpointer: &mut Checkpointer) -> impl Future<Output = ()> + Send;

    /// The worker is shutting down gracefully: checkpoint what was processed; the lease is then
    /// released for another worker.
    fn shutdown_requested(&mut self, checkpointer: &mut Checkpointer) -> impl Future<Output = ()> + Send {
        let _ = checkpointer;
        async {}
    }
}

/// Makes a processor for each shard a worker starts on.
pub trait ProcessorFactory: Send + Sync + 'static {
    /// The processor type.
    type Processor: Processor;

    /// A processor for `shard_id`.
    fn create(&self, shard_id: &str) -> Self::Processor;

    /// A processor for a shard of a stream (the KCL's `ShardInfo`): what a multi-stream
    /// application implements to make each stream's own processor. By default, [`Self::create`]
    /// with the shard id.
    fn create_for(&self, shard: &ShardInfo) -> Self::Processor {
        self.create(&shard.shard_id)
    }
}

/// The shard a processor is made for (the KCL's `ShardInfo`).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ShardInfo {
    /// The stream's name.
    pub stream: String,
    /// In a multi-stream application, the stream's identifier `account:stream:creationEpoch`
    /// (its leases' `streamName`); `None` otherwise.
    pub stream_identifier: Option<String>,
    /// The shard.
    pub shard_id: String,
    /// The lease's key: the shard id, or in a multi-stream application
    /// `account:stream:creationEpoch:shardId`.
    pub lease_key: String,
}

impl<F, P> ProcessorFactory for F
where
    F: Fn(&str) -> P + Send + Sync + 'static,
    P: Processor,
{
    type Processor = P;

    fn create(&self, shard_id: &str) -> P {
        self(shard_id)
    }
}
