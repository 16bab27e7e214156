//! The ending states.
//!
//! - **ShardEnded**: `shard_ended` must checkpoint SHARD_END; if it does not, the error is
//!   reported and the call made again later (the shard's children wait until it does).
//! - **LeaseLost**: `lease_lost`, nothing written.
//! - **ShuttingDown**: `shutdown_requested`, the processor's last chance to checkpoint.
//! - **HandingOff**: the same call, then the lease passes to the owner a KCL 3.x leader chose.

use std::ops::ControlFlow;
use std::time::Duration;

use super::{Exit, ShardConsumer, ShardConsumerState, Step, interrupted};
use crate::leases::lease::Position;
use crate::metrics::Metrics;
use crate::processor::Processor;

impl<P: Processor> ShardConsumer<P> {
    pub(super) async fn shard_ended(&mut self) -> Step {
        let ctx = &self.ctx;
        self.fetched = None;
        self.checkpointer.at_shard_end();
        self.processor.shard_ended(&mut self.checkpointer).await;
        if ctx.held.restart_requested() {
            return ControlFlow::Break(Exit::Restart);
        }
        if ctx.held.lease().await.checkpoint.position == Position::ShardEnd {
            Metrics::add(&ctx.metrics.shards_ended, 1);
            ctx.metrics.behind(self.ctx.held.key(), None);
            tracing::info!(shard_id = %self.shard_id, "shard processed to its end");
            return ControlFlow::Break(Exit::ShardEnded);
        }
        if ctx.held.is_lost() {
            return ControlFlow::Continue(ShardConsumerState::LeaseLost);
        }
        self.shard_end_attempts += 1;
        Metrics::add(&ctx.metrics.shard_end_not_checkpointed, 1);
        let wait = Duration::from_secs(1 << self.shard_end_attempts.min(5));
        tracing::error!(shard_id = %self.shard_id, ?wait,
            "the processor returned from shard_ended without checkpointing SHARD_END \
             (call checkpointer.checkpoint()); the shard's children cannot start until it does; \
             calling shard_ended again");
        ControlFlow::Continue(match ctx.pause(wait).await {
            Ok(()) => ShardConsumerState::ShardEnded,
            Err(i) => interrupted(i),
        })
    }

    pub(super) async fn lease_lost(&mut self) -> Step {
        drop(self.fetched.take());
        self.ctx.metrics.behind(self.ctx.held.key(), None);
        if self.initialized {
            self.processor.lease_lost().await;
        }
        ControlFlow::Break(Exit::LeaseLost)
    }

    pub(super) async fn shutting_down(&mut self) -> Step {
        drop(self.fetched.take());
        self.ctx.metrics.behind(self.ctx.held.key(), None);
        if self.initialized {
            self.processor.shutdown_requested(&mut self.checkpointer).await;
        }
        ControlFlow::Break(Exit::Shutdown)
    }

    pub(super) async fn handing_off(&mut self) -> Step {
        drop(self.fetched.take());
        self.ctx.metrics.behind(self.ctx.held.key(), None);
        tracing::info!(shard_id = %self.shard_id, "graceful handoff: the processor checkpoints, then the lease moves");
        if self.initialized {
            self.processor.shutdown_requested(&mut self.checkpointer).await;
        }
        ControlFlow::Break(Exit::HandedOff)
    }
}
