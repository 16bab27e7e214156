//! WaitingOnParents: a child shard starts only when every parent's lease is at SHARD_END (a
//! parent without a lease has aged out of the stream).

use std::ops::ControlFlow;

use super::{Exit, ShardConsumer, ShardConsumerState, Step, interrupted};
use crate::leases::lease::Position;
use crate::processor::Processor;

impl<P: Processor> ShardConsumer<P> {
    pub(super) async fn waiting_on_parents(&mut self) -> Step {
        let lease = self.ctx.held.lease().await;
        if lease.checkpoint.position == Position::ShardEnd {
            return ControlFlow::Break(Exit::ShardEnded);
        }
        loop {
            if self.ctx.parents_done(&lease).await {
                return ControlFlow::Continue(ShardConsumerState::Initializing);
            }
            if let Err(i) = self.ctx.pause(self.ctx.parent_poll_interval).await {
                return ControlFlow::Continue(interrupted(i));
            }
        }
    }
}
