//! Who processes which lease: pure decisions, no I/O, tested as tables.
//!
//! - [`taker`]: the KCL 2.x way, each worker for itself: take free and expired leases up to an
//!   even share, steal from the busiest worker.

pub(crate) mod taker;
