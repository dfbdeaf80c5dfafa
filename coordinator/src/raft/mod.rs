//! The Raft layer's sans-IO core: a [`ReplicaNode`] wraps raft-rs's `RawNode` and the replicated
//! [`State`](crate::State), and runs the ready loop in one place ([`ReplicaNode::handle_ready`]).
//!
//! # How data flows
//! The driver (a tokio task in production, the `sim` harness in tests) feeds the node ticks, peer messages
//! and proposals, then calls `handle_ready` and delivers the returned messages; committed entries
//! come back as `(index, Result<Outcome>)`. The log lives behind [`LogStore`]: the in-memory
//! [`MemLogStore`] for tests, or the durable [`RedbLogStore`], from which a crashed replica
//! comes back with [`ReplicaNode::restart`].
//!
//! # What it must never do
//! No sockets, clocks, threads or files: time is `tick()`, the network is the caller's.

pub mod logger;
pub mod node;
pub mod proposals;
pub mod redb_store;
#[cfg(test)]
mod sim;
pub mod store;
#[cfg(test)]
mod tests;

pub use logger::tracing_logger;
pub use node::{Applied, ReadyOutput, ReplicaConfig, ReplicaNode};
pub use proposals::{Context, Fate, fate};
pub use redb_store::{RedbLogStore, write_snapshot_file};
pub use store::{LogStore, MemLogStore};
