//! Initializing: waits until the lease is usable (after a steal, until the old owner has
//! stopped), makes a LATEST start durable, calls `initialize`, and starts the fetcher at the
//! checkpoint.

use std::ops::ControlFlow;

use super::{Exit, ShardConsumer, ShardConsumerState, Step, interrupted};
use crate::leases::lease::Position;
use crate::leases::shard_sync::InitialPosition;
use crate::processor::{Initialization, Processor};
use crate::record::Unpacker;
use crate::retrieval::kinesis::StartAt;

impl<P: Processor> ShardConsumer<P> {
    pub(super) async fn initializing(&mut self) -> Step {
        if let Err(i) = self.ctx.until_usable().await {
            return ControlFlow::Continue(interrupted(i));
        }
        let shard_id = self.shard_id.clone();
        let mut lease = self.ctx.held.lease().await;
        if lease.checkpoint.position == Position::Latest {
            // Make the start durable before anything is processed (see retrieval/latest.rs).
            match crate::retrieval::latest::durable_start(&self.ctx.api, &shard_id, std::time::SystemTime::now()).await
            {
                Some(anchor) => match self.checkpointer.anchor(anchor.clone()).await {
                    Ok(()) => {
                        tracing::debug!(shard_id = %shard_id, checkpoint = anchor.position.as_str(), "LATEST made durable");
                        lease = self.ctx.held.lease().await;
                    }
                    Err(error) => {
                        tracing::warn!(shard_id = %shard_id, %error, "writing the start of a LATEST lease failed; it stays at LATEST until the first checkpoint");
                    }
                },
                None => tracing::warn!(shard_id = %shard_id,
                    "the newest record of the shard was not found within the pages searched; the lease stays at LATEST until the first checkpoint"),
            }
        }
        let (start, resume_after) = match &lease.checkpoint.position {
            Position::TrimHorizon => (StartAt::TrimHorizon, None),
            Position::Latest => (StartAt::Latest, None),
            Position::AtTimestamp => match self.ctx.initial {
                InitialPosition::AtTimestamp(at) => (StartAt::AtTimestamp(at), None),
                _ => {
                    tracing::warn!(shard_id = %shard_id, "lease at AT_TIMESTAMP but no timestamp configured: reading from TRIM_HORIZON");
                    (StartAt::TrimHorizon, None)
                }
            },
            Position::Sequence(seq) => {
                (StartAt::AtSequence(seq.clone()), Some((seq.clone(), lease.checkpoint.sub_sequence)))
            }
            Position::ShardEnd => return ControlFlow::Break(Exit::ShardEnded),
        };
        self.processor
            .initialize(&Initialization {
                stream: self.ctx.stream.to_string(),
                stream_identifier: self.ctx.stream_identifier.as_deref().map(str::to_owned),
                shard_id: shard_id.to_string(),
                checkpoint: lease.checkpoint.clone(),
                pending_checkpoint: lease.pending_checkpoint.clone(),
            })
            .await;
        self.initialized = true;
        let unpacker =
            Unpacker::new(shard_id.clone(), lease.hash_range, resume_after).in_stream(self.ctx.stream.clone());
        self.fetched = Some(self.ctx.spawn_fetcher(&shard_id, start, unpacker));
        ControlFlow::Continue(ShardConsumerState::Processing)
    }
}
