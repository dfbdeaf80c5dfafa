//! The pure, deterministic heart of Sophon's control plane: the replicated state machine the
//! coordinators agree on through Raft, and the placement scheduler it runs.
//!
//! # What it owns
//! - [`State`]: members (nodes, coordinators), the shelf (models, versions, curation), approvals
//!   (policies, requests, decisions), deployments, placements, tokens and the audit log.
//! - [`Command`] and [`Entry`]: the only way to change a [`State`], one committed Raft entry at a
//!   time through [`State::apply`]; [`Role`]s decide who may issue what.
//! - [`scheduler::place`]: replicas onto nodes by hardware, memory, load and spread.
//! - [`raft::ReplicaNode`]: one coordinator's Raft replica (raft-rs `RawNode` + [`State`]) and
//!   its ready loop, sans IO, over a swappable [`raft::LogStore`]; tested on a simulated
//!   network and clock.
//! - [`server`]: the IO shell of a coordinator process: the driver thread (wall clock, redb),
//!   QUIC transport, artifact store, admin HTTP API, `init`/`join`/`start`.
//!
//! # How data flows
//! The admin API authenticates a bearer secret ([`State::authenticate`]) into an [`Actor`],
//! wraps the request as an [`Entry`] with the leader's clock, and proposes it. Once Raft commits
//! it, every coordinator calls [`State::apply`] with it and gets the same [`Outcome`] or the same
//! [`Error`]. Snapshots are [`State::snapshot`] / [`State::restore`].
//!
//! # What it must never do
//! Outside [`server`] and the durable [`raft::RedbLogStore`]: no IO, clocks, threads or randomness; no `HashMap` iteration reaching a result; no panics on
//! input. An entry that fails changes nothing at all. Applying the same entries to two fresh
//! states gives byte-identical states.

pub mod command;
pub mod error;
pub mod raft;
pub mod scheduler;
pub mod server;
pub mod state;

pub use command::{Actor, Command, Created, Entry, NodeSpec, Outcome, ReplicaKey, Role, WriteId};
pub use error::{Error, ErrorKind, Result};
pub use scheduler::{Device, Placement, Plan, Unplaced, UnplacedReason, place};
pub use state::State;
pub use state::tokens::hash_secret;
