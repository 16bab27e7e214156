//! Who processes which lease: pure decisions, no I/O, tested as tables.
//!
//! - [`taker`]: the KCL 2.x way, each worker for itself: take free and expired leases up to an
//!   even share, steal from the busiest worker.
//! - [`count`]: the KCL 3.x way, one leader for all: assign free and expired leases, balance by
//!   lease count with graceful handoffs.

pub(crate) mod count;
pub(crate) mod taker;
