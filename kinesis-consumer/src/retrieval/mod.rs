//! Reading a shard: the Kinesis calls ([`kinesis`]), GetRecords polling ([`polling`]) or
//! enhanced fan-out ([`fan_out`]), both handing the shard's consumer the same [`polling::Fetch`] items,
//! and the durable start of a lease at LATEST ([`latest`]).

pub(crate) mod fan_out;
pub(crate) mod kinesis;
pub(crate) mod latest;
pub(crate) mod polling;
