//! Leases: the rows of the lease table ([`lease`]), the table and its fenced writes ([`table`]),
//! the leases this worker holds ([`held`]) and keeps ([`coordinator`]), and the shard sync that
//! gives every shard a lease ([`shard_sync`]), and which leases a worker reads ([`scope`]).

pub(crate) mod coordinator;
pub(crate) mod held;
pub(crate) mod lease;
pub(crate) mod migration;
pub(crate) mod scope;
pub(crate) mod shard_sync;
pub(crate) mod table;
